"""mmcv's API under mmcv's names (deformnp.ops.mmcv, deformnp.nn.mmcv).

* roi_align (avg and max) against a float64 transcription of mmcv's roi_align CUDA kernel
  (forward and backward), gradcheck of max mode off ties and kinks, and its documented edge cases;
* the deformable convolutions and deform_roi_pool against deformnp's ops (the same op), their
  argument checks, and gradcheck through the wrappers;
* the layers: signatures, parameter names and initialisation as mmcv's, and (with torch) float64
  parity of outputs and input gradients with torch transcriptions of mmcv's module forwards, the
  same state dict loaded into both (MultiScaleDeformableAttention's CPU path
  ``multi_scale_deformable_attn_pytorch``, the DCN layers through torchvision's deform_conv2d as
  mmcv's MLU path does).
"""

from __future__ import annotations

import inspect
import math

import numpy as np
import pytest

import deformnp as dn
from deformnp import ops
from deformnp.nn import mmcv as mnn
from deformnp.ops import mmcv as mops

FLT_MAX = float(np.finfo(np.float32).max)


def rel_err(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.abs(a - b).max() / max(np.abs(b).max(), 1e-300))


# ============================================================================ reference


def _mmcv_bilinear(v, y, x):
    """mmcv's bilinear_interpolate_gradient (common_cuda_helper.hpp): the corners and weights,
    or None when out of range."""
    H, W = v.shape
    if y < -1.0 or y > H or x < -1.0 or x > W:
        return None
    y, x = max(y, 0.0), max(x, 0.0)
    y_low, x_low = int(y), int(x)
    if y_low >= H - 1:
        y_high = y_low = H - 1
        y = float(y_low)
    else:
        y_high = y_low + 1
    if x_low >= W - 1:
        x_high = x_low = W - 1
        x = float(x_low)
    else:
        x_high = x_low + 1
    ly, lx = y - y_low, x - x_low
    hy, hx = 1.0 - ly, 1.0 - lx
    return [
        (y_low, x_low, hy * hx),
        (y_low, x_high, hy * lx),
        (y_high, x_low, ly * hx),
        (y_high, x_high, ly * lx),
    ]


def _mmcv_sample(v, y, x):
    plan = _mmcv_bilinear(v, y, x)
    return 0.0 if plan is None else sum(w * v[r, c] for r, c, w in plan)


def mmcv_roi_align(x, rois, PH, PW, s, ratio, pool_mode, aligned, grad=None):
    """mmcv's roi_align_forward_cuda_kernel / roi_align_backward_cuda_kernel in float64 loops.

    Returns the output and, when ``grad`` is given, the input gradient."""
    K = rois.shape[0]
    N, C, H, W = x.shape
    out = np.zeros((K, C, PH, PW))
    gin = np.zeros_like(x)
    for k in range(K):
        b = int(rois[k, 0])
        o = 0.5 if aligned else 0.0
        sw, sh, ew, eh = (rois[k, i] * s - o for i in (1, 2, 3, 4))
        rw, rh = ew - sw, eh - sh
        if not aligned:
            rw, rh = max(rw, 1.0), max(rh, 1.0)
        bh, bw = rh / PH, rw / PW
        gh = ratio if ratio > 0 else int(math.ceil(rh / PH))
        gw = ratio if ratio > 0 else int(math.ceil(rw / PW))
        for c in range(C):
            v = x[b, c]
            for ph in range(PH):
                for pw in range(PW):
                    pts = [
                        (
                            sh + ph * bh + (iy + 0.5) * bh / gh,
                            sw + pw * bw + (ix + 0.5) * bw / gw,
                        )
                        for iy in range(gh)
                        for ix in range(gw)
                    ]
                    if pool_mode == "max":
                        best, arg = -FLT_MAX, None
                        for y, xx in pts:
                            val = _mmcv_sample(v, y, xx)
                            if val > best:
                                best, arg = val, (y, xx)
                        out[k, c, ph, pw] = best
                        plans = [] if arg is None else [(_mmcv_bilinear(v, *arg), 1.0)]
                    else:
                        count = max(gh * gw, 1)
                        out[k, c, ph, pw] = sum(_mmcv_sample(v, y, xx) for y, xx in pts) / count
                        plans = [(_mmcv_bilinear(v, y, xx), 1.0 / count) for y, xx in pts]
                    if grad is not None:
                        for plan, scale in plans:
                            for r, cc, w in plan or []:
                                gin[b, c, r, cc] += grad[k, c, ph, pw] * w * scale
    return out, gin


def random_rois(rng, K, B, H, W, scale=1.0):
    x1 = rng.uniform(-1.5, W - 2, K)
    y1 = rng.uniform(-1.5, H - 2, K)
    x2 = x1 + rng.uniform(1.3, W / 1.5, K)
    y2 = y1 + rng.uniform(1.3, H / 1.5, K)
    b = rng.integers(0, B, K)
    return np.stack([b, x1, y1, x2, y2], 1) / np.array([1, scale, scale, scale, scale])


def max_gap(x, rois, PH, PW, s, ratio, aligned):
    """The smallest gap between the largest and the second largest sample of any bin (ties
    and near-ties would make finite differences cross the kink of the max)."""
    gaps = []
    N, C, H, W = x.shape
    for k in range(rois.shape[0]):
        o = 0.5 if aligned else 0.0
        sw, sh, ew, eh = (rois[k, i] * s - o for i in (1, 2, 3, 4))
        rw, rh = ew - sw, eh - sh
        if not aligned:
            rw, rh = max(rw, 1.0), max(rh, 1.0)
        gh = ratio if ratio > 0 else int(math.ceil(rh / PH))
        gw = ratio if ratio > 0 else int(math.ceil(rw / PW))
        for c in range(C):
            for ph in range(PH):
                for pw in range(PW):
                    vals = sorted(
                        _mmcv_sample(
                            x[int(rois[k, 0]), c],
                            sh + ph * rh / PH + (iy + 0.5) * rh / PH / gh,
                            sw + pw * rw / PW + (ix + 0.5) * rw / PW / gw,
                        )
                        for iy in range(gh)
                        for ix in range(gw)
                    )
                    if len(vals) > 1:
                        gaps.append(vals[-1] - vals[-2])
    return min(gaps)


