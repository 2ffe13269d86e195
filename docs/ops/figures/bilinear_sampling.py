"""Where a bilinear sample reads, and how the two border rules behave near the border.

Left: a point p = (y, x) on a 4 x 5 map, its four neighbours and their weights. Right: a
map of ones sampled along a column (x = 2) with y running past both borders, computed with
deformnp.ops.bilinear_interpolate under the zero-fade and clamp rules.
"""

import matplotlib.pyplot as plt
import numpy as np

from deformnp import ops

H, W = 4, 5
y, x = 1.35, 2.7
y0, x0 = int(np.floor(y)), int(np.floor(x))
ly, lx = y - y0, x - x0
hy, hx = 1 - ly, 1 - lx

fig, (ax, bx) = plt.subplots(1, 2, figsize=(10, 4.0), gridspec_kw={"width_ratios": [1.1, 1]})

# ---- left: the four neighbours and their weights
yy, xx = np.mgrid[0:H, 0:W]
ax.plot(xx.ravel(), yy.ravel(), "o", color="0.75", ms=5, zorder=1)
ax.add_patch(plt.Rectangle((-1, -1), W + 1, H + 1, fill=False, ls=":", color="0.5"))
ax.text(
    W - 0.05,
    -0.92,
    "range of the zero-fade rule:\n$-1 \\leq y < H$, $-1 \\leq x < W$",
    ha="right",
    va="top",
    fontsize=7,
    color="0.35",
)
corners = [
    (y0, x0, hy * hx, r"$h_y h_x$"),
    (y0, x0 + 1, hy * lx, r"$h_y l_x$"),
    (y0 + 1, x0, ly * hx, r"$l_y h_x$"),
    (y0 + 1, x0 + 1, ly * lx, r"$l_y l_x$"),
]
for cy, cx, wgt, name in corners:
    ax.plot([x, cx], [y, cy], "-", color="tab:blue", lw=0.8 + 4 * wgt, alpha=0.5, zorder=2)
    ax.plot(cx, cy, "s", color="tab:blue", ms=7, zorder=3)
    dy = -0.25 if cy == y0 else 0.38
    dx, ha = (-0.1, "right") if cx == x0 else (0.1, "left")
    ax.text(cx + dx, cy + dy, f"{name} = {wgt:.3f}", ha=ha, fontsize=8, color="tab:blue")
ax.plot(x, y, "*", color="tab:red", ms=13, zorder=4)
ax.text(x + 0.15, y + 0.12, f"$p = ({y}, {x})$", color="tab:red", fontsize=9)
ax.set_xlim(-1.3, W + 0.2)
ax.set_ylim(H + 0.2, -1.3)
ax.set_aspect("equal")
ax.set_xlabel("x (column)")
ax.set_ylabel("y (row)")
ax.set_title(f"$y_0 = {y0}$, $x_0 = {x0}$, $l_y = {ly:.2f}$, $l_x = {lx:.2f}$", fontsize=9)

# ---- right: a map of ones sampled along x = 2, y from -2 to H + 1
ys = np.linspace(-2.0, H + 1.0, 1201)
pts = np.stack([ys, np.full_like(ys, 2.0)], -1)[None]
ones = np.ones((1, 1, H, W))
for border, color in (("zero", "tab:blue"), ("clamp", "tab:orange")):
    v = ops.bilinear_interpolate(ones, pts, border).numpy()[0, 0]
    bx.plot(ys, v, color=color, lw=2, label=f'border="{border}"')
for line in (-1, 0, H - 1, H):
    bx.axvline(line, color="0.8", lw=0.8, zorder=0)
bx.set_xticks([-1, 0, H - 1, H])
bx.set_xticklabels(["$-1$", "$0$", "$H-1$", "$H$"])
bx.set_ylim(-0.1, 1.25)
bx.set_xlabel("y (x = 2)")
bx.set_ylabel("sample of a map of ones")
bx.legend(loc="upper center", fontsize=8, ncol=2)
bx.set_title(f"H = {H}: zero-fade ramps to 0 over one pixel; clamp holds, then drops", fontsize=9)
fig.tight_layout()
