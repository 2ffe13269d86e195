"""CUDA kernels of ``bilinear_interpolate`` (docs/ops/bilinear.rst), mirroring
``kernels/cpu/bilinear.py``.

input (N, C, H, W), points (N, P, 2) as (y, x), output (N, C, P), under either border rule
(``plan_of`` of ``sampling.py``, the same rules as on the CPU). ``grid_sample.py`` shares the
host-side helpers and the deterministic owner kernel defined here.

**Layout and threads (the DCNv4 design).** The input is transposed on the device to
channels-last (N, H*W, C) (``transpose_last``). Each sampling point gets ``lanes = lanes_for(C)``
consecutive threads of one warp; every thread computes the point's plan once and applies it to
its run of channels ``c = lane, lane + lanes, ...``, so at each step the lanes read four runs of
consecutive addresses (one per corner: coalesced). The forward writes a channels-last output
(N, P, C) that is transposed back to (N, C, P). A point whose four weights are all zero (out of
range) writes zeros without reading the input.

**Backward: one kernel per point group** (``_backward``, over ``padded(N * P * lanes)`` threads so
that every lane of a warp runs the same iterations): the output gradient is transposed to
channels-last (N, P, C) (coalesced reads); each lane

* scatters w[k] * grad_out into the channels-last input gradient (N, H*W, C) with float atomic
  adds (coalesced across the lanes; zero-weight corners skipped), transposed back at the end;
* accumulates its channels' partial d/dy, d/dx (the plan's cy, cx applied to the four corner
  values), then ``lane_sum`` reduces them across the lanes (warp shuffles in a fixed butterfly
  order) and lane 0 writes the point's gradient (one writer: deterministic).

Work that ``needs`` does not ask for is skipped (no input transpose without the points gradient,
no scatter without the input gradient).

**Deterministic mode** (``are_deterministic_algorithms_enabled()``): instead of the atomics, lane 0
of each point writes one key per (point, corner) ``e = 4 * point + corner``: the destination pixel
``n * H * W + pixel`` (``N * H * W`` for a zero-weight corner) and the corner's weight;
``scatter.segments`` sorts the contributions by (pixel, e), and ``_owner`` (one thread per
(pixel, channel) of the channels-last gradient) sums w * grad_out over its contributions in that
order and writes: bit-identical from run to run.

**Precision.** ``ft = input.dtype.type``: a float32 launch computes its plans, weights, products
and accumulators in float32 (constants are ``ft(...)``), a float64 launch in float64.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import numpy as np
from numba import cuda

from ...determinism import are_deterministic_algorithms_enabled
from ._launch import (
    SIMULATOR,
    empty,
    flat,
    grid,
    lane_sum,
    lanes_for,
    padded,
    transpose_last,
    zeros,
)
from .sampling import CLAMP, ZERO_FADE, plan_of
from .scatter import segments

BORDERS = {"zero": ZERO_FADE, "clamp": CLAMP}

# how the backward kernels treat the input gradient
NO_SCATTER = 0
ATOMIC = 1
KEYS = 2


@cuda.jit(cache=not SIMULATOR)
def _forward(inp_t, pts, out_t, N, C, H, W, P, rule, lanes):
    """out_t[n, p, c] (channels-last) = sample of channel c of inp_t[n] (N, H*W, C) at pts[n, p];
    ``lanes`` threads per point, thread ``lane`` of a point holding channels lane + k * lanes."""
    ft = inp_t.dtype.type
    zero = ft(0)
    total = N * P * lanes
    for t in range(cuda.grid(1), total, cuda.gridsize(1)):
        pt = t // lanes
        lane = t - pt * lanes
        n = pt // P
        idx, w, cy, cx = plan_of(rule, pts[2 * pt], pts[2 * pt + 1], H, W, ft)
        row = pt * C
        if w[0] == zero and w[1] == zero and w[2] == zero and w[3] == zero:
            for c in range(lane, C, lanes):
                out_t[row + c] = zero
            continue
        base = n * H * W
        r0 = (base + idx[0]) * C
        r1 = (base + idx[1]) * C
        r2 = (base + idx[2]) * C
        r3 = (base + idx[3]) * C
        for c in range(lane, C, lanes):
            out_t[row + c] = (
                w[0] * inp_t[r0 + c]
                + w[1] * inp_t[r1 + c]
                + w[2] * inp_t[r2 + c]
                + w[3] * inp_t[r3 + c]
            )


@cuda.jit(cache=not SIMULATOR)
def _backward(
    gout_t, inp_t, pts, gin_t, keys, wts, gpts, N, C, H, W, P, rule, lanes, scatter, need_pts
):
    """One kernel for both gradients (see the module docstring). gout_t (N, P, C) and inp_t
    (N, H*W, C) are channels-last; ``scatter``: NO_SCATTER, ATOMIC (into gin_t (N, H*W, C)) or
    KEYS (keys / wts for the owner kernel); ``need_pts``: write gpts (N, P, 2) as (y, x)."""
    ft = gout_t.dtype.type
    zero = ft(0)
    points = N * P
    n_keys = N * H * W
    total = ((points * lanes + 31) // 32) * 32  # padded: whole warps, for the shuffles
    for t in range(cuda.grid(1), total, cuda.gridsize(1)):
        pt = t // lanes
        lane = t - pt * lanes
        gy = zero
        gx = zero
        if pt < points:
            n = pt // P
            idx, w, cy, cx = plan_of(rule, pts[2 * pt], pts[2 * pt + 1], H, W, ft)
            base = n * H * W
            if scatter == 2 and lane == 0:
                for k in range(4):
                    keys[4 * pt + k] = base + idx[k] if w[k] != zero else n_keys
                    wts[4 * pt + k] = w[k]
            r0 = (base + idx[0]) * C
            r1 = (base + idx[1]) * C
            r2 = (base + idx[2]) * C
            r3 = (base + idx[3]) * C
            row = pt * C
            for c in range(lane, C, lanes):
                g = gout_t[row + c]
                if scatter == 1:
                    if w[0] != zero:
                        cuda.atomic.add(gin_t, r0 + c, w[0] * g)
                    if w[1] != zero:
                        cuda.atomic.add(gin_t, r1 + c, w[1] * g)
                    if w[2] != zero:
                        cuda.atomic.add(gin_t, r2 + c, w[2] * g)
                    if w[3] != zero:
                        cuda.atomic.add(gin_t, r3 + c, w[3] * g)
                if need_pts:
                    v0 = inp_t[r0 + c]
                    v1 = inp_t[r1 + c]
                    v2 = inp_t[r2 + c]
                    v3 = inp_t[r3 + c]
                    gy += g * (cy[0] * v0 + cy[1] * v1 + cy[2] * v2 + cy[3] * v3)
                    gx += g * (cx[0] * v0 + cx[1] * v1 + cx[2] * v2 + cx[3] * v3)
        if need_pts:  # uniform over the warp: every lane reaches the shuffles
            gy = lane_sum(gy, lanes)
            gx = lane_sum(gx, lanes)
            if pt < points and lane == 0:
                gpts[2 * pt] = gy
                gpts[2 * pt + 1] = gx


@cuda.jit(cache=not SIMULATOR)
def _owner(gout_t, order, starts, wts, gin_t, C):
    """Deterministic input gradient: gin_t[key, c] (channels-last, key = n * H * W + pixel) = the
    sum, in sorted order, of wts[e] * gout_t[e // 4, c] over the contributions e of that key."""
    ft = gin_t.dtype.type
    total = gin_t.size
    for i in range(cuda.grid(1), total, cuda.gridsize(1)):
        key = i // C
        c = i - key * C
        acc = ft(0)
        for j in range(starts[key], starts[key + 1]):
            e = order[j]
            acc += wts[e] * gout_t[(e // 4) * C + c]
        gin_t[i] = acc


# ------------------------------------------------------------------ host helpers (shared)


class Backward(NamedTuple):
    """The device buffers of one backward launch (unused ones are small placeholders)."""

    gout_t: Any  # (N, P, C) channels-last output gradient
    inp_t: Any  # (N, H*W, C) channels-last input (points gradient only)
    gin_t: Any  # (N, H*W, C) channels-last input gradient (atomic mode)
    keys: Any  # (4 * N * P,) int64 (deterministic mode)
    wts: Any  # (4 * N * P,) weights (deterministic mode)
    gpts: Any  # (N * P * 2,) points / grid gradient
    lanes: int
    scatter: int
    need_pts: bool
    blocks: tuple[int, int]


def backward_buffers(
    grad_out: Any, input: Any, P: int, needs: tuple[bool, bool], pts_dtype: Any
) -> Backward:
    """Transpose what the backward reads to channels-last and allocate what it writes."""
    N, C, H, W = (int(s) for s in input.shape)
    HW = H * W
    gout_t = transpose_last(flat(grad_out), N, C, P)
    inp_t = transpose_last(flat(input), N, C, HW) if needs[1] else gout_t
    scatter = NO_SCATTER
    gin_t = wts = gout_t
    keys = None
    if needs[0]:
        if are_deterministic_algorithms_enabled():
            scatter = KEYS
            keys = empty((4 * N * P,), np.int64)
            wts = empty((4 * N * P,), input.dtype)
        else:
            scatter = ATOMIC
            gin_t = zeros((N * HW * C,), input.dtype)
    if keys is None:
        keys = empty((1,), np.int64)
    gpts = empty((N * P * 2,), pts_dtype) if needs[1] else gout_t
    lanes = lanes_for(C)
    return Backward(
        gout_t, inp_t, gin_t, keys, wts, gpts, lanes, scatter, bool(needs[1]),
        grid(padded(N * P * lanes)),
    )  # fmt: skip


def input_gradient(b: Backward, input: Any) -> Any:
    """The input gradient (N, C, H, W) after the backward kernel: the owner kernel in
    deterministic mode, then the transpose back from channels-last."""
    N, C, H, W = (int(s) for s in input.shape)
    gin_t = b.gin_t
    if b.scatter == KEYS:
        order, starts = segments(b.keys, N * H * W)
        gin_t = empty((N * H * W * C,), input.dtype)
        _owner[grid(gin_t.size)](b.gout_t, order, starts, b.wts, gin_t, C)
    return transpose_last(gin_t, N, H * W, C).reshape(N, C, H, W)


# ------------------------------------------------------------------ the op


def bilinear_interpolate_forward(input: Any, points: Any, border: str) -> Any:
    N, C, H, W = (int(s) for s in input.shape)
    P = int(points.shape[1])
    if N * C * P == 0 or H * W == 0:
        return zeros((N, C, P), input.dtype)
    lanes = lanes_for(C)
    inp_t = transpose_last(flat(input), N, C, H * W)
    out_t = empty((N * P * C,), input.dtype)
    _forward[grid(N * P * lanes)](inp_t, flat(points), out_t, N, C, H, W, P, BORDERS[border], lanes)
    return transpose_last(out_t, N, P, C).reshape(N, C, P)


def bilinear_interpolate_backward(
    grad_out: Any, input: Any, points: Any, border: str, needs: tuple[bool, bool]
) -> tuple[Any, Any]:
    N, C, H, W = (int(s) for s in input.shape)
    P = int(points.shape[1])
    if N * C * P == 0 or H * W == 0 or not (needs[0] or needs[1]):
        g_in = zeros(input.shape, input.dtype) if needs[0] else None
        g_pts = zeros(points.shape, points.dtype) if needs[1] else None
        return g_in, g_pts
    b = backward_buffers(grad_out, input, P, needs, points.dtype)
    _backward[b.blocks](
        b.gout_t, b.inp_t, flat(points), b.gin_t, b.keys, b.wts, b.gpts,
        N, C, H, W, P, BORDERS[border], b.lanes, b.scatter, b.need_pts,
    )  # fmt: skip
    g_in = input_gradient(b, input) if needs[0] else None
    g_pts = b.gpts.reshape(N, P, 2) if needs[1] else None
    return g_in, g_pts
