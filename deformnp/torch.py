"""deformnp's kernels for PyTorch users: change an import, keep the model.

``import deformnp.torch`` imports torch (``import deformnp`` never does). It offers the anchors'
functions and modules with their signatures, defaults and parameter names, computed by
deformnp's NumPy + Numba kernels and differentiable through ``torch.autograd``:

=====================================  ==================================================
instead of                             use
=====================================  ==================================================
``torchvision.ops.deform_conv2d``      :func:`deform_conv2d`, :class:`DeformConv2d`
``torchvision.ops.roi_align``          :func:`roi_align`, :class:`RoIAlign`
``torchvision.ops.roi_pool``           :func:`roi_pool`, :class:`RoIPool`
``torchvision.ops.ps_roi_align``       :func:`ps_roi_align`, :class:`PSRoIAlign`
``torchvision.ops.ps_roi_pool``        :func:`ps_roi_pool`, :class:`PSRoIPool`
``mmcv.ops.modulated_deform_conv2d``   :func:`modulated_deform_conv2d`,
                                       :class:`ModulatedDeformConv2d`,
                                       :class:`ModulatedDeformConv2dPack`
``mmcv.ops.deform_roi_pool``           :func:`deform_roi_pool`, :class:`DeformRoIPool`,
                                       :class:`DeformRoIPoolPack`,
                                       :class:`ModulatedDeformRoIPoolPack`
Deformable-DETR's ``MSDeformAttn``     :class:`MSDeformAttnFunction` (same ``apply``),
                                       :func:`ms_deform_attn`, :class:`MSDeformAttn`
=====================================  ==================================================

The modules keep the anchors' parameter and buffer names (``weight``, ``bias``,
``conv_offset.*``, ``offset_fc.*``, ``sampling_offsets.*``, ...), so the anchors' state dicts
load with ``strict=True``, and their initialisations (torchvision's ``reset_parameters``,
mmcv's ``init_weights``, Deformable-DETR's ``_reset_parameters``).

Contract
--------
* **Dtypes.** float32 and float64; every floating input of one call must share the dtype (else
  a ``TypeError``), and outputs and gradients have it. Under ``torch.autocast`` (CUDA or CPU)
  float16/bfloat16 inputs are cast to float32 first (``torch.amp.custom_fwd``), so the outputs
  are float32 there; outside autocast a float16/bfloat16 input is a ``TypeError``.
* **Devices.** CPU tensors and CUDA tensors; all of one call on one device (else a
  ``ValueError``); outputs and gradients are on the input's device. Boxes, ``spatial_shapes``
  and ``level_start_index`` may live anywhere: they are read on the host (a small copy).
* **Copies.** A CPU tensor reaches the kernels as ``t.detach().numpy()``, a view of its memory
  (a C-contiguous copy first only when it is not C-contiguous) and the kernels' NumPy outputs
  come back through ``torch.from_numpy`` (no copy). A CUDA tensor reaches deformnp's CUDA
  kernels as a numba device array viewing it through ``__cuda_array_interface__``
  (``numba.cuda.as_cuda_array``: no copy; made contiguous first if it is not), and the
  outputs, numba device arrays, come back through ``torch.as_tensor(out, device=...)`` (no
  copy). Output memory is allocated by Numba (``numba.cuda.device_array``), not by torch's
  caching allocator: ``torch.cuda.memory_allocated`` does not count it, and Numba frees it
  (possibly deferred) once the tensor is released.
* **CUDA streams.** deformnp launches its kernels on Numba's default stream, the legacy
  default stream that is also torch's default stream. When torch's current stream is that
  stream (the usual case) nothing more is needed. When it is another stream (``with
  torch.cuda.stream(s):``) the adapter orders the work without blocking the host: the default
  stream first waits for the current stream (the inputs are ready), the kernels run, then the
  current stream waits for the default stream (the outputs are ready, and input memory freed
  afterwards is not reused too early). The kernels run in the tensor's device's primary
  context (``numba.cuda.gpus[index]``), so tensors on ``cuda:1`` work too.
* **Autograd.** Every function is a ``torch.autograd.Function`` whose backward calls
  deformnp's array-level ``<op>_backward`` with ``needs`` from ``ctx.needs_input_grad``:
  only the gradients asked for are computed. Tensors that require grad are detached before
  they are handed to NumPy. Backwards are once-differentiable (no double backward). Boxes,
  spatial shapes and level indices get no gradient, as in the anchors.
* **Errors.** The arguments are validated by deformnp: a wrong shape or value is a
  ``ValueError``, a wrong type or dtype a ``TypeError``, with a message that names the op and
  the argument (the anchors raise ``RuntimeError`` from C++ or fail assertions).

Differences from the anchors, all of deformnp's ops (see ``deformnp.ops``): any batch size works
(``im2col_step`` is accepted and ignored); torchvision's ``ps_roi_pool`` forward never pools the
last row and column while deformnp's does (the outputs agree wherever no bin reaches them); boxes
with NaN coordinates give zeros; an empty ``ps_roi_align`` sampling grid gives 0, not NaN; the
offset gradients are the exact derivatives of the forward, also on the border lines where mmcv's
are not (torchvision's deform_conv2d is exact there too). TorchScript, ``torch.compile`` (beyond a graph break) and
quantized tensors are not supported.
"""

from __future__ import annotations

import contextlib
import math
import warnings
from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import Tensor, nn
from torch.autograd.function import FunctionCtx, once_differentiable
from torch.nn.modules.utils import _pair

from . import ops as _ops
from . import threads as _threads

__all__ = [
    # torchvision.ops
    "deform_conv2d",
    "roi_align",
    "roi_pool",
    "ps_roi_align",
    "ps_roi_pool",
    "DeformConv2d",
    "RoIAlign",
    "RoIPool",
    "PSRoIAlign",
    "PSRoIPool",
    # mmcv.ops
    "modulated_deform_conv2d",
    "deform_roi_pool",
    "ModulatedDeformConv2d",
    "ModulatedDeformConv2dPack",
    "DeformRoIPool",
    "DeformRoIPoolPack",
    "ModulatedDeformRoIPoolPack",
    # Deformable-DETR
    "MSDeformAttnFunction",
    "ms_deform_attn",
    "MSDeformAttn",
]

if TYPE_CHECKING:  # annotations only (strings at run time), so the module imports anywhere
    BoxesLike = Tensor | Sequence[Tensor] | np.ndarray
IntPair = int | tuple[int, int]


# ============================================================================ tensors <-> arrays


def _check_dtype(t: Tensor) -> None:
    if t.is_floating_point() and t.dtype not in (torch.float32, torch.float64):
        raise TypeError(
            f"deformnp.torch: {t.dtype} tensors are not supported: deformnp computes in float32 "
            "or float64 (cast with .float(), or run under torch.autocast, which casts them to "
            "float32)"
        )


def _array(t: Tensor | None) -> Any:
    """What deformnp's array-level functions take for ``t``: a NumPy view of a CPU tensor, a
    numba device-array view of a CUDA tensor (through ``__cuda_array_interface__``; call inside
    :func:`_launch`, which makes the tensor's device current). C-contiguous: a copy only when
    ``t`` is not. The tensor is detached first (``numpy()`` refuses tensors that require grad).
    """
    if t is None:
        return None
    if not isinstance(t, Tensor):
        raise TypeError(f"deformnp.torch: expected a torch.Tensor, got {type(t).__name__}")
    _check_dtype(t)
    t = t.detach()
    if not t.is_contiguous():
        t = t.contiguous()
    if t.device.type == "cpu":
        return t.numpy()
    if t.device.type == "cuda":
        from numba import cuda as numba_cuda

        # a numba view (it keeps the tensor alive): deformnp then sees numba arrays only
        return numba_cuda.as_cuda_array(t)
    raise ValueError(
        f"deformnp.torch: tensors must be on the CPU or a CUDA device, got one on {t.device}"
    )


def _tensor(a: Any, device: torch.device) -> Tensor | None:
    """A torch tensor viewing an array a deformnp function returned (no copy)."""
    if a is None:
        return None
    if isinstance(a, np.ndarray):
        return torch.from_numpy(a)
    return torch.as_tensor(a, device=device)


def _tensors(arrays: Sequence[Any], device: torch.device) -> tuple[Tensor | None, ...]:
    return tuple(_tensor(a, device) for a in arrays)


def _host(t: Any) -> Any:
    """An index or box argument as a host array (tensors anywhere are copied to the host)."""
    if isinstance(t, Tensor):
        _check_dtype(t)
        return t.detach().cpu().numpy()
    return t


