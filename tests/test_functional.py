"""Generic differentiable ops: each matches a NumPy reference and passes gradcheck in float64.

Inputs stay away from the kinks of non-smooth ops (relu/abs at 0, clamp at its bounds, ties of
max/min/maximum), where finite differences are not meaningful.
"""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
from scipy import special

import deformnp as dn
import deformnp.functional as F

RNG = np.random.default_rng(7)


def normal(*shape):
    return RNG.standard_normal(shape)


def positive(*shape):
    return RNG.uniform(0.5, 2.0, shape)


def away_from_zero(*shape):
    """Values with |x| in [0.2, 1.5]: no element near the kink at 0."""
    return RNG.uniform(0.2, 1.5, shape) * RNG.choice([-1.0, 1.0], shape)


def distinct(*shape):
    """A permutation of well-separated values: no ties."""
    n = int(np.prod(shape))
    return (RNG.permutation(n) * 0.37 - n * 0.15).reshape(shape)


def _softmax(a, axis):
    e = np.exp(a - a.max(axis=axis, keepdims=True))
    return e / e.sum(axis=axis, keepdims=True)


def _layer_norm(x, n, w, b, eps=1e-5):
    axes = tuple(range(x.ndim - n, x.ndim))
    mu = x.mean(axis=axes, keepdims=True)
    var = ((x - mu) ** 2).mean(axis=axes, keepdims=True)
    return (x - mu) / np.sqrt(var + eps) * w + b


MASK = RNG.random((3, 4)) > 0.5
IDX = np.array([2, 0, 2, 1])  # a repeated index: gradients must add up

