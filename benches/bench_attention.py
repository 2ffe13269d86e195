"""Benchmarks of multi-scale deformable attention, and of the DAT layer.

Timings (pytest-benchmark, ``suite.py``): the reference size and Deformable-DETR's encoder size
(N=2, levels (100,152),(50,76),(25,38),(13,19), Lq = S = 20197), at Numba's thread count and at
one thread, the cases ``python -m deformnp bench`` times. Peak memory: the reference size,
N=1, levels (32,32), (16,16), (8,8), (4,4), Lq = S = 1360, M=8, D=32, P=4, float32;
forward and forward+backward, against Deformable-DETR's PyTorch formulation
(``ms_deform_attn_core_pytorch``: one grid_sample per level) in the same process with
torch.set_num_threads(numba.get_num_threads()).

    python -m pytest benches/bench_attention.py --benchmark-enable
    python benches/bench_attention.py            # peak-memory table (and a quick timing table)
    python benches/bench_attention.py --locality # encoder: uniform against local locations

Peak memory (``peak_memory``): each case runs in a fresh subprocess; after two warm-up calls
(Numba cache load, torch initialisation) the kernel's high-water mark is reset by writing 5 to
/proc/self/clear_refs, the case runs once, and the figure is VmHWM - VmRSS before the call: the
peak extra resident memory of the call, counting NumPy and torch allocations alike. glibc's
mmap threshold is pinned at 64 KiB (MALLOC_MMAP_THRESHOLD_) so that freed buffers go back to the
OS instead of being recycled unseen from the heap. Linux only. Pages first touched by worker
threads can reach the process's RSS counters late, so for deformnp the tracemalloc peak of the
same call (NumPy allocations; the kernels allocate nothing large) is printed beside it.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time

import numba
import numpy as np
import pytest
from suite import parametrize, run

import deformnp as dn
from deformnp.cases.bench import torch_ms_deform_attn_core
from deformnp.cases.inputs import ENCODER_LEVELS, attention_inputs
from deformnp.cases.inputs import reference_attention as reference_inputs
from deformnp.ops import ms_deform_attn, ms_deform_attn_forward

SIZE = "N=1, levels (32,32),(16,16),(8,8),(4,4), Lq=S=1360, M=8, D=32, P=4, float32"


@pytest.fixture(scope="module")
def data():
    return reference_inputs(np.float32)


def _ours_forward(d):
    return lambda: ms_deform_attn_forward(
        d["value"],
        d["spatial_shapes"],
        d["level_start_index"],
        d["sampling_locations"],
        d["attention_weights"],
    )


def _ours_forward_backward(d):
    leaves = [
        dn.tensor(d[k], requires_grad=True)
        for k in ("value", "sampling_locations", "attention_weights")
    ]

    def run():
        for t in leaves:
            t.grad = None
        v, loc, attn = leaves
        out = ms_deform_attn(v, d["spatial_shapes"], d["level_start_index"], loc, attn)
        out.backward(d["grad_output"])
        return v.grad

    return run


def _torch_setup(d):
    torch = pytest.importorskip("torch") if "pytest" in sys.modules else __import__("torch")
    torch.set_num_threads(numba.get_num_threads())
    shapes = [tuple(int(s) for s in row) for row in d["spatial_shapes"]]
    tensors = [torch.from_numpy(d[k]) for k in ("value", "sampling_locations", "attention_weights")]
    return torch, shapes, tensors


def _torch_forward(d):
    torch, shapes, (v, loc, attn) = _torch_setup(d)

    def run():
        with torch.no_grad():
            return torch_ms_deform_attn_core(v, shapes, loc, attn)

    return run


def _torch_forward_backward(d):
    torch, shapes, tensors = _torch_setup(d)
    leaves = [t.clone().requires_grad_(True) for t in tensors]
    g = torch.from_numpy(d["grad_output"])

    def run():
        for t in leaves:
            t.grad = None
        v, loc, attn = leaves
        torch_ms_deform_attn_core(v, shapes, loc, attn).backward(g)
        return v.grad

    return run


CASES = {
    "deformnp forward": _ours_forward,
    "deformnp fwd+bwd": _ours_forward_backward,
    "torch forward": _torch_forward,
    "torch fwd+bwd": _torch_forward_backward,
}


# ---------------------------------------------------------------------------- pytest-benchmark


@parametrize(["ms_deform_attn"])
def test_deformnp(benchmark, op, size, n, which):
    """Both sizes (the reference size and Deformable-DETR's encoder), current threads and 1: the
    cases ``python -m deformnp bench`` times."""
    run(benchmark, op, size, n, which)


@parametrize(["ms_deform_attn"])
def test_torch_grid_sample_formulation(benchmark, op, size, n, which):
    run(benchmark, op, size, n, which, "torch_")


def _dat_layer(dtype=np.float32):
    from deformnp.nn import DeformableAttention2d

    # a DAT-T stage-3-like block: 14x14 map, 192 channels, 6 heads, 3 groups, stride 1
    layer = DeformableAttention2d(192, 6, n_groups=3, stride=1, kernel_size=5, q_size=14)
    x = dn.tensor(np.random.default_rng(0).standard_normal((1, 192, 14, 14)).astype(dtype))
    return layer, x


def test_dat_layer_forward(benchmark):
    layer, x = _dat_layer()
    benchmark.extra_info["size"] = "B=1, C=192, 14x14, 6 heads, 3 groups, stride 1, k=5"
    with dn.no_grad():
        benchmark(lambda: layer(x))


def test_dat_layer_forward_backward(benchmark):
    layer, x = _dat_layer()
    benchmark.extra_info["size"] = "B=1, C=192, 14x14, 6 heads, 3 groups, stride 1, k=5"

    def run():
        layer.zero_grad()
        y, _, _ = layer(x)
        y.sum().backward()

    benchmark(run)


# ---------------------------------------------------------------------------- peak memory

_CHILD = r"""
import gc, sys
import numpy as np
sys.path.insert(0, {here!r})
import bench_attention as B

def rss(field):
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field):
                return int(line.split()[1])  # KiB

