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
  pooling bins are empty). An adaptive grid (sampling_ratio <= 0) of more than 2**24 samples per
  bin is refused with a ValueError (pass a positive sampling_ratio).

The array-level pairs, for wrapping in other frameworks (plain arrays in and out; ``input`` of a
backward is used for its values where the gradient needs them, else only for its shape/dtype;
``needs`` selects the gradients, the others are None)::

    out = roi_align_forward(input, boxes, output_size, spatial_scale, sampling_ratio, aligned)
    (grad_input,) = roi_align_backward(grad_out, input, boxes, output_size, spatial_scale,
                                       sampling_ratio, aligned)
    out, argmax = roi_pool_forward(input, boxes, output_size, spatial_scale, return_argmax=True)
    (grad_input,) = roi_pool_backward(grad_out, input, boxes, output_size, spatial_scale,
                                      argmax=argmax)   # argmax=None recomputes it
    ps_roi_align_forward / ps_roi_align_backward, ps_roi_pool_forward / ps_roi_pool_backward
    out = deform_roi_pool_forward(input, boxes, offset, output_size, spatial_scale,
                                  sampling_ratio, gamma)
    grad_input, grad_offset = deform_roi_pool_backward(grad_out, input, boxes, offset, ...)
    out = deform_ps_roi_pool_forward(input, boxes, offset, spatial_scale, output_dim,
                                     group_size, pooled_size, part_size, sample_per_part,
                                     trans_std)
    grad_input, grad_offset = deform_ps_roi_pool_backward(grad_out, input, boxes, offset, ...)

CPU gradients are deterministic (bit-identical with any number of threads).
"""

from __future__ import annotations

import math
import operator
from dataclasses import dataclass
from types import ModuleType
from typing import Any

import numpy as np

from ..function import Context, Function
from ..registry import BenchCase, CheckCase, bench_device, register_op, torch_device
from ..tensor import Tensor
from ._common import (
    check_ndim,
    device_of,
    float_array,
    is_device_array,
    kernel_module,
    pair,
    raw,
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


def _kernels(device: str) -> ModuleType:
    """The kernel module for ``device`` ("cpu" or "cuda")."""
    return kernel_module("roi pooling", "roi", device)


# ============================================================================ validation


def _host(a: Any) -> np.ndarray:
    a = raw(a)
    return a.copy_to_host() if is_device_array(a) else np.asarray(a)


def _input(op: str, input: Any) -> Any:
    inp = float_array(op, "input", input)
    check_ndim(op, "input", inp, 4, "(N, C, H, W)")
    return inp


def _real(op: str, name: str, v: Any) -> float:
    if isinstance(v, (bool, np.bool_)) or not isinstance(v, (int, float, np.integer, np.floating)):
        raise TypeError(f"{op}: {name} must be a real number, got {v!r}")
    f = float(v)
    if not math.isfinite(f):
        raise ValueError(f"{op}: {name} must be finite, got {v!r}")
    return f


def _int(op: str, name: str, v: Any, minimum: int | None = None) -> int:
    if isinstance(v, (bool, np.bool_)):
        raise TypeError(f"{op}: {name} must be an int, got {v!r}")
    try:
        i = operator.index(v)
    except TypeError:
        raise TypeError(f"{op}: {name} must be an int, got {v!r}") from None
    if minimum is not None and i < minimum:
        raise ValueError(f"{op}: {name} must be >= {minimum}, got {v!r}")
    return i


def _rois(op: str, boxes: Any, inp: Any) -> np.ndarray:
    """Boxes as the (K, 5) host array (batch_index, x1, y1, x2, y2) in the input's dtype."""
    B = inp.shape[0]
    dtype = np.dtype(inp.dtype)
    if isinstance(boxes, (list, tuple)):
        parts = []
        for i, b in enumerate(boxes):
            name = f"boxes[{i}]"
            a = float_array(op, name, _host(b))
            same_dtype(op, input=inp, **{name: a})
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
        same_dtype(op, input=inp, boxes=rois)
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
    return np.ascontiguousarray(rois)


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


def _grad_out(op: str, grad_out: Any, dtype: Any, shape: tuple) -> Any:
    g = float_array(op, "grad_out", grad_out)
    if np.dtype(g.dtype) != np.dtype(dtype):
        raise TypeError(f"{op}: grad_out must be {np.dtype(dtype)} like input, got {g.dtype}")
    if tuple(g.shape) != tuple(shape):
        raise ValueError(f"{op}: grad_out must have shape {tuple(shape)}, got {tuple(g.shape)}")
    return g


def _to_device(rois: np.ndarray, device: str) -> Any:
    """The validated (K, 5) RoIs as the kernels take them: a host array on every device (the CUDA
    kernels derive the per-RoI geometry on the host and send only that to the device)."""
    return rois


@dataclass(frozen=True)
class _Align:
    """Validated parameters of a RoI Align-family call."""

    op: str
    mode: str
    rois: Any
    output_size: tuple[int, int]
    spatial_scale: float
    sampling_ratio: int
    aligned: bool
    gamma: float
    device: str
    out_shape: tuple


