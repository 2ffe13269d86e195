"""One prepared GPU check for deformnp: everything a GPU is needed for, in one run of at most
8 minutes on an H100/H200.

    python benches/gpu_check.py                       # on a GPU machine; writes gpu_check.json
    python benches/gpu_check.py --out run.json --budget-s 480 --stages pytest,timing
    python benches/gpu_check.py --smoke               # the same run under Numba's CUDA simulator
                                                      # at tiny sizes (tests/test_gpu_check.py)

Stages, in this order; each one's status and time go to the JSON summary (``--out``) and to the
table printed last:

``env``
    Python, numpy, numba, numba-cuda, torch, torchvision versions; GPU model, driver and CUDA
    version from nvidia-smi; the compute-sanitizer found (or where it was looked for); the commit.
``device``
    The device numba sees (name, compute capability, multiprocessors, L2, memory) and the two
    ceilings, measured here: copy bandwidth (a grid-stride copy kernel compiled by this script,
    a device-to-device memcpy, torch's ``copy_``; bytes read plus bytes written) and the FP32
    rate (a kernel of independent multiply-add chains; torch's FP32 matmul with TF32 off). The
    timing table's floors use the best of each.
``pytest``
    ``pytest -k cuda`` over tests/test_cuda*.py and the other modules with CUDA tests (DCNv3,
    DCNv4, ms_deform_attn, the README's CUDA snippet, the torch adapter's CUDA path) in a child
    process with ``DEFORMNP_REAL_GPU=1``: the CUDA tests on the real device, simulator off;
    with pytest-xdist workers where it is installed (``--pytest-workers``), since the stage is
    mostly Numba compiling kernels, one core each.
``races``
    Every op forward and backward at a medium size in float64 on the GPU, compared with the CPU
    kernels (output and every gradient to 1e-10 of max(1, max|cpu|)); the forward twice, and the
    backward twice under ``deformnp.use_deterministic_algorithms(True)``, asserting bit-identical
    results (the deterministic gradients must match the CPU's too); the default backward (atomic
    adds) twice as well, for the record. Inputs put many sampling points on few pixels, so that
    colliding scatters happen.
``memcheck``, ``racecheck``
    ``compute-sanitizer --tool memcheck`` / ``--tool racecheck`` over one small call of each
    kernel: the script re-runs itself in the hidden ``--calls`` mode under the sanitizer
    (forward, backward and deterministic backward of every op, float32 and float64, with NaN and
    infinite sampling positions among the inputs, plus the device loss ops of ``Tensor``), with a
    timeout. Where compute-sanitizer is not on PATH it is looked for in the CUDA locations and
    the nvidia pip wheels; if it is nowhere the stage is skipped and says "not found".
``timing``
    Forward and forward+backward in float32 at the reference sizes of
    ``deformnp/cases/bench.py`` and large ones (deform_conv2d B=16, 256->256 channels, 64x64,
    3x3, pad 1; ms_deform_attn and FlashDeformAttn at Deformable-DETR's encoder size; DCNv3
    and DCNv4 at InternImage-T's first stage, N=8), against torch/torchvision on
    the same data (``torchvision.ops`` for deform_conv2d and the RoI ops,
    ``torch.nn.functional.grid_sample``, for ms_deform_attn Deformable-DETR's pure-PyTorch
    grid_sample formulation ``ms_deform_attn_core_pytorch`` (after a softmax for
    FlashDeformAttn), for DCNv3 and DCNv4 InternImage's ``dcnv3_core_pytorch``). Timed with CUDA
    events (``numba.cuda.event`` for deformnp, ``torch.cuda.Event`` for torch) around each call,
    the device synchronized and the L2 flushed (a 256 MiB device copy) before each, after a
    warm-up; deformnp's and torch's runs alternate; median, min and max are reported. deformnp's
    device arrays are made once per case (``numba.cuda.to_device``). For each op: its bytes-moved
    floor (inputs read once, outputs written once) and FLOP floor, the floor time they give at
    the measured ceilings, and the fraction of it each side reaches. The forward outputs are
    compared with torch's (relative L2 error).

Every stage but ``env`` runs in a child process with a timeout cut from the budget
(``--budget-s``, default 480 s): a crash or a hung kernel in one stage leaves the later stages a
working device, each stage keeps the time the later stages need at least, and when time runs
short the run stops starting stages (and stages stop starting items) and says what it skipped.
Exit status: 0 when no stage failed (skipped ones included), 1 otherwise.

``--smoke`` runs the same stages end to end under Numba's CUDA simulator (the script sets
``NUMBA_ENABLE_CUDASIM=1`` itself, before anything imports numba) at tiny sizes: pytest on a
``-k`` subset of tests/test_cuda.py, the race stage, the ``--calls`` target once without a
sanitizer (both sanitizer stages are skipped: the simulator has no device to check), and the
timing table, compared with torch on the CPU when torch has no CUDA (torch may be absent: the
torch columns then say so). Its numbers measure nothing but that the script works. Its
deform_conv2d sizes are the smallest of all (a 1x1 or 2x2 kernel, one or two channels): the
simulator runs the tiled GEMM's barriers slowly (seconds for a 3x3 kernel on a 4x4 map).
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import glob
import importlib.metadata
import importlib.util
import json
import math
import os
import platform
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = Path(__file__).resolve()

FLOAT64_TOL = 1e-10  # GPU vs CPU kernels in float64, relative to max(1, max|cpu|)
PARITY_TOL = 1e-4  # deformnp vs torch forward in float32, ||a - b|| / ||b||
SMOKE_PYTEST_K = (
    "(bilinear_interpolate and zero and float64) or (grid_sample and reflection and float32) "
    "or (roi_pool and float64) or (deform_roi_pool and float32) "
    "or (ms_deform_attn and levels and float64) or test_to_and_back or test_loss_ops_on_device "
    "or test_array_level_functions"
)
# modules beside tests/test_cuda*.py whose CUDA tests (``-k cuda``) the pytest stage runs
CUDA_TESTS_ELSEWHERE = (
    "test_dcnv3.py",
    "test_dcnv4.py",
    "test_ms_deform_attn.py",
    "test_readme.py",
    "test_torch_adapter.py",
)


# =============================================================================== stages


@dataclass(frozen=True)
class Stage:
    name: str
    cap_s: float  # the longest the stage may run on a GPU
    min_s: float  # not started with less than this left; earlier stages leave it this much
    smoke_cap_s: float  # likewise under --smoke
    smoke_min_s: float
    what: str

    def cap(self, smoke: bool) -> float:
        return self.smoke_cap_s if smoke else self.cap_s

    def floor(self, smoke: bool) -> float:
        return min(self.smoke_min_s if smoke else self.min_s, self.cap(smoke))


STAGES = (
    Stage("env", 30, 1, 30, 1, "versions, GPU model and driver, compute-sanitizer"),
    Stage("device", 60, 20, 60, 5, "device properties; measured copy bandwidth and FP32 rate"),
    # smoke caps of pytest and races: a cold Numba cache (a fresh install, or the source tree
    # after an installed copy ran the suite) compiles every CPU kernel afresh, 2-3x the warm time
    Stage("pytest", 210, 60, 300, 10, "tests/test_cuda*.py on the device (DEFORMNP_REAL_GPU=1)"),
    Stage("races", 100, 30, 240, 5, "ops fwd+bwd at medium sizes, float64, vs CPU; det. bwd x2"),
    Stage("memcheck", 100, 30, 90, 5, "compute-sanitizer memcheck over one small call per kernel"),
    Stage("racecheck", 100, 30, 30, 1, "compute-sanitizer racecheck over the same calls"),
    Stage("timing", 240, 60, 120, 10, "float32 timings vs torch at reference and large sizes"),
)
STAGE_NAMES = tuple(s.name for s in STAGES)
GPU_STAGES = ("pytest", "races", "memcheck", "racecheck", "timing")


# =============================================================================== small helpers


def _jsonable(o: Any) -> Any:
    if isinstance(o, (np.integer,)):
        return int(o)
    if isinstance(o, (np.floating,)):
        return float(o)
    if isinstance(o, np.ndarray):
        return o.tolist()
    if isinstance(o, (Path,)):
        return str(o)
    if isinstance(o, (set, tuple)):
        return list(o)
    return repr(o)


def _write_json(path: Path, data: Any) -> None:
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=1, default=_jsonable, allow_nan=True) + "\n")
    os.replace(tmp, path)


def _load_json(path: Path) -> dict:
    try:
        return json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return {}


def _say(*parts: Any) -> None:
    print(*parts, flush=True)


def _tail(text: str, n: int) -> str:
    return text if len(text) <= n else "..." + text[-n:]


def _fmt_ms(x: float | None) -> str:
    if x is None:
        return "-"
    return f"{x:.0f}" if x >= 100 else f"{x:.3g}"


def _table(rows: Sequence[Sequence[Any]], header: Sequence[str]) -> str:
    # a short row (an error's message) is padded to the header's width
    rows = [[str(c) for c in r] + [""] * (len(header) - len(r)) for r in rows]
    widths = [max(len(str(r[i])) for r in [list(header), *rows]) for i in range(len(header))]
    fmt = "  ".join(f"{{:<{w}}}" for w in widths)
    lines = [fmt.format(*header), fmt.format(*("-" * w for w in widths))]
    lines += [fmt.format(*r) for r in rows]
    return "\n".join(line.rstrip() for line in lines)


def _spawn(
    cmd: Sequence[str],
    timeout: float,
    env: dict[str, str],
    capture: bool,
    echo: bool = False,
) -> tuple[int | None, str, bool]:
    """Run ``cmd`` (in its own process group, from the repository root) for at most ``timeout``
    seconds; kill its whole group past that. Returns (returncode, captured output, timed_out)."""
    proc = subprocess.Popen(
        list(cmd),
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE if capture else None,
        stderr=subprocess.STDOUT if capture else None,
        text=True,
        errors="replace",
        start_new_session=True,
    )
    chunks: list[str] = []
    reader = None
    if capture:

        def read() -> None:
            assert proc.stdout is not None
            for line in proc.stdout:
                chunks.append(line)
                if echo:
                    sys.stdout.write("  | " + line)
                    sys.stdout.flush()

        reader = threading.Thread(target=read, daemon=True)
        reader.start()
    timed_out = False
    try:
        proc.wait(timeout=max(1.0, timeout))
    except subprocess.TimeoutExpired:
        timed_out = True
    except BaseException:  # Ctrl-C: take the child's group down with us
        _kill_group(proc)
        raise
    if timed_out:
        _kill_group(proc)
        proc.wait()
    if reader is not None:
        reader.join(timeout=10)
    return proc.returncode, "".join(chunks), timed_out


def _kill_group(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)  # the group this script started for the child
    except (ProcessLookupError, PermissionError):
        pass


def _child_env(smoke: bool) -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONUNBUFFERED"] = "1"
    env["PYTHONPATH"] = str(ROOT) + (
        os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else ""
    )
    for k in ("PYTEST_ADDOPTS", "PYTEST_CURRENT_TEST"):  # an outer pytest's settings
        env.pop(k, None)
    if smoke:
        env["NUMBA_ENABLE_CUDASIM"] = "1"
        env.pop("DEFORMNP_REAL_GPU", None)
    else:
        env.pop("NUMBA_ENABLE_CUDASIM", None)
        env["DEFORMNP_REAL_GPU"] = "1"
    return env


# =============================================================================== environment


VERSIONED = (
    "numpy",
    "scipy",
    "numba",
    "numba-cuda",
    "llvmlite",
    "cuda-bindings",
    "cuda-core",
    "torch",
    "torchvision",
    "pytest",
    "hypothesis",
)


def _versions() -> dict[str, str | None]:
    out: dict[str, str | None] = {}
    for name in VERSIONED:
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            out[name] = None
    m = re.search(r'__version__\s*=\s*"([^"]+)"', (ROOT / "deformnp" / "__init__.py").read_text())
    out["deformnp"] = m.group(1) if m else None
    return out


def _nvidia_smi() -> dict[str, Any]:
    exe = shutil.which("nvidia-smi")
    if exe is None:
        return {"found": False}
    info: dict[str, Any] = {"found": True, "path": exe}
    fields = (
        "name,driver_version,memory.total,compute_cap,clocks.sm,clocks.max.sm,clocks.mem,"
        "clocks.max.mem,power.limit,temperature.gpu,pstate"
    )
    for query in (fields, "name,driver_version,memory.total"):
        try:
            r = subprocess.run(
                [exe, f"--query-gpu={query}", "--format=csv,noheader"],
                capture_output=True,
                text=True,
                timeout=20,
            )
        except (OSError, subprocess.TimeoutExpired) as exc:
            info["error"] = str(exc)
            continue
        if r.returncode == 0 and r.stdout.strip():
            info["gpus"] = [
                dict(zip(query.split(","), (v.strip() for v in line.split(","))))
                for line in r.stdout.strip().splitlines()
            ]
            break
        info["error"] = (r.stdout + r.stderr).strip()[-300:]
    try:
        r = subprocess.run([exe], capture_output=True, text=True, timeout=20)
        m = re.search(r"CUDA Version:\s*([\d.]+)", r.stdout)
        if m:
            info["cuda_version"] = m.group(1)
    except (OSError, subprocess.TimeoutExpired):
        pass
    return info


def find_compute_sanitizer() -> tuple[str | None, list[str]]:
    """The compute-sanitizer executable and the places looked in: PATH, cuda.pathfinder, the
    CUDA toolkit locations ($CUDA_HOME, $CUDA_PATH, /usr/local/cuda*, /opt/cuda, /opt/nvidia)
    and the nvidia pip wheels of every site-packages on sys.path."""
    looked = ["PATH"]
    exe = shutil.which("compute-sanitizer")
    if exe:
        return exe, looked
    looked.append("cuda.pathfinder")
    try:
        from cuda.pathfinder import find_nvidia_binary_utility

        exe = find_nvidia_binary_utility("compute-sanitizer")
        if exe:
            return exe, looked
    except Exception:
        pass
    roots = [os.environ.get(v) for v in ("CUDA_HOME", "CUDA_PATH", "CUDA_ROOT")]
    roots += ["/usr/local/cuda", *sorted(glob.glob("/usr/local/cuda-*"), reverse=True)]
    roots += ["/opt/cuda", *sorted(glob.glob("/opt/nvidia/*"))]
    candidates = []
    for r in roots:
        if r:
            candidates += [f"{r}/bin/compute-sanitizer", f"{r}/compute-sanitizer/compute-sanitizer"]
    sites = [
        p for p in sys.path if p and p.rstrip("/").endswith(("site-packages", "dist-packages"))
    ]
    for s in dict.fromkeys(sites):
        candidates += glob.glob(f"{s}/nvidia/*/compute-sanitizer/compute-sanitizer")
        candidates += glob.glob(f"{s}/nvidia/*/bin/compute-sanitizer")
        candidates += glob.glob(f"{s}/nvidia/cu*/*/compute-sanitizer/compute-sanitizer")
        looked.append(f"{s}/nvidia/*")
    looked += [r for r in roots if r]
    for c in candidates:
        if os.path.isfile(c) and os.access(c, os.X_OK):
            return c, looked
    return None, looked


def _git() -> dict[str, Any]:
    if shutil.which("git") is None or not (ROOT / ".git").exists():
        return {}
    out: dict[str, Any] = {}
    try:
        r = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True, timeout=10
        )
        out["commit"] = r.stdout.strip() or None
        r = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=10,
        )
        out["modified_files"] = len(r.stdout.splitlines())
    except (OSError, subprocess.TimeoutExpired):
        pass
    return out


# =============================================================================== op cases
#
# One builder per op, parameterized by dtype and sizes: the same cases serve the race stage
# (float64, medium), the sanitizer's --calls target (small, with NaN/inf positions) and the
# timing table (float32, reference and large sizes).


@dataclass
class TorchSide:
    """The torch counterpart of a case: ``fn(tensors)`` with tensors made from ``inputs``,
    differentiated with respect to ``wrt`` for ``grad_out`` (the case's when None)."""

    fn: Callable[[dict[str, Any]], Any]
    inputs: dict[str, np.ndarray]
    wrt: tuple[str, ...]
    grad_out: np.ndarray | None = None
    torchvision: bool = False
    parity: bool = True  # compare the forward with deformnp's
    note: str = ""


@dataclass
class OpCase:
    op: str
    size: str
    inputs: dict[str, np.ndarray]  # host arrays of every input
    host: tuple[str, ...]  # inputs deformnp takes on the host (boxes, level tables)
    wrt: tuple[str, ...]  # the differentiable inputs, in the order the backward returns them
    grad_out: np.ndarray
    forward: Callable[[dict[str, Any]], Any]
    backward: Callable[[Any, dict[str, Any]], Sequence[Any]]
    flops: tuple[float, float]  # floors: forward, forward + backward
    flop_model: str
    torch: TorchSide | None = None
    forward_backward: Callable[[Any, dict[str, Any]], Sequence[Any]] | None = None

    def run_forward_backward(self, g: Any, a: dict[str, Any]) -> Sequence[Any]:
        if self.forward_backward is not None:
            return self.forward_backward(g, a)
        self.forward(a)
        return self.backward(g, a)

    def on_device(self, ncuda: Any) -> dict[str, Any]:
        return {k: v if k in self.host else ncuda.to_device(v) for k, v in self.inputs.items()}


def _ops() -> Any:
    from deformnp import ops

    return ops


def _frac(rng: np.random.Generator, lo: int, hi: int, shape: tuple[int, ...]) -> np.ndarray:
    """Integers in [lo, hi) plus fractional parts in [0.1, 0.9] (off the kinks)."""
    return rng.integers(lo, hi, shape) + rng.uniform(0.1, 0.9, shape)


def _poison(rng: np.random.Generator, a: np.ndarray) -> None:
    """NaN, +inf and -inf in three entries of ``a`` (sampling positions must sample zero)."""
    flat = a.reshape(-1)
    picks = rng.choice(flat.size, size=min(3, flat.size), replace=False)
    for v, i in zip((np.nan, np.inf, -np.inf), picks):
        flat[i] = v


def _torch_grid_sample(x: Any, grid: Any, padding_mode: str, align: bool) -> Any:
    import torch.nn.functional as TF

    return TF.grid_sample(x, grid, mode="bilinear", padding_mode=padding_mode, align_corners=align)


def _tv(name: str) -> Any:
    import torchvision.ops

    return getattr(torchvision.ops, name)


def ms_deform_attn_core_pytorch(
    value: Any, value_spatial_shapes: Any, sampling_locations: Any, attention_weights: Any
) -> Any:
    """Deformable-DETR's pure-PyTorch multi-scale deformable attention (one ``grid_sample`` per
    level, then the attention-weighted sum), as the CPU benchmarks time it."""
    from deformnp.cases.bench import torch_ms_deform_attn_core

    return torch_ms_deform_attn_core(
        value, value_spatial_shapes, sampling_locations, attention_weights
    )


def bilinear_case(
    dtype: Any,
    N: int,
    C: int,
    H: int,
    W: int,
    P: int,
    border: str = "zero",
    window: int | None = None,
    nan: bool = False,
    seed: int = 0,
) -> OpCase:
    """Points with integer parts in [-2, H] x [-2, W] (or [-2, window): many points on few
    pixels)."""
    ops = _ops()
    rng = np.random.default_rng(seed)
    hy, hx = (H + 1, W + 1) if window is None else (window, window)
    x = rng.standard_normal((N, C, H, W)).astype(dtype)
    pts = np.stack([_frac(rng, -2, hy, (N, P)), _frac(rng, -2, hx, (N, P))], axis=-1)
    pts = pts.astype(dtype)
    if nan:
        _poison(rng, pts)
    g = rng.standard_normal((N, C, P)).astype(dtype)
    torch_side = None
    if border == "zero":  # zero-fade sampling at pixel (y, x) is grid_sample(zeros, corners) there
        grid = np.stack([pts[..., 1] / (W - 1) * 2 - 1, pts[..., 0] / (H - 1) * 2 - 1], axis=-1)
        torch_side = TorchSide(
            lambda t: _torch_grid_sample(t["input"], t["grid"], "zeros", True),
            {"input": x, "grid": grid[:, None].astype(dtype)},
            ("input", "grid"),
            grad_out=g[:, :, None],
            note="grid_sample(zeros, align_corners=True) at the points",
        )
    n = N * C * P
    return OpCase(
        "bilinear_interpolate",
        f"input ({N},{C},{H},{W}), {P} points, {border} border",
        {"input": x, "points": pts},
        (),
        ("input", "points"),
        g,
        lambda a: ops.bilinear_interpolate_forward(a["input"], a["points"], border),
        lambda g, a: ops.bilinear_interpolate_backward(g, a["input"], a["points"], border),
        (8.0 * n, 24.0 * n),
        "4 multiply-adds per (point, channel); backward twice that (input scatter, point grad)",
        torch_side,
    )


def grid_sample_case(
    dtype: Any,
    N: int,
    C: int,
    Hin: int,
    Win: int,
    H: int,
    W: int,
    padding_mode: str = "zeros",
    align: bool = False,
    nan: bool = False,
    seed: int = 0,
) -> OpCase:
    ops = _ops()
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((N, C, Hin, Win)).astype(dtype)
    grid = rng.uniform(-1.1, 1.1, (N, H, W, 2)).astype(dtype)
    if nan:
        _poison(rng, grid)
    g = rng.standard_normal((N, C, H, W)).astype(dtype)
    n = N * C * H * W
    return OpCase(
        "grid_sample",
        f"input ({N},{C},{Hin},{Win}), grid ({N},{H},{W},2), {padding_mode}, corners={align}",
        {"input": x, "grid": grid},
        (),
        ("input", "grid"),
        g,
        lambda a: ops.grid_sample_forward(a["input"], a["grid"], "bilinear", padding_mode, align),
        lambda g, a: ops.grid_sample_backward(
            g, a["input"], a["grid"], "bilinear", padding_mode, align
        ),
        (8.0 * n, 24.0 * n),
        "4 multiply-adds per (output pixel, channel); backward twice that",
        TorchSide(
            lambda t: _torch_grid_sample(t["input"], t["grid"], padding_mode, align),
            {"input": x, "grid": grid},
            ("input", "grid"),
        ),
    )


@contextlib.contextmanager
def _gemm_env(gemm: str | None) -> Iterator[None]:
    """DEFORMNP_CUDA_GEMM set to ``gemm`` (None: left as it is) for the duration."""
    if gemm is None:
        yield
        return
    old = os.environ.get("DEFORMNP_CUDA_GEMM")
    os.environ["DEFORMNP_CUDA_GEMM"] = gemm
    try:
        yield
    finally:
        if old is None:
            os.environ.pop("DEFORMNP_CUDA_GEMM", None)
        else:
            os.environ["DEFORMNP_CUDA_GEMM"] = old


def _gemm_backend(gemm: str | None) -> str:
    """The GEMM deform_conv2d's CUDA kernels run under ``gemm`` ("cublas" or "numba")."""
    from deformnp.kernels.cuda import gemm as gemm_module

    with _gemm_env(gemm):
        return gemm_module.backend()


def deform_conv2d_case(
    dtype: Any,
    B: int,
    Cin: int,
    Cout: int,
    H: int,
    W: int,
    k: int = 3,
    pad: int = 1,
    groups: int = 1,
    offset_groups: int = 1,
    mask: bool = True,
    nan: bool = False,
    seed: int = 0,
    gemm_env: str | None = None,
) -> OpCase:
    """Stride 1, dilation 1; offsets with integer parts in [-2, 2) and fractional parts in
    [0.1, 0.9]. ``gemm_env``: run the CUDA GEMMs with that DEFORMNP_CUDA_GEMM (the size label
    names the GEMM that ran)."""
    ops = _ops()
    rng = np.random.default_rng(seed)
    K, G = k * k, offset_groups
    Ho, Wo = H + 2 * pad - k + 1, W + 2 * pad - k + 1
    cg = Cin // groups
    arrays = {
        "input": rng.standard_normal((B, Cin, H, W)).astype(dtype),
        "offset": _frac(rng, -2, 2, (B, 2 * G * K, Ho, Wo)).astype(dtype),
        "weight": (rng.standard_normal((Cout, cg, k, k)) / math.sqrt(cg * K)).astype(dtype),
        "bias": rng.standard_normal(Cout).astype(dtype),
    }
    if mask:
        arrays["mask"] = rng.uniform(0, 1, (B, G * K, Ho, Wo)).astype(dtype)
    if nan:
        _poison(rng, arrays["offset"])
    g = rng.standard_normal((B, Cout, Ho, Wo)).astype(dtype)
    wrt = ("input", "offset", "weight", "bias", "mask")[: 5 if mask else 4]

    def forward(a: dict[str, Any]) -> Any:
        with _gemm_env(gemm_env):
            return ops.deform_conv2d_forward(
                a["input"], a["offset"], a["weight"], a["bias"], 1, pad, 1, a.get("mask")
            )

    def backward(g: Any, a: dict[str, Any]) -> Sequence[Any]:
        with _gemm_env(gemm_env):
            grads = ops.deform_conv2d_backward(
                g, a["input"], a["offset"], a["weight"], a["bias"], 1, pad, 1, a.get("mask")
            )
        return tuple(grads)[: len(wrt)]

    gemm = 2.0 * B * Cout * Ho * Wo * cg * K
    samp = B * Cin * K * Ho * Wo * (9.0 if mask else 8.0)
    return OpCase(
        "deform_conv2d",
        f"B={B}, {Cin}->{Cout}, {H}x{W}, {k}x{k}, pad {pad}"
        + (f", {groups} groups" if groups > 1 else "")
        + (f", {G} offset groups" if G > 1 else "")
        + (", mask" if mask else "")
        + f", GEMM: {_gemm_backend(gemm_env)}",
        arrays,
        (),
        wrt,
        g,
        forward,
        backward,
        (gemm + samp, 3 * gemm + 3 * samp),
        "GEMM 2*B*Cout*Ho*Wo*Cin/groups*k*k plus 4 multiply-adds (and the mask) per sample; "
        "backward: two GEMMs and twice the sampling",
        TorchSide(
            lambda t: _tv("deform_conv2d")(
                t["input"], t["offset"], t["weight"], t["bias"], padding=pad, mask=t.get("mask")
            ),
            dict(arrays),
            wrt,
            torchvision=True,
        ),
    )


def _roi_setup(
    dtype: Any, N: int, C: int, H: int, W: int, K: int, s: float, seed: int
) -> tuple[np.random.Generator, np.ndarray, np.ndarray]:
    from deformnp.cases.inputs import boxes_in

    rng = np.random.default_rng(seed)
    x = rng.standard_normal((N, C, H, W)).astype(dtype)
    boxes = boxes_in(rng, K, N, H, W, s).astype(dtype)
    return rng, x, boxes


def _box_extent(boxes: np.ndarray, s: float, H: int, W: int) -> tuple[np.ndarray, np.ndarray]:
    """Heights and widths of the boxes on the feature map, at least 1, clipped to it (for the
    FLOP floors)."""
    b = boxes.astype(np.float64)
    h = np.clip((b[:, 4] - b[:, 2]) * s, 1, H)
    w = np.clip((b[:, 3] - b[:, 1]) * s, 1, W)
    return h, w


def _samples(boxes: np.ndarray, s: float, H: int, W: int, out: int, ratio: int) -> float:
    """Sum over boxes of the bilinear samples per bin (ratio**2, or the adaptive count)."""
    if ratio > 0:
        return float(len(boxes) * ratio * ratio)
    h, w = _box_extent(boxes, s, H, W)
    return float((np.ceil(h / out) * np.ceil(w / out)).sum())


def roi_align_case(
    dtype: Any,
    N: int,
    C: int,
    H: int,
    W: int,
    K: int,
    out: int = 7,
    s: float = 1 / 16,
    ratio: int = 2,
    aligned: bool = True,
    seed: int = 0,
) -> OpCase:
    ops = _ops()
    rng, x, boxes = _roi_setup(dtype, N, C, H, W, K, s, seed)
    g = rng.standard_normal((K, C, out, out)).astype(dtype)
    f = 8.0 * C * out * out * _samples(boxes, s, H, W, out, ratio)
    return OpCase(
        "roi_align",
        f"input ({N},{C},{H},{W}), {K} boxes, {out}x{out}, ratio {ratio}"
        + (", aligned" if aligned else ""),
        {"input": x, "boxes": boxes},
        ("boxes",),
        ("input",),
        g,
        lambda a: ops.roi_align_forward(a["input"], a["boxes"], out, s, ratio, aligned),
        lambda g, a: ops.roi_align_backward(
            g, a["input"].shape, a["boxes"], out, s, ratio, aligned
        ),
        (f, 2 * f),
        "4 multiply-adds per (sample, channel); backward the same scattered",
        TorchSide(
            lambda t: _tv("roi_align")(t["input"], t["boxes"], out, s, ratio, aligned),
            {"input": x, "boxes": boxes},
            ("input",),
            torchvision=True,
        ),
    )


def roi_pool_case(
    dtype: Any,
    N: int,
    C: int,
    H: int,
    W: int,
    K: int,
    out: int = 7,
    s: float = 1 / 16,
    seed: int = 0,
) -> OpCase:
    ops = _ops()
    rng, x, boxes = _roi_setup(dtype, N, C, H, W, K, s, seed)
    g = rng.standard_normal((K, C, out, out)).astype(dtype)

    def backward(g: Any, a: dict[str, Any]) -> Sequence[Any]:
        if "argmax" not in a:  # the forward's argmax, made once per case (the backward needs it)
            a["argmax"] = ops.roi_pool_forward(a["input"], a["boxes"], out, s, return_argmax=True)[
                1
            ]
        return ops.roi_pool_backward(g, a["input"].shape, a["boxes"], out, s, argmax=a["argmax"])

    def forward_backward(g: Any, a: dict[str, Any]) -> Sequence[Any]:
        # the forward's argmax, as the autograd node keeps it
        _, argmax = ops.roi_pool_forward(a["input"], a["boxes"], out, s, return_argmax=True)
        return ops.roi_pool_backward(g, a["input"].shape, a["boxes"], out, s, argmax=argmax)

    h, w = _box_extent(boxes, s, H, W)
    cmp = float(C * (h * w).sum())
    return OpCase(
        "roi_pool",
        f"input ({N},{C},{H},{W}), {K} boxes, {out}x{out}",
        {"input": x, "boxes": boxes},
        ("boxes",),
        ("input",),
        g,
        lambda a: ops.roi_pool_forward(a["input"], a["boxes"], out, s),
        backward,
        (cmp, cmp + K * C * out * out),
        "one comparison per (box pixel, channel); backward one add per bin",
        TorchSide(
            lambda t: _tv("roi_pool")(t["input"], t["boxes"], out, s),
            {"input": x, "boxes": boxes},
            ("input",),
            torchvision=True,
        ),
        forward_backward=forward_backward,
    )


def ps_roi_align_case(
    dtype: Any,
    N: int,
    Cout: int,
    H: int,
    W: int,
    K: int,
    out: int = 7,
    s: float = 1 / 16,
    ratio: int = 2,
    seed: int = 0,
) -> OpCase:
    ops = _ops()
    C = Cout * out * out
    rng, x, boxes = _roi_setup(dtype, N, C, H, W, K, s, seed)
    g = rng.standard_normal((K, Cout, out, out)).astype(dtype)
    f = 8.0 * Cout * out * out * _samples(boxes, s, H, W, out, ratio)
    return OpCase(
        "ps_roi_align",
        f"input ({N},{C},{H},{W}), {K} boxes, {out}x{out}, {Cout} output channels",
        {"input": x, "boxes": boxes},
        ("boxes",),
        ("input",),
        g,
        lambda a: ops.ps_roi_align_forward(a["input"], a["boxes"], out, s, ratio),
        lambda g, a: ops.ps_roi_align_backward(g, a["input"].shape, a["boxes"], out, s, ratio),
        (f, 2 * f),
        "4 multiply-adds per (sample, output channel); backward the same scattered",
        TorchSide(
            lambda t: _tv("ps_roi_align")(t["input"], t["boxes"], out, s, ratio),
            {"input": x, "boxes": boxes},
            ("input",),
            torchvision=True,
        ),
    )


def ps_roi_pool_case(
    dtype: Any,
    N: int,
    Cout: int,
    H: int,
    W: int,
    K: int,
    out: int = 7,
    s: float = 1 / 16,
    seed: int = 0,
) -> OpCase:
    ops = _ops()
    C = Cout * out * out
    rng, x, boxes = _roi_setup(dtype, N, C, H, W, K, s, seed)
    g = rng.standard_normal((K, Cout, out, out)).astype(dtype)
    h, w = _box_extent(boxes, s, H, W)
    f = float(Cout * (h * w).sum())
    return OpCase(
        "ps_roi_pool",
        f"input ({N},{C},{H},{W}), {K} boxes, {out}x{out}, {Cout} output channels",
        {"input": x, "boxes": boxes},
        ("boxes",),
        ("input",),
        g,
        lambda a: ops.ps_roi_pool_forward(a["input"], a["boxes"], out, s),
        lambda g, a: ops.ps_roi_pool_backward(g, a["input"].shape, a["boxes"], out, s),
        (f, 2 * f),
        "one add per (box pixel, output channel); backward the same scattered",
        TorchSide(
            lambda t: _tv("ps_roi_pool")(t["input"], t["boxes"], out, s),
            {"input": x, "boxes": boxes},
            ("input",),
            torchvision=True,
            parity=False,
            note="deformnp pools the last row and column, torchvision's forward does not",
        ),
    )


def deform_roi_pool_case(
    dtype: Any,
    N: int,
    C: int,
    H: int,
    W: int,
    K: int,
    out: int = 7,
    s: float = 1 / 16,
    ratio: int = 2,
    gamma: float = 0.1,
    nan: bool = False,
    seed: int = 0,
) -> OpCase:
    ops = _ops()
    rng, x, boxes = _roi_setup(dtype, N, C, H, W, K, s, seed)
    off = rng.uniform(-1, 1, (K, 2, out, out)).astype(dtype)
    if nan:
        _poison(rng, off)
    g = rng.standard_normal((K, C, out, out)).astype(dtype)
    f = 8.0 * C * out * out * _samples(boxes, s, H, W, out, ratio)
    return OpCase(
        "deform_roi_pool",
        f"input ({N},{C},{H},{W}), {K} boxes, {out}x{out}, ratio {ratio}, gamma {gamma}",
        {"input": x, "boxes": boxes, "offset": off},
        ("boxes",),
        ("input", "offset"),
        g,
        lambda a: ops.deform_roi_pool_forward(
            a["input"], a["boxes"], a["offset"], out, s, ratio, gamma
        ),
        lambda g, a: ops.deform_roi_pool_backward(
            g, a["input"], a["boxes"], a["offset"], out, s, ratio, gamma
        ),
        (f, 3 * f),
        "4 multiply-adds per (sample, channel); backward: the scatter and the offset gradient",
        None,
    )


def deform_ps_roi_pool_case(
    dtype: Any,
    N: int,
    D: int,
    H: int,
    W: int,
    K: int,
    gs: int = 7,
    P: int = 7,
    s: float = 1 / 16,
    spp: int = 4,
    trans_std: float = 0.1,
    nan: bool = False,
    seed: int = 0,
) -> OpCase:
    ops = _ops()
    C = D * gs * gs
    rng, x, boxes = _roi_setup(dtype, N, C, H, W, K, s, seed)
    off = rng.standard_normal((K, 2, P, P)).astype(dtype)
    if nan:
        _poison(rng, off)
    g = rng.standard_normal((K, D, P, P)).astype(dtype)
    args = (s, D, gs, P, None, spp, trans_std)
    f = 8.0 * K * D * P * P * spp * spp
    return OpCase(
        "deform_ps_roi_pool",
        f"input ({N},{C},{H},{W}), {K} boxes, {P}x{P}, {D} output channels, {spp}x{spp} samples",
        {"input": x, "boxes": boxes, "offset": off},
        ("boxes",),
        ("input", "offset"),
        g,
        lambda a: ops.deform_ps_roi_pool_forward(a["input"], a["boxes"], a["offset"], *args),
        lambda g, a: ops.deform_ps_roi_pool_backward(g, a["input"], a["boxes"], a["offset"], *args),
        (f, 3 * f),
        "4 multiply-adds per (sample, output channel); backward: the scatter and the offset grad",
        None,
    )


DETR_LEVELS = ((100, 152), (50, 76), (25, 38), (13, 19))
REFERENCE_LEVELS = ((32, 32), (16, 16), (8, 8), (4, 4))


def ms_deform_attn_case(
    dtype: Any,
    N: int,
    levels: Sequence[tuple[int, int]],
    M: int,
    D: int,
    P: int,
    Lq: int | None = None,
    loc_range: tuple[float, float] = (0.0, 1.0),
    nan: bool = False,
    seed: int = 0,
) -> OpCase:
    ops = _ops()
    from deformnp.ops.attention import level_layout

    rng = np.random.default_rng(seed)
    shapes, starts = level_layout(levels)
    S = int(shapes.prod(axis=1).sum())
    Lq = S if Lq is None else Lq
    L = len(levels)
    value = rng.standard_normal((N, S, M, D)).astype(dtype)
    loc = rng.uniform(*loc_range, (N, Lq, M, L, P, 2)).astype(dtype)
    if nan:
        _poison(rng, loc)
    logits = rng.standard_normal((N, Lq, M, L * P))
    w = np.exp(logits - logits.max(-1, keepdims=True))
    w /= w.sum(-1, keepdims=True)
    attn = w.reshape(N, Lq, M, L, P).astype(dtype)
    g = rng.standard_normal((N, Lq, M * D)).astype(dtype)
    names = ("value", "spatial_shapes", "level_start_index", "sampling_locations")
    names += ("attention_weights",)
    level_list = [(int(h), int(w_)) for h, w_ in levels]

    def call(fn: Callable[..., Any], *lead: Any) -> Callable[..., Any]:
        return lambda a: fn(*lead, *(a[k] for k in names))

    n = N * Lq * M * L * P * D
    return OpCase(
        "ms_deform_attn",
        f"N={N}, L={L} ({levels[0][0]}x{levels[0][1]}..), Lq={Lq}, S={S}, M={M}, D={D}, P={P}",
        dict(zip(names, (value, shapes, starts, loc, attn))),
        ("spatial_shapes", "level_start_index"),
        ("value", "sampling_locations", "attention_weights"),
        g,
        call(ops.ms_deform_attn_forward),
        lambda g, a: ops.ms_deform_attn_backward(g, *(a[k] for k in names)),
        (10.0 * n, 28.0 * n),
        "per (query, head, level, point, channel): 4 multiply-adds to sample, 1 to weight; "
        "backward: the value scatter, the weight and the location gradients",
        TorchSide(
            lambda t: ms_deform_attn_core_pytorch(
                t["value"], level_list, t["sampling_locations"], t["attention_weights"]
            ),
            {"value": value, "sampling_locations": loc, "attention_weights": attn},
            ("value", "sampling_locations", "attention_weights"),
            note="Deformable-DETR's ms_deform_attn_core_pytorch (grid_sample per level)",
        ),
    )


def _dcn_setup(
    rng: np.random.Generator, N: int, H: int, W: int, G: int, D: int, k: int, pad: int
) -> tuple[np.ndarray, int, int, int]:
    """Channels-last input, output size and points for the DCNv3/DCNv4 cases (stride 1,
    dilation 1, offset_scale 1: a sampling position is an integer plus the offset, so offsets
    from ``_frac`` keep the positions off the kinks)."""
    x = rng.standard_normal((N, H, W, G * D))
    Ho, Wo = H + 2 * pad - k + 1, W + 2 * pad - k + 1
    return x, Ho, Wo, k * k


def dcnv3_case(
    dtype: Any,
    N: int,
    H: int,
    W: int,
    G: int,
    D: int,
    k: int = 3,
    pad: int = 1,
    nan: bool = False,
    seed: int = 0,
) -> OpCase:
    """InternImage's DCNv3 core (channels last), against its grid_sample formulation."""
    ops = _ops()
    from deformnp.cases.bench import torch_dcnv3_core

    rng = np.random.default_rng(seed)
    x, Ho, Wo, P = _dcn_setup(rng, N, H, W, G, D, k, pad)
    offset = _frac(rng, -2, 2, (N, Ho, Wo, G * P * 2))
    if nan:
        _poison(rng, offset)
    arrays = {
        "input": x.astype(dtype),
        "offset": offset.astype(dtype),
        "mask": rng.uniform(0, 1, (N, Ho, Wo, G * P)).astype(dtype),
    }
    g = rng.standard_normal((N, Ho, Wo, G * D)).astype(dtype)
    geo = (k, k, 1, 1, pad, pad, 1, 1, G, D, 1.0, False)
    names = ("input", "offset", "mask")
    n = N * Ho * Wo * G * P * D
    return OpCase(
        "dcnv3",
        f"N={N}, {H}x{W}, {G} groups of {D}, {k}x{k}, pad {pad}",
        arrays,
        (),
        names,
        g,
        lambda a: ops.dcnv3_forward(*(a[k_] for k_ in names), *geo),
        lambda g, a: ops.dcnv3_backward(g, *(a[k_] for k_ in names), *geo),
        (10.0 * n, 28.0 * n),
        "per (pixel, group, point, channel): 4 multiply-adds to sample, 1 for the mask; "
        "backward: the input scatter, the mask and the offset gradients",
        TorchSide(
            lambda t: torch_dcnv3_core(t["input"], t["offset"], t["mask"], *geo),
            dict(arrays),
            names,
            note="InternImage's dcnv3_core_pytorch (one grid_sample)",
        ),
    )


def dcnv4_case(
    dtype: Any,
    N: int,
    H: int,
    W: int,
    G: int,
    D: int,
    k: int = 3,
    pad: int = 1,
    extra: int = 0,
    nan: bool = False,
    seed: int = 0,
) -> OpCase:
    """DCNv4 (packed offset_mask, no softmax), against dcnv3_core_pytorch on the unpacked
    offsets and masks."""
    ops = _ops()
    from deformnp.cases.bench import torch_dcnv3_core

    rng = np.random.default_rng(seed)
    x, Ho, Wo, P = _dcn_setup(rng, N, H, W, G, D, k, pad)
    om = rng.uniform(0, 1, (N, Ho, Wo, G * 3 * P + extra))
    blk = om[..., : G * 3 * P].reshape(N, Ho, Wo, G, 3 * P)
    blk[..., : 2 * P] = _frac(rng, -2, 2, (N, Ho, Wo, G, 2 * P))
    if nan:
        _poison(rng, blk[..., : 2 * P])
    om[..., : G * 3 * P] = blk.reshape(N, Ho, Wo, G * 3 * P)
    arrays = {"input": x.astype(dtype), "offset_mask": om.astype(dtype)}
    g = rng.standard_normal((N, Ho, Wo, G * D)).astype(dtype)
    geo = (k, k, 1, 1, pad, pad, 1, 1, G, D, 1.0, 256, False)
    names = ("input", "offset_mask")
    n = N * Ho * Wo * G * P * D

    def torch_fn(t: dict[str, Any]) -> Any:
        b = t["offset_mask"][..., : G * 3 * P].reshape(N, Ho, Wo, G, 3 * P)
        offset = b[..., : 2 * P].reshape(N, Ho, Wo, G * 2 * P)
        mask = b[..., 2 * P :].reshape(N, Ho, Wo, G * P)
        return torch_dcnv3_core(t["input"], offset, mask, *geo[:11], False)

    return OpCase(
        "dcnv4",
        f"N={N}, {H}x{W}, {G} groups of {D}, {k}x{k}, pad {pad}",
        arrays,
        (),
        names,
        g,
        lambda a: ops.dcnv4_forward(*(a[k_] for k_ in names), *geo),
        lambda g, a: ops.dcnv4_backward(g, *(a[k_] for k_ in names), *geo),
        (10.0 * n, 28.0 * n),
        "as dcnv3: per (pixel, group, point, channel) 4 multiply-adds to sample, 1 for the mask",
        TorchSide(
            torch_fn,
            dict(arrays),
            names,
            note="dcnv3_core_pytorch without softmax on the unpacked offset_mask",
        ),
    )


def flash_deform_attn_case(
    dtype: Any,
    N: int,
    levels: Sequence[tuple[int, int]],
    G: int,
    D: int,
    K: int,
    Lq: int | None = None,
    loc_range: tuple[float, float] = (0.0, 1.0),
    nan: bool = False,
    seed: int = 0,
) -> OpCase:
    """DCNv4's FlashDeformAttn (locations and logits packed, softmax inside), against
    Deformable-DETR's grid_sample formulation after a torch softmax."""
    ops = _ops()
    from deformnp.ops.attention import level_layout

    rng = np.random.default_rng(seed)
    shapes, starts = level_layout(levels)
    S = int(shapes.prod(axis=1).sum())
    Lq = S if Lq is None else Lq
    L = len(levels)
    value = rng.standard_normal((N, S, G, D)).astype(dtype)
    loc = rng.uniform(*loc_range, (N, Lq, G, 2 * L * K))
    if nan:
        _poison(rng, loc)
    sla = np.concatenate([loc, 2 * rng.standard_normal((N, Lq, G, L * K))], -1).astype(dtype)
    g = rng.standard_normal((N, Lq, G * D)).astype(dtype)
    names = ("value", "spatial_shapes", "level_start_index", "sampling_loc_attn")
    level_list = [(int(h), int(w_)) for h, w_ in levels]

    def torch_fn(t: dict[str, Any]) -> Any:
        import torch

        s = t["sampling_loc_attn"]
        lo = s[..., : 2 * L * K].reshape(N, Lq, G, L, K, 2)
        attn = torch.softmax(s[..., 2 * L * K :], -1).reshape(N, Lq, G, L, K)
        return ms_deform_attn_core_pytorch(t["value"], level_list, lo, attn)

    n = N * Lq * G * L * K * D
    return OpCase(
        "flash_deform_attn",
        f"N={N}, L={L} ({levels[0][0]}x{levels[0][1]}..), Lq={Lq}, S={S}, G={G}, D={D}, K={K}",
        dict(zip(names, (value, shapes, starts, sla))),
        ("spatial_shapes", "level_start_index"),
        ("value", "sampling_loc_attn"),
        g,
        lambda a: ops.flash_deform_attn_forward(*(a[k_] for k_ in names), 64, K),
        lambda g, a: ops.flash_deform_attn_backward(g, *(a[k_] for k_ in names), 64, K),
        (10.0 * n, 28.0 * n),
        "as ms_deform_attn (the softmax over L*K logits per query and head is not counted)",
        TorchSide(
            torch_fn,
            {"value": value, "sampling_loc_attn": sla},
            ("value", "sampling_loc_attn"),
            note="torch softmax, then Deformable-DETR's ms_deform_attn_core_pytorch",
        ),
    )


Builder = Callable[[Any], OpCase]


def race_cases(smoke: bool) -> list[Builder]:
    """Medium sizes with many sampling points per pixel (tiny ones in smoke mode)."""
    if smoke:
        return [
            lambda dt: bilinear_case(dt, 1, 2, 4, 5, 12, window=3),
            lambda dt: grid_sample_case(dt, 1, 2, 3, 4, 4, 4, "reflection", True),
            lambda dt: deform_conv2d_case(dt, 1, 2, 1, 3, 2, k=1, pad=0, offset_groups=2),
            lambda dt: roi_align_case(dt, 1, 2, 6, 6, 3, 2, 1.0, 2, True),
            lambda dt: roi_pool_case(dt, 1, 2, 6, 6, 3, 2, 1.0),
            lambda dt: ps_roi_align_case(dt, 1, 2, 6, 6, 3, 2, 1.0, 2),
            lambda dt: ps_roi_pool_case(dt, 1, 2, 6, 6, 3, 2, 1.0),
            lambda dt: deform_roi_pool_case(dt, 1, 2, 6, 6, 3, 2, 1.0, 2, 0.1),
            lambda dt: deform_ps_roi_pool_case(dt, 1, 2, 6, 6, 3, 2, 2, 1.0, 2, 0.1),
            lambda dt: ms_deform_attn_case(dt, 1, ((3, 4), (2, 2)), 2, 2, 2, 4, (-0.1, 1.1)),
            lambda dt: dcnv3_case(dt, 1, 3, 3, 2, 2),
            lambda dt: dcnv4_case(dt, 1, 3, 3, 2, 2, extra=1),
            lambda dt: flash_deform_attn_case(dt, 1, ((3, 4), (2, 2)), 2, 2, 2, 4, (-0.1, 1.1)),
        ]
    return [
        lambda dt: bilinear_case(dt, 2, 16, 32, 32, 8192, "zero", window=10),
        lambda dt: bilinear_case(dt, 2, 16, 32, 32, 8192, "clamp", window=10),
        lambda dt: grid_sample_case(dt, 2, 16, 16, 16, 48, 48, "zeros", False),
        lambda dt: grid_sample_case(dt, 2, 16, 16, 16, 48, 48, "reflection", True),
        lambda dt: deform_conv2d_case(dt, 2, 16, 16, 24, 24, groups=2, offset_groups=2),
        lambda dt: roi_align_case(dt, 2, 16, 24, 24, 96, 7, 0.5, 2, True),
        lambda dt: roi_align_case(dt, 2, 16, 24, 24, 96, 7, 0.5, -1, False),
        lambda dt: roi_pool_case(dt, 2, 16, 24, 24, 96, 7, 0.5),
        lambda dt: ps_roi_align_case(dt, 2, 4, 24, 24, 64, 7, 0.5, 2),
        lambda dt: ps_roi_pool_case(dt, 2, 4, 24, 24, 64, 7, 0.5),
        lambda dt: deform_roi_pool_case(dt, 2, 16, 24, 24, 96, 7, 0.5, 2, 0.1),
        lambda dt: deform_ps_roi_pool_case(dt, 2, 4, 24, 24, 64, 7, 7, 0.5, 4, 0.1),
        lambda dt: ms_deform_attn_case(
            dt, 2, ((16, 16), (8, 8), (4, 4), (2, 2)), 4, 16, 4, 500, (-0.05, 1.05)
        ),
        lambda dt: dcnv3_case(dt, 2, 16, 16, 4, 16),
        lambda dt: dcnv4_case(dt, 2, 16, 16, 4, 16, extra=5),
        lambda dt: flash_deform_attn_case(
            dt, 2, ((16, 16), (8, 8), (4, 4), (2, 2)), 4, 16, 4, 500, (-0.05, 1.05)
        ),
    ]


def call_cases(smoke: bool) -> list[Builder]:
    """Small calls for the sanitizer: every op, NaN/inf among the sampling positions, points
    outside the maps, a v1 (no mask) convolution, adaptive RoI sampling."""
    if smoke:
        return [
            lambda dt: bilinear_case(dt, 1, 2, 3, 4, 6, nan=True),
            lambda dt: grid_sample_case(dt, 1, 2, 3, 4, 2, 3, "border", False, nan=True),
            lambda dt: deform_conv2d_case(dt, 1, 1, 1, 2, 2, k=2, pad=0, mask=False, nan=True),
            lambda dt: roi_align_case(dt, 1, 2, 5, 6, 2, 2, 1.0, -1, False),
            lambda dt: roi_pool_case(dt, 1, 2, 5, 6, 2, 2, 1.0),
            lambda dt: ps_roi_align_case(dt, 1, 1, 5, 6, 2, 2, 1.0, 1),
            lambda dt: ps_roi_pool_case(dt, 1, 1, 5, 6, 2, 2, 1.0),
            lambda dt: deform_roi_pool_case(dt, 1, 2, 5, 6, 2, 2, 1.0, 1, 0.2, nan=True),
            lambda dt: deform_ps_roi_pool_case(dt, 1, 1, 5, 6, 2, 2, 2, 1.0, 2, 0.2, nan=True),
            lambda dt: ms_deform_attn_case(dt, 1, ((2, 3), (1, 1)), 1, 2, 2, 3, (-0.3, 1.3), True),
            lambda dt: dcnv3_case(dt, 1, 3, 3, 1, 2, nan=True),
            lambda dt: dcnv4_case(dt, 1, 3, 3, 1, 2, extra=1, nan=True),
            lambda dt: flash_deform_attn_case(
                dt, 1, ((2, 3), (1, 1)), 1, 2, 2, 3, (-0.3, 1.3), True
            ),
        ]
    return [
        lambda dt: bilinear_case(dt, 2, 3, 5, 6, 40, "zero", nan=True),
        lambda dt: bilinear_case(dt, 2, 3, 5, 6, 40, "clamp", nan=True),
        lambda dt: grid_sample_case(dt, 2, 3, 5, 6, 4, 7, "zeros", False, nan=True),
        lambda dt: grid_sample_case(dt, 2, 3, 5, 6, 4, 7, "border", True, nan=True),
        lambda dt: grid_sample_case(dt, 2, 3, 5, 6, 4, 7, "reflection", False, nan=True),
        lambda dt: deform_conv2d_case(dt, 2, 4, 4, 6, 5, groups=2, offset_groups=2, nan=True),
        lambda dt: deform_conv2d_case(dt, 1, 2, 3, 5, 5, mask=False),
        # the tiled Numba GEMM too, where CuPy would otherwise run cuBLAS
        lambda dt: deform_conv2d_case(dt, 2, 4, 4, 6, 5, groups=2, gemm_env="numba"),
        lambda dt: roi_align_case(dt, 2, 3, 8, 9, 5, 3, 0.5, 2, True),
        lambda dt: roi_align_case(dt, 2, 3, 8, 9, 5, 3, 0.5, -1, False),
        lambda dt: roi_pool_case(dt, 2, 3, 8, 9, 5, 3, 0.5),
        lambda dt: ps_roi_align_case(dt, 2, 2, 8, 9, 5, 3, 0.5, 2),
        lambda dt: ps_roi_pool_case(dt, 2, 2, 8, 9, 5, 3, 0.5),
        lambda dt: deform_roi_pool_case(dt, 2, 3, 8, 9, 5, 3, 0.5, 2, 0.1, nan=True),
        lambda dt: deform_ps_roi_pool_case(dt, 2, 2, 8, 9, 5, 3, 3, 0.5, 2, 0.1, nan=True),
        lambda dt: ms_deform_attn_case(
            dt, 2, ((4, 5), (2, 3), (1, 1)), 2, 4, 3, 7, (-0.2, 1.2), nan=True
        ),
        lambda dt: dcnv3_case(dt, 2, 5, 6, 2, 4, nan=True),
        lambda dt: dcnv3_case(dt, 1, 5, 6, 2, 3, k=1, pad=0),
        lambda dt: dcnv4_case(dt, 2, 5, 6, 2, 8, extra=3, nan=True),
        lambda dt: flash_deform_attn_case(
            dt, 2, ((4, 5), (2, 3), (1, 1)), 2, 8, 3, 7, (-0.2, 1.2), nan=True
        ),
    ]


def timing_cases(smoke: bool) -> list[tuple[str, Builder]]:
    """(tag, builder): the reference sizes of deformnp/cases/bench.py ("ref") and the large
    ones ("large"); tiny stand-ins in smoke mode."""
    if smoke:
        return [
            ("ref", lambda dt: bilinear_case(dt, 1, 2, 4, 4, 8)),
            ("ref", lambda dt: grid_sample_case(dt, 1, 2, 4, 4, 3, 3)),
            ("ref", lambda dt: deform_conv2d_case(dt, 1, 1, 1, 2, 2, k=2, pad=0)),
            ("ref", lambda dt: roi_align_case(dt, 1, 2, 6, 6, 3, 2, 1.0, 2, True)),
            ("ref", lambda dt: roi_pool_case(dt, 1, 2, 6, 6, 3, 2, 1.0)),
            ("ref", lambda dt: ps_roi_align_case(dt, 1, 2, 6, 6, 3, 2, 1.0, 2)),
            ("ref", lambda dt: ps_roi_pool_case(dt, 1, 2, 6, 6, 3, 2, 1.0)),
            ("ref", lambda dt: deform_roi_pool_case(dt, 1, 2, 6, 6, 3, 2, 1.0, 2, 0.1)),
            ("ref", lambda dt: deform_ps_roi_pool_case(dt, 1, 2, 6, 6, 3, 2, 2, 1.0, 2, 0.1)),
            ("ref", lambda dt: ms_deform_attn_case(dt, 1, ((3, 4), (2, 2)), 2, 2, 2, 4)),
            ("large", lambda dt: deform_conv2d_case(dt, 1, 2, 1, 3, 2, k=1, pad=0)),
            ("large", lambda dt: ms_deform_attn_case(dt, 1, ((4, 4), (2, 2), (1, 1)), 2, 2, 2)),
            ("ref", lambda dt: dcnv3_case(dt, 1, 3, 3, 2, 2)),
            ("ref", lambda dt: dcnv4_case(dt, 1, 3, 3, 2, 2)),
            ("ref", lambda dt: flash_deform_attn_case(dt, 1, ((3, 4), (2, 2)), 2, 2, 2, 4)),
        ]
    return [
        ("ref", lambda dt: bilinear_case(dt, 4, 64, 32, 32, 1024)),
        ("ref", lambda dt: grid_sample_case(dt, 4, 64, 32, 32, 32, 32)),
        ("ref", lambda dt: deform_conv2d_case(dt, 4, 64, 64, 32, 32)),
        ("ref", lambda dt: roi_align_case(dt, 2, 256, 50, 50, 512)),
        ("ref", lambda dt: roi_pool_case(dt, 2, 256, 50, 50, 512)),
        ("ref", lambda dt: ps_roi_align_case(dt, 2, 8, 50, 50, 512)),
        ("ref", lambda dt: ps_roi_pool_case(dt, 2, 8, 50, 50, 512)),
        ("ref", lambda dt: deform_roi_pool_case(dt, 2, 256, 50, 50, 512)),
        ("ref", lambda dt: deform_ps_roi_pool_case(dt, 2, 8, 50, 50, 512)),
        ("ref", lambda dt: ms_deform_attn_case(dt, 1, REFERENCE_LEVELS, 8, 32, 4)),
        ("large", lambda dt: deform_conv2d_case(dt, 16, 256, 256, 64, 64)),
        # the same with the tiled Numba GEMM (where CuPy runs cuBLAS above): before and after
        (
            "large, Numba GEMM",
            lambda dt: deform_conv2d_case(dt, 16, 256, 256, 64, 64, gemm_env="numba"),
        ),
        ("large", lambda dt: ms_deform_attn_case(dt, 2, DETR_LEVELS, 8, 32, 4)),
        # InternImage-T stage 1 (N=8) and DCNv4's FlashDeformAttn at the DETR encoder's size
        ("large", lambda dt: dcnv3_case(dt, 8, 56, 56, 4, 16)),
        ("large", lambda dt: dcnv4_case(dt, 8, 56, 56, 4, 16, extra=4)),
        ("large", lambda dt: flash_deform_attn_case(dt, 2, DETR_LEVELS, 8, 32, 4)),
    ]


# =============================================================================== worker plumbing


class Recorder:
    """A worker's result file, rewritten after every item so that a killed worker leaves what
    it finished."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.data: dict[str, Any] = {"items": []}

    def save(self) -> None:
        _write_json(self.path, self.data)

    def item(self, d: dict[str, Any]) -> None:
        self.data["items"].append(d)
        self.save()


# numba.cuda, bound by _worker_setup once the simulator switch is set. The script's own kernels
# name it as a module global: Numba's simulator swaps exactly such globals for its fake module.
cuda: Any = None


def _worker_setup(smoke: bool) -> None:
    global cuda
    if smoke:
        os.environ["NUMBA_ENABLE_CUDASIM"] = "1"
    if str(ROOT) not in sys.path:
        sys.path.insert(0, str(ROOT))
    from numba import cuda as numba_cuda

    cuda = numba_cuda


def _is_sim() -> bool:
    from numba import config

    return bool(getattr(config, "ENABLE_CUDASIM", False))


def _host(a: Any) -> np.ndarray | None:
    if a is None:
        return None
    if hasattr(a, "copy_to_host"):
        return a.copy_to_host()
    if hasattr(a, "detach"):  # a torch tensor
        return a.detach().cpu().numpy()
    return np.asarray(a)


def _err(tb: BaseException) -> str:
    return f"{type(tb).__name__}: {tb}"[:500]


class NumbaClock:
    """One call's time in ms: numba CUDA events around it after a device synchronize; the host
    clock under the simulator (whose 'device' work is synchronous host work)."""

    def __init__(self, ncuda: Any, sim: bool) -> None:
        self.ncuda, self.sim = ncuda, sim
        if not sim:
            self.e0 = ncuda.event(timing=True)
            self.e1 = ncuda.event(timing=True)

    def __call__(self, fn: Callable[[], Any]) -> float:
        if self.sim:
            t = time.perf_counter()
            fn()
            return 1e3 * (time.perf_counter() - t)
        self.ncuda.synchronize()
        self.e0.record()
        fn()
        self.e1.record()
        self.e1.synchronize()
        return float(self.e0.elapsed_time(self.e1))


class TorchClock:
    """Likewise with torch.cuda.Event on CUDA; the host clock for torch on the CPU."""

    def __init__(self, torch: Any, device: str) -> None:
        self.torch, self.cuda = torch, device == "cuda"
        if self.cuda:
            self.e0 = torch.cuda.Event(enable_timing=True)
            self.e1 = torch.cuda.Event(enable_timing=True)

    def __call__(self, fn: Callable[[], Any]) -> float:
        if not self.cuda:
            t = time.perf_counter()
            fn()
            return 1e3 * (time.perf_counter() - t)
        self.torch.cuda.synchronize()
        self.e0.record()
        fn()
        self.e1.record()
        self.e1.synchronize()
        return float(self.e0.elapsed_time(self.e1))


def _stats(series: Sequence[float]) -> dict[str, Any]:
    return {
        "median_ms": statistics.median(series),
        "min_ms": min(series),
        "max_ms": max(series),
        "n": len(series),
        "runs_ms": [round(x, 5) for x in series],
    }


def _import_torch(smoke: bool) -> tuple[Any, str | None, str]:
    """(torch or None, the device to compare on, why not / a note)."""
    try:
        import torch
    except Exception:
        return None, None, "torch not installed"
    if torch.cuda.is_available():
        return torch, "cuda", f"torch {torch.__version__} on CUDA"
    if smoke:
        return torch, "cpu", f"torch {torch.__version__} has no CUDA: compared on the CPU"
    return None, None, f"torch {torch.__version__} has no CUDA"


# =============================================================================== worker: device


def work_device(args: argparse.Namespace, rec: Recorder) -> None:
    from numba import cuda as ncuda

    sim = _is_sim()
    d = rec.data
    d["simulator"] = sim
    try:
        avail = bool(ncuda.is_available())
    except Exception as exc:
        avail, d["cuda_error"] = False, _err(exc)
    d["cuda_available"] = avail
    if not avail:
        d["status"] = "error"
        d["summary"] = "numba.cuda sees no CUDA device"
        return
    d["device"] = _device_info(ncuda, sim)
    rec.save()
    for key, fn in (("bandwidth", _measure_bandwidth), ("fp32", _measure_fp32)):
        try:
            d[key] = fn(ncuda, sim)
        except Exception as exc:
            d[key] = {"error": _err(exc), "traceback": _tail(traceback.format_exc(), 2000)}
        rec.save()
    bw = d["bandwidth"].get("best_GBps")
    fl = d["fp32"].get("best_GFLOPs")
    dev = d["device"]
    ok = bw is not None and fl is not None
    d["status"] = "pass" if ok else "fail"
    d["summary"] = (
        f"{dev.get('name')}, cc {dev.get('compute_capability')}, "
        f"{dev.get('multiprocessors')} SMs; copy "
        + (f"{bw / 1e3:.2f} TB/s" if bw else "failed")
        + "; FP32 "
        + (f"{fl / 1e3:.1f} TFLOP/s" if fl else "failed")
        + (" (simulator: not measurements)" if sim else "")
    )


def _device_info(ncuda: Any, sim: bool) -> dict[str, Any]:
    if sim:
        return {"name": "Numba CUDA simulator", "compute_capability": None, "multiprocessors": 1}
    dev = ncuda.get_current_device()
    name = dev.name.decode() if isinstance(dev.name, bytes) else str(dev.name)
    info: dict[str, Any] = {"name": name, "compute_capability": list(dev.compute_capability)}
    for key, attr in (
        ("multiprocessors", "MULTIPROCESSOR_COUNT"),
        ("l2_bytes", "L2_CACHE_SIZE"),
        ("sm_clock_khz", "CLOCK_RATE"),
        ("memory_clock_khz", "MEMORY_CLOCK_RATE"),
        ("memory_bus_bits", "GLOBAL_MEMORY_BUS_WIDTH"),
    ):
        try:
            info[key] = int(getattr(dev, attr))
        except Exception:
            info[key] = None
    try:
        free, total = ncuda.current_context().get_memory_info()
        info["memory_free_bytes"], info["memory_total_bytes"] = int(free), int(total)
    except Exception:
        pass
    try:
        from numba.cuda.cudadrv.driver import driver

        info["driver_cuda_version"] = list(driver.get_version())
    except Exception:
        pass
    try:
        info["runtime_version"] = list(ncuda.runtime.get_version())
    except Exception:
        pass
    return info


def _median_ms(clock: Callable[[Callable[[], Any]], float], fn: Callable[[], Any], n: int) -> float:
    for _ in range(3):
        clock(fn)
    return statistics.median(clock(fn) for _ in range(n))


def _measure_bandwidth(ncuda: Any, sim: bool) -> dict[str, Any]:
    """Bytes read plus bytes written per second, GB/s, of: a grid-stride copy kernel (float32
    and float64 elements), a device-to-device memcpy, torch's copy_ (when torch has CUDA)."""

    @cuda.jit
    def copy_kernel(src, dst):
        for i in range(cuda.grid(1), src.size, cuda.gridsize(1)):
            dst[i] = src[i]

    @cuda.jit
    def fill_kernel(dst):
        for i in range(cuda.grid(1), dst.size, cuda.gridsize(1)):
            dst[i] = (i % 1021) * 0.5 - 17.0

    nbytes = 4096 if sim else 1 << 30
    sms = 1 if sim else ncuda.get_current_device().MULTIPROCESSOR_COUNT
    blocks, threads = (2, 32) if sim else (sms * 32, 256)
    clock = NumbaClock(ncuda, sim)
    reps = 3 if sim else 20
    out: dict[str, Any] = {"bytes_per_copy": nbytes, "counted": "read + written"}
    for dtype in (np.float32, np.float64):
        n = nbytes // np.dtype(dtype).itemsize
        src = ncuda.device_array(n, dtype)
        dst = ncuda.device_array(n, dtype)
        fill_kernel[blocks, threads](src)
        ms = _median_ms(clock, lambda s=src, t=dst: copy_kernel[blocks, threads](s, t), reps)
        out[f"copy_kernel_{np.dtype(dtype).name}_GBps"] = 2 * nbytes / ms / 1e6
        if dtype is np.float64:
            ok = bool(np.array_equal(dst.copy_to_host()[:1024], src.copy_to_host()[:1024]))
            out["copy_kernel_checked"] = ok
            ms = _median_ms(clock, lambda s=src, t=dst: t.copy_to_device(s), reps)
            out["memcpy_dtod_GBps"] = 2 * nbytes / ms / 1e6
        del src, dst
    torch, tdev, _ = _import_torch(False)
    if torch is not None and tdev == "cuda" and not sim:
        a = torch.randn(nbytes // 4, device="cuda")
        b = torch.empty_like(a)
        ms = _median_ms(TorchClock(torch, "cuda"), lambda: b.copy_(a), reps)
        out["torch_copy_GBps"] = 2 * nbytes / ms / 1e6
        del a, b
        torch.cuda.empty_cache()
    measured = [v for k, v in out.items() if k.endswith("_GBps")]
    out["best_GBps"] = max(measured) if measured else None
    return out


def _measure_fp32(ncuda: Any, sim: bool) -> dict[str, Any]:
    """FP32 GFLOP/s: a kernel of 8 independent multiply-add chains per thread (2 FLOP per
    multiply-add; the PTX is checked for fma.rn.f32), and torch's FP32 matmul with TF32 off."""

    @cuda.jit
    def fma_kernel(out, n_iter, b, c):
        i = cuda.grid(1)
        a0 = np.float32(i & 1023) * np.float32(0.0001)
        a1 = a0 + np.float32(0.1)
        a2 = a0 + np.float32(0.2)
        a3 = a0 + np.float32(0.3)
        a4 = a0 + np.float32(0.4)
        a5 = a0 + np.float32(0.5)
        a6 = a0 + np.float32(0.6)
        a7 = a0 + np.float32(0.7)
        for _ in range(n_iter):
            a0 = a0 * b + c
            a1 = a1 * b + c
            a2 = a2 * b + c
            a3 = a3 * b + c
            a4 = a4 * b + c
            a5 = a5 * b + c
            a6 = a6 * b + c
            a7 = a7 * b + c
            a0 = a0 * b + c
            a1 = a1 * b + c
            a2 = a2 * b + c
            a3 = a3 * b + c
            a4 = a4 * b + c
            a5 = a5 * b + c
            a6 = a6 * b + c
            a7 = a7 * b + c
        out[i] = a0 + a1 + a2 + a3 + a4 + a5 + a6 + a7

    sms = 1 if sim else ncuda.get_current_device().MULTIPROCESSOR_COUNT
    blocks, threads, n_iter = (1, 8, 4) if sim else (sms * 16, 256, 8192)
    res = ncuda.device_array(blocks * threads, np.float32)
    b, c = np.float32(0.999999), np.float32(1e-6)
    ms = _median_ms(
        NumbaClock(ncuda, sim),
        lambda: fma_kernel[blocks, threads](res, n_iter, b, c),
        3 if sim else 10,
    )
    flops = 2.0 * 16 * n_iter * blocks * threads
    out: dict[str, Any] = {"fma_kernel_GFLOPs": flops / ms / 1e6}
    if not sim:
        try:
            ptx = "\n".join(str(v) for v in fma_kernel.inspect_asm().values())
            out["fma_kernel_ptx_fma_f32"] = len(re.findall(r"\bfma\.rn\.f32\b", ptx))
        except Exception as exc:
            out["fma_kernel_ptx_fma_f32"] = f"not read: {type(exc).__name__}"
    torch, tdev, _ = _import_torch(False)
    if torch is not None and tdev == "cuda" and not sim:
        torch.backends.cuda.matmul.allow_tf32 = False
        n = 4096
        x = torch.randn(n, n, device="cuda")
        y = torch.randn(n, n, device="cuda")
        ms = _median_ms(TorchClock(torch, "cuda"), lambda: torch.mm(x, y), 10)
        out["torch_matmul_fp32_GFLOPs"] = 2.0 * n**3 / ms / 1e6
        del x, y
        torch.cuda.empty_cache()
    measured = [v for k, v in out.items() if k.endswith("_GFLOPs")]
    out["best_GFLOPs"] = max(measured) if measured else None
    return out


# =============================================================================== worker: races


def _rel(got: np.ndarray | None, ref: np.ndarray | None) -> float:
    """max |got - ref| / max(1, max |ref|) (inf when shapes differ or one is missing)."""
    if got is None or ref is None or got.shape != ref.shape:
        return math.inf
    if got.size == 0:
        return 0.0
    with np.errstate(invalid="ignore"):
        diff = np.abs(got.astype(np.float64) - ref.astype(np.float64))
    both_nan = np.isnan(got) & np.isnan(ref)
    diff = np.where(both_nan, 0.0, diff)
    if np.isnan(diff).any():
        return math.inf
    return float(diff.max() / max(1.0, float(np.nanmax(np.abs(ref)))))


def _same_bits(a: np.ndarray | None, b: np.ndarray | None) -> bool:
    return a is not None and b is not None and a.shape == b.shape and a.tobytes() == b.tobytes()


def race_one(case: OpCase, ncuda: Any, deterministic: Callable[[bool], None]) -> dict[str, Any]:
    host = case.inputs
    out_c = _host(case.forward(host))
    grads_c = [_host(x) for x in case.backward(case.grad_out, host)]
    dev = case.on_device(ncuda)
    g = ncuda.to_device(case.grad_out)
    out_1 = _host(case.forward(dev))
    out_2 = _host(case.forward(dev))
    atomic_1 = [_host(x) for x in case.backward(g, dev)]
    atomic_2 = [_host(x) for x in case.backward(g, dev)]
    deterministic(True)
    try:
        det_1 = [_host(x) for x in case.backward(g, dev)]
        det_2 = [_host(x) for x in case.backward(g, dev)]
    finally:
        deterministic(False)
    names = case.wrt
    item: dict[str, Any] = {
        "op": case.op,
        "size": case.size,
        "forward_err": _rel(out_1, out_c),
        "forward_repeat_identical": _same_bits(out_1, out_2),
        "grad_err": {n: _rel(a, c) for n, a, c in zip(names, atomic_1, grads_c)},
        "det_grad_err": {n: _rel(a, c) for n, a, c in zip(names, det_1, grads_c)},
        "det_identical": {n: _same_bits(a, b) for n, a, b in zip(names, det_1, det_2)},
        "atomic_repeat_identical": {
            n: _same_bits(a, b) for n, a, b in zip(names, atomic_1, atomic_2)
        },
        "finite": bool(
            all(np.isfinite(x).all() for x in [out_1, *atomic_1, *det_1] if x is not None)
        ),
        "n_grads": {"cpu": len(grads_c), "atomic": len(atomic_1), "det": len(det_1)},
    }
    problems = []
    if item["forward_err"] > FLOAT64_TOL:
        problems.append(f"forward err {item['forward_err']:.2e}")
    if not item["forward_repeat_identical"]:
        problems.append("forward not bit-identical across two runs")
    if not len(grads_c) == len(atomic_1) == len(det_1) == len(names):
        problems.append(f"gradient counts {item['n_grads']} for {len(names)} inputs")
    for key, label in (("grad_err", "atomic"), ("det_grad_err", "deterministic")):
        for n, e in item[key].items():
            if e > FLOAT64_TOL:
                problems.append(f"{label} grad {n} err {e:.2e}")
    for n, same in item["det_identical"].items():
        if not same:
            problems.append(f"deterministic grad {n} differs between two runs")
    if not item["finite"]:
        problems.append("non-finite values in the GPU results")
    item["status"] = "fail" if problems else "pass"
    item["problems"] = problems
    return item


def work_races(args: argparse.Namespace, rec: Recorder) -> None:
    from numba import cuda as ncuda

    import deformnp as dn

    deterministic = getattr(dn, "use_deterministic_algorithms", None)
    if deterministic is None:
        rec.data["status"] = "error"
        rec.data["summary"] = "deformnp.use_deterministic_algorithms does not exist"
        return
    margin = 2.0 if args.smoke else 8.0
    builders = race_cases(args.smoke)
    for i, build in enumerate(builders):
        if args.stop_at - time.time() < margin:
            rec.item({"op": f"case {i}", "status": "skipped", "reason": "budget"})
            continue
        t = time.time()
        try:
            item = race_one(build(np.float64), ncuda, deterministic)
        except Exception as exc:
            item = {
                "op": f"case {i}",
                "status": "error",
                "error": _err(exc),
                "traceback": _tail(traceback.format_exc(), 3000),
            }
            try:
                deterministic(False)
            except Exception:
                pass
        item["seconds"] = round(time.time() - t, 2)
        rec.item(item)
        worst = max([item.get("forward_err", 0.0), *item.get("grad_err", {}).values()] or [0])
        _say(
            f"  races: {item.get('op')} [{item.get('size', '')}] {item['status']} "
            f"(max err {worst:.1e}, {item['seconds']} s)"
            + (f": {'; '.join(item['problems'])}" if item.get("problems") else "")
            + (f": {item['error']}" if item.get("error") else "")
        )
    items = rec.data["items"]
    bad = [x for x in items if x["status"] in ("fail", "error")]
    skipped = [x for x in items if x["status"] == "skipped"]
    rec.data["status"] = "fail" if bad else "pass"
    rec.data["summary"] = (
        f"{len(items) - len(bad) - len(skipped)}/{len(items)} cases match the CPU to "
        f"{FLOAT64_TOL:g} with bit-identical deterministic gradients"
        + (f"; failing: {', '.join(x['op'] for x in bad)}" if bad else "")
        + (f"; {len(skipped)} skipped for the budget" if skipped else "")
    )


# =============================================================================== --calls target


def calls_main(args: argparse.Namespace) -> int:
    """One small call of each kernel (for compute-sanitizer): forward, backward and
    deterministic backward of every op, the device loss ops, in each dtype."""
    _worker_setup(args.smoke)
    from numba import cuda as ncuda

    import deformnp as dn
    from deformnp import ops

    sim = _is_sim()
    dtypes = (np.float32,) if args.smoke else (np.float32, np.float64)
    ok = failed = 0

    def attempt(label: str, fn: Callable[[], Any]) -> None:
        nonlocal ok, failed
        try:
            fn()
            ncuda.synchronize()
            ok += 1
        except Exception as exc:
            failed += 1
            _say(f"CALL-FAILED {label}: {_err(exc)}")

    for dtype in dtypes:
        dname = np.dtype(dtype).name
        for i, build in enumerate(call_cases(args.smoke)):
            try:
                case = build(dtype)
            except Exception as exc:
                failed += 1
                _say(f"CALL-FAILED building case {i} ({dname}): {_err(exc)}")
                continue
            label = f"{case.op} [{case.size}] {dname}"
            try:
                dev = case.on_device(ncuda)
                g = ncuda.to_device(case.grad_out)
            except Exception as exc:
                failed += 1
                _say(f"CALL-FAILED {label} to device: {_err(exc)}")
                continue
            attempt(f"{label} forward", lambda c=case, a=dev: c.forward(a))
            attempt(f"{label} backward", lambda c=case, a=dev, g=g: c.run_forward_backward(g, a))

            def det(c: OpCase = case, a: dict = dev, g: Any = g) -> None:
                dn.use_deterministic_algorithms(True)
                try:
                    c.backward(g, a)
                finally:
                    dn.use_deterministic_algorithms(False)

            attempt(f"{label} deterministic backward", det)

        def loss_ops(dtype: Any = dtype) -> None:
            rng = np.random.default_rng(5)
            x = dn.tensor(rng.standard_normal((2, 3, 5, 6)).astype(dtype)).to("cuda")
            pts = dn.tensor(_frac(rng, -1, 6, (2, 7, 2)).astype(dtype)).to("cuda")
            x.requires_grad_()
            pts.requires_grad_()
            y = ops.bilinear_interpolate(x, pts)
            w = dn.tensor(rng.uniform(0.5, 2, y.shape).astype(dtype)).to("cuda")
            loss = ((y * w + y - w) / (w * w + 1.0) - (-y) * 0.5 + 2.0 / w).mean() + (y / 3.0).sum()
            loss.backward()
            _ = x.grad.copy_to_host(), pts.grad.copy_to_host()

        attempt(f"Tensor loss ops and backward {dname}", loss_ops)

    not_launched = None if sim else _kernels_never_launched()
    if not_launched:
        _say(f"calls: kernels never launched: {', '.join(not_launched)}")
    _say(f"gpu_check --calls: {ok} calls ok, {failed} failed")
    return 0 if failed == 0 else 1


def _kernels_never_launched() -> list[str] | None:
    """The module-level CUDA kernels of deformnp.kernels.cuda with no compiled overload (so not
    launched by the calls); None when that cannot be read."""
    import importlib
    import pkgutil

    try:
        import deformnp.kernels.cuda as pkg
    except Exception:
        return None
    missing = []
    for m in pkgutil.iter_modules(pkg.__path__):
        if m.name == "ptx":  # a tool, not kernels
            continue
        try:
            mod = importlib.import_module(f"{pkg.__name__}.{m.name}")
        except Exception:
            continue
        for name, obj in vars(mod).items():
            if type(obj).__name__ != "CUDADispatcher":
                continue
            if getattr(getattr(obj, "py_func", None), "__module__", None) != mod.__name__:
                continue  # imported from another module: counted there
            if getattr(obj, "targetoptions", {}).get("device"):
                continue
            overloads = getattr(obj, "overloads", None)
            if overloads is not None and len(overloads) == 0:
                missing.append(f"{m.name}.{name}")
    return missing


# =============================================================================== worker: timing


class L2Flush:
    """Evicts the L2 between timed calls: a device-to-device copy of 256 MiB (L2 is 50-60 MB on
    an H100/H200). Off under the simulator."""

    def __init__(self, ncuda: Any, enabled: bool) -> None:
        self.enabled = enabled
        if enabled:
            n = 256 << 20
            self.a = ncuda.device_array(n, np.uint8)
            self.b = ncuda.device_array(n, np.uint8)

    def __call__(self) -> None:
        if self.enabled:
            self.b.copy_to_device(self.a)


def _alternate(
    fns: list[tuple[Callable[[], Any], Callable[[Callable[[], Any]], float]]],
    flush: L2Flush,
    n: int,
) -> list[list[float]]:
    """``n`` timed runs of each (fn, clock), alternating, the L2 flushed before each; garbage
    collection off while they run."""
    series: list[list[float]] = [[] for _ in fns]
    was = gc.isenabled()
    gc.collect()
    gc.disable()
    try:
        for _ in range(n):
            for (fn, clock), s in zip(fns, series):
                flush()
                s.append(clock(fn))
    finally:
        if was:
            gc.enable()
    return series


def time_case(
    tag: str,
    case: OpCase,
    ncuda: Any,
    torch: Any,
    tdev: str | None,
    treason: str,
    tv_reason: str | None,
    flush: L2Flush,
    warmup: int,
    repeat: int,
    case_budget_s: float,
) -> dict[str, Any]:
    sim = _is_sim()
    dn_clock = NumbaClock(ncuda, sim)
    item: dict[str, Any] = {
        "op": case.op,
        "tag": tag,
        "size": case.size,
        "flop_model": case.flop_model,
        "phases": {},
    }
    dev = case.on_device(ncuda)
    g = ncuda.to_device(case.grad_out)

    def dn_fwd() -> Any:
        return case.forward(dev)

    def dn_fb() -> Any:
        return case.run_forward_backward(g, dev)

    t = time.perf_counter()
    out = _host(dn_fwd())
    first_fwd = time.perf_counter() - t
    t = time.perf_counter()
    dn_grads = [_host(x) for x in dn_fb()]
    item["first_call_s"] = {"forward": first_fwd, "fwd+bwd": time.perf_counter() - t}
    in_bytes = sum(v.nbytes for v in case.inputs.values())
    grad_bytes = sum(case.inputs[k].nbytes for k in case.wrt)
    item["bytes"] = {
        "forward": in_bytes + out.nbytes,
        "fwd+bwd": in_bytes + case.grad_out.nbytes + out.nbytes + grad_bytes,
    }
    item["flops"] = {"forward": case.flops[0], "fwd+bwd": case.flops[1]}
    item["output_finite"] = bool(np.isfinite(out).all())

    # the torch side
    t_fwd = t_fb = None
    ts = case.torch
    if ts is None:
        item["torch"] = {"available": False, "reason": "no torch counterpart"}
    elif torch is None:
        item["torch"] = {"available": False, "reason": treason}
    elif ts.torchvision and tv_reason:
        item["torch"] = {"available": False, "reason": tv_reason}
    else:
        item["torch"] = {"available": True, "device": tdev, "note": ts.note}
        try:
            tin = {
                k: torch.from_numpy(np.ascontiguousarray(v)).to(tdev) for k, v in ts.inputs.items()
            }
            leaves = [tin[k].requires_grad_(True) for k in ts.wrt]
            tg = torch.from_numpy(
                np.ascontiguousarray(case.grad_out if ts.grad_out is None else ts.grad_out)
            ).to(tdev)

            def _t_fwd() -> Any:
                with torch.no_grad():
                    return ts.fn(tin)

            def _t_fb() -> Any:
                return torch.autograd.grad(ts.fn(tin), leaves, tg)

            tout = _host(_t_fwd()).reshape(-1)
            t_grads = [_host(x) for x in _t_fb()]
            ref = tout.astype(np.float64)
            got = out.reshape(-1).astype(np.float64)
            rel = (
                float(np.linalg.norm(got - ref) / max(np.linalg.norm(ref), 1e-30))
                if got.shape == ref.shape
                else math.inf
            )
            grads_rel = {}
            for name, tgr in zip(ts.wrt, t_grads):
                if name in case.wrt:
                    dg = dn_grads[case.wrt.index(name)]
                    if dg is not None and tgr is not None and dg.shape == tgr.shape:
                        r = np.linalg.norm(tgr.astype(np.float64))
                        grads_rel[name] = float(
                            np.linalg.norm(dg.astype(np.float64) - tgr) / max(r, 1e-30)
                        )
            item["parity"] = {
                "forward_rel_err": rel,
                "checked": ts.parity,
                "ok": (rel <= PARITY_TOL) if ts.parity else None,
                "grads_rel_err": grads_rel,
                "note": ts.note if not ts.parity else "",
            }
            t_fwd, t_fb = _t_fwd, _t_fb
        except Exception as exc:
            item["torch"] = {"available": False, "reason": f"torch call failed: {_err(exc)}"}
    t_clock = TorchClock(torch, tdev) if t_fwd is not None else None

    per_phase = case_budget_s / 2
    for phase, f_dn, f_t in (("forward", dn_fwd, t_fwd), ("fwd+bwd", dn_fb, t_fb)):
        fns: list[tuple[Callable[[], Any], Callable[[Callable[[], Any]], float]]] = [
            (f_dn, dn_clock)
        ]
        if f_t is not None and t_clock is not None:
            fns.append((f_t, t_clock))
        t = time.perf_counter()
        _alternate(fns, flush, warmup)
        each = (time.perf_counter() - t) / max(1, warmup)
        n = repeat if each <= 0 else max(3, min(repeat, int(per_phase / each)))
        series = _alternate(fns, flush, n)
        item["phases"][phase] = {
            "deformnp": _stats(series[0]),
            "torch": _stats(series[1]) if len(series) > 1 else None,
        }
        if not sim:
            item["phases"][phase]["deformnp"]["host_ms"] = _host_ms(f_dn, ncuda)
    if not sim:
        item["profile"] = _profile(dn_fb, ncuda)
    return item


def _host_ms(fn: Callable[[], Any], ncuda: Any, n: int = 7) -> float:
    """The median time the host spends in one call (Python, launches, allocations, copies it
    waits for), the device synchronized before each and after: near the event time, the call
    is bound by the host, not by its kernels."""
    times = []
    for _ in range(n):
        ncuda.synchronize()
        t = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t) * 1e3)
    ncuda.synchronize()
    return statistics.median(times)


