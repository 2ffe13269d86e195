"""mmcv's deformable layers under mmcv's own names (``mmcv.ops``).

Same constructors (argument order, names and defaults), the same parameter names (so an mmcv
state dict loads by name with :meth:`~deformnp.nn.Module.load_state_dict`), the same
initialisation and the same ``forward`` arguments as mmcv's:

* :class:`DeformConv2d` (DCN v1, offsets given to ``forward``, no bias) and
  :class:`ModulatedDeformConv2d` (DCN v2, offsets and mask given to ``forward``);
* :class:`DeformConv2dPack` and :class:`ModulatedDeformConv2dPack`: deformnp's layers of
  :mod:`deformnp.nn.deform_conv`, which already are mmcv's (``conv_offset`` zero-initialised);
* :class:`RoIAlign` with mmcv's defaults (``sampling_ratio=0``, ``aligned=True``) and
  ``pool_mode='max'``;
* :class:`DeformRoIPool`, :class:`DeformRoIPoolPack`, :class:`ModulatedDeformRoIPoolPack`:
  deformnp's layers of :mod:`deformnp.nn.roi`, which already are mmcv's;
* :class:`MultiScaleDeformableAttention`: mmcv's Deformable-DETR attention module (identity
  residual, dropout, ``query_pos``, ``batch_first``, ``value_proj_ratio``).

The ops are those of :mod:`deformnp.ops.mmcv`; their docstrings list where deformnp keeps the
exact gradient where mmcv does not. Parameters are float32 unless ``dtype=np.float64`` is given
(the keyword-only ``dtype`` and ``device`` are deformnp extras).
"""

from __future__ import annotations

import math
import warnings
from typing import Any

import numpy as np

from .. import functional as F
from ..ops.attention import ms_deform_attn
from ..ops.mmcv import POOL_MODES, deform_conv2d, modulated_deform_conv2d, roi_align
from ..tensor import Tensor, unwrap
from ..typing import ArrayLike, Boxes, IntPair, TensorLike
from ..validation import index_array, integer, real
from . import init
from .deform_conv import DeformConv2dPack, ModulatedDeformConv2dPack
from .layers import Dropout, Linear, _ConvBase, _dtype, _finish
from .module import Module
from .roi import DeformRoIPool, DeformRoIPoolPack, ModulatedDeformRoIPoolPack, _check_pooling

__all__ = [
    "DeformConv2d",
    "DeformConv2dPack",
    "ModulatedDeformConv2d",
    "ModulatedDeformConv2dPack",
    "RoIAlign",
    "DeformRoIPool",
    "DeformRoIPoolPack",
    "ModulatedDeformRoIPoolPack",
    "MultiScaleDeformableAttention",
]


def _tensor(x: Any) -> Tensor:
    return x if isinstance(x, Tensor) else Tensor(x)


class _MMCVConv(_ConvBase):
    """What mmcv's two deformable convolutions share: ``deform_groups`` and the repr."""

    def _setup(self, deform_groups: int) -> None:
        name = type(self).__name__
        self.deform_groups = integer(name, "deform_groups", deform_groups, 1)
        if self.in_channels % self.deform_groups:
            raise ValueError(
                f"{name}: in_channels {self.in_channels} must be divisible by deform_groups "
                f"{self.deform_groups}"
            )

    def extra_repr(self) -> str:
        """Return the layer's settings as shown in its ``repr``.

        Returns
        -------
        str
            The constructor arguments, ``name=value`` separated by commas.

        """
        return (
            f"in_channels={self.in_channels}, out_channels={self.out_channels}, "
            f"kernel_size={self.kernel_size}, stride={self.stride}, padding={self.padding}, "
            f"dilation={self.dilation}, groups={self.groups}, "
            f"deform_groups={self.deform_groups}, bias={self.bias is not None}"
        )


