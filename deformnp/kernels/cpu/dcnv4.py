"""CPU kernels of DCNv4 and FlashDeformAttn (anchor: OpenGVLab/DCNv4, ``DCNv4_op``).

**dcnv4.** Layouts are the anchor's, channels-last: input (B, H, W, G*D), offset_mask
(B, Ho, Wo, Cp) with Cp >= G*K*3, output (B, Ho, Wo, G*D). Group g of an output position reads
the packed block ``offset_mask[b, ho, wo, g*3K : (g+1)*3K]``: the 2K offsets (dx, dy) of its K
points, interleaved, then their K mask values (used as given: no softmax). Columns past G*3K
(the anchor pads the packed channels to a multiple of 8) are never read; their gradient is 0.
Point k walks the kernel window column by column (i over kernel_w outside, j over kernel_h
inside), skipping the centre when ``remove_center``; it samples group g's D channels of image b
at, with c_w = (dilation_w*(kernel_w - 1)) >> 1 and s = offset_scale,

    x = (c_w - pad_w + wo*stride_w - c_w*s) + (i*dilation_w + dx) * s

(likewise y), with the zero-fade rule (``rules.zero_fade_plan``, float64 plans as every CPU
kernel but ms_deform_attn's), and ``out[b, ho, wo, g*D + d] = sum_k mask_k * sample_k[d]``.

* forward: ``prange`` over output positions (b, ho, wo); a task writes its own output row.
* backward: ``prange`` over (b, g): a task owns the D-channel slice of group g of image b's input
  gradient (it scatters into it alone, points in a fixed order) and the packed offset/mask
  gradients of group g at every output position of image b. Every element has one writer and a
  fixed summation order, so gradients are bit-identical on every run and with any number of
  threads. (The parallelism is B*G tasks; that is the price of a race-free scatter without
  per-task copies of the input gradient.)

**flash_deform_attn** is ``ms_deform_attn`` after a softmax, exactly (the anchor's kernel is that
too): ``sampling_loc_attn`` (N, Lq, G, 3*L*K) holds per query and head the 2*L*K normalized
locations (x, y) of the points (level-major, then point), then L*K attention logits. The
wrappers below unpack it (``_unpack``: the locations copied, the logits softmaxed over all L*K
per (query, head), in the data dtype, max-subtracted as the anchor), call the ms_deform_attn
kernels (``kernels/cpu/attention.py``), and pack the gradients back (``_pack``: the location
gradients as they are, the logit gradients through the softmax's Jacobian,
``w_i*g_i - w_i*sum_j w_j*g_j`` as the anchor). Both unpack kernels are parallel over rows with
one writer per element, so the composition keeps the attention kernels' determinism.
"""

from __future__ import annotations

import math

import numpy as np
from numba import njit, prange

from . import attention
from .sampling import threads_for, zero_fade_plan


@njit(inline="always", cache=True)
def _point(k_w, k_h, i, j, dil_w, dil_h, p0x, p0y, dx, dy, scale):
    """Pixel coordinates (y, x) of window point (i, j) with offsets (dx, dy): the anchor's
    ``p0_ + (i*dilation + offset) * offset_scale`` with ``p0_`` precomputed."""
    x = p0x + (np.float64(i * dil_w) + np.float64(dx)) * scale
    y = p0y + (np.float64(j * dil_h) + np.float64(dy)) * scale
    return y, x


@njit(inline="always", cache=True)
def _origin(ho, wo, kh, kw, sh, sw, ph, pw, dh, dw, scale):
    """The anchor's p0_h_, p0_w_ of output position (ho, wo)."""
    cw = (dw * (kw - 1)) >> 1
    ch = (dh * (kh - 1)) >> 1
    p0x = np.float64(cw - pw + wo * sw) - np.float64(cw) * scale
    p0y = np.float64(ch - ph + ho * sh) - np.float64(ch) * scale
    return p0y, p0x


