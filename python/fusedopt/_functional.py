"""The fused, in-place update functions, one per kernel declaration.

Every function updates its arrays in place in one fused pass and returns ``True`` (or ``False``
when ``skip_if_nonfinite`` skipped the step). Each array argument is either one
``numpy.ndarray`` (one tensor) or a list of them (many tensors in one call: one parallel region
over all of them). Within a tensor every array has the param's shape and memory layout (C- or
F-contiguous), and the arrays that are written must be writeable. The dtypes of param, grad and
state are one of the kernels' storage rows (``_core.STORAGE_ROWS``: float32, float64, and
bfloat16 or float16 params with float32 or low-precision grads and state), the same for every
tensor of a call; low-precision arrays are computed in float32 and rounded once on store, to
nearest even or, with ``stochastic_rounding``, at random without bias. Anything else raises
``TypeError`` or ``ValueError`` before any array is touched: an array that would need a copy
is an error, never a silent no-op.

Nothing here is written per optimizer: each function is the binding's kernel function with the
signature derived from its declaration (``csrc/kernels/optimizers/*.hpp``, exported as
``_core.OPTIMIZERS``) and the docstring of its :mod:`fusedopt.reference` twin, whose formula
it computes bit for bit.
"""

from __future__ import annotations

import warnings
from typing import Callable, Dict

from . import reference
from ._declarations import DECLARATIONS, Arrays, Declaration
from ._dispatch import core as _core

__all__ = ["Arrays", "FUNCTIONS", "all_finite"]


def all_finite(arrays: Arrays) -> bool:
    """Whether every element of ``arrays`` (one array or a list, of one floating dtype: float32,
    float64, bfloat16 or float16)
    is finite: one fused, parallel pass that stops at the first NaN or infinity."""
    return _core.all_finite(arrays)


def _function(declaration: Declaration) -> Callable[..., bool]:
    """The public function of a kernel: a plain Python function with the declared signature
    that passes its arguments on by keyword, generated from source as ``dataclasses`` and
    ``collections.namedtuple`` generate theirs. A wrapper taking ``*args, **kwargs`` would
    repack them on every call, which costs as much as a small kernel."""
    signature = declaration.signature()
    renamed = {a.name: a.old_name for a in declaration.arrays if a.old_name}
    defaults = {
        f"_default_{p.name}": p.default
        for p in signature.parameters.values()
        if p.default is not p.empty
    }
    header, passed, star, body = [], [], False, []
    for p in signature.parameters.values():
        if p.kind is p.KEYWORD_ONLY and not star:
            header.append("*")
            star = True
        if p.name in renamed and p.default is p.empty:
            header.append(f"{p.name}=None")  # the caller may name it by its old keyword
        else:
            header.append(p.name if p.default is p.empty else f"{p.name}=_default_{p.name}")
        passed.append(p.name if p.kind is p.POSITIONAL_OR_KEYWORD else f"{p.name}={p.name}")
    for new, old in renamed.items():  # hidden from the signature; warns where it is used
        header.append(f"{old}=_UNSET")
        body.append(
            f"    if {old} is not _UNSET:\n"
            f"        {new} = _renamed({declaration.function_name!r}, {old!r}, "
            f"{new!r}, {old}, {new})\n"
        )
    # CPython calls a function with more than 30 stack slots (an argument takes one, a keyword
    # argument two) through a tuple and a dict built for the call, which costs as much again as
    # the binding's own work on an empty call. Past that, a call that leaves the options every
    # kernel has at their defaults omits them, as the binding's defaults are the same.
    slots = sum(1 if "=" not in a else 2 for a in passed)
    omitted = {}
    for option, default in (
        ("master", None),
        ("stochastic_rounding", False),
        ("skip_if_nonfinite", False),
    ):
        if slots <= _MOST_STACK_SLOTS:
            break
        omitted[option] = default
        slots -= 2
    if omitted:
        test = " and ".join(f"{option} is {default}" for option, default in omitted.items())
        fast = [a for a in passed if a.split("=")[0] not in omitted]
        body.append(f"    if {test}:\n        return _kernel({', '.join(fast)})\n")
    name = declaration.function_name
    source = (
        f"def {name}({', '.join(header)}):\n"
        + "".join(body)
        + f"    return _kernel({', '.join(passed)})\n"
    )
    namespace = {
        "__name__": __name__,
        "_kernel": getattr(_core, declaration.name),
        "_UNSET": _UNSET,
        "_renamed": _renamed,
        **defaults,
    }
    exec(source, namespace)  # noqa: S102  (source built from the declaration's names)
    update = namespace[name]
    update.__signature__ = signature
    update.__module__ = "fusedopt"
    update.__annotations__ = {p.name: p.annotation for p in signature.parameters.values()}
    update.__annotations__["return"] = signature.return_annotation
    twin = getattr(reference, name)
    update.__doc__ = f"{twin.__doc__.rstrip()}\n\n{_indent(declaration.args_doc())}\n"
    return update


_UNSET = object()
_MOST_STACK_SLOTS = 30  # CPython compiler's STACK_USE_GUARDRAIL


def _renamed(function: str, old: str, new: str, value, current):
    """The array passed by its old keyword, with a DeprecationWarning at the caller's line."""
    if current is not None:
        raise TypeError(f"{function}() got {new} and its old keyword {old}: pass only {new}")
    warnings.warn(
        f"{function}(): the keyword {old} is deprecated; use {new}",
        DeprecationWarning,
        stacklevel=3,
    )
    return value


def _indent(text: str) -> str:
    return "\n".join(f"    {line}" if line else "" for line in text.splitlines())


FUNCTIONS: Dict[str, Callable[..., bool]] = {
    d.function_name: _function(d) for d in DECLARATIONS.values()
}
globals().update(FUNCTIONS)
__all__ += sorted(FUNCTIONS)
