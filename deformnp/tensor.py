"""``Tensor``: an array with an optional gradient and a link to the op that produced it.

The engine is deliberately small (in the spirit of micrograd and early tinygrad):

* a Tensor wraps an array (``.data``: a NumPy array, or a CUDA device array, see
  ``Tensor.to``) and, when it was produced by a recorded op, the node of that op;
* ``backward()`` walks the recorded nodes from this tensor in reverse topological order,
  calls each op's ``backward`` and accumulates the gradients of its inputs (a tensor used twice
  gets the sum), then frees the graph unless ``retain_graph=True``;
* leaves that require grad accumulate into ``.grad`` across backward calls until zeroed.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import Any

import numpy as np

from .cuda import is_cuda_array as _is_cuda_array

__all__ = ["Tensor", "tensor", "sum_to_shape", "unwrap"]

_FLOATS = (np.float32, np.float64)


class Tensor:
    """An n-dimensional array that can record the operations applied to it.

    The analogue of ``torch.Tensor``: it wraps an array (:attr:`data`), and when it was produced
    by a recorded op it holds the node of that op, which :meth:`backward` replays. The
    arithmetic operators and the methods that are ops (``sum``, ``reshape``, ``permute``,
    ``softmax``, ``to``, ``astype``, ...) are the functions of :mod:`deformnp.functional`.

    ``Tensor(data)`` wraps a NumPy array without copying; :func:`deformnp.tensor` copies, as
    ``torch.tensor`` does. The data keeps its dtype: float32 stays float32, float64 stays
    float64; Python floats and lists of floats become NumPy's default float64. Only floating
    tensors can require grad.

    Parameters
    ----------
    data : array_like, Tensor or CUDA array
        The values. A NumPy array is wrapped as is when ``dtype`` is None or matches; a Tensor's
        array is shared; a CUDA array (numba, CuPy, PyTorch CUDA tensor: anything with
        ``__cuda_array_interface__``) is viewed without copying, and the tensor lives on
        ``"cuda"``.
    dtype : numpy.dtype or type, optional
        Cast host data to this dtype (``numpy.asarray(data, dtype)``); None keeps its dtype.
    requires_grad : bool, default False
        Make the tensor a leaf that accumulates gradients in :attr:`grad`.

    Raises
    ------
    TypeError
        If ``requires_grad`` is True and the dtype is not float32 or float64, or ``dtype``
        would change the dtype of a CUDA array.

    See Also
    --------
    tensor : Create a Tensor that owns a copy of its data.
    Function : Base class of the ops that Tensors record.
    """

    __slots__ = ("data", "grad", "requires_grad", "_node", "_retain_grad", "__weakref__")
    __array_ufunc__ = None  # make `ndarray op Tensor` defer to Tensor's reflected operators

    def __init__(self, data: Any, dtype: Any = None, requires_grad: bool = False) -> None:
        if isinstance(data, Tensor):
            data = data.data
        if _is_cuda_array(data):
            from .cuda import as_device_array

            data = as_device_array(data)  # CuPy / PyTorch CUDA arrays: a zero-copy numba view
            if dtype is not None and np.dtype(dtype) != data.dtype:
                raise TypeError("Tensor: cannot change the dtype of a CUDA array on creation")
        else:
            data = np.asarray(data, dtype=dtype)
        #: The values: a NumPy array, or a numba CUDA device array on ``"cuda"``.
        self.data = data
        #: The accumulated gradient (an array of :attr:`data`'s shape and dtype), or None. Set by
        #: :meth:`backward` on leaves that require grad (and on tensors that called
        #: :meth:`retain_grad`); it accumulates across backward calls until zeroed.
        self.grad: Any = None
        self._node = None
        self._retain_grad = False
        #: Whether gradients flow to this tensor: set on leaves with :meth:`requires_grad_`, and
        #: on the outputs of ops recorded while grad mode is on.
        self.requires_grad = False
        if requires_grad:
            self.requires_grad_(True)

    @classmethod
    def _wrap(cls, data: Any, requires_grad: bool = False) -> Tensor:
        t = cls.__new__(cls)
        if not _is_cuda_array(data):
            data = np.asarray(data)
        t.data = data
        t.grad = None
        t._node = None
        t._retain_grad = False
        t.requires_grad = requires_grad
        return t

    # ------------------------------------------------------------------ properties
    @property
    def shape(self) -> tuple[int, ...]:
        """The shape, a tuple of ints (torch's ``Tensor.shape``)."""
        return tuple(self.data.shape)

    @property
    def dtype(self) -> np.dtype:
        """The NumPy dtype of the data."""
        return np.dtype(self.data.dtype)

    @property
    def ndim(self) -> int:
        """The number of dimensions."""
        return len(self.data.shape)

    @property
    def size(self) -> int:
        """The number of elements (an int, as NumPy's ``size``; torch's ``numel()``)."""
        return int(np.prod(self.data.shape, dtype=np.int64))

    def numel(self) -> int:
        """Return the number of elements (torch's ``Tensor.numel``).

        Returns
        -------
        int
            The product of the shape.
        """
        return self.size

    def dim(self) -> int:
        """Return the number of dimensions (torch's ``Tensor.dim``).

        Returns
        -------
        int
            ``len(self.shape)``.
        """
        return self.ndim

    def __len__(self) -> int:
        if self.ndim == 0:
            raise TypeError("len() of a 0-d tensor")
        return self.data.shape[0]

    @property
    def device(self) -> str:
        """Where the data lives: ``"cpu"`` or ``"cuda"``."""
        return "cuda" if _is_cuda_array(self.data) else "cpu"

    @property
    def is_leaf(self) -> bool:
        """True for a tensor not produced by a recorded op (torch's ``is_leaf``)."""
        return self._node is None

    @property
    def T(self) -> Tensor:
        """The tensor with its dimensions reversed (differentiable; a 2-D transpose)."""
        return self.permute(*reversed(range(self.ndim)))

    # ------------------------------------------------------------------ conversion
    def numpy(self) -> np.ndarray:
        """Return the data as a NumPy array.

        Returns
        -------
        numpy.ndarray
            :attr:`data` itself on the CPU (no copy: writing to it changes the tensor); a host
            copy when the tensor lives on CUDA.
        """
        if self.device == "cuda":
            return self.data.copy_to_host()
        return self.data

    def __array__(self, dtype: Any = None, copy: Any = None) -> np.ndarray:
        a = self.numpy()
        return a if dtype is None else a.astype(dtype)

    def item(self) -> float | int | bool:
        """Return the value of a one-element tensor as a Python number.

        Returns
        -------
        float, int or bool
            The single element.

        Raises
        ------
        ValueError
            If the tensor does not have exactly one element.
        """
        a = self.numpy()
        if a.size != 1:
            raise ValueError(
                f"item(): only one-element tensors can be converted, got shape {a.shape}"
            )
        return a.reshape(()).item()

    def tolist(self) -> Any:
        """Return the data as (nested) Python lists.

        Returns
        -------
        list or scalar
            ``self.numpy().tolist()``: a Python number for a 0-d tensor.
        """
        return self.numpy().tolist()

    def detach(self) -> Tensor:
        """Return a new tensor sharing the data, cut from the graph.

        Returns
        -------
        Tensor
            A leaf with the same :attr:`data` (not copied) that does not require grad.
        """
        return Tensor._wrap(self.data, requires_grad=False)

    def requires_grad_(self, requires_grad: bool = True) -> Tensor:
        """Set :attr:`requires_grad` in place (torch's ``Tensor.requires_grad_``).

        Parameters
        ----------
        requires_grad : bool, default True
            Whether gradients should flow to (and accumulate in) this tensor.

        Returns
        -------
        Tensor
            ``self``.

        Raises
        ------
        TypeError
            If ``requires_grad`` is True and the dtype is not float32 or float64.
        RuntimeError
            If ``requires_grad`` is False on a non-leaf tensor.
        """
        if requires_grad and self.dtype.type not in _FLOATS:
            raise TypeError(
                f"requires_grad_: only float32 and float64 tensors can require grad, got {self.dtype}"
            )
        if not requires_grad and self._node is not None:
            raise RuntimeError("requires_grad_: cannot turn off requires_grad on a non-leaf tensor")
        self.requires_grad = bool(requires_grad)
        return self

    def retain_grad(self) -> Tensor:
        """Keep :attr:`grad` for this non-leaf tensor on backward (torch's ``retain_grad``).

        Returns
        -------
        Tensor
            ``self``.
        """
        self._retain_grad = True
        return self

    def cpu(self) -> Tensor:
        """Return the tensor on the CPU (``self.to("cpu")``).

        Returns
        -------
        Tensor
            ``self`` when it is on the CPU already; otherwise a host copy through which the
            gradient flows back to the device.
        """
        return self.to("cpu")

    def cuda(self) -> Tensor:
        """Return the tensor on the CUDA device (``self.to("cuda")``).

        Returns
        -------
        Tensor
            ``self`` when it is on CUDA already; otherwise a device copy through which the
            gradient flows back to the host.

        Raises
        ------
        RuntimeError
            If CUDA is not available (see :func:`deformnp.cuda.is_available`).
        """
        return self.to("cuda")

    def float(self) -> Tensor:
        """Return the tensor cast to float32 (``self.astype(np.float32)``), differentiably.

        Returns
        -------
        Tensor
            ``self`` when it is float32 already; otherwise a cast copy.
        """
        return self.astype(np.float32)

    def double(self) -> Tensor:
        """Return the tensor cast to float64 (``self.astype(np.float64)``), differentiably.

        Returns
        -------
        Tensor
            ``self`` when it is float64 already; otherwise a cast copy.
        """
        return self.astype(np.float64)

    # ------------------------------------------------------------------ backward
    def backward(self, grad: Any = None, retain_graph: bool = False) -> None:
        """Accumulate the gradient of this tensor into every leaf that requires grad.

        torch's ``Tensor.backward``: the recorded nodes are replayed from this tensor in reverse
        topological order, each op's ``backward`` gives the gradients of its inputs, and a
        tensor used several times receives the sum. Leaves that require grad (and tensors that
        called :meth:`retain_grad`) add the result to their :attr:`grad`.

        Parameters
        ----------
        grad : array_like or Tensor, optional
            The gradient of some scalar with respect to this tensor, in this tensor's shape
            (cast to its dtype and moved to its device). May be omitted for a one-element
            tensor (then 1).
        retain_graph : bool, default False
            Keep the graph (and the arrays the ops saved) for another backward; otherwise it is
            freed.

        Raises
        ------
        RuntimeError
            If this tensor does not require grad, ``grad`` is omitted for a tensor of more than
            one element, the graph was already freed by a previous backward, or an op's
            ``backward`` returned too few gradients or a gradient of the wrong shape.
        ValueError
            If ``grad`` does not have this tensor's shape.
        """
        if not self.requires_grad:
            raise RuntimeError(
                "backward: this tensor does not require grad and has no recorded graph"
            )
        if grad is None:
            if self.size != 1:
                raise RuntimeError(
                    f"backward: grad can be implicitly created only for one-element tensors, "
                    f"this one has shape {self.shape}"
                )
            grad = _ones_like(self.data)
        else:
            grad = _as_grad(grad, self)

        order = self._topological_order()
        grads: dict[int, Any] = {id(self): grad}
        # keys of ``grads`` whose array nothing else references (made by the engine, or by an
        # op that declares ``fresh_grads``): a leaf may take such an array without a copy
        unshared: set[int] = set()
        for t in reversed(order):
            g = grads.pop(id(t), None)
            if g is None:
                continue
            node = t._node
            if node is None or t._retain_grad:
                # A fresh array: the gradient an op returned may be a read-only broadcast view or
                # shared with another input (``a + b`` hands the same array to both). A leaf
                # takes an unshared gradient as it is (a non-leaf's also flows on to its op).
                if t.grad is not None:
                    t.grad = _accumulate(t.grad, g)
                elif node is None and id(t) in unshared:
                    t.grad = g
                else:
                    t.grad = _owned(g)
            if node is None:
                continue
            if node.freed:
                raise RuntimeError(
                    "backward: trying to backward through the graph a second time; specify "
                    "retain_graph=True when calling backward() the first time"
                )
            in_grads = node.fn.backward(node.ctx, g)
            if not isinstance(in_grads, tuple):
                in_grads = (in_grads,)
            if len(in_grads) < len(node.parents):
                raise RuntimeError(
                    f"{node.fn.__name__}.backward returned {len(in_grads)} gradients, "
                    f"expected {len(node.parents)}"
                )
            fresh = node.fn.fresh_grads
            for p, pg in zip(node.parents, in_grads, strict=False):
                if p is None or pg is None or not p.requires_grad:
                    continue
                # an op's gradient counts as unshared only if the op allocated it and gave it
                # to this input alone (astype and _accumulate below make new arrays; a
                # sum_to_shape result is a view, so it fails _plain_owned and is copied)
                made = fresh and sum(x is pg for x in in_grads) == 1
                try:
                    pg = sum_to_shape(pg, p.shape)
                except ValueError:
                    raise RuntimeError(
                        f"{node.fn.__name__}.backward returned a gradient of shape "
                        f"{tuple(pg.shape)} for an input of shape {p.shape}"
                    ) from None
                if pg.dtype != p.dtype:
                    if _is_cuda_array(pg):
                        raise TypeError(
                            f"{node.fn.__name__}.backward returned a {pg.dtype} gradient for a "
                            f"{p.dtype} CUDA tensor"
                        )
                    pg = pg.astype(p.dtype)
                    made = True
                key = id(p)
                if key in grads:
                    grads[key] = _accumulate(grads[key], pg)
                    made = True
                else:
                    grads[key] = pg
                if made and _plain_owned(grads[key]):
                    unshared.add(key)
                else:
                    unshared.discard(key)
            if not retain_graph:
                node.freed = True
                node.ctx.release()

    def _topological_order(self) -> list[Tensor]:
        order: list[Tensor] = []
        seen: set[int] = set()
        stack: list[tuple[Tensor, bool]] = [(self, False)]
        while stack:
            t, expanded = stack.pop()
            if expanded:
                order.append(t)
                continue
            if id(t) in seen:
                continue
            seen.add(id(t))
            stack.append((t, True))
            if t._node is not None:
                for p in t._node.parents:
                    if p is not None and p.requires_grad and id(p) not in seen:
                        stack.append((p, False))
        return order

    def zero_grad(self) -> None:
        """Clear the accumulated gradient (set :attr:`grad` to None)."""
        self.grad = None

    # ------------------------------------------------------------------ printing
    def __repr__(self) -> str:
        body = np.array2string(self.numpy(), separator=", ", prefix="tensor(")
        extra = ""
        if self.dtype != np.float64:
            extra += f", dtype={self.dtype}"
        if self.device != "cpu":
            extra += f", device='{self.device}'"
        if self._node is not None:  # the op's name: MulFunction shows as <Mul>
            extra += f", grad_fn=<{self._node.fn.__name__.removesuffix('Function')}>"
        elif self.requires_grad:
            extra += ", requires_grad=True"
        return f"tensor({body}{extra})"

    def __bool__(self) -> bool:
        return bool(self.item())

    def __float__(self) -> float:
        return float(self.item())

    def __int__(self) -> int:
        return int(self.item())

    def __hash__(self) -> int:
        return id(self)

    def __iter__(self) -> Iterator[Tensor]:
        if self.ndim == 0:
            raise TypeError("iteration over a 0-d tensor")
        for i in range(self.data.shape[0]):
            yield self[i]

    def __setitem__(self, index: Any, value: Any) -> None:
        """In-place assignment into the data, allowed only where no gradient can be affected."""
        if self.requires_grad or self._node is not None:
            raise RuntimeError(
                "__setitem__: in-place assignment to a tensor that requires grad is not "
                "supported; build the result with where/masked_fill/cat instead"
            )
        if isinstance(value, Tensor):
            value = value.data
        if isinstance(index, Tensor):
            index = index.data
        self.data[index] = value

    # The arithmetic operators and the methods that are ops (``sum``, ``reshape``, ..., ``astype``
    # and ``to(device)``) are attached by deformnp.functional, which defines them as Functions.


def unwrap(x: Any) -> Any:
    """The array behind a Tensor, or ``x`` itself (a NumPy array, a device array, a list...)."""
    return x.data if isinstance(x, Tensor) else x


def sum_to_shape(grad: Any, shape: tuple[int, ...]) -> Any:
    """Sum a gradient computed in a broadcast shape back to ``shape`` (NumPy broadcasting rules)."""
    shape = tuple(shape)
    if tuple(grad.shape) == shape:
        return grad
    if _is_cuda_array(grad):
        raise ValueError(
            f"sum_to_shape: broadcasting is not supported on CUDA tensors (gradient of shape "
            f"{tuple(grad.shape)} for an input of shape {shape}); use same-shape operands"
        )
    ndiff = grad.ndim - len(shape)
    if ndiff < 0:
        raise ValueError(f"sum_to_shape: gradient of shape {grad.shape} cannot reduce to {shape}")
    axes = list(range(ndiff))
    for i, n in enumerate(shape):
        g = grad.shape[ndiff + i]
        if n == 1 and g != 1:
            axes.append(ndiff + i)
        elif n != g:
            raise ValueError(
                f"sum_to_shape: gradient of shape {grad.shape} cannot reduce to {shape}"
            )
    if axes:
        grad = grad.sum(axis=tuple(axes), keepdims=True)
    return grad.reshape(shape)


def _accumulate(a: Any, b: Any) -> Any:
    """a + b for host arrays or device arrays (a new array; neither input is modified)."""
    if _is_cuda_array(a):
        from .kernels.cuda.elementwise import binary

        return binary("add", a, b)
    return a + b


def _plain_owned(g: Any) -> bool:
    """Whether ``g`` is a host array a leaf could keep as its gradient: it owns its memory (a
    view does not), is writeable and C-contiguous."""
    return (
        isinstance(g, np.ndarray) and g.flags.owndata and g.flags.writeable and g.flags.c_contiguous
    )


def _owned(g: Any) -> Any:
    """A writeable, contiguous copy of a host gradient (device arrays are kept as they are)."""
    if _is_cuda_array(g):
        return g
    return np.array(g, order="C", copy=True)


def _ones_like(a: Any) -> Any:
    if _is_cuda_array(a):
        from .cuda import ones_like

        return ones_like(a)
    return np.ones_like(a)


def _as_grad(grad: Any, t: Tensor) -> Any:
    if isinstance(grad, Tensor):
        grad = grad.data
    if t.device == "cuda":
        if not _is_cuda_array(grad):
            from .cuda import to_device

            grad = to_device(np.ascontiguousarray(np.asarray(grad, dtype=t.dtype)))
    else:
        if _is_cuda_array(grad):
            grad = grad.copy_to_host()
        grad = np.asarray(grad, dtype=t.dtype)
    if tuple(grad.shape) != t.shape:
        raise ValueError(f"backward: grad has shape {tuple(grad.shape)}, expected {t.shape}")
    return grad


def tensor(data: Any, dtype: Any = None, requires_grad: bool = False) -> Tensor:
    """Create a Tensor (a leaf) from array-like ``data``, copying it as ``torch.tensor`` does.

    ``Tensor(array)`` wraps without copying; ``tensor(array)`` owns its data, so updating it in
    place (an optimizer step) never changes the caller's array.

    Parameters
    ----------
    data : array_like, Tensor or CUDA array
        The values (a Tensor's array is copied; a CUDA array is viewed, not copied).
    dtype : numpy.dtype or type, optional
        The dtype of the copy; None keeps the data's dtype (Python floats become float64).
    requires_grad : bool, default False
        Make the tensor a leaf that accumulates gradients.

    Returns
    -------
    Tensor
        A new leaf tensor.

    Raises
    ------
    TypeError
        If ``requires_grad`` is True and the dtype is not float32 or float64.

    See Also
    --------
    Tensor : The class, whose constructor does not copy.
    """
    if isinstance(data, Tensor):
        data = data.data
    if not _is_cuda_array(data):
        data = np.array(data, dtype=dtype, copy=True)
    return Tensor(data, dtype=dtype, requires_grad=requires_grad)


def as_tensor_args(*items: Iterable) -> tuple[Tensor, ...]:
    return tuple(x if isinstance(x, Tensor) else Tensor(x) for x in items)
