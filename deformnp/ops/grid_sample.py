"""``grid_sample`` (SPEC section 5; anchor: ``torch.nn.functional.grid_sample``, mode="bilinear").

``grid_sample(input, grid, mode="bilinear", padding_mode="zeros", align_corners=False)`` samples
input (N, C, Hin, Win) at grid (N, Hout, Wout, 2), which holds normalized (x, y) in [-1, 1], and
returns (N, C, Hout, Wout). Arguments are torch's, in torch's order.

* Unnormalize: align_corners=True: x = (gx + 1) / 2 * (Win - 1) (-1 and 1 are the centres of the
  corner pixels); False: x = ((gx + 1) * Win - 1) / 2 (-1 and 1 are the outer edges of the corner
  pixels); likewise y with Hin. ``align_corners=None`` means False (torch's default, without
  torch's warning).
* ``padding_mode="zeros"``: the zero-fade rule of SPEC section 4 (the map is zero outside);
  ``"border"``: the coordinate is clipped to [0, Win - 1] (x) and [0, Hin - 1] (y) first, and
  its derivative is zero where it was clipped; ``"reflection"``: reflected about the map's
  border lines as torch does (about the pixel edges when align_corners=False, about the corner
  pixel centres when True), then clipped.
* ``mode`` must be "bilinear"; "nearest" and "bicubic" are not implemented (ValueError).

Gradients flow to ``input`` and ``grid``. The grid gradient is the exact derivative of the rule
as written: the right-hand slope at integer pixel coordinates, zero inside clipped bands.
Decisions where torch differs: torch zeroes the border-mode derivative at a coordinate exactly
0 (deformnp takes the right-hand slope, 1); NaN grid values sample zero in every mode (torch's
result for NaN depends on its code path); +-inf sample zero with "zeros" and "reflection" and the
border pixel with "border". The CPU backward is deterministic (bit-identical for any thread
count).

The array-level pair, for wrapping in other frameworks::

    out = grid_sample_forward(input, grid, mode="bilinear", padding_mode="zeros",
                              align_corners=False)
    grad_input, grad_grid = grid_sample_backward(grad_out, input, grid, mode="bilinear",
                                                 padding_mode="zeros", align_corners=False,
                                                 needs=(True, True))
"""

from __future__ import annotations

from types import ModuleType
from typing import Any

import numpy as np

from ..function import Context, Function
from ..registry import BenchCase, CheckCase, bench_device, register_op, torch_device
from ..tensor import Tensor
from ._common import check_ndim, device_of, float_array, kernel_module, same_dtype

__all__ = ["grid_sample", "grid_sample_forward", "grid_sample_backward"]

_OP = "grid_sample"
PADDING_MODES = ("zeros", "border", "reflection")


def _kernels(device: str) -> ModuleType:
    """The kernel module for ``device`` ("cpu" or "cuda")."""
    return kernel_module(_OP, "grid_sample", device)


def _options(mode: Any, padding_mode: Any, align_corners: Any) -> bool:
    if mode != "bilinear":
        raise ValueError(
            f"{_OP}: mode must be 'bilinear' (the only mode implemented), got {mode!r}; "
            f"note the argument order (input, grid, mode, padding_mode, align_corners)"
        )
    if padding_mode not in PADDING_MODES:
        raise ValueError(
            f"{_OP}: padding_mode must be 'zeros', 'border' or 'reflection', got {padding_mode!r}"
        )
    if align_corners is None:
        return False
    if not isinstance(align_corners, (bool, np.bool_)):
        raise TypeError(f"{_OP}: align_corners must be a bool, got {align_corners!r}")
    return bool(align_corners)


