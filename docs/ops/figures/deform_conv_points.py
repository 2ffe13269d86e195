"""The sampling points of one output position of a 3x3 deformable convolution.

Hollow squares: the regular grid (y, x) = (oy*sh - ph + i*dh, ox*sw - pw + j*dw); dots: the
same points moved by the offsets (dy, dx) read from the offset channels 2k and 2k + 1 at
(oy, ox); the label is the kernel point k = i*kw + j. Offsets are drawn at random here; in a
network a convolution predicts them.
"""

import matplotlib.pyplot as plt
import numpy as np

H, W = 7, 8
kh = kw = 3
stride, padding, dilation = 1, 1, 2
oy, ox = 3, 3
rng = np.random.default_rng(3)
offset = rng.normal(0.0, 0.6, (2 * kh * kw,))  # channel 2k = dy, 2k + 1 = dx
offset[2 * 4 : 2 * 4 + 2] = (0.4, -0.3)

fig, ax = plt.subplots(figsize=(6.0, 5.2))
yy, xx = np.mgrid[0:H, 0:W]
ax.plot(xx.ravel(), yy.ravel(), "o", color="0.8", ms=4, zorder=0)
for k in range(kh * kw):
    i, j = divmod(k, kw)
    ry = oy * stride - padding + i * dilation
    rx = ox * stride - padding + j * dilation
    dy, dx = offset[2 * k], offset[2 * k + 1]
    ax.plot(rx, ry, "s", mfc="none", mec="tab:blue", ms=10, mew=1.5, zorder=2)
    ax.annotate(
        "",
        xy=(rx + dx, ry + dy),
        xytext=(rx, ry),
        arrowprops=dict(arrowstyle="->", color="0.3", lw=1.0),
        zorder=3,
    )
    ax.plot(rx + dx, ry + dy, "o", color="tab:red", ms=6, zorder=4)
    ax.text(rx - 0.28, ry - 0.22, str(k), color="tab:blue", fontsize=8)
ax.plot([], [], "s", mfc="none", mec="tab:blue", ms=9, label="regular grid, kernel point k")
ax.plot([], [], "o", color="tab:red", ms=6, label="sampling point (+ offset)")
ax.legend(loc="lower center", bbox_to_anchor=(0.5, 1.0), ncol=2, fontsize=8, frameon=False)
ax.set_xlim(-1, W)
ax.set_ylim(H, -1)
ax.set_aspect("equal")
ax.set_xlabel("x (input column)")
ax.set_ylabel("y (input row)")
ax.set_title(
    f"output (oy, ox) = ({oy}, {ox}); stride {stride}, padding {padding}, dilation {dilation}",
    fontsize=9,
    pad=22,
)
fig.tight_layout()