# ============================================================================ roi_align


@pytest.mark.parametrize("pool_mode", ["avg", "max"])
@pytest.mark.parametrize(
    "aligned, ratio, scale", [(True, 0, 1.0), (True, 2, 0.5), (False, 0, 0.5), (False, 3, 1.0)]
)
def test_roi_align_matches_mmcv_kernel(rng, pool_mode, aligned, ratio, scale):
    x = rng.standard_normal((2, 3, 7, 9))
    rois = random_rois(rng, 5, 2, 7, 9, scale)
    t = dn.tensor(x, requires_grad=True)
    out = mops.roi_align(t, rois, (2, 3), scale, ratio, pool_mode, aligned)
    assert isinstance(out, dn.Tensor) and out.shape == (5, 3, 2, 3) and out.dtype == np.float64
    grad = rng.standard_normal(out.shape)
    out.backward(grad)
    want, want_g = mmcv_roi_align(x, rois, 2, 3, scale, ratio, pool_mode, aligned, grad)
    np.testing.assert_allclose(out.numpy(), want, rtol=1e-12, atol=1e-13)
    np.testing.assert_allclose(t.grad, want_g, rtol=1e-12, atol=1e-12)


def test_roi_align_defaults_are_mmcv_s(rng):
    x = rng.standard_normal((1, 2, 8, 8))
    rois = random_rois(rng, 3, 1, 8, 8)
    a = mops.roi_align(x, rois, 2).numpy()
    np.testing.assert_array_equal(a, ops.roi_align(x, rois, 2, 1.0, 0, True).numpy())
    want, _ = mmcv_roi_align(x, rois, 2, 2, 1.0, 0, "avg", True)
    np.testing.assert_allclose(a, want, rtol=1e-12, atol=1e-13)
    sig = inspect.signature(mops.roi_align).parameters
    assert list(sig) == [
        "input", "rois", "output_size", "spatial_scale", "sampling_ratio", "pool_mode",
        "aligned",
    ]  # fmt: skip
    assert [sig[n].default for n in list(sig)[3:]] == [1.0, 0, "avg", True]


