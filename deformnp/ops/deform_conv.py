"""Deformable convolution v1 and v2 (SPEC section 6; anchor: ``torchvision.ops.deform_conv2d``).

``deform_conv2d(input, offset, weight, bias=None, stride=1, padding=0, dilation=1, mask=None)``
has torchvision's signature and semantics:

* input (B, Cin, H, W); weight (Cout, Cin/g, kh, kw), g = Cin // weight.shape[1] weight groups
  (g must divide Cin and Cout); offset (B, 2*G*kh*kw, Hout, Wout), G = offset groups (inferred
  from offset.shape[1], must divide Cin); mask (B, G*kh*kw, Hout, Wout) or None (None: all ones,
  DCN v1); bias (Cout,) or None; stride, padding, dilation: int or (h, w).
* Hout = (H + 2*ph - (dh*(kh-1) + 1)) // sh + 1, likewise Wout.
* Kernel point k = i*kw + j (row-major). Input channel c belongs to offset group c // (Cin/G);
  for it dy = offset[b, 2*K*og + 2*k], dx = offset[b, 2*K*og + 2*k + 1], m = mask[b, K*og + k]
  (K = kh*kw), all at (oy, ox). Sampling point y = oy*sh - ph + i*dh + dy,
  x = ox*sw - pw + j*dw + dx, sampled with the zero-fade rule of SPEC section 4.
* out[b, co, oy, ox] = bias[co] + sum over the input channels c of co's weight group and over k
  of weight[co, c_local, i, j] * m * sample(input[b, c], y, x).

Gradients flow to input, offset, mask, weight and bias. The offset gradient is the exact
derivative of the zero-fade rule (the right-hand slope at integer coordinates, including the
border line y = -1 / x = -1 where torchvision's is not); offsets that are NaN, infinite or huge
(+-1e6) sample zero and get zero gradient. Any batch size works, including 0 (no
``im2col_step`` divisibility rule). The CPU backward is deterministic: bit-identical gradients on
every run and with any number of threads.

The array-level pair, for wrapping in other frameworks (a ``torch.autograd.Function``, a JAX
``custom_vjp``); they validate like the op and take and return plain arrays::

    out = deform_conv2d_forward(input, offset, weight, bias=None, stride=1, padding=0,
                                dilation=1, mask=None)
    grad_input, grad_offset, grad_weight, grad_bias, grad_mask = deform_conv2d_backward(
        grad_out, input, offset, weight, bias=None, stride=1, padding=0, dilation=1, mask=None,
        needs=(True, True, True, True, True))

``bias`` in the backward only tells whether a bias gradient exists; gradients not asked for by
``needs`` (and those of a None bias or mask) are returned as None.
"""

from __future__ import annotations

from types import ModuleType
from typing import Any

import numpy as np

from ..function import Context, Function
from ..registry import BenchCase, CheckCase, bench_device, register_op, torch_device
from ..tensor import Tensor
from ._common import check_ndim, device_of, float_array, kernel_module, pair, same_dtype

__all__ = ["deform_conv2d", "deform_conv2d_forward", "deform_conv2d_backward"]

_OP = "deform_conv2d"


def _kernels(device: str) -> ModuleType:
    """The kernel module for ``device`` ("cpu" or "cuda")."""
    return kernel_module(_OP, "deform_conv", device)


def output_size(
    H: int, W: int, kh: int, kw: int, stride: tuple, padding: tuple, dilation: tuple
) -> tuple[int, int]:
    """(Hout, Wout) of a convolution with these parameters (may be < 1 for too small inputs)."""
    Hout = (H + 2 * padding[0] - (dilation[0] * (kh - 1) + 1)) // stride[0] + 1
    Wout = (W + 2 * padding[1] - (dilation[1] * (kw - 1) + 1)) // stride[1] + 1
    return Hout, Wout


