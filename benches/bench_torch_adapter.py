"""A PyTorch training step through ``deformnp.torch`` against the same step with torchvision.

The step is a DCNv2 layer as mmcv's ``ModulatedDeformConv2dPack``: an ``nn.Conv2d``
(``conv_offset``, 3x3, padding 1) predicts 2*9 offset and 9 mask channels from the input, then a
modulated 3x3 deformable convolution (padding 1, bias) consumes them; the loss is the sum of
the output times a fixed random tensor, and ``loss.backward()`` and an SGD step follow
(gradients for the input, both convolutions' weights and biases, through the offsets and the
sigmoid mask). Two implementations of the deformable convolution, all else equal:

* **deformnp**: ``deformnp.torch.ModulatedDeformConv2dPack`` (deformnp's Numba CPU kernels);
* **torchvision**: the same module with ``torchvision.ops.deform_conv2d`` (its C++ CPU kernels),
  loaded with deformnp's layer's state dict, so both compute the same function.

Sizes: B=4, 64->64, 32x32 (the reference size of ``bench_deform_conv.py``) and B=8, 128->128,
64x64; float32. ``conv_offset`` starts at random weights (std 1/sqrt(fan-in)) rather than
mmcv's zeros, so the offsets are O(1) and the sampling points off the grid, as in a trained
model.

As in a PyTorch program, torch is imported BEFORE deformnp; both run in one process with
``torch.set_num_threads(numba.get_num_threads())``, the runs alternate (a burst of load on a
shared machine slows both alike) and the table gives the median, min and max ms per step and
torchvision's time over deformnp's (above 1: deformnp is faster).

    python benches/bench_torch_adapter.py            # the table (5 alternating rounds per size)
    python benches/bench_torch_adapter.py 9          # more rounds
    python -m pytest benches/bench_torch_adapter.py --benchmark-enable

Under pytest the import order is the order of collection: run this file alone (as above) for
torch-first; each benchmark records the order it saw in ``extra_info``. The tests skip when
torch or torchvision is missing; the larger size is marked ``slow`` (torchvision's step takes
seconds there).
"""

from __future__ import annotations

import math
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass

import numba
import numpy as np
import pytest

try:
    import torch  # before deformnp, as in a PyTorch program
    import torchvision
    from torch import nn
except ImportError:
    torch = torchvision = nn = None

if torch is not None:
    import deformnp.torch as dnt


def _torch_imported_first() -> bool:
    """Whether torch was imported before deformnp in this process (``sys.modules`` keeps the
    order of first import). Under pytest another bench may have imported deformnp first."""
    names = list(sys.modules)
    return "torch" in names and names.index("torch") < names.index("deformnp")


TORCH_FIRST = _torch_imported_first()


@dataclass(frozen=True)
class Size:
    B: int
    C: int
    H: int

    def __str__(self) -> str:
        return f"B={self.B}, {self.C}->{self.C}, {self.H}x{self.H}"


SIZES = [Size(4, 64, 32), Size(8, 128, 64)]
IMPLS = ["deformnp", "torchvision"]


if torch is not None:

    class TorchvisionModulatedDeformConv2dPack(nn.Module):
        """mmcv's ``ModulatedDeformConv2dPack`` (3x3, stride 1, padding 1, one group) computed
        by ``torchvision.ops.deform_conv2d``; the parameter names of deformnp's / mmcv's."""

        def __init__(self, in_channels: int, out_channels: int) -> None:
            super().__init__()
            self.weight = nn.Parameter(torch.empty(out_channels, in_channels, 3, 3))
            self.bias = nn.Parameter(torch.empty(out_channels))
            self.conv_offset = nn.Conv2d(in_channels, 3 * 9, 3, padding=1)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            o1, o2, mask = torch.chunk(self.conv_offset(x), 3, dim=1)
            offset = torch.cat((o1, o2), dim=1)
            return torchvision.ops.deform_conv2d(
                x, offset, self.weight, self.bias, padding=1, mask=torch.sigmoid(mask)
            )


