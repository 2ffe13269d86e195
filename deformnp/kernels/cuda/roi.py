"""CUDA kernels of the RoI pooling family (docs/ops/roi.rst, deform_roi.rst), mirroring
``kernels/cpu/roi.py``.

The kernel contract is the CPU module's (the same functions and signatures; see the list at the
top of ``kernels/cpu/roi.py``).

**Geometry on the host.** The per-RoI geometry (bin starts and sizes, sampling grids, integer
pooling bins, part and group cells) is computed on the host by the very functions the CPU kernels
use (``kernels/roi_geometry.py``), so both devices pool the same bins: the RoI Align family's and
deform_ps_roi_pool's float geometry in float64, then cast to the data's dtype (float32 geometry
for float32 data), roi_pool's integer bins in the data's dtype as torchvision does; the integer
arrays (batch indices, grids, bins, cells) stay int64. Only those few numbers per RoI are copied
to the device, once per call (plus, in deterministic mode, the RoIs' first contribution numbers).
Boxes are therefore read on the host: ``rois`` is the validated host array of the contract (the
ops layer copies device boxes to the host once per call; host boxes cost no device round trip).
Feature maps, offsets, outputs and gradients stay on the device; nothing is copied back and
nothing synchronises.

**Precision.** Every kernel computes in its data's type ``ft`` (``x.dtype.type``): sample
coordinates, clamp plans, weights and sums are float32 for float32 data and float64 for float64
data (spatial_scale, gamma and trans_std reach the device as the data's dtype, gamma inside the
geometry). The CPU kernels keep float64 plans for both dtypes, so float32 results agree with them
to float32 rounding.

**Layouts (channels-last).** Feature maps are transposed on the device to a *grouped
channels-last* layout (B, G, H*W, Cg) by ``transpose_last(x, B, Cg, G*H*W)``: pixel p of channel
c of group g at ``((b*G + g)*H*W + p)*Cg + c``. roi_align and deform_roi_pool use G = 1, Cg = C
(plain channels-last); the position-sensitive ops, whose bin q reads input channel c*G + q, use
G = PH*PW (ps_roi_align, ps_roi_pool) or group_size**2 (deform_ps_roi_pool), Cg = the output
channels: the channels a bin reads are then consecutive too. Results are written channels-last,
(K, PH*PW, C'), and transposed back to (K, C', PH, PW); grad_out is transposed to (K, PH*PW, C').

**Threads (the DCNv4 design).** A *bin unit* is (RoI k, bin q = ph*PW + pw), and for
deform_ps_roi_pool (k, q, class), since the class's offsets move its samples. Each unit has
``lanes = lanes_for(Cg)`` consecutive threads of a warp (one under the simulator); thread ``lane``
holds the channels ``c = lane, lane + lanes, ...``, so at each step the lanes read consecutive
addresses. The bin's geometry is read once per thread; each sample point's clamp plan is computed
once and applied to the thread's channels:

* forwards (``_align_forward``, ``_dps_forward``): the channels are taken ``_RUN`` (8) at a time
  into register accumulators (no per-thread arrays), so the plan of a sample is computed
  ceil(channels per lane / 8) times (once whenever C' <= 8 * lanes, e.g. C' <= 256 on a GPU);
* roi_pool / ps_roi_pool forwards (``_pool_forward``): max / mean over the integer bin, one channel
  after the other (the bin bounds are the whole plan); the roi_pool argmax is also written
  channels-last and transposed back (int64, flat plane indices, -1 for an empty bin);
* input gradients (``_align_grad_input``, ``_dps_grad_input``, ``_pool_grad_input``): the plan
  (weights already divided by the sample count) once per sample, then float atomic adds of
  w * grad_out for each of the thread's channels into a grouped channels-last buffer (the lanes
  add to consecutive addresses), transposed back to NCHW. roi_pool's gradient goes to one argmax
  pixel per (bin, channel), different for every channel, so nothing is shared across a bin's
  channels there: ``_argmax_grad_input`` has one thread per output element, reads grad_out and
  argmax in their own (K, C, PH, PW) order (coalesced) and adds atomically into the NCHW
  gradient, with no transposes;
* offset gradients (``_align_grad_offset``, ``_dps_grad_offset``): each lane sums over its
  channels and samples, the lanes' sums are reduced with ``lane_sum`` (warp shuffles; the kernels
  walk ``padded(units * lanes)`` threads so that whole warps iterate), and lane 0 writes: one
  writer per offset element for deform_roi_pool, one per bin unit for deform_ps_roi_pool, whose
  bins sharing a part cell are then summed in bin order by ``_dps_offset_reduce`` (one thread per
  offset element). Deterministic either way.

**Deterministic mode** (:func:`deformnp.use_deterministic_algorithms`): the input gradients are
computed without atomics, bit-identical from run to run, with ``scatter.segments``. A keys kernel
lists every contribution once (``_align_keys``: e = 4 * sample point + corner, the points of a
RoI numbered after those of the RoIs before it; ``_dps_keys`` likewise; ``_pool_keys``: one per
pixel of a ps_roi_pool bin) with its destination key, the pixel of its group and batch image
(``n_keys`` for a zero weight), its weight and the grad_out row it reads; ``_owner`` then gives
each gradient element (key, channel) one thread that sums its contributions in sorted order and
writes the grouped channels-last buffer, transposed back. roi_pool: ``_argmax_keys`` keys every
output element (k, c, ph, pw) to ``(b*C + c)*H*W + argmax`` and ``_argmax_owner`` has one thread
per NCHW input element. Extra memory: per contribution a key, a weight and (with the sort) three
more int64, plus a grad_out row per sample point (per pixel for ps_roi_pool): proportional to
the sample points (to the outputs for roi_pool), never to the input size times anything.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from numba import cuda

from ...determinism import are_deterministic_algorithms_enabled
from ..roi_geometry import align_geometry, deform_ps_geometry, pool_bins
from ._launch import (
    SIMULATOR,
    WARP,
    empty,
    flat,
    full,
    grid,
    lane_sum,
    lanes_for,
    padded,
    transpose_last,
    zeros,
)
from .sampling import clamp_plan, scatter_plan, strided_value
from .scatter import segments

_RUN = 8  # register accumulators per thread in the forwards (channels per pass over the samples)


def _dev(a: np.ndarray) -> Any:
    """A small host array on the device, flat (the kernels index it by hand)."""
    return cuda.to_device(np.ascontiguousarray(a).reshape(-1))


def _dev_float(a: np.ndarray, dtype: Any) -> Any:
    """A float64 host geometry array on the device in the data's dtype (non-finite values and
    overflows just become inf/NaN, which sample nothing)."""
    with np.errstate(over="ignore", invalid="ignore"):
        return _dev(np.asarray(a).astype(dtype))


def _lane_bits(lanes: int) -> int:
    return int(lanes).bit_length() - 1


def _nchw(a_cl: Any, N: int, P: int, C: int, shape: tuple) -> Any:
    """A channels-last (N, P, C) result as the contract's array of ``shape`` ((N, C, P) order)."""
    return transpose_last(a_cl, N, P, C).reshape(tuple(int(s) for s in shape))


