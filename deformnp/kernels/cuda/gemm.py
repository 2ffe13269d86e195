"""A tiled shared-memory matrix multiply for the CUDA kernels (``deform_conv``'s im2col GEMMs).

:func:`gemm` computes, for every batch index ``z`` in ``[0, batches)``,

    C[z] = A[z] @ B[z]        or, with ``accumulate``,   C[z] += A[z] @ B[z]

with A[z] (M x Kd), B[z] (Kd x N), C[z] (M x N) *strided views* of flat device arrays: a view is
``(offset, batch_stride, row_stride, col_stride)`` and element (r, c) of matrix z lies at
``offset + z*batch_stride + r*row_stride + c*col_stride``. :func:`view` builds the view of a
row-major matrix block with leading dimension ``ld``, transposed or not, so A @ B, A^T @ B and
A @ B^T are the same kernel with other strides. The batch index serves weight groups (one matrix
per group) or any other stack of equal-shaped products.

**Tiling.** A block of TILE x TILE threads computes one BM x BN block of C, BM = BN = TILE * REG:
thread (ty, tx) holds the REG x REG outputs (ty + u*TILE, tx + v*TILE) in registers. The block
walks the reduction in steps of BK = TILE: it stages the A block (BM x BK) and the B block
(BK x BN) in shared memory (``cuda.shared.array``, rows padded by one element against bank
conflicts), each thread loading REG elements of each, with consecutive threads walking the
operand's unit-stride dimension (coalesced whichever the transposition); ``cuda.syncthreads()``;
then every thread does BK * REG * REG multiply-adds from shared memory (2 * REG shared loads per
REG * REG FMAs). Elements outside the matrices are staged as zeros and never written (any M, N,
Kd, including Kd = 0, which writes zeros, or leaves C as is with ``accumulate``). The blocks walk
the (batch, row block, column block) tiles with a 64-bit grid-stride loop that is uniform within a
block, so every thread reaches every barrier.

On a GPU TILE = 16 (256 threads) and REG = 4 (64 x 64 blocks of C). Under Numba's simulator
every launch is one thread (see ``_launch``), so there TILE = REG = 1: the same code, with
1 x 1 tiles, whose barriers are compiled out (a one-thread block needs none, and each simulated
barrier costs a thread switch). :func:`make_gemm` builds the kernel for any (TILE, REG),
which the tests use to run real multi-thread tiles, barriers included, on the simulator.

**Determinism and precision.** Each element of C has one writer, which sums the reduction in
increasing order: results are bit-reproducible. A float32 GEMM accumulates in float32 and a
float64 GEMM in float64 (the shared and register arrays take the dtype of C, all three operands
having one dtype).

**cuBLAS through CuPy.** Where `CuPy <https://cupy.dev>`_ is installed (and loads cuBLAS),
:func:`gemm` hands the same strided views to ``cupy.matmul``, one 2-D product per batch
(zero-copy, through ``__cuda_array_interface__``; launched on Numba's default stream, where the
kernels before and after it run, whatever CuPy's current stream), which runs cuBLAS: on an H200, deform_conv2d B=16, 256->256, 64x64, 3x3 took 9.3 ms forward and 36.9 ms
forward+backward with the tiled kernel above, 4.2 and 13.3 ms with cuBLAS (torchvision: 2.7 and
14.6; benches/RESULTS.md). CuPy's float32 matmul computes in float32 (no TF32 unless ``CUPY_TF32=1`` is set),
and cuBLAS gives the same bits for the same call on the same GPU. The environment variable
``DEFORMNP_CUDA_GEMM`` chooses: ``auto`` (the default: cuBLAS when CuPy imports and loads it),
``numba`` (always the kernel above) or ``cublas`` (a GPU and CuPy required); it is read at every
call. Operands that are not unit-stride flat arrays take the Numba kernel.
"""

from __future__ import annotations

import ctypes
import os
from typing import Any

from numba import cuda

from ._launch import MAX_BLOCKS, SIMULATOR

GEMM_ENV = "DEFORMNP_CUDA_GEMM"
_UNSET: Any = object()
_cupy_module: Any = _UNSET

TILE = 1 if SIMULATOR else 16
REG = 1 if SIMULATOR else 4


