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
    """The identity layer (``torch.nn.Identity``): returns its input unchanged.

    Parameters
    ----------
    *args : object
        Accepted and ignored (as torch), so it can stand in for any layer.
    **kwargs : object
        Accepted and ignored.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__()

    def forward(self, input: TensorLike) -> TensorLike:
        """Return ``input`` itself.

        Parameters
        ----------
        input : object
            Anything.

        Returns
        -------
        object
            ``input``, not copied.
        """
        return input


class Linear(Module):
    """Affine layer ``y = x @ weight.T + bias`` (``torch.nn.Linear``).

    Parameters ``weight`` (out_features, in_features) and ``bias`` (out_features,), as torch's.
    Initialisation as torch: weight ``kaiming_uniform_(a=sqrt(5))``, i.e.
    U(-1/sqrt(in_features), 1/sqrt(in_features)), and bias from the same distribution.

    Parameters
    ----------
    in_features : int
        Size of each input row (>= 0).
    out_features : int
        Size of each output row (>= 0).
    bias : bool, default True
        Whether to learn an additive bias.
    device : str, optional
        ``"cuda"`` moves the parameters to the GPU after initialisation; None or ``"cpu"``
        keeps them on the host.
    dtype : numpy.dtype or type, optional
        float32 (the default, as torch) or float64 (for gradchecks).

    Raises
    ------
    TypeError
        If ``dtype`` is not float32 or float64, or a size is not an int.
    ValueError
        If a size is negative.

    See Also
    --------
    deformnp.functional.linear : The function it applies.
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
        """Re-initialise ``weight`` and ``bias`` as torch's ``Linear`` does.

        ``weight``: ``kaiming_uniform_(a=sqrt(5))``; ``bias``: U(-1/sqrt(in_features),
        1/sqrt(in_features)) (zero when ``in_features`` is 0).
        """
        init.kaiming_uniform_(self.weight, a=math.sqrt(5))
        if self.bias is not None:
            fan_in = self.in_features
            bound = 1 / math.sqrt(fan_in) if fan_in > 0 else 0
            init.uniform_(self.bias, -bound, bound)

    def forward(self, input: TensorLike) -> Tensor:
        """Apply the affine map ``input @ weight.T + bias``.

        Parameters
        ----------
        input : Tensor or array_like, shape (..., in_features)
            In the layer's dtype.

        Returns
        -------
        Tensor, shape (..., out_features)
            Differentiable in ``input``, ``weight`` and ``bias``.

        See Also
        --------
        deformnp.functional.linear : The function it applies.
        """
        return F.linear(input, self.weight, self.bias)

    def extra_repr(self) -> str:
        """Return the layer's settings as shown in its ``repr``.

        Returns
        -------
        str
            The constructor arguments, ``name=value`` separated by commas.
        """
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
        """Re-initialise ``weight`` and ``bias`` as torch's ``Conv2d`` does.

        ``weight``: ``kaiming_uniform_(a=sqrt(5))``, i.e. U(-1/sqrt(fan_in), 1/sqrt(fan_in));
        ``bias``: the same bound; ``fan_in = in_channels / groups * kh * kw``.
        """
        init.kaiming_uniform_(self.weight, a=math.sqrt(5))
        if self.bias is not None:
            fan_in = self.weight.shape[1] * self.kernel_size[0] * self.kernel_size[1]
            if fan_in:
                bound = 1 / math.sqrt(fan_in)
                init.uniform_(self.bias, -bound, bound)

    def extra_repr(self) -> str:
        """Return the layer's settings as shown in its ``repr``.

        Returns
        -------
        str
            The constructor arguments, ``name=value`` separated by commas.
        """
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
    """2-D convolution layer (``torch.nn.Conv2d``).

    Parameters ``weight`` (out_channels, in_channels / groups, kh, kw) and ``bias``
    (out_channels,), as torch's. Initialisation as torch: weight ``kaiming_uniform_(a=sqrt(5))``,
    i.e. U(-1/sqrt(fan_in), 1/sqrt(fan_in)), bias the same bound,
    ``fan_in = in_channels / groups * kh * kw``.

    Parameters
    ----------
    in_channels : int
        Channels of the input (>= 0, divisible by ``groups``).
    out_channels : int
        Channels of the output (>= 0, divisible by ``groups``).
    kernel_size : int or (int, int)
        ``(kh, kw)``; an int for both.
    stride : int or (int, int), default 1
        Step ``(sh, sw)`` between output positions.
    padding : int, (int, int), "valid" or "same", default 0
        Implicit zero padding ``(ph, pw)`` on both sides; ``"valid"`` is 0, ``"same"`` keeps
        H and W (stride 1 only).
    dilation : int or (int, int), default 1
        Spacing ``(dh, dw)`` between kernel points.
    groups : int, default 1
        Channel groups (``groups = in_channels`` is a depthwise convolution).
    bias : bool, default True
        Whether to learn an additive bias.
    padding_mode : str, default "zeros"
        Only ``"zeros"`` is supported.
    device : str, optional
        ``"cuda"`` moves the parameters to the GPU after initialisation; None or ``"cpu"``
        keeps them on the host.
    dtype : numpy.dtype or type, optional
        float32 (the default, as torch) or float64 (for gradchecks).

    Raises
    ------
    ValueError
        If ``padding_mode`` is not ``"zeros"``, ``padding`` is an unknown string, a channel
        count is not divisible by ``groups``, or a size is out of range.
    TypeError
        If ``dtype`` is not float32 or float64, or a size is not an int (pair).

    See Also
    --------
    deformnp.functional.conv2d : The function it applies.
    DeformConv2d : The deformable version.
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
        """Convolve ``input`` with the layer's weight and bias.

        Parameters
        ----------
        input : Tensor or array_like, shape (N, in_channels, H, W) or (in_channels, H, W)
            In the layer's dtype; a 3-d input is one unbatched image.

        Returns
        -------
        Tensor, shape (N, out_channels, Hout, Wout) or (out_channels, Hout, Wout)
            ``Hout = (H + 2*ph - dh*(kh - 1) - 1) // sh + 1``, likewise ``Wout``.

        See Also
        --------
        deformnp.functional.conv2d : The function it applies.
        """
        return F.conv2d(
            input, self.weight, self.bias, self.stride, self.padding, self.dilation, self.groups
        )


class LayerNorm(Module):
    """Layer normalisation over the trailing ``normalized_shape`` dims (``torch.nn.LayerNorm``).

    ``y = (x - mean) / sqrt(var + eps) * weight + bias``, the mean and biased variance over the
    normalised dimensions. Parameters ``weight`` (ones) and ``bias`` (zeros), of shape
    ``normalized_shape``.

    Parameters
    ----------
    normalized_shape : int or sequence of int
        The trailing dimensions to normalise over.
    eps : float, default 1e-5
        Added to the variance.
    elementwise_affine : bool, default True
        Whether to learn ``weight`` and ``bias`` (False: neither).
    bias : bool, default True
        Whether to learn ``bias`` (with ``elementwise_affine``).
    device : str, optional
        ``"cuda"`` moves the parameters to the GPU after initialisation; None or ``"cpu"``
        keeps them on the host.
    dtype : numpy.dtype or type, optional
        float32 (the default, as torch) or float64 (for gradchecks).

    Raises
    ------
    TypeError
        If ``dtype`` is not float32 or float64, or ``normalized_shape`` is not integers.

    See Also
    --------
    deformnp.functional.layer_norm : The function it applies.
    LayerNormProxy : LayerNorm over the channels of an NCHW map.
    """

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
        """Reset ``weight`` to ones and ``bias`` to zeros (where present)."""
        if self.weight is not None:
            init.ones_(self.weight)
        if self.bias is not None:
            init.zeros_(self.bias)

    def forward(self, input: TensorLike) -> Tensor:
        """Normalise ``input`` over its trailing ``normalized_shape`` dimensions.

        Parameters
        ----------
        input : Tensor or array_like, shape (..., normalized_shape)
            Its trailing dimensions are ``normalized_shape``; in the layer's dtype.

        Returns
        -------
        Tensor
            ``input``'s shape; differentiable in ``input``, ``weight`` and ``bias``.

        See Also
        --------
        deformnp.functional.layer_norm : The function it applies.
        """
        return F.layer_norm(input, self.normalized_shape, self.weight, self.bias, self.eps)

    def extra_repr(self) -> str:
        """Return the layer's settings as shown in its ``repr``.

        Returns
        -------
        str
            The constructor arguments, ``name=value`` separated by commas.
        """
        return (
            f"{self.normalized_shape}, eps={self.eps}, elementwise_affine={self.elementwise_affine}"
        )


class GELU(Module):
    """GELU activation layer (``torch.nn.GELU``).

    Parameters
    ----------
    approximate : {"none", "tanh"}, default "none"
        ``"none"``: the exact ``0.5 * x * (1 + erf(x / sqrt(2)))``; ``"tanh"``: torch's tanh
        approximation.

    Raises
    ------
    ValueError
        If ``approximate`` is neither ``"none"`` nor ``"tanh"``.

    See Also
    --------
    deformnp.functional.gelu : The function it applies.
    """

    def __init__(self, approximate: str = "none") -> None:
        super().__init__()
        if approximate not in ("none", "tanh"):
            raise ValueError(f"GELU: approximate must be 'none' or 'tanh', got {approximate!r}")
        self.approximate = approximate

    def forward(self, input: TensorLike) -> Tensor:
        """Apply :func:`deformnp.functional.gelu` elementwise.

        Parameters
        ----------
        input : Tensor or array_like, any shape
            The input.

        Returns
        -------
        Tensor
            ``input``'s shape and dtype.
        """
        return F.gelu(input, approximate=self.approximate)

    def extra_repr(self) -> str:
        """Return the layer's settings as shown in its ``repr``.

        Returns
        -------
        str
            The constructor arguments, ``name=value`` separated by commas.
        """
        return f"approximate={self.approximate!r}"


class ReLU(Module):
    """ReLU activation layer, ``max(x, 0)`` (``torch.nn.ReLU``).

    Parameters
    ----------
    inplace : bool, default False
        Accepted for torch compatibility and ignored (the result is always a new Tensor).

    See Also
    --------
    deformnp.functional.relu : The function it applies.
    """

    def __init__(self, inplace: bool = False) -> None:
        super().__init__()
        self.inplace = inplace

    def forward(self, input: TensorLike) -> Tensor:
        """Apply :func:`deformnp.functional.relu` elementwise.

        Parameters
        ----------
        input : Tensor or array_like, any shape
            The input.

        Returns
        -------
        Tensor
            ``input``'s shape and dtype.
        """
        return F.relu(input)


class LeakyReLU(Module):
    """Leaky ReLU activation layer, ``x if x > 0 else negative_slope * x`` (``torch.nn.LeakyReLU``).

    Parameters
    ----------
    negative_slope : float, default 0.01
        The slope for ``x <= 0``.
    inplace : bool, default False
        Accepted for torch compatibility and ignored.

    See Also
    --------
    deformnp.functional.leaky_relu : The function it applies.
    """

    def __init__(self, negative_slope: float = 0.01, inplace: bool = False) -> None:
        super().__init__()
        self.negative_slope = negative_slope

    def forward(self, input: TensorLike) -> Tensor:
        """Apply :func:`deformnp.functional.leaky_relu` elementwise.

        Parameters
        ----------
        input : Tensor or array_like, any shape
            The input.

        Returns
        -------
        Tensor
            ``input``'s shape and dtype.
        """
        return F.leaky_relu(input, self.negative_slope)

    def extra_repr(self) -> str:
        """Return the layer's settings as shown in its ``repr``.

        Returns
        -------
        str
            The constructor arguments, ``name=value`` separated by commas.
        """
        return f"negative_slope={self.negative_slope}"


class SiLU(Module):
    """SiLU (swish) activation layer, ``x * sigmoid(x)`` (``torch.nn.SiLU``).

    Parameters
    ----------
    inplace : bool, default False
        Accepted for torch compatibility and ignored.

    See Also
    --------
    deformnp.functional.silu : The function it applies.
    """

    def __init__(self, inplace: bool = False) -> None:
        super().__init__()

    def forward(self, input: TensorLike) -> Tensor:
        """Apply :func:`deformnp.functional.silu` elementwise.

        Parameters
        ----------
        input : Tensor or array_like, any shape
            The input.

        Returns
        -------
        Tensor
            ``input``'s shape and dtype.
        """
        return F.silu(input)


class Sigmoid(Module):
    """Sigmoid activation layer, ``1 / (1 + exp(-x))`` (``torch.nn.Sigmoid``).

    See Also
    --------
    deformnp.functional.sigmoid : The function it applies.
    """

    def forward(self, input: TensorLike) -> Tensor:
        """Apply :func:`deformnp.functional.sigmoid` elementwise.

        Parameters
        ----------
        input : Tensor or array_like, any shape
            The input.

        Returns
        -------
        Tensor
            ``input``'s shape and dtype.
        """
        return F.sigmoid(input)


class Tanh(Module):
    """Tanh activation layer (``torch.nn.Tanh``).

    See Also
    --------
    deformnp.functional.tanh : The function it applies.
    """

    def forward(self, input: TensorLike) -> Tensor:
        """Apply :func:`deformnp.functional.tanh` elementwise.

        Parameters
        ----------
        input : Tensor or array_like, any shape
            The input.

        Returns
        -------
        Tensor
            ``input``'s shape and dtype.
        """
        return F.tanh(input)


class Softmax(Module):
    """Softmax layer along one dimension (``torch.nn.Softmax``).

    Parameters
    ----------
    dim : int
        The dimension along which the output sums to 1.

    See Also
    --------
    deformnp.functional.softmax : The function it applies.
    """

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.dim = dim

    def forward(self, input: TensorLike) -> Tensor:
        """Apply the softmax along ``dim``.

        Parameters
        ----------
        input : Tensor or array_like, any shape
            The input.

        Returns
        -------
        Tensor
            ``input``'s shape; non-negative, summing to 1 along ``dim``.

        See Also
        --------
        deformnp.functional.softmax : The function it applies.
        """
        return F.softmax(input, self.dim)

    def extra_repr(self) -> str:
        """Return the layer's settings as shown in its ``repr``.

        Returns
        -------
        str
            The constructor arguments, ``name=value`` separated by commas.
        """
        return f"dim={self.dim}"


class Dropout(Module):
    """Dropout layer (``torch.nn.Dropout``).

    In training mode (see :meth:`Module.train`) each element is zeroed with probability ``p``
    and the others are scaled by ``1 / (1 - p)``; in eval mode it is the identity. The draws
    come from the generator that :func:`deformnp.manual_seed` reseeds.

    Parameters
    ----------
    p : float, default 0.5
        The probability of zeroing an element.
    inplace : bool, default False
        Accepted for torch compatibility and ignored.

    Raises
    ------
    ValueError
        If ``p`` is not in [0, 1].

    See Also
    --------
    deformnp.functional.dropout : The function it applies.
    """

    def __init__(self, p: float = 0.5, inplace: bool = False) -> None:
        super().__init__()
        if not 0.0 <= p <= 1.0:
            raise ValueError(f"Dropout: p must be in [0, 1], got {p}")
        self.p = p
        self.inplace = inplace

    def forward(self, input: TensorLike) -> Tensor:
        """Apply dropout in training mode; return the input unchanged in eval mode.

        Parameters
        ----------
        input : Tensor or array_like, any shape
            float32 or float64 when dropout applies.

        Returns
        -------
        Tensor
            ``input``'s shape; the gradient is masked and scaled like the forward.

        See Also
        --------
        deformnp.functional.dropout : The function it applies.
        """
        return F.dropout(input, self.p, self.training)

    def extra_repr(self) -> str:
        """Return the layer's settings as shown in its ``repr``.

        Returns
        -------
        str
            The constructor arguments, ``name=value`` separated by commas.
        """
        return f"p={self.p}"


class Flatten(Module):
    """Flatten a range of dimensions into one (``torch.nn.Flatten``).

    Parameters
    ----------
    start_dim : int, default 1
        The first dimension to merge (1 keeps the batch dimension, as torch).
    end_dim : int, default -1
        The last dimension to merge (included).

    See Also
    --------
    deformnp.functional.flatten : The function it applies.
    """

    def __init__(self, start_dim: int = 1, end_dim: int = -1) -> None:
        super().__init__()
        self.start_dim, self.end_dim = start_dim, end_dim

    def forward(self, input: TensorLike) -> Tensor:
        """Merge dimensions ``start_dim`` through ``end_dim`` of ``input``.

        Parameters
        ----------
        input : Tensor or array_like, any shape
            The input.

        Returns
        -------
        Tensor
            A reshaped (differentiable) view of ``input``.

        See Also
        --------
        deformnp.functional.flatten : The function it applies.
        """
        return F.flatten(input, self.start_dim, self.end_dim)


class Sequential(Module):
    """A chain of modules applied in order (``torch.nn.Sequential``).

    Built from modules (registered as ``"0"``, ``"1"``, ...) or from one OrderedDict of named
    modules. Indexable (an int gives a module, a slice a new Sequential), assignable and
    deletable by index (the remaining modules are renumbered, as torch), iterable, and
    ``len()`` gives the number of modules.

    Parameters
    ----------
    *args : Module or collections.OrderedDict
        The modules in order, or a single OrderedDict mapping names to modules.
    """

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
        """Append a module at the end (named by its position).

        Parameters
        ----------
        module : Module
            The module to add.

        Returns
        -------
        Sequential
            ``self``.
        """
        self.add_module(str(len(self)), module)
        return self

    def forward(self, input: Any) -> Any:
        """Feed ``input`` through every module in order.

        Parameters
        ----------
        input : object
            The input of the first module (usually a Tensor).

        Returns
        -------
        object
            The output of the last module (``input`` itself for an empty Sequential).
        """
        for m in self._modules.values():
            input = m(input)
        return input


class ModuleList(Module):
    """A list of modules whose parameters are registered (``torch.nn.ModuleList``).

    The modules are registered as ``"0"``, ``"1"``, ...; indexable (a slice gives a new
    ModuleList), assignable, deletable (renumbered), iterable. It has no ``forward``.

    Parameters
    ----------
    modules : iterable of Module, optional
        The initial modules.
    """

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
        """Append a module at the end.

        Parameters
        ----------
        module : Module
            The module to add.

        Returns
        -------
        ModuleList
            ``self``.
        """
        self.add_module(str(len(self)), module)
        return self

    def extend(self, modules: Iterable[Module]) -> ModuleList:
        """Append every module of an iterable.

        Parameters
        ----------
        modules : iterable of Module
            The modules to add, in order.

        Returns
        -------
        ModuleList
            ``self``.
        """
        for m in modules:
            self.append(m)
        return self

    def insert(self, index: int, module: Module) -> None:
        """Insert a module before position ``index`` (the list is renumbered).

        Parameters
        ----------
        index : int
            The position, as in ``list.insert``.
        module : Module
            The module to insert.
        """
        mods = list(self._modules.values())
        mods.insert(index, module)
        for k in list(self._modules):
            delattr(self, k)
        self.extend(mods)

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        """Raise: a ModuleList is a container and has no ``forward``.

        Parameters
        ----------
        *args : object
            Ignored.
        **kwargs : object
            Ignored.

        Returns
        -------
        NoReturn
            Never returns.

        Raises
        ------
        NotImplementedError
            Always.
        """
        raise NotImplementedError("ModuleList is a container and has no forward()")
