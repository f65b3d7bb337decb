"""Bad input raises TypeError or ValueError naming the argument, before any array is touched.

Every case builds valid arguments for an optimizer with all its optional buffers on, breaks one
thing, and checks the exception and that every array (the bad one too) is bit-identical to a
copy taken before the call.
"""

from __future__ import annotations

import ml_dtypes
import numpy as np
import pytest
from support import (
    accepted_dtypes,
    all_options,
    assert_identical,
    call,
    copy_arrays,
    invalid_values,
    make_arrays,
)

from fusedopt.registry import OPTIMIZERS


def valid(spec, shape=(4, 6), dtype=np.float32, rng_seed=0):
    hyper = {**spec.cases[0], **all_options(spec)}
    return make_arrays(spec, hyper, shape, dtype, np.random.default_rng(rng_seed)), hyper


def assert_rejected(spec, arrays, hyper, error, match, step=1):
    before = copy_arrays(arrays)
    with pytest.raises(error, match=match):
        call(spec.fused, spec, arrays, hyper, step)
    assert_identical(arrays, before, "arrays changed by a rejected call")


def read_only(a):
    a = a.copy()
    a.flags.writeable = False
    return a


def byteswapped(a):
    return a.astype(a.dtype.newbyteorder(">" if a.dtype.byteorder != ">" else "<"))


# (id, how to break one array, expected exception): applied to every role of every optimizer.
BAD_ARRAYS = [
    ("float16", lambda a: a.astype(np.float16), TypeError),
    ("bfloat16", lambda a: a.astype(ml_dtypes.bfloat16), TypeError),
    ("float128", lambda a: a.astype(np.longdouble), TypeError),
    ("int32", lambda a: a.astype(np.int32), TypeError),
    ("complex64", lambda a: a.astype(np.complex64), TypeError),
    ("bool", lambda a: a.astype(bool), TypeError),
    ("object", lambda a: a.astype(object), TypeError),
    ("other float dtype", lambda a: a.astype(np.float64), TypeError),
    ("byte-swapped", byteswapped, TypeError),
    ("wrong shape", lambda a: np.zeros((a.shape[1], a.shape[0]), a.dtype), ValueError),
    ("flattened", lambda a: a.reshape(-1).copy(), ValueError),
    ("strided view", lambda a: np.zeros((a.shape[0], 2 * a.shape[1]), a.dtype)[:, ::2], ValueError),
    ("F order", lambda a: np.asfortranarray(a), ValueError),
    ("nested list", lambda a: a.tolist(), TypeError),
    ("scalar", lambda a: 1.0, TypeError),
]


def roles(spec):
    return ("param", "grad") + spec.buffers(all_options(spec))


ROLE_CASES = [(name, role) for name, spec in OPTIMIZERS.items() for role in roles(spec)]


@pytest.mark.parametrize("kind, breaker, error", BAD_ARRAYS, ids=[b[0] for b in BAD_ARRAYS])
@pytest.mark.parametrize("name, role", ROLE_CASES)
def test_bad_array(name, role, kind, breaker, error):
    spec = OPTIMIZERS[name]
    arrays, hyper = valid(spec)
    original = arrays[role]
    arrays[role] = breaker(original)
    new = arrays[role]
    if kind in ("float16", "bfloat16") and new.dtype.isnative and accepted_dtypes(spec, arrays):
        # another storage row: a bfloat16 or float16 param with float32 grad and state, or a
        # single bfloat16 buffer of a float32 param
        call(spec.fused, spec, arrays, hyper)
        return
    # param is what the others are checked against: a param that is a valid array of another
    # dtype, shape or layout is reported as the others not being "like param".
    assert_rejected(spec, arrays, hyper, error, "param" if role == "param" else f"^{role}")


@pytest.mark.parametrize("name, role", ROLE_CASES)
def test_read_only(name, role):
    spec = OPTIMIZERS[name]
    arrays, hyper = valid(spec)
    arrays[role] = read_only(arrays[role])
    if role == "grad":  # only read: a read-only grad is fine
        call(spec.fused, spec, arrays, hyper)
    else:
        assert_rejected(spec, arrays, hyper, ValueError, f"^{role}: array is read-only")


