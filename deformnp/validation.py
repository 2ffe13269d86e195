"""Argument checks shared by every op, layer and generic function: written once, here.

Each helper takes the name of the op (or layer) and of the argument, and raises a ``TypeError``
(wrong kind of value) or a ``ValueError`` (right kind, wrong value) whose message names both,
says what was expected and shows what was given, e.g. ``deform_conv2d: offset has 17 channels,
expected 2*offset_groups*kh*kw with offset_groups dividing the input's 4 channels (kernel 3x3):
one of 18, 36, 72``. The helpers work on plain arrays (NumPy arrays and CUDA
device arrays); callers unwrap Tensors first. Nothing here imports the autograd engine.

Integer parameters (strides, paddings, sampling ratios, ...) must be Python or NumPy integers:
a float such as 1.5 (or 2.0) is refused rather than truncated, and so is a bool. They are
bounded by :data:`MAX_INT` (torchvision's 32-bit ``int``) unless an op sets a tighter bound, so
every size computed from them fits in 64 bits with room to spare.
"""

from __future__ import annotations

import math
import operator
from collections.abc import Sequence
from typing import Any

import numpy as np

from .cuda import as_device_array, is_cuda_array

FLOAT_DTYPES = (np.dtype(np.float32), np.dtype(np.float64))
INDEX_DTYPES = (np.dtype(np.int32), np.dtype(np.int64))
MAX_INT = 2**31 - 1


def contiguous(a: Any) -> Any:
    """A C-contiguous, writeable host array (a copy only when needed); device arrays as given.

    Writeable: a read-only array is a different type to Numba, which would compile every kernel
    again for it.
    """
    if is_cuda_array(a):
        return a
    a = np.asarray(a)
    if not (a.flags.c_contiguous and a.flags.writeable):
        a = np.array(a, order="C", copy=True)
    return a


def device_of(op: str, **arrays: Any) -> str:
    """``"cuda"`` if the given arrays live on the GPU, ``"cpu"`` if on the host (None entries
    are skipped); arrays on both is a ValueError."""
    devices = {
        name: ("cuda" if is_cuda_array(a) else "cpu") for name, a in arrays.items() if a is not None
    }
    kinds = set(devices.values())
    if len(kinds) > 1:
        where = ", ".join(f"{n} on {d}" for n, d in devices.items())
        raise ValueError(f"{op}: all inputs must be on the same device, got {where}")
    return kinds.pop() if kinds else "cpu"


def float_array(op: str, name: str, a: Any) -> Any:
    """``a`` as a float32 or float64 array: host arrays C-contiguous and writeable (see
    :func:`contiguous`), CUDA arrays as zero-copy numba views; any other dtype is a TypeError."""
    if is_cuda_array(a):
        a = as_device_array(a)  # CuPy / PyTorch CUDA arrays: a zero-copy numba view
        device_c_contiguous(op, name, a)
    else:
        a = np.asarray(a)
    if np.dtype(a.dtype) not in FLOAT_DTYPES:
        raise TypeError(f"{op}: {name} must be float32 or float64, got {np.dtype(a.dtype)}")
    return contiguous(a)


def device_c_contiguous(op: str, name: str, a: Any) -> None:
    """A device array is read in place, as a flat run of its elements: it must be C-contiguous
    (a Fortran-ordered one would be read in the wrong order, a strided one cannot be read flat)."""
    if not a.is_c_contiguous():
        raise ValueError(
            f"{op}: {name} is a CUDA array that is not C-contiguous (shape {tuple(a.shape)}, "
            f"strides {tuple(a.strides)}); device arrays are read in place: pass a C-contiguous "
            "copy"
        )


def host_float_array(op: str, name: str, a: Any) -> np.ndarray:
    """A float32/float64 host array, as given (no copy), for the ops that run on the CPU only;
    a CUDA array is a TypeError that says to move it."""
    if is_cuda_array(a):
        raise TypeError(
            f"{op}: {name} is a CUDA array; {op} runs on the CPU only: move it with .to('cpu')"
        )
    a = np.asarray(a)
    if a.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{op}: {name} must be float32 or float64, got {a.dtype}")
    return a


def index_array(op: str, name: str, a: Any) -> np.ndarray:
    """An int32/int64 array (integer index inputs: spatial shapes, batch indices) as a host int64
    array (device arrays are copied to the host)."""
    if is_cuda_array(a):
        a = as_device_array(a).copy_to_host()
    a = np.asarray(a)
    if np.dtype(a.dtype) not in INDEX_DTYPES:
        raise TypeError(f"{op}: {name} must be int32 or int64, got {a.dtype}")
    return contiguous(a.astype(np.int64, copy=False))


def same_dtype(op: str, **arrays: Any) -> np.dtype:
    """The one float dtype of the given arrays (None entries skipped); mixing is a TypeError."""
    dtypes = {name: np.dtype(a.dtype) for name, a in arrays.items() if a is not None}
    if len(set(dtypes.values())) > 1:
        given = ", ".join(f"{n} {d}" for n, d in dtypes.items())
        first = next(iter(dtypes.values()))

        def method(d: np.dtype) -> str:  # Tensor.float() / .double(), Module.float() / .double()
            return "double" if d == np.float64 else "float"

        w = dtypes.get("weight", first)
        if w != first:
            # the usual cause: float64 data into a layer, whose parameters are float32 (as torch's)
            hint = (
                f"a layer's parameters are float32 unless converted: pass {w} data "
                f"(array.astype(np.{w}) or Tensor.{method(w)}()) or convert the layer to "
                f"{first} (layer.{method(first)}())"
            )
        else:
            hint = (
                f"cast them to one dtype, e.g. array.astype(np.{first}) or Tensor.{method(first)}()"
            )
        raise TypeError(f"{op}: inputs must share one float dtype, got {given}; {hint}")
    return next(iter(dtypes.values()))


