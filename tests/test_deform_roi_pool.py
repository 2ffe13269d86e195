"""deform_roi_pool (mmcv) and deform_ps_roi_pool (Deformable-ConvNets), docs/ops/deform_roi.rst:
naive reference, gradcheck on the feature map and the offsets (kept off the kinks, and inside the
clamped bands where the exact derivative is zero), edge cases and property tests."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from reference import roi as ref

import deformnp as dn
from deformnp import ops
from deformnp.cases import check_cases
from deformnp.cases.inputs import off_kink

B, C, H, W = 2, 3, 7, 9


def ramp(h: int, w: int, axis: int) -> np.ndarray:
    """A (1, 1, h, w) map whose value is the column (axis=1) or row (axis=0) index: bilinear
    interpolation of it inside the map returns the sampled coordinate itself."""
    r = np.arange(w if axis else h, dtype=np.float64)
    v = np.broadcast_to(r[None, :] if axis else r[:, None], (h, w))
    return np.ascontiguousarray(v)[None, None]


# ============================================================================ deform_roi_pool


@pytest.mark.parametrize("ratio", [0, 1, 2])
def test_deform_roi_pool_matches_reference(rng, ratio):
    x = rng.standard_normal((B, C, H, W))
    boxes = ref.random_boxes(rng, 6, B, H, W, scale=0.5)
    off = rng.uniform(-1.5, 1.5, (6, 2, 2, 3))
    out = ops.deform_roi_pool(x, boxes, off, (2, 3), 0.5, ratio, 0.3)
    assert isinstance(out, dn.Tensor) and out.shape == (6, C, 2, 3)
    expected = ref.deform_roi_pool(x, boxes, off, 2, 3, 0.5, ratio, 0.3)
    np.testing.assert_allclose(out.numpy(), expected, rtol=1e-12, atol=1e-12)
    grad = rng.standard_normal(out.shape)
    gi, go = ops.deform_roi_pool_backward(grad, x, boxes, off, (2, 3), 0.5, ratio, 0.3)
    egi, ego = ref.deform_roi_pool_grad(x, boxes, off, grad, 2, 3, 0.5, ratio, 0.3)
    np.testing.assert_allclose(gi, egi, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(go, ego, rtol=1e-12, atol=1e-11)


def test_deform_roi_pool_float32(rng):
    x = rng.standard_normal((B, C, H, W)).astype(np.float32)
    boxes = ref.random_boxes(rng, 6, B, H, W, dtype=np.float32)
    off = rng.uniform(-1, 1, (6, 2, 3, 3)).astype(np.float32)
    out = ops.deform_roi_pool_forward(x, boxes, off, 3, 1.0, 2, 0.1)
    assert out.dtype == np.float32
    b64, o64 = boxes.astype(np.float64), off.astype(np.float64)
    expected = ref.deform_roi_pool(x, b64, o64, 3, 3, 1.0, 2, 0.1)
    np.testing.assert_allclose(out, expected, rtol=1e-5, atol=1e-5)
    grad = rng.standard_normal(out.shape).astype(np.float32)
    gi, go = ops.deform_roi_pool_backward(grad, x, boxes, off, 3, 1.0, 2, 0.1)
    assert gi.dtype == go.dtype == np.float32
    egi, ego = ref.deform_roi_pool_grad(x, b64, o64, grad, 3, 3, 1.0, 2, 0.1)
    np.testing.assert_allclose(gi, egi, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(go, ego, rtol=1e-4, atol=1e-4)


def test_without_offset_it_is_aligned_roi_align(rng):
    x = dn.tensor(rng.standard_normal((B, C, H, W)), requires_grad=True)
    boxes = ref.random_boxes(rng, 6, B, H, W)
    a = ops.deform_roi_pool(x, boxes, None, 3, 1.0, 2)
    np.testing.assert_allclose(
        a.numpy(), ops.roi_align(x.data, boxes, 3, 1.0, 2, True).numpy(), rtol=1e-13, atol=1e-13
    )
    z = ops.deform_roi_pool(x, boxes, np.zeros((6, 2, 3, 3)), 3, 1.0, 2)
    np.testing.assert_array_equal(a.numpy(), z.numpy())
    gi, go = ops.deform_roi_pool_backward(np.ones(a.shape), x.data, boxes, None, 3, 1.0, 2)
    assert go is None and gi.shape == x.shape


def test_offset_channel_0_moves_x_by_gamma_times_roi_width():
    # box width 4 (aligned: roi_w = 4), gamma 0.25: offset 1 moves every bin by one pixel
    x = np.random.default_rng(3).standard_normal((1, 2, 10, 12))
    box = np.array([[0, 2.0, 3.0, 6.0, 7.0]])
    off = np.zeros((1, 2, 2, 2))
    off[:, 0] = 1.0
    moved = ops.deform_roi_pool_forward(x, box, off, 2, 1.0, 2, 0.25)
    shifted = ops.deform_roi_pool_forward(x, box + [0, 1, 0, 1, 0], None, 2, 1.0, 2, 0.25)
    np.testing.assert_allclose(moved, shifted, rtol=1e-13, atol=1e-13)
    off = np.zeros((1, 2, 2, 2))
    off[:, 1] = -1.0
    moved = ops.deform_roi_pool_forward(x, box, off, 2, 1.0, 2, 0.25)
    shifted = ops.deform_roi_pool_forward(x, box - [0, 0, 1, 0, 1], None, 2, 1.0, 2, 0.25)
    np.testing.assert_allclose(moved, shifted, rtol=1e-13, atol=1e-13)


def test_sample_positions_on_a_ramp():
    # on the column ramp a sample returns its x: with ratio 2 the bin value is the mean of the
    # samples start + pw*bin_w + (ix + 0.5)*bin_w/2, i.e. the bin centre (aligned: start x1 - 0.5)
    x = ramp(10, 12, axis=1)
    box = np.array([[0, 2.0, 3.0, 8.0, 7.0]])
    out = ops.deform_roi_pool_forward(x, box, None, (1, 3), 1.0, 2, 0.1)
    np.testing.assert_allclose(out[0, 0, 0], [1.5 + 1, 1.5 + 3, 1.5 + 5], rtol=1e-13)


@pytest.mark.parametrize("case", check_cases("deform_roi_pool"), ids=lambda c: c.label)
def test_gradcheck_input_and_offset(case):
    # the check table's case: every sample's coordinates have fractional parts in [0.1, 0.9] and
    # lie 0.1 away from the lines -1, 0, H-1, H (W-1, W): central differences see no kink
    # (deformnp.cases.inputs.deform_roi_offsets_off_kinks)
    assert dn.gradcheck(case.fn, case.inputs(), names=case.names)


@pytest.mark.parametrize(
    "band_x, band_y",
    [
        ((-0.9, -0.1), None),  # x clamped to 0
        ((6.1, 6.9), None),  # x in [W-1, W): clamped to W-1
        (None, (-0.9, -0.1)),  # y clamped to 0
        (None, (5.1, 5.9)),  # y in [H-1, H)
        ((-0.8, -0.2), (5.2, 5.8)),  # both: the corner
        ((-1.9, -1.1), None),  # outside the map: value 0
    ],
)
def test_gradcheck_offset_in_the_clamped_bands(rng, band_x, band_y):
    # one sample per bin placed by its offset inside a clamped band (0.1 away from its edges and
    # with the other coordinate off the kinks): there the exact derivative along the clamped axis
    # is zero (mmcv's CUDA backward is not); finite differences prove it
    Hm, Wm, gamma, P = 6, 7, 0.5, 2
    x = dn.tensor(rng.standard_normal((1, 2, Hm, Wm)), requires_grad=True)
    boxes = np.array([[0, 1.5, 1.5, 5.5, 4.5]])  # roi_w = 4, roi_h = 3, start (1, 1)
    off = np.zeros((1, 2, P, P))
    for ph in range(P):
        for pw in range(P):
            cx = 1.0 + (pw + 0.5) * 4 / P  # sample without offset
            cy = 1.0 + (ph + 0.5) * 3 / P
            tx = rng.uniform(*band_x) if band_x else rng.integers(1, 5) + rng.uniform(0.2, 0.8)
            ty = rng.uniform(*band_y) if band_y else rng.integers(1, 4) + rng.uniform(0.2, 0.8)
            off[0, 0, ph, pw] = (tx - cx) / (gamma * 4)
            off[0, 1, ph, pw] = (ty - cy) / (gamma * 3)
    pts = ref.align_points(boxes, off, P, P, 1.0, 1, gamma)
    for row in pts[0]:
        for ((y, xx),) in row:
            assert (band_x is None and off_kink(xx, Wm)) or (band_x and band_x[0] < xx < band_x[1])
            assert (band_y is None and off_kink(y, Hm)) or (band_y and band_y[0] < y < band_y[1])
    o = dn.tensor(off, requires_grad=True)
    assert dn.gradcheck(lambda a, t: ops.deform_roi_pool(a, boxes, t, P, 1.0, 1, gamma), (x, o))
    _, go = ops.deform_roi_pool_backward(
        np.ones((1, 2, P, P)), x.data, boxes, off, P, 1.0, 1, gamma
    )
    if band_x:
        np.testing.assert_array_equal(go[:, 0], 0.0)
    if band_y:
        np.testing.assert_array_equal(go[:, 1], 0.0)


@pytest.mark.parametrize("value", [1e6, -1e6, np.nan, np.inf])
def test_huge_and_non_finite_offsets(rng, value):
    x = rng.standard_normal((1, C, H, W))
    boxes = np.array([[0, 1.0, 1.0, 5.0, 5.0]])
    off = np.full((1, 2, 2, 2), value)
    out = ops.deform_roi_pool_forward(x, boxes, off, 2, 1.0, 2, 0.1)
    np.testing.assert_array_equal(out, 0.0)
    gi, go = ops.deform_roi_pool_backward(np.ones_like(out), x, boxes, off, 2, 1.0, 2, 0.1)
    np.testing.assert_array_equal(gi, 0.0)
    np.testing.assert_array_equal(go, 0.0)


def test_deform_roi_pool_no_boxes(rng):
    x = dn.tensor(rng.standard_normal((B, C, H, W)), requires_grad=True)
    off = dn.tensor(np.zeros((0, 2, 2, 2)), requires_grad=True)
    out = ops.deform_roi_pool(x, np.zeros((0, 5)), off, 2)
    assert out.shape == (0, C, 2, 2)
    out.sum().backward()
    np.testing.assert_array_equal(x.grad, 0.0)
    assert off.grad.shape == (0, 2, 2, 2)


@given(st.data())
def test_deform_roi_pool_property(data):
    rng = np.random.default_rng(data.draw(st.integers(0, 2**32 - 1)))
    b, c = data.draw(st.integers(1, 2)), data.draw(st.integers(1, 2))
    h, w = data.draw(st.integers(1, 6)), data.draw(st.integers(1, 6))
    ph, pw = data.draw(st.integers(1, 3)), data.draw(st.integers(1, 3))
    k = data.draw(st.integers(0, 3))
    ratio = data.draw(st.integers(0, 3))
    scale = data.draw(st.sampled_from([0.5, 1.0]))
    gamma = data.draw(st.sampled_from([0.1, 0.5]))
    x = rng.standard_normal((b, c, h, w))
    boxes = ref.random_boxes(rng, k, b, h, w, scale)
    off = rng.uniform(-2, 2, (k, 2, ph, pw))
    out = ops.deform_roi_pool_forward(x, boxes, off, (ph, pw), scale, ratio, gamma)
    expected = ref.deform_roi_pool(x, boxes, off, ph, pw, scale, ratio, gamma)
    np.testing.assert_allclose(out, expected, rtol=1e-12, atol=1e-12)
    grad = rng.standard_normal(out.shape)
    gi, go = ops.deform_roi_pool_backward(grad, x, boxes, off, (ph, pw), scale, ratio, gamma)
    egi, ego = ref.deform_roi_pool_grad(x, boxes, off, grad, ph, pw, scale, ratio, gamma)
    np.testing.assert_allclose(gi, egi, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(go, ego, rtol=1e-11, atol=1e-11)


# ============================================================================ deform_ps_roi_pool

# (output_dim, group_size, pooled_size, part_size, sample_per_part, num_classes or None)
DPS_CASES = [
    (2, 2, 3, None, 2, 1),
    (2, 1, 3, 2, 3, 2),
    (4, 3, 3, 3, 2, 2),
    (2, 2, 2, None, 4, None),
]


@pytest.mark.parametrize("case", DPS_CASES)
def test_deform_ps_roi_pool_matches_reference(rng, case):
    D, gs, P, part, spp, ncls = case
    x = rng.standard_normal((B, D * gs * gs, H, W))
    boxes = ref.random_boxes(rng, 6, B, H, W, scale=0.5)
    q = part or P
    off = rng.uniform(-1.5, 1.5, (6, 2 * ncls, q, q)) if ncls else None
    out = ops.deform_ps_roi_pool(x, boxes, off, 0.5, D, gs, P, part, spp, 0.3)
    assert isinstance(out, dn.Tensor) and out.shape == (6, D, P, P)
    expected = ref.deform_ps_roi_pool(x, boxes, off, 0.5, D, gs, P, part, spp, 0.3)
    np.testing.assert_allclose(out.numpy(), expected, rtol=1e-12, atol=1e-12)
    grad = rng.standard_normal(out.shape)
    gi, go = ops.deform_ps_roi_pool_backward(grad, x, boxes, off, 0.5, D, gs, P, part, spp, 0.3)
    egi, ego = ref.deform_ps_roi_pool_grad(x, boxes, off, grad, 0.5, D, gs, P, part, spp, 0.3)
    np.testing.assert_allclose(gi, egi, rtol=1e-12, atol=1e-12)
    if ncls:
        np.testing.assert_allclose(go, ego, rtol=1e-12, atol=1e-11)
    else:
        assert go is None


def test_deform_ps_roi_pool_float32(rng):
    D, gs, P = 2, 2, 3
    x = rng.standard_normal((B, D * gs * gs, H, W)).astype(np.float32)
    boxes = ref.random_boxes(rng, 5, B, H, W, dtype=np.float32)
    off = rng.uniform(-1, 1, (5, 2, P, P)).astype(np.float32)
    out = ops.deform_ps_roi_pool_forward(x, boxes, off, 1.0, D, gs, P, None, 2, 0.2)
    assert out.dtype == np.float32
    b64, o64 = boxes.astype(np.float64), off.astype(np.float64)
    expected = ref.deform_ps_roi_pool(x, b64, o64, 1.0, D, gs, P, None, 2, 0.2)
    np.testing.assert_allclose(out, expected, rtol=1e-5, atol=1e-5)
    grad = rng.standard_normal(out.shape).astype(np.float32)
    gi, go = ops.deform_ps_roi_pool_backward(grad, x, boxes, off, 1.0, D, gs, P, None, 2, 0.2)
    assert gi.dtype == go.dtype == np.float32
    egi, ego = ref.deform_ps_roi_pool_grad(x, b64, o64, grad, 1.0, D, gs, P, None, 2, 0.2)
    np.testing.assert_allclose(gi, egi, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(go, ego, rtol=1e-4, atol=1e-4)


def test_deform_ps_roi_pool_decision_points_on_a_ramp():
    # Deformable-ConvNets' forward on the column ramp: the box is rounded first (x1 = 2.4 -> 2,
    # x2 = 7.6 -> 8), start = 2*s - 0.5 = 1.5, roi_w = (8 + 1)*s - 0.5 - 1.5 = 7, bins of 7/P,
    # samples at the sub-bin *starts* wstart + iw*bin/spp (not centres); with one group cell and
    # a box inside, each output is the mean of its sample positions
    P, spp = 2, 2
    x = ramp(10, 12, axis=1)
    box = np.array([[0, 2.4, 3.0, 7.6, 6.0]])
    out = ops.deform_ps_roi_pool_forward(x, box, None, 1.0, 1, 1, P, None, spp, 0.0)
    bin_w = 7 / P
    for pw in range(P):
        mean = 1.5 + pw * bin_w + bin_w / spp * (spp - 1) / 2
        np.testing.assert_allclose(out[0, 0, :, pw], mean, rtol=1e-13)
    # with an offset: the bin moves by trans_std * offset * roi_w
    off = np.full((1, 2, P, P), 0.5)
    moved = ops.deform_ps_roi_pool_forward(x, box, off, 1.0, 1, 1, P, None, spp, 0.2)
    np.testing.assert_allclose(moved - out, 0.2 * 0.5 * 7, rtol=1e-12)
    # samples beyond W - 0.5 are skipped (not clamped into the mean); those in [-0.5, 0) count,
    # clamped to column 0: a box at the left edge, rounded start -0.5
    box = np.array([[0, 0.0, 3.0, 1.0, 6.0]])  # roi_w = 2, bins of 1, samples at -0.5, 0, 0.5, 1
    out = ops.deform_ps_roi_pool_forward(x, box, None, 1.0, 1, 1, P, None, spp, 0.0)
    np.testing.assert_allclose(out[0, 0, 0], [0.0, 0.75], rtol=1e-13)
    off = np.zeros((1, 2, P, P))
    off[0, 0] = 11.2 / 2  # moves every sample by 11.2: only those at <= W - 0.5 = 11.5 count
    out = ops.deform_ps_roi_pool_forward(x, box, off, 1.0, 1, 1, P, None, spp, 1.0)
    # bin 0: samples 10.7 and 11.2 (clamped to 11); bin 1: 11.7 and 12.2, both skipped: 0
    np.testing.assert_allclose(out[0, 0, 0], [(10.7 + 11) / 2, 0.0], rtol=1e-12)


@pytest.mark.parametrize("case", check_cases("deform_ps_roi_pool"), ids=lambda c: c.label)
def test_deform_ps_roi_pool_gradcheck(case):
    # the check table's case: samples kept 0.1 away from the validity lines -0.5, W-0.5 and off
    # the clamp's kinks; some lie in the clamped bands [-0.5, 0) and (W-1, W-0.5] (derivative
    # zero) or are skipped (deformnp.cases.inputs.deform_ps_roi_offsets_off_kinks)
    assert dn.gradcheck(case.fn, case.inputs(), names=case.names)


def test_deform_ps_roi_pool_offsets_ignored_without_trans_std(rng):
    D, gs, P = 2, 2, 3
    x = rng.standard_normal((B, D * gs * gs, H, W))
    boxes = ref.random_boxes(rng, 4, B, H, W)
    off = rng.uniform(-1, 1, (4, 2, P, P))
    a = ops.deform_ps_roi_pool_forward(x, boxes, None, 1.0, D, gs, P, None, 2, 0.5)
    b = ops.deform_ps_roi_pool_forward(x, boxes, off, 1.0, D, gs, P, None, 2, 0.0)
    np.testing.assert_array_equal(a, b)
    _, go = ops.deform_ps_roi_pool_backward(
        np.ones(a.shape), x, boxes, off, 1.0, D, gs, P, None, 2, 0.0
    )
    np.testing.assert_array_equal(go, 0.0)


def test_deform_ps_roi_pool_edges(rng):
    D, gs, P = 2, 2, 2
    x = rng.standard_normal((1, D * gs * gs, H, W))
    assert ops.deform_ps_roi_pool_forward(x, np.zeros((0, 5)), None, 1.0, D, gs, P).shape == (
        0,
        D,
        P,
        P,
    )
    boxes = np.array([[0, 40.0, 40, 60, 60], [0, -30, -30, -12, -12], [0, np.nan, 0, 3, 3]])
    out = ops.deform_ps_roi_pool_forward(x, boxes, None, 1.0, D, gs, P)
    np.testing.assert_array_equal(out, 0.0)
    inside = np.array([[0, 1.0, 1, 4, 4]])
    off = np.full((1, 2, P, P), np.nan)
    out = ops.deform_ps_roi_pool_forward(x, inside, off, 1.0, D, gs, P, None, 2, 0.1)
    np.testing.assert_array_equal(out, 0.0)  # NaN samples are skipped
    gi, go = ops.deform_ps_roi_pool_backward(
        np.ones_like(out), x, inside, off, 1.0, D, gs, P, None, 2, 0.1
    )
    np.testing.assert_array_equal(gi, 0.0)
    np.testing.assert_array_equal(go, 0.0)


@given(st.data())
def test_deform_ps_roi_pool_property(data):
    rng = np.random.default_rng(data.draw(st.integers(0, 2**32 - 1)))
    b = data.draw(st.integers(1, 2))
    h, w = data.draw(st.integers(1, 6)), data.draw(st.integers(1, 6))
    P = data.draw(st.integers(1, 3))
    gs = data.draw(st.integers(1, 3))
    part = data.draw(st.sampled_from([None, 1, 2]))
    ncls = data.draw(st.sampled_from([0, 1, 2]))
    D = data.draw(st.integers(1, 2)) * max(ncls, 1)
    spp = data.draw(st.integers(1, 3))
    k = data.draw(st.integers(0, 3))
    scale = data.draw(st.sampled_from([0.5, 1.0]))
    ts = data.draw(st.sampled_from([0.0, 0.1, 0.4]))
    x = rng.standard_normal((b, D * gs * gs, h, w))
    boxes = ref.random_boxes(rng, k, b, h, w, scale)
    q = part or P
    off = rng.uniform(-2, 2, (k, 2 * ncls, q, q)) if ncls else None
    out = ops.deform_ps_roi_pool_forward(x, boxes, off, scale, D, gs, P, part, spp, ts)
    expected = ref.deform_ps_roi_pool(x, boxes, off, scale, D, gs, P, part, spp, ts)
    np.testing.assert_allclose(out, expected, rtol=1e-12, atol=1e-12)
    grad = rng.standard_normal(out.shape)
    gi, go = ops.deform_ps_roi_pool_backward(grad, x, boxes, off, scale, D, gs, P, part, spp, ts)
    egi, ego = ref.deform_ps_roi_pool_grad(x, boxes, off, grad, scale, D, gs, P, part, spp, ts)
    np.testing.assert_allclose(gi, egi, rtol=1e-12, atol=1e-12)
    if ncls:
        np.testing.assert_allclose(go, ego, rtol=1e-11, atol=1e-11)