def _validate(
    input: Any,
    offset: Any,
    weight: Any,
    bias: Any,
    stride: Any,
    padding: Any,
    dilation: Any,
    mask: Any,
) -> tuple:
    """Checked, C-contiguous arrays and parameters: (input, offset, weight, bias, mask, stride,
    padding, dilation, device)."""
    device = device_of(_OP, input=input, offset=offset, weight=weight, bias=bias, mask=mask)
    inp = float_array(_OP, "input", input)
    off = float_array(_OP, "offset", offset)
    wgt = float_array(_OP, "weight", weight)
    b = float_array(_OP, "bias", bias) if bias is not None else None
    msk = float_array(_OP, "mask", mask) if mask is not None else None
    same_dtype(_OP, input=inp, offset=off, weight=wgt, bias=b, mask=msk)
    stride = pair(_OP, "stride", stride, 1)
    padding = pair(_OP, "padding", padding, 0)
    dilation = pair(_OP, "dilation", dilation, 1)
    check_ndim(_OP, "input", inp, 4, "(B, Cin, H, W)")
    check_ndim(_OP, "offset", off, 4, "(B, 2*offset_groups*kh*kw, Hout, Wout)")
    check_ndim(_OP, "weight", wgt, 4, "(Cout, Cin/groups, kh, kw)")
    if msk is not None:
        check_ndim(_OP, "mask", msk, 4, "(B, offset_groups*kh*kw, Hout, Wout)")
    if b is not None:
        check_ndim(_OP, "bias", b, 1, "(Cout,)")
    B, Cin, H, W = (int(s) for s in inp.shape)
    Cout, cin_g, kh, kw = (int(s) for s in wgt.shape)
    if kh < 1 or kw < 1:
        raise ValueError(f"{_OP}: weight has kernel size {kh}x{kw}, expected at least 1x1")
    if cin_g < 1:
        raise ValueError(
            f"{_OP}: weight.shape[1] (input channels per group) must be >= 1, got {cin_g}"
        )
    if Cin % cin_g != 0:
        raise ValueError(
            f"{_OP}: input has {Cin} channels, not a multiple of weight.shape[1] = {cin_g} "
            f"(input channels per weight group)"
        )
    g = Cin // cin_g
    if Cout % g != 0:
        raise ValueError(
            f"{_OP}: weight has {Cout} output channels, not divisible by the {g} weight groups "
            f"(groups = Cin / weight.shape[1] = {Cin}/{cin_g})"
        )
    Hout, Wout = output_size(H, W, kh, kw, stride, padding, dilation)
    if Hout < 1 or Wout < 1:
        raise ValueError(
            f"{_OP}: the output would be {Hout}x{Wout} for input {H}x{W}, kernel {kh}x{kw}, "
            f"stride {stride}, padding {padding}, dilation {dilation}; expected at least 1x1"
        )
    K = kh * kw
    if off.shape[0] != B:
        raise ValueError(
            f"{_OP}: offset has batch size {off.shape[0]}, expected input's batch size {B}"
        )
    oc = int(off.shape[1])
    if oc == 0 or oc % (2 * K) != 0:
        G = max(1, round(oc / (2 * K)))
        raise ValueError(
            f"{_OP}: offset has {oc} channels, expected 2*offset_groups*kh*kw = {2 * G * K} "
            f"(kernel {kh}x{kw}; offset_groups = offset.shape[1] // (2*kh*kw))"
        )
    G = oc // (2 * K)
    if Cin % G != 0:
        raise ValueError(
            f"{_OP}: input has {Cin} channels, not divisible by offset_groups = {G} "
            f"(offset.shape[1] / (2*kh*kw) = {oc}/{2 * K})"
        )
    if tuple(off.shape[2:]) != (Hout, Wout):
        raise ValueError(
            f"{_OP}: offset has spatial size {tuple(off.shape[2:])}, expected the output size "
            f"{(Hout, Wout)}"
        )
    if msk is not None:
        if msk.shape[0] != B:
            raise ValueError(
                f"{_OP}: mask has batch size {msk.shape[0]}, expected input's batch size {B}"
            )
        if msk.shape[1] != G * K:
            raise ValueError(
                f"{_OP}: mask has {msk.shape[1]} channels, expected offset_groups*kh*kw = "
                f"{G * K} (offset_groups = {G}, kernel {kh}x{kw})"
            )
        if tuple(msk.shape[2:]) != (Hout, Wout):
            raise ValueError(
                f"{_OP}: mask has spatial size {tuple(msk.shape[2:])}, expected the output size "
                f"{(Hout, Wout)}"
            )
    if b is not None and b.shape[0] != Cout:
        raise ValueError(f"{_OP}: bias has {b.shape[0]} elements, expected Cout = {Cout}")
    return inp, off, wgt, b, msk, stride, padding, dilation, device


