"""The autograd engine: recording, backward, accumulation, grad mode, dtypes
(docs/guide/autograd.rst)."""

from __future__ import annotations

import threading

import numpy as np
import pytest

import deformnp as dn
import deformnp.functional as F
from deformnp.cases.check import OPS, check_cases
from deformnp.function import Function, sum_to_shape


def leaf(a, requires_grad=True):
    return dn.tensor(np.asarray(a, dtype=np.float64), requires_grad=requires_grad)


# ---------------------------------------------------------------- creation and conversion


def test_tensor_copies_but_Tensor_wraps():
    a = np.arange(3.0)
    t = dn.tensor(a)
    t.data[0] = 7.0
    assert a[0] == 0.0  # tensor() owns its data, as torch.tensor
    w = dn.Tensor(a)
    w.data[0] = 5.0
    assert a[0] == 5.0  # Tensor() wraps without copying


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_dtype_is_kept_through_ops_and_grads(dtype):
    x = dn.tensor(np.linspace(0.1, 1, 6).reshape(2, 3).astype(dtype), requires_grad=True)
    y = (x * 2.5 + 1) ** 2 / 3 - x.exp() + x.log().tanh().sigmoid()
    assert y.dtype == dtype
    y.sum().backward()
    assert x.grad.dtype == dtype and x.grad.shape == x.shape


def test_python_scalars_default_to_float64_and_ints_stay_ints():
    assert dn.tensor(1.5).dtype == np.float64
    assert dn.tensor([1, 2]).dtype == np.int64
    with pytest.raises(TypeError, match="only float32 and float64 tensors can require grad"):
        dn.tensor([1, 2], requires_grad=True)


def test_item_numpy_tolist_len_iter_repr():
    t = dn.tensor([[1.0, 2.0], [3.0, 4.0]])
    assert t.numpy() is t.data
    assert t.tolist() == [[1.0, 2.0], [3.0, 4.0]]
    assert len(t) == 2 and t.numel() == 4 and t.dim() == 2
    rows = list(t)
    assert [r.tolist() for r in rows] == [[1.0, 2.0], [3.0, 4.0]]
    assert dn.tensor(3.0).item() == 3.0
    with pytest.raises(ValueError, match="only one-element tensors"):
        t.item()
    with pytest.raises(TypeError, match="0-d"):
        len(dn.tensor(1.0))
    with pytest.raises(TypeError, match="0-d"):
        list(dn.tensor(1.0))
    assert "requires_grad=True" in repr(leaf([1.0]))
    assert "grad_fn=<Mul>" in repr(leaf([1.0]) * 2)
    assert "dtype=float32" in repr(dn.tensor(np.ones(2, np.float32)))


def test_setitem_allowed_only_without_grad():
    t = dn.tensor(np.zeros(3))
    t[1] = 5.0
    assert t.tolist() == [0.0, 5.0, 0.0]
    with pytest.raises(RuntimeError, match="in-place assignment"):
        leaf([1.0, 2.0])[0] = 3.0


def test_comparisons_give_constant_tensors():
    x = leaf([1.0, 2.0, 3.0])
    m = x > 1.5
    assert m.dtype == bool and not m.requires_grad
    assert (x == 2.0).tolist() == [False, True, False]


# ---------------------------------------------------------------- backward


def test_scalar_backward_and_chain_rule():
    x = leaf([0.5, -1.0, 2.0])
    y = (x * x * x).sum()
    y.backward()
    np.testing.assert_allclose(x.grad, 3 * x.data**2)


def test_broadcasting_gradients_are_summed_back():
    a = leaf(np.arange(6.0).reshape(2, 3))
    b = leaf([[10.0], [20.0]])  # (2, 1)
    c = leaf([1.0, 2.0, 3.0])  # (3,)
    s = leaf(2.0)  # 0-d
    ((a * b + c) * s).sum().backward()
    np.testing.assert_allclose(b.grad, (a.data * 2.0).sum(axis=1, keepdims=True))
    np.testing.assert_allclose(c.grad, np.full(3, 2 * 2.0))
    np.testing.assert_allclose(s.grad, (a.data * b.data + c.data).sum())
    assert b.grad.shape == (2, 1) and c.grad.shape == (3,) and s.grad.shape == ()


