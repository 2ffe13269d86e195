"""ps_roi_align and ps_roi_pool (docs/ops/roi.rst): naive reference, gradcheck, edge cases, property
tests, torchvision parity (and the documented ps_roi_pool difference at the last row and column)."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from reference import roi as ref

import deformnp as dn
from deformnp import ops
from deformnp.cases import check_cases
from deformnp.kernels.roi_geometry import pool_bins

B, H, W = 2, 7, 9
PH, PW = 2, 3
CIN = 2 * PH * PW  # two output channels


# ------------------------------------------------------------------ matches the reference


@pytest.mark.parametrize("ratio", [-1, 0, 1, 2])
def test_ps_roi_align_matches_reference(rng, ratio):
    x = rng.standard_normal((B, CIN, H, W))
    boxes = ref.random_boxes(rng, 8, B, H, W, scale=0.5)
    out = ops.ps_roi_align(x, boxes, (PH, PW), 0.5, ratio)
    assert isinstance(out, dn.Tensor) and out.shape == (8, 2, PH, PW)
    expected = ref.ps_roi_align(x, boxes, PH, PW, 0.5, ratio)
    np.testing.assert_allclose(out.numpy(), expected, rtol=1e-12, atol=1e-12)
    grad = rng.standard_normal(out.shape)
    (g,) = ops.ps_roi_align_backward(grad, x.shape, boxes, (PH, PW), 0.5, ratio)
    expected_g = ref.ps_roi_align_grad(x.shape, boxes, grad, PH, PW, 0.5, ratio)
    np.testing.assert_allclose(g, expected_g, rtol=1e-12, atol=1e-12)


def test_ps_roi_pool_matches_reference(rng):
    x = rng.standard_normal((B, CIN, H, W))
    boxes = ref.random_boxes(rng, 8, B, H, W, scale=0.5)
    out = ops.ps_roi_pool(x, boxes, (PH, PW), 0.5)
    assert isinstance(out, dn.Tensor) and out.shape == (8, 2, PH, PW)
    np.testing.assert_allclose(
        out.numpy(), ref.ps_roi_pool(x, boxes, PH, PW, 0.5), rtol=1e-12, atol=1e-12
    )
    grad = rng.standard_normal(out.shape)
    (g,) = ops.ps_roi_pool_backward(grad, x.shape, boxes, (PH, PW), 0.5)
    expected_g = ref.ps_roi_pool_grad(x.shape, boxes, grad, PH, PW, 0.5)
    np.testing.assert_allclose(g, expected_g, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_channel_blocks_match_single_channels(rng, dtype):
    """The CPU kernels handle eight output channels at a time (then one by one): every output
    channel, and its planes' gradient, is bit-identical to the op on that channel's planes
    alone (the one-by-one path), for both ops, forward and backward."""
    cout, ph, pw, h, w = 9, 2, 3, 11, 13
    nb = ph * pw
    x = rng.standard_normal((B, cout * nb, h, w)).astype(dtype)
    boxes = ref.random_boxes(rng, 40, B, h, w, scale=0.5).astype(dtype)
    grad = rng.standard_normal((40, cout, ph, pw)).astype(dtype)
    for fwd, bwd, args in (
        (ops.ps_roi_align_forward, ops.ps_roi_align_backward, (0.5, 2)),
        (ops.ps_roi_pool_forward, ops.ps_roi_pool_backward, (0.5,)),
    ):
        out = fwd(x, boxes, (ph, pw), *args)
        (g,) = bwd(grad, x.shape, boxes, (ph, pw), *args)
        for co in range(cout):
            xc = np.ascontiguousarray(x[:, co * nb : (co + 1) * nb])
            oc = fwd(xc, boxes, (ph, pw), *args)
            (gc,) = bwd(
                np.ascontiguousarray(grad[:, co : co + 1]), xc.shape, boxes, (ph, pw), *args
            )
            np.testing.assert_array_equal(np.asarray(out)[:, co : co + 1], np.asarray(oc))
            np.testing.assert_array_equal(g[:, co * nb : (co + 1) * nb], gc)


def _check_ps_roi_pool_channels(x, boxes, grad, ph, pw, dtype):
    """ps_roi_pool's output and input gradient (spatial_scale 1): every output channel and its
    planes' gradient bit-identical to the op on that channel's planes alone, and both equal to
    the naive reference."""
    nb = ph * pw
    out = np.asarray(ops.ps_roi_pool_forward(x, boxes, (ph, pw), 1.0))
    (g,) = ops.ps_roi_pool_backward(grad, x.shape, boxes, (ph, pw), 1.0)
    for co in range(grad.shape[1]):
        xc = np.ascontiguousarray(x[:, co * nb : (co + 1) * nb])
        oc = ops.ps_roi_pool_forward(xc, boxes, (ph, pw), 1.0)
        (gc,) = ops.ps_roi_pool_backward(
            np.ascontiguousarray(grad[:, co : co + 1]), xc.shape, boxes, (ph, pw), 1.0
        )
        np.testing.assert_array_equal(out[:, co : co + 1], np.asarray(oc))
        np.testing.assert_array_equal(g[:, co * nb : (co + 1) * nb], gc)
    tol = 1e-12 if dtype == np.float64 else 1e-5
    expected = ref.ps_roi_pool(x, boxes, ph, pw, 1.0, dtype)
    np.testing.assert_allclose(out, expected, rtol=tol, atol=tol)
    expected_g = ref.ps_roi_pool_grad(x.shape, boxes, grad, ph, pw, 1.0, dtype)
    np.testing.assert_allclose(g, expected_g, rtol=tol, atol=tol)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_ps_roi_pool_narrow_bins_through_the_buffer(rng, dtype):
    """Many narrow bins on a small map, so that both kernels go through their pixel-major buffer
    for every task (the backward's rule: bins covering at least H*W/2 pixels in all, at most 8
    pixels wide on average): every channel equals the op on that channel alone (the plane by
    plane path) bit for bit, and the reference."""
    cout, ph, pw, h, w, K = 9, 2, 2, 12, 12, 120
    nb = ph * pw
    x = rng.standard_normal((B, cout * nb, h, w)).astype(dtype)
    x1, y1 = rng.uniform(0, w - 6, K), rng.uniform(0, h - 6, K)
    sides = rng.uniform(2, 6, (2, K))
    boxes = np.stack([rng.integers(0, B, K), x1, y1, x1 + sides[0], y1 + sides[1]], axis=1)
    boxes = boxes.astype(dtype)
    batch, hs, he, ws, we = pool_bins("ps_roi_pool", boxes, (ph, pw), 1.0, h, w, dtype)
    for b in range(B):
        for i in range(ph):
            for j in range(pw):
                dh = (he[:, i] - hs[:, i])[batch == b]
                dw = (we[:, j] - ws[:, j])[batch == b]
                live = (dh > 0) & (dw > 0)
                pixels, rows = (dh * dw)[live].sum(), dh[live].sum()
                assert 2 * pixels >= h * w and pixels <= 8 * rows
    grad = rng.standard_normal((K, cout, ph, pw)).astype(dtype)
    _check_ps_roi_pool_channels(x, boxes, grad, ph, pw, dtype)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_ps_roi_pool_large_map_reads_planes_in_place(rng, dtype):
    """On a map whose pixel-major copy of eight planes would exceed PS_BUFFER_BYTES the kernels
    read (and add into) the planes in place: the same results bit for bit as one channel at a
    time, and the reference's."""
    from deformnp.kernels.cpu import roi as cpu_roi

    cout, ph, pw, h, w = 9, 1, 2, 150, 230
    assert h * w * cpu_roi.PS_LANES * np.dtype(dtype).itemsize > cpu_roi.PS_BUFFER_BYTES
    nb = ph * pw
    x = rng.standard_normal((B, cout * nb, h, w)).astype(dtype)
    boxes = ref.random_boxes(rng, 12, B, h, w, scale=1.0).astype(dtype)
    grad = rng.standard_normal((12, cout, ph, pw)).astype(dtype)
    _check_ps_roi_pool_channels(x, boxes, grad, ph, pw, dtype)


