"""DCNv3 (``deformnp.ops.dcnv3``; anchor: InternImage's ``dcnv3_core_pytorch``).

Reference parity (``tests/reference/dcnv3.py``: naive float64 loops over the zero-padded input,
built the anchor's way), gradcheck, determinism, edge cases, messages, the CUDA kernels under
Numba's simulator against the CPU kernels, and parity with a torch transcription of
``dcnv3_core_pytorch`` (skipped without torch).

Offsets for position gradients keep every sampling coordinate off the kinks: the base position
hy + oy*sh + (i*dh - hy)*s is an integer when s is an integer, and a multiple of 1/4 for the
s = 0.75 / 1.25 cases, so offsets ``u / s`` with u = an integer plus a fraction in [0.1, 0.9]
minus that fraction of the base land on coordinates whose fractional part is in [0.1, 0.9];
:func:`offsets_off_kinks` builds them and :func:`test_offsets_off_kinks_helper` checks it.
"""

from __future__ import annotations

import math

import numba
import numpy as np
import pytest
from reference.dcnv3 import dcnv3 as reference
from reference.dcnv3 import output_size

import deformnp as dn
from deformnp import cuda
from deformnp.cases.inputs import off_kink
from deformnp.ops.dcnv3 import dcnv3, dcnv3_backward, dcnv3_forward

# (label, N, H, W, G, D, kh, kw, sh, sw, ph, pw, dh, dw, s, rc)
CONFIGS = [
    ("g1 3x3 pad1", 2, 5, 6, 1, 3, 3, 3, 1, 1, 1, 1, 1, 1, 1.0, False),
    ("g2 3x3 stride2", 1, 7, 6, 2, 2, 3, 3, 2, 2, 1, 1, 1, 1, 1.0, False),
    ("g4 5x3 pad0", 1, 7, 6, 4, 2, 5, 3, 1, 1, 0, 0, 1, 1, 1.0, False),
    ("g2 3x3 dilation2", 1, 7, 7, 2, 3, 3, 3, 1, 1, 2, 2, 2, 2, 1.0, False),
    ("g2 3x3 remove_center", 2, 5, 5, 2, 2, 3, 3, 1, 1, 1, 1, 1, 1, 1.0, True),
    ("g1 5x5 remove_center scale", 1, 6, 6, 1, 5, 5, 5, 1, 1, 2, 2, 1, 1, 0.75, True),
    ("g2 3x5 scale1.25 stride(2,1)", 1, 6, 7, 2, 2, 3, 5, 2, 1, 1, 2, 1, 2, 1.25, False),
    ("g1 3x3 pad_h!=pad_w", 1, 5, 6, 1, 2, 3, 3, 1, 1, 0, 1, 1, 1, 1.0, False),
]
IDS = [c[0] for c in CONFIGS]


def _geometry(cfg):
    _, N, H, W, G, D, kh, kw, sh, sw, ph, pw, dh, dw, s, rc = cfg
    return (kh, kw, sh, sw, ph, pw, dh, dw, G, D, s, rc)


def _sizes(cfg):
    _, N, H, W, G, D, kh, kw, sh, sw, ph, pw, dh, dw, s, rc = cfg
    Ho, Wo = output_size(H, W, kh, kw, sh, sw, ph, pw, dh, dw)
    return N, H, W, G, D, Ho, Wo, kh * kw - int(rc)


