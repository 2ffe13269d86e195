"""The CUDA backend against the CPU kernels, through the public API.

Runs under Numba's CUDA simulator on every test run (tests/conftest.py switches it on unless
``DEFORMNP_REAL_GPU=1``), so CI without a GPU exercises every CUDA kernel; the same tests run
unchanged on a real GPU. Shapes are tiny: the simulator runs one OS thread per CUDA thread.

Every deformable op is run on tensors moved with ``Tensor.to("cuda")``; the loss is formed on
the device (mul by a device weight, sum), ``backward()`` runs there, and the output and every
gradient must equal the CPU's (1e-12 relative in float64, 1e-5 in float32) and stay on the device.
"""

from __future__ import annotations

import numpy as np
import pytest

import deformnp as dn
from deformnp import cuda, ops
from deformnp.cases import check_cases
from deformnp.cases.inputs import fractional
from deformnp.cuda import is_cuda_array

pytestmark = pytest.mark.skipif(not cuda.is_available(), reason="numba-cuda is not installed")

DTYPES = [np.float64, np.float32]
TOL = {np.float64: 1e-12, np.float32: 1e-5}


CUDA_CASES = [c for c in check_cases() if c.cuda]


def _run(case, dtype, device, weight):
    ts = case.inputs(dtype, device)
    out = case.fn(*ts)
    w = dn.tensor(weight.astype(dtype))
    loss = (out * (w.to("cuda") if device == "cuda" else w)).sum()
    loss.backward()
    return out, [t.grad for t in ts]


@pytest.mark.parametrize("dtype", DTYPES, ids=["float64", "float32"])
@pytest.mark.parametrize("case", CUDA_CASES, ids=lambda c: c.name)
def test_cuda_matches_cpu(case, dtype):
    # every case of the check table that runs on CUDA tensors (deformnp.cases.check)
    out_cpu = case.fn(*case.inputs(dtype))
    weight = np.random.default_rng(1).standard_normal(out_cpu.shape)
    out_cpu, g_cpu = _run(case, dtype, "cpu", weight)
    out_gpu, g_gpu = _run(case, dtype, "cuda", weight)
    grads = range(len(case.arrays))

    assert out_gpu.device == "cuda" and out_gpu.dtype == dtype
    tol = TOL[dtype]
    ref = out_cpu.numpy()
    np.testing.assert_allclose(out_gpu.numpy(), ref, rtol=tol, atol=tol * max(1, np.abs(ref).max()))
    for i, (gc, gg) in zip(grads, zip(g_cpu, g_gpu)):
        assert is_cuda_array(gg), f"gradient of input {i} left the device"
        gg = gg.copy_to_host()
        assert gg.dtype == dtype
        scale = max(1.0, float(np.abs(gc).max()))
        np.testing.assert_allclose(gg, gc, rtol=tol, atol=tol * scale, err_msg=f"input {i}")


def test_to_and_back_is_differentiable():
    x = dn.tensor(np.arange(6.0).reshape(2, 3), requires_grad=True)
    y = x.to("cuda")
    assert y.device == "cuda" and is_cuda_array(y.data)
    z = (y * 3.0 - 1.0).to("cpu")
    assert z.device == "cpu"
    z.sum().backward()
    np.testing.assert_array_equal(x.grad, np.full((2, 3), 3.0))


@pytest.mark.parametrize("dtype", DTYPES, ids=["float64", "float32"])
def test_loss_ops_on_device(dtype):
    rng = np.random.default_rng(3)
    a_np, b_np = (
        rng.uniform(0.5, 2, (2, 3)).astype(dtype),
        rng.uniform(0.5, 2, (2, 3)).astype(dtype),
    )

    def loss(a, b):
        return ((a + b) * a - b / a + 2.0 / b - (1.0 - a) * 0.5 + (-b)).mean() + (a / 3.0).sum()

    a, b = dn.tensor(a_np, requires_grad=True), dn.tensor(b_np, requires_grad=True)
    ref = loss(a, b)
    ref.backward()
    ad = dn.tensor(a_np).to("cuda").requires_grad_()
    bd = dn.tensor(b_np).to("cuda").requires_grad_()
    got = loss(ad, bd)
    assert got.device == "cuda" and got.shape == ()
    got.backward()
    tol = TOL[dtype]
    np.testing.assert_allclose(got.item(), ref.item(), rtol=tol)
    np.testing.assert_allclose(ad.grad.copy_to_host(), a.grad, rtol=tol, atol=tol)
    np.testing.assert_allclose(bd.grad.copy_to_host(), b.grad, rtol=tol, atol=tol)


