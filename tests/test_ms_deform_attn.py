"""ms_deform_attn (docs/ops/ms_deform_attn.rst): the core op against the naive reference, gradcheck,
edge cases, validation messages, properties, determinism, and parity with Deformable-DETR's PyTorch
formulation; and the MSDeformAttn layer against a torch re-implementation of Deformable-DETR's.

Position gradients are checked with finite differences only at locations whose pixel coordinates
y = v*H_l - 0.5, x = u*W_l - 0.5 have fractional parts in [0.1, 0.9] and stay away from the
border lines (``locations_off_kinks``): the zero-fade rule has kinks at integer coordinates,
where central differences are wrong (docs/guide/autograd.rst).
"""

from __future__ import annotations

import numba
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from reference.attention import ms_deform_attn as reference

import deformnp as dn
from deformnp.cases import check_cases
from deformnp.cases.inputs import (
    ENCODER_LEVELS,
    call_with_parameters,
    locations_off_kinks,
    reference_attention,
)
from deformnp.nn import MSDeformAttn
from deformnp.ops import ms_deform_attn, ms_deform_attn_backward, ms_deform_attn_forward
from deformnp.ops.attention import level_layout

LEVELS = [(3, 4), (2, 2), (1, 3)]


def make_inputs(rng, levels=LEVELS, N=2, Lq=3, M=2, D=3, P=2, dtype=np.float64, lo=-0.3, hi=1.3):
    shapes, starts = level_layout(levels)
    S = int(shapes.prod(axis=1).sum())
    L = len(levels)
    value = rng.standard_normal((N, S, M, D)).astype(dtype)
    loc = rng.uniform(lo, hi, (N, Lq, M, L, P, 2)).astype(dtype)
    attn = rng.uniform(0.1, 1.0, (N, Lq, M, L, P)).astype(dtype)
    return value, shapes, starts, loc, attn


def rel_err(a, b):
    a = np.asarray(a, np.float64)
    b = np.asarray(b, np.float64)
    if a.size == 0:
        return 0.0
    return float(np.max(np.abs(a - b)) / max(np.max(np.abs(b)), 1e-300))


# ---------------------------------------------------------------------------- reference


def test_matches_reference_float64(rng):
    args = make_inputs(rng)
    out = ms_deform_attn(*args)
    assert isinstance(out, dn.Tensor)
    assert out.shape == (2, 3, 2 * 3) and out.dtype == np.float64
    assert rel_err(out.numpy(), reference(*args)) < 1e-12


def test_matches_reference_float32(rng):
    args = make_inputs(rng, dtype=np.float32)
    out = ms_deform_attn(*args)
    assert out.dtype == np.float32
    assert rel_err(out.numpy(), reference(*args)) < 1e-5


def test_forward_pair_equals_op(rng):
    args = make_inputs(rng)
    np.testing.assert_array_equal(ms_deform_attn_forward(*args), ms_deform_attn(*args).numpy())


def test_in_range_locations_use_every_level(rng):
    # locations inside [0, 1]: every level contributes, so dropping one changes the output
    value, shapes, starts, loc, attn = make_inputs(rng, lo=0.05, hi=0.95)
    full = ms_deform_attn_forward(value, shapes, starts, loc, attn)
    for l in range(len(LEVELS)):
        a = attn.copy()
        a[:, :, :, l] = 0
        assert np.abs(ms_deform_attn_forward(value, shapes, starts, loc, a) - full).max() > 1e-3


def test_sampling_rule_at_pixel_centres(rng):
    # u = (j + 0.5) / W, v = (i + 0.5) / H hits pixel (i, j) exactly: y = v*H - 0.5 = i
    value, shapes, starts, _, _ = make_inputs(rng, levels=[(3, 4)], N=1, M=1, D=2)
    loc = np.zeros((1, 1, 1, 1, 1, 2))
    attn = np.ones((1, 1, 1, 1, 1))
    for i in range(3):
        for j in range(4):
            loc[..., 0] = (j + 0.5) / 4
            loc[..., 1] = (i + 0.5) / 3
            out = ms_deform_attn_forward(value, shapes, starts, loc, attn)
            np.testing.assert_allclose(out[0, 0], value[0, i * 4 + j, 0], rtol=1e-14)


# ---------------------------------------------------------------------------- gradients


def test_locations_off_kinks_helper(rng):
    shapes, _ = level_layout(LEVELS)
    loc = locations_off_kinks(rng, shapes, (2, 3, 2), 4)
    H = shapes[:, 0].reshape(1, 1, 1, -1, 1)
    W = shapes[:, 1].reshape(1, 1, 1, -1, 1)
    for coord in (loc[..., 0] * W - 0.5, loc[..., 1] * H - 0.5):
        frac = coord - np.floor(coord)
        assert frac.min() >= 0.1 and frac.max() <= 0.9
    assert (loc < 0).any() and (loc > 1).any()  # the fading band outside the map is covered


@pytest.mark.parametrize("case", check_cases("ms_deform_attn"), ids=lambda c: c.label)
def test_gradcheck_all_inputs(case):
    # the check table's cases: locations kept off the kinks (fractional pixel coordinates in
    # [0.1, 0.9], see the module docstring)
    assert dn.gradcheck(case.fn, case.inputs(), names=case.names)


def test_gradcheck_catches_a_wrong_gradient(rng, monkeypatch):
    # the test above can fail: corrupt the location gradient and gradcheck must object
    from deformnp.kernels.cpu import attention as K

    original = K.ms_deform_attn_backward

    def wrong(*args, **kwargs):
        gv, gl, ga = original(*args, **kwargs)
        return gv, None if gl is None else gl * 1.01, ga

    monkeypatch.setattr(K, "ms_deform_attn_backward", wrong)
    value, shapes, starts, _, attn = make_inputs(rng, levels=[(3, 3)], N=1, Lq=1, M=1, D=2, P=2)
    loc = locations_off_kinks(rng, shapes, (1, 1, 1), 2)
    with pytest.raises(dn.GradcheckError, match="sampling_locations"):
        dn.gradcheck(
            lambda l: ms_deform_attn(value, shapes, starts, l, attn),
            (dn.tensor(loc, requires_grad=True),),
            names=("sampling_locations",),
        )


def test_gradients_match_reference_linearity(rng):
    # the op is linear in value and in the weights: grad_A[n,q,m,l,p] is the sample with g,
    # and <grad_V, V> = <g, out> (both computed from the naive reference)
    value, shapes, starts, loc, attn = make_inputs(rng)
    g = rng.standard_normal((2, 3, 6))
    gv, gl, ga = ms_deform_attn_backward(g, value, shapes, starts, loc, attn)
    out = reference(value, shapes, starts, loc, attn)
    assert abs(np.sum(gv * value) - np.sum(g * out)) < 1e-12 * np.abs(g * out).sum()
    for idx in [(0, 0, 0, 0, 0), (1, 2, 1, 2, 1), (0, 1, 1, 1, 0)]:
        one = np.zeros_like(attn)
        one[idx] = 1.0
        sample = reference(value, shapes, starts, loc, one)
        assert abs(ga[idx] - np.sum(g * sample)) < 1e-12 * max(1.0, np.abs(g * sample).sum())


