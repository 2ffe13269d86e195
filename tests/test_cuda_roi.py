"""The CUDA RoI kernels' own cases (``kernels/cuda/roi.py``), beyond the check table's.

* Deterministic mode (``use_deterministic_algorithms(True)``: input gradients through
  ``scatter.segments`` and owner kernels, no atomics) gives the default mode's gradients to
  rounding, bit-identical on two runs, for every op of the family.
* Channel counts that are not a multiple of 4 and, under the simulator (one lane per bin), more
  than the forwards' 8 register accumulators, so the channel runs end mid-run and take two passes;
  several classes and part cells shared by bins for deform_ps_roi_pool (its offset-gradient
  reduction); a box off the map (zero-weight contributions, empty pooling bins).
* A GPU's thread layout under the simulator: several lanes per bin (``lanes_for`` patched), and,
  for the offset gradients, one 32-thread block with ``lane_sum`` emulated in Python (the
  simulator has no warp shuffles), which also checks that whole warps reach every shuffle.

Everything is also compared with the CPU kernels (float64 1e-12, float32 1e-5). Shapes are tiny:
the simulator runs one OS thread per CUDA thread.
"""

from __future__ import annotations

import threading

import numpy as np
import pytest
from numba import cuda as ncuda

import deformnp as dn
from deformnp import cuda, ops
from deformnp.kernels.cuda import roi as cuda_roi

pytestmark = pytest.mark.skipif(not cuda.is_available(), reason="numba-cuda is not installed")

TOL = {np.float64: 1e-12, np.float32: 1e-5}

# the last box lies off the map: its samples have zero weight and its pooling bins are empty
BOXES = np.array(
    [
        [0, 0.4, 1.2, 5.1, 4.6],
        [1, -1.3, 0.2, 7.9, 6.2],
        [1, 2.2, 0.3, 3.1, 2.9],
        [0, 20.0, 21.0, 30.0, 28.0],
    ]
)
K = len(BOXES)
H, W = 6, 7


def _case(name: str, rng: np.random.Generator) -> tuple:
    """(fn, arrays) of one op: fn(*tensors) -> output."""
    if name == "roi_align":  # C = 10: two channel passes of 8 under the simulator
        return (
            lambda a: ops.roi_align(a, BOXES.astype(a.dtype), (2, 3), 0.9, -1, True),
            [rng.standard_normal((2, 10, H, W))],
        )
    if name == "roi_align_unaligned":
        return (
            lambda a: ops.roi_align(a, BOXES.astype(a.dtype), (3, 2), 0.8, 2, False),
            [rng.standard_normal((2, 5, H, W))],
        )
    if name == "ps_roi_align":  # 3 output channels, 12 input channels
        return (
            lambda a: ops.ps_roi_align(a, BOXES.astype(a.dtype), 2, 1.0, 2),
            [rng.standard_normal((2, 12, H, W))],
        )
    if name == "deform_roi_pool":
        return (
            lambda a, o: ops.deform_roi_pool(a, BOXES.astype(a.dtype), o, (2, 3), 1.0, 2, 0.2),
            [rng.standard_normal((2, 5, H, W)), rng.uniform(-0.7, 0.7, (K, 2, 2, 3))],
        )
    if name == "roi_pool":  # C = 11
        return (
            lambda a: ops.roi_pool(a, BOXES.astype(a.dtype), (2, 3), 1.0),
            [rng.standard_normal((2, 11, H, W))],
        )
    if name == "ps_roi_pool":  # 3 output channels, 27 input channels, 3x3 bins
        return (
            lambda a: ops.ps_roi_pool(a, BOXES.astype(a.dtype), 3, 1.0),
            [rng.standard_normal((2, 27, H, W))],
        )
    if name == "deform_ps_roi_pool":
        # output_dim 6 in 2 classes of 3 channels, group_size 2 (24 input channels), 3x3 bins
        # over 2x2 part cells: bins share offset cells, whose gradients are then summed
        return (
            lambda a, o: ops.deform_ps_roi_pool(
                a, BOXES.astype(a.dtype), o, 1.0, 6, 2, 3, 2, 2, 0.3
            ),
            [rng.standard_normal((2, 24, H, W)), rng.uniform(-1.0, 1.0, (K, 4, 2, 2))],
        )
    raise AssertionError(name)


NAMES = [
    "roi_align",
    "roi_align_unaligned",
    "ps_roi_align",
    "deform_roi_pool",
    "roi_pool",
    "ps_roi_pool",
    "deform_ps_roi_pool",
]


def _run(fn, arrays, dtype, device, weight, differentiate=None):
    """(output, gradients) of sum(fn(*arrays) * weight); ``differentiate``: how many leading
    inputs require a gradient (default all)."""
    ts = [dn.tensor(a.astype(dtype)) for a in arrays]
    if device == "cuda":
        ts = [t.to("cuda") for t in ts]
    n = len(ts) if differentiate is None else differentiate
    for t in ts[:n]:
        t.requires_grad_()
    out = fn(*ts)
    w = dn.tensor(weight.astype(dtype))
    (out * (w.to("cuda") if device == "cuda" else w)).sum().backward()
    grads = [t.grad.copy_to_host() if device == "cuda" else np.asarray(t.grad) for t in ts[:n]]
    return out.numpy(), grads


