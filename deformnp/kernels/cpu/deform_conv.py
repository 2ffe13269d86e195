"""CPU kernels of ``deform_conv2d`` (SPEC section 6): channels-last deformable im2col + BLAS GEMM.

Shapes (validated by ``deformnp.ops.deform_conv``): input (B, Cin, H, W), offset (B, 2*G*K,
Hout, Wout), mask (B, G*K, Hout, Wout), weight (Cout, Cin/g, kh, kw), K = kh*kw, G offset
groups, g weight groups. Sampling point of kernel point k = i*kw + j at output (oy, ox) for the
channels of offset group og:

    y = oy*sh - ph + i*dh + dy,  x = ox*sw - pw + j*dw + dx   (zero-fade rule, SPEC 4)
    dy = offset[b, 2*(og*K + k)], dx = offset[b, 2*(og*K + k) + 1], m = mask[b, og*K + k]

The kernels work on a channels-last copy of the input (B, H, W, Cin): the bilinear plan of a
sampling point is computed once (from the shared ``zero_fade_plan``) and then applied to all
Cin/G channels of its offset group as contiguous runs of memory, which the compiler vectorizes.
The columns matrix is (P, Cin*K), P = nb*Hout*Wout rows (one per output pixel of a chunk of nb
batch items), with column (grp*K + k)*cin_g + cl for channel c = grp*cin_g + cl of weight group
grp, so that each weight group's columns are one block. With Wm = weight permuted to (Cout, kh,
kw, Cin/g) and flattened to (Cout, K*Cin/g):

    forward    cols = im2col(input)                          (_im2col, per (b, oy) row)
               out^T[:, group] = cols[:, group] @ Wm[group]^T            (BLAS GEMM)
    backward   grad_cols[:, group] = grad_out^T[:, group] @ Wm[group]    (GEMM)
               grad_offset, grad_mask, cols and the plans                (_backward_points)
               grad_Wm[group] += grad_out^T[:, group]^T @ cols[:, group] (GEMM)
               grad_input += scatter of the plans' m * w * grad_cols     (_col2im)

Chunks of batch items bound the memory of the columns (COLS_BUDGET elements).

Parallelism and determinism (bit-identical results for any thread count):

* ``_im2col`` and ``_backward_points``: ``prange`` over (b, oy) rows; a row task writes only its
  own columns, plans and offset / mask gradients, summing over channels in a fixed order;
* ``_col2im``: ``prange`` over (b, offset group, block of channels); a task owns those channels
  of the input gradient, scatters into a channels-last buffer of them in a fixed (oy, ox, k)
  order (so the block size, which may follow the thread count, changes no sum) and stores it;
  output-pixel-major order keeps consecutive scatters within a few input rows of the buffer;
* GEMMs are BLAS calls whose partitioning does not depend on Numba's thread count; chunk results
  are accumulated in chunk order; the chunk size depends on the shapes only.

Index arithmetic is int64 (Numba integers); the channel-run loops index flat arrays with uint64
offsets, which Numba does not check for wraparound, so LLVM vectorizes them. Plans are float64;
sums over channels run in float64; columns and GEMMs keep the data dtype (float32 data runs
float32 GEMMs, as torchvision does). The plans of the backward are kept per (b, og, q, k).
"""

from __future__ import annotations

from typing import Any

import numba
import numpy as np
from numba import njit, prange

from .sampling import channels_last, from_channels_last, threads_for, zero_fade_plan

# Largest columns matrix (elements) per chunk of batch items: 2**23 elements is 32 MB in
# float32; a chunk always holds at least one batch item.
COLS_BUDGET = 1 << 23