def _base(cfg):
    """(by, bx): the padded-map coordinates of every point before its offset, (N?, Ho, Wo, G*P)."""
    _, N, H, W, G, D, kh, kw, sh, sw, ph, pw, dh, dw, s, rc = cfg
    Ho, Wo = output_size(H, W, kh, kw, sh, sw, ph, pw, dh, dw)
    pts = [(i, j) for j in range(kw) for i in range(kh)]
    if rc:
        del pts[(kh * kw - 1) // 2]
    hy, hx = (dh * (kh - 1)) // 2, (dw * (kw - 1)) // 2
    oy = np.arange(Ho)[:, None, None]
    ox = np.arange(Wo)[None, :, None]
    i = np.array([p[0] for p in pts] * G)[None, None]
    j = np.array([p[1] for p in pts] * G)[None, None]
    by = hy + oy * sh + (i * dh - hy) * s + 0 * ox
    bx = hx + ox * sw + (j * dw - hx) * s + 0 * oy
    return by, bx


def offsets_off_kinks(rng, cfg):
    """(N, Ho, Wo, G*P*2) offsets putting every coordinate (padded map) at an integer in
    [-2, size + 1) plus a fraction in [0.1, 0.9]."""
    N, H, W, G, D, Ho, Wo, P = _sizes(cfg)
    s = cfg[14]
    Hp, Wp = H + 2 * cfg[11], W + 2 * cfg[10]
    by, bx = _base(cfg)
    shape = (N, Ho, Wo, G * P)
    ty = rng.integers(-2, Hp + 1, shape) + rng.uniform(0.1, 0.9, shape)
    tx = rng.integers(-2, Wp + 1, shape) + rng.uniform(0.1, 0.9, shape)
    # keep most points near their base position, so the map's inside is well covered
    near = rng.uniform(size=shape) < 0.7
    ty = np.where(
        near, np.floor(by + rng.uniform(-1.5, 1.5, shape)) + rng.uniform(0.1, 0.9, shape), ty
    )
    tx = np.where(
        near, np.floor(bx + rng.uniform(-1.5, 1.5, shape)) + rng.uniform(0.1, 0.9, shape), tx
    )
    off = np.empty((N, Ho, Wo, G * P, 2))
    off[..., 0] = (tx - bx) / s
    off[..., 1] = (ty - by) / s
    return off.reshape(N, Ho, Wo, G * P * 2)


def coordinates(cfg, offset):
    """(y, x) in the padded map, from the formula."""
    N, H, W, G, D, Ho, Wo, P = _sizes(cfg)
    s = cfg[14]
    by, bx = _base(cfg)
    o = offset.reshape(N, Ho, Wo, G * P, 2)
    return by + o[..., 1] * s, bx + o[..., 0] * s


def make_inputs(rng, cfg, dtype=np.float64):
    N, H, W, G, D, Ho, Wo, P = _sizes(cfg)
    x = rng.standard_normal((N, H, W, G * D)).astype(dtype)
    off = offsets_off_kinks(rng, cfg).astype(dtype)
    m = rng.uniform(0.1, 1.0, (N, Ho, Wo, G * P)).astype(dtype)
    g = rng.standard_normal((N, Ho, Wo, G * D)).astype(dtype)
    return x, off, m, g


def rel_err(a, b):
    a = np.asarray(a, np.float64)
    b = np.asarray(b, np.float64)
    return float(np.abs(a - b).max() / max(np.abs(b).max(), 1e-300)) if b.size else 0.0


@pytest.mark.parametrize("cfg", CONFIGS, ids=IDS)
def test_offsets_off_kinks_helper(rng, cfg):
    x, off, m, g = make_inputs(rng, cfg)
    ys, xs = coordinates(cfg, off)
    Hp, Wp = x.shape[1] + 2 * cfg[11], x.shape[2] + 2 * cfg[10]
    assert all(off_kink(v, Hp) for v in ys.ravel())
    assert all(off_kink(v, Wp) for v in xs.ravel())


@pytest.mark.parametrize("cfg", CONFIGS, ids=IDS)
def test_matches_reference_float64(rng, cfg):
    x, off, m, g = make_inputs(rng, cfg)
    geo = _geometry(cfg)
    ref = reference(x, off, m, *geo, grad_out=g)
    out = dcnv3_forward(x, off, m, *geo)
    grads = dcnv3_backward(g, x, off, m, *geo)
    assert out.shape == ref[0].shape
    assert rel_err(out, ref[0]) < 1e-12
    for got, want in zip(grads, ref[1:]):
        assert got.shape == want.shape and got.dtype == np.float64
        assert rel_err(got, want) < 1e-12
    assert np.abs(ref[0]).max() > 0 and np.abs(ref[1]).max() > 0


@pytest.mark.parametrize("cfg", CONFIGS[:5], ids=IDS[:5])
def test_matches_reference_float32(rng, cfg):
    x, off, m, g = make_inputs(rng, cfg)
    geo = _geometry(cfg)
    ref = reference(x, off, m, *geo, grad_out=g)
    f = [a.astype(np.float32) for a in (x, off, m, g)]
    out = dcnv3_forward(*f[:3], *geo)
    grads = dcnv3_backward(f[3], *f[:3], *geo)
    assert out.dtype == np.float32 and rel_err(out, ref[0]) < 1e-5
    for got, want in zip(grads, ref[1:]):
        assert got.dtype == np.float32 and rel_err(got, want) < 1e-5


@pytest.mark.parametrize(
    "cfg", [CONFIGS[i] for i in (1, 2, 4, 6)], ids=[IDS[i] for i in (1, 2, 4, 6)]
)
def test_gradcheck_all_inputs(rng, cfg):
    # offsets off the kinks (see the module docstring)
    x, off, m, _ = make_inputs(rng, cfg)
    geo = _geometry(cfg)
    inputs = tuple(dn.Tensor(a, requires_grad=True) for a in (x, off, m))
    names = ("input", "offset", "mask")
    assert dn.gradcheck(lambda a, b, c: dcnv3(a, b, c, *geo), inputs, names=names)


def test_op_and_pair_agree_and_autograd_routes_gradients(rng):
    cfg = CONFIGS[1]
    x, off, m, g = make_inputs(rng, cfg)
    geo = _geometry(cfg)
    tx, toff, tm = (dn.Tensor(a, requires_grad=True) for a in (x, off, m))
    out = dcnv3(tx, toff, tm, *geo)
    np.testing.assert_array_equal(out.numpy(), dcnv3_forward(x, off, m, *geo))
    (out * dn.Tensor(g)).sum().backward()
    want = dcnv3_backward(g, x, off, m, *geo)
    for t, w in zip((tx, toff, tm), want):
        np.testing.assert_array_equal(np.asarray(t.grad), w)


def test_needs_selects_gradients(rng):
    cfg = CONFIGS[0]
    x, off, m, g = make_inputs(rng, cfg)
    geo = _geometry(cfg)
    full = dcnv3_backward(g, x, off, m, *geo)
    for needs in [(1, 0, 0), (0, 1, 0), (0, 0, 1), (0, 0, 0), (1, 1, 0)]:
        got = dcnv3_backward(g, x, off, m, *geo, needs=needs)
        for flag, a, b in zip(needs, got, full):
            if flag:
                np.testing.assert_array_equal(a, b)
            else:
                assert a is None


def test_zero_offsets_sum_the_neighbourhood():
    x = np.ones((1, 4, 4, 8))
    off = np.zeros((1, 4, 4, 36))
    m = np.ones((1, 4, 4, 18))
    out = dcnv3_forward(x, off, m, 3, 3, 1, 1, 1, 1, 1, 1, 2, 4, 1.0, False)
    np.testing.assert_array_equal(
        out[0, :, :, 0], [[4, 6, 6, 4], [6, 9, 9, 6], [6, 9, 9, 6], [4, 6, 6, 4]]
    )


def test_offsets_are_x_then_y_and_points_column_major(rng):
    # one point per group (kernel 1x3 -> columns), a pure x shift of +1 reads the next column
    x = rng.standard_normal((1, 3, 5, 1))
    off = np.zeros((1, 3, 3, 6))
    m = np.zeros((1, 3, 3, 3))
    m[..., 1] = 1.0  # the middle column point
    off[..., 2] = 1.0  # its x offset
    out = dcnv3_forward(x, off, m, 1, 3, 1, 1, 0, 0, 1, 1, 1, 1, 1.0, False)
    np.testing.assert_allclose(out[0, :, :, 0], x[0, :, 2:5, 0], rtol=0, atol=1e-15)
    # kernel 3x1 (rows), 3x3 ordering: point k = j*kh + i; k = 1 is row 1 of column 0
    off = np.zeros((1, 1, 1, 18))
    m = np.zeros((1, 1, 1, 9))
    m[..., 1] = 1.0
    y = rng.standard_normal((1, 3, 3, 1))
    out = dcnv3_forward(y, off, m, 3, 3, 1, 1, 0, 0, 1, 1, 1, 1, 1.0, False)
    assert out[0, 0, 0, 0] == y[0, 1, 0, 0]


def _backward_threads(n, g, x, off, m, geo):
    prev = numba.get_num_threads()
    numba.set_num_threads(n)
    try:
        return dcnv3_backward(g, x, off, m, *geo)
    finally:
        numba.set_num_threads(prev)


@pytest.mark.parametrize("N, G", [(1, 1), (2, 4), (1, 2)])
def test_backward_bit_identical_across_runs_and_threads(rng, N, G):
    from deformnp.kernels.cpu import dcnv3 as K
    from deformnp.kernels.cpu import sampling

    cfg = ("big", N, 20, 20, G, 16, 3, 3, 1, 1, 1, 1, 1, 1, 1.0, False)
    x, off, m, g = make_inputs(rng, cfg)
    geo = _geometry(cfg)
    assert m.size * (2 * 16 + 8) >= sampling.SERIAL_WORK  # the parallel kernels run
    assert K.n_chunks(N, G, 400) > 1 or N * G >= K.TARGET_TASKS
    first = _backward_threads(1, g, x, off, m, geo)
    for n in (numba.config.NUMBA_NUM_THREADS, 1, 2):
        again = _backward_threads(min(n, numba.config.NUMBA_NUM_THREADS), g, x, off, m, geo)
        for a, b in zip(first, again):
            assert a.tobytes() == b.tobytes()
    ref = reference(x, off, m, *geo, grad_out=g) if N * G <= 2 else None
    if ref is not None:
        for a, b in zip(first, ref[1:]):
            assert rel_err(a, b) < 1e-12


def test_empty_batch(rng):
    cfg = CONFIGS[0]
    x, off, m, g = make_inputs(rng, cfg)
    geo = _geometry(cfg)
    x0, off0, m0, g0 = (a[:0] for a in (x, off, m, g))
    assert dcnv3_forward(x0, off0, m0, *geo).shape == (0, *g.shape[1:])
    gi, go, gm = dcnv3_backward(g0, x0, off0, m0, *geo)
    assert gi.shape == x0.shape and go.shape == off0.shape and gm.shape == m0.shape


def test_zero_sized_input_map_with_padding(rng):
    # H = 0 padded to 2 rows: every sample reads padding, zero output and gradients
    x = np.zeros((1, 0, 3, 2))
    off = rng.standard_normal((1, 2, 3, 2))
    m = np.ones((1, 2, 3, 1))
    out = dcnv3_forward(x, off, m, 1, 1, 1, 1, 0, 1, 1, 1, 1, 2, 1.0, False)
    assert out.shape == (1, 2, 3, 2) and not out.any()
    gi, go, gm = dcnv3_backward(
        np.ones_like(out), x, off, m, 1, 1, 1, 1, 0, 1, 1, 1, 1, 2, 1.0, False
    )
    assert gi.shape == x.shape and not go.any() and not gm.any()


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf, 1e6, -1e6])
def test_nonfinite_and_far_offsets_sample_zero(rng, bad):
    cfg = CONFIGS[1]
    x, off, m, g = make_inputs(rng, cfg)
    geo = _geometry(cfg)
    off[0, 0, 0, :] = bad  # every point of pixel (0, 0), both coordinates
    off[0, 1, 1, 0] = bad  # one x coordinate only
    out = dcnv3_forward(x, off, m, *geo)
    gi, go, gm = dcnv3_backward(g, x, off, m, *geo)
    assert np.isfinite(out).all() and np.isfinite(gi).all()
    assert not out[0, 0, 0].any()
    assert not go[0, 0, 0].any() and not gm[0, 0, 0].any()
    assert go[0, 1, 1, 0] == 0 and go[0, 1, 1, 1] == 0 and gm[0, 1, 1, 0] == 0
    clean = off.copy()
    clean[0, 0, 0, :] = 0
    clean[0, 1, 1, 0] = 0
    m2 = m.copy()
    m2[0, 0, 0, :] = 0
    m2[0, 1, 1, 0] = 0
    np.testing.assert_allclose(out, dcnv3_forward(x, clean, m2, *geo), rtol=0, atol=1e-14)


