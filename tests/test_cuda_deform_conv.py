"""CUDA deform_conv2d as deformable im2col + tiled GEMM (``kernels/cuda/deform_conv.py``,
``kernels/cuda/gemm.py``): the GEMM against NumPy, chunking, groups and the deterministic mode.

Run under Numba's CUDA simulator (see conftest) on tiny shapes.
"""

from __future__ import annotations

import numpy as np
import pytest

import deformnp as dn
from deformnp import cuda, ops

pytestmark = pytest.mark.skipif(not cuda.is_available(), reason="numba-cuda is not installed")


def _gemm_modules():
    from deformnp.kernels.cuda import deform_conv, gemm

    return deform_conv, gemm


# ------------------------------------------------------------------ the GEMM


def _gemm_case(rng, mode, M, N, Kd, batches, dtype):
    """Flat operands for C[z] = op(A[z]) @ op(B[z]) with the storage of ``mode``."""
    a_store = (Kd, M) if mode == "tn" else (M, Kd)
    b_store = (N, Kd) if mode == "nt" else (Kd, N)
    a = rng.standard_normal((batches, *a_store)).astype(dtype)
    b = rng.standard_normal((batches, *b_store)).astype(dtype)
    ea = np.swapaxes(a, 1, 2) if mode == "tn" else a
    eb = np.swapaxes(b, 1, 2) if mode == "nt" else b
    return a, b, ea @ eb


@pytest.mark.parametrize("tile, reg", [(1, 1), (2, 2), (3, 1)], ids=["1x1", "2x2reg2", "3x3"])
@pytest.mark.parametrize("mode", ["nn", "tn", "nt"])
def test_gemm_matches_numpy(mode, tile, reg):
    from numba import cuda as ncuda

    _, gemm = _gemm_modules()
    rng = np.random.default_rng(7)
    M, N, Kd, batches = 5, 7, 9, 2  # not multiples of any tile
    for dtype in (np.float64, np.float32):
        kernel = gemm.make_gemm(tile, reg)
        a, b, expected = _gemm_case(rng, mode, M, N, Kd, batches, dtype)
        av = gemm.view(a.shape[2], 0, a[0].size, transpose=mode == "tn")
        bv = gemm.view(b.shape[2], 0, b[0].size, transpose=mode == "nt")
        # C written into the middle of a larger buffer, with a leading dimension > N
        ld, off = N + 3, 4
        c = np.full(off + batches * M * ld, 99.0, dtype)
        cv = gemm.view(ld, off, M * ld)
        da, db, dc = ncuda.to_device(a.ravel()), ncuda.to_device(b.ravel()), ncuda.to_device(c)
        gemm.gemm(da, db, dc, M, N, Kd, av, bv, cv, batches, False, kernel, tile, reg)
        got = dc.copy_to_host()
        tol = 1e-12 if dtype == np.float64 else 1e-5
        body = got[off:].reshape(batches, M, ld)
        np.testing.assert_allclose(body[:, :, :N], expected, rtol=tol, atol=tol)
        assert (got[:off] == 99).all() and (body[:, :, N:] == 99).all()  # nothing else written
        # accumulate: C += A @ B
        gemm.gemm(da, db, dc, M, N, Kd, av, bv, cv, batches, True, kernel, tile, reg)
        body = dc.copy_to_host()[off:].reshape(batches, M, ld)
        np.testing.assert_allclose(body[:, :, :N], 2 * expected, rtol=tol, atol=tol)


def test_gemm_edge_sizes():
    from numba import cuda as ncuda

    _, gemm = _gemm_modules()
    rng = np.random.default_rng(3)
    kernel = gemm.make_gemm(2, 2)
    for M, N, Kd in [(1, 1, 1), (1, 6, 5), (6, 1, 4), (4, 4, 4), (3, 5, 0)]:
        a = rng.standard_normal((M, Kd))
        b = rng.standard_normal((Kd, N))
        dc = ncuda.to_device(np.full(M * N, 5.0))
        gemm.gemm(
            ncuda.to_device(a.ravel()), ncuda.to_device(b.ravel()), dc, M, N, Kd,
            gemm.view(Kd), gemm.view(N), gemm.view(N), 1, False, kernel, 2, 2,
        )  # fmt: skip
        np.testing.assert_allclose(dc.copy_to_host().reshape(M, N), a @ b, rtol=1e-12, atol=1e-12)