def make_gemm(tile: int, reg: int) -> Any:
    """The GEMM kernel with TILE x TILE threads and REG x REG outputs per thread (any float
    dtype). Launch it with ``tile * tile`` threads per block (see :func:`gemm`)."""
    T = int(tile)
    R = int(reg)
    BM = T * R  # rows (and columns) of C per block
    BK = T  # reduction step
    LOADS = R  # elements of each staged operand loaded per thread: BM * BK / (T * T)
    A_SHAPE = (BM, BK + 1)  # shared tiles, rows padded by one element (bank conflicts)
    B_SHAPE = (BK, BM + 1)
    # a block of one thread needs no barrier (and the simulator's barrier costs a thread switch)
    SYNC = T > 1

    def kernel(
        a, b, c, M, N, Kd, batches,
        a_off, a_bs, a_rs, a_cs,
        b_off, b_bs, b_rs, b_cs,
        c_off, c_bs, c_rs, c_cs,
        accumulate,
    ):  # fmt: skip
        ft = c.dtype.type
        sa = cuda.shared.array(A_SHAPE, c.dtype)  # sa[r, s] = A[i0 + r, k0 + s]
        sb = cuda.shared.array(B_SHAPE, c.dtype)  # sb[s, q] = B[k0 + s, j0 + q]
        acc = cuda.local.array((R, R), c.dtype)  # registers: every index is a constant
        ra = cuda.local.array(R, c.dtype)
        rb = cuda.local.array(R, c.dtype)
        tid = cuda.threadIdx.x
        tx = tid % T
        ty = tid // T
        tm = (M + BM - 1) // BM
        tn = (N + BM - 1) // BM
        total = batches * tm * tn
        a_k_fast = a_cs == 1  # A's unit stride runs along the reduction: load along it
        b_j_fast = b_cs == 1 or b_rs != 1  # B's unit stride runs along the columns
        for tile_ in range(cuda.blockIdx.x, total, cuda.gridDim.x):
            jt = tile_ % tn
            it = (tile_ // tn) % tm
            z = tile_ // (tn * tm)
            i0 = it * BM
            j0 = jt * BM
            ab = a_off + z * a_bs
            bb = b_off + z * b_bs
            for u in range(R):
                for v in range(R):
                    acc[u, v] = ft(0)
            for k0 in range(0, Kd, BK):
                for l in range(LOADS):
                    e = tid + l * (T * T)
                    if a_k_fast:
                        r = e // BK
                        s = e - r * BK
                    else:
                        s = e // BM
                        r = e - s * BM
                    ii = i0 + r
                    kk = k0 + s
                    va = ft(0)
                    if ii < M and kk < Kd:
                        va = a[ab + ii * a_rs + kk * a_cs]
                    sa[r, s] = va
                    if b_j_fast:
                        s = e // BM
                        q = e - s * BM
                    else:
                        q = e // BK
                        s = e - q * BK
                    kk = k0 + s
                    jj = j0 + q
                    vb = ft(0)
                    if kk < Kd and jj < N:
                        vb = b[bb + kk * b_rs + jj * b_cs]
                    sb[s, q] = vb
                if SYNC:
                    cuda.syncthreads()
                for s in range(BK):
                    for u in range(R):
                        ra[u] = sa[ty + u * T, s]
                    for v in range(R):
                        rb[v] = sb[s, tx + v * T]
                    for u in range(R):
                        for v in range(R):
                            acc[u, v] += ra[u] * rb[v]
                if SYNC:
                    cuda.syncthreads()
            cb = c_off + z * c_bs
            for u in range(R):
                i = i0 + ty + u * T
                for v in range(R):
                    j = j0 + tx + v * T
                    if i < M and j < N:
                        o = cb + i * c_rs + j * c_cs
                        if accumulate:
                            c[o] = c[o] + acc[u, v]
                        else:
                            c[o] = acc[u, v]

    kernel.__name__ = kernel.__qualname__ = f"gemm_{T}x{T}_reg{R}"
    return cuda.jit(cache=not SIMULATOR)(kernel)


_gemm = make_gemm(TILE, REG)


def view(ld: int, offset: int = 0, batch_stride: int = 0, transpose: bool = False) -> tuple:
    """The view ``(offset, batch_stride, row_stride, col_stride)`` of a row-major matrix with
    leading dimension ``ld`` (elements between rows) starting at ``offset``; ``transpose`` views
    it transposed (its columns as rows)."""
    if transpose:
        return (int(offset), int(batch_stride), 1, int(ld))
    return (int(offset), int(batch_stride), int(ld), 1)


def _cupy() -> Any:
    """CuPy if it imports, sees a device and can load cuBLAS, else None (looked up once)."""
    global _cupy_module
    if _cupy_module is _UNSET:
        try:
            import cupy

            cupy.cuda.runtime.getDeviceCount()
            cupy.cuda.device.get_cublas_handle()  # CuPy loads libcublas lazily: load it now
            _cupy_module = cupy
        except Exception:  # not installed, built for another CUDA, or no cuBLAS: Numba's GEMM
            _cupy_module = None
    return _cupy_module


def backend() -> str:
    """The GEMM :func:`gemm` runs now: ``"cublas"`` or ``"numba"`` (see the module docstring)."""
    want = os.environ.get(GEMM_ENV, "auto").strip().lower()
    if want not in ("auto", "numba", "cublas"):
        raise ValueError(f"{GEMM_ENV} must be auto, numba or cublas, got {want!r}")
    if want == "numba":
        return "numba"
    if SIMULATOR or _cupy() is None:
        if want == "cublas":
            raise RuntimeError(
                f"{GEMM_ENV}=cublas needs a GPU and CuPy built for its CUDA, with cuBLAS "
                "(pip install cupy-cuda12x or cupy-cuda13x)"
            )
        return "numba"
    return "cublas"


def _stream_handle(stream: Any) -> int:
    """A Numba stream's CUstream as an int (a cuda-bindings object or a ctypes pointer)."""
    h = stream.handle
    if isinstance(h, ctypes.c_void_p):
        return int(h.value or 0)
    return int(h)


def _unit_stride(*arrays: Any) -> bool:
    return all(len(a.shape) == 1 and a.strides[0] == a.dtype.itemsize for a in arrays)


def _batch(v: tuple, z: int) -> tuple:
    """View ``v`` moved to its batch ``z``."""
    return (int(v[0]) + z * int(v[1]), *v[1:])


def _cupy_view(cp: Any, a: Any, rows: int, cols: int, v: tuple) -> Any:
    """The (rows, cols) CuPy view of unit-stride flat device array ``a`` under view ``v`` (its
    batch 0; the caller moves the offset for the others)."""
    off, _, rs, cs = (int(x) for x in v)
    it = a.dtype.itemsize
    ptr = a.__cuda_array_interface__["data"][0] + off * it
    span = ((rows - 1) * rs + (cols - 1) * cs + 1) * it
    mem = cp.cuda.MemoryPointer(cp.cuda.UnownedMemory(ptr, span, a), 0)
    return cp.ndarray((rows, cols), a.dtype, mem, strides=(rs * it, cs * it))


def _gemm_cublas(
    a: Any, b: Any, c: Any, M: int, N: int, Kd: int, a_view: tuple, b_view: tuple,
    c_view: tuple, batches: int, accumulate: bool,
) -> None:  # fmt: skip
    """One 2-D ``cupy.matmul`` per batch (CuPy's batched matmul would copy transposed operands
    to contiguous ones), on Numba's default stream, where the kernels around it run."""
    cp = _cupy()
    handle = _stream_handle(cuda.default_stream())  # 0: the legacy default stream
    stream = cp.cuda.Stream.null if handle == 0 else cp.cuda.ExternalStream(handle)
    with stream:
        for z in range(batches):
            C = _cupy_view(cp, c, M, N, _batch(c_view, z))
            if Kd <= 0:  # an empty reduction: C = 0, or C unchanged
                if not accumulate:
                    C.fill(0)
                continue
            A = _cupy_view(cp, a, M, Kd, _batch(a_view, z))
            B = _cupy_view(cp, b, Kd, N, _batch(b_view, z))
            if accumulate:
                C += cp.matmul(A, B)
            elif C.flags.c_contiguous:
                cp.matmul(A, B, out=C)
            else:
                C[...] = cp.matmul(A, B)


def gemm(
    a: Any,
    b: Any,
    c: Any,
    M: int,
    N: int,
    Kd: int,
    a_view: tuple,
    b_view: tuple,
    c_view: tuple,
    batches: int = 1,
    accumulate: bool = False,
    kernel: Any = None,
    tile: int = TILE,
    reg: int = REG,
) -> None:
    """C[z] = A[z] @ B[z] (``accumulate``: C[z] +=) for z < ``batches``; ``a``, ``b``, ``c`` are flat
    device arrays of one float dtype and the views come from :func:`view` (see the module
    docstring). Through cuBLAS when :func:`backend` says so. ``kernel``/``tile``/``reg``: another
    build of :func:`make_gemm` (tests; always the Numba kernel)."""
    if M <= 0 or N <= 0 or batches <= 0:
        return
    if batches > 1 and int(c_view[1]) == 0:
        raise ValueError("gemm: C's batch stride is 0 with several batches (they would overlap)")
    if kernel is None and backend() == "cublas" and _unit_stride(a, b, c):
        _gemm_cublas(a, b, c, M, N, Kd, a_view, b_view, c_view, int(batches), bool(accumulate))
        return
    if kernel is None:
        kernel = _gemm
    bm = tile * reg
    tiles = int(batches) * (-(-int(M) // bm)) * (-(-int(N) // bm))
    blocks = max(1, min(tiles, MAX_BLOCKS))
    kernel[blocks, tile * tile](
        a, b, c, int(M), int(N), int(Kd), int(batches),
        *(int(x) for x in a_view), *(int(x) for x in b_view), *(int(x) for x in c_view),
        bool(accumulate),
    )  # fmt: skip
