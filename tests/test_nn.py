"""Module/Parameter, the generic layers and nn.init."""

from __future__ import annotations

import math
from collections import OrderedDict

import numpy as np
import pytest

import deformnp as dn
import deformnp.functional as F
from deformnp import nn
from deformnp.nn import init


class Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(2, 3, 3, padding=1)
        self.norm = nn.LayerNorm(3)
        self.register_buffer("table", np.arange(4.0, dtype=np.float32))
        self.register_buffer("scratch", np.zeros(2), persistent=False)

    def forward(self, x):
        y = self.conv(x).permute(0, 2, 3, 1)
        return self.norm(y).permute(0, 3, 1, 2)


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.blocks = nn.ModuleList([Block(), Block()])
        self.head = nn.Sequential(nn.Flatten(), nn.Linear(3 * 4 * 4, 5), nn.GELU(), nn.Linear(5, 2))

    def forward(self, x):
        for b in self.blocks:
            x = x[:, :2] if x.shape[1] > 2 else x
            x = b(x)
        return self.head(x)


# torch's order: a module's own parameters and buffers, then its children's
NET_KEYS = [
    "blocks.0.table",
    "blocks.0.conv.weight", "blocks.0.conv.bias", "blocks.0.norm.weight", "blocks.0.norm.bias",
    "blocks.1.table",
    "blocks.1.conv.weight", "blocks.1.conv.bias", "blocks.1.norm.weight", "blocks.1.norm.bias",
    "head.1.weight", "head.1.bias", "head.3.weight", "head.3.bias",
]  # fmt: skip


def test_dotted_names_like_torch():
    net = Net()
    assert list(net.state_dict()) == NET_KEYS
    assert [n for n, _ in net.named_parameters()] == [k for k in NET_KEYS if "table" not in k]
    assert [n for n, _ in net.named_buffers()][:2] == ["blocks.0.table", "blocks.0.scratch"]
    assert net.get_submodule("blocks.1.norm") is net.blocks[1].norm
    assert [n for n, _ in net.named_children()] == ["blocks", "head"]
    assert len(list(net.modules())) == 1 + 1 + 2 * 3 + 1 + 4


def test_state_dict_round_trip_and_copies():
    a, b = Net(), Net()
    sd = a.state_dict()
    sd["blocks.0.table"] += 1  # a copy: the module is unchanged
    assert a.blocks[0].table[0] == 0.0
    b.load_state_dict(a.state_dict())
    for (ka, va), (kb, vb) in zip(a.state_dict().items(), b.state_dict().items()):
        assert ka == kb
        np.testing.assert_array_equal(va, vb)
    x = dn.tensor(np.random.default_rng(0).standard_normal((2, 2, 4, 4)).astype(np.float32))
    np.testing.assert_array_equal(a(x).numpy(), b(x).numpy())


def test_load_state_dict_casts_and_keeps_dtype():
    m = nn.Linear(3, 2)
    sd = {"weight": np.ones((2, 3)), "bias": [1.0, 2.0]}
    m.load_state_dict(sd)
    assert m.weight.dtype == np.float32 and m.weight.numpy().sum() == 6
    assert m.bias.tolist() == [1.0, 2.0]


def test_load_state_dict_strict_errors_and_atomicity():
    m = nn.Linear(3, 2)
    before = m.state_dict()
    with pytest.raises(KeyError, match=r"missing keys \['bias'\], unexpected keys \['extra'\]"):
        m.load_state_dict({"weight": np.zeros((2, 3)), "extra": np.zeros(1)})
    with pytest.raises(
        ValueError, match=r"load_state_dict: bias has shape \(3,\), expected \(2,\)"
    ):
        m.load_state_dict({"weight": np.zeros((2, 3)), "bias": np.zeros(3)})
    # a failed load changes nothing, even for keys that were fine
    np.testing.assert_array_equal(m.weight.numpy(), before["weight"])
    with pytest.raises(ValueError, match="has shape"):  # shapes are checked even when not strict
        m.load_state_dict({"bias": np.zeros(3)}, strict=False)
    m.load_state_dict({"weight": np.zeros((2, 3)), "extra": 1}, strict=False)
    np.testing.assert_array_equal(m.weight.numpy(), 0)
    np.testing.assert_array_equal(m.bias.numpy(), before["bias"])


