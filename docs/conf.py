"""Sphinx configuration of deformnp's documentation (``docs/``).

Build it with ``pip install ".[docs]"`` and ``sphinx-build -W docs docs/_build/html`` from the
repository root; open ``docs/_build/html/index.html``.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # document the source tree next to this file, not an installed copy

import deformnp  # noqa: E402

project = "deformnp"
author = "deformnp contributors"
copyright = "2026, deformnp contributors"
release = deformnp.__version__
version = release

extensions = [
    "sphinx.ext.autodoc",
    "sphinx.ext.autosummary",
    "sphinx.ext.mathjax",
    "sphinx.ext.intersphinx",
    "sphinx.ext.viewcode",
    "numpydoc",
    "sphinx_gallery.gen_gallery",
    "matplotlib.sphinxext.plot_directive",
]

exclude_patterns = ["_build", "auto_examples/*.ipynb", "auto_examples/*.py", "**.zip"]
templates_path = ["_templates"]

html_theme = "pydata_sphinx_theme"
html_title = f"deformnp {release}"
html_theme_options = {
    "navigation_depth": 2,
    "show_toc_level": 2,
    "secondary_sidebar_items": ["page-toc"],
}
html_static_path: list[str] = []

# API reference: one page per public name, written from the numpydoc docstrings.
autosummary_generate = True
autodoc_typehints = "none"  # numpydoc's Parameters sections carry the types
autodoc_default_options = {"members": False, "inherited-members": False}
numpydoc_show_class_members = False
numpydoc_class_members_toctree = False
numpydoc_xref_param_type = False
# Every public docstring must pass these numpydoc checks (the build fails otherwise):
# GL08 a docstring exists, PR01 every parameter is documented, SS01 there is a summary line.
numpydoc_validation_checks = {"GL08", "PR01", "SS01"}
numpydoc_validation_exclude = {
    r"\.__init__$",
    r"\.__repr__$",
    r"\.__call__$",
}

intersphinx_mapping: dict[str, tuple[str, str | None]] = {}

# Pictures in the op pages: ``.. plot::`` runs a short script at build time, with the kernels.
plot_include_source = False  # the picture, with a link to its script
plot_html_show_source_link = True
plot_html_show_formats = False
plot_formats = [("png", 100)]
plot_rcparams = {"figure.dpi": 100}

# The examples, run and rendered as a gallery. Each writes its pictures to a folder given with
# --out-dir: docs/gallery_argv.py puts it in the build tree, never in the sources.
sys.path.insert(0, str(ROOT / "docs"))
sphinx_gallery_conf = {
    "examples_dirs": str(ROOT / "examples"),
    "gallery_dirs": "auto_examples",
    # the PyTorch example needs torch, which the docs build does not install: shown, not run
    "filename_pattern": r"/(deform_conv_offsets|deform_roi_pool|deformable_attention|dcnv3_sampling_points)\.py$",
    "reset_argv": "gallery_argv.example_argv",
    "download_all_examples": False,
    "remove_config_comments": True,
    "within_subsection_order": "FileNameSortKey",
    "image_scrapers": ("matplotlib",),
    "matplotlib_animations": False,
    "show_memory": False,
    "plot_gallery": os.environ.get("DEFORMNP_DOCS_RUN_EXAMPLES", "1") != "0",
}


# deformnp.torch and deformnp.jax import their frameworks at the top; the docs build installs
# neither (torch alone is 5.5 GB), so autodoc reads those modules against stand-ins.
autodoc_mock_imports = ["torch", "jax", "jaxlib"]
