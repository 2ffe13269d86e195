"""CPU kernels of ``deform_conv2d`` (docs/ops/deform_conv.rst): channels-last deformable im2col +
BLAS GEMM.

Shapes (validated by ``deformnp.ops.deform_conv``): input (B, Cin, H, W), offset (B, 2*G*K,
Hout, Wout), mask (B, G*K, Hout, Wout), weight (Cout, Cin/g, kh, kw), K = kh*kw, G offset
groups, g weight groups. Sampling point of kernel point k = i*kw + j at output (oy, ox) for the
channels of offset group og:

    y = oy*sh - ph + i*dh + dy,  x = ox*sw - pw + j*dw + dx   (zero-fade, docs/ops/bilinear.rst)
    dy = offset[b, 2*(og*K + k)], dx = offset[b, 2*(og*K + k) + 1], m = mask[b, og*K + k]

The kernels work on a channels-last copy of the input (B, H, W, Cin): the bilinear plan of a
sampling point is computed once (from the shared ``zero_fade_plan``) and then applied to all
Cin/G channels of its offset group as contiguous runs of memory, which the compiler vectorizes.
The work is split into tasks of output rows of one image (``task_rows``: a task's columns
matrix holds at most FWD_COLS_BUDGET elements in the forward, COLS_BUDGET in the backward). A task's
columns matrix is (P, Cin*K), P = its rows * Wout, with column (grp*K + k)*cin_g + cl for
channel c = grp*cin_g + cl of weight group grp, so that each weight group's columns are one
block. With Wm = weight permuted to (Cout, kh, kw, Cin/g) and flattened to (Cout, K*Cin/g), per
task, for each weight group:

    forward    cols = im2col(input rows)                              (_im2col)
               out[b, group, rows] = (cols[:, group] @ Wm[group]^T)^T (BLAS, written as NCHW)
    backward   grad_cols[:, group] = grad_out[b, group, rows]^T @ Wm[group]   (BLAS, in place)
               grad_offset, grad_mask, cols, and buffer_j = scatter of the plans'
               m * w * grad_cols (channels-last), point by point      (_backward_points)
               grad_Wm share = grad_out[b, group, rows] @ cols[:, group]      (BLAS)
               grad_input[b] = sum_j buffer_j over the image's row blocks j in order
               grad_Wm = sum of the shares in task order

The forward's GEMM. The columns matrix is (P, K*cin_g) row-major; multiplied from the right
(``Wm @ cols^T``) OpenBLAS read it as a transposed operand and ran at 91 GFLOP/s on the
reference size's (64, 576) x (576, 512) (one core, AVX-512); ``cols @ Wm^T``, with each
group's Wm^T made contiguous once per call, runs at 133 and leaves the (P, cout_g) product to
be copied transposed into the NCHW output (128 KB a task). Forward CPU time -7 to -10% at
the reference size (benches/RESULTS.md). The same products; BLAS may sum them in another
order, so outputs can move at float rounding (bit-identical at both bench sizes; over 40
random shapes, 11 moved, by at most 2.2e-7 relative in float32 and 1.2e-15 in float64).

Parallelism and determinism (bit-identical results for any thread count): one level of
parallelism. ``run_tasks`` hands the tasks to a pool of numba.get_num_threads() Python threads;
the kernels are serial and release the GIL, and NumPy's BLAS runs on one thread inside each
task (threadpoolctl, for the duration of the call), so no second thread pool spins beside the
first (measured: Numba's parallel loops and OpenBLAS's threads in turn, each pool waiting
while the other worked, cost ~2x the CPU time at 2 threads). The tasks depend on the shapes
only; every output element of a task has one writer (the rows' output, offset and mask
gradients), or is summed in a fixed order: an image's row-block buffers by the block that
finishes last, j in order; the weight-gradient shares on the calling thread, in task order.
One thread (or a small problem, ``threads_for``) runs the tasks in order on the calling thread.

Index arithmetic is int64 (Numba integers); the channel-run loops index flat arrays with uint64
offsets, which Numba does not check for wraparound, so LLVM vectorizes them. Plans are float64;
the offset and mask gradients' sums over one run of channels run in the data dtype, 8 float32
lanes (as torchvision sums them in scalar_t), and the runs' sums add up in float64; columns and
GEMMs keep the data dtype (float32 data runs float32 GEMMs, as torchvision does).
"""

