"""The CPU sampling toolkit shared by every CPU kernel that samples.

* the bilinear plans of both border rules and grid_sample's coordinate rule, compiled from
  ``kernels/rules.py`` (where their math and the plan's contract are written, once for both
  devices);
* channel-run helpers: with channels-last data, the four corners of a plan are four contiguous
  runs of channels, and these loops vectorize;
* layout transposes between (N, C, P) and (N, P, C);
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

# The CPU kernels build their plans and grid coordinates in float64 for both dtypes (a float32
# kernel still stores float32 results); ``rules`` takes the arithmetic type as its last argument.
# ``zero_fade_plan_ft`` / ``clamp_plan_ft`` take it too, for a kernel whose float32 loops want
# float32 plans (ft = np.float32: eight lanes of AVX2 instead of four).
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

# ---------------------------------------------------------------------------------------------
# Channel-run helpers shared by the sampling kernels: with channels-last data, the four corners
# of a plan are four contiguous runs of channels, and these loops vectorize.
# ---------------------------------------------------------------------------------------------


@njit(cache=True)
def combine4(out, r0, r1, r2, r3, w0, w1, w2, w3):
    """out[c] = w0*r0[c] + w1*r1[c] + w2*r2[c] + w3*r3[c] (a sample's value for a channel run)."""
    for c in range(out.shape[0]):
        out[c] = w0 * r0[c] + w1 * r1[c] + w2 * r2[c] + w3 * r3[c]


@njit(cache=True)
def fill_zero(out):
    for c in range(out.shape[0]):
        out[c] = 0.0


@njit(fastmath={"reassoc", "contract"}, cache=True)
def dot4(g, r0, r1, r2, r3):
    """(g.r0, g.r1, g.r2, g.r3) over a channel run, summed in float64. Reassociation lets the
    compiler vectorize the sums; the compiled order is fixed, so results are reproducible."""
    s0 = 0.0
    s1 = 0.0
    s2 = 0.0
    s3 = 0.0
    for c in range(g.shape[0]):
        gc = np.float64(g[c])
        s0 += gc * r0[c]
        s1 += gc * r1[c]
        s2 += gc * r2[c]
        s3 += gc * r3[c]
    return s0, s1, s2, s3


@njit(cache=True)
def axpy(r, w, g):
    """r[c] += w * g[c] (one corner of a sample scattering a channel run)."""
    for c in range(r.shape[0]):
        r[c] += w * g[c]


# Layout transposes run serially (tiled; faster than NumPy's strided copy): a parallel region
# for a memory-bound copy saves little and costs a thread wake-up (milliseconds when the machine
# is busy).
_TILE = 16  # positions per tile


@njit(cache=True)
def to_channels_last(src, dst):
    """dst[n, p, c] = src[n, c, p]: (N, C, P) -> (N, P, C)."""
    N, C, P = src.shape
    for n in range(N):
        for p0 in range(0, P, _TILE):
            p1 = min(p0 + _TILE, P)
            for c in range(C):
                for p in range(p0, p1):
                    dst[n, p, c] = src[n, c, p]


@njit(cache=True)
def from_channels_last(src, dst):
    """dst[n, c, p] = src[n, p, c]: (N, P, C) -> (N, C, P)."""
    N, P, C = src.shape
    for n in range(N):
        for p0 in range(0, P, _TILE):
            p1 = min(p0 + _TILE, P)
            for c in range(C):
                for p in range(p0, p1):
                    dst[n, c, p] = src[n, p, c]


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


def channel_block(tasks: int, C: int) -> int:
    """Channels per input-gradient task: about two tasks per thread over ``tasks`` images, in
    blocks of at least 16 channels. No result depends on it."""
    ncb = max(1, min(C // 16, -(-2 * numba.get_num_threads() // max(1, tasks))))
    return max(1, -(-C // ncb))


def channels_last(a):
    """(N, C, ...) -> a new C-contiguous (N, prod(...), C) array."""
    N, C = a.shape[:2]
    src = np.ascontiguousarray(a).reshape(N, C, -1)
    dst = np.empty((N, src.shape[2], C), dtype=a.dtype)
    if dst.size:
        to_channels_last(src, dst)
    return dst