def _host_boxes(boxes: Any) -> Any:
    """Boxes as deformnp takes them: a (K, 5) host array, or a list of (L, 4) host arrays."""
    if isinstance(boxes, (list, tuple)):
        return [_host(b) for b in boxes]
    return _host(boxes)


@contextlib.contextmanager
def _launch(device: torch.device) -> Iterator[None]:
    """Run deformnp's kernels for tensors on ``device``: nothing to do on the CPU; on CUDA, in
    the device's primary context and ordered with torch's current stream (module docstring)."""
    if device.type != "cuda":
        yield
        return
    from numba import cuda as numba_cuda  # deformnp's CUDA kernels are numba.cuda kernels

    index = device.index if device.index is not None else torch.cuda.current_device()
    current = torch.cuda.current_stream(index)
    default = torch.cuda.default_stream(index)
    side = current != default
    if side:
        default.wait_stream(current)
    try:
        with numba_cuda.gpus[index]:
            yield
    finally:
        if side:
            current.wait_stream(default)


def _amp_float32(forward: Any) -> Any:
    """Under autocast (CUDA or CPU), cast float16/bfloat16 inputs to float32 and run the
    forward with autocast off; outside autocast, nothing."""
    forward = torch.amp.custom_fwd(forward, device_type="cpu", cast_inputs=torch.float32)
    return torch.amp.custom_fwd(forward, device_type="cuda", cast_inputs=torch.float32)


# ============================================================================ deform_conv2d


class _DeformConv2dFunction(torch.autograd.Function):
    """deformnp's ``deform_conv2d_forward`` / ``_backward``; inputs (input, offset, weight,
    bias, mask), torchvision's layout."""

    @staticmethod
    @_amp_float32
    def forward(
        ctx: FunctionCtx,
        input: Tensor,
        offset: Tensor,
        weight: Tensor,
        bias: Tensor | None,
        mask: Tensor | None,
        stride: IntPair,
        padding: IntPair,
        dilation: IntPair,
    ) -> Tensor:
        if input.device.type == "cpu":
            # torch's OpenMP workers (loaded before deformnp could ask them to sleep) would spin
            # over the GEMMs of this op's backward; see deformnp.threads
            _threads.passive_openmp_workers()
        ctx.geometry = (stride, padding, dilation)
        ctx.save_for_backward(input, offset, weight, bias, mask)
        with _launch(input.device):
            out = _ops.deform_conv2d_forward(
                _array(input), _array(offset), _array(weight), _array(bias), stride, padding,
                dilation, _array(mask),
            )  # fmt: skip
            return _tensor(out, input.device)

    @staticmethod
    @once_differentiable
    def backward(ctx: FunctionCtx, grad: Tensor) -> tuple[Tensor | None, ...]:
        input, offset, weight, bias, mask = ctx.saved_tensors
        stride, padding, dilation = ctx.geometry
        with _launch(input.device):
            grads = _ops.deform_conv2d_backward(
                _array(grad), _array(input), _array(offset), _array(weight), _array(bias),
                stride, padding, dilation, _array(mask), needs=ctx.needs_input_grad[:5],
            )  # fmt: skip
            return (*_tensors(grads, input.device), None, None, None)


def deform_conv2d(
    input: Tensor,
    offset: Tensor,
    weight: Tensor,
    bias: Tensor | None = None,
    stride: IntPair = (1, 1),
    padding: IntPair = (0, 0),
    dilation: IntPair = (1, 1),
    mask: Tensor | None = None,
) -> Tensor:
    """Deformable convolution v1 (v2 with ``mask``), as ``torchvision.ops.deform_conv2d``.

    torchvision's signature, defaults and offset layout. Forward and backward run deformnp's
    kernels (:func:`deformnp.ops.deform_conv2d_forward` / ``_backward``) on the tensors' memory,
    CPU or CUDA; the backward computes only the gradients autograd asks for.

    Parameters
    ----------
    input : Tensor, shape (B, Cin, H, W)
        The feature map, float32 or float64.
    offset : Tensor, shape (B, 2*G*kh*kw, Hout, Wout)
        For kernel point ``k = i*kw + j`` of offset group ``g``, ``(dy, dx)`` in channels
        ``2*(g*kh*kw + k)`` and ``2*(g*kh*kw + k) + 1``. G (offset groups) is inferred from the
        channel count.
    weight : Tensor, shape (Cout, Cin/groups, kh, kw)
        The filters; ``groups`` is inferred as ``Cin / weight.shape[1]``.
    bias : Tensor, shape (Cout,), optional
        Added to each output channel.
    stride : int or (int, int), default (1, 1)
        The step between output positions, (sh, sw).
    padding : int or (int, int), default (0, 0)
        Zero padding, (ph, pw).
    dilation : int or (int, int), default (1, 1)
        The spacing of the kernel taps, (dh, dw).
    mask : Tensor, shape (B, G*kh*kw, Hout, Wout), optional
        The modulation of DCN v2; None is DCN v1 (all ones).

    Returns
    -------
    Tensor, shape (B, Cout, Hout, Wout)
        Of the inputs' dtype and device; ``Hout = (H + 2*ph - (dh*(kh-1) + 1)) // sh + 1``
        (likewise Wout). Differentiable in input, offset, weight, bias and mask.

    Raises
    ------
    TypeError
        If a floating tensor is not float32/float64 (outside autocast) or the dtypes differ.
    ValueError
        If a shape or value is invalid or the tensors are on different devices.

    See Also
    --------
    DeformConv2d : The module.
    deformnp.ops.deform_conv2d : The same op on deformnp Tensors; formulas and gradients in
        :doc:`/ops/deform_conv`.
    """
    return _DeformConv2dFunction.apply(
        input, offset, weight, bias, mask, _pair(stride), _pair(padding), _pair(dilation)
    )


def modulated_deform_conv2d(
    input: Tensor,
    offset: Tensor,
    mask: Tensor,
    weight: Tensor,
    bias: Tensor | None = None,
    stride: IntPair = 1,
    padding: IntPair = 0,
    dilation: IntPair = 1,
    groups: int = 1,
    deform_groups: int = 1,
) -> Tensor:
    """Modulated deformable convolution (DCN v2), as ``mmcv.ops.modulated_deform_conv2d``.

    mmcv's argument order (input, offset, mask, weight, bias, stride, padding, dilation, groups,
    deform_groups). mmcv's offset layout is torchvision's (its CUDA kernel reads dy of kernel
    point k of deformable group g from channel ``2*(g*kh*kw + k)``, dx from the next), so the
    offset and mask go to deformnp's deformable-convolution kernels unchanged; forward and
    backward run those kernels.

    Parameters
    ----------
    input : Tensor, shape (B, Cin, H, W)
        The feature map, float32 or float64.
    offset : Tensor, shape (B, 2*deform_groups*kh*kw, Hout, Wout)
        ``(dy, dx)`` per kernel point and deformable group, as in :func:`deform_conv2d`.
    mask : Tensor, shape (B, deform_groups*kh*kw, Hout, Wout)
        The modulation; None is accepted and means all ones (DCN v1).
    weight : Tensor, shape (Cout, Cin/groups, kh, kw)
        The filters.
    bias : Tensor, shape (Cout,), optional
        Added to each output channel.
    stride : int or (int, int), default 1
        The step between output positions.
    padding : int or (int, int), default 0
        Zero padding.
    dilation : int or (int, int), default 1
        The spacing of the kernel taps.
    groups : int, default 1
        Weight groups; must equal ``Cin / weight.shape[1]``.
    deform_groups : int, default 1
        Offset groups; must equal ``offset.shape[1] / (2*kh*kw)``.

    Returns
    -------
    Tensor, shape (B, Cout, Hout, Wout)
        Of the inputs' dtype and device; differentiable in input, offset, mask, weight and bias.

    Raises
    ------
    TypeError
        If a floating tensor is not float32/float64 (outside autocast) or the dtypes differ.
    ValueError
        If a tensor is not 4-d, ``groups`` or ``deform_groups`` disagrees with the shapes, or
        another shape or value is invalid.

    See Also
    --------
    ModulatedDeformConv2d, ModulatedDeformConv2dPack : The modules.
    deformnp.ops.deform_conv2d : The op, with ``mask``; formulas in :doc:`/ops/deform_conv`.
    """
    op = "modulated_deform_conv2d"
    if input.dim() != 4 or weight.dim() != 4 or offset.dim() != 4:
        raise ValueError(
            f"{op}: input, offset and weight must be 4-d, got shapes {tuple(input.shape)}, "
            f"{tuple(offset.shape)}, {tuple(weight.shape)}"
        )
    if groups < 1 or weight.shape[1] * groups != input.shape[1]:
        raise ValueError(
            f"{op}: input has {input.shape[1]} channels, expected groups * weight.shape[1] = "
            f"{groups} * {weight.shape[1]} = {groups * weight.shape[1]}"
        )
    kk = weight.shape[2] * weight.shape[3]
    if deform_groups < 1 or offset.shape[1] != 2 * deform_groups * kk:
        raise ValueError(
            f"{op}: offset has {offset.shape[1]} channels, expected 2*deform_groups*kh*kw = "
            f"{2 * deform_groups * kk} (deform_groups = {deform_groups})"
        )
    return _DeformConv2dFunction.apply(
        input, offset, weight, bias, mask, _pair(stride), _pair(padding), _pair(dilation)
    )