def test_tensor_used_twice_gets_the_sum():
    x = leaf([1.0, 2.0])
    y = x * x + x  # x appears three times
    y.sum().backward()
    np.testing.assert_allclose(x.grad, 2 * x.data + 1)


def test_diamond_graph():
    x = leaf([1.5])
    a = x.exp()
    b = a * 2
    c = a * 3
    (b * c).sum().backward()  # 6 e^{2x}
    np.testing.assert_allclose(x.grad, 12 * np.exp(2 * x.data))


def test_leaf_grads_accumulate_until_zeroed():
    x = leaf([1.0, 2.0])
    (x * 3).sum().backward()
    (x * 4).sum().backward()
    np.testing.assert_allclose(x.grad, [7.0, 7.0])
    x.zero_grad()
    assert x.grad is None


def test_leaf_grads_are_fresh_writable_arrays():
    a, b = leaf([1.0, 2.0]), leaf([3.0, 4.0])
    (a + b).sum().backward()  # Add hands one array to both and Sum a broadcast view
    assert a.grad is not b.grad
    assert a.grad.flags.writeable and a.grad.flags.c_contiguous
    a.grad += 1
    np.testing.assert_allclose(b.grad, [1.0, 1.0])


class _Returns(Function):
    """Returns the arrays it is given as the gradients of its two inputs (``ctx.out``)."""

    fresh_grads = True

    @staticmethod
    def forward(ctx, a, b, *, out):
        ctx.out = out
        return a + b

    @staticmethod
    def backward(ctx, grad):
        return ctx.out


def test_a_leaf_takes_a_fresh_gradient_without_a_copy_and_copies_anything_else():
    ga, gb = np.full(2, 2.0), np.full(2, 3.0)
    a, b = leaf([1.0, 2.0]), leaf([3.0, 4.0])
    _Returns.apply(a, b, out=(ga, gb)).backward(np.ones(2))
    assert a.grad is ga and b.grad is gb  # declared fresh: kept as they are
    one = np.full(2, 5.0)  # one array for both inputs: each leaf gets its own copy
    a, b = leaf([1.0, 2.0]), leaf([3.0, 4.0])
    _Returns.apply(a, b, out=(one, one)).backward(np.ones(2))
    assert a.grad is not one and b.grad is not one and a.grad is not b.grad
    np.testing.assert_array_equal(a.grad, one)
    base = np.arange(4.0)  # a view, a read-only array, another dtype: copies
    frozen = np.full(2, 7.0)
    frozen.flags.writeable = False
    a, b = leaf([1.0, 2.0]), leaf([3.0, 4.0])
    _Returns.apply(a, b, out=(base[::2], frozen)).backward(np.ones(2))
    assert a.grad.base is None and a.grad.flags.c_contiguous
    assert b.grad is not frozen and b.grad.flags.writeable
    a32 = dn.Tensor(np.ones(2, np.float32), requires_grad=True)
    _Returns.apply(a32, b, out=(ga, gb)).backward(np.ones(2))
    assert a32.grad.dtype == np.float32 and b.grad is not gb  # cast; added to b's old grad
    np.testing.assert_array_equal(b.grad, frozen + gb)


