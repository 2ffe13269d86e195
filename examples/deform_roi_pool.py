"""Deformable RoI pooling learns where each bin should look
========================================================

The offsets of mmcv's ``deform_roi_pool`` (``deformnp.ops.deform_roi_pool``) are trained with
deformnp's autograd engine until a misplaced box pools what the object's true box would.

A synthetic 3-channel 64 x 64 image holds one blurred, coloured ellipse whose colour changes
across it (red grows to the right, green downwards), so every part of the object looks
different. A detector's box is off: shifted and too small. The *target* is what aligned RoI
Align pools from the object's true box. Starting from the poor box, only the (1, 2, 7, 7) offsets
of ``deform_roi_pool`` are trained (Adam on the mean squared error to the target); each of the 49
bins moves by ``gamma * offset * (roi_w, roi_h)`` until it pools the part of the object the
target expects, i.e. the bins spread from the poor box onto the true one (where the object is
flat, near its rim, the target says little and a bin may settle elsewhere). The picture
``deform_roi_pool.png``, written to the folder given with ``--out-dir`` (default
``deformnp-examples/`` in the current directory), shows the bin centres before (white) and after
(yellow, with arrows) against those of the true box (green), the pooled 7 x 7 features (target,
before, after) and the loss.

It needs matplotlib (``pip install matplotlib``, or ``pip install "deformnp[examples]"``)::

    python examples/deform_roi_pool.py                          # seconds once Numba has compiled
    python examples/deform_roi_pool.py --steps 100 --out-dir droi
    python examples/deform_roi_pool.py --out-dir docs/images    # the README's picture
"""

from __future__ import annotations

import argparse
import os
import time

import numpy as np
from scipy.ndimage import gaussian_filter

import deformnp as dn
from deformnp import functional as F
from deformnp import ops, optim

SIZE = 64
P = 7  # output_size
GAMMA = 0.1  # mmcv's default
RATIO = 2  # samples per bin side


def make_image() -> tuple[np.ndarray, np.ndarray]:
    """(1, 3, 64, 64) image and the object's true box (batch, x1, y1, x2, y2)."""
    yy, xx = np.mgrid[0:SIZE, 0:SIZE].astype(np.float64)
    cx, cy, rx, ry = 36.0, 30.0, 17.0, 12.0
    u, v = (xx - cx) / rx, (yy - cy) / ry
    mask = (u**2 + v**2 <= 1).astype(np.float64)
    chans = [mask * (0.5 + 0.5 * u), mask * (0.5 + 0.5 * v), mask]
    img = np.stack([gaussian_filter(c, 2.5) for c in chans])[None]
    # pixel (i, j) sits at y = i, x = j; an aligned box [x1, x2) covers x1 - 0.5 .. x2 - 0.5
    box = np.array([[0, cx - rx + 0.5, cy - ry + 0.5, cx + rx + 0.5, cy + ry + 0.5]])
    return img, box


def bin_centres(box: np.ndarray, offset: np.ndarray) -> np.ndarray:
    """(P, P, 2) centres (x, y) of the bins of deform_roi_pool (aligned, spatial_scale 1)."""
    _, x1, y1, x2, y2 = box[0]
    sx, sy = x1 - 0.5, y1 - 0.5
    rw, rh = x2 - x1, y2 - y1
    p = np.arange(P) + 0.5
    cx = sx + GAMMA * rw * offset[0, 0] + p[None, :] * rw / P
    cy = sy + GAMMA * rh * offset[0, 1] + p[:, None] * rh / P
    return np.stack([cx, cy], axis=-1)


def train(img: np.ndarray, box: np.ndarray, target: np.ndarray, steps: int, lr: float):
    offset = dn.tensor(np.zeros((1, 2, P, P)), requires_grad=True)
    opt = optim.Adam([offset], lr=lr)
    losses = []
    for _ in range(steps):
        out = ops.deform_roi_pool(img, box, offset, P, 1.0, RATIO, GAMMA)
        loss = F.mse_loss(out, target)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    final = ops.deform_roi_pool(img, box, offset.detach(), P, 1.0, RATIO, GAMMA).numpy()
    return offset.detach().numpy(), np.array(losses), final


