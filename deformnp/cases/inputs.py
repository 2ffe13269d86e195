"""Inputs for gradient checks and benchmarks, shared by the check table, the tests and benches.

**Off the kinks.** The sampling rules have kinks (docs/ops/bilinear.rst): at integer
coordinates and on the border lines -1, 0, H-1, H, where the position derivative jumps and
central differences are wrong (docs/guide/autograd.rst). Every generator here keeps each sampling
coordinate's fractional part in [0.1, 0.9] and away from those lines, while still covering the
border bands and the outside of the map. :func:`off_kink` is the test they all apply;
:func:`fractional` the draw most of them start from.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from ..kernels.roi_geometry import c_round
from ..nn.module import Module
from ..ops.attention import level_layout
from ..tensor import Tensor

__all__ = [
    "fractional",
    "off_kink",
    "points_off_kinks",
    "grid_off_kinks",
    "conv_offsets_off_kinks",
    "level_layout",
    "locations_off_kinks",
    "deform_roi_offsets_off_kinks",
    "deform_ps_roi_offsets_off_kinks",
    "boxes_in",
    "reference_attention",
    "call_with_parameters",
]

Rng = np.random.Generator


def fractional(rng: Rng, lo: int, hi: int, shape: tuple[int, ...]) -> np.ndarray:
    """Integers in [lo, hi) plus fractional parts in [0.1, 0.9]: off the integer kinks."""
    return rng.integers(lo, hi, shape) + rng.uniform(0.1, 0.9, shape)


def off_kink(v: float, n: int, margin: float = 0.1) -> bool:
    """True when v's fractional part is in [margin, 1 - margin] and v is at least ``margin`` away
    from the border lines -1, 0, n-1, n of an axis of n pixels."""
    f = v - math.floor(v)
    return margin <= f <= 1 - margin and all(abs(v - b) >= margin for b in (-1, 0, n - 1, n))


def points_off_kinks(rng: Rng, N: int, P: int, H: int, W: int) -> np.ndarray:
    """(N, P, 2) points (y, x) for ``bilinear_interpolate`` with integer parts in [-2, H] x
    [-2, W]: the border bands and the outside are covered, the kinks avoided."""
    return np.stack([fractional(rng, -2, H + 1, (N, P)), fractional(rng, -2, W + 1, (N, P))], -1)


def grid_off_kinks(
    rng: Rng,
    N: int,
    Hout: int,
    Wout: int,
    Hin: int,
    Win: int,
    align_corners: bool = False,
    padding_mode: str = "zeros",
) -> np.ndarray:
    """A (N, Hout, Wout, 2) grid for ``grid_sample`` whose pixel coordinates have integer parts
    in [-3, size + 1] and fractional parts in [0.1, 0.9] (in [0.1, 0.4] or [0.6, 0.9] for
    reflection without align_corners, which mirrors at the half-integers -0.5 and size - 0.5):
    off every kink of the sampling rule and of the padding transforms."""

    def coords(size: int) -> np.ndarray:
        frac = rng.uniform(0.1, 0.9, (N, Hout, Wout))
        if padding_mode == "reflection" and not align_corners:
            frac = np.where(frac < 0.5, 0.1 + (frac - 0.1) * 0.75, 0.6 + (frac - 0.5) * 0.75)
        return rng.integers(-3, size + 2, (N, Hout, Wout)) + frac

    def normalize(c: np.ndarray, size: int) -> np.ndarray:
        return c / (size - 1) * 2 - 1 if align_corners else (2 * c + 1) / size - 1

    return np.stack([normalize(coords(Win), Win), normalize(coords(Hin), Hin)], axis=-1)


def conv_offsets_off_kinks(rng: Rng, shape: tuple[int, ...]) -> np.ndarray:
    """Offsets for ``deform_conv2d``: the base sampling positions are integers, so integer
    offsets in [-2, 2) plus fractional parts in [0.1, 0.9] keep every coordinate off the kinks."""
    return fractional(rng, -2, 2, shape)


def locations_off_kinks(
    rng: Rng, spatial_shapes: np.ndarray, lead: tuple[int, ...], P: int
) -> np.ndarray:
    """Normalized locations (lead..., L, P, 2) for ``ms_deform_attn`` whose pixel coordinates
    y = v*H - 0.5, x = u*W - 0.5 have fractional parts in [0.1, 0.9], over [-1, H] x [-1, W] (so
    some points sit in the fading band outside the map)."""
    L = spatial_shapes.shape[0]
    shape = (*lead, L, P)
    H = spatial_shapes[:, 0].reshape((1,) * len(lead) + (L, 1))
    W = spatial_shapes[:, 1].reshape((1,) * len(lead) + (L, 1))
    y = np.floor(rng.uniform(-1, H, shape)) + rng.uniform(0.1, 0.9, shape)
    x = np.floor(rng.uniform(-1, W, shape)) + rng.uniform(0.1, 0.9, shape)
    return np.stack([(x + 0.5) / W, (y + 0.5) / H], axis=-1)


def deform_roi_offsets_off_kinks(
    rng: Rng,
    rois: np.ndarray,
    PH: int,
    PW: int,
    H: int,
    W: int,
    ratio: int,
    gamma: float,
    low: float = -1.0,
    high: float = 1.0,
    tries: int = 2000,
) -> np.ndarray:
    """(K, 2, PH, PW) offsets for ``deform_roi_pool`` (spatial_scale 1, a fixed grid of
    ``ratio`` x ``ratio`` samples), drawn bin by bin from U(low, high) until every sample
    coordinate is off the kinks (:func:`off_kink`)."""
    off = np.zeros((len(rois), 2, PH, PW))
    i = np.arange(ratio) + 0.5
    for k in range(len(rois)):
        x1, y1, x2, y2 = (float(v) - 0.5 for v in rois[k, 1:])
        rw, rh = x2 - x1, y2 - y1
        for ph in range(PH):
            for pw in range(PW):
                for _ in range(tries):
                    ox, oy = rng.uniform(low, high, 2)
                    ys = y1 + gamma * rh * oy + ph * rh / PH + i * rh / PH / ratio
                    xs = x1 + gamma * rw * ox + pw * rw / PW + i * rw / PW / ratio
                    if all(off_kink(y, H) for y in ys) and all(off_kink(x, W) for x in xs):
                        off[k, :, ph, pw] = ox, oy
                        break
                else:
                    raise AssertionError("no offset off the kinks found")
    return off


def _dps_sample_ok(v: float, n: int) -> bool:
    """A deform_ps_roi_pool sample coordinate 0.1 away from the validity lines -0.5, n - 0.5
    and, if valid, off the kinks of the clamp."""
    if abs(v + 0.5) < 0.1 or abs(v - (n - 0.5)) < 0.1:
        return False
    if v < -0.5 or v > n - 0.5:
        return True  # skipped
    if v < 0 or v > n - 1:
        return abs(v) >= 0.1 and abs(v - (n - 1)) >= 0.1  # in a clamped band
    return off_kink(v, n)


def deform_ps_roi_offsets_off_kinks(
    rng: Rng,
    rois: np.ndarray,
    P: int,
    spp: int,
    trans_std: float,
    H: int,
    W: int,
    tries: int = 4000,
) -> np.ndarray:
    """(K, 2, P, P) offsets for ``deform_ps_roi_pool`` (one class, part_size = pooled_size,
    spatial_scale 1), drawn bin by bin from U(-1.5, 1.5) until every sample is 0.1 away from the
    validity lines -0.5, size - 0.5 (where the sample count jumps) and, if valid, off the kinks
    of the clamp (fractional part in [0.1, 0.9], away from 0 and size - 1)."""
    off = np.zeros((len(rois), 2, P, P))
    steps = np.arange(spp)
    for k in range(len(rois)):
        x1, y1, x2, y2 = (float(c_round(np.float64(v))) for v in rois[k, 1:5])
        roi_w = max(x2 + 1.0 - x1, 0.1)
        roi_h = max(y2 + 1.0 - y1, 0.1)
        for ph in range(P):
            for pw in range(P):
                for _ in range(tries):
                    ox, oy = rng.uniform(-1.5, 1.5, 2)
                    w0 = pw * roi_w / P + x1 - 0.5 + ox * trans_std * roi_w
                    h0 = ph * roi_h / P + y1 - 0.5 + oy * trans_std * roi_h
                    hs = h0 + steps * roi_h / P / spp
                    ws = w0 + steps * roi_w / P / spp
                    if all(_dps_sample_ok(h, H) for h in hs) and all(
                        _dps_sample_ok(w, W) for w in ws
                    ):
                        off[k, :, ph, pw] = ox, oy
                        break
                else:
                    raise AssertionError("no offset off the kinks found")
    return off


def boxes_in(rng: Rng, K: int, B: int, H: int, W: int, s: float) -> np.ndarray:
    """K boxes (batch, x1, y1, x2, y2) in image coordinates, inside an (H/s, W/s) image, each
    side 15% to 60% of the image's."""
    w = rng.uniform(0.15, 0.6, K) * W / s
    h = rng.uniform(0.15, 0.6, K) * H / s
    x1 = rng.uniform(0, W / s - w)
    y1 = rng.uniform(0, H / s - h)
    return np.stack([rng.integers(0, B, K), x1, y1, x1 + w, y1 + h], axis=1)


