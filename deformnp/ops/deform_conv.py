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
every run and with any number of threads. On CUDA the input gradient is scattered with float
atomic adds (last bits vary from run to run) unless ``deformnp.use_deterministic_algorithms(True)``
is set, which makes it bit-reproducible too.

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

from dataclasses import dataclass
from types import ModuleType

from ..function import Context, Function
from ..kernels.cpu import deform_conv as cpu_kernels
from ..tensor import Tensor, unwrap
from ..typing import Array, ArrayLike, IntPair, Needs, TensorLike
from ..validation import (
    check_ndim,
    contiguous,
    device_of,
    float_array,
    grad_array,
    needs_flags,
    pair,
    same_dtype,
)

__all__ = [
    "deform_conv2d",
    "deform_conv2d_forward",
    "deform_conv2d_backward",
    "DeformConv2dFunction",
    "output_size",
]

OP = "deform_conv2d"
GRADIENTS = ("input", "offset", "weight", "bias", "mask")


def _kernels(device: str) -> ModuleType:
    """The CPU kernels, or the CUDA ones (imported on first use: numba-cuda is optional)."""
    if device == "cuda":
        from ..kernels.cuda import deform_conv as cuda_kernels

        return cuda_kernels
    return cpu_kernels


def output_size(
    H: int, W: int, kh: int, kw: int, stride: tuple, padding: tuple, dilation: tuple
) -> tuple[int, int]:
    """(Hout, Wout) of a convolution with these parameters (may be < 1 for too small inputs)."""
    Hout = (H + 2 * padding[0] - (dilation[0] * (kh - 1) + 1)) // stride[0] + 1
    Wout = (W + 2 * padding[1] - (dilation[1] * (kw - 1) + 1)) // stride[1] + 1
    return Hout, Wout


@dataclass(frozen=True)
class DeformConv2dArgs:
    """The checked arguments of one call: C-contiguous arrays of one dtype on one device
    (``bias`` and ``mask`` may be None) and the geometry as pairs of ints."""

    input: Array
    offset: Array
    weight: Array
    bias: Array | None
    mask: Array | None
    stride: tuple[int, int]
    padding: tuple[int, int]
    dilation: tuple[int, int]
    device: str

    @property
    def out_shape(self) -> tuple[int, int, int, int]:
        return (self.input.shape[0], self.weight.shape[0], *self.offset.shape[2:])


