"""DAT's reference grid and the positions its offset network moves the points to.

A DeformableAttention2d layer (8 channels, 2 heads, one offset group, stride 2,
offset_range_factor s = 2) on a 16 x 16 input, with random weights: the offset network sees
q = proj_q(x) at stride 2 and gives an 8 x 8 grid of offsets. Everything is drawn in the
normalized coordinates the layer uses, x and y in [-1, 1]. Grey dots: the input's pixel
centres as grid_sample with align_corners=True places them (pixel j at x = -1 + 2j/(W-1)).
Open circles: the reference points, the centres of the 8 x 8 cells ((j + 0.5)/Wk*2 - 1).
Red dots: the sampling positions pos = reference + s*tanh(offset)/(Hk, Wk); each stays inside
the dashed box of half-sides s/Hk, s/Wk around its reference point (drawn for one point).
"""

import matplotlib.pyplot as plt
import numpy as np

from deformnp.nn import DeformableAttention2d

H = W = 16
rng = np.random.default_rng(3)
layer = DeformableAttention2d(
    8,
    2,
    n_groups=1,
    stride=2,
    offset_range_factor=2.0,
    kernel_size=5,
    q_size=(H, W),
    dtype=np.float64,
)
for p in layer.parameters():  # random weights, so that the offsets are not small
    p.data = p.data + 0.5 * rng.standard_normal(p.shape)
layer.conv_offset[3].weight.data[...] = 0.4 * rng.standard_normal((2, 8, 1, 1))

yy, xx = np.meshgrid(np.linspace(-1, 1, H), np.linspace(-1, 1, W), indexing="ij")
image = np.exp(-((xx - 0.3) ** 2 + (yy + 0.2) ** 2) / 0.3)  # one smooth blob
x = image[None, None] * rng.uniform(0.5, 1.5, (1, 8, 1, 1)) + 0.1 * rng.standard_normal(
    (1, 8, H, W)
)
y, pos, ref = layer(x)
pos, ref = pos.numpy()[0, 0], ref.numpy()[0, 0]  # (Hk, Wk, 2) as normalized (y, x)
Hk, Wk = ref.shape[:2]
s = layer.offset_range_factor

fig, ax = plt.subplots(figsize=(5.6, 5.6), constrained_layout=True)
half = 1.0 / (W - 1)  # half a pixel in normalized units (align_corners=True)
ax.imshow(x[0, 0], cmap="gray", extent=(-1 - half, 1 + half, 1 + half, -1 - half), alpha=0.6)
ax.scatter(xx, yy, s=3, c="0.45", label="input pixel centres (align_corners=True)")
for i in range(Hk):
    for j in range(Wk):
        ax.plot([ref[i, j, 1], pos[i, j, 1]], [ref[i, j, 0], pos[i, j, 0]], c="tab:red", lw=0.8)
ax.scatter(
    ref[..., 1],
    ref[..., 0],
    s=30,
    facecolors="none",
    edgecolors="tab:blue",
    label=f"reference points ({Hk} x {Wk} cell centres)",
)
ax.scatter(pos[..., 1], pos[..., 0], s=14, c="tab:red", label="sampling positions pos")
i, j = 2, 5
ax.add_patch(
    plt.Rectangle(
        (ref[i, j, 1] - s / Wk, ref[i, j, 0] - s / Hk),
        2 * s / Wk,
        2 * s / Hk,
        fill=False,
        ls="--",
        ec="tab:blue",
        lw=1.2,
        label="reachable: |offset| < s/Hk, s/Wk",
    )
)
ax.set_xlim(-1.15, 1.15)
ax.set_ylim(1.15, -1.15)  # y grows downwards, as image rows
ax.set_aspect("equal")
ax.set_xlabel("x (normalized)")
ax.set_ylabel("y (normalized)")
ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.1), fontsize=8, ncol=2)
