"""The RoI pooling family (SPEC sections 7 and 8): RoI Pool, RoI Align, their position-sensitive
forms, mmcv's deformable RoI pooling and Deformable-ConvNets' deformable PS RoI pooling.

Boxes (every op): a (K, 5) array of (batch_index, x1, y1, x2, y2) in input-image coordinates, or
a list of (L_i, 4) arrays, one per image (torchvision's ``convert_boxes_to_roi_format``: the list
position is the batch index). Boxes must have the input's float dtype (mixed dtypes are a
TypeError, as in torchvision) and every batch index must be an integer in [0, B). Boxes are not
differentiated. ``output_size`` is an int or a pair (PH, PW). Output (K, C', PH, PW).
``round`` is C's (half away from zero). Gradients flow to the feature map and, for the
deformable ops, to the offsets; they are exact derivatives of the forward (SPEC 4).

Decisions (beyond SPEC 7/8):

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
    ps_roi_align_forward / ps_roi_align_backward, ps_roi_pool_forward / ps_roi_pool_backward
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
    """Array-level :func:`roi_align` forward: (K, C, PH, PW)."""
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
    """Array-level :func:`roi_align` backward: ``(grad_input,)`` of shape ``input_shape``
    (N, C, H, W), for ``grad_out`` (K, C, PH, PW) of the input's dtype and device."""
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
    """RoI Align (torchvision.ops.roi_align): input (N, C, H, W) -> (K, C, PH, PW).

    o = 0.5 if aligned else 0; start = x1*s - o, end = x2*s - o (same for y); roi_w = end - start,
    and if not aligned roi_w = max(roi_w, 1); bin_w = roi_w / PW; gw = sampling_ratio if > 0 else
    ceil(roi_w / PW) samples per bin column (gh likewise); sample x = start + pw*bin_w + (ix +
    0.5)*bin_w/gw; clamp rule (SPEC 4); output = sum / max(gh*gw, 1). Gradient to ``input``.
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
    """Array-level :func:`ps_roi_align` forward: (K, C/(PH*PW), PH, PW)."""
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
    """Array-level :func:`ps_roi_align` backward: ``(grad_input,)`` of shape ``input_shape``
    (N, C, H, W), for ``grad_out`` (K, C/(PH*PW), PH, PW) of the input's dtype and device."""
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
    """Position-sensitive RoI Align (torchvision.ops.ps_roi_align): (K, C/(PH*PW), PH, PW).

    Output channel co at bin (ph, pw) averages input channel (co*PH + ph)*PW + pw over the bin's
    samples; always aligned (o = 0.5), no minimum size, average over max(gh*gw, 1) (torchvision
    divides by gh*gw and gives NaN for an empty grid; deformnp gives 0). Gradient to ``input``.
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
    """Array-level :func:`deform_roi_pool` forward: (K, C, PH, PW)."""
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
    """Array-level :func:`deform_roi_pool` backward: ``(grad_input, grad_offset)``.

    grad_offset is None when offset is None. The offset gradient needs input's values.
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
    """Deformable RoI pooling (mmcv.ops.deform_roi_pool, DCN paper): (K, C, PH, PW).

    RoI Align with aligned=True and no minimum size (start = x1*s - 0.5, roi_w = x2*s - x1*s),
    where bin (ph, pw) is shifted by the paper's delta p = gamma * offset o (roi_w, roi_h):
    start_x += gamma*roi_w*offset[k, 0, ph, pw], start_y += gamma*roi_h*offset[k, 1, ph, pw]
    (offset (K, 2, PH, PW), channel 0 = x, mmcv's order); then sample and average as RoI Align
    (gw = sampling_ratio if > 0 else ceil(roi_w / PW), from the unshifted RoI; count
    max(gh*gw, 1)). ``offset=None`` is plain aligned RoI Align without the minimum size.

    Gradients flow to ``input`` and ``offset``. The offset gradient is the exact derivative,
    gamma*roi_w/count * sum over samples and channels of grad * d sample/dx, including the
    clamped bands of the border rule where it is zero (mmcv's CUDA backward is not the derivative
    of its forward there).
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
    checked (a device argmax is copied to the host for that, once per call; the autograd node
    keeps the forward's own argmax and skips the check)."""
    op = a.op
    argmax = unwrap(argmax)
    if is_cuda_array(argmax) != (a.device == "cuda"):
        raise ValueError(f"{op}: argmax must be on {a.device} like the input")
    arr = as_device_array(argmax) if is_cuda_array(argmax) else np.asarray(argmax)
    if np.dtype(arr.dtype).kind not in "iu":
        raise TypeError(
            f"{op}: argmax must hold integers (the flat plane indices roi_pool_forward returns), "
            f"got {np.dtype(arr.dtype)}"
        )
    if tuple(arr.shape) != a.out_shape:
        raise ValueError(f"{op}: argmax must have shape {a.out_shape}, got {tuple(arr.shape)}")
    host = arr.copy_to_host() if is_cuda_array(arr) else arr
    H, W = a.input_shape[2:]
    if host.size and (host.min() < -1 or host.max() >= H * W):
        raise ValueError(
            f"{op}: argmax must hold flat indices into the {H}x{W} plane, in [-1, {H * W - 1}] "
            f"(-1: an empty bin), got values in [{host.min()}, {host.max()}]"
        )
    if np.dtype(arr.dtype) not in (np.int16, np.int32, np.int64):
        arr = arr.astype(np.int64) if not is_cuda_array(arr) else arr
    return contiguous(arr)


