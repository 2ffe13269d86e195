"""DCNv3, the deformable sampling core of InternImage (anchor: ``dcnv3_core_pytorch`` of
InternImage's ``ops_dcnv3/functions/dcnv3_func.py``, and its CUDA op ``DCNv3Function``).

``dcnv3(input, offset, mask, kernel_h, kernel_w, stride_h, stride_w, pad_h, pad_w, dilation_h,
dilation_w, group, group_channels, offset_scale, remove_center)`` takes the anchor's arguments in
its order, with its layouts (channels-last):

* input (N, H, W, C), C = group * group_channels;
* offset (N, Ho, Wo, group*P*2): per group and point an (x, y) pair, in pixels;
* mask (N, Ho, Wo, group*P): the weight of each sample, used as given (InternImage applies the
  softmax over the points in its layer);
* P = kernel_h*kernel_w - remove_center (``remove_center`` drops the kernel's centre point; only
  for a square kernel of odd size, as in the anchor);
* output (N, Ho, Wo, C).

The input is zero-padded as the anchor's ``F.pad(input, [0, 0, pad_h, pad_h, pad_w, pad_w])``
does it: that call pads the *columns* (W) by ``pad_h`` and the *rows* (H) by ``pad_w``, so

    Ho = (H + 2*pad_w - (dilation_h*(kernel_h - 1) + 1)) // stride_h + 1
    Wo = (W + 2*pad_h - (dilation_w*(kernel_w - 1) + 1)) // stride_w + 1

(InternImage's layers always pass pad_h = pad_w; its CUDA extension pads rows by pad_h, so the two
anchors differ when pad_h != pad_w: deformnp follows ``dcnv3_core_pytorch``). Kernel points are
numbered column by column, k = j*kernel_h + i (column j, row i), as the anchor's meshgrid does,
and the centre k = (kernel_h*kernel_w - 1) // 2 is skipped when ``remove_center``. With
hy = (dilation_h*(kernel_h-1)) // 2, hx = (dilation_w*(kernel_w-1)) // 2, s = offset_scale and
(dx, dy) the point's offset, the point is sampled in the padded input at the pixel coordinates

    y = hy + oy*stride_h + (i*dilation_h - hy + dy) * s
    x = hx + ox*stride_w + (j*dilation_w - hx + dx) * s

(the anchor's reference points and dilation grid through ``grid_sample(align_corners=False)``:
the scale s applies to the dilation grid too), with the zero-fade rule (= ``grid_sample``'s zeros
padding), and

    out[n, oy, ox, g*D + d] = sum_p mask[n, oy, ox, g*P + p] * sample(input[..., g*D + d], y, x)

Gradients flow to input, offset and mask (the offset gradient is the exact derivative of the
zero-fade rule: the right-hand slope at integer coordinates). Any batch size works (the anchor's
``im2col_step`` is not an argument of ``dcnv3_core_pytorch``); the CPU backward is deterministic;
on CUDA the input gradient uses float atomic adds unless
``deformnp.use_deterministic_algorithms(True)`` is set.

The array-level pair::

    out = dcnv3_forward(input, offset, mask, kh, kw, sh, sw, ph, pw, dh, dw, group, gc, s, rc)
    grad_input, grad_offset, grad_mask = dcnv3_backward(
        grad_out, input, offset, mask, kh, kw, sh, sw, ph, pw, dh, dw, group, gc, s, rc,
        needs=(True, True, True))
"""

from __future__ import annotations

from dataclasses import dataclass
from types import ModuleType

import numpy as np

from ..function import Context, Function
from ..kernels.cpu import dcnv3 as cpu_kernels
from ..tensor import Tensor, unwrap
from ..typing import Array, Needs, TensorLike
from ..validation import (
    check_ndim,
    contiguous,
    device_of,
    float_array,
    grad_array,
    integer,
    needs_flags,
    real,
    same_dtype,
)

__all__ = ["dcnv3", "dcnv3_forward", "dcnv3_backward", "DCNv3Function"]

OP = "dcnv3"
GRADIENTS = ("input", "offset", "mask")


def _kernels(device: str) -> ModuleType:
    """The CPU kernels, or the CUDA ones (imported on first use: numba-cuda is optional)."""
    if device == "cuda":
        from ..kernels.cuda import dcnv3 as cuda_kernels

        return cuda_kernels
    return cpu_kernels


