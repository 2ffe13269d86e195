"""Multi-scale deformable attention (anchor: Deformable-DETR's MSDeformAttn).

See :doc:`/ops/ms_deform_attn` for the formula and gradients.

``ms_deform_attn(value, spatial_shapes, level_start_index, sampling_locations,
attention_weights)`` is the core op of Deformable-DETR (``MSDeformAttnFunction``, or its pure
PyTorch form ``ms_deform_attn_core_pytorch``), with the same shapes and sampling rule:

* value (N, S, M, D): M heads of D channels over S = sum_l H_l*W_l flattened positions; level l
  occupies rows [level_start_index[l], level_start_index[l] + H_l*W_l), row-major;
* spatial_shapes (L, 2) int, rows (H_l, W_l); level_start_index (L,) int, the exclusive
  cumulative sum of H_l*W_l (anything else is rejected);
* sampling_locations (N, Lq, M, L, P, 2): normalized (x, y) = (u, v), (0, 0) the top-left
  corner of the map and (1, 1) the bottom-right corner; any real value is allowed (points off
  the map fade to zero; NaN and inf sample zero);
* attention_weights (N, Lq, M, L, P) (not normalised by the op: Deformable-DETR applies the
  softmax in the layer);
* output (N, Lq, M*D)::

      out[n, q, m*D + d] = sum_{l, p} A[n, q, m, l, p]
                           * zero_fade(V_l[n, :, :, m, d], y = v*H_l - 0.5, x = u*W_l - 0.5)

  which is ``grid_sample(..., mode="bilinear", padding_mode="zeros", align_corners=False)`` at
  grid = 2*loc - 1, as in ``ms_deform_attn_core_pytorch``.

Gradients flow to value, sampling_locations and attention_weights (the location gradient is the
exact derivative of the zero-fade rule: the right-hand slope at integer pixel coordinates).

Differences from the anchor, all deliberate: any batch size works (``im2col_step``, the 6th
argument of Deformable-DETR's ``MSDeformAttnFunction.apply``, is accepted, checked to be a positive
int and ignored; there is no divisibility rule); index arithmetic is 64-bit, and the level
bookkeeping is checked in exact integer arithmetic (a ``spatial_shapes`` whose sizes would overflow
64 bits is refused); the CPU backward is deterministic (see ``deformnp/kernels/cpu/attention.py``,
which also explains how the CPU kernels are made fast); on CUDA the value gradient uses float
atomic adds unless ``deformnp.use_deterministic_algorithms(True)`` is set. On the CPU at most 4096
channels per head are supported (D; Deformable-DETR uses 32), and the autograd node keeps a
head-major copy of value, made in the forward, for the backward.

Single-scale deformable attention (the DCN-style attention over one feature map) is the
one-level case, L = 1::

    value = np.random.rand(N, H * W, M, D)
    out = ms_deform_attn(value, np.array([[H, W]]), np.array([0]),
                         locations,            # (N, Lq, M, 1, P, 2)
                         weights)              # (N, Lq, M, 1, P)

The array-level pair, for wrapping in other frameworks (a ``torch.autograd.Function``, a JAX
``custom_vjp``); both also accept ``im2col_step`` (last, default 64) and ignore it::

    out = ms_deform_attn_forward(value, spatial_shapes, level_start_index,
                                 sampling_locations, attention_weights)
    grad_value, grad_sampling_locations, grad_attention_weights = ms_deform_attn_backward(
        grad_out, value, spatial_shapes, level_start_index, sampling_locations,
        attention_weights, needs=(True, True, True))
"""

from __future__ import annotations

from dataclasses import dataclass
from types import ModuleType

import numpy as np

from ..function import Context, Function
from ..kernels.cpu import attention as cpu_kernels
from ..tensor import Tensor, unwrap
from ..typing import Array, ArrayLike, Needs, TensorLike
from ..validation import (
    MAX_INT,
    check_ndim,
    contiguous,
    device_of,
    float_array,
    grad_array,
    index_array,
    integer,
    needs_flags,
    same_dtype,
)

