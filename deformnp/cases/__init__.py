"""Check and bench cases: plain tables read by the command line (``python -m deformnp check`` and
``bench``), the tests and the benches.

* :mod:`~deformnp.cases.check`: small float64 gradient checks of every op and layer, off the
  kinks of the sampling rules (:func:`check_cases`);
* :mod:`~deformnp.cases.bench`: every op at the reference sizes of the spec, with its torch /
  torchvision counterpart (:func:`bench_cases`);
* :mod:`~deformnp.cases.inputs`: the generators of inputs off the kinks, shared by the tables
  and the tests.

Nothing in ``deformnp.ops``, ``deformnp.nn`` or the kernels imports this package.
"""

from __future__ import annotations

from .bench import BenchCase, bench_cases
from .check import CheckCase, check_cases

__all__ = ["BenchCase", "bench_cases", "CheckCase", "check_cases"]
