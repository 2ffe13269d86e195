"""Deformable convolution layers (SPEC section 6).

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
    """torchvision.ops.DeformConv2d: a deformable convolution whose offsets (and optional v2
    mask) are inputs of ``forward``.

    ``DeformConv2d(in_channels, out_channels, kernel_size, stride=1, padding=0, dilation=1,
    groups=1, bias=True)``; ``forward(input, offset, mask=None)`` is
    ``ops.deform_conv2d(input, offset, weight, bias, stride, padding, dilation, mask)`` with
    offset (B, 2*G*kh*kw, Hout, Wout) and mask (B, G*kh*kw, Hout, Wout) for any number G of
    offset groups dividing in_channels. Initialisation as torchvision: weight
    kaiming_uniform_(a=sqrt(5)), i.e. U(-1/sqrt(fan_in), 1/sqrt(fan_in)), bias the same bound,
    fan_in = in_channels/groups * kh * kw.
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
        """The deformable convolution of ``input`` (B, in_channels, H, W) sampled at ``offset``
        (B, 2*G*kh*kw, Hout, Wout), modulated by ``mask`` (B, G*kh*kw, Hout, Wout) if given:
        ``ops.deform_conv2d`` with this layer's weight, bias and geometry."""
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
    """Shared construction of mmcv's *Pack layers: the main weight (and bias) plus a
    zero-initialised offset/mask predictor ``conv_offset`` with ``n_pred`` * deform_groups *
    kh * kw output channels."""

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
        """mmcv's ``init_weights``."""
        self.init_weights()

    def init_offset(self) -> None:
        """Zero the offset/mask predictor: training starts as a plain convolution."""
        init.zeros_(self.conv_offset.weight)
        init.zeros_(self.conv_offset.bias)

    def init_weights(self) -> None:  # pragma: no cover - overridden
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
        return (
            f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, "
            f"stride={self.stride}, padding={self.padding}, dilation={self.dilation}, "
            f"groups={self.groups}, deform_groups={self.deform_groups}, "
            f"bias={self.bias is not None}"
        )


class DeformConv2dPack(_PackBase):
    """mmcv.ops.DeformConv2dPack: DCN v1 that predicts its own offsets.

    ``DeformConv2dPack(in_channels, out_channels, kernel_size, stride=1, padding=0, dilation=1,
    groups=1, deform_groups=1, bias=False)``. ``conv_offset`` (a Conv2d with the same kernel,
    stride, padding and dilation, 2*deform_groups*kh*kw outputs) predicts the offsets from the
    input; it starts at zero. ``weight`` is initialised as mmcv: kaiming_uniform_ with
    nonlinearity='relu', i.e. U(-sqrt(6/fan_in), sqrt(6/fan_in)). mmcv's DeformConv2d has no
    bias (it asserts ``bias=False``); deformnp allows ``bias=True`` (zero-initialised) as an
    extension.

    ``im2col_step`` (mmcv's batching knob) is accepted and ignored: any batch size works.
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
        init.kaiming_uniform_(self.weight, nonlinearity="relu")
        if self.bias is not None:
            init.zeros_(self.bias)
        self.init_offset()

    def forward(self, x: TensorLike) -> Tensor:
        """The deformable convolution of ``x`` (B, in_channels, H, W) at the offsets that
        ``conv_offset`` predicts from ``x``."""
        offset = self.conv_offset(x)
        return self._deform(x, offset, None)


class ModulatedDeformConv2dPack(_PackBase):
    """mmcv.ops.ModulatedDeformConv2dPack: DCN v2 that predicts its own offsets and mask.

    ``ModulatedDeformConv2dPack(in_channels, out_channels, kernel_size, stride=1, padding=0,
    dilation=1, groups=1, deform_groups=1, bias=True)``. ``conv_offset`` predicts
    3*deform_groups*kh*kw channels from the input: as mmcv, its output is split into three equal
    chunks (o1, o2, m); the offset is cat(o1, o2) (that is, the first 2*G*kh*kw channels, read
    with torchvision's (dy, dx) interleaving) and the mask is sigmoid(m). It starts at zero, so
    the initial layer is a plain convolution scaled by 0.5. ``weight`` is initialised as mmcv:
    U(-1/sqrt(n), 1/sqrt(n)) with n = in_channels * kh * kw; ``bias`` is zero.
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
        n = self.in_channels * self.kernel_size[0] * self.kernel_size[1]
        stdv = 1.0 / math.sqrt(n)
        init.uniform_(self.weight, -stdv, stdv)
        if self.bias is not None:
            init.zeros_(self.bias)
        self.init_offset()

    def offset_and_mask(self, x: TensorLike) -> tuple[Tensor, Tensor]:
        """The predicted offset (B, 2*G*kh*kw, Hout, Wout) and mask (B, G*kh*kw, Hout, Wout)."""
        out = self.conv_offset(x)
        n = 2 * self.deform_groups * self.kernel_size[0] * self.kernel_size[1]
        return out[:, :n], F.sigmoid(out[:, n:])

    def forward(self, x: TensorLike) -> Tensor:
        """The modulated deformable convolution of ``x`` (B, in_channels, H, W) at the offsets
        and with the mask that ``conv_offset`` predicts from ``x``."""
        offset, mask = self.offset_and_mask(x)
        return self._deform(x, offset, mask)
