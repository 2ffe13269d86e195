"""Parity with torch for the generic ops, conv2d, losses, layer initialisation and optimizers.

Skipped when torch is not installed (CI); run with torch and torchvision installed in the
environment (``pip install torch==2.14.1 torchvision==0.29.1``).
"""

from __future__ import annotations

import numpy as np
import pytest

import deformnp as dn
import deformnp.functional as F
from deformnp import nn, optim

torch = pytest.importorskip("torch")
TF = torch.nn.functional

RNG = np.random.default_rng(11)
TOL = {np.float64: 1e-12, np.float32: 2e-5}


def _compare(dn_fn, torch_fn, arrays, dtype, grad_out_seed=0):
    """Forward values and the gradients of sum(out * r) for every input, in ``dtype``."""
    arrays = [a.astype(dtype) for a in arrays]
    ours = [dn.tensor(a, requires_grad=True) for a in arrays]
    theirs = [torch.tensor(a, requires_grad=True) for a in arrays]
    out = dn_fn(*ours)
    tout = torch_fn(*theirs)
    assert out.dtype == dtype and out.shape == tuple(tout.shape)
    r = np.random.default_rng(grad_out_seed).standard_normal(out.shape).astype(dtype)
    out.backward(r)
    tout.backward(torch.tensor(r))
    tol = TOL[dtype]
    scale = max(1.0, float(np.abs(tout.detach().numpy()).max(initial=0)))
    np.testing.assert_allclose(out.numpy(), tout.detach().numpy(), rtol=tol, atol=tol * scale)
    for a, t in zip(ours, theirs):
        expected = t.grad.numpy()
        scale = max(1.0, float(np.abs(expected).max(initial=0)))
        np.testing.assert_allclose(a.grad, expected, rtol=tol, atol=tol * scale)


def n(*shape):
    return RNG.standard_normal(shape)


def pos(*shape):
    return RNG.uniform(0.5, 2.0, shape)


