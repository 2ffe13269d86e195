"""CPU kernels of ``grid_sample`` (see docs/ops/bilinear.rst).

input (N, C, Hin, Win), grid (N, Hout, Wout, 2) holding normalized (x, y); bilinear only.

The op is bilinear sampling at transformed points: the kernels of ``bilinear.py`` in their
``GRID`` mode compute each point's plan from its grid value with grid_sample's coordinate rule
(``rules.grid_coordinate``, the same code as on CUDA: unnormalize, then the padding mode's
reflection and clipping) followed by the zero-fade plan, and apply the chain rule
d/d grid = d/d coordinate * d coordinate/d grid in the backward. No coordinate array is
materialised; layout, parallelism and determinism (bit-identical with any thread count) are
described in ``bilinear.py``.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from ..rules import PADDING_MODES
from .bilinear import GRID, sample, sample_grad


def grid_sample_forward(input: Any, grid_: Any, padding_mode: str, align_corners: bool) -> Any:
    """out (N, C, Hout, Wout) = input sampled at the grid (bilinear, ``padding_mode``)."""
    N, C, Hin, Win = input.shape
    Hout, Wout = grid_.shape[1:3]
    src = np.ascontiguousarray(grid_).reshape(N, Hout * Wout, 2)
    out = sample(input, src, GRID, padding=PADDING_MODES[padding_mode], align=align_corners)
    return out.reshape(N, C, Hout, Wout)


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
    src = np.ascontiguousarray(grid_).reshape(N, P, 2)
    g_in, g_src = sample_grad(
        np.ascontiguousarray(grad_out).reshape(N, C, P), input, src, GRID,
        padding=PADDING_MODES[padding_mode], align=align_corners, needs=tuple(needs),
    )  # fmt: skip
    g_grid = None if g_src is None else g_src.reshape(grid_.shape)
    return g_in, g_grid
