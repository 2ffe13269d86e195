"""CUDA kernels of ``ms_deform_attn`` (docs/ops/ms_deform_attn.rst), mirroring
``kernels/cpu/attention.py``.

value (N, S, M, D), spatial_shapes (L, 2) int64, level_start_index (L,) int64 (host arrays,
copied to the device once per autograd node through ``cache``), sampling_locations
(N, Lq, M, L, P, 2) as normalized (x, y), attention_weights (N, Lq, M, L, P); output
(N, Lq, M*D). Level l is sampled with the zero-fade rule at y = v*H_l - 0.5, x = u*W_l - 0.5; an
empty level (H_l*W_l = 0) contributes nothing. value is already head-major and channel-contiguous:
row ``r = (n*S + s)*M + m`` holds the D channels of pixel s of head m, so the value of channel d
is ``value[r*D + d]`` and the rows of one head's map are M rows apart.

**Threads (the DCNv4 design).** Each (n, q, m) is served by a group of ``lanes = lanes_for(D)``
consecutive threads of one warp (1 under the simulator). A thread walks the L*P sampling points of
its (n, q, m), computes each point's zero-fade plan once, and applies it to its run of channels
``d = lane, lane + lanes, lane + 2*lanes, lane + 3*lanes`` (RUN = 4 channels, held in registers):
at every load the lanes read consecutive channels of a value row (coalesced). D <= 4*lanes, i.e.
every D up to 128 (Deformable-DETR: 32), is one pass; a larger D takes ceil(D / (4*lanes)) passes
over the points, each computing the plans again.

* forward: threads ``N*Lq*M*lanes``; per point and channel 4 value loads (none for a point whose
  weights are all zero); 4 register accumulators per thread; the output channels are written
  once, coalesced (out is already channels-last).
* backward, one kernel over ``padded(N*Lq*M*lanes)`` threads (whole warps, for the shuffles):
  per point each thread loads its channels' 4 corner values once (none for a point out of
  range; grad_out is loaded once per pass), accumulates its channels' partial d/dA, d/dy, d/dx,
  and (default mode) scatters the value gradient ``(A*w[k]) * grad_out`` into ``grad_value``
  with float atomic adds (consecutive lanes hit consecutive addresses; corners of zero weight
  are skipped). The three partials are
  summed over the lanes with ``lane_sum`` (a fixed butterfly of warp shuffles), and lane 0 writes
  the point's location and weight gradients (one writer: deterministic). Threads past the last
  group compute zeros, skip loads and stores, and still take part in the shuffles.

**Deterministic mode** (``deformnp.use_deterministic_algorithms(True)``): the backward kernel
scatters nothing; instead lane 0 lists, per point, its four contributions e = 4*point + corner:
the key (the destination value row ``(n*S + start_l + pixel)*M + m``, or N*S*M for a corner of
zero weight) and the coefficient A*w[k]. ``scatter.segments`` sorts them by (row, e), and an owner
kernel with one thread per (value row, d) (N*S*M*D threads, consecutive d in consecutive threads)
sums ``coef[e] * grad_out[n, q, m, d]`` over its row's contributions in that order and writes.
No float atomics, so bit-identical across runs; extra memory: three int64 (keys, the sort buffer,
the order) and one float per contribution (E = 4*N*Lq*M*L*P), plus one int64 per value row (the
segment starts).

**Precision.** Plans, accumulators and coefficients are in the data's dtype (``ft =
value.dtype.type``; constants written ``ft(...)``, level sizes cast to ``ft``): a float32 launch
does no float64 arithmetic (``python -m deformnp.cases.ptx --op ms_deform_attn``). The CPU
kernels compute float32 plans for float32 data too, but in another order (and with LLVM's
contractions), so float32 results agree with them to float32 rounding, not bit for bit.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from numba import cuda

from ...determinism import are_deterministic_algorithms_enabled
from ._launch import SIMULATOR, empty, flat, grid, lane_sum, lanes_for, padded, zeros
from .sampling import zero_fade_plan
from .scatter import segments

RUN = 4  # channels per thread and pass, held in registers (_launch.CHANNELS_PER_LANE)

# how the backward kernel treats the value gradient
VALUE_NONE = 0  # not needed
VALUE_ATOMIC = 1  # float atomic adds into grad_value
VALUE_KEYS = 2  # list (key, coefficient) per contribution for the deterministic owner kernel


@cuda.jit(device=True)
def _live(w, cy, cx, ft):
    """Whether a plan has any non-zero coefficient (an out-of-range point has none)."""
    z = ft(0)
    return (
        w[0] != z
        or w[1] != z
        or w[2] != z
        or w[3] != z
        or cy[0] != z
        or cy[1] != z
        or cy[2] != z
        or cy[3] != z
        or cx[0] != z
        or cx[1] != z
        or cx[2] != z
        or cx[3] != z
    )


@cuda.jit(device=True)
def _sample(val, o0, o1, o2, o3, d, a0, a1, a2, a3):
    """a0*val[o0 + d] + ... + a3*val[o3 + d]: one channel of one point."""
    return a0 * val[o0 + d] + a1 * val[o1 + d] + a2 * val[o2 + d] + a3 * val[o3 + d]


@cuda.jit(device=True)
def _channel_backward(val, gval, o0, o1, o2, o3, d, go, A, w, cy, cx, scatter, zero):
    """One channel d of one point: its terms (go * sample_w, go * sample_cy, go * sample_cx) of
    the weight and position gradients; with ``scatter`` also grad_value[corner k, d] +=
    (A*w[k]) * go (atomic; corners of zero weight skipped)."""
    v0 = val[o0 + d]
    v1 = val[o1 + d]
    v2 = val[o2 + d]
    v3 = val[o3 + d]
    if scatter:
        if w[0] != zero:
            cuda.atomic.add(gval, o0 + d, (A * w[0]) * go)
        if w[1] != zero:
            cuda.atomic.add(gval, o1 + d, (A * w[1]) * go)
        if w[2] != zero:
            cuda.atomic.add(gval, o2 + d, (A * w[2]) * go)
        if w[3] != zero:
            cuda.atomic.add(gval, o3 + d, (A * w[3]) * go)
    return (
        go * (w[0] * v0 + w[1] * v1 + w[2] * v2 + w[3] * v3),
        go * (cy[0] * v0 + cy[1] * v1 + cy[2] * v2 + cy[3] * v3),
        go * (cx[0] * v0 + cx[1] * v1 + cx[2] * v2 + cx[3] * v3),
    )


@cuda.jit(cache=not SIMULATOR)
def _forward(val, shapes, starts, loc, attn, out, N, S, M, D, Lq, L, P, lanes, shift):
    """Thread t: lane t % lanes of group (n, q, m) = t // lanes; see the module docstring."""
    ft = val.dtype.type
    zero = ft(0)
    half = ft(0.5)
    total = (N * Lq * M) << shift
    for t in range(cuda.grid(1), total, cuda.gridsize(1)):
        lane = t & (lanes - 1)
        g = t >> shift  # (n*Lq + q)*M + m
        m = g % M
        n = g // (M * Lq)
        for c in range(0, D, RUN * lanes):
            d0 = c + lane
            d1 = d0 + lanes
            d2 = d1 + lanes
            d3 = d2 + lanes
            acc0 = zero
            acc1 = zero
            acc2 = zero
            acc3 = zero
            for l in range(L):
                H = shapes[2 * l]
                W = shapes[2 * l + 1]
                if H * W == 0:
                    continue  # an empty level contributes nothing (and has no pixel to read)
                row = (n * S + starts[l]) * M + m  # value row of the level's pixel 0, head m
                a0 = (g * L + l) * P
                for a in range(a0, a0 + P):
                    y = loc[2 * a + 1] * ft(H) - half
                    x = loc[2 * a] * ft(W) - half
                    idx, w, cy, cx = zero_fade_plan(y, x, H, W, ft)
                    if w[0] == zero and w[1] == zero and w[2] == zero and w[3] == zero:
                        continue  # out of range: nothing to read
                    A = attn[a]
                    w0 = A * w[0]
                    w1 = A * w[1]
                    w2 = A * w[2]
                    w3 = A * w[3]
                    o0 = (row + idx[0] * M) * D
                    o1 = (row + idx[1] * M) * D
                    o2 = (row + idx[2] * M) * D
                    o3 = (row + idx[3] * M) * D
                    acc0 += _sample(val, o0, o1, o2, o3, d0, w0, w1, w2, w3)
                    if d1 < D:
                        acc1 += _sample(val, o0, o1, o2, o3, d1, w0, w1, w2, w3)
                    if d2 < D:
                        acc2 += _sample(val, o0, o1, o2, o3, d2, w0, w1, w2, w3)
                    if d3 < D:
                        acc3 += _sample(val, o0, o1, o2, o3, d3, w0, w1, w2, w3)
            if d0 < D:
                out[g * D + d0] = acc0
            if d1 < D:
                out[g * D + d1] = acc1
            if d2 < D:
                out[g * D + d2] = acc2
            if d3 < D:
                out[g * D + d3] = acc3


