"""CUDA availability and host/device moves (numba.cuda, from the numba-cuda package).

Nothing here imports numba.cuda until it is needed, so ``import deformnp`` stays fast and works
on machines without numba-cuda. Under ``NUMBA_ENABLE_CUDASIM=1`` Numba's CUDA simulator stands in
for a GPU and ``is_available()`` is True.
"""

from __future__ import annotations

import functools
from typing import Any

import numpy as np

__all__ = ["is_available", "move", "to_device", "ones_like", "zeros", "is_cuda_array"]


@functools.lru_cache(maxsize=1)
def is_available() -> bool:
    """True when numba.cuda can run kernels (a real GPU, or the simulator)."""
    try:
        from numba import cuda
    except Exception:  # numba-cuda not installed, or a broken CUDA install
        return False
    try:
        return bool(cuda.is_available())
    except Exception:
        return False


def _cuda() -> Any:
    if not is_available():
        raise RuntimeError(
            "CUDA is not available: install numba-cuda (pip install 'deformnp[cuda]') on a machine "
            "with an NVIDIA GPU, or set NUMBA_ENABLE_CUDASIM=1 to use Numba's CUDA simulator"
        )
    from numba import cuda

    return cuda


def is_cuda_array(a: Any) -> bool:
    """True for arrays that live on a CUDA device: anything exposing
    ``__cuda_array_interface__`` (numba device arrays, CuPy, PyTorch CUDA tensors) and, under
    Numba's CUDA simulator, its stand-in device arrays (which do not expose the interface)."""
    if isinstance(a, np.ndarray):
        return False
    return hasattr(a, "__cuda_array_interface__") or type(a).__name__ == "FakeCUDAArray"


def as_device_array(a: Any) -> Any:
    """A numba device array viewing ``a`` (any ``__cuda_array_interface__`` object), no copy."""
    cuda = _cuda()
    if type(a).__name__ in ("DeviceNDArray", "FakeCUDAArray", "MappedNDArray"):
        return a
    return cuda.as_cuda_array(a)


def to_device(a: np.ndarray) -> Any:
    return _cuda().to_device(np.ascontiguousarray(a))


def move(a: Any, device: str) -> Any:
    """Return ``a`` on ``device`` ("cpu" or "cuda"), copying only when it lives elsewhere."""
    if device == "cuda":
        return as_device_array(a) if is_cuda_array(a) else to_device(np.asarray(a))
    if device == "cpu":
        return as_device_array(a).copy_to_host() if is_cuda_array(a) else a
    raise ValueError(f"to: device must be 'cpu' or 'cuda', got {device!r}")


def zeros(shape: tuple, dtype: Any) -> Any:
    """A zero-filled device array."""
    _cuda()
    from .kernels.cuda._launch import zeros as _zeros

    return _zeros(shape, dtype)


def ones_like(a: Any) -> Any:
    """A device array of ones with ``a``'s shape and dtype."""
    _cuda()
    from .kernels.cuda._launch import full

    return full(a.shape, 1, a.dtype)