def plot(path, img, true_box, box, before, after, target, pooled0, pooled1, losses) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Rectangle

    rgb = np.clip(img[0].transpose(1, 2, 0), 0, 1)
    fig = plt.figure(figsize=(10.5, 5.2), dpi=90)
    ax = fig.add_axes([0.02, 0.06, 0.52, 0.86])
    ax.imshow(rgb, interpolation="nearest")
    for b, style, colour, label in [
        (true_box, "-", "lime", "true box (target)"),
        (box, "--", "white", "detected box (input)"),
    ]:
        _, x1, y1, x2, y2 = b[0]
        ax.add_patch(
            Rectangle(
                (x1 - 0.5, y1 - 0.5),
                x2 - x1,
                y2 - y1,
                fill=False,
                ls=style,
                lw=1.5,
                ec=colour,
                label=label,
            )
        )
    b0, b1 = before.reshape(-1, 2), after.reshape(-1, 2)
    bt = bin_centres(true_box, np.zeros((1, 2, P, P))).reshape(-1, 2)
    ax.scatter(
        *bt.T, s=14, c="lime", marker="x", linewidths=0.8, label="bin centres of the true box"
    )
    ax.scatter(*b0.T, s=9, c="white", label="bin centres, no offset")
    ax.quiver(
        *b0.T, *(b1 - b0).T, angles="xy", scale_units="xy", scale=1, color="yellow", width=0.003
    )
    ax.scatter(
        *b1.T,
        s=11,
        c="yellow",
        edgecolors="k",
        linewidths=0.3,
        label="bin centres, learned offsets",
    )
    ax.set_xlim(-0.5, SIZE - 0.5)
    ax.set_ylim(SIZE - 0.5, -0.5)
    ax.set_xticks([])
    ax.set_yticks([])
    ax.legend(loc="lower left", fontsize=7, framealpha=0.7)
    ax.set_title("deform_roi_pool: learned offsets move the 7 x 7 bins", fontsize=10)

    for i, (arr, title) in enumerate(
        [
            (target, "target\n(RoI Align, true box)"),
            (pooled0, "before\n(offsets 0)"),
            (pooled1, "after\n(learned offsets)"),
        ]
    ):
        a = fig.add_axes([0.57 + i * 0.14, 0.52, 0.12, 0.3])
        a.imshow(np.clip(arr[0].transpose(1, 2, 0), 0, 1), interpolation="nearest")
        a.set_title(title, fontsize=8)
        a.set_xticks([])
        a.set_yticks([])
    a = fig.add_axes([0.6, 0.1, 0.37, 0.3])
    a.semilogy(losses)
    a.set_xlabel("Adam step", fontsize=8)
    a.set_ylabel("MSE to target", fontsize=8)
    a.tick_params(labelsize=7)
    fig.savefig(path)  # the figure stays open: the documentation's gallery shows it


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.partition("\n")[0])
    parser.add_argument("--steps", type=int, default=800, help="Adam steps")
    parser.add_argument("--lr", type=float, default=0.05, help="Adam's learning rate")
    parser.add_argument(
        "--out-dir",
        default="deformnp-examples",
        help="folder for the picture, created if missing (default: %(default)s)",
    )
    args = parser.parse_args()
    try:  # the picture needs matplotlib: checked before the training
        import matplotlib  # noqa: F401
    except ImportError:
        msg = 'needs matplotlib: pip install matplotlib (or pip install "deformnp[examples]")'
        parser.exit(2, f"{parser.prog} {msg}\n")

    img, true_box = make_image()
    box = np.array([[0, 11.0, 25.0, 35.0, 44.0]])  # shifted and too small
    target = ops.roi_align(img, true_box, P, 1.0, RATIO, aligned=True).numpy()
    pooled0 = ops.deform_roi_pool(img, box, None, P, 1.0, RATIO, GAMMA).numpy()
    t0 = time.perf_counter()
    offset, losses, pooled1 = train(img, box, target, args.steps, args.lr)
    print(
        f"{args.steps} Adam steps in {time.perf_counter() - t0:.1f} s: MSE {losses[0]:.2e} -> "
        f"{losses[-1]:.2e}; mean |offset| {np.abs(offset).mean():.2f} (bins moved by "
        f"{np.abs(bin_centres(box, offset) - bin_centres(box, 0 * offset)).mean():.1f} px on average)"
    )
    os.makedirs(args.out_dir, exist_ok=True)
    out = os.path.join(args.out_dir, "deform_roi_pool.png")
    plot(
        out,
        img,
        true_box,
        box,
        bin_centres(box, np.zeros_like(offset)),
        bin_centres(box, offset),
        target,
        pooled0,
        pooled1,
        losses,
    )
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
