"""Naive float64 reference of DCNv3 (InternImage's ``dcnv3_core_pytorch``), straight from the
formulas of ``deformnp/ops/dcnv3.py``, for tiny shapes only.

Deliberately built the anchor's way and not the kernels' way: the input is zero-padded (rows by
``pad_w``, columns by ``pad_h``, as the anchor's ``F.pad`` does), the kernel points are listed
column by column with the centre removed from the list, and each sample is the paper's kernel
G(q, p) = g(qy, py) g(qx, px), g(a, b) = max(0, 1 - |a - b|), summed over the integer points q
of the padded map. The gradients are the derivatives of that sum (for points off the kinks, where
they are unambiguous: the right-hand slope is used at the kinks).
"""

from __future__ import annotations

import math

import numpy as np


def _points(kh: int, kw: int, remove_center: bool) -> list[tuple[int, int]]:
    """(row i, column j) of the sampled kernel points, in the anchor's (column-major) order."""
    pts = [(i, j) for j in range(kw) for i in range(kh)]
    if remove_center:
        del pts[(kh * kw - 1) // 2]
    return pts


def _g(a: float, b: float) -> tuple[float, float]:
    """g(a, b) = max(0, 1 - |a - b|) and its derivative in b (right-hand slope)."""
    d = a - b
    if abs(d) >= 1:
        return 0.0, 0.0
    return 1 - abs(d), (1.0 if d > 0 else -1.0)


def dcnv3(
    input, offset, mask, kernel_h, kernel_w, stride_h, stride_w, pad_h, pad_w,
    dilation_h, dilation_w, group, group_channels, offset_scale, remove_center, grad_out=None,
):  # fmt: skip
    """(out, grad_input, grad_offset, grad_mask) in float64; the gradients are None without
    ``grad_out``."""
    x_in = np.asarray(input, np.float64)
    off = np.asarray(offset, np.float64)
    msk = np.asarray(mask, np.float64)
    N, H, W, C = x_in.shape
    # the anchor's F.pad(input, [0, 0, pad_h, pad_h, pad_w, pad_w]): W by pad_h, H by pad_w
    V = np.zeros((N, H + 2 * pad_w, W + 2 * pad_h, C))
    V[:, pad_w : pad_w + H, pad_h : pad_h + W] = x_in
    Hp, Wp = V.shape[1:3]
    _, Ho, Wo, _ = off.shape
    pts = _points(kernel_h, kernel_w, bool(remove_center))
    P = len(pts)
    G, D = group, group_channels
    hy = (dilation_h * (kernel_h - 1)) // 2
    hx = (dilation_w * (kernel_w - 1)) // 2
    out = np.zeros((N, Ho, Wo, C))
    want = grad_out is not None
    go = np.asarray(grad_out, np.float64) if want else None
    gV = np.zeros_like(V)
    g_off = np.zeros_like(off)
    g_msk = np.zeros_like(msk)
    for n in range(N):
        for oy in range(Ho):
            for ox in range(Wo):
                for g in range(G):
                    for p, (i, j) in enumerate(pts):
                        q = g * P + p
                        dx, dy = off[n, oy, ox, 2 * q], off[n, oy, ox, 2 * q + 1]
                        a = msk[n, oy, ox, q]
                        # pixel coordinates in the padded map
                        y = hy + oy * stride_h + (i * dilation_h - hy + dy) * offset_scale
                        x = hx + ox * stride_w + (j * dilation_w - hx + dx) * offset_scale
                        if not (math.isfinite(y) and math.isfinite(x)):
                            continue
                        chans = slice(g * D, (g + 1) * D)
                        s = np.zeros(D)
                        sy = np.zeros(D)
                        sx = np.zeros(D)
                        y0, x0 = math.floor(y), math.floor(x)
                        for qy in (y0, y0 + 1):
                            for qx in (x0, x0 + 1):
                                if not (0 <= qy < Hp and 0 <= qx < Wp):
                                    continue
                                ky, dky = _g(qy, y)
                                kx, dkx = _g(qx, x)
                                v = V[n, qy, qx, chans]
                                s += ky * kx * v
                                sy += dky * kx * v
                                sx += ky * dkx * v
                                if want:
                                    gV[n, qy, qx, chans] += a * ky * kx * go[n, oy, ox, chans]
                        out[n, oy, ox, chans] += a * s
                        if want:
                            gd = go[n, oy, ox, chans]
                            g_msk[n, oy, ox, q] = gd @ s
                            g_off[n, oy, ox, 2 * q] = a * offset_scale * (gd @ sx)
                            g_off[n, oy, ox, 2 * q + 1] = a * offset_scale * (gd @ sy)
    if not want:
        return out, None, None, None
    return out, gV[:, pad_w : pad_w + H, pad_h : pad_h + W].copy(), g_off, g_msk


def output_size(H, W, kernel_h, kernel_w, stride_h, stride_w, pad_h, pad_w, dilation_h, dilation_w):
    """(Ho, Wo) of the anchor (rows padded by pad_w, columns by pad_h)."""
    Ho = (H + 2 * pad_w - (dilation_h * (kernel_h - 1) + 1)) // stride_h + 1
    Wo = (W + 2 * pad_h - (dilation_w * (kernel_w - 1) + 1)) // stride_w + 1
    return Ho, Wo