def test_validation_messages(rng):
    cfg = CONFIGS[0]
    x, off, m, g = make_inputs(rng, cfg)
    geo = list(_geometry(cfg))

    def call(*arrays, geo=geo):
        return dcnv3_forward(*arrays, *geo)

    def with_(i, v):
        out = list(geo)
        out[i] = v
        return out

    cases = [
        (TypeError, "dcnv3: input must be float32 or float64", (x.astype(np.int64), off, m), geo),
        (
            TypeError,
            "dcnv3: inputs must share one float dtype",
            (x.astype(np.float32), off, m),
            geo,
        ),
        (ValueError, "dcnv3: input must be 4-d (N, H, W, C)", (x[0], off, m), geo),
        (
            ValueError,
            "dcnv3: input has 3 channels, expected group*group_channels = 1*2",
            (x, off, m),
            with_(9, 2),
        ),
        (ValueError, "dcnv3: offset has shape", (x, off[..., :-1], m), geo),
        (ValueError, "dcnv3: mask has shape", (x, off, m[..., :-1]), geo),
        (
            ValueError,
            "dcnv3: remove_center is only compatible with a square kernel of odd size, got kernel 3x5",
            (x, off, m),
            with_(1, 5) and [3, 5, *geo[2:11], True],
        ),
        (TypeError, "dcnv3: remove_center must be a bool", (x, off, m), with_(11, 2)),
        (TypeError, "dcnv3: kernel_h must be an int", (x, off, m), with_(0, 3.0)),
        (ValueError, "dcnv3: stride_w must be >= 1", (x, off, m), with_(3, 0)),
        (ValueError, "dcnv3: pad_h must be >= 0", (x, off, m), with_(4, -1)),
        (ValueError, "dcnv3: group must be >= 1", (x, off, m), with_(8, 0)),
        (ValueError, "dcnv3: offset_scale must be finite", (x, off, m), with_(10, math.inf)),
        (ValueError, "is smaller than the dilated kernel", (x, off, m), with_(6, 9)),
    ]
    for err, msg, arrays, params in cases:
        with pytest.raises(
            err, match=msg.replace("(", r"\(").replace(")", r"\)").replace("*", r"\*")
        ):
            call(*arrays, geo=params)
    with pytest.raises(ValueError, match=r"dcnv3: grad_out has shape"):
        dcnv3_backward(g[..., :-1], x, off, m, *geo)
    with pytest.raises(ValueError, match=r"dcnv3: needs must have 3 flags"):
        dcnv3_backward(g, x, off, m, *geo, needs=(True,))


