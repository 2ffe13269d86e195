"""CUDA kernels of ``bilinear_interpolate`` (SPEC section 4), mirroring ``kernels/cpu/bilinear.py``.

input (N, C, H, W), points (N, P, 2) as (y, x), output (N, C, P), under either border rule (the
device functions of ``sampling.py``). The input gradient is scattered with atomic adds and is
therefore not bit-reproducible from run to run; the points gradient has one writer per point
(deterministic).
"""

from __future__ import annotations

from typing import Any

from numba import cuda

from ._launch import SIMULATOR, empty, flat, grid, zeros
from .sampling import CLAMP, ZERO_FADE, plan_of, plan_value, scatter_plan

BORDERS = {"zero": ZERO_FADE, "clamp": CLAMP}


@cuda.jit(cache=not SIMULATOR)
def _bilinear_forward(inp, pts, out, N, C, H, W, P, rule):
    total = N * C * P
    for i in range(cuda.grid(1), total, cuda.gridsize(1)):
        p = i % P
        c = (i // P) % C
        n = i // (P * C)
        y = pts[(n * P + p) * 2]
        x = pts[(n * P + p) * 2 + 1]
        idx, w, cy, cx = plan_of(rule, y, x, H, W)
        out[i] = plan_value(inp, (n * C + c) * H * W, idx, w)


@cuda.jit(cache=not SIMULATOR)
def _bilinear_backward_input(gout, pts, gin, N, C, H, W, P, rule):
    total = N * C * P
    for i in range(cuda.grid(1), total, cuda.gridsize(1)):
        p = i % P
        c = (i // P) % C
        n = i // (P * C)
        idx, w, cy, cx = plan_of(rule, pts[(n * P + p) * 2], pts[(n * P + p) * 2 + 1], H, W)
        scatter_plan(gin, (n * C + c) * H * W, idx, w, gout[i])


@cuda.jit(cache=not SIMULATOR)
def _bilinear_backward_points(gout, inp, pts, gpts, N, C, H, W, P, rule):
    total = N * P
    for i in range(cuda.grid(1), total, cuda.gridsize(1)):
        p = i % P
        n = i // P
        idx, w, cy, cx = plan_of(rule, pts[i * 2], pts[i * 2 + 1], H, W)
        gy = 0.0
        gx = 0.0
        for c in range(C):
            base = (n * C + c) * H * W
            g = gout[(n * C + c) * P + p]
            gy += g * plan_value(inp, base, idx, cy)
            gx += g * plan_value(inp, base, idx, cx)
        gpts[i * 2] = gy
        gpts[i * 2 + 1] = gx


def bilinear_interpolate_forward(input: Any, points: Any, border: str) -> Any:
    N, C, H, W = (int(s) for s in input.shape)
    P = int(points.shape[1])
    if H * W == 0:
        return zeros((N, C, P), input.dtype)
    out = empty((N, C, P), input.dtype)
    if out.size:
        _bilinear_forward[grid(out.size)](
            flat(input), flat(points), flat(out), N, C, H, W, P, BORDERS[border]
        )
    return out


def bilinear_interpolate_backward(
    grad_out: Any, input: Any, points: Any, border: str, needs: tuple[bool, bool]
) -> tuple[Any, Any]:
    N, C, H, W = (int(s) for s in input.shape)
    P = int(points.shape[1])
    rule = BORDERS[border]
    g_in = g_pts = None
    if needs[0]:
        g_in = zeros(input.shape, input.dtype)
        if grad_out.size and H * W:
            _bilinear_backward_input[grid(grad_out.size)](
                flat(grad_out), flat(points), flat(g_in), N, C, H, W, P, rule
            )
    if needs[1]:
        g_pts = zeros(points.shape, points.dtype)
        if N * P and H * W:
            _bilinear_backward_points[grid(N * P)](
                flat(grad_out), flat(input), flat(points), flat(g_pts), N, C, H, W, P, rule
            )
    return g_in, g_pts
