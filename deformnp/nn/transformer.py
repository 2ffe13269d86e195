"""Transformer layers: torch's ``MultiheadAttention`` and Deformable-DETR's deformable transformer
(``models/deformable_transformer.py``): its encoder and decoder layers, encoder and decoder.

Attribute names, constructor arguments, forward signatures and return values follow torch and
Deformable-DETR, so their state dicts load by name (``module.load_state_dict(torch_state_dict)``;
torch tensors are converted). Built from deformnp's differentiable layers and functions:
gradients flow to every float input and every parameter.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable
from typing import Any

import numpy as np

from .. import functional as F
from ..tensor import Tensor
from ..typing import ArrayLike, TensorLike
from ..validation import index_array, integer
from . import init
from .attention import MSDeformAttn
from .layers import Dropout, LayerNorm, Linear, ModuleList
from .module import Module, Parameter

__all__ = [
    "MultiheadAttention",
    "DeformableTransformerEncoderLayer",
    "DeformableTransformerEncoder",
    "DeformableTransformerDecoderLayer",
    "DeformableTransformerDecoder",
    "inverse_sigmoid",
]


def _tensor(x: Any) -> Tensor:
    if isinstance(x, Tensor):
        return x
    if hasattr(x, "detach") and hasattr(x, "cpu"):  # a torch tensor
        return Tensor(x.detach().cpu().numpy())
    return Tensor(x)


def _raw(x: Any) -> Any:
    if isinstance(x, Tensor):
        return x.data
    if hasattr(x, "detach") and hasattr(x, "cpu"):  # a torch tensor
        return x.detach().cpu().numpy()
    return x


def _host(x: Any) -> np.ndarray:
    a = _raw(x)
    return a.copy_to_host() if hasattr(a, "copy_to_host") else np.asarray(a)


def _like(a: np.ndarray, like: Tensor) -> Tensor:
    """A constant Tensor on ``like``'s device."""
    t = Tensor(a)
    return t if like.device == "cpu" else t.to(like.device)


def _dtype(name: str, dtype: Any) -> np.dtype:
    dt = np.dtype(np.float32 if dtype is None else dtype)
    if dt not in (np.float32, np.float64):
        raise TypeError(f"{name}: dtype must be float32 or float64, got {dt}")
    return dt


def _probability(name: str, arg: str, p: Any) -> float:
    if isinstance(p, (bool, np.bool_)) or not isinstance(p, (int, float, np.integer, np.floating)):
        raise TypeError(f"{name}: {arg} must be a real number in [0, 1], got {p!r}")
    if not 0.0 <= float(p) <= 1.0:
        raise ValueError(f"{name}: {arg} must be in [0, 1], got {p!r}")
    return float(p)


# ------------------------------------------------------------------------ MultiheadAttention