@dataclass(frozen=True)
class DCNv3Args:
    """The checked arguments of one call. ``pad_y`` / ``pad_x`` are the padding of the rows and
    of the columns (the anchor's pad_w and pad_h)."""

    input: Array
    offset: Array
    mask: Array
    kernel_h: int
    kernel_w: int
    stride_h: int
    stride_w: int
    pad_y: int
    pad_x: int
    dilation_h: int
    dilation_w: int
    group: int
    group_channels: int
    offset_scale: float
    remove_center: int
    device: str

    @property
    def geometry(self) -> tuple:
        return (
            self.kernel_h, self.kernel_w, self.stride_h, self.stride_w, self.pad_y, self.pad_x,
            self.dilation_h, self.dilation_w, self.group, self.group_channels,
            self.offset_scale, self.remove_center,
        )  # fmt: skip

    @property
    def out_shape(self) -> tuple[int, int, int, int]:
        N, _, _, C = self.input.shape
        return (N, self.offset.shape[1], self.offset.shape[2], C)


def _remove_center(v: object) -> int:
    if isinstance(v, (bool, np.bool_)):
        return int(v)
    if isinstance(v, (int, np.integer)) and int(v) in (0, 1):
        return int(v)
    raise TypeError(f"{OP}: remove_center must be a bool (or 0 or 1), got {v!r}")


def prepare(
    input: TensorLike, offset: TensorLike, mask: TensorLike, kernel_h: int, kernel_w: int,
    stride_h: int, stride_w: int, pad_h: int, pad_w: int, dilation_h: int, dilation_w: int,
    group: int, group_channels: int, offset_scale: float, remove_center: bool,
) -> DCNv3Args:  # fmt: skip
    """Validate the arguments of :func:`dcnv3` (once, for every entry point)."""
    x, off, msk = unwrap(input), unwrap(offset), unwrap(mask)
    device = device_of(OP, input=x, offset=off, mask=msk)
    x = float_array(OP, "input", x)
    off = float_array(OP, "offset", off)
    msk = float_array(OP, "mask", msk)
    same_dtype(OP, input=x, offset=off, mask=msk)
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
    rc = _remove_center(remove_center)
    if rc and (kh % 2 == 0 or kw % 2 == 0 or kh != kw):
        raise ValueError(
            f"{OP}: remove_center is only compatible with a square kernel of odd size, got "
            f"kernel {kh}x{kw}"
        )
    check_ndim(OP, "input", x, 4, "(N, H, W, C)")
    check_ndim(OP, "offset", off, 4, "(N, Ho, Wo, group*P*2)")
    check_ndim(OP, "mask", msk, 4, "(N, Ho, Wo, group*P)")
    N, H, W, C = (int(s) for s in x.shape)
    if C != G * D:
        raise ValueError(
            f"{OP}: input has {C} channels, expected group*group_channels = {G}*{D} = {G * D}"
        )
    # the anchor pads the rows by pad_w and the columns by pad_h (see the module docstring)
    Ho = (H + 2 * pw - (dh * (kh - 1) + 1)) // sh + 1
    Wo = (W + 2 * ph - (dw * (kw - 1) + 1)) // sw + 1
    if Ho < 1 or Wo < 1:
        raise ValueError(
            f"{OP}: input of size {H}x{W}, padded to {H + 2 * pw}x{W + 2 * ph} (rows by pad_w, "
            f"columns by pad_h), is smaller than the dilated kernel "
            f"{dh * (kh - 1) + 1}x{dw * (kw - 1) + 1}"
        )
    P = kh * kw - rc
    expected = (N, Ho, Wo, G * P * 2)
    if tuple(off.shape) != expected:
        raise ValueError(
            f"{OP}: offset has shape {tuple(off.shape)}, expected (N, Ho, Wo, group*P*2) = "
            f"{expected} (P = kernel_h*kernel_w - remove_center = {P})"
        )
    expected = (N, Ho, Wo, G * P)
    if tuple(msk.shape) != expected:
        raise ValueError(
            f"{OP}: mask has shape {tuple(msk.shape)}, expected (N, Ho, Wo, group*P) = "
            f"{expected} (P = kernel_h*kernel_w - remove_center = {P})"
        )
    return DCNv3Args(x, off, msk, kh, kw, sh, sw, pw, ph, dh, dw, G, D, scale, rc, device)


