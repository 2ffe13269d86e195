"""CPU kernels of DCNv3 (InternImage's ``dcnv3_core_pytorch``; see ``deformnp/ops/dcnv3.py``).

Layouts are InternImage's, channels-last: input (N, H, W, C) with C = G*D (G groups of D
channels), offset (N, Ho, Wo, G*P*2) as (x, y) pairs, mask (N, Ho, Wo, G*P), output
(N, Ho, Wo, C). All arrays C-contiguous, validated by ``deformnp.ops.dcnv3``. ``pad_y`` and
``pad_x`` are the padding of the rows and of the columns of the input (the op passes the
anchor's ``pad_w`` and ``pad_h``: see the op's Notes).

Point p of group g at output pixel (oy, ox): kernel index k = p, or p + 1 from the centre on
when the centre is removed (k >= (kh*kw - 1) // 2); the anchor numbers the kernel points column
by column, so column j = k // kh, row i = k % kh. With hy = (dh*(kh-1)) // 2, hx = (dw*(kw-1)) // 2
and s = offset_scale, the point is sampled at the pixel coordinates of the unpadded input

    y = hy + oy*sh - pad_y + (i*dh - hy + dy) * s
    x = hx + ox*sw - pad_x + (j*dw - hx + dx) * s

with the zero-fade rule (``rules.zero_fade_plan``; zero padding outside), and

    out[n, oy, ox, g*D + d] = sum_p mask[n, oy, ox, g*P + p] * sample(input[n, :, :, g*D + d], y, x)

Parallelism and determinism:

* forward: ``prange`` over output pixels; a task writes its pixel's C outputs only.
* backward: ``prange`` over tasks (n, g, chunk of output pixels). A task owns the offset and mask
  gradients of its pixels' points of group g (one writer) and scatters the input gradient into
  the (n, g) channel block of its own buffer: chunk 0 writes ``grad_input``, chunk c >= 1 the
  buffer ``extra[c - 1]``, and :func:`_add_chunks` adds them in chunk order. The chunk count
  depends on the shapes only (:func:`n_chunks`), so gradients are bit-identical with any number
  of threads.

Plans and the channel sums of the position and mask gradients are computed in float64 for both
dtypes; outputs and the scattered input gradient are accumulated in the data's dtype. Index
arithmetic is 64-bit.
"""

from __future__ import annotations

import numpy as np
from numba import njit, prange

from .sampling import threads_for, zero_fade_plan

TARGET_TASKS = 16
MAX_CHUNKS = 4
MIN_PIXELS_PER_CHUNK = 64