# ---------------------------------------------------------------------------- device helpers


@cuda.jit(device=True)
def _tap(v, base, stride, c, C, idx, w, zero):
    """sum_k w[k] * v[base + idx[k]*stride + c] (channel c of a channels-last map), 0 if c >= C."""
    if c < C:
        return strided_value(v, base + c, stride, idx, w)
    return zero


@cuda.jit(device=True)
def _acc_run(a, v, base, stride, c0, lanes, C, idx, w, zero):
    """The _RUN accumulators ``a`` of channels c0, c0 + lanes, ... plus one plan's values."""
    return (
        a[0] + _tap(v, base, stride, c0, C, idx, w, zero),
        a[1] + _tap(v, base, stride, c0 + lanes, C, idx, w, zero),
        a[2] + _tap(v, base, stride, c0 + 2 * lanes, C, idx, w, zero),
        a[3] + _tap(v, base, stride, c0 + 3 * lanes, C, idx, w, zero),
        a[4] + _tap(v, base, stride, c0 + 4 * lanes, C, idx, w, zero),
        a[5] + _tap(v, base, stride, c0 + 5 * lanes, C, idx, w, zero),
        a[6] + _tap(v, base, stride, c0 + 6 * lanes, C, idx, w, zero),
        a[7] + _tap(v, base, stride, c0 + 7 * lanes, C, idx, w, zero),
    )


@cuda.jit(device=True)
def _put(out, i, c, C, value):
    if c < C:
        out[i + c] = value


@cuda.jit(device=True)
def _store_run(out, base, c0, lanes, C, a, div):
    """out[base + c] = a[j] / div for the run's channels c = c0 + j*lanes < C."""
    _put(out, base, c0, C, a[0] / div)
    _put(out, base, c0 + lanes, C, a[1] / div)
    _put(out, base, c0 + 2 * lanes, C, a[2] / div)
    _put(out, base, c0 + 3 * lanes, C, a[3] / div)
    _put(out, base, c0 + 4 * lanes, C, a[4] / div)
    _put(out, base, c0 + 5 * lanes, C, a[5] / div)
    _put(out, base, c0 + 6 * lanes, C, a[6] / div)
    _put(out, base, c0 + 7 * lanes, C, a[7] / div)


@cuda.jit(device=True)
def _scaled(w, div):
    return (w[0] / div, w[1] / div, w[2] / div, w[3] / div)


@cuda.jit(device=True)
def _key(keys, wts, e, key, wk, n_keys):
    if wk != 0:
        keys[e] = key
    else:
        keys[e] = n_keys
    wts[e] = wk


@cuda.jit(device=True)
def _keys4(keys, wts, e0, kbase, idx, w, n_keys):
    """Contributions e0 .. e0 + 3 (the four corners of one plan): key kbase + pixel and weight."""
    _key(keys, wts, e0, kbase + idx[0], w[0], n_keys)
    _key(keys, wts, e0 + 1, kbase + idx[1], w[1], n_keys)
    _key(keys, wts, e0 + 2, kbase + idx[2], w[2], n_keys)
    _key(keys, wts, e0 + 3, kbase + idx[3], w[3], n_keys)


@cuda.jit(cache=not SIMULATOR)
def _owner(order, starts, wts, src, shift, gsrc, buf, n_keys, Cg, ncls, HW):
    """Deterministic input gradient: one thread per element (key, c), key = (a*ncls + cls)*HW + p
    (a = b*G + g), sums wts[e] * gsrc[src[e >> shift] + c] over its contributions e in sorted
    order and writes buf[(a*HW + p)*(ncls*Cg) + cls*Cg + c] (grouped channels-last)."""
    ft = wts.dtype.type
    total = n_keys * Cg
    for i in range(cuda.grid(1), total, cuda.gridsize(1)):
        key = i // Cg
        c = i - key * Cg
        acc = ft(0)
        for j in range(starts[key], starts[key + 1]):
            e = order[j]
            acc += wts[e] * gsrc[src[e >> shift] + c]
        p = key % HW
        r = key // HW
        cls = r % ncls
        a = r // ncls
        buf[(a * HW + p) * (ncls * Cg) + cls * Cg + c] = acc


def _owner_gradient(keys, wts, src, shift, n_keys, gcl, dtype, B, G, HW, ncls, Cg) -> Any:
    """Sort the contributions and run ``_owner``: the gradient as a (B, Cg*ncls, G*HW) array."""
    order, starts = segments(keys, n_keys)
    buf = empty((n_keys * Cg,), dtype)
    _owner[grid(n_keys * Cg)](order, starts, wts, src, shift, gcl, buf, n_keys, Cg, ncls, HW)
    return transpose_last(buf, B, G * HW, ncls * Cg)


# ---------------------------------------------------------------------------- RoI Align family


@cuda.jit(device=True)
def _align_bin(fgeo, igeo, off, has_off, k, ph, pw, PH, PW, ft):
    """(y, x) of the top-left corner of bin (ph, pw) of RoI k, shifted by its offset (deform),
    and the bin's size and sampling grid: (ys, xs, bh, bw, gh, gw)."""
    sy = fgeo[k * 6 + 0]
    sx = fgeo[k * 6 + 1]
    bh = fgeo[k * 6 + 2]
    bw = fgeo[k * 6 + 3]
    if has_off:
        sy = sy + fgeo[k * 6 + 4] * off[((k * 2 + 1) * PH + ph) * PW + pw]
        sx = sx + fgeo[k * 6 + 5] * off[((k * 2 + 0) * PH + ph) * PW + pw]
    return sy + ft(ph) * bh, sx + ft(pw) * bw, bh, bw, igeo[k * 3 + 1], igeo[k * 3 + 2]


@cuda.jit(device=True)
def _align_coord(start, i, size, n, ft):
    """Sample i of n along a bin: start + (i + 0.5) * size / n."""
    return start + (ft(i) + ft(0.5)) * size / ft(n)


@cuda.jit(cache=not SIMULATOR)
def _align_forward(x, fgeo, igeo, off, out, K, NB, PH, PW, H, W, G, Cg, has_off, lanes, lbits):
    """Thread (bin unit s = k*NB + q, lane): out[s*Cg + c] = mean over the bin's samples of the
    grouped channels-last map ``x`` (group q if G > 1), for the lane's channels c."""
    ft = x.dtype.type
    zero = ft(0)
    HW = H * W
    total = K * NB * lanes
    for t in range(cuda.grid(1), total, cuda.gridsize(1)):
        lane = t & (lanes - 1)
        s = t >> lbits
        k = s // NB
        q = s - k * NB
        ph = q // PW
        pw = q - ph * PW
        ys, xs, bh, bw, gh, gw = _align_bin(fgeo, igeo, off, has_off, k, ph, pw, PH, PW, ft)
        g = q if G > 1 else 0
        base = (igeo[k * 3] * G + g) * HW * Cg
        cnt = ft(max(gh * gw, 1))
        for c0 in range(lane, Cg, _RUN * lanes):
            a = (zero, zero, zero, zero, zero, zero, zero, zero)
            for iy in range(gh):
                y = _align_coord(ys, iy, bh, gh, ft)
                for ix in range(gw):
                    xx = _align_coord(xs, ix, bw, gw, ft)
                    idx, w, cy, cx = clamp_plan(y, xx, H, W, ft)
                    a = _acc_run(a, x, base, Cg, c0, lanes, Cg, idx, w, zero)
            _store_run(out, s * Cg, c0, lanes, Cg, a, cnt)