def _forward(a: DCNv3Args) -> Array:
    return _kernels(a.device).dcnv3_forward(a.input, a.offset, a.mask, *a.geometry)


def _backward(grad: Array, a: DCNv3Args, needs: Needs) -> tuple:
    return _kernels(a.device).dcnv3_backward(
        grad, a.input, a.offset, a.mask, *a.geometry, tuple(needs)
    )


def dcnv3_forward(
    input: TensorLike, offset: TensorLike, mask: TensorLike, kernel_h: int, kernel_w: int,
    stride_h: int, stride_w: int, pad_h: int, pad_w: int, dilation_h: int, dilation_w: int,
    group: int, group_channels: int, offset_scale: float, remove_center: bool,
) -> Array:  # fmt: skip
    """Array-level forward of :func:`dcnv3`: plain arrays in, a plain array out.

    Parameters
    ----------
    input : array_like, shape (N, H, W, C)
        The feature map, channels-last; C = group * group_channels.
    offset : array_like, shape (N, Ho, Wo, group*P*2)
        Per output pixel, group and point an ``(x, y)`` offset in pixels (times
        ``offset_scale``). Any real value is allowed (points off the map sample 0; so do NaN
        and inf).
    mask : array_like, shape (N, Ho, Wo, group*P)
        The weight of each sample, used as given.
    kernel_h, kernel_w : int
        The kernel size (>= 1).
    stride_h, stride_w : int
        The stride (>= 1).
    pad_h, pad_w : int
        The zero padding (>= 0), applied as the anchor's ``F.pad(input, [0, 0, pad_h, pad_h,
        pad_w, pad_w])``: the columns are padded by ``pad_h`` and the rows by ``pad_w``.
    dilation_h, dilation_w : int
        The spacing of the kernel points (>= 1).
    group : int
        The number of groups G (>= 1); group g samples channels ``g*D`` to ``g*D + D - 1``.
    group_channels : int
        The channels per group D (>= 1); C must equal G*D.
    offset_scale : float
        The scale s of the offsets and of the dilation grid (finite).
    remove_center : bool or int
        Whether to drop the kernel's centre point (P = kernel_h*kernel_w - 1); only for a square
        kernel of odd size.

    Returns
    -------
    out : ndarray or CUDA device array, shape (N, Ho, Wo, C)
        In the inputs' dtype, on their device.

    Raises
    ------
    TypeError
        If a float array is not float32/float64 or they differ in dtype, an integer parameter is
        not an int, ``offset_scale`` is not a real number or ``remove_center`` not a bool.
    ValueError
        If a parameter is out of range, ``remove_center`` is asked of a kernel that is not square
        and odd, C != group*group_channels, the padded input is smaller than the dilated kernel,
        offset or mask has the wrong shape, or the arrays are on different devices.

    See Also
    --------
    dcnv3 : The differentiable op.
    dcnv3_backward : The matching backward.
    """
    return _forward(
        prepare(
            input, offset, mask, kernel_h, kernel_w, stride_h, stride_w, pad_h, pad_w,
            dilation_h, dilation_w, group, group_channels, offset_scale, remove_center,
        )
    )  # fmt: skip


