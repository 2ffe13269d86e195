"""CPU kernels of multi-scale deformable attention (see docs/ops/ms_deform_attn.rst).

Layouts at the op boundary are Deformable-DETR's: value (N, S, M, D), spatial_shapes (L, 2) as
(H_l, W_l), level_start_index (L,), sampling_locations (N, Lq, M, L, P, 2) as normalized
(u, v) = (x, y), attention_weights (N, Lq, M, L, P), output (N, Lq, M*D). All arrays
C-contiguous, validated by ``deformnp.ops.attention`` (which also refuses D > MAX_CHANNELS).
Chunking, allocation and the thread choice happen here, in ``ms_deform_attn_forward`` and
``ms_deform_attn_backward`` (the same signatures as ``kernels/cuda/attention.py``).

Sampling point p of head m at level l: y = v*H_l - 0.5, x = u*W_l - 0.5, zero-fade rule
(``rules.zero_fade_plan``, see docs/ops/bilinear.rst). Nothing of size (N, M, D, Lq, L, P) is ever
materialised.

How the kernels are fast. Profiling the first version at the reference benchmark size showed
per-point overhead, not memory traffic: scalar plan arithmetic, run-time alias checks before every
vectorized channel loop, and a query's accumulator going through memory for every point. The
measures below took one thread from 7.2 to 3.1 ms (forward) and from 13.3 to 8.7 ms (backward
kernel); the figures against torch are in benches/RESULTS.md.

* **Head-major value.** ``ms_deform_attn_forward`` / ``ms_deform_attn_backward`` first copy value
  to (N, M, S, D) (``head_major``; through the ``cache`` dict that the autograd node passes to
  both, the copy is made once for both passes), so
  one head's map is one contiguous (S, D) block and a pixel is a contiguous run of D values. The
  value gradient is accumulated in that layout and copied back (``from_head_major``). The two
  copies take about 6% of a forward+backward, and pay for themselves: the kernels reading and
  writing value's own (N, S, M, D) layout instead (a head's pixels M * D elements apart) made
  the reference-size backward alone 30-40% slower (measured; benches/RESULTS.md).
* **Level by level.** The forward's tasks are (n, m, a chunk of ``QC`` queries) and the
  backward's (n, m, level, chunk of queries): a task reads one head's map one level at a time,
  so at Deformable-DETR's encoder size (levels (100,152)..(13,19)) three levels of four are
  small enough for the core's L2 cache, and the level's size and first row are loop constants
  of the plan loop. The forward keeps the output rows of its ``QC`` queries on the stack
  (``ACC_ELEMENTS`` values) and adds the levels into them in turn, so each output element
  still sums its points in the order (level, point).
* **Plans in batches.** The plans of up to ``PLAN_BATCH`` points of a level (four corner offsets
  and their weights; several queries' points when P is small) are computed together: their
  locations and weights are first copied into small contiguous stack arrays, then one flat loop
  over the batch computes the plans (``_level_plan``) into stack arrays, one array per
  quantity. That loop has no stores LLVM must assume alias the inputs and reads consecutive
  elements, so it vectorizes (floor, compares, selects across points); the copy took a stall
  on the strided location loads out of it (perf: a fifth of the forward's samples). The channel
  loops then read the plans back from L1.
* **Channel count as a constant.** ``kernels(D)`` builds the kernels with D fixed at compile
  time: the channel loops get a constant trip count and unroll into straight vector code
  (the forward's accumulator row still goes through the stack between points). ``kernels(0)``
  is the generic build for any D up to ``GENERIC_CHANNELS``; ``channels_for`` picks the build
  (the specialised one only for large problems or large D, so small calls never compile a new
  variant). Both are built from the same source below, and all builds are cached on disk.
* **The backward's streams a block ahead.** A backward task walks one (n, m, level) slice of the
  point arrays (locations, weights, their gradients) and of grad_out: a few bytes a query, M*L*P
  (or M*D) elements apart. At Deformable-DETR's encoder size those arrays are tens of MB, so
  every query's lines came from memory when its turn came, their misses hardly overlapping: even
  the smallest level (13 x 19, its map in L1) cost 68 ns a point, against 34 ns with the same
  points laid out task by task (measured, one thread). Now a task copies the grad_out rows of
  ``QBLK`` queries (``GRAD_ROWS_ELEMENTS`` values) in one loop of independent loads, whose
  misses overlap (the points then read their query's row there), and requests the next plan
  batch's lines of the point arrays (``_prefetch``) before working on the current one. The same
  arithmetic in the same order: gradients bit-identical. Encoder size, old and new alternating
  (CPU ms, median / best): one thread 552 / 529 -> 455 / 424, two threads (CPU time of both) 590
  / 524 -> 446 / 426; value gradient alone 317 -> 228, location and weight gradients alone 328
  -> 246 (one thread). The reference size (arrays of about 1 MB, in the caches) is unchanged
  within noise.
* **Short accumulator chain.** The forward adds a point's four weighted corner rows into the
  query's output row. Built with ``reassoc`` (as the backward is, for its channel sums), LLVM
  turned ``row += a0*v0 + a1*v1 + a2*v2 + a3*v3`` into four fused multiply-adds chained through
  the row, which lives on the stack: each point of a query waited for the previous one's four
  FMAs and a store. The forward sums no channels, so it is built with ``contract`` alone: the
  four products are summed first (a multiply and three FMAs, independent of the row) and added
  to the row with one add. The output moves at float rounding (float32 reference size: 6e-7
  at most; against the float64 result the largest error fell from 5.6e-7 to 3.8e-7). Forward
  CPU time, old and new alternating: reference size one thread -4 to -12% (best and median of
  60, two runs), encoder size two threads 151 -> 143 ms (median of 6).
* **Stack buffers.** The per-query accumulators and gradient rows are stack arrays
  (``_stack_ptr``), which LLVM knows alias nothing else, so the channel loops vectorize without
  run-time overlap checks.
* **The scatter as vector code.** The backward adds a * w[k] * g into four corner rows of the
  value gradient per point. As a Python loop LLVM compiled it either with a trip-count dispatch
  per corner (about 33 instructions a corner at D = 32, run to the array's D) or as 32 scalar
  FMAs (run to the constant D); ``_add_scaled_row`` emits the loop as SIMD-register-wide
  vectors, so at a constant D each corner is a broadcast and D / 8 vector FMAs and stores with
  the gradient row held in registers (18 instructions a corner). The same FMAs in the same
  order: gradients bit-identical. The builds with D compiled in use it; the generic build keeps
  the Python loop, which LLVM's vectorizer runs faster for a run-time D (the intrinsic's loop
  took 6-10% more backward time there, 32k points). Reference size, one thread, old and new
  alternating (CPU ms, best / median of 60): backward 6.54 / 9.24 -> 5.97 / 7.89, value
  gradient alone 3.49 / 5.16 -> 2.99 / 3.92; encoder size, two threads (CPU time of both, best /
  median of 8): 492 / 575 -> 473 / 516.

Parallelism and determinism:

* forward: ``prange`` over tasks (n, m, chunk of ``QC`` queries); a task writes the rows
  out[n, q, m*D : (m+1)*D] of its queries only.
* backward: ``prange`` over tasks (n, m, level l, chunk of queries). A task owns the gradients
  of the locations and weights of its queries' points on level l (owner computes), and scatters
  into its own copy of level l's rows of the (n, m) block of the head-major value gradient:
  chunk 0 writes ``grad_value_hm`` itself, chunk c >= 1 a buffer ``grad_value_extra[c - 1]``;
  ``from_head_major`` adds them in chunk order. The number of chunks (``n_chunks``, which
  counts the (n, m, l) slices), and the build, depend on the shapes only, never on the thread
  count, so gradients are bit-identical with any number of threads.

Index arithmetic is 64-bit, except in the plans. A plan's corners are offsets from its level's
first element in the head-major value, int32 when every level holds fewer than 2**31 elements of
a head (H * W * D; ``wide_offsets``), int64 otherwise (a build of its own: ``kernels(D, wide)``);
the channel loops add them to the level's 64-bit start. The rule's integer steps then run in
int32 too (its ``it``; ``ops.ms_deform_attn`` refuses levels of 2**31 rows or columns), so the
plan loop runs as many lanes as the float type: eight float32 lanes on AVX2, where int64 would
hold it to four and convert floats to int64 one lane at a time. Measured at the reference size,
one thread: the int32 floor -10% backward and -5% forward CPU time; int32 offsets and index
steps (with the backward's gradient-row copy vectorized) another 6-24% (forward) and 0-20%
(backward), best of 60 calls in three runs on a noisy VM; the same plans bit for bit. Flat
offsets are converted to uint64 before indexing: they are never negative, and unsigned indices
spare Numba's negative-index wrap-around test in the inner channel loops.

Precision: plans are computed in the data's type (``ft = value.dtype.type``, as in the CUDA
kernels): float32 data gets float32 coordinates and plans, float64 data float64 ones. Channel
sums run in the data dtype, as in the anchors: the forward accumulates each output row, the
backward the per-corner channel sums t_k = sum_d g[d] V[idx[k], d] and the scatter into
grad_value. In the backward ``fastmath`` reassociation lets the channel sums vectorize (the
forward needs none: its channel loops are elementwise); the order of every sum is fixed by the
compiled code, so it does not depend on threads.
"""

