"""The CUDA kernels of ms_deform_attn (``kernels/cuda/attention.py``) beyond the check table.

Under Numba's simulator (tests/conftest.py) unless ``DEFORMNP_REAL_GPU=1``. Shapes are tiny and
chosen for the kernel design: D not a multiple of the 4-channel run (several passes over the
points), an empty level between two others, P = 1, every subset of ``needs``, the deterministic
value gradient, and the channel-lane path (lanes > 1, warp shuffles) emulated on the simulator.
"""

from __future__ import annotations

import threading
from collections import Counter

import numpy as np
import pytest

import deformnp as dn
from deformnp import cuda
from deformnp.kernels.cpu import attention as cpu_kernels

pytestmark = pytest.mark.skipif(not cuda.is_available(), reason="numba-cuda is not installed")

TOL = {np.float64: 1e-12, np.float32: 1e-5}


def _kernels():
    from deformnp.kernels.cuda import attention

    return attention


@pytest.fixture
def deterministic():
    dn.use_deterministic_algorithms(True)
    try:
        yield
    finally:
        dn.use_deterministic_algorithms(False)


def make_inputs(seed, levels, N, Lq, M, D, P, dtype=np.float64):
    """Host arrays (value, shapes, starts, loc, attn, grad_out); pixel coordinates have
    fractional parts in [0.1, 0.9] over [-1, H] x [-1, W] (some in the fading band outside the
    map), so float32 and float64 plans take the same corners; an empty level gets any point."""
    rng = np.random.default_rng(seed)
    shapes = np.array(levels, dtype=np.int64).reshape(-1, 2)
    sizes = shapes.prod(axis=1)
    starts = np.concatenate([[0], np.cumsum(sizes)[:-1]]).astype(np.int64)
    S = int(sizes.sum())
    L = len(levels)
    loc = np.empty((N, Lq, M, L, P, 2))
    for l, (H, W) in enumerate(levels):
        shape = (N, Lq, M, P)
        if H * W == 0:
            loc[:, :, :, l] = rng.uniform(0, 1, (*shape, 2))
            continue
        y = np.floor(rng.uniform(-1, H, shape)) + rng.uniform(0.1, 0.9, shape)
        x = np.floor(rng.uniform(-1, W, shape)) + rng.uniform(0.1, 0.9, shape)
        loc[:, :, :, l, :, 0] = (x + 0.5) / W
        loc[:, :, :, l, :, 1] = (y + 0.5) / H
    value = rng.standard_normal((N, S, M, D))
    attn = rng.uniform(0.1, 1.0, (N, Lq, M, L, P))
    grad = rng.standard_normal((N, Lq, M * D))
    return (
        value.astype(dtype),
        shapes,
        starts,
        loc.astype(dtype),
        attn.astype(dtype),
        grad.astype(dtype),
    )


def _device(value, shapes, starts, loc, attn):
    return [cuda.to_device(value), shapes, starts, cuda.to_device(loc), cuda.to_device(attn)]


def _host(arrays):
    return [None if a is None else a.copy_to_host() for a in arrays]


def run_cuda(inputs, needs=(True, True, True), cache=None):
    """(out, grads) of the CUDA kernels on host copies of the results."""
    value, shapes, starts, loc, attn, grad = inputs
    k = _kernels()
    dev = _device(value, shapes, starts, loc, attn)
    out = k.ms_deform_attn_forward(*dev, cache)
    grads = k.ms_deform_attn_backward(cuda.to_device(grad), *dev, needs, cache)
    return out.copy_to_host(), _host(grads)


def run_cpu(inputs):
    value, shapes, starts, loc, attn, grad = inputs
    out = cpu_kernels.ms_deform_attn_forward(value, shapes, starts, loc, attn)
    grads = cpu_kernels.ms_deform_attn_backward(
        grad, value, shapes, starts, loc, attn, (True, True, True)
    )
    return out, list(grads)


def assert_close(got, want, tol):
    scale = max(1.0, float(np.abs(want).max())) if want.size else 1.0
    np.testing.assert_allclose(got, want, rtol=tol, atol=tol * scale)