def _profile(fn: Callable[[], Any], ncuda: Any, n: int = 5, top: int = 12) -> list[str]:
    """cProfile over ``n`` calls: the ``top`` functions by own time, per call."""
    import cProfile
    import pstats

    prof = cProfile.Profile()
    ncuda.synchronize()
    prof.enable()
    for _ in range(n):
        fn()
    ncuda.synchronize()
    prof.disable()
    stats = pstats.Stats(prof)
    rows = sorted(stats.stats.items(), key=lambda kv: kv[1][2], reverse=True)[:top]  # type: ignore[attr-defined]
    out = []
    for (file, line, name), (_, ncalls, tottime, cumtime, _) in rows:
        where = f"{Path(file).name}:{line}" if line else file
        out.append(
            f"{name} ({where}): {1e3 * tottime / n:.3f} ms own, {1e3 * cumtime / n:.3f} ms "
            f"total, {ncalls / n:g} calls"
        )
    return out


def work_timing(args: argparse.Namespace, rec: Recorder) -> None:
    from numba import cuda as ncuda

    sim = _is_sim()
    torch, tdev, treason = _import_torch(args.smoke)
    tv_reason = None
    if torch is not None:
        try:
            import torchvision

            torchvision_version = torchvision.__version__
        except Exception as exc:
            tv_reason = f"torchvision not installed ({type(exc).__name__})"
            torchvision_version = None
        if tdev == "cuda":  # compare float32 with float32
            torch.backends.cuda.matmul.allow_tf32 = False
            torch.backends.cudnn.allow_tf32 = False
    else:
        torchvision_version = None
    flush = L2Flush(ncuda, enabled=not (sim or args.no_flush))
    warmup = 1 if args.smoke else args.warmup
    repeat = 2 if args.smoke else args.repeat
    rec.data.update(
        {
            "simulator": sim,
            "torch": {"device": tdev, "note": treason, "torchvision": torchvision_version},
            "l2_flush": flush.enabled,
            "warmup": warmup,
            "repeat": repeat,
            "dtype": "float32",
            "clock": "host perf_counter (simulator)" if sim else "CUDA events",
        }
    )
    cases = timing_cases(args.smoke)
    margin = 2.0 if args.smoke else 10.0
    for i, (tag, build) in enumerate(cases):
        left = args.stop_at - time.time()
        if left < margin:
            rec.item({"op": f"case {i}", "tag": tag, "status": "skipped", "reason": "budget"})
            continue
        case_budget = min(15.0, (left - margin) / (len(cases) - i))
        t = time.time()
        try:
            item = time_case(
                tag,
                build(np.float32),
                ncuda,
                torch,
                tdev,
                treason,
                tv_reason,
                flush,
                warmup,
                repeat,
                case_budget,
            )
            parity = item.get("parity", {})
            bad = parity.get("ok") is False or not item["output_finite"]
            item["status"] = "fail" if bad else "pass"
        except Exception as exc:
            item = {
                "op": f"case {i}",
                "tag": tag,
                "status": "error",
                "error": _err(exc),
                "traceback": _tail(traceback.format_exc(), 3000),
            }
        item["seconds"] = round(time.time() - t, 2)
        rec.item(item)
        ph = item.get("phases", {})
        msg = ", ".join(
            f"{p} {_fmt_ms(v['deformnp']['median_ms'])} ms"
            + (f" (torch {_fmt_ms(v['torch']['median_ms'])})" if v.get("torch") else "")
            for p, v in ph.items()
        )
        _say(
            f"  timing: {item.get('op')} [{item.get('size', tag)}] {item['status']}: "
            + (msg or item.get("error", ""))
            + f" ({item['seconds']} s)"
        )
    items = rec.data["items"]
    bad = [x for x in items if x["status"] in ("fail", "error")]
    skipped = [x for x in items if x["status"] == "skipped"]
    rec.data["status"] = "fail" if bad else "pass"
    rec.data["summary"] = (
        f"{len(items) - len(bad) - len(skipped)}/{len(items)} cases timed"
        + (f"; failing: {', '.join(x['op'] for x in bad)}" if bad else "")
        + (f"; {len(skipped)} skipped for the budget" if skipped else "")
    )