def test_backward_accepts_a_host_gradient():
    x = dn.tensor(np.ones((2, 2))).to("cuda").requires_grad_()
    y = x * 2.0
    y.backward(np.full((2, 2), 0.5))
    np.testing.assert_array_equal(x.grad.copy_to_host(), np.ones((2, 2)))


def test_array_level_functions_take_device_arrays():
    from numba import cuda as ncuda

    rng = np.random.default_rng(0)
    x = rng.standard_normal((1, 2, 4, 4))
    pts = fractional(rng, 0, 3, (1, 5, 2))
    out = ops.bilinear_interpolate_forward(ncuda.to_device(x), ncuda.to_device(pts))
    assert is_cuda_array(out)
    np.testing.assert_allclose(
        out.copy_to_host(), ops.bilinear_interpolate_forward(x, pts), rtol=1e-12
    )


def test_other_generic_ops_refuse_cuda_tensors_by_name():
    x = dn.tensor(np.ones((2, 3))).to("cuda")
    with pytest.raises(TypeError, match=r"exp: not implemented for CUDA tensors.*to\('cpu'\)"):
        x.exp()
    with pytest.raises(TypeError, match="matmul: not implemented for CUDA tensors"):
        x @ dn.tensor(np.ones((3, 2))).to("cuda")
    with pytest.raises(ValueError, match="sum: on CUDA tensors only the full reduction"):
        x.sum(0)
    with pytest.raises(ValueError, match="add: CUDA operands must have the same shape"):
        x + dn.tensor(np.ones(3)).to("cuda")
    with pytest.raises(ValueError, match="mul: a CUDA tensor can be combined"):
        x * dn.tensor(np.ones((2, 3)))


def test_mixing_devices_in_one_op_is_an_error():
    x = dn.tensor(np.ones((1, 1, 3, 3))).to("cuda")
    with pytest.raises(ValueError, match="bilinear_interpolate: all inputs must be on the same"):
        ops.bilinear_interpolate(x, np.ones((1, 2, 2)))


def test_reflection_padding_runs_on_cuda():
    # the coordinate rule is one function compiled for both devices (kernels/rules.py), so CUDA
    # has every padding mode (the check table's reflection cases compare gradients too)
    rng = np.random.default_rng(0)
    x = rng.standard_normal((1, 2, 3, 4))
    g = rng.uniform(-3, 3, (1, 5, 2, 2))
    g[0, 0] = [[np.nan, 0.2], [np.inf, -np.inf]]
    for align in (False, True):
        cpu = ops.grid_sample(x, g, padding_mode="reflection", align_corners=align).numpy()
        gpu = ops.grid_sample(
            dn.tensor(x).to("cuda"), dn.tensor(g).to("cuda"), padding_mode="reflection",
            align_corners=align,
        )  # fmt: skip
        np.testing.assert_allclose(gpu.numpy(), cpu, rtol=1e-12, atol=1e-12)


def test_bench_builders_skip_the_simulator_and_keep_cpu_arrays():
    from numba import config

    from deformnp.cases.bench import OPS, bench_cases, bench_device

    x = np.ones(3, np.float32)
    assert bench_device("cpu", x) == ((x,), None)
    if getattr(config, "ENABLE_CUDASIM", False):
        assert bench_device("cuda", x) is None
        for name in OPS:
            assert bench_cases(name, "cuda") == [], name
