"""Multi-scale deformable attention (SPEC section 9; anchor: Deformable-DETR's MSDeformAttn).

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
* output (N, Lq, M*D):

      out[n, q, m*D + d] = sum_{l, p} A[n, q, m, l, p]
                           * zero_fade(V_l[n, :, :, m, d], y = v*H_l - 0.5, x = u*W_l - 0.5)

  which is ``grid_sample(..., mode="bilinear", padding_mode="zeros", align_corners=False)`` at
  grid = 2*loc - 1, as in ``ms_deform_attn_core_pytorch``.

Gradients flow to value, sampling_locations and attention_weights (the location gradient is the
exact derivative of the zero-fade rule: the right-hand slope at integer pixel coordinates).

Differences from the anchor, all deliberate: any batch size works (no ``im2col_step`` argument
and no divisibility rule); index arithmetic is 64-bit; the backward is deterministic (see
``deformnp/kernels/cpu/attention.py``, which also explains how the CPU kernels are made fast).
On the CPU at most 4096 channels per head are supported (D; Deformable-DETR uses 32), and the
autograd node keeps a head-major copy of value, made in the forward, for the backward.

Single-scale deformable attention (the DCN-style attention over one feature map) is the
one-level case, L = 1::

    value = np.random.rand(N, H * W, M, D)
    out = ms_deform_attn(value, np.array([[H, W]]), np.array([0]),
                         locations,            # (N, Lq, M, 1, P, 2)
                         weights)              # (N, Lq, M, 1, P)

The array-level pair, for wrapping in other frameworks (a ``torch.autograd.Function``, a JAX
``custom_vjp``)::

    out = ms_deform_attn_forward(value, spatial_shapes, level_start_index,
                                 sampling_locations, attention_weights)
    grad_value, grad_sampling_locations, grad_attention_weights = ms_deform_attn_backward(
        grad_output, value, spatial_shapes, level_start_index, sampling_locations,
        attention_weights, needs=(True, True, True))
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from types import ModuleType
from typing import Any

import numba
import numpy as np

from ..function import Context, Function
from ..registry import BenchCase, CheckCase, bench_device, register_op, torch_device
from ..tensor import Tensor
from ._common import check_ndim, device_of, float_array, index_array, kernel_module, raw, same_dtype

__all__ = ["ms_deform_attn", "ms_deform_attn_forward", "ms_deform_attn_backward"]

_OP = "ms_deform_attn"

# The backward splits each (n, m) slice's queries into at most this many chunks, each with its
# own copy of grad_value, so that small N*M still gives enough parallel tasks. The count depends
# on the shapes only (never on the thread count), which keeps gradients bit-identical across
# thread counts.
_TARGET_TASKS = 16
_MAX_CHUNKS = 4
_MIN_QUERIES_PER_CHUNK = 128


def _kernels(device: str) -> ModuleType:
    """The kernel module for ``device`` ("cpu" or "cuda")."""
    return kernel_module(_OP, "attention", device)


# Below this much work (sampling points times (channels + 8)) the kernels run on the calling
# thread alone: waking Numba's worker threads costs from tens of microseconds on an idle machine
# to milliseconds on a loaded one, far more than a tiny problem takes (gradchecks and small
# layers make thousands of such calls). Results do not depend on it (see _n_chunks).
_SERIAL_WORK = 1 << 17


@contextmanager
def _threads_for(work: int) -> Iterator[None]:
    prev = numba.get_num_threads()
    if work >= _SERIAL_WORK or prev == 1:
        yield
        return
    numba.set_num_threads(1)
    try:
        yield
    finally:
        numba.set_num_threads(prev)


def _n_chunks(N: int, M: int, Lq: int) -> int:
    tasks = max(N * M, 1)
    if tasks >= _TARGET_TASKS:
        return 1
    return int(max(1, min(_MAX_CHUNKS, -(-_TARGET_TASKS // tasks), Lq // _MIN_QUERIES_PER_CHUNK)))


def _validate(
    value: Any,
    spatial_shapes: Any,
    level_start_index: Any,
    sampling_locations: Any,
    attention_weights: Any,
) -> tuple[Any, np.ndarray, np.ndarray, Any, Any, str]:
    """Check shapes, dtypes and the level bookkeeping once; return contiguous arrays + device."""
    device = device_of(
        _OP,
        value=value,
        sampling_locations=sampling_locations,
        attention_weights=attention_weights,
    )
    value_a = float_array(_OP, "value", value)
    loc = float_array(_OP, "sampling_locations", sampling_locations)
    attn = float_array(_OP, "attention_weights", attention_weights)
    same_dtype(_OP, value=value_a, sampling_locations=loc, attention_weights=attn)
    shapes = index_array(_OP, "spatial_shapes", spatial_shapes)
    starts = index_array(_OP, "level_start_index", level_start_index)

    check_ndim(_OP, "value", value_a, 4, "(N, S, M, D)")
    check_ndim(_OP, "sampling_locations", loc, 6, "(N, Lq, M, L, P, 2)")
    check_ndim(_OP, "attention_weights", attn, 5, "(N, Lq, M, L, P)")
    check_ndim(_OP, "spatial_shapes", shapes, 2, "(L, 2)")
    check_ndim(_OP, "level_start_index", starts, 1, "(L,)")
    N, S, M, D = (int(s) for s in value_a.shape)
    L = int(shapes.shape[0])
    if shapes.shape[1] != 2:
        raise ValueError(
            f"{_OP}: spatial_shapes must be (L, 2) rows (H_l, W_l), got shape {shapes.shape}"
        )
    if np.any(shapes < 0):
        raise ValueError(f"{_OP}: spatial_shapes must be non-negative, got {shapes.tolist()}")
    if starts.shape[0] != L:
        raise ValueError(
            f"{_OP}: level_start_index has {starts.shape[0]} entries, expected one per level "
            f"of spatial_shapes (L = {L})"
        )
    sizes = shapes[:, 0] * shapes[:, 1]
    expected_starts = np.concatenate([[0], np.cumsum(sizes)[:-1]]).astype(np.int64)[:L]
    if not np.array_equal(starts, expected_starts):
        raise ValueError(
            f"{_OP}: level_start_index {starts.tolist()} is inconsistent with spatial_shapes, "
            f"expected the cumulative sizes {expected_starts.tolist()}"
        )
    total = int(sizes.sum())
    if total != S:
        raise ValueError(
            f"{_OP}: value has S = {S} positions, but spatial_shapes give sum(H_l*W_l) = {total}"
        )
    if loc.shape[5] != 2:  # (device arrays allow no negative index)
        raise ValueError(
            f"{_OP}: sampling_locations must end in 2 coordinates (x, y), got shape "
            f"{tuple(loc.shape)}"
        )
    Lq = int(loc.shape[1])
    expected = (N, Lq, M, L)
    if tuple(loc.shape[:4]) != expected:
        raise ValueError(
            f"{_OP}: sampling_locations has shape {tuple(loc.shape)}, expected "
            f"(N, Lq, M, L, P, 2) with N = {N}, M = {M} (from value) and L = {L} "
            f"(from spatial_shapes)"
        )
    P = int(loc.shape[4])
    if tuple(attn.shape) != (N, Lq, M, L, P):
        raise ValueError(
            f"{_OP}: attention_weights has shape {tuple(attn.shape)}, expected "
            f"(N, Lq, M, L, P) = {(N, Lq, M, L, P)} to match sampling_locations"
        )
    return value_a, shapes, starts, loc, attn, device


def _host(a: np.ndarray) -> np.ndarray:
    """C-contiguous and writeable (a read-only array would make Numba compile another variant)."""
    a = np.ascontiguousarray(a)
    return a if a.flags.writeable else a.copy()


def _forward(
    value: Any,
    shapes: np.ndarray,
    starts: np.ndarray,
    loc: Any,
    attn: Any,
    device: str,
    value_hm: np.ndarray | None = None,
):
    N, S, M, D = value.shape
    Lq = loc.shape[1]
    if device != "cpu":
        from ..cuda import to_device

        return _kernels(device).ms_deform_attn_forward(
            value, to_device(shapes), to_device(starts), loc, attn
        )
    if N * Lq * M * D == 0 or loc.shape[3] == 0 or loc.shape[4] == 0 or S == 0:
        return np.zeros((N, Lq, M * D), dtype=value.dtype)
    out = np.empty((N, Lq, M * D), dtype=value.dtype)  # the kernel writes every element
    with _threads_for(loc.size // 2 * (D + 8)):
        return _kernels(device).ms_deform_attn_forward(
            _host(value), shapes, starts, _host(loc), _host(attn), out, value_hm
        )


def _backward(
    grad_output: Any,
    value: Any,
    shapes: np.ndarray,
    starts: np.ndarray,
    loc: Any,
    attn: Any,
    needs: tuple[bool, bool, bool],
    device: str,
    value_hm: np.ndarray | None = None,
) -> tuple[Any, Any, Any]:
    if device != "cpu":
        from ..cuda import to_device

        return _kernels(device).ms_deform_attn_backward(
            grad_output, value, to_device(shapes), to_device(starts), loc, attn, needs
        )
    N, S, M, D = value.shape
    Lq = loc.shape[1]
    dtype = value.dtype
    need_value = bool(needs[0])
    need_loc_attn = bool(needs[1] or needs[2])
    work = N * Lq * M * D * loc.shape[3] * loc.shape[4] * S
    run = (need_value or need_loc_attn) and work > 0
    alloc = np.empty if run else np.zeros  # the kernel overwrites the gradients whole
    grad_value = alloc(value.shape, dtype) if need_value else None
    grad_loc = alloc(loc.shape, dtype) if need_loc_attn else None
    grad_attn = alloc(attn.shape, dtype) if need_loc_attn else None
    if run:
        g = _host(np.asarray(grad_output, dtype=dtype))
        value, loc, attn = _host(value), _host(loc), _host(attn)
        n_chunks = _n_chunks(N, M, Lq) if need_value else 1
        with _threads_for(loc.size // 2 * (2 * D + 8)):
            _kernels(device).ms_deform_attn_backward(
                g,
                value,
                shapes,
                starts,
                loc,
                attn,
                n_chunks,
                need_value,
                need_loc_attn,
                grad_value if need_value else np.zeros((0, 0, 0, 0), dtype),
                grad_loc if need_loc_attn else np.zeros((0, 0, 0, 0, 0, 0), dtype),
                grad_attn if need_loc_attn else np.zeros((0, 0, 0, 0, 0), dtype),
                value_hm,
            )
    return (
        grad_value,
        grad_loc if needs[1] else None,
        grad_attn if needs[2] else None,
    )


def ms_deform_attn_forward(
    value: Any,
    spatial_shapes: Any,
    level_start_index: Any,
    sampling_locations: Any,
    attention_weights: Any,
) -> Any:
    """Array-level forward of :func:`ms_deform_attn`: plain arrays in, the (N, Lq, M*D) array out.

    Validates its inputs exactly as :func:`ms_deform_attn` does.
    """
    value, shapes, starts, loc, attn, device = _validate(
        value, spatial_shapes, level_start_index, sampling_locations, attention_weights
    )
    return _forward(value, shapes, starts, loc, attn, device)


def ms_deform_attn_backward(
    grad_output: Any,
    value: Any,
    spatial_shapes: Any,
    level_start_index: Any,
    sampling_locations: Any,
    attention_weights: Any,
    needs: tuple[bool, bool, bool] = (True, True, True),
) -> tuple[Any, Any, Any]:
    """Array-level backward of :func:`ms_deform_attn`.

    Given ``grad_output`` (N, Lq, M*D) and the forward's inputs, returns
    ``(grad_value, grad_sampling_locations, grad_attention_weights)``, each in its input's shape
    and dtype, or None where ``needs`` (three booleans, in that order) is False. Gradients are
    bit-identical on every run and with any number of threads.
    """
    value, shapes, starts, loc, attn, device = _validate(
        value, spatial_shapes, level_start_index, sampling_locations, attention_weights
    )
    N, S, M, D = value.shape
    g = raw(grad_output)
    expected = (N, loc.shape[1], M * D)
    if tuple(g.shape) != expected:
        raise ValueError(
            f"{_OP}: grad_output has shape {tuple(g.shape)}, expected (N, Lq, M*D) = {expected}"
        )
    return _backward(g, value, shapes, starts, loc, attn, tuple(needs), device)  # type: ignore[arg-type]


class MSDeformAttnFunction(Function):
    """Autograd node of :func:`ms_deform_attn` (inputs already validated)."""

    supports_cuda = True  # forward/backward dispatch on the arrays' device

    @staticmethod
    def forward(
        ctx: Context,
        value: Any,
        spatial_shapes: np.ndarray,
        level_start_index: np.ndarray,
        sampling_locations: Any,
        attention_weights: Any,
        device: str,
    ) -> Any:
        value_hm = None
        if device == "cpu":  # a Tensor's data may be a non-contiguous or read-only view
            value = _host(value)
            sampling_locations = _host(sampling_locations)
            attention_weights = _host(attention_weights)
            # the CPU kernels read value head-major: make that copy once for both passes
            with _threads_for(value.size):
                value_hm = _kernels(device).head_major(value)
        ctx.save_for_backward(
            value, spatial_shapes, level_start_index, sampling_locations, attention_weights
        )
        ctx.value_hm = value_hm
        ctx.device = device
        return _forward(
            value,
            spatial_shapes,
            level_start_index,
            sampling_locations,
            attention_weights,
            device,
            value_hm,
        )

    @staticmethod
    def backward(ctx: Context, grad: Any) -> tuple:
        value, shapes, starts, loc, attn = ctx.saved_tensors
        nv, _, _, nl, na, _ = ctx.needs_input_grad
        gv, gl, ga = _backward(
            grad, value, shapes, starts, loc, attn, (nv, nl, na), ctx.device, ctx.value_hm
        )
        return gv, None, None, gl, ga, None


def _pass(t: Any, a: Any) -> Any:
    """The Tensor itself (so the graph is recorded) or, for a plain array, its validated copy."""
    return t if isinstance(t, Tensor) else a


def ms_deform_attn(
    value: Any,
    spatial_shapes: Any,
    level_start_index: Any,
    sampling_locations: Any,
    attention_weights: Any,
) -> Tensor:
    """Multi-scale deformable attention, Deformable-DETR's ``MSDeformAttnFunction``.

    value (N, S, M, D), spatial_shapes (L, 2) int rows (H_l, W_l), level_start_index (L,) int,
    sampling_locations (N, Lq, M, L, P, 2) normalized (x, y) in [0, 1] over each level (values
    outside are allowed and fade to zero), attention_weights (N, Lq, M, L, P) -> Tensor
    (N, Lq, M*D) with

        out[n, q, m*D + d] = sum_{l, p} A[n, q, m, l, p]
                             * zero_fade(V_l[n, :, :, m, d], y = v*H_l - 0.5, x = u*W_l - 0.5)

    Gradients flow to value, sampling_locations and attention_weights. Any batch size works
    (no ``im2col_step``). Single-scale attention is L = 1::

        out = ms_deform_attn(value,                      # (N, H*W, M, D)
                             np.array([[H, W]]), np.array([0]),
                             locations, weights)         # (N, Lq, M, 1, P, 2), (N, Lq, M, 1, P)

    See the module docstring for the array-level pair ``ms_deform_attn_forward`` /
    ``ms_deform_attn_backward``.
    """
    value_a, shapes, starts, loc, attn, device = _validate(
        value, spatial_shapes, level_start_index, sampling_locations, attention_weights
    )
    return MSDeformAttnFunction.apply(
        _pass(value, value_a),
        shapes,
        starts,
        _pass(sampling_locations, loc),
        _pass(attention_weights, attn),
        device,
    )


# ---------------------------------------------------------------------------- check and bench


def level_layout(shapes: Any) -> tuple[np.ndarray, np.ndarray]:
    """(spatial_shapes, level_start_index) as int64 arrays for a list of (H_l, W_l)."""
    spatial_shapes = np.asarray(shapes, dtype=np.int64).reshape(-1, 2)
    sizes = spatial_shapes[:, 0] * spatial_shapes[:, 1]
    level_start_index = np.concatenate([[0], np.cumsum(sizes)[:-1]]).astype(np.int64)
    return spatial_shapes, level_start_index[: len(sizes)]


def locations_off_kinks(
    rng: np.random.Generator, spatial_shapes: np.ndarray, lead: tuple[int, ...], P: int
) -> np.ndarray:
    """Normalized locations (lead..., L, P, 2) whose pixel coordinates y = v*H - 0.5,
    x = u*W - 0.5 have fractional parts in [0.1, 0.9], over [-1, H] x [-1, W] (so some points sit
    in the fading band outside the map): away from every kink of the zero-fade rule, where
    finite differences are wrong (SPEC section 12)."""
    L = spatial_shapes.shape[0]
    shape = (*lead, L, P)
    H = spatial_shapes[:, 0].reshape((1,) * len(lead) + (L, 1))
    W = spatial_shapes[:, 1].reshape((1,) * len(lead) + (L, 1))
    y = np.floor(rng.uniform(-1, H, shape)) + rng.uniform(0.1, 0.9, shape)
    x = np.floor(rng.uniform(-1, W, shape)) + rng.uniform(0.1, 0.9, shape)
    return np.stack([(x + 0.5) / W, (y + 0.5) / H], axis=-1)


def _check_cases() -> list[CheckCase]:
    rng = np.random.default_rng(0)
    shapes, starts = level_layout([(3, 4), (2, 2)])
    N, M, D, Lq, P = 1, 2, 2, 2, 2
    S = int(shapes.prod(axis=1).sum())
    value = Tensor(rng.standard_normal((N, S, M, D)), requires_grad=True)
    loc = Tensor(locations_off_kinks(rng, shapes, (N, Lq, M), P), requires_grad=True)
    attn = Tensor(rng.random((N, Lq, M, len(shapes), P)), requires_grad=True)

    def fn(value: Tensor, loc: Tensor, attn: Tensor) -> Tensor:
        return ms_deform_attn(value, shapes, starts, loc, attn)

    return [CheckCase(fn, (value, loc, attn), ("value", "sampling_locations", "attention_weights"))]


def call_with_parameters(module: Any, tensors: tuple, fn: Any, *args: Any) -> Any:
    """Run ``fn(*args)`` with ``module``'s parameters (in ``named_parameters`` order) replaced by
    ``tensors``, then put the originals back: lets gradcheck, which checks copies of its inputs,
    differentiate a layer with respect to its parameters."""
    slots = []
    for name, _ in module.named_parameters():
        owner = module
        *path, leaf = name.split(".")
        for part in path:
            owner = owner._modules[part]
        slots.append((owner, leaf))
    saved = [owner._parameters[leaf] for owner, leaf in slots]
    try:
        for (owner, leaf), t in zip(slots, tensors):
            owner._parameters[leaf] = t
            object.__setattr__(owner, leaf, t)
        return fn(*args)
    finally:
        for (owner, leaf), p in zip(slots, saved):
            owner._parameters[leaf] = p
            object.__setattr__(owner, leaf, p)


def _msdeformattn_check_cases() -> list[CheckCase]:
    """Gradcheck of nn.MSDeformAttn's input and parameters (tiny dims, float64)."""
    from ..nn.attention import MSDeformAttn

    rng = np.random.default_rng(1)
    shapes, starts = level_layout([(3, 3), (2, 2)])
    S = int(shapes.prod(axis=1).sum())
    layer = MSDeformAttn(d_model=4, n_levels=2, n_heads=2, n_points=2, dtype=np.float64)
    # small random weights so sampling points leave the reference points (off the kinks with
    # probability one; the gradcheck step is far smaller than any distance to a kink)
    for p in layer.parameters():
        p.data = p.data + 0.05 * rng.standard_normal(p.shape)
    query = Tensor(rng.standard_normal((1, 3, 4)))
    ref = Tensor(rng.uniform(0.2, 0.8, (1, 3, 2, 2)))
    feats = Tensor(rng.standard_normal((1, S, 4)), requires_grad=True)
    params = tuple(Tensor(p.data.copy(), requires_grad=True) for p in layer.parameters())
    names = tuple(n for n, _ in layer.named_parameters())

    def msda(feats: Tensor, *ps: Tensor) -> Tensor:
        return call_with_parameters(layer, ps, layer, query, ref, feats, shapes, starts)

    return [CheckCase(msda, (feats, *params), ("input_flatten", *names))]


