"""Naive loop references of the RoI pooling family, straight from docs/ops/roi.rst and
deform_roi.rst.

Plain Python loops in float64, one sample at a time; no code shared with deformnp. ``rois`` is
the (K, 5) array (batch_index, x1, y1, x2, y2). Each op has a forward and the gradients written
out as the adjoint loops of that forward (for the deformable ops also the offset gradients, from
the exact derivative of the clamp rule: right-hand slope at integers, zero in the clamped bands).
"""

from __future__ import annotations

import math

import numpy as np

# ---------------------------------------------------------------------------- clamp rule


def c_round(v: float) -> float:
    """C's round, half away from zero."""
    t = math.trunc(v)
    if abs(v - t) >= 0.5:
        t += 1 if v > 0 else -1
    return float(t)


def clamp_corners(H: int, W: int, y: float, x: float) -> list[tuple[int, int, float, float, float]]:
    """The clamp rule at (y, x) as a list of (row, col, weight, d/dy coef, d/dx coef)."""
    if not (y >= -1 and y <= H and x >= -1 and x <= W):
        return []
    gy = gx = 1.0
    if y < 0:
        y, gy = 0.0, 0.0
    if x < 0:
        x, gx = 0.0, 0.0
    y0, x0 = math.floor(y), math.floor(x)
    if y0 >= H - 1:
        y0 = y1 = H - 1
        y, gy = float(y0), 0.0
    else:
        y1 = y0 + 1
    if x0 >= W - 1:
        x0 = x1 = W - 1
        x, gx = float(x0), 0.0
    else:
        x1 = x0 + 1
    ly, lx = y - y0, x - x0
    hy, hx = 1 - ly, 1 - lx
    return [
        (y0, x0, hy * hx, -hx * gy, -hy * gx),
        (y0, x1, hy * lx, -lx * gy, hy * gx),
        (y1, x0, ly * hx, hx * gy, -ly * gx),
        (y1, x1, ly * lx, lx * gy, ly * gx),
    ]


def clamp_sample(V: np.ndarray, y: float, x: float) -> float:
    H, W = V.shape
    return sum(w * V[r, c] for r, c, w, _, _ in clamp_corners(H, W, y, x))


def dcn_bilinear(V: np.ndarray, h: float, w: float) -> float:
    """Deformable-ConvNets' sampling of a valid sample: clamp to the map, floor/ceil corners."""
    H, W = V.shape
    w = min(max(w, 0.0), W - 1.0)
    h = min(max(h, 0.0), H - 1.0)
    x1, x2, y1, y2 = math.floor(w), math.ceil(w), math.floor(h), math.ceil(h)
    dx, dy = w - x1, h - y1
    return (
        (1 - dx) * (1 - dy) * V[y1, x1]
        + (1 - dx) * dy * V[y2, x1]
        + dx * (1 - dy) * V[y1, x2]
        + dx * dy * V[y2, x2]
    )


def clamp_sample_grad(V: np.ndarray, y: float, x: float) -> tuple[float, float]:
    H, W = V.shape
    corners = clamp_corners(H, W, y, x)
    return (
        sum(a * V[r, c] for r, c, _, a, _ in corners),
        sum(b * V[r, c] for r, c, _, _, b in corners),
    )


# ---------------------------------------------------------------------------- RoI Align


