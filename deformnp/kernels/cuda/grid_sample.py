"""CUDA kernels of ``grid_sample`` (SPEC section 5), mirroring ``kernels/cpu/grid_sample.py``.

input (N, C, Hin, Win), grid (N, Hout, Wout, 2) holding normalized (x, y); bilinear only. Each
grid value goes through grid_sample's coordinate rule (``rules.grid_coordinate``, the same code
as on the CPU: the "zeros", "border" and "reflection" padding modes), then the zero-fade rule
samples there. The input gradient is scattered with atomic adds and so
is not bit-reproducible; the grid gradient has one writer per grid point (deterministic).
"""

from __future__ import annotations

from typing import Any

from numba import cuda

from ..rules import PADDING_MODES
from ._launch import SIMULATOR, empty, flat, grid, zeros
from .sampling import grid_coordinate, plan_value, scatter_plan, zero_fade_plan


@cuda.jit(cache=not SIMULATOR)
def _forward(inp, grd, out, N, C, Hin, Win, Hout, Wout, align, padding):
    total = N * C * Hout * Wout
    for i in range(cuda.grid(1), total, cuda.gridsize(1)):
        q = i % (Hout * Wout)
        c = (i // (Hout * Wout)) % C
        n = i // (C * Hout * Wout)
        g = (n * Hout * Wout + q) * 2
        x, sx = grid_coordinate(grd[g], Win, align, padding)
        y, sy = grid_coordinate(grd[g + 1], Hin, align, padding)
        idx, w, cy, cx = zero_fade_plan(y, x, Hin, Win)
        out[i] = plan_value(inp, (n * C + c) * Hin * Win, idx, w)


@cuda.jit(cache=not SIMULATOR)
def _backward_input(gout, grd, gin, N, C, Hin, Win, Hout, Wout, align, padding):
    total = N * C * Hout * Wout
    for i in range(cuda.grid(1), total, cuda.gridsize(1)):
        q = i % (Hout * Wout)
        c = (i // (Hout * Wout)) % C
        n = i // (C * Hout * Wout)
        g = (n * Hout * Wout + q) * 2
        x, sx = grid_coordinate(grd[g], Win, align, padding)
        y, sy = grid_coordinate(grd[g + 1], Hin, align, padding)
        idx, w, cy, cx = zero_fade_plan(y, x, Hin, Win)
        scatter_plan(gin, (n * C + c) * Hin * Win, idx, w, gout[i])


@cuda.jit(cache=not SIMULATOR)
def _backward_grid(gout, inp, grd, ggrid, N, C, Hin, Win, Hout, Wout, align, padding):
    total = N * Hout * Wout
    for i in range(cuda.grid(1), total, cuda.gridsize(1)):
        q = i % (Hout * Wout)
        n = i // (Hout * Wout)
        x, sx = grid_coordinate(grd[i * 2], Win, align, padding)
        y, sy = grid_coordinate(grd[i * 2 + 1], Hin, align, padding)
        idx, w, cy, cx = zero_fade_plan(y, x, Hin, Win)
        gy = 0.0
        gx = 0.0
        for c in range(C):
            base = (n * C + c) * Hin * Win
            go = gout[(n * C + c) * Hout * Wout + q]
            gy += go * plan_value(inp, base, idx, cy)
            gx += go * plan_value(inp, base, idx, cx)
        ggrid[i * 2] = gx * sx
        ggrid[i * 2 + 1] = gy * sy


def _dims(input: Any, grid_: Any) -> tuple[int, ...]:
    N, C, Hin, Win = (int(s) for s in input.shape)
    return N, C, Hin, Win, int(grid_.shape[1]), int(grid_.shape[2])


def grid_sample_forward(input: Any, grid_: Any, padding_mode: str, align_corners: bool) -> Any:
    N, C, Hin, Win, Hout, Wout = _dims(input, grid_)
    out = empty((N, C, Hout, Wout), input.dtype)
    if out.size and Hin * Win:
        _forward[grid(out.size)](
            flat(input),
            flat(grid_),
            flat(out),
            N,
            C,
            Hin,
            Win,
            Hout,
            Wout,
            bool(align_corners),
            PADDING_MODES[padding_mode],
        )
    elif out.size:
        out = zeros(out.shape, input.dtype)
    return out


def grid_sample_backward(
    grad_out: Any,
    input: Any,
    grid_: Any,
    padding_mode: str,
    align_corners: bool,
    needs: tuple[bool, bool],
) -> tuple:
    N, C, Hin, Win, Hout, Wout = _dims(input, grid_)
    pad = PADDING_MODES[padding_mode]
    g_in = g_grid = None
    if needs[0]:
        g_in = zeros(input.shape, input.dtype)
        if grad_out.size and Hin * Win:
            _backward_input[grid(grad_out.size)](
                flat(grad_out),
                flat(grid_),
                flat(g_in),
                N,
                C,
                Hin,
                Win,
                Hout,
                Wout,
                bool(align_corners),
                pad,
            )
    if needs[1]:
        g_grid = zeros(grid_.shape, grid_.dtype)
        if N * Hout * Wout and Hin * Win:
            _backward_grid[grid(N * Hout * Wout)](
                flat(grad_out),
                flat(input),
                flat(grid_),
                flat(g_grid),
                N,
                C,
                Hin,
                Win,
                Hout,
                Wout,
                bool(align_corners),
                pad,
            )
    return g_in, g_grid
