"""Deformable attention learns where to look
=========================================

A toy you can train on a CPU in a minute or two. Each image is 32 x 32 with one bright blob at a
random place (and a little noise). A three-level feature pyramid (32x32, 16x16, 8x8) is built
from it, and four queries must regress the blob's centre. The model is a two-layer
Deformable-DETR decoder in miniature:

* layer 1: each query starts from a fixed reference point and attends with ``nn.MSDeformAttn``
  (4 heads x 3 levels x 4 points); its output predicts a first guess of the centre;
* layer 2: that guess (detached) becomes the new reference point, as in Deformable-DETR's
  iterative box refinement; the layer attends again and refines the guess.

Only the sampling offsets and attention weights decide where the model looks; after training,
layer 2's sampling points gather on the blob. The first picture, ``deformable_attention.png``,
shows them for a few test images (marker size = attention weight).

The second picture, ``dat_reference_points.png``, shows DAT's deformable attention
(``nn.DeformableAttention2d``) trained on the same task (its output, pooled, regresses the
centre): its uniform grid of reference points and the positions the offset network moved them
to, on an input image. Both are written to the folder given with ``--out-dir`` (default
``deformnp-examples/`` in the current directory).

It needs matplotlib (``pip install matplotlib``, or ``pip install "deformnp[examples]"``)::

    python examples/deformable_attention.py                        # about a minute on 2 cores
    python examples/deformable_attention.py --out-dir docs/images  # the README's pictures
    python examples/deformable_attention.py --steps 100            # a quicker, rougher run
"""

from __future__ import annotations

import argparse
import os
import time

import numpy as np
from threadpoolctl import threadpool_limits

import deformnp as dn
from deformnp import functional as F
from deformnp import nn, optim
from deformnp.ops.attention import level_layout

SIZE = 32
LEVELS = [(32, 32), (16, 16), (8, 8)]
D_MODEL = 32
N_QUERIES = 4
REFERENCE = np.array([[0.3, 0.3], [0.7, 0.3], [0.3, 0.7], [0.7, 0.7]])  # (x, y) per query


def make_batch(rng: np.random.Generator, n: int) -> tuple[np.ndarray, np.ndarray]:
    """Images (n, 32, 32) with one Gaussian blob each, and the blob centres (n, 2) as
    normalized (x, y) (0 = left/top edge, 1 = right/bottom edge)."""
    centres = rng.uniform(0.12, 0.88, (n, 2))
    coords = (np.arange(SIZE) + 0.5) / SIZE
    dx = coords[None, None, :] - centres[:, 0, None, None]
    dy = coords[None, :, None] - centres[:, 1, None, None]
    sigma = rng.uniform(0.04, 0.07, (n, 1, 1))
    images = np.exp(-(dx**2 + dy**2) / (2 * sigma**2)) + 0.05 * rng.standard_normal((n, SIZE, SIZE))
    return images.astype(np.float32), centres.astype(np.float32)


def pyramid(images: np.ndarray) -> np.ndarray:
    """input_flatten (n, S, 12): per position of each level, [intensity, 8 positional
    encodings, 3 level one-hots], levels by 2x2 average pooling, flattened row-major."""
    n = images.shape[0]
    rows = []
    level = images
    for li, (h, w) in enumerate(LEVELS):
        if li:
            level = level.reshape(n, h, 2, w, 2).mean(axis=(2, 4))
        ys, xs = np.meshgrid((np.arange(h) + 0.5) / h, (np.arange(w) + 0.5) / w, indexing="ij")
        pe = [f(np.pi * k * c) for k in (1, 2) for c in (xs, ys) for f in (np.sin, np.cos)]
        pe = np.broadcast_to(np.stack(pe, -1)[None], (n, h, w, 8))
        onehot = np.broadcast_to(np.eye(3)[li], (n, h, w, 3))
        feats = np.concatenate([level[..., None], pe, onehot], -1)
        rows.append(feats.reshape(n, h * w, 12))
    return np.concatenate(rows, 1).astype(np.float32)


def inverse_sigmoid(x: dn.Tensor, eps: float = 1e-5) -> dn.Tensor:
    x = F.clamp(x, eps, 1 - eps)
    return F.log(x / (1 - x))