def _align_samples(roi, ph, pw, PH, PW, s, ratio, o, min_one, dx=0.0, dy=0.0):
    """Sample points of bin (ph, pw) and their count; (dx, dy) shift the start (deform)."""
    b, x1, y1, x2, y2 = (float(v) for v in roi)
    start_x, start_y = x1 * s - o, y1 * s - o
    roi_w, roi_h = x2 * s - o - start_x, y2 * s - o - start_y
    if min_one:
        roi_w, roi_h = max(roi_w, 1.0), max(roi_h, 1.0)
    bin_w, bin_h = roi_w / PW, roi_h / PH
    gh = ratio if ratio > 0 else (math.ceil(roi_h / PH) if math.isfinite(roi_h) else 0)
    gw = ratio if ratio > 0 else (math.ceil(roi_w / PW) if math.isfinite(roi_w) else 0)
    gh, gw = max(gh, 0), max(gw, 0)
    sx = start_x + dx * roi_w
    sy = start_y + dy * roi_h
    pts = [
        (sy + ph * bin_h + (iy + 0.5) * bin_h / gh, sx + pw * bin_w + (ix + 0.5) * bin_w / gw)
        for iy in range(gh)
        for ix in range(gw)
    ]
    return pts, max(gh * gw, 1), roi_w, roi_h


def roi_align(x, rois, PH, PW, s=1.0, ratio=-1, aligned=False):
    x = np.asarray(x, np.float64)
    K, C = len(rois), x.shape[1]
    out = np.zeros((K, C, PH, PW))
    o = 0.5 if aligned else 0.0
    for k, roi in enumerate(rois):
        b = int(roi[0])
        for ph in range(PH):
            for pw in range(PW):
                pts, count, _, _ = _align_samples(roi, ph, pw, PH, PW, s, ratio, o, not aligned)
                for c in range(C):
                    out[k, c, ph, pw] = sum(clamp_sample(x[b, c], y, xx) for y, xx in pts) / count
    return out


def roi_align_grad(x_shape, rois, grad, PH, PW, s=1.0, ratio=-1, aligned=False):
    B, C, H, W = x_shape
    g = np.zeros(x_shape)
    o = 0.5 if aligned else 0.0
    for k, roi in enumerate(rois):
        b = int(roi[0])
        for ph in range(PH):
            for pw in range(PW):
                pts, count, _, _ = _align_samples(roi, ph, pw, PH, PW, s, ratio, o, not aligned)
                for y, xx in pts:
                    for r, cc, w, _, _ in clamp_corners(H, W, y, xx):
                        for c in range(C):
                            g[b, c, r, cc] += w * grad[k, c, ph, pw] / count
    return g


def ps_roi_align(x, rois, PH, PW, s=1.0, ratio=-1):
    x = np.asarray(x, np.float64)
    K, Cout = len(rois), x.shape[1] // (PH * PW)
    out = np.zeros((K, Cout, PH, PW))
    for k, roi in enumerate(rois):
        b = int(roi[0])
        for co in range(Cout):
            for ph in range(PH):
                for pw in range(PW):
                    cin = (co * PH + ph) * PW + pw
                    pts, count, _, _ = _align_samples(roi, ph, pw, PH, PW, s, ratio, 0.5, False)
                    out[k, co, ph, pw] = (
                        sum(clamp_sample(x[b, cin], y, xx) for y, xx in pts) / count
                    )
    return out


