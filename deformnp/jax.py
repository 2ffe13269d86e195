"""deformnp's ops as differentiable JAX functions (``import deformnp.jax``; needs ``jax``).

Each function is a ``jax.custom_vjp`` whose forward and backward are ``jax.pure_callback`` calls
of deformnp's array-level pairs (``deformnp.ops.<op>_forward`` / ``<op>_backward``) on NumPy
arrays. Arguments, their names and order, defaults and semantics are those of the anchors:

* :func:`deform_conv2d`, :func:`roi_align`, :func:`roi_pool`, :func:`ps_roi_align`,
  :func:`ps_roi_pool`: ``torchvision.ops``;
* :func:`modulated_deform_conv2d`, :func:`deform_roi_pool`: ``mmcv.ops``;
* :func:`ms_deform_attn`: Deformable-DETR's ``MSDeformAttnFunction``;
* :func:`grid_sample`: ``torch.nn.functional.grid_sample`` with ``mode="bilinear"`` (the only
  mode; the argument is left out); :func:`bilinear_interpolate`: deformnp's sampling primitive.

The contract, for every function:

* **Device.** The kernels run on the host CPU, whatever JAX's backend: ``pure_callback`` moves
  the arguments to host memory and the results back to the arguments' device.
* **Copies.** None beyond JAX's callback transfer (JAX hands the callback read-only host buffers
  of the arguments, which in JAX 0.10 are made for the call on the CPU backend too, and copies
  the returned arrays into its output buffers). deformnp works on the callback's buffers in
  place, through writeable aliases: Numba types a read-only array differently and deformnp
  would copy it; its kernels never write their inputs. The residuals kept for the backward are
  the input arrays themselves (references) and, for :func:`roi_pool`, the forward's argmax.
  (Some kernels make their own working layouts, e.g. ms_deform_attn's head-major copy of
  ``value``, as they do in deformnp.)
* **dtypes.** float32 or float64, one dtype for every float input (boxes included); float64
  needs ``jax.config.update("jax_enable_x64", True)``. Outputs and gradients have that dtype.
* **Static arguments.** Geometry (stride, padding, dilation, output_size, spatial_scale,
  sampling_ratio, aligned, gamma, groups, padding_mode, border, ...) and ms_deform_attn's
  ``spatial_shapes`` / ``level_start_index`` fix output shapes or the kernel, so they must be
  Python values (or concrete arrays): a traced value is a TypeError. Under ``jax.jit`` close over
  them or mark them ``static_argnames``. Output shapes are computed on the host from the static
  shapes.
* **Checks.** Shapes, dtypes and static arguments are checked when a function is called or
  traced, by deformnp's own validation (its TypeError / ValueError and message). Checks of
  array *values* (a box's batch index, an adaptive RoI sampling grid too large to compute) run
  at call time in eager mode when the boxes are concrete, and otherwise inside the callback,
  where JAX reports deformnp's message in a ``jax.errors.JaxRuntimeError``.
* **Differentiation.** Reverse mode: ``jax.grad``, ``jax.vjp``, ``jax.value_and_grad``, to
  first order (a custom_vjp has no JVP: ``jax.jvp``, ``jax.jacfwd`` and second derivatives
  raise). Only the gradients JAX asks for are computed (the ``needs`` flags of the array-level
  backwards come from the inputs JAX perturbs). Boxes, like the anchors', get a zero cotangent.
* **vmap.** Every function works under ``jax.vmap`` (the ops' own batch dimension stays the
  first of the per-example shapes). :func:`grid_sample`, :func:`bilinear_interpolate` and
  :func:`ms_deform_attn` fold the mapped axes into the op's batch axis and run one kernel call
  (``vmap_method="broadcast_all"``: unmapped inputs are tiled by JAX first); the others run one
  kernel call per mapped element (``"sequential"``); see ``_Host.vmap_method``.
* **Tracing.** The custom_vjp and its callbacks are built once per static configuration and
  shape (an LRU cache), so eager calls reuse JAX's compiled callback and ``jax.jit`` retraces
  only when its own cache misses.
"""

from __future__ import annotations

import ctypes
import functools
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import jax
import jax.numpy as jnp
import numpy as np
from jax.custom_derivatives import SymbolicZero

from . import ops as _ops
from .kernels.cpu.roi import argmax_dtype
from .ops import roi as _roi
from .ops.attention import prepare as _prepare_ms_deform_attn
from .ops.bilinear import prepare as _prepare_bilinear
from .ops.deform_conv import prepare as _prepare_deform_conv2d
from .ops.grid_sample import prepare as _prepare_grid_sample
from .validation import integer

__all__ = [
    "deform_conv2d",
    "modulated_deform_conv2d",
    "roi_align",
    "roi_pool",
    "ps_roi_align",
    "ps_roi_pool",
    "deform_roi_pool",
    "ms_deform_attn",
    "grid_sample",
    "bilinear_interpolate",
]

Shape = tuple[int, ...]

# ============================================================================ host side


def _writeable(x: Any) -> np.ndarray:
    """A callback argument as a writeable NumPy array over the same memory (no copy).

    JAX hands a callback read-only views of its host buffers. deformnp's kernels take writeable
    arrays (Numba types a read-only array differently, and deformnp's ``contiguous`` copies it
    to avoid compiling every kernel twice) and never write their inputs, so they get a writeable
    alias of the buffer, which keeps the JAX array alive while it is in use.
    """
    a = np.asarray(x)
    if a.flags.writeable or not a.flags.c_contiguous or a.size == 0:
        # nothing to alias when empty; JAX's host buffers are C-contiguous, but were one not,
        # deformnp would make the contiguous copy its kernels need
        return a
    buf = (ctypes.c_char * a.nbytes).from_address(a.ctypes.data)
    buf._owner = a  # the alias keeps JAX's buffer alive
    return np.frombuffer(buf, dtype=a.dtype).reshape(a.shape)