def test_roi_align_max_float32(rng):
    x = rng.standard_normal((2, 3, 7, 9)).astype(np.float32)
    rois = random_rois(rng, 4, 2, 7, 9).astype(np.float32)
    t = dn.tensor(x, requires_grad=True)
    out = mops.roi_align(t, rois, 3, 1.0, 2, "max")
    assert out.dtype == np.float32
    grad = rng.standard_normal(out.shape).astype(np.float32)
    out.backward(grad)
    assert t.grad.dtype == np.float32
    want, want_g = mmcv_roi_align(
        x.astype(np.float64), rois.astype(np.float64), 3, 3, 1.0, 2, "max", True, grad
    )
    np.testing.assert_allclose(out.numpy(), want, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(t.grad, want_g, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("aligned, ratio", [(True, 0), (False, 2)])
def test_roi_align_max_gradcheck(rng, aligned, ratio):
    x = rng.standard_normal((2, 2, 6, 7))
    # inside the map, off the clamped bands (where samples of one bin read the same pixels)
    rois = np.array([[1, 1.3, 1.1, 5.4, 4.3], [0, 0.9, 1.4, 3.3, 4.6], [0, 2.2, 1.7, 5.2, 3.9]])
    # off ties: the finite differences (eps 1e-6) never change which sample is the largest
    assert max_gap(x, rois, 2, 2, 1.0, ratio, aligned) > 1e-4
    t = dn.tensor(x, requires_grad=True)
    assert dn.gradcheck(lambda a: mops.roi_align(a, rois, 2, 1.0, ratio, "max", aligned), [t])


def test_roi_align_max_picks_the_largest_sample_and_routes_its_gradient():
    # one bin, 2x2 samples at (0.5|1.5, 0.5|1.5) + 0.25 of a 4x4 ramp: the largest is the last
    x = np.arange(16, dtype=np.float64).reshape(1, 1, 4, 4)
    rois = np.array([[0, 0.25, 0.25, 2.25, 2.25]])
    t = dn.tensor(x, requires_grad=True)
    out = mops.roi_align(t, rois, 1, 1.0, 2, "max", aligned=False)
    # sample (y, x) = (1.75, 1.75): 4*1.75 + 1.75
    assert out.numpy().item() == pytest.approx(8.75, abs=1e-14)
    out.backward(np.ones((1, 1, 1, 1)))
    want = np.zeros((4, 4))
    want[1, 1], want[1, 2], want[2, 1], want[2, 2] = 0.0625, 0.1875, 0.1875, 0.5625
    np.testing.assert_allclose(t.grad[0, 0], want, atol=1e-15)


def test_roi_align_max_ties_first_sample_wins_and_nan_counts_as_maximum():
    x = np.ones((1, 1, 4, 4))
    rois = np.array([[0, 0.0, 0.0, 2.0, 2.0]])
    t = dn.tensor(x, requires_grad=True)
    mops.roi_align(t, rois, 1, 1.0, 2, "max", False).backward(np.ones((1, 1, 1, 1)))
    # first sample (0.5, 0.5): a quarter to each of pixels (0|1, 0|1)
    np.testing.assert_allclose(t.grad[0, 0, :2, :2], np.full((2, 2), 0.25))
    assert t.grad.sum() == pytest.approx(1.0)
    x[0, 0, 3, 3] = np.nan
    out = mops.roi_align(x, np.array([[0, 0.0, 0.0, 4.0, 4.0]]), 1, 1.0, 2, "max", False)
    assert np.isnan(out.numpy().item())  # mmcv would skip the NaN sample


def test_roi_align_max_empty_bins_and_outside_boxes():
    x = np.random.default_rng(0).standard_normal((1, 2, 5, 5)) - 3.0  # all negative
    rois = np.array(
        [
            [0, 2.0, 2.0, 2.0, 2.0],  # empty box, aligned + adaptive: no samples (mmcv: -FLT_MAX)
            [0, -20.0, -20.0, -12.0, -12.0],  # every sample outside: 0
        ]
    )
    t = dn.tensor(x, requires_grad=True)
    out = mops.roi_align(t, rois, 2, 1.0, 0, "max", True)
    np.testing.assert_array_equal(out.numpy(), 0.0)
    out.sum().backward()
    np.testing.assert_array_equal(t.grad, 0.0)
    want, _ = mmcv_roi_align(x, rois, 2, 2, 1.0, 0, "max", True)
    np.testing.assert_array_equal(want[0], -FLT_MAX)  # the documented difference
    np.testing.assert_array_equal(want[1], 0.0)
    assert mops.roi_align(x, np.zeros((0, 5)), 2, pool_mode="max").shape == (0, 2, 2, 2)


def test_roi_align_max_large_grid_is_chunked(rng, monkeypatch):
    x = rng.standard_normal((2, 3, 9, 11))
    rois = random_rois(rng, 7, 2, 9, 11)
    whole = mops.roi_align(x, rois, 2, 1.0, 0, "max").numpy()
    monkeypatch.setattr(mops, "_CHUNK", 1)  # one box per chunk
    np.testing.assert_array_equal(mops.roi_align(x, rois, 2, 1.0, 0, "max").numpy(), whole)


def test_roi_align_validation(rng):
    x = rng.standard_normal((1, 2, 5, 5))
    rois = np.array([[0, 0.0, 0.0, 3.0, 3.0]])
    with pytest.raises(ValueError, match=r"roi_align: pool_mode must be 'avg' or 'max', got 'sum'"):
        mops.roi_align(x, rois, 2, pool_mode="sum")
    with pytest.raises(TypeError, match="roi_align: pool_mode must be 'avg' or 'max', got 1"):
        mops.roi_align(x, rois, 2, pool_mode=1)
    with pytest.raises(ValueError, match=r"roi_align: boxes must be a \(K, 5\) array"):
        mops.roi_align(x, rois[:, 1:], 2, pool_mode="max")
    with pytest.raises(
        TypeError,
        match="roi_align: inputs must share one float dtype, got input float64, boxes float32",
    ):
        mops.roi_align(x, rois.astype(np.float32), 2, pool_mode="max")
    with pytest.raises(ValueError, match="roi_align: output_size must be >= 1"):
        mops.roi_align(x, rois, 0, pool_mode="max")


# ============================================================================ deform conv


def _conv_inputs(rng, B=2, Cin=4, Cout=6, H=6, W=7, k=3, g=2, dg=2, pad=1, stride=1):
    x = rng.standard_normal((B, Cin, H, W))
    w = rng.standard_normal((Cout, Cin // g, k, k)) * 0.3
    Ho = (H + 2 * pad - k) // stride + 1
    Wo = (W + 2 * pad - k) // stride + 1
    off = rng.uniform(-1.7, 1.7, (B, 2 * dg * k * k, Ho, Wo))
    mask = rng.uniform(0.1, 1.0, (B, dg * k * k, Ho, Wo))
    b = rng.standard_normal(Cout)
    return x, off, mask, w, b


def test_mmcv_conv_signatures():
    sig = inspect.signature(mops.deform_conv2d).parameters
    assert list(sig) == [
        "input", "offset", "weight", "stride", "padding", "dilation", "groups",
        "deform_groups", "bias", "im2col_step",
    ]  # fmt: skip
    assert [sig[n].default for n in list(sig)[3:]] == [1, 0, 1, 1, 1, False, 32]
    sig = inspect.signature(mops.modulated_deform_conv2d).parameters
    assert list(sig) == [
        "input", "offset", "mask", "weight", "bias", "stride", "padding", "dilation", "groups",
        "deform_groups",
    ]  # fmt: skip
    assert [sig[n].default for n in list(sig)[4:]] == [None, 1, 0, 1, 1, 1]


def test_deform_conv2d_is_the_torchvision_op_positionally(rng):
    x, off, mask, w, b = _conv_inputs(rng, stride=2)
    got = mops.deform_conv2d(x, off, w, 2, 1, 1, 2, 2, False, 1).numpy()
    np.testing.assert_array_equal(got, ops.deform_conv2d(x, off, w, None, 2, 1, 1).numpy())
    got = mops.modulated_deform_conv2d(x, off, mask, w, b, 2, 1, 1, 2, 2).numpy()
    want = ops.deform_conv2d(x, off, w, b, 2, 1, 1, mask=mask).numpy()
    np.testing.assert_array_equal(got, want)


def test_deform_conv2d_gradcheck_through_the_wrappers(rng):
    x, off, mask, w, b = _conv_inputs(rng, B=1, Cin=2, Cout=2, H=4, W=4, g=1, dg=1)
    ts = [dn.tensor(a, requires_grad=True) for a in (x, off, mask, w, b)]
    assert dn.gradcheck(
        lambda *a: mops.modulated_deform_conv2d(a[0], a[1], a[2], a[3], a[4], 1, 1), ts
    )
    assert dn.gradcheck(
        lambda a, o, ww: mops.deform_conv2d(a, o, ww, padding=1), [ts[0], ts[1], ts[3]]
    )


def test_border_line_offset_gradient_is_the_right_hand_slope():
    # a sampling point exactly on y = -1: mmcv's coordinate weight is 0 there; deformnp keeps
    # the exact one-sided derivative (the value fades in linearly from 0 as y grows)
    x = np.ones((1, 1, 3, 3))
    w = np.ones((1, 1, 1, 1))
    off = np.zeros((1, 2, 3, 3))
    off[0, 0, 0, 1] = -1.0  # the point (0, 1) moves to y = -1
    t = dn.tensor(off, requires_grad=True)
    out = mops.deform_conv2d(x, t, w)
    assert out.numpy()[0, 0, 0, 1] == 0.0
    out.sum().backward()
    assert t.grad[0, 0, 0, 1] == pytest.approx(1.0)


def test_deform_conv2d_validation(rng):
    x, off, mask, w, b = _conv_inputs(rng)
    with pytest.raises(ValueError, match="deform_conv2d: bias must be False .* got True"):
        mops.deform_conv2d(x, off, w, 1, 1, 1, 2, 2, True)
    with pytest.raises(
        ValueError,
        match=r"deform_conv2d: weight.shape\[1\] must be in_channels / groups = 4/1 = 4, got 2",
    ):  # noqa: E501
        mops.deform_conv2d(x, off, w, 1, 1, 1, 1, 2)
    with pytest.raises(
        ValueError, match="deform_conv2d: input has 4 channels, not divisible by groups 3"
    ):  # noqa: E501
        mops.deform_conv2d(x, off, w, 1, 1, 1, 3, 2)
    with pytest.raises(
        ValueError,
        match=r"offset has 36 channels, expected 2\*deform_groups\*kh\*kw = 18 \(deform_groups 1",
    ):  # noqa: E501
        mops.deform_conv2d(x, off, w, 1, 1, 1, 2, 1)
    with pytest.raises(ValueError, match="input has 4 channels, not divisible by deform_groups 3"):
        mops.deform_conv2d(x, off, w, 1, 1, 1, 2, 3)
    with pytest.raises(ValueError, match="deform_conv2d: im2col_step must be >= 1, got 0"):
        mops.deform_conv2d(x, off, w, 1, 1, 1, 2, 2, False, 0)
    with pytest.raises(TypeError, match="deform_conv2d: deform_groups must be an int, got 2.0"):
        mops.deform_conv2d(x, off, w, 1, 1, 1, 2, 2.0)
    with pytest.raises(
        TypeError, match="modulated_deform_conv2d: mask must be an array .* got None"
    ):  # noqa: E501
        mops.modulated_deform_conv2d(x, off, None, w, b, 1, 1, 1, 2, 2)
    with pytest.raises(
        ValueError,
        match="modulated_deform_conv2d: weight has 6 output channels, not divisible by groups 4",
    ):  # noqa: E501
        mops.modulated_deform_conv2d(x, off, mask, np.zeros((6, 1, 3, 3)), b, 1, 1, 1, 4, 2)
    with pytest.raises(
        ValueError,
        match=r"modulated_deform_conv2d: mask has 9 channels, expected deform_groups\*kh\*kw = 18",
    ):
        mops.modulated_deform_conv2d(x, off, mask[:, :9], w, b, 1, 1, 1, 2, 2)


# ============================================================================ deform_roi_pool


def test_deform_roi_pool_is_deformnp_s_with_mmcv_names(rng):
    sig = inspect.signature(mops.deform_roi_pool).parameters
    assert list(sig) == [
        "input", "rois", "offset", "output_size", "spatial_scale", "sampling_ratio", "gamma",
    ]  # fmt: skip
    assert sig["output_size"].default is inspect.Parameter.empty
    assert [sig[n].default for n in list(sig)[4:]] == [1.0, 0, 0.1]
    x = rng.standard_normal((2, 3, 7, 9))
    rois = random_rois(rng, 4, 2, 7, 9)
    off = rng.uniform(-1, 1, (4, 2, 2, 3))
    np.testing.assert_array_equal(
        mops.deform_roi_pool(x, rois, off, (2, 3), 0.5, 2, 0.3).numpy(),
        ops.deform_roi_pool(x, rois, off, (2, 3), 0.5, 2, 0.3).numpy(),
    )
    tx, to = dn.tensor(x, requires_grad=True), dn.tensor(off, requires_grad=True)
    # keep the sampling points off the kinks of the clamp rule: small boxes inside the map
    rois = np.array([[0, 1.3, 1.2, 5.7, 4.9], [1, 2.1, 0.8, 7.2, 5.3]])
    to = dn.tensor(rng.uniform(-0.2, 0.2, (2, 2, 2, 3)), requires_grad=True)
    assert dn.gradcheck(lambda a, o: mops.deform_roi_pool(a, rois, o, (2, 3), 1.0, 2), [tx, to])


# ============================================================================ layers


def test_layer_signatures_are_mmcv_s():
    def params(cls):
        p = inspect.signature(cls.__init__).parameters
        return [
            (n, v.default)
            for n, v in p.items()
            if n != "self" and v.kind == v.POSITIONAL_OR_KEYWORD
        ]  # noqa: E501

    E = inspect.Parameter.empty
    conv = [("in_channels", E), ("out_channels", E), ("kernel_size", E), ("stride", 1),
            ("padding", 0), ("dilation", 1), ("groups", 1), ("deform_groups", 1)]  # fmt: skip
    assert params(mnn.DeformConv2d) == conv + [("bias", False), ("im2col_step", 32)]
    assert params(mnn.ModulatedDeformConv2d) == conv + [("bias", True)]
    assert params(mnn.RoIAlign) == [
        ("output_size", E), ("spatial_scale", 1.0), ("sampling_ratio", 0), ("pool_mode", "avg"),
        ("aligned", True), ("use_torchvision", False),
    ]  # fmt: skip
    assert params(mnn.MultiScaleDeformableAttention) == [
        ("embed_dims", 256), ("num_heads", 8), ("num_levels", 4), ("num_points", 4),
        ("im2col_step", 64), ("dropout", 0.1), ("batch_first", False), ("norm_cfg", None),
        ("init_cfg", None), ("value_proj_ratio", 1.0),
    ]  # fmt: skip
    fwd = inspect.signature(mnn.MultiScaleDeformableAttention.forward).parameters
    assert list(fwd) == [
        "self", "query", "key", "value", "identity", "query_pos", "key_padding_mask",
        "reference_points", "spatial_shapes", "level_start_index", "kwargs",
    ]  # fmt: skip
    # the layers deformnp.nn already has as mmcv's are the same classes
    assert mnn.DeformConv2dPack is dn.nn.DeformConv2dPack
    assert mnn.ModulatedDeformConv2dPack is dn.nn.ModulatedDeformConv2dPack
    assert mnn.DeformRoIPool is dn.nn.DeformRoIPool
    assert mnn.DeformRoIPoolPack is dn.nn.DeformRoIPoolPack
    assert mnn.ModulatedDeformRoIPoolPack is dn.nn.ModulatedDeformRoIPoolPack


def test_conv_layers_parameters_init_and_forward(rng):
    dn.manual_seed(0)
    m = mnn.DeformConv2d(8, 6, 3, padding=1, groups=2, deform_groups=4)
    assert {n: p.shape for n, p in m.named_parameters()} == {"weight": (6, 4, 3, 3)}
    bound = math.sqrt(6 / (4 * 9))
    w = m.weight.numpy()
    assert w.dtype == np.float32 and np.abs(w).max() <= bound and w.std() > bound / 4
    mm = mnn.ModulatedDeformConv2d(8, 6, (3, 1), deform_groups=2)
    assert {n: p.shape for n, p in mm.named_parameters()} == {
        "weight": (6, 8, 3, 1),
        "bias": (6,),
    }
    stdv = 1 / math.sqrt(8 * 3)
    assert np.abs(mm.weight.numpy()).max() <= stdv and np.all(mm.bias.numpy() == 0)
    assert mnn.ModulatedDeformConv2d(2, 2, 1, bias=False).bias is None
    x, off, mask, w, b = _conv_inputs(rng, Cin=8, Cout=6, g=2, dg=4)
    m = mnn.DeformConv2d(8, 6, 3, padding=1, groups=2, deform_groups=4, dtype=np.float64)
    m.weight.data[...] = w
    np.testing.assert_array_equal(
        m(x, off).numpy(), ops.deform_conv2d(x, off, w, None, 1, 1).numpy()
    )
    with pytest.raises(ValueError, match="DeformConv2d: bias=True is not supported"):
        mnn.DeformConv2d(2, 2, 3, bias=True)
    with pytest.raises(ValueError, match="in_channels 6 must be divisible by deform_groups 4"):
        mnn.ModulatedDeformConv2d(6, 2, 3, deform_groups=4)
    with pytest.raises(ValueError, match="offset has 36 channels, expected .* = 72"):
        m(x, off[:, :36])


def test_roi_align_layer(rng):
    x = rng.standard_normal((2, 3, 7, 9))
    rois = random_rois(rng, 4, 2, 7, 9)
    layer = mnn.RoIAlign(3)
    assert layer.output_size == (3, 3) and layer.aligned and layer.sampling_ratio == 0
    np.testing.assert_array_equal(layer(x, rois).numpy(), mops.roi_align(x, rois, 3).numpy())
    mx = mnn.RoIAlign((2, 3), 0.5, 2, "max", False)
    np.testing.assert_array_equal(
        mx(x, rois).numpy(), mops.roi_align(x, rois, (2, 3), 0.5, 2, "max", False).numpy()
    )
    tv = mnn.RoIAlign(3, pool_mode="max", use_torchvision=True)  # torchvision's op averages
    np.testing.assert_array_equal(tv(x, rois).numpy(), layer(x, rois).numpy())
    with pytest.raises(ValueError, match="RoIAlign: pool_mode must be 'avg' or 'max', got 'min'"):
        mnn.RoIAlign(3, pool_mode="min")
    with pytest.raises(ValueError, match="RoIAlign: output_size must be >= 1"):
        mnn.RoIAlign(0)


# ---------------------------------------------------------------------------- MSDA


def _msda_inputs(rng, bs=2, nq=5, C=16, levels=((4, 5), (2, 3)), ref_dim=2, batch_first=False):
    shapes = np.array(levels, np.int64)
    starts = np.concatenate([[0], np.cumsum(shapes.prod(1))[:-1]]).astype(np.int64)
    nv = int(shapes.prod(1).sum())
    lead_q = (bs, nq) if batch_first else (nq, bs)
    lead_v = (bs, nv) if batch_first else (nv, bs)
    query = rng.standard_normal((*lead_q, C))
    value = rng.standard_normal((*lead_v, C))
    pos = rng.standard_normal((*lead_q, C))
    identity = rng.standard_normal((*lead_q, C))
    ref = rng.uniform(0.1, 0.9, (bs, nq, len(levels), ref_dim))
    if ref_dim == 4:
        ref[..., 2:] = rng.uniform(0.1, 0.5, ref[..., 2:].shape)
    mask = rng.random((bs, nv)) < 0.25
    return query, value, pos, identity, ref, shapes, starts, mask


def _randomize(module, rng, scale=0.3):
    for p in module.parameters():
        p.data = (p.data + scale * rng.standard_normal(p.shape)).astype(p.dtype)


def test_msda_parameters_and_init():
    dn.manual_seed(0)
    m = mnn.MultiScaleDeformableAttention(16, 4, 3, 2, value_proj_ratio=0.5)
    assert {n: p.shape for n, p in m.named_parameters()} == {
        "sampling_offsets.weight": (48, 16),
        "sampling_offsets.bias": (48,),
        "attention_weights.weight": (24, 16),
        "attention_weights.bias": (24,),
        "value_proj.weight": (8, 16),
        "value_proj.bias": (8,),
        "output_proj.weight": (16, 8),
        "output_proj.bias": (16,),
    }
    assert m.dropout.p == 0.1 and not m.batch_first and m.im2col_step == 64
    bias = m.sampling_offsets.bias.numpy().reshape(4, 3, 2, 2)
    dirs = np.array([[1, 0], [0, 1], [-1, 0], [0, -1]], np.float64)
    for p in range(2):
        np.testing.assert_allclose(
            bias[:, :, p], np.repeat(dirs[:, None] * (p + 1), 3, 1), atol=1e-6
        )  # noqa: E501
    assert np.all(m.sampling_offsets.weight.numpy() == 0)
    assert np.all(m.attention_weights.weight.numpy() == 0)
    assert np.all(m.attention_weights.bias.numpy() == 0)
    bound = math.sqrt(6 / 24)
    for w in (m.value_proj.weight.numpy(), m.output_proj.weight.numpy()):
        assert np.abs(w).max() <= bound and w.std() > bound / 4


def test_msda_validation(rng):
    name = "MultiScaleDeformableAttention"
    with pytest.raises(
        ValueError, match=f"{name}: embed_dims must be divisible by num_heads, but got 10 and 4"
    ):  # noqa: E501
        mnn.MultiScaleDeformableAttention(10, 4)
    with pytest.raises(
        ValueError,
        match="value projection has .* = 6 channels, expected a positive multiple of num_heads 4",
    ):  # noqa: E501
        mnn.MultiScaleDeformableAttention(16, 4, value_proj_ratio=0.375)
    with pytest.raises(ValueError, match=f"{name}: dropout must be in"):
        mnn.MultiScaleDeformableAttention(16, 4, dropout=1.5)
    m = mnn.MultiScaleDeformableAttention(16, 4, 2, 3, dtype=np.float64)
    q, v, pos, idn, ref, shapes, starts, mask = _msda_inputs(rng)
    with pytest.raises(ValueError, match=f"{name}: reference_points is required, got None"):
        m(q, value=v, spatial_shapes=shapes)
    with pytest.raises(ValueError, match=f"{name}: spatial_shapes is required, got None"):
        m(q, value=v, reference_points=ref)
    with pytest.raises(
        ValueError,
        match=r"value has num_value = 26 positions, but spatial_shapes give sum\(H_l\*W_l\) = 25",
    ):  # noqa: E501
        m(q, value=v, reference_points=ref, spatial_shapes=np.array([[4, 5], [1, 5]]))
    with pytest.raises(
        ValueError, match=r"query must be \(n, bs, embed_dims\) with embed_dims = 16"
    ):  # noqa: E501
        m(q[..., :8], value=v, reference_points=ref, spatial_shapes=shapes)
    with pytest.raises(
        ValueError,
        match=r"reference_points must be \(bs, num_query, num_levels, 2 or 4\) = \(2, 5, 2, 2 or 4\)",
    ):  # noqa: E501
        m(q, value=v, reference_points=ref[:, :, :1], spatial_shapes=shapes)
    with pytest.raises(ValueError, match="Last dim of reference_points must be 2 or 4, but get 3"):
        m(q, value=v, reference_points=np.zeros((2, 5, 2, 3)), spatial_shapes=shapes)
    with pytest.raises(ValueError, match=r"key_padding_mask must be \(bs, num_value\) = \(2, 26\)"):
        m(q, value=v, reference_points=ref, spatial_shapes=shapes, key_padding_mask=mask[:, :5])
    with pytest.raises(TypeError, match=f"{name}: query must be float64 like the layer's"):
        m(q.astype(np.float32), value=v, reference_points=ref, spatial_shapes=shapes)
    with pytest.raises(TypeError, match=f"{name}: spatial_shapes must be int32 or int64"):
        m(q, value=v, reference_points=ref, spatial_shapes=shapes.astype(float))


def test_msda_gradcheck(rng):
    m = mnn.MultiScaleDeformableAttention(8, 2, 2, 2, dropout=0.0, dtype=np.float64)
    _randomize(m, rng)
    q, v, pos, idn, ref, shapes, starts, mask = _msda_inputs(rng, bs=1, nq=3, C=8)
    ts = [dn.tensor(a, requires_grad=True) for a in (q, v, pos, ref)]
    assert dn.gradcheck(
        lambda a, b, c, r: m(a, value=b, query_pos=c, reference_points=r, spatial_shapes=shapes),
        ts,
    )


def test_msda_level_start_index_default_and_residual_alias(rng):
    m = mnn.MultiScaleDeformableAttention(16, 4, 2, 3, dtype=np.float64).eval()
    q, v, pos, idn, ref, shapes, starts, mask = _msda_inputs(rng)
    kw = dict(value=v, reference_points=ref, spatial_shapes=shapes)
    a = m(q, identity=idn, level_start_index=starts, **kw).numpy()
    np.testing.assert_array_equal(a, m(q, identity=idn, **kw).numpy())
    with pytest.warns(DeprecationWarning, match="'residual' is deprecated"):
        b = m(q, residual=idn, **kw).numpy()
    np.testing.assert_array_equal(a, b)


def test_msda_dropout_only_in_training(rng):
    m = mnn.MultiScaleDeformableAttention(16, 4, 2, 3, dropout=0.5, dtype=np.float64)
    q, v, pos, idn, ref, shapes, starts, mask = _msda_inputs(rng)
    kw = dict(value=v, reference_points=ref, spatial_shapes=shapes, identity=np.zeros_like(q))
    dn.manual_seed(0)
    train = m(q, **kw).numpy()
    ev = m.eval()(q, **kw).numpy()
    zeroed = train == 0
    assert 0.2 < zeroed.mean() < 0.8
    np.testing.assert_allclose(train[~zeroed], 2 * ev[~zeroed], rtol=1e-13)


# ---------------------------------------------------------------------------- torch parity


def _torch_msda_core(torch, value, value_spatial_shapes, sampling_locations, attention_weights):
    """mmcv's multi_scale_deformable_attn_pytorch, transcribed."""
    F = torch.nn.functional
    bs, _, num_heads, embed_dims = value.shape
    _, num_queries, num_heads, num_levels, num_points, _ = sampling_locations.shape
    value_list = value.split([int(h) * int(w) for h, w in value_spatial_shapes], dim=1)
    sampling_grids = 2 * sampling_locations - 1
    sampling_value_list = []
    for level, (h, w) in enumerate(value_spatial_shapes):
        value_l_ = (
            value_list[level]
            .flatten(2)
            .transpose(1, 2)
            .reshape(bs * num_heads, embed_dims, int(h), int(w))  # noqa: E501
        )
        sampling_grid_l_ = sampling_grids[:, :, :, level].transpose(1, 2).flatten(0, 1)
        sampling_value_list.append(
            F.grid_sample(
                value_l_,
                sampling_grid_l_,
                mode="bilinear",
                padding_mode="zeros",
                align_corners=False,
            )  # fmt: skip
        )
    attention_weights = attention_weights.transpose(1, 2).reshape(
        bs * num_heads, 1, num_queries, num_levels * num_points
    )
    output = (
        (torch.stack(sampling_value_list, dim=-2).flatten(-2) * attention_weights)
        .sum(-1)
        .view(bs, num_heads * embed_dims, num_queries)
    )
    return output.transpose(1, 2).contiguous()


def _torch_msda(torch, embed_dims, num_heads, num_levels, num_points, batch_first, ratio):
    """mmcv's MultiScaleDeformableAttention (its CPU path), transcribed as a torch module."""
    nn = torch.nn

    class TorchMSDA(nn.Module):
        def __init__(self):
            super().__init__()
            self.dropout = nn.Dropout(0.1)
            self.batch_first = batch_first
            self.sampling_offsets = nn.Linear(embed_dims, num_heads * num_levels * num_points * 2)
            self.attention_weights = nn.Linear(embed_dims, num_heads * num_levels * num_points)
            vps = int(embed_dims * ratio)
            self.value_proj = nn.Linear(embed_dims, vps)
            self.output_proj = nn.Linear(vps, embed_dims)

        def forward(self, query, value=None, identity=None, query_pos=None,
                    key_padding_mask=None, reference_points=None, spatial_shapes=None):  # fmt: skip
            if value is None:
                value = query
            if identity is None:
                identity = query
            if query_pos is not None:
                query = query + query_pos
            if not self.batch_first:
                query = query.permute(1, 0, 2)
                value = value.permute(1, 0, 2)
            bs, num_query, _ = query.shape
            bs, num_value, _ = value.shape
            value = self.value_proj(value)
            if key_padding_mask is not None:
                value = value.masked_fill(key_padding_mask[..., None], 0.0)
            value = value.view(bs, num_value, num_heads, -1)
            sampling_offsets = self.sampling_offsets(query).view(
                bs, num_query, num_heads, num_levels, num_points, 2
            )
            attention_weights = self.attention_weights(query).view(
                bs, num_query, num_heads, num_levels * num_points
            )
            attention_weights = attention_weights.softmax(-1).view(
                bs, num_query, num_heads, num_levels, num_points
            )
            if reference_points.shape[-1] == 2:
                offset_normalizer = torch.stack(
                    [spatial_shapes[..., 1], spatial_shapes[..., 0]], -1
                )  # noqa: E501
                sampling_locations = (
                    reference_points[:, :, None, :, None, :]
                    + sampling_offsets / offset_normalizer[None, None, None, :, None, :]
                )
            else:
                sampling_locations = (
                    reference_points[:, :, None, :, None, :2]
                    + sampling_offsets
                    / num_points
                    * reference_points[:, :, None, :, None, 2:]
                    * 0.5  # noqa: E501
                )
            output = _torch_msda_core(
                torch, value, spatial_shapes.tolist(), sampling_locations, attention_weights
            )
            output = self.output_proj(output)
            if not self.batch_first:
                output = output.permute(1, 0, 2)
            return self.dropout(output) + identity

    return TorchMSDA().double().eval()


@pytest.mark.parametrize(
    "batch_first, ref_dim, ratio, use_pos, use_identity, use_mask",
    [
        (False, 2, 1.0, True, False, True),
        (True, 4, 0.5, False, True, False),
        (False, 4, 1.0, True, True, True),
    ],
)
def test_msda_matches_torch_transcription(
    rng, batch_first, ref_dim, ratio, use_pos, use_identity, use_mask
):
    torch = pytest.importorskip("torch")
    C, M, L, P = 16, 4, 2, 3
    ours = mnn.MultiScaleDeformableAttention(
        C, M, L, P, batch_first=batch_first, value_proj_ratio=ratio, dtype=np.float64
    ).eval()
    _randomize(ours, rng)
    theirs = _torch_msda(torch, C, M, L, P, batch_first, ratio)
    theirs.load_state_dict({k: torch.from_numpy(np.array(v)) for k, v in ours.state_dict().items()})
    ours.load_state_dict(theirs.state_dict())  # and back: the names are the same
    q, v, pos, idn, ref, shapes, starts, mask = _msda_inputs(
        rng, ref_dim=ref_dim, batch_first=batch_first
    )
    arrays = {"query": q, "value": v, "reference_points": ref}
    if use_pos:
        arrays["query_pos"] = pos
    if use_identity:
        arrays["identity"] = idn
    extra = {"key_padding_mask": mask} if use_mask else {}
    tt = {k: torch.tensor(a, requires_grad=True) for k, a in arrays.items()}
    dt = {k: dn.tensor(a, requires_grad=True) for k, a in arrays.items()}
    t_extra = {k: torch.from_numpy(a) for k, a in extra.items()}
    t_out = theirs(spatial_shapes=torch.from_numpy(shapes), **tt, **t_extra)
    out = ours(spatial_shapes=shapes, level_start_index=starts, **dt, **extra)
    assert out.shape == tuple(t_out.shape)
    assert rel_err(out.numpy(), t_out.detach().numpy()) < 1e-12
    g = rng.standard_normal(out.shape)
    t_out.backward(torch.from_numpy(g))
    out.backward(g)
    for k in arrays:
        assert rel_err(dt[k].grad, tt[k].grad.numpy()) < 1e-11, k
    for (name, p), (tname, tp) in zip(ours.named_parameters(), theirs.named_parameters()):
        assert name == tname and rel_err(p.grad, tp.grad.numpy()) < 1e-11, name


def test_msda_init_matches_mmcv_init_weights():
    torch = pytest.importorskip("torch")
    M, L, P = 8, 4, 4
    # mmcv's init_weights grid, transcribed
    thetas = torch.arange(M, dtype=torch.float32) * (2.0 * math.pi / M)
    grid = torch.stack([thetas.cos(), thetas.sin()], -1)
    grid = (grid / grid.abs().max(-1, keepdim=True)[0]).view(M, 1, 1, 2).repeat(1, L, P, 1)
    for i in range(P):
        grid[:, :, i, :] *= i + 1
    m = mnn.MultiScaleDeformableAttention()
    np.testing.assert_array_equal(m.sampling_offsets.bias.numpy(), grid.view(-1).numpy())


def _tv_pack(torch, modulated, conv_offset, weight, bias, stride, padding, dilation):
    """mmcv's (Modulated)DeformConv2dPack forward, transcribed with torchvision's deform_conv2d
    (mmcv's MLU path calls exactly this)."""
    from torchvision.ops import deform_conv2d as tv

    def forward(x):
        out = conv_offset(x)
        if modulated:
            o1, o2, mask = torch.chunk(out, 3, dim=1)
            offset, mask = torch.cat((o1, o2), dim=1), torch.sigmoid(mask)
        else:
            offset, mask = out, None
        return tv(x, offset, weight, bias, stride, padding, dilation, mask)

    return forward


@pytest.mark.parametrize("modulated", [False, True])
def test_dcn_pack_layers_match_torch_transcription(rng, modulated):
    torch = pytest.importorskip("torch")
    pytest.importorskip("torchvision")
    cls = mnn.ModulatedDeformConv2dPack if modulated else mnn.DeformConv2dPack
    ours = cls(
        4, 6, 3, stride=2, padding=1, dilation=1, groups=2, deform_groups=2, dtype=np.float64
    )  # noqa: E501
    _randomize(ours, rng, 0.2)
    sd = {k: torch.from_numpy(np.array(v)) for k, v in ours.state_dict().items()}
    expected_keys = {"weight", "conv_offset.weight", "conv_offset.bias"}
    assert set(sd) == (expected_keys | {"bias"} if modulated else expected_keys)
    conv_offset = torch.nn.Conv2d(4, (3 if modulated else 2) * 2 * 9, 3, 2, 1).double()
    conv_offset.load_state_dict(
        {"weight": sd["conv_offset.weight"], "bias": sd["conv_offset.bias"]}
    )  # noqa: E501
    weight = sd["weight"].requires_grad_()
    fwd = _tv_pack(torch, modulated, conv_offset, weight, sd.get("bias"), 2, 1, 1)
    x = rng.standard_normal((2, 4, 7, 8))
    tx, dx = torch.tensor(x, requires_grad=True), dn.tensor(x, requires_grad=True)
    t_out, out = fwd(tx), ours(dx)
    assert rel_err(out.numpy(), t_out.detach().numpy()) < 1e-12
    g = rng.standard_normal(out.shape)
    t_out.backward(torch.from_numpy(g))
    out.backward(g)
    assert rel_err(dx.grad, tx.grad.numpy()) < 1e-11
    assert rel_err(ours.weight.grad, weight.grad.numpy()) < 1e-11
    assert rel_err(ours.conv_offset.weight.grad, conv_offset.weight.grad.numpy()) < 1e-11


def test_mmcv_conv_layers_match_torchvision(rng):
    torch = pytest.importorskip("torch")
    tvops = pytest.importorskip("torchvision.ops")
    x, off, mask, w, b = _conv_inputs(rng, Cin=4, Cout=6, g=2, dg=2)
    dcn = mnn.ModulatedDeformConv2d(4, 6, 3, padding=1, groups=2, deform_groups=2, dtype=np.float64)  # noqa: E501
    dcn.load_state_dict({"weight": torch.from_numpy(w), "bias": torch.from_numpy(b)})
    t = [torch.tensor(a, requires_grad=True) for a in (x, off, mask)]
    d = [dn.tensor(a, requires_grad=True) for a in (x, off, mask)]
    t_out = tvops.deform_conv2d(t[0], t[1], torch.from_numpy(w), torch.from_numpy(b), 1, 1, 1, t[2])  # noqa: E501
    out = dcn(*d)
    assert rel_err(out.numpy(), t_out.detach().numpy()) < 1e-12
    g = rng.standard_normal(out.shape)
    t_out.backward(torch.from_numpy(g))
    out.backward(g)
    for a, b_ in zip(d, t):
        assert rel_err(a.grad, b_.grad.numpy()) < 1e-11


def test_roi_align_avg_matches_torchvision(rng):
    torch = pytest.importorskip("torch")
    tvops = pytest.importorskip("torchvision.ops")
    x = rng.standard_normal((2, 3, 7, 9))
    rois = random_rois(rng, 5, 2, 7, 9, 0.5)
    want = tvops.roi_align(torch.from_numpy(x), torch.from_numpy(rois), 3, 0.5, 0, True)
    got = mnn.RoIAlign(3, 0.5)(x, rois).numpy()
    assert rel_err(got, want.numpy()) < 1e-12