def ps_roi_align_grad(x_shape, rois, grad, PH, PW, s=1.0, ratio=-1):
    B, C, H, W = x_shape
    g = np.zeros(x_shape)
    for k, roi in enumerate(rois):
        b = int(roi[0])
        for co in range(C // (PH * PW)):
            for ph in range(PH):
                for pw in range(PW):
                    cin = (co * PH + ph) * PW + pw
                    pts, count, _, _ = _align_samples(roi, ph, pw, PH, PW, s, ratio, 0.5, False)
                    for y, xx in pts:
                        for r, cc, w, _, _ in clamp_corners(H, W, y, xx):
                            g[b, cin, r, cc] += w * grad[k, co, ph, pw] / count
    return g


# ---------------------------------------------------------------------------- RoI Pool


def _pool_bin(roi, ph, pw, PH, PW, s, H, W, plus_one, dtype=np.float64):
    """[h0, h1) x [w0, w1) of bin (ph, pw); products and bin sizes in ``dtype`` (torchvision's)."""
    f = np.dtype(dtype).type
    vals = [f(v) * f(s) for v in roi[1:5]]
    if not all(math.isfinite(v) for v in vals):
        return 0, 0, 0, 0
    sw, sh, ew, eh = (int(c_round(float(v))) for v in vals)
    roi_w = max(ew - sw + plus_one, 1)
    roi_h = max(eh - sh + plus_one, 1)
    bin_h, bin_w = f(roi_h) / f(PH), f(roi_w) / f(PW)
    h0 = min(max(math.floor(f(ph) * bin_h) + sh, 0), H)
    h1 = min(max(math.ceil(f(ph + 1) * bin_h) + sh, 0), H)
    w0 = min(max(math.floor(f(pw) * bin_w) + sw, 0), W)
    w1 = min(max(math.ceil(f(pw + 1) * bin_w) + sw, 0), W)
    return h0, h1, w0, w1


def roi_pool(x, rois, PH, PW, s=1.0, dtype=np.float64):
    """(out, argmax): max over each bin, numpy.argmax's choice (first maximum, first NaN)."""
    x = np.asarray(x)
    B, C, H, W = x.shape
    K = len(rois)
    out = np.zeros((K, C, PH, PW), x.dtype)
    arg = np.full((K, C, PH, PW), -1, np.int64)
    for k, roi in enumerate(rois):
        b = int(roi[0])
        for ph in range(PH):
            for pw in range(PW):
                h0, h1, w0, w1 = _pool_bin(roi, ph, pw, PH, PW, s, H, W, 1, dtype)
                if h1 <= h0 or w1 <= w0:
                    continue
                for c in range(C):
                    region = x[b, c, h0:h1, w0:w1]
                    i = int(np.argmax(region))
                    out[k, c, ph, pw] = region.reshape(-1)[i]
                    arg[k, c, ph, pw] = (h0 + i // (w1 - w0)) * W + w0 + i % (w1 - w0)
    return out, arg


def roi_pool_grad(x_shape, rois, grad, argmax):
    B, C, H, W = x_shape
    g = np.zeros(x_shape)
    K, _, PH, PW = grad.shape
    for k in range(K):
        b = int(rois[k][0])
        for c in range(C):
            for ph in range(PH):
                for pw in range(PW):
                    a = argmax[k, c, ph, pw]
                    if a >= 0:
                        g[b, c, a // W, a % W] += grad[k, c, ph, pw]
    return g


def ps_roi_pool(x, rois, PH, PW, s=1.0, dtype=np.float64):
    x = np.asarray(x, np.float64)
    B, C, H, W = x.shape
    K, Cout = len(rois), C // (PH * PW)
    out = np.zeros((K, Cout, PH, PW))
    for k, roi in enumerate(rois):
        b = int(roi[0])
        for co in range(Cout):
            for ph in range(PH):
                for pw in range(PW):
                    h0, h1, w0, w1 = _pool_bin(roi, ph, pw, PH, PW, s, H, W, 0, dtype)
                    if h1 <= h0 or w1 <= w0:
                        continue
                    cin = (co * PH + ph) * PW + pw
                    out[k, co, ph, pw] = x[b, cin, h0:h1, w0:w1].sum() / ((h1 - h0) * (w1 - w0))
    return out


def ps_roi_pool_grad(x_shape, rois, grad, PH, PW, s=1.0, dtype=np.float64):
    B, C, H, W = x_shape
    g = np.zeros(x_shape)
    for k, roi in enumerate(rois):
        b = int(roi[0])
        for co in range(C // (PH * PW)):
            for ph in range(PH):
                for pw in range(PW):
                    h0, h1, w0, w1 = _pool_bin(roi, ph, pw, PH, PW, s, H, W, 0, dtype)
                    if h1 <= h0 or w1 <= w0:
                        continue
                    cin = (co * PH + ph) * PW + pw
                    g[b, cin, h0:h1, w0:w1] += grad[k, co, ph, pw] / ((h1 - h0) * (w1 - w0))
    return g


# ---------------------------------------------------------------------------- deformable


def deform_roi_pool(x, rois, offset, PH, PW, s=1.0, ratio=0, gamma=0.1):
    x = np.asarray(x, np.float64)
    K, C = len(rois), x.shape[1]
    out = np.zeros((K, C, PH, PW))
    for k, roi in enumerate(rois):
        b = int(roi[0])
        for ph in range(PH):
            for pw in range(PW):
                dx = gamma * offset[k, 0, ph, pw] if offset is not None else 0.0
                dy = gamma * offset[k, 1, ph, pw] if offset is not None else 0.0
                pts, count, _, _ = _align_samples(roi, ph, pw, PH, PW, s, ratio, 0.5, False, dx, dy)
                for c in range(C):
                    out[k, c, ph, pw] = sum(clamp_sample(x[b, c], y, xx) for y, xx in pts) / count
    return out


def deform_roi_pool_grad(x, rois, offset, grad, PH, PW, s=1.0, ratio=0, gamma=0.1):
    """(grad_input, grad_offset)."""
    x = np.asarray(x, np.float64)
    B, C, H, W = x.shape
    gi = np.zeros(x.shape)
    go = np.zeros(offset.shape) if offset is not None else None
    for k, roi in enumerate(rois):
        b = int(roi[0])
        for ph in range(PH):
            for pw in range(PW):
                dx = gamma * offset[k, 0, ph, pw] if offset is not None else 0.0
                dy = gamma * offset[k, 1, ph, pw] if offset is not None else 0.0
                pts, count, roi_w, roi_h = _align_samples(
                    roi, ph, pw, PH, PW, s, ratio, 0.5, False, dx, dy
                )
                for y, xx in pts:
                    for r, cc, w, _, _ in clamp_corners(H, W, y, xx):
                        for c in range(C):
                            gi[b, c, r, cc] += w * grad[k, c, ph, pw] / count
                    if go is not None:
                        for c in range(C):
                            vy, vx = clamp_sample_grad(x[b, c], y, xx)
                            go[k, 0, ph, pw] += grad[k, c, ph, pw] * gamma * roi_w * vx / count
                            go[k, 1, ph, pw] += grad[k, c, ph, pw] * gamma * roi_h * vy / count
    return gi, go


def _dps_bin(roi, ph, pw, P, s, part, spp, trans_std, offset, k, cls, H, W):
    """Valid samples of a bin of deform_ps_roi_pool, and (roi_w, roi_h)."""
    x1, y1, x2, y2 = (c_round(float(v)) for v in roi[1:5])
    start_w, start_h = x1 * s - 0.5, y1 * s - 0.5
    roi_w = max((x2 + 1.0) * s - 0.5 - start_w, 0.1)
    roi_h = max((y2 + 1.0) * s - 0.5 - start_h, 0.1)
    bin_w, bin_h = roi_w / P, roi_h / P
    qh, qw = math.floor(ph / P * part), math.floor(pw / P * part)
    tx = ty = 0.0
    if offset is not None:
        tx = offset[k, 2 * cls, qh, qw] * trans_std
        ty = offset[k, 2 * cls + 1, qh, qw] * trans_std
    wstart = pw * bin_w + start_w + tx * roi_w
    hstart = ph * bin_h + start_h + ty * roi_h
    sub_w, sub_h = bin_w / spp, bin_h / spp
    pts = []
    for ih in range(spp):
        for iw in range(spp):
            w = wstart + iw * sub_w
            h = hstart + ih * sub_h
            if -0.5 <= w <= W - 0.5 and -0.5 <= h <= H - 0.5:
                pts.append((h, w))
    return pts, roi_w, roi_h, qh, qw


def deform_ps_roi_pool(x, rois, offset, s, D, gs, P, part=None, spp=4, trans_std=0.0):
    x = np.asarray(x, np.float64)
    B, C, H, W = x.shape
    part = part or P
    ncls = offset.shape[1] // 2 if offset is not None else 1
    cec = D // ncls
    out = np.zeros((len(rois), D, P, P))
    for k, roi in enumerate(rois):
        b = int(roi[0])
        for ctop in range(D):
            for ph in range(P):
                for pw in range(P):
                    pts, *_ = _dps_bin(
                        roi, ph, pw, P, s, part, spp, trans_std, offset, k, ctop // cec, H, W
                    )
                    gh = min(max(math.floor(ph * gs / P), 0), gs - 1)
                    gw = min(max(math.floor(pw * gs / P), 0), gs - 1)
                    c = (ctop * gs + gh) * gs + gw
                    if pts:
                        out[k, ctop, ph, pw] = sum(
                            dcn_bilinear(x[b, c], h, w) for h, w in pts
                        ) / len(pts)
    return out


def deform_ps_roi_pool_grad(x, rois, offset, grad, s, D, gs, P, part=None, spp=4, trans_std=0.0):
    """(grad_input, grad_offset)."""
    x = np.asarray(x, np.float64)
    B, C, H, W = x.shape
    part = part or P
    ncls = offset.shape[1] // 2 if offset is not None else 1
    cec = D // ncls
    gi = np.zeros(x.shape)
    go = np.zeros(offset.shape) if offset is not None else None
    for k, roi in enumerate(rois):
        b = int(roi[0])
        for ctop in range(D):
            cls = ctop // cec
            for ph in range(P):
                for pw in range(P):
                    pts, roi_w, roi_h, qh, qw = _dps_bin(
                        roi, ph, pw, P, s, part, spp, trans_std, offset, k, cls, H, W
                    )
                    if not pts:
                        continue
                    gh = min(max(math.floor(ph * gs / P), 0), gs - 1)
                    gw = min(max(math.floor(pw * gs / P), 0), gs - 1)
                    c = (ctop * gs + gh) * gs + gw
                    g = grad[k, ctop, ph, pw] / len(pts)
                    for h, w in pts:
                        for r, cc, wt, _, _ in clamp_corners(H, W, h, w):
                            gi[b, c, r, cc] += wt * g
                        if go is not None:  # exact: zero where clamped, right-hand slope
                            vy, vx = clamp_sample_grad(x[b, c], h, w)
                            go[k, 2 * cls, qh, qw] += g * trans_std * roi_w * vx
                            go[k, 2 * cls + 1, qh, qw] += g * trans_std * roi_h * vy
    return gi, go


# ---------------------------------------------------------------------------- test inputs


def random_boxes(rng, K, B, H, W, scale=1.0, dtype=np.float64):
    """K boxes (batch, x1, y1, x2, y2) in image coordinates (feature map H x W seen at
    ``scale``): mostly inside, some partly or entirely outside, some tiny or degenerate."""
    Wi, Hi = W / scale, H / scale
    x1 = rng.uniform(-0.3 * Wi, 1.1 * Wi, K)
    y1 = rng.uniform(-0.3 * Hi, 1.1 * Hi, K)
    w = rng.uniform(0.0, 0.8 * Wi, K) * rng.choice([0.05, 1.0, 1.0, 1.0], K)
    h = rng.uniform(0.0, 0.8 * Hi, K) * rng.choice([0.05, 1.0, 1.0, 1.0], K)
    return np.stack([rng.integers(0, B, K), x1, y1, x1 + w, y1 + h], axis=1).astype(dtype)


def align_points(rois, offset, PH, PW, s, ratio, gamma):
    """Sample points (y, x) of every bin of deform_roi_pool (aligned, no minimum size), as a list
    indexed [k][ph][pw] of lists of points."""
    return [
        [
            [
                _align_samples(
                    roi,
                    ph,
                    pw,
                    PH,
                    PW,
                    s,
                    ratio,
                    0.5,
                    False,
                    gamma * offset[k, 0, ph, pw],
                    gamma * offset[k, 1, ph, pw],
                )[0]
                for pw in range(PW)
            ]
            for ph in range(PH)
        ]
        for k, roi in enumerate(rois)
    ]