def test_location_gradient_is_right_hand_slope_at_integers(rng):
    # at an integer pixel coordinate the derivative is the slope on the right (floor rule)
    value, shapes, starts, _, _ = make_inputs(rng, levels=[(4, 5)], N=1, M=1, D=3)
    H, W = 4, 5
    attn = np.ones((1, 1, 1, 1, 1))
    g = rng.standard_normal((1, 1, 3))
    for y, x in [(1.0, 2.0), (-1.0, 1.5), (0.0, 0.0), (2.5, -1.0), (3.0, 4.0)]:
        loc = np.array([(x + 0.5) / W, (y + 0.5) / H]).reshape(1, 1, 1, 1, 1, 2)
        _, gl, _ = ms_deform_attn_backward(g, value, shapes, starts, loc, attn)
        h = 1e-7
        for c, scale in ((0, W), (1, H)):
            lp = loc.copy()
            lp[..., c] += h / scale
            f0 = np.sum(g * ms_deform_attn_forward(value, shapes, starts, loc, attn))
            f1 = np.sum(g * ms_deform_attn_forward(value, shapes, starts, lp, attn))
            right = (f1 - f0) / (h / scale)
            assert abs(gl[..., c].item() - right) < 1e-5 * max(1.0, abs(right)), (y, x, c)


def test_needs_selects_gradients(rng):
    args = make_inputs(rng)
    g = rng.standard_normal((2, 3, 6))
    full = ms_deform_attn_backward(g, *args)
    for needs in [(True, False, False), (False, True, False), (False, False, True)]:
        part = ms_deform_attn_backward(g, *args, needs=needs)
        for want, got, ref in zip(needs, part, full):
            if want:
                np.testing.assert_array_equal(got, ref)
            else:
                assert got is None
    assert ms_deform_attn_backward(g, *args, needs=(False, False, False)) == (None, None, None)


def test_autograd_routes_gradients(rng):
    value, shapes, starts, loc, attn = make_inputs(rng)
    v = dn.tensor(value, requires_grad=True)
    l = dn.tensor(loc, requires_grad=True)
    a = dn.tensor(attn)  # no grad wanted
    g = rng.standard_normal((2, 3, 6))
    ms_deform_attn(v, shapes, starts, l, a).backward(g)
    gv, gl, _ = ms_deform_attn_backward(g, value, shapes, starts, loc, attn)
    np.testing.assert_array_equal(v.grad, gv)
    np.testing.assert_array_equal(l.grad, gl)
    assert a.grad is None


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_gradient_dtypes_and_float32_accuracy(rng, dtype):
    args = make_inputs(rng, dtype=dtype)
    g = rng.standard_normal((2, 3, 6)).astype(dtype)
    grads = ms_deform_attn_backward(g, *args)
    for grad, ref in zip(grads, (args[0], args[3], args[4])):
        assert grad.dtype == dtype and grad.shape == ref.shape
    if dtype == np.float32:
        args64 = [a.astype(np.float64) if a.dtype == np.float32 else a for a in args]
        grads64 = ms_deform_attn_backward(g.astype(np.float64), *args64)
        for a, b in zip(grads, grads64):
            assert rel_err(a, b) < 1e-5


# ---------------------------------------------------------------------------- edge cases


@pytest.mark.parametrize("far", [-1e6, -2.0, 1.0 + 1e-9 + 1.0, 3.5, 1e6])
def test_far_locations_sample_zero_with_zero_grads(rng, far):
    value, shapes, starts, loc, attn = make_inputs(rng)
    loc[0, 1, 1, 0, 1, 0] = far  # one coordinate far outside: this point samples zero
    loc[1, :, :, :, :, 1] = far  # a whole batch element outside
    out = ms_deform_attn_forward(value, shapes, starts, loc, attn)
    assert np.all(out[1] == 0)
    keep = attn.copy()
    keep[0, 1, 1, 0, 1] = 0.0
    np.testing.assert_allclose(out[0], reference(value, shapes, starts, loc, keep)[0], rtol=1e-12)
    g = rng.standard_normal(out.shape)
    gv, gl, ga = ms_deform_attn_backward(g, value, shapes, starts, loc, attn)
    assert np.all(gl[1] == 0) and np.all(ga[1] == 0)
    assert np.all(gl[0, 1, 1, 0, 1] == 0) and ga[0, 1, 1, 0, 1] == 0


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_nonfinite_locations_sample_zero(rng, bad):
    value, shapes, starts, loc, attn = make_inputs(rng)
    loc[0, 0, 0, 1, 0, 1] = bad
    loc[1, 2, 1, 2, 1, 0] = bad
    out = ms_deform_attn_forward(value, shapes, starts, loc, attn)
    keep = attn.copy()
    keep[0, 0, 0, 1, 0] = 0
    keep[1, 2, 1, 2, 1] = 0
    clean = np.where(np.isfinite(loc), loc, 0.5)
    np.testing.assert_allclose(out, reference(value, shapes, starts, clean, keep), rtol=1e-12)
    gv, gl, ga = ms_deform_attn_backward(np.ones_like(out), value, shapes, starts, loc, attn)
    for grad in (gv, gl, ga):
        assert np.all(np.isfinite(grad))
    assert np.all(gl[0, 0, 0, 1, 0] == 0) and ga[1, 2, 1, 2, 1] == 0


def test_one_level_is_single_scale_attention(rng):
    # L = 1, as in the docstring: equals the reference and a hand computation of the formula
    value, shapes, starts, loc, attn = make_inputs(rng, levels=[(4, 5)], lo=0.0, hi=1.0)
    out = ms_deform_attn_forward(value, np.array([[4, 5]]), np.array([0]), loc, attn)
    assert rel_err(out, reference(value, shapes, starts, loc, attn)) < 1e-12


def test_one_point_one_head_one_channel(rng):
    args = make_inputs(rng, N=1, Lq=1, M=1, D=1, P=1)
    assert rel_err(ms_deform_attn_forward(*args), reference(*args)) < 1e-12


def test_levels_of_size_1x1(rng):
    levels = [(1, 1), (1, 1), (2, 1)]
    value, shapes, starts, loc, attn = make_inputs(rng, levels=levels)
    assert (
        rel_err(
            ms_deform_attn_forward(value, shapes, starts, loc, attn),
            reference(value, shapes, starts, loc, attn),
        )
        < 1e-12
    )
    loc = locations_off_kinks(rng, shapes, (1, 2, 2), 2)
    assert dn.gradcheck(
        lambda v, l: ms_deform_attn(v, shapes, starts, l, attn[:1, :2]),
        (dn.tensor(value[:1], requires_grad=True), dn.tensor(loc, requires_grad=True)),
    )


