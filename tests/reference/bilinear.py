"""Naive float64 references for bilinear sampling (docs/ops/bilinear.rst), straight from the
formulas.

Plain Python loops, one point and one channel at a time, independent of the kernels' plan
helpers. ``zero_fade`` and ``clamp`` sample one 2-D map; ``bilinear_interpolate`` applies them
over (N, C, P).
"""

from __future__ import annotations

import math

import numpy as np


def zero_fade(V: np.ndarray, y: float, x: float) -> float:
    """Zero-fade rule: 0 unless -1 < y < H and -1 < x < W; corners outside the map are 0."""
    H, W = V.shape
    if not (-1 < y < H and -1 < x < W):
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


def clamp(V: np.ndarray, y: float, x: float) -> float:
    """Clamp rule (torchvision roi_align): 0 outside [-1, H] x [-1, W], else clamped corners."""
    H, W = V.shape
    if math.isnan(y) or math.isnan(x) or y < -1 or y > H or x < -1 or x > W:
        return 0.0
    y = max(y, 0.0)
    x = max(x, 0.0)
    y0 = math.floor(y)
    x0 = math.floor(x)
    if y0 >= H - 1:
        y0 = y1 = H - 1
        y = float(H - 1)
    else:
        y1 = y0 + 1
    if x0 >= W - 1:
        x0 = x1 = W - 1
        x = float(W - 1)
    else:
        x1 = x0 + 1
    ly = y - y0
    lx = x - x0
    hy = 1 - ly
    hx = 1 - lx
    return hy * hx * V[y0, x0] + hy * lx * V[y0, x1] + ly * hx * V[y1, x0] + ly * lx * V[y1, x1]


def sample(V: np.ndarray, y: float, x: float, border: str = "zero") -> float:
    if not (math.isfinite(y) and math.isfinite(x)):
        return 0.0
    return zero_fade(V, y, x) if border == "zero" else clamp(V, y, x)


def bilinear_interpolate(input: np.ndarray, points: np.ndarray, border: str = "zero") -> np.ndarray:
    """input (N, C, H, W), points (N, P, 2) as (y, x) -> (N, C, P), float64."""
    N, C, H, W = input.shape
    P = points.shape[1]
    out = np.zeros((N, C, P))
    for n in range(N):
        for c in range(C):
            for p in range(P):
                y, x = float(points[n, p, 0]), float(points[n, p, 1])
                out[n, c, p] = sample(np.asarray(input[n, c], np.float64), y, x, border)
    return out
