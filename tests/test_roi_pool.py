"""roi_pool (docs/ops/roi.rst): naive reference, gradcheck, ties/NaN/empty bins, property tests,
torchvision parity."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from reference import roi as ref

import deformnp as dn
from deformnp import ops
from deformnp.cases import check_cases

B, C, H, W = 2, 3, 7, 9


# ------------------------------------------------------------------ matches the reference


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_matches_reference(rng, dtype):
    x = rng.standard_normal((B, C, H, W)).astype(dtype)
    boxes = ref.random_boxes(rng, 10, B, H, W, scale=0.6, dtype=dtype)
    out, argmax = ops.roi_pool_forward(x, boxes, (3, 2), 0.6, return_argmax=True)
    assert out.dtype == dtype and out.shape == (10, C, 3, 2)
    expected, expected_arg = ref.roi_pool(x, boxes, 3, 2, 0.6, dtype)
    np.testing.assert_array_equal(out, expected)  # a max is exact
    np.testing.assert_array_equal(argmax, expected_arg)
    grad = rng.standard_normal(out.shape).astype(dtype)
    (g,) = ops.roi_pool_backward(grad, x.shape, boxes, (3, 2), 0.6, argmax=argmax)
    assert g.dtype == dtype
    tol = 1e-12 if dtype == np.float64 else 1e-5
    expected_g = ref.roi_pool_grad(x.shape, boxes, grad, expected_arg)
    np.testing.assert_allclose(g, expected_g, rtol=tol, atol=tol)


def test_autograd_matches_array_level(rng):
    x = dn.tensor(rng.standard_normal((B, C, H, W)), requires_grad=True)
    boxes = ref.random_boxes(rng, 6, B, H, W)
    out = ops.roi_pool(x, boxes, 2, 1.0)
    grad = rng.standard_normal(out.shape)
    out.backward(grad)
    out_a, argmax = ops.roi_pool_forward(x.data, boxes, 2, 1.0, return_argmax=True)
    np.testing.assert_array_equal(out.numpy(), out_a)
    (g,) = ops.roi_pool_backward(grad, x.data.shape, boxes, 2, argmax=argmax)
    np.testing.assert_array_equal(x.grad, g)


def test_float32_bins_are_computed_in_float32():
    # with s = float32(0.7), 5 * s is 3.5 in float32 arithmetic (start 4) but 3.4999999 in
    # float64 (start 3): like torchvision, float32 inputs get the float32 bins
    x = -np.arange(2 * 1 * 8 * 8, dtype=np.float32).reshape(2, 1, 8, 8)  # max: the first pixel
    boxes = np.array([[0, 5.0, 5.0, 9.0, 9.0]], np.float32)
    out, argmax = ops.roi_pool_forward(x, boxes, 1, 0.7, return_argmax=True)
    expected, expected_arg = ref.roi_pool(x, boxes, 1, 1, 0.7, np.float32)
    np.testing.assert_array_equal(out, expected)
    assert argmax[0, 0, 0, 0] == expected_arg[0, 0, 0, 0] == 4 * 8 + 4
    in_float64 = ref.roi_pool(x, boxes, 1, 1, float(np.float32(0.7)), np.float64)[1]
    assert in_float64[0, 0, 0, 0] == 3 * 8 + 3


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("mode", ["roi_pool", "ps_roi_pool"])
def test_pool_bins_are_the_reference_bins(rng, dtype, mode):
    """``pool_bins`` (a Numba loop) gives every box the reference's bins, integer for integer:
    boxes inside, across and beyond the map, on half pixels (C's round: half away from zero),
    reversed, degenerate, at several scales; a non-finite box gets empty bins."""
    from deformnp.kernels.roi_geometry import pool_bins

    h, w, ph, pw = 13, 17, 3, 5
    boxes = ref.random_boxes(rng, 200, 2, h, w, scale=0.5)
    half = rng.random(boxes[:, 1:].shape) < 0.3
    boxes[:, 1:][half] = np.round(boxes[:, 1:][half] * 2) / 2 - rng.choice([0, 40], half.sum())
    boxes[:4, 1:] = [[9.5, -2.5, 0.5, 3.5], [-0.5, 1.5, -0.5, 1.5], [0, 0, 0, 0], [1e7, 1, 2e7, 3]]
    boxes = boxes.astype(dtype)
    for scale in (1.0, 0.5, 0.7, 1 / 16):
        batch, hs, he, ws, we = pool_bins(mode, boxes, (ph, pw), scale, h, w, dtype)
        assert all(a.dtype == np.int64 for a in (batch, hs, he, ws, we))
        np.testing.assert_array_equal(batch, boxes[:, 0].astype(np.int64))
        for k, roi in enumerate(boxes):
            for i in range(ph):
                for j in range(pw):
                    expected = ref._pool_bin(roi, i, j, ph, pw, scale, h, w, mode == "roi_pool", dtype)  # fmt: skip
                    assert (hs[k, i], he[k, i], ws[k, j], we[k, j]) == expected
    nonfinite = np.array([[0, np.nan, 1, 2, 3], [1, 1, np.inf, 2, 3], [0, 1, 2, 3, -np.inf]], dtype)
    _, hs, he, _, _ = pool_bins(mode, nonfinite, (ph, pw), 1.0, h, w, dtype)
    assert not hs.any() and not he.any()


# ------------------------------------------------------------------ gradcheck


@pytest.mark.parametrize("case", check_cases("roi_pool"), ids=lambda c: c.label)
def test_gradcheck_input(case):
    # the check table's case: random normal values, no two values of a bin within 2*eps of each
    # other, so the finite differences never move an argmax
    assert dn.gradcheck(case.fn, case.inputs(), names=case.names)


# ------------------------------------------------------------------ edge cases


def test_ties_first_maximum_in_row_major_order_wins():
    x = np.zeros((1, 2, 5, 6))
    x[0, 1, 3, 1] = x[0, 1, 1, 4] = x[0, 1, 3, 4] = 2.0  # three equal maxima
    boxes = np.array([[0, 0.0, 0.0, 5.0, 4.0]])
    out, argmax = ops.roi_pool_forward(x, boxes, 1, 1.0, return_argmax=True)
    assert argmax[0, 0, 0, 0] == 0  # all zeros: the bin's first pixel
    assert argmax[0, 1, 0, 0] == 1 * 6 + 4 and out[0, 1, 0, 0] == 2.0
    (g,) = ops.roi_pool_backward(np.ones_like(out), x.shape, boxes, 1, 1.0, argmax=argmax)
    assert g[0, 0, 0, 0] == 1.0 and g[0, 1, 1, 4] == 1.0 and g.sum() == 2.0


def test_nan_counts_as_the_maximum():
    x = np.zeros((1, 1, 4, 4))
    x[0, 0, 1, 2] = np.nan
    x[0, 0, 2, 1] = np.nan
    x[0, 0, 3, 3] = 5.0
    out, argmax = ops.roi_pool_forward(x, np.array([[0, 0.0, 0, 3, 3]]), 1, 1.0, True)
    assert np.isnan(out[0, 0, 0, 0]) and argmax[0, 0, 0, 0] == 1 * 4 + 2


def test_very_negative_values_are_pooled():
    # torchvision starts from -FLT_MAX and would return it here; deformnp returns the true max
    x = np.full((1, 1, 3, 3), -1e300)
    x[0, 0, 2, 2] = -np.inf
    out = ops.roi_pool_forward(x, np.array([[0, 0.0, 0, 2, 2]]), 1)
    assert out[0, 0, 0, 0] == -1e300


def test_empty_bins_and_boxes_outside(rng):
    x = dn.tensor(rng.standard_normal((1, C, H, W)), requires_grad=True)
    boxes = np.array(
        [[0, 30.0, 40, 50, 60], [0, -9, -9, -3, -3], [0, -6, -6, 1, 1], [0, np.nan, 0, 1, 1]]
    )
    out, argmax = ops.roi_pool_forward(x.data, boxes, 3, 1.0, return_argmax=True)
    np.testing.assert_array_equal(out[[0, 1, 3]], 0.0)
    np.testing.assert_array_equal(argmax[[0, 1, 3]], -1)
    # a box reaching 6 pixels out of the map: its outer bins are clipped empty (0, no gradient)
    assert (argmax[2] == -1).any() and (argmax[2] >= 0).any()
    np.testing.assert_array_equal(out[2][argmax[2] == -1], 0.0)
    ops.roi_pool(x, boxes, 3, 1.0).sum().backward()
    assert x.grad.sum() == (argmax >= 0).sum()


@pytest.mark.parametrize("boxes", [np.zeros((0, 5)), []])
def test_no_boxes(rng, boxes):
    x = dn.tensor(rng.standard_normal((B, C, H, W)), requires_grad=True)
    out = ops.roi_pool(x, boxes, 2)
    assert out.shape == (0, C, 2, 2)
    out.sum().backward()
    np.testing.assert_array_equal(x.grad, 0.0)


def test_argmax_dtype_and_list_boxes(rng):
    x = rng.standard_normal((2, C, H, W))
    per_image = [np.array([[0.0, 1, 5, 6]]), np.array([[2.0, 0, 8, 4], [1, 1, 3, 3]])]
    out, argmax = ops.roi_pool_forward(x, per_image, 2, 1.0, return_argmax=True)
    assert argmax.dtype == np.int16  # the smallest type holding H*W - 1
    rois = np.array([[0, 0.0, 1, 5, 6], [1, 2, 0, 8, 4], [1, 1, 1, 3, 3]])
    np.testing.assert_array_equal(out, ops.roi_pool_forward(x, rois, 2))


# ------------------------------------------------------------------ property tests


@given(st.data())
def test_property_matches_reference(data):
    rng = np.random.default_rng(data.draw(st.integers(0, 2**32 - 1)))
    b, c = data.draw(st.integers(1, 2)), data.draw(st.integers(1, 3))
    h, w = data.draw(st.integers(1, 7)), data.draw(st.integers(1, 7))
    ph, pw = data.draw(st.integers(1, 3)), data.draw(st.integers(1, 3))
    k = data.draw(st.integers(0, 5))
    scale = data.draw(st.sampled_from([0.5, 1.0, 1.3]))
    dtype = data.draw(st.sampled_from([np.float32, np.float64]))
    x = rng.standard_normal((b, c, h, w)).astype(dtype)
    boxes = ref.random_boxes(rng, k, b, h, w, scale, dtype)
    out, argmax = ops.roi_pool_forward(x, boxes, (ph, pw), scale, return_argmax=True)
    expected, expected_arg = ref.roi_pool(x, boxes, ph, pw, scale, dtype)
    np.testing.assert_array_equal(out, expected)
    np.testing.assert_array_equal(argmax, expected_arg)
    grad = rng.standard_normal(out.shape).astype(dtype)
    (g,) = ops.roi_pool_backward(grad, x.shape, boxes, (ph, pw), scale, argmax=argmax)
    np.testing.assert_allclose(
        g, ref.roi_pool_grad(x.shape, boxes, grad, expected_arg), rtol=1e-6, atol=1e-6
    )


# ------------------------------------------------------------------ torchvision parity


@pytest.mark.torch
@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_torchvision_parity(rng, dtype):
    torch = pytest.importorskip("torch")
    tvo = pytest.importorskip("torchvision.ops")
    x = rng.standard_normal((2, 4, 11, 13)).astype(dtype)
    boxes = ref.random_boxes(rng, 30, 2, 11, 13, scale=0.7, dtype=dtype)
    boxes = np.concatenate([boxes, np.array([[0, 5.0, 5.0, 9.0, 9.0]], dtype)])  # float32 rounding
    tx = torch.from_numpy(x).requires_grad_(True)
    expected = tvo.roi_pool(tx, torch.from_numpy(boxes), (3, 2), 0.7)
    out, argmax = ops.roi_pool_forward(x, boxes, (3, 2), 0.7, return_argmax=True)
    np.testing.assert_array_equal(out, expected.detach().numpy())
    grad = rng.standard_normal(out.shape).astype(dtype)
    (tg,) = torch.autograd.grad(expected, tx, torch.from_numpy(grad))
    (g,) = ops.roi_pool_backward(grad, x.shape, boxes, (3, 2), 0.7, argmax=argmax)
    tol = 1e-12 if dtype == np.float64 else 1e-5
    np.testing.assert_allclose(g, tg.numpy(), rtol=tol, atol=tol)