OPS = [
    ("add_broadcast", lambda a, b: a + b, lambda a, b: a + b, [n(3, 4), n(4)]),
    ("mul_div", lambda a, b: a * b / (b * b + 1), lambda a, b: a * b / (b * b + 1), [n(3, 4), n(3, 1)]),
    ("pow", lambda a, b: a**b, lambda a, b: a**b, [pos(3, 2), n(3, 2)]),
    ("exp_log_sqrt", lambda a: a.exp() + a.log() * a.sqrt(), lambda a: a.exp() + a.log() * a.sqrt(), [pos(5)]),
    ("tanh_sigmoid", lambda a: a.tanh() * a.sigmoid(), lambda a: a.tanh() * a.sigmoid(), [n(5)]),
    ("relu", F.relu, torch.relu, [n(4, 5)]),
    ("gelu", F.gelu, TF.gelu, [n(4, 5)]),
    ("gelu_tanh", lambda a: F.gelu(a, approximate="tanh"), lambda a: TF.gelu(a, approximate="tanh"), [n(4, 5)]),
    ("leaky_relu", lambda a: F.leaky_relu(a, 0.1), lambda a: TF.leaky_relu(a, 0.1), [n(6)]),
    ("silu", F.silu, TF.silu, [n(6)]),
    ("softplus", lambda a: F.softplus(a, 2.0, 5.0), lambda a: TF.softplus(a, 2.0, 5.0), [n(8) * 4]),
    ("softmax", lambda a: F.softmax(a, 1), lambda a: torch.softmax(a, 1), [n(3, 4, 2)]),
    ("log_softmax", lambda a: F.log_softmax(a, -1), lambda a: torch.log_softmax(a, -1), [n(3, 4)]),
    ("sum_mean", lambda a: a.sum(1) + a.mean(1), lambda a: a.sum(1) + a.mean(1), [n(3, 4)]),
    ("max_dim", lambda a: a.max(1), lambda a: a.max(1).values, [n(3, 4)]),
    ("var_std", lambda a: a.var(0) + a.std(0), lambda a: a.var(0) + a.std(0), [n(4, 3)]),
    ("maximum", F.maximum, torch.maximum, [n(3, 4), n(3, 4)]),
    ("clamp", lambda a: a.clamp(-0.5, 0.5), lambda a: a.clamp(-0.5, 0.5), [n(10)]),
    ("matmul_batched", lambda a, b: a @ b, lambda a, b: a @ b, [n(2, 3, 4), n(4, 5)]),
    ("einsum", lambda a, b: F.einsum("bcm,bcn->bmn", a, b), lambda a, b: torch.einsum("bcm,bcn->bmn", a, b), [n(2, 3, 4), n(2, 3, 5)]),
    ("getitem", lambda a: a[1:, [0, 2, 2]], lambda a: a[1:, [0, 2, 2]], [n(3, 4)]),
    ("cat_stack", lambda a, b: F.stack([F.cat([a, b], 1)] * 2), lambda a, b: torch.stack([torch.cat([a, b], 1)] * 2), [n(2, 3), n(2, 1)]),
    ("linear", F.linear, TF.linear, [n(2, 3, 4), n(5, 4), n(5)]),
    ("layer_norm", lambda x, w, b: F.layer_norm(x, (3, 4), w, b), lambda x, w, b: TF.layer_norm(x, (3, 4), w, b), [n(2, 3, 4), n(3, 4), n(3, 4)]),
    ("layer_norm_eps", lambda x: F.layer_norm(x, 4, eps=0.1), lambda x: TF.layer_norm(x, (4,), eps=0.1), [n(3, 4) * 0.1]),
    ("pad", lambda a: F.pad(a, (1, 2, -1, 1), value=0.3), lambda a: TF.pad(a, (1, 2, -1, 1), value=0.3), [n(2, 3, 4)]),
    ("mse_loss", F.mse_loss, TF.mse_loss, [n(3, 4), n(3, 4)]),
    ("l1_loss_sum", lambda a, b: F.l1_loss(a, b, reduction="sum"), lambda a, b: TF.l1_loss(a, b, reduction="sum"), [n(3, 4), n(3, 4)]),
]  # fmt: skip


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize("case", OPS, ids=[c[0] for c in OPS])
def test_generic_ops_match_torch(case, dtype):
    _, fn, tfn, arrays = case
    _compare(fn, tfn, arrays, dtype)


CONV = [
    ((2, 3, 9, 8), (4, 3, 3, 3), {"padding": 1}),
    ((2, 4, 9, 8), (6, 2, 3, 2), {"stride": (2, 1), "padding": (1, 0), "dilation": (1, 2), "groups": 2}),
    ((2, 4, 11, 10), (4, 1, 5, 5), {"stride": 3, "padding": 2, "groups": 4}),
    ((1, 3, 8, 8), (6, 1, 3, 3), {"padding": 1, "groups": 3}),
    ((2, 3, 6, 6), (5, 3, 1, 1), {"stride": 2}),
    ((1, 2, 7, 7), (3, 2, 4, 3), {"padding": "same", "dilation": 2}),
]  # fmt: skip


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize("cfg", CONV, ids=[str(c[2]) for c in CONV])
def test_conv2d_matches_torch(cfg, dtype):
    xs, ws, kw = cfg
    arrays = [n(*xs), n(*ws), n(ws[0])]
    _compare(
        lambda x, w, b: F.conv2d(x, w, b, **kw),
        lambda x, w, b: TF.conv2d(x, w, b, **kw),
        arrays,
        dtype,
    )