# ============================================================================ RoI ops


_FORWARDS = {
    "roi_align": _ops.roi_align_forward,
    "ps_roi_align": _ops.ps_roi_align_forward,
    "ps_roi_pool": _ops.ps_roi_pool_forward,
}
_BACKWARDS = {
    "roi_align": _ops.roi_align_backward,
    "ps_roi_align": _ops.ps_roi_align_backward,
    "ps_roi_pool": _ops.ps_roi_pool_backward,
}


class _RoIFunction(torch.autograd.Function):
    """The non-deformable RoI ops: inputs (input, boxes, op, params); gradient to input only.
    ``params`` are the op's arguments after ``output_size`` (deformnp's order)."""

    @staticmethod
    @_amp_float32
    def forward(
        ctx: FunctionCtx, input: Tensor, boxes: Any, op: str, output_size: Any, params: tuple
    ) -> Tensor:
        rois = _host_boxes(boxes)
        ctx.meta = (op, rois, tuple(input.shape), output_size, params, input.device)
        with _launch(input.device):
            if op == "roi_pool":
                out, ctx.argmax = _ops.roi_pool_forward(
                    _array(input), rois, output_size, *params, return_argmax=True
                )
            else:
                out = _FORWARDS[op](_array(input), rois, output_size, *params)
            return _tensor(out, input.device)

    @staticmethod
    @once_differentiable
    def backward(ctx: FunctionCtx, grad: Tensor) -> tuple[Tensor | None, ...]:
        op, rois, shape, output_size, params, device = ctx.meta
        needs = ctx.needs_input_grad[:1]
        with _launch(device):
            if op == "roi_pool":
                grads = _ops.roi_pool_backward(
                    _array(grad), shape, rois, output_size, *params, argmax=ctx.argmax,
                    needs=needs,
                )  # fmt: skip
            else:
                grads = _BACKWARDS[op](_array(grad), shape, rois, output_size, *params, needs=needs)
            return (_tensor(grads[0], device), None, None, None, None)


def roi_align(
    input: Tensor,
    boxes: BoxesLike,
    output_size: IntPair,
    spatial_scale: float = 1.0,
    sampling_ratio: int = -1,
    aligned: bool = False,
) -> Tensor:
    """RoI Align, as ``torchvision.ops.roi_align``.

    torchvision's signature and defaults; forward and backward run deformnp's kernels
    (:func:`deformnp.ops.roi_align_forward` / ``_backward``).

    Parameters
    ----------
    input : Tensor, shape (N, C, H, W)
        The feature map, float32 or float64.
    boxes : Tensor, shape (K, 5), or list of Tensor, shape (L_i, 4)
        ``(batch_index, x1, y1, x2, y2)`` rows, or one ``(x1, y1, x2, y2)`` tensor per image (the
        list position is the batch index); the input's dtype, any device (read on the host).
        Not differentiated.
    output_size : int or (int, int)
        (PH, PW), the bins per box.
    spatial_scale : float, default 1.0
        Multiplies the box coordinates (the feature map's scale relative to the image).
    sampling_ratio : int, default -1
        Samples per bin side; <= 0: adaptive, ``ceil(roi_size / output_size)`` per side.
    aligned : bool, default False
        Shift the boxes by -0.5 pixel (Detectron2's alignment); False also enforces a minimum
        box size of 1, as torchvision.

    Returns
    -------
    Tensor, shape (K, C, PH, PW)
        Of the input's dtype and device; differentiable in ``input``.

    Raises
    ------
    TypeError
        If a floating tensor is not float32/float64 (outside autocast) or the dtypes differ.
    ValueError
        If a shape or value is invalid or the tensors are on different devices.

    See Also
    --------
    RoIAlign : The module.
    deformnp.ops.roi_align : The same op on deformnp Tensors; formulas in :doc:`/ops/roi`.
    """
    return _RoIFunction.apply(
        input, boxes, "roi_align", output_size, (spatial_scale, sampling_ratio, bool(aligned))
    )


def roi_pool(
    input: Tensor, boxes: BoxesLike, output_size: IntPair, spatial_scale: float = 1.0
) -> Tensor:
    """RoI max pooling, as ``torchvision.ops.roi_pool``.

    Forward and backward run deformnp's kernels (:func:`deformnp.ops.roi_pool_forward` /
    ``_backward``); the forward's argmax is kept for the backward.

    Parameters
    ----------
    input : Tensor, shape (N, C, H, W)
        The feature map, float32 or float64.
    boxes : Tensor, shape (K, 5), or list of Tensor, shape (L_i, 4)
        ``(batch_index, x1, y1, x2, y2)`` rows, or one ``(x1, y1, x2, y2)`` tensor per image (the
        list position is the batch index); the input's dtype, any device (read on the host).
        Not differentiated.
    output_size : int or (int, int)
        (PH, PW), the bins per box.
    spatial_scale : float, default 1.0
        Multiplies the box coordinates before rounding.

    Returns
    -------
    Tensor, shape (K, C, PH, PW)
        Of the input's dtype and device. Differentiable in ``input``: each bin's gradient goes
        to its maximum.

    Raises
    ------
    TypeError
        If a floating tensor is not float32/float64 (outside autocast) or the dtypes differ.
    ValueError
        If a shape or value is invalid or the tensors are on different devices.

    See Also
    --------
    RoIPool : The module.
    deformnp.ops.roi_pool : The same op on deformnp Tensors; formulas in :doc:`/ops/roi`.
    """
    return _RoIFunction.apply(input, boxes, "roi_pool", output_size, (spatial_scale,))


def ps_roi_align(
    input: Tensor,
    boxes: BoxesLike,
    output_size: IntPair,
    spatial_scale: float = 1.0,
    sampling_ratio: int = -1,
) -> Tensor:
    """Position-sensitive RoI Align, as ``torchvision.ops.ps_roi_align``.

    Forward and backward run deformnp's kernels (:func:`deformnp.ops.ps_roi_align_forward` /
    ``_backward``). An empty sampling grid (an inverted box with adaptive sampling) gives 0,
    where torchvision gives NaN.

    Parameters
    ----------
    input : Tensor, shape (N, C, H, W)
        The feature map, float32 or float64; C a multiple of PH*PW.
    boxes : Tensor, shape (K, 5), or list of Tensor, shape (L_i, 4)
        ``(batch_index, x1, y1, x2, y2)`` rows, or one ``(x1, y1, x2, y2)`` tensor per image (the
        list position is the batch index); the input's dtype, any device (read on the host).
        Not differentiated.
    output_size : int or (int, int)
        (PH, PW), the bins per box.
    spatial_scale : float, default 1.0
        Multiplies the box coordinates.
    sampling_ratio : int, default -1
        Samples per bin side; <= 0: adaptive, as :func:`roi_align`.

    Returns
    -------
    Tensor, shape (K, C/(PH*PW), PH, PW)
        Of the input's dtype and device; differentiable in ``input``.

    Raises
    ------
    TypeError
        If a floating tensor is not float32/float64 (outside autocast) or the dtypes differ.
    ValueError
        If a shape or value is invalid or the tensors are on different devices.

    See Also
    --------
    PSRoIAlign : The module.
    deformnp.ops.ps_roi_align : The same op on deformnp Tensors; formulas in :doc:`/ops/roi`.
    """
    return _RoIFunction.apply(
        input, boxes, "ps_roi_align", output_size, (spatial_scale, sampling_ratio)
    )


