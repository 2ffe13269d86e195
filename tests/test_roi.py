"""The RoI pooling family as a whole: every validation message, determinism across thread counts,
C rounding, the layers of deformnp.nn (torchvision's and mmcv's), and the check and bench tables
of the command line."""

from __future__ import annotations

import numba
import numpy as np
import pytest
from reference import roi as ref

import deformnp as dn
from deformnp import nn, ops
from deformnp.kernels import roi_geometry
from deformnp.kernels.cpu import sampling

X = np.zeros((2, 4, 6, 7))
BOX = np.array([[0, 1.0, 1.0, 4.0, 4.0], [1, 0.0, 0.5, 3.0, 5.0]])


# ------------------------------------------------------------------ validation messages


@pytest.mark.parametrize("op", [ops.roi_align, ops.roi_pool, ops.ps_roi_align, ops.ps_roi_pool])
def test_box_and_input_validation(op):
    name = op.__name__
    with pytest.raises(
        ValueError, match=rf"{name}: input must be 4-d \(N, C, H, W\), got shape \(4, 6, 7\)"
    ):
        op(X[0], BOX, 2)
    with pytest.raises(TypeError, match=rf"{name}: input must be float32 or float64, got int64"):
        op(X.astype(np.int64), BOX, 2)
    with pytest.raises(
        ValueError, match=rf"{name}: boxes must be a \(K, 5\) array .* got shape \(2, 4\)"
    ):
        op(X, BOX[:, 1:], 2)
    with pytest.raises(ValueError, match=r"got shape \(5,\)"):
        op(X, BOX[0], 2)
    with pytest.raises(
        TypeError,
        match=rf"{name}: boxes must be a \(K, 5\) array or a list of \(L, 4\) arrays, got None",
    ):
        op(X, None, 2)
    with pytest.raises(
        TypeError,
        match=rf"{name}: inputs must share one float dtype, got input float64, boxes float32",
    ):
        op(X, BOX.astype(np.float32), 2)
    with pytest.raises(TypeError, match=rf"{name}: boxes must be float32 or float64, got int64"):
        op(X, BOX.astype(np.int64), 2)
    with pytest.raises(
        ValueError,
        match=rf"{name}: boxes\[1\] must be an \(L, 4\) array of \(x1, y1, x2, y2\) for image 1, got shape \(1, 5\)",
    ):
        op(X, [BOX[:1, 1:], BOX[1:]], 2)
    with pytest.raises(TypeError, match=r"boxes\[0\] float32"):
        op(X, [BOX[:1, 1:].astype(np.float32)], 2)


@pytest.mark.parametrize("op", [ops.roi_align, ops.roi_pool, ops.ps_roi_align, ops.ps_roi_pool])
def test_batch_index_validation(op):
    name = op.__name__
    for bad, shown in [(2.0, "2.0"), (-1.0, "-1.0"), (0.5, "0.5"), (np.nan, "nan")]:
        boxes = BOX.copy()
        boxes[1, 0] = bad
        with pytest.raises(
            ValueError,
            match=rf"{name}: boxes\[1, 0\] = {shown} is not a batch index of input \(batch size 2\): expected an integer in \[0, 1\]",
        ):
            op(X, boxes, 2)
    with pytest.raises(
        ValueError, match=rf"{name}: box 1 \(of the list form, image 2\) is not a batch index"
    ):
        op(X, [np.zeros((1, 4)), np.zeros((0, 4)), np.zeros((1, 4))], 2)
    with pytest.raises(ValueError, match=rf"{name}: boxes\[0, 0\] .* the input has batch size 0"):
        op(np.zeros((0, 4, 6, 7)), BOX[:1], 2)


