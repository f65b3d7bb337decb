"""The sweep that finds arrays sharing memory across the fused calls of one step
(fusedopt/_overlap.py), against every pair compared, and the extents it sorts."""

from __future__ import annotations

import numpy as np
import pytest

from fusedopt import _core, _overlap


def _pairs(extents, written):
    """Every pair that shares a byte with one of them written, by brute force."""
    return {
        (i, j)
        for i in range(len(extents))
        for j in range(i + 1, len(extents))
        if (written[i] or written[j])
        and max(extents[i][0], extents[j][0]) < min(extents[i][1], extents[j][1])
    }


@pytest.mark.parametrize("seed", range(200))
def test_first_overlap_finds_a_pair_exactly_when_one_exists(seed):
    rng = np.random.default_rng(seed)
    n = int(rng.integers(0, 12))
    begins = rng.integers(0, 60, n)
    extents = np.stack((begins, begins + rng.integers(0, 8, n)), axis=1).astype(np.int64)
    written = rng.random(n) < rng.random()
    pairs = _pairs(extents.tolist(), written)
    found = _overlap.first_overlap(extents, written)
    assert (found is None) == (not pairs)
    if found is not None:
        assert found in pairs


def test_byte_extents_of_views_and_layouts():
    a = np.zeros((3, 4), np.float32)
    base = a.__array_interface__["data"][0]
    cases = [
        (a, (base, base + 48)),
        (a[:, ::-1], (base, base + 48)),  # negative strides: the same bytes
        (a.T, (base, base + 48)),
        (a[1], (base + 16, base + 32)),
        (a[:, 1], (base + 4, base + 4 + 2 * 16 + 4)),
        (a[:0], (0, 0)),
    ]
    extents = _core._byte_extents([x for x, _ in cases])
    assert extents.dtype == np.int64 and extents.shape == (len(cases), 2)
    assert [tuple(e) for e in extents.tolist()] == [e for _, e in cases]
    with pytest.raises(TypeError, match="_byte_extents: expected numpy.ndarray or Borrowed items"):
        _core._byte_extents([a, [1.0]])