class MultiheadAttention(Module):
    r"""Multi-head attention (``torch.nn.MultiheadAttention``), with torch's parameter names.

    For queries :math:`Q` (L, E), keys :math:`K` (S, kdim) and values :math:`V` (S, vdim) per
    batch element, head :math:`h` of ``num_heads`` computes
    :math:`\mathrm{softmax}(Q W^Q_h (K W^K_h)^\top / \sqrt{d} + \mathrm{mask})\, V W^V_h`
    (``d = embed_dim // num_heads``); the heads are concatenated and ``out_proj`` applied.

    Parameters are named as torch's, so its state dict loads by name: ``in_proj_weight``
    (3 * embed_dim, embed_dim) when ``kdim == vdim == embed_dim``, else ``q_proj_weight``
    (embed_dim, embed_dim), ``k_proj_weight`` (embed_dim, kdim) and ``v_proj_weight``
    (embed_dim, vdim); ``in_proj_bias`` (3 * embed_dim,); ``out_proj.weight`` and
    ``out_proj.bias``; ``bias_k`` and ``bias_v`` (1, 1, embed_dim) with ``add_bias_kv``.
    Initialisation as torch: the input projection weights Xavier-uniform, ``in_proj_bias`` and
    ``out_proj.bias`` zero, ``out_proj.weight`` as :class:`Linear`'s default, ``bias_k`` and
    ``bias_v`` Xavier-normal.

    The computation is torch's ``multi_head_attention_forward`` (its slow path: there is no
    fused fast path); see :meth:`forward` for the masks.

    Parameters
    ----------
    embed_dim : int
        The model width ``E`` (>= 1, divisible by ``num_heads``).
    num_heads : int
        The number of heads (>= 1).
    dropout : float, default 0.0
        Dropout probability on the attention weights, in training mode.
    bias : bool, default True
        Learn ``in_proj_bias`` and ``out_proj.bias``.
    add_bias_kv : bool, default False
        Learn ``bias_k`` and ``bias_v``, appended to the projected keys and values as one more
        source position.
    add_zero_attn : bool, default False
        Append a zero key and value (after ``bias_k`` / ``bias_v``) as one more source position.
    kdim : int, optional
        The width of ``key`` (default ``embed_dim``).
    vdim : int, optional
        The width of ``value`` (default ``embed_dim``).
    batch_first : bool, default False
        Batched inputs and output are (N, L, E) rather than (L, N, E).
    device : str, optional
        ``"cuda"`` moves the parameters to the GPU after initialisation.
    dtype : numpy.dtype or type, optional
        float32 (the default) or float64, for the parameters; the inputs must have the same
        dtype.

    Raises
    ------
    ValueError
        If a size is < 1, ``embed_dim`` is not divisible by ``num_heads`` or ``dropout`` is not
        in [0, 1].
    TypeError
        If a size is not an int, ``dropout`` is not a number or ``dtype`` is not float32 or
        float64.

    See Also
    --------
    DeformableTransformerDecoderLayer : Uses it as its self-attention.
    MSDeformAttn : Multi-scale deformable attention.

    """

    def __init__(
        self,
        embed_dim: int,
        num_heads: int,
        dropout: float = 0.0,
        bias: bool = True,
        add_bias_kv: bool = False,
        add_zero_attn: bool = False,
        kdim: int | None = None,
        vdim: int | None = None,
        batch_first: bool = False,
        device: Any = None,
        dtype: Any = None,
    ) -> None:
        super().__init__()
        name = "MultiheadAttention"
        E = integer(name, "embed_dim", embed_dim, 1)
        H = integer(name, "num_heads", num_heads, 1)
        if E % H:
            raise ValueError(f"{name}: embed_dim must be divisible by num_heads, got {E} and {H}")
        dt = _dtype(name, dtype)
        self.embed_dim = E
        self.kdim = E if kdim is None else integer(name, "kdim", kdim, 1)
        self.vdim = E if vdim is None else integer(name, "vdim", vdim, 1)
        self._qkv_same_embed_dim = self.kdim == E and self.vdim == E
        self.num_heads = H
        self.dropout = _probability(name, "dropout", dropout)
        self.batch_first = bool(batch_first)
        self.head_dim = E // H
        if self._qkv_same_embed_dim:
            self.in_proj_weight = Parameter(np.empty((3 * E, E), dt))
            self.register_parameter("q_proj_weight", None)
            self.register_parameter("k_proj_weight", None)
            self.register_parameter("v_proj_weight", None)
        else:
            self.q_proj_weight = Parameter(np.empty((E, E), dt))
            self.k_proj_weight = Parameter(np.empty((E, self.kdim), dt))
            self.v_proj_weight = Parameter(np.empty((E, self.vdim), dt))
            self.register_parameter("in_proj_weight", None)
        if bias:
            self.in_proj_bias = Parameter(np.empty((3 * E,), dt))
        else:
            self.register_parameter("in_proj_bias", None)
        self.out_proj = Linear(E, E, bias=bias, dtype=dt)
        if add_bias_kv:
            self.bias_k = Parameter(np.empty((1, 1, E), dt))
            self.bias_v = Parameter(np.empty((1, 1, E), dt))
        else:
            self.register_parameter("bias_k", None)
            self.register_parameter("bias_v", None)
        self.add_zero_attn = bool(add_zero_attn)
        self._reset_parameters()
        if device is not None and device != "cpu":
            self.to(device)

    def _reset_parameters(self) -> None:
        if self._qkv_same_embed_dim:
            init.xavier_uniform_(self.in_proj_weight)
        else:
            init.xavier_uniform_(self.q_proj_weight)
            init.xavier_uniform_(self.k_proj_weight)
            init.xavier_uniform_(self.v_proj_weight)
        if self.in_proj_bias is not None:
            init.constant_(self.in_proj_bias, 0.0)
            init.constant_(self.out_proj.bias, 0.0)
        if self.bias_k is not None:
            init.xavier_normal_(self.bias_k)
            init.xavier_normal_(self.bias_v)

    def _mask(self, mask: Any, arg: str, dtype: np.dtype, like: Tensor) -> Tensor | None:
        """torch's ``_canonical_mask``: bool -> 0 / -inf in ``dtype``; float kept (same dtype)."""
        if mask is None:
            return None
        name = "MultiheadAttention"
        if isinstance(mask, Tensor):
            t = mask
        else:
            a = _raw(mask)
            if not hasattr(a, "dtype"):
                a = np.asarray(a)
            t = Tensor(a) if a.dtype == np.bool_ else _tensor(a)
        if t.dtype == np.bool_:
            a = np.where(_host(t), -np.inf, 0.0).astype(dtype)
            return _like(a, like)
        if t.dtype.kind != "f":
            raise TypeError(
                f"{name}: only bool and floating types of {arg} are supported, got {t.dtype}"
            )
        if t.dtype != dtype:
            raise TypeError(f"{name}: a float {arg} must be {dtype} like the inputs, got {t.dtype}")
        return t

    def forward(
        self,
        query: TensorLike,
        key: TensorLike,
        value: TensorLike,
        key_padding_mask: TensorLike | None = None,
        need_weights: bool = True,
        attn_mask: TensorLike | None = None,
        average_attn_weights: bool = True,
        is_causal: bool = False,
    ) -> tuple[Tensor, Tensor | None]:
        r"""Attend from ``query`` to ``key`` / ``value``, as torch's ``MultiheadAttention``.

        A bool mask marks with True the pairs that may not attend (they get :math:`-\infty`
        before the softmax); a float mask is added to the scores. ``key_padding_mask`` and
        ``attn_mask`` add up. A row whose every score is :math:`-\infty` gives NaN with
        ``need_weights=True`` and zeros with ``need_weights=False``, as torch (its softmax, and
        the "safe" softmax of its ``scaled_dot_product_attention``).

        Parameters
        ----------
        query : Tensor or array_like, shape (L, N, E), (N, L, E) if batch_first, or (L, E)
            The queries (2-d: one unbatched sequence), in the layer's dtype.
        key : Tensor or array_like, shape (S, N, kdim), (N, S, kdim) if batch_first, or (S, kdim)
            The keys, batched like ``query``.
        value : Tensor or array_like, shape (S, N, vdim), (N, S, vdim) if batch_first, or (S, vdim)
            The values, batched like ``query``.
        key_padding_mask : array_like of bool or Tensor of float, shape (N, S) or (S,), optional
            Source positions to ignore per batch element (True: ignore) or a float bias.
        need_weights : bool, default True
            Also return the attention weights.
        attn_mask : array_like of bool or Tensor of float, optional
            Shape (L, S), or (N * num_heads, L, S) (batched) / (num_heads, L, S) (unbatched),
            batch-major; True: may not attend, or a float bias.
        average_attn_weights : bool, default True
            Return the weights averaged over the heads rather than per head.
        is_causal : bool, default False
            A hint that ``attn_mask`` is the causal mask, which it then requires (as torch).
            With ``need_weights=False`` and no ``key_padding_mask`` torch then applies the
            causal mask (key ``s`` hidden from query ``l`` when ``s > l``) in place of
            ``attn_mask``; so does this layer.

        Returns
        -------
        attn_output : Tensor, shape (L, N, E), (N, L, E) if batch_first, or (L, E)
            Differentiable in ``query``, ``key``, ``value``, float masks and every parameter.
        attn_weights : Tensor or None
            With ``need_weights``: (N, L, S') averaged over heads, or (N, num_heads, L, S')
            (unbatched: without N), ``S'`` counting ``bias_k`` / ``add_zero_attn`` positions;
            after dropout in training mode, as torch. None otherwise.

        Raises
        ------
        ValueError
            If a shape is inconsistent (``query`` not 2-d or 3-d, ``key`` / ``value`` batched
            differently, widths not ``embed_dim`` / ``kdim`` / ``vdim``, masks of the wrong
            shape), or ``is_causal`` is set without ``attn_mask``.
        TypeError
            If an input does not have the parameters' dtype, or a mask is neither bool nor
            float in that dtype.

        See Also
        --------
        DeformableTransformerDecoderLayer : Uses it as its self-attention.

        """
        name = "MultiheadAttention"
        query, key, value = _tensor(query), _tensor(key), _tensor(value)
        E, H, hd = self.embed_dim, self.num_heads, self.head_dim
        dtype = self.out_proj.weight.dtype
        if query.ndim not in (2, 3):
            raise ValueError(
                f"{name}: query must be 2-d (L, E) unbatched or 3-d batched, got shape "
                f"{query.shape}"
            )
        batched = query.ndim == 3
        if key.ndim != query.ndim or value.ndim != query.ndim:
            raise ValueError(
                f"{name}: for a {query.ndim}-d query, key and value must be {query.ndim}-d, got "
                f"shapes {key.shape} and {value.shape}"
            )
        for arg, t in (("query", query), ("key", key), ("value", value)):
            if t.dtype != dtype:
                raise TypeError(
                    f"{name}: {arg} must be {dtype} like the layer's parameters, got {t.dtype}"
                )
        if batched and self.batch_first:
            query, key, value = query.transpose(0, 1), key.transpose(0, 1), value.transpose(0, 1)
        if not batched:
            query, key, value = query.unsqueeze(1), key.unsqueeze(1), value.unsqueeze(1)
        L, N, Eq = query.shape
        S = key.shape[0]
        layout = "(N, L, E)" if batched and self.batch_first else "(L, N, E)"
        if Eq != E:
            raise ValueError(f"{name}: query must be {layout} with E = {E}, got width {Eq}")
        if key.shape[2] != self.kdim or value.shape[2] != self.vdim:
            raise ValueError(
                f"{name}: key and value must have widths kdim = {self.kdim} and vdim = "
                f"{self.vdim}, got {key.shape[2]} and {value.shape[2]}"
            )
        if key.shape[:2] != value.shape[:2] or key.shape[1] != N:
            raise ValueError(
                f"{name}: key and value must have the query's batch size {N} and one length S, "
                f"got shapes {tuple(key.shape)} and {tuple(value.shape)} (as (S, N, .))"
            )

        kpm = self._mask(key_padding_mask, "key_padding_mask", dtype, query)
        if kpm is not None:
            expected = (N, S) if batched else (S,)
            if tuple(kpm.shape) != expected:
                raise ValueError(
                    f"{name}: key_padding_mask must have shape {expected} (N, S), got "
                    f"{tuple(kpm.shape)}"
                )
            kpm = kpm.reshape(N, S)
        if is_causal and attn_mask is None:
            raise ValueError(
                f"{name}: is_causal=True needs attn_mask (the causal mask), as torch; got "
                f"attn_mask=None"
            )
        # torch then hands is_causal to scaled_dot_product_attention in place of attn_mask
        sdpa_causal = bool(is_causal) and kpm is None and not need_weights
        am = None if sdpa_causal else self._mask(attn_mask, "attn_mask", dtype, query)
        if am is not None:
            if am.ndim == 2 and tuple(am.shape) == (L, S):
                am = am.reshape(1, L, S)
            elif am.ndim == 3 and tuple(am.shape) == (N * H, L, S):
                pass
            else:
                expected = f"(L, S) = {(L, S)} or (N * num_heads, L, S) = {(N * H, L, S)}"
                if not batched:
                    expected = f"(L, S) = {(L, S)} or (num_heads, L, S) = {(H, L, S)}"
                raise ValueError(
                    f"{name}: attn_mask must have shape {expected}, got {tuple(am.shape)}"
                )

        # in-projection
        if self._qkv_same_embed_dim:
            w = self.in_proj_weight
            w_q, w_k, w_v = w[0:E], w[E : 2 * E], w[2 * E :]
        else:
            w_q, w_k, w_v = self.q_proj_weight, self.k_proj_weight, self.v_proj_weight
        b = self.in_proj_bias
        b_q, b_k, b_v = (None, None, None) if b is None else (b[0:E], b[E : 2 * E], b[2 * E :])
        q = F.linear(query, w_q, b_q)  # (L, N, E)
        k = F.linear(key, w_k, b_k)  # (S, N, E)
        v = F.linear(value, w_v, b_v)

        if self.bias_k is not None:
            k = F.cat([k, F.expand(self.bias_k, 1, N, E)], 0)
            v = F.cat([v, F.expand(self.bias_v, 1, N, E)], 0)
            am = None if am is None else F.pad(am, (0, 1))
            kpm = None if kpm is None else F.pad(kpm, (0, 1))
        q = q.reshape(L, N * H, hd).transpose(0, 1)  # (N*H, L, hd)
        k = k.reshape(k.shape[0], N * H, hd).transpose(0, 1)
        v = v.reshape(v.shape[0], N * H, hd).transpose(0, 1)
        if self.add_zero_attn:
            zeros = _like(np.zeros((N * H, 1, hd), dtype), query)
            k = F.cat([k, zeros], 1)
            v = F.cat([v, zeros], 1)
            am = None if am is None else F.pad(am, (0, 1))
            kpm = None if kpm is None else F.pad(kpm, (0, 1))
        S2 = k.shape[1]
        if sdpa_causal:  # its causal mask: key s hidden from query l when s > l
            causal = np.triu(np.ones((L, S2), dtype=bool), 1)
            am = _like(np.where(causal, -np.inf, 0.0).astype(dtype).reshape(1, L, S2), query)
        if kpm is not None:
            kpm = F.expand(kpm.reshape(N, 1, 1, S2), N, H, 1, S2).reshape(N * H, 1, S2)
            am = kpm if am is None else am + kpm

        scores = F.matmul(q * math.sqrt(1.0 / float(hd)), k.transpose(1, 2))  # (N*H, L, S2)
        if am is not None:
            scores = am + scores
        if need_weights:
            weights = F.softmax(scores, -1)
        else:  # torch's scaled_dot_product_attention: rows of -inf only give zeros
            dead = np.all(_host(scores) == -np.inf, axis=-1, keepdims=True)
            if dead.any():
                dead_t = _like(dead, query)
                weights = F.masked_fill(
                    F.softmax(F.masked_fill(scores, dead_t, 0.0), -1), dead_t, 0.0
                )
            else:
                weights = F.softmax(scores, -1)
        if self.training and self.dropout > 0.0:
            weights = F.dropout(weights, self.dropout, True)
        out = F.matmul(weights, v)  # (N*H, L, hd)
        out = out.transpose(0, 1).reshape(L * N, E)
        out = self.out_proj(out).reshape(L, N, E)
        if not batched:
            out = out.squeeze(1)
        elif self.batch_first:
            out = out.transpose(0, 1)
        if not need_weights:
            return out, None
        weights = weights.reshape(N, H, L, S2)
        if average_attn_weights:
            weights = F.mean(weights, 1)
        if not batched:
            weights = weights.squeeze(0)
        return out, weights

    def extra_repr(self) -> str:
        """Return the layer's settings as shown in its ``repr``.

        Returns
        -------
        str
            The constructor arguments, ``name=value`` separated by commas.

        """
        return (
            f"embed_dim={self.embed_dim}, num_heads={self.num_heads}, dropout={self.dropout}, "
            f"kdim={self.kdim}, vdim={self.vdim}, batch_first={self.batch_first}"
        )


