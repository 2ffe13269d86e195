"""DCNv4's ``dcnv4`` and ``flash_deform_attn`` (deformnp/ops/dcnv4.py; anchor OpenGVLab/DCNv4).

Naive float64 references (tests/reference/dcnv4.py) for outputs and every gradient, gradcheck
with sampling coordinates off the kinks (fractional parts in [0.1, 0.9], which also keeps them
off the border lines -1, 0, H-1, H), edge cases, error messages, CPU determinism across runs and
thread counts, the CUDA kernels against the CPU ones under Numba's simulator (tests/conftest.py),
and torch parity with transcriptions of the anchors' pure-PyTorch cores (InternImage's
``dcnv3_core_pytorch`` without softmax, on the unpacked offsets and masks, and Deformable-DETR's
``ms_deform_attn_core_pytorch`` after the softmax), skipped without torch.
"""

from __future__ import annotations

import contextlib
import math

import numba
import numpy as np
import pytest
from reference import dcnv4 as ref

import deformnp as dn
from deformnp import cuda
from deformnp.cases.inputs import locations_off_kinks
from deformnp.kernels.cpu import dcnv4 as cpu_kernels
from deformnp.ops.dcnv4 import (
    dcnv4,
    dcnv4_backward,
    dcnv4_forward,
    flash_deform_attn,
    flash_deform_attn_backward,
    flash_deform_attn_forward,
)

TOL = {np.float64: 1e-12, np.float32: 1e-5}


def rel_err(a, b):
    b = np.asarray(b, np.float64)
    scale = max(np.abs(b).max(initial=0.0), 1e-300)
    return float(np.abs(np.asarray(a, np.float64) - b).max(initial=0.0) / scale)


# ------------------------------------------------------------------------------ inputs

# (H, W, kh, kw, sh, sw, ph, pw, dh, dw, G, D, offset_scale, remove_center)
CONFIGS = {
    "3x3 same": (5, 6, 3, 3, 1, 1, 1, 1, 1, 1, 2, 3, 1.0, 0),
    "3x3 remove_center": (5, 4, 3, 3, 1, 1, 1, 1, 1, 1, 2, 4, 1.0, 1),
    "3x5 stride dilation": (7, 9, 3, 5, 2, 1, 2, 0, 1, 2, 1, 5, 0.5, 0),
    "2x2 even scaled": (4, 5, 2, 2, 1, 2, 0, 1, 2, 1, 3, 2, 1.7, 0),
    "1x3 remove_center": (3, 6, 1, 3, 1, 1, 0, 1, 1, 1, 2, 2, 1.0, 1),
    "1x1": (3, 3, 1, 1, 1, 1, 0, 0, 1, 1, 1, 3, 1.0, 0),
}


def params(cfg):
    """The op's arguments after input and offset_mask, im2col_step included."""
    H, W, kh, kw, sh, sw, ph, pw, dh, dw, G, D, s, rc = cfg
    return (kh, kw, sh, sw, ph, pw, dh, dw, G, D, s, 256, rc)


def ref_params(cfg):
    H, W, kh, kw, sh, sw, ph, pw, dh, dw, G, D, s, rc = cfg
    return (kh, kw, sh, sw, ph, pw, dh, dw, G, D, s, rc)


def offsets_off_kinks(rng, cfg, B, extra=3):
    """offset_mask (B, Ho, Wo, G*K*3 + extra) whose sampling coordinates have integer parts in
    [-2, size] and fractional parts in [0.1, 0.9]: the offsets are solved from the coordinates."""
    H, W, kh, kw, sh, sw, ph, pw, dh, dw, G, D, s, rc = cfg
    Ho, Wo = ref.output_size(H, W, kh, kw, sh, sw, ph, pw, dh, dw)
    pts = ref.dcnv4_points(kh, kw, rc)
    K = len(pts)
    om = rng.standard_normal((B, Ho, Wo, G * K * 3 + extra))
    cw, ch = (dw * (kw - 1)) // 2, (dh * (kh - 1)) // 2
    for b in range(B):
        for ho in range(Ho):
            for wo in range(Wo):
                for g in range(G):
                    for k, (i, j) in enumerate(pts):
                        tx = rng.integers(-2, W + 1) + rng.uniform(0.1, 0.9)
                        ty = rng.integers(-2, H + 1) + rng.uniform(0.1, 0.9)
                        bx = wo * sw - pw + cw + (i * dw - cw) * s
                        by = ho * sh - ph + ch + (j * dh - ch) * s
                        om[b, ho, wo, g * 3 * K + 2 * k] = (tx - bx) / s
                        om[b, ho, wo, g * 3 * K + 2 * k + 1] = (ty - by) / s
    return om