# ---------------------------------------------------------------------------------------------
# CUDA kernels under the simulator (tests/conftest.py) against the CPU kernels
# ---------------------------------------------------------------------------------------------

CUDA_TOL = {np.float64: 1e-12, np.float32: 1e-5}


def _cuda_kernels():
    from deformnp.kernels.cuda import dcnv3

    return dcnv3


@pytest.fixture
def deterministic():
    dn.use_deterministic_algorithms(True)
    try:
        yield
    finally:
        dn.use_deterministic_algorithms(False)


def _cuda_vs_cpu(rng, cfg, dtype, needs=(True, True, True)):
    from numba import cuda as ncuda

    x, off, m, g = (a.astype(dtype) for a in make_inputs(rng, cfg))
    geo = _geometry(cfg)
    cpu_out = dcnv3_forward(x, off, m, *geo)
    cpu_grads = dcnv3_backward(g, x, off, m, *geo, needs=needs)
    d = [ncuda.to_device(a) for a in (x, off, m, g)]
    out = dcnv3_forward(*d[:3], *geo)
    grads = dcnv3_backward(d[3], *d[:3], *geo, needs=needs)
    assert rel_err(out.copy_to_host(), cpu_out) < CUDA_TOL[dtype]
    for a, b in zip(grads, cpu_grads):
        assert (a is None) == (b is None)
        if a is not None:
            assert a.copy_to_host().dtype == dtype
            assert rel_err(a.copy_to_host(), b) < CUDA_TOL[dtype]
    return grads


