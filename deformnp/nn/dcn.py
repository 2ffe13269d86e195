"""The DCNv3 and DCNv4 layers of InternImage and DCNv4 (see :doc:`/ops/dcnv3` and
:doc:`/ops/dcnv4`).

* :class:`DCNv3`: InternImage's ``ops_dcnv3.modules.DCNv3`` (``classification/ops_dcnv3``, the
  variant with ``remove_center``): a depthwise convolution, LayerNorm and GELU predict, per group,
  ``kernel_size**2`` offsets and softmaxed modulation weights from the input; the projected input
  is sampled there (:func:`deformnp.ops.dcnv3.dcnv3`) and projected out.
* :class:`DCNv4`: DCNv4's ``DCNv4.modules.DCNv4``: one ``Linear`` predicts offsets and (not
  softmaxed) modulation weights packed in one tensor (:func:`deformnp.ops.dcnv4.dcnv4`), with an
  optional depthwise convolution in front of it and optional input / output projections.

Both keep their anchor's constructor, attribute and parameter names, so a state dict of the
anchor loads by name (``layer.load_state_dict(torch_module.state_dict())``; torch tensors are
converted), and both take channels-last input as their anchors do.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from .. import functional as F
from ..ops.dcnv3 import dcnv3
from ..ops.dcnv4 import dcnv4
from ..tensor import Tensor
from ..typing import TensorLike
from ..validation import boolean, integer, real
from . import init
from .layers import GELU, Conv2d, LayerNorm, Linear, ReLU, Sequential, SiLU
from .module import Module, Parameter

__all__ = ["DCNv3", "DCNv4"]

#: The ``im2col_step`` both anchors pass to their CUDA functions (the ops accept and ignore it).
_IM2COL_STEP = 256


def _tensor(x: Any) -> Tensor:
    return x if isinstance(x, Tensor) else Tensor(x)


def _remove_center(name: str, v: Any, kernel_size: int) -> int:
    """The anchors' ``int(remove_center)``: a bool, 0 or 1; only with an odd kernel."""
    if isinstance(v, (bool, np.bool_)):
        rc = int(v)
    elif isinstance(v, (int, np.integer)) and int(v) in (0, 1):
        rc = int(v)
    else:
        raise TypeError(f"{name}: remove_center must be a bool (or 0 or 1), got {v!r}")
    if rc and kernel_size % 2 == 0:
        raise ValueError(
            f"{name}: remove_center is only compatible with an odd kernel_size, got {kernel_size}"
        )
    return rc


def _out_size(size: int, kernel: int, stride: int, pad: int, dilation: int) -> int:
    return (size + 2 * pad - (dilation * (kernel - 1) + 1)) // stride + 1


def _check_keeps_size(name: str, layer: Any, H: int, W: int) -> None:
    """The layers predict offsets at every input position: the op's output must be (H, W)."""
    k, s, p, d = layer.kernel_size, layer.stride, layer.pad, layer.dilation
    Ho, Wo = _out_size(H, k, s, p, d), _out_size(W, k, s, p, d)
    if (Ho, Wo) != (H, W):
        raise ValueError(
            f"{name}: the layer predicts offsets at each of the input's (H, W) = ({H}, {W}) "
            f"positions, so the sampling must keep that size, but kernel_size={k}, stride={s}, "
            f"pad={p}, dilation={d} give ({Ho}, {Wo}); use stride=1 and "
            f"pad=dilation*(kernel_size-1)//2"
        )


class ToChannelsLast(Module):
    """Permute (N, C, H, W) to (N, H, W, C): InternImage's ``to_channels_last`` (no parameters)."""

    def forward(self, x: TensorLike) -> Tensor:
        """Return ``x.permute(0, 2, 3, 1)``.

        Parameters
        ----------
        x : Tensor or array_like, shape (N, C, H, W)
            A channels-first map.

        Returns
        -------
        Tensor, shape (N, H, W, C)
            The same values, channels last.
        """
        return _tensor(x).permute(0, 2, 3, 1)


