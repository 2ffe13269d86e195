"""The deterministic-algorithms switch, in the spirit of ``torch.use_deterministic_algorithms``.

The CPU kernels are always deterministic: every output element has one writer, or per-task
buffers are reduced in a fixed order, so gradients are bit-identical across runs and thread
counts. On CUDA the input (value) gradients of the sampling ops are, by default, scattered with
float atomic adds, whose order, and so whose last bits, change from run to run. With the switch on,
those gradients are instead computed owner-by-owner: every (corner, sample) contribution is
listed once, the list is sorted by (destination pixel, contribution number), and one thread per
destination element sums its contributions in that order. The result is bit-identical across
runs, the extra memory is a few integers per contribution (proportional to the outputs), and the
cost is a sort: expect the backward to be slower.

Nothing else changes: forwards, and the position / weight / mask gradients (one writer each), are
deterministic either way.
"""

from __future__ import annotations

__all__ = ["use_deterministic_algorithms", "are_deterministic_algorithms_enabled"]

_enabled = False


def use_deterministic_algorithms(mode: bool) -> None:
    """Make every CUDA backward bit-reproducible, or allow float atomics.

    The analogue of ``torch.use_deterministic_algorithms``. CPU kernels are deterministic either
    way. The switch changes only how the CUDA kernels form the input (value) gradients of the
    sampling ops: each destination element sums its contributions, sorted by (destination,
    contribution number), in that fixed order, instead of receiving float atomic adds whose
    order (and so whose last bits) vary from run to run.

    Parameters
    ----------
    mode : bool
        True: sum each gradient element's contributions in a fixed order (bit-identical across
        runs, slower backward). False (the default state): float atomic adds.

    Raises
    ------
    TypeError
        If ``mode`` is not a bool.

    See Also
    --------
    are_deterministic_algorithms_enabled : The current state.
    """
    global _enabled
    if not isinstance(mode, bool):
        raise TypeError(
            f"use_deterministic_algorithms: mode must be a bool, got {type(mode).__name__}"
        )
    _enabled = mode


def are_deterministic_algorithms_enabled() -> bool:
    """Tell whether CUDA backwards avoid float atomics.

    Returns
    -------
    bool
        True after ``use_deterministic_algorithms(True)``; False by default.

    See Also
    --------
    use_deterministic_algorithms : The switch.
    """
    return _enabled
