"""Deformable convolution layers (see :doc:`/ops/deform_conv` for the op).

* :class:`DeformConv2d` is torchvision's ``torchvision.ops.DeformConv2d``: same constructor,
  parameters ``weight`` (out, in/groups, kh, kw) and ``bias`` (out,), same initialisation, and
  ``forward(input, offset, mask=None)`` taking the offsets (and the optional v2 mask).
* :class:`DeformConv2dPack` and :class:`ModulatedDeformConv2dPack` are mmcv's self-contained
  layers (``mmcv.ops.DeformConv2dPack`` / ``ModulatedDeformConv2dPack``): same constructor
  arguments (``deform_groups`` for the offset groups), parameter names (``weight``, ``bias``,
  and ``conv_offset`` for the offset/mask predictor) and initialisation. The predictor is an
  ordinary convolution with the main conv's kernel, stride, padding and dilation whose weight
  and bias start at zero, so training starts as a plain convolution (offsets 0; in the
  modulated form the mask is sigmoid(0) = 0.5 everywhere, exactly as mmcv).

Like the generic layers, parameters are float32 unless ``dtype=np.float64`` is given (the
keyword-only ``dtype`` and ``device`` are deformnp extras; the anchors have none).
"""

from __future__ import annotations

import math
from typing import Any

from .. import functional as F
from ..ops.deform_conv import deform_conv2d
from ..tensor import Tensor
from ..typing import IntPair, TensorLike
from ..validation import integer
from . import init
from .layers import Conv2d, _ConvBase, _finish

__all__ = ["DeformConv2d", "DeformConv2dPack", "ModulatedDeformConv2dPack"]