class CenterFeatureScaleModule(Module):
    """The anchors' ``CenterFeatureScaleModule``: ``sigmoid(linear(query, weight, bias))``.

    It has no parameters of its own: the layer passes its ``center_feature_scale_proj_weight``
    and ``center_feature_scale_proj_bias``.
    """

    def forward(
        self,
        query: TensorLike,
        center_feature_scale_proj_weight: TensorLike,
        center_feature_scale_proj_bias: TensorLike,
    ) -> Tensor:
        """Return the per-group blend factor between the sampled and the projected features.

        Parameters
        ----------
        query : Tensor, shape (N, H, W, channels)
            The features the factor is predicted from.
        center_feature_scale_proj_weight : Tensor, shape (group, channels)
            The projection's weight.
        center_feature_scale_proj_bias : Tensor, shape (group,)
            The projection's bias.

        Returns
        -------
        Tensor, shape (N, H, W, group)
            ``sigmoid(query @ weight.T + bias)``.
        """
        return F.sigmoid(
            F.linear(query, center_feature_scale_proj_weight, center_feature_scale_proj_bias)
        )


def _center_feature_scale_parameters(layer: Module, group: int, channels: int, dt: Any) -> None:
    # zeros, as both anchors (a blend factor sigmoid(0) = 0.5 at start)
    layer.center_feature_scale_proj_weight = Parameter(np.zeros((group, channels), dt))
    layer.center_feature_scale_proj_bias = Parameter(np.zeros((group,), dt))
    layer.center_feature_scale_module = CenterFeatureScaleModule()


