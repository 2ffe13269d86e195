"""CPU kernels of ``bilinear_interpolate`` and of ``grid_sample`` (see docs/ops/bilinear.rst).

Both ops sample input (N, C, H, W) at P points per image and return (N, C, P); they differ only
in where a point's plan comes from (``_plan``):

* ``POINTS``: ``src`` (N, P, 2) holds (y, x) pixel coordinates, sampled under either border rule
  (the plans of ``kernels/rules.py``, compiled in ``sampling.py``);
* ``GRID``: ``src`` (N, P, 2) holds grid_sample's normalized (x, y); the coordinate rule
  (``grid_coordinate``: unnormalize, then the padding mode) gives the pixel coordinate and its
  derivative d coordinate / d grid, then the zero-fade plan. The gradient of a grid value is
  d/d coordinate * d coordinate / d grid.

The kernels work on the NCHW layout directly (no transposed copies): a plan (four corner indices
into a plane and their weights) is computed once per point and used for every channel. The
backward's channel loops run innermost, GROUP (8) channels at a time with a constant trip count,
so the plan stays in registers while the corners are read from (or scattered into) one H x W
plane per channel. The forward runs the other way round: channel by channel, LANES (8) points
at a time, each corner's values one gather instruction (``_sample_lanes``), so that the loads of
many points are in flight together (a scatter has no such form: two points may share a corner).
Indices are unsigned (uint64) in the loops, which spares Numba's negative-index wraparound on
every access.

Parallelism and determinism:

* forward (``_sample_forward``): ``prange`` over (n, block of points); a task computes its points'
  plans into local arrays, then samples every channel at them.
* backward, pass 1 (``_sample_backward_points``): ``prange`` over (n, block of points); a task
  computes and stores its points' plans for pass 2 and (owner computes) their gradients: four
  sums over the channels per point, in channel order (each group of 8 summed in the data dtype,
  the group sums added in float64).
* backward, pass 2 (``_sample_backward_input``): ``prange`` over (n, block of channels); a task
  owns those planes of the input gradient (planes that fit in about half an L2) and scatters
  into them point by point in a fixed order, so the blocking (which may follow the thread
  count) never changes a sum: the gradient is bit-identical with any thread count.

Coordinates, coordinate derivatives and plans are float64 (as ``rules`` computes them); the
plans' weights are rounded to the data dtype for the channel loops, and corner indices are
stored as int32 when a plane has fewer than 2**31 elements. The kernels contract a * b + c into
fused multiply-adds (``fastmath={"contract"}``): a fixed compiled order, the same for any
thread count.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from llvmlite import ir
from numba import float64, njit, prange, types, uint64
from numba.core import cgutils
from numba.extending import intrinsic

from .sampling import (
    CLAMP,
    ZERO_FADE,
    grid_coordinate,
    plan_of,
    threads_for,
    zero_fade_plan,
    zero_fade_plan_ft,
)

POINTS = 0  # src holds (y, x) pixel coordinates
GRID = 1  # src holds grid_sample's normalized (x, y)

_PBLOCK = 1024  # points per forward / points-gradient task (at most)
_L2_PLANES = 1 << 18  # bytes of input-gradient planes a pass-2 task keeps (about half an L2)


@njit(inline="always", cache=True)
def _plan(src, kind, rule, padding, align, n, p, H, W):
    """The plan of point p of image n and the coordinate derivatives: (idx, w, cy, cx, dy, dx),
    where dy = d y / d src (1 for POINTS) and likewise dx."""
    if kind == POINTS:
        idx, w, cy, cx = plan_of(rule, float64(src[n, p, 0]), float64(src[n, p, 1]), H, W)
        return idx, w, cy, cx, 1.0, 1.0
    x, dx = grid_coordinate(float64(src[n, p, 0]), W, align, padding)
    y, dy = grid_coordinate(float64(src[n, p, 1]), H, align, padding)
    idx, w, cy, cx = zero_fade_plan(y, x, H, W)
    return idx, w, cy, cx, dy, dx


# The innermost channel loops take GROUP channels with a constant trip count: LLVM unrolls them
# into straight-line scalar code with the point's plan in registers (a loop over a run-time
# number of channels gets versioned for vectorization, with per-point overlap checks that cost
# more than the samples; measured 1.6x slower).
GROUP = 8


@njit(inline="always", cache=True)
def _blend(v, b, i0, i1, i2, i3, w0, w1, w2, w3):
    """The sample of the plane of v starting at b: sum_k w[k] * plane[i[k]]."""
    return w0 * v[b + i0] + w1 * v[b + i1] + w2 * v[b + i2] + w3 * v[b + i3]


@njit(inline="always", cache=True)
def _scatter(gi, b, i0, i1, i2, i3, w0, w1, w2, w3, gc):
    """plane[i[k]] += w[k] * gc for the plane of gi starting at b."""
    gi[b + i0] += w0 * gc
    gi[b + i1] += w1 * gc
    gi[b + i2] += w2 * gc
    gi[b + i3] += w3 * gc


@njit(inline="always", cache=True)
def _dots(d, v, b, i0, i1, i2, i3, gc):
    """d[k] + gc * plane[i[k]] for the plane of v starting at b."""
    return (
        d[0] + gc * v[b + i0],
        d[1] + gc * v[b + i1],
        d[2] + gc * v[b + i2],
        d[3] + gc * v[b + i3],
    )


@njit(inline="always", cache=True)
def _add_corner(gi, q, HW, w, g):
    """gi[q + c * HW] += w * g[c] for the GROUP channels c, every load before any store: the
    planes often lie a multiple of 4 KiB apart, and a load behind a store to the same address
    modulo 4 KiB waits for that store."""
    q1 = q + HW
    q2 = q1 + HW
    q3 = q2 + HW
    q4 = q3 + HW
    q5 = q4 + HW
    q6 = q5 + HW
    q7 = q6 + HW
    a = (gi[q], gi[q1], gi[q2], gi[q3], gi[q4], gi[q5], gi[q6], gi[q7])
    gi[q] = a[0] + w * g[0]
    gi[q1] = a[1] + w * g[1]
    gi[q2] = a[2] + w * g[2]
    gi[q3] = a[3] + w * g[3]
    gi[q4] = a[4] + w * g[4]
    gi[q5] = a[5] + w * g[5]
    gi[q6] = a[6] + w * g[6]
    gi[q7] = a[7] + w * g[7]


LANES = 8  # points the forward samples together (one gather per corner); see _sample_lanes


@intrinsic
def _sample_lanes(typingctx: Any, out: Any, at: Any, v: Any, plane: Any, idx: Any, w: Any, q: Any) -> Any:  # fmt: skip
    """out[at + l] = sum_k w[k, q + l] * v[plane + idx[k, q + l]] (k = 0..3 in order) for the
    LANES points q .. q + LANES - 1 of a plan block, 0 for a point whose four weights are 0.

    ``out`` and ``v`` are flat arrays of one float dtype, ``idx`` (4, M) int32 or int64 and
    ``w`` (4, M) of the float dtype are C-contiguous, the caller guaranteeing q + LANES <= M and
    every index in range. The same arithmetic as the scalar loop of ``_sample_forward`` (the
    products added in corner order, ``contract`` flags so that LLVM fuses them the same way):
    bit-identical results. What changes is the code: each corner's LANES values are one
    ``llvm.masked.gather`` (an AVX2 / AVX-512 ``vgatherdps``) and the outputs one vector store,
    so the loads of many points are in flight at once (grid_sample's forward at the benchmark's
    large size: 53.7 -> 40.8 ms at one thread, 36.8 -> 28.4 at two; benches/RESULTS.md).
    """
    if not all(isinstance(a, types.Array) for a in (out, v, idx, w)):
        return None
    dt = out.dtype
    if v.dtype != dt or w.dtype != dt or not isinstance(dt, types.Float):
        return None
    if not isinstance(idx.dtype, types.Integer) or idx.ndim != 2 or w.ndim != 2:
        return None
    sig = types.void(out, types.uint64, v, types.uint64, idx, w, types.uint64)

    def codegen(context: Any, builder: Any, signature: Any, args: Any) -> Any:
        out_v, at_v, v_v, plane_v, idx_v, w_v, q_v = args
        ft = context.get_value_type(dt)
        it = context.get_value_type(signature.args[4].dtype)
        i1, i32, i64 = ir.IntType(1), ir.IntType(32), ir.IntType(64)
        vf = ir.VectorType(ft, LANES)
        vi64 = ir.VectorType(i64, LANES)
        vptr = ir.VectorType(ft.as_pointer(), LANES)
        fast = ("contract",)
        align = dt.bitwidth // 8

        def data(k: int, value: Any) -> Any:
            return cgutils.create_struct_proxy(signature.args[k])(context, builder, value=value)

        o_arr, v_arr, i_arr, w_arr = data(0, out_v), data(2, v_v), data(4, idx_v), data(5, w_v)
        M = builder.extract_value(i_arr.shape, 1)
        gather = cgutils.get_or_insert_function(
            builder.module,
            ir.FunctionType(vf, [vptr, i32, ir.VectorType(i1, LANES), vf]),
            f"llvm.masked.gather.v{LANES}f{dt.bitwidth}.v{LANES}p0",
        )
        every = ir.Constant(ir.VectorType(i1, LANES), [1] * LANES)
        undef = ir.Constant(vf, ir.Undefined)
        start = builder.ptrtoint(builder.gep(v_arr.data, [plane_v]), i64)
        starts = builder.shuffle_vector(
            builder.insert_element(ir.Constant(vi64, ir.Undefined), start, ir.Constant(i32, 0)),
            ir.Constant(vi64, ir.Undefined),
            ir.Constant(ir.VectorType(i32, LANES), [0] * LANES),
        )
        size = ir.Constant(vi64, [align] * LANES)
        zero = ir.Constant(vf, [0.0] * LANES)
        total = dead = None
        for k in range(4):
            row = builder.add(builder.mul(ir.Constant(i64, k), M), q_v)  # idx / w [k, q]
            iv = builder.load(
                builder.bitcast(
                    builder.gep(i_arr.data, [row]), ir.VectorType(it, LANES).as_pointer()
                ),
                align=it.width // 8,
            )
            wv = builder.load(
                builder.bitcast(builder.gep(w_arr.data, [row]), vf.as_pointer()), align=align
            )
            # indices are never negative: zero-extended byte offsets from the plane's start
            ptrs = builder.inttoptr(
                builder.add(starts, builder.mul(builder.zext(iv, vi64), size)), vptr
            )
            term = builder.fmul(
                wv, builder.call(gather, [ptrs, ir.Constant(i32, align), every, undef]), flags=fast
            )
            total = term if total is None else builder.fadd(total, term, flags=fast)
            off = builder.fcmp_ordered("==", wv, zero)
            dead = off if dead is None else builder.and_(dead, off)
        result = builder.select(dead, zero, total)  # out of range: 0, as the scalar loop
        builder.store(
            result, builder.bitcast(builder.gep(o_arr.data, [at_v]), vf.as_pointer()), align=align
        )
        return context.get_dummy_value()

    return sig, codegen


@njit(inline="always", cache=True)
def _zero_fade_plans(src, kind, n, p0, m, H, W, align, idx_t, pidx, pw):
    """The zero-fade plans of points p0 .. p0 + m - 1 of image n (grid_sample with padding
    "zeros": ``GRID``; bilinear_interpolate with border "zero": ``POINTS``) into pidx / pw[:, :m]:
    ``_plan``'s plans, bit for bit, in a loop that LLVM vectorizes (several float64 points a
    vector instruction): the source's two columns are first copied into contiguous arrays, and
    the corners are computed in ``idx_t`` (``zero_fade_plan_ft``'s integer type: the same plan).
    The general loop stays scalar (the padding modes' and border rules' branches); this one
    took the plans of grid_sample's reference-size forward from 0.069 to 0.028 ms (one thread,
    benches/RESULTS.md)."""
    a = np.empty(m, src.dtype)  # GRID: x (normalized); POINTS: y (pixels)
    b = np.empty(m, src.dtype)  # GRID: y; POINTS: x
    for q in range(m):
        a[q] = src[n, p0 + q, 0]
        b[q] = src[n, p0 + q, 1]
    if kind == GRID:
        for q in range(m):
            x, _ = grid_coordinate(float64(a[q]), W, align, 0)
            y, _ = grid_coordinate(float64(b[q]), H, align, 0)
            _store_plan(zero_fade_plan_ft(y, x, H, W, np.float64, idx_t), q, pidx, pw)
    else:
        for q in range(m):
            plan = zero_fade_plan_ft(float64(a[q]), float64(b[q]), H, W, np.float64, idx_t)
            _store_plan(plan, q, pidx, pw)


@njit(inline="always", cache=True)
def _store_plan(plan, q, pidx, pw):
    """Column q of pidx / pw: a plan's corner indices and weights."""
    idx, w, _, _ = plan
    pidx[0, q] = idx[0]
    pidx[1, q] = idx[1]
    pidx[2, q] = idx[2]
    pidx[3, q] = idx[3]
    pw[0, q] = w[0]
    pw[1, q] = w[1]
    pw[2, q] = w[2]
    pw[3, q] = w[3]