# --------------------------------------------------------------- Deformable-DETR's transformer


def _activation(name: str, activation: Any) -> Callable[[Tensor], Tensor]:
    if activation == "relu":
        return F.relu
    if activation == "gelu":
        return F.gelu
    raise ValueError(
        f"{name}: activation should be relu/gelu, not {activation!r} (Deformable-DETR's 'glu' "
        f"halves the width, which linear2 cannot take)"
    )


def _with_pos_embed(tensor: Tensor, pos: TensorLike | None) -> Tensor:
    return tensor if pos is None else tensor + _tensor(pos)


def _get_clones(module: Module, n: int) -> ModuleList:
    return ModuleList([copy.deepcopy(module) for _ in range(n)])


def inverse_sigmoid(x: TensorLike, eps: float = 1e-5) -> Tensor:
    """Deformable-DETR's ``inverse_sigmoid``: ``log(x1 / x2)``, x clamped to [0, 1], ``x1 =
    max(x, eps)``, ``x2 = max(1 - x, eps)``.

    Parameters
    ----------
    x : Tensor or array_like
        Values, ideally in (0, 1).
    eps : float, default 1e-5
        The clamp that keeps the logarithm finite.

    Returns
    -------
    Tensor
        ``x``'s shape; differentiable where the clamps are inactive.

    """
    x = F.clamp(_tensor(x), 0.0, 1.0)
    x1 = F.clamp(x, eps)
    x2 = F.clamp(1.0 - x, eps)
    return F.log(x1 / x2)


