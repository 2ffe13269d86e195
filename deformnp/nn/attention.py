"""Deformable-DETR's multi-scale deformable attention ``MSDeformAttn`` (see
:doc:`/ops/ms_deform_attn`); DAT's deformable attention layers are in ``deformnp.nn.dat``.

It keeps its anchor's parameter names, so state dicts load by name
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
from ..validation import index_array, integer
from . import init
from .layers import Linear
from .module import Module

__all__ = ["MSDeformAttn"]


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
    ``reference_points``. As in Deformable-DETR, the constructor sets the attribute
    ``im2col_step = 64`` (neither the constructor nor ``forward`` takes it); ``forward`` passes
    it to :func:`deformnp.ops.ms_deform_attn`, which checks it is a positive int and ignores it
    (any batch size works). There is no warning for a head dimension that is not a power of two
    (that advice concerns Deformable-DETR's CUDA kernel).

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
        self.im2col_step = 64  # Deformable-DETR's attribute; accepted and ignored by the op
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
        out = ms_deform_attn(value, shapes, starts, locations, weights, self.im2col_step)
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
