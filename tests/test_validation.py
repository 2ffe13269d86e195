"""Inputs that once passed validation and then crashed, hung, wrapped or were silently changed
(found by fuzzing the public API), and the named errors they get now; and the helpers of
``deformnp.validation`` themselves.

Every error names the op (or layer), the argument, what was expected and what was given.
"""

from __future__ import annotations

import numpy as np
import pytest

from deformnp import nn, ops, validation

BOX = np.array([[0, 0, 0, 3, 3.0]])


# ---------------------------------------------------------------- 1. sizes that wrap in int64


@pytest.mark.parametrize("shapes", [[[2**32, 2**32], [3, 4], [2, 2]], [[2**62, 2], [3, 4], [2, 2]]])
def test_level_sizes_that_wrap_in_int64_are_refused(shapes):
    # H*W = 2**64 wrapped to 0, the level offsets matched and the kernel read out of bounds
    args = (
        np.zeros((1, 16, 1, 2)),
        np.array(shapes),
        np.array([0, 0, 12]),
        np.full((1, 1, 1, 3, 1, 2), 0.5),
        np.ones((1, 1, 1, 3, 1)),
    )
    msg = r"ms_deform_attn: level_start_index \[0, 0, 12\] is inconsistent with spatial_shapes"
    with pytest.raises(ValueError, match=msg):
        ops.ms_deform_attn_forward(*args)
    with pytest.raises(ValueError, match=msg):
        ops.ms_deform_attn_backward(np.zeros((1, 1, 2)), *args)
    with pytest.raises(ValueError, match=msg):
        ops.ms_deform_attn(*args)


def test_msdeformattn_sums_level_sizes_exactly():
    layer = nn.MSDeformAttn(4, 3, 1, 1, dtype=np.float64)
    with pytest.raises(ValueError, match=r"MSDeformAttn: input_flatten has S = 16 positions"):
        layer(
            np.zeros((1, 1, 4)),
            np.full((1, 1, 3, 2), 0.5),
            np.zeros((1, 16, 4)),
            np.array([[2**32, 2**32], [3, 4], [2, 2]]),
            np.array([0, 0, 12]),
        )


# ---------------------------------------------------------------- 2. a caller's argmax


def _pool_backward(argmax):
    return ops.roi_pool_backward(np.ones((1, 1, 1, 1)), (1, 1, 4, 4), BOX, 1, argmax=argmax)


@pytest.mark.parametrize("value", [10**9, 16, -2])
def test_argmax_out_of_the_plane_is_refused(value):
    # argmax == H*W wrote into the next plane; 10**9 far out of bounds
    with pytest.raises(ValueError, match=r"roi_pool: argmax must hold flat indices into the 4x4"):
        _pool_backward(np.full((1, 1, 1, 1), value))


def test_argmax_must_hold_integers():
    with pytest.raises(TypeError, match="roi_pool: argmax must hold integers .* got float64"):
        _pool_backward(np.full((1, 1, 1, 1), 1.0))


def test_argmax_may_be_any_integer_array_like():
    # a list (an AttributeError once) or another integer dtype is as good as the forward's own
    (g,) = _pool_backward([[[[5]]]])
    expected = np.zeros((1, 1, 4, 4))
    expected[0, 0, 1, 1] = 1.0
    np.testing.assert_array_equal(g, expected)
    np.testing.assert_array_equal(_pool_backward(np.full((1, 1, 1, 1), 5, np.uint8))[0], expected)


# ---------------------------------------------------------------- 3. grids that never end


