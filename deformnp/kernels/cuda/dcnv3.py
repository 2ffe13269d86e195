"""CUDA kernels of DCNv3 (``deformnp/ops/dcnv3.py``), mirroring ``kernels/cpu/dcnv3.py``.

input (N, H, W, C) with C = G*D, offset (N, Ho, Wo, G*P*2) as (x, y) pairs, mask
(N, Ho, Wo, G*P), output (N, Ho, Wo, C); the sampling point of ``kernels/cpu/dcnv3.py`` and the
zero-fade rule (``rules.zero_fade_plan``). This is the gather of ``kernels/cuda/attention.py``
with one level, the output pixels as queries and the groups as heads, and the same design:

* **Threads.** Each (n, output pixel, g) is served by ``lanes = lanes_for(D)`` consecutive
  threads of one warp (1 under the simulator); a thread computes each point's plan once and
  applies it to its channels ``d = lane, lane + lanes, ...`` (RUN = 4 per pass, in registers),
  so the lanes read consecutive channels of an input pixel (coalesced).
* **Backward**, one kernel over ``padded(N*Ho*Wo*G*lanes)`` threads: per point each thread
  accumulates its channels' partial mask and position gradients, summed over the lanes by
  ``lane_sum`` (a fixed butterfly), and lane 0 writes them (one writer). The input gradient is
  scattered with float atomic adds (default), or, in deterministic mode
  (``deformnp.use_deterministic_algorithms(True)``), lane 0 lists each point's four
  contributions (key = the destination (input pixel, group) ``(n*H*W + pixel)*G + g``, or
  N*H*W*G for a corner of zero weight; coefficient mask*w[k]), ``scatter.segments`` sorts them,
  and an owner kernel with one thread per input element sums them in that order: bit-identical
  across runs.

**Precision.** Plans, accumulators and coefficients are in the data's dtype (``ft =
input.dtype.type``; constants ``ft(...)``; ``offset_scale`` is passed as an ``ft`` scalar): a
float32 launch does no float64 arithmetic.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from numba import cuda

from ...determinism import are_deterministic_algorithms_enabled
from ._launch import SIMULATOR, empty, flat, grid, lane_sum, lanes_for, padded, zeros
from .attention import _channel_backward, _sample, _value_owner
from .sampling import zero_fade_plan
from .scatter import segments

RUN = 4  # channels per thread and pass

VALUE_NONE = 0  # input gradient not needed
VALUE_ATOMIC = 1  # float atomic adds into grad_input
VALUE_KEYS = 2  # (key, coefficient) per contribution, for the deterministic owner kernel


@cuda.jit(device=True)
def _location(off, q, oy, ox, p, kh, rc, center, sh, sw, pad_y, pad_x, dh, dw, hy, hx, scale):
    """(y, x) of point p (offset pair q) at output pixel (oy, ox), in the data's type."""
    ft = off.dtype.type
    k = p + 1 if (rc != 0 and p >= center) else p
    j = k // kh
    i = k - j * kh
    y = ft(hy + oy * sh - pad_y) + (ft(i * dh - hy) + off[2 * q + 1]) * scale
    x = ft(hx + ox * sw - pad_x) + (ft(j * dw - hx) + off[2 * q]) * scale
    return y, x