__all__ = [
    "ms_deform_attn",
    "ms_deform_attn_forward",
    "ms_deform_attn_backward",
    "MSDeformAttnFunction",
    "level_layout",
]

OP = "ms_deform_attn"
GRADIENTS = ("value", "sampling_locations", "attention_weights")


def level_layout(shapes: ArrayLike) -> tuple[np.ndarray, np.ndarray]:
    """Deformable-DETR's level bookkeeping for a list of level sizes.

    Parameters
    ----------
    shapes : array_like of int, shape (L, 2)
        The level sizes ``(H_l, W_l)``.

    Returns
    -------
    spatial_shapes : ndarray of int64, shape (L, 2)
        ``shapes`` as an int64 array.
    level_start_index : ndarray of int64, shape (L,)
        The exclusive cumulative sum of ``H_l*W_l``.

    See Also
    --------
    ms_deform_attn : The op that takes them.
    """
    spatial_shapes = np.asarray(shapes, dtype=np.int64).reshape(-1, 2)
    sizes = spatial_shapes[:, 0] * spatial_shapes[:, 1]
    level_start_index = np.concatenate([[0], np.cumsum(sizes)[:-1]]).astype(np.int64)
    return spatial_shapes, level_start_index[: len(sizes)]


def _kernels(device: str) -> ModuleType:
    """The CPU kernels, or the CUDA ones (imported on first use: numba-cuda is optional)."""
    if device == "cuda":
        from ..kernels.cuda import attention as cuda_kernels

        return cuda_kernels
    return cpu_kernels


@dataclass(frozen=True)
class MSDeformAttnArgs:
    """The checked arguments of one call: float arrays of one dtype on one device, C-contiguous,
    and the level arrays as host int64 arrays."""

    value: Array
    spatial_shapes: np.ndarray
    level_start_index: np.ndarray
    sampling_locations: Array
    attention_weights: Array
    device: str

    @property
    def out_shape(self) -> tuple[int, int, int]:
        N, S, M, D = self.value.shape
        return (N, self.sampling_locations.shape[1], M * D)


