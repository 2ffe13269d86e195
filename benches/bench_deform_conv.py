"""deform_conv2d timings, float32, forward and forward+backward: B=4, 64->64, 32x32 (the
reference size) and B=8, 128->128, 64x64 (large); 3x3, padding 1, one offset group, with mask.
Against torchvision.ops.deform_conv2d and against torch's dense conv2d of the same shape (the
floor: the same GEMMs without the gather), in one process with the same thread count (runs at
Numba's thread count and at one thread). deformnp's own dense conv2d is ``bench_conv2d.py``.

    python -m pytest benches/bench_deform_conv.py --benchmark-enable
    python benches/bench_deform_conv.py          # the CLI's table (with the dense ratios), memory

The callables are those ``python -m deformnp bench`` times (``deformnp.cases.bench``).
"""

from __future__ import annotations

from suite import main, make_tests

OPS = ["deform_conv2d"]


test_deformnp, test_torchvision, test_torch_dense_conv2d = make_tests(
    OPS, "", "torch_", "torch_dense_"
)

if __name__ == "__main__":
    main(OPS)
