"""The examples check their optional dependencies before doing any work, and write only into the
folder given with --out-dir. (The documentation build in .ci/run runs them in full.)"""

from __future__ import annotations

import pathlib
import subprocess
import sys

import pytest

EXAMPLES = pathlib.Path(__file__).resolve().parents[1] / "examples"

# runs an example as __main__ with `blocked` unimportable (as if it were not installed)
RUNNER = """
import runpy, sys
blocked = sys.argv.pop(2)
sys.argv = sys.argv[1:]  # [script, its arguments...]
class Block:
    def find_spec(self, name, path=None, target=None):
        if name == blocked or name.startswith(blocked + "."):
            raise ImportError(f"No module named {name!r}")
sys.meta_path.insert(0, Block())
runpy.run_path(sys.argv[0], run_name="__main__")
"""


@pytest.mark.parametrize(
    "script, needs",
    [
        ("deform_conv_offsets.py", "matplotlib"),
        ("deform_roi_pool.py", "matplotlib"),
        ("deformable_attention.py", "matplotlib"),
        ("dcnv3_sampling_points.py", "matplotlib"),
        ("torch_deformable_detr_cpu.py", "torch"),
    ],
)
def test_example_stops_at_once_without_its_optional_dependency(tmp_path, script, needs):
    out = tmp_path / "out"
    args = [sys.executable, "-c", RUNNER, str(EXAMPLES / script), needs]
    if needs == "matplotlib":
        args += ["--out-dir", str(out)]
    proc = subprocess.run(args, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr
    assert f"pip install {needs}" in proc.stderr
    assert "Traceback" not in proc.stderr and not out.exists()  # no work done, nothing written


def test_examples_render_in_the_gallery():
    """Each example's docstring opens with a reST title (sphinx-gallery's requirement) and none
    writes into docs/ by default."""
    for path in EXAMPLES.glob("*.py"):
        lines = path.read_text().split('"""', 2)[1].strip("\n").splitlines()
        assert set(lines[1]) == {"="} and len(lines[1]) == len(lines[0]), path.name
        assert 'default="docs' not in path.read_text() and "'docs'" not in path.read_text()
