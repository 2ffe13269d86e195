"""Finite-difference gradient checking (public).

``gradcheck(fn, inputs)`` compares the analytic gradient of ``fn`` (from ``backward``) with
central differences, for every input Tensor that has ``requires_grad``. It works on float64
inputs; a float32 input is refused because its rounding error swamps the comparison.

The scalar that is differentiated is ``sum(out * w)`` with a fixed random weight ``w`` per output,
so every output element and every input element is exercised in one backward pass.

Finite differences are wrong at kinks (see SPEC section 12): keep sampling coordinates' fractional
parts in [0.1, 0.9] and away from the border lines when checking position gradients.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from .function import no_grad
from .tensor import Tensor

__all__ = ["gradcheck", "GradcheckError"]


class GradcheckError(AssertionError):
    """Raised by :func:`gradcheck` when an analytic gradient disagrees with finite differences."""


def _outputs(out: Any) -> list[Tensor]:
    if isinstance(out, Tensor):
        return [out]
    if isinstance(out, (tuple, list)):
        return [o for o in out if isinstance(o, Tensor)]
    raise TypeError(f"gradcheck: fn must return a Tensor or a tuple of Tensors, got {type(out)}")


def gradcheck(
    fn: Callable[..., Any],
    inputs: Sequence[Tensor] | Tensor,
    eps: float = 1e-6,
    atol: float = 1e-5,
    rtol: float = 1e-3,
    raise_exception: bool = True,
    seed: int = 0,
    names: Sequence[str] | None = None,
) -> bool:
    """Check ``fn(*inputs)``'s backward against central differences.

    Every element ``x`` of every input with ``requires_grad`` is perturbed by ``+-eps``; the
    numerical derivative must satisfy ``|analytic - numeric| <= atol + rtol * |numeric|``.
    Returns True; on a mismatch raises :class:`GradcheckError` naming the input (by ``names`` or
    position), the worst element's index and both values, or returns False when
    ``raise_exception=False``.
    """
    if isinstance(inputs, Tensor):
        inputs = (inputs,)
    inputs = tuple(inputs)
    checked = [i for i, t in enumerate(inputs) if isinstance(t, Tensor) and t.requires_grad]
    if not checked:
        raise ValueError("gradcheck: no input has requires_grad=True")
    for i in checked:
        if inputs[i].dtype != np.float64:
            raise TypeError(
                f"gradcheck: input {_name(names, i)} is {inputs[i].dtype}; finite differences "
                f"need float64 inputs"
            )
        if inputs[i].device != "cpu":
            raise TypeError(f"gradcheck: input {_name(names, i)} must be on the CPU")

    pairs = _analytic_and_numeric(fn, inputs, checked, eps, seed)
    for i, (a, numeric) in pairs.items():
        x = inputs[i].data
        err = np.abs(a - numeric) - (atol + rtol * np.abs(numeric))
        # NaN anywhere (analytic or numerical) counts as a mismatch, never as a pass
        bad = np.where(np.isnan(err) | ~np.isfinite(a), np.inf, err)
        if bad.size and np.max(bad) > 0:
            k = np.unravel_index(int(np.argmax(bad)), x.shape)
            msg = (
                f"gradcheck: gradient of input {_name(names, i)} (shape {x.shape}) disagrees with "
                f"finite differences; worst element {tuple(int(v) for v in k)}: analytic "
                f"{a[k]:.10g}, numerical {numeric[k]:.10g} (atol={atol}, rtol={rtol}); "
                f"{int(np.sum(bad > 0))} of {x.size} elements off"
            )
            if raise_exception:
                raise GradcheckError(msg)
            return False
    return True


def max_gradient_error(
    fn: Callable[..., Any], inputs: Sequence[Tensor], eps: float = 1e-6, seed: int = 0
) -> dict[int, float]:
    """Worst ``|analytic - numeric| / max(1, max|numeric|)`` per input that requires grad.

    Used by ``python -m deformnp check`` to print a figure rather than a verdict.
    """
    inputs = tuple(inputs)
    checked = [i for i, t in enumerate(inputs) if isinstance(t, Tensor) and t.requires_grad]
    result = {}
    for i, (a, numeric) in _analytic_and_numeric(fn, inputs, checked, eps, seed).items():
        if numeric.size == 0:
            result[i] = 0.0
            continue
        scale = max(1.0, float(np.max(np.abs(numeric))))
        result[i] = float(np.max(np.abs(a - numeric))) / scale
    return result


def _analytic_and_numeric(
    fn: Callable[..., Any], inputs: tuple, checked: list[int], eps: float, seed: int
) -> dict[int, tuple[np.ndarray, np.ndarray]]:
    """For each checked input: d(sum(out * w))/d(input) from backward and from central differences.

    The inputs themselves are perturbed (and restored), so ``fn`` may also reach them through a
    closure (``gradcheck(lambda x, w: layer(x), (x, layer.weight))`` checks the layer's weight).
    Their ``.grad`` is restored afterwards; a non-contiguous input's data is swapped for a
    contiguous copy while checking, and a non-leaf input is treated as a leaf (its graph is
    neither used nor consumed).
    """
    rng = np.random.default_rng(seed)
    tensors = {id(inputs[i]): inputs[i] for i in checked}
    state = {k: (t.data, t.grad, t._node) for k, t in tensors.items()}
    try:
        for t in tensors.values():
            if not (t.data.flags.c_contiguous and t.data.flags.writeable):
                t.data = np.array(t.data, order="C", copy=True)
            t.grad = None
            t._node = None
        return _compare(fn, inputs, checked, eps, rng)
    finally:
        for k, t in tensors.items():
            t.data, t.grad, t._node = state[k]


def _compare(
    fn: Callable[..., Any], inputs: tuple, checked: list[int], eps: float, rng: Any
) -> dict[int, tuple[np.ndarray, np.ndarray]]:
    outs = _outputs(fn(*inputs))
    weights = [rng.standard_normal(o.shape) for o in outs]

    def scalar() -> float:
        with no_grad():
            os_ = _outputs(fn(*inputs))
        return float(
            sum(np.sum(np.asarray(o.numpy(), np.float64) * w) for o, w in zip(os_, weights))
        )

    total = None
    for o, w in zip(outs, weights):
        if o.requires_grad:
            term = (o * Tensor(w.astype(o.dtype))).sum()
            total = term if total is None else total + term
    if total is None:
        raise ValueError("gradcheck: no output depends on an input that requires grad")
    total.backward()

    result = {}
    for i in checked:
        t = inputs[i]
        a = np.zeros(t.shape) if t.grad is None else np.array(t.grad, dtype=np.float64)
        flat = t.data.reshape(-1)  # a view of the contiguous data: perturb in place
        numeric = np.zeros(flat.size)
        for j in range(flat.size):
            orig = flat[j]
            flat[j] = orig + eps
            fp = scalar()
            flat[j] = orig - eps
            fm = scalar()
            flat[j] = orig
            numeric[j] = (fp - fm) / (2 * eps)
        result[i] = (a, numeric.reshape(t.shape))
    return result


def _name(names: Sequence[str] | None, i: int) -> str:
    return repr(names[i]) if names is not None and i < len(names) else str(i)
