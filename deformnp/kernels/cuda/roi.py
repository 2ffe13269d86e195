"""CUDA kernels of the RoI pooling family (SPEC sections 7 and 8), mirroring ``kernels/cpu/roi.py``.

The kernel contract is the CPU module's (the same functions and signatures; see the list at the
top of ``kernels/cpu/roi.py``). The per-RoI geometry (bins, sampling grids, starts, part and
group cells) is computed on the host by the very functions the CPU kernels use
(``kernels/roi_geometry.py``), so both devices pool exactly the same bins; only those few
numbers per RoI travel to the device. RoIs are validated on the host anyway (batch indices in
range), so ``rois`` is a host array; feature maps, offsets, outputs and gradients stay on the
device.

Threads: one per output element (k, c, ph, pw) for the forwards and the input gradients, which
are scattered with atomic adds (not bit-reproducible from run to run). The offset gradients have
one thread per offset element summing in a fixed order (deterministic).
"""

from __future__ import annotations

from typing import Any

import numpy as np
from numba import cuda

from ..roi_geometry import align_geometry, deform_ps_geometry, pool_bins
from ._launch import SIMULATOR, empty, flat, grid, zeros
from .sampling import clamp_plan, plan_value, scatter_plan


def _dev(a: np.ndarray) -> Any:
    return cuda.to_device(np.ascontiguousarray(a))


# ---------------------------------------------------------------------------- RoI Align family


@cuda.jit(device=True)
def _bin_start(fgeo, off, has_off, k, ph, pw, PH, PW):
    """(y, x) of the top-left corner of bin (ph, pw) of RoI k, shifted by its offset (deform)."""
    sy = fgeo[k * 6 + 0]
    sx = fgeo[k * 6 + 1]
    if has_off:
        sy = sy + fgeo[k * 6 + 4] * off[((k * 2 + 1) * PH + ph) * PW + pw]
        sx = sx + fgeo[k * 6 + 5] * off[((k * 2 + 0) * PH + ph) * PW + pw]
    return sy + ph * fgeo[k * 6 + 2], sx + pw * fgeo[k * 6 + 3]


