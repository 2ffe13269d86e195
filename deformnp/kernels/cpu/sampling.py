"""The CPU sampling toolkit shared by every CPU kernel that samples.

* the bilinear plans of both border rules and grid_sample's coordinate rule, compiled from
  ``kernels/rules.py`` (where their math and the plan's contract are written, once for both
  devices);
* channel-run helpers: with channels-last data, the four corners of a plan are four contiguous
  runs of channels, and these loops vectorize;
* thread choice: small problems run on the calling thread (:func:`threads_for`).

No result of any kernel depends on the number of threads: the kernels partition their work so
that every output element has one writer, or reduce per-task buffers in a fixed order.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import numba
import numpy as np
from numba import njit

from .. import rules

_zero_fade_plan = njit(inline="always", cache=True)(rules.zero_fade_plan)
_clamp_plan = njit(inline="always", cache=True)(rules.clamp_plan)
_grid_coordinate = njit(inline="always", cache=True)(rules.grid_coordinate)
plan_value = njit(inline="always", cache=True)(rules.plan_value)

# Most CPU kernels build their plans and grid coordinates in float64 for both dtypes (a float32
# kernel still stores float32 results); ``rules`` takes the arithmetic type as its last argument.
# ``zero_fade_plan_ft`` / ``clamp_plan_ft`` take it too, for a kernel whose float32 loops want
# float32 plans (ms_deform_attn: its plan loop dominates at small sizes).
zero_fade_plan_ft = _zero_fade_plan
clamp_plan_ft = _clamp_plan


@njit(inline="always", cache=True)
def zero_fade_plan(y, x, H, W):
    return _zero_fade_plan(y, x, H, W, np.float64)


@njit(inline="always", cache=True)
def clamp_plan(y, x, H, W):
    return _clamp_plan(y, x, H, W, np.float64)


@njit(inline="always", cache=True)
def grid_coordinate(g, size, align_corners, padding):
    return _grid_coordinate(g, size, align_corners, padding, np.float64)


ZERO_FADE = 0
CLAMP = 1


@njit(inline="always", cache=True)
def plan_of(rule, y, x, H, W):
    """The plan of rule ZERO_FADE (0) or CLAMP (1) at (y, x)."""
    if rule == 0:
        return zero_fade_plan(y, x, H, W)
    return clamp_plan(y, x, H, W)


# ---------------------------------------------------------------------------------------------
# Channel-run helpers: with channels-last data, the four corners of a plan are four contiguous
# runs of channels. They index flat arrays with unsigned offsets (d, e, a0..a3, s, n:
# np.uint64): Numba checks signed indices for wraparound, which keeps LLVM from vectorizing
# the loop; unsigned ones need no check (measured: 3x faster than the same loop over slices).
# ---------------------------------------------------------------------------------------------


@njit(cache=True)
def fill_zero(out, d, n):
    """out[d + u] = 0, u < n."""
    for u in range(n):
        out[d + u] = 0.0


@njit(cache=True)
def combine4(out, d, v, n, a0, a1, a2, a3, w0, w1, w2, w3):
    """out[d + u] = w0*v[a0 + u] + w1*v[a1 + u] + w2*v[a2 + u] + w3*v[a3 + u], u < n: a
    sample's value for a run of channels."""
    for u in range(n):
        out[d + u] = w0 * v[a0 + u] + w1 * v[a1 + u] + w2 * v[a2 + u] + w3 * v[a3 + u]


@njit(fastmath={"reassoc", "contract"}, cache=True)
def combine_dot4(out, d, g, e, v, n, a0, a1, a2, a3, w0, w1, w2, w3):
    """out[d + u] = w0*v[a0 + u] + ... + w3*v[a3 + u] (as combine4), and returns the four dot
    products (sum_u g[e + u] * v[a_t + u] for t = 0..3), summed in g's dtype, in one pass over
    the corners. Reassociation lets the compiler vectorize the sums (float32: 8 lanes; summed in
    float64 they ran 4 lanes with a conversion per product: deform_conv2d's whole points pass
    took 1.3x the time); the compiled order is fixed, so results are reproducible. A
    kernel that calls only this routine for both (with a scratch ``out`` or a zero ``g`` when
    one is not needed) gets every result bit-identical whichever others are asked for."""
    ft = g.dtype.type
    s0 = ft(0.0)
    s1 = ft(0.0)
    s2 = ft(0.0)
    s3 = ft(0.0)
    for u in range(n):
        x0 = v[a0 + u]
        x1 = v[a1 + u]
        x2 = v[a2 + u]
        x3 = v[a3 + u]
        out[d + u] = w0 * x0 + w1 * x1 + w2 * x2 + w3 * x3
        gu = g[e + u]
        s0 += gu * x0
        s1 += gu * x1
        s2 += gu * x2
        s3 += gu * x3
    return s0, s1, s2, s3


@njit(cache=True)
def axpy(r, s, w, g, d, n):
    """r[s + u] += w * g[d + u], u < n (one corner of a sample scattering a channel run)."""
    for u in range(n):
        r[s + u] += w * g[d + u]


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