def _callback(
    fn: Callable[..., Sequence[np.ndarray]],
    in_ranks: Sequence[int],
    out_shapes: Sequence[Shape],
    fold: bool,
) -> Callable[..., tuple[np.ndarray, ...]]:
    """The host function given to ``pure_callback``: ``fn`` on writeable host arrays.

    With ``fold`` (ops whose every input and output carries the batch axis first, the batch
    elements independent), leading axes that ``vmap`` added (``vmap_method="broadcast_all"``
    gives every argument the same ones) are folded into the op's batch axis for one call of
    ``fn``, and unfolded in the results. ``in_ranks`` and ``out_shapes`` are the per-example
    ranks of the arguments and shapes of the results.
    """

    def call(*args: Any) -> tuple[np.ndarray, ...]:
        arrays = [_writeable(a) for a in args]
        extra = arrays[0].ndim - in_ranks[0]
        if not fold or extra == 0:
            return tuple(fn(*arrays))
        lead = arrays[0].shape[:extra]
        n = math.prod(lead)
        flat = [a.reshape((n * a.shape[extra], *a.shape[extra + 1 :])) for a in arrays]
        return tuple(o.reshape(lead + s) for o, s in zip(fn(*flat), out_shapes))

    return call


@jax.tree_util.register_static
@dataclass(frozen=True)
class _Needs:
    """The backward's ``needs`` flags, kept in the residuals as static data."""

    flags: tuple[bool, ...]


@dataclass(frozen=True)
class _Host:
    """One op at one static configuration: the array arguments' shapes and dtype, the static
    parameters (subclass fields), and the host functions of the forward and the backward.

    Frozen and hashable, so the custom_vjp and the callbacks built for it are made once and
    reused (JAX compiles an eager ``pure_callback`` once per callable).
    """

    shapes: tuple[Shape, ...]  # the array arguments, in order
    dtype: np.dtype

    # How pure_callback runs under jax.vmap. "sequential" (one callback per mapped element) is
    # always correct and is the default. "broadcast_all" hands the callback every argument with
    # the mapped axes first, which _callback folds into the op's batch axis: correct only for
    # ops whose every argument and result has the batch axis first and whose batch elements are
    # independent in the forward and in every gradient (no argument shared across the batch, no
    # gradient summed over it).
    vmap_method: ClassVar[str] = "sequential"

    @property
    def diff(self) -> tuple[bool, ...]:
        """Which array arguments are differentiable (all but boxes)."""
        return (True,) * len(self.shapes)

    @property
    def saved(self) -> tuple[int, ...]:
        """The array arguments the backward takes (their indices)."""
        return tuple(range(len(self.shapes)))

    def out_shapes(self) -> tuple[tuple[Shape, np.dtype], ...]:
        """The forward's results: the op's output first, then residuals for the backward."""
        raise NotImplementedError

    def forward(self, *arrays: np.ndarray) -> tuple[np.ndarray, ...]:
        raise NotImplementedError

    def backward(
        self, needs: tuple[bool, ...], grad_out: np.ndarray, *saved: np.ndarray
    ) -> tuple[np.ndarray | None, ...]:
        """One gradient per differentiable argument (None where ``needs`` is False), given the
        output gradient, the saved arguments and the forward's residuals."""
        raise NotImplementedError


def _specs(shapes: Sequence[tuple[Shape, np.dtype]]) -> tuple[jax.ShapeDtypeStruct, ...]:
    return tuple(jax.ShapeDtypeStruct(s, d) for s, d in shapes)


@functools.lru_cache(maxsize=512)
def _forward_callback(host: _Host) -> Callable[..., tuple[np.ndarray, ...]]:
    fold = host.vmap_method == "broadcast_all"
    outs = [s for s, _ in host.out_shapes()]
    return _callback(host.forward, [len(s) for s in host.shapes], outs, fold)


@functools.lru_cache(maxsize=1024)
def _backward_callback(
    host: _Host, needs: tuple[bool, ...]
) -> tuple[Callable[..., tuple[np.ndarray, ...]], tuple[jax.ShapeDtypeStruct, ...]]:
    """The backward's host function for these ``needs`` and the specs of its results (the needed
    gradients, in argument order)."""
    wanted = [s for s, d in zip(host.shapes, host.diff) if d]
    wanted = [s for s, n in zip(wanted, needs) if n]

    def backward(grad_out: np.ndarray, *saved: np.ndarray) -> list[np.ndarray]:
        grads = host.backward(needs, grad_out, *saved)
        return [g for g, n in zip(grads, needs) if n]

    residuals = host.out_shapes()
    ranks = [len(residuals[0][0])]
    ranks += [len(host.shapes[i]) for i in host.saved] + [len(s) for s, _ in residuals[1:]]
    fold = host.vmap_method == "broadcast_all"
    return _callback(backward, ranks, wanted, fold), _specs([(s, host.dtype) for s in wanted])


@functools.lru_cache(maxsize=512)
def _function(host: _Host) -> Callable[..., jax.Array]:
    """The differentiable JAX function of ``host``: a custom_vjp over two pure_callbacks."""
    out_specs = _specs(host.out_shapes())
    method = host.vmap_method

    def run_forward(args: Sequence[Any]) -> list[jax.Array]:
        return jax.pure_callback(_forward_callback(host), out_specs, *args, vmap_method=method)

    @jax.custom_vjp
    def op(*args: Any) -> jax.Array:
        return run_forward(args)[0]

    def fwd(*primals: Any) -> tuple[jax.Array, Any]:
        args = [p.value for p in primals]
        outs = run_forward(args)
        needs = tuple(bool(p.perturbed) for p, d in zip(primals, host.diff) if d)
        saved = tuple(args[i] for i in host.saved)
        return outs[0], (saved, tuple(outs[1:]), _Needs(needs))

    def bwd(res: Any, grad_out: Any) -> tuple[jax.Array | None, ...]:
        saved, residuals, needs = res
        grads: Any = iter(())
        if any(needs.flags) and not isinstance(grad_out, SymbolicZero):
            callback, specs = _backward_callback(host, needs.flags)
            grads = iter(
                jax.pure_callback(callback, specs, grad_out, *saved, *residuals, vmap_method=method)
            )
        flags = iter(needs.flags)
        # None: a zero cotangent (boxes; inputs JAX does not differentiate)
        return tuple(next(grads) if d and next(flags) else None for d in host.diff)

    op.defvjp(fwd, bwd, symbolic_zeros=True)
    return op


# ============================================================================ trace-time checks


def _array(x: Any) -> jax.Array:
    return x if isinstance(x, jax.Array) else jnp.asarray(x)


