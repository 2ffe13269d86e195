"""CPU kernels of multi-scale deformable attention (SPEC section 9).

Layouts (Deformable-DETR's): value (N, S, M, D), spatial_shapes (L, 2) as (H_l, W_l),
level_start_index (L,), sampling_locations (N, Lq, M, L, P, 2) as normalized (u, v) = (x, y),
attention_weights (N, Lq, M, L, P), output (N, Lq, M*D). All arrays C-contiguous, validated by
``deformnp.ops.attention``.

Sampling point p of head m at level l: y = v*H_l - 0.5, x = u*W_l - 0.5, zero-fade rule
(SPEC section 4). The plan of a point (four corner indices and weights) is computed once and
reused across the D channels of the head; in the (N, S, M, D) layout those channels are
contiguous, so each corner is a contiguous run of D values. Nothing of size (N, M, D, Lq, L, P)
is ever materialised.

Parallelism and determinism:

* forward: ``prange`` over (n, q); each iteration writes the row out[n, q, :] only.
* backward: ``prange`` over tasks (n, m, chunk of queries). A task owns the gradients of the
  locations and weights of its queries (owner computes), and scatters into its own copy of the
  (n, :, m, :) slice of grad_value: chunk 0 writes grad_value itself, chunk c >= 1 a buffer
  ``grad_value_extra[c - 1]``; the buffers are added to grad_value afterwards in chunk order.
  The number of chunks depends on the shapes only, never on the thread count, so gradients are
  bit-identical with any number of threads.

Index arithmetic is 64-bit throughout. Flat offsets into value / grad_value / grad_out are
converted to uint64 before indexing: they are never negative, and unsigned indices spare Numba's
negative-index wrap-around test in the inner channel loops, which lets LLVM vectorize them
(about 2x faster).

Precision: plans are float64 (coordinates are computed in float64 from the stored locations);
channel sums run in the data dtype, as in the anchors: the forward accumulates each output row,
the backward the per-corner channel sums t_k = sum_d g[d] V[idx[k], d] (``fastmath``
reassociation lets these reductions vectorize; their order is fixed by the compiled code, so it
does not depend on threads) and scatters into grad_value.
"""

from __future__ import annotations

import numpy as np
from numba import njit, prange, uint64

from .bilinear import zero_fade_plan


@njit(parallel=True, cache=True)
def ms_deform_attn_forward(
    value, spatial_shapes, level_start_index, sampling_locations, attention_weights, out
):
    """out[n, q, m*D + d] = sum_{l,p} A * zero_fade(V_l[n, :, :, m, d], v*H_l - 0.5, u*W_l - 0.5)."""
    N, S, M, D = value.shape
    Lq = sampling_locations.shape[1]
    L = sampling_locations.shape[3]
    P = sampling_locations.shape[4]
    MD = M * D
    dt = value.dtype
    v = value.reshape(-1)
    o = out.reshape(-1)
    for nq in prange(N * Lq):
        n = nq // Lq
        q = nq - n * Lq
        acc = np.empty(D, dt)
        for m in range(M):
            for d in range(D):
                acc[d] = 0.0
            for l in range(L):
                H = spatial_shapes[l, 0]
                W = spatial_shapes[l, 1]
                if H <= 0 or W <= 0:
                    continue
                # flat offset of spatial index 0 of level l, head m, channel 0
                base = (n * S + level_start_index[l]) * MD + m * D
                for p in range(P):
                    u = sampling_locations[n, q, m, l, p, 0]
                    vv = sampling_locations[n, q, m, l, p, 1]
                    a = attention_weights[n, q, m, l, p]
                    y = vv * H - 0.5
                    x = u * W - 0.5
                    idx, w, cy, cx = zero_fade_plan(y, x, H, W)
                    if w[0] == 0.0 and w[1] == 0.0 and w[2] == 0.0 and w[3] == 0.0:
                        continue  # out of range (or on the fading edge): contributes nothing
                    a0 = dt.type(a * w[0])
                    a1 = dt.type(a * w[1])
                    a2 = dt.type(a * w[2])
                    a3 = dt.type(a * w[3])
                    o0 = uint64(base + idx[0] * MD)
                    o1 = uint64(base + idx[1] * MD)
                    o2 = uint64(base + idx[2] * MD)
                    o3 = uint64(base + idx[3] * MD)
                    for d in range(D):
                        ud = uint64(d)
                        acc[ud] += (
                            a0 * v[o0 + ud] + a1 * v[o1 + ud] + a2 * v[o2 + ud] + a3 * v[o3 + ud]
                        )
            row = uint64((n * Lq + q) * MD + m * D)
            for d in range(D):
                o[row + uint64(d)] = acc[d]
    return out


