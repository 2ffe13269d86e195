"""CPU kernels of ``functional.conv2d`` (torch's conv2d, NCHW): im2col + BLAS, in NumPy.

``pad`` is (top, bottom, left, right); ``out_hw`` the output size (Hout, Wout).

* General groups: im2col (one copy per kernel tap (i, j) into a column buffer), then one BLAS
  matmul per image and group. With stride 1 the columns are taken over the *padded* width
  (``L = Hout * Wp``): each tap is then one contiguous slice of the flattened padded image,
  which copies several times faster than a strided window; the ``Wp - Wout`` extra columns per
  row are computed and dropped.
* Backward: the weight gradient is one matmul with the forward's columns; the input gradient
  is, for stride 1, the correlation of the output gradient with the flipped, transposed kernel
  (the same im2col + matmul, no scatter), and otherwise the transposed matmul followed by
  col2im, which adds the columns back tap by tap in a fixed order. Everything is deterministic.
* Depthwise groups (one input channel per group, as in DAT's offset network) skip the matmul
  and the padding: each tap is a broadcast multiply-add over the part of the output it sees
  (:func:`_depthwise_forward`), far faster than many one-row matmuls.
* Multi-megabyte temporaries come from per-thread scratch buffers (:func:`_scratch`): allocating
  them afresh costs page faults, about a quarter of forward+backward at the benchmark size.

The pair shares state through ``cache``: a dict the forward fills with what the weight gradient
needs (the columns, or the channels-last input on the depthwise path) and the backward reads.
NumPy only: nothing here compiles.
"""

from __future__ import annotations

import threading
from typing import Any

import numpy as np

__all__ = ["conv2d_forward", "conv2d_backward"]


def _is_depthwise(w: Any, groups: int) -> bool:
    return w.shape[1] == 1 and groups > 1


def conv2d_forward(
    x: Any,
    w: Any,
    b: Any,
    stride: tuple,
    pad: tuple,
    dilation: tuple,
    groups: int,
    out_hw: tuple,
    cache: dict | None = None,
) -> Any:
    """out (N, O, Hout, Wout) of x (N, C, H, W), w (O, C/groups, kh, kw), b (O,) or None.

    With ``cache`` (a dict), leaves there what :func:`conv2d_backward` needs for the weight
    gradient."""
    o, cg, kh, kw = w.shape
    if _is_depthwise(w, groups):  # out channel co reads input channel co // m
        taps = _depthwise_taps(x.shape, (kh, kw), stride, pad, dilation, out_hw)
        x_nhwc = np.ascontiguousarray(x.transpose(0, 2, 3, 1))
        if cache is not None:
            cache["input_nhwc"] = x_nhwc
        out = _depthwise_forward(x_nhwc, w, taps, out_hw)
        if b is not None:
            out += b.reshape(o, 1, 1)
        return out
    cols, row = _im2col(x, (kh, kw), stride, pad, dilation, out_hw)
    if cache is not None:
        cache["columns"] = cols
        cache["row"] = row
    return _cols_times_weight(cols, w, b, groups, out_hw, row)