REFERENCE_LEVELS = ((32, 32), (16, 16), (8, 8), (4, 4))


def reference_attention(dtype: Any = np.float32, seed: int = 0) -> dict[str, Any]:
    """The reference-size ``ms_deform_attn`` inputs of the benchmarks: N=1, levels (32,32),(16,16),(8,8),(4,4),
    Lq = S = 1360, M = 8, D = 32, P = 4; locations uniform over the maps, weights softmaxed, and
    a ``grad_output``."""
    return attention_inputs(REFERENCE_LEVELS, 1, dtype, seed)


# Deformable-DETR's encoder on an 800x1216 image: the feature maps of strides 8, 16, 32, 64
ENCODER_LEVELS = ((100, 152), (50, 76), (25, 38), (13, 19))


def attention_inputs(
    levels: Sequence[tuple[int, int]], N: int, dtype: Any = np.float32, seed: int = 0
) -> dict[str, Any]:
    """``ms_deform_attn`` inputs of an encoder over ``levels``: Lq = S (every pixel of every level
    queries), M = 8, D = 32, P = 4; locations uniform over the maps, weights softmaxed, and a
    ``grad_output``."""
    rng = np.random.default_rng(seed)
    shapes, starts = level_layout(levels)
    S = int(shapes.prod(axis=1).sum())
    Lq, M, D, L, P = S, 8, 32, len(levels), 4
    logits = rng.standard_normal((N, Lq, M, L * P))
    w = np.exp(logits - logits.max(-1, keepdims=True))
    w /= w.sum(-1, keepdims=True)
    return {
        "value": rng.standard_normal((N, S, M, D)).astype(dtype),
        "spatial_shapes": shapes,
        "level_start_index": starts,
        "sampling_locations": rng.uniform(0, 1, (N, Lq, M, L, P, 2)).astype(dtype),
        "attention_weights": w.reshape(N, Lq, M, L, P).astype(dtype),
        "grad_output": rng.standard_normal((N, Lq, M * D)).astype(dtype),
    }


def call_with_parameters(
    module: Module, tensors: Sequence[Tensor], fn: Callable, *args: Any
) -> Any:
    """Run ``fn(*args)`` with ``module``'s parameters (in ``named_parameters`` order) replaced by
    ``tensors``, then put the originals back: lets gradcheck, which checks copies of its inputs,
    differentiate a layer with respect to its parameters."""
    slots = []
    for name, _ in module.named_parameters():
        owner = module
        *path, leaf = name.split(".")
        for part in path:
            owner = owner._modules[part]
        slots.append((owner, leaf))
    saved = [owner._parameters[leaf] for owner, leaf in slots]
    try:
        for (owner, leaf), t in zip(slots, tensors):
            owner._parameters[leaf] = t
            object.__setattr__(owner, leaf, t)
        return fn(*args)
    finally:
        for (owner, leaf), p in zip(slots, saved):
            owner._parameters[leaf] = p
            object.__setattr__(owner, leaf, p)