def test_buffers_stay_registered_on_reassignment():
    b = Block()
    b.table = np.full(4, 2.0, np.float32)
    assert "table" in b.state_dict() and b.state_dict()["table"][0] == 2.0
    assert "scratch" not in b.state_dict()
    with pytest.raises(TypeError, match="cannot assign str as buffer 'table'"):
        b.table = "x"


def test_parameter_assignment_rules():
    m = nn.Linear(2, 2)
    with pytest.raises(TypeError, match="cannot assign Tensor as parameter 'bias'"):
        m.bias = dn.tensor(np.zeros(2))
    m.bias = None
    assert [n for n, _ in m.named_parameters()] == ["weight"]
    m.bias = nn.Parameter(np.ones(2))
    assert [n for n, _ in m.named_parameters()] == ["weight", "bias"]
    del m.bias
    assert [n for n, _ in m.named_parameters()] == ["weight"]
    with pytest.raises(AttributeError, match="call super"):

        class Bad(nn.Module):
            def __init__(self):
                self.x = 1

        Bad()
    with pytest.raises(KeyError, match="without '.'"):
        m.add_module("a.b", nn.ReLU())


def test_parameter_copies_and_requires_grad():
    a = np.zeros(3)
    p = nn.Parameter(a)
    p.data[0] = 1
    assert a[0] == 0 and p.requires_grad and p.is_leaf
    assert "Parameter containing" in repr(p)


def test_shared_parameters_listed_once():
    lin = nn.Linear(2, 2)
    seq = nn.Sequential(lin, nn.ReLU(), lin)
    assert len(list(seq.parameters())) == 2
    assert list(seq.state_dict()) == ["0.weight", "0.bias", "2.weight", "2.bias"]


def test_train_eval_propagates_and_dropout_obeys():
    net = nn.Sequential(nn.Linear(4, 4), nn.Dropout(0.5))
    assert all(m.training for m in net.modules())
    net.eval()
    assert not any(m.training for m in net.modules())
    x = dn.tensor(np.ones((3, 4), np.float32))
    np.testing.assert_array_equal(net(x).numpy(), net[0](x).numpy())
    net.train()
    assert net[1].training
    out = nn.Dropout(0.5)(dn.tensor(np.ones(1000, np.float32))).numpy()
    assert 0 < (out == 0).mean() < 1


def test_zero_grad_and_requires_grad_():
    m = nn.Linear(2, 1)
    m(dn.tensor(np.ones((1, 2), np.float32))).sum().backward()
    assert m.weight.grad is not None
    m.zero_grad(set_to_none=False)
    np.testing.assert_array_equal(m.weight.grad, 0)
    m.zero_grad()
    assert m.weight.grad is None
    m.requires_grad_(False)
    assert not m(dn.tensor(np.ones((1, 2), np.float32))).requires_grad


def test_to_dtype_casts_parameters_and_float_buffers():
    b = Block()
    b.double()
    assert b.conv.weight.dtype == np.float64 and b.table.dtype == np.float64
    assert b.state_dict()["table"].dtype == np.float64
    b.float()
    assert b.norm.weight.dtype == np.float32


def test_end_to_end_gradients_through_layers():
    net = Net().double()
    x = dn.tensor(np.random.default_rng(0).standard_normal((2, 2, 4, 4)))
    loss = F.cross_entropy(net(x), np.array([0, 1]))
    loss.backward()
    for name, p in net.named_parameters():
        assert p.grad is not None and p.grad.shape == p.shape, name


# ---------------------------------------------------------------- layers


def test_linear_layer_forward_and_gradcheck():
    lin = nn.Linear(4, 3, dtype=np.float64)
    x = np.random.default_rng(0).standard_normal((2, 4))
    np.testing.assert_allclose(lin(x).numpy(), x @ lin.weight.numpy().T + lin.bias.numpy())
    assert dn.gradcheck(
        lambda x, w, b: F.linear(x, w, b), (dn.tensor(x, requires_grad=True), lin.weight, lin.bias)
    )
    assert nn.Linear(4, 3, bias=False).bias is None
    assert "in_features=4, out_features=3, bias=True" in repr(lin)


