"""DCNv4 and FlashDeformAttn (anchor: OpenGVLab/DCNv4, ``DCNv4_op``).

``dcnv4(input, offset_mask, kernel_h, kernel_w, stride_h, stride_w, pad_h, pad_w, dilation_h,
dilation_w, group, group_channels, offset_scale, im2col_step, remove_center)`` is the op of
``DCNv4Function.apply`` with its argument order and semantics:

* input (B, H, W, G*D) channels-last, G = ``group`` groups of D = ``group_channels`` channels;
* offset_mask (B, Ho, Wo, Cp), Cp >= G*K*3 with K = kernel_h*kernel_w - remove_center points:
  per group g the block ``[g*3K, (g+1)*3K)`` holds the offsets (dx, dy) of the K points,
  interleaved, then their K mask values (used as given: DCNv4 applies no softmax). The anchor's
  module pads Cp to a multiple of 8; extra columns are ignored (gradient 0). Any Cp >= G*K*3 is
  accepted;
* Ho = (H + 2*pad_h - (dilation_h*(kernel_h - 1) + 1)) // stride_h + 1, likewise Wo;
* point k walks the window column by column (i < kernel_w outside, j < kernel_h inside),
  skipping the centre (i, j) = (kernel_w // 2, kernel_h // 2) when ``remove_center``; it samples
  at, with c = (dilation*(kernel - 1)) >> 1 per axis and s = ``offset_scale``,
  ``x = wo*stride_w - pad_w + c_w + (i*dilation_w - c_w + dx)*s`` (likewise y), zero-fade rule;
* out (B, Ho, Wo, G*D): ``out[b, ho, wo, g*D + d] = sum_k mask_k * sample_k(input[b, :, :, g*D + d])``.

``flash_deform_attn(value, value_spatial_shapes, value_level_start_index, sampling_loc_attn,
im2col_step=64, K=8)`` is ``FlashDeformAttnFunction.apply``: value (N, S, G, D),
``sampling_loc_attn`` (N, Lq, G, 3*L*K): per query and head the L*K normalized locations (x, y)
(level-major, then point), then L*K attention logits, which the op softmaxes over all L*K; output
(N, Lq, G*D). That is exactly ``ms_deform_attn`` of the unpacked locations and the softmaxed
logits, and it is computed that way (the ms_deform_attn kernels on both devices).

Gradients flow to input / value and to offset_mask / sampling_loc_attn. Differences from the
anchor, all deliberate: any batch size (``im2col_step`` is checked to be a positive int and
ignored), any K (the anchor's kernels take K = 8 or 9 only, and its FlashDeformAttn a few
L*K), any D, float32 and float64 (no float16), 64-bit index arithmetic; the anchor's launch-tuning
arguments do not exist. The CPU backward is deterministic; on CUDA the input/value gradients use
float atomic adds unless ``deformnp.use_deterministic_algorithms(True)`` is set.

The array-level pairs, for wrapping in other frameworks::

    out = dcnv4_forward(input, offset_mask, kh, kw, sh, sw, ph, pw, dh, dw, group,
                        group_channels, offset_scale, im2col_step, remove_center)
    grad_input, grad_offset_mask = dcnv4_backward(grad_out, input, offset_mask, kh, kw, sh, sw,
        ph, pw, dh, dw, group, group_channels, offset_scale, im2col_step, remove_center,
        needs=(True, True))
    out = flash_deform_attn_forward(value, shapes, starts, sampling_loc_attn, im2col_step, K)
    grad_value, grad_sampling_loc_attn = flash_deform_attn_backward(grad_out, value, shapes,
        starts, sampling_loc_attn, im2col_step, K, needs=(True, True))
"""

from __future__ import annotations

from dataclasses import dataclass
from types import ModuleType
from typing import Any

import numpy as np

from ..function import Context, Function
from ..kernels.cpu import attention as cpu_attention
from ..kernels.cpu import dcnv4 as cpu_kernels
from ..tensor import Tensor, unwrap
from ..typing import Array, ArrayLike, Needs, TensorLike
from ..validation import (
    check_ndim,
    contiguous,
    device_of,
    float_array,
    grad_array,
    index_array,
    integer,
    needs_flags,
    real,
    same_dtype,
)