def dcnv3_backward(
    grad_out: TensorLike, input: TensorLike, offset: TensorLike, mask: TensorLike,
    kernel_h: int, kernel_w: int, stride_h: int, stride_w: int, pad_h: int, pad_w: int,
    dilation_h: int, dilation_w: int, group: int, group_channels: int, offset_scale: float,
    remove_center: bool, needs: Needs = (True, True, True),
) -> tuple[Array | None, Array | None, Array | None]:  # fmt: skip
    """Array-level backward of :func:`dcnv3`: the gradients of input, offset and mask.

    Parameters
    ----------
    grad_out : array_like, shape (N, Ho, Wo, C)
        Gradient of the loss with respect to the forward's output, in the inputs' dtype and on
        their device.
    input : array_like, shape (N, H, W, C)
        The forward's ``input``.
    offset : array_like, shape (N, Ho, Wo, group*P*2)
        The forward's ``offset`` (``(x, y)`` pairs).
    mask : array_like, shape (N, Ho, Wo, group*P)
        The forward's ``mask``.
    kernel_h, kernel_w : int
        The kernel size (>= 1).
    stride_h, stride_w : int
        The stride (>= 1).
    pad_h, pad_w : int
        The zero padding (>= 0): columns by ``pad_h``, rows by ``pad_w``, as the anchor.
    dilation_h, dilation_w : int
        The spacing of the kernel points (>= 1).
    group : int
        The number of groups G (>= 1).
    group_channels : int
        The channels per group D (>= 1); C must equal G*D.
    offset_scale : float
        The scale s of the offsets and of the dilation grid (finite).
    remove_center : bool or int
        Whether the kernel's centre point is dropped.
    needs : sequence of 3 bool, default (True, True, True)
        Which gradients to compute: ``(input, offset, mask)``.

    Returns
    -------
    grad_input : ndarray or CUDA device array, shape (N, H, W, C), or None
    grad_offset : ndarray or CUDA device array, shape (N, Ho, Wo, group*P*2), or None
    grad_mask : ndarray or CUDA device array, shape (N, Ho, Wo, group*P), or None
        Each in the inputs' dtype, or None where its ``needs`` flag is False.

    Raises
    ------
    TypeError
        As :func:`dcnv3_forward`; also when ``grad_out`` has another dtype or ``needs`` is not a
        sequence.
    ValueError
        As :func:`dcnv3_forward`; also when ``grad_out`` has the wrong shape or device, or
        ``needs`` does not have 3 flags.

    See Also
    --------
    dcnv3_forward : The matching forward.

    Notes
    -----
    CPU gradients are bit-identical on every run and with any number of threads; on CUDA the
    input gradient is too when ``deformnp.use_deterministic_algorithms(True)`` is set (it uses
    float atomic adds otherwise).
    """
    a = prepare(
        input, offset, mask, kernel_h, kernel_w, stride_h, stride_w, pad_h, pad_w,
        dilation_h, dilation_w, group, group_channels, offset_scale, remove_center,
    )  # fmt: skip
    g = grad_array(
        OP, "grad_out", grad_out, a.input.dtype, a.out_shape, a.device, "input",
        "(N, Ho, Wo, C)",
    )  # fmt: skip
    return _backward(g, a, needs_flags(OP, needs, GRADIENTS))


class DCNv3Function(Function):
    """Autograd node of :func:`dcnv3`: positional inputs (input, offset, mask), ``args`` from
    :func:`prepare`."""

    supports_cuda = True  # forward/backward dispatch on the arrays' device
    fresh_grads = True  # backward allocates every gradient it returns

    @staticmethod
    def forward(
        ctx: Context, input: Array, offset: Array, mask: Array, *, args: DCNv3Args
    ) -> Array:
        ctx.save_for_backward(args)
        return _forward(args)

    @staticmethod
    def backward(ctx: Context, grad: Array) -> tuple:
        (args,) = ctx.saved_tensors
        return _backward(contiguous(grad), args, ctx.needs_input_grad[:3])


