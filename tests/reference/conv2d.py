"""Naive 2-D convolution (torch's cross-correlation) as plain loops, float64."""

from __future__ import annotations

import numpy as np


def conv2d_ref(x, w, b=None, stride=(1, 1), padding=(0, 0, 0, 0), dilation=(1, 1), groups=1):
    """out[n, co, oy, ox] = b[co] + sum_{c in group(co), i, j}
    w[co, c - g*Cg, i, j] * x[n, c, oy*sh - pt + i*dh, ox*sw - pl + j*dw] (zero outside)."""
    n, c, h, wd = x.shape
    o, cg, kh, kw = w.shape
    sh, sw = stride
    pt, pb, pl, pr = padding
    dh, dw = dilation
    ho = (h + pt + pb - dh * (kh - 1) - 1) // sh + 1
    wo = (wd + pl + pr - dw * (kw - 1) - 1) // sw + 1
    og = o // groups
    out = np.zeros((n, o, ho, wo))
    for b_ in range(n):
        for co in range(o):
            g = co // og
            for oy in range(ho):
                for ox in range(wo):
                    acc = 0.0 if b is None else float(b[co])
                    for cl in range(cg):
                        ci = g * cg + cl
                        for i in range(kh):
                            y = oy * sh - pt + i * dh
                            if not 0 <= y < h:
                                continue
                            for j in range(kw):
                                xx = ox * sw - pl + j * dw
                                if 0 <= xx < wd:
                                    acc += float(w[co, cl, i, j]) * float(x[b_, ci, y, xx])
                    out[b_, co, oy, ox] = acc
    return out
