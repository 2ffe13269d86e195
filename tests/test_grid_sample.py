"""grid_sample (docs/ops/bilinear.rst): reference, gradcheck, edge cases, validation, property
tests, determinism, and parity with torch.nn.functional.grid_sample."""

from __future__ import annotations

import numba
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from reference import grid_sample as ref

import deformnp as dn
from deformnp import ops
from deformnp.cases import check_cases
from deformnp.kernels.cpu.sampling import SERIAL_WORK

MODES = ["zeros", "border", "reflection"]


def normalize(c: np.ndarray, size: int, align_corners: bool) -> np.ndarray:
    """Grid values whose unnormalized pixel coordinate is ``c``."""
    return c / (size - 1) * 2 - 1 if align_corners else (2 * c + 1) / size - 1


def rel_err(a, b):
    return np.abs(np.asarray(a, np.float64) - b).max(initial=0.0) / max(
        np.abs(b).max(initial=0.0), 1e-300
    )


# ------------------------------------------------------------------ matches the reference


@pytest.mark.parametrize("padding_mode", MODES)
@pytest.mark.parametrize("align_corners", [False, True])
def test_matches_reference_float64(rng, padding_mode, align_corners):
    N, C, Hin, Win = 2, 3, 5, 6
    grid = rng.uniform(-1.6, 1.6, (N, 4, 7, 2))
    grid[0, 0, :4] = [[-1, -1], [1, 1], [-3.5, 0.2], [0.3, 5.25]]  # corners, far reflections
    x = rng.standard_normal((N, C, Hin, Win))
    out = ops.grid_sample(x, grid, "bilinear", padding_mode, align_corners)
    assert isinstance(out, dn.Tensor) and out.shape == (N, C, 4, 7) and out.dtype == np.float64
    expected = ref.grid_sample(x, grid, padding_mode, align_corners)
    assert rel_err(out.numpy(), expected) < 1e-12


@pytest.mark.parametrize("padding_mode", MODES)
def test_matches_reference_float32(rng, padding_mode):
    x = rng.standard_normal((2, 4, 6, 5)).astype(np.float32)
    grid = rng.uniform(-1.4, 1.4, (2, 5, 3, 2)).astype(np.float32)
    out = ops.grid_sample(x, grid, padding_mode=padding_mode, align_corners=False)
    assert out.dtype == np.float32
    assert rel_err(out.numpy(), ref.grid_sample(x, grid, padding_mode, False)) < 1e-5


def test_pixel_centres_reproduce_the_input(rng):
    """The identity grid (pixel centres) returns the input, for either align_corners."""
    x = rng.standard_normal((1, 2, 4, 5))
    for align in (False, True):
        gx = normalize(np.arange(5.0), 5, align)
        gy = normalize(np.arange(4.0), 4, align)
        grid = np.stack(np.meshgrid(gx, gy), axis=-1)[None]
        np.testing.assert_allclose(
            ops.grid_sample(x, grid, align_corners=align).numpy(), x, rtol=1e-14, atol=1e-14
        )


def test_forward_pair_and_defaults(rng):
    x = rng.standard_normal((1, 2, 3, 3))
    grid = rng.uniform(-1, 1, (1, 2, 2, 2))
    np.testing.assert_array_equal(
        ops.grid_sample_forward(x, grid), ops.grid_sample(dn.tensor(x), dn.tensor(grid)).numpy()
    )
    # align_corners=None is torch's default (False)
    np.testing.assert_array_equal(
        ops.grid_sample(x, grid, align_corners=None).numpy(), ops.grid_sample(x, grid).numpy()
    )


# ------------------------------------------------------------------ gradients


@pytest.mark.parametrize("case", check_cases("grid_sample"), ids=lambda c: c.label)
def test_gradcheck(case):
    # the check table's cases: pixel coordinates off the kinks of the sampling rule and of the
    # padding transforms (deformnp.cases.inputs.grid_off_kinks), every mode and align_corners
    assert dn.gradcheck(case.fn, case.inputs(), names=case.names)


