"""DAT's deformable attention layers (LeapLabTHU/DAT), one computation behind three constructors.

* :class:`DAttentionBaseline`: the current layer (DAT++, ``models/dat_blocks.py`` of DAT's main
  branch), with every option: the log-spaced continuous position bias (``log_cpb``), the
  depthwise-convolution position encoding (``dwc_pe``), the fixed bias table (``fixed_pe``), the
  sampled relative bias table, ``no_off`` (average pooling instead of deformable sampling) and
  dropout.
* :class:`DAttentionBaselineCVPR2022`: the CVPR 2022 layer (DAT's ``CVPR2022`` tag).
* :class:`DeformableAttention2d`: the CVPR 2022 layer's default options with a deformnp-style
  constructor (``channels``, keyword defaults; see :doc:`/ops/dat`).

All keep DAT's attribute and parameter names, so a DAT state dict loads by name
(``layer.load_state_dict(torch_module.state_dict())``), and all return DAT's
``(y, pos, reference)``. A state dict that shows the other DAT variant's layout is refused.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import numpy as np

from .. import functional as F
from ..ops.grid_sample import grid_sample
from ..tensor import Tensor
from ..typing import TensorLike
from ..validation import boolean, integer, pair, real
from . import init
from .layers import GELU, Conv2d, Dropout, LayerNorm, Linear, ReLU, Sequential
from .module import Module, Parameter

__all__ = [
    "DAttentionBaseline",
    "DAttentionBaselineCVPR2022",
    "DeformableAttention2d",
    "LayerNormProxy",
]

#: The log-CPB MLP of DAT++ (``Linear(2, 32)``, ``ReLU``, ``Linear(32, n_group_heads)``).
_MLP_KEYS = ("rpe_table.0.weight", "rpe_table.0.bias", "rpe_table.2.weight")
#: The CVPR 2022 layer's offset kernel per stage (``ksizes[stage_idx]``).
_CVPR_KSIZES = (9, 7, 5, 3)


def _tensor(x: Any) -> Tensor:
    return x if isinstance(x, Tensor) else Tensor(x)


def _probability(name: str, arg: str, v: Any) -> float:
    p = real(name, arg, v)
    if not 0.0 <= p <= 1.0:
        raise ValueError(f"{name}: {arg} must be in [0, 1], got {v!r}")
    return p


def _grid(H: int, W: int, start: float, h_div: float, w_div: float, dtype: Any) -> np.ndarray:
    """(H, W, 2) normalized (y, x): ((i + start) / h_div * 2 - 1, (j + start) / w_div * 2 - 1),
    in DAT++'s order of operations."""
    ys = (np.arange(H, dtype=np.float64) + start) / h_div * 2.0 - 1.0
    xs = (np.arange(W, dtype=np.float64) + start) / w_div * 2.0 - 1.0
    return np.stack(np.meshgrid(ys, xs, indexing="ij"), -1).astype(dtype)


def _shape(value: Any) -> tuple[int, ...]:
    return tuple(int(s) for s in getattr(value, "shape", np.shape(value)))


def _reference_points(H: int, W: int, dtype: Any) -> np.ndarray:
    """(H, W, 2) pixel centres as normalized (y, x): ((i + 0.5)/H*2 - 1, (j + 0.5)/W*2 - 1)."""
    return _grid(H, W, 0.5, H, W, dtype)


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