def dcnv4_inputs(rng, cfg, B=2, dtype=np.float64, extra=3):
    H, W, kh, kw, sh, sw, ph, pw, dh, dw, G, D, s, rc = cfg
    x = rng.standard_normal((B, H, W, G * D)).astype(dtype)
    om = offsets_off_kinks(rng, cfg, B, extra).astype(dtype)
    Ho, Wo = ref.output_size(H, W, kh, kw, sh, sw, ph, pw, dh, dw)
    g = rng.standard_normal((B, Ho, Wo, G * D)).astype(dtype)
    return x, om, g


LEVELS = [(4, 5), (2, 3), (1, 2)]


def flash_inputs(rng, levels=LEVELS, N=2, Lq=3, G=2, D=3, K=2, dtype=np.float64):
    shapes = np.array(levels, np.int64).reshape(-1, 2)
    sizes = shapes.prod(1)
    starts = np.concatenate([[0], np.cumsum(sizes)[:-1]]).astype(np.int64)
    L = len(levels)
    value = rng.standard_normal((N, int(sizes.sum()), G, D)).astype(dtype)
    with np.errstate(divide="ignore", invalid="ignore"):  # an empty level: any location
        loc = locations_off_kinks(rng, shapes, (N, Lq, G), K)
    empty = sizes == 0
    loc[:, :, :, empty] = rng.uniform(0, 1, loc[:, :, :, empty].shape)
    loc = loc.reshape(N, Lq, G, 2 * L * K)
    logits = 2 * rng.standard_normal((N, Lq, G, L * K))
    sla = np.concatenate([loc, logits], -1).astype(dtype)
    g = rng.standard_normal((N, Lq, G * D)).astype(dtype)
    return value, shapes, starts, sla, K, g


# ------------------------------------------------------------------------ reference parity


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize("name", CONFIGS)
def test_dcnv4_matches_reference(rng, name, dtype):
    cfg = CONFIGS[name]
    x, om, g = dcnv4_inputs(rng, cfg, dtype=dtype)
    out = dcnv4_forward(x, om, *params(cfg))
    grads = dcnv4_backward(g, x, om, *params(cfg))
    r_out, r_gx, r_gom = ref.dcnv4(x, om, *ref_params(cfg), grad_out=g.astype(np.float64))
    assert out.dtype == dtype and out.shape == r_out.shape
    assert rel_err(out, r_out) < TOL[dtype]
    assert rel_err(grads[0], r_gx) < TOL[dtype]
    assert rel_err(grads[1], r_gom) < TOL[dtype] * 10
    G, K = cfg[10], len(ref.dcnv4_points(cfg[2], cfg[3], cfg[13]))
    assert np.all(grads[1][..., G * K * 3 :] == 0)  # padding columns


def test_dcnv4_random_offsets_and_outside(rng):
    # plain random offsets, some far outside the map and in the fading band
    cfg = CONFIGS["3x3 same"]
    x, om, g = dcnv4_inputs(rng, cfg)
    om[..., :36] = 4 * rng.standard_normal(om[..., :36].shape)
    out = dcnv4_forward(x, om, *params(cfg))
    gx, gom = dcnv4_backward(g, x, om, *params(cfg))
    r = ref.dcnv4(x, om, *ref_params(cfg), grad_out=g)
    assert rel_err(out, r[0]) < 1e-12 and rel_err(gx, r[1]) < 1e-12 and rel_err(gom, r[2]) < 1e-12


def test_dcnv4_box_sum():
    # zero offsets, unit masks: a zero-padded 3x3 box sum per channel (the docstring example)
    x = np.arange(2 * 4 * 4 * 2, dtype=np.float64).reshape(2, 4, 4, 2)
    om = np.zeros((2, 4, 4, 2 * 27 + 2))
    om[..., 18:27] = 1.0
    om[..., 45:54] = 1.0
    out = dcnv4_forward(x, om, 3, 3, 1, 1, 1, 1, 1, 1, 2, 1, 1.0, 256, False)
    pad = np.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)))
    box = sum(pad[:, i : i + 4, j : j + 4] for i in range(3) for j in range(3))
    np.testing.assert_allclose(out, box, rtol=1e-14)


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize("levels, K", [(LEVELS, 2), ([(3, 3)], 1), ([(2, 4), (0, 3), (3, 1)], 3)])
def test_flash_matches_reference(rng, levels, K, dtype):
    value, shapes, starts, sla, K, g = flash_inputs(rng, levels, K=K, dtype=dtype)
    out = flash_deform_attn_forward(value, shapes, starts, sla, 64, K)
    gv, gs = flash_deform_attn_backward(g, value, shapes, starts, sla, 64, K)
    r_out, r_gv, r_gs = ref.flash_deform_attn(value, shapes, starts, sla, K, grad_out=g)
    assert out.dtype == dtype and out.shape == r_out.shape
    assert rel_err(out, r_out) < TOL[dtype]
    assert rel_err(gv, r_gv) < TOL[dtype]
    assert rel_err(gs, r_gs) < TOL[dtype] * 10


