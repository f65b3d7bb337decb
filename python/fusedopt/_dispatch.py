"""Imports the compiled kernels built for the best SIMD level this CPU supports.

The kernels are built once per level (``_core_baseline``, and on x86-64 ``_core_avx2`` and
``_core_avx512``); the baseline module runs on every CPU of the architecture and says which
levels this one can run. ``FUSEDOPT_SIMD=baseline|avx2|avx512`` forces a level. Every level
computes bit-identical results.
"""

from __future__ import annotations

import importlib
import os
from types import ModuleType
from typing import TYPE_CHECKING

LEVELS = ("avx512", "avx2", "baseline")  # best first


def _load() -> ModuleType:
    baseline = importlib.import_module("._core_baseline", __package__)
    supported = baseline.cpu_supports()
    forced = os.environ.get("FUSEDOPT_SIMD", "").strip().lower()
    if forced:
        if forced not in LEVELS:
            raise ImportError(f"FUSEDOPT_SIMD={forced!r}: expected one of {', '.join(LEVELS)}")
        if not supported.get(forced):
            runnable = ", ".join(level for level in LEVELS if supported.get(level))
            raise ImportError(f"FUSEDOPT_SIMD={forced}: this CPU or build cannot run it "
                              f"(it can run: {runnable})")
        return importlib.import_module(f"._core_{forced}", __package__)
    for level in LEVELS:
        if supported.get(level):
            return importlib.import_module(f"._core_{level}", __package__)
    return baseline


if TYPE_CHECKING:
    from . import _core_baseline as core
else:
    core = _load()
