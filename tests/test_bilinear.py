"""bilinear_interpolate (docs/ops/bilinear.rst): reference, gradcheck, edge cases, validation,
property tests, determinism, and parity with torch (grid_sample for zero-fade, roi_align for
clamp)."""

from __future__ import annotations

import numba
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from reference import bilinear as ref

import deformnp as dn
from deformnp import ops
from deformnp.cases import check_cases
from deformnp.cases.inputs import points_off_kinks
from deformnp.kernels.cpu.sampling import SERIAL_WORK

BORDERS = ["zero", "clamp"]


def special_points(H: int, W: int) -> np.ndarray:
    """Integers, the border lines, just inside/outside them, huge and non-finite values."""
    vals_y = [-1.5, -1.0, -0.999, -0.5, 0.0, 0.5, H - 1, H - 0.5, H - 1e-9, H, H + 0.3, 1e6, -1e6]
    vals_x = [-1.0, 0.0, 0.25, W - 1, W - 0.5, W, -1.2, 1.0, 2.0, W + 1e-9]
    pts = [(y, x) for y in vals_y for x in vals_x]
    pts += [(np.nan, 1.0), (1.0, np.nan), (np.inf, 1.0), (1.0, -np.inf), (-np.inf, np.inf)]
    return np.array(pts, dtype=np.float64)[None]


# ------------------------------------------------------------------ matches the reference


