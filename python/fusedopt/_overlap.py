"""Which arrays share memory, found by one sort of their byte extents.

A fused call checks its own arrays in the binding. These are for what spans several calls (an
optimizer step of several groups or dtypes, a list of matrices), where the binding sees one call
at a time: they run before the first call writes anything.
"""

from __future__ import annotations

from typing import Any, List, Optional, Sequence, Tuple

import numpy as np

from ._dispatch import core as _core
from .quantize import QuantizedState


def arrays_of(x: Any) -> List[np.ndarray]:
    """The arrays an argument holds: a QuantizedState's codes and scales, none for None."""
    if isinstance(x, QuantizedState):
        return [x.codes, x.scales]
    return [] if x is None else [x]


def add_column(
    arrays: list, columns: list, label: Any, owners: Sequence[Any], xs: Sequence
) -> None:
    """Appends the arrays of `xs` (one argument per owner: an array, a QuantizedState or None)
    to `arrays`, and to `columns` a (label, owners, arrays per owner) entry that names them
    (see `names`). A column of plain arrays, the common case, is added whole."""
    if any(x is None or isinstance(x, QuantizedState) for x in xs):
        for owner, x in zip(owners, xs):
            parts = arrays_of(x)
            arrays += parts
            columns.append((label, [owner], len(parts)))
    else:
        arrays += xs
        columns.append((label, owners, 1))


def names(columns: list) -> List[Tuple[Any, Any]]:
    """(label, owner) of every array that add_column appended, in order."""
    return [(label, owner) for label, owners, k in columns for owner in owners for _ in range(k)]


def byte_extents(arrays: List[np.ndarray]) -> np.ndarray:
    """Each array's bytes as a row [first, one past the last) of an (n, 2) int64 array."""
    return _core._byte_extents(arrays)


def first_overlap(extents: np.ndarray, written: Sequence[bool]) -> Optional[Tuple[int, int]]:
    """The rows of two extents that share a byte, at least one of them written (two that are
    only read may), earlier row first; None if there are none. Sorted by first byte, an
    extent overlaps an earlier one exactly when it starts before the furthest end so far: two
    running maxima, of all ends and of written ends, decide each."""
    begins, ends = extents[:, 0], extents[:, 1]
    order = np.argsort(begins, kind="stable")
    order = order[ends[order] > begins[order]]  # empty arrays share nothing
    if order.size < 2:
        return None
    b, e, w = begins[order], ends[order], np.asarray(written, dtype=bool)[order]
    furthest = np.maximum.accumulate(e)
    furthest_written = np.maximum.accumulate(np.where(w, e, 0))
    hit = (b[1:] < furthest_written[:-1]) | (w[1:] & (b[1:] < furthest[:-1]))
    if not hit.any():
        return None
    k = int(np.argmax(hit)) + 1
    j = int(np.argmax((e[:k] > b[k]) & (w[:k] | w[k])))  # a partner that ends after it starts
    return tuple(sorted((int(order[j]), int(order[k]))))
