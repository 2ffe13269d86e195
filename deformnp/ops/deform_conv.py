"""Deformable convolution v1 and v2 (anchor: ``torchvision.ops.deform_conv2d``).

See :doc:`/ops/deform_conv` for the formula and gradients.

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
  x = ox*sw - pw + j*dw + dx, sampled with the zero-fade rule of ``bilinear_interpolate``.
* out[b, co, oy, ox] = bias[co] + sum over the input channels c of co's weight group and over k
  of weight[co, c_local, i, j] * m * sample(input[b, c], y, x).

Gradients flow to input, offset, mask, weight and bias. The offset gradient is the exact
derivative of the zero-fade rule (the right-hand slope at integer coordinates, including the
border line y = -1 / x = -1, as torchvision's; mmcv's is zero there); offsets that are NaN, infinite or huge
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
    """Array-level forward of :func:`deform_conv2d`: plain arrays in, a plain array out.

    Parameters
    ----------
    input : array_like, shape (B, Cin, H, W)
        The input feature map, float32 or float64.
    offset : array_like, shape (B, 2 * G * kh * kw, Hout, Wout)
        Sampling offsets, ``(dy, dx)`` interleaved per kernel point and offset group: channel
        ``2 * (g * kh * kw + k)`` is ``dy`` and the next one ``dx`` of kernel point ``k`` in
        offset group ``g``. The number of offset groups ``G`` is inferred and must divide
        ``Cin``.
    weight : array_like, shape (Cout, Cin // groups, kh, kw)
        Convolution weights; ``groups = Cin // weight.shape[1]`` must divide ``Cin`` and
        ``Cout``.
    bias : array_like, shape (Cout,), optional
        Added to every output position; None for no bias.
    stride : int or (int, int), default 1
        Stride ``(sh, sw)`` of the output positions.
    padding : int or (int, int), default 0
        Implicit zero padding ``(ph, pw)`` on both sides.
    dilation : int or (int, int), default 1
        Spacing ``(dh, dw)`` between kernel points.
    mask : array_like, shape (B, G * kh * kw, Hout, Wout), optional
        Modulation scalars (DCN v2), channel ``g * kh * kw + k`` for kernel point ``k`` of
        offset group ``g``; None means all ones (DCN v1).

    Returns
    -------
    out : ndarray or CUDA device array, shape (B, Cout, Hout, Wout)
        In the inputs' dtype, on their device;
        ``Hout = (H + 2*ph - (dh*(kh - 1) + 1)) // sh + 1``, likewise ``Wout``.

    Raises
    ------
    TypeError
        If a float array is not float32/float64, the float arrays differ in dtype, or ``stride``,
        ``padding`` or ``dilation`` is not an int or a pair of ints.
    ValueError
        If a shape is inconsistent (the messages list the offset channel counts that would work),
        the output would be smaller than 1x1, ``stride`` or ``dilation`` is < 1, ``padding`` < 0, or
        the arrays are on different devices.

    See Also
    --------
    deform_conv2d : The differentiable op.
    deform_conv2d_backward : The matching backward.
    """
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
    """Array-level backward of :func:`deform_conv2d`: the gradients of its five inputs.

    Parameters
    ----------
    grad_out : array_like, shape (B, Cout, Hout, Wout)
        Gradient of the loss with respect to the forward's output, in the inputs' dtype and on
        their device.
    input : array_like, shape (B, Cin, H, W)
        The forward's ``input``.
    offset : array_like, shape (B, 2 * G * kh * kw, Hout, Wout)
        Sampling offsets, ``(dy, dx)`` interleaved per kernel point and offset group: channel
        ``2 * (g * kh * kw + k)`` is ``dy`` and the next one ``dx`` of kernel point ``k`` in
        offset group ``g``. The number of offset groups ``G`` is inferred and must divide
        ``Cin``.
    weight : array_like, shape (Cout, Cin // groups, kh, kw)
        Convolution weights; ``groups = Cin // weight.shape[1]`` must divide ``Cin`` and
        ``Cout``.
    bias : array_like, shape (Cout,), optional
        The forward's ``bias``; here it only tells whether a bias gradient exists.
    stride : int or (int, int), default 1
        Stride ``(sh, sw)`` of the output positions.
    padding : int or (int, int), default 0
        Implicit zero padding ``(ph, pw)`` on both sides.
    dilation : int or (int, int), default 1
        Spacing ``(dh, dw)`` between kernel points.
    mask : array_like, shape (B, G * kh * kw, Hout, Wout), optional
        Modulation scalars (DCN v2), channel ``g * kh * kw + k`` for kernel point ``k`` of
        offset group ``g``; None means all ones (DCN v1).
    needs : sequence of 5 bool, default (True, True, True, True, True)
        Which gradients to compute: ``(input, offset, weight, bias, mask)``.

    Returns
    -------
    grad_input : ndarray or CUDA device array, shape (B, Cin, H, W), or None
    grad_offset : ndarray or CUDA device array, shape (B, 2 * G * kh * kw, Hout, Wout), or None
    grad_weight : ndarray or CUDA device array, shape (Cout, Cin // groups, kh, kw), or None
    grad_bias : ndarray or CUDA device array, shape (Cout,), or None
    grad_mask : ndarray or CUDA device array, shape (B, G * kh * kw, Hout, Wout), or None
        Each gradient is None where its ``needs`` flag is False; ``grad_bias`` and
        ``grad_mask`` are also None when ``bias`` or ``mask`` is None.

    Raises
    ------
    TypeError
        If a float array is not float32/float64, the float arrays differ in dtype, or ``stride``,
        ``padding`` or ``dilation`` is not an int or a pair of ints. Also when ``needs`` is not a
        sequence.
    ValueError
        If a shape is inconsistent (the messages list the offset channel counts that would work),
        the output would be smaller than 1x1, ``stride`` or ``dilation`` is < 1, ``padding`` < 0,
        ``grad_out`` has the wrong shape, ``needs`` does not have 5 flags, or the arrays are on
        different devices.

    See Also
    --------
    deform_conv2d_forward : The matching forward.

    Notes
    -----
    The CPU backward is deterministic: bit-identical gradients on every run and with any number
    of threads. On CUDA the input gradient is scattered with float atomic adds unless
    ``deformnp.use_deterministic_algorithms(True)`` is set.
    """
    a = prepare(input, offset, weight, bias, stride, padding, dilation, mask)
    g = grad_array(OP, "grad_out", grad_out, a.input.dtype, a.out_shape, a.device)
    return _backward(g, a, needs_flags(OP, needs, GRADIENTS))


class DeformConv2dFunction(Function):
    """Autograd node of :func:`deform_conv2d`: positional inputs (input, offset, weight, bias,
    mask), ``args`` from :func:`prepare`."""

    supports_cuda = True  # forward/backward dispatch on the arrays' device
    fresh_grads = True  # backward allocates every gradient it returns

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
    r"""Deformable convolution (v1; v2 with ``mask``), torchvision's signature and semantics.

    The op of ``torchvision.ops.deform_conv2d``: a convolution whose kernel point ``k`` at each
    output position samples the input at a learned offset, bilinearly, optionally scaled by a
    learned mask. Gradients flow to every Tensor input that requires grad (``input``,
    ``offset``, ``weight``, ``bias``, ``mask``).

    Parameters
    ----------
    input : Tensor or array_like, shape (B, Cin, H, W)
        The input feature map, float32 or float64.
    offset : Tensor or array_like, shape (B, 2 * G * kh * kw, Hout, Wout)
        Sampling offsets, ``(dy, dx)`` interleaved per kernel point and offset group: channel
        ``2 * (g * kh * kw + k)`` is ``dy`` and the next one ``dx`` of kernel point ``k`` in
        offset group ``g``. The number of offset groups ``G`` is inferred and must divide
        ``Cin``.
    weight : Tensor or array_like, shape (Cout, Cin // groups, kh, kw)
        Convolution weights; ``groups = Cin // weight.shape[1]`` must divide ``Cin`` and
        ``Cout``.
    bias : Tensor or array_like, shape (Cout,), optional
        Added to every output position; None for no bias.
    stride : int or (int, int), default 1
        Stride ``(sh, sw)`` of the output positions.
    padding : int or (int, int), default 0
        Implicit zero padding ``(ph, pw)`` on both sides.
    dilation : int or (int, int), default 1
        Spacing ``(dh, dw)`` between kernel points.
    mask : Tensor or array_like, shape (B, G * kh * kw, Hout, Wout), optional
        Modulation scalars (DCN v2), channel ``g * kh * kw + k`` for kernel point ``k`` of
        offset group ``g``; None means all ones (DCN v1).

    Returns
    -------
    Tensor, shape (B, Cout, Hout, Wout)
        In the inputs' dtype; ``Hout = (H + 2*ph - (dh*(kh - 1) + 1)) // sh + 1``, likewise
        ``Wout``.

    Raises
    ------
    TypeError
        If a float array is not float32/float64, the float arrays differ in dtype, or ``stride``,
        ``padding`` or ``dilation`` is not an int or a pair of ints.
    ValueError
        If a shape is inconsistent (the messages list the offset channel counts that would work),
        the output would be smaller than 1x1, ``stride`` or ``dilation`` is < 1, ``padding`` < 0, or
        the arrays are on different devices.

    See Also
    --------
    deformnp.nn.DeformConv2d : The layer.
    deform_conv2d_forward, deform_conv2d_backward : The array-level pair.

    Notes
    -----
    With ``K = kh*kw`` kernel points ``k = i*kw + j`` (row-major), input channel ``c`` in offset
    group :math:`g` and :math:`\Delta y, \Delta x, m` read at ``(oy, ox)`` from channels
    ``2*(g*K + k)``, ``2*(g*K + k) + 1`` of ``offset`` and ``g*K + k`` of ``mask``:

    .. math::

        \mathrm{out}[b, o, o_y, o_x] = \mathrm{bias}[o] + \sum_{c, k} w[o, c, i, j]\; m\;
        x_c(o_y s_h - p_h + i\,d_h + \Delta y,\; o_x s_w - p_w + j\,d_w + \Delta x),

    the sum over the input channels ``c`` of output channel ``o``'s weight group, each sampled
    with the zero-fade rule of :func:`bilinear_interpolate`. The offset gradient is the exact
    derivative of that rule (the right-hand slope at integer coordinates, including the border
    line -1, as torchvision's; mmcv's is zero there); NaN, infinite or huge offsets sample 0 and get zero
    gradient. Any batch size works, including 0 (no ``im2col_step`` divisibility rule). See
    :doc:`/ops/deform_conv` for the formula and gradients.

    Examples
    --------
    With zero offsets and no mask, a deformable convolution is a plain convolution:

    >>> import numpy as np
    >>> from deformnp.ops import deform_conv2d
    >>> x = np.ones((1, 2, 5, 5))
    >>> w = np.ones((4, 2, 3, 3))
    >>> offset = np.zeros((1, 2 * 3 * 3, 3, 3))  # one offset group, output 3x3
    >>> out = deform_conv2d(x, offset, w)
    >>> out.shape
    (1, 4, 3, 3)
    >>> float(out.numpy()[0, 0, 0, 0])
    18.0
    """
    args = prepare(input, offset, weight, bias, stride, padding, dilation, mask)
    return DeformConv2dFunction.apply(input, offset, weight, bias, mask, args=args)