from __future__ import annotations

import contextlib
import os
import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numba
import numpy as np
from numba import njit
from threadpoolctl import ThreadpoolController

from .sampling import axpy, combine4, combine_dot4, fill_zero, threads_for, zero_fade_plan

# Largest columns matrix (elements) of one task (rows of one image): 2**21 elements, 8 MB in
# float32; each thread holds one task's columns (and the backward its grad_cols) at a time.
COLS_BUDGET = 1 << 21
# The forward's tasks are smaller (2**19 elements, 2 MB in float32: the columns stay near the
# cache between _im2col and the GEMM; measured 6-8% less CPU time than 2**21 at both bench
# sizes); the backward's are not, since each row block costs a whole-image buffer of the input
# gradient (measured: 2**18 or less was slower).
FWD_COLS_BUDGET = 1 << 19


@njit(nogil=True, cache=True)
def _im2col(inp_t, off, msk, b, oy0, oy1, kh, kw, sh, sw, ph, pw, dh, dw, cin_g, runs, cols):
    """cols[(oy - oy0)*Wout + ox, (grp*K + k)*cin_g + cl] = m * sample(input[b, c], y, x) for
    the output rows oy in [oy0, oy1) of image b; inp_t is the channels-last input (B, H, W,
    Cin); ``runs`` from ``channel_runs``. Serial: one task of the caller's thread pool."""
    B, H, W, Cin = inp_t.shape
    K = kh * kw
    G = msk.shape[1] // K
    Wout = off.shape[3]
    CK = Cin * K
    v = inp_t.reshape(-1)
    cf = cols.reshape(-1)
    wv = np.empty(4, cols.dtype)  # the plan's weights in the data dtype
    base = b * H * W
    for oy in range(oy0, oy1):
        for og in range(G):
            for k in range(K):
                i = k // kw
                j = k - i * kw
                ch = 2 * (og * K + k)
                for ox in range(Wout):
                    y = (oy * sh - ph + i * dh) + off[b, ch, oy, ox]
                    x = (ox * sw - pw + j * dw) + off[b, ch + 1, oy, ox]
                    m = msk[b, og * K + k, oy, ox]
                    pi, pwt, pcy, pcx = zero_fade_plan(y, x, H, W)
                    for t in range(4):
                        wv[t] = m * pwt[t]
                    zero = wv[0] == 0.0 and wv[1] == 0.0 and wv[2] == 0.0 and wv[3] == 0.0
                    row = ((oy - oy0) * Wout + ox) * CK + k * cin_g
                    for r in range(runs.shape[1]):  # og's channels, one weight group at a time
                        c = runs[og, r, 0]
                        n = np.uint64(runs[og, r, 1] - c)
                        d = np.uint64(row + runs[og, r, 2] + c)
                        if zero:
                            fill_zero(cf, d, n)
                        else:
                            combine4(
                                cf, d, v, n,
                                np.uint64((base + pi[0]) * Cin + c),
                                np.uint64((base + pi[1]) * Cin + c),
                                np.uint64((base + pi[2]) * Cin + c),
                                np.uint64((base + pi[3]) * Cin + c),
                                wv[0], wv[1], wv[2], wv[3],
                            )  # fmt: skip


