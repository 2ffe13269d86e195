"""Bilinear sampling of a feature map at real points, under either border rule.

See :doc:`/ops/bilinear` for the formulas and gradients.

``bilinear_interpolate(input, points, border="zero")`` samples every channel of input (N, C, H,
W) at points (N, P, 2), given as (y, x) pixel coordinates (pixel (i, j) sits at y = i, x = j),
and returns (N, C, P):

* ``border="zero"`` (zero-fade; deformable convolution, grid_sample with zeros padding,
  deformable attention): the paper's kernel ``G(q, p) = g(qy, py) g(qx, px)``,
  ``g(a, b) = max(0, 1 - |a - b|)``, with the map taken as zero outside; a point is out of range
  (value 0) unless -1 <= y < H and -1 <= x < W;
* ``border="clamp"`` (RoI Align and friends; torchvision's ``roi_align`` rule): out of range
  when y < -1 or y > H (likewise x); otherwise y = max(y, 0) and, when floor(y) >= H - 1, the
  row is pinned to H - 1.

NaN and infinite coordinates sample 0. Gradients flow to ``input`` and to ``points``; the point
gradient is the exact derivative of the rule as written: the right-hand slope at integer
coordinates (the floor convention) and zero inside a clamped band. The arithmetic is the one
shared plan of ``deformnp/kernels/rules.py`` (the same code every sampling kernel uses, on both
devices), in float64; the output keeps the input dtype.

Decision: ``points`` must have the input's dtype, like every other pair of float inputs.

The array-level pair, for wrapping in other frameworks::

    out = bilinear_interpolate_forward(input, points, border="zero")
    grad_input, grad_points = bilinear_interpolate_backward(
        grad_out, input, points, border="zero", needs=(True, True))

``needs`` selects which gradients to compute; the others are returned as None.
"""

from __future__ import annotations

from dataclasses import dataclass
from types import ModuleType

from ..function import Context, Function
from ..kernels.cpu import bilinear as cpu_kernels
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

__all__ = [
    "bilinear_interpolate",
    "bilinear_interpolate_forward",
    "bilinear_interpolate_backward",
    "BilinearInterpolateFunction",
]

OP = "bilinear_interpolate"
BORDERS = ("zero", "clamp")


def _kernels(device: str) -> ModuleType:
    """The CPU kernels, or the CUDA ones (imported on first use: numba-cuda is optional)."""
    if device == "cuda":
        from ..kernels.cuda import bilinear as cuda_kernels

        return cuda_kernels
    return cpu_kernels


@dataclass(frozen=True)
class BilinearArgs:
    """The checked arguments of one call: C-contiguous arrays of one dtype on one device."""

    input: Array
    points: Array
    border: str
    device: str


def prepare(input: TensorLike, points: TensorLike, border: str) -> BilinearArgs:
    """Validate the arguments of :func:`bilinear_interpolate` (once, for every entry point)."""
    if border not in BORDERS:
        raise ValueError(f"{OP}: border must be 'zero' or 'clamp', got {border!r}")
    input, points = unwrap(input), unwrap(points)
    device = device_of(OP, input=input, points=points)
    inp = float_array(OP, "input", input)
    pts = float_array(OP, "points", points)
    same_dtype(OP, input=inp, points=pts)
    check_ndim(OP, "input", inp, 4, "(N, C, H, W)")
    check_ndim(OP, "points", pts, 3, "(N, P, 2)")
    if pts.shape[2] != 2:
        raise ValueError(
            f"{OP}: points must be (N, P, 2) holding (y, x), got last dimension "
            f"{pts.shape[2]} (shape {tuple(pts.shape)})"
        )
    if pts.shape[0] != inp.shape[0]:
        raise ValueError(
            f"{OP}: points has batch size {pts.shape[0]}, expected input's batch size "
            f"{inp.shape[0]}"
        )
    return BilinearArgs(inp, pts, border, device)


def _forward(a: BilinearArgs) -> Array:
    return _kernels(a.device).bilinear_interpolate_forward(a.input, a.points, a.border)


def _backward(grad: Array, a: BilinearArgs, needs: Needs) -> tuple[Array | None, Array | None]:
    return _kernels(a.device).bilinear_interpolate_backward(
        grad, a.input, a.points, a.border, tuple(needs)
    )


def bilinear_interpolate_forward(
    input: ArrayLike, points: ArrayLike, border: str = "zero"
) -> Array:
    """Array-level forward of :func:`bilinear_interpolate`: plain arrays in, a plain array out.

    Parameters
    ----------
    input : array_like, shape (N, C, H, W)
        The feature map, float32 or float64 (NumPy, or a CUDA array for the GPU).
    points : array_like, shape (N, P, 2)
        Sampling points as ``(y, x)`` pixel coordinates, in ``input``'s dtype.
    border : {"zero", "clamp"}, default "zero"
        The border rule (see :func:`bilinear_interpolate`).

    Returns
    -------
    out : ndarray or CUDA device array, shape (N, C, P)
        The samples, in ``input``'s dtype, on ``input``'s device.

    Raises
    ------
    TypeError
        If a float input is not float32/float64 or ``input`` and ``points`` differ in dtype.
    ValueError
        If ``border`` is not "zero" or "clamp", a shape is wrong, or the inputs are on
        different devices.

    See Also
    --------
    bilinear_interpolate : The differentiable op.
    bilinear_interpolate_backward : The matching backward.
    """
    return _forward(prepare(input, points, border))


