"""Global gradient norm and clipping, fused over all tensors."""

from __future__ import annotations

import math
from typing import Dict, List, Optional, Sequence, Union

import numpy as np

from ._dispatch import core as _core

__all__ = ["clip_grad_norm_", "global_norm"]

Grads = Union[np.ndarray, Sequence[Optional[np.ndarray]]]


def _by_dtype(grads: Grads) -> List[List[np.ndarray]]:
    """Non-None gradients grouped by dtype, float32 first: one fused call each, added in a
    fixed order."""
    if isinstance(grads, np.ndarray):
        grads = [grads]
    groups: Dict[str, List[np.ndarray]] = {}
    for i, g in enumerate(grads):
        if g is None:
            continue
        if not isinstance(g, np.ndarray):
            raise TypeError(f"grads[{i}]: expected a numpy.ndarray or None, got {type(g).__name__}")
        groups.setdefault(g.dtype.str, []).append(g)
    return [groups[k] for k in sorted(groups)]


def global_norm(grads: Grads) -> float:
    r"""The L2 norm of all gradients together, :math:`\sqrt{\sum_i \lVert g_i \rVert^2}`,
    accumulated in double in one fused parallel pass per dtype; bit-identical for every thread
    count. None entries are skipped."""
    return math.sqrt(sum(_core.sum_squares(group) for group in _by_dtype(grads)))


def clip_grad_norm_(grads: Grads, max_norm: float, *, error_if_nonfinite: bool = False) -> float:
    r"""Scale all gradients in place so that their global L2 norm is at most ``max_norm``, as
    ``torch.nn.utils.clip_grad_norm_``:

    .. math::
        n = \sqrt{\textstyle\sum_i \lVert g_i \rVert^2}, \qquad
        g_i \leftarrow g_i \cdot \min\!\left(1, \frac{\text{max\_norm}}{n + 10^{-6}}\right)

    Returns the norm before clipping. With ``error_if_nonfinite`` a NaN or infinite norm
    raises RuntimeError and leaves the gradients unchanged.
    """
    if not (max_norm >= 0 and math.isfinite(max_norm)):
        raise ValueError(f"Invalid max_norm: {max_norm}")
    groups = _by_dtype(grads)
    total = math.sqrt(sum(_core.sum_squares(group) for group in groups))
    if error_if_nonfinite and not math.isfinite(total):
        raise RuntimeError(
            f"The total norm of the gradients is non-finite ({total}), so it cannot be clipped"
        )
    coef = max_norm / (total + 1e-6)
    if coef < 1.0:
        for group in groups:
            _core.scale(group, factor=coef)
    return total