@njit(nogil=True, cache=True)
def _backward_points(
    inp_t, off, msk, gcols, b, oy0, oy1, kh, kw, sh, sw, ph, pw, dh, dw, cin_g, runs,
    need_sums, need_cols, need_in, cols, goff, gmsk, acc,
):  # fmt: skip
    """For the output rows oy in [oy0, oy1) of image b (q = (oy - oy0)*Wout + ox the task's
    row of gcols / cols), point by point in (q, og, k) order:

    goff[b, 2(og K + k)]     = m * sum_c grad_cols[q, c K + k] * d sample / dy   (need_sums)
    goff[b, 2(og K + k) + 1] = m * sum_c grad_cols[q, c K + k] * d sample / dx
    gmsk[b, og K + k]        =     sum_c grad_cols[q, c K + k] * sample
    cols                     = the columns, as _im2col                          (need_cols)
    acc[pix, c]             += m * w_t * grad_cols[q, c K + k] at the plan's
                               corners pix (t = 0..3, in order)                 (need_in)

    acc is a channels-last (H*W, Cin) buffer of one image (flat). With d_t = sum_c grad_cols *
    V_c[corner t] (four dot products over the channels, in the data's type, as torchvision
    sums them), the sums are sum_t cy_t d_t, sum_t cx_t d_t and sum_t w_t d_t. A point's
    grad_cols run is scattered right after its dot products, while it is in L1. Output-pixel-
    major order keeps the reads of grad_cols and the writes of cols sequential and consecutive
    scatters within a few input rows. Serial: one task of the thread pool.
    """
    B, H, W, Cin = inp_t.shape
    K = kh * kw
    G = msk.shape[1] // K
    Wout = off.shape[3]
    CK = Cin * K
    v = inp_t.reshape(-1)
    gc = gcols.reshape(-1)
    cf = cols.reshape(-1)
    wv = np.empty(4, cols.dtype)
    cout = cf if need_cols else np.empty(Cin, cols.dtype)  # scratch row of columns
    gsrc = gc if need_sums else np.zeros(Cin, gcols.dtype)  # zero grad_cols
    base = b * H * W
    for oy in range(oy0, oy1):
        for ox in range(Wout):
            q = (oy - oy0) * Wout + ox
            for og in range(G):
                for k in range(K):
                    i = k // kw
                    j = k - i * kw
                    ch = 2 * (og * K + k)
                    y = (oy * sh - ph + i * dh) + off[b, ch, oy, ox]
                    x = (ox * sw - pw + j * dw) + off[b, ch + 1, oy, ox]
                    m = msk[b, og * K + k, oy, ox]
                    pi, pwt, pcy, pcx = zero_fade_plan(y, x, H, W)
                    for t in range(4):
                        wv[t] = m * pwt[t]
                    zero = wv[0] == 0.0 and wv[1] == 0.0 and wv[2] == 0.0 and wv[3] == 0.0
                    row = q * CK + k * cin_g
                    d0 = 0.0
                    d1 = 0.0
                    d2 = 0.0
                    d3 = 0.0
                    for r in range(runs.shape[1]):  # og's channels, one weight group at a time
                        c = runs[og, r, 0]
                        n = np.uint64(runs[og, r, 1] - c)
                        d = np.uint64(row + runs[og, r, 2] + c)
                        a0 = np.uint64((base + pi[0]) * Cin + c)
                        a1 = np.uint64((base + pi[1]) * Cin + c)
                        a2 = np.uint64((base + pi[2]) * Cin + c)
                        a3 = np.uint64((base + pi[3]) * Cin + c)
                        if need_sums or need_cols:
                            # columns into cf (or the scratch row), sums of gc (or of zeros)
                            dc = d if need_cols else np.uint64(c)
                            dg = d if need_sums else np.uint64(c)
                            e0, e1, e2, e3 = combine_dot4(
                                cout, dc, gsrc, dg, v, n, a0, a1, a2, a3,
                                wv[0], wv[1], wv[2], wv[3],
                            )  # fmt: skip
                            d0 += e0
                            d1 += e1
                            d2 += e2
                            d3 += e3
                        if need_in and not zero:
                            axpy(acc, np.uint64(pi[0] * Cin + c), wv[0], gc, d, n)
                            axpy(acc, np.uint64(pi[1] * Cin + c), wv[1], gc, d, n)
                            axpy(acc, np.uint64(pi[2] * Cin + c), wv[2], gc, d, n)
                            axpy(acc, np.uint64(pi[3] * Cin + c), wv[3], gc, d, n)
                    if need_sums:
                        accy = pcy[0] * d0 + pcy[1] * d1 + pcy[2] * d2 + pcy[3] * d3
                        accx = pcx[0] * d0 + pcx[1] * d1 + pcx[2] * d2 + pcx[3] * d3
                        accm = pwt[0] * d0 + pwt[1] * d1 + pwt[2] * d2 + pwt[3] * d3
                        goff[b, ch, oy, ox] = m * accy
                        goff[b, ch + 1, oy, ox] = m * accx
                        gmsk[b, og * K + k, oy, ox] = accm


