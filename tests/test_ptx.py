"""The CUDA kernels as a Hopper GPU would run them: PTX for compute capability 9.0, no GPU needed.

``deformnp.cases.ptx`` records the argument types of every kernel launch made by the CUDA
cases of the check table (float32 and float64, with and without deterministic algorithms) under
Numba's simulator, compiles each kernel for those types with NVVM and counts its instructions.
Asserted here:

* a float32 launch contains no float64 arithmetic (no FP64 unit in the inner loops: FP64 runs at
  half the FP32 rate on H100/H200 and 1/64 on most other GPUs);
* no kernel uses local memory (no spills, no per-thread stack arrays);
* every kernel defined in ``deformnp/kernels/cuda`` is launched by some case in both dtypes, so
  nothing escapes the census.

The compiler (NVVM) comes from the ``nvidia-cuda-nvcc-cu12`` wheel of the test extras (Linux).
"""

from __future__ import annotations

import importlib
import json
import os
import pkgutil
import subprocess
import sys

import pytest

import deformnp.kernels.cuda as cuda_kernels


def _nvvm_missing() -> str | None:
    try:
        from cuda.pathfinder import load_nvidia_dynamic_lib

        load_nvidia_dynamic_lib("nvvm")
        load_nvidia_dynamic_lib("nvrtc")
    except Exception as exc:  # not installed: only off Linux, where the wheels do not exist
        return f"NVVM/NVRTC not installed ({type(exc).__name__})"
    return None


pytestmark = pytest.mark.skipif(_nvvm_missing() is not None, reason=str(_nvvm_missing()))


@pytest.fixture(scope="module")
def rows() -> list[dict]:
    env = {k: v for k, v in os.environ.items() if k != "NUMBA_ENABLE_CUDASIM"}
    done = subprocess.run(
        [sys.executable, "-m", "deformnp.cases.ptx", "--json"],
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-4000:]
    return json.loads(done.stdout.splitlines()[-1])


def _label(r: dict) -> str:
    return f"{r['module']}.{r['kernel']} ({r['dtype']})"


def test_float32_kernels_do_float32_arithmetic(rows):
    f32 = [r for r in rows if r["dtype"] == "float32"]
    assert f32
    bad = [f"{_label(r)}: {r['f64']} float64 instructions" for r in f32 if r["f64"]]
    assert not bad, "\n".join(bad)
    # the census is not blind: the float64 launches of the sampling kernels do show float64
    assert any(r["f64"] for r in rows if r["dtype"] == "float64")


def test_no_local_memory(rows):
    bad = [
        f"{_label(r)}: {r['local_ld']} ld.local, {r['local_st']} st.local"
        for r in rows
        if r["local_ld"] or r["local_st"]
    ]
    assert not bad, "\n".join(bad)


def _kernels() -> set[tuple[str, str]]:
    """(module, name) of every kernel (not device function) defined in kernels/cuda."""
    found = set()
    for info in pkgutil.iter_modules(cuda_kernels.__path__):
        module = importlib.import_module(f"{cuda_kernels.__name__}.{info.name}")
        for name, obj in vars(module).items():
            fn = getattr(obj, "fn", None) or getattr(obj, "py_func", None)
            device = getattr(obj, "_device", None)
            if device is None:
                device = getattr(obj, "targetoptions", {}).get("device", False)
            if fn is not None and not device and getattr(fn, "__module__", "") == module.__name__:
                found.add((info.name, name))
    return found


def test_every_kernel_is_in_the_census(rows):
    seen = {(r["module"], r["kernel"], r["dtype"]) for r in rows}
    missing = [
        f"{m}.{k} ({dt})"
        for m, k in sorted(_kernels())
        if (m, k, "int") not in seen  # an index kernel (no float data) needs one launch
        for dt in ("float32", "float64")
        if (m, k, dt) not in seen
    ]
    assert not missing, "kernels no CUDA case launches: " + ", ".join(missing)
