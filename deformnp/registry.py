"""Registry of ops for ``python -m deformnp check`` and ``bench``.

Each op family registers, at import of its module in ``deformnp.ops``, a *check* (build small
float64 inputs kept away from the bilinear kinks, return the function and the inputs for
gradcheck) and a *bench* (build the SPEC section 13 inputs, return callables to time forward and
forward+backward, and optionally torch equivalents). The CLI iterates over the registry, so a new
op family appears in ``check`` and ``bench`` without editing the CLI.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any


@dataclass
class CheckCase:
    """One gradient check: ``fn(*inputs)`` with names for the inputs that require grad."""

    fn: Callable[..., Any]
    inputs: tuple
    names: tuple[str, ...]


@dataclass
class BenchCase:
    """One timing: callables that run forward and forward+backward once.

    ``torch_forward`` / ``torch_backward`` (optional) do the same with torch/torchvision on the
    same data; they are built only when torch imports. ``device`` is "cpu" or "cuda".
    """

    size: str
    forward: Callable[[], Any]
    forward_backward: Callable[[], Any]
    torch_forward: Callable[[], Any] | None = None
    torch_forward_backward: Callable[[], Any] | None = None
    device: str = "cpu"
    sync: Callable[[], Any] | None = None


@dataclass
class OpEntry:
    name: str
    check: Callable[[], list[CheckCase]] | None = None
    bench: Callable[[str], BenchCase | None] | None = None
    extra: dict = field(default_factory=dict)


_REGISTRY: dict[str, OpEntry] = {}


def register_op(
    name: str,
    check: Callable[[], list[CheckCase]] | None = None,
    bench: Callable[[str], BenchCase | None] | None = None,
) -> None:
    """Register (or replace) an op's check and bench builders under ``name``."""
    _REGISTRY[name] = OpEntry(name, check, bench)


def registered_ops() -> dict[str, OpEntry]:
    """All registered ops, after importing every op family."""
    from . import functional as _f  # noqa: F401  (registers conv2d)
    from . import ops as _ops  # noqa: F401  (registers the deformable ops)

    return dict(_REGISTRY)


def bench_device(device: str, *arrays: Any) -> tuple[tuple, Callable[[], Any] | None] | None:
    """Place a bench builder's host arrays on ``device``: ``(arrays, sync)``, or None when the
    device cannot run benchmarks (no GPU; or Numba's CUDA simulator, far too slow for the SPEC 13
    sizes). ``sync`` waits for the device (None on the CPU)."""
    if device == "cpu":
        return arrays, None
    from . import cuda

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
