"""The random state shared by ``functional.dropout`` and ``nn.init``.

As torch's global generator is shared by dropout and initialisation, one NumPy generator is
shared here; :func:`manual_seed` reseeds it. Draws follow torch's distributions, not its random
streams: the same seed gives different numbers than torch.
"""

from __future__ import annotations

import numpy as np

__all__ = ["default_generator", "manual_seed"]

_generator = np.random.default_rng()


def default_generator() -> np.random.Generator:
    """The generator used by ``functional.dropout`` and ``deformnp.nn.init``."""
    return _generator


def manual_seed(seed: int) -> np.random.Generator:
    """Reseed the generator shared by ``functional.dropout`` and ``deformnp.nn.init``; returns it."""
    global _generator
    _generator = np.random.default_rng(seed)
    return _generator