@njit(parallel=True, cache=True, fastmath={"reassoc", "contract"})
def ms_deform_attn_backward(
    grad_out,
    value,
    spatial_shapes,
    level_start_index,
    sampling_locations,
    attention_weights,
    n_chunks,
    need_value,
    need_loc_attn,
    grad_value,
    grad_value_extra,
    grad_sampling_locations,
    grad_attention_weights,
):
    """Gradients of ``ms_deform_attn_forward`` for value, sampling_locations, attention_weights.

    ``grad_value`` (N, S, M, D) and ``grad_value_extra`` (n_chunks - 1, N*S*M*D) must be zeroed
    by the caller, and so must the gradients of locations and weights. With ``need_value`` False
    grad_value may be an empty array; with ``need_loc_attn`` False the other two.

    For a point with plan (idx, w, cy, cx), attention weight a and incoming gradient g[d], with
    the per-corner channel sums t_k = sum_d g[d] * V[idx[k], d]:

        grad_A = sum_k w[k] t_k
        grad_u = a * W_l * sum_k cx[k] t_k          (x = u*W_l - 0.5)
        grad_v = a * H_l * sum_k cy[k] t_k          (y = v*H_l - 0.5)
        grad_V[idx[k], d] += a * w[k] * g[d]
    """
    N, S, M, D = value.shape
    Lq = sampling_locations.shape[1]
    L = sampling_locations.shape[3]
    P = sampling_locations.shape[4]
    MD = M * D
    dt = value.dtype
    v = value.reshape(-1)
    g = grad_out.reshape(-1)
    gv0 = grad_value.reshape(-1)
    chunk = (Lq + n_chunks - 1) // n_chunks
    for task in prange(N * M * n_chunks):
        c = task % n_chunks
        nm = task // n_chunks
        n = nm // M
        m = nm - n * M
        q_begin = c * chunk
        q_end = min(Lq, q_begin + chunk)
        gv = gv0 if c == 0 else grad_value_extra[c - 1]
        gq = np.empty(D, dt)  # grad_out[n, q, m*D : (m+1)*D]
        for q in range(q_begin, q_end):
            go = uint64((n * Lq + q) * MD + m * D)
            for d in range(D):
                gq[d] = g[go + uint64(d)]
            for l in range(L):
                H = spatial_shapes[l, 0]
                W = spatial_shapes[l, 1]
                if H <= 0 or W <= 0:
                    continue
                base = (n * S + level_start_index[l]) * MD + m * D
                for p in range(P):
                    u = sampling_locations[n, q, m, l, p, 0]
                    vv = sampling_locations[n, q, m, l, p, 1]
                    a = attention_weights[n, q, m, l, p]
                    y = vv * H - 0.5
                    x = u * W - 0.5
                    idx, w, cy, cx = zero_fade_plan(y, x, H, W)
                    if need_loc_attn:
                        o0 = uint64(base + idx[0] * MD)
                        o1 = uint64(base + idx[1] * MD)
                        o2 = uint64(base + idx[2] * MD)
                        o3 = uint64(base + idx[3] * MD)
                        t0 = dt.type(0.0)
                        t1 = dt.type(0.0)
                        t2 = dt.type(0.0)
                        t3 = dt.type(0.0)
                        for d in range(D):
                            ud = uint64(d)
                            gd = gq[ud]
                            t0 += gd * v[o0 + ud]
                            t1 += gd * v[o1 + ud]
                            t2 += gd * v[o2 + ud]
                            t3 += gd * v[o3 + ud]
                        grad_attention_weights[n, q, m, l, p] = (
                            w[0] * t0 + w[1] * t1 + w[2] * t2 + w[3] * t3
                        )
                        grad_sampling_locations[n, q, m, l, p, 0] = (
                            a * (cx[0] * t0 + cx[1] * t1 + cx[2] * t2 + cx[3] * t3) * W
                        )
                        grad_sampling_locations[n, q, m, l, p, 1] = (
                            a * (cy[0] * t0 + cy[1] * t1 + cy[2] * t2 + cy[3] * t3) * H
                        )
                    if need_value:
                        # corners with zero weight (masked, or the point out of range) get nothing
                        for k in range(4):
                            if w[k] != 0.0:
                                aw = dt.type(a * w[k])
                                ok = uint64(base + idx[k] * MD)
                                for d in range(D):
                                    ud = uint64(d)
                                    gv[ok + ud] += aw * gq[ud]
    if need_value and n_chunks > 1:
        # fixed-order reduction of the per-chunk copies: grad_value += extra[0] + extra[1] + ...
        size = gv0.shape[0]
        for i in prange(size):
            s = gv0[i]
            for c in range(n_chunks - 1):
                s += grad_value_extra[c, i]
            gv0[i] = s
    return grad_value
