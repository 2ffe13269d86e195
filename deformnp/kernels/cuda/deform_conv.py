"""CUDA kernels of ``deform_conv2d`` (SPEC section 6), mirroring ``kernels/cpu/deform_conv.py``.

Direct (no im2col buffer) formulation, one thread per output element:

    out[b, co, oy, ox] = bias[co] + sum_{c in group(co), k=(i, j)} W[co, c_l, i, j] * m * V_c(y, x)
    y = oy*sh - ph + i*dh + dy,  x = ox*sw - pw + j*dw + dx   (zero-fade rule)

Backward: one thread per (b, offset group, k, oy, ox) owns that point's offset and mask gradients
(deterministic) and scatters the input gradient with atomic adds (not bit-reproducible); one
thread per weight element sums its gradient over (b, oy, ox) in a fixed order (deterministic).
"""

from __future__ import annotations

from typing import Any

from numba import cuda

from ._launch import SIMULATOR, empty, flat, grid, zeros
from .sampling import plan_value, scatter_plan, zero_fade_plan


@cuda.jit(cache=not SIMULATOR)
def _forward(
    inp,
    off,
    msk,
    wgt,
    bias,
    out,
    B,
    Cin,
    H,
    W,
    Cout,
    Hout,
    Wout,
    kh,
    kw,
    sh,
    sw,
    ph,
    pw,
    dh,
    dw,
    g,
    G,
    has_mask,
    has_bias,
):
    K = kh * kw
    cin_g = Cin // g
    cout_g = Cout // g
    c_per_og = Cin // G
    total = B * Cout * Hout * Wout
    for t in range(cuda.grid(1), total, cuda.gridsize(1)):
        ox = t % Wout
        oy = (t // Wout) % Hout
        co = (t // (Hout * Wout)) % Cout
        b = t // (Cout * Hout * Wout)
        grp = co // cout_g
        acc = 0.0
        for cl in range(cin_g if H * W > 0 else 0):  # an empty map samples nothing
            c = grp * cin_g + cl
            og = c // c_per_og
            base = (b * Cin + c) * H * W
            for k in range(K):
                i = k // kw
                j = k % kw
                o = ((b * 2 * G * K + 2 * (og * K + k)) * Hout + oy) * Wout + ox
                y = oy * sh - ph + i * dh + off[o]
                x = ox * sw - pw + j * dw + off[o + Hout * Wout]
                m = 1.0
                if has_mask:
                    m = msk[((b * G * K + og * K + k) * Hout + oy) * Wout + ox]
                idx, w, cy, cx = zero_fade_plan(y, x, H, W)
                acc += wgt[(co * cin_g + cl) * K + k] * m * plan_value(inp, base, idx, w)
        if has_bias:
            acc += bias[co]
        out[t] = acc


@cuda.jit(cache=not SIMULATOR)
def _backward_points(
    gout,
    inp,
    off,
    msk,
    wgt,
    gin,
    goff,
    gmsk,
    B,
    Cin,
    H,
    W,
    Cout,
    Hout,
    Wout,
    kh,
    kw,
    sh,
    sw,
    ph,
    pw,
    dh,
    dw,
    g,
    G,
    has_mask,
    need_input,
):
    K = kh * kw
    cin_g = Cin // g
    cout_g = Cout // g
    c_per_og = Cin // G
    HW = Hout * Wout
    total = B * G * K * HW
    for t in range(cuda.grid(1), total, cuda.gridsize(1)):
        ox = t % Wout
        oy = (t // Wout) % Hout
        k = (t // HW) % K
        og = (t // (K * HW)) % G
        b = t // (G * K * HW)
        i = k // kw
        j = k % kw
        o = ((b * 2 * G * K + 2 * (og * K + k)) * Hout + oy) * Wout + ox
        y = oy * sh - ph + i * dh + off[o]
        x = ox * sw - pw + j * dw + off[o + HW]
        m = 1.0
        mi = ((b * G * K + og * K + k) * Hout + oy) * Wout + ox
        if has_mask:
            m = msk[mi]
        idx, w, cy, cx = zero_fade_plan(y, x, H, W)
        gy = 0.0
        gx = 0.0
        gm = 0.0
        for c in range(og * c_per_og, (og + 1) * c_per_og):
            grp = c // cin_g
            cl = c - grp * cin_g
            gcol = 0.0  # d loss / d (m * V_c(y, x)) summed over the output channels reading c
            for co in range(grp * cout_g, (grp + 1) * cout_g):
                gcol += (
                    wgt[(co * cin_g + cl) * K + k] * gout[((b * Cout + co) * Hout + oy) * Wout + ox]
                )
            base = (b * Cin + c) * H * W
            if need_input:
                scatter_plan(gin, base, idx, w, gcol * m)
            gy += gcol * plan_value(inp, base, idx, cy)
            gx += gcol * plan_value(inp, base, idx, cx)
            gm += gcol * plan_value(inp, base, idx, w)
        goff[o] = gy * m
        goff[o + HW] = gx * m
        if has_mask:
            gmsk[mi] = gm


@cuda.jit(cache=not SIMULATOR)
def _backward_weight(
    gout,
    inp,
    off,
    msk,
    gw,
    B,
    Cin,
    H,
    W,
    Cout,
    Hout,
    Wout,
    kh,
    kw,
    sh,
    sw,
    ph,
    pw,
    dh,
    dw,
    g,
    G,
    has_mask,
):
    K = kh * kw
    cin_g = Cin // g
    cout_g = Cout // g
    c_per_og = Cin // G
    HW = Hout * Wout
    total = Cout * cin_g * K
    for t in range(cuda.grid(1), total, cuda.gridsize(1)):
        k = t % K
        cl = (t // K) % cin_g
        co = t // (K * cin_g)
        c = (co // cout_g) * cin_g + cl
        og = c // c_per_og
        i = k // kw
        j = k % kw
        acc = 0.0
        for b in range(B):
            base = (b * Cin + c) * H * W
            for q in range(HW):
                oy = q // Wout
                ox = q % Wout
                o = ((b * 2 * G * K + 2 * (og * K + k)) * Hout + oy) * Wout + ox
                y = oy * sh - ph + i * dh + off[o]
                x = ox * sw - pw + j * dw + off[o + HW]
                m = 1.0
                if has_mask:
                    m = msk[((b * G * K + og * K + k) * Hout + oy) * Wout + ox]
                idx, w, cy, cx = zero_fade_plan(y, x, H, W)
                acc += gout[(b * Cout + co) * HW + q] * m * plan_value(inp, base, idx, w)
        gw[t] = acc


@cuda.jit(cache=not SIMULATOR)
def _backward_bias(gout, gb, B, Cout, HW):
    for co in range(cuda.grid(1), Cout, cuda.gridsize(1)):
        acc = 0.0
        for b in range(B):
            for q in range(HW):
                acc += gout[(b * Cout + co) * HW + q]
        gb[co] = acc


def _geometry(
    input: Any, offset: Any, weight: Any, stride: tuple, padding: tuple, dilation: tuple
) -> tuple:
    B, Cin, H, W = (int(s) for s in input.shape)
    Cout, cin_g, kh, kw = (int(s) for s in weight.shape)
    Hout, Wout = int(offset.shape[2]), int(offset.shape[3])
    G = int(offset.shape[1]) // (2 * kh * kw)
    g = Cin // cin_g
    return (
        B,
        Cin,
        H,
        W,
        Cout,
        Hout,
        Wout,
        kh,
        kw,
        stride[0],
        stride[1],
        padding[0],
        padding[1],
        dilation[0],
        dilation[1],
        g,
        G,
    )


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
    geo = _geometry(input, offset, weight, stride, padding, dilation)
    B, Cout, Hout, Wout = geo[0], geo[4], geo[5], geo[6]
    out = empty((B, Cout, Hout, Wout), input.dtype)
    if out.size == 0:
        return out
    dummy = flat(weight)
    _forward[grid(out.size)](
        flat(input),
        flat(offset),
        flat(mask) if mask is not None else dummy,
        flat(weight),
        flat(bias) if bias is not None else dummy,
        flat(out),
        *geo,
        mask is not None,
        bias is not None,
    )
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
    """Gradients (input, offset, weight, bias, mask), None where ``needs`` is False."""
    geo = _geometry(input, offset, weight, stride, padding, dilation)
    B, Cin, H, W, Cout, Hout, Wout, kh, kw = geo[:9]
    G = geo[-1]
    dt = input.dtype
    g_in = zeros(input.shape, dt)
    g_off = zeros(offset.shape, dt)
    g_msk = zeros(mask.shape, dt) if mask is not None else None
    dummy = flat(weight)
    n_points = B * G * kh * kw * Hout * Wout if input.size else 0
    if n_points and (needs[0] or needs[1] or needs[4]):
        _backward_points[grid(n_points)](
            flat(grad_out),
            flat(input),
            flat(offset),
            flat(mask) if mask is not None else dummy,
            flat(weight),
            flat(g_in),
            flat(g_off),
            flat(g_msk) if g_msk is not None else dummy,
            *geo,
            mask is not None,
            bool(needs[0]),
        )
    g_w = g_b = None
    if needs[2]:
        g_w = zeros(weight.shape, dt)
        if g_w.size and B * Hout * Wout and input.size:
            _backward_weight[grid(g_w.size)](
                flat(grad_out),
                flat(input),
                flat(offset),
                flat(mask) if mask is not None else dummy,
                flat(g_w),
                *geo,
                mask is not None,
            )
    if bias is not None and needs[3]:
        g_b = zeros((Cout,), dt)
        if B * Hout * Wout:
            _backward_bias[grid(Cout)](flat(grad_out), flat(g_b), B, Cout, Hout * Wout)
    return (
        g_in if needs[0] else None,
        g_off if needs[1] else None,
        g_w,
        g_b,
        g_msk if needs[4] else None,
    )
