"""DCNv4's packed channels and where one output pixel of one group samples.

Top: the last axis of ``offset_mask`` for the default layer (group G = 4, 3x3 kernel, K = 9
points per group): per group a block of 3K channels, first the K offset pairs (dx, dy)
interleaved, then the K modulation values; the layer's Linear pads the total 3*G*K = 108 to the
next multiple of 8, 112, and the op never reads the 4 extra channels. Middle: the last axis of
FlashDeformAttn's ``sampling_loc_attn`` for one head (L = 2 levels, K = 3 points): the L*K
normalized locations (x, y), level-major, then the L*K logits that the op softmaxes. Bottom: one
output pixel, one group: the regular grid (squares, labelled with the point k = j*kh + i,
column by column) moved by offset_scale * (dx, dy); the modulation values are used as given
(no softmax), so they can be negative (hollow markers) and need not sum to 1.
"""

import matplotlib.pyplot as plt
import numpy as np
from matplotlib.patches import Rectangle

fig = plt.figure(figsize=(9.0, 7.8))
ax1 = fig.add_axes([0.06, 0.80, 0.90, 0.13])
ax2 = fig.add_axes([0.06, 0.60, 0.90, 0.12])
ax3 = fig.add_axes([0.25, 0.07, 0.50, 0.45])

G, K = 4, 9
total = int(np.ceil(3 * G * K / 8) * 8)
for g in range(G):
    b = g * 3 * K
    ax1.add_patch(Rectangle((b, 0), 2 * K, 1, fc="tab:blue", ec="w", alpha=0.35 + 0.15 * (g % 2)))
    ax1.add_patch(
        Rectangle((b + 2 * K, 0), K, 1, fc="tab:orange", ec="w", alpha=0.45 + 0.2 * (g % 2))
    )
    ax1.text(b + K, 0.5, f"group {g}: (dx, dy) x {K}", ha="center", va="center", fontsize=7)
    ax1.text(b + 2.5 * K, 0.5, f"mask x {K}", ha="center", va="center", fontsize=7)
ax1.add_patch(Rectangle((3 * G * K, 0), total - 3 * G * K, 1, fc="0.8", ec="w", hatch="///"))
ax1.text(3 * G * K + 2, 1.12, f"unused,\nto {total}", ha="center", fontsize=6.5)
ax1.set_xlim(0, total)
ax1.set_ylim(0, 1.5)
ax1.set_yticks([])
ax1.set_xticks([0, 27, 54, 81, 108])
ax1.set_title(
    f"dcnv4 offset_mask[b, ho, wo, :]: G = {G}, K = {K}, 3GK = {3 * G * K} padded to {total}",
    fontsize=9,
)

L, Kf = 2, 3
for li in range(L):
    for k in range(Kf):
        c = 2 * (li * Kf + k)
        ax2.add_patch(Rectangle((c, 0), 2, 1, fc="tab:green", ec="w", alpha=0.4 + 0.25 * li))
        ax2.text(c + 1, 0.5, f"(x,y)\nl{li} k{k}", ha="center", va="center", fontsize=6.5)
        z = 2 * L * Kf + li * Kf + k
        ax2.add_patch(Rectangle((z, 0), 1, 1, fc="tab:purple", ec="w", alpha=0.4 + 0.25 * li))
        ax2.text(z + 0.5, 0.5, f"z\nl{li}\nk{k}", ha="center", va="center", fontsize=6)
ax2.set_xlim(0, 3 * L * Kf)
ax2.set_ylim(0, 1)
ax2.set_yticks([])
ax2.set_xticks([0, 2 * L * Kf, 3 * L * Kf])
ax2.set_title(
    f"flash_deform_attn sampling_loc_attn[n, q, g, :]: L = {L}, K = {Kf}; "
    "softmax over the L*K logits",
    fontsize=9,
)

rng = np.random.default_rng(2)
H = W = 7
oy = ox = 3
kh = kw = 3
scale = 1.0
off = rng.normal(0.0, 0.5, (K, 2))
mask = rng.normal(0.4, 0.5, K)
yy, xx = np.mgrid[0:H, 0:W]
ax3.plot(xx.ravel(), yy.ravel(), "o", color="0.85", ms=3, zorder=0)
for k in range(K):
    i, j = k % kh, k // kh  # k = j*kh + i: column by column
    ry, rx = oy - 1 + i, ox - 1 + j  # stride 1, pad 1, dilation 1
    sx, sy = rx + scale * off[k, 0], ry + scale * off[k, 1]
    ax3.plot(rx, ry, "s", mfc="none", mec="tab:blue", ms=11, mew=1.4, zorder=2)
    ax3.text(rx - 0.4, ry - 0.22, str(k), color="tab:blue", fontsize=8)
    ax3.annotate(
        "", xy=(sx, sy), xytext=(rx, ry), arrowprops=dict(arrowstyle="-", color="0.4", lw=0.7)
    )
    size = 260 * abs(mask[k])
    if mask[k] >= 0:
        ax3.scatter(sx, sy, s=size, color="tab:orange", zorder=4)
    else:
        ax3.scatter(sx, sy, s=size, facecolor="none", edgecolor="tab:orange", lw=1.5, zorder=4)
ax3.plot(ox, oy, "+", color="k", ms=14, mew=1.5, zorder=5)
ax3.scatter([], [], s=60, color="tab:orange", label="mask > 0")
ax3.scatter([], [], s=60, facecolor="none", edgecolor="tab:orange", lw=1.5, label="mask < 0")
ax3.legend(loc="lower left", fontsize=7)
ax3.set_xlim(-0.5, W - 0.5)
ax3.set_ylim(H - 0.5, -0.5)
ax3.set_aspect("equal")
ax3.set_xlabel("x (input column)")
ax3.set_ylabel("y (input row)")
ax3.set_title("one output pixel (+), one group; marker area |mask|", fontsize=9)
