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
# Channel-run helpers shared by the sampling kernels: with channels-last data, the four corners
# of a plan are four contiguous runs of channels, and these loops vectorize.
# ---------------------------------------------------------------------------------------------


@njit(cache=True)
def combine4(out, r0, r1, r2, r3, w0, w1, w2, w3):
    """out[c] = w0*r0[c] + w1*r1[c] + w2*r2[c] + w3*r3[c] (a sample's value for a channel run)."""
    for c in range(out.shape[0]):
        out[c] = w0 * r0[c] + w1 * r1[c] + w2 * r2[c] + w3 * r3[c]


@njit(cache=True)
def fill_zero(out):
    for c in range(out.shape[0]):
        out[c] = 0.0


@njit(fastmath={"reassoc", "contract"}, cache=True)
def dot4(g, r0, r1, r2, r3):
    """(g.r0, g.r1, g.r2, g.r3) over a channel run, summed in float64. Reassociation lets the
    compiler vectorize the sums; the compiled order is fixed, so results are reproducible."""
    s0 = 0.0
    s1 = 0.0
    s2 = 0.0
    s3 = 0.0
    for c in range(g.shape[0]):
        gc = np.float64(g[c])
        s0 += gc * r0[c]
        s1 += gc * r1[c]
        s2 += gc * r2[c]
        s3 += gc * r3[c]
    return s0, s1, s2, s3


@njit(cache=True)
def axpy(r, w, g):
    """r[c] += w * g[c] (one corner of a sample scattering a channel run)."""
    for c in range(r.shape[0]):
        r[c] += w * g[c]


# Layout transposes run serially (tiled; faster than NumPy's strided copy): a parallel region
# for a memory-bound copy saves little and costs a thread wake-up (milliseconds when the machine
# is busy).
_TILE = 16  # positions per tile


@njit(cache=True)
def to_channels_last(src, dst):
    """dst[n, p, c] = src[n, c, p]: (N, C, P) -> (N, P, C)."""
    N, C, P = src.shape
    for n in range(N):
        for p0 in range(0, P, _TILE):
            p1 = min(p0 + _TILE, P)
            for c in range(C):
                for p in range(p0, p1):
                    dst[n, p, c] = src[n, c, p]


@njit(cache=True)
def from_channels_last(src, dst):
    """dst[n, c, p] = src[n, p, c]: (N, P, C) -> (N, C, P)."""
    N, P, C = src.shape
    for n in range(N):
        for p0 in range(0, P, _TILE):
            p1 = min(p0 + _TILE, P)
            for c in range(C):
                for p in range(p0, p1):
                    dst[n, c, p] = src[n, p, c]


# ---------------------------------------------------------------------------------------------
# bilinear_interpolate kernels (SPEC section 4): input (N, C, H, W), points (N, P, 2) as (y, x)
# pixel coordinates, output (N, C, P). Used by ``deformnp.ops.bilinear_interpolate`` and, after
# its coordinate transform, by ``grid_sample``.
#
# The kernels work channels-last: the input (and the output gradient) are copied to (N, H, W, C)
# (and (N, P, C)) by a parallel transpose, so each corner of a plan is a contiguous run of C
# values.
#
# Parallelism and determinism:
#
# * forward: ``prange`` over (n, block of points); a task computes each point's plan once,
#   samples all channels into a (block, C) buffer and stores it into its own outputs.
# * backward, pass 1 (``_sample_backward_points``): ``prange`` over points; a point computes its
#   plan once, stores it for pass 2, and (owner computes) its own gradient from four dot
#   products over the channels, in a fixed order.
# * backward, pass 2 (``_sample_backward_input``): ``prange`` over tasks (n, block of channels);
#   a task owns those channels of the input gradient of image n and scatters into them point by
#   point in a fixed order, so the blocking (which may follow the thread count) never changes a
#   sum: the gradient is bit-identical with any thread count.
#
# Coordinates are float64 (the op converts float32 points) and plans are float64; the plans'
# weights are rounded to the data dtype for the channel loops.
# ---------------------------------------------------------------------------------------------


