"""Generic differentiable operations, with ``torch.nn.functional``'s names and signatures.

Each op is a :class:`~deformnp.function.Function` whose forward and backward sit side by side.
Gradients returned in a broadcast shape are summed back by the engine (``sum_to_shape``).
Every function here accepts Tensors, NumPy arrays or Python scalars and returns a Tensor.

Contents: elementwise math and activations (``relu``, ``gelu``, ``silu``, ``softplus``, ...),
reductions, shape ops and indexing, ``matmul``/``einsum``, ``softmax``/``log_softmax``, and the
layer ops ``conv2d``, ``linear``, ``layer_norm``, ``dropout``, ``pad`` and the losses
``mse_loss``, ``l1_loss``, ``nll_loss``, ``cross_entropy``. The layer ops validate their inputs
(float32/float64, one dtype, shapes) with messages that name the op and the argument; the
elementwise ops follow NumPy's type promotion. ``deformnp.manual_seed`` seeds dropout.
NumPy only, except the loss-forming ops (add, sub, mul, div, neg, full sum and mean), which
also run on CUDA tensors (``kernels/cuda/autograd.py``); every other op refuses a CUDA array with
a TypeError naming it. Autograd Function classes are named ``<Op>Function``. The bottom of this
file attaches the operators and the op methods (``x.sum()``, ``x.to("cuda")``, ...) to Tensor.
"""

from __future__ import annotations

import builtins
import math
from collections.abc import Sequence
from typing import Any

import numpy as np

from . import random as _random
from .function import Context, Function
from .kernels.cpu import conv2d as conv2d_kernels
from .tensor import Tensor, unwrap
from .typing import IntPair, TensorLike
from .validation import host_float_array, integers, pair, same_dtype

Dims = int | Sequence[int] | None  # one dimension, several, or all (None)

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
    return tuple(sorted(_norm_dim(d, ndim, op) for d in integers(op, "dim", dim)))


def _cuda() -> Any:
    """The CUDA forms of the loss-forming ops (imported on first use: numba-cuda is optional)."""
    from .kernels.cuda import autograd

    return autograd


# ---------------------------------------------------------------------------- elementwise


class AddFunction(Function):
    @staticmethod
    def forward(ctx: Context, a: Any, b: Any) -> Any:
        return a + b

    @staticmethod
    def backward(ctx: Context, grad: Any) -> tuple:
        return grad, grad


class SubFunction(Function):
    @staticmethod
    def forward(ctx: Context, a: Any, b: Any) -> Any:
        return a - b

    @staticmethod
    def backward(ctx: Context, grad: Any) -> tuple:
        return grad, -grad


class MulFunction(Function):
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


class DivFunction(Function):
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


class PowFunction(Function):
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


class NegFunction(Function):
    @staticmethod
    def forward(ctx: Context, a: Any) -> Any:
        return -a

    @staticmethod
    def backward(ctx: Context, grad: Any) -> Any:
        return -grad


class ExpFunction(Function):
    @staticmethod
    def forward(ctx: Context, a: Any) -> Any:
        out = np.exp(a)
        ctx.save_for_backward(out)
        return out

    @staticmethod
    def backward(ctx: Context, grad: Any) -> Any:
        return grad * ctx.saved_tensors[0]


class LogFunction(Function):
    @staticmethod
    def forward(ctx: Context, a: Any) -> Any:
        ctx.save_for_backward(a)
        return np.log(a)

    @staticmethod
    def backward(ctx: Context, grad: Any) -> Any:
        return grad / ctx.saved_tensors[0]


class SqrtFunction(Function):
    @staticmethod
    def forward(ctx: Context, a: Any) -> Any:
        out = np.sqrt(a)
        ctx.save_for_backward(out)
        return out

    @staticmethod
    def backward(ctx: Context, grad: Any) -> Any:
        return grad / (2 * ctx.saved_tensors[0])


class AbsFunction(Function):
    @staticmethod
    def forward(ctx: Context, a: Any) -> Any:
        ctx.save_for_backward(a)
        return np.abs(a)

    @staticmethod
    def backward(ctx: Context, grad: Any) -> Any:
        return grad * np.sign(ctx.saved_tensors[0])


class SinFunction(Function):
    @staticmethod
    def forward(ctx: Context, a: Any) -> Any:
        ctx.save_for_backward(a)
        return np.sin(a)

    @staticmethod
    def backward(ctx: Context, grad: Any) -> Any:
        return grad * np.cos(ctx.saved_tensors[0])


class CosFunction(Function):
    @staticmethod
    def forward(ctx: Context, a: Any) -> Any:
        ctx.save_for_backward(a)
        return np.cos(a)

    @staticmethod
    def backward(ctx: Context, grad: Any) -> Any:
        return -grad * np.sin(ctx.saved_tensors[0])


class TanhFunction(Function):
    @staticmethod
    def forward(ctx: Context, a: Any) -> Any:
        out = np.tanh(a)
        ctx.save_for_backward(out)
        return out

    @staticmethod
    def backward(ctx: Context, grad: Any) -> Any:
        out = ctx.saved_tensors[0]
        return grad * (1 - out * out)


class SigmoidFunction(Function):
    @staticmethod
    def forward(ctx: Context, a: Any) -> Any:
        out = _scipy_special().expit(a).astype(a.dtype, copy=False)
        ctx.save_for_backward(out)
        return out

    @staticmethod
    def backward(ctx: Context, grad: Any) -> Any:
        out = ctx.saved_tensors[0]
        return grad * out * (1 - out)


class ReLUFunction(Function):
    @staticmethod
    def forward(ctx: Context, a: Any) -> Any:
        ctx.save_for_backward(a > 0)
        return np.maximum(a, 0).astype(a.dtype, copy=False)  # NaN stays NaN, as in torch

    @staticmethod
    def backward(ctx: Context, grad: Any) -> Any:
        return grad * ctx.saved_tensors[0]


class ClampFunction(Function):
    @staticmethod
    def forward(ctx: Context, a: Any, lo: float | None, hi: float | None) -> Any:
        lo_ = -np.inf if lo is None else lo
        hi_ = np.inf if hi is None else hi
        ctx.save_for_backward((a >= lo_) & (a <= hi_))
        return np.clip(a, lo_, hi_).astype(a.dtype, copy=False)

    @staticmethod
    def backward(ctx: Context, grad: Any) -> tuple:
        return grad * ctx.saved_tensors[0], None, None


class WhereFunction(Function):
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


class MaximumFunction(Function):
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


def add(input: TensorLike, other: TensorLike) -> Tensor:
    """Elementwise ``input + other``, broadcast (torch.add).

    Runs on CPU and CUDA tensors. A Python scalar takes the dtype of the other operand (as in
    torch); arrays follow NumPy's type promotion.

    Parameters
    ----------
    input : Tensor, ndarray or scalar
        The first operand.
    other : Tensor, ndarray or scalar
        The second operand, broadcastable with ``input``.

    Returns
    -------
    Tensor
        The broadcast shape of ``input`` and ``other``. Differentiable in both; a gradient of a
        broadcast operand is summed back to its shape.
    """
    a, b = _pair_operands(input, other)
    if a.device == "cuda" or b.device == "cuda":
        return _cuda().binary("add", a, b)
    return AddFunction.apply(a, b)


def sub(input: TensorLike, other: TensorLike) -> Tensor:
    """Elementwise ``input - other``, broadcast (torch.sub).

    Runs on CPU and CUDA tensors. A Python scalar takes the dtype of the other operand (as in
    torch); arrays follow NumPy's type promotion.

    Parameters
    ----------
    input : Tensor, ndarray or scalar
        The first operand.
    other : Tensor, ndarray or scalar
        The second operand, broadcastable with ``input``.

    Returns
    -------
    Tensor
        The broadcast shape of ``input`` and ``other``. Differentiable in both; a gradient of a
        broadcast operand is summed back to its shape.
    """
    a, b = _pair_operands(input, other)
    if a.device == "cuda" or b.device == "cuda":
        return _cuda().binary("sub", a, b)
    return SubFunction.apply(a, b)