class DeformableTransformerEncoderLayer(Module):
    """Deformable-DETR's encoder layer: multi-scale deformable self-attention, then an FFN.

    ``src = norm1(src + dropout1(self_attn(src + pos, reference_points, src, ...)))``, then
    ``src = norm2(src + dropout3(linear2(dropout2(activation(linear1(src))))))``, with
    Deformable-DETR's attribute names (``self_attn`` an :class:`MSDeformAttn`, ``dropout1``,
    ``norm1``, ``linear1``, ``activation`` (a function, no parameters), ``dropout2``,
    ``linear2``, ``dropout3``, ``norm2``), so its state dict loads by name.

    Parameters
    ----------
    d_model : int, default 256
        The model width.
    d_ffn : int, default 1024
        The FFN's hidden width.
    dropout : float, default 0.1
        The dropout probability of every dropout layer (training mode only).
    activation : {"relu", "gelu"}, default "relu"
        The FFN's activation.
    n_levels : int, default 4
        The number of feature levels.
    n_heads : int, default 8
        The number of attention heads.
    n_points : int, default 4
        Sampling points per head and level.
    device : str, optional
        A deformnp extra: ``"cuda"`` moves the parameters to the GPU after initialisation.
    dtype : numpy.dtype or type, optional
        A deformnp extra: float32 (the default) or float64.

    Raises
    ------
    ValueError
        If ``activation`` is not "relu" or "gelu", ``dropout`` not in [0, 1], or a size is
        invalid for :class:`MSDeformAttn` / :class:`Linear`.
    TypeError
        If a size is not an int or ``dtype`` is not float32 or float64.

    See Also
    --------
    DeformableTransformerEncoder : Stacks copies of it.
    MSDeformAttn : The attention.

    """

    def __init__(
        self,
        d_model: int = 256,
        d_ffn: int = 1024,
        dropout: float = 0.1,
        activation: str = "relu",
        n_levels: int = 4,
        n_heads: int = 8,
        n_points: int = 4,
        device: Any = None,
        dtype: Any = None,
    ) -> None:
        super().__init__()
        name = "DeformableTransformerEncoderLayer"
        p = _probability(name, "dropout", dropout)
        act = _activation(name, activation)
        self.self_attn = MSDeformAttn(d_model, n_levels, n_heads, n_points, dtype=dtype)
        self.dropout1 = Dropout(p)
        self.norm1 = LayerNorm(d_model, dtype=dtype)
        self.linear1 = Linear(d_model, d_ffn, dtype=dtype)
        self.activation = act
        self.dropout2 = Dropout(p)
        self.linear2 = Linear(d_ffn, d_model, dtype=dtype)
        self.dropout3 = Dropout(p)
        self.norm2 = LayerNorm(d_model, dtype=dtype)
        if device is not None and device != "cpu":
            self.to(device)

    @staticmethod
    def with_pos_embed(tensor: TensorLike, pos: TensorLike | None) -> Tensor:
        """Return ``tensor + pos``, or ``tensor`` when ``pos`` is None.

        Parameters
        ----------
        tensor : Tensor or array_like
            The features.
        pos : Tensor or array_like, optional
            The position embedding, broadcastable to ``tensor``.

        Returns
        -------
        Tensor
            The sum.

        """
        return _with_pos_embed(_tensor(tensor), pos)

    def forward_ffn(self, src: TensorLike) -> Tensor:
        """The FFN block: ``norm2(src + dropout3(linear2(dropout2(activation(linear1(src))))))``.

        Parameters
        ----------
        src : Tensor or array_like, shape (N, S, d_model)
            The features.

        Returns
        -------
        Tensor, shape (N, S, d_model)
            The updated features.

        """
        src = _tensor(src)
        src2 = self.linear2(self.dropout2(self.activation(self.linear1(src))))
        return self.norm2(src + self.dropout3(src2))

    def forward(
        self,
        src: TensorLike,
        pos: TensorLike | None,
        reference_points: TensorLike,
        spatial_shapes: ArrayLike,
        level_start_index: ArrayLike,
        padding_mask: ArrayLike | None = None,
    ) -> Tensor:
        """Deformable self-attention over the flattened levels, then the FFN.

        Parameters
        ----------
        src : Tensor or array_like, shape (N, S, d_model)
            The flattened feature maps of all levels (``S = sum_l H_l * W_l``).
        pos : Tensor or array_like, shape (N, S, d_model), or None
            The position (and level) embedding, added to the queries only.
        reference_points : Tensor or array_like, shape (N, S, n_levels, 2)
            Normalized ``(x, y)`` per position and level
            (:meth:`DeformableTransformerEncoder.get_reference_points`).
        spatial_shapes : array_like of int, shape (n_levels, 2)
            Rows ``(H_l, W_l)``.
        level_start_index : array_like of int, shape (n_levels,)
            The first row of each level in ``src``.
        padding_mask : array_like of bool, shape (N, S), optional
            True at padding positions.

        Returns
        -------
        Tensor, shape (N, S, d_model)
            Differentiable in ``src``, ``pos``, ``reference_points`` and every parameter.

        See Also
        --------
        MSDeformAttn.forward : The attention and its checks.

        """
        src = _tensor(src)
        src2 = self.self_attn(
            _with_pos_embed(src, pos),
            reference_points,
            src,
            spatial_shapes,
            level_start_index,
            padding_mask,
        )
        src = self.norm1(src + self.dropout1(src2))
        return self.forward_ffn(src)


