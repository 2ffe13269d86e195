"""Launch configuration and small utility kernels shared by every CUDA kernel.

Every kernel in ``kernels/cuda`` walks its work with a grid-stride loop over a 64-bit counter::

    for i in range(cuda.grid(1), total, cuda.gridsize(1)):   # total is int64

so a launch of any size is correct, indices never overflow 32 bits, and the grid can be capped.
Under Numba's CUDA simulator (``NUMBA_ENABLE_CUDASIM=1``: one OS thread per CUDA thread) every
launch is one thread in one block, and the grid-stride loop covers all the work. More threads
only slow the simulator down: each device-function call takes module-wide locks, and concurrent
Python threads convoy on them (measured: a small deform_conv2d forward took 0.34 s with one
thread, 25 s with two and 187 s with four).

**Channel lanes.** The gather kernels give each sampling point ``lanes`` consecutive threads of
one warp (a power of two, at most 32): the point's bilinear plan is computed once per thread and
applied to that thread's run of channels ``c = lane, lane + lanes, ...``, so at every step the
lanes read consecutive channels of a channels-last row (coalesced). Sums over channels (position
and weight gradients) are reduced across the lanes with warp shuffles (:func:`lane_sum`). Such a
kernel walks ``padded(points * lanes)`` threads so that every lane of a warp runs the same number
of iterations (shuffles need the whole warp); threads past the work are idle but present. The
simulator has no warp shuffles, so there ``lanes`` is 1 and each thread holds all the channels of
a point (the same kernel code; the shuffle loop is empty).
"""

from __future__ import annotations

from typing import Any

import numpy as np
from numba import config, cuda

SIMULATOR = bool(getattr(config, "ENABLE_CUDASIM", False))
THREADS = 1 if SIMULATOR else 256
MAX_BLOCKS = 1 if SIMULATOR else 65535 * 8
WARP = 32
CHANNELS_PER_LANE = 4  # target run of channels per thread


def grid(total: int) -> tuple[int, int]:
    """(blocks, threads) for ``total`` work items walked with a grid-stride loop."""
    blocks = max(1, min(-(-int(total) // THREADS), MAX_BLOCKS))
    return blocks, THREADS


def lanes_for(channels: int) -> int:
    """Threads sharing one sampling point: about CHANNELS_PER_LANE channels each, a power of two
    in [1, 32]; 1 under the simulator."""
    if SIMULATOR:
        return 1
    lanes = 1
    while lanes < WARP and lanes * CHANNELS_PER_LANE < channels:
        lanes *= 2
    return lanes


def padded(total: int) -> int:
    """``total`` rounded up to whole warps (see the module docstring)."""
    return -(-int(total) // WARP) * WARP


@cuda.jit(device=True)
def lane_sum(v, lanes):
    """The sum of ``v`` over the ``lanes`` consecutive threads of a point (all of them get it).
    A butterfly of warp shuffles: fixed order, so the same inputs give the same bits."""
    off = lanes // 2
    while off > 0:
        v += cuda.shfl_xor_sync(0xFFFFFFFF, v, off)
        off //= 2
    return v


@cuda.jit(cache=not SIMULATOR)
def _fill(out, value):
    for i in range(cuda.grid(1), out.size, cuda.gridsize(1)):
        out[i] = value


@cuda.jit(cache=not SIMULATOR)
def _transpose(src, dst, N, R, C):
    """dst[n, c, r] = src[n, r, c] for (N, R, C) -> (N, C, R); one thread per dst element, so the
    writes are coalesced (the strided reads mostly hit L2)."""
    total = N * R * C
    for i in range(cuda.grid(1), total, cuda.gridsize(1)):
        r = i % R
        c = (i // R) % C
        n = i // (R * C)
        dst[i] = src[(n * R + r) * C + c]


def flat(a: Any) -> Any:
    """A 1-d view of a C-contiguous device array."""
    return a.reshape(a.size) if len(a.shape) != 1 else a


def empty(shape: tuple, dtype: Any) -> Any:
    return cuda.device_array(tuple(int(s) for s in shape), dtype=np.dtype(dtype))


def full(shape: tuple, value: float, dtype: Any) -> Any:
    out = empty(shape, dtype)
    if out.size:
        f = flat(out)
        _fill[grid(f.size)](f, f.dtype.type(value))
    return out


def zeros(shape: tuple, dtype: Any) -> Any:
    return full(shape, 0, dtype)


def transpose_last(a: Any, N: int, R: int, C: int) -> Any:
    """A new flat device array holding ``a`` (flat, (N, R, C) row-major) as (N, C, R).
    ``transpose_last(x, N, C, P)`` turns (N, C, P) into channels-last (N, P, C) and
    ``transpose_last(y, N, P, C)`` turns it back."""
    out = empty((N * R * C,), a.dtype)
    if out.size:
        _transpose[grid(out.size)](flat(a), out, N, R, C)
    return out
