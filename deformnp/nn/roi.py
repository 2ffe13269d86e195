"""RoI pooling layers (see :doc:`/ops/roi` and :doc:`/ops/deform_roi` for the ops).

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
    """RoI max pooling layer (``torchvision.ops.RoIPool``).

    Mirrors ``torchvision.ops.RoIPool``: the same constructor; ``forward(input, rois)`` is
    :func:`deformnp.ops.roi_pool`. No parameters.

    Parameters
    ----------
    output_size : int or (int, int)
        The bins per RoI, ``(PH, PW)`` (an int for both); at least 1.
    spatial_scale : float
        Scale from box coordinates to the input's pixel coordinates (e.g. 1/16 for a
        stride-16 feature map).

    Raises
    ------
    TypeError
        If an argument has the wrong type.
    ValueError
        If ``output_size`` < 1, ``spatial_scale`` is not finite, or ``sampling_ratio`` > 4096.

    See Also
    --------
    deformnp.ops.roi_pool : The op it applies.

    Notes
    -----
    The pooling rule is derived in :doc:`/ops/roi`.

    """

    def __init__(self, output_size: IntPair, spatial_scale: float) -> None:
        super().__init__()
        _check_pooling(self, output_size, spatial_scale)
        self.output_size = output_size
        self.spatial_scale = spatial_scale

    def forward(self, input: TensorLike, rois: Boxes) -> Tensor:
        """Max-pool ``input`` over each box into ``PH x PW`` bins.

        Parameters
        ----------
        input : Tensor or array_like, shape (N, C, H, W)
            The feature map, float32 or float64.
        rois : array_like, shape (K, 5), or list of array_like, shape (L_i, 4)
            The boxes in input-image coordinates: rows ``(batch_index, x1, y1, x2, y2)``, or one
            array of rows ``(x1, y1, x2, y2)`` per image (the list position is the batch index);
            in ``input``'s dtype; not differentiated.

        Returns
        -------
        Tensor, shape (K, C, PH, PW)
            One pooled map per box, in ``input``'s dtype; differentiable in ``input``.

        Raises
        ------
        ValueError, TypeError
            As :func:`deformnp.ops.roi_pool` (wrong shapes, dtypes or batch indices).

        See Also
        --------
        deformnp.ops.roi_pool : The op it applies; :doc:`/ops/roi` has the math.

        """
        return roi_pool(input, rois, self.output_size, self.spatial_scale)

    def extra_repr(self) -> str:
        """Return the layer's settings as shown in its ``repr``.

        Returns
        -------
        str
            The constructor arguments, ``name=value`` separated by commas.

        """
        return f"output_size={self.output_size}, spatial_scale={self.spatial_scale}"


class RoIAlign(Module):
    """RoI Align layer (``torchvision.ops.RoIAlign``).

    Mirrors ``torchvision.ops.RoIAlign``: the same constructor; ``forward(input, rois)`` is
    :func:`deformnp.ops.roi_align`. No parameters.

    Parameters
    ----------
    output_size : int or (int, int)
        The bins per RoI, ``(PH, PW)`` (an int for both); at least 1.
    spatial_scale : float
        Scale from box coordinates to the input's pixel coordinates (e.g. 1/16 for a
        stride-16 feature map).
    sampling_ratio : int
        Samples per bin along each axis; <= 0 for the adaptive grid ``ceil(roi_h / PH)`` by
        ``ceil(roi_w / PW)``. At most 4096.
    aligned : bool, default False
        True shifts the boxes by -0.5 pixel (pixel centres at integer + 0.5, as torchvision's
        ``aligned=True``) and drops the minimum RoI size of 1.

    Raises
    ------
    TypeError
        If an argument has the wrong type.
    ValueError
        If ``output_size`` < 1, ``spatial_scale`` is not finite, or ``sampling_ratio`` > 4096.

    See Also
    --------
    deformnp.ops.roi_align : The op it applies.

    Notes
    -----
    The pooling rule is derived in :doc:`/ops/roi`.

    """

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
        """Average bilinear samples of ``input`` over each box's ``PH x PW`` bins.

        Parameters
        ----------
        input : Tensor or array_like, shape (N, C, H, W)
            The feature map, float32 or float64.
        rois : array_like, shape (K, 5), or list of array_like, shape (L_i, 4)
            The boxes in input-image coordinates: rows ``(batch_index, x1, y1, x2, y2)``, or one
            array of rows ``(x1, y1, x2, y2)`` per image (the list position is the batch index);
            in ``input``'s dtype; not differentiated.

        Returns
        -------
        Tensor, shape (K, C, PH, PW)
            One pooled map per box, in ``input``'s dtype; differentiable in ``input``.

        Raises
        ------
        ValueError, TypeError
            As :func:`deformnp.ops.roi_align` (wrong shapes, dtypes or batch indices).

        See Also
        --------
        deformnp.ops.roi_align : The op it applies; :doc:`/ops/roi` has the math.

        """
        return roi_align(
            input, rois, self.output_size, self.spatial_scale, self.sampling_ratio, self.aligned
        )

    def extra_repr(self) -> str:
        """Return the layer's settings as shown in its ``repr``.

        Returns
        -------
        str
            The constructor arguments, ``name=value`` separated by commas.

        """
        return (
            f"output_size={self.output_size}, spatial_scale={self.spatial_scale}, "
            f"sampling_ratio={self.sampling_ratio}, aligned={self.aligned}"
        )


class PSRoIPool(Module):
    """Position-sensitive RoI average pooling layer (``torchvision.ops.PSRoIPool``).

    Mirrors ``torchvision.ops.PSRoIPool``: the same constructor; ``forward(input, rois)`` is
    :func:`deformnp.ops.ps_roi_pool`. No parameters.

    Parameters
    ----------
    output_size : int or (int, int)
        The bins per RoI, ``(PH, PW)`` (an int for both); at least 1.
    spatial_scale : float
        Scale from box coordinates to the input's pixel coordinates (e.g. 1/16 for a
        stride-16 feature map).

    Raises
    ------
    TypeError
        If an argument has the wrong type.
    ValueError
        If ``output_size`` < 1, ``spatial_scale`` is not finite, or ``sampling_ratio`` > 4096.

    See Also
    --------
    deformnp.ops.ps_roi_pool : The op it applies.

    Notes
    -----
    The pooling rule is derived in :doc:`/ops/roi`.

    """

    def __init__(self, output_size: IntPair, spatial_scale: float) -> None:
        super().__init__()
        _check_pooling(self, output_size, spatial_scale)
        self.output_size = output_size
        self.spatial_scale = spatial_scale

    def forward(self, input: TensorLike, rois: Boxes) -> Tensor:
        """Average-pool each bin of each box from its own group of input channels.

        Parameters
        ----------
        input : Tensor or array_like, shape (N, C, H, W)
            The feature map, float32 or float64.
        rois : array_like, shape (K, 5), or list of array_like, shape (L_i, 4)
            The boxes in input-image coordinates: rows ``(batch_index, x1, y1, x2, y2)``, or one
            array of rows ``(x1, y1, x2, y2)`` per image (the list position is the batch index);
            in ``input``'s dtype; not differentiated.

        Returns
        -------
        Tensor, shape (K, C / (PH * PW), PH, PW)
            Bin ``(ph, pw)`` of output channel ``c`` pools input channel
            ``(c * PH + ph) * PW + pw``; ``C`` must be divisible by ``PH * PW``. Differentiable in
            ``input``.

        Raises
        ------
        ValueError, TypeError
            As :func:`deformnp.ops.ps_roi_pool` (wrong shapes, dtypes or batch indices).

        See Also
        --------
        deformnp.ops.ps_roi_pool : The op it applies; :doc:`/ops/roi` has the math.

        """
        return ps_roi_pool(input, rois, self.output_size, self.spatial_scale)

    def extra_repr(self) -> str:
        """Return the layer's settings as shown in its ``repr``.

        Returns
        -------
        str
            The constructor arguments, ``name=value`` separated by commas.

        """
        return f"output_size={self.output_size}, spatial_scale={self.spatial_scale}"


class PSRoIAlign(Module):
    """Position-sensitive RoI Align layer (``torchvision.ops.PSRoIAlign``).

    Mirrors ``torchvision.ops.PSRoIAlign``: the same constructor; ``forward(input, rois)`` is
    :func:`deformnp.ops.ps_roi_align`. No parameters.

    Parameters
    ----------
    output_size : int or (int, int)
        The bins per RoI, ``(PH, PW)`` (an int for both); at least 1.
    spatial_scale : float
        Scale from box coordinates to the input's pixel coordinates (e.g. 1/16 for a
        stride-16 feature map).
    sampling_ratio : int
        Samples per bin along each axis; <= 0 for the adaptive grid ``ceil(roi_h / PH)`` by
        ``ceil(roi_w / PW)``. At most 4096.

    Raises
    ------
    TypeError
        If an argument has the wrong type.
    ValueError
        If ``output_size`` < 1, ``spatial_scale`` is not finite, or ``sampling_ratio`` > 4096.

    See Also
    --------
    deformnp.ops.ps_roi_align : The op it applies.

    Notes
    -----
    The pooling rule is derived in :doc:`/ops/roi`.

    """

    def __init__(self, output_size: IntPair, spatial_scale: float, sampling_ratio: int) -> None:
        super().__init__()
        _check_pooling(self, output_size, spatial_scale, sampling_ratio)
        self.output_size = output_size
        self.spatial_scale = spatial_scale
        self.sampling_ratio = sampling_ratio

    def forward(self, input: TensorLike, rois: Boxes) -> Tensor:
        """Average bilinear samples of each bin from its own group of input channels.

        Parameters
        ----------
        input : Tensor or array_like, shape (N, C, H, W)
            The feature map, float32 or float64.
        rois : array_like, shape (K, 5), or list of array_like, shape (L_i, 4)
            The boxes in input-image coordinates: rows ``(batch_index, x1, y1, x2, y2)``, or one
            array of rows ``(x1, y1, x2, y2)`` per image (the list position is the batch index);
            in ``input``'s dtype; not differentiated.

        Returns
        -------
        Tensor, shape (K, C / (PH * PW), PH, PW)
            Bin ``(ph, pw)`` of output channel ``c`` pools input channel
            ``(c * PH + ph) * PW + pw``; ``C`` must be divisible by ``PH * PW``. Differentiable in
            ``input``.

        Raises
        ------
        ValueError, TypeError
            As :func:`deformnp.ops.ps_roi_align` (wrong shapes, dtypes or batch indices).

        See Also
        --------
        deformnp.ops.ps_roi_align : The op it applies; :doc:`/ops/roi` has the math.

        """
        return ps_roi_align(input, rois, self.output_size, self.spatial_scale, self.sampling_ratio)

    def extra_repr(self) -> str:
        """Return the layer's settings as shown in its ``repr``.

        Returns
        -------
        str
            The constructor arguments, ``name=value`` separated by commas.

        """
        return (
            f"output_size={self.output_size}, spatial_scale={self.spatial_scale}, "
            f"sampling_ratio={self.sampling_ratio}"
        )


class DeformRoIPool(Module):
    """Deformable RoI pooling layer, offsets as an input (``mmcv.ops.DeformRoIPool``).

    Mirrors ``mmcv.ops.DeformRoIPool``: the same constructor; ``forward(input, rois,
    offset=None)`` is :func:`deformnp.ops.deform_roi_pool`, RoI Align (``aligned=True``, no
    minimum RoI size) whose bins are shifted by box-relative offsets. No parameters.

    Parameters
    ----------
    output_size : int or (int, int)
        The bins per RoI, ``(PH, PW)`` (an int for both); at least 1.
    spatial_scale : float, default 1.0
        Scale from box coordinates to the input's pixel coordinates (e.g. 1/16 for a
        stride-16 feature map).
    sampling_ratio : int, default 0
        Samples per bin along each axis; <= 0 for the adaptive grid ``ceil(roi_h / PH)`` by
        ``ceil(roi_w / PW)``. At most 4096.
    gamma : float, default 0.1
        Scale of the offsets: bin ``(ph, pw)`` moves by ``gamma * offset * (roi_w, roi_h)``.

    Raises
    ------
    TypeError
        If an argument has the wrong type.
    ValueError
        If ``output_size`` < 1, ``spatial_scale`` is not finite, or ``sampling_ratio`` > 4096.

    See Also
    --------
    deformnp.ops.deform_roi_pool : The op it applies.
    DeformRoIPoolPack : The layer that predicts its offsets.

    Notes
    -----
    The pooling rule is derived in :doc:`/ops/deform_roi`.

    """

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
        """Pool ``input`` over each box, the bins shifted by ``offset``.

        Parameters
        ----------
        input : Tensor or array_like, shape (N, C, H, W)
            The feature map, float32 or float64.
        rois : array_like, shape (K, 5), or list of array_like, shape (L_i, 4)
            The boxes in input-image coordinates: rows ``(batch_index, x1, y1, x2, y2)``, or one
            array of rows ``(x1, y1, x2, y2)`` per image (the list position is the batch index);
            in ``input``'s dtype; not differentiated.
        offset : Tensor or array_like, shape (K, 2, PH, PW), optional
            The normalized shift of each bin: channel 0 is x, channel 1 is y (mmcv's order), in
            ``input``'s dtype. None for no shift.

        Returns
        -------
        Tensor, shape (K, C, PH, PW)
            In ``input``'s dtype; differentiable in ``input`` and ``offset``.

        Raises
        ------
        ValueError, TypeError
            As :func:`deformnp.ops.deform_roi_pool` (wrong shapes, dtypes or batch indices).

        See Also
        --------
        deformnp.ops.deform_roi_pool : The op it applies; :doc:`/ops/deform_roi` has the math.

        """
        return self._pool(input, rois, offset)

    def extra_repr(self) -> str:
        """Return the layer's settings as shown in its ``repr``.

        Returns
        -------
        str
            The constructor arguments, ``name=value`` separated by commas.

        """
        return (
            f"output_size={self.output_size}, spatial_scale={self.spatial_scale}, "
            f"sampling_ratio={self.sampling_ratio}, gamma={self.gamma}"
        )


class DeformRoIPoolPack(DeformRoIPool):
    """Deformable RoI pooling that predicts its own offsets (``mmcv.ops.DeformRoIPoolPack``).

    Mirrors ``mmcv.ops.DeformRoIPoolPack``: the same constructor arguments and parameter
    names, so an mmcv state dict loads by name. ``forward(input, rois)`` pools once without
    offsets, feeds the flattened (K, C*PH*PW) features through ``offset_fc`` =
    Linear(C*PH*PW, fc), ReLU, Linear(fc, fc), ReLU, Linear(fc, 2*PH*PW) (parameters
    ``offset_fc.0``, ``offset_fc.2``, ``offset_fc.4``; the last one zero-initialised, so
    training starts as plain aligned RoI Align), reshapes the result to (K, 2, PH, PW) and pools
    again with those offsets.

    Parameters
    ----------
    output_size : int or (int, int)
        The bins per RoI, ``(PH, PW)`` (an int for both); at least 1.
    output_channels : int
        The channels ``C`` of the input (and of the output), >= 1.
    deform_fc_channels : int, default 1024
        The width ``fc`` of the hidden layers of ``offset_fc``.
    spatial_scale : float, default 1.0
        Scale from box coordinates to the input's pixel coordinates (e.g. 1/16 for a
        stride-16 feature map).
    sampling_ratio : int, default 0
        Samples per bin along each axis; <= 0 for the adaptive grid ``ceil(roi_h / PH)`` by
        ``ceil(roi_w / PW)``. At most 4096.
    gamma : float, default 0.1
        Scale of the offsets: bin ``(ph, pw)`` moves by ``gamma * offset * (roi_w, roi_h)``.
    dtype : numpy.dtype or type, optional
        Keyword-only, a deformnp extra: float32 (the default) or float64, for the parameters;
        the input must have the same dtype.
    device : str, optional
        Keyword-only, a deformnp extra: ``"cuda"`` moves the parameters to the GPU after
        initialisation.

    Raises
    ------
    TypeError
        If an argument has the wrong type.
    ValueError
        If ``output_size`` < 1, ``spatial_scale`` is not finite, or ``sampling_ratio`` > 4096.

    See Also
    --------
    deformnp.ops.deform_roi_pool : The op it applies (twice).
    DeformRoIPool : The layer with offsets as an input.

    Notes
    -----
    The pooling rule is derived in :doc:`/ops/deform_roi`.

    """

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
        """Pool ``input`` over each box, predict offsets from that, and pool again with them.

        Parameters
        ----------
        input : Tensor or array_like, shape (N, C, H, W)
            The feature map, float32 or float64.
        rois : array_like, shape (K, 5), or list of array_like, shape (L_i, 4)
            The boxes in input-image coordinates: rows ``(batch_index, x1, y1, x2, y2)``, or one
            array of rows ``(x1, y1, x2, y2)`` per image (the list position is the batch index);
            in ``input``'s dtype; not differentiated.

        Returns
        -------
        Tensor, shape (K, output_channels, PH, PW)
            In ``input``'s dtype; differentiable in ``input`` and every parameter.

        Raises
        ------
        ValueError
            If ``input`` is not (N, output_channels, H, W), or as
            :func:`deformnp.ops.deform_roi_pool`.
        TypeError
            If ``input``'s dtype is not the parameters' dtype.

        See Also
        --------
        deformnp.ops.deform_roi_pool : The op it applies; :doc:`/ops/deform_roi` has the math.

        """
        input = self._check(input)
        x = self._pool(input, rois, None)
        return self._pool(input, rois, self._offset(x))

    def extra_repr(self) -> str:
        """Return the layer's settings as shown in its ``repr``.

        Returns
        -------
        str
            The constructor arguments, ``name=value`` separated by commas.

        """
        return (
            super().extra_repr()
            + f", output_channels={self.output_channels}, "
            + f"deform_fc_channels={self.deform_fc_channels}"
        )


class ModulatedDeformRoIPoolPack(DeformRoIPoolPack):
    """Deformable RoI pooling with predicted offsets and mask (mmcv's ModulatedDeformRoIPoolPack).

    Mirrors ``mmcv.ops.ModulatedDeformRoIPoolPack``: the same constructor arguments and
    parameter names. As :class:`DeformRoIPoolPack`, plus ``mask_fc`` = Linear(C*PH*PW, fc),
    ReLU, Linear(fc, PH*PW), Sigmoid (mmcv's mask head has one hidden layer; ``mask_fc.2`` is
    zero-initialised, so the mask starts at sigmoid(0) = 0.5 as in mmcv), applied to the first
    pooling; the second pooling is multiplied by the (K, 1, PH, PW) mask.

    Parameters
    ----------
    output_size : int or (int, int)
        The bins per RoI, ``(PH, PW)`` (an int for both); at least 1.
    output_channels : int
        The channels ``C`` of the input (and of the output), >= 1.
    deform_fc_channels : int, default 1024
        The width ``fc`` of the hidden layers of ``offset_fc`` and ``mask_fc``.
    spatial_scale : float, default 1.0
        Scale from box coordinates to the input's pixel coordinates (e.g. 1/16 for a
        stride-16 feature map).
    sampling_ratio : int, default 0
        Samples per bin along each axis; <= 0 for the adaptive grid ``ceil(roi_h / PH)`` by
        ``ceil(roi_w / PW)``. At most 4096.
    gamma : float, default 0.1
        Scale of the offsets: bin ``(ph, pw)`` moves by ``gamma * offset * (roi_w, roi_h)``.
    dtype : numpy.dtype or type, optional
        Keyword-only, a deformnp extra: float32 (the default) or float64, for the parameters;
        the input must have the same dtype.
    device : str, optional
        Keyword-only, a deformnp extra: ``"cuda"`` moves the parameters to the GPU after
        initialisation.

    Raises
    ------
    TypeError
        If an argument has the wrong type.
    ValueError
        If ``output_size`` < 1, ``spatial_scale`` is not finite, or ``sampling_ratio`` > 4096.

    See Also
    --------
    deformnp.ops.deform_roi_pool : The op it applies (twice).

    Notes
    -----
    The pooling rule is derived in :doc:`/ops/deform_roi`.

    """

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
        """Pool with predicted offsets and multiply by the predicted mask.

        Parameters
        ----------
        input : Tensor or array_like, shape (N, C, H, W)
            The feature map, float32 or float64.
        rois : array_like, shape (K, 5), or list of array_like, shape (L_i, 4)
            The boxes in input-image coordinates: rows ``(batch_index, x1, y1, x2, y2)``, or one
            array of rows ``(x1, y1, x2, y2)`` per image (the list position is the batch index);
            in ``input``'s dtype; not differentiated.

        Returns
        -------
        Tensor, shape (K, output_channels, PH, PW)
            ``deform_roi_pool(input, rois, offset) * mask``; differentiable in ``input`` and every
            parameter.

        Raises
        ------
        ValueError
            If ``input`` is not (N, output_channels, H, W), or as
            :func:`deformnp.ops.deform_roi_pool`.
        TypeError
            If ``input``'s dtype is not the parameters' dtype.

        See Also
        --------
        deformnp.ops.deform_roi_pool : The op it applies; :doc:`/ops/deform_roi` has the math.

        """
        input = self._check(input)
        x = self._pool(input, rois, None)
        K = x.shape[0]
        PH, PW = self.output_size
        flat = x.reshape(K, self.output_channels * PH * PW)
        mask = self.mask_fc(flat).reshape(K, 1, PH, PW)
        return self._pool(input, rois, self._offset(x)) * mask
