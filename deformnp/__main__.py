"""``python -m deformnp``: verify every op's gradients and time the ops.

    python -m deformnp            the main job: ``check``, then a short ``bench``
    python -m deformnp check      gradcheck every registered op (float64, central differences)
    python -m deformnp bench      time forward and forward+backward (float32) at the reference and
                                  large sizes, at the current thread count and at one thread, CPU,
                                  CUDA when present, and torch/torchvision when installed
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


def _time(fn: Callable[[], Any], repeat: int | None, sync: Callable[[], Any] | None) -> float:
    """Median wall time in ms after one warm-up run (``repeat``: see :func:`_time_series`)."""
    return _time_series([(fn, sync)], repeat)[0]


# Without --repeat, a series stops after MAX_RUNS runs, or once it has MIN_RUNS and has taken
# SERIES_S seconds, or has 3 and has taken 4 * SERIES_S (the slow torch cases at the large sizes).
MIN_RUNS, MAX_RUNS, SERIES_S = 5, 25, 2.0


def _time_series(
    fns: Sequence[tuple[Callable[[], Any], Callable[[], Any] | None]], repeat: int | None
) -> list[float]:
    """Median wall times in ms of each ``(fn, sync)`` after a warm-up run of each, over
    ``repeat`` runs each (or, when ``repeat`` is None, as many as MIN_RUNS / MAX_RUNS / SERIES_S
    allow). The runs alternate (a, b, c, a, b, c, ...) so that a burst of load from elsewhere
    on the machine slows every side alike rather than one side's whole series, and the garbage
    collector is off while they run, as in ``timeit``."""
    times: list[list[float]] = [[] for _ in fns]
    for fn, done in fns:
        fn()
        if done:
            done()
    gc_was_enabled = gc.isenabled()
    gc.collect()
    gc.disable()
    start = time.perf_counter()
    try:
        runs = 0
        while True:
            for (fn, done), series in zip(fns, times):
                t0 = time.perf_counter()
                fn()
                if done:
                    done()
                series.append(time.perf_counter() - t0)
            runs += 1
            elapsed = time.perf_counter() - start
            if repeat is not None:
                if runs >= repeat:
                    break
            elif (
                runs >= MAX_RUNS
                or (runs >= MIN_RUNS and elapsed >= SERIES_S)
                or (runs >= 3 and elapsed >= 4 * SERIES_S)
            ):
                break
    finally:
        if gc_was_enabled:
            gc.enable()
    return [1e3 * statistics.median(series) for series in times]


def _torch_sync(device: str) -> Callable[[], Any] | None:
    """Waits for torch's CUDA stream when timing torch on the GPU."""
    if device != "cuda":
        return None
    import torch

    return torch.cuda.synchronize


def _torch_version() -> str | None:
    try:
        import torch
    except Exception:
        return None
    return f"torch {torch.__version__}"


