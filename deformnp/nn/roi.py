"""RoI pooling layers (SPEC sections 7 and 8).

* :class:`RoIPool`, :class:`RoIAlign`, :class:`PSRoIPool`, :class:`PSRoIAlign` are torchvision's
  ``torchvision.ops`` modules: same constructor arguments, ``forward(input, rois)`` with rois a
  (K, 5) array or a list of per-image (L, 4) arrays. They have no parameters.
* :class:`DeformRoIPool`, :class:`DeformRoIPoolPack` and :class:`ModulatedDeformRoIPoolPack` are
  mmcv's (``mmcv.ops``): same constructor arguments and parameter names, so an mmcv state dict
  loads by name.

  - ``DeformRoIPool(output_size, spatial_scale=1.0, sampling_ratio=0, gamma=0.1)``;
    ``forward(input, rois, offset=None)`` with offset (K, 2, PH, PW), channel 0 = x.
  - ``DeformRoIPoolPack(output_size, output_channels, deform_fc_channels=1024, spatial_scale=1.0,
    sampling_ratio=0, gamma=0.1)`` predicts its offsets: it pools once without offsets, feeds
    the flattened (K, C*PH*PW) features through ``offset_fc`` = Linear(C*PH*PW, fc), ReLU,
    Linear(fc, fc), ReLU, Linear(fc, 2*PH*PW) (parameters ``offset_fc.0``, ``offset_fc.2``,
    ``offset_fc.4``; the last one zero-initialised, so training starts as plain aligned RoI
    Align), reshapes to (K, 2, PH, PW) and pools again with those offsets.
  - ``ModulatedDeformRoIPoolPack`` (same arguments) adds ``mask_fc`` = Linear(C*PH*PW, fc), ReLU,
    Linear(fc, PH*PW), Sigmoid (mmcv's mask head has one hidden layer; ``mask_fc.2`` is
    zero-initialised, so the mask starts at sigmoid(0) = 0.5 as in mmcv) and multiplies the
    second pooling by the (K, 1, PH, PW) mask.

Parameters are float32 unless ``dtype=np.float64`` is given (the keyword-only ``dtype`` and
``device`` are deformnp extras).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from ..ops.roi import (
    MAX_SAMPLING_RATIO,
    deform_roi_pool,
    ps_roi_align,
    ps_roi_pool,
    roi_align,
    roi_pool,
)
from ..tensor import Tensor, unwrap
from ..typing import Boxes, IntPair, TensorLike
from ..validation import FLOAT_DTYPES, integer, pair, real
from . import init
from .layers import Linear, ReLU, Sequential, Sigmoid, _dtype, _finish
from .module import Module

__all__ = [
    "RoIPool",
    "RoIAlign",
    "PSRoIPool",
    "PSRoIAlign",
    "DeformRoIPool",
    "DeformRoIPoolPack",
    "ModulatedDeformRoIPoolPack",
]


def _check_pooling(
    layer: Module, output_size: Any, spatial_scale: Any, sampling_ratio: Any = None
) -> None:
    """The constructor arguments every RoI layer shares, checked as the ops check them."""
    name = type(layer).__name__
    pair(name, "output_size", output_size, minimum=1)
    real(name, "spatial_scale", spatial_scale)
    if sampling_ratio is not None:
        integer(name, "sampling_ratio", sampling_ratio, maximum=MAX_SAMPLING_RATIO)


class RoIPool(Module):
    """torchvision.ops.RoIPool: ``forward(input, rois)`` is ``ops.roi_pool``."""

    def __init__(self, output_size: IntPair, spatial_scale: float) -> None:
        super().__init__()
        _check_pooling(self, output_size, spatial_scale)
        self.output_size = output_size
        self.spatial_scale = spatial_scale

    def forward(self, input: TensorLike, rois: Boxes) -> Tensor:
        """``ops.roi_pool(input, rois, output_size, spatial_scale)``."""
        return roi_pool(input, rois, self.output_size, self.spatial_scale)

    def extra_repr(self) -> str:
        return f"output_size={self.output_size}, spatial_scale={self.spatial_scale}"


class RoIAlign(Module):
    """torchvision.ops.RoIAlign: ``forward(input, rois)`` is ``ops.roi_align``."""

    def __init__(
        self,
        output_size: IntPair,
        spatial_scale: float,
        sampling_ratio: int,
        aligned: bool = False,
    ) -> None:
        super().__init__()
        _check_pooling(self, output_size, spatial_scale, sampling_ratio)
        self.output_size = output_size
        self.spatial_scale = spatial_scale
        self.sampling_ratio = sampling_ratio
        self.aligned = aligned

    def forward(self, input: TensorLike, rois: Boxes) -> Tensor:
        """``ops.roi_align(input, rois, output_size, spatial_scale, sampling_ratio, aligned)``."""
        return roi_align(
            input, rois, self.output_size, self.spatial_scale, self.sampling_ratio, self.aligned
        )

    def extra_repr(self) -> str:
        return (
            f"output_size={self.output_size}, spatial_scale={self.spatial_scale}, "
            f"sampling_ratio={self.sampling_ratio}, aligned={self.aligned}"
        )


class PSRoIPool(Module):
    """torchvision.ops.PSRoIPool: ``forward(input, rois)`` is ``ops.ps_roi_pool``."""

    def __init__(self, output_size: IntPair, spatial_scale: float) -> None:
        super().__init__()
        _check_pooling(self, output_size, spatial_scale)
        self.output_size = output_size
        self.spatial_scale = spatial_scale

    def forward(self, input: TensorLike, rois: Boxes) -> Tensor:
        """``ops.ps_roi_pool(input, rois, output_size, spatial_scale)``."""
        return ps_roi_pool(input, rois, self.output_size, self.spatial_scale)

    def extra_repr(self) -> str:
        return f"output_size={self.output_size}, spatial_scale={self.spatial_scale}"


class PSRoIAlign(Module):
    """torchvision.ops.PSRoIAlign: ``forward(input, rois)`` is ``ops.ps_roi_align``."""

    def __init__(self, output_size: IntPair, spatial_scale: float, sampling_ratio: int) -> None:
        super().__init__()
        _check_pooling(self, output_size, spatial_scale, sampling_ratio)
        self.output_size = output_size
        self.spatial_scale = spatial_scale
        self.sampling_ratio = sampling_ratio

    def forward(self, input: TensorLike, rois: Boxes) -> Tensor:
        """``ops.ps_roi_align(input, rois, output_size, spatial_scale, sampling_ratio)``."""
        return ps_roi_align(input, rois, self.output_size, self.spatial_scale, self.sampling_ratio)

    def extra_repr(self) -> str:
        return (
            f"output_size={self.output_size}, spatial_scale={self.spatial_scale}, "
            f"sampling_ratio={self.sampling_ratio}"
        )


class DeformRoIPool(Module):
    """mmcv.ops.DeformRoIPool: ``forward(input, rois, offset=None)`` is ``ops.deform_roi_pool``."""

    def __init__(
        self,
        output_size: IntPair,
        spatial_scale: float = 1.0,
        sampling_ratio: int = 0,
        gamma: float = 0.1,
    ) -> None:
        super().__init__()
        name = type(self).__name__
        _check_pooling(self, output_size, spatial_scale, sampling_ratio)
        self.output_size = pair(name, "output_size", output_size, minimum=1)
        self.spatial_scale = real(name, "spatial_scale", spatial_scale)
        self.sampling_ratio = integer(name, "sampling_ratio", sampling_ratio)
        self.gamma = real(name, "gamma", gamma)

    def _pool(self, input: TensorLike, rois: Boxes, offset: TensorLike | None) -> Tensor:
        return deform_roi_pool(
            input,
            rois,
            offset,
            self.output_size,
            self.spatial_scale,
            self.sampling_ratio,
            self.gamma,
        )

    def forward(self, input: TensorLike, rois: Boxes, offset: TensorLike | None = None) -> Tensor:
        """``ops.deform_roi_pool(input, rois, offset, output_size, spatial_scale,
        sampling_ratio, gamma)``."""
        return self._pool(input, rois, offset)

    def extra_repr(self) -> str:
        return (
            f"output_size={self.output_size}, spatial_scale={self.spatial_scale}, "
            f"sampling_ratio={self.sampling_ratio}, gamma={self.gamma}"
        )


class DeformRoIPoolPack(DeformRoIPool):
    """mmcv.ops.DeformRoIPoolPack: deformable RoI pooling that predicts its own offsets (see the
    module docstring); ``forward(input, rois)``."""

    def __init__(
        self,
        output_size: IntPair,
        output_channels: int,
        deform_fc_channels: int = 1024,
        spatial_scale: float = 1.0,
        sampling_ratio: int = 0,
        gamma: float = 0.1,
        *,
        dtype: Any = None,
        device: Any = None,
    ) -> None:
        super().__init__(output_size, spatial_scale, sampling_ratio, gamma)
        name = type(self).__name__
        dt = _dtype(dtype)
        self.output_channels = integer(name, "output_channels", output_channels, 1)
        self.deform_fc_channels = integer(name, "deform_fc_channels", deform_fc_channels, 1)
        PH, PW = self.output_size
        n_in = PH * PW * self.output_channels
        fc = self.deform_fc_channels
        self.offset_fc = Sequential(
            Linear(n_in, fc, dtype=dt),
            ReLU(inplace=True),
            Linear(fc, fc, dtype=dt),
            ReLU(inplace=True),
            Linear(fc, PH * PW * 2, dtype=dt),
        )
        init.zeros_(self.offset_fc[-1].weight)
        init.zeros_(self.offset_fc[-1].bias)
        _finish(self, device)

    def _check(self, input: TensorLike) -> TensorLike:
        """``input`` (an array-like made an array) if it is (N, output_channels, H, W) in the
        dtype of the layer's parameters; else a ValueError / TypeError naming the layer."""
        name = type(self).__name__
        a = unwrap(input)
        if not hasattr(a, "shape"):
            a = np.asarray(a)
            input = a
        C = a.shape[1] if len(a.shape) == 4 else None
        if C != self.output_channels:
            raise ValueError(
                f"{name}: input must be (N, {self.output_channels}, H, W) "
                f"(output_channels), got shape {tuple(a.shape)}"
            )
        dtype = self.offset_fc[0].weight.dtype
        if np.dtype(a.dtype) not in FLOAT_DTYPES or np.dtype(a.dtype) != dtype:
            raise TypeError(
                f"{name}: input must be {dtype} like the layer's parameters, got "
                f"{np.dtype(a.dtype)}"
            )
        return input

    def _offset(self, x: Tensor) -> Tensor:
        K = x.shape[0]
        PH, PW = self.output_size
        flat = x.reshape(K, self.output_channels * PH * PW)
        return self.offset_fc(flat).reshape(K, 2, PH, PW)

    def forward(self, input: TensorLike, rois: Boxes) -> Tensor:  # type: ignore[override]
        """Pool ``input`` (N, output_channels, H, W) over ``rois`` without offsets, predict the
        offsets from that, and pool again with them: (K, output_channels, PH, PW)."""
        input = self._check(input)
        x = self._pool(input, rois, None)
        return self._pool(input, rois, self._offset(x))

    def extra_repr(self) -> str:
        return (
            super().extra_repr()
            + f", output_channels={self.output_channels}, "
            + f"deform_fc_channels={self.deform_fc_channels}"
        )


