"""Bins of deformable RoI pooling moved by their offsets, from deformnp's own geometry code.

Left: deform_roi_pool (mmcv): each bin of the aligned RoI Align grid moves by
gamma * offset * (roi_w, roi_h); sample points at sub-cell centres. Right: deform_ps_roi_pool
(Deformable-ConvNets): rounded box, samples at sub-bin starts; samples beyond the validity lines
-0.5 and W - 0.5 (H - 0.5) are skipped (crosses). Pixel (i, j) has its centre at (y, x) = (i, j).
"""

import matplotlib.pyplot as plt
import numpy as np
from matplotlib.patches import Rectangle

from deformnp.kernels.roi_geometry import align_geometry, deform_ps_geometry

H, W = 9, 12
P = 3
rng = np.random.default_rng(4)
colors = plt.cm.tab10(np.arange(P * P))

fig, axes = plt.subplots(1, 2, figsize=(10, 4.2))
for ax in axes:
    for j in range(W + 1):
        ax.axvline(j - 0.5, color="0.85", lw=0.6, zorder=0)
    for i in range(H + 1):
        ax.axhline(i - 0.5, color="0.85", lw=0.6, zorder=0)
    ax.set_xlim(-1.5, W + 0.5)
    ax.set_ylim(H + 0.5, -1.5)
    ax.set_aspect("equal")
    ax.set_xticks(range(0, W, 2))
    ax.set_yticks(range(0, H, 2))
    ax.tick_params(labelsize=7)
    ax.add_patch(Rectangle((-0.5, -0.5), W, H, fill=False, lw=1.0, color="0.4"))


def draw_bins(ax, y0s, x0s, bh, bw, moved_y, moved_x, samples):
    for ph in range(P):
        for pw in range(P):
            q = ph * P + pw
            ax.add_patch(
                Rectangle((x0s[pw], y0s[ph]), bw, bh, fill=False, ls=":", lw=0.8, color="0.5")
            )
            my, mx = moved_y[ph, pw], moved_x[ph, pw]
            ax.add_patch(
                Rectangle((mx, my), bw, bh, facecolor=colors[q], alpha=0.18, edgecolor=colors[q])
            )
            ax.annotate(
                "",
                (mx + bw / 2, my + bh / 2),
                (x0s[pw] + bw / 2, y0s[ph] + bh / 2),
                arrowprops=dict(arrowstyle="->", color=colors[q], lw=1.2),
            )
            for y, x, ok in samples(ph, pw, my, mx):
                ax.plot(x, y, "o" if ok else "x", color=colors[q], ms=3.5 if ok else 5)


# deform_roi_pool: gamma = 0.1, sampling_ratio = 2
gamma = 0.1
box = np.array([[0, 2.5, 1.8, 9.5, 7.8]])
off = rng.uniform(-1.2, 1.2, (1, 2, P, P))
fgeo, igeo = align_geometry("deform_roi_pool", box, (P, P), 1.0, 2, True, gamma)
sy, sx, bh, bw, grh, grw = fgeo[0]
gh, gw = int(igeo[0, 1]), int(igeo[0, 2])
y0s, x0s = sy + np.arange(P) * bh, sx + np.arange(P) * bw
moved_y = y0s[:, None] + grh * off[0, 1]
moved_x = x0s[None, :] + grw * off[0, 0]


def align_samples(ph, pw, my, mx):
    return [
        (my + (iy + 0.5) * bh / gh, mx + (ix + 0.5) * bw / gw, True)
        for iy in range(gh)
        for ix in range(gw)
    ]


draw_bins(axes[0], y0s, x0s, bh, bw, moved_y, moved_x, align_samples)
axes[0].set_title("deform_roi_pool: gamma * offset * (roi_w, roi_h), 2 x 2 samples", fontsize=9)

# deform_ps_roi_pool: trans_std = 0.1, sample_per_part = 2, part_size = pooled_size
ts, spp = 0.1, 2
box = np.array([[0, 4.4, 2.6, 11.3, 8.2]])  # rounded to (4, 3, 11, 8): roi 8 x 6
geo, _, _, _ = deform_ps_geometry(box, 1.0, 1, P, P, spp, np.float64)
sh, sw, bh, bw, subh, subw, rh, rw = geo[0]
off = rng.uniform(-1.0, 1.0, (1, 2, P, P))
off[0, :, 1:, 2] = 1.8  # push right-hand bins over the lines x = W - 0.5, y = H - 0.5
y0s, x0s = sh + np.arange(P) * bh, sw + np.arange(P) * bw
moved_y = y0s[:, None] + ts * off[0, 1] * rh
moved_x = x0s[None, :] + ts * off[0, 0] * rw


def ps_samples(ph, pw, my, mx):
    pts = []
    for ih in range(spp):
        for iw in range(spp):
            y, x = my + ih * subh, mx + iw * subw
            pts.append((y, x, -0.5 <= x <= W - 0.5 and -0.5 <= y <= H - 0.5))
    return pts


draw_bins(axes[1], y0s, x0s, bh, bw, moved_y, moved_x, ps_samples)
axes[1].set_title(
    "deform_ps_roi_pool: trans_std * offset * (roi_w, roi_h), samples at sub-bin starts",
    fontsize=9,
)
fig.tight_layout()