def test_flash_is_ms_deform_attn_after_softmax(rng):
    # the composition, bit for bit: the same attention kernels on the unpacked arrays
    from deformnp.ops import ms_deform_attn_forward

    value, shapes, starts, sla, K, g = flash_inputs(rng)
    N, Lq, G, _ = sla.shape
    L = len(shapes)
    loc = sla[..., : 2 * L * K].reshape(N, Lq, G, L, K, 2)
    z = sla[..., 2 * L * K :]
    # the kernel's exp is the C library's (math.exp); NumPy's vectorized exp (its AVX-512 build)
    # can differ from it in the last bit
    e = np.vectorize(math.exp)(z - z.max(-1, keepdims=True))
    attn = np.empty_like(z)
    for idx in np.ndindex(z.shape[:-1]):  # the kernel's order: sequential sum
        s = 0.0
        for v in e[idx]:
            s += v
        attn[idx] = e[idx] / s
    out = ms_deform_attn_forward(value, shapes, starts, loc, attn.reshape(N, Lq, G, L, K))
    np.testing.assert_array_equal(flash_deform_attn_forward(value, shapes, starts, sla, 64, K), out)


# ------------------------------------------------------------------------------ gradcheck


@pytest.mark.parametrize("name", ["3x3 same", "3x5 stride dilation", "2x2 even scaled"])
def test_dcnv4_gradcheck(rng, name):
    cfg = CONFIGS[name]
    x, om, _ = dcnv4_inputs(rng, cfg, B=1)
    p = params(cfg)
    assert dn.gradcheck(
        lambda a, b: dcnv4(a, b, *p),
        (dn.tensor(x, requires_grad=True), dn.tensor(om, requires_grad=True)),
        names=("input", "offset_mask"),
    )


def test_flash_gradcheck(rng):
    value, shapes, starts, sla, K, _ = flash_inputs(rng, N=1, Lq=2)
    assert dn.gradcheck(
        lambda v, s: flash_deform_attn(v, shapes, starts, s, 64, K),
        (dn.tensor(value, requires_grad=True), dn.tensor(sla, requires_grad=True)),
        names=("value", "sampling_loc_attn"),
    )


def test_tensor_ops_match_array_pairs(rng):
    cfg = CONFIGS["3x3 remove_center"]
    x, om, g = dcnv4_inputs(rng, cfg)
    tx, tom = dn.tensor(x, requires_grad=True), dn.tensor(om, requires_grad=True)
    out = dcnv4(tx, tom, *params(cfg))
    assert isinstance(out, dn.Tensor)
    (out * dn.tensor(g)).sum().backward()
    gx, gom = dcnv4_backward(g, x, om, *params(cfg))
    np.testing.assert_array_equal(np.asarray(tx.grad), gx)
    np.testing.assert_array_equal(np.asarray(tom.grad), gom)

    value, shapes, starts, sla, K, g = flash_inputs(rng)
    tv, ts = dn.tensor(value, requires_grad=True), dn.tensor(sla, requires_grad=True)
    out = flash_deform_attn(tv, shapes, starts, ts, 64, K)
    (out * dn.tensor(g)).sum().backward()
    gv, gs = flash_deform_attn_backward(g, value, shapes, starts, sla, 64, K)
    np.testing.assert_array_equal(np.asarray(tv.grad), gv)
    np.testing.assert_array_equal(np.asarray(ts.grad), gs)


@pytest.mark.parametrize("needs", [(True, False), (False, True), (False, False)])
def test_needs_subsets(rng, needs):
    cfg = CONFIGS["3x3 same"]
    x, om, g = dcnv4_inputs(rng, cfg)
    full = dcnv4_backward(g, x, om, *params(cfg))
    part = dcnv4_backward(g, x, om, *params(cfg), needs=needs)
    for f, p, n in zip(full, part, needs):
        assert (p is None) == (not n)
        if n:
            np.testing.assert_array_equal(f, p)
    value, shapes, starts, sla, K, g = flash_inputs(rng)
    full = flash_deform_attn_backward(g, value, shapes, starts, sla, 64, K)
    part = flash_deform_attn_backward(g, value, shapes, starts, sla, 64, K, needs=needs)
    for f, p, n in zip(full, part, needs):
        assert (p is None) == (not n)
        if n:
            np.testing.assert_array_equal(f, p)


# ------------------------------------------------------------------------------ edge cases


def test_empty_batch_and_queries(rng):
    cfg = CONFIGS["3x3 same"]
    x, om, g = dcnv4_inputs(rng, cfg, B=0)
    out = dcnv4_forward(x, om, *params(cfg))
    gx, gom = dcnv4_backward(g, x, om, *params(cfg))
    assert out.shape == (0, 5, 6, 6) and gx.shape == x.shape and gom.shape == om.shape
    value, shapes, starts, sla, K, g = flash_inputs(rng, N=0)
    assert flash_deform_attn_forward(value, shapes, starts, sla, 64, K).shape == (0, 3, 6)
    value, shapes, starts, sla, K, g = flash_inputs(rng, Lq=0)
    gv, gs = flash_deform_attn_backward(g, value, shapes, starts, sla, 64, K)
    assert np.all(gv == 0) and gs.shape == sla.shape