@njit(parallel=True, cache=True)
def _dcnv4_forward(x, om, out, kh, kw, sh, sw, ph, pw, dh, dw, G, D, scale, rc):
    """out (B, Ho, Wo, G*D) of x (B, H, W, G*D) and om (B, Ho, Wo, Cp); H*W >= 1."""
    B, H, W, C = x.shape
    Ho, Wo, Cp = om.shape[1], om.shape[2], om.shape[3]
    K = kh * kw - rc
    xf = x.reshape(x.size)
    omf = om.reshape(om.size)
    outf = out.reshape(out.size)
    HWC = H * W * C
    for task in prange(B * Ho * Wo):
        b = task // (Ho * Wo)
        q = task - b * (Ho * Wo)
        ho = q // Wo
        wo = q - ho * Wo
        p0y, p0x = _origin(ho, wo, kh, kw, sh, sw, ph, pw, dh, dw, scale)
        orow = task * C
        for u in range(C):
            outf[orow + u] = 0.0
        for g in range(G):
            ob = task * Cp + g * 3 * K
            dst = orow + g * D
            src = b * HWC + g * D
            k = 0
            for i in range(kw):
                for j in range(kh):
                    if rc and i == kw // 2 and j == kh // 2:
                        continue
                    y, xx = _point(kw, kh, i, j, dw, dh, p0x, p0y, omf[ob + 2 * k],
                                   omf[ob + 2 * k + 1], scale)  # fmt: skip
                    m = np.float64(omf[ob + 2 * K + k])
                    idx, w, cy, cx = zero_fade_plan(y, xx, H, W)
                    k += 1
                    if w[0] == 0.0 and w[1] == 0.0 and w[2] == 0.0 and w[3] == 0.0:
                        continue
                    a0 = src + idx[0] * C
                    a1 = src + idx[1] * C
                    a2 = src + idx[2] * C
                    a3 = src + idx[3] * C
                    for u in range(D):
                        outf[dst + u] += m * (
                            w[0] * xf[a0 + u] + w[1] * xf[a1 + u]
                            + w[2] * xf[a2 + u] + w[3] * xf[a3 + u]
                        )  # fmt: skip
    return out


@njit(parallel=True, cache=True)
def _dcnv4_backward(
    gout, x, om, gx, gom, kh, kw, sh, sw, ph, pw, dh, dw, G, D, scale, rc, need_x, need_om
):
    """Task (b, g): gx[b, :, :, g*D:(g+1)*D] (scatter, one writer) and gom[b, :, :, g*3K:(g+1)*3K]
    (owner computes). gx and gom arrive zeroed (or empty when not needed)."""
    B, H, W, C = x.shape
    Ho, Wo, Cp = om.shape[1], om.shape[2], om.shape[3]
    K = kh * kw - rc
    Q = Ho * Wo
    xf = x.reshape(x.size)
    omf = om.reshape(om.size)
    gf = gout.reshape(gout.size)
    gxf = gx.reshape(gx.size)
    gomf = gom.reshape(gom.size)
    HWC = H * W * C
    for task in prange(B * G):
        b = task // G
        g = task - b * G
        src = b * HWC + g * D
        for q in range(Q):
            ho = q // Wo
            wo = q - ho * Wo
            p0y, p0x = _origin(ho, wo, kh, kw, sh, sw, ph, pw, dh, dw, scale)
            row = b * Q + q
            ob = row * Cp + g * 3 * K
            go = row * C + g * D
            k = 0
            for i in range(kw):
                for j in range(kh):
                    if rc and i == kw // 2 and j == kh // 2:
                        continue
                    y, xx = _point(kw, kh, i, j, dw, dh, p0x, p0y, omf[ob + 2 * k],
                                   omf[ob + 2 * k + 1], scale)  # fmt: skip
                    m = np.float64(omf[ob + 2 * K + k])
                    idx, w, cy, cx = zero_fade_plan(y, xx, H, W)
                    kk = k
                    k += 1
                    if (
                        w[0] == 0.0 and w[1] == 0.0 and w[2] == 0.0 and w[3] == 0.0
                        and cy[0] == 0.0 and cy[1] == 0.0 and cy[2] == 0.0 and cy[3] == 0.0
                        and cx[0] == 0.0 and cx[1] == 0.0 and cx[2] == 0.0 and cx[3] == 0.0
                    ):  # fmt: skip
                        continue  # out of range: every gradient of the point is 0
                    a0 = src + idx[0] * C
                    a1 = src + idx[1] * C
                    a2 = src + idx[2] * C
                    a3 = src + idx[3] * C
                    if need_om:
                        t0 = 0.0
                        t1 = 0.0
                        t2 = 0.0
                        t3 = 0.0
                        for u in range(D):
                            gu = np.float64(gf[go + u])
                            t0 += gu * xf[a0 + u]
                            t1 += gu * xf[a1 + u]
                            t2 += gu * xf[a2 + u]
                            t3 += gu * xf[a3 + u]
                        sa = w[0] * t0 + w[1] * t1 + w[2] * t2 + w[3] * t3
                        sy = cy[0] * t0 + cy[1] * t1 + cy[2] * t2 + cy[3] * t3
                        sx = cx[0] * t0 + cx[1] * t1 + cx[2] * t2 + cx[3] * t3
                        gomf[ob + 2 * kk] = sx * (m * scale)
                        gomf[ob + 2 * kk + 1] = sy * (m * scale)
                        gomf[ob + 2 * K + kk] = sa
                    if need_x:
                        c0 = m * w[0]
                        c1 = m * w[1]
                        c2 = m * w[2]
                        c3 = m * w[3]
                        for u in range(D):
                            gu = np.float64(gf[go + u])
                            if c0 != 0.0:
                                gxf[a0 + u] += c0 * gu
                            if c1 != 0.0:
                                gxf[a1 + u] += c1 * gu
                            if c2 != 0.0:
                                gxf[a2 + u] += c2 * gu
                            if c3 != 0.0:
                                gxf[a3 + u] += c3 * gu
    return gx, gom