def _dat_check_cases() -> list[CheckCase]:
    """Gradcheck of nn.DeformableAttention2d's input and parameters (tiny dims, float64)."""
    from ..nn.attention import DeformableAttention2d

    rng = np.random.default_rng(2)
    dat = DeformableAttention2d(2, 2, stride=2, kernel_size=3, q_size=3, dtype=np.float64)
    for p in dat.parameters():
        p.data = p.data + 0.1 * rng.standard_normal(p.shape)
    x = Tensor(rng.standard_normal((1, 2, 3, 3)), requires_grad=True)
    dparams = tuple(Tensor(p.data.copy(), requires_grad=True) for p in dat.parameters())
    dnames = tuple(n for n, _ in dat.named_parameters())

    def dat_fn(x: Tensor, *ps: Tensor) -> Tensor:
        return call_with_parameters(dat, ps, dat, x)[0]

    return [CheckCase(dat_fn, (x, *dparams), ("x", *dnames))]


SPEC13_LEVELS = ((32, 32), (16, 16), (8, 8), (4, 4))


def spec13_inputs(dtype: Any = np.float32, seed: int = 0) -> dict[str, Any]:
    """The SPEC section 13 benchmark inputs: N=1, levels (32,32),(16,16),(8,8),(4,4),
    Lq = S = 1360, M = 8, D = 32, P = 4; locations uniform over the maps, weights softmaxed."""
    rng = np.random.default_rng(seed)
    shapes, starts = level_layout(SPEC13_LEVELS)
    S = int(shapes.prod(axis=1).sum())
    N, Lq, M, D, L, P = 1, S, 8, 32, len(SPEC13_LEVELS), 4
    logits = rng.standard_normal((N, Lq, M, L * P))
    w = np.exp(logits - logits.max(-1, keepdims=True))
    w /= w.sum(-1, keepdims=True)
    return {
        "value": rng.standard_normal((N, S, M, D)).astype(dtype),
        "spatial_shapes": shapes,
        "level_start_index": starts,
        "sampling_locations": rng.uniform(0, 1, (N, Lq, M, L, P, 2)).astype(dtype),
        "attention_weights": w.reshape(N, Lq, M, L, P).astype(dtype),
        "grad_output": rng.standard_normal((N, Lq, M * D)).astype(dtype),
    }


