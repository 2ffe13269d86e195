"""``grid_sample`` (anchor: ``torch.nn.functional.grid_sample``, mode="bilinear").

See :doc:`/ops/bilinear` for the formulas and gradients.

``grid_sample(input, grid, mode="bilinear", padding_mode="zeros", align_corners=False)`` samples
input (N, C, Hin, Win) at grid (N, Hout, Wout, 2), which holds normalized (x, y) in [-1, 1], and
returns (N, C, Hout, Wout). Arguments are torch's, in torch's order.

* Unnormalize: align_corners=True: x = (gx + 1) / 2 * (Win - 1) (-1 and 1 are the centres of the
  corner pixels); False: x = ((gx + 1) * Win - 1) / 2 (-1 and 1 are the outer edges of the corner
  pixels); likewise y with Hin. ``align_corners=None`` means False (torch's default, without
  torch's warning).
* ``padding_mode="zeros"``: the zero-fade rule of ``bilinear_interpolate`` (the map is zero
  outside); ``"border"``: the coordinate is clipped to [0, Win - 1] (x) and [0, Hin - 1] (y)
  first, and its derivative is zero where it was clipped; ``"reflection"``: reflected about the
  map's border lines as torch does (about the pixel edges when align_corners=False, about the corner
  pixel centres when True), then clipped.
* ``mode`` must be "bilinear"; "nearest" and "bicubic" are not implemented (ValueError).

The coordinate rule is written once for both devices (``kernels/rules.py``), so the CPU and CUDA
kernels implement every padding mode the same way.

Gradients flow to ``input`` and ``grid``. The grid gradient is the exact derivative of the rule
as written: the right-hand slope at integer pixel coordinates, zero inside clipped bands.
Decisions where torch differs: torch zeroes the border-mode derivative at a coordinate exactly
0 (deformnp takes the right-hand slope, 1); NaN grid values sample zero in every mode (torch's
result for NaN depends on its code path); +-inf sample zero with "zeros" and "reflection" and the
border pixel with "border". The CPU backward is deterministic (bit-identical for any thread count).
On CUDA the input gradient is scattered with float atomic adds (last bits vary from run to run)
unless ``deformnp.use_deterministic_algorithms(True)`` is set, which makes it bit-reproducible too.

The array-level pair, for wrapping in other frameworks::

    out = grid_sample_forward(input, grid, mode="bilinear", padding_mode="zeros",
                              align_corners=False)
    grad_input, grad_grid = grid_sample_backward(grad_out, input, grid, mode="bilinear",
                                                 padding_mode="zeros", align_corners=False,
                                                 needs=(True, True))
"""

from __future__ import annotations

from dataclasses import dataclass
from types import ModuleType
from typing import Any

import numpy as np

from ..function import Context, Function
from ..kernels.cpu import grid_sample as cpu_kernels
from ..tensor import Tensor, unwrap
from ..typing import Array, ArrayLike, Needs, TensorLike
from ..validation import (
    check_ndim,
    contiguous,
    device_of,
    float_array,
    grad_array,
    needs_flags,
    same_dtype,
)

__all__ = ["grid_sample", "grid_sample_forward", "grid_sample_backward", "GridSampleFunction"]

OP = "grid_sample"
PADDING_MODES = ("zeros", "border", "reflection")


def _kernels(device: str) -> ModuleType:
    """The CPU kernels, or the CUDA ones (imported on first use: numba-cuda is optional)."""
    if device == "cuda":
        from ..kernels.cuda import grid_sample as cuda_kernels

        return cuda_kernels
    return cpu_kernels


@dataclass(frozen=True)
class GridSampleArgs:
    """The checked arguments of one call: C-contiguous arrays of one dtype on one device."""

    input: Array
    grid: Array
    padding_mode: str
    align_corners: bool
    device: str


def prepare(
    input: TensorLike, grid: TensorLike, mode: Any, padding_mode: Any, align_corners: Any
) -> GridSampleArgs:
    """Validate the arguments of :func:`grid_sample` (once, for every entry point)."""
    if mode != "bilinear":
        raise ValueError(
            f"{OP}: mode must be 'bilinear' (the only mode implemented), got {mode!r}; "
            f"note the argument order (input, grid, mode, padding_mode, align_corners)"
        )
    if padding_mode not in PADDING_MODES:
        raise ValueError(
            f"{OP}: padding_mode must be 'zeros', 'border' or 'reflection', got {padding_mode!r}"
        )
    if align_corners is None:
        align_corners = False
    if not isinstance(align_corners, (bool, np.bool_)):
        raise TypeError(f"{OP}: align_corners must be a bool, got {align_corners!r}")
    input, grid = unwrap(input), unwrap(grid)
    device = device_of(OP, input=input, grid=grid)
    inp = float_array(OP, "input", input)
    grd = float_array(OP, "grid", grid)
    same_dtype(OP, input=inp, grid=grd)
    check_ndim(OP, "input", inp, 4, "(N, C, Hin, Win)")
    check_ndim(OP, "grid", grd, 4, "(N, Hout, Wout, 2)")
    if grd.shape[3] != 2:
        raise ValueError(
            f"{OP}: grid must be (N, Hout, Wout, 2) holding normalized (x, y), got last "
            f"dimension {grd.shape[3]} (shape {tuple(grd.shape)})"
        )
    if grd.shape[0] != inp.shape[0]:
        raise ValueError(
            f"{OP}: grid has batch size {grd.shape[0]}, expected input's batch size {inp.shape[0]}"
        )
    return GridSampleArgs(inp, grd, padding_mode, bool(align_corners), device)


