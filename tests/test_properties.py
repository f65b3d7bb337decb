"""Property-based tests (hypothesis): random valid calls equal the reference bit for bit;
random invalid calls raise and change nothing."""

from __future__ import annotations

import inspect

import numpy as np
import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from support import assert_identical, call, copy_arrays, invalid_values

from fusedopt.registry import OPTIMIZERS

SETTINGS = settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])

# Valid values of a hyperparameter, from its declared range; a few narrower by name, where the
# whole range would mostly test overflow.
NARROWER = {
    "lr": st.floats(0, 1),
    "eps": st.floats(1e-12, 1e-2),
    "beta2": st.floats(0, 0.9999),
    "momentum": st.floats(0, 0.99),
}


def valid_values(h):
    if h.kind == "flag":
        return st.booleans()
    if h.name in NARROWER:
        return NARROWER[h.name]
    high = min(h.high, 1.0)
    return st.floats(
        h.low, high, exclude_min=h.low_open, exclude_max=h.high_open and high == h.high
    )


SHAPES = st.lists(st.integers(0, 9), min_size=0, max_size=3).map(tuple) | st.sampled_from(
    [(2047,), (2049,), (3, 700)]
)


@st.composite
def valid_calls(draw):
    spec = OPTIMIZERS[draw(st.sampled_from(sorted(OPTIMIZERS)))]
    hyper = {
        h.name: draw(valid_values(h))
        for h in spec.declaration.arguments
        if h.kind in ("real", "flag")
    }
    hyper["skip_if_nonfinite"] = draw(st.booleans())
    try:  # a rule across hyperparameters (Nesterov's) may refuse the draw
        spec.declaration.check({k: v for k, v in hyper.items() if k != "skip_if_nonfinite"})
    except ValueError:
        assume(False)
    step = draw(st.integers(1, 10**9))
    dtype = draw(st.sampled_from([np.float32, np.float64]))
    order = draw(st.sampled_from("CF"))
    shapes = draw(st.lists(SHAPES, min_size=1, max_size=4))
    as_list = draw(st.booleans()) or len(shapes) > 1
    seed = draw(st.integers(0, 2**32 - 1))
    rng = np.random.default_rng(seed)

    def tensor(shape):
        arrays = {
            role: np.asarray(rng.standard_normal(shape), dtype, order=order)
            for role in ("param", "grad")
        }
        for buffer in spec.buffers(hyper):  # non-negative: valid for every formula's state
            arrays[buffer] = np.asarray(np.abs(rng.standard_normal(shape)), dtype, order=order)
        return arrays

    tensors = [tensor(s) for s in shapes]
    if as_list:
        arrays = {role: [t[role] for t in tensors] for role in tensors[0]}
    else:
        arrays = tensors[0]
    return spec, hyper, arrays, step


@SETTINGS
@given(valid_calls())
def test_random_valid_calls_match_reference(case):
    spec, hyper, fused, step = case
    expected = copy_arrays(fused)
    with np.errstate(all="ignore"):  # e.g. centered RMSprop: sqrt of a negative variance
        applied = call(spec.fused, spec, fused, hyper, step)
        assert call(spec.reference, spec, expected, hyper, step) is applied
    assert_identical(fused, expected, f"{spec.name} {hyper} step {step}")


# Ways to break a valid call; each must raise TypeError or ValueError.
def _bad_dtype(a, rng):
    return a.astype(rng.choice([np.int64, np.complex128, bool, np.longdouble]))


def _strided(a, rng):
    # a strided view; arrays of 0 or 1 elements have none, so they become a Python list
    return np.repeat(a.reshape(-1), 2)[::2].reshape(a.shape) if a.size > 1 else a.tolist()


def _bad_shape(a, rng):
    return np.zeros(a.size + 1, a.dtype)


def _read_only(a, rng):
    a = a.copy()
    a.flags.writeable = False
    return a


ARRAY_BREAKERS = [_bad_dtype, _strided, _bad_shape, _read_only]
# Values every real hyperparameter refuses, from its declared range.
BAD_VALUES = {
    h.name: invalid_values(h)
    for spec in OPTIMIZERS.values()
    for h in spec.declaration.arguments
    if h.kind == "real"
}


@SETTINGS
@given(valid_calls(), st.data())
def test_random_invalid_calls_raise_and_change_nothing(case, data):
    spec, hyper, arrays, step = case
    rng = np.random.default_rng(data.draw(st.integers(0, 2**32 - 1)))
    names = set(inspect.signature(spec.fused).parameters)
    broken_hyper = dict(hyper)
    choices = [("hyper", n) for n in BAD_VALUES if n in names] + [
        ("array", role) for role in arrays if role != "grad"
    ]
    breaks = data.draw(st.lists(st.sampled_from(choices), min_size=1, max_size=3, unique=True))
    for kind, name in breaks:
        if kind == "hyper":
            broken_hyper[name] = data.draw(st.sampled_from(BAD_VALUES[name]))
        else:
            breaker = data.draw(st.sampled_from(ARRAY_BREAKERS))
            value = arrays[name]
            if isinstance(value, list):
                i = data.draw(st.integers(0, len(value) - 1))
                value[i] = breaker(value[i], rng)
            else:
                arrays[name] = breaker(value, rng)
    before = copy_arrays(arrays)
    try:
        call(spec.fused, spec, arrays, broken_hyper, step)
    except (TypeError, ValueError):
        pass
    else:
        pytest.fail(f"accepted: {breaks} on {spec.name}")
    assert_identical(arrays, before, "arrays changed by a rejected call")
