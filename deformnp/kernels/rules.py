"""The sampling rules, written once as plain Python and compiled for both devices.

``kernels/cpu/sampling.py`` compiles these functions with ``numba.njit`` and
``kernels/cuda/sampling.py`` with ``numba.cuda.jit(device=True)``, so the math of the two border
rules and of grid_sample's coordinate rule exists exactly once. Each function is
self-contained (it calls no other function of this module) because a plain Python function
cannot call another one once compiled; nothing here imports Numba.

**Bilinear plans.** Both border rules reduce sampling a map V (H rows, W columns, flattened
row-major) at a real point (y, x) to a *plan*: four flat corner indices ``idx`` and, for each
corner, its weight ``w`` and the coefficients ``cy``, ``cx`` of its value in the derivatives
with respect to y and x:

    value      = sum_k w[k]  * V[idx[k]]
    d value/dy = sum_k cy[k] * V[idx[k]]
    d value/dx = sum_k cx[k] * V[idx[k]]
    d value/dV[idx[k]] = w[k]

Corners that do not contribute (outside the map, or the whole point out of range) get index 0
and zero weight and coefficients, so a kernel can read ``V[idx[k]]`` unconditionally: every index
is inside the map whenever H >= 1 and W >= 1. A kernel that uses the plan for one channel can
reuse it for every other channel of the same map.

Corner order: k = 0: (y0, x0), 1: (y0, x1), 2: (y1, x0), 3: (y1, x1).

* **zero-fade** (deformable conv, grid_sample "zeros", deformable attention): the paper's kernel
  G(q, p) = g(qy, py) g(qx, px), g(a, b) = max(0, 1 - |a - b|), with V = 0 outside the map. The
  point is out of range (value 0) unless -1 <= y < H and -1 <= x < W (at y = -1 the formula
  itself gives 0, and keeping it there makes the position derivative the right-hand slope, as
  the floor convention implies). NaN and infinite coordinates are out of range.
* **clamp** (RoI Align, PS RoI Align, deformable RoI pooling; torchvision's roi_align rule): out
  of range when y < -1 or y > H (likewise x); otherwise y = max(y, 0) and, when floor(y) >= H - 1,
  y0 = y1 = H - 1 and y = H - 1. The position derivative is zero inside the clamped bands
  (y < 0, or y >= H - 1) and the interpolation slope elsewhere (right-hand slope at integers).

**grid_sample's coordinate rule** (:func:`grid_coordinate`): a normalized grid value to a pixel
coordinate and its derivative, for the three padding modes.

**Arithmetic type.** Every function takes ``ft``, the float type its arithmetic is done in
(``numpy.float32`` or ``numpy.float64``; a CUDA kernel passes ``array.dtype.type``): every constant
is written ``ft(...)`` and every coordinate is cast to ``ft`` first, because a bare Python float
literal is a float64 in compiled code and would promote a float32 kernel to float64 arithmetic
(half the float32 rate on a data-centre GPU, 1/64 on most others). The CPU kernels pass float64
for both dtypes (their float32 results keep float64 plans), except ms_deform_attn's, which pass
the data's dtype as the CUDA kernels do (eight AVX2 lanes instead of four in its plan loop).
"""

from __future__ import annotations

import math

import numpy as np

PADDING_MODES = {"zeros": 0, "border": 1, "reflection": 2}


def zero_fade_plan(y, x, H, W, ft, it=None):
    """Plan for the zero-fade rule at (y, x) on an H x W map: (idx, w, cy, cx), 4-tuples each.

    ``it``: None, or an integer type (``numpy.int32``, ``numpy.int64``) in which the corners and
    the flat indices are computed, the caller guaranteeing that H * W fits it. The floor is then
    taken in ``ft`` and converted to ``it``, and every integer step is cast back to ``it``: the
    same plan, in instructions that a CPU loop over many points vectorizes at the width of ``ft``
    when ``it`` is int32 (AVX2 converts floats to int32 eight lanes at a time, to int64 one lane
    at a time; Numba widens int32 arithmetic to int64 unless its result is cast back)."""
    zero = ft(0.0)
    one = ft(1.0)
    if it is None:
        i0 = 0
    else:
        i0 = it(0)
    if H <= 0 or W <= 0 or not (y >= -one and y < ft(H) and x >= -one and x < ft(W)):
        z4 = (zero, zero, zero, zero)
        return (i0, i0, i0, i0), z4, z4, z4
    if it is None:
        y0 = int(math.floor(y))
        x0 = int(math.floor(x))
        ly = ft(y) - ft(y0)
        lx = ft(x) - ft(x0)
        H1 = H - 1
        W1 = W - 1
    else:  # y - floor(y) is exact in floating point: the same ly, lx
        fy = np.floor(ft(y))
        fx = np.floor(ft(x))
        y0 = it(fy)
        x0 = it(fx)
        ly = ft(y) - fy
        lx = ft(x) - fx
        H1 = it(H - 1)
        W1 = it(W - 1)
    hy = one - ly
    hx = one - lx
    # which of the four corners lie inside the map (0/1 masks); y1 = y0 + 1 <= H - 1
    my0 = one if y0 >= 0 else zero
    my1 = one if y0 < H1 else zero
    mx0 = one if x0 >= 0 else zero
    mx1 = one if x0 < W1 else zero
    m00 = my0 * mx0
    m01 = my0 * mx1
    m10 = my1 * mx0
    m11 = my1 * mx1
    # clamp indices of masked corners into the map so reads are always in bounds
    if it is None:
        r0 = y0 if y0 >= 0 else 0
        r1 = y0 + 1 if y0 < H1 else H1
        c0 = x0 if x0 >= 0 else 0
        c1 = x0 + 1 if x0 < W1 else W1
        idx = (r0 * W + c0, r0 * W + c1, r1 * W + c0, r1 * W + c1)
    else:  # the same indices, each step cast back to ``it``
        r0 = y0 if y0 >= 0 else i0
        r1 = it(y0 + 1) if y0 < H1 else H1
        c0 = x0 if x0 >= 0 else i0
        c1 = it(x0 + 1) if x0 < W1 else W1
        a = it(r0 * it(W))
        b = it(r1 * it(W))
        idx = (it(a + c0), it(a + c1), it(b + c0), it(b + c1))
    w = (hy * hx * m00, hy * lx * m01, ly * hx * m10, ly * lx * m11)
    cy = (-hx * m00, -lx * m01, hx * m10, lx * m11)
    cx = (-hy * m00, hy * m01, -ly * m10, ly * m11)
    return idx, w, cy, cx


