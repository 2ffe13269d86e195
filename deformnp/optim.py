"""Optimizers with torch.optim's names, arguments and update formulas: SGD, Adam, AdamW.

``params`` is an iterable of Parameters (or Tensors that require grad), or of dicts that each
hold ``"params"`` and per-group overrides of the defaults (param groups, as torch). ``step()``
updates every parameter that has a ``.grad`` in place (in its own dtype); ``zero_grad()`` clears
the gradients. The formulas are torch's single-tensor implementations, written out in each
``step``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from typing import Any

import numpy as np

from .tensor import Tensor

__all__ = ["Optimizer", "SGD", "Adam", "AdamW"]


class Optimizer:
    """Base class of the optimizers: param groups, per-parameter state, ``zero_grad``, ``step``.

    The analogue of ``torch.optim.Optimizer``. A subclass supplies the defaults and the update
    of one parameter; :meth:`step` applies it, in place and in the parameter's dtype, to every
    parameter that has a ``.grad``. Parameters must be on the CPU.

    Parameters
    ----------
    params : iterable of Tensor or iterable of dict
        The Parameters (or leaf Tensors) to optimize, or param groups: dicts holding
        ``"params"`` and per-group overrides of the keyword defaults below.
    defaults : dict
        The default hyper-parameters of every group (each group may override them).

    Attributes
    ----------
    param_groups : list of dict
        The groups: ``"params"`` (a list of Tensors) and the hyper-parameters.
    state : dict
        Per-parameter state (momentum buffers, moment estimates), keyed by ``id(param)``.
    defaults : dict
        The defaults given to the constructor.

    Raises
    ------
    TypeError
        If ``params`` is a single Tensor, or holds something that is not a Tensor.
    ValueError
        If ``params`` is empty, holds a non-leaf Tensor, the same Tensor in two groups, or a
        negative learning rate or weight decay.
    """

    def __init__(self, params: Any, defaults: dict[str, Any]) -> None:
        self.defaults = dict(defaults)
        self.state: dict[int, dict[str, Any]] = {}
        self.param_groups: list[dict[str, Any]] = []
        if isinstance(params, Tensor):
            raise TypeError(
                f"{type(self).__name__}: params must be an iterable of Tensors or dicts, got a "
                "single Tensor"
            )
        groups = list(params)
        if not groups:
            raise ValueError(f"{type(self).__name__}: got an empty parameter list")
        if not isinstance(groups[0], dict):
            groups = [{"params": groups}]
        for g in groups:
            self.add_param_group(g)

    def add_param_group(self, group: dict[str, Any]) -> None:
        """Add a param group (torch's ``add_param_group``), filling in the defaults.

        Parameters
        ----------
        group : dict
            ``"params"`` (a Tensor or an iterable of Tensors) and optional overrides of the
            optimizer's defaults (``"lr"``, ``"weight_decay"``, ...).

        Raises
        ------
        TypeError
            If a parameter is not a Tensor.
        ValueError
            If a parameter is not a leaf, is already in a group, or the group's learning rate
            or weight decay is negative.
        """
        group = dict(group)
        params = group["params"]
        params = [params] if isinstance(params, Tensor) else list(params)
        seen = {id(p) for g in self.param_groups for p in g["params"]}
        for p in params:
            if not isinstance(p, Tensor):
                raise TypeError(
                    f"{type(self).__name__}: params must be Tensors, got {type(p).__name__}"
                )
            if not p.is_leaf:
                raise ValueError(f"{type(self).__name__}: can't optimize a non-leaf Tensor")
            if id(p) in seen:
                raise ValueError(
                    f"{type(self).__name__}: some parameters appear in more than one group"
                )
            seen.add(id(p))
        for key, value in self.defaults.items():
            group.setdefault(key, value)
        group["params"] = params
        self._check_group(group)
        self.param_groups.append(group)

    def _check_group(self, group: dict[str, Any]) -> None:
        name = type(self).__name__
        if not group["lr"] >= 0:
            raise ValueError(f"{name}: invalid learning rate {group['lr']}")
        if not group.get("weight_decay", 0.0) >= 0:
            raise ValueError(f"{name}: invalid weight_decay {group['weight_decay']}")

    def zero_grad(self, set_to_none: bool = True) -> None:
        """Clear the gradients of every optimized parameter.

        Parameters
        ----------
        set_to_none : bool, default True
            Set each ``.grad`` to None (True, as torch) or fill it with zeros (False).
        """
        for group in self.param_groups:
            for p in group["params"]:
                if set_to_none or p.grad is None:
                    p.grad = None
                else:
                    p.grad = np.zeros_like(p.grad)

    def _state(self, p: Tensor) -> dict[str, Any]:
        return self.state.setdefault(id(p), {})

    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        """Update every parameter that has a ``.grad``, in place.

        Parameters without a gradient are skipped. With ``maximize=True`` in a group, the
        gradient is negated first. The update is done on the parameter's array in place, so
        views of it see the change (a read-only array is replaced instead).

        Parameters
        ----------
        closure : callable, optional
            A function that re-evaluates the model and returns the loss; called first, with
            grad mode on.

        Returns
        -------
        object
            The closure's return value, or None without a closure.

        Raises
        ------
        NotImplementedError
            If a parameter with a gradient lives on CUDA.
        """
        loss = None
        if closure is not None:
            from .function import enable_grad

            with enable_grad():
                loss = closure()
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                if p.device != "cpu":
                    raise NotImplementedError(
                        f"{type(self).__name__}: parameters on {p.device} are not supported yet"
                    )
                grad = np.asarray(p.grad, dtype=p.dtype)
                if group.get("maximize", False):
                    grad = -grad
                self._update(p, grad, group, self._state(p))
        return loss

    def _update(self, p: Tensor, grad: np.ndarray, group: dict, state: dict) -> None:
        raise NotImplementedError

    def state_dict(self) -> dict[str, Any]:
        """Return the optimizer's state, as torch's ``Optimizer.state_dict``.

        Returns
        -------
        dict
            ``"state"``: the per-parameter state (arrays copied) keyed by the parameter's
            position across the groups; ``"param_groups"``: each group's settings with
            ``"params"`` replaced by those positions.
        """
        index: dict[int, int] = {}
        groups = []
        for g in self.param_groups:
            ids = []
            for p in g["params"]:
                index.setdefault(id(p), len(index))
                ids.append(index[id(p)])
            groups.append({**{k: v for k, v in g.items() if k != "params"}, "params": ids})
        state = {
            index[k]: {n: np.array(v) if isinstance(v, np.ndarray) else v for n, v in s.items()}
            for k, s in self.state.items()
            if k in index
        }
        return {"state": state, "param_groups": groups}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore a state saved by :meth:`state_dict` (arrays are copied).

        Parameters
        ----------
        state_dict : dict
            The output of :meth:`state_dict` of an optimizer over parameters in the same group
            layout.

        Raises
        ------
        ValueError
            If the number of groups, or of parameters in a group, differs.
        """
        groups = state_dict["param_groups"]
        if len(groups) != len(self.param_groups) or any(
            len(a["params"]) != len(b["params"]) for a, b in zip(groups, self.param_groups)
        ):
            raise ValueError(
                f"{type(self).__name__}.load_state_dict: the saved param groups do not match"
            )
        params = {i: p for g_saved, g in zip(groups, self.param_groups)
                  for i, p in zip(g_saved["params"], g["params"])}  # fmt: skip
        self.state = {
            id(params[i]): {
                n: np.array(v) if isinstance(v, np.ndarray) else v for n, v in s.items()
            }
            for i, s in state_dict["state"].items()
        }
        for g_saved, g in zip(groups, self.param_groups):
            g.update({k: v for k, v in g_saved.items() if k != "params"})


def _add_(p: Tensor, delta: np.ndarray) -> None:
    """``p += delta`` in place (so views and aliases of the parameter see it, as in torch); a
    read-only array is replaced instead."""
    if p.data.flags.writeable:
        p.data += delta
    else:
        p.data = p.data + delta


def _mul_(p: Tensor, factor: float) -> None:
    if p.data.flags.writeable:
        p.data *= factor
    else:
        p.data = p.data * factor


class SGD(Optimizer):
    r"""Stochastic gradient descent with optional momentum, dampening, Nesterov and weight decay.

    ``torch.optim.SGD``, with torch's update:

    .. math::

        g &= \nabla_p + \lambda p, \\
        b &= g \text{ (first step)}, \quad b = \mu b + (1 - \tau) g \text{ (after)}, \\
        g &= g + \mu b \text{ (Nesterov)} \quad\text{or}\quad g = b, \\
        p &\leftarrow p - \eta g,

    with :math:`\eta` = ``lr``, :math:`\mu` = ``momentum`` (the buffer :math:`b` is used only
    when :math:`\mu \ne 0`), :math:`\tau` = ``dampening`` and :math:`\lambda` =
    ``weight_decay``.

    Parameters
    ----------
    params : iterable of Tensor or iterable of dict
        The Parameters (or leaf Tensors) to optimize, or param groups: dicts holding
        ``"params"`` and per-group overrides of the keyword defaults below.
    lr : float, default 1e-3
        The learning rate.
    momentum : float, default 0.0
        The momentum factor.
    dampening : float, default 0.0
        Dampening of the momentum.
    weight_decay : float, default 0.0
        L2 penalty added to the gradient.
    nesterov : bool, default False
        Nesterov momentum (needs a positive momentum and zero dampening).
    maximize : bool, default False
        Maximize the objective (negate the gradient).

    Raises
    ------
    ValueError
        If ``lr``, ``momentum`` or ``weight_decay`` is negative, or ``nesterov`` is set without
        a positive momentum and zero dampening.
    """

    def __init__(
        self,
        params: Iterable[Any],
        lr: float = 1e-3,
        momentum: float = 0.0,
        dampening: float = 0.0,
        weight_decay: float = 0.0,
        nesterov: bool = False,
        *,
        maximize: bool = False,
    ) -> None:
        if not momentum >= 0:
            raise ValueError(f"SGD: invalid momentum {momentum}")
        if nesterov and (momentum <= 0 or dampening != 0):
            raise ValueError("SGD: Nesterov momentum requires a momentum and zero dampening")
        defaults = dict(lr=lr, momentum=momentum, dampening=dampening,
                        weight_decay=weight_decay, nesterov=nesterov, maximize=maximize)  # fmt: skip
        super().__init__(params, defaults)

    def _update(self, p: Tensor, grad: np.ndarray, group: dict, state: dict) -> None:
        wd, momentum = group["weight_decay"], group["momentum"]
        if wd != 0:
            grad = grad + wd * p.data
        if momentum != 0:
            buf = state.get("momentum_buffer")
            if buf is None:
                buf = np.array(grad, copy=True)
            else:
                buf *= momentum
                buf += (1 - group["dampening"]) * grad
            state["momentum_buffer"] = buf
            grad = grad + momentum * buf if group["nesterov"] else buf
        _add_(p, -group["lr"] * grad)


class Adam(Optimizer):
    r"""Adam (Kingma & Ba), ``torch.optim.Adam``, with torch's update.

    At step :math:`t` (from 1), with :math:`\eta` = ``lr``, :math:`(\beta_1, \beta_2)` =
    ``betas``, :math:`\epsilon` = ``eps`` and :math:`\lambda` = ``weight_decay``:

    .. math::

        g &= \nabla_p + \lambda p, \\
        m &= m + (1 - \beta_1)(g - m), \qquad v = \beta_2 v + (1 - \beta_2)\, g^2, \\
        p &\leftarrow p - \frac{\eta}{1 - \beta_1^t}\,
        \frac{m}{\sqrt{v} / \sqrt{1 - \beta_2^t} + \epsilon},

    :math:`m` and :math:`v` starting at zero; with ``amsgrad`` the running maximum of
    :math:`v` replaces :math:`v` in the denominator.

    Parameters
    ----------
    params : iterable of Tensor or iterable of dict
        The Parameters (or leaf Tensors) to optimize, or param groups: dicts holding
        ``"params"`` and per-group overrides of the keyword defaults below.
    lr : float, default 1e-3
        The learning rate.
    betas : (float, float), default (0.9, 0.999)
        Decay rates of the first and second moment estimates, each in [0, 1).
    eps : float, default 1e-8
        Added to the denominator.
    weight_decay : float, default 0.0
        L2 penalty added to the gradient.
    amsgrad : bool, default False
        Use the running maximum of the second moment (AMSGrad).
    maximize : bool, default False
        Maximize the objective (negate the gradient).

    Raises
    ------
    ValueError
        If ``lr``, ``eps`` or ``weight_decay`` is negative or a beta is outside [0, 1).
    """

    _decoupled = False

    def __init__(
        self,
        params: Iterable[Any],
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0.0,
        amsgrad: bool = False,
        *,
        maximize: bool = False,
    ) -> None:
        if not 0.0 <= betas[0] < 1.0 or not 0.0 <= betas[1] < 1.0:
            raise ValueError(f"{type(self).__name__}: invalid betas {betas}")
        if not eps >= 0:
            raise ValueError(f"{type(self).__name__}: invalid eps {eps}")
        defaults = dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay,
                        amsgrad=amsgrad, maximize=maximize)  # fmt: skip
        super().__init__(params, defaults)

    def _update(self, p: Tensor, grad: np.ndarray, group: dict, state: dict) -> None:
        lr, (beta1, beta2), eps, wd = (
            group["lr"],
            group["betas"],
            group["eps"],
            group["weight_decay"],
        )
        if not state:
            state["step"] = 0
            state["exp_avg"] = np.zeros_like(p.data)
            state["exp_avg_sq"] = np.zeros_like(p.data)
            if group["amsgrad"]:
                state["max_exp_avg_sq"] = np.zeros_like(p.data)
        state["step"] += 1
        t = state["step"]
        if wd != 0:
            if self._decoupled:
                _mul_(p, 1 - lr * wd)
            else:
                grad = grad + wd * p.data
        m, v = state["exp_avg"], state["exp_avg_sq"]
        m += (1 - beta1) * (grad - m)  # torch's lerp_
        v *= beta2
        v += (1 - beta2) * (grad * grad)
        bias_correction1 = 1 - beta1**t
        bias_correction2_sqrt = math.sqrt(1 - beta2**t)
        if group["amsgrad"]:
            vmax = state["max_exp_avg_sq"]
            np.maximum(vmax, v, out=vmax)
            denom = np.sqrt(vmax) / bias_correction2_sqrt + eps
        else:
            denom = np.sqrt(v) / bias_correction2_sqrt + eps
        step_size = lr / bias_correction1
        _add_(p, -step_size * (m / denom))


