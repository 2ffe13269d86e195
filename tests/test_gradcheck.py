"""gradcheck itself: it must pass correct gradients and catch wrong ones, naming the culprit."""

from __future__ import annotations

import numpy as np
import pytest

import deformnp as dn
from deformnp.function import Function
from deformnp.gradcheck import GradcheckError, max_gradient_error


class _WrongSquare(Function):
    """x**2 whose backward is wrong in exactly one element (index 2 gets an extra 0.5)."""

    @staticmethod
    def forward(ctx, a, b):
        ctx.save_for_backward(a, b)
        return a * a + b

    @staticmethod
    def backward(ctx, grad):
        a, b = ctx.saved_tensors
        ga = 2 * a * grad
        ga.reshape(-1)[2] += 0.5
        return ga, grad


def _inputs():
    rng = np.random.default_rng(0)
    a = dn.tensor(rng.standard_normal((2, 3)), requires_grad=True)
    b = dn.tensor(rng.standard_normal((2, 3)), requires_grad=True)
    return a, b


def test_passes_a_correct_backward():
    a, b = _inputs()
    assert dn.gradcheck(lambda a, b: a * a + b, (a, b)) is True


def test_catches_a_wrong_backward_and_names_input_and_element():
    a, b = _inputs()
    with pytest.raises(GradcheckError) as info:
        dn.gradcheck(lambda a, b: _WrongSquare.apply(a, b), (a, b), names=("a", "b"))
    msg = str(info.value)
    assert "input 'a'" in msg
    assert "worst element (0, 2)" in msg
    assert "1 of 6 elements off" in msg
    assert "analytic" in msg and "numerical" in msg


def test_names_inputs_by_position_without_names():
    a, b = _inputs()
    with pytest.raises(GradcheckError, match="gradient of input 0 "):
        dn.gradcheck(lambda a, b: _WrongSquare.apply(a, b), (a, b))


def test_raise_exception_false_returns_false():
    a, b = _inputs()
    assert (
        dn.gradcheck(lambda a, b: _WrongSquare.apply(a, b), (a, b), raise_exception=False) is False
    )


def test_checks_only_inputs_that_require_grad():
    a, b = _inputs()
    b.requires_grad_(False)
    # the wrong element is in a's gradient, so this still fails ...
    with pytest.raises(GradcheckError):
        dn.gradcheck(lambda a, b: _WrongSquare.apply(a, b), (a, b))
    # ... but a correct function of a plain array passes
    assert dn.gradcheck(lambda a, c: a * c, (a, np.ones((2, 3))))


def test_a_tuple_of_outputs_is_checked():
    a, b = _inputs()
    assert dn.gradcheck(lambda a, b: (a * b, a.exp()), (a, b))
    with pytest.raises(GradcheckError):
        dn.gradcheck(lambda a, b: (a * b, _WrongSquare.apply(a, b)), (a, b))


def test_nan_gradients_fail():
    class _NanGrad(Function):
        @staticmethod
        def forward(ctx, a):
            return a * 2

        @staticmethod
        def backward(ctx, grad):
            return grad * np.nan

    a, _ = _inputs()
    with pytest.raises(GradcheckError):
        dn.gradcheck(lambda a: _NanGrad.apply(a), (a,))


def test_nan_numerical_derivative_fails():
    a = dn.tensor(np.array([0.0, 1.0]), requires_grad=True)
    # sqrt at 0: the central difference reads sqrt(-eps) = NaN; the analytic value is inf
    with np.errstate(invalid="ignore", divide="ignore"):
        assert not dn.gradcheck(lambda a: a.sqrt(), (a,), raise_exception=False)


def test_callers_tensors_are_left_untouched():
    a, b = _inputs()
    before = a.data.copy()
    a.grad = np.full((2, 3), 7.0)
    dn.gradcheck(lambda a, b: a * a + b, (a, b))
    np.testing.assert_array_equal(a.data, before)
    np.testing.assert_array_equal(a.grad, np.full((2, 3), 7.0))
    assert b.grad is None


def test_non_contiguous_and_non_leaf_inputs_work():
    base = dn.tensor(np.random.default_rng(1).standard_normal((3, 4)), requires_grad=True)
    t = dn.Tensor(base.data.T, requires_grad=True)  # non-contiguous
    data = t.data
    assert dn.gradcheck(lambda x: x.tanh(), (t,))
    assert t.data is data
    h = base * 2  # non-leaf: checked as a leaf, its own graph left alone
    assert dn.gradcheck(lambda x: x * x, (h,))
    assert base.grad is None and h.grad is None
    (h * 3).sum().backward()  # the graph behind h is still usable
    np.testing.assert_allclose(base.grad, 6.0)


def test_inputs_reached_through_a_closure_are_checked():
    """gradcheck perturbs the inputs themselves, so a function that uses a module's parameter
    through the module (not through its argument) is still checked for that parameter."""
    w = dn.tensor(np.random.default_rng(2).standard_normal((2, 3)), requires_grad=True)
    x = dn.tensor(np.random.default_rng(3).standard_normal((4, 3)), requires_grad=True)

    class Layer:
        def __call__(self, x):
            return _WrongSquare.apply(w, x[:2])

    layer = Layer()
    assert dn.gradcheck(lambda x: layer(x), (x,))  # x's gradient is right
    with pytest.raises(GradcheckError, match="input 'weight'"):
        dn.gradcheck(lambda x, _w: layer(x), (x, w), names=("x", "weight"))


def test_refuses_float32_and_no_grad_inputs():
    x32 = dn.tensor(np.ones(3, np.float32), requires_grad=True)
    with pytest.raises(TypeError, match="input 0 is float32; finite differences need float64"):
        dn.gradcheck(lambda x: x * 2, (x32,))
    with pytest.raises(ValueError, match="no input has requires_grad=True"):
        dn.gradcheck(lambda x: x * 2, (dn.tensor(np.ones(3)),))


def test_output_independent_of_inputs_is_an_error():
    a, _ = _inputs()
    with pytest.raises(ValueError, match="no output depends"):
        dn.gradcheck(lambda a: dn.tensor(np.ones(2)), (a,))


def test_single_tensor_input_and_tolerances():
    a, _ = _inputs()
    assert dn.gradcheck(lambda a: a**3, a)

    # a perturbation of 1e-3 in one element passes a loose tolerance and fails a tight one
    class _Slightly(Function):
        @staticmethod
        def forward(ctx, a):
            return a * 2

        @staticmethod
        def backward(ctx, grad):
            g = grad * 2
            g.reshape(-1)[0] += 1e-3
            return g

    assert dn.gradcheck(lambda a: _Slightly.apply(a), a, atol=1e-2)
    assert not dn.gradcheck(
        lambda a: _Slightly.apply(a), a, atol=1e-5, rtol=1e-4, raise_exception=False
    )


def test_max_gradient_error_reports_a_figure():
    a, b = _inputs()
    good = max_gradient_error(lambda a, b: a * a + b, (a, b))
    assert set(good) == {0, 1} and max(good.values()) < 1e-8
    bad = max_gradient_error(lambda a, b: _WrongSquare.apply(a, b), (a, b))
    # the backward is off by 0.5 in one element; the figure is relative to max(1, max|grad|)
    assert 0.05 < bad[0] <= 0.5 + 1e-8