def test_empty_input_map_with_padding():
    # H = 0 but padding gives a 2x1 output: every sample is outside, out and gradients are 0
    x = np.zeros((1, 0, 1, 4))
    om = np.ones((1, 2, 1, 2 * 9 * 3))
    p = (3, 3, 1, 1, 2, 1, 1, 1, 2, 2, 1.0, 256, 0)
    out = dcnv4_forward(x, om, *p)
    assert out.shape == (1, 2, 1, 4) and np.all(out == 0)
    gx, gom = dcnv4_backward(np.ones_like(out), x, om, *p)
    assert gx.shape == x.shape and np.all(gom == 0)


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf, 1e6, -1e6])
def test_nan_and_far_offsets_sample_zero(rng, bad):
    cfg = CONFIGS["3x3 same"]
    x, om, g = dcnv4_inputs(rng, cfg, B=1)
    K = 9
    om[0, 2, 3, 3 * K : 3 * K + 2] = 0.3  # the point below starts inside the map
    clean_out = dcnv4_forward(x, om, *params(cfg))
    clean_gx, _ = dcnv4_backward(g, x, om, *params(cfg))
    # point 0 of group 1 at output (2, 3): its dx, and its mask zeroed for the comparison
    om2 = om.copy()
    om2[0, 2, 3, 3 * K] = bad
    out = dcnv4_forward(x, om2, *params(cfg))
    gx, gom = dcnv4_backward(g, x, om2, *params(cfg))
    assert np.all(np.isfinite(out)) and np.all(np.isfinite(gx)) and np.all(np.isfinite(gom))
    assert gom[0, 2, 3, 3 * K] == 0 and gom[0, 2, 3, 3 * K + 1] == 0
    assert gom[0, 2, 3, 3 * K + 2 * K] == 0  # mask gradient of a zero sample
    om3 = om.copy()
    om3[0, 2, 3, 3 * K + 2 * K] = 0.0  # the same point masked out instead
    np.testing.assert_allclose(out, dcnv4_forward(x, om3, *params(cfg)), rtol=0, atol=1e-13)
    assert not np.allclose(out, clean_out)
    np.testing.assert_allclose(gx, dcnv4_backward(g, x, om3, *params(cfg))[0], atol=1e-13)
    assert not np.allclose(gx, clean_gx)


def test_flash_nan_locations_and_logits(rng):
    value, shapes, starts, sla, K, g = flash_inputs(rng, N=1, Lq=2)
    sla[0, 0, 0, 0] = np.nan  # a location: that sample is zero, everything stays finite
    out = flash_deform_attn_forward(value, shapes, starts, sla, 64, K)
    gv, gs = flash_deform_attn_backward(g, value, shapes, starts, sla, 64, K)
    assert np.all(np.isfinite(out)) and np.all(np.isfinite(gv)) and np.all(np.isfinite(gs))
    assert gs[0, 0, 0, 0] == 0 and gs[0, 0, 0, 1] == 0
    LK = len(LEVELS) * K
    sla[0, 1, 1, 2 * LK] = np.nan  # a logit: the softmax of that (query, head) is NaN (anchor)
    out = flash_deform_attn_forward(value, shapes, starts, sla, 64, K)
    D = value.shape[3]
    assert np.all(np.isnan(out[0, 1, D:])) and np.all(np.isfinite(out[0, 0]))


def test_flash_softmax_is_shift_invariant_and_handles_large_logits(rng):
    value, shapes, starts, sla, K, g = flash_inputs(rng, N=1, Lq=2)
    LK = len(LEVELS) * K
    out = flash_deform_attn_forward(value, shapes, starts, sla, 64, K)
    big = sla.copy()
    big[..., 2 * LK :] += 800.0  # exp(800) overflows without the max subtraction
    np.testing.assert_allclose(
        flash_deform_attn_forward(value, shapes, starts, big, 64, K), out, rtol=1e-9, atol=1e-12
    )


def test_im2col_step_is_ignored(rng):
    cfg = CONFIGS["3x3 same"]
    x, om, g = dcnv4_inputs(rng, cfg, B=3)
    p = list(params(cfg))
    a = dcnv4_forward(x, om, *p)
    p[11] = 2  # does not divide B = 3: no divisibility rule
    np.testing.assert_array_equal(a, dcnv4_forward(x, om, *p))


# --------------------------------------------------------------------------- bad inputs


def _dcnv4_call(**over):
    x = np.zeros((1, 4, 4, 8))
    om = np.zeros((1, 4, 4, 56))
    kw = dict(
        input=x, offset_mask=om, kernel_h=3, kernel_w=3, stride_h=1, stride_w=1, pad_h=1,
        pad_w=1, dilation_h=1, dilation_w=1, group=2, group_channels=4, offset_scale=1.0,
        im2col_step=256, remove_center=False,
    )  # fmt: skip
    kw.update(over)
    return dcnv4_forward(**kw)