@cuda.jit(cache=not SIMULATOR)
def _forward(
    val, off, msk, out, N, H, W, G, D, Ho, Wo, kh, kw, sh, sw, pad_y, pad_x, dh, dw, scale, rc,
    lanes, shift,
):  # fmt: skip
    """Thread t: lane t % lanes of group (n, pixel, g) = t // lanes."""
    ft = val.dtype.type
    zero = ft(0)
    P = kh * kw - rc
    center = (kh * kw - 1) // 2
    hy = (dh * (kh - 1)) // 2
    hx = (dw * (kw - 1)) // 2
    HW = H * W
    L = Ho * Wo
    total = (N * L * G) << shift
    for t in range(cuda.grid(1), total, cuda.gridsize(1)):
        lane = t & (lanes - 1)
        gr = t >> shift  # (n*L + r)*G + g
        g = gr % G
        nr = gr // G
        n = nr // L
        r = nr - n * L
        oy = r // Wo
        ox = r - oy * Wo
        for c in range(0, D, RUN * lanes):
            d0 = c + lane
            d1 = d0 + lanes
            d2 = d1 + lanes
            d3 = d2 + lanes
            acc0 = zero
            acc1 = zero
            acc2 = zero
            acc3 = zero
            for p in range(P):
                q = gr * P + p
                y, x = _location(
                    off, q, oy, ox, p, kh, rc, center, sh, sw, pad_y, pad_x, dh, dw, hy, hx,
                    scale,
                )  # fmt: skip
                idx, w, cy, cx = zero_fade_plan(y, x, H, W, ft)
                if w[0] == zero and w[1] == zero and w[2] == zero and w[3] == zero:
                    continue
                A = msk[q]
                w0 = A * w[0]
                w1 = A * w[1]
                w2 = A * w[2]
                w3 = A * w[3]
                o0 = ((n * HW + idx[0]) * G + g) * D
                o1 = ((n * HW + idx[1]) * G + g) * D
                o2 = ((n * HW + idx[2]) * G + g) * D
                o3 = ((n * HW + idx[3]) * G + g) * D
                acc0 += _sample(val, o0, o1, o2, o3, d0, w0, w1, w2, w3)
                if d1 < D:
                    acc1 += _sample(val, o0, o1, o2, o3, d1, w0, w1, w2, w3)
                if d2 < D:
                    acc2 += _sample(val, o0, o1, o2, o3, d2, w0, w1, w2, w3)
                if d3 < D:
                    acc3 += _sample(val, o0, o1, o2, o3, d3, w0, w1, w2, w3)
            if d0 < D:
                out[gr * D + d0] = acc0
            if d1 < D:
                out[gr * D + d1] = acc1
            if d2 < D:
                out[gr * D + d2] = acc2
            if d3 < D:
                out[gr * D + d3] = acc3


