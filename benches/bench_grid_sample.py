"""grid_sample and bilinear_interpolate timings, float32, forward and forward+backward, against
torch.nn.functional.grid_sample in one process with the same thread count (runs at Numba's
thread count and at one thread):

* grid_sample: input (4, 64, 32, 32), grid (4, 32, 32, 2) (the reference size) and input
  (8, 64, 128, 128), grid (8, 128, 128, 2) (large); zeros padding, align_corners=False;
* bilinear_interpolate: input (4, 64, 32, 32), 1024 points, against grid_sample with
  align_corners=True at the same points.

    python -m pytest benches/bench_grid_sample.py --benchmark-enable
    python benches/bench_grid_sample.py          # the CLI's table for these ops, and memory

The callables are those ``python -m deformnp bench`` times (``deformnp.cases.bench``).
"""

from __future__ import annotations

from suite import main, make_tests

OPS = ["grid_sample", "bilinear_interpolate"]


test_deformnp, test_torch = make_tests(OPS, "", "torch_")

if __name__ == "__main__":
    main(OPS)
