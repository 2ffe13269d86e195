"""The ``Function`` base class of the autograd engine, and grad mode.

A differentiable operation is a subclass of :class:`Function` with two static methods (by
convention named ``<Op>Function``, so that it never shares a name with a layer)::

    class MulFunction(Function):
        @staticmethod
        def forward(ctx, a, b):          # plain arrays in, a plain array out
            ctx.save_for_backward(a, b)
            return a * b

        @staticmethod
        def backward(ctx, grad):         # one gradient per positional input of forward
            a, b = ctx.saved_tensors
            return grad * b, grad * a

``MulFunction.apply(x, y)`` unwraps Tensors to arrays, runs ``forward`` and, when grad mode is on and
some input requires grad, records a node (the Function, its context and its parent Tensors) on
the output. ``Tensor.backward`` replays those nodes in reverse topological order. Gradients that a
``backward`` returns in a broadcast shape are summed back to the input's shape by the engine, in
one place (:func:`~deformnp.tensor.sum_to_shape`), so no op has to think about broadcasting in
its backward.

Ops whose inputs were checked by a preparation step (the deformable ops) pass the checked arrays
to ``apply`` as a keyword argument: the positional inputs are then only the node's parents (what
gradients flow to), and ``forward`` reads the arrays from the keyword.
"""

from __future__ import annotations

import functools
import threading
from collections.abc import Callable
from typing import Any

from .cuda import is_cuda_array
from .tensor import Tensor, sum_to_shape

__all__ = [
    "Function",
    "Context",
    "no_grad",
    "enable_grad",
    "is_grad_enabled",
    "set_grad_enabled",
    "sum_to_shape",
]


class _GradMode(threading.local):
    enabled: bool = True


_grad_mode = _GradMode()


def is_grad_enabled() -> bool:
    """Tell whether operations are being recorded for backward (grad mode).

    The analogue of ``torch.is_grad_enabled``. Grad mode is per thread and on by default.

    Returns
    -------
    bool
        False inside :class:`no_grad` or after ``set_grad_enabled(False)``.

    See Also
    --------
    no_grad, enable_grad, set_grad_enabled : Change grad mode.
    """
    return _grad_mode.enabled


class set_grad_enabled:
    """Set grad mode on or off: as a function call, a context manager, or a decorator.

    The analogue of ``torch.set_grad_enabled``. As in torch, ``set_grad_enabled(False)`` takes
    effect when called (so it also works as a plain function call); used with ``with`` the
    previous mode is restored on exit, and used as a decorator (``@set_grad_enabled(False)``)
    the mode applies only while the decorated function runs (decorating leaves the current mode
    unchanged). Grad mode is per thread.

    Parameters
    ----------
    mode : bool
        True to record operations for backward, False not to.

    See Also
    --------
    no_grad, enable_grad : Fixed-mode context managers.
    is_grad_enabled : The current mode.
    """

    def __init__(self, mode: bool) -> None:
        self.prev = _grad_mode.enabled
        self.mode = bool(mode)
        _grad_mode.enabled = self.mode

    def __enter__(self) -> None:
        pass

    def __exit__(self, *exc: object) -> None:
        _grad_mode.enabled = self.prev

    def __call__(self, fn: Callable) -> Callable:
        _grad_mode.enabled = self.prev  # decorating must not change the current mode
        mode = self.mode

        @functools.wraps(fn)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            with set_grad_enabled(mode):
                return fn(*args, **kwargs)

        return wrapper


class _Switch:
    """Base of ``no_grad`` / ``enable_grad``: a context manager and a decorator (with or without
    parentheses: ``@no_grad()`` and ``@no_grad`` both work)."""

    _mode: bool = True

    def __new__(cls, orig_func: Callable | None = None) -> Any:
        if orig_func is None:
            return super().__new__(cls)
        return cls()(orig_func)

    def __init__(self, orig_func: Callable | None = None) -> None:
        self.prev: list[bool] = []

    def __enter__(self) -> None:
        self.prev.append(_grad_mode.enabled)
        _grad_mode.enabled = self._mode

    def __exit__(self, *exc: object) -> None:
        _grad_mode.enabled = self.prev.pop()

    def __call__(self, fn: Callable) -> Callable:
        cls = type(self)

        @functools.wraps(fn)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            with cls():
                return fn(*args, **kwargs)

        return wrapper