@njit(parallel=True, cache=True)
def _im2col(inp_t, off, msk, b0, nb, kh, kw, sh, sw, ph, pw, dh, dw, cin_g, runs, cols):
    """cols[(b - b0)*HW + oy*Wout + ox, (grp*K + k)*cin_g + cl] = m * sample(input[b, c], y, x)
    for b in [b0, b0 + nb); inp_t is the channels-last input (B, H, W, Cin); ``runs`` from
    ``channel_runs``."""
    B, H, W, Cin = inp_t.shape
    K = kh * kw
    G = msk.shape[1] // K
    Hout = off.shape[2]
    Wout = off.shape[3]
    HW = Hout * Wout
    CK = Cin * K
    v = inp_t.reshape(-1)
    cf = cols.reshape(-1)
    for task in prange(nb * Hout):
        bl = task // Hout
        oy = task - bl * Hout
        b = b0 + bl
        wv = np.empty(4, cols.dtype)  # the plan's weights in the data dtype
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
                    base = b * H * W
                    row = (bl * HW + oy * Wout + ox) * CK + k * cin_g
                    for r in range(runs.shape[1]):  # og's channels, one weight group at a time
                        c = runs[og, r, 0]
                        n = np.uint64(runs[og, r, 1] - c)
                        d = np.uint64(row + runs[og, r, 2] + c)
                        if zero:
                            _fill_zero(cf, d, n)
                        else:
                            _combine4(
                                cf, d, v, n,
                                np.uint64((base + pi[0]) * Cin + c),
                                np.uint64((base + pi[1]) * Cin + c),
                                np.uint64((base + pi[2]) * Cin + c),
                                np.uint64((base + pi[3]) * Cin + c),
                                wv[0], wv[1], wv[2], wv[3],
                            )  # fmt: skip


# Channel-run loops on flat arrays with unsigned offsets (d, a0..a3, n: np.uint64): Numba
# checks signed indices for wraparound, which keeps LLVM from vectorizing the loop; unsigned
# ones need no check (measured: 3x faster than the same loop over array slices).


@njit(cache=True)
def _fill_zero(out, d, n):
    for u in range(n):
        out[d + u] = 0.0


@njit(cache=True)
def _combine4(out, d, v, n, a0, a1, a2, a3, w0, w1, w2, w3):
    """out[d + u] = w0*v[a0 + u] + w1*v[a1 + u] + w2*v[a2 + u] + w3*v[a3 + u], u < n."""
    for u in range(n):
        out[d + u] = w0 * v[a0 + u] + w1 * v[a1 + u] + w2 * v[a2 + u] + w3 * v[a3 + u]


@njit(fastmath={"reassoc", "contract"}, cache=True)
def _dot4(g, d, v, n, a0, a1, a2, a3):
    """(sum_u g[d + u] * v[a_t + u] for t = 0..3), summed in float64. Reassociation lets the
    compiler vectorize the sums; the compiled order is fixed, so results are reproducible."""
    s0 = 0.0
    s1 = 0.0
    s2 = 0.0
    s3 = 0.0
    for u in range(n):
        gu = np.float64(g[d + u])
        s0 += gu * v[a0 + u]
        s1 += gu * v[a1 + u]
        s2 += gu * v[a2 + u]
        s3 += gu * v[a3 + u]
    return s0, s1, s2, s3


@njit(cache=True)
def _axpy(r, s, w, g, d, n):
    """r[s + u] += w * g[d + u], u < n (one corner of a sample scattering a channel run)."""
    for u in range(n):
        r[s + u] += w * g[d + u]