def dcnv4_forward(
    input, offset_mask, kernel_h, kernel_w, stride_h, stride_w, pad_h, pad_w, dilation_h,
    dilation_w, group, group_channels, offset_scale, remove_center,
):  # fmt: skip
    """out (B, Ho, Wo, G*D) (host arrays validated and C-contiguous by ``ops.dcnv4``)."""
    B, H, W, C = input.shape
    Ho, Wo = offset_mask.shape[1], offset_mask.shape[2]
    out = np.zeros((B, Ho, Wo, C), input.dtype)
    K = kernel_h * kernel_w - int(remove_center)
    if out.size == 0 or H * W == 0 or K == 0:
        return out
    with threads_for(B * Ho * Wo * K * (C + 8)):
        _dcnv4_forward(
            input, offset_mask, out, kernel_h, kernel_w, stride_h, stride_w, pad_h, pad_w,
            dilation_h, dilation_w, group, group_channels, float(offset_scale),
            int(remove_center),
        )  # fmt: skip
    return out


def dcnv4_backward(
    grad_out, input, offset_mask, kernel_h, kernel_w, stride_h, stride_w, pad_h, pad_w,
    dilation_h, dilation_w, group, group_channels, offset_scale, remove_center, needs,
):  # fmt: skip
    """(grad_input, grad_offset_mask), None where ``needs`` is False; bit-identical with any
    number of threads. Padding columns of grad_offset_mask are 0."""
    B, H, W, C = input.shape
    Ho, Wo = offset_mask.shape[1], offset_mask.shape[2]
    need_x, need_om = bool(needs[0]), bool(needs[1])
    gx = np.zeros(input.shape, input.dtype) if need_x else None
    gom = np.zeros(offset_mask.shape, input.dtype) if need_om else None
    K = kernel_h * kernel_w - int(remove_center)
    if (need_x or need_om) and B * Ho * Wo * C > 0 and H * W > 0 and K > 0:
        empty = np.zeros((0, 0, 0, 0), input.dtype)
        with threads_for(B * Ho * Wo * K * (2 * C + 8)):
            _dcnv4_backward(
                grad_out, input, offset_mask, gx if need_x else empty,
                gom if need_om else empty, kernel_h, kernel_w, stride_h, stride_w, pad_h, pad_w,
                dilation_h, dilation_w, group, group_channels, float(offset_scale),
                int(remove_center), need_x, need_om,
            )  # fmt: skip
    return gx, gom


# ---------------------------------------------------------------------------------------------
# flash_deform_attn: softmax + ms_deform_attn
# ---------------------------------------------------------------------------------------------