def _prep_align(
    op: str,
    input: Any,
    boxes: Any,
    offset: Any,
    output_size: Any,
    spatial_scale: Any,
    sampling_ratio: Any,
    aligned: Any,
    gamma: Any = 0.0,
) -> tuple[Any, Any, _Align]:
    mode = {"roi_align": "roi_align", "ps_roi_align": "ps_roi_align"}.get(op, "deform_roi_pool")
    device = device_of(op, input=input, offset=offset)
    inp = _input(op, input)
    PH, PW = pair(op, "output_size", output_size, minimum=1)
    s = _real(op, "spatial_scale", spatial_scale)
    ratio = _int(op, "sampling_ratio", sampling_ratio)
    g = _real(op, "gamma", gamma)
    rois = _rois(op, boxes, inp)
    K = rois.shape[0]
    B, C, H, W = inp.shape
    if mode == "ps_roi_align":
        if C % (PH * PW) != 0:
            raise ValueError(
                f"{op}: input has {C} channels, expected a multiple of "
                f"output_size[0]*output_size[1] = {PH * PW}"
            )
        C = C // (PH * PW)
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
    p = _Align(
        op,
        mode,
        _to_device(rois, device),
        (PH, PW),
        s,
        ratio,
        bool(aligned),
        g,
        device,
        (K, C, PH, PW),
    )
    return inp, off, p


class _AlignFn(Function):
    """Autograd node of roi_align / ps_roi_align / deform_roi_pool (validated by the caller)."""

    supports_cuda = True  # forward/backward dispatch on the arrays' device

    @staticmethod
    def forward(ctx: Context, input: Any, offset: Any, p: _Align) -> Any:
        input = float_array(p.op, "input", input)
        if offset is not None:
            offset = float_array(p.op, "offset", offset)
        ctx.p = p
        ctx.save_for_backward(input, offset)
        return _kernels(p.device).align_forward(
            p.mode,
            input,
            p.rois,
            offset,
            p.output_size,
            p.spatial_scale,
            p.sampling_ratio,
            p.aligned,
            p.gamma,
        )

    @staticmethod
    def backward(ctx: Context, grad: Any) -> tuple[Any, Any]:
        input, offset = ctx.saved_tensors
        p = ctx.p
        if p.device == "cpu":
            grad = np.ascontiguousarray(grad)
        return _kernels(p.device).align_backward(
            p.mode,
            grad,
            input,
            p.rois,
            offset,
            p.output_size,
            p.spatial_scale,
            p.sampling_ratio,
            p.aligned,
            p.gamma,
            tuple(ctx.needs_input_grad[:2]),
        )


def _align_forward(inp: Any, off: Any, p: _Align) -> Any:
    return _kernels(p.device).align_forward(
        p.mode,
        inp,
        p.rois,
        off,
        p.output_size,
        p.spatial_scale,
        p.sampling_ratio,
        p.aligned,
        p.gamma,
    )


def _align_backward(grad_out: Any, inp: Any, off: Any, p: _Align, needs: Any) -> tuple:
    g = _grad_out(p.op, grad_out, inp.dtype, p.out_shape)
    needs = tuple(bool(n) for n in needs) + (False,) * (2 - len(tuple(needs)))
    return _kernels(p.device).align_backward(
        p.mode,
        g,
        inp,
        p.rois,
        off,
        p.output_size,
        p.spatial_scale,
        p.sampling_ratio,
        p.aligned,
        p.gamma,
        needs,
    )


# ============================================================================ roi_align


def roi_align_forward(
    input: Any,
    boxes: Any,
    output_size: Any,
    spatial_scale: float = 1.0,
    sampling_ratio: int = -1,
    aligned: bool = False,
) -> Any:
    """Array-level :func:`roi_align` forward: (K, C, PH, PW)."""
    inp, off, p = _prep_align(
        "roi_align", input, boxes, None, output_size, spatial_scale, sampling_ratio, aligned
    )
    return _align_forward(inp, off, p)


def roi_align_backward(
    grad_out: Any,
    input: Any,
    boxes: Any,
    output_size: Any,
    spatial_scale: float = 1.0,
    sampling_ratio: int = -1,
    aligned: bool = False,
    needs: tuple[bool] = (True,),
) -> tuple[Any]:
    """Array-level :func:`roi_align` backward: ``(grad_input,)`` (only input's shape is used)."""
    inp, off, p = _prep_align(
        "roi_align", input, boxes, None, output_size, spatial_scale, sampling_ratio, aligned
    )
    return (_align_backward(grad_out, inp, None, p, needs)[0],)