def torch_ms_deform_attn_core(
    value: Any, spatial_shapes: Any, sampling_locations: Any, attention_weights: Any
) -> Any:
    """Deformable-DETR's pure-PyTorch formulation (``ms_deform_attn_core_pytorch``): one
    ``grid_sample`` per level, then the weighted sum. Torch tensors in and out; for benchmarks."""
    import torch
    import torch.nn.functional as F

    N, S, M, D = value.shape
    _, Lq, _, L, P, _ = sampling_locations.shape
    sizes = [int(h) * int(w) for h, w in spatial_shapes]
    value_list = value.split(sizes, dim=1)
    grids = 2 * sampling_locations - 1
    sampled = []
    for lid, (h, w) in enumerate(spatial_shapes):
        value_l = value_list[lid].flatten(2).transpose(1, 2).reshape(N * M, D, int(h), int(w))
        grid_l = grids[:, :, :, lid].transpose(1, 2).flatten(0, 1)  # (N*M, Lq, P, 2)
        sampled.append(
            F.grid_sample(
                value_l, grid_l, mode="bilinear", padding_mode="zeros", align_corners=False
            )
        )
    weights = attention_weights.transpose(1, 2).reshape(N * M, 1, Lq, L * P)
    out = (torch.stack(sampled, dim=-2).flatten(-2) * weights).sum(-1).view(N, M * D, Lq)
    return out.transpose(1, 2).contiguous()