@njit(parallel=True, cache=True)
def _unpack(packed, LK, loc, attn):
    """Rows r of packed (R, 3*LK): loc[r] = packed[r, :2*LK]; attn[r] = softmax(packed[r, 2*LK:])
    in the data dtype (max subtracted first, as the anchor)."""
    R = packed.shape[0]
    for r in prange(R):
        for i in range(2 * LK):
            loc[r, i] = packed[r, i]
        mx = packed[r, 2 * LK]
        for j in range(1, LK):
            v = packed[r, 2 * LK + j]
            if v > mx or math.isnan(v):
                mx = v
        s = packed.dtype.type(0.0)
        for j in range(LK):
            e = np.exp(packed[r, 2 * LK + j] - mx)
            attn[r, j] = e
            s += e
        for j in range(LK):
            attn[r, j] = attn[r, j] / s
    return loc, attn


@njit(parallel=True, cache=True)
def _pack(gloc, gattn, attn, LK, out):
    """out[r, :2*LK] = gloc[r]; out[r, 2*LK + i] = w_i*g_i - w_i*sum_j w_j*g_j (the softmax's
    Jacobian, w = attn, g = gattn, the anchor's order)."""
    R = out.shape[0]
    for r in prange(R):
        for i in range(2 * LK):
            out[r, i] = gloc[r, i]
        s = out.dtype.type(0.0)
        for j in range(LK):
            s += attn[r, j] * gattn[r, j]
        for i in range(LK):
            out[r, 2 * LK + i] = attn[r, i] * gattn[r, i] - attn[r, i] * s
    return out


def _unpacked(sampling_loc_attn, L, K, cache):
    """(loc (N, Lq, G, L, K, 2), attn (N, Lq, G, L, K)) of the packed array; kept in ``cache``."""
    if cache is not None and "unpacked" in cache:
        return cache["unpacked"]
    N, Lq, G, _ = sampling_loc_attn.shape
    R, LK = N * Lq * G, L * K
    dt = sampling_loc_attn.dtype
    loc = np.empty((R, 2 * LK), dt)
    attn = np.empty((R, LK), dt)
    if R and LK:
        with threads_for(R * LK * 8):
            _unpack(sampling_loc_attn.reshape(R, 3 * LK), LK, loc, attn)
    out = loc.reshape(N, Lq, G, L, K, 2), attn.reshape(N, Lq, G, L, K)
    if cache is not None:
        cache["unpacked"] = out
    return out


def flash_deform_attn_forward(
    value, value_spatial_shapes, value_level_start_index, sampling_loc_attn, K, cache=None
):
    """out (N, Lq, G*D): ms_deform_attn of the unpacked locations and softmaxed logits.
    ``cache``: shared with the backward of the same autograd node (the unpacked arrays and the
    attention kernels' own entries)."""
    L = value_spatial_shapes.shape[0]
    loc, attn = _unpacked(sampling_loc_attn, L, K, cache)
    return attention.ms_deform_attn_forward(
        value, value_spatial_shapes, value_level_start_index, loc, attn, cache
    )


def flash_deform_attn_backward(
    grad_out, value, value_spatial_shapes, value_level_start_index, sampling_loc_attn, K, needs,
    cache=None,
):  # fmt: skip
    """(grad_value, grad_sampling_loc_attn), None where ``needs`` is False."""
    L = value_spatial_shapes.shape[0]
    loc, attn = _unpacked(sampling_loc_attn, L, K, cache)
    need_packed = bool(needs[1])
    gv, gl, ga = attention.ms_deform_attn_backward(
        grad_out, value, value_spatial_shapes, value_level_start_index, loc, attn,
        (bool(needs[0]), need_packed, need_packed), cache,
    )  # fmt: skip
    gp = None
    if need_packed:
        N, Lq, G, P3 = sampling_loc_attn.shape
        R, LK = N * Lq * G, L * K
        gp = np.zeros((N, Lq, G, P3), value.dtype)
        if R and LK:
            with threads_for(R * LK * 8):
                _pack(gl.reshape(R, 2 * LK), ga.reshape(R, LK), attn.reshape(R, LK), LK,
                      gp.reshape(R, 3 * LK))  # fmt: skip
    return gv, gp