WORKERS: dict[str, Callable[[argparse.Namespace, Recorder], None]] = {
    "device": work_device,
    "races": work_races,
    "timing": work_timing,
}


def worker_main(args: argparse.Namespace) -> int:
    _worker_setup(args.smoke)
    rec = Recorder(args.result)
    rec.data["pid"] = os.getpid()
    rec.save()
    try:
        WORKERS[args.worker](args, rec)
    except Exception as exc:
        rec.data["status"] = "error"
        rec.data["summary"] = _err(exc)
        rec.data["traceback"] = _tail(traceback.format_exc(), 4000)
        rec.save()
        _say(f"  {args.worker}: {_err(exc)}")
        return 1
    rec.save()
    return 0


# =============================================================================== orchestrator


@dataclass
class Context:
    args: argparse.Namespace
    tmp: Path
    env: dict[str, str]
    results: dict[str, dict[str, Any]] = field(default_factory=dict)
    environment: dict[str, Any] = field(default_factory=dict)


def _run_worker(ctx: Context, name: str, timeout: float, extra: Sequence[str] = ()) -> dict:
    result = ctx.tmp / f"{name}.json"
    grace = 5.0 if ctx.args.smoke else 20.0
    stop_at = time.time() + max(timeout - grace, 0.6 * timeout)
    cmd = [sys.executable, str(SCRIPT), "--worker", name, "--result", str(result)]
    cmd += ["--stop-at", f"{stop_at:.3f}", *extra]
    if ctx.args.smoke:
        cmd.append("--smoke")
    rc, _, timed_out = _spawn(cmd, timeout, ctx.env, capture=False)
    data = _load_json(result)
    data.pop("pid", None)
    data["returncode"] = rc
    if timed_out:
        data["status"] = "timeout"
        done = [x.get("op") for x in data.get("items", [])]
        data["summary"] = f"killed after {timeout:.0f} s; finished: {', '.join(done) or 'nothing'}"
    elif "status" not in data:
        data["status"] = "error"
        data["summary"] = f"worker exited with {rc} and no result"
    elif rc != 0 and data["status"] == "pass":
        data["status"] = "error"
        data["summary"] = f"worker exited with {rc}"
    return data