@njit(inline="always", cache=True)
def plan_of(rule, y, x, H, W):
    """The plan of rule 0 (zero-fade) or 1 (clamp) at (y, x)."""
    if rule == 0:
        return zero_fade_plan(y, x, H, W)
    return clamp_plan(y, x, H, W)


_BLOCK = 32  # points per forward task


@njit(parallel=True, cache=True)
def _sample_forward(inp_t, pts, rule, out):
    """out[n, c, p] = sample(channel c of inp_t[n], pts[n, p]); inp_t is channels-last
    (N, H, W, C), out (N, C, P). A task samples a block of points into a (block, C) buffer
    (contiguous channel runs) and stores it transposed."""
    N, H, W, C = inp_t.shape
    P = pts.shape[1]
    v = inp_t.reshape(-1)
    o = out.reshape(-1)
    nblk = (P + _BLOCK - 1) // _BLOCK
    for task in prange(N * nblk):
        n = task // nblk
        p0 = (task - n * nblk) * _BLOCK
        p1 = min(p0 + _BLOCK, P)
        buf = np.empty((_BLOCK, C), out.dtype)
        wv = np.empty(4, out.dtype)  # the plan's weights in the data dtype
        base = n * H * W
        for p in range(p0, p1):
            pi, pw, pcy, pcx = plan_of(rule, pts[n, p, 0], pts[n, p, 1], H, W)
            dst = buf[p - p0]
            if pw[0] == 0.0 and pw[1] == 0.0 and pw[2] == 0.0 and pw[3] == 0.0:
                fill_zero(dst)
                continue
            for k in range(4):
                wv[k] = pw[k]
            combine4(
                dst,
                v[(base + pi[0]) * C : (base + pi[0] + 1) * C],
                v[(base + pi[1]) * C : (base + pi[1] + 1) * C],
                v[(base + pi[2]) * C : (base + pi[2] + 1) * C],
                v[(base + pi[3]) * C : (base + pi[3] + 1) * C],
                wv[0], wv[1], wv[2], wv[3],
            )  # fmt: skip
        for c in range(C):
            ob = (n * C + c) * P
            for p in range(p0, p1):
                o[ob + p] = buf[p - p0, c]


@njit(parallel=True, cache=True)
def _sample_backward_points(inp_t, gout_t, pts, rule, need_pts, pidx, pwts, gpts):
    """Per point (owner): its plan into pidx / pwts (for the input gradient) and, with
    ``need_pts``, gpts[n, p] = sum_c gout[n, p, c] * (d sample / dy, d sample / dx)."""
    N, H, W, C = inp_t.shape
    P = pts.shape[1]
    v = inp_t.reshape(-1)
    g = gout_t.reshape(-1)
    for t in prange(N * P):
        n = t // P
        p = t - n * P
        pi, pw, pcy, pcx = plan_of(rule, pts[n, p, 0], pts[n, p, 1], H, W)
        for k in range(4):
            pidx[n, p, k] = pi[k]
            pwts[n, p, k] = pw[k]
        if need_pts:
            base = n * H * W
            d0, d1, d2, d3 = dot4(
                g[t * C : (t + 1) * C],
                v[(base + pi[0]) * C : (base + pi[0] + 1) * C],
                v[(base + pi[1]) * C : (base + pi[1] + 1) * C],
                v[(base + pi[2]) * C : (base + pi[2] + 1) * C],
                v[(base + pi[3]) * C : (base + pi[3] + 1) * C],
            )
            gpts[n, p, 0] = pcy[0] * d0 + pcy[1] * d1 + pcy[2] * d2 + pcy[3] * d3
            gpts[n, p, 1] = pcx[0] * d0 + pcx[1] * d1 + pcx[2] * d2 + pcx[3] * d3


