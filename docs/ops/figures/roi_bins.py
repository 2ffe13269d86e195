"""The bins of RoI Pool and RoI Align over one box, from deformnp's own geometry code.

Left: roi_pool's integer bins (each a block of whole pixels). Right: roi_align with
aligned=True and the adaptive grid (sampling_ratio=-1): the real-valued bins and their
sampling points. Pixel (i, j) has its centre at (y, x) = (i, j).
"""

import matplotlib.pyplot as plt
import numpy as np
from matplotlib.patches import Rectangle

from deformnp.kernels.roi_geometry import align_geometry, pool_bins

H, W = 9, 12
PH, PW = 2, 3
box = np.array([[0, 1.6, 1.3, 9.2, 7.4]])  # (batch, x1, y1, x2, y2), spatial_scale 1
colors = plt.cm.tab10(np.arange(PH * PW))

fig, axes = plt.subplots(1, 2, figsize=(10, 4.2))
for ax in axes:
    for j in range(W + 1):
        ax.axvline(j - 0.5, color="0.85", lw=0.6, zorder=0)
    for i in range(H + 1):
        ax.axhline(i - 0.5, color="0.85", lw=0.6, zorder=0)
    yy, xx = np.mgrid[0:H, 0:W]
    ax.plot(xx.ravel(), yy.ravel(), ".", color="0.7", ms=3, zorder=1)
    ax.set_xlim(-0.5, W - 0.5)
    ax.set_ylim(H - 0.5, -0.5)
    ax.set_aspect("equal")
    ax.set_xticks(range(W))
    ax.set_yticks(range(H))
    ax.tick_params(labelsize=7)

# roi_pool: rounded box, integer bins [hs, he) x [ws, we)
ax = axes[0]
_, hs, he, ws, we = pool_bins("roi_pool", box, (PH, PW), 1.0, H, W, np.float64)
for ph in range(PH):
    for pw in range(PW):
        q = ph * PW + pw
        ax.add_patch(
            Rectangle(
                (ws[0, pw] - 0.5, hs[0, ph] - 0.5),
                we[0, pw] - ws[0, pw],
                he[0, ph] - hs[0, ph],
                facecolor=colors[q],
                alpha=0.35,
                edgecolor=colors[q],
                lw=1.5,
                zorder=2,
            )
        )
_, x1, y1, x2, y2 = box[0]
ax.add_patch(Rectangle((x1, y1), x2 - x1, y2 - y1, fill=False, ls="--", lw=1.2, color="k"))
ax.set_title("roi_pool: integer bins (overlapping rows/columns allowed)", fontsize=9)

# roi_align, aligned=True, adaptive grid
ax = axes[1]
fgeo, igeo = align_geometry("roi_align", box, (PH, PW), 1.0, -1, True)
sy, sx, bh, bw = fgeo[0, :4]
gh, gw = int(igeo[0, 1]), int(igeo[0, 2])
for ph in range(PH):
    for pw in range(PW):
        q = ph * PW + pw
        y0, x0 = sy + ph * bh, sx + pw * bw
        ax.add_patch(
            Rectangle((x0, y0), bw, bh, facecolor=colors[q], alpha=0.2, edgecolor=colors[q], lw=1.5)
        )
        ys = y0 + (np.arange(gh) + 0.5) * bh / gh
        xs = x0 + (np.arange(gw) + 0.5) * bw / gw
        X, Y = np.meshgrid(xs, ys)
        ax.plot(X.ravel(), Y.ravel(), "o", color=colors[q], ms=4, zorder=3)
ax.set_title(f"roi_align(aligned=True, sampling_ratio=-1): {gh} x {gw} samples per bin", fontsize=9)
fig.tight_layout()