def stage_env(ctx: Context, timeout: float) -> dict[str, Any]:
    versions = _versions()
    smi = _nvidia_smi()
    exe, looked = find_compute_sanitizer()
    san: dict[str, Any] = {"path": exe, "looked_in": looked}
    if exe:
        try:
            r = subprocess.run([exe, "--version"], capture_output=True, text=True, timeout=20)
            san["version"] = (r.stdout.strip().splitlines() or [""])[-1]
        except (OSError, subprocess.TimeoutExpired) as exc:
            san["version_error"] = str(exc)
    info = {
        "python": sys.version.split()[0],
        "executable": sys.executable,
        "platform": platform.platform(),
        "cpus": os.cpu_count(),
        "versions": versions,
        "nvidia_smi": smi,
        "compute_sanitizer": san,
        "git": _git(),
    }
    gpu = (smi.get("gpus") or [{}])[0]
    summary = (
        (f"{gpu.get('name')}, driver {gpu.get('driver_version')}" if gpu else "no nvidia-smi")
        + (f", CUDA {smi['cuda_version']}" if smi.get("cuda_version") else "")
        + f"; numba {versions['numba']}, numba-cuda {versions['numba-cuda']}, "
        f"torch {versions['torch'] or 'absent'}, torchvision {versions['torchvision'] or 'absent'}"
    )
    ctx.environment.update(
        {
            "gpu": gpu.get("name"),
            "driver": gpu.get("driver_version"),
            "cuda": smi.get("cuda_version"),
            "python": info["python"],
            **{k: versions.get(k) for k in ("numba", "numba-cuda", "torch", "torchvision")},
            "deformnp": versions.get("deformnp"),
            "commit": info["git"].get("commit"),
        }
    )
    return {"status": "pass", "summary": summary, "info": info}


