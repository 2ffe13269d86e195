"""Deformable convolution learns where to look
===========================================

A small classifier is trained on shapes whose size and pose vary. Each 32 x 32 image holds the
thin outline of one of four shapes (circle, triangle, square, star) at a random scale (radius 5
to 13 pixels), rotation and position, plus noise; the task is to name the shape. Two small
networks are trained on the same stream of images::

    stem:  Conv2d(1, 8, 3, stride 2, padding 1) + ReLU       -> 16 x 16
    mid:   X(8, 16, 3, padding 1) + ReLU                      -> 16 x 16
    head:  global average pool, Linear(16, 4)

with X = ``nn.ModulatedDeformConv2dPack`` (DCN v2, mmcv's layer: it predicts its own offsets and
mask with a zero-initialised conv, so it starts as a plain convolution) or X = ``nn.Conv2d``.
The plain network sees 7 x 7 input pixels per output; the deformable one can move its nine
sampling points anywhere, so it can follow an outline that is larger than its kernel. Both
accuracies are printed, and the picture ``deform_conv_offsets.png``, written to the folder given
with ``--out-dir`` (default ``deformnp-examples/`` in the current directory), shows the learned
sampling points of the deformable layer on test images: for a few output positions, the regular
3 x 3 grid (grey) and where the layer actually samples (colour, marker size = mask).

It needs matplotlib (``pip install matplotlib``, or ``pip install "deformnp[examples]"``)::

    python examples/deform_conv_offsets.py                        # about 30 s on 2 cores
    python examples/deform_conv_offsets.py --steps 100            # a quicker, rougher run
    python examples/deform_conv_offsets.py --out-dir docs/images  # the README's picture
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

SIZE = 32
CLASSES = ["circle", "triangle", "square", "star"]


def make_batch(rng: np.random.Generator, n: int) -> tuple[np.ndarray, np.ndarray]:
    """Images (n, 1, 32, 32) of shape outlines and their labels (n,)."""
    labels = rng.integers(0, len(CLASSES), n)
    radius = rng.uniform(5.0, 13.0, (n, 1, 1))
    turn = rng.uniform(0, 2 * np.pi, (n, 1, 1))
    cy, cx = (SIZE - 1) / 2 + rng.uniform(-3, 3, (2, n, 1, 1))
    yy, xx = np.mgrid[0:SIZE, 0:SIZE].astype(np.float64)
    dy, dx = yy[None] - cy, xx[None] - cx
    r = np.hypot(dy, dx)
    theta = np.arctan2(dy, dx) - turn
    edge = np.empty_like(r)  # the outline's radius in the direction theta
    for k, sides in ((1, 3), (2, 4)):  # regular polygons: R cos(pi/n) / cos(phase - pi/n)
        sel = labels == k
        phase = np.mod(theta[sel], 2 * np.pi / sides) - np.pi / sides
        edge[sel] = radius[sel] * np.cos(np.pi / sides) / np.cos(phase)
    edge[labels == 0] = np.broadcast_to(radius[labels == 0], edge[labels == 0].shape)
    sel = labels == 3
    edge[sel] = radius[sel] * (0.65 + 0.35 * np.cos(5 * theta[sel]))
    images = np.clip(1.0 - np.abs(r - edge) / 1.2, 0.0, 1.0)
    images += 0.1 * rng.standard_normal(images.shape)
    return images[:, None].astype(np.float32), labels


class Net(nn.Module):
    def __init__(self, deformable: bool) -> None:
        super().__init__()
        self.stem = nn.Conv2d(1, 8, 3, stride=2, padding=1)
        if deformable:
            self.mid = nn.ModulatedDeformConv2dPack(8, 16, 3, padding=1)
        else:
            self.mid = nn.Conv2d(8, 16, 3, padding=1)
        self.head = nn.Linear(16, len(CLASSES))

    def features(self, x: dn.Tensor) -> dn.Tensor:
        return F.relu(self.stem(x))

    def forward(self, x: dn.Tensor) -> dn.Tensor:
        h = F.relu(self.mid(self.features(x)))
        return self.head(h.mean(dim=(2, 3)))


def train(net: Net, steps: int, seed: int, batch: int = 32, lr: float = 5e-3) -> float:
    """Adam on fresh images; returns the accuracy on 1000 new ones."""
    rng = np.random.default_rng(seed)
    opt = optim.Adam(net.parameters(), lr=lr)
    for step in range(steps):
        x, y = make_batch(rng, batch)
        loss = F.cross_entropy(net(dn.tensor(x)), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        if (step + 1) % max(1, steps // 5) == 0:
            print(f"    step {step + 1:4d}  loss {loss.item():.3f}")
    x, y = make_batch(np.random.default_rng(seed + 1), 1000)
    with dn.no_grad():
        pred = np.argmax(net(dn.tensor(x)).numpy(), axis=1)
    return float(np.mean(pred == y))


def plot(net: Net, out: str, seed: int) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rng = np.random.default_rng(seed)
    x, y = make_batch(rng, 64)
    picks = [int(np.flatnonzero(y == k)[0]) for k in range(len(CLASSES))]
    x = x[picks]
    with dn.no_grad():
        feats = net.features(dn.tensor(x))
        offset, mask = net.mid.offset_and_mask(feats)
    offset, mask = offset.numpy(), mask.numpy()
    grid_i, grid_j = np.divmod(np.arange(9), 3)
    positions = [(4, 4), (8, 8), (11, 6)]  # output pixels of the 16 x 16 map
    colours = ["tab:red", "tab:orange", "tab:cyan"]
    fig, axes = plt.subplots(1, len(picks), figsize=(3.0 * len(picks), 3.3), dpi=80)
    for ax, n, label in zip(axes, range(len(picks)), y[picks]):
        ax.imshow(x[n, 0], cmap="gray", vmin=0, vmax=1)
        for (oy, ox), colour in zip(positions, colours):
            base_y = oy + grid_i - 1  # kernel points on the 16 x 16 map (padding 1)
            base_x = ox + grid_j - 1
            dy = offset[n, 0::2, oy, ox]  # torchvision's layout: (dy, dx) per kernel point
            dx = offset[n, 1::2, oy, ox]
            m = mask[n, :, oy, ox]
            # a 16 x 16 position p lies over input pixel 2p (stride-2 stem)
            ax.scatter(2 * base_x, 2 * base_y, s=12, c="0.6", marker="s")
            ax.scatter(2 * (base_x + dx), 2 * (base_y + dy), s=10 + 80 * m, c=colour,
                       edgecolors="k", linewidths=0.4)  # fmt: skip
            ax.plot([2 * ox], [2 * oy], "+", c=colour, ms=9, mew=2)
        ax.set_title(CLASSES[label])
        ax.set_xlim(-0.5, SIZE - 0.5)
        ax.set_ylim(SIZE - 0.5, -0.5)
        ax.axis("off")
    fig.suptitle("learned sampling points of ModulatedDeformConv2dPack (grey: regular 3x3 grid)")
    fig.tight_layout()
    fig.savefig(out)  # the figure stays open: the documentation's gallery shows it
    print(f"wrote {out}")


def run(args: argparse.Namespace) -> None:
    results = {}
    for name, deformable in (("plain conv", False), ("deformable conv", True)):
        nn.init.manual_seed(args.seed)
        net = Net(deformable)
        print(f"training the network with a {name} ({args.steps} steps)")
        t0 = time.perf_counter()
        results[name] = train(net, args.steps, args.seed)
        print(f"  accuracy {results[name]:.3f}  ({time.perf_counter() - t0:.0f} s)")
        if deformable:
            plot(net, os.path.join(args.out_dir, "deform_conv_offsets.png"), args.seed + 2)
    for name, acc in results.items():
        print(f"test accuracy with a {name:16s} {acc:.3f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.partition("\n")[0])
    parser.add_argument("--steps", type=int, default=600, help="training steps per network")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--out-dir",
        default="deformnp-examples",
        help="folder for the picture (default: %(default)s)",
    )
    args = parser.parse_args()
    try:  # before any work: the picture needs matplotlib
        import matplotlib  # noqa: F401
    except ImportError:
        msg = 'needs matplotlib: pip install matplotlib (or pip install "deformnp[examples]")'
        parser.exit(2, f"{parser.prog} {msg}\n")
    os.makedirs(args.out_dir, exist_ok=True)
    # The matrices here are small: BLAS threads only fight Numba's worker threads for the cores (on
    # a busy 2-core machine that made each step 30x slower), and BLAS's thread count changes the
    # last bits of its products, so the picture would depend on the machine's number of cores.
    with threadpool_limits(limits=1, user_api="blas"):
        run(args)


if __name__ == "__main__":
    main()
