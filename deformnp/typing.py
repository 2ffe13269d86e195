"""Type aliases used in deformnp's public signatures.

* :data:`Array`: what the array-level functions return: a NumPy array, or a CUDA device array;
* :data:`ArrayLike`: what they accept: anything NumPy converts to an array, or a CUDA array;
* :data:`TensorLike`: what the differentiable ops accept: a :class:`~deformnp.Tensor` (gradients
  flow to it when it requires grad) or an :data:`ArrayLike` (a constant);
* :data:`IntPair`: an int or a pair of ints ``(h, w)`` (stride, padding, dilation, output size);
* :data:`Boxes`: RoIs as a (K, 5) array of ``(batch_index, x1, y1, x2, y2)`` or a list of (L, 4)
  arrays of ``(x1, y1, x2, y2)``, one per image;
* :data:`Needs`: one boolean per gradient of an array-level backward, in the order it returns
  them: True computes that gradient, False returns None in its place.

A CUDA array is any object that exposes ``__cuda_array_interface__`` (numba device arrays, CuPy
arrays, PyTorch CUDA tensors): :class:`CudaArray` describes it for type checkers.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, Protocol, Union, runtime_checkable

import numpy as np
import numpy.typing as npt

if TYPE_CHECKING:
    from .tensor import Tensor

__all__ = ["CudaArray", "Array", "ArrayLike", "TensorLike", "IntPair", "Boxes", "Needs"]


@runtime_checkable
class CudaArray(Protocol):
    """An array in GPU memory, described by the CUDA Array Interface."""

    @property
    def __cuda_array_interface__(self) -> dict[str, Any]: ...

    @property
    def shape(self) -> tuple[int, ...]: ...


Array = np.ndarray | CudaArray
ArrayLike = npt.ArrayLike | CudaArray
TensorLike = Union["Tensor", ArrayLike]  # noqa: UP007 (a forward reference: no `|` at run time)
IntPair = int | tuple[int, int]
Boxes = ArrayLike | Sequence[ArrayLike]
Needs = Sequence[bool]
