"""CUDA kernels of the RoI pooling family (SPEC sections 7 and 8), mirroring ``kernels/cpu/roi.py``.

``rois`` is always the (K, 5) array (batch_index, x1, y1, x2, y2), validated on the host.
One thread per output element (k, c, ph, pw) for the forwards and for the input gradients, which
are scattered with atomic adds (not bit-reproducible). The offset gradient of ``deform_roi_pool``
has one thread per (k, ph, pw) that sums over the channels in a fixed order (deterministic).

The RoI Align-like ops share one kernel, ``mode``: 0 roi_align, 1 ps_roi_align, 2 deform_roi_pool.
"""

from __future__ import annotations

import math
from typing import Any

from numba import cuda

from ._launch import SIMULATOR, empty, flat, grid, zeros
from .bilinear import clamp_plan, plan_value, scatter_plan

MODES = {"roi_align": 0, "ps_roi_align": 1, "deform_roi_pool": 2}


@cuda.jit(device=True)
def c_round(v):
    """C's round: half away from zero."""
    if v >= 0.0:
        return math.floor(v + 0.5)
    return -math.floor(-v + 0.5)


# ---------------------------------------------------------------------------- RoI Align family


@cuda.jit(device=True)
def align_bin(rois, off, k, ph, pw, PH, PW, scale, sampling_ratio, aligned, gamma, mode, has_off):
    """Geometry of bin (ph, pw) of RoI k: (y_start, x_start, bin_h, bin_w, gh, gw, roi_h, roi_w)."""
    r = k * 5
    o = 0.5 if (aligned or mode != 0) else 0.0
    x1 = rois[r + 1] * scale - o
    y1 = rois[r + 2] * scale - o
    x2 = rois[r + 3] * scale - o
    y2 = rois[r + 4] * scale - o
    roi_w = x2 - x1
    roi_h = y2 - y1
    if mode == 0 and not aligned:
        roi_w = max(roi_w, 1.0)
        roi_h = max(roi_h, 1.0)
    bin_h = roi_h / PH
    bin_w = roi_w / PW
    if sampling_ratio > 0:
        gh = sampling_ratio
        gw = sampling_ratio
    else:
        gh = int(math.ceil(roi_h / PH))
        gw = int(math.ceil(roi_w / PW))
    ys = y1 + ph * bin_h
    xs = x1 + pw * bin_w
    if mode == 2 and has_off:
        xs += gamma * roi_w * off[((k * 2 + 0) * PH + ph) * PW + pw]
        ys += gamma * roi_h * off[((k * 2 + 1) * PH + ph) * PW + pw]
    return ys, xs, bin_h, bin_w, gh, gw, roi_h, roi_w


