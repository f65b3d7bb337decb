"""The kernels' declarations (``csrc/kernels/optimizers/*.hpp``), as the binding exports them in
``_core.OPTIMIZERS``: every array and hyperparameter of every optimizer, with defaults and valid
ranges. The functions' signatures and docstrings, the registry that drives the tests and the
benchmark, and the optimizer classes' validation are derived from these."""

from __future__ import annotations

import inspect
import math
from dataclasses import dataclass
from functools import cached_property
from typing import Any, Dict, Mapping, Optional, Sequence, Tuple, Union

import numpy as np

from ._dispatch import core as _core
from .quantize import QuantizedState  # imports NumPy only: no cycle

Arrays = Union[np.ndarray, Sequence[np.ndarray]]
States = Union[np.ndarray, QuantizedState, Sequence[Union[np.ndarray, QuantizedState]]]
"""A state buffer: an array, or an int8 state as a ``QuantizedState`` (one, or a list)."""
_ANNOTATIONS = {"real": float, "step": int, "flag": bool}


@dataclass(frozen=True)
class ArrayArg:
    name: str
    written: bool
    help: str
    optional: bool
    used_when: Optional[str]
    """The option (a hyperparameter) that uses this buffer: required exactly when it is on."""
    old_name: Optional[str]
    """A keyword that still works, with a DeprecationWarning."""
    nonnegative: bool = False
    """A state that is never negative: its int8 form may have uint8 (unsigned) codes."""


@dataclass(frozen=True)
class HyperArg:
    name: str
    kind: str
    """'real', 'step', 'flag', or 'fixed' (set by the declaration, not an argument)."""
    required: bool
    default: Any
    low: float
    high: float
    low_open: bool
    high_open: bool
    label: str
    help: str
    may_be_none: bool = False
    """A real whose default, None, the kernel derives from the others (its help says how)."""

    def range_text(self) -> str:
        """The valid range as the docs say it: ">= 0", "in [0, 1)", ..."""
        if self.kind != "real":
            return ""
        low = _number(self.low)
        if math.isinf(self.high):
            return f"> {low}" if self.low_open else f">= {low}"
        return (
            f"in {'(' if self.low_open else '['}{low}, {_number(self.high)}"
            f"{')' if self.high_open else ']'}"
        )


def _number(x: float) -> str:
    return str(int(x)) if float(x).is_integer() else repr(x)


