"""roi_align (docs/ops/roi.rst): naive reference, gradcheck, edge cases, property tests, torchvision
parity."""

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


@pytest.mark.parametrize("aligned", [False, True])
@pytest.mark.parametrize("ratio", [-1, 0, 1, 2, 3])
def test_matches_reference_float64(rng, aligned, ratio):
    x = rng.standard_normal((B, C, H, W))
    boxes = ref.random_boxes(rng, 8, B, H, W, scale=0.5)
    out = ops.roi_align(x, boxes, (2, 3), 0.5, ratio, aligned)
    assert isinstance(out, dn.Tensor) and out.dtype == np.float64 and out.shape == (8, C, 2, 3)
    expected = ref.roi_align(x, boxes, 2, 3, 0.5, ratio, aligned)
    np.testing.assert_allclose(out.numpy(), expected, rtol=1e-12, atol=1e-12)
    grad = rng.standard_normal(out.shape)
    (g,) = ops.roi_align_backward(grad, x.shape, boxes, (2, 3), 0.5, ratio, aligned)
    expected_g = ref.roi_align_grad(x.shape, boxes, grad, 2, 3, 0.5, ratio, aligned)
    np.testing.assert_allclose(g, expected_g, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("aligned", [False, True])
def test_matches_reference_float32(rng, aligned):
    x = rng.standard_normal((B, C, H, W)).astype(np.float32)
    boxes = ref.random_boxes(rng, 8, B, H, W, dtype=np.float32)
    out = ops.roi_align_forward(x, boxes, 3, 1.0, -1, aligned)
    assert out.dtype == np.float32
    b64 = boxes.astype(np.float64)
    np.testing.assert_allclose(
        out, ref.roi_align(x, b64, 3, 3, 1.0, -1, aligned), rtol=1e-5, atol=1e-5
    )
    grad = rng.standard_normal(out.shape).astype(np.float32)
    (g,) = ops.roi_align_backward(grad, x.shape, boxes, 3, 1.0, -1, aligned)
    assert g.dtype == np.float32
    expected = ref.roi_align_grad(x.shape, b64, grad, 3, 3, 1.0, -1, aligned)
    np.testing.assert_allclose(g, expected, rtol=1e-5, atol=1e-5)


def test_autograd_matches_array_level(rng):
    x = dn.tensor(rng.standard_normal((B, C, H, W)), requires_grad=True)
    boxes = ref.random_boxes(rng, 5, B, H, W)
    out = ops.roi_align(x, boxes, 2, 1.0, 2, True)
    grad = rng.standard_normal(out.shape)
    out.backward(grad)
    np.testing.assert_array_equal(
        out.numpy(), ops.roi_align_forward(x.data, boxes, 2, 1.0, 2, True)
    )
    (g,) = ops.roi_align_backward(grad, x.data.shape, boxes, 2, 1.0, 2, True)
    np.testing.assert_array_equal(x.grad, g)


def test_list_of_boxes_is_the_roi_format(rng):
    x = rng.standard_normal((3, C, H, W))
    per_image = [rng.uniform(0, 6, (n, 4)) for n in (2, 0, 3)]
    for b in per_image:
        b[:, 2:] += b[:, :2]
    rois = np.concatenate(
        [np.concatenate([np.full((len(b), 1), i), b], axis=1) for i, b in enumerate(per_image)]
    )
    a = ops.roi_align(x, per_image, 2, 1.0, 2).numpy()
    np.testing.assert_array_equal(a, ops.roi_align(x, rois, 2, 1.0, 2).numpy())
    np.testing.assert_array_equal(a, ops.roi_align(x, tuple(per_image), (2, 2), 1.0, 2).numpy())
    np.testing.assert_array_equal(a, ops.roi_align(x, dn.tensor(rois), 2, 1.0, 2).numpy())


# ------------------------------------------------------------------ gradcheck


@pytest.mark.parametrize("case", check_cases("roi_align"), ids=lambda c: c.label)
def test_gradcheck_input(case):
    # the check table's cases (aligned or not): roi_align is linear in the input, so its input
    # gradient has no kinks and any boxes will do
    assert dn.gradcheck(case.fn, case.inputs(), names=case.names)


# ------------------------------------------------------------------ edge cases


@pytest.mark.parametrize("boxes", [np.zeros((0, 5)), [], [np.zeros((0, 4)), np.zeros((0, 4))]])
def test_no_boxes(rng, boxes):
    x = dn.tensor(rng.standard_normal((B, C, H, W)), requires_grad=True)
    out = ops.roi_align(x, boxes, (2, 3), 1.0, 2)
    assert out.shape == (0, C, 2, 3) and out.dtype == np.float64
    out.sum().backward()
    np.testing.assert_array_equal(x.grad, np.zeros(x.shape))


def test_empty_batch_and_channels():
    out = ops.roi_align(np.zeros((0, 3, 4, 4)), np.zeros((0, 5)), 2)
    assert out.shape == (0, 3, 2, 2)
    x = np.zeros((1, 0, 4, 4))
    out = ops.roi_align(x, np.array([[0, 0.0, 0, 2, 2]]), 2)
    assert out.shape == (1, 0, 2, 2)
    (g,) = ops.roi_align_backward(np.zeros((1, 0, 2, 2)), x.shape, np.array([[0, 0.0, 0, 2, 2]]), 2)
    assert g.shape == x.shape


@pytest.mark.parametrize("aligned", [False, True])
def test_boxes_outside_the_image(rng, aligned):
    x = rng.standard_normal((1, C, H, W))
    boxes = np.array([[0, 30.0, 40, 50, 60], [0, -60, -50, -20, -30], [0, W + 1.5, 0, W + 9, H]])
    out = ops.roi_align_forward(x, boxes, 2, 1.0, -1, aligned)
    np.testing.assert_array_equal(out, 0.0)
    (g,) = ops.roi_align_backward(np.ones_like(out), x.shape, boxes, 2, 1.0, -1, aligned)
    np.testing.assert_array_equal(g, 0.0)


@pytest.mark.parametrize("ratio", [-1, 2])
def test_non_finite_boxes_give_zeros(rng, ratio):
    x = rng.standard_normal((1, C, H, W))
    boxes = np.array([[0, np.nan, 0, 3, 3], [0, 0, 1, np.inf, 3], [0, -np.inf, 0, 3, 3]])
    out = ops.roi_align_forward(x, boxes, 2, 1.0, ratio, True)
    np.testing.assert_array_equal(out, 0.0)
    (g,) = ops.roi_align_backward(np.ones_like(out), x.shape, boxes, 2, 1.0, ratio, True)
    np.testing.assert_array_equal(g, 0.0)


@pytest.mark.parametrize("aligned", [False, True])
@pytest.mark.parametrize("ratio", [-1, 2])
def test_tiny_degenerate_and_inverted_boxes(rng, aligned, ratio):
    x = rng.standard_normal((1, C, H, W))
    boxes = np.array(
        [
            [0, 2.3, 3.1, 2.3, 3.1],  # a point
            [0, 2.3, 3.1, 2.31, 3.12],  # tiny
            [0, 5.0, 4.0, 1.0, 2.0],  # inverted
            [0, 0.0, 0.0, W, H],  # the whole map
        ]
    )
    out = ops.roi_align_forward(x, boxes, 2, 1.0, ratio, aligned)
    np.testing.assert_allclose(
        out, ref.roi_align(x, boxes, 2, 2, 1.0, ratio, aligned), rtol=1e-12, atol=1e-12
    )
    if aligned and ratio <= 0:  # adaptive grid of an empty or inverted box: no samples, 0
        np.testing.assert_array_equal(out[[0, 2]], 0.0)


def test_one_pixel_maps(rng):
    for shape in [(1, 2, 1, 5), (1, 2, 4, 1), (1, 2, 1, 1)]:
        x = rng.standard_normal(shape)
        boxes = np.array([[0, -0.7, -0.3, 3.2, 2.9], [0, 0.2, 0.1, 0.6, 0.4]])
        for aligned in (False, True):
            out = ops.roi_align_forward(x, boxes, 2, 1.0, 2, aligned)
            np.testing.assert_allclose(
                out, ref.roi_align(x, boxes, 2, 2, 1.0, 2, aligned), rtol=1e-12, atol=1e-12
            )


# ------------------------------------------------------------------ property tests


@given(st.data())
def test_property_matches_reference(data):
    rng = np.random.default_rng(data.draw(st.integers(0, 2**32 - 1)))
    b, c = data.draw(st.integers(1, 2)), data.draw(st.integers(1, 2))
    h, w = data.draw(st.integers(1, 6)), data.draw(st.integers(1, 6))
    ph, pw = data.draw(st.integers(1, 3)), data.draw(st.integers(1, 3))
    k = data.draw(st.integers(0, 4))
    ratio = data.draw(st.integers(-1, 3))
    aligned = data.draw(st.booleans())
    scale = data.draw(st.sampled_from([0.5, 1.0, 1.7]))
    x = rng.standard_normal((b, c, h, w))
    boxes = ref.random_boxes(rng, k, b, h, w, scale)
    out = ops.roi_align_forward(x, boxes, (ph, pw), scale, ratio, aligned)
    expected = ref.roi_align(x, boxes, ph, pw, scale, ratio, aligned)
    np.testing.assert_allclose(out, expected, rtol=1e-12, atol=1e-12)
    grad = rng.standard_normal(out.shape)
    (g,) = ops.roi_align_backward(grad, x.shape, boxes, (ph, pw), scale, ratio, aligned)
    expected_g = ref.roi_align_grad(x.shape, boxes, grad, ph, pw, scale, ratio, aligned)
    np.testing.assert_allclose(g, expected_g, rtol=1e-12, atol=1e-12)


# ------------------------------------------------------------------ torchvision parity


@pytest.mark.torch
@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize("aligned", [False, True])
@pytest.mark.parametrize("ratio", [-1, 0, 2])
def test_torchvision_parity(rng, dtype, aligned, ratio):
    torch = pytest.importorskip("torch")
    tvo = pytest.importorskip("torchvision.ops")
    x = rng.standard_normal((2, 4, 11, 13)).astype(dtype)
    boxes = ref.random_boxes(rng, 24, 2, 11, 13, scale=0.25, dtype=dtype)
    tx = torch.from_numpy(x).requires_grad_(True)
    expected = tvo.roi_align(tx, torch.from_numpy(boxes), (3, 2), 0.25, ratio, aligned)
    out = ops.roi_align_forward(x, boxes, (3, 2), 0.25, ratio, aligned)
    tol = 1e-12 if dtype == np.float64 else 1e-5
    np.testing.assert_allclose(out, expected.detach().numpy(), rtol=tol, atol=tol)
    grad = rng.standard_normal(out.shape).astype(dtype)
    (tg,) = torch.autograd.grad(expected, tx, torch.from_numpy(grad))
    (g,) = ops.roi_align_backward(grad, x.shape, boxes, (3, 2), 0.25, ratio, aligned)
    np.testing.assert_allclose(g, tg.numpy(), rtol=tol, atol=tol)
