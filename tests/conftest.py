"""Shared pytest configuration.

Hypothesis runs few examples with no deadline (Numba compiles on first call), so the whole suite
stays fast on a 2-core CI machine.
"""

from __future__ import annotations

import os

import numpy as np
import pytest
from hypothesis import HealthCheck, settings

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