@pytest.mark.parametrize("border", BORDERS)
def test_matches_reference_float64(rng, border):
    N, C, H, W = 2, 3, 5, 6
    x = rng.standard_normal((N, C, H, W))
    pts = np.concatenate(
        [rng.uniform(-2, 8, (N, 60, 2)), np.repeat(special_points(H, W), N, 0)], axis=1
    )
    out = ops.bilinear_interpolate(x, pts, border)
    assert (
        isinstance(out, dn.Tensor) and out.dtype == np.float64 and out.shape == (N, C, pts.shape[1])
    )
    expected = ref.bilinear_interpolate(x, pts, border)
    np.testing.assert_allclose(out.numpy(), expected, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("border", BORDERS)
def test_matches_reference_float32(rng, border):
    N, C, H, W = 2, 4, 7, 5
    x = rng.standard_normal((N, C, H, W)).astype(np.float32)
    pts = rng.uniform(-2, 8, (N, 50, 2)).astype(np.float32)
    out = ops.bilinear_interpolate(x, pts, border)
    assert out.dtype == np.float32
    expected = ref.bilinear_interpolate(x, pts.astype(np.float64), border)
    np.testing.assert_allclose(out.numpy(), expected, rtol=1e-5, atol=1e-5 * np.abs(x).max())


def test_forward_pair_equals_op(rng):
    x = rng.standard_normal((1, 2, 4, 4))
    pts = rng.uniform(-1, 4, (1, 9, 2))
    np.testing.assert_array_equal(
        ops.bilinear_interpolate_forward(x, pts, "clamp"),
        ops.bilinear_interpolate(dn.tensor(x), dn.tensor(pts), border="clamp").numpy(),
    )


# ------------------------------------------------------------------ gradients


@pytest.mark.parametrize("case", check_cases("bilinear_interpolate"), ids=lambda c: c.label)
def test_gradcheck(case):
    # the check table's cases: sampling coordinates have fractional parts in [0.1, 0.9], off
    # the kinks and border lines (deformnp.cases.inputs)
    assert dn.gradcheck(case.fn, case.inputs(), names=case.names)


@pytest.mark.parametrize("border", BORDERS)
def test_point_gradient_is_right_hand_slope_at_kinks(rng, border):
    """At integer coordinates and on the border lines the point gradient is the exact right-hand
    derivative of the rule as written (docs/ops/bilinear.rst): compare with a one-sided forward
    difference."""
    N, C, H, W = 1, 2, 4, 5
    x = rng.standard_normal((N, C, H, W))
    ys = [-1.0, 0.0, 1.0, H - 1.0, H - 0.5, float(H) - 1e-3]
    xs = [1.5, 2.25]
    pts = np.array(
        [
            [(y, xx) for y in ys for xx in xs]
            + [(xx, y) for y in [-1.0, 0.0, W - 1.0] for xx in [1.5]]
        ]
    )
    g = rng.standard_normal((N, C, pts.shape[1]))
    _, gp = ops.bilinear_interpolate_backward(g, x, pts, border)
    h = 1e-7
    for d in range(2):
        shifted = pts.copy()
        shifted[..., d] += h
        f1 = np.sum(g * ref.bilinear_interpolate(x, shifted, border), axis=1)
        f0 = np.sum(g * ref.bilinear_interpolate(x, pts, border), axis=1)
        np.testing.assert_allclose(gp[..., d], (f1 - f0) / h, atol=1e-5)


@pytest.mark.parametrize("border", BORDERS)
def test_backward_matches_reference_gradients(rng, border):
    """grad_input equals the sum of the reference's weights (by linearity: d out / d input is the
    reference applied to unit maps)."""
    N, C, H, W, P = 1, 1, 3, 4, 15
    pts = np.concatenate([rng.uniform(-1.5, 4.5, (N, P, 2)), special_points(H, W)[:, :20]], 1)
    g = rng.standard_normal((N, C, pts.shape[1]))
    gi, _ = ops.bilinear_interpolate_backward(g, np.zeros((N, C, H, W)), pts, border, (True, False))
    expected = np.zeros((N, C, H, W))
    for i in range(H):
        for j in range(W):
            unit = np.zeros((N, C, H, W))
            unit[0, 0, i, j] = 1.0
            expected[0, 0, i, j] = np.sum(g * ref.bilinear_interpolate(unit, pts, border))
    np.testing.assert_allclose(gi, expected, rtol=1e-12, atol=1e-14)


def test_needs_selects_gradients(rng):
    x = rng.standard_normal((1, 2, 3, 3))
    pts = rng.uniform(0, 2, (1, 4, 2))
    g = np.ones((1, 2, 4))
    gi, gp = ops.bilinear_interpolate_backward(g, x, pts, needs=(False, True))
    assert gi is None and gp.shape == (1, 4, 2)
    gi, gp = ops.bilinear_interpolate_backward(g, x, pts, needs=(True, False))
    assert gp is None and gi.shape == x.shape


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_gradient_dtypes(rng, dtype):
    x = dn.tensor(rng.standard_normal((1, 2, 3, 3)).astype(dtype), requires_grad=True)
    p = dn.tensor(rng.uniform(0, 2, (1, 4, 2)).astype(dtype), requires_grad=True)
    ops.bilinear_interpolate(x, p).sum().backward()
    assert x.grad.dtype == dtype and p.grad.dtype == dtype


# ------------------------------------------------------------------ edge cases


@pytest.mark.parametrize("border", BORDERS)
def test_far_and_nonfinite_points_sample_zero_with_zero_grad(rng, border):
    x = rng.standard_normal((1, 2, 4, 4)) + 5.0
    pts = np.array(
        [[[1e6, 1.0], [-1e6, 1.0], [1.0, 1e6], [np.nan, 0.0], [0.0, np.inf], [np.nan, np.nan]]]
    )
    xt = dn.tensor(x, requires_grad=True)
    pt = dn.tensor(pts, requires_grad=True)
    out = ops.bilinear_interpolate(xt, pt, border)
    np.testing.assert_array_equal(out.numpy(), 0.0)
    out.sum().backward()
    np.testing.assert_array_equal(xt.grad, 0.0)
    np.testing.assert_array_equal(pt.grad, 0.0)


@pytest.mark.parametrize(
    "shape, P", [((0, 3, 4, 4), 5), ((2, 3, 4, 4), 0), ((2, 0, 4, 4), 5), ((1, 2, 0, 3), 4)]
)
def test_empty(shape, P):
    x = dn.tensor(np.ones(shape), requires_grad=True)
    p = dn.tensor(np.full((shape[0], P, 2), 0.5), requires_grad=True)
    out = ops.bilinear_interpolate(x, p)
    assert out.shape == (shape[0], shape[1], P)
    np.testing.assert_array_equal(out.numpy(), 0.0)
    out.sum().backward()
    assert x.grad.shape == shape and p.grad.shape == p.shape
    assert not np.any(x.grad) and not np.any(p.grad)


def test_single_pixel_map():
    x = np.full((1, 1, 1, 1), 2.0)
    pts = np.array([[[0.0, 0.0], [0.5, 0.0], [-0.5, -0.5], [0.7, 0.9]]])
    np.testing.assert_allclose(
        ops.bilinear_interpolate(x, pts, "zero").numpy(), ref.bilinear_interpolate(x, pts, "zero")
    )
    np.testing.assert_allclose(ops.bilinear_interpolate(x, pts, "clamp").numpy()[0, 0], 2.0)


def test_non_contiguous_inputs(rng):
    x = rng.standard_normal((2, 5, 6, 3)).transpose(0, 3, 1, 2)
    pts = rng.uniform(-1, 5, (2, 2, 7)).transpose(0, 2, 1)
    np.testing.assert_allclose(
        ops.bilinear_interpolate(x, pts).numpy(), ref.bilinear_interpolate(x, pts), rtol=1e-12
    )
    xt = dn.tensor(x, requires_grad=True)
    ops.bilinear_interpolate(xt, pts).sum().backward()
    assert xt.grad.shape == x.shape


# ------------------------------------------------------------------ validation


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("idx_t", [np.int32, np.int64])
def test_vector_plan_loop_gives_the_scalar_plans(rng, dtype, idx_t):
    """The forwards of bilinear_interpolate (border "zero") and grid_sample (padding "zeros")
    compute their plans in a loop LLVM vectorizes (``_zero_fade_plans``); every plan equals, bit
    for bit, the one the scalar ``_plan`` gives the same point (the backward's): corners on and
    off the map, on whole pixels and edges, NaN and inf, both align_corners."""
    from deformnp.kernels.cpu import bilinear as kernel

    H, W, m = 6, 9, 60
    src = np.stack([rng.uniform(-2.5, H + 1.5, (2, m)), rng.uniform(-2.5, W + 1.5, (2, m))], -1)
    src[0, :12] = [[-1, -1], [0, 0], [H - 1, W - 1], [H, W], [-1.0000001, 0.5], [0.5, W - 0.5],
                   [np.nan, 1], [1, np.inf], [-np.inf, 2], [2.5, 3.0], [H - 0.5, -0.9], [3, -1]]  # fmt: skip
    src = src.astype(dtype)
    for kind, scale in ((kernel.POINTS, 1.0), (kernel.GRID, 0.4)):
        pts = (src * scale).astype(dtype)  # GRID: normalized values around [-1, 1]
        for align in (False, True):
            pidx, pw = np.empty((4, m), idx_t), np.empty((4, m), dtype)
            kernel._zero_fade_plans(pts, kind, 0, 0, m, H, W, align, idx_t, pidx, pw)
            for q in range(m):
                idx, w, _, _, _, _ = kernel._plan(pts, kind, 0, 0, align, 0, q, H, W)
                assert pidx[:, q].tolist() == list(idx)
                np.testing.assert_array_equal(pw[:, q], np.array(w, dtype))


def test_validation_messages():
    x = np.zeros((2, 3, 4, 4))
    p = np.zeros((2, 5, 2))
    with pytest.raises(
        ValueError, match="bilinear_interpolate: border must be 'zero' or 'clamp', got 'reflect'"
    ):
        ops.bilinear_interpolate(x, p, "reflect")
    with pytest.raises(
        ValueError,
        match=r"bilinear_interpolate: input must be 4-d \(N, C, H, W\), got shape \(3, 4, 4\)",
    ):
        ops.bilinear_interpolate(x[0], p)
    with pytest.raises(
        ValueError,
        match=r"bilinear_interpolate: points must be 3-d \(N, P, 2\), got shape \(5, 2\)",
    ):
        ops.bilinear_interpolate(x, p[0])
    with pytest.raises(
        ValueError,
        match=r"bilinear_interpolate: points must be \(N, P, 2\) holding \(y, x\), got last dimension 3",
    ):
        ops.bilinear_interpolate(x, np.zeros((2, 5, 3)))
    with pytest.raises(
        ValueError,
        match="bilinear_interpolate: points has batch size 1, expected input's batch size 2",
    ):
        ops.bilinear_interpolate(x, p[:1])
    with pytest.raises(
        TypeError,
        match="bilinear_interpolate: inputs must share one float dtype, got input float64, points float32",
    ):
        ops.bilinear_interpolate(x, p.astype(np.float32))
    with pytest.raises(
        TypeError, match="bilinear_interpolate: input must be float32 or float64, got int64"
    ):
        ops.bilinear_interpolate(x.astype(np.int64), p)
    with pytest.raises(
        ValueError,
        match=r"bilinear_interpolate: grad_out must have shape \(2, 3, 5\), got \(2, 3, 4\)",
    ):
        ops.bilinear_interpolate_backward(np.zeros((2, 3, 4)), x, p)


# ------------------------------------------------------------------ properties


@given(
    N=st.integers(0, 2),
    C=st.integers(1, 3),
    H=st.integers(1, 5),
    W=st.integers(1, 5),
    P=st.integers(0, 8),
    border=st.sampled_from(BORDERS),
    dtype=st.sampled_from([np.float32, np.float64]),
    seed=st.integers(0, 2**16),
)
def test_property_matches_reference(N, C, H, W, P, border, dtype, seed):
    r = np.random.default_rng(seed)
    x = r.standard_normal((N, C, H, W)).astype(dtype)
    pts = r.uniform(-2.5, max(H, W) + 1.5, (N, P, 2))
    on_grid = r.random((N, P, 2)) < 0.3  # integers and border lines too
    pts[on_grid] = np.round(pts[on_grid])
    pts = pts.astype(dtype)
    out = ops.bilinear_interpolate(x, pts, border).numpy()
    expected = ref.bilinear_interpolate(x, pts.astype(np.float64), border)
    tol = 1e-12 if dtype == np.float64 else 1e-5
    np.testing.assert_allclose(out, expected, rtol=tol, atol=tol)


# ------------------------------------------------------------------ determinism


@pytest.mark.parametrize("border", BORDERS)
def test_backward_deterministic_across_runs_and_threads(rng, border):
    N, C, H, W, P = 2, 64, 9, 9, 1500  # N*C*P >= 2**17: runs on all threads by default
    x = rng.standard_normal((N, C, H, W)).astype(np.float32)
    pts = rng.uniform(-1.5, 9.5, (N, P, 2)).astype(np.float32)
    pts[:, :750] = np.round(pts[:, :750] / 2) * 0.5 + 3  # many points on the same pixels
    g = rng.standard_normal((N, C, P)).astype(np.float32)
    assert N * C * P >= SERIAL_WORK
    a = ops.bilinear_interpolate_backward(g, x, pts, border)
    b = ops.bilinear_interpolate_backward(g, x, pts, border)
    before = numba.get_num_threads()
    try:
        numba.set_num_threads(1)
        c = ops.bilinear_interpolate_backward(g, x, pts, border)
    finally:
        numba.set_num_threads(before)
    for u, v, w in zip(a, b, c):
        assert u.tobytes() == v.tobytes() == w.tobytes()


# ------------------------------------------------------------------ torch parity


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_zero_fade_matches_torch_grid_sample(rng, dtype):
    torch = pytest.importorskip("torch")
    N, C, H, W, P = 2, 3, 6, 7, 200
    x = rng.standard_normal((N, C, H, W)).astype(dtype)
    # off the lines y = -1 / x = -1 and integers, where torch's one-sided slopes may differ
    pts = points_off_kinks(rng, N, P, H, W).astype(dtype)
    xt = dn.tensor(x, requires_grad=True)
    pt = dn.tensor(pts, requires_grad=True)
    out = ops.bilinear_interpolate(xt, pt, "zero")
    g = rng.standard_normal(out.shape).astype(dtype)
    out.backward(g)
    tx = torch.tensor(x, requires_grad=True)
    tp = torch.tensor(pts, requires_grad=True)
    grid = torch.stack([tp[..., 1] / (W - 1) * 2 - 1, tp[..., 0] / (H - 1) * 2 - 1], -1)[:, None]
    tout = torch.nn.functional.grid_sample(tx, grid, "bilinear", "zeros", align_corners=True)
    tout.backward(torch.tensor(g[:, :, None]))
    tol = 1e-12 if dtype == np.float64 else 1e-5
    np.testing.assert_allclose(out.numpy(), tout.detach().numpy()[:, :, 0], rtol=tol, atol=tol)
    np.testing.assert_allclose(xt.grad, tx.grad.numpy(), rtol=tol, atol=tol)
    np.testing.assert_allclose(pt.grad, tp.grad.numpy(), rtol=10 * tol, atol=10 * tol)


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_clamp_matches_torchvision_roi_align(rng, dtype):
    """A 1x1 roi_align bin of unit size with one sample (aligned=False) samples exactly its
    centre under torchvision's clamp rule."""
    torch = pytest.importorskip("torch")
    tv = pytest.importorskip("torchvision")
    N, C, H, W, P = 2, 3, 5, 6, 100
    x = rng.standard_normal((N, C, H, W)).astype(dtype)
    pts = np.concatenate(
        [rng.uniform(-1.4, 6.4, (N, P, 2)), np.repeat(special_points(H, W)[:, :120], N, 0)], 1
    )
    pts = pts[:, np.all(np.abs(pts[0]) < 100, axis=-1)].astype(dtype)
    P = pts.shape[1]
    boxes = np.concatenate(
        [
            np.repeat(np.arange(N), P)[:, None],
            pts[..., 1].reshape(-1, 1) - 0.5,
            pts[..., 0].reshape(-1, 1) - 0.5,
            pts[..., 1].reshape(-1, 1) + 0.5,
            pts[..., 0].reshape(-1, 1) + 0.5,
        ],
        axis=1,
    ).astype(dtype)
    tx = torch.tensor(x, requires_grad=True)
    tout = tv.ops.roi_align(tx, torch.tensor(boxes), 1, 1.0, 1, False)
    g = rng.standard_normal((N, C, P)).astype(dtype)
    tout.backward(torch.tensor(g.transpose(0, 2, 1).reshape(N * P, C, 1, 1)))
    xt = dn.tensor(x, requires_grad=True)
    out = ops.bilinear_interpolate(xt, pts, "clamp")
    out.backward(g)
    expected = tout.detach().numpy().reshape(N, P, C).transpose(0, 2, 1)
    tol = 1e-12 if dtype == np.float64 else 1e-5
    np.testing.assert_allclose(out.numpy(), expected, rtol=tol, atol=tol)
    np.testing.assert_allclose(xt.grad, tx.grad.numpy(), rtol=tol, atol=tol)
