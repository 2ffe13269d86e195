"""deform_conv2d (docs/ops/deform_conv.rst) and its layers: reference, gradcheck, edge cases,
validation, property tests, determinism, and parity with torchvision.ops.deform_conv2d."""

from __future__ import annotations

import numba
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from reference import deform_conv as ref
from threadpoolctl import threadpool_limits

import deformnp as dn
from deformnp import ops
from deformnp.cases import check_cases
from deformnp.cases.inputs import conv_offsets_off_kinks
from deformnp.kernels.cpu import deform_conv as kernels
from deformnp.kernels.cpu.sampling import SERIAL_WORK

# (B, Cin, H, W, Cout, kh, kw, groups, offset_groups, stride, padding, dilation, mask, bias)
CONFIGS = [
    (2, 4, 6, 5, 6, 3, 3, 1, 1, 1, 1, 1, True, True),
    (2, 4, 6, 5, 6, 3, 2, 2, 2, (2, 1), (0, 2), (1, 2), True, False),
    (1, 6, 7, 7, 4, 2, 3, 2, 3, (1, 2), (2, 1), (2, 1), False, True),
    (3, 8, 5, 6, 8, 3, 3, 4, 2, 1, 1, 1, True, True),
    (1, 3, 4, 4, 2, 1, 1, 1, 3, 1, 0, 1, True, True),  # 1x1 kernel, depth-wise offsets
    (1, 2, 3, 2, 3, 5, 4, 1, 1, 1, (2, 2), 1, True, False),  # kernel larger than the input
    (2, 4, 9, 8, 4, 3, 3, 4, 4, 2, 1, 2, False, False),  # depth-wise, stride 2, dilation 2
]


def out_size(H, W, kh, kw, stride, padding, dilation):
    def p(v):
        return (v, v) if isinstance(v, int) else v

    (sh, sw), (ph, pw), (dh, dw) = p(stride), p(padding), p(dilation)
    return (H + 2 * ph - (dh * (kh - 1) + 1)) // sh + 1, (
        W + 2 * pw - (dw * (kw - 1) + 1)
    ) // sw + 1


