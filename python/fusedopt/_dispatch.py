"""Imports the compiled kernels built for the best SIMD level this CPU supports.

The kernels are built once per level (``_core_baseline``, and on x86-64 ``_core_avx2`` and
``_core_avx512``); the baseline module runs on every CPU of the architecture and says which
levels this one can run. ``FUSEDOPT_SIMD=baseline|avx2|avx512`` forces a level. Every level
computes bit-identical results.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
from types import ModuleType
from typing import TYPE_CHECKING

LEVELS = ("avx512", "avx2", "baseline")  # best first


def _built(level: str) -> bool:
    return importlib.util.find_spec(f"{__package__}._core_{level}") is not None


def _load() -> ModuleType:
    baseline = importlib.import_module("._core_baseline", __package__)
    supported = baseline.cpu_supports()
    runnable = [level for level in LEVELS if supported.get(level) and _built(level)]
    forced = os.environ.get("FUSEDOPT_SIMD", "").strip().lower()
    if forced:
        if forced not in LEVELS:
            raise ImportError(f"FUSEDOPT_SIMD={forced!r}: expected one of {', '.join(LEVELS)}")
        if forced not in runnable:
            raise ImportError(f"FUSEDOPT_SIMD={forced}: this CPU or build cannot run it "
                              f"(it can run: {', '.join(runnable)})")
        return importlib.import_module(f"._core_{forced}", __package__)
    return importlib.import_module(f"._core_{runnable[0]}", __package__)


if TYPE_CHECKING:
    from . import _core_baseline as core
else:
    core = _load()