@cuda.jit(cache=not SIMULATOR)
def _backward(
    gout, val, off, msk, gval, keys, coef, goff, gmsk, N, H, W, G, D, Ho, Wo, kh, kw, sh, sw,
    pad_y, pad_x, dh, dw, scale, rc, lanes, shift, total, value_mode, need_points,
):  # fmt: skip
    """Thread t < total = padded(N*Ho*Wo*G*lanes): lane t % lanes of group t // lanes (idle
    past the last group)."""
    ft = val.dtype.type
    zero = ft(0)
    P = kh * kw - rc
    center = (kh * kw - 1) // 2
    hy = (dh * (kh - 1)) // 2
    hx = (dw * (kw - 1)) // 2
    HW = H * W
    L = Ho * Wo
    groups = N * L * G
    n_keys = N * HW * G
    scatter = value_mode == VALUE_ATOMIC
    for t in range(cuda.grid(1), total, cuda.gridsize(1)):
        lane = t & (lanes - 1)
        gr = t >> shift
        active = gr < groups
        if not active:
            gr = 0  # an idle thread: computes zeros and reads or writes nothing
        g = gr % G
        nr = gr // G
        n = nr // L
        r = nr - n * L
        oy = r // Wo
        ox = r - oy * Wo
        for c in range(0, D, RUN * lanes):  # the same passes in every lane (shuffles below)
            d0 = c + lane
            d1 = d0 + lanes
            d2 = d1 + lanes
            d3 = d2 + lanes
            h0 = active and d0 < D
            h1 = active and d1 < D
            h2 = active and d2 < D
            h3 = active and d3 < D
            go0 = gout[gr * D + d0] if h0 else zero
            go1 = gout[gr * D + d1] if h1 else zero
            go2 = gout[gr * D + d2] if h2 else zero
            go3 = gout[gr * D + d3] if h3 else zero
            for p in range(P):
                q = gr * P + p
                y = ft(-2)  # out of range: the plan of an idle thread is all zeros
                x = ft(-2)
                A = zero
                if active:
                    y, x = _location(
                        off, q, oy, ox, p, kh, rc, center, sh, sw, pad_y, pad_x, dh, dw, hy,
                        hx, scale,
                    )  # fmt: skip
                    A = msk[q]
                idx, w, cy, cx = zero_fade_plan(y, x, H, W, ft)
                sa = zero
                sy = zero
                sx = zero
                live = w[0] != zero or w[1] != zero or w[2] != zero or w[3] != zero
                live = live or cy[0] != zero or cy[1] != zero or cy[2] != zero or cy[3] != zero
                live = live or cx[0] != zero or cx[1] != zero or cx[2] != zero or cx[3] != zero
                u0 = live and h0
                u1 = live and h1
                u2 = live and h2
                u3 = live and h3
                o0 = ((n * HW + idx[0]) * G + g) * D
                o1 = ((n * HW + idx[1]) * G + g) * D
                o2 = ((n * HW + idx[2]) * G + g) * D
                o3 = ((n * HW + idx[3]) * G + g) * D
                if u0:
                    ta, ty, tx = _channel_backward(
                        val, gval, o0, o1, o2, o3, d0, go0, A, w, cy, cx, scatter, zero
                    )
                    sa += ta
                    sy += ty
                    sx += tx
                if u1:
                    ta, ty, tx = _channel_backward(
                        val, gval, o0, o1, o2, o3, d1, go1, A, w, cy, cx, scatter, zero
                    )
                    sa += ta
                    sy += ty
                    sx += tx
                if u2:
                    ta, ty, tx = _channel_backward(
                        val, gval, o0, o1, o2, o3, d2, go2, A, w, cy, cx, scatter, zero
                    )
                    sa += ta
                    sy += ty
                    sx += tx
                if u3:
                    ta, ty, tx = _channel_backward(
                        val, gval, o0, o1, o2, o3, d3, go3, A, w, cy, cx, scatter, zero
                    )
                    sa += ta
                    sy += ty
                    sx += tx
                if need_points:
                    sa = lane_sum(sa, lanes)
                    sy = lane_sum(sy, lanes)
                    sx = lane_sum(sx, lanes)
                    if active and lane == 0:
                        gx = A * sx * scale
                        gy = A * sy * scale
                        if c == 0:
                            gmsk[q] = sa
                            goff[2 * q] = gx
                            goff[2 * q + 1] = gy
                        else:  # later passes add their channels (same thread: in order)
                            gmsk[q] += sa
                            goff[2 * q] += gx
                            goff[2 * q + 1] += gy
                if value_mode == VALUE_KEYS and c == 0 and active and lane == 0:
                    e = 4 * q
                    keys[e] = (n * HW + idx[0]) * G + g if w[0] != zero else n_keys
                    keys[e + 1] = (n * HW + idx[1]) * G + g if w[1] != zero else n_keys
                    keys[e + 2] = (n * HW + idx[2]) * G + g if w[2] != zero else n_keys
                    keys[e + 3] = (n * HW + idx[3]) * G + g if w[3] != zero else n_keys
                    coef[e] = A * w[0]
                    coef[e + 1] = A * w[1]
                    coef[e + 2] = A * w[2]
                    coef[e + 3] = A * w[3]


def _lanes(D: int) -> tuple[int, int]:
    lanes = lanes_for(D)
    return lanes, lanes.bit_length() - 1


def _params(input: Any, offset: Any, geo: tuple) -> tuple:
    """The launch's integer and scalar arguments after the arrays (offset_scale as ``ft``)."""
    kh, kw, sh, sw, pad_y, pad_x, dh, dw, G, D, scale, rc = geo
    N, H, W, _ = (int(s) for s in input.shape)
    Ho, Wo = int(offset.shape[1]), int(offset.shape[2])
    ft = np.dtype(input.dtype).type
    return (
        N, H, W, int(G), int(D), Ho, Wo, int(kh), int(kw), int(sh), int(sw), int(pad_y),
        int(pad_x), int(dh), int(dw), ft(scale), int(rc),
    )  # fmt: skip


