"""SGD, Adam, AdamW: torch's update formulas (checked against hand-written ones), param groups,
state, errors, and that they reduce a loss."""

from __future__ import annotations

import math

import numpy as np
import pytest

import deformnp.functional as F
from deformnp import nn, optim

GRADS = [np.array([0.5, -1.0, 2.0]), np.array([-0.3, 0.2, 1.0]), np.array([1.5, 0.0, -0.7])]
P0 = np.array([1.0, -2.0, 0.5])


def _run(opt_cls, steps=3, dtype=np.float64, **kw):
    p = nn.Parameter(P0.astype(dtype))
    opt = opt_cls([p], **kw)
    for g in GRADS[:steps]:
        p.grad = g.astype(dtype)
        opt.step()
    return p.numpy()


def _sgd_ref(lr, momentum=0.0, dampening=0.0, weight_decay=0.0, nesterov=False, maximize=False):
    p, buf = P0.copy(), None
    for g in GRADS:
        g = -g if maximize else g.copy()
        g = g + weight_decay * p
        if momentum:
            buf = g.copy() if buf is None else momentum * buf + (1 - dampening) * g
            g = g + momentum * buf if nesterov else buf
        p = p - lr * g
    return p


def _adam_ref(lr, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0, amsgrad=False, decoupled=False):
    b1, b2 = betas
    p, m, v, vmax = P0.copy(), np.zeros(3), np.zeros(3), np.zeros(3)
    for t, g in enumerate(GRADS, start=1):
        if decoupled:
            p = p * (1 - lr * weight_decay)
        else:
            g = g + weight_decay * p
        m = b1 * m + (1 - b1) * g
        v = b2 * v + (1 - b2) * g * g
        mhat, vhat = m / (1 - b1**t), v / (1 - b2**t)
        if amsgrad:
            vmax = np.maximum(vmax, v)
            vhat = vmax / (1 - b2**t)
        p = p - lr * mhat / (np.sqrt(vhat) + eps)
    return p


@pytest.mark.parametrize(
    "kw",
    [
        {"lr": 0.1},
        {"lr": 0.1, "momentum": 0.9},
        {"lr": 0.1, "momentum": 0.9, "dampening": 0.3},
        {"lr": 0.05, "momentum": 0.8, "nesterov": True},
        {"lr": 0.1, "momentum": 0.5, "weight_decay": 0.01},
        {"lr": 0.1, "maximize": True},
    ],
)
def test_sgd_matches_formula(kw):
    np.testing.assert_allclose(_run(optim.SGD, **kw), _sgd_ref(**kw), rtol=1e-14)


@pytest.mark.parametrize(
    "kw",
    [
        {"lr": 0.01},
        {"lr": 0.1, "betas": (0.8, 0.99), "eps": 1e-6},
        {"lr": 0.01, "weight_decay": 0.1},
        {"lr": 0.01, "amsgrad": True},
    ],
)
def test_adam_matches_formula(kw):
    np.testing.assert_allclose(_run(optim.Adam, **kw), _adam_ref(**kw), rtol=1e-12)


@pytest.mark.parametrize("kw", [{"lr": 0.01}, {"lr": 0.1, "weight_decay": 0.5, "amsgrad": True}])
def test_adamw_matches_formula(kw):
    ref_kw = dict(kw)
    ref_kw.setdefault("weight_decay", 1e-2)  # AdamW's default
    np.testing.assert_allclose(
        _run(optim.AdamW, **kw), _adam_ref(decoupled=True, **ref_kw), rtol=1e-12
    )


def test_first_adam_step_is_lr_times_sign():
    p = _run(optim.Adam, steps=1, lr=0.01)
    np.testing.assert_allclose(p, P0 - 0.01 * np.sign(GRADS[0]), rtol=1e-6)


@pytest.mark.parametrize("opt_cls", [optim.SGD, optim.Adam, optim.AdamW])
def test_float32_parameters_stay_float32_in_place(opt_cls):
    p = nn.Parameter(P0.astype(np.float32))
    data = p.data
    opt = opt_cls([p], lr=0.01)
    p.grad = GRADS[0].astype(np.float32)
    opt.step()
    assert p.data is data and p.dtype == np.float32
    assert not np.array_equal(p.numpy(), P0.astype(np.float32))