def _stand_in(x: Any) -> np.ndarray:
    """An uninitialised host array of ``x``'s shape and dtype for deformnp's shape and dtype
    checks, which never read its values (``np.empty`` reserves the memory but never touches it;
    the array is dropped after the checks)."""
    return np.empty(x.shape, dtype=x.dtype)


def _static(op: str, **values: Any) -> None:
    """Refuse traced static arguments, with a message that says what to do."""
    for name, v in values.items():
        items = v if isinstance(v, (tuple, list)) else (v,)
        if any(isinstance(i, jax.core.Tracer) for i in items):
            raise TypeError(
                f"{op}: {name} must be static (a Python value), got a traced array; under "
                f"jax.jit close over it or pass it through static_argnums / static_argnames"
            )


def _concrete(op: str, name: str, v: Any) -> np.ndarray:
    """A static array argument (ms_deform_attn's level layout) as a host array."""
    if isinstance(v, jax.core.Tracer):
        raise TypeError(
            f"{op}: {name} must be static (a tuple or a concrete array), got a traced array; "
            f"under jax.jit close over it or compute it with NumPy "
            f"(deformnp.ops.attention.level_layout)"
        )
    return np.asarray(v)


def _boxes(boxes: Any) -> tuple[Any, Any]:
    """Boxes as JAX arrays (a (K, 5) array, or the list form's (L_i, 4) arrays), and the host
    stand-in for deformnp's checks: the boxes themselves when concrete (their batch indices are
    then checked at once), zeros of their shape and dtype when traced."""

    def host(b: jax.Array) -> np.ndarray:
        return np.zeros(b.shape, b.dtype) if isinstance(b, jax.core.Tracer) else np.asarray(b)

    if boxes is None:
        return None, None  # deformnp's TypeError
    if isinstance(boxes, (list, tuple)):
        parts = [_array(b) for b in boxes]
        return parts, [host(b) for b in parts]
    boxes = _array(boxes)
    return boxes, host(boxes)


def _rois(boxes: Any, dtype: Any) -> jax.Array:
    """The (K, 5) rois of checked boxes; the list form gets its batch-index column as in
    torchvision's ``convert_boxes_to_roi_format`` (the list position)."""
    if not isinstance(boxes, list):
        return boxes
    if not boxes:
        return jnp.zeros((0, 5), dtype)
    columns = [jnp.full((b.shape[0], 1), i, b.dtype) for i, b in enumerate(boxes)]
    return jnp.concatenate([jnp.concatenate(p, axis=1) for p in zip(columns, boxes)], axis=0)


# ============================================================================ deform_conv2d


@dataclass(frozen=True)
class _DeformConv2d(_Host):
    stride: tuple[int, int]
    padding: tuple[int, int]
    dilation: tuple[int, int]
    has_bias: bool
    has_mask: bool

    def out_shapes(self) -> tuple[tuple[Shape, np.dtype], ...]:
        input, offset, weight = self.shapes[:3]
        return (((input[0], weight[0], *offset[2:]), self.dtype),)

    def _optional(self, rest: Sequence[np.ndarray]) -> tuple[Any, Any]:
        rest = list(rest)
        bias = rest.pop(0) if self.has_bias else None
        mask = rest.pop(0) if self.has_mask else None
        return bias, mask

    def forward(self, input: np.ndarray, offset: np.ndarray, weight: np.ndarray, *rest: Any):
        bias, mask = self._optional(rest)
        out = _ops.deform_conv2d_forward(
            input, offset, weight, bias, self.stride, self.padding, self.dilation, mask
        )
        return (out,)

    def backward(self, needs, grad_out, input, offset, weight, *rest):
        bias, mask = self._optional(rest)
        flags = list(needs)
        n_input, n_offset, n_weight = flags[:3]
        n_bias = flags[3] if self.has_bias else False
        n_mask = flags[-1] if self.has_mask else False
        gi, go, gw, gb, gm = _ops.deform_conv2d_backward(
            grad_out, input, offset, weight, bias, self.stride, self.padding, self.dilation,
            mask, needs=(n_input, n_offset, n_weight, n_bias, n_mask),
        )  # fmt: skip
        return (gi, go, gw) + ((gb,) if self.has_bias else ()) + ((gm,) if self.has_mask else ())


def _deform_conv2d_host(
    op: str,
    input: jax.Array,
    offset: jax.Array,
    weight: jax.Array,
    bias: jax.Array | None,
    stride: Any,
    padding: Any,
    dilation: Any,
    mask: jax.Array | None,
) -> tuple[_DeformConv2d, Any]:
    _static(op, stride=stride, padding=padding, dilation=dilation)
    a = _prepare_deform_conv2d(
        _stand_in(input), _stand_in(offset), _stand_in(weight),
        None if bias is None else _stand_in(bias), stride, padding, dilation,
        None if mask is None else _stand_in(mask),
    )  # fmt: skip
    arrays = [input, offset, weight] + [x for x in (bias, mask) if x is not None]
    host = _DeformConv2d(
        tuple(tuple(x.shape) for x in arrays), np.dtype(input.dtype), a.stride, a.padding,
        a.dilation, bias is not None, mask is not None,
    )  # fmt: skip
    return host, arrays


