"""The benchmark table: every op at the SPEC section 13 reference sizes (float32), with its
torch / torchvision counterpart on the same data when those are installed.

``python -m deformnp bench`` and the suites in ``benches/`` time these very callables, so their
figures agree. A builder returns None where it cannot run (a CUDA case without a GPU, or under
Numba's CUDA simulator, far too slow for these sizes).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from .. import functional as F
from .. import ops
from ..function import no_grad
from ..tensor import Tensor
from .inputs import boxes_in, spec13_attention

__all__ = ["BenchCase", "bench_cases", "OPS", "bench_device", "torch_device"]


@dataclass
class BenchCase:
    """One timing: callables that run forward and forward+backward once.

    ``torch_forward`` / ``torch_forward_backward`` (optional) do the same with torch/torchvision
    on the same data; they are built only when torch imports. ``device`` is "cpu" or "cuda";
    ``sync`` waits for the device (None on the CPU).
    """

    size: str
    forward: Callable[[], Any]
    forward_backward: Callable[[], Any]
    torch_forward: Callable[[], Any] | None = None
    torch_forward_backward: Callable[[], Any] | None = None
    device: str = "cpu"
    sync: Callable[[], Any] | None = None
    op: str = ""


def bench_device(device: str, *arrays: Any) -> tuple[tuple, Callable[[], Any] | None] | None:
    """Place a bench builder's host arrays on ``device``: ``(arrays, sync)``, or None when the
    device cannot run benchmarks (no GPU; or Numba's CUDA simulator, far too slow for the SPEC 13
    sizes). ``sync`` waits for the device (None on the CPU)."""
    if device == "cpu":
        return arrays, None
    from .. import cuda

    if device != "cuda" or not cuda.is_available():
        return None
    from numba import config
    from numba import cuda as ncuda

    if getattr(config, "ENABLE_CUDASIM", False):
        return None
    return tuple(ncuda.to_device(a) for a in arrays), ncuda.synchronize


def torch_device(device: str) -> str | None:
    """The torch device for a bench's torch counterpart on ``device`` ("cpu" or "cuda"), with torch's
    thread count set to Numba's; None when torch (or, for "cuda", torch's CUDA) is unavailable."""
    try:
        import numba
        import torch
    except ImportError:
        return None
    torch.set_num_threads(numba.get_num_threads())
    if device == "cuda":
        return "cuda" if torch.cuda.is_available() else None
    return "cpu"


def _conv2d(device: str) -> BenchCase | None:
    """SPEC-style size: input (4, 64, 32, 32), weight (64, 64, 3, 3), padding 1, float32."""
    if device != "cpu":
        return None
    rng = np.random.default_rng(0)
    x_np = rng.standard_normal((4, 64, 32, 32)).astype(np.float32)
    w_np = (rng.standard_normal((64, 64, 3, 3)) * 0.05).astype(np.float32)
    b_np = rng.standard_normal(64).astype(np.float32)
    g_np = rng.standard_normal((4, 64, 32, 32)).astype(np.float32)
    x, w, b = (Tensor(a, requires_grad=True) for a in (x_np, w_np, b_np))

    def forward() -> Any:
        with no_grad():
            return F.conv2d(x, w, b, padding=1)

    def forward_backward() -> Any:
        for t in (x, w, b):
            t.grad = None
        F.conv2d(x, w, b, padding=1).backward(g_np)

    case = BenchCase(
        "input (4, 64, 32, 32), weight (64, 64, 3, 3), padding 1", forward, forward_backward
    )
    try:
        import numba
        import torch
    except ImportError:
        return case
    torch.set_num_threads(numba.get_num_threads())
    tx, tw, tb = (torch.from_numpy(a.copy()).requires_grad_() for a in (x_np, w_np, b_np))
    tg = torch.from_numpy(g_np)

    def torch_forward() -> Any:
        with torch.no_grad():
            return torch.nn.functional.conv2d(tx, tw, tb, padding=1)

    def torch_forward_backward() -> Any:
        for t in (tx, tw, tb):
            t.grad = None
        torch.nn.functional.conv2d(tx, tw, tb, padding=1).backward(tg)

    case.torch_forward = torch_forward
    case.torch_forward_backward = torch_forward_backward
    return case


def _bilinear_interpolate(device: str) -> BenchCase | None:
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
        return ops.bilinear_interpolate_forward(xd, ptsd)

    def forward_backward() -> Any:
        ops.bilinear_interpolate_forward(xd, ptsd)
        return ops.bilinear_interpolate_backward(gd, xd, ptsd)

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


def _grid_sample(device: str) -> BenchCase | None:
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
        return ops.grid_sample_forward(x, grd)

    def forward_backward() -> Any:
        ops.grid_sample_forward(x, grd)
        return ops.grid_sample_backward(go, x, grd)

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


def _deform_conv2d(device: str) -> BenchCase | None:
    """SPEC 13: B=4, Cin=Cout=64, 32x32, 3x3, padding 1, one offset group, with mask, float32."""
    rng = np.random.default_rng(0)
    B, C, H, W, k = 4, 64, 32, 32, 3
    x = rng.standard_normal((B, C, H, W)).astype(np.float32)
    off = rng.uniform(-2, 2, (B, 2 * k * k, H, W)).astype(np.float32)
    m = rng.uniform(0, 1, (B, k * k, H, W)).astype(np.float32)
    w = (rng.standard_normal((C, C, k, k)) * 0.05).astype(np.float32)
    bias = rng.standard_normal(C).astype(np.float32)
    go = rng.standard_normal((B, C, H, W)).astype(np.float32)
    host = (x, off, m, w, bias, go)
    placed = bench_device(device, *host)
    if placed is None:
        return None
    (x, off, m, w, bias, go), sync = placed

    def forward() -> Any:
        return ops.deform_conv2d_forward(x, off, w, bias, 1, 1, 1, m)

    def forward_backward() -> Any:
        ops.deform_conv2d_forward(x, off, w, bias, 1, 1, 1, m)
        return ops.deform_conv2d_backward(go, x, off, w, bias, 1, 1, 1, m)

    case = BenchCase(
        f"B={B}, {C}->{C}, {H}x{W}, {k}x{k}, pad 1, mask",
        forward,
        forward_backward,
        device=device,
        sync=sync,
    )
    tdev = torch_device(device)  # torchvision on the same device and thread count
    if tdev is None:
        return case
    try:
        import torch
        import torchvision
    except ImportError:
        return case
    tx, toff, tm_, tw, tb, tgo = (torch.from_numpy(a).to(tdev) for a in host)
    for t in (tx, toff, tm_, tw, tb):
        t.requires_grad_(True)

    def torch_forward() -> Any:
        with torch.no_grad():
            return torchvision.ops.deform_conv2d(tx, toff, tw, tb, padding=1, mask=tm_)

    def torch_forward_backward() -> Any:
        out = torchvision.ops.deform_conv2d(tx, toff, tw, tb, padding=1, mask=tm_)
        return torch.autograd.grad(out, (tx, toff, tw, tb, tm_), tgo)

    case.torch_forward = torch_forward
    case.torch_forward_backward = torch_forward_backward
    return case


def _roi_data(dtype: Any = np.float32) -> tuple[np.ndarray, np.ndarray, float]:
    """SPEC 13: input (2, 256, 50, 50), 512 boxes inside an 800x800 image, spatial_scale 1/16."""
    rng = np.random.default_rng(0)
    s = 1.0 / 16.0
    x = rng.standard_normal((2, 256, 50, 50)).astype(dtype)
    boxes = boxes_in(rng, 512, 2, 50, 50, s).astype(dtype)
    return x, boxes, s


def _torch_setup() -> Any:
    try:
        import numba
        import torch
        import torchvision  # noqa: F401
    except ImportError:
        return None
    torch.set_num_threads(numba.get_num_threads())
    return torch


def _roi_align(device: str) -> BenchCase | None:
    x_host, boxes, s = _roi_data()
    g_host = np.random.default_rng(1).standard_normal((512, 256, 7, 7)).astype(np.float32)
    placed = bench_device(device, x_host, g_host)
    if placed is None:
        return None
    (x, g), sync = placed
    args = (7, s, 2, True)

    def forward() -> Any:
        return ops.roi_align_forward(x, boxes, *args)

    def forward_backward() -> Any:
        ops.roi_align_forward(x, boxes, *args)
        return ops.roi_align_backward(g, x, boxes, *args)

    case = BenchCase(
        "input (2,256,50,50), 512 boxes, 7x7, sampling_ratio 2, aligned",
        forward,
        forward_backward,
        device=device,
        sync=sync,
    )
    tdev = torch_device(device)  # torchvision on the same device and thread count
    torch = _torch_setup() if tdev else None
    if torch is None:
        return case
    from torchvision.ops import roi_align as tv_roi_align

    tx = torch.from_numpy(x_host).to(tdev).requires_grad_(True)
    tb = torch.from_numpy(boxes).to(tdev)
    tg = torch.from_numpy(g_host).to(tdev)

    def torch_forward() -> Any:
        with torch.no_grad():
            return tv_roi_align(tx, tb, *args)

    def torch_forward_backward() -> Any:
        return torch.autograd.grad(tv_roi_align(tx, tb, *args), (tx,), tg)

    case.torch_forward = torch_forward
    case.torch_forward_backward = torch_forward_backward
    return case


def _roi_pool(device: str) -> BenchCase | None:
    x_host, boxes, s = _roi_data()
    g_host = np.random.default_rng(1).standard_normal((512, 256, 7, 7)).astype(np.float32)
    placed = bench_device(device, x_host, g_host)
    if placed is None:
        return None
    (x, g), sync = placed

    def forward() -> Any:
        return ops.roi_pool_forward(x, boxes, 7, s)

    def forward_backward() -> Any:
        out, argmax = ops.roi_pool_forward(x, boxes, 7, s, return_argmax=True)
        return ops.roi_pool_backward(g, x, boxes, 7, s, argmax=argmax)

    case = BenchCase(
        "input (2,256,50,50), 512 boxes, 7x7", forward, forward_backward, device=device, sync=sync
    )
    tdev = torch_device(device)  # torchvision on the same device and thread count
    torch = _torch_setup() if tdev else None
    if torch is None:
        return case
    from torchvision.ops import roi_pool as tv_roi_pool

    tx = torch.from_numpy(x_host).to(tdev).requires_grad_(True)
    tb = torch.from_numpy(boxes).to(tdev)
    tg = torch.from_numpy(g_host).to(tdev)

    def torch_forward() -> Any:
        with torch.no_grad():
            return tv_roi_pool(tx, tb, 7, s)

    def torch_forward_backward() -> Any:
        return torch.autograd.grad(tv_roi_pool(tx, tb, 7, s), (tx,), tg)

    case.torch_forward = torch_forward
    case.torch_forward_backward = torch_forward_backward
    return case


def _bench_ps(op: str) -> Any:
    def build(device: str) -> BenchCase | None:
        rng = np.random.default_rng(0)
        s = 1.0 / 16.0
        x_host = rng.standard_normal((2, 8 * 49, 50, 50)).astype(np.float32)
        boxes = boxes_in(rng, 512, 2, 50, 50, s).astype(np.float32)
        g_host = rng.standard_normal((512, 8, 7, 7)).astype(np.float32)
        placed = bench_device(device, x_host, g_host)
        if placed is None:
            return None
        (x, g), sync = placed
        if op == "ps_roi_align":
            fwd, bwd, extra = ops.ps_roi_align_forward, ops.ps_roi_align_backward, (2,)
        else:
            fwd, bwd, extra = ops.ps_roi_pool_forward, ops.ps_roi_pool_backward, ()

        def forward() -> Any:
            return fwd(x, boxes, 7, s, *extra)

        def forward_backward() -> Any:
            fwd(x, boxes, 7, s, *extra)
            return bwd(g, x, boxes, 7, s, *extra)

        case = BenchCase(
            "input (2,392,50,50), 512 boxes, 7x7, 8 output channels",
            forward,
            forward_backward,
            device=device,
            sync=sync,
        )
        tdev = torch_device(device)  # torchvision on the same device and thread count
        torch = _torch_setup() if tdev else None
        if torch is None:
            return case
        import torchvision.ops as tvo

        tv = getattr(tvo, op)
        tx = torch.from_numpy(x_host).to(tdev).requires_grad_(True)
        tb = torch.from_numpy(boxes).to(tdev)
        tg = torch.from_numpy(g_host).to(tdev)

        def torch_forward() -> Any:
            with torch.no_grad():
                return tv(tx, tb, 7, s, *extra)

        def torch_forward_backward() -> Any:
            return torch.autograd.grad(tv(tx, tb, 7, s, *extra), (tx,), tg)

        case.torch_forward = torch_forward
        case.torch_forward_backward = torch_forward_backward
        return case

    return build


def _deform_roi_pool(device: str) -> BenchCase | None:
    x, boxes, s = _roi_data()
    rng = np.random.default_rng(2)
    off = rng.uniform(-1, 1, (512, 2, 7, 7)).astype(np.float32)
    g = rng.standard_normal((512, 256, 7, 7)).astype(np.float32)
    placed = bench_device(device, x, off, g)
    if placed is None:
        return None
    (x, off, g), sync = placed

    def forward() -> Any:
        return ops.deform_roi_pool_forward(x, boxes, off, 7, s, 2, 0.1)

    def forward_backward() -> Any:
        ops.deform_roi_pool_forward(x, boxes, off, 7, s, 2, 0.1)
        return ops.deform_roi_pool_backward(g, x, boxes, off, 7, s, 2, 0.1)

    return BenchCase(
        "roi_align's size, offsets in [-1, 1], gamma 0.1",
        forward,
        forward_backward,
        device=device,
        sync=sync,
    )


def _deform_ps_roi_pool(device: str) -> BenchCase | None:
    rng = np.random.default_rng(0)
    s = 1.0 / 16.0
    D, gs, P = 8, 7, 7
    x = rng.standard_normal((2, D * gs * gs, 50, 50)).astype(np.float32)
    boxes = boxes_in(rng, 512, 2, 50, 50, s).astype(np.float32)
    off = rng.standard_normal((512, 2, P, P)).astype(np.float32)
    g = rng.standard_normal((512, D, P, P)).astype(np.float32)
    args = (s, D, gs, P, None, 4, 0.1)
    placed = bench_device(device, x, off, g)
    if placed is None:
        return None
    (x, off, g), sync = placed

    def forward() -> Any:
        return ops.deform_ps_roi_pool_forward(x, boxes, off, *args)

    def forward_backward() -> Any:
        ops.deform_ps_roi_pool_forward(x, boxes, off, *args)
        return ops.deform_ps_roi_pool_backward(g, x, boxes, off, *args)

    return BenchCase(
        "R-FCN head: input (2,392,50,50), 512 boxes, 7x7, 4x4 samples",
        forward,
        forward_backward,
        device=device,
        sync=sync,
    )


def torch_ms_deform_attn_core(
    value: Any, spatial_shapes: Any, sampling_locations: Any, attention_weights: Any
) -> Any:
    """Deformable-DETR's pure-PyTorch formulation (``ms_deform_attn_core_pytorch``): one
    ``grid_sample`` per level, then the weighted sum. Torch tensors in and out; for benchmarks."""
    import torch
    import torch.nn.functional as F

    N, S, M, D = value.shape
    _, Lq, _, L, P, _ = sampling_locations.shape
    sizes = [int(h) * int(w) for h, w in spatial_shapes]
    value_list = value.split(sizes, dim=1)
    grids = 2 * sampling_locations - 1
    sampled = []
    for lid, (h, w) in enumerate(spatial_shapes):
        value_l = value_list[lid].flatten(2).transpose(1, 2).reshape(N * M, D, int(h), int(w))
        grid_l = grids[:, :, :, lid].transpose(1, 2).flatten(0, 1)  # (N*M, Lq, P, 2)
        sampled.append(
            F.grid_sample(
                value_l, grid_l, mode="bilinear", padding_mode="zeros", align_corners=False
            )
        )
    weights = attention_weights.transpose(1, 2).reshape(N * M, 1, Lq, L * P)
    out = (torch.stack(sampled, dim=-2).flatten(-2) * weights).sum(-1).view(N, M * D, Lq)
    return out.transpose(1, 2).contiguous()


def _ms_deform_attn(device: str) -> BenchCase | None:
    data = spec13_attention(np.float32)
    names = ("value", "sampling_locations", "attention_weights", "grad_output")
    placed = bench_device(device, *(data[k] for k in names))
    if placed is None:
        return None
    host = {k: data[k] for k in names}
    data.update(zip(names, placed[0]))
    sync = placed[1]
    shapes, starts, grad = data["spatial_shapes"], data["level_start_index"], data["grad_output"]

    def forward() -> Any:
        return ops.ms_deform_attn_forward(
            data["value"], shapes, starts, data["sampling_locations"], data["attention_weights"]
        )

    def forward_backward() -> Any:
        value = Tensor(data["value"], requires_grad=True)
        loc = Tensor(data["sampling_locations"], requires_grad=True)
        attn = Tensor(data["attention_weights"], requires_grad=True)
        ops.ms_deform_attn(value, shapes, starts, loc, attn).backward(grad)
        return value.grad

    case = BenchCase(
        "N=1, L=4 (32..4), Lq=S=1360, M=8, D=32, P=4",
        forward,
        forward_backward,
        device=device,
        sync=sync,
    )
    tdev = torch_device(device)  # torch on the same device and thread count
    if tdev is None:
        return case
    import torch

    tv, tl, ta, tg = (torch.from_numpy(host[k]).to(tdev) for k in names)
    tshapes = [tuple(int(s) for s in row) for row in shapes]

    def torch_forward() -> Any:
        with torch.no_grad():
            return torch_ms_deform_attn_core(tv, tshapes, tl, ta)

    def torch_forward_backward() -> Any:
        v = tv.clone().requires_grad_(True)
        loc = tl.clone().requires_grad_(True)
        a = ta.clone().requires_grad_(True)
        torch_ms_deform_attn_core(v, tshapes, loc, a).backward(tg)
        return v.grad

    case.torch_forward = torch_forward
    case.torch_forward_backward = torch_forward_backward
    return case


_BUILDERS: dict[str, Callable[[str], BenchCase | None]] = {
    "bilinear_interpolate": _bilinear_interpolate,
    "grid_sample": _grid_sample,
    "deform_conv2d": _deform_conv2d,
    "roi_align": _roi_align,
    "roi_pool": _roi_pool,
    "ps_roi_align": _bench_ps("ps_roi_align"),
    "ps_roi_pool": _bench_ps("ps_roi_pool"),
    "deform_roi_pool": _deform_roi_pool,
    "deform_ps_roi_pool": _deform_ps_roi_pool,
    "ms_deform_attn": _ms_deform_attn,
    "conv2d": _conv2d,
}

OPS = tuple(_BUILDERS)


def bench_cases(op: str | None = None, device: str = "cpu") -> list[BenchCase]:
    """The bench cases (of one op, or of all) that can run on ``device``."""
    if op is not None and op not in _BUILDERS:
        raise ValueError(f"unknown op {op!r}; the ops with bench cases are {', '.join(OPS)}")
    cases = []
    for name, build in _BUILDERS.items():
        if op is None or name == op:
            case = build(device)
            if case is not None:
                case.op = name
                cases.append(case)
    return cases
