"""The documentation stands on its own: no citation of a spec users do not have, a numpydoc
docstring (summary, Parameters) on every public op, and API pages that list every public name.
(The Sphinx build itself, with numpydoc's checks and warnings as errors, runs in .ci/run.)"""

from __future__ import annotations

import inspect
import pathlib
import re

import pytest

import deformnp as dn
from deformnp import ops

ROOT = pathlib.Path(__file__).resolve().parents[1]
CITATION = re.compile(r"\bSPEC\b(?!\" not in)")


def _sources() -> list[pathlib.Path]:
    files = [ROOT / "README.md", ROOT / "CHANGELOG.md"]
    for folder, pattern in (("deformnp", "*.py"), ("docs", "*.rst"), ("docs", "*.py"),
                            ("examples", "*.py"), ("benches", "*.py"), ("tests", "*.py")):  # fmt: skip
        files += [
            p
            for p in (ROOT / folder).rglob(pattern)
            if "_build" not in p.parts and "generated" not in p.parts
            and "auto_examples" not in p.parts
        ]  # fmt: skip
    return [p for p in files if p.exists()]


def test_no_citation_of_the_internal_spec():
    hits = [
        f"{p.relative_to(ROOT)}:{i}"
        for p in _sources()
        if p.name != "test_docs.py"
        for i, line in enumerate(p.read_text(encoding="utf-8").splitlines(), 1)
        if CITATION.search(line)
    ]
    assert not hits, f"SPEC cited (users do not have it): {hits[:10]}"


OPS = [
    "bilinear_interpolate", "grid_sample", "deform_conv2d", "roi_pool", "roi_align",
    "ps_roi_pool", "ps_roi_align", "deform_roi_pool", "deform_ps_roi_pool", "ms_deform_attn",
    "dcnv3", "dcnv4", "flash_deform_attn",
]  # fmt: skip


@pytest.mark.parametrize("name", OPS)
def test_op_docstrings_document_every_parameter(name):
    """help(ops.X) shows a summary and every parameter of X and of its array-level pair."""
    for fn in (
        getattr(ops, name),
        getattr(ops, f"{name}_forward"),
        getattr(ops, f"{name}_backward"),
    ):
        doc = inspect.getdoc(fn)
        assert doc and "Parameters\n----------" in doc and "Returns\n-------" in doc, fn.__name__
        section = doc.split("Parameters\n----------", 1)[1]
        for p in inspect.signature(fn).parameters:
            # numpydoc allows one entry for several: "kernel_h, kernel_w : int"
            pattern = rf"^(?:\w+, )*{p}\b"
            assert re.search(pattern, section, re.M), f"{fn.__name__}: {p} not documented"


def test_api_pages_list_every_public_name():
    pages = "".join(p.read_text() for p in (ROOT / "docs" / "api").glob("*.rst"))
    listed = set(re.findall(r"^   ([A-Za-z_][A-Za-z0-9_]*)$", pages, re.M))
    public_ops = {n for n in dir(ops) if not n.startswith("_") and callable(getattr(ops, n))}
    public_nn = {
        n for n in dir(dn.nn) if not n.startswith("_") and inspect.isclass(getattr(dn.nn, n))
    }
    missing = (public_ops | public_nn | set(dn.__all__) - {"functional", "ops", "nn", "optim", "cuda", "__version__"}) - listed  # fmt: skip
    assert not missing, f"public names without an API page: {sorted(missing)}"


def test_every_op_page_derives_gradients():
    """Each op family's page has a forward formula, a picture and a gradient derivation."""
    pages = (
        "bilinear",
        "deform_conv",
        "roi",
        "deform_roi",
        "ms_deform_attn",
        "dat",
        "dcnv3",
        "dcnv4",
    )
    for page in pages:
        text = (ROOT / "docs" / "ops" / f"{page}.rst").read_text()
        assert ".. math::" in text and ".. plot::" in text, page
        assert re.search(r"gradient", text, re.I) and "\\partial" in text, page
