"""fusedopt: fused, in-place optimizer updates for NumPy arrays.

Each update function (``adam_``, ``sgd_``, ...: every name in ``__all__`` that ends in ``_``
but ``clip_grad_norm_``, which scales gradients) updates the parameters and optimizer state in
one fused, multi-threaded pass in C++, for one array or a whole list of them.
:mod:`fusedopt.reference` holds the same formulas in plain NumPy; :mod:`fusedopt.optim` has
optimizer classes with ``torch.optim``'s conventions, :mod:`fusedopt.schedules` learning-rate
schedules and :mod:`fusedopt.quantize` the 8-bit block-quantized optimizer state
(:class:`~fusedopt.quantize.QuantizedState`).
"""

from __future__ import annotations

import numbers
import sys
from typing import TYPE_CHECKING, Callable

import numpy as np

from . import _functional
from ._clip import clip_grad_norm_, global_norm
from ._dispatch import LEVEL as _LEVEL
from ._dispatch import core as _core
from ._functional import all_finite
from ._matrix import adafactor_, muon_

# The update functions, one per kernel declaration: adam_, sgd_, ...
globals().update(_functional.FUNCTIONS)

if TYPE_CHECKING:  # what a type checker sees of them: made at import, they are not in the source

    def __getattr__(name: str) -> Callable[..., bool]: ...


from . import optim, quantize, reference, schedules  # noqa: E402  (optim uses the above)

__version__: str = _core.__version__

__all__ = [
    "__version__",
    "adafactor_",
    "all_finite",
    "clip_grad_norm_",
    "get_adaptive_threads",
    "get_num_threads",
    "global_norm",
    "muon_",
    "optim",
    "quantize",
    "reference",
    "schedules",
    "set_adaptive_threads",
    "set_num_threads",
    "show_config",
]
__all__ += sorted(_functional.FUNCTIONS)


def get_num_threads() -> int:
    """Number of threads the kernels use (by default OpenMP's, which honours OMP_NUM_THREADS).
    Always 1 in a serial build (one without OpenMP: see :func:`show_config`)."""
    return _core.get_num_threads()


_MAX_THREADS = 2**31 - 1  # the binding's C int


def set_num_threads(threads: int | None) -> None:
    """Set the number of threads the kernels use, for every Python thread; None restores the
    default. Results are bit-identical for every thread count. A serial build (without OpenMP)
    checks ``threads`` and runs on one thread whatever it is."""
    if threads is None:
        _core.set_num_threads(0)
        return
    if isinstance(threads, (bool, np.bool_)) or not isinstance(threads, numbers.Integral):
        raise TypeError(f"threads must be a positive integer or None, got {type(threads).__name__}")
    if not 1 <= threads <= _MAX_THREADS:
        raise ValueError(f"threads must be between 1 and {_MAX_THREADS} or None, got {threads}")
    _core.set_num_threads(int(threads))


_LATE_START_NS = _core.get_late_start_ns()  # the rule's threshold, as built
_NEVER_LATE_NS = 2**62


def get_adaptive_threads() -> bool:
    """Whether fusedopt runs smaller calls on the calling thread while other threads hold the
    cores (see :func:`set_adaptive_threads`); on by default."""
    return _core.get_late_start_ns() < _NEVER_LATE_NS


def set_adaptive_threads(enabled: bool) -> None:
    """Turn on or off the rule that runs smaller calls on the calling thread while other
    threads hold the cores: after a parallel region whose last thread started more than 1 ms
    late (behind NumPy's OpenBLAS threads, which spin for about 0.1 s after each matrix
    product), calls below a few million elements run on one thread for 10 ms or more (README,
    "Threads and processes"). Off, every call large enough to split uses every thread
    (:func:`set_num_threads`), as for a benchmark of thread scaling or on cores nothing else
    uses. Results are the same bits either way. Applies to every Python thread."""
    if not isinstance(enabled, (bool, np.bool_)):
        raise TypeError(f"enabled must be a bool, got {type(enabled).__name__}")
    _core.set_late_start_ns(_LATE_START_NS if enabled else _NEVER_LATE_NS)
    _core.set_busy(0, 0)  # whatever the rule had marked ends now


def show_config(file=None) -> None:
    """Print how this build runs here: SIMD level, threads, Eigen, compiler, OpenMP."""
    supported = [level for level, ok in _core.cpu_supports().items() if ok]
    lines = [
        f"fusedopt {__version__}",
        f"  SIMD level:        {_LEVEL} (this CPU supports: {', '.join(supported)}; "
        f"FUSEDOPT_SIMD forces one)",
        f"  SIMD instructions: {_core.simd_instructions()}",
        f"  threads:           {get_num_threads()} (adaptive: "
        f"{'on' if get_adaptive_threads() else 'off'}; set_adaptive_threads)",
        f"  OpenMP:            {_core.OPENMP or 'none'} ({_core.THREADS})",
        f"  Eigen:             {_core.EIGEN_VERSION}",
        f"  compiler:          {_core.COMPILER}",
        f"  numpy:             {np.__version__}",
    ]
    print("\n".join(lines), file=file or sys.stdout)
