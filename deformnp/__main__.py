"""``python -m deformnp``: verify every op's gradients and time the ops.

    python -m deformnp            the main job: ``check``, then a short ``bench``
    python -m deformnp check      gradcheck every registered op (float64, central differences)
    python -m deformnp bench      time forward and forward+backward at the SPEC 13 sizes (float32),
                                  CPU, CUDA when present, and torch/torchvision when installed
    python -m deformnp info       versions, Numba threading layer and thread count, CUDA

The cases are the tables of ``deformnp.cases`` (``check_cases``, ``bench_cases``): an op added
there appears here without editing this file.
"""

from __future__ import annotations

import argparse
import gc
import platform
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np


def _selected(only: Sequence[str] | None, known: Sequence[str]) -> list[str]:
    """The ops to run: ``only`` (each must be known) or all of them."""
    if not only:
        return list(known)
    unknown = [n for n in only if n not in known]
    if unknown:
        raise SystemExit(f"unknown op(s) {unknown}; known: {sorted(known)}")
    return [n for n in known if n in only]


def _table(rows: list[list[str]], header: list[str]) -> str:
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    fmt = "  ".join(f"{{:<{w}}}" for w in widths)
    lines = [fmt.format(*header), fmt.format(*("-" * w for w in widths))]
    lines += [fmt.format(*map(str, r)) for r in rows]
    return "\n".join(lines)


# ---------------------------------------------------------------------------- check


def run_check(only: Sequence[str] | None = None, out: Any = sys.stdout) -> bool:
    """Gradcheck every case of the check table; print (op, input, worst error, verdict). True if
    all pass."""
    from .cases.check import OPS, check_cases
    from .gradcheck import gradcheck, max_gradient_error

    rows: list[list[str]] = []
    ok_all = True
    start = time.perf_counter()
    for op in _selected(only, OPS):
        for case in check_cases(op):
            inputs = case.inputs()
            try:
                ok = gradcheck(case.fn, inputs, raise_exception=False)
                errors = max_gradient_error(case.fn, inputs)
            except Exception as exc:  # a crash is a failure, reported in the table
                rows.append([case.name, "-", f"{type(exc).__name__}: {exc}"[:60], "ERROR"])
                ok_all = False
                continue
            ok_all &= ok
            for i, label in enumerate(case.names):
                rows.append([case.name, label, f"{errors[i]:.2e}", "ok" if ok else "FAIL"])
    print(
        "Gradient check (float64, central differences, eps=1e-6; error relative to "
        "max(1, max|numeric|))",
        file=out,
    )
    print(_table(rows, ["op", "input", "worst error", "verdict"]), file=out)
    verdict = "all gradients verified" if ok_all else "SOME GRADIENTS FAILED"
    print(f"{verdict} ({len(rows)} inputs, {time.perf_counter() - start:.1f} s)\n", file=out)
    return ok_all


# ---------------------------------------------------------------------------- bench


def _time(fn: Callable[[], Any], repeat: int, sync: Callable[[], Any] | None) -> float:
    """Median wall time in ms over ``repeat`` runs after one warm-up run."""
    return _time_pair(fn, None, repeat, sync, None)[0]


def _time_pair(
    ours: Callable[[], Any],
    theirs: Callable[[], Any] | None,
    repeat: int,
    sync: Callable[[], Any] | None,
    their_sync: Callable[[], Any] | None,
) -> tuple[float, float | None]:
    """Median wall times in ms of ``ours`` and ``theirs`` over ``repeat`` runs each, after a
    warm-up run of each. The runs alternate (ours, theirs, ours, ...) so that a burst of load
    from elsewhere on the machine slows both alike rather than one side's whole series, and the
    garbage collector is off while they run, as in ``timeit``."""
    fns = [(ours, sync)] + ([(theirs, their_sync)] if theirs is not None else [])
    times: list[list[float]] = [[] for _ in fns]
    for fn, done in fns:
        fn()
        if done:
            done()
    gc_was_enabled = gc.isenabled()
    gc.collect()
    gc.disable()
    try:
        for _ in range(repeat):
            for (fn, done), series in zip(fns, times):
                t0 = time.perf_counter()
                fn()
                if done:
                    done()
                series.append(time.perf_counter() - t0)
    finally:
        if gc_was_enabled:
            gc.enable()
    medians = [1e3 * statistics.median(series) for series in times]
    return medians[0], (medians[1] if theirs is not None else None)


def _torch_sync(device: str) -> Callable[[], Any] | None:
    """Waits for torch's CUDA stream when timing torch on the GPU."""
    if device != "cuda":
        return None
    import torch

    return torch.cuda.synchronize


def _torch_threads() -> str | None:
    try:
        import numba
        import torch
    except Exception:
        return None
    torch.set_num_threads(numba.get_num_threads())
    return f"torch {torch.__version__}, {torch.get_num_threads()} threads"