class ModulatedDeformRoIPoolPack(DeformRoIPoolPack):
    """mmcv.ops.ModulatedDeformRoIPoolPack: DeformRoIPoolPack whose output is multiplied by a
    predicted sigmoid mask (see the module docstring); ``forward(input, rois)``."""

    def __init__(
        self,
        output_size: IntPair,
        output_channels: int,
        deform_fc_channels: int = 1024,
        spatial_scale: float = 1.0,
        sampling_ratio: int = 0,
        gamma: float = 0.1,
        *,
        dtype: Any = None,
        device: Any = None,
    ) -> None:
        super().__init__(
            output_size,
            output_channels,
            deform_fc_channels,
            spatial_scale,
            sampling_ratio,
            gamma,
            dtype=dtype,
        )
        dt = _dtype(dtype)
        PH, PW = self.output_size
        n_in = PH * PW * self.output_channels
        self.mask_fc = Sequential(
            Linear(n_in, self.deform_fc_channels, dtype=dt),
            ReLU(inplace=True),
            Linear(self.deform_fc_channels, PH * PW, dtype=dt),
            Sigmoid(),
        )
        init.zeros_(self.mask_fc[2].weight)
        init.zeros_(self.mask_fc[2].bias)
        _finish(self, device)

    def forward(self, input: TensorLike, rois: Boxes) -> Tensor:  # type: ignore[override]
        """As :meth:`DeformRoIPoolPack.forward`, the second pooling multiplied by the mask
        predicted from the first."""
        input = self._check(input)
        x = self._pool(input, rois, None)
        K = x.shape[0]
        PH, PW = self.output_size
        flat = x.reshape(K, self.output_channels * PH * PW)
        mask = self.mask_fc(flat).reshape(K, 1, PH, PW)
        return self._pool(input, rois, self._offset(x)) * mask