@cuda.jit(cache=not SIMULATOR)
def _align_forward(
    inp,
    rois,
    off,
    out,
    K,
    Cout,
    Cin,
    H,
    W,
    PH,
    PW,
    scale,
    sampling_ratio,
    aligned,
    gamma,
    mode,
    has_off,
):
    total = K * Cout * PH * PW
    for t in range(cuda.grid(1), total, cuda.gridsize(1)):
        pw = t % PW
        ph = (t // PW) % PH
        c = (t // (PW * PH)) % Cout
        k = t // (PW * PH * Cout)
        b = int(rois[k * 5])
        cin = (c * PH + ph) * PW + pw if mode == 1 else c
        ys, xs, bh, bw, gh, gw, rh, rw = align_bin(
            rois, off, k, ph, pw, PH, PW, scale, sampling_ratio, aligned, gamma, mode, has_off
        )
        base = (b * Cin + cin) * H * W
        acc = 0.0
        for iy in range(gh):
            y = ys + (iy + 0.5) * bh / gh
            for ix in range(gw):
                x = xs + (ix + 0.5) * bw / gw
                idx, w, cy, cx = clamp_plan(y, x, H, W)
                acc += plan_value(inp, base, idx, w)
        out[t] = acc / max(gh * gw, 1)


@cuda.jit(cache=not SIMULATOR)
def _align_backward_input(
    gout,
    rois,
    off,
    gin,
    K,
    Cout,
    Cin,
    H,
    W,
    PH,
    PW,
    scale,
    sampling_ratio,
    aligned,
    gamma,
    mode,
    has_off,
):
    total = K * Cout * PH * PW
    for t in range(cuda.grid(1), total, cuda.gridsize(1)):
        pw = t % PW
        ph = (t // PW) % PH
        c = (t // (PW * PH)) % Cout
        k = t // (PW * PH * Cout)
        b = int(rois[k * 5])
        cin = (c * PH + ph) * PW + pw if mode == 1 else c
        ys, xs, bh, bw, gh, gw, rh, rw = align_bin(
            rois, off, k, ph, pw, PH, PW, scale, sampling_ratio, aligned, gamma, mode, has_off
        )
        g = gout[t] / max(gh * gw, 1)
        base = (b * Cin + cin) * H * W
        for iy in range(gh):
            y = ys + (iy + 0.5) * bh / gh
            for ix in range(gw):
                x = xs + (ix + 0.5) * bw / gw
                idx, w, cy, cx = clamp_plan(y, x, H, W)
                scatter_plan(gin, base, idx, w, g)


@cuda.jit(cache=not SIMULATOR)
def _deform_backward_offset(
    gout, inp, rois, off, goff, K, C, H, W, PH, PW, scale, sampling_ratio, gamma
):
    total = K * PH * PW
    for t in range(cuda.grid(1), total, cuda.gridsize(1)):
        pw = t % PW
        ph = (t // PW) % PH
        k = t // (PW * PH)
        b = int(rois[k * 5])
        ys, xs, bh, bw, gh, gw, rh, rw = align_bin(
            rois, off, k, ph, pw, PH, PW, scale, sampling_ratio, True, gamma, 2, True
        )
        count = max(gh * gw, 1)
        gy = 0.0
        gx = 0.0
        for iy in range(gh):
            y = ys + (iy + 0.5) * bh / gh
            for ix in range(gw):
                x = xs + (ix + 0.5) * bw / gw
                idx, w, cy, cx = clamp_plan(y, x, H, W)
                for c in range(C):
                    g = gout[((k * C + c) * PH + ph) * PW + pw]
                    base = (b * C + c) * H * W
                    gy += g * plan_value(inp, base, idx, cy)
                    gx += g * plan_value(inp, base, idx, cx)
        goff[((k * 2 + 0) * PH + ph) * PW + pw] = gamma * rw * gx / count
        goff[((k * 2 + 1) * PH + ph) * PW + pw] = gamma * rh * gy / count


def align_forward(
    mode: str,
    input: Any,
    rois: Any,
    offset: Any,
    output_size: tuple,
    spatial_scale: float,
    sampling_ratio: int,
    aligned: bool,
    gamma: float = 0.0,
) -> Any:
    B, Cin, H, W = (int(s) for s in input.shape)
    PH, PW = output_size
    m = MODES[mode]
    Cout = Cin // (PH * PW) if m == 1 else Cin
    K = int(rois.shape[0])
    if H * W == 0:
        return zeros((K, Cout, PH, PW), input.dtype)
    out = empty((K, Cout, PH, PW), input.dtype)
    if out.size:
        has_off = offset is not None
        _align_forward[grid(out.size)](
            flat(input),
            flat(rois),
            flat(offset) if has_off else flat(rois),
            flat(out),
            K,
            Cout,
            Cin,
            H,
            W,
            PH,
            PW,
            float(spatial_scale),
            int(sampling_ratio),
            bool(aligned),
            float(gamma),
            m,
            has_off,
        )
    return out


def align_backward(
    mode: str,
    grad_out: Any,
    input: Any,
    rois: Any,
    offset: Any,
    output_size: tuple,
    spatial_scale: float,
    sampling_ratio: int,
    aligned: bool,
    gamma: float = 0.0,
    needs: tuple = (True, True),
) -> tuple:
    """(grad_input, grad_offset); grad_offset only for deform_roi_pool with an offset."""
    B, Cin, H, W = (int(s) for s in input.shape)
    PH, PW = output_size
    m = MODES[mode]
    Cout = Cin // (PH * PW) if m == 1 else Cin
    K = int(rois.shape[0])
    has_off = offset is not None
    g_in = g_off = None
    if needs[0]:
        g_in = zeros(input.shape, input.dtype)
        if grad_out.size and H * W:
            _align_backward_input[grid(grad_out.size)](
                flat(grad_out),
                flat(rois),
                flat(offset) if has_off else flat(rois),
                flat(g_in),
                K,
                Cout,
                Cin,
                H,
                W,
                PH,
                PW,
                float(spatial_scale),
                int(sampling_ratio),
                bool(aligned),
                float(gamma),
                m,
                has_off,
            )
    if has_off and len(needs) > 1 and needs[1]:
        g_off = zeros(offset.shape, offset.dtype)
        if K * PH * PW and H * W:
            _deform_backward_offset[grid(K * PH * PW)](
                flat(grad_out),
                flat(input),
                flat(rois),
                flat(offset),
                flat(g_off),
                K,
                Cin,
                H,
                W,
                PH,
                PW,
                float(spatial_scale),
                int(sampling_ratio),
                float(gamma),
            )
    return g_in, g_off


# ---------------------------------------------------------------------------- RoI Pool family


@cuda.jit(device=True)
def pool_bin(rois, k, ph, pw, PH, PW, H, W, scale, ps):
    """Bin (ph, pw) of RoI k as [hstart, hend) x [wstart, wend), clipped to [0, H] x [0, W]."""
    r = k * 5
    sw = c_round(rois[r + 1] * scale)
    sh = c_round(rois[r + 2] * scale)
    ew = c_round(rois[r + 3] * scale)
    eh = c_round(rois[r + 4] * scale)
    extra = 0 if ps else 1
    roi_w = max(ew - sw + extra, 1)
    roi_h = max(eh - sh + extra, 1)
    bin_h = roi_h / PH
    bin_w = roi_w / PW
    hs = min(max(int(math.floor(ph * bin_h)) + sh, 0), H)
    he = min(max(int(math.ceil((ph + 1) * bin_h)) + sh, 0), H)
    ws = min(max(int(math.floor(pw * bin_w)) + sw, 0), W)
    we = min(max(int(math.ceil((pw + 1) * bin_w)) + sw, 0), W)
    return hs, he, ws, we


@cuda.jit(cache=not SIMULATOR)
def _pool_forward(inp, rois, out, argmax, K, Cout, Cin, H, W, PH, PW, scale, ps):
    total = K * Cout * PH * PW
    for t in range(cuda.grid(1), total, cuda.gridsize(1)):
        pw = t % PW
        ph = (t // PW) % PH
        c = (t // (PW * PH)) % Cout
        k = t // (PW * PH * Cout)
        b = int(rois[k * 5])
        cin = (c * PH + ph) * PW + pw if ps else c
        hs, he, ws, we = pool_bin(rois, k, ph, pw, PH, PW, H, W, scale, ps)
        base = (b * Cin + cin) * H * W
        empty_bin = he <= hs or we <= ws
        if ps:
            acc = 0.0
            for h in range(hs, he):
                for w in range(ws, we):
                    acc += inp[base + h * W + w]
            out[t] = 0.0 if empty_bin else acc / ((he - hs) * (we - ws))
        else:
            best = -1
            val = 0.0
            for h in range(hs, he):
                for w in range(ws, we):
                    v = inp[base + h * W + w]
                    if best < 0 or v > val:
                        val = v
                        best = h * W + w
            out[t] = val
            argmax[t] = best


@cuda.jit(cache=not SIMULATOR)
def _pool_backward(gout, rois, argmax, gin, K, Cout, Cin, H, W, PH, PW, scale, ps):
    total = K * Cout * PH * PW
    for t in range(cuda.grid(1), total, cuda.gridsize(1)):
        pw = t % PW
        ph = (t // PW) % PH
        c = (t // (PW * PH)) % Cout
        k = t // (PW * PH * Cout)
        b = int(rois[k * 5])
        cin = (c * PH + ph) * PW + pw if ps else c
        base = (b * Cin + cin) * H * W
        if ps:
            hs, he, ws, we = pool_bin(rois, k, ph, pw, PH, PW, H, W, scale, ps)
            if he > hs and we > ws:
                g = gout[t] / ((he - hs) * (we - ws))
                for h in range(hs, he):
                    for w in range(ws, we):
                        cuda.atomic.add(gin, base + h * W + w, g)
        elif argmax[t] >= 0:
            cuda.atomic.add(gin, base + argmax[t], gout[t])


def pool_forward(
    mode: str, input: Any, rois: Any, output_size: tuple, spatial_scale: float
) -> tuple[Any, Any]:
    """roi_pool (mode "roi_pool") or ps_roi_pool: returns (output, argmax); argmax is int64."""
    B, Cin, H, W = (int(s) for s in input.shape)
    PH, PW = output_size
    ps = mode == "ps_roi_pool"
    Cout = Cin // (PH * PW) if ps else Cin
    K = int(rois.shape[0])
    out = empty((K, Cout, PH, PW), input.dtype)
    argmax = empty((K, Cout, PH, PW), "int64")
    if out.size:
        _pool_forward[grid(out.size)](
            flat(input),
            flat(rois),
            flat(out),
            flat(argmax),
            K,
            Cout,
            Cin,
            H,
            W,
            PH,
            PW,
            float(spatial_scale),
            ps,
        )
    return out, argmax


def pool_backward(
    mode: str,
    grad_out: Any,
    input_shape: tuple,
    dtype: Any,
    rois: Any,
    argmax: Any,
    output_size: tuple,
    spatial_scale: float,
) -> Any:
    B, Cin, H, W = (int(s) for s in input_shape)
    PH, PW = output_size
    ps = mode == "ps_roi_pool"
    Cout = Cin // (PH * PW) if ps else Cin
    K = int(rois.shape[0])
    g_in = zeros(tuple(input_shape), dtype)
    if grad_out.size:
        _pool_backward[grid(grad_out.size)](
            flat(grad_out),
            flat(rois),
            flat(argmax),
            flat(g_in),
            K,
            Cout,
            Cin,
            H,
            W,
            PH,
            PW,
            float(spatial_scale),
            ps,
        )
    return g_in
