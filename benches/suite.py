"""What every ``benches/bench_*.py`` suite shares: the cases of ``deformnp.cases.bench`` (the very
callables ``python -m deformnp bench`` times) at both sizes, run at the current thread count and
at one thread, as pytest-benchmark tests; and a ``main`` that prints the command line's table for
the suite's ops plus each case's peak extra memory.

    python -m pytest benches/bench_roi.py --benchmark-enable     # pytest-benchmark's tables
    python benches/bench_roi.py                                  # the CLI's table + memory

Thread counts: Numba's, the BLAS library's and torch's are all set to the test's count
(``deformnp.cases.bench.thread_limit``, as in the CLI), and restored afterwards.
"""

from __future__ import annotations

import functools
import tracemalloc
from collections.abc import Callable, Sequence
from typing import Any

import numba
import pytest

from deformnp.__main__ import run_bench
from deformnp.cases.bench import SIZES, BenchCase, bench_cases, thread_limit

PASSES = ["forward", "forward_backward"]
THREADS = list(dict.fromkeys([numba.get_num_threads(), 1]))


@functools.cache
def case(op: str, size: str) -> BenchCase | None:
    """The CPU case of ``op`` at ``size`` (built once; None when the op has no such size)."""
    found = bench_cases(op, "cpu", (size,))
    return found[0] if found else None


def parametrize(ops: Sequence[str]) -> Callable[[Callable[..., Any]], Any]:
    """Parametrize a benchmark test over (op, size, threads, which)."""
    params = [
        pytest.param(op, size, n, which, id=f"{op}-{size}-{n}t-{which}")
        for op in ops
        for size in SIZES
        for n in THREADS
        for which in PASSES
    ]
    return pytest.mark.parametrize(("op", "size", "n", "which"), params)


def run(benchmark: Any, op: str, size: str, n: int, which: str, side: str = "") -> None:
    """Benchmark ``side`` ("" deformnp, "torch_" or "torch_dense_") of a case's ``which`` pass."""
    c = case(op, size)
    if c is None:
        pytest.skip(f"{op} has no {size} case")
    fn = getattr(c, side + which)
    if fn is None:
        what = side.rstrip("_").replace("_", " ")
        pytest.skip(f"{op}: no {what} counterpart (torch/torchvision not installed?)")
    benchmark.group = f"{op} {which} {c.size} {n} thread(s)"
    with thread_limit(n):
        fn()  # warm up (Numba cache, allocations, thread pools)
        slow = size == "large" or side == "torch_"
        benchmark.pedantic(fn, rounds=5 if slow else 20, warmup_rounds=1)


def make_tests(ops: Sequence[str], *sides: str) -> tuple[Callable[..., None], ...]:
    """One benchmark test per side ("" deformnp, "torch_", "torch_dense_"), each parametrized
    over (op, size, threads, pass): ``test_deformnp, test_torch = make_tests(OPS, "", "torch_")``."""

    def make(side: str) -> Callable[..., None]:
        @parametrize(ops)
        def test(benchmark: Any, op: str, size: str, n: int, which: str) -> None:
            run(benchmark, op, size, n, which, side)

        return test

    return tuple(make(side) for side in sides)


def peak_extra_mib(fn: Callable[[], Any]) -> float:
    """Peak of the NumPy allocations (tracemalloc) one call makes, in MiB (the kernels allocate
    nothing large outside NumPy)."""
    fn()
    tracemalloc.start()
    try:
        fn()
        return tracemalloc.get_traced_memory()[1] / 2**20
    finally:
        tracemalloc.stop()


def main(ops: Sequence[str]) -> None:
    """The CLI's table for ``ops`` (both sizes, current thread count and 1), then each deformnp
    case's peak extra memory."""
    run_bench(ops, devices=("cpu",), sizes=SIZES, threads=THREADS)
    print("Peak extra memory of one call (tracemalloc, NumPy allocations):")
    for op in ops:
        for size in SIZES:
            c = case(op, size)
            if c is not None:
                fwd, both = (peak_extra_mib(getattr(c, w)) for w in PASSES)
                print(f"  {op:20s} {size:9s} forward {fwd:8.2f} MiB, fwd+bwd {both:8.2f} MiB")