@pytest.mark.parametrize("op", [ops.roi_align, ops.roi_pool, ops.ps_roi_align, ops.ps_roi_pool])
def test_parameter_validation(op):
    name = op.__name__
    with pytest.raises(ValueError, match=rf"{name}: output_size must be >= 1, got 0"):
        op(X, BOX, 0)
    with pytest.raises(
        ValueError, match=rf"{name}: output_size must be an int or a pair of ints, got \(1, 2, 3\)"
    ):
        op(X, BOX, (1, 2, 3))
    with pytest.raises(
        TypeError, match=rf"{name}: output_size must be an int or a pair of ints, got 2.5"
    ):
        op(X, BOX, 2.5)
    with pytest.raises(TypeError, match=rf"{name}: spatial_scale must be a real number, got 'a'"):
        op(X, BOX, 2, "a")
    with pytest.raises(ValueError, match=rf"{name}: spatial_scale must be finite, got inf"):
        op(X, BOX, 2, np.inf)


@pytest.mark.parametrize("op", [ops.roi_align, ops.ps_roi_align])
def test_sampling_ratio_validation(op):
    name = op.__name__
    with pytest.raises(TypeError, match=rf"{name}: sampling_ratio must be an int, got 1.5"):
        op(X, BOX, 2, 1.0, 1.5)
    with pytest.raises(
        ValueError,
        match=rf"{name}: box 1 needs about .* samples per bin with sampling_ratio <= 0 \(adaptive\), more than 16777216; pass a positive sampling_ratio",
    ):
        op(X, np.array([[0, 0.0, 0, 1, 1], [0, 0, 0, 1e5, 1e5]]), 2, 1.0, 0)
    op(X, np.array([[0, 0, 0, 1e5, 1e5]]), 2, 1.0, 2)  # fine with a fixed grid


@pytest.mark.parametrize("op", [ops.ps_roi_align, ops.ps_roi_pool])
def test_position_sensitive_channel_count(op):
    with pytest.raises(
        ValueError,
        match=rf"{op.__name__}: input has 4 channels, expected a multiple of output_size\[0\]\*output_size\[1\] = 6",
    ):
        op(X, BOX, (2, 3))


def test_backward_validation():
    with pytest.raises(
        ValueError, match=r"roi_align: grad_out must have shape \(2, 4, 2, 2\), got \(2, 4, 3, 3\)"
    ):
        ops.roi_align_backward(np.zeros((2, 4, 3, 3)), X.shape, BOX, 2)
    with pytest.raises(
        TypeError,
        match=r"roi_align: inputs must share one float dtype, got grad_out float32, boxes float64",
    ):
        ops.roi_align_backward(np.zeros((2, 4, 2, 2), np.float32), X.shape, BOX, 2)
    with pytest.raises(ValueError, match=r"roi_align: input_shape must be 4 non-negative ints"):
        ops.roi_align_backward(np.zeros((2, 4, 2, 2)), (2, 4, 5), BOX, 2)
    with pytest.raises(
        TypeError, match=r"roi_align: input_shape must be the input's shape .* pass"
    ):
        ops.roi_align_backward(np.zeros((2, 4, 2, 2)), X, BOX, 2)
    with pytest.raises(TypeError, match=r"roi_pool: roi_pool_backward needs the forward's argmax"):
        ops.roi_pool_backward(np.zeros((2, 4, 2, 2)), X.shape, BOX, 2)
    with pytest.raises(ValueError, match=r"ps_roi_pool: grad_out must have shape \(2, 1, 2, 2\)"):
        ops.ps_roi_pool_backward(np.zeros((2, 4, 2, 2)), X.shape, BOX, 2)
    with pytest.raises(
        ValueError, match=r"roi_pool: argmax must have shape \(2, 4, 2, 2\), got \(2, 4\)"
    ):
        ops.roi_pool_backward(
            np.zeros((2, 4, 2, 2)), X.shape, BOX, 2, argmax=np.zeros((2, 4), np.int32)
        )
    with pytest.raises(
        ValueError, match=r"deform_roi_pool: grad_out must have shape \(2, 4, 7, 7\)"
    ):
        ops.deform_roi_pool_backward(np.zeros((2, 4, 2, 2)), X, BOX)
    with pytest.raises(
        ValueError, match=r"deform_ps_roi_pool: grad_out must have shape \(2, 1, 2, 2\)"
    ):
        ops.deform_ps_roi_pool_backward(np.zeros((2, 4, 2, 2)), X, BOX, None, 1.0, 1, 2, 2)


