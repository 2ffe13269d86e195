"""Every case ``python -m deformnp bench`` times runs: one forward and one forward+backward each.

The bench table is the README's main job, so a case whose callable no longer matches the
array-level API must fail here, not on a user's first run. Timings are never asserted.
"""

from __future__ import annotations

import numpy as np
import pytest

from deformnp.cases.bench import OPS, bench_cases


@pytest.mark.slow
@pytest.mark.parametrize("op", OPS)
def test_bench_case_runs(op):
    for case in bench_cases(op, "cpu"):
        assert case.forward() is not None
        grads = case.forward_backward()  # the array-level cases return their gradients
        if grads is not None:
            grads = grads if isinstance(grads, (tuple, list)) else (grads,)
            assert any(g is not None and np.isfinite(np.asarray(g)).all() for g in grads), op