class DeformConv2d(_ConvBase):
    """Deformable convolution layer, offsets (and v2 mask) as inputs (torchvision's DeformConv2d).

    Mirrors ``torchvision.ops.DeformConv2d``: the same constructor, parameters ``weight``
    (Cout, Cin / groups, kh, kw) and ``bias`` (Cout,), and the same initialisation
    (``kaiming_uniform_(a=sqrt(5))``, i.e. U(-1/sqrt(fan_in), 1/sqrt(fan_in)), bias the same
    bound, ``fan_in = Cin / groups * kh * kw``), so a torchvision state dict loads by name.
    ``forward(input, offset, mask=None)`` is :func:`deformnp.ops.deform_conv2d` with the
    layer's weight, bias and geometry; the number ``G`` of offset groups is read from the
    offset's channels (any ``G`` dividing ``Cin``).

    Parameters
    ----------
    in_channels : int
        Channels ``Cin`` of the input (>= 1, divisible by ``groups``).
    out_channels : int
        Channels ``Cout`` of the output (>= 1, divisible by ``groups``).
    kernel_size : int or (int, int)
        ``(kh, kw)``; an int for both.
    stride : int or (int, int), default 1
        Step ``(sh, sw)`` between output positions.
    padding : int or (int, int), default 0
        Implicit zero padding ``(ph, pw)`` on both sides.
    dilation : int or (int, int), default 1
        Spacing ``(dh, dw)`` between kernel points.
    groups : int, default 1
        Channel groups of the weight (``weight`` is (Cout, Cin / groups, kh, kw)).
    bias : bool, default True
        Whether to learn an additive bias.
    dtype : numpy.dtype or type, optional
        Keyword-only, a deformnp extra: float32 (the default, as torch) or float64.
    device : str, optional
        Keyword-only, a deformnp extra: ``"cuda"`` moves the parameters to the GPU after
        initialisation.

    Raises
    ------
    ValueError
        If a channel count is not divisible by ``groups`` (or, for the Pack layers,
        ``in_channels`` by ``deform_groups``), or a size is out of range.
    TypeError
        If ``dtype`` is not float32 or float64, or a size is not an int (pair).

    See Also
    --------
    deformnp.ops.deform_conv2d : The op it applies.
    DeformConv2d : torchvision's layer, offsets given to ``forward``.
    DeformConv2dPack : mmcv's DCN v1 layer.
    ModulatedDeformConv2dPack : mmcv's DCN v2 layer.

    Notes
    -----
    The formula, the sampling rule and the offset layout are derived in
    :doc:`/ops/deform_conv`.

    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: IntPair,
        stride: IntPair = 1,
        padding: IntPair = 0,
        dilation: IntPair = 1,
        groups: int = 1,
        bias: bool = True,
        *,
        dtype: Any = None,
        device: Any = None,
    ) -> None:
        super().__init__(
            in_channels, out_channels, kernel_size, stride, padding, dilation, groups, bias,
            dtype, min_channels=1,
        )  # fmt: skip
        self.reset_parameters()
        _finish(self, device)

    def forward(
        self, input: TensorLike, offset: TensorLike, mask: TensorLike | None = None
    ) -> Tensor:
        """Apply the deformable convolution at the given offsets (and mask).

        Parameters
        ----------
        input : Tensor or array_like, shape (B, Cin, H, W)
            The feature map, in the layer's dtype.
        offset : Tensor or array_like, shape (B, 2 * G * kh * kw, Hout, Wout)
            Sampling offsets ``(dy, dx)`` interleaved per kernel point and offset group
            (torchvision's layout); ``G`` must divide ``Cin``.
        mask : Tensor or array_like, shape (B, G * kh * kw, Hout, Wout), optional
            Modulation scalars (DCN v2); None means all ones (DCN v1).

        Returns
        -------
        Tensor, shape (B, Cout, Hout, Wout)
            ``Hout = (H + 2*ph - dh*(kh - 1) - 1) // sh + 1``, likewise ``Wout``. Differentiable
            in ``input``, ``offset``, ``mask``, ``weight`` and ``bias``.

        Raises
        ------
        ValueError
            If the shapes are inconsistent (see :func:`deformnp.ops.deform_conv2d`).
        TypeError
            If the dtypes differ or are not float32/float64.

        See Also
        --------
        deformnp.ops.deform_conv2d : The op it applies; :doc:`/ops/deform_conv` has the math.

        """
        return deform_conv2d(
            input,
            offset,
            self.weight,
            self.bias,
            stride=self.stride,
            padding=self.padding,
            dilation=self.dilation,
            mask=mask,
        )

    def extra_repr(self) -> str:
        """Return the layer's settings as shown in its ``repr``.

        Returns
        -------
        str
            The constructor arguments, ``name=value`` separated by commas.

        """
        s = (
            f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, "
            f"stride={self.stride}, padding={self.padding}, dilation={self.dilation}"
        )
        if self.groups != 1:
            s += f", groups={self.groups}"
        if self.bias is None:
            s += ", bias=False"
        return s


class _PackBase(_ConvBase):
    """Shared construction of mmcv's Pack layers: the main weight (and bias) plus ``conv_offset``.

    ``conv_offset`` is a zero-initialised Conv2d with ``n_pred * deform_groups * kh * kw``
    output channels and the main convolution's kernel, stride, padding and dilation.

    """

    n_pred = 2

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: IntPair,
        stride: IntPair,
        padding: IntPair,
        dilation: IntPair,
        groups: int,
        deform_groups: int,
        bias: bool,
        dtype: Any,
        device: Any,
    ) -> None:
        super().__init__(
            in_channels, out_channels, kernel_size, stride, padding, dilation, groups, bias,
            dtype, min_channels=1,
        )  # fmt: skip
        name = type(self).__name__
        self.deform_groups = integer(name, "deform_groups", deform_groups, 1)
        if self.in_channels % self.deform_groups:
            raise ValueError(
                f"{name}: in_channels {self.in_channels} must be divisible by deform_groups "
                f"{self.deform_groups}"
            )
        kh, kw = self.kernel_size
        self.conv_offset = Conv2d(
            self.in_channels,
            self.n_pred * self.deform_groups * kh * kw,
            kernel_size=self.kernel_size,
            stride=self.stride,
            padding=self.padding,
            dilation=self.dilation,
            bias=True,
            dtype=self.weight.dtype,
        )
        self.reset_parameters()
        _finish(self, device)

    def reset_parameters(self) -> None:
        """Re-initialise every parameter (mmcv's ``init_weights``)."""
        self.init_weights()

    def init_offset(self) -> None:
        """Zero the offset/mask predictor: training starts as a plain convolution."""
        init.zeros_(self.conv_offset.weight)
        init.zeros_(self.conv_offset.bias)

    def init_weights(self) -> None:  # pragma: no cover - overridden
        """Initialise the parameters as mmcv does (each Pack layer overrides this)."""
        raise NotImplementedError

    def _deform(self, x: TensorLike, offset: TensorLike, mask: TensorLike | None) -> Tensor:
        return deform_conv2d(
            x,
            offset,
            self.weight,
            self.bias,
            stride=self.stride,
            padding=self.padding,
            dilation=self.dilation,
            mask=mask,
        )

    def extra_repr(self) -> str:
        """Return the layer's settings as shown in its ``repr``.

        Returns
        -------
        str
            The constructor arguments, ``name=value`` separated by commas.

        """
        return (
            f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, "
            f"stride={self.stride}, padding={self.padding}, dilation={self.dilation}, "
            f"groups={self.groups}, deform_groups={self.deform_groups}, "
            f"bias={self.bias is not None}"
        )


class DeformConv2dPack(_PackBase):
    """DCN v1 layer that predicts its own offsets (``mmcv.ops.DeformConv2dPack``).

    Mirrors ``mmcv.ops.DeformConv2dPack``: the same constructor arguments, parameter names
    (``weight``, ``bias``, ``conv_offset.weight``, ``conv_offset.bias``) and initialisation,
    so an mmcv state dict loads by name. ``conv_offset`` is a :class:`Conv2d` with the main
    convolution's kernel, stride, padding and dilation and ``2 * deform_groups * kh * kw``
    outputs that predicts the offsets from the input; its weight and bias start at zero, so
    training starts as a plain convolution. ``weight`` is initialised as mmcv:
    ``kaiming_uniform_`` with ``nonlinearity="relu"``, i.e. U(-sqrt(6/fan_in), sqrt(6/fan_in)).

    Parameters
    ----------
    in_channels : int
        Channels ``Cin`` of the input (>= 1, divisible by ``groups``).
    out_channels : int
        Channels ``Cout`` of the output (>= 1, divisible by ``groups``).
    kernel_size : int or (int, int)
        ``(kh, kw)``; an int for both.
    stride : int or (int, int), default 1
        Step ``(sh, sw)`` between output positions.
    padding : int or (int, int), default 0
        Implicit zero padding ``(ph, pw)`` on both sides.
    dilation : int or (int, int), default 1
        Spacing ``(dh, dw)`` between kernel points.
    groups : int, default 1
        Channel groups of the weight (``weight`` is (Cout, Cin / groups, kh, kw)).
    deform_groups : int, default 1
        Offset groups ``G`` (>= 1, dividing ``in_channels``): each group of ``Cin / G`` input
        channels gets its own offsets.
    bias : bool, default False
        Whether to learn an additive bias (zero-initialised). mmcv's layer has none (it
        asserts ``bias=False``); ``bias=True`` is a deformnp extension.
    im2col_step : int, default 32
        mmcv's batching knob: accepted and ignored (any batch size works).
    dtype : numpy.dtype or type, optional
        Keyword-only, a deformnp extra: float32 (the default, as torch) or float64.
    device : str, optional
        Keyword-only, a deformnp extra: ``"cuda"`` moves the parameters to the GPU after
        initialisation.

    Raises
    ------
    ValueError
        If a channel count is not divisible by ``groups`` (or, for the Pack layers,
        ``in_channels`` by ``deform_groups``), or a size is out of range.
    TypeError
        If ``dtype`` is not float32 or float64, or a size is not an int (pair).

    See Also
    --------
    deformnp.ops.deform_conv2d : The op it applies.
    DeformConv2d : torchvision's layer, offsets given to ``forward``.
    DeformConv2dPack : mmcv's DCN v1 layer.
    ModulatedDeformConv2dPack : mmcv's DCN v2 layer.

    Notes
    -----
    The formula, the sampling rule and the offset layout are derived in
    :doc:`/ops/deform_conv`.

    """

    n_pred = 2

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: IntPair,
        stride: IntPair = 1,
        padding: IntPair = 0,
        dilation: IntPair = 1,
        groups: int = 1,
        deform_groups: int = 1,
        bias: bool = False,
        im2col_step: int = 32,
        *,
        dtype: Any = None,
        device: Any = None,
    ) -> None:
        super().__init__(
            in_channels, out_channels, kernel_size, stride, padding, dilation, groups,
            deform_groups, bias, dtype, device,
        )  # fmt: skip
        self.im2col_step = im2col_step

    def init_weights(self) -> None:
        """Initialise as mmcv: ``weight`` Kaiming-uniform (relu gain), the rest zero.

        ``weight``: ``kaiming_uniform_(nonlinearity="relu")``, U(-sqrt(6/fan_in),
        sqrt(6/fan_in)); ``bias`` (if any) and ``conv_offset``: zero.
        """
        init.kaiming_uniform_(self.weight, nonlinearity="relu")
        if self.bias is not None:
            init.zeros_(self.bias)
        self.init_offset()

    def forward(self, x: TensorLike) -> Tensor:
        """Predict offsets from ``x`` with ``conv_offset`` and apply the deformable convolution.

        Parameters
        ----------
        x : Tensor or array_like, shape (B, Cin, H, W)
            The feature map, in the layer's dtype.

        Returns
        -------
        Tensor, shape (B, Cout, Hout, Wout)
            ``deform_conv2d(x, conv_offset(x), weight, bias, ...)``; differentiable in ``x`` and
            every parameter.

        See Also
        --------
        deformnp.ops.deform_conv2d : The op it applies; :doc:`/ops/deform_conv` has the math.

        """
        offset = self.conv_offset(x)
        return self._deform(x, offset, None)


class ModulatedDeformConv2dPack(_PackBase):
    """DCN v2 layer that predicts its own offsets and mask (``mmcv.ops.ModulatedDeformConv2dPack``).

    Mirrors ``mmcv.ops.ModulatedDeformConv2dPack``: the same constructor arguments, parameter
    names (``weight``, ``bias``, ``conv_offset.weight``, ``conv_offset.bias``) and
    initialisation, so an mmcv state dict loads by name. ``conv_offset`` predicts
    ``3 * deform_groups * kh * kw`` channels from the input; as in mmcv the output is split into
    three equal chunks ``(o1, o2, m)``, the offset is ``cat(o1, o2)`` (the first
    ``2 * G * kh * kw`` channels, read with torchvision's ``(dy, dx)`` interleaving) and the
    mask is ``sigmoid(m)``. ``conv_offset`` starts at zero, so the initial layer is a plain
    convolution scaled by 0.5. ``weight`` is initialised as mmcv: U(-1/sqrt(n), 1/sqrt(n)) with
    ``n = in_channels * kh * kw``; ``bias`` is zero.

    Parameters
    ----------
    in_channels : int
        Channels ``Cin`` of the input (>= 1, divisible by ``groups``).
    out_channels : int
        Channels ``Cout`` of the output (>= 1, divisible by ``groups``).
    kernel_size : int or (int, int)
        ``(kh, kw)``; an int for both.
    stride : int or (int, int), default 1
        Step ``(sh, sw)`` between output positions.
    padding : int or (int, int), default 0
        Implicit zero padding ``(ph, pw)`` on both sides.
    dilation : int or (int, int), default 1
        Spacing ``(dh, dw)`` between kernel points.
    groups : int, default 1
        Channel groups of the weight (``weight`` is (Cout, Cin / groups, kh, kw)).
    deform_groups : int, default 1
        Offset groups ``G`` (>= 1, dividing ``in_channels``).
    bias : bool, default True
        Whether to learn an additive bias (zero-initialised).
    dtype : numpy.dtype or type, optional
        Keyword-only, a deformnp extra: float32 (the default, as torch) or float64.
    device : str, optional
        Keyword-only, a deformnp extra: ``"cuda"`` moves the parameters to the GPU after
        initialisation.

    Raises
    ------
    ValueError
        If a channel count is not divisible by ``groups`` (or, for the Pack layers,
        ``in_channels`` by ``deform_groups``), or a size is out of range.
    TypeError
        If ``dtype`` is not float32 or float64, or a size is not an int (pair).

    See Also
    --------
    deformnp.ops.deform_conv2d : The op it applies.
    DeformConv2d : torchvision's layer, offsets given to ``forward``.
    DeformConv2dPack : mmcv's DCN v1 layer.
    ModulatedDeformConv2dPack : mmcv's DCN v2 layer.

    Notes
    -----
    The formula, the sampling rule and the offset layout are derived in
    :doc:`/ops/deform_conv`.

    """

    n_pred = 3

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: IntPair,
        stride: IntPair = 1,
        padding: IntPair = 0,
        dilation: IntPair = 1,
        groups: int = 1,
        deform_groups: int = 1,
        bias: bool = True,
        *,
        dtype: Any = None,
        device: Any = None,
    ) -> None:
        super().__init__(
            in_channels, out_channels, kernel_size, stride, padding, dilation, groups,
            deform_groups, bias, dtype, device,
        )  # fmt: skip

    def init_weights(self) -> None:
        """Initialise as mmcv: ``weight`` uniform, ``bias`` and ``conv_offset`` zero.

        ``weight``: U(-1/sqrt(n), 1/sqrt(n)) with ``n = in_channels * kh * kw``.
        """
        n = self.in_channels * self.kernel_size[0] * self.kernel_size[1]
        stdv = 1.0 / math.sqrt(n)
        init.uniform_(self.weight, -stdv, stdv)
        if self.bias is not None:
            init.zeros_(self.bias)
        self.init_offset()

    def offset_and_mask(self, x: TensorLike) -> tuple[Tensor, Tensor]:
        """Return the offset and mask that ``conv_offset`` predicts from ``x``.

        Parameters
        ----------
        x : Tensor or array_like, shape (B, Cin, H, W)
            The feature map, in the layer's dtype.

        Returns
        -------
        offset : Tensor, shape (B, 2 * G * kh * kw, Hout, Wout)
            The first ``2 * G * kh * kw`` predicted channels.
        mask : Tensor, shape (B, G * kh * kw, Hout, Wout)
            The sigmoid of the last ``G * kh * kw`` channels.

        """
        out = self.conv_offset(x)
        n = 2 * self.deform_groups * self.kernel_size[0] * self.kernel_size[1]
        return out[:, :n], F.sigmoid(out[:, n:])

    def forward(self, x: TensorLike) -> Tensor:
        """Predict offsets and mask from ``x`` and apply the modulated deformable convolution.

        Parameters
        ----------
        x : Tensor or array_like, shape (B, Cin, H, W)
            The feature map, in the layer's dtype.

        Returns
        -------
        Tensor, shape (B, Cout, Hout, Wout)
            ``deform_conv2d(x, offset, weight, bias, ..., mask=mask)`` with the predictions of
            :meth:`offset_and_mask`; differentiable in ``x`` and every parameter.

        See Also
        --------
        deformnp.ops.deform_conv2d : The op it applies; :doc:`/ops/deform_conv` has the math.

        """
        offset, mask = self.offset_and_mask(x)
        return self._deform(x, offset, mask)