@cuda.jit(cache=not SIMULATOR)
def _backward(
    gout,
    val,
    shapes,
    starts,
    loc,
    attn,
    gval,
    keys,
    coef,
    gloc,
    gattn,
    N,
    S,
    M,
    D,
    Lq,
    L,
    P,
    lanes,
    shift,
    total,
    value_mode,
    need_points,
):
    """Thread t < total = padded(N*Lq*M*lanes): lane t % lanes of group t // lanes (idle past the
    last group). value_mode: VALUE_NONE, VALUE_ATOMIC (into gval) or VALUE_KEYS (keys, coef);
    need_points: write gloc and gattn. See the module docstring."""
    ft = val.dtype.type
    zero = ft(0)
    half = ft(0.5)
    groups = N * Lq * M
    n_keys = N * S * M
    scatter = value_mode == VALUE_ATOMIC
    for t in range(cuda.grid(1), total, cuda.gridsize(1)):
        lane = t & (lanes - 1)
        g = t >> shift
        active = g < groups
        if not active:
            g = 0  # an idle thread: computes zeros and reads or writes nothing
        m = g % M
        n = g // (M * Lq)
        for c in range(0, D, RUN * lanes):  # the same passes in every lane (shuffles below)
            d0 = c + lane
            d1 = d0 + lanes
            d2 = d1 + lanes
            d3 = d2 + lanes
            h0 = active and d0 < D
            h1 = active and d1 < D
            h2 = active and d2 < D
            h3 = active and d3 < D
            go0 = gout[g * D + d0] if h0 else zero
            go1 = gout[g * D + d1] if h1 else zero
            go2 = gout[g * D + d2] if h2 else zero
            go3 = gout[g * D + d3] if h3 else zero
            for l in range(L):
                H = shapes[2 * l]
                W = shapes[2 * l + 1]
                row = (n * S + starts[l]) * M + m
                a0 = (g * L + l) * P
                for a in range(a0, a0 + P):
                    y = ft(-2)  # out of range: the plan of an idle thread is all zeros
                    x = ft(-2)
                    A = zero
                    if active:
                        y = loc[2 * a + 1] * ft(H) - half
                        x = loc[2 * a] * ft(W) - half
                        A = attn[a]
                    # an empty level (H*W = 0) gets the all-zero plan too
                    idx, w, cy, cx = zero_fade_plan(y, x, H, W, ft)
                    sa = zero
                    sy = zero
                    sx = zero
                    if _live(w, cy, cx, ft):
                        o0 = (row + idx[0] * M) * D
                        o1 = (row + idx[1] * M) * D
                        o2 = (row + idx[2] * M) * D
                        o3 = (row + idx[3] * M) * D
                        if h0:
                            ta, ty, tx = _channel_backward(
                                val, gval, o0, o1, o2, o3, d0, go0, A, w, cy, cx, scatter, zero
                            )
                            sa += ta
                            sy += ty
                            sx += tx
                        if h1:
                            ta, ty, tx = _channel_backward(
                                val, gval, o0, o1, o2, o3, d1, go1, A, w, cy, cx, scatter, zero
                            )
                            sa += ta
                            sy += ty
                            sx += tx
                        if h2:
                            ta, ty, tx = _channel_backward(
                                val, gval, o0, o1, o2, o3, d2, go2, A, w, cy, cx, scatter, zero
                            )
                            sa += ta
                            sy += ty
                            sx += tx
                        if h3:
                            ta, ty, tx = _channel_backward(
                                val, gval, o0, o1, o2, o3, d3, go3, A, w, cy, cx, scatter, zero
                            )
                            sa += ta
                            sy += ty
                            sx += tx
                    if need_points:
                        # every lane of the warp gets here equally often (whole warps, the same
                        # passes and points in every lane)
                        sa = lane_sum(sa, lanes)
                        sy = lane_sum(sy, lanes)
                        sx = lane_sum(sx, lanes)
                        if active and lane == 0:
                            gx = A * sx * ft(W)
                            gy = A * sy * ft(H)
                            if c == 0:
                                gattn[a] = sa
                                gloc[2 * a] = gx
                                gloc[2 * a + 1] = gy
                            else:  # later passes add their channels (same thread: in order)
                                gattn[a] += sa
                                gloc[2 * a] += gx
                                gloc[2 * a + 1] += gy
                    if value_mode == VALUE_KEYS and c == 0 and active and lane == 0:
                        # unrolled: a tuple indexed in a loop would live in local memory
                        e = 4 * a
                        keys[e] = row + idx[0] * M if w[0] != zero else n_keys
                        keys[e + 1] = row + idx[1] * M if w[1] != zero else n_keys
                        keys[e + 2] = row + idx[2] * M if w[2] != zero else n_keys
                        keys[e + 3] = row + idx[3] * M if w[3] != zero else n_keys
                        coef[e] = A * w[0]
                        coef[e + 1] = A * w[1]
                        coef[e + 2] = A * w[2]
                        coef[e + 3] = A * w[3]