def stage_device(ctx: Context, timeout: float) -> dict[str, Any]:
    data = _run_worker(ctx, "device", timeout)
    dev = data.get("device") or {}
    ctx.environment["numba_device"] = {
        k: dev.get(k) for k in ("name", "compute_capability", "multiprocessors")
    }
    return data


def _pytest_counts(out: str) -> dict[str, int]:
    lines = [ln for ln in out.splitlines() if re.search(r"\d+ (passed|failed|error|skipped)", ln)]
    if not lines:
        return {}
    counts: dict[str, int] = {}
    for n, what in re.findall(r"(\d+) (\w+)", lines[-1]):
        counts[what.rstrip("s") if what in ("errors", "warnings") else what] = int(n)
    return counts


def stage_pytest(ctx: Context, timeout: float) -> dict[str, Any]:
    pattern = "test_cuda.py" if ctx.args.smoke else "test_cuda*.py"
    files = sorted(os.path.relpath(p, ROOT) for p in glob.glob(str(ROOT / "tests" / pattern)))
    if not files:
        return {"status": "error", "summary": "no tests/test_cuda*.py found"}
    if not ctx.args.smoke:
        # the other families' test_cuda_* tests, the README's CUDA snippet and the torch
        # adapter's CUDA path (zero-copy, streams; that module skips itself without torch)
        files += [f"tests/{f}" for f in CUDA_TESTS_ELSEWHERE if (ROOT / "tests" / f).exists()]
    missing = [m for m in ("pytest", "hypothesis") if importlib.util.find_spec(m) is None]
    if missing:
        return {
            "status": "error",
            "summary": f"{', '.join(missing)} not installed for {sys.executable}",
        }
    cmd = [sys.executable, "-m", "pytest", *files, "-q", "-rfEs", "--tb=short"]
    cmd += ["-p", "no:cacheprovider", "-o", "addopts=", "--durations=5"]
    workers = pytest_workers(ctx.args)
    if workers:
        # most of this stage is Numba compiling each kernel specialisation on one core; the
        # workers compile theirs side by side (each with its own CUDA context), sharing the
        # on-disk cache that the later stages load
        cmd += ["-n", str(workers)]
    cmd += ["-k", SMOKE_PYTEST_K if ctx.args.smoke else "cuda"]
    rc, out, timed_out = _spawn(cmd, timeout, ctx.env, capture=True, echo=True)
    counts = _pytest_counts(out)
    failures = [ln for ln in out.splitlines() if ln.startswith(("FAILED", "ERROR"))]
    if timed_out:
        status = "timeout"
    elif rc == 0 and counts.get("passed", 0) > 0:
        status = "pass"
    else:
        status = "fail"
    last = [ln.strip("= ") for ln in out.splitlines() if re.search(r" in [\d.]+s", ln)]
    summary = last[-1] if last else f"pytest exited with {rc}"
    if timed_out:
        summary = f"killed after {timeout:.0f} s; " + summary
    return {
        "status": status,
        "summary": summary,
        "counts": counts,
        "returncode": rc,
        "command": cmd,
        "env": {"DEFORMNP_REAL_GPU": ctx.env.get("DEFORMNP_REAL_GPU")},
        "failures": failures[:50],
        "output_tail": _tail(out, 6000),
    }