class DeformableTransformerEncoder(Module):
    """Deformable-DETR's encoder: ``num_layers`` copies of an encoder layer (``layers``).

    Parameters
    ----------
    encoder_layer : DeformableTransformerEncoderLayer
        The layer to copy (deep copies: each starts with its parameters).
    num_layers : int
        The number of layers (>= 0).

    Raises
    ------
    TypeError
        If ``encoder_layer`` is not a Module or ``num_layers`` not an int.
    ValueError
        If ``num_layers`` is negative.

    See Also
    --------
    DeformableTransformerEncoderLayer : The layer.

    """

    def __init__(self, encoder_layer: Module, num_layers: int) -> None:
        super().__init__()
        name = "DeformableTransformerEncoder"
        if not isinstance(encoder_layer, Module):
            raise TypeError(
                f"{name}: encoder_layer must be a Module, got {type(encoder_layer).__name__}"
            )
        self.num_layers = integer(name, "num_layers", num_layers, 0)
        self.layers = _get_clones(encoder_layer, self.num_layers)

    @staticmethod
    def get_reference_points(
        spatial_shapes: ArrayLike, valid_ratios: TensorLike, device: Any = None
    ) -> Tensor:
        """Pixel centres of every level, normalized by the valid (unpadded) size, per level.

        For level ``l`` the centres ``((j + 0.5) / (r_x W_l), (i + 0.5) / (r_y H_l))`` (row-major),
        ``(r_x, r_y) = valid_ratios[:, l]``, concatenated over the levels and multiplied by
        every level's ratios: ``ref[n, s, l'] = centre[n, s] * valid_ratios[n, l']``.

        Parameters
        ----------
        spatial_shapes : array_like of int, shape (L, 2)
            Rows ``(H_l, W_l)``.
        valid_ratios : Tensor or array_like, shape (N, L, 2)
            The valid fraction ``(r_x, r_y)`` of each level's width and height.
        device : str, optional
            Accepted as Deformable-DETR; the result is on ``valid_ratios``' device.

        Returns
        -------
        Tensor, shape (N, sum_l H_l * W_l, L, 2)
            In ``valid_ratios``' dtype; differentiable in ``valid_ratios``.

        Raises
        ------
        ValueError
            If ``valid_ratios`` is not (N, L, 2) with ``L`` levels of ``spatial_shapes``.

        """
        name = "DeformableTransformerEncoder"
        shapes = index_array(name, "spatial_shapes", _host(spatial_shapes))
        vr = _tensor(valid_ratios)
        L = shapes.shape[0] if shapes.ndim == 2 else -1
        if shapes.ndim != 2 or shapes.shape[1] != 2 or vr.ndim != 3 or vr.shape[1:] != (L, 2):
            raise ValueError(
                f"{name}: spatial_shapes must be (L, 2) and valid_ratios (N, L, 2), got shapes "
                f"{shapes.shape} and {tuple(vr.shape)}"
            )
        dtype = vr.dtype
        refs = []
        for lvl, (h, w) in enumerate(shapes.tolist()):
            ys, xs = np.meshgrid(
                np.arange(h, dtype=dtype) + 0.5, np.arange(w, dtype=dtype) + 0.5, indexing="ij"
            )
            ref_y = _like(ys.reshape(1, -1), vr) / (vr[:, None, lvl, 1] * float(h))
            ref_x = _like(xs.reshape(1, -1), vr) / (vr[:, None, lvl, 0] * float(w))
            refs.append(F.stack([ref_x, ref_y], -1))
        ref = F.cat(refs, 1)
        return ref[:, :, None] * vr[:, None]

    def forward(
        self,
        src: TensorLike,
        spatial_shapes: ArrayLike,
        level_start_index: ArrayLike,
        valid_ratios: TensorLike,
        pos: TensorLike | None = None,
        padding_mask: ArrayLike | None = None,
    ) -> Tensor:
        """Run the layers in turn with the reference points of :meth:`get_reference_points`.

        Parameters
        ----------
        src : Tensor or array_like, shape (N, S, d_model)
            The flattened feature maps of all levels.
        spatial_shapes : array_like of int, shape (L, 2)
            Rows ``(H_l, W_l)``.
        level_start_index : array_like of int, shape (L,)
            The first row of each level in ``src``.
        valid_ratios : Tensor or array_like, shape (N, L, 2)
            The valid fraction ``(r_x, r_y)`` of each level.
        pos : Tensor or array_like, shape (N, S, d_model), optional
            The position embedding.
        padding_mask : array_like of bool, shape (N, S), optional
            True at padding positions.

        Returns
        -------
        Tensor, shape (N, S, d_model)
            The memory; differentiable in ``src``, ``valid_ratios``, ``pos`` and every
            parameter.

        """
        output = _tensor(src)
        reference_points = self.get_reference_points(spatial_shapes, valid_ratios)
        for layer in self.layers:
            output = layer(
                output, pos, reference_points, spatial_shapes, level_start_index, padding_mask
            )
        return output