@pytest.mark.parametrize(
    "call, name",
    [
        (lambda: ops.roi_align_forward(np.zeros((1, 1, 4, 4)), BOX, 1, 1.0, 2**31), "roi_align"),
        (
            lambda: ops.ps_roi_align_forward(np.zeros((1, 1, 4, 4)), BOX, 1, 1.0, 2**31),
            "ps_roi_align",
        ),
        (
            lambda: ops.deform_roi_pool_forward(np.zeros((1, 1, 4, 4)), BOX, None, 1, 1.0, 2**31),
            "deform_roi_pool",
        ),
        (lambda: nn.RoIAlign(1, 1.0, 2**31), "RoIAlign"),
    ],
)
def test_sampling_ratio_is_bounded(call, name):
    # 4*gh*gw overflowed to 0, the scratch was clamped to 1 element and written past: a hang
    with pytest.raises(
        ValueError, match=rf"{name}: sampling_ratio must be <= 4096, got 2147483648"
    ):
        call()


def test_sample_per_part_is_bounded():
    with pytest.raises(
        ValueError, match=r"deform_ps_roi_pool: sample_per_part must be <= 4096, got 2147483648"
    ):
        ops.deform_ps_roi_pool_forward(np.zeros((1, 1, 4, 4)), BOX, None, 1.0, 1, 1, 1, None, 2**31)


# ---------------------------------------------------------------- 4. wrong exception types


def test_huge_integers_are_value_errors():
    # an OverflowError or a Numba TypingError once
    with pytest.raises(
        ValueError, match=r"roi_align: sampling_ratio must be <= 4096, got 18446744073709551616"
    ):
        ops.roi_align_forward(np.zeros((1, 1, 4, 4)), BOX, 1, 1.0, 2**64)
    with pytest.raises(ValueError, match=r"deform_conv2d: stride must be <= 2147483647"):
        ops.deform_conv2d_forward(
            np.zeros((1, 1, 4, 4)), np.zeros((1, 18, 1, 1)), np.zeros((2, 1, 3, 3)), stride=2**64
        )


def test_zero_channel_input_to_deform_conv2d():
    # a ZeroDivisionError once
    with pytest.raises(ValueError, match=r"deform_conv2d: input has 0 channels, expected at least"):
        ops.deform_conv2d_forward(
            np.zeros((1, 0, 4, 4)), np.zeros((1, 18, 4, 4)), np.zeros((2, 1, 3, 3)), padding=1
        )


@pytest.mark.parametrize(
    "make, match",
    [
        (lambda: nn.DeformConv2d(4, 4, 0), "DeformConv2d: kernel_size must be >= 1, got 0"),
        (lambda: nn.DeformConv2d(0, 4, 3), "DeformConv2d: in_channels must be >= 1, got 0"),
        (lambda: nn.DeformConv2d(4, 0, 3), "DeformConv2d: out_channels must be >= 1, got 0"),
        (lambda: nn.DeformConv2d(4, 4, -1), "DeformConv2d: kernel_size must be >= 1, got -1"),
        (lambda: nn.DeformConv2dPack(4, 4, 0), "DeformConv2dPack: kernel_size must be >= 1"),
        (
            lambda: nn.ModulatedDeformConv2dPack(4, 4, 3, deform_groups=0),
            "ModulatedDeformConv2dPack: deform_groups must be >= 1, got 0",
        ),
        (lambda: nn.Conv2d(4, 4, 0), "Conv2d: kernel_size must be >= 1, got 0"),
        (lambda: nn.MSDeformAttn(8, 0), "MSDeformAttn: n_levels must be >= 1, got 0"),
        (lambda: nn.DeformRoIPoolPack(2, 0), "DeformRoIPoolPack: output_channels must be >= 1"),
        (lambda: nn.RoIPool(0, 1.0), "RoIPool: output_size must be >= 1, got 0"),
    ],
)
def test_layer_constructors_check_their_arguments(make, match):
    with pytest.raises(ValueError, match=match):
        make()


# ---------------------------------------------------------------- 5. silent truncation


