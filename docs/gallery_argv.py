"""The command line sphinx-gallery gives each example it runs (``reset_argv`` in conf.py).

A module of its own so that the configuration holds only a name, which Sphinx can cache."""

from __future__ import annotations

from pathlib import Path

# The examples write their pictures here: in the build tree, never in the sources.
EXAMPLE_OUT = Path(__file__).resolve().parent / "_build" / "example_output"


def example_argv(script: str, gallery_conf: dict) -> list[str]:
    """The arguments after the script's name: ``--out-dir`` the build tree's example folder."""
    return ["--out-dir", str(EXAMPLE_OUT)]