__all__ = [
    "dcnv4",
    "dcnv4_forward",
    "dcnv4_backward",
    "DCNv4Function",
    "flash_deform_attn",
    "flash_deform_attn_forward",
    "flash_deform_attn_backward",
    "FlashDeformAttnFunction",
]

OP = "dcnv4"
FLASH = "flash_deform_attn"
GRADIENTS = ("input", "offset_mask")
FLASH_GRADIENTS = ("value", "sampling_loc_attn")


def _kernels(device: str) -> ModuleType:
    """The CPU kernels, or the CUDA ones (imported on first use: numba-cuda is optional)."""
    if device == "cuda":
        from ..kernels.cuda import dcnv4 as cuda_kernels

        return cuda_kernels
    return cpu_kernels


# ---------------------------------------------------------------------------------------------
# dcnv4
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class DCNv4Args:
    """The checked arguments of one dcnv4 call."""

    input: Array
    offset_mask: Array
    params: tuple  # (kh, kw, sh, sw, ph, pw, dh, dw, group, group_channels, offset_scale, rc)
    device: str

    @property
    def out_shape(self) -> tuple[int, int, int, int]:
        B, _, _, C = self.input.shape
        return (B, int(self.offset_mask.shape[1]), int(self.offset_mask.shape[2]), int(C))


def prepare(
    input: TensorLike,
    offset_mask: TensorLike,
    kernel_h: int,
    kernel_w: int,
    stride_h: int,
    stride_w: int,
    pad_h: int,
    pad_w: int,
    dilation_h: int,
    dilation_w: int,
    group: int,
    group_channels: int,
    offset_scale: float,
    im2col_step: int,
    remove_center: Any,
) -> DCNv4Args:
    """Validate the arguments of :func:`dcnv4` (once, for every entry point)."""
    x, om = unwrap(input), unwrap(offset_mask)
    device = device_of(OP, input=x, offset_mask=om)
    x = float_array(OP, "input", x)
    om = float_array(OP, "offset_mask", om)
    same_dtype(OP, input=x, offset_mask=om)
    kh = integer(OP, "kernel_h", kernel_h, 1)
    kw = integer(OP, "kernel_w", kernel_w, 1)
    sh = integer(OP, "stride_h", stride_h, 1)
    sw = integer(OP, "stride_w", stride_w, 1)
    ph = integer(OP, "pad_h", pad_h, 0)
    pw = integer(OP, "pad_w", pad_w, 0)
    dh = integer(OP, "dilation_h", dilation_h, 1)
    dw = integer(OP, "dilation_w", dilation_w, 1)
    G = integer(OP, "group", group, 1)
    D = integer(OP, "group_channels", group_channels, 1)
    scale = real(OP, "offset_scale", offset_scale)
    integer(OP, "im2col_step", im2col_step, 1)
    if isinstance(remove_center, (bool, np.bool_)):
        rc = int(remove_center)
    else:
        rc = integer(OP, "remove_center", remove_center, 0, 1)
    check_ndim(OP, "input", x, 4, "(B, H, W, group*group_channels)")
    check_ndim(OP, "offset_mask", om, 4, "(B, Ho, Wo, >= group*K*3)")
    B, H, W, C = (int(s) for s in x.shape)
    if C != G * D:
        raise ValueError(
            f"{OP}: input has {C} channels, expected group*group_channels = {G}*{D} = {G * D}"
        )
    Ho = (H + 2 * ph - (dh * (kh - 1) + 1)) // sh + 1
    Wo = (W + 2 * pw - (dw * (kw - 1) + 1)) // sw + 1
    if Ho < 1 or Wo < 1:
        raise ValueError(
            f"{OP}: the output would be empty ({Ho} x {Wo}): input {H} x {W} with padding "
            f"({ph}, {pw}) is smaller than the dilated kernel "
            f"({dh * (kh - 1) + 1} x {dw * (kw - 1) + 1})"
        )
    K = kh * kw - rc
    need = G * K * 3
    if tuple(int(s) for s in om.shape[:3]) != (B, Ho, Wo):
        raise ValueError(
            f"{OP}: offset_mask has shape {tuple(om.shape)}, expected (B, Ho, Wo, Cp) = "
            f"({B}, {Ho}, {Wo}, >= {need})"
        )
    if int(om.shape[3]) < need:
        raise ValueError(
            f"{OP}: offset_mask has {int(om.shape[3])} channels, expected at least "
            f"group*K*3 = {G}*{K}*3 = {need} (K = kernel_h*kernel_w - remove_center)"
        )
    return DCNv4Args(x, om, (kh, kw, sh, sw, ph, pw, dh, dw, G, D, scale, rc), device)