def test_border_gradient_is_right_hand_at_zero(rng):
    """At a pixel coordinate of exactly 0 in border mode the grid derivative is the right-hand
    slope (torch zeroes it there); just below 0 it is zero (clipped)."""
    x = rng.standard_normal((1, 1, 3, 4))
    grid = np.array([[[[normalize(0.0, 4, True), normalize(1.25, 3, True)]]]])
    go = np.ones((1, 1, 1, 1))
    _, gg = ops.grid_sample_backward(go, x, grid, "bilinear", "border", True)
    h = 1e-7
    bumped = grid.copy()
    bumped[..., 0] += h
    f1 = ref.grid_sample(x, bumped, "border", True)
    f0 = ref.grid_sample(x, grid, "border", True)
    np.testing.assert_allclose(gg[..., 0].reshape(-1), (f1 - f0).reshape(-1) / h, rtol=1e-5)
    below = grid.copy()
    below[..., 0] -= 1e-3
    _, gg = ops.grid_sample_backward(go, x, below, "bilinear", "border", True)
    assert gg[..., 0] == 0.0


def test_needs_and_dtypes(rng):
    x = rng.standard_normal((1, 2, 3, 3)).astype(np.float32)
    grid = rng.uniform(-1, 1, (1, 2, 2, 2)).astype(np.float32)
    go = np.ones((1, 2, 2, 2), np.float32)
    gi, gg = ops.grid_sample_backward(go, x, grid, needs=(True, False))
    assert gg is None and gi.dtype == np.float32
    gi, gg = ops.grid_sample_backward(go, x, grid, needs=(False, True))
    assert gi is None and gg.dtype == np.float32 and gg.shape == grid.shape


# ------------------------------------------------------------------ edge cases


@pytest.mark.parametrize("padding_mode", MODES)
def test_nonfinite_and_far_grid_values(rng, padding_mode):
    x = dn.tensor(rng.standard_normal((1, 2, 3, 4)) + 3.0, requires_grad=True)
    vals = np.array(
        [[np.nan, 0.1], [0.2, np.nan], [np.inf, 0.0], [0.0, -np.inf], [1e6, 0.3], [-1e6, 0.3]]
    )
    grid = dn.tensor(vals.reshape(1, 2, 3, 2), requires_grad=True)
    out = ops.grid_sample(x, grid, padding_mode=padding_mode)
    o = out.numpy().reshape(2, 6)
    assert np.all(np.isfinite(o))
    np.testing.assert_array_equal(o[:, :2], 0.0)  # NaN samples zero in every mode
    if padding_mode == "zeros":
        np.testing.assert_array_equal(o, 0.0)
    if padding_mode == "border":  # inf and far values clip to the border pixels
        np.testing.assert_allclose(o[:, 2], x.data[0, :, 1, 3])  # (y, x) = (1, W - 1)
    np.testing.assert_allclose(o, ref.grid_sample(x.data, grid.data, padding_mode).reshape(2, 6))
    out.sum().backward()
    assert np.all(np.isfinite(x.grad)) and np.all(np.isfinite(grid.grad))


@pytest.mark.parametrize(
    "in_shape, grid_shape",
    [((0, 2, 3, 3), (0, 2, 2, 2)), ((2, 2, 3, 3), (2, 0, 4, 2)), ((1, 0, 3, 3), (1, 2, 2, 2))],
)
def test_empty(in_shape, grid_shape):
    x = dn.tensor(np.ones(in_shape), requires_grad=True)
    g = dn.tensor(np.zeros(grid_shape), requires_grad=True)
    out = ops.grid_sample(x, g)
    assert out.shape == (in_shape[0], in_shape[1], grid_shape[1], grid_shape[2])
    out.sum().backward()
    assert x.grad.shape == in_shape and g.grad.shape == grid_shape
    assert not np.any(x.grad) and not np.any(g.grad)


@pytest.mark.parametrize("padding_mode", MODES)
@pytest.mark.parametrize("align_corners", [False, True])
def test_single_pixel_input(rng, padding_mode, align_corners):
    x = np.full((1, 1, 1, 1), 2.0)
    grid = rng.uniform(-2, 2, (1, 3, 3, 2))
    out = ops.grid_sample(x, grid, padding_mode=padding_mode, align_corners=align_corners)
    expected = ref.grid_sample(x, grid, padding_mode, align_corners)
    np.testing.assert_allclose(out.numpy(), expected, rtol=1e-12, atol=1e-15)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("padding_mode", MODES)