@pytest.mark.parametrize("name, role", ROLE_CASES)
def test_missing_array(name, role):
    spec = OPTIMIZERS[name]
    arrays, hyper = valid(spec)
    arrays[role] = None
    if role in spec.optional_state:  # a buffer that its option needs
        switch = spec.optional_state[role]
        assert_rejected(
            spec,
            arrays,
            hyper,
            ValueError,
            f"^{switch}={hyper[switch]} needs the {role} buffer, got None$",
        )
    else:
        assert_rejected(spec, arrays, hyper, TypeError, f"^{role}: expected")


@pytest.mark.parametrize("name", OPTIMIZERS)
def test_bad_lists(name):
    spec = OPTIMIZERS[name]
    hyper = {**spec.cases[0], **all_options(spec)}
    arrays = make_arrays(spec, hyper, [(3,), (5, 2), (4,)], np.float64, np.random.default_rng(0))
    for role in roles(spec):
        # A param list of another length, or a single param array, makes the others wrong.
        relative = "like param" if role == "param" else None
        broken = dict(arrays, **{role: arrays[role][:-1]})
        assert_rejected(spec, broken, hyper, ValueError, relative or f"^{role}: expected 3 arrays")
        broken = dict(arrays, **{role: arrays[role][:1] + [[1.0, 2.0]] + arrays[role][2:]})
        assert_rejected(spec, broken, hyper, TypeError, rf"^{role}\[1\]: expected a numpy")
        broken = dict(arrays, **{role: arrays[role][0]})
        assert_rejected(spec, broken, hyper, TypeError, relative or f"^{role}")
        if role != "param":
            swapped = [arrays[role][0], arrays[role][2], arrays[role][1]]
            broken = dict(arrays, **{role: swapped})
            assert_rejected(spec, broken, hyper, ValueError, rf"^{role}\[1\]: expected shape")
    # One call takes one dtype: tensors of float32 and float64 are two calls.
    mixed = copy_arrays(arrays)
    for role in roles(spec):
        mixed[role][2] = mixed[role][2].astype(np.float32)
    assert_rejected(
        spec,
        mixed,
        hyper,
        TypeError,
        r"^param\[2\]: expected dtype float64 like param\[0\], got float32 "
        r"\(one call takes one dtype\)",
    )
    # A single array where a list is expected, and the other way round.
    single = {role: value[0] for role, value in arrays.items()}
    single["grad"] = [single["grad"]]
    assert_rejected(spec, single, hyper, TypeError, "^grad: expected a numpy.ndarray")
    assert_rejected(spec, dict(arrays, param=set()), hyper, TypeError, "^param: expected")


@pytest.mark.parametrize("name", OPTIMIZERS)
def test_overlapping_memory(name):
    spec = OPTIMIZERS[name]
    arrays, hyper = valid(spec, shape=(24,))
    written = [r for r in roles(spec) if r != "grad"]
    for role in roles(spec):
        if role == "param":
            continue
        # the same array twice
        assert_rejected(
            spec, dict(arrays, **{role: arrays["param"]}), hyper, ValueError, "share memory"
        )
    # views that share only part of their bytes
    backing = np.zeros(24 + 12, np.float32)
    for role in written:
        assert_rejected(
            spec,
            dict(arrays, grad=backing[:24], **{role: backing[12:]}),
            hyper,
            ValueError,
            "share memory",
        )
    # the same param twice in one list call
    pair = {role: [a, a if role == "param" else a.copy()] for role, a in arrays.items()}
    assert_rejected(
        spec,
        pair,
        hyper,
        ValueError,
        r"param\[0\] and param\[1\]|param\[1\] and "
        r"param\[0\]",
    )
    # two tensors reading one grad array is fine: nothing read is written
    shared = {role: [a, a.copy()] for role, a in arrays.items()}
    shared["grad"] = [arrays["grad"], arrays["grad"]]
    call(spec.fused, spec, shared, hyper)