@pytest.mark.skipif(not cuda.is_available(), reason="numba-cuda is not installed")
@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize(
    "cfg", [CONFIGS[i] for i in (0, 2, 4, 6, 7)], ids=[IDS[i] for i in (0, 2, 4, 6, 7)]
)
def test_cuda_matches_cpu(rng, cfg, dtype):
    _cuda_vs_cpu(rng, cfg, dtype)


@pytest.mark.skipif(not cuda.is_available(), reason="numba-cuda is not installed")
def test_cuda_needs_subsets_and_many_channels(rng):
    # D = 9: not a multiple of the 4-channel run
    cfg = ("D9", 1, 4, 4, 2, 9, 3, 3, 1, 1, 1, 1, 1, 1, 1.0, False)
    for needs in [(1, 0, 0), (0, 1, 1), (0, 0, 1)]:
        _cuda_vs_cpu(rng, cfg, np.float64, needs)


@pytest.mark.skipif(not cuda.is_available(), reason="numba-cuda is not installed")
def test_cuda_deterministic_input_gradient(deterministic):
    # the sorted owner-computes scatter: equal to the CPU and bit-identical across runs
    cfg = CONFIGS[4]
    first = _cuda_vs_cpu(np.random.default_rng(7), cfg, np.float64)
    second = _cuda_vs_cpu(np.random.default_rng(7), cfg, np.float64)
    for a, b in zip(first, second):
        assert a.copy_to_host().tobytes() == b.copy_to_host().tobytes()