@njit(parallel=True, cache=True, fastmath={"contract"})
def _sample_forward(inp, src, kind, rule, padding, align, pblock, idx_like, out):
    """out[n, c, p] = sample(channel c of inp[n], plan of point p); inp (N, C, H, W), out
    (N, C, P). A task takes a block of points of one image: their plans into local (4, points)
    arrays (indices of ``idx_like``'s dtype: an empty array, as a type argument would cost the
    dispatcher about 7 us a call to type), then, channel by channel, LANES points at a time
    (``_sample_lanes``: a gather per corner), the rest one by one."""
    N, C, H, W = inp.shape
    P = src.shape[1]
    HW = uint64(H * W)
    uP = uint64(P)
    v = inp.reshape(-1)
    o = out.reshape(-1)
    nblk = (P + pblock - 1) // pblock
    for task in prange(N * nblk):
        n = task // nblk
        p0 = (task - n * nblk) * pblock
        p1 = min(p0 + pblock, P)
        m = p1 - p0
        idx_t = idx_like.dtype.type
        pidx = np.empty((4, m), idx_t)
        pw = np.empty((4, m), out.dtype)
        if (kind == GRID and padding == 0) or (kind == POINTS and rule == ZERO_FADE):
            # grid_sample's and bilinear_interpolate's defaults: plans in vector code
            _zero_fade_plans(src, kind, n, p0, m, H, W, align, idx_t, pidx, pw)
        else:
            for p in range(p0, p1):
                pi, w, _, _, _, _ = _plan(src, kind, rule, padding, align, n, p, H, W)
                for k in range(4):
                    pidx[k, p - p0] = pi[k]
                    pw[k, p - p0] = w[k]
        mv = m - m % LANES
        for c in range(C):
            b = uint64(n * C + c) * HW  # start of channel c's plane
            ob = uint64(n * C + c) * uP + uint64(p0)  # out[n, c, p0]
            for q in range(0, mv, LANES):
                _sample_lanes(o, ob + uint64(q), v, b, pidx, pw, uint64(q))
            for q in range(mv, m):
                w0 = pw[0, q]
                w1 = pw[1, q]
                w2 = pw[2, q]
                w3 = pw[3, q]
                if w0 == 0 and w1 == 0 and w2 == 0 and w3 == 0:
                    o[ob + uint64(q)] = 0
                else:
                    o[ob + uint64(q)] = _blend(
                        v, b, uint64(pidx[0, q]), uint64(pidx[1, q]), uint64(pidx[2, q]),
                        uint64(pidx[3, q]), w0, w1, w2, w3,
                    )  # fmt: skip


