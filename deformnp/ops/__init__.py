"""The deformable op family (SPEC sections 4-9).

Every op takes Tensors or plain arrays and returns a Tensor; gradients flow to every input with
``requires_grad``. Each op also has an array-level pair ``<op>_forward`` / ``<op>_backward`` that
takes and returns plain arrays (NumPy, or CUDA device arrays), for wrapping in other frameworks.
"""

from __future__ import annotations

from .attention import ms_deform_attn, ms_deform_attn_backward, ms_deform_attn_forward
from .bilinear import (
    bilinear_interpolate,
    bilinear_interpolate_backward,
    bilinear_interpolate_forward,
)
from .deform_conv import deform_conv2d, deform_conv2d_backward, deform_conv2d_forward
from .grid_sample import grid_sample, grid_sample_backward, grid_sample_forward
from .roi import (
    deform_ps_roi_pool,
    deform_ps_roi_pool_backward,
    deform_ps_roi_pool_forward,
    deform_roi_pool,
    deform_roi_pool_backward,
    deform_roi_pool_forward,
    ps_roi_align,
    ps_roi_align_backward,
    ps_roi_align_forward,
    ps_roi_pool,
    ps_roi_pool_backward,
    ps_roi_pool_forward,
    roi_align,
    roi_align_backward,
    roi_align_forward,
    roi_pool,
    roi_pool_backward,
    roi_pool_forward,
)
