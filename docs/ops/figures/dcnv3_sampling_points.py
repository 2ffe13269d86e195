"""Where one output pixel of DCNv3 samples, for two groups.

Hollow squares: the regular grid, the reference point (hx + ox*sw - pad_x, hy + oy*sh - pad_y)
plus the dilation grid (j*dw - hx, i*dh - hy) times offset_scale s, labelled with the kernel
point k = j*kh + i (column-major, as InternImage numbers them); dots: the points moved by
s * (dx, dy), one offset per group and point, coloured by group, with marker area proportional
to the (softmaxed) weight. Left: 3x3, dilation 1, s = 1. Right: 3x3, dilation 2, s = 0.75,
remove_center (the centre point k = 4 is not sampled). Offsets and logits are random here; in
InternImage's layer they are predicted from the input.
"""

import matplotlib.pyplot as plt
import numpy as np

H, W = 9, 9
oy, ox = 4, 4
kh = kw = 3
G = 2
colors = ("tab:red", "tab:green")


def points(dilation, scale, remove_center):
    """(i, j) of the sampled points, and the regular grid (y, x), in the op's order."""
    pad = dilation * (kh - 1) // 2  # the layer's padding: the output keeps the input's size
    hy = hx = dilation * (kh - 1) // 2
    ks = [k for k in range(kh * kw) if not (remove_center and k == (kh * kw - 1) // 2)]
    ij = [(k % kh, k // kh) for k in ks]  # k = j*kh + i
    ry = np.array([hy + oy - pad + (i * dilation - hy) * scale for i, j in ij])
    rx = np.array([hx + ox - pad + (j * dilation - hx) * scale for i, j in ij])
    return ks, ry, rx


fig, axes = plt.subplots(1, 2, figsize=(9.0, 4.9))
settings = ((1, 1.0, False), (2, 0.75, True))
for ax, (dilation, scale, rc), seed in zip(axes, settings, (5, 11)):
    rng = np.random.default_rng(seed)
    ks, ry, rx = points(dilation, scale, rc)
    P = len(ks)
    yy, xx = np.mgrid[0:H, 0:W]
    ax.plot(xx.ravel(), yy.ravel(), "o", color="0.85", ms=3, zorder=0)
    ax.plot(rx, ry, "s", mfc="none", mec="tab:blue", ms=11, mew=1.4, zorder=2)
    for k, y, x in zip(ks, ry, rx):
        ax.text(x - 0.42, y - 0.22, str(k), color="tab:blue", fontsize=8)
    ax.plot(ox, oy, "+", color="k", ms=14, mew=1.5, zorder=5)
    for g in range(G):
        off = rng.normal(0.0, 0.55, (P, 2))  # (dx, dy) pairs
        logits = rng.normal(0.0, 0.8, P)
        w = np.exp(logits) / np.exp(logits).sum()  # the layer's softmax over the P points
        sx, sy = rx + off[:, 0] * scale, ry + off[:, 1] * scale
        for p in range(P):
            ax.annotate(
                "",
                xy=(sx[p], sy[p]),
                xytext=(rx[p], ry[p]),
                arrowprops=dict(arrowstyle="-", color=colors[g], lw=0.7, alpha=0.6),
            )
        ax.scatter(sx, sy, s=700 * w, color=colors[g], alpha=0.8, zorder=4, label=f"group {g}")
    ax.set_xlim(-0.5, W - 0.5)
    ax.set_ylim(H - 0.5, -0.5)
    ax.set_aspect("equal")
    ax.set_xlabel("x (input column)")
    ax.set_ylabel("y (input row)")
    title = f"dilation {dilation}, offset_scale {scale}"
    ax.set_title(title + (", remove_center" if rc else ""), fontsize=9)
    ax.legend(loc="lower left", fontsize=8, markerscale=0.5)
fig.tight_layout()