def mul(input: TensorLike, other: TensorLike) -> Tensor:
    """Elementwise ``input * other``, broadcast (torch.mul).

    Runs on CPU and CUDA tensors. A Python scalar takes the dtype of the other operand (as in
    torch); arrays follow NumPy's type promotion.

    Parameters
    ----------
    input : Tensor, ndarray or scalar
        The first operand.
    other : Tensor, ndarray or scalar
        The second operand, broadcastable with ``input``.

    Returns
    -------
    Tensor
        The broadcast shape of ``input`` and ``other``. Differentiable in both; a gradient of a
        broadcast operand is summed back to its shape.
    """
    a, b = _pair_operands(input, other)
    if a.device == "cuda" or b.device == "cuda":
        return _cuda().binary("mul", a, b)
    return MulFunction.apply(a, b)


def div(input: TensorLike, other: TensorLike) -> Tensor:
    """Elementwise ``input / other``, broadcast (torch.div).

    Runs on CPU and CUDA tensors. A Python scalar takes the dtype of the other operand (as in
    torch); arrays follow NumPy's type promotion. True division.

    Parameters
    ----------
    input : Tensor, ndarray or scalar
        The first operand.
    other : Tensor, ndarray or scalar
        The second operand, broadcastable with ``input``.

    Returns
    -------
    Tensor
        The broadcast shape of ``input`` and ``other``. Differentiable in both; a gradient of a
        broadcast operand is summed back to its shape.
    """
    a, b = _pair_operands(input, other)
    if a.device == "cuda" or b.device == "cuda":
        return _cuda().binary("div", a, b)
    return DivFunction.apply(a, b)


def pow(input: TensorLike, exponent: TensorLike) -> Tensor:  # noqa: A001 - torch's name
    """Elementwise ``input ** exponent``, broadcast (torch.pow).

    Parameters
    ----------
    input : Tensor, ndarray or scalar
        The base.
    exponent : Tensor, ndarray or scalar
        The exponent, broadcastable with ``input``.

    Returns
    -------
    Tensor
        The broadcast shape. Differentiable in both: ``d/d input = exponent *
        input**(exponent - 1)``, ``d/d exponent = out * log(input)`` where ``input > 0`` and 0
        elsewhere.
    """
    return PowFunction.apply(*_pair_operands(input, exponent))


def neg(input: TensorLike) -> Tensor:
    """Elementwise ``-input`` (torch.neg); runs on CPU and CUDA tensors.

    Parameters
    ----------
    input : Tensor, ndarray or scalar
        Any shape.

    Returns
    -------
    Tensor
        ``input``'s shape, differentiable.
    """
    x = _t(input)
    if x.device == "cuda":
        return _cuda().negative(x)
    return NegFunction.apply(x)


def exp(input: TensorLike) -> Tensor:
    """Elementwise exponential (torch.exp).

    Parameters
    ----------
    input : Tensor, ndarray or scalar
        Any shape.

    Returns
    -------
    Tensor
        ``input``'s shape. Gradient ``grad * out``.
    """
    return ExpFunction.apply(_t(input))


def log(input: TensorLike) -> Tensor:
    """Elementwise natural logarithm (torch.log).

    Parameters
    ----------
    input : Tensor, ndarray or scalar
        Any shape.

    Returns
    -------
    Tensor
        ``input``'s shape. Gradient ``grad / input``.
    """
    return LogFunction.apply(_t(input))


def sqrt(input: TensorLike) -> Tensor:
    """Elementwise square root (torch.sqrt).

    Parameters
    ----------
    input : Tensor, ndarray or scalar
        Any shape.

    Returns
    -------
    Tensor
        ``input``'s shape. Gradient ``grad / (2 * out)``.
    """
    return SqrtFunction.apply(_t(input))


def abs(input: TensorLike) -> Tensor:  # noqa: A001 - torch's name
    """Elementwise absolute value (torch.abs).

    Parameters
    ----------
    input : Tensor, ndarray or scalar
        Any shape.

    Returns
    -------
    Tensor
        ``input``'s shape. Gradient ``grad * sign(input)`` (0 at 0).
    """
    return AbsFunction.apply(_t(input))


def sin(input: TensorLike) -> Tensor:
    """Elementwise sine (torch.sin).

    Parameters
    ----------
    input : Tensor, ndarray or scalar
        Any shape.

    Returns
    -------
    Tensor
        ``input``'s shape. Gradient ``grad * cos(input)``.
    """
    return SinFunction.apply(_t(input))


def cos(input: TensorLike) -> Tensor:
    """Elementwise cosine (torch.cos).

    Parameters
    ----------
    input : Tensor, ndarray or scalar
        Any shape.

    Returns
    -------
    Tensor
        ``input``'s shape. Gradient ``-grad * sin(input)``.
    """
    return CosFunction.apply(_t(input))


def tanh(input: TensorLike) -> Tensor:
    """Elementwise hyperbolic tangent (torch.tanh).

    Parameters
    ----------
    input : Tensor, ndarray or scalar
        Any shape.

    Returns
    -------
    Tensor
        ``input``'s shape. Gradient ``grad * (1 - out**2)``.
    """
    return TanhFunction.apply(_t(input))


def sigmoid(input: TensorLike) -> Tensor:
    """Elementwise logistic sigmoid ``1 / (1 + exp(-input))`` (torch.sigmoid).

    Parameters
    ----------
    input : Tensor, ndarray or scalar
        Any shape.

    Returns
    -------
    Tensor
        ``input``'s shape. Gradient ``grad * out * (1 - out)``.
    """
    return SigmoidFunction.apply(_t(input))


def relu(input: TensorLike, inplace: bool = False) -> Tensor:
    """Elementwise ``max(input, 0)`` (torch.nn.functional.relu); NaN stays NaN.

    Parameters
    ----------
    input : Tensor, ndarray or scalar
        Any shape.
    inplace : bool, default False
        Accepted for torch compatibility and ignored (the result is always a new Tensor).

    Returns
    -------
    Tensor
        ``input``'s shape. The gradient passes where ``input > 0`` (0 at 0, as torch).
    """
    return ReLUFunction.apply(_t(input))


def clamp(input: TensorLike, min: float | None = None, max: float | None = None) -> Tensor:  # noqa: A002
    """Clip ``input`` to ``[min, max]`` elementwise (torch.clamp).

    Parameters
    ----------
    input : Tensor, ndarray or scalar
        Any shape.
    min : float or None, default None
        The lower bound; None: no lower bound.
    max : float or None, default None
        The upper bound; None: no upper bound.

    Returns
    -------
    Tensor
        ``input``'s shape and dtype. The gradient passes where ``min <= input <= max`` (bounds
        included), 0 elsewhere.
    """
    return ClampFunction.apply(_t(input), min, max)


def where(condition: TensorLike, input: TensorLike, other: TensorLike) -> Tensor:
    """Elements of ``input`` where ``condition`` holds, else of ``other`` (torch.where).

    Parameters
    ----------
    condition : Tensor or array_like of bool
        Broadcastable with ``input`` and ``other``; not differentiated.
    input : Tensor, ndarray or scalar
        Taken where ``condition`` is True.
    other : Tensor, ndarray or scalar
        Taken where ``condition`` is False.

    Returns
    -------
    Tensor
        The broadcast shape. Differentiable in ``input`` and ``other``: each gets the gradient
        where it was taken, 0 elsewhere.
    """
    a, b = _pair_operands(input, other)
    cond = condition.data if isinstance(condition, Tensor) else np.asarray(condition)
    return WhereFunction.apply(cond, a, b)


def masked_fill(input: TensorLike, mask: TensorLike, value: float) -> Tensor:
    """``input`` with ``value`` written where ``mask`` is True (torch's ``Tensor.masked_fill``).

    Parameters
    ----------
    input : Tensor, ndarray or scalar
        Any shape.
    mask : Tensor or array_like of bool
        Broadcastable to ``input``'s shape.
    value : float
        The fill value, cast to ``input``'s dtype.

    Returns
    -------
    Tensor
        ``input``'s shape. The gradient reaches ``input`` where ``mask`` is False.
    """
    x = _t(input)
    return where(mask, Tensor._wrap(np.asarray(value, dtype=x.dtype)), x)


def maximum(input: TensorLike, other: TensorLike) -> Tensor:
    """Elementwise maximum of two operands, broadcast (torch.maximum).

    Parameters
    ----------
    input : Tensor, ndarray or scalar
        The first operand.
    other : Tensor, ndarray or scalar
        The second operand, broadcastable with ``input``.

    Returns
    -------
    Tensor
        The broadcast shape. The gradient goes to the larger operand; ties split it evenly, as
        torch.
    """
    return MaximumFunction.apply(*_pair_operands(input, other), 1)