def ps_roi_pool(
    input: Tensor, boxes: BoxesLike, output_size: IntPair, spatial_scale: float = 1.0
) -> Tensor:
    """Position-sensitive RoI average pooling, as ``torchvision.ops.ps_roi_pool``.

    Forward and backward run deformnp's kernels (:func:`deformnp.ops.ps_roi_pool_forward` /
    ``_backward``). torchvision's forward never pools the last row and column of the map (its
    backward does); deformnp pools them in both, so the outputs differ from torchvision's in
    the bins that reach them and agree elsewhere.

    Parameters
    ----------
    input : Tensor, shape (N, C, H, W)
        The feature map, float32 or float64; C a multiple of PH*PW.
    boxes : Tensor, shape (K, 5), or list of Tensor, shape (L_i, 4)
        ``(batch_index, x1, y1, x2, y2)`` rows, or one ``(x1, y1, x2, y2)`` tensor per image (the
        list position is the batch index); the input's dtype, any device (read on the host).
        Not differentiated.
    output_size : int or (int, int)
        (PH, PW), the bins per box.
    spatial_scale : float, default 1.0
        Multiplies the box coordinates before rounding.

    Returns
    -------
    Tensor, shape (K, C/(PH*PW), PH, PW)
        Of the input's dtype and device; differentiable in ``input``.

    Raises
    ------
    TypeError
        If a floating tensor is not float32/float64 (outside autocast) or the dtypes differ.
    ValueError
        If a shape or value is invalid or the tensors are on different devices.

    See Also
    --------
    PSRoIPool : The module.
    deformnp.ops.ps_roi_pool : The same op on deformnp Tensors; formulas in :doc:`/ops/roi`.
    """
    return _RoIFunction.apply(input, boxes, "ps_roi_pool", output_size, (spatial_scale,))


class _DeformRoIPoolFunction(torch.autograd.Function):
    """deformnp's ``deform_roi_pool_forward`` / ``_backward``: inputs (input, rois, offset)."""

    @staticmethod
    @_amp_float32
    def forward(
        ctx: FunctionCtx,
        input: Tensor,
        rois: Any,
        offset: Tensor | None,
        output_size: IntPair,
        spatial_scale: float,
        sampling_ratio: int,
        gamma: float,
    ) -> Tensor:
        boxes = _host_boxes(rois)
        ctx.meta = (boxes, (output_size, spatial_scale, sampling_ratio, gamma))
        ctx.save_for_backward(input, offset)
        with _launch(input.device):
            out = _ops.deform_roi_pool_forward(
                _array(input), boxes, _array(offset), output_size, spatial_scale,
                sampling_ratio, gamma,
            )  # fmt: skip
            return _tensor(out, input.device)

    @staticmethod
    @once_differentiable
    def backward(ctx: FunctionCtx, grad: Tensor) -> tuple[Tensor | None, ...]:
        input, offset = ctx.saved_tensors
        boxes, params = ctx.meta
        needs = (ctx.needs_input_grad[0], ctx.needs_input_grad[2])
        with _launch(input.device):
            grad_input, grad_offset = _ops.deform_roi_pool_backward(
                _array(grad), _array(input), boxes, _array(offset), *params, needs=needs
            )
            return (
                _tensor(grad_input, input.device), None, _tensor(grad_offset, input.device),
                None, None, None, None,
            )  # fmt: skip


def deform_roi_pool(
    input: Tensor,
    rois: BoxesLike,
    offset: Tensor | None,
    output_size: IntPair,
    spatial_scale: float = 1.0,
    sampling_ratio: int = 0,
    gamma: float = 0.1,
) -> Tensor:
    """Deformable RoI pooling, as ``mmcv.ops.deform_roi_pool`` (mmcv's argument order).

    Forward and backward run deformnp's kernels (:func:`deformnp.ops.deform_roi_pool_forward`
    / ``_backward``); the offset gradient is the exact derivative of the forward, also on the
    border lines where mmcv's is not.

    Parameters
    ----------
    input : Tensor, shape (N, C, H, W)
        The feature map, float32 or float64.
    rois : Tensor, shape (K, 5)
        ``(batch_index, x1, y1, x2, y2)`` rows (a list of (L_i, 4) tensors works too); any
        device. Not differentiated.
    offset : Tensor, shape (K, 2, PH, PW), or None
        Normalized bin shifts, channel 0 x, channel 1 y: bin (ph, pw) moves by
        ``gamma * (roi_w * offset[k, 0, ph, pw], roi_h * offset[k, 1, ph, pw])``. None: no shift
        (aligned RoI Align without the minimum box size).
    output_size : int or (int, int)
        (PH, PW), the bins per box.
    spatial_scale : float, default 1.0
        Multiplies the box coordinates.
    sampling_ratio : int, default 0
        Samples per bin side; <= 0: adaptive, ``ceil(roi_size / output_size)``.
    gamma : float, default 0.1
        Scales the offsets.

    Returns
    -------
    Tensor, shape (K, C, PH, PW)
        Of the input's dtype and device; differentiable in ``input`` and ``offset``.

    Raises
    ------
    TypeError
        If a floating tensor is not float32/float64 (outside autocast) or the dtypes differ.
    ValueError
        If a shape or value is invalid or the tensors are on different devices.

    See Also
    --------
    DeformRoIPool, DeformRoIPoolPack, ModulatedDeformRoIPoolPack : The modules.
    deformnp.ops.deform_roi_pool : The same op on deformnp Tensors; formulas in
        :doc:`/ops/deform_roi`.
    """
    return _DeformRoIPoolFunction.apply(
        input, rois, offset, output_size, spatial_scale, sampling_ratio, gamma
    )


# ============================================================================ ms_deform_attn


class MSDeformAttnFunction(torch.autograd.Function):
    """Deformable-DETR's ``MSDeformAttnFunction``: multi-scale deformable attention.

    A ``torch.autograd.Function``.
    Use it as Deformable-DETR does: ``MSDeformAttnFunction.apply(value, value_spatial_shapes,
    value_level_start_index, sampling_locations, attention_weights, im2col_step)``; shapes as
    in :func:`ms_deform_attn`. ``im2col_step`` is accepted and ignored (any batch size works).
    Forward and backward run deformnp's kernels; gradients flow to value,
    sampling_locations and attention_weights.

    Parameters
    ----------
    *args, **kwargs
        ``torch.autograd.Function``'s constructor arguments; the class is not instantiated,
        call :meth:`apply`.

    See Also
    --------
    ms_deform_attn : The function form.
    deformnp.ops.ms_deform_attn : The op on deformnp Tensors; formulas in
        :doc:`/ops/ms_deform_attn`.
    """

    @staticmethod
    @_amp_float32
    def forward(
        ctx: FunctionCtx,
        value: Tensor,
        value_spatial_shapes: Any,
        value_level_start_index: Any,
        sampling_locations: Tensor,
        attention_weights: Tensor,
        im2col_step: Any = None,
    ) -> Tensor:
        """Run deformnp's forward kernel (called by ``apply``).

        Parameters
        ----------
        ctx : FunctionCtx
            torch's context; the inputs and the level layout are saved on it.
        value : Tensor, shape (N, S, M, D)
            The values.
        value_spatial_shapes : Tensor, shape (L, 2)
            Rows (H_l, W_l).
        value_level_start_index : Tensor, shape (L,)
            The first row of each level in ``value``.
        sampling_locations : Tensor, shape (N, Lq, M, L, P, 2)
            Normalized (x, y) sampling points.
        attention_weights : Tensor, shape (N, Lq, M, L, P)
            The weight of each sample.
        im2col_step : int, optional
            Ignored.

        Returns
        -------
        Tensor, shape (N, Lq, M*D)
            The attention output.
        """
        shapes, starts = _host(value_spatial_shapes), _host(value_level_start_index)
        ctx.levels = (shapes, starts)
        ctx.save_for_backward(value, sampling_locations, attention_weights)
        with _launch(value.device):
            out = _ops.ms_deform_attn_forward(
                _array(value), shapes, starts, _array(sampling_locations),
                _array(attention_weights),
            )  # fmt: skip
            return _tensor(out, value.device)

    @staticmethod
    @once_differentiable
    def backward(ctx: FunctionCtx, grad: Tensor) -> tuple[Tensor | None, ...]:
        """Run deformnp's backward kernel for the gradients autograd asks for.

        Parameters
        ----------
        ctx : FunctionCtx
            torch's context, as the forward left it.
        grad : Tensor, shape (N, Lq, M*D)
            The gradient of the output.

        Returns
        -------
        tuple of Tensor or None
            The gradients of (value, value_spatial_shapes, value_level_start_index,
            sampling_locations, attention_weights, im2col_step); None for the level layout, the
            step and any input autograd does not need.
        """
        value, locations, weights = ctx.saved_tensors
        shapes, starts = ctx.levels
        n = ctx.needs_input_grad
        with _launch(value.device):
            gv, gl, ga = _ops.ms_deform_attn_backward(
                _array(grad), _array(value), shapes, starts, _array(locations), _array(weights),
                needs=(n[0], n[3], n[4]),
            )  # fmt: skip
            gv, gl, ga = _tensors((gv, gl, ga), value.device)
            return gv, None, None, gl, ga, None


