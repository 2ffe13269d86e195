"""benches/gpu_check.py, the one prepared GPU check, in its --smoke mode: every stage end to end
under Numba's CUDA simulator at tiny sizes (CI has no GPU). The script must exit 0 and write a
JSON summary that names every stage with its status and time; the budget must skip stages, and
say so, when time runs short.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "benches" / "gpu_check.py"
STAGES = ("env", "device", "pytest", "races", "memcheck", "racecheck", "timing")
OPS = (
    "bilinear_interpolate",
    "grid_sample",
    "deform_conv2d",
    "roi_align",
    "roi_pool",
    "ps_roi_align",
    "ps_roi_pool",
    "deform_roi_pool",
    "deform_ps_roi_pool",
    "ms_deform_attn",
    "dcnv3",
    "dcnv4",
    "flash_deform_attn",
)


def _run(*args: str, timeout: float = 900) -> subprocess.CompletedProcess:
    env = dict(os.environ)
    env.pop("DEFORMNP_REAL_GPU", None)
    return subprocess.run(
        [sys.executable, str(SCRIPT), *args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


@pytest.mark.slow
def test_smoke_run_passes_every_stage(tmp_path):
    out = tmp_path / "gpu_check.json"
    # a budget that fits every smoke cap: on a cold Numba cache the stages take minutes
    proc = _run("--smoke", "--out", str(out), "--budget-s", "800")
    log = proc.stdout[-6000:] + proc.stderr[-3000:]
    assert proc.returncode == 0, log
    data = json.loads(out.read_text())
    assert data["mode"] == "smoke" and data["ok"] and data["complete"], log
    assert tuple(data["stages"]) == STAGES
    for name, stage in data["stages"].items():
        assert stage["status"] in ("pass", "skipped"), (name, stage.get("summary"))
        assert isinstance(stage["seconds"], float), name
    # the sanitizer stages are skipped with a reason; the --calls target itself ran
    for name in ("memcheck", "racecheck"):
        assert "smoke mode" in data["stages"][name]["summary"]
    assert data["stages"]["memcheck"]["calls_dry_run"] == "pass"
    assert data["stages"]["pytest"]["counts"]["passed"] > 0
    env = data["stages"]["env"]["info"]
    assert env["versions"]["numba"] and "compute_sanitizer" in env
    assert data["environment"]["numba"] == env["versions"]["numba"]
    assert "torch" in data["environment"] and data["environment"]["numba_device"]["name"]
    # every op raced against the CPU kernels, deterministic gradients bit-identical
    races = data["stages"]["races"]["items"]
    assert {r["op"] for r in races} == set(OPS)
    assert all(all(r["det_identical"].values()) for r in races)
    # every op timed, forward and forward+backward, with its floors counted
    timing = data["stages"]["timing"]["items"]
    assert {t["op"] for t in timing} == set(OPS)
    assert {t["tag"] for t in timing} == {"ref", "large"}
    for t in timing:
        assert set(t["phases"]) == {"forward", "fwd+bwd"}, t["op"]
        assert t["bytes"]["fwd+bwd"] > t["bytes"]["forward"] > 0
        assert t["flops"]["fwd+bwd"] >= t["flops"]["forward"] > 0
        for phase in t["phases"].values():
            assert phase["deformnp"]["median_ms"] > 0
            if t["torch"]["available"]:  # torch is optional: the columns say why not
                assert phase["torch"]["median_ms"] > 0
            else:
                assert t["torch"]["reason"]
    assert "Timing (float32" in proc.stdout and "ALL STAGES PASSED" in proc.stdout


def test_budget_skips_stages_and_says_so(tmp_path):
    out = tmp_path / "gpu_check.json"
    proc = _run("--smoke", "--out", str(out), "--budget-s", "3", "--stages", "env,timing")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    data = json.loads(out.read_text())
    assert tuple(data["stages"]) == STAGES
    assert data["stages"]["env"]["status"] == "pass"
    assert data["stages"]["timing"]["status"] == "skipped"
    assert data["stages"]["timing"]["summary"].startswith("budget")
    assert data["stages"]["races"]["summary"] == "not selected (--stages)"
    assert not data["complete"]
    assert {s["stage"] for s in data["skipped"]} == set(STAGES) - {"env"}
    assert "Skipped:" in proc.stdout


def test_compute_sanitizer_lookup_reports_where_it_looked():
    sys.path.insert(0, str(SCRIPT.parent))
    try:
        import gpu_check
    finally:
        sys.path.remove(str(SCRIPT.parent))
    exe, looked = gpu_check.find_compute_sanitizer()
    assert looked[0] == "PATH"
    assert exe is None or os.access(exe, os.X_OK)


FAKE_SANITIZER = """#!/bin/sh
# a stand-in for compute-sanitizer: answers --help/--version and prints a canned report
case "$1" in --help) echo "  --report-api-errors arg"; exit 0;; --version) echo fake; exit 0;; esac
echo "$@" > "$(dirname "$0")/argv"
echo "========= COMPUTE-SANITIZER"
if [ "$2" = racecheck ]; then
  # racecheck ends with its own summary line (as compute-sanitizer 2025.3 prints it on an H200)
  echo "gpu_check --calls: 7 calls ok, 0 failed"
  if [ "$FAKE_SANITIZER" = dirty ]; then
    echo "========= Error: Race reported between Write access at _tile+0x90"
    echo "========= RACECHECK SUMMARY: 1 hazard displayed (1 error, 0 warnings)"
    exit 86
  fi
  echo "========= RACECHECK SUMMARY: 0 hazards displayed (0 errors, 0 warnings)"
  exit 0
fi
if [ "$FAKE_SANITIZER" = dirty ]; then
  echo "========= Invalid __global__ write of size 4 bytes"
  echo "=========     at _scatter+0x1c0"
  echo "gpu_check --calls: 7 calls ok, 0 failed"
  echo "========= ERROR SUMMARY: 1 error"
  exit 86
fi
echo "gpu_check --calls: 7 calls ok, 0 failed"
echo "========= ERROR SUMMARY: 0 errors"
"""


@pytest.mark.parametrize("tool", ["memcheck", "racecheck"])
@pytest.mark.parametrize("mode", ["clean", "dirty"])
def test_sanitizer_stage_reads_the_report(tmp_path, mode, tool, monkeypatch):
    # the sanitizer stage's plumbing without a GPU: a fake compute-sanitizer on PATH
    fake = tmp_path / "compute-sanitizer"
    fake.write_text(FAKE_SANITIZER)
    fake.chmod(0o755)
    monkeypatch.setenv("PATH", f"{tmp_path}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.setenv("FAKE_SANITIZER", mode)
    out = tmp_path / "gpu_check.json"
    proc = _run("--out", str(out), "--stages", tool, timeout=120)
    data = json.loads(out.read_text())
    stage = data["stages"][tool]
    argv = (tmp_path / "argv").read_text().split()
    assert argv[:2] == ["--tool", tool] and argv[-1] == "--calls"
    assert "--report-api-errors" in argv
    assert stage["sanitizer"] == str(fake)
    if mode == "clean":
        assert proc.returncode == 0 and stage["status"] == "pass", stage
        assert stage["errors"] == 0 and stage["calls_ok"] == 7
    else:
        assert proc.returncode == 1 and stage["status"] == "fail", stage
        assert stage["errors"] == 1
        what = "Invalid __global__ write" if tool == "memcheck" else "Race reported"
        assert any(what in f for f in stage["findings"])
