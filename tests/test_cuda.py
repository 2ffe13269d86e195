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
from deformnp.cuda import is_cuda_array

pytestmark = pytest.mark.skipif(not cuda.is_available(), reason="numba-cuda is not installed")

DTYPES = [np.float64, np.float32]
TOL = {np.float64: 1e-12, np.float32: 1e-5}


def _frac(rng: np.random.Generator, lo: int, hi: int, shape: tuple) -> np.ndarray:
    """Integers in [lo, hi) plus fractional parts in [0.1, 0.9]: off the bilinear kinks."""
    return rng.integers(lo, hi, shape) + rng.uniform(0.1, 0.9, shape)


def _cases(rng: np.random.Generator) -> list:
    """(name, fn(*tensors), arrays, indices of the arrays that require grad)."""
    x = rng.standard_normal((2, 4, 5, 6))
    boxes = np.array([[0, 0.4, 0.6, 4.3, 3.7], [1, -1.5, 1.2, 6.5, 5.6], [1, 2.2, 0.3, 3.1, 2.9]])
    shapes = np.array([[3, 4], [2, 2], [1, 1]], np.int64)
    starts = np.array([0, 12, 16], np.int64)
    cases = [
        (
            "bilinear_interpolate zero",
            lambda a, p: ops.bilinear_interpolate(a, p, "zero"),
            [x, np.stack([_frac(rng, -1, 5, (2, 7)), _frac(rng, -1, 6, (2, 7))], -1)],
            (0, 1),
        ),
        (
            "bilinear_interpolate clamp",
            lambda a, p: ops.bilinear_interpolate(a, p, "clamp"),
            [x, np.stack([_frac(rng, -1, 5, (2, 7)), _frac(rng, -1, 6, (2, 7))], -1)],
            (0, 1),
        ),
        (
            "grid_sample zeros",
            lambda a, g: ops.grid_sample(a, g, padding_mode="zeros", align_corners=False),
            [x, rng.uniform(-1.2, 1.2, (2, 3, 4, 2))],
            (0, 1),
        ),
        (
            "grid_sample border",
            lambda a, g: ops.grid_sample(a, g, padding_mode="border", align_corners=True),
            [x, rng.uniform(-1.2, 1.2, (2, 3, 4, 2))],
            (0, 1),
        ),
        (
            "deform_conv2d v2, groups 2, offset groups 2",
            lambda a, o, w, b, m: ops.deform_conv2d(
                a, o, w, b, stride=(1, 2), padding=1, dilation=(2, 1), mask=m
            ),
            [
                x,
                _frac(rng, -2, 2, (2, 2 * 2 * 6, 5, 3)),
                rng.standard_normal((6, 2, 2, 3)),
                rng.standard_normal(6),
                rng.uniform(0, 1, (2, 2 * 6, 5, 3)),
            ],
            (0, 1, 2, 3, 4),
        ),
        (
            "deform_conv2d v1",
            lambda a, o, w: ops.deform_conv2d(a, o, w, padding=1),
            [x, _frac(rng, -2, 2, (2, 18, 5, 6)), rng.standard_normal((3, 4, 3, 3))],
            (0, 1, 2),
        ),
        (
            "roi_align",
            lambda a: ops.roi_align(
                a, boxes.astype(a.dtype), (2, 3), 0.9, sampling_ratio=-1, aligned=True
            ),
            [x],
            (0,),
        ),
        ("roi_pool", lambda a: ops.roi_pool(a, boxes.astype(a.dtype), 2, 1.0), [x], (0,)),
        (
            "ps_roi_align",
            lambda a: ops.ps_roi_align(a, boxes.astype(a.dtype), 2, 1.0, sampling_ratio=2),
            [x],
            (0,),
        ),
        ("ps_roi_pool", lambda a: ops.ps_roi_pool(a, boxes.astype(a.dtype), 2, 1.0), [x], (0,)),
        (
            "deform_roi_pool",
            lambda a, o: ops.deform_roi_pool(
                a, boxes.astype(a.dtype), o, 2, 1.0, sampling_ratio=2, gamma=0.1
            ),
            [x, rng.uniform(-0.5, 0.5, (3, 2, 2, 2))],
            (0, 1),
        ),
        (
            "deform_ps_roi_pool",
            lambda a, o: ops.deform_ps_roi_pool(
                a,
                boxes.astype(a.dtype),
                o,
                1.0,
                output_dim=1,
                group_size=2,
                pooled_size=2,
                part_size=2,
                sample_per_part=2,
                trans_std=0.1,
            ),
            [x, rng.uniform(-0.5, 0.5, (3, 2, 2, 2))],
            (0, 1),
        ),
        (
            "ms_deform_attn",
            lambda v, loc, a: ops.ms_deform_attn(v, shapes, starts, loc, a),
            [
                rng.standard_normal((2, 17, 2, 3)),
                rng.uniform(-0.1, 1.1, (2, 4, 2, 3, 2, 2)),
                rng.uniform(0, 1, (2, 4, 2, 3, 2)),
            ],
            (0, 1, 2),
        ),
    ]
    return cases


CASE_NAMES = [c[0] for c in _cases(np.random.default_rng(0))]


def _run(fn, arrays, grads, dtype, device, weight):
    ts = []
    for i, a in enumerate(arrays):
        t = dn.tensor(a.astype(dtype), requires_grad=i in grads)
        if device == "cuda":
            leaf = dn.tensor(a.astype(dtype)).to("cuda").requires_grad_(i in grads)
            t = leaf
        ts.append(t)
    out = fn(*ts)
    w = dn.tensor(weight.astype(dtype))
    loss = (out * (w.to("cuda") if device == "cuda" else w)).sum()
    loss.backward()
    return out, [ts[i].grad for i in grads]


@pytest.mark.parametrize("dtype", DTYPES, ids=["float64", "float32"])
@pytest.mark.parametrize("name", CASE_NAMES)
def test_cuda_matches_cpu(name, dtype):
    rng = np.random.default_rng(7)
    case = {c[0]: c for c in _cases(rng)}[name]
    _, fn, arrays, grads = case
    out_cpu, g_cpu = _run(fn, arrays, grads, dtype, "cpu", np.ones(1))
    weight = np.random.default_rng(1).standard_normal(out_cpu.shape)
    out_cpu, g_cpu = _run(fn, arrays, grads, dtype, "cpu", weight)
    out_gpu, g_gpu = _run(fn, arrays, grads, dtype, "cuda", weight)

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
    pts = _frac(rng, 0, 3, (1, 5, 2))
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


def test_reflection_padding_is_cpu_only():
    x = dn.tensor(np.ones((1, 1, 3, 3))).to("cuda")
    g = dn.tensor(np.zeros((1, 2, 2, 2))).to("cuda")
    with pytest.raises(ValueError, match="reflection.*CPU only"):
        ops.grid_sample(x, g, padding_mode="reflection")


def test_bench_builders_skip_the_simulator_and_keep_cpu_arrays():
    from numba import config

    from deformnp.registry import bench_device, registered_ops

    x = np.ones(3, np.float32)
    assert bench_device("cpu", x) == ((x,), None)
    if getattr(config, "ENABLE_CUDASIM", False):
        assert bench_device("cuda", x) is None
        for name, entry in registered_ops().items():
            if entry.bench is not None:
                assert entry.bench("cuda") is None, name