def _validate(input: Any, grid: Any) -> tuple[Any, Any, str]:
    device = device_of(_OP, input=input, grid=grid)
    inp = float_array(_OP, "input", input)
    grd = float_array(_OP, "grid", grid)
    same_dtype(_OP, input=inp, grid=grd)
    check_ndim(_OP, "input", inp, 4, "(N, C, Hin, Win)")
    check_ndim(_OP, "grid", grd, 4, "(N, Hout, Wout, 2)")
    if grd.shape[3] != 2:
        raise ValueError(
            f"{_OP}: grid must be (N, Hout, Wout, 2) holding normalized (x, y), got last "
            f"dimension {grd.shape[3]} (shape {tuple(grd.shape)})"
        )
    if grd.shape[0] != inp.shape[0]:
        raise ValueError(
            f"{_OP}: grid has batch size {grd.shape[0]}, expected input's batch size {inp.shape[0]}"
        )
    return inp, grd, device


def grid_sample_forward(
    input: Any,
    grid: Any,
    mode: str = "bilinear",
    padding_mode: str = "zeros",
    align_corners: bool | None = False,
) -> Any:
    """Array-level forward: input (N, C, Hin, Win), grid (N, Hout, Wout, 2) -> (N, C, Hout, Wout)."""
    align = _options(mode, padding_mode, align_corners)
    inp, grd, device = _validate(input, grid)
    if device == "cuda" and padding_mode == "reflection":
        raise ValueError(f"{_OP}: padding_mode='reflection' is implemented on the CPU only")
    return _kernels(device).grid_sample_forward(inp, grd, padding_mode, align)


def grid_sample_backward(
    grad_out: Any,
    input: Any,
    grid: Any,
    mode: str = "bilinear",
    padding_mode: str = "zeros",
    align_corners: bool | None = False,
    needs: tuple[bool, bool] = (True, True),
) -> tuple[Any, Any]:
    """Array-level backward: (grad_input, grad_grid) for grad_out (N, C, Hout, Wout).

    Entries of ``needs`` that are False give None.
    """
    align = _options(mode, padding_mode, align_corners)
    inp, grd, device = _validate(input, grid)
    if device == "cuda" and padding_mode == "reflection":
        raise ValueError(f"{_OP}: padding_mode='reflection' is implemented on the CPU only")
    g = float_array(_OP, "grad_out", grad_out)
    same_dtype(_OP, input=inp, grad_out=g)
    expected = (inp.shape[0], inp.shape[1], grd.shape[1], grd.shape[2])
    if tuple(g.shape) != expected:
        raise ValueError(f"{_OP}: grad_out must have shape {expected}, got {tuple(g.shape)}")
    return _kernels(device).grid_sample_backward(g, inp, grd, padding_mode, align, tuple(needs))


class GridSample(Function):
    """Autograd node of :func:`grid_sample` (arguments validated by the caller)."""

    supports_cuda = True  # forward/backward dispatch on the arrays' device

    @staticmethod
    def forward(
        ctx: Context, input: Any, grid: Any, padding_mode: str = "zeros", align: bool = False
    ) -> Any:
        input, grid, device = _validate(input, grid)  # contiguous; no copy when already so
        ctx.padding_mode = padding_mode
        ctx.align = align
        ctx.device = device
        ctx.save_for_backward(input, grid)
        return _kernels(device).grid_sample_forward(input, grid, padding_mode, align)

    @staticmethod
    def backward(ctx: Context, grad: Any) -> tuple[Any, Any]:
        input, grid = ctx.saved_tensors
        if ctx.device == "cpu":
            grad = np.ascontiguousarray(grad)
        return _kernels(ctx.device).grid_sample_backward(
            grad, input, grid, ctx.padding_mode, ctx.align, tuple(ctx.needs_input_grad[:2])
        )