# Values each real hyperparameter must refuse, derived from its declared range, with the
# start of the message; and the step's.
HYPER_CASES = [
    (name, h.name, value, f"Invalid {h.label}")
    for name, spec in OPTIMIZERS.items()
    for h in spec.declaration.arguments
    if h.kind == "real"
    for value in invalid_values(h)
] + [
    (name, "step", value, "Invalid step")
    for name, spec in OPTIMIZERS.items()
    if spec.takes_step
    for value in (0, -1)
]
BAD_HYPER_TYPES = {"lr": ["0.1", None, True, 1j], "step": [1.0, 2.5, "3", True, None]}


def test_every_real_hyperparameter_has_invalid_cases():
    named = {(name, param) for name, param, _, _ in HYPER_CASES}
    for name, spec in OPTIMIZERS.items():
        for h in spec.declaration.arguments:
            assert h.kind != "real" or (name, h.name) in named, (name, h.name)


@pytest.mark.parametrize("name, param, value, message", HYPER_CASES)
def test_bad_hyperparameter(name, param, value, message):
    spec = OPTIMIZERS[name]
    arrays, hyper = valid(spec)
    if param == "step":
        assert_rejected(spec, arrays, hyper, ValueError, message, step=value)
        return
    # hyperparameters are checked before any array: an invalid momentum is reported as such
    hyper = {**hyper, param: value}
    assert_rejected(spec, arrays, hyper, ValueError, f"^{message}")


@pytest.mark.parametrize("name", [n for n, s in OPTIMIZERS.items() if s.takes_step])
def test_bad_hyperparameter_types(name):
    spec = OPTIMIZERS[name]
    arrays, hyper = valid(spec)
    for value in BAD_HYPER_TYPES["lr"]:
        assert_rejected(spec, arrays, {**hyper, "lr": value}, TypeError, "^learning rate")
    for value in BAD_HYPER_TYPES["step"]:
        assert_rejected(spec, arrays, hyper, TypeError, "^step must be an integer", step=value)


def test_nesterov_needs_momentum_and_no_dampening():
    spec = OPTIMIZERS["momentum"]
    arrays, _ = valid(spec)
    for hyper in (
        dict(lr=0.1, momentum=0.0, nesterov=True),
        dict(lr=0.1, momentum=0.9, dampening=0.1, nesterov=True),
    ):
        assert_rejected(spec, arrays, hyper, ValueError, "Nesterov momentum requires")


def test_unused_buffers_are_left_alone():
    """A buffer passed while its option is off is neither required nor touched."""
    spec = OPTIMIZERS["adam"]
    arrays, _ = valid(spec)
    before = arrays["max_exp_avg_sq"].copy()
    call(spec.fused, spec, arrays, {"amsgrad": False})
    assert not np.array_equal(arrays["exp_avg"], 0)
    np.testing.assert_array_equal(arrays["max_exp_avg_sq"], before, strict=True)


@pytest.mark.parametrize("name", ["rmsprop", "adam"])
def test_buffers_of_an_option_that_is_off_are_not_checked(name):
    """With its option off, an optional buffer is ignored whatever it is, as if None."""
    spec = OPTIMIZERS[name]
    arrays, hyper = valid(spec)
    expected = copy_arrays(arrays)
    off = {
        role: {"amsgrad": False, "centered": False, "momentum": 0.0}[switch]
        for role, switch in spec.optional_state.items()
    }
    hyper = {**hyper, **{spec.optional_state[role]: value for role, value in off.items()}}
    for role in spec.optional_state:
        arrays[role] = "not an array"
        expected[role] = None
    call(spec.fused, spec, arrays, hyper)
    call(spec.reference, spec, expected, hyper)
    assert_identical(
        {k: v for k, v in arrays.items() if k not in spec.optional_state},
        {k: v for k, v in expected.items() if k not in spec.optional_state},
        "an ignored buffer changed the result",
    )


@pytest.mark.parametrize("name", OPTIMIZERS)
def test_numpy_scalars_and_ints_are_real_hyperparameters(name):
    """Hyperparameters as NumPy scalars or ints (through the slow path of the C++ parser) give
    the results of the same values as Python floats."""
    spec = OPTIMIZERS[name]
    arrays, hyper = valid(spec)
    converted = copy_arrays(arrays)
    as_numpy = {k: (np.float64(v) if isinstance(v, float) else v) for k, v in hyper.items()}
    as_numpy["lr"] = np.float32(0.25)
    hyper = {**hyper, "lr": 0.25}
    call(spec.fused, spec, arrays, hyper, step=3)
    call(spec.fused, spec, converted, as_numpy, step=np.int64(3))
    assert_identical(converted, arrays, "NumPy scalars changed the result")
    as_int = {**hyper, "lr": 1}
    call(spec.fused, spec, arrays, as_int, step=4)
    call(spec.fused, spec, converted, {**hyper, "lr": 1.0}, step=4)
    assert_identical(converted, arrays, "an int lr changed the result")