@njit(parallel=True, cache=True)
def _backward_points(
    inp_t, off, msk, gcols, b0, nb, kh, kw, sh, sw, ph, pw, dh, dw, cin_g, runs,
    need_sums, need_cols, cols, goff, gmsk, pidx, pwts,
):  # fmt: skip
    """For batch items [b0, b0 + nb), owner per (b, oy) row:

    goff[b, 2(og K + k)]     = m * sum_c grad_cols[., c K + k] * d sample / dy   (need_sums)
    goff[b, 2(og K + k) + 1] = m * sum_c grad_cols[., c K + k] * d sample / dx
    gmsk[b, og K + k]        =     sum_c grad_cols[., c K + k] * sample
    cols                     = the columns, as _im2col                          (need_cols)
    pidx[bl, og, q, k], pwts[bl, og, q, k] = the plan's corners and m * weights (always)

    With d_t = sum_c grad_cols * V_c[corner t] (four dot products over the channels), the sums
    are sum_t cy_t d_t, sum_t cx_t d_t and sum_t w_t d_t.
    """
    B, H, W, Cin = inp_t.shape
    K = kh * kw
    G = msk.shape[1] // K
    Hout = off.shape[2]
    Wout = off.shape[3]
    HW = Hout * Wout
    CK = Cin * K
    v = inp_t.reshape(-1)
    gc = gcols.reshape(-1)
    cf = cols.reshape(-1)
    for task in prange(nb * Hout):
        bl = task // Hout
        oy = task - bl * Hout
        b = b0 + bl
        wv = np.empty(4, pwts.dtype)
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
                    q = oy * Wout + ox
                    for t in range(4):
                        wv[t] = m * pwt[t]
                        pidx[bl, og, q, k, t] = pi[t]
                        pwts[bl, og, q, k, t] = wv[t]
                    if not (need_sums or need_cols):
                        continue
                    base = b * H * W
                    row = (bl * HW + q) * CK + k * cin_g
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
                        if need_cols:
                            _combine4(cf, d, v, n, a0, a1, a2, a3, wv[0], wv[1], wv[2], wv[3])
                        if need_sums:
                            e0, e1, e2, e3 = _dot4(gc, d, v, n, a0, a1, a2, a3)
                            d0 += e0
                            d1 += e1
                            d2 += e2
                            d3 += e3
                    if need_sums:
                        accy = pcy[0] * d0 + pcy[1] * d1 + pcy[2] * d2 + pcy[3] * d3
                        accx = pcx[0] * d0 + pcx[1] * d1 + pcx[2] * d2 + pcx[3] * d3
                        accm = pwt[0] * d0 + pwt[1] * d1 + pwt[2] * d2 + pwt[3] * d3
                        goff[b, ch, oy, ox] = m * accy
                        goff[b, ch + 1, oy, ox] = m * accx
                        gmsk[b, og * K + k, oy, ox] = accm


@njit(parallel=True, cache=True)
def _col2im(gcols, pidx, pwts, b0, nb, kh, kw, cin_g, runs, cblock, gin):
    """gin[b, c] = sum over (q, k) of m * w * grad_cols[q, column of (c, k)] scattered at the
    plan's corners, for b in [b0, b0 + nb); gin (B, Cin, H, W). Tasks own (b, og, block of
    channels): they scatter into a channels-last buffer of their block in (q, k, corner) order
    whatever the block (so the block size never changes a sum), then store it into gin. The
    output-pixel-major order keeps the scattered corners of consecutive steps near each other
    (a few input rows of the buffer at a time)."""
    B, Cin, H, W = gin.shape
    G = pidx.shape[1]
    K = kh * kw
    HW = pidx.shape[2]
    HWin = H * W
    cpg = Cin // G
    CK = Cin * K
    ncb = (cpg + cblock - 1) // cblock
    gc = gcols.reshape(-1)
    gi = gin.reshape(-1)
    for task in prange(nb * G * ncb):
        bl = task // (G * ncb)
        rest = task - bl * (G * ncb)
        og = rest // ncb
        ca = og * cpg + (rest - og * ncb) * cblock
        cb = min(ca + cblock, (og + 1) * cpg)
        nc = cb - ca
        acc = np.zeros(HWin * nc, gin.dtype)
        for q in range(HW):
            for k in range(K):
                if (
                    pwts[bl, og, q, k, 0] == 0.0
                    and pwts[bl, og, q, k, 1] == 0.0
                    and pwts[bl, og, q, k, 2] == 0.0
                    and pwts[bl, og, q, k, 3] == 0.0
                ):
                    continue
                row = (bl * HW + q) * CK + k * cin_g
                for r in range(runs.shape[1]):  # og's channels in [ca, cb), by weight group
                    c = max(ca, runs[og, r, 0])
                    ce = min(cb, runs[og, r, 1])
                    if c >= ce:
                        continue
                    d = np.uint64(row + runs[og, r, 2] + c)
                    n = np.uint64(ce - c)
                    for t in range(4):
                        s = np.uint64(pidx[bl, og, q, k, t] * nc - ca + c)
                        _axpy(acc, s, pwts[bl, og, q, k, t], gc, d, n)
        for c in range(ca, cb):
            ob = ((b0 + bl) * Cin + c) * HWin
            for pix in range(HWin):
                gi[ob + pix] = acc[pix * nc + c - ca]


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