@cuda.jit(cache=not SIMULATOR)
def _value_owner(gout, order, seg, coef, gval, D, LP4):
    """Deterministic value gradient: thread t = (value row r, channel d) sums coef[e] *
    gout[(n, q, m), d] over its row's contributions e (sorted) and writes gval[t]."""
    ft = gval.dtype.type
    for t in range(cuda.grid(1), gval.size, cuda.gridsize(1)):
        d = t % D
        r = t // D
        acc = ft(0)
        for i in range(seg[r], seg[r + 1]):
            e = order[i]
            acc += coef[e] * gout[(e // LP4) * D + d]  # e // (4*L*P) = (n*Lq + q)*M + m
        gval[t] = acc


def _dims(value: Any, loc: Any) -> tuple[int, ...]:
    N, S, M, D = (int(s) for s in value.shape)
    Lq, L, P = int(loc.shape[1]), int(loc.shape[3]), int(loc.shape[4])
    return N, S, M, D, Lq, L, P


def _levels(spatial_shapes: Any, level_start_index: Any, cache: dict | None) -> tuple[Any, Any]:
    """The (host) level arrays on the device, copied once per autograd node through ``cache``."""
    if cache is not None and "levels" in cache:
        return cache["levels"]
    levels = (cuda.to_device(spatial_shapes), cuda.to_device(level_start_index))
    if cache is not None:
        cache["levels"] = levels
    return levels


def _lanes(D: int) -> tuple[int, int]:
    """(lanes, log2(lanes)) for D channels."""
    lanes = lanes_for(D)
    return lanes, lanes.bit_length() - 1


def ms_deform_attn_forward(
    value: Any,
    spatial_shapes: Any,
    level_start_index: Any,
    sampling_locations: Any,
    attention_weights: Any,
    cache: dict | None = None,
) -> Any:
    """out (N, Lq, M*D); spatial_shapes and level_start_index are validated host int64 arrays.
    ``cache``: a dict shared with the backward of the same autograd node (the device copies of
    the level arrays are kept there)."""
    N, S, M, D, Lq, L, P = _dims(value, sampling_locations)
    if not (N * Lq * M * D and L and P):
        return zeros((N, Lq, M * D), value.dtype)
    out = empty((N, Lq, M * D), value.dtype)  # the kernel writes every element
    shapes, starts = _levels(spatial_shapes, level_start_index, cache)
    lanes, shift = _lanes(D)
    _forward[grid(N * Lq * M * lanes)](
        flat(value),
        flat(shapes),
        flat(starts),
        flat(sampling_locations),
        flat(attention_weights),
        flat(out),
        N,
        S,
        M,
        D,
        Lq,
        L,
        P,
        lanes,
        shift,
    )
    return out


def ms_deform_attn_backward(
    grad_out: Any,
    value: Any,
    spatial_shapes: Any,
    level_start_index: Any,
    sampling_locations: Any,
    attention_weights: Any,
    needs: tuple,
    cache: dict | None = None,
) -> tuple:
    """(grad_value, grad_sampling_locations, grad_attention_weights), None where ``needs`` is
    False. The value gradient uses atomics, or the sorted owner-computes scatter when
    ``are_deterministic_algorithms_enabled()``; the others have one writer per element."""
    N, S, M, D, Lq, L, P = _dims(value, sampling_locations)
    dtype = value.dtype
    points = N * Lq * M * L * P
    need_value = bool(needs[0]) and value.size > 0 and points > 0
    need_points = bool(needs[1] or needs[2]) and points > 0
    deterministic = need_value and are_deterministic_algorithms_enabled()
    run = D > 0 and (need_value or need_points)

    g_val = g_loc = g_attn = None
    if needs[0]:
        # the owner kernel writes every element; atomics add into zeros
        g_val = empty(value.shape, dtype) if deterministic and run else zeros(value.shape, dtype)
    if needs[1] or needs[2]:
        # the kernel writes every point's gradients (D = 0: they are zero)
        alloc = empty if run and need_points else zeros
        g_loc = alloc(sampling_locations.shape, dtype)
        g_attn = alloc(attention_weights.shape, dtype)
    if not run:
        return g_val, g_loc if needs[1] else None, g_attn if needs[2] else None

    shapes, starts = _levels(spatial_shapes, level_start_index, cache)
    lanes, shift = _lanes(D)
    total = padded(N * Lq * M * lanes)
    gout = flat(grad_out)
    if deterministic:
        mode = VALUE_KEYS
        keys = empty((4 * points,), np.int64)
        coef = empty((4 * points,), dtype)
    else:
        mode = VALUE_ATOMIC if need_value else VALUE_NONE
        keys, coef = flat(starts), gout  # placeholders of the right types: never touched
    # arrays a launch does not write are passed as placeholders of the right type (grad_out)
    _backward[grid(total)](
        gout,
        flat(value),
        flat(shapes),
        flat(starts),
        flat(sampling_locations),
        flat(attention_weights),
        flat(g_val) if mode == VALUE_ATOMIC else gout,
        keys,
        coef,
        flat(g_loc) if need_points else gout,
        flat(g_attn) if need_points else gout,
        N,
        S,
        M,
        D,
        Lq,
        L,
        P,
        lanes,
        shift,
        total,
        mode,
        need_points,
    )
    if deterministic:
        order, seg = segments(keys, N * S * M)
        _value_owner[grid(value.size)](gout, order, seg, coef, flat(g_val), D, 4 * L * P)
    return g_val, g_loc if needs[1] else None, g_attn if needs[2] else None