@pytest.mark.skipif(not cuda.is_available(), reason="numba-cuda is not installed")
def test_cuda_nonfinite_offsets_and_empty_batch(rng):
    from numba import cuda as ncuda

    cfg = CONFIGS[1]
    x, off, m, g = make_inputs(rng, cfg)
    geo = _geometry(cfg)
    off[0, 0, 0, :] = np.nan
    off[0, 1, 1, :] = 1e6
    d = [ncuda.to_device(a) for a in (x, off, m, g)]
    np.testing.assert_allclose(
        dcnv3_forward(*d[:3], *geo).copy_to_host(),
        dcnv3_forward(x, off, m, *geo),
        rtol=0,
        atol=1e-12,
    )
    for a, b in zip(dcnv3_backward(d[3], *d[:3], *geo), dcnv3_backward(g, x, off, m, *geo)):
        np.testing.assert_allclose(a.copy_to_host(), b, rtol=0, atol=1e-12)
    e = [ncuda.to_device(a[:0]) for a in (x, off, m, g)]
    assert dcnv3_forward(*e[:3], *geo).shape == (0, *g.shape[1:])
    gi, go, gm = dcnv3_backward(e[3], *e[:3], *geo)
    assert gi.shape == x[:0].shape and go.shape == off[:0].shape


# ---------------------------------------------------------------------------------------------
# torch parity: a transcription of InternImage's dcnv3_core_pytorch (ops_dcnv3/functions/
# dcnv3_func.py), in the input's dtype (the anchor builds its reference points and grid in
# float32; here they follow the input so float64 parity can be checked to 1e-12)
# ---------------------------------------------------------------------------------------------


