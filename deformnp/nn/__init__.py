"""Layers (torch.nn-style): generic ones and the deformable family."""

from __future__ import annotations

import sys as _sys

from .. import functional  # deformnp.nn.functional is deformnp.functional, as in torch
from . import dat, dcn, init, mmcv
from .attention import MSDeformAttn
from .dat import (
    DAttentionBaseline,
    DAttentionBaselineCVPR2022,
    DeformableAttention2d,
    LayerNormProxy,
)
from .dcn import DCNv3, DCNv4
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
from .transformer import (
    DeformableTransformerDecoder,
    DeformableTransformerDecoderLayer,
    DeformableTransformerEncoder,
    DeformableTransformerEncoderLayer,
    MultiheadAttention,
)

_sys.modules[__name__ + ".functional"] = functional