def deform_conv2d_forward(
    input: Any,
    offset: Any,
    weight: Any,
    bias: Any = None,
    stride: Any = 1,
    padding: Any = 0,
    dilation: Any = 1,
    mask: Any = None,
) -> Any:
    """Array-level forward: out (B, Cout, Hout, Wout); see the module docstring."""
    inp, off, wgt, b, msk, st, pd, dl, device = _validate(
        input, offset, weight, bias, stride, padding, dilation, mask
    )
    return _kernels(device).deform_conv2d_forward(inp, off, wgt, b, st, pd, dl, msk)


def deform_conv2d_backward(
    grad_out: Any,
    input: Any,
    offset: Any,
    weight: Any,
    bias: Any = None,
    stride: Any = 1,
    padding: Any = 0,
    dilation: Any = 1,
    mask: Any = None,
    needs: tuple = (True, True, True, True, True),
) -> tuple:
    """Array-level backward: (grad_input, grad_offset, grad_weight, grad_bias, grad_mask).

    ``needs`` has one flag per gradient in that order; unneeded ones are None, as are those of a
    None ``bias`` or ``mask``.
    """
    inp, off, wgt, b, msk, st, pd, dl, device = _validate(
        input, offset, weight, bias, stride, padding, dilation, mask
    )
    g = float_array(_OP, "grad_out", grad_out)
    same_dtype(_OP, input=inp, grad_out=g)
    expected = (inp.shape[0], wgt.shape[0], off.shape[2], off.shape[3])
    if tuple(g.shape) != expected:
        raise ValueError(f"{_OP}: grad_out must have shape {expected}, got {tuple(g.shape)}")
    return _kernels(device).deform_conv2d_backward(
        g, inp, off, wgt, msk, st, pd, dl, b is not None, tuple(needs)
    )


class DeformConv2d(Function):
    """Autograd node of :func:`deform_conv2d`; positional inputs (input, offset, weight, bias,
    mask), the geometry as keywords."""

    supports_cuda = True  # forward/backward dispatch on the arrays' device

    @staticmethod
    def forward(
        ctx: Context,
        input: Any,
        offset: Any,
        weight: Any,
        bias: Any,
        mask: Any,
        stride: tuple = (1, 1),
        padding: tuple = (0, 0),
        dilation: tuple = (1, 1),
    ) -> Any:
        inp, off, wgt, b, msk, st, pd, dl, device = _validate(
            input, offset, weight, bias, stride, padding, dilation, mask
        )
        ctx.geometry = (st, pd, dl)
        ctx.device = device
        ctx.has_bias = b is not None
        ctx.save_for_backward(inp, off, wgt, msk)
        return _kernels(device).deform_conv2d_forward(inp, off, wgt, b, st, pd, dl, msk)

    @staticmethod
    def backward(ctx: Context, grad: Any) -> tuple:
        inp, off, wgt, msk = ctx.saved_tensors
        st, pd, dl = ctx.geometry
        if ctx.device == "cpu":
            grad = np.ascontiguousarray(grad)
        n = ctx.needs_input_grad
        g_in, g_off, g_w, g_b, g_m = _kernels(ctx.device).deform_conv2d_backward(
            grad, inp, off, wgt, msk, st, pd, dl, ctx.has_bias, (n[0], n[1], n[2], n[3], n[4])
        )
        return g_in, g_off, g_w, g_b, g_m


def deform_conv2d(
    input: Any,
    offset: Any,
    weight: Any,
    bias: Any = None,
    stride: Any = 1,
    padding: Any = 0,
    dilation: Any = 1,
    mask: Any = None,
) -> Tensor:
    """Deformable convolution (v1; v2 with ``mask``), torchvision's signature and semantics.

    See the module docstring. Takes Tensors or arrays; gradients flow to every input that
    requires grad (input, offset, weight, bias, mask).
    """
    *_, st, pd, dl, _device = _validate(
        input, offset, weight, bias, stride, padding, dilation, mask
    )
    return DeformConv2d.apply(input, offset, weight, bias, mask, stride=st, padding=pd, dilation=dl)


