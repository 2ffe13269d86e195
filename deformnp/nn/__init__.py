"""Layers (torch.nn-style): generic ones and the deformable family."""

from __future__ import annotations

import sys as _sys

from .. import functional  # deformnp.nn.functional is deformnp.functional, as in torch
from . import init
from .attention import DeformableAttention2d, LayerNormProxy, MSDeformAttn
from .deform_conv import DeformConv2d, DeformConv2dPack, ModulatedDeformConv2dPack
from .layers import (
    GELU,
    Conv2d,
    Dropout,
    Flatten,
    Identity,
    LayerNorm,
    LeakyReLU,
    Linear,
    ModuleList,
    ReLU,
    Sequential,
    Sigmoid,
    SiLU,
    Softmax,
    Tanh,
)
from .module import Module, Parameter
from .roi import (
    DeformRoIPool,
    DeformRoIPoolPack,
    ModulatedDeformRoIPoolPack,
    PSRoIAlign,
    PSRoIPool,
    RoIAlign,
    RoIPool,
)

_sys.modules[__name__ + ".functional"] = functional