def n_chunks(N: int, G: int, pixels: int) -> int:
    """Output-pixel chunks per (n, g) block in the backward (shapes only: see the docstring)."""
    tasks = max(N * G, 1)
    if tasks >= TARGET_TASKS:
        return 1
    return int(max(1, min(MAX_CHUNKS, -(-TARGET_TASKS // tasks), pixels // MIN_PIXELS_PER_CHUNK)))


@njit(inline="always", cache=True)
def _point(p, kh, rc, center):
    """(row i, column j) of point p of the kernel (column-major, centre skipped when rc)."""
    k = p + 1 if (rc != 0 and p >= center) else p
    j = k // kh
    return k - j * kh, j


@njit(parallel=True, cache=True)
def _forward(inp, off, msk, out, kh, kw, sh, sw, pad_y, pad_x, dh, dw, G, D, scale, rc):
    N, H, W, C = inp.shape
    Ho = out.shape[1]
    Wo = out.shape[2]
    P = kh * kw - rc
    center = (kh * kw - 1) // 2
    hy = (dh * (kh - 1)) // 2
    hx = (dw * (kw - 1)) // 2
    v = inp.reshape(-1)
    o = off.reshape(-1)
    m = msk.reshape(-1)
    res = out.reshape(-1)
    HW = H * W
    for t in prange(N * Ho * Wo):
        n = t // (Ho * Wo)
        r = t - n * (Ho * Wo)
        oy = r // Wo
        ox = r - oy * Wo
        by = np.float64(hy + oy * sh - pad_y)
        bx = np.float64(hx + ox * sw - pad_x)
        dst = t * C
        for c in range(C):
            res[dst + c] = 0.0
        for g in range(G):
            for p in range(P):
                i, j = _point(p, kh, rc, center)
                q = (t * G + g) * P + p
                x = bx + (np.float64(j * dw - hx) + np.float64(o[2 * q])) * scale
                y = by + (np.float64(i * dh - hy) + np.float64(o[2 * q + 1])) * scale
                idx, w, _, _ = zero_fade_plan(y, x, H, W)
                a = np.float64(m[q])
                w0 = a * w[0]
                w1 = a * w[1]
                w2 = a * w[2]
                w3 = a * w[3]
                if w0 == 0.0 and w1 == 0.0 and w2 == 0.0 and w3 == 0.0:
                    continue
                a0 = (n * HW + idx[0]) * C + g * D
                a1 = (n * HW + idx[1]) * C + g * D
                a2 = (n * HW + idx[2]) * C + g * D
                a3 = (n * HW + idx[3]) * C + g * D
                e = dst + g * D
                for d in range(D):
                    res[e + d] += w0 * v[a0 + d] + w1 * v[a1 + d] + w2 * v[a2 + d] + w3 * v[a3 + d]
    return out


@njit(parallel=True, cache=True)
def _backward(
    gout, inp, off, msk, kh, kw, sh, sw, pad_y, pad_x, dh, dw, G, D, scale, rc,
    chunks, need_input, need_om, g_in, extra, g_off, g_msk,
):  # fmt: skip
    N, H, W, C = inp.shape
    Ho = gout.shape[1]
    Wo = gout.shape[2]
    P = kh * kw - rc
    center = (kh * kw - 1) // 2
    hy = (dh * (kh - 1)) // 2
    hx = (dw * (kw - 1)) // 2
    HW = H * W
    L = Ho * Wo
    v = inp.reshape(-1)
    go = gout.reshape(-1)
    o = off.reshape(-1)
    m = msk.reshape(-1)
    gof = g_off.reshape(-1)
    gm = g_msk.reshape(-1)
    size = (L + chunks - 1) // chunks
    for task in prange(N * G * chunks):
        c = task % chunks
        ng = task // chunks
        g = ng % G
        n = ng // G
        gi = g_in.reshape(-1) if c == 0 else extra[c - 1]
        if need_input:  # this task's (n, g) channel block of its buffer
            for s in range(HW):
                b = (n * HW + s) * C + g * D
                for d in range(D):
                    gi[b + d] = 0.0
        for r in range(c * size, min(L, (c + 1) * size)):
            oy = r // Wo
            ox = r - oy * Wo
            t = n * L + r
            by = np.float64(hy + oy * sh - pad_y)
            bx = np.float64(hx + ox * sw - pad_x)
            e = t * C + g * D
            for p in range(P):
                i, j = _point(p, kh, rc, center)
                q = (t * G + g) * P + p
                x = bx + (np.float64(j * dw - hx) + np.float64(o[2 * q])) * scale
                y = by + (np.float64(i * dh - hy) + np.float64(o[2 * q + 1])) * scale
                idx, w, cy, cx = zero_fade_plan(y, x, H, W)
                a = np.float64(m[q])
                a0 = (n * HW + idx[0]) * C + g * D
                a1 = (n * HW + idx[1]) * C + g * D
                a2 = (n * HW + idx[2]) * C + g * D
                a3 = (n * HW + idx[3]) * C + g * D
                live = w[0] != 0.0 or w[1] != 0.0 or w[2] != 0.0 or w[3] != 0.0
                live = live or cy[0] != 0.0 or cy[1] != 0.0 or cy[2] != 0.0 or cy[3] != 0.0
                live = live or cx[0] != 0.0 or cx[1] != 0.0 or cx[2] != 0.0 or cx[3] != 0.0
                if need_om:
                    t0 = 0.0
                    t1 = 0.0
                    t2 = 0.0
                    t3 = 0.0
                    if live:
                        for d in range(D):
                            gd = np.float64(go[e + d])
                            t0 += gd * v[a0 + d]
                            t1 += gd * v[a1 + d]
                            t2 += gd * v[a2 + d]
                            t3 += gd * v[a3 + d]
                    gm[q] = w[0] * t0 + w[1] * t1 + w[2] * t2 + w[3] * t3
                    gx = cx[0] * t0 + cx[1] * t1 + cx[2] * t2 + cx[3] * t3
                    gy = cy[0] * t0 + cy[1] * t1 + cy[2] * t2 + cy[3] * t3
                    gof[2 * q] = a * gx * scale
                    gof[2 * q + 1] = a * gy * scale
                if need_input:
                    if w[0] != 0.0:
                        aw = a * w[0]
                        for d in range(D):
                            gi[a0 + d] += aw * go[e + d]
                    if w[1] != 0.0:
                        aw = a * w[1]
                        for d in range(D):
                            gi[a1 + d] += aw * go[e + d]
                    if w[2] != 0.0:
                        aw = a * w[2]
                        for d in range(D):
                            gi[a2 + d] += aw * go[e + d]
                    if w[3] != 0.0:
                        aw = a * w[3]
                        for d in range(D):
                            gi[a3 + d] += aw * go[e + d]
    return g_in


@njit(parallel=True, cache=True)
def _add_chunks(g_in, extra):
    """g_in += extra[0] + extra[1] + ..., each element summed in chunk order."""
    gi = g_in.reshape(-1)
    n = gi.size
    for s in prange((n + 255) // 256):
        for u in range(s * 256, min(n, s * 256 + 256)):
            acc = gi[u]
            for c in range(extra.shape[0]):
                acc += extra[c, u]
            gi[u] = acc


def _geometry(args):
    """The integer and float parameters in the kernels' order."""
    kh, kw, sh, sw, pad_y, pad_x, dh, dw, G, D, scale, rc = args
    return (
        int(kh), int(kw), int(sh), int(sw), int(pad_y), int(pad_x), int(dh), int(dw),
        int(G), int(D), float(scale), int(rc),
    )  # fmt: skip


def dcnv3_forward(
    input, offset, mask, kernel_h, kernel_w, stride_h, stride_w, pad_y, pad_x,
    dilation_h, dilation_w, group, group_channels, offset_scale, remove_center,
):  # fmt: skip
    """out (N, Ho, Wo, G*D) (host arrays, validated and C-contiguous)."""
    N, H, W, C = input.shape
    _, Ho, Wo, _ = offset.shape
    out = np.empty((N, Ho, Wo, C), input.dtype)  # the kernel writes every element
    geo = _geometry(
        (kernel_h, kernel_w, stride_h, stride_w, pad_y, pad_x, dilation_h, dilation_w, group,
         group_channels, offset_scale, remove_center)
    )  # fmt: skip
    if out.size == 0:
        return out
    with threads_for(mask.size * (group_channels + 8)):
        return _forward(input, offset, mask, out, *geo)


def dcnv3_backward(
    grad_out, input, offset, mask, kernel_h, kernel_w, stride_h, stride_w, pad_y, pad_x,
    dilation_h, dilation_w, group, group_channels, offset_scale, remove_center, needs,
):  # fmt: skip
    """(grad_input, grad_offset, grad_mask), None where ``needs`` is False; bit-identical with
    any number of threads."""
    N, H, W, C = input.shape
    _, Ho, Wo, _ = offset.shape
    dtype = input.dtype
    need_input = bool(needs[0])
    need_om = bool(needs[1] or needs[2])
    run = (need_input or need_om) and mask.size > 0 and C > 0 and H * W > 0
    g_in = np.zeros(input.shape, dtype) if need_input else None
    g_off = np.zeros(offset.shape, dtype) if need_om else None
    g_msk = np.zeros(mask.shape, dtype) if need_om else None
    if run:
        geo = _geometry(
            (kernel_h, kernel_w, stride_h, stride_w, pad_y, pad_x, dilation_h, dilation_w,
             group, group_channels, offset_scale, remove_center)
        )  # fmt: skip
        chunks = n_chunks(N, group, Ho * Wo) if need_input else 1
        extra = np.empty((chunks - 1, input.size if need_input else 0), dtype)
        with threads_for(mask.size * (2 * group_channels + 8)):
            _backward(
                grad_out, input, offset, mask, *geo, chunks, need_input, need_om,
                g_in if need_input else np.zeros((0, 0, 0, 0), dtype), extra,
                g_off if need_om else np.zeros((0, 0, 0, 0), dtype),
                g_msk if need_om else np.zeros((0, 0, 0, 0), dtype),
            )  # fmt: skip
            if need_input and chunks > 1:
                _add_chunks(g_in, extra)
    return g_in, g_off if needs[1] else None, g_msk if needs[2] else None