@njit(parallel=True, cache=True, fastmath={"contract"})
def _sample_backward_points(
    inp, gout, src, kind, rule, padding, align, pblock, need_src, zero, pidx, pwts, gsrc
):
    """Per block of points of one image (owner): the plans into pidx / pwts (for pass 2) and,
    with ``need_src``, the gradient of each point's coordinates (src's order and dtype): with
    d[k] = sum_c gout[n, c, p] * inp[n, c, corner k], d sample / dy = sum_k cy[k] d[k], times
    dy / d src (likewise x). The sums run in channel order: GROUP channels innermost, summed in
    the data dtype (``zero`` is its 0), their sum added to a float64 total."""
    N, C, H, W = inp.shape
    P = src.shape[1]
    HW = uint64(H * W)
    uP = uint64(P)
    v = inp.reshape(-1)
    g = gout.reshape(-1)
    nblk = (P + pblock - 1) // pblock
    for task in prange(N * nblk):
        n = task // nblk
        p0 = (task - n * nblk) * pblock
        p1 = min(p0 + pblock, P)
        for p in range(p0, p1):
            pi, w, _, _, _, _ = _plan(src, kind, rule, padding, align, n, p, H, W)
            for k in range(4):
                pidx[n, p, k] = pi[k]
                pwts[n, p, k] = w[k]
        if not need_src:
            continue
        d = np.zeros((p1 - p0, 4), np.float64)
        for c0 in range(0, C, GROUP):
            cb = min(GROUP, C - c0)
            for p in range(p0, p1):
                q = p - p0
                i0 = uint64(pidx[n, p, 0])
                i1 = uint64(pidx[n, p, 1])
                i2 = uint64(pidx[n, p, 2])
                i3 = uint64(pidx[n, p, 3])
                b = uint64(n * C + c0) * HW  # start of channel c0's plane
                gb = uint64(n * C + c0) * uP + uint64(p)  # gout[n, c0, p]
                dq = (zero, zero, zero, zero)  # this group's sums, in the data dtype
                if cb == GROUP:
                    for _ in range(GROUP):  # a constant trip count: unrolled by LLVM
                        dq = _dots(dq, v, b, i0, i1, i2, i3, g[gb])
                        b += HW
                        gb += uP
                else:
                    for _ in range(cb):
                        dq = _dots(dq, v, b, i0, i1, i2, i3, g[gb])
                        b += HW
                        gb += uP
                for k in range(4):
                    d[q, k] += float64(dq[k])
        for p in range(p0, p1):
            q = p - p0
            _, _, cy, cx, dy, dx = _plan(src, kind, rule, padding, align, n, p, H, W)
            gy = cy[0] * d[q, 0] + cy[1] * d[q, 1] + cy[2] * d[q, 2] + cy[3] * d[q, 3]
            gx = cx[0] * d[q, 0] + cx[1] * d[q, 1] + cx[2] * d[q, 2] + cx[3] * d[q, 3]
            if kind == POINTS:
                gsrc[n, p, 0] = gy * dy
                gsrc[n, p, 1] = gx * dx
            else:
                gsrc[n, p, 0] = gx * dx
                gsrc[n, p, 1] = gy * dy