@pytest.mark.parametrize(
    "over, exc, message",
    [
        (dict(input=np.zeros((1, 4, 4, 8), np.int64)), TypeError, "dcnv4: input must be float32"),
        (dict(offset_mask=np.zeros((1, 4, 4, 56), np.float32)), TypeError, "share one float dtype"),
        (dict(input=np.zeros((4, 4, 8))), ValueError, "dcnv4: input must be 4-d"),
        (dict(input=np.zeros((1, 4, 4, 7))), ValueError, "input has 7 channels, expected group"),
        (dict(offset_mask=np.zeros((1, 4, 4, 53))), ValueError, "at least group*K*3 = 2*9*3 = 54"),
        (dict(offset_mask=np.zeros((1, 4, 3, 56))), ValueError, "offset_mask has shape"),
        (dict(kernel_h=0), ValueError, "dcnv4: kernel_h must be >= 1"),
        (dict(stride_w=0), ValueError, "dcnv4: stride_w must be >= 1"),
        (dict(pad_h=-1), ValueError, "dcnv4: pad_h must be >= 0"),
        (dict(dilation_w=1.0), TypeError, "dcnv4: dilation_w must be an int"),
        (dict(group=0), ValueError, "dcnv4: group must be >= 1"),
        (dict(offset_scale="1"), TypeError, "dcnv4: offset_scale must be a real number"),
        (dict(offset_scale=math.inf), ValueError, "dcnv4: offset_scale must be finite"),
        (dict(im2col_step=0), ValueError, "dcnv4: im2col_step must be >= 1"),
        (dict(remove_center=2), ValueError, "dcnv4: remove_center must be <= 1"),
        (dict(pad_h=0, kernel_h=5, offset_mask=np.zeros((1, 0, 4, 90))), ValueError, "empty"),
    ],
)
def test_dcnv4_bad_inputs(over, exc, message):
    with pytest.raises(exc, match=message.replace("*", r"\*").replace("(", r"\(")):
        _dcnv4_call(**over)


def test_dcnv4_bad_grad_and_needs(rng):
    cfg = CONFIGS["3x3 same"]
    x, om, g = dcnv4_inputs(rng, cfg)
    with pytest.raises(ValueError, match="dcnv4: grad_out"):
        dcnv4_backward(g[:, :-1], x, om, *params(cfg))
    with pytest.raises(ValueError, match="dcnv4: needs must have 2 flags"):
        dcnv4_backward(g, x, om, *params(cfg), needs=(True,))


@pytest.mark.parametrize(
    "mutate, exc, message",
    [
        (lambda a: a.update(sla=a["sla"][..., :-1]), ValueError, "sampling_loc_attn has shape"),
        (lambda a: a.update(K=3), ValueError, "K = 3: last dimension 27"),
        (lambda a: a.update(K=0), ValueError, "flash_deform_attn: K must be >= 1"),
        (lambda a: a.update(starts=np.array([0, 20, 27])), ValueError, "inconsistent"),
        (lambda a: a.update(shapes=np.array([[4, 5], [2, 3], [1, 3]])), ValueError, "S = 28"),
        (
            lambda a: a.update(value=a["value"].astype(np.float32)),
            TypeError,
            "share one float dtype",
        ),
        (lambda a: a.update(step=0), ValueError, "im2col_step must be >= 1"),
        (lambda a: a.update(value=a["value"][0]), ValueError, "value must be 4-d"),
    ],
)
def test_flash_bad_inputs(rng, mutate, exc, message):
    value, shapes, starts, sla, K, g = flash_inputs(rng)
    a = dict(value=value, shapes=shapes, starts=starts, sla=sla, K=K, step=64)
    mutate(a)
    with pytest.raises(exc, match=message):
        flash_deform_attn_forward(a["value"], a["shapes"], a["starts"], a["sla"], a["step"], a["K"])


# ---------------------------------------------------------------------------- determinism


def _backward_with_threads(n, fn):
    prev = numba.get_num_threads()
    numba.set_num_threads(n)
    try:
        return fn()
    finally:
        numba.set_num_threads(prev)


def test_cpu_backward_bit_identical_across_runs_and_threads(rng, monkeypatch):
    # force the parallel path (small problems otherwise run on one thread)
    monkeypatch.setattr(cpu_kernels, "threads_for", lambda work: contextlib.nullcontext())
    cfg = CONFIGS["3x3 remove_center"]
    x, om, g = dcnv4_inputs(rng, cfg, B=3)
    om[..., :48] = 3 * rng.standard_normal(om[..., :48].shape)  # many points share pixels
    value, shapes, starts, sla, K, gf = flash_inputs(rng, N=3, Lq=40)

    def both():
        return (*dcnv4_backward(g, x, om, *params(cfg)),
                *flash_deform_attn_backward(gf, value, shapes, starts, sla, 64, K))  # fmt: skip

    first = _backward_with_threads(1, both)
    for n in (2, 1, numba.config.NUMBA_NUM_THREADS):
        again = _backward_with_threads(n, both)
        for a, b in zip(first, again):
            assert a.tobytes() == b.tobytes()