def make(rng, cfg, dtype=np.float64, off_kinks=False, offset_scale=2.5):
    """Inputs for one configuration. With ``off_kinks`` every offset is an integer plus a
    fractional part in [0.1, 0.9]; the base sampling positions are integers, so every sampling
    coordinate stays off the integer kinks and off the border lines -1, 0, H-1, H (finite
    differences are valid there, docs/guide/autograd.rst)."""
    B, Cin, H, W, Cout, kh, kw, g, G, stride, padding, dilation, use_mask, use_bias = cfg
    Hout, Wout = out_size(H, W, kh, kw, stride, padding, dilation)
    K = kh * kw
    if off_kinks:
        off = conv_offsets_off_kinks(rng, (B, 2 * G * K, Hout, Wout))
    else:
        off = rng.uniform(-offset_scale, offset_scale, (B, 2 * G * K, Hout, Wout))
    args = dict(
        input=rng.standard_normal((B, Cin, H, W)).astype(dtype),
        offset=off.astype(dtype),
        weight=rng.standard_normal((Cout, Cin // g, kh, kw)).astype(dtype),
        bias=rng.standard_normal(Cout).astype(dtype) if use_bias else None,
        stride=stride,
        padding=padding,
        dilation=dilation,
        mask=rng.uniform(0.1, 1.0, (B, G * K, Hout, Wout)).astype(dtype) if use_mask else None,
    )
    return args


def rel_err(a, b):
    scale = max(np.abs(b).max(initial=0.0), 1e-300)
    return np.abs(np.asarray(a, np.float64) - b).max(initial=0.0) / scale


# ------------------------------------------------------------------ matches the reference


@pytest.mark.parametrize("cfg", CONFIGS)
def test_matches_reference_float64(rng, cfg):
    a = make(rng, cfg)
    out = ops.deform_conv2d(**a)
    assert isinstance(out, dn.Tensor) and out.dtype == np.float64
    expected = ref.deform_conv2d(**a)
    assert out.shape == expected.shape
    assert rel_err(out.numpy(), expected) < 1e-12


@pytest.mark.parametrize("cfg", CONFIGS[:4])
def test_matches_reference_float32(rng, cfg):
    a = make(rng, cfg, np.float32)
    out = ops.deform_conv2d(**a)
    assert out.dtype == np.float32
    assert rel_err(out.numpy(), ref.deform_conv2d(**a)) < 1e-5


def test_zero_offsets_are_a_plain_convolution(rng):
    """With zero offsets and no mask, deform_conv2d is the ordinary (grouped, strided, dilated)
    convolution: compare with a direct sum over shifted slices of the zero-padded input."""
    B, Cin, H, W, Cout, kh, kw, g = 2, 4, 7, 6, 6, 3, 2, 2
    stride, padding, dilation = (2, 1), (1, 2), (2, 1)
    x = rng.standard_normal((B, Cin, H, W))
    w = rng.standard_normal((Cout, Cin // g, kh, kw))
    Hout, Wout = out_size(H, W, kh, kw, stride, padding, dilation)
    off = np.zeros((B, 2 * kh * kw, Hout, Wout))
    xp = np.pad(x, ((0, 0), (0, 0), (padding[0],) * 2, (padding[1],) * 2))
    expected = np.zeros((B, Cout, Hout, Wout))
    for co in range(Cout):
        grp = co // (Cout // g)
        for i in range(kh):
            for j in range(kw):
                patch = xp[
                    :,
                    grp * (Cin // g) : (grp + 1) * (Cin // g),
                    i * dilation[0] : i * dilation[0] + stride[0] * Hout : stride[0],
                    j * dilation[1] : j * dilation[1] + stride[1] * Wout : stride[1],
                ]
                expected[:, co] += np.einsum("bchw,c->bhw", patch, w[co, :, i, j])
    out = ops.deform_conv2d(x, off, w, stride=stride, padding=padding, dilation=dilation)
    assert rel_err(out.numpy(), expected) < 1e-12


def test_forward_pair_equals_op(rng):
    a = make(rng, CONFIGS[1])
    np.testing.assert_array_equal(ops.deform_conv2d_forward(**a), ops.deform_conv2d(**a).numpy())


def test_one_row_tasks_match_whole_images(rng, monkeypatch):
    """Images split into one-row tasks (tiny column budgets) give the same results."""
    a = make(rng, CONFIGS[3])
    out = ops.deform_conv2d_forward(**a)
    go = rng.standard_normal(out.shape)
    grads = ops.deform_conv2d_backward(go, **a)
    monkeypatch.setattr(kernels, "COLS_BUDGET", 1)
    monkeypatch.setattr(kernels, "FWD_COLS_BUDGET", 1)
    assert kernels.task_rows(72, 6, 5) == 1 and kernels.task_rows(72, 6, 5, 1) == 1
    np.testing.assert_allclose(ops.deform_conv2d_forward(**a), out, rtol=1e-13, atol=1e-13)
    for u, v in zip(ops.deform_conv2d_backward(go, **a), grads):
        if v is not None:
            np.testing.assert_allclose(u, v, rtol=1e-12, atol=1e-12)


# ------------------------------------------------------------------ gradients


NAMES = ("input", "offset", "weight", "bias", "mask")


@pytest.mark.parametrize("case", check_cases("deform_conv2d"), ids=lambda c: c.label)
def test_gradcheck(case):
    # the check table's cases: every sampling coordinate's fractional part is in [0.1, 0.9],
    # off the kinks and borders (deformnp.cases.inputs.conv_offsets_off_kinks)
    assert dn.gradcheck(case.fn, case.inputs(), names=case.names)


def test_backward_needs_and_none_inputs(rng):
    a = make(rng, CONFIGS[2])  # no mask
    go = rng.standard_normal(ops.deform_conv2d_forward(**a).shape)
    gi, goff, gw, gb, gm = ops.deform_conv2d_backward(
        go, **a, needs=(False, True, False, True, True)
    )
    assert gi is None and gw is None and gm is None  # mask is None
    assert goff.shape == a["offset"].shape and gb.shape == a["bias"].shape
    full = ops.deform_conv2d_backward(go, **a)
    np.testing.assert_array_equal(goff, full[1])
    # each gradient alone equals the same gradient computed with all the others
    for i in (0, 2):
        needs = [False] * 5
        needs[i] = True
        np.testing.assert_array_equal(ops.deform_conv2d_backward(go, **a, needs=needs)[i], full[i])


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_gradient_dtypes_and_shapes(rng, dtype):
    a = make(rng, CONFIGS[0], dtype)
    ts = {n: dn.tensor(a[n], requires_grad=True) for n in NAMES}
    out = ops.deform_conv2d(
        ts["input"], ts["offset"], ts["weight"], ts["bias"], 1, 1, 1, ts["mask"]
    )
    out.sum().backward()
    for n in NAMES:
        assert ts[n].grad.dtype == dtype and ts[n].grad.shape == a[n].shape


# ------------------------------------------------------------------ edge cases


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf, 1e6, -1e6])
def test_far_and_nonfinite_offsets_sample_zero(rng, bad):
    a = make(rng, CONFIGS[0])
    a["bias"] = None
    a["offset"][:, :] = bad  # every sampling point far away or non-finite
    ts = {n: dn.tensor(a[n], requires_grad=True) for n in ("input", "offset", "weight", "mask")}
    out = ops.deform_conv2d(ts["input"], ts["offset"], ts["weight"], None, 1, 1, 1, ts["mask"])
    np.testing.assert_array_equal(out.numpy(), 0.0)
    out.backward(rng.standard_normal(out.shape))
    for n in ts:
        np.testing.assert_array_equal(ts[n].grad, 0.0)


def test_some_far_offsets_match_reference(rng):
    a = make(rng, CONFIGS[1])
    flat = a["offset"].reshape(-1)
    sel = rng.random(flat.size) < 0.3
    flat[sel] = rng.choice([1e6, -1e6, np.nan, np.inf, -np.inf], sel.sum())
    out = ops.deform_conv2d(**a).numpy()
    assert np.all(np.isfinite(out))
    assert rel_err(out, ref.deform_conv2d(**a)) < 1e-12


def test_empty_batch(rng):
    a = make(rng, CONFIGS[0])
    for n in ("input", "offset", "mask"):
        a[n] = a[n][:0]
    ts = {n: dn.tensor(a[n], requires_grad=True) for n in NAMES}
    out = ops.deform_conv2d(
        ts["input"], ts["offset"], ts["weight"], ts["bias"], 1, 1, 1, ts["mask"]
    )
    assert out.shape == (0, 6, 6, 5)
    out.sum().backward()
    for n in NAMES:
        assert ts[n].grad.shape == a[n].shape and not np.any(ts[n].grad)


def test_offsets_on_integer_and_border_lines_match_reference(rng):
    """Sampling exactly on integers, on -1, 0, H-1, H and half-way points."""
    a = make(rng, CONFIGS[0])
    a["offset"] = rng.integers(-3, 4, a["offset"].shape) * 0.5
    assert rel_err(ops.deform_conv2d(**a).numpy(), ref.deform_conv2d(**a)) < 1e-12


def test_non_contiguous_inputs(rng):
    a = make(rng, CONFIGS[0])
    b = dict(a)
    b["input"] = np.asfortranarray(a["input"])
    b["offset"] = a["offset"][..., ::-1].copy()[..., ::-1]
    b["weight"] = np.asfortranarray(a["weight"])
    np.testing.assert_array_equal(ops.deform_conv2d(**b).numpy(), ops.deform_conv2d(**a).numpy())


# ------------------------------------------------------------------ validation


def test_validation_messages():
    x = np.zeros((2, 4, 6, 6))
    w = np.zeros((6, 4, 3, 3))
    off = np.zeros((2, 18, 6, 6))
    m = np.zeros((2, 9, 6, 6))
    E = pytest.raises
    valid = r"with offset_groups dividing the input's 4 channels \(kernel 3x3\): one of 18, 36, 72$"
    with E(
        ValueError,
        match=r"deform_conv2d: offset has 17 channels, expected 2\*offset_groups\*kh\*kw " + valid,
    ):
        ops.deform_conv2d(x, off[:, :17], w, padding=1)
    with E(ValueError, match=r"deform_conv2d: offset has 0 channels, .*one of 18, 36, 72$"):
        ops.deform_conv2d(x, off[:, :0], w, padding=1)
    with E(ValueError, match=r"deform_conv2d: offset has 54 channels, .*one of 18, 36, 72$"):
        ops.deform_conv2d(x, np.zeros((2, 54, 6, 6)), w, padding=1)  # offset_groups 3 of 4
    with E(
        ValueError, match=r"deform_conv2d: mask has 8 channels, expected offset_groups\*kh\*kw = 9"
    ):
        ops.deform_conv2d(x, off, w, padding=1, mask=m[:, :8])
    with E(
        ValueError,
        match=r"deform_conv2d: mask has spatial size \(6, 5\), expected the output size \(6, 6\)",
    ):
        ops.deform_conv2d(x, off, w, padding=1, mask=m[..., :5])
    with E(ValueError, match="deform_conv2d: mask has batch size 1, expected input's batch size 2"):
        ops.deform_conv2d(x, off, w, padding=1, mask=m[:1])
    with E(
        ValueError,
        match=r"deform_conv2d: offset has spatial size \(4, 4\), expected the output size \(6, 6\)",
    ):
        ops.deform_conv2d(x, off[..., :4, :4], w, padding=1)
    with E(
        ValueError, match="deform_conv2d: offset has batch size 1, expected input's batch size 2"
    ):
        ops.deform_conv2d(x, off[:1], w, padding=1)
    with E(
        ValueError,
        match="deform_conv2d: input has 4 channels, not a multiple of weight.shape.1. = 3",
    ):
        ops.deform_conv2d(x, off, np.zeros((6, 3, 3, 3)), padding=1)
    with E(
        ValueError,
        match="deform_conv2d: weight has 5 output channels, not divisible by the 2 weight groups",
    ):
        ops.deform_conv2d(x, off, np.zeros((5, 2, 3, 3)), padding=1)
    with E(
        ValueError,
        match=r"deform_conv2d: weight.shape\[1\] \(input channels per group\) must be >= 1, got 0",
    ):
        ops.deform_conv2d(x, off, np.zeros((6, 0, 3, 3)), padding=1)
    with E(ValueError, match="deform_conv2d: the output would be 0x0 for input 6x6, kernel 7x7"):
        ops.deform_conv2d(x, np.zeros((2, 98, 1, 1)), np.zeros((6, 4, 7, 7)))
    with E(ValueError, match="deform_conv2d: bias has 5 elements, expected Cout = 6"):
        ops.deform_conv2d(x, off, w, np.zeros(5), padding=1)
    with E(ValueError, match=r"deform_conv2d: bias must be 1-d \(Cout,\), got shape \(6, 1\)"):
        ops.deform_conv2d(x, off, w, np.zeros((6, 1)), padding=1)
    with E(
        ValueError,
        match=r"deform_conv2d: input must be 4-d \(B, Cin, H, W\), got shape \(4, 6, 6\)",
    ):
        ops.deform_conv2d(x[0], off, w, padding=1)
    with E(ValueError, match=r"deform_conv2d: weight must be 4-d \(Cout, Cin/groups, kh, kw\)"):
        ops.deform_conv2d(x, off, w[0], padding=1)
    with E(ValueError, match=r"deform_conv2d: offset must be 4-d"):
        ops.deform_conv2d(x, off[0], w, padding=1)
    with E(ValueError, match=r"deform_conv2d: mask must be 4-d"):
        ops.deform_conv2d(x, off, w, padding=1, mask=m[0])
    with E(ValueError, match="deform_conv2d: stride must be >= 1, got 0"):
        ops.deform_conv2d(x, off, w, stride=0, padding=1)
    with E(ValueError, match=r"deform_conv2d: padding must be >= 0, got \(1, -1\)"):
        ops.deform_conv2d(x, off, w, padding=(1, -1))
    with E(
        ValueError,
        match=r"deform_conv2d: dilation must be an int or a pair of ints, got \(1, 1, 1\)",
    ):
        ops.deform_conv2d(x, off, w, padding=1, dilation=(1, 1, 1))
    with E(
        TypeError,
        match="deform_conv2d: inputs must share one float dtype, got input float64, offset float32",
    ):
        ops.deform_conv2d(x, off.astype(np.float32), w, padding=1)
    with E(TypeError, match="deform_conv2d: mask must be float32 or float64, got int64"):
        ops.deform_conv2d(x, off, w, padding=1, mask=m.astype(np.int64))
    with E(
        ValueError,
        match=r"deform_conv2d: grad_out must have shape \(2, 6, 6, 6\), got \(2, 6, 6, 5\)",
    ):
        ops.deform_conv2d_backward(np.zeros((2, 6, 6, 5)), x, off, w, padding=1)


# ------------------------------------------------------------------ properties


@given(
    B=st.integers(0, 2),
    cin_g=st.integers(1, 2),
    g=st.integers(1, 3),
    G=st.integers(1, 3),
    cout_g=st.integers(1, 2),
    H=st.integers(1, 5),
    W=st.integers(1, 5),
    kh=st.integers(1, 3),
    kw=st.integers(1, 3),
    sh=st.integers(1, 2),
    sw=st.integers(1, 2),
    ph=st.integers(0, 2),
    pw=st.integers(0, 2),
    dh=st.integers(1, 2),
    dw=st.integers(1, 2),
    use_mask=st.booleans(),
    use_bias=st.booleans(),
    dtype=st.sampled_from([np.float32, np.float64]),
    seed=st.integers(0, 2**16),
)
def test_property_matches_reference(
    B, cin_g, g, G, cout_g, H, W, kh, kw, sh, sw, ph, pw, dh, dw, use_mask, use_bias, dtype, seed
):
    Cin = cin_g * g * G  # divisible by both kinds of groups (whose boundaries may interleave)
    Hout, Wout = out_size(H, W, kh, kw, (sh, sw), (ph, pw), (dh, dw))
    if Hout < 1 or Wout < 1:
        return
    r = np.random.default_rng(seed)
    cfg = (B, Cin, H, W, cout_g * g, kh, kw, g, G, (sh, sw), (ph, pw), (dh, dw), use_mask, use_bias)
    a = make(r, cfg, dtype, offset_scale=3.0)
    out = ops.deform_conv2d(**a).numpy()
    expected = ref.deform_conv2d(**a)
    tol = 1e-12 if dtype == np.float64 else 1e-5
    scale = max(1.0, np.abs(expected).max(initial=0.0))
    np.testing.assert_allclose(out, expected, rtol=0, atol=tol * scale)


# ------------------------------------------------------------------ determinism


def test_backward_deterministic_across_runs_and_threads(rng):
    # large enough (B*Hout*Wout*K*Cin >= 2**17) to run on all threads by default
    cfg = (3, 16, 20, 20, 8, 3, 3, 2, 2, 1, 1, 1, True, True)
    a = make(rng, cfg, np.float32, offset_scale=4.0)
    a["offset"][:, ::3] = np.round(a["offset"][:, ::3])  # many samples on the same pixels
    go = rng.standard_normal(ops.deform_conv2d_forward(**a).shape).astype(np.float32)
    assert go.size // 8 * 9 * 16 >= SERIAL_WORK  # B*Hout*Wout * K * Cin
    first, single, single_blas = _backward_at_thread_counts(go, a)
    again = ops.deform_conv2d_backward(go, **a)
    for u, v, w, z in zip(first, again, single, single_blas):
        assert u.tobytes() == v.tobytes() == w.tobytes() == z.tobytes()


def _backward_at_thread_counts(go, a):
    """The backward with the default threads, with one Numba thread, and with the GEMMs on one
    BLAS thread."""
    first = ops.deform_conv2d_backward(go, **a)
    before = numba.get_num_threads()
    try:
        numba.set_num_threads(1)
        single = ops.deform_conv2d_backward(go, **a)
    finally:
        numba.set_num_threads(before)
    with threadpool_limits(limits=1, user_api="blas"):
        single_blas = ops.deform_conv2d_backward(go, **a)
    return first, single, single_blas


def test_forward_row_block_tasks_match(rng, monkeypatch):
    """One output row per forward task (FWD_COLS_BUDGET = 1) gives the whole-image result."""
    a = make(rng, CONFIGS[3])
    out = ops.deform_conv2d_forward(**a)
    monkeypatch.setattr(kernels, "FWD_COLS_BUDGET", 1)
    np.testing.assert_allclose(ops.deform_conv2d_forward(**a), out, rtol=1e-13, atol=1e-13)


def test_backward_deterministic_row_block_tasks(rng, monkeypatch):
    # one output row per task: an image's input gradient is the sum of its row blocks' buffers
    monkeypatch.setattr(kernels, "COLS_BUDGET", 1)
    assert kernels.task_rows(8 * 9, 20, 20) == 1
    cfg = (3, 16, 20, 20, 8, 3, 3, 2, 2, 1, 1, 1, True, True)
    a = make(rng, cfg, np.float32, offset_scale=4.0)
    go = rng.standard_normal(ops.deform_conv2d_forward(**a).shape).astype(np.float32)
    first, single, single_blas = _backward_at_thread_counts(go, a)
    for u, w, z in zip(first, single, single_blas):
        assert u.tobytes() == w.tobytes() == z.tobytes()


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("nj, C, P", [(1, 5, 7), (2, 3, 33), (3, 17, 50), (4, 64, 16)])
def test_row_block_buffers_sum_channels_first(rng, dtype, nj, C, P):
    """An image's input gradient is the sum of its row blocks' channels-last buffers in block
    order, transposed to channels-first (``_sum_channels_first``, tiles of pixels): bit for bit
    the elementwise sum in that order, for pixel counts that do and do not fill the last tile."""
    accs = rng.standard_normal((nj, P * C)).astype(dtype)
    expected = accs[0].reshape(P, C).copy()
    for j in range(1, nj):
        expected += accs[j].reshape(P, C)
    gi = np.empty((C, P), dtype)
    kernels._sum_channels_first(accs, gi)
    assert gi.tobytes() == np.ascontiguousarray(expected.T).tobytes()


def test_concurrent_calls_match_and_restore_blas_threads(rng):
    """Calls from two Python threads at once give the results of one call, and NumPy's BLAS
    thread count is what it was before (the kernels run BLAS on one thread inside a call)."""
    import threading

    from threadpoolctl import threadpool_info

    cfg = (3, 16, 20, 20, 8, 3, 3, 2, 2, 1, 1, 1, True, True)
    a = make(rng, cfg, np.float32, offset_scale=4.0)
    go = rng.standard_normal(ops.deform_conv2d_forward(**a).shape).astype(np.float32)
    before = [d["num_threads"] for d in threadpool_info()]
    want = ops.deform_conv2d_backward(go, **a)
    got = [None] * 4

    def call(i):
        got[i] = ops.deform_conv2d_backward(go, **a)

    threads = [threading.Thread(target=call, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for r in got:
        for u, v in zip(r, want):
            assert (u is None and v is None) or u.tobytes() == v.tobytes()
    assert [d["num_threads"] for d in threadpool_info()] == before


# ------------------------------------------------------------------ torchvision parity

PARITY = [
    (2, 4, 6, 5, 6, 3, 3, 1, 1, 1, 1, 1, True, True),
    (2, 8, 7, 6, 6, 3, 2, 2, 4, (2, 1), (0, 2), (1, 2), True, False),
    (1, 6, 7, 7, 4, 2, 3, 2, 3, (1, 2), (2, 1), (2, 1), False, True),
    (2, 4, 9, 8, 4, 3, 3, 4, 2, 2, 1, 2, True, True),
    (1, 3, 2, 3, 2, 4, 5, 1, 1, 1, (2, 3), 1, True, True),  # kernel larger than the input
]


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize("cfg", PARITY)
@pytest.mark.parametrize("huge", [False, True])
def test_matches_torchvision(rng, cfg, dtype, huge):
    torch = pytest.importorskip("torch")
    tv = pytest.importorskip("torchvision")
    # continuous random offsets: sampling points never land exactly on y = -1 or x = -1
    a = make(rng, cfg, dtype, offset_scale=4.0)
    if huge:  # a quarter of the points thrown far outside the map
        flat = a["offset"].reshape(-1)
        sel = rng.random(flat.size) < 0.25
        flat[sel] = rng.choice([1e6, -1e6, 1e3, -50.0], sel.sum())
    ts = {n: None if a[n] is None else dn.tensor(a[n], requires_grad=True) for n in NAMES}
    out = ops.deform_conv2d(
        ts["input"], ts["offset"], ts["weight"], ts["bias"], a["stride"], a["padding"],
        a["dilation"], ts["mask"],
    )  # fmt: skip
    go = rng.standard_normal(out.shape).astype(dtype)
    out.backward(go)
    tt = {n: None if a[n] is None else torch.tensor(a[n], requires_grad=True) for n in NAMES}
    tout = tv.ops.deform_conv2d(
        tt["input"], tt["offset"], tt["weight"], tt["bias"], a["stride"], a["padding"],
        a["dilation"], tt["mask"],
    )  # fmt: skip
    tout.backward(torch.tensor(go))
    tol = 1e-12 if dtype == np.float64 else 1e-5
    assert rel_err(out.numpy(), tout.detach().numpy()) < tol
    for n in NAMES:
        if a[n] is not None:
            assert rel_err(ts[n].grad, tt[n].grad.numpy()) < (
                tol if dtype == np.float64 else 1e-4
            ), n


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_matches_torchvision_on_border_lines_and_integers(rng, dtype):
    """Sampling points exactly on y = -1, x = -1, y = H - 1, on integer coordinates and on
    half-integers: torchvision 0.29.1's offset gradient takes the right-hand slope there too
    (its kernel tests which corners are inside, not the point's range), so the two agree
    everywhere, outputs and every gradient (mmcv's is zero on y = -1: see docs/ops/bilinear.rst)."""
    torch = pytest.importorskip("torch")
    tv = pytest.importorskip("torchvision")
    B, C, H, W, K = 2, 3, 5, 6, 3
    x = rng.standard_normal((B, C, H, W)).astype(dtype)
    w = rng.standard_normal((4, C, K, K)).astype(dtype)
    # padding 1: kernel point (i, j) of output (oy, ox) sits at (oy + i - 1, ox + j - 1); these
    # offsets move it to integers, half-integers and the lines -1, H - 1, H, W
    choices = np.array([-2.0, -1.0, -0.5, 0.0, 0.5, 1.0, 2.0, -(H + 1.0), float(H), float(W)])
    off = rng.choice(choices, (B, 2 * K * K, H, W)).astype(dtype)
    m = rng.uniform(0.2, 1.0, (B, K * K, H, W)).astype(dtype)
    ts = [dn.tensor(a, requires_grad=True) for a in (x, off, w, m)]
    out = ops.deform_conv2d(ts[0], ts[1], ts[2], None, 1, 1, 1, ts[3])
    go = rng.standard_normal(out.shape).astype(dtype)
    out.backward(go)
    tt = [torch.tensor(a, requires_grad=True) for a in (x, off, w, m)]
    tout = tv.ops.deform_conv2d(tt[0], tt[1], tt[2], None, 1, 1, 1, tt[3])
    tout.backward(torch.tensor(go))
    tol = 1e-12 if dtype == np.float64 else 1e-5
    assert rel_err(out.numpy(), tout.detach().numpy()) < tol
    for name, a, b in zip(("input", "offset", "weight", "mask"), ts, tt):
        assert rel_err(a.grad, b.grad.numpy()) < (tol if dtype == np.float64 else 1e-4), name


# ------------------------------------------------------------------ layers


def test_layer_deform_conv2d_matches_op(rng):
    layer = dn.nn.DeformConv2d(
        4, 6, (3, 2), stride=(2, 1), padding=1, dilation=(1, 2), groups=2, dtype=np.float64
    )
    assert layer.weight.shape == (6, 2, 3, 2) and layer.bias.shape == (6,)
    bound = 1 / np.sqrt(2 * 3 * 2)  # torchvision's init: U(-1/sqrt(fan_in), 1/sqrt(fan_in))
    assert np.abs(layer.weight.data).max() <= bound and np.abs(layer.bias.data).max() <= bound
    x = rng.standard_normal((2, 4, 7, 6))
    Hout, Wout = out_size(7, 6, 3, 2, (2, 1), 1, (1, 2))
    off = rng.uniform(-1, 1, (2, 12, Hout, Wout))
    m = rng.uniform(0, 1, (2, 6, Hout, Wout))
    y = layer(dn.tensor(x), dn.tensor(off), dn.tensor(m))
    expected = ops.deform_conv2d(x, off, layer.weight.data, layer.bias.data, (2, 1), 1, (1, 2), m)
    np.testing.assert_array_equal(y.numpy(), expected.numpy())
    y.sum().backward()
    assert layer.weight.grad.shape == layer.weight.shape
    assert sorted(n for n, _ in layer.named_parameters()) == ["bias", "weight"]
    assert dn.nn.DeformConv2d(4, 6, 3, bias=False).bias is None


def test_layer_deform_conv2d_validation():
    with pytest.raises(
        ValueError, match="DeformConv2d: in_channels 5 must be divisible by groups 2"
    ):
        dn.nn.DeformConv2d(5, 4, 3, groups=2)
    with pytest.raises(
        ValueError, match="DeformConv2d: out_channels 5 must be divisible by groups 2"
    ):
        dn.nn.DeformConv2d(4, 5, 3, groups=2)


@pytest.mark.parametrize("modulated", [False, True])
def test_pack_layers_start_as_plain_convolution(rng, modulated):
    cls = dn.nn.ModulatedDeformConv2dPack if modulated else dn.nn.DeformConv2dPack
    layer = cls(4, 6, 3, stride=1, padding=1, groups=2, deform_groups=2, dtype=np.float64)
    names = sorted(n for n, _ in layer.named_parameters())
    expected_names = ["conv_offset.bias", "conv_offset.weight", "weight"]
    if modulated:
        expected_names = ["bias", *expected_names]
    assert names == expected_names
    assert layer.conv_offset.weight.shape == (2 * (3 if modulated else 2) * 9, 4, 3, 3)
    assert not np.any(layer.conv_offset.weight.data) and not np.any(layer.conv_offset.bias.data)
    x = rng.standard_normal((2, 4, 5, 5))
    y = layer(dn.tensor(x))
    # zero offsets; the v2 mask is sigmoid(0) = 0.5 everywhere at the start (as mmcv)
    scale = 0.5 if modulated else 1.0
    zero_off = np.zeros((2, 36, 5, 5))
    bias = layer.bias.data if modulated else None
    plain = ops.deform_conv2d(x, zero_off, scale * layer.weight.data, None, 1, 1, 1).numpy()
    if bias is not None:
        plain = plain + bias[None, :, None, None]
    np.testing.assert_allclose(y.numpy(), plain, rtol=1e-12, atol=1e-12)
    y.sum().backward()
    # the offset predictor receives gradient, so training moves the sampling points
    assert np.any(layer.conv_offset.weight.grad)


def test_pack_layers_gradcheck(rng):
    layer = dn.nn.ModulatedDeformConv2dPack(2, 2, 3, padding=1, deform_groups=1, dtype=np.float64)
    layer.conv_offset.weight.data[...] = rng.uniform(-0.05, 0.05, layer.conv_offset.weight.shape)
    layer.conv_offset.bias.data[...] = rng.uniform(0.1, 0.4, layer.conv_offset.bias.shape)
    x = dn.tensor(rng.standard_normal((1, 2, 4, 4)), requires_grad=True)
    # offsets stay small and nonzero, so sampling points are off the integer kinks; check x
    assert dn.gradcheck(lambda t: layer(t), (x,), atol=1e-5, rtol=1e-4)


def test_pack_layer_matches_mmcv_formula(rng):
    """ModulatedDeformConv2dPack: offset = first 2*G*K predicted channels, mask = sigmoid of the
    last G*K (mmcv's chunk(3) then cat of the first two chunks)."""
    layer = dn.nn.ModulatedDeformConv2dPack(
        4, 3, 3, stride=2, padding=1, dilation=1, deform_groups=2, dtype=np.float64
    )
    for p in (layer.conv_offset.weight, layer.conv_offset.bias):
        p.data[...] = rng.uniform(-0.3, 0.3, p.shape)
    x = rng.standard_normal((1, 4, 6, 5))
    pred = dn.functional.conv2d(
        dn.tensor(x), layer.conv_offset.weight, layer.conv_offset.bias, 2, 1, 1
    ).numpy()
    off, mlogit = pred[:, :36], pred[:, 36:]
    mask = 1 / (1 + np.exp(-mlogit))
    expected = ops.deform_conv2d(x, off, layer.weight.data, layer.bias.data, 2, 1, 1, mask).numpy()
    np.testing.assert_allclose(layer(dn.tensor(x)).numpy(), expected, rtol=1e-12, atol=1e-12)


def test_pack_v1_uses_predicted_offsets(rng):
    layer = dn.nn.DeformConv2dPack(4, 2, (3, 2), padding=(1, 0), deform_groups=2, dtype=np.float64)
    assert layer.bias is None  # mmcv's DeformConv2d has no bias
    for p in (layer.conv_offset.weight, layer.conv_offset.bias):
        p.data[...] = rng.uniform(-0.3, 0.3, p.shape)
    x = rng.standard_normal((2, 4, 5, 6))
    off = dn.functional.conv2d(
        dn.tensor(x), layer.conv_offset.weight, layer.conv_offset.bias, 1, (1, 0), 1
    ).numpy()
    assert off.shape == (2, 2 * 2 * 6, 5, 5)
    expected = ops.deform_conv2d(x, off, layer.weight.data, None, 1, (1, 0), 1).numpy()
    np.testing.assert_allclose(layer(dn.tensor(x)).numpy(), expected, rtol=1e-12, atol=1e-12)


def test_pack_layer_validation():
    with pytest.raises(
        ValueError, match="DeformConv2dPack: in_channels 4 must be divisible by deform_groups 3"
    ):
        dn.nn.DeformConv2dPack(4, 4, 3, deform_groups=3)
    with pytest.raises(
        ValueError,
        match="ModulatedDeformConv2dPack: out_channels 3 must be divisible by groups 2",
    ):
        dn.nn.ModulatedDeformConv2dPack(4, 3, 3, groups=2)
    with pytest.raises(ValueError, match="DeformConv2d: groups must be >= 1, got 0"):
        dn.nn.DeformConv2d(4, 4, 3, groups=0)