@njit(parallel=True, cache=True, fastmath={"contract"})
def _sample_backward_input(gout, pidx, pwts, cblock, gin):
    """gin[n, c] = sum over points p (in order) of w * gout[n, c, p] scattered at p's corners.
    Tasks own (n, block of ``cblock`` channels): they zero their planes of gin (N, C, H, W),
    then scatter into them point by point, GROUP channels at a time innermost (each point's plan
    read once for them)."""
    N, C, H, W = gin.shape
    P = pidx.shape[1]
    HW = uint64(H * W)
    uP = uint64(P)
    uP2 = uP + uP
    g = gout.reshape(-1)
    gi = gin.reshape(-1)
    ncb = (C + cblock - 1) // cblock
    for task in prange(N * ncb):
        n = task // ncb
        c0 = (task - n * ncb) * cblock
        c1 = min(c0 + cblock, C)
        gi[(n * C + c0) * H * W : (n * C + c1) * H * W] = 0
        for ci in range(c0, c1, GROUP):
            cb = min(GROUP, c1 - ci)
            for p in range(P):
                w0 = pwts[n, p, 0]
                w1 = pwts[n, p, 1]
                w2 = pwts[n, p, 2]
                w3 = pwts[n, p, 3]
                if w0 == 0 and w1 == 0 and w2 == 0 and w3 == 0:
                    continue
                i0 = uint64(pidx[n, p, 0])
                i1 = uint64(pidx[n, p, 1])
                i2 = uint64(pidx[n, p, 2])
                i3 = uint64(pidx[n, p, 3])
                b = uint64(n * C + ci) * HW  # start of channel ci's plane
                gb = uint64(n * C + ci) * uP + uint64(p)  # gout[n, ci, p]
                if cb == GROUP:
                    gv = (g[gb], g[gb + uP], g[gb + uP2], g[gb + uP2 + uP])
                    gb += uP2 + uP2
                    gv = gv + (g[gb], g[gb + uP], g[gb + uP2], g[gb + uP2 + uP])
                    _add_corner(gi, b + i0, HW, w0, gv)
                    _add_corner(gi, b + i1, HW, w1, gv)
                    _add_corner(gi, b + i2, HW, w2, gv)
                    _add_corner(gi, b + i3, HW, w3, gv)
                else:
                    for _ in range(cb):
                        _scatter(gi, b, i0, i1, i2, i3, w0, w1, w2, w3, g[gb])
                        b += HW
                        gb += uP


