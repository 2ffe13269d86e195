"""CPU kernels of ``grid_sample`` (SPEC section 5).

input (N, C, Hin, Win), grid (N, Hout, Wout, 2) holding normalized (x, y); bilinear only.

The op is bilinear sampling at transformed points, so it is computed in two steps:

1. ``source_coordinates`` maps each grid value g to a pixel coordinate and records the
   derivative d coordinate / d g (NumPy, elementwise, float64):

   * unnormalize: align_corners=True: c = (g + 1) / 2 * (size - 1), scale (size - 1) / 2;
     False: c = ((g + 1) * size - 1) / 2, scale size / 2;
   * padding "zeros": nothing more (the zero-fade rule fades points off the map to zero);
   * "border": c clipped to [0, size - 1], derivative zero where clipped (c < 0 or
     c >= size - 1: the right-hand convention; torch also zeroes it at c == 0 exactly);
   * "reflection": torch's reflect_coordinates (about [-0.5, size - 0.5] when
     align_corners=False, [0, size - 1] when True) and then the border clip; the derivative is
     +-1 times the scale between reflection points, as in torch.

   NaN coordinates stay NaN and sample zero in every mode; +-inf sample zero with "zeros" and
   "reflection" and clip to the border with "border" (as torch's clip does).

2. the zero-fade bilinear kernels of ``kernels/cpu/bilinear.py`` (the shared plans; forward over
   (n, block of points), input gradient by tasks that own whole input planes, points gradient by
   owner), then the chain rule: d/dg = d/dc * dc/dg.

Both steps are deterministic with any thread count.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from . import bilinear as _bil

PADDING = {"zeros": 0, "border": 1, "reflection": 2}


def _reflect(c: np.ndarray, twice_low: int, twice_high: int) -> tuple[np.ndarray, np.ndarray]:
    """torch's reflect_coordinates_set_grad, elementwise: (reflected c, d reflected / d c)."""
    if twice_low == twice_high:
        return np.zeros_like(c), np.zeros_like(c)
    low = twice_low / 2
    span = (twice_high - twice_low) / 2
    c = c - low
    mult = np.where(c < 0, -1.0, 1.0)
    c = np.abs(c)
    with np.errstate(invalid="ignore"):
        extra = np.fmod(c, span)
        flips = np.floor(c / span)
        even = np.fmod(flips, 2.0) == 0
    return np.where(even, extra + low, span - extra + low), np.where(even, mult, -mult)


def source_coordinates(
    g: np.ndarray, size: int, align_corners: bool, padding: int
) -> tuple[np.ndarray, np.ndarray]:
    """Pixel coordinates of normalized grid values ``g`` and their derivative d c / d g."""
    g = np.asarray(g, np.float64)
    if align_corners:
        c = (g + 1) / 2 * (size - 1)
        d = np.full_like(c, (size - 1) / 2)
    else:
        c = ((g + 1) * size - 1) / 2
        d = np.full_like(c, size / 2)
    if padding == 2:
        if align_corners:
            c, dr = _reflect(c, 0, 2 * (size - 1))
        else:
            c, dr = _reflect(c, -1, 2 * size - 1)
        d = d * dr
    if padding >= 1:
        low = c < 0
        high = c >= size - 1
        c = np.where(low, 0.0, np.where(high, float(size - 1), c))
        d = np.where(low | high, 0.0, d)
    return c, d


def _points(grid_: Any, Hin: int, Win: int, padding_mode: str, align_corners: bool) -> tuple:
    """(points (N, P, 2) as (y, x) float64, dy/dgy (N, P), dx/dgx (N, P))."""
    N, Hout, Wout = grid_.shape[:3]
    g = np.asarray(grid_).reshape(N, Hout * Wout, 2)
    pad = PADDING[padding_mode]
    x, dx = source_coordinates(g[..., 0], Win, bool(align_corners), pad)
    y, dy = source_coordinates(g[..., 1], Hin, bool(align_corners), pad)
    return np.ascontiguousarray(np.stack([y, x], axis=-1)), dy, dx


def grid_sample_forward(input: Any, grid_: Any, padding_mode: str, align_corners: bool) -> Any:
    """out (N, C, Hout, Wout) = input sampled at the grid (bilinear, ``padding_mode``)."""
    N, C, Hin, Win = input.shape
    Hout, Wout = grid_.shape[1:3]
    if N * C * Hout * Wout and Hin * Win:
        pts, _, _ = _points(grid_, Hin, Win, padding_mode, align_corners)
        return _bil.sample_forward(input, pts, 0).reshape(N, C, Hout, Wout)
    return np.zeros((N, C, Hout, Wout), dtype=input.dtype)


def grid_sample_backward(
    grad_out: Any,
    input: Any,
    grid_: Any,
    padding_mode: str,
    align_corners: bool,
    needs: tuple[bool, bool] = (True, True),
) -> tuple[Any, Any]:
    """(grad_input, grad_grid), None where ``needs`` is False; deterministic."""
    N, C, Hin, Win = input.shape
    Hout, Wout = grid_.shape[1:3]
    P = Hout * Wout
    g_in = g_grid = None
    if grad_out.size and Hin * Win:
        pts, dy, dx = _points(grid_, Hin, Win, padding_mode, align_corners)
        go = np.ascontiguousarray(grad_out, input.dtype).reshape(N, C, P)
        g_in, gp = _bil.sample_backward(go, input, pts, 0, tuple(needs))
        if needs[1]:
            g_grid = np.empty(grid_.shape, dtype=grid_.dtype)
            flat = g_grid.reshape(N, P, 2)
            flat[..., 0] = gp[..., 1] * dx
            flat[..., 1] = gp[..., 0] * dy
    else:
        g_in = np.zeros(input.shape, dtype=input.dtype) if needs[0] else None
        g_grid = np.zeros(grid_.shape, dtype=grid_.dtype) if needs[1] else None
    return g_in, g_grid