def run_bench(
    only: Sequence[str] | None = None,
    repeat: int = 10,
    devices: Sequence[str] = ("cpu", "cuda"),
    out: Any = sys.stdout,
) -> None:
    """Time every op's bench case and print ms and ratios against torch."""
    import numba

    from . import cuda
    from .cases.bench import OPS, bench_cases

    torch_info = _torch_threads()
    wanted = [d for d in devices if d == "cpu" or (d == "cuda" and cuda.is_available())]
    rows: list[list[str]] = []
    cpu_ms: dict[tuple[str, str], float] = {}
    for name in _selected(only, OPS):
        for device in wanted:
            for case in bench_cases(name, device):
                for phase, ours, theirs in (
                    ("forward", case.forward, case.torch_forward),
                    ("fwd+bwd", case.forward_backward, case.torch_forward_backward),
                ):
                    ref = None
                    try:
                        ms, ref = _time_pair(ours, theirs, repeat, case.sync, _torch_sync(device))
                    except Exception as exc:  # a comparison that fails must not stop the table
                        if theirs is None:
                            raise
                        print(f"{name} {phase}: torch comparison failed: {exc}", file=out)
                        ms = _time(ours, repeat, case.sync)
                    if device == "cpu":
                        cpu_ms[(name, phase)] = ms
                    vs_cpu = ""
                    if device == "cuda" and (name, phase) in cpu_ms:
                        vs_cpu = f"{cpu_ms[(name, phase)] / ms:.1f}x"
                    rows.append(
                        [
                            name,
                            case.size,
                            device,
                            phase,
                            f"{ms:.3f}",
                            "-" if ref is None else f"{ref:.3f}",
                            "-" if ref is None else f"{ref / ms:.2f}x",
                            vs_cpu,
                        ]
                    )
    print(
        f"Timings (float32, median of {repeat} after warm-up, deformnp and torch runs alternating; numba {numba.__version__}, "
        f"{numba.get_num_threads()} threads; {torch_info or 'torch not installed'})",
        file=out,
    )
    if "cuda" in devices and "cuda" not in wanted:
        print("CUDA: not available (no GPU or numba-cuda not installed); CPU only", file=out)
    header = [
        "op",
        "size",
        "device",
        "phase",
        "deformnp ms",
        "torch ms",
        "speed-up vs torch",
        "CUDA vs CPU",
    ]
    print(_table(rows, header), file=out)
    print(file=out)


# ---------------------------------------------------------------------------- info


def run_info(out: Any = sys.stdout) -> None:
    import numba
    import scipy

    from . import __version__, cuda

    print(f"deformnp {__version__}", file=out)
    print(
        f"python {platform.python_version()} ({platform.machine()}, {platform.system()})", file=out
    )
    print(f"numpy {np.__version__}, scipy {scipy.__version__}, numba {numba.__version__}", file=out)
    print(
        f"numba threads: {numba.get_num_threads()} (NUMBA_NUM_THREADS={numba.config.NUMBA_NUM_THREADS}), "
        f"threading layer: {_threading_layer()}",
        file=out,
    )
    sim = bool(numba.config.ENABLE_CUDASIM) if hasattr(numba.config, "ENABLE_CUDASIM") else False
    try:
        import numba_cuda  # noqa: F401

        have_numba_cuda = True
    except ImportError:
        have_numba_cuda = False
    print(
        f"numba-cuda installed: {have_numba_cuda}; CUDA available: {cuda.is_available()}"
        f"{' (simulator)' if sim else ''}",
        file=out,
    )
    if cuda.is_available() and not sim:
        from numba import cuda as ncuda

        dev = ncuda.get_current_device()
        print(
            f"GPU: {dev.name.decode() if isinstance(dev.name, bytes) else dev.name}, "
            f"compute capability {dev.compute_capability}",
            file=out,
        )
    try:
        import torch

        extra = ""
        try:
            import torchvision

            extra = f", torchvision {torchvision.__version__}"
        except Exception:
            pass
        print(f"torch {torch.__version__}{extra} (for parity tests and benchmarks)", file=out)
    except Exception:
        print("torch: not installed (parity tests and torch timings are skipped)", file=out)


def _threading_layer() -> str:
    import numba

    @numba.njit(parallel=True)
    def _touch(n: int) -> int:  # the layer is chosen on the first parallel launch
        s = 0
        for i in numba.prange(n):
            s += i
        return s

    try:
        _touch(2)
        return numba.threading_layer()
    except Exception as exc:  # pragma: no cover - reported, not fatal
        return f"unknown ({exc})"


# ---------------------------------------------------------------------------- main


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m deformnp",
        description=__doc__.split("\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = parser.add_subparsers(dest="command")
    p_check = sub.add_parser("check", help="gradcheck every op (float64)")
    p_check.add_argument("--op", action="append", help="only this op (repeatable)")
    p_bench = sub.add_parser("bench", help="time every op at the SPEC 13 sizes")
    p_bench.add_argument("--op", action="append", help="only this op (repeatable)")
    p_bench.add_argument("--repeat", type=int, default=20, help="timed runs per case (median)")
    p_bench.add_argument("--device", choices=["cpu", "cuda", "all"], default="all")
    sub.add_parser("info", help="versions, threads, CUDA availability")
    args = parser.parse_args(argv)

    if args.command == "info":
        run_info()
        return 0
    if args.command == "check":
        return 0 if run_check(args.op) else 1
    if args.command == "bench":
        devices = ("cpu", "cuda") if args.device == "all" else (args.device,)
        run_bench(args.op, repeat=args.repeat, devices=devices)
        return 0
    # the main job
    run_info()
    print()
    ok = run_check()
    run_bench(repeat=5)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