def deform_conv2d(
    input: Any,
    offset: Any,
    weight: Any,
    bias: Any | None = None,
    stride: int | tuple[int, int] = (1, 1),
    padding: int | tuple[int, int] = (0, 0),
    dilation: int | tuple[int, int] = (1, 1),
    mask: Any | None = None,
) -> jax.Array:
    """Deformable convolution v1 (v2 with ``mask``), as ``torchvision.ops.deform_conv2d``.

    Reverse-mode differentiable: a ``jax.custom_vjp`` whose forward and backward run deformnp's
    kernels on the host through ``jax.pure_callback`` (:func:`deformnp.ops.deform_conv2d_forward` /
    ``_backward``). One kernel call per element under ``jax.vmap`` (the weight and bias are shared
    by the batch). See the module docstring for the contract (CPU, no copies, static arguments).

    Parameters
    ----------
    input : array, shape (B, Cin, H, W)
        The feature map, float32 or float64.
    offset : array, shape (B, 2*G*kh*kw, Hout, Wout)
        For kernel point ``k = i*kw + j`` of offset group ``g``, ``(dy, dx)`` in channels
        ``2*(g*kh*kw + k)`` and the next; G (offset groups) is inferred.
    weight : array, shape (Cout, Cin/g, kh, kw)
        The filters; ``g = Cin // weight.shape[1]`` weight groups.
    bias : array, shape (Cout,), optional
        Added to each output channel.
    stride : int or (int, int), default (1, 1)
        The step between output positions (static).
    padding : int or (int, int), default (0, 0)
        Zero padding (static).
    dilation : int or (int, int), default (1, 1)
        The spacing of the kernel taps (static).
    mask : array, shape (B, G*kh*kw, Hout, Wout), optional
        The modulation of DCN v2; None is DCN v1 (all ones).

    Returns
    -------
    jax.Array, shape (B, Cout, Hout, Wout)
        ``Hout = (H + 2*ph - (dh*(kh-1) + 1)) // sh + 1`` (W likewise), of the inputs' dtype;
        differentiable in every array argument.

    Raises
    ------
    TypeError
        If an array is not float32/float64, the dtypes differ, or a static argument is traced.
    ValueError
        If a shape or static value is invalid.

    See Also
    --------
    deformnp.ops.deform_conv2d : The same op on deformnp Tensors; formulas in
        :doc:`/ops/deform_conv`.
    """
    arrays = [_array(x) if x is not None else None for x in (input, offset, weight, bias, mask)]
    host, args = _deform_conv2d_host("deform_conv2d", *arrays[:4], stride, padding, dilation,
                                     arrays[4])  # fmt: skip
    return _function(host)(*args)


def modulated_deform_conv2d(
    input: Any,
    offset: Any,
    mask: Any,
    weight: Any,
    bias: Any | None = None,
    stride: int | tuple[int, int] = 1,
    padding: int | tuple[int, int] = 0,
    dilation: int | tuple[int, int] = 1,
    groups: int = 1,
    deform_groups: int = 1,
) -> jax.Array:
    """Modulated deformable convolution (DCN v2), as ``mmcv.ops.modulated_deform_conv2d``.

    mmcv's argument order (input, offset, mask, weight, bias, stride, padding, dilation, groups,
    deform_groups) and offset layout, which is torchvision's (dy, dx of kernel point k of deformable
    group g in channels ``2*(g*kh*kw + k)`` and the next), so this is :func:`deform_conv2d` with
    ``mask``. Reverse-mode differentiable: a ``jax.custom_vjp`` whose forward and backward run
    deformnp's kernels on the host through ``jax.pure_callback``. One kernel call per element under
    vmap.

    Parameters
    ----------
    input : array, shape (B, Cin, H, W)
        The feature map, float32 or float64.
    offset : array, shape (B, 2*deform_groups*kh*kw, Hout, Wout)
        The sampling offsets.
    mask : array, shape (B, deform_groups*kh*kw, Hout, Wout)
        The modulation; None is accepted and means all ones (DCN v1).
    weight : array, shape (Cout, Cin/groups, kh, kw)
        The filters.
    bias : array, shape (Cout,), optional
        Added to each output channel.
    stride : int or (int, int), default 1
        The step between output positions (static).
    padding : int or (int, int), default 0
        Zero padding (static).
    dilation : int or (int, int), default 1
        The spacing of the kernel taps (static).
    groups : int, default 1
        Weight groups (static); must equal ``Cin / weight.shape[1]``.
    deform_groups : int, default 1
        Offset groups (static); must equal ``offset.shape[1] / (2*kh*kw)``.

    Returns
    -------
    jax.Array, shape (B, Cout, Hout, Wout)
        Of the inputs' dtype, differentiable in every array argument.

    Raises
    ------
    TypeError
        If an array is not float32/float64, the dtypes differ, or a static argument is traced.
    ValueError
        If ``groups`` or ``deform_groups`` disagrees with the shapes, or another shape or
        static value is invalid.

    See Also
    --------
    deformnp.ops.deform_conv2d : The op, with ``mask``; formulas in :doc:`/ops/deform_conv`.
    """
    op = "modulated_deform_conv2d"
    _static(op, groups=groups, deform_groups=deform_groups)
    groups = integer(op, "groups", groups, 1)
    deform_groups = integer(op, "deform_groups", deform_groups, 1)
    arrays = [_array(x) if x is not None else None for x in (input, offset, mask, weight, bias)]
    input, offset, mask, weight, bias = arrays
    host, args = _deform_conv2d_host(op, input, offset, weight, bias, stride, padding, dilation,
                                     mask)  # fmt: skip
    if weight.shape[1] * groups != input.shape[1]:
        raise ValueError(
            f"{op}: input has {input.shape[1]} channels, expected groups * weight.shape[1] = "
            f"{groups} * {weight.shape[1]} = {groups * weight.shape[1]}"
        )
    kk = weight.shape[2] * weight.shape[3]
    if offset.shape[1] != 2 * deform_groups * kk:
        raise ValueError(
            f"{op}: offset has {offset.shape[1]} channels, expected 2*deform_groups*kh*kw = "
            f"{2 * deform_groups * kk} (deform_groups = {deform_groups})"
        )
    return _function(host)(*args)


# ============================================================================ RoI ops


@dataclass(frozen=True)
class _RoI(_Host):
    """The RoI ops without offsets: arguments (input, rois); the backward takes the input's
    shape (``shapes[0]``) and the rois, not the input."""

    output_size: tuple[int, int]
    spatial_scale: float
    out_shape: Shape

    @property
    def diff(self) -> tuple[bool, ...]:
        return (True, False)

    @property
    def saved(self) -> tuple[int, ...]:
        return (1,)

    def out_shapes(self) -> tuple[tuple[Shape, np.dtype], ...]:
        return ((self.out_shape, self.dtype),)


@dataclass(frozen=True)
class _RoIAlign(_RoI):
    sampling_ratio: int
    aligned: bool

    def forward(self, input, rois):
        args = (self.output_size, self.spatial_scale, self.sampling_ratio, self.aligned)
        return (_ops.roi_align_forward(input, rois, *args),)

    def backward(self, needs, grad_out, rois):
        args = (self.output_size, self.spatial_scale, self.sampling_ratio, self.aligned)
        return _ops.roi_align_backward(grad_out, self.shapes[0], rois, *args, needs=needs)


