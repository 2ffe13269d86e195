"""``Module`` and ``Parameter``: torch.nn-style containers for trainable state."""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import numpy as np

from ..tensor import Tensor

__all__ = ["Module", "Parameter"]


class Parameter(Tensor):
    """A leaf Tensor that a Module registers as trainable (``requires_grad`` is True by default)."""

    def __init__(self, data: Any, requires_grad: bool = True) -> None:
        if isinstance(data, Tensor):
            data = data.data
        super().__init__(
            np.array(data, copy=True) if isinstance(data, np.ndarray) else data,
            requires_grad=requires_grad,
        )

    def __repr__(self) -> str:
        return "Parameter containing:\n" + super().__repr__()


class Module:
    """Base class of layers. Assign Parameters and Modules as attributes to register them.

    Names follow torch's dotted style (``"block.0.weight"``), so a torch ``state_dict`` converted
    to NumPy arrays loads by name with :meth:`load_state_dict`.
    """

    training: bool

    def __init__(self) -> None:
        object.__setattr__(self, "_parameters", OrderedDict())
        object.__setattr__(self, "_modules", OrderedDict())
        object.__setattr__(self, "_buffers", OrderedDict())
        object.__setattr__(self, "training", True)

    # ------------------------------------------------------------ registration
    def __setattr__(self, name: str, value: Any) -> None:
        if "_parameters" not in self.__dict__:
            raise AttributeError(
                f"{type(self).__name__}: call super().__init__() before assigning attributes"
            )
        for d in (self._parameters, self._modules, self._buffers):
            d.pop(name, None)
        if isinstance(value, Parameter):
            self._parameters[name] = value
        elif isinstance(value, Module):
            self._modules[name] = value
        object.__setattr__(self, name, value)

    def register_parameter(self, name: str, param: Parameter | None) -> None:
        self._parameters[name] = param
        object.__setattr__(self, name, param)

    def register_buffer(self, name: str, array: Any) -> None:
        """Non-trainable state saved in the state dict (e.g. a fixed table)."""
        self._buffers[name] = array
        object.__setattr__(self, name, array)

    def add_module(self, name: str, module: Module | None) -> None:
        self._modules[name] = module
        object.__setattr__(self, name, module)

    # ------------------------------------------------------------ traversal
    def named_modules(self, prefix: str = "") -> Iterator[tuple[str, Module]]:
        yield prefix, self
        for name, m in self._modules.items():
            if m is not None:
                yield from m.named_modules(f"{prefix}.{name}" if prefix else name)

    def modules(self) -> Iterator[Module]:
        for _, m in self.named_modules():
            yield m

    def children(self) -> Iterator[Module]:
        for m in self._modules.values():
            if m is not None:
                yield m

    def named_parameters(self, prefix: str = "") -> Iterator[tuple[str, Parameter]]:
        seen: set[int] = set()
        for mod_name, m in self.named_modules(prefix):
            for name, p in m._parameters.items():
                if p is None or id(p) in seen:
                    continue
                seen.add(id(p))
                yield (f"{mod_name}.{name}" if mod_name else name), p

    def parameters(self) -> Iterator[Parameter]:
        for _, p in self.named_parameters():
            yield p

    def named_buffers(self) -> Iterator[tuple[str, Any]]:
        for mod_name, m in self.named_modules():
            for name, b in m._buffers.items():
                yield (f"{mod_name}.{name}" if mod_name else name), b

    def apply(self, fn: Callable[[Module], Any]) -> Module:
        for m in self.children():
            m.apply(fn)
        fn(self)
        return self

    # ------------------------------------------------------------ state
    def state_dict(self) -> OrderedDict[str, np.ndarray]:
        """Parameters and buffers by dotted name, as NumPy arrays (copies)."""
        out: OrderedDict[str, np.ndarray] = OrderedDict()
        for mod_name, m in self.named_modules():
            for name, p in m._parameters.items():
                if p is not None:
                    out[f"{mod_name}.{name}" if mod_name else name] = np.array(p.numpy())
            for name, b in m._buffers.items():
                value = b.numpy() if isinstance(b, Tensor) else b
                out[f"{mod_name}.{name}" if mod_name else name] = np.array(value)
        return out

    def load_state_dict(self, state_dict: Mapping[str, Any], strict: bool = True) -> Module:
        """Copy arrays into parameters and buffers by name (values may be torch tensors).

        With ``strict`` a missing or unexpected key, or a shape mismatch, raises ``KeyError`` /
        ``ValueError`` naming the key.
        """
        targets: dict[str, tuple[Module, str, str]] = {}
        for mod_name, m in self.named_modules():
            for name, p in m._parameters.items():
                if p is not None:
                    targets[f"{mod_name}.{name}" if mod_name else name] = (m, name, "param")
            for name in m._buffers:
                targets[f"{mod_name}.{name}" if mod_name else name] = (m, name, "buffer")
        missing = [k for k in targets if k not in state_dict]
        unexpected = [k for k in state_dict if k not in targets]
        if strict and (missing or unexpected):
            raise KeyError(f"load_state_dict: missing keys {missing}, unexpected keys {unexpected}")
        for key, (m, name, kind) in targets.items():
            if key not in state_dict:
                continue
            value = state_dict[key]
            if hasattr(value, "detach"):  # a torch tensor
                value = value.detach().cpu().numpy()
            value = np.asarray(value)
            if kind == "param":
                p = m._parameters[name]
                if tuple(value.shape) != p.shape:
                    raise ValueError(
                        f"load_state_dict: {key} has shape {tuple(value.shape)}, expected {p.shape}"
                    )
                src = value.astype(p.dtype)
                p.data = src if p.device == "cpu" else _to_device(src)
            else:
                old = m._buffers[name]
                arr = value.astype(old.dtype) if isinstance(old, np.ndarray) else value
                m._buffers[name] = arr
                object.__setattr__(m, name, arr)
        return self

    # ------------------------------------------------------------ modes
    def train(self, mode: bool = True) -> Module:
        for m in self.modules():
            object.__setattr__(m, "training", mode)
        return self

    def eval(self) -> Module:
        return self.train(False)

    def zero_grad(self) -> None:
        for p in self.parameters():
            p.grad = None

    def requires_grad_(self, requires_grad: bool = True) -> Module:
        for p in self.parameters():
            p.requires_grad_(requires_grad)
        return self

    def to(self, target: Any) -> Module:
        """Move (``"cpu"``/``"cuda"``) or cast (a float dtype) every parameter in place."""
        for p in self.parameters():
            p.data = p.to(target).data if not isinstance(target, str) else _move(p.data, target)
            p.grad = None
        return self

    def double(self) -> Module:
        return self.to(np.float64)

    def float(self) -> Module:
        return self.to(np.float32)

    # ------------------------------------------------------------ calling
    def forward(self, *args: Any, **kwargs: Any) -> Any:
        raise NotImplementedError(f"{type(self).__name__} does not define forward()")

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self.forward(*args, **kwargs)

    def extra_repr(self) -> str:
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