def test_empty_level_contributes_nothing(rng):
    levels = [(3, 2), (0, 4), (2, 2)]
    value, shapes, starts, loc, attn = make_inputs(rng, levels=levels)
    out = ms_deform_attn_forward(value, shapes, starts, loc, attn)
    a = attn.copy()
    a[:, :, :, 1] = 0
    np.testing.assert_allclose(out, reference(value, shapes, starts, loc, a), rtol=1e-12)
    _, gl, ga = ms_deform_attn_backward(np.ones_like(out), value, shapes, starts, loc, attn)
    assert np.all(gl[:, :, :, 1] == 0) and np.all(ga[:, :, :, 1] == 0)


@pytest.mark.parametrize(
    "dims", [dict(N=0), dict(Lq=0), dict(P=0), dict(D=0), dict(M=1, D=0), dict(N=0, Lq=0)]
)
def test_empty_shapes(rng, dims):
    value, shapes, starts, loc, attn = make_inputs(rng, **dims)
    v = dn.tensor(value, requires_grad=True)
    l = dn.tensor(loc, requires_grad=True)
    a = dn.tensor(attn, requires_grad=True)
    out = ms_deform_attn(v, shapes, starts, l, a)
    assert out.shape == (value.shape[0], loc.shape[1], value.shape[2] * value.shape[3])
    out.sum().backward()
    for t in (v, l, a):
        assert t.grad.shape == t.shape and np.all(t.grad == 0)


def test_no_levels(rng):
    value = np.zeros((1, 0, 2, 3))
    loc = np.zeros((1, 4, 2, 0, 2, 2))
    attn = np.zeros((1, 4, 2, 0, 2))
    out = ms_deform_attn_forward(
        value, np.zeros((0, 2), np.int64), np.zeros(0, np.int64), loc, attn
    )
    assert out.shape == (1, 4, 6) and np.all(out == 0)


def test_any_batch_size_no_im2col_step(rng):
    # Deformable-DETR needs batch % im2col_step == 0 (or batch < step); any N works here
    args = make_inputs(rng, N=5, Lq=2, M=1, D=2, P=1)
    assert rel_err(ms_deform_attn_forward(*args), reference(*args)) < 1e-12


def test_non_contiguous_and_readonly_inputs(rng):
    value, shapes, starts, loc, attn = make_inputs(rng)
    expected = ms_deform_attn_forward(value, shapes, starts, loc, attn)
    v_nc = np.asfortranarray(value)
    l_nc = np.swapaxes(np.swapaxes(loc, 0, 1).copy(), 0, 1)
    a_ro = attn.copy()
    a_ro.flags.writeable = False
    np.testing.assert_array_equal(
        ms_deform_attn_forward(v_nc, shapes, starts, l_nc, a_ro), expected
    )
    t = dn.tensor(value.transpose(0, 1, 3, 2).copy(), requires_grad=True)
    out = ms_deform_attn(t.permute(0, 1, 3, 2), shapes, starts, loc, attn)
    np.testing.assert_array_equal(out.numpy(), expected)
    out.sum().backward()
    gv = ms_deform_attn_backward(np.ones_like(expected), value, shapes, starts, loc, attn)[0]
    np.testing.assert_array_equal(t.grad, gv.transpose(0, 1, 3, 2))


def test_int32_index_inputs_and_lists(rng):
    value, shapes, starts, loc, attn = make_inputs(rng)
    expected = ms_deform_attn_forward(value, shapes, starts, loc, attn)
    np.testing.assert_array_equal(
        ms_deform_attn_forward(value, shapes.astype(np.int32), starts.astype(np.int32), loc, attn),
        expected,
    )
    np.testing.assert_array_equal(
        ms_deform_attn_forward(value, shapes.tolist(), starts.tolist(), loc, attn), expected
    )


# ---------------------------------------------------------------------------- validation


def test_validation_messages(rng):
    value, shapes, starts, loc, attn = make_inputs(rng)
    op = ms_deform_attn_forward
    with pytest.raises(ValueError, match=r"ms_deform_attn: value has S = 17 positions, but "):
        op(value[:, :17], shapes, starts, loc, attn)
    with pytest.raises(ValueError, match=r"level_start_index \[0, 12, 15\] is inconsistent"):
        op(value, shapes, np.array([0, 12, 15]), loc, attn)
    with pytest.raises(ValueError, match=r"level_start_index has 2 entries, expected one per"):
        op(value, shapes, starts[:2], loc, attn)
    with pytest.raises(ValueError, match=r"spatial_shapes must be \(L, 2\) rows"):
        op(value, np.ones((3, 3), np.int64), starts, loc, attn)
    with pytest.raises(ValueError, match=r"spatial_shapes must be non-negative"):
        op(value, np.array([[3, 4], [2, 2], [-1, -3]]), starts, loc, attn)
    with pytest.raises(ValueError, match=r"spatial_shapes must be 2-d \(L, 2\)"):
        op(value, shapes.reshape(-1), starts, loc, attn)
    # a level of 2**31 rows is refused whatever its size (the CPU kernels' corners are int32;
    # an empty level is the one such input small enough to build here)
    huge = np.array(shapes, np.int64)
    huge[-1] = (2**31, 0)
    S = int(huge[:-1].prod(axis=1).sum())
    with pytest.raises(ValueError, match=r"spatial_shapes must be at most 2\*\*31 - 1"):
        op(value[:, :S], huge, np.array([0, *np.cumsum(huge.prod(axis=1))[:-1]]), loc, attn)
    huge[-1] = (0, 2**31 - 1)  # the largest allowed
    op(value[:, :S], huge, np.array([0, *np.cumsum(huge.prod(axis=1))[:-1]]), loc, attn)
    with pytest.raises(ValueError, match=r"value must be 4-d \(N, S, M, D\)"):
        op(value[0], shapes, starts, loc, attn)
    with pytest.raises(ValueError, match=r"sampling_locations must be 6-d"):
        op(value, shapes, starts, loc[..., 0], attn)
    with pytest.raises(ValueError, match=r"attention_weights must be 5-d"):
        op(value, shapes, starts, loc, attn[..., None])
    with pytest.raises(ValueError, match=r"sampling_locations must end in 2 coordinates"):
        op(value, shapes, starts, np.concatenate([loc, loc[..., :1]], -1), attn)
    with pytest.raises(ValueError, match=r"sampling_locations has shape .* M = 2 \(from value\)"):
        op(value, shapes, starts, loc[:, :, :1], attn)
    with pytest.raises(ValueError, match=r"L = 3 \(from spatial_shapes\)"):
        op(value, shapes, starts, loc[:, :, :, :2], attn)
    with pytest.raises(ValueError, match=r"N = 2"):
        op(value, shapes, starts, loc[:1], attn[:1])
    with pytest.raises(
        ValueError, match=r"attention_weights has shape \(2, 3, 2, 3, 1\), expected"
    ):
        op(value, shapes, starts, loc, attn[..., :1])
    with pytest.raises(TypeError, match=r"inputs must share one float dtype"):
        op(value.astype(np.float32), shapes, starts, loc, attn)
    with pytest.raises(TypeError, match=r"inputs must share one float dtype"):
        op(value, shapes, starts, loc, attn.astype(np.float32))
    with pytest.raises(TypeError, match=r"value must be float32 or float64, got int64"):
        op(value.astype(np.int64), shapes, starts, loc, attn)
    with pytest.raises(TypeError, match=r"spatial_shapes must be int32 or int64, got float64"):
        op(value, shapes.astype(np.float64), starts, loc, attn)
    with pytest.raises(TypeError, match=r"level_start_index must be int32 or int64"):
        op(value, shapes, starts.astype(np.float32), loc, attn)
    with pytest.raises(ValueError, match=r"grad_out has shape \(2, 3, 5\), expected"):
        ms_deform_attn_backward(np.zeros((2, 3, 5)), value, shapes, starts, loc, attn)
    with pytest.raises(ValueError, match=r"ms_deform_attn: value has S"):  # the Tensor op too
        ms_deform_attn(dn.tensor(value[:, 1:]), shapes, starts, loc, attn)