BORDERS = {"zero": ZERO_FADE, "clamp": CLAMP}


def _idx_dtype(H: int, W: int) -> type:
    return np.int32 if H * W < 2**31 else np.int64


def _point_block(N: int, P: int) -> int:
    """Points per task: at most _PBLOCK, and small enough for two tasks per thread."""
    import numba

    per_image = -(-2 * numba.get_num_threads() // max(1, N))
    return max(1, min(_PBLOCK, -(-P // per_image)))


def _channel_block(N: int, C: int, HW: int, itemsize: int) -> int:
    """Channels per input-gradient task: a multiple of GROUP, planes that fit in about half an
    L2 (at least GROUP), and about two tasks per thread. No result depends on it."""
    import numba

    fit = max(GROUP, _L2_PLANES // max(1, HW * itemsize) // GROUP * GROUP)
    ncb = max(1, -(-2 * numba.get_num_threads() // max(1, N)))
    per_task = -(-C // ncb)
    return max(1, min(fit, -(-per_task // GROUP) * GROUP))


def sample(input, src, kind, rule=ZERO_FADE, padding=0, align=False):
    """input (N, C, H, W) sampled at the N x P points of src (N, P, 2) -> (N, C, P)."""
    N, C, H, W = input.shape
    P = src.shape[1]
    out = np.empty((N, C, P), dtype=input.dtype)
    if N * C * P == 0:
        return out
    if H * W == 0:
        out[...] = 0
        return out
    with threads_for(N * C * P):
        _sample_forward(
            np.ascontiguousarray(input), src, kind, rule, padding, bool(align),
            _point_block(N, P), np.empty(0, _idx_dtype(H, W)), out,
        )  # fmt: skip
    return out


def sample_grad(grad_out, input, src, kind, rule=ZERO_FADE, padding=0, align=False, needs=(1, 1)):
    """(grad_input (N, C, H, W) or None, grad_src (src's shape and dtype) or None) for grad_out
    (N, C, P)."""
    N, C, H, W = input.shape
    P = src.shape[1]
    g_src = np.zeros(src.shape, dtype=src.dtype) if needs[1] else None
    if N * C * P == 0 or H * W == 0 or not (needs[0] or needs[1]):
        g_in = np.zeros(input.shape, dtype=input.dtype) if needs[0] else None
        return g_in, g_src
    input = np.ascontiguousarray(input)
    grad_out = np.ascontiguousarray(grad_out, input.dtype).reshape(N, C, P)
    with threads_for(N * C * P):
        pidx = np.empty((N, P, 4), _idx_dtype(H, W))
        pwts = np.empty((N, P, 4), input.dtype)
        gs = g_src if needs[1] else np.empty((1, 1, 2), src.dtype)
        _sample_backward_points(
            input, grad_out, src, kind, rule, padding, bool(align), _point_block(N, P),
            bool(needs[1]), input.dtype.type(0), pidx, pwts, gs,
        )  # fmt: skip
        g_in = None
        if needs[0]:
            g_in = np.empty(input.shape, dtype=input.dtype)
            cb = _channel_block(N, C, H * W, input.itemsize)
            _sample_backward_input(grad_out, pidx, pwts, cb, g_in)
    return g_in, g_src


def bilinear_interpolate_forward(input, points, border):
    """input (N, C, H, W), points (N, P, 2) as (y, x), border "zero" or "clamp" -> (N, C, P)."""
    return sample(input, np.ascontiguousarray(points), POINTS, BORDERS[border])


def bilinear_interpolate_backward(grad_out, input, points, border, needs):
    """(grad_input, grad_points) for grad_out (N, C, P), None where ``needs`` is False;
    grad_points has points' dtype."""
    pts = np.ascontiguousarray(points)
    return sample_grad(grad_out, input, pts, POINTS, BORDERS[border], needs=tuple(needs))
