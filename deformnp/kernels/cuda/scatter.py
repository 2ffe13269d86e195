"""Deterministic scatters: the owner-computes alternative to float atomic adds.

A sampling op's input gradient is a scatter: contribution ``e`` (one corner of one sampling point,
numbered ``e = 4 * point + corner``) adds ``coefficient(e) * grad(point, c)`` to element
``(key(e), c)`` of the gradient, for every channel ``c``. With atomics the additions land in
whatever order the threads run, so the last bits change from run to run. Here instead:

1. the op's kernel writes ``keys[e]`` (the destination pixel, or ``n_keys`` for a contribution
   that goes nowhere, such as a corner of zero weight);
2. :func:`segments` sorts the contributions by ``(key, e)``: the pairs are unique, so the sorted
   order is one and the same on every run whatever the sort's schedule;
3. the op's owner kernel gives each destination element ``(key, c)`` one thread, which sums
   ``order[starts[key]:starts[key + 1]]`` in that order and writes (no atomics).

Extra memory: three int64 per contribution (keys, the sort buffer, the order), proportional to
the number of sampling points, never to the input size times anything. The sort is a bitonic
network over the packed 64-bit pairs ``key << bits | e``: log2(n) * (log2(n) + 1) / 2 passes for
n contributions rounded up to a power of two.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from numba import cuda

from ._launch import SIMULATOR, empty, grid

_MAX = np.iinfo(np.int64).max


@cuda.jit(cache=not SIMULATOR)
def _pack(keys, packed, E, bits):
    for i in range(cuda.grid(1), packed.size, cuda.gridsize(1)):
        if i < E:
            packed[i] = (keys[i] << bits) | i
        else:
            packed[i] = _MAX


@cuda.jit(cache=not SIMULATOR)
def _bitonic_step(a, j, k):
    """One compare-exchange pass of the bitonic network (pairs i < i ^ j)."""
    for i in range(cuda.grid(1), a.size, cuda.gridsize(1)):
        partner = i ^ j
        if partner > i:
            ascending = (i & k) == 0
            x = a[i]
            y = a[partner]
            if (x > y) == ascending:
                a[i] = y
                a[partner] = x


@cuda.jit(cache=not SIMULATOR)
def _unpack(packed, order, starts, E, bits, n_keys):
    """order[i] = the contribution at sorted position i; starts[k] = first position of key k."""
    mask = (1 << bits) - 1
    for i in range(cuda.grid(1), E, cuda.gridsize(1)):
        order[i] = packed[i] & mask
    for k in range(cuda.grid(1), n_keys + 2, cuda.gridsize(1)):
        target = k << bits
        lo = 0
        hi = E
        while lo < hi:  # first position whose key is >= k
            mid = (lo + hi) // 2
            if packed[mid] < target:
                lo = mid + 1
            else:
                hi = mid
        starts[k] = lo


def segments(keys: Any, n_keys: int) -> tuple[Any, Any]:
    """Sort the contributions by destination.

    ``keys``: a device int64 array (E,), each in [0, n_keys] (``n_keys`` marks a contribution that
    goes nowhere). Returns ``order`` (E,) int64, the contribution numbers sorted by (key, number),
    and ``starts`` (n_keys + 2,) int64: the contributions to key k are
    ``order[starts[k]:starts[k + 1]]``, in increasing number.
    """
    E = int(keys.size)
    bits = max(1, (E - 1).bit_length())
    if (int(n_keys) + 1).bit_length() + bits > 62:
        raise ValueError(
            f"deterministic scatter: {E} contributions to {n_keys} destinations do not fit the "
            "64-bit sort keys; call use_deterministic_algorithms(False) for this size"
        )
    n = 1 << max(0, (E - 1).bit_length())
    packed = empty((n,), np.int64)
    order = empty((max(E, 1),), np.int64)
    starts = empty((int(n_keys) + 2,), np.int64)
    _pack[grid(n)](keys, packed, E, bits)
    k = 2
    while k <= n:
        j = k // 2
        while j >= 1:
            _bitonic_step[grid(n)](packed, j, k)
            j //= 2
        k *= 2
    _unpack[grid(max(E, int(n_keys) + 2))](packed, order, starts, E, bits, int(n_keys))
    return order, starts
