"""deformnp.threads: torch's GNU OpenMP workers stop spinning after passive_openmp_workers().

Runs in subprocesses (the OpenMP runtime is per process). Needs torch, whose Linux wheels load
GNU libgomp into the global symbol scope; skipped elsewhere.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

pytest.importorskip("torch")

PROBE = r"""
import json, sys, time
import torch
import deformnp.threads as th

if th.global_openmp_runtime() != "gnu":
    print(json.dumps({"runtime": th.global_openmp_runtime()}))
    sys.exit(0)
torch.set_num_threads(2)
x = torch.randn(256, 256)

def worker_cpu_per_region(n=40):
    # CPU time used by threads other than the main one, per parallel region followed by a pause
    t0, m0 = time.process_time(), time.thread_time()
    for _ in range(n):
        torch.mm(x, x)  # a parallel region of torch's OpenMP pool
        time.sleep(0.005)
    return ((time.process_time() - t0) - (time.thread_time() - m0)) / n * 1e3

worker_cpu_per_region(5)
before = worker_cpu_per_region()
parked = th.passive_openmp_workers()
after = worker_cpu_per_region()
print(json.dumps({"runtime": "gnu", "parked": parked, "before": before, "after": after}))
"""


def _probe(**env: str) -> dict:
    e = {k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT")}
    e.update(env)
    done = subprocess.run(
        [sys.executable, "-c", PROBE], env=e, capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr[-2000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_spinning_workers_are_parked():
    r = _probe()
    if r["runtime"] != "gnu":
        pytest.skip(f"torch's OpenMP runtime here is {r['runtime']!r}, not GNU libgomp")
    assert r["parked"] is True
    # libgomp's default spin (torch first) burns milliseconds per region; parked, well under 1
    assert r["after"] < r["before"] / 2, r


def test_user_choice_of_busy_waiting_is_respected():
    r = _probe(GOMP_SPINCOUNT="300000")
    if r["runtime"] != "gnu":
        pytest.skip("not GNU libgomp")
    assert r["parked"] is False
