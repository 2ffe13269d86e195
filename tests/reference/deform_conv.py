"""Naive float64 reference for deform_conv2d (docs/ops/deform_conv.rst), straight from the formula.

out[b, co, oy, ox] = bias[co] + sum over the channels c of co's weight group and kernel points
k = i*kw + j of weight[co, c_local, i, j] * m * zero_fade(input[b, c], y, x), with
y = oy*sh - ph + i*dh + dy, x = ox*sw - pw + j*dw + dx, (dy, dx, m) of c's offset group.
"""

from __future__ import annotations

import math

import numpy as np

from .bilinear import zero_fade


def _pair(v):
    return (v, v) if isinstance(v, int) else tuple(v)


def deform_conv2d(input, offset, weight, bias=None, stride=1, padding=0, dilation=1, mask=None):
    input = np.asarray(input, np.float64)
    offset = np.asarray(offset, np.float64)
    weight = np.asarray(weight, np.float64)
    sh, sw = _pair(stride)
    ph, pw = _pair(padding)
    dh, dw = _pair(dilation)
    B, Cin, H, W = input.shape
    Cout, cin_g, kh, kw = weight.shape
    K = kh * kw
    g = Cin // cin_g
    cout_g = Cout // g
    Hout = (H + 2 * ph - (dh * (kh - 1) + 1)) // sh + 1
    Wout = (W + 2 * pw - (dw * (kw - 1) + 1)) // sw + 1
    G = offset.shape[1] // (2 * K)
    cpg = Cin // G
    out = np.zeros((B, Cout, Hout, Wout))
    for b in range(B):
        for co in range(Cout):
            grp = co // cout_g
            for oy in range(Hout):
                for ox in range(Wout):
                    acc = 0.0 if bias is None else float(bias[co])
                    for cl in range(cin_g):
                        c = grp * cin_g + cl
                        og = c // cpg
                        for i in range(kh):
                            for j in range(kw):
                                k = i * kw + j
                                dy = offset[b, 2 * K * og + 2 * k, oy, ox]
                                dx = offset[b, 2 * K * og + 2 * k + 1, oy, ox]
                                m = 1.0 if mask is None else float(mask[b, K * og + k, oy, ox])
                                y = oy * sh - ph + i * dh + dy
                                x = ox * sw - pw + j * dw + dx
                                if not (math.isfinite(y) and math.isfinite(x)):
                                    s = 0.0
                                else:
                                    s = zero_fade(input[b, c], y, x)
                                acc += weight[co, cl, i, j] * m * s
                    out[b, co, oy, ox] = acc
    return out