@cuda.jit(cache=not SIMULATOR)
def _align_grad_input(
    gcl, fgeo, igeo, off, gbuf, K, NB, PH, PW, H, W, G, Cg, has_off, lanes, lbits
):
    """Thread (bin unit s, lane): for each sample, gbuf[pixel, c] += w / count * gcl[s*Cg + c]
    (atomic) for the lane's channels c; ``gbuf`` grouped channels-last like the forward's input."""
    ft = gcl.dtype.type
    HW = H * W
    total = K * NB * lanes
    for t in range(cuda.grid(1), total, cuda.gridsize(1)):
        lane = t & (lanes - 1)
        s = t >> lbits
        k = s // NB
        q = s - k * NB
        ph = q // PW
        pw = q - ph * PW
        ys, xs, bh, bw, gh, gw = _align_bin(fgeo, igeo, off, has_off, k, ph, pw, PH, PW, ft)
        g = q if G > 1 else 0
        base = (igeo[k * 3] * G + g) * HW * Cg
        cnt = ft(max(gh * gw, 1))
        for iy in range(gh):
            y = _align_coord(ys, iy, bh, gh, ft)
            for ix in range(gw):
                xx = _align_coord(xs, ix, bw, gw, ft)
                idx, w, cy, cx = clamp_plan(y, xx, H, W, ft)
                w = _scaled(w, cnt)
                for c in range(lane, Cg, lanes):
                    scatter_plan(gbuf, base + c, Cg, idx, w, gcl[s * Cg + c])