@pytest.mark.parametrize("arg", ["stride", "padding", "dilation"])
def test_non_integer_geometry_is_refused(arg):
    # (1.5, 1.5) computed as 1 once (while a scalar 1.5 was already refused)
    kwargs = {"padding": 1, arg: (1.5, 1.5)}
    with pytest.raises(
        TypeError, match=rf"deform_conv2d: {arg} must be an int or a pair of ints, got \(1.5, 1.5\)"
    ):
        ops.deform_conv2d_forward(
            np.zeros((1, 1, 4, 4)), np.zeros((1, 18, 4, 4)), np.zeros((2, 1, 3, 3)), **kwargs
        )
    with pytest.raises(TypeError, match=rf"{arg} must be an int or a pair of ints"):
        nn.DeformConv2d(1, 2, 3, **{arg: (1.5, 1.5)})


@pytest.mark.parametrize(
    "op", [ops.roi_align, ops.roi_pool, ops.ps_roi_align, ops.ps_roi_pool, ops.deform_roi_pool]
)
def test_non_integer_output_size_is_refused(op):
    # (2.5, 3) pooled to (2, 3) once
    args = (np.zeros((1, 6, 4, 4)), BOX) + ((None,) if op is ops.deform_roi_pool else ())
    with pytest.raises(
        TypeError,
        match=rf"{op.__name__}: output_size must be an int or a pair of ints, got \(2.5, 3\)",
    ):
        op(*args, (2.5, 3))


def test_layers_do_not_truncate_either():
    with pytest.raises(TypeError, match=r"DeformRoIPool: sampling_ratio must be an int, got 2.5"):
        nn.DeformRoIPool(2, sampling_ratio=2.5)
    with pytest.raises(TypeError, match=r"MSDeformAttn: d_model must be an int, got 8.5"):
        nn.MSDeformAttn(8.5)
    with pytest.raises(TypeError, match=r"Linear: in_features must be an int, got 2.5"):
        nn.Linear(2.5, 3)


def test_bools_are_not_integers():
    with pytest.raises(TypeError, match=r"roi_align: sampling_ratio must be an int, got True"):
        ops.roi_align_forward(np.zeros((1, 1, 4, 4)), BOX, 1, 1.0, True)


# ---------------------------------------------------------------- 6. gradient dtypes


def _msda_backward(grad):
    return ops.ms_deform_attn_backward(
        grad,
        np.zeros((1, 4, 1, 2)),
        np.array([[2, 2]]),
        np.array([0]),
        np.full((1, 1, 1, 1, 1, 2), 0.5),
        np.ones((1, 1, 1, 1, 1)),
    )


@pytest.mark.parametrize("dtype", [complex, np.int64, np.float16, object, bool])
def test_gradients_must_be_float(dtype):
    # a ComplexWarning and float64 gradients once
    with pytest.raises(TypeError, match=r"ms_deform_attn: grad_out must be float32 or float64"):
        _msda_backward(np.zeros((1, 1, 2), dtype))


def test_gradients_must_have_the_inputs_dtype():
    with pytest.raises(TypeError, match=r"ms_deform_attn: grad_out must be float64 like value"):
        _msda_backward(np.zeros((1, 1, 2), np.float32))
    with pytest.raises(TypeError, match=r"deform_conv2d: grad_out must be float64 like input"):
        ops.deform_conv2d_backward(
            np.zeros((1, 2, 4, 4), np.float32),
            np.zeros((1, 1, 4, 4)),
            np.zeros((1, 18, 4, 4)),
            np.zeros((2, 1, 3, 3)),
            padding=1,
        )
    with pytest.raises(TypeError, match=r"grid_sample: grad_out must be float32 like input"):
        ops.grid_sample_backward(
            np.zeros((1, 1, 2, 2)),
            np.zeros((1, 1, 3, 3), np.float32),
            np.zeros((1, 2, 2, 2), np.float32),
        )


# ---------------------------------------------------------------- 7. layers name themselves