def _forward(a: DCNv4Args) -> Array:
    return _kernels(a.device).dcnv4_forward(a.input, a.offset_mask, *a.params)


def _backward(grad: Array, a: DCNv4Args, needs: Needs) -> tuple:
    return _kernels(a.device).dcnv4_backward(grad, a.input, a.offset_mask, *a.params, tuple(needs))


def dcnv4_forward(
    input: ArrayLike,
    offset_mask: ArrayLike,
    kernel_h: int,
    kernel_w: int,
    stride_h: int,
    stride_w: int,
    pad_h: int,
    pad_w: int,
    dilation_h: int,
    dilation_w: int,
    group: int,
    group_channels: int,
    offset_scale: float = 1.0,
    im2col_step: int = 256,
    remove_center: bool | int = False,
) -> Array:
    """Array-level forward of :func:`dcnv4`: plain arrays in, a plain array out.

    Parameters
    ----------
    input : array_like, shape (B, H, W, G*D)
        The input, channels-last.
    offset_mask : array_like, shape (B, Ho, Wo, Cp)
        Per group g, columns ``[g*3K, (g+1)*3K)``: K offsets (dx, dy), then K masks; Cp >= G*K*3.
    kernel_h, kernel_w : int
        The kernel size (>= 1 each).
    stride_h, stride_w : int
        The stride (>= 1).
    pad_h, pad_w : int
        The zero padding (>= 0).
    dilation_h, dilation_w : int
        The dilation (>= 1).
    group : int
        The number of groups G (>= 1).
    group_channels : int
        Channels per group D (>= 1); the input has G*D channels.
    offset_scale : float, default 1.0
        The scale s of the offsets (and of the window around its centre).
    im2col_step : int, default 256
        The anchor's batch chunk size; checked to be a positive int and ignored.
    remove_center : bool or int, default False
        Whether the window's centre point is skipped (K = kernel_h*kernel_w - 1).

    Returns
    -------
    out : ndarray or CUDA device array, shape (B, Ho, Wo, G*D)
        In the inputs' dtype, on their device.

    Raises
    ------
    TypeError
        If an array is not float32/float64, the two differ in dtype, or an integer argument is
        not an int (``offset_scale`` not a real number).
    ValueError
        If an integer argument is out of range, the shapes are inconsistent, the output would be
        empty, ``offset_scale`` is not finite, or the arrays are on different devices.

    See Also
    --------
    dcnv4 : The differentiable op.
    dcnv4_backward : The matching backward.
    """
    return _forward(
        prepare(input, offset_mask, kernel_h, kernel_w, stride_h, stride_w, pad_h, pad_w,
                dilation_h, dilation_w, group, group_channels, offset_scale, im2col_step,
                remove_center)
    )  # fmt: skip