SHAPES = {
    # D = 5: two passes of the 4-channel run, the second with one channel
    "D=5, empty middle level": ([(3, 4), (0, 3), (2, 2)], dict(N=2, Lq=2, M=2, D=5, P=2)),
    "D=3, P=1, empty first level": ([(0, 0), (2, 3), (1, 1)], dict(N=1, Lq=3, M=2, D=3, P=1)),
    "D=6, one level, P=1": ([(3, 3)], dict(N=1, Lq=2, M=3, D=6, P=1)),
}


@pytest.mark.parametrize("dtype", [np.float64, np.float32], ids=["float64", "float32"])
@pytest.mark.parametrize("name", SHAPES)
def test_matches_cpu(name, dtype):
    levels, dims = SHAPES[name]
    inputs = make_inputs(0, levels, dtype=dtype, **dims)
    out, grads = run_cuda(inputs)
    out_cpu, grads_cpu = run_cpu(inputs)
    assert out.dtype == dtype and all(g.dtype == dtype for g in grads)
    assert_close(out, out_cpu, TOL[dtype])
    for i, (g, gc) in enumerate(zip(grads, grads_cpu)):
        assert g.shape == gc.shape, i
        assert_close(g, gc, TOL[dtype])


@pytest.mark.parametrize(
    "needs",
    [(True, False, False), (False, True, False), (False, False, True), (False, True, True)],
)
@pytest.mark.parametrize("mode", ["default", "deterministic"])
def test_needs(needs, mode):
    levels, dims = SHAPES["D=5, empty middle level"]
    inputs = make_inputs(1, levels, **dims)
    _, full = run_cpu(inputs)
    dn.use_deterministic_algorithms(mode == "deterministic")
    try:
        _, grads = run_cuda(inputs, needs)
    finally:
        dn.use_deterministic_algorithms(False)
    for need, g, want in zip(needs, grads, full):
        if need:
            assert_close(g, want, 1e-12)
        else:
            assert g is None


@pytest.mark.parametrize("dtype", [np.float64, np.float32], ids=["float64", "float32"])
@pytest.mark.parametrize("name", SHAPES)
def test_deterministic_mode(name, dtype, deterministic):
    levels, dims = SHAPES[name]
    inputs = make_inputs(2, levels, dtype=dtype, **dims)
    _, first = run_cuda(inputs)
    _, second = run_cuda(inputs)
    for a, b in zip(first, second):
        np.testing.assert_array_equal(a, b)  # bit-identical
    dn.use_deterministic_algorithms(False)
    _, atomic = run_cuda(inputs)
    for a, b in zip(first, atomic):
        assert_close(a, b, TOL[dtype])
    _, cpu = run_cpu(inputs)
    for a, b in zip(first, cpu):
        assert_close(a, b, TOL[dtype])


def test_deterministic_through_autograd(deterministic):
    levels, dims = SHAPES["D=5, empty middle level"]
    value, shapes, starts, loc, attn, grad = make_inputs(3, levels, **dims)

    def grads():
        leaves = [dn.tensor(a).to("cuda").requires_grad_(True) for a in (value, loc, attn)]
        out = dn.ops.ms_deform_attn(leaves[0], shapes, starts, leaves[1], leaves[2])
        (out * dn.tensor(grad).to("cuda")).sum().backward()
        return [t.grad.copy_to_host() for t in leaves]

    a, b = grads(), grads()
    for x, y in zip(a, b):
        np.testing.assert_array_equal(x, y)
    _, cpu = run_cpu((value, shapes, starts, loc, attn, grad))
    for x, y in zip(a, cpu):
        assert_close(x, y, 1e-12)


def test_level_arrays_copied_once_per_node():
    levels, dims = SHAPES["D=3, P=1, empty first level"]
    inputs = make_inputs(4, levels, **dims)
    cache = {}
    value, shapes, starts, loc, attn, grad = inputs
    k = _kernels()
    dev = _device(value, shapes, starts, loc, attn)
    k.ms_deform_attn_forward(*dev, cache)
    levels_dev = cache["levels"]
    k.ms_deform_attn_backward(cuda.to_device(grad), *dev, (True, True, True), cache)
    assert cache["levels"] is levels_dev