def prepare(
    value: TensorLike,
    spatial_shapes: ArrayLike,
    level_start_index: ArrayLike,
    sampling_locations: TensorLike,
    attention_weights: TensorLike,
) -> MSDeformAttnArgs:
    """Validate the arguments of :func:`ms_deform_attn` (once, for every entry point)."""
    value, loc, attn = unwrap(value), unwrap(sampling_locations), unwrap(attention_weights)
    device = device_of(OP, value=value, sampling_locations=loc, attention_weights=attn)
    value_a = float_array(OP, "value", value)
    loc = float_array(OP, "sampling_locations", loc)
    attn = float_array(OP, "attention_weights", attn)
    same_dtype(OP, value=value_a, sampling_locations=loc, attention_weights=attn)
    shapes = index_array(OP, "spatial_shapes", unwrap(spatial_shapes))
    starts = index_array(OP, "level_start_index", unwrap(level_start_index))

    check_ndim(OP, "value", value_a, 4, "(N, S, M, D)")
    check_ndim(OP, "sampling_locations", loc, 6, "(N, Lq, M, L, P, 2)")
    check_ndim(OP, "attention_weights", attn, 5, "(N, Lq, M, L, P)")
    check_ndim(OP, "spatial_shapes", shapes, 2, "(L, 2)")
    check_ndim(OP, "level_start_index", starts, 1, "(L,)")
    N, S, M, D = (int(s) for s in value_a.shape)
    L = int(shapes.shape[0])
    if shapes.shape[1] != 2:
        raise ValueError(
            f"{OP}: spatial_shapes must be (L, 2) rows (H_l, W_l), got shape {shapes.shape}"
        )
    if np.any(shapes < 0):
        raise ValueError(f"{OP}: spatial_shapes must be non-negative, got {shapes.tolist()}")
    if starts.shape[0] != L:
        raise ValueError(
            f"{OP}: level_start_index has {starts.shape[0]} entries, expected one per level "
            f"of spatial_shapes (L = {L})"
        )
    # the level bookkeeping in Python's exact integers: sizes that would wrap in 64 bits can
    # then never pass for the sizes of a real value array
    expected_starts, total = [], 0
    for h, w in shapes.tolist():
        expected_starts.append(total)
        total += h * w
    if starts.tolist() != expected_starts:
        raise ValueError(
            f"{OP}: level_start_index {starts.tolist()} is inconsistent with spatial_shapes, "
            f"expected the cumulative sizes {expected_starts}"
        )
    if total != S:
        raise ValueError(
            f"{OP}: value has S = {S} positions, but spatial_shapes give sum(H_l*W_l) = {total}"
        )
    if np.any(shapes > MAX_INT):  # the CPU kernels floor coordinates to int32 corners
        raise ValueError(
            f"{OP}: spatial_shapes must be at most 2**31 - 1 (32-bit ints, as in "
            f"Deformable-DETR's kernels), got {shapes.tolist()}"
        )
    if loc.shape[5] != 2:  # (device arrays allow no negative index)
        raise ValueError(
            f"{OP}: sampling_locations must end in 2 coordinates (x, y), got shape "
            f"{tuple(loc.shape)}"
        )
    Lq = int(loc.shape[1])
    if tuple(loc.shape[:4]) != (N, Lq, M, L):
        raise ValueError(
            f"{OP}: sampling_locations has shape {tuple(loc.shape)}, expected "
            f"(N, Lq, M, L, P, 2) with N = {N}, M = {M} (from value) and L = {L} "
            f"(from spatial_shapes)"
        )
    P = int(loc.shape[4])
    if tuple(attn.shape) != (N, Lq, M, L, P):
        raise ValueError(
            f"{OP}: attention_weights has shape {tuple(attn.shape)}, expected "
            f"(N, Lq, M, L, P) = {(N, Lq, M, L, P)} to match sampling_locations"
        )
    if device == "cpu" and D > cpu_kernels.MAX_CHANNELS:
        raise ValueError(
            f"{OP}: value has D = {D} channels per head; the CPU kernels support at most "
            f"{cpu_kernels.MAX_CHANNELS}"
        )
    return MSDeformAttnArgs(value_a, shapes, starts, loc, attn, device)


def _forward(a: MSDeformAttnArgs, cache: dict | None = None) -> Array:
    return _kernels(a.device).ms_deform_attn_forward(
        a.value, a.spatial_shapes, a.level_start_index, a.sampling_locations,
        a.attention_weights, cache,
    )  # fmt: skip


def _backward(grad: Array, a: MSDeformAttnArgs, needs: Needs, cache: dict | None = None) -> tuple:
    return _kernels(a.device).ms_deform_attn_backward(
        grad, a.value, a.spatial_shapes, a.level_start_index, a.sampling_locations,
        a.attention_weights, tuple(needs), cache,
    )  # fmt: skip


