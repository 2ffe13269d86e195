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
from collections.abc import Iterator
from contextlib import contextmanager

import numba
import numpy as np
from numba import njit, prange

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


# ---------------------------------------------------------------------------------------------
# bilinear_interpolate kernels (SPEC section 4): input (N, C, H, W), points (N, P, 2) as (y, x)
# pixel coordinates, output (N, C, P). Used by ``deformnp.ops.bilinear_interpolate`` and, after
# its coordinate transform, by ``grid_sample``.
#
# Parallelism and determinism:
#
# * forward and the points gradient: ``prange`` over tasks (n, block of _BLOCK points); a task
#   computes the plans of its points once, then walks the channels, so each input plane is read
#   for a run of nearby points. It writes only its own outputs / point gradients (owner computes,
#   channel sums in a fixed order).
# * input gradient: ``prange`` over tasks (n, block of channels); a task owns those input planes
#   and scatters into them point by point in a fixed order, computing each point's plan once for
#   the block. The blocking depends on the shapes only, and the order of the additions into any
#   plane element never depends on it, so the gradient is bit-identical with any thread count.
#
# Coordinates are float64 (the op converts float32 points), plans are float64, sums run in
# float64 and are rounded to the data dtype when stored.
# ---------------------------------------------------------------------------------------------

_BLOCK = 64  # points per forward / points-gradient task


@njit(inline="always", cache=True)
def plan_of(rule, y, x, H, W):
    """The plan of rule 0 (zero-fade) or 1 (clamp) at (y, x)."""
    if rule == 0:
        return zero_fade_plan(y, x, H, W)
    return clamp_plan(y, x, H, W)


@njit(parallel=True, cache=True)
def _bilinear_forward(inp, pts, rule, out):
    """out[n, c, p] = sample(inp[n, c], pts[n, p, 0], pts[n, p, 1]) under ``rule``."""
    N, C, H, W = inp.shape
    P = pts.shape[1]
    HW = H * W
    v = inp.reshape(-1)
    o = out.reshape(-1)
    nblk = (P + _BLOCK - 1) // _BLOCK
    for task in prange(N * nblk):
        n = task // nblk
        p0 = (task - n * nblk) * _BLOCK
        p1 = min(p0 + _BLOCK, P)
        idx = np.empty((_BLOCK, 4), np.int64)
        w = np.empty((_BLOCK, 4), np.float64)
        for p in range(p0, p1):
            pi, pw, pcy, pcx = plan_of(rule, pts[n, p, 0], pts[n, p, 1], H, W)
            j = p - p0
            for k in range(4):
                idx[j, k] = pi[k]
                w[j, k] = pw[k]
        for c in range(C):
            base = (n * C + c) * HW
            obase = (n * C + c) * P
            for p in range(p0, p1):
                j = p - p0
                o[obase + p] = (
                    w[j, 0] * v[base + idx[j, 0]]
                    + w[j, 1] * v[base + idx[j, 1]]
                    + w[j, 2] * v[base + idx[j, 2]]
                    + w[j, 3] * v[base + idx[j, 3]]
                )


@njit(parallel=True, cache=True)
def _bilinear_backward_input(gout, pts, rule, cblock, gin):
    """gin[n, c] = sum_p w_p * gout[n, c, p] scattered at p's corners (gin zeroed by the caller)."""
    N, C, H, W = gin.shape
    P = pts.shape[1]
    HW = H * W
    g = gout.reshape(-1)
    gi = gin.reshape(-1)
    ncb = (C + cblock - 1) // cblock
    for task in prange(N * ncb):
        n = task // ncb
        c0 = (task - n * ncb) * cblock
        c1 = min(c0 + cblock, C)
        for p in range(P):
            idx, w, cy, cx = plan_of(rule, pts[n, p, 0], pts[n, p, 1], H, W)
            if w[0] == 0.0 and w[1] == 0.0 and w[2] == 0.0 and w[3] == 0.0:
                continue
            for c in range(c0, c1):
                base = (n * C + c) * HW
                gv = g[(n * C + c) * P + p]
                for k in range(4):
                    gi[base + idx[k]] += w[k] * gv


