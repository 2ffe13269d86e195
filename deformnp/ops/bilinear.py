"""Bilinear sampling of a feature map at real points, under either border rule (SPEC section 4).

``bilinear_interpolate(input, points, border="zero")`` samples every channel of input (N, C, H,
W) at points (N, P, 2), given as (y, x) pixel coordinates (pixel (i, j) sits at y = i, x = j),
and returns (N, C, P):

* ``border="zero"`` (zero-fade; deformable convolution, grid_sample with zeros padding,
  deformable attention): the paper's kernel G(q, p) = g(qy, py) g(qx, px), g(a, b) = max(0,
  1 - |a - b|), with the map taken as zero outside; a point is out of range (value 0) unless
  -1 < y < H and -1 < x < W;
* ``border="clamp"`` (RoI Align and friends; torchvision's ``roi_align`` rule): out of range
  when y < -1 or y > H (likewise x); otherwise y = max(y, 0) and, when floor(y) >= H - 1, the
  row is pinned to H - 1.

NaN and infinite coordinates sample 0. Gradients flow to ``input`` and to ``points``; the point
gradient is the exact derivative of the rule as written: the right-hand slope at integer
coordinates (the floor convention) and zero inside a clamped band. The arithmetic is the one
shared plan of ``deformnp/kernels/cpu/bilinear.py`` (the same code every sampling kernel uses),
in float64; the output keeps the input dtype.

Decision: ``points`` must have the input's dtype, like every other pair of float inputs.

The array-level pair, for wrapping in other frameworks::

    out = bilinear_interpolate_forward(input, points, border="zero")
    grad_input, grad_points = bilinear_interpolate_backward(
        grad_out, input, points, border="zero", needs=(True, True))

``needs`` selects which gradients to compute; the others are returned as None.
"""

from __future__ import annotations

from types import ModuleType
from typing import Any

import numpy as np

from ..function import Context, Function
from ..registry import BenchCase, CheckCase, bench_device, register_op, torch_device
from ..tensor import Tensor
from ._common import check_ndim, device_of, float_array, kernel_module, same_dtype

__all__ = [
    "bilinear_interpolate",
    "bilinear_interpolate_forward",
    "bilinear_interpolate_backward",
]

_OP = "bilinear_interpolate"
BORDERS = ("zero", "clamp")


def _kernels(device: str) -> ModuleType:
    """The kernel module for ``device`` ("cpu" or "cuda")."""
    return kernel_module(_OP, "bilinear", device)


def _validate(input: Any, points: Any, border: Any) -> tuple[Any, Any, str]:
    if border not in BORDERS:
        raise ValueError(f"{_OP}: border must be 'zero' or 'clamp', got {border!r}")
    device = device_of(_OP, input=input, points=points)
    inp = float_array(_OP, "input", input)
    pts = float_array(_OP, "points", points)
    same_dtype(_OP, input=inp, points=pts)
    check_ndim(_OP, "input", inp, 4, "(N, C, H, W)")
    check_ndim(_OP, "points", pts, 3, "(N, P, 2)")
    if pts.shape[2] != 2:
        raise ValueError(
            f"{_OP}: points must be (N, P, 2) holding (y, x), got last dimension "
            f"{pts.shape[2]} (shape {tuple(pts.shape)})"
        )
    if pts.shape[0] != inp.shape[0]:
        raise ValueError(
            f"{_OP}: points has batch size {pts.shape[0]}, expected input's batch size "
            f"{inp.shape[0]}"
        )
    return inp, pts, device


def bilinear_interpolate_forward(input: Any, points: Any, border: str = "zero") -> Any:
    """Array-level forward: input (N, C, H, W), points (N, P, 2) as (y, x) -> (N, C, P)."""
    inp, pts, device = _validate(input, points, border)
    return _kernels(device).bilinear_interpolate_forward(inp, pts, border)


def bilinear_interpolate_backward(
    grad_out: Any,
    input: Any,
    points: Any,
    border: str = "zero",
    needs: tuple[bool, bool] = (True, True),
) -> tuple[Any, Any]:
    """Array-level backward: (grad_input, grad_points) for grad_out (N, C, P).

    Entries of ``needs`` that are False give None. The input gradient is scattered
    deterministically on the CPU (each input plane has one writer, points in order).
    """
    inp, pts, device = _validate(input, points, border)
    g = float_array(_OP, "grad_out", grad_out)
    same_dtype(_OP, input=inp, grad_out=g)
    expected = (inp.shape[0], inp.shape[1], pts.shape[1])
    if tuple(g.shape) != expected:
        raise ValueError(f"{_OP}: grad_out must have shape {expected}, got {tuple(g.shape)}")
    return _kernels(device).bilinear_interpolate_backward(g, inp, pts, border, tuple(needs))