# --------------------------------------------------------------------------- registry


def _check_cases() -> list[CheckCase]:
    """Tiny float64 cases: 2 weight groups, 2 offset groups, stride 2 / dilation, a mask; offsets
    chosen so every sampling coordinate has a fractional part in [0.1, 0.9] (off the kinks)."""
    rng = np.random.default_rng(0)
    B, Cin, H, W, Cout, kh, kw, G = 1, 4, 4, 3, 4, 2, 2, 2
    stride, padding, dilation = (1, 2), (1, 1), (2, 1)
    Hout, Wout = output_size(H, W, kh, kw, stride, padding, dilation)
    K = kh * kw
    x = Tensor(rng.standard_normal((B, Cin, H, W)), requires_grad=True)
    w = Tensor(rng.standard_normal((Cout, Cin // 2, kh, kw)), requires_grad=True)
    off = Tensor(
        rng.integers(-2, 2, (B, 2 * G * K, Hout, Wout))
        + rng.uniform(0.1, 0.9, (B, 2 * G * K, Hout, Wout)),
        requires_grad=True,
    )
    m = Tensor(rng.uniform(0.2, 1.0, (B, G * K, Hout, Wout)), requires_grad=True)
    bias = Tensor(rng.standard_normal(Cout), requires_grad=True)

    def fn(a: Any, o: Any, wt: Any, bs: Any, mk: Any) -> Tensor:
        return deform_conv2d(a, o, wt, bs, stride, padding, dilation, mk)

    return [CheckCase(fn, (x, off, w, bias, m), ("input", "offset", "weight", "bias", "mask"))]


def _bench_case(device: str) -> BenchCase | None:
    """SPEC 13: B=4, Cin=Cout=64, 32x32, 3x3, padding 1, one offset group, with mask, float32."""
    rng = np.random.default_rng(0)
    B, C, H, W, k = 4, 64, 32, 32, 3
    x = rng.standard_normal((B, C, H, W)).astype(np.float32)
    off = rng.uniform(-2, 2, (B, 2 * k * k, H, W)).astype(np.float32)
    m = rng.uniform(0, 1, (B, k * k, H, W)).astype(np.float32)
    w = (rng.standard_normal((C, C, k, k)) * 0.05).astype(np.float32)
    bias = rng.standard_normal(C).astype(np.float32)
    go = rng.standard_normal((B, C, H, W)).astype(np.float32)
    host = (x, off, m, w, bias, go)
    placed = bench_device(device, *host)
    if placed is None:
        return None
    (x, off, m, w, bias, go), sync = placed

    def forward() -> Any:
        return deform_conv2d_forward(x, off, w, bias, 1, 1, 1, m)

    def forward_backward() -> Any:
        deform_conv2d_forward(x, off, w, bias, 1, 1, 1, m)
        return deform_conv2d_backward(go, x, off, w, bias, 1, 1, 1, m)

    case = BenchCase(
        f"B={B}, {C}->{C}, {H}x{W}, {k}x{k}, pad 1, mask",
        forward,
        forward_backward,
        device=device,
        sync=sync,
    )
    tdev = torch_device(device)  # torchvision on the same device and thread count
    if tdev is None:
        return case
    try:
        import torch
        import torchvision
    except ImportError:
        return case
    tx, toff, tm_, tw, tb, tgo = (torch.from_numpy(a).to(tdev) for a in host)
    for t in (tx, toff, tm_, tw, tb):
        t.requires_grad_(True)

    def torch_forward() -> Any:
        with torch.no_grad():
            return torchvision.ops.deform_conv2d(tx, toff, tw, tb, padding=1, mask=tm_)

    def torch_forward_backward() -> Any:
        out = torchvision.ops.deform_conv2d(tx, toff, tw, tb, padding=1, mask=tm_)
        return torch.autograd.grad(out, (tx, toff, tw, tb, tm_), tgo)

    case.torch_forward = torch_forward
    case.torch_forward_backward = torch_forward_backward
    return case


register_op(_OP, check=_check_cases, bench=_bench_case)