d = B.reference_inputs(np.float32)
fn = B.CASES[{case!r}](d)
fn(); fn()
gc.collect()
before = rss("VmRSS:")
with open("/proc/self/clear_refs", "w") as f:
    f.write("5")
result = fn()
peak = rss("VmHWM:")
del result
gc.collect()
import tracemalloc
tracemalloc.start()
result = fn()
traced = tracemalloc.get_traced_memory()[1]
tracemalloc.stop()
print(peak - before, traced // 1024)
"""


def peak_memory(case: str) -> tuple[float, float]:
    """(peak extra resident memory, tracemalloc peak) in MiB of one call of ``case`` (see the
    module docstring). tracemalloc sees NumPy's allocations, not torch's."""
    here = os.path.dirname(os.path.abspath(__file__))
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536")
    out = subprocess.run(
        [sys.executable, "-c", _CHILD.format(here=here, case=case)],
        env=env,
        capture_output=True,
        text=True,
        check=True,
    )
    rss, traced = out.stdout.strip().splitlines()[-1].split()
    return int(rss) / 1024, int(traced) / 1024


def io_megabytes(d) -> tuple[float, float]:
    """(inputs + output, inputs + output + gradients) in MiB."""
    ins = sum(d[k].nbytes for k in ("value", "sampling_locations", "attention_weights"))
    out = d["grad_output"].nbytes
    return (ins + out) / 2**20, (2 * ins + out) / 2**20


@pytest.mark.skipif(not os.path.exists("/proc/self/clear_refs"), reason="needs Linux /proc")
def test_peak_memory_small_multiple_of_inputs_and_outputs(data):
    fwd_io, bwd_io = io_megabytes(data)
    info = {c: max(peak_memory(c)) for c in CASES if c.startswith("deformnp")}
    print({k: f"{v:.2f} MiB" for k, v in info.items()})
    # not a timing: the memory claim of the kernels (no (N, M, D, Lq, L, P) intermediate)
    assert info["deformnp forward"] < 3 * fwd_io
    assert info["deformnp fwd+bwd"] < 3 * bwd_io


def _median_ms(fn, repeat=20):
    fn()
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return 1e3 * float(np.median(times)), 1e3 * float(np.min(times))


# ---------------------------------------------------------------------------- locality


def local_sampling_locations(
    levels, N: int, M: int, P: int, noise: float = 2.0, seed: int = 1
) -> np.ndarray:
    """(N, Lq, M, L, P, 2) float32 locations as a Deformable-DETR encoder makes them: every pixel
    of every level queries (Lq = S), its reference point the pixel's centre (valid ratios 1) at
    every level, plus the offsets its ``MSDeformAttn._reset_parameters`` starts from (head m
    in direction 2 pi m / M, point p at p + 1 pixels, on the square through the ring) and
    Gaussian noise of ``noise`` pixels, standing for what training moves them by."""
    rng = np.random.default_rng(seed)
    centres = [
        np.stack(np.meshgrid((np.arange(w) + 0.5) / w, (np.arange(h) + 0.5) / h), -1)
        for h, w in levels
    ]
    ref = np.concatenate([c.reshape(-1, 2) for c in centres])  # (Lq, 2) as (x, y)
    L = len(levels)
    theta = np.arange(M) * 2 * np.pi / M
    ring = np.stack([np.cos(theta), np.sin(theta)], -1)
    ring /= np.abs(ring).max(-1, keepdims=True)
    pixels = ring[:, None, None, :] * (np.arange(P) + 1)[None, None, :, None]  # (M, 1, P, 2)
    pixels = pixels + rng.normal(0.0, noise, (N, len(ref), M, L, P, 2))
    per_pixel = 1.0 / np.array([[w, h] for h, w in levels], float)  # (L, 2)
    loc = ref[None, :, None, None, None, :] + pixels * per_pixel[None, None, None, :, None, :]
    return loc.astype(np.float32)


def locality(repeat: int = 4) -> None:
    """Forward+backward at the encoder size with the bench's uniform locations and with
    :func:`local_sampling_locations`, deformnp and torch alternating (medians)."""
    d = attention_inputs(ENCODER_LEVELS, 2, np.float32)
    N, _, M, _, P, _ = d["sampling_locations"].shape
    local = dict(d, sampling_locations=local_sampling_locations(ENCODER_LEVELS, N, M, P))
    print(f"ms_deform_attn, encoder size, forward+backward; {numba.get_num_threads()} threads")
    for name, data in (("uniform", d), ("local", local)):
        ours, theirs = _ours_forward_backward(data), _torch_forward_backward(data)
        ours(), theirs()
        t_ours, t_theirs = [], []
        for _ in range(repeat):
            for fn, times in ((ours, t_ours), (theirs, t_theirs)):
                t0 = time.perf_counter()
                fn()
                times.append(time.perf_counter() - t0)
        a, b = 1e3 * np.median(t_ours), 1e3 * np.median(t_theirs)
        print(f"{name:<8} deformnp {a:8.1f} ms   torch {b:8.1f} ms   {b / a:5.1f}x")


def main() -> None:
    if "--locality" in sys.argv[1:]:
        locality()
        return
    d = reference_inputs(np.float32)
    fwd_io, bwd_io = io_megabytes(d)
    try:
        import torch  # noqa: F401

        cases = list(CASES)
    except ImportError:
        cases = [c for c in CASES if c.startswith("deformnp")]
    print(f"ms_deform_attn, {SIZE}; numba {numba.get_num_threads()} threads")
    print(f"inputs+output {fwd_io:.2f} MiB; with gradients {bwd_io:.2f} MiB")
    print(
        f"{'case':<18} {'median ms':>10} {'min ms':>8} {'peak extra RSS MiB':>19} "
        f"{'tracemalloc MiB':>16}"
    )
    for c in cases:
        med, mn = _median_ms(CASES[c](d))
        rss, traced = peak_memory(c)
        traced_s = f"{traced:.2f}" if c.startswith("deformnp") else "-"
        print(f"{c:<18} {med:>10.2f} {mn:>8.2f} {rss:>19.2f} {traced_s:>16}")


if __name__ == "__main__":
    main()