def pytest_workers(args: argparse.Namespace) -> int:
    """pytest-xdist workers for the pytest stage: ``--pytest-workers``, or by default half the
    CPUs up to 8 on a GPU (none under --smoke), and none when pytest-xdist is not installed."""
    if importlib.util.find_spec("xdist") is None:
        return 0
    if args.pytest_workers >= 0:
        return args.pytest_workers
    return 0 if args.smoke else max(0, min(8, (os.cpu_count() or 1) // 2))


def stage_races(ctx: Context, timeout: float) -> dict[str, Any]:
    return _run_worker(ctx, "races", timeout)


def _calls_cmd(smoke: bool) -> list[str]:
    return [sys.executable, str(SCRIPT), "--calls"] + (["--smoke"] if smoke else [])


def _calls_counts(out: str) -> tuple[int | None, int | None]:
    m = re.findall(r"gpu_check --calls: (\d+) calls ok, (\d+) failed", out)
    return (int(m[-1][0]), int(m[-1][1])) if m else (None, None)


def _sanitizer_help(exe: str) -> str:
    try:
        r = subprocess.run([exe, "--help"], capture_output=True, text=True, timeout=30)
        return r.stdout + r.stderr
    except (OSError, subprocess.TimeoutExpired):
        return ""


def stage_sanitizer(ctx: Context, timeout: float, tool: str) -> dict[str, Any]:
    if ctx.args.smoke:
        reason = "smoke mode (the simulator has no device to sanitize)"
        if tool != "memcheck":
            return {"status": "skipped", "summary": reason}
        rc, out, timed_out = _spawn(_calls_cmd(True), timeout, ctx.env, capture=True)
        ok, failed = _calls_counts(out)
        dry = "timeout" if timed_out else "pass" if rc == 0 and ok else "fail"
        res = {
            "status": "skipped" if dry == "pass" else "fail",
            "summary": f"{reason}; --calls ran under the simulator: {ok} calls ok, {failed} failed"
            + ("" if dry == "pass" else f" ({dry})"),
            "calls_dry_run": dry,
            "output_tail": _tail(out, 3000),
        }
        return res
    exe, looked = find_compute_sanitizer()
    if exe is None:
        return {
            "status": "skipped",
            "summary": "compute-sanitizer not found",
            "looked_in": looked,
        }
    cmd = [exe, "--tool", tool, "--error-exitcode", "86", "--print-limit", "40"]
    if "--report-api-errors" in _sanitizer_help(exe):
        # driver calls that fail by design (numba probing) are not memory errors
        cmd += ["--report-api-errors", "no"]
    cmd += _calls_cmd(False)
    rc, out, timed_out = _spawn(cmd, timeout, ctx.env, capture=True)
    ok, failed = _calls_counts(out)
    m = re.findall(r"ERROR SUMMARY: (\d+) error", out)
    # racecheck ends with its own line instead: "RACECHECK SUMMARY: 0 hazards displayed
    # (0 errors, 0 warnings)"; its errors are the hazards it counts as such
    m = m or re.findall(r"RACECHECK SUMMARY: \d+ hazards? displayed \((\d+) error", out)
    errors = int(m[-1]) if m else None
    hz = re.findall(r"RACECHECK SUMMARY: (\d+) hazard", out)
    findings = [
        ln.strip()
        for ln in out.splitlines()
        if ln.startswith("=========") and re.search(r"Invalid|[Hh]azard|Race|Error|error|at 0x", ln)
    ]
    unsupported = re.search(r"not supported|Device not supported|error 999", out)
    if timed_out:
        status, summary = "timeout", f"killed after {timeout:.0f} s"
    elif unsupported and errors is None:
        status, summary = "error", f"compute-sanitizer could not use the device: {unsupported[0]}"
    elif errors is None:
        status, summary = "error", f"no ERROR SUMMARY from compute-sanitizer (exit {rc})"
    elif errors > 0 or rc == 86:
        status, summary = "fail", f"{errors} errors"
    elif failed or ok is None or rc != 0:
        status = "fail"
        summary = f"0 sanitizer errors, but the calls: {ok} ok, {failed} failed (exit {rc})"
    else:
        status, summary = "pass", f"0 errors over {ok} calls"
    if hz:
        summary += f"; {hz[-1]} hazards"
    nl = re.findall(r"kernels never launched: (.*)", out)
    return {
        "status": status,
        "summary": summary,
        "sanitizer": exe,
        "command": cmd,
        "errors": errors,
        "calls_ok": ok,
        "calls_failed": failed,
        "kernels_never_launched": nl[-1].split(", ") if nl else [],
        "findings": findings[:60],
        "output_tail": _tail(out, 5000),
    }


def stage_timing(ctx: Context, timeout: float) -> dict[str, Any]:
    extra = ["--repeat", str(ctx.args.repeat), "--warmup", str(ctx.args.warmup)]
    if ctx.args.no_flush:
        extra.append("--no-flush")
    data = _run_worker(ctx, "timing", timeout, extra)
    dev = ctx.results.get("device", {})
    bw = (dev.get("bandwidth") or {}).get("best_GBps")
    fl = (dev.get("fp32") or {}).get("best_GFLOPs")
    source = "device stage"
    if dev.get("simulator") or data.get("simulator"):
        bw = fl = None
        source = "none: the simulator measures nothing"
    data["ceilings"] = {"bandwidth_GBps": bw, "fp32_GFLOPs": fl, "from": source}
    for item in data.get("items", []):
        for phase, ph in item.get("phases", {}).items():
            b = item["bytes"][phase]
            f = item["flops"][phase]
            floor_b = b / bw / 1e6 if bw else None  # ms
            floor_f = f / fl / 1e6 if fl else None
            floors = [x for x in (floor_b, floor_f) if x is not None]
            ph["floor_ms"] = max(floors) if floors else None
            ph["floor_bytes_ms"], ph["floor_flops_ms"] = floor_b, floor_f
            ph["bound"] = (
                None if not floors else "mem" if (floor_b or 0) >= (floor_f or 0) else "fp32"
            )
            for side in ("deformnp", "torch"):
                st = ph.get(side)
                if not st:
                    continue
                ms = st["median_ms"]
                st["GBps"] = b / ms / 1e6 if ms > 0 else None
                st["GFLOPs"] = f / ms / 1e6 if ms > 0 else None
                st["fraction_of_bandwidth"] = st["GBps"] / bw if bw and st["GBps"] else None
                st["fraction_of_fp32"] = st["GFLOPs"] / fl if fl and st["GFLOPs"] else None
                st["fraction_of_floor"] = ph["floor_ms"] / ms if ph["floor_ms"] and ms > 0 else None
    return data


RUNNERS: dict[str, Callable[[Context, float], dict[str, Any]]] = {
    "env": stage_env,
    "device": stage_device,
    "pytest": stage_pytest,
    "races": stage_races,
    "memcheck": lambda ctx, t: stage_sanitizer(ctx, t, "memcheck"),
    "racecheck": lambda ctx, t: stage_sanitizer(ctx, t, "racecheck"),
    "timing": stage_timing,
}


def _pct(x: float | None) -> str:
    return "-" if x is None else f"{100 * x:.0f}%" if x >= 0.1 else f"{100 * x:.2g}%"


def _report(summary: dict[str, Any]) -> str:
    """The human summary: stage table, races, sanitizers, timing table, what was skipped."""
    out: list[str] = []
    env = summary["stages"].get("env", {})
    out.append(f"deformnp GPU check ({summary['mode']}): {env.get('summary', '')}")
    rows = [
        [name, st.get("status", "?"), f"{st.get('seconds', 0):.1f} s", st.get("summary", "")[:110]]
        for name, st in summary["stages"].items()
    ]
    out.append(_table(rows, ["stage", "status", "time", "summary"]))

    races = summary["stages"].get("races", {}).get("items", [])
    if races:
        rrows = []
        for x in races:
            if x.get("status") in ("error", "skipped"):
                rrows.append(
                    [
                        x["op"],
                        "",
                        "",
                        "",
                        "",
                        x["status"] + ": " + x.get("error", x.get("reason", ""))[:60],
                    ]
                )
                continue
            ge = max([0.0, *x["grad_err"].values()])
            de = max([0.0, *x["det_grad_err"].values()])
            same = all(x["det_identical"].values())
            atomic_same = all(x["atomic_repeat_identical"].values())
            rrows.append(
                [
                    x["op"],
                    x["size"][:44],
                    f"{x['forward_err']:.0e}",
                    f"{ge:.0e} / {de:.0e}",
                    f"{'yes' if same else 'NO'} ({'yes' if atomic_same else 'no'})",
                    x["status"],
                ]
            )
        out.append("\nRaces (float64, GPU vs CPU kernels; deterministic backward run twice):")
        out.append(
            _table(
                rrows,
                [
                    "op",
                    "size",
                    "fwd err",
                    "grad err atomic / det",
                    "det bit-identical (atomic)",
                    "status",
                ],
            )
        )

    timing = summary["stages"].get("timing", {})
    items = timing.get("items", [])
    if items:
        ceil = timing.get("ceilings", {})
        bw, fl = ceil.get("bandwidth_GBps"), ceil.get("fp32_GFLOPs")
        out.append(
            "\nTiming (float32, ms per call, median [min-max] of alternating runs, "
            f"{timing.get('clock', '')}, L2 flushed: {timing.get('l2_flush')}); floors at "
            + (f"{bw / 1e3:.2f} TB/s" if bw else "? TB/s")
            + " and "
            + (f"{fl / 1e3:.1f} TFLOP/s FP32" if fl else "? TFLOP/s")
            + f"; torch: {(timing.get('torch') or {}).get('note', '')}"
        )
        trows = []
        for x in items:
            if x.get("status") in ("error", "skipped"):
                trows.append(
                    [
                        x["op"],
                        x.get("tag", ""),
                        "",
                        x["status"] + ": " + x.get("error", x.get("reason", ""))[:80],
                    ]
                )
                continue
            par = x.get("parity", {})
            ptxt = (
                "-"
                if not par
                else f"{par['forward_rel_err']:.0e}"
                + ("" if par.get("checked") else " (info)")
                + (" MISMATCH" if par.get("ok") is False else "")
            )
            for phase, ph in x["phases"].items():
                d, t = ph["deformnp"], ph.get("torch")
                trows.append(
                    [
                        x["op"],
                        x["tag"],
                        phase,
                        f"{_fmt_ms(d['median_ms'])} [{_fmt_ms(d['min_ms'])}-{_fmt_ms(d['max_ms'])}]",
                        _fmt_ms(d.get("host_ms")),
                        f"{_fmt_ms(t['median_ms'])} [{_fmt_ms(t['min_ms'])}-{_fmt_ms(t['max_ms'])}]"
                        if t
                        else (x.get("torch", {}).get("reason", "-")[:28]),
                        f"{t['median_ms'] / d['median_ms']:.2f}x"
                        if t and d["median_ms"] > 0
                        else "-",
                        f"{_fmt_ms(ph.get('floor_ms'))} {(ph.get('bound') or '')[:3]}",
                        _pct(d.get("fraction_of_floor")),
                        _pct(t.get("fraction_of_floor")) if t else "-",
                        ptxt if phase == "forward" else "",
                    ]
                )
        out.append(
            _table(
                trows,
                [
                    "op",
                    "size",
                    "phase",
                    "deformnp ms",
                    "dn host ms",
                    "torch ms",
                    "torch/dn",
                    "floor ms",
                    "dn %floor",
                    "torch %floor",
                    "fwd vs torch",
                ],
            )
        )
        out.append("sizes:")
        out += [f"  {x['op']} {x['tag']}: {x['size']}" for x in items if x.get("size")]

    if summary["skipped"]:
        out.append(
            "\nSkipped: " + "; ".join(f"{s['stage']}: {s['reason']}" for s in summary["skipped"])
        )
    out.append(
        f"\n{'ALL STAGES PASSED' if summary['ok'] else 'SOME STAGES FAILED'}"
        f"{'' if summary['complete'] else ' (incomplete: see Skipped)'}; "
        f"total {summary['total_s']:.0f} s of a {summary['budget_s']:.0f} s budget; "
        f"JSON: {summary['out']}"
    )
    return "\n".join(out)


def orchestrate(args: argparse.Namespace) -> int:
    t0 = time.time()
    deadline = t0 + args.budget_s
    notes = []
    if args.smoke:
        os.environ["NUMBA_ENABLE_CUDASIM"] = "1"  # before anything imports numba
    elif os.environ.pop("NUMBA_ENABLE_CUDASIM", None) not in (None, "0"):
        notes.append("NUMBA_ENABLE_CUDASIM was set and is ignored outside --smoke")
    wanted = STAGE_NAMES if not args.stages else tuple(s.strip() for s in args.stages.split(","))
    unknown = [s for s in wanted if s not in STAGE_NAMES]
    if unknown:
        raise SystemExit(f"unknown stage(s) {unknown}; stages: {', '.join(STAGE_NAMES)}")
    out_path = Path(args.out).resolve()
    summary: dict[str, Any] = {
        "script": "benches/gpu_check.py",
        "mode": "smoke" if args.smoke else "gpu",
        "started": time.strftime("%Y-%m-%dT%H:%M:%S%z", time.localtime(t0)),
        "argv": sys.argv[1:],
        "budget_s": args.budget_s,
        "out": str(out_path),
        "notes": notes,
        "environment": {},
        "stages": {},
        "skipped": [],
    }
    tmp = Path(tempfile.mkdtemp(prefix="gpu_check_"))
    ctx = Context(args, tmp, _child_env(args.smoke), summary["stages"], summary["environment"])
    selected = [s for s in STAGES if s.name in wanted]
    no_device = None
    try:
        for i, st in enumerate(STAGES):
            if st.name not in wanted:
                res = {"status": "skipped", "summary": "not selected (--stages)", "seconds": 0.0}
                summary["stages"][st.name] = res
                summary["skipped"].append({"stage": st.name, "reason": res["summary"]})
                continue
            if no_device and st.name in GPU_STAGES:
                res = {"status": "skipped", "summary": no_device, "seconds": 0.0}
                summary["stages"][st.name] = res
                summary["skipped"].append({"stage": st.name, "reason": no_device})
                continue
            remaining = deadline - time.time()
            later = [s for s in selected if STAGE_NAMES.index(s.name) > i]
            reserve = sum(s.floor(args.smoke) for s in later)
            need = st.floor(args.smoke)
            # at most its cap, and no more than leaves the later stages their minimums, but
            # never under its own minimum: when time runs short the later stages are skipped
            allowed = min(st.cap(args.smoke), max(remaining - reserve, need), remaining)
            if remaining < need:
                why = f"budget: {max(remaining, 0):.0f} s left, the stage needs {need:.0f} s"
                summary["stages"][st.name] = {"status": "skipped", "summary": why, "seconds": 0.0}
                summary["skipped"].append({"stage": st.name, "reason": why, "budget": True})
                _say(f"== {st.name}: skipped ({why})")
                continue
            where = " [smoke: Numba's simulator, tiny sizes]" if args.smoke else ""
            _say(f"== {st.name}: {st.what}{where} (up to {allowed:.0f} s)")
            t = time.time()
            try:
                res = RUNNERS[st.name](ctx, allowed)
            except Exception as exc:
                res = {
                    "status": "error",
                    "summary": _err(exc),
                    "traceback": _tail(traceback.format_exc(), 4000),
                }
            res["seconds"] = round(time.time() - t, 1)
            res["timeout_s"] = round(allowed, 1)
            summary["stages"][st.name] = res
            if res["status"] == "skipped":
                summary["skipped"].append({"stage": st.name, "reason": res.get("summary", "")})
            if st.name == "device" and res.get("cuda_available") is not True:
                no_device = f"no usable CUDA device (device stage: {res.get('summary')})"
            _say(f"== {st.name}: {res['status']} in {res['seconds']} s: {res.get('summary', '')}")
            lines = res.get("failures") or res.get("findings")
            if res["status"] in ("fail", "error", "timeout") and lines:
                _say("\n".join("   " + f for f in lines[:20]))
            summary["total_s"] = round(time.time() - t0, 1)
            _write_json(out_path, summary)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    statuses = [st["status"] for st in summary["stages"].values()]
    summary["ok"] = all(s in ("pass", "skipped") for s in statuses)
    summary["complete"] = not any(s.get("budget") for s in summary["skipped"])
    summary["total_s"] = round(time.time() - t0, 1)
    _write_json(out_path, summary)
    _say("")
    _say(_report(summary))
    return 0 if summary["ok"] else 1


# =============================================================================== main


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="benches/gpu_check.py",
        description="One prepared GPU check for deformnp (see the module docstring).",
    )
    p.add_argument("--out", default="gpu_check.json", help="the JSON summary (gpu_check.json)")
    p.add_argument("--budget-s", type=float, default=480.0, help="total time budget, s (480)")
    p.add_argument("--smoke", action="store_true", help="under Numba's simulator, tiny sizes")
    p.add_argument("--stages", default="", help=f"comma list of stages: {','.join(STAGE_NAMES)}")
    p.add_argument("--repeat", type=int, default=20, help="timed runs per phase and side (20)")
    p.add_argument("--warmup", type=int, default=3, help="warm-up runs per phase and side (3)")
    p.add_argument("--no-flush", action="store_true", help="do not flush the L2 between runs")
    p.add_argument(
        "--pytest-workers",
        type=int,
        default=-1,
        help="pytest-xdist workers for the pytest stage (default: half the CPUs up to 8 on a GPU, "
        "0 under --smoke; 0 when pytest-xdist is absent)",
    )
    # hidden modes: the sanitizer's target, and the stage workers
    p.add_argument("--calls", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--worker", choices=sorted(WORKERS), help=argparse.SUPPRESS)
    p.add_argument("--result", help=argparse.SUPPRESS)
    p.add_argument("--stop-at", type=float, default=math.inf, help=argparse.SUPPRESS)
    return p.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if args.smoke:
        os.environ["NUMBA_ENABLE_CUDASIM"] = "1"  # before numba is imported, in every mode
    if args.calls:
        return calls_main(args)
    if args.worker:
        return worker_main(args)
    return orchestrate(args)


if __name__ == "__main__":
    sys.exit(main())