# ------------------------------------------------------------------ CUDA (simulator or GPU)

needs_cuda = pytest.mark.skipif(not cuda.is_available(), reason="numba-cuda is not installed")


def _cuda_kernels():
    from deformnp.kernels.cuda import dcnv4 as k

    return k


@pytest.fixture
def deterministic():
    dn.use_deterministic_algorithms(True)
    try:
        yield
    finally:
        dn.use_deterministic_algorithms(False)


def _dev(*arrays):
    from numba import cuda as nc

    return [nc.to_device(a) for a in arrays]


def _host(arrays):
    return [None if a is None else a.copy_to_host() for a in arrays]


def _cuda_vs_cpu_dcnv4(rng, cfg, dtype, needs=(True, True), B=2):
    x, om, g = dcnv4_inputs(rng, cfg, B=B, dtype=dtype)
    dx, dom, dg = _dev(x, om, g)
    out = dcnv4_forward(dx, dom, *params(cfg)).copy_to_host()
    grads = _host(dcnv4_backward(dg, dx, dom, *params(cfg), needs=needs))
    c_out = dcnv4_forward(x, om, *params(cfg))
    c_grads = dcnv4_backward(g, x, om, *params(cfg), needs=needs)
    tol = TOL[dtype]
    assert out.dtype == dtype and rel_err(out, c_out) < tol
    for a, b in zip(grads, c_grads):
        assert (a is None) == (b is None)
        if a is not None:
            assert a.dtype == dtype and rel_err(a, b) < tol * 10
    return grads


@needs_cuda
@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize("name", ["3x3 same", "3x5 stride dilation", "1x3 remove_center"])
def test_cuda_dcnv4_matches_cpu(rng, name, dtype):
    _cuda_vs_cpu_dcnv4(rng, CONFIGS[name], dtype)


@needs_cuda
@pytest.mark.parametrize("needs", [(True, False), (False, True)])
def test_cuda_dcnv4_needs(rng, needs):
    _cuda_vs_cpu_dcnv4(rng, CONFIGS["2x2 even scaled"], np.float64, needs)


@needs_cuda
def test_cuda_dcnv4_deterministic(rng, deterministic):
    cfg = CONFIGS["3x3 same"]
    first = _cuda_vs_cpu_dcnv4(rng, cfg, np.float64, B=1)
    again = _cuda_vs_cpu_dcnv4(np.random.default_rng(1234), cfg, np.float64, B=1)
    assert first[0].tobytes() == again[0].tobytes()


@needs_cuda
def test_cuda_dcnv4_edges(rng):
    cfg = CONFIGS["3x3 same"]
    x, om, g = dcnv4_inputs(rng, cfg, B=0)
    out = dcnv4_forward(*_dev(x, om), *params(cfg))
    assert out.shape == (0, 5, 6, 6)
    x, om, g = dcnv4_inputs(rng, cfg, B=1)
    om[0, 1, 1, :4] = [np.nan, np.inf, 1e6, -1e6]
    out = dcnv4_forward(*_dev(x, om), *params(cfg)).copy_to_host()
    grads = _host(dcnv4_backward(*_dev(g, x, om), *params(cfg)))
    np.testing.assert_allclose(out, dcnv4_forward(x, om, *params(cfg)), rtol=1e-12, atol=1e-14)
    for a, b in zip(grads, dcnv4_backward(g, x, om, *params(cfg))):
        assert np.all(np.isfinite(a))
        np.testing.assert_allclose(a, b, rtol=1e-12, atol=1e-13)


@needs_cuda
@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_cuda_flash_matches_cpu(rng, dtype):
    value, shapes, starts, sla, K, g = flash_inputs(rng, [(3, 4), (0, 2), (2, 2)], dtype=dtype)
    dv, ds, dg = _dev(value, sla, g)
    out = flash_deform_attn_forward(dv, shapes, starts, ds, 64, K).copy_to_host()
    grads = _host(flash_deform_attn_backward(dg, dv, shapes, starts, ds, 64, K))
    assert rel_err(out, flash_deform_attn_forward(value, shapes, starts, sla, 64, K)) < TOL[dtype]
    for a, b in zip(grads, flash_deform_attn_backward(g, value, shapes, starts, sla, 64, K)):
        assert a.dtype == dtype and rel_err(a, b) < TOL[dtype] * 10


@needs_cuda
def test_cuda_tensor_ops(rng):
    cfg = CONFIGS["3x3 remove_center"]
    x, om, g = dcnv4_inputs(rng, cfg, B=1)
    tx, tom = (dn.tensor(a).to("cuda").requires_grad_() for a in (x, om))
    out = dcnv4(tx, tom, *params(cfg))
    out.backward(dn.tensor(g).cuda())
    gx, gom = dcnv4_backward(g, x, om, *params(cfg))
    assert rel_err(tx.grad.copy_to_host(), gx) < 1e-12
    assert rel_err(tom.grad.copy_to_host(), gom) < 1e-12


