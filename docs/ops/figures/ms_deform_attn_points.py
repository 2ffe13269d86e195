"""Where one query of a freshly initialised MSDeformAttn samples, level by level.

Three levels of a feature pyramid (16x20, 8x10, 4x5 pixels), drawn in the normalized (x, y)
coordinates of the sampling locations: (0, 0) is the top-left corner of every level and (1, 1)
the bottom-right corner. Pixel (i, j) of level l covers [j/W_l, (j+1)/W_l] x [i/H_l, (i+1)/H_l];
its centre (dot) is the location (u, v) = ((j + 0.5)/W_l, (i + 0.5)/H_l), where
x = u*W_l - 0.5 = j and y = v*H_l - 0.5 = i. The query's reference point (+) is the same on
every level; its 4 heads x 3 points per level sit 1, 2, 3 pixels *of that level* away from it,
head m along (cos, sin)(2*pi*m/4): Deformable-DETR's initial sampling_offsets bias, divided by
(W_l, H_l). Marker area is the attention weight (uniform, 1/(L*P), at initialisation, so
here the query's weights are perturbed to show the softmax over the L*P points of a head).
Points outside the map (the black frame) fade to zero; on the coarsest level the outer points
of heads 1 and 3 lie there.
"""

import matplotlib.pyplot as plt
import numpy as np

from deformnp.nn import MSDeformAttn

levels = [(16, 20), (8, 10), (4, 5)]  # (H_l, W_l)
M, L, P = 4, len(levels), 3
layer = MSDeformAttn(d_model=16, n_levels=L, n_heads=M, n_points=P, dtype=np.float64)
rng = np.random.default_rng(0)
layer.attention_weights.bias.data[...] = 0.6 * rng.standard_normal(M * L * P)

query = rng.standard_normal((1, 1, 16))
reference = np.tile([0.42, 0.55], (1, 1, L, 1))  # (N, Lq, L, 2): normalized (x, y)
loc, weights = layer.sampling(query, reference, np.array(levels))
loc, weights = loc.numpy()[0, 0], weights.numpy()[0, 0]  # (M, L, P, 2), (M, L, P)

colors = plt.cm.tab10(np.arange(M))
fig, axes = plt.subplots(1, L, figsize=(11, 3.4), constrained_layout=True)
for lev, (ax, (H, W)) in enumerate(zip(axes, levels)):
    ax.vlines(np.arange(W + 1) / W, 0, 1, color="0.85", lw=0.6, zorder=0)  # pixel edges
    ax.hlines(np.arange(H + 1) / H, 0, 1, color="0.85", lw=0.6, zorder=0)
    cy, cx = np.meshgrid((np.arange(H) + 0.5) / H, (np.arange(W) + 0.5) / W, indexing="ij")
    ax.scatter(cx, cy, s=2, c="0.6", zorder=1)
    for m in range(M):
        ax.scatter(
            loc[m, lev, :, 0],
            loc[m, lev, :, 1],
            s=1500 * weights[m, lev],
            color=colors[m],
            alpha=0.8,
            edgecolors="k",
            linewidths=0.5,
            zorder=3,
            label=f"head {m}" if lev == 0 else None,
        )
    ax.scatter(
        *reference[0, 0, lev],
        marker="+",
        s=120,
        c="k",
        zorder=4,
        label="reference point" if lev == 0 else None,
    )
    ax.add_patch(plt.Rectangle((0, 0), 1, 1, fill=False, lw=1.2, ec="k", zorder=2))
    ax.set_xlim(-0.35, 1.35)
    ax.set_ylim(1.35, -0.35)  # y grows downwards, as image rows
    ax.set_aspect(H / W)  # square pixels
    ax.set_title(f"level {lev}: H={H}, W={W}")
    ax.set_xlabel("u (x, normalized)")
axes[0].set_ylabel("v (y, normalized)")
fig.legend(loc="outside right center", fontsize=8)