# ---------------------------------------------------------------------------- properties


@given(
    levels=st.lists(st.tuples(st.integers(1, 4), st.integers(1, 4)), min_size=1, max_size=3),
    N=st.integers(0, 2),
    Lq=st.integers(0, 3),
    M=st.integers(1, 3),
    D=st.integers(1, 4),
    P=st.integers(1, 3),
    dtype=st.sampled_from([np.float32, np.float64]),
    seed=st.integers(0, 2**31),
)
def test_property_matches_reference(levels, N, Lq, M, D, P, dtype, seed):
    rng = np.random.default_rng(seed)
    args = make_inputs(rng, levels=levels, N=N, Lq=Lq, M=M, D=D, P=P, dtype=dtype)
    out = ms_deform_attn_forward(*args)
    tol = 1e-12 if dtype == np.float64 else 1e-5
    assert out.dtype == dtype
    assert rel_err(out, reference(*args)) < tol
    # the gradient of <g, out> in the weights is exact linearity: compare with the reference
    g = rng.standard_normal(out.shape).astype(dtype)
    gv, _, ga = ms_deform_attn_backward(g, *args, needs=(True, False, True))
    value, attn = args[0], args[4]
    lhs = float(np.sum(ga.astype(np.float64) * attn))
    rhs = float(np.sum(g.astype(np.float64) * reference(*args)))
    scale = max(1.0, float(np.abs(g.astype(np.float64) * reference(*args)).sum()))
    assert abs(lhs - rhs) < tol * scale * 10
    assert abs(float(np.sum(gv.astype(np.float64) * value)) - rhs) < tol * scale * 10


# ---------------------------------------------------------------------------- determinism


def _backward_with_threads(n, args, g):
    prev = numba.get_num_threads()
    numba.set_num_threads(n)
    try:
        return ms_deform_attn_backward(g, *args)
    finally:
        numba.set_num_threads(prev)


@pytest.mark.parametrize("M, Lq, specialise", [(1, 300, False), (4, 60, False), (1, 300, True)])
def test_backward_bit_identical_across_runs_and_threads(rng, monkeypatch, M, Lq, specialise):
    # (1, 300) splits each head's queries into chunks with their own grad_value copies; large
    # enough (> _SERIAL_WORK) to run the parallel kernels; in both kernel builds
    from deformnp.kernels.cpu import attention as K
    from deformnp.kernels.cpu import sampling

    monkeypatch.setattr(K, "SPECIALISE_WORK", 0 if specialise else 1 << 62)

    args = make_inputs(rng, levels=[(16, 16), (8, 8)], N=1, Lq=Lq, M=M, D=32, P=4, lo=0, hi=1)
    assert Lq * M * 2 * 4 * (2 * 32 + 8) >= sampling.SERIAL_WORK
    g = rng.standard_normal((1, Lq, M * 32))
    first = _backward_with_threads(1, args, g)
    for n in (numba.config.NUMBA_NUM_THREADS, 1, 2):
        n = min(n, numba.config.NUMBA_NUM_THREADS)
        again = _backward_with_threads(n, args, g)
        for a, b in zip(first, again):
            assert a.tobytes() == b.tobytes()
    ref_gv = ms_deform_attn_backward(g, *args)[0]
    assert rel_err(first[0], ref_gv) == 0.0


def test_chunked_value_gradient_matches_unchunked(rng, monkeypatch):
    from deformnp.kernels.cpu import attention as K

    args = make_inputs(rng, levels=[(5, 4)], N=1, Lq=300, M=1, D=3, P=2)
    g = rng.standard_normal((1, 300, 3))
    assert K.n_chunks(1, 1, 300) > 1
    chunked = ms_deform_attn_backward(g, *args)
    monkeypatch.setattr(K, "n_chunks", lambda N, M, Lq: 1)
    single = ms_deform_attn_backward(g, *args)
    assert rel_err(chunked[0], single[0]) < 1e-13
    np.testing.assert_array_equal(chunked[1], single[1])


@pytest.mark.parametrize("D, P, specialise", [(3, 3, False), (32, 4, True), (300, 5, True)])
def test_backward_equals_the_backward_of_each_query_alone(rng, monkeypatch, D, P, specialise):
    # The backward copies grad_out rows a block of queries at a time (fewer for large D: 13 at
    # D = 300) and plans several queries' points together: a query's location and weight
    # gradients must come out exactly as when it is the only query, across block, batch and
    # chunk boundaries (Lq = 300: two chunks); the value gradient is the sum of the queries'.
    from deformnp.kernels.cpu import attention as K

    monkeypatch.setattr(K, "SPECIALISE_WORK", 0 if specialise else 1 << 62)
    Lq = 300
    args = make_inputs(rng, levels=[(6, 5), (3, 2)], N=1, Lq=Lq, M=1, D=D, P=P)
    value, shapes, starts, loc, attn = args
    rows_per_block = K.GRAD_ROWS_ELEMENTS // (D if specialise else K.GENERIC_CHANNELS)
    assert K.n_chunks(1, 2, Lq) == 2 and rows_per_block < Lq // 2
    g = rng.standard_normal((1, Lq, D))
    gv, gl, ga = ms_deform_attn_backward(g, *args)
    gv_sum = np.zeros_like(gv)
    for q in range(Lq):
        one = (value, shapes, starts, loc[:, q : q + 1], attn[:, q : q + 1])
        gv_q, gl_q, ga_q = ms_deform_attn_backward(g[:, q : q + 1], *one)
        assert gl_q.tobytes() == gl[:, q : q + 1].tobytes(), q
        assert ga_q.tobytes() == ga[:, q : q + 1].tobytes(), q
        gv_sum += gv_q
    assert rel_err(gv, gv_sum) < 1e-13


