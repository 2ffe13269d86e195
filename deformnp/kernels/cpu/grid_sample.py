"""CPU kernels of ``grid_sample`` (SPEC section 5).

input (N, C, Hin, Win), grid (N, Hout, Wout, 2) holding normalized (x, y); bilinear only.

The op is bilinear sampling at transformed points, so it is computed in two steps:

1. ``_grid_points`` maps each grid value to a pixel coordinate and records the derivative
   d coordinate / d grid, with grid_sample's coordinate rule (``rules.grid_coordinate``, the
   same code as on CUDA: unnormalize, then the padding mode's reflection and clipping);
2. the zero-fade bilinear kernels of ``bilinear.py`` (forward over (n, block of points), input
   gradient by tasks that own whole input planes, points gradient by owner), then the chain
   rule: d/d grid = d/d coordinate * d coordinate/d grid.

Both steps are deterministic with any thread count.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from numba import float64, njit

from ..rules import PADDING_MODES
from .bilinear import sample_points, sample_points_grad
from .sampling import ZERO_FADE, grid_coordinate


@njit(cache=True)
def _grid_points(grid, Hin, Win, padding, align_corners, pts, dy, dx):
    """pts[n, p] = (y, x) pixel coordinates of grid[n, p] and their derivatives dy[n, p] =
    d y / d grid_y, dx[n, p] = d x / d grid_x, p = i*Wout + j."""
    N, Hout, Wout, _ = grid.shape
    for n in range(N):
        for i in range(Hout):
            for j in range(Wout):
                p = i * Wout + j
                x, ddx = grid_coordinate(float64(grid[n, i, j, 0]), Win, align_corners, padding)
                y, ddy = grid_coordinate(float64(grid[n, i, j, 1]), Hin, align_corners, padding)
                pts[n, p, 0] = y
                pts[n, p, 1] = x
                dy[n, p] = ddy
                dx[n, p] = ddx


def _points(grid_: Any, Hin: int, Win: int, padding_mode: str, align_corners: bool) -> tuple:
    """(points (N, P, 2) as (y, x) float64, dy/dgy (N, P), dx/dgx (N, P))."""
    N, Hout, Wout = grid_.shape[:3]
    pts = np.empty((N, Hout * Wout, 2), np.float64)
    dy = np.empty((N, Hout * Wout), np.float64)
    dx = np.empty((N, Hout * Wout), np.float64)
    _grid_points(grid_, Hin, Win, PADDING_MODES[padding_mode], bool(align_corners), pts, dy, dx)
    return pts, dy, dx


def grid_sample_forward(input: Any, grid_: Any, padding_mode: str, align_corners: bool) -> Any:
    """out (N, C, Hout, Wout) = input sampled at the grid (bilinear, ``padding_mode``)."""
    N, C, Hin, Win = input.shape
    Hout, Wout = grid_.shape[1:3]
    if N * C * Hout * Wout and Hin * Win:
        pts, _, _ = _points(grid_, Hin, Win, padding_mode, align_corners)
        return sample_points(input, pts, ZERO_FADE).reshape(N, C, Hout, Wout)
    return np.zeros((N, C, Hout, Wout), dtype=input.dtype)


def grid_sample_backward(
    grad_out: Any,
    input: Any,
    grid_: Any,
    padding_mode: str,
    align_corners: bool,
    needs: tuple[bool, bool],
) -> tuple[Any, Any]:
    """(grad_input, grad_grid), None where ``needs`` is False; deterministic."""
    N, C, Hin, Win = input.shape
    Hout, Wout = grid_.shape[1:3]
    P = Hout * Wout
    g_in = g_grid = None
    if grad_out.size and Hin * Win:
        pts, dy, dx = _points(grid_, Hin, Win, padding_mode, align_corners)
        go = grad_out.reshape(N, C, P)
        g_in, gp = sample_points_grad(go, input, pts, ZERO_FADE, tuple(needs))
        if needs[1]:
            g_grid = np.empty(grid_.shape, dtype=grid_.dtype)
            flat = g_grid.reshape(N, P, 2)
            flat[..., 0] = gp[..., 1] * dx
            flat[..., 1] = gp[..., 0] * dy
    else:
        g_in = np.zeros(input.shape, dtype=input.dtype) if needs[0] else None
        g_grid = np.zeros(grid_.shape, dtype=grid_.dtype) if needs[1] else None
    return g_in, g_grid