def minimum(input: TensorLike, other: TensorLike) -> Tensor:
    """Elementwise minimum of two operands, broadcast (torch.minimum).

    Parameters
    ----------
    input : Tensor, ndarray or scalar
        The first operand.
    other : Tensor, ndarray or scalar
        The second operand, broadcastable with ``input``.

    Returns
    -------
    Tensor
        The broadcast shape. The gradient goes to the smaller operand; ties split it evenly, as
        torch.
    """
    return MaximumFunction.apply(*_pair_operands(input, other), -1)


# ---------------------------------------------------------------------------- reductions


class SumFunction(Function):
    @staticmethod
    def forward(ctx: Context, a: Any, dims: tuple | None, keepdim: bool) -> Any:
        ctx.shape, ctx.dims, ctx.keepdim = a.shape, dims, keepdim
        return np.asarray(a.sum(axis=dims, keepdims=keepdim))

    @staticmethod
    def backward(ctx: Context, grad: Any) -> tuple:
        if ctx.dims is not None and not ctx.keepdim:
            grad = np.expand_dims(grad, ctx.dims)
        return np.broadcast_to(grad, ctx.shape), None, None


class MeanFunction(Function):
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


class MaxMinFunction(Function):
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


def sum(input: TensorLike, dim: Dims = None, keepdim: bool = False) -> Tensor:  # noqa: A001
    """Sum over ``dim`` (torch.sum); runs on CPU and CUDA tensors.

    Parameters
    ----------
    input : Tensor, ndarray or scalar
        Any shape.
    dim : int, sequence of int or None, default None
        The dimension(s) to reduce; negative values count from the end. None reduces all.
    keepdim : bool, default False
        Keep the reduced dimensions with size 1.

    Returns
    -------
    Tensor
        ``input``'s shape without the reduced dimensions (kept with size 1 if ``keepdim``); a
        0-d Tensor when ``dim`` is None and not ``keepdim``. Differentiable.

    Raises
    ------
    IndexError
        If a dimension is out of range.
    """
    x = _t(input)
    if x.device == "cuda":
        return _cuda().reduce("sum", x, _norm_dims(dim, x.ndim, "sum"), keepdim)
    return SumFunction.apply(x, _norm_dims(dim, x.ndim, "sum"), keepdim)


def mean(input: TensorLike, dim: Dims = None, keepdim: bool = False) -> Tensor:
    """Mean over ``dim`` (torch.mean); runs on CPU and CUDA tensors.

    Parameters
    ----------
    input : Tensor, ndarray or scalar
        Any shape; the mean of no elements is NaN.
    dim : int, sequence of int or None, default None
        The dimension(s) to reduce; negative values count from the end. None reduces all.
    keepdim : bool, default False
        Keep the reduced dimensions with size 1.

    Returns
    -------
    Tensor
        As :func:`sum`, divided by the number of reduced elements. Differentiable.

    Raises
    ------
    IndexError
        If a dimension is out of range.
    """
    x = _t(input)
    if x.device == "cuda":
        return _cuda().reduce("mean", x, _norm_dims(dim, x.ndim, "mean"), keepdim)
    return MeanFunction.apply(x, _norm_dims(dim, x.ndim, "mean"), keepdim)


def max(input: TensorLike, dim: Dims = None, keepdim: bool = False) -> Tensor:  # noqa: A001
    """Maximum over ``dim``, values only (torch.max).

    ``max(a, b)`` with an array ``b`` is :func:`maximum`, as in torch. Use :func:`argmax` for
    the indices.

    Parameters
    ----------
    input : Tensor, ndarray or scalar
        Any shape, not empty.
    dim : int, sequence of int, None, Tensor or ndarray, default None
        The dimension(s) to reduce (None: all). A Tensor or ndarray makes this the elementwise
        ``maximum(input, dim)``, as in torch.
    keepdim : bool, default False
        Keep the reduced dimensions with size 1.

    Returns
    -------
    Tensor
        The maxima. The gradient is split evenly among the elements equal to the maximum.

    Raises
    ------
    ValueError
        If ``input`` is empty.
    IndexError
        If a dimension is out of range.

    See Also
    --------
    argmax, maximum
    """
    if isinstance(dim, (Tensor, np.ndarray)):
        return maximum(input, dim)
    x = _t(input)
    if x.size == 0:
        raise ValueError("max: expected a non-empty tensor")
    return MaxMinFunction.apply(x, _norm_dims(dim, x.ndim, "max"), keepdim, 1)


def min(input: TensorLike, dim: Dims = None, keepdim: bool = False) -> Tensor:  # noqa: A001
    """Minimum over ``dim``, values only (torch.min).

    ``min(a, b)`` with an array ``b`` is :func:`minimum`. Use :func:`argmin` for the indices.

    Parameters
    ----------
    input : Tensor, ndarray or scalar
        Any shape, not empty.
    dim : int, sequence of int, None, Tensor or ndarray, default None
        The dimension(s) to reduce (None: all). A Tensor or ndarray makes this the elementwise
        ``minimum(input, dim)``.
    keepdim : bool, default False
        Keep the reduced dimensions with size 1.

    Returns
    -------
    Tensor
        The minima. The gradient is split evenly among the elements equal to the minimum.

    Raises
    ------
    ValueError
        If ``input`` is empty.
    IndexError
        If a dimension is out of range.

    See Also
    --------
    argmin, minimum
    """
    if isinstance(dim, (Tensor, np.ndarray)):
        return minimum(input, dim)
    x = _t(input)
    if x.size == 0:
        raise ValueError("min: expected a non-empty tensor")
    return MaxMinFunction.apply(x, _norm_dims(dim, x.ndim, "min"), keepdim, -1)


def var(
    input: TensorLike, dim: Dims = None, keepdim: bool = False, unbiased: bool = True
) -> Tensor:
    """Variance over ``dim`` (torch.var), unbiased by default.

    Parameters
    ----------
    input : Tensor, ndarray or scalar
        Any shape.
    dim : int, sequence of int or None, default None
        The dimension(s) to reduce; negative values count from the end. None reduces all.
    keepdim : bool, default False
        Keep the reduced dimensions with size 1.
    unbiased : bool, default True
        Divide by ``n - 1`` (Bessel's correction) if True, by ``n`` if False, where ``n`` is the
        number of reduced elements.

    Returns
    -------
    Tensor
        ``sum((input - mean)**2) / (n - 1 or n)`` over ``dim``. Differentiable.
    """
    x = _t(input)
    dims = _norm_dims(dim, x.ndim, "var")
    n = x.size if dims is None else int(np.prod([x.shape[d] for d in dims]))
    centred = x - mean(x, dims, keepdim=True)
    return sum(centred * centred, dims, keepdim=keepdim) / (n - 1 if unbiased else n)


def std(
    input: TensorLike, dim: Dims = None, keepdim: bool = False, unbiased: bool = True
) -> Tensor:
    """Standard deviation over ``dim`` (torch.std): ``sqrt(var(...))``.

    Parameters
    ----------
    input : Tensor, ndarray or scalar
        Any shape.
    dim : int, sequence of int or None, default None
        The dimension(s) to reduce; negative values count from the end. None reduces all.
    keepdim : bool, default False
        Keep the reduced dimensions with size 1.
    unbiased : bool, default True
        Divide by ``n - 1`` if True, by ``n`` if False (see :func:`var`).

    Returns
    -------
    Tensor
        The standard deviation over ``dim``, differentiable.
    """
    return sqrt(var(input, dim, keepdim=keepdim, unbiased=unbiased))


def argmax(input: TensorLike, dim: int | None = None, keepdim: bool = False) -> Tensor:
    """Index of the first maximum along ``dim`` (torch.argmax); not differentiable.

    Parameters
    ----------
    input : Tensor, ndarray or scalar
        Any shape.
    dim : int or None, default None
        The dimension to search; None: the flat index over all elements.
    keepdim : bool, default False
        Keep ``dim`` with size 1 (ignored when ``dim`` is None).

    Returns
    -------
    Tensor
        int64 indices.
    """
    a = _t(input).data
    if dim is None:
        return Tensor._wrap(np.asarray(np.argmax(a), dtype=np.int64))
    d = _norm_dim(dim, a.ndim, "argmax")
    return Tensor._wrap(np.argmax(a, axis=d, keepdims=keepdim).astype(np.int64))