def _cublas_or_skip(monkeypatch):
    _, gemm = _gemm_modules()
    monkeypatch.setenv(gemm.GEMM_ENV, "auto")
    if gemm.backend() != "cublas":
        pytest.skip("cuBLAS through CuPy needs a GPU and CuPy (the Numba GEMM ran instead)")
    return gemm


@pytest.mark.parametrize("mode", ["nn", "tn", "nt"])
def test_cublas_gemm_matches_numpy(mode, monkeypatch):
    # the CuPy views of the flat operands: transposed storage, batches, a C with ld > N inside a
    # larger buffer (assigned) or contiguous (written in place), accumulate, an empty reduction
    from numba import cuda as ncuda

    gemm = _cublas_or_skip(monkeypatch)
    rng = np.random.default_rng(8)
    cases = [((5, 7, 9, 2), 10, 4), ((33, 65, 130, 3), 65, 0)]
    cases += [((17, 40, 33, 1), 40, 0), ((6, 9, 11, 1), 12, 3)]  # one batch: the 2-D matmul
    for (M, N, Kd, batches), ld, off in cases:
        for dtype in (np.float64, np.float32):
            a, b, expected = _gemm_case(rng, mode, M, N, Kd, batches, dtype)
            av = gemm.view(a.shape[2], 0, a[0].size, transpose=mode == "tn")
            bv = gemm.view(b.shape[2], 0, b[0].size, transpose=mode == "nt")
            c = np.full(off + batches * M * ld, 99.0, dtype)
            cv = gemm.view(ld, off, M * ld)
            da, db, dc = (ncuda.to_device(x.ravel()) for x in (a, b, c))
            tol = 1e-12 if dtype == np.float64 else 1e-5
            for accumulate, factor in [(False, 1), (True, 2)]:
                gemm.gemm(da, db, dc, M, N, Kd, av, bv, cv, batches, accumulate)
                got = dc.copy_to_host()
                body = got[off:].reshape(batches, M, ld)
                np.testing.assert_allclose(
                    body[:, :, :N], factor * expected, rtol=tol, atol=tol * Kd
                )
                assert (got[:off] == 99).all() and (body[:, :, N:] == 99).all()
    dc = ncuda.to_device(np.full(6, 5.0))
    empty = ncuda.to_device(np.zeros(1))
    gemm.gemm(empty, empty, dc, 2, 3, 0, gemm.view(0), gemm.view(3), gemm.view(3), 1, True)
    assert (dc.copy_to_host() == 5.0).all()  # C += (empty sum): unchanged
    gemm.gemm(empty, empty, dc, 2, 3, 0, gemm.view(0), gemm.view(3), gemm.view(3), 1, False)
    assert (dc.copy_to_host() == 0.0).all()


def test_gemm_backend_switch(monkeypatch):
    _, gemm = _gemm_modules()
    monkeypatch.setenv(gemm.GEMM_ENV, "numba")
    assert gemm.backend() == "numba"
    monkeypatch.setenv(gemm.GEMM_ENV, "blas")
    with pytest.raises(ValueError, match="DEFORMNP_CUDA_GEMM must be auto, numba or cublas"):
        gemm.backend()
    monkeypatch.setenv(gemm.GEMM_ENV, "cublas")
    if gemm.SIMULATOR or gemm._cupy() is None:
        with pytest.raises(RuntimeError, match="cublas needs a GPU and CuPy"):
            gemm.backend()
    else:
        assert gemm.backend() == "cublas"


def test_gemm_refuses_overlapping_batches_of_c():
    from numba import cuda as ncuda

    _, gemm = _gemm_modules()
    d = ncuda.to_device(np.ones(4))
    with pytest.raises(ValueError, match="C's batch stride is 0 with several batches"):
        gemm.gemm(d, d, d, 2, 2, 1, gemm.view(1), gemm.view(2), gemm.view(2, 0, 0), batches=2)


