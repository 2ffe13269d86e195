"""CUDA kernels of DCNv4 and FlashDeformAttn, mirroring ``kernels/cpu/dcnv4.py`` (layouts and
sampling rule are described there).

**dcnv4** is laid out as ``kernels/cuda/attention.py``'s ms_deform_attn with one level: the input
(B, H, W, G*D) is value rows ``r = (b*H*W + pixel)*G + g`` of D channels, and each (b, ho, wo, g)
is served by ``lanes`` consecutive threads of one warp; a thread computes each of the K points'
zero-fade plan once and applies it to its run of channels ``lane, lane + lanes, ...`` (RUN = 4
per pass, in registers; coalesced loads). Only the sampling point differs: it comes from the
window position and the packed offsets, ``x = p0_w + (i*dilation_w + dx) * offset_scale``.

* forward: threads ``B*Ho*Wo*G*lanes``; every output channel is written once.
* backward: one kernel over ``padded(B*Ho*Wo*G*lanes)`` threads. Per point each thread sums its
  channels' parts of d/dmask, d/dy, d/dx; ``lane_sum`` (warp shuffles, fixed order) reduces them
  and lane 0 writes the point's three packed gradients (one writer). The input gradient is
  scattered with float atomic adds, or, under ``deformnp.use_deterministic_algorithms(True)``,
  listed as (row, coefficient) pairs that ``scatter.segments`` sorts and the ms_deform_attn owner
  kernel (``attention._value_owner``) sums in a fixed order: bit-identical across runs.

Precision: plans, coordinates and accumulators in the data's dtype (``ft``), constants
``ft(...)``, ``offset_scale`` passed as an ``ft`` scalar, so a float32 launch does no float64 arithmetic.

**flash_deform_attn**: ``_unpack`` (one thread per (query, head): copy the locations, softmax the
L*K logits, max first, as the anchor), the ms_deform_attn kernels of ``kernels/cuda/attention.py``,
and ``_pack`` (the logits' gradient through the softmax). One writer per element throughout.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
from numba import cuda

from ...determinism import are_deterministic_algorithms_enabled
from . import attention
from ._launch import SIMULATOR, empty, flat, grid, lane_sum, lanes_for, padded, zeros
from .attention import _channel_backward, _live, _sample, _value_owner
from .sampling import zero_fade_plan
from .scatter import segments

RUN = 4  # channels per thread and pass, held in registers
VALUE_NONE = 0
VALUE_ATOMIC = 1
VALUE_KEYS = 2


@cuda.jit(device=True)
def _origin(q, Wo, sh, sw, ph, pw, ch, cw, s, ft):
    """The anchor's p0_h_, p0_w_ of output position q = ho*Wo + wo, in ``ft``."""
    ho = q // Wo
    wo = q - ho * Wo
    p0x = ft(cw - pw + wo * sw) - ft(cw) * s
    p0y = ft(ch - ph + ho * sh) - ft(ch) * s
    return p0y, p0x


@cuda.jit(cache=not SIMULATOR)
def _forward(x, om, out, B, H, W, G, D, Q, Wo, Cp, kh, kw, sh, sw, ph, pw, dh, dw, scale, rc,
             lanes, shift):  # fmt: skip
    """Thread t: lane t % lanes of group (b, q, g) = t // lanes."""
    ft = x.dtype.type
    zero = ft(0)
    s = ft(scale)
    K = kh * kw - rc
    cw = (dw * (kw - 1)) >> 1
    ch = (dh * (kh - 1)) >> 1
    total = (B * Q * G) << shift
    for t in range(cuda.grid(1), total, cuda.gridsize(1)):
        lane = t & (lanes - 1)
        grp = t >> shift  # (b*Q + q)*G + g
        gi = grp % G
        bq = grp // G
        b = bq // Q
        p0y, p0x = _origin(bq - b * Q, Wo, sh, sw, ph, pw, ch, cw, s, ft)
        ob = bq * Cp + gi * 3 * K
        row = b * H * W * G + gi  # value row of pixel 0
        for c in range(0, D, RUN * lanes):
            d0 = c + lane
            d1 = d0 + lanes
            d2 = d1 + lanes
            d3 = d2 + lanes
            acc0 = zero
            acc1 = zero
            acc2 = zero
            acc3 = zero
            k = 0
            for i in range(kw):
                for j in range(kh):
                    if rc != 0 and i == kw // 2 and j == kh // 2:
                        continue
                    xx = p0x + (ft(i * dw) + om[ob + 2 * k]) * s
                    yy = p0y + (ft(j * dh) + om[ob + 2 * k + 1]) * s
                    m = om[ob + 2 * K + k]
                    k += 1
                    idx, w, cy, cx = zero_fade_plan(yy, xx, H, W, ft)
                    if w[0] == zero and w[1] == zero and w[2] == zero and w[3] == zero:
                        continue
                    w0 = m * w[0]
                    w1 = m * w[1]
                    w2 = m * w[2]
                    w3 = m * w[3]
                    o0 = (row + idx[0] * G) * D
                    o1 = (row + idx[1] * G) * D
                    o2 = (row + idx[2] * G) * D
                    o3 = (row + idx[3] * G) * D
                    if d0 < D:
                        acc0 += _sample(x, o0, o1, o2, o3, d0, w0, w1, w2, w3)
                    if d1 < D:
                        acc1 += _sample(x, o0, o1, o2, o3, d1, w0, w1, w2, w3)
                    if d2 < D:
                        acc2 += _sample(x, o0, o1, o2, o3, d2, w0, w1, w2, w3)
                    if d3 < D:
                        acc3 += _sample(x, o0, o1, o2, o3, d3, w0, w1, w2, w3)
            if d0 < D:
                out[grp * D + d0] = acc0
            if d1 < D:
                out[grp * D + d1] = acc1
            if d2 < D:
                out[grp * D + d2] = acc2
            if d3 < D:
                out[grp * D + d3] = acc3