def argmin(input: TensorLike, dim: int | None = None, keepdim: bool = False) -> Tensor:
    """Index of the first minimum along ``dim`` (torch.argmin); not differentiable.

    Parameters
    ----------
    input : Tensor, ndarray or scalar
        Any shape.
    dim : int or None, default None
        The dimension to search; None: the flat index over all elements.
    keepdim : bool, default False
        Keep ``dim`` with size 1 (ignored when ``dim`` is None).

    Returns
    -------
    Tensor
        int64 indices.
    """
    a = _t(input).data
    if dim is None:
        return Tensor._wrap(np.asarray(np.argmin(a), dtype=np.int64))
    d = _norm_dim(dim, a.ndim, "argmin")
    return Tensor._wrap(np.argmin(a, axis=d, keepdims=keepdim).astype(np.int64))


# ---------------------------------------------------------------------------- shapes


class ReshapeFunction(Function):
    @staticmethod
    def forward(ctx: Context, a: Any, shape: tuple) -> Any:
        ctx.shape = a.shape
        return a.reshape(shape)

    @staticmethod
    def backward(ctx: Context, grad: Any) -> tuple:
        return grad.reshape(ctx.shape), None


class PermuteFunction(Function):
    @staticmethod
    def forward(ctx: Context, a: Any, axes: tuple) -> Any:
        ctx.axes = axes
        return a.transpose(axes)

    @staticmethod
    def backward(ctx: Context, grad: Any) -> tuple:
        return grad.transpose(np.argsort(ctx.axes)), None


class ExpandFunction(Function):
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


class GetItemFunction(Function):
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


class CatFunction(Function):
    @staticmethod
    def forward(ctx: Context, *arrays_and_dim: Any) -> Any:
        *arrays, dim = arrays_and_dim
        ctx.dim = dim
        ctx.bounds = np.cumsum([a.shape[dim] for a in arrays])[:-1]
        return np.concatenate(arrays, axis=dim)

    @staticmethod
    def backward(ctx: Context, grad: Any) -> tuple:
        return (*np.split(grad, ctx.bounds, axis=ctx.dim), None)


class StackFunction(Function):
    @staticmethod
    def forward(ctx: Context, *arrays_and_dim: Any) -> Any:
        *arrays, dim = arrays_and_dim
        ctx.dim = dim
        return np.stack(arrays, axis=dim)

    @staticmethod
    def backward(ctx: Context, grad: Any) -> tuple:
        return (*np.moveaxis(grad, ctx.dim, 0), None)


def _shape_arg(op: str, shape: Sequence) -> tuple[int, ...]:
    """``f(x, 2, 3)`` and ``f(x, (2, 3))`` alike: the ints of a shape (floats are refused)."""
    if len(shape) == 1 and isinstance(shape[0], (tuple, list)):
        shape = shape[0]
    return integers(op, "shape", shape)


def reshape(input: TensorLike, *shape: int | Sequence[int]) -> Tensor:
    """``input`` with a new shape and the same elements in row-major order (torch.reshape).

    Also ``Tensor.reshape`` and ``Tensor.view``.

    Parameters
    ----------
    input : Tensor, ndarray or scalar
        Any shape.
    *shape : int or sequence of int
        The new shape, as separate ints or one tuple; one entry may be -1 (inferred).

    Returns
    -------
    Tensor
        The reshaped Tensor; the gradient is reshaped back.

    Raises
    ------
    ValueError
        If the shape does not fit ``input``'s number of elements.
    """
    x = _t(input)
    shape = _shape_arg("reshape", shape)
    try:
        np.empty((x.size,), np.int8).reshape(shape)
    except ValueError:
        raise ValueError(
            f"reshape: shape {shape} is invalid for a tensor of {x.size} elements {x.shape}"
        ) from None
    return ReshapeFunction.apply(x, shape)


def permute(input: TensorLike, *dims: int | Sequence[int]) -> Tensor:
    """``input`` with its dimensions reordered (torch.permute).

    Parameters
    ----------
    input : Tensor, ndarray or scalar
        Any shape.
    *dims : int or sequence of int
        A permutation of ``range(input.ndim)`` (negative values allowed), as separate ints or
        one tuple: output dimension ``i`` is input dimension ``dims[i]``.

    Returns
    -------
    Tensor
        The permuted Tensor; the gradient is permuted back.

    Raises
    ------
    ValueError
        If ``dims`` is not a permutation of the dimensions.
    """
    x = _t(input)
    dims = _shape_arg("permute", dims)
    if sorted(d % builtins.max(x.ndim, 1) for d in dims) != list(range(x.ndim)):
        raise ValueError(f"permute: dims {dims} are not a permutation of {x.ndim} dimensions")
    return PermuteFunction.apply(x, tuple(d % x.ndim for d in dims))


def transpose(input: TensorLike, dim0: int, dim1: int) -> Tensor:
    """``input`` with dimensions ``dim0`` and ``dim1`` swapped (torch.transpose).

    Parameters
    ----------
    input : Tensor, ndarray or scalar
        Any shape.
    dim0 : int
        The first dimension.
    dim1 : int
        The second dimension.

    Returns
    -------
    Tensor
        The transposed Tensor.
    """
    x = _t(input)
    axes = list(range(x.ndim))
    d0, d1 = _norm_dim(dim0, x.ndim, "transpose"), _norm_dim(dim1, x.ndim, "transpose")
    axes[d0], axes[d1] = axes[d1], axes[d0]
    return PermuteFunction.apply(x, tuple(axes))


def flatten(input: TensorLike, start_dim: int = 0, end_dim: int = -1) -> Tensor:
    """Merge dimensions ``start_dim`` through ``end_dim`` into one (torch.flatten).

    Parameters
    ----------
    input : Tensor, ndarray or scalar
        Any shape; a 0-d input becomes shape (1,).
    start_dim : int, default 0
        The first dimension to merge.
    end_dim : int, default -1
        The last dimension to merge (included).

    Returns
    -------
    Tensor
        The flattened Tensor.
    """
    x = _t(input)
    if x.ndim == 0:
        return reshape(x, 1)
    s, e = _norm_dim(start_dim, x.ndim, "flatten"), _norm_dim(end_dim, x.ndim, "flatten")
    shape = x.shape[:s] + (int(np.prod(x.shape[s : e + 1])),) + x.shape[e + 1 :]
    return reshape(x, shape)


def unsqueeze(input: TensorLike, dim: int) -> Tensor:
    """``input`` with a size-1 dimension inserted at ``dim`` (torch.unsqueeze).

    Parameters
    ----------
    input : Tensor, ndarray or scalar
        Any shape.
    dim : int
        The new dimension's position, in ``[-input.ndim - 1, input.ndim]``.

    Returns
    -------
    Tensor
        ``input.ndim + 1`` dimensions.
    """
    x = _t(input)
    d = _norm_dim(dim, x.ndim + 1, "unsqueeze")
    return reshape(x, x.shape[:d] + (1,) + x.shape[d:])


def squeeze(input: TensorLike, dim: int | None = None) -> Tensor:
    """``input`` without size-1 dimensions (torch.squeeze).

    Parameters
    ----------
    input : Tensor, ndarray or scalar
        Any shape.
    dim : int or None, default None
        Remove only this dimension, and only if its size is 1 (otherwise ``input`` is returned
        unchanged); None removes every size-1 dimension.

    Returns
    -------
    Tensor
        The squeezed Tensor.
    """
    x = _t(input)
    if dim is None:
        return reshape(x, tuple(s for s in x.shape if s != 1))
    d = _norm_dim(dim, x.ndim, "squeeze")
    if x.shape[d] != 1:
        return x
    return reshape(x, x.shape[:d] + x.shape[d + 1 :])


def expand(input: TensorLike, *shape: int | Sequence[int]) -> Tensor:
    """``input`` broadcast to a larger shape (torch's ``Tensor.expand``).

    Parameters
    ----------
    input : Tensor, ndarray or scalar
        Any shape broadcastable to ``shape``.
    *shape : int or sequence of int
        The new shape, as separate ints or one tuple; -1 keeps the size of that dimension.

    Returns
    -------
    Tensor
        The broadcast Tensor; the gradient is summed back to ``input``'s shape.
    """
    x = _t(input)
    shape = _shape_arg("expand", shape)
    shape = tuple(x.shape[i - len(shape) + x.ndim] if s == -1 else s for i, s in enumerate(shape))
    return ExpandFunction.apply(x, shape)


