"""Keep deformnp's deform_conv2d fast in a process whose OpenMP runtime started before deformnp.

``import deformnp`` sets ``OMP_WAIT_POLICY=PASSIVE`` (unless the user set it) so that OpenMP
worker threads sleep after a parallel region instead of busy-waiting for the next one. GNU
libgomp reads that variable once, when it is loaded. A PyTorch program imports torch first, and
``import torch`` loads torch's libgomp (Linux wheels) into the global symbol scope, so:

* the policy is libgomp's default: after every parallel region each worker spins for 300,000
  iterations before it sleeps (about 6 ms of worker CPU time per region on the project's 2-core
  machine, against 0.3-0.6 ms when passive);
* Numba's OpenMP threading layer binds to that same libgomp (its ``GOMP_*`` symbols resolve in
  the global scope first), so torch's ops and deformnp's kernels share one pool of workers.

Sharing one pool is good for torch ops and Numba kernels (the spinning workers pick up the next
region at once). It is bad for deform_conv2d, whose GEMMs run on NumPy's OpenBLAS threads: the
spinning OpenMP workers take their cores. On 2 cores, a DCNv2 training step through
``deformnp.torch`` (B=8, 128->128, 64x64) took 886-991 ms with torch imported first and
580-694 ms with the workers passive (``benches/bench_torch_adapter.py``), while a Deformable-DETR encoder layer
(no BLAS in deformnp's kernels) was 1.1-1.4x faster with them spinning
(``examples/torch_deformable_detr_cpu.py``). Hence :func:`passive_openmp_workers` is meant to be
called by the first CPU deform_conv2d, not at import.

The policy cannot be changed once libgomp is loaded, but libgomp shortens the spin on its own
(to 100 iterations, ``GOMP_SPINCOUNT``'s documented throttled value) whenever it manages more
threads than there are CPUs available to the process. :func:`passive_openmp_workers` makes that
so: it starts one parked OpenMP team of ``n_cpus + 1`` threads (from a daemon thread, through
``GOMP_parallel`` with a no-op body) whose workers then sleep for the rest of the process. They
use no CPU, only their stacks' address space; every team, torch's and Numba's, then waits as
with ``OMP_WAIT_POLICY=PASSIVE`` (measured: 0.66 / 0.30 ms of worker CPU time per torch / Numba
region, against 0.58-0.63 / 0.24-0.30 with deformnp imported first). It works with Numba's
omp, tbb and workqueue layers alike (torch's workers are the ones that spin).

Only GNU libgomp is handled (torch's Linux wheels; LLVM's and Intel's runtimes, used by conda
and macOS builds, are left alone). Nothing is done when the user chose busy-waiting:
``OMP_WAIT_POLICY=ACTIVE`` or ``GOMP_SPINCOUNT`` in the environment (``GOMP_SPINCOUNT=300000``
keeps libgomp's default). This module imports neither torch nor Numba.
"""

from __future__ import annotations

import ctypes
import os
import sys
import threading

__all__ = ["passive_openmp_workers", "global_openmp_runtime"]

_lock = threading.Lock()
_decided: bool | None = None  # the first call's answer, returned by every later call


def _available_cpus() -> int:
    """CPUs this process may run on (what libgomp counts at start-up)."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def global_openmp_runtime() -> str | None:
    """The OpenMP runtime in the process's global symbol scope: ``"gnu"`` (libgomp), ``"llvm"``
    (LLVM's libomp or Intel's libiomp5, which also export ``GOMP_*`` entry points) or None
    (none loaded globally, or not a platform with ``dlopen``)."""
    if sys.platform == "win32":
        return None
    try:
        scope = ctypes.CDLL(None)
    except OSError:
        return None
    if not hasattr(scope, "GOMP_parallel"):
        return None
    return "llvm" if hasattr(scope, "kmp_set_blocktime") else "gnu"


def passive_openmp_workers() -> bool:
    """Make the global GNU OpenMP runtime's workers sleep right after each parallel region.

    Call it after torch is imported; ``deformnp.torch`` calls it in the first CPU
    deform_conv2d (see the module docstring). The first call decides and every later call
    returns the same answer at once; thread-safe; it never raises.

    Returns
    -------
    bool
        True when the parked team is in place; False when nothing was done: no GNU libgomp in
        the global symbol scope, or the user asked for busy-waiting (``OMP_WAIT_POLICY=ACTIVE``,
        ``GOMP_SPINCOUNT``).
    """
    global _decided
    if _decided is not None:
        return _decided
    with _lock:
        if _decided is None:
            try:
                _decided = _park()
            except Exception:  # e.g. no thread could be started: leave the runtime as it is
                _decided = False
        return _decided


def _park() -> bool:
    """Start the parked team (see the module docstring); False when not applicable."""
    if os.environ.get("OMP_WAIT_POLICY", "").strip().upper() == "ACTIVE":
        return False
    if "GOMP_SPINCOUNT" in os.environ or global_openmp_runtime() != "gnu":
        return False
    try:
        scope = ctypes.CDLL(None)
        gomp_parallel = scope.GOMP_parallel
        gomp_parallel.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_uint, ctypes.c_uint]
        gomp_parallel.restype = None
        noop = ctypes.cast(scope.free, ctypes.c_void_p)  # free(NULL) does nothing
    except (OSError, AttributeError):
        return False
    started = threading.Event()
    forever = threading.Event()  # never set: the team stays parked until the process exits

    def park() -> None:
        # A team of n_cpus + 1 from a thread of its own: its n_cpus workers stay in libgomp's
        # pool for this thread (asleep once their throttled spin is over), so libgomp counts
        # more threads than CPUs however small the other teams are.
        gomp_parallel(noop, None, _available_cpus() + 1, 0)
        started.set()
        forever.wait()

    threading.Thread(target=park, name="deformnp-openmp-parked", daemon=True).start()
    started.wait()
    return True