def ms_deform_attn_forward(
    value: ArrayLike,
    spatial_shapes: ArrayLike,
    level_start_index: ArrayLike,
    sampling_locations: ArrayLike,
    attention_weights: ArrayLike,
    im2col_step: int = 64,
) -> Array:
    """Array-level forward of :func:`ms_deform_attn`: plain arrays in, a plain array out.

    Parameters
    ----------
    value : array_like, shape (N, S, M, D)
        The values: ``M`` heads of ``D`` channels over ``S = sum_l H_l*W_l`` flattened
        positions; level ``l`` occupies rows ``level_start_index[l]`` to
        ``level_start_index[l] + H_l*W_l - 1``, row-major.
    spatial_shapes : array_like of int, shape (L, 2)
        Rows ``(H_l, W_l)``, the size of each level; int32 or int64, read on the host.
    level_start_index : array_like of int, shape (L,)
        The first row of each level in ``value``: the exclusive cumulative sum of
        ``H_l*W_l`` (anything else is rejected); int32 or int64.
    sampling_locations : array_like, shape (N, Lq, M, L, P, 2)
        Normalized ``(x, y)`` per query, head, level and point: ``(0, 0)`` is the top-left
        corner of the level's map and ``(1, 1)`` its bottom-right corner. Any real value is
        allowed (points off the map fade to zero; NaN and inf sample 0).
    attention_weights : array_like, shape (N, Lq, M, L, P)
        The weight of each sample, used as given (Deformable-DETR applies the softmax in the
        layer, not in the op).
    im2col_step : int, default 64
        Deformable-DETR's batch chunk size for its CUDA kernel; accepted for call compatibility
        (``MSDeformAttnFunction.apply(value, spatial_shapes, level_start_index,
        sampling_locations, attention_weights, im2col_step)``), checked to be a positive int and
        ignored: any batch size works.

    Returns
    -------
    out : ndarray or CUDA device array, shape (N, Lq, M * D)
        In the inputs' dtype, on their device.

    Raises
    ------
    TypeError
        If a float array is not float32/float64, the float arrays differ in dtype, or
        ``spatial_shapes`` / ``level_start_index`` are not int32/int64, or ``im2col_step`` is
        not an int.
    ValueError
        If ``im2col_step`` is < 1, a shape is inconsistent, ``spatial_shapes`` has a negative
        size or one of 2**31 or more, ``level_start_index`` is not its exclusive cumulative
        sum, ``S`` differs from ``sum(H_l*W_l)``, ``D`` exceeds 4096 on the CPU, or the arrays
        are on different devices.

    See Also
    --------
    ms_deform_attn : The differentiable op.
    ms_deform_attn_backward : The matching backward.
    """
    integer(OP, "im2col_step", im2col_step, 1)
    return _forward(
        prepare(value, spatial_shapes, level_start_index, sampling_locations, attention_weights)
    )


def ms_deform_attn_backward(
    grad_out: ArrayLike,
    value: ArrayLike,
    spatial_shapes: ArrayLike,
    level_start_index: ArrayLike,
    sampling_locations: ArrayLike,
    attention_weights: ArrayLike,
    needs: Needs = (True, True, True),
    im2col_step: int = 64,
) -> tuple[Array | None, Array | None, Array | None]:
    """Array-level backward of :func:`ms_deform_attn`: the gradients of its three float inputs.

    Parameters
    ----------
    grad_out : array_like, shape (N, Lq, M * D)
        Gradient of the loss with respect to the forward's output, in the inputs' dtype and on
        their device.
    value : array_like, shape (N, S, M, D)
        The forward's ``value``.
    spatial_shapes : array_like of int, shape (L, 2)
        Rows ``(H_l, W_l)``, the size of each level; int32 or int64, read on the host.
    level_start_index : array_like of int, shape (L,)
        The first row of each level in ``value``: the exclusive cumulative sum of
        ``H_l*W_l`` (anything else is rejected); int32 or int64.
    sampling_locations : array_like, shape (N, Lq, M, L, P, 2)
        Normalized ``(x, y)`` per query, head, level and point: ``(0, 0)`` is the top-left
        corner of the level's map and ``(1, 1)`` its bottom-right corner. Any real value is
        allowed (points off the map fade to zero; NaN and inf sample 0).
    attention_weights : array_like, shape (N, Lq, M, L, P)
        The weight of each sample, used as given (Deformable-DETR applies the softmax in the
        layer, not in the op).
    needs : sequence of 3 bool, default (True, True, True)
        Which gradients to compute: ``(value, sampling_locations, attention_weights)``.
    im2col_step : int, default 64
        Deformable-DETR's batch chunk size for its CUDA kernel; accepted for call compatibility
        (``MSDeformAttnFunction.apply(value, spatial_shapes, level_start_index,
        sampling_locations, attention_weights, im2col_step)``), checked to be a positive int and
        ignored: any batch size works.

    Returns
    -------
    grad_value : ndarray or CUDA device array, shape (N, S, M, D), or None
    grad_sampling_locations : ndarray or CUDA device array, shape (N, Lq, M, L, P, 2), or None
    grad_attention_weights : ndarray or CUDA device array, shape (N, Lq, M, L, P), or None
        Each in its input's dtype, or None where its ``needs`` flag is False.

    Raises
    ------
    TypeError
        If a float array is not float32/float64, the float arrays differ in dtype, or
        ``spatial_shapes`` / ``level_start_index`` are not int32/int64, or ``im2col_step`` is
        not an int. Also when ``needs`` is not a sequence.
    ValueError
        If ``im2col_step`` is < 1, a shape is inconsistent, ``spatial_shapes`` has a negative
        size or one of 2**31 or more, ``level_start_index`` is not its exclusive cumulative
        sum, ``S`` differs from ``sum(H_l*W_l)``, ``D`` exceeds 4096 on the CPU, ``grad_out``
        has the wrong shape, ``needs`` does not have 3 flags, or the arrays are on different
        devices.

    See Also
    --------
    ms_deform_attn_forward : The matching forward.

    Notes
    -----
    CPU gradients are bit-identical on every run and with any number of threads; on CUDA the
    value gradient is too when ``deformnp.use_deterministic_algorithms(True)`` is set (it uses
    float atomic adds otherwise).
    """
    integer(OP, "im2col_step", im2col_step, 1)
    a = prepare(value, spatial_shapes, level_start_index, sampling_locations, attention_weights)
    g = grad_array(
        OP, "grad_out", grad_out, a.value.dtype, a.out_shape, a.device, "value",
        "(N, Lq, M*D)",
    )  # fmt: skip
    return _backward(g, a, needs_flags(OP, needs, GRADIENTS))