def getitem(input: TensorLike, index: Any) -> Tensor:
    """``input[index]``, differentiable (``Tensor.__getitem__``).

    Parameters
    ----------
    input : Tensor, ndarray or scalar
        Any shape.
    index : int, slice, None, Ellipsis, array, Tensor or tuple of these
        A NumPy index: basic indexing, boolean masks and integer arrays (Tensors are read as
        their arrays).

    Returns
    -------
    Tensor
        The selected elements. The gradient is scattered back; elements selected several times
        by integer arrays accumulate their gradients.
    """
    if isinstance(index, Tensor):
        index = index.data
    elif isinstance(index, tuple):
        index = tuple(i.data if isinstance(i, Tensor) else i for i in index)
    return GetItemFunction.apply(_t(input), index)


def cat(tensors: Sequence[TensorLike], dim: int = 0) -> Tensor:
    """Concatenate Tensors along an existing dimension (torch.cat; also ``concatenate``).

    Parameters
    ----------
    tensors : sequence of Tensor, ndarray or scalar
        Non-empty; equal shapes except along ``dim``.
    dim : int, default 0
        The dimension to concatenate along.

    Returns
    -------
    Tensor
        The concatenation; each input gets its slice of the gradient.

    Raises
    ------
    ValueError
        If ``tensors`` is empty.
    """
    ts = [_t(x) for x in tensors]
    if not ts:
        raise ValueError("cat: expected a non-empty sequence of tensors")
    return CatFunction.apply(*ts, _norm_dim(dim, ts[0].ndim, "cat"))


concatenate = cat


def stack(tensors: Sequence[TensorLike], dim: int = 0) -> Tensor:
    """Stack Tensors along a new dimension (torch.stack).

    Parameters
    ----------
    tensors : sequence of Tensor, ndarray or scalar
        Non-empty; all of one shape.
    dim : int, default 0
        The position of the new dimension, in ``[-ndim - 1, ndim]``.

    Returns
    -------
    Tensor
        The stacked Tensor, one more dimension than the inputs.

    Raises
    ------
    ValueError
        If ``tensors`` is empty.
    """
    ts = [_t(x) for x in tensors]
    if not ts:
        raise ValueError("stack: expected a non-empty sequence of tensors")
    return StackFunction.apply(*ts, _norm_dim(dim, ts[0].ndim + 1, "stack"))


