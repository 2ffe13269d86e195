"""The sampling rules as CUDA device functions, mirroring ``kernels/cpu/sampling.py``.

They are compiled from the very same Python functions as the CPU helpers
(``kernels/rules.py``), so the math of the zero-fade and clamp rules and of grid_sample's
coordinate rule exists once for both devices; see that module for the plan's contract
(``idx, w, cy, cx``: corner indices, weights, and d/dy, d/dx coefficients).

**Precision.** Every plan takes ``ft``, the arithmetic type; the kernels pass their data's
``dtype.type``, so a float32 launch computes its plans, weights and accumulators in float32 and a
float64 launch in float64. A kernel writes its constants as ``ft(...)`` and casts integer
coordinates with ``ft(...)`` before adding a float32 offset (int64 + float32 is float64 in Numba).
``tests/test_ptx.py`` compiles every kernel for compute capability 9.0 and fails on any float64
instruction in a float32 launch.

**Channel runs.** ``*_run`` helpers apply one plan to a run of channels of a channels-last map
(pixel ``p`` of channel ``c`` at ``base + p * stride + c``): thread ``lane`` of ``lanes`` handles
channels ``lane, lane + lanes, ...`` (see ``_launch``).
"""

from __future__ import annotations

from numba import cuda

from .. import rules

zero_fade_plan = cuda.jit(device=True)(rules.zero_fade_plan)  # (y, x, H, W, ft)
clamp_plan = cuda.jit(device=True)(rules.clamp_plan)  # (y, x, H, W, ft)
plan_value = cuda.jit(device=True)(rules.plan_value)  # (v, base, idx, w)
grid_coordinate = cuda.jit(device=True)(rules.grid_coordinate)  # (g, size, align, padding, ft)

ZERO_FADE = 0
CLAMP = 1


@cuda.jit(device=True)
def plan_of(rule, y, x, H, W, ft):
    """The plan of rule ZERO_FADE (0) or CLAMP (1) at (y, x)."""
    if rule == 0:
        return zero_fade_plan(y, x, H, W, ft)
    return clamp_plan(y, x, H, W, ft)


@cuda.jit(device=True)
def strided_value(v, base, stride, idx, w):
    """sum_k w[k] * v[base + idx[k] * stride]: one channel of a channels-last map."""
    return (
        w[0] * v[base + idx[0] * stride]
        + w[1] * v[base + idx[1] * stride]
        + w[2] * v[base + idx[2] * stride]
        + w[3] * v[base + idx[3] * stride]
    )


@cuda.jit(device=True)
def scatter_plan(g, base, stride, idx, w, value):
    """g[base + idx[k] * stride] += w[k] * value for the four corners (atomic; corners of zero
    weight are skipped)."""
    for k in range(4):
        if w[k] != 0:
            cuda.atomic.add(g, base + idx[k] * stride, w[k] * value)
