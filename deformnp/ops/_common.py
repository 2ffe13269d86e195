"""Validation and conversion shared by every op family (SPEC section 3).

Messages name the op, the argument, what was expected and what was given, e.g.
``deform_conv2d: offset has 17 channels, expected 2*offset_groups*kh*kw = 18``.
"""

from __future__ import annotations

import importlib
from types import ModuleType
from typing import Any

import numpy as np

from ..tensor import Tensor

FLOAT_DTYPES = (np.dtype(np.float32), np.dtype(np.float64))
INDEX_DTYPES = (np.dtype(np.int32), np.dtype(np.int64))


def raw(x: Any) -> Any:
    """The array behind a Tensor, or ``x`` itself (NumPy array, device array, list)."""
    return x.data if isinstance(x, Tensor) else x


def is_device_array(a: Any) -> bool:
    """True for CUDA arrays (see :func:`deformnp.cuda.is_cuda_array`)."""
    from ..cuda import is_cuda_array

    return is_cuda_array(a)


def device_of(op: str, **arrays: Any) -> str:
    """ "cuda" if the given arrays live on the GPU, "cpu" if on the host; mixing is an error."""
    devices = {
        name: ("cuda" if is_device_array(raw(a)) else "cpu")
        for name, a in arrays.items()
        if a is not None
    }
    kinds = set(devices.values())
    if len(kinds) > 1:
        where = ", ".join(f"{n} on {d}" for n, d in devices.items())
        raise ValueError(f"{op}: all inputs must be on the same device, got {where}")
    return kinds.pop() if kinds else "cpu"


def float_array(op: str, name: str, x: Any) -> Any:
    """``x`` as a float32/float64 array (host arrays made C-contiguous); anything else: TypeError."""
    a = raw(x)
    if is_device_array(a):
        from ..cuda import as_device_array

        a = as_device_array(a)  # CuPy / PyTorch CUDA arrays: a zero-copy numba view
    else:
        a = np.asarray(a)
    if np.dtype(a.dtype) not in FLOAT_DTYPES:
        raise TypeError(f"{op}: {name} must be float32 or float64, got {np.dtype(a.dtype)}")
    if not is_device_array(a):
        a = np.ascontiguousarray(a)
    return a


def index_array(op: str, name: str, x: Any) -> np.ndarray:
    """An int32/int64 host array as int64 (integer index inputs: spatial shapes, batch indices)."""
    a = raw(x)
    if is_device_array(a):
        a = a.copy_to_host()
    a = np.asarray(a)
    if np.dtype(a.dtype) not in INDEX_DTYPES:
        raise TypeError(f"{op}: {name} must be int32 or int64, got {a.dtype}")
    return np.ascontiguousarray(a, dtype=np.int64)


def same_dtype(op: str, **arrays: Any) -> np.dtype:
    """The common float dtype of the given arrays; mixed float dtypes are a TypeError."""
    dtypes = {name: np.dtype(a.dtype) for name, a in arrays.items() if a is not None}
    if len(set(dtypes.values())) > 1:
        given = ", ".join(f"{n} {d}" for n, d in dtypes.items())
        raise TypeError(f"{op}: inputs must share one float dtype, got {given}")
    return next(iter(dtypes.values()))


def check_ndim(op: str, name: str, a: Any, ndim: int, layout: str) -> None:
    if len(a.shape) != ndim:
        raise ValueError(f"{op}: {name} must be {ndim}-d {layout}, got shape {tuple(a.shape)}")


def pair(op: str, name: str, v: Any, minimum: int = 0) -> tuple[int, int]:
    """An int or a pair of ints as (h, w), each >= ``minimum``."""
    if isinstance(v, (int, np.integer)):
        out = (int(v), int(v))
    else:
        try:
            out = tuple(int(i) for i in v)
        except TypeError:
            raise TypeError(f"{op}: {name} must be an int or a pair of ints, got {v!r}") from None
        if len(out) != 2:
            raise ValueError(f"{op}: {name} must be an int or a pair of ints, got {v!r}")
    if out[0] < minimum or out[1] < minimum:
        raise ValueError(f"{op}: {name} must be >= {minimum}, got {v!r}")
    return out  # type: ignore[return-value]


def kernel_module(op: str, family: str, device: str) -> ModuleType:
    """The kernel module of an op family for ``device``: ``deformnp.kernels.cpu.<family>`` or
    ``deformnp.kernels.cuda.<family>`` (the two mirror each other, function for function).
    Imported on first use, so importing deformnp compiles nothing and needs no numba-cuda."""
    if device not in ("cpu", "cuda"):
        raise ValueError(f"{op}: unsupported device {device!r}, expected 'cpu' or 'cuda'")
    return importlib.import_module(f"deformnp.kernels.{device}.{family}")
