"""RoI pooling timings at the SPEC section 13 size: input (2, 256, 50, 50), 512 boxes (seeded,
inside an 800x800 image seen at spatial_scale 1/16, 15% to 60% of its side), 7x7 bins, float32;
roi_align with sampling_ratio 2 and aligned=True, roi_pool on the same data. Forward and
forward+backward, against torchvision in one process with
torch.set_num_threads(numba.get_num_threads()). ps_roi_align / ps_roi_pool (8 output channels,
input (2, 392, 50, 50)) and the deformable ops are timed too (no torch counterpart for the
latter).

    python -m pytest benches/bench_roi.py --benchmark-enable
    python benches/bench_roi.py          # a table of min / median ms and speedups

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

OPS = [
    "roi_align",
    "roi_pool",
    "ps_roi_align",
    "ps_roi_pool",
    "deform_roi_pool",
    "deform_ps_roi_pool",
]
CASES = {name: bench_cases(name, "cpu")[0] for name in OPS}
PASSES = ["forward", "forward_backward"]


@pytest.mark.parametrize("op", OPS)
@pytest.mark.parametrize("which", PASSES)
def test_deformnp(benchmark, op, which):
    case = CASES[op]
    benchmark.group = f"{op} {which} {case.size}"
    fn = getattr(case, which)
    fn()  # warm up (Numba cache, allocations)
    benchmark.pedantic(fn, rounds=20, warmup_rounds=2)


@pytest.mark.parametrize("op", OPS)
@pytest.mark.parametrize("which", PASSES)
def test_torch(benchmark, op, which):
    case = CASES[op]
    fn = getattr(case, f"torch_{which}")
    if fn is None:
        pytest.skip("no torch/torchvision counterpart")
    benchmark.group = f"{op} {which} {case.size}"
    fn()
    benchmark.pedantic(fn, rounds=10, warmup_rounds=1)


def _time(fn: Callable[[], Any], repeat: int) -> tuple[float, float]:
    fn()
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return 1e3 * min(times), 1e3 * float(np.median(times))


def main(repeat: int = 20, only: list[str] | None = None) -> None:
    import numba

    print(f"float32, {numba.get_num_threads()} threads")
    for op in only or OPS:
        case = CASES[op]
        for which in PASSES:
            ours = _time(getattr(case, which), repeat)
            line = f"{op:19s} {which:17s} deformnp min {ours[0]:8.2f} ms  median {ours[1]:8.2f} ms"
            theirs = getattr(case, f"torch_{which}")
            if theirs is not None:
                t = _time(theirs, max(3, repeat // 2))
                line += (
                    f" | torchvision min {t[0]:8.2f} ms  median {t[1]:8.2f} ms"
                    f" | speedup {t[0] / ours[0]:5.1f}x"
                )
            print(line, flush=True)
        print(f"  ({case.size})")


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 20, sys.argv[2:] or None)
