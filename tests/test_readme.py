"""The README's API tour is executable documentation: it must run as written."""

from __future__ import annotations

import pathlib

import pytest

README = pathlib.Path(__file__).resolve().parents[1] / "README.md"


def test_readme_tour_runs():
    text = README.read_text()
    start = text.index("```python", text.index("## A tour of the API")) + len("```python")
    code = text[start : text.index("```", start)]
    namespace: dict = {}
    exec(compile(code, str(README) + " (tour)", "exec"), namespace)
    assert namespace["x"].grad.shape == (2, 8, 16, 16)
    assert namespace["offset"].grad.shape == (2, 18, 16, 16)


def _snippets(after: str) -> list[str]:
    """The ```python blocks of the README section that starts with ``after``."""
    text = README.read_text()
    section = text[text.index(after) :]
    section = section[: section.index("\n## ", 1)]
    blocks = section.split("```python")[1:]
    return [b[: b.index("```")] for b in blocks]


def test_readme_torch_snippet_runs():
    pytest.importorskip("torch")
    code = next(b for b in _snippets("## From PyTorch and JAX") if "deformnp.torch" in b)
    namespace: dict = {}
    exec(compile(code, str(README) + " (torch)", "exec"), namespace)
    assert tuple(namespace["out"].shape) == (1, 80, 32)
    assert tuple(namespace["offset"].grad.shape) == (2, 18, 16, 16)


def test_readme_jax_snippet_runs():
    pytest.importorskip("jax")
    code = next(b for b in _snippets("## From PyTorch and JAX") if "deformnp.jax" in b)
    namespace: dict = {}
    exec(compile(code, str(README) + " (jax)", "exec"), namespace)
    gx, goff, gw = namespace["grads"]
    assert gx.shape == (2, 4, 8, 8) and goff.shape == (2, 18, 8, 8) and gw.shape == (4, 4, 3, 3)


def test_readme_cuda_snippet_runs():
    """The CUDA section's snippet runs as written (here on Numba's CUDA simulator, which
    tests/conftest.py switches on when there is no GPU)."""
    from deformnp import cuda

    if not cuda.is_available():
        pytest.skip("no CUDA device and no simulator")
    (code,) = _snippets("## CUDA")
    namespace: dict = {}
    exec(compile(code, str(README) + " (cuda)", "exec"), namespace)
    assert cuda.is_cuda_array(namespace["off"].grad)
    assert namespace["off"].grad.copy_to_host().shape == (2, 18, 8, 8)
    assert namespace["w"].grad.copy_to_host().shape == (6, 4, 3, 3)


def test_readme_porting_snippet_runs():
    (code,) = _snippets("## Porting a model")
    namespace: dict = {}
    exec(compile(code, str(README) + " (porting)", "exec"), namespace)
    assert namespace["out"].shape == (1, 80, 32)
