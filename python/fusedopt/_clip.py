"""Global gradient norm and clipping, fused over all tensors."""

from __future__ import annotations

import contextlib
import math
import re
from typing import Any, Dict, Iterable, Iterator, List, Mapping, Optional, Tuple, Union

import numpy as np

from . import _overlap
from ._dispatch import core as _core

__all__ = ["clip_grad_norm_", "global_norm"]

Grads = Union[np.ndarray, Iterable[Optional[np.ndarray]]]


def _listed(grads: Grads) -> List[Optional[np.ndarray]]:
    """The gradients as a list, read once (an iterator or generator too)."""
    if isinstance(grads, np.ndarray):
        return [grads]
    if not isinstance(grads, Iterable) or isinstance(grads, (str, bytes, Mapping)):
        hint = " (its values() are)" if isinstance(grads, Mapping) else ""
        raise TypeError(
            "grads: expected a numpy.ndarray or an iterable of them (None for no gradient), "
            f"got {type(grads).__name__}{hint}"
        )
    return list(grads)


def _by_dtype(grads: List[Optional[np.ndarray]]) -> List[Tuple[List[np.ndarray], List[int]]]:
    """Non-None gradients grouped by dtype, float32 first: one fused call each, added in a
    fixed order; with each group, its gradients' places in ``grads``."""
    groups: Dict[str, Tuple[List[np.ndarray], List[int]]] = {}
    for i, g in enumerate(grads):
        if g is None:
            continue
        if not isinstance(g, np.ndarray):
            raise TypeError(f"grads[{i}]: expected a numpy.ndarray or None, got {type(g).__name__}")
        arrays, places = groups.setdefault(g.dtype.str, ([], []))
        arrays.append(g)
        places.append(i)
    return [groups[k] for k in sorted(groups)]


@contextlib.contextmanager
def _named_as_grads(places: List[int]) -> Iterator[None]:
    """A fused call's errors name its arrays by place in the call (``arrays[1]``): renamed by
    place in ``grads``."""
    try:
        yield
    except (TypeError, ValueError) as error:
        message = re.sub(r"arrays\[(\d+)\]", lambda m: f"grads[{places[int(m[1])]}]", str(error))
        raise type(error)(message) from None


def _check_writable(grads: List[Optional[np.ndarray]]) -> None:
    """That every gradient can be scaled in place, named by its place in ``grads``: checked for
    all of them before the first dtype's call writes (each call sees only its own dtype)."""
    where = [(i, g) for i, g in enumerate(grads) if g is not None]
    for i, g in where:  # (a strided one was refused by sum_squares already)
        if not g.flags.writeable:
            raise ValueError(f"grads[{i}]: array is read-only")
    hit = _overlap.first_overlap(_overlap.byte_extents([g for _, g in where]), [True] * len(where))
    if hit is not None:
        first, second = (where[k][0] for k in hit)
        raise ValueError(
            f"grads[{first}] and grads[{second}] share memory; an array that is updated in "
            "place must not overlap any other argument"
        )


def global_norm(grads: Grads) -> float:
    r"""The L2 norm of all gradients together, :math:`\sqrt{\sum_i \lVert g_i \rVert^2}`,
    accumulated in double in one fused parallel pass per dtype; bit-identical for every thread
    count. None entries are skipped."""
    return math.sqrt(_sum_squares(_by_dtype(_listed(grads))))


def _sum_squares(groups: List[Tuple[List[np.ndarray], List[int]]]) -> float:
    total = 0.0
    for arrays, places in groups:
        with _named_as_grads(places):
            total += _core.sum_squares(arrays)
    return total


def as_max_norm(value: Any) -> Optional[float]:
    """``value`` as a float, if it is a real number or a 0-d array or tensor of one (as torch's
    clip_grad_norm_ takes it: float(max_norm)), not a bool or a str; else None. An integer past
    a double's range is infinite."""
    if isinstance(value, (bool, np.bool_, str, bytes)) or getattr(value, "ndim", 0) != 0:
        return None
    try:
        return float(value)
    except OverflowError:
        return math.inf
    except (TypeError, ValueError):
        return None


def clip_grad_norm_(grads: Grads, max_norm: float, *, error_if_nonfinite: bool = False) -> float:
    r"""Scale all gradients in place so that their global L2 norm is at most ``max_norm``, as
    ``torch.nn.utils.clip_grad_norm_``:

    .. math::
        n = \sqrt{\textstyle\sum_i \lVert g_i \rVert^2}, \qquad
        g_i \leftarrow g_i \cdot \min\!\left(1, \frac{\text{max\_norm}}{n + 10^{-6}}\right)

    Returns the norm before clipping. A NaN norm makes every gradient NaN, and an infinite
    one scales them by 0, as torch's do; with ``error_if_nonfinite`` either raises RuntimeError
    and leaves the gradients unchanged. A gradient that cannot be scaled in
    place (read-only, strided, sharing memory with another) is a ValueError that names it, and
    no gradient is changed.
    """
    norm = as_max_norm(max_norm)
    if norm is None:
        raise TypeError(
            f"max_norm must be a real number (or a 0-d array of one), got {type(max_norm).__name__}"
        )
    if not (math.isfinite(norm) and norm >= 0):
        raise ValueError(f"Invalid max_norm: {max_norm} (a finite number >= 0)")
    max_norm = norm
    grads = _listed(grads)
    groups = _by_dtype(grads)
    total = math.sqrt(_sum_squares(groups))
    if error_if_nonfinite and not math.isfinite(total):
        raise RuntimeError(
            f"The total norm of the gradients is non-finite ({total}), so it cannot be clipped"
        )
    coef = max_norm / (total + 1e-6)
    if coef < 1.0 or math.isnan(coef):
        # each call sees one dtype, and NumPy's multiply names no array: all checked first
        if len(groups) > 1 or math.isnan(coef):
            _check_writable(grads)
        for arrays, places in groups:
            with _named_as_grads(places):
                scale_by_coefficient(arrays, coef)
    return total


def scale_by_coefficient(arrays: List[np.ndarray], coef: float) -> None:
    r"""Scales ``arrays`` (of one dtype) in place by :math:`\min(1, coef)` as torch's clamp
    takes it: a NaN coefficient (a NaN norm) makes every element NaN."""
    if math.isnan(coef):
        for a in arrays:
            np.multiply(a, math.nan, out=a)
    elif coef < 1.0:
        _core.scale(arrays, factor=coef)