class RoIPoolFunction(Function):
    """Autograd node of :func:`roi_pool`; ``args`` from :func:`prepare_roi_pool`. Keeps the
    forward's argmax (not the input) for the backward."""

    supports_cuda = True

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
    """Array-level :func:`roi_pool` forward: (K, C, PH, PW), and with ``return_argmax`` also the
    argmax: the flat index into the H*W plane of each bin's maximum, -1 for an empty bin, in the
    smallest of int16/int32/int64 that holds H*W - 1 (CPU)."""
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
    """Array-level :func:`roi_pool` backward: ``(grad_input,)`` of shape ``input_shape``
    (N, C, H, W); each bin's gradient goes to its ``argmax`` (the forward's, required: the
    backward has no input values to find it again)."""
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
    """RoI max pooling (torchvision.ops.roi_pool): input (N, C, H, W) -> (K, C, PH, PW).

    start = round(x1*s), end = round(x2*s) (C round; same for y); roi_w = max(end - start + 1, 1);
    bin_w = roi_w / PW; bin columns [floor(pw*bin_w) + start, ceil((pw+1)*bin_w) + start) clipped
    to [0, W]; max over the bin, the first maximum in row-major order wins (NaN counts as the
    maximum); an empty bin gives 0. The gradient goes to each bin's argmax (none for an empty bin).
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
    """Array-level :func:`ps_roi_pool` forward: (K, C/(PH*PW), PH, PW)."""
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
    """Array-level :func:`ps_roi_pool` backward: ``(grad_input,)`` of shape ``input_shape``
    (N, C, H, W), for ``grad_out`` (K, C/(PH*PW), PH, PW) of the input's dtype and device."""
    shape = input_shape_of("ps_roi_pool", input_shape, grad_out)
    a = prepare_ps_roi_pool(shape, boxes, output_size, spatial_scale)
    return _kernels(a.device).ps_roi_pool_backward(
        _grad(a, grad_out), a.rois, a.input_shape, *a.params, needs_flags(a.op, needs, ("input",))
    )


def ps_roi_pool(
    input: TensorLike, boxes: Boxes, output_size: IntPair, spatial_scale: float = 1.0
) -> Tensor:
    """Position-sensitive RoI average pooling (torchvision.ops.ps_roi_pool): (K, C/(PH*PW), PH, PW).

    start = round(x1*s), end = round(x2*s); roi_w = max(end - start, 1); bins as in roi_pool,
    clipped to [0, W] and [0, H]; output channel co at bin (ph, pw) averages input channel
    (co*PH + ph)*PW + pw over the bin; an empty bin gives 0.

    Difference from torchvision: its forward clips the bins to [0, W-1] and [0, H-1] (so it never
    pools the last row and column, and a bin there comes out empty), while its backward clips to
    [0, W] and [0, H]. deformnp uses [0, W] and [0, H] in both, so forward and backward agree.
    The outputs equal torchvision's wherever no bin reaches the last row or column.
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
    """Array-level :func:`deform_ps_roi_pool` forward: (K, output_dim, pooled_size, pooled_size)."""
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
    """Array-level :func:`deform_ps_roi_pool` backward: ``(grad_input, grad_offset)``."""
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
    """Deformable position-sensitive RoI pooling (Deformable-ConvNets, R-FCN head).

    input (N, output_dim*group_size**2, H, W) -> (K, output_dim, pooled_size, pooled_size);
    offset (K, 2*num_classes, part_size, part_size) or None (no offsets; likewise trans_std = 0
    makes the offsets irrelevant), num_classes dividing output_dim; part_size None (or 0) means
    pooled_size. The forward is that implementation's, decision by decision:

    1. the box is rounded first: start = round(x1)*s - 0.5, end = (round(x2) + 1)*s - 0.5 (C
       round), roi_w = max(end - start, 0.1) (likewise y); bin = roi_w / pooled_size, sub-bin =
       bin / sample_per_part;
    2. bin (ph, pw) lies in part cell (floor(ph/pooled_size*part_size), likewise pw) and group
       cell (floor(ph*group_size/pooled_size), likewise pw, clamped to [0, group_size-1]); output
       channel ctop belongs to class ctop // (output_dim / num_classes) and reads input channel
       (ctop*group_size + group_h)*group_size + group_w;
    3. the bin starts at (ph*bin_h + start_h + trans_std*offset[k, 2*cls+1, part_h, part_w]*
       roi_h, pw*bin_w + start_w + trans_std*offset[k, 2*cls, part_h, part_w]*roi_w) (channel
       2*cls is x);
    4. sample_per_part**2 samples at the sub-bin starts (not centres): (hstart + ih*sub_h,
       wstart + iw*sub_w);
    5. a sample with x < -0.5 or x > W - 0.5 (or y likewise, or NaN) is skipped; the others are
       clamped to [0, W-1] x [0, H-1] and interpolated bilinearly (the clamp rule of SPEC 4
       restricted to that range);
    6. the output is the mean over the valid samples, 0 when none is valid.

    Gradients flow to ``input`` and ``offset``, exact: the offset gradient is
    trans_std*roi_w/n * sum of grad * d sample/dx over valid samples (zero where clamped; the
    right-hand slope at integer coordinates); the valid-sample count n is piecewise constant.
    """
    args = prepare_deform_ps_roi_pool(
        input, boxes, offset, spatial_scale, output_dim, group_size, pooled_size, part_size,
        sample_per_part, trans_std,
    )  # fmt: skip
    return DeformPSRoIPoolFunction.apply(input, offset, args=args)