@pytest.mark.parametrize("align_corners", [False, True])
def test_forward_point_lanes_equal_points_alone(rng, dtype, padding_mode, align_corners):
    """The forward samples eight points at a time (one gather per corner) and the rest of a
    block one by one: every point of a 29-point grid (one or two blocks of 14 or more points,
    each lanes of eight then a tail; points off the map, NaN and inf grid values, inf and NaN
    in the input) equals, bit for bit, the same point sampled alone (a block of one point: the
    scalar path)."""
    x = rng.standard_normal((2, 5, 7, 9)).astype(dtype)
    x[0, 1, 3, 4], x[1, 2, 0, 0], x[1, 4, 6, 8] = np.inf, np.nan, -np.inf
    grid = rng.uniform(-1.3, 1.3, (2, 1, 29, 2)).astype(dtype)
    grid[0, 0, :4] = [[np.nan, 0.1], [0.2, np.inf], [-1.0, -1.0], [1.0, 1.0]]
    grid[1, 0, 9:12] = [[5.0, 0.0], [-np.inf, 0.3], [0.0, 0.0]]
    out = ops.grid_sample_forward(x, grid, "bilinear", padding_mode, align_corners)
    for p in range(29):
        alone = ops.grid_sample_forward(
            x, np.ascontiguousarray(grid[:, :, p : p + 1]), "bilinear", padding_mode, align_corners
        )
        np.testing.assert_array_equal(out[..., p : p + 1], alone)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("padding_mode", [0, 1, 2])
def test_forward_64bit_plan_indices_equal_32bit(rng, dtype, padding_mode):
    """Planes of 2**31 elements or more take int64 corner indices (``_idx_dtype``); run on a
    small map, that build gives the int32 build's outputs bit for bit."""
    from deformnp.kernels.cpu import bilinear as kernel

    x = rng.standard_normal((2, 3, 6, 5)).astype(dtype)
    src = rng.uniform(-1.3, 1.3, (2, 37, 2)).astype(dtype)
    outs = []
    for idx_t in (np.int32, np.int64):
        out = np.empty((2, 3, 37), dtype)
        idx_like = np.empty(0, idx_t)  # the index dtype, passed as an empty array
        kernel._sample_forward(x, src, kernel.GRID, 0, padding_mode, False, 16, idx_like, out)
        outs.append(out)
    np.testing.assert_array_equal(outs[0], outs[1])


# ------------------------------------------------------------------ validation


def test_validation_messages():
    x = np.zeros((2, 3, 4, 4))
    g = np.zeros((2, 5, 5, 2))
    E = pytest.raises
    with E(ValueError, match="grid_sample: mode must be 'bilinear' .*, got 'nearest'"):
        ops.grid_sample(x, g, "nearest")
    with E(
        ValueError,
        match="grid_sample: mode must be 'bilinear' .*, got 'zeros'; note the argument order",
    ):
        ops.grid_sample(x, g, "zeros")
    with E(
        ValueError,
        match="grid_sample: padding_mode must be 'zeros', 'border' or 'reflection', got 'wrap'",
    ):
        ops.grid_sample(x, g, padding_mode="wrap")
    with E(TypeError, match="grid_sample: align_corners must be a bool, got 1"):
        ops.grid_sample(x, g, align_corners=1)
    with E(
        ValueError,
        match=r"grid_sample: grid must be \(N, Hout, Wout, 2\) holding normalized \(x, y\), got last dimension 3",
    ):
        ops.grid_sample(x, np.zeros((2, 5, 5, 3)))
    with E(
        ValueError,
        match=r"grid_sample: grid must be 4-d \(N, Hout, Wout, 2\), got shape \(5, 5, 2\)",
    ):
        ops.grid_sample(x, g[0])
    with E(
        ValueError,
        match=r"grid_sample: input must be 4-d \(N, C, Hin, Win\), got shape \(3, 4, 4\)",
    ):
        ops.grid_sample(x[0], g)
    with E(ValueError, match="grid_sample: grid has batch size 1, expected input's batch size 2"):
        ops.grid_sample(x, g[:1])
    with E(
        TypeError,
        match="grid_sample: inputs must share one float dtype, got input float64, grid float32",
    ):
        ops.grid_sample(x, g.astype(np.float32))
    with E(TypeError, match="grid_sample: grid must be float32 or float64, got int64"):
        ops.grid_sample(x, g.astype(np.int64))
    with E(
        ValueError,
        match=r"grid_sample: grad_out must have shape \(2, 3, 5, 5\), got \(2, 3, 4, 5\)",
    ):
        ops.grid_sample_backward(np.zeros((2, 3, 4, 5)), x, g)


