"""CPU kernels of ``bilinear_interpolate`` (SPEC section 4): input (N, C, H, W), points (N, P, 2)
as (y, x) pixel coordinates, output (N, C, P), under either border rule (the plans of
``kernels/rules.py``, compiled in ``sampling.py``). ``grid_sample`` uses ``sample_points`` and
``sample_points_grad`` after its coordinate transform.

The kernels work channels-last: the input (and the output gradient) are copied to (N, H, W, C)
(and (N, P, C)), so each corner of a plan is a contiguous run of C values.

Parallelism and determinism:

* forward: ``prange`` over (n, block of points); a task computes each point's plan once,
  samples all channels into a (block, C) buffer and stores it into its own outputs.
* backward, pass 1 (``_sample_backward_points``): ``prange`` over points; a point computes its
  plan once, stores it for pass 2, and (owner computes) its own gradient from four dot products
  over the channels, in a fixed order.
* backward, pass 2 (``_sample_backward_input``): ``prange`` over tasks (n, block of channels); a
  task owns those channels of the input gradient of image n and scatters into them point by
  point in a fixed order, so the blocking (which may follow the thread count) never changes a
  sum: the gradient is bit-identical with any thread count.

Coordinates are float64 (float32 points are converted) and plans are float64; the plans'
weights are rounded to the data dtype for the channel loops.
"""

from __future__ import annotations

import numpy as np
from numba import njit, prange

from .sampling import (
    CLAMP,
    ZERO_FADE,
    axpy,
    channel_block,
    channels_last,
    combine4,
    dot4,
    fill_zero,
    plan_of,
    threads_for,
)

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


BORDERS = {"zero": ZERO_FADE, "clamp": CLAMP}


def sample_points(input, pts, rule):
    """input (N, C, H, W), pts (N, P, 2) float64 (y, x) -> (N, C, P) under rule 0/1."""
    N, C, H, W = input.shape
    P = pts.shape[1]
    if N * C * P == 0 or H * W == 0:
        return np.zeros((N, C, P), dtype=input.dtype)
    with threads_for(N * C * P):
        out = np.empty((N, C, P), dtype=input.dtype)
        _sample_forward(channels_last(input).reshape(N, H, W, C), pts, rule, out)
        return out


def sample_points_grad(grad_out, input, pts, rule, needs=(True, True)):
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
    """input (N, C, H, W), points (N, P, 2) as (y, x), border "zero" or "clamp" -> (N, C, P)."""
    pts = np.ascontiguousarray(points, np.float64)
    return sample_points(input, pts, BORDERS[border])


def bilinear_interpolate_backward(grad_out, input, points, border, needs):
    """(grad_input, grad_points) for grad_out (N, C, P), None where ``needs`` is False;
    grad_points has points' dtype."""
    pts = np.ascontiguousarray(points, np.float64)
    grad_out = np.ascontiguousarray(grad_out, input.dtype)
    g_in, g_pts = sample_points_grad(grad_out, input, pts, BORDERS[border], tuple(needs))
    if g_pts is not None:
        g_pts = g_pts.astype(points.dtype, copy=False)
    return g_in, g_pts