@cuda.jit(cache=not SIMULATOR)
def _align_grad_offset(gcl, x, fgeo, igeo, off, goff, K, NB, PH, PW, H, W, C, lanes, lbits):
    """deform_roi_pool: d out / d offset[k, 0|1, ph, pw] = gamma*roi_w|h / count * sum over the
    samples and channels of g * dV/dx|y. Thread (bin unit, lane) sums its channels; lane_sum
    across the lanes; lane 0 writes. Walks padded(K*NB*lanes) threads (whole warps)."""
    ft = x.dtype.type
    zero = ft(0)
    HW = H * W
    total = K * NB * lanes
    for t in range(cuda.grid(1), (total + WARP - 1) // WARP * WARP, cuda.gridsize(1)):
        lane = t & (lanes - 1)
        s = t >> lbits
        active = t < total
        gy = zero
        gx = zero
        if active:
            k = s // NB
            q = s - k * NB
            ph = q // PW
            pw = q - ph * PW
            ys, xs, bh, bw, gh, gw = _align_bin(fgeo, igeo, off, True, k, ph, pw, PH, PW, ft)
            base = igeo[k * 3] * HW * C
            for iy in range(gh):
                y = _align_coord(ys, iy, bh, gh, ft)
                for ix in range(gw):
                    xx = _align_coord(xs, ix, bw, gw, ft)
                    idx, w, cy, cx = clamp_plan(y, xx, H, W, ft)
                    for c in range(lane, C, lanes):
                        gv = gcl[s * C + c]
                        gy += gv * strided_value(x, base + c, C, idx, cy)
                        gx += gv * strided_value(x, base + c, C, idx, cx)
            cnt = ft(max(gh * gw, 1))
            gy = gy * fgeo[k * 6 + 4] / cnt
            gx = gx * fgeo[k * 6 + 5] / cnt
        gy = lane_sum(gy, lanes)
        gx = lane_sum(gx, lanes)
        if active and lane == 0:
            k = s // NB
            q = s - k * NB
            goff[(k * 2 + 0) * NB + q] = gx
            goff[(k * 2 + 1) * NB + q] = gy


@cuda.jit(cache=not SIMULATOR)
def _align_keys(
    fgeo, igeo, off, pstart, keys, wts, src, K, NB, PH, PW, H, W, G, Cg, has_off, n_keys
):
    """Deterministic mode: thread per bin unit s = k*NB + q; its sample (iy, ix) is point
    t = pstart[k] + q*gh*gw + iy*gw + ix, its corners contributions 4t .. 4t + 3: key
    (b*G + g)*HW + pixel (n_keys for a zero weight), weight w / count, src[t] = s*Cg."""
    ft = fgeo.dtype.type
    HW = H * W
    total = K * NB
    for s in range(cuda.grid(1), total, cuda.gridsize(1)):
        k = s // NB
        q = s - k * NB
        ph = q // PW
        pw = q - ph * PW
        ys, xs, bh, bw, gh, gw = _align_bin(fgeo, igeo, off, has_off, k, ph, pw, PH, PW, ft)
        g = q if G > 1 else 0
        kbase = (igeo[k * 3] * G + g) * HW
        cnt = ft(max(gh * gw, 1))
        pt = pstart[k] + q * gh * gw
        for iy in range(gh):
            y = _align_coord(ys, iy, bh, gh, ft)
            for ix in range(gw):
                xx = _align_coord(xs, ix, bw, gw, ft)
                idx, w, cy, cx = clamp_plan(y, xx, H, W, ft)
                src[pt] = s * Cg
                _keys4(keys, wts, 4 * pt, kbase, idx, _scaled(w, cnt), n_keys)
                pt += 1


def _align_geo(mode, rois, output_size, spatial_scale, sampling_ratio, aligned, gamma, dtype):
    """Host geometry (float64, from ``roi_geometry``) and its device copies, float geometry in
    the data's dtype: (igeo host, fgeo device, igeo device)."""
    fgeo, igeo = align_geometry(
        mode, rois, output_size, spatial_scale, sampling_ratio, aligned, gamma
    )
    return igeo, _dev_float(fgeo, dtype), _dev(igeo)


def _groups(ps: bool, NB: int, Cin: int) -> tuple[int, int]:
    """(G, Cg) of the grouped channels-last layout (see the module docstring)."""
    return (NB, Cin // NB) if ps else (1, Cin)


def _align_forward_api(
    mode: str,
    input: Any,
    rois: Any,
    offset: Any,
    output_size: tuple,
    spatial_scale: float,
    sampling_ratio: int,
    aligned: bool,
    gamma: float,
) -> Any:
    """roi_align / ps_roi_align / deform_roi_pool forward -> (K, C', PH, PW)."""
    B, Cin, H, W = (int(s) for s in input.shape)
    PH, PW = output_size
    NB = PH * PW
    G, Cg = _groups(mode == "ps_roi_align", NB, Cin)
    K = int(rois.shape[0])
    if K * Cg * NB == 0 or H * W == 0:
        return zeros((K, Cg, PH, PW), input.dtype)
    _, fgeo, igeo = _align_geo(
        mode, rois, output_size, spatial_scale, sampling_ratio, aligned, gamma, input.dtype
    )
    has_off = offset is not None
    x = transpose_last(flat(input), B, Cg, G * H * W)
    out = empty((K * NB * Cg,), input.dtype)
    lanes = lanes_for(Cg)
    _align_forward[grid(K * NB * lanes)](
        x, fgeo, igeo, flat(offset) if has_off else fgeo, out, K, NB, PH, PW, H, W, G, Cg,
        has_off, lanes, _lane_bits(lanes),
    )  # fmt: skip
    return _nchw(out, K, NB, Cg, (K, Cg, PH, PW))


def _align_backward(
    mode: str,
    grad_out: Any,
    input_shape: tuple,
    input: Any,
    rois: Any,
    offset: Any,
    output_size: tuple,
    spatial_scale: float,
    sampling_ratio: int,
    aligned: bool,
    gamma: float,
    need_in: bool,
    need_off: bool,
) -> tuple:
    """(grad_input, grad_offset); the offset gradient (deform_roi_pool with an offset) needs
    ``input``'s values, the input gradient only its shape."""
    B, Cin, H, W = (int(s) for s in input_shape)
    PH, PW = output_size
    NB = PH * PW
    G, Cg = _groups(mode == "ps_roi_align", NB, Cin)
    K = int(rois.shape[0])
    dtype = grad_out.dtype
    has_off = offset is not None
    need_off = has_off and need_off
    g_in = None
    g_off = zeros(offset.shape, offset.dtype) if need_off else None
    if K * Cg * NB == 0 or H * W == 0 or not (need_in or need_off):
        return (zeros(tuple(input_shape), dtype) if need_in else None), g_off
    igeo_h, fgeo, igeo = _align_geo(
        mode, rois, output_size, spatial_scale, sampling_ratio, aligned, gamma, dtype
    )
    off = flat(offset) if has_off else fgeo
    gcl = transpose_last(flat(grad_out), K, Cg, NB)  # (K, NB, Cg)
    HW = H * W
    lanes = lanes_for(Cg)
    lbits = _lane_bits(lanes)
    if need_in and are_deterministic_algorithms_enabled():
        pstart = np.zeros(K + 1, np.int64)
        np.cumsum(NB * igeo_h[:, 1] * igeo_h[:, 2], out=pstart[1:])
        npts = int(pstart[-1])
        if npts == 0:
            g_in = zeros(tuple(input_shape), dtype)
        else:
            n_keys = B * G * HW
            keys = empty((4 * npts,), np.int64)
            wts = empty((4 * npts,), dtype)
            src = empty((npts,), np.int64)
            _align_keys[grid(K * NB)](
                fgeo, igeo, off, _dev(pstart), keys, wts, src, K, NB, PH, PW, H, W, G, Cg,
                has_off, n_keys,
            )  # fmt: skip
            g = _owner_gradient(keys, wts, src, 2, n_keys, gcl, dtype, B, G, HW, 1, Cg)
            g_in = g.reshape(tuple(input_shape))
    elif need_in:
        gbuf = zeros((B * G * HW * Cg,), dtype)
        _align_grad_input[grid(K * NB * lanes)](
            gcl, fgeo, igeo, off, gbuf, K, NB, PH, PW, H, W, G, Cg, has_off, lanes, lbits
        )
        g_in = _nchw(gbuf, B, G * HW, Cg, input_shape)
    if need_off:
        x = transpose_last(flat(input), B, Cin, HW)
        _align_grad_offset[grid(padded(K * NB * lanes))](
            gcl, x, fgeo, igeo, off, flat(g_off), K, NB, PH, PW, H, W, Cin, lanes, lbits
        )
    return g_in, g_off


def roi_align_forward(input, rois, output_size, spatial_scale, sampling_ratio, aligned):
    return _align_forward_api(
        "roi_align", input, rois, None, output_size, spatial_scale, sampling_ratio, aligned, 0.0
    )


def roi_align_backward(
    grad_out, rois, input_shape, output_size, spatial_scale, sampling_ratio, aligned, needs
):
    g_in, _ = _align_backward(
        "roi_align", grad_out, input_shape, None, rois, None, output_size, spatial_scale,
        sampling_ratio, aligned, 0.0, needs[0], False,
    )  # fmt: skip
    return (g_in,)


def ps_roi_align_forward(input, rois, output_size, spatial_scale, sampling_ratio):
    return _align_forward_api(
        "ps_roi_align", input, rois, None, output_size, spatial_scale, sampling_ratio, True, 0.0
    )


def ps_roi_align_backward(grad_out, rois, input_shape, output_size, spatial_scale, sampling_ratio, needs):  # fmt: skip
    g_in, _ = _align_backward(
        "ps_roi_align", grad_out, input_shape, None, rois, None, output_size, spatial_scale,
        sampling_ratio, True, 0.0, needs[0], False,
    )  # fmt: skip
    return (g_in,)


def deform_roi_pool_forward(input, rois, offset, output_size, spatial_scale, sampling_ratio, gamma):
    return _align_forward_api(
        "deform_roi_pool", input, rois, offset, output_size, spatial_scale, sampling_ratio, True,
        gamma,
    )  # fmt: skip


def deform_roi_pool_backward(
    grad_out, input, rois, offset, output_size, spatial_scale, sampling_ratio, gamma, needs
):
    return _align_backward(
        "deform_roi_pool", grad_out, input.shape, input, rois, offset, output_size,
        spatial_scale, sampling_ratio, True, gamma, needs[0], needs[1],
    )  # fmt: skip


# ---------------------------------------------------------------------------- RoI Pool family


@cuda.jit(device=True)
def _pool_bin(s, hs, he, ws, we, NB, PH, PW):
    """Bin unit s = k*NB + q (q = ph*PW + pw) of the integer-bin pools: (k, q) and its rows
    [h0, h1) and columns [w0, w1)."""
    k = s // NB
    q = s - k * NB
    ph = q // PW
    pw = q - ph * PW
    return k, q, hs[k * PH + ph], he[k * PH + ph], ws[k * PW + pw], we[k * PW + pw]


@cuda.jit(cache=not SIMULATOR)
def _pool_forward(
    x, batch, hs, he, ws, we, out, argmax, K, NB, PH, PW, H, W, G, Cg, ps, lanes, lbits
):
    """Thread (bin unit s = k*NB + q, lane), for the lane's channels c of the grouped
    channels-last map ``x``: ps (ps_roi_pool): out[s*Cg + c] = mean over the integer bin; else
    (roi_pool) the max and argmax[s*Cg + c] its flat plane index, the first maximum in row-major
    order winning, and so does the first NaN. An empty bin gives 0 (and argmax -1)."""
    ft = x.dtype.type
    HW = H * W
    total = K * NB * lanes
    for t in range(cuda.grid(1), total, cuda.gridsize(1)):
        lane = t & (lanes - 1)
        s = t >> lbits
        k, q, h0, h1, w0, w1 = _pool_bin(s, hs, he, ws, we, NB, PH, PW)
        g = q if G > 1 else 0
        base = (batch[k] * G + g) * HW * Cg
        empty_bin = h1 <= h0 or w1 <= w0
        for c in range(lane, Cg, lanes):
            o = s * Cg + c
            if empty_bin:
                out[o] = ft(0)
                if not ps:
                    argmax[o] = -1
            elif ps:
                acc = ft(0)
                for h in range(h0, h1):
                    for w in range(w0, w1):
                        acc += x[base + (h * W + w) * Cg + c]
                out[o] = acc / ft((h1 - h0) * (w1 - w0))
            else:
                best = h0 * W + w0
                m = x[base + best * Cg + c]
                for h in range(h0, h1):
                    for w in range(w0, w1):
                        v = x[base + (h * W + w) * Cg + c]
                        if v > m or (v != v and m == m):
                            m = v
                            best = h * W + w
                out[o] = m
                argmax[o] = best


@cuda.jit(cache=not SIMULATOR)
def _pool_grad_input(gcl, batch, hs, he, ws, we, gbuf, K, NB, PH, PW, H, W, Cg, lanes, lbits):
    """ps_roi_pool: thread (bin unit s, lane) adds gcl[s*Cg + c] / area to every pixel of the bin
    of the lane's channels c (atomic) in the grouped channels-last ``gbuf`` (G = NB)."""
    ft = gcl.dtype.type
    HW = H * W
    total = K * NB * lanes
    for t in range(cuda.grid(1), total, cuda.gridsize(1)):
        lane = t & (lanes - 1)
        s = t >> lbits
        k, q, h0, h1, w0, w1 = _pool_bin(s, hs, he, ws, we, NB, PH, PW)
        if h1 <= h0 or w1 <= w0:
            continue
        area = ft((h1 - h0) * (w1 - w0))
        base = (batch[k] * NB + q) * HW * Cg
        for c in range(lane, Cg, lanes):
            gv = gcl[s * Cg + c] / area
            for h in range(h0, h1):
                for w in range(w0, w1):
                    cuda.atomic.add(gbuf, base + (h * W + w) * Cg + c, gv)


@cuda.jit(cache=not SIMULATOR)
def _pool_keys(batch, hs, he, ws, we, cstart, keys, wts, src, K, NB, PH, PW, H, W, Cg):
    """Deterministic ps_roi_pool: thread per bin unit s = k*NB + q; its pixels are the
    contributions cstart[s] ...: key (b*NB + q)*HW + pixel, weight 1 / area, src s*Cg."""
    ft = wts.dtype.type
    HW = H * W
    total = K * NB
    for s in range(cuda.grid(1), total, cuda.gridsize(1)):
        k, q, h0, h1, w0, w1 = _pool_bin(s, hs, he, ws, we, NB, PH, PW)
        if h1 <= h0 or w1 <= w0:
            continue
        inv = ft(1) / ft((h1 - h0) * (w1 - w0))
        kbase = (batch[k] * NB + q) * HW
        e = cstart[s]
        for h in range(h0, h1):
            for w in range(w0, w1):
                keys[e] = kbase + h * W + w
                wts[e] = inv
                src[e] = s * Cg
                e += 1


@cuda.jit(cache=not SIMULATOR)
def _argmax_grad_input(gout, argmax, batch, gin, K, C, NB, HW):
    """roi_pool: one thread per output element t = (k, c, q): gin[b, c, argmax[t]] += gout[t]
    (atomic; NCHW; an empty bin, argmax -1, adds nothing)."""
    total = K * C * NB
    for t in range(cuda.grid(1), total, cuda.gridsize(1)):
        a = argmax[t]
        if a >= 0:
            kc = t // NB
            k = kc // C
            c = kc - k * C
            cuda.atomic.add(gin, (batch[k] * C + c) * HW + a, gout[t])


_RANGE_THREADS = 1 if SIMULATOR else 256
_RANGE_BLOCKS = 1 if SIMULATOR else 1024


@cuda.jit(cache=not SIMULATOR)
def _partial_range(xlo, xhi, lo, hi):
    """Block b writes the min of its grid-stride share of ``xlo`` to lo[b] and the max of its
    share of ``xhi`` to hi[b] (shared-memory trees; an empty share gives int64's max and -max).
    Called on (x, x) and then on the blocks' (lo, hi) with one block."""
    buf_lo = cuda.shared.array(_RANGE_THREADS, np.int64)
    buf_hi = cuda.shared.array(_RANGE_THREADS, np.int64)
    t = cuda.threadIdx.x
    a = np.int64(0x7FFFFFFFFFFFFFFF)
    b = -a
    for i in range(cuda.grid(1), xlo.size, cuda.gridsize(1)):
        a = min(a, np.int64(xlo[i]))
        b = max(b, np.int64(xhi[i]))
    buf_lo[t] = a
    buf_hi[t] = b
    cuda.syncthreads()
    step = _RANGE_THREADS // 2
    while step > 0:
        if t < step:
            buf_lo[t] = min(buf_lo[t], buf_lo[t + step])
            buf_hi[t] = max(buf_hi[t], buf_hi[t + step])
        cuda.syncthreads()
        step //= 2
    if t == 0:
        lo[cuda.blockIdx.x] = buf_lo[0]
        hi[cuda.blockIdx.x] = buf_hi[0]


def index_range(a: Any) -> tuple[int, int]:
    """(min, max) of a non-empty integer device array, reduced on the device: 16 bytes come back
    to the host, not the array (roi_pool_backward checks a caller's argmax with it)."""
    x = flat(a)
    blocks = max(1, min(-(-x.size // _RANGE_THREADS), _RANGE_BLOCKS))
    lo, hi = empty((blocks,), np.int64), empty((blocks,), np.int64)
    _partial_range[blocks, _RANGE_THREADS](x, x, lo, hi)
    out = empty((2,), np.int64)
    _partial_range[1, _RANGE_THREADS](lo, hi, out[:1], out[1:])
    low, high = out.copy_to_host()
    return int(low), int(high)


@cuda.jit(cache=not SIMULATOR)
def _argmax_keys(argmax, batch, keys, K, C, NB, HW, n_keys):
    """Deterministic roi_pool: key of output element t = (k, c, q): (b*C + c)*HW + argmax[t],
    n_keys for an empty bin."""
    total = K * C * NB
    for t in range(cuda.grid(1), total, cuda.gridsize(1)):
        a = argmax[t]
        kc = t // NB
        k = kc // C
        c = kc - k * C
        keys[t] = (batch[k] * C + c) * HW + a if a >= 0 else n_keys


@cuda.jit(cache=not SIMULATOR)
def _argmax_owner(order, starts, gout, gin):
    """Deterministic roi_pool: one thread per NCHW input element i sums gout over the output
    elements keyed to it, in sorted order."""
    ft = gout.dtype.type
    for i in range(cuda.grid(1), gin.size, cuda.gridsize(1)):
        acc = ft(0)
        for j in range(starts[i], starts[i + 1]):
            acc += gout[order[j]]
        gin[i] = acc


def _pool_setup(
    mode: str, rois: Any, output_size: tuple, spatial_scale: float, H: int, W: int, dtype: Any
) -> tuple:
    """Host integer bins (``pool_bins``, computed in the data's dtype) and their device copies."""
    host = pool_bins(mode, rois, output_size, spatial_scale, H, W, dtype)
    return host, tuple(_dev(a) for a in host)


def _pool_forward_api(
    mode: str, input: Any, rois: Any, output_size: tuple, spatial_scale: float
) -> tuple[Any, Any]:
    """roi_pool -> (out, argmax) with argmax int64 flat plane indices (-1: empty bin);
    ps_roi_pool -> (out, None)."""
    B, Cin, H, W = (int(s) for s in input.shape)
    PH, PW = output_size
    NB = PH * PW
    ps = mode == "ps_roi_pool"
    G, Cg = _groups(ps, NB, Cin)
    K = int(rois.shape[0])
    shape = (K, Cg, PH, PW)
    if K * Cg * NB == 0 or H * W == 0:
        return zeros(shape, input.dtype), (None if ps else full(shape, -1, np.int64))
    _, bins = _pool_setup(mode, rois, output_size, spatial_scale, H, W, input.dtype)
    x = transpose_last(flat(input), B, Cg, G * H * W)
    out = empty((K * NB * Cg,), input.dtype)
    argmax = empty((1,) if ps else (K * NB * Cg,), np.int64)
    lanes = lanes_for(Cg)
    _pool_forward[grid(K * NB * lanes)](
        x, *bins, out, argmax, K, NB, PH, PW, H, W, G, Cg, ps, lanes, _lane_bits(lanes)
    )
    out = _nchw(out, K, NB, Cg, shape)
    return out, (None if ps else _nchw(argmax, K, NB, Cg, shape))


def roi_pool_forward(input, rois, output_size, spatial_scale):
    """(out, argmax) with argmax int64 flat plane indices (-1: empty bin)."""
    return _pool_forward_api("roi_pool", input, rois, output_size, spatial_scale)


def roi_pool_backward(grad_out, rois, argmax, input_shape, output_size, spatial_scale, needs):
    """Each bin's gradient to its argmax (any integer dtype, values in [-1, H*W))."""
    if not needs[0]:
        return (None,)
    B, C, H, W = (int(s) for s in input_shape)
    PH, PW = output_size
    NB, HW = PH * PW, H * W
    K = int(rois.shape[0])
    dtype = grad_out.dtype
    if K * C * NB == 0 or HW == 0 or B == 0:
        return (zeros(tuple(input_shape), dtype),)
    batch = _dev(np.asarray(rois)[:, 0].astype(np.int64))
    if are_deterministic_algorithms_enabled():
        n_keys = B * C * HW
        keys = empty((K * C * NB,), np.int64)
        _argmax_keys[grid(K * C * NB)](flat(argmax), batch, keys, K, C, NB, HW, n_keys)
        order, starts = segments(keys, n_keys)
        g_in = empty(tuple(input_shape), dtype)
        _argmax_owner[grid(n_keys)](order, starts, flat(grad_out), flat(g_in))
        return (g_in,)
    g_in = zeros(tuple(input_shape), dtype)
    _argmax_grad_input[grid(K * C * NB)](
        flat(grad_out), flat(argmax), batch, flat(g_in), K, C, NB, HW
    )
    return (g_in,)


def ps_roi_pool_forward(input, rois, output_size, spatial_scale):
    return _pool_forward_api("ps_roi_pool", input, rois, output_size, spatial_scale)[0]


def ps_roi_pool_backward(grad_out, rois, input_shape, output_size, spatial_scale, needs):
    """Each bin's gradient spread evenly over the bin."""
    if not needs[0]:
        return (None,)
    B, Cin, H, W = (int(s) for s in input_shape)
    PH, PW = output_size
    NB, HW = PH * PW, H * W
    Cg = Cin // NB
    K = int(rois.shape[0])
    dtype = grad_out.dtype
    if K * Cg * NB == 0 or HW == 0 or B == 0:
        return (zeros(tuple(input_shape), dtype),)
    (_, hs, he, ws, we), bins = _pool_setup(
        "ps_roi_pool", rois, output_size, spatial_scale, H, W, dtype
    )
    gcl = transpose_last(flat(grad_out), K, Cg, NB)  # (K, NB, Cg)
    if are_deterministic_algorithms_enabled():
        area = (np.maximum(he - hs, 0)[:, :, None] * np.maximum(we - ws, 0)[:, None, :]).ravel()
        cstart = np.zeros(K * NB + 1, np.int64)
        np.cumsum(area, out=cstart[1:])
        E = int(cstart[-1])
        if E == 0:
            return (zeros(tuple(input_shape), dtype),)
        n_keys = B * NB * HW
        keys = empty((E,), np.int64)
        wts = empty((E,), dtype)
        src = empty((E,), np.int64)
        _pool_keys[grid(K * NB)](*bins, _dev(cstart), keys, wts, src, K, NB, PH, PW, H, W, Cg)
        g = _owner_gradient(keys, wts, src, 0, n_keys, gcl, dtype, B, NB, HW, 1, Cg)
        return (g.reshape(tuple(input_shape)),)
    lanes = lanes_for(Cg)
    gbuf = zeros((B * NB * HW * Cg,), dtype)
    _pool_grad_input[grid(K * NB * lanes)](
        gcl, *bins, gbuf, K, NB, PH, PW, H, W, Cg, lanes, _lane_bits(lanes)
    )
    return (_nchw(gbuf, B, NB * HW, Cg, input_shape),)


# ---------------------------------------------------------------------------- deformable PS
# Bin unit s = (k*NB + q)*ncls + cls: class cls's bin q = ph*P + pw of RoI k; its channels are
# the class's cec = D // ncls output channels co = cls*cec + cl, which read the grouped
# channels-last map (G = gs*gs groups, Cg = D) at group gq = group[ph]*gs + group[pw].


@cuda.jit(device=True)
def _dps_unit(fgeo, batch, part, group, off, has_off, trans_std, s, P, NB, ncls, PS, gs, ft):
    """Bin unit s -> (k, q, cls, hstart, wstart, group cell gq, batch index) (Deformable-ConvNets,
    docs/ops/deform_roi.rst): hstart = ph*bin_h + start_h + ty*roi_h (wstart likewise with
    tx*roi_w), (tx, ty) = offset[k, 2*cls (+1), part[ph], part[pw]] * trans_std."""
    cls = s % ncls
    u = s // ncls
    k = u // NB
    q = u - k * NB
    ph = q // P
    pw = q - ph * P
    tx = ft(0)
    ty = ft(0)
    if has_off:
        o = ((k * 2 * ncls + 2 * cls) * PS + part[ph]) * PS + part[pw]
        tx = off[o] * trans_std
        ty = off[o + PS * PS] * trans_std
    hstart = ft(ph) * fgeo[k * 8 + 2] + fgeo[k * 8 + 0]
    hstart += ty * fgeo[k * 8 + 6]
    wstart = ft(pw) * fgeo[k * 8 + 3] + fgeo[k * 8 + 1]
    wstart += tx * fgeo[k * 8 + 7]
    return k, q, cls, hstart, wstart, group[ph] * gs + group[pw], batch[k]


@cuda.jit(device=True)
def _dps_sample(fgeo, k, hstart, wstart, ih, iw, H, W, ft):
    """Sample (ih, iw) of a bin: (valid, h, w); samples outside [-0.5, size - 0.5] are skipped,
    the others clamped and interpolated, which is ``clamp_plan`` on that range."""
    half = ft(0.5)
    w = wstart + ft(iw) * fgeo[k * 8 + 5]
    h = hstart + ft(ih) * fgeo[k * 8 + 4]
    valid = w >= -half and w <= ft(W) - half and h >= -half and h <= ft(H) - half
    return valid, h, w


@cuda.jit(device=True)
def _dps_count(fgeo, k, hstart, wstart, spp, H, W, ft):
    """The number of valid samples of a bin."""
    n = 0
    for ih in range(spp):
        for iw in range(spp):
            valid, h, w = _dps_sample(fgeo, k, hstart, wstart, ih, iw, H, W, ft)
            if valid:
                n += 1
    return n


@cuda.jit(cache=not SIMULATOR)
def _dps_forward(
    x, fgeo, batch, part, group, off, out, K, NB, P, H, W, gs, D, ncls, PS, spp, trans_std,
    has_off, lanes, lbits,
):  # fmt: skip
    """Thread (bin unit s, lane): out[s*cec + cl] = mean of the valid samples of channel
    co = cls*cec + cl of group gq, for the lane's cl (0 without a valid sample)."""
    ft = x.dtype.type
    zero = ft(0)
    HW = H * W
    cec = D // ncls
    total = K * NB * ncls * lanes
    for t in range(cuda.grid(1), total, cuda.gridsize(1)):
        lane = t & (lanes - 1)
        s = t >> lbits
        k, q, cls, hstart, wstart, gq, b = _dps_unit(
            fgeo, batch, part, group, off, has_off, trans_std, s, P, NB, ncls, PS, gs, ft
        )
        base = (b * gs * gs + gq) * HW * D + cls * cec
        for c0 in range(lane, cec, _RUN * lanes):
            a = (zero, zero, zero, zero, zero, zero, zero, zero)
            n = 0
            for ih in range(spp):
                for iw in range(spp):
                    valid, h, w = _dps_sample(fgeo, k, hstart, wstart, ih, iw, H, W, ft)
                    if valid:
                        n += 1
                        idx, wt, cy, cx = clamp_plan(h, w, H, W, ft)
                        a = _acc_run(a, x, base, D, c0, lanes, cec, idx, wt, zero)
            _store_run(out, s * cec, c0, lanes, cec, a, ft(n) if n > 0 else ft(1))


@cuda.jit(cache=not SIMULATOR)
def _dps_grad_input(
    gcl, fgeo, batch, part, group, off, gbuf, K, NB, P, H, W, gs, D, ncls, PS, spp, trans_std,
    has_off, lanes, lbits,
):  # fmt: skip
    """Thread (bin unit s, lane): for each valid sample, gbuf[pixel, co] += w / n * gcl[s*cec +
    cl] (atomic) for the lane's cl; ``gbuf`` grouped channels-last (B, gs*gs, HW, D)."""
    ft = gcl.dtype.type
    HW = H * W
    cec = D // ncls
    total = K * NB * ncls * lanes
    for t in range(cuda.grid(1), total, cuda.gridsize(1)):
        lane = t & (lanes - 1)
        s = t >> lbits
        k, q, cls, hstart, wstart, gq, b = _dps_unit(
            fgeo, batch, part, group, off, has_off, trans_std, s, P, NB, ncls, PS, gs, ft
        )
        n = _dps_count(fgeo, k, hstart, wstart, spp, H, W, ft)
        if n == 0:
            continue
        base = (b * gs * gs + gq) * HW * D + cls * cec
        for ih in range(spp):
            for iw in range(spp):
                valid, h, w = _dps_sample(fgeo, k, hstart, wstart, ih, iw, H, W, ft)
                if valid:
                    idx, wt, cy, cx = clamp_plan(h, w, H, W, ft)
                    wt = _scaled(wt, ft(n))
                    for c in range(lane, cec, lanes):
                        scatter_plan(gbuf, base + c, D, idx, wt, gcl[s * cec + c])


@cuda.jit(cache=not SIMULATOR)
def _dps_grad_offset(
    gcl, x, fgeo, batch, part, group, off, dots, K, NB, P, H, W, gs, D, ncls, PS, spp,
    trans_std, lanes, lbits,
):  # fmt: skip
    """Thread (bin unit s, lane) sums g * dV/dy|x over the valid samples and its channels; the
    lanes' sums are reduced with lane_sum and lane 0 writes dots[s, 0|1] = (x, y) parts times
    trans_std*roi_w|h / n. Walks padded(units * lanes) threads (whole warps)."""
    ft = x.dtype.type
    zero = ft(0)
    HW = H * W
    cec = D // ncls
    total = K * NB * ncls * lanes
    for t in range(cuda.grid(1), (total + WARP - 1) // WARP * WARP, cuda.gridsize(1)):
        lane = t & (lanes - 1)
        s = t >> lbits
        active = t < total
        gy = zero
        gx = zero
        if active:
            k, q, cls, hstart, wstart, gq, b = _dps_unit(
                fgeo, batch, part, group, off, True, trans_std, s, P, NB, ncls, PS, gs, ft
            )
            base = (b * gs * gs + gq) * HW * D + cls * cec
            n = 0
            for ih in range(spp):
                for iw in range(spp):
                    valid, h, w = _dps_sample(fgeo, k, hstart, wstart, ih, iw, H, W, ft)
                    if valid:
                        n += 1
                        idx, wt, cy, cx = clamp_plan(h, w, H, W, ft)
                        for c in range(lane, cec, lanes):
                            gv = gcl[s * cec + c]
                            gy += gv * strided_value(x, base + c, D, idx, cy)
                            gx += gv * strided_value(x, base + c, D, idx, cx)
            if n > 0:
                gy = gy * trans_std * fgeo[k * 8 + 6] / ft(n)
                gx = gx * trans_std * fgeo[k * 8 + 7] / ft(n)
        gy = lane_sum(gy, lanes)
        gx = lane_sum(gx, lanes)
        if active and lane == 0:
            dots[2 * s] = gx
            dots[2 * s + 1] = gy


@cuda.jit(cache=not SIMULATOR)
def _dps_offset_reduce(dots, part, goff, K, NB, P, ncls, PS):
    """One thread per offset element (k, 2*cls + d, part row, part col): the sum, in bin order,
    of dots[unit, d] over the bins of that part cell."""
    ft = dots.dtype.type
    total = K * 2 * ncls * PS * PS
    for o in range(cuda.grid(1), total, cuda.gridsize(1)):
        qw = o % PS
        qh = (o // PS) % PS
        ch = (o // (PS * PS)) % (2 * ncls)
        k = o // (PS * PS * 2 * ncls)
        cls = ch // 2
        d = ch - 2 * cls
        acc = ft(0)
        for ph in range(P):
            if part[ph] != qh:
                continue
            for pw in range(P):
                if part[pw] == qw:
                    acc += dots[2 * ((k * NB + ph * P + pw) * ncls + cls) + d]
        goff[o] = acc


@cuda.jit(cache=not SIMULATOR)
def _dps_keys(
    fgeo, batch, part, group, off, keys, wts, src, K, NB, P, H, W, gs, D, ncls, PS, spp,
    trans_std, has_off, n_keys,
):  # fmt: skip
    """Deterministic mode: thread per bin unit s; sample (ih, iw) is point t = s*spp*spp +
    ih*spp + iw, its corners contributions 4t .. 4t + 3: key ((b*gs*gs + gq)*ncls + cls)*HW +
    pixel (n_keys for a zero weight or an invalid sample), weight w / n, src[t] = s*cec."""
    ft = fgeo.dtype.type
    HW = H * W
    cec = D // ncls
    total = K * NB * ncls
    for s in range(cuda.grid(1), total, cuda.gridsize(1)):
        k, q, cls, hstart, wstart, gq, b = _dps_unit(
            fgeo, batch, part, group, off, has_off, trans_std, s, P, NB, ncls, PS, gs, ft
        )
        n = _dps_count(fgeo, k, hstart, wstart, spp, H, W, ft)
        kbase = ((b * gs * gs + gq) * ncls + cls) * HW
        pt = s * spp * spp
        for ih in range(spp):
            for iw in range(spp):
                valid, h, w = _dps_sample(fgeo, k, hstart, wstart, ih, iw, H, W, ft)
                # an invalid sample's plan is replaced by zero weights (keys n_keys)
                idx, wt, cy, cx = clamp_plan(h, w, H, W, ft)
                if not valid:
                    wt = (ft(0), ft(0), ft(0), ft(0))
                src[pt] = s * cec
                _keys4(keys, wts, 4 * pt, kbase, idx, _scaled(wt, ft(max(n, 1))), n_keys)
                pt += 1


def _dps_setup(
    input: Any,
    rois: Any,
    offset: Any,
    spatial_scale: float,
    group_size: int,
    pooled_size: int,
    part_size: int,
    sample_per_part: int,
) -> tuple:
    """Device geometry (fgeo in the data's dtype; batch, part and group cells int64) and the
    number of classes of the offsets."""
    fgeo, batch, part, group = deform_ps_geometry(
        rois, spatial_scale, group_size, pooled_size, part_size, sample_per_part, input.dtype
    )
    ncls = int(offset.shape[1]) // 2 if offset is not None else 1
    return (_dev_float(fgeo, input.dtype), _dev(batch), _dev(part), _dev(group)), ncls


def deform_ps_roi_pool_forward(
    input: Any,
    rois: Any,
    offset: Any,
    spatial_scale: float,
    output_dim: int,
    group_size: int,
    pooled_size: int,
    part_size: int,
    sample_per_part: int,
    trans_std: float,
) -> Any:
    """deform_ps_roi_pool forward -> (K, output_dim, pooled_size, pooled_size)."""
    B, C, H, W = (int(s) for s in input.shape)
    K, P, D, gs = int(rois.shape[0]), pooled_size, output_dim, group_size
    NB = P * P
    if K * D * NB == 0 or H * W == 0:
        return zeros((K, D, P, P), input.dtype)
    geo, ncls = _dps_setup(input, rois, offset, spatial_scale, gs, P, part_size, sample_per_part)
    has_off = offset is not None
    x = transpose_last(flat(input), B, D, gs * gs * H * W)  # (B, gs*gs, HW, D)
    out = empty((K * NB * D,), input.dtype)
    lanes = lanes_for(D // ncls)
    _dps_forward[grid(K * NB * ncls * lanes)](
        x, *geo, flat(offset) if has_off else geo[0], out, K, NB, P, H, W, gs, D, ncls,
        part_size, sample_per_part, input.dtype.type(trans_std), has_off, lanes,
        _lane_bits(lanes),
    )  # fmt: skip
    return _nchw(out, K, NB, D, (K, D, P, P))


def deform_ps_roi_pool_backward(
    grad_out: Any,
    input: Any,
    rois: Any,
    offset: Any,
    spatial_scale: float,
    output_dim: int,
    group_size: int,
    pooled_size: int,
    part_size: int,
    sample_per_part: int,
    trans_std: float,
    needs: tuple,
) -> tuple:
    """(grad_input, grad_offset) of deform_ps_roi_pool; grad_offset None without an offset."""
    B, C, H, W = (int(s) for s in input.shape)
    K, P, D, gs = int(rois.shape[0]), pooled_size, output_dim, group_size
    NB, HW, spp = P * P, H * W, sample_per_part
    dtype = input.dtype
    has_off = offset is not None
    need_in = bool(needs[0])
    need_off = has_off and bool(needs[1])
    g_in = None
    g_off = zeros(offset.shape, offset.dtype) if need_off else None
    if K * D * NB == 0 or HW == 0 or not (need_in or need_off):
        return (zeros(input.shape, dtype) if need_in else None), g_off
    geo, ncls = _dps_setup(input, rois, offset, spatial_scale, gs, P, part_size, spp)
    off = flat(offset) if has_off else geo[0]
    ts = dtype.type(trans_std)
    cec = D // ncls
    gcl = transpose_last(flat(grad_out), K, D, NB)  # (K, NB, D)
    lanes = lanes_for(cec)
    lbits = _lane_bits(lanes)
    units = K * NB * ncls
    if need_in and are_deterministic_algorithms_enabled():
        npts = units * spp * spp
        n_keys = B * gs * gs * ncls * HW
        keys = empty((4 * npts,), np.int64)
        wts = empty((4 * npts,), dtype)
        src = empty((npts,), np.int64)
        _dps_keys[grid(units)](
            *geo, off, keys, wts, src, K, NB, P, H, W, gs, D, ncls, part_size, spp, ts, has_off,
            n_keys,
        )  # fmt: skip
        g = _owner_gradient(keys, wts, src, 2, n_keys, gcl, dtype, B, gs * gs, HW, ncls, cec)
        g_in = g.reshape(tuple(input.shape))
    elif need_in:
        gbuf = zeros((B * gs * gs * HW * D,), dtype)
        _dps_grad_input[grid(units * lanes)](
            gcl, *geo, off, gbuf, K, NB, P, H, W, gs, D, ncls, part_size, spp, ts, has_off,
            lanes, lbits,
        )  # fmt: skip
        g_in = _nchw(gbuf, B, gs * gs * HW, D, input.shape)
    if need_off:
        x = transpose_last(flat(input), B, D, gs * gs * HW)
        dots = empty((2 * units,), dtype)
        _dps_grad_offset[grid(padded(units * lanes))](
            gcl, x, *geo, off, dots, K, NB, P, H, W, gs, D, ncls, part_size, spp, ts, lanes,
            lbits,
        )  # fmt: skip
        _dps_offset_reduce[grid(g_off.size)](dots, geo[2], flat(g_off), K, NB, P, ncls, part_size)
    return g_in, g_off
