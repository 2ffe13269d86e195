"""Deformable-DETR in PyTorch on the CPU, with deformnp's kernels
==============================================================

A Deformable-DETR encoder layer is trained in PyTorch on the CPU, its attention running on
deformnp's kernels through ``deformnp.torch``, and timed against the pure-PyTorch formulation.
It needs PyTorch (a CPU build is enough: ``pip install torch``); the documentation shows this
example without running it.

The layer is Deformable-DETR's ``DeformableTransformerEncoderLayer``
(``models/deformable_transformer.py``): multi-scale deformable self-attention over the flattened
feature levels (``MSDeformAttn``), a residual and a LayerNorm, then the FFN (Linear, ReLU,
Linear), a residual and a second LayerNorm. Two copies with identical weights are trained side
by side on the same synthetic regression task (Adam, MSE loss, steps alternating between the
two):

* **deformnp**: ``deformnp.torch.MSDeformAttn``, whose core (``MSDeformAttnFunction``) runs
  deformnp's Numba CPU kernels, forward and backward, through ``torch.autograd``;
* **grid_sample**: the same module with Deformable-DETR's pure-PyTorch core
  ``ms_deform_attn_core_pytorch`` (one ``F.grid_sample`` per level), the only formulation
  Deformable-DETR offers off CUDA.

The script checks that both give the same loss and the same gradients at step 0 (to float32
rounding; it exits with status 1 if they do not), then prints the loss curve and the time per
training step (forward, backward, optimizer step; median after a warm-up step) of each and their
ratio. One deviation from Deformable-DETR's initialisation: ``sampling_offsets.weight`` starts at
small random values (``--offset-init-std``, 0 for Deformable-DETR's zeros). With zeros, every
sampling point of the first step lies exactly on a pixel centre, a kink of bilinear
interpolation, where the two formulations (which round the position differently) take the slope
from different sides: the losses still agree, the sampling-offset gradients do not.

The task: the input is random multi-scale features, the target for each level is that level
translated by (1, 2) pixels and mixed by a fixed random channel map, which the attention can
learn by moving its sampling points. Nothing is written to disk::

    python examples/torch_deformable_detr_cpu.py                    # small, well under a minute
    python examples/torch_deformable_detr_cpu.py --levels 64,32,16,8 --d-model 256 --heads 8 \\
        --ffn 1024 --batch 2 --steps 6                              # Deformable-DETR's widths

torch is imported before deformnp, as in any PyTorch program; torch's ops and deformnp's
kernels then share torch's OpenMP worker threads (see ``deformnp/threads.py``).
``ms_deform_attn_core_pytorch``, ``GridSampleMSDeformAttn.forward``,
``DeformableTransformerEncoderLayer`` and ``get_reference_points`` follow
fundamentalvision/Deformable-DETR (Apache License 2.0).
"""

from __future__ import annotations

import argparse
import os
import sys
import time

try:
    import torch
    import torch.nn.functional as F
    from torch import nn
except ImportError:  # checked before any work: the example is about the PyTorch adapter
    msg = "needs PyTorch (a CPU build is enough): pip install torch"
    print(f"{os.path.basename(sys.argv[0])} {msg}", file=sys.stderr)
    sys.exit(2)

import numpy as np

import deformnp.torch as dnt
from deformnp.cases.bench import torch_ms_deform_attn_core

# Deformable-DETR's formulation, ``ms_deform_attn_core_pytorch`` (one F.grid_sample per level),
# as the benchmarks time it
ms_deform_attn_core_pytorch = torch_ms_deform_attn_core


