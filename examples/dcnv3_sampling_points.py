"""DCNv3 learns where to sample
============================

InternImage's DCNv3 layer (``nn.DCNv3``) predicts, at every pixel and for each of its groups,
where to sample its (projected) input and with which weights: it starts on the regular 3 x 3
grid around the pixel with equal weights, and moves the points as it learns. Here a tiny
network learns a task that the 3 x 3 grid cannot do: from a smooth random image, predict the
image moved so that each pixel shows the pixel 3 to its right and 2 below::

    stem:  Linear(1, 8)                               (N, 16, 16, 1) -> (N, 16, 16, 8)
    core:  DCNv3(8, kernel_size=3, group=2)           (N, 16, 16, 8), channels last
    head:  Linear(8, 1)                               (N, 16, 16, 1)

The mean squared error before and after training and, per group, the weighted mean displacement
of the sampling points (from ``DCNv3.sampling_locations``) are printed: both groups learn to look
about 3 pixels right and 2 down. The picture ``dcnv3_sampling_points.png``, written to the folder
given with ``--out-dir`` (default ``deformnp-examples/`` in the current directory), shows on test
images, for a few pixels (+), the regular grid (grey), the pixel to copy (x) and the learned
sampling points of each group (colour, marker size = weight).

It needs matplotlib (``pip install matplotlib``, or ``pip install "deformnp[examples]"``)::

    python examples/dcnv3_sampling_points.py                        # about 15 s on 2 cores
    python examples/dcnv3_sampling_points.py --steps 100            # a quicker, rougher run
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

SIZE = 16
DX, DY = 3, 2  # the target at (y, x) is the image at (y + DY, x + DX)
MARGIN = 8  # the random field is larger than the image, so the shifted targets are defined


def make_batch(rng: np.random.Generator, n: int) -> tuple[np.ndarray, np.ndarray]:
    """Images (n, 16, 16, 1) of smooth noise and targets (n, 16, 16, 1): at (y, x) the noise
    at (y + DY, x + DX)."""
    side = SIZE + 2 * MARGIN
    noise = rng.standard_normal((n, side, side))
    f = np.fft.fftfreq(side)
    blur = np.exp(-2 * (np.pi * 2.0) ** 2 * (f[:, None] ** 2 + f[None, :] ** 2))  # sigma 2 px
    field = np.fft.ifft2(np.fft.fft2(noise) * blur).real
    field /= field.std(axis=(1, 2), keepdims=True)
    m, s = MARGIN, SIZE
    image = field[:, m : m + s, m : m + s]
    moved = field[:, m + DY : m + DY + s, m + DX : m + DX + s]
    return image[..., None].astype(np.float32), moved[..., None].astype(np.float32)


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Linear(1, 8)
        self.core = nn.DCNv3(8, kernel_size=3, group=2)
        self.head = nn.Linear(8, 1)

    def forward(self, x: dn.Tensor) -> dn.Tensor:
        return self.head(self.core(self.stem(x)))


def evaluate(net: Net, seed: int) -> float:
    x, y = make_batch(np.random.default_rng(seed), 64)
    with dn.no_grad():
        return F.mse_loss(net(dn.tensor(x)), dn.tensor(y)).item()


def train(net: Net, steps: int, seed: int, batch: int = 8, lr: float = 1e-2) -> None:
    """Adam on fresh images."""
    rng = np.random.default_rng(seed)
    opt = optim.Adam(net.parameters(), lr=lr)
    for step in range(steps):
        x, y = make_batch(rng, batch)
        loss = F.mse_loss(net(dn.tensor(x)), dn.tensor(y))
        opt.zero_grad()
        loss.backward()
        opt.step()
        if (step + 1) % max(1, steps // 5) == 0:
            print(f"    step {step + 1:4d}  loss {loss.item():.3f}")


def displacements(net: Net, x: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Sampling points (N, H, W, G, P, 2) as (x, y) in pixels, their weights, and the weighted
    mean displacement per group (G, 2) over the inner pixels."""
    with dn.no_grad():
        loc, w = net.core.sampling_locations(net.stem(dn.tensor(x)))
    loc, w = loc.numpy(), w.numpy()
    yy, xx = np.mgrid[0:SIZE, 0:SIZE]
    centre = np.stack([xx, yy], -1)[None, :, :, None, None]
    mean = (w[..., None] * (loc - centre)).sum(-2)  # (N, H, W, G, 2)
    inner = mean[:, 2 : -DY - 2, 2 : -DX - 2]  # away from the borders
    return loc, w, inner.mean(axis=(0, 1, 2))


def plot(net: Net, out: str, seed: int) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    x, _ = make_batch(np.random.default_rng(seed), 3)
    loc, w, _ = displacements(net, x)
    taps = np.array([(i, j) for i in (-1, 0, 1) for j in (-1, 0, 1)])  # (dx, dy), DCNv3's order
    positions = [(4, 4), (7, 9), (10, 5)]  # (y, x) output pixels
    colours = ["tab:red", "tab:blue"]
    fig, axes = plt.subplots(1, len(x), figsize=(3.4 * len(x), 3.6), dpi=80)
    for n, ax in enumerate(axes):
        ax.imshow(x[n, ..., 0], cmap="gray")
        for oy, ox in positions:
            ax.scatter(ox + taps[:, 0], oy + taps[:, 1], s=12, c="0.6", marker="s")
            for g, colour in enumerate(colours):
                pts = loc[n, oy, ox, g]
                ax.scatter(pts[:, 0], pts[:, 1], s=8 + 120 * w[n, oy, ox, g], c=colour,
                           edgecolors="k", linewidths=0.4, label=f"group {g}")  # fmt: skip
            ax.plot([ox], [oy], "+", c="yellow", ms=10, mew=2)
            ax.plot([ox + DX], [oy + DY], "x", c="yellow", ms=8, mew=2)
        ax.set_xlim(-0.5, SIZE - 0.5)
        ax.set_ylim(SIZE - 0.5, -0.5)
        ax.axis("off")
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(handles[:2], labels[:2], loc="lower center", ncol=2)
    fig.suptitle(f"DCNv3's learned sampling points (target: the pixel {DX} right, {DY} down)")
    fig.tight_layout(rect=(0, 0.06, 1, 1))
    fig.savefig(out)  # the figure stays open: the documentation's gallery shows it
    print(f"wrote {out}")


def run(args: argparse.Namespace) -> None:
    nn.init.manual_seed(args.seed)
    net = Net()
    before = evaluate(net, args.seed + 1)
    print(f"training a DCNv3 network ({args.steps} steps)")
    t0 = time.perf_counter()
    train(net, args.steps, args.seed)
    print(f"  done in {time.perf_counter() - t0:.0f} s")
    after = evaluate(net, args.seed + 1)
    print(f"test mean squared error: {before:.3f} before training, {after:.3f} after")
    x, _ = make_batch(np.random.default_rng(args.seed + 1), 16)
    for g, (dx, dy) in enumerate(displacements(net, x)[2]):
        print(f"group {g}: samples on average at dx = {dx:+.2f}, dy = {dy:+.2f} pixels")
    plot(net, os.path.join(args.out_dir, "dcnv3_sampling_points.png"), args.seed + 2)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.partition("\n")[0])
    parser.add_argument("--steps", type=int, default=1000, help="training steps")
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
    # The matrices here are small: BLAS threads only fight Numba's worker threads for the cores,
    # and BLAS's thread count changes the last bits of its products, so the picture would depend
    # on the machine's number of cores.
    with threadpool_limits(limits=1, user_api="blas"):
        run(args)


if __name__ == "__main__":
    main()
