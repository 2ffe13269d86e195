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
    """Tell whether numba.cuda can run kernels (a real GPU, or Numba's CUDA simulator).

    The answer is computed once and cached.

    Returns
    -------
    bool
        False when numba-cuda is not installed or no usable device (nor the simulator, under
        ``NUMBA_ENABLE_CUDASIM=1``) is found.
    """
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
    """Tell whether ``a`` is an array that lives on a CUDA device.

    Anything exposing ``__cuda_array_interface__`` (numba device arrays, CuPy arrays, PyTorch
    CUDA tensors) counts, and so do the stand-in device arrays of Numba's CUDA simulator (which do
    not expose the interface). Never imports numba.cuda.

    Parameters
    ----------
    a : object
        Any object.

    Returns
    -------
    bool
        False for NumPy arrays and anything else on the host.
    """
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
    """Copy a host array to the CUDA device.

    Parameters
    ----------
    a : numpy.ndarray
        The host array (made C-contiguous first if it is not).

    Returns
    -------
    numba.cuda.cudadrv.devicearray.DeviceNDArray
        A new device array with ``a``'s shape and dtype.

    Raises
    ------
    RuntimeError
        If CUDA is not available (see :func:`is_available`).
    """
    return _cuda().to_device(np.ascontiguousarray(a))


def move(a: Any, device: str) -> Any:
    """Return ``a`` on ``device``, copying only when it lives elsewhere.

    Parameters
    ----------
    a : array_like or CUDA array
        A host array (or array-like) or any ``__cuda_array_interface__`` object.
    device : {"cpu", "cuda"}
        The destination.

    Returns
    -------
    numpy.ndarray or DeviceNDArray
        ``a`` itself when it already lives on ``device`` (a CUDA array from another library is
        wrapped as a numba device array without copying); otherwise a copy on ``device``.

    Raises
    ------
    ValueError
        If ``device`` is neither "cpu" nor "cuda".
    RuntimeError
        If a move involves CUDA and CUDA is not available.
    """
    if device == "cuda":
        return as_device_array(a) if is_cuda_array(a) else to_device(np.asarray(a))
    if device == "cpu":
        return as_device_array(a).copy_to_host() if is_cuda_array(a) else a
    raise ValueError(f"to: device must be 'cpu' or 'cuda', got {device!r}")


def zeros(shape: tuple, dtype: Any) -> Any:
    """Allocate a zero-filled CUDA device array.

    Parameters
    ----------
    shape : tuple of int
        The shape.
    dtype : numpy.dtype or type
        The dtype.

    Returns
    -------
    DeviceNDArray
        Zeros of that shape and dtype, on the device.

    Raises
    ------
    RuntimeError
        If CUDA is not available.
    """
    _cuda()
    from .kernels.cuda._launch import zeros as _zeros

    return _zeros(shape, dtype)


def ones_like(a: Any) -> Any:
    """Allocate a CUDA device array of ones with ``a``'s shape and dtype.

    Parameters
    ----------
    a : array
        Any array with ``shape`` and ``dtype`` (host or device).

    Returns
    -------
    DeviceNDArray
        Ones of ``a``'s shape and dtype, on the device.

    Raises
    ------
    RuntimeError
        If CUDA is not available.
    """
    _cuda()
    from .kernels.cuda._launch import full

    return full(a.shape, 1, a.dtype)