def dcnv4_backward(
    grad_out: ArrayLike,
    input: ArrayLike,
    offset_mask: ArrayLike,
    kernel_h: int,
    kernel_w: int,
    stride_h: int,
    stride_w: int,
    pad_h: int,
    pad_w: int,
    dilation_h: int,
    dilation_w: int,
    group: int,
    group_channels: int,
    offset_scale: float = 1.0,
    im2col_step: int = 256,
    remove_center: bool | int = False,
    needs: Needs = (True, True),
) -> tuple[Array | None, Array | None]:
    """Array-level backward of :func:`dcnv4`: the gradients of input and offset_mask.

    Parameters
    ----------
    grad_out : array_like, shape (B, Ho, Wo, G*D)
        Gradient of the loss with respect to the forward's output.
    input : array_like, shape (B, H, W, G*D)
        The forward's input.
    offset_mask : array_like, shape (B, Ho, Wo, Cp)
        The forward's offset_mask.
    kernel_h, kernel_w : int
        The kernel size (>= 1 each).
    stride_h, stride_w : int
        The stride (>= 1).
    pad_h, pad_w : int
        The zero padding (>= 0).
    dilation_h, dilation_w : int
        The dilation (>= 1).
    group : int
        The number of groups G (>= 1).
    group_channels : int
        Channels per group D (>= 1); the input has G*D channels.
    offset_scale : float, default 1.0
        The scale s of the offsets (and of the window around its centre).
    im2col_step : int, default 256
        The anchor's batch chunk size; checked to be a positive int and ignored.
    remove_center : bool or int, default False
        Whether the window's centre point is skipped (K = kernel_h*kernel_w - 1).
    needs : sequence of 2 bool, default (True, True)
        Which gradients to compute: ``(input, offset_mask)``.

    Returns
    -------
    grad_input : ndarray or CUDA device array, shape (B, H, W, G*D), or None
    grad_offset_mask : ndarray or CUDA device array, shape (B, Ho, Wo, Cp), or None
        Each in the inputs' dtype, or None where its ``needs`` flag is False; the padding
        columns of ``grad_offset_mask`` are 0.

    Raises
    ------
    TypeError
        As :func:`dcnv4_forward`, and when ``needs`` is not a sequence.
    ValueError
        As :func:`dcnv4_forward`, and when ``grad_out`` has the wrong shape or ``needs`` does
        not have 2 flags.

    See Also
    --------
    dcnv4_forward : The matching forward.

    Notes
    -----
    CPU gradients are bit-identical on every run and with any number of threads; on CUDA the
    input gradient is too when ``deformnp.use_deterministic_algorithms(True)`` is set.
    """
    a = prepare(input, offset_mask, kernel_h, kernel_w, stride_h, stride_w, pad_h, pad_w,
                dilation_h, dilation_w, group, group_channels, offset_scale, im2col_step,
                remove_center)  # fmt: skip
    g = grad_array(OP, "grad_out", grad_out, a.input.dtype, a.out_shape, a.device, "input",
                   "(B, Ho, Wo, G*D)")  # fmt: skip
    return _backward(g, a, needs_flags(OP, needs, GRADIENTS))


class DCNv4Function(Function):
    """Autograd node of :func:`dcnv4`: positional inputs (input, offset_mask), ``args`` from
    :func:`prepare`."""

    supports_cuda = True  # forward/backward dispatch on the arrays' device
    fresh_grads = True  # backward allocates every gradient it returns

    @staticmethod
    def forward(ctx: Context, input: Array, offset_mask: Array, *, args: DCNv4Args) -> Array:
        ctx.save_for_backward(args)
        return _forward(args)

    @staticmethod
    def backward(ctx: Context, grad: Array) -> tuple:
        (args,) = ctx.saved_tensors
        return _backward(contiguous(grad), args, ctx.needs_input_grad[:2])


