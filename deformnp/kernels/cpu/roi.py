"""CPU kernels of the RoI pooling family (see docs/ops/roi.rst and docs/ops/deform_roi.rst).

The kernel contract (the same functions and signatures as ``kernels/cuda/roi.py``; ``rois`` is
always the validated (K, 5) host array (batch_index, x1, y1, x2, y2) in the input's dtype,
``output_size`` a pair; backwards return one gradient per flag of ``needs``, None where it is
False):

    roi_align_forward(input, rois, output_size, spatial_scale, sampling_ratio, aligned)
    roi_align_backward(grad_out, rois, input_shape, output_size, spatial_scale,
                       sampling_ratio, aligned, needs) -> (grad_input,)
    ps_roi_align_forward(input, rois, output_size, spatial_scale, sampling_ratio)
    ps_roi_align_backward(grad_out, rois, input_shape, output_size, spatial_scale,
                          sampling_ratio, needs) -> (grad_input,)
    deform_roi_pool_forward(input, rois, offset, output_size, spatial_scale, sampling_ratio,
                            gamma)
    deform_roi_pool_backward(grad_out, input, rois, offset, output_size, spatial_scale,
                             sampling_ratio, gamma, needs) -> (grad_input, grad_offset)
    roi_pool_forward(input, rois, output_size, spatial_scale) -> (out, argmax)
    roi_pool_backward(grad_out, rois, argmax, input_shape, output_size, spatial_scale,
                      needs) -> (grad_input,)
    ps_roi_pool_forward(input, rois, output_size, spatial_scale)
    ps_roi_pool_backward(grad_out, rois, input_shape, output_size, spatial_scale, needs)
    deform_ps_roi_pool_forward(input, rois, offset, spatial_scale, output_dim, group_size,
                               pooled_size, part_size, sample_per_part, trans_std)
    deform_ps_roi_pool_backward(grad_out, input, rois, offset, spatial_scale, output_dim,
                                group_size, pooled_size, part_size, sample_per_part,
                                trans_std, needs) -> (grad_input, grad_offset)

How the work is laid out:

* The per-RoI geometry (bin starts and sizes, sampling grids, integer pooling bins) is computed
  once on the host, in the formulas' own words, by ``kernels/roi_geometry.py`` (NumPy, the
  pooling bins in a Numba loop; shared with CUDA).
* A bin of the RoI Align family samples through its *taps*: the distinct pixels its samples
  touch, each with the summed weight of the shared ``clamp_plan`` corners that hit it divided by
  the bin's sample count (and, for offset gradients, the summed d/dy and d/dx coefficients times
  d(coordinate)/d(offset)). ``_align_bin`` (and ``_dps_taps`` for deform_ps_roi_pool, and
  ``_ps_bin_taps`` for ps_roi_align: the same taps, built from the bin's rows and columns, as
  the clamp rule is separable) are the only places the ops sample. The forwards and
  ps_roi_align's backward build a bin's taps where they use them (plans fused, no taps stored;
  ps_roi_align keeps only each RoI's 1-D row and column runs, built once by ``ps_axes``); the
  roi_align / deform_roi_pool backwards and deform_ps_roi_pool use a *tap table* built by two
  float64 passes (count, fill) of ``_align_taps`` / ``_dps_taps``. The pooling ops (roi_pool,
  ps_roi_pool) read their integer bins directly.
* roi_align, deform_roi_pool and roi_pool (the benchmarked ops) work on a channels-last copy of
  the feature map, so each tap (pixel) is one contiguous, vectorised loop over the channels. Their
  forwards give a task one RoI: it fills a (bins, C) buffer that stays in cache, then writes
  out[k] (C, bins) from it; tasks visit the RoIs in a spatial order (``spatial_order``) so that
  neighbouring tasks read overlapping parts of the map while it is in cache. roi_pool keeps its
  running max and argmax in two alternating rows (whole-row vectorised selects; int32 argmax
  inside, stored in the argmax's type at the end).
* The position-sensitive ops read one channel per bin and work plane by plane on NCHW: a task
  owns input planes and handles every output that reads them (forward) or scatters into them
  (backward), so the planes stay in cache. ps_roi_align's and ps_roi_pool's tasks own (image,
  bin q), i.e. the planes co*PH*PW + q: a task walks bin q of each RoI once (ps_roi_align: builds
  its taps once) and reads or scatters eight of its planes per pixel or tap, in eight scalar
  sums held in registers (independent additions instead of one dependent chain; each sum keeps
  its order). ps_roi_pool first copies (forward) or accumulates (backward) those eight planes
  pixel-major in a private (H*W, 8) buffer, so a pixel's eight values are one contiguous run
  (its bins are a few pixels wide: walking eight strided planes cost more than the copy), when
  that buffer takes at most ``PS_BUFFER_BYTES`` (1 MiB, maps of up to 32,768 pixels in
  float32) and the task's bins cover enough pixels to pay for it (the backward: and are
  narrow); otherwise it works on the planes in place, so a thread never holds more.
  Hot loops index with unsigned offsets where an index cannot be negative (no wraparound
  check in the loop).
* Parallelism and determinism: forwards and offset gradients ``prange`` over RoIs or planes,
  each task writing only its own outputs (channel sums in a fixed order). Input gradients are
  owner computed: a task owns (image b, a band of input rows: roi_align / deform_roi_pool,
  accumulated channels-last in a private buffer, bins and RoIs that miss the band skipped),
  (image b, block of channels: roi_pool) or input planes (position-sensitive ops), and scatters
  into them from image b's RoIs in increasing order, so the order of the additions into any
  gradient element never depends on the thread count (or the banding/blocking): gradients are
  bit-identical with any number of threads.

Input gradients that their kernel writes whole (the band and plane tasks) start as
``np.empty``; roi_pool's (sparse scatter) starts as zeros.

Coordinates, plans and tap weights are float64. roi_align / deform_roi_pool / roi_pool run in
the data dtype (their channel loops accumulate in it); offset gradients sum in float64; the
position-sensitive ops read their input in its dtype, sum in float64 (ps_roi_align's gradient in
private float64 planes) and round their results, except ps_roi_pool's backward: a scatter of
g / area, it adds in the data dtype in torchvision's order, so its gradient is torchvision's bit
for bit (with private float64 planes, zeroed and rounded back, it took 1.7x the time: 4.0 ms
against 2.2-2.4 ms at one thread at the benchmark's reference size).
Indices are int64 throughout (roi_pool's argmax is stored in the smallest type holding H*W - 1).
"""

from __future__ import annotations

from typing import Any

import numba
import numpy as np
from numba import njit, prange

from ..roi_geometry import align_geometry, deform_ps_geometry, pool_bins
from .sampling import clamp_plan, threads_for

# ============================================================================ geometry (NumPy)


def by_image(batch: np.ndarray, B: int) -> tuple[np.ndarray, np.ndarray]:
    """RoIs grouped by image: ``order[starts[b]:starts[b+1]]`` are image b's RoIs, increasing."""
    order = np.argsort(batch, kind="stable").astype(np.int64)
    starts = np.searchsorted(batch[order], np.arange(B + 1)).astype(np.int64)
    return order, starts


def spatial_order(
    batch: np.ndarray, cy: np.ndarray, cx: np.ndarray, band: float = 8.0
) -> np.ndarray:
    """The order in which the channels-last forwards visit RoIs: by image, then by band of
    ``band`` feature rows of the box centre, then by the centre's column. Neighbouring tasks then
    read overlapping parts of the map while they are still in cache (at the large size this
    halves the forward's time). Each output has one writer, so no result depends on it."""
    with np.errstate(invalid="ignore"):
        rows = np.floor(np.asarray(cy, np.float64) / band)
    return np.lexsort((np.asarray(cx, np.float64), rows, batch)).astype(np.int64)