def check_ndim(op: str, name: str, a: Any, ndim: int, layout: str) -> None:
    if len(a.shape) != ndim:
        raise ValueError(f"{op}: {name} must be {ndim}-d {layout}, got shape {tuple(a.shape)}")


def _is_int(v: Any) -> bool:
    return isinstance(v, (int, np.integer)) and not isinstance(v, (bool, np.bool_))


def integer(op: str, name: str, v: Any, minimum: int | None = None, maximum: int = MAX_INT) -> int:
    """``v`` as an int in [minimum, maximum]; a float, a bool or anything else is a TypeError."""
    if not _is_int(v):
        raise TypeError(f"{op}: {name} must be an int, got {v!r}")
    i = operator.index(v)
    if minimum is not None and i < minimum:
        raise ValueError(f"{op}: {name} must be >= {minimum}, got {v!r}")
    if i > maximum:
        raise ValueError(f"{op}: {name} must be <= {maximum}, got {v!r}")
    return i


def integers(op: str, name: str, v: Any) -> tuple[int, ...]:
    """An int or a sequence of ints (a shape, a list of sizes) as a tuple of ints; a float or a
    bool anywhere is a TypeError."""
    items = (v,) if _is_int(v) else v
    try:
        items = tuple(items)
    except TypeError:
        raise TypeError(f"{op}: {name} must be an int or a sequence of ints, got {v!r}") from None
    if not all(_is_int(i) for i in items):
        raise TypeError(f"{op}: {name} must be an int or a sequence of ints, got {v!r}")
    return tuple(int(i) for i in items)


def boolean(op: str, name: str, v: Any) -> bool:
    """``v`` as a bool: only a Python or NumPy bool is one (0, 1 and None are TypeErrors)."""
    if not isinstance(v, (bool, np.bool_)):
        raise TypeError(f"{op}: {name} must be a bool, got {v!r}")
    return bool(v)


def real(op: str, name: str, v: Any) -> float:
    """``v`` as a finite float; a bool or a non-number is a TypeError."""
    if isinstance(v, (bool, np.bool_)) or not isinstance(v, (int, float, np.integer, np.floating)):
        raise TypeError(f"{op}: {name} must be a real number, got {v!r}")
    f = float(v)
    if not math.isfinite(f):
        raise ValueError(f"{op}: {name} must be finite, got {v!r}")
    return f


def pair(op: str, name: str, v: Any, minimum: int = 0, maximum: int = MAX_INT) -> tuple[int, int]:
    """An int or a pair of ints as ``(h, w)``, each in [minimum, maximum]."""
    if _is_int(v):
        out = (int(v), int(v))
    else:
        try:
            items = tuple(v)
        except TypeError:
            raise TypeError(f"{op}: {name} must be an int or a pair of ints, got {v!r}") from None
        if not all(_is_int(i) for i in items):
            raise TypeError(f"{op}: {name} must be an int or a pair of ints, got {v!r}")
        if len(items) != 2:
            raise ValueError(f"{op}: {name} must be an int or a pair of ints, got {v!r}")
        out = (int(items[0]), int(items[1]))
    if out[0] < minimum or out[1] < minimum:
        raise ValueError(f"{op}: {name} must be >= {minimum}, got {v!r}")
    if out[0] > maximum or out[1] > maximum:
        raise ValueError(f"{op}: {name} must be <= {maximum}, got {v!r}")
    return out


def grad_array(
    op: str,
    name: str,
    g: Any,
    dtype: Any,
    shape: tuple[int, ...],
    device: str,
    like: str = "input",
    layout: str | None = None,
) -> Any:
    """The incoming gradient of an array-level backward: a float array of the inputs' dtype
    (``like`` names the input it must match), of ``shape`` and on the inputs' device.
    ``layout`` (e.g. ``"(N, Lq, M*D)"``) is shown in the shape message."""
    on = "cuda" if is_cuda_array(g) else "cpu"
    if on != device:
        raise ValueError(f"{op}: {name} must be on {device} like the inputs, got an array on {on}")
    g = float_array(op, name, g)
    if np.dtype(g.dtype) != np.dtype(dtype):
        raise TypeError(f"{op}: {name} must be {np.dtype(dtype)} like {like}, got {g.dtype}")
    if tuple(g.shape) != tuple(shape):
        if layout is not None:
            raise ValueError(
                f"{op}: {name} has shape {tuple(g.shape)}, expected {layout} = {tuple(shape)}"
            )
        raise ValueError(f"{op}: {name} must have shape {tuple(shape)}, got {tuple(g.shape)}")
    return g


def needs_flags(op: str, needs: Any, names: Sequence[str]) -> tuple[bool, ...]:
    """``needs`` of an array-level backward: one boolean per gradient, in ``names``' order."""
    expected = f"{len(names)} flags ({', '.join(names)})"
    try:
        flags = tuple(bool(n) for n in needs)
    except TypeError:
        raise TypeError(f"{op}: needs must be a sequence of {expected}, got {needs!r}") from None
    if len(flags) != len(names):
        raise ValueError(f"{op}: needs must have {expected}, got {needs!r}")
    return flags