class AdamW(Adam):
    r"""Adam with decoupled weight decay (Loshchilov & Hutter), ``torch.optim.AdamW``.

    Each step first shrinks the parameter, :math:`p \leftarrow p\,(1 - \eta\lambda)`, then
    applies the :class:`Adam` update without weight decay in the gradient.

    Parameters
    ----------
    params : iterable of Tensor or iterable of dict
        The Parameters (or leaf Tensors) to optimize, or param groups: dicts holding
        ``"params"`` and per-group overrides of the keyword defaults below.
    lr : float, default 1e-3
        The learning rate :math:`\eta`.
    betas : (float, float), default (0.9, 0.999)
        Decay rates of the first and second moment estimates, each in [0, 1).
    eps : float, default 1e-8
        Added to the denominator.
    weight_decay : float, default 1e-2
        The decoupled decay :math:`\lambda`.
    amsgrad : bool, default False
        Use the running maximum of the second moment (AMSGrad).
    maximize : bool, default False
        Maximize the objective (negate the gradient).

    Raises
    ------
    ValueError
        If ``lr``, ``eps`` or ``weight_decay`` is negative or a beta is outside [0, 1).
    """

    _decoupled = True

    def __init__(
        self,
        params: Iterable[Any],
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 1e-2,
        amsgrad: bool = False,
        *,
        maximize: bool = False,
    ) -> None:
        super().__init__(params, lr, betas, eps, weight_decay, amsgrad, maximize=maximize)