def _forward(a: GridSampleArgs) -> Array:
    return _kernels(a.device).grid_sample_forward(a.input, a.grid, a.padding_mode, a.align_corners)


def _backward(grad: Array, a: GridSampleArgs, needs: Needs) -> tuple[Array | None, Array | None]:
    return _kernels(a.device).grid_sample_backward(
        grad, a.input, a.grid, a.padding_mode, a.align_corners, tuple(needs)
    )


def grid_sample_forward(
    input: ArrayLike,
    grid: ArrayLike,
    mode: str = "bilinear",
    padding_mode: str = "zeros",
    align_corners: bool | None = False,
) -> Array:
    """Array-level forward of :func:`grid_sample`: plain arrays in, a plain array out.

    Parameters
    ----------
    input : array_like, shape (N, C, Hin, Win)
        The feature map, float32 or float64.
    grid : array_like, shape (N, Hout, Wout, 2)
        Normalized sampling coordinates ``(x, y)`` (x first, as torch), in ``input``'s dtype;
        -1 and 1 are the map's extremes (see ``align_corners``). Any real value is allowed.
    mode : {"bilinear"}, default "bilinear"
        Interpolation mode; "bilinear" is the only one implemented.
    padding_mode : {"zeros", "border", "reflection"}, default "zeros"
        What lies outside the map: zeros; the border pixels (coordinates clipped to the map);
        the map reflected about its border lines (about the pixel edges when
        ``align_corners=False``, about the corner pixel centres when True), then clipped.
    align_corners : bool or None, default False
        True: -1 and 1 are the centres of the corner pixels; False: their outer edges. None
        means False (torch's default, without torch's warning).

    Returns
    -------
    out : ndarray or CUDA device array, shape (N, C, Hout, Wout)
        The samples, in ``input``'s dtype, on ``input``'s device.

    Raises
    ------
    TypeError
        If an array is not float32/float64, the dtypes differ, or ``align_corners`` is not a
        bool (or None).
    ValueError
        If ``mode`` or ``padding_mode`` is unknown, a shape is wrong, or the inputs are on
        different devices.

    See Also
    --------
    grid_sample : The differentiable op.
    grid_sample_backward : The matching backward.
    """
    return _forward(prepare(input, grid, mode, padding_mode, align_corners))


def grid_sample_backward(
    grad_out: ArrayLike,
    input: ArrayLike,
    grid: ArrayLike,
    mode: str = "bilinear",
    padding_mode: str = "zeros",
    align_corners: bool | None = False,
    needs: Needs = (True, True),
) -> tuple[Array | None, Array | None]:
    """Array-level backward of :func:`grid_sample`: the gradients of ``input`` and ``grid``.

    Parameters
    ----------
    grad_out : array_like, shape (N, C, Hout, Wout)
        Gradient of the loss with respect to the forward's output, in ``input``'s dtype and on
        its device.
    input : array_like, shape (N, C, Hin, Win)
        The forward's ``input`` (its values are needed for the grid gradient).
    grid : array_like, shape (N, Hout, Wout, 2)
        Normalized sampling coordinates ``(x, y)`` (x first, as torch), in ``input``'s dtype;
        -1 and 1 are the map's extremes (see ``align_corners``). Any real value is allowed.
    mode : {"bilinear"}, default "bilinear"
        Interpolation mode; "bilinear" is the only one implemented.
    padding_mode : {"zeros", "border", "reflection"}, default "zeros"
        What lies outside the map: zeros; the border pixels (coordinates clipped to the map);
        the map reflected about its border lines (about the pixel edges when
        ``align_corners=False``, about the corner pixel centres when True), then clipped.
    align_corners : bool or None, default False
        True: -1 and 1 are the centres of the corner pixels; False: their outer edges. None
        means False (torch's default, without torch's warning).
    needs : sequence of 2 bool, default (True, True)
        Which gradients to compute: ``(input, grid)``.

    Returns
    -------
    grad_input : ndarray or CUDA device array, shape (N, C, Hin, Win), or None
        None where ``needs[0]`` is False.
    grad_grid : ndarray or CUDA device array, shape (N, Hout, Wout, 2), or None
        None where ``needs[1]`` is False.

    Raises
    ------
    TypeError
        If an array is not float32/float64, the dtypes differ, ``align_corners`` is not a bool
        (or None), or ``needs`` is not a sequence.
    ValueError
        If ``mode`` or ``padding_mode`` is unknown, a shape is wrong (``grad_out`` included),
        ``needs`` does not have 2 flags, or the arrays are on different devices.

    See Also
    --------
    grid_sample_forward : The matching forward.

    Notes
    -----
    The CPU backward is deterministic (bit-identical for any thread count). On CUDA the input
    gradient is scattered with float atomic adds unless
    ``deformnp.use_deterministic_algorithms(True)`` is set.
    """
    a = prepare(input, grid, mode, padding_mode, align_corners)
    shape = (a.input.shape[0], a.input.shape[1], a.grid.shape[1], a.grid.shape[2])
    g = grad_array(OP, "grad_out", grad_out, a.input.dtype, shape, a.device)
    return _backward(g, a, needs_flags(OP, needs, ("input", "grid")))


