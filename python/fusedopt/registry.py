"""One entry per update function, derived from its kernel's declaration: what it takes, its
reference twin, and hyperparameter sets that between them take every branch of its formula. The
generic tests, the benchmark and memcheck are driven by this table, so a new optimizer is
covered as soon as its kernel header declares it."""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Mapping, Tuple

from . import _functional, reference
from ._declarations import DECLARATIONS, Declaration

__all__ = ["OPTIMIZERS", "OptimizerSpec", "cases"]


def _varied(h) -> Any:
    """A valid value other than the default, for the cases."""
    if h.kind == "flag":
        return not h.default
    base = 0.1 if h.required or h.default is None else h.default
    value = base * 0.5 if base else 0.1
    return value if h.high > value else h.high / 2


def cases(declaration: Declaration) -> Tuple[Dict[str, Any], ...]:
    """Hyperparameter sets that take every branch: the defaults; every flag and option on,
    each alone; every real changed; and every real changed with every flag flipped. Required
    reals, and those whose default is None, are 0.1 unless changed. A set that a rule across
    hyperparameters refuses (Nesterov with dampening) is repaired by giving reals back their
    defaults, one at a time."""
    args = [h for h in declaration.arguments if h.kind != "step"]
    base = {h.name: 0.1 for h in args if h.required}
    options = set(declaration.optional_state.values())
    found: List[Dict[str, Any]] = [dict(base)]
    for h in args:
        if h.kind == "flag" or h.name in options:
            found.append({**base, h.name: _varied(h)})
    reals = {h.name: _varied(h) for h in args if h.kind == "real"}
    found.append(reals)
    found.append({h.name: _varied(h) for h in args})
    valid: List[Dict[str, Any]] = []
    for hyper in found:
        hyper = _repaired(declaration, hyper, args)
        if hyper is not None and hyper not in valid:
            valid.append(hyper)
    return tuple(valid)


def _repaired(declaration: Declaration, hyper: Dict[str, Any], args) -> Any:
    """``hyper``, or with the fewest reals back at their defaults that the declaration
    accepts; None if none does."""
    for h in [None] + [h for h in args if h.kind == "real" and not h.required]:
        candidate = dict(hyper) if h is None else {k: v for k, v in hyper.items() if k != h.name}
        try:
            declaration.check(candidate)
        except ValueError:
            continue
        return candidate
    return None


@dataclass(frozen=True)
class OptimizerSpec:
    name: str
    fused: Callable[..., bool]
    reference: Callable[..., bool]
    declaration: Declaration
    cases: Tuple[Dict[str, Any], ...]

    @property
    def state(self) -> Tuple[str, ...]:
        return self.declaration.state

    @property
    def optional_state(self) -> Mapping[str, str]:
        return self.declaration.optional_state

    @property
    def takes_step(self) -> bool:
        return self.declaration.takes_step

    def buffers(self, hyper: Mapping[str, Any]) -> Tuple[str, ...]:
        """Every state buffer this optimizer reads and writes with these hyperparameters."""
        return self.declaration.buffers(hyper)

    def bind(
        self, fn: Callable[..., Any], arrays: Mapping[str, Any], hyper: Mapping[str, Any]
    ) -> Callable[[int], Any]:
        """``fn`` (``self.fused`` or ``self.reference``) on ``arrays``, a mapping of argument
        name to array (or list of arrays): ``param``, ``grad`` and the buffers, as a function
        of the step. The arguments are assembled once, so a timing loop measures ``fn``."""
        positional = [arrays["param"], arrays["grad"]] + [arrays[s] for s in self.state]
        keywords = {b: arrays[b] for b in self.optional_state if b in arrays}
        bound = functools.partial(fn, *positional, **keywords, **hyper)
        if self.takes_step:
            return lambda step: bound(step=step)
        return lambda step: bound()

    def call(
        self,
        fn: Callable[..., Any],
        arrays: Mapping[str, Any],
        hyper: Mapping[str, Any],
        step: int = 1,
    ) -> Any:
        """Calls ``fn`` once, as :meth:`bind` describes."""
        return self.bind(fn, arrays, hyper)(step)

    def bytes_per_element(self, itemsize: int, hyper: Mapping[str, Any]) -> int:
        """Memory traffic of one step: param read and written, grad read, each buffer
        read and written; a two-pass kernel reads param, grad and each buffer once more
        first."""
        buffers = len(self.buffers(hyper))
        first_pass = 2 + buffers if self.declaration.passes == 2 else 0
        return itemsize * (3 + 2 * buffers + first_pass)


OPTIMIZERS: Dict[str, OptimizerSpec] = {
    name: OptimizerSpec(
        name,
        _functional.FUNCTIONS[d.function_name],
        getattr(reference, d.function_name),
        d,
        cases(d),
    )
    for name, d in DECLARATIONS.items()
}
