"""Generic differentiable operations, with ``torch.nn.functional``'s names and signatures.

Each op is a :class:`~deformnp.function.Function` whose forward and backward sit side by side.
Gradients returned in a broadcast shape are summed back by the engine (``sum_to_shape``).
Every function here accepts Tensors, NumPy arrays or Python scalars and returns a Tensor.

Contents: elementwise math and activations (``relu``, ``gelu``, ``silu``, ``softplus``, ...),
reductions, shape ops and indexing, ``matmul``/``einsum``, ``softmax``/``log_softmax``, and the
layer ops ``conv2d``, ``linear``, ``layer_norm``, ``dropout``, ``pad`` and the losses
``mse_loss``, ``l1_loss``, ``nll_loss``, ``cross_entropy``. The layer ops validate their inputs
(float32/float64, one dtype, shapes) with messages that name the op and the argument; the
elementwise ops follow NumPy's type promotion. ``manual_seed`` seeds dropout and ``nn.init``.
NumPy only, except the loss-forming ops (add, sub, mul, div, neg, full sum and mean), which
also run on CUDA tensors; every other op refuses a CUDA array with a TypeError naming it.
"""

from __future__ import annotations

import builtins
import math
import threading
from collections.abc import Sequence
from typing import Any

import numpy as np

from .function import Context, Function
from .tensor import Tensor

# ---------------------------------------------------------------------------- helpers


def _scipy_special() -> Any:
    """scipy.special, imported on first use (it is the slowest part of ``import deformnp``)."""
    from scipy import special

    return special


def _t(x: Any, like: Tensor | None = None) -> Tensor:
    """Wrap ``x`` as a Tensor; Python scalars take the dtype of ``like`` (as torch does)."""
    if isinstance(x, Tensor):
        return x
    if like is not None and isinstance(x, (int, float, bool)) and not isinstance(x, np.ndarray):
        if like.dtype.kind == "f":
            return Tensor._wrap(np.asarray(x, dtype=like.dtype))
    return Tensor(x)


def _pair_operands(a: Any, b: Any) -> tuple[Tensor, Tensor]:
    if isinstance(a, Tensor):
        return a, _t(b, a)
    b = _t(b)
    return _t(a, b), b


def _norm_dim(dim: int, ndim: int, op: str) -> int:
    if not -builtins.max(ndim, 1) <= dim < builtins.max(ndim, 1):
        raise IndexError(f"{op}: dim {dim} out of range for a tensor with {ndim} dimensions")
    return dim % builtins.max(ndim, 1)


def _norm_dims(dim: Any, ndim: int, op: str) -> tuple[int, ...] | None:
    if dim is None:
        return None
    if isinstance(dim, (int, np.integer)):
        dim = (int(dim),)
    return tuple(sorted(_norm_dim(int(d), ndim, op) for d in dim))


# ---------------------------------------------------------------------------- elementwise


class Add(Function):
    @staticmethod
    def forward(ctx: Context, a: Any, b: Any) -> Any:
        return a + b

    @staticmethod
    def backward(ctx: Context, grad: Any) -> tuple:
        return grad, grad


class Sub(Function):
    @staticmethod
    def forward(ctx: Context, a: Any, b: Any) -> Any:
        return a - b

    @staticmethod
    def backward(ctx: Context, grad: Any) -> tuple:
        return grad, -grad


class Mul(Function):
    @staticmethod
    def forward(ctx: Context, a: Any, b: Any) -> Any:
        ctx.save_for_backward(a, b)
        return a * b

    @staticmethod
    def backward(ctx: Context, grad: Any) -> tuple:
        a, b = ctx.saved_tensors
        return (
            grad * b if ctx.needs_input_grad[0] else None,
            grad * a if ctx.needs_input_grad[1] else None,
        )


class Div(Function):
    @staticmethod
    def forward(ctx: Context, a: Any, b: Any) -> Any:
        ctx.save_for_backward(a, b)
        return a / b

    @staticmethod
    def backward(ctx: Context, grad: Any) -> tuple:
        a, b = ctx.saved_tensors
        ga = grad / b if ctx.needs_input_grad[0] else None
        gb = -grad * a / (b * b) if ctx.needs_input_grad[1] else None
        return ga, gb


class Pow(Function):
    @staticmethod
    def forward(ctx: Context, a: Any, b: Any) -> Any:
        out = a**b
        ctx.save_for_backward(a, b, out)
        return out

    @staticmethod
    def backward(ctx: Context, grad: Any) -> tuple:
        a, b = ctx.saved_tensors[:2]
        out = ctx.saved_tensors[2]
        ga = grad * b * a ** (b - 1) if ctx.needs_input_grad[0] else None
        gb = None
        if ctx.needs_input_grad[1]:
            with np.errstate(divide="ignore", invalid="ignore"):
                gb = grad * out * np.where(a > 0, np.log(np.where(a > 0, a, 1)), 0)
        return ga, gb


class Neg(Function):
    @staticmethod
    def forward(ctx: Context, a: Any) -> Any:
        return -a

    @staticmethod
    def backward(ctx: Context, grad: Any) -> Any:
        return -grad


class Exp(Function):
    @staticmethod
    def forward(ctx: Context, a: Any) -> Any:
        out = np.exp(a)
        ctx.save_for_backward(out)
        return out

    @staticmethod
    def backward(ctx: Context, grad: Any) -> Any:
        return grad * ctx.saved_tensors[0]


class Log(Function):
    @staticmethod
    def forward(ctx: Context, a: Any) -> Any:
        ctx.save_for_backward(a)
        return np.log(a)

    @staticmethod
    def backward(ctx: Context, grad: Any) -> Any:
        return grad / ctx.saved_tensors[0]


class Sqrt(Function):
    @staticmethod
    def forward(ctx: Context, a: Any) -> Any:
        out = np.sqrt(a)
        ctx.save_for_backward(out)
        return out

    @staticmethod
    def backward(ctx: Context, grad: Any) -> Any:
        return grad / (2 * ctx.saved_tensors[0])


class Abs(Function):
    @staticmethod
    def forward(ctx: Context, a: Any) -> Any:
        ctx.save_for_backward(a)
        return np.abs(a)

    @staticmethod
    def backward(ctx: Context, grad: Any) -> Any:
        return grad * np.sign(ctx.saved_tensors[0])


class Sin(Function):
    @staticmethod
    def forward(ctx: Context, a: Any) -> Any:
        ctx.save_for_backward(a)
        return np.sin(a)

    @staticmethod
    def backward(ctx: Context, grad: Any) -> Any:
        return grad * np.cos(ctx.saved_tensors[0])


class Cos(Function):
    @staticmethod
    def forward(ctx: Context, a: Any) -> Any:
        ctx.save_for_backward(a)
        return np.cos(a)

    @staticmethod
    def backward(ctx: Context, grad: Any) -> Any:
        return -grad * np.sin(ctx.saved_tensors[0])


class Tanh(Function):
    @staticmethod
    def forward(ctx: Context, a: Any) -> Any:
        out = np.tanh(a)
        ctx.save_for_backward(out)
        return out

    @staticmethod
    def backward(ctx: Context, grad: Any) -> Any:
        out = ctx.saved_tensors[0]
        return grad * (1 - out * out)


class Sigmoid(Function):
    @staticmethod
    def forward(ctx: Context, a: Any) -> Any:
        out = _scipy_special().expit(a).astype(a.dtype, copy=False)
        ctx.save_for_backward(out)
        return out

    @staticmethod
    def backward(ctx: Context, grad: Any) -> Any:
        out = ctx.saved_tensors[0]
        return grad * out * (1 - out)


class ReLU(Function):
    @staticmethod
    def forward(ctx: Context, a: Any) -> Any:
        ctx.save_for_backward(a > 0)
        return np.maximum(a, 0).astype(a.dtype, copy=False)  # NaN stays NaN, as in torch

    @staticmethod
    def backward(ctx: Context, grad: Any) -> Any:
        return grad * ctx.saved_tensors[0]


class Clamp(Function):
    @staticmethod
    def forward(ctx: Context, a: Any, lo: float | None, hi: float | None) -> Any:
        lo_ = -np.inf if lo is None else lo
        hi_ = np.inf if hi is None else hi
        ctx.save_for_backward((a >= lo_) & (a <= hi_))
        return np.clip(a, lo_, hi_).astype(a.dtype, copy=False)

    @staticmethod
    def backward(ctx: Context, grad: Any) -> tuple:
        return grad * ctx.saved_tensors[0], None, None


class Where(Function):
    @staticmethod
    def forward(ctx: Context, cond: Any, a: Any, b: Any) -> Any:
        cond = np.asarray(cond, dtype=bool)
        ctx.save_for_backward(cond)
        return np.where(cond, a, b)

    @staticmethod
    def backward(ctx: Context, grad: Any) -> tuple:
        (cond,) = ctx.saved_tensors
        zero = np.zeros((), grad.dtype)
        return None, np.where(cond, grad, zero), np.where(cond, zero, grad)


class Maximum(Function):
    """Elementwise max (``sign=1``) or min (``sign=-1``); ties split the gradient evenly (torch)."""

    @staticmethod
    def forward(ctx: Context, a: Any, b: Any, sign: int) -> Any:
        share_a = np.where(a == b, 0.5, np.where((a > b) if sign > 0 else (a < b), 1.0, 0.0))
        ctx.save_for_backward(share_a)
        return np.maximum(a, b) if sign > 0 else np.minimum(a, b)

    @staticmethod
    def backward(ctx: Context, grad: Any) -> tuple:
        (share_a,) = ctx.saved_tensors
        share_a = share_a.astype(grad.dtype, copy=False)
        return grad * share_a, grad * (1 - share_a), None


def add(input: Any, other: Any) -> Tensor:
    a, b = _pair_operands(input, other)
    if a.device == "cuda" or b.device == "cuda":
        return _cuda_binary("add", a, b)
    return Add.apply(a, b)


def sub(input: Any, other: Any) -> Tensor:
    a, b = _pair_operands(input, other)
    if a.device == "cuda" or b.device == "cuda":
        return _cuda_binary("sub", a, b)
    return Sub.apply(a, b)


def mul(input: Any, other: Any) -> Tensor:
    a, b = _pair_operands(input, other)
    if a.device == "cuda" or b.device == "cuda":
        return _cuda_binary("mul", a, b)
    return Mul.apply(a, b)


def div(input: Any, other: Any) -> Tensor:
    a, b = _pair_operands(input, other)
    if a.device == "cuda" or b.device == "cuda":
        return _cuda_binary("div", a, b)
    return Div.apply(a, b)


def pow(input: Any, exponent: Any) -> Tensor:  # noqa: A001 - torch's name
    return Pow.apply(*_pair_operands(input, exponent))


def neg(input: Any) -> Tensor:
    x = _t(input)
    if x.device == "cuda":
        return CudaBinary.apply(x, -1.0, "mul")
    return Neg.apply(x)


def exp(input: Any) -> Tensor:
    return Exp.apply(_t(input))


def log(input: Any) -> Tensor:
    return Log.apply(_t(input))


