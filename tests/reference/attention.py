"""Naive float64 reference of multi-scale deformable attention, straight from SPEC sections 4, 9.

Plain Python loops with their own bilinear sampler (deliberately not the kernels' shared plan),
for tiny shapes only.
"""

from __future__ import annotations

import math

import numpy as np


def zero_fade(V: np.ndarray, y: float, x: float) -> float:
    """SPEC 4 zero-fade rule on a 2-D map V (H, W): corners outside the map contribute 0."""
    H, W = V.shape
    if not (-1 < y < H and -1 < x < W):  # also False for NaN
        return 0.0
    y0 = math.floor(y)
    x0 = math.floor(x)
    ly = y - y0
    lx = x - x0
    hy = 1 - ly
    hx = 1 - lx

    def at(i: int, j: int) -> float:
        return float(V[i, j]) if 0 <= i <= H - 1 and 0 <= j <= W - 1 else 0.0

    return (
        hy * hx * at(y0, x0)
        + hy * lx * at(y0, x0 + 1)
        + ly * hx * at(y0 + 1, x0)
        + ly * lx * at(y0 + 1, x0 + 1)
    )


def ms_deform_attn(
    value: np.ndarray,
    spatial_shapes: np.ndarray,
    level_start_index: np.ndarray,
    sampling_locations: np.ndarray,
    attention_weights: np.ndarray,
) -> np.ndarray:
    """out[n, q, m*D + d] = sum_{l,p} A * zero_fade(V_l[n,:,:,m,d], v*H_l - 0.5, u*W_l - 0.5)."""
    value = np.asarray(value, np.float64)
    loc = np.asarray(sampling_locations, np.float64)
    A = np.asarray(attention_weights, np.float64)
    N, S, M, D = value.shape
    _, Lq, _, L, P, _ = loc.shape
    out = np.zeros((N, Lq, M * D))
    for n in range(N):
        for q in range(Lq):
            for m in range(M):
                for l in range(L):
                    H, W = (int(s) for s in spatial_shapes[l])
                    start = int(level_start_index[l])
                    for p in range(P):
                        u, v = loc[n, q, m, l, p]
                        y = v * H - 0.5
                        x = u * W - 0.5
                        for d in range(D):
                            V = value[n, start : start + H * W, m, d].reshape(H, W)
                            out[n, q, m * D + d] += A[n, q, m, l, p] * zero_fade(V, y, x)
    return out