LANE_SHAPES = {
    # 1*3*4 positions x 2 groups = 24 groups x 2 lanes = 48 threads on a 32-thread grid; D = 5 >
    # 4*2: two passes, the second with one channel (lane 0 only)
    "lanes=2, D=5": (2, (3, 4, 3, 3, 1, 1, 1, 1, 1, 1, 2, 5, 1.0, 0)),
    # 4 lanes, D = 6: lanes 2 and 3 hold one channel
    "lanes=4, D=6": (4, (2, 3, 3, 3, 1, 1, 1, 1, 1, 1, 1, 6, 1.0, 1)),
}


@needs_cuda
@pytest.mark.parametrize("mode", ["default", "deterministic"])
@pytest.mark.parametrize("name", LANE_SHAPES)
def test_cuda_dcnv4_channel_lanes_emulated(rng, monkeypatch, name, mode):
    # one block of one warp with these lanes, so the grid-stride loop turns; the shuffles are
    # emulated on the simulator and real on a GPU (DEFORMNP_REAL_GPU=1), as for attention
    from test_cuda_attention import EmulatedShuffles

    from deformnp.kernels.cuda import _launch

    k = _cuda_kernels()
    lanes, cfg = LANE_SHAPES[name]
    monkeypatch.setattr(k, "lanes_for", lambda channels: lanes)
    monkeypatch.setattr(k, "grid", lambda total: (1, 32))
    if _launch.SIMULATOR:
        monkeypatch.setattr(k, "lane_sum", EmulatedShuffles())
    dn.use_deterministic_algorithms(mode == "deterministic")
    try:
        _cuda_vs_cpu_dcnv4(rng, cfg, np.float64, B=1)
    finally:
        dn.use_deterministic_algorithms(False)


# ------------------------------------------------------------------------------ torch parity