def ms_deform_attn(
    value: Tensor,
    spatial_shapes: Tensor,
    level_start_index: Tensor,
    sampling_locations: Tensor,
    attention_weights: Tensor,
) -> Tensor:
    """Multi-scale deformable attention, Deformable-DETR's ``MSDeformAttnFunction`` as a function.

    Without ``im2col_step``; equal to Deformable-DETR's ``ms_deform_attn_core_pytorch``. Forward and backward run
    deformnp's kernels (:func:`deformnp.ops.ms_deform_attn_forward` / ``_backward``).

    Parameters
    ----------
    value : Tensor, shape (N, S, M, D)
        M heads of D channels over ``S = sum_l H_l*W_l`` positions, level l row-major from row
        ``level_start_index[l]``.
    spatial_shapes : Tensor, shape (L, 2), int32/int64
        Rows (H_l, W_l); any device (read on the host).
    level_start_index : Tensor, shape (L,), int32/int64
        The exclusive cumulative sum of ``H_l*W_l`` (anything else is a ``ValueError``).
    sampling_locations : Tensor, shape (N, Lq, M, L, P, 2)
        Normalized (x, y): (0, 0) the top-left corner of a level, (1, 1) the bottom-right.
    attention_weights : Tensor, shape (N, Lq, M, L, P)
        The weight of each sample.

    Returns
    -------
    Tensor, shape (N, Lq, M*D)
        Of value's dtype and device; differentiable in value, sampling_locations and
        attention_weights.

    Raises
    ------
    TypeError
        If a floating tensor is not float32/float64 (outside autocast) or the dtypes differ.
    ValueError
        If a shape or value is invalid or the tensors are on different devices.

    See Also
    --------
    MSDeformAttnFunction, MSDeformAttn
    deformnp.ops.ms_deform_attn : The same op on deformnp Tensors; formulas in
        :doc:`/ops/ms_deform_attn`.
    """
    return MSDeformAttnFunction.apply(
        value, spatial_shapes, level_start_index, sampling_locations, attention_weights, None
    )


# ============================================================================ torchvision modules


class DeformConv2d(nn.Module):
    """Deformable convolution layer, as ``torchvision.ops.DeformConv2d``.

    Parameters ``weight`` (Cout, Cin/groups, kh, kw) and ``bias`` (Cout,) (or None),
    torchvision's names and initialisation (:meth:`reset_parameters`), so torchvision's state
    dicts load. ``forward(input, offset, mask=None)`` is :func:`deform_conv2d`: deformnp's
    kernels compute the output and the gradients.

    Parameters
    ----------
    in_channels : int
        Cin.
    out_channels : int
        Cout.
    kernel_size : int or (int, int)
        (kh, kw).
    stride : int or (int, int), default 1
        The step between output positions.
    padding : int or (int, int), default 0
        Zero padding.
    dilation : int or (int, int), default 1
        The spacing of the kernel taps.
    groups : int, default 1
        Weight groups; must divide in_channels and out_channels.
    bias : bool, default True
        Learn a bias.

    Raises
    ------
    ValueError
        If in_channels or out_channels is not divisible by groups.

    See Also
    --------
    deform_conv2d : The function.
    deformnp.nn.DeformConv2d : The deformnp layer; formulas in :doc:`/ops/deform_conv`.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: IntPair,
        stride: IntPair = 1,
        padding: IntPair = 0,
        dilation: IntPair = 1,
        groups: int = 1,
        bias: bool = True,
    ) -> None:
        super().__init__()
        if in_channels % groups != 0:
            raise ValueError("in_channels must be divisible by groups")
        if out_channels % groups != 0:
            raise ValueError("out_channels must be divisible by groups")
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.kernel_size = _pair(kernel_size)
        self.stride = _pair(stride)
        self.padding = _pair(padding)
        self.dilation = _pair(dilation)
        self.groups = groups
        self.weight = nn.Parameter(
            torch.empty(out_channels, in_channels // groups, *self.kernel_size)
        )
        if bias:
            self.bias = nn.Parameter(torch.empty(out_channels))
        else:
            self.register_parameter("bias", None)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """torchvision's: Kaiming-uniform weight (a = sqrt(5)), bias U(-1/sqrt(fan_in), ...)."""
        nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))
        if self.bias is not None:
            fan_in, _ = nn.init._calculate_fan_in_and_fan_out(self.weight)
            bound = 1 / math.sqrt(fan_in)
            nn.init.uniform_(self.bias, -bound, bound)

    def forward(self, input: Tensor, offset: Tensor, mask: Tensor | None = None) -> Tensor:
        """Apply the deformable convolution.

        Parameters
        ----------
        input : Tensor, shape (B, Cin, H, W)
            The feature map.
        offset : Tensor, shape (B, 2*G*kh*kw, Hout, Wout)
            The sampling offsets, as in :func:`deform_conv2d`.
        mask : Tensor, shape (B, G*kh*kw, Hout, Wout), optional
            The modulation (DCN v2); None is DCN v1.

        Returns
        -------
        Tensor, shape (B, Cout, Hout, Wout)
            See :func:`deform_conv2d`.
        """
        return deform_conv2d(
            input, offset, self.weight, self.bias, stride=self.stride, padding=self.padding,
            dilation=self.dilation, mask=mask,
        )  # fmt: skip

    def __repr__(self) -> str:
        s = (
            f"{self.__class__.__name__}({self.in_channels}, {self.out_channels}, "
            f"kernel_size={self.kernel_size}, stride={self.stride}"
        )
        s += f", padding={self.padding}" if self.padding != (0, 0) else ""
        s += f", dilation={self.dilation}" if self.dilation != (1, 1) else ""
        s += f", groups={self.groups}" if self.groups != 1 else ""
        s += ", bias=False" if self.bias is None else ""
        return s + ")"


class RoIAlign(nn.Module):
    """RoI Align layer, as ``torchvision.ops.RoIAlign``.

    ``forward(input, rois)`` is :func:`roi_align`.

    Parameters
    ----------
    output_size : int or (int, int)
        (PH, PW).
    spatial_scale : float
        Multiplies the box coordinates.
    sampling_ratio : int
        Samples per bin side; <= 0: adaptive.
    aligned : bool, default False
        Shift the boxes by -0.5 pixel.

    See Also
    --------
    roi_align : The function.
    deformnp.ops.roi_align : The op; formulas in :doc:`/ops/roi`.
    """

    def __init__(
        self,
        output_size: IntPair,
        spatial_scale: float,
        sampling_ratio: int,
        aligned: bool = False,
    ) -> None:
        super().__init__()
        self.output_size = output_size
        self.spatial_scale = spatial_scale
        self.sampling_ratio = sampling_ratio
        self.aligned = aligned

    def forward(self, input: Tensor, rois: BoxesLike) -> Tensor:
        """Pool each box with RoI Align.

        Parameters
        ----------
        input : Tensor, shape (N, C, H, W)
            The feature map.
        rois : Tensor, shape (K, 5), or list of Tensor, shape (L_i, 4)
            The boxes, as in :func:`roi_align`.

        Returns
        -------
        Tensor, shape (K, C, PH, PW)
            See :func:`roi_align`.
        """
        return roi_align(
            input, rois, self.output_size, self.spatial_scale, self.sampling_ratio, self.aligned
        )

    def __repr__(self) -> str:
        return (
            f"{self.__class__.__name__}(output_size={self.output_size}, "
            f"spatial_scale={self.spatial_scale}, sampling_ratio={self.sampling_ratio}, "
            f"aligned={self.aligned})"
        )


class RoIPool(nn.Module):
    """RoI max pooling layer, as ``torchvision.ops.RoIPool``.

    ``forward(input, rois)`` is :func:`roi_pool`.

    Parameters
    ----------
    output_size : int or (int, int)
        (PH, PW).
    spatial_scale : float
        Multiplies the box coordinates.

    See Also
    --------
    roi_pool : The function.
    deformnp.ops.roi_pool : The op; formulas in :doc:`/ops/roi`.
    """

    def __init__(self, output_size: IntPair, spatial_scale: float) -> None:
        super().__init__()
        self.output_size = output_size
        self.spatial_scale = spatial_scale

    def forward(self, input: Tensor, rois: BoxesLike) -> Tensor:
        """Max-pool each box.

        Parameters
        ----------
        input : Tensor, shape (N, C, H, W)
            The feature map.
        rois : Tensor, shape (K, 5), or list of Tensor, shape (L_i, 4)
            The boxes, as in :func:`roi_align`.

        Returns
        -------
        Tensor, shape (K, C, PH, PW)
            See :func:`roi_pool`.
        """
        return roi_pool(input, rois, self.output_size, self.spatial_scale)

    def __repr__(self) -> str:
        return (
            f"{self.__class__.__name__}(output_size={self.output_size}, "
            f"spatial_scale={self.spatial_scale})"
        )