CE = [
    ((5, 4), np.array([0, 3, 1, 1, 2]), {}),
    ((2, 4, 3, 2), RNG.integers(0, 4, (2, 3, 2)), {"reduction": "sum"}),
    ((5, 4), np.array([0, -100, 1, 1, 2]), {"weight": pos(4), "reduction": "mean"}),
    (
        (5, 4),
        np.array([0, 3, 1, 1, 2]),
        {"ignore_index": 1, "label_smoothing": 0.2, "weight": pos(4)},
    ),
    ((5, 4), np.array([0, 3, 1, 1, 2]), {"label_smoothing": 0.1, "reduction": "none"}),
    ((4,), np.array(2), {}),
]


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize("case", CE, ids=[str(c[2]) for c in CE])
def test_cross_entropy_matches_torch(case, dtype):
    shape, target, kw = case
    w = kw.get("weight")
    kw_t = {**kw, "weight": None if w is None else torch.tensor(w.astype(dtype))}
    kw_d = {**kw, "weight": None if w is None else w.astype(dtype)}
    _compare(
        lambda x: F.cross_entropy(x, target, **kw_d),
        lambda x: TF.cross_entropy(x, torch.tensor(target), **kw_t),
        [n(*shape)],
        dtype,
    )


def test_cross_entropy_probability_targets_match_torch():
    p = np.exp(n(3, 4, 2))
    p /= p.sum(1, keepdims=True)
    _compare(
        lambda x, t: F.cross_entropy(x, t, label_smoothing=0.1),
        lambda x, t: TF.cross_entropy(x, t, label_smoothing=0.1),
        [n(3, 4, 2), p],
        np.float64,
    )


def test_nll_loss_matches_torch():
    t = np.array([1, 0, 2, 2])
    w = pos(3)
    _compare(
        lambda x: F.nll_loss(F.log_softmax(x, 1), t, weight=w),
        lambda x: TF.nll_loss(torch.log_softmax(x, 1), torch.tensor(t), weight=torch.tensor(w)),
        [n(4, 3)],
        np.float64,
    )


# ---------------------------------------------------------------- layers


def test_torch_state_dict_loads_and_outputs_match():
    torch.manual_seed(0)
    tnet = torch.nn.Sequential(
        torch.nn.Conv2d(3, 4, 3, padding=1, groups=1),
        torch.nn.GELU(),
        torch.nn.Conv2d(4, 4, 5, stride=2, padding=2, groups=4),
        torch.nn.Flatten(),
        torch.nn.LayerNorm(4 * 4 * 4),
        torch.nn.Linear(64, 5),
        torch.nn.Tanh(),
    )
    net = nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1),
        nn.GELU(),
        nn.Conv2d(4, 4, 5, stride=2, padding=2, groups=4),
        nn.Flatten(),
        nn.LayerNorm(64),
        nn.Linear(64, 5),
        nn.Tanh(),
    )
    assert list(net.state_dict()) == list(tnet.state_dict())
    net.load_state_dict(tnet.state_dict())
    x = n(2, 3, 8, 8).astype(np.float32)
    np.testing.assert_allclose(
        net(x).numpy(), tnet(torch.tensor(x)).detach().numpy(), rtol=1e-5, atol=1e-6
    )


@pytest.mark.parametrize(
    "make_ours, make_theirs, fan_in",
    [
        (lambda: nn.Linear(64, 256), lambda: torch.nn.Linear(64, 256), 64),
        (lambda: nn.Conv2d(16, 64, 3, groups=2), lambda: torch.nn.Conv2d(16, 64, 3, groups=2), 72),
        (
            lambda: nn.Conv2d(32, 64, 5, groups=32),
            lambda: torch.nn.Conv2d(32, 64, 5, groups=32),
            25,
        ),
    ],
)
def test_default_init_distributions_match_torch(make_ours, make_theirs, fan_in):
    nn.init.manual_seed(0)
    torch.manual_seed(0)
    ours, theirs = make_ours(), make_theirs()
    bound = 1 / np.sqrt(fan_in)  # kaiming_uniform_(a=sqrt(5)) and the bias rule both give this
    for (name, p), (tname, tp) in zip(ours.named_parameters(), theirs.named_parameters()):
        assert name == tname and p.shape == tuple(tp.shape) and p.dtype == np.float32
        a, b = p.numpy(), tp.detach().numpy()
        assert np.abs(a).max() <= bound and np.abs(b).max() <= bound
        if a.size >= 1000:  # enough samples to compare the spread of the two uniform laws
            assert np.abs(a).max() > 0.99 * bound and np.abs(b).max() > 0.99 * bound
            assert abs(a.std() - b.std()) <= 0.05 * b.std()


