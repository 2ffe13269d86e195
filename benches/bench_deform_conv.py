"""deform_conv2d timings at the SPEC section 13 size: B=4, Cin=Cout=64, 32x32, 3x3, padding 1, one
offset group, with mask, float32; forward and forward+backward, against
torchvision.ops.deform_conv2d and against a dense conv2d of the same shape (torch's and
deformnp's), all in one process with torch.set_num_threads(numba.get_num_threads()).

    python -m pytest benches/bench_deform_conv.py --benchmark-enable
    python benches/bench_deform_conv.py          # a table of min / median ms and ratios

The deformnp and torchvision callables are those ``python -m deformnp bench`` times (the op's
entry of ``deformnp.cases.bench``), so the figures agree.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from typing import Any

import numpy as np
import pytest

from deformnp.cases import bench_cases

(CASE,) = bench_cases("deform_conv2d", "cpu")
PASSES = ["forward", "forward_backward"]


def _dense_cases() -> dict[str, Callable[[], Any] | None]:
    """Dense 3x3 conv2d of the same shape: deformnp's functional.conv2d and torch's (the conv2d
    entry of ``deformnp.cases.bench``)."""
    (dense,) = bench_cases("conv2d", "cpu")
    return {
        "deformnp conv2d forward": dense.forward,
        "deformnp conv2d forward_backward": dense.forward_backward,
        "torch conv2d forward": dense.torch_forward,
        "torch conv2d forward_backward": dense.torch_forward_backward,
    }


DENSE = _dense_cases()


@pytest.mark.parametrize("which", PASSES)
def test_deformnp(benchmark, which):
    benchmark.group = f"deform_conv2d {which} {CASE.size}"
    fn = getattr(CASE, which)
    fn()  # warm up (Numba cache, allocations, BLAS threads)
    benchmark.pedantic(fn, rounds=20, warmup_rounds=2)


@pytest.mark.parametrize("which", PASSES)
def test_torchvision(benchmark, which):
    fn = getattr(CASE, f"torch_{which}")
    if fn is None:
        pytest.skip("torch/torchvision are not installed")
    benchmark.group = f"deform_conv2d {which} {CASE.size}"
    fn()
    benchmark.pedantic(fn, rounds=5 if which == "forward_backward" else 10, warmup_rounds=1)


@pytest.mark.parametrize("impl", ["deformnp", "torch"])
@pytest.mark.parametrize("which", PASSES)
def test_dense_conv2d(benchmark, impl, which):
    fn = DENSE.get(f"{impl} conv2d {which}")
    if fn is None:
        pytest.skip("torch is not installed")
    benchmark.group = f"deform_conv2d {which} {CASE.size}"
    fn()
    benchmark.pedantic(fn, rounds=20, warmup_rounds=2)


def _time(fn: Callable[[], Any], repeat: int) -> tuple[float, float]:
    fn()
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return 1e3 * min(times), 1e3 * float(np.median(times))


def main(repeat: int = 20) -> None:
    import numba

    print(f"deform_conv2d, {CASE.size}, float32, {numba.get_num_threads()} threads")
    rows = []
    for which in PASSES:
        ours = _time(getattr(CASE, which), repeat)
        rows.append((f"deformnp deform_conv2d {which}", ours, None))
        tv = getattr(CASE, f"torch_{which}")
        if tv is not None:
            rows.append(
                (f"torchvision deform_conv2d {which}", _time(tv, max(3, repeat // 4)), ours)
            )
        for impl in ("deformnp", "torch"):
            fn = DENSE.get(f"{impl} conv2d {which}")
            if fn is not None:
                rows.append((f"{impl} dense conv2d {which}", _time(fn, repeat), ours))
    for name, (mn, med), ours in rows:
        ratio = "" if ours is None else f"   deformnp deform_conv2d / this: {ours[0] / mn:6.2f}x"
        print(f"{name:45s} min {mn:8.2f} ms  median {med:8.2f} ms{ratio}")


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 20)
