"""The two bilinear border rules of SPEC section 4, written once for every CPU kernel.

Both rules reduce sampling a map V (H rows, W columns, flattened row-major) at a real point (y, x)
to a *plan*: four flat corner indices ``idx`` and, for each corner, its weight ``w`` and the
coefficients ``cy``, ``cx`` of its value in the derivatives with respect to y and x:

    value      = sum_k w[k]  * V[idx[k]]
    d value/dy = sum_k cy[k] * V[idx[k]]
    d value/dx = sum_k cx[k] * V[idx[k]]
    d value/dV[idx[k]] = w[k]

Corners that do not contribute (outside the map, or the whole point out of range) get index 0
and zero weight and coefficients, so a kernel can read ``V[idx[k]]`` unconditionally: every index
is inside the map whenever H >= 1 and W >= 1. A kernel that uses the plan for one channel can
reuse it for every other channel of the same map.

Corner order: k = 0: (y0, x0), 1: (y0, x1), 2: (y1, x0), 3: (y1, x1).

**zero-fade** (deformable conv, grid_sample "zeros", deformable attention): the paper's kernel
G(q, p) = g(qy, py) g(qx, px), g(a, b) = max(0, 1 - |a - b|), with V = 0 outside the map. The
point is out of range (value 0) unless -1 <= y < H and -1 <= x < W (at y = -1 the formula itself
gives 0, and keeping it there makes the position derivative the right-hand slope, as the floor
convention implies). NaN and infinite coordinates are out of range.

**clamp** (RoI Align, PS RoI Align, deformable RoI pooling; torchvision's roi_align rule): out of
range when y < -1 or y > H (likewise x); otherwise y = max(y, 0) and, when floor(y) >= H - 1,
y0 = y1 = H - 1 and y = H - 1. The position derivative is zero inside the clamped bands
(y < 0, or y >= H - 1) and the interpolation slope elsewhere (right-hand slope at integers).
"""

from __future__ import annotations

import math

from numba import njit

_ZERO_PLAN_F = (0.0, 0.0, 0.0, 0.0)
_ZERO_PLAN_I = (0, 0, 0, 0)


@njit(inline="always", cache=True)
def zero_fade_plan(y, x, H, W):
    """Plan for the zero-fade rule at (y, x) on an H x W map: (idx, w, cy, cx), 4-tuples each."""
    if H <= 0 or W <= 0 or not (y >= -1.0 and y < H and x >= -1.0 and x < W):
        return _ZERO_PLAN_I, _ZERO_PLAN_F, _ZERO_PLAN_F, _ZERO_PLAN_F
    y0f = math.floor(y)
    x0f = math.floor(x)
    y0 = int(y0f)
    x0 = int(x0f)
    ly = float(y) - y0f
    lx = float(x) - x0f
    hy = 1.0 - ly
    hx = 1.0 - lx
    # which of the four corners lie inside the map (0/1 masks)
    my0 = 1.0 if y0 >= 0 else 0.0
    my1 = 1.0 if y0 + 1 <= H - 1 else 0.0
    mx0 = 1.0 if x0 >= 0 else 0.0
    mx1 = 1.0 if x0 + 1 <= W - 1 else 0.0
    m00 = my0 * mx0
    m01 = my0 * mx1
    m10 = my1 * mx0
    m11 = my1 * mx1
    # clamp indices of masked corners into the map so reads are always in bounds
    r0 = y0 if y0 >= 0 else 0
    r1 = y0 + 1 if y0 + 1 <= H - 1 else H - 1
    c0 = x0 if x0 >= 0 else 0
    c1 = x0 + 1 if x0 + 1 <= W - 1 else W - 1
    idx = (r0 * W + c0, r0 * W + c1, r1 * W + c0, r1 * W + c1)
    w = (hy * hx * m00, hy * lx * m01, ly * hx * m10, ly * lx * m11)
    cy = (-hx * m00, -lx * m01, hx * m10, lx * m11)
    cx = (-hy * m00, hy * m01, -ly * m10, ly * m11)
    return idx, w, cy, cx


@njit(inline="always", cache=True)
def clamp_plan(y, x, H, W):
    """Plan for the clamp rule at (y, x) on an H x W map: (idx, w, cy, cx), 4-tuples each."""
    if H <= 0 or W <= 0 or not (y >= -1.0 and y <= H and x >= -1.0 and x <= W):
        return _ZERO_PLAN_I, _ZERO_PLAN_F, _ZERO_PLAN_F, _ZERO_PLAN_F
    yy = float(y)
    xx = float(x)
    gy = 1.0
    gx = 1.0
    if yy < 0.0:
        yy = 0.0
        gy = 0.0
    if xx < 0.0:
        xx = 0.0
        gx = 0.0
    y0 = int(math.floor(yy))
    x0 = int(math.floor(xx))
    if y0 >= H - 1:
        y0 = H - 1
        y1 = H - 1
        yy = float(y0)
        gy = 0.0
    else:
        y1 = y0 + 1
    if x0 >= W - 1:
        x0 = W - 1
        x1 = W - 1
        xx = float(x0)
        gx = 0.0
    else:
        x1 = x0 + 1
    ly = yy - y0
    lx = xx - x0
    hy = 1.0 - ly
    hx = 1.0 - lx
    idx = (y0 * W + x0, y0 * W + x1, y1 * W + x0, y1 * W + x1)
    w = (hy * hx, hy * lx, ly * hx, ly * lx)
    cy = (-hx * gy, -lx * gy, hx * gy, lx * gy)
    cx = (-hy * gx, hy * gx, -ly * gx, ly * gx)
    return idx, w, cy, cx


@njit(inline="always", cache=True)
def plan_value(v, base, idx, w):
    """sum_k w[k] * v[base + idx[k]] for a flat array ``v`` whose map starts at ``base``."""
    return (
        w[0] * v[base + idx[0]]
        + w[1] * v[base + idx[1]]
        + w[2] * v[base + idx[2]]
        + w[3] * v[base + idx[3]]
    )
