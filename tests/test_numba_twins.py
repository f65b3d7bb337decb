"""The benchmark's numba twins compute the reference formulas (skipped without numba)."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("numba")
sys.path.insert(0, str(Path(__file__).parent.parent / "bench"))
import numba_twins  # noqa: E402

from fusedopt.registry import OPTIMIZERS  # noqa: E402


def test_twins_are_of_registered_optimizers():
    """A twin is optional (the benchmark leaves out an optimizer without one), but each twin
    must be of an optimizer the kernels declare."""
    assert set(numba_twins.TWINS) <= set(OPTIMIZERS)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("name", sorted(numba_twins.TWINS))
def test_twin_matches_reference(name, dtype):
    spec = OPTIMIZERS[name]
    for hyper in spec.cases:
        numba_twins.check(spec, hyper, dtype)
