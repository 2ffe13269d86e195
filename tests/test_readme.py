"""The README's API tour is executable documentation: it must run as written."""

from __future__ import annotations

import pathlib

README = pathlib.Path(__file__).resolve().parents[1] / "README.md"


def test_readme_tour_runs():
    text = README.read_text()
    start = text.index("```python", text.index("## A tour of the API")) + len("```python")
    code = text[start : text.index("```", start)]
    namespace: dict = {}
    exec(compile(code, str(README) + " (tour)", "exec"), namespace)
    assert namespace["x"].grad.shape == (2, 8, 16, 16)
    assert namespace["offset"].grad.shape == (2, 18, 16, 16)
