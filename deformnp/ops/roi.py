"""The RoI pooling family: RoI Pool, RoI Align, their position-sensitive forms, mmcv's
deformable RoI pooling and Deformable-ConvNets' deformable PS RoI pooling.

See :doc:`/ops/roi` and :doc:`/ops/deform_roi` for the formulas and gradients.

Boxes (every op): a (K, 5) array of (batch_index, x1, y1, x2, y2) in input-image coordinates, or
a list of (L_i, 4) arrays, one per image (torchvision's ``convert_boxes_to_roi_format``: the list
position is the batch index). Boxes must have the input's float dtype (mixed dtypes are a
TypeError, as in torchvision) and every batch index must be an integer in [0, B). Boxes are not
differentiated. ``output_size`` is an int or a pair (PH, PW). Output (K, C', PH, PW).
``round`` is C's (half away from zero). Gradients flow to the feature map and, for the
deformable ops, to the offsets; they are exact derivatives of the forward (the right-hand slope
at integer coordinates, zero inside a clamped band).

Decisions:

* Box geometry and sample coordinates of the RoI Align family are computed in float64 for both
  dtypes (torchvision computes in the input's dtype); float32 outputs therefore agree with
  torchvision to float32 rounding, except that the adaptive grid ceil(roi_h / PH) can differ
  when roi_h / PH is within float32 rounding of an integer.
* The integer bins of roi_pool / ps_roi_pool are computed in the input's dtype, like
  torchvision, so they match it bin for bin in both dtypes.
* roi_pool: the first maximum in row-major order wins and NaN counts as a maximum (the first NaN
  wins, as ``numpy.argmax``); torchvision starts from -FLT_MAX and skips NaN.
* Boxes with NaN/inf coordinates give zero outputs (their samples are out of range; their
  pooling bins are empty). A bin of more than 2**24 samples is refused with a ValueError: an
  adaptive grid (sampling_ratio <= 0) of that size (pass a positive sampling_ratio), a
  sampling_ratio (or sample_per_part) above 4096.
* ``argmax`` given to ``roi_pool_backward`` must hold integers in [-1, H*W) (as
  ``roi_pool_forward`` returns them); anything else is refused, never used as an index.

The array-level pairs, for wrapping in other frameworks (plain arrays in and out; the backwards
of the non-deformable ops take the input's shape, the deformable ones the input itself, whose
values the offset gradient needs; ``needs`` selects the gradients, one flag per differentiable
input, the others are None)::

    out = roi_align_forward(input, boxes, output_size, spatial_scale, sampling_ratio, aligned)
    (grad_input,) = roi_align_backward(grad_out, input.shape, boxes, output_size, spatial_scale,
                                       sampling_ratio, aligned)
    out, argmax = roi_pool_forward(input, boxes, output_size, spatial_scale, return_argmax=True)
    (grad_input,) = roi_pool_backward(grad_out, input.shape, boxes, output_size, spatial_scale,
                                      argmax=argmax)
    # likewise ps_roi_align_forward / _backward and ps_roi_pool_forward / _backward
    out = deform_roi_pool_forward(input, boxes, offset, output_size, spatial_scale,
                                  sampling_ratio, gamma)
    grad_input, grad_offset = deform_roi_pool_backward(grad_out, input, boxes, offset, ...)
    out = deform_ps_roi_pool_forward(input, boxes, offset, spatial_scale, output_dim,
                                     group_size, pooled_size, part_size, sample_per_part,
                                     trans_std)
    grad_input, grad_offset = deform_ps_roi_pool_backward(grad_out, input, boxes, offset, ...)

CPU gradients are deterministic (bit-identical with any number of threads). On CUDA the input
gradient is scattered with float atomic adds (last bits vary from run to run) unless
``deformnp.use_deterministic_algorithms(True)`` is set, which makes it bit-reproducible too.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from types import ModuleType
from typing import Any

import numpy as np

from ..cuda import as_device_array, is_cuda_array
from ..function import Context, Function
from ..kernels.cpu import roi as cpu_kernels
from ..tensor import Tensor, unwrap
from ..typing import Array, ArrayLike, Boxes, IntPair, Needs, TensorLike
from ..validation import (
    check_ndim,
    contiguous,
    device_c_contiguous,
    device_of,
    float_array,
    grad_array,
    integer,
    integers,
    needs_flags,
    pair,
    real,
    same_dtype,
)

__all__ = [
    "roi_pool",
    "roi_pool_forward",
    "roi_pool_backward",
    "roi_align",
    "roi_align_forward",
    "roi_align_backward",
    "ps_roi_pool",
    "ps_roi_pool_forward",
    "ps_roi_pool_backward",
    "ps_roi_align",
    "ps_roi_align_forward",
    "ps_roi_align_backward",
    "deform_roi_pool",
    "deform_roi_pool_forward",
    "deform_roi_pool_backward",
    "deform_ps_roi_pool",
    "deform_ps_roi_pool_forward",
    "deform_ps_roi_pool_backward",
]

MAX_SAMPLES_PER_BIN = 2**24
MAX_SAMPLING_RATIO = 2**12  # a fixed grid of at most MAX_SAMPLES_PER_BIN samples per bin


def _kernels(device: str) -> ModuleType:
    """The CPU kernels, or the CUDA ones (imported on first use: numba-cuda is optional)."""
    if device == "cuda":
        from ..kernels.cuda import roi as cuda_kernels

        return cuda_kernels
    return cpu_kernels


# ============================================================================ validation


def _host(a: Any) -> np.ndarray:
    a = unwrap(a)
    if is_cuda_array(a):
        from ..cuda import as_device_array

        return as_device_array(a).copy_to_host()
    return np.asarray(a)


def _input(op: str, input: Any) -> Array:
    inp = float_array(op, "input", input)
    check_ndim(op, "input", inp, 4, "(N, C, H, W)")
    return inp


@dataclass(frozen=True)
class InputShape:
    """Stands in for the input of a backward that uses only its shape: the shape, and the dtype
    and device of the incoming gradient (which must be the input's)."""

    shape: tuple[int, int, int, int]
    dtype: np.dtype
    device: str


def input_shape_of(op: str, input_shape: Any, grad_out: Any) -> InputShape:
    """Validate a backward's ``input_shape`` (N, C, H, W), taking dtype and device from
    ``grad_out``."""
    if getattr(input_shape, "ndim", 1) != 1:  # the input itself, as before the shape-only API
        raise TypeError(
            f"{op}: input_shape must be the input's shape (N, C, H, W), got an array of shape "
            f"{tuple(input_shape.shape)}; pass input.shape"
        )
    shape = integers(op, "input_shape", input_shape)
    if len(shape) != 4 or min(shape) < 0:
        raise ValueError(
            f"{op}: input_shape must be 4 non-negative ints (N, C, H, W), got {input_shape!r}"
        )
    g = unwrap(grad_out)
    device = device_of(op, grad_out=g)
    g = as_device_array(g) if device == "cuda" else np.asarray(g)  # torch dtypes are not NumPy's
    dtype = np.dtype(g.dtype)
    if dtype not in (np.dtype(np.float32), np.dtype(np.float64)):
        raise TypeError(f"{op}: grad_out must be float32 or float64, got {dtype}")
    return InputShape(shape, dtype, device)  # type: ignore[arg-type]


def _input_and_device(op: str, input: Any) -> tuple[Any, str]:
    """The checked input (or its :class:`InputShape` stand-in) and its device."""
    if isinstance(input, InputShape):
        return input, input.device
    input = unwrap(input)
    return _input(op, input), device_of(op, input=input)


def _rois(op: str, boxes: Any, inp: Array) -> np.ndarray:
    """Boxes as the (K, 5) host array (batch_index, x1, y1, x2, y2) in the input's dtype."""
    B = inp.shape[0]
    dtype = np.dtype(inp.dtype)
    # a shape-only backward takes the dtype from grad_out: name that in dtype messages
    ref = {"grad_out" if isinstance(inp, InputShape) else "input": inp}
    if isinstance(boxes, (list, tuple)):
        parts = []
        for i, b in enumerate(boxes):
            name = f"boxes[{i}]"
            a = float_array(op, name, _host(b))
            same_dtype(op, **ref, **{name: a})
            if a.ndim != 2 or a.shape[1] != 4:
                raise ValueError(
                    f"{op}: {name} must be an (L, 4) array of (x1, y1, x2, y2) for image {i}, "
                    f"got shape {tuple(a.shape)}"
                )
            parts.append(np.concatenate([np.full((a.shape[0], 1), i, dtype), a], axis=1))
        rois = np.concatenate(parts, axis=0) if parts else np.zeros((0, 5), dtype)
    else:
        if boxes is None:
            raise TypeError(
                f"{op}: boxes must be a (K, 5) array or a list of (L, 4) arrays, got None"
            )
        rois = float_array(op, "boxes", _host(boxes))
        same_dtype(op, **ref, boxes=rois)
        if rois.ndim != 2 or rois.shape[1] != 5:
            raise ValueError(
                f"{op}: boxes must be a (K, 5) array of (batch_index, x1, y1, x2, y2) or a list "
                f"of (L, 4) arrays, got shape {tuple(rois.shape)}"
            )
    idx = rois[:, 0]
    with np.errstate(invalid="ignore"):
        bad = ~(np.isfinite(idx) & (idx == np.floor(idx)) & (idx >= 0) & (idx < B))
    if bad.any():
        k = int(np.argmax(bad))
        where = (
            f"box {k} (of the list form, image {int(idx[k])})"
            if isinstance(boxes, (list, tuple))
            else f"boxes[{k}, 0] = {float(idx[k])}"
        )
        raise ValueError(
            f"{op}: {where} is not a batch index of input (batch size {B}): expected an integer "
            f"in [0, {B - 1}]"
            if B > 0
            else f"{op}: {where} is not a batch index of input: the input has batch size 0"
        )
    return contiguous(rois)


def _sampling_ratio(op: str, v: Any) -> int:
    return integer(op, "sampling_ratio", v, maximum=MAX_SAMPLING_RATIO)


def _check_grid(op: str, rois: np.ndarray, s: float, size: tuple[int, int], ratio: int) -> None:
    """Refuse adaptive sampling grids too large to compute (see the module docstring)."""
    if ratio > 0 or rois.shape[0] == 0:
        return
    r = rois.astype(np.float64)
    with np.errstate(invalid="ignore", over="ignore"):
        gh = np.ceil(np.abs(r[:, 4] - r[:, 2]) * abs(s) / size[0])
        gw = np.ceil(np.abs(r[:, 3] - r[:, 1]) * abs(s) / size[1])
        n = np.where(np.isfinite(gh) & np.isfinite(gw), (gh + 1) * (gw + 1), 0.0)
    if n.max() > MAX_SAMPLES_PER_BIN:
        k = int(np.argmax(n))
        raise ValueError(
            f"{op}: box {k} needs about {n[k]:.3g} samples per bin with sampling_ratio <= 0 "
            f"(adaptive), more than {MAX_SAMPLES_PER_BIN}; pass a positive sampling_ratio"
        )


def _position_sensitive(op: str, C: int, PH: int, PW: int) -> int:
    """The output channels of a position-sensitive op: C / (PH*PW), which must be whole."""
    if C % (PH * PW) != 0:
        raise ValueError(
            f"{op}: input has {C} channels, expected a multiple of "
            f"output_size[0]*output_size[1] = {PH * PW}"
        )
    return C // (PH * PW)


@dataclass(frozen=True)
class RoIArgs:
    """The checked arguments of one call of a RoI op: the input (C-contiguous, on ``device``),
    the boxes as the (K, 5) host array in the input's dtype, the deformable ops' offset (or
    None), and the parameters (``params``, in the kernels' order); ``out_shape`` the output's."""

    op: str
    input: Array
    rois: np.ndarray
    offset: Array | None
    params: tuple
    device: str
    out_shape: tuple[int, int, int, int]

    @property
    def input_shape(self) -> tuple[int, int, int, int]:
        return tuple(int(s) for s in self.input.shape)  # type: ignore[return-value]


def _grad(a: RoIArgs, grad_out: ArrayLike) -> Array:
    return grad_array(a.op, "grad_out", grad_out, a.input.dtype, a.out_shape, a.device)


# ============================================================================ roi_align


def prepare_roi_align(
    input: TensorLike,
    boxes: Boxes,
    output_size: IntPair,
    spatial_scale: float,
    sampling_ratio: int,
    aligned: bool,
    op: str = "roi_align",
) -> RoIArgs:
    """Validate the arguments of :func:`roi_align` (or, with ``op``, :func:`ps_roi_align`)."""
    inp, device = _input_and_device(op, input)
    PH, PW = pair(op, "output_size", output_size, minimum=1)
    s = real(op, "spatial_scale", spatial_scale)
    ratio = _sampling_ratio(op, sampling_ratio)
    rois = _rois(op, boxes, inp)
    K, C = rois.shape[0], inp.shape[1]
    if op == "ps_roi_align":
        C = _position_sensitive(op, C, PH, PW)
        params: tuple = ((PH, PW), s, ratio)
    else:
        params = ((PH, PW), s, ratio, bool(aligned))
    _check_grid(op, rois, s, (PH, PW), ratio)
    return RoIArgs(op, inp, rois, None, params, device, (K, C, PH, PW))


class RoIAlignFunction(Function):
    """Autograd node of :func:`roi_align`; ``args`` from :func:`prepare_roi_align`."""

    supports_cuda = True  # forward/backward dispatch on the arrays' device
    fresh_grads = True  # backward allocates every gradient it returns

    @staticmethod
    def forward(ctx: Context, input: Array, *, args: RoIArgs) -> Array:
        ctx.save_for_backward(args)
        return _kernels(args.device).roi_align_forward(args.input, args.rois, *args.params)

    @staticmethod
    def backward(ctx: Context, grad: Array) -> tuple:
        (a,) = ctx.saved_tensors
        return _kernels(a.device).roi_align_backward(
            contiguous(grad), a.rois, a.input_shape, *a.params, ctx.needs_input_grad[:1]
        )


def roi_align_forward(
    input: ArrayLike,
    boxes: Boxes,
    output_size: IntPair,
    spatial_scale: float = 1.0,
    sampling_ratio: int = -1,
    aligned: bool = False,
) -> Array:
    """Array-level forward of :func:`roi_align`: plain arrays in, a plain array out.

    Parameters
    ----------
    input : array_like, shape (N, C, H, W)
        The feature map, float32 or float64.
    boxes : array_like, shape (K, 5), or list of array_like, shape (L_i, 4)
        The RoIs in input-image coordinates: rows ``(batch_index, x1, y1, x2, y2)``, or one
        array of rows ``(x1, y1, x2, y2)`` per image (the list position is the batch index).
        In ``input``'s dtype; read on the host; not differentiated.
    output_size : int or (int, int)
        The bins per RoI, ``(PH, PW)`` (an int for both); at least 1.
    spatial_scale : float, default 1.0
        Scale ``s`` from box coordinates to ``input``'s pixel coordinates (e.g. 1/16 for a
        stride-16 feature map).
    sampling_ratio : int, default -1
        Samples per bin along each axis; <= 0 for the adaptive grid ``ceil(roi_h / PH)`` by
        ``ceil(roi_w / PW)``. At most 4096.
    aligned : bool, default False
        True shifts the boxes by -0.5 pixel (pixel centres at integer + 0.5, as in
        torchvision's ``aligned=True``) and drops the minimum RoI size of 1.

    Returns
    -------
    out : ndarray or CUDA device array, shape (K, C, PH, PW)
        In ``input``'s dtype, on its device.

    Raises
    ------
    TypeError
        If an array is not float32/float64, ``boxes`` (or ``offset``) does not have ``input``'s
        dtype, ``boxes`` is None, or an integer or real parameter has the wrong type.
    ValueError
        If a shape is wrong, a sampling grid is too large (``sampling_ratio`` > 4096, or an adaptive
        grid of more than 2**24 samples per bin), a batch index is not an integer in [0, N),
        ``output_size`` < 1, ``spatial_scale`` is not finite, or the arrays are on different
        devices.

    See Also
    --------
    roi_align : The differentiable op.
    roi_align_backward : The matching backward.
    """
    a = prepare_roi_align(input, boxes, output_size, spatial_scale, sampling_ratio, aligned)
    return _kernels(a.device).roi_align_forward(a.input, a.rois, *a.params)


def roi_align_backward(
    grad_out: ArrayLike,
    input_shape: Sequence[int],
    boxes: Boxes,
    output_size: IntPair,
    spatial_scale: float = 1.0,
    sampling_ratio: int = -1,
    aligned: bool = False,
    needs: Needs = (True,),
) -> tuple[Array | None]:
    """Array-level backward of :func:`roi_align`: the gradient of its input.

    Parameters
    ----------
    grad_out : array_like, shape (K, C, PH, PW)
        Gradient of the loss with respect to the forward's output, in the input's dtype and on
        its device.
    input_shape : sequence of 4 int
        The forward input's shape ``(N, C, H, W)`` (only its shape is needed).
    boxes : array_like, shape (K, 5), or list of array_like, shape (L_i, 4)
        The RoIs in input-image coordinates: rows ``(batch_index, x1, y1, x2, y2)``, or one
        array of rows ``(x1, y1, x2, y2)`` per image (the list position is the batch index).
        In ``input``'s dtype; read on the host; not differentiated.
    output_size : int or (int, int)
        The bins per RoI, ``(PH, PW)`` (an int for both); at least 1.
    spatial_scale : float, default 1.0
        Scale ``s`` from box coordinates to ``input``'s pixel coordinates (e.g. 1/16 for a
        stride-16 feature map).
    sampling_ratio : int, default -1
        Samples per bin along each axis; <= 0 for the adaptive grid ``ceil(roi_h / PH)`` by
        ``ceil(roi_w / PW)``. At most 4096.
    aligned : bool, default False
        True shifts the boxes by -0.5 pixel (pixel centres at integer + 0.5, as in
        torchvision's ``aligned=True``) and drops the minimum RoI size of 1.
    needs : sequence of 1 bool, default (True,)
        Which gradients to compute: ``(input,)``.

    Returns
    -------
    grad_input : ndarray or CUDA device array, shape (N, C, H, W), or None
        Returned as the 1-tuple ``(grad_input,)``; None where ``needs[0]`` is False.

    Raises
    ------
    TypeError
        If an array is not float32/float64, ``boxes`` (or ``offset``) does not have ``input``'s
        dtype, ``boxes`` is None, or an integer or real parameter has the wrong type, or ``needs``
        is not a sequence; also when ``input_shape`` is an array rather than a shape.
    ValueError
        If a shape is wrong, a sampling grid is too large (``sampling_ratio`` > 4096, or an adaptive
        grid of more than 2**24 samples per bin), a batch index is not an integer in [0, N),
        ``output_size`` < 1, ``spatial_scale`` is not finite, or the arrays are on different
        devices; also when ``grad_out`` has the wrong shape or ``needs`` the wrong length.

    See Also
    --------
    roi_align_forward : The matching forward.

    Notes
    -----
    CPU gradients are deterministic (bit-identical with any number of threads). On CUDA the input
    gradient is scattered with float atomic adds unless
    ``deformnp.use_deterministic_algorithms(True)`` is set.
    """
    shape = input_shape_of("roi_align", input_shape, grad_out)
    a = prepare_roi_align(shape, boxes, output_size, spatial_scale, sampling_ratio, aligned)
    return _kernels(a.device).roi_align_backward(
        _grad(a, grad_out), a.rois, a.input_shape, *a.params, needs_flags(a.op, needs, ("input",))
    )


def roi_align(
    input: TensorLike,
    boxes: Boxes,
    output_size: IntPair,
    spatial_scale: float = 1.0,
    sampling_ratio: int = -1,
    aligned: bool = False,
) -> Tensor:
    r"""RoI Align, as ``torchvision.ops.roi_align``: bilinear average pooling over each box.

    Each box is divided into ``PH x PW`` bins; each bin averages a regular grid of bilinear
    samples of the input. The gradient flows to ``input`` when it is a Tensor that requires
    grad (boxes are not differentiated).

    Parameters
    ----------
    input : Tensor or array_like, shape (N, C, H, W)
        The feature map, float32 or float64.
    boxes : array_like, shape (K, 5), or list of array_like, shape (L_i, 4)
        The RoIs in input-image coordinates: rows ``(batch_index, x1, y1, x2, y2)``, or one
        array of rows ``(x1, y1, x2, y2)`` per image (the list position is the batch index).
        In ``input``'s dtype; read on the host; not differentiated.
    output_size : int or (int, int)
        The bins per RoI, ``(PH, PW)`` (an int for both); at least 1.
    spatial_scale : float, default 1.0
        Scale ``s`` from box coordinates to ``input``'s pixel coordinates (e.g. 1/16 for a
        stride-16 feature map).
    sampling_ratio : int, default -1
        Samples per bin along each axis; <= 0 for the adaptive grid ``ceil(roi_h / PH)`` by
        ``ceil(roi_w / PW)``. At most 4096.
    aligned : bool, default False
        True shifts the boxes by -0.5 pixel (pixel centres at integer + 0.5, as in
        torchvision's ``aligned=True``) and drops the minimum RoI size of 1.

    Returns
    -------
    Tensor, shape (K, C, PH, PW)
        One pooled map per box, in ``input``'s dtype.

    Raises
    ------
    TypeError
        If an array is not float32/float64, ``boxes`` (or ``offset``) does not have ``input``'s
        dtype, ``boxes`` is None, or an integer or real parameter has the wrong type.
    ValueError
        If a shape is wrong, a sampling grid is too large (``sampling_ratio`` > 4096, or an adaptive
        grid of more than 2**24 samples per bin), a batch index is not an integer in [0, N),
        ``output_size`` < 1, ``spatial_scale`` is not finite, or the arrays are on different
        devices.

    See Also
    --------
    deformnp.nn.RoIAlign : The layer.
    ps_roi_align : The position-sensitive form.
    deform_roi_pool : RoI Align with learned bin offsets.
    roi_align_forward, roi_align_backward : The array-level pair.

    Notes
    -----
    With ``o = 0.5`` if ``aligned`` else 0, the box starts at :math:`x_0 = x_1 s - o` and has
    width :math:`w = x_2 s - x_1 s` (at least 1 when not ``aligned``), likewise :math:`y_0` and
    :math:`h`; bins are :math:`b_w = w / PW` wide, sampled on a :math:`g_h \times g_w` grid
    (``sampling_ratio``, or :math:`\lceil w / PW \rceil` when it is <= 0):

    .. math::

        \mathrm{out}[k, c, i, j] = \frac{1}{\max(g_h g_w, 1)} \sum_{a < g_h} \sum_{b < g_w}
        x_c\Big(y_0 + i\,b_h + (a + \tfrac12) \frac{b_h}{g_h},\;
        x_0 + j\,b_w + (b + \tfrac12) \frac{b_w}{g_w}\Big),

    each sample taken with the clamp rule of :func:`bilinear_interpolate`. Box geometry and
    sample coordinates are computed in float64 for both dtypes (torchvision uses the input's
    dtype). See :doc:`/ops/roi` for the formulas and gradients.

    Examples
    --------
    >>> import numpy as np
    >>> from deformnp.ops import roi_align
    >>> x = np.ones((2, 3, 8, 8))
    >>> boxes = np.array([[0, 0.0, 0.0, 4.0, 4.0], [1, 2.0, 2.0, 6.0, 7.0]])
    >>> out = roi_align(x, boxes, output_size=2, sampling_ratio=2)
    >>> out.shape
    (2, 3, 2, 2)
    >>> float(out.numpy().max())
    1.0
    """
    args = prepare_roi_align(input, boxes, output_size, spatial_scale, sampling_ratio, aligned)
    return RoIAlignFunction.apply(input, args=args)


# ============================================================================ ps_roi_align


def prepare_ps_roi_align(
    input: TensorLike,
    boxes: Boxes,
    output_size: IntPair,
    spatial_scale: float,
    sampling_ratio: int,
) -> RoIArgs:
    """Validate the arguments of :func:`ps_roi_align`."""
    return prepare_roi_align(
        input, boxes, output_size, spatial_scale, sampling_ratio, True, "ps_roi_align"
    )


class PSRoIAlignFunction(Function):
    """Autograd node of :func:`ps_roi_align`; ``args`` from :func:`prepare_ps_roi_align`."""

    supports_cuda = True
    fresh_grads = True  # backward allocates every gradient it returns

    @staticmethod
    def forward(ctx: Context, input: Array, *, args: RoIArgs) -> Array:
        ctx.save_for_backward(args)
        return _kernels(args.device).ps_roi_align_forward(args.input, args.rois, *args.params)

    @staticmethod
    def backward(ctx: Context, grad: Array) -> tuple:
        (a,) = ctx.saved_tensors
        return _kernels(a.device).ps_roi_align_backward(
            contiguous(grad), a.rois, a.input_shape, *a.params, ctx.needs_input_grad[:1]
        )


def ps_roi_align_forward(
    input: ArrayLike,
    boxes: Boxes,
    output_size: IntPair,
    spatial_scale: float = 1.0,
    sampling_ratio: int = -1,
) -> Array:
    """Array-level forward of :func:`ps_roi_align`: plain arrays in, a plain array out.

    Parameters
    ----------
    input : array_like, shape (N, C, H, W)
        The feature map, float32 or float64; ``C`` a multiple of ``PH*PW``.
    boxes : array_like, shape (K, 5), or list of array_like, shape (L_i, 4)
        The RoIs in input-image coordinates: rows ``(batch_index, x1, y1, x2, y2)``, or one
        array of rows ``(x1, y1, x2, y2)`` per image (the list position is the batch index).
        In ``input``'s dtype; read on the host; not differentiated.
    output_size : int or (int, int)
        The bins per RoI, ``(PH, PW)`` (an int for both); at least 1.
    spatial_scale : float, default 1.0
        Scale ``s`` from box coordinates to ``input``'s pixel coordinates (e.g. 1/16 for a
        stride-16 feature map).
    sampling_ratio : int, default -1
        Samples per bin along each axis; <= 0 for the adaptive grid ``ceil(roi_h / PH)`` by
        ``ceil(roi_w / PW)``. At most 4096.

    Returns
    -------
    out : ndarray or CUDA device array, shape (K, C / (PH*PW), PH, PW)
        In ``input``'s dtype, on its device.

    Raises
    ------
    TypeError
        If an array is not float32/float64, ``boxes`` (or ``offset``) does not have ``input``'s
        dtype, ``boxes`` is None, or an integer or real parameter has the wrong type.
    ValueError
        If a shape is wrong, ``C`` is not a multiple of ``PH*PW``, a sampling grid is too large
        (``sampling_ratio`` > 4096, or an adaptive grid of more than 2**24 samples per bin), a batch
        index is not an integer in [0, N), ``output_size`` < 1, ``spatial_scale`` is not finite, or
        the arrays are on different devices.

    See Also
    --------
    ps_roi_align : The differentiable op.
    ps_roi_align_backward : The matching backward.
    """
    a = prepare_ps_roi_align(input, boxes, output_size, spatial_scale, sampling_ratio)
    return _kernels(a.device).ps_roi_align_forward(a.input, a.rois, *a.params)


def ps_roi_align_backward(
    grad_out: ArrayLike,
    input_shape: Sequence[int],
    boxes: Boxes,
    output_size: IntPair,
    spatial_scale: float = 1.0,
    sampling_ratio: int = -1,
    needs: Needs = (True,),
) -> tuple[Array | None]:
    """Array-level backward of :func:`ps_roi_align`: the gradient of its input.

    Parameters
    ----------
    grad_out : array_like, shape (K, C / (PH*PW), PH, PW)
        Gradient of the loss with respect to the forward's output, in the input's dtype and on
        its device.
    input_shape : sequence of 4 int
        The forward input's shape ``(N, C, H, W)`` (only its shape is needed).
    boxes : array_like, shape (K, 5), or list of array_like, shape (L_i, 4)
        The RoIs in input-image coordinates: rows ``(batch_index, x1, y1, x2, y2)``, or one
        array of rows ``(x1, y1, x2, y2)`` per image (the list position is the batch index).
        In ``input``'s dtype; read on the host; not differentiated.
    output_size : int or (int, int)
        The bins per RoI, ``(PH, PW)`` (an int for both); at least 1.
    spatial_scale : float, default 1.0
        Scale ``s`` from box coordinates to ``input``'s pixel coordinates (e.g. 1/16 for a
        stride-16 feature map).
    sampling_ratio : int, default -1
        Samples per bin along each axis; <= 0 for the adaptive grid ``ceil(roi_h / PH)`` by
        ``ceil(roi_w / PW)``. At most 4096.
    needs : sequence of 1 bool, default (True,)
        Which gradients to compute: ``(input,)``.

    Returns
    -------
    grad_input : ndarray or CUDA device array, shape (N, C, H, W), or None
        Returned as the 1-tuple ``(grad_input,)``; None where ``needs[0]`` is False.

    Raises
    ------
    TypeError
        If an array is not float32/float64, ``boxes`` (or ``offset``) does not have ``input``'s
        dtype, ``boxes`` is None, or an integer or real parameter has the wrong type, or ``needs``
        is not a sequence; also when ``input_shape`` is an array rather than a shape.
    ValueError
        If a shape is wrong, ``C`` is not a multiple of ``PH*PW``, a sampling grid is too large
        (``sampling_ratio`` > 4096, or an adaptive grid of more than 2**24 samples per bin), a batch
        index is not an integer in [0, N), ``output_size`` < 1, ``spatial_scale`` is not finite, or
        the arrays are on different devices; also when ``grad_out`` has the wrong shape or ``needs``
        the wrong length.

    See Also
    --------
    ps_roi_align_forward : The matching forward.

    Notes
    -----
    CPU gradients are deterministic (bit-identical with any number of threads). On CUDA the input
    gradient is scattered with float atomic adds unless
    ``deformnp.use_deterministic_algorithms(True)`` is set.
    """
    shape = input_shape_of("ps_roi_align", input_shape, grad_out)
    a = prepare_ps_roi_align(shape, boxes, output_size, spatial_scale, sampling_ratio)
    return _kernels(a.device).ps_roi_align_backward(
        _grad(a, grad_out), a.rois, a.input_shape, *a.params, needs_flags(a.op, needs, ("input",))
    )


def ps_roi_align(
    input: TensorLike,
    boxes: Boxes,
    output_size: IntPair,
    spatial_scale: float = 1.0,
    sampling_ratio: int = -1,
) -> Tensor:
    """Position-sensitive RoI Align, as ``torchvision.ops.ps_roi_align``.

    RoI Align where each bin reads its own group of channels: output channel ``co`` at bin
    ``(ph, pw)`` averages input channel ``(co*PH + ph)*PW + pw``. The gradient flows to
    ``input`` when it is a Tensor that requires grad.

    Parameters
    ----------
    input : Tensor or array_like, shape (N, C, H, W)
        The feature map, float32 or float64; ``C`` a multiple of ``PH*PW``.
    boxes : array_like, shape (K, 5), or list of array_like, shape (L_i, 4)
        The RoIs in input-image coordinates: rows ``(batch_index, x1, y1, x2, y2)``, or one
        array of rows ``(x1, y1, x2, y2)`` per image (the list position is the batch index).
        In ``input``'s dtype; read on the host; not differentiated.
    output_size : int or (int, int)
        The bins per RoI, ``(PH, PW)`` (an int for both); at least 1.
    spatial_scale : float, default 1.0
        Scale ``s`` from box coordinates to ``input``'s pixel coordinates (e.g. 1/16 for a
        stride-16 feature map).
    sampling_ratio : int, default -1
        Samples per bin along each axis; <= 0 for the adaptive grid ``ceil(roi_h / PH)`` by
        ``ceil(roi_w / PW)``. At most 4096.

    Returns
    -------
    Tensor, shape (K, C / (PH*PW), PH, PW)
        In ``input``'s dtype.

    Raises
    ------
    TypeError
        If an array is not float32/float64, ``boxes`` (or ``offset``) does not have ``input``'s
        dtype, ``boxes`` is None, or an integer or real parameter has the wrong type.
    ValueError
        If a shape is wrong, ``C`` is not a multiple of ``PH*PW``, a sampling grid is too large
        (``sampling_ratio`` > 4096, or an adaptive grid of more than 2**24 samples per bin), a batch
        index is not an integer in [0, N), ``output_size`` < 1, ``spatial_scale`` is not finite, or
        the arrays are on different devices.

    See Also
    --------
    deformnp.nn.PSRoIAlign : The layer.
    roi_align : The plain form.
    ps_roi_align_forward, ps_roi_align_backward : The array-level pair.

    Notes
    -----
    The sampling is :func:`roi_align`'s with ``aligned=True`` (no minimum RoI size), averaged
    over ``max(gh*gw, 1)`` samples: an empty grid gives 0 (torchvision divides by ``gh*gw`` and
    gives NaN). See :doc:`/ops/roi` for the formulas and gradients.

    Examples
    --------
    >>> import numpy as np
    >>> from deformnp.ops import ps_roi_align
    >>> x = np.ones((1, 2 * 3 * 3, 8, 8))  # 2 output channels, 3x3 bins
    >>> out = ps_roi_align(x, [np.array([[0.0, 0.0, 6.0, 6.0]])], output_size=3)
    >>> out.shape
    (1, 2, 3, 3)
    """
    args = prepare_ps_roi_align(input, boxes, output_size, spatial_scale, sampling_ratio)
    return PSRoIAlignFunction.apply(input, args=args)


# ============================================================================ deform_roi_pool


def prepare_deform_roi_pool(
    input: TensorLike,
    boxes: Boxes,
    offset: TensorLike | None,
    output_size: IntPair,
    spatial_scale: float,
    sampling_ratio: int,
    gamma: float,
) -> RoIArgs:
    """Validate the arguments of :func:`deform_roi_pool`."""
    op = "deform_roi_pool"
    input, offset = unwrap(input), unwrap(offset)
    device = device_of(op, input=input, offset=offset)
    inp = _input(op, input)
    PH, PW = pair(op, "output_size", output_size, minimum=1)
    s = real(op, "spatial_scale", spatial_scale)
    ratio = _sampling_ratio(op, sampling_ratio)
    g = real(op, "gamma", gamma)
    rois = _rois(op, boxes, inp)
    K, C = rois.shape[0], inp.shape[1]
    off = None
    if offset is not None:
        off = float_array(op, "offset", offset)
        same_dtype(op, input=inp, offset=off)
        if tuple(off.shape) != (K, 2, PH, PW):
            raise ValueError(
                f"{op}: offset must have shape (K, 2, PH, PW) = {(K, 2, PH, PW)} (channel 0 x, "
                f"1 y), got {tuple(off.shape)}"
            )
    _check_grid(op, rois, s, (PH, PW), ratio)
    return RoIArgs(op, inp, rois, off, ((PH, PW), s, ratio, g), device, (K, C, PH, PW))


class DeformRoIPoolFunction(Function):
    """Autograd node of :func:`deform_roi_pool`: positional inputs (input, offset), ``args`` from
    :func:`prepare_deform_roi_pool`."""

    supports_cuda = True
    fresh_grads = True  # backward allocates every gradient it returns

    @staticmethod
    def forward(ctx: Context, input: Array, offset: Array | None, *, args: RoIArgs) -> Array:
        ctx.save_for_backward(args)
        return _kernels(args.device).deform_roi_pool_forward(
            args.input, args.rois, args.offset, *args.params
        )

    @staticmethod
    def backward(ctx: Context, grad: Array) -> tuple:
        (a,) = ctx.saved_tensors
        return _kernels(a.device).deform_roi_pool_backward(
            contiguous(grad), a.input, a.rois, a.offset, *a.params, ctx.needs_input_grad[:2]
        )


def deform_roi_pool_forward(
    input: ArrayLike,
    boxes: Boxes,
    offset: ArrayLike | None = None,
    output_size: IntPair = 7,
    spatial_scale: float = 1.0,
    sampling_ratio: int = 0,
    gamma: float = 0.1,
) -> Array:
    """Array-level forward of :func:`deform_roi_pool`: plain arrays in, a plain array out.

    Parameters
    ----------
    input : array_like, shape (N, C, H, W)
        The feature map, float32 or float64.
    boxes : array_like, shape (K, 5), or list of array_like, shape (L_i, 4)
        The RoIs in input-image coordinates: rows ``(batch_index, x1, y1, x2, y2)``, or one
        array of rows ``(x1, y1, x2, y2)`` per image (the list position is the batch index).
        In ``input``'s dtype; read on the host; not differentiated.
    offset : array_like, shape (K, 2, PH, PW), optional
        The normalized shift of each bin: channel 0 is x, channel 1 is y (mmcv's order), in
        ``input``'s dtype. None for no shift.
    output_size : int or (int, int), default 7
        The bins per RoI, ``(PH, PW)`` (an int for both); at least 1.
    spatial_scale : float, default 1.0
        Scale ``s`` from box coordinates to ``input``'s pixel coordinates (e.g. 1/16 for a
        stride-16 feature map).
    sampling_ratio : int, default 0
        Samples per bin along each axis; <= 0 for the adaptive grid ``ceil(roi_h / PH)`` by
        ``ceil(roi_w / PW)``. At most 4096.
    gamma : float, default 0.1
        Scale of the offsets: bin ``(ph, pw)`` moves by ``gamma * offset * (roi_w, roi_h)``.

    Returns
    -------
    out : ndarray or CUDA device array, shape (K, C, PH, PW)
        In ``input``'s dtype, on its device.

    Raises
    ------
    TypeError
        If an array is not float32/float64, ``boxes`` (or ``offset``) does not have ``input``'s
        dtype, ``boxes`` is None, or an integer or real parameter has the wrong type.
    ValueError
        If a shape is wrong, a sampling grid is too large (``sampling_ratio`` > 4096, or an adaptive
        grid of more than 2**24 samples per bin), a batch index is not an integer in [0, N),
        ``output_size`` < 1, ``spatial_scale`` is not finite, or the arrays are on different
        devices.

    See Also
    --------
    deform_roi_pool : The differentiable op.
    deform_roi_pool_backward : The matching backward.
    """
    a = prepare_deform_roi_pool(
        input, boxes, offset, output_size, spatial_scale, sampling_ratio, gamma
    )
    return _kernels(a.device).deform_roi_pool_forward(a.input, a.rois, a.offset, *a.params)


def deform_roi_pool_backward(
    grad_out: ArrayLike,
    input: ArrayLike,
    boxes: Boxes,
    offset: ArrayLike | None = None,
    output_size: IntPair = 7,
    spatial_scale: float = 1.0,
    sampling_ratio: int = 0,
    gamma: float = 0.1,
    needs: Needs = (True, True),
) -> tuple[Array | None, Array | None]:
    """Array-level backward of :func:`deform_roi_pool`: the gradients of ``input`` and ``offset``.

    Parameters
    ----------
    grad_out : array_like, shape (K, C, PH, PW)
        Gradient of the loss with respect to the forward's output, in the input's dtype and on
        its device.
    input : array_like, shape (N, C, H, W)
        The forward's ``input`` (its values are needed for the offset gradient).
    boxes : array_like, shape (K, 5), or list of array_like, shape (L_i, 4)
        The RoIs in input-image coordinates: rows ``(batch_index, x1, y1, x2, y2)``, or one
        array of rows ``(x1, y1, x2, y2)`` per image (the list position is the batch index).
        In ``input``'s dtype; read on the host; not differentiated.
    offset : array_like, shape (K, 2, PH, PW), optional
        The normalized shift of each bin: channel 0 is x, channel 1 is y (mmcv's order), in
        ``input``'s dtype. None for no shift.
    output_size : int or (int, int), default 7
        The bins per RoI, ``(PH, PW)`` (an int for both); at least 1.
    spatial_scale : float, default 1.0
        Scale ``s`` from box coordinates to ``input``'s pixel coordinates (e.g. 1/16 for a
        stride-16 feature map).
    sampling_ratio : int, default 0
        Samples per bin along each axis; <= 0 for the adaptive grid ``ceil(roi_h / PH)`` by
        ``ceil(roi_w / PW)``. At most 4096.
    gamma : float, default 0.1
        Scale of the offsets: bin ``(ph, pw)`` moves by ``gamma * offset * (roi_w, roi_h)``.
    needs : sequence of 2 bool, default (True, True)
        Which gradients to compute: ``(input, offset)``.

    Returns
    -------
    grad_input : ndarray or CUDA device array, shape (N, C, H, W), or None
    grad_offset : ndarray or CUDA device array, shape (K, 2, PH, PW), or None
        None where the ``needs`` flag is False; ``grad_offset`` also when ``offset`` is None.

    Raises
    ------
    TypeError
        If an array is not float32/float64, ``boxes`` (or ``offset``) does not have ``input``'s
        dtype, ``boxes`` is None, or an integer or real parameter has the wrong type, or ``needs``
        is not a sequence.
    ValueError
        If a shape is wrong, a sampling grid is too large (``sampling_ratio`` > 4096, or an adaptive
        grid of more than 2**24 samples per bin), a batch index is not an integer in [0, N),
        ``output_size`` < 1, ``spatial_scale`` is not finite, or the arrays are on different
        devices; also when ``grad_out`` has the wrong shape or ``needs`` the wrong length.

    See Also
    --------
    deform_roi_pool_forward : The matching forward.

    Notes
    -----
    CPU gradients are deterministic (bit-identical with any number of threads). On CUDA the input
    gradient is scattered with float atomic adds unless
    ``deformnp.use_deterministic_algorithms(True)`` is set.
    """
    a = prepare_deform_roi_pool(
        input, boxes, offset, output_size, spatial_scale, sampling_ratio, gamma
    )
    return _kernels(a.device).deform_roi_pool_backward(
        _grad(a, grad_out), a.input, a.rois, a.offset, *a.params,
        needs_flags(a.op, needs, ("input", "offset")),
    )  # fmt: skip


def deform_roi_pool(
    input: TensorLike,
    boxes: Boxes,
    offset: TensorLike | None = None,
    output_size: IntPair = 7,
    spatial_scale: float = 1.0,
    sampling_ratio: int = 0,
    gamma: float = 0.1,
) -> Tensor:
    r"""Deformable RoI pooling, as ``mmcv.ops.deform_roi_pool`` (the DCN paper's).

    RoI Align (``aligned=True``, no minimum RoI size) whose bins are shifted by learned,
    box-relative offsets. Gradients flow to ``input`` and ``offset`` when they are Tensors that
    require grad.

    Parameters
    ----------
    input : Tensor or array_like, shape (N, C, H, W)
        The feature map, float32 or float64.
    boxes : array_like, shape (K, 5), or list of array_like, shape (L_i, 4)
        The RoIs in input-image coordinates: rows ``(batch_index, x1, y1, x2, y2)``, or one
        array of rows ``(x1, y1, x2, y2)`` per image (the list position is the batch index).
        In ``input``'s dtype; read on the host; not differentiated.
    offset : Tensor or array_like, shape (K, 2, PH, PW), optional
        The normalized shift of each bin: channel 0 is x, channel 1 is y (mmcv's order), in
        ``input``'s dtype. None for no shift.
    output_size : int or (int, int), default 7
        The bins per RoI, ``(PH, PW)`` (an int for both); at least 1.
    spatial_scale : float, default 1.0
        Scale ``s`` from box coordinates to ``input``'s pixel coordinates (e.g. 1/16 for a
        stride-16 feature map).
    sampling_ratio : int, default 0
        Samples per bin along each axis; <= 0 for the adaptive grid ``ceil(roi_h / PH)`` by
        ``ceil(roi_w / PW)``. At most 4096.
    gamma : float, default 0.1
        Scale of the offsets: bin ``(ph, pw)`` moves by ``gamma * offset * (roi_w, roi_h)``.

    Returns
    -------
    Tensor, shape (K, C, PH, PW)
        In ``input``'s dtype.

    Raises
    ------
    TypeError
        If an array is not float32/float64, ``boxes`` (or ``offset``) does not have ``input``'s
        dtype, ``boxes`` is None, or an integer or real parameter has the wrong type.
    ValueError
        If a shape is wrong, a sampling grid is too large (``sampling_ratio`` > 4096, or an adaptive
        grid of more than 2**24 samples per bin), a batch index is not an integer in [0, N),
        ``output_size`` < 1, ``spatial_scale`` is not finite, or the arrays are on different
        devices.

    See Also
    --------
    deformnp.nn.DeformRoIPool : The layer.
    roi_align : The undeformed op.
    deform_ps_roi_pool : The position-sensitive deformable form.
    deform_roi_pool_forward, deform_roi_pool_backward : The array-level pair.

    Notes
    -----
    With :math:`x_0 = x_1 s - 0.5` and :math:`w = x_2 s - x_1 s` (likewise :math:`y_0, h`), bin
    ``(ph, pw)`` of box ``k`` starts at

    .. math::

        x_0 + p_w \frac{w}{PW} + \gamma\, w\, \mathrm{offset}[k, 0, p_h, p_w], \qquad
        y_0 + p_h \frac{h}{PH} + \gamma\, h\, \mathrm{offset}[k, 1, p_h, p_w],

    and is sampled and averaged as in :func:`roi_align` (the adaptive grid taken from the
    unshifted box). ``offset=None`` is aligned RoI Align without the minimum size. The offset
    gradient is the exact derivative of the forward, zero inside the clamped bands of the
    border rule (mmcv's CUDA backward is not the derivative of its forward there). See
    :doc:`/ops/deform_roi` for the formulas and gradients.

    Examples
    --------
    >>> import numpy as np
    >>> from deformnp.ops import deform_roi_pool
    >>> x = np.random.default_rng(0).random((1, 4, 16, 16))
    >>> boxes = np.array([[0, 1.0, 1.0, 9.0, 9.0]])
    >>> offset = np.zeros((1, 2, 7, 7))
    >>> out = deform_roi_pool(x, boxes, offset, output_size=7, gamma=0.1)
    >>> out.shape
    (1, 4, 7, 7)
    """
    args = prepare_deform_roi_pool(
        input, boxes, offset, output_size, spatial_scale, sampling_ratio, gamma
    )
    return DeformRoIPoolFunction.apply(input, offset, args=args)


# ============================================================================ roi_pool, ps_roi_pool


def prepare_roi_pool(
    input: TensorLike,
    boxes: Boxes,
    output_size: IntPair,
    spatial_scale: float,
    op: str = "roi_pool",
) -> RoIArgs:
    """Validate the arguments of :func:`roi_pool` (or, with ``op``, :func:`ps_roi_pool`)."""
    inp, device = _input_and_device(op, input)
    PH, PW = pair(op, "output_size", output_size, minimum=1)
    s = real(op, "spatial_scale", spatial_scale)
    rois = _rois(op, boxes, inp)
    C = inp.shape[1]
    if op == "ps_roi_pool":
        C = _position_sensitive(op, C, PH, PW)
    return RoIArgs(op, inp, rois, None, ((PH, PW), s), device, (rois.shape[0], C, PH, PW))


def _argmax(a: RoIArgs, argmax: Any) -> Array:
    """A caller's argmax: an integer array of the output's shape, on the input's device, whose
    entries index the H*W plane or are -1 (an empty bin): it is used as an index, so its range is
    checked (for a device argmax on the device, 16 bytes coming back; the autograd node keeps
    the forward's own argmax and skips the check)."""
    op = a.op
    argmax = unwrap(argmax)
    if is_cuda_array(argmax) != (a.device == "cuda"):
        raise ValueError(f"{op}: argmax must be on {a.device} like the input")
    arr = as_device_array(argmax) if is_cuda_array(argmax) else np.asarray(argmax)
    if is_cuda_array(arr):
        device_c_contiguous(op, "argmax", arr)
    if np.dtype(arr.dtype).kind not in "iu":
        raise TypeError(
            f"{op}: argmax must hold integers (the flat plane indices roi_pool_forward returns), "
            f"got {np.dtype(arr.dtype)}"
        )
    if tuple(arr.shape) != a.out_shape:
        raise ValueError(f"{op}: argmax must have shape {a.out_shape}, got {tuple(arr.shape)}")
    H, W = a.input_shape[2:]
    if arr.size:
        # on a GPU reduced there, not copied to the host (an int64 (K, C, PH, PW) array: 51 MB
        # for 512 boxes of 256 channels and 7x7 bins)
        lo, hi = (
            _kernels("cuda").index_range(arr)
            if is_cuda_array(arr)
            else (int(arr.min()), int(arr.max()))
        )
        if lo < -1 or hi >= H * W:
            raise ValueError(
                f"{op}: argmax must hold flat indices into the {H}x{W} plane, in "
                f"[-1, {H * W - 1}] (-1: an empty bin), got values in [{lo}, {hi}]"
            )
    if np.dtype(arr.dtype) not in (np.int16, np.int32, np.int64):
        arr = arr.astype(np.int64) if not is_cuda_array(arr) else arr
    return contiguous(arr)


class RoIPoolFunction(Function):
    """Autograd node of :func:`roi_pool`; ``args`` from :func:`prepare_roi_pool`. Keeps the
    forward's argmax (not the input) for the backward."""

    supports_cuda = True
    fresh_grads = True  # backward allocates every gradient it returns

    @staticmethod
    def forward(ctx: Context, input: Array, *, args: RoIArgs) -> Array:
        out, argmax = _kernels(args.device).roi_pool_forward(args.input, args.rois, *args.params)
        ctx.meta = (args.rois, args.input_shape, args.params, args.device)
        ctx.save_for_backward(argmax)
        return out

    @staticmethod
    def backward(ctx: Context, grad: Array) -> tuple:
        (argmax,) = ctx.saved_tensors
        rois, input_shape, params, device = ctx.meta
        return _kernels(device).roi_pool_backward(
            contiguous(grad), rois, argmax, input_shape, *params, ctx.needs_input_grad[:1]
        )


def roi_pool_forward(
    input: ArrayLike,
    boxes: Boxes,
    output_size: IntPair,
    spatial_scale: float = 1.0,
    return_argmax: bool = False,
) -> Array | tuple[Array, Array]:
    """Array-level forward of :func:`roi_pool`: plain arrays in, plain arrays out.

    Parameters
    ----------
    input : array_like, shape (N, C, H, W)
        The feature map, float32 or float64.
    boxes : array_like, shape (K, 5), or list of array_like, shape (L_i, 4)
        The RoIs in input-image coordinates: rows ``(batch_index, x1, y1, x2, y2)``, or one
        array of rows ``(x1, y1, x2, y2)`` per image (the list position is the batch index).
        In ``input``'s dtype; read on the host; not differentiated.
    output_size : int or (int, int)
        The bins per RoI, ``(PH, PW)`` (an int for both); at least 1.
    spatial_scale : float, default 1.0
        Scale ``s`` from box coordinates to ``input``'s pixel coordinates (e.g. 1/16 for a
        stride-16 feature map).
    return_argmax : bool, default False
        Also return the argmax, which :func:`roi_pool_backward` needs.

    Returns
    -------
    out : ndarray or CUDA device array, shape (K, C, PH, PW)
        In ``input``'s dtype, on its device.
    argmax : ndarray or CUDA device array of int, shape (K, C, PH, PW)
        Only with ``return_argmax``: the flat index into the ``H*W`` plane of each bin's
        maximum, -1 for an empty bin; on the CPU in the smallest of int16/int32/int64 that holds
        ``H*W - 1``.

    Raises
    ------
    TypeError
        If an array is not float32/float64, ``boxes`` (or ``offset``) does not have ``input``'s
        dtype, ``boxes`` is None, or an integer or real parameter has the wrong type.
    ValueError
        If a shape is wrong, a batch index is not an integer in [0, N), ``output_size`` < 1,
        ``spatial_scale`` is not finite, or the arrays are on different devices.

    See Also
    --------
    roi_pool : The differentiable op.
    roi_pool_backward : The matching backward.
    """
    a = prepare_roi_pool(input, boxes, output_size, spatial_scale)
    out, argmax = _kernels(a.device).roi_pool_forward(a.input, a.rois, *a.params)
    return (out, argmax) if return_argmax else out


def roi_pool_backward(
    grad_out: ArrayLike,
    input_shape: Sequence[int],
    boxes: Boxes,
    output_size: IntPair,
    spatial_scale: float = 1.0,
    argmax: ArrayLike | None = None,
    needs: Needs = (True,),
) -> tuple[Array | None]:
    """Array-level backward of :func:`roi_pool`: the gradient of its input.

    Each bin's gradient goes to the position of its maximum, given by the forward's
    ``argmax`` (the backward has no input values to find it again).

    Parameters
    ----------
    grad_out : array_like, shape (K, C, PH, PW)
        Gradient of the loss with respect to the forward's output, in the input's dtype and on
        its device.
    input_shape : sequence of 4 int
        The forward input's shape ``(N, C, H, W)`` (only its shape is needed).
    boxes : array_like, shape (K, 5), or list of array_like, shape (L_i, 4)
        The RoIs in input-image coordinates: rows ``(batch_index, x1, y1, x2, y2)``, or one
        array of rows ``(x1, y1, x2, y2)`` per image (the list position is the batch index).
        In ``input``'s dtype; read on the host; not differentiated.
    output_size : int or (int, int)
        The bins per RoI, ``(PH, PW)`` (an int for both); at least 1.
    spatial_scale : float, default 1.0
        Scale ``s`` from box coordinates to ``input``'s pixel coordinates (e.g. 1/16 for a
        stride-16 feature map).
    argmax : array_like of int, shape (K, C, PH, PW)
        The argmax of ``roi_pool_forward(..., return_argmax=True)``: integers in
        ``[-1, H*W)``, on the input's device. Required (the default None is a TypeError).
    needs : sequence of 1 bool, default (True,)
        Which gradients to compute: ``(input,)``.

    Returns
    -------
    grad_input : ndarray or CUDA device array, shape (N, C, H, W), or None
        Returned as the 1-tuple ``(grad_input,)``; None where ``needs[0]`` is False.

    Raises
    ------
    TypeError
        If an array is not float32/float64, ``boxes`` (or ``offset``) does not have ``input``'s
        dtype, ``boxes`` is None, or an integer or real parameter has the wrong type, ``argmax`` is
        missing or not integer, or ``needs`` is not a sequence; also when ``input_shape`` is an
        array rather than a shape.
    ValueError
        If a shape is wrong, ``argmax`` has values outside [-1, H*W), a batch index is not an
        integer in [0, N), ``output_size`` < 1, ``spatial_scale`` is not finite, or the arrays are
        on different devices; also when ``grad_out`` has the wrong shape or ``needs`` the wrong
        length.

    See Also
    --------
    roi_pool_forward : The matching forward.

    Notes
    -----
    CPU gradients are deterministic (bit-identical with any number of threads). On CUDA the input
    gradient is scattered with float atomic adds unless
    ``deformnp.use_deterministic_algorithms(True)`` is set.
    """
    shape = input_shape_of("roi_pool", input_shape, grad_out)
    a = prepare_roi_pool(shape, boxes, output_size, spatial_scale)
    g = _grad(a, grad_out)
    flags = needs_flags(a.op, needs, ("input",))
    if argmax is None:
        raise TypeError(
            "roi_pool: roi_pool_backward needs the forward's argmax "
            "(roi_pool_forward(..., return_argmax=True))"
        )
    argmax = _argmax(a, argmax)
    return _kernels(a.device).roi_pool_backward(g, a.rois, argmax, a.input_shape, *a.params, flags)


def roi_pool(
    input: TensorLike, boxes: Boxes, output_size: IntPair, spatial_scale: float = 1.0
) -> Tensor:
    """RoI max pooling, as ``torchvision.ops.roi_pool``.

    Each box is rounded to whole pixels and divided into ``PH x PW`` integer bins; each bin
    takes its maximum. The gradient flows to ``input`` when it is a Tensor that requires grad,
    to each bin's maximum.

    Parameters
    ----------
    input : Tensor or array_like, shape (N, C, H, W)
        The feature map, float32 or float64.
    boxes : array_like, shape (K, 5), or list of array_like, shape (L_i, 4)
        The RoIs in input-image coordinates: rows ``(batch_index, x1, y1, x2, y2)``, or one
        array of rows ``(x1, y1, x2, y2)`` per image (the list position is the batch index).
        In ``input``'s dtype; read on the host; not differentiated.
    output_size : int or (int, int)
        The bins per RoI, ``(PH, PW)`` (an int for both); at least 1.
    spatial_scale : float, default 1.0
        Scale ``s`` from box coordinates to ``input``'s pixel coordinates (e.g. 1/16 for a
        stride-16 feature map).

    Returns
    -------
    Tensor, shape (K, C, PH, PW)
        In ``input``'s dtype.

    Raises
    ------
    TypeError
        If an array is not float32/float64, ``boxes`` (or ``offset``) does not have ``input``'s
        dtype, ``boxes`` is None, or an integer or real parameter has the wrong type.
    ValueError
        If a shape is wrong, a batch index is not an integer in [0, N), ``output_size`` < 1,
        ``spatial_scale`` is not finite, or the arrays are on different devices.

    See Also
    --------
    deformnp.nn.RoIPool : The layer.
    roi_align : Bilinear average pooling.
    roi_pool_forward, roi_pool_backward : The array-level pair.

    Notes
    -----
    ``start = round(x1*s)``, ``end = round(x2*s)`` (C's round, half away from zero; likewise
    y); ``roi_w = max(end - start + 1, 1)``; ``bin_w = roi_w / PW``; bin column ``pw`` covers
    ``[floor(pw*bin_w) + start, ceil((pw + 1)*bin_w) + start)`` clipped to ``[0, W]``. The bin
    takes its maximum; the first maximum in row-major order wins and NaN counts as a maximum
    (torchvision skips NaN); an empty bin gives 0 and no gradient. The bins are computed in the
    input's dtype, like torchvision. See :doc:`/ops/roi` for the formulas and gradients.

    Examples
    --------
    >>> import numpy as np
    >>> from deformnp.ops import roi_pool
    >>> x = np.arange(16.0).reshape(1, 1, 4, 4)
    >>> roi_pool(x, np.array([[0, 0.0, 0.0, 3.0, 3.0]]), output_size=2).numpy()
    array([[[[ 5.,  7.],
             [13., 15.]]]])
    """
    args = prepare_roi_pool(input, boxes, output_size, spatial_scale)
    return RoIPoolFunction.apply(input, args=args)


def prepare_ps_roi_pool(
    input: TensorLike, boxes: Boxes, output_size: IntPair, spatial_scale: float
) -> RoIArgs:
    """Validate the arguments of :func:`ps_roi_pool`."""
    return prepare_roi_pool(input, boxes, output_size, spatial_scale, "ps_roi_pool")


class PSRoIPoolFunction(Function):
    """Autograd node of :func:`ps_roi_pool`; ``args`` from :func:`prepare_ps_roi_pool`. Keeps
    the geometry only (the backward needs no values)."""

    supports_cuda = True
    fresh_grads = True  # backward allocates every gradient it returns

    @staticmethod
    def forward(ctx: Context, input: Array, *, args: RoIArgs) -> Array:
        ctx.meta = (args.rois, args.input_shape, args.params, args.device)
        return _kernels(args.device).ps_roi_pool_forward(args.input, args.rois, *args.params)

    @staticmethod
    def backward(ctx: Context, grad: Array) -> tuple:
        rois, input_shape, params, device = ctx.meta
        return _kernels(device).ps_roi_pool_backward(
            contiguous(grad), rois, input_shape, *params, ctx.needs_input_grad[:1]
        )


def ps_roi_pool_forward(
    input: ArrayLike, boxes: Boxes, output_size: IntPair, spatial_scale: float = 1.0
) -> Array:
    """Array-level forward of :func:`ps_roi_pool`: plain arrays in, a plain array out.

    Parameters
    ----------
    input : array_like, shape (N, C, H, W)
        The feature map, float32 or float64; ``C`` a multiple of ``PH*PW``.
    boxes : array_like, shape (K, 5), or list of array_like, shape (L_i, 4)
        The RoIs in input-image coordinates: rows ``(batch_index, x1, y1, x2, y2)``, or one
        array of rows ``(x1, y1, x2, y2)`` per image (the list position is the batch index).
        In ``input``'s dtype; read on the host; not differentiated.
    output_size : int or (int, int)
        The bins per RoI, ``(PH, PW)`` (an int for both); at least 1.
    spatial_scale : float, default 1.0
        Scale ``s`` from box coordinates to ``input``'s pixel coordinates (e.g. 1/16 for a
        stride-16 feature map).

    Returns
    -------
    out : ndarray or CUDA device array, shape (K, C / (PH*PW), PH, PW)
        In ``input``'s dtype, on its device.

    Raises
    ------
    TypeError
        If an array is not float32/float64, ``boxes`` (or ``offset``) does not have ``input``'s
        dtype, ``boxes`` is None, or an integer or real parameter has the wrong type.
    ValueError
        If a shape is wrong, ``C`` is not a multiple of ``PH*PW``, a batch index is not an integer
        in [0, N), ``output_size`` < 1, ``spatial_scale`` is not finite, or the arrays are on
        different devices.

    See Also
    --------
    ps_roi_pool : The differentiable op.
    ps_roi_pool_backward : The matching backward.
    """
    a = prepare_ps_roi_pool(input, boxes, output_size, spatial_scale)
    return _kernels(a.device).ps_roi_pool_forward(a.input, a.rois, *a.params)


def ps_roi_pool_backward(
    grad_out: ArrayLike,
    input_shape: Sequence[int],
    boxes: Boxes,
    output_size: IntPair,
    spatial_scale: float = 1.0,
    needs: Needs = (True,),
) -> tuple[Array | None]:
    """Array-level backward of :func:`ps_roi_pool`: the gradient of its input.

    Parameters
    ----------
    grad_out : array_like, shape (K, C / (PH*PW), PH, PW)
        Gradient of the loss with respect to the forward's output, in the input's dtype and on
        its device.
    input_shape : sequence of 4 int
        The forward input's shape ``(N, C, H, W)`` (only its shape is needed).
    boxes : array_like, shape (K, 5), or list of array_like, shape (L_i, 4)
        The RoIs in input-image coordinates: rows ``(batch_index, x1, y1, x2, y2)``, or one
        array of rows ``(x1, y1, x2, y2)`` per image (the list position is the batch index).
        In ``input``'s dtype; read on the host; not differentiated.
    output_size : int or (int, int)
        The bins per RoI, ``(PH, PW)`` (an int for both); at least 1.
    spatial_scale : float, default 1.0
        Scale ``s`` from box coordinates to ``input``'s pixel coordinates (e.g. 1/16 for a
        stride-16 feature map).
    needs : sequence of 1 bool, default (True,)
        Which gradients to compute: ``(input,)``.

    Returns
    -------
    grad_input : ndarray or CUDA device array, shape (N, C, H, W), or None
        Returned as the 1-tuple ``(grad_input,)``; None where ``needs[0]`` is False.

    Raises
    ------
    TypeError
        If an array is not float32/float64, ``boxes`` (or ``offset``) does not have ``input``'s
        dtype, ``boxes`` is None, or an integer or real parameter has the wrong type, or ``needs``
        is not a sequence; also when ``input_shape`` is an array rather than a shape.
    ValueError
        If a shape is wrong, ``C`` is not a multiple of ``PH*PW``, a batch index is not an integer
        in [0, N), ``output_size`` < 1, ``spatial_scale`` is not finite, or the arrays are on
        different devices; also when ``grad_out`` has the wrong shape or ``needs`` the wrong length.

    See Also
    --------
    ps_roi_pool_forward : The matching forward.

    Notes
    -----
    CPU gradients are deterministic (bit-identical with any number of threads). On CUDA the input
    gradient is scattered with float atomic adds unless
    ``deformnp.use_deterministic_algorithms(True)`` is set.
    """
    shape = input_shape_of("ps_roi_pool", input_shape, grad_out)
    a = prepare_ps_roi_pool(shape, boxes, output_size, spatial_scale)
    return _kernels(a.device).ps_roi_pool_backward(
        _grad(a, grad_out), a.rois, a.input_shape, *a.params, needs_flags(a.op, needs, ("input",))
    )


def ps_roi_pool(
    input: TensorLike, boxes: Boxes, output_size: IntPair, spatial_scale: float = 1.0
) -> Tensor:
    """Position-sensitive RoI average pooling, as ``torchvision.ops.ps_roi_pool``.

    Output channel ``co`` at bin ``(ph, pw)`` averages input channel ``(co*PH + ph)*PW + pw``
    over the bin. The gradient flows to ``input`` when it is a Tensor that requires grad.

    Parameters
    ----------
    input : Tensor or array_like, shape (N, C, H, W)
        The feature map, float32 or float64; ``C`` a multiple of ``PH*PW``.
    boxes : array_like, shape (K, 5), or list of array_like, shape (L_i, 4)
        The RoIs in input-image coordinates: rows ``(batch_index, x1, y1, x2, y2)``, or one
        array of rows ``(x1, y1, x2, y2)`` per image (the list position is the batch index).
        In ``input``'s dtype; read on the host; not differentiated.
    output_size : int or (int, int)
        The bins per RoI, ``(PH, PW)`` (an int for both); at least 1.
    spatial_scale : float, default 1.0
        Scale ``s`` from box coordinates to ``input``'s pixel coordinates (e.g. 1/16 for a
        stride-16 feature map).

    Returns
    -------
    Tensor, shape (K, C / (PH*PW), PH, PW)
        In ``input``'s dtype.

    Raises
    ------
    TypeError
        If an array is not float32/float64, ``boxes`` (or ``offset``) does not have ``input``'s
        dtype, ``boxes`` is None, or an integer or real parameter has the wrong type.
    ValueError
        If a shape is wrong, ``C`` is not a multiple of ``PH*PW``, a batch index is not an integer
        in [0, N), ``output_size`` < 1, ``spatial_scale`` is not finite, or the arrays are on
        different devices.

    See Also
    --------
    deformnp.nn.PSRoIPool : The layer.
    ps_roi_align : The bilinear form.
    ps_roi_pool_forward, ps_roi_pool_backward : The array-level pair.

    Notes
    -----
    ``start = round(x1*s)``, ``end = round(x2*s)``, ``roi_w = max(end - start, 1)``; the bins
    are :func:`roi_pool`'s, clipped to ``[0, W]`` and ``[0, H]``; an empty bin gives 0.
    torchvision's forward clips the bins to ``[0, W-1]`` and ``[0, H-1]`` (it never pools the
    last row and column) while its backward clips to ``[0, W]`` and ``[0, H]``; deformnp uses
    the latter in both, so forward and backward agree. The outputs equal torchvision's wherever
    no bin reaches the last row or column. See :doc:`/ops/roi` for the formulas and gradients.

    Examples
    --------
    >>> import numpy as np
    >>> from deformnp.ops import ps_roi_pool
    >>> x = np.ones((1, 4 * 2 * 2, 8, 8))  # 4 output channels, 2x2 bins
    >>> ps_roi_pool(x, np.array([[0, 0.0, 0.0, 4.0, 4.0]]), output_size=2).shape
    (1, 4, 2, 2)
    """
    args = prepare_ps_roi_pool(input, boxes, output_size, spatial_scale)
    return PSRoIPoolFunction.apply(input, args=args)


# ============================================================================ deform_ps_roi_pool


def prepare_deform_ps_roi_pool(
    input: TensorLike,
    boxes: Boxes,
    offset: TensorLike | None,
    spatial_scale: float,
    output_dim: int,
    group_size: int,
    pooled_size: int,
    part_size: int | None,
    sample_per_part: int,
    trans_std: float,
) -> RoIArgs:
    """Validate the arguments of :func:`deform_ps_roi_pool`."""
    op = "deform_ps_roi_pool"
    input, offset = unwrap(input), unwrap(offset)
    device = device_of(op, input=input, offset=offset)
    inp = _input(op, input)
    s = real(op, "spatial_scale", spatial_scale)
    D = integer(op, "output_dim", output_dim, 1)
    gs = integer(op, "group_size", group_size, 1)
    P = integer(op, "pooled_size", pooled_size, 1)
    part = P if part_size is None or part_size == 0 else integer(op, "part_size", part_size, 1)
    spp = integer(op, "sample_per_part", sample_per_part, 1, MAX_SAMPLING_RATIO)
    ts = real(op, "trans_std", trans_std)
    rois = _rois(op, boxes, inp)
    K = rois.shape[0]
    C = inp.shape[1]
    if C != D * gs * gs:
        raise ValueError(
            f"{op}: input has {C} channels, expected output_dim*group_size*group_size = "
            f"{D}*{gs}*{gs} = {D * gs * gs}"
        )
    off = None
    if offset is not None:
        off = float_array(op, "offset", offset)
        same_dtype(op, input=inp, offset=off)
        if off.ndim != 4 or off.shape[0] != K or off.shape[2:] != (part, part) or off.shape[1] < 2:
            raise ValueError(
                f"{op}: offset must have shape (K, 2*num_classes, part_size, part_size) = "
                f"({K}, 2*num_classes, {part}, {part}), got {tuple(off.shape)}"
            )
        ncls2 = off.shape[1]
        if ncls2 % 2 != 0 or D % (ncls2 // 2) != 0:
            raise ValueError(
                f"{op}: offset has {ncls2} channels; expected 2*num_classes with num_classes "
                f"dividing output_dim = {D}"
            )
    params = (s, D, gs, P, part, spp, ts)
    return RoIArgs(op, inp, rois, off, params, device, (K, D, P, P))


class DeformPSRoIPoolFunction(Function):
    """Autograd node of :func:`deform_ps_roi_pool`: positional inputs (input, offset), ``args``
    from :func:`prepare_deform_ps_roi_pool`."""

    supports_cuda = True
    fresh_grads = True  # backward allocates every gradient it returns

    @staticmethod
    def forward(ctx: Context, input: Array, offset: Array | None, *, args: RoIArgs) -> Array:
        ctx.save_for_backward(args)
        return _kernels(args.device).deform_ps_roi_pool_forward(
            args.input, args.rois, args.offset, *args.params
        )

    @staticmethod
    def backward(ctx: Context, grad: Array) -> tuple:
        (a,) = ctx.saved_tensors
        return _kernels(a.device).deform_ps_roi_pool_backward(
            contiguous(grad), a.input, a.rois, a.offset, *a.params, ctx.needs_input_grad[:2]
        )


def deform_ps_roi_pool_forward(
    input: ArrayLike,
    boxes: Boxes,
    offset: ArrayLike | None,
    spatial_scale: float,
    output_dim: int,
    group_size: int,
    pooled_size: int,
    part_size: int | None = None,
    sample_per_part: int = 4,
    trans_std: float = 0.0,
) -> Array:
    """Array-level forward of :func:`deform_ps_roi_pool`: plain arrays in, a plain array out.

    Parameters
    ----------
    input : array_like, shape (N, C, H, W)
        The feature map, float32 or float64, with ``C = output_dim * group_size**2``
        channels.
    boxes : array_like, shape (K, 5), or list of array_like, shape (L_i, 4)
        The RoIs in input-image coordinates: rows ``(batch_index, x1, y1, x2, y2)``, or one
        array of rows ``(x1, y1, x2, y2)`` per image (the list position is the batch index).
        In ``input``'s dtype; read on the host; not differentiated.
    offset : array_like, shape (K, 2 * num_classes, part_size, part_size), or None
        Normalized offsets per part cell, channel ``2*cls`` x and ``2*cls + 1`` y of class
        ``cls``; ``num_classes`` must divide ``output_dim``. None for no offsets (as is
        ``trans_std=0``).
    spatial_scale : float
        Scale ``s`` from box coordinates to ``input``'s pixel coordinates (e.g. 1/16 for a
        stride-16 feature map).
    output_dim : int
        Output channels ``D`` (at least 1).
    group_size : int
        Side of the position-sensitive channel grid (at least 1).
    pooled_size : int
        Output bins per side ``P`` (at least 1).
    part_size : int, optional
        Side of the offset grid; None or 0 means ``pooled_size``.
    sample_per_part : int, default 4
        Samples per bin along each axis (1 to 4096).
    trans_std : float, default 0.0
        Scale of the offsets: a bin moves by ``trans_std * offset * (roi_w, roi_h)``.

    Returns
    -------
    out : ndarray or CUDA device array, shape (K, output_dim, pooled_size, pooled_size)
        In ``input``'s dtype, on its device.

    Raises
    ------
    TypeError
        If an array is not float32/float64, ``boxes`` (or ``offset``) does not have ``input``'s
        dtype, ``boxes`` is None, or an integer or real parameter has the wrong type.
    ValueError
        If a shape is wrong, ``C != output_dim * group_size**2``, ``num_classes`` does not divide
        ``output_dim``, an integer parameter is out of range, a batch index is not an integer
        in [0, N), ``output_size`` < 1, ``spatial_scale`` is not finite, or the arrays are on
        different devices.

    See Also
    --------
    deform_ps_roi_pool : The differentiable op.
    deform_ps_roi_pool_backward : The matching backward.
    """
    a = prepare_deform_ps_roi_pool(
        input, boxes, offset, spatial_scale, output_dim, group_size, pooled_size, part_size,
        sample_per_part, trans_std,
    )  # fmt: skip
    return _kernels(a.device).deform_ps_roi_pool_forward(a.input, a.rois, a.offset, *a.params)


def deform_ps_roi_pool_backward(
    grad_out: ArrayLike,
    input: ArrayLike,
    boxes: Boxes,
    offset: ArrayLike | None,
    spatial_scale: float,
    output_dim: int,
    group_size: int,
    pooled_size: int,
    part_size: int | None = None,
    sample_per_part: int = 4,
    trans_std: float = 0.0,
    needs: Needs = (True, True),
) -> tuple[Array | None, Array | None]:
    """Array-level backward of :func:`deform_ps_roi_pool`: the gradients of input and offset.

    Parameters
    ----------
    grad_out : array_like, shape (K, output_dim, pooled_size, pooled_size)
        Gradient of the loss with respect to the forward's output, in the input's dtype and on
        its device.
    input : array_like, shape (N, C, H, W)
        The forward's ``input`` (its values are needed for the offset gradient), with
        ``C = output_dim * group_size**2`` channels.
    boxes : array_like, shape (K, 5), or list of array_like, shape (L_i, 4)
        The RoIs in input-image coordinates: rows ``(batch_index, x1, y1, x2, y2)``, or one
        array of rows ``(x1, y1, x2, y2)`` per image (the list position is the batch index).
        In ``input``'s dtype; read on the host; not differentiated.
    offset : array_like, shape (K, 2 * num_classes, part_size, part_size), or None
        Normalized offsets per part cell, channel ``2*cls`` x and ``2*cls + 1`` y of class
        ``cls``; ``num_classes`` must divide ``output_dim``. None for no offsets (as is
        ``trans_std=0``).
    spatial_scale : float
        Scale ``s`` from box coordinates to ``input``'s pixel coordinates (e.g. 1/16 for a
        stride-16 feature map).
    output_dim : int
        Output channels ``D`` (at least 1).
    group_size : int
        Side of the position-sensitive channel grid (at least 1).
    pooled_size : int
        Output bins per side ``P`` (at least 1).
    part_size : int, optional
        Side of the offset grid; None or 0 means ``pooled_size``.
    sample_per_part : int, default 4
        Samples per bin along each axis (1 to 4096).
    trans_std : float, default 0.0
        Scale of the offsets: a bin moves by ``trans_std * offset * (roi_w, roi_h)``.
    needs : sequence of 2 bool, default (True, True)
        Which gradients to compute: ``(input, offset)``.

    Returns
    -------
    grad_input : ndarray or CUDA device array, shape (N, C, H, W), or None
    grad_offset : ndarray or CUDA device array, shape (K, 2*num_classes, part_size, part_size)
        None where the ``needs`` flag is False; ``grad_offset`` also when ``offset`` is None.

    Raises
    ------
    TypeError
        If an array is not float32/float64, ``boxes`` (or ``offset``) does not have ``input``'s
        dtype, ``boxes`` is None, or an integer or real parameter has the wrong type, or ``needs``
        is not a sequence.
    ValueError
        If a shape is wrong, ``C != output_dim * group_size**2``, ``num_classes`` does not divide
        ``output_dim``, an integer parameter is out of range, a batch index is not an integer
        in [0, N), ``output_size`` < 1, ``spatial_scale`` is not finite, or the arrays are on
        different devices; also when ``grad_out`` has the wrong shape or ``needs`` the wrong length.

    See Also
    --------
    deform_ps_roi_pool_forward : The matching forward.

    Notes
    -----
    CPU gradients are deterministic (bit-identical with any number of threads). On CUDA the input
    gradient is scattered with float atomic adds unless
    ``deformnp.use_deterministic_algorithms(True)`` is set.
    """
    a = prepare_deform_ps_roi_pool(
        input, boxes, offset, spatial_scale, output_dim, group_size, pooled_size, part_size,
        sample_per_part, trans_std,
    )  # fmt: skip
    return _kernels(a.device).deform_ps_roi_pool_backward(
        _grad(a, grad_out), a.input, a.rois, a.offset, *a.params,
        needs_flags(a.op, needs, ("input", "offset")),
    )  # fmt: skip


def deform_ps_roi_pool(
    input: TensorLike,
    boxes: Boxes,
    offset: TensorLike | None,
    spatial_scale: float,
    output_dim: int,
    group_size: int,
    pooled_size: int,
    part_size: int | None = None,
    sample_per_part: int = 4,
    trans_std: float = 0.0,
) -> Tensor:
    """Deformable position-sensitive RoI pooling, as Deformable-ConvNets' R-FCN head.

    Position-sensitive average pooling whose bins are shifted by learned, box-relative
    offsets, one per part cell and class. Gradients flow to ``input`` and ``offset`` when they
    are Tensors that require grad.

    Parameters
    ----------
    input : Tensor or array_like, shape (N, C, H, W)
        The feature map, float32 or float64, with ``C = output_dim * group_size**2``
        channels.
    boxes : array_like, shape (K, 5), or list of array_like, shape (L_i, 4)
        The RoIs in input-image coordinates: rows ``(batch_index, x1, y1, x2, y2)``, or one
        array of rows ``(x1, y1, x2, y2)`` per image (the list position is the batch index).
        In ``input``'s dtype; read on the host; not differentiated.
    offset : Tensor or array_like, shape (K, 2 * num_classes, part_size, part_size), or None
        Normalized offsets per part cell, channel ``2*cls`` x and ``2*cls + 1`` y of class
        ``cls``; ``num_classes`` must divide ``output_dim``. None for no offsets (as is
        ``trans_std=0``).
    spatial_scale : float
        Scale ``s`` from box coordinates to ``input``'s pixel coordinates (e.g. 1/16 for a
        stride-16 feature map).
    output_dim : int
        Output channels ``D`` (at least 1).
    group_size : int
        Side of the position-sensitive channel grid (at least 1).
    pooled_size : int
        Output bins per side ``P`` (at least 1).
    part_size : int, optional
        Side of the offset grid; None or 0 means ``pooled_size``.
    sample_per_part : int, default 4
        Samples per bin along each axis (1 to 4096).
    trans_std : float, default 0.0
        Scale of the offsets: a bin moves by ``trans_std * offset * (roi_w, roi_h)``.

    Returns
    -------
    Tensor, shape (K, output_dim, pooled_size, pooled_size)
        In ``input``'s dtype.

    Raises
    ------
    TypeError
        If an array is not float32/float64, ``boxes`` (or ``offset``) does not have ``input``'s
        dtype, ``boxes`` is None, or an integer or real parameter has the wrong type.
    ValueError
        If a shape is wrong, ``C != output_dim * group_size**2``, ``num_classes`` does not divide
        ``output_dim``, an integer parameter is out of range, a batch index is not an integer
        in [0, N), ``output_size`` < 1, ``spatial_scale`` is not finite, or the arrays are on
        different devices.

    See Also
    --------
    deform_roi_pool : The deformable RoI pooling of mmcv.
    ps_roi_pool : The undeformed position-sensitive pooling.
    deform_ps_roi_pool_forward, deform_ps_roi_pool_backward : The array-level pair.

    Notes
    -----
    The forward is Deformable-ConvNets', decision by decision:

    1. the box is rounded first: ``start = round(x1)*s - 0.5``,
       ``end = (round(x2) + 1)*s - 0.5`` (C's round), ``roi_w = max(end - start, 0.1)``
       (likewise y); ``bin = roi_w / pooled_size``, ``sub_bin = bin / sample_per_part``;
    2. bin ``(ph, pw)`` lies in part cell ``floor(ph / pooled_size * part_size)`` (likewise
       ``pw``) and group cell ``floor(ph * group_size / pooled_size)`` (clamped to
       ``[0, group_size - 1]``); output channel ``ctop`` belongs to class
       ``ctop // (output_dim / num_classes)`` and reads input channel
       ``(ctop*group_size + group_h)*group_size + group_w``;
    3. the bin starts at its undeformed corner plus ``trans_std * offset * (roi_h, roi_w)``
       (the offset of its class and part cell);
    4. ``sample_per_part**2`` samples at the sub-bin starts (not centres);
    5. a sample with ``x < -0.5`` or ``x > W - 0.5`` (likewise y, or NaN) is skipped; the
       others are clamped to the map and interpolated bilinearly;
    6. the output is the mean over the valid samples, 0 when none is valid.

    The gradients are exact: the offset gradient is zero where a sample is clamped and takes
    the right-hand slope at integer coordinates. See :doc:`/ops/deform_roi` for the formulas
    and gradients.

    Examples
    --------
    >>> import numpy as np
    >>> from deformnp.ops import deform_ps_roi_pool
    >>> D, group, P = 2, 3, 3
    >>> x = np.ones((1, D * group * group, 12, 12))
    >>> boxes = np.array([[0, 1.0, 1.0, 8.0, 8.0]])
    >>> offset = np.zeros((1, 2, P, P))  # one class
    >>> out = deform_ps_roi_pool(x, boxes, offset, spatial_scale=1.0, output_dim=D,
    ...                          group_size=group, pooled_size=P, trans_std=0.1)
    >>> out.shape
    (1, 2, 3, 3)
    """
    args = prepare_deform_ps_roi_pool(
        input, boxes, offset, spatial_scale, output_dim, group_size, pooled_size, part_size,
        sample_per_part, trans_std,
    )  # fmt: skip
    return DeformPSRoIPoolFunction.apply(input, offset, args=args)
