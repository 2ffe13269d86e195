"""The sampling rules as CUDA device functions, mirroring ``kernels/cpu/sampling.py``.

They are compiled from the very same Python functions as the CPU helpers
(``kernels/rules.py``), so the math of the zero-fade and clamp rules and of grid_sample's
coordinate rule exists once for both devices; see that module for the plan's contract
(``idx, w, cy, cx``: corner indices, weights, and d/dy, d/dx coefficients).
"""

from __future__ import annotations

from numba import cuda

from .. import rules

zero_fade_plan = cuda.jit(device=True)(rules.zero_fade_plan)
clamp_plan = cuda.jit(device=True)(rules.clamp_plan)
plan_value = cuda.jit(device=True)(rules.plan_value)
grid_coordinate = cuda.jit(device=True)(rules.grid_coordinate)

ZERO_FADE = 0
CLAMP = 1


@cuda.jit(device=True)
def plan_of(rule, y, x, H, W):
    """The plan of rule ZERO_FADE (0) or CLAMP (1) at (y, x)."""
    if rule == 0:
        return zero_fade_plan(y, x, H, W)
    return clamp_plan(y, x, H, W)


@cuda.jit(device=True)
def scatter_plan(g, base, idx, w, value):
    """g[base + idx[k]] += w[k] * value for the four corners (atomic)."""
    for k in range(4):
        if w[k] != 0.0:
            cuda.atomic.add(g, base + idx[k], w[k] * value)
