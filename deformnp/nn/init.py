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
    """Reseed the generator used by these functions (and by ``functional.dropout``).

    The same function as :func:`deformnp.manual_seed`.

    Parameters
    ----------
    seed : int
        The seed, passed to ``numpy.random.default_rng``.

    Returns
    -------
    numpy.random.Generator
        The new shared generator.
    """
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
    """Return the recommended gain for a nonlinearity (``torch.nn.init.calculate_gain``).

    1 for ``"linear"``, the convolutions (``"conv1d"``, ``"conv2d"``, ``"conv3d"``,
    ``"conv_transpose1d"``, ...) and ``"sigmoid"``; 5/3 for ``"tanh"``; sqrt(2) for
    ``"relu"``; sqrt(2 / (1 + slope**2)) for ``"leaky_relu"``; 3/4 for ``"selu"``.

    Parameters
    ----------
    nonlinearity : str
        The name of the nonlinearity, as above.
    param : float, optional
        The negative slope of ``"leaky_relu"`` (default 0.01); ignored otherwise.

    Returns
    -------
    float
        The gain.

    Raises
    ------
    ValueError
        If ``nonlinearity`` is not one of the names above, or ``param`` is not a number.
    """
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
    """Fill with values drawn from U(a, b) (``torch.nn.init.uniform_``).

    Parameters
    ----------
    tensor : Tensor or numpy.ndarray
        A float32 or float64 Parameter, Tensor or NumPy array, filled in place (its dtype is
        kept).
    a : float, default 0.0
        The lower bound.
    b : float, default 1.0
        The upper bound.
    generator : numpy.random.Generator, optional
        The source of the draws; None uses the generator shared with dropout (see
        :func:`manual_seed`).

    Returns
    -------
    Tensor or numpy.ndarray
        ``tensor`` itself.

    Raises
    ------
    TypeError
        If ``tensor`` is not a Tensor or a NumPy array, or is not floating.
    """
    return _fill(tensor, _rng(generator).uniform(a, b, _array(tensor).shape))


def normal_(
    tensor: Any, mean: float = 0.0, std: float = 1.0, generator: np.random.Generator | None = None
) -> Any:
    """Fill with values drawn from N(mean, std^2) (``torch.nn.init.normal_``).

    Parameters
    ----------
    tensor : Tensor or numpy.ndarray
        A float32 or float64 Parameter, Tensor or NumPy array, filled in place (its dtype is
        kept).
    mean : float, default 0.0
        The mean.
    std : float, default 1.0
        The standard deviation.
    generator : numpy.random.Generator, optional
        The source of the draws; None uses the generator shared with dropout (see
        :func:`manual_seed`).

    Returns
    -------
    Tensor or numpy.ndarray
        ``tensor`` itself.

    Raises
    ------
    TypeError
        If ``tensor`` is not a Tensor or a NumPy array, or is not floating.
    """
    return _fill(tensor, _rng(generator).normal(mean, std, _array(tensor).shape))


def trunc_normal_(
    tensor: Any,
    mean: float = 0.0,
    std: float = 1.0,
    a: float = -2.0,
    b: float = 2.0,
    generator: np.random.Generator | None = None,
) -> Any:
    """Fill with N(mean, std^2) values truncated to [a, b] (``torch.nn.init.trunc_normal_``).

    The bounds are in absolute units, as torch's; the draws use the inverse-CDF method, as
    torch's, and are clipped to [a, b].

    Parameters
    ----------
    tensor : Tensor or numpy.ndarray
        A float32 or float64 Parameter, Tensor or NumPy array, filled in place (its dtype is
        kept).
    mean : float, default 0.0
        The mean of the normal distribution.
    std : float, default 1.0
        Its standard deviation.
    a : float, default -2.0
        The lower bound.
    b : float, default 2.0
        The upper bound.
    generator : numpy.random.Generator, optional
        The source of the draws; None uses the generator shared with dropout (see
        :func:`manual_seed`).

    Returns
    -------
    Tensor or numpy.ndarray
        ``tensor`` itself.

    Raises
    ------
    TypeError
        If ``tensor`` is not a Tensor or a NumPy array, or is not floating.
    """
    from scipy import special as _special  # imported on first use: slow to import

    lo = _special.ndtr((a - mean) / std)
    hi = _special.ndtr((b - mean) / std)
    u = _rng(generator).uniform(lo, hi, _array(tensor).shape)
    values = mean + std * _special.ndtri(u)
    return _fill(tensor, np.clip(values, a, b))