def test_deform_roi_pool_validation():
    with pytest.raises(
        ValueError,
        match=r"deform_roi_pool: offset must have shape \(K, 2, PH, PW\) = \(2, 2, 3, 3\) \(channel 0 x, 1 y\), got \(2, 2, 2, 2\)",
    ):
        ops.deform_roi_pool(X, BOX, np.zeros((2, 2, 2, 2)), 3)
    with pytest.raises(
        TypeError,
        match=r"deform_roi_pool: inputs must share one float dtype, got input float64, offset float32",
    ):
        ops.deform_roi_pool(X, BOX, np.zeros((2, 2, 3, 3), np.float32), 3)
    with pytest.raises(TypeError, match=r"deform_roi_pool: gamma must be a real number, got None"):
        ops.deform_roi_pool(X, BOX, None, 3, 1.0, 0, None)
    with pytest.raises(
        ValueError, match=r"deform_roi_pool: boxes\[1, 0\] = 9.0 is not a batch index"
    ):
        ops.deform_roi_pool(X, BOX * [9, 1, 1, 1, 1], None, 3)


def test_deform_ps_roi_pool_validation():
    f = ops.deform_ps_roi_pool
    with pytest.raises(
        ValueError,
        match=r"deform_ps_roi_pool: input has 4 channels, expected output_dim\*group_size\*group_size = 2\*2\*2 = 8",
    ):
        f(X, BOX, None, 1.0, 2, 2, 3)
    with pytest.raises(
        ValueError,
        match=r"deform_ps_roi_pool: offset must have shape \(K, 2\*num_classes, part_size, part_size\) = \(2, 2\*num_classes, 3, 3\), got \(2, 2, 2, 2\)",
    ):
        f(X, BOX, np.zeros((2, 2, 2, 2)), 1.0, 1, 2, 3)
    with pytest.raises(
        ValueError,
        match=r"deform_ps_roi_pool: offset has 3 channels; expected 2\*num_classes with num_classes dividing output_dim = 1",
    ):
        f(X, BOX, np.zeros((2, 3, 3, 3)), 1.0, 1, 2, 3)
    with pytest.raises(
        ValueError,
        match=r"offset has 4 channels; expected 2\*num_classes with num_classes dividing output_dim = 1",
    ):
        f(X, BOX, np.zeros((2, 4, 3, 3)), 1.0, 1, 2, 3)
    with pytest.raises(TypeError, match=r"deform_ps_roi_pool: inputs must share one float dtype"):
        f(X, BOX, np.zeros((2, 2, 3, 3), np.float32), 1.0, 1, 2, 3)
    for name, args in [
        ("output_dim", (0, 2, 3)),
        ("group_size", (1, 0, 3)),
        ("pooled_size", (1, 2, 0)),
    ]:
        with pytest.raises(ValueError, match=rf"deform_ps_roi_pool: {name} must be >= 1, got 0"):
            f(X, BOX, None, 1.0, *args)
    with pytest.raises(ValueError, match=r"deform_ps_roi_pool: part_size must be >= 1, got -1"):
        f(X, BOX, None, 1.0, 1, 2, 3, -1)
    with pytest.raises(
        ValueError, match=r"deform_ps_roi_pool: sample_per_part must be >= 1, got 0"
    ):
        f(X, BOX, None, 1.0, 1, 2, 3, None, 0)
    with pytest.raises(
        TypeError, match=r"deform_ps_roi_pool: trans_std must be a real number, got '0.1'"
    ):
        f(X, BOX, None, 1.0, 1, 2, 3, None, 4, "0.1")
    with pytest.raises(TypeError, match=r"deform_ps_roi_pool: output_dim must be an int, got 1.0"):
        f(X, BOX, None, 1.0, 1.0, 2, 3)
    # part_size 0 means pooled_size, as in Deformable-ConvNets
    a = f(X, BOX, np.zeros((2, 2, 3, 3)), 1.0, 1, 2, 3, 0).numpy()
    np.testing.assert_array_equal(a, f(X, BOX, np.zeros((2, 2, 3, 3)), 1.0, 1, 2, 3).numpy())


# ------------------------------------------------------------------ determinism