def test_conv2d_layer_args_and_shapes():
    conv = nn.Conv2d(4, 6, (3, 2), stride=2, padding=(1, 0), dilation=(1, 2), groups=2, bias=False)
    assert conv.weight.shape == (6, 2, 3, 2) and conv.bias is None
    assert conv.weight.dtype == np.float32
    out = conv(dn.tensor(np.zeros((1, 4, 7, 7), np.float32)))
    assert out.shape == (1, 6, 4, 3)  # W: (7 - (2*(2-1)+1)) // 2 + 1
    assert "groups=2" in repr(conv) and "bias=False" in repr(conv)
    same = nn.Conv2d(2, 2, 3, padding="same")
    assert same(dn.tensor(np.zeros((1, 2, 5, 5), np.float32))).shape == (1, 2, 5, 5)
    with pytest.raises(ValueError, match="divisible by groups"):
        nn.Conv2d(3, 4, 3, groups=2)
    with pytest.raises(ValueError, match="padding_mode='zeros'"):
        nn.Conv2d(3, 4, 3, padding_mode="reflect")


def test_default_init_bounds_like_torch():
    init.manual_seed(0)
    lin = nn.Linear(50, 400)
    bound = 1 / math.sqrt(50)
    w = lin.weight.numpy()
    assert np.abs(w).max() <= bound and np.abs(w).max() > 0.95 * bound
    assert abs(w.std() - bound / math.sqrt(3)) < 0.02 * bound  # U(-b, b) has std b/sqrt(3)
    assert np.abs(lin.bias.numpy()).max() <= bound
    conv = nn.Conv2d(8, 64, 3, groups=2)
    cb = 1 / math.sqrt(4 * 9)
    assert np.abs(conv.weight.numpy()).max() <= cb and np.abs(conv.weight.numpy()).max() > 0.9 * cb
    assert np.abs(conv.bias.numpy()).max() <= cb
    ln = nn.LayerNorm((2, 3))
    assert ln.weight.numpy().tolist() == [[1.0] * 3] * 2 and np.all(ln.bias.numpy() == 0)
    assert nn.LayerNorm(3, elementwise_affine=False).weight is None


def test_manual_seed_makes_init_reproducible():
    init.manual_seed(5)
    a = nn.Linear(3, 3).weight.numpy().copy()
    init.manual_seed(5)
    b = nn.Linear(3, 3).weight.numpy()
    np.testing.assert_array_equal(a, b)


def test_activations_and_containers():
    x = dn.tensor(np.array([-1.0, 0.5, 2.0]))
    np.testing.assert_allclose(nn.ReLU()(x).numpy(), [0, 0.5, 2])
    np.testing.assert_allclose(nn.Sigmoid()(x).numpy(), 1 / (1 + np.exp([1.0, -0.5, -2])))
    np.testing.assert_allclose(nn.Tanh()(x).numpy(), np.tanh([-1.0, 0.5, 2]))
    np.testing.assert_allclose(nn.GELU("tanh")(x).numpy(), F.gelu(x, "tanh").numpy())
    np.testing.assert_allclose(nn.LeakyReLU(0.1)(x).numpy(), [-0.1, 0.5, 2])
    np.testing.assert_allclose(nn.SiLU()(x).numpy(), F.silu(x).numpy())
    np.testing.assert_allclose(nn.Softmax(0)(x).numpy().sum(), 1.0)
    assert nn.Identity(3, foo=1)(x) is x
    with pytest.raises(ValueError, match="approximate"):
        nn.GELU("fast")
    seq = nn.Sequential(OrderedDict([("a", nn.ReLU()), ("b", nn.Tanh())]))
    assert [n for n, _ in seq.named_children()] == ["a", "b"]
    seq = nn.Sequential(nn.ReLU(), nn.Tanh(), nn.Sigmoid())
    assert isinstance(seq[-1], nn.Sigmoid) and len(seq[1:]) == 2
    assert list(seq[1:]._modules) == ["1", "2"]
    del seq[0]
    assert list(seq._modules) == ["0", "1"] and isinstance(seq[0], nn.Tanh)
    seq.append(nn.ReLU())
    assert len(seq) == 3
    with pytest.raises(IndexError, match="out of range"):
        seq[3]
    ml = nn.ModuleList([nn.Linear(1, 1)])
    ml.append(nn.Linear(1, 2))
    ml.insert(0, nn.ReLU())
    assert [type(m).__name__ for m in ml] == ["ReLU", "Linear", "Linear"]
    assert [n for n, _ in ml.named_parameters()] == ["1.weight", "1.bias", "2.weight", "2.bias"]
    del ml[0]
    assert [n for n, _ in ml.named_parameters()] == ["0.weight", "0.bias", "1.weight", "1.bias"]