# (id, deformnp fn of Tensors, NumPy reference of arrays, input arrays)
CASES = [
    ("add", lambda a, b: a + b, lambda a, b: a + b, (normal(3, 4), normal(4))),
    ("radd_scalar", lambda a: 2.5 + a, lambda a: 2.5 + a, (normal(3),)),
    ("sub", lambda a, b: a - b, lambda a, b: a - b, (normal(3, 1), normal(1, 4))),
    ("rsub_scalar", lambda a: 1.0 - a, lambda a: 1.0 - a, (normal(3),)),
    ("mul", lambda a, b: a * b, lambda a, b: a * b, (normal(2, 3, 4), normal(3, 1))),
    ("div", lambda a, b: a / b, lambda a, b: a / b, (normal(3, 4), positive(4))),
    ("rdiv_scalar", lambda a: 2.0 / a, lambda a: 2.0 / a, (positive(3),)),
    ("pow_tensor", lambda a, b: a**b, lambda a, b: a**b, (positive(3, 2), normal(3, 2))),
    ("pow_scalar", lambda a: a**3, lambda a: a**3, (normal(4),)),
    ("rpow", lambda a: 2.0**a, lambda a: 2.0**a, (normal(4),)),
    ("neg", lambda a: -a, lambda a: -a, (normal(4),)),
    ("exp", F.exp, np.exp, (normal(3, 2),)),
    ("log", F.log, np.log, (positive(3, 2),)),
    ("sqrt", F.sqrt, np.sqrt, (positive(3, 2),)),
    ("abs", F.abs, np.abs, (away_from_zero(3, 2),)),
    ("tanh", F.tanh, np.tanh, (normal(3, 2),)),
    ("sin", F.sin, np.sin, (normal(3, 2),)),
    ("cos", lambda a: a.cos(), np.cos, (normal(3, 2),)),
    ("repeat", lambda a: a.repeat(2, 1, 3), lambda a: np.tile(a, (2, 1, 3)), (normal(2, 3),)),
    ("repeat_same_rank", lambda a: a.repeat((3, 2)), lambda a: np.tile(a, (3, 2)), (normal(2, 3),)),
    ("flip", lambda a: a.flip((0, -1)), lambda a: a[::-1, :, ::-1], (normal(2, 3, 4),)),
    ("clone", lambda a: a.clone() * a.contiguous(), lambda a: a * a, (normal(3),)),
    ("sigmoid", F.sigmoid, special.expit, (normal(3, 2),)),
    ("relu", F.relu, lambda a: np.maximum(a, 0), (away_from_zero(3, 4),)),
    (
        "leaky_relu",
        lambda a: F.leaky_relu(a, 0.2),
        lambda a: np.where(a > 0, a, 0.2 * a),
        (away_from_zero(3, 4),),
    ),
    ("silu", F.silu, lambda a: a * special.expit(a), (normal(5),)),
    (
        "softplus",
        lambda a: F.softplus(a, beta=2.0),
        lambda a: np.logaddexp(0, 2 * a) / 2,
        (normal(6) * 3,),
    ),
    ("gelu", F.gelu, lambda a: 0.5 * a * (1 + special.erf(a / math.sqrt(2))), (normal(3, 4),)),
    (
        "gelu_tanh",
        lambda a: F.gelu(a, approximate="tanh"),
        lambda a: 0.5 * a * (1 + np.tanh(math.sqrt(2 / math.pi) * (a + 0.044715 * a**3))),
        (normal(3, 4),),
    ),
    (
        "clamp",
        lambda a: F.clamp(a, -0.5, 0.5),
        lambda a: np.clip(a, -0.5, 0.5),
        (np.array([-1.3, -0.7, -0.2, 0.1, 0.4, 0.9]),),
    ),
    (
        "clamp_min_only",
        lambda a: a.clamp(min=0.0),
        lambda a: np.maximum(a, 0.0),
        (away_from_zero(5),),
    ),
    (
        "where",
        lambda a, b: F.where(MASK, a, b),
        lambda a, b: np.where(MASK, a, b),
        (normal(3, 4), normal(4)),
    ),
    (
        "masked_fill",
        lambda a: a.masked_fill(MASK, -2.0),
        lambda a: np.where(MASK, -2.0, a),
        (normal(3, 4),),
    ),
    ("maximum", F.maximum, np.maximum, (distinct(3, 4), distinct(3, 4) + 0.1)),
    ("minimum", F.minimum, np.minimum, (distinct(3, 4), distinct(4) + 0.1)),
    ("max_elementwise", lambda a, b: F.max(a, b), np.maximum, (distinct(4), distinct(4) + 0.1)),
    ("sum_all", lambda a: a.sum(), np.sum, (normal(3, 4),)),
    ("sum_dim", lambda a: a.sum(1), lambda a: a.sum(1), (normal(2, 3, 4),)),
    (
        "sum_dims_keepdim",
        lambda a: a.sum((0, -1), keepdim=True),
        lambda a: a.sum((0, 2), keepdims=True),
        (normal(2, 3, 4),),
    ),
    ("mean_all", lambda a: a.mean(), np.mean, (normal(3, 4),)),
    ("mean_dim", lambda a: a.mean(-1), lambda a: a.mean(-1), (normal(3, 4),)),
    ("max_all", lambda a: a.max(), np.max, (distinct(3, 4),)),
    ("max_dim", lambda a: a.max(1), lambda a: a.max(1), (distinct(3, 4),)),
    (
        "min_dim_keepdim",
        lambda a: a.min(0, keepdim=True),
        lambda a: a.min(0, keepdims=True),
        (distinct(3, 4),),
    ),
    ("var", lambda a: a.var(1), lambda a: a.var(1, ddof=1), (normal(3, 5),)),
    ("var_biased", lambda a: F.var(a, unbiased=False), np.var, (normal(3, 5),)),
    ("std", lambda a: a.std(0), lambda a: a.std(0, ddof=1), (normal(4, 3),)),
    ("reshape", lambda a: a.reshape(4, -1), lambda a: a.reshape(4, -1), (normal(2, 3, 2),)),
    ("view", lambda a: a.view((3, 4)), lambda a: a.reshape(3, 4), (normal(12),)),
    ("permute", lambda a: a.permute(2, 0, 1), lambda a: a.transpose(2, 0, 1), (normal(2, 3, 4),)),
    ("transpose", lambda a: a.transpose(0, -1), lambda a: a.swapaxes(0, -1), (normal(2, 3, 4),)),
    ("T", lambda a: a.T, lambda a: a.T, (normal(2, 3),)),
    ("flatten", lambda a: a.flatten(1), lambda a: a.reshape(2, -1), (normal(2, 3, 4),)),
    ("unsqueeze", lambda a: a.unsqueeze(1), lambda a: a[:, None], (normal(2, 3),)),
    ("squeeze", lambda a: a.squeeze(), lambda a: a.squeeze(), (normal(2, 1, 3, 1),)),
    ("squeeze_dim", lambda a: a.squeeze(1), lambda a: a.squeeze(1), (normal(2, 1, 3, 1),)),
    (
        "expand",
        lambda a: a.expand(2, -1, 4),
        lambda a: np.broadcast_to(a, (2, 3, 4)),
        (normal(3, 1),),
    ),
    (
        "getitem_basic",
        lambda a: a[1:, ::2, None, -1],
        lambda a: a[1:, ::2, None, -1],
        (normal(3, 4, 5),),
    ),
    ("getitem_int", lambda a: a[1], lambda a: a[1], (normal(3, 4),)),
    ("getitem_ellipsis", lambda a: a[..., 1], lambda a: a[..., 1], (normal(2, 3, 4),)),
    ("getitem_fancy_repeated", lambda a: a[IDX], lambda a: a[IDX], (normal(3, 2),)),
    ("getitem_fancy_tuple", lambda a: a[IDX, IDX], lambda a: a[IDX, IDX], (normal(3, 3),)),
    ("getitem_bool", lambda a: a[MASK], lambda a: a[MASK], (normal(3, 4),)),
    (
        "cat",
        lambda a, b: F.cat([a, b], dim=1),
        lambda a, b: np.concatenate([a, b], 1),
        (normal(2, 3), normal(2, 2)),
    ),
    (
        "stack",
        lambda a, b: F.stack([a, b], dim=-1),
        lambda a, b: np.stack([a, b], -1),
        (normal(2, 3), normal(2, 3)),
    ),
    (
        "split",
        lambda a: F.split(a, 2, dim=1)[1] * 2 + F.split(a, [1, 4], 1)[0].sum(),
        lambda a: a[:, 2:4] * 2 + a[:, :1].sum(),
        (normal(2, 5),),
    ),
    ("chunk", lambda a: a.chunk(3, 0)[2], lambda a: a[4:], (normal(5, 2),)),
    ("matmul_2d", lambda a, b: a @ b, np.matmul, (normal(3, 4), normal(4, 2))),
    ("matmul_batched_broadcast", lambda a, b: a @ b, np.matmul, (normal(2, 3, 4), normal(4, 5))),
    ("matmul_vec_mat", F.matmul, np.matmul, (normal(4), normal(2, 4, 3))),
    ("matmul_mat_vec", F.matmul, np.matmul, (normal(3, 4), normal(4))),
    ("matmul_vec_vec", F.matmul, np.matmul, (normal(4), normal(4))),
    ("rmatmul_array", lambda b: normal_fixed @ b, lambda b: normal_fixed @ b, (normal(4, 2),)),
    ("bmm", F.bmm, np.matmul, (normal(2, 3, 4), normal(2, 4, 2))),
    (
        "einsum",
        lambda a, b: F.einsum("bcm,bcn->bmn", a, b),
        lambda a, b: np.einsum("bcm,bcn->bmn", a, b),
        (normal(2, 3, 4), normal(2, 3, 5)),
    ),
    (
        "einsum_summed_index",
        lambda a, b: F.einsum("ij,jk->i", a, b),
        lambda a, b: np.einsum("ij,jk->i", a, b),
        (normal(2, 3), normal(3, 4)),
    ),
    (
        "einsum_ellipsis",
        lambda a, b: F.einsum("...ij,jk->...ik", a, b),
        lambda a, b: np.einsum("...ij,jk->...ik", a, b),
        (normal(2, 2, 3), normal(3, 2)),
    ),
    (
        "einsum_three",
        lambda a, b, c: F.einsum("ij,jk,k->i", a, b, c),
        lambda a, b, c: np.einsum("ij,jk,k->i", a, b, c),
        (normal(2, 3), normal(3, 4), normal(4)),
    ),
    (
        "einsum_outer",
        lambda a, b: F.einsum("i,j->ji", a, b),
        lambda a, b: np.einsum("i,j->ji", a, b),
        (normal(3), normal(4)),
    ),
    (
        "einsum_dot",
        lambda a, b: F.einsum("i,i->", a, b),
        lambda a, b: np.einsum("i,i->", a, b),
        (normal(3), normal(3)),
    ),
    (
        "einsum_hadamard",
        lambda a, b: F.einsum("ij,ij->ji", a, b),
        lambda a, b: np.einsum("ij,ij->ji", a, b),
        (normal(2, 3), normal(2, 3)),
    ),
    (
        "einsum_lone_letters",
        lambda a, b: F.einsum("bij,bkl->bk", a, b),
        lambda a, b: np.einsum("bij,bkl->bk", a, b),
        (normal(2, 3, 2), normal(2, 4, 3)),
    ),
    (
        "einsum_attention",
        lambda q, k: F.einsum("bhdm,bhdn->bhmn", q, k),
        lambda q, k: np.einsum("bhdm,bhdn->bhmn", q, k),
        (normal(2, 2, 3, 4), normal(2, 2, 3, 5)),
    ),
    (
        "einsum_broadcast_size1",
        lambda a, b: F.einsum("ij,ij->ij", a, b),
        lambda a, b: np.einsum("ij,ij->ij", a, b),
        (normal(1, 3), normal(4, 3)),
    ),
    ("softmax", lambda a: F.softmax(a, -1), lambda a: _softmax(a, -1), (normal(3, 4),)),
    ("softmax_dim0", lambda a: a.softmax(0), lambda a: _softmax(a, 0), (normal(3, 4),)),
    (
        "log_softmax",
        lambda a: F.log_softmax(a, 1),
        lambda a: np.log(_softmax(a, 1)),
        (normal(3, 4),),
    ),
    ("linear", F.linear, lambda x, w, b: x @ w.T + b, (normal(2, 3, 4), normal(5, 4), normal(5))),
    ("linear_no_bias_1d", F.linear, lambda x, w: w @ x, (normal(4), normal(5, 4))),
    (
        "layer_norm",
        lambda x, w, b: F.layer_norm(x, (4,), w, b),
        lambda x, w, b: _layer_norm(x, 1, w, b),
        (normal(2, 3, 4), normal(4), normal(4)),
    ),
    (
        "layer_norm_2d_shape",
        lambda x, w, b: F.layer_norm(x, (3, 4), w, b, eps=1e-3),
        lambda x, w, b: _layer_norm(x, 2, w, b, 1e-3),
        (normal(2, 3, 4), normal(3, 4), normal(3, 4)),
    ),
    (
        "layer_norm_no_affine",
        lambda x: F.layer_norm(x, 5),
        lambda x: _layer_norm(x, 1, 1, 0),
        (normal(3, 5),),
    ),
    (
        "pad",
        lambda a: F.pad(a, (1, 2, 0, 1), value=0.5),
        lambda a: np.pad(a, ((0, 0), (0, 1), (1, 2)), constant_values=0.5),
        (normal(2, 3, 4),),
    ),
    (
        "pad_crop",
        lambda a: F.pad(a, (-1, 2, 1, -2)),
        lambda a: np.pad(a[:, :-2, 1:], ((0, 0), (1, 0), (0, 2))),
        (normal(2, 4, 4),),
    ),
    ("mse_loss", F.mse_loss, lambda a, b: ((a - b) ** 2).mean(), (normal(3, 4), normal(3, 4))),
    (
        "mse_loss_sum",
        lambda a, b: F.mse_loss(a, b, reduction="sum"),
        lambda a, b: ((a - b) ** 2).sum(),
        (normal(3, 4), normal(3, 4)),
    ),
    (
        "mse_loss_none",
        lambda a, b: F.mse_loss(a, b, reduction="none"),
        lambda a, b: (a - b) ** 2,
        (normal(3, 4), normal(3, 4)),
    ),
    (
        "l1_loss",
        F.l1_loss,
        lambda a, b: np.abs(a - b).mean(),
        (away_from_zero(3, 4), np.zeros((3, 4))),
    ),
]
normal_fixed = normal(3, 4)

