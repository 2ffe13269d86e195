"""Every case ``python -m deformnp bench`` times runs: one forward and one forward+backward each.

The bench table is the README's main job, so a case whose callable no longer matches the
array-level API must fail here, not on a user's first run. Timings are never asserted.
"""

from __future__ import annotations

import io

import numpy as np
import pytest

from deformnp.cases.bench import OPS, bench_cases


@pytest.mark.slow
@pytest.mark.parametrize("op", OPS)
def test_bench_case_runs(op):
    for case in bench_cases(op, "cpu"):
        assert case.forward() is not None
        grads = case.forward_backward()  # the array-level cases return their gradients
        if grads is not None:
            grads = grads if isinstance(grads, (tuple, list)) else (grads,)
            assert any(g is not None and np.isfinite(np.asarray(g)).all() for g in grads), op


@pytest.mark.slow
@pytest.mark.parametrize("op", OPS)
def test_large_case_forward_runs(op):
    """The large sizes (``bench --size large``) build and their forward runs."""
    for case in bench_cases(op, "cpu", ("large",)):
        assert case.scale == "large"
        assert case.forward() is not None


def test_channel_sample_counts():
    """A gather op's rate counts one sample of one channel: N*C*Hout*Wout for grid_sample, one
    per sampling point of every bin and channel for roi_align, per pooled pixel for roi_pool."""
    (gs,) = bench_cases("grid_sample", "cpu", ("large",))
    assert gs.samples == 8 * 64 * 128 * 128
    (ra,) = bench_cases("roi_align", "cpu")
    assert ra.samples == 512 * 256 * 7 * 7 * 2 * 2
    (rp,) = bench_cases("roi_pool", "cpu")
    # every bin reads at least one pixel (the boxes are at least 7 pixels wide) and the bins of
    # a box overlap by at most one row/column, so the count lies between these bounds
    assert 512 * 256 * 49 <= rp.samples <= 512 * 256 * 4 * 50 * 50
    assert bench_cases("conv2d", "cpu")[0].samples == 0
    with pytest.raises(ValueError, match="unknown bench size"):
        bench_cases("roi_align", "cpu", ("huge",))


def test_bench_table_threads_and_rates():
    """The CLI's table: one row per (case, thread count, phase), the thread count in its
    column, a rate for the forward of a gather op, and the floors when asked."""
    from deformnp.__main__ import run_bench

    out = io.StringIO()
    run_bench(
        ["bilinear_interpolate"], repeat=1, devices=("cpu",), out=out, threads=[1], floor=False
    )
    text = out.getvalue()
    header = next(line for line in text.splitlines() if line.startswith("op "))
    assert "threads" in header and "G ch-samples/s" in header and "CUDA vs CPU" not in header
    try:
        import torch  # noqa: F401
    except ImportError:  # no column that is "-" on every row, and a header that says why
        assert "torch ms" not in header and "speed-up" not in header
        assert "torch not installed: no comparison" in text and "alternating" not in text
    else:
        assert "torch ms" in header and "speed-up vs torch" in header
    rows = [line.split() for line in text.splitlines() if line.startswith("bilinear_interpolate")]
    assert len(rows) == 2
    fwd = next(r for r in rows if "forward" in r)
    assert float(fwd[-1]) > 0  # the rate
    assert fwd[fwd.index("cpu") + 1] == "1"


def test_thread_counts_argument():
    from deformnp.__main__ import main

    with pytest.raises(SystemExit):
        main(["bench", "--threads", "0"])
    with pytest.raises(SystemExit):
        main(["bench", "--threads", "two"])


def test_floor_measures_positive_rates():
    from deformnp.cases.floor import measure_floor

    f = measure_floor(1, repeat=1, read_mib=4, samples=1024)
    assert f.threads == 1 and f.read_gb_s > 0 and f.gather_g_s > 0


def test_version_and_cuda_without_gpu(capsys):
    import deformnp
    from deformnp import cuda
    from deformnp.__main__ import main

    with pytest.raises(SystemExit) as exc:
        main(["--version"])
    assert exc.value.code == 0
    assert capsys.readouterr().out.strip() == f"deformnp {deformnp.__version__}"
    if not cuda.is_available():
        assert main(["bench", "--device", "cuda"]) == 2
        assert "selects nothing" in capsys.readouterr().err


def test_cli_json_outputs(capsys):
    """``check --json`` and ``bench --json`` print one JSON document on standard output (the
    progress lines go to standard error) with every figure: min, median and max per timing."""
    import json

    from deformnp.__main__ import main

    assert main(["check", "--op", "roi_pool", "--json"]) == 0
    captured = capsys.readouterr()
    doc = json.loads(captured.out)
    assert doc["command"] == "check" and doc["ok"] is True
    assert [r["op"] for r in doc["results"]] == ["roi_pool"]
    assert 0 <= doc["results"][0]["worst_error"] < 1e-6
    assert "check [1/1] roi_pool" in captured.err  # progress, off standard output

    args = ["bench", "--op", "roi_pool", "--size", "reference", "--threads", "1", "--repeat", "2"]
    assert main([*args, "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["command"] == "bench" and len(doc["results"]) == 2
    for r in doc["results"]:
        t = r["deformnp_ms"]
        assert r["threads"] == 1 and t["runs"] == 2 and 0 < t["min"] <= t["median"] <= t["max"]
    assert {r["phase"] for r in doc["results"]} == {"forward", "fwd+bwd"}


def test_cli_refuses_a_request_that_selects_nothing(capsys):
    """An unknown op (or one only ``check`` knows) is exit status 2 with the valid names."""
    from deformnp.__main__ import main

    assert main(["bench", "--op", "nn.MSDeformAttn"]) == 2
    err = capsys.readouterr().err
    assert "unknown op(s) for bench: nn.MSDeformAttn" in err and "deform_conv2d" in err
    assert main(["check", "--op", "nope"]) == 2
    assert "unknown op(s) for check: nope" in capsys.readouterr().err


def test_cli_help_lists_the_ops_and_the_main_job(capsys):
    from deformnp.__main__ import main
    from deformnp.cases import bench, check

    with pytest.raises(SystemExit) as exc:
        main(["--help"])
    assert exc.value.code == 0
    text = capsys.readouterr().out
    assert "Without a command it runs the main job" in text
    assert all(op in text for op in check.OPS + bench.OPS)
    assert "SPEC" not in text  # no citation of the internal spec


def test_check_table_labels_each_case():
    """Cases of one op with several configurations are told apart by a case column."""
    from deformnp.__main__ import run_check

    out = io.StringIO()
    assert run_check(["conv2d"], out=out)
    rows = [line for line in out.getvalue().splitlines() if line.startswith("conv2d")]
    assert len(rows) == 6
    assert sum("depthwise" in r for r in rows) == 3 and sum("2 groups" in r for r in rows) == 3
