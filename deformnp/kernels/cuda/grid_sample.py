"""CUDA kernels of ``grid_sample`` (docs/ops/bilinear.rst), mirroring
``kernels/cpu/grid_sample.py``.

input (N, C, Hin, Win), grid (N, Hout, Wout, 2) holding normalized (x, y); bilinear only. Each
grid point goes through grid_sample's coordinate rule (``rules.grid_coordinate``, the same code
as on the CPU: the "zeros", "border" and "reflection" padding modes), then the zero-fade rule
samples there. The design is that of ``bilinear.py`` (whose host helpers and deterministic owner
kernel are reused here), with the P = Hout * Wout grid points as sampling points:

* **forward** (``_forward``): the input is transposed to channels-last (N, Hin*Win, C); each grid
  point gets ``lanes = lanes_for(C)`` consecutive threads, each of which computes the coordinate
  rule and the plan once and applies them to its channels ``c = lane, lane + lanes, ...``
  (coalesced reads of consecutive channels), writing a channels-last output (N, P, C) that is
  transposed back to (N, C, Hout, Wout).
* **backward** (``_backward``, one kernel per point group over ``padded(N * P * lanes)``
  threads): the output gradient is transposed to channels-last; each lane scatters its channels'
  input gradient with float atomic adds into a channels-last buffer (transposed back at the end)
  and accumulates its partial d/dy, d/dx; ``lane_sum`` reduces them across the lanes (warp
  shuffles, fixed order) and lane 0 writes the grid gradient, times the coordinate rule's
  derivative (one writer: deterministic).
* **deterministic mode** (``are_deterministic_algorithms_enabled()``): no atomics; lane 0 writes
  a key per (point, corner) (the destination pixel, or N * Hin * Win for a zero-weight corner)
  and its weight, ``scatter.segments`` sorts them, and ``bilinear._owner`` (one thread per
  (pixel, channel)) sums in sorted order: bit-identical from run to run.

Work that ``needs`` does not ask for is skipped. **Precision**: ``ft = input.dtype.type``; a
float32 launch does its coordinate rule, plans and sums in float32, a float64 launch in float64.
"""

from __future__ import annotations

from typing import Any

from numba import cuda

from ..rules import PADDING_MODES
from ._launch import SIMULATOR, empty, flat, grid, lane_sum, lanes_for, transpose_last, zeros
from .bilinear import backward_buffers, input_gradient
from .sampling import grid_coordinate, zero_fade_plan