def prepare(
    input: TensorLike,
    offset: TensorLike,
    weight: TensorLike,
    bias: TensorLike | None,
    stride: IntPair,
    padding: IntPair,
    dilation: IntPair,
    mask: TensorLike | None,
) -> DeformConv2dArgs:
    """Validate the arguments of :func:`deform_conv2d` (once, for every entry point)."""
    input, offset, weight = unwrap(input), unwrap(offset), unwrap(weight)
    bias, mask = unwrap(bias), unwrap(mask)
    device = device_of(OP, input=input, offset=offset, weight=weight, bias=bias, mask=mask)
    inp = float_array(OP, "input", input)
    off = float_array(OP, "offset", offset)
    wgt = float_array(OP, "weight", weight)
    b = float_array(OP, "bias", bias) if bias is not None else None
    msk = float_array(OP, "mask", mask) if mask is not None else None
    same_dtype(OP, input=inp, offset=off, weight=wgt, bias=b, mask=msk)
    stride = pair(OP, "stride", stride, 1)
    padding = pair(OP, "padding", padding, 0)
    dilation = pair(OP, "dilation", dilation, 1)
    check_ndim(OP, "input", inp, 4, "(B, Cin, H, W)")
    check_ndim(OP, "offset", off, 4, "(B, 2*offset_groups*kh*kw, Hout, Wout)")
    check_ndim(OP, "weight", wgt, 4, "(Cout, Cin/groups, kh, kw)")
    if msk is not None:
        check_ndim(OP, "mask", msk, 4, "(B, offset_groups*kh*kw, Hout, Wout)")
    if b is not None:
        check_ndim(OP, "bias", b, 1, "(Cout,)")
    B, Cin, H, W = (int(s) for s in inp.shape)
    Cout, cin_g, kh, kw = (int(s) for s in wgt.shape)
    if Cin < 1:
        raise ValueError(f"{OP}: input has 0 channels, expected at least one (shape {inp.shape})")
    if kh < 1 or kw < 1:
        raise ValueError(f"{OP}: weight has kernel size {kh}x{kw}, expected at least 1x1")
    if cin_g < 1:
        raise ValueError(
            f"{OP}: weight.shape[1] (input channels per group) must be >= 1, got {cin_g}"
        )
    if Cin % cin_g != 0:
        raise ValueError(
            f"{OP}: input has {Cin} channels, not a multiple of weight.shape[1] = {cin_g} "
            f"(input channels per weight group)"
        )
    g = Cin // cin_g
    if Cout % g != 0:
        raise ValueError(
            f"{OP}: weight has {Cout} output channels, not divisible by the {g} weight groups "
            f"(groups = Cin / weight.shape[1] = {Cin}/{cin_g})"
        )
    Hout, Wout = output_size(H, W, kh, kw, stride, padding, dilation)
    if Hout < 1 or Wout < 1:
        raise ValueError(
            f"{OP}: the output would be {Hout}x{Wout} for input {H}x{W}, kernel {kh}x{kw}, "
            f"stride {stride}, padding {padding}, dilation {dilation}; expected at least 1x1"
        )
    K = kh * kw
    if off.shape[0] != B:
        raise ValueError(
            f"{OP}: offset has batch size {off.shape[0]}, expected input's batch size {B}"
        )
    oc = int(off.shape[1])
    if oc == 0 or oc % (2 * K) != 0 or Cin % (oc // (2 * K)) != 0:
        # offset_groups must divide the input's channels: list the counts that work
        valid = [2 * K * g for g in range(1, Cin + 1) if Cin % g == 0]
        shown = ", ".join(map(str, valid[:8])) + (", ..." if len(valid) > 8 else "")
        raise ValueError(
            f"{OP}: offset has {oc} channels, expected 2*offset_groups*kh*kw with offset_groups "
            f"dividing the input's {Cin} channels (kernel {kh}x{kw}): one of {shown}"
        )
    G = oc // (2 * K)
    if tuple(off.shape[2:]) != (Hout, Wout):
        raise ValueError(
            f"{OP}: offset has spatial size {tuple(off.shape[2:])}, expected the output size "
            f"{(Hout, Wout)}"
        )
    if msk is not None:
        if msk.shape[0] != B:
            raise ValueError(
                f"{OP}: mask has batch size {msk.shape[0]}, expected input's batch size {B}"
            )
        if msk.shape[1] != G * K:
            raise ValueError(
                f"{OP}: mask has {msk.shape[1]} channels, expected offset_groups*kh*kw = "
                f"{G * K} (offset_groups = {G}, kernel {kh}x{kw})"
            )
        if tuple(msk.shape[2:]) != (Hout, Wout):
            raise ValueError(
                f"{OP}: mask has spatial size {tuple(msk.shape[2:])}, expected the output size "
                f"{(Hout, Wout)}"
            )
    if b is not None and b.shape[0] != Cout:
        raise ValueError(f"{OP}: bias has {b.shape[0]} elements, expected Cout = {Cout}")
    return DeformConv2dArgs(inp, off, wgt, b, msk, stride, padding, dilation, device)


def _forward(a: DeformConv2dArgs) -> Array:
    return _kernels(a.device).deform_conv2d_forward(
        a.input, a.offset, a.weight, a.bias, a.mask, a.stride, a.padding, a.dilation
    )


def _backward(grad: Array, a: DeformConv2dArgs, needs: Needs) -> tuple:
    return _kernels(a.device).deform_conv2d_backward(
        grad, a.input, a.offset, a.weight, a.bias, a.mask, a.stride, a.padding, a.dilation,
        tuple(needs),
    )  # fmt: skip


def deform_conv2d_forward(
    input: ArrayLike,
    offset: ArrayLike,
    weight: ArrayLike,
    bias: ArrayLike | None = None,
    stride: IntPair = 1,
    padding: IntPair = 0,
    dilation: IntPair = 1,
    mask: ArrayLike | None = None,
) -> Array:
    """Array-level forward: out (B, Cout, Hout, Wout); see the module docstring."""
    return _forward(prepare(input, offset, weight, bias, stride, padding, dilation, mask))


def deform_conv2d_backward(
    grad_out: ArrayLike,
    input: ArrayLike,
    offset: ArrayLike,
    weight: ArrayLike,
    bias: ArrayLike | None = None,
    stride: IntPair = 1,
    padding: IntPair = 0,
    dilation: IntPair = 1,
    mask: ArrayLike | None = None,
    needs: Needs = (True, True, True, True, True),
) -> tuple[Array | None, Array | None, Array | None, Array | None, Array | None]:
    """Array-level backward: (grad_input, grad_offset, grad_weight, grad_bias, grad_mask).

    ``needs`` has one flag per gradient in that order; unneeded ones are None, as are those of a
    None ``bias`` or ``mask``.
    """
    a = prepare(input, offset, weight, bias, stride, padding, dilation, mask)
    g = grad_array(OP, "grad_out", grad_out, a.input.dtype, a.out_shape, a.device)
    return _backward(g, a, needs_flags(OP, needs, GRADIENTS))


class DeformConv2dFunction(Function):
    """Autograd node of :func:`deform_conv2d`: positional inputs (input, offset, weight, bias,
    mask), ``args`` from :func:`prepare`."""

    supports_cuda = True  # forward/backward dispatch on the arrays' device

    @staticmethod
    def forward(
        ctx: Context,
        input: Array,
        offset: Array,
        weight: Array,
        bias: Array | None,
        mask: Array | None,
        *,
        args: DeformConv2dArgs,
    ) -> Array:
        ctx.save_for_backward(args)
        return _forward(args)

    @staticmethod
    def backward(ctx: Context, grad: Array) -> tuple:
        (args,) = ctx.saved_tensors
        return _backward(contiguous(grad), args, ctx.needs_input_grad[:5])


def deform_conv2d(
    input: TensorLike,
    offset: TensorLike,
    weight: TensorLike,
    bias: TensorLike | None = None,
    stride: IntPair = 1,
    padding: IntPair = 0,
    dilation: IntPair = 1,
    mask: TensorLike | None = None,
) -> Tensor:
    """Deformable convolution (v1; v2 with ``mask``), torchvision's signature and semantics.

    See the module docstring. Takes Tensors or arrays; gradients flow to every input that
    requires grad (input, offset, weight, bias, mask).
    """
    args = prepare(input, offset, weight, bias, stride, padding, dilation, mask)
    return DeformConv2dFunction.apply(input, offset, weight, bias, mask, args=args)