def sqrt(input: Any) -> Tensor:
    return Sqrt.apply(_t(input))


def abs(input: Any) -> Tensor:  # noqa: A001 - torch's name
    return Abs.apply(_t(input))


def sin(input: Any) -> Tensor:
    return Sin.apply(_t(input))


def cos(input: Any) -> Tensor:
    return Cos.apply(_t(input))


def tanh(input: Any) -> Tensor:
    return Tanh.apply(_t(input))


def sigmoid(input: Any) -> Tensor:
    return Sigmoid.apply(_t(input))


def relu(input: Any, inplace: bool = False) -> Tensor:
    return ReLU.apply(_t(input))


def clamp(input: Any, min: float | None = None, max: float | None = None) -> Tensor:  # noqa: A002
    return Clamp.apply(_t(input), min, max)


def where(condition: Any, input: Any, other: Any) -> Tensor:
    """Elements of ``input`` where ``condition`` holds, else of ``other`` (differentiable in both)."""
    a, b = _pair_operands(input, other)
    cond = condition.data if isinstance(condition, Tensor) else np.asarray(condition)
    return Where.apply(cond, a, b)


def masked_fill(input: Any, mask: Any, value: float) -> Tensor:
    """``input`` with ``value`` written where the boolean ``mask`` (broadcastable) is True."""
    x = _t(input)
    return where(mask, Tensor._wrap(np.asarray(value, dtype=x.dtype)), x)


def maximum(input: Any, other: Any) -> Tensor:
    return Maximum.apply(*_pair_operands(input, other), 1)


def minimum(input: Any, other: Any) -> Tensor:
    return Maximum.apply(*_pair_operands(input, other), -1)


# ---------------------------------------------------------------------------- reductions


class Sum(Function):
    @staticmethod
    def forward(ctx: Context, a: Any, dims: tuple | None, keepdim: bool) -> Any:
        ctx.shape, ctx.dims, ctx.keepdim = a.shape, dims, keepdim
        return np.asarray(a.sum(axis=dims, keepdims=keepdim))

    @staticmethod
    def backward(ctx: Context, grad: Any) -> tuple:
        if ctx.dims is not None and not ctx.keepdim:
            grad = np.expand_dims(grad, ctx.dims)
        return np.broadcast_to(grad, ctx.shape), None, None


class Mean(Function):
    @staticmethod
    def forward(ctx: Context, a: Any, dims: tuple | None, keepdim: bool) -> Any:
        ctx.shape, ctx.dims, ctx.keepdim = a.shape, dims, keepdim
        n = a.size if dims is None else int(np.prod([a.shape[d] for d in dims]))
        ctx.n = builtins.max(n, 1)
        return (
            np.asarray(a.mean(axis=dims, keepdims=keepdim))
            if a.size
            else np.asarray(a.sum(axis=dims, keepdims=keepdim) * np.nan)
        )

    @staticmethod
    def backward(ctx: Context, grad: Any) -> tuple:
        if ctx.dims is not None and not ctx.keepdim:
            grad = np.expand_dims(grad, ctx.dims)
        return np.broadcast_to(grad / ctx.n, ctx.shape), None, None


class MaxMin(Function):
    """max (``sign=1``) or min (``sign=-1``) over dims; the gradient is split evenly among ties."""

    @staticmethod
    def forward(ctx: Context, a: Any, dims: tuple | None, keepdim: bool, sign: int) -> Any:
        out = a.max(axis=dims, keepdims=True) if sign > 0 else a.min(axis=dims, keepdims=True)
        hit = a == out
        ctx.save_for_backward(hit / hit.sum(axis=dims, keepdims=True))
        ctx.dims, ctx.keepdim = dims, keepdim
        return out if keepdim else np.asarray(out.squeeze(axis=dims) if dims else out.reshape(()))

    @staticmethod
    def backward(ctx: Context, grad: Any) -> tuple:
        (share,) = ctx.saved_tensors
        if not ctx.keepdim:
            grad = np.expand_dims(grad, ctx.dims) if ctx.dims else grad.reshape((1,) * share.ndim)
        return (grad * share).astype(grad.dtype, copy=False), None, None, None


def sum(input: Any, dim: Any = None, keepdim: bool = False) -> Tensor:  # noqa: A001
    x = _t(input)
    if x.device == "cuda":
        return CudaReduce.apply(x, "sum", _cuda_full_reduction("sum", x, dim, keepdim))
    return Sum.apply(x, _norm_dims(dim, x.ndim, "sum"), keepdim)


def mean(input: Any, dim: Any = None, keepdim: bool = False) -> Tensor:
    x = _t(input)
    if x.device == "cuda":
        return CudaReduce.apply(x, "mean", _cuda_full_reduction("mean", x, dim, keepdim))
    return Mean.apply(x, _norm_dims(dim, x.ndim, "mean"), keepdim)


def max(input: Any, dim: Any = None, keepdim: bool = False) -> Tensor:  # noqa: A001
    """Maximum over ``dim`` (all elements when None). Returns values only (use :func:`argmax`
    for the indices); ties share the gradient evenly. ``max(a, b)`` with a Tensor or array ``b``
    is the elementwise :func:`maximum`, as in torch."""
    if isinstance(dim, (Tensor, np.ndarray)):
        return maximum(input, dim)
    x = _t(input)
    if x.size == 0:
        raise ValueError("max: expected a non-empty tensor")
    return MaxMin.apply(x, _norm_dims(dim, x.ndim, "max"), keepdim, 1)


def min(input: Any, dim: Any = None, keepdim: bool = False) -> Tensor:  # noqa: A001
    """Minimum over ``dim``; see :func:`max`."""
    if isinstance(dim, (Tensor, np.ndarray)):
        return minimum(input, dim)
    x = _t(input)
    if x.size == 0:
        raise ValueError("min: expected a non-empty tensor")
    return MaxMin.apply(x, _norm_dims(dim, x.ndim, "min"), keepdim, -1)


def var(input: Any, dim: Any = None, keepdim: bool = False, unbiased: bool = True) -> Tensor:
    x = _t(input)
    dims = _norm_dims(dim, x.ndim, "var")
    n = x.size if dims is None else int(np.prod([x.shape[d] for d in dims]))
    centred = x - mean(x, dims, keepdim=True)
    return sum(centred * centred, dims, keepdim=keepdim) / (n - 1 if unbiased else n)


def std(input: Any, dim: Any = None, keepdim: bool = False, unbiased: bool = True) -> Tensor:
    return sqrt(var(input, dim, keepdim=keepdim, unbiased=unbiased))


def argmax(input: Any, dim: int | None = None, keepdim: bool = False) -> Tensor:
    """Index of the (first) maximum, int64, not differentiable; over all elements when None."""
    a = _t(input).data
    if dim is None:
        return Tensor._wrap(np.asarray(np.argmax(a), dtype=np.int64))
    d = _norm_dim(dim, a.ndim, "argmax")
    return Tensor._wrap(np.argmax(a, axis=d, keepdims=keepdim).astype(np.int64))


def argmin(input: Any, dim: int | None = None, keepdim: bool = False) -> Tensor:
    """Index of the (first) minimum; see :func:`argmax`."""
    a = _t(input).data
    if dim is None:
        return Tensor._wrap(np.asarray(np.argmin(a), dtype=np.int64))
    d = _norm_dim(dim, a.ndim, "argmin")
    return Tensor._wrap(np.argmin(a, axis=d, keepdims=keepdim).astype(np.int64))


# ---------------------------------------------------------------------------- shapes


class Reshape(Function):
    @staticmethod
    def forward(ctx: Context, a: Any, shape: tuple) -> Any:
        ctx.shape = a.shape
        return a.reshape(shape)

    @staticmethod
    def backward(ctx: Context, grad: Any) -> tuple:
        return grad.reshape(ctx.shape), None


class Permute(Function):
    @staticmethod
    def forward(ctx: Context, a: Any, axes: tuple) -> Any:
        ctx.axes = axes
        return a.transpose(axes)

    @staticmethod
    def backward(ctx: Context, grad: Any) -> tuple:
        return grad.transpose(np.argsort(ctx.axes)), None


class Expand(Function):
    @staticmethod
    def forward(ctx: Context, a: Any, shape: tuple) -> Any:
        return np.broadcast_to(a, shape)

    @staticmethod
    def backward(ctx: Context, grad: Any) -> tuple:
        return grad, None  # summed back to the input's shape by the engine


def _is_basic_index(index: Any) -> bool:
    """True for indices that never select an element twice (ints, slices, None, ..., masks)."""
    items = index if isinstance(index, tuple) else (index,)
    for i in items:
        if i is None or i is Ellipsis or isinstance(i, (slice, int, np.integer, bool, np.bool_)):
            continue
        if isinstance(i, np.ndarray) and i.dtype == np.bool_:
            continue
        return False
    return True


class GetItem(Function):
    @staticmethod
    def forward(ctx: Context, a: Any, index: Any) -> Any:
        ctx.shape, ctx.index = a.shape, index
        return np.asarray(a[index])

    @staticmethod
    def backward(ctx: Context, grad: Any) -> tuple:
        out = np.zeros(ctx.shape, dtype=grad.dtype)
        if _is_basic_index(ctx.index):
            out[ctx.index] = grad  # each element selected at most once
        else:
            np.add.at(out, ctx.index, grad)  # repeated integer-array indices add up
        return out, None


class Cat(Function):
    @staticmethod
    def forward(ctx: Context, *arrays_and_dim: Any) -> Any:
        *arrays, dim = arrays_and_dim
        ctx.dim = dim
        ctx.bounds = np.cumsum([a.shape[dim] for a in arrays])[:-1]
        return np.concatenate(arrays, axis=dim)

    @staticmethod
    def backward(ctx: Context, grad: Any) -> tuple:
        return (*np.split(grad, ctx.bounds, axis=ctx.dim), None)


class Stack(Function):
    @staticmethod
    def forward(ctx: Context, *arrays_and_dim: Any) -> Any:
        *arrays, dim = arrays_and_dim
        ctx.dim = dim
        return np.stack(arrays, axis=dim)

    @staticmethod
    def backward(ctx: Context, grad: Any) -> tuple:
        return (*np.moveaxis(grad, ctx.dim, 0), None)


def _shape_arg(shape: Sequence) -> tuple[int, ...]:
    if len(shape) == 1 and isinstance(shape[0], (tuple, list)):
        shape = shape[0]
    return tuple(int(s) for s in shape)


def reshape(input: Any, *shape: Any) -> Tensor:
    x = _t(input)
    shape = _shape_arg(shape)
    try:
        np.empty((x.size,), np.int8).reshape(shape)
    except ValueError:
        raise ValueError(
            f"reshape: shape {shape} is invalid for a tensor of {x.size} elements {x.shape}"
        ) from None
    return Reshape.apply(x, shape)


def permute(input: Any, *dims: Any) -> Tensor:
    x = _t(input)
    dims = _shape_arg(dims)
    if sorted(d % builtins.max(x.ndim, 1) for d in dims) != list(range(x.ndim)):
        raise ValueError(f"permute: dims {dims} are not a permutation of {x.ndim} dimensions")
    return Permute.apply(x, tuple(d % x.ndim for d in dims))