def channel_block(B: int, C: int, cb: int = 128) -> int:
    """Channels per input-gradient task: as many as possible (the per-tap work is a loop over
    them) while leaving two tasks per thread. The blocking never changes a result: every gradient
    element receives its terms in RoI order whatever the block size."""
    tasks = max(4, 2 * numba.get_num_threads())
    while cb > 8 and B * ((C + cb - 1) // cb) < tasks:
        cb //= 2
    return cb


def inverse_channel_map(cmap: np.ndarray, C: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """For each input channel cin, the (co, q) pairs with cmap[co, q] == cin, in increasing
    order: ``co[ofs[cin]:ofs[cin+1]]``, ``q[...]``."""
    NB = cmap.shape[1]
    flat = cmap.reshape(-1)
    order = np.argsort(flat, kind="stable")
    ofs = np.searchsorted(flat[order], np.arange(C + 1)).astype(np.int64)
    return ofs, (order // NB).astype(np.int64), (order % NB).astype(np.int64)


# ============================================================================ tap tables

_SLOTS = 32  # size of the direct-mapped table that finds a bin's earlier tap of the same pixel


@njit(inline="always", cache=True)
def _merge(idx, w, cy, cx, coefs, slot, ti, tw, tcy, tcx, t0, n):
    """Add one plan's corners to the taps ti/tw(/tcy/tcx)[t0:t0+n]; returns the new n.

    A corner whose pixel p is already a tap of the bin (found through slot[p % _SLOTS], which
    the caller resets to -1 for each bin) is summed into that tap, else appended; a corner with
    nothing to contribute (zero weight, and zero coefficients when ``coefs``) is dropped. Merging
    only regroups the terms of the sums (a slot collision just leaves two taps of one pixel).
    """
    for j in range(4):
        if w[j] == 0.0 and not (coefs and (cy[j] != 0.0 or cx[j] != 0.0)):
            continue
        p = idx[j]
        h = p % _SLOTS
        t = slot[h]
        if t >= 0 and ti[t] == p:
            tw[t] += w[j]
            if coefs:
                tcy[t] += cy[j]
                tcx[t] += cx[j]
        else:
            t = t0 + n
            slot[h] = t
            ti[t] = p
            tw[t] = w[j]
            if coefs:
                tcy[t] = cy[j]
                tcx[t] = cx[j]
            n += 1
    return n


@njit(inline="always", cache=True)
def _align_bin(fgeo, igeo, off, has_off, k, ph, pw, H, W, coefs, slot, si, sw, scy, scx):
    """Taps of bin (ph, pw) of RoI k (RoI Align family, docs/ops/roi.rst, deform_roi.rst) into
    si/sw/scy/scx[:n].

    y = start_y + ph*bin_h + (iy + 0.5)*bin_h/gh, x likewise, for iy < gh, ix < gw; with an
    offset, start_x += gamma*roi_w*offset[k, 0, ph, pw] and start_y += gamma*roi_h*offset[k, 1,
    ph, pw] first. Each sample is the shared ``clamp_plan``.
    """
    gh = igeo[k, 1]
    gw = igeo[k, 2]
    bh = fgeo[k, 2]
    bw = fgeo[k, 3]
    sy = fgeo[k, 0]
    sx = fgeo[k, 1]
    if has_off:
        sy = sy + fgeo[k, 4] * off[k, 1, ph, pw]
        sx = sx + fgeo[k, 5] * off[k, 0, ph, pw]
    ys = sy + ph * bh
    xs = sx + pw * bw
    slot[:] = -1
    n = 0
    for iy in range(gh):
        y = ys + (iy + 0.5) * bh / gh
        for ix in range(gw):
            x = xs + (ix + 0.5) * bw / gw
            idx, w, cy, cx = clamp_plan(y, x, H, W)
            n = _merge(idx, w, cy, cx, coefs, slot, si, sw, scy, scx, 0, n)
    return n


@njit(parallel=True, cache=True)
def _align_taps(fgeo, igeo, off, has_off, sl, PW, H, W, coefs, fill, ntap, tofs, ti, tw, tcy, tcx):
    """Tap table of the RoI Align family: bin q = ph*PW + pw of RoI k is set s = k*sl[0] +
    q*sl[2] (see ``set_layout``).

    Pass 1 (``fill`` False) counts the taps into ntap[s]; pass 2 writes them at tofs[s]:
    weights / count (count = max(gh*gw, 1)) and, when ``coefs``, the d/dy and d/dx coefficients
    times gamma*roi_h / count and gamma*roi_w / count: d out / d offset[k, 1|0, ph, pw].
    """
    K = igeo.shape[0]
    NB = ntap.shape[0] // max(K, 1)
    for k in prange(K):
        cap = max(4 * igeo[k, 1] * igeo[k, 2], 1)
        count = float(max(igeo[k, 1] * igeo[k, 2], 1))
        si = np.empty(cap, np.int64)
        sw = np.empty(cap, np.float64)
        scy = np.empty(cap if coefs else 1, np.float64)
        scx = np.empty(cap if coefs else 1, np.float64)
        slot = np.empty(_SLOTS, np.int64)
        for q in range(NB):
            ph = q // PW
            pw = q - ph * PW
            n = _align_bin(fgeo, igeo, off, has_off, k, ph, pw, H, W, coefs, slot, si, sw, scy, scx)
            s = k * sl[0] + q * sl[2]
            if not fill:
                ntap[s] = n
                continue
            t0 = tofs[s]
            for t in range(n):
                ti[t0 + t] = si[t]
                tw[t0 + t] = sw[t] / count
                if coefs:
                    tcy[t0 + t] = scy[t] * fgeo[k, 4] / count
                    tcx[t0 + t] = scx[t] * fgeo[k, 5] / count


@njit(parallel=True, cache=True)
def _dps_taps(
    fgeo,
    off,
    has_off,
    trans_std,
    part,
    spp,
    ncls,
    sl,
    PW,
    H,
    W,
    coefs,
    fill,
    ntap,
    tofs,
    ti,
    tw,
    tcy,
    tcx,
):
    """Tap table of deform_ps_roi_pool: bin q = ph*PW + pw of class cls of RoI k is set
    s = k*sl[0] + cls*sl[1] + q*sl[2] (see ``set_layout``).

    Bin (ph, pw) of class cls starts at hstart = ph*bin_h + start_h, then += ty*roi_h (wstart
    likewise with tx*roi_w), (tx, ty) = offset[k, 2*cls (+1), part_h, part_w] * trans_std.
    Samples at the sub-bin starts (hstart + ih*sub_h, wstart + iw*sub_w); a sample with
    w < -0.5 or w > W - 0.5 (h likewise, or NaN) is skipped; the others are clamped to [0, H-1]
    x [0, W-1] and interpolated, which is exactly ``clamp_plan`` on that range. Weights are
    divided by the number n of valid samples; coefficients are times trans_std*roi_h|w / n.
    """
    K = fgeo.shape[0]
    NB = ntap.shape[0] // max(K * ncls, 1)
    for k in prange(K):
        cap = 4 * spp * spp
        si = np.empty(cap, np.int64)
        sw = np.empty(cap, np.float64)
        scy = np.empty(cap if coefs else 1, np.float64)
        scx = np.empty(cap if coefs else 1, np.float64)
        slot = np.empty(_SLOTS, np.int64)
        for cls in range(ncls):
            for q in range(NB):
                ph = q // PW
                pw = q - ph * PW
                tx = 0.0
                ty = 0.0
                if has_off:
                    tx = off[k, 2 * cls, part[ph], part[pw]] * trans_std
                    ty = off[k, 2 * cls + 1, part[ph], part[pw]] * trans_std
                hstart = ph * fgeo[k, 2] + fgeo[k, 0]
                hstart += ty * fgeo[k, 6]
                wstart = pw * fgeo[k, 3] + fgeo[k, 1]
                wstart += tx * fgeo[k, 7]
                slot[:] = -1
                n = 0
                nvalid = 0
                for ih in range(spp):
                    for iw in range(spp):
                        w = wstart + iw * fgeo[k, 5]
                        h = hstart + ih * fgeo[k, 4]
                        if not (w >= -0.5 and w <= W - 0.5 and h >= -0.5 and h <= H - 0.5):
                            continue
                        nvalid += 1
                        idx, wt, cy, cx = clamp_plan(h, w, H, W)
                        n = _merge(idx, wt, cy, cx, coefs, slot, si, sw, scy, scx, 0, n)
                s = k * sl[0] + cls * sl[1] + q * sl[2]
                if not fill:
                    ntap[s] = n
                    continue
                t0 = tofs[s]
                for t in range(n):
                    ti[t0 + t] = si[t]
                    tw[t0 + t] = sw[t] / nvalid
                    if coefs:
                        tcy[t0 + t] = scy[t] * trans_std * fgeo[k, 6] / nvalid
                        tcx[t0 + t] = scx[t] * trans_std * fgeo[k, 7] / nvalid


def set_layout(K: int, ncls: int, NB: int, bin_major: bool) -> np.ndarray:
    """Strides (RoI, class, bin) of tap set ids. RoI-major keeps a RoI's sets together (the
    channels-last kernels loop over RoIs); bin-major keeps a bin's sets together for all RoIs (the
    plane-by-plane kernels of the position-sensitive ops read one bin for every RoI)."""
    if bin_major:
        return np.array([ncls, 1, K * ncls], np.int64)
    return np.array([ncls * NB, NB, 1], np.int64)


def _table(build, args: tuple, nsets: int, coefs: bool) -> tuple:
    """Run a two-pass tap-table builder: (tofs, ti, tw, tcy, tcx)."""
    ntap = np.zeros(nsets, np.int64)
    one_i = np.zeros(1, np.int64)
    one_f = np.zeros(1, np.float64)
    build(*args, coefs, False, ntap, one_i, one_i, one_f, one_f, one_f)
    tofs = np.zeros(nsets + 1, np.int64)
    np.cumsum(ntap, out=tofs[1:])
    T = max(int(tofs[-1]), 1)
    ti = np.zeros(T, np.int64)
    tw = np.zeros(T, np.float64)
    tcy = np.zeros(T if coefs else 1, np.float64)
    tcx = np.zeros(T if coefs else 1, np.float64)
    build(*args, coefs, True, ntap, tofs, ti, tw, tcy, tcx)
    return tofs, ti, tw, tcy, tcx


# ============================================================================ gathers and scatters


@njit(parallel=True, cache=True)
def _align_gather_nhwc(xh, fgeo, igeo, off, has_off, perm, out):
    """RoI Align / deform_roi_pool forward, plans fused: out[k, c, ph, pw] = sum over the taps
    (p, w) of bin (ph, pw) of RoI k (``_align_bin``, weights / count) of w * xh[b, p, c].

    A task owns a RoI (RoIs visited in ``perm``'s order): it builds each bin's taps (the shared ``clamp_plan`` corners, merged) and
    sums their rows of contiguous channels, one vectorised loop per tap, into a (bins, C) buffer
    that stays in L1/L2 (the sum runs in the data dtype, taps in sample order), then writes
    out[k] (C, bins) from it. No tap table is stored."""
    B, H, W, C = xh.shape
    K, _, PH, PW = out.shape
    NB = PH * PW
    HW = H * W
    xf = xh.reshape(-1)
    dummy = np.zeros(1, np.float64)
    for i in prange(K):
        k = perm[i]
        b = igeo[k, 0]
        cap = max(4 * igeo[k, 1] * igeo[k, 2], 1)
        count = float(max(igeo[k, 1] * igeo[k, 2], 1))
        si = np.empty(cap, np.int64)
        sw = np.empty(cap, np.float64)
        slot = np.empty(_SLOTS, np.int64)
        buf = np.zeros((NB, C), xh.dtype)
        for q in range(NB):
            ph = q // PW
            pw = q - ph * PW
            n = _align_bin(fgeo, igeo, off, has_off, k, ph, pw, H, W, False, slot, si, sw, dummy, dummy)  # fmt: skip
            acc = buf[q]
            for t in range(n):
                base = (b * HW + si[t]) * C
                row = xf[base : base + C]  # a slice: the loop below vectorises
                wt = xf.dtype.type(sw[t] / count)
                for c in range(C):
                    acc[c] += wt * row[c]
        ok = out[k].reshape(C, NB)
        for c in range(C):
            for q in range(NB):
                ok[c, q] = buf[q, c]


@njit(parallel=True, cache=True)
def _set_rows(tofs, ti, W, NB, rlo, rhi):
    """Row span of each tap set s (rlo[s] > rhi[s] when empty) and, at rlo/rhi[nsets + k], of
    RoI k's NB sets: what lets a band task skip the bins that cannot touch its rows."""
    K = (tofs.shape[0] - 1) // NB
    nsets = K * NB
    for k in prange(K):
        klo = np.int64(2**62)
        khi = np.int64(-1)
        for s in range(k * NB, (k + 1) * NB):
            lo = np.int64(2**62)
            hi = np.int64(-1)
            for t in range(tofs[s], tofs[s + 1]):
                r = ti[t] // W
                lo = min(lo, r)
                hi = max(hi, r)
            rlo[s] = lo
            rhi[s] = hi
            klo = min(klo, lo)
            khi = max(khi, hi)
        rlo[nsets + k] = klo
        rhi[nsets + k] = khi


@njit(parallel=True, cache=True)
def _scatter_bands(gout, tofs, ti, tw, rlo, rhi, order, starts, rows, gin):
    """gin[b, c, p] = sum of w * gout[k, c, ph, pw] over every tap (p, w) of every bin of image
    b's RoIs k, added in increasing k (then bin, then tap). A task owns (image b, a band of
    ``rows`` input rows): it accumulates, in a private channels-last (rows*W, C) buffer in the
    data dtype, the taps that fall in its band (one contiguous loop over the channels per tap;
    bins and RoIs whose rows miss the band are skipped), then writes gin[b, :, band]. The order
    of the additions into an element never depends on the banding or the thread count."""
    K, C, PH, PW = gout.shape
    B, _, H, W = gin.shape
    NB = PH * PW
    HW = H * W
    nsets = K * NB
    nband = (H + rows - 1) // rows
    gf = gin.reshape(-1)
    for task in prange(B * nband):
        b = task // nband
        r0 = (task - b * nband) * rows
        r1 = min(r0 + rows, H)
        p0 = r0 * W
        p1 = r1 * W
        acc = np.zeros((p1 - p0) * C, gout.dtype)
        gt = np.empty((NB, C), gout.dtype)
        for r in range(starts[b], starts[b + 1]):
            k = order[r]
            if rhi[nsets + k] < r0 or rlo[nsets + k] >= r1:
                continue
            # the bins qa..qb that may touch the band: their gout[k] columns, channels-last
            qa = NB
            qb = -1
            for q in range(NB):
                s = k * NB + q
                if rhi[s] >= r0 and rlo[s] < r1:
                    qa = min(qa, q)
                    qb = q
            gk = gout[k].reshape(C, NB)
            for c in range(C):
                for q in range(qa, qb + 1):
                    gt[q, c] = gk[c, q]
            for q in range(qa, qb + 1):
                s = k * NB + q
                if rhi[s] < r0 or rlo[s] >= r1:
                    continue
                g = gt[q]
                for t in range(tofs[s], tofs[s + 1]):
                    p = ti[t]
                    if p < p0 or p >= p1:
                        continue
                    base = (p - p0) * C
                    row = acc[base : base + C]
                    wt = acc.dtype.type(tw[t])
                    for c in range(C):
                        row[c] += wt * g[c]
        for j0 in range(0, p1 - p0, 16):
            j1 = min(j0 + 16, p1 - p0)
            for c in range(C):
                dst = (b * C + c) * HW + p0
                for j in range(j0, j1):
                    gf[dst + j] = acc[j * C + c]


def band_rows(H: int, W: int, C: int, itemsize: int, target: int = 1 << 20) -> int:
    """Input rows per input-gradient band: a (rows*W, C) accumulator of about ``target`` bytes,
    at least one row. The banding never changes a result."""
    return max(1, min(H, target // max(1, W * C * itemsize)))


@njit(inline="always", cache=True)
def _clamp_axis(start, step, g, size, along_y, pos, wt):
    """One axis of a bin's sample grid under the clamp rule: the samples start + (i + 0.5) *
    step / g (i < g; ``_align_bin``'s positions) as distinct pixels ``pos[:n]`` (increasing) with
    their summed weights ``wt[:n]``; returns n, at most min(2 * g, size) (distinct increasing
    pixels in [0, size), at most two a sample; samples out of range add nothing). It writes
    only pos[:n] and wt[:n].

    ``clamp_plan`` is separable: its corner weights at (y, x) on an H x W map are the products
    of its weights at (y, 0) on an H x 1 map (rows y0, y1: w[0], w[2]) and at (0, x) on a 1 x W
    map (columns x0, x1: w[0], w[1]), and it is out of range exactly when one factor is. So a
    bin's taps are the products of its rows' and its columns' summed weights. The samples are
    visited in increasing position (backwards when step < 0: ps_roi_align has no minimum box
    size), so a sample's first pixel is the last or the second-to-last one so far, or new.
    """
    n = 0
    for ii in range(g):
        i = g - 1 - ii if step < 0.0 else ii
        c = start + (i + 0.5) * step / g
        if along_y:
            idx, w, _, _ = clamp_plan(c, 0.0, size, 1)
            a = idx[0]
            b = idx[2]
            wa = w[0]
            wb = w[2]
        else:
            idx, w, _, _ = clamp_plan(0.0, c, 1, size)
            a = idx[0]
            b = idx[1]
            wa = w[0]
            wb = w[1]
        if wa == 0.0:  # out of range (in range, the first weight is 1 - frac > 0)
            continue
        if n > 0 and pos[n - 1] == a:
            wt[n - 1] += wa
        elif n > 1 and pos[n - 2] == a:
            wt[n - 2] += wa
        else:
            pos[n] = a
            wt[n] = wa
            n += 1
        if pos[n - 1] == b:  # b = a, or a + 1: never below the last pixel
            wt[n - 1] += wb
        else:
            pos[n] = b
            wt[n] = wb
            n += 1
    return n


@njit(inline="always", cache=True)
def _axis_runs(start, step, g, size, along_y, nb, k, s, pos, wt, cnt):
    """RoI k's runs along one axis (``_clamp_axis``): run i = k*nb + t (bin t, starting at
    start + t*step, g samples) in pos / wt [s[i], s[i] + cnt[i])."""
    for t in range(nb):
        i = k * nb + t
        a = s[i]
        e = s[i + 1]
        cnt[i] = _clamp_axis(start + t * step, step, g, size, along_y, pos[a:e], wt[a:e])


@njit(parallel=True, cache=True)
def _ps_axes(fgeo, igeo, PH, PW, H, W, rows, cols):
    """Every RoI's row runs (bin row ph: run k*PH + ph) and column runs (k*PW + pw)."""
    rs, rpos, rw, rn = rows
    cs, cpos, cw, cn = cols
    for k in prange(fgeo.shape[0]):
        _axis_runs(fgeo[k, 0], fgeo[k, 2], igeo[k, 1], H, True, PH, k, rs, rpos, rw, rn)
        _axis_runs(fgeo[k, 1], fgeo[k, 3], igeo[k, 2], W, False, PW, k, cs, cpos, cw, cn)


def _run_slots(g: np.ndarray, nb: int, size: int) -> tuple[np.ndarray, ...]:
    """Empty runs (s, pos, wt, cnt) for nb bins a RoI along an axis of ``size`` pixels, g
    samples a bin: each run's slot takes min(2*g, size) entries."""
    width = np.minimum(2 * np.minimum(g, size), size)  # no overflow for any g >= 0
    s = np.zeros(len(g) * nb + 1, np.int64)
    np.cumsum(np.repeat(width, nb), out=s[1:])
    pos, wt = np.empty(s[-1], np.int32), np.empty(s[-1], np.float64)
    return s, pos, wt, np.empty(len(g) * nb, np.int32)


def ps_axes(
    fgeo: np.ndarray, igeo: np.ndarray, output_size: tuple[int, int], H: int, W: int
) -> tuple[tuple[np.ndarray, ...], int]:
    """Each RoI's row runs (bin row ph: run k*PH + ph) and column runs (k*PW + pw), built once
    per RoI (PH + PW runs, not 2*PH*PW), as (rs, rpos, rw, rn, cs, cpos, cw, cn) (``_ps_axes``),
    and ``cap``, a bound on any bin's taps (the longest row run times the longest column run
    over all RoIs: the kernels' scratch size). A bin's taps are products of one row run and one
    column run (``_ps_bin_taps``).

    A run holds distinct pixels of one axis, at most 2 per sample and at most the axis length,
    so RoI k's runs take PH*min(2*gh, H) + PW*min(2*gw, W) entries (int32 pixel, float64
    weight). For 512 RoIs of 7 x 7 bins of 2 x 2 samples: 0.33 MiB of runs, 0.41 MiB with the
    offsets and counts. Requires H, W > 0."""
    PH, PW = output_size
    rows = _run_slots(igeo[:, 1], PH, H)
    cols = _run_slots(igeo[:, 2], PW, W)
    _ps_axes(fgeo, igeo, PH, PW, H, W, rows, cols)
    cap = int(rows[3].max(initial=0)) * int(cols[3].max(initial=0))
    return rows + cols, max(cap, 1)


@njit(inline="always", cache=True)
def _ps_bin_taps(igeo, k, ph, pw, PH, PW, W, axes, si, sw):
    """The taps of bin (ph, pw) of RoI k (no offset) into si / sw: the products of the bin's row
    and column weights (``ps_axes``' runs) divided by its sample count (ps_roi_align averages its
    samples); pixels of zero weight are left out, as ``_align_bin`` leaves them. Returns their
    number. The same taps as ``_align_bin``'s, in row-major order, each weight summed as
    (sum over rows)(sum over columns) instead of term by term: equal to float64 rounding.
    Profile at the benchmark's reference size (one thread): building the taps from rows and
    columns takes 25-30% less time than through ``_align_bin`` (four 2-D plans and sixteen
    hashed merges a bin of 2 x 2 samples), the forward 8-12% less; the runs built once per RoI
    instead of once per bin (``ps_axes``) take another 13-20% off the whole forward."""
    rs, rpos, rw, rn, cs, cpos, cw, cn = axes
    i = k * PH + ph
    j = k * PW + pw
    count = float(max(igeo[k, 1] * igeo[k, 2], 1))
    n = 0
    for a in range(rs[i], rs[i] + rn[i]):
        wy = rw[a]
        if wy == 0.0:
            continue
        row = np.int64(rpos[a]) * W
        for c in range(cs[j], cs[j] + cn[j]):
            wx = cw[c]
            if wx == 0.0:
                continue
            si[n] = row + cpos[c]
            sw[n] = wy * wx / count
            n += 1
    return n


@njit(parallel=True, cache=True)
def _ps_align_forward(x, igeo, axes, cap, order, starts, out):
    """ps_roi_align, plans fused: out[k, co, ph, pw] = sum over the taps (p, w) of bin q = ph*PW
    + pw of RoI k (``_ps_bin_taps``, weights / count) of w * x[b, co*PH*PW + q, p], summed in
    float64 (NCHW input, any float dtype). ``axes`` and ``cap``: ``ps_axes``' runs and its bound
    on a bin's taps (the scratch size). A task owns (image b, bin q): the input planes co*NB + q
    that only bin q reads; it builds bin q's taps once per RoI of image b and reads each tap from
    eight of its planes at a time (eight independent sums, each in tap order). Each output has
    one writer."""
    B, C, H, W = x.shape
    K, Cout, PH, PW = out.shape
    NB = PH * PW
    xf = x.reshape(-1)
    of = out.reshape(-1)
    for task in prange(B * NB):
        b = task // NB
        q = task - b * NB
        ph = q // PW
        pw = q - ph * PW
        si = np.empty(cap, np.int64)
        sw = np.empty(cap, np.float64)
        base = np.uint64((b * C + q) * H * W)  # plane co*NB + q of image b: base + co*cs
        cs = np.uint64(NB * H * W)
        for r in range(starts[b], starts[b + 1]):
            k = order[r]
            n = _ps_bin_taps(igeo, k, ph, pw, PH, PW, W, axes, si, sw)
            # eight planes at a time, in eight sums that stay in registers (each in tap order)
            for c0 in range(0, Cout - 7, 8):
                p0 = base + np.uint64(c0) * cs
                s0 = 0.0
                s1 = 0.0
                s2 = 0.0
                s3 = 0.0
                s4 = 0.0
                s5 = 0.0
                s6 = 0.0
                s7 = 0.0
                for t in range(n):
                    wt = sw[t]
                    p = p0 + np.uint64(si[t])
                    s0 += wt * np.float64(xf[p])
                    s1 += wt * np.float64(xf[p + cs])
                    s2 += wt * np.float64(xf[p + np.uint64(2) * cs])
                    s3 += wt * np.float64(xf[p + np.uint64(3) * cs])
                    s4 += wt * np.float64(xf[p + np.uint64(4) * cs])
                    s5 += wt * np.float64(xf[p + np.uint64(5) * cs])
                    s6 += wt * np.float64(xf[p + np.uint64(6) * cs])
                    s7 += wt * np.float64(xf[p + np.uint64(7) * cs])
                oc = k * Cout * NB + c0 * NB + q
                of[oc] = s0
                of[oc + NB] = s1
                of[oc + 2 * NB] = s2
                of[oc + 3 * NB] = s3
                of[oc + 4 * NB] = s4
                of[oc + 5 * NB] = s5
                of[oc + 6 * NB] = s6
                of[oc + 7 * NB] = s7
            for co in range(Cout - Cout % 8, Cout):
                p0 = base + np.uint64(co) * cs
                s0 = 0.0
                for t in range(n):
                    s0 += sw[t] * np.float64(xf[p0 + np.uint64(si[t])])
                of[k * Cout * NB + co * NB + q] = s0


@njit(parallel=True, cache=True)
def _ps_align_backward(gout, igeo, axes, cap, order, starts, gin):
    """The adjoint of ``_ps_align_forward``: a task owns (image b, bin q), i.e. the gradient
    planes co*NB + q, and adds w * gout[k, co, ph, pw] at each tap of bin q of image b's RoIs k,
    in increasing k (then tap order), in private float64 planes that it then rounds into gin
    (``axes``, ``cap``: as the forward's)."""
    B, C, H, W = gin.shape
    K, Cout, PH, PW = gout.shape
    NB = PH * PW
    HW = H * W
    uHW = np.uint64(HW)
    go = gout.reshape(-1)
    for task in prange(B * NB):
        b = task // NB
        q = task - b * NB
        ph = q // PW
        pw = q - ph * PW
        si = np.empty(cap, np.int64)
        sw = np.empty(cap, np.float64)
        acc = np.zeros((Cout, HW), np.float64)
        af = acc.reshape(-1)
        for r in range(starts[b], starts[b + 1]):
            k = order[r]
            n = _ps_bin_taps(igeo, k, ph, pw, PH, PW, W, axes, si, sw)
            # eight planes at a time, their gradients in registers, each tap adding to all
            # eight (unsigned offsets: no negative-index wraparound in the loop); then the
            # remaining planes one by one. Each element still receives its terms in tap order.
            o = k * Cout * NB + q
            for c0 in range(0, Cout - 7, 8):
                g0 = np.float64(go[o + c0 * NB])
                g1 = np.float64(go[o + (c0 + 1) * NB])
                g2 = np.float64(go[o + (c0 + 2) * NB])
                g3 = np.float64(go[o + (c0 + 3) * NB])
                g4 = np.float64(go[o + (c0 + 4) * NB])
                g5 = np.float64(go[o + (c0 + 5) * NB])
                g6 = np.float64(go[o + (c0 + 6) * NB])
                g7 = np.float64(go[o + (c0 + 7) * NB])
                a0 = np.uint64(c0 * HW)
                for t in range(n):
                    wt = sw[t]
                    p = a0 + np.uint64(si[t])
                    af[p] += wt * g0
                    af[p + uHW] += wt * g1
                    af[p + np.uint64(2) * uHW] += wt * g2
                    af[p + np.uint64(3) * uHW] += wt * g3
                    af[p + np.uint64(4) * uHW] += wt * g4
                    af[p + np.uint64(5) * uHW] += wt * g5
                    af[p + np.uint64(6) * uHW] += wt * g6
                    af[p + np.uint64(7) * uHW] += wt * g7
            for co in range(Cout - Cout % 8, Cout):
                g0 = np.float64(go[o + co * NB])
                a0 = np.uint64(co * HW)
                for t in range(n):
                    af[a0 + np.uint64(si[t])] += sw[t] * g0
        for co in range(Cout):
            plane = gin[b, co * NB + q].reshape(-1)
            for p in range(HW):
                plane[p] = acc[co, p]


@njit(parallel=True, cache=True)
def _gather_cmap(x, tofs, ti, tw, sl, order, starts, inv_ofs, inv_co, inv_q, cec, out):
    """out[k, co, ph, pw] = sum over the taps (p, w) of set k*sl[0] + (co//cec)*sl[1] + q*sl[2]
    of w * x[batch[k], cmap[co, q], p], q = ph*PW + pw (NCHW input). A task owns one input plane
    (b, cin): it computes every output that reads cin, for image b's RoIs, so the plane stays in
    cache; each output reads exactly one plane, so it has exactly one writer."""
    B, C, H, W = x.shape
    K, Cout, PH, PW = out.shape
    NB = PH * PW
    HW = H * W
    xf = x.reshape(-1)
    of = out.reshape(-1)
    for task in prange(B * C):
        b = task // C
        cin = task - b * C
        plane = xf[task * HW : (task + 1) * HW]
        for e in range(inv_ofs[cin], inv_ofs[cin + 1]):
            co = inv_co[e]
            q = inv_q[e]
            s_cq = (co // cec) * sl[1] + q * sl[2]
            o_cq = co * NB + q
            for r in range(starts[b], starts[b + 1]):
                k = order[r]
                s = k * sl[0] + s_cq
                acc = 0.0
                for t in range(tofs[s], tofs[s + 1]):
                    acc += tw[t] * plane[ti[t]]
                of[k * Cout * NB + o_cq] = acc


@njit(parallel=True, cache=True)
def _scatter_cmap(gout, tofs, ti, tw, sl, order, starts, inv_ofs, inv_co, inv_q, cec, gin):
    """The adjoint of ``_gather_cmap``: a task owns one input plane (b, cin) and adds, for every
    (co, q) reading cin and image b's RoIs k in increasing order, w * gout[k, co, q] at each tap
    (the order of the additions into a gradient element: (co, q) pairs, then RoIs, then taps), in
    a private float64 plane that it then rounds into gin's plane (any float dtype)."""
    B, C, H, W = gin.shape
    K, Cout, PH, PW = gout.shape
    NB = PH * PW
    HW = H * W
    gf = gin.reshape(-1)
    go = gout.reshape(-1)
    for task in prange(B * C):
        b = task // C
        cin = task - b * C
        plane = np.zeros(HW, np.float64)
        for e in range(inv_ofs[cin], inv_ofs[cin + 1]):
            co = inv_co[e]
            q = inv_q[e]
            s_cq = (co // cec) * sl[1] + q * sl[2]
            o_cq = co * NB + q
            for r in range(starts[b], starts[b + 1]):
                k = order[r]
                g = np.float64(go[k * Cout * NB + o_cq])
                s = k * sl[0] + s_cq
                for t in range(tofs[s], tofs[s + 1]):
                    plane[ti[t]] += tw[t] * g
        for p in range(HW):
            gf[task * HW + p] = plane[p]


@njit(parallel=True, cache=True)
def _dots(xh, gout, batch, tofs, ti, tcy, tcx, sl, cmap, cec, ncls, identity, dots):
    """Offset gradients per tap set s = k*sl[0] + cls*sl[1] + q*sl[2]: dots[s] = sum over the class's
    channels i of gout[k, c0 + i, q] * Y[i], Y = sum over the taps (p, cy, cx) of (cy, cx) *
    xh[b, p, cmap[c0 + i, q]] (channels-last input; ``identity``: cmap[c, q] = c, a contiguous
    loop). A task owns one RoI; sums in a fixed order."""
    B, H, W, C = xh.shape
    K, Cout, PH, PW = gout.shape
    NB = PH * PW
    HW = H * W
    xf = xh.reshape(-1)
    for k in prange(K):
        b = batch[k]
        yy = np.empty(cec, np.float64)
        yx = np.empty(cec, np.float64)
        for cls in range(ncls):
            c0 = cls * cec
            for q in range(NB):
                s = k * sl[0] + cls * sl[1] + q * sl[2]
                if tofs[s + 1] == tofs[s]:
                    continue
                ph = q // PW
                pw = q - ph * PW
                yy[:] = 0.0
                yx[:] = 0.0
                for t in range(tofs[s], tofs[s + 1]):
                    base = (b * HW + ti[t]) * C
                    cy = tcy[t]
                    cx = tcx[t]
                    if identity:
                        row = xf[base + c0 : base + c0 + cec]  # a slice: vectorises
                        for i in range(cec):
                            v = row[i]
                            yy[i] += cy * v
                            yx[i] += cx * v
                    else:
                        for i in range(cec):
                            v = xf[base + cmap[c0 + i, q]]
                            yy[i] += cy * v
                            yx[i] += cx * v
                ay = 0.0
                ax = 0.0
                for i in range(cec):
                    g = gout[k, c0 + i, ph, pw]
                    ay += g * yy[i]
                    ax += g * yx[i]
                dots[s, 0] = ay
                dots[s, 1] = ax


# ============================================================================ RoI max pooling


@njit(parallel=True, cache=True)
def _pool_forward_nhwc(xh, batch, hs, he, ws, we, perm, awork, out, argmax):
    """Max over each bin [hs, he) x [ws, we), the first maximum in row-major order winning (NaN
    counts as the maximum, the first NaN wins: numpy.argmax over the bin); empty bin: 0, -1.
    Channels-last input: each pixel is one contiguous, vectorised select over the channels. A
    task owns a RoI (RoIs visited in ``perm``'s order): it pools its bins into a (bins, C) buffer (the running max and argmax
    alternate between two rows, so the select stores whole rows; the argmax is in ``awork``'s
    type, int32 when H*W fits, whatever ``argmax``'s type), then writes out[k] and argmax[k]."""
    B, H, W, C = xh.shape
    K, _, PH, PW = out.shape
    NB = PH * PW
    HW = H * W
    xf = xh.reshape(-1)
    for i in prange(K):
        k = perm[i]
        b = batch[k]
        mb = np.empty((NB, C), xh.dtype)
        ab = np.empty((NB, C), awork.dtype)
        m2 = np.empty((2, C), xh.dtype)
        a2 = np.empty((2, C), awork.dtype)
        for q in range(NB):
            ph = q // PW
            pw = q - ph * PW
            h0 = hs[k, ph]
            h1 = he[k, ph]
            w0 = ws[k, pw]
            w1 = we[k, pw]
            if h1 <= h0 or w1 <= w0:
                mb[q, :] = 0.0
                ab[q, :] = -1
                continue
            p0 = h0 * W + w0
            base = (b * HW + p0) * C
            m2[0, :] = xf[base : base + C]
            a2[0, :] = p0
            cur = 0
            for h in range(h0, h1):
                for w in range(w0, w1):
                    p = h * W + w
                    if p == p0:
                        continue
                    base = (b * HW + p) * C
                    row = xf[base : base + C]  # a slice: the loop below vectorises
                    mi = m2[cur]
                    ai = a2[cur]
                    mo = m2[1 - cur]
                    ao = a2[1 - cur]
                    pa = awork.dtype.type(p)
                    for c in range(C):
                        v = row[c]
                        mc = mi[c]
                        ac = ai[c]
                        take = (v > mc) | ((v != v) & (mc == mc))
                        mo[c] = v if take else mc
                        ao[c] = pa if take else ac
                    cur = 1 - cur
            mb[q, :] = m2[cur]
            ab[q, :] = a2[cur]
        ok = out[k].reshape(C, NB)
        ak = argmax[k].reshape(C, NB)
        for c in range(C):
            for q in range(NB):
                ok[c, q] = mb[q, c]
                ak[c, q] = ab[q, c]


@njit(parallel=True, cache=True)
def _argmax_scatter(gout, argmax, order, starts, cb, gin):
    """gin[b, c, argmax[k, c, q]] += gout[k, c, q] over image b's RoIs k in increasing order; a
    task owns (image b, a block of cb channels) and reads each RoI's block contiguously."""
    B, C, H, W = gin.shape
    K, _, PH, PW = gout.shape
    NB = PH * PW
    HW = H * W
    gf = gin.reshape(-1)
    go = gout.reshape(-1)
    am = argmax.reshape(-1)
    nblk = (C + cb - 1) // cb
    for task in prange(B * nblk):
        b = task // nblk
        c0 = (task - b * nblk) * cb
        c1 = min(c0 + cb, C)
        for r in range(starts[b], starts[b + 1]):
            k = order[r]
            for c in range(c0, c1):
                # unsigned offsets: no negative-index wraparound in the loop (a >= 0 here)
                src = np.uint64((k * C + c) * NB)
                dst = np.uint64((b * C + c) * HW)
                for q in range(NB):
                    a = am[src + np.uint64(q)]
                    if a >= 0:
                        gf[dst + np.uint64(a)] += go[src + np.uint64(q)]


# ============================================================================ PS RoI average pooling


PS_LANES = 8  # ps_roi_pool: planes a task handles together (its loops spell out eight lanes)
PS_BUFFER_BYTES = 1 << 20  # ps_roi_pool: the most a task's pixel-major copy of them may take


@njit(inline="always", cache=True)
def _ps_bin(hs, he, ws, we, k, ph, pw):
    """Bin (ph, pw) of RoI k: rows [h0, h1), columns [w0, w1) (empty when h1 <= h0 or w1 <= w0)."""
    return hs[k, ph], he[k, ph], ws[k, pw], we[k, pw]


@njit(inline="always", cache=True)
def _ps_bin_visits(hs, he, ws, we, order, starts, b, ph, pw):
    """(pixels, rows) that bin (ph, pw) of image b's RoIs covers, summed over the RoIs: how much
    work a ps_roi_pool task has, and how wide its bins are on average."""
    pixels = 0
    rows = 0
    for r in range(starts[b], starts[b + 1]):
        h0, h1, w0, w1 = _ps_bin(hs, he, ws, we, order[r], ph, pw)
        dh = h1 - h0
        dw = w1 - w0
        if dh > 0 and dw > 0:
            pixels += dh * dw
            rows += dh
    return pixels, rows


@njit(inline="always", cache=True)
def _ps_sum_bin(a, at, ps, ls, h0, h1, w0, w1, W):
    """Eight float64 sums, in row-major order over the bin [h0, h1) x [w0, w1), of lane l's
    values a[at + (h*W + w)*ps + l*ls] (l < 8): eight independent chains of additions."""
    s0 = 0.0
    s1 = 0.0
    s2 = 0.0
    s3 = 0.0
    s4 = 0.0
    s5 = 0.0
    s6 = 0.0
    s7 = 0.0
    for h in range(h0, h1):
        for w in range(w0, w1):
            e = at + np.uint64(h * W + w) * ps
            s0 += np.float64(a[e])
            s1 += np.float64(a[e + ls])
            s2 += np.float64(a[e + np.uint64(2) * ls])
            s3 += np.float64(a[e + np.uint64(3) * ls])
            s4 += np.float64(a[e + np.uint64(4) * ls])
            s5 += np.float64(a[e + np.uint64(5) * ls])
            s6 += np.float64(a[e + np.uint64(6) * ls])
            s7 += np.float64(a[e + np.uint64(7) * ls])
    return s0, s1, s2, s3, s4, s5, s6, s7


@njit(inline="always", cache=True)
def _ps_add_bin(buf, h0, h1, w0, w1, W, g):
    """buf[(h*W + w)*8 + l] += g[l] (l < 8) over the bin [h0, h1) x [w0, w1) of a pixel-major
    buffer: one vector add a pixel."""
    g0, g1, g2, g3, g4, g5, g6, g7 = g
    for h in range(h0, h1):
        for w in range(w0, w1):
            e = np.uint64((h * W + w) * 8)
            buf[e] += g0
            buf[e + np.uint64(1)] += g1
            buf[e + np.uint64(2)] += g2
            buf[e + np.uint64(3)] += g3
            buf[e + np.uint64(4)] += g4
            buf[e + np.uint64(5)] += g5
            buf[e + np.uint64(6)] += g6
            buf[e + np.uint64(7)] += g7


@njit(parallel=True, cache=True)
def _ps_pool_forward(x, hs, he, ws, we, order, starts, out):
    """out[k, co, ph, pw] = mean of input plane co*PH*PW + q, q = ph*PW + pw, over the bin
    [hs, he) x [ws, we) (0 when empty), summed in float64 in row-major order. A task owns
    (image b, bin q), i.e. the planes co*PH*PW + q that only bin q reads. Eight planes at a time
    it walks bin q of each of image b's RoIs once, adding each pixel's eight values into eight
    sums (independent additions instead of one dependent chain), read from a pixel-major copy of
    the eight planes (``buf``: a pixel's eight values side by side) when that copy fits
    PS_BUFFER_BYTES and the bins read at least H*W/16 pixels in all, from the planes themselves
    otherwise; the last Cout % 8 planes are summed one by one. Each output's sum keeps its
    row-major order; each output has one writer. Either way the sums are the same."""
    B, C, H, W = x.shape
    K, Cout, PH, PW = out.shape
    NB = PH * PW
    HW = H * W
    L = PS_LANES
    xf = x.reshape(-1)
    of = out.reshape(-1)
    for task in prange(B * NB):
        b = task // NB
        q = task - b * NB
        ph = q // PW
        pw = q - ph * PW
        base = np.uint64((b * C + q) * HW)  # plane co*NB + q of image b: base + co*cs
        cs = np.uint64(NB * HW)
        pixels, _ = _ps_bin_visits(hs, he, ws, we, order, starts, b, ph, pw)
        groups = Cout // L
        # the pixel-major copy (8*H*W values) when it fits and the bins read enough pixels
        copy = HW * L * x.itemsize <= PS_BUFFER_BYTES and 16 * pixels >= HW
        buf = np.empty(HW * L if groups > 0 and copy else 0, x.dtype)
        for grp in range(groups):
            c0 = grp * L
            src = base + np.uint64(c0) * cs
            if copy:
                for p in range(HW):  # buf[p*8 + l] = plane c0 + l at pixel p
                    up = np.uint64(p)
                    d = np.uint64(p * L)
                    buf[d] = xf[src + up]
                    buf[d + np.uint64(1)] = xf[src + cs + up]
                    buf[d + np.uint64(2)] = xf[src + np.uint64(2) * cs + up]
                    buf[d + np.uint64(3)] = xf[src + np.uint64(3) * cs + up]
                    buf[d + np.uint64(4)] = xf[src + np.uint64(4) * cs + up]
                    buf[d + np.uint64(5)] = xf[src + np.uint64(5) * cs + up]
                    buf[d + np.uint64(6)] = xf[src + np.uint64(6) * cs + up]
                    buf[d + np.uint64(7)] = xf[src + np.uint64(7) * cs + up]
            for r in range(starts[b], starts[b + 1]):
                k = order[r]
                h0, h1, w0, w1 = _ps_bin(hs, he, ws, we, k, ph, pw)
                o = (k * Cout + c0) * NB + q
                if h1 <= h0 or w1 <= w0:
                    for l in range(L):
                        of[o + l * NB] = 0.0
                    continue
                area = (h1 - h0) * (w1 - w0)
                # lane l of pixel p: buf[p*8 + l] (the copy), or plane c0 + l in place
                if copy:
                    sums = _ps_sum_bin(
                        buf, np.uint64(0), np.uint64(L), np.uint64(1), h0, h1, w0, w1, W
                    )
                else:
                    sums = _ps_sum_bin(xf, src, np.uint64(1), cs, h0, h1, w0, w1, W)
                s0, s1, s2, s3, s4, s5, s6, s7 = sums
                of[o] = s0 / area
                of[o + NB] = s1 / area
                of[o + 2 * NB] = s2 / area
                of[o + 3 * NB] = s3 / area
                of[o + 4 * NB] = s4 / area
                of[o + 5 * NB] = s5 / area
                of[o + 6 * NB] = s6 / area
                of[o + 7 * NB] = s7 / area
        for co in range(groups * L, Cout):  # the last Cout % 8 planes, one by one
            p0 = base + np.uint64(co) * cs
            for r in range(starts[b], starts[b + 1]):
                k = order[r]
                h0, h1, w0, w1 = _ps_bin(hs, he, ws, we, k, ph, pw)
                o = (k * Cout + co) * NB + q
                if h1 <= h0 or w1 <= w0:
                    of[o] = 0.0
                    continue
                area = (h1 - h0) * (w1 - w0)
                s0 = 0.0
                for h in range(h0, h1):
                    for w in range(w0, w1):
                        s0 += np.float64(xf[p0 + np.uint64(h * W + w)])
                of[o] = s0 / area


@njit(parallel=True, cache=True)
def _ps_pool_backward(gout, hs, he, ws, we, order, starts, gin):
    """The adjoint of ``_ps_pool_forward``. A task owns (image b, bin q), i.e. the gradient planes
    co*PH*PW + q of image b, which only bin q feeds, and adds gout[k, co, ph, pw] / area over
    the bin for image b's RoIs in increasing order. When the bins are narrow (a bin's row in one
    plane too short for vector code) and many, eight planes at a time go through a zeroed
    pixel-major buffer (eight planes a pixel, one vector add) that is then copied into them;
    otherwise, and for the last Cout % 8 planes, each plane is zeroed and added into in place.
    The additions are in the data's dtype, in torchvision's order: the same sums either way."""
    B, C, H, W = gin.shape
    K, Cout, PH, PW = gout.shape
    NB = PH * PW
    HW = H * W
    L = PS_LANES
    gf = gin.reshape(-1)
    go = gout.reshape(-1)
    ft = gin.dtype.type
    for task in prange(B * NB):
        b = task // NB
        q = task - b * NB
        ph = q // PW
        pw = q - ph * PW
        base = np.uint64((b * C + q) * HW)  # gradient plane co*NB + q of image b: base + co*cs
        cs = np.uint64(NB * HW)
        pixels, rows = _ps_bin_visits(hs, he, ws, we, order, starts, b, ph, pw)
        # through a pixel-major buffer when it fits, the bins are narrow (a row of a bin, added
        # into one plane, is then too short for vector code) and there is enough of them (the
        # buffer's zeroing and copy-back cost 2*H*W*8 values); plane by plane otherwise
        groups = Cout // L
        if HW * L * gin.itemsize > PS_BUFFER_BYTES or 2 * pixels < HW or pixels > L * rows:
            groups = 0
        buf = np.empty(HW * L if groups > 0 else 0, gin.dtype)
        for grp in range(groups):
            c0 = grp * L
            buf[:] = 0.0
            for r in range(starts[b], starts[b + 1]):
                k = order[r]
                h0, h1, w0, w1 = _ps_bin(hs, he, ws, we, k, ph, pw)
                if h1 <= h0 or w1 <= w0:
                    continue
                area = ft((h1 - h0) * (w1 - w0))
                o = (k * Cout + c0) * NB + q
                g = (
                    go[o] / area,
                    go[o + NB] / area,
                    go[o + 2 * NB] / area,
                    go[o + 3 * NB] / area,
                    go[o + 4 * NB] / area,
                    go[o + 5 * NB] / area,
                    go[o + 6 * NB] / area,
                    go[o + 7 * NB] / area,
                )
                _ps_add_bin(buf, h0, h1, w0, w1, W, g)
            dst = base + np.uint64(c0) * cs
            for p in range(HW):  # plane c0 + l at pixel p = buf[p*8 + l]
                up = np.uint64(p)
                d = np.uint64(p * L)
                gf[dst + up] = buf[d]
                gf[dst + cs + up] = buf[d + np.uint64(1)]
                gf[dst + np.uint64(2) * cs + up] = buf[d + np.uint64(2)]
                gf[dst + np.uint64(3) * cs + up] = buf[d + np.uint64(3)]
                gf[dst + np.uint64(4) * cs + up] = buf[d + np.uint64(4)]
                gf[dst + np.uint64(5) * cs + up] = buf[d + np.uint64(5)]
                gf[dst + np.uint64(6) * cs + up] = buf[d + np.uint64(6)]
                gf[dst + np.uint64(7) * cs + up] = buf[d + np.uint64(7)]
        for co in range(groups * L, Cout):  # the other planes, one by one, in place
            p0 = base + np.uint64(co) * cs
            gf[p0 : p0 + np.uint64(HW)] = 0.0
            for r in range(starts[b], starts[b + 1]):
                k = order[r]
                h0, h1, w0, w1 = _ps_bin(hs, he, ws, we, k, ph, pw)
                if h1 <= h0 or w1 <= w0:
                    continue
                area = ft((h1 - h0) * (w1 - w0))
                g = go[(k * Cout + co) * NB + q] / area
                for h in range(h0, h1):
                    row = p0 + np.uint64(h * W)
                    for w in range(w0, w1):
                        gf[row + np.uint64(w)] += g


# ============================================================================ module API


def _nhwc(x: np.ndarray, dtype: Any = None) -> np.ndarray:
    return np.ascontiguousarray(x.transpose(0, 2, 3, 1), dtype=dtype)


def _offset64(offset: Any, shape: tuple) -> tuple[np.ndarray, bool]:
    if offset is None:
        return np.zeros(shape, np.float64), False
    return np.ascontiguousarray(offset, np.float64), True


def _work(rois: np.ndarray, C: int, output_size: tuple) -> int:
    """The number of (RoI, channel, bin) triples: small calls (gradchecks, tiny layers) run on
    the calling thread (see ``threads_for``); no result depends on the thread count."""
    return int(rois.shape[0]) * int(C) * int(output_size[0]) * int(output_size[1])


# ============================================================================ RoI Align family
# mode: "roi_align", "ps_roi_align" or "deform_roi_pool" (the three share their tap tables)


def _align_setup(
    mode, shape, rois, offset, output_size, spatial_scale, sampling_ratio, aligned, gamma, coefs
):
    B, C, H, W = shape
    PH, PW = output_size
    K = rois.shape[0]
    fgeo, igeo = align_geometry(
        mode, rois, output_size, spatial_scale, sampling_ratio, aligned, gamma
    )
    off, has_off = _offset64(offset, (1, 2, PH, PW))
    sl = set_layout(K, 1, PH * PW, mode == "ps_roi_align")
    table = _table(_align_taps, (fgeo, igeo, off, has_off, sl, PW, H, W), K * PH * PW, coefs)
    return np.ascontiguousarray(igeo[:, 0]), sl, table


def _align_forward(
    mode: str,
    input: np.ndarray,
    rois: np.ndarray,
    offset: np.ndarray | None,
    output_size: tuple[int, int],
    spatial_scale: float,
    sampling_ratio: int,
    aligned: bool,
    gamma: float,
) -> np.ndarray:
    """roi_align / ps_roi_align / deform_roi_pool forward -> (K, C', PH, PW)."""
    B, Cin, H, W = input.shape
    PH, PW = output_size
    K = rois.shape[0]
    Cout = Cin // (PH * PW) if mode == "ps_roi_align" else Cin
    shape = (K, Cout, PH, PW)
    if K * Cout * PH * PW == 0 or H * W == 0:
        return np.zeros(shape, input.dtype)
    with threads_for(_work(rois, Cin, output_size)):
        if mode != "ps_roi_align":
            # the gather writes out[k] whole for every RoI: no zeroing (a memset of the whole
            # output, 1.7 ms of the reference-size forward's 11-15)
            out = np.empty(shape, input.dtype)
            fgeo, igeo = align_geometry(
                mode, rois, output_size, spatial_scale, sampling_ratio, aligned, gamma
            )
            off, has_off = _offset64(offset, (1, 2, PH, PW))
            with np.errstate(invalid="ignore", over="ignore"):  # non-finite boxes: NaN, last
                cy = fgeo[:, 0] + 0.5 * PH * fgeo[:, 2]
                cx = fgeo[:, 1] + 0.5 * PW * fgeo[:, 3]
            perm = spatial_order(igeo[:, 0], cy, cx)
            _align_gather_nhwc(_nhwc(input), fgeo, igeo, off, has_off, perm, out)
            return out
        fgeo, igeo = align_geometry(mode, rois, output_size, spatial_scale, sampling_ratio, True)
        order, starts = by_image(np.ascontiguousarray(igeo[:, 0]), B)
        axes, cap = ps_axes(fgeo, igeo, output_size, H, W)
        out = np.zeros(shape, input.dtype)
        _ps_align_forward(np.ascontiguousarray(input), igeo, axes, cap, order, starts, out)
    return out


def _align_backward(
    mode: str,
    grad_out: np.ndarray,
    input_shape: tuple,
    input: np.ndarray | None,
    rois: np.ndarray,
    offset: np.ndarray | None,
    output_size: tuple[int, int],
    spatial_scale: float,
    sampling_ratio: int,
    aligned: bool,
    gamma: float,
    need_in: bool,
    need_off: bool,
) -> tuple[Any, Any]:
    """(grad_input, grad_offset); the offset gradient (deform_roi_pool with an offset) needs
    ``input``'s values, the input gradient only its shape."""
    B, C, H, W = input_shape
    PH, PW = output_size
    K = rois.shape[0]
    NB = PH * PW
    dtype = grad_out.dtype
    need_off = need_off and offset is not None
    g_off = np.zeros(offset.shape, offset.dtype) if need_off else None
    if K == 0 or B * C * H * W == 0 or not (need_in or need_off):
        return (np.zeros(input_shape, dtype) if need_in else None), g_off
    # the input-gradient kernels (band tasks, plane tasks) write every element
    g_in = np.empty(input_shape, dtype) if need_in else None
    with threads_for(_work(rois, C, output_size)):
        if mode == "ps_roi_align":
            fgeo, igeo = align_geometry(
                mode, rois, output_size, spatial_scale, sampling_ratio, True
            )
            order, starts = by_image(np.ascontiguousarray(igeo[:, 0]), B)
            axes, cap = ps_axes(fgeo, igeo, output_size, H, W)
            g = np.ascontiguousarray(grad_out)
            _ps_align_backward(g, igeo, axes, cap, order, starts, g_in)
            return g_in, None
        batch, sl, (tofs, ti, tw, tcy, tcx) = _align_setup(
            mode, input_shape, rois, offset, output_size, spatial_scale, sampling_ratio, aligned,
            gamma, need_off,
        )  # fmt: skip
        order, starts = by_image(batch, B)
        if need_in:
            rlo = np.empty(K * NB + K, np.int64)
            rhi = np.empty(K * NB + K, np.int64)
            _set_rows(tofs, ti, W, NB, rlo, rhi)
            rows = band_rows(H, W, C, g_in.itemsize)
            g = np.ascontiguousarray(grad_out)
            _scatter_bands(g, tofs, ti, tw, rlo, rhi, order, starts, rows, g_in)
        if need_off:
            dots = np.zeros((K * NB, 2), np.float64)
            cmap = np.zeros((1, 1), np.int64)  # unused: identity
            _dots(_nhwc(input), grad_out, batch, tofs, ti, tcy, tcx, sl, cmap, C, 1, True, dots)
            g_off[:, 0] = dots[:, 1].reshape(K, PH, PW)
            g_off[:, 1] = dots[:, 0].reshape(K, PH, PW)
    return g_in, g_off


def roi_align_forward(input, rois, output_size, spatial_scale, sampling_ratio, aligned):
    """roi_align -> (K, C, PH, PW)."""
    return _align_forward(
        "roi_align", input, rois, None, output_size, spatial_scale, sampling_ratio, aligned, 0.0
    )


def roi_align_backward(
    grad_out, rois, input_shape, output_size, spatial_scale, sampling_ratio, aligned, needs
):
    """``(grad_input,)`` of roi_align: only the input's shape is needed."""
    g_in, _ = _align_backward(
        "roi_align", grad_out, input_shape, None, rois, None, output_size, spatial_scale,
        sampling_ratio, aligned, 0.0, needs[0], False,
    )  # fmt: skip
    return (g_in,)


def ps_roi_align_forward(input, rois, output_size, spatial_scale, sampling_ratio):
    """ps_roi_align -> (K, C/(PH*PW), PH, PW)."""
    return _align_forward(
        "ps_roi_align", input, rois, None, output_size, spatial_scale, sampling_ratio, True, 0.0
    )


def ps_roi_align_backward(grad_out, rois, input_shape, output_size, spatial_scale, sampling_ratio, needs):  # fmt: skip
    """``(grad_input,)`` of ps_roi_align: only the input's shape is needed."""
    g_in, _ = _align_backward(
        "ps_roi_align", grad_out, input_shape, None, rois, None, output_size, spatial_scale,
        sampling_ratio, True, 0.0, needs[0], False,
    )  # fmt: skip
    return (g_in,)


def deform_roi_pool_forward(input, rois, offset, output_size, spatial_scale, sampling_ratio, gamma):
    """deform_roi_pool -> (K, C, PH, PW); ``offset`` (K, 2, PH, PW) or None."""
    return _align_forward(
        "deform_roi_pool", input, rois, offset, output_size, spatial_scale, sampling_ratio, True,
        gamma,
    )  # fmt: skip


def deform_roi_pool_backward(
    grad_out, input, rois, offset, output_size, spatial_scale, sampling_ratio, gamma, needs
):
    """(grad_input, grad_offset) of deform_roi_pool; grad_offset is None without an offset."""
    return _align_backward(
        "deform_roi_pool", grad_out, input.shape, input, rois, offset, output_size,
        spatial_scale, sampling_ratio, True, gamma, needs[0], needs[1],
    )  # fmt: skip


# ============================================================================ RoI Pool family


def argmax_dtype(H: int, W: int) -> Any:
    """The smallest signed integer type that holds the flat indices of an H x W plane."""
    n = H * W
    return np.int16 if n < 2**15 else np.int32 if n < 2**31 else np.int64


def roi_pool_forward(input, rois, output_size, spatial_scale):
    """roi_pool: (out (K, C, PH, PW), argmax), argmax the flat index into the H*W plane
    of each bin's maximum, -1 for an empty bin, in the smallest of int16/int32/int64 that holds
    H*W - 1."""
    B, C, H, W = input.shape
    PH, PW = output_size
    K = rois.shape[0]
    if K * C * PH * PW == 0 or H * W == 0:
        out = np.zeros((K, C, PH, PW), input.dtype)
        return out, np.full(out.shape, -1, argmax_dtype(H, W))
    out = np.empty((K, C, PH, PW), input.dtype)
    argmax = np.empty((K, C, PH, PW), argmax_dtype(H, W))
    with threads_for(_work(rois, C, output_size)):
        batch, hs, he, ws, we = pool_bins(
            "roi_pool", rois, output_size, spatial_scale, H, W, input.dtype
        )
        awork = np.zeros(1, np.int32 if H * W < 2**31 else np.int64)
        perm = spatial_order(batch, 0.5 * (hs[:, 0] + he[:, -1]), 0.5 * (ws[:, 0] + we[:, -1]))
        _pool_forward_nhwc(_nhwc(input), batch, hs, he, ws, we, perm, awork, out, argmax)
    return out, argmax


def roi_pool_backward(grad_out, rois, argmax, input_shape, output_size, spatial_scale, needs):
    """``(grad_input,)`` of roi_pool: each bin's gradient goes to its argmax (any integer dtype,
    values in [-1, H*W))."""
    B, C, H, W = input_shape
    if not needs[0]:
        return (None,)
    g_in = np.zeros(tuple(input_shape), grad_out.dtype)
    if rois.shape[0] == 0 or g_in.size == 0:
        return (g_in,)
    with threads_for(_work(rois, C, output_size)):
        batch = np.asarray(rois[:, 0]).astype(np.int64)
        order, starts = by_image(batch, B)
        # a task's cb gradient planes stay in L2 (about 256 KiB) while its RoIs scatter
        cb = 1 << max(0, int(np.log2(max(1, (256 * 1024) // (H * W * g_in.itemsize)))))
        cb = channel_block(B, C, min(cb, 128))
        g = np.ascontiguousarray(grad_out)
        _argmax_scatter(g, np.ascontiguousarray(argmax), order, starts, cb, g_in)
    return (g_in,)


def ps_roi_pool_forward(input, rois, output_size, spatial_scale):
    """ps_roi_pool -> (K, C/(PH*PW), PH, PW)."""
    B, Cin, H, W = input.shape
    PH, PW = output_size
    K = rois.shape[0]
    Cout = Cin // (PH * PW)
    out = np.zeros((K, Cout, PH, PW), input.dtype)
    if out.size == 0 or H * W == 0:
        return out
    with threads_for(_work(rois, Cin, output_size)):
        batch, hs, he, ws, we = pool_bins(
            "ps_roi_pool", rois, output_size, spatial_scale, H, W, input.dtype
        )
        x = np.ascontiguousarray(input)
        _ps_pool_forward(x, hs, he, ws, we, *by_image(batch, B), out)
    return out


def ps_roi_pool_backward(grad_out, rois, input_shape, output_size, spatial_scale, needs):
    """``(grad_input,)`` of ps_roi_pool: each bin's gradient spread evenly over the bin."""
    B, C, H, W = input_shape
    if not needs[0]:
        return (None,)
    if rois.shape[0] == 0 or B * C * H * W == 0:
        return (np.zeros(tuple(input_shape), grad_out.dtype),)
    g_in = np.empty(tuple(input_shape), grad_out.dtype)  # the kernel writes every plane
    with threads_for(_work(rois, C, output_size)):
        batch, hs, he, ws, we = pool_bins(
            "ps_roi_pool", rois, output_size, spatial_scale, H, W, grad_out.dtype
        )
        order, starts = by_image(batch, B)
        g = np.ascontiguousarray(grad_out)
        _ps_pool_backward(g, hs, he, ws, we, order, starts, g_in)
    return (g_in,)


# ============================================================================ deform_ps_roi_pool


def _dps_setup(
    shape,
    rois,
    offset,
    spatial_scale,
    output_dim,
    group_size,
    pooled_size,
    part_size,
    sample_per_part,
    trans_std,
    dtype,
    coefs,
):
    B, C, H, W = shape
    K = rois.shape[0]
    P = pooled_size
    fgeo, batch, part, group = deform_ps_geometry(
        rois, spatial_scale, group_size, P, part_size, sample_per_part, dtype
    )
    off, has_off = _offset64(offset, (1, 2, 1, 1))  # (without an offset nothing reads it)
    ncls = off.shape[1] // 2 if has_off else 1
    cec = output_dim // ncls
    sl = set_layout(K, ncls, P * P, True)
    table = _table(
        _dps_taps,
        (fgeo, off, has_off, float(trans_std), part, sample_per_part, ncls, sl, P, H, W),
        K * ncls * P * P,
        coefs,
    )
    ch = np.arange(output_dim, dtype=np.int64)[:, None] * group_size + group[None, :]
    cmap = ((ch[:, :, None] * group_size) + group[None, None, :]).reshape(output_dim, P * P)
    return batch, part, ncls, cec, np.ascontiguousarray(cmap), sl, table


def deform_ps_roi_pool_forward(
    input: np.ndarray,
    rois: np.ndarray,
    offset: np.ndarray | None,
    spatial_scale: float,
    output_dim: int,
    group_size: int,
    pooled_size: int,
    part_size: int,
    sample_per_part: int,
    trans_std: float,
) -> np.ndarray:
    """deform_ps_roi_pool -> (K, output_dim, pooled_size, pooled_size)."""
    B, C, H, W = input.shape
    K = rois.shape[0]
    out = np.zeros((K, output_dim, pooled_size, pooled_size), input.dtype)
    if out.size == 0 or H * W == 0:
        return out
    with threads_for(_work(rois, output_dim, (pooled_size, pooled_size))):
        batch, part, ncls, cec, cmap, sl, (tofs, ti, tw, _, _) = _dps_setup(
            input.shape, rois, offset, spatial_scale, output_dim, group_size, pooled_size,
            part_size, sample_per_part, trans_std, input.dtype, False,
        )  # fmt: skip
        order, starts = by_image(batch, B)
        inv = inverse_channel_map(cmap, C)
        _gather_cmap(np.ascontiguousarray(input), tofs, ti, tw, sl, order, starts, *inv, cec, out)
    return out


def deform_ps_roi_pool_backward(
    grad_out: np.ndarray,
    input: np.ndarray,
    rois: np.ndarray,
    offset: np.ndarray | None,
    spatial_scale: float,
    output_dim: int,
    group_size: int,
    pooled_size: int,
    part_size: int,
    sample_per_part: int,
    trans_std: float,
    needs: tuple,
) -> tuple[Any, Any]:
    """(grad_input, grad_offset) of deform_ps_roi_pool; grad_offset None without an offset."""
    B, C, H, W = input.shape
    K = rois.shape[0]
    P = pooled_size
    need_in = bool(needs[0])
    need_off = offset is not None and bool(needs[1])
    g_in = np.zeros(input.shape, input.dtype) if need_in else None
    g_off = np.zeros(offset.shape, offset.dtype) if need_off else None
    if K == 0 or input.size == 0 or not (need_in or need_off):
        return g_in, g_off
    with threads_for(_work(rois, output_dim, (pooled_size, pooled_size))):
        batch, part, ncls, cec, cmap, sl, (tofs, ti, tw, tcy, tcx) = _dps_setup(
            input.shape, rois, offset, spatial_scale, output_dim, group_size, pooled_size,
            part_size, sample_per_part, trans_std, input.dtype, need_off,
        )  # fmt: skip
        if need_in:
            order, starts = by_image(batch, B)
            inv = inverse_channel_map(cmap, C)
            g = np.ascontiguousarray(grad_out)
            _scatter_cmap(g, tofs, ti, tw, sl, order, starts, *inv, cec, g_in)
        if need_off:
            dots = np.zeros((K * ncls * P * P, 2), np.float64)
            g = np.ascontiguousarray(grad_out, input.dtype)
            _dots(_nhwc(input), g, batch, tofs, ti, tcy, tcx, sl, cmap, cec, ncls, False, dots)
            # sum the bins of each part cell into the offset, in bin order (np.add.at is
            # sequential); the sets are bin-major (see _dps_setup): s = (q*K + k)*ncls + cls
            q, k, cls = np.unravel_index(np.arange(K * ncls * P * P), (P * P, K, ncls))
            ph, pw = q // P, q % P
            go = np.zeros(offset.shape, np.float64)
            np.add.at(go, (k, 2 * cls, part[ph], part[pw]), dots[:, 1])
            np.add.at(go, (k, 2 * cls + 1, part[ph], part[pw]), dots[:, 0])
            g_off[...] = go
    return g_in, g_off
