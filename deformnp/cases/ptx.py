"""What the CUDA kernels compile to: a PTX census of every kernel, without a GPU.

``python -m deformnp.cases.ptx [--op NAME]`` runs every CUDA case of the check table
(``deformnp.cases``; in float32 and float64, with and without
:func:`deformnp.use_deterministic_algorithms`) under Numba's CUDA simulator in a subprocess,
records the argument types of every kernel launch, compiles each kernel for those types to PTX for
compute capability 9.0 (Hopper) and prints, per kernel and launch signature, its float64 and
float32 arithmetic instructions and its local-memory loads and stores (spills and stack arrays).
A float32 launch should show no float64 arithmetic; ``tests/test_ptx.py`` asserts it.

Needs NVVM (``pip install nvidia-cuda-nvcc-cu12 nvidia-cuda-nvrtc-cu12``, in the test extras) but
no GPU and no driver: the device functions are compiled for the given compute capability instead
of the current device's.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import re
import subprocess
import sys
from collections.abc import Iterable
from dataclasses import dataclass

CC = (9, 0)

# PTX arithmetic on floats: the instruction's type suffix says the precision.
_ARITH = (
    "add",
    "sub",
    "mul",
    "fma",
    "mad",
    "div",
    "rcp",
    "sqrt",
    "rsqrt",
    "neg",
    "abs",
    "min",
    "max",
    "setp",
    "selp",
    "cvt",
    "ex2",
    "lg2",
    "testp",
    "atom",
    "red",
    "copysign",
)
_INSTR = re.compile(r"^\s*(?:@!?%p\d+\s+)?([a-z][a-z0-9_.]*)")


@dataclass(frozen=True)
class Census:
    f64: int  # float64 arithmetic instructions (conversions to or from f64 included)
    f32: int
    local_ld: int
    local_st: int


def census(ptx: str) -> Census:
    """Count float arithmetic by precision, and local-memory traffic, in a PTX listing."""
    f64 = f32 = ld = st = 0
    for line in ptx.splitlines():
        m = _INSTR.match(line)
        if not m:
            continue
        parts = m.group(1).split(".")
        op = parts[0]
        if op in ("ld", "st") and "local" in parts:
            if op == "ld":
                ld += 1
            else:
                st += 1
        if op in _ARITH:
            if "f64" in parts:
                f64 += 1
            elif "f32" in parts:
                f32 += 1
    return Census(f64, f32, ld, st)


# ------------------------------------------------------------------ recording (simulator side)


def _type_name(a: object) -> object:
    """A JSON description of the Numba type a real launch would give ``a``."""
    import numpy as np

    if hasattr(a, "shape") and hasattr(a, "dtype") and not np.isscalar(a):
        layout = "C" if (len(a.shape) <= 1 or _is_c_contiguous(a)) else "A"
        return ["array", str(np.dtype(a.dtype)), len(a.shape), layout]
    if isinstance(a, tuple):
        return ["tuple", [_type_name(x) for x in a]]
    if isinstance(a, (bool, np.bool_)):
        return "boolean"
    if isinstance(a, (int, np.integer)) and not isinstance(a, np.integer):
        return "int64"
    if isinstance(a, np.generic):
        return str(np.dtype(type(a)))
    if isinstance(a, float):
        return "float64"
    raise TypeError(f"ptx: cannot type kernel argument {a!r}")


def _is_c_contiguous(a: object) -> bool:
    flags = getattr(a, "flags", None)
    if flags is not None:
        return bool(flags["C_CONTIGUOUS"])
    return True


def _record(ops: Iterable[str] | None) -> list[list]:
    """Run the CUDA check cases under the simulator and return the launches seen:
    [module, kernel name, [argument types]] (unique)."""
    import numpy as np
    from numba.cuda.simulator.kernel import FakeCUDAKernel

    import deformnp as dn
    from deformnp.cases import check_cases

    seen: dict[tuple, list] = {}
    original = FakeCUDAKernel.__call__

    def recording(self, *args):
        if self._device:  # a device function called from a kernel: compiled with its caller
            return original(self, *args)
        fn = self.fn
        module = sys.modules[fn.__module__]
        name = next(
            (k for k, v in vars(module).items() if getattr(v, "fn", None) is fn), fn.__name__
        )
        sig = [_type_name(a) for a in args]
        seen.setdefault((fn.__module__, name, json.dumps(sig)), [fn.__module__, name, sig])
        return original(self, *args)

    FakeCUDAKernel.__call__ = recording
    try:
        for case in check_cases():
            if not case.cuda or (ops and case.op not in ops):
                continue
            for deterministic in (False, True):
                dn.use_deterministic_algorithms(deterministic)
                for dtype in (np.float32, np.float64):
                    ts = case.inputs(dtype, "cuda")
                    out = case.fn(*ts)
                    outs = out if isinstance(out, tuple) else (out,)
                    w = dn.tensor(np.ones(outs[0].shape, dtype)).to("cuda")
                    loss = ((outs[0] * w) / 2.0 - 1.0).sum()  # the elementwise kernels too
                    for o in outs[1:]:
                        loss = loss + o.sum()
                    loss.backward()
        if not ops or "roi_pool" in ops:
            _array_level_only()
    finally:
        FakeCUDAKernel.__call__ = original
        dn.use_deterministic_algorithms(False)
    return list(seen.values())


def _array_level_only() -> None:
    """The launches only the array-level functions make: roi_pool_backward's check of a caller's
    device argmax (the autograd node keeps the forward's own and skips it)."""
    import numpy as np
    from numba import cuda

    from deformnp import ops

    boxes = np.array([[0, 0.0, 0.0, 3.0, 3.0]])
    for dtype in (np.float32, np.float64):
        x = cuda.to_device(np.arange(50, dtype=dtype).reshape(1, 2, 5, 5))
        out, argmax = ops.roi_pool_forward(x, boxes.astype(dtype), 2, 1.0, return_argmax=True)
        ops.roi_pool_backward(out, x.shape, boxes.astype(dtype), 2, 1.0, argmax=argmax)


def record(ops: Iterable[str] | None = None) -> list[list]:
    """The launches of the CUDA check cases, recorded in a simulator subprocess."""
    env = dict(os.environ, NUMBA_ENABLE_CUDASIM="1")
    cmd = [sys.executable, "-m", "deformnp.cases.ptx", "--record"]
    if ops:
        cmd += ["--op", ",".join(ops)]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False)
    if done.returncode:
        raise RuntimeError(f"ptx: recording the launches failed:\n{done.stderr[-4000:]}")
    return json.loads(done.stdout.splitlines()[-1])


