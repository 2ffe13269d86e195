"""The benchmark table: every op at its reference size and, for the ops whose
speed matters at scale, a large size (float32), with its torch / torchvision counterpart on the
same data when those are installed.

Large sizes: grid_sample (8, 64, 128, 128) with a 128x128 grid; roi_align and roi_pool on
(2, 256, 100, 152) with 1000 boxes (a detector's stride-8 map of an 800x1216 image);
ms_deform_attn at Deformable-DETR's encoder size (N=2, levels (100,152)..(13,19),
Lq = S = 20197); deform_conv2d and conv2d B=8, 128->128, 64x64.

Each gather op's case counts its *channel-samples* (one bilinear sample, or one pooled pixel,
of one channel) so that a timing reads as a rate.

``python -m deformnp bench`` and the suites in ``benches/`` time these very callables, so their
figures agree. A builder returns None where it cannot run (a CUDA case without a GPU, or under
Numba's CUDA simulator, far too slow for these sizes).
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import numpy as np

from .. import functional as F
from .. import ops
from ..function import no_grad
from ..tensor import Tensor
from .inputs import ENCODER_LEVELS, attention_inputs, boxes_in, reference_attention

__all__ = [
    "BenchCase",
    "bench_cases",
    "OPS",
    "SIZES",
    "bench_device",
    "torch_device",
    "thread_limit",
]

SIZES = ("reference", "large")


@dataclass
class BenchCase:
    """One timing: callables that run forward and forward+backward once.

    ``torch_forward`` / ``torch_forward_backward`` (optional) do the same with torch/torchvision
    on the same data; they are built only when torch imports. ``device`` is "cpu" or "cuda";
    ``sync`` waits for the device (None on the CPU). ``scale`` is "reference" or "large";
    ``samples`` the channel-samples one forward computes (0 for an op that does not gather).
    ``torch_dense_forward`` / ``torch_dense_forward_backward`` (deform_conv2d only) run torch's
    dense conv2d of the same shape: the floor a deformable convolution's GEMMs set.
    """

    size: str
    forward: Callable[[], Any]
    forward_backward: Callable[[], Any]
    torch_forward: Callable[[], Any] | None = None
    torch_forward_backward: Callable[[], Any] | None = None
    device: str = "cpu"
    sync: Callable[[], Any] | None = None
    op: str = ""
    scale: str = "reference"
    samples: int = 0
    torch_dense_forward: Callable[[], Any] | None = None
    torch_dense_forward_backward: Callable[[], Any] | None = None


def bench_device(device: str, *arrays: Any) -> tuple[tuple, Callable[[], Any] | None] | None:
    """Place a bench builder's host arrays on ``device``: ``(arrays, sync)``, or None when the
    device cannot run benchmarks (no GPU; or Numba's CUDA simulator, far too slow for the reference
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


@contextmanager
def thread_limit(n: int) -> Iterator[None]:
    """Run the enclosed timings on ``n`` threads everywhere: Numba's kernels, the BLAS library
    NumPy calls for the GEMMs (deform_conv2d, conv2d; through threadpoolctl, which finds
    OpenBLAS / MKL / BLIS) and torch when it is loaded. Each is restored afterwards."""
    import numba
    from threadpoolctl import threadpool_limits

    torch = sys.modules.get("torch")
    prev = numba.get_num_threads()
    prev_torch = torch.get_num_threads() if torch is not None else None
    with threadpool_limits(limits=n, user_api="blas"):
        numba.set_num_threads(n)
        if torch is not None:
            torch.set_num_threads(n)
        try:
            yield
        finally:
            numba.set_num_threads(prev)
            if torch is not None:
                torch.set_num_threads(prev_torch)


def _with_torch(
    case: BenchCase,
    fn: Callable[..., Any],
    inputs: tuple[np.ndarray, ...],
    wrt: tuple[int, ...],
    grad_out: np.ndarray,
    torchvision: bool = False,
) -> BenchCase:
    """Give ``case`` its torch counterpart: ``fn(*tensors)`` on torch tensors of the host arrays
    ``inputs`` (on the case's device, torch's thread count set to Numba's), timed without grad,
    and forward plus the gradients of the inputs at the positions ``wrt`` for ``grad_out``. The
    case is returned as it is when torch (or, with ``torchvision``, torchvision) is missing."""
    tdev = torch_device(case.device)
    if tdev is None:
        return case
    try:
        import torch

        if torchvision:
            import torchvision as _  # noqa: F401
    except ImportError:
        return case
    ts = [torch.from_numpy(np.ascontiguousarray(a)).to(tdev) for a in inputs]
    leaves = tuple(ts[i].requires_grad_(True) for i in wrt)
    tg = torch.from_numpy(grad_out).to(tdev)

    def torch_forward() -> Any:
        with torch.no_grad():
            return fn(*ts)

    def torch_forward_backward() -> Any:
        return torch.autograd.grad(fn(*ts), leaves, tg)

    case.torch_forward = torch_forward
    case.torch_forward_backward = torch_forward_backward
    return case


def _conv_shape(size: str) -> tuple[int, int, int]:
    """(B, C, H) of the deformable convolution (and its dense twin) at ``size``."""
    return (4, 64, 32) if size == "reference" else (8, 128, 64)


def _conv2d(device: str, size: str) -> BenchCase | None:
    """input (4, 64, 32, 32), weight (64, 64, 3, 3), padding 1, float32 (the dense convolution a
    deformable one of the reference size does the GEMMs of); large: (8, 128, 64, 64)."""
    if device != "cpu":
        return None
    B, C, H = _conv_shape(size)
    rng = np.random.default_rng(0)
    x_np = rng.standard_normal((B, C, H, H)).astype(np.float32)
    w_np = (rng.standard_normal((C, C, 3, 3)) * 0.05).astype(np.float32)
    b_np = rng.standard_normal(C).astype(np.float32)
    g_np = rng.standard_normal((B, C, H, H)).astype(np.float32)
    x, w, b = (Tensor(a, requires_grad=True) for a in (x_np, w_np, b_np))

    def forward() -> Any:
        with no_grad():
            return F.conv2d(x, w, b, padding=1)

    def forward_backward() -> Any:
        for t in (x, w, b):
            t.grad = None
        F.conv2d(x, w, b, padding=1).backward(g_np)

    case = BenchCase(
        f"input ({B}, {C}, {H}, {H}), weight ({C}, {C}, 3, 3), padding 1",
        forward,
        forward_backward,
    )

    def conv(tx: Any, tw: Any, tb: Any) -> Any:
        import torch

        return torch.nn.functional.conv2d(tx, tw, tb, padding=1)

    return _with_torch(case, conv, (x_np, w_np, b_np), (0, 1, 2), g_np)


def _bilinear_interpolate(device: str, size: str) -> BenchCase | None:
    """The reference grid_sample size as points: input (4, 64, 32, 32), 1024 points."""
    if size != "reference":
        return None
    rng = np.random.default_rng(0)
    N, C, H, W, P = 4, 64, 32, 32, 1024
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
    case.samples = N * C * P

    def torch_sample(tx: Any, tg: Any) -> Any:
        import torch.nn.functional as TF

        return TF.grid_sample(tx, tg, "bilinear", "zeros", align_corners=True)

    # zero-fade sampling at pixel (y, x) is grid_sample(zeros, align_corners=True) there
    grid = np.stack([pts[..., 1] / (W - 1) * 2 - 1, pts[..., 0] / (H - 1) * 2 - 1], axis=-1)
    return _with_torch(
        case, torch_sample, (x, grid[:, None].astype(np.float32)), (0, 1), g[:, :, None]
    )


def _grid_sample(device: str, size: str) -> BenchCase | None:
    """Reference size: input (4, 64, 32, 32), grid (4, 32, 32, 2), float32, zeros, align_corners=False;
    large: input (8, 64, 128, 128), grid (8, 128, 128, 2)."""
    rng = np.random.default_rng(0)
    N, C, Hin, Win, H, W = (
        (4, 64, 32, 32, 32, 32) if size == "reference" else (8, 64, 128, 128, 128, 128)
    )
    x = rng.standard_normal((N, C, Hin, Win)).astype(np.float32)
    grd = rng.uniform(-1.1, 1.1, (N, H, W, 2)).astype(np.float32)
    go = rng.standard_normal((N, C, H, W)).astype(np.float32)
    placed = bench_device(device, x, grd, go)
    if placed is None:
        return None
    (xd, grdd, god), sync = placed

    def forward() -> Any:
        return ops.grid_sample_forward(xd, grdd)

    def forward_backward() -> Any:
        ops.grid_sample_forward(xd, grdd)
        return ops.grid_sample_backward(god, xd, grdd)

    case = BenchCase(
        f"input ({N},{C},{Hin},{Win}), grid ({N},{H},{W},2)",
        forward,
        forward_backward,
        device=device,
        sync=sync,
        samples=N * C * H * W,
    )

    def torch_sample(tx: Any, tg: Any) -> Any:
        import torch.nn.functional as TF

        return TF.grid_sample(tx, tg, "bilinear", "zeros", align_corners=False)

    return _with_torch(case, torch_sample, (x, grd), (0, 1), go)


def _deform_conv2d(device: str, size: str) -> BenchCase | None:
    """Reference size: B=4, Cin=Cout=64, 32x32, 3x3, padding 1, one offset group, with mask, float32;
    large: B=8, 128->128, 64x64. Beside torchvision's op, torch's dense conv2d of the same shape
    (the floor: the same GEMMs without the gather)."""
    rng = np.random.default_rng(0)
    B, C, H = _conv_shape(size)
    W, k = H, 3
    x = rng.standard_normal((B, C, H, W)).astype(np.float32)
    off = rng.uniform(-2, 2, (B, 2 * k * k, H, W)).astype(np.float32)
    m = rng.uniform(0, 1, (B, k * k, H, W)).astype(np.float32)
    w = (rng.standard_normal((C, C, k, k)) * 0.05).astype(np.float32)
    bias = rng.standard_normal(C).astype(np.float32)
    go = rng.standard_normal((B, C, H, W)).astype(np.float32)
    placed = bench_device(device, x, off, m, w, bias, go)
    if placed is None:
        return None
    (xd, offd, md, wd, bd, god), sync = placed

    def forward() -> Any:
        return ops.deform_conv2d_forward(xd, offd, wd, bd, 1, 1, 1, md)

    def forward_backward() -> Any:
        ops.deform_conv2d_forward(xd, offd, wd, bd, 1, 1, 1, md)
        return ops.deform_conv2d_backward(god, xd, offd, wd, bd, 1, 1, 1, md)

    case = BenchCase(
        f"B={B}, {C}->{C}, {H}x{W}, {k}x{k}, pad 1, mask",
        forward,
        forward_backward,
        device=device,
        sync=sync,
        samples=B * C * k * k * H * W,
    )

    def tv_deform_conv2d(tx: Any, toff: Any, tm: Any, tw: Any, tb: Any) -> Any:
        import torchvision

        return torchvision.ops.deform_conv2d(tx, toff, tw, tb, padding=1, mask=tm)

    def dense_conv2d(tx: Any, tw: Any, tb: Any) -> Any:
        import torch

        return torch.nn.functional.conv2d(tx, tw, tb, padding=1)

    dense = _with_torch(
        BenchCase(case.size, forward, forward_backward, device=device),
        dense_conv2d, (x, w, bias), (0, 1, 2), go,
    )  # fmt: skip
    case.torch_dense_forward = dense.torch_forward
    case.torch_dense_forward_backward = dense.torch_forward_backward
    return _with_torch(
        case, tv_deform_conv2d, (x, off, m, w, bias), (0, 1, 2, 3, 4), go, torchvision=True
    )


def _roi_data(C: int = 256, size: str = "reference") -> tuple[np.ndarray, np.ndarray, float]:
    """Reference size: input (2, C, 50, 50), 512 boxes inside an 800x800 image, spatial_scale 1/16;
    large: input (2, C, 100, 152), 1000 boxes inside a 1600x2432 image."""
    rng = np.random.default_rng(0)
    s = 1.0 / 16.0
    H, W, K = (50, 50, 512) if size == "reference" else (100, 152, 1000)
    x = rng.standard_normal((2, C, H, W)).astype(np.float32)
    boxes = boxes_in(rng, K, 2, H, W, s).astype(np.float32)
    return x, boxes, s


def _pooled_pixels(mode: str, boxes: np.ndarray, x: np.ndarray, s: float) -> int:
    """Pixels the integer bins of roi_pool / ps_roi_pool (7x7) read, summed over the boxes."""
    from ..kernels.roi_geometry import pool_bins

    _, hs, he, ws, we = pool_bins(mode, boxes, (7, 7), s, x.shape[2], x.shape[3], x.dtype)
    return int(((he - hs)[:, :, None] * (we - ws)[:, None, :]).sum())


def _roi_label(x: np.ndarray, K: int, rest: str) -> str:
    return f"input ({','.join(map(str, x.shape))}), {K} boxes, {rest}"


def _shape_only(backward_op: Callable[..., Any]) -> Callable[..., Any]:
    """A RoI backward that takes the input's shape, called as ``backward(g, x, boxes, ...)``."""

    def backward(g: Any, x: Any, boxes: Any, *args: Any) -> Any:
        return backward_op(g, x.shape, boxes, *args)

    return backward


def _roi_case(
    device: str,
    size: str,
    x_host: np.ndarray,
    g_host: np.ndarray,
    forward_op: Callable[..., Any],
    backward_op: Callable[..., Any] | None,
    boxes: np.ndarray,
    args: tuple,
    torchvision_op: str | None,
    samples: int,
    scale: str,
    forward_backward_op: Callable[..., Any] | None = None,
) -> BenchCase | None:
    """A RoI op's case: ``forward_op(x, boxes, *args)`` and its backward, and the torchvision op
    of that name on the same data. ``forward_backward_op(g, x, boxes, *args)``, when given, is
    the whole forward+backward (roi_pool: one forward that keeps its argmax)."""
    placed = bench_device(device, x_host, g_host)
    if placed is None:
        return None
    (x, g), sync = placed

    def forward() -> Any:
        return forward_op(x, boxes, *args)

    def forward_backward() -> Any:
        if forward_backward_op is not None:
            return forward_backward_op(g, x, boxes, *args)
        forward_op(x, boxes, *args)
        return backward_op(g, x, boxes, *args)

    case = BenchCase(
        size, forward, forward_backward, device=device, sync=sync, samples=samples, scale=scale
    )
    if torchvision_op is None:
        return case

    def tv_op(tx: Any, tb: Any) -> Any:
        import torchvision.ops

        return getattr(torchvision.ops, torchvision_op)(tx, tb, *args)

    return _with_torch(case, tv_op, (x_host, boxes), (0,), g_host, torchvision=True)


def _roi_align(device: str, size: str) -> BenchCase | None:
    x, boxes, s = _roi_data(256, size)
    K = len(boxes)
    g = np.random.default_rng(1).standard_normal((K, 256, 7, 7)).astype(np.float32)
    return _roi_case(
        device, _roi_label(x, K, "7x7, sampling_ratio 2, aligned"), x, g,
        ops.roi_align_forward, _shape_only(ops.roi_align_backward), boxes, (7, s, 2, True),
        "roi_align", K * 256 * 49 * 4, size,
    )  # fmt: skip


def _roi_pool(device: str, size: str) -> BenchCase | None:
    x, boxes, s = _roi_data(256, size)
    K = len(boxes)
    g = np.random.default_rng(1).standard_normal((K, 256, 7, 7)).astype(np.float32)

    def forward_backward(g: Any, x: Any, boxes: Any, *args: Any) -> Any:
        # one forward keeping its argmax, then the backward, as the autograd node runs them (the
        # bench ran the forward twice here until 2026-11-30: once alone, once for the argmax)
        _, argmax = ops.roi_pool_forward(x, boxes, *args, return_argmax=True)
        return ops.roi_pool_backward(g, x.shape, boxes, *args, argmax=argmax)

    return _roi_case(
        device, _roi_label(x, K, "7x7"), x, g, ops.roi_pool_forward, None,
        boxes, (7, s), "roi_pool", 256 * _pooled_pixels("roi_pool", boxes, x, s), size,
        forward_backward,
    )  # fmt: skip


def _ps_roi_align(device: str, size: str) -> BenchCase | None:
    if size != "reference":
        return None
    x, boxes, s = _roi_data(8 * 49)
    g = np.random.default_rng(0).standard_normal((512, 8, 7, 7)).astype(np.float32)
    return _roi_case(
        device, "input (2,392,50,50), 512 boxes, 7x7, 8 output channels", x, g,
        ops.ps_roi_align_forward, _shape_only(ops.ps_roi_align_backward), boxes, (7, s, 2),
        "ps_roi_align", 512 * 8 * 49 * 4, size,
    )  # fmt: skip


def _ps_roi_pool(device: str, size: str) -> BenchCase | None:
    if size != "reference":
        return None
    x, boxes, s = _roi_data(8 * 49)
    g = np.random.default_rng(0).standard_normal((512, 8, 7, 7)).astype(np.float32)
    return _roi_case(
        device, "input (2,392,50,50), 512 boxes, 7x7, 8 output channels", x, g,
        ops.ps_roi_pool_forward, _shape_only(ops.ps_roi_pool_backward), boxes, (7, s), "ps_roi_pool",
        8 * _pooled_pixels("ps_roi_pool", boxes, x, s), size,
    )  # fmt: skip


def _deform_roi_pool(device: str, size: str) -> BenchCase | None:
    if size != "reference":
        return None
    x, boxes, s = _roi_data()
    rng = np.random.default_rng(2)
    off = rng.uniform(-1, 1, (512, 2, 7, 7)).astype(np.float32)
    g = rng.standard_normal((512, 256, 7, 7)).astype(np.float32)
    placed = bench_device(device, off)
    if placed is None:
        return None
    ((offd,), _) = placed
    return _roi_case(
        device, "roi_align's size, offsets in [-1, 1], gamma 0.1", x, g,
        lambda x, b, *a: ops.deform_roi_pool_forward(x, b, offd, *a),
        lambda g, x, b, *a: ops.deform_roi_pool_backward(g, x, b, offd, *a),
        boxes, (7, s, 2, 0.1), None, 512 * 256 * 49 * 4, size,
    )  # fmt: skip


def _deform_ps_roi_pool(device: str, size: str) -> BenchCase | None:
    if size != "reference":
        return None
    x, boxes, s = _roi_data(8 * 49)
    rng = np.random.default_rng(2)
    off = rng.standard_normal((512, 2, 7, 7)).astype(np.float32)
    g = rng.standard_normal((512, 8, 7, 7)).astype(np.float32)
    placed = bench_device(device, off)
    if placed is None:
        return None
    ((offd,), _) = placed
    return _roi_case(
        device, "R-FCN head: input (2,392,50,50), 512 boxes, 7x7, 4x4 samples", x, g,
        lambda x, b, *a: ops.deform_ps_roi_pool_forward(x, b, offd, *a),
        lambda g, x, b, *a: ops.deform_ps_roi_pool_backward(g, x, b, offd, *a),
        boxes, (s, 8, 7, 7, None, 4, 0.1), None, 512 * 8 * 49 * 16, size,
    )  # fmt: skip


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


def _ms_deform_attn(device: str, size: str) -> BenchCase | None:
    """Reference size: N=1, levels (32,32),(16,16),(8,8),(4,4), Lq=S=1360, M=8, D=32, P=4, float32,
    against Deformable-DETR's grid_sample formulation; large: Deformable-DETR's encoder, N=2,
    levels (100,152),(50,76),(25,38),(13,19), Lq=S=20197."""
    if size == "reference":
        data = reference_attention(np.float32)
        label = "N=1, L=4 (32..4), Lq=S=1360, M=8, D=32, P=4"
    else:
        data = attention_inputs(ENCODER_LEVELS, 2, np.float32)
        label = "encoder: N=2, L=4 (100x152..13x19), Lq=S=20197, M=8, D=32, P=4"
    names = ("value", "sampling_locations", "attention_weights", "grad_output")
    host = tuple(data[k] for k in names)
    placed = bench_device(device, *host)
    if placed is None:
        return None
    (value, loc, attn, grad), sync = placed
    shapes, starts = data["spatial_shapes"], data["level_start_index"]

    def forward() -> Any:
        return ops.ms_deform_attn_forward(value, shapes, starts, loc, attn)

    def forward_backward() -> Any:
        leaves = [Tensor(a, requires_grad=True) for a in (value, loc, attn)]
        ops.ms_deform_attn(leaves[0], shapes, starts, *leaves[1:]).backward(grad)
        return leaves[0].grad

    N, Lq, M, L, P, _ = loc.shape
    case = BenchCase(
        label,
        forward,
        forward_backward,
        device=device,
        sync=sync,
        samples=N * Lq * M * L * P * value.shape[3],
    )
    levels = [tuple(int(s) for s in row) for row in shapes]

    def core(v: Any, loc: Any, a: Any) -> Any:
        return torch_ms_deform_attn_core(v, levels, loc, a)

    return _with_torch(case, core, host[:3], (0, 1, 2), host[3])


def torch_dcnv3_core(
    input: Any,
    offset: Any,
    mask: Any,
    kernel_h: int,
    kernel_w: int,
    stride_h: int,
    stride_w: int,
    pad_h: int,
    pad_w: int,
    dilation_h: int,
    dilation_w: int,
    group: int,
    group_channels: int,
    offset_scale: float,
    remove_center: bool,
) -> Any:
    """InternImage's pure-PyTorch DCNv3 (``dcnv3_core_pytorch``), the fallback its users run on a
    CPU: the sampling locations built on the padded channels-last input, one ``grid_sample``
    (zeros, align_corners=False) for all points of all groups, then the mask-weighted sum. Torch
    tensors in and out (float32 coordinates, as the anchor builds them); for benchmarks."""
    import torch
    import torch.nn.functional as F

    # the anchor pads W by pad_h and H by pad_w ([0, 0, pad_h, pad_h, pad_w, pad_w]): equal here
    x = F.pad(input, [0, 0, pad_h, pad_h, pad_w, pad_w])
    N, H, W, _ = x.shape
    _, Ho, Wo, _ = offset.shape
    dev, f32 = x.device, torch.float32
    cy = (dilation_h * (kernel_h - 1)) // 2
    cx = (dilation_w * (kernel_w - 1)) // 2
    ry, rx = torch.meshgrid(
        torch.linspace(cy + 0.5, cy + 0.5 + (Ho - 1) * stride_h, Ho, dtype=f32, device=dev),
        torch.linspace(cx + 0.5, cx + 0.5 + (Wo - 1) * stride_w, Wo, dtype=f32, device=dev),
        indexing="ij",
    )
    ref = torch.stack((rx.reshape(-1) / W, ry.reshape(-1) / H), -1).reshape(1, Ho, Wo, 1, 2)
    # kernel points in x-major order, as the anchor's meshgrid(x, y) lists them
    gx, gy = torch.meshgrid(
        torch.linspace(-cx, -cx + (kernel_w - 1) * dilation_w, kernel_w, dtype=f32, device=dev),
        torch.linspace(-cy, -cy + (kernel_h - 1) * dilation_h, kernel_h, dtype=f32, device=dev),
        indexing="ij",
    )
    grid = torch.stack((gx / W, gy / H), -1).reshape(-1, 1, 2).repeat(1, group, 1)
    grid = grid.permute(1, 0, 2).reshape(1, 1, 1, group * kernel_h * kernel_w, 2)
    loc = (ref + grid * offset_scale).repeat(N, 1, 1, 1, 1)
    if remove_center:
        c = (kernel_h * kernel_w - 1) // 2
        keep = [i for i in range(loc.shape[-2]) if i != c and (i - c) % (2 * c + 1) != 0]
        loc = loc[:, :, :, keep, :]
    P = kernel_h * kernel_w - int(remove_center)
    norm = torch.tensor([W, H], device=dev).reshape(1, 1, 1, 2).repeat(1, 1, 1, group * P)
    loc = loc.flatten(3, 4) + offset * offset_scale / norm
    grids = (2 * loc - 1).view(N, Ho * Wo, group, P, 2).transpose(1, 2).flatten(0, 1)
    x_ = x.view(N, H * W, group * group_channels).transpose(1, 2)
    x_ = x_.reshape(N * group, group_channels, H, W)
    sampled = F.grid_sample(x_, grids, mode="bilinear", padding_mode="zeros", align_corners=False)
    m = mask.view(N, Ho * Wo, group, P).transpose(1, 2).reshape(N * group, 1, Ho * Wo, P)
    out = (sampled * m).sum(-1).view(N, group * group_channels, Ho * Wo)
    return out.transpose(1, 2).reshape(N, Ho, Wo, -1).contiguous()


def _dcnv3(device: str, size: str) -> BenchCase | None:
    """InternImage-T's first stage: 56x56, 64 channels in 4 groups of 16, 3x3, padding 1,
    channels last, float32 (reference: N=1; large: N=8), against InternImage's grid_sample
    formulation ``dcnv3_core_pytorch``, the fallback its users run on a CPU."""
    N = 1 if size == "reference" else 8
    H = W = 56
    G, D, k = 4, 16, 3
    P = k * k
    rng = np.random.default_rng(0)
    host = (
        rng.standard_normal((N, H, W, G * D)).astype(np.float32),
        rng.uniform(-2.0, 2.0, (N, H, W, G * P * 2)).astype(np.float32),
        rng.uniform(0.0, 1.0, (N, H, W, G * P)).astype(np.float32),
        rng.standard_normal((N, H, W, G * D)).astype(np.float32),
    )
    placed = bench_device(device, *host)
    if placed is None:
        return None
    (x, offset, mask, grad), sync = placed
    geo = (k, k, 1, 1, 1, 1, 1, 1, G, D, 1.0, False)

    def forward() -> Any:
        return ops.dcnv3_forward(x, offset, mask, *geo)

    def forward_backward() -> Any:
        leaves = [Tensor(a, requires_grad=True) for a in (x, offset, mask)]
        ops.dcnv3(*leaves, *geo).backward(grad)
        return leaves[0].grad

    label = f"N={N}, 56x56, 64 ch in 4 groups, 3x3, pad 1 (InternImage-T stage 1)"
    case = BenchCase(
        label, forward, forward_backward, device=device, sync=sync, samples=N * H * W * G * P * D
    )

    def core(x: Any, offset: Any, mask: Any) -> Any:
        return torch_dcnv3_core(x, offset, mask, *geo)

    return _with_torch(case, core, host[:3], (0, 1, 2), host[3])


_BUILDERS: dict[str, Callable[[str, str], BenchCase | None]] = {
    "bilinear_interpolate": _bilinear_interpolate,
    "grid_sample": _grid_sample,
    "deform_conv2d": _deform_conv2d,
    "roi_align": _roi_align,
    "roi_pool": _roi_pool,
    "ps_roi_align": _ps_roi_align,
    "ps_roi_pool": _ps_roi_pool,
    "deform_roi_pool": _deform_roi_pool,
    "deform_ps_roi_pool": _deform_ps_roi_pool,
    "ms_deform_attn": _ms_deform_attn,
    "conv2d": _conv2d,
    "dcnv3": _dcnv3,
}

OPS = tuple(_BUILDERS)


def bench_cases(
    op: str | None = None, device: str = "cpu", sizes: tuple[str, ...] = ("reference",)
) -> list[BenchCase]:
    """The bench cases (of one op, or of all) at ``sizes`` ("reference", "large") that can run on
    ``device``."""
    if op is not None and op not in _BUILDERS:
        raise ValueError(f"unknown op {op!r}; the ops with bench cases are {', '.join(OPS)}")
    unknown = [s for s in sizes if s not in SIZES]
    if unknown:
        raise ValueError(f"unknown bench size(s) {unknown}; the sizes are {', '.join(SIZES)}")
    cases = []
    for name, build in _BUILDERS.items():
        if op is None or name == op:
            for size in sizes:
                case = build(device, size)
                if case is not None:
                    case.op = name
                    case.scale = size
                    cases.append(case)
    return cases