class DeformConv2d(_MMCVConv):
    """Deformable convolution v1, offsets as input, no bias (``mmcv.ops.DeformConv2d``).

    Mirrors ``mmcv.ops.DeformConv2d``: the same constructor, one parameter ``weight``
    (Cout, Cin / groups, kh, kw) initialised with ``kaiming_uniform_(nonlinearity="relu")``, i.e.
    U(-sqrt(6 / fan_in), sqrt(6 / fan_in)) with ``fan_in = Cin / groups * kh * kw``, and
    ``forward(x, offset)`` = :func:`deformnp.ops.mmcv.deform_conv2d`. (Unlike torchvision's
    :class:`deformnp.nn.DeformConv2d`, it has no bias and takes ``deform_groups``.)

    Parameters
    ----------
    in_channels : int
        Channels ``Cin`` of the input (>= 1, divisible by ``groups`` and ``deform_groups``).
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
        Channel groups of the weight.
    deform_groups : int, default 1
        Offset groups: each group of ``Cin / deform_groups`` input channels gets its own
        offsets.
    bias : bool, default False
        Must be False, as mmcv asserts.
    im2col_step : int, default 32
        mmcv's batching knob: kept as an attribute and ignored (any batch size works).
    dtype : numpy.dtype or type, optional
        Keyword-only, a deformnp extra: float32 (the default) or float64.
    device : str, optional
        Keyword-only, a deformnp extra: ``"cuda"`` moves the parameters to the GPU.

    Raises
    ------
    ValueError
        If ``bias`` is true, or a channel count is not divisible by ``groups`` (or
        ``in_channels`` by ``deform_groups``), or a size is out of range.
    TypeError
        If ``dtype`` is not float32 or float64, or a size is not an int (pair).

    See Also
    --------
    deformnp.ops.mmcv.deform_conv2d : The op it applies.
    DeformConv2dPack : The layer that predicts its own offsets.
    ModulatedDeformConv2d : DCN v2.

    Notes
    -----
    mmcv pads an input smaller than the kernel before its CUDA kernel and crops the output;
    deformnp needs no such work-around (the zero-fade rule samples zeros outside the map).
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
        deform_groups: int = 1,
        bias: bool = False,
        im2col_step: int = 32,
        *,
        dtype: Any = None,
        device: Any = None,
    ) -> None:
        name = type(self).__name__
        if bias:
            raise ValueError(f"{name}: bias={bias!r} is not supported (mmcv's layer has no bias)")
        super().__init__(
            in_channels, out_channels, kernel_size, stride, padding, dilation, groups, False,
            dtype, min_channels=1,
        )  # fmt: skip
        self._setup(deform_groups)
        self.im2col_step = integer(name, "im2col_step", im2col_step, 1)
        self.reset_parameters()
        _finish(self, device)

    def reset_parameters(self) -> None:
        """Initialise ``weight`` as mmcv: ``kaiming_uniform_(nonlinearity="relu")``."""
        init.kaiming_uniform_(self.weight, nonlinearity="relu")

    def forward(self, x: TensorLike, offset: TensorLike) -> Tensor:
        """Apply the deformable convolution at the given offsets.

        Parameters
        ----------
        x : Tensor or array_like, shape (B, Cin, H, W)
            The feature map, in the layer's dtype.
        offset : Tensor or array_like, shape (B, 2 * deform_groups * kh * kw, Hout, Wout)
            Offsets ``[y0, x0, y1, x1, ...]`` per kernel point (row-major) and offset group.

        Returns
        -------
        Tensor, shape (B, Cout, Hout, Wout)
            Differentiable in ``x``, ``offset`` and ``weight``.

        Raises
        ------
        ValueError, TypeError
            As :func:`deformnp.ops.mmcv.deform_conv2d`.

        See Also
        --------
        deformnp.ops.mmcv.deform_conv2d : The op it applies.

        """
        return deform_conv2d(
            x, offset, self.weight, self.stride, self.padding, self.dilation, self.groups,
            self.deform_groups, False, self.im2col_step,
        )  # fmt: skip


class ModulatedDeformConv2d(_MMCVConv):
    """Modulated deformable convolution (DCN v2), offsets and mask as inputs
    (``mmcv.ops.ModulatedDeformConv2d``).

    Mirrors ``mmcv.ops.ModulatedDeformConv2d``: the same constructor, parameters ``weight``
    (Cout, Cin / groups, kh, kw) and ``bias`` (Cout,) and mmcv's ``init_weights``: ``weight``
    U(-1/sqrt(n), 1/sqrt(n)) with ``n = in_channels * kh * kw``, ``bias`` zero;
    ``forward(x, offset, mask)`` = :func:`deformnp.ops.mmcv.modulated_deform_conv2d`.

    Parameters
    ----------
    in_channels : int
        Channels ``Cin`` of the input (>= 1, divisible by ``groups`` and ``deform_groups``).
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
        Channel groups of the weight.
    deform_groups : int, default 1
        Offset groups.
    bias : bool, default True
        Whether to learn an additive bias (zero-initialised). mmcv also takes ``'auto'``
        (any true value means a bias here).
    dtype : numpy.dtype or type, optional
        Keyword-only, a deformnp extra: float32 (the default) or float64.
    device : str, optional
        Keyword-only, a deformnp extra: ``"cuda"`` moves the parameters to the GPU.

    Raises
    ------
    ValueError
        If a channel count is not divisible by ``groups`` (or ``in_channels`` by
        ``deform_groups``), or a size is out of range.
    TypeError
        If ``dtype`` is not float32 or float64, or a size is not an int (pair).

    See Also
    --------
    deformnp.ops.mmcv.modulated_deform_conv2d : The op it applies.
    ModulatedDeformConv2dPack : The layer that predicts its own offsets and mask.
    DeformConv2d : DCN v1.

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
        deform_groups: int = 1,
        bias: bool | str = True,
        *,
        dtype: Any = None,
        device: Any = None,
    ) -> None:
        super().__init__(
            in_channels, out_channels, kernel_size, stride, padding, dilation, groups,
            bool(bias), dtype, min_channels=1,
        )  # fmt: skip
        self._setup(deform_groups)
        self.init_weights()
        _finish(self, device)

    def init_weights(self) -> None:
        """Initialise as mmcv: ``weight`` U(-1/sqrt(n), 1/sqrt(n)), ``n = Cin * kh * kw``; bias 0."""
        n = self.in_channels * self.kernel_size[0] * self.kernel_size[1]
        stdv = 1.0 / math.sqrt(n)
        init.uniform_(self.weight, -stdv, stdv)
        if self.bias is not None:
            init.zeros_(self.bias)

    def reset_parameters(self) -> None:
        """Re-initialise every parameter (mmcv's :meth:`init_weights`)."""
        self.init_weights()

    def forward(self, x: TensorLike, offset: TensorLike, mask: TensorLike) -> Tensor:
        """Apply the modulated deformable convolution at the given offsets and mask.

        Parameters
        ----------
        x : Tensor or array_like, shape (B, Cin, H, W)
            The feature map, in the layer's dtype.
        offset : Tensor or array_like, shape (B, 2 * deform_groups * kh * kw, Hout, Wout)
            Offsets ``[y0, x0, y1, x1, ...]`` per kernel point and offset group.
        mask : Tensor or array_like, shape (B, deform_groups * kh * kw, Hout, Wout)
            Modulation scalars.

        Returns
        -------
        Tensor, shape (B, Cout, Hout, Wout)
            Differentiable in ``x``, ``offset``, ``mask``, ``weight`` and ``bias``.

        Raises
        ------
        ValueError, TypeError
            As :func:`deformnp.ops.mmcv.modulated_deform_conv2d`.

        See Also
        --------
        deformnp.ops.mmcv.modulated_deform_conv2d : The op it applies.

        """
        return modulated_deform_conv2d(
            x, offset, mask, self.weight, self.bias, self.stride, self.padding, self.dilation,
            self.groups, self.deform_groups,
        )  # fmt: skip


