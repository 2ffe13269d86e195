"""deformnp's dense conv2d timings, float32, forward and forward+backward: input (4, 64, 32, 32)
and (8, 128, 64, 64), 3x3 weight, padding 1 (the shapes of the deformable convolution's two
sizes), against torch in one process with the same thread count (runs at Numba's thread count
and at one thread).

    python -m pytest benches/bench_conv2d.py --benchmark-enable
    python benches/bench_conv2d.py          # the CLI's table for conv2d, and memory

The callables are those ``python -m deformnp bench`` times (``deformnp.cases.bench``).
"""

from __future__ import annotations

from suite import main, make_tests

OPS = ["conv2d"]


test_deformnp, test_torch = make_tests(OPS, "", "torch_")

if __name__ == "__main__":
    main(OPS)