def make_steps(size: Size, seed: int = 0) -> dict[str, Callable[[], float]]:
    """One training step per implementation (same weights, input and loss weights): each call
    runs forward, loss, backward and an SGD step, and returns the loss."""
    torch.set_num_threads(numba.get_num_threads())
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(size.B, size.C, size.H, size.H, generator=gen)
    g = torch.randn(size.B, size.C, size.H, size.H, generator=gen)
    torch.manual_seed(seed)
    ours = dnt.ModulatedDeformConv2dPack(size.C, size.C, 3, padding=1)
    with torch.no_grad():  # O(1) offsets, as in a trained model (see the module docstring)
        ours.conv_offset.weight.normal_(0.0, 1.0 / math.sqrt(9 * size.C), generator=gen)
    theirs = TorchvisionModulatedDeformConv2dPack(size.C, size.C)
    theirs.load_state_dict(ours.state_dict())
    steps = {}
    for name, layer in zip(IMPLS, (ours, theirs), strict=True):
        opt = torch.optim.SGD(layer.parameters(), lr=1e-6)
        xi = x.clone().requires_grad_(True)  # a layer inside a network: the input's gradient too

        def step(layer: nn.Module = layer, opt: torch.optim.Optimizer = opt, xi=xi) -> float:
            opt.zero_grad(set_to_none=True)
            xi.grad = None
            loss = (layer(xi) * g).sum()
            loss.backward()
            opt.step()
            return loss.item()

        steps[name] = step
    return steps


def time_alternating(steps: dict[str, Callable[[], float]], rounds: int) -> dict[str, list[float]]:
    """ms per step of each implementation, ``rounds`` runs each, alternating, after one warm-up
    run each (kernel cache, allocator, thread pools)."""
    for fn in steps.values():
        fn()
    times: dict[str, list[float]] = {name: [] for name in steps}
    for _ in range(rounds):
        for name, fn in steps.items():
            t0 = time.perf_counter()
            fn()
            times[name].append(1e3 * (time.perf_counter() - t0))
    return times


# ---------------------------------------------------------------- pytest / pytest-benchmark

_needs_torch = pytest.mark.skipif(torch is None, reason="torch/torchvision are not installed")
_params = [
    pytest.param(s, id=f"B{s.B}-C{s.C}-{s.H}", marks=[pytest.mark.slow] if s.C > 64 else [])
    for s in SIZES
]


@_needs_torch
@pytest.mark.parametrize("size", _params)
def test_same_step(size):
    """Both implementations give the same loss (the timed steps compute the same thing)."""
    steps = make_steps(size)
    a, b = steps["deformnp"](), steps["torchvision"]()
    assert a == pytest.approx(b, rel=1e-4)


@_needs_torch
@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("size", _params)
def test_training_step(benchmark, size, impl):
    benchmark.group = f"torch training step, ModulatedDeformConv2dPack {size}"
    benchmark.extra_info["torch imported first"] = TORCH_FIRST
    benchmark.extra_info["threads"] = numba.get_num_threads()
    fn = make_steps(size)[impl]
    fn()  # warm up
    big = size.C > 64
    benchmark.pedantic(fn, rounds=(2 if big else 5) if impl == "torchvision" else 10)


# ---------------------------------------------------------------- script


def main(rounds: int = 5) -> None:
    if torch is None:
        sys.exit(
            "benches/bench_torch_adapter.py needs torch and torchvision: "
            "pip install torch torchvision"
        )
    print(
        f"ModulatedDeformConv2dPack training step (forward, backward, SGD), float32, "
        f"{numba.get_num_threads()} threads, torch {torch.__version__}, torch imported "
        f"{'before' if TORCH_FIRST else 'after'} deformnp, {rounds} alternating rounds"
    )
    print(
        f"{'size':26s} {'impl':12s} {'median ms':>10s} {'min ms':>9s} {'max ms':>9s}   "
        f"torchvision / deformnp"
    )
    for size in SIZES:
        t0 = time.perf_counter()
        times = time_alternating(make_steps(size), rounds)
        med = {k: float(np.median(v)) for k, v in times.items()}
        lo = {k: min(v) for k, v in times.items()}
        for name, v in times.items():
            ratio = ""
            if name == "torchvision":
                ratio = (
                    f"   {med['torchvision'] / med['deformnp']:.2f}x (medians), "
                    f"{lo['torchvision'] / lo['deformnp']:.2f}x (minima)"
                )
            print(
                f"{str(size):26s} {name:12s} {med[name]:10.1f} {lo[name]:9.1f} {max(v):9.1f}{ratio}"
            )
        print(f"{'':26s} ({time.perf_counter() - t0:.0f} s)")
    print(f"Numba threading layer: {numba.threading_layer()}")


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 5)
