"""Naive float64 reference for grid_sample (docs/ops/bilinear.rst), written from the formulas.

Per output point: unnormalize gx, gy to pixel coordinates, apply the padding mode's coordinate
rule, then sample with the zero-fade rule (docs/ops/bilinear.rst).
"""

from __future__ import annotations

import math

import numpy as np

from .bilinear import zero_fade


def unnormalize(g: float, size: int, align_corners: bool) -> float:
    if align_corners:
        return (g + 1) / 2 * (size - 1)
    return ((g + 1) * size - 1) / 2


def reflect(c: float, low: float, high: float) -> float:
    """Reflect c into [low, high] (a mirror at each end), as a bouncing point would."""
    span = high - low
    if span <= 0:
        return 0.0
    t = abs(c - low) % (2 * span)
    return low + (t if t <= span else 2 * span - t)


def source(g: float, size: int, align_corners: bool, padding_mode: str) -> float:
    c = unnormalize(g, size, align_corners)
    if not math.isfinite(c):
        if padding_mode == "border" and not math.isnan(c):
            return 0.0 if c < 0 else float(size - 1)
        return math.nan
    if padding_mode == "reflection":
        if align_corners:
            c = reflect(c, 0.0, size - 1.0)
        else:
            c = reflect(c, -0.5, size - 0.5)
    if padding_mode in ("border", "reflection"):
        c = min(max(c, 0.0), size - 1.0)
    return c


def grid_sample(input, grid, padding_mode="zeros", align_corners=False):
    """input (N, C, Hin, Win), grid (N, Hout, Wout, 2) of (x, y) -> (N, C, Hout, Wout)."""
    input = np.asarray(input, np.float64)
    N, C, Hin, Win = input.shape
    Hout, Wout = grid.shape[1:3]
    out = np.zeros((N, C, Hout, Wout))
    for n in range(N):
        for i in range(Hout):
            for j in range(Wout):
                x = source(float(grid[n, i, j, 0]), Win, align_corners, padding_mode)
                y = source(float(grid[n, i, j, 1]), Hin, align_corners, padding_mode)
                if math.isnan(x) or math.isnan(y):
                    continue
                for c in range(C):
                    out[n, c, i, j] = zero_fade(input[n, c], y, x)
    return out