# ---------------------------------------------------------------------------- kernel builds


def _with_build(monkeypatch, specialise, fn):
    """Run fn with the kernels compiled for D (specialise=True) or the generic build."""
    from deformnp.kernels.cpu import attention as K

    monkeypatch.setattr(K, "SPECIALISE_WORK", 0 if specialise else 1 << 62)
    return fn()


def test_build_choice():
    from deformnp.kernels.cpu import attention as K

    assert K.channels_for(32, 10) == 0  # small problem: the generic build
    assert K.channels_for(32, K.SPECIALISE_WORK // 32) == 32  # large problem: D compiled in
    assert K.channels_for(K.GENERIC_CHANNELS + 1, 1) == K.GENERIC_CHANNELS + 1  # D too large
    data = reference_attention()
    points = data["sampling_locations"].size // 2
    assert K.channels_for(32, points) == 32  # the benchmark runs the specialised build


def test_too_many_channels_per_head_is_rejected(rng):
    from deformnp.kernels.cpu import attention as K

    D = K.MAX_CHANNELS + 1
    args = make_inputs(rng, levels=[(1, 1)], N=1, Lq=1, M=1, D=D, P=1, dtype=np.float32)
    with pytest.raises(ValueError, match=rf"ms_deform_attn: value has D = {D} channels per head"):
        ms_deform_attn_forward(*args)
    with pytest.raises(ValueError, match="at most 4096"):
        ms_deform_attn_backward(np.ones((1, 1, D), np.float32), *args)


def test_kernel_builds_refuse_a_d_they_were_not_built_for():
    # the stack buffers have the build's size: a wrong D must not reach them
    from deformnp.kernels.cpu import attention as K

    shapes, starts = level_layout([(2, 2)])
    slots = K._level_slots(shapes, starts, 1)
    loc, attn = np.zeros((1, 1, 1, 1, 1, 2)), np.zeros((1, 1, 1, 1, 1))
    forward, _ = K.kernels(0)
    D = K.GENERIC_CHANNELS + 1
    with pytest.raises(ValueError, match="does not fit this kernel build"):
        forward(np.zeros((1, 1, 4, D)), *slots, loc, attn, np.zeros((1, 1, D)))


def test_specialised_build_matches_reference_and_generic_build(rng, monkeypatch):
    # D = 32 in float64: the build the reference benchmark uses (there in float32), with points
    # in and out of range, an empty last level (no pixel may be read there) and L*P larger than
    # one plan batch
    from deformnp.kernels.cpu import attention as K

    levels = [(5, 7), (3, 3), (1, 1), (0, 6)]
    P = K.PLAN_BATCH // 4 + 3
    args = make_inputs(rng, levels=levels, N=2, Lq=5, M=3, D=32, P=P)
    g = rng.standard_normal((2, 5, 3 * 32))

    def run():
        out = ms_deform_attn_forward(*args)
        return (out, *ms_deform_attn_backward(g, *args))

    special = _with_build(monkeypatch, True, run)
    generic = _with_build(monkeypatch, False, run)
    assert rel_err(special[0], reference(*args)) < 1e-12
    for a, b in zip(special, generic):
        assert rel_err(a, b) < 1e-13
    assert np.all(special[2][:, :, :, 3] == 0) and np.all(special[3][:, :, :, 3] == 0)


def test_offset_width_choice():
    # int32 corner offsets while a level holds fewer than 2**31 elements of a head
    from deformnp.kernels.cpu import attention as K

    assert not K.wide_offsets(np.array([[2**15, 2**11 - 1]]), 32)  # 2**31 - 2**20 elements
    assert K.wide_offsets(np.array([[4, 4], [2**15, 2**11]]), 32)  # 2**31 elements: int64
    assert not K.wide_offsets(np.array([[0, 2**31 - 1]]), 4096)  # an empty level holds none
    assert not K.wide_offsets(np.zeros((0, 2), np.int64), 32)
    assert not K.wide_offsets(level_layout(ENCODER_LEVELS)[0], 32)  # what the benchmark runs


def test_int64_offset_build_equals_int32_build(rng, monkeypatch):
    # the build for levels of 2**31 elements or more, run on a small problem (points in and out
    # of range, on the borders, an empty level): the forward against the reference, every
    # gradient against the int32 build. The plans are the same; two separately compiled builds
    # may still round the reassociated channel sums differently (seen once under xdist). One
    # build (generic, float64: the offset type is the only difference between builds here), as
    # each build costs seconds of compilation in CI
    from deformnp.kernels.cpu import attention as K

    levels = [(5, 7), (3, 3), (0, 6), (1, 1)]
    args = list(make_inputs(rng, levels=levels, N=2, Lq=6, M=2, D=32, P=5))
    loc = args[3].reshape(-1)
    loc[::7], loc[::11], loc[::13] = -0.05, 1.0, 0.0
    g = rng.standard_normal((2, 6, 2 * 32))
    builds, build = [], K.kernels  # record which builds run
    monkeypatch.setattr(K, "kernels", lambda *key: builds.append(key) or build(*key))
    monkeypatch.setattr(K, "SPECIALISE_WORK", 1 << 62)
    results = {}
    for wide in (False, True):
        monkeypatch.setattr(K, "wide_offsets", lambda shapes, D, wide=wide: wide)
        results[wide] = (ms_deform_attn_forward(*args), *ms_deform_attn_backward(g, *args))
    assert set(builds) == {(0, False), (0, True)}
    assert rel_err(results[True][0], reference(*args)) < 1e-12
    for a, b in zip(results[False], results[True]):
        assert a.dtype == b.dtype == np.float64
        assert rel_err(a, b) < 1e-13


@settings(max_examples=15)
@given(
    levels=st.lists(st.tuples(st.integers(0, 5), st.integers(0, 5)), min_size=1, max_size=3),
    N=st.integers(1, 2),
    Lq=st.integers(1, 3),
    M=st.integers(1, 2),
    P=st.integers(1, 12),
    seed=st.integers(0, 2**31),
)
def test_property_specialised_build_equals_generic_build(levels, N, Lq, M, P, seed):
    # random level shapes (empty ones included) and L*P on both sides of a plan batch, in the
    # build with D = 32 compiled in: forward against the reference, every gradient against the
    # generic build (itself checked by gradcheck and the linearity properties above)
    from deformnp.kernels.cpu import attention as K

    if sum(h * w for h, w in levels) == 0:
        levels = [*levels, (1, 1)]
    rng = np.random.default_rng(seed)
    args = make_inputs(rng, levels=levels, N=N, Lq=Lq, M=M, D=32, P=P)
    g = rng.standard_normal((N, Lq, M * 32))
    results = {}
    for special in (True, False):
        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(K, "SPECIALISE_WORK", 0 if special else 1 << 62)
            results[special] = (ms_deform_attn_forward(*args), *ms_deform_attn_backward(g, *args))
    assert rel_err(results[True][0], reference(*args)) < 1e-12
    for a, b in zip(results[True], results[False]):
        assert rel_err(a, b) < 1e-13


def test_more_channels_than_the_generic_build(rng):
    # D > GENERIC_CHANNELS always compiles D in (the generic build's stack buffers are smaller)
    from deformnp.kernels.cpu import attention as K

    D = K.GENERIC_CHANNELS + 5
    args = make_inputs(rng, levels=[(4, 3), (2, 2)], N=1, Lq=3, M=2, D=D, P=2)
    assert rel_err(ms_deform_attn_forward(*args), reference(*args)) < 1e-12
    g = rng.standard_normal((1, 3, 2 * D))
    gv, gl, ga = ms_deform_attn_backward(g, *args)
    # linearity in value and in the weights (see test_gradients_match_reference_linearity)
    value, shapes, starts, loc, attn = args
    out = reference(*args)
    assert abs(np.sum(gv * value) - np.sum(g * out)) < 1e-12 * np.abs(g * out).sum()
    assert abs(np.sum(ga * attn) - np.sum(g * out)) < 1e-12 * np.abs(g * out).sum()
    assert dn.gradcheck(
        lambda l: ms_deform_attn(value, shapes, starts, l, attn),
        (dn.tensor(locations_off_kinks(rng, shapes, (1, 3, 2), 2), requires_grad=True),),
    )


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_add_scaled_row_equals_the_loop_it_replaces(rng, dtype):
    # the backward's scatter helper (LLVM vector code) against the Numba loop the kernel ran
    # before, compiled with the kernels' fast-math flags: bit for bit, for lengths below, at and
    # across the SIMD width (vector part, scalar tail, both, neither) and any offset; nothing
    # outside dst[offset : offset + n] moves
    from numba import njit, uint64

    from deformnp.kernels.cpu import attention as K

    @njit
    def helper(dst, off, alpha, src, n):
        K._add_scaled_row(dst, off, alpha, src, n)

    @njit(fastmath={"reassoc", "contract"})
    def loop(dst, off, alpha, src, n):
        for d in range(n):
            dst[off + uint64(d)] += alpha * src[d]

    for n in (0, 1, 3, 4, 5, 7, 8, 9, 16, 31, 32, 33, 69, 100):
        for off in (0, 1, 5, 37):
            dst = rng.standard_normal(150).astype(dtype)
            src = rng.standard_normal(100).astype(dtype)
            alpha = dtype(rng.standard_normal())
            a, b = dst.copy(), dst.copy()
            helper(a, np.uint64(off), alpha, src, n)
            loop(b, np.uint64(off), alpha, src, n)
            assert np.array_equal(a, b), (n, off)
            assert np.array_equal(np.delete(a, np.arange(off, off + n)),
                                  np.delete(dst, np.arange(off, off + n)))  # fmt: skip
            if n:
                assert not np.array_equal(a[off : off + n], dst[off : off + n])


# ---------------------------------------------------------------------------- check and bench tables


def test_registry_check_and_bench_cases():
    from deformnp.cases import bench_cases

    case = check_cases("ms_deform_attn")[0]
    assert dn.gradcheck(case.fn, case.inputs())
    (bench,) = bench_cases("ms_deform_attn", "cpu")
    assert bench is not None and bench_cases("ms_deform_attn", "cuda") == []
    assert bench.forward().shape == (1, 1360, 256)
    data = reference_attention()
    assert data["value"].shape == (1, 1360, 8, 32) and data["value"].dtype == np.float32


# ---------------------------------------------------------------------------- CUDA (simulator)


def test_cuda_kernels_match_cpu(rng):
    # the CUDA kernel module the op dispatches to for device arrays, called with the op's
    # arguments (under the simulator unless DEFORMNP_REAL_GPU=1)
    from deformnp import cuda

    if not cuda.is_available():
        pytest.skip("numba-cuda (or its simulator) is not available")
    from deformnp.kernels.cuda import attention as kernels

    value, shapes, starts, loc, attn = make_inputs(rng, N=1, Lq=2, M=2, D=2, P=2)
    g = rng.standard_normal((1, 2, 4))
    # the kernel contract: float arrays on the device, the level arrays on the host
    dev = [cuda.to_device(value), shapes, starts, cuda.to_device(loc), cuda.to_device(attn)]
    out = kernels.ms_deform_attn_forward(*dev)
    np.testing.assert_allclose(
        out.copy_to_host(), ms_deform_attn_forward(value, shapes, starts, loc, attn), rtol=1e-12
    )
    grads = kernels.ms_deform_attn_backward(cuda.to_device(g), *dev, (True, True, True))
    for got, want in zip(grads, ms_deform_attn_backward(g, value, shapes, starts, loc, attn)):
        np.testing.assert_allclose(got.copy_to_host(), want, rtol=1e-10, atol=1e-12)


# ---------------------------------------------------------------------------- torch parity


def torch_core(value, spatial_shapes, sampling_locations, attention_weights):
    """Deformable-DETR's ms_deform_attn_core_pytorch, written here with torch."""
    import torch
    import torch.nn.functional as F

    N, S, M, D = value.shape
    _, Lq, M, L, P, _ = sampling_locations.shape
    value_list = value.split([int(h) * int(w) for h, w in spatial_shapes], dim=1)
    grids = 2 * sampling_locations - 1
    samples = []
    for lid, (h, w) in enumerate(spatial_shapes):
        v = value_list[lid].flatten(2).transpose(1, 2).reshape(N * M, D, int(h), int(w))
        grid = grids[:, :, :, lid].transpose(1, 2).flatten(0, 1)
        samples.append(
            F.grid_sample(v, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
        )
    weights = attention_weights.transpose(1, 2).reshape(N * M, 1, Lq, L * P)
    out = (torch.stack(samples, dim=-2).flatten(-2) * weights).sum(-1).view(N, M * D, Lq)
    return out.transpose(1, 2).contiguous()


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_torch_parity_forward_and_gradients(rng, dtype):
    torch = pytest.importorskip("torch")
    levels = [(6, 5), (3, 3), (2, 1)]
    value, shapes, starts, loc, attn = make_inputs(
        rng, levels=levels, N=2, Lq=5, M=3, D=4, P=3, dtype=dtype
    )
    # keep off the kinks so both implementations take the same one-sided slopes
    loc = locations_off_kinks(rng, shapes, (2, 5, 3), 3).astype(dtype)
    g = rng.standard_normal((2, 5, 12)).astype(dtype)
    tv, tl, ta = (torch.tensor(x, requires_grad=True) for x in (value, loc, attn))
    t_out = torch_core(tv, [tuple(s) for s in shapes.tolist()], tl, ta)
    t_out.backward(torch.from_numpy(g))
    out = ms_deform_attn_forward(value, shapes, starts, loc, attn)
    grads = ms_deform_attn_backward(g, value, shapes, starts, loc, attn)
    tol = 1e-12 if dtype == np.float64 else 1e-5
    assert rel_err(out, t_out.detach().numpy()) < tol
    for ours, theirs in zip(grads, (tv.grad, tl.grad, ta.grad)):
        assert rel_err(ours, theirs.numpy()) < (1e-11 if dtype == np.float64 else 2e-5)


def test_torch_parity_outside_the_map(rng):
    torch = pytest.importorskip("torch")
    value, shapes, starts, loc, attn = make_inputs(rng, lo=-0.8, hi=1.8)
    t_out = torch_core(
        torch.from_numpy(value),
        [tuple(s) for s in shapes.tolist()],
        torch.from_numpy(loc),
        torch.from_numpy(attn),
    )
    assert rel_err(ms_deform_attn_forward(value, shapes, starts, loc, attn), t_out.numpy()) < 1e-12


# ---------------------------------------------------------------------------- MSDeformAttn


def test_msdeformattn_parameters_and_init():
    m = MSDeformAttn(d_model=16, n_levels=3, n_heads=4, n_points=2)
    names = {n: p.shape for n, p in m.named_parameters()}
    assert names == {
        "sampling_offsets.weight": (4 * 3 * 2 * 2, 16),
        "sampling_offsets.bias": (48,),
        "attention_weights.weight": (24, 16),
        "attention_weights.bias": (24,),
        "value_proj.weight": (16, 16),
        "value_proj.bias": (16,),
        "output_proj.weight": (16, 16),
        "output_proj.bias": (16,),
    }
    assert np.all(m.sampling_offsets.weight.numpy() == 0)
    bias = m.sampling_offsets.bias.numpy().reshape(4, 3, 2, 2)
    # head m points along (cos, sin)(2 pi m / 4) scaled to max-abs 1, times (p + 1)
    dirs = np.array([[1, 0], [0, 1], [-1, 0], [0, -1]], np.float64)
    for p in range(2):
        np.testing.assert_allclose(
            bias[:, :, p], np.repeat(dirs[:, None] * (p + 1), 3, 1), atol=1e-6
        )
    assert np.all(m.attention_weights.weight.numpy() == 0)
    assert np.all(m.attention_weights.bias.numpy() == 0)
    assert np.all(m.value_proj.bias.numpy() == 0) and np.all(m.output_proj.bias.numpy() == 0)
    bound = np.sqrt(6 / 32)
    for w in (m.value_proj.weight.numpy(), m.output_proj.weight.numpy()):
        assert np.abs(w).max() <= bound and w.std() > bound / 4
    with pytest.raises(ValueError, match="d_model must be divisible by n_heads, but got 10 and 4"):
        MSDeformAttn(d_model=10, n_heads=4)


def _msda_inputs(rng, N=2, Lq=4, d_model=8, levels=((4, 5), (2, 3)), ref_dim=2, dtype=np.float64):
    shapes, starts = level_layout(levels)
    S = int(shapes.prod(axis=1).sum())
    query = rng.standard_normal((N, Lq, d_model)).astype(dtype)
    feats = rng.standard_normal((N, S, d_model)).astype(dtype)
    ref = rng.uniform(0.1, 0.9, (N, Lq, len(levels), ref_dim)).astype(dtype)
    if ref_dim == 4:
        ref[..., 2:] = rng.uniform(0.1, 0.5, ref[..., 2:].shape)
    mask = rng.random((N, S)) < 0.25
    return query, ref, feats, shapes, starts, mask


def _randomize(module, rng, scale=0.3):
    for p in module.parameters():
        p.data = (p.data + scale * rng.standard_normal(p.shape)).astype(p.dtype)


def test_msdeformattn_matches_core_op_by_hand(rng):
    m = MSDeformAttn(d_model=8, n_levels=2, n_heads=2, n_points=3, dtype=np.float64)
    _randomize(m, rng)
    query, ref, feats, shapes, starts, mask = _msda_inputs(rng)
    out = m(query, ref, feats, shapes, starts, mask).numpy()
    lin = lambda layer, x: x @ layer.weight.numpy().T + layer.bias.numpy()  # noqa: E731
    value = np.where(mask[..., None], 0.0, lin(m.value_proj, feats)).reshape(2, 26, 2, 4)
    off = lin(m.sampling_offsets, query).reshape(2, 4, 2, 2, 3, 2)
    logits = lin(m.attention_weights, query).reshape(2, 4, 2, 6)
    w = np.exp(logits - logits.max(-1, keepdims=True))
    w = (w / w.sum(-1, keepdims=True)).reshape(2, 4, 2, 2, 3)
    norm = np.array([[5, 4], [3, 2]], np.float64)
    loc = ref[:, :, None, :, None, :] + off / norm[None, None, None, :, None, :]
    expected = lin(m.output_proj, reference(value, shapes, starts, loc, w))
    assert rel_err(out, expected) < 1e-12


def test_msdeformattn_gradcheck(rng):
    # tiny dims, float64; random weights move the sampling points off the reference points and
    # off the kinks (with probability one; eps is far below any distance to a kink)
    m = MSDeformAttn(d_model=4, n_levels=2, n_heads=2, n_points=2, dtype=np.float64)
    _randomize(m, rng, 0.05)
    query, ref, feats, shapes, starts, mask = _msda_inputs(
        rng, N=1, Lq=2, d_model=4, levels=((3, 3), (2, 2))
    )
    for ref_dim in (2, 4):
        ref = rng.uniform(0.2, 0.8, (1, 2, 2, ref_dim))
        params = tuple(dn.tensor(p.numpy(), requires_grad=True) for p in m.parameters())
        names = [n for n, _ in m.named_parameters()]

        def fn(q, r, f, *ps):
            return call_with_parameters(m, ps, m, q, r, f, shapes, starts, mask)

        inputs = (
            dn.tensor(query, requires_grad=True),
            dn.tensor(ref, requires_grad=True),
            dn.tensor(feats, requires_grad=True),
            *params,
        )
        assert dn.gradcheck(
            fn, inputs, names=["query", "reference_points", "input_flatten", *names]
        )


def test_msdeformattn_validation(rng):
    m = MSDeformAttn(d_model=8, n_levels=2, n_heads=2, n_points=1)
    query, ref, feats, shapes, starts, mask = _msda_inputs(rng, dtype=np.float32)
    with pytest.raises(ValueError, match=r"Last dim of reference_points must be 2 or 4, but get 3"):
        m(query, np.zeros((2, 4, 2, 3), np.float32), feats, shapes, starts)
    with pytest.raises(ValueError, match=r"input_flatten has S = 25 positions"):
        m(query, ref, feats[:, 1:], shapes, starts)
    with pytest.raises(ValueError, match=r"query must be \(N, Lq, 8\)"):
        m(query[..., :4], ref, feats, shapes, starts)
    with pytest.raises(ValueError, match=r"input_spatial_shapes must be \(n_levels, 2\)"):
        m(query, ref, feats, shapes[:1], starts[:1])
    with pytest.raises(ValueError, match=r"input_padding_mask must be \(N, S\)"):
        m(query, ref, feats, shapes, starts, mask[:, :3])
    with pytest.raises(ValueError, match=r"reference_points must be \(N, Lq, n_levels"):
        m(query, ref[:, :, :1], feats, shapes, starts)


def test_msdeformattn_padding_mask_zeroes_values(rng):
    m = MSDeformAttn(d_model=8, n_levels=2, n_heads=2, n_points=2, dtype=np.float64)
    _randomize(m, rng)
    query, ref, feats, shapes, starts, mask = _msda_inputs(rng)
    masked = m(query, ref, feats, shapes, starts, mask).numpy()
    changed = feats.copy()
    changed[mask] = 1e3 * rng.standard_normal(changed[mask].shape)  # padding content is ignored
    np.testing.assert_allclose(
        m(query, ref, changed, shapes, starts, mask).numpy(), masked, rtol=1e-12
    )
    assert not np.allclose(m(query, ref, feats, shapes, starts).numpy(), masked)


class _TorchMSDeformAttn:
    """Deformable-DETR's MSDeformAttn forward, re-implemented with torch for the parity test."""

    def __init__(self, torch, d_model, n_levels, n_heads, n_points):
        nn = torch.nn
        self.torch = torch
        self.d_model, self.n_levels, self.n_heads, self.n_points = (
            d_model,
            n_levels,
            n_heads,
            n_points,
        )
        self.module = nn.ModuleDict(
            {
                "sampling_offsets": nn.Linear(d_model, n_heads * n_levels * n_points * 2),
                "attention_weights": nn.Linear(d_model, n_heads * n_levels * n_points),
                "value_proj": nn.Linear(d_model, d_model),
                "output_proj": nn.Linear(d_model, d_model),
            }
        ).double()

    def __call__(self, query, reference_points, input_flatten, shapes, starts, mask=None):
        torch = self.torch
        F = torch.nn.functional
        mod = self.module
        N, Len_q, _ = query.shape
        N, Len_in, _ = input_flatten.shape
        M, L, P = self.n_heads, self.n_levels, self.n_points
        value = mod["value_proj"](input_flatten)
        if mask is not None:
            value = value.masked_fill(mask[..., None], float(0))
        value = value.view(N, Len_in, M, self.d_model // M)
        offsets = mod["sampling_offsets"](query).view(N, Len_q, M, L, P, 2)
        weights = mod["attention_weights"](query).view(N, Len_q, M, L * P)
        weights = F.softmax(weights, -1).view(N, Len_q, M, L, P)
        if reference_points.shape[-1] == 2:
            normalizer = torch.stack([shapes[..., 1], shapes[..., 0]], -1)
            loc = (
                reference_points[:, :, None, :, None, :]
                + offsets / normalizer[None, None, None, :, None, :]
            )
        else:
            loc = (
                reference_points[:, :, None, :, None, :2]
                + offsets / P * reference_points[:, :, None, :, None, 2:] * 0.5
            )
        out = torch_core(value, [tuple(s) for s in shapes.tolist()], loc, weights)
        return mod["output_proj"](out)


@pytest.mark.parametrize("ref_dim", [2, 4])
def test_msdeformattn_matches_torch_with_same_weights(rng, ref_dim):
    torch = pytest.importorskip("torch")
    theirs = _TorchMSDeformAttn(torch, 8, 2, 2, 3)
    for p in theirs.module.parameters():
        torch.nn.init.normal_(p, std=0.3)
    ours = MSDeformAttn(d_model=8, n_levels=2, n_heads=2, n_points=3, dtype=np.float64)
    ours.load_state_dict(theirs.module.state_dict())  # loads by Deformable-DETR's names
    query, ref, feats, shapes, starts, mask = _msda_inputs(rng, ref_dim=ref_dim)
    tq, tr, tf = (torch.tensor(x, requires_grad=True) for x in (query, ref, feats))
    t_out = theirs(
        tq, tr, tf, torch.from_numpy(shapes), torch.from_numpy(starts), torch.from_numpy(mask)
    )
    g = rng.standard_normal(t_out.shape)
    t_out.backward(torch.from_numpy(g))
    q, r, f = (dn.tensor(x, requires_grad=True) for x in (query, ref, feats))
    out = ours(q, r, f, shapes, starts, mask)
    out.backward(g)
    assert rel_err(out.numpy(), t_out.detach().numpy()) < 1e-12
    for a, b in ((q, tq), (r, tr), (f, tf)):
        assert rel_err(a.grad, b.grad.numpy()) < 1e-10
    theirs_params = dict(theirs.module.named_parameters())
    for name, p in ours.named_parameters():
        assert rel_err(p.grad, theirs_params[name].grad.numpy()) < 1e-10, name


def test_msdeformattn_init_matches_deformable_detr_bias():
    torch = pytest.importorskip("torch")
    # Deformable-DETR's _reset_parameters grid, computed with torch
    import math

    M, L, P = 8, 4, 4
    thetas = torch.arange(M, dtype=torch.float32) * (2.0 * math.pi / M)
    grid = torch.stack([thetas.cos(), thetas.sin()], -1)
    grid = (grid / grid.abs().max(-1, keepdim=True)[0]).view(M, 1, 1, 2).repeat(1, L, P, 1)
    for i in range(P):
        grid[:, :, i, :] *= i + 1
    ours = MSDeformAttn().sampling_offsets.bias.numpy()
    np.testing.assert_allclose(ours, grid.view(-1).numpy(), rtol=1e-6, atol=1e-6)


def test_msdeformattn_sampling_at_initialisation(rng):
    # freshly initialised: offsets are the bias grid in pixels of each level, weights uniform
    m = MSDeformAttn(d_model=8, n_levels=2, n_heads=2, n_points=3)
    query, ref, _, shapes, _, _ = _msda_inputs(rng, dtype=np.float32)
    loc, w = m.sampling(query, ref, shapes)
    assert loc.shape == (2, 4, 2, 2, 3, 2) and w.shape == (2, 4, 2, 2, 3)
    np.testing.assert_allclose(w.numpy(), 1 / 6, rtol=1e-6)
    bias = m.sampling_offsets.bias.numpy().reshape(2, 2, 3, 2)
    norm = np.array([[5, 4], [3, 2]], np.float32)  # (W_l, H_l)
    expected = ref[:, :, None, :, None, :] + bias[None, None] / norm[None, None, None, :, None, :]
    np.testing.assert_allclose(loc.numpy(), expected, rtol=1e-6, atol=1e-7)