def test_large_levels():
    # a level wider than int16 (the kernels index in int64 throughout)
    levels = [(1, 40000), (2, 2)]
    inputs = make_inputs(5, levels, N=1, Lq=1, M=1, D=2, P=1)
    out, grads = run_cuda(inputs, cache={})
    out_cpu, grads_cpu = run_cpu(inputs)
    assert_close(out, out_cpu, 1e-12)
    for g, gc in zip(grads, grads_cpu):
        assert_close(g, gc, 1e-12)


# ------------------------------------------------------------- channel lanes (emulated shuffles)


class EmulatedShuffles:
    """``lane_sum`` for the simulator: the butterfly of ``_launch.lane_sum`` (same order of
    additions) exchanged through a dict between the threads of a block, which here is one warp.
    Fails if two partner lanes are not at the same call (a lane skipped or repeated a shuffle)."""

    def __init__(self):
        self.calls = Counter()
        self.box = {}

    def __call__(self, v, lanes):
        th = threading.current_thread()
        me = (tuple(th.blockIdx), th.threadIdx.x)
        self.calls[me] += 1
        n = self.calls[me]
        off = lanes // 2
        while off > 0:
            self.box[me] = (n, off, v)
            th.syncthreads()
            partner = self.box[(me[0], me[1] ^ off)]
            assert partner[:2] == (n, off), f"lanes out of step at {me}: {partner[:2]}"
            th.syncthreads()
            v = v + partner[2]
            off //= 2
        return v


LANE_SHAPES = {
    # 12 groups x 4 lanes = 48 threads: the 32-thread grid turns twice, the second time with
    # 16 idle threads; lanes 2 and 3 of each group hold one channel, lanes 0 and 1 two
    "lanes=4, D=6": (4, [(3, 3)], dict(N=1, Lq=4, M=3, D=6, P=1)),
    # 12 groups x 2 lanes = 24 threads (8 idle); D = 5 > 4 * 2: two passes, the second with
    # one channel (lane 0 only), and an empty level
    "lanes=2, D=5, 2 passes": (2, [(3, 4), (0, 3), (2, 2)], dict(N=1, Lq=3, M=2, D=5, P=2)),
}


@pytest.mark.parametrize("mode", ["default", "deterministic"])
@pytest.mark.parametrize("name", LANE_SHAPES)
def test_channel_lanes_emulated(monkeypatch, name, mode):
    # the lanes > 1 path that only a real GPU takes: one block of one warp (32 threads), so the
    # grid-stride loop turns; on the simulator lane_sum is emulated with the same butterfly, on
    # a GPU (DEFORMNP_REAL_GPU=1) the real warp shuffles run with these lanes and idle threads
    from deformnp.kernels.cuda import _launch

    k = _kernels()
    shuffles = EmulatedShuffles()
    lanes, levels, dims = LANE_SHAPES[name]
    monkeypatch.setattr(k, "lanes_for", lambda channels: lanes)
    monkeypatch.setattr(k, "grid", lambda total: (1, 32))
    if _launch.SIMULATOR:
        monkeypatch.setattr(k, "lane_sum", shuffles)
    inputs = make_inputs(6, levels, **dims)
    dn.use_deterministic_algorithms(mode == "deterministic")
    try:
        out, grads = run_cuda(inputs)
    finally:
        dn.use_deterministic_algorithms(False)
    out_cpu, grads_cpu = run_cpu(inputs)
    assert_close(out, out_cpu, 1e-12)
    for g, gc in zip(grads, grads_cpu):
        assert_close(g, gc, 1e-12)
    if not _launch.SIMULATOR:
        return  # the shuffles themselves are counted only where they are emulated
    # all 32 threads of a warp (here a block) shuffled, equally often: the full-warp mask of
    # lane_sum needs them all, idle threads included
    per_block = {}
    for (block, thread), n in shuffles.calls.items():
        per_block.setdefault(block, {})[thread] = n
    assert per_block
    for block, counts in per_block.items():
        assert sorted(counts) == list(range(32)), (block, counts)
        assert len(set(counts.values())) == 1, (block, counts)
