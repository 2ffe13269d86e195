"""RoI pooling timings, float32, forward and forward+backward, against torchvision in one
process with the same thread count (runs at Numba's thread count and at one thread):

* roi_align (7x7, sampling_ratio 2, aligned) and roi_pool (7x7): input (2, 256, 50, 50) with 512
  boxes (the reference size: seeded boxes inside an 800x800 image seen at spatial_scale 1/16,
  15% to 60% of its side) and input (2, 256, 100, 152) with 1000 boxes (large);
* ps_roi_align / ps_roi_pool (8 output channels, input (2, 392, 50, 50)) and the deformable
  ops (no torchvision counterpart) at the reference size.

    python -m pytest benches/bench_roi.py --benchmark-enable
    python benches/bench_roi.py          # the CLI's table for these ops, and memory

The callables are those ``python -m deformnp bench`` times (``deformnp.cases.bench``).
"""

from __future__ import annotations

import sys

from suite import main, make_tests

OPS = [
    "roi_align",
    "roi_pool",
    "ps_roi_align",
    "ps_roi_pool",
    "deform_roi_pool",
    "deform_ps_roi_pool",
]


test_deformnp, test_torchvision = make_tests(OPS, "", "torch_")

if __name__ == "__main__":
    main(sys.argv[1:] or OPS)