from __future__ import annotations

import functools
from typing import Any

import numpy as np
from llvmlite import ir
from numba import carray, njit, prange, types, uint64
from numba.core import cgutils
from numba.extending import intrinsic

from .sampling import threads_for, zero_fade_plan_ft

ACC_ELEMENTS = 2048  # forward accumulator rows of a task: QC * D values on the stack
PLAN_BATCH = 32  # sampling points whose plans are computed in one vectorized loop
GENERIC_CHANNELS = 64  # the generic build serves D <= this (its stack buffers have this size)
SPECIALISE_WORK = 1 << 21  # sampling points times channels from which D is compiled in
MAX_CHANNELS = 4096  # per head: the stack buffers hold one row of D values (32 KiB in float64)
GRAD_ROWS_ELEMENTS = 4096  # backward: grad_out rows copied a block at a time (QBLK * D values)

_FAST = {"reassoc", "contract"}


@intrinsic
def _stack_ptr(typingctx: Any, size: Any, dtype: Any) -> Any:
    """Pointer to ``size`` (a compile-time constant) uninitialised elements on the stack.

    The buffer lives in the calling function's frame (``alloca`` in its entry block), so wrap it
    with ``carray`` in the kernel itself and never return it.
    """
    if not isinstance(size, types.IntegerLiteral):
        return None
    n = max(int(size.literal_value), 1)
    dt = dtype.dtype

    def codegen(context: Any, builder: Any, signature: Any, args: Any) -> Any:
        ty = context.get_value_type(dt)
        buf = cgutils.alloca_once(builder, ir.ArrayType(ty, n), name="stack_buffer")
        return builder.bitcast(buf, ty.as_pointer())

    return types.CPointer(dt)(size, dtype), codegen


