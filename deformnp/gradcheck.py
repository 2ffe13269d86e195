"""Finite-difference gradient checking (public).

``gradcheck(fn, inputs)`` compares the analytic gradient of ``fn`` (from ``backward``) with
central differences, for every input Tensor that has ``requires_grad``. It works on float64
inputs; a float32 input is refused because its rounding error swamps the comparison.

The scalar that is differentiated is ``sum(out * w)`` with a fixed random weight ``w`` per output,
so every output element and every input element is exercised in one backward pass.

Finite differences are wrong at kinks (integer sampling coordinates, and the border lines -1, 0,
H-1, H of the bilinear rule): keep sampling coordinates' fractional parts in [0.1, 0.9] and away
from the border lines when checking position gradients.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from .function import no_grad
from .tensor import Tensor

__all__ = ["gradcheck", "GradcheckError"]


class GradcheckError(AssertionError):
    """Raised by :func:`gradcheck` when an analytic gradient disagrees with finite differences.

    A subclass of ``AssertionError``, so a failed check inside a test reads as a failed
    assertion. The message names the input, the worst element's index, the analytic and the
    numerical value, and how many elements are off.
    """


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
    r"""Check ``fn(*inputs)``'s backward against central differences.

    The analogue of ``torch.autograd.gradcheck``. The differentiated scalar is
    :math:`\sum_o \langle \mathrm{out}_o, w_o\rangle` with a fixed standard-normal weight
    array :math:`w_o` per output Tensor (drawn from ``seed``), so one backward pass exercises
    every output and input element. Every element :math:`x` of every input with
    ``requires_grad`` is then perturbed by :math:`\pm\varepsilon` and must satisfy

    .. math::

        |g_\mathrm{analytic} - g_\mathrm{numeric}| \le \mathrm{atol}
        + \mathrm{rtol}\,|g_\mathrm{numeric}|,
        \qquad g_\mathrm{numeric} = \frac{f(x + \varepsilon) - f(x - \varepsilon)}
        {2\varepsilon}.

    A NaN or infinite gradient counts as a mismatch. The inputs are perturbed in place and
    restored (their ``.grad`` too), so ``fn`` may also reach them through a closure, e.g.
    ``gradcheck(lambda x, w: layer(x), (x, layer.weight))`` checks a layer's weight.

    Finite differences are wrong at kinks: for position gradients (offsets, sampling locations,
    grids) keep every sampling coordinate's fractional part in [0.1, 0.9] and away from the
    border lines -1, 0, H-1, H.

    Parameters
    ----------
    fn : callable
        Called as ``fn(*inputs)``; returns a Tensor or a tuple/list of Tensors (non-Tensor
        entries are ignored).
    inputs : Tensor or sequence
        The arguments of ``fn``. Those that are Tensors with ``requires_grad`` are checked; they
        must be float64 and on the CPU.
    eps : float, default 1e-6
        The finite-difference step.
    atol : float, default 1e-5
        Absolute tolerance.
    rtol : float, default 1e-3
        Relative tolerance, on ``|numeric|``.
    raise_exception : bool, default True
        On a mismatch, raise :class:`GradcheckError` (True) or return False.
    seed : int, default 0
        Seed of the random output weights.
    names : sequence of str, optional
        Names of the inputs for the error message (else their positions).

    Returns
    -------
    bool
        True when every checked gradient agrees; False on a mismatch with
        ``raise_exception=False``.

    Raises
    ------
    GradcheckError
        On a mismatch (with ``raise_exception=True``): the message names the input, the worst
        element's index, both values and how many elements are off.
    TypeError
        If a checked input is not float64 or not on the CPU, or ``fn`` returns something other
        than a Tensor or a tuple/list of Tensors.
    ValueError
        If no input requires grad, or no output depends on one.

    See Also
    --------
    GradcheckError : The exception raised on a mismatch.
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