def conv2d_backward(
    grad: Any,
    x_shape: tuple,
    w: Any,
    stride: tuple,
    pad: tuple,
    dilation: tuple,
    groups: int,
    out_hw: tuple,
    needs: tuple,
    cache: dict | None = None,
) -> tuple:
    """(grad_input, grad_weight, grad_bias), None where ``needs`` is False; the weight gradient
    needs the ``cache`` the forward filled."""
    cache = {} if cache is None else cache
    n, c, h, wd = x_shape
    o, cg, kh, kw = w.shape
    ho, wo = out_hw
    og, k = o // groups, cg * kh * kw
    top, bottom, left, right = pad
    need_x, need_w, need_b = needs
    gx = gw = gb = None
    if need_b:
        gb = grad.sum(axis=(0, 2, 3))
    if _is_depthwise(w, groups):
        taps = _depthwise_taps(x_shape, (kh, kw), stride, pad, dilation, out_hw)
        saved = cache.get("input_nhwc") if need_w else None
        gx, gw = _depthwise_backward(grad, x_shape, saved, w, taps, need_x, need_w)
        return gx, gw, gb
    row = cache.get("row", wo)
    length = ho * row
    go = None
    if need_w or (need_x and stride != (1, 1)):
        if row != wo:  # zero gradient for the dropped columns
            go = _scratch("grad", (n, o, ho, row), grad.dtype)
            go[..., :wo] = grad
            go[..., wo:] = 0
        else:
            go = grad
        go = go.reshape(n, groups, og, length)
    if need_w:
        saved = cache["columns"]
        # (N, g, K, L) @ (N, g, L, O/g), summed over the batch: faster in BLAS than the
        # transposed product (N, g, O/g, L) @ (N, g, L, K)
        gw_t = np.matmul(saved.reshape(n, groups, k, length), go.transpose(0, 1, 3, 2))
        gw = np.ascontiguousarray(gw_t.sum(axis=0).transpose(0, 2, 1)).reshape(o, cg, kh, kw)
    if not need_x:
        return gx, gw, gb
    if stride == (1, 1):
        # gx[y, x] = sum_ij w[i, j] . grad[y + top - i*dh, x + left - j*dw]: a correlation
        # of grad, padded by (kh-1)*dh - top etc. (negative amounts crop), with the kernel
        # flipped and its in/out channels swapped within each group.
        reach = ((kh - 1) * dilation[0], (kw - 1) * dilation[1])
        amounts = (reach[0] - top, reach[0] - bottom, reach[1] - left, reach[1] - right)
        crop = tuple(max(-a, 0) for a in amounts)
        g_in = grad[:, :, crop[0] : ho - crop[1], crop[2] : wo - crop[3]]
        g_pad = tuple(max(a, 0) for a in amounts)
        w_t = w.reshape(groups, og, cg, kh, kw).transpose(0, 2, 1, 3, 4)[..., ::-1, ::-1]
        w_t = np.ascontiguousarray(w_t).reshape(c, og, kh, kw)
        cols_g, row_g = _im2col(g_in, (kh, kw), (1, 1), g_pad, dilation, (h, wd), True)
        gx = _cols_times_weight(cols_g, w_t, None, groups, (h, wd), row_g)
        return gx, gw, gb
    # strided: transposed product, then col2im one strided add per tap in a fixed order
    wt = np.ascontiguousarray(w.reshape(groups, og, k).transpose(0, 2, 1))
    gcols = np.matmul(wt, go).reshape(n, c, kh, kw, ho, wo)
    if kh == kw == 1 and pad == (0, 0, 0, 0):
        gx = np.zeros((n, c, h, wd), grad.dtype)
        gx[:, :, :: stride[0], :: stride[1]] = gcols[:, :, 0, 0]
        return gx, gw, gb
    gxp = np.zeros((n, c, h + top + bottom, wd + left + right), grad.dtype)
    for i in range(kh):
        for j in range(kw):
            window = _conv_window(i, j, dilation, stride, out_hw)
            gxp[(slice(None), slice(None)) + window] += gcols[:, :, i, j]
    gx = gxp[:, :, top : top + h, left : left + wd]
    return gx, gw, gb


def _conv_window(i: int, j: int, dil: tuple, stride: tuple, out_hw: tuple) -> tuple:
    """Rows and columns of the padded input that kernel tap (i, j) reads for every output pixel:
    ``oy*sh + i*dh`` for ``oy`` in ``[0, Hout)`` (likewise x)."""
    (dh, dw), (sh, sw), (ho, wo) = dil, stride, out_hw
    return (
        slice(i * dh, i * dh + sh * (ho - 1) + 1, sh),
        slice(j * dw, j * dw + sw * (wo - 1) + 1, sw),
    )


def _zero_pad(x: np.ndarray, pad: tuple[int, int, int, int]) -> np.ndarray:
    top, bottom, left, right = pad
    if not (top or bottom or left or right):
        return x
    n, c, h, w = x.shape
    xp = np.zeros((n, c, h + top + bottom, w + left + right), x.dtype)
    xp[:, :, top : top + h, left : left + w] = x
    return xp


