"""Every place derived from a kernel's declaration agrees with it.

A declaration (``csrc/kernels/optimizers/*.hpp``, exported as ``_core.OPTIMIZERS``) is the one
source of an optimizer's arrays, hyperparameters, defaults and valid ranges. These tests fail
when a place that is written by hand disagrees with it: the reference function's signature, the
optimizer class's defaults, the README's row; and they check that the places
derived from it (the function, its signature and docstring, the registry, the exports) exist.
"""

from __future__ import annotations

import dis
import inspect
import math
import re
import warnings
from pathlib import Path

import numpy as np
import pytest
from support import assert_same_bits

import fusedopt
from fusedopt import _core, optim, reference
from fusedopt._declarations import DECLARATIONS
from fusedopt.registry import OPTIMIZERS

NAMES = sorted(DECLARATIONS)
README = Path(__file__).resolve().parents[1] / "README.md"
CLASSES = [
    cls
    for cls in vars(optim).values()
    if isinstance(cls, type) and issubclass(cls, optim.Optimizer) and cls.kernel
]


def parameters(signature: inspect.Signature):
    """Positional parameters in order, keyword-only ones by name: (name, kind, default)."""
    positional = [
        (p.name, p.kind, p.default)
        for p in signature.parameters.values()
        if p.kind is not p.KEYWORD_ONLY
    ]
    keyword = {p.name: p.default for p in signature.parameters.values() if p.kind is p.KEYWORD_ONLY}
    return positional, keyword


def test_every_kernel_is_declared_and_exported():
    assert NAMES == sorted(_core.OPTIMIZERS)
    assert "adamax" in NAMES
    for name in NAMES:
        function = f"{name}_"
        assert getattr(fusedopt, function) is OPTIMIZERS[name].fused
        assert function in fusedopt.__all__
        assert callable(getattr(reference, function)), f"no reference.{function}"
        assert function in reference.__all__


@pytest.mark.parametrize("name", NAMES)
def test_reference_signature_equals_the_declared_one(name):
    """The hand-written reference function takes exactly the declared arguments, with the
    declared defaults: positional arrays in order, then keywords."""
    declared = DECLARATIONS[name].signature()
    written = inspect.signature(getattr(reference, f"{name}_"))
    assert parameters(written) == parameters(declared)


def test_reference_switches_buffers_as_the_declarations_do():
    """The reference's table of buffers read only while a hyperparameter is on is the
    declarations' (each optional state array and the option it is used with)."""
    declared = {
        buffer: switch
        for spec in OPTIMIZERS.values()
        for buffer, switch in spec.optional_state.items()
    }
    assert reference._SWITCHED_BUFFERS == declared


@pytest.mark.parametrize("name", NAMES)
def test_docstring_has_the_rule_and_every_argument(name):
    doc = getattr(fusedopt, f"{name}_").__doc__
    assert "math::" in doc
    assert doc.startswith(getattr(reference, f"{name}_").__doc__.rstrip())
    for arg in DECLARATIONS[name].signature().parameters:
        assert re.search(rf"^\s+{arg}: \S", doc, re.M), f"{name}_ docstring lacks {arg}"


@pytest.mark.parametrize("name", list(DECLARATIONS))
def test_a_call_with_default_options_passes_its_arguments_without_packing(name):
    """The public function's call of the kernel with master, stochastic_rounding and
    skip_if_nonfinite at their defaults is a plain call (a vectorcall with keyword names), not
    CALL_FUNCTION_EX, which builds a tuple and a dict for every call: CPython takes
    that for calls of more than 30 stack slots, and adam_, nadam_ and schedulefree_adamw_
    pass more with every option."""
    function = getattr(fusedopt, DECLARATIONS[name].function_name)
    calls = [i.opname for i in dis.get_instructions(function) if i.opname.startswith("CALL")]
    assert calls[0] != "CALL_FUNCTION_EX", calls


def test_declared_ranges_match_the_binding():
    """At each finite end of each declared range, the kernel refuses a value just outside (with
    the declared label) and takes the end itself exactly when the range is closed there."""
    for d in DECLARATIONS.values():
        required = {x.name: 0.1 for x in d.arguments if x.required and x.kind == "real"}
        for h in d.arguments:
            if h.kind != "real":
                continue
            ends = [(h.low, h.low_open, -1e-9)]
            if math.isfinite(h.high):
                ends.append((h.high, h.high_open, 1e-9))
            for end, is_open, outward in ends:
                with pytest.raises(ValueError, match=f"^Invalid {h.label}: "):
                    d.check({**required, h.name: end + outward})
                if is_open:
                    with pytest.raises(ValueError, match=f"^Invalid {h.label}: "):
                        d.check({**required, h.name: end})
                else:
                    d.check({**required, h.name: end})