def test_keywords_that_are_not_interned_strings():
    """Keywords built at run time are not the interned strings the binding compares first."""
    spec = OPTIMIZERS["adam"]
    arrays, hyper = valid(spec)
    expected = copy_arrays(arrays)
    built = {"".join(list(k)): v for k, v in {**hyper, "lr": 0.01, "beta1": 0.8}.items()}
    call(spec.fused, spec, arrays, built, step=2)
    call(spec.reference, spec, expected, {**hyper, "lr": 0.01, "beta1": 0.8}, step=2)
    assert_identical(arrays, expected, "keywords built at run time were misread")


def test_the_binding_rejects_unknown_and_missing_hyperparameters():
    """The binding fills in the declared defaults; it rejects what its declaration lacks, a
    required hyperparameter left out, a fixed one (AdamW's decoupled decay) passed, and
    arrays given twice, as Python rejects such calls, before touching any array."""
    from fusedopt import _core

    p, g = np.zeros(3, np.float32), np.zeros(3, np.float32)
    before = p.copy()
    with pytest.raises(TypeError, match="^sgd_\\(\\) got an unexpected keyword argument 'lrr'$"):
        _core.sgd(p, g, lrr=0.1, lr=0.1)
    with pytest.raises(TypeError, match="^sgd_\\(\\) missing required keyword argument 'lr'$"):
        _core.sgd(p, g, maximize=False)
    with pytest.raises(TypeError, match="^sgd_\\(\\) got an unexpected keyword argument 'step'$"):
        _core.sgd(p, g, lr=0.1, step=1)
    with pytest.raises(TypeError, match="unexpected keyword argument 'decoupled_weight_decay'"):
        _core.adamw(p, g, p.copy(), p.copy(), step=1, decoupled_weight_decay=False)
    with pytest.raises(TypeError, match="^sgd_\\(\\) got multiple values for argument 'grad'$"):
        _core.sgd(p, g, grad=g, lr=0.1)
    with pytest.raises(TypeError, match="^sgd_\\(\\) takes at most 2 positional arguments"):
        _core.sgd(p, g, g, lr=0.1)
    with pytest.raises(TypeError, match="unexpected keyword argument 'skip_if_nonfinite'"):
        _core.scale([p, g], factor=2.0, skip_if_nonfinite=True)  # no grad to scan
    with pytest.raises(ValueError, match="^Invalid step: 9223372036854775808 \\(at most"):
        _core.adam(p, g, p.copy(), p.copy(), step=2**63, lr=0.1)
    np.testing.assert_array_equal(p, before, strict=True)


def test_classes_check_hyperparameters_with_the_functions_rules():
    from fusedopt import optim

    p = np.zeros(3)
    for cls, kwargs, message in [
        (optim.Adam, dict(betas=(0.9, 1.0)), "Invalid beta parameter at index 1"),
        (optim.SGD, dict(lr=0.1, momentum=0.0, nesterov=True), "Nesterov momentum requires"),
        (optim.Momentum, dict(beta=1.0), "Invalid beta value"),
        (optim.Adagrad, dict(initial_accumulator_value=-1.0), "Invalid initial_accumulator_value"),
        (optim.RMSprop, dict(alpha=1.5), "Invalid alpha value"),
        (optim.Lion, dict(weight_decay=-1), "Invalid weight_decay value"),
    ]:
        with pytest.raises(ValueError, match=f"^{message}"):
            cls([p], **kwargs)
    with pytest.raises(TypeError, match="^learning rate must be a real number, got str$"):
        optim.Adam([p], lr="0.1")
    with pytest.raises(ValueError, match="^AdamW always decouples weight decay"):
        optim.AdamW([{"params": [p], "decoupled_weight_decay": False}])