class PSRoIAlign(nn.Module):
    """Position-sensitive RoI Align layer, as ``torchvision.ops.PSRoIAlign``.

    ``forward(input, rois)`` is :func:`ps_roi_align`.

    Parameters
    ----------
    output_size : int or (int, int)
        (PH, PW).
    spatial_scale : float
        Multiplies the box coordinates.
    sampling_ratio : int
        Samples per bin side; <= 0: adaptive.

    See Also
    --------
    ps_roi_align : The function.
    deformnp.ops.ps_roi_align : The op; formulas in :doc:`/ops/roi`.
    """

    def __init__(self, output_size: IntPair, spatial_scale: float, sampling_ratio: int) -> None:
        super().__init__()
        self.output_size = output_size
        self.spatial_scale = spatial_scale
        self.sampling_ratio = sampling_ratio

    def forward(self, input: Tensor, rois: BoxesLike) -> Tensor:
        """Pool each box with position-sensitive RoI Align.

        Parameters
        ----------
        input : Tensor, shape (N, C, H, W)
            The feature map.
        rois : Tensor, shape (K, 5), or list of Tensor, shape (L_i, 4)
            The boxes, as in :func:`roi_align`.

        Returns
        -------
        Tensor, shape (K, C/(PH*PW), PH, PW)
            See :func:`ps_roi_align`.
        """
        return ps_roi_align(input, rois, self.output_size, self.spatial_scale, self.sampling_ratio)

    def __repr__(self) -> str:
        return (
            f"{self.__class__.__name__}(output_size={self.output_size}, "
            f"spatial_scale={self.spatial_scale}, sampling_ratio={self.sampling_ratio})"
        )


class PSRoIPool(nn.Module):
    """Position-sensitive RoI average pooling layer, as ``torchvision.ops.PSRoIPool``.

    ``forward(input, rois)`` is :func:`ps_roi_pool`.

    Parameters
    ----------
    output_size : int or (int, int)
        (PH, PW).
    spatial_scale : float
        Multiplies the box coordinates.

    See Also
    --------
    ps_roi_pool : The function.
    deformnp.ops.ps_roi_pool : The op; formulas in :doc:`/ops/roi`.
    """

    def __init__(self, output_size: IntPair, spatial_scale: float) -> None:
        super().__init__()
        self.output_size = output_size
        self.spatial_scale = spatial_scale

    def forward(self, input: Tensor, rois: BoxesLike) -> Tensor:
        """Average-pool each box, position-sensitively.

        Parameters
        ----------
        input : Tensor, shape (N, C, H, W)
            The feature map.
        rois : Tensor, shape (K, 5), or list of Tensor, shape (L_i, 4)
            The boxes, as in :func:`roi_align`.

        Returns
        -------
        Tensor, shape (K, C/(PH*PW), PH, PW)
            See :func:`ps_roi_pool`.
        """
        return ps_roi_pool(input, rois, self.output_size, self.spatial_scale)

    def __repr__(self) -> str:
        return (
            f"{self.__class__.__name__}(output_size={self.output_size}, "
            f"spatial_scale={self.spatial_scale})"
        )


# ============================================================================ mmcv modules


class ModulatedDeformConv2d(nn.Module):
    """Modulated deformable convolution layer (DCN v2), as ``mmcv.ops.ModulatedDeformConv2d``.

    Parameters ``weight`` (Cout, Cin/groups, kh, kw) and ``bias`` (Cout,) (or None), mmcv's
    names and ``init_weights`` (weight ``U(-1/sqrt(n), 1/sqrt(n))`` with ``n = Cin*kh*kw``, bias
    zero). ``forward(x, offset, mask)`` is :func:`modulated_deform_conv2d`: deformnp's kernels
    compute the output and the gradients.

    Parameters
    ----------
    in_channels : int
        Cin.
    out_channels : int
        Cout.
    kernel_size : int or (int, int)
        (kh, kw).
    stride : int or (int, int), default 1
        The step between output positions.
    padding : int or (int, int), default 0
        Zero padding.
    dilation : int or (int, int), default 1
        The spacing of the kernel taps.
    groups : int, default 1
        Weight groups.
    deform_groups : int, default 1
        Offset groups.
    bias : bool or str, default True
        Learn a bias when truthy (mmcv's ``"auto"`` therefore adds one).

    See Also
    --------
    modulated_deform_conv2d : The function.
    ModulatedDeformConv2dPack : The layer that predicts its own offsets and mask.
    deformnp.ops.deform_conv2d : The op; formulas in :doc:`/ops/deform_conv`.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: IntPair,
        stride: IntPair = 1,
        padding: IntPair = 0,
        dilation: IntPair = 1,
        groups: int = 1,
        deform_groups: int = 1,
        bias: bool | str = True,
    ) -> None:
        super().__init__()
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.kernel_size = _pair(kernel_size)
        self.stride = _pair(stride)
        self.padding = _pair(padding)
        self.dilation = _pair(dilation)
        self.groups = groups
        self.deform_groups = deform_groups
        # compatibility with nn.Conv2d, as mmcv
        self.transposed = False
        self.output_padding = (0,)
        self.weight = nn.Parameter(
            torch.empty(out_channels, in_channels // groups, *self.kernel_size)
        )
        if bias:
            self.bias = nn.Parameter(torch.empty(out_channels))
        else:
            self.register_parameter("bias", None)
        self.init_weights()

    def init_weights(self) -> None:
        """mmcv's: weight U(-1/sqrt(n), 1/sqrt(n)) with n = in_channels*kh*kw, bias zero."""
        n = self.in_channels
        for k in self.kernel_size:
            n *= k
        stdv = 1.0 / math.sqrt(n)
        self.weight.data.uniform_(-stdv, stdv)
        if self.bias is not None:
            self.bias.data.zero_()

    def forward(self, x: Tensor, offset: Tensor, mask: Tensor) -> Tensor:
        """Apply the modulated deformable convolution.

        Parameters
        ----------
        x : Tensor, shape (B, Cin, H, W)
            The feature map.
        offset : Tensor, shape (B, 2*deform_groups*kh*kw, Hout, Wout)
            The sampling offsets.
        mask : Tensor, shape (B, deform_groups*kh*kw, Hout, Wout)
            The modulation.

        Returns
        -------
        Tensor, shape (B, Cout, Hout, Wout)
            See :func:`modulated_deform_conv2d`.
        """
        return modulated_deform_conv2d(
            x, offset, mask, self.weight, self.bias, self.stride, self.padding, self.dilation,
            self.groups, self.deform_groups,
        )  # fmt: skip


class ModulatedDeformConv2dPack(ModulatedDeformConv2d):
    """DCN v2 layer predicting its offsets and mask, as ``mmcv.ops.ModulatedDeformConv2dPack``.

    ``conv_offset``, an ``nn.Conv2d`` (in_channels -> deform_groups*3*kh*kw, the layer's kernel
    size, stride, padding and dilation, with bias), zero-initialised by ``init_weights``, so a
    fresh layer samples the regular grid with mask 0.5. ``forward(x)``: ``o1, o2, m =
    chunk(conv_offset(x), 3, dim=1)``; ``offset = cat(o1, o2)``; ``mask = sigmoid(m)``; then
    :func:`modulated_deform_conv2d` (deformnp's kernels). State dicts of mmcv's layer load
    (``weight``, ``bias``, ``conv_offset.weight``, ``conv_offset.bias``; ``_version`` 2).
    mmcv's renaming of version-1 keys (``<name>_offset.*``) is not reproduced: since torch hands
    each submodule only the keys under its own prefix, it no longer takes effect in mmcv either.

    Parameters
    ----------
    *args, **kwargs
        :class:`ModulatedDeformConv2d`'s: ``in_channels``, ``out_channels``, ``kernel_size``,
        ``stride=1``, ``padding=0``, ``dilation=1``, ``groups=1``, ``deform_groups=1``,
        ``bias=True``.

    See Also
    --------
    ModulatedDeformConv2d : The layer with explicit offsets and mask.
    deformnp.ops.deform_conv2d : The op; formulas in :doc:`/ops/deform_conv`.
    """

    _version = 2

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.conv_offset = nn.Conv2d(
            self.in_channels,
            self.deform_groups * 3 * self.kernel_size[0] * self.kernel_size[1],
            kernel_size=self.kernel_size,
            stride=self.stride,
            padding=self.padding,
            dilation=self.dilation,
            bias=True,
        )
        self.init_weights()

    def init_weights(self) -> None:
        """mmcv's: the convolution's init, then ``conv_offset`` all zeros."""
        super().init_weights()
        if hasattr(self, "conv_offset"):
            self.conv_offset.weight.data.zero_()
            self.conv_offset.bias.data.zero_()

    def forward(self, x: Tensor) -> Tensor:  # type: ignore[override]
        """Predict the offsets and mask from ``x``, then apply the modulated deformable convolution.

        Parameters
        ----------
        x : Tensor, shape (B, Cin, H, W)
            The feature map.

        Returns
        -------
        Tensor, shape (B, Cout, Hout, Wout)
            See :func:`modulated_deform_conv2d`.
        """
        out = self.conv_offset(x)
        o1, o2, mask = torch.chunk(out, 3, dim=1)
        offset = torch.cat((o1, o2), dim=1)
        mask = torch.sigmoid(mask)
        return modulated_deform_conv2d(
            x, offset, mask, self.weight, self.bias, self.stride, self.padding, self.dilation,
            self.groups, self.deform_groups,
        )  # fmt: skip