def _all_backwards(rng):
    x = rng.standard_normal((2, 64, 16, 16)).astype(np.float32)
    boxes = ref.random_boxes(rng, 48, 2, 16, 16, 0.5, np.float32)
    g7 = rng.standard_normal((48, 64, 7, 7)).astype(np.float32)
    off = rng.uniform(-1, 1, (48, 2, 7, 7)).astype(np.float32)
    xps = rng.standard_normal((2, 2 * 49, 16, 16)).astype(np.float32)
    gps = rng.standard_normal((48, 2, 7, 7)).astype(np.float32)
    return [
        ops.roi_align_backward(g7, x.shape, boxes, 7, 0.5, -1, True)[0],
        ops.roi_pool_backward(
            g7, x.shape, boxes, 7, 0.5, argmax=ops.roi_pool_forward(x, boxes, 7, 0.5, True)[1]
        )[0],
        *ops.deform_roi_pool_backward(g7, x, boxes, off, 7, 0.5, 2, 0.1),
        ops.ps_roi_align_backward(gps, xps.shape, boxes, 7, 0.5, 2)[0],
        ops.ps_roi_pool_backward(gps, xps.shape, boxes, 7, 0.5)[0],
        *ops.deform_ps_roi_pool_backward(
            gps, xps, boxes, off[:, :, :7, :7], 0.5, 2, 7, 7, None, 2, 0.1
        ),
    ]


def test_backward_is_bit_identical_with_any_thread_count(monkeypatch):
    monkeypatch.setattr(sampling, "SERIAL_WORK", 0)  # use the parallel path even here
    prev = numba.get_num_threads()
    try:
        results = []
        for n in sorted({1, min(2, numba.config.NUMBA_NUM_THREADS)}):
            numba.set_num_threads(n)
            results.append(_all_backwards(np.random.default_rng(7)))
        results.append(_all_backwards(np.random.default_rng(7)))  # and run to run
    finally:
        numba.set_num_threads(prev)
    for other in results[1:]:
        for a, b in zip(results[0], other):
            assert a.tobytes() == b.tobytes()


# ------------------------------------------------------------------ C rounding


def test_c_round_is_half_away_from_zero():
    v = np.array([0.5, 1.5, 2.5, -0.5, -2.5, 0.49999999999999994, -0.49999999999999994, 2.4, -7.6])
    np.testing.assert_array_equal(roi_geometry.c_round(v), [1, 2, 3, -1, -3, 0, 0, 2, -8])
    assert np.isnan(roi_geometry.c_round(np.array([np.nan])))[0]


def test_roi_pool_rounds_half_away_from_zero():
    # x1*s = 2.5 starts at column 3 (numpy's round would give 2), x1*s = -0.5 at -1
    x = np.arange(10.0)[None, None, None, :].repeat(2, axis=2)
    boxes = np.array([[0, 2.5, 0, 8, 1], [0, -0.5, 0, 4.5, 1]])
    out, argmax = ops.roi_pool_forward(-x, boxes, (1, 1), 1.0, return_argmax=True)
    assert argmax[0, 0, 0, 0] == 3 and argmax[1, 0, 0, 0] == 0


# ------------------------------------------------------------------ layers


def test_torchvision_layers(rng):
    x = rng.standard_normal((2, 8, 6, 7))
    np.testing.assert_array_equal(
        nn.RoIAlign(2, 0.5, 2, aligned=True)(x, BOX).numpy(),
        ops.roi_align(x, BOX, 2, 0.5, 2, True).numpy(),
    )
    np.testing.assert_array_equal(
        nn.RoIPool((2, 1), 0.5)(x, BOX).numpy(), ops.roi_pool(x, BOX, (2, 1), 0.5).numpy()
    )
    np.testing.assert_array_equal(
        nn.PSRoIAlign(2, 0.5, -1)(x, BOX).numpy(), ops.ps_roi_align(x, BOX, 2, 0.5, -1).numpy()
    )
    np.testing.assert_array_equal(
        nn.PSRoIPool(2, 1.0)(x, BOX).numpy(), ops.ps_roi_pool(x, BOX, 2, 1.0).numpy()
    )
    assert list(nn.RoIAlign(2, 0.5, 2).named_parameters()) == []
    assert "sampling_ratio=2" in repr(nn.RoIAlign(2, 0.5, 2))