def run_bench(
    only: Sequence[str] | None = None,
    repeat: int | None = None,
    devices: Sequence[str] = ("cpu", "cuda"),
    out: Any = sys.stdout,
    sizes: Sequence[str] = ("reference",),
    threads: Sequence[int] | None = None,
    floor: bool = False,
) -> None:
    """Time every op's bench case (at ``sizes``, with each of ``threads`` Numba and torch
    threads; default: the current count) and print ms, ratios against torch and, for the gather
    ops, rates in channel-samples per second."""
    import numba

    from . import cuda
    from .cases.bench import OPS, bench_cases, thread_limit

    current = numba.get_num_threads()
    counts = list(dict.fromkeys(threads or [current]))
    torch_info = _torch_version()
    wanted = [d for d in devices if d == "cpu" or (d == "cuda" and cuda.is_available())]
    rows: list[list[str]] = []
    dense_lines: list[str] = []
    cpu_ms: dict[tuple[str, str, str, int], float] = {}
    for name in _selected(only, OPS):
        for device in wanted:
            for case in bench_cases(name, device, tuple(sizes)):
                for n in counts if device == "cpu" else [current]:
                    with thread_limit(n):
                        _bench_case(case, device, n, repeat, rows, dense_lines, cpu_ms, out)
    reps = (
        f"median of {repeat}"
        if repeat
        else f"median of {MIN_RUNS}-{MAX_RUNS} (about {SERIES_S:g} s a series)"
    )
    has_torch = any(r[6] != "-" for r in rows)
    compared = (
        f"deformnp and torch runs alternating, Numba, BLAS and torch at the row's thread count; "
        f"numba {numba.__version__}; {torch_info}"
        if has_torch
        else f"Numba and BLAS at the row's thread count; numba {numba.__version__}; "
        f"{'no torch counterpart in this selection' if torch_info else 'torch not installed: no comparison'}"
    )
    print(f"Timings (float32, {reps} after warm-up; {compared})", file=out)
    if "cuda" in devices and "cuda" not in wanted:
        print("CUDA: not available (no GPU or numba-cuda not installed); CPU only", file=out)
    header = ["op", "size", "device", "threads", "phase", "deformnp ms", "torch ms", "speed-up vs torch", "G ch-samples/s", "CUDA vs CPU"]  # fmt: skip
    # no column that would be empty on every row (no torch, no gather op, no CUDA)
    keep = [i for i in range(len(header)) if i < 6 or any(r[i] not in ("", "-") for r in rows)]
    print(_table([[r[i] for i in keep] for r in rows], [header[i] for i in keep]), file=out)
    if 8 in keep:
        print(
            "G ch-samples/s: channel-samples (one bilinear sample, or one pooled pixel, of one "
            "channel) per second of the forward.",
            file=out,
        )
    for line in dense_lines:
        print(line, file=out)
    if floor:
        _print_floor(counts, out)
    print(file=out)


def _bench_case(
    case: Any,
    device: str,
    n: int,
    repeat: int | None,
    rows: list[list[str]],
    dense_lines: list[str],
    cpu_ms: dict[tuple[str, str, str, int], float],
    out: Any,
) -> None:
    """Time one case at ``n`` threads, both phases; append its rows."""
    tsync = _torch_sync(device)
    for phase, ours, theirs, dense in (
        ("forward", case.forward, case.torch_forward, case.torch_dense_forward),
        ("fwd+bwd", case.forward_backward, case.torch_forward_backward, case.torch_dense_forward_backward),
    ):  # fmt: skip
        fns = [(ours, case.sync)] + ([(theirs, tsync)] if theirs is not None else [])
        try:
            ms, *others = _time_series(fns, repeat)
        except Exception as exc:  # a comparison that fails must not stop the table
            if len(fns) == 1:
                raise
            print(f"{case.op} {phase}: torch comparison failed: {exc}", file=out)
            ms, others, theirs, dense = _time(ours, repeat, case.sync), [], None, None
        ref = others[0] if theirs is not None else None
        if dense is not None:
            # a pair of its own: alternating with a run 20-40x longer (torchvision's) leaves the
            # caches and the idle threads cold for the next short run, which is not the dense
            # comparison's business (measured: 17.4 ms alone, 23.1 ms after each torchvision run)
            ours_ms, dense_ms = _time_series([(ours, case.sync), (dense, tsync)], repeat)
            dense_lines.append(
                f"{case.op} {case.scale} {phase} at {n} thread(s): {ours_ms:.3f} ms is "
                f"{ours_ms / dense_ms:.2f}x torch's dense conv2d of the same shape "
                f"({dense_ms:.3f} ms; the two alternating)"
            )
        if device == "cpu":
            cpu_ms[(case.op, case.size, phase, n)] = ms
        vs_cpu = ""
        if device == "cuda" and (case.op, case.size, phase, n) in cpu_ms:
            vs_cpu = f"{cpu_ms[(case.op, case.size, phase, n)] / ms:.1f}x"
        rate = "-"
        if case.samples and phase == "forward":
            rate = f"{case.samples / ms / 1e6:.2f}"
        rows.append(
            [
                case.op,
                case.size,
                device,
                str(n),
                phase,
                f"{ms:.3f}",
                "-" if ref is None else f"{ref:.3f}",
                "-" if ref is None else f"{ref / ms:.2f}x",
                rate,
                vs_cpu,
            ]
        )