IDS = [c[0] for c in CASES]
# every case but the one multiplying by a fixed float64 array (which promotes, as in NumPy)
F32_CASES = [c for c in CASES if c[0] != "rmatmul_array"]


def _tensors(arrays, dtype=np.float64, requires_grad=True):
    return tuple(dn.tensor(a.astype(dtype), requires_grad=requires_grad) for a in arrays)


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_matches_numpy_reference_float64(case):
    _, fn, ref, arrays = case
    out = fn(*_tensors(arrays))
    expected = np.asarray(ref(*arrays))
    assert out.dtype == np.float64
    assert out.shape == expected.shape
    np.testing.assert_allclose(out.numpy(), expected, rtol=1e-12, atol=1e-13)


@pytest.mark.parametrize("case", F32_CASES, ids=[c[0] for c in F32_CASES])
def test_float32_keeps_dtype_and_matches(case):
    _, fn, ref, arrays = case
    out = fn(*_tensors(arrays, np.float32))
    assert out.dtype == np.float32
    np.testing.assert_allclose(out.numpy(), ref(*arrays), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_gradcheck(case):
    _, fn, _, arrays = case
    assert dn.gradcheck(fn, _tensors(arrays))


# ---------------------------------------------------------------- cross entropy / nll


def _ce_reference(x, t, weight=None, ignore_index=-100, reduction="mean", eps=0.0):
    """Loops over samples straight from torch's definition (class dim 1, or 0 when unbatched)."""
    if x.ndim == 1:
        x, t = x[None], np.asarray(t)[None]
    c = x.shape[1]
    xm = np.moveaxis(x, 1, -1).reshape(-1, c)
    tm = np.asarray(t).reshape(-1)
    w = np.ones(c) if weight is None else weight
    losses, denom = [], 0.0
    for row, k in zip(xm, tm):
        logp = row - np.log(np.exp(row - row.max()).sum()) - row.max()
        if k == ignore_index:
            losses.append(0.0)
            continue
        nll = -w[k] * logp[k]
        smooth = -(w * logp).sum()
        losses.append((1 - eps) * nll + eps / c * smooth)
        denom += w[k]
    losses = np.array(losses)
    if reduction == "mean":
        return losses.sum() / denom
    if reduction == "sum":
        return losses.sum()
    return losses.reshape(np.asarray(t).shape if x.ndim > 1 else ())


CE_CASES = [
    ("basic", normal(4, 3), np.array([0, 2, 1, 2]), {}),
    ("sum", normal(4, 3), np.array([0, 2, 1, 2]), {"reduction": "sum"}),
    ("none", normal(4, 3), np.array([0, 2, 1, 2]), {"reduction": "none"}),
    ("spatial", normal(2, 3, 2, 2), RNG.integers(0, 3, (2, 2, 2)), {}),
    ("weight", normal(5, 3), np.array([0, 2, 1, 2, 2]), {"weight": positive(3)}),
    ("ignore_index", normal(5, 3), np.array([0, -100, 1, 2, -100]), {}),
    (
        "ignore_custom_weight",
        normal(5, 3),
        np.array([0, 1, 1, 2, 1]),
        {"ignore_index": 1, "weight": positive(3)},
    ),
    ("smoothing", normal(4, 3), np.array([0, 2, 1, 2]), {"label_smoothing": 0.2}),
    (
        "smoothing_weight_ignore",
        normal(4, 3),
        np.array([0, -100, 1, 2]),
        {"label_smoothing": 0.1, "weight": positive(3)},
    ),
    ("unbatched", normal(5), np.array(3), {}),
]


@pytest.mark.parametrize("case", CE_CASES, ids=[c[0] for c in CE_CASES])
def test_cross_entropy_matches_reference_and_gradcheck(case):
    _, x, t, kw = case
    ref_kw = {"weight": kw.get("weight"), "ignore_index": kw.get("ignore_index", -100),
              "reduction": kw.get("reduction", "mean"), "eps": kw.get("label_smoothing", 0.0)}  # fmt: skip
    out = F.cross_entropy(dn.tensor(x), t, **kw)
    np.testing.assert_allclose(out.numpy(), _ce_reference(x, t, **ref_kw), rtol=1e-12)
    assert dn.gradcheck(lambda a: F.cross_entropy(a, t, **kw), (dn.tensor(x, requires_grad=True),))


def test_cross_entropy_int32_targets_and_float32():
    x = normal(4, 3)
    out = F.cross_entropy(dn.tensor(x.astype(np.float32)), np.array([0, 1, 2, 1], np.int32))
    assert out.dtype == np.float32
    np.testing.assert_allclose(out.item(), _ce_reference(x, np.array([0, 1, 2, 1])), rtol=1e-5)


def test_cross_entropy_probability_targets():
    x = normal(4, 3)
    p = _softmax(normal(4, 3), 1)
    logp = np.log(_softmax(x, 1))
    out = F.cross_entropy(dn.tensor(x), p)
    np.testing.assert_allclose(out.item(), -(p * logp).sum() / 4, rtol=1e-12)
    out = F.cross_entropy(dn.tensor(x), p, label_smoothing=0.3, reduction="sum")
    np.testing.assert_allclose(out.item(), -((p * 0.7 + 0.1) * logp).sum(), rtol=1e-12)
    pt = dn.tensor(p, requires_grad=True)
    assert dn.gradcheck(F.cross_entropy, (dn.tensor(x, requires_grad=True), pt))


def test_nll_loss_on_log_softmax_equals_cross_entropy():
    x = dn.tensor(normal(4, 3))
    t = np.array([2, 0, 1, 1])
    np.testing.assert_allclose(
        F.nll_loss(F.log_softmax(x, 1), t).item(), F.cross_entropy(x, t).item(), rtol=1e-14
    )


@pytest.mark.parametrize("fn", [F.softmax, F.log_softmax])
def test_softmax_of_a_row_of_minus_inf_is_nan_without_a_warning(fn):
    """torch.softmax / log_softmax give NaN for a row of -inf (an attention row whose every key
    is masked) or one holding +inf, silently; so do these (no NumPy RuntimeWarning), and the
    other rows are untouched."""
    x = np.array([[-np.inf, -np.inf, -np.inf], [0.5, -np.inf, 1.0], [np.inf, 0.0, 1.0]])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        out = fn(dn.tensor(x, requires_grad=True), 1)
        out.sum().backward()
    o = out.numpy()
    assert np.isnan(o[0]).all() and np.isnan(o[2]).all()
    row = x[1:2] - x[1:2].max()
    log_expected = row - np.log(np.exp(row).sum())  # -inf stays -inf
    np.testing.assert_allclose(o[1:2], _softmax(x[1:2], 1) if fn is F.softmax else log_expected)


def test_cross_entropy_all_ignored_is_nan():
    out = F.cross_entropy(dn.tensor(normal(2, 3)), np.array([-100, -100]))
    assert np.isnan(out.item())


@pytest.mark.parametrize(
    "args, kwargs, err, match",
    [
        (
            (normal(4, 3), np.array([0, 1, 3, 1])),
            {},
            ValueError,
            r"cross_entropy: target value 3 is out of range \[0, 3\)",
        ),
        (
            (normal(4, 3), np.array([0, 1, 2])),
            {},
            ValueError,
            r"cross_entropy: target must have shape \(4,\)",
        ),
        (
            (normal(4, 3), np.array([0.0, 1, 2, 1])),
            {},
            ValueError,
            "probability target must have the input's shape",
        ),
        (
            (normal(4, 3), np.array([0, 1, 2, 1])),
            {"reduction": "avg"},
            ValueError,
            "reduction must be 'mean', 'sum' or 'none', got 'avg'",
        ),
        (
            (normal(4, 3), np.array([0, 1, 2, 1])),
            {"weight": np.ones(4)},
            ValueError,
            r"weight must have shape \(C,\) = \(3,\)",
        ),
        (
            (normal(4, 3), np.array([True, False, True, True])),
            {},
            TypeError,
            "target must hold class indices",
        ),
        (
            (normal(4, 3).astype(np.float32), np.array([0, 1, 2, 1])),
            {"weight": np.ones(3)},
            TypeError,
            "cross_entropy: inputs must share one float dtype, got input float32, weight float64",
        ),
        (
            (normal(4, 3).astype(np.float32), np.full((4, 3), 1 / 3)),
            {},
            TypeError,
            "cross_entropy: inputs must share one float dtype, got input float32, target float64",
        ),
        (
            (normal(4, 3), np.array([0, 1, 2, 1])),
            {"label_smoothing": 1.5},
            ValueError,
            "label_smoothing must be in",
        ),
    ],
)
def test_cross_entropy_errors(args, kwargs, err, match):
    with pytest.raises(err, match=match):
        F.cross_entropy(dn.tensor(args[0]), args[1], **kwargs)


# ---------------------------------------------------------------- dropout


def test_dropout_masks_and_scales_in_training_only():
    x = dn.tensor(np.ones((200, 100)), requires_grad=True)
    y = F.dropout(x, p=0.25, generator=np.random.default_rng(0))
    vals = np.unique(y.numpy())
    np.testing.assert_allclose(vals, [0.0, 1 / 0.75])
    assert abs((y.numpy() == 0).mean() - 0.25) < 0.02
    y.sum().backward()
    np.testing.assert_array_equal(x.grad, y.numpy())  # gradient is the same mask and scale
    assert F.dropout(x, 0.5, training=False) is x
    assert F.dropout(x, 0.0) is x
    assert np.all(F.dropout(x, 1.0).numpy() == 0)
    with pytest.raises(ValueError, match=r"dropout: p must be in \[0, 1\], got 1.5"):
        F.dropout(x, 1.5)


def test_dropout_is_reproducible_with_manual_seed():
    x = dn.tensor(np.ones(50))
    dn.manual_seed(3)
    a = F.dropout(x).numpy()
    dn.manual_seed(3)
    b = F.dropout(x).numpy()
    np.testing.assert_array_equal(a, b)


def test_dropout_keeps_float32():
    assert F.dropout(dn.tensor(np.ones(8, np.float32)), 0.5).dtype == np.float32


# ---------------------------------------------------------------- misc behaviour and errors


def test_maximum_splits_ties_evenly_like_torch():
    a = dn.tensor(np.array([1.0, 2.0, 3.0]), requires_grad=True)
    b = dn.tensor(np.array([1.0, 1.0, 4.0]), requires_grad=True)
    F.maximum(a, b).sum().backward()
    np.testing.assert_allclose(a.grad, [0.5, 1.0, 0.0])
    np.testing.assert_allclose(b.grad, [0.5, 0.0, 1.0])


def test_max_reduction_shares_gradient_among_ties():
    a = dn.tensor(np.array([3.0, 1.0, 3.0]), requires_grad=True)
    a.max().backward()
    np.testing.assert_allclose(a.grad, [0.5, 0.0, 0.5])


def test_relu_propagates_nan():
    out = F.relu(dn.tensor(np.array([np.nan, -1.0, 2.0])))
    assert np.isnan(out.numpy()[0]) and out.numpy()[1] == 0 and out.numpy()[2] == 2


def test_argmax_argmin():
    a = dn.tensor(np.array([[1.0, 5.0, 2.0], [7.0, 0.0, 7.0]]))
    assert F.argmax(a).item() == 3
    assert a.argmax(1).tolist() == [1, 0]
    assert a.argmin(dim=1, keepdim=True).tolist() == [[0], [1]]


def test_getitem_with_tensor_index():
    a = dn.tensor(np.arange(5.0), requires_grad=True)
    a[dn.tensor(np.array([4, 4, 0]))].sum().backward()
    np.testing.assert_allclose(a.grad, [1, 0, 0, 0, 2])


@pytest.mark.parametrize(
    "call, err, match",
    [
        (
            lambda: F.reshape(dn.tensor(np.ones(6)), 4, 2),
            ValueError,
            r"reshape: shape \(4, 2\) is invalid for a tensor of 6 elements",
        ),
        (lambda: F.permute(dn.tensor(np.ones((2, 3))), 0, 0), ValueError, "not a permutation"),
        (lambda: F.sum(dn.tensor(np.ones((2, 3))), 2), IndexError, "sum: dim 2 out of range"),
        (
            lambda: F.matmul(dn.tensor(np.ones((2, 3))), dn.tensor(np.ones((2, 3)))),
            ValueError,
            "matmul: inner dimensions differ",
        ),
        (
            lambda: F.bmm(dn.tensor(np.ones((2, 3))), dn.tensor(np.ones((3, 2)))),
            ValueError,
            "bmm: expected 3-d tensors",
        ),
        (lambda: F.cat([]), ValueError, "cat: expected a non-empty sequence"),
        (lambda: F.split(dn.tensor(np.ones(4)), [1, 2]), ValueError, "do not add up"),
        (lambda: F.max(dn.tensor(np.ones(0))), ValueError, "max: expected a non-empty tensor"),
        (
            lambda: F.gelu(dn.tensor(np.ones(2)), approximate="fast"),
            ValueError,
            "gelu: approximate must be 'none' or 'tanh'",
        ),
        (
            lambda: F.einsum("ij,jk", np.ones((2, 2)), np.ones((2, 2))),
            ValueError,
            "only explicit equations",
        ),
        (lambda: F.einsum("ii->i", np.ones((2, 2))), ValueError, "repeated subscripts"),
        (lambda: F.einsum("ij->i", np.ones((2, 2, 2))), ValueError, "do not match an operand"),
        (lambda: F.einsum("ij->ik", np.ones((2, 2))), ValueError, r"output subscripts \['k'\]"),
        (lambda: F.einsum("ij,jk->ik", np.ones((2, 2))), ValueError, "names 2 operands, got 1"),
        (
            lambda: F.linear(np.ones((2, 3)), np.ones((4, 5))),
            ValueError,
            r"linear: input's last dimension must be in_features = 5, got shape \(2, 3\)",
        ),
        (lambda: F.linear(np.ones((2, 3)), np.ones(3)), ValueError, "linear: weight must be 2-d"),
        (
            lambda: F.linear(np.ones((2, 3)), np.ones((4, 3)), np.ones(3)),
            ValueError,
            r"linear: bias must have shape \(out_features,\) = \(4,\)",
        ),
        (
            lambda: F.linear(np.ones((2, 3), np.float32), np.ones((4, 3))),
            TypeError,
            "linear: inputs must share one float dtype, got input float32, weight float64",
        ),
        (
            lambda: F.linear(np.ones((2, 3), np.int64), np.ones((4, 3))),
            TypeError,
            "linear: input must be float32 or float64, got int64",
        ),
        (
            lambda: F.layer_norm(np.ones((2, 3)), (4,)),
            ValueError,
            r"layer_norm: input's trailing dimensions must equal normalized_shape \(4,\)",
        ),
        (
            lambda: F.layer_norm(np.ones((2, 3)), 3, np.ones(4)),
            ValueError,
            r"layer_norm: weight must have shape normalized_shape \(3,\)",
        ),
        (
            lambda: F.layer_norm(np.ones((2, 3)), 3, np.ones(3, np.float32)),
            TypeError,
            "layer_norm: inputs must share one float dtype",
        ),
        (
            lambda: F.mse_loss(np.ones((3, 1)), np.ones(3)),
            ValueError,
            r"mse_loss: input has shape \(3, 1\) but target has shape \(3,\)",
        ),
        (
            lambda: F.mse_loss(np.ones(3), np.ones(3), reduction="max"),
            ValueError,
            "mse_loss: reduction must be",
        ),
        (
            lambda: F.pad(np.ones((2, 2)), (1, 1, 1)),
            ValueError,
            "pad: pad must have an even length",
        ),
        (
            lambda: F.pad(np.ones((2, 2)), (1, 1), mode="reflect"),
            ValueError,
            "pad: only mode='constant'",
        ),
        (lambda: F.pad(np.ones((2, 2)), (-2, -1)), ValueError, "gives a negative size"),
        (lambda: F.repeat(np.ones((2, 2)), 2), ValueError, "can not be smaller than"),
    ],
)
def test_validation_messages(call, err, match):
    with pytest.raises(err, match=match):
        call()
