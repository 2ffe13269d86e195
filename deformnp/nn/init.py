"""Parameter initialisation with torch.nn.init's names and semantics.

Every function fills its argument in place (a Parameter, a Tensor, or a NumPy array), keeps its
dtype, and returns it. Random ones take ``generator=`` (a ``numpy.random.Generator``); by default
they draw from the module-level generator shared with dropout, which :func:`manual_seed` reseeds.
The draws follow torch's distributions, not its random streams: the same seed gives different
numbers than torch.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from .. import random as _random
from ..tensor import Tensor

__all__ = [
    "manual_seed",
    "calculate_gain",
    "uniform_",
    "normal_",
    "trunc_normal_",
    "constant_",
    "zeros_",
    "ones_",
    "eye_",
    "xavier_uniform_",
    "xavier_normal_",
    "kaiming_uniform_",
    "kaiming_normal_",
]


def manual_seed(seed: int) -> np.random.Generator:
    """Reseed the generator used by these functions (and by ``functional.dropout``)."""
    return _random.manual_seed(seed)


def _rng(generator: np.random.Generator | None) -> np.random.Generator:
    return _random.default_generator() if generator is None else generator


def _array(tensor: Any) -> np.ndarray:
    a = tensor.data if isinstance(tensor, Tensor) else tensor
    if not isinstance(a, np.ndarray):
        raise TypeError(f"init: expected a Tensor or a NumPy array, got {type(tensor).__name__}")
    if a.dtype.kind != "f":
        raise TypeError(f"init: expected a float32 or float64 tensor, got {a.dtype}")
    return a


def _fill(tensor: Any, values: Any) -> Any:
    """Write ``values`` into the tensor's data in place (cast to its dtype) and return it."""
    a = _array(tensor)
    a[...] = np.asarray(values).astype(a.dtype, copy=False)
    return tensor


def calculate_gain(nonlinearity: str, param: float | None = None) -> float:
    """The recommended gain for a nonlinearity (torch.nn.init.calculate_gain)."""
    linear = ("linear", "conv1d", "conv2d", "conv3d", "conv_transpose1d", "conv_transpose2d",
              "conv_transpose3d", "sigmoid")  # fmt: skip
    if nonlinearity in linear:
        return 1.0
    if nonlinearity == "tanh":
        return 5.0 / 3
    if nonlinearity == "relu":
        return math.sqrt(2.0)
    if nonlinearity == "leaky_relu":
        if param is None:
            slope = 0.01
        elif isinstance(param, (int, float)) and not isinstance(param, bool):
            slope = float(param)
        else:
            raise ValueError(f"calculate_gain: negative_slope {param!r} is not a valid number")
        return math.sqrt(2.0 / (1 + slope**2))
    if nonlinearity == "selu":
        return 3.0 / 4
    raise ValueError(f"calculate_gain: unsupported nonlinearity {nonlinearity!r}")


def _calculate_fan_in_and_fan_out(tensor: Any) -> tuple[int, int]:
    shape = _array(tensor).shape
    if len(shape) < 2:
        raise ValueError(
            f"init: fan in and fan out cannot be computed for a tensor with fewer than 2 "
            f"dimensions, got shape {shape}"
        )
    receptive = int(np.prod(shape[2:], dtype=np.int64)) if len(shape) > 2 else 1
    return shape[1] * receptive, shape[0] * receptive


def _fan(tensor: Any, mode: str) -> int:
    if mode not in ("fan_in", "fan_out"):
        raise ValueError(f"init: mode must be 'fan_in' or 'fan_out', got {mode!r}")
    fan_in, fan_out = _calculate_fan_in_and_fan_out(tensor)
    return fan_in if mode == "fan_in" else fan_out


def uniform_(
    tensor: Any, a: float = 0.0, b: float = 1.0, generator: np.random.Generator | None = None
) -> Any:
    """Fill with U(a, b)."""
    return _fill(tensor, _rng(generator).uniform(a, b, _array(tensor).shape))


