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


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("name", OPTIMIZERS)
def test_twin_matches_reference(name, dtype):
    spec = OPTIMIZERS[name]
    assert name in numba_twins.TWINS
    for hyper in spec.cases:
        numba_twins.check(spec, hyper, dtype)
