"""The deformable op family.

Every op takes Tensors or plain arrays and returns a Tensor; gradients flow to every input with
``requires_grad``. Each op also has an array-level pair ``<op>_forward`` / ``<op>_backward`` that
takes and returns plain arrays, for wrapping in other frameworks (``deformnp.torch`` and
``deformnp.jax`` are built on them).

The formulas and gradients of each op are derived on the operator pages: :doc:`/ops/bilinear`
(``bilinear_interpolate``, ``grid_sample``), :doc:`/ops/deform_conv`, :doc:`/ops/roi`,
:doc:`/ops/deform_roi` and :doc:`/ops/ms_deform_attn`.

The array-level contract, the same for every pair:

* **Arguments.** A forward takes the op's arguments. A backward takes ``grad_out`` (the gradient of
  the loss with respect to the forward's output, of the output's shape and the inputs' dtype)
  first, then what the gradient needs: the forward's inputs where their values are used, the
  input's ``input_shape`` where only its shape is (``roi_align``, ``ps_roi_align``, ``roi_pool``
  with the forward's ``argmax``, ``ps_roi_pool``), then the op's parameters, then ``needs``.
* **needs** has one flag per differentiable input, in argument order (deform_conv2d: input,
  offset, weight, bias, mask; ms_deform_attn: value, sampling_locations, attention_weights;
  grid_sample: input, grid; bilinear_interpolate: input, points; RoI ops: input, and offset for
  the deformable ones). The backward returns a tuple with one entry per flag: the gradient, in
  that input's shape and dtype, or None where the flag is False (or the input was None).
* **Dtypes.** float32 or float64, one dtype for all float inputs and ``grad_out`` (a mismatch is
  a TypeError naming both); outputs and gradients have it too. Integer inputs (spatial shapes,
  level starts, argmax) are any integer dtype.
* **Devices and copies.** NumPy arrays run on the CPU; anything with ``__cuda_array_interface__``
  (numba device arrays, CuPy, PyTorch CUDA tensors) runs on CUDA, zero-copy, and the results are
  numba device arrays. A host array that is not C-contiguous, or is read-only, is copied once;
  inputs are never written. Outputs are new C-contiguous arrays owned by the caller. Boxes and
  the level arrays of ms_deform_attn are read on the host.
* **Validation.** Every pair validates like its op: bad input is a ValueError or TypeError naming
  the op, the argument, what was expected and what was given.
"""

from __future__ import annotations

from . import mmcv  # mmcv's names and argument order: deformnp.ops.mmcv.deform_conv2d, ...
from .attention import ms_deform_attn, ms_deform_attn_backward, ms_deform_attn_forward
from .bilinear import (
    bilinear_interpolate,
    bilinear_interpolate_backward,
    bilinear_interpolate_forward,
)
from .dcnv3 import dcnv3, dcnv3_backward, dcnv3_forward
from .dcnv4 import (
    dcnv4,
    dcnv4_backward,
    dcnv4_forward,
    flash_deform_attn,
    flash_deform_attn_backward,
    flash_deform_attn_forward,
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