def dcnv4(
    input: TensorLike,
    offset_mask: TensorLike,
    kernel_h: int,
    kernel_w: int,
    stride_h: int,
    stride_w: int,
    pad_h: int,
    pad_w: int,
    dilation_h: int,
    dilation_w: int,
    group: int,
    group_channels: int,
    offset_scale: float = 1.0,
    im2col_step: int = 256,
    remove_center: bool | int = False,
) -> Tensor:
    r"""Deformable convolution v4's core op (``DCNv4Function``), the anchor's argument order.

    A depthwise deformable aggregation over a channels-last map: every output position and
    group sums K bilinear samples of the group's channels, each at a learned offset and
    weighted by an unnormalised learned mask. Gradients flow to ``input`` and ``offset_mask``
    when they are Tensors that require grad.

    Parameters
    ----------
    input : Tensor or array_like, shape (B, H, W, G*D)
        The input, channels-last.
    offset_mask : Tensor or array_like, shape (B, Ho, Wo, Cp)
        Per group g, columns ``[g*3K, (g+1)*3K)``: the K offsets (dx, dy) interleaved, then the
        K masks; Cp >= G*K*3 (padding columns are ignored).
    kernel_h, kernel_w : int
        The kernel size (>= 1 each).
    stride_h, stride_w : int
        The stride (>= 1).
    pad_h, pad_w : int
        The zero padding (>= 0).
    dilation_h, dilation_w : int
        The dilation (>= 1).
    group : int
        The number of groups G (>= 1).
    group_channels : int
        Channels per group D (>= 1); the input has G*D channels.
    offset_scale : float, default 1.0
        The scale s of the offsets (and of the window around its centre).
    im2col_step : int, default 256
        The anchor's batch chunk size; checked to be a positive int and ignored (any batch size
        works).
    remove_center : bool or int, default False
        Whether the window's centre point is skipped (K = kernel_h*kernel_w - 1).

    Returns
    -------
    Tensor, shape (B, Ho, Wo, G*D)
        ``Ho = (H + 2*pad_h - (dilation_h*(kernel_h - 1) + 1)) // stride_h + 1``, likewise Wo.

    Raises
    ------
    TypeError
        If an array is not float32/float64, the two differ in dtype, or an integer argument is
        not an int (``offset_scale`` not a real number).
    ValueError
        If an integer argument is out of range, the shapes are inconsistent, the output would be
        empty, ``offset_scale`` is not finite, or the arrays are on different devices.

    See Also
    --------
    dcnv4_forward, dcnv4_backward : The array-level pair.
    flash_deform_attn : DCNv4's multi-scale attention op.

    Notes
    -----
    With :math:`c_w = \lfloor d_w (k_w - 1) / 2 \rfloor`, :math:`s` = ``offset_scale`` and the
    window points :math:`(i, j)`, :math:`i < k_w` outer, :math:`j < k_h` inner (the centre
    skipped with ``remove_center``), numbered :math:`k`,

    .. math::

        x_k = w_o s_w - p_w + c_w + (i d_w - c_w + \Delta x_{g,k}) s, \quad
        y_k = h_o s_h - p_h + c_h + (j d_h - c_h + \Delta y_{g,k}) s,

        \mathrm{out}[b, h_o, w_o, gD + d] = \sum_k m_{g,k}\,
        \mathrm{input}[b, \cdot, \cdot, gD + d](y_k, x_k),

    each sample taken with the zero-fade rule of :func:`bilinear_interpolate`; the offsets
    :math:`(\Delta x, \Delta y)` and masks :math:`m` are read from
    ``offset_mask[b, h_o, w_o, g*3K:(g+1)*3K]``. The offset gradient is the exact derivative of
    the rule (the right-hand slope at integer coordinates).

    Examples
    --------
    Zero offsets and masks of one: a 3x3 box sum of each channel, zero padded:

    >>> import numpy as np
    >>> from deformnp.ops.dcnv4 import dcnv4
    >>> x = np.ones((1, 4, 4, 8))
    >>> om = np.zeros((1, 4, 4, 32))
    >>> om[..., 18:27] = 1.0
    >>> out = dcnv4(x, om, 3, 3, 1, 1, 1, 1, 1, 1, 1, 8, 1.0, 256, False)
    >>> out.shape
    (1, 4, 4, 8)
    >>> float(out.numpy()[0, 1, 1, 0]), float(out.numpy()[0, 0, 0, 0])
    (9.0, 4.0)
    """
    args = prepare(input, offset_mask, kernel_h, kernel_w, stride_h, stride_w, pad_h, pad_w,
                   dilation_h, dilation_w, group, group_channels, offset_scale, im2col_step,
                   remove_center)  # fmt: skip
    return DCNv4Function.apply(input, offset_mask, args=args)


# ---------------------------------------------------------------------------------------------
# flash_deform_attn
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class FlashDeformAttnArgs:
    """The checked arguments of one flash_deform_attn call (level arrays as host int64)."""

    value: Array
    spatial_shapes: np.ndarray
    level_start_index: np.ndarray
    sampling_loc_attn: Array
    K: int
    device: str

    @property
    def out_shape(self) -> tuple[int, int, int]:
        N, _, G, D = self.value.shape
        return (int(N), int(self.sampling_loc_attn.shape[1]), int(G * D))