@cuda.jit(cache=not SIMULATOR)
def _backward(gout, x, om, gx, keys, coef, gom, B, H, W, G, D, Q, Wo, Cp, kh, kw, sh, sw, ph,
              pw, dh, dw, scale, rc, lanes, shift, total, value_mode, need_om):  # fmt: skip
    """Thread t < total = padded(B*Q*G*lanes): lane t % lanes of group t // lanes (idle past the
    last group: zero plans, no loads or stores, present for the shuffles)."""
    ft = x.dtype.type
    zero = ft(0)
    s = ft(scale)
    K = kh * kw - rc
    cw = (dw * (kw - 1)) >> 1
    ch = (dh * (kh - 1)) >> 1
    groups = B * Q * G
    n_keys = B * H * W * G
    scatter = value_mode == VALUE_ATOMIC
    for t in range(cuda.grid(1), total, cuda.gridsize(1)):
        lane = t & (lanes - 1)
        grp = t >> shift
        active = grp < groups
        if not active:
            grp = 0
        gi = grp % G
        bq = grp // G
        b = bq // Q
        p0y, p0x = _origin(bq - b * Q, Wo, sh, sw, ph, pw, ch, cw, s, ft)
        ob = bq * Cp + gi * 3 * K
        row = b * H * W * G + gi
        for c in range(0, D, RUN * lanes):
            d0 = c + lane
            d1 = d0 + lanes
            d2 = d1 + lanes
            d3 = d2 + lanes
            h0 = active and d0 < D
            h1 = active and d1 < D
            h2 = active and d2 < D
            h3 = active and d3 < D
            go0 = gout[grp * D + d0] if h0 else zero
            go1 = gout[grp * D + d1] if h1 else zero
            go2 = gout[grp * D + d2] if h2 else zero
            go3 = gout[grp * D + d3] if h3 else zero
            k = 0
            for i in range(kw):
                for j in range(kh):
                    if rc != 0 and i == kw // 2 and j == kh // 2:
                        continue
                    yy = ft(-2)  # an idle thread: out of range, all-zero plan
                    xx = ft(-2)
                    m = zero
                    if active:
                        xx = p0x + (ft(i * dw) + om[ob + 2 * k]) * s
                        yy = p0y + (ft(j * dh) + om[ob + 2 * k + 1]) * s
                        m = om[ob + 2 * K + k]
                    a = grp * K + k
                    kk = k
                    k += 1
                    idx, w, cy, cx = zero_fade_plan(yy, xx, H, W, ft)
                    sa = zero
                    sy = zero
                    sx = zero
                    if _live(w, cy, cx, ft):
                        o0 = (row + idx[0] * G) * D
                        o1 = (row + idx[1] * G) * D
                        o2 = (row + idx[2] * G) * D
                        o3 = (row + idx[3] * G) * D
                        if h0:
                            ta, ty, tx = _channel_backward(
                                x, gx, o0, o1, o2, o3, d0, go0, m, w, cy, cx, scatter, zero
                            )
                            sa += ta
                            sy += ty
                            sx += tx
                        if h1:
                            ta, ty, tx = _channel_backward(
                                x, gx, o0, o1, o2, o3, d1, go1, m, w, cy, cx, scatter, zero
                            )
                            sa += ta
                            sy += ty
                            sx += tx
                        if h2:
                            ta, ty, tx = _channel_backward(
                                x, gx, o0, o1, o2, o3, d2, go2, m, w, cy, cx, scatter, zero
                            )
                            sa += ta
                            sy += ty
                            sx += tx
                        if h3:
                            ta, ty, tx = _channel_backward(
                                x, gx, o0, o1, o2, o3, d3, go3, m, w, cy, cx, scatter, zero
                            )
                            sa += ta
                            sy += ty
                            sx += tx
                    if need_om:
                        sa = lane_sum(sa, lanes)
                        sy = lane_sum(sy, lanes)
                        sx = lane_sum(sx, lanes)
                        if active and lane == 0:
                            ms = m * s
                            p = ob + 2 * kk
                            if c == 0:
                                gom[p] = sx * ms
                                gom[p + 1] = sy * ms
                                gom[ob + 2 * K + kk] = sa
                            else:  # later passes add their channels (same thread: in order)
                                gom[p] += sx * ms
                                gom[p + 1] += sy * ms
                                gom[ob + 2 * K + kk] += sa
                    if value_mode == VALUE_KEYS and c == 0 and active and lane == 0:
                        e = 4 * a
                        keys[e] = row + idx[0] * G if w[0] != zero else n_keys
                        keys[e + 1] = row + idx[1] * G if w[1] != zero else n_keys
                        keys[e + 2] = row + idx[2] * G if w[2] != zero else n_keys
                        keys[e + 3] = row + idx[3] * G if w[3] != zero else n_keys
                        coef[e] = m * w[0]
                        coef[e + 1] = m * w[1]
                        coef[e + 2] = m * w[2]
                        coef[e + 3] = m * w[3]