def dcnv3(
    input: TensorLike, offset: TensorLike, mask: TensorLike, kernel_h: int, kernel_w: int,
    stride_h: int, stride_w: int, pad_h: int, pad_w: int, dilation_h: int, dilation_w: int,
    group: int, group_channels: int, offset_scale: float, remove_center: bool,
) -> Tensor:  # fmt: skip
    r"""DCNv3, the deformable sampling core of InternImage.

    InternImage's ``dcnv3_core_pytorch`` (and its CUDA op ``DCNv3Function``, without
    ``im2col_step``), with the same arguments in the same order and the same layouts. Gradients
    flow to ``input``, ``offset`` and ``mask`` when they are Tensors that require grad.

    Parameters
    ----------
    input : Tensor or array_like, shape (N, H, W, C)
        The feature map, channels-last; C = group * group_channels.
    offset : Tensor or array_like, shape (N, Ho, Wo, group*P*2)
        Per output pixel, group and point an ``(x, y)`` offset in pixels (times
        ``offset_scale``). Any real value is allowed (points off the map sample 0; so do NaN
        and inf).
    mask : Tensor or array_like, shape (N, Ho, Wo, group*P)
        The weight of each sample, used as given (InternImage applies the softmax over the
        points in its layer).
    kernel_h, kernel_w : int
        The kernel size (>= 1).
    stride_h, stride_w : int
        The stride (>= 1).
    pad_h, pad_w : int
        The zero padding (>= 0), applied as the anchor's ``F.pad(input, [0, 0, pad_h, pad_h,
        pad_w, pad_w])``: the columns are padded by ``pad_h`` and the rows by ``pad_w``.
    dilation_h, dilation_w : int
        The spacing of the kernel points (>= 1).
    group : int
        The number of groups G (>= 1); group g samples channels ``g*D`` to ``g*D + D - 1``.
    group_channels : int
        The channels per group D (>= 1); C must equal G*D.
    offset_scale : float
        The scale s of the offsets and of the dilation grid (finite).
    remove_center : bool or int
        Whether to drop the kernel's centre point (P = kernel_h*kernel_w - 1); only for a square
        kernel of odd size.

    Returns
    -------
    Tensor, shape (N, Ho, Wo, C)
        ``Ho = (H + 2*pad_w - (dilation_h*(kernel_h-1) + 1)) // stride_h + 1`` and
        ``Wo = (W + 2*pad_h - (dilation_w*(kernel_w-1) + 1)) // stride_w + 1``.

    Raises
    ------
    TypeError
        If a float array is not float32/float64 or they differ in dtype, an integer parameter is
        not an int, ``offset_scale`` is not a real number or ``remove_center`` not a bool.
    ValueError
        If a parameter is out of range, ``remove_center`` is asked of a kernel that is not square
        and odd, C != group*group_channels, the padded input is smaller than the dilated kernel,
        offset or mask has the wrong shape, or the arrays are on different devices.

    See Also
    --------
    dcnv3_forward, dcnv3_backward : The array-level pair.
    ms_deform_attn : Deformable attention, the same gather with free sampling locations.

    Notes
    -----
    Kernel points are numbered column by column, :math:`k = j k_h + i`, the centre skipped when
    ``remove_center``. With :math:`h_y = \lfloor d_h (k_h - 1) / 2 \rfloor`,
    :math:`h_x = \lfloor d_w (k_w - 1) / 2 \rfloor`, :math:`s` = ``offset_scale`` and
    :math:`(\Delta x, \Delta y)` point :math:`p`'s offset, the point is sampled in the padded
    input :math:`V` (rows padded by ``pad_w``, columns by ``pad_h``) at

    .. math::

        y = h_y + o_y s_h + (i d_h - h_y + \Delta y)\,s, \qquad
        x = h_x + o_x s_w + (j d_w - h_x + \Delta x)\,s,

    and

    .. math::

        \mathrm{out}[n, o_y, o_x, gD + d] = \sum_p m[n, o_y, o_x, gP + p]\;
        V[n, \cdot, \cdot, gD + d](y, x),

    each sample taken with the zero-fade rule of :func:`bilinear_interpolate`, which equals the
    anchor's ``grid_sample(..., padding_mode="zeros", align_corners=False)``. The offset
    gradient is the exact derivative of that rule (the right-hand slope at integer
    coordinates). The anchor's CUDA extension pads the rows by ``pad_h`` instead, so it differs
    from ``dcnv3_core_pytorch`` (and deformnp) when ``pad_h != pad_w``; InternImage's layers
    always use equal paddings.

    Examples
    --------
    A 3x3 kernel with zero offsets and a mask of ones sums each 3x3 neighbourhood:

    >>> import numpy as np
    >>> from deformnp.ops.dcnv3 import dcnv3
    >>> x = np.ones((1, 4, 4, 8))
    >>> offset = np.zeros((1, 4, 4, 2 * 9 * 2))
    >>> mask = np.ones((1, 4, 4, 2 * 9))
    >>> out = dcnv3(x, offset, mask, 3, 3, 1, 1, 1, 1, 1, 1, 2, 4, 1.0, False)
    >>> out.shape
    (1, 4, 4, 8)
    >>> float(out.numpy()[0, 1, 1, 0]), float(out.numpy()[0, 0, 0, 0])
    (9.0, 4.0)
    """
    args = prepare(
        input, offset, mask, kernel_h, kernel_w, stride_h, stride_w, pad_h, pad_w,
        dilation_h, dilation_w, group, group_channels, offset_scale, remove_center,
    )  # fmt: skip
    return DCNv3Function.apply(input, offset, mask, args=args)
