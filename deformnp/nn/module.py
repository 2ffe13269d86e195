"""``Module`` and ``Parameter``: torch.nn-style containers for trainable state."""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import numpy as np

from ..tensor import Tensor

__all__ = ["Module", "Parameter"]


class Parameter(Tensor):
    """A leaf Tensor that a Module registers as trainable (``torch.nn.Parameter``).

    Assigning a Parameter as an attribute of a :class:`Module` registers it under that name.
    The data is copied, so a Parameter never shares memory with the array it was made from.

    Parameters
    ----------
    data : array_like or Tensor
        The initial values (a Tensor's array is copied too); float32 or float64 when
        ``requires_grad`` is True.
    requires_grad : bool, default True
        Whether the parameter accumulates gradients.

    Raises
    ------
    TypeError
        If ``requires_grad`` is True and the data is not float32 or float64.
    """

    def __init__(self, data: Any, requires_grad: bool = True) -> None:
        if isinstance(data, Tensor):
            data = data.data
        super().__init__(
            np.array(data, copy=True) if isinstance(data, np.ndarray) else data,
            requires_grad=requires_grad,
        )

    def __repr__(self) -> str:
        return "Parameter containing:\n" + super().__repr__()


def _join(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix else name


class Module:
    """Base class of layers (``torch.nn.Module``).

    Assign Parameters (:class:`Parameter`) and Modules as attributes to register them (or use
    :meth:`register_parameter`, :meth:`register_buffer`, :meth:`add_module`); a subclass calls
    ``super().__init__()`` first and defines :meth:`forward`. Calling the module,
    ``layer(x)``, runs ``layer.forward(x)``. Names follow torch's dotted style
    (``"block.0.weight"``), so a torch ``state_dict`` (torch tensors or NumPy arrays) loads by
    name with :meth:`load_state_dict`.

    Raises
    ------
    AttributeError
        If an attribute is assigned before ``super().__init__()`` has run.
    TypeError
        If a registered parameter (or submodule, or buffer) name is assigned a value of another
        kind (other than None).
    """

    #: True in training mode (the default), False in eval mode; see :meth:`train`.
    training: bool

    def __init__(self) -> None:
        object.__setattr__(self, "_parameters", OrderedDict())
        object.__setattr__(self, "_modules", OrderedDict())
        object.__setattr__(self, "_buffers", OrderedDict())
        object.__setattr__(self, "_non_persistent", set())
        object.__setattr__(self, "training", True)

    # ------------------------------------------------------------ registration
    def __setattr__(self, name: str, value: Any) -> None:
        if "_parameters" not in self.__dict__:
            raise AttributeError(
                f"{type(self).__name__}: call super().__init__() before assigning attributes"
            )
        if isinstance(value, Parameter):
            self._modules.pop(name, None)
            self._buffers.pop(name, None)
            self._parameters[name] = value
        elif isinstance(value, Module):
            self._parameters.pop(name, None)
            self._buffers.pop(name, None)
            self._modules[name] = value
        elif name in self._parameters:
            if value is not None:
                raise TypeError(
                    f"{type(self).__name__}: cannot assign {type(value).__name__} as parameter "
                    f"{name!r} (Parameter or None expected)"
                )
            self._parameters[name] = None
        elif name in self._modules:
            if value is not None:
                raise TypeError(
                    f"{type(self).__name__}: cannot assign {type(value).__name__} as child module "
                    f"{name!r} (Module or None expected)"
                )
            self._modules[name] = None
        elif name in self._buffers:
            if value is not None and not isinstance(value, (np.ndarray, Tensor)):
                raise TypeError(
                    f"{type(self).__name__}: cannot assign {type(value).__name__} as buffer "
                    f"{name!r} (an array, a Tensor or None expected)"
                )
            self._buffers[name] = value
        object.__setattr__(self, name, value)

    def __delattr__(self, name: str) -> None:
        for d in (self._parameters, self._modules, self._buffers):
            d.pop(name, None)
        self._non_persistent.discard(name)
        object.__delattr__(self, name)

    def _check_name(self, kind: str, name: str) -> None:
        if not isinstance(name, str) or not name or "." in name:
            raise KeyError(f"{kind} name must be a non-empty string without '.', got {name!r}")

    def register_parameter(self, name: str, param: Parameter | None) -> None:
        """Register ``param`` under ``name`` (torch's ``register_parameter``).

        Parameters
        ----------
        name : str
            The attribute name (non-empty, without ``"."``).
        param : Parameter or None
            The parameter; None registers an absent optional parameter (as a layer's
            ``bias=False`` does), so that it is listed by name but holds nothing.

        Raises
        ------
        KeyError
            If ``name`` is empty, not a string, or contains ``"."``.
        TypeError
            If ``param`` is neither a Parameter nor None.
        """
        self._check_name("parameter", name)
        if param is not None and not isinstance(param, Parameter):
            raise TypeError(
                f"register_parameter: {name!r} must be a Parameter or None, got "
                f"{type(param).__name__}"
            )
        self._modules.pop(name, None)
        self._buffers.pop(name, None)
        self._parameters[name] = param
        object.__setattr__(self, name, param)

    def register_buffer(self, name: str, array: Any, persistent: bool = True) -> None:
        """Register non-trainable state under ``name`` (torch's ``register_buffer``).

        Buffers move and cast with the module (:meth:`to`), and persistent ones are saved in
        :meth:`state_dict`.

        Parameters
        ----------
        name : str
            The attribute name (non-empty, without ``"."``).
        array : numpy.ndarray, Tensor or None
            The state.
        persistent : bool, default True
            Whether the buffer is part of the state dict.

        Raises
        ------
        KeyError
            If ``name`` is empty, not a string, or contains ``"."``.
        """
        self._check_name("buffer", name)
        self._parameters.pop(name, None)
        self._modules.pop(name, None)
        self._buffers[name] = array
        if persistent:
            self._non_persistent.discard(name)
        else:
            self._non_persistent.add(name)
        object.__setattr__(self, name, array)

    def add_module(self, name: str, module: Module | None) -> None:
        """Register ``module`` as a submodule under ``name`` (also ``register_module``).

        Parameters
        ----------
        name : str
            The attribute name (non-empty, without ``"."``).
        module : Module or None
            The submodule (None registers an empty slot).

        Raises
        ------
        KeyError
            If ``name`` is empty, not a string, or contains ``"."``.
        TypeError
            If ``module`` is neither a Module nor None.
        """
        self._check_name("module", name)
        if module is not None and not isinstance(module, Module):
            raise TypeError(
                f"add_module: {name!r} must be a Module or None, got {type(module).__name__}"
            )
        self._parameters.pop(name, None)
        self._buffers.pop(name, None)
        self._modules[name] = module
        object.__setattr__(self, name, module)

    register_module = add_module

    # ------------------------------------------------------------ traversal
    def named_modules(
        self, memo: set | None = None, prefix: str = "", remove_duplicate: bool = True
    ) -> Iterator[tuple[str, Module]]:
        """Iterate over this module and every submodule, with their dotted names.

        Parameters
        ----------
        memo : set, optional
            Ids of modules already yielded (used by the recursion).
        prefix : str, default ""
            Prepended to every name (this module's own name is ``prefix``).
        remove_duplicate : bool, default True
            Yield a module reachable under several names once (as torch).

        Yields
        ------
        (str, Module)
            The dotted name and the module, this module first, depth first.
        """
        if memo is None:
            memo = set()
        if remove_duplicate:
            if id(self) in memo:
                return
            memo.add(id(self))
        yield prefix, self
        for name, m in self._modules.items():
            if m is not None:
                yield from m.named_modules(memo, _join(prefix, name), remove_duplicate)

    def modules(self) -> Iterator[Module]:
        """Iterate over this module and every submodule (each once).

        Yields
        ------
        Module
            This module first, then its submodules depth first.
        """
        for _, m in self.named_modules():
            yield m

    def named_children(self) -> Iterator[tuple[str, Module]]:
        """Iterate over the direct submodules, with their names (each module once).

        Yields
        ------
        (str, Module)
            The attribute name and the submodule.
        """
        seen: set[int] = set()
        for name, m in self._modules.items():
            if m is not None and id(m) not in seen:
                seen.add(id(m))
                yield name, m

    def children(self) -> Iterator[Module]:
        """Iterate over the direct submodules (each once).

        Yields
        ------
        Module
            A submodule.
        """
        for _, m in self.named_children():
            yield m

    def named_parameters(
        self, prefix: str = "", recurse: bool = True
    ) -> Iterator[tuple[str, Parameter]]:
        """Iterate over the parameters with their dotted names.

        A parameter shared by two modules is listed once; absent (None) parameters are
        skipped.

        Parameters
        ----------
        prefix : str, default ""
            Prepended to every name.
        recurse : bool, default True
            Include the parameters of submodules (False: this module's own only).

        Yields
        ------
        (str, Parameter)
            The dotted name (``"block.0.weight"``) and the parameter.
        """
        seen: set[int] = set()
        mods = self.named_modules(prefix=prefix) if recurse else iter([(prefix, self)])
        for mod_name, m in mods:
            for name, p in m._parameters.items():
                if p is None or id(p) in seen:
                    continue
                seen.add(id(p))
                yield _join(mod_name, name), p

    def parameters(self, recurse: bool = True) -> Iterator[Parameter]:
        """Iterate over the parameters (each once), e.g. to build an optimizer.

        Parameters
        ----------
        recurse : bool, default True
            Include the parameters of submodules.

        Yields
        ------
        Parameter
            A parameter.
        """
        for _, p in self.named_parameters(recurse=recurse):
            yield p

    def named_buffers(self, prefix: str = "", recurse: bool = True) -> Iterator[tuple[str, Any]]:
        """Iterate over the buffers (persistent or not) with their dotted names.

        Parameters
        ----------
        prefix : str, default ""
            Prepended to every name.
        recurse : bool, default True
            Include the buffers of submodules.

        Yields
        ------
        (str, numpy.ndarray or Tensor)
            The dotted name and the buffer (None buffers are skipped).
        """
        mods = self.named_modules(prefix=prefix) if recurse else iter([(prefix, self)])
        for mod_name, m in mods:
            for name, b in m._buffers.items():
                if b is not None:
                    yield _join(mod_name, name), b

    def buffers(self, recurse: bool = True) -> Iterator[Any]:
        """Iterate over the buffers.

        Parameters
        ----------
        recurse : bool, default True
            Include the buffers of submodules.

        Yields
        ------
        numpy.ndarray or Tensor
            A buffer.
        """
        for _, b in self.named_buffers(recurse=recurse):
            yield b

    def get_submodule(self, target: str) -> Module:
        """Return the submodule at a dotted path (torch's ``get_submodule``).

        Parameters
        ----------
        target : str
            The dotted name, e.g. ``"offset_fc.0"``; ``""`` is this module.

        Returns
        -------
        Module
            The submodule.

        Raises
        ------
        AttributeError
            If a part of the path names no submodule.
        """
        m: Module = self
        for part in target.split(".") if target else []:
            child = m._modules.get(part)
            if child is None:
                raise AttributeError(f"get_submodule: {type(m).__name__} has no submodule {part!r}")
            m = child
        return m

    def apply(self, fn: Callable[[Module], Any]) -> Module:
        """Call ``fn`` on every submodule, then on this module (e.g. a custom initialisation).

        Parameters
        ----------
        fn : callable
            Called as ``fn(module)``; its return value is ignored.

        Returns
        -------
        Module
            ``self``.
        """
        for m in self.children():
            m.apply(fn)
        fn(self)
        return self

    # ------------------------------------------------------------ state
    def _state_entries(self) -> Iterator[tuple[str, Module, str, str]]:
        """(dotted key, owner, attribute, "param" | "buffer") of everything in the state dict.

        Like torch, a module reachable under two names is saved under both."""
        for mod_name, m in self.named_modules(remove_duplicate=False):
            for name, p in m._parameters.items():
                if p is not None:
                    yield _join(mod_name, name), m, name, "param"
            for name, b in m._buffers.items():
                if b is not None and name not in m._non_persistent:
                    yield _join(mod_name, name), m, name, "buffer"

    def state_dict(self) -> OrderedDict[str, np.ndarray]:
        """Return the parameters and persistent buffers by dotted name (torch's ``state_dict``).

        Like torch, a module reachable under two names is saved under both.

        Returns
        -------
        collections.OrderedDict of str to numpy.ndarray
            Host copies of the values.
        """
        out: OrderedDict[str, np.ndarray] = OrderedDict()
        for key, m, name, kind in self._state_entries():
            value = m._parameters[name] if kind == "param" else m._buffers[name]
            out[key] = np.array(value.numpy() if isinstance(value, Tensor) else value)
        return out

    def load_state_dict(self, state_dict: Mapping[str, Any], strict: bool = True) -> Module:
        """Copy arrays into the parameters and buffers by name (torch's ``load_state_dict``).

        Values may be NumPy arrays, Tensors or torch tensors (converted on the host), and are
        cast to each parameter's dtype (and moved to its device). Nothing is modified unless
        every key checks out.

        Parameters
        ----------
        state_dict : mapping of str to array_like
            Values by dotted name, e.g. a torch module's ``state_dict()``.
        strict : bool, default True
            Require the keys to match exactly (False: load the keys present, ignore the rest).

        Returns
        -------
        Module
            ``self``.

        Raises
        ------
        KeyError
            With ``strict``, if keys are missing or unexpected (the message lists them).
        ValueError
            If a value's shape differs from the parameter's (always, as torch).
        """
        targets = {key: (m, name, kind) for key, m, name, kind in self._state_entries()}
        missing = [k for k in targets if k not in state_dict]
        unexpected = [k for k in state_dict if k not in targets]
        if strict and (missing or unexpected):
            raise KeyError(f"load_state_dict: missing keys {missing}, unexpected keys {unexpected}")
        staged = []
        for key, (m, name, kind) in targets.items():
            if key not in state_dict:
                continue
            value = state_dict[key]
            if hasattr(value, "detach") and hasattr(value, "cpu"):  # a torch tensor
                value = value.detach().cpu().numpy()
            elif isinstance(value, Tensor):
                value = value.numpy()
            value = np.asarray(value)
            old = m._parameters[name] if kind == "param" else m._buffers[name]
            shape = tuple(old.shape)
            if tuple(value.shape) != shape:
                raise ValueError(
                    f"load_state_dict: {key} has shape {tuple(value.shape)}, expected {shape}"
                )
            staged.append((m, name, old, value))
        for m, name, old, value in staged:
            if isinstance(old, Tensor):
                src = np.array(value, dtype=old.dtype)
                old.data = src if old.device == "cpu" else _to_device(src)
            else:
                arr = np.array(value, dtype=old.dtype if isinstance(old, np.ndarray) else None)
                m._buffers[name] = arr
                object.__setattr__(m, name, arr)
        return self

    # ------------------------------------------------------------ modes
    def train(self, mode: bool = True) -> Module:
        """Set training mode on this module and every submodule (it changes :class:`Dropout`).

        Parameters
        ----------
        mode : bool, default True
            True for training mode, False for eval mode.

        Returns
        -------
        Module
            ``self``.
        """
        for m in self.modules():
            object.__setattr__(m, "training", bool(mode))
        return self

    def eval(self) -> Module:
        """Set eval mode (``train(False)``).

        Returns
        -------
        Module
            ``self``.
        """
        return self.train(False)

    def zero_grad(self, set_to_none: bool = True) -> None:
        """Clear the gradients of every parameter.

        Parameters
        ----------
        set_to_none : bool, default True
            Set each ``.grad`` to None (True, as torch) or to zeros (False).
        """
        for p in self.parameters():
            if set_to_none or p.grad is None:
                p.grad = None
            else:
                p.grad = p.grad * 0

    def requires_grad_(self, requires_grad: bool = True) -> Module:
        """Set ``requires_grad`` on every parameter (e.g. False to freeze the module).

        Parameters
        ----------
        requires_grad : bool, default True
            The new setting.

        Returns
        -------
        Module
            ``self``.
        """
        for p in self.parameters():
            p.requires_grad_(requires_grad)
        return self

    def to(self, target: Any) -> Module:
        """Move or cast every parameter and buffer in place.

        Parameters keep their identity (their ``.data`` is replaced), so an optimizer built
        before the call still holds them; their gradients are cleared.

        Parameters
        ----------
        target : {"cpu", "cuda"} or numpy.dtype
            A device (every parameter and buffer is moved) or a float dtype (parameters and
            floating buffers are cast).

        Returns
        -------
        Module
            ``self``.

        Raises
        ------
        ValueError
            If ``target`` is a string other than ``"cpu"`` or ``"cuda"``.
        RuntimeError
            If ``target`` is ``"cuda"`` and CUDA is not available.
        """
        for m in self.modules():
            for p in m._parameters.values():
                if p is None:
                    continue
                if isinstance(target, str):
                    p.data = _move(p.data, target)
                elif p.dtype != np.dtype(target):
                    p.data = p.data.astype(target)
                p.grad = None
            for name, b in list(m._buffers.items()):
                if b is None:
                    continue
                if isinstance(target, str):
                    if isinstance(b, Tensor):
                        b.data = _move(b.data, target)
                    else:
                        m._buffers[name] = _move(b, target)
                        object.__setattr__(m, name, m._buffers[name])
                elif isinstance(b, Tensor) and b.dtype.kind == "f":
                    b.data = b.data.astype(target)
                elif isinstance(b, np.ndarray) and b.dtype.kind == "f":
                    m._buffers[name] = b.astype(target)
                    object.__setattr__(m, name, m._buffers[name])
        return self

    def double(self) -> Module:
        """Cast the parameters and floating buffers to float64 (``to(np.float64)``).

        Returns
        -------
        Module
            ``self``.
        """
        return self.to(np.float64)

    def float(self) -> Module:
        """Cast the parameters and floating buffers to float32 (``to(np.float32)``).

        Returns
        -------
        Module
            ``self``.
        """
        return self.to(np.float32)

    def cpu(self) -> Module:
        """Move the parameters and buffers to the CPU (``to("cpu")``).

        Returns
        -------
        Module
            ``self``.
        """
        return self.to("cpu")

    def cuda(self) -> Module:
        """Move the parameters and buffers to the CUDA device (``to("cuda")``).

        Returns
        -------
        Module
            ``self``.

        Raises
        ------
        RuntimeError
            If CUDA is not available.
        """
        return self.to("cuda")

    # ------------------------------------------------------------ calling
    def forward(self, *args: Any, **kwargs: Any) -> Any:
        """Compute the module's output; every subclass overrides this.

        Parameters
        ----------
        *args : object
            The inputs (``layer(*args, **kwargs)`` calls ``layer.forward(*args, **kwargs)``).
        **kwargs : object
            Keyword inputs.

        Returns
        -------
        object
            The output, usually a Tensor.

        Raises
        ------
        NotImplementedError
            In the base class.
        """
        raise NotImplementedError(f"{type(self).__name__} does not define forward()")

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self.forward(*args, **kwargs)

    def extra_repr(self) -> str:
        """Return the text shown inside the module's ``repr`` (its constructor arguments).

        Returns
        -------
        str
            Empty in the base class; layers list their settings.
        """
        return ""

    def __repr__(self) -> str:
        lines = [f"{type(self).__name__}({self.extra_repr()}"]
        for name, m in self._modules.items():
            sub = repr(m).replace("\n", "\n  ")
            lines.append(f"  ({name}): {sub}")
        return lines[0] + ")" if len(lines) == 1 else "\n".join(lines) + "\n)"


def _move(a: Any, device: str) -> Any:
    from ..cuda import move

    return move(a, device)


def _to_device(a: np.ndarray) -> Any:
    from ..cuda import to_device

    return to_device(a)