def transpose(input: Any, dim0: int, dim1: int) -> Tensor:
    x = _t(input)
    axes = list(range(x.ndim))
    d0, d1 = _norm_dim(dim0, x.ndim, "transpose"), _norm_dim(dim1, x.ndim, "transpose")
    axes[d0], axes[d1] = axes[d1], axes[d0]
    return Permute.apply(x, tuple(axes))


def flatten(input: Any, start_dim: int = 0, end_dim: int = -1) -> Tensor:
    x = _t(input)
    if x.ndim == 0:
        return reshape(x, 1)
    s, e = _norm_dim(start_dim, x.ndim, "flatten"), _norm_dim(end_dim, x.ndim, "flatten")
    shape = x.shape[:s] + (int(np.prod(x.shape[s : e + 1])),) + x.shape[e + 1 :]
    return reshape(x, shape)


def unsqueeze(input: Any, dim: int) -> Tensor:
    x = _t(input)
    d = _norm_dim(dim, x.ndim + 1, "unsqueeze")
    return reshape(x, x.shape[:d] + (1,) + x.shape[d:])


def squeeze(input: Any, dim: int | None = None) -> Tensor:
    x = _t(input)
    if dim is None:
        return reshape(x, tuple(s for s in x.shape if s != 1))
    d = _norm_dim(dim, x.ndim, "squeeze")
    if x.shape[d] != 1:
        return x
    return reshape(x, x.shape[:d] + x.shape[d + 1 :])


def expand(input: Any, *shape: Any) -> Tensor:
    x = _t(input)
    shape = _shape_arg(shape)
    shape = tuple(x.shape[i - len(shape) + x.ndim] if s == -1 else s for i, s in enumerate(shape))
    return Expand.apply(x, shape)


def getitem(input: Any, index: Any) -> Tensor:
    if isinstance(index, Tensor):
        index = index.data
    elif isinstance(index, tuple):
        index = tuple(i.data if isinstance(i, Tensor) else i for i in index)
    return GetItem.apply(_t(input), index)


def cat(tensors: Sequence[Any], dim: int = 0) -> Tensor:
    ts = [_t(x) for x in tensors]
    if not ts:
        raise ValueError("cat: expected a non-empty sequence of tensors")
    return Cat.apply(*ts, _norm_dim(dim, ts[0].ndim, "cat"))


concatenate = cat


def stack(tensors: Sequence[Any], dim: int = 0) -> Tensor:
    ts = [_t(x) for x in tensors]
    if not ts:
        raise ValueError("stack: expected a non-empty sequence of tensors")
    return Stack.apply(*ts, _norm_dim(dim, ts[0].ndim + 1, "stack"))