def test_float32(rng):
    x = rng.standard_normal((B, CIN, H, W)).astype(np.float32)
    boxes = ref.random_boxes(rng, 6, B, H, W, dtype=np.float32)
    b64 = boxes.astype(np.float64)
    a = ops.ps_roi_align_forward(x, boxes, (PH, PW), 1.0, 2)
    p = ops.ps_roi_pool_forward(x, boxes, (PH, PW), 1.0)
    assert a.dtype == p.dtype == np.float32
    np.testing.assert_allclose(a, ref.ps_roi_align(x, b64, PH, PW, 1.0, 2), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(
        p, ref.ps_roi_pool(x, boxes, PH, PW, 1.0, np.float32), rtol=1e-5, atol=1e-5
    )
    grad = rng.standard_normal(a.shape).astype(np.float32)
    (ga,) = ops.ps_roi_align_backward(grad, x.shape, boxes, (PH, PW), 1.0, 2)
    (gp,) = ops.ps_roi_pool_backward(grad, x.shape, boxes, (PH, PW), 1.0)
    assert ga.dtype == gp.dtype == np.float32
    np.testing.assert_allclose(
        ga, ref.ps_roi_align_grad(x.shape, b64, grad, PH, PW, 1.0, 2), rtol=1e-5, atol=1e-5
    )
    np.testing.assert_allclose(
        gp,
        ref.ps_roi_pool_grad(x.shape, boxes, grad, PH, PW, 1.0, np.float32),
        rtol=1e-5,
        atol=1e-5,
    )


def test_autograd_matches_array_level(rng):
    x = dn.tensor(rng.standard_normal((B, CIN, H, W)), requires_grad=True)
    boxes = ref.random_boxes(rng, 5, B, H, W)
    for fwd, bwd, op, extra in [
        (ops.ps_roi_align_forward, ops.ps_roi_align_backward, ops.ps_roi_align, (2,)),
        (ops.ps_roi_pool_forward, ops.ps_roi_pool_backward, ops.ps_roi_pool, ()),
    ]:
        x.grad = None
        out = op(x, boxes, (PH, PW), 1.0, *extra)
        grad = rng.standard_normal(out.shape)
        out.backward(grad)
        np.testing.assert_array_equal(out.numpy(), fwd(x.data, boxes, (PH, PW), 1.0, *extra))
        np.testing.assert_array_equal(
            x.grad, bwd(grad, x.data.shape, boxes, (PH, PW), 1.0, *extra)[0]
        )


def _dense_taps(n, si, sw, H, W):
    dense = np.zeros(H * W)
    np.add.at(dense, si[:n], sw[:n])
    return dense


@pytest.mark.parametrize("ratio", [0, 1, 2, 3])
def test_bin_taps_are_the_clamp_rule_samples(rng, ratio):
    """ps_roi_align's taps, built from a bin's rows and columns (``ps_axes``' runs, combined by
    ``_ps_bin_taps``), are the taps of its samples' 2-D clamp plans (``_align_bin``) up to
    float64 rounding: the same pixels with the same summed weights, each pixel once and none of
    zero weight, each run within its slot and each bin within the scratch size ``ps_axes``
    returns. Boxes partly or wholly off the map, tiny, reversed (x2 < x1: ps_roi_align has no
    minimum size), on whole and half pixels (integer coordinates: zero-weight corners), larger
    than the map."""
    from deformnp.kernels.cpu.roi import _align_bin, _ps_bin_taps, ps_axes
    from deformnp.kernels.roi_geometry import align_geometry

    h, w, ph, pw = 6, 8, 3, 2
    boxes = np.concatenate(
        [
            ref.random_boxes(rng, 40, 1, h, w, scale=0.5),
            [[0, 4.0, 2.0, 10.0, 8.0], [0, 3.0, 3.0, 5.0, 5.0], [0, -9.0, -9.0, 40.0, 40.0]],
            [[0, 12.0, 6.0, 2.0, 1.0], [0, 5.0, 5.0, 5.0, 5.0], [0, 1.0, 1.0, 16.0, 12.0]],
        ]
    )
    fgeo, igeo = align_geometry("ps_roi_align", boxes, (ph, pw), 0.5, ratio, True)
    axes, cap = ps_axes(fgeo, igeo, (ph, pw), h, w)
    rs, _, _, rn, cs, _, _, cn = axes
    assert np.all(rn <= np.diff(rs)) and np.all(cn <= np.diff(cs))
    assert np.all(np.diff(rs) <= h) and np.all(np.diff(cs) <= w)
    si, sw = np.empty(cap, np.int64), np.empty(cap)
    big = 4 * max(1, int(igeo[:, 1].max())) * max(1, int(igeo[:, 2].max()))
    ai, aw = np.empty(big, np.int64), np.empty(big)
    slot, off, none = np.empty(32, np.int64), np.zeros((1, 2, 1, 1)), np.zeros(1)
    seen = 0
    for k in range(len(boxes)):
        count = max(int(igeo[k, 1] * igeo[k, 2]), 1)
        for i in range(ph):
            for j in range(pw):
                n = _ps_bin_taps(igeo, k, i, j, ph, pw, w, axes, si, sw)
                m = _align_bin(fgeo, igeo, off, False, k, i, j, h, w, False, slot, ai, aw, none, none)  # fmt: skip
                assert n <= cap
                assert len(set(si[:n].tolist())) == n and np.all(sw[:n] != 0.0)
                expected = _dense_taps(m, ai, aw, h, w) / count
                np.testing.assert_allclose(
                    _dense_taps(n, si, sw, h, w), expected, rtol=1e-14, atol=1e-300
                )
                assert set(si[:n].tolist()) == set(np.flatnonzero(expected).tolist())
                seen += n
    assert seen > 0


# ------------------------------------------------------------------ gradcheck


@pytest.mark.parametrize(
    "case", check_cases("ps_roi_align") + check_cases("ps_roi_pool"), ids=lambda c: c.op
)
def test_gradcheck_input(case):
    # the check table's cases: both ops are linear in the input, no kinks, any boxes will do
    assert dn.gradcheck(case.fn, case.inputs(), names=case.names)


# ------------------------------------------------------------------ edge cases


def test_no_boxes_and_boxes_outside(rng):
    x = rng.standard_normal((1, CIN, H, W))
    assert ops.ps_roi_align_forward(x, np.zeros((0, 5)), (PH, PW)).shape == (0, 2, PH, PW)
    assert ops.ps_roi_pool_forward(x, [], (PH, PW)).shape == (0, 2, PH, PW)
    boxes = np.array([[0, 40.0, 40, 60, 60], [0, -30, -30, -12, -12], [0, np.nan, 0, 3, 3]])
    for fwd, bwd in [
        (ops.ps_roi_align_forward, ops.ps_roi_align_backward),
        (ops.ps_roi_pool_forward, ops.ps_roi_pool_backward),
    ]:
        out = fwd(x, boxes, (PH, PW))
        np.testing.assert_array_equal(out, 0.0)
        np.testing.assert_array_equal(bwd(np.ones_like(out), x.shape, boxes, (PH, PW))[0], 0.0)


def test_ps_roi_align_empty_grid_is_zero(rng):
    # an inverted box has an empty adaptive grid: 0 (torchvision divides 0 by 0)
    x = rng.standard_normal((1, CIN, H, W))
    out = ops.ps_roi_align_forward(x, np.array([[0, 5.0, 5, 2, 2]]), (PH, PW), 1.0, -1)
    np.testing.assert_array_equal(out, 0.0)


# ------------------------------------------------------------------ property tests


@given(st.data())
def test_property_matches_reference(data):
    rng = np.random.default_rng(data.draw(st.integers(0, 2**32 - 1)))
    b = data.draw(st.integers(1, 2))
    h, w = data.draw(st.integers(1, 6)), data.draw(st.integers(1, 6))
    ph, pw = data.draw(st.integers(1, 3)), data.draw(st.integers(1, 3))
    cout = data.draw(st.integers(1, 2))
    k = data.draw(st.integers(0, 4))
    ratio = data.draw(st.integers(-1, 3))
    scale = data.draw(st.sampled_from([0.5, 1.0, 1.7]))
    x = rng.standard_normal((b, cout * ph * pw, h, w))
    boxes = ref.random_boxes(rng, k, b, h, w, scale)
    a = ops.ps_roi_align_forward(x, boxes, (ph, pw), scale, ratio)
    np.testing.assert_allclose(
        a, ref.ps_roi_align(x, boxes, ph, pw, scale, ratio), rtol=1e-12, atol=1e-12
    )
    p = ops.ps_roi_pool_forward(x, boxes, (ph, pw), scale)
    np.testing.assert_allclose(p, ref.ps_roi_pool(x, boxes, ph, pw, scale), rtol=1e-12, atol=1e-12)
    grad = rng.standard_normal(a.shape)
    np.testing.assert_allclose(
        ops.ps_roi_align_backward(grad, x.shape, boxes, (ph, pw), scale, ratio)[0],
        ref.ps_roi_align_grad(x.shape, boxes, grad, ph, pw, scale, ratio),
        rtol=1e-12,
        atol=1e-12,
    )
    np.testing.assert_allclose(
        ops.ps_roi_pool_backward(grad, x.shape, boxes, (ph, pw), scale)[0],
        ref.ps_roi_pool_grad(x.shape, boxes, grad, ph, pw, scale),
        rtol=1e-12,
        atol=1e-12,
    )


# ------------------------------------------------------------------ torchvision parity


@pytest.mark.torch
@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize("ratio", [-1, 2])
def test_torchvision_ps_roi_align_parity(rng, dtype, ratio):
    torch = pytest.importorskip("torch")
    tvo = pytest.importorskip("torchvision.ops")
    x = rng.standard_normal((2, 3 * PH * PW, 11, 13)).astype(dtype)
    boxes = ref.random_boxes(rng, 24, 2, 11, 13, scale=0.25, dtype=dtype)
    keep = (boxes[:, 3] > boxes[:, 1]) & (boxes[:, 4] > boxes[:, 2])  # torchvision: 0/0 = NaN
    boxes = boxes[keep] if ratio <= 0 else boxes
    tx = torch.from_numpy(x).requires_grad_(True)
    expected = tvo.ps_roi_align(tx, torch.from_numpy(boxes), (PH, PW), 0.25, ratio)
    out = ops.ps_roi_align_forward(x, boxes, (PH, PW), 0.25, ratio)
    tol = 1e-12 if dtype == np.float64 else 1e-5
    np.testing.assert_allclose(out, expected.detach().numpy(), rtol=tol, atol=tol)
    grad = rng.standard_normal(out.shape).astype(dtype)
    (tg,) = torch.autograd.grad(expected, tx, torch.from_numpy(grad))
    (g,) = ops.ps_roi_align_backward(grad, x.shape, boxes, (PH, PW), 0.25, ratio)
    np.testing.assert_allclose(g, tg.numpy(), rtol=tol, atol=tol)


@pytest.mark.torch
@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize("cout", [3, 11])  # 11: eight channels pixel-major, then three alone
def test_torchvision_ps_roi_pool_parity(rng, dtype, cout):
    torch = pytest.importorskip("torch")
    tvo = pytest.importorskip("torchvision.ops")
    h, w, s = 11, 13, 0.5
    x = rng.standard_normal((2, cout * PH * PW, h, w)).astype(dtype)
    tx = torch.from_numpy(x).requires_grad_(True)
    # boxes whose bins stay off the last row and column: there the two agree exactly
    K = 20
    x1 = rng.uniform(0, 10, K)
    y1 = rng.uniform(0, 8, K)
    boxes = np.stack(
        [
            rng.integers(0, 2, K),
            x1,
            y1,
            rng.uniform(x1, 2 * (w - 2) - 1),
            rng.uniform(y1, 2 * (h - 2) - 1),
        ],
        axis=1,
    ).astype(dtype)
    expected = tvo.ps_roi_pool(tx, torch.from_numpy(boxes), (PH, PW), s)
    out = ops.ps_roi_pool_forward(x, boxes, (PH, PW), s)
    tol = 1e-12 if dtype == np.float64 else 1e-5
    np.testing.assert_allclose(out, expected.detach().numpy(), rtol=tol, atol=tol)
    grad = rng.standard_normal(out.shape).astype(dtype)
    (tg,) = torch.autograd.grad(expected, tx, torch.from_numpy(grad))
    (g,) = ops.ps_roi_pool_backward(grad, x.shape, boxes, (PH, PW), s)
    # the backward adds g / area in the data dtype in torchvision's order (RoI by RoI): the
    # same gradient bit for bit, in float32 too, where the RoIs overlap
    np.testing.assert_array_equal(g, tg.numpy())


@pytest.mark.torch
def test_torchvision_ps_roi_pool_last_row_difference(rng):
    # torchvision's forward clips the bins to H-1 and W-1 (the last row and column are never
    # pooled) while its backward clips to H and W; deformnp uses H and W in both, so its forward
    # differs from torchvision's exactly in the bins that reach the last row or column, and its
    # backward equals torchvision's
    torch = pytest.importorskip("torch")
    tvo = pytest.importorskip("torchvision.ops")
    x = rng.standard_normal((1, PH * PW, 6, 6))
    boxes = np.array([[0, 0.0, 0.0, 6.0, 6.0]])
    tx = torch.from_numpy(x).requires_grad_(True)
    expected = tvo.ps_roi_pool(tx, torch.from_numpy(boxes), (PH, PW), 1.0)
    out = ops.ps_roi_pool_forward(x, boxes, (PH, PW), 1.0)
    # bins of the last bin row / column reach row 5 / column 5
    last = np.zeros((PH, PW), bool)
    last[-1, :] = last[:, -1] = True
    np.testing.assert_allclose(out[0, 0][~last], expected.detach().numpy()[0, 0][~last], rtol=1e-12)
    assert np.all(out[0, 0][last] != expected.detach().numpy()[0, 0][last])
    grad = rng.standard_normal(out.shape)
    (tg,) = torch.autograd.grad(expected, tx, torch.from_numpy(grad))
    np.testing.assert_allclose(
        ops.ps_roi_pool_backward(grad, x.shape, boxes, (PH, PW), 1.0)[0], tg.numpy(), rtol=1e-12
    )
