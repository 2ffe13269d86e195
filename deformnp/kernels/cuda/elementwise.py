"""The few generic CUDA kernels needed to form a loss on device tensors.

``binary(op, a, b)``: a op b for op in "add", "sub", "mul", "div", with ``b`` a device array of
``a``'s shape or a Python scalar; ``scale(a, s)``; ``sum_all(a)`` (a deterministic two-stage tree
reduction: fixed grid, fixed order, so the same input gives the same bits); ``broadcast_scalar``
(a 0-d device array spread to a shape, the backward of a full reduction). Every other generic op on
a CUDA tensor raises an error naming the op and asking to move to the CPU.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from numba import cuda

from ._launch import SIMULATOR, empty, flat, grid

_OPS = {"add": 0, "sub": 1, "mul": 2, "div": 3, "rsub": 4, "rdiv": 5}
_RED_THREADS = 8 if SIMULATOR else 256
_RED_BLOCKS = 2 if SIMULATOR else 1024


@cuda.jit(device=True)
def _apply(op, a, b):
    if op == 0:
        return a + b
    if op == 1:
        return a - b
    if op == 2:
        return a * b
    if op == 3:
        return a / b
    if op == 4:
        return b - a
    return b / a


@cuda.jit(cache=not SIMULATOR)
def _binary_arrays(a, b, out, op):
    for i in range(cuda.grid(1), out.size, cuda.gridsize(1)):
        out[i] = _apply(op, a[i], b[i])


@cuda.jit(cache=not SIMULATOR)
def _binary_scalar(a, s, out, op):
    for i in range(cuda.grid(1), out.size, cuda.gridsize(1)):
        out[i] = _apply(op, a[i], s)


@cuda.jit(cache=not SIMULATOR)
def _spread(src, scale, out):
    for i in range(cuda.grid(1), out.size, cuda.gridsize(1)):
        out[i] = src[0] * scale


def _partial_sums_kernel(threads: int) -> Any:
    @cuda.jit(cache=not SIMULATOR)
    def partial_sums(x, partial):
        buf = cuda.shared.array(threads, dtype=partial.dtype)
        t = cuda.threadIdx.x
        acc = partial.dtype.type(0)  # accumulate in the data's precision
        for i in range(cuda.grid(1), x.size, cuda.gridsize(1)):
            acc += x[i]
        buf[t] = acc
        cuda.syncthreads()
        step = threads // 2
        while step > 0:
            if t < step:
                buf[t] += buf[t + step]
            cuda.syncthreads()
            step //= 2
        if t == 0:
            partial[cuda.blockIdx.x] = buf[0]

    return partial_sums


_partial_sums = _partial_sums_kernel(_RED_THREADS)


def binary(op: str, a: Any, b: Any) -> Any:
    """``a op b`` elementwise; ``b`` is a device array of a's shape or a Python/NumPy scalar."""
    out = empty(a.shape, a.dtype)
    if out.size == 0:
        return out
    if np.isscalar(b) or (isinstance(b, np.ndarray) and b.ndim == 0):
        _binary_scalar[grid(out.size)](flat(a), a.dtype.type(b), flat(out), _OPS[op])
    else:
        _binary_arrays[grid(out.size)](flat(a), flat(b), flat(out), _OPS[op])
    return out


def scale(a: Any, s: float) -> Any:
    return binary("mul", a, s)


def sum_all(a: Any) -> Any:
    """The sum of every element as a 0-d device array (deterministic)."""
    x = flat(a)
    blocks = max(1, min(-(-x.size // _RED_THREADS), _RED_BLOCKS))
    partial = empty((blocks,), a.dtype)
    _partial_sums[blocks, _RED_THREADS](x, partial)
    total = empty((1,), a.dtype)
    _partial_sums[1, _RED_THREADS](partial, total)
    return total.reshape(())


def broadcast_scalar(src: Any, shape: tuple, scale_by: float = 1.0) -> Any:
    """A device array of ``shape`` filled with ``src[()] * scale_by`` (src: a 1-element array)."""
    out = empty(shape, src.dtype)
    if out.size:
        _spread[grid(out.size)](flat(src), src.dtype.type(scale_by), flat(out))
    return out