class DeformRoIPool(nn.Module):
    """Deformable RoI pooling layer, as ``mmcv.ops.DeformRoIPool``.

    ``forward(input, rois, offset=None)`` is :func:`deform_roi_pool`.

    Parameters
    ----------
    output_size : int or (int, int)
        (PH, PW).
    spatial_scale : float, default 1.0
        Multiplies the box coordinates.
    sampling_ratio : int, default 0
        Samples per bin side; <= 0: adaptive.
    gamma : float, default 0.1
        Scales the offsets.

    See Also
    --------
    deform_roi_pool : The function.
    deformnp.ops.deform_roi_pool : The op; formulas in :doc:`/ops/deform_roi`.
    """

    def __init__(
        self,
        output_size: IntPair,
        spatial_scale: float = 1.0,
        sampling_ratio: int = 0,
        gamma: float = 0.1,
    ) -> None:
        super().__init__()
        self.output_size = _pair(output_size)
        self.spatial_scale = float(spatial_scale)
        self.sampling_ratio = int(sampling_ratio)
        self.gamma = float(gamma)

    def forward(self, input: Tensor, rois: BoxesLike, offset: Tensor | None = None) -> Tensor:
        """Pool each box, its bins shifted by ``offset``.

        Parameters
        ----------
        input : Tensor, shape (N, C, H, W)
            The feature map.
        rois : Tensor, shape (K, 5)
            ``(batch_index, x1, y1, x2, y2)`` rows.
        offset : Tensor, shape (K, 2, PH, PW), optional
            Normalized bin shifts (x, y); None: no shift.

        Returns
        -------
        Tensor, shape (K, C, PH, PW)
            See :func:`deform_roi_pool`.
        """
        return deform_roi_pool(
            input, rois, offset, self.output_size, self.spatial_scale, self.sampling_ratio,
            self.gamma,
        )  # fmt: skip


def _pack_first_pass(layer: Any, input: Tensor, rois: BoxesLike) -> Tensor:
    """The Pack layers' pooling without offsets, after mmcv's channel check."""
    if input.dim() != 4 or input.shape[1] != layer.output_channels:
        raise ValueError(
            f"{layer.__class__.__name__}: input must be (N, output_channels = "
            f"{layer.output_channels}, H, W), got shape {tuple(input.shape)}"
        )
    return deform_roi_pool(
        input, rois, None, layer.output_size, layer.spatial_scale, layer.sampling_ratio,
        layer.gamma,
    )  # fmt: skip


def _offset_fc(output_size: tuple[int, int], channels: int, hidden: int, outputs: int) -> Any:
    """mmcv's fully connected head: Linear-ReLU-Linear-ReLU-Linear, the last one zeroed."""
    PH, PW = output_size
    fc = nn.Sequential(
        nn.Linear(PH * PW * channels, hidden),
        nn.ReLU(inplace=True),
        nn.Linear(hidden, hidden),
        nn.ReLU(inplace=True),
        nn.Linear(hidden, PH * PW * outputs),
    )
    fc[-1].weight.data.zero_()
    fc[-1].bias.data.zero_()
    return fc


class DeformRoIPoolPack(DeformRoIPool):
    """Deformable RoI pooling that predicts its offsets, as ``mmcv.ops.DeformRoIPoolPack``.

    ``offset_fc``: ``Linear(PH*PW*output_channels, deform_fc_channels) - ReLU -
    Linear(deform_fc_channels, deform_fc_channels) - ReLU - Linear(deform_fc_channels,
    PH*PW*2)``, the last layer zero-initialised (a fresh layer is aligned RoI Align).
    ``forward(input, rois)`` pools without offsets, maps the pooled features to the
    (K, 2, PH, PW) offsets and pools again with them (:func:`deform_roi_pool`, deformnp's
    kernels). State-dict keys as mmcv's (``offset_fc.0.weight``, ...).

    Parameters
    ----------
    output_size : int or (int, int)
        (PH, PW).
    output_channels : int
        C, the input's channel count.
    deform_fc_channels : int, default 1024
        The hidden width of ``offset_fc``.
    spatial_scale : float, default 1.0
        Multiplies the box coordinates.
    sampling_ratio : int, default 0
        Samples per bin side; <= 0: adaptive.
    gamma : float, default 0.1
        Scales the offsets.

    See Also
    --------
    DeformRoIPool, ModulatedDeformRoIPoolPack
    deformnp.ops.deform_roi_pool : The op; formulas in :doc:`/ops/deform_roi`.
    """

    def __init__(
        self,
        output_size: IntPair,
        output_channels: int,
        deform_fc_channels: int = 1024,
        spatial_scale: float = 1.0,
        sampling_ratio: int = 0,
        gamma: float = 0.1,
    ) -> None:
        super().__init__(output_size, spatial_scale, sampling_ratio, gamma)
        self.output_channels = output_channels
        self.deform_fc_channels = deform_fc_channels
        self.offset_fc = _offset_fc(self.output_size, output_channels, deform_fc_channels, 2)

    def forward(self, input: Tensor, rois: BoxesLike) -> Tensor:  # type: ignore[override]
        """Pool each box with offsets predicted from its un-shifted pooling.

        Parameters
        ----------
        input : Tensor, shape (N, output_channels, H, W)
            The feature map.
        rois : Tensor, shape (K, 5)
            ``(batch_index, x1, y1, x2, y2)`` rows.

        Returns
        -------
        Tensor, shape (K, output_channels, PH, PW)
            The pooled features.

        Raises
        ------
        ValueError
            If ``input`` is not (N, output_channels, H, W).
        """
        x = _pack_first_pass(self, input, rois)
        K = x.shape[0]
        offset = self.offset_fc(x.view(K, -1)).view(K, 2, *self.output_size)
        return deform_roi_pool(
            input, rois, offset, self.output_size, self.spatial_scale, self.sampling_ratio,
            self.gamma,
        )  # fmt: skip


class ModulatedDeformRoIPoolPack(DeformRoIPool):
    """Deformable RoI pooling with a predicted mask, as mmcv's ``ModulatedDeformRoIPoolPack``.

    :class:`DeformRoIPoolPack` times a predicted per-bin mask: ``mask_fc`` =
    ``Linear(PH*PW*output_channels, deform_fc_channels) - ReLU - Linear(deform_fc_channels,
    PH*PW) - Sigmoid``, its last Linear zero-initialised (mask 0.5). Pooling runs deformnp's
    kernels (:func:`deform_roi_pool`).

    Parameters
    ----------
    output_size : int or (int, int)
        (PH, PW).
    output_channels : int
        C, the input's channel count.
    deform_fc_channels : int, default 1024
        The hidden width of ``offset_fc`` and ``mask_fc``.
    spatial_scale : float, default 1.0
        Multiplies the box coordinates.
    sampling_ratio : int, default 0
        Samples per bin side; <= 0: adaptive.
    gamma : float, default 0.1
        Scales the offsets.

    See Also
    --------
    DeformRoIPoolPack
    deformnp.ops.deform_roi_pool : The op; formulas in :doc:`/ops/deform_roi`.
    """

    def __init__(
        self,
        output_size: IntPair,
        output_channels: int,
        deform_fc_channels: int = 1024,
        spatial_scale: float = 1.0,
        sampling_ratio: int = 0,
        gamma: float = 0.1,
    ) -> None:
        super().__init__(output_size, spatial_scale, sampling_ratio, gamma)
        self.output_channels = output_channels
        self.deform_fc_channels = deform_fc_channels
        self.offset_fc = _offset_fc(self.output_size, output_channels, deform_fc_channels, 2)
        PH, PW = self.output_size
        self.mask_fc = nn.Sequential(
            nn.Linear(PH * PW * output_channels, deform_fc_channels),
            nn.ReLU(inplace=True),
            nn.Linear(deform_fc_channels, PH * PW),
            nn.Sigmoid(),
        )
        self.mask_fc[2].weight.data.zero_()
        self.mask_fc[2].bias.data.zero_()

    def forward(self, input: Tensor, rois: BoxesLike) -> Tensor:  # type: ignore[override]
        """Pool each box with predicted offsets, times the predicted mask.

        Parameters
        ----------
        input : Tensor, shape (N, output_channels, H, W)
            The feature map.
        rois : Tensor, shape (K, 5)
            ``(batch_index, x1, y1, x2, y2)`` rows.

        Returns
        -------
        Tensor, shape (K, output_channels, PH, PW)
            The pooled features, each bin multiplied by its mask.

        Raises
        ------
        ValueError
            If ``input`` is not (N, output_channels, H, W).
        """
        x = _pack_first_pass(self, input, rois)
        K = x.shape[0]
        offset = self.offset_fc(x.view(K, -1)).view(K, 2, *self.output_size)
        mask = self.mask_fc(x.view(K, -1)).view(K, 1, *self.output_size)
        d = deform_roi_pool(
            input, rois, offset, self.output_size, self.spatial_scale, self.sampling_ratio,
            self.gamma,
        )  # fmt: skip
        return d * mask