def test_init_functions_match_torch():
    shape = (128, 64, 3, 3)
    nn.init.manual_seed(0)
    torch.manual_seed(0)
    for ours, theirs, bounded in [
        (lambda t: nn.init.xavier_uniform_(t, gain=1.5), lambda t: torch.nn.init.xavier_uniform_(t, gain=1.5), True),
        (lambda t: nn.init.kaiming_uniform_(t, a=0.2, mode="fan_out"), lambda t: torch.nn.init.kaiming_uniform_(t, a=0.2, mode="fan_out"), True),
        (lambda t: nn.init.kaiming_normal_(t, nonlinearity="relu"), lambda t: torch.nn.init.kaiming_normal_(t, nonlinearity="relu"), False),
        (lambda t: nn.init.xavier_normal_(t), lambda t: torch.nn.init.xavier_normal_(t), False),
        (lambda t: nn.init.trunc_normal_(t, std=0.5, a=-0.3, b=0.6), lambda t: torch.nn.init.trunc_normal_(t, std=0.5, a=-0.3, b=0.6), True),
    ]:  # fmt: skip
        a = ours(np.zeros(shape, np.float32))
        b = theirs(torch.zeros(shape)).numpy()
        assert abs(a.std() - b.std()) <= 0.02 * b.std()
        assert abs(a.mean() - b.mean()) <= 0.02 * b.std() + 1e-3
        if bounded:  # same support
            assert (
                abs(a.min() - b.min()) <= 0.01 * b.std()
                and abs(a.max() - b.max()) <= 0.01 * b.std()
            )


# ---------------------------------------------------------------- optimizers


OPTS = [
    (optim.SGD, torch.optim.SGD, {"lr": 0.1}),
    (optim.SGD, torch.optim.SGD, {"lr": 0.1, "momentum": 0.9, "dampening": 0.1, "weight_decay": 0.01}),
    (optim.SGD, torch.optim.SGD, {"lr": 0.05, "momentum": 0.9, "nesterov": True}),
    (optim.SGD, torch.optim.SGD, {"lr": 0.05, "momentum": 0.5, "maximize": True}),
    (optim.Adam, torch.optim.Adam, {"lr": 0.01}),
    (optim.Adam, torch.optim.Adam, {"lr": 0.02, "betas": (0.8, 0.95), "eps": 1e-6, "weight_decay": 0.1}),
    (optim.Adam, torch.optim.Adam, {"lr": 0.01, "amsgrad": True}),
    (optim.AdamW, torch.optim.AdamW, {"lr": 0.01}),
    (optim.AdamW, torch.optim.AdamW, {"lr": 0.05, "weight_decay": 0.3, "amsgrad": True}),
]  # fmt: skip


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize("case", OPTS, ids=[f"{c[0].__name__}-{c[2]}" for c in OPTS])
def test_optimizer_steps_match_torch(case, dtype):
    ours_cls, theirs_cls, kw = case
    rng = np.random.default_rng(3)
    p0 = [rng.standard_normal((4, 3)).astype(dtype), rng.standard_normal(3).astype(dtype)]
    ours = [nn.Parameter(a) for a in p0]
    theirs = [torch.tensor(a, requires_grad=True) for a in p0]
    opt = ours_cls(ours, **kw)
    topt = theirs_cls(theirs, foreach=False, **kw)
    for _ in range(6):
        grads = [rng.standard_normal(a.shape).astype(dtype) for a in p0]
        for p, tp, g in zip(ours, theirs, grads):
            p.grad = g
            tp.grad = torch.tensor(g)
        opt.step()
        topt.step()
    tol = 1e-13 if dtype == np.float64 else 2e-6
    for p, tp in zip(ours, theirs):
        np.testing.assert_allclose(p.numpy(), tp.detach().numpy(), rtol=tol, atol=tol)
