"""Autograd Functions of the loss-forming ops on CUDA tensors (their kernels are in
``elementwise.py`` beside this file).

Enough to form a loss from a deformable op's output without leaving the device: ``a op b`` for
add, sub, mul, div with a same-shape CUDA operand or a constant scalar, negation, and the full
sum and mean. ``deformnp.functional`` dispatches to these when an operand is a CUDA tensor; every
other generic op refuses a CUDA tensor by name.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from ...function import Context, Function
from ...tensor import Tensor
from . import elementwise as ew


def binary(op: str, a: Tensor, b: Tensor) -> Tensor:
    """``a op b`` (op: "add", "sub", "mul" or "div") where one operand is a CUDA tensor and the
    other a CUDA tensor of the same shape and dtype or a constant scalar."""
    if a.device == "cuda" and b.device == "cuda":
        if a.shape != b.shape or a.dtype != b.dtype:
            raise ValueError(
                f"{op}: CUDA operands must have the same shape and dtype (no broadcasting on "
                f"CUDA), got {a.shape} {a.dtype} and {b.shape} {b.dtype}; move to the CPU "
                f"with .to('cpu') for broadcasting"
            )
        return CudaBinaryFunction.apply(a, b, op)
    dev, host, host_left = (a, b, False) if a.device == "cuda" else (b, a, True)
    if host.size != 1 or host.requires_grad:
        raise ValueError(
            f"{op}: a CUDA tensor can be combined with another CUDA tensor of its shape or a "
            f"constant scalar, got a host operand of shape {host.shape}; move it with .to('cuda')"
        )
    scalar = float(host.numpy().reshape(()))
    if host_left:  # scalar op tensor
        if op in ("add", "mul"):
            return CudaBinaryFunction.apply(dev, scalar, op)
        return CudaBinaryFunction.apply(dev, scalar, "r" + op)
    return CudaBinaryFunction.apply(dev, scalar, op)


def negative(x: Tensor) -> Tensor:
    """``-x`` for a CUDA tensor."""
    return CudaBinaryFunction.apply(x, -1.0, "mul")


def reduce(op: str, x: Tensor, dims: tuple[int, ...] | None, keepdim: bool) -> Tensor:
    """The full sum or mean (op: "sum" or "mean") of a CUDA tensor; ``dims`` (normalized) must
    be None or every dimension."""
    if dims is not None and dims != tuple(range(x.ndim)):
        raise ValueError(
            f"{op}: on CUDA tensors only the full reduction (dim=None) is supported, got "
            f"dim={dims}; move to the CPU with .to('cpu') to reduce over some dimensions"
        )
    return CudaReduceFunction.apply(x, op, (1,) * x.ndim if keepdim else ())


class CudaBinaryFunction(Function):
    """a op b on the device; b is a device array of a's shape or a Python float.

    ops: add, sub, mul, div, and rsub / rdiv (``b - a``, ``b / a`` for a scalar b).
    """

    supports_cuda = True

    @staticmethod
    def forward(ctx: Context, a: Any, b: Any, op: str) -> Any:
        ctx.op = op
        ctx.save_for_backward(a, b)
        return ew.binary(op, a, b)

    @staticmethod
    def backward(ctx: Context, grad: Any) -> tuple:
        a, b = ctx.saved_tensors
        op = ctx.op
        scalar = not hasattr(b, "shape")
        if op == "add":
            return grad, (None if scalar else grad), None
        if op == "sub":
            return grad, (None if scalar else ew.binary("mul", grad, -1.0)), None
        if op == "rsub":
            return ew.binary("mul", grad, -1.0), None, None
        if op == "mul":
            ga = ew.binary("mul", grad, b)
            return ga, (None if scalar else ew.binary("mul", grad, a)), None
        if op == "div":
            ga = ew.binary("div", grad, b)
            if scalar:
                return ga, None, None
            gb = ew.binary("mul", ew.binary("div", ew.binary("mul", ga, a), b), -1.0)  # -g*a/b^2
            return ga, gb, None
        # rdiv: b / a with a scalar b -> d/da = -b / a^2
        return ew.binary("mul", ew.binary("div", ew.binary("div", grad, a), a), -b), None, None


class CudaReduceFunction(Function):
    """Sum or mean of every element of a device array; the result keeps ``out_shape``."""

    supports_cuda = True

    @staticmethod
    def forward(ctx: Context, a: Any, op: str, out_shape: tuple) -> Any:
        ctx.shape, ctx.dtype = tuple(a.shape), a.dtype
        ctx.scale = 1.0 / max(a.size, 1) if op == "mean" else 1.0
        total = ew.sum_all(a)
        if op == "mean":
            total = ew.scale(total, ctx.scale) if a.size else ew.scale(total, np.nan)
        return total.reshape(out_shape) if out_shape else total

    @staticmethod
    def backward(ctx: Context, grad: Any) -> tuple:
        return ew.broadcast_scalar(grad.reshape((1,)), ctx.shape, ctx.scale), None, None