class BilinearInterpolate(Function):
    """Autograd node of :func:`bilinear_interpolate` (inputs validated by the caller)."""

    supports_cuda = True  # forward/backward dispatch on the arrays' device

    @staticmethod
    def forward(ctx: Context, input: Any, points: Any, border: str = "zero") -> Any:
        input, points, device = _validate(input, points, border)  # contiguous, no copy if so
        ctx.border = border
        ctx.device = device
        ctx.save_for_backward(input, points)
        return _kernels(device).bilinear_interpolate_forward(input, points, border)

    @staticmethod
    def backward(ctx: Context, grad: Any) -> tuple[Any, Any]:
        input, points = ctx.saved_tensors
        if ctx.device == "cpu":
            grad = np.ascontiguousarray(grad)
        return _kernels(ctx.device).bilinear_interpolate_backward(
            grad, input, points, ctx.border, tuple(ctx.needs_input_grad[:2])
        )


def bilinear_interpolate(input: Any, points: Any, border: str = "zero") -> Tensor:
    """Sample input (N, C, H, W) at points (N, P, 2) = (y, x) under ``border``; (N, C, P).

    See the module docstring for the two rules. Takes Tensors or arrays; gradients flow to
    ``input`` and ``points`` when they require grad.
    """
    _validate(input, points, border)
    return BilinearInterpolate.apply(input, points, border=border)


# --------------------------------------------------------------------------- registry


def _check_cases() -> list[CheckCase]:
    rng = np.random.default_rng(0)
    N, C, H, W, P = 2, 2, 4, 5, 6
    inp = Tensor(rng.standard_normal((N, C, H, W)), requires_grad=True)
    # integer part in range, fractional part in [0.1, 0.9]: off the kinks and the border lines
    pts = np.empty((N, P, 2))
    pts[..., 0] = rng.integers(-1, H, (N, P)) + rng.uniform(0.1, 0.9, (N, P))
    pts[..., 1] = rng.integers(-1, W, (N, P)) + rng.uniform(0.1, 0.9, (N, P))
    cases = []
    for border in BORDERS:
        p = Tensor(pts.copy(), requires_grad=True)
        cases.append(
            CheckCase(
                lambda a, b, border=border: bilinear_interpolate(a, b, border),
                (Tensor(inp.data.copy(), requires_grad=True), p),
                (f"input ({border})", f"points ({border})"),
            )
        )
    return cases


def _bench_case(device: str) -> BenchCase | None:
    rng = np.random.default_rng(0)
    N, C, H, W, P = 4, 64, 32, 32, 1024  # the grid_sample size of SPEC 13, as points
    x = rng.standard_normal((N, C, H, W)).astype(np.float32)
    pts = np.stack(
        [rng.uniform(-1.5, H + 0.5, (N, P)), rng.uniform(-1.5, W + 0.5, (N, P))], axis=-1
    ).astype(np.float32)
    g = rng.standard_normal((N, C, P)).astype(np.float32)
    placed = bench_device(device, x, pts, g)
    if placed is None:
        return None
    (xd, ptsd, gd), sync = placed

    def forward() -> Any:
        return bilinear_interpolate_forward(xd, ptsd)

    def forward_backward() -> Any:
        bilinear_interpolate_forward(xd, ptsd)
        return bilinear_interpolate_backward(gd, xd, ptsd)

    case = BenchCase(
        f"input ({N},{C},{H},{W}), {P} points", forward, forward_backward, device=device, sync=sync
    )
    tdev = torch_device(device)  # torch on the same device and thread count
    if tdev is None:
        return case
    try:
        import torch
        import torch.nn.functional as TF
    except ImportError:
        return case
    # zero-fade sampling at pixel (y, x) is grid_sample(zeros, align_corners=True) there
    grid = np.stack([pts[..., 1] / (W - 1) * 2 - 1, pts[..., 0] / (H - 1) * 2 - 1], axis=-1)
    tx = torch.from_numpy(x).to(tdev).requires_grad_(True)
    tg = torch.from_numpy(grid[:, None].astype(np.float32)).to(tdev).requires_grad_(True)
    tgo = torch.from_numpy(g[:, :, None]).to(tdev)

    def torch_forward() -> Any:
        with torch.no_grad():
            return TF.grid_sample(tx, tg, "bilinear", "zeros", align_corners=True)

    def torch_forward_backward() -> Any:
        out = TF.grid_sample(tx, tg, "bilinear", "zeros", align_corners=True)
        return torch.autograd.grad(out, (tx, tg), tgo)

    case.torch_forward = torch_forward
    case.torch_forward_backward = torch_forward_backward
    return case


register_op(_OP, check=_check_cases, bench=_bench_case)