class MSDeformAttnFunction(Function):
    """Autograd node of :func:`ms_deform_attn`: positional inputs (value, sampling_locations,
    attention_weights), ``args`` from :func:`prepare`. The forward and backward share a
    ``cache`` (on the CPU the head-major copy of value, made once for both)."""

    supports_cuda = True  # forward/backward dispatch on the arrays' device
    fresh_grads = True  # backward allocates every gradient it returns

    @staticmethod
    def forward(
        ctx: Context,
        value: Array,
        sampling_locations: Array,
        attention_weights: Array,
        *,
        args: MSDeformAttnArgs,
    ) -> Array:
        ctx.save_for_backward(args)
        ctx.cache = {}
        return _forward(args, ctx.cache)

    @staticmethod
    def backward(ctx: Context, grad: Array) -> tuple:
        (args,) = ctx.saved_tensors
        return _backward(contiguous(grad), args, ctx.needs_input_grad[:3], ctx.cache)


def ms_deform_attn(
    value: TensorLike,
    spatial_shapes: ArrayLike,
    level_start_index: ArrayLike,
    sampling_locations: TensorLike,
    attention_weights: TensorLike,
    im2col_step: int = 64,
) -> Tensor:
    r"""Multi-scale deformable attention, the core op of Deformable-DETR.

    Deformable-DETR's ``MSDeformAttnFunction`` (or its pure PyTorch form
    ``ms_deform_attn_core_pytorch``), with the same shapes and sampling rule. Gradients flow to
    ``value``, ``sampling_locations`` and ``attention_weights`` when they are Tensors that
    require grad.

    Parameters
    ----------
    value : Tensor or array_like, shape (N, S, M, D)
        The values: ``M`` heads of ``D`` channels over ``S = sum_l H_l*W_l`` flattened
        positions; level ``l`` occupies rows ``level_start_index[l]`` to
        ``level_start_index[l] + H_l*W_l - 1``, row-major.
    spatial_shapes : array_like of int, shape (L, 2)
        Rows ``(H_l, W_l)``, the size of each level; int32 or int64, read on the host.
    level_start_index : array_like of int, shape (L,)
        The first row of each level in ``value``: the exclusive cumulative sum of
        ``H_l*W_l`` (anything else is rejected); int32 or int64.
    sampling_locations : Tensor or array_like, shape (N, Lq, M, L, P, 2)
        Normalized ``(x, y)`` per query, head, level and point: ``(0, 0)`` is the top-left
        corner of the level's map and ``(1, 1)`` its bottom-right corner. Any real value is
        allowed (points off the map fade to zero; NaN and inf sample 0).
    attention_weights : Tensor or array_like, shape (N, Lq, M, L, P)
        The weight of each sample, used as given (Deformable-DETR applies the softmax in the
        layer, not in the op).
    im2col_step : int, default 64
        Deformable-DETR's batch chunk size for its CUDA kernel; accepted for call compatibility
        (``MSDeformAttnFunction.apply(value, spatial_shapes, level_start_index,
        sampling_locations, attention_weights, im2col_step)``), checked to be a positive int and
        ignored: any batch size works.

    Returns
    -------
    Tensor, shape (N, Lq, M * D)
        Head ``m`` fills channels ``m*D`` to ``m*D + D - 1``.

    Raises
    ------
    TypeError
        If a float array is not float32/float64, the float arrays differ in dtype, or
        ``spatial_shapes`` / ``level_start_index`` are not int32/int64, or ``im2col_step`` is
        not an int.
    ValueError
        If ``im2col_step`` is < 1, a shape is inconsistent, ``spatial_shapes`` has a negative
        size or one of 2**31 or more, ``level_start_index`` is not its exclusive cumulative
        sum, ``S`` differs from ``sum(H_l*W_l)``, ``D`` exceeds 4096 on the CPU, or the arrays
        are on different devices.

    See Also
    --------
    deformnp.nn.MSDeformAttn : The layer (projections, softmax, output projection).
    level_layout : ``spatial_shapes`` and ``level_start_index`` from a list of level sizes.
    ms_deform_attn_forward, ms_deform_attn_backward : The array-level pair.

    Notes
    -----
    With :math:`V_l` level :math:`l` of ``value`` as an :math:`H_l \times W_l` map and
    :math:`(u, v)` the sampling location,

    .. math::

        \mathrm{out}[n, q, mD + d] = \sum_{l, p} A[n, q, m, l, p]\;
        V_l[n, \cdot, \cdot, m, d]\big(y = v H_l - 0.5,\; x = u W_l - 0.5\big),

    each sample taken with the zero-fade rule of :func:`bilinear_interpolate`: this is
    ``grid_sample(..., padding_mode="zeros", align_corners=False)`` at ``grid = 2*loc - 1``, as
    in ``ms_deform_attn_core_pytorch``. The location gradient is the exact derivative of that
    rule (the right-hand slope at integer pixel coordinates). Any batch size works
    (``im2col_step`` is accepted and ignored); single-scale deformable attention is the case
    ``L = 1``. See :doc:`/ops/ms_deform_attn` for the formula and gradients.

    Examples
    --------
    Two levels, 4x4 and 2x2; every query samples the centre of each level with weight 0.5:

    >>> import numpy as np
    >>> from deformnp.ops import ms_deform_attn
    >>> N, M, D, Lq, L, P = 1, 2, 8, 3, 2, 1
    >>> shapes = np.array([[4, 4], [2, 2]])
    >>> starts = np.array([0, 16])
    >>> value = np.ones((N, 16 + 4, M, D))
    >>> loc = np.full((N, Lq, M, L, P, 2), 0.5)
    >>> attn = np.full((N, Lq, M, L, P), 0.5)
    >>> out = ms_deform_attn(value, shapes, starts, loc, attn)
    >>> out.shape
    (1, 3, 16)
    >>> float(out.numpy()[0, 0, 0])
    1.0
    """
    integer(OP, "im2col_step", im2col_step, 1)
    args = prepare(value, spatial_shapes, level_start_index, sampling_locations, attention_weights)
    return MSDeformAttnFunction.apply(value, sampling_locations, attention_weights, args=args)