@dataclass(frozen=True)
class _PSRoIAlign(_RoI):
    sampling_ratio: int

    def forward(self, input, rois):
        args = (self.output_size, self.spatial_scale, self.sampling_ratio)
        return (_ops.ps_roi_align_forward(input, rois, *args),)

    def backward(self, needs, grad_out, rois):
        args = (self.output_size, self.spatial_scale, self.sampling_ratio)
        return _ops.ps_roi_align_backward(grad_out, self.shapes[0], rois, *args, needs=needs)


@dataclass(frozen=True)
class _RoIPool(_RoI):
    """roi_pool: the forward's argmax (the flat plane index of each bin's maximum) is a
    residual, so the backward needs neither the input nor a second search."""

    def out_shapes(self) -> tuple[tuple[Shape, np.dtype], ...]:
        H, W = self.shapes[0][2:]
        return ((self.out_shape, self.dtype), (self.out_shape, np.dtype(argmax_dtype(H, W))))

    def forward(self, input, rois):
        return _ops.roi_pool_forward(
            input, rois, self.output_size, self.spatial_scale, return_argmax=True
        )

    def backward(self, needs, grad_out, rois, argmax):
        return _ops.roi_pool_backward(
            grad_out, self.shapes[0], rois, self.output_size, self.spatial_scale, argmax=argmax,
            needs=needs,
        )  # fmt: skip


@dataclass(frozen=True)
class _PSRoIPool(_RoI):
    def forward(self, input, rois):
        return (_ops.ps_roi_pool_forward(input, rois, self.output_size, self.spatial_scale),)

    def backward(self, needs, grad_out, rois):
        return _ops.ps_roi_pool_backward(
            grad_out, self.shapes[0], rois, self.output_size, self.spatial_scale, needs=needs
        )


@dataclass(frozen=True)
class _DeformRoIPool(_Host):
    """Arguments (input, rois[, offset]); the backward takes them all (the offset gradient
    needs the input's values)."""

    output_size: tuple[int, int]
    spatial_scale: float
    sampling_ratio: int
    gamma: float
    out_shape: Shape

    @property
    def diff(self) -> tuple[bool, ...]:
        return (True, False, True)[: len(self.shapes)]

    def out_shapes(self) -> tuple[tuple[Shape, np.dtype], ...]:
        return ((self.out_shape, self.dtype),)

    def _args(self) -> tuple:
        return (self.output_size, self.spatial_scale, self.sampling_ratio, self.gamma)

    def forward(self, input, rois, offset=None):
        return (_ops.deform_roi_pool_forward(input, rois, offset, *self._args()),)

    def backward(self, needs, grad_out, input, rois, offset=None):
        flags = (needs[0], needs[1] if offset is not None else False)
        gi, go = _ops.deform_roi_pool_backward(
            grad_out, input, rois, offset, *self._args(), needs=flags
        )
        return (gi,) if offset is None else (gi, go)


def _roi_call(
    op: str,
    make: Callable[..., _Host],
    prepare: Callable[..., Any],
    input: Any,
    boxes: Any,
    *params: Any,
) -> jax.Array:
    """Check and run one of the RoI ops without offsets."""
    input = _array(input)
    boxes, host_boxes = _boxes(boxes)
    a = prepare(_stand_in(input), host_boxes, *params)
    rois = _rois(boxes, input.dtype)
    host = make((tuple(input.shape), tuple(rois.shape)), np.dtype(input.dtype), a)
    return _function(host)(input, rois)


def roi_align(
    input: Any,
    boxes: Any,
    output_size: int | tuple[int, int],
    spatial_scale: float = 1.0,
    sampling_ratio: int = -1,
    aligned: bool = False,
) -> jax.Array:
    """RoI Align, as ``torchvision.ops.roi_align``.

    Reverse-mode differentiable: a ``jax.custom_vjp`` whose forward and backward run deformnp's
    kernels on the host through ``jax.pure_callback`` (:func:`deformnp.ops.roi_align_forward` /
    ``_backward``). One kernel call per element under vmap. See the module docstring for the
    contract.

    Parameters
    ----------
    input : array, shape (N, C, H, W)
        The feature map, float32 or float64.
    boxes : array, shape (K, 5), or list of arrays, shape (L_i, 4)
        ``(batch_index, x1, y1, x2, y2)`` rows, or one ``(x1, y1, x2, y2)`` array per image (the
        list position is the batch index), of ``input``'s dtype. Not differentiated (zero
        cotangent).
    output_size : int or (int, int)
        (PH, PW), the bins per box (static).
    spatial_scale : float, default 1.0
        Multiplies the box coordinates (static).
    sampling_ratio : int, default -1
        Samples per bin side; <= 0: adaptive, ``ceil(roi_size / output_size)`` (static).
    aligned : bool, default False
        Shift the boxes by -0.5 pixel; False also enforces a minimum box size of 1, as
        torchvision (static).

    Returns
    -------
    jax.Array, shape (K, C, PH, PW)
        Differentiable in ``input``.

    Raises
    ------
    TypeError
        If an array is not float32/float64, the dtypes differ, or a static argument is traced.
    ValueError
        If a shape or static value is invalid.

    See Also
    --------
    deformnp.ops.roi_align : The same op on deformnp Tensors; formulas in :doc:`/ops/roi`.
    """
    op = "roi_align"
    _static(op, output_size=output_size, spatial_scale=spatial_scale,
            sampling_ratio=sampling_ratio, aligned=aligned)  # fmt: skip

    def make(shapes, dtype, a):
        return _RoIAlign(shapes, dtype, *a.params[:2], a.out_shape, *a.params[2:])

    return _roi_call(op, make, _roi.prepare_roi_align, input, boxes, output_size, spatial_scale,
                     sampling_ratio, aligned)  # fmt: skip


