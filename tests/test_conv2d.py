"""conv2d: against a naive loop reference, gradcheck of input/weight/bias, edge cases, errors."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from reference.conv2d import conv2d_ref

import deformnp as dn
import deformnp.functional as F

# (id, input shape, weight shape, kwargs); padding in the reference is (top, bottom, left, right)
CONFIGS = [
    ("3x3_pad1", (2, 3, 5, 6), (4, 3, 3, 3), {"padding": 1}),
    ("stride2", (2, 3, 7, 6), (4, 3, 3, 3), {"stride": 2, "padding": 1}),
    (
        "nonsquare_kernel_stride_pad",
        (1, 2, 6, 7),
        (3, 2, 2, 3),
        {"stride": (2, 1), "padding": (1, 0)},
    ),
    ("dilation", (1, 2, 7, 7), (3, 2, 3, 2), {"dilation": (2, 3), "padding": (2, 1)}),
    ("groups2", (2, 4, 5, 5), (6, 2, 3, 3), {"groups": 2, "padding": 1}),
    (
        "groups2_strided_dilated",
        (1, 4, 7, 8),
        (4, 2, 2, 3),
        {"groups": 2, "stride": (1, 2), "dilation": (2, 1)},
    ),
    ("depthwise", (2, 3, 6, 5), (3, 1, 3, 3), {"groups": 3, "padding": 1}),
    ("depthwise_multiplier2", (1, 3, 6, 5), (6, 1, 3, 2), {"groups": 3, "padding": (1, 0)}),
    ("depthwise_5x5_stride3", (2, 2, 9, 8), (2, 1, 5, 5), {"groups": 2, "stride": 3, "padding": 2}),
    ("depthwise_dilated", (1, 2, 7, 7), (2, 1, 3, 3), {"groups": 2, "dilation": 2, "padding": 2}),
    (
        "depthwise_taps_outside",
        (1, 2, 1, 2),
        (2, 1, 5, 5),
        {"groups": 2, "stride": 3, "padding": 2},
    ),
    (
        "depthwise_no_tap_inside",
        (1, 2, 1, 1),
        (2, 1, 1, 1),
        {"groups": 2, "stride": 2, "padding": 1},
    ),
    ("taps_outside", (1, 2, 1, 2), (3, 2, 5, 5), {"stride": 3, "padding": 2}),
    ("pointwise", (2, 3, 4, 5), (4, 3, 1, 1), {}),
    ("pointwise_stride2", (2, 3, 5, 5), (4, 3, 1, 1), {"stride": 2}),
    ("pointwise_padded", (1, 3, 3, 3), (2, 3, 1, 1), {"padding": 1}),
    ("same_even_kernel", (1, 2, 5, 6), (3, 2, 4, 2), {"padding": "same"}),
    ("same_dilated", (1, 2, 6, 6), (3, 2, 3, 3), {"padding": "same", "dilation": 2}),
    ("valid", (1, 2, 5, 6), (3, 2, 3, 3), {"padding": "valid"}),
    ("kernel_covers_input", (2, 2, 3, 3), (2, 2, 3, 3), {}),
    ("single_channel", (2, 1, 4, 4), (2, 1, 2, 2), {"stride": 2}),
]


def _ref_padding(kwargs, wshape):
    p = kwargs.get("padding", 0)
    kh, kw = wshape[2:]
    dil = kwargs.get("dilation", 1)
    dh, dw = (dil, dil) if isinstance(dil, int) else dil
    if p == "valid":
        return (0, 0, 0, 0)
    if p == "same":  # odd totals put the extra pixel at the bottom/right (torch)
        th, tw = dh * (kh - 1), dw * (kw - 1)
        return (th // 2, th - th // 2, tw // 2, tw - tw // 2)
    ph, pw = (p, p) if isinstance(p, int) else p
    return (ph, ph, pw, pw)


def _ref(x, w, b, kwargs):
    s = kwargs.get("stride", 1)
    d = kwargs.get("dilation", 1)
    return conv2d_ref(
        x, w, b,
        stride=(s, s) if isinstance(s, int) else s,
        padding=_ref_padding(kwargs, w.shape),
        dilation=(d, d) if isinstance(d, int) else d,
        groups=kwargs.get("groups", 1),
    )  # fmt: skip


def _data(xs, ws, seed=0):
    rng = np.random.default_rng(seed)
    return rng.standard_normal(xs), rng.standard_normal(ws), rng.standard_normal(ws[0])


def _close(actual, expected, rel):
    scale = max(1.0, float(np.abs(expected).max(initial=0.0)))
    np.testing.assert_allclose(actual, expected, rtol=rel, atol=rel * scale)


@pytest.mark.parametrize("cfg", CONFIGS, ids=[c[0] for c in CONFIGS])
@pytest.mark.parametrize("bias", [True, False])
def test_matches_naive_reference_float64(cfg, bias):
    _, xs, ws, kw = cfg
    x, w, b = _data(xs, ws)
    b = b if bias else None
    out = F.conv2d(x, w, b, **kw)
    assert out.dtype == np.float64
    _close(out.numpy(), _ref(x, w, b, kw), 1e-12)


@pytest.mark.parametrize("cfg", CONFIGS, ids=[c[0] for c in CONFIGS])
def test_matches_naive_reference_float32(cfg):
    _, xs, ws, kw = cfg
    x, w, b = _data(xs, ws)
    f = np.float32
    out = F.conv2d(x.astype(f), w.astype(f), b.astype(f), **kw)
    assert out.dtype == np.float32
    ref = _ref(x.astype(f).astype(np.float64), w.astype(f).astype(np.float64), b.astype(f), kw)
    _close(out.numpy(), ref, 1e-5)


@pytest.mark.parametrize("cfg", CONFIGS, ids=[c[0] for c in CONFIGS])
def test_gradcheck_input_weight_bias(cfg):
    _, xs, ws, kw = cfg
    x, w, b = (dn.tensor(a, requires_grad=True) for a in _data(xs, ws))
    assert dn.gradcheck(
        lambda x, w, b: F.conv2d(x, w, b, **kw), (x, w, b), names=("input", "weight", "bias")
    )


def test_gradients_of_float32_match_float64():
    x, w, b = _data((2, 4, 6, 6), (6, 2, 3, 3))
    grads = {}
    for dt in (np.float32, np.float64):
        ts = [dn.tensor(a.astype(dt), requires_grad=True) for a in (x, w, b)]
        F.conv2d(*ts, stride=1, padding=1, groups=2).sum().backward()
        grads[dt] = [t.grad for t in ts]
        assert all(g.dtype == dt for g in grads[dt])
    for g32, g64 in zip(grads[np.float32], grads[np.float64]):
        _close(g32, g64, 1e-5)


@pytest.mark.parametrize(
    "xs, ws, kw",
    [
        ((2, 4, 9, 9), (3, 4, 3, 3), {"padding": 1}),  # stride 1: flat col2im
        ((2, 4, 9, 9), (3, 4, 3, 3), {"stride": 2, "padding": 1}),  # strided col2im
        ((2, 4, 9, 9), (4, 1, 5, 5), {"groups": 4, "padding": 2}),  # depthwise taps
    ],
)
def test_backward_is_deterministic(xs, ws, kw):
    x, w, b = _data(xs, ws)
    runs = []
    for _ in range(2):
        ts = [dn.tensor(a, requires_grad=True) for a in (x, w, b)]
        F.conv2d(*ts, **kw).sum().backward()
        runs.append([t.grad.copy() for t in ts])
    for first, second in zip(*runs):
        np.testing.assert_array_equal(first, second)


@pytest.mark.parametrize("groups", [1, 2])  # general and depthwise paths
@pytest.mark.parametrize("wanted", ["input", "weight", "bias"])
def test_only_requested_gradients_are_computed(groups, wanted):
    x, w, b = _data((1, 2, 4, 4), (4, 2 // groups, 3, 3))
    ts = {
        "input": dn.tensor(x, requires_grad=wanted == "input"),
        "weight": dn.tensor(w, requires_grad=wanted == "weight"),
        "bias": dn.tensor(b, requires_grad=wanted == "bias"),
    }
    r = np.random.default_rng(3).standard_normal((1, 4, 4, 4))
    F.conv2d(ts["input"], ts["weight"], ts["bias"], padding=1, groups=groups).backward(r)
    full = [dn.tensor(a, requires_grad=True) for a in (x, w, b)]
    F.conv2d(*full, padding=1, groups=groups).backward(r)
    for k, (name, t) in enumerate(ts.items()):
        if name == wanted:
            np.testing.assert_array_equal(t.grad, full[k].grad)
        else:
            assert t.grad is None


def test_empty_batch_gives_empty_output_and_zero_grads():
    x, w, b = _data((0, 3, 5, 5), (4, 3, 3, 3))
    ts = [dn.tensor(a, requires_grad=True) for a in (x, w, b)]
    out = F.conv2d(*ts, padding=1)
    assert out.shape == (0, 4, 5, 5)
    out.sum().backward()
    assert ts[0].grad.shape == (0, 3, 5, 5)
    np.testing.assert_array_equal(ts[1].grad, 0)
    np.testing.assert_array_equal(ts[2].grad, 0)
    dw = [dn.tensor(a, requires_grad=True) for a in _data((0, 3, 5, 5), (3, 1, 3, 3))]
    F.conv2d(*dw, groups=3).sum().backward()
    np.testing.assert_array_equal(dw[1].grad, 0)


def test_unbatched_input():
    x, w, b = _data((3, 5, 5), (2, 3, 3, 3))
    out = F.conv2d(x, w, b, padding=1)
    assert out.shape == (2, 5, 5)
    _close(out.numpy(), _ref(x[None], w, b, {"padding": 1})[0], 1e-12)
    assert dn.gradcheck(lambda x: F.conv2d(x, w, b), (dn.tensor(x, requires_grad=True),))


def test_accepts_tensors_and_arrays_and_lists():
    x, w, b = _data((1, 1, 3, 3), (1, 1, 2, 2))
    a = F.conv2d(dn.tensor(x), dn.tensor(w), dn.tensor(b))
    c = F.conv2d(x, w.tolist(), list(b))
    np.testing.assert_array_equal(a.numpy(), c.numpy())


@given(
    n=st.integers(1, 2),
    g=st.integers(1, 3),
    cg=st.integers(1, 2),
    og=st.integers(1, 2),
    kh=st.integers(1, 3),
    kw=st.integers(1, 3),
    sh=st.integers(1, 3),
    sw=st.integers(1, 3),
    ph=st.integers(0, 2),
    pw=st.integers(0, 2),
    dh=st.integers(1, 2),
    dw=st.integers(1, 2),
    extra_h=st.integers(0, 4),
    extra_w=st.integers(0, 4),
)
def test_property_matches_reference(n, g, cg, og, kh, kw, sh, sw, ph, pw, dh, dw, extra_h, extra_w):
    h = max(1, dh * (kh - 1) + 1 - 2 * ph) + extra_h
    wd = max(1, dw * (kw - 1) + 1 - 2 * pw) + extra_w
    x, w, b = _data((n, g * cg, h, wd), (g * og, cg, kh, kw), seed=n + 10 * kh + 100 * sw)
    kwargs = {"stride": (sh, sw), "padding": (ph, pw), "dilation": (dh, dw), "groups": g}
    out = F.conv2d(x, w, b, **kwargs)
    _close(out.numpy(), _ref(x, w, b, kwargs), 1e-12)
    # backward against the adjoint identity <conv(x), r> = <x, conv^T(r)>: check through autograd
    xt, wt = dn.tensor(x, requires_grad=True), dn.tensor(w, requires_grad=True)
    r = np.random.default_rng(0).standard_normal(out.shape)
    F.conv2d(xt, wt, None, **kwargs).backward(r)
    eps = 1e-6
    dx = np.random.default_rng(1).standard_normal(x.shape)
    fd = ((_ref(x + eps * dx, w, None, kwargs) - _ref(x - eps * dx, w, None, kwargs)) * r).sum() / (
        2 * eps
    )
    assert abs(fd - (xt.grad * dx).sum()) <= 1e-6 * max(1.0, abs(fd))
    dwv = np.random.default_rng(2).standard_normal(w.shape)
    fd = (
        (_ref(x, w + eps * dwv, None, kwargs) - _ref(x, w - eps * dwv, None, kwargs)) * r
    ).sum() / (2 * eps)
    assert abs(fd - (wt.grad * dwv).sum()) <= 1e-6 * max(1.0, abs(fd))


@pytest.mark.parametrize(
    "args, kwargs, err, match",
    [
        (
            ((2, 3, 5), (4, 3, 3, 3)),
            {},
            ValueError,
            "conv2d: input has 2 channels, expected weight.shape",
        ),
        (
            ((1, 2, 5, 5, 1), (4, 2, 3, 3)),
            {},
            ValueError,
            r"conv2d: input must be 4-d \(N, C, H, W\) or 3-d",
        ),
        (((1, 2, 5, 5), (4, 2, 3)), {}, ValueError, "conv2d: weight must be 4-d"),
        (
            ((1, 4, 5, 5), (4, 2, 3, 3)),
            {},
            ValueError,
            r"conv2d: input has 4 channels, expected weight.shape\[1\]\*groups = 2\*1 = 2",
        ),
        (
            ((1, 4, 5, 5), (3, 2, 3, 3)),
            {"groups": 2},
            ValueError,
            "conv2d: out_channels 3 is not divisible by groups 2",
        ),
        (
            ((1, 4, 5, 5), (4, 2, 3, 3)),
            {"groups": 0},
            ValueError,
            "conv2d: groups must be a positive int, got 0",
        ),
        (
            ((1, 2, 5, 5), (4, 2, 3, 3)),
            {"stride": 0},
            ValueError,
            "conv2d: stride must be >= 1, got 0",
        ),
        (
            ((1, 2, 5, 5), (4, 2, 3, 3)),
            {"padding": -1},
            ValueError,
            "conv2d: padding must be >= 0, got -1",
        ),
        (
            ((1, 2, 5, 5), (4, 2, 3, 3)),
            {"dilation": (1, 0)},
            ValueError,
            r"conv2d: dilation must be >= 1, got \(1, 0\)",
        ),
        (
            ((1, 2, 5, 5), (4, 2, 3, 3)),
            {"stride": (1, 2, 3)},
            ValueError,
            "conv2d: stride must be an int or a pair",
        ),
        (
            ((1, 2, 5, 5), (4, 2, 3, 3)),
            {"padding": "full"},
            ValueError,
            "conv2d: padding must be an int, a pair, 'valid' or 'same'",
        ),
        (
            ((1, 2, 5, 5), (4, 2, 3, 3)),
            {"padding": "same", "stride": 2},
            ValueError,
            "conv2d: padding='same' is not supported for strided convolutions",
        ),
        (((1, 2, 2, 5), (4, 2, 3, 3)), {}, ValueError, "conv2d: output size is too small"),
        (
            ((1, 2, 5, 5), (4, 2, 3, 3)),
            {"bias": 5},
            ValueError,
            r"conv2d: bias must have shape \(out_channels,\) = \(4,\), got \(5,\)",
        ),
    ],
)
def test_validation_messages(args, kwargs, err, match):
    xs, ws = args
    kwargs = dict(kwargs)
    bias = np.zeros(kwargs.pop("bias")) if "bias" in kwargs else None
    with pytest.raises(err, match=match):
        F.conv2d(np.zeros(xs), np.zeros(ws), bias, **kwargs)


def test_dtype_errors():
    with pytest.raises(
        TypeError,
        match="conv2d: inputs must share one float dtype, got input float32, weight float64",
    ):
        F.conv2d(np.zeros((1, 1, 3, 3), np.float32), np.zeros((1, 1, 2, 2)))
    with pytest.raises(TypeError, match="conv2d: input must be float32 or float64, got int64"):
        F.conv2d(np.zeros((1, 1, 3, 3), np.int64), np.zeros((1, 1, 2, 2)))
    with pytest.raises(TypeError, match="conv2d: bias must be float32 or float64"):
        F.conv2d(np.zeros((1, 1, 3, 3)), np.zeros((1, 1, 2, 2)), np.zeros(1, np.int32))


def test_registered_check_cases_pass():
    from deformnp.cases import check_cases

    cases = check_cases("conv2d")
    assert len(cases) == 2
    for case in cases:
        assert dn.gradcheck(case.fn, case.inputs(), names=case.names)


@pytest.mark.parametrize(
    "xs, ws, kw",
    [
        ((2, 4, 6, 6), (4, 4, 3, 3), {"padding": 1}),
        ((2, 4, 6, 6), (2, 2, 3, 3), {"padding": 1, "groups": 2}),  # one output per group
        ((2, 4, 6, 6), (3, 4, 1, 1), {}),
    ],
)
def test_results_do_not_share_scratch_memory(xs, ws, kw):
    """conv2d reuses per-thread scratch buffers for temporaries: nothing it returns may live
    in them, so a later call must leave earlier outputs and gradients unchanged."""
    x1, w1, _ = _data(xs, ws, seed=1)
    x2, w2, _ = _data(xs, ws, seed=2)
    t1 = [dn.tensor(a, requires_grad=True) for a in (x1, w1)]
    out1 = F.conv2d(*t1, **kw)
    out1.sum().backward()
    kept = [out1.numpy().copy(), t1[0].grad.copy(), t1[1].grad.copy()]
    t2 = [dn.tensor(a, requires_grad=True) for a in (x2, w2)]
    out2 = F.conv2d(*t2, **kw)
    (out2 * 3).sum().backward()
    for a, b in zip(kept, [out1.numpy(), t1[0].grad, t1[1].grad]):
        np.testing.assert_array_equal(a, b)
    _close(out1.numpy(), _ref(x1, w1, None, kw), 1e-12)
