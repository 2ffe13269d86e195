"""Naive float64 reference of multi-scale deformable attention, straight from
docs/ops/ms_deform_attn.rst.

Plain Python loops over the naive zero-fade sampler of ``reference/bilinear.py`` (deliberately not
the kernels' shared plan), for tiny shapes only.
"""

from __future__ import annotations

import math

import numpy as np

from .bilinear import zero_fade  # noqa: E402  (the zero-fade reference rule, one copy)


def ms_deform_attn(
    value: np.ndarray,
    spatial_shapes: np.ndarray,
    level_start_index: np.ndarray,
    sampling_locations: np.ndarray,
    attention_weights: np.ndarray,
) -> np.ndarray:
    """out[n, q, m*D + d] = sum_{l,p} A * zero_fade(V_l[n,:,:,m,d], v*H_l - 0.5, u*W_l - 0.5)."""
    value = np.asarray(value, np.float64)
    loc = np.asarray(sampling_locations, np.float64)
    A = np.asarray(attention_weights, np.float64)
    N, S, M, D = value.shape
    _, Lq, _, L, P, _ = loc.shape
    out = np.zeros((N, Lq, M * D))
    for n in range(N):
        for q in range(Lq):
            for m in range(M):
                for l in range(L):
                    H, W = (int(s) for s in spatial_shapes[l])
                    start = int(level_start_index[l])
                    for p in range(P):
                        u, v = loc[n, q, m, l, p]
                        y = v * H - 0.5
                        x = u * W - 0.5
                        for d in range(D):
                            V = value[n, start : start + H * W, m, d].reshape(H, W)
                            out[n, q, m * D + d] += A[n, q, m, l, p] * zero_fade(V, y, x)
    return out


# ------------------------------------------------------------------------- DAT (docs/ops/dat.rst)


def grid_sample_aligned(img: np.ndarray, gx: float, gy: float) -> np.ndarray:
    """torch grid_sample (bilinear, zeros, align_corners=True) of img (C, H, W) at one (gx, gy)."""
    C, H, W = img.shape
    x = (gx + 1) / 2 * (W - 1)
    y = (gy + 1) / 2 * (H - 1)
    return np.array([zero_fade(img[c], y, x) for c in range(C)])


def _conv1x1(x: np.ndarray, w: np.ndarray, b: np.ndarray | None) -> np.ndarray:
    out = np.einsum("oc,bchw->bohw", w[:, :, 0, 0], x)
    return out if b is None else out + b[None, :, None, None]


def _depthwise(x: np.ndarray, w: np.ndarray, b: np.ndarray, stride: int) -> np.ndarray:
    Bn, C, H, W = x.shape
    k = w.shape[-1]
    pad = k // 2
    Ho = (H + 2 * pad - k) // stride + 1
    Wo = (W + 2 * pad - k) // stride + 1
    out = np.zeros((Bn, C, Ho, Wo))
    for n in range(Bn):
        for c in range(C):
            for oy in range(Ho):
                for ox in range(Wo):
                    s = b[c]
                    for i in range(k):
                        for j in range(k):
                            yy = oy * stride - pad + i
                            xx = ox * stride - pad + j
                            if 0 <= yy < H and 0 <= xx < W:
                                s += w[c, 0, i, j] * x[n, c, yy, xx]
                    out[n, c, oy, ox] = s
    return out


def dat_attention(
    x: np.ndarray,
    params: dict,
    n_heads: int,
    n_groups: int,
    stride: int,
    offset_range_factor: float,
    use_pe: bool,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """DAT's deformable attention (docs/ops/dat.rst) with loops; params by DAT's state-dict
    names."""
    x = np.asarray(x, np.float64)
    p = {k: np.asarray(v, np.float64) for k, v in params.items()}
    B, C, H, W = x.shape
    G = n_groups
    Cg = C // G
    dh = C // n_heads
    Mg = n_heads // G
    q = _conv1x1(x, p["proj_q.weight"], p["proj_q.bias"])
    off = _depthwise(
        q.reshape(B * G, Cg, H, W), p["conv_offset.0.weight"], p["conv_offset.0.bias"], stride
    )
    mu = off.mean(axis=1, keepdims=True)
    var = off.var(axis=1, keepdims=True)
    off = (off - mu) / np.sqrt(var + 1e-5)
    off = off * p["conv_offset.1.norm.weight"][None, :, None, None]
    off = off + p["conv_offset.1.norm.bias"][None, :, None, None]
    off = 0.5 * off * (1 + np.vectorize(math.erf)(off / math.sqrt(2)))
    off = _conv1x1(off, p["conv_offset.3.weight"], None)  # (B*G, 2, Hk, Wk): (dy, dx)
    Hk, Wk = off.shape[2:]
    s = offset_range_factor
    if s > 0:
        off = np.tanh(off) * np.array([1 / Hk, 1 / Wk]).reshape(1, 2, 1, 1) * s
    off = off.transpose(0, 2, 3, 1)
    ref = np.zeros((Hk, Wk, 2))
    for i in range(Hk):
        for j in range(Wk):
            ref[i, j] = ((i + 0.5) / Hk * 2 - 1, (j + 0.5) / Wk * 2 - 1)
    pos = off + ref if s >= 0 else np.tanh(off + ref)
    xs = np.zeros((B * G, Cg, Hk, Wk))
    xg = x.reshape(B * G, Cg, H, W)
    for b in range(B * G):
        for i in range(Hk):
            for j in range(Wk):
                xs[b, :, i, j] = grid_sample_aligned(xg[b], pos[b, i, j, 1], pos[b, i, j, 0])
    Ns = Hk * Wk
    xs = xs.reshape(B, C, 1, Ns)
    k = _conv1x1(xs, p["proj_k.weight"], p["proj_k.bias"]).reshape(B, n_heads, dh, Ns)
    v = _conv1x1(xs, p["proj_v.weight"], p["proj_v.bias"]).reshape(B, n_heads, dh, Ns)
    qh = q.reshape(B, n_heads, dh, H * W)
    out = np.zeros((B, n_heads, dh, H * W))
    for b in range(B):
        for h in range(n_heads):
            g = h // Mg  # the offset group of this head
            for m in range(H * W):
                qi, qj = divmod(m, W)
                qy, qx = (qi + 0.5) / H * 2 - 1, (qj + 0.5) / W * 2 - 1
                logits = np.zeros(Ns)
                for n in range(Ns):
                    logits[n] = qh[b, h, :, m] @ k[b, h, :, n] / math.sqrt(dh)
                    if use_pe:
                        py, px = pos[b * G + g].reshape(Ns, 2)[n]
                        table = p["rpe_table"][h][None]
                        logits[n] += grid_sample_aligned(table, (qx - px) * 0.5, (qy - py) * 0.5)[0]
                a = np.exp(logits - logits.max())
                a /= a.sum()
                out[b, h, :, m] = v[b, h] @ a
    y = _conv1x1(out.reshape(B, C, H, W), p["proj_out.weight"], p["proj_out.bias"])
    ref_b = np.broadcast_to(ref, (B, G, Hk, Wk, 2))
    return y, pos.reshape(B, G, Hk, Wk, 2), ref_b