@pytest.mark.parametrize(
    "opt_cls, kw",
    [
        (optim.SGD, {"lr": 0.1, "momentum": 0.9}),
        (optim.SGD, {"lr": 0.05, "momentum": 0.9, "nesterov": True, "weight_decay": 1e-4}),
        (optim.Adam, {"lr": 0.05}),
        (optim.AdamW, {"lr": 0.05}),
    ],
)
def test_optimizers_reduce_a_loss(opt_cls, kw):
    rng = np.random.default_rng(0)
    x = rng.standard_normal((64, 3))
    y = x @ np.array([[1.0], [-2.0], [0.5]]) + 0.3
    model = nn.Sequential(
        nn.Linear(3, 8, dtype=np.float64), nn.Tanh(), nn.Linear(8, 1, dtype=np.float64)
    )
    opt = opt_cls(model.parameters(), **kw)
    first = None
    for _ in range(150):
        opt.zero_grad()
        loss = F.mse_loss(model(x), y)
        loss.backward()
        opt.step()
        first = loss.item() if first is None else first
    assert loss.item() < 0.05 * first


def test_param_groups_have_their_own_settings():
    a, b = nn.Parameter(np.ones(2)), nn.Parameter(np.ones(2))
    opt = optim.SGD([{"params": [a]}, {"params": b, "lr": 1.0}], lr=0.1)
    assert [g["lr"] for g in opt.param_groups] == [0.1, 1.0]
    a.grad, b.grad = np.ones(2), np.ones(2)
    opt.step()
    np.testing.assert_allclose(a.numpy(), 0.9)
    np.testing.assert_allclose(b.numpy(), 0.0)
    opt.param_groups[0]["lr"] = 0.5  # schedules edit the group, as in torch
    a.grad = np.ones(2)
    b.grad = None  # parameters without a gradient are skipped
    opt.step()
    np.testing.assert_allclose(a.numpy(), 0.4)
    np.testing.assert_allclose(b.numpy(), 0.0)


def test_zero_grad_and_closure():
    p = nn.Parameter(np.array([3.0]))
    opt = optim.SGD([p], lr=0.25)

    def closure():
        opt.zero_grad()
        loss = (p * p).sum()
        loss.backward()
        return loss

    loss = opt.step(closure)
    assert loss.item() == 9.0 and p.item() == pytest.approx(3.0 - 0.25 * 6)
    opt.zero_grad(set_to_none=False)
    np.testing.assert_array_equal(p.grad, 0)
    opt.zero_grad()
    assert p.grad is None


def test_state_dict_round_trip():
    p = nn.Parameter(P0.copy())
    opt = optim.Adam([p], lr=0.01)
    for g in GRADS[:2]:
        p.grad = g
        opt.step()
    sd = opt.state_dict()
    assert sd["state"][0]["step"] == 2 and sd["param_groups"][0]["params"] == [0]
    q = nn.Parameter(p.numpy().copy())
    opt2 = optim.Adam([q], lr=0.5)
    opt2.load_state_dict(sd)
    assert opt2.param_groups[0]["lr"] == 0.01
    p.grad = q.grad = GRADS[2]
    opt.step()
    opt2.step()
    np.testing.assert_array_equal(p.numpy(), q.numpy())


@pytest.mark.parametrize(
    "make, match",
    [
        (lambda p: optim.SGD([p], lr=-1), "invalid learning rate -1"),
        (lambda p: optim.SGD([p], lr=0.1, momentum=-0.5), "invalid momentum"),
        (lambda p: optim.SGD([p], lr=0.1, nesterov=True), "Nesterov momentum requires"),
        (lambda p: optim.SGD([p], lr=0.1, weight_decay=-1), "invalid weight_decay"),
        (lambda p: optim.Adam([p], betas=(1.0, 0.9)), r"Adam: invalid betas \(1.0, 0.9\)"),
        (lambda p: optim.Adam([p], eps=-1.0), "invalid eps"),
        (lambda p: optim.Adam([], lr=0.1), "empty parameter list"),
        (lambda p: optim.SGD([p, p], lr=0.1), "more than one group"),
        (lambda p: optim.SGD([p * 2], lr=0.1), "non-leaf"),
    ],
)
def test_validation(make, match):
    p = nn.Parameter(np.ones(2))
    with pytest.raises(ValueError, match=match):
        make(p)


def test_type_errors():
    p = nn.Parameter(np.ones(2))
    with pytest.raises(TypeError, match="single Tensor"):
        optim.SGD(p, lr=0.1)
    with pytest.raises(TypeError, match="params must be Tensors, got ndarray"):
        optim.SGD([np.ones(2)], lr=0.1)


def test_bias_correction_uses_step_count_per_parameter():
    a, b = nn.Parameter(np.ones(1)), nn.Parameter(np.ones(1))
    opt = optim.Adam([a, b], lr=0.1)
    a.grad = np.ones(1)
    opt.step()  # only a steps
    a.grad = b.grad = np.ones(1)
    opt.step()
    assert opt.state[id(a)]["step"] == 2 and opt.state[id(b)]["step"] == 1
    np.testing.assert_allclose(b.numpy(), 1 - 0.1 * 1 / (1 + 1e-8), rtol=1e-12)
    assert math.isclose(a.item(), 1 - 0.2, rel_tol=1e-6)