def constant_(tensor: Any, val: float) -> Any:
    """Fill with the value ``val`` (``torch.nn.init.constant_``).

    Parameters
    ----------
    tensor : Tensor or numpy.ndarray
        A float32 or float64 Parameter, Tensor or NumPy array, filled in place (its dtype is
        kept).
    val : float
        The value.

    Returns
    -------
    Tensor or numpy.ndarray
        ``tensor`` itself.

    Raises
    ------
    TypeError
        If ``tensor`` is not a Tensor or a NumPy array, or is not floating.
    """
    return _fill(tensor, val)


def zeros_(tensor: Any) -> Any:
    """Fill with zeros (``torch.nn.init.zeros_``).

    Parameters
    ----------
    tensor : Tensor or numpy.ndarray
        A float32 or float64 Parameter, Tensor or NumPy array, filled in place (its dtype is
        kept).

    Returns
    -------
    Tensor or numpy.ndarray
        ``tensor`` itself.

    Raises
    ------
    TypeError
        If ``tensor`` is not a Tensor or a NumPy array, or is not floating.
    """
    return _fill(tensor, 0.0)


def ones_(tensor: Any) -> Any:
    """Fill with ones (``torch.nn.init.ones_``).

    Parameters
    ----------
    tensor : Tensor or numpy.ndarray
        A float32 or float64 Parameter, Tensor or NumPy array, filled in place (its dtype is
        kept).

    Returns
    -------
    Tensor or numpy.ndarray
        ``tensor`` itself.

    Raises
    ------
    TypeError
        If ``tensor`` is not a Tensor or a NumPy array, or is not floating.
    """
    return _fill(tensor, 1.0)


def eye_(tensor: Any) -> Any:
    """Fill a 2-d tensor with the identity matrix (``torch.nn.init.eye_``).

    Ones on the main diagonal, zeros elsewhere (``numpy.eye`` of the shape; it may be
    rectangular).

    Parameters
    ----------
    tensor : Tensor or numpy.ndarray
        A float32 or float64 Parameter, Tensor or NumPy array, filled in place (its dtype is
        kept).

    Returns
    -------
    Tensor or numpy.ndarray
        ``tensor`` itself.

    Raises
    ------
    TypeError
        If ``tensor`` is not a Tensor or a NumPy array, or is not floating.
    ValueError
        If ``tensor`` is not 2-d.
    """
    a = _array(tensor)
    if a.ndim != 2:
        raise ValueError(f"eye_: only 2-d tensors are supported, got shape {a.shape}")
    return _fill(tensor, np.eye(*a.shape))


def xavier_uniform_(
    tensor: Any, gain: float = 1.0, generator: np.random.Generator | None = None
) -> Any:
    """Fill with Glorot & Bengio's uniform values (``torch.nn.init.xavier_uniform_``).

    Draws from U(-bound, bound) with ``bound = gain * sqrt(6 / (fan_in + fan_out))``.

    The fans are those of torch: ``fan_in = shape[1] * r`` and ``fan_out = shape[0] * r``,
    ``r`` the product of ``shape[2:]`` (the kernel size of a convolution weight).

    Parameters
    ----------
    tensor : Tensor or numpy.ndarray
        A float32 or float64 Parameter, Tensor or NumPy array, filled in place (its dtype is
        kept).
    gain : float, default 1.0
        The scaling factor.
    generator : numpy.random.Generator, optional
        The source of the draws; None uses the generator shared with dropout (see
        :func:`manual_seed`).

    Returns
    -------
    Tensor or numpy.ndarray
        ``tensor`` itself.

    Raises
    ------
    TypeError
        If ``tensor`` is not a Tensor or a NumPy array, or is not floating.
    ValueError
        If ``tensor`` has fewer than 2 dimensions (no fan in / fan out).
    """
    fan_in, fan_out = _calculate_fan_in_and_fan_out(tensor)
    bound = gain * math.sqrt(2.0 / float(fan_in + fan_out)) * math.sqrt(3.0)
    return uniform_(tensor, -bound, bound, generator=generator)