SIMD_BYTES = 32  # one AVX2 register: the vector width of ``_add_scaled_row``


@intrinsic
def _add_scaled_row(typingctx: Any, dst: Any, offset: Any, alpha: Any, src: Any, n: Any) -> Any:
    """``dst[offset + i] += alpha * src[i]`` for ``i < n``: 1-D C-contiguous arrays of one float
    dtype, the caller guaranteeing ``offset + n <= dst.size`` and ``n <= src.size``.

    The backward's scatter of a point into a corner's row of the value gradient. Written as a
    loop of SIMD-register-wide vectors (eight float32, four float64) then a scalar tail, each
    step one fused multiply-add (``contract``, as the kernels' ``fastmath``), so it computes
    exactly what ``for d in range(n): dst[offset + d] += alpha * src[d]`` computes there. What it
    changes is the code: with ``n`` a compile-time constant the loop unrolls into straight
    vector code and ``src`` (a stack row) stays in registers across a point's four corners,
    which LLVM does not do for the Python loop (run to the array's length it pays a trip-count
    dispatch per corner; to the constant it is left as 32 scalar FMAs). See the module's
    docstring for the measured effect.
    """
    if not (isinstance(dst, types.Array) and isinstance(src, types.Array)):
        return None
    dt = dst.dtype
    if src.dtype != dt or not isinstance(dt, types.Float) or dst.ndim != 1 or src.ndim != 1:
        return None
    sig = types.void(dst, types.uint64, dt, src, types.intp)

    def codegen(context: Any, builder: Any, signature: Any, args: Any) -> Any:
        dst_v, off_v, alpha_v, src_v, n_v = args
        width = SIMD_BYTES // (dt.bitwidth // 8)
        align = dt.bitwidth // 8
        vty = ir.VectorType(context.get_value_type(dt), width)
        i32 = ir.IntType(32)
        d_arr = cgutils.create_struct_proxy(signature.args[0])(context, builder, value=dst_v)
        s_arr = cgutils.create_struct_proxy(signature.args[3])(context, builder, value=src_v)
        d_ptr = builder.gep(d_arr.data, [off_v])
        s_ptr = s_arr.data
        undef = ir.Constant(vty, ir.Undefined)
        one = builder.insert_element(undef, alpha_v, ir.Constant(i32, 0))
        alphas = builder.shuffle_vector(
            one, undef, ir.Constant(ir.VectorType(i32, width), [0] * width)
        )
        fast = ("contract",)

        def step(alpha_x: Any, d_at: Any, s_at: Any) -> None:  # *d_at += alpha_x * *s_at
            prod = builder.fmul(alpha_x, builder.load(s_at, align=align), flags=fast)
            total = builder.fadd(builder.load(d_at, align=align), prod, flags=fast)
            builder.store(total, d_at, align=align)

        vectors = builder.udiv(n_v, ir.Constant(n_v.type, width))
        with cgutils.for_range(builder, vectors) as loop:
            i = builder.mul(loop.index, ir.Constant(loop.index.type, width))
            d_at = builder.bitcast(builder.gep(d_ptr, [i]), vty.as_pointer())
            s_at = builder.bitcast(builder.gep(s_ptr, [i]), vty.as_pointer())
            step(alphas, d_at, s_at)
        tail = builder.mul(vectors, ir.Constant(n_v.type, width))
        with cgutils.for_range(builder, n_v, start=tail) as loop:
            step(alpha_v, builder.gep(d_ptr, [loop.index]), builder.gep(s_ptr, [loop.index]))
        return context.get_dummy_value()

    return sig, codegen