def prepare_flash(
    value: TensorLike,
    value_spatial_shapes: ArrayLike,
    value_level_start_index: ArrayLike,
    sampling_loc_attn: TensorLike,
    im2col_step: int,
    K: int,
) -> FlashDeformAttnArgs:
    """Validate the arguments of :func:`flash_deform_attn` (once, for every entry point)."""
    v, sla = unwrap(value), unwrap(sampling_loc_attn)
    device = device_of(FLASH, value=v, sampling_loc_attn=sla)
    v = float_array(FLASH, "value", v)
    sla = float_array(FLASH, "sampling_loc_attn", sla)
    same_dtype(FLASH, value=v, sampling_loc_attn=sla)
    integer(FLASH, "im2col_step", im2col_step, 1)
    K = integer(FLASH, "K", K, 1)
    shapes = index_array(FLASH, "value_spatial_shapes", unwrap(value_spatial_shapes))
    starts = index_array(FLASH, "value_level_start_index", unwrap(value_level_start_index))
    check_ndim(FLASH, "value", v, 4, "(N, S, G, D)")
    check_ndim(FLASH, "sampling_loc_attn", sla, 4, "(N, Lq, G, 3*L*K)")
    check_ndim(FLASH, "value_spatial_shapes", shapes, 2, "(L, 2)")
    check_ndim(FLASH, "value_level_start_index", starts, 1, "(L,)")
    N, S, G, D = (int(s) for s in v.shape)
    L = int(shapes.shape[0])
    if shapes.shape[1] != 2:
        raise ValueError(
            f"{FLASH}: value_spatial_shapes must be (L, 2) rows (H_l, W_l), got shape "
            f"{shapes.shape}"
        )
    if np.any(shapes < 0):
        raise ValueError(
            f"{FLASH}: value_spatial_shapes must be non-negative, got {shapes.tolist()}"
        )
    if starts.shape[0] != L:
        raise ValueError(
            f"{FLASH}: value_level_start_index has {starts.shape[0]} entries, expected one per "
            f"level of value_spatial_shapes (L = {L})"
        )
    expected, total = [], 0
    for h, w in shapes.tolist():  # Python's exact integers: no 64-bit wrap-around
        expected.append(total)
        total += h * w
    if starts.tolist() != expected:
        raise ValueError(
            f"{FLASH}: value_level_start_index {starts.tolist()} is inconsistent with "
            f"value_spatial_shapes, expected the cumulative sizes {expected}"
        )
    if total != S:
        raise ValueError(
            f"{FLASH}: value has S = {S} positions, but value_spatial_shapes give "
            f"sum(H_l*W_l) = {total}"
        )
    Lq = int(sla.shape[1])
    if tuple(int(s) for s in sla.shape) != (N, Lq, G, 3 * L * K):
        raise ValueError(
            f"{FLASH}: sampling_loc_attn has shape {tuple(sla.shape)}, expected "
            f"(N, Lq, G, 3*L*K) with N = {N}, G = {G} (from value), L = {L} and K = {K}: "
            f"last dimension {3 * L * K}"
        )
    if device == "cpu" and D > cpu_attention.MAX_CHANNELS:
        raise ValueError(
            f"{FLASH}: value has D = {D} channels per head; the CPU kernels support at most "
            f"{cpu_attention.MAX_CHANNELS}"
        )
    return FlashDeformAttnArgs(v, shapes, starts, sla, K, device)


def _flash_forward(a: FlashDeformAttnArgs, cache: dict | None = None) -> Array:
    return _kernels(a.device).flash_deform_attn_forward(
        a.value, a.spatial_shapes, a.level_start_index, a.sampling_loc_attn, a.K, cache
    )


def _flash_backward(
    grad: Array, a: FlashDeformAttnArgs, needs: Needs, cache: dict | None = None
) -> tuple:
    return _kernels(a.device).flash_deform_attn_backward(
        grad, a.value, a.spatial_shapes, a.level_start_index, a.sampling_loc_attn, a.K,
        tuple(needs), cache,
    )  # fmt: skip


def flash_deform_attn_forward(
    value: ArrayLike,
    value_spatial_shapes: ArrayLike,
    value_level_start_index: ArrayLike,
    sampling_loc_attn: ArrayLike,
    im2col_step: int = 64,
    K: int = 8,
) -> Array:
    """Array-level forward of :func:`flash_deform_attn`: plain arrays in, a plain array out.

    Parameters
    ----------
    value : array_like, shape (N, S, G, D)
        The values of G heads over ``S = sum_l H_l*W_l`` flattened positions.
    value_spatial_shapes : array_like of int, shape (L, 2)
        Rows ``(H_l, W_l)``; int32 or int64, read on the host.
    value_level_start_index : array_like of int, shape (L,)
        The exclusive cumulative sum of ``H_l*W_l``; int32 or int64.
    sampling_loc_attn : array_like, shape (N, Lq, G, 3*L*K)
        Per query and head: L*K normalized locations (x, y), level-major, then L*K logits.
    im2col_step : int, default 64
        The anchor's batch chunk size; checked to be a positive int and ignored.
    K : int, default 8
        Sampling points per level and head.

    Returns
    -------
    out : ndarray or CUDA device array, shape (N, Lq, G*D)
        In the inputs' dtype, on their device.

    Raises
    ------
    TypeError
        If a float array is not float32/float64, the two differ in dtype, the level arrays are
        not int32/int64, or ``im2col_step`` / ``K`` is not an int.
    ValueError
        If ``im2col_step`` or ``K`` is < 1, a shape is inconsistent, the level arrays disagree
        with each other or with ``value``, ``D`` exceeds 4096 on the CPU, or the arrays are on
        different devices.

    See Also
    --------
    flash_deform_attn : The differentiable op.
    flash_deform_attn_backward : The matching backward.
    """
    return _flash_forward(
        prepare_flash(value, value_spatial_shapes, value_level_start_index, sampling_loc_attn,
                      im2col_step, K)
    )  # fmt: skip