def chunk_size(Cin: int, K: int, HW: int) -> int:
    """Batch items per chunk so the columns matrix stays within COLS_BUDGET elements."""
    return max(1, COLS_BUDGET // max(1, Cin * K * HW))


def _channel_block(nb: int, G: int, cpg: int) -> int:
    """Channels per ``_col2im`` task: about two tasks per thread when the channels allow (blocks
    of >= 8 channels). The result never depends on it (see ``_col2im``)."""
    ncb = max(1, min(cpg // 8, -(-2 * numba.get_num_threads() // max(1, nb * G))))
    return -(-cpg // ncb)


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
        inp_t = channels_last(input).reshape(B, H, W, Cin)
        wm = _weight_matrix(weight)
        runs = channel_runs(Cin, G, cin_g, K)
        cout_g = Cout // g
        kc = K * cin_g
        step = chunk_size(Cin, K, HW)
        for b0 in range(0, B, step):
            nb = min(step, B - b0)
            cols = np.empty((nb, HW, Cin * K), dtype=dtype)
            _im2col(
                inp_t, offset, msk, b0, nb, kh, kw, *stride, *padding, *dilation, cin_g, runs, cols
            )
            cols2 = cols.reshape(nb * HW, Cin * K)
            if g == 1:
                out_t = cols2 @ wm.T
            else:
                out_t = np.empty((nb * HW, Cout), dtype=dtype)
                for grp in range(g):
                    out_t[:, grp * cout_g : (grp + 1) * cout_g] = (
                        cols2[:, grp * kc : (grp + 1) * kc]
                        @ wm[grp * cout_g : (grp + 1) * cout_g].T
                    )
            from_channels_last(out_t.reshape(nb, HW, Cout), out[b0 : b0 + nb].reshape(nb, Cout, HW))
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
    inp_t = channels_last(input).reshape(B, H, W, Cin)
    wm = _weight_matrix(weight)
    runs = channel_runs(Cin, G, cin_g, K)
    gwm = np.zeros_like(wm) if need_w else None
    need_sums = need_off or need_m
    goff = g_off if need_off else np.zeros(offset.shape, dtype)
    gmsk = g_m if need_m else np.zeros(msk.shape, dtype)
    cout_g = Cout // g
    kc = K * cin_g
    step = chunk_size(Cin, K, HW)
    for b0 in range(0, B, step):
        nb = min(step, B - b0)
        go_t = channels_last(grad_out[b0 : b0 + nb]).reshape(nb * HW, Cout)
        cols = np.empty((nb * HW, Cin * K), dtype) if need_w else np.empty((1, 1), dtype)
        gcols = np.empty((1, 1), dtype)
        if need_in or need_sums:
            if g == 1:
                gcols = go_t @ wm
            else:
                gcols = np.empty((nb * HW, Cin * K), dtype)
                for grp in range(g):
                    gcols[:, grp * kc : (grp + 1) * kc] = (
                        go_t[:, grp * cout_g : (grp + 1) * cout_g]
                        @ wm[grp * cout_g : (grp + 1) * cout_g]
                    )
        if need_in or need_sums or need_w:
            pidx = np.empty((nb, G, HW, K, 4), np.int64)
            pwts = np.empty((nb, G, HW, K, 4), dtype)
            _backward_points(
                inp_t, offset, msk, gcols, b0, nb, kh, kw, *stride, *padding, *dilation, cin_g,
                runs, need_sums, need_w, cols, goff, gmsk, pidx, pwts,
            )  # fmt: skip
            if need_in:
                cb = _channel_block(nb, G, Cin // G)
                _col2im(gcols, pidx, pwts, b0, nb, kh, kw, cin_g, runs, cb, g_in)
        if need_w:
            for grp in range(g):
                # as (cols^T @ go_t)^T: OpenBLAS's threads split this orientation well; the
                # other one (go_t^T @ cols, a long inner dimension) took 5-8x the CPU time
                gwm[grp * cout_g : (grp + 1) * cout_g] += (
                    cols[:, grp * kc : (grp + 1) * kc].T
                    @ go_t[:, grp * cout_g : (grp + 1) * cout_g]
                ).T
    if need_w:
        g_w[...] = gwm.reshape(Cout, kh, kw, cin_g).transpose(0, 3, 1, 2)