# ---------------------------------------------------------------- init


def test_init_functions_fill_in_place_and_return_the_tensor():
    g = np.random.default_rng(0)
    p = nn.Parameter(np.zeros((300, 200), np.float32))
    data = p.data
    assert init.xavier_uniform_(p, generator=g) is p and p.data is data
    assert p.dtype == np.float32
    bound = math.sqrt(6 / 500)
    assert np.abs(p.numpy()).max() <= bound and np.abs(p.numpy()).max() > 0.99 * bound
    init.xavier_normal_(p, gain=2.0, generator=g)
    assert abs(p.numpy().std() - 2 * math.sqrt(2 / 500)) < 0.01 * 2 * math.sqrt(2 / 500)
    init.kaiming_normal_(p, mode="fan_out", nonlinearity="relu", generator=g)
    assert abs(p.numpy().std() - math.sqrt(2) / math.sqrt(300)) < 0.01 * math.sqrt(2 / 300)
    init.kaiming_uniform_(p, a=0, nonlinearity="relu", generator=g)
    assert np.abs(p.numpy()).max() <= math.sqrt(6 / 200)
    init.normal_(p, 1.0, 0.5, generator=g)
    assert abs(p.numpy().mean() - 1) < 0.01 and abs(p.numpy().std() - 0.5) < 0.01
    init.uniform_(p, -3, -2, generator=g)
    assert p.numpy().min() >= -3 and p.numpy().max() <= -2
    init.trunc_normal_(p, mean=0.5, std=1.0, a=0.0, b=1.0, generator=g)
    assert p.numpy().min() >= 0 and p.numpy().max() <= 1
    init.trunc_normal_(p, std=0.02, generator=g)
    assert abs(p.numpy().std() - 0.02) < 0.001
    init.constant_(p, 3.5)
    assert np.all(p.numpy() == 3.5)
    init.zeros_(p)
    assert np.all(p.numpy() == 0)
    init.ones_(p)
    assert np.all(p.numpy() == 1)
    a = np.zeros((3, 3))
    init.eye_(a)
    np.testing.assert_array_equal(a, np.eye(3))


def test_calculate_gain_and_fan_errors():
    assert init.calculate_gain("relu") == math.sqrt(2)
    assert init.calculate_gain("tanh") == 5 / 3
    assert init.calculate_gain("leaky_relu", math.sqrt(5)) == pytest.approx(math.sqrt(1 / 3))
    assert init.calculate_gain("conv2d") == 1
    with pytest.raises(ValueError, match="unsupported nonlinearity"):
        init.calculate_gain("swish")
    with pytest.raises(ValueError, match="fewer than 2 dimensions"):
        init.xavier_uniform_(np.zeros(3))
    with pytest.raises(ValueError, match="mode must be 'fan_in' or 'fan_out'"):
        init.kaiming_uniform_(np.zeros((2, 2)), mode="fan")
    with pytest.raises(TypeError, match="float32 or float64"):
        init.zeros_(np.zeros(3, np.int64))


def test_deepcopy_and_pickle_give_independent_modules():
    import copy
    import pickle

    block = nn.Sequential(nn.Linear(2, 3), nn.LayerNorm(3))
    clones = nn.ModuleList([copy.deepcopy(block) for _ in range(2)])  # DETR's _get_clones
    assert [n for n, _ in clones.named_parameters()][:2] == ["0.0.weight", "0.0.bias"]
    clones[0][0].weight.data[...] = 0
    assert np.abs(block[0].weight.numpy()).sum() > 0
    assert clones[1][0].weight is clones[1]._modules["0"]._parameters["weight"]
    back = pickle.loads(pickle.dumps(block))
    assert isinstance(back[0].weight, nn.Parameter) and back[0].weight.requires_grad
    for (k, v), (k2, v2) in zip(block.state_dict().items(), back.state_dict().items()):
        assert k == k2
        np.testing.assert_array_equal(v, v2)