_TILE_PIXELS = 16  # pixels of an input-gradient tile in _sum_channels_first


@njit(nogil=True, cache=True)
def _sum_channels_first(accs, gi):
    """gi[c, pix] = sum_j accs[j, pix*C + c], j in order: the channels-last input gradients of
    an image's row blocks (flat), summed into the image's (C, H*W) gradient. Sixteen pixels at a
    time: their channel rows (contiguous in every buffer) summed into a small tile, in vector
    code, then written out channel by channel. The same sums in the same order as summing each
    element alone; reading each buffer a channel at a time (strided) took 2.5x as long (5.8 ms
    an image at deform_conv2d's large bench size, three row blocks, one thread)."""
    C, P = gi.shape
    nj = accs.shape[0]
    t = np.empty((_TILE_PIXELS, C), accs.dtype)
    for p0 in range(0, P, _TILE_PIXELS):
        n = min(_TILE_PIXELS, P - p0)
        for i in range(n):
            row = (p0 + i) * C
            for c in range(C):
                t[i, c] = accs[0, row + c]
            for j in range(1, nj):
                for c in range(C):
                    t[i, c] += accs[j, row + c]
        for c in range(C):
            for i in range(n):
                gi[c, p0 + i] = t[i, c]


@njit(nogil=True, cache=True)
def _to_channels_last(src, dst):
    """dst[p, c] = src[c, p] for one image, in tiles of 8 channels by 64 pixels."""
    C, P = src.shape
    for c0 in range(0, C, 8):
        c1 = min(c0 + 8, C)
        for p0 in range(0, P, 64):
            p1 = min(p0 + 64, P)
            for p in range(p0, p1):
                for c in range(c0, c1):
                    dst[p, c] = src[c, p]


def _channels_last_input(input: Any) -> Any:
    """The channels-last copy (B, H, W, Cin) of input, one image per task."""
    B, Cin, H, W = input.shape
    src = input.reshape(B, Cin, H * W)
    dst = np.empty((B, H * W, Cin), input.dtype)
    run_tasks(lambda b: _to_channels_last(src[b], dst[b]), [(b,) for b in range(B)], blas=False)
    return dst.reshape(B, H, W, Cin)


def _geometry(input: Any, offset: Any, weight: Any) -> tuple[int, ...]:
    B, Cin, H, W = (int(s) for s in input.shape)
    Cout, cin_g, kh, kw = (int(s) for s in weight.shape)
    Hout, Wout = int(offset.shape[2]), int(offset.shape[3])
    G = int(offset.shape[1]) // (2 * kh * kw)
    return B, Cin, H, W, Cout, cin_g, kh, kw, Hout, Wout, G, Cin // cin_g


def channel_runs(Cin: int, G: int, cin_g: int, K: int) -> np.ndarray:
    """runs[og, r] = (c, ce, shift): the channels [c, ce) of offset group og that lie in one
    weight group grp, and the shift (K - 1)*cin_g*grp such that channel c's column for kernel
    point k is k*cin_g + shift + c. Unused runs are empty (c == ce)."""
    cpg = Cin // G
    per = [[] for _ in range(G)]
    for og in range(G):
        c = og * cpg
        while c < (og + 1) * cpg:
            grp = c // cin_g
            ce = min((og + 1) * cpg, (grp + 1) * cin_g)
            per[og].append((c, ce, (K - 1) * cin_g * grp))
            c = ce
    n = max(len(r) for r in per)
    runs = np.zeros((G, n, 3), np.int64)
    for og, r in enumerate(per):
        runs[og, : len(r)] = r
    return runs


