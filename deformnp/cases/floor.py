"""What this machine can do, measured: the floors the gather ops' rates are read against.

* **contiguous read**: a parallel sum over a float32 array much larger than the caches
  (GB/s): how fast memory streams when every byte is used;
* **random-row gather**: the innermost step of every bilinear op on channels-last data, with
  nothing around it: for each sample, four rows of ``C`` contiguous float32 channels at random
  positions of a map, weighted and summed into an output row (16 samples a row, as roi_align's
  bins sum 2x2 samples of four corners). The rate is in channel-samples
  per second (one sample of one channel), the unit ``python -m deformnp bench`` gives each gather
  op. The map is the size of roi_align's reference input, so it sits in the L2/L3 caches as the
  op's does; the indices and weights are precomputed, so the figure is an upper bound for a
  kernel that must also compute its plans.

``python -m deformnp bench --floor`` prints both at the thread counts it benchmarks.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import numba
import numpy as np
from numba import njit, prange

__all__ = ["Floor", "measure_floor"]


@njit(parallel=True, fastmath=True, cache=True)
def _stream_sum(a):
    """sum(a), reading a once in parallel chunks (fastmath lets the sum vectorize)."""
    chunk = 1 << 16
    nchunks = (a.size + chunk - 1) // chunk
    total = 0.0
    for t in prange(nchunks):
        s = np.float32(0.0)
        for i in range(t * chunk, min((t + 1) * chunk, a.size)):
            s += a[i]
        total += s
    return total


_PER_ROW = 16  # samples summed into one output row (roi_align's 2x2 samples of 4 corners)


@njit(parallel=True, cache=True)
def _gather_rows(v, idx, w, out):
    """out[r, :] = sum over the samples s of row r of sum_k w[s, k] * v[idx[s, k], :]: four
    rows of the map per sample, _PER_ROW samples per output row (it stays in L1, so the figure
    is the gather's, not the output's write bandwidth)."""
    C = v.shape[1]
    for r in prange(out.shape[0]):
        for c in range(C):
            out[r, c] = 0.0
        for s in range(r * _PER_ROW, (r + 1) * _PER_ROW):
            i0, i1, i2, i3 = idx[s, 0], idx[s, 1], idx[s, 2], idx[s, 3]
            w0, w1, w2, w3 = w[s, 0], w[s, 1], w[s, 2], w[s, 3]
            for c in range(C):
                out[r, c] += w0 * v[i0, c] + w1 * v[i1, c] + w2 * v[i2, c] + w3 * v[i3, c]


@dataclass
class Floor:
    threads: int
    read_gb_s: float  # contiguous read, GB/s
    gather_g_s: float  # random-row gather, G channel-samples/s


def _best(fn, repeat: int) -> float:
    """Best wall time (s) of ``repeat`` runs after a warm-up: a floor is what the machine can do."""
    fn()
    best = float("inf")
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def measure_floor(
    threads: int, repeat: int = 10, read_mib: int = 256, samples: int = 1 << 16
) -> Floor:
    """Measure both floors with ``threads`` Numba threads (restored afterwards): best of
    ``repeat`` reads of a ``read_mib`` MiB array (far beyond the caches by default) and of
    ``samples`` random-row gathers."""
    rng = np.random.default_rng(0)
    big = rng.standard_normal(read_mib << 18, dtype=np.float32)
    HW, C, S = 2 * 50 * 50, 256, samples  # roi_align's reference input, channels-last
    v = rng.standard_normal((HW, C), dtype=np.float32)
    idx = rng.integers(0, HW, (S, 4)).astype(np.int64)
    w = rng.random((S, 4), dtype=np.float32)
    out = np.empty((S // _PER_ROW, C), np.float32)
    prev = numba.get_num_threads()
    numba.set_num_threads(threads)
    try:
        t_read = _best(lambda: _stream_sum(big), repeat)
        t_gather = _best(lambda: _gather_rows(v, idx, w, out), repeat)
    finally:
        numba.set_num_threads(prev)
    return Floor(threads, big.nbytes / t_read / 1e9, S * C / t_gather / 1e9)