@njit(parallel=True, cache=True)
def _bilinear_backward_points(gout, inp, pts, rule, gpts):
    """gpts[n, p] = sum_c gout[n, c, p] * (d sample / dy, d sample / dx) (owner computes)."""
    N, C, H, W = inp.shape
    P = pts.shape[1]
    HW = H * W
    v = inp.reshape(-1)
    g = gout.reshape(-1)
    nblk = (P + _BLOCK - 1) // _BLOCK
    for task in prange(N * nblk):
        n = task // nblk
        p0 = (task - n * nblk) * _BLOCK
        p1 = min(p0 + _BLOCK, P)
        idx = np.empty((_BLOCK, 4), np.int64)
        cyb = np.empty((_BLOCK, 4), np.float64)
        cxb = np.empty((_BLOCK, 4), np.float64)
        accy = np.zeros(_BLOCK, np.float64)
        accx = np.zeros(_BLOCK, np.float64)
        for p in range(p0, p1):
            pi, pw, pcy, pcx = plan_of(rule, pts[n, p, 0], pts[n, p, 1], H, W)
            j = p - p0
            for k in range(4):
                idx[j, k] = pi[k]
                cyb[j, k] = pcy[k]
                cxb[j, k] = pcx[k]
        for c in range(C):
            base = (n * C + c) * HW
            gbase = (n * C + c) * P
            for p in range(p0, p1):
                j = p - p0
                gv = g[gbase + p]
                v0 = v[base + idx[j, 0]]
                v1 = v[base + idx[j, 1]]
                v2 = v[base + idx[j, 2]]
                v3 = v[base + idx[j, 3]]
                accy[j] += gv * (cyb[j, 0] * v0 + cyb[j, 1] * v1 + cyb[j, 2] * v2 + cyb[j, 3] * v3)
                accx[j] += gv * (cxb[j, 0] * v0 + cxb[j, 1] * v1 + cxb[j, 2] * v2 + cxb[j, 3] * v3)
        for p in range(p0, p1):
            gpts[n, p, 0] = accy[p - p0]
            gpts[n, p, 1] = accx[p - p0]


BORDERS = {"zero": 0, "clamp": 1}

# Below this much work (samples times channels) the parallel kernels run on the calling thread
# alone: waking Numba's worker threads costs tens of microseconds on an idle machine and
# milliseconds on a loaded one, far more than a tiny problem takes (gradchecks and small layers
# make thousands of such calls). No result depends on the thread count.
SERIAL_WORK = 1 << 17


@contextmanager
def threads_for(work: int) -> Iterator[None]:
    """Run the enclosed kernels on one thread when ``work`` is below SERIAL_WORK."""
    prev = numba.get_num_threads()
    if work >= SERIAL_WORK or prev == 1:
        yield
        return
    numba.set_num_threads(1)
    try:
        yield
    finally:
        numba.set_num_threads(prev)


def _channel_block(N: int, C: int) -> int:
    """Channels per input-gradient task: enough tasks to share out, plans amortised over a block.

    Depends on the shapes only (never on the thread count)."""
    cb = 16
    while cb > 1 and N * ((C + cb - 1) // cb) < 16:
        cb //= 2
    return cb


def bilinear_interpolate_forward(input, points, border):
    """Array-level forward: input (N, C, H, W), points (N, P, 2) float64 (y, x) -> (N, C, P)."""
    N, C, H, W = input.shape
    P = points.shape[1]
    out = np.zeros((N, C, P), dtype=input.dtype)
    if out.size and H * W:
        with threads_for(out.size):
            _bilinear_forward(input, np.ascontiguousarray(points, np.float64), BORDERS[border], out)
    return out


def bilinear_interpolate_backward(grad_out, input, points, border, needs=(True, True)):
    """Array-level backward: (grad_input, grad_points); grad_points has points' dtype."""
    N, C, H, W = input.shape
    P = points.shape[1]
    rule = BORDERS[border]
    pts = np.ascontiguousarray(points, np.float64)
    grad_out = np.ascontiguousarray(grad_out, input.dtype)
    g_in = g_pts = None
    with threads_for(grad_out.size):
        if needs[0]:
            g_in = np.zeros(input.shape, dtype=input.dtype)
            if grad_out.size and g_in.size:
                _bilinear_backward_input(grad_out, pts, rule, _channel_block(N, C), g_in)
        if needs[1]:
            g64 = np.zeros((N, P, 2), dtype=np.float64)
            if N * P and C * H * W:
                _bilinear_backward_points(grad_out, input, pts, rule, g64)
            g_pts = g64.astype(points.dtype, copy=False)
    return g_in, g_pts