@dataclass(frozen=True)
class Declaration:
    name: str
    summary: str
    arrays: Tuple[ArrayArg, ...]
    hyperparameters: Tuple[HyperArg, ...]
    passes: int = 1
    """2 for a kernel that reduces over whole tensors before it updates (LAMB's norms): a first,
    read-only pass over every array it reads, then the update."""

    @property
    def function_name(self) -> str:
        return f"{self.name}_"

    @cached_property
    def arguments(self) -> Tuple[HyperArg, ...]:
        """The hyperparameters a caller may pass (every one but the fixed)."""
        return tuple(h for h in self.hyperparameters if h.kind != "fixed")

    @cached_property
    def takes_step(self) -> bool:
        return any(h.kind == "step" for h in self.hyperparameters)

    @cached_property
    def state(self) -> Tuple[str, ...]:
        """Buffers every call reads and writes, positional after ``grad``."""
        return tuple(a.name for a in self.arrays[2:] if not a.optional)

    @cached_property
    def nonnegative_state(self) -> Tuple[str, ...]:
        """State buffers that are never negative: their int8 form has uint8 codes."""
        return tuple(a.name for a in self.arrays[2:] if a.nonnegative)

    @cached_property
    def quantizable(self) -> Tuple[str, ...]:
        """Buffers that may be a ``QuantizedState`` (int8 state): the binding's state part,
        every array the kernel writes but the param (the first; the grad, second, is read
        only), required and optional alike. ``master=`` never is."""
        return tuple(a.name for a in self.arrays[1:] if a.written)

    @cached_property
    def optional_state(self) -> Dict[str, str]:
        """Keyword-only buffers, each needed when the named hyperparameter is truthy."""
        return {a.name: a.used_when for a in self.arrays if a.used_when}

    def defaults(self) -> Dict[str, Any]:
        return dict(self._defaults)

    @cached_property
    def _defaults(self) -> Dict[str, Any]:
        return {h.name: h.default for h in self.arguments if not h.required}

    def buffers(self, hyper: Mapping[str, Any]) -> Tuple[str, ...]:
        """Every buffer this optimizer reads and writes with these hyperparameters."""
        return self.state + tuple(
            a
            for a, option in self.optional_state.items()
            if hyper.get(option, self._defaults.get(option))
        )

    def signature(self) -> inspect.Signature:
        """The public function's signature: the required arrays positional, optional buffers
        and hyperparameters keyword-only, then ``skip_if_nonfinite``."""
        P = inspect.Parameter
        kind = {a.name: States if a.name in self.quantizable else Arrays for a in self.arrays}
        params = [
            P(a.name, P.POSITIONAL_OR_KEYWORD, annotation=kind[a.name])
            for a in self.arrays
            if not a.optional
        ]
        params += [
            P(a.name, P.KEYWORD_ONLY, default=None, annotation=Optional[kind[a.name]])
            for a in self.arrays
            if a.optional
        ]
        params += [
            P(
                h.name,
                P.KEYWORD_ONLY,
                annotation=Optional[float] if h.may_be_none else _ANNOTATIONS[h.kind],
                **({} if h.required else {"default": h.default}),
            )
            for h in self.arguments
        ]
        params.append(P("skip_if_nonfinite", P.KEYWORD_ONLY, default=False, annotation=bool))
        params.append(P("stochastic_rounding", P.KEYWORD_ONLY, default=False, annotation=bool))
        # without a step, a call that draws random bits needs a seed (None: not given)
        seed = (0, int) if self.takes_step else (None, Optional[int])
        params.append(P("seed", P.KEYWORD_ONLY, default=seed[0], annotation=seed[1]))
        params.append(P("master", P.KEYWORD_ONLY, default=None, annotation=Optional[Arrays]))
        return inspect.Signature(params, return_annotation=bool)

    def args_doc(self) -> str:
        """The Args and Returns sections of the function's docstring."""
        lines = ["Args:"]
        for a in self.arrays:
            how = "updated in place" if a.written else "read only"
            when = f"; required when ``{a.used_when}`` is on" if a.used_when else ""
            dtypes = (
                "; float32, bfloat16, or int8 as a ``fusedopt.quantize.QuantizedState`` "
                f"({'int8 or uint8' if a.nonnegative else 'int8'} codes), as param and grad "
                "allow (float64 for float64)"
                if a.name in self.quantizable
                else ""
            )
            lines.append(f"    {a.name}: {a.help}, {how}{when}{dtypes}.")
        for h in self.arguments:
            extra = ", ".join(
                x
                for x in (
                    h.range_text(),
                    "" if h.required or h.kind == "step" else f"default {h.default!r}",
                )
                if x
            )
            lines.append(f"    {h.name}: {h.help}{f' ({extra})' if extra else ''}.")
        lines.append(
            "    skip_if_nonfinite: if any gradient holds a NaN or an infinity, change nothing."
        )
        lines.append(
            "    stochastic_rounding: round what is stored in bfloat16 or float16 up or down at "
            "random, with the probabilities that make it unbiased, instead of to nearest even."
        )
        # the int8 clause and the state's slots only where the kernel has state
        int8, slots = (
            (
                " and of int8 state (whose codes are always rounded stochastically)",
                "array slot: the param 0, the state buffers 1, 2, 3 in the order listed here",
            )
            if self.quantizable
            else ("", "array slot 0, the param's")
        )
        lines.append(
            f"    seed: the random stream of stochastic rounding{int8}, an integer in "
            f"[0, 2**64); the bits are a function of (seed, step, tensor, element, {slots})"
            + (
                "."
                if self.takes_step
                else "; with no step argument, of the seed alone: required where random bits are "
                "drawn (a TypeError without it), a new one each call."
            )
        )
        lines.append(
            "    master: float32 master weights of a bfloat16 or float16 param, updated in "
            "place: the update runs on them and the param is written as the master rounded."
        )
        lines += [
            "",
            "Returns:",
            "    True if the step was applied; False if ``skip_if_nonfinite`` skipped it.",
        ]
        return "\n".join(lines)

    def check(self, hyper: Mapping[str, Any]) -> None:
        """Raise the TypeError or ValueError the function would raise for these
        hyperparameters: a call on empty lists, which validates them and updates nothing."""
        step = {"step": 1} if self.takes_step and "step" not in hyper else {}
        self._kernel(**self._empty_arrays, **hyper, **step)

    @cached_property
    def _empty_arrays(self) -> Dict[str, list]:
        return {a.name: [] for a in self.arrays}

    @cached_property
    def _kernel(self):
        return getattr(_core, self.name)


DECLARATIONS: Dict[str, Declaration] = {
    name: Declaration(
        name=name,
        summary=data["summary"],
        arrays=tuple(ArrayArg(**a) for a in data["arrays"]),
        hyperparameters=tuple(HyperArg(**h) for h in data["hyperparameters"]),
        passes=data["passes"],
    )
    for name, data in _core.OPTIMIZERS.items()
}