@pytest.mark.parametrize("cls", CLASSES, ids=lambda c: c.__name__)
def test_class_defaults_equal_the_functional_ones(cls):
    """Where a class's argument is a hyperparameter of its kernel (``betas`` is
    ``beta1``/``beta2``), its default is the declared one, unless the declaration has none
    (``lr`` of ``sgd_``) or the class lists it in ``own_defaults`` with torch's reason."""
    declaration = DECLARATIONS[cls.kernel]
    declared = {h.name: h.default for h in declaration.arguments if not h.required}
    defaults = {
        p.name: p.default
        for p in inspect.signature(cls).parameters.values()
        if p.default is not p.empty
    }
    if "betas" in defaults:
        defaults["beta1"], defaults["beta2"] = defaults.pop("betas")
    compared = 0
    for name, default in defaults.items():
        if name in declared and name not in getattr(cls, "own_defaults", ()):
            assert default == declared[name], (
                f"{cls.__name__}({name}={default!r}) vs "
                f"{declaration.function_name}: {declared[name]!r}"
            )
            compared += 1
    assert compared
    if cls is optim.SGD:  # with momentum, SGD runs momentum_: its defaults must agree too
        momentum = {h.name: h.default for h in DECLARATIONS["momentum"].arguments}
        for name in ("dampening", "nesterov", "weight_decay", "maximize"):
            assert defaults[name] == momentum[name], name


def readme_rows():
    rows = {}
    for line in README.read_text().splitlines():
        match = re.match(r"\| `(\w+)_\((.*?)\)`", line)
        if match:
            rows[match.group(1)] = match.group(2)
    return rows


@pytest.mark.parametrize("name", NAMES)
def test_readme_row_agrees_with_the_declaration(name):
    """The README's table of update rules has a row per function, and every default it shows
    is the declared one."""
    rows = readme_rows()
    assert name in rows, f"README.md has no row for {name}_"
    declared = {h.name: h.default for h in DECLARATIONS[name].arguments}
    arrays = {a.name for a in DECLARATIONS[name].arrays}
    items = [item.strip() for item in rows[name].split(",")]
    positional = []
    for item in items:
        if item in ("*", "...") or "=" in item:
            break
        positional.append(item)
    if items[0] != "...":  # a variant's row may abbreviate its arrays
        assert positional == [a.name for a in DECLARATIONS[name].arrays if not a.optional]
    for key, value in re.findall(r"(\w+)=([^,]+)", rows[name]):
        if key in arrays:
            continue
        assert key in declared, f"README {name}_ row: unknown argument {key}"
        written = {"True": True, "False": False, "None": None}.get(value.strip())
        if written is None and value.strip() != "None":
            written = float(value)
        assert written == declared[key], f"README {name}_ row: {key}={value}"


@pytest.mark.parametrize(
    ("function", "old", "new", "hyper"),
    [
        ("momentum_", "buf", "momentum_buffer", dict(lr=0.1, momentum=0.9)),
        ("rmsprop_", "momentum_buf", "momentum_buffer", dict(momentum=0.9)),
    ],
)
def test_old_buffer_keywords_still_work_with_a_warning(function, old, new, hyper):
    rng = np.random.default_rng(0)
    param, grad = rng.standard_normal(10), rng.standard_normal(10)
    state = {"square_avg": np.zeros(10)} if function == "rmsprop_" else {}
    expected = [param.copy(), grad, {k: v.copy() for k, v in state.items()}, np.zeros(10)]
    fn = getattr(fusedopt, function)
    with pytest.warns(DeprecationWarning, match=f"the keyword {old} is deprecated; use {new}"):
        fn(param, grad, *state.values(), **{old: (buffer := np.zeros(10))}, **hyper)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        fn(expected[0], grad, *expected[2].values(), **{new: expected[3]}, **hyper)
    assert_same_bits(param, expected[0])
    assert_same_bits(buffer, expected[3])


def test_readme_storage_table_is_the_kernels_rows():
    """The README's table of dtypes (param, grad, state) lists exactly the kernels' rows."""
    from fusedopt import _core

    lines = README.read_text().splitlines()
    start = next(i for i, line in enumerate(lines) if line.strip() == "| param | grad | state |")
    listed = set()
    for line in lines[start + 2 :]:
        if not line.strip().startswith("|"):
            break
        cells = [cell.strip() for cell in line.strip().strip("|").split("|")]
        param, grad, state = (
            [w.strip("`") for w in cell.replace(",", " or").split(" or ")] for cell in cells
        )
        param = [p.split(" ")[0] for p in param]
        listed |= {(p, g, s) for p in param for g in grad for s in state}
    assert listed == set(_core.STORAGE_ROWS)