def clamp_plan(y, x, H, W, ft):
    """Plan for the clamp rule at (y, x) on an H x W map: (idx, w, cy, cx), 4-tuples each."""
    zero = ft(0.0)
    one = ft(1.0)
    if H <= 0 or W <= 0 or not (y >= -one and y <= ft(H) and x >= -one and x <= ft(W)):
        z4 = (zero, zero, zero, zero)
        return (0, 0, 0, 0), z4, z4, z4
    yy = ft(y)
    xx = ft(x)
    gy = one
    gx = one
    if yy < zero:
        yy = zero
        gy = zero
    if xx < zero:
        xx = zero
        gx = zero
    y0 = int(math.floor(yy))
    x0 = int(math.floor(xx))
    if y0 >= H - 1:
        y0 = H - 1
        y1 = H - 1
        yy = ft(y0)
        gy = zero
    else:
        y1 = y0 + 1
    if x0 >= W - 1:
        x0 = W - 1
        x1 = W - 1
        xx = ft(x0)
        gx = zero
    else:
        x1 = x0 + 1
    ly = yy - ft(y0)
    lx = xx - ft(x0)
    hy = one - ly
    hx = one - lx
    idx = (y0 * W + x0, y0 * W + x1, y1 * W + x0, y1 * W + x1)
    w = (hy * hx, hy * lx, ly * hx, ly * lx)
    cy = (-hx * gy, -lx * gy, hx * gy, lx * gy)
    cx = (-hy * gx, hy * gx, -ly * gx, ly * gx)
    return idx, w, cy, cx


def plan_value(v, base, idx, w):
    """sum_k w[k] * v[base + idx[k]] for a flat array ``v`` whose map starts at ``base``."""
    return (
        w[0] * v[base + idx[0]]
        + w[1] * v[base + idx[1]]
        + w[2] * v[base + idx[2]]
        + w[3] * v[base + idx[3]]
    )


def grid_coordinate(g, size, align_corners, padding, ft):
    """grid_sample's coordinate rule: the pixel coordinate of the normalized grid value ``g``
    along an axis of ``size`` pixels, and its derivative d coordinate / d g.

    * unnormalize: align_corners: c = (g + 1) / 2 * (size - 1) (-1 and 1 are the centres of the
      corner pixels); otherwise c = ((g + 1) * size - 1) / 2 (-1 and 1 are their outer edges);
    * padding 0 ("zeros"): nothing more (the zero-fade rule fades points off the map to zero);
    * padding 2 ("reflection"): torch's reflect_coordinates, about [-0.5, size - 0.5] (or
      [0, size - 1] with align_corners); the derivative is +-1 times the scale between
      reflection points, as in torch; then the border clip below;
    * padding 1 ("border", and after reflection): c clipped to [0, size - 1], derivative zero
      where clipped (c < 0 or c >= size - 1: the right-hand convention; torch also zeroes it at
      c == 0 exactly).

    NaN stays NaN (it samples zero in every mode); +-inf clips to the border with "border" and
    becomes NaN with "reflection".
    """
    zero = ft(0.0)
    one = ft(1.0)
    two = ft(2.0)
    g = ft(g)
    if align_corners:
        c = (g + one) / two * ft(size - 1)
        d = ft(size - 1) / two
    else:
        c = ((g + one) * ft(size) - one) / two
        d = ft(size) / two
    if padding == 2:
        # reflect about [twice_low / 2, twice_high / 2]
        if align_corners:
            twice_low = 0
            twice_high = 2 * (size - 1)
        else:
            twice_low = -1
            twice_high = 2 * size - 1
        if twice_low == twice_high:
            c = zero
            d = zero
        else:
            low = ft(twice_low) / two
            span = ft(twice_high - twice_low) / two
            c = c - low
            mult = -one if c < zero else one
            c = abs(c)
            if not (c < ft(math.inf)):  # NaN or infinite: fmod would give NaN, an odd fold
                c = ft(math.nan)
                d = d * -mult
            else:
                # c >= 0 and span > 0: % is C's fmod here, exact (and compiles on both devices)
                extra = c % span
                q = c / span
                flips = q - q % one  # floor(q)
                if flips % two == zero:
                    c = extra + low
                    d = d * mult
                else:
                    c = span - extra + low
                    d = d * -mult
    if padding >= 1:
        if c < zero:
            c = zero
            d = zero
        elif c >= ft(size - 1):
            c = ft(size - 1)
            d = zero
    return c, d