def _torch_dcnv3_core(input, offset, mask, kernel_h, kernel_w, stride_h, stride_w, pad_h, pad_w,
                      dilation_h, dilation_w, group, group_channels, offset_scale, remove_center):  # fmt: skip
    import torch
    import torch.nn.functional as F

    dt = input.dtype
    input = F.pad(input, [0, 0, pad_h, pad_h, pad_w, pad_w])
    N_, H_in, W_in, _ = input.shape
    _, H_out, W_out, _ = offset.shape
    H_o = (H_in - (dilation_h * (kernel_h - 1) + 1)) // stride_h + 1
    W_o = (W_in - (dilation_w * (kernel_w - 1) + 1)) // stride_w + 1
    ref_y, ref_x = torch.meshgrid(
        torch.linspace((dilation_h * (kernel_h - 1)) // 2 + 0.5,
                       (dilation_h * (kernel_h - 1)) // 2 + 0.5 + (H_o - 1) * stride_h, H_o, dtype=dt),
        torch.linspace((dilation_w * (kernel_w - 1)) // 2 + 0.5,
                       (dilation_w * (kernel_w - 1)) // 2 + 0.5 + (W_o - 1) * stride_w, W_o, dtype=dt),
        indexing="ij",
    )  # fmt: skip
    ref_y = ref_y.reshape(-1)[None] / H_in
    ref_x = ref_x.reshape(-1)[None] / W_in
    ref = torch.stack((ref_x, ref_y), -1).reshape(1, H_o, W_o, 1, 2)
    x, y = torch.meshgrid(
        torch.linspace(-((dilation_w * (kernel_w - 1)) // 2),
                       -((dilation_w * (kernel_w - 1)) // 2) + (kernel_w - 1) * dilation_w, kernel_w, dtype=dt),
        torch.linspace(-((dilation_h * (kernel_h - 1)) // 2),
                       -((dilation_h * (kernel_h - 1)) // 2) + (kernel_h - 1) * dilation_h, kernel_h, dtype=dt),
        indexing="ij",
    )  # fmt: skip
    grid = (
        torch.stack([x / W_in, y / H_in], -1).reshape(-1, 1, 2).repeat(1, group, 1).permute(1, 0, 2)
    )
    grid = grid.reshape(1, 1, 1, group * kernel_h * kernel_w, 2)
    P_ = kernel_h * kernel_w - int(remove_center)
    spatial_norm = (
        torch.tensor([W_in, H_in], dtype=dt).reshape(1, 1, 1, 2).repeat(1, 1, 1, group * P_)
    )
    loc = (ref + grid * offset_scale).repeat(N_, 1, 1, 1, 1)
    if remove_center:
        C = (kernel_w * kernel_h - 1) // 2
        idx = [i for i in range(loc.shape[-2]) if i != C and (i - C) % (C * 2 + 1) != 0]
        loc = loc[:, :, :, idx, :]
    loc = loc.flatten(3, 4)
    loc = loc + offset * offset_scale / spatial_norm
    grids = 2 * loc - 1
    input_ = input.view(N_, H_in * W_in, group * group_channels).transpose(1, 2).reshape(
        N_ * group, group_channels, H_in, W_in)  # fmt: skip
    grid_ = grids.view(N_, H_out * W_out, group, P_, 2).transpose(1, 2).flatten(0, 1)
    sampled = F.grid_sample(
        input_, grid_, mode="bilinear", padding_mode="zeros", align_corners=False
    )
    mask = (
        mask.view(N_, H_out * W_out, group, P_)
        .transpose(1, 2)
        .reshape(N_ * group, 1, H_out * W_out, P_)
    )
    output = (sampled * mask).sum(-1).view(N_, group * group_channels, H_out * W_out)
    return output.transpose(1, 2).reshape(N_, H_out, W_out, -1).contiguous()


@pytest.mark.parametrize("cfg", CONFIGS, ids=IDS)
def test_torch_parity(rng, cfg):
    torch = pytest.importorskip("torch")
    x, off, m, g = make_inputs(rng, cfg)
    geo = _geometry(cfg)
    tx, toff, tm = (torch.tensor(a, requires_grad=True) for a in (x, off, m))
    tout = _torch_dcnv3_core(tx, toff, tm, *geo)
    tout.backward(torch.tensor(g))
    out = dcnv3_forward(x, off, m, *geo)
    grads = dcnv3_backward(g, x, off, m, *geo)
    assert rel_err(out, tout.detach().numpy()) < 1e-12
    for got, t in zip(grads, (tx, toff, tm)):
        assert rel_err(got, t.grad.numpy()) < 1e-12
