"""Generic layers with torch.nn's names, arguments, parameter names and default initialisation.

Parameters are float32 by default, as in torch (``dtype=np.float64`` for gradchecks, or call
``.double()``); ``device="cuda"`` moves them after initialisation.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from collections.abc import Iterable, Iterator
from typing import Any

import numpy as np

from .. import functional as F
from ..tensor import Tensor
from ..typing import IntPair, TensorLike
from ..validation import integer, integers, pair
from . import init
from .module import Module, Parameter

__all__ = [
    "Identity",
    "Linear",
    "Conv2d",
    "LayerNorm",
    "GELU",
    "ReLU",
    "LeakyReLU",
    "SiLU",
    "Sigmoid",
    "Tanh",
    "Softmax",
    "Dropout",
    "Flatten",
    "Sequential",
    "ModuleList",
]


def _dtype(dtype: Any) -> np.dtype:
    dt = np.dtype(np.float32 if dtype is None else dtype)
    if dt not in (np.float32, np.float64):
        raise TypeError(f"layers: dtype must be float32 or float64, got {dt}")
    return dt


def _finish(module: Module, device: Any) -> None:
    if device is not None and device != "cpu":
        module.to(device)


class Identity(Module):
    """Returns its input; accepts and ignores any arguments (as torch)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__()

    def forward(self, input: TensorLike) -> TensorLike:
        return input


