"""CUDA kernels of ``ms_deform_attn`` (SPEC section 9), mirroring ``kernels/cpu/attention.py``.

value (N, S, M, D), spatial_shapes (L, 2) int64, level_start_index (L,) int64 (host arrays,
copied to the device here),
sampling_locations (N, Lq, M, L, P, 2) as normalized (x, y), attention_weights (N, Lq, M, L, P);
output (N, Lq, M*D). Level l is sampled with the zero-fade rule at y = v*H_l - 0.5,
x = u*W_l - 0.5; the pixels of a map are M*D elements apart in ``value``.

Forward: one thread per (n, q, m, d). Backward: the value gradient is scattered with atomic adds
from one thread per (n, q, m, d) (not bit-reproducible); the location and weight gradients have
one thread per (n, q, m, l, p) summing over d in a fixed order (deterministic).
"""

from __future__ import annotations

from typing import Any

from numba import cuda

from ._launch import SIMULATOR, empty, flat, grid, zeros
from .sampling import zero_fade_plan


@cuda.jit(device=True)
def strided_value(v, base, stride, idx, w):
    """sum_k w[k] * v[base + idx[k] * stride]."""
    return (
        w[0] * v[base + idx[0] * stride]
        + w[1] * v[base + idx[1] * stride]
        + w[2] * v[base + idx[2] * stride]
        + w[3] * v[base + idx[3] * stride]
    )


@cuda.jit(cache=not SIMULATOR)
def _forward(val, shapes, starts, loc, attn, out, N, S, M, D, Lq, L, P):
    total = N * Lq * M * D
    for t in range(cuda.grid(1), total, cuda.gridsize(1)):
        d = t % D
        m = (t // D) % M
        q = (t // (D * M)) % Lq
        n = t // (D * M * Lq)
        acc = 0.0
        for l in range(L):
            H = shapes[2 * l]
            W = shapes[2 * l + 1]
            if H * W == 0:
                continue  # an empty level contributes nothing (and has no pixel to read)
            base = ((n * S + starts[l]) * M + m) * D + d
            for p in range(P):
                a = (((n * Lq + q) * M + m) * L + l) * P + p
                y = loc[2 * a + 1] * H - 0.5
                x = loc[2 * a] * W - 0.5
                idx, w, cy, cx = zero_fade_plan(y, x, H, W)
                acc += attn[a] * strided_value(val, base, M * D, idx, w)
        out[t] = acc


@cuda.jit(cache=not SIMULATOR)
def _backward_value(gout, shapes, starts, loc, attn, gval, N, S, M, D, Lq, L, P):
    total = N * Lq * M * D
    for t in range(cuda.grid(1), total, cuda.gridsize(1)):
        d = t % D
        m = (t // D) % M
        q = (t // (D * M)) % Lq
        n = t // (D * M * Lq)
        g = gout[t]
        for l in range(L):
            H = shapes[2 * l]
            W = shapes[2 * l + 1]
            if H * W == 0:
                continue
            base = ((n * S + starts[l]) * M + m) * D + d
            for p in range(P):
                a = (((n * Lq + q) * M + m) * L + l) * P + p
                idx, w, cy, cx = zero_fade_plan(
                    loc[2 * a + 1] * H - 0.5, loc[2 * a] * W - 0.5, H, W
                )
                for k in range(4):
                    if w[k] != 0.0:
                        cuda.atomic.add(gval, base + idx[k] * M * D, attn[a] * w[k] * g)


@cuda.jit(cache=not SIMULATOR)
def _backward_points(gout, val, shapes, starts, loc, attn, gloc, gattn, N, S, M, D, Lq, L, P):
    total = N * Lq * M * L * P
    for a in range(cuda.grid(1), total, cuda.gridsize(1)):
        l = (a // P) % L
        m = (a // (P * L)) % M
        q = (a // (P * L * M)) % Lq
        n = a // (P * L * M * Lq)
        H = shapes[2 * l]
        W = shapes[2 * l + 1]
        if H * W == 0:
            gattn[a] = 0.0
            gloc[2 * a] = 0.0
            gloc[2 * a + 1] = 0.0
            continue
        idx, w, cy, cx = zero_fade_plan(loc[2 * a + 1] * H - 0.5, loc[2 * a] * W - 0.5, H, W)
        ga = 0.0
        gy = 0.0
        gx = 0.0
        for d in range(D):
            base = ((n * S + starts[l]) * M + m) * D + d
            g = gout[((n * Lq + q) * M + m) * D + d]
            ga += g * strided_value(val, base, M * D, idx, w)
            gy += g * strided_value(val, base, M * D, idx, cy)
            gx += g * strided_value(val, base, M * D, idx, cx)
        gattn[a] = ga
        gloc[2 * a] = attn[a] * gx * W
        gloc[2 * a + 1] = attn[a] * gy * H


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
    out = empty((N, Lq, M * D), value.dtype)
    if out.size and L and P:
        shapes, starts = _levels(spatial_shapes, level_start_index, cache)
        _forward[grid(out.size)](
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
        )
    elif out.size:
        out = zeros(out.shape, value.dtype)
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
    False."""
    N, S, M, D, Lq, L, P = _dims(value, sampling_locations)
    g_val = zeros(value.shape, value.dtype) if needs[0] else None
    g_loc = zeros(sampling_locations.shape, value.dtype)
    g_attn = zeros(attention_weights.shape, value.dtype)
    if not (L and P):
        return g_val, g_loc if needs[1] else None, g_attn if needs[2] else None
    shapes, starts = _levels(spatial_shapes, level_start_index, cache)
    args = (flat(shapes), flat(starts), flat(sampling_locations), flat(attention_weights))
    if needs[0] and grad_out.size:
        _backward_value[grid(grad_out.size)](
            flat(grad_out), *args, flat(g_val), N, S, M, D, Lq, L, P
        )
    if (needs[1] or needs[2]) and g_attn.size and D:
        _backward_points[grid(g_attn.size)](
            flat(grad_out), flat(value), *args, flat(g_loc), flat(g_attn), N, S, M, D, Lq, L, P
        )
    return g_val, g_loc if needs[1] else None, g_attn if needs[2] else None