def _msda_layer_call(query, ref, flatten):
    layer = nn.MSDeformAttn(4, 1, 1, 1, dtype=np.float64)
    return layer(query, ref, flatten, np.array([[2, 2]]), np.array([0]))


@pytest.mark.parametrize(
    "query, ref, flatten, arg, got",
    [
        (np.zeros((1, 1, 4)), np.ones((1, 1, 1, 2), int), np.zeros((1, 4, 4)), "reference_points", "int64"),
        (np.zeros((1, 1, 4)), np.ones((1, 1, 1, 2), np.float32), np.zeros((1, 4, 4)), "reference_points", "float32"),
        (np.zeros((1, 1, 4), int), np.ones((1, 1, 1, 2)), np.zeros((1, 4, 4)), "query", "int64"),
        (np.zeros((1, 1, 4)), np.ones((1, 1, 1, 2)), np.zeros((1, 4, 4), int), "input_flatten", "int64"),
    ],
)  # fmt: skip
def test_msdeformattn_checks_input_dtypes(query, ref, flatten, arg, got):
    # reference points were cast silently, query / input_flatten reported by `linear` once
    with pytest.raises(
        TypeError,
        match=rf"MSDeformAttn: {arg} must be float64 like the layer's parameters, got {got}",
    ):
        _msda_layer_call(query, ref, flatten)


def test_deformroipoolpack_names_itself():
    layer = nn.DeformRoIPoolPack(2, 4, 8)
    with pytest.raises(
        TypeError, match=r"DeformRoIPoolPack: input must be float32 like the layer's parameters"
    ):
        layer(np.zeros((1, 4, 6, 6), int), BOX)
    # a list (an AttributeError once) is an array-like like any other
    small = nn.DeformRoIPoolPack(2, 1, 8, dtype=np.float64)
    out = small(np.zeros((1, 1, 6, 6)).tolist(), BOX)
    assert out.shape == (1, 1, 2, 2)


@pytest.mark.parametrize(
    "call, match",
    [
        (lambda: ops.roi_align(np.float64(1.0), BOX, 2), r"roi_align: input must be 4-d .* got shape \(\)"),
        (
            lambda: ops.deform_conv2d(np.float64(1.0), np.zeros((1, 18, 4, 4)), np.zeros((2, 1, 3, 3))),
            r"deform_conv2d: input must be 4-d .* got shape \(\)",
        ),
        (
            lambda: ops.grid_sample(np.zeros((1, 1, 2, 2)), np.float64(0.5)),
            r"grid_sample: grid must be 4-d .* got shape \(\)",
        ),
    ],
)  # fmt: skip
def test_zero_d_arguments_are_reported_as_zero_d(call, match):
    # "got shape (1,)" once
    with pytest.raises(ValueError, match=match):
        call()


# ---------------------------------------------------------------- 8. needs


@pytest.mark.parametrize(
    "call, match",
    [
        (
            lambda: ops.deform_conv2d_backward(
                np.zeros((1, 2, 4, 4)), np.zeros((1, 1, 4, 4)), np.zeros((1, 18, 4, 4)),
                np.zeros((2, 1, 3, 3)), padding=1, needs=(True, True),
            ),
            r"deform_conv2d: needs must have 5 flags \(input, offset, weight, bias, mask\), "
            r"got \(True, True\)",
        ),
        (
            lambda: _msda_backward_needs(True),
            r"ms_deform_attn: needs must be a sequence of 3 flags",
        ),
    ],
)  # fmt: skip
def test_needs_has_one_flag_per_gradient(call, match):
    # "not enough values to unpack" once
    with pytest.raises((ValueError, TypeError), match=match):
        call()


def _msda_backward_needs(needs):
    return ops.ms_deform_attn_backward(
        np.zeros((1, 1, 2)),
        np.zeros((1, 4, 1, 2)),
        np.array([[2, 2]]),
        np.array([0]),
        np.full((1, 1, 1, 1, 1, 2), 0.5),
        np.ones((1, 1, 1, 1, 1)),
        needs=needs,
    )


