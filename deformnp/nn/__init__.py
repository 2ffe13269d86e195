"""Layers (torch.nn-style): generic ones and the deformable family."""

from __future__ import annotations

from .module import Module, Parameter
