"""Generic differentiable operations, with ``torch.nn.functional``'s names and signatures.

Each op is a :class:`~deformnp.function.Function` whose forward and backward sit side by side.
Gradients returned in a broadcast shape are summed back by the engine (``sum_to_shape``).
Every function here accepts Tensors, NumPy arrays or Python scalars and returns a Tensor.
"""

from __future__ import annotations

import builtins
import math
from collections.abc import Sequence
from typing import Any

import numpy as np
from scipy import special as _special

from .function import Context, Function
from .tensor import Tensor

# ---------------------------------------------------------------------------- helpers


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
        out = _special.expit(a).astype(a.dtype, copy=False)
        ctx.save_for_backward(out)
        return out

    @staticmethod
    def backward(ctx: Context, grad: Any) -> Any:
        out = ctx.saved_tensors[0]
        return grad * out * (1 - out)


class ReLU(Function):
    @staticmethod
    def forward(ctx: Context, a: Any) -> Any:
        mask = a > 0
        ctx.save_for_backward(mask)
        return np.where(mask, a, 0).astype(a.dtype, copy=False)

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
    @staticmethod
    def forward(ctx: Context, a: Any, b: Any) -> Any:
        pick_a = a >= b
        ctx.save_for_backward(pick_a)
        return np.where(pick_a, a, b)

    @staticmethod
    def backward(ctx: Context, grad: Any) -> tuple:
        (pick_a,) = ctx.saved_tensors
        return grad * pick_a, grad * ~pick_a


def add(input: Any, other: Any) -> Tensor:
    return Add.apply(*_pair_operands(input, other))


def sub(input: Any, other: Any) -> Tensor:
    return Sub.apply(*_pair_operands(input, other))


def mul(input: Any, other: Any) -> Tensor:
    return Mul.apply(*_pair_operands(input, other))


def div(input: Any, other: Any) -> Tensor:
    return Div.apply(*_pair_operands(input, other))


def pow(input: Any, exponent: Any) -> Tensor:  # noqa: A001 - torch's name
    return Pow.apply(*_pair_operands(input, exponent))


def neg(input: Any) -> Tensor:
    return Neg.apply(_t(input))


def exp(input: Any) -> Tensor:
    return Exp.apply(_t(input))


def log(input: Any) -> Tensor:
    return Log.apply(_t(input))


def sqrt(input: Any) -> Tensor:
    return Sqrt.apply(_t(input))


def abs(input: Any) -> Tensor:  # noqa: A001 - torch's name
    return Abs.apply(_t(input))


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
    return Maximum.apply(*_pair_operands(input, other))


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
    return Sum.apply(x, _norm_dims(dim, x.ndim, "sum"), keepdim)


def mean(input: Any, dim: Any = None, keepdim: bool = False) -> Tensor:
    x = _t(input)
    return Mean.apply(x, _norm_dims(dim, x.ndim, "mean"), keepdim)


def max(input: Any, dim: Any = None, keepdim: bool = False) -> Tensor:  # noqa: A001
    """Maximum over ``dim`` (all elements when None). Returns values only."""
    x = _t(input)
    if x.size == 0:
        raise ValueError("max: expected a non-empty tensor")
    return MaxMin.apply(x, _norm_dims(dim, x.ndim, "max"), keepdim, 1)


def min(input: Any, dim: Any = None, keepdim: bool = False) -> Tensor:  # noqa: A001
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


class GetItem(Function):
    @staticmethod
    def forward(ctx: Context, a: Any, index: Any) -> Any:
        ctx.shape, ctx.dtype, ctx.index = a.shape, a.dtype, index
        return np.asarray(a[index])

    @staticmethod
    def backward(ctx: Context, grad: Any) -> tuple:
        out = np.zeros(ctx.shape, dtype=grad.dtype)
        np.add.at(out, ctx.index, grad)  # handles repeated integer-array indices
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


def einsum(equation: str, *operands: Any) -> Tensor:
    """Differentiable ``np.einsum`` for explicit equations without repeated output indices."""
    ops = [_t(o) for o in operands]
    return Einsum.apply(equation, *ops)


class Einsum(Function):
    @staticmethod
    def forward(ctx: Context, equation: str, *arrays: Any) -> Any:
        if "->" not in equation:
            raise ValueError("einsum: only explicit equations ('ij,jk->ik') are supported")
        ins, out = equation.replace(" ", "").split("->")
        ctx.ins, ctx.out = ins.split(","), out
        ctx.save_for_backward(*arrays)
        return np.einsum(equation, *arrays, optimize=True)

    @staticmethod
    def backward(ctx: Context, grad: Any) -> tuple:
        arrays = ctx.saved_tensors
        grads: list[Any] = [None]
        for i, sub_i in enumerate(ctx.ins):
            if not ctx.needs_input_grad[i + 1]:
                grads.append(None)
                continue
            others = [s for j, s in enumerate(ctx.ins) if j != i]
            eq = ",".join([ctx.out, *others]) + "->" + sub_i
            g = np.einsum(eq, grad, *[a for j, a in enumerate(arrays) if j != i], optimize=True)
            grads.append(np.broadcast_to(g, arrays[i].shape))
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
        return (0.5 * a * (1.0 + _special.erf(a / math.sqrt(2.0)))).astype(a.dtype, copy=False)

    @staticmethod
    def backward(ctx: Context, grad: Any) -> tuple:
        (a,) = ctx.saved_tensors
        if ctx.approximate == "tanh":
            k = math.sqrt(2.0 / math.pi)
            t = np.tanh(k * (a + 0.044715 * a**3))
            d = 0.5 * (1 + t) + 0.5 * a * (1 - t * t) * k * (1 + 3 * 0.044715 * a * a)
        else:
            cdf = 0.5 * (1.0 + _special.erf(a / math.sqrt(2.0)))
            pdf = np.exp(-0.5 * a * a) / math.sqrt(2.0 * math.pi)
            d = cdf + a * pdf
        return (grad * d).astype(grad.dtype, copy=False), None


def gelu(input: Any, approximate: str = "none") -> Tensor:
    """GELU; the exact erf form by default, ``approximate="tanh"`` for the tanh approximation."""
    if approximate not in ("none", "tanh"):
        raise ValueError(f"gelu: approximate must be 'none' or 'tanh', got {approximate!r}")
    return GELU.apply(_t(input), approximate)


# ---------------------------------------------------------------------------- devices


class ToDevice(Function):
    @staticmethod
    def forward(ctx: Context, a: Any, device: str) -> Any:
        from . import cuda

        ctx.src = (
            "cuda"
            if hasattr(a, "__cuda_array_interface__") and not isinstance(a, np.ndarray)
            else "cpu"
        )
        return cuda.move(a, device)

    @staticmethod
    def backward(ctx: Context, grad: Any) -> tuple:
        from . import cuda

        return cuda.move(grad, ctx.src), None


def to_device(input: Tensor, device: str) -> Tensor:
    return ToDevice.apply(input, device)


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
    T.sum, T.mean, T.max, T.min, T.var = sum, mean, max, min, var
    T.reshape = reshape
    T.view = reshape
    T.permute, T.transpose, T.flatten = permute, transpose, flatten
    T.unsqueeze, T.squeeze, T.expand = unsqueeze, squeeze, expand
    T.softmax, T.log_softmax, T.masked_fill = softmax, log_softmax, masked_fill
    T.split, T.chunk = split, chunk

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