# ---------------------------------------------------------------- the helpers


def test_pair_and_integer():
    assert validation.pair("op", "stride", 2) == (2, 2)
    assert validation.pair("op", "stride", (np.int64(1), 3)) == (1, 3)
    assert validation.integer("op", "n", np.int32(4), 1) == 4
    with pytest.raises(
        ValueError, match=r"op: stride must be an int or a pair of ints, got \(1, 2, 3\)"
    ):
        validation.pair("op", "stride", (1, 2, 3))
    with pytest.raises(TypeError, match=r"op: stride must be an int or a pair of ints, got 2.0"):
        validation.pair("op", "stride", 2.0)
    with pytest.raises(ValueError, match=r"op: n must be <= 5, got 6"):
        validation.integer("op", "n", 6, 0, 5)


def test_contiguous_keeps_zero_d_arrays_and_copies_read_only_ones():
    a = np.float64(2.0)
    assert validation.float_array("op", "x", a).shape == ()
    ro = np.broadcast_to(np.ones(3), (2, 3))
    c = validation.contiguous(ro)
    assert c.flags.c_contiguous and c.flags.writeable and c.shape == (2, 3)
    w = np.ones((2, 3))
    assert validation.contiguous(w) is w


def test_generic_ops_refuse_float_sizes():
    import deformnp.functional as F

    x = np.zeros((2, 3))
    with pytest.raises(TypeError, match=r"reshape: shape must be an int or a sequence of ints"):
        F.reshape(x, 3, 2.0)
    with pytest.raises(TypeError, match=r"pad: pad must be an int or a sequence of ints"):
        F.pad(x, (1.5, 1))
    with pytest.raises(TypeError, match=r"layer_norm: normalized_shape must be an int or a"):
        F.layer_norm(x, 2.5)
    with pytest.raises(TypeError, match=r"LayerNorm: normalized_shape must be an int or a"):
        nn.LayerNorm((3.0,))
    with pytest.raises(TypeError, match=r"sum: dim must be an int or a sequence of ints"):
        F.sum(x, 1.0)
    assert F.reshape(x, np.int64(3), 2).shape == (3, 2)  # NumPy integers are integers


def test_deterministic_switch_takes_a_bool():
    import deformnp as dn

    with pytest.raises(
        TypeError, match=r"use_deterministic_algorithms: mode must be a bool, got int"
    ):
        dn.use_deterministic_algorithms(1)
    assert dn.are_deterministic_algorithms_enabled() is False
    dn.use_deterministic_algorithms(True)
    try:
        assert dn.are_deterministic_algorithms_enabled() is True
    finally:
        dn.use_deterministic_algorithms(False)


def test_dtype_mismatch_says_how_to_fix_it():
    """float64 data into a float32 layer (the usual mistake) names both fixes; any other mix
    says to cast to one dtype."""
    import deformnp as dn

    layer = nn.DeformConv2d(4, 4, 3, padding=1)
    x = dn.tensor(np.zeros((1, 4, 5, 5)))
    off = dn.tensor(np.zeros((1, 18, 5, 5)))
    with pytest.raises(TypeError) as exc:
        layer(x, off)
    msg = str(exc.value)
    assert msg.startswith("deform_conv2d: inputs must share one float dtype, got input float64")
    assert "array.astype(np.float32) or Tensor.float()" in msg and "layer.double()" in msg
    assert layer.double()(x, off).dtype == np.float64  # the fix it names works
    assert layer.float()(x.float(), off.float()).dtype == np.float32
    with pytest.raises(TypeError, match=r"cast them to one dtype, e.g. array.astype\(np.float64\)"):
        ops.grid_sample(
            dn.tensor(np.zeros((1, 1, 2, 2))), dn.tensor(np.zeros((1, 1, 1, 2), np.float32))
        )