def _tap_span(k: int, dil: int, stride: int, pad_before: int, size: int, out: int) -> tuple:
    """For kernel tap ``k`` along one axis: the output range ``[lo, hi)`` whose input coordinate
    ``o*stride - pad_before + k*dil`` lies inside ``[0, size)``, and the input slice it reads."""
    off = k * dil - pad_before
    lo = max(0, -(off // stride))  # the smallest o with o*stride + off >= 0
    hi = min(out, (size - 1 - off) // stride + 1)
    if hi <= lo:
        return lo, lo, slice(0, 0)
    start = lo * stride + off
    return lo, hi, slice(start, start + (hi - lo - 1) * stride + 1, stride)


def _depthwise_taps(x_shape: tuple, kernel: tuple, stride: tuple, pad: tuple, dilation: tuple,
                    out_hw: tuple) -> list:  # fmt: skip
    """(i, j, output window, input window) for every kernel tap that reads inside the image."""
    _, _, h, w = x_shape
    taps = []
    for i in range(kernel[0]):
        ylo, yhi, ys = _tap_span(i, dilation[0], stride[0], pad[0], h, out_hw[0])
        for j in range(kernel[1]):
            xlo, xhi, xs = _tap_span(j, dilation[1], stride[1], pad[2], w, out_hw[1])
            if yhi > ylo and xhi > xlo:
                taps.append((i, j, (slice(ylo, yhi), slice(xlo, xhi)), (ys, xs)))
    return taps


def _depthwise_forward(x_nhwc: Any, w: Any, taps: list, out_hw: tuple) -> Any:
    """Depthwise conv (one input channel per group, ``m = O // C`` outputs per channel) as one
    multiply-add per kernel tap over the part of the output that tap sees: no padding, no
    matmul. Works channels-last (input ``(N, H, W, C)``), so NumPy's inner loops run over the
    channels rather than over a short, strided output row; returns NCHW."""
    n, _, _, c = x_nhwc.shape
    m = w.shape[0] // c
    wt = w.reshape(c, m, *w.shape[2:]).transpose(2, 3, 1, 0)  # (kh, kw, m, C)
    out = np.zeros((n, *out_hw, m, c), x_nhwc.dtype)
    for i, j, (oy, ox), (iy, ix) in taps:
        out[:, oy, ox] += x_nhwc[:, iy, ix, None, :] * wt[i, j]
    # (N, Ho, Wo, m, C) -> (N, C, m, Ho, Wo): output channel c*m + q
    return np.ascontiguousarray(out.transpose(0, 4, 3, 1, 2)).reshape(n, c * m, *out_hw)


def _depthwise_backward(
    grad: Any, x_shape: tuple, x_nhwc: Any, w: Any, taps: list, need_x: bool, need_w: bool
) -> tuple:
    """Gradients of :func:`_depthwise_forward` (channels-last, taps in a fixed order:
    deterministic); ``x_nhwc`` is needed only for the weight gradient. Returns the input
    gradient in NCHW and the weight gradient (O, 1, kh, kw)."""
    n, c, h, wd = x_shape
    m = w.shape[0] // c
    kh, kw = w.shape[2:]
    wt = w.reshape(c, m, kh, kw).transpose(2, 3, 1, 0)  # (kh, kw, m, C)
    gt = grad.reshape(n, c, m, *grad.shape[2:]).transpose(0, 3, 4, 2, 1)  # (N, Ho, Wo, m, C)
    gt = np.ascontiguousarray(gt)
    gx = np.zeros((n, h, wd, c), grad.dtype) if need_x else None
    gw = np.zeros((kh, kw, m, c), grad.dtype) if need_w else None
    for i, j, (oy, ox), (iy, ix) in taps:
        go = gt[:, oy, ox]
        if need_x:
            if m == 1:
                gx[:, iy, ix] += go[:, :, :, 0] * wt[i, j, 0]
            else:
                gx[:, iy, ix] += np.einsum("nhwqc,qc->nhwc", go, wt[i, j])
        if need_w:
            gw[i, j] = np.einsum("nhwqc,nhwc->qc", go, x_nhwc[:, iy, ix])
    if need_x:
        gx = gx.transpose(0, 3, 1, 2)
    if need_w:
        gw = np.ascontiguousarray(gw.transpose(3, 2, 0, 1)).reshape(c * m, 1, kh, kw)
    return gx, gw


class _ScratchPool(threading.local):
    def __init__(self) -> None:
        self.buffers: dict[str, np.ndarray] = {}


_SCRATCH = _ScratchPool()
_SCRATCH_LIMIT = 1 << 26  # 64 MB: larger temporaries are allocated afresh, never kept


def _scratch(slot: str, shape: tuple, dtype: Any) -> np.ndarray:
    """An uninitialised array for a temporary that never leaves the function, from a per-thread
    buffer kept for the next call. Allocating conv2d's multi-megabyte temporaries afresh each
    time costs page faults (about a quarter of the forward+backward time at the benchmark size);
    reusing them does not. ``slot`` names buffers that are alive at the same time."""
    dtype = np.dtype(dtype)
    nbytes = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    if nbytes > _SCRATCH_LIMIT:
        return np.empty(shape, dtype)
    buf = _SCRATCH.buffers.get(slot)
    if buf is None or buf.nbytes < nbytes:
        buf = np.empty(max(nbytes, 64), np.uint8)
        _SCRATCH.buffers[slot] = buf
    return buf[:nbytes].view(dtype).reshape(shape)


def _im2col(
    x: Any,
    kernel: tuple,
    stride: tuple,
    pad: tuple,
    dilation: tuple,
    out_hw: tuple,
    transient: bool = False,
) -> tuple:
    """Column buffer ``(N, C, kh*kw, Hout*row)`` of the (padded) input, and ``row``: the number of
    columns per output row (``Wout``, or the padded width ``Wp`` on the stride-1 path, where
    each tap is one contiguous slice of the flattened padded image). ``transient``: the columns
    are used and dropped by the caller (they may live in the scratch pool)."""
    n, c, h, wd = x.shape
    kh, kw = kernel
    ho, wo = out_hw
    top, bottom, left, right = pad
    hp, wp = h + top + bottom, wd + left + right
    if kh == kw == 1 and pad == (0, 0, 0, 0):
        cols = np.ascontiguousarray(x[:, :, :: stride[0], :: stride[1]])
        return cols.reshape(n, c, 1, ho * wo), wo
    if stride == (1, 1):
        length = ho * wp
        flat = _scratch("flat", (n, c, _flat_size(hp, wp, kh, kw, dilation, length)), x.dtype)
        flat.fill(0)
        flat[:, :, : hp * wp].reshape(n, c, hp, wp)[:, :, top : top + h, left : left + wd] = x
        shape = (n, c, kh, kw, length)
        cols = _scratch("cols", shape, x.dtype) if transient else np.empty(shape, x.dtype)
        for chunk in _image_chunks(n, c * length * x.itemsize):
            for i in range(kh):  # a few images at a time: the source stays in cache
                for j in range(kw):
                    off = i * dilation[0] * wp + j * dilation[1]
                    cols[chunk, :, i, j] = flat[chunk, :, off : off + length]
        return cols.reshape(n, c, kh * kw, length), wp
    xp = _zero_pad(x, pad)
    cols = np.empty((n, c, kh, kw, ho, wo), x.dtype)
    for i in range(kh):
        for j in range(kw):
            cols[:, :, i, j] = xp[
                (slice(None), slice(None)) + _conv_window(i, j, dilation, stride, out_hw)
            ]
    return cols.reshape(n, c, kh * kw, ho * wo), wo


def _cols_times_weight(cols: Any, w: Any, b: Any, groups: int, out_hw: tuple, row: int) -> Any:
    """The convolution output (N, O, Hout, Wout) from the column buffer: per image and group the
    tall-skinny product (L, K) @ (K, O/g), which BLAS runs faster than (O/g, K) @ (K, L); the
    transpose back to NCHW is the pass that also drops extra columns and adds the bias."""
    n = cols.shape[0]
    o, cg, kh, kw = w.shape
    og, k = o // groups, cg * kh * kw
    ho, wo = out_hw
    cols = cols.reshape(n, groups, k, ho * row)
    prod = _scratch("product", (n, groups, ho * row, og), cols.dtype)
    np.matmul(cols.transpose(0, 1, 3, 2), w.reshape(groups, og, k).transpose(0, 2, 1), out=prod)
    out = prod.transpose(0, 1, 3, 2).reshape(n, groups, og, ho, row)[..., :wo]
    # a fresh array either way (the product lives in the scratch pool)
    out = np.array(out, order="C") if b is None else out + b.reshape(groups, og, 1, 1)
    return out.reshape(n, o, ho, wo)


def _image_chunks(n: int, bytes_per_image: int, budget: int = 1 << 18) -> list[slice]:
    """Batch slices of about ``budget`` bytes (at least one image each)."""
    step = max(1, budget // max(1, bytes_per_image))
    return [slice(i, i + step) for i in range(0, n, step)]


def _flat_size(hp: int, wp: int, kh: int, kw: int, dilation: tuple, length: int) -> int:
    """Length of the flattened padded image plus the slack that the last tap's slice of
    ``length`` elements reads past the end (the dropped columns of the last row)."""
    last = (kh - 1) * dilation[0] * wp + (kw - 1) * dilation[1]
    return max(hp * wp, last + length)