def xavier_normal_(
    tensor: Any, gain: float = 1.0, generator: np.random.Generator | None = None
) -> Any:
    """Fill with Glorot & Bengio's normal values (``torch.nn.init.xavier_normal_``).

    Draws from N(0, std^2) with ``std = gain * sqrt(2 / (fan_in + fan_out))``.

    The fans are those of torch: ``fan_in = shape[1] * r`` and ``fan_out = shape[0] * r``,
    ``r`` the product of ``shape[2:]`` (the kernel size of a convolution weight).

    Parameters
    ----------
    tensor : Tensor or numpy.ndarray
        A float32 or float64 Parameter, Tensor or NumPy array, filled in place (its dtype is
        kept).
    gain : float, default 1.0
        The scaling factor.
    generator : numpy.random.Generator, optional
        The source of the draws; None uses the generator shared with dropout (see
        :func:`manual_seed`).

    Returns
    -------
    Tensor or numpy.ndarray
        ``tensor`` itself.

    Raises
    ------
    TypeError
        If ``tensor`` is not a Tensor or a NumPy array, or is not floating.
    ValueError
        If ``tensor`` has fewer than 2 dimensions (no fan in / fan out).
    """
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
    """Fill with He et al.'s uniform values (``torch.nn.init.kaiming_uniform_``).

    Draws from U(-bound, bound) with ``bound = gain * sqrt(3 / fan)`` and
    ``gain = calculate_gain(nonlinearity, a)``. torch's layers use ``a=sqrt(5)``, which gives
    ``bound = 1/sqrt(fan_in)``. A tensor with a zero fan is left unchanged (torch warns).

    The fans are those of torch: ``fan_in = shape[1] * r`` and ``fan_out = shape[0] * r``,
    ``r`` the product of ``shape[2:]`` (the kernel size of a convolution weight).

    Parameters
    ----------
    tensor : Tensor or numpy.ndarray
        A float32 or float64 Parameter, Tensor or NumPy array, filled in place (its dtype is
        kept).
    a : float, default 0.0
        The negative slope of the leaky_relu that follows (used by ``"leaky_relu"`` only).
    mode : {"fan_in", "fan_out"}, default "fan_in"
        Which fan sets the scale: ``"fan_in"`` preserves the variance of the forward pass,
        ``"fan_out"`` that of the backward pass.
    nonlinearity : str, default "leaky_relu"
        The nonlinearity, as in :func:`calculate_gain`.
    generator : numpy.random.Generator, optional
        The source of the draws; None uses the generator shared with dropout (see
        :func:`manual_seed`).

    Returns
    -------
    Tensor or numpy.ndarray
        ``tensor`` itself.

    Raises
    ------
    TypeError
        If ``tensor`` is not a Tensor or a NumPy array, or is not floating.
    ValueError
        If ``tensor`` has fewer than 2 dimensions, ``mode`` is not ``"fan_in"`` or
        ``"fan_out"``, or ``nonlinearity`` is unknown.
    """
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
    """Fill with He et al.'s normal values (``torch.nn.init.kaiming_normal_``).

    Draws from N(0, std^2) with ``std = gain / sqrt(fan)`` and
    ``gain = calculate_gain(nonlinearity, a)``. A tensor with a zero fan is left unchanged.

    The fans are those of torch: ``fan_in = shape[1] * r`` and ``fan_out = shape[0] * r``,
    ``r`` the product of ``shape[2:]`` (the kernel size of a convolution weight).

    Parameters
    ----------
    tensor : Tensor or numpy.ndarray
        A float32 or float64 Parameter, Tensor or NumPy array, filled in place (its dtype is
        kept).
    a : float, default 0.0
        The negative slope of the leaky_relu that follows (used by ``"leaky_relu"`` only).
    mode : {"fan_in", "fan_out"}, default "fan_in"
        Which fan sets the scale.
    nonlinearity : str, default "leaky_relu"
        The nonlinearity, as in :func:`calculate_gain`.
    generator : numpy.random.Generator, optional
        The source of the draws; None uses the generator shared with dropout (see
        :func:`manual_seed`).

    Returns
    -------
    Tensor or numpy.ndarray
        ``tensor`` itself.

    Raises
    ------
    TypeError
        If ``tensor`` is not a Tensor or a NumPy array, or is not floating.
    ValueError
        If ``tensor`` has fewer than 2 dimensions, ``mode`` is not ``"fan_in"`` or
        ``"fan_out"``, or ``nonlinearity`` is unknown.
    """
    fan = _fan(tensor, mode)
    if fan == 0:
        return tensor
    std = calculate_gain(nonlinearity, a) / math.sqrt(fan)
    return normal_(tensor, 0.0, std, generator=generator)
