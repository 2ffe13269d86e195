"""``python -m deformnp``: verify every op's gradients and time the ops.

    python -m deformnp            the main job: ``info``, ``check``, then a short ``bench``
                                  (reference sizes, current thread count, 5 runs a figure)
    python -m deformnp check      gradcheck every registered op (float64, central differences)
    python -m deformnp bench      time forward and forward+backward (float32) at the reference and
                                  large sizes, at the current thread count and at one thread, CPU,
                                  CUDA when present, and torch/torchvision when installed
    python -m deformnp info       versions, Numba threading layer and thread count, CUDA

``check`` and ``bench`` take ``--op NAME`` (repeatable) and ``--json``. Numba compiles each
kernel on its first call and caches it on disk, so the first run takes a few minutes and later
runs start in seconds; progress goes to standard error, results to standard output.

The cases are the tables of ``deformnp.cases`` (``check_cases``, ``bench_cases``): an op added
there appears here without editing this file.
"""

from __future__ import annotations

import argparse
import gc
import json
import platform
import statistics
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np


class SelectionError(Exception):
    """A request that selects nothing (an unknown op, a device that is not there)."""


def _selected(only: Sequence[str] | None, known: Sequence[str], what: str) -> list[str]:
    """The ops to run: ``only`` (each must be known) or all of them."""
    if not only:
        return list(known)
    unknown = [n for n in only if n not in known]
    if unknown:
        raise SelectionError(
            f"unknown op(s) for {what}: {', '.join(unknown)}; the ops are {', '.join(known)}"
        )
    return [n for n in known if n in only]


def _table(rows: list[list[str]], header: list[str]) -> str:
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    fmt = "  ".join(f"{{:<{w}}}" for w in widths)
    lines = [fmt.format(*header), fmt.format(*("-" * w for w in widths))]
    lines += [fmt.format(*map(str, r)) for r in rows]
    return "\n".join(lines)


COMPILING = (
    "Numba compiles each kernel on its first call and caches it on disk: the first run takes a "
    "few minutes, later runs start in seconds."
)


