"""Deformable attention layers: Deformable-DETR's ``MSDeformAttn`` (see :doc:`/ops/ms_deform_attn`)
and DAT's deformable attention ``DeformableAttention2d`` (see :doc:`/ops/dat`).

Both keep their anchors' parameter names, so state dicts load by name
(``module.load_state_dict(torch_state_dict)``; torch tensors are converted).
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from .. import functional as F
from ..ops.attention import ms_deform_attn
from ..tensor import Tensor
from ..typing import ArrayLike, TensorLike
from ..validation import index_array, integer, pair, real
from . import init
from .layers import GELU, Conv2d, LayerNorm, Linear, Sequential
from .module import Module, Parameter

__all__ = ["MSDeformAttn", "DeformableAttention2d", "LayerNormProxy"]


def _tensor(x: Any) -> Tensor:
    return x if isinstance(x, Tensor) else Tensor(x)


class MSDeformAttn(Module):
    r"""Multi-scale deformable attention module of Deformable-DETR (its ``MSDeformAttn``).

    Mirrors ``models.ops.modules.MSDeformAttn`` of Deformable-DETR: the same constructor, the
    same sub-layers (:class:`Linear`, weight (out, in) as torch's) under the same names, so its
    state dict loads by name:

    * ``sampling_offsets``: d_model -> n_heads * n_levels * n_points * 2;
    * ``attention_weights``: d_model -> n_heads * n_levels * n_points;
    * ``value_proj``, ``output_proj``: d_model -> d_model.

    Initialisation as Deformable-DETR's ``_reset_parameters``: ``sampling_offsets`` weight 0
    and bias the direction :math:`(\cos, \sin)(2\pi m / M)` of head :math:`m` divided by its
    largest absolute component, times :math:`p + 1` for point :math:`p`, the same for every
    level (computed in float32, as Deformable-DETR); ``attention_weights`` weight and bias 0;
    ``value_proj`` and ``output_proj`` weights Xavier-uniform, biases 0.

    Gradients flow to every parameter and to ``query``, ``input_flatten`` and
    ``reference_points``. There is no ``im2col_step`` (any batch size works), and no warning
    for a head dimension that is not a power of two (that advice concerns Deformable-DETR's
    CUDA kernel).

    Parameters
    ----------
    d_model : int, default 256
        The channels of the queries and values (>= 1, divisible by ``n_heads``).
    n_levels : int, default 4
        The number ``L`` of feature levels.
    n_heads : int, default 8
        The number ``M`` of attention heads; each has ``D = d_model // n_heads`` channels.
    n_points : int, default 4
        The number ``P`` of sampling points per head and level.
    device : str, optional
        A deformnp extra: ``"cuda"`` moves the parameters to the GPU after initialisation.
    dtype : numpy.dtype or type, optional
        A deformnp extra: float32 (the default) or float64, for the parameters; the inputs must
        have the same dtype.

    Raises
    ------
    ValueError
        If a size is < 1 or ``d_model`` is not divisible by ``n_heads``.
    TypeError
        If a size is not an int, or ``dtype`` is not float32 or float64.

    See Also
    --------
    deformnp.ops.ms_deform_attn : The core op.
    DeformableAttention2d : DAT's deformable attention.

    Notes
    -----
    The sampling rule, the attention and their gradients are derived in
    :doc:`/ops/ms_deform_attn`.

    """

    def __init__(
        self,
        d_model: int = 256,
        n_levels: int = 4,
        n_heads: int = 8,
        n_points: int = 4,
        device: Any = None,
        dtype: Any = None,
    ) -> None:
        super().__init__()
        for name, v in (
            ("d_model", d_model),
            ("n_levels", n_levels),
            ("n_heads", n_heads),
            ("n_points", n_points),
        ):
            integer("MSDeformAttn", name, v, 1)
        if d_model % n_heads != 0:
            raise ValueError(
                f"MSDeformAttn: d_model must be divisible by n_heads, but got {d_model} and "
                f"{n_heads}"
            )
        self.d_model = int(d_model)
        self.n_levels = int(n_levels)
        self.n_heads = int(n_heads)
        self.n_points = int(n_points)
        kw = {"device": None, "dtype": dtype}
        self.sampling_offsets = Linear(d_model, n_heads * n_levels * n_points * 2, **kw)
        self.attention_weights = Linear(d_model, n_heads * n_levels * n_points, **kw)
        self.value_proj = Linear(d_model, d_model, **kw)
        self.output_proj = Linear(d_model, d_model, **kw)
        self._reset_parameters()
        if device is not None and device != "cpu":
            self.to(device)

    def _reset_parameters(self) -> None:
        M, L, P = self.n_heads, self.n_levels, self.n_points
        init.constant_(self.sampling_offsets.weight, 0.0)
        # computed in float32 like Deformable-DETR (torch.arange(..., dtype=torch.float32))
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
        reference_points: TensorLike,
        input_flatten: TensorLike,
        input_spatial_shapes: ArrayLike,
        input_level_start_index: ArrayLike,
        input_padding_mask: ArrayLike | None = None,
    ) -> Tensor:
        r"""Attend from each query to ``n_levels * n_points`` sampled values per head.

        The value is ``value_proj(input_flatten)`` (zeroed where ``input_padding_mask`` is True),
        split into ``M`` heads of ``D`` channels. Each query predicts, per head, level and point, an
        offset (``sampling_offsets``) and a weight (``attention_weights``, softmaxed over the
        ``n_levels * n_points`` samples of the head). With 2-d reference points the sampling
        location is :math:`\mathrm{ref} + \Delta / (W_l, H_l)` (the offsets are in pixels of level
        :math:`l`); with 4-d reference boxes :math:`(c_x, c_y, w, h)` it is
        :math:`(c_x, c_y) + \Delta / P \cdot (w, h) \cdot 0.5`. The result is
        ``output_proj(ms_deform_attn(value, ..., locations, weights))``.

        Parameters
        ----------
        query : Tensor or array_like, shape (N, Lq, d_model)
            The queries, in the layer's dtype.
        reference_points : Tensor or array_like, shape (N, Lq, n_levels, 2) or (N, Lq, n_levels, 4)
            Normalized ``(x, y)`` per query and level, ``(0, 0)`` the top-left and ``(1, 1)`` the
            bottom-right corner of the level's map; or boxes ``(cx, cy, w, h)`` in the same units.
        input_flatten : Tensor or array_like, shape (N, S, d_model)
            The flattened feature maps of all levels, ``S = sum_l H_l * W_l``, level ``l`` in rows
            ``input_level_start_index[l]`` onwards, row-major.
        input_spatial_shapes : array_like of int, shape (n_levels, 2)
            Rows ``(H_l, W_l)``.
        input_level_start_index : array_like of int, shape (n_levels,)
            The first row of each level in ``input_flatten`` (the exclusive cumulative sum of
            ``H_l * W_l``).
        input_padding_mask : array_like of bool, shape (N, S), optional
            True marks padding positions, whose values are zeroed.

        Returns
        -------
        Tensor, shape (N, Lq, d_model)
            Differentiable in ``query``, ``reference_points``, ``input_flatten`` and every
            parameter.

        Raises
        ------
        ValueError
            If a shape is inconsistent: ``query`` or ``input_flatten`` not (N, ., d_model),
            different batch sizes, ``input_spatial_shapes`` not (n_levels, 2) or not summing to
            ``S``, ``reference_points`` not (N, Lq, n_levels, 2 or 4), or ``input_padding_mask``
            not (N, S).
        TypeError
            If ``query``, ``reference_points`` or ``input_flatten`` does not have the parameters'
            dtype, or the index arrays are not integers.

        See Also
        --------
        deformnp.ops.ms_deform_attn : The core op; :doc:`/ops/ms_deform_attn` has the math.

        """
        name = "MSDeformAttn"
        query = _tensor(query)
        reference_points = _tensor(reference_points)
        input_flatten = _tensor(input_flatten)
        shapes = index_array(name, "input_spatial_shapes", _raw(input_spatial_shapes))
        starts = index_array(name, "input_level_start_index", _raw(input_level_start_index))
        M, L, C = self.n_heads, self.n_levels, self.d_model
        if query.ndim != 3 or query.shape[2] != C:
            raise ValueError(f"{name}: query must be (N, Lq, {C}), got shape {query.shape}")
        if input_flatten.ndim != 3 or input_flatten.shape[2] != C:
            raise ValueError(
                f"{name}: input_flatten must be (N, S, {C}), got shape {input_flatten.shape}"
            )
        N, Lq, _ = query.shape
        S = input_flatten.shape[1]
        if input_flatten.shape[0] != N:
            raise ValueError(
                f"{name}: query has batch {N} but input_flatten has batch {input_flatten.shape[0]}"
            )
        if shapes.shape != (L, 2):
            raise ValueError(
                f"{name}: input_spatial_shapes must be (n_levels, 2) = ({L}, 2), got shape "
                f"{shapes.shape}"
            )
        total = sum(h * w for h, w in shapes.tolist())  # exact: no 64-bit wrap-around
        if total != S:
            raise ValueError(
                f"{name}: input_flatten has S = {S} positions, but input_spatial_shapes give "
                f"sum(H_l*W_l) = {total}"
            )
        if reference_points.ndim != 4 or reference_points.shape[:3] != (N, Lq, L):
            raise ValueError(
                f"{name}: reference_points must be (N, Lq, n_levels, 2 or 4) = ({N}, {Lq}, {L}, "
                f"2 or 4), got shape {reference_points.shape}"
            )
        if reference_points.shape[3] not in (2, 4):
            raise ValueError(
                f"{name}: Last dim of reference_points must be 2 or 4, but get "
                f"{reference_points.shape[3]} instead."
            )
        self._check_dtypes(
            query=query, reference_points=reference_points, input_flatten=input_flatten
        )

        value = self.value_proj(input_flatten)
        if input_padding_mask is not None:
            mask = np.asarray(_raw(input_padding_mask), dtype=bool)
            if mask.shape != (N, S):
                raise ValueError(
                    f"{name}: input_padding_mask must be (N, S) = ({N}, {S}), got shape "
                    f"{mask.shape}"
                )
            value = F.masked_fill(value, mask[..., None], 0.0)
        value = value.reshape(N, S, M, C // M)
        locations, weights = self._sampling(query, reference_points, shapes)
        out = ms_deform_attn(value, shapes, starts, locations, weights)
        return self.output_proj(out)

    def _check_dtypes(self, **tensors: Tensor) -> None:
        """Inputs must have the dtype of the layer's parameters (no silent casts)."""
        dtype = self.value_proj.weight.dtype
        for arg, t in tensors.items():
            if t.dtype != dtype:
                raise TypeError(
                    f"MSDeformAttn: {arg} must be {dtype} like the layer's parameters, got "
                    f"{t.dtype}"
                )

    def _sampling(
        self, query: Tensor, reference_points: Tensor, shapes: np.ndarray
    ) -> tuple[Tensor, Tensor]:
        N, Lq, _ = query.shape
        M, L, P = self.n_heads, self.n_levels, self.n_points
        offsets = self.sampling_offsets(query).reshape(N, Lq, M, L, P, 2)
        weights = self.attention_weights(query).reshape(N, Lq, M, L * P)
        weights = F.softmax(weights, -1).reshape(N, Lq, M, L, P)
        dtype = offsets.dtype
        if reference_points.shape[3] == 2:
            # offsets are in pixels of each level: divide by (W_l, H_l)
            normalizer = np.stack([shapes[:, 1], shapes[:, 0]], -1).astype(dtype)
            ref = reference_points.reshape(N, Lq, 1, L, 1, 2)
            locations = ref + offsets / normalizer.reshape(1, 1, 1, L, 1, 2)
        else:
            ref = reference_points.reshape(N, Lq, 1, L, 1, 4)
            locations = ref[..., :2] + offsets / P * ref[..., 2:] * 0.5
        return locations, weights

    def sampling(
        self, query: TensorLike, reference_points: TensorLike, input_spatial_shapes: ArrayLike
    ) -> tuple[Tensor, Tensor]:
        """Return the sampling locations and attention weights ``forward`` uses, for plotting.

        Parameters
        ----------
        query : Tensor or array_like, shape (N, Lq, d_model)
            The queries, in the layer's dtype.
        reference_points : Tensor or array_like, shape (N, Lq, n_levels, 2) or (N, Lq, n_levels, 4)
            As in :meth:`forward`.
        input_spatial_shapes : array_like of int, shape (n_levels, 2)
            Rows ``(H_l, W_l)``.

        Returns
        -------
        locations : Tensor, shape (N, Lq, n_heads, n_levels, n_points, 2)
            Normalized ``(x, y)`` sampling locations.
        weights : Tensor, shape (N, Lq, n_heads, n_levels, n_points)
            The softmaxed attention weights (summing to 1 over levels and points per head).

        Raises
        ------
        TypeError
            If ``query`` or ``reference_points`` does not have the parameters' dtype.

        """
        shapes = index_array("MSDeformAttn", "input_spatial_shapes", _raw(input_spatial_shapes))
        query, reference_points = _tensor(query), _tensor(reference_points)
        self._check_dtypes(query=query, reference_points=reference_points)
        return self._sampling(query, reference_points, shapes)

    def extra_repr(self) -> str:
        """Return the layer's settings as shown in its ``repr``.

        Returns
        -------
        str
            The constructor arguments, ``name=value`` separated by commas.

        """
        return (
            f"d_model={self.d_model}, n_levels={self.n_levels}, n_heads={self.n_heads}, "
            f"n_points={self.n_points}"
        )


def _raw(x: Any) -> Any:
    if isinstance(x, Tensor):
        return x.data
    if hasattr(x, "detach") and hasattr(x, "cpu"):  # a torch tensor
        return x.detach().cpu().numpy()
    return x


class LayerNormProxy(Module):
    """LayerNorm over the channels of an NCHW map (DAT's ``LayerNormProxy``).

    Mirrors DAT's ``LayerNormProxy``: the :class:`LayerNorm` is the submodule ``norm``, so
    its parameters are ``norm.weight`` and ``norm.bias``.

    Parameters
    ----------
    dim : int
        The number of channels ``C``.
    dtype : numpy.dtype or type, optional
        float32 (the default) or float64.

    See Also
    --------
    LayerNorm : The normalisation it applies over the channel dimension.

    """

    def __init__(self, dim: int, dtype: Any = None) -> None:
        super().__init__()
        self.norm = LayerNorm(dim, dtype=dtype)

    def forward(self, x: TensorLike) -> Tensor:
        """Normalise each pixel's channel vector.

        Parameters
        ----------
        x : Tensor or array_like, shape (B, C, H, W)
            The feature map, in the layer's dtype.

        Returns
        -------
        Tensor, shape (B, C, H, W)
            ``norm`` applied over ``C`` (the input permuted to (B, H, W, C) and back).

        """
        x = _tensor(x).permute(0, 2, 3, 1)
        return self.norm(x).permute(0, 3, 1, 2)


def _reference_points(H: int, W: int, dtype: Any) -> np.ndarray:
    """(H, W, 2) pixel centres as normalized (y, x): ((i + 0.5)/H*2 - 1, (j + 0.5)/W*2 - 1)."""
    ys = (np.arange(H, dtype=np.float64) + 0.5) / H * 2.0 - 1.0
    xs = (np.arange(W, dtype=np.float64) + 0.5) / W * 2.0 - 1.0
    ref = np.stack(np.meshgrid(ys, xs, indexing="ij"), -1)
    return ref.astype(dtype)


class DeformableAttention2d(Module):
    """Deformable multi-head attention of DAT (its ``DAttentionBaseline``).

    Mirrors ``DAttentionBaseline`` of DAT ("Vision Transformer with Deformable Attention",
    CVPR 2022; LeapLabTHU/DAT), composed from autograd ops and :func:`deformnp.ops.grid_sample`.
    On x (B, C, H, W), with ``C = channels = n_heads * d_head`` and ``G = n_groups``, the
    offsets are shared by the ``n_heads / n_groups`` heads of a group:

    1. ``q = proj_q(x)`` (1x1 conv), viewed per group (B*G, C/G, H, W).
    2. ``conv_offset``: depthwise k x k conv (stride r, padding k//2, bias), LayerNorm over
       channels, GELU, 1x1 conv to 2 channels without bias -> (B*G, 2, Hk, Wk): (dy, dx).
    3. If ``offset_range_factor`` s > 0: offset = s * tanh(offset) * (1/Hk, 1/Wk).
    4. reference = centres of the Hk x Wk grid, normalized: ((i + 0.5)/Hk*2 - 1,
       (j + 0.5)/Wk*2 - 1); pos = reference + offset if s >= 0, tanh(reference + offset) if
       s < 0 (DAT's code: s == 0 leaves the offset unscaled and untransformed).
    5. x_sampled = grid_sample(x per group, pos as (x, y), bilinear, zeros, align_corners=True),
       (B, C, 1, Ns) with Ns = Hk*Wk; k = proj_k(x_sampled), v = proj_v(x_sampled).
    6. attn = q^T k / sqrt(d_head) per head, (B*n_heads, H*W, Ns); with ``use_pe`` add the bias
       sampled from ``rpe_table`` (n_heads, 2H-1, 2W-1) by grid_sample (align_corners=True) at
       (q_grid - pos) * 0.5, q_grid the pixel centres of the H x W map normalized as in 4.
    7. softmax over Ns, out = attn v^T -> (B, C, H, W), y = proj_out(out).

    Parameter names follow DAT (``conv_offset.0``, ``conv_offset.1.norm``, ``conv_offset.3``,
    ``proj_q``, ``proj_k``, ``proj_v``, ``proj_out``, ``rpe_table``), so a DAttentionBaseline
    state dict with ``use_pe`` and neither ``dwc_pe`` nor ``fixed_pe`` loads by name. Dropout
    is omitted (DAT's attn_drop / proj_drop default to 0). Initialisation: convolutions as
    torch's default (as DAT, whose reset_parameters does not reach them), ``rpe_table``
    truncated normal, std 0.01. The offset range 1/Hk, 1/Wk is computed in the layer's dtype
    (DAT builds it as a float32 tensor, which differs in float64 unless Hk and Wk are powers of
    two).

    Parameters
    ----------
    channels : int
        The channels ``C`` of the input and output (>= 1, divisible by ``n_heads``).
    n_heads : int
        The number of attention heads (>= 1, divisible by ``n_groups``).
    n_groups : int, default 1
        The number ``G`` of offset groups.
    stride : int, default 1
        The stride ``r`` of the offset network's depthwise convolution (the reference grid is
        ``Hk x Wk``, the size of its output).
    offset_range_factor : float, default 2.0
        The offset scale ``s`` of steps 3 and 4 (> 0: bounded offsets; 0: raw offsets; < 0:
        ``tanh`` of the positions).
    kernel_size : int, default 5
        The kernel size ``k`` of the depthwise convolution.
    use_pe : bool, default True
        Add the relative position bias sampled from ``rpe_table``.
    q_size : int or (int, int), optional
        The input's ``(H, W)``, which sizes ``rpe_table``; required with ``use_pe`` (DAT builds
        the table from its stage's feature-map size too), and the input must then be H x W.
    device : str, optional
        A deformnp extra: ``"cuda"`` moves the parameters to the GPU after initialisation.
    dtype : numpy.dtype or type, optional
        A deformnp extra: float32 (the default) or float64, for the parameters; the inputs must
        have the same dtype.

    Raises
    ------
    ValueError
        If a size is < 1, ``channels`` is not divisible by ``n_heads`` or ``n_heads`` by
        ``n_groups``, or ``use_pe`` is set without ``q_size``.
    TypeError
        If a size is not an int, ``offset_range_factor`` not a real number, or ``dtype`` not
        float32 or float64.

    See Also
    --------
    deformnp.ops.grid_sample : The sampling op.
    MSDeformAttn : Deformable-DETR's multi-scale deformable attention.

    Notes
    -----
    The layer is derived step by step in :doc:`/ops/dat`.

    """

    def __init__(
        self,
        channels: int,
        n_heads: int,
        n_groups: int = 1,
        stride: int = 1,
        offset_range_factor: float = 2.0,
        kernel_size: int = 5,
        use_pe: bool = True,
        q_size: Any = None,
        device: Any = None,
        dtype: Any = None,
    ) -> None:
        super().__init__()
        name = "DeformableAttention2d"
        for arg, v in (
            ("channels", channels),
            ("n_heads", n_heads),
            ("n_groups", n_groups),
            ("stride", stride),
            ("kernel_size", kernel_size),
        ):
            integer(name, arg, v, 1)
        real(name, "offset_range_factor", offset_range_factor)
        if channels % n_heads:
            raise ValueError(
                f"{name}: channels ({channels}) must be divisible by n_heads ({n_heads})"
            )
        if n_heads % n_groups:
            raise ValueError(
                f"{name}: n_heads ({n_heads}) must be divisible by n_groups ({n_groups})"
            )
        if use_pe and q_size is None:
            raise ValueError(
                f"{name}: use_pe=True needs q_size=(H, W) to size the relative position bias "
                f"table (n_heads, 2H-1, 2W-1)"
            )
        self.channels = int(channels)
        self.n_heads = int(n_heads)
        self.n_groups = int(n_groups)
        self.n_head_channels = self.channels // self.n_heads
        self.n_group_channels = self.channels // self.n_groups
        self.n_group_heads = self.n_heads // self.n_groups
        self.scale = self.n_head_channels**-0.5
        self.stride = int(stride)
        self.offset_range_factor = float(offset_range_factor)
        self.kernel_size = int(kernel_size)
        self.use_pe = bool(use_pe)
        if q_size is not None:
            q_size = pair(name, "q_size", q_size, 1)
        self.q_size = q_size
        Cg, k = self.n_group_channels, self.kernel_size
        self.conv_offset = Sequential(
            Conv2d(Cg, Cg, k, self.stride, k // 2, groups=Cg, dtype=dtype),
            LayerNormProxy(Cg, dtype=dtype),
            GELU(),
            Conv2d(Cg, 2, 1, 1, 0, bias=False, dtype=dtype),
        )
        C = self.channels
        self.proj_q = Conv2d(C, C, 1, dtype=dtype)
        self.proj_k = Conv2d(C, C, 1, dtype=dtype)
        self.proj_v = Conv2d(C, C, 1, dtype=dtype)
        self.proj_out = Conv2d(C, C, 1, dtype=dtype)
        if self.use_pe:
            qh, qw = self.q_size
            table = np.zeros((self.n_heads, 2 * qh - 1, 2 * qw - 1), self.proj_q.weight.dtype)
            self.rpe_table = Parameter(table)
            init.trunc_normal_(self.rpe_table, std=0.01)
        else:
            self.register_parameter("rpe_table", None)
        if device is not None and device != "cpu":
            self.to(device)

    def forward(self, x: TensorLike) -> tuple[Tensor, Tensor, Tensor]:
        """Apply deformable attention to ``x``; also return where it sampled.

        Parameters
        ----------
        x : Tensor or array_like, shape (B, channels, H, W)
            The feature map, in the layer's dtype; H x W must equal ``q_size`` when ``use_pe``.

        Returns
        -------
        y : Tensor, shape (B, channels, H, W)
            The attention output (``proj_out`` applied); differentiable in ``x`` and every
            parameter.
        pos : Tensor, shape (B, n_groups, Hk, Wk, 2)
            The sampling positions as normalized ``(y, x)`` (with gradient).
        reference : Tensor, shape (B, n_groups, Hk, Wk, 2)
            The reference grid as normalized ``(y, x)``.

        Raises
        ------
        ValueError
            If ``x`` is not (B, channels, H, W), or (with ``use_pe``) H x W differs from
            ``q_size``.

        See Also
        --------
        deformnp.ops.grid_sample : The sampling op; :doc:`/ops/dat` has the math.

        """
        name = "DeformableAttention2d"
        x = _tensor(x)
        if x.ndim != 4 or x.shape[1] != self.channels:
            raise ValueError(
                f"{name}: x must be (B, {self.channels}, H, W), got shape {tuple(x.shape)}"
            )
        B, C, H, W = x.shape
        if self.use_pe and (H, W) != tuple(self.q_size):
            raise ValueError(
                f"{name}: x is {H}x{W} but the relative position bias table was built for "
                f"q_size {tuple(self.q_size)}"
            )
        from ..ops.grid_sample import grid_sample

        G, Cg, Mh, dh = self.n_groups, self.n_group_channels, self.n_heads, self.n_head_channels
        dtype = x.dtype

        q = self.proj_q(x)
        offset = self.conv_offset(q.reshape(B * G, Cg, H, W))  # (B*G, 2, Hk, Wk): (dy, dx)
        Hk, Wk = offset.shape[2], offset.shape[3]
        Ns = Hk * Wk
        s = self.offset_range_factor
        if s > 0:
            offset_range = np.array([1.0 / Hk, 1.0 / Wk], dtype=dtype).reshape(1, 2, 1, 1)
            offset = F.tanh(offset) * offset_range * s
        offset = offset.permute(0, 2, 3, 1)  # (B*G, Hk, Wk, 2)
        reference = Tensor(np.broadcast_to(_reference_points(Hk, Wk, dtype), (B * G, Hk, Wk, 2)))
        pos = offset + reference if s >= 0 else F.tanh(offset + reference)

        pos_xy = F.stack([pos[..., 1], pos[..., 0]], dim=-1)  # (y, x) -> (x, y)
        x_sampled = grid_sample(
            x.reshape(B * G, Cg, H, W), pos_xy, padding_mode="zeros", align_corners=True
        )  # (B*G, Cg, Hk, Wk)
        x_sampled = x_sampled.reshape(B, C, 1, Ns)

        q = q.reshape(B * Mh, dh, H * W)
        k = self.proj_k(x_sampled).reshape(B * Mh, dh, Ns)
        v = self.proj_v(x_sampled).reshape(B * Mh, dh, Ns)
        attn = F.matmul(q.transpose(1, 2), k) * self.scale  # (B*Mh, HW, Ns)

        if self.use_pe:
            table = self.rpe_table.reshape(1, Mh, 2 * H - 1, 2 * W - 1)
            table = F.expand(table, B, Mh, 2 * H - 1, 2 * W - 1)
            table = table.reshape(B * G, self.n_group_heads, 2 * H - 1, 2 * W - 1)
            q_grid = _reference_points(H, W, dtype).reshape(1, H * W, 1, 2)
            displacement = (Tensor(q_grid) - pos.reshape(B * G, 1, Ns, 2)) * 0.5
            disp_xy = F.stack([displacement[..., 1], displacement[..., 0]], dim=-1)
            bias = grid_sample(table, disp_xy, padding_mode="zeros", align_corners=True)
            attn = attn + bias.reshape(B * Mh, H * W, Ns)  # (B*G, Mg, HW, Ns) per head

        attn = F.softmax(attn, dim=2)
        out = F.matmul(v, attn.transpose(1, 2))  # (B*Mh, dh, HW)
        y = self.proj_out(out.reshape(B, C, H, W))
        return (
            y,
            pos.reshape(B, G, Hk, Wk, 2),
            reference.reshape(B, G, Hk, Wk, 2),
        )

    def extra_repr(self) -> str:
        """Return the layer's settings as shown in its ``repr``.

        Returns
        -------
        str
            The constructor arguments, ``name=value`` separated by commas.

        """
        return (
            f"channels={self.channels}, n_heads={self.n_heads}, n_groups={self.n_groups}, "
            f"stride={self.stride}, offset_range_factor={self.offset_range_factor}, "
            f"kernel_size={self.kernel_size}, use_pe={self.use_pe}, q_size={self.q_size}"
        )