def roi_align(
    input: Any,
    boxes: Any,
    output_size: Any,
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
    inp, off, p = _prep_align(
        "roi_align", input, boxes, None, output_size, spatial_scale, sampling_ratio, aligned
    )
    return _AlignFn.apply(input, None, p=p)


# ============================================================================ ps_roi_align


def ps_roi_align_forward(
    input: Any,
    boxes: Any,
    output_size: Any,
    spatial_scale: float = 1.0,
    sampling_ratio: int = -1,
) -> Any:
    """Array-level :func:`ps_roi_align` forward: (K, C/(PH*PW), PH, PW)."""
    inp, off, p = _prep_align(
        "ps_roi_align", input, boxes, None, output_size, spatial_scale, sampling_ratio, True
    )
    return _align_forward(inp, off, p)


def ps_roi_align_backward(
    grad_out: Any,
    input: Any,
    boxes: Any,
    output_size: Any,
    spatial_scale: float = 1.0,
    sampling_ratio: int = -1,
    needs: tuple[bool] = (True,),
) -> tuple[Any]:
    """Array-level :func:`ps_roi_align` backward: ``(grad_input,)`` (only input's shape is used)."""
    inp, off, p = _prep_align(
        "ps_roi_align", input, boxes, None, output_size, spatial_scale, sampling_ratio, True
    )
    return (_align_backward(grad_out, inp, None, p, needs)[0],)


def ps_roi_align(
    input: Any,
    boxes: Any,
    output_size: Any,
    spatial_scale: float = 1.0,
    sampling_ratio: int = -1,
) -> Tensor:
    """Position-sensitive RoI Align (torchvision.ops.ps_roi_align): (K, C/(PH*PW), PH, PW).

    Output channel co at bin (ph, pw) averages input channel (co*PH + ph)*PW + pw over the bin's
    samples; always aligned (o = 0.5), no minimum size, average over max(gh*gw, 1) (torchvision
    divides by gh*gw and gives NaN for an empty grid; deformnp gives 0). Gradient to ``input``.
    """
    inp, off, p = _prep_align(
        "ps_roi_align", input, boxes, None, output_size, spatial_scale, sampling_ratio, True
    )
    return _AlignFn.apply(input, None, p=p)


# ============================================================================ deform_roi_pool


def deform_roi_pool_forward(
    input: Any,
    boxes: Any,
    offset: Any = None,
    output_size: Any = 7,
    spatial_scale: float = 1.0,
    sampling_ratio: int = 0,
    gamma: float = 0.1,
) -> Any:
    """Array-level :func:`deform_roi_pool` forward: (K, C, PH, PW)."""
    inp, off, p = _prep_align(
        "deform_roi_pool",
        input,
        boxes,
        offset,
        output_size,
        spatial_scale,
        sampling_ratio,
        True,
        gamma,
    )
    return _align_forward(inp, off, p)


def deform_roi_pool_backward(
    grad_out: Any,
    input: Any,
    boxes: Any,
    offset: Any = None,
    output_size: Any = 7,
    spatial_scale: float = 1.0,
    sampling_ratio: int = 0,
    gamma: float = 0.1,
    needs: tuple[bool, bool] = (True, True),
) -> tuple[Any, Any]:
    """Array-level :func:`deform_roi_pool` backward: ``(grad_input, grad_offset)``.

    grad_offset is None when offset is None. The offset gradient needs input's values.
    """
    inp, off, p = _prep_align(
        "deform_roi_pool",
        input,
        boxes,
        offset,
        output_size,
        spatial_scale,
        sampling_ratio,
        True,
        gamma,
    )
    return _align_backward(grad_out, inp, off, p, needs)


def deform_roi_pool(
    input: Any,
    boxes: Any,
    offset: Any = None,
    output_size: Any = 7,
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
    inp, off, p = _prep_align(
        "deform_roi_pool",
        input,
        boxes,
        offset,
        output_size,
        spatial_scale,
        sampling_ratio,
        True,
        gamma,
    )
    return _AlignFn.apply(input, offset, p=p)


# ============================================================================ roi_pool, ps_roi_pool


@dataclass(frozen=True)
class _Pool:
    op: str
    rois: Any
    output_size: tuple[int, int]
    spatial_scale: float
    device: str
    in_shape: tuple
    out_shape: tuple


def _prep_pool(op: str, input: Any, boxes: Any, output_size: Any, spatial_scale: Any) -> tuple:
    device = device_of(op, input=input)
    inp = _input(op, input)
    PH, PW = pair(op, "output_size", output_size, minimum=1)
    s = _real(op, "spatial_scale", spatial_scale)
    rois = _rois(op, boxes, inp)
    B, C, H, W = inp.shape
    if op == "ps_roi_pool":
        if C % (PH * PW) != 0:
            raise ValueError(
                f"{op}: input has {C} channels, expected a multiple of "
                f"output_size[0]*output_size[1] = {PH * PW}"
            )
        C = C // (PH * PW)
    p = _Pool(
        op,
        _to_device(rois, device),
        (PH, PW),
        s,
        device,
        tuple(int(n) for n in inp.shape),
        (rois.shape[0], C, PH, PW),
    )
    return inp, p


class _PoolFn(Function):
    """Autograd node of roi_pool / ps_roi_pool (validated by the caller)."""

    supports_cuda = True  # forward/backward dispatch on the arrays' device

    @staticmethod
    def forward(ctx: Context, input: Any, p: _Pool) -> Any:
        input = float_array(p.op, "input", input)
        out, argmax = _kernels(p.device).pool_forward(
            p.op, input, p.rois, p.output_size, p.spatial_scale
        )
        ctx.p = p
        ctx.dtype = input.dtype
        ctx.save_for_backward(argmax)
        return out

    @staticmethod
    def backward(ctx: Context, grad: Any) -> tuple[Any]:
        (argmax,) = ctx.saved_tensors
        p = ctx.p
        if p.device == "cpu":
            grad = np.ascontiguousarray(grad)
        g = _kernels(p.device).pool_backward(
            p.op, grad, p.in_shape, ctx.dtype, p.rois, argmax, p.output_size, p.spatial_scale
        )
        return (g,)


def roi_pool_forward(
    input: Any,
    boxes: Any,
    output_size: Any,
    spatial_scale: float = 1.0,
    return_argmax: bool = False,
) -> Any:
    """Array-level :func:`roi_pool` forward: (K, C, PH, PW), and with ``return_argmax`` also the
    argmax: the flat index into the H*W plane of each bin's maximum, -1 for an empty bin, in the
    smallest of int16/int32/int64 that holds H*W - 1 (CPU)."""
    inp, p = _prep_pool("roi_pool", input, boxes, output_size, spatial_scale)
    out, argmax = _kernels(p.device).pool_forward(
        "roi_pool", inp, p.rois, p.output_size, p.spatial_scale
    )
    return (out, argmax) if return_argmax else out


def roi_pool_backward(
    grad_out: Any,
    input: Any,
    boxes: Any,
    output_size: Any,
    spatial_scale: float = 1.0,
    argmax: Any = None,
    needs: tuple[bool] = (True,),
) -> tuple[Any]:
    """Array-level :func:`roi_pool` backward: ``(grad_input,)``: each bin's gradient goes to its
    argmax. Pass the forward's ``argmax`` to skip recomputing it from ``input``."""
    inp, p = _prep_pool("roi_pool", input, boxes, output_size, spatial_scale)
    g = _grad_out("roi_pool", grad_out, inp.dtype, p.out_shape)
    if not tuple(needs)[0]:
        return (None,)
    if argmax is None:
        _, argmax = _kernels(p.device).pool_forward(
            "roi_pool", inp, p.rois, p.output_size, p.spatial_scale
        )
    elif tuple(argmax.shape) != p.out_shape:
        raise ValueError(
            f"roi_pool: argmax must have shape {p.out_shape}, got {tuple(argmax.shape)}"
        )
    return (
        _kernels(p.device).pool_backward(
            "roi_pool", g, p.in_shape, inp.dtype, p.rois, argmax, p.output_size, p.spatial_scale
        ),
    )


def roi_pool(input: Any, boxes: Any, output_size: Any, spatial_scale: float = 1.0) -> Tensor:
    """RoI max pooling (torchvision.ops.roi_pool): input (N, C, H, W) -> (K, C, PH, PW).

    start = round(x1*s), end = round(x2*s) (C round; same for y); roi_w = max(end - start + 1, 1);
    bin_w = roi_w / PW; bin columns [floor(pw*bin_w) + start, ceil((pw+1)*bin_w) + start) clipped
    to [0, W]; max over the bin, the first maximum in row-major order wins (NaN counts as the
    maximum); an empty bin gives 0. The gradient goes to each bin's argmax (none for an empty bin).
    """
    inp, p = _prep_pool("roi_pool", input, boxes, output_size, spatial_scale)
    return _PoolFn.apply(input, p=p)


def ps_roi_pool_forward(
    input: Any, boxes: Any, output_size: Any, spatial_scale: float = 1.0
) -> Any:
    """Array-level :func:`ps_roi_pool` forward: (K, C/(PH*PW), PH, PW)."""
    inp, p = _prep_pool("ps_roi_pool", input, boxes, output_size, spatial_scale)
    return _kernels(p.device).pool_forward(
        "ps_roi_pool", inp, p.rois, p.output_size, p.spatial_scale
    )[0]


def ps_roi_pool_backward(
    grad_out: Any,
    input: Any,
    boxes: Any,
    output_size: Any,
    spatial_scale: float = 1.0,
    needs: tuple[bool] = (True,),
) -> tuple[Any]:
    """Array-level :func:`ps_roi_pool` backward: ``(grad_input,)`` (only input's shape is used)."""
    inp, p = _prep_pool("ps_roi_pool", input, boxes, output_size, spatial_scale)
    g = _grad_out("ps_roi_pool", grad_out, inp.dtype, p.out_shape)
    if not tuple(needs)[0]:
        return (None,)
    return (
        _kernels(p.device).pool_backward(
            "ps_roi_pool", g, p.in_shape, inp.dtype, p.rois, None, p.output_size, p.spatial_scale
        ),
    )


def ps_roi_pool(input: Any, boxes: Any, output_size: Any, spatial_scale: float = 1.0) -> Tensor:
    """Position-sensitive RoI average pooling (torchvision.ops.ps_roi_pool): (K, C/(PH*PW), PH, PW).

    start = round(x1*s), end = round(x2*s); roi_w = max(end - start, 1); bins as in roi_pool,
    clipped to [0, W] and [0, H]; output channel co at bin (ph, pw) averages input channel
    (co*PH + ph)*PW + pw over the bin; an empty bin gives 0.

    Difference from torchvision: its forward clips the bins to [0, W-1] and [0, H-1] (so it never
    pools the last row and column, and a bin there comes out empty), while its backward clips to
    [0, W] and [0, H]. deformnp uses [0, W] and [0, H] in both, so forward and backward agree.
    The outputs equal torchvision's wherever no bin reaches the last row or column.
    """
    inp, p = _prep_pool("ps_roi_pool", input, boxes, output_size, spatial_scale)
    return _PoolFn.apply(input, p=p)


# ============================================================================ deform_ps_roi_pool


@dataclass(frozen=True)
class _DPS:
    rois: Any
    spatial_scale: float
    output_dim: int
    group_size: int
    pooled_size: int
    part_size: int
    sample_per_part: int
    trans_std: float
    device: str
    out_shape: tuple


_DPS_OP = "deform_ps_roi_pool"


def _prep_dps(
    input: Any,
    boxes: Any,
    offset: Any,
    spatial_scale: Any,
    output_dim: Any,
    group_size: Any,
    pooled_size: Any,
    part_size: Any,
    sample_per_part: Any,
    trans_std: Any,
) -> tuple:
    op = _DPS_OP
    device = device_of(op, input=input, offset=offset)
    inp = _input(op, input)
    s = _real(op, "spatial_scale", spatial_scale)
    D = _int(op, "output_dim", output_dim, 1)
    gs = _int(op, "group_size", group_size, 1)
    P = _int(op, "pooled_size", pooled_size, 1)
    part = P if part_size is None or part_size == 0 else _int(op, "part_size", part_size, 1)
    spp = _int(op, "sample_per_part", sample_per_part, 1)
    ts = _real(op, "trans_std", trans_std)
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
    p = _DPS(_to_device(rois, device), s, D, gs, P, part, spp, ts, device, (K, D, P, P))
    return inp, off, p


def _dps_args(p: _DPS) -> tuple:
    return (
        p.spatial_scale,
        p.output_dim,
        p.group_size,
        p.pooled_size,
        p.part_size,
        p.sample_per_part,
        p.trans_std,
    )


class _DPSFn(Function):
    """Autograd node of deform_ps_roi_pool (validated by the caller)."""

    supports_cuda = True  # forward/backward dispatch on the arrays' device

    @staticmethod
    def forward(ctx: Context, input: Any, offset: Any, p: _DPS) -> Any:
        input = float_array(_DPS_OP, "input", input)
        if offset is not None:
            offset = float_array(_DPS_OP, "offset", offset)
        ctx.p = p
        ctx.save_for_backward(input, offset)
        return _kernels(p.device).deform_ps_forward(input, p.rois, offset, *_dps_args(p))

    @staticmethod
    def backward(ctx: Context, grad: Any) -> tuple[Any, Any]:
        input, offset = ctx.saved_tensors
        p = ctx.p
        if p.device == "cpu":
            grad = np.ascontiguousarray(grad)
        return _kernels(p.device).deform_ps_backward(
            grad, input, p.rois, offset, *_dps_args(p), tuple(ctx.needs_input_grad[:2])
        )


def deform_ps_roi_pool_forward(
    input: Any,
    boxes: Any,
    offset: Any,
    spatial_scale: float,
    output_dim: int,
    group_size: int,
    pooled_size: int,
    part_size: int | None = None,
    sample_per_part: int = 4,
    trans_std: float = 0.0,
) -> Any:
    """Array-level :func:`deform_ps_roi_pool` forward: (K, output_dim, pooled_size, pooled_size)."""
    inp, off, p = _prep_dps(
        input,
        boxes,
        offset,
        spatial_scale,
        output_dim,
        group_size,
        pooled_size,
        part_size,
        sample_per_part,
        trans_std,
    )
    return _kernels(p.device).deform_ps_forward(inp, p.rois, off, *_dps_args(p))


def deform_ps_roi_pool_backward(
    grad_out: Any,
    input: Any,
    boxes: Any,
    offset: Any,
    spatial_scale: float,
    output_dim: int,
    group_size: int,
    pooled_size: int,
    part_size: int | None = None,
    sample_per_part: int = 4,
    trans_std: float = 0.0,
    needs: tuple[bool, bool] = (True, True),
) -> tuple[Any, Any]:
    """Array-level :func:`deform_ps_roi_pool` backward: ``(grad_input, grad_offset)``."""
    inp, off, p = _prep_dps(
        input,
        boxes,
        offset,
        spatial_scale,
        output_dim,
        group_size,
        pooled_size,
        part_size,
        sample_per_part,
        trans_std,
    )
    g = _grad_out(_DPS_OP, grad_out, inp.dtype, p.out_shape)
    needs = tuple(bool(n) for n in needs) + (False,) * (2 - len(tuple(needs)))
    return _kernels(p.device).deform_ps_backward(g, inp, p.rois, off, *_dps_args(p), needs)


def deform_ps_roi_pool(
    input: Any,
    boxes: Any,
    offset: Any,
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
    inp, off, p = _prep_dps(
        input,
        boxes,
        offset,
        spatial_scale,
        output_dim,
        group_size,
        pooled_size,
        part_size,
        sample_per_part,
        trans_std,
    )
    return _DPSFn.apply(input, offset, p=p)


# ============================================================================ registry


def _boxes_in(rng: np.random.Generator, K: int, B: int, H: int, W: int, s: float) -> np.ndarray:
    """K boxes (batch, x1, y1, x2, y2) in image coordinates, inside an (H/s, W/s) image."""
    w = rng.uniform(0.15, 0.6, K) * W / s
    h = rng.uniform(0.15, 0.6, K) * H / s
    x1 = rng.uniform(0, W / s - w)
    y1 = rng.uniform(0, H / s - h)
    return np.stack([rng.integers(0, B, K), x1, y1, x1 + w, y1 + h], axis=1)


def _deform_offsets_off_kinks(
    rng: np.random.Generator, rois: np.ndarray, P: int, H: int, W: int, gamma: float, ratio: int
) -> np.ndarray:
    """Offsets for deform_roi_pool (aligned, spatial_scale 1) whose every sample coordinate has
    its fractional part in [0.1, 0.9] and lies 0.1 away from the lines -1, 0, H-1, H (W-1, W), so
    finite differences see no kink; redrawn bin by bin."""
    K = rois.shape[0]
    off = np.zeros((K, 2, P, P))
    for k in range(K):
        x1, y1, x2, y2 = rois[k, 1:] - 0.5
        rw, rh = x2 - x1, y2 - y1
        for ph in range(P):
            for pw in range(P):
                for _ in range(1000):
                    ox, oy = rng.uniform(-0.5, 0.5, 2)
                    ys = (
                        y1
                        + gamma * rh * oy
                        + ph * rh / P
                        + (np.arange(ratio) + 0.5) * rh / P / ratio
                    )
                    xs = (
                        x1
                        + gamma * rw * ox
                        + pw * rw / P
                        + (np.arange(ratio) + 0.5) * rw / P / ratio
                    )
                    if all(_off_kink(v, n) for v, n in [(ys, H), (xs, W)]):
                        off[k, :, ph, pw] = ox, oy
                        break
    return off


def _off_kink(v: np.ndarray, n: int) -> bool:
    frac = v - np.floor(v)
    lines = np.array([-1.0, 0.0, n - 1.0, float(n)])
    return bool(
        np.all((frac >= 0.1) & (frac <= 0.9)) and np.all(np.abs(v[:, None] - lines[None, :]) >= 0.1)
    )


def _check_roi_pool() -> list[CheckCase]:
    rng = np.random.default_rng(0)
    x = rng.standard_normal((2, 3, 6, 7))
    boxes = np.array([[0, 0.4, 1.2, 5.1, 4.6], [1, 2.0, 0.0, 6.9, 5.2]])
    return [
        CheckCase(
            lambda a: roi_pool(a, boxes, (2, 3), 1.0),
            (Tensor(x, requires_grad=True),),
            ("input",),
        )
    ]


def _check_roi_align() -> list[CheckCase]:
    rng = np.random.default_rng(0)
    x = rng.standard_normal((2, 2, 6, 7))
    boxes = np.array([[0, 0.4, 1.2, 5.1, 4.6], [1, -1.3, 0.2, 7.9, 6.2]])
    return [
        CheckCase(
            lambda a, al=al: roi_align(a, boxes, (2, 3), 1.0, -1, al),
            (Tensor(x.copy(), requires_grad=True),),
            (f"input (aligned={al})",),
        )
        for al in (False, True)
    ]


def _check_ps_roi_align() -> list[CheckCase]:
    rng = np.random.default_rng(0)
    x = rng.standard_normal((2, 8, 5, 6))
    boxes = np.array([[0, 0.4, 1.2, 5.1, 4.6], [1, -1.3, 0.2, 5.9, 4.2]])
    return [
        CheckCase(
            lambda a: ps_roi_align(a, boxes, 2, 1.0, 2),
            (Tensor(x, requires_grad=True),),
            ("input",),
        )
    ]


def _check_ps_roi_pool() -> list[CheckCase]:
    rng = np.random.default_rng(0)
    x = rng.standard_normal((2, 8, 5, 6))
    boxes = np.array([[0, 0.4, 1.2, 5.1, 4.6], [1, 1.3, 0.2, 5.9, 4.2]])
    return [
        CheckCase(
            lambda a: ps_roi_pool(a, boxes, 2, 1.0),
            (Tensor(x, requires_grad=True),),
            ("input",),
        )
    ]


def _check_deform_roi_pool() -> list[CheckCase]:
    rng = np.random.default_rng(0)
    H, W, P = 6, 7, 2
    x = rng.standard_normal((2, 3, H, W))
    boxes = np.array([[0, 0.4, 1.2, 5.1, 4.6], [1, 1.7, 0.9, 6.3, 5.8]])
    off = _deform_offsets_off_kinks(rng, boxes, P, H, W, 0.1, 2)
    return [
        CheckCase(
            lambda a, o: deform_roi_pool(a, boxes, o, P, 1.0, 2, 0.1),
            (Tensor(x, requires_grad=True), Tensor(off, requires_grad=True)),
            ("input", "offset"),
        )
    ]


def _check_deform_ps_roi_pool() -> list[CheckCase]:
    rng = np.random.default_rng(0)
    D, gs, P, H, W = 2, 2, 2, 6, 7
    x = rng.standard_normal((2, D * gs * gs, H, W))
    boxes = np.array([[0, 0.0, 1.0, 4.0, 4.0], [1, 2.0, 1.0, 5.0, 4.0]])
    # rounded boxes, sub-bins of 1.25 / 2 = 0.625 or 1.0 / 2 px: these offsets (x 0.1 = trans_std)
    # keep every sample's fractional part in [0.1, 0.9] and inside the image
    off = np.full((2, 2, P, P), 0.93)
    return [
        CheckCase(
            lambda a, o: deform_ps_roi_pool(a, boxes, o, 1.0, D, gs, P, None, 2, 0.1),
            (Tensor(x, requires_grad=True), Tensor(off, requires_grad=True)),
            ("input", "offset"),
        )
    ]


def _bench_data(dtype: Any = np.float32) -> tuple[np.ndarray, np.ndarray, float]:
    """SPEC 13: input (2, 256, 50, 50), 512 boxes inside an 800x800 image, spatial_scale 1/16."""
    rng = np.random.default_rng(0)
    s = 1.0 / 16.0
    x = rng.standard_normal((2, 256, 50, 50)).astype(dtype)
    boxes = _boxes_in(rng, 512, 2, 50, 50, s).astype(dtype)
    return x, boxes, s


def _torch_setup() -> Any:
    try:
        import numba
        import torch
        import torchvision  # noqa: F401
    except ImportError:
        return None
    torch.set_num_threads(numba.get_num_threads())
    return torch


def _bench_roi_align(device: str) -> BenchCase | None:
    x_host, boxes, s = _bench_data()
    g_host = np.random.default_rng(1).standard_normal((512, 256, 7, 7)).astype(np.float32)
    placed = bench_device(device, x_host, g_host)
    if placed is None:
        return None
    (x, g), sync = placed
    args = (7, s, 2, True)

    def forward() -> Any:
        return roi_align_forward(x, boxes, *args)

    def forward_backward() -> Any:
        roi_align_forward(x, boxes, *args)
        return roi_align_backward(g, x, boxes, *args)

    case = BenchCase(
        "input (2,256,50,50), 512 boxes, 7x7, sampling_ratio 2, aligned",
        forward,
        forward_backward,
        device=device,
        sync=sync,
    )
    tdev = torch_device(device)  # torchvision on the same device and thread count
    torch = _torch_setup() if tdev else None
    if torch is None:
        return case
    from torchvision.ops import roi_align as tv_roi_align

    tx = torch.from_numpy(x_host).to(tdev).requires_grad_(True)
    tb = torch.from_numpy(boxes).to(tdev)
    tg = torch.from_numpy(g_host).to(tdev)

    def torch_forward() -> Any:
        with torch.no_grad():
            return tv_roi_align(tx, tb, *args)

    def torch_forward_backward() -> Any:
        return torch.autograd.grad(tv_roi_align(tx, tb, *args), (tx,), tg)

    case.torch_forward = torch_forward
    case.torch_forward_backward = torch_forward_backward
    return case


def _bench_roi_pool(device: str) -> BenchCase | None:
    x_host, boxes, s = _bench_data()
    g_host = np.random.default_rng(1).standard_normal((512, 256, 7, 7)).astype(np.float32)
    placed = bench_device(device, x_host, g_host)
    if placed is None:
        return None
    (x, g), sync = placed

    def forward() -> Any:
        return roi_pool_forward(x, boxes, 7, s)

    def forward_backward() -> Any:
        out, argmax = roi_pool_forward(x, boxes, 7, s, return_argmax=True)
        return roi_pool_backward(g, x, boxes, 7, s, argmax=argmax)

    case = BenchCase(
        "input (2,256,50,50), 512 boxes, 7x7", forward, forward_backward, device=device, sync=sync
    )
    tdev = torch_device(device)  # torchvision on the same device and thread count
    torch = _torch_setup() if tdev else None
    if torch is None:
        return case
    from torchvision.ops import roi_pool as tv_roi_pool

    tx = torch.from_numpy(x_host).to(tdev).requires_grad_(True)
    tb = torch.from_numpy(boxes).to(tdev)
    tg = torch.from_numpy(g_host).to(tdev)

    def torch_forward() -> Any:
        with torch.no_grad():
            return tv_roi_pool(tx, tb, 7, s)

    def torch_forward_backward() -> Any:
        return torch.autograd.grad(tv_roi_pool(tx, tb, 7, s), (tx,), tg)

    case.torch_forward = torch_forward
    case.torch_forward_backward = torch_forward_backward
    return case


def _bench_ps(op: str) -> Any:
    def build(device: str) -> BenchCase | None:
        rng = np.random.default_rng(0)
        s = 1.0 / 16.0
        x_host = rng.standard_normal((2, 8 * 49, 50, 50)).astype(np.float32)
        boxes = _boxes_in(rng, 512, 2, 50, 50, s).astype(np.float32)
        g_host = rng.standard_normal((512, 8, 7, 7)).astype(np.float32)
        placed = bench_device(device, x_host, g_host)
        if placed is None:
            return None
        (x, g), sync = placed
        if op == "ps_roi_align":
            fwd, bwd, extra = ps_roi_align_forward, ps_roi_align_backward, (2,)
        else:
            fwd, bwd, extra = ps_roi_pool_forward, ps_roi_pool_backward, ()

        def forward() -> Any:
            return fwd(x, boxes, 7, s, *extra)

        def forward_backward() -> Any:
            fwd(x, boxes, 7, s, *extra)
            return bwd(g, x, boxes, 7, s, *extra)

        case = BenchCase(
            "input (2,392,50,50), 512 boxes, 7x7, 8 output channels",
            forward,
            forward_backward,
            device=device,
            sync=sync,
        )
        tdev = torch_device(device)  # torchvision on the same device and thread count
        torch = _torch_setup() if tdev else None
        if torch is None:
            return case
        import torchvision.ops as tvo

        tv = getattr(tvo, op)
        tx = torch.from_numpy(x_host).to(tdev).requires_grad_(True)
        tb = torch.from_numpy(boxes).to(tdev)
        tg = torch.from_numpy(g_host).to(tdev)

        def torch_forward() -> Any:
            with torch.no_grad():
                return tv(tx, tb, 7, s, *extra)

        def torch_forward_backward() -> Any:
            return torch.autograd.grad(tv(tx, tb, 7, s, *extra), (tx,), tg)

        case.torch_forward = torch_forward
        case.torch_forward_backward = torch_forward_backward
        return case

    return build


def _bench_deform_roi_pool(device: str) -> BenchCase | None:
    x, boxes, s = _bench_data()
    rng = np.random.default_rng(2)
    off = rng.uniform(-1, 1, (512, 2, 7, 7)).astype(np.float32)
    g = rng.standard_normal((512, 256, 7, 7)).astype(np.float32)
    placed = bench_device(device, x, off, g)
    if placed is None:
        return None
    (x, off, g), sync = placed

    def forward() -> Any:
        return deform_roi_pool_forward(x, boxes, off, 7, s, 2, 0.1)

    def forward_backward() -> Any:
        deform_roi_pool_forward(x, boxes, off, 7, s, 2, 0.1)
        return deform_roi_pool_backward(g, x, boxes, off, 7, s, 2, 0.1)

    return BenchCase(
        "roi_align's size, offsets in [-1, 1], gamma 0.1",
        forward,
        forward_backward,
        device=device,
        sync=sync,
    )


def _bench_deform_ps_roi_pool(device: str) -> BenchCase | None:
    rng = np.random.default_rng(0)
    s = 1.0 / 16.0
    D, gs, P = 8, 7, 7
    x = rng.standard_normal((2, D * gs * gs, 50, 50)).astype(np.float32)
    boxes = _boxes_in(rng, 512, 2, 50, 50, s).astype(np.float32)
    off = rng.standard_normal((512, 2, P, P)).astype(np.float32)
    g = rng.standard_normal((512, D, P, P)).astype(np.float32)
    args = (s, D, gs, P, None, 4, 0.1)
    placed = bench_device(device, x, off, g)
    if placed is None:
        return None
    (x, off, g), sync = placed

    def forward() -> Any:
        return deform_ps_roi_pool_forward(x, boxes, off, *args)

    def forward_backward() -> Any:
        deform_ps_roi_pool_forward(x, boxes, off, *args)
        return deform_ps_roi_pool_backward(g, x, boxes, off, *args)

    return BenchCase(
        "R-FCN head: input (2,392,50,50), 512 boxes, 7x7, 4x4 samples",
        forward,
        forward_backward,
        device=device,
        sync=sync,
    )


register_op("roi_pool", check=_check_roi_pool, bench=_bench_roi_pool)
register_op("roi_align", check=_check_roi_align, bench=_bench_roi_align)
register_op("ps_roi_pool", check=_check_ps_roi_pool, bench=_bench_ps("ps_roi_pool"))
register_op("ps_roi_align", check=_check_ps_roi_align, bench=_bench_ps("ps_roi_align"))
register_op("deform_roi_pool", check=_check_deform_roi_pool, bench=_bench_deform_roi_pool)
register_op("deform_ps_roi_pool", check=_check_deform_ps_roi_pool, bench=_bench_deform_ps_roi_pool)