def _blend(layer: Any, x: Tensor, x_proj: Tensor, query: Tensor) -> Tensor:
    """``x * (1 - s) + x_proj * s`` with ``s`` the per-group factor repeated over its channels."""
    s = layer.center_feature_scale_module(
        query, layer.center_feature_scale_proj_weight, layer.center_feature_scale_proj_bias
    )
    s = s[..., None].repeat(1, 1, 1, 1, layer.channels // layer.group).flatten(-2)
    return x * (1 - s) + x_proj * s


def _check_dtype(name: str, layer_dtype: Any, x: Tensor) -> None:
    if x.dtype != layer_dtype:
        raise TypeError(
            f"{name}: input must be {layer_dtype} like the layer's parameters, got {x.dtype}"
        )


def _build_act_layer(name: str, act_layer: str) -> Module:
    if act_layer == "ReLU":
        return ReLU(inplace=True)
    if act_layer == "SiLU":
        return SiLU(inplace=True)
    if act_layer == "GELU":
        return GELU()
    raise ValueError(f"{name}: act_layer must be 'ReLU', 'SiLU' or 'GELU', got {act_layer!r}")


class DCNv3(Module):
    r"""InternImage's DCNv3 layer (``ops_dcnv3.modules.DCNv3``), channels last.

    Mirrors the module of InternImage's ``classification/ops_dcnv3`` (the variant with
    ``remove_center``): the same constructor, the same sub-layers under the same names, so its
    state dict loads by name:

    * ``dw_conv``: ``Sequential(Conv2d(channels, channels, dw_kernel_size, padding=(dw_kernel_size
      - 1) // 2, groups=channels), Sequential(ToChannelsLast(), LayerNorm(channels, eps=1e-6)),
      act)`` (keys ``dw_conv.0.weight``, ``dw_conv.0.bias``, ``dw_conv.1.1.weight``,
      ``dw_conv.1.1.bias``);
    * ``offset``: channels -> group * P * 2 and ``mask``: channels -> group * P, with
      ``P = kernel_size**2 - remove_center``;
    * ``input_proj``, ``output_proj``: channels -> channels;
    * with ``center_feature_scale``: ``center_feature_scale_proj_weight`` (group, channels) and
      ``center_feature_scale_proj_bias`` (group,), both zero-initialised.

    Initialisation as InternImage's ``_reset_parameters``: ``offset`` and ``mask`` weights and
    biases 0 (so the layer starts sampling the regular grid with equal weights ``1/P``),
    ``input_proj`` and ``output_proj`` weights Xavier-uniform and biases 0; ``dw_conv`` keeps
    torch's default initialisation of ``Conv2d`` and ``LayerNorm``.

    Parameters
    ----------
    channels : int, default 64
        The input and output channels ``C`` (>= 1, divisible by ``group``).
    kernel_size : int, default 3
        The side ``K`` of the square sampling kernel (>= 1).
    dw_kernel_size : int, optional
        The depthwise convolution's kernel (>= 1); None means ``kernel_size``.
    stride : int, default 1
        The sampling stride (>= 1). The layer predicts offsets at every input position, so only
        settings that keep the size work (``stride=1``, ``pad = dilation*(kernel_size-1)//2``);
        others are refused in :meth:`forward`.
    pad : int, default 1
        The implicit zero padding of the sampled map (>= 0).
    dilation : int, default 1
        The spacing of the regular grid's points (>= 1).
    group : int, default 4
        The number ``G`` of groups; each has ``channels // group`` channels and its own offsets
        and weights.
    offset_scale : float, default 1.0
        Scales the regular grid's spread and the offsets (see :doc:`/ops/dcnv3`).
    act_layer : {"GELU", "ReLU", "SiLU"}, default "GELU"
        The activation after ``dw_conv``'s LayerNorm.
    norm_layer : {"LN"}, default "LN"
        The normalisation in ``dw_conv``. InternImage also accepts ``"BN"``; deformnp has no
        batch normalisation, so that is refused.
    center_feature_scale : bool, default False
        Blend the sampled features with the projected input, per group, by a factor predicted
        from ``dw_conv``'s output.
    remove_center : bool, default False
        Drop the centre point of the kernel (``kernel_size`` must be odd).
    device : str, optional
        A deformnp extra: ``"cuda"`` moves the parameters to the GPU after initialisation.
    dtype : numpy.dtype or type, optional
        A deformnp extra: float32 (the default) or float64, for the parameters; the input must
        have the same dtype.

    Raises
    ------
    ValueError
        If a size is out of range, ``channels`` is not divisible by ``group``, ``remove_center``
        is set with an even ``kernel_size``, or ``act_layer`` / ``norm_layer`` is unknown.
    TypeError
        If a size is not an int, ``offset_scale`` is not a real number, a flag is not a bool, or
        ``dtype`` is not float32 or float64.

    See Also
    --------
    deformnp.ops.dcnv3.dcnv3 : The core op.
    DCNv4 : The DCNv4 layer.

    Notes
    -----
    With ``x = input_proj(input)`` and ``q = dw_conv(input)`` (both (N, H, W, C)), the layer
    computes ``output_proj(dcnv3(x, offset(q), softmax_P(mask(q)), ...))``, the softmax taken
    over the ``P`` points of each group. InternImage warns when ``channels // group`` is not a
    power of two (advice about its CUDA kernel); deformnp does not.

    """

    def __init__(
        self,
        channels: int = 64,
        kernel_size: int = 3,
        dw_kernel_size: int | None = None,
        stride: int = 1,
        pad: int = 1,
        dilation: int = 1,
        group: int = 4,
        offset_scale: float = 1.0,
        act_layer: str = "GELU",
        norm_layer: str = "LN",
        center_feature_scale: bool = False,
        remove_center: bool = False,
        device: Any = None,
        dtype: Any = None,
    ) -> None:
        super().__init__()
        name = "DCNv3"
        channels = integer(name, "channels", channels, 1)
        group = integer(name, "group", group, 1)
        if channels % group != 0:
            raise ValueError(
                f"{name}: channels must be divisible by group, but got {channels} and {group}"
            )
        kernel_size = integer(name, "kernel_size", kernel_size, 1)
        if dw_kernel_size is None:
            dw_kernel_size = kernel_size
        dw_kernel_size = integer(name, "dw_kernel_size", dw_kernel_size, 1)
        self.offset_scale = real(name, "offset_scale", offset_scale)
        self.channels = channels
        self.kernel_size = kernel_size
        self.dw_kernel_size = dw_kernel_size
        self.stride = integer(name, "stride", stride, 1)
        self.dilation = integer(name, "dilation", dilation, 1)
        self.pad = integer(name, "pad", pad, 0)
        self.group = group
        self.group_channels = channels // group
        self.center_feature_scale = boolean(name, "center_feature_scale", center_feature_scale)
        self.remove_center = _remove_center(name, remove_center, kernel_size)
        if norm_layer != "LN":
            if norm_layer == "BN":
                raise ValueError(
                    f"{name}: norm_layer must be 'LN' (deformnp has no batch normalisation), "
                    "got 'BN'"
                )
            raise ValueError(f"{name}: norm_layer must be 'LN', got {norm_layer!r}")
        act = _build_act_layer(name, act_layer)

        kw = {"device": None, "dtype": dtype}
        P = kernel_size * kernel_size - self.remove_center
        self.dw_conv = Sequential(
            Conv2d(
                channels,
                channels,
                kernel_size=dw_kernel_size,
                stride=1,
                padding=(dw_kernel_size - 1) // 2,
                groups=channels,
                **kw,
            ),
            Sequential(ToChannelsLast(), LayerNorm(channels, eps=1e-6, **kw)),
            act,
        )
        self.offset = Linear(channels, group * P * 2, **kw)
        self.mask = Linear(channels, group * P, **kw)
        self.input_proj = Linear(channels, channels, **kw)
        self.output_proj = Linear(channels, channels, **kw)
        self._reset_parameters()
        if self.center_feature_scale:
            _center_feature_scale_parameters(self, group, channels, self.offset.weight.dtype)
        if device is not None and device != "cpu":
            self.to(device)

    def _reset_parameters(self) -> None:
        """Re-initialise as InternImage: ``offset`` and ``mask`` zero, the projections
        Xavier-uniform with zero biases."""
        init.constant_(self.offset.weight, 0.0)
        init.constant_(self.offset.bias, 0.0)
        init.constant_(self.mask.weight, 0.0)
        init.constant_(self.mask.bias, 0.0)
        init.xavier_uniform_(self.input_proj.weight)
        init.constant_(self.input_proj.bias, 0.0)
        init.xavier_uniform_(self.output_proj.weight)
        init.constant_(self.output_proj.bias, 0.0)

    def _check_input(self, input: TensorLike) -> Tensor:
        x = _tensor(input)
        if x.ndim != 4 or x.shape[3] != self.channels:
            raise ValueError(
                f"DCNv3: input must be (N, H, W, {self.channels}), got shape {tuple(x.shape)}"
            )
        _check_dtype("DCNv3", self.input_proj.weight.dtype, x)
        _check_keeps_size("DCNv3", self, x.shape[1], x.shape[2])
        return x

    def _offset_and_mask(self, x1: Tensor) -> tuple[Tensor, Tensor]:
        N, H, W, _ = x1.shape
        offset = self.offset(x1)
        P = self.kernel_size * self.kernel_size - self.remove_center
        mask = self.mask(x1).reshape(N, H, W, self.group, P)  # explicit sizes: N may be 0
        mask = F.softmax(mask, -1).reshape(N, H, W, self.group * P)
        return offset, mask

    def offset_and_mask(self, input: TensorLike) -> tuple[Tensor, Tensor]:
        """Return the offsets and softmaxed weights the layer predicts from ``input``.

        Parameters
        ----------
        input : Tensor or array_like, shape (N, H, W, channels)
            The input, channels last, in the layer's dtype.

        Returns
        -------
        offset : Tensor, shape (N, H, W, group * P * 2)
            Per group and point ``(dx, dy)`` in input pixels (before ``offset_scale``), the points
            in the op's order (see :doc:`/ops/dcnv3`).
        mask : Tensor, shape (N, H, W, group * P)
            The modulation weights, summing to 1 over the ``P`` points of each group.

        Raises
        ------
        ValueError
            If ``input`` is not (N, H, W, channels).
        TypeError
            If ``input`` does not have the parameters' dtype.
        """
        x = self._check_input(input)
        return self._offset_and_mask(self.dw_conv(x.permute(0, 3, 1, 2)))

    def sampling_locations(self, input: TensorLike) -> tuple[Tensor, Tensor]:
        """Return where the layer samples, in input pixels, and with which weights.

        Parameters
        ----------
        input : Tensor or array_like, shape (N, H, W, channels)
            The input, channels last, in the layer's dtype.

        Returns
        -------
        locations : Tensor, shape (N, H, W, group, P, 2)
            ``(x, y)`` of every sampling point in pixels of the (unpadded) input, ``(0, 0)``
            the centre of its top-left pixel.
        weights : Tensor, shape (N, H, W, group, P)
            The softmaxed modulation weights.

        Raises
        ------
        ValueError
            If ``input`` is not (N, H, W, channels).
        TypeError
            If ``input`` does not have the parameters' dtype.
        """
        offset, mask = self.offset_and_mask(input)
        N, H, W, _ = offset.shape
        G = self.group
        grid = _regular_grid(self, H, W, offset.dtype)  # (H, W, P, 2)
        P = grid.shape[2]
        loc = grid[:, :, None] + offset.reshape(N, H, W, G, P, 2) * self.offset_scale
        return loc, mask.reshape(N, H, W, G, P)

    def forward(self, input: TensorLike) -> Tensor:
        r"""Sample the projected input at predicted points and project the result.

        Parameters
        ----------
        input : Tensor or array_like, shape (N, H, W, channels)
            The input, channels last (as InternImage's layer), in the layer's dtype.

        Returns
        -------
        Tensor, shape (N, H, W, channels)
            ``output_proj(dcnv3(input_proj(input), offset(q), softmax(mask(q)), ...))`` with
            ``q = dw_conv(input)``; with ``center_feature_scale`` the sampled features ``y`` are
            first blended, per group, as ``y * (1 - s) + input_proj(input) * s``,
            ``s = sigmoid(q @ center_feature_scale_proj_weight.T +
            center_feature_scale_proj_bias)``. Differentiable in ``input`` and every parameter.

        Raises
        ------
        ValueError
            If ``input`` is not (N, H, W, channels), or the layer's ``stride`` / ``pad`` /
            ``dilation`` would not keep (H, W).
        TypeError
            If ``input`` does not have the parameters' dtype.

        See Also
        --------
        deformnp.ops.dcnv3.dcnv3 : The core op; :doc:`/ops/dcnv3` has the math.
        """
        input = self._check_input(input)
        x = self.input_proj(input)
        x_proj = x
        x1 = self.dw_conv(input.permute(0, 3, 1, 2))
        offset, mask = self._offset_and_mask(x1)
        k, s, p, d = self.kernel_size, self.stride, self.pad, self.dilation
        x = dcnv3(
            x, offset, mask, k, k, s, s, p, p, d, d,
            self.group, self.group_channels, self.offset_scale, self.remove_center,
        )  # fmt: skip
        if self.center_feature_scale:
            x = _blend(self, x, x_proj, x1)
        return self.output_proj(x)

    def extra_repr(self) -> str:
        """Return the layer's settings as shown in its ``repr``.

        Returns
        -------
        str
            The constructor arguments, ``name=value`` separated by commas.
        """
        return _repr(self)


def _regular_grid(layer: Any, H: int, W: int, dtype: Any) -> np.ndarray:
    """The points ``p0 + (grid - centre) * offset_scale`` in input pixels, (H, W, P, 2) as
    ``(x, y)``, in the anchors' point order: kernel column ``i`` outer, row ``j`` inner."""
    k, s, p, d = layer.kernel_size, layer.stride, layer.pad, layer.dilation
    half = (d * (k - 1)) // 2
    pts = [
        (i * d - half, j * d - half)
        for i in range(k)
        for j in range(k)
        if not (layer.remove_center and i == k // 2 and j == k // 2)
    ]
    taps = np.asarray(pts, np.float64) * layer.offset_scale  # (P, 2)
    ox = np.arange(W) * s + half - p
    oy = np.arange(H) * s + half - p
    base = np.stack(np.broadcast_arrays(ox[None, :], oy[:, None]), -1)  # (H, W, 2)
    return (base[:, :, None, :] + taps).astype(dtype)


def _repr(layer: Any) -> str:
    s = (
        f"channels={layer.channels}, kernel_size={layer.kernel_size}, stride={layer.stride}, "
        f"pad={layer.pad}, dilation={layer.dilation}, group={layer.group}, "
        f"offset_scale={layer.offset_scale}"
    )
    if layer.dw_kernel_size is not None:
        s += f", dw_kernel_size={layer.dw_kernel_size}"
    if layer.center_feature_scale:
        s += ", center_feature_scale=True"
    if layer.remove_center:
        s += ", remove_center=True"
    return s


class DCNv4(Module):
    r"""DCNv4's layer (``DCNv4.modules.DCNv4``), on flattened channels-last input.

    Mirrors DCNv4's module: the same constructor, the same sub-layers under the same names, so
    its state dict loads by name:

    * ``offset_mask_dw`` (only with ``dw_kernel_size``): ``Conv2d(channels, channels,
      dw_kernel_size, padding=(dw_kernel_size - 1) // 2, groups=channels)``;
    * ``offset_mask``: channels -> ``ceil(3 * K / 8) * 8`` with ``K = group * (kernel_size**2 -
      remove_center)``: per group ``P`` offsets ``(dx, dy)`` then ``P`` weights, the rows past
      ``3 * K`` unused (DCNv4 pads the packed tensor to a multiple of 8);
    * ``value_proj`` (channels -> channels) and ``output_proj`` (channels -> channels, bias
      ``output_bias``), unless ``without_pointwise``;
    * with ``center_feature_scale``: ``center_feature_scale_proj_weight`` (group, channels) and
      ``center_feature_scale_proj_bias`` (group,), both zero-initialised.

    Initialisation as DCNv4's ``_reset_parameters``: ``offset_mask`` weight and bias 0,
    ``value_proj`` and ``output_proj`` weights Xavier-uniform and biases 0; ``offset_mask_dw``
    keeps torch's default initialisation of ``Conv2d``.

    Parameters
    ----------
    channels : int, default 64
        The input and output channels ``C`` (>= 1, divisible by ``group``).
    kernel_size : int, default 3
        The side of the square sampling kernel (>= 1).
    stride : int, default 1
        The sampling stride (>= 1); as in :class:`DCNv3`, only settings that keep (H, W) work.
    pad : int, default 1
        The implicit zero padding of the sampled map (>= 0).
    dilation : int, default 1
        The spacing of the regular grid's points (>= 1).
    group : int, default 4
        The number ``G`` of groups, each with ``channels // group`` channels.
    offset_scale : float, default 1.0
        Scales the regular grid's spread and the offsets (see :doc:`/ops/dcnv4`).
    dw_kernel_size : int, optional
        If given (>= 1), a depthwise convolution of this size is applied to the input before
        ``offset_mask``.
    center_feature_scale : bool, default False
        Blend the sampled features with the projected input, per group, by a factor predicted,
        as DCNv4 does, from the sampled features themselves.
    remove_center : bool, default False
        Drop the centre point of the kernel (``kernel_size`` must be odd).
    output_bias : bool, default True
        Whether ``output_proj`` has a bias.
    without_pointwise : bool, default False
        Leave out ``value_proj`` and ``output_proj``: the input is sampled as it is.
    device : str, optional
        A deformnp extra: ``"cuda"`` moves the parameters to the GPU after initialisation.
    dtype : numpy.dtype or type, optional
        A deformnp extra: float32 (the default) or float64, for the parameters; the input must
        have the same dtype.
    **kwargs : object
        Accepted and ignored, as DCNv4's module does (InternImage's blocks pass arguments meant
        for DCNv3, such as ``act_layer``).

    Raises
    ------
    ValueError
        If a size is out of range, ``channels`` is not divisible by ``group``, or
        ``remove_center`` is set with an even ``kernel_size``.
    TypeError
        If a size is not an int, ``offset_scale`` is not a real number, a flag is not a bool, or
        ``dtype`` is not float32 or float64.

    See Also
    --------
    deformnp.ops.dcnv4.dcnv4 : The core op.
    DCNv3 : The DCNv3 layer (softmaxed weights, a normalised depthwise branch).

    Notes
    -----
    DCNv4 asserts ``(channels // group) % 16 == 0``, a requirement of its CUDA kernels; deformnp's
    kernels have none, so any group width works.

    """

    def __init__(
        self,
        channels: int = 64,
        kernel_size: int = 3,
        stride: int = 1,
        pad: int = 1,
        dilation: int = 1,
        group: int = 4,
        offset_scale: float = 1.0,
        dw_kernel_size: int | None = None,
        center_feature_scale: bool = False,
        remove_center: bool = False,
        output_bias: bool = True,
        without_pointwise: bool = False,
        device: Any = None,
        dtype: Any = None,
        **kwargs: Any,
    ) -> None:
        super().__init__()
        name = "DCNv4"
        channels = integer(name, "channels", channels, 1)
        group = integer(name, "group", group, 1)
        if channels % group != 0:
            raise ValueError(
                f"{name}: channels must be divisible by group, but got {channels} and {group}"
            )
        kernel_size = integer(name, "kernel_size", kernel_size, 1)
        if dw_kernel_size is not None:
            dw_kernel_size = integer(name, "dw_kernel_size", dw_kernel_size, 1)
        self.offset_scale = real(name, "offset_scale", offset_scale)
        self.channels = channels
        self.kernel_size = kernel_size
        self.stride = integer(name, "stride", stride, 1)
        self.dilation = integer(name, "dilation", dilation, 1)
        self.pad = integer(name, "pad", pad, 0)
        self.group = group
        self.group_channels = channels // group
        self.dw_kernel_size = dw_kernel_size
        self.center_feature_scale = boolean(name, "center_feature_scale", center_feature_scale)
        self.remove_center = _remove_center(name, remove_center, kernel_size)
        self.without_pointwise = boolean(name, "without_pointwise", without_pointwise)
        output_bias = boolean(name, "output_bias", output_bias)

        kw = {"device": None, "dtype": dtype}
        self.K = group * (kernel_size * kernel_size - self.remove_center)
        if dw_kernel_size is not None:
            self.offset_mask_dw = Conv2d(
                channels,
                channels,
                dw_kernel_size,
                stride=1,
                padding=(dw_kernel_size - 1) // 2,
                groups=channels,
                **kw,
            )
        self.offset_mask = Linear(channels, int(math.ceil((self.K * 3) / 8) * 8), **kw)
        if not self.without_pointwise:
            self.value_proj = Linear(channels, channels, **kw)
            self.output_proj = Linear(channels, channels, bias=output_bias, **kw)
        self._reset_parameters()
        if self.center_feature_scale:
            _center_feature_scale_parameters(self, group, channels, self.offset_mask.weight.dtype)
        if device is not None and device != "cpu":
            self.to(device)

    def _reset_parameters(self) -> None:
        """Re-initialise as DCNv4: ``offset_mask`` zero, the projections Xavier-uniform with
        zero biases."""
        init.constant_(self.offset_mask.weight, 0.0)
        init.constant_(self.offset_mask.bias, 0.0)
        if not self.without_pointwise:
            init.xavier_uniform_(self.value_proj.weight)
            init.constant_(self.value_proj.bias, 0.0)
            init.xavier_uniform_(self.output_proj.weight)
            if self.output_proj.bias is not None:
                init.constant_(self.output_proj.bias, 0.0)

    def forward(self, input: TensorLike, shape: Any = None) -> Tensor:
        r"""Sample the (projected) input at predicted points and project the result.

        Parameters
        ----------
        input : Tensor or array_like, shape (N, L, channels)
            The input map flattened row-major, channels last (as DCNv4's layer), in the layer's
            dtype.
        shape : (int, int), optional
            ``(H, W)`` with ``H * W = L``; None means a square map, ``H = W = int(L ** 0.5)``.

        Returns
        -------
        Tensor, shape (N, L, channels)
            ``output_proj(dcnv4(value_proj(input), offset_mask(q), ...))`` with ``q`` the input
            (after ``offset_mask_dw`` when ``dw_kernel_size`` is given); without the projections
            when ``without_pointwise``. With ``center_feature_scale`` the sampled features
            ``y`` are first blended, per group, as ``y * (1 - s) + v * s``, ``v`` the (projected)
            input and ``s = sigmoid(y @ center_feature_scale_proj_weight.T +
            center_feature_scale_proj_bias)``. Differentiable in ``input`` and every parameter.

        Raises
        ------
        ValueError
            If ``input`` is not (N, L, channels), ``H * W != L``, or the layer's ``stride`` /
            ``pad`` / ``dilation`` would not keep (H, W).
        TypeError
            If ``input`` does not have the parameters' dtype, or ``shape`` is not two ints.

        See Also
        --------
        deformnp.ops.dcnv4.dcnv4 : The core op; :doc:`/ops/dcnv4` has the math.
        """
        name = "DCNv4"
        input = _tensor(input)
        C = self.channels
        if input.ndim != 3 or input.shape[2] != C:
            raise ValueError(f"{name}: input must be (N, L, {C}), got shape {tuple(input.shape)}")
        _check_dtype(name, self.offset_mask.weight.dtype, input)
        N, L, _ = input.shape
        if shape is not None:
            try:
                H, W = shape
            except (TypeError, ValueError):
                raise TypeError(f"{name}: shape must be (H, W), got {shape!r}") from None
            H, W = integer(name, "shape[0]", H, 0), integer(name, "shape[1]", W, 0)
        else:
            H = W = int(L**0.5)
        if H * W != L:
            raise ValueError(
                f"{name}: input has L = {L} positions, but (H, W) = ({H}, {W})"
                + (" (a square map, as shape is None)" if shape is None else "")
            )
        _check_keeps_size(name, self, H, W)

        x = input
        if not self.without_pointwise:
            x = self.value_proj(x)
        x = x.reshape(N, H, W, C)
        if self.dw_kernel_size is not None:
            q = self.offset_mask_dw(input.reshape(N, H, W, C).permute(0, 3, 1, 2))
            q = q.permute(0, 2, 3, 1).reshape(N, L, C)
        else:
            q = input
        offset_mask = self.offset_mask(q).reshape(N, H, W, self.offset_mask.out_features)
        x_proj = x
        k, s, p, d = self.kernel_size, self.stride, self.pad, self.dilation
        x = dcnv4(
            x, offset_mask, k, k, s, s, p, p, d, d,
            self.group, self.group_channels, self.offset_scale, _IM2COL_STEP, self.remove_center,
        )  # fmt: skip
        if self.center_feature_scale:
            x = _blend(self, x, x_proj, x)
        x = x.reshape(N, L, C)
        if not self.without_pointwise:
            x = self.output_proj(x)
        return x

    def extra_repr(self) -> str:
        """Return the layer's settings as shown in its ``repr``.

        Returns
        -------
        str
            The constructor arguments, ``name=value`` separated by commas.
        """
        s = _repr(self)
        if self.without_pointwise:
            s += ", without_pointwise=True"
        return s