def bilinear_interpolate_backward(
    grad_out: ArrayLike,
    input: ArrayLike,
    points: ArrayLike,
    border: str = "zero",
    needs: Needs = (True, True),
) -> tuple[Array | None, Array | None]:
    """Array-level backward of :func:`bilinear_interpolate`: the gradients of its inputs.

    Parameters
    ----------
    grad_out : array_like, shape (N, C, P)
        Gradient of the loss with respect to the forward's output, in ``input``'s dtype and on
        its device.
    input : array_like, shape (N, C, H, W)
        The forward's ``input`` (its values are needed for the point gradient).
    points : array_like, shape (N, P, 2)
        The forward's ``points``, ``(y, x)``.
    border : {"zero", "clamp"}, default "zero"
        The forward's border rule.
    needs : sequence of 2 bool, default (True, True)
        Which gradients to compute: ``(input, points)``.

    Returns
    -------
    grad_input : ndarray or CUDA device array, shape (N, C, H, W), or None
        None where ``needs[0]`` is False.
    grad_points : ndarray or CUDA device array, shape (N, P, 2), or None
        None where ``needs[1]`` is False.

    Raises
    ------
    TypeError
        If a float array is not float32/float64, the dtypes differ, or ``needs`` is not a
        sequence.
    ValueError
        If ``border`` is unknown, a shape is wrong (``grad_out`` included), ``needs`` does not
        have 2 flags, or the arrays are on different devices.

    See Also
    --------
    bilinear_interpolate_forward : The matching forward.

    Notes
    -----
    On the CPU the input gradient is scattered deterministically (each input plane has one
    writer, points in order); on CUDA with float atomic adds unless
    ``deformnp.use_deterministic_algorithms(True)`` is set.
    """
    a = prepare(input, points, border)
    shape = (a.input.shape[0], a.input.shape[1], a.points.shape[1])
    g = grad_array(OP, "grad_out", grad_out, a.input.dtype, shape, a.device)
    return _backward(g, a, needs_flags(OP, needs, ("input", "points")))


class BilinearInterpolateFunction(Function):
    """Autograd node of :func:`bilinear_interpolate`; ``args`` from :func:`prepare`."""

    supports_cuda = True  # forward/backward dispatch on the arrays' device
    fresh_grads = True  # backward allocates every gradient it returns

    @staticmethod
    def forward(ctx: Context, input: Array, points: Array, *, args: BilinearArgs) -> Array:
        ctx.save_for_backward(args)
        return _forward(args)

    @staticmethod
    def backward(ctx: Context, grad: Array) -> tuple[Array | None, Array | None]:
        (args,) = ctx.saved_tensors
        return _backward(contiguous(grad), args, ctx.needs_input_grad[:2])


def bilinear_interpolate(input: TensorLike, points: TensorLike, border: str = "zero") -> Tensor:
    r"""Sample every channel of a feature map at real ``(y, x)`` points, bilinearly.

    Pixel ``(i, j)`` sits at ``y = i, x = j``. Gradients flow to ``input`` and ``points`` when
    they are Tensors that require grad.

    Parameters
    ----------
    input : Tensor or array_like, shape (N, C, H, W)
        The feature map, float32 or float64.
    points : Tensor or array_like, shape (N, P, 2)
        Sampling points of image ``n`` as ``(y, x)`` pixel coordinates, in ``input``'s dtype.
        Any real value is allowed; NaN and infinite coordinates sample 0.
    border : {"zero", "clamp"}, default "zero"
        ``"zero"``: the map is zero outside (the zero-fade rule of deformable convolution,
        ``grid_sample`` with zeros padding and deformable attention); a point samples 0 unless
        ``-1 <= y < H`` and ``-1 <= x < W``. ``"clamp"``: torchvision's ``roi_align`` rule; a point
        samples 0 when ``y < -1`` or ``y > H`` (likewise ``x``), otherwise the coordinate is
        clamped to ``[0, H - 1]`` (likewise ``x``) before interpolating.

    Returns
    -------
    Tensor, shape (N, C, P)
        ``out[n, c, p]`` is ``input[n, c]`` sampled at ``points[n, p]``, in ``input``'s dtype.

    Raises
    ------
    TypeError
        If an input is not float32/float64 or ``input`` and ``points`` differ in dtype.
    ValueError
        If ``border`` is not "zero" or "clamp", ``input`` is not 4-d, ``points`` is not
        (N, P, 2) with ``input``'s batch size, or the inputs are on different devices.

    See Also
    --------
    grid_sample : The same sampling with normalized coordinates, torch's signature.
    bilinear_interpolate_forward, bilinear_interpolate_backward : The array-level pair.

    Notes
    -----
    With ``border="zero"`` the sample is :math:`\sum_q G(q, p)\, x(q)` over the pixels
    :math:`q`, with :math:`G(q, p) = g(q_y, p_y)\, g(q_x, p_x)` and
    :math:`g(a, b) = \max(0, 1 - |a - b|)`. The point gradient is the exact derivative of the
    rule as written: the right-hand slope at integer coordinates, zero inside a clamped band.
    See :doc:`/ops/bilinear` for both rules and their gradients.

    Examples
    --------
    >>> import numpy as np
    >>> from deformnp.ops import bilinear_interpolate
    >>> x = np.arange(16.0).reshape(1, 1, 4, 4)
    >>> pts = np.array([[[1.5, 2.0], [0.0, 0.5]]])  # (y, x)
    >>> bilinear_interpolate(x, pts).numpy()
    array([[[8. , 0.5]]])
    """
    args = prepare(input, points, border)
    return BilinearInterpolateFunction.apply(input, points, args=args)