def grid_sample(
    input: Any,
    grid: Any,
    mode: str = "bilinear",
    padding_mode: str = "zeros",
    align_corners: bool | None = False,
) -> Tensor:
    """Sample input (N, C, Hin, Win) at the normalized (x, y) of grid (N, Hout, Wout, 2).

    torch.nn.functional.grid_sample's semantics for mode="bilinear"; see the module docstring.
    Takes Tensors or arrays; gradients flow to ``input`` and ``grid``.
    """
    align = _options(mode, padding_mode, align_corners)
    _, _, device = _validate(input, grid)
    if device == "cuda" and padding_mode == "reflection":
        raise ValueError(f"{_OP}: padding_mode='reflection' is implemented on the CPU only")
    return GridSample.apply(input, grid, padding_mode=padding_mode, align=align)


# --------------------------------------------------------------------------- registry


def _check_grid(rng: np.random.Generator, N: int, H: int, W: int, Hin: int, Win: int) -> Any:
    """Grid values whose pixel coordinates (align_corners=False) have fractional parts in
    [0.1, 0.9] and integer parts in [-2, size]: off the kinks and the border lines."""
    x = rng.integers(-2, Win + 1, (N, H, W)) + rng.uniform(0.1, 0.9, (N, H, W))
    y = rng.integers(-2, Hin + 1, (N, H, W)) + rng.uniform(0.1, 0.9, (N, H, W))
    return np.stack([(2 * x + 1) / Win - 1, (2 * y + 1) / Hin - 1], axis=-1)


def _check_cases() -> list[CheckCase]:
    rng = np.random.default_rng(0)
    N, C, Hin, Win, H, W = 2, 2, 4, 5, 3, 3
    cases = []
    for padding_mode in ("zeros", "border"):
        inp = Tensor(rng.standard_normal((N, C, Hin, Win)), requires_grad=True)
        grd = Tensor(_check_grid(rng, N, H, W, Hin, Win), requires_grad=True)
        cases.append(
            CheckCase(
                lambda a, b, pm=padding_mode: grid_sample(a, b, "bilinear", pm, False),
                (inp, grd),
                (f"input ({padding_mode})", f"grid ({padding_mode})"),
            )
        )
    return cases


def _bench_case(device: str) -> BenchCase | None:
    """SPEC 13: input (4, 64, 32, 32), grid (4, 32, 32, 2), float32, zeros, align_corners=False."""
    rng = np.random.default_rng(0)
    N, C, Hin, Win, H, W = 4, 64, 32, 32, 32, 32
    x = rng.standard_normal((N, C, Hin, Win)).astype(np.float32)
    grd = rng.uniform(-1.1, 1.1, (N, H, W, 2)).astype(np.float32)
    go = rng.standard_normal((N, C, H, W)).astype(np.float32)
    host = (x, grd, go)
    placed = bench_device(device, *host)
    if placed is None:
        return None
    (x, grd, go), sync = placed

    def forward() -> Any:
        return grid_sample_forward(x, grd)

    def forward_backward() -> Any:
        grid_sample_forward(x, grd)
        return grid_sample_backward(go, x, grd)

    case = BenchCase(
        f"input ({N},{C},{Hin},{Win}), grid ({N},{H},{W},2)",
        forward,
        forward_backward,
        device=device,
        sync=sync,
    )
    tdev = torch_device(device)  # torch on the same device and thread count
    if tdev is None:
        return case
    try:
        import torch
        import torch.nn.functional as TF
    except ImportError:
        return case
    tx, tg, tgo = (torch.from_numpy(a).to(tdev) for a in host)
    tx.requires_grad_(True)
    tg.requires_grad_(True)

    def torch_forward() -> Any:
        with torch.no_grad():
            return TF.grid_sample(tx, tg, "bilinear", "zeros", align_corners=False)

    def torch_forward_backward() -> Any:
        out = TF.grid_sample(tx, tg, "bilinear", "zeros", align_corners=False)
        return torch.autograd.grad(out, (tx, tg), tgo)

    case.torch_forward = torch_forward
    case.torch_forward_backward = torch_forward_backward
    return case


register_op(_OP, check=_check_cases, bench=_bench_case)