def ps_roi_align(
    input: Any,
    boxes: Any,
    output_size: int | tuple[int, int],
    spatial_scale: float = 1.0,
    sampling_ratio: int = -1,
) -> jax.Array:
    """Position-sensitive RoI Align, as ``torchvision.ops.ps_roi_align``.

    Reverse-mode differentiable: a ``jax.custom_vjp`` whose forward and backward run deformnp's
    kernels on the host through ``jax.pure_callback`` (:func:`deformnp.ops.ps_roi_align_forward` /
    ``_backward``). An empty sampling grid gives 0, where torchvision gives NaN.

    Parameters
    ----------
    input : array, shape (N, C, H, W)
        The feature map, float32 or float64; C a multiple of PH*PW.
    boxes : array, shape (K, 5), or list of arrays, shape (L_i, 4)
        ``(batch_index, x1, y1, x2, y2)`` rows, or one ``(x1, y1, x2, y2)`` array per image (the
        list position is the batch index), of ``input``'s dtype. Not differentiated (zero
        cotangent).
    output_size : int or (int, int)
        (PH, PW), the bins per box (static).
    spatial_scale : float, default 1.0
        Multiplies the box coordinates (static).
    sampling_ratio : int, default -1
        Samples per bin side; <= 0: adaptive (static).

    Returns
    -------
    jax.Array, shape (K, C/(PH*PW), PH, PW)
        Differentiable in ``input``.

    Raises
    ------
    TypeError
        If an array is not float32/float64, the dtypes differ, or a static argument is traced.
    ValueError
        If a shape or static value is invalid.

    See Also
    --------
    deformnp.ops.ps_roi_align : The same op on deformnp Tensors; formulas in :doc:`/ops/roi`.
    """
    op = "ps_roi_align"
    _static(op, output_size=output_size, spatial_scale=spatial_scale,
            sampling_ratio=sampling_ratio)  # fmt: skip

    def make(shapes, dtype, a):
        return _PSRoIAlign(shapes, dtype, *a.params[:2], a.out_shape, a.params[2])

    return _roi_call(op, make, _roi.prepare_ps_roi_align, input, boxes, output_size,
                     spatial_scale, sampling_ratio)  # fmt: skip


def roi_pool(
    input: Any, boxes: Any, output_size: int | tuple[int, int], spatial_scale: float = 1.0
) -> jax.Array:
    """RoI max pooling, as ``torchvision.ops.roi_pool``.

    Reverse-mode differentiable: a ``jax.custom_vjp`` whose forward and backward run deformnp's
    kernels on the host through ``jax.pure_callback`` (:func:`deformnp.ops.roi_pool_forward` /
    ``_backward``). The forward's argmax is kept for the backward, in the smallest of
    int16/int32/int64 that indexes the H*W plane.

    Parameters
    ----------
    input : array, shape (N, C, H, W)
        The feature map, float32 or float64.
    boxes : array, shape (K, 5), or list of arrays, shape (L_i, 4)
        ``(batch_index, x1, y1, x2, y2)`` rows, or one ``(x1, y1, x2, y2)`` array per image (the
        list position is the batch index), of ``input``'s dtype. Not differentiated (zero
        cotangent).
    output_size : int or (int, int)
        (PH, PW), the bins per box (static).
    spatial_scale : float, default 1.0
        Multiplies the box coordinates before rounding (static).

    Returns
    -------
    jax.Array, shape (K, C, PH, PW)
        Differentiable in ``input``: each bin's gradient goes to its maximum.

    Raises
    ------
    TypeError
        If an array is not float32/float64, the dtypes differ, or a static argument is traced.
    ValueError
        If a shape or static value is invalid, or the plane needs int64 argmax indices while
        ``jax_enable_x64`` is off.

    See Also
    --------
    deformnp.ops.roi_pool : The same op on deformnp Tensors; formulas in :doc:`/ops/roi`.
    """
    op = "roi_pool"
    _static(op, output_size=output_size, spatial_scale=spatial_scale)
    input = _array(input)
    if input.ndim == 4:  # the argmax residual must be representable in JAX
        index = np.dtype(argmax_dtype(*input.shape[2:]))
        if jax.dtypes.canonicalize_dtype(index) != index:
            raise ValueError(
                f"{op}: an input plane of {input.shape[2]}x{input.shape[3]} needs {index} "
                f"argmax indices: enable jax_enable_x64"
            )

    def make(shapes, dtype, a):
        return _RoIPool(shapes, dtype, *a.params, a.out_shape)

    return _roi_call(op, make, _roi.prepare_roi_pool, input, boxes, output_size, spatial_scale)


def ps_roi_pool(
    input: Any, boxes: Any, output_size: int | tuple[int, int], spatial_scale: float = 1.0
) -> jax.Array:
    """Position-sensitive RoI average pooling, as ``torchvision.ops.ps_roi_pool``.

    Reverse-mode differentiable: a ``jax.custom_vjp`` whose forward and backward run deformnp's
    kernels on the host through ``jax.pure_callback`` (:func:`deformnp.ops.ps_roi_pool_forward` /
    ``_backward``). deformnp's bins include the map's last row and column, which torchvision's
    forward never pools; the outputs agree wherever no bin reaches them.

    Parameters
    ----------
    input : array, shape (N, C, H, W)
        The feature map, float32 or float64; C a multiple of PH*PW.
    boxes : array, shape (K, 5), or list of arrays, shape (L_i, 4)
        ``(batch_index, x1, y1, x2, y2)`` rows, or one ``(x1, y1, x2, y2)`` array per image (the
        list position is the batch index), of ``input``'s dtype. Not differentiated (zero
        cotangent).
    output_size : int or (int, int)
        (PH, PW), the bins per box (static).
    spatial_scale : float, default 1.0
        Multiplies the box coordinates before rounding (static).

    Returns
    -------
    jax.Array, shape (K, C/(PH*PW), PH, PW)
        Differentiable in ``input``.

    Raises
    ------
    TypeError
        If an array is not float32/float64, the dtypes differ, or a static argument is traced.
    ValueError
        If a shape or static value is invalid.

    See Also
    --------
    deformnp.ops.ps_roi_pool : The same op on deformnp Tensors; formulas in :doc:`/ops/roi`.
    """
    op = "ps_roi_pool"
    _static(op, output_size=output_size, spatial_scale=spatial_scale)

    def make(shapes, dtype, a):
        return _PSRoIPool(shapes, dtype, *a.params, a.out_shape)

    return _roi_call(op, make, _roi.prepare_ps_roi_pool, input, boxes, output_size,
                     spatial_scale)  # fmt: skip