class Linear(Module):
    """``y = x @ weight.T + bias``; weight (out_features, in_features), bias (out_features,).

    Initialisation as torch: weight kaiming_uniform_(a=sqrt(5)), i.e. U(-1/sqrt(in), 1/sqrt(in)),
    and bias U(-1/sqrt(in), 1/sqrt(in)).
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        device: Any = None,
        dtype: Any = None,
    ) -> None:
        super().__init__()
        dt = _dtype(dtype)
        self.in_features = integer("Linear", "in_features", in_features, 0)
        self.out_features = integer("Linear", "out_features", out_features, 0)
        self.weight = Parameter(np.empty((self.out_features, self.in_features), dt))
        if bias:
            self.bias = Parameter(np.empty((self.out_features,), dt))
        else:
            self.register_parameter("bias", None)
        self.reset_parameters()
        _finish(self, device)

    def reset_parameters(self) -> None:
        init.kaiming_uniform_(self.weight, a=math.sqrt(5))
        if self.bias is not None:
            fan_in = self.in_features
            bound = 1 / math.sqrt(fan_in) if fan_in > 0 else 0
            init.uniform_(self.bias, -bound, bound)

    def forward(self, input: TensorLike) -> Tensor:
        """``input @ weight.T + bias`` for input (*, in_features): see
        :func:`deformnp.functional.linear`."""
        return F.linear(input, self.weight, self.bias)

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"bias={self.bias is not None}"
        )


class _ConvBase(Module):
    """What every 2-D convolution layer shares: checked arguments, ``weight`` (out_channels,
    in_channels/groups, kh, kw) and ``bias`` (out_channels,) or None, and torch's default
    initialisation: weight kaiming_uniform_(a=sqrt(5)), i.e. U(-1/sqrt(fan_in), 1/sqrt(fan_in)),
    bias the same bound, fan_in = in_channels/groups * kh * kw.

    Used by :class:`Conv2d` and the deformable convolutions of ``nn/deform_conv.py``; a subclass
    that initialises differently overrides :meth:`reset_parameters`. Subclasses call
    ``reset_parameters()`` once they have built everything it touches.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: IntPair,
        stride: IntPair,
        padding: IntPair | str,
        dilation: IntPair,
        groups: int,
        bias: bool,
        dtype: Any,
        min_channels: int = 0,
    ) -> None:
        super().__init__()
        name = type(self).__name__
        self.in_channels = integer(name, "in_channels", in_channels, min_channels)
        self.out_channels = integer(name, "out_channels", out_channels, min_channels)
        self.kernel_size = pair(name, "kernel_size", kernel_size, 1)
        self.stride = pair(name, "stride", stride, 1)
        self.padding = padding if isinstance(padding, str) else pair(name, "padding", padding, 0)
        self.dilation = pair(name, "dilation", dilation, 1)
        self.groups = integer(name, "groups", groups, 1)
        for arg in ("in_channels", "out_channels"):
            if getattr(self, arg) % self.groups:
                raise ValueError(
                    f"{name}: {arg} {getattr(self, arg)} must be divisible by groups {self.groups}"
                )
        dt = _dtype(dtype)
        shape = (self.out_channels, self.in_channels // self.groups, *self.kernel_size)
        self.weight = Parameter(np.empty(shape, dt))
        if bias:
            self.bias = Parameter(np.empty((self.out_channels,), dt))
        else:
            self.register_parameter("bias", None)

    def reset_parameters(self) -> None:
        init.kaiming_uniform_(self.weight, a=math.sqrt(5))
        if self.bias is not None:
            fan_in = self.weight.shape[1] * self.kernel_size[0] * self.kernel_size[1]
            if fan_in:
                bound = 1 / math.sqrt(fan_in)
                init.uniform_(self.bias, -bound, bound)

    def extra_repr(self) -> str:
        s = (
            f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, "
            f"stride={self.stride}"
        )
        if self.padding != (0, 0):
            s += f", padding={self.padding}"
        if self.dilation != (1, 1):
            s += f", dilation={self.dilation}"
        if self.groups != 1:
            s += f", groups={self.groups}"
        if self.bias is None:
            s += ", bias=False"
        return s


class Conv2d(_ConvBase):
    """2-D convolution layer (torch.nn.Conv2d): weight (out, in/groups, kh, kw), bias (out,).

    ``padding`` may be an int, a pair, ``"valid"`` or ``"same"``; only ``padding_mode="zeros"``
    is supported. Initialisation as torch (see :class:`_ConvBase`).
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: IntPair,
        stride: IntPair = 1,
        padding: IntPair | str = 0,
        dilation: IntPair = 1,
        groups: int = 1,
        bias: bool = True,
        padding_mode: str = "zeros",
        device: Any = None,
        dtype: Any = None,
    ) -> None:
        if padding_mode != "zeros":
            raise ValueError(
                f"Conv2d: only padding_mode='zeros' is supported, got {padding_mode!r}"
            )
        if isinstance(padding, str) and padding not in ("valid", "same"):
            raise ValueError(
                f"Conv2d: padding must be an int, a pair, 'valid' or 'same', got {padding!r}"
            )
        super().__init__(
            in_channels, out_channels, kernel_size, stride, padding, dilation, groups, bias, dtype
        )
        self.padding_mode = padding_mode
        self.reset_parameters()
        _finish(self, device)

    def forward(self, input: TensorLike) -> Tensor:
        """The convolution of ``input`` (N, in_channels, H, W) (or unbatched (C, H, W)): see
        :func:`deformnp.functional.conv2d`."""
        return F.conv2d(
            input, self.weight, self.bias, self.stride, self.padding, self.dilation, self.groups
        )


class LayerNorm(Module):
    """Layer normalisation over the trailing ``normalized_shape`` dims (torch.nn.LayerNorm);
    ``weight`` ones and ``bias`` zeros."""

    def __init__(
        self,
        normalized_shape: Any,
        eps: float = 1e-5,
        elementwise_affine: bool = True,
        bias: bool = True,
        device: Any = None,
        dtype: Any = None,
    ) -> None:
        super().__init__()
        dt = _dtype(dtype)
        self.normalized_shape = integers("LayerNorm", "normalized_shape", normalized_shape)
        self.eps = eps
        self.elementwise_affine = elementwise_affine
        if elementwise_affine:
            self.weight = Parameter(np.ones(self.normalized_shape, dt))
            if bias:
                self.bias = Parameter(np.zeros(self.normalized_shape, dt))
            else:
                self.register_parameter("bias", None)
        else:
            self.register_parameter("weight", None)
            self.register_parameter("bias", None)
        _finish(self, device)

    def reset_parameters(self) -> None:
        if self.weight is not None:
            init.ones_(self.weight)
        if self.bias is not None:
            init.zeros_(self.bias)

    def forward(self, input: TensorLike) -> Tensor:
        return F.layer_norm(input, self.normalized_shape, self.weight, self.bias, self.eps)

    def extra_repr(self) -> str:
        return (
            f"{self.normalized_shape}, eps={self.eps}, elementwise_affine={self.elementwise_affine}"
        )


class GELU(Module):
    def __init__(self, approximate: str = "none") -> None:
        super().__init__()
        if approximate not in ("none", "tanh"):
            raise ValueError(f"GELU: approximate must be 'none' or 'tanh', got {approximate!r}")
        self.approximate = approximate

    def forward(self, input: TensorLike) -> Tensor:
        return F.gelu(input, approximate=self.approximate)

    def extra_repr(self) -> str:
        return f"approximate={self.approximate!r}"


class ReLU(Module):
    def __init__(self, inplace: bool = False) -> None:
        super().__init__()
        self.inplace = inplace

    def forward(self, input: TensorLike) -> Tensor:
        return F.relu(input)


class LeakyReLU(Module):
    def __init__(self, negative_slope: float = 0.01, inplace: bool = False) -> None:
        super().__init__()
        self.negative_slope = negative_slope

    def forward(self, input: TensorLike) -> Tensor:
        return F.leaky_relu(input, self.negative_slope)

    def extra_repr(self) -> str:
        return f"negative_slope={self.negative_slope}"


class SiLU(Module):
    def __init__(self, inplace: bool = False) -> None:
        super().__init__()

    def forward(self, input: TensorLike) -> Tensor:
        return F.silu(input)


class Sigmoid(Module):
    def forward(self, input: TensorLike) -> Tensor:
        return F.sigmoid(input)


class Tanh(Module):
    def forward(self, input: TensorLike) -> Tensor:
        return F.tanh(input)


class Softmax(Module):
    def __init__(self, dim: int) -> None:
        super().__init__()
        self.dim = dim

    def forward(self, input: TensorLike) -> Tensor:
        return F.softmax(input, self.dim)

    def extra_repr(self) -> str:
        return f"dim={self.dim}"


class Dropout(Module):
    """Zeroes elements with probability ``p`` in training mode (scaled by 1/(1-p)); the identity
    in eval mode."""

    def __init__(self, p: float = 0.5, inplace: bool = False) -> None:
        super().__init__()
        if not 0.0 <= p <= 1.0:
            raise ValueError(f"Dropout: p must be in [0, 1], got {p}")
        self.p = p
        self.inplace = inplace

    def forward(self, input: TensorLike) -> Tensor:
        return F.dropout(input, self.p, self.training)

    def extra_repr(self) -> str:
        return f"p={self.p}"


class Flatten(Module):
    def __init__(self, start_dim: int = 1, end_dim: int = -1) -> None:
        super().__init__()
        self.start_dim, self.end_dim = start_dim, end_dim

    def forward(self, input: TensorLike) -> Tensor:
        return F.flatten(input, self.start_dim, self.end_dim)


class Sequential(Module):
    """Modules applied in order; built from modules (named "0", "1", ...) or an OrderedDict of
    named modules. Indexable (an int gives a module, a slice a new Sequential), iterable."""

    def __init__(self, *args: Any) -> None:
        super().__init__()
        if len(args) == 1 and isinstance(args[0], OrderedDict):
            for name, m in args[0].items():
                self.add_module(name, m)
        else:
            for i, m in enumerate(args):
                self.add_module(str(i), m)

    def _index(self, idx: int) -> str:
        keys = list(self._modules)
        if not -len(keys) <= idx < len(keys):
            raise IndexError(f"Sequential: index {idx} is out of range for {len(keys)} modules")
        return keys[idx % len(keys)]

    def __getitem__(self, idx: int | slice) -> Any:
        if isinstance(idx, slice):
            return Sequential(OrderedDict(list(self._modules.items())[idx]))
        return self._modules[self._index(int(idx))]

    def __setitem__(self, idx: int, module: Module) -> None:
        self.add_module(self._index(int(idx)), module)

    def __delitem__(self, idx: int | slice) -> None:
        keys = list(self._modules)
        for k in keys[idx] if isinstance(idx, slice) else [self._index(int(idx))]:
            delattr(self, k)
        # renumber the rest "0", "1", ... as torch does
        rest = list(self._modules.values())
        for k in list(self._modules):
            delattr(self, k)
        for i, m in enumerate(rest):
            self.add_module(str(i), m)

    def __len__(self) -> int:
        return len(self._modules)

    def __iter__(self) -> Iterator[Module]:
        return iter(self._modules.values())

    def append(self, module: Module) -> Sequential:
        self.add_module(str(len(self)), module)
        return self

    def forward(self, input: Any) -> Any:
        for m in self._modules.values():
            input = m(input)
        return input


class ModuleList(Module):
    """A list of modules whose parameters are registered (names "0", "1", ...)."""

    def __init__(self, modules: Iterable[Module] | None = None) -> None:
        super().__init__()
        if modules is not None:
            self.extend(modules)

    def _index(self, idx: int) -> str:
        n = len(self._modules)
        if not -n <= idx < n:
            raise IndexError(f"ModuleList: index {idx} is out of range for {n} modules")
        return str(idx % n)

    def __getitem__(self, idx: int | slice) -> Any:
        if isinstance(idx, slice):
            return ModuleList(list(self._modules.values())[idx])
        return self._modules[self._index(int(idx))]

    def __setitem__(self, idx: int, module: Module) -> None:
        self.add_module(self._index(int(idx)), module)

    def __delitem__(self, idx: int | slice) -> None:
        mods = list(self._modules.values())
        del mods[idx if isinstance(idx, slice) else int(self._index(int(idx)))]
        for k in list(self._modules):
            delattr(self, k)
        self.extend(mods)

    def __len__(self) -> int:
        return len(self._modules)

    def __iter__(self) -> Iterator[Module]:
        return iter(self._modules.values())

    def append(self, module: Module) -> ModuleList:
        self.add_module(str(len(self)), module)
        return self

    def extend(self, modules: Iterable[Module]) -> ModuleList:
        for m in modules:
            self.append(m)
        return self

    def insert(self, index: int, module: Module) -> None:
        mods = list(self._modules.values())
        mods.insert(index, module)
        for k in list(self._modules):
            delattr(self, k)
        self.extend(mods)

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        raise NotImplementedError("ModuleList is a container and has no forward()")