@pytest.mark.parametrize("op", OPS)
def test_kernel_ops_gradients_share_nothing(op):
    """What ``fresh_grads`` promises, for every op that declares it, on the gradient-check
    cases: the leaves' gradients share no memory with each other, the inputs or the incoming
    gradient, and a second call does not write into the first call's gradients."""
    for case in check_cases(op):
        runs = []
        for _ in range(2):
            leaves = case.inputs()
            out = case.fn(*leaves)
            outs = out if isinstance(out, tuple) else (out,)
            seeds = [np.random.default_rng(1).standard_normal(o.shape) for o in outs]
            total = sum((o * s).sum() for o, s in zip(outs, seeds, strict=True))
            total.backward()
            grads = [t.grad for t in leaves]
            others = [t.data for t in leaves] + seeds
            for i, g in enumerate(grads):
                assert g.flags.writeable and g.flags.c_contiguous, case.name
                for h in grads[i + 1 :] + others:
                    assert not np.shares_memory(g, h), case.name
            runs.append((grads, [g.copy() for g in grads]))
        for g, before in zip(*runs[0], strict=True):
            np.testing.assert_array_equal(g, before, err_msg=case.name)


def test_backward_with_explicit_grad():
    x = leaf([1.0, 2.0])
    y = x * 3
    y.backward(np.array([1.0, 10.0]))
    np.testing.assert_allclose(x.grad, [3.0, 30.0])
    with pytest.raises(ValueError, match=r"grad has shape \(3,\), expected \(2,\)"):
        (x * 3).backward(np.ones(3))
    with pytest.raises(RuntimeError, match="implicitly created only for one-element"):
        (x * 3).backward()


def test_backward_on_tensor_without_graph_raises():
    with pytest.raises(RuntimeError, match="does not require grad"):
        dn.tensor([1.0]).sum().backward()


def test_second_backward_without_retain_graph_raises():
    x = leaf([1.0, 2.0])
    y = (x.exp() * x).sum()
    y.backward()
    with pytest.raises(RuntimeError, match="second time"):
        y.backward()


def test_retain_graph_allows_a_second_backward_that_accumulates():
    x = leaf([1.0, 2.0])
    y = (x.exp() * x).sum()
    y.backward(retain_graph=True)
    first = x.grad.copy()
    y.backward()
    np.testing.assert_allclose(x.grad, 2 * first)


def test_retain_grad_on_a_non_leaf():
    x = leaf([1.0, 2.0])
    h = (x * 2).retain_grad()
    (h * h).sum().backward()
    np.testing.assert_allclose(h.grad, 2 * h.data)
    assert not (x * 2).is_leaf and x.is_leaf


def test_detach_cuts_the_graph_and_shares_data():
    x = leaf([1.0, 2.0])
    d = x.detach()
    assert not d.requires_grad and d.data is x.data
    (x * d).sum().backward()
    np.testing.assert_allclose(x.grad, x.data)  # d is a constant


def test_requires_grad_toggle():
    x = dn.tensor([1.0, 2.0]).requires_grad_()
    assert x.requires_grad
    y = x * 2
    with pytest.raises(RuntimeError, match="non-leaf"):
        y.requires_grad_(False)
    x.requires_grad_(False)
    assert not (x * 2).requires_grad


def test_only_inputs_that_require_grad_get_grads():
    x, c = leaf([1.0]), dn.tensor([2.0])
    (x * c).sum().backward()
    assert c.grad is None and x.grad is not None


def test_integer_results_are_not_recorded():
    x = leaf([1.5, 2.5])
    assert not x.astype(np.int64).requires_grad
    assert not F.argmax(x).requires_grad


def test_float_cast_is_differentiable():
    x = leaf([1.0, 2.0])
    y = x.float()
    assert y.dtype == np.float32
    (y * y).sum().backward()
    assert x.grad.dtype == np.float64
    np.testing.assert_allclose(x.grad, 2 * x.data)


def test_deep_chain_does_not_recurse():
    x = leaf([1.0])
    y = x
    for _ in range(5000):
        y = y + 1.0
    y.sum().backward()
    assert x.grad[0] == 1.0


# ---------------------------------------------------------------- grad mode


def test_no_grad_context():
    x = leaf([1.0])
    with dn.no_grad():
        y = x * 2
        assert not dn.is_grad_enabled()
    assert dn.is_grad_enabled()
    assert not y.requires_grad and y.is_leaf


