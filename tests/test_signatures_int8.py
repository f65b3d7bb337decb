"""The functions' signatures and docstrings say which arrays may be int8 state.

A ``fusedopt.quantize.QuantizedState`` is accepted by the binding for every state buffer (the
arrays after param and grad) and for nothing else. These tests call each function to find out
which arguments take one, and check that exactly those are annotated and documented so.
"""

from __future__ import annotations

import inspect
import re
import typing

import numpy as np
import pytest
from support import all_options, make_arrays

import fusedopt
from fusedopt._declarations import DECLARATIONS
from fusedopt.quantize import QuantizedState
from fusedopt.registry import OPTIMIZERS

NAMES = sorted(DECLARATIONS)
SHAPE = (4, 8)


def mentions(annotation, target) -> bool:
    """Whether ``target`` appears in the annotation, at any depth of Union/Optional/Sequence."""
    if annotation is target:
        return True
    return any(mentions(arg, target) for arg in typing.get_args(annotation))


def call_arguments(name: str, quantized, listed: bool = False):
    """Keyword arguments for a call that uses every array of the declaration (support's
    arrays, every option on): the state buffers named in ``quantized`` as QuantizedState
    (signed unless never negative); a one-tensor list each when ``listed``."""
    spec = OPTIMIZERS[name]
    hyper = {**spec.cases[0], **all_options(spec)}
    shape = [SHAPE] if listed else SHAPE
    arrays = make_arrays(spec, hyper, shape, np.float32, np.random.default_rng(0))
    for a in spec.declaration.arrays:
        if a.name in quantized:
            state = QuantizedState.zeros(SHAPE, signed=not a.nonnegative)
            arrays[a.name] = [state] if listed else state
    return {**hyper, **arrays, **({"step": 1} if spec.takes_step else {})}


def accepts_quantized(name: str):
    """The array arguments (master included) that the function takes as a QuantizedState."""
    d = DECLARATIONS[name]
    function = getattr(fusedopt, d.function_name)
    states = [a.name for a in d.arrays[2:]]
    accepted = set()
    if states:
        for listed in (False, True):
            assert function(**call_arguments(name, states, listed), seed=1) is True
        accepted.update(states)
    for other in ("param", "grad"):
        kwargs = call_arguments(name, states)
        kwargs[other] = QuantizedState.zeros(SHAPE, signed=True)
        with pytest.raises(TypeError):
            function(**kwargs, seed=1)
    kwargs = call_arguments(name, states)
    kwargs["param"] = kwargs["param"].astype(np.float16)
    with pytest.raises(TypeError):
        function(**kwargs, master=QuantizedState.zeros(SHAPE, signed=True), seed=1)
    return accepted


@pytest.mark.parametrize("name", NAMES)
def test_annotations_say_which_arrays_take_a_quantized_state(name):
    d = DECLARATIONS[name]
    accepted = accepts_quantized(name)
    assert set(d.quantizable) == accepted
    signature = inspect.signature(getattr(fusedopt, d.function_name))
    for arg in [a.name for a in d.arrays] + ["master"]:
        annotation = signature.parameters[arg].annotation
        assert mentions(annotation, QuantizedState) == (arg in accepted), (
            f"{d.function_name}: {arg}'s annotation {annotation} vs the binding"
        )
        assert mentions(annotation, np.ndarray), arg
    assert signature == d.signature()


def args_entry(doc: str, arg: str) -> str:
    match = re.search(rf"^\s+{arg}: (.*)$", doc, re.M)
    assert match, arg
    return match.group(1)


@pytest.mark.parametrize("name", NAMES)
def test_docstrings_say_which_arrays_may_be_int8(name):
    """The Args entry of each quantizable state names QuantizedState and the code dtypes the
    binding takes (uint8 only for a state that is never negative); no other entry does."""
    d = DECLARATIONS[name]
    function = getattr(fusedopt, d.function_name)
    doc = function.__doc__
    for a in d.arrays:
        entry = args_entry(doc, a.name)
        assert ("QuantizedState" in entry) == (a.name in d.quantizable), (a.name, entry)
        if a.name not in d.quantizable:
            continue
        assert ("uint8" in entry) == a.nonnegative, entry
        # what the entry says about the codes is what the binding does
        kwargs = call_arguments(name, d.quantizable)
        kwargs[a.name] = QuantizedState.zeros(SHAPE, signed=False)
        if a.nonnegative:
            assert function(**kwargs, seed=1) is True
            kwargs[a.name] = QuantizedState.zeros(SHAPE, signed=True)
            assert function(**kwargs, seed=1) is True
        else:
            with pytest.raises(TypeError, match="uint8"):
                function(**kwargs, seed=1)
    assert "QuantizedState" not in args_entry(doc, "master")
    assert ("int8" in args_entry(doc, "seed")) == bool(d.quantizable)  # sgd_ has no state


def test_seed_draws_the_int8_codes_without_a_step():
    """What the seed entry says: without a step argument the int8 codes' random bits are a
    function of the seed, so the same seed rounds the same way and another seed differently."""
    rng = np.random.default_rng(0)
    grad = rng.standard_normal(1000).astype(np.float32)
    codes = []
    for seed in (1, 1, 2):
        buffer = QuantizedState.from_array(np.full(1000, 0.3, np.float32), signed=True)
        fusedopt.momentum_(np.ones(1000, np.float32), grad, buffer, lr=0.1, momentum=0.9, seed=seed)
        codes.append(buffer.codes)
    assert not DECLARATIONS["momentum"].takes_step
    np.testing.assert_array_equal(codes[0], codes[1])
    assert (codes[0] != codes[2]).any()
