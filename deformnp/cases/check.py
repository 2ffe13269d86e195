"""The gradient-check table: small float64 inputs for every op (and the layers built on them), off
the kinks of the sampling rules (see ``inputs.py``).

``python -m deformnp check`` runs ``gradcheck`` on every case and prints the worst errors; each
op's test file runs ``gradcheck`` on its cases; ``tests/test_cuda.py`` runs every case marked
``cuda`` on the CPU and on the GPU (or Numba's simulator) and compares outputs and gradients.
One table for all three, so a case added here is checked everywhere.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from .. import functional as F
from .. import ops
from ..nn import DeformableAttention2d, MSDeformAttn
from ..tensor import Tensor
from .inputs import (
    call_with_parameters,
    conv_offsets_off_kinks,
    deform_ps_roi_offsets_off_kinks,
    deform_roi_offsets_off_kinks,
    grid_off_kinks,
    level_layout,
    locations_off_kinks,
    points_off_kinks,
)

__all__ = ["CheckCase", "check_cases", "OPS"]


@dataclass(frozen=True)
class CheckCase:
    """One gradient check: ``fn(*inputs)`` returns a Tensor (or a tuple of Tensors); ``arrays``
    are the float64 values of the differentiable inputs, one per name in ``names``. ``cuda``:
    ``fn`` also runs on CUDA tensors (the deformable ops do; conv2d and the layers do not)."""

    op: str
    label: str
    fn: Callable[..., Tensor | tuple[Tensor, ...]]
    arrays: tuple[np.ndarray, ...]
    names: tuple[str, ...]
    cuda: bool = True

    @property
    def name(self) -> str:
        return f"{self.op} [{self.label}]" if self.label else self.op

    def inputs(self, dtype: type = np.float64, device: str = "cpu") -> tuple[Tensor, ...]:
        """Fresh leaf Tensors of the arrays (cast to ``dtype``, on ``device``) that require
        grad."""
        leaves = []
        for a in self.arrays:
            t = Tensor(np.array(a, dtype=dtype))
            if device != "cpu":
                t = t.to(device)
            leaves.append(t.requires_grad_(True))
        return tuple(leaves)


Rng = np.random.Generator


def _bilinear(rng: Rng) -> list[CheckCase]:
    N, C, H, W, P = 2, 2, 4, 5, 12
    x = rng.standard_normal((N, C, H, W))
    return [
        CheckCase(
            "bilinear_interpolate",
            f"{border} border",
            lambda a, p, border=border: ops.bilinear_interpolate(a, p, border),
            (x, points_off_kinks(rng, N, P, H, W)),
            ("input", "points"),
        )
        for border in ("zero", "clamp")
    ]


def _grid_sample(rng: Rng) -> list[CheckCase]:
    N, C, Hin, Win, H, W = 2, 2, 4, 5, 3, 3
    cases = []
    for mode in ("zeros", "border", "reflection"):
        for align in (False, True):
            cases.append(
                CheckCase(
                    "grid_sample",
                    f"{mode}, align_corners={align}",
                    lambda a, g, mode=mode, align=align: ops.grid_sample(
                        a, g, "bilinear", mode, align
                    ),
                    (
                        rng.standard_normal((N, C, Hin, Win)),
                        grid_off_kinks(rng, N, H, W, Hin, Win, align, mode),
                    ),
                    ("input", "grid"),
                )
            )
    return cases


def _deform_conv2d(rng: Rng) -> list[CheckCase]:
    configs = [
        # label, (B, Cin, H, W), (Cout, kh, kw), groups, offset groups, stride, padding,
        # dilation, mask, bias
        ("v2, 2 weight groups, 2 offset groups, strided, dilated", (1, 4, 5, 4), (4, 2, 3),
         2, 2, (1, 2), (1, 1), (2, 1), True, True),
        ("v1, 3x3", (2, 2, 4, 4), (3, 3, 3), 1, 1, 1, 1, 1, False, False),
        ("v2, 1x1, 3 offset groups, stride 2", (1, 3, 4, 3), (2, 1, 1), 1, 3, 2, 0, 1, True, True),
        ("v2, 2 weight groups, 2 offset groups, stride (1, 2)", (2, 4, 5, 6), (6, 2, 3),
         2, 2, (1, 2), 1, (2, 1), True, True),
    ]  # fmt: skip
    cases = []
    for label, (B, Cin, H, W), (Cout, kh, kw), g, G, st, pd, dl, use_mask, use_bias in configs:
        sh, sw = (st, st) if isinstance(st, int) else st
        ph, pw = (pd, pd) if isinstance(pd, int) else pd
        dh, dw = (dl, dl) if isinstance(dl, int) else dl
        Ho = (H + 2 * ph - (dh * (kh - 1) + 1)) // sh + 1
        Wo = (W + 2 * pw - (dw * (kw - 1) + 1)) // sw + 1
        K = kh * kw
        arrays = [
            rng.standard_normal((B, Cin, H, W)),
            conv_offsets_off_kinks(rng, (B, 2 * G * K, Ho, Wo)),
            rng.standard_normal((Cout, Cin // g, kh, kw)),
        ]
        names = ["input", "offset", "weight"]
        if use_bias:
            arrays.append(rng.standard_normal(Cout))
            names.append("bias")
        if use_mask:
            arrays.append(rng.uniform(0.1, 1.0, (B, G * K, Ho, Wo)))
            names.append("mask")

        def fn(*ts, names=tuple(names), st=st, pd=pd, dl=dl):
            d = dict(zip(names, ts))
            return ops.deform_conv2d(
                d["input"], d["offset"], d["weight"], d.get("bias"), st, pd, dl, d.get("mask")
            )

        cases.append(CheckCase("deform_conv2d", label, fn, tuple(arrays), tuple(names)))
    return cases


BOXES = np.array([[0, 0.4, 1.2, 5.1, 4.6], [1, -1.3, 0.2, 7.9, 6.2], [1, 2.2, 0.3, 3.1, 2.9]])


def _roi(rng: Rng) -> list[CheckCase]:
    # roi_align, ps_roi_align and ps_roi_pool are linear in the input: no kinks, any boxes will
    # do; roi_pool: normal values, no two within 2*eps of each other, so the finite differences
    # never move an argmax
    boxes = BOXES

    def roi_align(aligned: bool, ratio: int) -> Callable:
        return lambda a: ops.roi_align(a, boxes.astype(a.dtype), (2, 3), 0.9, ratio, aligned)

    cases = [
        CheckCase(
            "roi_align",
            f"aligned={aligned}, sampling_ratio={ratio}",
            roi_align(aligned, ratio),
            (rng.standard_normal((2, 2, 6, 7)),),
            ("input",),
        )
        for aligned, ratio in ((False, -1), (True, -1), (True, 2))
    ]
    cases.append(
        CheckCase(
            "roi_pool",
            "",
            lambda a: ops.roi_pool(a, boxes.astype(a.dtype), (2, 3), 1.0),
            (rng.standard_normal((2, 3, 6, 7)),),
            ("input",),
        )
    )
    cases.append(
        CheckCase(
            "ps_roi_align",
            "",
            lambda a: ops.ps_roi_align(a, boxes.astype(a.dtype), 2, 1.0, 2),
            (rng.standard_normal((2, 8, 5, 6)),),
            ("input",),
        )
    )
    cases.append(
        CheckCase(
            "ps_roi_pool",
            "",
            lambda a: ops.ps_roi_pool(a, boxes.astype(a.dtype), 2, 1.0),
            (rng.standard_normal((2, 8, 5, 6)),),
            ("input",),
        )
    )
    # deform_roi_pool: every sample 0.1 away from the kinks and the border lines
    H, W, P, gamma = 6, 7, 2, 0.2
    dboxes = np.array([[0, 0.4, 1.2, 5.1, 4.6], [1, -1.3, 0.2, 6.9, 6.2], [1, 2.0, 2.5, 3.1, 3.3]])
    cases.append(
        CheckCase(
            "deform_roi_pool",
            "",
            lambda a, o: ops.deform_roi_pool(a, dboxes.astype(a.dtype), o, P, 1.0, 2, gamma),
            (
                rng.standard_normal((2, 2, H, W)),
                deform_roi_offsets_off_kinks(rng, dboxes, P, P, H, W, 2, gamma),
            ),
            ("input", "offset"),
        )
    )
    # deform_ps_roi_pool: samples 0.1 away from the validity lines -0.5, W - 0.5 and off the
    # clamp's kinks; some lie in the clamped bands or are skipped
    D, gs, P, spp, ts = 2, 2, 2, 2, 0.3
    pboxes = np.array([[0, 0.0, 1.0, 4.0, 4.0], [1, 2.0, 0.0, 6.0, 5.0], [1, 1.0, 2.0, 2.0, 3.0]])
    cases.append(
        CheckCase(
            "deform_ps_roi_pool",
            "",
            lambda a, o: ops.deform_ps_roi_pool(
                a, pboxes.astype(a.dtype), o, 1.0, D, gs, P, None, spp, ts
            ),
            (
                rng.standard_normal((2, D * gs * gs, H, W)),
                deform_ps_roi_offsets_off_kinks(rng, pboxes, P, spp, ts, H, W),
            ),
            ("input", "offset"),
        )
    )
    return cases


def _ms_deform_attn(rng: Rng) -> list[CheckCase]:
    cases = []
    for label, levels, (N, Lq, M, D, P) in (
        ("2 levels", [(3, 4), (2, 2)], (2, 2, 2, 2, 2)),
        ("3 levels, one of 1x1", [(3, 4), (2, 2), (1, 1)], (1, 3, 2, 3, 2)),
    ):
        shapes, starts = level_layout(levels)
        S = int(shapes.prod(axis=1).sum())
        cases.append(
            CheckCase(
                "ms_deform_attn",
                label,
                lambda v, loc, a, shapes=shapes, starts=starts: ops.ms_deform_attn(
                    v, shapes, starts, loc, a
                ),
                (
                    rng.standard_normal((N, S, M, D)),
                    locations_off_kinks(rng, shapes, (N, Lq, M), P),
                    rng.uniform(0.1, 1.0, (N, Lq, M, len(levels), P)),
                ),
                ("value", "sampling_locations", "attention_weights"),
            )
        )
    return cases


def _conv2d(rng: Rng) -> list[CheckCase]:
    """A grouped, strided, dilated, padded convolution with a non-square kernel, and a depthwise
    one with channel multiplier 2."""
    names = ("input", "weight", "bias")
    return [
        CheckCase(
            "conv2d",
            "2 groups, stride (2, 1), padding (1, 0), dilation (1, 2)",
            lambda x, w, b: F.conv2d(
                x, w, b, stride=(2, 1), padding=(1, 0), dilation=(1, 2), groups=2
            ),
            (
                rng.standard_normal((2, 4, 5, 6)),
                rng.standard_normal((6, 2, 3, 2)),
                rng.standard_normal(6),
            ),
            names,
            cuda=False,
        ),
        CheckCase(
            "conv2d",
            "depthwise, multiplier 2",
            lambda x, w, b: F.conv2d(x, w, b, stride=2, padding=2, groups=3),
            (
                rng.standard_normal((1, 3, 6, 5)),
                rng.standard_normal((6, 1, 5, 5)),
                rng.standard_normal(6),
            ),
            names,
            cuda=False,
        ),
    ]


def _randomize(module: MSDeformAttn | DeformableAttention2d, rng: Rng, scale: float) -> None:
    """Small random changes of every parameter: the sampling points leave the reference points
    (and stay off the kinks with probability one; eps is far below any distance to a kink)."""
    for p in module.parameters():
        p.data = (p.data + scale * rng.standard_normal(p.shape)).astype(p.dtype)


def _msdeformattn(rng: Rng) -> list[CheckCase]:
    layer = MSDeformAttn(d_model=4, n_levels=2, n_heads=2, n_points=2, dtype=np.float64)
    _randomize(layer, rng, 0.05)
    shapes, starts = level_layout([(3, 3), (2, 2)])
    S = int(shapes.prod(axis=1).sum())
    params = tuple(p.numpy().copy() for p in layer.parameters())
    pnames = tuple(n for n, _ in layer.named_parameters())
    mask = rng.random((1, S)) < 0.25
    cases = []
    for ref_dim in (2, 4):
        ref = rng.uniform(0.2, 0.8, (1, 3, 2, ref_dim))
        if ref_dim == 4:
            ref[..., 2:] = rng.uniform(0.1, 0.5, ref[..., 2:].shape)

        def fn(q, r, f, *ps):
            return call_with_parameters(layer, ps, layer, q, r, f, shapes, starts, mask)

        cases.append(
            CheckCase(
                "nn.MSDeformAttn",
                f"reference points (N, Lq, L, {ref_dim}), padding mask",
                fn,
                (rng.standard_normal((1, 3, 4)), ref, rng.standard_normal((1, S, 4)), *params),
                ("query", "reference_points", "input_flatten", *pnames),
                cuda=False,
            )
        )
    return cases


def _dat(rng: Rng) -> list[CheckCase]:
    cases = []
    for label, (C, heads, kw), x_shape in (
        ("stride 2, relative position bias", (2, 2, {"stride": 2, "q_size": 3}), (1, 2, 3, 3)),
        ("2 groups, no position bias", (4, 2, {"n_groups": 2, "use_pe": False}), (1, 4, 3, 2)),
    ):
        layer = DeformableAttention2d(C, heads, kernel_size=3, dtype=np.float64, **kw)
        _randomize(layer, rng, 0.1)
        params = tuple(p.numpy().copy() for p in layer.parameters())
        pnames = tuple(n for n, _ in layer.named_parameters())

        def fn(x, *ps, layer=layer):
            y, pos, _ = call_with_parameters(layer, ps, layer, x)
            return y, pos

        cases.append(
            CheckCase(
                "nn.DeformableAttention2d",
                label,
                fn,
                (rng.standard_normal(x_shape), *params),
                ("x", *pnames),
                cuda=False,
            )
        )
    return cases


# (the ops a builder makes cases for, the builder): each builder draws from its own seed
def _dcnv3(rng: Rng) -> list[CheckCase]:
    """Grouped, strided, dilated and centre-removed DCNv3 (channels last). offset_scale 1: every
    base position is an integer, so offsets off the kinks keep every sampling coordinate off
    them."""
    cases = []
    for label, (N, H, W), G, D, (kh, kw), s, p, d, rc in (
        ("g2 3x3 pad 1", (2, 4, 5), 2, 2, (3, 3), 1, 1, 1, False),
        ("g1 5x3 stride 2 dilation 2 pad 2", (1, 7, 6), 1, 3, (5, 3), 2, 2, 2, False),
        ("g4 3x3 remove_center", (1, 4, 4), 4, 1, (3, 3), 1, 1, 1, True),
    ):
        Ho = (H + 2 * p - (d * (kh - 1) + 1)) // s + 1
        Wo = (W + 2 * p - (d * (kw - 1) + 1)) // s + 1
        P = kh * kw - int(rc)
        geo = (kh, kw, s, s, p, p, d, d, G, D, 1.0, rc)
        cases.append(
            CheckCase(
                "dcnv3",
                label,
                lambda x, o, m, geo=geo: ops.dcnv3(x, o, m, *geo),
                (
                    rng.standard_normal((N, H, W, G * D)),
                    conv_offsets_off_kinks(rng, (N, Ho, Wo, G * P * 2)),
                    rng.uniform(0.1, 1.0, (N, Ho, Wo, G * P)),
                ),
                ("input", "offset", "mask"),
            )
        )
    return cases


def _dcnv4(rng: Rng) -> list[CheckCase]:
    """DCNv4 (packed offsets and mask, padded channels, remove_center) and FlashDeformAttn
    (packed locations and logits over two levels). Stride 1, padding 1, scale 1: the base points
    are integers, so offsets off the kinks keep every sampling coordinate off them."""
    cases = []
    for label, (B, H, W, G, D, rc, extra) in (
        ("3x3, 2 groups, padded channels", (1, 4, 5, 2, 3, False, 2)),
        ("3x3 remove_center", (2, 3, 3, 1, 4, True, 0)),
    ):
        K = 9 - int(rc)
        om = rng.standard_normal((B, H, W, G * 3 * K + extra))
        for g in range(G):
            om[..., g * 3 * K : g * 3 * K + 2 * K] = conv_offsets_off_kinks(rng, (B, H, W, 2 * K))
        cases.append(
            CheckCase(
                "dcnv4",
                label,
                lambda x, o, G=G, D=D, rc=rc: ops.dcnv4(
                    x, o, 3, 3, 1, 1, 1, 1, 1, 1, G, D, 1.0, 256, rc
                ),
                (rng.standard_normal((B, H, W, G * D)), om),
                ("input", "offset_mask"),
            )
        )
    shapes, starts = level_layout([(3, 4), (2, 2)])
    N, Lq, G, D, K = 2, 2, 2, 3, 2
    loc = locations_off_kinks(rng, shapes, (N, Lq, G), K).reshape(N, Lq, G, 4 * K)
    sla = np.concatenate([loc, rng.standard_normal((N, Lq, G, 2 * K))], -1)
    cases.append(
        CheckCase(
            "flash_deform_attn",
            "2 levels",
            lambda v, s: ops.flash_deform_attn(v, shapes, starts, s, 64, K),
            (rng.standard_normal((N, 16, G, D)), sla),
            ("value", "sampling_loc_attn"),
        )
    )
    return cases


# appended at the end: a builder's seed is its position, so earlier cases keep their inputs
_BUILDERS: tuple[tuple[tuple[str, ...], Callable[[Rng], list[CheckCase]]], ...] = (
    (("bilinear_interpolate",), _bilinear),
    (("grid_sample",), _grid_sample),
    (("deform_conv2d",), _deform_conv2d),
    (
        (
            "roi_align",
            "roi_pool",
            "ps_roi_align",
            "ps_roi_pool",
            "deform_roi_pool",
            "deform_ps_roi_pool",
        ),
        _roi,
    ),  # fmt: skip
    (("ms_deform_attn",), _ms_deform_attn),
    (("conv2d",), _conv2d),
    (("nn.MSDeformAttn",), _msdeformattn),
    (("nn.DeformableAttention2d",), _dat),
    (("dcnv3",), _dcnv3),
    (("dcnv4", "flash_deform_attn"), _dcnv4),
)

OPS = tuple(op for ops_, _ in _BUILDERS for op in ops_)


def check_cases(op: str | None = None) -> list[CheckCase]:
    """Every case of the table (built afresh, from fixed seeds), or those of one op."""
    if op is not None and op not in OPS:
        raise ValueError(f"unknown op {op!r}; the ops with check cases are {', '.join(OPS)}")
    cases = []
    for seed, (ops_, build) in enumerate(_BUILDERS):
        if op is None or op in ops_:
            cases += [c for c in build(np.random.default_rng(seed)) if op is None or c.op == op]
    return cases