# ------------------------------------------------------------------ properties


@given(
    N=st.integers(0, 2),
    C=st.integers(1, 3),
    Hin=st.integers(1, 5),
    Win=st.integers(1, 5),
    Hout=st.integers(0, 4),
    Wout=st.integers(1, 4),
    padding_mode=st.sampled_from(MODES),
    align_corners=st.booleans(),
    dtype=st.sampled_from([np.float32, np.float64]),
    seed=st.integers(0, 2**16),
)
def test_property_matches_reference(
    N, C, Hin, Win, Hout, Wout, padding_mode, align_corners, dtype, seed
):
    r = np.random.default_rng(seed)
    x = r.standard_normal((N, C, Hin, Win)).astype(dtype)
    grid = r.uniform(-2.5, 2.5, (N, Hout, Wout, 2)).astype(dtype)
    out = ops.grid_sample(x, grid, "bilinear", padding_mode, align_corners).numpy()
    expected = ref.grid_sample(x, grid.astype(np.float64), padding_mode, align_corners)
    tol = 1e-12 if dtype == np.float64 else 1e-5
    np.testing.assert_allclose(out, expected, rtol=tol, atol=tol * 4)


# ------------------------------------------------------------------ determinism


def test_backward_deterministic_across_runs_and_threads(rng):
    # N*C*Hout*Wout >= 2**17: runs on all threads by default
    x = rng.standard_normal((2, 32, 8, 8)).astype(np.float32)
    grid = rng.uniform(-1.2, 1.2, (2, 48, 48, 2)).astype(np.float32)
    grid[:, :24] = np.round(grid[:, :24] * 4) / 4  # many points on the same pixels
    go = rng.standard_normal((2, 32, 48, 48)).astype(np.float32)
    assert go.size >= SERIAL_WORK
    a = ops.grid_sample_backward(go, x, grid)
    b = ops.grid_sample_backward(go, x, grid)
    before = numba.get_num_threads()
    try:
        numba.set_num_threads(1)
        c = ops.grid_sample_backward(go, x, grid)
    finally:
        numba.set_num_threads(before)
    for u, v, w in zip(a, b, c):
        assert u.tobytes() == v.tobytes() == w.tobytes()


# ------------------------------------------------------------------ torch parity


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize("padding_mode", MODES)
@pytest.mark.parametrize("align_corners", [False, True])
def test_matches_torch(rng, dtype, padding_mode, align_corners):
    torch = pytest.importorskip("torch")
    N, C, Hin, Win, Hout, Wout = 2, 3, 6, 7, 5, 4
    x = rng.standard_normal((N, C, Hin, Win)).astype(dtype)
    # continuous values (never exactly on a kink); far values where float32 keeps precision
    grid = rng.uniform(-1.8, 1.8, (N, Hout, Wout, 2))
    if padding_mode != "reflection" or dtype == np.float64:
        grid[0, 0, :3] = [[1e6, 0.5], [-0.3, -1e6], [25.3, -7.1]]
    grid = grid.astype(dtype)
    xt, gt = dn.tensor(x, requires_grad=True), dn.tensor(grid, requires_grad=True)
    out = ops.grid_sample(xt, gt, "bilinear", padding_mode, align_corners)
    go = rng.standard_normal(out.shape).astype(dtype)
    out.backward(go)
    tx, tg = torch.tensor(x, requires_grad=True), torch.tensor(grid, requires_grad=True)
    tout = torch.nn.functional.grid_sample(tx, tg, "bilinear", padding_mode, align_corners)
    tout.backward(torch.tensor(go))
    tol = 1e-12 if dtype == np.float64 else 1e-5
    assert rel_err(out.numpy(), tout.detach().numpy()) < tol
    assert rel_err(xt.grad, tx.grad.numpy()) < tol
    assert rel_err(gt.grad, tg.grad.numpy()) < (tol if dtype == np.float64 else 1e-4)