class RoIAlign(Module):
    """RoI Align layer with mmcv's constructor and defaults (``mmcv.ops.RoIAlign``).

    ``forward(input, rois)`` is :func:`deformnp.ops.mmcv.roi_align`. No parameters. Note
    mmcv's defaults, different from torchvision's :class:`deformnp.nn.RoIAlign`:
    ``spatial_scale=1.0``, ``sampling_ratio=0`` (adaptive) and ``aligned=True``.

    Parameters
    ----------
    output_size : int or (int, int)
        The bins per RoI, ``(PH, PW)``; at least 1. Stored as a pair, as mmcv's ``_pair``.
    spatial_scale : float, default 1.0
        Scale from box coordinates to the input's pixel coordinates.
    sampling_ratio : int, default 0
        Samples per bin along each axis; <= 0 for the adaptive grid. At most 4096.
    pool_mode : {'avg', 'max'}, default 'avg'
        Average or maximum of each bin's bilinear samples (``'max'`` runs on the CPU).
    aligned : bool, default True
        True shifts the boxes by -0.5 pixel and drops the minimum RoI size of 1.
    use_torchvision : bool, default False
        mmcv then calls torchvision's ``roi_align``, which averages whatever ``pool_mode`` says;
        here likewise: True means average pooling (the same numbers; torchvision is not needed).

    Raises
    ------
    ValueError
        If ``pool_mode`` is not ``'avg'`` or ``'max'``, ``output_size`` < 1, ``spatial_scale`` is
        not finite, or ``sampling_ratio`` > 4096.
    TypeError
        If an argument has the wrong type.

    See Also
    --------
    deformnp.ops.mmcv.roi_align : The op it applies.
    deformnp.nn.RoIAlign : torchvision's layer.

    """

    def __init__(
        self,
        output_size: IntPair,
        spatial_scale: float = 1.0,
        sampling_ratio: int = 0,
        pool_mode: str = "avg",
        aligned: bool = True,
        use_torchvision: bool = False,
    ) -> None:
        super().__init__()
        name = type(self).__name__
        _check_pooling(self, output_size, spatial_scale, sampling_ratio)
        if not isinstance(pool_mode, str) or pool_mode not in POOL_MODES:
            raise ValueError(f"{name}: pool_mode must be 'avg' or 'max', got {pool_mode!r}")
        self.output_size = (
            (int(output_size), int(output_size))
            if isinstance(output_size, (int, np.integer))
            else tuple(int(v) for v in output_size)
        )
        self.spatial_scale = float(spatial_scale)
        self.sampling_ratio = int(sampling_ratio)
        self.pool_mode = pool_mode
        self.aligned = aligned
        self.use_torchvision = use_torchvision

    def forward(self, input: TensorLike, rois: Boxes) -> Tensor:
        """Pool ``input`` over each box's ``PH x PW`` bins.

        Parameters
        ----------
        input : Tensor or array_like, shape (N, C, H, W)
            The feature map, float32 or float64.
        rois : array_like, shape (K, 5)
            Rows ``(batch_index, x1, y1, x2, y2)`` in input-image coordinates; not
            differentiated.

        Returns
        -------
        Tensor, shape (K, C, PH, PW)
            In ``input``'s dtype; differentiable in ``input``.

        Raises
        ------
        ValueError, TypeError
            As :func:`deformnp.ops.mmcv.roi_align`.

        See Also
        --------
        deformnp.ops.mmcv.roi_align : The op it applies.

        """
        mode = "avg" if self.use_torchvision else self.pool_mode
        return roi_align(
            input, rois, self.output_size, self.spatial_scale, self.sampling_ratio, mode,
            self.aligned,
        )  # fmt: skip

    def extra_repr(self) -> str:
        """Return the layer's settings as shown in its ``repr``.

        Returns
        -------
        str
            The constructor arguments, ``name=value`` separated by commas.

        """
        return (
            f"output_size={self.output_size}, spatial_scale={self.spatial_scale}, "
            f"sampling_ratio={self.sampling_ratio}, pool_mode={self.pool_mode}, "
            f"aligned={self.aligned}, use_torchvision={self.use_torchvision}"
        )