def _close(got, ref, tol, what):
    scale = max(1.0, float(np.abs(ref).max()) if ref.size else 1.0)
    np.testing.assert_allclose(got, ref, rtol=tol, atol=tol * scale, err_msg=what)


@pytest.mark.parametrize("dtype", [np.float64, np.float32], ids=["float64", "float32"])
@pytest.mark.parametrize("name", NAMES)
def test_deterministic_mode_matches_default_and_repeats_bit_for_bit(name, dtype, monkeypatch):
    rng = np.random.default_rng(7)
    fn, arrays = _case(name, rng)
    shape = fn(*[dn.tensor(a.astype(dtype)) for a in arrays]).shape
    weight = np.random.default_rng(1).standard_normal(shape)
    out_cpu, g_cpu = _run(fn, arrays, dtype, "cpu", weight)
    out_def, g_def = _run(fn, arrays, dtype, "cuda", weight)

    calls = []
    segments = cuda_roi.segments
    monkeypatch.setattr(
        cuda_roi, "segments", lambda *a: calls.append(1) or segments(*a), raising=True
    )
    dn.use_deterministic_algorithms(True)
    try:
        out_d1, g_d1 = _run(fn, arrays, dtype, "cuda", weight)
        out_d2, g_d2 = _run(fn, arrays, dtype, "cuda", weight)
    finally:
        dn.use_deterministic_algorithms(False)
    assert len(calls) == 2, "the deterministic input gradient did not go through segments"

    tol = TOL[dtype]
    _close(out_def, out_cpu, tol, "output vs CPU")
    np.testing.assert_array_equal(out_d1, out_def)  # forwards do not depend on the mode
    for i, (gc, gd, g1, g2) in enumerate(zip(g_cpu, g_def, g_d1, g_d2)):
        assert g1.dtype == dtype
        _close(gd, gc, tol, f"default gradient {i} vs CPU")
        _close(g1, gc, tol, f"deterministic gradient {i} vs CPU")
        _close(g1, gd, tol, f"deterministic vs default gradient {i}")
        np.testing.assert_array_equal(g1, g2, err_msg=f"gradient {i} differs between two runs")


