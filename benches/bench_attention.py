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
    python benches/bench_attention.py --rows     # the kernels beside their bare row traffic

Rows (``--rows``): the forward and backward kernels beside a few lines of Numba that do only
their row traffic (each point's four corner rows of D channels, gathered, and in the backward also
dotted with the query's gradient row and added into the value gradient), the corner offsets and
weights computed beforehand in NumPy (``corner_plans``) and read contiguously, at the reference
and the encoder size. A baseline, not a lower bound: it reads 32 bytes of plan a point where the
kernels read 12 of locations and weights (strided, in Deformable-DETR's layout), and it leaves
out the location gradients and the zeroing of the value gradient. It tells whether computing
the plans costs more than reading them would, and how much of each kernel's time the rows take.

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

import functools
import os
import subprocess
import sys
import time

import numba
import numpy as np
import pytest
from numba import njit, prange, uint64
from suite import parametrize, run

import deformnp as dn
from deformnp.cases.bench import torch_ms_deform_attn_core
from deformnp.cases.inputs import ENCODER_LEVELS, attention_inputs
from deformnp.cases.inputs import reference_attention as reference_inputs
from deformnp.kernels.cpu import attention as cpu_attention
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


# ---------------------------------------------------------------------------- rows


def corner_plans(d) -> tuple[np.ndarray, np.ndarray]:
    """Every sampling point's four corners and weights, computed beforehand in NumPy (float64,
    the zero-fade rule, times the attention weight), task by task: offsets (N, M, L, Lq * P, 4)
    into the head-major value (level start included, in elements) and weights of the same
    shape (float32). The points of one (n, m, level) are contiguous, query by query."""
    shapes, starts = d["spatial_shapes"], d["level_start_index"]
    loc, attn = d["sampling_locations"], d["attention_weights"]
    N, Lq, M, L, P, _ = loc.shape
    D = d["value"].shape[3]
    assert d["value"].shape[1] * D < 2**31, "offsets are int32"
    off = np.zeros((N, M, L, Lq * P, 4), np.int32)
    wt = np.zeros((N, M, L, Lq * P, 4), np.float32)
    for lev, (H, W) in enumerate(shapes.tolist()):
        x = loc[:, :, :, lev, :, 0].astype(np.float64) * W - 0.5  # (N, Lq, M, P)
        y = loc[:, :, :, lev, :, 1].astype(np.float64) * H - 0.5
        x0, y0 = np.floor(x), np.floor(y)
        lx, ly = x - x0, y - y0
        x0, y0 = x0.astype(np.int64), y0.astype(np.int64)
        corners = ((0, 0, (1 - ly) * (1 - lx)), (0, 1, (1 - ly) * lx), (1, 0, ly * (1 - lx)))
        for k, (dy, dx, w) in enumerate((*corners, (1, 1, ly * lx))):
            r, c = y0 + dy, x0 + dx
            inside = (r >= 0) & (r < H) & (c >= 0) & (c < W)
            pixel = np.where(inside, np.clip(r, 0, H - 1) * W + np.clip(c, 0, W - 1), 0)
            weight = np.where(inside, w, 0.0) * attn[:, :, :, lev, :]
            off[:, :, lev, :, k] = (
                ((starts[lev] + pixel) * D).transpose(0, 2, 1, 3).reshape(N, M, Lq * P)
            )
            wt[:, :, lev, :, k] = weight.transpose(0, 2, 1, 3).reshape(N, M, Lq * P)
    return off, wt


@functools.cache
def row_kernels(D: int):
    """(gather, gather_scatter): the row traffic of the forward and of the backward kernels with
    the plans read from :func:`corner_plans` instead of computed, D compiled in as there.

    ``gather``: tasks (n, m, a chunk of queries, as many as the forward's), the levels inside, each query's output row
    the sum of its points' four weighted corner rows (the forward). ``gather_scatter``: tasks
    (n, m, level), each point's four channel sums with its query's gradient row read and four
    corner rows of the value gradient added into (the backward's value and weight parts)."""
    Q = max(1, cpu_attention.ACC_ELEMENTS // D)  # the forward's queries per task

    @njit(parallel=True, fastmath={"contract"}, cache=False)
    def gather(value_hm, off, wt, P, out):
        N, M = value_hm.shape[:2]
        L = off.shape[2]
        Lq = off.shape[3] // P
        chunks = (Lq + Q - 1) // Q
        for task in prange(N * M * chunks):
            nm = task // chunks
            n = nm // M
            m = nm - n * M
            q0 = (task - nm * chunks) * Q
            nq = min(Lq, q0 + Q) - q0
            v = value_hm[n, m].reshape(-1)
            acc = np.zeros((Q, D), value_hm.dtype)
            for lev in range(L):
                o = off[n, m, lev]
                w = wt[n, m, lev]
                for qq in range(nq):
                    for p in range((q0 + qq) * P, (q0 + qq + 1) * P):
                        o0, o1 = uint64(o[p, 0]), uint64(o[p, 1])
                        o2, o3 = uint64(o[p, 2]), uint64(o[p, 3])
                        a0, a1, a2, a3 = w[p, 0], w[p, 1], w[p, 2], w[p, 3]
                        for d in range(D):
                            ud = uint64(d)
                            acc[qq, d] += (
                                a0 * v[o0 + ud]
                                + a1 * v[o1 + ud]
                                + a2 * v[o2 + ud]
                                + a3 * v[o3 + ud]
                            )
            for qq in range(nq):
                out[n, q0 + qq, m] = acc[qq]

    @njit(parallel=True, fastmath={"contract", "reassoc"}, cache=False)
    def gather_scatter(value_hm, off, wt, P, grad_hm, grad_value_hm, grad_weight):
        N, M = value_hm.shape[:2]
        L = off.shape[2]
        Lq = off.shape[3] // P
        for task in prange(N * M * L):
            nm = task // L
            lev = task - nm * L
            n = nm // M
            m = nm - n * M
            v = value_hm[n, m].reshape(-1)
            gv = grad_value_hm[n, m].reshape(-1)
            o = off[n, m, lev]
            w = wt[n, m, lev]
            for q in range(Lq):
                g = grad_hm[n, m, q]
                for p in range(q * P, (q + 1) * P):
                    o0, o1 = uint64(o[p, 0]), uint64(o[p, 1])
                    o2, o3 = uint64(o[p, 2]), uint64(o[p, 3])
                    a0, a1, a2, a3 = w[p, 0], w[p, 1], w[p, 2], w[p, 3]
                    t0 = t1 = t2 = t3 = value_hm.dtype.type(0.0)
                    for d in range(D):
                        ud = uint64(d)
                        gd = g[d]
                        t0 += gd * v[o0 + ud]
                        t1 += gd * v[o1 + ud]
                        t2 += gd * v[o2 + ud]
                        t3 += gd * v[o3 + ud]
                    grad_weight[n, m, lev, p] = a0 * t0 + a1 * t1 + a2 * t2 + a3 * t3
                    for d in range(D):
                        ud = uint64(d)
                        gd = g[d]
                        gv[o0 + ud] += a0 * gd
                        gv[o1 + ud] += a1 * gd
                        gv[o2 + ud] += a2 * gd
                        gv[o3 + ud] += a3 * gd

    return gather, gather_scatter


def test_rows_gather_is_the_forward(data):
    """The row baseline's gather, fed :func:`corner_plans`, computes ms_deform_attn's forward: the same
    rows with the same weights (plans in float64 there, float32 in the kernel)."""
    N, Lq, M, L, P, _ = data["sampling_locations"].shape
    D = data["value"].shape[3]
    off, wt = corner_plans(data)
    gather, _ = row_kernels(D)
    out = np.empty((N, Lq, M, D), np.float32)
    gather(cpu_attention.head_major(data["value"]), off, wt, P, out)
    ref = _ours_forward(data)()
    assert np.abs(out.reshape(ref.shape) - ref).max() <= 1e-5 * np.abs(ref).max()


def rows(repeat: int = 20) -> None:
    """The forward and backward kernels beside the same row traffic with the plans precomputed
    (:func:`row_kernels`), at the reference and the encoder size: how much of a kernel's time
    is the bilinear rows themselves, on this machine. Medians and bests of alternating runs."""
    threads = numba.get_num_threads()
    print(f"ms_deform_attn kernels beside their bare row traffic; {threads} threads")
    print(f"{'size':<10} {'what':<38} {'median ms':>10} {'best ms':>8} {'G ch-samples/s':>15}")
    _rows_size("reference", reference_inputs(np.float32), repeat)
    _rows_size("encoder", attention_inputs(ENCODER_LEVELS, 2, np.float32), max(3, repeat // 4))


def _rows_size(label: str, d: dict, repeat: int) -> None:
    value, loc, attn = d["value"], d["sampling_locations"], d["attention_weights"]
    shapes, starts, grad = d["spatial_shapes"], d["level_start_index"], d["grad_output"]
    N, Lq, M, L, P, _ = loc.shape
    D = value.shape[3]
    off, wt = corner_plans(d)
    gather, gather_scatter = row_kernels(D)
    value_hm = cpu_attention.head_major(value)
    grad_hm = np.ascontiguousarray(grad.reshape(N, Lq, M, D).transpose(0, 2, 1, 3))
    forward, backward = cpu_attention._kernels_for(D, loc.size // 2, shapes)
    slots = cpu_attention._level_slots(shapes, starts, P)
    out_rows = np.empty((N, Lq, M, D), value.dtype)
    out = np.empty((N, Lq, M * D), value.dtype)
    gv_rows = np.zeros_like(value_hm)
    gw_rows = np.empty(off.shape[:4], value.dtype)
    gv, gl, ga = np.empty_like(value_hm), np.empty_like(loc), np.empty_like(attn)
    no_extra = np.empty((0, 0), value.dtype)  # one query chunk: no extra gradient buffers
    runs = {
        "forward kernel": lambda: forward(value_hm, *slots, loc, attn, out),
        "rows only: forward's gather": lambda: gather(value_hm, off, wt, P, out_rows),
        "backward kernel": lambda: backward(
            grad, value_hm, *slots, loc, attn, 1, True, True, gv, no_extra, gl, ga
        ),
        "rows only: backward's gather+scatter": lambda: gather_scatter(
            value_hm, off, wt, P, grad_hm, gv_rows, gw_rows
        ),
    }
    for fn in runs.values():
        fn()
    # the baseline's gather computes the forward (its plans in float64, the kernel's in float32)
    err = float(np.abs(out_rows.reshape(out.shape) - out).max() / np.abs(out).max())
    times: dict[str, list] = {k: [] for k in runs}
    for _ in range(repeat):
        for k, fn in runs.items():
            t0 = time.perf_counter()
            fn()
            times[k].append(time.perf_counter() - t0)
    samples = N * Lq * M * L * P * D
    for k, t in times.items():
        best = min(t)
        rate = samples / best / 1e9
        print(f"{label:<10} {k:<38} {1e3 * np.median(t):>10.3f} {1e3 * best:>8.3f} {rate:>15.2f}")
    print(
        f"{label:<10} (the baseline's forward against the kernel's: max error {err:.1e} of max |out|)"
    )


def main() -> None:
    if "--locality" in sys.argv[1:]:
        locality()
        return
    if "--rows" in sys.argv[1:]:
        rows()
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
