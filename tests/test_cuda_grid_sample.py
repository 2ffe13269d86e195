"""The CUDA kernels of grid_sample and bilinear_interpolate (kernels/cuda/{grid_sample,bilinear}.py)
against the CPU kernels, called at the array level on device arrays.

Covers what the channels-last, lanes-per-point design adds: channel counts that are not a
multiple of the lanes (and more lanes than channels), every padding mode / align_corners in
float32 (the GPU computes its coordinates and plans in float32, the CPU in float64), both border
rules, each ``needs`` alone, many points landing on the same pixels (the deterministic scatter's
segments), and the deterministic mode: the same gradients as the atomics to rounding, and
bit-identical from run to run. Under the simulator ``lanes_for`` is 1; the tests that force more
lanes skip the points gradient, whose warp shuffles the simulator cannot run.
"""

from __future__ import annotations

import numpy as np
import pytest

import deformnp as dn
from deformnp import cuda

pytestmark = pytest.mark.skipif(not cuda.is_available(), reason="numba-cuda is not installed")

if cuda.is_available():
    from numba import cuda as ncuda

    from deformnp.kernels.cpu import bilinear as cpu_bi
    from deformnp.kernels.cpu import grid_sample as cpu_gs
    from deformnp.kernels.cuda import bilinear as gpu_bi
    from deformnp.kernels.cuda import grid_sample as gpu_gs

MODES = ["zeros", "border", "reflection"]
TOL = {np.float64: 1e-12, np.float32: 1e-5}


@pytest.fixture
def deterministic():
    dn.use_deterministic_algorithms(True)
    try:
        yield
    finally:
        dn.use_deterministic_algorithms(False)


def _host(a):
    return None if a is None else a.copy_to_host()


def _close(got, ref, dtype, what=""):
    assert got.dtype == ref.dtype == dtype, what
    tol = TOL[dtype]
    scale = max(1.0, float(np.abs(ref).max(initial=0.0)))
    np.testing.assert_allclose(got, ref, rtol=tol, atol=tol * scale, err_msg=what)


def _bilinear_inputs(dtype, C=5, seed=0):
    rng = np.random.default_rng(seed)
    N, H, W, P = 2, 3, 4, 11
    x = rng.standard_normal((N, C, H, W)).astype(dtype)
    pts = np.stack([rng.uniform(-1.7, H + 0.7, (N, P)), rng.uniform(-1.7, W + 0.7, (N, P))], -1)
    pts[0, :4] = [[0.25, 0.5], [0.25, 0.5], [0.25, 0.5], [2.5, 3.5]]  # repeats: shared pixels
    go = rng.standard_normal((N, C, P)).astype(dtype)
    return x, pts.astype(dtype), go


def _grid_inputs(dtype, C=5, seed=0):
    rng = np.random.default_rng(seed)
    N, Hin, Win, Hout, Wout = 2, 3, 4, 2, 3
    x = rng.standard_normal((N, C, Hin, Win)).astype(dtype)
    g = rng.uniform(-1.4, 1.4, (N, Hout, Wout, 2))
    g[0, 0, :2] = [0.1, -0.2]  # the same point twice
    go = rng.standard_normal((N, C, Hout, Wout)).astype(dtype)
    return x, g.astype(dtype), go


def _bilinear_gpu(x, pts, go, border, needs=(True, True)):
    d = ncuda.to_device
    out = gpu_bi.bilinear_interpolate_forward(d(x), d(pts), border)
    gi, gp = gpu_bi.bilinear_interpolate_backward(d(go), d(x), d(pts), border, needs)
    return out.copy_to_host(), _host(gi), _host(gp)


def _grid_gpu(x, g, go, mode, align, needs=(True, True)):
    d = ncuda.to_device
    out = gpu_gs.grid_sample_forward(d(x), d(g), mode, align)
    gi, gg = gpu_gs.grid_sample_backward(d(go), d(x), d(g), mode, align, needs)
    return out.copy_to_host(), _host(gi), _host(gg)


def _bilinear_cpu(x, pts, go, border):
    out = cpu_bi.bilinear_interpolate_forward(x, pts, border)
    return (out, *cpu_bi.bilinear_interpolate_backward(go, x, pts, border, (True, True)))


def _grid_cpu(x, g, go, mode, align):
    out = cpu_gs.grid_sample_forward(x, g, mode, align)
    return (out, *cpu_gs.grid_sample_backward(go, x, g, mode, align, (True, True)))


def _compare(got, ref, dtype):
    for name, a, b in zip(("output", "input gradient", "position gradient"), got, ref):
        _close(a, b, dtype, name)


# ------------------------------------------------------------------ against the CPU kernels


@pytest.mark.parametrize("align", [False, True])
@pytest.mark.parametrize("mode", MODES)
def test_grid_sample_float32_matches_cpu(mode, align):
    x, g, go = _grid_inputs(np.float32, C=5)
    _compare(_grid_gpu(x, g, go, mode, align), _grid_cpu(x, g, go, mode, align), np.float32)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("border", ["zero", "clamp"])