def test_no_grad_decorator_with_and_without_parentheses():
    x = leaf([1.0])

    @dn.no_grad()
    def f(a):
        return a * 2

    @dn.no_grad
    def g(a):
        return a * 2

    assert not f(x).requires_grad and not g(x).requires_grad
    assert f.__name__ == "f" and g.__name__ == "g"
    assert dn.is_grad_enabled()


def test_enable_grad_inside_no_grad_and_nesting():
    x = leaf([1.0])
    with dn.no_grad():
        with dn.enable_grad():
            assert (x * 2).requires_grad
        assert not (x * 2).requires_grad
    assert dn.is_grad_enabled()


def test_no_grad_restores_mode_on_exception():
    with pytest.raises(ZeroDivisionError):
        with dn.no_grad():
            1 / 0  # noqa: B018
    assert dn.is_grad_enabled()


def test_set_grad_enabled_as_call_context_and_decorator():
    x = leaf([1.0])
    dn.set_grad_enabled(False)
    try:
        assert not (x * 2).requires_grad
    finally:
        dn.set_grad_enabled(True)
    with dn.set_grad_enabled(False):
        assert not dn.is_grad_enabled()
    assert dn.is_grad_enabled()

    @dn.set_grad_enabled(False)
    def f():
        return dn.is_grad_enabled()

    assert dn.is_grad_enabled() and f() is False and dn.is_grad_enabled()


def test_grad_mode_is_per_thread():
    seen = []
    with dn.no_grad():
        t = threading.Thread(target=lambda: seen.append(dn.is_grad_enabled()))
        t.start()
        t.join()
    assert seen == [True]


# ---------------------------------------------------------------- Function API


class _Cube(Function):
    @staticmethod
    def forward(ctx, a, scale):
        ctx.save_for_backward(a)
        ctx.scale = scale
        return scale * a**3

    @staticmethod
    def backward(ctx, grad):
        (a,) = ctx.saved_tensors
        assert ctx.needs_input_grad == (True, False)
        return grad * 3 * ctx.scale * a**2, None


def test_custom_function_ctx_api_and_gradcheck():
    x = leaf([0.5, -1.5])
    y = _Cube.apply(x, 2.0)
    y.sum().backward()
    np.testing.assert_allclose(x.grad, 6 * x.data**2)
    assert dn.gradcheck(lambda a: _Cube.apply(a, 2.0), (leaf([0.3, 0.7]),))


def test_saved_tensors_are_freed_after_backward():
    x = leaf([1.0])
    y = _Cube.apply(x, 1.0)
    node = y._node
    y.sum().backward()
    with pytest.raises(RuntimeError, match="retain_graph=True"):
        _ = node.ctx.saved_tensors


class _WrongShape(Function):
    @staticmethod
    def forward(ctx, a):
        return a * 2

    @staticmethod
    def backward(ctx, grad):
        return np.ones(7)


class _TooFew(Function):
    @staticmethod
    def forward(ctx, a, b):
        return a * b

    @staticmethod
    def backward(ctx, grad):
        return (grad,)


def test_bad_backward_results_are_reported_with_the_function_name():
    with pytest.raises(
        RuntimeError, match=r"_WrongShape.backward returned a gradient of shape \(7,\)"
    ):
        _WrongShape.apply(leaf([1.0, 2.0])).sum().backward()
    with pytest.raises(RuntimeError, match="_TooFew.backward returned 1 gradients, expected 2"):
        _TooFew.apply(leaf([1.0]), leaf([2.0])).sum().backward()


def test_sum_to_shape():
    g = np.ones((4, 2, 3))
    assert sum_to_shape(g, (2, 1)).shape == (2, 1)
    np.testing.assert_allclose(sum_to_shape(g, (1, 3)), np.full((1, 3), 8.0))
    np.testing.assert_allclose(sum_to_shape(g, ()), 24.0)
    with pytest.raises(ValueError, match="cannot reduce"):
        sum_to_shape(g, (5, 3))
    with pytest.raises(ValueError, match="cannot reduce"):
        sum_to_shape(np.ones(3), (1, 3, 1))