def flash_deform_attn_backward(
    grad_out: ArrayLike,
    value: ArrayLike,
    value_spatial_shapes: ArrayLike,
    value_level_start_index: ArrayLike,
    sampling_loc_attn: ArrayLike,
    im2col_step: int = 64,
    K: int = 8,
    needs: Needs = (True, True),
) -> tuple[Array | None, Array | None]:
    """Array-level backward of :func:`flash_deform_attn`: the gradients of value and
    sampling_loc_attn.

    Parameters
    ----------
    grad_out : array_like, shape (N, Lq, G*D)
        Gradient of the loss with respect to the forward's output.
    value : array_like, shape (N, S, G, D)
        The forward's value.
    value_spatial_shapes : array_like of int, shape (L, 2)
        Rows ``(H_l, W_l)``; int32 or int64, read on the host.
    value_level_start_index : array_like of int, shape (L,)
        The exclusive cumulative sum of ``H_l*W_l``; int32 or int64.
    sampling_loc_attn : array_like, shape (N, Lq, G, 3*L*K)
        The forward's packed locations and logits.
    im2col_step : int, default 64
        The anchor's batch chunk size; checked to be a positive int and ignored.
    K : int, default 8
        Sampling points per level and head.
    needs : sequence of 2 bool, default (True, True)
        Which gradients to compute: ``(value, sampling_loc_attn)``.

    Returns
    -------
    grad_value : ndarray or CUDA device array, shape (N, S, G, D), or None
    grad_sampling_loc_attn : ndarray or CUDA device array, shape (N, Lq, G, 3*L*K), or None
        Each in the inputs' dtype, or None where its ``needs`` flag is False; the logits'
        gradient is taken through the softmax.

    Raises
    ------
    TypeError
        As :func:`flash_deform_attn_forward`, and when ``needs`` is not a sequence.
    ValueError
        As :func:`flash_deform_attn_forward`, and when ``grad_out`` has the wrong shape or
        ``needs`` does not have 2 flags.

    See Also
    --------
    flash_deform_attn_forward : The matching forward.

    Notes
    -----
    CPU gradients are bit-identical on every run and with any number of threads; on CUDA the
    value gradient is too when ``deformnp.use_deterministic_algorithms(True)`` is set.
    """
    a = prepare_flash(value, value_spatial_shapes, value_level_start_index, sampling_loc_attn,
                      im2col_step, K)  # fmt: skip
    g = grad_array(FLASH, "grad_out", grad_out, a.value.dtype, a.out_shape, a.device, "value",
                   "(N, Lq, G*D)")  # fmt: skip
    return _flash_backward(g, a, needs_flags(FLASH, needs, FLASH_GRADIENTS))


class FlashDeformAttnFunction(Function):
    """Autograd node of :func:`flash_deform_attn`: positional inputs (value, sampling_loc_attn),
    ``args`` from :func:`prepare_flash`. Forward and backward share a ``cache`` (the unpacked
    locations and softmaxed weights, and the attention kernels' entries)."""

    supports_cuda = True  # forward/backward dispatch on the arrays' device
    fresh_grads = True  # backward allocates every gradient it returns

    @staticmethod
    def forward(
        ctx: Context, value: Array, sampling_loc_attn: Array, *, args: FlashDeformAttnArgs
    ) -> Array:
        ctx.save_for_backward(args)
        ctx.cache = {}
        return _flash_forward(args, ctx.cache)

    @staticmethod
    def backward(ctx: Context, grad: Array) -> tuple:
        (args,) = ctx.saved_tensors
        return _flash_backward(contiguous(grad), args, ctx.needs_input_grad[:2], ctx.cache)