def _torch_dcnv3_core(torch, input, offset, mask, kh, kw, sh, sw, ph, pw, dh, dw, group, gc, scale,
                      rc):  # fmt: skip
    """InternImage's dcnv3_core_pytorch (ops_dcnv3/functions/dcnv3_func.py), transcribed in the
    input's dtype (the original builds its grids in float32)."""
    F = torch.nn.functional
    dt = input.dtype
    input = F.pad(input, [0, 0, pw, pw, ph, ph])
    N, H_in, W_in, _ = input.shape
    _, H_out, W_out, _ = offset.shape
    ref_y, ref_x = torch.meshgrid(
        torch.linspace((dh * (kh - 1)) // 2 + 0.5, (dh * (kh - 1)) // 2 + 0.5 + (H_out - 1) * sh,
                       H_out, dtype=dt),
        torch.linspace((dw * (kw - 1)) // 2 + 0.5, (dw * (kw - 1)) // 2 + 0.5 + (W_out - 1) * sw,
                       W_out, dtype=dt),
        indexing="ij",
    )  # fmt: skip
    refp = torch.stack((ref_x.reshape(-1)[None] / W_in, ref_y.reshape(-1)[None] / H_in), -1)
    refp = refp.reshape(1, H_out, W_out, 1, 2)
    x, y = torch.meshgrid(
        torch.linspace(-((dw * (kw - 1)) // 2), -((dw * (kw - 1)) // 2) + (kw - 1) * dw, kw,
                       dtype=dt),
        torch.linspace(-((dh * (kh - 1)) // 2), -((dh * (kh - 1)) // 2) + (kh - 1) * dh, kh,
                       dtype=dt),
        indexing="ij",
    )  # fmt: skip
    grid = torch.stack([x / W_in, y / H_in], -1).reshape(-1, 1, 2).repeat(1, group, 1)
    grid = grid.permute(1, 0, 2).reshape(1, 1, 1, group * kh * kw, 2)
    P = kh * kw - rc
    norm = torch.tensor([W_in, H_in], dtype=dt).reshape(1, 1, 1, 2).repeat(1, 1, 1, group * P)
    loc = (refp + grid * scale).repeat(N, 1, 1, 1, 1)
    if rc:
        C = (kw * kh - 1) // 2
        idx = [i for i in range(loc.shape[-2]) if i != C and (i - C) % (C * 2 + 1) != 0]
        loc = loc[:, :, :, idx, :]
    loc = loc.flatten(3, 4) + offset * scale / norm
    grids = 2 * loc - 1
    input_ = input.view(N, H_in * W_in, group * gc).transpose(1, 2)
    input_ = input_.reshape(N * group, gc, H_in, W_in)
    grid_ = grids.view(N, H_out * W_out, group, P, 2).transpose(1, 2).flatten(0, 1)
    sampled = F.grid_sample(input_, grid_, mode="bilinear", padding_mode="zeros",
                            align_corners=False)  # fmt: skip
    mask = mask.view(N, H_out * W_out, group, P).transpose(1, 2)
    mask = mask.reshape(N * group, 1, H_out * W_out, P)
    out = (sampled * mask).sum(-1).view(N, group * gc, H_out * W_out)
    return out.transpose(1, 2).reshape(N, H_out, W_out, -1).contiguous()


def _torch_dcnv4(torch, x, om, kh, kw, sh, sw, ph, pw, dh, dw, G, D, s, rc):
    """DCNv4's op as dcnv3_core_pytorch without softmax on the unpacked offset_mask."""
    B, Ho, Wo, _ = om.shape
    K = kh * kw - rc
    blk = om[..., : G * 3 * K].reshape(B, Ho, Wo, G, 3 * K)
    offset = blk[..., : 2 * K].reshape(B, Ho, Wo, G * 2 * K)
    mask = blk[..., 2 * K :].reshape(B, Ho, Wo, G * K)
    return _torch_dcnv3_core(torch, x, offset, mask, kh, kw, sh, sw, ph, pw, dh, dw, G, D, s, rc)


def _torch_ms_deform_attn_core(torch, value, shapes, loc, attn):
    """Deformable-DETR's ms_deform_attn_core_pytorch."""
    F = torch.nn.functional
    N, S, M, D = value.shape
    _, Lq, M, L, P, _ = loc.shape
    values = value.split([h * w for h, w in shapes], dim=1)
    grids = 2 * loc - 1
    samples = []
    for lid, (h, w) in enumerate(shapes):
        v = values[lid].flatten(2).transpose(1, 2).reshape(N * M, D, h, w)
        g = grids[:, :, :, lid].transpose(1, 2).flatten(0, 1)
        samples.append(F.grid_sample(v, g, mode="bilinear", padding_mode="zeros",
                                     align_corners=False))  # fmt: skip
    attn = attn.transpose(1, 2).reshape(N * M, 1, Lq, L * P)
    out = (torch.stack(samples, dim=-2).flatten(-2) * attn).sum(-1).view(N, M * D, Lq)
    return out.transpose(1, 2).contiguous()


def _torch_flash(torch, value, shapes, sla, K):
    N, Lq, G, _ = sla.shape
    L = len(shapes)
    loc = sla[..., : 2 * L * K].reshape(N, Lq, G, L, K, 2)
    attn = torch.softmax(sla[..., 2 * L * K :], -1).reshape(N, Lq, G, L, K)
    return _torch_ms_deform_attn_core(torch, value, shapes, loc, attn)


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize("name", ["3x3 same", "3x3 remove_center", "3x5 stride dilation"])
def test_torch_parity_dcnv4(rng, name, dtype):
    torch = pytest.importorskip("torch")
    cfg = CONFIGS[name]
    x, om, g = dcnv4_inputs(rng, cfg, dtype=dtype)
    tx, tom = (torch.tensor(a, requires_grad=True) for a in (x, om))
    t_out = _torch_dcnv4(torch, tx, tom, *ref_params(cfg))
    t_out.backward(torch.from_numpy(g))
    out = dcnv4_forward(x, om, *params(cfg))
    gx, gom = dcnv4_backward(g, x, om, *params(cfg))
    tol = TOL[dtype]
    assert rel_err(out, t_out.detach().numpy()) < tol
    assert rel_err(gx, np.asarray(tx.grad)) < tol
    assert rel_err(gom, np.asarray(tom.grad)) < tol * 10


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_torch_parity_flash(rng, dtype):
    torch = pytest.importorskip("torch")
    value, shapes, starts, sla, K, g = flash_inputs(rng, N=2, Lq=4, G=3, D=4, K=3, dtype=dtype)
    tv, ts = (torch.tensor(a, requires_grad=True) for a in (value, sla))
    t_out = _torch_flash(torch, tv, [tuple(s) for s in shapes.tolist()], ts, K)
    t_out.backward(torch.from_numpy(g))
    out = flash_deform_attn_forward(value, shapes, starts, sla, 64, K)
    gv, gs = flash_deform_attn_backward(g, value, shapes, starts, sla, 64, K)
    tol = TOL[dtype]
    assert rel_err(out, t_out.detach().numpy()) < tol
    assert rel_err(gv, tv.grad.numpy()) < tol
    assert rel_err(gs, ts.grad.numpy()) < tol * 10


def test_torch_parity_random_offsets_far_outside(rng):
    torch = pytest.importorskip("torch")
    cfg = CONFIGS["3x3 same"]
    x, om, g = dcnv4_inputs(rng, cfg)
    om[..., :36] = 5 * rng.standard_normal(om[..., :36].shape)
    t_out = _torch_dcnv4(torch, torch.from_numpy(x), torch.from_numpy(om), *ref_params(cfg))
    assert rel_err(dcnv4_forward(x, om, *params(cfg)), t_out.numpy()) < 1e-12