def test_roi_pool_argmax_matches_the_cpu():
    # written channels-last and transposed back: the same flat plane indices, -1 for empty bins
    rng = np.random.default_rng(3)
    x = rng.standard_normal((2, 11, H, W))
    out_c, am_c = ops.roi_pool_forward(x, BOXES, (2, 3), 1.0, return_argmax=True)
    xd = dn.tensor(x).to("cuda")
    out_g, am_g = ops.roi_pool_forward(xd, BOXES, (2, 3), 1.0, return_argmax=True)
    np.testing.assert_array_equal(am_g.copy_to_host(), am_c)
    np.testing.assert_array_equal(out_g.copy_to_host(), out_c)
    assert (am_c[3] == -1).all()  # the box off the map
    # a caller's argmax of another integer type is accepted by the backward
    g = np.random.default_rng(4).standard_normal(out_c.shape)
    (gi_c,) = ops.roi_pool_backward(g, x.shape, BOXES, (2, 3), 1.0, argmax=am_c)
    (gi_g,) = ops.roi_pool_backward(
        ncuda.to_device(g),
        xd.shape,
        BOXES,
        (2, 3),
        1.0,
        argmax=ncuda.to_device(am_c.astype(np.int32)),
    )
    np.testing.assert_allclose(gi_g.copy_to_host(), gi_c, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("dtype", [np.int64, np.int32, np.int16, np.uint8])
@pytest.mark.parametrize("size", [1, 7, 300, 70_000])
def test_index_range_reduces_on_the_device(dtype, size):
    # roi_pool_backward's check of a caller's device argmax: min and max come back, not the
    # array (on a GPU 256-thread trees over up to 1024 blocks, then one block; 70 000 elements
    # fill several blocks)
    if cuda_roi.SIMULATOR and size > 300:
        pytest.skip("a long one-thread loop on the simulator; the GPU run takes it")
    rng = np.random.default_rng(size)
    lo = -1 if np.dtype(dtype).kind == "i" else 0
    a = rng.integers(lo, 200, size).astype(dtype)
    assert cuda_roi.index_range(ncuda.to_device(a)) == (int(a.min()), int(a.max()))


@pytest.mark.parametrize("value", [-2, 6])
def test_device_argmax_out_of_the_plane_is_refused(value):
    am = np.zeros((4, 11, 2, 3), np.int64)
    am[2, 5, 1, 2] = value  # one bad entry: -2, or 6 = H*W of a 2x3 map
    with pytest.raises(ValueError, match=rf"argmax must hold flat indices into the 2x3 plane, "
                       rf"in \[-1, 5\] \(-1: an empty bin\), got values in \[{min(value, 0)}, "
                       rf"{max(value, 0)}\]"):  # fmt: skip
        ops.roi_pool_backward(
            ncuda.to_device(np.ones(am.shape)), (2, 11, 2, 3), BOXES, (2, 3), 1.0,
            argmax=ncuda.to_device(am),
        )  # fmt: skip


@pytest.mark.parametrize("lanes", [2, 4])
@pytest.mark.parametrize("name", NAMES)
def test_several_lanes_per_bin(name, lanes, monkeypatch):
    # the simulator gives each bin one lane (lanes_for returns 1 there): force a GPU's layout,
    # several lanes per bin holding interleaved channels (uneven runs: C = 10, 5, 11 or 3 per
    # group), for the kernels without warp shuffles: the forwards and the atomic input
    # gradients (the offsets are constants here, so the lane_sum kernels do not run)
    monkeypatch.setattr(cuda_roi, "lanes_for", lambda channels: lanes)
    rng = np.random.default_rng(11)
    fn, arrays = _case(name, rng)
    shape = fn(*[dn.tensor(a) for a in arrays]).shape
    weight = np.random.default_rng(2).standard_normal(shape)
    out_cpu, g_cpu = _run(fn, arrays, np.float64, "cpu", weight, differentiate=1)
    out_gpu, g_gpu = _run(fn, arrays, np.float64, "cuda", weight, differentiate=1)
    _close(out_gpu, out_cpu, 1e-12, "output vs CPU")
    _close(g_gpu[0], g_cpu[0], 1e-12, "input gradient vs CPU")


def _emulated_lane_sum(block: int):
    """A Python stand-in for ``_launch.lane_sum`` under the simulator (which has no warp
    shuffles): the same butterfly, the partners' values exchanged through a dict between the
    ``block`` threads of a one-block launch. Every thread of the block must call it the same
    number of times, as real shuffles need: otherwise the barrier times out and the test fails."""
    barrier = threading.Barrier(block, timeout=120)
    vals: dict[int, float] = {}

    def lane_sum(v, lanes):
        me = threading.current_thread().threadIdx.x
        off = lanes // 2
        while off > 0:
            vals[me] = v
            barrier.wait()
            other = vals[me ^ off]
            barrier.wait()
            v = v + other
            off //= 2
        return v

    return lane_sum


@pytest.mark.parametrize("lanes", [2, 4])
@pytest.mark.parametrize("name", ["deform_roi_pool", "deform_ps_roi_pool"])
def test_offset_gradients_with_lanes_and_a_warp(name, lanes, monkeypatch):
    # a GPU's layout for the lane_sum kernels: several lanes per bin unit, one block of 32
    # threads (a warp) walking padded(units * lanes) threads (with 2 lanes the last warp is half
    # idle: 48 -> 64 and 144 -> 160 threads), lane_sum emulated (see above)
    monkeypatch.setattr(cuda_roi, "lanes_for", lambda channels: lanes)
    monkeypatch.setattr(cuda_roi, "grid", lambda total: (1, 32))
    monkeypatch.setattr(cuda_roi, "lane_sum", _emulated_lane_sum(32))
    rng = np.random.default_rng(5)
    fn, arrays = _case(name, rng)
    shape = fn(*[dn.tensor(a) for a in arrays]).shape
    weight = np.random.default_rng(6).standard_normal(shape)
    out_cpu, g_cpu = _run(fn, arrays, np.float64, "cpu", weight)
    out_gpu, g_gpu = _run(fn, arrays, np.float64, "cuda", weight)
    _close(out_gpu, out_cpu, 1e-12, "output vs CPU")
    for i, (gg, gc) in enumerate(zip(g_gpu, g_cpu)):
        _close(gg, gc, 1e-12, f"gradient {i} vs CPU")


def test_non_contiguous_device_arrays_are_refused():
    # device arrays are read in place as flat runs: a strided or Fortran-ordered one would be
    # read wrongly (or fail deep in Numba), so validation names it
    x = ncuda.to_device(np.random.default_rng(0).standard_normal((2, 3, 8, 8)))
    strided = x[:, :, ::2, :]
    with pytest.raises(ValueError, match=r"roi_align: input is a CUDA array that is not "
                       r"C-contiguous \(shape \(2, 3, 4, 8\)"):  # fmt: skip
        ops.roi_align_forward(strided, BOXES, 2, 1.0, 2, True)
    am = ncuda.to_device(np.zeros((4, 3, 2, 4), np.int64))[:, :, :, ::2]
    with pytest.raises(ValueError, match="roi_pool: argmax is a CUDA array that is not"):
        ops.roi_pool_backward(
            ncuda.to_device(np.ones((4, 3, 2, 2))), (2, 3, 8, 8), BOXES, (2, 2), 1.0, argmax=am
        )