def flash_deform_attn(
    value: TensorLike,
    value_spatial_shapes: ArrayLike,
    value_level_start_index: ArrayLike,
    sampling_loc_attn: TensorLike,
    im2col_step: int = 64,
    K: int = 8,
) -> Tensor:
    r"""DCNv4's FlashDeformAttn core op (``FlashDeformAttnFunction``): multi-scale deformable
    attention with packed locations and logits, softmaxed inside.

    Gradients flow to ``value`` and ``sampling_loc_attn`` when they are Tensors that require
    grad.

    Parameters
    ----------
    value : Tensor or array_like, shape (N, S, G, D)
        The values of G heads over ``S = sum_l H_l*W_l`` flattened positions; level ``l``
        occupies rows ``value_level_start_index[l]`` onwards, row-major.
    value_spatial_shapes : array_like of int, shape (L, 2)
        Rows ``(H_l, W_l)``; int32 or int64, read on the host.
    value_level_start_index : array_like of int, shape (L,)
        The exclusive cumulative sum of ``H_l*W_l`` (anything else is rejected).
    sampling_loc_attn : Tensor or array_like, shape (N, Lq, G, 3*L*K)
        Per query and head: the L*K normalized locations (x, y), level-major then point
        (``(0, 0)`` the top-left corner of the map, ``(1, 1)`` the bottom-right one; any real
        value, NaN and inf sample 0), then the L*K attention logits.
    im2col_step : int, default 64
        The anchor's batch chunk size; checked to be a positive int and ignored.
    K : int, default 8
        Sampling points per level and head (the anchor's ``K``, its module's ``n_points``).

    Returns
    -------
    Tensor, shape (N, Lq, G*D)
        Head ``g`` fills channels ``g*D`` to ``g*D + D - 1``.

    Raises
    ------
    TypeError
        If a float array is not float32/float64, the two differ in dtype, the level arrays are
        not int32/int64, or ``im2col_step`` / ``K`` is not an int.
    ValueError
        If ``im2col_step`` or ``K`` is < 1, a shape is inconsistent, the level arrays disagree
        with each other or with ``value``, ``D`` exceeds 4096 on the CPU, or the arrays are on
        different devices.

    See Also
    --------
    ms_deform_attn : The op it computes after the softmax.
    dcnv4 : DCNv4's convolution op.

    Notes
    -----
    With the locations :math:`(u, v)_{g,l,k}` and logits :math:`z_{g,l,k}` read from
    ``sampling_loc_attn[n, q, g]``,

    .. math::

        A_{g,l,k} = \frac{\exp(z_{g,l,k} - \max z_g)}{\sum_{l',k'} \exp(z_{g,l',k'} - \max z_g)},
        \qquad
        \mathrm{out}[n, q, gD + d] = \sum_{l,k} A_{g,l,k}\,
        V_l[n, \cdot, \cdot, g, d]\big(y = v H_l - 0.5,\; x = u W_l - 0.5\big),

    i.e. exactly :func:`ms_deform_attn` of the unpacked locations and the softmaxed weights,
    which is how it is computed (the ms_deform_attn kernels, on both devices). The logits'
    gradient is :math:`A_i g_i - A_i \sum_j A_j g_j`, with :math:`g` the weights' gradient.

    Examples
    --------
    One level, all logits equal, every point at the centre of a map of ones:

    >>> import numpy as np
    >>> from deformnp.ops.dcnv4 import flash_deform_attn
    >>> N, Lq, G, D, K = 1, 2, 2, 4, 3
    >>> value = np.ones((N, 16, G, D))
    >>> sla = np.zeros((N, Lq, G, 3 * K))
    >>> sla[..., : 2 * K] = 0.5
    >>> out = flash_deform_attn(value, np.array([[4, 4]]), np.array([0]), sla, 64, K)
    >>> out.shape
    (1, 2, 8)
    >>> round(float(out.numpy()[0, 0, 0]), 12)
    1.0
    """
    args = prepare_flash(value, value_spatial_shapes, value_level_start_index,
                         sampling_loc_attn, im2col_step, K)  # fmt: skip
    return FlashDeformAttnFunction.apply(value, sampling_loc_attn, args=args)