def test_bilinear_matches_cpu(border, dtype):
    x, pts, go = _bilinear_inputs(dtype, C=5)
    _compare(_bilinear_gpu(x, pts, go, border), _bilinear_cpu(x, pts, go, border), dtype)


@pytest.mark.parametrize("needs", [(True, False), (False, True)])
def test_each_gradient_alone(needs):
    x, pts, go = _bilinear_inputs(np.float64, C=3)
    ref = _bilinear_cpu(x, pts, go, "clamp")
    got = _bilinear_gpu(x, pts, go, "clamp", needs)
    for k in (0, 1):
        if needs[k]:
            _close(got[1 + k], ref[1 + k], np.float64)
        else:
            assert got[1 + k] is None
    x, g, go = _grid_inputs(np.float64, C=3)
    ref = _grid_cpu(x, g, go, "reflection", False)
    got = _grid_gpu(x, g, go, "reflection", False, needs)
    for k in (0, 1):
        if needs[k]:
            _close(got[1 + k], ref[1 + k], np.float64)
        else:
            assert got[1 + k] is None


@pytest.mark.parametrize("lanes", [4, 8])
def test_channel_runs_of_several_lanes(monkeypatch, lanes):
    # a real GPU gives a point lanes_for(C) threads; force that under the simulator (C = 5: runs
    # of unequal length, or lanes with no channel) for the forward and the input gradient, with
    # atomics and with the deterministic scatter
    monkeypatch.setattr(gpu_bi, "lanes_for", lambda C: lanes)
    monkeypatch.setattr(gpu_gs, "lanes_for", lambda C: lanes)
    x, pts, go = _bilinear_inputs(np.float64, C=5)
    ref = _bilinear_cpu(x, pts, go, "zero")
    x2, g, go2 = _grid_inputs(np.float64, C=5)
    ref2 = _grid_cpu(x2, g, go2, "border", True)
    for det in (False, True):
        dn.use_deterministic_algorithms(det)
        try:
            got = _bilinear_gpu(x, pts, go, "zero", (True, False))
            got2 = _grid_gpu(x2, g, go2, "border", True, (True, False))
        finally:
            dn.use_deterministic_algorithms(False)
        for a, b in zip(got[:2], ref[:2]):
            _close(a, b, np.float64)
        for a, b in zip(got2[:2], ref2[:2]):
            _close(a, b, np.float64)


# ------------------------------------------------------------------ deterministic mode


def test_deterministic_grid_sample_equals_default_and_repeats(deterministic):
    for mode, align in (("zeros", False), ("reflection", True)):
        x, g, go = _grid_inputs(np.float32, C=3, seed=1)
        first = _grid_gpu(x, g, go, mode, align)
        second = _grid_gpu(x, g, go, mode, align)
        for a, b in zip(first, second):
            assert np.array_equal(a, b)
        dn.use_deterministic_algorithms(False)
        default = _grid_gpu(x, g, go, mode, align)
        dn.use_deterministic_algorithms(True)
        _compare(first, default, np.float32)


def test_deterministic_bilinear_equals_default_and_repeats(deterministic):
    for border in ("zero", "clamp"):
        x, pts, go = _bilinear_inputs(np.float32, C=6, seed=2)
        first = _bilinear_gpu(x, pts, go, border)
        second = _bilinear_gpu(x, pts, go, border)
        for a, b in zip(first, second):
            assert np.array_equal(a, b)
        dn.use_deterministic_algorithms(False)
        default = _bilinear_gpu(x, pts, go, border)
        dn.use_deterministic_algorithms(True)
        _compare(first, default, np.float32)
        _compare(first, _bilinear_cpu(x, pts, go, border), np.float32)


def test_empty_map_and_no_channels():
    d = ncuda.to_device
    x = np.zeros((1, 2, 0, 3))
    pts = np.zeros((1, 4, 2))
    assert np.array_equal(
        gpu_bi.bilinear_interpolate_forward(d(x), d(pts), "zero").copy_to_host(),
        np.zeros((1, 2, 4)),
    )
    gi, gp = gpu_bi.bilinear_interpolate_backward(
        d(np.ones((1, 2, 4))), d(x), d(pts), "zero", (True, True)
    )
    assert gi.shape == x.shape and np.array_equal(gp.copy_to_host(), np.zeros((1, 4, 2)))
    x = np.zeros((1, 0, 3, 3))
    g = np.zeros((1, 2, 2, 2))
    gi, gg = gpu_gs.grid_sample_backward(
        d(np.zeros((1, 0, 2, 2))), d(x), d(g), "zeros", False, (True, True)
    )
    assert gi.shape == x.shape and np.array_equal(gg.copy_to_host(), np.zeros(g.shape))
