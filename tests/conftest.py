"""Shared pytest configuration.

* The CUDA kernels are tested on every run: unless ``DEFORMNP_REAL_GPU=1`` is set, Numba's CUDA
  simulator is switched on here, before Numba is imported, so a machine without a GPU (CI)
  exercises every CUDA kernel against the CPU kernels on tiny shapes. On a GPU machine,
  ``DEFORMNP_REAL_GPU=1 python -m pytest`` runs the same tests on the real device.
* Hypothesis runs few examples with no deadline (Numba compiles on first call), so the whole suite
  stays fast on a 2-core CI machine.
* Layers draw their initial parameters from deformnp's module-level generator, which is seeded
  from the OS: it is reseeded before every test, so a test's layers are the same on every run
  and whatever ran before it in its process (a DAT++ gradcheck with random parameters failed once
  on a kink).
"""

from __future__ import annotations

import os

if os.environ.get("DEFORMNP_REAL_GPU") != "1":
    os.environ["NUMBA_ENABLE_CUDASIM"] = "1"

import numpy as np  # noqa: E402
import pytest  # noqa: E402
from hypothesis import HealthCheck, settings  # noqa: E402

settings.register_profile(
    "deformnp",
    max_examples=int(os.environ.get("DEFORMNP_HYPOTHESIS_EXAMPLES", "25")),
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    derandomize=True,
)
settings.load_profile("deformnp")


@pytest.fixture
def rng() -> np.random.Generator:
    return np.random.default_rng(1234)


@pytest.fixture(autouse=True)
def _seeded_parameter_init() -> None:
    import deformnp

    deformnp.manual_seed(0)
