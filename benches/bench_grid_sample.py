"""grid_sample timings at the SPEC section 13 size: input (4, 64, 32, 32), grid (4, 32, 32, 2),
float32, zeros padding, align_corners=False; forward and forward+backward, against
torch.nn.functional.grid_sample in one process with torch.set_num_threads(numba.get_num_threads()).
Also bilinear_interpolate at the same size (4096 points), against grid_sample(align_corners=True).

    python -m pytest benches/bench_grid_sample.py --benchmark-enable
    python benches/bench_grid_sample.py          # a table of min / median ms and ratios

The callables are those ``python -m deformnp bench`` times (the ops' entries of
``deformnp.cases.bench``).
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from typing import Any

import numpy as np
import pytest

from deformnp.cases import bench_cases

CASES = {op: bench_cases(op, "cpu")[0] for op in ("grid_sample", "bilinear_interpolate")}
PASSES = ["forward", "forward_backward"]


@pytest.mark.parametrize("op", list(CASES))
@pytest.mark.parametrize("which", PASSES)
def test_deformnp(benchmark, op, which):
    case = CASES[op]
    benchmark.group = f"{op} {which} {case.size}"
    fn = getattr(case, which)
    fn()  # warm up (Numba cache, allocations)
    benchmark.pedantic(fn, rounds=50, warmup_rounds=2)


@pytest.mark.parametrize("op", list(CASES))
@pytest.mark.parametrize("which", PASSES)
def test_torch(benchmark, op, which):
    case = CASES[op]
    fn = getattr(case, f"torch_{which}")
    if fn is None:
        pytest.skip("torch is not installed")
    benchmark.group = f"{op} {which} {case.size}"
    fn()
    benchmark.pedantic(fn, rounds=50, warmup_rounds=2)


def _time(fn: Callable[[], Any], repeat: int) -> tuple[float, float]:
    fn()
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return 1e3 * min(times), 1e3 * float(np.median(times))


def main(repeat: int = 50) -> None:
    import numba

    print(f"float32, {numba.get_num_threads()} threads")
    for op, case in CASES.items():
        for which in PASSES:
            ours = _time(getattr(case, which), repeat)
            line = f"{op:22s} {which:17s} deformnp min {ours[0]:7.3f} ms  median {ours[1]:7.3f} ms"
            theirs = getattr(case, f"torch_{which}")
            if theirs is not None:
                t = _time(theirs, repeat)
                line += f" | torch min {t[0]:7.3f} ms  median {t[1]:7.3f} ms | deformnp / torch {ours[0] / t[0]:5.2f}x"
            print(line)
        print(f"  ({case.size})")


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 50)
