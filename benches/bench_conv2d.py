"""conv2d timings: input (4, 64, 32, 32), weight (64, 64, 3, 3), padding 1, float32, forward and
forward+backward, against torch in the same process with the same thread count.

Run: python -m pytest benches/bench_conv2d.py --benchmark-enable (with torch installed for the
comparison). The data and callables are the ones ``python -m deformnp bench`` times (the conv2d
entry of ``deformnp.cases.bench``), so the figures agree.
"""

from __future__ import annotations

import pytest

from deformnp.cases import bench_cases

(CASE,) = bench_cases("conv2d", "cpu")
PASSES = ["forward", "forward_backward"]


@pytest.mark.parametrize("which", PASSES)
def test_deformnp(benchmark, which):
    benchmark.group = f"conv2d {which} {CASE.size}"
    fn = getattr(CASE, which)
    fn()  # warm up (allocations, BLAS threads)
    benchmark.pedantic(fn, rounds=30, warmup_rounds=2)


@pytest.mark.parametrize("which", PASSES)
def test_torch(benchmark, which):
    fn = getattr(CASE, f"torch_{which}")
    if fn is None:
        pytest.skip("torch is not installed")
    benchmark.group = f"conv2d {which} {CASE.size}"
    fn()
    benchmark.pedantic(fn, rounds=30, warmup_rounds=2)