# ------------------------------------------------------------------ compiling (no simulator)


def _numba_type(t: object) -> object:
    import numpy as np
    from numba import from_dtype, types

    if isinstance(t, list) and t[0] == "tuple":
        return types.BaseTuple.from_types([_numba_type(x) for x in t[1]])
    if isinstance(t, list):
        _, dtype, ndim, layout = t
        return types.Array(from_dtype(np.dtype(dtype)), ndim, layout)
    return getattr(types, t)


def _target_cc(cc: tuple[int, int]) -> None:
    """Compile device functions for ``cc`` instead of asking a (missing) driver."""
    import types as pytypes

    import numba.cuda.dispatcher as dispatcher

    dispatcher.get_current_device = lambda: pytypes.SimpleNamespace(compute_capability=cc)


def compile_launch(module: str, name: str, sig: list, cc: tuple[int, int] = CC) -> str:
    """PTX of kernel ``module.name`` for the recorded argument types ``sig``."""
    from numba import cuda

    _target_cc(cc)
    kernel = getattr(importlib.import_module(module), name)
    argtypes = tuple(_numba_type(t) for t in sig)
    opts = kernel.targetoptions
    ptx, _ = cuda.compile_ptx(
        kernel.py_func, argtypes, cc=cc, fastmath=bool(opts.get("fastmath", False))
    )
    return ptx


def float_dtype(sig: list) -> str:
    """'float32' when every float array of the launch is float32, 'float64' when any is float64,
    'int' for a launch without float arrays (an index kernel)."""
    floats = {
        t[1] for t in sig if isinstance(t, list) and t[0] == "array" and t[1].startswith("float")
    }
    if not floats:
        return "int"
    return "float32" if floats == {"float32"} else "float64"


def report(ops: Iterable[str] | None = None) -> list[dict]:
    """One row per recorded launch: module, kernel, dtype, signature and PTX census."""
    rows = []
    for module, name, sig in record(ops):
        c = census(compile_launch(module, name, sig))
        rows.append(
            dict(
                module=module.rsplit(".", 1)[-1],
                kernel=name,
                dtype=float_dtype(sig),
                sig=sig,
                f64=c.f64,
                f32=c.f32,
                local_ld=c.local_ld,
                local_st=c.local_st,
            )
        )
    return sorted(rows, key=lambda r: (r["module"], r["kernel"], r["dtype"]))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m deformnp.cases.ptx", description=__doc__)
    p.add_argument("--op", help="comma-separated op names of the check table (default: all)")
    p.add_argument("--record", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--json", action="store_true", help="print the rows as JSON")
    a = p.parse_args(argv)
    ops = a.op.split(",") if a.op else None
    if a.record:
        print(json.dumps(_record(ops)))
        return 0
    rows = report(ops)
    if a.json:
        print(json.dumps(rows))
        return 0
    print(
        f"{'module':<12} {'kernel':<28} {'dtype':<8} {'f64':>5} {'f32':>5} {'ld.local':>8} {'st.local':>8}"
    )
    for r in rows:
        print(
            f"{r['module']:<12} {r['kernel']:<28} {r['dtype']:<8} {r['f64']:>5} {r['f32']:>5} "
            f"{r['local_ld']:>8} {r['local_st']:>8}"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
