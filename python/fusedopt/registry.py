"""One entry per update function: what it takes, its reference twin, and hyperparameter sets
that between them take every branch of its formula. The generic tests and the benchmark are
driven by this table, so a new optimizer is covered as soon as it has an entry here."""

from __future__ import annotations

import functools
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, Mapping, Tuple

from . import _functional as fused
from . import reference

__all__ = ["OPTIMIZERS", "OptimizerSpec"]


@dataclass(frozen=True)
class OptimizerSpec:
    name: str
    fused: Callable[..., None]
    reference: Callable[..., None]
    state: Tuple[str, ...]
    """State buffers, passed positionally after ``grad``."""
    optional_state: Mapping[str, str] = field(default_factory=dict)
    """Keyword-only buffers, each needed when the named hyperparameter is truthy."""
    takes_step: bool = False
    cases: Tuple[Dict[str, Any], ...] = ()

    def buffers(self, hyper: Mapping[str, Any]) -> Tuple[str, ...]:
        """Every state buffer this optimizer reads and writes with these hyperparameters."""
        extra = tuple(b for b, switch in self.optional_state.items() if hyper.get(switch))
        return self.state + extra

    def bind(self, fn: Callable[..., Any], arrays: Mapping[str, Any],
             hyper: Mapping[str, Any]) -> Callable[[int], Any]:
        """``fn`` (``self.fused`` or ``self.reference``) on ``arrays``, a mapping of argument
        name to array (or list of arrays): ``param``, ``grad`` and the buffers, as a function
        of the step. The arguments are assembled once, so a timing loop measures ``fn``."""
        positional = [arrays["param"], arrays["grad"]] + [arrays[s] for s in self.state]
        keywords = {b: arrays[b] for b in self.optional_state if b in arrays}
        bound = functools.partial(fn, *positional, **keywords, **hyper)
        if self.takes_step:
            return lambda step: bound(step=step)
        return lambda step: bound()

    def call(self, fn: Callable[..., Any], arrays: Mapping[str, Any],
             hyper: Mapping[str, Any], step: int = 1) -> Any:
        """Calls ``fn`` once, as :meth:`bind` describes."""
        return self.bind(fn, arrays, hyper)(step)

    def bytes_per_element(self, itemsize: int, hyper: Mapping[str, Any]) -> int:
        """Memory traffic of one step: param read and written, grad read, each buffer
        read and written."""
        return itemsize * (3 + 2 * len(self.buffers(hyper)))


OPTIMIZERS: Dict[str, OptimizerSpec] = {
    spec.name: spec
    for spec in [
        OptimizerSpec(
            "sgd", fused.sgd_, reference.sgd_, state=(),
            cases=(dict(lr=0.1), dict(lr=0.05, weight_decay=0.1, maximize=True)),
        ),
        OptimizerSpec(
            "momentum", fused.momentum_, reference.momentum_, state=("buf",),
            cases=(
                dict(lr=0.1, momentum=0.9),
                dict(lr=0.1, momentum=0.9, dampening=0.9, weight_decay=0.01),
                dict(lr=0.05, momentum=0.8, nesterov=True, weight_decay=0.1, maximize=True),
            ),
        ),
        OptimizerSpec(
            "adam", fused.adam_, reference.adam_, state=("exp_avg", "exp_avg_sq"),
            optional_state={"max_exp_avg_sq": "amsgrad"}, takes_step=True,
            cases=(
                dict(),
                dict(lr=0.01, beta1=0.8, beta2=0.99, eps=1e-6, weight_decay=0.1),
                dict(lr=0.01, weight_decay=0.1, decoupled_weight_decay=True, maximize=True),
                dict(lr=0.01, amsgrad=True),
            ),
        ),
        OptimizerSpec(
            "adamw", fused.adamw_, reference.adamw_, state=("exp_avg", "exp_avg_sq"),
            optional_state={"max_exp_avg_sq": "amsgrad"}, takes_step=True,
            cases=(dict(), dict(lr=0.01, weight_decay=0.2, amsgrad=True, maximize=True)),
        ),
        OptimizerSpec(
            "adagrad", fused.adagrad_, reference.adagrad_, state=("sum_sq",), takes_step=True,
            cases=(dict(), dict(lr=0.1, lr_decay=0.01, weight_decay=0.1, eps=1e-6, maximize=True)),
        ),
        OptimizerSpec(
            "rmsprop", fused.rmsprop_, reference.rmsprop_, state=("square_avg",),
            optional_state={"momentum_buf": "momentum", "grad_avg": "centered"},
            cases=(
                dict(),
                dict(lr=0.001, alpha=0.9, eps=1e-6, weight_decay=0.1, maximize=True),
                dict(lr=0.001, momentum=0.9),
                dict(lr=0.001, centered=True, weight_decay=0.01),
                dict(lr=0.001, momentum=0.5, centered=True, maximize=True),
            ),
        ),
        OptimizerSpec(
            "lion", fused.lion_, reference.lion_, state=("exp_avg",),
            cases=(
                dict(),
                dict(lr=1e-3, beta1=0.8, beta2=0.9, weight_decay=0.1, maximize=True),
            ),
        ),
    ]
}
