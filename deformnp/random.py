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
    """Return the generator used by ``functional.dropout`` and ``deformnp.nn.init``.

    Returns
    -------
    numpy.random.Generator
        The shared generator (replaced by each :func:`manual_seed`).
    """
    return _generator


def manual_seed(seed: int) -> np.random.Generator:
    """Reseed the generator shared by ``functional.dropout`` and ``deformnp.nn.init``.

    The analogue of ``torch.manual_seed``: one NumPy generator plays the part of torch's global
    generator. Draws follow torch's distributions, not its random streams, so the same seed gives
    different numbers than torch.

    Parameters
    ----------
    seed : int
        The seed, passed to ``numpy.random.default_rng``.

    Returns
    -------
    numpy.random.Generator
        The new shared generator.

    See Also
    --------
    deformnp.nn.init.manual_seed : The same function, under ``torch.nn.init``'s namespace.
    """
    global _generator
    _generator = np.random.default_rng(seed)
    return _generator