def deform_roi_pool(
    input: Any,
    rois: Any,
    offset: Any | None,
    output_size: int | tuple[int, int],
    spatial_scale: float = 1.0,
    sampling_ratio: int = 0,
    gamma: float = 0.1,
) -> jax.Array:
    """Deformable RoI pooling, as ``mmcv.ops.deform_roi_pool`` (mmcv's argument order).

    Reverse-mode differentiable: a ``jax.custom_vjp`` whose forward and backward run deformnp's
    kernels on the host through ``jax.pure_callback`` (:func:`deformnp.ops.deform_roi_pool_forward`
    / ``_backward``). One kernel call per element under vmap.

    Parameters
    ----------
    input : array, shape (N, C, H, W)
        The feature map, float32 or float64.
    rois : array, shape (K, 5)
        ``(batch_index, x1, y1, x2, y2)`` rows (or a list of (L_i, 4) arrays), of ``input``'s
        dtype; not differentiated (zero cotangent).
    offset : array, shape (K, 2, PH, PW), or None
        Normalized bin shifts, channel 0 x, channel 1 y (mmcv's layout): bin (ph, pw) moves by
        ``gamma * (roi_w * offset[k, 0, ph, pw], roi_h * offset[k, 1, ph, pw])``. None: aligned
        RoI Align without the minimum box size.
    output_size : int or (int, int)
        (PH, PW), the bins per box (static).
    spatial_scale : float, default 1.0
        Multiplies the box coordinates (static).
    sampling_ratio : int, default 0
        Samples per bin side; <= 0: adaptive (static).
    gamma : float, default 0.1
        Scales the offsets (static).

    Returns
    -------
    jax.Array, shape (K, C, PH, PW)
        Differentiable in ``input`` and ``offset``.

    Raises
    ------
    TypeError
        If an array is not float32/float64, the dtypes differ, or a static argument is traced.
    ValueError
        If a shape or static value is invalid.

    See Also
    --------
    deformnp.ops.deform_roi_pool : The same op on deformnp Tensors; formulas in
        :doc:`/ops/deform_roi`.
    """
    op = "deform_roi_pool"
    _static(op, output_size=output_size, spatial_scale=spatial_scale,
            sampling_ratio=sampling_ratio, gamma=gamma)  # fmt: skip
    input = _array(input)
    offset = None if offset is None else _array(offset)
    boxes, host_boxes = _boxes(rois)
    a = _roi.prepare_deform_roi_pool(
        _stand_in(input), host_boxes, None if offset is None else _stand_in(offset),
        output_size, spatial_scale, sampling_ratio, gamma,
    )  # fmt: skip
    rois = _rois(boxes, input.dtype)
    args = [input, rois] + ([] if offset is None else [offset])
    host = _DeformRoIPool(
        tuple(tuple(x.shape) for x in args), np.dtype(input.dtype), *a.params, a.out_shape
    )
    return _function(host)(*args)


# ============================================================================ ms_deform_attn


@dataclass(frozen=True)
class _MSDeformAttn(_Host):
    spatial_shapes: tuple[tuple[int, int], ...]
    level_start_index: tuple[int, ...]

    # every argument and result has the batch axis N first, and out[n] and every gradient's
    # [n] depend on value[n], sampling_locations[n], attention_weights[n] alone (the level
    # layout is static): vmapped axes fold into N
    vmap_method: ClassVar[str] = "broadcast_all"

    def out_shapes(self) -> tuple[tuple[Shape, np.dtype], ...]:
        N, _, M, D = self.shapes[0]
        return (((N, self.shapes[1][1], M * D), self.dtype),)

    def _levels(self) -> tuple[np.ndarray, np.ndarray]:
        shapes = np.array(self.spatial_shapes, np.int64).reshape(-1, 2)
        return shapes, np.array(self.level_start_index, np.int64)

    def forward(self, value, sampling_locations, attention_weights):
        shapes, starts = self._levels()
        out = _ops.ms_deform_attn_forward(
            value, shapes, starts, sampling_locations, attention_weights
        )
        return (out,)

    def backward(self, needs, grad_out, value, sampling_locations, attention_weights):
        shapes, starts = self._levels()
        return _ops.ms_deform_attn_backward(
            grad_out, value, shapes, starts, sampling_locations, attention_weights, needs=needs
        )


def ms_deform_attn(
    value: Any,
    spatial_shapes: Any,
    level_start_index: Any,
    sampling_locations: Any,
    attention_weights: Any,
) -> jax.Array:
    """Multi-scale deformable attention, as Deformable-DETR's ``MSDeformAttnFunction``.

    Reverse-mode differentiable: a ``jax.custom_vjp`` whose forward and backward run deformnp's
    kernels on the host through ``jax.pure_callback`` (:func:`deformnp.ops.ms_deform_attn_forward` /
    ``_backward``). Under vmap the mapped axes fold into N: one kernel call.

    Parameters
    ----------
    value : array, shape (N, S, M, D)
        M heads of D channels over ``S = sum_l H_l*W_l`` positions, level after level.
    spatial_shapes : tuple of (int, int) or int array, shape (L, 2)
        Rows (H_l, W_l); static: a tuple or a concrete array, not a traced one.
    level_start_index : tuple of int or int array, shape (L,)
        The exclusive cumulative sum of ``H_l*W_l`` (checked), e.g. from
        ``deformnp.ops.attention.level_layout``; static.
    sampling_locations : array, shape (N, Lq, M, L, P, 2)
        Normalized (x, y): (0, 0) and (1, 1) the corners of each level's map.
    attention_weights : array, shape (N, Lq, M, L, P)
        The weight of each sample.

    Returns
    -------
    jax.Array, shape (N, Lq, M*D)
        Differentiable in value, sampling_locations and attention_weights.

    Raises
    ------
    TypeError
        If an array is not float32/float64, the dtypes differ, or the level layout is traced.
    ValueError
        If a shape or the level layout is invalid.

    See Also
    --------
    deformnp.ops.ms_deform_attn : The same op on deformnp Tensors; formulas in
        :doc:`/ops/ms_deform_attn`.
    """
    op = "ms_deform_attn"
    shapes = _concrete(op, "spatial_shapes", spatial_shapes)
    starts = _concrete(op, "level_start_index", level_start_index)
    value, loc, attn = (_array(x) for x in (value, sampling_locations, attention_weights))
    a = _prepare_ms_deform_attn(_stand_in(value), shapes, starts, _stand_in(loc), _stand_in(attn))
    host = _MSDeformAttn(
        (tuple(value.shape), tuple(loc.shape), tuple(attn.shape)), np.dtype(value.dtype),
        tuple((int(h), int(w)) for h, w in a.spatial_shapes.tolist()),
        tuple(int(s) for s in a.level_start_index.tolist()),
    )  # fmt: skip
    return _function(host)(value, loc, attn)