# ============================================================================ Deformable-DETR


def _is_power_of_2(n: int) -> bool:
    if not isinstance(n, int) or n < 0:
        raise ValueError(f"invalid input for _is_power_of_2: {n} (type: {type(n)})")
    return (n & (n - 1) == 0) and n != 0


class MSDeformAttn(nn.Module):
    """Multi-scale deformable attention layer, Deformable-DETR's ``MSDeformAttn``.

    As ``models/ops/modules/ms_deform_attn.py``. Parameters ``sampling_offsets`` (Linear d_model -> n_heads*n_levels*n_points*2),
    ``attention_weights`` (d_model -> n_heads*n_levels*n_points), ``value_proj`` and
    ``output_proj`` (d_model -> d_model), initialised by ``_reset_parameters`` as
    Deformable-DETR (zero offset weights and a bias that points head h's point p at distance
    p+1 in direction ``2*pi*h/n_heads``; zero attention logits; Xavier-uniform projections,
    zero biases), so its state dicts load. The core op is :class:`MSDeformAttnFunction`
    (deformnp's kernels; ``im2col_step`` kept as an attribute and ignored).

    Parameters
    ----------
    d_model : int, default 256
        The feature width; divisible by n_heads.
    n_levels : int, default 4
        The number of feature levels L.
    n_heads : int, default 8
        The number of heads M.
    n_points : int, default 4
        Sampling points P per head and level.

    Raises
    ------
    ValueError
        If d_model is not divisible by n_heads (a warning when ``d_model // n_heads`` is not a
        power of 2, as Deformable-DETR).

    See Also
    --------
    ms_deform_attn : The core op as a function.
    deformnp.nn.MSDeformAttn : The deformnp layer; formulas in :doc:`/ops/ms_deform_attn`.
    """

    def __init__(
        self, d_model: int = 256, n_levels: int = 4, n_heads: int = 8, n_points: int = 4
    ) -> None:
        super().__init__()
        if d_model % n_heads != 0:
            raise ValueError(
                f"d_model must be divisible by n_heads, but got {d_model} and {n_heads}"
            )
        if not _is_power_of_2(d_model // n_heads):
            warnings.warn(
                "You'd better set d_model in MSDeformAttn to make the dimension of each "
                "attention head a power of 2 which is more efficient in our CUDA implementation."
            )
        self.im2col_step = 64
        self.d_model = d_model
        self.n_levels = n_levels
        self.n_heads = n_heads
        self.n_points = n_points
        self.sampling_offsets = nn.Linear(d_model, n_heads * n_levels * n_points * 2)
        self.attention_weights = nn.Linear(d_model, n_heads * n_levels * n_points)
        self.value_proj = nn.Linear(d_model, d_model)
        self.output_proj = nn.Linear(d_model, d_model)
        self._reset_parameters()

    def _reset_parameters(self) -> None:
        nn.init.constant_(self.sampling_offsets.weight.data, 0.0)
        thetas = torch.arange(self.n_heads, dtype=torch.float32) * (2.0 * math.pi / self.n_heads)
        grid_init = torch.stack([thetas.cos(), thetas.sin()], -1)
        grid_init = (
            (grid_init / grid_init.abs().max(-1, keepdim=True)[0])
            .view(self.n_heads, 1, 1, 2)
            .repeat(1, self.n_levels, self.n_points, 1)
        )
        for i in range(self.n_points):
            grid_init[:, :, i, :] *= i + 1
        with torch.no_grad():
            self.sampling_offsets.bias = nn.Parameter(grid_init.view(-1))
        nn.init.constant_(self.attention_weights.weight.data, 0.0)
        nn.init.constant_(self.attention_weights.bias.data, 0.0)
        nn.init.xavier_uniform_(self.value_proj.weight.data)
        nn.init.constant_(self.value_proj.bias.data, 0.0)
        nn.init.xavier_uniform_(self.output_proj.weight.data)
        nn.init.constant_(self.output_proj.bias.data, 0.0)

    def forward(
        self,
        query: Tensor,
        reference_points: Tensor,
        input_flatten: Tensor,
        input_spatial_shapes: Tensor,
        input_level_start_index: Tensor,
        input_padding_mask: Tensor | None = None,
    ) -> Tensor:
        """Deformable-DETR's forward.

        Parameters
        ----------
        query : Tensor, shape (N, Lq, d_model)
            The queries.
        reference_points : Tensor, shape (N, Lq, n_levels, 2) or (N, Lq, n_levels, 4)
            Normalized (x, y) in [0, 1], or reference boxes (x, y, w, h).
        input_flatten : Tensor, shape (N, S, d_model)
            The flattened levels, ``S = sum_l H_l*W_l``.
        input_spatial_shapes : Tensor, shape (n_levels, 2), int
            Rows (H_l, W_l).
        input_level_start_index : Tensor, shape (n_levels,), int
            The first position of each level in ``input_flatten``.
        input_padding_mask : Tensor, shape (N, S), bool, optional
            True at padding positions (their values are zeroed).

        Returns
        -------
        Tensor, shape (N, Lq, d_model)
            The attention output.

        Raises
        ------
        ValueError
            If ``input_flatten``'s length disagrees with ``input_spatial_shapes`` or the last
            dimension of ``reference_points`` is neither 2 nor 4.
        """
        N, Len_q, _ = query.shape
        N, Len_in, _ = input_flatten.shape
        shapes = torch.as_tensor(input_spatial_shapes)
        if int((shapes[:, 0] * shapes[:, 1]).sum()) != Len_in:
            raise ValueError(
                f"MSDeformAttn: input_flatten has {Len_in} positions, but input_spatial_shapes "
                f"give sum(H_l*W_l) = {int((shapes[:, 0] * shapes[:, 1]).sum())}"
            )
        value = self.value_proj(input_flatten)
        if input_padding_mask is not None:
            value = value.masked_fill(input_padding_mask[..., None], float(0))
        value = value.view(N, Len_in, self.n_heads, self.d_model // self.n_heads)
        sampling_offsets = self.sampling_offsets(query).view(
            N, Len_q, self.n_heads, self.n_levels, self.n_points, 2
        )
        attention_weights = self.attention_weights(query).view(
            N, Len_q, self.n_heads, self.n_levels * self.n_points
        )
        attention_weights = torch.softmax(attention_weights, -1).view(
            N, Len_q, self.n_heads, self.n_levels, self.n_points
        )
        if reference_points.shape[-1] == 2:
            offset_normalizer = torch.stack([shapes[..., 1], shapes[..., 0]], -1).to(
                reference_points.device
            )
            sampling_locations = (
                reference_points[:, :, None, :, None, :]
                + sampling_offsets / offset_normalizer[None, None, None, :, None, :]
            )
        elif reference_points.shape[-1] == 4:
            sampling_locations = (
                reference_points[:, :, None, :, None, :2]
                + sampling_offsets / self.n_points * reference_points[:, :, None, :, None, 2:] * 0.5
            )
        else:
            raise ValueError(
                "Last dim of reference_points must be 2 or 4, but get "
                f"{reference_points.shape[-1]} instead."
            )
        output = MSDeformAttnFunction.apply(
            value, shapes, input_level_start_index, sampling_locations, attention_weights,
            self.im2col_step,
        )  # fmt: skip
        return self.output_proj(output)