class no_grad(_Switch):
    """Disable recording of operations, as a context manager or a decorator.

    The analogue of ``torch.no_grad``: inside ``with no_grad():`` (or a function decorated with
    ``@no_grad()`` or ``@no_grad``) no op records a node, so results do not require grad and no
    graph is kept. The previous mode is restored on exit. Grad mode is per thread.

    Parameters
    ----------
    orig_func : callable, optional
        The function being decorated, when used as ``@no_grad`` without parentheses (then the
        call returns the wrapped function); leave it out otherwise.

    See Also
    --------
    enable_grad, set_grad_enabled, is_grad_enabled
    """

    _mode = False


class enable_grad(_Switch):
    """Re-enable recording of operations inside a ``no_grad`` block.

    The analogue of ``torch.enable_grad``; a context manager (``with enable_grad():``) or a
    decorator (``@enable_grad()`` or ``@enable_grad``). The previous mode is restored on exit.

    Parameters
    ----------
    orig_func : callable, optional
        The function being decorated, when used as ``@enable_grad`` without parentheses (then
        the call returns the wrapped function); leave it out otherwise.

    See Also
    --------
    no_grad, set_grad_enabled, is_grad_enabled
    """

    _mode = True


class Context:
    """Per-call scratch space handed to ``forward`` and ``backward``.

    ``save_for_backward(*arrays)`` keeps arrays for the backward pass (read back as
    ``saved_tensors``); any other attribute may be set freely. ``needs_input_grad`` is a tuple of
    booleans, one per positional input of ``forward``.
    """

    def __init__(self, needs_input_grad: tuple[bool, ...]) -> None:
        self.needs_input_grad = needs_input_grad
        self._saved: tuple | None = ()

    def save_for_backward(self, *arrays: Any) -> None:
        self._saved = arrays

    @property
    def saved_tensors(self) -> tuple:
        if self._saved is None:
            raise RuntimeError(
                "Trying to backward through the graph a second time (or directly access saved "
                "tensors after they have already been freed). Specify retain_graph=True when "
                "calling backward() the first time."
            )
        return self._saved

    def release(self) -> None:
        self._saved = None
        self.__dict__ = {"needs_input_grad": self.needs_input_grad, "_saved": None}


class Node:
    """One recorded application of a Function: what ``backward`` replays."""

    __slots__ = ("fn", "ctx", "parents", "freed")

    def __init__(self, fn: type[Function], ctx: Context, parents: tuple) -> None:
        self.fn = fn
        self.ctx = ctx
        self.parents = parents  # one entry per positional input: a Tensor or None
        self.freed = False


