"""CUDA kernels of ``deform_conv2d`` (docs/ops/deform_conv.rst): deformable im2col + tiled GEMM,
mirroring ``kernels/cpu/deform_conv.py``.

Shapes: input (B, Cin, H, W), offset (B, 2*G*K, Hout, Wout), mask (B, G*K, Hout, Wout), weight
(Cout, Cin/g, kh, kw), K = kh*kw, G offset groups, g weight groups. Kernel point k = i*kw + j at
output pixel (oy, ox) samples the channels of offset group og at

    y = oy*sh - ph + i*dh + dy,  x = ox*sw - pw + j*dw + dx   (zero-fade rule)
    dy = offset[b, 2*(og*K + k)], dx = offset[b, 2*(og*K + k) + 1], m = mask[b, og*K + k]

**Chunks.** The B*Hout*Wout output pixels, flattened over the batch (p = b*Hout*Wout + oy*Wout +
ox), are processed in chunks of P consecutive pixels (a chunk may span batch items): P is the
largest count whose per-chunk buffers (columns, pixel-major gradient / output blocks, and in
deterministic mode the sort keys) fit in COLUMN_BYTES, at least one pixel. The column buffer is
``col[(c*K + k), p_local]`` (Cin*K x P, row-major), so weight group grp owns the rows
[grp*kc, (grp + 1)*kc), kc = (Cin/g)*K, in the order of the weight's flattening (cl*K + k): the
weight is used as it is, a (Cout x kc) matrix per group. An empty input map (H*W = 0) samples
zeros: the output is the bias (``_store`` of a zero block) and the gradients are zero.

**Forward**, per chunk:

1. ``_im2col``: one thread per (og, k, p_local) (p fastest: the column writes are coalesced;
   p_local runs over the chunk's pixels, and so over the batch items it spans). The thread
   reads its offset (and mask), computes the zero-fade plan once and applies it, times the mask,
   to each of the Cin/G channels of its offset group: 4 loads of the input per sample, none when
   all four weights are zero (out of range or masked). No sample is computed twice.
2. ``gemm`` (``gemm.py``), one batch entry per weight group:
   ``outbuf[group] (Cout/g x P) = W[group] (Cout/g x kc) @ col[group] (kc x P)``,
   2 * Cout * (Cin/g)*K * P FLOPs per chunk.
3. ``_store``: one thread per (co, p_local) writes ``out[b, co, oy, ox] = outbuf + bias``.

**Backward**, per chunk (the same chunks):

1. ``_gather``: ``gobuf (Cout x P)`` = the chunk's block of grad_out, pixel-major.
2. ``gemm``: ``gcol[group] (kc x P) = W[group]^T @ gobuf[group]`` (the A^T @ B mode),
   2 * Cout * (Cin/g)*K * P FLOPs (only when the input, offset or mask gradient is needed).
3. ``_backward_points``: one thread per (og, k, p_local) recomputes the plan once and, over the
   channels of its offset group, reads the four corners and ``gcol[c*K + k, p]``; it sums the
   offset gradient (m * gcol * the plan's cy, cx coefficients applied to the corners) and the
   mask gradient (gcol * sample) and writes them (one writer each), writes the columns of the
   chunk into ``col`` when the weight gradient is needed (the forward's columns are recomputed
   from the same corner loads, never stored; when only the weight gradient is needed, steps 2-3
   are ``_im2col`` alone), and scatters ``w[corner] * m * gcol`` into grad_input with float
   atomic adds (up to 4 atomics per (channel, point), zero-weight corners skipped; not
   bit-reproducible). Per channel: 4 input loads and 1 gcol load, whatever Cout.
4. ``gemm`` with ``accumulate`` after the first chunk:
   ``grad_W[group] (Cout/g x kc) += gobuf[group] @ col[group]^T`` (the A @ B^T mode),
   2 * Cout * (Cin/g)*K * P FLOPs, one writer per weight element, chunks added in order.
5. The bias gradient (independent of the chunks): ``_bias_partial`` (one thread per (co, s) sums
   pixels q = s, s + S, ... of every batch item, coalesced over s) then ``_bias_final`` (one
   thread per co sums its S partials in order): deterministic.

**Deterministic mode** (``deformnp.use_deterministic_algorithms(True)``): step 3 writes no atomic
but, per contribution e = 4 * point + corner (point = (og*K + k)*P + p_local), the destination
key ``(bl*G + og)*H*W + pixel`` (bl: batch item relative to the chunk's first one; ``n_keys`` =
(batch items spanned)*G*H*W for a zero-weight corner) and its coefficient ``m * w[corner]``;
``scatter.segments`` sorts them; ``_owner_input`` then gives each (destination pixel, channel of
its offset group) one thread that sums ``coefficient * gcol[c*K + k, p]`` over its contributions
in sorted order and adds the sum into grad_input. Chunks run one after another, each element has
one writer per chunk pass: bit-identical across runs.

**Precision.** Every kernel computes in its data's dtype (``ft = array.dtype.type``, constants
``ft(...)``, integer coordinates cast before adding an offset): float32 data run float32 plans,
sums, atomics and GEMMs (accumulating in float32), float64 data float64. No host round trip:
the only host values are the shapes.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from numba import cuda

from ...determinism import are_deterministic_algorithms_enabled
from ._launch import SIMULATOR, empty, flat, grid, zeros
from .gemm import gemm, view
from .sampling import zero_fade_plan
from .scatter import segments

# Bound on the bytes of the per-chunk buffers (columns and pixel-major blocks); a chunk always
# holds at least one output pixel. Each chunk costs the host its launches (Numba prepares every
# argument of every launch in Python, a few hundred microseconds a chunk), so chunks are large:
# on an H200 with 64 MiB chunks, B=16 256->256 64x64 3x3 took 11 chunks in the forward and was
# bound by the host (5.7 ms on the host of a 5.8 ms call). torchvision's columns for 64 images
# of that size take 2.4 GB.
COLUMN_BYTES = 512 << 20


@cuda.jit(cache=not SIMULATOR)
def _im2col(
    inp, off, msk, col, p0, P, Cin, H, W, Hout, Wout, kh, kw, sh, sw, ph, pw, dh, dw, G, has_mask
):
    """col[(c*K + k)*P + p_local] = m * sample of input[b, c] for the chunk's pixels."""
    ft = col.dtype.type
    zero = ft(0)
    K = kh * kw
    HWo = Hout * Wout
    HW = H * W
    cpg = Cin // G
    total = G * K * P
    for t in range(cuda.grid(1), total, cuda.gridsize(1)):
        pl = t % P
        k = (t // P) % K
        og = t // (P * K)
        pg = p0 + pl
        b = pg // HWo
        q = pg - b * HWo
        oy = q // Wout
        ox = q - oy * Wout
        i = k // kw
        j = k - i * kw
        o = (b * 2 * G * K + 2 * (og * K + k)) * HWo + q
        y = ft(oy * sh - ph + i * dh) + off[o]
        x = ft(ox * sw - pw + j * dw) + off[o + HWo]
        m = ft(1)
        if has_mask:
            m = msk[(b * G * K + og * K + k) * HWo + q]
        idx, w, cy, cx = zero_fade_plan(y, x, H, W, ft)
        w0 = m * w[0]
        w1 = m * w[1]
        w2 = m * w[2]
        w3 = m * w[3]
        skip = w0 == zero and w1 == zero and w2 == zero and w3 == zero
        base = (b * Cin + og * cpg) * HW
        row = (og * cpg * K + k) * P + pl
        for _ in range(cpg):
            if skip:
                col[row] = zero
            else:
                col[row] = (
                    w0 * inp[base + idx[0]]
                    + w1 * inp[base + idx[1]]
                    + w2 * inp[base + idx[2]]
                    + w3 * inp[base + idx[3]]
                )
            base += HW
            row += K * P


@cuda.jit(cache=not SIMULATOR)
def _store(buf, bias, out, p0, P, Cout, HWo, has_bias):
    """out[b, co, q] = buf[co, p_local] (+ bias[co]) for the chunk's pixels."""
    for t in range(cuda.grid(1), Cout * P, cuda.gridsize(1)):
        pl = t % P
        co = t // P
        pg = p0 + pl
        b = pg // HWo
        q = pg - b * HWo
        v = buf[t]
        if has_bias:
            v += bias[co]
        out[(b * Cout + co) * HWo + q] = v


@cuda.jit(cache=not SIMULATOR)
def _gather(gout, buf, p0, P, Cout, HWo):
    """buf[co, p_local] = grad_out[b, co, q] for the chunk's pixels."""
    for t in range(cuda.grid(1), Cout * P, cuda.gridsize(1)):
        pl = t % P
        co = t // P
        pg = p0 + pl
        b = pg // HWo
        q = pg - b * HWo
        buf[t] = gout[(b * Cout + co) * HWo + q]


@cuda.jit(cache=not SIMULATOR)
def _backward_points(
    inp, off, msk, gcol, col, gin, goff, gmsk, keys, coef,
    p0, P, Cin, H, W, Hout, Wout, kh, kw, sh, sw, ph, pw, dh, dw, G,
    has_mask, need_in, need_off, need_m, need_col, deterministic, b_first, n_keys,
):  # fmt: skip
    """Per (og, k, p_local) of the chunk: the offset / mask gradients (one writer), the columns
    (``need_col``), and the input gradient as atomics or, ``deterministic``, as sort keys and
    coefficients (see the module docstring)."""
    ft = gcol.dtype.type
    zero = ft(0)
    K = kh * kw
    HWo = Hout * Wout
    HW = H * W
    cpg = Cin // G
    need_sums = need_off or need_m
    total = G * K * P
    for t in range(cuda.grid(1), total, cuda.gridsize(1)):
        pl = t % P
        k = (t // P) % K
        og = t // (P * K)
        pg = p0 + pl
        b = pg // HWo
        q = pg - b * HWo
        oy = q // Wout
        ox = q - oy * Wout
        i = k // kw
        j = k - i * kw
        o = (b * 2 * G * K + 2 * (og * K + k)) * HWo + q
        mi = (b * G * K + og * K + k) * HWo + q
        y = ft(oy * sh - ph + i * dh) + off[o]
        x = ft(ox * sw - pw + j * dw) + off[o + HWo]
        m = ft(1)
        if has_mask:
            m = msk[mi]
        idx, w, cy, cx = zero_fade_plan(y, x, H, W, ft)
        w0 = m * w[0]
        w1 = m * w[1]
        w2 = m * w[2]
        w3 = m * w[3]
        skip = w0 == zero and w1 == zero and w2 == zero and w3 == zero
        gy = zero
        gx = zero
        gm = zero
        base = (b * Cin + og * cpg) * HW
        row = (og * cpg * K + k) * P + pl
        if not (skip and not need_sums):  # nothing to read or scatter for a dead point
            for _ in range(cpg):
                v0 = inp[base + idx[0]]
                v1 = inp[base + idx[1]]
                v2 = inp[base + idx[2]]
                v3 = inp[base + idx[3]]
                if need_col:
                    col[row] = zero if skip else w0 * v0 + w1 * v1 + w2 * v2 + w3 * v3
                if need_sums or need_in:
                    gc = gcol[row]
                    if need_sums:
                        gy += gc * (cy[0] * v0 + cy[1] * v1 + cy[2] * v2 + cy[3] * v3)
                        gx += gc * (cx[0] * v0 + cx[1] * v1 + cx[2] * v2 + cx[3] * v3)
                        gm += gc * (w[0] * v0 + w[1] * v1 + w[2] * v2 + w[3] * v3)
                    if need_in and not deterministic:
                        if w0 != zero:
                            cuda.atomic.add(gin, base + idx[0], w0 * gc)
                        if w1 != zero:
                            cuda.atomic.add(gin, base + idx[1], w1 * gc)
                        if w2 != zero:
                            cuda.atomic.add(gin, base + idx[2], w2 * gc)
                        if w3 != zero:
                            cuda.atomic.add(gin, base + idx[3], w3 * gc)
                base += HW
                row += K * P
        elif need_col:
            for _ in range(cpg):
                col[row] = zero
                row += K * P
        if need_off:
            goff[o] = m * gy
            goff[o + HWo] = m * gx
        if need_m:
            gmsk[mi] = gm
        if need_in and deterministic:
            e = 4 * t
            dst = ((b - b_first) * G + og) * HW
            keys[e] = dst + idx[0] if w0 != zero else n_keys
            keys[e + 1] = dst + idx[1] if w1 != zero else n_keys
            keys[e + 2] = dst + idx[2] if w2 != zero else n_keys
            keys[e + 3] = dst + idx[3] if w3 != zero else n_keys
            coef[e] = w0
            coef[e + 1] = w1
            coef[e + 2] = w2
            coef[e + 3] = w3


@cuda.jit(cache=not SIMULATOR)
def _owner_input(gcol, coef, order, starts, gin, P, Cin, HW, K, G, b_first, n_keys):
    """grad_input[b, c, pixel] += sum over the sorted contributions e to (b, og, pixel) of
    coef[e] * gcol[c*K + k(e), p(e)]; one thread per (destination pixel, channel of og)."""
    ft = gcol.dtype.type
    cpg = Cin // G
    total = n_keys * cpg
    for t in range(cuda.grid(1), total, cuda.gridsize(1)):
        pix = t % HW
        cl = (t // HW) % cpg
        bog = t // (HW * cpg)
        og = bog % G
        bl = bog // G
        key = bog * HW + pix
        c = og * cpg + cl
        lo = starts[key]
        hi = starts[key + 1]
        if lo < hi:
            acc = ft(0)
            for s in range(lo, hi):
                e = order[s]
                point = e // 4
                pl = point % P
                k = (point // P) % K
                acc += coef[e] * gcol[(c * K + k) * P + pl]
            d = ((b_first + bl) * Cin + c) * HW + pix
            gin[d] = gin[d] + acc


@cuda.jit(cache=not SIMULATOR)
def _bias_partial(gout, part, B, Cout, HWo, S):
    """part[co, s] = sum over b, then q = s, s + S, ... < HWo of grad_out[b, co, q]."""
    ft = gout.dtype.type
    for t in range(cuda.grid(1), Cout * S, cuda.gridsize(1)):
        s = t % S
        co = t // S
        acc = ft(0)
        for b in range(B):
            base = (b * Cout + co) * HWo
            for q in range(s, HWo, S):
                acc += gout[base + q]
        part[t] = acc


@cuda.jit(cache=not SIMULATOR)
def _bias_final(part, gb, Cout, S):
    """gb[co] = sum of part[co, :] in order."""
    ft = part.dtype.type
    for co in range(cuda.grid(1), Cout, cuda.gridsize(1)):
        acc = ft(0)
        for s in range(S):
            acc += part[co * S + s]
        gb[co] = acc


def _geometry(input: Any, offset: Any, weight: Any) -> tuple:
    B, Cin, H, W = (int(s) for s in input.shape)
    Cout, cin_g, kh, kw = (int(s) for s in weight.shape)
    Hout, Wout = int(offset.shape[2]), int(offset.shape[3])
    G = int(offset.shape[1]) // (2 * kh * kw)
    return B, Cin, H, W, Cout, cin_g, kh, kw, Hout, Wout, G, Cin // cin_g


def _chunk_pixels(n_pixels: int, bytes_per_pixel: int) -> int:
    """Pixels per chunk: as many as COLUMN_BYTES allows, at least one, at most all."""
    return max(1, min(int(n_pixels), COLUMN_BYTES // max(1, int(bytes_per_pixel))))


def _conv_gemm(wgt: Any, col: Any, buf: Any, P: int, Cout: int, g: int, kc: int) -> None:
    """buf[group] (Cout/g x P) = W[group] (Cout/g x kc) @ col[group] (kc x P)."""
    cout_g = Cout // g
    gemm(
        wgt, col, buf, cout_g, P, kc,
        view(kc, 0, cout_g * kc), view(P, 0, kc * P), view(P, 0, cout_g * P), batches=g,
    )  # fmt: skip


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
    """out (B, Cout, Hout, Wout); mask/bias may be None."""
    B, Cin, H, W, Cout, cin_g, kh, kw, Hout, Wout, G, g = _geometry(input, offset, weight)
    K = kh * kw
    HWo = Hout * Wout
    out = empty((B, Cout, Hout, Wout), input.dtype)
    if out.size == 0:
        return out
    dummy = flat(weight)
    b_arr = flat(bias) if bias is not None else dummy
    itemsize = np.dtype(input.dtype).itemsize
    NP = B * HWo
    step = _chunk_pixels(NP, (Cin * K + Cout) * itemsize)
    if H * W == 0:  # an empty input map samples zeros: the output is the bias (or zero)
        buf = zeros((Cout * step,), input.dtype)
        for p0 in range(0, NP, step):
            P = min(step, NP - p0)
            _store[grid(Cout * P)](buf, b_arr, flat(out), p0, P, Cout, HWo, bias is not None)
        return out
    col = empty((Cin * K * step,), input.dtype)
    buf = empty((Cout * step,), input.dtype)
    inp, off, wgt, o = flat(input), flat(offset), flat(weight), flat(out)
    msk = flat(mask) if mask is not None else dummy
    geo = (Cin, H, W, Hout, Wout, kh, kw, *stride, *padding, *dilation, G)
    for p0 in range(0, NP, step):
        P = min(step, NP - p0)
        _im2col[grid(G * K * P)](inp, off, msk, col, p0, P, *geo, mask is not None)
        _conv_gemm(wgt, col, buf, P, Cout, g, cin_g * K)
        _store[grid(Cout * P)](buf, b_arr, o, p0, P, Cout, HWo, bias is not None)
    return out


def _bias_grad(grad_out: Any, B: int, Cout: int, HWo: int) -> Any:
    gb = zeros((Cout,), grad_out.dtype)
    if Cout and B * HWo:
        S = max(1, min(256, HWo))
        part = empty((Cout * S,), grad_out.dtype)
        _bias_partial[grid(Cout * S)](flat(grad_out), part, B, Cout, HWo, S)
        _bias_final[grid(Cout)](part, gb, Cout, S)
    return gb


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
    when there is no bias; mask: also when mask is None)."""
    B, Cin, H, W, Cout, cin_g, kh, kw, Hout, Wout, G, g = _geometry(input, offset, weight)
    K = kh * kw
    HWo = Hout * Wout
    dt = input.dtype
    need_in, need_off, need_w, need_b, need_m = (bool(n) for n in needs)
    need_m = need_m and mask is not None
    need_b = need_b and bias is not None
    g_in = zeros(input.shape, dt) if need_in else None
    g_off = zeros(offset.shape, dt) if need_off else None
    g_w = zeros(weight.shape, dt) if need_w else None
    g_m = zeros(mask.shape, dt) if need_m else None
    g_b = _bias_grad(grad_out, B, Cout, HWo) if need_b else None
    need_sums = need_off or need_m
    if B * Cout * HWo == 0 or H * W == 0 or not (need_in or need_sums or need_w):
        return g_in, g_off, g_w, g_b, g_m

    deterministic = need_in and are_deterministic_algorithms_enabled()
    itemsize = np.dtype(dt).itemsize
    CK = Cin * K
    need_gcol = need_in or need_sums
    per_pixel = itemsize * (Cout + CK * (int(need_gcol) + int(need_w)))
    if deterministic:  # keys, sort buffer (up to 2x, padded), order: int64; coefficients
        per_pixel += 4 * G * K * (4 * 8 + itemsize)
    NP = B * HWo
    step = _chunk_pixels(NP, per_pixel)
    dummy = flat(weight)
    idummy = empty((1,), np.int64)
    gobuf = empty((Cout * step,), dt)
    gcol = empty((CK * step,), dt) if need_gcol else dummy
    col = empty((CK * step,), dt) if need_w else dummy
    keys = empty((4 * G * K * step,), np.int64) if deterministic else idummy
    coef = empty((4 * G * K * step,), dt) if deterministic else dummy
    gout, inp, off, wgt = flat(grad_out), flat(input), flat(offset), flat(weight)
    msk = flat(mask) if mask is not None else dummy
    gin = flat(g_in) if need_in else dummy
    goff = flat(g_off) if need_off else dummy
    gmsk = flat(g_m) if need_m else dummy
    gw = flat(g_w) if need_w else dummy
    geo = (Cin, H, W, Hout, Wout, kh, kw, *stride, *padding, *dilation, G)
    cout_g = Cout // g
    kc = cin_g * K
    HW = H * W
    for n, p0 in enumerate(range(0, NP, step)):
        P = min(step, NP - p0)
        _gather[grid(Cout * P)](gout, gobuf, p0, P, Cout, HWo)
        b_first = p0 // HWo
        n_keys = ((p0 + P - 1) // HWo - b_first + 1) * G * HW
        if need_gcol:
            # gcol[group] (kc x P) = W[group]^T (kc x Cout/g) @ gobuf[group] (Cout/g x P)
            gemm(
                wgt, gobuf, gcol, kc, P, cout_g,
                view(kc, 0, cout_g * kc, transpose=True), view(P, 0, cout_g * P),
                view(P, 0, kc * P), batches=g,
            )  # fmt: skip
            _backward_points[grid(G * K * P)](
                inp, off, msk, gcol, col, gin, goff, gmsk, keys, coef, p0, P, *geo,
                mask is not None, need_in, need_off, need_m, need_w, deterministic, b_first,
                n_keys,
            )  # fmt: skip
            if deterministic:
                order, starts = segments(keys[: 4 * G * K * P], n_keys)
                _owner_input[grid(n_keys * (Cin // G))](
                    gcol, coef, order, starts, gin, P, Cin, HW, K, G, b_first, n_keys
                )
        else:
            _im2col[grid(G * K * P)](inp, off, msk, col, p0, P, *geo, mask is not None)
        if need_w:
            # grad_W[group] (Cout/g x kc) += gobuf[group] (Cout/g x P) @ col[group]^T (P x kc)
            gemm(
                gobuf, col, gw, cout_g, kc, P,
                view(P, 0, cout_g * P), view(P, 0, kc * P, transpose=True),
                view(kc, 0, cout_g * kc), batches=g, accumulate=n > 0,
            )  # fmt: skip
    return g_in, g_off, g_w, g_b, g_m