def _lanes(D: int) -> tuple[int, int]:
    lanes = lanes_for(D)
    return lanes, lanes.bit_length() - 1


def dcnv4_forward(
    input: Any, offset_mask: Any, kernel_h: int, kernel_w: int, stride_h: int, stride_w: int,
    pad_h: int, pad_w: int, dilation_h: int, dilation_w: int, group: int, group_channels: int,
    offset_scale: float, remove_center: int,
) -> Any:  # fmt: skip
    """out (B, Ho, Wo, G*D) of device arrays validated by ``ops.dcnv4``."""
    B, H, W, C = (int(s) for s in input.shape)
    Ho, Wo, Cp = (int(s) for s in offset_mask.shape[1:])
    G, D = group, group_channels
    K = kernel_h * kernel_w - int(remove_center)
    if not (B * Ho * Wo * C and H * W and K):
        return zeros((B, Ho, Wo, C), input.dtype)
    out = empty((B, Ho, Wo, C), input.dtype)  # the kernel writes every element
    lanes, shift = _lanes(D)
    _forward[grid(B * Ho * Wo * G * lanes)](
        flat(input), flat(offset_mask), flat(out), B, H, W, G, D, Ho * Wo, Wo, Cp, kernel_h,
        kernel_w, stride_h, stride_w, pad_h, pad_w, dilation_h, dilation_w,
        input.dtype.type(offset_scale), int(remove_center), lanes, shift,
    )  # fmt: skip
    return out


def dcnv4_backward(
    grad_out: Any, input: Any, offset_mask: Any, kernel_h: int, kernel_w: int, stride_h: int,
    stride_w: int, pad_h: int, pad_w: int, dilation_h: int, dilation_w: int, group: int,
    group_channels: int, offset_scale: float, remove_center: int, needs: tuple,
) -> tuple:  # fmt: skip
    """(grad_input, grad_offset_mask), None where ``needs`` is False. The input gradient uses
    atomics, or the sorted owner-computes scatter when ``are_deterministic_algorithms_enabled()``;
    the packed gradients have one writer per element (padding columns 0)."""
    B, H, W, C = (int(s) for s in input.shape)
    Ho, Wo, Cp = (int(s) for s in offset_mask.shape[1:])
    G, D = group, group_channels
    K = kernel_h * kernel_w - int(remove_center)
    dtype = input.dtype
    points = B * Ho * Wo * G * K
    run = bool(points and H * W and D) and bool(needs[0] or needs[1])
    need_x = bool(needs[0]) and run
    need_om = bool(needs[1]) and run
    deterministic = need_x and are_deterministic_algorithms_enabled()
    gx = gom = None
    if needs[0]:
        gx = empty(input.shape, dtype) if deterministic else zeros(input.shape, dtype)
    if needs[1]:
        gom = zeros(offset_mask.shape, dtype)  # padding columns are never written
    if not run:
        return gx, gom
    lanes, shift = _lanes(D)
    total = padded(B * Ho * Wo * G * lanes)
    gout = flat(grad_out)
    if deterministic:
        mode = VALUE_KEYS
        keys = empty((4 * points,), np.int64)
        coef = empty((4 * points,), dtype)
    else:
        mode = VALUE_ATOMIC if need_x else VALUE_NONE
        keys, coef = empty((1,), np.int64), gout  # placeholders: never touched
    _backward[grid(total)](
        gout, flat(input), flat(offset_mask), flat(gx) if mode == VALUE_ATOMIC else gout, keys,
        coef, flat(gom) if need_om else gout, B, H, W, G, D, Ho * Wo, Wo, Cp, kernel_h, kernel_w,
        stride_h, stride_w, pad_h, pad_w, dilation_h, dilation_w, dtype.type(offset_scale),
        int(remove_center), lanes, shift, total, mode, need_om,
    )  # fmt: skip
    if deterministic:
        order, seg = segments(keys, B * H * W * G)
        _value_owner[grid(gx.size)](gout, order, seg, coef, flat(gx), D, 4 * K)
    return gx, gom