def _print_floor(counts: Sequence[int], out: Any) -> None:
    """The machine's floors (``deformnp.cases.floor``) at each thread count."""
    from .cases.floor import measure_floor

    print("Floors of this machine (best of 10):", file=out)
    for n in counts:
        f = measure_floor(n)
        print(
            f"  {n} thread(s): contiguous read {f.read_gb_s:.1f} GB/s; random-row gather "
            f"(4 rows of 256 float32 channels a sample) {f.gather_g_s:.2f} G ch-samples/s",
            file=out,
        )


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


def _prog() -> str:
    """The name the user typed: ``deformnp`` (the console command) or ``python -m deformnp``."""
    import os

    name = os.path.basename(sys.argv[0]) if sys.argv and sys.argv[0] else ""
    return "deformnp" if name in ("deformnp", "deformnp.exe") else "python -m deformnp"


def _thread_counts(text: str) -> list[int]:
    """``--threads``: "2,1" -> [2, 1]; each count between 1 and Numba's maximum."""
    import numba

    try:
        counts = [int(t) for t in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected comma-separated integers, got {text!r}"
        ) from None
    top = numba.config.NUMBA_NUM_THREADS
    bad = [n for n in counts if not 1 <= n <= top]
    if bad:
        raise argparse.ArgumentTypeError(f"thread counts must be between 1 and {top}, got {bad}")
    return counts


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog=_prog(),
        description=__doc__.split("\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    from . import __version__

    parser.add_argument("--version", action="version", version=f"deformnp {__version__}")
    sub = parser.add_subparsers(dest="command")
    p_check = sub.add_parser("check", help="gradcheck every op (float64)")
    p_check.add_argument("--op", action="append", help="only this op (repeatable)")
    p_bench = sub.add_parser(
        "bench", help="time every op at the reference and large sizes, at N threads and at 1"
    )
    p_bench.add_argument("--op", action="append", help="only this op (repeatable)")
    p_bench.add_argument(
        "--repeat", type=int, default=None, help="timed runs per case (median; default: adaptive)"
    )
    p_bench.add_argument("--device", choices=["cpu", "cuda", "all"], default="all")
    p_bench.add_argument(
        "--size",
        choices=["reference", "large", "all"],
        default="all",
        help="default: all",
    )
    p_bench.add_argument(
        "--threads",
        type=_thread_counts,
        default=None,
        help="comma-separated thread counts (default: the current count, then 1)",
    )
    p_bench.add_argument(
        "--floor", action="store_true", help="also measure the machine's read and gather floors"
    )
    sub.add_parser("info", help="versions, threads, CUDA availability")
    args = parser.parse_args(argv)

    if args.command == "info":
        run_info()
        return 0
    if args.command == "check":
        return 0 if run_check(args.op) else 1
    if args.command == "bench":
        import numba

        devices = ("cpu", "cuda") if args.device == "all" else (args.device,)
        if devices == ("cuda",):
            from . import cuda

            if not cuda.is_available():
                print(
                    f"{parser.prog} bench: --device cuda selects nothing: no CUDA GPU is "
                    "available to Numba (see `info`)",
                    file=sys.stderr,
                )
                return 2
        sizes = ("reference", "large") if args.size == "all" else (args.size,)
        threads = args.threads or [numba.get_num_threads(), 1]
        run_bench(args.op, args.repeat, devices, sizes=sizes, threads=threads, floor=args.floor)
        return 0
    # the main job
    run_info()
    print()
    ok = run_check()
    run_bench(repeat=5)  # reference sizes, current thread count
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