@intrinsic
def _prefetch(typingctx: Any, arr: Any, index: Any) -> Any:
    """Ask the CPU to bring the cache line holding ``arr[index]`` (a 1-D C-contiguous array)
    into L1 ahead of use: LLVM's ``llvm.prefetch`` (read, keep in all levels), on x86 a
    ``prefetcht0``. A hint only: it reads nothing into the program and cannot fault, so an index
    past the end is harmless (the kernels never pass one)."""
    if not isinstance(arr, types.Array) or arr.ndim != 1:
        return None
    sig = types.void(arr, types.uint64)

    def codegen(context: Any, builder: Any, signature: Any, args: Any) -> Any:
        arr_v, index_v = args
        data = cgutils.create_struct_proxy(signature.args[0])(context, builder, value=arr_v).data
        i8p = ir.IntType(8).as_pointer()
        i32 = ir.IntType(32)
        fnty = ir.FunctionType(ir.VoidType(), [i8p, i32, i32, i32])
        fn = cgutils.get_or_insert_function(builder.module, fnty, "llvm.prefetch.p0")
        ptr = builder.bitcast(builder.gep(data, [index_v]), i8p)
        rw, locality, data_cache = (ir.Constant(i32, k) for k in (0, 3, 1))
        builder.call(fn, [ptr, rw, locality, data_cache])
        return context.get_dummy_value()

    return sig, codegen


@njit(parallel=True, cache=True)
def to_head_major(value, out):
    """out[n, m, s, d] = value[n, s, m, d]."""
    N, S, M, D = value.shape
    for nm in prange(N * M):
        n = nm // M
        m = nm - n * M
        for s in range(S):
            dst = out[n, m, s]
            src = value[n, s, m]
            for d in range(D):
                dst[d] = src[d]
    return out


@njit(parallel=True, cache=True)
def from_head_major(grad_hm, extra, out):
    """out[n, s, m, d] = grad_hm[n, m, s, d] + extra[0][...] + extra[1][...] + ... (in order)."""
    N, S, M, D = out.shape
    for ns in prange(N * S):
        n = ns // S
        s = ns - n * S
        for m in range(M):
            dst = out[n, s, m]
            src = grad_hm[n, m, s]
            for d in range(D):
                dst[d] = src[d]
            row = ((n * M + m) * S + s) * D
            for c in range(extra.shape[0]):
                add = extra[c, row : row + D]
                for d in range(D):
                    dst[d] += add[d]
    return out