def dcnv3_forward(
    input, offset, mask, kernel_h, kernel_w, stride_h, stride_w, pad_y, pad_x,
    dilation_h, dilation_w, group, group_channels, offset_scale, remove_center,
):  # fmt: skip
    """out (N, Ho, Wo, C) on the device."""
    geo = (kernel_h, kernel_w, stride_h, stride_w, pad_y, pad_x, dilation_h, dilation_w, group,
           group_channels, offset_scale, remove_center)  # fmt: skip
    N, H, W, C = (int(s) for s in input.shape)
    Ho, Wo = int(offset.shape[1]), int(offset.shape[2])
    if N * Ho * Wo * C == 0:
        return zeros((N, Ho, Wo, C), input.dtype)
    out = empty((N, Ho, Wo, C), input.dtype)  # the kernel writes every element
    lanes, shift = _lanes(int(group_channels))
    _forward[grid(N * Ho * Wo * int(group) * lanes)](
        flat(input), flat(offset), flat(mask), flat(out), *_params(input, offset, geo), lanes,
        shift,
    )  # fmt: skip
    return out


def dcnv3_backward(
    grad_out, input, offset, mask, kernel_h, kernel_w, stride_h, stride_w, pad_y, pad_x,
    dilation_h, dilation_w, group, group_channels, offset_scale, remove_center, needs,
):  # fmt: skip
    """(grad_input, grad_offset, grad_mask), None where ``needs`` is False. The input gradient
    uses atomics, or the sorted owner-computes scatter when
    ``are_deterministic_algorithms_enabled()``; the others have one writer per element."""
    geo = (kernel_h, kernel_w, stride_h, stride_w, pad_y, pad_x, dilation_h, dilation_w, group,
           group_channels, offset_scale, remove_center)  # fmt: skip
    N, H, W, C = (int(s) for s in input.shape)
    Ho, Wo = int(offset.shape[1]), int(offset.shape[2])
    G, D = int(group), int(group_channels)
    dtype = input.dtype
    points = int(mask.size)
    need_input = bool(needs[0]) and input.size > 0 and points > 0
    need_points = bool(needs[1] or needs[2]) and points > 0 and input.size > 0
    deterministic = need_input and are_deterministic_algorithms_enabled()
    run = need_input or need_points

    g_in = g_off = g_msk = None
    if needs[0]:
        g_in = empty(input.shape, dtype) if deterministic else zeros(input.shape, dtype)
    if needs[1] or needs[2]:
        alloc = empty if need_points else zeros
        g_off = alloc(offset.shape, dtype)
        g_msk = alloc(mask.shape, dtype)
    if not run:
        return g_in, g_off if needs[1] else None, g_msk if needs[2] else None

    lanes, shift = _lanes(D)
    total = padded(N * Ho * Wo * G * lanes)
    gout = flat(grad_out)
    if deterministic:
        mode = VALUE_KEYS
        keys = empty((4 * points,), np.int64)
        coef = empty((4 * points,), dtype)
    else:
        mode = VALUE_ATOMIC if need_input else VALUE_NONE
        keys, coef = empty((1,), np.int64), gout  # placeholders of the right types
    _backward[grid(total)](
        gout, flat(input), flat(offset), flat(mask),
        flat(g_in) if mode == VALUE_ATOMIC else gout, keys, coef,
        flat(g_off) if need_points else gout, flat(g_msk) if need_points else gout,
        *_params(input, offset, geo), lanes, shift, total, mode, need_points,
    )  # fmt: skip
    if deterministic:
        P = int(kernel_h) * int(kernel_w) - int(remove_center)
        order, seg = segments(keys, N * H * W * G)
        _value_owner[grid(g_in.size)](gout, order, seg, coef, flat(g_in), D, 4 * P)
    return g_in, g_off if needs[1] else None, g_msk if needs[2] else None