class GridSampleFunction(Function):
    """Autograd node of :func:`grid_sample`; ``args`` from :func:`prepare`."""

    supports_cuda = True  # forward/backward dispatch on the arrays' device
    fresh_grads = True  # backward allocates every gradient it returns

    @staticmethod
    def forward(ctx: Context, input: Array, grid: Array, *, args: GridSampleArgs) -> Array:
        ctx.save_for_backward(args)
        return _forward(args)

    @staticmethod
    def backward(ctx: Context, grad: Array) -> tuple[Array | None, Array | None]:
        (args,) = ctx.saved_tensors
        return _backward(contiguous(grad), args, ctx.needs_input_grad[:2])


def grid_sample(
    input: TensorLike,
    grid: TensorLike,
    mode: str = "bilinear",
    padding_mode: str = "zeros",
    align_corners: bool | None = False,
) -> Tensor:
    r"""Sample a feature map at normalized coordinates, as ``torch.nn.functional.grid_sample``.

    torch's signature, argument order and semantics for ``mode="bilinear"``. Gradients flow to
    ``input`` and ``grid`` when they are Tensors that require grad.

    Parameters
    ----------
    input : Tensor or array_like, shape (N, C, Hin, Win)
        The feature map, float32 or float64.
    grid : Tensor or array_like, shape (N, Hout, Wout, 2)
        Normalized sampling coordinates ``(x, y)`` (x first, as torch), in ``input``'s dtype;
        -1 and 1 are the map's extremes (see ``align_corners``). Any real value is allowed.
    mode : {"bilinear"}, default "bilinear"
        Interpolation mode; "bilinear" is the only one implemented.
    padding_mode : {"zeros", "border", "reflection"}, default "zeros"
        What lies outside the map: zeros; the border pixels (coordinates clipped to the map);
        the map reflected about its border lines (about the pixel edges when
        ``align_corners=False``, about the corner pixel centres when True), then clipped.
    align_corners : bool or None, default False
        True: -1 and 1 are the centres of the corner pixels; False: their outer edges. None
        means False (torch's default, without torch's warning).

    Returns
    -------
    Tensor, shape (N, C, Hout, Wout)
        ``out[n, c, i, j]`` is ``input[n, c]`` sampled at ``grid[n, i, j]``, in ``input``'s
        dtype.

    Raises
    ------
    TypeError
        If an input is not float32/float64, the dtypes differ, or ``align_corners`` is not a
        bool (or None).
    ValueError
        If ``mode`` is not "bilinear" ("nearest" and "bicubic" are not implemented),
        ``padding_mode`` is unknown, a shape is wrong, or the inputs are on different devices.

    See Also
    --------
    bilinear_interpolate : The same sampling in pixel coordinates ``(y, x)``.
    grid_sample_forward, grid_sample_backward : The array-level pair.

    Notes
    -----
    The grid is unnormalized to pixel coordinates by
    :math:`x = \frac{g_x + 1}{2}(W_{in} - 1)` when ``align_corners`` is True and
    :math:`x = \frac{(g_x + 1) W_{in} - 1}{2}` when it is False,
    likewise :math:`y` with :math:`H_{in}`, then sampled bilinearly (with "zeros", the
    zero-fade rule of :func:`bilinear_interpolate`). The grid gradient is the exact derivative
    of that rule: the right-hand slope at integer pixel coordinates, zero inside clipped bands.
    Where torch differs: it zeroes the "border" derivative at a coordinate exactly 0 (deformnp
    takes the right-hand slope); NaN grid values sample 0 in every mode; :math:`\pm\infty`
    sample 0 with "zeros" and "reflection" and the border pixel with "border". See
    :doc:`/ops/bilinear` for the formulas and gradients.

    Examples
    --------
    >>> import numpy as np
    >>> from deformnp.ops import grid_sample
    >>> x = np.arange(16.0).reshape(1, 1, 4, 4)
    >>> grid = np.array([[[[-1.0, -1.0], [0.0, 0.0]]]])  # (N, Hout=1, Wout=2, 2), (x, y)
    >>> grid_sample(x, grid, align_corners=True).numpy()
    array([[[[0. , 7.5]]]])
    """
    args = prepare(input, grid, mode, padding_mode, align_corners)
    return GridSampleFunction.apply(input, grid, args=args)