def test_deform_roi_pool_layer(rng):
    x = rng.standard_normal((2, 4, 6, 7))
    off = rng.uniform(-1, 1, (2, 2, 3, 3))
    layer = nn.DeformRoIPool(3, 0.5, 2, 0.2)
    assert layer.output_size == (3, 3)
    np.testing.assert_array_equal(
        layer(x, BOX, off).numpy(), ops.deform_roi_pool(x, BOX, off, 3, 0.5, 2, 0.2).numpy()
    )
    np.testing.assert_array_equal(
        layer(x, BOX).numpy(), ops.deform_roi_pool(x, BOX, None, 3, 0.5, 2, 0.2).numpy()
    )


def test_deform_roi_pool_pack(rng):
    x = dn.tensor(rng.standard_normal((2, 4, 6, 7)), requires_grad=True)
    layer = nn.DeformRoIPoolPack(
        (3, 2), 4, deform_fc_channels=16, spatial_scale=0.5, sampling_ratio=2, dtype=np.float64
    )
    names = [n for n, _ in layer.named_parameters()]
    assert names == [f"offset_fc.{i}.{p}" for i in (0, 2, 4) for p in ("weight", "bias")]
    assert layer.offset_fc[0].weight.shape == (16, 4 * 3 * 2) and layer.offset_fc[
        4
    ].weight.shape == (12, 16)
    # the last layer starts at zero: the layer starts as aligned RoI Align
    out = layer(x, BOX)
    np.testing.assert_allclose(
        out.numpy(), ops.roi_align(x.data, BOX, (3, 2), 0.5, 2, True).numpy(), rtol=1e-13
    )
    out.sum().backward()
    assert np.abs(layer.offset_fc[4].weight.grad).max() > 0 and x.grad.shape == x.shape
    # once the last layer is not zero, the offsets move the bins
    layer.offset_fc[4].weight.data[...] = rng.standard_normal((12, 16)) * 0.1
    assert not np.allclose(layer(x, BOX).numpy(), out.numpy())
    assert layer(x, np.zeros((0, 5))).shape == (0, 4, 3, 2)
    with pytest.raises(
        ValueError,
        match=r"DeformRoIPoolPack: input must be \(N, 4, H, W\) \(output_channels\), got shape \(2, 3, 6, 7\)",
    ):
        layer(x.data[:, :3], BOX)


def test_modulated_deform_roi_pool_pack(rng):
    x = rng.standard_normal((2, 4, 6, 7)).astype(np.float32)
    layer = nn.ModulatedDeformRoIPoolPack(2, 4, deform_fc_channels=8)
    names = [n for n, _ in layer.named_parameters()]
    assert names[:6] == [f"offset_fc.{i}.{p}" for i in (0, 2, 4) for p in ("weight", "bias")]
    assert names[6:] == [f"mask_fc.{i}.{p}" for i in (0, 2) for p in ("weight", "bias")]
    assert layer.mask_fc[2].weight.shape == (4, 8) and layer.mask_fc[2].weight.dtype == np.float32
    out = layer(x, BOX.astype(np.float32))
    assert out.dtype == np.float32
    # mask = sigmoid(0) = 0.5 and offsets 0 at initialisation
    np.testing.assert_allclose(
        out.numpy(),
        0.5 * ops.roi_align(x, BOX.astype(np.float32), 2, 1.0, 0, True).numpy(),
        rtol=1e-6,
    )
    sd = layer.state_dict()
    assert set(sd) == set(names)


# ------------------------------------------------------------------ check and bench tables


def test_registered_and_checked():
    from deformnp.__main__ import run_check
    from deformnp.cases import bench, check

    names = [
        "roi_pool",
        "roi_align",
        "ps_roi_pool",
        "ps_roi_align",
        "deform_roi_pool",
        "deform_ps_roi_pool",
    ]
    assert all(n in check.OPS and check.check_cases(n) and n in bench.OPS for n in names)
    import io

    assert run_check(names, out=io.StringIO())
