"""Loads the kernels built for the best SIMD level this CPU supports into the binding.

The binding ``_core`` is built once; the kernels are built once per level, each into a library of
its own (``_kernels_baseline``; on x86-64 ``_kernels_avx2`` and ``_kernels_avx512``; on aarch64
Linux ``_kernels_sve``). The binding says which levels this CPU runs; the best one built is
loaded with ctypes and its table of kernels handed to the binding.
``FUSEDOPT_SIMD=baseline|avx2|avx512|sve`` forces a level. Every level computes bit-identical
results.
"""

from __future__ import annotations

import ctypes
import os
from pathlib import Path
from typing import Dict, Optional

from . import _core as core

LEVELS = ("avx512", "avx2", "sve", "baseline")  # best first (sve: aarch64 Linux)
_HERE = Path(core.__file__).parent  # beside the binding (editable installs keep them apart)
_loaded: Dict[str, ctypes.CDLL] = {}  # kept for the life of the process


def library(level: str) -> Optional[Path]:
    """The kernel library of ``level`` in this installation, or None if it was not built."""
    found = sorted(
        p
        for p in _HERE.glob(f"_kernels_{level}.*")
        if p.suffix in (".so", ".dll", ".dylib", ".pyd")
    )
    return found[0] if found else None


def runnable() -> list:
    """Levels this CPU supports and this build includes, best first."""
    supported = core.cpu_supports()
    return [level for level in LEVELS if supported.get(level) and library(level) is not None]


def _load() -> str:
    levels = runnable()
    forced = os.environ.get("FUSEDOPT_SIMD", "").strip().lower()
    if forced:
        if forced not in LEVELS:
            raise ImportError(f"FUSEDOPT_SIMD={forced!r}: expected one of {', '.join(LEVELS)}")
        if forced not in levels:
            raise ImportError(
                f"FUSEDOPT_SIMD={forced}: this CPU or build cannot run it "
                f"(it can run: {', '.join(levels)})"
            )
    if not levels:
        raise ImportError(f"fusedopt: no kernel library beside {core.__file__}: reinstall fusedopt")
    level = forced or levels[0]
    lib = _loaded[level] = ctypes.CDLL(str(library(level)))
    core._use_kernels(ctypes.cast(lib.fusedopt_kernel_table, ctypes.c_void_p).value)
    return level


LEVEL = _load()