class MultiScaleDeformableAttention(Module):
    r"""mmcv's multi-scale deformable attention module (``mmcv.ops.MultiScaleDeformableAttention``).

    Mirrors mmcv's module: the same constructor, sub-layers (:class:`~deformnp.nn.Linear`) under
    the same names, so its state dict loads by name:

    * ``sampling_offsets``: embed_dims -> num_heads * num_levels * num_points * 2;
    * ``attention_weights``: embed_dims -> num_heads * num_levels * num_points;
    * ``value_proj``: embed_dims -> ``int(embed_dims * value_proj_ratio)``;
    * ``output_proj``: that -> embed_dims;

    plus ``dropout`` (:class:`~deformnp.nn.Dropout`, no parameters). :meth:`init_weights` is
    mmcv's: ``sampling_offsets`` weight 0 and bias the direction :math:`(\cos, \sin)(2\pi m / M)`
    of head :math:`m` over its largest absolute component, times :math:`p + 1` for point
    :math:`p`, every level alike (in float32, as mmcv); ``attention_weights`` 0;
    ``value_proj`` and ``output_proj`` Xavier-uniform with zero bias. The core is
    :func:`deformnp.ops.ms_deform_attn` (mmcv's ``multi_scale_deformable_attn_pytorch`` and CUDA
    kernel compute the same), so gradients flow to every parameter and to ``query``,
    ``value``, ``identity``, ``query_pos`` and ``reference_points``.

    Parameters
    ----------
    embed_dims : int, default 256
        Channels of the queries and values (>= 1, divisible by ``num_heads``).
    num_heads : int, default 8
        Attention heads ``M``.
    num_levels : int, default 4
        Feature levels ``L``.
    num_points : int, default 4
        Sampling points ``P`` per head and level.
    im2col_step : int, default 64
        mmcv's CUDA batching knob: kept as an attribute and ignored.
    dropout : float, default 0.1
        Dropout probability on the output before the identity is added (training mode only).
    batch_first : bool, default False
        True: ``query``, ``value`` and the output are (bs, n, embed_dims); False: (n, bs,
        embed_dims).
    norm_cfg : dict, optional
        Accepted and unused, as in mmcv.
    init_cfg : dict, optional
        mmengine's initialisation config: kept as an attribute and unused (deformnp has no
        mmengine); :meth:`init_weights` runs at construction as in mmcv.
    value_proj_ratio : float, default 1.0
        ``value_proj`` has ``int(embed_dims * value_proj_ratio)`` outputs (divisible by
        ``num_heads``).
    dtype : numpy.dtype or type, optional
        Keyword-only, a deformnp extra: float32 (the default) or float64.
    device : str, optional
        Keyword-only, a deformnp extra: ``"cuda"`` moves the parameters to the GPU.

    Raises
    ------
    ValueError
        If a size is < 1, ``embed_dims`` is not divisible by ``num_heads`` (mmcv's message), the
        value projection size is not divisible by ``num_heads``, or ``dropout`` is not in
        [0, 1].
    TypeError
        If a size is not an int, or ``dtype`` is not float32 or float64.

    See Also
    --------
    deformnp.nn.MSDeformAttn : Deformable-DETR's module (no residual, dropout or query_pos).
    deformnp.ops.ms_deform_attn : The core op.

    Notes
    -----
    mmcv warns when ``embed_dims / num_heads`` is not a power of 2 (advice about its CUDA
    kernel); deformnp does not.
    """

    def __init__(
        self,
        embed_dims: int = 256,
        num_heads: int = 8,
        num_levels: int = 4,
        num_points: int = 4,
        im2col_step: int = 64,
        dropout: float = 0.1,
        batch_first: bool = False,
        norm_cfg: dict | None = None,
        init_cfg: Any = None,
        value_proj_ratio: float = 1.0,
        *,
        dtype: Any = None,
        device: Any = None,
    ) -> None:
        super().__init__()
        name = type(self).__name__
        for arg, v in (
            ("embed_dims", embed_dims),
            ("num_heads", num_heads),
            ("num_levels", num_levels),
            ("num_points", num_points),
            ("im2col_step", im2col_step),
        ):
            integer(name, arg, v, 1)
        if embed_dims % num_heads != 0:
            raise ValueError(
                f"{name}: embed_dims must be divisible by num_heads, but got {embed_dims} and "
                f"{num_heads}"
            )
        p = real(name, "dropout", dropout)
        if not 0.0 <= p <= 1.0:
            raise ValueError(f"{name}: dropout must be in [0, 1], got {dropout!r}")
        value_proj_size = int(embed_dims * real(name, "value_proj_ratio", value_proj_ratio))
        if value_proj_size < num_heads or value_proj_size % num_heads:
            raise ValueError(
                f"{name}: the value projection has int(embed_dims * value_proj_ratio) = "
                f"{value_proj_size} channels, expected a positive multiple of num_heads "
                f"{num_heads}"
            )
        dt = _dtype(dtype)
        self.norm_cfg = norm_cfg
        self.init_cfg = init_cfg
        self.dropout = Dropout(p)
        self.batch_first = bool(batch_first)
        self.im2col_step = int(im2col_step)
        self.embed_dims = int(embed_dims)
        self.num_levels = int(num_levels)
        self.num_heads = int(num_heads)
        self.num_points = int(num_points)
        M, L, P = self.num_heads, self.num_levels, self.num_points
        self.sampling_offsets = Linear(embed_dims, M * L * P * 2, dtype=dt)
        self.attention_weights = Linear(embed_dims, M * L * P, dtype=dt)
        self.value_proj = Linear(embed_dims, value_proj_size, dtype=dt)
        self.output_proj = Linear(value_proj_size, embed_dims, dtype=dt)
        self.init_weights()
        _finish(self, device)

    def init_weights(self) -> None:
        """Initialise the parameters as mmcv's ``init_weights`` (see the class docstring)."""
        M, L, P = self.num_heads, self.num_levels, self.num_points
        init.constant_(self.sampling_offsets.weight, 0.0)
        # float32, as mmcv (torch.arange(..., dtype=torch.float32))
        thetas = np.arange(M, dtype=np.float32) * np.float32(2.0 * math.pi / M)
        grid = np.stack([np.cos(thetas), np.sin(thetas)], -1)
        grid = grid / np.abs(grid).max(-1, keepdims=True)
        grid = np.tile(grid.reshape(M, 1, 1, 2), (1, L, P, 1))
        grid *= np.arange(1, P + 1, dtype=np.float32).reshape(1, 1, P, 1)
        self.sampling_offsets.bias.data[...] = grid.reshape(-1)
        init.constant_(self.attention_weights.weight, 0.0)
        init.constant_(self.attention_weights.bias, 0.0)
        init.xavier_uniform_(self.value_proj.weight)
        init.constant_(self.value_proj.bias, 0.0)
        init.xavier_uniform_(self.output_proj.weight)
        init.constant_(self.output_proj.bias, 0.0)

    def forward(
        self,
        query: TensorLike,
        key: TensorLike | None = None,
        value: TensorLike | None = None,
        identity: TensorLike | None = None,
        query_pos: TensorLike | None = None,
        key_padding_mask: ArrayLike | None = None,
        reference_points: TensorLike | None = None,
        spatial_shapes: ArrayLike | None = None,
        level_start_index: ArrayLike | None = None,
        **kwargs: Any,
    ) -> Tensor:
        r"""Deformable attention from each query, plus the identity (mmcv's forward).

        ``value`` defaults to ``query`` and ``identity`` to ``query``, both taken before
        ``query_pos`` is added to the query. The value is ``value_proj(value)`` (zeroed where
        ``key_padding_mask`` is True) split into ``num_heads`` heads; sampling offsets and
        softmaxed attention weights are predicted from the query; with 2-d reference points
        the locations are :math:`\mathrm{ref} + \Delta / (W_l, H_l)`, with 4-d reference boxes
        :math:`(c_x, c_y) + \Delta / P \cdot (w, h) \cdot 0.5`. The result is
        ``dropout(output_proj(ms_deform_attn(...))) + identity``.

        Parameters
        ----------
        query : Tensor or array_like, shape (num_query, bs, embed_dims)
            The queries ((bs, num_query, embed_dims) with ``batch_first``), in the layer's
            dtype.
        key : Tensor or array_like, optional
            Unused, as in mmcv.
        value : Tensor or array_like, shape (num_value, bs, embed_dims), optional
            The flattened feature maps of all levels ((bs, num_value, embed_dims) with
            ``batch_first``); ``query`` if None.
        identity : Tensor or array_like, optional
            Added to the output, in the output's shape; ``query`` (before ``query_pos``) if None.
        query_pos : Tensor or array_like, optional
            Positional encoding added to ``query`` (not to the identity or the value).
        key_padding_mask : array_like of bool, shape (bs, num_value), optional
            True marks padding positions of the value, which are zeroed.
        reference_points : Tensor or array_like, shape (bs, num_query, num_levels, 2 or 4)
            Normalized ``(x, y)`` per query and level, or boxes ``(cx, cy, w, h)``. Required.
        spatial_shapes : array_like of int, shape (num_levels, 2)
            Rows ``(H_l, W_l)``; ``sum(H_l * W_l)`` must be ``num_value``. Required.
        level_start_index : array_like of int, shape (num_levels,), optional
            The first row of each level in the value; computed from ``spatial_shapes`` if None
            (mmcv's CPU path ignores it too).
        **kwargs
            Ignored, as in mmcv; the deprecated ``residual`` is taken as ``identity``.

        Returns
        -------
        Tensor, shape of ``query``
            Differentiable in ``query``, ``value``, ``identity``, ``query_pos``,
            ``reference_points`` and every parameter.

        Raises
        ------
        ValueError
            If ``reference_points`` or ``spatial_shapes`` is None, or a shape is inconsistent
            (the message names the argument, the expected and the given shape).
        TypeError
            If a float input does not have the parameters' dtype, or the index arrays are not
            integers.

        See Also
        --------
        deformnp.ops.ms_deform_attn : The core op; :doc:`/ops/ms_deform_attn` has the math.

        """
        name = type(self).__name__
        if identity is None and "residual" in kwargs:  # mmcv's deprecated name
            warnings.warn(
                f"{name}: 'residual' is deprecated, use 'identity'",
                DeprecationWarning,
                stacklevel=2,
            )
            identity = kwargs["residual"]
        if reference_points is None or spatial_shapes is None:
            missing = "reference_points" if reference_points is None else "spatial_shapes"
            raise ValueError(f"{name}: {missing} is required, got None")
        query = _tensor(query)
        value = query if value is None else _tensor(value)
        identity = query if identity is None else _tensor(identity)
        reference_points = _tensor(reference_points)
        tensors = {"query": query, "value": value, "identity": identity}
        tensors["reference_points"] = reference_points
        if query_pos is not None:
            query_pos = _tensor(query_pos)
            tensors["query_pos"] = query_pos
        dtype = self.value_proj.weight.dtype
        for arg, t in tensors.items():
            if t.dtype != dtype:
                raise TypeError(
                    f"{name}: {arg} must be {dtype} like the layer's parameters, got {t.dtype}"
                )
        C, M, L, P = self.embed_dims, self.num_heads, self.num_levels, self.num_points
        layout = "(bs, n, embed_dims)" if self.batch_first else "(n, bs, embed_dims)"
        for arg in ("query", "value"):
            t = tensors[arg]
            if t.ndim != 3 or t.shape[2] != C:
                raise ValueError(
                    f"{name}: {arg} must be {layout} with embed_dims = {C}, got shape {t.shape}"
                )
        if query_pos is not None and query_pos.shape != query.shape:
            raise ValueError(
                f"{name}: query_pos must have query's shape {query.shape}, got {query_pos.shape}"
            )
        if identity.shape != query.shape:
            raise ValueError(
                f"{name}: identity must have query's shape {query.shape}, got {identity.shape}"
            )
        if query_pos is not None:
            query = query + query_pos
        if not self.batch_first:
            query = query.permute(1, 0, 2)
            value = value.permute(1, 0, 2)
        bs, num_query, _ = query.shape
        if value.shape[0] != bs:
            raise ValueError(
                f"{name}: query has batch size {bs} but value has batch size {value.shape[0]}"
            )
        num_value = value.shape[1]
        shapes = index_array(name, "spatial_shapes", unwrap(spatial_shapes))
        if shapes.shape != (L, 2):
            raise ValueError(
                f"{name}: spatial_shapes must be (num_levels, 2) = ({L}, 2), got shape "
                f"{shapes.shape}"
            )
        sizes = [h * w for h, w in shapes.tolist()]
        if sum(sizes) != num_value:
            raise ValueError(
                f"{name}: value has num_value = {num_value} positions, but spatial_shapes give "
                f"sum(H_l*W_l) = {sum(sizes)}"
            )
        if level_start_index is None:
            starts = np.concatenate([[0], np.cumsum(sizes)[:-1]]).astype(np.int64)
        else:
            starts = index_array(name, "level_start_index", unwrap(level_start_index))
        if reference_points.ndim != 4 or reference_points.shape[:3] != (bs, num_query, L):
            raise ValueError(
                f"{name}: reference_points must be (bs, num_query, num_levels, 2 or 4) = "
                f"({bs}, {num_query}, {L}, 2 or 4), got shape {reference_points.shape}"
            )
        if reference_points.shape[3] not in (2, 4):
            raise ValueError(
                f"{name}: Last dim of reference_points must be 2 or 4, but get "
                f"{reference_points.shape[3]} instead."
            )

        v = self.value_proj(value)
        if key_padding_mask is not None:
            mask = np.asarray(unwrap(key_padding_mask), dtype=bool)
            if mask.shape != (bs, num_value):
                raise ValueError(
                    f"{name}: key_padding_mask must be (bs, num_value) = ({bs}, {num_value}), got "
                    f"shape {mask.shape}"
                )
            v = F.masked_fill(v, mask[..., None], 0.0)
        v = v.reshape(bs, num_value, M, -1)
        offsets = self.sampling_offsets(query).reshape(bs, num_query, M, L, P, 2)
        weights = self.attention_weights(query).reshape(bs, num_query, M, L * P)
        weights = F.softmax(weights, -1).reshape(bs, num_query, M, L, P)
        if reference_points.shape[3] == 2:
            normalizer = np.stack([shapes[:, 1], shapes[:, 0]], -1).astype(dtype)
            ref = reference_points.reshape(bs, num_query, 1, L, 1, 2)
            locations = ref + offsets / normalizer.reshape(1, 1, 1, L, 1, 2)
        else:
            ref = reference_points.reshape(bs, num_query, 1, L, 1, 4)
            locations = ref[..., :2] + offsets / P * ref[..., 2:] * 0.5
        out = self.output_proj(ms_deform_attn(v, shapes, starts, locations, weights))
        if not self.batch_first:
            out = out.permute(1, 0, 2)
        return self.dropout(out) + identity

    def extra_repr(self) -> str:
        """Return the layer's settings as shown in its ``repr``.

        Returns
        -------
        str
            The constructor arguments, ``name=value`` separated by commas.

        """
        return (
            f"embed_dims={self.embed_dims}, num_heads={self.num_heads}, "
            f"num_levels={self.num_levels}, num_points={self.num_points}, "
            f"batch_first={self.batch_first}, value_proj_ratio="
            f"{self.value_proj.weight.shape[0] / self.embed_dims}"
        )