@cuda.jit(cache=not SIMULATOR)
def _align_pass(plane, fgeo, igeo, off, vals, K, Cout, Cin, H, W, PH, PW, ps, has_off, scatter):
    """One thread per bin t = (k, c, ph, pw). ``scatter`` False (the forward): vals[t] = mean of
    ``plane`` (the input) over the bin's samples. ``scatter`` True (the input gradient): add
    vals[t] (grad_out) / count to ``plane`` (grad_input) at the bin's samples, atomically."""
    total = K * Cout * PH * PW
    for t in range(cuda.grid(1), total, cuda.gridsize(1)):
        pw = t % PW
        ph = (t // PW) % PH
        c = (t // (PW * PH)) % Cout
        k = t // (PW * PH * Cout)
        cin = (c * PH + ph) * PW + pw if ps else c
        gh = igeo[k * 3 + 1]
        gw = igeo[k * 3 + 2]
        bh = fgeo[k * 6 + 2]
        bw = fgeo[k * 6 + 3]
        ys, xs = _bin_start(fgeo, off, has_off, k, ph, pw, PH, PW)
        base = (igeo[k * 3] * Cin + cin) * H * W
        count = max(gh * gw, 1)
        acc = 0.0
        for iy in range(gh):
            y = ys + (iy + 0.5) * bh / gh
            for ix in range(gw):
                x = xs + (ix + 0.5) * bw / gw
                idx, w, cy, cx = clamp_plan(y, x, H, W)
                if scatter:
                    scatter_plan(plane, base, idx, w, vals[t] / count)
                else:
                    acc += plan_value(plane, base, idx, w)
        if not scatter:
            vals[t] = acc / count


@cuda.jit(cache=not SIMULATOR)
def _deform_backward_offset(gout, inp, fgeo, igeo, off, goff, K, C, H, W, PH, PW):
    """d out / d offset[k, 0|1, ph, pw] = gamma*roi_w|h / count * sum_samples sum_c g * dV/dx|y."""
    total = K * PH * PW
    for t in range(cuda.grid(1), total, cuda.gridsize(1)):
        pw = t % PW
        ph = (t // PW) % PH
        k = t // (PW * PH)
        gh = igeo[k * 3 + 1]
        gw = igeo[k * 3 + 2]
        bh = fgeo[k * 6 + 2]
        bw = fgeo[k * 6 + 3]
        ys, xs = _bin_start(fgeo, off, True, k, ph, pw, PH, PW)
        gy = 0.0
        gx = 0.0
        for iy in range(gh):
            y = ys + (iy + 0.5) * bh / gh
            for ix in range(gw):
                x = xs + (ix + 0.5) * bw / gw
                idx, w, cy, cx = clamp_plan(y, x, H, W)
                for c in range(C):
                    g = gout[((k * C + c) * PH + ph) * PW + pw]
                    base = (igeo[k * 3] * C + c) * H * W
                    gy += g * plan_value(inp, base, idx, cy)
                    gx += g * plan_value(inp, base, idx, cx)
        count = max(gh * gw, 1)
        goff[((k * 2 + 0) * PH + ph) * PW + pw] = gx * fgeo[k * 6 + 5] / count
        goff[((k * 2 + 1) * PH + ph) * PW + pw] = gy * fgeo[k * 6 + 4] / count


def _align_setup(
    mode: str,
    rois: Any,
    output_size: tuple,
    spatial_scale: float,
    sampling_ratio: int,
    aligned: bool,
    gamma: float,
) -> tuple[Any, Any]:
    fgeo, igeo = align_geometry(
        mode, rois, output_size, spatial_scale, sampling_ratio, aligned, gamma
    )
    return _dev(fgeo), _dev(igeo)


def _align_forward(
    mode: str,
    input: Any,
    rois: Any,
    offset: Any,
    output_size: tuple,
    spatial_scale: float,
    sampling_ratio: int,
    aligned: bool,
    gamma: float,
) -> Any:
    """roi_align / ps_roi_align / deform_roi_pool forward -> (K, C', PH, PW)."""
    B, Cin, H, W = (int(s) for s in input.shape)
    PH, PW = output_size
    ps = mode == "ps_roi_align"
    Cout = Cin // (PH * PW) if ps else Cin
    K = int(rois.shape[0])
    if K * Cout * PH * PW == 0 or H * W == 0:
        return zeros((K, Cout, PH, PW), input.dtype)
    fgeo, igeo = _align_setup(
        mode, rois, output_size, spatial_scale, sampling_ratio, aligned, gamma
    )
    out = empty((K, Cout, PH, PW), input.dtype)
    has_off = offset is not None
    _align_pass[grid(out.size)](
        flat(input),
        flat(fgeo),
        flat(igeo),
        flat(offset) if has_off else flat(fgeo),
        flat(out),
        K,
        Cout,
        Cin,
        H,
        W,
        PH,
        PW,
        ps,
        has_off,
        False,
    )
    return out


def _align_backward(
    mode: str,
    grad_out: Any,
    input_shape: tuple,
    input: Any,
    rois: Any,
    offset: Any,
    output_size: tuple,
    spatial_scale: float,
    sampling_ratio: int,
    aligned: bool,
    gamma: float,
    need_in: bool,
    need_off: bool,
) -> tuple:
    """(grad_input, grad_offset); the offset gradient (deform_roi_pool with an offset) needs
    ``input``'s values, the input gradient only its shape."""
    B, Cin, H, W = (int(s) for s in input_shape)
    PH, PW = output_size
    ps = mode == "ps_roi_align"
    Cout = Cin // (PH * PW) if ps else Cin
    K = int(rois.shape[0])
    has_off = offset is not None
    need_off = has_off and need_off
    g_in = zeros(tuple(input_shape), grad_out.dtype) if need_in else None
    g_off = zeros(offset.shape, offset.dtype) if need_off else None
    if K * Cout * PH * PW == 0 or H * W == 0 or not (need_in or need_off):
        return g_in, g_off
    fgeo, igeo = _align_setup(
        mode, rois, output_size, spatial_scale, sampling_ratio, aligned, gamma
    )
    off = flat(offset) if has_off else flat(fgeo)
    if need_in:
        _align_pass[grid(grad_out.size)](
            flat(g_in),
            flat(fgeo),
            flat(igeo),
            off,
            flat(grad_out),
            K,
            Cout,
            Cin,
            H,
            W,
            PH,
            PW,
            ps,
            has_off,
            True,
        )
    if need_off:
        _deform_backward_offset[grid(K * PH * PW)](
            flat(grad_out),
            flat(input),
            flat(fgeo),
            flat(igeo),
            off,
            flat(g_off),
            K,
            Cin,
            H,
            W,
            PH,
            PW,
        )
    return g_in, g_off


def roi_align_forward(input, rois, output_size, spatial_scale, sampling_ratio, aligned):
    return _align_forward(
        "roi_align", input, rois, None, output_size, spatial_scale, sampling_ratio, aligned, 0.0
    )


def roi_align_backward(
    grad_out, rois, input_shape, output_size, spatial_scale, sampling_ratio, aligned, needs
):
    g_in, _ = _align_backward(
        "roi_align", grad_out, input_shape, None, rois, None, output_size, spatial_scale,
        sampling_ratio, aligned, 0.0, needs[0], False,
    )  # fmt: skip
    return (g_in,)


def ps_roi_align_forward(input, rois, output_size, spatial_scale, sampling_ratio):
    return _align_forward(
        "ps_roi_align", input, rois, None, output_size, spatial_scale, sampling_ratio, True, 0.0
    )


def ps_roi_align_backward(grad_out, rois, input_shape, output_size, spatial_scale, sampling_ratio, needs):  # fmt: skip
    g_in, _ = _align_backward(
        "ps_roi_align", grad_out, input_shape, None, rois, None, output_size, spatial_scale,
        sampling_ratio, True, 0.0, needs[0], False,
    )  # fmt: skip
    return (g_in,)


def deform_roi_pool_forward(input, rois, offset, output_size, spatial_scale, sampling_ratio, gamma):
    return _align_forward(
        "deform_roi_pool", input, rois, offset, output_size, spatial_scale, sampling_ratio, True,
        gamma,
    )  # fmt: skip


def deform_roi_pool_backward(
    grad_out, input, rois, offset, output_size, spatial_scale, sampling_ratio, gamma, needs
):
    return _align_backward(
        "deform_roi_pool", grad_out, input.shape, input, rois, offset, output_size,
        spatial_scale, sampling_ratio, True, gamma, needs[0], needs[1],
    )  # fmt: skip


# ---------------------------------------------------------------------------- RoI Pool family


@cuda.jit(cache=not SIMULATOR)
def _pool_forward(inp, batch, hs, he, ws, we, out, argmax, K, Cout, Cin, H, W, PH, PW, ps):
    total = K * Cout * PH * PW
    for t in range(cuda.grid(1), total, cuda.gridsize(1)):
        pw = t % PW
        ph = (t // PW) % PH
        c = (t // (PW * PH)) % Cout
        k = t // (PW * PH * Cout)
        cin = (c * PH + ph) * PW + pw if ps else c
        h0 = hs[k * PH + ph]
        h1 = he[k * PH + ph]
        w0 = ws[k * PW + pw]
        w1 = we[k * PW + pw]
        base = (batch[k] * Cin + cin) * H * W
        if h1 <= h0 or w1 <= w0:  # empty bin: 0 and no gradient
            out[t] = 0.0
            if not ps:
                argmax[t] = -1
            continue
        if ps:  # average over the bin
            acc = 0.0
            for h in range(h0, h1):
                for w in range(w0, w1):
                    acc += inp[base + h * W + w]
            out[t] = acc / ((h1 - h0) * (w1 - w0))
        else:  # max; the first maximum in row-major order wins, and so does the first NaN
            best = h0 * W + w0
            m = inp[base + best]
            for h in range(h0, h1):
                for w in range(w0, w1):
                    v = inp[base + h * W + w]
                    if v > m or (v != v and m == m):
                        m = v
                        best = h * W + w
            out[t] = m
            argmax[t] = best


@cuda.jit(cache=not SIMULATOR)
def _pool_backward(gout, batch, hs, he, ws, we, argmax, gin, K, Cout, Cin, H, W, PH, PW, ps):
    total = K * Cout * PH * PW
    for t in range(cuda.grid(1), total, cuda.gridsize(1)):
        pw = t % PW
        ph = (t // PW) % PH
        c = (t // (PW * PH)) % Cout
        k = t // (PW * PH * Cout)
        cin = (c * PH + ph) * PW + pw if ps else c
        base = (batch[k] * Cin + cin) * H * W
        if ps:
            h0 = hs[k * PH + ph]
            h1 = he[k * PH + ph]
            w0 = ws[k * PW + pw]
            w1 = we[k * PW + pw]
            if h1 > h0 and w1 > w0:
                g = gout[t] / ((h1 - h0) * (w1 - w0))
                for h in range(h0, h1):
                    for w in range(w0, w1):
                        cuda.atomic.add(gin, base + h * W + w, g)
        elif argmax[t] >= 0:
            cuda.atomic.add(gin, base + argmax[t], gout[t])


def _pool_setup(
    mode: str, rois: Any, output_size: tuple, spatial_scale: float, H: int, W: int, dtype: Any
) -> tuple:
    batch, hs, he, ws, we = pool_bins(mode, rois, output_size, spatial_scale, H, W, dtype)
    return tuple(_dev(a) for a in (batch, hs, he, ws, we))


def _pool_forward_api(
    mode: str, input: Any, rois: Any, output_size: tuple, spatial_scale: float
) -> tuple[Any, Any]:
    """roi_pool -> (out, argmax) with argmax int64 flat plane indices (-1: empty bin);
    ps_roi_pool -> (out, None)."""
    B, Cin, H, W = (int(s) for s in input.shape)
    PH, PW = output_size
    ps = mode == "ps_roi_pool"
    Cout = Cin // (PH * PW) if ps else Cin
    K = int(rois.shape[0])
    if K * Cout * PH * PW == 0 or H * W == 0:
        out = zeros((K, Cout, PH, PW), input.dtype)
        return out, (None if ps else _dev(np.full(out.shape, -1, np.int64)))
    bins = _pool_setup(mode, rois, output_size, spatial_scale, H, W, input.dtype)
    out = empty((K, Cout, PH, PW), input.dtype)
    argmax = empty((K, Cout, PH, PW), np.int64) if not ps else empty((1,), np.int64)
    _pool_forward[grid(out.size)](
        flat(input),
        *(flat(b) for b in bins),
        flat(out),
        flat(argmax),
        K,
        Cout,
        Cin,
        H,
        W,
        PH,
        PW,
        ps,
    )
    return out, (None if ps else argmax)


def _pool_backward_api(
    mode: str,
    grad_out: Any,
    input_shape: tuple,
    dtype: Any,
    rois: Any,
    argmax: Any,
    output_size: tuple,
    spatial_scale: float,
) -> Any:
    """Gradient of roi_pool (to each bin's argmax) or ps_roi_pool (spread over the bin)."""
    B, Cin, H, W = (int(s) for s in input_shape)
    PH, PW = output_size
    ps = mode == "ps_roi_pool"
    Cout = Cin // (PH * PW) if ps else Cin
    K = int(rois.shape[0])
    g_in = zeros(tuple(input_shape), dtype)
    if K * Cout * PH * PW == 0 or H * W == 0:
        return g_in
    bins = _pool_setup(mode, rois, output_size, spatial_scale, H, W, dtype)
    am = flat(argmax) if argmax is not None else flat(bins[0])
    _pool_backward[grid(grad_out.size)](
        flat(grad_out), *(flat(b) for b in bins), am, flat(g_in), K, Cout, Cin, H, W, PH, PW, ps
    )
    return g_in


def roi_pool_forward(input, rois, output_size, spatial_scale):
    """(out, argmax) with argmax int64 flat plane indices (-1: empty bin)."""
    return _pool_forward_api("roi_pool", input, rois, output_size, spatial_scale)


def roi_pool_backward(grad_out, rois, argmax, input_shape, output_size, spatial_scale, needs):
    if not needs[0]:
        return (None,)
    return (
        _pool_backward_api(
            "roi_pool", grad_out, input_shape, grad_out.dtype, rois, argmax, output_size,
            spatial_scale,
        ),
    )  # fmt: skip


def ps_roi_pool_forward(input, rois, output_size, spatial_scale):
    return _pool_forward_api("ps_roi_pool", input, rois, output_size, spatial_scale)[0]


def ps_roi_pool_backward(grad_out, rois, input_shape, output_size, spatial_scale, needs):
    if not needs[0]:
        return (None,)
    return (
        _pool_backward_api(
            "ps_roi_pool", grad_out, input_shape, grad_out.dtype, rois, None, output_size,
            spatial_scale,
        ),
    )  # fmt: skip


# ---------------------------------------------------------------------------- deformable PS


@cuda.jit(device=True)
def _dps_bin(fgeo, part, off, has_off, trans_std, k, cls, ph, pw, ncls, PS, P):
    """(hstart, wstart) of bin (ph, pw) of class cls of RoI k (Deformable-ConvNets, SPEC 8)."""
    tx = 0.0
    ty = 0.0
    if has_off:
        o = ((k * 2 * ncls + 2 * cls) * PS + part[ph]) * PS + part[pw]
        tx = off[o] * trans_std
        ty = off[o + PS * PS] * trans_std
    hstart = ph * fgeo[k * 8 + 2] + fgeo[k * 8 + 0]
    hstart += ty * fgeo[k * 8 + 6]
    wstart = pw * fgeo[k * 8 + 3] + fgeo[k * 8 + 1]
    wstart += tx * fgeo[k * 8 + 7]
    return hstart, wstart


@cuda.jit(device=True)
def _dps_sample(fgeo, k, hstart, wstart, ih, iw, H, W):
    """Sample (ih, iw) of a bin: (valid, h, w); samples outside [-0.5, size - 0.5] are skipped,
    the others clamped and interpolated, which is ``clamp_plan`` on that range."""
    w = wstart + iw * fgeo[k * 8 + 5]
    h = hstart + ih * fgeo[k * 8 + 4]
    valid = w >= -0.5 and w <= W - 0.5 and h >= -0.5 and h <= H - 0.5
    return valid, h, w


@cuda.jit(cache=not SIMULATOR)
def _dps_forward(
    inp,
    fgeo,
    batch,
    part,
    group,
    off,
    out,
    K,
    D,
    C,
    H,
    W,
    P,
    PS,
    gs,
    spp,
    ncls,
    trans_std,
    has_off,
    gin_mode,
    gout,
):
    """Forward (gin_mode False: out[t] = mean of the valid samples) or the input gradient
    (gin_mode True: scatter gout[t] / n into ``out`` = grad_input, atomically)."""
    cec = D // ncls
    total = K * D * P * P
    for t in range(cuda.grid(1), total, cuda.gridsize(1)):
        pw = t % P
        ph = (t // P) % P
        co = (t // (P * P)) % D
        k = t // (P * P * D)
        cls = co // cec
        cin = (co * gs + group[ph]) * gs + group[pw]
        base = (batch[k] * C + cin) * H * W
        hstart, wstart = _dps_bin(fgeo, part, off, has_off, trans_std, k, cls, ph, pw, ncls, PS, P)
        n = 0
        acc = 0.0
        for ih in range(spp):
            for iw in range(spp):
                valid, h, w = _dps_sample(fgeo, k, hstart, wstart, ih, iw, H, W)
                if valid:
                    n += 1
                    if not gin_mode:
                        idx, wt, cy, cx = clamp_plan(h, w, H, W)
                        acc += plan_value(inp, base, idx, wt)
        if not gin_mode:
            out[t] = acc / n if n > 0 else 0.0
        elif n > 0:
            g = gout[t] / n
            for ih in range(spp):
                for iw in range(spp):
                    valid, h, w = _dps_sample(fgeo, k, hstart, wstart, ih, iw, H, W)
                    if valid:
                        idx, wt, cy, cx = clamp_plan(h, w, H, W)
                        scatter_plan(out, base, idx, wt, g)


@cuda.jit(cache=not SIMULATOR)
def _dps_backward_offset(
    gout, inp, fgeo, batch, part, group, off, goff, K, D, C, H, W, P, PS, gs, spp, ncls, trans_std
):
    """One thread per offset cell (k, cls, part row, part col) sums, in a fixed order, over the
    bins that read it and the output channels of its class."""
    cec = D // ncls
    total = K * ncls * PS * PS
    for t in range(cuda.grid(1), total, cuda.gridsize(1)):
        qw = t % PS
        qh = (t // PS) % PS
        cls = (t // (PS * PS)) % ncls
        k = t // (PS * PS * ncls)
        gy = 0.0
        gx = 0.0
        for ph in range(P):
            if part[ph] != qh:
                continue
            for pw in range(P):
                if part[pw] != qw:
                    continue
                hstart, wstart = _dps_bin(
                    fgeo, part, off, True, trans_std, k, cls, ph, pw, ncls, PS, P
                )
                n = 0
                for ih in range(spp):
                    for iw in range(spp):
                        valid, h, w = _dps_sample(fgeo, k, hstart, wstart, ih, iw, H, W)
                        if valid:
                            n += 1
                if n == 0:
                    continue
                for co in range(cls * cec, (cls + 1) * cec):
                    g = gout[((k * D + co) * P + ph) * P + pw] / n
                    base = (batch[k] * C + (co * gs + group[ph]) * gs + group[pw]) * H * W
                    for ih in range(spp):
                        for iw in range(spp):
                            valid, h, w = _dps_sample(fgeo, k, hstart, wstart, ih, iw, H, W)
                            if valid:
                                idx, wt, cy, cx = clamp_plan(h, w, H, W)
                                gy += g * plan_value(inp, base, idx, cy)
                                gx += g * plan_value(inp, base, idx, cx)
        o = ((k * 2 * ncls + 2 * cls) * PS + qh) * PS + qw
        goff[o] = gx * trans_std * fgeo[k * 8 + 7]
        goff[o + PS * PS] = gy * trans_std * fgeo[k * 8 + 6]


def _dps_setup(
    input: Any,
    rois: Any,
    offset: Any,
    spatial_scale: float,
    output_dim: int,
    group_size: int,
    pooled_size: int,
    part_size: int,
    sample_per_part: int,
) -> tuple:
    fgeo, batch, part, group = deform_ps_geometry(
        rois,
        spatial_scale,
        group_size,
        pooled_size,
        part_size,
        sample_per_part,
        input.dtype,
    )
    ncls = int(offset.shape[1]) // 2 if offset is not None else 1
    return (_dev(fgeo), _dev(batch), _dev(part), _dev(group)), ncls


def deform_ps_roi_pool_forward(
    input: Any,
    rois: Any,
    offset: Any,
    spatial_scale: float,
    output_dim: int,
    group_size: int,
    pooled_size: int,
    part_size: int,
    sample_per_part: int,
    trans_std: float,
) -> Any:
    """deform_ps_roi_pool forward -> (K, output_dim, pooled_size, pooled_size)."""
    B, C, H, W = (int(s) for s in input.shape)
    K, P = int(rois.shape[0]), pooled_size
    if K * output_dim * P * P == 0 or H * W == 0:
        return zeros((K, output_dim, P, P), input.dtype)
    geo, ncls = _dps_setup(
        input, rois, offset, spatial_scale, output_dim, group_size, P, part_size, sample_per_part
    )
    out = empty((K, output_dim, P, P), input.dtype)
    has_off = offset is not None
    _dps_forward[grid(out.size)](
        flat(input),
        *(flat(a) for a in geo),
        flat(offset) if has_off else flat(geo[0]),
        flat(out),
        K,
        output_dim,
        C,
        H,
        W,
        P,
        part_size,
        group_size,
        sample_per_part,
        ncls,
        float(trans_std),
        has_off,
        False,
        flat(out),
    )
    return out


def deform_ps_roi_pool_backward(
    grad_out: Any,
    input: Any,
    rois: Any,
    offset: Any,
    spatial_scale: float,
    output_dim: int,
    group_size: int,
    pooled_size: int,
    part_size: int,
    sample_per_part: int,
    trans_std: float,
    needs: tuple,
) -> tuple:
    """(grad_input, grad_offset) of deform_ps_roi_pool; grad_offset None without an offset."""
    B, C, H, W = (int(s) for s in input.shape)
    K, P = int(rois.shape[0]), pooled_size
    has_off = offset is not None
    need_off = has_off and bool(needs[1])
    g_in = zeros(input.shape, input.dtype) if needs[0] else None
    g_off = zeros(offset.shape, offset.dtype) if need_off else None
    if K * output_dim * P * P == 0 or H * W == 0 or not (needs[0] or need_off):
        return g_in, g_off
    geo, ncls = _dps_setup(
        input, rois, offset, spatial_scale, output_dim, group_size, P, part_size, sample_per_part
    )
    off = flat(offset) if has_off else flat(geo[0])
    if needs[0]:
        _dps_forward[grid(grad_out.size)](
            flat(input),
            *(flat(a) for a in geo),
            off,
            flat(g_in),
            K,
            output_dim,
            C,
            H,
            W,
            P,
            part_size,
            group_size,
            sample_per_part,
            ncls,
            float(trans_std),
            has_off,
            True,
            flat(grad_out),
        )
    if need_off:
        _dps_backward_offset[grid(K * ncls * part_size * part_size)](
            flat(grad_out),
            flat(input),
            *(flat(a) for a in geo),
            off,
            flat(g_off),
            K,
            output_dim,
            C,
            H,
            W,
            P,
            part_size,
            group_size,
            sample_per_part,
            ncls,
            float(trans_std),
        )
    return g_in, g_off