class DecoderLayer(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.attn = nn.MSDeformAttn(D_MODEL, n_levels=3, n_heads=4, n_points=4)
        self.norm1 = nn.LayerNorm(D_MODEL)
        self.ffn = nn.Sequential(nn.Linear(D_MODEL, 64), nn.ReLU(), nn.Linear(64, D_MODEL))
        self.norm2 = nn.LayerNorm(D_MODEL)
        self.delta = nn.Linear(D_MODEL, 2)
        nn.init.zeros_(self.delta.weight)
        nn.init.zeros_(self.delta.bias)

    def forward(self, query, ref, src, shapes, starts):
        # ref (n, Q, 2): the same point on every level
        ref_levels = F.expand(
            ref.reshape(ref.shape[0], N_QUERIES, 1, 2), ref.shape[0], N_QUERIES, 3, 2
        )
        q = self.norm1(query + self.attn(query, ref_levels, src, shapes, starts))
        q = self.norm2(q + self.ffn(q))
        centre = F.sigmoid(inverse_sigmoid(ref) + self.delta(q))
        return q, centre, ref_levels


class Decoder(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.input_proj = nn.Sequential(
            nn.Linear(12, D_MODEL), nn.ReLU(), nn.Linear(D_MODEL, D_MODEL)
        )
        self.query_embed = nn.Parameter(
            np.random.default_rng(0).normal(0, 1, (N_QUERIES, D_MODEL)).astype(np.float32)
        )
        self.layer1 = DecoderLayer()
        self.layer2 = DecoderLayer()

    def forward(self, feats, shapes, starts):
        n = feats.shape[0]
        src = self.input_proj(feats)
        query = F.expand(self.query_embed.reshape(1, N_QUERIES, D_MODEL), n, N_QUERIES, D_MODEL)
        ref1 = dn.tensor(np.broadcast_to(REFERENCE, (n, N_QUERIES, 2)).astype(np.float32))
        q1, centre1, r1 = self.layer1(query, ref1, src, shapes, starts)
        ref2 = centre1.detach()  # iterative refinement: the guess becomes the reference
        q2, centre2, r2 = self.layer2(q1, ref2, src, shapes, starts)
        return centre1, centre2, (q1, r2)


def train_decoder(steps: int, rng: np.random.Generator) -> tuple[Decoder, list[float]]:
    shapes, starts = level_layout(LEVELS)
    model = Decoder()
    opt = optim.Adam(model.parameters(), lr=2e-3)
    losses = []
    for step in range(steps):
        images, centres = make_batch(rng, 16)
        target = dn.tensor(np.broadcast_to(centres[:, None], (16, N_QUERIES, 2)).copy())
        c1, c2, _ = model(dn.tensor(pyramid(images)), shapes, starts)
        loss = F.l1_loss(c1, target) + F.l1_loss(c2, target)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
        if step % 50 == 0 or step == steps - 1:
            print(f"  decoder step {step:4d}  loss {np.mean(losses[-50:]):.4f}")
    return model, losses


class DATRegressor(nn.Module):
    """Image -> 1x1 conv embedding -> DAT attention (stride 4: an 8x8 grid of reference points)
    -> mean pool -> centre."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Conv2d(3, 16, 1)
        self.attn = nn.DeformableAttention2d(
            16, 2, n_groups=1, stride=4, kernel_size=9, q_size=SIZE, offset_range_factor=2.0
        )
        self.head = nn.Linear(16, 2)

    def forward(self, images):
        n = images.shape[0]
        ys, xs = np.meshgrid(
            (np.arange(SIZE) + 0.5) / SIZE, (np.arange(SIZE) + 0.5) / SIZE, indexing="ij"
        )
        coords = np.broadcast_to(np.stack([xs, ys])[None], (n, 2, SIZE, SIZE))
        x = dn.tensor(np.concatenate([images[:, None], coords], 1).astype(np.float32))
        y, pos, ref = self.attn(F.relu(self.embed(x)))
        pooled = (y * x[:, :1]).mean(dim=(2, 3)) * 10  # intensity-weighted pooling
        return F.sigmoid(self.head(pooled)), pos, ref


def train_dat(steps: int, rng: np.random.Generator) -> DATRegressor:
    model = DATRegressor()
    opt = optim.Adam(model.parameters(), lr=3e-3)
    losses = []
    for step in range(steps):
        images, centres = make_batch(rng, 8)
        pred, _, _ = model(images)
        loss = F.l1_loss(pred, dn.tensor(centres))
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
        if step % 50 == 0 or step == steps - 1:
            print(f"  DAT step {step:4d}  loss {np.mean(losses[-50:]):.4f}")
    return model


def plot_decoder(model: Decoder, rng: np.random.Generator, path: str) -> float:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    shapes, starts = level_layout(LEVELS)
    images, centres = make_batch(rng, 4)
    with dn.no_grad():
        feats = dn.tensor(pyramid(images))
        c1, c2, (q1, ref2) = model(feats, shapes, starts)
        loc, w = model.layer2.attn.sampling(q1, ref2, shapes)
    loc, w, c2 = loc.numpy(), w.numpy(), c2.numpy()
    err = float(np.abs(c2 - centres[:, None]).mean() * SIZE)
    fig, axes = plt.subplots(1, 4, figsize=(12, 3.4))
    markers = ["o", "s", "^"]
    for i, ax in enumerate(axes):
        ax.imshow(images[i], cmap="gray", extent=(0, 1, 1, 0))
        for l in range(3):
            pts = loc[i, :, :, l].reshape(-1, 2)
            size = 400 * w[i, :, :, l].reshape(-1)
            ax.scatter(
                pts[:, 0],
                pts[:, 1],
                s=size,
                marker=markers[l],
                facecolors="none",
                edgecolors=plt.cm.autumn(l / 2),
                linewidths=1,
                label=f"level {l} ({LEVELS[l][0]}x{LEVELS[l][1]})",
            )
        ax.scatter(*REFERENCE.T, marker="+", c="cyan", s=60, label="start reference")
        ax.scatter(*centres[i], marker="x", c="lime", s=80, label="true centre")
        ax.scatter(c2[i, :, 0], c2[i, :, 1], marker=".", c="deepskyblue", s=40, label="predicted")
        ax.set_xlim(0, 1)
        ax.set_ylim(1, 0)
        ax.set_xticks([])
        ax.set_yticks([])
    axes[0].legend(loc="lower left", fontsize=6, framealpha=0.7)
    fig.suptitle(
        "MSDeformAttn, layer 2: where the 4 queries sample (4 heads x 3 levels x 4 "
        "points; size = attention weight)",
        fontsize=10,
    )
    fig.tight_layout()
    fig.savefig(path, dpi=80)  # the figure stays open: the documentation's gallery shows it
    return err


def plot_dat(model: DATRegressor, rng: np.random.Generator, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    images, centres = make_batch(rng, 3)
    with dn.no_grad():
        _, pos, ref = model(images)
    pos, ref = pos.numpy(), ref.numpy()  # (n, G, Hk, Wk, 2) as normalized (y, x) in [-1, 1]

    def to_unit(p):  # align_corners=True: -1 and 1 are the centres of the corner pixels
        return ((p + 1) / 2 * (SIZE - 1) + 0.5) / SIZE

    fig, axes = plt.subplots(1, 3, figsize=(9, 3.4))
    for i, ax in enumerate(axes):
        ax.imshow(images[i], cmap="gray", extent=(0, 1, 1, 0))
        r = to_unit(ref[i, 0].reshape(-1, 2))
        p = to_unit(pos[i, 0].reshape(-1, 2))
        ax.quiver(
            r[:, 1],
            r[:, 0],
            p[:, 1] - r[:, 1],
            p[:, 0] - r[:, 0],
            angles="xy",
            scale_units="xy",
            scale=1,
            color="orange",
            width=0.006,
        )
        ax.scatter(r[:, 1], r[:, 0], c="cyan", s=8, label="reference")
        ax.scatter(p[:, 1], p[:, 0], c="red", s=10, label="deformed")
        ax.scatter(*centres[i], marker="x", c="lime", s=80, label="blob centre")
        ax.set_xlim(0, 1)
        ax.set_ylim(1, 0)
        ax.set_xticks([])
        ax.set_yticks([])
    axes[0].legend(loc="lower left", fontsize=6, framealpha=0.7)
    fig.suptitle(
        "DeformableAttention2d (DAT): reference grid (8x8, stride 4) and the learned "
        "sampling positions",
        fontsize=10,
    )
    fig.tight_layout()
    fig.savefig(path, dpi=80)  # the figure stays open: the documentation's gallery shows it


def run(args: argparse.Namespace) -> None:
    rng = np.random.default_rng(args.seed)
    nn.init.manual_seed(args.seed)

    t0 = time.perf_counter()
    print("Training the two-layer deformable decoder")
    decoder, losses = train_decoder(args.steps, rng)
    path = os.path.join(args.out_dir, "deformable_attention.png")
    err = plot_decoder(decoder, rng, path)
    print(f"mean |predicted - true centre| on the plotted images: {err:.2f} pixels")
    print(f"wrote {path}")

    print("Training the DAT regressor")
    dat = train_dat(args.steps, rng)
    path = os.path.join(args.out_dir, "dat_reference_points.png")
    plot_dat(dat, rng, path)
    print(f"wrote {path}")
    print(f"{time.perf_counter() - t0:.0f} s in all")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.partition("\n")[0])
    parser.add_argument("--steps", type=int, default=400, help="training steps of each model")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--out-dir",
        default="deformnp-examples",
        help="folder for the two pictures, created if missing (default: %(default)s)",
    )
    args = parser.parse_args()
    try:  # before any training: both pictures need matplotlib
        import matplotlib  # noqa: F401
    except ImportError:
        msg = 'needs matplotlib: pip install matplotlib (or pip install "deformnp[examples]")'
        parser.exit(2, f"{parser.prog} {msg}\n")
    os.makedirs(args.out_dir, exist_ok=True)
    # The matrices here are small: BLAS threads only fight Numba's worker threads for the cores (on
    # a busy 2-core machine that made each step 30x slower), and BLAS's thread count changes the
    # last bits of its products, so the pictures would depend on the machine's number of cores.
    with threadpool_limits(limits=1, user_api="blas"):
        run(args)


if __name__ == "__main__":
    main()