# ---------------------------------------------------------------------------------------------
# flash_deform_attn: softmax + ms_deform_attn
# ---------------------------------------------------------------------------------------------


@cuda.jit(cache=not SIMULATOR)
def _unpack(packed, LK, loc, attn, R):
    """Row r: loc[r, :] = packed[r, :2LK]; attn[r, :] = softmax(packed[r, 2LK:]) (flat arrays)."""
    for r in range(cuda.grid(1), R, cuda.gridsize(1)):
        src = r * 3 * LK
        for i in range(2 * LK):
            loc[r * 2 * LK + i] = packed[src + i]
        z = src + 2 * LK
        mx = packed[z]
        for j in range(1, LK):
            v = packed[z + j]
            if v > mx or v != v:
                mx = v
        tot = attn.dtype.type(0)
        for j in range(LK):
            e = math.exp(packed[z + j] - mx)
            attn[r * LK + j] = e
            tot += e
        for j in range(LK):
            attn[r * LK + j] = attn[r * LK + j] / tot


@cuda.jit(cache=not SIMULATOR)
def _pack(gloc, gattn, attn, LK, out, R):
    """Row r: out[r, :2LK] = gloc[r]; out[r, 2LK + i] = w_i*g_i - w_i*sum_j w_j*g_j."""
    for r in range(cuda.grid(1), R, cuda.gridsize(1)):
        dst = r * 3 * LK
        for i in range(2 * LK):
            out[dst + i] = gloc[r * 2 * LK + i]
        s = out.dtype.type(0)
        for j in range(LK):
            s += attn[r * LK + j] * gattn[r * LK + j]
        for i in range(LK):
            a = attn[r * LK + i]
            out[dst + 2 * LK + i] = a * gattn[r * LK + i] - a * s


def _unpacked(sampling_loc_attn: Any, L: int, K: int, cache: dict | None) -> tuple[Any, Any]:
    if cache is not None and "unpacked" in cache:
        return cache["unpacked"]
    N, Lq, G, _ = (int(s) for s in sampling_loc_attn.shape)
    R, LK = N * Lq * G, L * K
    dt = sampling_loc_attn.dtype
    loc = empty((N, Lq, G, L, K, 2), dt)
    attn = empty((N, Lq, G, L, K), dt)
    if R and LK:
        _unpack[grid(R)](flat(sampling_loc_attn), LK, flat(loc), flat(attn), R)
    out = loc, attn
    if cache is not None:
        cache["unpacked"] = out
    return out


def flash_deform_attn_forward(
    value: Any,
    value_spatial_shapes: Any,
    value_level_start_index: Any,
    sampling_loc_attn: Any,
    K: int,
    cache: dict | None = None,
) -> Any:
    """out (N, Lq, G*D): ms_deform_attn of the unpacked locations and softmaxed logits."""
    L = int(value_spatial_shapes.shape[0])
    loc, attn = _unpacked(sampling_loc_attn, L, K, cache)
    return attention.ms_deform_attn_forward(
        value, value_spatial_shapes, value_level_start_index, loc, attn, cache
    )


def flash_deform_attn_backward(
    grad_out: Any,
    value: Any,
    value_spatial_shapes: Any,
    value_level_start_index: Any,
    sampling_loc_attn: Any,
    K: int,
    needs: tuple,
    cache: dict | None = None,
) -> tuple:
    """(grad_value, grad_sampling_loc_attn), None where ``needs`` is False."""
    L = int(value_spatial_shapes.shape[0])
    loc, attn = _unpacked(sampling_loc_attn, L, K, cache)
    need_packed = bool(needs[1])
    gv, gl, ga = attention.ms_deform_attn_backward(
        grad_out, value, value_spatial_shapes, value_level_start_index, loc, attn,
        (bool(needs[0]), need_packed, need_packed), cache,
    )  # fmt: skip
    gp = None
    if need_packed:
        N, Lq, G, P3 = (int(s) for s in sampling_loc_attn.shape)
        R, LK = N * Lq * G, L * K
        gp = zeros((N, Lq, G, P3), value.dtype)
        if R and LK:
            _pack[grid(R)](flat(gl), flat(ga), flat(attn), LK, flat(gp), R)
    return gv, gp
