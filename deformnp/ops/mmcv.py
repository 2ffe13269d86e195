"""mmcv's deformable op API under mmcv's own names and signatures (``mmcv.ops``).

Drop-in functions for code written against ``mmcv.ops``: the same positional order, parameter
names and defaults, built on deformnp's ops (:func:`deformnp.ops.deform_conv2d`,
:func:`deformnp.ops.roi_align`, :func:`deformnp.ops.deform_roi_pool`), so the gradients are
deformnp's exact ones:

* :func:`deform_conv2d` ``(input, offset, weight, stride=1, padding=0, dilation=1, groups=1,
  deform_groups=1, bias=False, im2col_step=32)`` (DCN v1, no bias, as mmcv's);
* :func:`modulated_deform_conv2d` ``(input, offset, mask, weight, bias=None, stride=1, padding=0,
  dilation=1, groups=1, deform_groups=1)`` (DCN v2);
* :func:`roi_align` ``(input, rois, output_size, spatial_scale=1.0, sampling_ratio=0,
  pool_mode='avg', aligned=True)``, with mmcv's ``pool_mode='max'`` (the largest bilinear sample
  of each bin) implemented here;
* :func:`deform_roi_pool` ``(input, rois, offset, output_size, spatial_scale=1.0,
  sampling_ratio=0, gamma=0.1)``.

Where mmcv differs from the formula, deformnp keeps the formula (the outputs agree with mmcv's;
the differences are in gradients at measure-zero points and in edge cases mmcv does not handle):

* deformable convolution: the offset gradient at a sampling point exactly on the border line
  ``y = -1`` (or ``x = -1``) is the right-hand slope of the zero-fade rule, which is the exact
  one-sided derivative of the forward (torchvision's choice); mmcv's coordinate weight is zero
  there. Any batch size works (mmcv's ``im2col_step`` divisibility assertion is not reproduced),
  and an input smaller than the kernel needs no padding work-around. ``groups`` and
  ``deform_groups`` are checked against the arrays' shapes (mmcv's kernels would read out of
  bounds); mmcv's silent casts of ``input`` and ``weight`` to ``offset``'s dtype are not done
  (mixed dtypes are a TypeError).
* roi_align, ``pool_mode='max'``: the first largest sample in row-major order wins, as mmcv's
  strict ``>``; a NaN sample counts as the largest (the first NaN wins, as deformnp's
  :func:`~deformnp.ops.roi_pool`; mmcv skips NaN); a bin with no samples (an empty box with
  ``aligned=True`` and an adaptive grid) is 0 with no gradient (mmcv's CUDA kernel returns
  ``-FLT_MAX``, its CPU kernel starts from -10000 and returns that).
* roi_align and deform_roi_pool, adaptive grid (``sampling_ratio=0``): the samples per bin are
  ``ceil(roi_h / PH)`` computed as torchvision does (deformnp's :func:`~deformnp.ops.roi_align`
  geometry, in float64). mmcv converts ``roi_h / PH`` to float32 before ``ceilf`` even for
  float64 data, so for a box whose ``roi_h / PH`` lies within float32 rounding above an integer
  (e.g. y from 1.05 to 8.05 with 7 bins, aligned) mmcv takes one sample fewer per axis and the
  outputs differ; with ``sampling_ratio > 0``, or boxes away from those sizes, they agree.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from ..function import Context, Function
from ..kernels.roi_geometry import align_geometry
from ..tensor import Tensor, unwrap
from ..typing import Array, Boxes, IntPair, TensorLike
from ..validation import contiguous, integer
from .deform_conv import deform_conv2d as _deform_conv2d
from .roi import RoIArgs, prepare_roi_align
from .roi import deform_roi_pool as _deform_roi_pool
from .roi import roi_align as _roi_align

__all__ = [
    "deform_conv2d",
    "modulated_deform_conv2d",
    "roi_align",
    "deform_roi_pool",
    "RoIAlignMaxFunction",
]

POOL_MODES = ("avg", "max")
_CHUNK = 1 << 22  # elements of one chunk of the max-mode sample array (boxes x samples x C)


# ============================================================================ deformable conv


def _shape(a: Any) -> tuple[int, ...]:
    a = unwrap(a)
    return tuple(int(s) for s in (a.shape if hasattr(a, "shape") else np.shape(a)))


def _check_groups(
    op: str,
    input: Any,
    offset: Any,
    weight: Any,
    groups: Any,
    deform_groups: Any,
    mask: Any = None,
) -> None:
    """mmcv's explicit ``groups`` / ``deform_groups`` against the shapes (deformnp infers both
    from the arrays, so a mismatch must be caught here)."""
    groups = integer(op, "groups", groups, 1)
    deform_groups = integer(op, "deform_groups", deform_groups, 1)
    xs, os_, ws = _shape(input), _shape(offset), _shape(weight)
    if len(xs) != 4 or len(os_) != 4 or len(ws) != 4:
        return  # the op's own checks name the array of the wrong rank
    Cin, Cout, cin_g, kh, kw = xs[1], ws[0], ws[1], ws[2], ws[3]
    if Cin % groups:
        raise ValueError(f"{op}: input has {Cin} channels, not divisible by groups {groups}")
    if cin_g != Cin // groups:
        raise ValueError(
            f"{op}: weight.shape[1] must be in_channels / groups = {Cin}/{groups} = "
            f"{Cin // groups}, got {cin_g} (weight shape {ws})"
        )
    if Cout % groups:
        raise ValueError(
            f"{op}: weight has {Cout} output channels, not divisible by groups {groups}"
        )
    if Cin % deform_groups:
        raise ValueError(
            f"{op}: input has {Cin} channels, not divisible by deform_groups {deform_groups}"
        )
    expected = 2 * deform_groups * kh * kw
    if os_[1] != expected:
        raise ValueError(
            f"{op}: offset has {os_[1]} channels, expected 2*deform_groups*kh*kw = {expected} "
            f"(deform_groups {deform_groups}, kernel {kh}x{kw})"
        )
    ms = None if mask is None else _shape(mask)
    if ms is not None and len(ms) == 4 and ms[1] != deform_groups * kh * kw:
        raise ValueError(
            f"{op}: mask has {ms[1]} channels, expected deform_groups*kh*kw = "
            f"{deform_groups * kh * kw} (deform_groups {deform_groups}, kernel {kh}x{kw})"
        )


def deform_conv2d(
    input: TensorLike,
    offset: TensorLike,
    weight: TensorLike,
    stride: IntPair = 1,
    padding: IntPair = 0,
    dilation: IntPair = 1,
    groups: int = 1,
    deform_groups: int = 1,
    bias: bool = False,
    im2col_step: int = 32,
) -> Tensor:
    """Deformable convolution v1 with mmcv's signature (``mmcv.ops.deform_conv2d``).

    The same op as :func:`deformnp.ops.deform_conv2d` without bias or mask; the arguments in
    mmcv's positional order. Gradients flow to ``input``, ``offset`` and ``weight``.

    Parameters
    ----------
    input : Tensor or array_like, shape (B, Cin, H, W)
        The feature map, float32 or float64.
    offset : Tensor or array_like, shape (B, 2 * deform_groups * kh * kw, Hout, Wout)
        Sampling offsets ``[y0, x0, y1, x1, ...]`` per kernel point (row-major) and offset
        group, as mmcv's (and torchvision's) layout.
    weight : Tensor or array_like, shape (Cout, Cin / groups, kh, kw)
        Convolution weights.
    stride : int or (int, int), default 1
        Step ``(sh, sw)`` between output positions.
    padding : int or (int, int), default 0
        Implicit zero padding ``(ph, pw)`` on both sides.
    dilation : int or (int, int), default 1
        Spacing ``(dh, dw)`` between kernel points.
    groups : int, default 1
        Channel groups of the weight; must equal ``Cin / weight.shape[1]``.
    deform_groups : int, default 1
        Offset groups; must divide ``Cin`` and match ``offset``'s channels.
    bias : bool, default False
        Must be False, as mmcv asserts (mmcv's op has no bias; see
        :func:`modulated_deform_conv2d`).
    im2col_step : int, default 32
        mmcv's batching knob: checked to be >= 1 and otherwise ignored (any batch size works).

    Returns
    -------
    Tensor, shape (B, Cout, Hout, Wout)
        In the inputs' dtype; ``Hout = (H + 2*ph - dh*(kh - 1) - 1) // sh + 1``, likewise
        ``Wout``.

    Raises
    ------
    ValueError
        If ``bias`` is not False, ``groups`` or ``deform_groups`` does not match the shapes, or
        as :func:`deformnp.ops.deform_conv2d`.
    TypeError
        If an integer argument is not an int, or as :func:`deformnp.ops.deform_conv2d`.

    See Also
    --------
    deformnp.ops.deform_conv2d : torchvision's signature of the same op.
    modulated_deform_conv2d : DCN v2, with mask and bias.
    deformnp.nn.mmcv.DeformConv2d : The layer.

    Notes
    -----
    The offset gradient is the exact derivative of the forward, including the right-hand slope
    on the border line ``y = -1`` / ``x = -1`` where mmcv's coordinate weight is zero (a
    measure-zero set; outputs are equal). See the module docstring for the other differences.
    """
    op = "deform_conv2d"
    if not (isinstance(bias, (bool, np.bool_)) and not bias):
        raise ValueError(
            f"{op}: bias must be False (mmcv's deform_conv2d has no bias; "
            f"modulated_deform_conv2d takes a bias tensor), got {bias!r}"
        )
    integer(op, "im2col_step", im2col_step, 1)
    _check_groups(op, input, offset, weight, groups, deform_groups)
    return _deform_conv2d(input, offset, weight, None, stride, padding, dilation)


def modulated_deform_conv2d(
    input: TensorLike,
    offset: TensorLike,
    mask: TensorLike,
    weight: TensorLike,
    bias: TensorLike | None = None,
    stride: IntPair = 1,
    padding: IntPair = 0,
    dilation: IntPair = 1,
    groups: int = 1,
    deform_groups: int = 1,
) -> Tensor:
    """Modulated deformable convolution (DCN v2) with mmcv's signature
    (``mmcv.ops.modulated_deform_conv2d``).

    The same op as :func:`deformnp.ops.deform_conv2d` with a mask; the arguments in mmcv's
    positional order. Gradients flow to ``input``, ``offset``, ``mask``, ``weight`` and
    ``bias``.

    Parameters
    ----------
    input : Tensor or array_like, shape (B, Cin, H, W)
        The feature map, float32 or float64.
    offset : Tensor or array_like, shape (B, 2 * deform_groups * kh * kw, Hout, Wout)
        Sampling offsets ``[y0, x0, y1, x1, ...]`` per kernel point and offset group.
    mask : Tensor or array_like, shape (B, deform_groups * kh * kw, Hout, Wout)
        Modulation scalars, one per kernel point and offset group (required, as in mmcv).
    weight : Tensor or array_like, shape (Cout, Cin / groups, kh, kw)
        Convolution weights.
    bias : Tensor or array_like, shape (Cout,), optional
        Added to every output position; None for no bias.
    stride : int or (int, int), default 1
        Step ``(sh, sw)`` between output positions.
    padding : int or (int, int), default 0
        Implicit zero padding ``(ph, pw)`` on both sides.
    dilation : int or (int, int), default 1
        Spacing ``(dh, dw)`` between kernel points.
    groups : int, default 1
        Channel groups of the weight; must equal ``Cin / weight.shape[1]``.
    deform_groups : int, default 1
        Offset groups; must divide ``Cin`` and match ``offset``'s channels.

    Returns
    -------
    Tensor, shape (B, Cout, Hout, Wout)
        In the inputs' dtype.

    Raises
    ------
    TypeError
        If ``mask`` is None, an integer argument is not an int, or as
        :func:`deformnp.ops.deform_conv2d` (dtypes).
    ValueError
        If ``groups`` or ``deform_groups`` does not match the shapes, or as
        :func:`deformnp.ops.deform_conv2d`.

    See Also
    --------
    deformnp.ops.deform_conv2d : torchvision's signature of the same op.
    deform_conv2d : DCN v1 with mmcv's signature.
    deformnp.nn.mmcv.ModulatedDeformConv2d : The layer.

    Notes
    -----
    As :func:`deform_conv2d`: exact gradients, including on the border line ``y = -1`` /
    ``x = -1`` where mmcv's coordinate weight is zero.
    """
    op = "modulated_deform_conv2d"
    if mask is None:
        raise TypeError(
            f"{op}: mask must be an array of shape (B, deform_groups*kh*kw, Hout, Wout), got "
            f"None (deform_conv2d is the op without a mask)"
        )
    _check_groups(op, input, offset, weight, groups, deform_groups, mask)
    return _deform_conv2d(input, offset, weight, bias, stride, padding, dilation, mask=mask)


# ============================================================================ roi_align


def _axis_plan(c: np.ndarray, n: int) -> tuple[np.ndarray, ...]:
    """One axis of the clamp rule of :func:`deformnp.ops.bilinear_interpolate` (mmcv's and
    torchvision's RoI Align rule): (valid, i0, i1, l, h) for coordinates ``c`` on an axis of
    ``n`` pixels. Out of range (value 0) when c < -1 or c > n or c is NaN; else c = max(c, 0)
    and, when floor(c) >= n - 1, i0 = i1 = n - 1 and c = n - 1."""
    with np.errstate(invalid="ignore"):
        valid = (c >= -1.0) & (c <= float(n))
    cc = np.where(valid, np.maximum(c, 0.0), 0.0)
    i0 = np.floor(cc).astype(np.int64)
    top = i0 >= n - 1
    i0 = np.where(top, n - 1, i0)
    i1 = np.where(top, n - 1, i0 + 1)
    cc = np.where(top, i0.astype(np.float64), cc)
    low = cc - i0
    return valid, i0, i1, low, 1.0 - low


def _max_chunk(
    x: np.ndarray, fgeo: np.ndarray, batch: np.ndarray, gh: int, gw: int, PH: int, PW: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Max-pool the bins of k boxes that share the grid ``gh x gw`` (``gh * gw >= 1``).

    Returns the outputs (k, C, PH, PW) in float64 and the argmax sample's plan: its four corner
    pixels (k, C, PH, PW, 4) as flat indices into H*W, and their weights (k, C, PH, PW, 4).
    """
    N, C, H, W = x.shape
    k = fgeo.shape[0]
    sy, sx, bh, bw = (fgeo[:, i] for i in range(4))
    # the sample coordinates of the RoI Align kernels, in the same order of operations
    ys = sy[:, None] + np.arange(PH)[None, :] * bh[:, None]
    y = ys[:, :, None] + (np.arange(gh)[None, None, :] + 0.5) * bh[:, None, None] / gh
    xs = sx[:, None] + np.arange(PW)[None, :] * bw[:, None]
    xx = xs[:, :, None] + (np.arange(gw)[None, None, :] + 0.5) * bw[:, None, None] / gw
    vy, y0, y1, ly, hy = (a[:, :, :, None, None] for a in _axis_plan(y, H))  # (k,PH,gh,1,1)
    vx, x0, x1, lx, hx = (a[:, None, None, :, :] for a in _axis_plan(xx, W))  # (k,1,1,PW,gw)
    valid = vy & vx
    zero = np.zeros((), np.float64)
    idx = [y0 * W + x0, y0 * W + x1, y1 * W + x0, y1 * W + x1]
    wts = [np.where(valid, w, zero) for w in (hy * hx, hy * lx, ly * hx, ly * lx)]
    shape = (k, PH, gh, PW, gw)
    idx = [np.broadcast_to(i, shape).reshape(k, -1) for i in idx]  # (k, S)
    wts = [np.broadcast_to(w, shape).reshape(k, -1) for w in wts]
    flat = x.reshape(N, C, H * W)
    b = batch[:, None]
    val = np.zeros((k, idx[0].shape[1], C), np.float64)  # (k, S, C)
    for i, w in zip(idx, wts):
        # a corner of zero weight is not read (an out-of-range sample is 0, as in the kernels)
        term = w[..., None] * flat[b, :, i]
        val += np.where(w[..., None] != 0.0, term, zero)
    # (k, PH, gh, PW, gw, C) -> (k, C, PH, PW, gh*gw): the bin's samples in row-major order
    val = val.reshape(k, PH, gh, PW, gw, C).transpose(0, 5, 1, 3, 2, 4).reshape(k, C, PH, PW, -1)
    am = np.argmax(val, axis=-1)[..., None]  # the first maximum; the first NaN if any
    out = np.take_along_axis(val, am, -1)[..., 0]

    def at_argmax(a: np.ndarray) -> np.ndarray:
        a = a.reshape(k, PH, gh, PW, gw).transpose(0, 1, 3, 2, 4).reshape(k, 1, PH, PW, -1)
        return np.take_along_axis(a, am, -1)[..., 0]

    return (
        out,
        np.stack([at_argmax(i) for i in idx], -1),
        np.stack([at_argmax(w) for w in wts], -1),
    )


def _max_forward(a: RoIArgs) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """roi_align with pool_mode='max' on the host: the output, and the argmax samples' corner
    pixels and weights (for the backward)."""
    x = a.input
    (PH, PW), s, ratio, aligned = a.params
    N, C, H, W = x.shape
    K = a.rois.shape[0]
    out = np.zeros((K, C, PH, PW), np.float64)
    idx = np.zeros((K, C, PH, PW, 4), np.int64)
    wts = np.zeros((K, C, PH, PW, 4), np.float64)
    if K == 0 or C == 0 or H == 0 or W == 0:
        return out.astype(x.dtype), idx, wts
    fgeo, igeo = align_geometry("roi_align", a.rois, (PH, PW), s, ratio, aligned)
    for gh, gw in np.unique(igeo[:, 1:3], axis=0).tolist():
        if gh * gw == 0:
            continue  # an empty bin: 0, no gradient (mmcv: -FLT_MAX)
        boxes = np.flatnonzero((igeo[:, 1] == gh) & (igeo[:, 2] == gw))
        step = max(1, _CHUNK // (C * PH * PW * gh * gw))
        for i in range(0, boxes.size, step):
            kk = boxes[i : i + step]
            out[kk], idx[kk], wts[kk] = _max_chunk(x, fgeo[kk], igeo[kk, 0], gh, gw, PH, PW)
    return out.astype(x.dtype), idx, wts


def _max_backward(grad: np.ndarray, a: RoIArgs, idx: np.ndarray, wts: np.ndarray) -> np.ndarray:
    """The input gradient of max-mode roi_align: each bin's gradient times the bilinear weights
    of its argmax sample, summed into that sample's four corners (in float64, in a fixed
    order)."""
    N, C, H, W = a.input_shape
    K = idx.shape[0]
    b = a.rois[:, 0].astype(np.int64)[:, None, None, None, None]
    c = np.arange(C)[None, :, None, None, None]
    flat = ((b * C + c) * (H * W) + idx).reshape(-1)
    contrib = (np.asarray(grad, np.float64)[..., None] * wts).reshape(-1)
    keep = wts.reshape(-1) != 0.0
    total = N * C * H * W
    gin = np.bincount(flat[keep], weights=contrib[keep], minlength=total) if K else np.zeros(total)
    return gin.reshape(N, C, H, W).astype(a.input.dtype)


class RoIAlignMaxFunction(Function):
    """Autograd node of :func:`roi_align` with ``pool_mode='max'`` (CPU only); ``args`` from
    :func:`deformnp.ops.roi.prepare_roi_align`."""

    @staticmethod
    def forward(ctx: Context, input: Array, *, args: RoIArgs) -> Array:
        out, idx, wts = _max_forward(args)
        ctx.save_for_backward(args, idx, wts)
        return out

    @staticmethod
    def backward(ctx: Context, grad: Array) -> tuple:
        args, idx, wts = ctx.saved_tensors
        if not ctx.needs_input_grad[0]:
            return (None,)
        return (_max_backward(contiguous(grad), args, idx, wts),)


def roi_align(
    input: TensorLike,
    rois: Boxes,
    output_size: IntPair,
    spatial_scale: float = 1.0,
    sampling_ratio: int = 0,
    pool_mode: str = "avg",
    aligned: bool = True,
) -> Tensor:
    r"""RoI Align with mmcv's signature and defaults (``mmcv.ops.roi_align``), max mode included.

    ``pool_mode='avg'`` is :func:`deformnp.ops.roi_align` (mmcv's average mode is the same
    pooling); ``pool_mode='max'`` takes, in each bin, the largest of the same bilinear samples,
    and sends the bin's gradient to the four corner pixels of that sample with its bilinear
    weights (mmcv's rule, which is the exact derivative away from ties). Note mmcv's defaults:
    ``sampling_ratio=0`` (adaptive grid) and ``aligned=True``.

    Parameters
    ----------
    input : Tensor or array_like, shape (N, C, H, W)
        The feature map, float32 or float64.
    rois : array_like, shape (K, 5), or list of array_like, shape (L_i, 4)
        Rows ``(batch_index, x1, y1, x2, y2)`` in input-image coordinates (or one (L_i, 4)
        array per image, a deformnp extra); in ``input``'s dtype; not differentiated.
    output_size : int or (int, int)
        The bins per RoI, ``(PH, PW)``; at least 1.
    spatial_scale : float, default 1.0
        Scale from box coordinates to ``input``'s pixel coordinates.
    sampling_ratio : int, default 0
        Samples per bin along each axis; <= 0 for the adaptive grid ``ceil(roi_h / PH)`` by
        ``ceil(roi_w / PW)``. At most 4096.
    pool_mode : {'avg', 'max'}, default 'avg'
        Average or maximum of each bin's samples. ``'max'`` runs on the CPU.
    aligned : bool, default True
        True shifts the boxes by -0.5 pixel and drops the minimum RoI size of 1 (mmcv's and
        Detectron2's aligned RoI Align).

    Returns
    -------
    Tensor, shape (K, C, PH, PW)
        In ``input``'s dtype; differentiable in ``input``.

    Raises
    ------
    ValueError
        If ``pool_mode`` is not ``'avg'`` or ``'max'``, or as :func:`deformnp.ops.roi_align`.
    TypeError
        If ``pool_mode`` is not a str, ``pool_mode='max'`` is given CUDA arrays, or as
        :func:`deformnp.ops.roi_align`.

    See Also
    --------
    deformnp.ops.roi_align : torchvision's signature (average mode).
    deformnp.nn.mmcv.RoIAlign : The layer.

    Notes
    -----
    With the samples :math:`v_{a b}` of bin ``(i, j)`` (as in :func:`deformnp.ops.roi_align`,
    :math:`a < g_h`, :math:`b < g_w`), max mode is

    .. math::

        \mathrm{out}[k, c, i, j] = \max_{a, b} v_{ab}, \qquad
        \frac{\partial\,\mathrm{out}}{\partial x_c[p]} = w_p(a^*, b^*),

    :math:`(a^*, b^*)` the first maximum in row-major order and :math:`w_p` its bilinear weight
    on pixel ``p``. Samples are computed in float64 for both dtypes. A NaN sample counts as the
    maximum (mmcv skips NaN); a bin without samples is 0 (mmcv: ``-FLT_MAX``).
    """
    op = "roi_align"
    if not isinstance(pool_mode, str):
        raise TypeError(f"{op}: pool_mode must be 'avg' or 'max', got {pool_mode!r}")
    if pool_mode not in POOL_MODES:
        raise ValueError(f"{op}: pool_mode must be 'avg' or 'max', got {pool_mode!r}")
    if pool_mode == "avg":
        return _roi_align(input, rois, output_size, spatial_scale, sampling_ratio, bool(aligned))
    args = prepare_roi_align(input, rois, output_size, spatial_scale, sampling_ratio, aligned)
    if args.device == "cuda":
        raise TypeError(
            f"{op}: pool_mode='max' runs on the CPU only; move input to the CPU with .to('cpu')"
        )
    return RoIAlignMaxFunction.apply(input, args=args)


# ============================================================================ deform_roi_pool


def deform_roi_pool(
    input: TensorLike,
    rois: Boxes,
    offset: TensorLike | None,
    output_size: IntPair,
    spatial_scale: float = 1.0,
    sampling_ratio: int = 0,
    gamma: float = 0.1,
) -> Tensor:
    """Deformable RoI pooling with mmcv's signature (``mmcv.ops.deform_roi_pool``).

    :func:`deformnp.ops.deform_roi_pool` with mmcv's parameter names (``rois``) and
    ``output_size`` required. Gradients flow to ``input`` and ``offset``.

    Parameters
    ----------
    input : Tensor or array_like, shape (N, C, H, W)
        The feature map, float32 or float64.
    rois : array_like, shape (K, 5), or list of array_like, shape (L_i, 4)
        Rows ``(batch_index, x1, y1, x2, y2)`` in input-image coordinates; not differentiated.
    offset : Tensor or array_like, shape (K, 2, PH, PW), or None
        The normalized shift of each bin (channel 0 x, channel 1 y); None for no shift.
    output_size : int or (int, int)
        The bins per RoI, ``(PH, PW)``.
    spatial_scale : float, default 1.0
        Scale from box coordinates to ``input``'s pixel coordinates.
    sampling_ratio : int, default 0
        Samples per bin along each axis; <= 0 for the adaptive grid.
    gamma : float, default 0.1
        Scale of the offsets: bin ``(ph, pw)`` moves by ``gamma * offset * (roi_w, roi_h)``.

    Returns
    -------
    Tensor, shape (K, C, PH, PW)
        In ``input``'s dtype.

    Raises
    ------
    ValueError, TypeError
        As :func:`deformnp.ops.deform_roi_pool`.

    See Also
    --------
    deformnp.ops.deform_roi_pool : The op it applies (its offset gradient is the exact
        derivative, where mmcv's CUDA backward is not inside the clamped bands).
    deformnp.nn.mmcv.DeformRoIPool : The layer.
    """
    return _deform_roi_pool(input, rois, offset, output_size, spatial_scale, sampling_ratio, gamma)