@njit(cache=True)
def _level_slots(spatial_shapes, level_start_index, P):
    """Per sampling slot i = l*P + p of a (query, head): H_l, W_l and the level's first row."""
    L = spatial_shapes.shape[0]
    H = np.empty(L * P, np.int64)
    W = np.empty(L * P, np.int64)
    start = np.empty(L * P, np.int64)
    for i in range(L * P):
        H[i] = spatial_shapes[i // P, 0]
        W[i] = spatial_shapes[i // P, 1]
        start[i] = level_start_index[i // P]
    return H, W, start


@njit(inline="always", cache=True)
def _level_plan(u, v, H, W, Hf, Wf, D, ft, it):
    """Point (u, v) on a level of H x W pixels (Hf, Wf: the same in ``ft``): the offsets of its
    four corners from the level's first element in the head-major value (``it``: the level's
    H * W * D elements fit it) and its zero-fade plan, computed in ``ft`` (the data's float
    type)."""
    x = ft(u) * Wf - ft(0.5)
    y = ft(v) * Hf - ft(0.5)
    idx, w, cy, cx = zero_fade_plan_ft(y, x, H, W, ft, it)
    off = (it(idx[0] * D), it(idx[1] * D), it(idx[2] * D), it(idx[3] * D))
    return off, w, cy, cx


def wide_offsets(spatial_shapes: np.ndarray, D: int) -> bool:
    """Whether a level holds 2**31 or more elements of a head (H * W * D): the build with int64
    corner offsets then runs, the int32 build otherwise (eight AVX2 lanes in its plan loop, four
    with int64; see the module's docstring)."""
    sizes = [int(h) * int(w) for h, w in spatial_shapes.tolist()]
    return max(sizes, default=0) * D >= 1 << 31


def _kernels_for(D: int, points: int, spatial_shapes: np.ndarray) -> tuple[Any, Any]:
    """The (forward, backward) build for these shapes (``channels_for``, ``wide_offsets``)."""
    return kernels(channels_for(D, points), wide_offsets(spatial_shapes, D))


def channels_for(D: int, points: int) -> int:
    """The build for D channels and ``points`` sampling points: D itself, or 0 (generic).
    D <= MAX_CHANNELS (``ops.ms_deform_attn`` refuses more)."""
    if D > GENERIC_CHANNELS or points * D >= SPECIALISE_WORK:
        return D
    return 0


def _build(py_func: Any, name: str, fastmath: set[str] = _FAST) -> Any:
    """Compile one build of a kernel under a name of its own (with these ``fastmath`` flags).

    The builds are closures of one source, so without this they would all be named
    ``kernels.<locals>.forward``. Numba derives the symbols of compiled code (and of the
    environment holding its constants) from that name and a counter of the compiling process,
    so two builds compiled by different processes could carry the same symbols: loaded together
    from the on-disk cache, one could then run with the other's environment (seen once as a
    crash, "'descr' is NULL", after several processes had filled the cache).
    """
    py_func.__name__ = py_func.__qualname__ = name
    return njit(parallel=True, cache=True, fastmath=fastmath)(py_func)


@functools.cache
def kernels(channels: int, wide: bool = False) -> tuple[Any, Any]:
    """(forward, backward) compiled with D fixed at ``channels``; 0 builds them for any
    D <= GENERIC_CHANNELS. Corner offsets are int64 when ``wide``, int32 otherwise (for levels
    of fewer than 2**31 elements a head: ``wide_offsets``). The arguments are the head-major
    value and the level slots."""
    DK = channels  # compile-time constants of the closures below
    IT = np.int64 if wide else np.int32
    BUF = channels if channels > 0 else GENERIC_CHANNELS
    B = PLAN_BATCH
    B4 = 4 * PLAN_BATCH
    QC = max(1, ACC_ELEMENTS // BUF)  # queries per forward task
    QCB = QC * BUF
    QBLK = max(1, GRAD_ROWS_ELEMENTS // BUF)  # backward: queries whose grad_out rows are copied
    QBLKB = QBLK * BUF

    def forward(value_hm, slot_h, slot_w, slot_start, sampling_locations, attention_weights, out):
        """out[n, q, m*D + d] = sum_{l,p} A * zero_fade(V_l[n, m, :, :, d], v*H_l - .5, u*W_l - .5)."""
        N, M, S, Dv = value_hm.shape
        if Dv > BUF or (DK > 0 and Dv != DK):
            raise ValueError("ms_deform_attn: value's D does not fit this kernel build")
        D = DK if DK > 0 else Dv
        Lq = sampling_locations.shape[1]
        L = sampling_locations.shape[3]
        P = sampling_locations.shape[4]
        dt = value_hm.dtype
        ft = dt.type  # plans in the data's type: float32 data, float32 plans (8 lanes)
        v = value_hm.reshape(-1)
        o = out.reshape(-1)
        loc = sampling_locations.reshape(-1)
        attn = attention_weights.reshape(-1)
        n_qc = (Lq + QC - 1) // QC
        for task in prange(N * M * n_qc):
            nm = task // n_qc
            n = nm // M
            m = nm - n * M
            q0 = (task - nm * n_qc) * QC
            nq = min(Lq, q0 + QC) - q0
            acc = carray(_stack_ptr(QCB, dt), (QC, BUF))  # the rows out[n, q0:q0+nq, m]
            off = carray(_stack_ptr(B4, IT), (4, B))
            wgt = carray(_stack_ptr(B4, dt), (4, B))
            live = carray(_stack_ptr(B, np.uint8), (B,))
            us = carray(_stack_ptr(B, dt), (B,))
            vs = carray(_stack_ptr(B, dt), (B,))
            ak = carray(_stack_ptr(B, dt), (B,))
            for qq in range(nq):
                for d in range(D):
                    acc[qq, d] = 0.0
            for lev in range(L):  # level by level: one level's map at a time in the cache
                H = slot_h[lev * P]
                W = slot_w[lev * P]
                if H <= 0 or W <= 0:  # an empty level contributes nothing
                    continue
                Hf = ft(H)
                Wf = ft(W)
                base = uint64((nm * S + slot_start[lev * P]) * D)  # the level's first element
                for p0 in range(0, P, B):
                    np_ = min(B, P - p0)
                    qpb = max(1, B // np_)  # queries per plan batch
                    for qa in range(0, nq, qpb):
                        nqb = min(qpb, nq - qa)
                        for qq in range(nqb):  # the batch's inputs, gathered contiguous
                            pt = (((n * Lq + q0 + qa + qq) * M + m) * L + lev) * P + p0
                            for pp in range(np_):
                                j = qq * np_ + pp
                                p = uint64(pt + pp)
                                us[j] = loc[p + p]
                                vs[j] = loc[p + p + uint64(1)]
                                ak[j] = attn[p]
                        for j in range(nqb * np_):  # their plans, one flat vectorized loop
                            corner, w, _, _ = _level_plan(us[j], vs[j], H, W, Hf, Wf, D, ft, IT)
                            a = ak[j]
                            off[0, j] = corner[0]
                            off[1, j] = corner[1]
                            off[2, j] = corner[2]
                            off[3, j] = corner[3]
                            wgt[0, j] = a * w[0]
                            wgt[1, j] = a * w[1]
                            wgt[2, j] = a * w[2]
                            wgt[3, j] = a * w[3]
                            # out of range (or on the fading edge): contributes nothing
                            live[j] = w[0] != 0.0 or w[1] != 0.0 or w[2] != 0.0 or w[3] != 0.0
                        for qq in range(nqb):
                            row = acc[qa + qq]
                            for pp in range(np_):
                                j = qq * np_ + pp
                                if live[j] == 0:
                                    continue
                                o0 = base + uint64(off[0, j])
                                o1 = base + uint64(off[1, j])
                                o2 = base + uint64(off[2, j])
                                o3 = base + uint64(off[3, j])
                                a0 = wgt[0, j]
                                a1 = wgt[1, j]
                                a2 = wgt[2, j]
                                a3 = wgt[3, j]
                                for d in range(D):
                                    ud = uint64(d)
                                    row[ud] += (
                                        a0 * v[o0 + ud]
                                        + a1 * v[o1 + ud]
                                        + a2 * v[o2 + ud]
                                        + a3 * v[o3 + ud]
                                    )
            for qq in range(nq):
                r = uint64(((n * Lq + q0 + qq) * M + m) * D)
                for d in range(D):
                    o[r + uint64(d)] = acc[qq, d]
        return out

    def backward(
        grad_out,
        value_hm,
        slot_h,
        slot_w,
        slot_start,
        sampling_locations,
        attention_weights,
        n_chunks,
        need_value,
        need_loc_attn,
        grad_value_hm,
        grad_value_extra,
        grad_sampling_locations,
        grad_attention_weights,
    ):
        """Gradients of ``forward`` for value (head-major), sampling_locations, attention_weights.

        Every output is written whole, so none needs zeroing: ``grad_value_hm`` (N, M, S, D)
        and ``grad_value_extra`` (n_chunks - 1, N*M*S*D) are zeroed level block by level block
        by the tasks that scatter into them (with ``need_value`` False they may be empty), the
        location and weight gradients point by point (with ``need_loc_attn`` False they may be
        empty).

        For a point with plan (idx, w, cy, cx), attention weight a and incoming gradient g[d],
        with the per-corner channel sums t_k = sum_d g[d] * V[idx[k], d]:

            grad_A = sum_k w[k] t_k
            grad_u = a * W_l * sum_k cx[k] t_k          (x = u*W_l - 0.5)
            grad_v = a * H_l * sum_k cy[k] t_k          (y = v*H_l - 0.5)
            grad_V[idx[k], d] += a * w[k] * g[d]
        """
        N, M, S, Dv = value_hm.shape
        if Dv > BUF or (DK > 0 and Dv != DK):
            raise ValueError("ms_deform_attn: value's D does not fit this kernel build")
        D = DK if DK > 0 else Dv
        Lq = sampling_locations.shape[1]
        L = sampling_locations.shape[3]
        P = sampling_locations.shape[4]
        dt = value_hm.dtype
        ft = dt.type  # plans in the data's type, as in the forward
        v = value_hm.reshape(-1)
        g = grad_out.reshape(-1)
        gv0 = grad_value_hm.reshape(-1)
        loc = sampling_locations.reshape(-1)
        attn = attention_weights.reshape(-1)
        gloc = grad_sampling_locations.reshape(-1)
        gattn = grad_attention_weights.reshape(-1)
        chunk = (Lq + n_chunks - 1) // n_chunks
        for task in prange(N * M * L * n_chunks):
            c = task % n_chunks
            nml = task // n_chunks
            nm = nml // L
            lev = nml - nm * L
            n = nm // M
            m = nm - n * M
            gv = gv0 if c == 0 else grad_value_extra[c - 1]
            H = slot_h[lev * P]
            W = slot_w[lev * P]
            row0 = nm * S + slot_start[lev * P]
            if need_value:  # this task's level block of its buffer, zeroed by the thread using it
                gv[row0 * Dv : (row0 + max(H, 0) * max(W, 0)) * Dv] = 0.0
            qs = c * chunk
            qe = min(Lq, qs + chunk)
            if H <= 0 or W <= 0:  # an empty level: no pixel to read, zero gradients
                if need_loc_attn:
                    for q in range(qs, qe):
                        pt = (((n * Lq + q) * M + m) * L + lev) * P
                        for pp in range(P):
                            gattn[pt + pp] = 0.0
                            gloc[2 * (pt + pp)] = 0.0
                            gloc[2 * (pt + pp) + 1] = 0.0
                continue
            # grad_out[n, q, m*D : (m+1)*D] of a block of queries, copied together
            grad_rows = carray(_stack_ptr(QBLKB, dt), (QBLK, BUF))
            off = carray(_stack_ptr(B4, IT), (4, B))
            wk = carray(_stack_ptr(B4, dt), (4, B))
            cyk = carray(_stack_ptr(B4, dt), (4, B))
            cxk = carray(_stack_ptr(B4, dt), (4, B))
            ak = carray(_stack_ptr(B, dt), (B,))
            us = carray(_stack_ptr(B, dt), (B,))
            vs = carray(_stack_ptr(B, dt), (B,))
            Hf = ft(H)
            Wf = ft(W)
            base = uint64(row0 * D)  # the level's first element
            for p0 in range(0, P, B):
                np_ = min(B, P - p0)
                qpb = max(1, min(B // np_, QBLK))  # queries per plan batch
                blk0 = qs  # grad_rows holds the rows of queries blk0 .. blk1 - 1
                blk1 = qs
                for qa in range(qs, qe, qpb):
                    nqb = min(qpb, qe - qa)
                    if qa + nqb > blk1:  # the next block's grad_out rows, in one copy loop
                        blk0 = qa
                        blk1 = min(qe, qa + QBLK)
                        for qq in range(blk1 - blk0):
                            gb = uint64(((n * Lq + blk0 + qq) * M + m) * D)
                            for d in range(Dv):
                                grad_rows[qq, d] = g[gb + uint64(d)]
                    qn = qa + qpb  # the next batch's lines of the point arrays, requested now
                    for qq in range(min(qpb, qe - qn) if qn < qe else 0):
                        pn = uint64((((n * Lq + qn + qq) * M + m) * L + lev) * P + p0)
                        _prefetch(loc, pn + pn)
                        _prefetch(attn, pn)
                        if need_loc_attn:
                            _prefetch(gloc, pn + pn)
                            _prefetch(gattn, pn)
                    for qq in range(nqb):  # the batch's inputs, gathered contiguous
                        pt = (((n * Lq + qa + qq) * M + m) * L + lev) * P + p0
                        for pp in range(np_):
                            j = qq * np_ + pp
                            p = uint64(pt + pp)
                            us[j] = loc[p + p]
                            vs[j] = loc[p + p + uint64(1)]
                            ak[j] = attn[p]
                    for j in range(nqb * np_):  # their plans, one flat vectorized loop
                        corner, w, cy, cx = _level_plan(us[j], vs[j], H, W, Hf, Wf, D, ft, IT)
                        off[0, j] = corner[0]
                        wk[0, j] = w[0]
                        cyk[0, j] = cy[0]
                        cxk[0, j] = cx[0]
                        off[1, j] = corner[1]
                        wk[1, j] = w[1]
                        cyk[1, j] = cy[1]
                        cxk[1, j] = cx[1]
                        off[2, j] = corner[2]
                        wk[2, j] = w[2]
                        cyk[2, j] = cy[2]
                        cxk[2, j] = cx[2]
                        off[3, j] = corner[3]
                        wk[3, j] = w[3]
                        cyk[3, j] = cy[3]
                        cxk[3, j] = cx[3]
                    for qq in range(nqb):
                        q = qa + qq
                        gq = grad_rows[q - blk0]  # the query's grad_out row
                        pt = (((n * Lq + q) * M + m) * L + lev) * P + p0
                        for pp in range(np_):
                            j = qq * np_ + pp
                            p = uint64(pt + pp)
                            a = ak[j]
                            if need_loc_attn:
                                o0 = base + uint64(off[0, j])
                                o1 = base + uint64(off[1, j])
                                o2 = base + uint64(off[2, j])
                                o3 = base + uint64(off[3, j])
                                t0 = dt.type(0.0)
                                t1 = dt.type(0.0)
                                t2 = dt.type(0.0)
                                t3 = dt.type(0.0)
                                for d in range(D):
                                    ud = uint64(d)
                                    gd = gq[ud]
                                    t0 += gd * v[o0 + ud]
                                    t1 += gd * v[o1 + ud]
                                    t2 += gd * v[o2 + ud]
                                    t3 += gd * v[o3 + ud]
                                gattn[p] = (
                                    wk[0, j] * t0 + wk[1, j] * t1 + wk[2, j] * t2 + wk[3, j] * t3
                                )
                                gx = (
                                    cxk[0, j] * t0
                                    + cxk[1, j] * t1
                                    + cxk[2, j] * t2
                                    + cxk[3, j] * t3
                                )
                                gy = (
                                    cyk[0, j] * t0
                                    + cyk[1, j] * t1
                                    + cyk[2, j] * t2
                                    + cyk[3, j] * t3
                                )
                                gloc[p + p] = a * gx * Wf
                                gloc[p + p + uint64(1)] = a * gy * Hf
                            if need_value:
                                # corners with zero weight (masked, or the point out of range)
                                # get nothing; gv[ok : ok + D] += a * w[k] * gq[:D]
                                for k in range(4):
                                    if wk[k, j] != 0.0:
                                        aw = a * wk[k, j]
                                        ok = base + uint64(off[k, j])
                                        if DK > 0:  # D compiled in: straight vector code
                                            _add_scaled_row(gv, ok, aw, gq, DK)
                                        else:  # generic build: LLVM's own loop is faster
                                            for d in range(Dv):
                                                ud = uint64(d)
                                                gv[ok + ud] += aw * gq[ud]
        return grad_value_hm

    build = (f"D{channels}" if channels else "generic") + ("_int64" if wide else "")
    return (
        # no "reassoc" in the forward: it sums no channels, and with it LLVM chained a point's
        # four products through the output row (see "Short accumulator chain" above)
        _build(forward, f"ms_deform_attn_forward_{build}", {"contract"}),
        _build(backward, f"ms_deform_attn_backward_{build}"),
    )


def head_major(value):
    """The (N, M, S, D) copy of value (N, S, M, D) that the kernels read."""
    N, S, M, D = value.shape
    return to_head_major(value, np.empty((N, M, S, D), value.dtype))


def _value_head_major(value, cache):
    """head_major(value), made once per autograd node: kept in (and taken from) ``cache``."""
    if cache is not None and "value_head_major" in cache:
        return cache["value_head_major"]
    with threads_for(value.size):
        value_hm = head_major(value)
    if cache is not None:
        cache["value_head_major"] = value_hm
    return value_hm


# The backward splits the queries of each (n, m, level) slice into at most MAX_CHUNKS chunks,
# each with its own copy of grad_value, so that few slices still give enough parallel tasks.
# The count depends on the shapes only (never on the thread count), which keeps gradients
# bit-identical across thread counts.
TARGET_TASKS = 16
MAX_CHUNKS = 4
MIN_QUERIES_PER_CHUNK = 128


def n_chunks(N: int, M: int, Lq: int) -> int:
    """Query chunks per slice in the backward for N images of M slices each (the backward
    passes M * L: its slices are (n, m, level)) and Lq queries (shapes only: see above)."""
    tasks = max(N * M, 1)
    if tasks >= TARGET_TASKS:
        return 1
    return int(max(1, min(MAX_CHUNKS, -(-TARGET_TASKS // tasks), Lq // MIN_QUERIES_PER_CHUNK)))


def ms_deform_attn_forward(
    value, spatial_shapes, level_start_index, sampling_locations, attention_weights, cache=None
):
    """out (N, Lq, M*D) of value (N, S, M, D) (host arrays, validated and C-contiguous).

    ``cache``: a dict shared with the backward of the same autograd node; the head-major copy of
    value made here is kept there for the backward (results never depend on it)."""
    N, S, M, D = value.shape
    _, Lq, _, L, P, _ = sampling_locations.shape
    if N * Lq * M * D == 0 or L == 0 or P == 0 or S == 0:
        return np.zeros((N, Lq, M * D), dtype=value.dtype)
    points = sampling_locations.size // 2
    forward, _ = _kernels_for(D, points, spatial_shapes)
    with threads_for(points * (D + 8)):
        value_hm = _value_head_major(value, cache)
        slots = _level_slots(spatial_shapes, level_start_index, P)
        out = np.empty((N, Lq, M * D), dtype=value.dtype)  # the kernel writes every element
        return forward(value_hm, *slots, sampling_locations, attention_weights, out)


def ms_deform_attn_backward(
    grad_out,
    value,
    spatial_shapes,
    level_start_index,
    sampling_locations,
    attention_weights,
    needs,
    cache=None,
):
    """(grad_value, grad_sampling_locations, grad_attention_weights), None where ``needs`` is
    False; bit-identical with any number of threads. ``cache`` as in the forward."""
    N, S, M, D = value.shape
    _, Lq, _, L, P, _ = sampling_locations.shape
    dtype = value.dtype
    need_value = bool(needs[0])
    need_loc_attn = bool(needs[1] or needs[2])
    run = (need_value or need_loc_attn) and N * Lq * M * D * L * P * S > 0
    alloc = np.empty if run else np.zeros  # the kernel overwrites the gradients whole
    grad_value = alloc(value.shape, dtype) if need_value else None
    grad_loc = alloc(sampling_locations.shape, dtype) if need_loc_attn else None
    grad_attn = alloc(attention_weights.shape, dtype) if need_loc_attn else None
    if run:
        points = sampling_locations.size // 2
        _, backward = _kernels_for(D, points, spatial_shapes)
        chunks = n_chunks(N, M * L, Lq) if need_value else 1
        with threads_for(points * (2 * D + 8)):
            value_hm = _value_head_major(value, cache)
            slots = _level_slots(spatial_shapes, level_start_index, P)
            grad_hm = np.empty((N, M, S, D) if need_value else (0, 0, 0, 0), dtype)
            extra = np.empty((chunks - 1, value.size if need_value else 0), dtype)
            backward(
                grad_out,
                value_hm,
                *slots,
                sampling_locations,
                attention_weights,
                chunks,
                need_value,
                need_loc_attn,
                grad_hm,
                extra,
                grad_loc if need_loc_attn else np.zeros((0, 0, 0, 0, 0, 0), dtype),
                grad_attn if need_loc_attn else np.zeros((0, 0, 0, 0, 0), dtype),
            )
            if need_value:
                from_head_major(grad_hm, extra, grad_value)
    return grad_value, grad_loc if needs[1] else None, grad_attn if needs[2] else None