def split(
    tensor: TensorLike, split_size_or_sections: int | Sequence[int], dim: int = 0
) -> tuple[Tensor, ...]:
    """Split a Tensor into chunks along ``dim`` (torch.split).

    Parameters
    ----------
    tensor : Tensor, ndarray or scalar
        Any shape.
    split_size_or_sections : int or sequence of int
        An int: chunks of that size (the last may be smaller). A sequence: the sizes of the
        chunks, which must add up to ``tensor.shape[dim]``.
    dim : int, default 0
        The dimension to split.

    Returns
    -------
    tuple of Tensor
        The chunks, each differentiable.

    Raises
    ------
    ValueError
        If the split size is not positive or the sections do not add up.
    """
    x = _t(tensor)
    d = _norm_dim(dim, x.ndim, "split")
    n = x.shape[d]
    if isinstance(split_size_or_sections, (int, np.integer)):
        size = int(split_size_or_sections)
        if size <= 0:
            raise ValueError(f"split: split_size must be positive, got {size}")
        sizes = [size] * (n // size) + ([n % size] if n % size else [])
    else:
        sizes = list(integers("split", "split_size_or_sections", split_size_or_sections))
        if builtins.sum(sizes) != n:
            raise ValueError(f"split: sections {sizes} do not add up to dim {d} of size {n}")
    out, start = [], 0
    for s in sizes:
        index = (slice(None),) * d + (slice(start, start + s),)
        out.append(getitem(x, index))
        start += s
    return tuple(out)


def chunk(input: TensorLike, chunks: int, dim: int = 0) -> tuple[Tensor, ...]:
    """Split a Tensor into ``chunks`` pieces along ``dim`` (torch.chunk).

    Parameters
    ----------
    input : Tensor, ndarray or scalar
        Any shape.
    chunks : int
        The number of pieces wanted; each has ``ceil(size / chunks)`` elements along ``dim``
        (the last may be smaller), so fewer pieces may come back, as in torch.
    dim : int, default 0
        The dimension to split.

    Returns
    -------
    tuple of Tensor
        The pieces.
    """
    x = _t(input)
    n = x.shape[_norm_dim(dim, x.ndim, "chunk")]
    return split(x, -(-n // int(chunks)) if n else 1, dim)


class RepeatFunction(Function):
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


def repeat(input: TensorLike, *sizes: int | Sequence[int]) -> Tensor:
    """Tile ``input`` ``sizes[d]`` times along each dimension (torch's ``Tensor.repeat``).

    Parameters
    ----------
    input : Tensor, ndarray or scalar
        Any shape.
    *sizes : int or sequence of int
        The repeat counts (>= 0), as separate ints or one tuple; at least ``input.ndim`` of
        them, extra leading counts add leading dimensions.

    Returns
    -------
    Tensor
        Shape ``sizes[d] * input.shape[d]`` per dimension; the gradient sums over the copies.

    Raises
    ------
    ValueError
        If there are fewer counts than dimensions or a count is negative.
    """
    x = _t(input)
    reps = _shape_arg("repeat", sizes)
    if len(reps) < x.ndim:
        raise ValueError(
            f"repeat: number of repeat sizes ({len(reps)}) can not be smaller than the number of "
            f"dimensions ({x.ndim})"
        )
    if any(r < 0 for r in reps):
        raise ValueError(f"repeat: sizes must be >= 0, got {reps}")
    return RepeatFunction.apply(x, reps)


class FlipFunction(Function):
    @staticmethod
    def forward(ctx: Context, a: Any, dims: tuple) -> Any:
        ctx.dims = dims
        return np.flip(a, dims).copy()

    @staticmethod
    def backward(ctx: Context, grad: Any) -> tuple:
        return np.flip(grad, ctx.dims), None


def flip(input: TensorLike, dims: int | Sequence[int]) -> Tensor:
    """Reverse the order of elements along ``dims`` (torch.flip).

    Parameters
    ----------
    input : Tensor, ndarray or scalar
        Any shape.
    dims : int or sequence of int
        The dimensions to reverse.

    Returns
    -------
    Tensor
        The flipped copy; the gradient is flipped back.
    """
    x = _t(input)
    return FlipFunction.apply(x, _norm_dims(dims, x.ndim, "flip") or ())


class CopyFunction(Function):
    @staticmethod
    def forward(ctx: Context, a: Any) -> Any:
        return np.array(a, copy=True)

    @staticmethod
    def backward(ctx: Context, grad: Any) -> Any:
        return grad


def clone(input: TensorLike) -> Tensor:
    """A differentiable copy of ``input`` (torch.clone).

    Parameters
    ----------
    input : Tensor, ndarray or scalar
        Any shape.

    Returns
    -------
    Tensor
        A new Tensor with its own memory; the gradient passes through unchanged.
    """
    return CopyFunction.apply(_t(input))


# ---------------------------------------------------------------------------- matmul


class MatMulFunction(Function):
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


def matmul(input: TensorLike, other: TensorLike) -> Tensor:
    """Matrix product with NumPy / torch semantics (torch.matmul).

    1-d operands are treated as a row (``input``) or column (``other``) vector and the added
    dimension removed; leading dimensions broadcast as batch dimensions.

    Parameters
    ----------
    input : Tensor, ndarray or scalar
        Shape (..., n, k) or (k,).
    other : Tensor, ndarray or scalar
        Shape (..., k, m) or (k,).

    Returns
    -------
    Tensor
        Shape (..., n, m) (batch dimensions broadcast). Differentiable in both; gradients of
        broadcast batch dimensions are summed back.

    Raises
    ------
    ValueError
        If an operand is 0-d or the inner dimensions differ.
    """
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
    return MatMulFunction.apply(a, b)


def bmm(input: TensorLike, mat2: TensorLike) -> Tensor:
    """Batched matrix product of two 3-d Tensors (torch.bmm).

    Parameters
    ----------
    input : Tensor, ndarray or scalar
        Shape (B, n, k).
    mat2 : Tensor, ndarray or scalar
        Shape (B, k, m).

    Returns
    -------
    Tensor
        Shape (B, n, m), differentiable in both.

    Raises
    ------
    ValueError
        If an operand is not 3-d or the inner dimensions differ.
    """
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


def einsum(equation: str, *operands: TensorLike) -> Tensor:
    """Differentiable ``np.einsum`` for explicit equations (torch.einsum).

    Two-operand contractions run as one batched matrix product.

    Parameters
    ----------
    equation : str
        An explicit equation such as ``"bcm,bcn->bmn"``; ``...`` is allowed. A subscript may not
        repeat within one operand (no diagonals) or in the output.
    *operands : Tensor, ndarray or scalar
        One operand per input term (or one list of them).

    Returns
    -------
    Tensor
        The contraction; differentiable in every operand.

    Raises
    ------
    ValueError
        If the equation is implicit (no ``->``), does not match the operands, or repeats a
        subscript.
    """
    if len(operands) == 1 and isinstance(operands[0], (list, tuple)):
        operands = tuple(operands[0])
    ops = [_t(o) for o in operands]
    ins, out = _parse_einsum(equation, [o.shape for o in ops])
    return EinsumFunction.apply(",".join(ins) + "->" + out, *ops)


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


class EinsumFunction(Function):
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


class SoftmaxFunction(Function):
    @staticmethod
    def forward(ctx: Context, a: Any, dim: int) -> Any:
        with np.errstate(invalid="ignore"):  # a row of -inf (or with +inf) gives NaN, as torch's
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


class LogSoftmaxFunction(Function):
    @staticmethod
    def forward(ctx: Context, a: Any, dim: int) -> Any:
        with np.errstate(invalid="ignore"):  # as in SoftmaxFunction
            z = a - a.max(axis=dim, keepdims=True)
        out = z - np.log(np.exp(z).sum(axis=dim, keepdims=True))
        ctx.save_for_backward(out)
        ctx.dim = dim
        return out

    @staticmethod
    def backward(ctx: Context, grad: Any) -> tuple:
        (out,) = ctx.saved_tensors
        return grad - np.exp(out) * grad.sum(axis=ctx.dim, keepdims=True), None


def softmax(input: TensorLike, dim: int) -> Tensor:
    """Softmax along ``dim``, ``exp(x - max) / sum(exp(x - max))`` (torch.softmax).

    Parameters
    ----------
    input : Tensor, ndarray or scalar
        Any shape.
    dim : int
        The dimension that sums to 1.

    Returns
    -------
    Tensor
        ``input``'s shape. Gradient ``out * (grad - sum(grad * out, dim))``.
    """
    x = _t(input)
    return SoftmaxFunction.apply(x, _norm_dim(dim, x.ndim, "softmax"))


def log_softmax(input: TensorLike, dim: int) -> Tensor:
    """Log-softmax along ``dim``, ``x - max - log(sum(exp(x - max)))`` (torch.log_softmax).

    Parameters
    ----------
    input : Tensor, ndarray or scalar
        Any shape.
    dim : int
        The dimension to normalise over.

    Returns
    -------
    Tensor
        ``input``'s shape. Gradient ``grad - exp(out) * sum(grad, dim)``.
    """
    x = _t(input)
    return LogSoftmaxFunction.apply(x, _norm_dim(dim, x.ndim, "log_softmax"))


# ---------------------------------------------------------------------------- activations


class GELUFunction(Function):
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


def gelu(input: TensorLike, approximate: str = "none") -> Tensor:
    """GELU activation (torch.nn.functional.gelu).

    Parameters
    ----------
    input : Tensor, ndarray or scalar
        Any shape.
    approximate : {"none", "tanh"}, default "none"
        "none": the exact ``0.5 * x * (1 + erf(x / sqrt(2)))``; "tanh": ``0.5 * x * (1 +
        tanh(sqrt(2/pi) * (x + 0.044715 x**3)))``.

    Returns
    -------
    Tensor
        ``input``'s shape and dtype, differentiable.

    Raises
    ------
    ValueError
        If ``approximate`` is neither "none" nor "tanh".
    """
    if approximate not in ("none", "tanh"):
        raise ValueError(f"gelu: approximate must be 'none' or 'tanh', got {approximate!r}")
    return GELUFunction.apply(_t(input), approximate)


# ---------------------------------------------------------------------------- helpers of the losses


def _reduce(op: str, loss: Tensor, reduction: str) -> Tensor:
    if reduction == "mean":
        return mean(loss)
    if reduction == "sum":
        return sum(loss)
    if reduction == "none":
        return loss
    raise ValueError(f"{op}: reduction must be 'mean', 'sum' or 'none', got {reduction!r}")


# ---------------------------------------------------------------------------- conv2d


class Conv2dFunction(Function):
    """2-D cross-correlation (torch's conv2d), NCHW; ``pad`` is (top, bottom, left, right).

    The kernels (im2col + BLAS, a depthwise path, the backward) are in ``kernels/cpu/conv2d.py``.
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
        ctx.geometry = (x.shape, stride, pad, dilation, groups, out_hw)
        # the weight gradient needs the forward's columns: keep them only if it is wanted
        ctx.cache = {} if ctx.needs_input_grad[1] else None
        ctx.save_for_backward(w)
        return conv2d_kernels.conv2d_forward(
            x, w, b, stride, pad, dilation, groups, out_hw, ctx.cache
        )

    @staticmethod
    def backward(ctx: Context, grad: Any) -> tuple:
        (w,) = ctx.saved_tensors
        x_shape, stride, pad, dilation, groups, out_hw = ctx.geometry
        gx, gw, gb = conv2d_kernels.conv2d_backward(
            grad, x_shape, w, stride, pad, dilation, groups, out_hw,
            ctx.needs_input_grad[:3], ctx.cache,
        )  # fmt: skip
        return gx, gw, gb, None, None, None, None, None


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
    ph, pw = pair("conv2d", "padding", padding, 0)
    return (ph, ph, pw, pw)


def conv2d(
    input: TensorLike,
    weight: TensorLike,
    bias: TensorLike | None = None,
    stride: IntPair = 1,
    padding: IntPair | str = 0,
    dilation: IntPair = 1,
    groups: int = 1,
) -> Tensor:
    """2-D convolution (cross-correlation) with torch.nn.functional.conv2d's semantics.

    Forward and backward run deformnp's kernels (im2col + BLAS, with a depthwise path).

    Parameters
    ----------
    input : Tensor or ndarray, shape (N, C, H, W) or (C, H, W)
        float32 or float64; a 3-d input is one unbatched image.
    weight : Tensor or ndarray, shape (O, C/groups, kh, kw)
        The filters, ``input``'s dtype.
    bias : Tensor or ndarray, shape (O,), optional
        Added to each output channel.
    stride : int or (int, int), default 1
        The step between output positions, (sh, sw).
    padding : int, (int, int), "valid" or "same", default 0
        Zero padding on both sides, (ph, pw). "valid" is 0; "same" (stride 1 only) keeps
        H and W, an odd total padding putting the extra row/column at the bottom/right, as torch.
    dilation : int or (int, int), default 1
        The spacing of kernel taps, (dh, dw).
    groups : int, default 1
        Channel groups; C and O must be divisible by it.

    Returns
    -------
    Tensor, shape (N, O, Hout, Wout) (or (O, Hout, Wout))
        ``Hout = (H + 2*ph - dh*(kh-1) - 1) // sh + 1``, likewise ``Wout``. Differentiable in
        ``input``, ``weight`` and ``bias``.

    Raises
    ------
    TypeError
        If an array is not float32/float64 or the dtypes differ.
    ValueError
        If a shape, ``groups``, ``padding`` or the output size is invalid.

    See Also
    --------
    deformnp.nn.Conv2d : The layer.
    deformnp.ops.deform_conv2d : The deformable convolution; see :doc:`/ops/deform_conv`.
    """
    op = "conv2d"
    x = host_float_array(op, "input", unwrap(input))
    w = host_float_array(op, "weight", unwrap(weight))
    b = None if bias is None else host_float_array(op, "bias", unwrap(bias))
    same_dtype(op, input=x, weight=w, bias=b)
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
    st = pair(op, "stride", stride, 1)
    dil = pair(op, "dilation", dilation, 1)
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
    out = Conv2dFunction.apply(
        xt, _t(weight), None if bias is None else _t(bias), st, pad, dil, groups, (ho, wo)
    )
    return squeeze(out, 0) if unbatched else out


# ---------------------------------------------------------------------------- linear


class LinearFunction(Function):
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


def linear(input: TensorLike, weight: TensorLike, bias: TensorLike | None = None) -> Tensor:
    """``input @ weight.T + bias`` (torch.nn.functional.linear).

    Parameters
    ----------
    input : Tensor or ndarray, shape (..., in_features)
        float32 or float64.
    weight : Tensor or ndarray, shape (out_features, in_features)
        ``input``'s dtype.
    bias : Tensor or ndarray, shape (out_features,), optional
        Added to every row.

    Returns
    -------
    Tensor, shape (..., out_features)
        Differentiable in ``input``, ``weight`` and ``bias``.

    Raises
    ------
    TypeError
        If an array is not float32/float64 or the dtypes differ.
    ValueError
        If the shapes do not fit.
    """
    op = "linear"
    x = host_float_array(op, "input", unwrap(input))
    w = host_float_array(op, "weight", unwrap(weight))
    b = None if bias is None else host_float_array(op, "bias", unwrap(bias))
    same_dtype(op, input=x, weight=w, bias=b)
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
    return LinearFunction.apply(_t(input), _t(weight), None if bias is None else _t(bias))


# ---------------------------------------------------------------------------- layer_norm


class LayerNormFunction(Function):
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
    input: TensorLike,
    normalized_shape: Any,
    weight: TensorLike | None = None,
    bias: TensorLike | None = None,
    eps: float = 1e-5,
) -> Tensor:
    """Layer normalisation over the trailing ``normalized_shape`` dimensions (torch's layer_norm).

    ``(x - mean) / sqrt(var + eps) * weight + bias``, with the mean and the biased variance
    over the normalised dimensions.

    Parameters
    ----------
    input : Tensor or ndarray, shape (...) + normalized_shape
        float32 or float64.
    normalized_shape : int or sequence of int
        The trailing dimensions to normalise over.
    weight : Tensor or ndarray, shape normalized_shape, optional
        Elementwise scale; None: 1.
    bias : Tensor or ndarray, shape normalized_shape, optional
        Elementwise shift; None: 0.
    eps : float, default 1e-5
        Added to the variance (>= 0).

    Returns
    -------
    Tensor
        ``input``'s shape. Differentiable in ``input``, ``weight`` and ``bias``.

    Raises
    ------
    TypeError
        If an array is not float32/float64 or the dtypes differ.
    ValueError
        If the shapes do not fit or ``eps`` is negative.
    """
    op = "layer_norm"
    x = host_float_array(op, "input", unwrap(input))
    ns = integers(op, "normalized_shape", normalized_shape)
    if not ns or x.shape[x.ndim - len(ns) :] != ns or len(ns) > x.ndim:
        raise ValueError(
            f"{op}: input's trailing dimensions must equal normalized_shape {ns}, got shape {x.shape}"
        )
    w = None if weight is None else host_float_array(op, "weight", unwrap(weight))
    b = None if bias is None else host_float_array(op, "bias", unwrap(bias))
    same_dtype(op, input=x, weight=w, bias=b)
    for name, a in (("weight", w), ("bias", b)):
        if a is not None and a.shape != ns:
            raise ValueError(f"{op}: {name} must have shape normalized_shape {ns}, got {a.shape}")
    if not eps >= 0:
        raise ValueError(f"{op}: eps must be >= 0, got {eps}")
    axes = tuple(range(x.ndim - len(ns), x.ndim))
    return LayerNormFunction.apply(
        _t(input),
        None if weight is None else _t(weight),
        None if bias is None else _t(bias),
        axes,
        float(eps),
    )


# ---------------------------------------------------------------------------- dropout, pad


def dropout(
    input: TensorLike,
    p: float = 0.5,
    training: bool = True,
    inplace: bool = False,
    generator: np.random.Generator | None = None,
) -> Tensor:
    """Dropout (torch.nn.functional.dropout): zero elements with probability ``p`` when training.

    The kept elements are scaled by ``1 / (1 - p)``; with ``training=False`` or ``p=0`` the
    input is returned unchanged.

    Parameters
    ----------
    input : Tensor, ndarray or scalar
        float32 or float64 when dropout applies.
    p : float, default 0.5
        The probability of zeroing an element, in [0, 1].
    training : bool, default True
        Apply dropout; False is the identity.
    inplace : bool, default False
        Accepted for torch compatibility and ignored.
    generator : numpy.random.Generator, optional
        The random source; None uses deformnp's module-level generator (seeded by
        :func:`deformnp.manual_seed`).

    Returns
    -------
    Tensor
        ``input``'s shape; the gradient is masked and scaled like the forward.

    Raises
    ------
    ValueError
        If ``p`` is outside [0, 1].
    TypeError
        If dropout applies to a non-float input.
    """
    if not 0.0 <= p <= 1.0:
        raise ValueError(f"dropout: p must be in [0, 1], got {p}")
    x = _t(input)
    if not training or p == 0.0:
        return x
    if x.dtype.kind != "f":
        raise TypeError(f"dropout: input must be float32 or float64, got {x.dtype}")
    if p == 1.0:
        return mul(x, Tensor._wrap(np.zeros(x.shape, x.dtype)))
    rng = _random.default_generator() if generator is None else generator
    keep = rng.random(x.shape) >= p
    scale = np.asarray(1.0 / (1.0 - p), dtype=x.dtype)
    return mul(x, Tensor._wrap(keep * scale))


class PadFunction(Function):
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


def pad(
    input: TensorLike, pad: Sequence[int], mode: str = "constant", value: float = 0.0
) -> Tensor:
    """Constant padding (torch.nn.functional.pad with ``mode="constant"``).

    Parameters
    ----------
    input : Tensor, ndarray or scalar
        Any shape.
    pad : sequence of int
        (before, after) pairs from the last dimension backwards: ``(left, right, top, bottom,
        ...)``; an even length of at most ``2 * input.ndim``. Negative widths crop.
    mode : str, default "constant"
        Only "constant" is supported.
    value : float, default 0.0
        The fill value.

    Returns
    -------
    Tensor
        Each padded dimension grows by ``before + after``; the gradient is the interior slice.

    Raises
    ------
    ValueError
        If ``mode`` is not "constant", ``pad`` has a bad length, or a size becomes negative.
    """
    x = _t(input)
    if mode != "constant":
        raise ValueError(f"pad: only mode='constant' is supported, got {mode!r}")
    pad = list(integers("pad", "pad", pad))
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
    return PadFunction.apply(x, tuple(widths), value)


# ---------------------------------------------------------------------------- losses


def mse_loss(input: TensorLike, target: TensorLike, reduction: str = "mean") -> Tensor:
    """Mean squared error (torch.nn.functional.mse_loss).

    Parameters
    ----------
    input : Tensor, ndarray or scalar
        The predictions.
    target : Tensor, ndarray or scalar
        The targets, ``input``'s shape exactly (torch broadcasts with a warning; deformnp
        refuses, which catches (N, 1)-vs-(N,) mistakes).
    reduction : {"mean", "sum", "none"}, default "mean"
        How the elementwise ``(input - target)**2`` is reduced.

    Returns
    -------
    Tensor
        0-d for "mean" and "sum", ``input``'s shape for "none". Differentiable in both.

    Raises
    ------
    ValueError
        If the shapes differ or ``reduction`` is unknown.
    """
    x, t = _pair_operands(input, target)
    if x.shape != t.shape:
        raise ValueError(f"mse_loss: input has shape {x.shape} but target has shape {t.shape}")
    d = x - t
    return _reduce("mse_loss", d * d, reduction)


def l1_loss(input: TensorLike, target: TensorLike, reduction: str = "mean") -> Tensor:
    """Mean absolute error (torch.nn.functional.l1_loss).

    Parameters
    ----------
    input : Tensor, ndarray or scalar
        The predictions.
    target : Tensor, ndarray or scalar
        The targets, ``input``'s shape exactly (see :func:`mse_loss`).
    reduction : {"mean", "sum", "none"}, default "mean"
        How the elementwise ``|input - target|`` is reduced.

    Returns
    -------
    Tensor
        0-d for "mean" and "sum", ``input``'s shape for "none". Differentiable in both.

    Raises
    ------
    ValueError
        If the shapes differ or ``reduction`` is unknown.
    """
    x, t = _pair_operands(input, target)
    if x.shape != t.shape:
        raise ValueError(f"l1_loss: input has shape {x.shape} but target has shape {t.shape}")
    return _reduce("l1_loss", abs(x - t), reduction)


def nll_loss(
    input: TensorLike,
    target: TensorLike,
    weight: TensorLike | None = None,
    ignore_index: int = -100,
    reduction: str = "mean",
) -> Tensor:
    """Negative log-likelihood loss (torch.nn.functional.nll_loss).

    Parameters
    ----------
    input : Tensor, ndarray or scalar
        Log-probabilities, shape (N, C), (N, C, d1, ...) or (C,); float32 or float64.
    target : Tensor or array_like
        Class indices (int, the input's shape without the class dimension) or class
        probabilities (float, the input's shape); see :func:`cross_entropy`.
    weight : Tensor or ndarray, shape (C,), optional
        Per-class weights.
    ignore_index : int, default -100
        Index targets equal to it contribute nothing (nor to the "mean" denominator).
    reduction : {"mean", "sum", "none"}, default "mean"
        "mean" divides by the summed weights of the non-ignored index targets.

    Returns
    -------
    Tensor
        0-d for "mean" and "sum", per-sample losses for "none". Differentiable in ``input``.

    Raises
    ------
    TypeError
        If ``input`` is not float or ``target`` is neither int nor float.
    ValueError
        If a shape, a target value or ``reduction`` is invalid.
    """
    return _class_loss("nll_loss", _t(input), target, weight, ignore_index, reduction, 0.0)


def cross_entropy(
    input: TensorLike,
    target: TensorLike,
    weight: TensorLike | None = None,
    ignore_index: int = -100,
    reduction: str = "mean",
    label_smoothing: float = 0.0,
) -> Tensor:
    """Cross-entropy over logits (torch.nn.functional.cross_entropy).

    ``log_softmax`` over the class dimension, then :func:`nll_loss` with optional label
    smoothing.

    Parameters
    ----------
    input : Tensor, ndarray or scalar
        Logits, shape (N, C), (N, C, d1, ...) or (C,); float32 or float64.
    target : Tensor or array_like
        Class indices (int32/int64, the input's shape without the class dimension) or class
        probabilities (float, the input's shape).
    weight : Tensor or ndarray, shape (C,), optional
        Per-class weights.
    ignore_index : int, default -100
        Index targets equal to it contribute nothing.
    reduction : {"mean", "sum", "none"}, default "mean"
        "mean" averages index targets over the summed weights of the non-ignored targets and
        probability targets over the number of samples, as torch.
    label_smoothing : float, default 0.0
        In [0, 1]: the target becomes ``(1 - label_smoothing) * target + label_smoothing / C``.

    Returns
    -------
    Tensor
        0-d for "mean" and "sum", per-sample losses for "none". Differentiable in ``input``
        (and in a probability ``target`` given as a Tensor).

    Raises
    ------
    TypeError
        If ``input`` is not float or ``target`` is neither int nor float.
    ValueError
        If ``input`` is 0-d, or a shape, a target value, ``reduction`` or
        ``label_smoothing`` is invalid.
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
        w = host_float_array(op, "weight", unwrap(weight))
        if w.shape != (n_cls,):
            raise ValueError(f"{op}: weight must have shape (C,) = ({n_cls},), got {w.shape}")
        same_dtype(op, input=logp.data, weight=w)
    t_raw = target.data if isinstance(target, Tensor) else np.asarray(target)
    if t_raw.dtype.kind == "f":  # class probabilities
        if t_raw.shape != logp.shape:
            raise ValueError(
                f"{op}: probability target must have the input's shape {logp.shape}, got {t_raw.shape}"
            )
        same_dtype(op, input=logp.data, target=t_raw)
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


def leaky_relu(input: TensorLike, negative_slope: float = 0.01, inplace: bool = False) -> Tensor:
    """Elementwise ``x if x > 0 else negative_slope * x`` (torch.nn.functional.leaky_relu).

    Parameters
    ----------
    input : Tensor, ndarray or scalar
        Any shape.
    negative_slope : float, default 0.01
        The slope for ``x <= 0``.
    inplace : bool, default False
        Accepted for torch compatibility and ignored.

    Returns
    -------
    Tensor
        ``input``'s shape, differentiable.
    """
    x = _t(input)
    return where(x.data > 0, x, x * negative_slope)


def silu(input: TensorLike, inplace: bool = False) -> Tensor:
    """Elementwise ``x * sigmoid(x)`` (torch.nn.functional.silu).

    Parameters
    ----------
    input : Tensor, ndarray or scalar
        Any shape.
    inplace : bool, default False
        Accepted for torch compatibility and ignored.

    Returns
    -------
    Tensor
        ``input``'s shape, differentiable.
    """
    x = _t(input)
    return x * sigmoid(x)


def softplus(input: TensorLike, beta: float = 1.0, threshold: float = 20.0) -> Tensor:
    """Elementwise ``log(1 + exp(beta * x)) / beta`` (torch.nn.functional.softplus).

    Parameters
    ----------
    input : Tensor, ndarray or scalar
        Any shape.
    beta : float, default 1.0
        The sharpness.
    threshold : float, default 20.0
        Where ``beta * x > threshold`` the result is ``x`` (linear), as torch.

    Returns
    -------
    Tensor
        ``input``'s shape, computed stably, differentiable.
    """
    x = _t(input)
    bx = x * beta
    # log(1 + e^z) = max(z, 0) + log(1 + e^-|z|), stable for every z
    soft = (relu(bx) + log(exp(neg(abs(bx))) + 1.0)) / beta
    return where(bx.data > threshold, x, soft)


# ---------------------------------------------------------------------------- devices


class ToDeviceFunction(Function):
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
    """``input`` moved to ``device``, differentiably (``Tensor.to("cuda")`` / ``to("cpu")``).

    Parameters
    ----------
    input : Tensor
        Any shape, on the CPU or a CUDA device.
    device : {"cpu", "cuda"}
        The destination.

    Returns
    -------
    Tensor
        The same values on ``device``; the gradient moves back to ``input``'s device.
    """
    return ToDeviceFunction.apply(input, device)


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

    def contiguous(self: Tensor) -> Tensor:
        """The tensor itself: NumPy handles any memory layout (kept so ported torch code runs).

        Returns
        -------
        Tensor
            ``self``.
        """
        return self

    T.contiguous = contiguous

    def to(self: Tensor, target: Any) -> Tensor:
        """Move the tensor to a device, or cast it to a dtype (differentiably).

        Parameters
        ----------
        target : {"cpu", "cuda"} or dtype-like
            A device name moves the data (the gradient moves back); anything else is a dtype
            to cast to, as in :meth:`astype`.

        Returns
        -------
        Tensor
            ``self`` when nothing changes, else a new tensor on the graph.
        """
        if isinstance(target, str) and target in ("cpu", "cuda"):
            return self if target == self.device else to_device(self, target)
        return self.astype(target)

    T.to = to

    def astype(self: Tensor, dtype: Any) -> Tensor:
        """Cast to ``dtype`` (differentiably: the gradient is cast back).

        Parameters
        ----------
        dtype : dtype-like
            The new dtype, e.g. ``np.float32``.

        Returns
        -------
        Tensor
            ``self`` when the dtype is already ``dtype``, else a new tensor on the graph.
        """
        dtype = np.dtype(dtype)
        if dtype == self.dtype:
            return self
        return CastFunction.apply(self, dtype)

    T.astype = astype


class CastFunction(Function):
    @staticmethod
    def forward(ctx: Context, a: Any, dtype: np.dtype) -> Any:
        ctx.dtype = a.dtype
        return a.astype(dtype)

    @staticmethod
    def backward(ctx: Context, grad: Any) -> tuple:
        return grad.astype(ctx.dtype), None


_attach()