def _bench_case(device: str) -> BenchCase | None:
    data = spec13_inputs(np.float32)
    names = ("value", "sampling_locations", "attention_weights", "grad_output")
    placed = bench_device(device, *(data[k] for k in names))
    if placed is None:
        return None
    host = {k: data[k] for k in names}
    data.update(zip(names, placed[0]))
    sync = placed[1]
    shapes, starts, grad = data["spatial_shapes"], data["level_start_index"], data["grad_output"]

    def forward() -> Any:
        return ms_deform_attn_forward(
            data["value"], shapes, starts, data["sampling_locations"], data["attention_weights"]
        )

    def forward_backward() -> Any:
        value = Tensor(data["value"], requires_grad=True)
        loc = Tensor(data["sampling_locations"], requires_grad=True)
        attn = Tensor(data["attention_weights"], requires_grad=True)
        ms_deform_attn(value, shapes, starts, loc, attn).backward(grad)
        return value.grad

    case = BenchCase(
        "N=1, L=4 (32..4), Lq=S=1360, M=8, D=32, P=4",
        forward,
        forward_backward,
        device=device,
        sync=sync,
    )
    tdev = torch_device(device)  # torch on the same device and thread count
    if tdev is None:
        return case
    import torch

    tv, tl, ta, tg = (torch.from_numpy(host[k]).to(tdev) for k in names)
    tshapes = [tuple(int(s) for s in row) for row in shapes]

    def torch_forward() -> Any:
        with torch.no_grad():
            return torch_ms_deform_attn_core(tv, tshapes, tl, ta)

    def torch_forward_backward() -> Any:
        v = tv.clone().requires_grad_(True)
        loc = tl.clone().requires_grad_(True)
        a = ta.clone().requires_grad_(True)
        torch_ms_deform_attn_core(v, tshapes, loc, a).backward(tg)
        return v.grad

    case.torch_forward = torch_forward
    case.torch_forward_backward = torch_forward_backward
    return case


register_op(_OP, check=_check_cases, bench=_bench_case)
register_op("nn.MSDeformAttn", check=_msdeformattn_check_cases)
register_op("nn.DeformableAttention2d", check=_dat_check_cases)