@njit(parallel=True, cache=True)
def _sample_backward_input(gout_t, pidx, pwts, cblock, gin):
    """gin[n, c] = sum over points p (in order) of w * gout_t[n, p, c] scattered at p's corners.
    Tasks own (n, block of channels): they scatter into a channels-last buffer of their block,
    then store it into gin (N, C, H, W)."""
    N, C, H, W = gin.shape
    P = pidx.shape[1]
    HW = H * W
    g = gout_t.reshape(-1)
    gi = gin.reshape(-1)
    ncb = (C + cblock - 1) // cblock
    for task in prange(N * ncb):
        n = task // ncb
        c0 = (task - n * ncb) * cblock
        c1 = min(c0 + cblock, C)
        cb = c1 - c0
        acc = np.zeros(HW * cb, gin.dtype)
        for p in range(P):
            if (
                pwts[n, p, 0] == 0.0
                and pwts[n, p, 1] == 0.0
                and pwts[n, p, 2] == 0.0
                and pwts[n, p, 3] == 0.0
            ):
                continue
            row = (n * P + p) * C
            gv = g[row + c0 : row + c1]
            for k in range(4):
                s = pidx[n, p, k] * cb
                axpy(acc[s : s + cb], pwts[n, p, k], gv)
        for c in range(c0, c1):
            ob = (n * C + c) * HW
            for q in range(HW):
                gi[ob + q] = acc[q * cb + c - c0]


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


def channel_block(tasks: int, C: int) -> int:
    """Channels per input-gradient task: about two tasks per thread over ``tasks`` images, in
    blocks of at least 16 channels. No result depends on it."""
    ncb = max(1, min(C // 16, -(-2 * numba.get_num_threads() // max(1, tasks))))
    return max(1, -(-C // ncb))


def channels_last(a):
    """(N, C, ...) -> a new C-contiguous (N, prod(...), C) array."""
    N, C = a.shape[:2]
    src = np.ascontiguousarray(a).reshape(N, C, -1)
    dst = np.empty((N, src.shape[2], C), dtype=a.dtype)
    if dst.size:
        to_channels_last(src, dst)
    return dst


def sample_forward(input, pts, rule):
    """input (N, C, H, W), pts (N, P, 2) float64 (y, x) -> (N, C, P) under rule 0/1."""
    N, C, H, W = input.shape
    P = pts.shape[1]
    if N * C * P == 0 or H * W == 0:
        return np.zeros((N, C, P), dtype=input.dtype)
    with threads_for(N * C * P):
        out = np.empty((N, C, P), dtype=input.dtype)
        _sample_forward(channels_last(input).reshape(N, H, W, C), pts, rule, out)
        return out


def sample_backward(grad_out, input, pts, rule, needs=(True, True)):
    """(grad_input (N, C, H, W) or None, grad_points (N, P, 2) float64 or None)."""
    N, C, H, W = input.shape
    P = pts.shape[1]
    g_in = np.zeros(input.shape, dtype=input.dtype) if needs[0] else None
    g_pts = np.zeros((N, P, 2), dtype=np.float64) if needs[1] else None
    if N * C * P == 0 or H * W == 0 or not (needs[0] or needs[1]):
        return g_in, g_pts
    with threads_for(N * C * P):
        inp_t = channels_last(input).reshape(N, H, W, C)
        gout_t = channels_last(grad_out.reshape(N, C, P))
        pidx = np.empty((N, P, 4), np.int64)
        pwts = np.empty((N, P, 4), input.dtype)
        gp = g_pts if needs[1] else np.empty((1, 1, 2), np.float64)
        _sample_backward_points(inp_t, gout_t, pts, rule, bool(needs[1]), pidx, pwts, gp)
        if needs[0]:
            _sample_backward_input(gout_t, pidx, pwts, channel_block(N, C), g_in)
    return g_in, g_pts


def bilinear_interpolate_forward(input, points, border):
    """Array-level forward: input (N, C, H, W), points (N, P, 2) (y, x) -> (N, C, P)."""
    pts = np.ascontiguousarray(points, np.float64)
    return sample_forward(input, pts, BORDERS[border])


def bilinear_interpolate_backward(grad_out, input, points, border, needs=(True, True)):
    """Array-level backward: (grad_input, grad_points); grad_points has points' dtype."""
    pts = np.ascontiguousarray(points, np.float64)
    grad_out = np.ascontiguousarray(grad_out, input.dtype)
    g_in, g_pts = sample_backward(grad_out, input, pts, BORDERS[border], tuple(needs))
    if g_pts is not None:
        g_pts = g_pts.astype(points.dtype, copy=False)
    return g_in, g_pts