def split(tensor: Any, split_size_or_sections: Any, dim: int = 0) -> tuple[Tensor, ...]:
    """torch.split: chunks of ``split_size`` (the last may be smaller) or of the given sizes."""
    x = _t(tensor)
    d = _norm_dim(dim, x.ndim, "split")
    n = x.shape[d]
    if isinstance(split_size_or_sections, (int, np.integer)):
        size = int(split_size_or_sections)
        if size <= 0:
            raise ValueError(f"split: split_size must be positive, got {size}")
        sizes = [size] * (n // size) + ([n % size] if n % size else [])
    else:
        sizes = [int(s) for s in split_size_or_sections]
        if builtins.sum(sizes) != n:
            raise ValueError(f"split: sections {sizes} do not add up to dim {d} of size {n}")
    out, start = [], 0
    for s in sizes:
        index = (slice(None),) * d + (slice(start, start + s),)
        out.append(getitem(x, index))
        start += s
    return tuple(out)


def chunk(input: Any, chunks: int, dim: int = 0) -> tuple[Tensor, ...]:
    x = _t(input)
    n = x.shape[_norm_dim(dim, x.ndim, "chunk")]
    return split(x, -(-n // int(chunks)) if n else 1, dim)


class Repeat(Function):
    @staticmethod
    def forward(ctx: Context, a: Any, reps: tuple) -> Any:
        ctx.shape = a.shape
        return np.tile(a, reps)

    @staticmethod
    def backward(ctx: Context, grad: Any) -> tuple:
        # view the tiled gradient as (r0, n0, r1, n1, ...) and sum over the repeats
        lead = grad.ndim - len(ctx.shape)
        shape = list(grad.shape[:lead])
        for r_n, n in zip(grad.shape[lead:], ctx.shape):
            shape += [r_n // n if n else 0, n]
        g = grad.reshape(shape).sum(axis=tuple(range(lead)) + tuple(range(lead, len(shape), 2)))
        return g, None


def repeat(input: Any, *sizes: Any) -> Tensor:
    """torch's ``Tensor.repeat``: tile the tensor ``sizes[d]`` times along each dim (extra
    leading sizes add dims)."""
    x = _t(input)
    reps = _shape_arg(sizes)
    if len(reps) < x.ndim:
        raise ValueError(
            f"repeat: number of repeat sizes ({len(reps)}) can not be smaller than the number of "
            f"dimensions ({x.ndim})"
        )
    if any(r < 0 for r in reps):
        raise ValueError(f"repeat: sizes must be >= 0, got {reps}")
    return Repeat.apply(x, reps)


class Flip(Function):
    @staticmethod
    def forward(ctx: Context, a: Any, dims: tuple) -> Any:
        ctx.dims = dims
        return np.flip(a, dims).copy()

    @staticmethod
    def backward(ctx: Context, grad: Any) -> tuple:
        return np.flip(grad, ctx.dims), None


def flip(input: Any, dims: Any) -> Tensor:
    x = _t(input)
    return Flip.apply(x, _norm_dims(dims, x.ndim, "flip") or ())


class Copy(Function):
    @staticmethod
    def forward(ctx: Context, a: Any) -> Any:
        return np.array(a, copy=True)

    @staticmethod
    def backward(ctx: Context, grad: Any) -> Any:
        return grad


def clone(input: Any) -> Tensor:
    """A differentiable copy (torch's ``clone``)."""
    return Copy.apply(_t(input))


# ---------------------------------------------------------------------------- matmul


class MatMul(Function):
    @staticmethod
    def forward(ctx: Context, a: Any, b: Any) -> Any:
        ctx.save_for_backward(a, b)
        return np.matmul(a, b)

    @staticmethod
    def backward(ctx: Context, grad: Any) -> tuple:
        a, b = ctx.saved_tensors
        ga = np.matmul(grad, np.swapaxes(b, -1, -2)) if ctx.needs_input_grad[0] else None
        gb = np.matmul(np.swapaxes(a, -1, -2), grad) if ctx.needs_input_grad[1] else None
        return ga, gb  # broadcast batch dims are summed back by the engine


def matmul(input: Any, other: Any) -> Tensor:
    """Matrix product with NumPy/torch semantics (batched, broadcast over leading dims)."""
    a, b = _pair_operands(input, other)
    if a.ndim == 0 or b.ndim == 0:
        raise ValueError("matmul: both arguments need at least one dimension")
    ka = a.shape[-1]
    kb = b.shape[-2] if b.ndim > 1 else b.shape[0]
    if ka != kb:
        raise ValueError(f"matmul: inner dimensions differ: input {a.shape} and other {b.shape}")
    if a.ndim == 1:
        return squeeze(matmul(unsqueeze(a, 0), b), -2 if b.ndim > 1 else 0)
    if b.ndim == 1:
        return squeeze(matmul(a, unsqueeze(b, 1)), -1)
    return MatMul.apply(a, b)


def bmm(input: Any, mat2: Any) -> Tensor:
    a, b = _t(input), _t(mat2)
    if a.ndim != 3 or b.ndim != 3:
        raise ValueError(f"bmm: expected 3-d tensors, got {a.shape} and {b.shape}")
    return matmul(a, b)


def _parse_einsum(equation: str, shapes: list[tuple[int, ...]]) -> tuple[list[str], str]:
    """Split an explicit einsum equation into operand and output subscripts, with ``...``
    replaced by explicit letters (right-aligned, as NumPy broadcasts ellipsis dimensions)."""
    eq = equation.replace(" ", "")
    if "->" not in eq:
        raise ValueError(
            f"einsum: only explicit equations ('ij,jk->ik') are supported, got {equation!r}"
        )
    ins_s, out = eq.split("->")
    ins = ins_s.split(",")
    if len(ins) != len(shapes):
        raise ValueError(
            f"einsum: equation {equation!r} names {len(ins)} operands, got {len(shapes)}"
        )
    if "..." in eq:
        free = [c for c in "ABCDEFGHIJKLMNOPQRSTUVWXYZ" if c not in eq]
        n_ell = 0
        for k, (sub, shape) in enumerate(zip(ins, shapes)):
            if "..." in sub:
                n = len(shape) - (len(sub) - 3)
                n_ell = builtins.max(n_ell, n)
                ins[k] = sub.replace("...", "".join(free[len(free) - n :]) if n else "")
        out = out.replace("...", "".join(free[len(free) - n_ell :]) if n_ell else "")
    for sub, shape in zip(ins, shapes):
        if len(sub) != len(shape):
            raise ValueError(
                f"einsum: subscripts {sub!r} do not match an operand of shape {tuple(shape)}"
            )
        if len(set(sub)) != len(sub):
            raise ValueError(
                f"einsum: repeated subscripts within one operand ({sub!r}, a diagonal) are not "
                "supported"
            )
    if len(set(out)) != len(out):
        raise ValueError(f"einsum: repeated output subscripts ({out!r}) are not supported")
    missing = set(out) - set("".join(ins))
    if missing:
        raise ValueError(
            f"einsum: output subscripts {sorted(missing)} appear in no operand of {equation!r}"
        )
    return ins, out


def einsum(equation: str, *operands: Any) -> Tensor:
    """Differentiable ``np.einsum`` for explicit equations (``"bcm,bcn->bmn"``, ``...`` allowed);
    a subscript may not repeat within one operand or in the output."""
    if len(operands) == 1 and isinstance(operands[0], (list, tuple)):
        operands = tuple(operands[0])
    ops = [_t(o) for o in operands]
    ins, out = _parse_einsum(equation, [o.shape for o in ops])
    return Einsum.apply(",".join(ins) + "->" + out, *ops)


def _contract(equation: str, *arrays: Any) -> Any:
    """``np.einsum(equation, *arrays)``; two-operand contractions go through one batched BLAS
    matmul (batch letters, free letters of each side, contracted letters), which is much faster
    than einsum's own loops for attention-sized products."""
    ins, out = equation.split("->")
    subs = ins.split(",")
    if len(arrays) != 2:
        return np.asarray(np.einsum(equation, *arrays, optimize=True))
    (sa, sb), (a, b) = subs, arrays
    shared = set(sa) & set(sb)
    if any(a.shape[sa.index(c)] != b.shape[sb.index(c)] for c in shared):
        return np.asarray(np.einsum(equation, a, b))  # size-1 broadcasting: let NumPy handle it
    # letters in one operand only and not in the output are summed out first
    lone_a = [k for k, c in enumerate(sa) if c not in sb and c not in out]
    if lone_a:
        a, sa = a.sum(axis=tuple(lone_a)), "".join(c for c in sa if c in sb or c in out)
    lone_b = [k for k, c in enumerate(sb) if c not in sa and c not in out]
    if lone_b:
        b, sb = b.sum(axis=tuple(lone_b)), "".join(c for c in sb if c in sa or c in out)
    size = {**dict(zip(sa, a.shape)), **dict(zip(sb, b.shape))}
    batch = [c for c in sa if c in sb and c in out]
    inner = [c for c in sa if c in sb and c not in out]
    left = [c for c in sa if c not in sb]
    right = [c for c in sb if c not in sa]

    def prod(letters: list[str]) -> int:
        return int(np.prod([size[c] for c in letters], dtype=np.int64))

    am = a.transpose([sa.index(c) for c in batch + left + inner])
    bm = b.transpose([sb.index(c) for c in batch + inner + right])
    am = am.reshape(prod(batch), prod(left), prod(inner))
    bm = bm.reshape(prod(batch), prod(inner), prod(right))
    res = np.matmul(am, bm).reshape([size[c] for c in batch + left + right])
    order = batch + left + right
    return res.transpose([order.index(c) for c in out])


class Einsum(Function):
    @staticmethod
    def forward(ctx: Context, equation: str, *arrays: Any) -> Any:
        ins, out = equation.split("->")
        ctx.ins, ctx.out = ins.split(","), out
        ctx.save_for_backward(*arrays)
        return _contract(equation, *arrays)

    @staticmethod
    def backward(ctx: Context, grad: Any) -> tuple:
        arrays = ctx.saved_tensors
        grads: list[Any] = [None]
        for i, sub_i in enumerate(ctx.ins):
            if not ctx.needs_input_grad[i + 1]:
                grads.append(None)
                continue
            others = [s for j, s in enumerate(ctx.ins) if j != i]
            # Subscripts of operand i that appear nowhere else were summed out in forward: the
            # gradient is constant along them, so compute it without them and broadcast.
            seen = set(ctx.out).union(*others)
            keep = "".join(c for c in sub_i if c in seen)
            eq = ",".join([ctx.out, *others]) + "->" + keep
            g = _contract(eq, grad, *[a for j, a in enumerate(arrays) if j != i])
            sizes = dict(zip(keep, g.shape))
            g = g.reshape([sizes.get(c, 1) for c in sub_i])
            # size-1 dims that einsum broadcast are summed back by the engine
            grads.append(np.broadcast_to(g, np.broadcast_shapes(g.shape, arrays[i].shape)))
        return tuple(grads)


# ---------------------------------------------------------------------------- softmax


class Softmax(Function):
    @staticmethod
    def forward(ctx: Context, a: Any, dim: int) -> Any:
        z = a - a.max(axis=dim, keepdims=True)
        e = np.exp(z)
        out = e / e.sum(axis=dim, keepdims=True)
        ctx.save_for_backward(out)
        ctx.dim = dim
        return out

    @staticmethod
    def backward(ctx: Context, grad: Any) -> tuple:
        (out,) = ctx.saved_tensors
        return out * (grad - (grad * out).sum(axis=ctx.dim, keepdims=True)), None


class LogSoftmax(Function):
    @staticmethod
    def forward(ctx: Context, a: Any, dim: int) -> Any:
        z = a - a.max(axis=dim, keepdims=True)
        out = z - np.log(np.exp(z).sum(axis=dim, keepdims=True))
        ctx.save_for_backward(out)
        ctx.dim = dim
        return out

    @staticmethod
    def backward(ctx: Context, grad: Any) -> tuple:
        (out,) = ctx.saved_tensors
        return grad - np.exp(out) * grad.sum(axis=ctx.dim, keepdims=True), None


def softmax(input: Any, dim: int) -> Tensor:
    """Numerically stable softmax along ``dim``."""
    x = _t(input)
    return Softmax.apply(x, _norm_dim(dim, x.ndim, "softmax"))


def log_softmax(input: Any, dim: int) -> Tensor:
    x = _t(input)
    return LogSoftmax.apply(x, _norm_dim(dim, x.ndim, "log_softmax"))


# ---------------------------------------------------------------------------- activations


class GELU(Function):
    @staticmethod
    def forward(ctx: Context, a: Any, approximate: str) -> Any:
        ctx.save_for_backward(a)
        ctx.approximate = approximate
        if approximate == "tanh":
            k = math.sqrt(2.0 / math.pi)
            inner = k * (a + 0.044715 * a**3)
            return (0.5 * a * (1.0 + np.tanh(inner))).astype(a.dtype, copy=False)
        return (0.5 * a * (1.0 + _scipy_special().erf(a / math.sqrt(2.0)))).astype(
            a.dtype, copy=False
        )

    @staticmethod
    def backward(ctx: Context, grad: Any) -> tuple:
        (a,) = ctx.saved_tensors
        if ctx.approximate == "tanh":
            k = math.sqrt(2.0 / math.pi)
            t = np.tanh(k * (a + 0.044715 * a**3))
            d = 0.5 * (1 + t) + 0.5 * a * (1 - t * t) * k * (1 + 3 * 0.044715 * a * a)
        else:
            cdf = 0.5 * (1.0 + _scipy_special().erf(a / math.sqrt(2.0)))
            pdf = np.exp(-0.5 * a * a) / math.sqrt(2.0 * math.pi)
            d = cdf + a * pdf
        return (grad * d).astype(grad.dtype, copy=False), None


def gelu(input: Any, approximate: str = "none") -> Tensor:
    """GELU; the exact erf form by default, ``approximate="tanh"`` for the tanh approximation."""
    if approximate not in ("none", "tanh"):
        raise ValueError(f"gelu: approximate must be 'none' or 'tanh', got {approximate!r}")
    return GELU.apply(_t(input), approximate)


# ---------------------------------------------------------------------------- random state

_generator = np.random.default_rng()


def default_generator() -> np.random.Generator:
    """The module-level NumPy generator used by :func:`dropout` and ``deformnp.nn.init``."""
    return _generator


def manual_seed(seed: int) -> np.random.Generator:
    """Reseed the generator shared by :func:`dropout` and ``deformnp.nn.init`` (as torch's
    global generator is shared by dropout and initialisation); returns it."""
    global _generator
    _generator = np.random.default_rng(seed)
    return _generator


# ---------------------------------------------------------------------------- validation helpers
# (deformnp.ops._common has twins of these; functional cannot import it, since importing
# deformnp.ops loads every op family and those import this module.)


def _host_float(op: str, name: str, x: Any) -> np.ndarray:
    from .cuda import is_cuda_array

    a = x.data if isinstance(x, Tensor) else x
    if is_cuda_array(a):
        raise TypeError(
            f"{op}: {name} is a CUDA array; {op} runs on the CPU only: move it with .to('cpu')"
        )
    a = np.asarray(a)
    if a.dtype not in (np.float32, np.float64):
        raise TypeError(f"{op}: {name} must be float32 or float64, got {a.dtype}")
    return a


def _one_dtype(op: str, **arrays: Any) -> None:
    given = {n: a.dtype for n, a in arrays.items() if a is not None}
    if len(set(given.values())) > 1:
        desc = ", ".join(f"{n} {d}" for n, d in given.items())
        raise TypeError(f"{op}: inputs must share one float dtype, got {desc}")


def _int_pair(op: str, name: str, v: Any, minimum: int) -> tuple[int, int]:
    if isinstance(v, (int, np.integer)) and not isinstance(v, bool):
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


def _reduce(op: str, loss: Tensor, reduction: str) -> Tensor:
    if reduction == "mean":
        return mean(loss)
    if reduction == "sum":
        return sum(loss)
    if reduction == "none":
        return loss
    raise ValueError(f"{op}: reduction must be 'mean', 'sum' or 'none', got {reduction!r}")


# ---------------------------------------------------------------------------- conv2d


def _conv_window(i: int, j: int, dil: tuple, stride: tuple, out_hw: tuple) -> tuple:
    """Rows and columns of the padded input that kernel tap (i, j) reads for every output pixel:
    ``oy*sh + i*dh`` for ``oy`` in ``[0, Hout)`` (likewise x)."""
    (dh, dw), (sh, sw), (ho, wo) = dil, stride, out_hw
    return (
        slice(i * dh, i * dh + sh * (ho - 1) + 1, sh),
        slice(j * dw, j * dw + sw * (wo - 1) + 1, sw),
    )


def _zero_pad(x: np.ndarray, pad: tuple[int, int, int, int]) -> np.ndarray:
    top, bottom, left, right = pad
    if not (top or bottom or left or right):
        return x
    n, c, h, w = x.shape
    xp = np.zeros((n, c, h + top + bottom, w + left + right), x.dtype)
    xp[:, :, top : top + h, left : left + w] = x
    return xp


def _tap_span(k: int, dil: int, stride: int, pad_before: int, size: int, out: int) -> tuple:
    """For kernel tap ``k`` along one axis: the output range ``[lo, hi)`` whose input coordinate
    ``o*stride - pad_before + k*dil`` lies inside ``[0, size)``, and the input slice it reads."""
    off = k * dil - pad_before
    lo = builtins.max(0, -(off // stride))  # the smallest o with o*stride + off >= 0
    hi = builtins.min(out, (size - 1 - off) // stride + 1)
    if hi <= lo:
        return lo, lo, slice(0, 0)
    start = lo * stride + off
    return lo, hi, slice(start, start + (hi - lo - 1) * stride + 1, stride)


def _depthwise_taps(x_shape: tuple, kernel: tuple, stride: tuple, pad: tuple, dilation: tuple,
                    out_hw: tuple) -> list:  # fmt: skip
    """(i, j, output window, input window) for every kernel tap that reads inside the image."""
    _, _, h, w = x_shape
    taps = []
    for i in range(kernel[0]):
        ylo, yhi, ys = _tap_span(i, dilation[0], stride[0], pad[0], h, out_hw[0])
        for j in range(kernel[1]):
            xlo, xhi, xs = _tap_span(j, dilation[1], stride[1], pad[2], w, out_hw[1])
            if yhi > ylo and xhi > xlo:
                taps.append((i, j, (slice(ylo, yhi), slice(xlo, xhi)), (ys, xs)))
    return taps


def _depthwise_forward(x_nhwc: Any, w: Any, taps: list, out_hw: tuple) -> Any:
    """Depthwise conv (one input channel per group, ``m = O // C`` outputs per channel) as one
    multiply-add per kernel tap over the part of the output that tap sees: no padding, no
    matmul. Works channels-last (input ``(N, H, W, C)``), so NumPy's inner loops run over the
    channels rather than over a short, strided output row; returns NCHW."""
    n, _, _, c = x_nhwc.shape
    m = w.shape[0] // c
    wt = w.reshape(c, m, *w.shape[2:]).transpose(2, 3, 1, 0)  # (kh, kw, m, C)
    out = np.zeros((n, *out_hw, m, c), x_nhwc.dtype)
    for i, j, (oy, ox), (iy, ix) in taps:
        out[:, oy, ox] += x_nhwc[:, iy, ix, None, :] * wt[i, j]
    # (N, Ho, Wo, m, C) -> (N, C, m, Ho, Wo): output channel c*m + q
    return np.ascontiguousarray(out.transpose(0, 4, 3, 1, 2)).reshape(n, c * m, *out_hw)


def _depthwise_backward(
    grad: Any, x_shape: tuple, x_nhwc: Any, w: Any, taps: list, need_x: bool, need_w: bool
) -> tuple:
    """Gradients of :func:`_depthwise_forward` (channels-last, taps in a fixed order:
    deterministic); ``x_nhwc`` is needed only for the weight gradient. Returns the input
    gradient in NCHW and the weight gradient (O, 1, kh, kw)."""
    n, c, h, wd = x_shape
    m = w.shape[0] // c
    kh, kw = w.shape[2:]
    wt = w.reshape(c, m, kh, kw).transpose(2, 3, 1, 0)  # (kh, kw, m, C)
    gt = grad.reshape(n, c, m, *grad.shape[2:]).transpose(0, 3, 4, 2, 1)  # (N, Ho, Wo, m, C)
    gt = np.ascontiguousarray(gt)
    gx = np.zeros((n, h, wd, c), grad.dtype) if need_x else None
    gw = np.zeros((kh, kw, m, c), grad.dtype) if need_w else None
    for i, j, (oy, ox), (iy, ix) in taps:
        go = gt[:, oy, ox]
        if need_x:
            if m == 1:
                gx[:, iy, ix] += go[:, :, :, 0] * wt[i, j, 0]
            else:
                gx[:, iy, ix] += np.einsum("nhwqc,qc->nhwc", go, wt[i, j])
        if need_w:
            gw[i, j] = np.einsum("nhwqc,nhwc->qc", go, x_nhwc[:, iy, ix])
    if need_x:
        gx = gx.transpose(0, 3, 1, 2)
    if need_w:
        gw = np.ascontiguousarray(gw.transpose(3, 2, 0, 1)).reshape(c * m, 1, kh, kw)
    return gx, gw


class _ScratchPool(threading.local):
    def __init__(self) -> None:
        self.buffers: dict[str, np.ndarray] = {}


_SCRATCH = _ScratchPool()
_SCRATCH_LIMIT = 1 << 26  # 64 MB: larger temporaries are allocated afresh, never kept


def _scratch(slot: str, shape: tuple, dtype: Any) -> np.ndarray:
    """An uninitialised array for a temporary that never leaves the function, from a per-thread
    buffer kept for the next call. Allocating conv2d's multi-megabyte temporaries afresh each
    time costs page faults (about a quarter of the forward+backward time at the benchmark size);
    reusing them does not. ``slot`` names buffers that are alive at the same time."""
    dtype = np.dtype(dtype)
    nbytes = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    if nbytes > _SCRATCH_LIMIT:
        return np.empty(shape, dtype)
    buf = _SCRATCH.buffers.get(slot)
    if buf is None or buf.nbytes < nbytes:
        buf = np.empty(builtins.max(nbytes, 64), np.uint8)
        _SCRATCH.buffers[slot] = buf
    return buf[:nbytes].view(dtype).reshape(shape)


def _im2col(
    x: Any,
    kernel: tuple,
    stride: tuple,
    pad: tuple,
    dilation: tuple,
    out_hw: tuple,
    transient: bool = False,
) -> tuple:
    """Column buffer ``(N, C, kh*kw, Hout*row)`` of the (padded) input, and ``row``: the number of
    columns per output row (``Wout``, or the padded width ``Wp`` on the stride-1 path, where
    each tap is one contiguous slice of the flattened padded image). ``transient``: the columns
    are used and dropped by the caller (they may live in the scratch pool)."""
    n, c, h, wd = x.shape
    kh, kw = kernel
    ho, wo = out_hw
    top, bottom, left, right = pad
    hp, wp = h + top + bottom, wd + left + right
    if kh == kw == 1 and pad == (0, 0, 0, 0):
        cols = np.ascontiguousarray(x[:, :, :: stride[0], :: stride[1]])
        return cols.reshape(n, c, 1, ho * wo), wo
    if stride == (1, 1):
        length = ho * wp
        flat = _scratch("flat", (n, c, _flat_size(hp, wp, kh, kw, dilation, length)), x.dtype)
        flat.fill(0)
        flat[:, :, : hp * wp].reshape(n, c, hp, wp)[:, :, top : top + h, left : left + wd] = x
        shape = (n, c, kh, kw, length)
        cols = _scratch("cols", shape, x.dtype) if transient else np.empty(shape, x.dtype)
        for chunk in _image_chunks(n, c * length * x.itemsize):
            for i in range(kh):  # a few images at a time: the source stays in cache
                for j in range(kw):
                    off = i * dilation[0] * wp + j * dilation[1]
                    cols[chunk, :, i, j] = flat[chunk, :, off : off + length]
        return cols.reshape(n, c, kh * kw, length), wp
    xp = _zero_pad(x, pad)
    cols = np.empty((n, c, kh, kw, ho, wo), x.dtype)
    for i in range(kh):
        for j in range(kw):
            cols[:, :, i, j] = xp[
                (slice(None), slice(None)) + _conv_window(i, j, dilation, stride, out_hw)
            ]
    return cols.reshape(n, c, kh * kw, ho * wo), wo


def _cols_times_weight(cols: Any, w: Any, b: Any, groups: int, out_hw: tuple, row: int) -> Any:
    """The convolution output (N, O, Hout, Wout) from the column buffer: per image and group the
    tall-skinny product (L, K) @ (K, O/g), which BLAS runs faster than (O/g, K) @ (K, L); the
    transpose back to NCHW is the pass that also drops extra columns and adds the bias."""
    n = cols.shape[0]
    o, cg, kh, kw = w.shape
    og, k = o // groups, cg * kh * kw
    ho, wo = out_hw
    cols = cols.reshape(n, groups, k, ho * row)
    prod = _scratch("product", (n, groups, ho * row, og), cols.dtype)
    np.matmul(cols.transpose(0, 1, 3, 2), w.reshape(groups, og, k).transpose(0, 2, 1), out=prod)
    out = prod.transpose(0, 1, 3, 2).reshape(n, groups, og, ho, row)[..., :wo]
    # a fresh array either way (the product lives in the scratch pool)
    out = np.array(out, order="C") if b is None else out + b.reshape(groups, og, 1, 1)
    return out.reshape(n, o, ho, wo)


class Conv2d(Function):
    """2-D cross-correlation (torch's conv2d), NCHW; ``pad`` is (top, bottom, left, right).

    General groups: im2col (one copy per kernel tap (i, j) into a column buffer), then one BLAS
    matmul per image and group. With stride 1 the columns are taken over the *padded* width
    (``L = Hout * Wp``): each tap is then one contiguous slice of the flattened padded image,
    which copies several times faster than a strided window; the ``Wp - Wout`` extra columns
    per row are computed and dropped. Backward: the weight gradient is one matmul with the saved
    columns; the input gradient is, for stride 1, the correlation of the output gradient with
    the flipped, transposed kernel (the same im2col + matmul, no scatter), and otherwise the
    transposed matmul followed by col2im, which adds the columns back tap by tap in a fixed
    order. Everything is deterministic.

    Depthwise groups (one input channel per group, as in DAT's offset network) skip the matmul
    and the padding: each tap is a broadcast multiply-add over the part of the output it sees
    (:func:`_depthwise_forward`), far faster than many one-row matmuls.
    """

    @staticmethod
    def forward(
        ctx: Context,
        x: Any,
        w: Any,
        b: Any,
        stride: tuple,
        pad: tuple,
        dilation: tuple,
        groups: int,
        out_hw: tuple,
    ) -> Any:
        o, cg, kh, kw = w.shape
        ctx.meta = (x.shape, stride, pad, dilation, groups, out_hw)
        if cg == 1 and groups > 1:  # depthwise: out channel co reads input channel co // m
            taps = _depthwise_taps(x.shape, (kh, kw), stride, pad, dilation, out_hw)
            x_nhwc = np.ascontiguousarray(x.transpose(0, 2, 3, 1))
            ctx.taps = taps
            ctx.save_for_backward(x_nhwc if ctx.needs_input_grad[1] else None, w)
            out = _depthwise_forward(x_nhwc, w, taps, out_hw)
            if b is not None:
                out += b.reshape(o, 1, 1)
            return out
        cols, row = _im2col(x, (kh, kw), stride, pad, dilation, out_hw)
        ctx.row = row
        ctx.save_for_backward(cols if ctx.needs_input_grad[1] else None, w)
        return _cols_times_weight(cols, w, b, groups, out_hw, row)

    @staticmethod
    def backward(ctx: Context, grad: Any) -> tuple:
        saved, w = ctx.saved_tensors
        (n, c, h, wd), stride, pad, dilation, groups, out_hw = ctx.meta
        o, cg, kh, kw = w.shape
        ho, wo = out_hw
        og, k = o // groups, cg * kh * kw
        top, bottom, left, right = pad
        need_x, need_w, need_b = ctx.needs_input_grad[:3]
        gx = gw = gb = None
        if need_b:
            gb = grad.sum(axis=(0, 2, 3))
        if cg == 1 and groups > 1:
            gx, gw = _depthwise_backward(grad, (n, c, h, wd), saved, w, ctx.taps, need_x, need_w)
            return gx, gw, gb, None, None, None, None, None
        row = ctx.row
        length = ho * row
        go = None
        if need_w or (need_x and stride != (1, 1)):
            if row != wo:  # zero gradient for the dropped columns
                go = _scratch("grad", (n, o, ho, row), grad.dtype)
                go[..., :wo] = grad
                go[..., wo:] = 0
            else:
                go = grad
            go = go.reshape(n, groups, og, length)
        if need_w:
            # (N, g, K, L) @ (N, g, L, O/g), summed over the batch: faster in BLAS than the
            # transposed product (N, g, O/g, L) @ (N, g, L, K)
            gw_t = np.matmul(saved.reshape(n, groups, k, length), go.transpose(0, 1, 3, 2))
            gw = np.ascontiguousarray(gw_t.sum(axis=0).transpose(0, 2, 1)).reshape(o, cg, kh, kw)
        if not need_x:
            return gx, gw, gb, None, None, None, None, None
        if stride == (1, 1):
            # gx[y, x] = sum_ij w[i, j] . grad[y + top - i*dh, x + left - j*dw]: a correlation
            # of grad, padded by (kh-1)*dh - top etc. (negative amounts crop), with the kernel
            # flipped and its in/out channels swapped within each group.
            reach = ((kh - 1) * dilation[0], (kw - 1) * dilation[1])
            amounts = (reach[0] - top, reach[0] - bottom, reach[1] - left, reach[1] - right)
            crop = tuple(builtins.max(-a, 0) for a in amounts)
            g_in = grad[:, :, crop[0] : ho - crop[1], crop[2] : wo - crop[3]]
            g_pad = tuple(builtins.max(a, 0) for a in amounts)
            w_t = w.reshape(groups, og, cg, kh, kw).transpose(0, 2, 1, 3, 4)[..., ::-1, ::-1]
            w_t = np.ascontiguousarray(w_t).reshape(c, og, kh, kw)
            cols_g, row_g = _im2col(g_in, (kh, kw), (1, 1), g_pad, dilation, (h, wd), True)
            gx = _cols_times_weight(cols_g, w_t, None, groups, (h, wd), row_g)
            return gx, gw, gb, None, None, None, None, None
        # strided: transposed product, then col2im one strided add per tap in a fixed order
        wt = np.ascontiguousarray(w.reshape(groups, og, k).transpose(0, 2, 1))
        gcols = np.matmul(wt, go).reshape(n, c, kh, kw, ho, wo)
        if kh == kw == 1 and pad == (0, 0, 0, 0):
            gx = np.zeros((n, c, h, wd), grad.dtype)
            gx[:, :, :: stride[0], :: stride[1]] = gcols[:, :, 0, 0]
            return gx, gw, gb, None, None, None, None, None
        gxp = np.zeros((n, c, h + top + bottom, wd + left + right), grad.dtype)
        for i in range(kh):
            for j in range(kw):
                window = _conv_window(i, j, dilation, stride, out_hw)
                gxp[(slice(None), slice(None)) + window] += gcols[:, :, i, j]
        gx = gxp[:, :, top : top + h, left : left + wd]
        return gx, gw, gb, None, None, None, None, None


def _image_chunks(n: int, bytes_per_image: int, budget: int = 1 << 18) -> list[slice]:
    """Batch slices of about ``budget`` bytes (at least one image each)."""
    step = builtins.max(1, budget // builtins.max(1, bytes_per_image))
    return [slice(i, i + step) for i in range(0, n, step)]


def _flat_size(hp: int, wp: int, kh: int, kw: int, dilation: tuple, length: int) -> int:
    """Length of the flattened padded image plus the slack that the last tap's slice of
    ``length`` elements reads past the end (the dropped columns of the last row)."""
    last = (kh - 1) * dilation[0] * wp + (kw - 1) * dilation[1]
    return builtins.max(hp * wp, last + length)


def _conv_padding(
    padding: Any, ksize: tuple[int, int], dilation: tuple[int, int], stride: tuple[int, int]
) -> tuple[int, int, int, int]:
    """(top, bottom, left, right) from an int, a pair, or torch's "valid" / "same"."""
    if isinstance(padding, str):
        if padding == "valid":
            return (0, 0, 0, 0)
        if padding == "same":
            if stride != (1, 1):
                raise ValueError("conv2d: padding='same' is not supported for strided convolutions")
            # torch puts the odd pixel of an even kernel's padding at the bottom / right
            th, tw = dilation[0] * (ksize[0] - 1), dilation[1] * (ksize[1] - 1)
            return (th // 2, th - th // 2, tw // 2, tw - tw // 2)
        raise ValueError(
            f"conv2d: padding must be an int, a pair, 'valid' or 'same', got {padding!r}"
        )
    ph, pw = _int_pair("conv2d", "padding", padding, 0)
    return (ph, ph, pw, pw)


def conv2d(
    input: Any,
    weight: Any,
    bias: Any = None,
    stride: Any = 1,
    padding: Any = 0,
    dilation: Any = 1,
    groups: int = 1,
) -> Tensor:
    """2-D convolution (cross-correlation) with torch.nn.functional.conv2d's semantics.

    ``input`` (N, C, H, W) or unbatched (C, H, W); ``weight`` (O, C/groups, kh, kw); ``bias``
    (O,) or None; ``stride``, ``padding``, ``dilation`` an int or (h, w); ``padding`` may also be
    ``"valid"`` or ``"same"`` (stride 1; an odd total goes to the bottom/right, as torch). Output
    (N, O, Hout, Wout), ``Hout = (H + 2*ph - dh*(kh-1) - 1) // sh + 1``. float32 or float64, one
    dtype for all arrays. Gradients for input, weight and bias (explicit backward, see
    :class:`Conv2d`).
    """
    op = "conv2d"
    x = _host_float(op, "input", input)
    w = _host_float(op, "weight", weight)
    b = None if bias is None else _host_float(op, "bias", bias)
    _one_dtype(op, input=x, weight=w, bias=b)
    if x.ndim not in (3, 4):
        raise ValueError(
            f"{op}: input must be 4-d (N, C, H, W) or 3-d (C, H, W), got shape {x.shape}"
        )
    if w.ndim != 4:
        raise ValueError(
            f"{op}: weight must be 4-d (out_channels, in_channels/groups, kh, kw), got shape {w.shape}"
        )
    if isinstance(groups, bool) or not isinstance(groups, (int, np.integer)) or groups < 1:
        raise ValueError(f"{op}: groups must be a positive int, got {groups!r}")
    groups = int(groups)
    o, cg, kh, kw = w.shape
    c = x.shape[-3]
    if c != cg * groups:
        raise ValueError(
            f"{op}: input has {c} channels, expected weight.shape[1]*groups = {cg}*{groups} = "
            f"{cg * groups}"
        )
    if o % groups:
        raise ValueError(f"{op}: out_channels {o} is not divisible by groups {groups}")
    if kh < 1 or kw < 1:
        raise ValueError(f"{op}: weight has an empty kernel, shape {w.shape}")
    if b is not None and b.shape != (o,):
        raise ValueError(f"{op}: bias must have shape (out_channels,) = ({o},), got {b.shape}")
    st = _int_pair(op, "stride", stride, 1)
    dil = _int_pair(op, "dilation", dilation, 1)
    pad = _conv_padding(padding, (kh, kw), dil, st)
    h, wd = x.shape[-2:]
    ho = (h + pad[0] + pad[1] - dil[0] * (kh - 1) - 1) // st[0] + 1
    wo = (wd + pad[2] + pad[3] - dil[1] * (kw - 1) - 1) // st[1] + 1
    if ho < 1 or wo < 1:
        raise ValueError(
            f"{op}: output size is too small: input {h}x{wd} with padding {pad}, dilated kernel "
            f"{dil[0] * (kh - 1) + 1}x{dil[1] * (kw - 1) + 1} and stride {st} gives {ho}x{wo}"
        )
    xt = _t(input)
    unbatched = x.ndim == 3
    if unbatched:
        xt = unsqueeze(xt, 0)
    out = Conv2d.apply(
        xt, _t(weight), None if bias is None else _t(bias), st, pad, dil, groups, (ho, wo)
    )
    return squeeze(out, 0) if unbatched else out


# ---------------------------------------------------------------------------- linear


class Linear(Function):
    @staticmethod
    def forward(ctx: Context, x: Any, w: Any, b: Any) -> Any:
        ctx.save_for_backward(x, w)
        out = np.matmul(x, w.T)
        if b is not None:
            out += b
        return out

    @staticmethod
    def backward(ctx: Context, grad: Any) -> tuple:
        x, w = ctx.saved_tensors
        need_x, need_w, need_b = ctx.needs_input_grad
        rows = int(np.prod(grad.shape[:-1], dtype=np.int64))
        g2 = grad.reshape(rows, w.shape[0])
        gx = np.matmul(grad, w) if need_x else None
        gw = g2.T @ x.reshape(rows, w.shape[1]) if need_w else None
        gb = g2.sum(axis=0) if need_b else None
        return gx, gw, gb


def linear(input: Any, weight: Any, bias: Any = None) -> Tensor:
    """``input @ weight.T + bias`` (torch.nn.functional.linear): input (*, in), weight
    (out, in), bias (out,) or None; output (*, out)."""
    op = "linear"
    x = _host_float(op, "input", input)
    w = _host_float(op, "weight", weight)
    b = None if bias is None else _host_float(op, "bias", bias)
    _one_dtype(op, input=x, weight=w, bias=b)
    if w.ndim != 2:
        raise ValueError(
            f"{op}: weight must be 2-d (out_features, in_features), got shape {w.shape}"
        )
    if x.ndim < 1 or x.shape[-1] != w.shape[1]:
        raise ValueError(
            f"{op}: input's last dimension must be in_features = {w.shape[1]}, got shape {x.shape}"
        )
    if b is not None and b.shape != (w.shape[0],):
        raise ValueError(
            f"{op}: bias must have shape (out_features,) = ({w.shape[0]},), got {b.shape}"
        )
    return Linear.apply(_t(input), _t(weight), None if bias is None else _t(bias))


# ---------------------------------------------------------------------------- layer_norm


class LayerNorm(Function):
    @staticmethod
    def forward(ctx: Context, x: Any, w: Any, b: Any, axes: tuple, eps: float) -> Any:
        mu = x.mean(axis=axes, keepdims=True)
        xc = x - mu
        var_ = (xc * xc).mean(axis=axes, keepdims=True)
        rstd = (1.0 / np.sqrt(var_ + eps)).astype(x.dtype, copy=False)
        xhat = xc * rstd
        ctx.axes = axes
        ctx.save_for_backward(xhat, rstd, w)
        out = xhat if w is None else xhat * w
        if b is not None:
            out = out + b
        return out

    @staticmethod
    def backward(ctx: Context, grad: Any) -> tuple:
        xhat, rstd, w = ctx.saved_tensors
        axes = ctx.axes
        lead = tuple(range(grad.ndim - len(axes)))
        need_x, need_w, need_b = ctx.needs_input_grad[:3]
        gx = gw = gb = None
        if need_x:
            gxhat = grad if w is None else grad * w
            gx = rstd * (
                gxhat
                - gxhat.mean(axis=axes, keepdims=True)
                - xhat * (gxhat * xhat).mean(axis=axes, keepdims=True)
            )
        if need_w:
            gw = (grad * xhat).sum(axis=lead)
        if need_b:
            gb = grad.sum(axis=lead)
        return gx, gw, gb, None, None


def layer_norm(
    input: Any,
    normalized_shape: Any,
    weight: Any = None,
    bias: Any = None,
    eps: float = 1e-5,
) -> Tensor:
    """Normalize over the trailing ``normalized_shape`` dims (biased variance, as torch), then
    scale by ``weight`` and shift by ``bias`` (each of shape ``normalized_shape`` or None)."""
    op = "layer_norm"
    x = _host_float(op, "input", input)
    ns = (
        (int(normalized_shape),)
        if isinstance(normalized_shape, (int, np.integer))
        else tuple(int(s) for s in normalized_shape)
    )
    if not ns or x.shape[x.ndim - len(ns) :] != ns or len(ns) > x.ndim:
        raise ValueError(
            f"{op}: input's trailing dimensions must equal normalized_shape {ns}, got shape {x.shape}"
        )
    w = None if weight is None else _host_float(op, "weight", weight)
    b = None if bias is None else _host_float(op, "bias", bias)
    _one_dtype(op, input=x, weight=w, bias=b)
    for name, a in (("weight", w), ("bias", b)):
        if a is not None and a.shape != ns:
            raise ValueError(f"{op}: {name} must have shape normalized_shape {ns}, got {a.shape}")
    if not eps >= 0:
        raise ValueError(f"{op}: eps must be >= 0, got {eps}")
    axes = tuple(range(x.ndim - len(ns), x.ndim))
    return LayerNorm.apply(
        _t(input),
        None if weight is None else _t(weight),
        None if bias is None else _t(bias),
        axes,
        float(eps),
    )


# ---------------------------------------------------------------------------- dropout, pad


def dropout(
    input: Any,
    p: float = 0.5,
    training: bool = True,
    inplace: bool = False,
    generator: np.random.Generator | None = None,
) -> Tensor:
    """Zero each element with probability ``p`` and scale the rest by ``1/(1-p)`` when
    ``training``; the identity otherwise. ``generator`` defaults to the module-level generator
    (see :func:`manual_seed`). ``inplace`` is accepted for torch compatibility and ignored."""
    if not 0.0 <= p <= 1.0:
        raise ValueError(f"dropout: p must be in [0, 1], got {p}")
    x = _t(input)
    if not training or p == 0.0:
        return x
    if x.dtype.kind != "f":
        raise TypeError(f"dropout: input must be float32 or float64, got {x.dtype}")
    if p == 1.0:
        return mul(x, Tensor._wrap(np.zeros(x.shape, x.dtype)))
    rng = _generator if generator is None else generator
    keep = rng.random(x.shape) >= p
    scale = np.asarray(1.0 / (1.0 - p), dtype=x.dtype)
    return mul(x, Tensor._wrap(keep * scale))


class Pad(Function):
    @staticmethod
    def forward(ctx: Context, a: Any, widths: tuple, value: float) -> Any:
        shape = tuple(s + lo + hi for s, (lo, hi) in zip(a.shape, widths))
        out = np.full(shape, value, dtype=a.dtype)
        src, dst = [], []  # the part of the input that survives cropping, and where it lands
        for s, (lo, hi) in zip(a.shape, widths):
            start, stop = builtins.max(-lo, 0), s - builtins.max(-hi, 0)
            n = builtins.max(stop - start, 0)
            src.append(slice(start, start + n))
            dst.append(slice(builtins.max(lo, 0), builtins.max(lo, 0) + n))
        ctx.shape, ctx.src, ctx.dst = a.shape, tuple(src), tuple(dst)
        out[tuple(dst)] = a[tuple(src)]
        return out

    @staticmethod
    def backward(ctx: Context, grad: Any) -> tuple:
        g = np.zeros(ctx.shape, grad.dtype)
        g[ctx.src] = grad[ctx.dst]
        return g, None, None


def pad(input: Any, pad: Sequence[int], mode: str = "constant", value: float = 0.0) -> Tensor:
    """torch.nn.functional.pad, constant mode: ``pad`` lists (before, after) pairs starting from
    the last dimension, ``(left, right, top, bottom, ...)``; negative widths crop."""
    x = _t(input)
    if mode != "constant":
        raise ValueError(f"pad: only mode='constant' is supported, got {mode!r}")
    pad = [int(v) for v in pad]
    if len(pad) % 2 or len(pad) // 2 > x.ndim:
        raise ValueError(
            f"pad: pad must have an even length of at most 2*ndim = {2 * x.ndim}, got {len(pad)}"
        )
    widths = [(0, 0)] * x.ndim
    for k in range(len(pad) // 2):
        widths[x.ndim - 1 - k] = (pad[2 * k], pad[2 * k + 1])
    for d, (s, (lo, hi)) in enumerate(zip(x.shape, widths)):
        if s + lo + hi < 0:
            raise ValueError(f"pad: padding {lo, hi} of dim {d} (size {s}) gives a negative size")
    return Pad.apply(x, tuple(widths), value)


# ---------------------------------------------------------------------------- losses


def mse_loss(input: Any, target: Any, reduction: str = "mean") -> Tensor:
    """Mean (or sum, or elementwise) squared error; ``input`` and ``target`` must have one shape
    (torch broadcasts with a warning; deformnp refuses, which catches (N,1)-vs-(N,) bugs)."""
    x, t = _pair_operands(input, target)
    if x.shape != t.shape:
        raise ValueError(f"mse_loss: input has shape {x.shape} but target has shape {t.shape}")
    d = x - t
    return _reduce("mse_loss", d * d, reduction)


def l1_loss(input: Any, target: Any, reduction: str = "mean") -> Tensor:
    """Mean (or sum, or elementwise) absolute error; shapes must match (see :func:`mse_loss`)."""
    x, t = _pair_operands(input, target)
    if x.shape != t.shape:
        raise ValueError(f"l1_loss: input has shape {x.shape} but target has shape {t.shape}")
    return _reduce("l1_loss", abs(x - t), reduction)


def nll_loss(
    input: Any,
    target: Any,
    weight: Any = None,
    ignore_index: int = -100,
    reduction: str = "mean",
) -> Tensor:
    """Negative log-likelihood of class indices, given log-probabilities ``input`` of shape
    (N, C), (N, C, d1, ...) or (C,); see :func:`cross_entropy` for the rest."""
    return _class_loss("nll_loss", _t(input), target, weight, ignore_index, reduction, 0.0)


def cross_entropy(
    input: Any,
    target: Any,
    weight: Any = None,
    ignore_index: int = -100,
    reduction: str = "mean",
    label_smoothing: float = 0.0,
) -> Tensor:
    """torch.nn.functional.cross_entropy over logits ``input`` (N, C), (N, C, d1, ...) or (C,).

    ``target`` holds class indices (int32/int64, the input's shape without the class dim) or
    class probabilities (float, the input's shape). ``weight`` (C,) rescales classes;
    ``ignore_index`` marks targets that contribute nothing; with ``reduction="mean"`` index
    targets are averaged over the summed weights of the non-ignored targets, probability targets
    over the number of samples (as torch). ``label_smoothing`` mixes the target with the uniform
    distribution.
    """
    x = _t(input)
    if x.ndim < 1:
        raise ValueError("cross_entropy: input must have a class dimension, got a 0-d tensor")
    logp = log_softmax(x, 1 if x.ndim > 1 else 0)
    return _class_loss(
        "cross_entropy", logp, target, weight, ignore_index, reduction, label_smoothing
    )


def _class_loss(
    op: str,
    logp: Tensor,
    target: Any,
    weight: Any,
    ignore_index: int,
    reduction: str,
    eps: float,
) -> Tensor:
    if logp.dtype.kind != "f":
        raise TypeError(f"{op}: input must be float32 or float64, got {logp.dtype}")
    if reduction not in ("mean", "sum", "none"):
        raise ValueError(f"{op}: reduction must be 'mean', 'sum' or 'none', got {reduction!r}")
    if not 0.0 <= eps <= 1.0:
        raise ValueError(f"{op}: label_smoothing must be in [0, 1], got {eps}")
    cdim = 1 if logp.ndim > 1 else 0
    n_cls = logp.shape[cdim]
    bshape = [1] * logp.ndim
    bshape[cdim] = n_cls
    w = None
    if weight is not None:
        w = _host_float(op, "weight", weight)
        if w.shape != (n_cls,):
            raise ValueError(f"{op}: weight must have shape (C,) = ({n_cls},), got {w.shape}")
        _one_dtype(op, input=logp.data, weight=w)
    t_raw = target.data if isinstance(target, Tensor) else np.asarray(target)
    if t_raw.dtype.kind == "f":  # class probabilities
        if t_raw.shape != logp.shape:
            raise ValueError(
                f"{op}: probability target must have the input's shape {logp.shape}, got {t_raw.shape}"
            )
        _one_dtype(op, input=logp.data, target=t_raw)
        t = target if isinstance(target, Tensor) else Tensor._wrap(t_raw)
        if eps:
            t = t * (1.0 - eps) + eps / n_cls
        if w is not None:
            t = t * Tensor._wrap(w.reshape(bshape))
        loss = neg(sum(logp * t, cdim))
        if reduction == "mean":  # over the number of samples, as torch
            n_samples = np.asarray(logp.size // n_cls if n_cls else 0, dtype=logp.dtype)
            with np.errstate(invalid="ignore", divide="ignore"):
                return sum(loss) / Tensor._wrap(n_samples)
        return sum(loss) if reduction == "sum" else loss
    if t_raw.dtype.kind not in "iu":
        raise TypeError(
            f"{op}: target must hold class indices (int) or probabilities (float), got {t_raw.dtype}"
        )
    expect = logp.shape[:cdim] + logp.shape[cdim + 1 :]
    if t_raw.shape != expect:
        raise ValueError(
            f"{op}: target must have shape {expect} (the input's shape without the class dim), "
            f"got {t_raw.shape}"
        )
    valid = t_raw != ignore_index
    bad = valid & ((t_raw < 0) | (t_raw >= n_cls))
    if np.any(bad):
        v = int(t_raw[bad].reshape(-1)[0])
        raise ValueError(
            f"{op}: target value {v} is out of range [0, {n_cls}) (ignore_index {ignore_index})"
        )
    tc = np.where(valid, t_raw, 0).astype(np.int64)
    # loss per sample = -sum_c A[c] * logp[c] with a constant coefficient array A (one-hot times
    # the class weight, plus the smoothing mass), so one multiply-and-sum carries the gradient.
    coef = np.zeros(logp.shape, logp.dtype)
    np.put_along_axis(coef, np.expand_dims(tc, cdim), 1.0, axis=cdim)
    wc = np.ones(n_cls, logp.dtype) if w is None else w
    wt = wc[tc] * valid  # weight of each sample's target class, 0 where ignored
    coef *= np.expand_dims(wt, cdim)
    if eps:
        coef = (1.0 - eps) * coef + (eps / n_cls) * wc.reshape(bshape) * np.expand_dims(valid, cdim)
    loss = neg(sum(logp * Tensor._wrap(coef.astype(logp.dtype, copy=False)), cdim))
    if reduction == "mean":
        with np.errstate(invalid="ignore", divide="ignore"):
            return sum(loss) / Tensor._wrap(np.asarray(wt.sum(), dtype=logp.dtype))
    return sum(loss) if reduction == "sum" else loss


# ---------------------------------------------------------------------------- more activations


def leaky_relu(input: Any, negative_slope: float = 0.01, inplace: bool = False) -> Tensor:
    x = _t(input)
    return where(x.data > 0, x, x * negative_slope)


def silu(input: Any, inplace: bool = False) -> Tensor:
    x = _t(input)
    return x * sigmoid(x)


def softplus(input: Any, beta: float = 1.0, threshold: float = 20.0) -> Tensor:
    """``log(1 + exp(beta*x)) / beta``, linear where ``beta*x > threshold`` (torch)."""
    x = _t(input)
    bx = x * beta
    # log(1 + e^z) = max(z, 0) + log(1 + e^-|z|), stable for every z
    soft = (relu(bx) + log(exp(neg(abs(bx))) + 1.0)) / beta
    return where(bx.data > threshold, x, soft)


# ---------------------------------------------------------------------------- devices


class ToDevice(Function):
    """Move between host and device; the gradient moves back."""

    supports_cuda = True

    @staticmethod
    def forward(ctx: Context, a: Any, device: str) -> Any:
        from . import cuda

        ctx.src = "cuda" if cuda.is_cuda_array(a) else "cpu"
        return cuda.move(a, device)

    @staticmethod
    def backward(ctx: Context, grad: Any) -> tuple:
        from . import cuda

        return cuda.move(grad, ctx.src), None


def to_device(input: Tensor, device: str) -> Tensor:
    return ToDevice.apply(input, device)


# The few generic ops that run on CUDA tensors, enough to form a loss from a deformable op's
# output: add, sub, mul, div (same-shape operands or a scalar), neg, and full sum / mean.


def _cuda_binary(op: str, a: Tensor, b: Tensor) -> Tensor:
    if a.device == "cuda" and b.device == "cuda":
        if a.shape != b.shape or a.dtype != b.dtype:
            raise ValueError(
                f"{op}: CUDA operands must have the same shape and dtype (no broadcasting on "
                f"CUDA), got {a.shape} {a.dtype} and {b.shape} {b.dtype}; move to the CPU "
                f"with .to('cpu') for broadcasting"
            )
        return CudaBinary.apply(a, b, op)
    dev, host, host_left = (a, b, False) if a.device == "cuda" else (b, a, True)
    if host.size != 1 or host.requires_grad:
        raise ValueError(
            f"{op}: a CUDA tensor can be combined with another CUDA tensor of its shape or a "
            f"constant scalar, got a host operand of shape {host.shape}; move it with .to('cuda')"
        )
    scalar = float(host.numpy().reshape(()))
    if host_left:  # scalar op tensor
        if op in ("add", "mul"):
            return CudaBinary.apply(dev, scalar, op)
        return CudaBinary.apply(dev, scalar, "r" + op)
    return CudaBinary.apply(dev, scalar, op)


def _cuda_full_reduction(op: str, x: Tensor, dim: Any, keepdim: bool) -> tuple:
    if dim is not None and _norm_dims(dim, x.ndim, op) != tuple(range(x.ndim)):
        raise ValueError(
            f"{op}: on CUDA tensors only the full reduction (dim=None) is supported, got "
            f"dim={dim}; move to the CPU with .to('cpu') to reduce over some dimensions"
        )
    return (1,) * x.ndim if keepdim else ()


class CudaBinary(Function):
    """a op b on the device; b is a device array of a's shape or a Python float.

    ops: add, sub, mul, div, and rsub / rdiv (``b - a``, ``b / a`` for a scalar b).
    """

    supports_cuda = True

    @staticmethod
    def forward(ctx: Context, a: Any, b: Any, op: str) -> Any:
        from .kernels.cuda.elementwise import binary

        ctx.op = op
        ctx.save_for_backward(a, b)
        return binary(op, a, b)

    @staticmethod
    def backward(ctx: Context, grad: Any) -> tuple:
        from .kernels.cuda.elementwise import binary

        a, b = ctx.saved_tensors
        op = ctx.op
        scalar = not hasattr(b, "shape")
        if op == "add":
            return grad, (None if scalar else grad), None
        if op == "sub":
            return grad, (None if scalar else binary("mul", grad, -1.0)), None
        if op == "rsub":
            return binary("mul", grad, -1.0), None, None
        if op == "mul":
            ga = binary("mul", grad, b)
            return ga, (None if scalar else binary("mul", grad, a)), None
        if op == "div":
            ga = binary("div", grad, b)
            if scalar:
                return ga, None, None
            gb = binary("mul", binary("div", binary("mul", ga, a), b), -1.0)  # -g*a/b^2
            return ga, gb, None
        # rdiv: b / a with a scalar b -> d/da = -b / a^2
        return binary("mul", binary("div", binary("div", grad, a), a), -b), None, None


class CudaReduce(Function):
    """Sum or mean of every element of a device array; the result keeps ``out_shape``."""

    supports_cuda = True

    @staticmethod
    def forward(ctx: Context, a: Any, op: str, out_shape: tuple) -> Any:
        from .kernels.cuda.elementwise import scale, sum_all

        ctx.shape, ctx.dtype = tuple(a.shape), a.dtype
        ctx.scale = 1.0 / builtins.max(a.size, 1) if op == "mean" else 1.0
        total = sum_all(a)
        if op == "mean":
            total = scale(total, ctx.scale) if a.size else scale(total, np.nan)
        return total.reshape(out_shape) if out_shape else total

    @staticmethod
    def backward(ctx: Context, grad: Any) -> tuple:
        from .kernels.cuda.elementwise import broadcast_scalar

        return broadcast_scalar(grad.reshape((1,)), ctx.shape, ctx.scale), None, None


# ---------------------------------------------------------------------------- Tensor methods


def _attach() -> None:
    T = Tensor
    T.__add__ = lambda s, o: add(s, o)
    T.__radd__ = lambda s, o: add(o, s)
    T.__sub__ = lambda s, o: sub(s, o)
    T.__rsub__ = lambda s, o: sub(o, s)
    T.__mul__ = lambda s, o: mul(s, o)
    T.__rmul__ = lambda s, o: mul(o, s)
    T.__truediv__ = lambda s, o: div(s, o)
    T.__rtruediv__ = lambda s, o: div(o, s)
    T.__pow__ = lambda s, o: pow(s, o)
    T.__rpow__ = lambda s, o: pow(o, s)
    T.__matmul__ = lambda s, o: matmul(s, o)
    T.__rmatmul__ = lambda s, o: matmul(o, s)
    T.__neg__ = lambda s: neg(s)
    T.__pos__ = lambda s: s
    T.__abs__ = lambda s: abs(s)
    T.__getitem__ = lambda s, i: getitem(s, i)

    def _cmp(op: Any) -> Any:
        def f(s: Tensor, o: Any) -> Tensor:
            o = o.data if isinstance(o, Tensor) else o
            return Tensor._wrap(op(s.data, o))

        return f

    T.__lt__ = _cmp(np.less)
    T.__le__ = _cmp(np.less_equal)
    T.__gt__ = _cmp(np.greater)
    T.__ge__ = _cmp(np.greater_equal)
    T.__eq__ = _cmp(np.equal)
    T.__ne__ = _cmp(np.not_equal)

    T.add, T.sub, T.mul, T.div, T.pow, T.matmul = add, sub, mul, div, pow, matmul
    T.exp, T.log, T.sqrt, T.abs, T.neg = exp, log, sqrt, abs, neg
    T.tanh, T.sigmoid, T.relu, T.clamp = tanh, sigmoid, relu, clamp
    T.sum, T.mean, T.max, T.min, T.var, T.std = sum, mean, max, min, var, std
    T.argmax, T.argmin, T.maximum, T.minimum = argmax, argmin, maximum, minimum
    T.reshape = reshape
    T.view = reshape
    T.permute, T.transpose, T.flatten = permute, transpose, flatten
    T.unsqueeze, T.squeeze, T.expand = unsqueeze, squeeze, expand
    T.softmax, T.log_softmax, T.masked_fill = softmax, log_softmax, masked_fill
    T.split, T.chunk = split, chunk
    T.repeat, T.flip, T.clone, T.sin, T.cos = repeat, flip, clone, sin, cos
    T.contiguous = lambda s: s  # NumPy handles any layout; kept so ported code runs

    def astype(self: Tensor, dtype: Any) -> Tensor:
        dtype = np.dtype(dtype)
        if dtype == self.dtype:
            return self
        return Cast.apply(self, dtype)

    T.astype = astype


class Cast(Function):
    @staticmethod
    def forward(ctx: Context, a: Any, dtype: np.dtype) -> Any:
        ctx.dtype = a.dtype
        return a.astype(dtype)

    @staticmethod
    def backward(ctx: Context, grad: Any) -> tuple:
        return grad.astype(ctx.dtype), None


_attach()


# ---------------------------------------------------------------------------- registry (CLI)


def _conv2d_check_cases() -> list:
    """Tiny float64 gradchecks for ``python -m deformnp check``: a grouped, strided, dilated,
    padded convolution with a non-square kernel, and a depthwise one with channel multiplier 2."""
    from .registry import CheckCase

    rng = np.random.default_rng(0)

    def leaf(*shape: int) -> Tensor:
        return Tensor(rng.standard_normal(shape), requires_grad=True)

    def grouped(x: Tensor, w: Tensor, b: Tensor) -> Tensor:
        return conv2d(x, w, b, stride=(2, 1), padding=(1, 0), dilation=(1, 2), groups=2)

    def depthwise(x: Tensor, w: Tensor, b: Tensor) -> Tensor:
        return conv2d(x, w, b, stride=2, padding=2, groups=3)

    names = ("input", "weight", "bias")
    return [
        CheckCase(grouped, (leaf(2, 4, 5, 6), leaf(6, 2, 3, 2), leaf(6)), names),
        CheckCase(depthwise, (leaf(1, 3, 6, 5), leaf(6, 1, 5, 5), leaf(6)), names),
    ]


def _conv2d_bench_case(device: str) -> Any:
    """SPEC-style size: input (4, 64, 32, 32), weight (64, 64, 3, 3), padding 1, float32."""
    if device != "cpu":
        return None
    from .registry import BenchCase

    rng = np.random.default_rng(0)
    x_np = rng.standard_normal((4, 64, 32, 32)).astype(np.float32)
    w_np = (rng.standard_normal((64, 64, 3, 3)) * 0.05).astype(np.float32)
    b_np = rng.standard_normal(64).astype(np.float32)
    g_np = rng.standard_normal((4, 64, 32, 32)).astype(np.float32)
    x, w, b = (Tensor(a, requires_grad=True) for a in (x_np, w_np, b_np))

    def forward() -> Any:
        from .function import no_grad

        with no_grad():
            return conv2d(x, w, b, padding=1)

    def forward_backward() -> Any:
        for t in (x, w, b):
            t.grad = None
        conv2d(x, w, b, padding=1).backward(g_np)

    case = BenchCase(
        "input (4, 64, 32, 32), weight (64, 64, 3, 3), padding 1", forward, forward_backward
    )
    try:
        import numba
        import torch
    except ImportError:
        return case
    torch.set_num_threads(numba.get_num_threads())
    tx, tw, tb = (torch.from_numpy(a.copy()).requires_grad_() for a in (x_np, w_np, b_np))
    tg = torch.from_numpy(g_np)

    def torch_forward() -> Any:
        with torch.no_grad():
            return torch.nn.functional.conv2d(tx, tw, tb, padding=1)

    def torch_forward_backward() -> Any:
        for t in (tx, tw, tb):
            t.grad = None
        torch.nn.functional.conv2d(tx, tw, tb, padding=1).backward(tg)

    case.torch_forward = torch_forward
    case.torch_forward_backward = torch_forward_backward
    return case


def _register() -> None:
    from .registry import register_op

    register_op("conv2d", check=_conv2d_check_cases, bench=_conv2d_bench_case)


_register()