class GridSampleMSDeformAttn(dnt.MSDeformAttn):
    """``MSDeformAttn`` with the same parameters and initialisation, whose core is
    :func:`ms_deform_attn_core_pytorch` instead of deformnp's kernels (Deformable-DETR's
    module forward, reference points of 2 coordinates)."""

    def forward(
        self,
        query: torch.Tensor,
        reference_points: torch.Tensor,
        input_flatten: torch.Tensor,
        input_spatial_shapes: torch.Tensor,
        input_level_start_index: torch.Tensor,
        input_padding_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        N, Len_q, _ = query.shape
        N, Len_in, _ = input_flatten.shape
        value = self.value_proj(input_flatten)
        if input_padding_mask is not None:
            value = value.masked_fill(input_padding_mask[..., None], float(0))
        value = value.view(N, Len_in, self.n_heads, self.d_model // self.n_heads)
        sampling_offsets = self.sampling_offsets(query).view(
            N, Len_q, self.n_heads, self.n_levels, self.n_points, 2
        )
        attention_weights = self.attention_weights(query).view(
            N, Len_q, self.n_heads, self.n_levels * self.n_points
        )
        attention_weights = F.softmax(attention_weights, -1).view(
            N, Len_q, self.n_heads, self.n_levels, self.n_points
        )
        offset_normalizer = torch.stack(
            [input_spatial_shapes[..., 1], input_spatial_shapes[..., 0]], -1
        )
        sampling_locations = (
            reference_points[:, :, None, :, None, :]
            + sampling_offsets / offset_normalizer[None, None, None, :, None, :]
        )
        output = ms_deform_attn_core_pytorch(
            value, input_spatial_shapes, sampling_locations, attention_weights
        )
        return self.output_proj(output)


class DeformableTransformerEncoderLayer(nn.Module):
    """Deformable-DETR's encoder layer: deformable self-attention + FFN, post-norm.
    ``attention`` is ``deformnp.torch.MSDeformAttn`` or :class:`GridSampleMSDeformAttn`."""

    def __init__(
        self,
        attention: type[dnt.MSDeformAttn],
        d_model: int = 256,
        d_ffn: int = 1024,
        dropout: float = 0.1,
        n_levels: int = 4,
        n_heads: int = 8,
        n_points: int = 4,
    ) -> None:
        super().__init__()
        self.self_attn = attention(d_model, n_levels, n_heads, n_points)
        self.dropout1 = nn.Dropout(dropout)
        self.norm1 = nn.LayerNorm(d_model)
        self.linear1 = nn.Linear(d_model, d_ffn)
        self.activation = nn.ReLU()
        self.dropout2 = nn.Dropout(dropout)
        self.linear2 = nn.Linear(d_ffn, d_model)
        self.dropout3 = nn.Dropout(dropout)
        self.norm2 = nn.LayerNorm(d_model)

    @staticmethod
    def with_pos_embed(tensor: torch.Tensor, pos: torch.Tensor | None) -> torch.Tensor:
        return tensor if pos is None else tensor + pos

    def forward_ffn(self, src: torch.Tensor) -> torch.Tensor:
        src2 = self.linear2(self.dropout2(self.activation(self.linear1(src))))
        return self.norm2(src + self.dropout3(src2))

    def forward(
        self,
        src: torch.Tensor,
        pos: torch.Tensor | None,
        reference_points: torch.Tensor,
        spatial_shapes: torch.Tensor,
        level_start_index: torch.Tensor,
        padding_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        src2 = self.self_attn(
            self.with_pos_embed(src, pos),
            reference_points,
            src,
            spatial_shapes,
            level_start_index,
            padding_mask,
        )
        src = self.norm1(src + self.dropout1(src2))
        return self.forward_ffn(src)


def get_reference_points(spatial_shapes: torch.Tensor, batch: int, n_levels: int) -> torch.Tensor:
    """Deformable-DETR's encoder reference points (every valid ratio 1): the centre of each
    position of each level, normalized, repeated for every level: (batch, S, n_levels, 2)."""
    points = []
    for H_, W_ in spatial_shapes.tolist():
        ref_y, ref_x = torch.meshgrid(
            torch.linspace(0.5, H_ - 0.5, H_, dtype=torch.float32),
            torch.linspace(0.5, W_ - 0.5, W_, dtype=torch.float32),
            indexing="ij",
        )
        points.append(torch.stack((ref_x.reshape(-1) / W_, ref_y.reshape(-1) / H_), -1))
    ref = torch.cat(points, 0)
    return ref[None, :, None].expand(batch, -1, n_levels, -1).contiguous()


# ---------------------------------------------------------------- the task and the training


def make_task(
    levels: list[int], batch: int, d_model: int, seed: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Random multi-scale features (batch, S, d_model), a fixed positional embedding, the target
    (each level translated by (1, 2) pixels, channels mixed by a fixed random map), the spatial
    shapes (L, 2) and level start indices (L,)."""
    gen = torch.Generator().manual_seed(seed)
    feats, targets, pos = [], [], []
    mix = torch.randn(d_model, d_model, generator=gen) / d_model**0.5
    for s in levels:
        f = torch.randn(batch, d_model, s, s, generator=gen)
        t = torch.roll(f, shifts=(1, 2), dims=(2, 3))
        feats.append(f.flatten(2).transpose(1, 2))
        targets.append(t.flatten(2).transpose(1, 2) @ mix)
        level_embed = torch.randn(d_model, generator=gen) * 0.1
        pos.append(0.1 * torch.randn(1, s * s, d_model, generator=gen) + level_embed)
    shapes = torch.tensor([[s, s] for s in levels], dtype=torch.long)
    sizes = shapes[:, 0] * shapes[:, 1]
    starts = torch.cat((sizes.new_zeros(1), sizes.cumsum(0)[:-1]))
    return torch.cat(feats, 1), torch.cat(pos, 1), torch.cat(targets, 1), shapes, starts


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.partition("\n")[0])
    p.add_argument("--levels", default="32,16,8", help="square level sizes, finest first")
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--d-model", type=int, default=64)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--points", type=int, default=4)
    p.add_argument("--ffn", type=int, default=256, help="FFN hidden width")
    p.add_argument("--dropout", type=float, default=0.0, help="0: the two layers stay comparable")
    p.add_argument("--steps", type=int, default=8, help="training steps per layer (>= 2)")
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--threads", type=int, default=0, help="torch and Numba threads (0: default)")
    p.add_argument(
        "--offset-init-std",
        type=float,
        default=0.01,
        help="std of sampling_offsets.weight's initial values (0: Deformable-DETR's zeros)",
    )
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    levels = [int(s) for s in args.levels.split(",")]
    if args.steps < 2:
        p.error("--steps must be at least 2 (the first step is a warm-up)")

    import numba

    if args.threads:
        numba.set_num_threads(args.threads)
    torch.set_num_threads(numba.get_num_threads())

    src, pos, target, shapes, starts = make_task(levels, args.batch, args.d_model, args.seed)
    reference_points = get_reference_points(shapes, args.batch, len(levels))
    sizes = dict(
        d_model=args.d_model,
        d_ffn=args.ffn,
        dropout=args.dropout,
        n_levels=len(levels),
        n_heads=args.heads,
        n_points=args.points,
    )
    torch.manual_seed(args.seed)
    layers = {
        "deformnp": DeformableTransformerEncoderLayer(dnt.MSDeformAttn, **sizes),
        "grid_sample": DeformableTransformerEncoderLayer(GridSampleMSDeformAttn, **sizes),
    }
    if args.offset_init_std > 0:  # see the module docstring
        nn.init.normal_(
            layers["deformnp"].self_attn.sampling_offsets.weight, std=args.offset_init_std
        )
    layers["grid_sample"].load_state_dict(layers["deformnp"].state_dict())
    optimizers = {k: torch.optim.Adam(m.parameters(), lr=args.lr) for k, m in layers.items()}

    S = src.shape[1]
    print(
        f"Deformable-DETR encoder layer: batch {args.batch}, levels {levels} (S = Lq = {S}), "
        f"d_model {args.d_model}, {args.heads} heads x {len(levels)} levels x {args.points} "
        f"points, FFN {args.ffn}; {numba.get_num_threads()} Numba threads, "
        f"{torch.get_num_threads()} torch threads"
    )

    def step(name: str) -> tuple[float, float]:
        layer, opt = layers[name], optimizers[name]
        t0 = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        out = layer(src, pos, reference_points, shapes, starts)
        loss = F.mse_loss(out, target)
        loss.backward()
        opt.step()
        return loss.item(), time.perf_counter() - t0

    # Step 0 without the optimizer: both formulations must agree (same weights, same data).
    grads, losses0 = {}, {}
    for name, layer in layers.items():
        layer.zero_grad(set_to_none=True)
        loss = F.mse_loss(layer(src, pos, reference_points, shapes, starts), target)
        loss.backward()
        losses0[name] = loss.item()
        grads[name] = {k: q.grad.clone() for k, q in layer.named_parameters()}
    rel_loss = abs(losses0["deformnp"] - losses0["grid_sample"]) / abs(losses0["grid_sample"])
    compared = [
        k for k in grads["grid_sample"] if args.offset_init_std > 0 or "sampling_offsets" not in k
    ]
    rel_grad = max(
        float((grads["deformnp"][k] - g).abs().max() / g.abs().max().clamp_min(1e-30))
        for k, g in grads["grid_sample"].items()
        if k in compared
    )
    same = rel_loss < 1e-5 and rel_grad < 1e-4
    print(
        f"step 0 loss: deformnp {losses0['deformnp']:.8f}, grid_sample "
        f"{losses0['grid_sample']:.8f} (relative difference {rel_loss:.1e}); gradients of "
        f"{len(compared)}/{len(grads['grid_sample'])} parameters, largest difference "
        f"{rel_grad:.1e} of the parameter's largest gradient: "
        f"{'the same to float32 rounding' if same else 'MISMATCH'}"
    )
    if args.offset_init_std == 0:
        print(
            "  (sampling_offsets not compared: with Deformable-DETR's zero init every sampling "
            "point lies on a pixel centre, a kink of bilinear interpolation, where the two "
            "formulations' rounding picks different one-sided slopes)"
        )
    if not same:
        return 1

    times: dict[str, list[float]] = {name: [] for name in layers}
    print(f"{'step':>4s}  {'deformnp loss':>14s} {'ms':>8s}  {'grid_sample loss':>16s} {'ms':>8s}")
    for i in range(args.steps):
        (l1, t1), (l2, t2) = step("deformnp"), step("grid_sample")  # alternating: load bursts
        if i > 0:  # slow both alike; step 0 is the warm-up (kernel cache, allocator, threads)
            times["deformnp"].append(t1)
            times["grid_sample"].append(t2)
        print(f"{i:4d}  {l1:14.6f} {1e3 * t1:8.1f}  {l2:16.6f} {1e3 * t2:8.1f}")
    med = {name: 1e3 * float(np.median(t)) for name, t in times.items()}
    print(
        f"time per training step (median of {args.steps - 1}): deformnp {med['deformnp']:.1f} ms, "
        f"grid_sample {med['grid_sample']:.1f} ms; grid_sample / deformnp = "
        f"{med['grid_sample'] / med['deformnp']:.2f}x"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