# ============================================================================ sampling


@dataclass(frozen=True)
class _GridSample(_Host):
    padding_mode: str
    align_corners: bool

    # input (N, C, Hin, Win), grid (N, Hout, Wout, 2) and the output and both gradients have N
    # first, and sample n reads input[n] and grid[n] alone: vmapped axes fold into N
    vmap_method: ClassVar[str] = "broadcast_all"

    def out_shapes(self) -> tuple[tuple[Shape, np.dtype], ...]:
        (N, C, _, _), (_, Hout, Wout, _) = self.shapes
        return (((N, C, Hout, Wout), self.dtype),)

    def forward(self, input, grid):
        args = ("bilinear", self.padding_mode, self.align_corners)
        return (_ops.grid_sample_forward(input, grid, *args),)

    def backward(self, needs, grad_out, input, grid):
        args = ("bilinear", self.padding_mode, self.align_corners)
        return _ops.grid_sample_backward(grad_out, input, grid, *args, needs=needs)


def grid_sample(
    input: Any,
    grid: Any,
    mode: str = "bilinear",
    padding_mode: str = "zeros",
    align_corners: bool | None = False,
) -> jax.Array:
    """Bilinear ``torch.nn.functional.grid_sample`` with torch's arguments.

    Reverse-mode differentiable: a ``jax.custom_vjp`` whose forward and backward run deformnp's
    kernels on the host through ``jax.pure_callback`` (:func:`deformnp.ops.grid_sample_forward` /
    ``_backward``). Under vmap the mapped axes fold into N: one kernel call.

    Parameters
    ----------
    input : array, shape (N, C, Hin, Win)
        The feature map, float32 or float64.
    grid : array, shape (N, Hout, Wout, 2)
        Normalized (x, y) sampling coordinates; -1 and 1 are the map's extremes.
    mode : str, default "bilinear"
        "bilinear", the only mode (anything else is a ValueError); static.
    padding_mode : {"zeros", "border", "reflection"}, default "zeros"
        What lies outside the map (static).
    align_corners : bool or None, default False
        True: -1 and 1 are the centres of the corner pixels; False (or None): their outer
        edges (static).

    Returns
    -------
    jax.Array, shape (N, C, Hout, Wout)
        Differentiable in ``input`` and ``grid``.

    Raises
    ------
    TypeError
        If an array is not float32/float64, the dtypes differ, or a static argument is traced.
    ValueError
        If a shape or static value is invalid.

    See Also
    --------
    deformnp.ops.grid_sample : The same op on deformnp Tensors; formulas in
        :doc:`/ops/bilinear`.
    """
    op = "grid_sample"
    _static(op, mode=mode, padding_mode=padding_mode, align_corners=align_corners)
    input, grid = _array(input), _array(grid)
    a = _prepare_grid_sample(_stand_in(input), _stand_in(grid), mode, padding_mode, align_corners)
    host = _GridSample(
        (tuple(input.shape), tuple(grid.shape)), np.dtype(input.dtype), a.padding_mode,
        a.align_corners,
    )  # fmt: skip
    return _function(host)(input, grid)


@dataclass(frozen=True)
class _Bilinear(_Host):
    border: str

    # input (N, C, H, W), points (N, P, 2), the output (N, C, P) and both gradients have N
    # first, and sample n reads input[n] and points[n] alone: vmapped axes fold into N
    vmap_method: ClassVar[str] = "broadcast_all"

    def out_shapes(self) -> tuple[tuple[Shape, np.dtype], ...]:
        (N, C, _, _), (_, P, _) = self.shapes
        return (((N, C, P), self.dtype),)

    def forward(self, input, points):
        return (_ops.bilinear_interpolate_forward(input, points, self.border),)

    def backward(self, needs, grad_out, input, points):
        return _ops.bilinear_interpolate_backward(grad_out, input, points, self.border, needs=needs)


def bilinear_interpolate(input: Any, points: Any, border: str = "zero") -> jax.Array:
    """Sample every channel of a feature map at real (y, x) pixel coordinates, bilinearly.

    Reverse-mode differentiable: a ``jax.custom_vjp`` whose forward and backward run deformnp's
    kernels on the host through ``jax.pure_callback``
    (:func:`deformnp.ops.bilinear_interpolate_forward` / ``_backward``). Under vmap the mapped axes
    fold into N: one kernel call.

    Parameters
    ----------
    input : array, shape (N, C, H, W)
        The feature map, float32 or float64.
    points : array, shape (N, P, 2)
        ``(y, x)`` pixel coordinates per image, in ``input``'s dtype; pixel (i, j) sits at
        ``y = i, x = j``.
    border : {"zero", "clamp"}, default "zero"
        "zero": the zero-fade rule of deformable convolution; "clamp": RoI Align's rule
        (static).

    Returns
    -------
    jax.Array, shape (N, C, P)
        Differentiable in ``input`` and ``points``.

    Raises
    ------
    TypeError
        If an array is not float32/float64, the dtypes differ, or a static argument is traced.
    ValueError
        If a shape or static value is invalid.

    See Also
    --------
    deformnp.ops.bilinear_interpolate : The same op on deformnp Tensors; formulas in
        :doc:`/ops/bilinear`.
    """
    op = "bilinear_interpolate"
    _static(op, border=border)
    input, points = _array(input), _array(points)
    a = _prepare_bilinear(_stand_in(input), _stand_in(points), border)
    host = _Bilinear((tuple(input.shape), tuple(points.shape)), np.dtype(input.dtype), a.border)
    return _function(host)(input, points)