class DeformableTransformerDecoderLayer(Module):
    """Deformable-DETR's decoder layer: self-attention, deformable cross-attention, FFN.

    ``tgt = norm2(tgt + dropout2(self_attn(tgt + query_pos, tgt + query_pos, tgt)))`` (a
    :class:`MultiheadAttention`, sequence-first), then
    ``tgt = norm1(tgt + dropout1(cross_attn(tgt + query_pos, reference_points, src, ...)))``
    (an :class:`MSDeformAttn`), then ``tgt = norm3(tgt + dropout4(linear2(dropout3(
    activation(linear1(tgt))))))``. Attribute names as Deformable-DETR (``cross_attn``,
    ``dropout1``, ``norm1``, ``self_attn``, ``dropout2``, ``norm2``, ``linear1``,
    ``activation``, ``dropout3``, ``linear2``, ``dropout4``, ``norm3``).

    Parameters
    ----------
    d_model : int, default 256
        The model width.
    d_ffn : int, default 1024
        The FFN's hidden width.
    dropout : float, default 0.1
        The dropout probability of every dropout layer and of the self-attention weights.
    activation : {"relu", "gelu"}, default "relu"
        The FFN's activation.
    n_levels : int, default 4
        The number of feature levels.
    n_heads : int, default 8
        The number of attention heads (both attentions).
    n_points : int, default 4
        Sampling points per head and level.
    device : str, optional
        A deformnp extra: ``"cuda"`` moves the parameters to the GPU after initialisation.
    dtype : numpy.dtype or type, optional
        A deformnp extra: float32 (the default) or float64.

    Raises
    ------
    ValueError
        If ``activation`` is not "relu" or "gelu", ``dropout`` not in [0, 1], or a size is
        invalid.
    TypeError
        If a size is not an int or ``dtype`` is not float32 or float64.

    See Also
    --------
    DeformableTransformerDecoder : Stacks copies of it.

    """

    def __init__(
        self,
        d_model: int = 256,
        d_ffn: int = 1024,
        dropout: float = 0.1,
        activation: str = "relu",
        n_levels: int = 4,
        n_heads: int = 8,
        n_points: int = 4,
        device: Any = None,
        dtype: Any = None,
    ) -> None:
        super().__init__()
        name = "DeformableTransformerDecoderLayer"
        p = _probability(name, "dropout", dropout)
        act = _activation(name, activation)
        self.cross_attn = MSDeformAttn(d_model, n_levels, n_heads, n_points, dtype=dtype)
        self.dropout1 = Dropout(p)
        self.norm1 = LayerNorm(d_model, dtype=dtype)
        self.self_attn = MultiheadAttention(d_model, n_heads, dropout=p, dtype=dtype)
        self.dropout2 = Dropout(p)
        self.norm2 = LayerNorm(d_model, dtype=dtype)
        self.linear1 = Linear(d_model, d_ffn, dtype=dtype)
        self.activation = act
        self.dropout3 = Dropout(p)
        self.linear2 = Linear(d_ffn, d_model, dtype=dtype)
        self.dropout4 = Dropout(p)
        self.norm3 = LayerNorm(d_model, dtype=dtype)
        if device is not None and device != "cpu":
            self.to(device)

    @staticmethod
    def with_pos_embed(tensor: TensorLike, pos: TensorLike | None) -> Tensor:
        """Return ``tensor + pos``, or ``tensor`` when ``pos`` is None.

        Parameters
        ----------
        tensor : Tensor or array_like
            The features.
        pos : Tensor or array_like, optional
            The position embedding, broadcastable to ``tensor``.

        Returns
        -------
        Tensor
            The sum.

        """
        return _with_pos_embed(_tensor(tensor), pos)

    def forward_ffn(self, tgt: TensorLike) -> Tensor:
        """The FFN block: ``norm3(tgt + dropout4(linear2(dropout3(activation(linear1(tgt))))))``.

        Parameters
        ----------
        tgt : Tensor or array_like, shape (N, Lq, d_model)
            The query features.

        Returns
        -------
        Tensor, shape (N, Lq, d_model)
            The updated features.

        """
        tgt = _tensor(tgt)
        tgt2 = self.linear2(self.dropout3(self.activation(self.linear1(tgt))))
        return self.norm3(tgt + self.dropout4(tgt2))

    def forward(
        self,
        tgt: TensorLike,
        query_pos: TensorLike | None,
        reference_points: TensorLike,
        src: TensorLike,
        src_spatial_shapes: ArrayLike,
        level_start_index: ArrayLike,
        src_padding_mask: ArrayLike | None = None,
    ) -> Tensor:
        """Self-attention among the queries, deformable cross-attention to ``src``, FFN.

        Parameters
        ----------
        tgt : Tensor or array_like, shape (N, Lq, d_model)
            The query features.
        query_pos : Tensor or array_like, shape (N, Lq, d_model), or None
            The query position embedding (added to the self-attention's queries and keys and
            to the cross-attention's queries).
        reference_points : Tensor or array_like, shape (N, Lq, n_levels, 2 or 4)
            Normalized points ``(x, y)`` or boxes ``(cx, cy, w, h)`` per query and level.
        src : Tensor or array_like, shape (N, S, d_model)
            The encoder memory.
        src_spatial_shapes : array_like of int, shape (n_levels, 2)
            Rows ``(H_l, W_l)``.
        level_start_index : array_like of int, shape (n_levels,)
            The first row of each level in ``src``.
        src_padding_mask : array_like of bool, shape (N, S), optional
            True at padding positions of ``src``.

        Returns
        -------
        Tensor, shape (N, Lq, d_model)
            Differentiable in ``tgt``, ``query_pos``, ``reference_points``, ``src`` and every
            parameter.

        See Also
        --------
        MultiheadAttention.forward, MSDeformAttn.forward : The attentions and their checks.

        """
        tgt = _tensor(tgt)
        q = k = _with_pos_embed(tgt, query_pos)
        tgt2 = self.self_attn(q.transpose(0, 1), k.transpose(0, 1), tgt.transpose(0, 1))[0]
        tgt = self.norm2(tgt + self.dropout2(tgt2.transpose(0, 1)))
        tgt2 = self.cross_attn(
            _with_pos_embed(tgt, query_pos),
            reference_points,
            src,
            src_spatial_shapes,
            level_start_index,
            src_padding_mask,
        )
        tgt = self.norm1(tgt + self.dropout1(tgt2))
        return self.forward_ffn(tgt)