class _DAttention(Module):
    """What both DAT variants share: the checked arguments, the sub-layers and the forward.

    ``plus_plus`` selects DAT++'s rules (reference grid over ``(Hk - 1, Wk - 1)``, offset range
    ``1 / (Hk - 1)``, a zero offset for ``offset_range_factor == 0``, clamping for negative
    factors, ``no_off`` by average pooling, the log-CPB option) or CVPR 2022's (cell centres over
    ``(Hk, Wk)``, offset range ``1 / Hk``, raw offsets for a zero factor, ``tanh`` for negative
    ones).
    """

    _plus_plus: bool
    #: Keys only the other variant ever stores (evidence whatever their shape).
    _other_only: tuple[str, ...] = ()
    #: Whether ``q_size`` (and with it ``kv_size``) may be None: DeformableAttention2d without
    #: ``use_pe`` takes any H x W (no position table to size).
    _q_size_optional = False

    def _setup(
        self,
        q_size: Any,
        kv_size: Any,
        n_heads: int,
        n_head_channels: int,
        n_groups: int,
        attn_drop: float,
        proj_drop: float,
        stride: int,
        offset_range_factor: float,
        use_pe: bool,
        dwc_pe: bool,
        no_off: bool,
        fixed_pe: bool,
        ksize: int,
        log_cpb: bool,
        device: Any,
        dtype: Any,
    ) -> None:
        name = type(self).__name__
        if q_size is None and self._q_size_optional:  # no table to size: any H x W
            q_h = q_w = None
            kv = (None, None)
        else:
            q_h, q_w = pair(name, "q_size", q_size, 1)
            if self._plus_plus and kv_size is None:  # DAT++ ignores it
                kv = None
            else:
                kv = pair(name, "kv_size", kv_size, 1)
        for arg, v in (
            ("n_heads", n_heads),
            ("n_head_channels", n_head_channels),
            ("n_groups", n_groups),
            ("stride", stride),
        ):
            integer(name, arg, v, 1)
        if n_heads % n_groups:
            raise ValueError(
                f"{name}: n_heads ({n_heads}) must be divisible by n_groups ({n_groups})"
            )
        self.dwc_pe = boolean(name, "dwc_pe", dwc_pe)
        self.n_head_channels = int(n_head_channels)
        self.scale = self.n_head_channels**-0.5
        self.n_heads = int(n_heads)
        self.q_h, self.q_w = q_h, q_w
        if self._plus_plus:  # DAT++ ignores kv_size: the key grid is the query grid / stride
            self.kv_size = kv
            self.kv_h, self.kv_w = q_h // int(stride), q_w // int(stride)
        else:
            self.kv_h, self.kv_w = kv
        self.nc = self.n_head_channels * self.n_heads
        self.n_groups = int(n_groups)
        self.n_group_channels = self.nc // self.n_groups
        self.n_group_heads = self.n_heads // self.n_groups
        self.use_pe = boolean(name, "use_pe", use_pe)
        self.fixed_pe = boolean(name, "fixed_pe", fixed_pe)
        self.no_off = boolean(name, "no_off", no_off)
        self.offset_range_factor = real(name, "offset_range_factor", offset_range_factor)
        self.ksize = integer(name, "ksize", ksize, 1)
        self.log_cpb = boolean(name, "log_cpb", log_cpb)
        self.stride = int(stride)
        attn_p = _probability(name, "attn_drop", attn_drop)
        proj_p = _probability(name, "proj_drop", proj_drop)
        if self._plus_plus and self.use_pe and self.dwc_pe and self.no_off:
            raise ValueError(
                f"{name}: use_pe=True with dwc_pe=True and no_off=True is not a working DAT++ "
                f"configuration (DAT builds no rpe_table with no_off, but its forward adds the "
                f"depthwise-conv position encoding); set dwc_pe=False or no_off=False"
            )

        kk, Cg, C = self.ksize, self.n_group_channels, self.nc
        if self._plus_plus:
            pad_size = kk // 2 if kk != self.stride else 0
        else:
            pad_size = kk // 2
        self.pad_size = pad_size
        self.conv_offset = Sequential(
            Conv2d(Cg, Cg, kk, self.stride, pad_size, groups=Cg, dtype=dtype),
            LayerNormProxy(Cg, dtype=dtype),
            GELU(),
            Conv2d(Cg, 2, 1, 1, 0, bias=False, dtype=dtype),
        )
        if self._plus_plus and self.no_off:
            self.conv_offset.requires_grad_(False)  # as DAT++: frozen, unused
        self.proj_q = Conv2d(C, C, 1, 1, 0, dtype=dtype)
        self.proj_k = Conv2d(C, C, 1, 1, 0, dtype=dtype)
        self.proj_v = Conv2d(C, C, 1, 1, 0, dtype=dtype)
        self.proj_out = Conv2d(C, C, 1, 1, 0, dtype=dtype)
        self.proj_drop = Dropout(proj_p, inplace=True)
        self.attn_drop = Dropout(attn_p, inplace=True)

        pdt = self.proj_q.weight.dtype
        if self.use_pe and not (self._plus_plus and self.no_off):
            if self.dwc_pe:
                self.rpe_table = Conv2d(C, C, 3, 1, 1, groups=C, dtype=dtype)
            elif self.fixed_pe:
                shape = (self.n_heads, q_h * q_w, self.kv_h * self.kv_w)
                self.rpe_table = Parameter(np.zeros(shape, pdt))
                init.trunc_normal_(self.rpe_table, std=0.01)
            elif self._plus_plus and self.log_cpb:
                self.rpe_table = Sequential(
                    Linear(2, 32, bias=True, dtype=dtype),
                    ReLU(inplace=True),
                    Linear(32, self.n_group_heads, bias=False, dtype=dtype),
                )
            else:
                th, tw = (q_h, q_w) if self._plus_plus else (self.kv_h, self.kv_w)
                self.rpe_table = Parameter(np.zeros((self.n_heads, 2 * th - 1, 2 * tw - 1), pdt))
                init.trunc_normal_(self.rpe_table, std=0.01)
        else:
            self.rpe_table = None
        if device is not None and device != "cpu":
            self.to(device)

    # ------------------------------------------------------------------ state dicts
    def _rpe_kind(self) -> str:
        if self.rpe_table is None:
            return "none"
        if isinstance(self.rpe_table, Sequential):
            return "mlp"
        return "conv" if isinstance(self.rpe_table, Conv2d) else "table"

    def _counterpart(self) -> tuple[str, dict[str, tuple[tuple[int, ...], str]]]:
        """The other variant's name and the position-encoding entries it would store for the
        same arguments: key -> (shape, why)."""
        raise NotImplementedError

    def load_state_dict(self, state_dict: Mapping[str, Any], strict: bool = True) -> Module:
        """Load a DAT state dict by name, refusing one of the other DAT variant.

        The position-encoding entries (``rpe_table...``) are compared with this layer's and with
        what the other variant (:class:`DAttentionBaseline` or
        :class:`DAttentionBaselineCVPR2022`) stores for the same constructor arguments: keys
        only the other variant has (DAT++'s log-CPB MLP), or shapes that follow the other
        variant's sizing rule, raise a ValueError naming the keys. Where both variants store
        the same keys and shapes the dict loads (the parameters mean the same thing).

        Parameters
        ----------
        state_dict : mapping of str to array_like
            Values by dotted name, e.g. a DAT module's ``state_dict()`` (torch tensors are
            converted).
        strict : bool, default True
            Require the keys to match exactly.

        Returns
        -------
        Module
            ``self``.

        Raises
        ------
        ValueError
            If the dict is recognisably the other variant's, or a shape differs.
        KeyError
            With ``strict``, if keys are missing or unexpected.

        See Also
        --------
        deformnp.nn.Module.load_state_dict : The generic loader it calls.

        """
        name = type(self).__name__
        own = {
            k: tuple(v.shape)
            for k, v in self.state_dict().items()
            if k == "rpe_table" or k.startswith("rpe_table.")
        }
        other_name, other = self._counterpart()
        evidence = []
        given = [k for k in state_dict if k == "rpe_table" or k.startswith("rpe_table.")]
        for key in given:
            shape = _shape(state_dict[key])
            if own.get(key) == shape:
                continue
            if key in self._other_only:
                evidence.append(f"{key} {shape} (DAT++'s log-CPB position MLP, log_cpb=True)")
            elif key in other and other[key][0] == shape:
                evidence.append(f"{key} {shape} ({other[key][1]})")
        if strict and not given and own and not other:
            evidence.append(
                "no rpe_table (DAT++ builds no position encoding with no_off=True; the CVPR "
                "2022 layer keeps one)"
            )
        if evidence:
            expected = ", ".join(f"{k} {s}" for k, s in own.items()) or "no rpe_table"
            raise ValueError(
                f"{name}: refusing a state dict of {other_name}: {'; '.join(evidence)}; this "
                f"layer expects {expected}"
            )
        return super().load_state_dict(state_dict, strict)

    # ------------------------------------------------------------------ forward
    def _check_input(self, x: Tensor) -> None:
        """Raise if ``x`` is not (B, n_heads * n_head_channels, H, W) (a subclass may check
        more, or word it its own way, before anything is computed)."""
        if x.ndim != 4 or x.shape[1] != self.nc:
            raise ValueError(
                f"{type(self).__name__}: x must be (B, n_heads * n_head_channels, H, W) = "
                f"(B, {self.nc}, H, W), got shape {tuple(x.shape)}"
            )

    def _forward(self, x: TensorLike) -> tuple[Tensor, Tensor, Tensor]:
        name = type(self).__name__
        plus = self._plus_plus
        x = _tensor(x)
        self._check_input(x)
        B, C, H, W = x.shape
        G, Cg, Mh, hc, hg = (
            self.n_groups,
            self.n_group_channels,
            self.n_heads,
            self.n_head_channels,
            self.n_group_heads,
        )
        dtype = x.dtype
        s = self.offset_range_factor
        skip_offsets = plus and self.no_off

        q = self.proj_q(x)
        if skip_offsets:  # DAT++ computes the offsets only to zero them: their size suffices
            Hk = (H + 2 * self.pad_size - self.ksize) // self.stride + 1
            Wk = (W + 2 * self.pad_size - self.ksize) // self.stride + 1
            if (Hk, Wk) != (H // self.stride, W // self.stride):
                raise ValueError(
                    f"{name}: no_off pools x by stride {self.stride} to "
                    f"{H // self.stride}x{W // self.stride}, but the offset grid is {Hk}x{Wk} "
                    f"(they must agree, as DAT asserts)"
                )
        else:
            offset = self.conv_offset(q.reshape(B * G, Cg, H, W))  # (B*G, 2, Hk, Wk): (dy, dx)
            Hk, Wk = offset.shape[2], offset.shape[3]
        if plus and (Hk < 2 or Wk < 2):
            raise ValueError(
                f"{name}: the offset grid is {Hk}x{Wk}, but DAT++ normalizes the reference "
                f"points by (Hk - 1, Wk - 1), so both must be >= 2"
            )
        Ns = Hk * Wk

        if plus:
            reference = _grid(Hk, Wk, 0.5, Hk - 1.0, Wk - 1.0, dtype)
        else:
            reference = _reference_points(Hk, Wk, dtype)
        reference = Tensor(np.ascontiguousarray(np.broadcast_to(reference, (B * G, Hk, Wk, 2))))
        if self.no_off:
            pos = reference  # the offsets are zero
        else:
            if (plus and s >= 0) or (not plus and s > 0):
                dh, dw = (Hk - 1.0, Wk - 1.0) if plus else (float(Hk), float(Wk))
                offset_range = np.array([1.0 / dh, 1.0 / dw], dtype=dtype).reshape(1, 2, 1, 1)
                offset = F.tanh(offset) * offset_range * s
            pos = offset.permute(0, 2, 3, 1) + reference
        if s < 0:
            pos = F.clamp(pos, -1.0, 1.0) if plus else F.tanh(pos)

        if skip_offsets:
            x_sampled = self._avg_pool(x, Hk, Wk)
        else:
            pos_xy = F.stack([pos[..., 1], pos[..., 0]], dim=-1)  # (y, x) -> (x, y)
            x_sampled = grid_sample(
                x.reshape(B * G, Cg, H, W), pos_xy, padding_mode="zeros", align_corners=True
            )  # (B*G, Cg, Hk, Wk)
        x_sampled = x_sampled.reshape(B, C, 1, Ns)

        q = q.reshape(B * Mh, hc, H * W)
        k = self.proj_k(x_sampled).reshape(B * Mh, hc, Ns)
        v = self.proj_v(x_sampled).reshape(B * Mh, hc, Ns)
        attn = F.matmul(q.transpose(1, 2), k) * self.scale  # (B*Mh, HW, Ns)

        residual = None
        if self.use_pe and not skip_offsets:
            if self.dwc_pe:
                residual = self.rpe_table(q.reshape(B, C, H, W)).reshape(B * Mh, hc, H * W)
            elif self.fixed_pe:
                if H * W != self.q_h * self.q_w or Ns != self.kv_h * self.kv_w:
                    raise ValueError(
                        f"{name}: the fixed_pe table is (n_heads, q_h*q_w, kv_h*kv_w) = "
                        f"{tuple(self.rpe_table.shape)}, but x gives H*W = {H * W} queries and "
                        f"Hk*Wk = {Ns} samples"
                    )
                bias = F.expand(self.rpe_table.reshape(1, Mh, H * W, Ns), B, Mh, H * W, Ns)
                attn = attn + bias.reshape(B * Mh, H * W, Ns)
            else:
                if plus:
                    if H < 2 or W < 2:
                        raise ValueError(
                            f"{name}: x is {H}x{W}, but DAT++ normalizes the query grid by "
                            f"(H - 1, W - 1), so H and W must be >= 2"
                        )
                    q_grid = _grid(H, W, 0.0, H - 1.0, W - 1.0, dtype)
                else:
                    q_grid = _reference_points(H, W, dtype)
                q_grid = Tensor(q_grid.reshape(1, H * W, 1, 2))
                displacement = q_grid - pos.reshape(B * G, 1, Ns, 2)  # (B*G, HW, Ns, 2)
                if plus and self.log_cpb:
                    disp = displacement * 4.0  # (d_y, d_x) in [-8, 8]
                    sign = Tensor(np.sign(disp.data))
                    disp = sign * (F.log(F.abs(disp) + 1.0) / math.log(2.0)) / math.log2(8.0)
                    bias = self.rpe_table(disp)  # (B*G, HW, Ns, hg)
                    bias = bias.permute(0, 3, 1, 2).reshape(B * Mh, H * W, Ns)
                else:
                    th, tw = self.rpe_table.shape[1], self.rpe_table.shape[2]
                    if not plus and (H, W) != (self.kv_h, self.kv_w):
                        raise ValueError(
                            f"{name}: x is {H}x{W} but the relative position bias table "
                            f"{tuple(self.rpe_table.shape)} was built for kv_size "
                            f"{(self.kv_h, self.kv_w)}"
                        )
                    table = F.expand(self.rpe_table.reshape(1, Mh, th, tw), B, Mh, th, tw)
                    table = table.reshape(B * G, hg, th, tw)
                    disp = displacement * 0.5
                    disp_xy = F.stack([disp[..., 1], disp[..., 0]], dim=-1)
                    bias = grid_sample(table, disp_xy, padding_mode="zeros", align_corners=True)
                    bias = bias.reshape(B * Mh, H * W, Ns)  # (B*G, hg, HW, Ns) per head
                attn = attn + bias

        attn = self.attn_drop(F.softmax(attn, dim=2))
        out = F.matmul(v, attn.transpose(1, 2))  # (B*Mh, hc, HW)
        if residual is not None:
            out = out + residual
        y = self.proj_drop(self.proj_out(out.reshape(B, C, H, W)))
        return y, pos.reshape(B, G, Hk, Wk, 2), reference.reshape(B, G, Hk, Wk, 2)

    def _avg_pool(self, x: Tensor, Hk: int, Wk: int) -> Tensor:
        """``avg_pool2d(x, kernel_size=stride, stride=stride)`` (no padding, floor mode)."""
        B, C = x.shape[0], x.shape[1]
        r = self.stride
        x = x[:, :, : Hk * r, : Wk * r].reshape(B, C, Hk, r, Wk, r)
        return F.mean(x, dim=(3, 5))

    def extra_repr(self) -> str:
        """Return the layer's settings as shown in its ``repr``.

        Returns
        -------
        str
            The main constructor arguments, ``name=value`` separated by commas.

        """
        return (
            f"q_size={(self.q_h, self.q_w)}, n_heads={self.n_heads}, "
            f"n_head_channels={self.n_head_channels}, n_groups={self.n_groups}, "
            f"stride={self.stride}, offset_range_factor={self.offset_range_factor}, "
            f"use_pe={self.use_pe}, dwc_pe={self.dwc_pe}, no_off={self.no_off}, "
            f"fixed_pe={self.fixed_pe}, ksize={self.ksize}, log_cpb={self.log_cpb}"
        )


class DAttentionBaseline(_DAttention):
    r"""DAT++'s deformable attention (``DAttentionBaseline`` of DAT's current ``dat_blocks.py``).

    DAT's constructor (all arguments positional and required, as DAT), attributes
    (``q_h``, ``kv_h``, ``nc``, ``n_group_heads``, ...), sub-layers and parameter names
    (``conv_offset.0``, ``conv_offset.1.norm``, ``conv_offset.3``, ``proj_q``, ``proj_k``,
    ``proj_v``, ``proj_out``, ``rpe_table``), so a DAT++ state dict loads by name; built from
    deformnp's autograd ops and :func:`deformnp.ops.grid_sample`. On x (B, C, H, W) with
    ``C = n_heads * n_head_channels`` and ``G = n_groups`` (the offsets shared by the
    ``n_heads / G`` heads of a group):

    1. ``q = proj_q(x)``; ``conv_offset`` (depthwise ``ksize`` conv with stride ``stride`` and
       padding ``ksize // 2``, or 0 when ``ksize == stride``; LayerNorm over channels; GELU;
       1x1 conv to 2 channels without bias) gives (dy, dx) on an Hk x Wk grid per group.
    2. ``offset_range_factor`` s >= 0: offset = s tanh(offset) (1/(Hk-1), 1/(Wk-1)) (so s = 0
       zeroes it); s < 0: raw offsets. ``no_off``: offset = 0.
    3. reference = ((i + 0.5)/(Hk - 1) 2 - 1, (j + 0.5)/(Wk - 1) 2 - 1) (DAT++'s grid, which
       reaches past 1 at the last row and column); pos = reference + offset, clamped to
       [-1, 1] when s < 0.
    4. x sampled at pos by bilinear ``grid_sample`` (zeros, ``align_corners=True``), or with
       ``no_off`` ``avg_pool2d(x, stride, stride)``; ``k``, ``v`` from ``proj_k``, ``proj_v``.
    5. attn = q^T k / sqrt(n_head_channels), (B n_heads, H W, Hk Wk), plus with ``use_pe`` (and
       not ``no_off``) a position term: ``dwc_pe``: a 3x3 depthwise conv of q added to the
       output instead; ``fixed_pe``: the table (n_heads, q_h q_w, kv_h kv_w) added as is;
       ``log_cpb``: an MLP (2 -> 32 -> n_group_heads, ReLU) of the log-spaced displacement
       :math:`\operatorname{sign}(d) \log_2(|d| + 1) / 3`, d = 4 (q_grid - pos); otherwise the
       table (n_heads, 2 q_h - 1, 2 q_w - 1) sampled bilinearly at (q_grid - pos) / 2, where
       q_grid = (i / (H - 1) 2 - 1, j / (W - 1) 2 - 1).
    6. softmax over the samples, ``attn_drop``, out = attn v (+ the dwc term),
       y = ``proj_drop(proj_out(out))``.

    Parameters
    ----------
    q_size : int or (int, int)
        The query map's ``(q_h, q_w)``: sizes the position tables (the default table is
        interpolated, so other input sizes work; ``fixed_pe`` needs ``H * W = q_h * q_w``).
    kv_size : int or (int, int) or None
        Ignored, as in DAT++ (which uses ``kv = q_size // stride``); kept for DAT's signature
        (and to recognise CVPR 2022 state dicts, which size their tables by it).
    n_heads : int
        The number of attention heads (>= 1, divisible by ``n_groups``).
    n_head_channels : int
        The channels per head; the layer has ``n_heads * n_head_channels`` channels.
    n_groups : int
        The number ``G`` of offset groups.
    attn_drop : float
        Dropout probability on the attention weights (training mode only).
    proj_drop : float
        Dropout probability on the output (training mode only).
    stride : int
        The stride of the offset network's depthwise convolution (and of ``no_off``'s pooling).
    offset_range_factor : float
        The offset scale s of step 2 (DAT++'s models use -1: raw offsets, clamped positions).
    use_pe : bool
        Add a position term (step 5).
    dwc_pe : bool
        With ``use_pe``: the depthwise-conv position encoding (``rpe_table`` is a 3x3 depthwise
        :class:`Conv2d`).
    no_off : bool
        No deformation: pool x instead of sampling it; no position term; ``conv_offset`` frozen
        (``requires_grad`` False, as DAT).
    fixed_pe : bool
        With ``use_pe`` and not ``dwc_pe``: a learned (n_heads, q_h q_w, kv_h kv_w) bias.
    ksize : int
        The kernel size of the offset network's depthwise convolution.
    log_cpb : bool
        With ``use_pe`` and neither ``dwc_pe`` nor ``fixed_pe``: the log-spaced continuous
        position bias MLP (``rpe_table.0``, ``rpe_table.2``), borrowed from Swin-V2.
    device : str, optional
        A deformnp extra: ``"cuda"`` moves the parameters to the GPU after initialisation.
    dtype : numpy.dtype or type, optional
        A deformnp extra: float32 (the default) or float64, for the parameters; the inputs must
        have the same dtype.

    Raises
    ------
    ValueError
        If a size is < 1, ``n_heads`` is not divisible by ``n_groups``, a dropout probability
        is outside [0, 1], or ``use_pe``, ``dwc_pe`` and ``no_off`` are all set (DAT's forward
        fails there).
    TypeError
        If a size is not an int, a flag not a bool, a probability or ``offset_range_factor``
        not a real number, or ``dtype`` not float32 or float64.

    See Also
    --------
    DAttentionBaselineCVPR2022 : The CVPR 2022 version.
    deformnp.nn.DeformableAttention2d : The CVPR 2022 layer with a deformnp-style constructor.
    deformnp.ops.grid_sample : The sampling op.

    Notes
    -----
    Initialisation: convolutions and linear layers as torch's defaults (DAT's
    ``reset_parameters`` does not reach them), tables truncated normal with std 0.01. DAT builds
    the offset range (1/(Hk-1), 1/(Wk-1)) as a float32 tensor; deformnp computes it in the
    layer's dtype (the same in float32; in float64 they agree exactly when Hk - 1 and Wk - 1 are
    powers of two). The log-CPB sign has no gradient (as ``torch.sign``).

    """

    _plus_plus = True

    def __init__(
        self,
        q_size: Any,
        kv_size: Any,
        n_heads: int,
        n_head_channels: int,
        n_groups: int,
        attn_drop: float,
        proj_drop: float,
        stride: int,
        offset_range_factor: float,
        use_pe: bool,
        dwc_pe: bool,
        no_off: bool,
        fixed_pe: bool,
        ksize: int,
        log_cpb: bool,
        *,
        device: Any = None,
        dtype: Any = None,
    ) -> None:
        super().__init__()
        self._setup(
            q_size,
            kv_size,
            n_heads,
            n_head_channels,
            n_groups,
            attn_drop,
            proj_drop,
            stride,
            offset_range_factor,
            use_pe,
            dwc_pe,
            no_off,
            fixed_pe,
            ksize,
            log_cpb,
            device,
            dtype,
        )

    def _counterpart(self) -> tuple[str, dict[str, tuple[tuple[int, ...], str]]]:
        kv_h, kv_w = self.kv_size if self.kv_size is not None else (self.q_h, self.q_w)
        why = f"sized by kv_size {(kv_h, kv_w)} as DAT's CVPR 2022 layer does"
        out: dict[str, tuple[tuple[int, ...], str]] = {}
        if self.use_pe:
            C = self.nc
            if self.dwc_pe:
                out["rpe_table.weight"] = ((C, 1, 3, 3), "the CVPR 2022 dwc_pe convolution")
                out["rpe_table.bias"] = ((C,), "the CVPR 2022 dwc_pe convolution")
            elif self.fixed_pe:
                out["rpe_table"] = ((self.n_heads, self.q_h * self.q_w, kv_h * kv_w), why)
            else:
                out["rpe_table"] = ((self.n_heads, 2 * kv_h - 1, 2 * kv_w - 1), why)
        return "DAT's CVPR 2022 DAttentionBaseline (use DAttentionBaselineCVPR2022)", out

    def forward(self, x: TensorLike) -> tuple[Tensor, Tensor, Tensor]:
        """Apply DAT++'s deformable attention to ``x``; also return where it sampled.

        Parameters
        ----------
        x : Tensor or array_like, shape (B, n_heads * n_head_channels, H, W)
            The feature map, in the layer's dtype.

        Returns
        -------
        y : Tensor, shape (B, n_heads * n_head_channels, H, W)
            The attention output (``proj_out`` then ``proj_drop`` applied); differentiable in
            ``x`` and every trainable parameter.
        pos : Tensor, shape (B, n_groups, Hk, Wk, 2)
            The sampling positions as normalized ``(y, x)`` (with gradient unless ``no_off``).
        reference : Tensor, shape (B, n_groups, Hk, Wk, 2)
            The reference grid as normalized ``(y, x)``.

        Raises
        ------
        ValueError
            If ``x`` is not (B, n_heads * n_head_channels, H, W); if the offset grid is smaller
            than 2x2 (or, for the sampled table and log-CPB, the input); if ``fixed_pe``'s
            table does not fit H * W and Hk * Wk; if with ``no_off`` the pooled size differs
            from the offset grid.

        See Also
        --------
        deformnp.ops.grid_sample : The sampling op.

        """
        return self._forward(x)


class DAttentionBaselineCVPR2022(_DAttention):
    """DAT's CVPR 2022 deformable attention (``DAttentionBaseline`` at DAT's ``CVPR2022`` tag).

    DAT's CVPR 2022 constructor (all positional and required, ``stage_idx`` choosing the offset
    kernel ``(9, 7, 5, 3)[stage_idx]``), attributes and parameter names, so its state dicts load
    by name. The computation is :class:`~deformnp.nn.DeformableAttention2d`'s (which maps to
    this layer with ``channels = n_heads * n_head_channels``, ``kernel_size =
    (9, 7, 5, 3)[stage_idx]``, ``q_size = kv_size``, no dropout and neither ``dwc_pe``, ``fixed_pe`` nor
    ``no_off``), plus the options that layer lacks:

    * reference = cell centres ((i + 0.5)/Hk 2 - 1, (j + 0.5)/Wk 2 - 1); s > 0:
      offset = s tanh(offset) (1/Hk, 1/Wk); s = 0: raw offsets; pos = reference + offset, or
      tanh of it when s < 0.
    * ``use_pe``: ``dwc_pe`` (3x3 depthwise conv of q added to the output), ``fixed_pe`` (an
      (n_heads, q_h q_w, kv_h kv_w) bias), else the (n_heads, 2 kv_h - 1, 2 kv_w - 1) table
      sampled at (q_grid - pos) / 2 with q_grid the centres of the H x W map (x must be
      ``kv_size``).
    * ``no_off``: zero offsets (pos = reference, or tanh(reference) when s < 0); the position
      term still applies, as in DAT's code.
    * ``attn_drop``, ``proj_drop``: dropout in training mode.

    Parameters
    ----------
    q_size : int or (int, int)
        The query map's ``(q_h, q_w)`` (sizes ``fixed_pe``'s table).
    kv_size : int or (int, int)
        ``(kv_h, kv_w)``: sizes the relative bias table (DAT passes the feature-map size for
        both).
    n_heads : int
        The number of attention heads (>= 1, divisible by ``n_groups``).
    n_head_channels : int
        The channels per head; the layer has ``n_heads * n_head_channels`` channels.
    n_groups : int
        The number of offset groups.
    attn_drop : float
        Dropout probability on the attention weights (training mode only).
    proj_drop : float
        Dropout probability on the output (training mode only).
    stride : int
        The stride of the offset network's depthwise convolution.
    offset_range_factor : float
        The offset scale s (> 0 bounded offsets, 0 raw offsets, < 0 ``tanh`` of the positions).
    use_pe : bool
        Add a position term.
    dwc_pe : bool
        With ``use_pe``: the depthwise-conv position encoding.
    no_off : bool
        Zero offsets (DAT's ``offset.fill(0.0)``, which fails in torch; its intent is followed).
    fixed_pe : bool
        With ``use_pe`` and not ``dwc_pe``: a learned (n_heads, q_h q_w, kv_h kv_w) bias (DAT's
        forward reads an unset ``self.n_sample`` there; the sample count is used).
    stage_idx : int
        The stage, 0 to 3: the offset kernel is ``(9, 7, 5, 3)[stage_idx]``.
    device : str, optional
        A deformnp extra: ``"cuda"`` moves the parameters to the GPU after initialisation.
    dtype : numpy.dtype or type, optional
        A deformnp extra: float32 (the default) or float64, for the parameters; the inputs must
        have the same dtype.

    Raises
    ------
    ValueError
        If a size is < 1, ``n_heads`` is not divisible by ``n_groups``, a dropout probability
        is outside [0, 1], or ``stage_idx`` is not in 0..3.
    TypeError
        If a size is not an int, a flag not a bool, a probability or ``offset_range_factor``
        not a real number, or ``dtype`` not float32 or float64.

    See Also
    --------
    DAttentionBaseline : DAT++'s version.
    deformnp.nn.DeformableAttention2d : The same computation with a deformnp-style constructor.
    deformnp.ops.grid_sample : The sampling op.

    Notes
    -----
    Initialisation as :class:`DAttentionBaseline`. DAT builds the offset range (1/Hk, 1/Wk) as a
    float32 tensor; deformnp computes it in the layer's dtype.

    """

    _plus_plus = False
    _other_only = _MLP_KEYS

    def __init__(
        self,
        q_size: Any,
        kv_size: Any,
        n_heads: int,
        n_head_channels: int,
        n_groups: int,
        attn_drop: float,
        proj_drop: float,
        stride: int,
        offset_range_factor: float,
        use_pe: bool,
        dwc_pe: bool,
        no_off: bool,
        fixed_pe: bool,
        stage_idx: int,
        *,
        device: Any = None,
        dtype: Any = None,
    ) -> None:
        super().__init__()
        name = type(self).__name__
        stage_idx = integer(name, "stage_idx", stage_idx, 0)
        if stage_idx >= len(_CVPR_KSIZES):
            raise ValueError(
                f"{name}: stage_idx must be 0, 1, 2 or 3 (offset kernels {_CVPR_KSIZES}), got "
                f"{stage_idx}"
            )
        self.stage_idx = stage_idx
        self._setup(
            q_size,
            kv_size,
            n_heads,
            n_head_channels,
            n_groups,
            attn_drop,
            proj_drop,
            stride,
            offset_range_factor,
            use_pe,
            dwc_pe,
            no_off,
            fixed_pe,
            _CVPR_KSIZES[stage_idx],
            False,
            device,
            dtype,
        )

    def _counterpart(self) -> tuple[str, dict[str, tuple[tuple[int, ...], str]]]:
        out: dict[str, tuple[tuple[int, ...], str]] = {}
        if self.use_pe and not self.no_off:
            if self.dwc_pe:
                out["rpe_table.weight"] = ((self.nc, 1, 3, 3), "DAT++'s dwc_pe convolution")
                out["rpe_table.bias"] = ((self.nc,), "DAT++'s dwc_pe convolution")
            elif self.fixed_pe:
                kv = (self.q_h // self.stride) * (self.q_w // self.stride)
                out["rpe_table"] = (
                    (self.n_heads, self.q_h * self.q_w, kv),
                    "sized by q_size // stride as DAT++ does",
                )
            else:
                out["rpe_table"] = (
                    (self.n_heads, 2 * self.q_h - 1, 2 * self.q_w - 1),
                    f"sized by q_size {(self.q_h, self.q_w)} as DAT++ does",
                )
        return "DAT++'s DAttentionBaseline (use DAttentionBaseline)", out

    def forward(self, x: TensorLike) -> tuple[Tensor, Tensor, Tensor]:
        """Apply DAT's CVPR 2022 deformable attention to ``x``; also return where it sampled.

        Parameters
        ----------
        x : Tensor or array_like, shape (B, n_heads * n_head_channels, H, W)
            The feature map, in the layer's dtype; H x W must be ``kv_size`` with the sampled
            table, and ``H * W = q_h * q_w`` with ``fixed_pe``.

        Returns
        -------
        y : Tensor, shape (B, n_heads * n_head_channels, H, W)
            The attention output (``proj_out`` then ``proj_drop`` applied); differentiable in
            ``x`` and every parameter.
        pos : Tensor, shape (B, n_groups, Hk, Wk, 2)
            The sampling positions as normalized ``(y, x)`` (with gradient unless ``no_off``).
        reference : Tensor, shape (B, n_groups, Hk, Wk, 2)
            The reference grid as normalized ``(y, x)``.

        Raises
        ------
        ValueError
            If ``x`` is not (B, n_heads * n_head_channels, H, W), or does not fit the position
            table.

        See Also
        --------
        deformnp.nn.DeformableAttention2d : The same computation.

        """
        return self._forward(x)


class DeformableAttention2d(_DAttention):
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

    _plus_plus = False
    _other_only = _MLP_KEYS
    _q_size_optional = True

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
        if q_size is not None:
            q_size = pair(name, "q_size", q_size, 1)
        # DAT's CVPR 2022 layer with q_size = kv_size, no dropout and no dwc_pe/no_off/fixed_pe
        self._setup(
            q_size=q_size,
            kv_size=q_size,
            n_heads=n_heads,
            n_head_channels=channels // n_heads,
            n_groups=n_groups,
            attn_drop=0.0,
            proj_drop=0.0,
            stride=stride,
            offset_range_factor=offset_range_factor,
            use_pe=bool(use_pe),
            dwc_pe=False,
            no_off=False,
            fixed_pe=False,
            ksize=kernel_size,
            log_cpb=False,
            device=device,
            dtype=dtype,
        )

    @property
    def channels(self) -> int:
        """The input and output channels ``C`` (``n_heads * n_head_channels``)."""
        return self.nc

    @property
    def kernel_size(self) -> int:
        """The kernel size of the offset network's depthwise convolution."""
        return self.ksize

    @property
    def q_size(self) -> tuple[int, int] | None:
        """The input's ``(H, W)`` that sizes ``rpe_table``, or None (only without ``use_pe``)."""
        return None if self.q_h is None else (self.q_h, self.q_w)

    # the same computation as DAT's CVPR 2022 layer: the same rule for foreign state dicts
    _counterpart = DAttentionBaselineCVPR2022._counterpart

    def _check_input(self, x: Tensor) -> None:
        name = "DeformableAttention2d"
        if x.ndim != 4 or x.shape[1] != self.channels:
            raise ValueError(
                f"{name}: x must be (B, {self.channels}, H, W), got shape {tuple(x.shape)}"
            )
        H, W = x.shape[2], x.shape[3]
        if self.use_pe and (H, W) != tuple(self.q_size):
            raise ValueError(
                f"{name}: x is {H}x{W} but the relative position bias table was built for "
                f"q_size {tuple(self.q_size)}"
            )

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
        return self._forward(x)

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