# ------------------------------------------------------------------ deform_conv2d


def _case(rng, B, Cin, H, W, Cout, kh, kw, g, G, stride, padding, dilation, mask, bias):
    Ho = (H + 2 * padding - (dilation * (kh - 1) + 1)) // stride + 1
    Wo = (W + 2 * padding - (dilation * (kw - 1) + 1)) // stride + 1
    K = kh * kw
    x = rng.standard_normal((B, Cin, H, W))
    off = rng.uniform(-1.7, 1.7, (B, 2 * G * K, Ho, Wo)) + 0.123  # off the kinks
    w = rng.standard_normal((Cout, Cin // g, kh, kw))
    b = rng.standard_normal(Cout) if bias else None
    m = rng.uniform(0.1, 1.0, (B, G * K, Ho, Wo)) if mask else None
    gout = rng.standard_normal((B, Cout, Ho, Wo))
    return dict(x=x, off=off, w=w, b=b, m=m, gout=gout, geo=(stride, padding, dilation))


def _run(c, dtype, device):
    """Forward and all gradients of one case; host arrays."""
    ts = {}
    for name in ("x", "off", "w", "b", "m"):
        if c[name] is not None:
            t = dn.tensor(c[name].astype(dtype))
            if device == "cuda":
                t = t.to("cuda")
            ts[name] = t.requires_grad_()
    st, pd, dl = c["geo"]
    out = ops.deform_conv2d(ts["x"], ts["off"], ts["w"], ts.get("b"), st, pd, dl, ts.get("m"))
    gw = dn.tensor(c["gout"].astype(dtype))
    if device == "cuda":
        gw = gw.to("cuda")
    (out * gw).sum().backward()
    host = [out.numpy()]
    for name in ("x", "off", "w", "b", "m"):
        if name in ts:
            gr = ts[name].grad
            host.append(gr.copy_to_host() if device == "cuda" else np.asarray(gr))
    return host


def _close(got, ref, dtype):
    tol = 1e-12 if dtype == np.float64 else 1e-5
    for i, (a, r) in enumerate(zip(got, ref)):
        scale = max(1.0, float(np.abs(r).max())) if r.size else 1.0
        np.testing.assert_allclose(a, r, rtol=tol, atol=tol * scale, err_msg=f"result {i}")


@pytest.fixture
def deterministic():
    dn.use_deterministic_algorithms(True)
    try:
        yield
    finally:
        dn.use_deterministic_algorithms(False)


# 3 weight groups (2 channels each) and 2 offset groups (3 channels each): offset group 0 spans
# weight groups 0 and 1; padding, v2 + bias; Hout*Wout = 5*4
GROUPED = dict(B=2, Cin=6, H=4, W=3, Cout=3, kh=2, kw=2, g=3, G=2, stride=1, padding=1,
               dilation=1, mask=True, bias=True)  # fmt: skip


def test_grouped_offset_groups_match_cpu(rng):
    c = _case(rng, **GROUPED)
    for dtype in (np.float64, np.float32):
        _close(_run(c, dtype, "cuda"), _run(c, dtype, "cpu"), dtype)


@pytest.mark.parametrize("backend", ["numba", "auto"])
def test_both_gemm_backends_match_cpu(rng, monkeypatch, backend):
    # on a GPU with CuPy "auto" runs cuBLAS; "numba" keeps the tiled kernel tested there too
    _, gemm = _gemm_modules()
    monkeypatch.setenv(gemm.GEMM_ENV, backend)
    c = _case(rng, **GROUPED)
    for dtype in (np.float64, np.float32):
        _close(_run(c, dtype, "cuda"), _run(c, dtype, "cpu"), dtype)


def test_chunks_equal_one_chunk(rng, monkeypatch):
    """A column bound of a few pixels splits the B*Hout*Wout pixels into many chunks, some of
    them spanning two batch items: the results equal the single-chunk run (and the CPU)."""
    dc, _ = _gemm_modules()
    c = _case(rng, **GROUPED)
    one = _run(c, np.float64, "cuda")
    cin, K, cout = GROUPED["Cin"], GROUPED["kh"] * GROUPED["kw"], GROUPED["Cout"]
    # 7 pixels per forward chunk (Hout*Wout = 5*4 = 20: chunks straddle the batch boundary)
    monkeypatch.setattr(dc, "COLUMN_BYTES", 7 * (cin * K + cout) * 8)
    assert dc._chunk_pixels(40, (cin * K + cout) * 8) == 7
    many = _run(c, np.float64, "cuda")
    _close(many, one, np.float64)
    _close(many, _run(c, np.float64, "cpu"), np.float64)


def test_deterministic_mode(rng, deterministic, monkeypatch):
    """Without atomics: equal to the default (atomic) mode to rounding, bit-identical twice,
    also with several chunks."""
    dc, _ = _gemm_modules()
    c = _case(rng, **GROUPED)
    for dtype in (np.float32, np.float64):
        first = _run(c, dtype, "cuda")
        second = _run(c, dtype, "cuda")
        for a, b in zip(first, second):
            assert a.tobytes() == b.tobytes()
        dn.use_deterministic_algorithms(False)
        default = _run(c, dtype, "cuda")
        dn.use_deterministic_algorithms(True)
        _close(first, default, dtype)
    monkeypatch.setattr(dc, "COLUMN_BYTES", 1)  # one pixel per chunk
    chunked = _run(c, np.float64, "cuda")
    _close(chunked, _run(c, np.float64, "cpu"), np.float64)


def test_no_mask_no_bias_and_empty_map(rng):
    c = _case(rng, B=1, Cin=2, H=3, W=3, Cout=2, kh=3, kw=1, g=1, G=1, stride=2, padding=1,
              dilation=1, mask=False, bias=False)  # fmt: skip
    _close(_run(c, np.float32, "cuda"), _run(c, np.float32, "cpu"), np.float32)
    # an empty input map (H = 0, padding gives a non-empty output): bias only, zero gradients
    c = _case(rng, B=1, Cin=1, H=0, W=2, Cout=2, kh=1, kw=1, g=1, G=1, stride=1, padding=1,
              dilation=1, mask=True, bias=True)  # fmt: skip
    _close(_run(c, np.float64, "cuda"), _run(c, np.float64, "cpu"), np.float64)


@pytest.mark.parametrize("deterministic_mode", [False, True], ids=["atomic", "deterministic"])
def test_partial_needs(rng, deterministic_mode):
    """Each gradient alone (the backward skips what is not needed) equals the CPU's."""
    from numba import cuda as ncuda

    c = _case(rng, **GROUPED)
    args = [c[n] for n in ("x", "off", "w", "b")]
    st, pd, dl = c["geo"]
    cpu = ops.deform_conv2d_backward(c["gout"], *args, st, pd, dl, c["m"])
    dev = [ncuda.to_device(a) for a in (c["gout"], *args, c["m"])]
    dn.use_deterministic_algorithms(deterministic_mode)
    try:
        for i in range(5):
            needs = tuple(j == i for j in range(5))
            got = ops.deform_conv2d_backward(*dev[:5], st, pd, dl, dev[5], needs=needs)
            for j, g in enumerate(got):
                if j != i:
                    assert g is None
                    continue
                np.testing.assert_allclose(g.copy_to_host(), cpu[i], rtol=1e-12, atol=1e-12)
    finally:
        dn.use_deterministic_algorithms(False)


def test_stream_handle_of_either_binding():
    # the cuBLAS products launch on Numba's default stream: its handle as an int, whether the
    # driver binding gives a ctypes pointer or a cuda-bindings CUstream (0: the legacy stream)
    import ctypes
    from types import SimpleNamespace

    _, gemm = _gemm_modules()
    assert gemm._stream_handle(SimpleNamespace(handle=ctypes.c_void_p(None))) == 0
    assert gemm._stream_handle(SimpleNamespace(handle=ctypes.c_void_p(2))) == 2
    driver = pytest.importorskip("cuda.bindings.driver")
    assert gemm._stream_handle(SimpleNamespace(handle=driver.CUstream(0))) == 0
    assert gemm._stream_handle(SimpleNamespace(handle=driver.CUstream(2))) == 2