class DeformableTransformerDecoder(Module):
    """Deformable-DETR's decoder: ``num_layers`` copies of a decoder layer (``layers``).

    ``bbox_embed`` and ``class_embed`` start as None, as Deformable-DETR's hooks: assign a
    :class:`ModuleList` of per-layer box heads to ``bbox_embed`` for iterative box refinement
    (each layer's output then refines the reference points, which are detached, as
    Deformable-DETR); ``class_embed`` is only read by :class:`DeformableTransformer`'s caller.

    Parameters
    ----------
    decoder_layer : DeformableTransformerDecoderLayer
        The layer to copy (deep copies).
    num_layers : int
        The number of layers (>= 0).
    return_intermediate : bool, default False
        Return every layer's output and reference points, stacked.

    Raises
    ------
    TypeError
        If ``decoder_layer`` is not a Module or ``num_layers`` not an int.
    ValueError
        If ``num_layers`` is negative.

    See Also
    --------
    DeformableTransformerDecoderLayer : The layer.

    """

    def __init__(
        self, decoder_layer: Module, num_layers: int, return_intermediate: bool = False
    ) -> None:
        super().__init__()
        name = "DeformableTransformerDecoder"
        if not isinstance(decoder_layer, Module):
            raise TypeError(
                f"{name}: decoder_layer must be a Module, got {type(decoder_layer).__name__}"
            )
        self.num_layers = integer(name, "num_layers", num_layers, 0)
        self.layers = _get_clones(decoder_layer, self.num_layers)
        self.return_intermediate = bool(return_intermediate)
        self.bbox_embed: Any = None
        self.class_embed: Any = None

    def forward(
        self,
        tgt: TensorLike,
        reference_points: TensorLike,
        src: TensorLike,
        src_spatial_shapes: ArrayLike,
        src_level_start_index: ArrayLike,
        src_valid_ratios: TensorLike,
        query_pos: TensorLike | None = None,
        src_padding_mask: ArrayLike | None = None,
    ) -> tuple[Tensor, Tensor]:
        """Run the layers in turn; reference points scaled by the valid ratios per level.

        Parameters
        ----------
        tgt : Tensor or array_like, shape (N, Lq, d_model)
            The query features.
        reference_points : Tensor or array_like, shape (N, Lq, 2) or (N, Lq, 4)
            Normalized points ``(x, y)`` or boxes ``(cx, cy, w, h)`` per query; each layer
            gets them times ``src_valid_ratios`` (the box size too) per level.
        src : Tensor or array_like, shape (N, S, d_model)
            The encoder memory.
        src_spatial_shapes : array_like of int, shape (L, 2)
            Rows ``(H_l, W_l)``.
        src_level_start_index : array_like of int, shape (L,)
            The first row of each level in ``src``.
        src_valid_ratios : Tensor or array_like, shape (N, L, 2)
            The valid fraction ``(r_x, r_y)`` of each level.
        query_pos : Tensor or array_like, shape (N, Lq, d_model), optional
            The query position embedding.
        src_padding_mask : array_like of bool, shape (N, S), optional
            True at padding positions of ``src``.

        Returns
        -------
        output : Tensor
            (N, Lq, d_model), or (num_layers, N, Lq, d_model) with ``return_intermediate``.
        reference_points : Tensor
            The final reference points (N, Lq, 2 or 4), or every layer's
            (num_layers, N, Lq, 2 or 4) with ``return_intermediate``.

        Raises
        ------
        ValueError
            If ``reference_points`` does not end in 2 or 4 coordinates.

        """
        name = "DeformableTransformerDecoder"
        output = _tensor(tgt)
        reference_points = _tensor(reference_points)
        vr = _tensor(src_valid_ratios)
        if reference_points.ndim != 3 or reference_points.shape[-1] not in (2, 4):
            raise ValueError(
                f"{name}: reference_points must be (N, Lq, 2) or (N, Lq, 4), got shape "
                f"{tuple(reference_points.shape)}"
            )
        intermediate, intermediate_reference_points = [], []
        for lid, layer in enumerate(self.layers):
            if reference_points.shape[-1] == 4:
                reference_points_input = reference_points[:, :, None] * F.cat([vr, vr], -1)[:, None]
            else:
                reference_points_input = reference_points[:, :, None] * vr[:, None]
            output = layer(
                output,
                query_pos,
                reference_points_input,
                src,
                src_spatial_shapes,
                src_level_start_index,
                src_padding_mask,
            )
            if self.bbox_embed is not None:  # iterative bounding box refinement
                tmp = self.bbox_embed[lid](output)
                if reference_points.shape[-1] == 4:
                    new_reference_points = F.sigmoid(tmp + inverse_sigmoid(reference_points))
                else:
                    head = tmp[..., :2] + inverse_sigmoid(reference_points)
                    new_reference_points = F.sigmoid(F.cat([head, tmp[..., 2:]], -1))
                reference_points = new_reference_points.detach()
            if self.return_intermediate:
                intermediate.append(output)
                intermediate_reference_points.append(reference_points)
        if self.return_intermediate:
            return F.stack(intermediate), F.stack(intermediate_reference_points)
        return output, reference_points