def task_rows(CK: int, Hout: int, Wout: int, budget: int = 0) -> int:
    """Output rows of one image per task: the task's columns matrix (rows*Wout, CK) stays within
    ``budget`` (default COLS_BUDGET) elements, the rows split evenly. Depends on the shapes only (so does every sum,
    whatever the thread count)."""
    per = max(1, (budget or COLS_BUDGET) // max(1, CK * Wout))
    n = -(-Hout // per)
    return -(-Hout // n)


_POOLS: dict[int, ThreadPoolExecutor] = {}
_BLAS: list = []  # [ThreadpoolController] once needed
_BLAS_LOCK = threading.Lock()
_BLAS_STATE: list = [0, None]  # calls inside a one-BLAS-thread region, their limiter


def _after_fork() -> None:  # a forked child has none of the parent's worker threads
    global _BLAS_LOCK
    _POOLS.clear()
    _BLAS_LOCK = threading.Lock()
    _BLAS_STATE[:] = [0, None]


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork)


@contextlib.contextmanager
def _one_blas_thread() -> Iterator[None]:
    """NumPy's BLAS on one thread while any call (from any thread) is inside; the first call in
    sets the limit, the last one out restores what it found."""
    with _BLAS_LOCK:
        if _BLAS_STATE[0] == 0:
            if not _BLAS:
                _BLAS.append(ThreadpoolController())
            _BLAS_STATE[1] = _BLAS[0].limit(limits=1, user_api="blas")
        _BLAS_STATE[0] += 1
    try:
        yield
    finally:
        with _BLAS_LOCK:
            _BLAS_STATE[0] -= 1
            if _BLAS_STATE[0] == 0:
                _BLAS_STATE[1].restore_original_limits()
                _BLAS_STATE[1] = None


def run_tasks(fn: Any, tasks: list, reduce: Any = None, blas: bool = True) -> None:
    """fn(*t) for each task t on numba.get_num_threads() threads (the calling one alone when it
    is 1, as ``threads_for`` sets for small problems), with NumPy's BLAS on one thread inside
    the tasks (``blas``): one level of parallelism, no second thread pool spinning beside the
    first. ``reduce(t, fn(*t))`` runs on the calling thread in task order, whatever the
    threads."""
    n = min(numba.get_num_threads(), len(tasks))
    if n <= 1:
        for t in tasks:
            r = fn(*t)
            if reduce is not None:
                reduce(t, r)
        return
    pool = _POOLS.get(n)
    if pool is None:
        pool = _POOLS[n] = ThreadPoolExecutor(n, thread_name_prefix="deformnp-dcv")
    with _one_blas_thread() if blas else contextlib.nullcontext():
        futures = [pool.submit(fn, *t) for t in tasks]
        for i, t in enumerate(tasks):
            r = futures[i].result()
            futures[i] = None  # drop the result's buffers once reduced
            if reduce is not None:
                reduce(t, r)
            del r


def _mask_or_ones(mask: Any, B: int, G: int, K: int, Hout: int, Wout: int, dtype: Any) -> Any:
    return mask if mask is not None else np.ones((B, G * K, Hout, Wout), dtype=dtype)


def _weight_matrix(weight: Any) -> Any:
    """weight (Cout, cin_g, kh, kw) as Wm (Cout, kh*kw*cin_g), the columns' order."""
    Cout = weight.shape[0]
    return np.ascontiguousarray(weight.transpose(0, 2, 3, 1)).reshape(Cout, -1)


def deform_conv2d_forward(
    input: Any,
    offset: Any,
    weight: Any,
    bias: Any,
    mask: Any,
    stride: tuple,
    padding: tuple,
    dilation: tuple,
) -> Any:
    """out (B, Cout, Hout, Wout); arguments validated and C-contiguous, mask/bias may be None."""
    B, Cin, H, W, Cout, cin_g, kh, kw, Hout, Wout, G, g = _geometry(input, offset, weight)
    out = np.zeros((B, Cout, Hout, Wout), dtype=input.dtype)
    if out.size and H * W:
        return _forward(input, offset, weight, bias, stride, padding, dilation, mask, out)
    if bias is not None:
        out += bias.reshape(1, Cout, 1, 1)
    return out


def _forward(
    input: Any,
    offset: Any,
    weight: Any,
    bias: Any,
    stride: tuple,
    padding: tuple,
    dilation: tuple,
    mask: Any,
    out: Any,
) -> Any:
    B, Cin, H, W, Cout, cin_g, kh, kw, Hout, Wout, G, g = _geometry(input, offset, weight)
    K = kh * kw
    HW = Hout * Wout
    dtype = input.dtype
    with threads_for(B * HW * K * Cin):
        msk = _mask_or_ones(mask, B, G, K, Hout, Wout, dtype)
        inp_t = _channels_last_input(input)
        wm = _weight_matrix(weight)
        runs = channel_runs(Cin, G, cin_g, K)
        cout_g = Cout // g
        kc = K * cin_g
        # each group's Wm^T (kc, cout_g), contiguous: the GEMM runs with the columns on the
        # left, whose rows are the output pixels (see "The forward's GEMM" above)
        wmt = np.ascontiguousarray(wm.reshape(g, cout_g, kc).transpose(0, 2, 1))
        rows = task_rows(Cin * K, Hout, Wout, FWD_COLS_BUDGET)
        outf = out.reshape(B, Cout, HW)

        def task(b: int, oy0: int) -> None:
            oy1 = min(oy0 + rows, Hout)
            p0, p1 = oy0 * Wout, oy1 * Wout
            cols = np.empty((p1 - p0, Cin * K), dtype=dtype)
            _im2col(
                inp_t, offset, msk, b, oy0, oy1, kh, kw, *stride, *padding, *dilation, cin_g,
                runs, cols,
            )  # fmt: skip
            out_t = np.empty((p1 - p0, cout_g), dtype=dtype)
            for grp in range(g):  # out[b, group, rows] = (cols[:, group] @ Wm[group]^T)^T
                np.matmul(cols[:, grp * kc : (grp + 1) * kc], wmt[grp], out=out_t)
                outf[b, grp * cout_g : (grp + 1) * cout_g, p0:p1] = out_t.T

        run_tasks(task, [(b, oy0) for b in range(B) for oy0 in range(0, Hout, rows)])
    if bias is not None:
        out += bias.reshape(1, Cout, 1, 1)
    return out


def deform_conv2d_backward(
    grad_out: Any,
    input: Any,
    offset: Any,
    weight: Any,
    bias: Any,
    mask: Any,
    stride: tuple,
    padding: tuple,
    dilation: tuple,
    needs: tuple,
) -> tuple:
    """Gradients (input, offset, weight, bias, mask), None where ``needs`` is False (bias: also
    when there is no bias; mask: also when mask is None). Deterministic."""
    B, Cin, H, W, Cout, cin_g, kh, kw, Hout, Wout, G, g = _geometry(input, offset, weight)
    K = kh * kw
    HW = Hout * Wout
    dtype = input.dtype
    need_in, need_off, need_w, need_b, need_m = (bool(n) for n in needs)
    need_m = need_m and mask is not None
    need_b = need_b and bias is not None
    g_in = np.zeros(input.shape, dtype) if need_in else None
    g_off = np.zeros(offset.shape, dtype) if need_off else None
    g_w = np.zeros(weight.shape, dtype) if need_w else None
    g_m = np.zeros(mask.shape, dtype) if need_m else None
    g_b = None
    if need_b:
        g_b = np.ascontiguousarray(grad_out.sum(axis=(0, 2, 3)), dtype=dtype)
    if B * Cout * HW == 0 or H * W == 0 or not (need_in or need_off or need_w or need_m):
        return g_in, g_off, g_w, g_b, g_m
    with threads_for(B * HW * K * Cin):
        _backward(
            grad_out, input, offset, weight, mask, stride, padding, dilation,
            need_in, need_off, need_w, need_m, g_in, g_off, g_w, g_m,
        )  # fmt: skip
    return g_in, g_off, g_w, g_b, g_m


def _backward(
    grad_out: Any, input: Any, offset: Any, weight: Any, mask: Any, stride: tuple,
    padding: tuple, dilation: tuple, need_in: bool, need_off: bool, need_w: bool, need_m: bool,
    g_in: Any, g_off: Any, g_w: Any, g_m: Any,
) -> None:  # fmt: skip
    """The chunked backward of deform_conv2d_backward, writing into the given gradients."""
    B, Cin, H, W, Cout, cin_g, kh, kw, Hout, Wout, G, g = _geometry(input, offset, weight)
    K = kh * kw
    HW = Hout * Wout
    dtype = input.dtype
    msk = _mask_or_ones(mask, B, G, K, Hout, Wout, dtype)
    inp_t = _channels_last_input(input)
    wm = _weight_matrix(weight)
    runs = channel_runs(Cin, G, cin_g, K)
    gwm = np.zeros_like(wm) if need_w else None
    need_sums = need_off or need_m
    goff = g_off if need_off else np.zeros(offset.shape, dtype)
    gmsk = g_m if need_m else np.zeros(msk.shape, dtype)
    gin = g_in.reshape(B, Cin, H * W) if need_in else None
    cout_g = Cout // g
    kc = K * cin_g
    CK = Cin * K
    rows = task_rows(CK, Hout, Wout)
    gof = grad_out.reshape(B, Cout, HW)
    nblk = -(-Hout // rows)  # row blocks per image
    lock = threading.Lock()
    accs: list = [None] * B  # per image: the channels-last input gradients of its row blocks
    left = [nblk] * B  # row blocks of the image still to scatter

    def task(b: int, oy0: int) -> tuple:
        oy1 = min(oy0 + rows, Hout)
        p0, p1 = oy0 * Wout, oy1 * Wout
        go_b = gof[b, :, p0:p1]  # the task's grad_out (Cout, P): BLAS reads it in place
        gcols = np.empty((1, 1), dtype)
        if need_in or need_sums:
            gcols = np.empty((p1 - p0, CK), dtype)
            for grp in range(g):  # grad_cols[:, group] = grad_out[group]^T @ Wm[group]
                np.matmul(
                    go_b[grp * cout_g : (grp + 1) * cout_g].T,
                    wm[grp * cout_g : (grp + 1) * cout_g],
                    out=gcols[:, grp * kc : (grp + 1) * kc],
                )
        cols = np.empty((p1 - p0, CK), dtype) if need_w else np.empty((1, 1), dtype)
        acc = np.empty(1, dtype)
        if need_in:  # this block's buffer; the image's last block to finish sums them
            with lock:
                if accs[b] is None:
                    accs[b] = np.zeros((nblk, H * W * Cin), dtype)
                acc = accs[b][oy0 // rows]
        _backward_points(
            inp_t, offset, msk, gcols, b, oy0, oy1, kh, kw, *stride, *padding, *dilation,
            cin_g, runs, need_sums, need_w, need_in, cols, goff, gmsk, acc,
        )  # fmt: skip
        if need_in:
            with lock:
                left[b] -= 1
                last = left[b] == 0
            if last:
                _sum_channels_first(accs[b], gin[b])
                accs[b] = None
        gw_t = None
        if need_w:  # this task's share of grad_Wm[group] = grad_out[group] @ cols[:, group]
            gw_t = np.empty((Cout, kc), dtype)
            for grp in range(g):
                np.matmul(
                    go_b[grp * cout_g : (grp + 1) * cout_g],
                    cols[:, grp * kc : (grp + 1) * kc],
                    out=gw_t[grp * cout_g : (grp + 1) * cout_g],
                )
        return gw_t

    def reduce(t: tuple, gw_t: Any) -> None:  # called in task order
        if gw_t is not None:
            gwm[...] += gw_t

    run_tasks(task, [(b, oy0) for b in range(B) for oy0 in range(0, Hout, rows)], reduce)
    if need_w:
        g_w[...] = gwm.reshape(Cout, kh, kw, cin_g).transpose(0, 3, 1, 2)