def normal_(
    tensor: Any, mean: float = 0.0, std: float = 1.0, generator: np.random.Generator | None = None
) -> Any:
    """Fill with N(mean, std^2)."""
    return _fill(tensor, _rng(generator).normal(mean, std, _array(tensor).shape))


def trunc_normal_(
    tensor: Any,
    mean: float = 0.0,
    std: float = 1.0,
    a: float = -2.0,
    b: float = 2.0,
    generator: np.random.Generator | None = None,
) -> Any:
    """Fill with N(mean, std^2) truncated to [a, b] (bounds in absolute units, as torch), by the
    inverse-CDF method."""
    from scipy import special as _special  # imported on first use: slow to import

    lo = _special.ndtr((a - mean) / std)
    hi = _special.ndtr((b - mean) / std)
    u = _rng(generator).uniform(lo, hi, _array(tensor).shape)
    values = mean + std * _special.ndtri(u)
    return _fill(tensor, np.clip(values, a, b))


def constant_(tensor: Any, val: float) -> Any:
    return _fill(tensor, val)


def zeros_(tensor: Any) -> Any:
    return _fill(tensor, 0.0)


def ones_(tensor: Any) -> Any:
    return _fill(tensor, 1.0)


def eye_(tensor: Any) -> Any:
    """Fill a 2-d tensor with the identity matrix."""
    a = _array(tensor)
    if a.ndim != 2:
        raise ValueError(f"eye_: only 2-d tensors are supported, got shape {a.shape}")
    return _fill(tensor, np.eye(*a.shape))


def xavier_uniform_(
    tensor: Any, gain: float = 1.0, generator: np.random.Generator | None = None
) -> Any:
    """U(-a, a) with ``a = gain * sqrt(6 / (fan_in + fan_out))`` (Glorot & Bengio)."""
    fan_in, fan_out = _calculate_fan_in_and_fan_out(tensor)
    bound = gain * math.sqrt(2.0 / float(fan_in + fan_out)) * math.sqrt(3.0)
    return uniform_(tensor, -bound, bound, generator=generator)


def xavier_normal_(
    tensor: Any, gain: float = 1.0, generator: np.random.Generator | None = None
) -> Any:
    """N(0, std^2) with ``std = gain * sqrt(2 / (fan_in + fan_out))``."""
    fan_in, fan_out = _calculate_fan_in_and_fan_out(tensor)
    std = gain * math.sqrt(2.0 / float(fan_in + fan_out))
    return normal_(tensor, 0.0, std, generator=generator)


def kaiming_uniform_(
    tensor: Any,
    a: float = 0.0,
    mode: str = "fan_in",
    nonlinearity: str = "leaky_relu",
    generator: np.random.Generator | None = None,
) -> Any:
    """U(-bound, bound) with ``bound = gain * sqrt(3 / fan)`` (He et al.); ``a`` is the
    leaky_relu slope. torch's layers use ``a=sqrt(5)``, giving ``bound = 1/sqrt(fan_in)``."""
    fan = _fan(tensor, mode)
    if fan == 0:
        return tensor  # torch warns and leaves a zero-element tensor alone
    std = calculate_gain(nonlinearity, a) / math.sqrt(fan)
    bound = math.sqrt(3.0) * std
    return uniform_(tensor, -bound, bound, generator=generator)


def kaiming_normal_(
    tensor: Any,
    a: float = 0.0,
    mode: str = "fan_in",
    nonlinearity: str = "leaky_relu",
    generator: np.random.Generator | None = None,
) -> Any:
    """N(0, std^2) with ``std = gain / sqrt(fan)``."""
    fan = _fan(tensor, mode)
    if fan == 0:
        return tensor
    std = calculate_gain(nonlinearity, a) / math.sqrt(fan)
    return normal_(tensor, 0.0, std, generator=generator)
