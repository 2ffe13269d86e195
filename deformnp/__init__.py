"""deformnp: deformable convolution, RoI pooling and deformable attention in NumPy + Numba.

Public surface (see README.md):

* ``Tensor``, ``tensor``, ``no_grad``, ``enable_grad``: the tape-based autograd engine;
* ``gradcheck``: finite-difference verification of any function of Tensors;
* ``functional``: generic differentiable ops with ``torch.nn.functional``'s names;
* ``ops``: the deformable op family (and their array-level forward/backward pairs);
* ``nn``, ``optim``: layers and optimizers; ``cuda``: device helpers;
* ``use_deterministic_algorithms``: bit-reproducible CUDA backwards (the CPU's always are).

Importing deformnp compiles nothing: ``ops``, ``nn``, ``optim`` and ``cuda`` load on first use and
Numba kernels compile (or load from the on-disk cache) on first call.
"""

from __future__ import annotations

import importlib
import os
from types import ModuleType

# Numba's OpenMP workers spin after each parallel region by default; on a laptop's few cores they
# then fight NumPy's BLAS threads, and a training step that alternates Numba kernels and matrix
# products ran 16x slower here (56 ms vs 3.5 ms). Passive waiting costs the kernels nothing
# measurable. Set before Numba loads its OpenMP runtime; an explicit setting by the user wins.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from . import functional
from .determinism import are_deterministic_algorithms_enabled, use_deterministic_algorithms
from .function import Function, enable_grad, is_grad_enabled, no_grad, set_grad_enabled
from .gradcheck import GradcheckError, gradcheck
from .random import manual_seed
from .tensor import Tensor, tensor

__version__ = "0.1.0"

__all__ = [
    "Tensor",
    "tensor",
    "Function",
    "no_grad",
    "enable_grad",
    "set_grad_enabled",
    "is_grad_enabled",
    "gradcheck",
    "GradcheckError",
    "manual_seed",
    "use_deterministic_algorithms",
    "are_deterministic_algorithms_enabled",
    "functional",
    "ops",
    "nn",
    "optim",
    "cuda",
    "__version__",
]

_LAZY = ("ops", "nn", "optim", "cuda")


def __getattr__(name: str) -> ModuleType:
    """Import ``deformnp.ops``, ``nn``, ``optim`` or ``cuda`` on first use.

    (``from . import ops`` here would call this function again: the submodule is imported by
    name.)
    """
    if name in _LAZY:
        module = importlib.import_module(f".{name}", __name__)
        globals()[name] = module
        return module
    raise AttributeError(f"module 'deformnp' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))
