"""Naive float64 references of DCNv4's ``dcnv4`` and ``flash_deform_attn``, outputs and
gradients, straight from the formulas in ``deformnp/ops/dcnv4.py``.

Sampling uses the paper's tent kernel g(a, b) = max(0, 1 - |a - b|) summed over the map's pixels
(the two rows/columns around the point), not the kernels' plans; the position derivative of the
tent is sign(p - y) inside it (the right-hand slope at integers: tests keep points off kinks).
Plain Python loops, for tiny shapes only.
"""

from __future__ import annotations

import math

import numpy as np


def _taps(y: float, size: int) -> list[tuple[int, float, float]]:
    """(pixel, tent weight, d weight / d y) of the pixels around coordinate y on an axis."""
    if not math.isfinite(y):
        return []
    out = []
    y0 = math.floor(y)
    for p in (y0, y0 + 1):
        if 0 <= p < size:
            wt = max(0.0, 1.0 - abs(p - y))
            out.append((p, wt, (1.0 if p > y else -1.0) if abs(p - y) < 1.0 else 0.0))
    return out


def _sample(V: np.ndarray, y: float, x: float):
    """(value (C,), d/dy (C,), d/dx (C,), [(row, col, weight)]) of V (H, W, C) at (y, x)."""
    H, W, C = V.shape
    val, dy, dx, taps = np.zeros(C), np.zeros(C), np.zeros(C), []
    for r, wy, gy in _taps(y, H):
        for c, wx, gx in _taps(x, W):
            val += wy * wx * V[r, c]
            dy += gy * wx * V[r, c]
            dx += wy * gx * V[r, c]
            taps.append((r, c, wy * wx))
    return val, dy, dx, taps


def dcnv4_points(kernel_h, kernel_w, remove_center):
    """The window points (i, j) in the anchor's order: i < kernel_w outer, j < kernel_h inner."""
    return [
        (i, j)
        for i in range(kernel_w)
        for j in range(kernel_h)
        if not (remove_center and i == kernel_w // 2 and j == kernel_h // 2)
    ]


def output_size(H, W, kh, kw, sh, sw, ph, pw, dh, dw):
    return (H + 2 * ph - (dh * (kh - 1) + 1)) // sh + 1, (
        W + 2 * pw - (dw * (kw - 1) + 1)
    ) // sw + 1


def dcnv4(
    input, offset_mask, kh, kw, sh, sw, ph, pw, dh, dw, group, group_channels, offset_scale,
    remove_center, grad_out=None,
):  # fmt: skip
    """out (B, Ho, Wo, G*D); with ``grad_out`` also (grad_input, grad_offset_mask)."""
    x = np.asarray(input, np.float64)
    om = np.asarray(offset_mask, np.float64)
    B, H, W, C = x.shape
    G, D, s = group, group_channels, float(offset_scale)
    Ho, Wo = output_size(H, W, kh, kw, sh, sw, ph, pw, dh, dw)
    pts = dcnv4_points(kh, kw, remove_center)
    K = len(pts)
    cw, ch = (dw * (kw - 1)) // 2, (dh * (kh - 1)) // 2
    out = np.zeros((B, Ho, Wo, C))
    gx = np.zeros_like(x)
    gom = np.zeros_like(om)
    for b in range(B):
        for ho in range(Ho):
            for wo in range(Wo):
                for g in range(G):
                    V = x[b, :, :, g * D : (g + 1) * D]
                    blk = om[b, ho, wo, g * 3 * K : (g + 1) * 3 * K]
                    go = None if grad_out is None else grad_out[b, ho, wo, g * D : (g + 1) * D]
                    for k, (i, j) in enumerate(pts):
                        ddx, ddy, m = blk[2 * k], blk[2 * k + 1], blk[2 * K + k]
                        px = wo * sw - pw + cw + (i * dw - cw + ddx) * s
                        py = ho * sh - ph + ch + (j * dh - ch + ddy) * s
                        val, vy, vx, taps = _sample(V, py, px)
                        out[b, ho, wo, g * D : (g + 1) * D] += m * val
                        if go is None:
                            continue
                        base = (b, ho, wo, g * 3 * K)
                        gom[base[:3] + (base[3] + 2 * k,)] = m * s * float(go @ vx)
                        gom[base[:3] + (base[3] + 2 * k + 1,)] = m * s * float(go @ vy)
                        gom[base[:3] + (base[3] + 2 * K + k,)] = float(go @ val)
                        for r, c, wt in taps:
                            gx[b, r, c, g * D : (g + 1) * D] += m * wt * go
    if grad_out is None:
        return out
    return out, gx, gom


def softmax(z: np.ndarray) -> np.ndarray:
    e = np.exp(z - z.max())
    return e / e.sum()


def flash_deform_attn(value, spatial_shapes, level_start_index, sampling_loc_attn, K,
                      grad_out=None):  # fmt: skip
    """out (N, Lq, G*D); with ``grad_out`` also (grad_value, grad_sampling_loc_attn)."""
    v = np.asarray(value, np.float64)
    sla = np.asarray(sampling_loc_attn, np.float64)
    N, S, G, D = v.shape
    Lq = sla.shape[1]
    L = len(spatial_shapes)
    LK = L * K
    out = np.zeros((N, Lq, G * D))
    gv = np.zeros_like(v)
    gsla = np.zeros_like(sla)
    for n in range(N):
        for q in range(Lq):
            for g in range(G):
                row = sla[n, q, g]
                A = softmax(row[2 * LK :])
                go = None if grad_out is None else grad_out[n, q, g * D : (g + 1) * D]
                gA = np.zeros(LK)
                for l in range(L):
                    H, W = (int(t) for t in spatial_shapes[l])
                    st = int(level_start_index[l])
                    V = v[n, st : st + H * W, g].reshape(H, W, D)
                    for k in range(K):
                        e = l * K + k
                        u, w_ = row[2 * e], row[2 * e + 1]
                        val, vy, vx, taps = _sample(V, w_ * H - 0.5, u * W - 0.5)
                        out[n, q, g * D : (g + 1) * D] += A[e] * val
                        if go is None:
                            continue
                        gA[e] = float(go @ val)
                        gsla[n, q, g, 2 * e] = A[e] * W * float(go @ vx)
                        gsla[n, q, g, 2 * e + 1] = A[e] * H * float(go @ vy)
                        for r, c, wt in taps:
                            gv[n, st + r * W + c, g] += A[e] * wt * go
                if go is not None:
                    gsla[n, q, g, 2 * LK :] = A * (gA - A @ gA)
    if grad_out is None:
        return out
    return out, gv, gsla