class Function:
    """Base class of differentiable operations, in the style of ``torch.autograd.Function``.

    A subclass defines two static methods, ``forward(ctx, *inputs, **kwargs)`` and
    ``backward(ctx, grad)``, that work on plain arrays (NumPy, or CUDA device arrays where
    :attr:`supports_cuda` is set), and is called through :meth:`apply`. By convention the
    subclass is named ``<Op>Function``, so that it never shares a name with a layer::

        class MulFunction(Function):
            @staticmethod
            def forward(ctx, a, b):          # plain arrays in, a plain array out
                ctx.save_for_backward(a, b)
                return a * b

            @staticmethod
            def backward(ctx, grad):         # one gradient per positional input of forward
                a, b = ctx.saved_tensors
                return grad * b, grad * a

        z = MulFunction.apply(x, y)

    Gradients that ``backward`` returns in a broadcast shape are summed back to each input's
    shape by the engine, so no op has to handle broadcasting in its backward. Ops whose inputs
    were checked by a preparation step pass the checked arrays to ``apply`` as a keyword
    argument: the positional inputs are then only the node's parents (what gradients flow to).

    See Also
    --------
    Tensor.backward : Replays the recorded nodes.
    """

    @staticmethod
    def forward(ctx: Context, *args: Any, **kwargs: Any) -> Any:
        """Compute the op's output from plain arrays (subclasses override this).

        Parameters
        ----------
        ctx : Context
            Per-call scratch space: ``ctx.save_for_backward(*arrays)`` keeps arrays for
            ``backward`` (read back as ``ctx.saved_tensors``), any other attribute may be set,
            and ``ctx.needs_input_grad`` holds one bool per positional input.
        *args : array or object
            The positional arguments of :meth:`apply`, Tensors unwrapped to their arrays.
        **kwargs : object
            The keyword arguments of :meth:`apply`, passed through unchanged.

        Returns
        -------
        array
            The output (wrapped in a Tensor by :meth:`apply`).

        Raises
        ------
        NotImplementedError
            Always, in the base class.
        """
        raise NotImplementedError

    @staticmethod
    def backward(ctx: Context, grad: Any) -> Any:
        """Return the gradients of the positional inputs (subclasses override this).

        Parameters
        ----------
        ctx : Context
            The context that ``forward`` filled.
        grad : array
            The gradient of the loss with respect to the output, in the output's shape and
            dtype.

        Returns
        -------
        array or None, or tuple of array or None
            One gradient per positional input of ``forward``, in order (a single value for a
            one-input op); None where an input needs no gradient. A gradient may be in a
            broadcast shape: the engine sums it back to the input's shape.

        Raises
        ------
        NotImplementedError
            Always, in the base class.
        """
        raise NotImplementedError

    #: Whether ``forward``/``backward`` accept CUDA device arrays. Only the deformable ops, the
    #: device moves and the loss-forming elementwise ops do; any other op given a CUDA tensor
    #: raises a TypeError that names it and says to move to the CPU.
    supports_cuda: bool = False

    #: Whether ``backward`` returns, for each input, a new array that nothing else references:
    #: not ``grad``, not an input or a saved array, not a buffer kept between calls, not the
    #: array returned for another input. The engine then hands such a gradient to a leaf's
    #: :attr:`~deformnp.Tensor.grad` as it is instead of copying it. The kernel-backed ops set
    #: it (their backward allocates every gradient it returns); for any other op the engine
    #: copies, as it must (``AddFunction`` returns ``grad`` itself for both inputs).
    fresh_grads: bool = False

    @classmethod
    def apply(cls, *args: Any, **kwargs: Any) -> Any:
        """Run the op on Tensors (or arrays) and record it for backward when needed.

        Tensors among ``args`` are unwrapped to their arrays and ``forward`` runs on them. When
        grad mode is on (see :func:`is_grad_enabled`), some positional Tensor requires grad and
        the output is floating, the output requires grad and records a node (this Function, its
        context, and the positional Tensors as parents). Integer or boolean outputs are
        constants of the graph, as in torch.

        Parameters
        ----------
        *args : Tensor, array or object
            The positional inputs; gradients flow only to those that are Tensors.
        **kwargs : object
            Passed to ``forward`` unchanged (not parents of the node).

        Returns
        -------
        Tensor
            The output of ``forward``, wrapped.

        Raises
        ------
        TypeError
            If an input is a CUDA array and the op does not support CUDA (the message names the
            op and says to move the input to the CPU).
        """
        if not cls.supports_cuda:
            for a in args:
                if is_cuda_array(a.data if isinstance(a, Tensor) else a):
                    raise TypeError(
                        f"{cls.__name__.removesuffix('Function').lower()}: not implemented for "
                        f"CUDA tensors; move the "
                        f"input to the CPU first with .to('cpu') (on CUDA: the deformable ops, "
                        f"and add, sub, mul, div, neg, sum and mean to form a loss)"
                    )
        tensors = tuple(a if isinstance(a, Tensor) else None for a in args)
        needs = tuple(t is not None and t.requires_grad for t in tensors)
        record = _grad_mode.enabled and any(needs)
        ctx = Context(needs if record else (False,) * len(args))
        raw = [a.data if isinstance(a, Tensor) else a for a in args]
        out = cls.forward(ctx, *raw, **kwargs)
        result = Tensor._wrap(out)
        # Only floating outputs are differentiable (an integer or boolean result, e.g. a cast or
        # an argmax, is a constant of the graph, as in torch).
        if record and result.dtype.kind == "f":
            result.requires_grad = True
            result._node = Node(cls, ctx, tensors)
        return result
