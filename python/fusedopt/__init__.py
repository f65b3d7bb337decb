"""fusedopt: fused, in-place optimizer updates for NumPy arrays.

Each update function (``sgd_``, ``momentum_``, ``adam_``, ``adamw_``, ``adagrad_``,
``rmsprop_``) updates the parameters and optimizer state in one fused, multi-threaded pass in
C++, for one array or a whole list of them. :mod:`fusedopt.reference` holds the same formulas in
plain NumPy.
"""

from __future__ import annotations

import sys

import numpy as np

from . import optim, reference, schedules
from ._clip import clip_grad_norm_, global_norm
from ._dispatch import core as _core
from ._functional import (adagrad_, adam_, adamw_, all_finite, lion_, momentum_, rmsprop_,
                          sgd_)

__version__: str = _core.__version__

__all__ = [
    "__version__",
    "adagrad_",
    "adam_",
    "adamw_",
    "all_finite",
    "clip_grad_norm_",
    "get_num_threads",
    "global_norm",
    "lion_",
    "momentum_",
    "optim",
    "reference",
    "rmsprop_",
    "schedules",
    "set_num_threads",
    "sgd_",
    "show_config",
]


def get_num_threads() -> int:
    """Number of threads the kernels use (by default OpenMP's, which honours OMP_NUM_THREADS)."""
    return _core.get_num_threads()


def set_num_threads(threads: int | None) -> None:
    """Set the number of threads the kernels use, for every Python thread; None restores the
    default. Results are bit-identical for every thread count."""
    if threads is None:
        _core.set_num_threads(0)
        return
    if isinstance(threads, bool) or not isinstance(threads, int) or threads < 1:
        raise ValueError(f"threads must be a positive integer or None, got {threads!r}")
    _core.set_num_threads(threads)


def show_config(file=None) -> None:
    """Print how this build runs here: SIMD level, threads, Eigen, compiler, OpenMP."""
    supported = [level for level, ok in _core.cpu_supports().items() if ok]
    lines = [
        f"fusedopt {__version__}",
        f"  SIMD level:        {_core.SIMD_LEVEL} (this CPU supports: {', '.join(supported)}; "
        f"FUSEDOPT_SIMD forces one)",
        f"  SIMD instructions: {_core.SIMD_INSTRUCTIONS}",
        f"  threads:           {get_num_threads()}",
        f"  OpenMP:            {_core.OPENMP}",
        f"  Eigen:             {_core.EIGEN_VERSION}",
        f"  compiler:          {_core.COMPILER}",
        f"  numpy:             {np.__version__}",
    ]
    print("\n".join(lines), file=file or sys.stdout)