class _Progress:
    """Progress on standard error, one step per case: a tqdm bar on a terminal, a line per step
    elsewhere (a log keeps every line), nothing when ``enabled`` is False."""

    def __init__(self, what: str, total: int, enabled: bool = True) -> None:
        self.what, self.total, self.enabled, self.count = what, total, enabled, 0
        self.bar: Any = None
        if enabled and sys.stderr.isatty():
            try:
                from tqdm import tqdm
            except ImportError:  # pragma: no cover - tqdm is a dependency
                tqdm = None
            if tqdm is not None:
                self.bar = tqdm(total=total, desc=what, unit="case", file=sys.stderr, leave=False)

    def step(self, label: str) -> None:
        """Announce the case about to run."""
        self.count += 1
        if self.bar is not None:
            self.bar.set_postfix_str(label, refresh=False)
            if self.count > 1:
                self.bar.update(1)
            else:
                self.bar.refresh()
        elif self.enabled:
            print(f"{self.what} [{self.count}/{self.total}] {label}", file=sys.stderr, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.update(self.total - self.bar.n)
            self.bar.close()


_told_compiling = False


@contextmanager
def _progress(what: str, total: int, enabled: bool) -> Iterator[_Progress]:
    """A :class:`_Progress`; the first one of the process says that kernels compile."""
    global _told_compiling
    if enabled and not _told_compiling:
        print(COMPILING, file=sys.stderr, flush=True)
        _told_compiling = True
    p = _Progress(what, total, enabled)
    try:
        yield p
    finally:
        p.close()


# ---------------------------------------------------------------------------- check


@dataclass
class CheckResult:
    """One differentiable input of one check case: its worst gradient error and the verdict."""

    op: str
    case: str
    input: str
    worst_error: float | None
    verdict: str  # "ok", "FAIL" or "ERROR"
    error: str = ""


def check_results(
    only: Sequence[str] | None = None, progress: bool = False
) -> tuple[list[CheckResult], float]:
    """Gradcheck every case of the check table (or those of the ops in ``only``); the results
    and the seconds it took."""
    from .cases.check import OPS, check_cases
    from .gradcheck import gradcheck, max_gradient_error

    ops_ = _selected(only, OPS, "check")
    cases = [case for op in ops_ for case in check_cases(op)]
    results: list[CheckResult] = []
    start = time.perf_counter()
    with _progress("check", len(cases), progress) as bar:
        for case in cases:
            bar.step(case.name)
            inputs = case.inputs()
            try:
                ok = gradcheck(case.fn, inputs, raise_exception=False)
                errors = max_gradient_error(case.fn, inputs)
            except Exception as exc:  # a crash is a failure, reported in the table
                message = f"{type(exc).__name__}: {exc}"
                results.append(CheckResult(case.op, case.label, "-", None, "ERROR", message))
                continue
            for i, label in enumerate(case.names):
                verdict = "ok" if ok else "FAIL"
                results.append(CheckResult(case.op, case.label, label, float(errors[i]), verdict))
    return results, time.perf_counter() - start


def run_check(
    only: Sequence[str] | None = None,
    out: Any = None,
    as_json: bool = False,
    progress: bool = False,
) -> bool:
    """Gradcheck every case of the check table; print a table (op, case, input, worst error,
    verdict), or JSON with ``as_json``. True if all pass."""
    from . import __version__

    out = out or sys.stdout
    results, seconds = check_results(only, progress)
    ok_all = all(r.verdict == "ok" for r in results)
    if as_json:
        doc = {
            "deformnp": __version__,
            "command": "check",
            "method": "float64, central differences, eps=1e-6; error relative to max(1, max|numeric|)",
            "ok": ok_all,
            "seconds": round(seconds, 3),
            "results": [asdict(r) for r in results],
        }
        print(json.dumps(doc, indent=1), file=out)
        return ok_all
    rows = [
        [
            r.op,
            r.case or "-",
            r.input,
            "-" if r.worst_error is None else f"{r.worst_error:.2e}",
            r.verdict if not r.error else f"{r.verdict} {r.error[:60]}",
        ]
        for r in results
    ]
    print(
        "Gradient check (float64, central differences, eps=1e-6; error relative to "
        "max(1, max|numeric|))",
        file=out,
    )
    print(_table(rows, ["op", "case", "input", "worst error", "verdict"]), file=out)
    verdict = "all gradients verified" if ok_all else "SOME GRADIENTS FAILED"
    print(f"{verdict} ({len(rows)} inputs, {seconds:.1f} s)\n", file=out)
    return ok_all


# ---------------------------------------------------------------------------- bench


@dataclass(frozen=True)
class Timing:
    """A series of wall times in ms: its minimum, median and maximum and how many runs."""

    min: float
    median: float
    max: float
    runs: int

    @classmethod
    def of(cls, seconds: Sequence[float]) -> Timing:
        ms = [1e3 * t for t in seconds]
        return cls(min(ms), statistics.median(ms), max(ms), len(ms))

    def cell(self) -> str:
        """``median [min-max]`` for the table."""
        return f"{self.median:.3f} [{self.min:.3f}-{self.max:.3f}]"


def _time(fn: Callable[[], Any], repeat: int | None, sync: Callable[[], Any] | None) -> Timing:
    """The timing of ``fn`` after one warm-up run (``repeat``: see :func:`_time_series`)."""
    return _time_series([(fn, sync)], repeat)[0]


# Without --repeat, a series stops after MAX_RUNS runs, or once it has MIN_RUNS and has taken
# SERIES_S seconds, or has 3 and has taken 4 * SERIES_S (the slow torch cases at the large sizes).
MIN_RUNS, MAX_RUNS, SERIES_S = 5, 25, 2.0


def _time_series(
    fns: Sequence[tuple[Callable[[], Any], Callable[[], Any] | None]], repeat: int | None
) -> list[Timing]:
    """The timings of each ``(fn, sync)`` after a warm-up run of each, over ``repeat`` runs each
    (or, when ``repeat`` is None, as many as MIN_RUNS / MAX_RUNS / SERIES_S allow). The runs
    alternate (a, b, c, a, b, c, ...) so that a burst of load from elsewhere on the machine slows
    every side alike rather than one side's whole series, and the garbage collector is off while
    they run, as in ``timeit``."""
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
    return [Timing.of(series) for series in times]


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


@dataclass
class BenchResult:
    """One row of the bench: one case, device, thread count and phase."""

    op: str
    size: str
    device: str
    threads: int
    phase: str  # "forward" or "fwd+bwd"
    deformnp_ms: Timing
    torch_ms: Timing | None = None
    speedup_vs_torch: float | None = None  # torch's median / deformnp's median
    g_ch_samples_per_s: float | None = None  # forward of a gather op
    cuda_vs_cpu: float | None = None  # the CPU's median / CUDA's, same case and phase
    dense_conv2d_ms: Timing | None = None  # deform_conv2d: torch's dense conv2d, same shape
    deformnp_ms_vs_dense: Timing | None = None  # deformnp's own series of that pair


@dataclass
class BenchReport:
    """Everything ``bench`` measured."""

    results: list[BenchResult]
    repeats: str
    numba: str
    torch: str | None
    cuda_requested: bool
    cuda_available: bool
    floors: list[dict[str, float]]


def bench_results(
    only: Sequence[str] | None = None,
    repeat: int | None = None,
    devices: Sequence[str] = ("cpu", "cuda"),
    sizes: Sequence[str] = ("reference",),
    threads: Sequence[int] | None = None,
    floor: bool = False,
    progress: bool = False,
) -> BenchReport:
    """Time every op's bench case (at ``sizes``, with each of ``threads`` Numba, BLAS and torch
    threads; default: the current count), against torch/torchvision where installed."""
    import numba

    from . import cuda
    from .cases.bench import OPS, bench_cases, thread_limit

    current = numba.get_num_threads()
    counts = list(dict.fromkeys(threads or [current]))
    names = _selected(only, OPS, "bench")
    wanted = [d for d in devices if d == "cpu" or (d == "cuda" and cuda.is_available())]
    plan = [
        (case, device, n)
        for name in names
        for device in wanted
        for case in bench_cases(name, device, tuple(sizes))
        for n in (counts if device == "cpu" else [current])
    ]
    results: list[BenchResult] = []
    cpu_ms: dict[tuple[str, str, str, int], float] = {}
    with _progress("bench", len(plan), progress) as bar:
        for case, device, n in plan:
            bar.step(f"{case.op} {case.size} {device} {n} thread(s)")
            with thread_limit(n):
                _bench_case(case, device, n, repeat, results, cpu_ms)
    repeats = (
        f"median of {repeat}"
        if repeat
        else f"median of {MIN_RUNS}-{MAX_RUNS} (about {SERIES_S:g} s a series)"
    )
    floors = []
    if floor:
        from .cases.floor import measure_floor

        floors = [asdict(measure_floor(n)) for n in counts]
    return BenchReport(
        results,
        repeats,
        numba.__version__,
        _torch_version(),
        "cuda" in devices,
        "cuda" in wanted,
        floors,
    )


def run_bench(
    only: Sequence[str] | None = None,
    repeat: int | None = None,
    devices: Sequence[str] = ("cpu", "cuda"),
    out: Any = None,
    sizes: Sequence[str] = ("reference",),
    threads: Sequence[int] | None = None,
    floor: bool = False,
    as_json: bool = False,
    progress: bool = False,
) -> None:
    """Time every op's bench case (see :func:`bench_results`) and print a table of ms (median
    [min-max]), ratios against torch and, for the gather ops, rates in channel-samples per
    second; or JSON with ``as_json``."""
    from . import __version__

    out = out or sys.stdout
    report = bench_results(only, repeat, devices, sizes, threads, floor, progress)
    if as_json:
        doc = {"deformnp": __version__, "command": "bench", **asdict(report)}
        print(json.dumps(doc, indent=1), file=out)
        return
    rows = report.results
    has_torch = any(r.torch_ms is not None for r in rows)
    compared = (
        f"deformnp and torch runs alternating, Numba, BLAS and torch at the row's thread count; "
        f"numba {report.numba}; {report.torch}"
        if has_torch
        else f"Numba and BLAS at the row's thread count; numba {report.numba}; "
        f"{'no torch counterpart in this selection' if report.torch else 'torch not installed: no comparison'}"
    )
    print(f"Timings (float32, {report.repeats} after warm-up; {compared})", file=out)
    if report.cuda_requested and not report.cuda_available:
        print("CUDA: not available (no GPU or numba-cuda not installed); CPU only", file=out)

    def num(v: float | None, fmt: str) -> str:
        return "-" if v is None else format(v, fmt)

    header = ["op", "size", "device", "threads", "phase", "deformnp ms median [min-max]", "torch ms median [min-max]", "speed-up vs torch", "G ch-samples/s", "CUDA vs CPU"]  # fmt: skip
    cells = [
        [
            r.op,
            r.size,
            r.device,
            str(r.threads),
            r.phase,
            r.deformnp_ms.cell(),
            "-" if r.torch_ms is None else r.torch_ms.cell(),
            num(r.speedup_vs_torch, ".2f") + ("x" if r.speedup_vs_torch else ""),
            num(r.g_ch_samples_per_s, ".2f"),
            num(r.cuda_vs_cpu, ".1f") + ("x" if r.cuda_vs_cpu else ""),
        ]
        for r in rows
    ]
    # no column that would be empty on every row (no torch, no gather op, no CUDA)
    keep = [i for i in range(len(header)) if i < 6 or any(c[i] != "-" for c in cells)]
    print(_table([[c[i] for i in keep] for c in cells], [header[i] for i in keep]), file=out)
    if 8 in keep:
        print(
            "G ch-samples/s: channel-samples (one bilinear sample, or one pooled pixel, of one "
            "channel) per second of the forward.",
            file=out,
        )
    for r in rows:
        if r.dense_conv2d_ms is not None and r.deformnp_ms_vs_dense is not None:
            ours, dense = r.deformnp_ms_vs_dense, r.dense_conv2d_ms
            print(
                f"{r.op} {r.size} {r.phase} at {r.threads} thread(s): {ours.median:.3f} ms is "
                f"{ours.median / dense.median:.2f}x torch's dense conv2d of the same shape "
                f"({dense.median:.3f} ms [{dense.min:.3f}-{dense.max:.3f}]; the two alternating)",
                file=out,
            )
    if report.floors:
        print("Floors of this machine (best of 10):", file=out)
        for f in report.floors:
            print(
                f"  {f['threads']} thread(s): contiguous read {f['read_gb_s']:.1f} GB/s; "
                f"random-row gather (4 rows of 256 float32 channels a sample) "
                f"{f['gather_g_s']:.2f} G ch-samples/s",
                file=out,
            )
    print(file=out)


def _bench_case(
    case: Any,
    device: str,
    n: int,
    repeat: int | None,
    results: list[BenchResult],
    cpu_ms: dict[tuple[str, str, str, int], float],
) -> None:
    """Time one case at ``n`` threads, both phases; append its results."""
    tsync = _torch_sync(device)
    for phase, ours, theirs, dense in (
        ("forward", case.forward, case.torch_forward, case.torch_dense_forward),
        ("fwd+bwd", case.forward_backward, case.torch_forward_backward, case.torch_dense_forward_backward),
    ):  # fmt: skip
        fns = [(ours, case.sync)] + ([(theirs, tsync)] if theirs is not None else [])
        try:
            timing, *others = _time_series(fns, repeat)
        except Exception as exc:  # a comparison that fails must not stop the table
            if len(fns) == 1:
                raise
            print(f"{case.op} {phase}: torch comparison failed: {exc}", file=sys.stderr)
            timing, others, theirs, dense = _time(ours, repeat, case.sync), [], None, None
        r = BenchResult(case.op, case.size, device, n, phase, timing)
        if theirs is not None:
            r.torch_ms = others[0]
            r.speedup_vs_torch = r.torch_ms.median / timing.median
        if dense is not None:
            # a pair of its own: alternating with a run 20-40x longer (torchvision's) leaves the
            # caches and the idle threads cold for the next short run, which is not the dense
            # comparison's business (measured: 17.4 ms alone, 23.1 ms after each torchvision run)
            r.deformnp_ms_vs_dense, r.dense_conv2d_ms = _time_series(
                [(ours, case.sync), (dense, tsync)], repeat
            )
        if device == "cpu":
            cpu_ms[(case.op, case.size, phase, n)] = timing.median
        elif (case.op, case.size, phase, n) in cpu_ms:
            r.cuda_vs_cpu = cpu_ms[(case.op, case.size, phase, n)] / timing.median
        if case.samples and phase == "forward":
            r.g_ch_samples_per_s = case.samples / timing.median / 1e6
        results.append(r)


# ---------------------------------------------------------------------------- info


def run_info(out: Any = None) -> None:
    """Print versions, Numba's threading and what CUDA and torch there are."""
    import numba
    import scipy

    from . import __version__, cuda

    out = out or sys.stdout
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


def _epilog() -> str:
    """The ops each command knows, for ``--help``."""
    from .cases.bench import OPS as BENCH_OPS
    from .cases.check import OPS as CHECK_OPS

    return (
        "Without a command it runs the main job: info, then check, then bench at the reference\n"
        "sizes and the current thread count (5 runs a figure): a few minutes the first time,\n"
        "while Numba compiles the kernels, which it caches on disk for later runs.\n\n"
        f"ops for check --op: {', '.join(CHECK_OPS)}\n"
        f"ops for bench --op: {', '.join(BENCH_OPS)}"
    )


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog=_prog(),
        description="Verify every deformnp op's gradients (check) and time the ops (bench).",
        epilog=_epilog(),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    from . import __version__

    parser.add_argument("--version", action="version", version=f"deformnp {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="{check,bench,info}")
    p_check = sub.add_parser("check", help="gradcheck every op (float64)")
    p_check.add_argument("--op", action="append", help="only this op (repeatable)")
    p_check.add_argument("--json", action="store_true", help="print the results as JSON")
    p_bench = sub.add_parser(
        "bench", help="time every op at the reference and large sizes, at N threads and at 1"
    )
    p_bench.add_argument("--op", action="append", help="only this op (repeatable)")
    p_bench.add_argument(
        "--repeat", type=int, default=None, help="timed runs per figure (default: adaptive)"
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
    p_bench.add_argument("--json", action="store_true", help="print the results as JSON")
    sub.add_parser("info", help="versions, threads, CUDA availability")
    args = parser.parse_args(argv)

    if args.command == "info":
        run_info()
        return 0
    try:
        if args.command == "check":
            return 0 if run_check(args.op, as_json=args.json, progress=True) else 1
        if args.command == "bench":
            import numba

            devices = ("cpu", "cuda") if args.device == "all" else (args.device,)
            if devices == ("cuda",):
                from . import cuda

                if not cuda.is_available():
                    raise SelectionError(
                        "--device cuda selects nothing: no CUDA GPU is available to Numba "
                        "(see `info`)"
                    )
            sizes = ("reference", "large") if args.size == "all" else (args.size,)
            threads = args.threads or [numba.get_num_threads(), 1]
            run_bench(
                args.op,
                args.repeat,
                devices,
                sizes=sizes,
                threads=threads,
                floor=args.floor,
                as_json=args.json,
                progress=True,
            )
            return 0
    except SelectionError as exc:
        print(f"{parser.prog} {args.command}: {exc}", file=sys.stderr)
        return 2
    # the main job
    run_info()
    print(file=sys.stdout, flush=True)
    ok = run_check(progress=True)
    run_bench(repeat=5, progress=True)  # reference sizes, current thread count
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