@cuda.jit(cache=not SIMULATOR)
def _forward(inp_t, grd, out_t, N, C, Hin, Win, P, align, padding, lanes):
    """out_t[n, p, c] (channels-last) = channel c of inp_t[n] (N, Hin*Win, C) sampled at grid
    point p; ``lanes`` threads per grid point."""
    ft = inp_t.dtype.type
    zero = ft(0)
    total = N * P * lanes
    for t in range(cuda.grid(1), total, cuda.gridsize(1)):
        pt = t // lanes
        lane = t - pt * lanes
        n = pt // P
        x, sx = grid_coordinate(grd[2 * pt], Win, align, padding, ft)
        y, sy = grid_coordinate(grd[2 * pt + 1], Hin, align, padding, ft)
        idx, w, cy, cx = zero_fade_plan(y, x, Hin, Win, ft)
        row = pt * C
        if w[0] == zero and w[1] == zero and w[2] == zero and w[3] == zero:
            for c in range(lane, C, lanes):
                out_t[row + c] = zero
            continue
        base = n * Hin * Win
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
    gout_t, inp_t, grd, gin_t, keys, wts, ggrid, N, C, Hin, Win, P, align, padding, lanes,
    scatter, need_grid,
):  # fmt: skip
    """Both gradients in one kernel (see ``bilinear._backward``): gout_t (N, P, C) and inp_t
    (N, Hin*Win, C) channels-last; ``scatter`` 0: none, 1: atomics into gin_t (N, Hin*Win, C),
    2: keys / wts for the owner kernel; ``need_grid``: write ggrid (N, P, 2) as (x, y)."""
    ft = gout_t.dtype.type
    zero = ft(0)
    points = N * P
    n_keys = N * Hin * Win
    total = ((points * lanes + 31) // 32) * 32  # padded: whole warps, for the shuffles
    for t in range(cuda.grid(1), total, cuda.gridsize(1)):
        pt = t // lanes
        lane = t - pt * lanes
        gy = zero
        gx = zero
        sy = zero
        sx = zero
        if pt < points:
            n = pt // P
            x, sx = grid_coordinate(grd[2 * pt], Win, align, padding, ft)
            y, sy = grid_coordinate(grd[2 * pt + 1], Hin, align, padding, ft)
            idx, w, cy, cx = zero_fade_plan(y, x, Hin, Win, ft)
            base = n * Hin * Win
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
                if need_grid:
                    v0 = inp_t[r0 + c]
                    v1 = inp_t[r1 + c]
                    v2 = inp_t[r2 + c]
                    v3 = inp_t[r3 + c]
                    gy += g * (cy[0] * v0 + cy[1] * v1 + cy[2] * v2 + cy[3] * v3)
                    gx += g * (cx[0] * v0 + cx[1] * v1 + cx[2] * v2 + cx[3] * v3)
        if need_grid:  # uniform over the warp: every lane reaches the shuffles
            gy = lane_sum(gy, lanes)
            gx = lane_sum(gx, lanes)
            if pt < points and lane == 0:
                ggrid[2 * pt] = gx * sx
                ggrid[2 * pt + 1] = gy * sy


def _dims(input: Any, grid_: Any) -> tuple[int, ...]:
    N, C, Hin, Win = (int(s) for s in input.shape)
    return N, C, Hin, Win, int(grid_.shape[1]), int(grid_.shape[2])


def grid_sample_forward(input: Any, grid_: Any, padding_mode: str, align_corners: bool) -> Any:
    N, C, Hin, Win, Hout, Wout = _dims(input, grid_)
    P = Hout * Wout
    if N * C * P == 0 or Hin * Win == 0:
        return zeros((N, C, Hout, Wout), input.dtype)
    lanes = lanes_for(C)
    inp_t = transpose_last(flat(input), N, C, Hin * Win)
    out_t = empty((N * P * C,), input.dtype)
    _forward[grid(N * P * lanes)](
        inp_t, flat(grid_), out_t, N, C, Hin, Win, P, bool(align_corners),
        PADDING_MODES[padding_mode], lanes,
    )  # fmt: skip
    return transpose_last(out_t, N, P, C).reshape(N, C, Hout, Wout)


def grid_sample_backward(
    grad_out: Any,
    input: Any,
    grid_: Any,
    padding_mode: str,
    align_corners: bool,
    needs: tuple[bool, bool],
) -> tuple:
    N, C, Hin, Win, Hout, Wout = _dims(input, grid_)
    P = Hout * Wout
    if N * C * P == 0 or Hin * Win == 0 or not (needs[0] or needs[1]):
        g_in = zeros(input.shape, input.dtype) if needs[0] else None
        g_grid = zeros(grid_.shape, grid_.dtype) if needs[1] else None
        return g_in, g_grid
    b = backward_buffers(grad_out, input, P, needs, grid_.dtype)
    _backward[b.blocks](
        b.gout_t, b.inp_t, flat(grid_), b.gin_t, b.keys, b.wts, b.gpts,
        N, C, Hin, Win, P, bool(align_corners), PADDING_MODES[padding_mode], b.lanes,
        b.scatter, b.need_pts,
    )  # fmt: skip
    g_in = input_gradient(b, input) if needs[0] else None
    g_grid = b.gpts.reshape(grid_.shape) if needs[1] else None
    return g_in, g_grid
