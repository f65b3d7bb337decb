"""Bad input raises TypeError or ValueError naming the argument, before any array is touched.

Every case builds valid arguments for an optimizer with all its optional buffers on, breaks one
thing, and checks the exception and that every array (the bad one too) is bit-identical to a
copy taken before the call.
"""

from __future__ import annotations

import inspect
import re
import types
import typing
import weakref

import ml_dtypes
import numpy as np
import pytest
from support import (
    accepted_dtypes,
    all_options,
    assert_identical,
    assert_same_bits,
    call,
    copy_arrays,
    flat,
    invalid_values,
    make_arrays,
    misaligned,
)

from fusedopt import reference
from fusedopt.quantize import QuantizedState
from fusedopt.registry import OPTIMIZERS


def valid(spec, shape=(4, 6), dtype=np.float32, rng_seed=0):
    hyper = {**spec.cases[0], **all_options(spec)}
    return make_arrays(spec, hyper, shape, dtype, np.random.default_rng(rng_seed)), hyper


def call_fused(spec, arrays, hyper, step=1, **keywords):
    """The fused function on `arrays`, which may hold float32 masters under "master" (passed
    as master=), with `keywords` besides the hyperparameters."""
    masters = {"master": arrays["master"]} if "master" in arrays else {}
    others = {role: value for role, value in arrays.items() if role != "master"}
    return call(spec.fused, spec, others, {**hyper, **masters, **keywords}, step)


def assert_rejected(spec, arrays, hyper, error, match, step=1, context="", **keywords):
    """The call raises `error` matching `match` and changes no array, masters included;
    `context` says which case failed, for tests that loop over cases."""
    before = copy_arrays(arrays)
    try:
        with pytest.raises(error, match=match):
            call_fused(spec, arrays, hyper, step, **keywords)
    except (AssertionError, pytest.fail.Exception) as failure:
        raise AssertionError(f"{spec.name} {context}: {failure}") from None
    except Exception as other:  # not `error`
        raise AssertionError(f"{spec.name} {context}: {type(other).__name__}: {other}") from other
    assert_identical(arrays, before, f"arrays changed by a rejected call {context}")


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
    ("misaligned", misaligned, ValueError),
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
def test_strided_view_says_why(name, role):
    # a written array's copy would lose the update; a read one's would be a hidden copy
    spec = OPTIMIZERS[name]
    arrays, hyper = valid(spec)
    a = arrays[role]
    arrays[role] = np.zeros((a.shape[0], 2 * a.shape[1]), a.dtype)[:, ::2]
    why = "no hidden copies" if role == "grad" else "cannot be updated in place without a copy"
    assert_rejected(spec, arrays, hyper, ValueError, f"^{role}: .*strided view .*{why}")


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
    assert_same_bits(arrays["max_exp_avg_sq"], before)


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
    assert_same_bits(p, before)


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


# ---------------------------------------------------------------- master weights, int8 state

# Every function with a grad takes master=; every state buffer may be a QuantizedState.
GRAD_OPTIMIZERS = [
    name
    for name, spec in OPTIMIZERS.items()
    if [a.name for a in spec.declaration.arrays][1:2] == ["grad"]
]
QUANTIZED_ROLES = [(name, role) for name, spec in OPTIMIZERS.items() for role in roles(spec)[2:]]
STATEFUL = sorted({name for name, _ in QUANTIZED_ROLES})
LOW = {"bfloat16": ml_dtypes.bfloat16, "float16": np.float16}
SHAPE = (16, 36)  # 576 elements: three blocks of int8 state, the last one partial
LIST_SHAPES = [(5, 2), (5, 2), (300,)]  # tensors 0 and 1 alike; 2 has two blocks


def each(value, fn):
    return [fn(a) for a in value] if isinstance(value, list) else fn(value)


def filled(a, values, dtype=None):
    """An array in a's shape and memory layout (and dtype, unless given) holding `values`."""
    out = np.empty_like(a, dtype=dtype)
    out[...] = values
    return out


def unsigned(spec, role):
    """Whether `role` is never negative: its int8 form has uint8 codes."""
    return role in spec.declaration.nonnegative_state


def new_arguments(spec, master=None, quantized=False, shape=SHAPE, order="C", seed=0):
    """Valid arguments of `spec` with every optional buffer, float32 unless told: with `master`
    ("bfloat16" or "float16") a param of that dtype and its float32 masters under "master";
    with `quantized` every state a QuantizedState (uint8 codes where never negative).

    Poisoned, so that any write shows in a copy: the states are random, not zero, and a param
    with masters holds values of its own, not the masters rounded (which a write would give)."""
    rng = np.random.default_rng(seed)
    hyper = {**spec.cases[0], **all_options(spec)}
    arrays = make_arrays(spec, hyper, shape, np.float32, rng, order)

    def state(a, role):
        values = rng.standard_normal(a.shape)
        a = filled(a, np.abs(values) if unsigned(spec, role) else values)
        return QuantizedState.from_array(a, signed=not unsigned(spec, role)) if quantized else a

    for role in roles(spec)[2:]:
        arrays[role] = each(arrays[role], lambda a, role=role: state(a, role))
    if master is not None:
        arrays["master"] = arrays["param"]
        arrays["param"] = each(
            arrays["master"], lambda m: filled(m, rng.standard_normal(m.shape), LOW[master])
        )
    return arrays, hyper


def shares(first, second):
    """The overlap message, whichever of the two the binding names first (a quantized state
    by its codes or scales)."""
    a, b = (re.escape(name) + r"(?:\.codes|\.scales)?" for name in (first, second))
    return f"^({a} and {b}|{b} and {a}) share memory; an array that is updated in place"


def strided(a):
    """A view of `a`'s values that is neither C- nor F-contiguous (every other column)."""
    wide = np.zeros(a.shape[:-1] + (2 * a.shape[-1],), a.dtype)
    wide[..., ::2] = a
    return wide[..., ::2]


def unchecked(codes, scales):
    """A QuantizedState holding whatever it is given, as one whose attributes were rebound after
    it was made (the constructor checks them)."""
    state = QuantizedState.__new__(QuantizedState)
    state.codes, state.scales = codes, scales
    return state


def flipped(q):
    """`q` with codes of the other signedness (the same bytes)."""
    other = np.uint8 if q.codes.dtype == np.int8 else np.int8
    return QuantizedState(q.codes.view(other).copy(), q.scales.copy())


NEW_FORMS = {
    "bfloat16 masters": (dict(master="bfloat16"), {}),
    "bfloat16 masters, stochastic": (dict(master="bfloat16"), dict(stochastic_rounding=True)),
    "float16 masters": (dict(master="float16"), {}),
    "float16 masters, stochastic": (dict(master="float16"), dict(stochastic_rounding=True)),
    "int8 state": (dict(quantized=True), {}),
    "int8 state, float16 masters": (dict(quantized=True, master="float16"), {}),
    "int8 state, list": (dict(quantized=True, shape=LIST_SHAPES), {}),
}


@pytest.mark.parametrize("form", NEW_FORMS)
@pytest.mark.parametrize("name", GRAD_OPTIMIZERS)
def test_the_arguments_broken_below_are_valid(name, form):
    """What the tests below break is accepted unbroken, and a call changes every array the
    poisoned check compares but the grad: a write by a rejected call would show."""
    spec = OPTIMIZERS[name]
    build, keywords = NEW_FORMS[form]
    arrays, hyper = new_arguments(spec, **build)
    before = copy_arrays(arrays)
    assert call_fused(spec, arrays, hyper, **keywords) is True
    for role in arrays:
        if role != "grad":
            now, then = flat({role: arrays[role]}), flat({role: before[role]})
            assert any(a.tobytes() != b.tobytes() for (_, a), (_, b) in zip(now, then)), role


STEPLESS = [name for name in GRAD_OPTIMIZERS if not OPTIMIZERS[name].takes_step]


@pytest.mark.parametrize(
    "form",
    [
        "bfloat16 masters, stochastic",
        "float16 masters, stochastic",
        "int8 state",
        "int8 state, list",
    ],
)
@pytest.mark.parametrize("name", STEPLESS)
def test_a_kernel_without_a_step_needs_a_seed_to_draw_random_bits(name, form):
    """Without a step the random bits are a function of the seed alone: a default seed would
    draw the same bits every call, so a call that draws any refuses to run without one, as the
    reference does; what draws none runs without one."""
    spec = OPTIMIZERS[name]
    assert inspect.signature(spec.fused).parameters["seed"].default is None
    build, keywords = NEW_FORMS[form]
    arrays, hyper = new_arguments(spec, **build)
    if build.get("quantized") and not spec.buffers(hyper):  # SGD without momentum: no state
        assert call_fused(spec, arrays, hyper, seed=None, **keywords) is True
        return
    # the whole message, which the binding and fusedopt.reference each write
    match = f"^{spec.declaration.function_name}\\(\\): {re.escape(reference.SEED_NEEDED)}$"
    assert_rejected(spec, arrays, hyper, TypeError, match, seed=None, **keywords)
    masters = {"master": arrays["master"]} if "master" in arrays else {}
    others = {role: value for role, value in arrays.items() if role != "master"}
    with pytest.raises(TypeError, match=match):
        spec.call(spec.reference, others, {**hyper, **masters, **keywords, "seed": None})
    assert call_fused(spec, arrays, hyper, seed=12, **keywords) is True
    plain, hyper = new_arguments(spec)  # float32: stochastic rounding draws no bits
    assert call_fused(spec, plain, hyper, seed=None, stochastic_rounding=True) is True
    assert spec.call(spec.reference, plain, {**hyper, "seed": None}) is True


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("name", GRAD_OPTIMIZERS)
def test_masters_of_a_full_precision_param(name, dtype):
    spec = OPTIMIZERS[name]
    arrays, hyper = valid(spec, shape=SHAPE, dtype=np.dtype(dtype))
    arrays["master"] = np.ones(SHAPE, np.float32)
    message = (
        f"^master: float32 master weights are for a bfloat16 or float16 param, got a {dtype} param$"
    )
    assert_rejected(spec, arrays, hyper, TypeError, message)
    lists = {role: [value, value.copy()] for role, value in arrays.items()}
    assert_rejected(spec, lists, hyper, TypeError, message)


# (id, how to break the masters given them and the call's arrays, exception, message)
WRONG_DTYPE = "^master: expected dtype float32, got {}$"
NOT_AN_ARRAY = "^master: expected a numpy.ndarray like param, got {}$"
WRONG_SHAPE = r"^master: expected shape \(16, 36\) like param, got {}$"
BAD_MASTERS = [
    ("float64", lambda m, a: m.astype(np.float64), TypeError, WRONG_DTYPE.format("float64")),
    ("bfloat16", lambda m, a: m.astype(LOW["bfloat16"]), TypeError, WRONG_DTYPE.format("bfloat16")),
    ("float16", lambda m, a: m.astype(np.float16), TypeError, WRONG_DTYPE.format("float16")),
    ("the param", lambda m, a: a["param"], TypeError, WRONG_DTYPE.format("b?float16")),
    ("byte-swapped", lambda m, a: byteswapped(m), TypeError, WRONG_DTYPE.format(">f4")),
    ("wrong shape", lambda m, a: m.reshape(36, 16), ValueError, WRONG_SHAPE.format(r"\(36, 16\)")),
    ("flattened", lambda m, a: m.reshape(-1).copy(), ValueError, WRONG_SHAPE.format(r"\(576,\)")),
    ("0-d array", lambda m, a: np.array(1.0, np.float32), ValueError, WRONG_SHAPE.format(r"\(\)")),
    (
        "F order",
        lambda m, a: np.asfortranarray(m),
        ValueError,
        r"^master: expected the memory layout of param \(C-contiguous\), got F-contiguous$",
    ),
    (
        "strided view",
        lambda m, a: strided(m),
        ValueError,
        "^master: expected a C- or F-contiguous array, got a strided view",
    ),
    (
        "misaligned",
        lambda m, a: misaligned(m),
        ValueError,
        "^master: expected an array aligned to its element size, got a misaligned view",
    ),
    ("read-only", lambda m, a: read_only(m), ValueError, "^master: array is read-only$"),
    ("nested list", lambda m, a: m.tolist(), TypeError, NOT_AN_ARRAY.format("list")),
    ("list of one", lambda m, a: [m], TypeError, NOT_AN_ARRAY.format("list")),
    ("scalar", lambda m, a: 1.0, TypeError, NOT_AN_ARRAY.format("float")),
    ("numpy scalar", lambda m, a: np.float32(1.0), TypeError, NOT_AN_ARRAY.format("float32")),
    ("bool", lambda m, a: False, TypeError, NOT_AN_ARRAY.format("bool")),
    (
        "QuantizedState",
        lambda m, a: QuantizedState.from_array(m, signed=True),
        TypeError,
        NOT_AN_ARRAY.format("QuantizedState"),
    ),
    ("the grad", lambda m, a: a["grad"], ValueError, shares("master", "grad")),
]


@pytest.mark.parametrize("low", LOW)
@pytest.mark.parametrize("name", GRAD_OPTIMIZERS)
def test_bad_master(name, low):
    spec = OPTIMIZERS[name]
    for kind, breaker, error, match in BAD_MASTERS:  # a loop, not parameters: many fast cases
        arrays, hyper = new_arguments(spec, master=low)
        arrays["master"] = breaker(arrays["master"], arrays)
        assert_rejected(spec, arrays, hyper, error, match, context=f"{low} {kind}")


@pytest.mark.parametrize("name", GRAD_OPTIMIZERS)
def test_masters_follow_the_param_and_share_no_memory(name):
    spec = OPTIMIZERS[name]
    # an F-ordered param takes F-ordered masters
    arrays, hyper = new_arguments(spec, master="bfloat16", order="F")
    c_order = np.ascontiguousarray(arrays["master"])
    assert_rejected(
        spec,
        dict(arrays, master=c_order),
        hyper,
        ValueError,
        r"^master: expected the memory layout of param \(F-contiguous\), got C-contiguous$",
    )
    arrays, hyper = new_arguments(spec, master="bfloat16")
    # masters whose second half is the param's bytes
    size = arrays["master"].size
    backing = np.zeros(4 * size, np.uint8)
    master = backing.view(np.float32).reshape(SHAPE)
    param = backing[2 * size :].view(ml_dtypes.bfloat16).reshape(SHAPE)
    master[...], param[...] = arrays["master"], arrays["param"]
    assert_rejected(
        spec, dict(arrays, master=master, param=param), hyper, ValueError, shares("master", "param")
    )
    # masters that are a state, or share half its rows
    for role in roles(spec)[2:]:
        assert_rejected(
            spec, dict(arrays, master=arrays[role]), hyper, ValueError, shares("master", role)
        )
        rows = np.zeros((SHAPE[0] * 3 // 2, SHAPE[1]), np.float32)
        halves = {"master": rows[: SHAPE[0]], role: rows[SHAPE[0] // 2 :]}
        assert_rejected(spec, dict(arrays, **halves), hyper, ValueError, shares("master", role))


@pytest.mark.parametrize("name", GRAD_OPTIMIZERS)
def test_bad_master_lists(name):
    spec = OPTIMIZERS[name]
    arrays, hyper = new_arguments(spec, master="bfloat16", shape=LIST_SHAPES)
    m = arrays["master"]
    for bad, error, match in [
        (m[0], TypeError, "^master: expected a list of arrays like param, got ndarray$"),
        (set(), TypeError, "^master: expected a list of arrays like param, got set$"),
        (m[:2], ValueError, "^master: expected 3 arrays like param, got 2$"),
        (m + [m[0].copy()], ValueError, "^master: expected 3 arrays like param, got 4$"),
        ([], ValueError, "^master: expected 3 arrays like param, got 0$"),
        ([m[0], None, m[2]], TypeError, r"^master\[1\]: expected a numpy.ndarray, got NoneType$"),
        (
            [m[0], m[1].tolist(), m[2]],
            TypeError,
            r"^master\[1\]: expected a numpy.ndarray, got list$",
        ),
        (
            [m[0], m[2], m[1]],
            ValueError,
            r"^master\[1\]: expected shape \(5, 2\) like param, got \(300,\)$",
        ),
        (
            [m[0], m[1], m[2].astype(np.float64)],
            TypeError,
            r"^master\[2\]: expected dtype float32, got float64",
        ),
        ([m[0], m[1], read_only(m[2])], ValueError, r"^master\[2\]: array is read-only$"),
        ([m[0], m[0], m[2]], ValueError, shares("master[0]", "master[1]")),
        ([m[0], arrays["grad"][1], m[2]], ValueError, shares("master[1]", "grad[1]")),
    ]:
        assert_rejected(spec, dict(arrays, master=bad), hyper, error, match)
    # one param dtype per call: bfloat16 and float16 params are two calls
    mixed = copy_arrays(arrays)
    mixed["param"][2] = mixed["param"][2].astype(np.float16)
    assert_rejected(
        spec,
        mixed,
        hyper,
        TypeError,
        r"^param\[2\]: expected dtype bfloat16 like param\[0\], got float16",
    )
    # a single tensor with a list of masters; no tensors with one master
    single = {role: value[0] for role, value in arrays.items()}
    assert_rejected(
        spec,
        dict(single, master=[single["master"]]),
        hyper,
        TypeError,
        "^master: expected a numpy.ndarray like param, got list$",
    )
    empty = {role: [] for role in arrays}
    assert_rejected(
        spec,
        dict(empty, master=[m[0]]),
        hyper,
        ValueError,
        "^master: expected 0 arrays like param, got 1$",
    )


# (id, how to break a QuantizedState, exception, message: {role}, {codes} the dtypes its codes
# may have, {dtype} those it has)
BAD_STATES = [
    (
        "codes float32",
        lambda q: unchecked(q.codes.astype(np.float32), q.scales),
        TypeError,
        r"^{role}\.codes: expected dtype {codes}, got float32$",
    ),
    (
        "codes int16",
        lambda q: unchecked(q.codes.astype(np.int16), q.scales),
        TypeError,
        r"^{role}\.codes: expected dtype {codes}, got int16$",
    ),
    (
        "codes wrong shape",
        lambda q: unchecked(q.codes.reshape(36, 16), q.scales),
        ValueError,
        r"^{role}\.codes: expected shape \(16, 36\) like param, got \(36, 16\)$",
    ),
    (
        "codes flattened",
        lambda q: unchecked(q.codes.reshape(-1), q.scales),
        ValueError,
        r"^{role}\.codes: expected shape \(16, 36\) like param, got \(576,\)$",
    ),
    (
        "another tensor's state",
        lambda q: QuantizedState.zeros((4, 6), signed=q.signed),
        ValueError,
        r"^{role}\.codes: expected shape \(16, 36\) like param, got \(4, 6\)$",
    ),
    (
        "codes F order",
        lambda q: unchecked(np.asfortranarray(q.codes), q.scales),
        ValueError,
        r"^{role}\.codes: expected the memory layout of param \(C-contiguous\), got F-contiguous$",
    ),
    (
        "codes strided view",
        lambda q: unchecked(strided(q.codes), q.scales),
        ValueError,
        r"^{role}\.codes: expected a C- or F-contiguous array, got a strided view",
    ),
    (
        "codes read-only",
        lambda q: unchecked(read_only(q.codes), q.scales),
        ValueError,
        r"^{role}\.codes: array is read-only$",
    ),
    (
        "codes not an array",
        lambda q: unchecked(q.codes.tolist(), q.scales),
        TypeError,
        r"^{role}\.codes: expected a numpy\.ndarray, got list$",
    ),
    (
        "scales too short",
        lambda q: unchecked(q.codes, q.scales[:2].copy()),
        ValueError,
        r"^{role}\.scales: expected float32 of shape \(3,\) \(one per 256 elements\), "
        r"got shape \(2,\)$",
    ),
    (
        "scales too long",
        lambda q: unchecked(q.codes, np.append(q.scales, q.scales[:1])),
        ValueError,
        r"^{role}\.scales: expected float32 of shape \(3,\) .*, got shape \(4,\)$",
    ),
    (
        "scales empty",
        lambda q: unchecked(q.codes, q.scales[:0].copy()),
        ValueError,
        r"^{role}\.scales: expected float32 of shape \(3,\) .*, got shape \(0,\)$",
    ),
    (
        "scales float64",
        lambda q: unchecked(q.codes, q.scales.astype(np.float64)),
        TypeError,
        r"^{role}\.scales: expected float32 of shape \(3,\) .*, got float64$",
    ),
    (
        "scales bfloat16",
        lambda q: unchecked(q.codes, q.scales.astype(ml_dtypes.bfloat16)),
        TypeError,
        r"^{role}\.scales: expected float32 of shape \(3,\) .*, got bfloat16$",
    ),
    (
        "scales byte-swapped",
        lambda q: unchecked(q.codes, byteswapped(q.scales)),
        TypeError,
        r"^{role}\.scales: expected float32 of shape \(3,\) .*, got >f4$",
    ),
    (
        "scales 2-D",
        lambda q: unchecked(q.codes, q.scales[None, :].copy()),
        ValueError,
        r"^{role}\.scales: expected float32 of shape \(3,\) .*, got shape \(1, 3\)$",
    ),
    (
        "scales misaligned",
        lambda q: unchecked(q.codes, misaligned(q.scales)),
        ValueError,
        r"^{role}\.scales: expected an array aligned to its element size, got a misaligned view",
    ),
    (
        "scales strided view",
        lambda q: unchecked(q.codes, strided(q.scales)),
        ValueError,
        r"^{role}\.scales: expected a contiguous array, got a strided view",
    ),
    (
        "scales read-only",
        lambda q: unchecked(q.codes, read_only(q.scales)),
        ValueError,
        r"^{role}\.scales: array is read-only$",
    ),
    (
        "scales not an array",
        lambda q: unchecked(q.codes, q.scales.tolist()),
        TypeError,
        r"^{role}\.scales: expected a numpy\.ndarray, got list$",
    ),
    (
        "codes without scales",
        lambda q: q.codes,
        TypeError,
        # int8 codes make the call's row that of int8 states; uint8 ones alone do not
        r"^{role}: expected (a fusedopt\.quantize\.QuantizedState \(8-bit codes and float32 "
        r"scales\) like the call's other states, got an array of dtype|dtype float32, bfloat16 "
        r"or int8 \(a fusedopt\.quantize\.QuantizedState\) for a float32 param, got) {dtype}$",
    ),
    (
        "duck-typed",
        lambda q: types.SimpleNamespace(codes=q.codes, scales=q.scales),
        TypeError,
        r"^{role}: expected a numpy\.ndarray like param, got SimpleNamespace$",
    ),
]


@pytest.mark.parametrize("name, role", QUANTIZED_ROLES)
def test_bad_quantized_state(name, role):
    spec = OPTIMIZERS[name]
    codes = "int8 or uint8" if unsigned(spec, role) else "int8"
    for kind, breaker, error, match in BAD_STATES:  # a loop, not parameters: many fast cases
        arrays, hyper = new_arguments(spec, quantized=True)
        match = match.format(role=re.escape(role), codes=codes, dtype=arrays[role].codes.dtype)
        arrays[role] = breaker(arrays[role])
        assert_rejected(spec, arrays, hyper, error, match, context=f"{role} {kind}")


@pytest.mark.parametrize(
    "name, role", [(n, r) for n, r in QUANTIZED_ROLES if not unsigned(OPTIMIZERS[n], r)]
)
def test_unsigned_codes_for_a_signed_state(name, role):
    spec = OPTIMIZERS[name]
    arrays, hyper = new_arguments(spec, quantized=True)
    r = re.escape(role)
    assert_rejected(
        spec,
        dict(arrays, **{role: flipped(arrays[role])}),
        hyper,
        TypeError,
        rf"^{r}\.codes: uint8 \(unsigned\) codes are only for a state that is never negative; "
        rf"{r} takes int8 codes$",
    )


@pytest.mark.parametrize("name, role", QUANTIZED_ROLES)
def test_bad_quantized_lists(name, role):
    spec = OPTIMIZERS[name]
    arrays, hyper = new_arguments(spec, quantized=True, shape=LIST_SHAPES)
    q = arrays[role]
    r = re.escape(role)
    signedness = (
        rf"^{r}\[1\]\.codes: uint8 \(unsigned\) codes are only for a state that is never "
        rf"negative; {r} takes int8 codes$"
        if not unsigned(spec, role)
        else rf"^{r}\[1\]\.codes: expected dtype uint8 like {r}\[0\]\.codes \(one call takes "
        r"one dtype\)$"
    )
    cases = [
        ([q[0], flipped(q[1]), q[2]], TypeError, signedness),
        (q[0], TypeError, rf"^{r}: expected a list of arrays like param, got QuantizedState$"),
        (q[:2], ValueError, rf"^{r}: expected 3 arrays like param, got 2$"),
        (  # labelled "exp_avg.codes[1]": see test_codes_of_a_list_call_are_labelled_by_tensor
            [q[0], q[2], q[1]],
            ValueError,
            rf"^{r}\[1\]\.codes: expected shape \(5, 2\) like param, got \(300,\)$",
        ),
        (
            [q[0], q[1], unchecked(q[2].codes, q[2].scales[:1].copy())],
            ValueError,
            rf"^{r}\[2\]\.scales: expected float32 of shape \(2,\) \(one per 256 "
            r"elements\), got shape \(1,\)$",
        ),
        ([q[0], q[0], q[2]], ValueError, shares(f"{role}[0]", f"{role}[1]")),
        (
            [q[0], unchecked(q[1].codes, q[0].scales), q[2]],
            ValueError,
            shares(f"{role}[0]", f"{role}[1]"),
        ),
        (  # quantized or not is one choice for all tensors of a call
            [q[0], q[1].dequantize(), q[2]],
            TypeError,
            rf"^{r}\[1\]: expected a fusedopt\.quantize\.QuantizedState \(8-bit codes and "
            r"float32 scales\) like the call's other states, got an array of dtype float32$",
        ),
    ]
    if unsigned(spec, role):  # signed codes first: then the others must be signed too
        cases.append(
            (
                [flipped(q[0]), q[1], q[2]],
                TypeError,
                rf"^{r}\[1\]\.codes: expected dtype int8 like {r}\[0\]\.codes \(one call takes "
                r"one dtype\)$",
            )
        )
    for bad, error, match in cases:
        assert_rejected(spec, dict(arrays, **{role: bad}), hyper, error, match)
    # one quantized state among float32 ones (the message: see test_a_refused_state_says_why)
    floats, hyper = new_arguments(spec, shape=LIST_SHAPES)
    floats[role][1] = QuantizedState.from_array(floats[role][1], signed=not unsigned(spec, role))
    assert_rejected(spec, floats, hyper, TypeError, rf"^{r}\[1\]: expected ")


@pytest.mark.parametrize(
    "name, role", [(n, r) for n, r in QUANTIZED_ROLES if len(roles(OPTIMIZERS[n])) > 3]
)
def test_quantized_and_float32_states_in_one_call(name, role):
    """All the states of a call are quantized or none is (across tensors: see
    test_bad_quantized_lists)."""
    spec = OPTIMIZERS[name]
    states = roles(spec)[2:]
    arrays, hyper = new_arguments(spec, quantized=True)
    # the message names a state, not always this one: see test_a_refused_state_says_why
    named = "|".join(states)
    arrays[role] = arrays[role].dequantize()
    assert_rejected(spec, arrays, hyper, TypeError, f"^({named}): expected ")


@pytest.mark.parametrize("name", STATEFUL)
def test_quantized_state_of_a_float64_param(name):
    """No row has int8 state for a float64 param."""
    spec = OPTIMIZERS[name]
    arrays, hyper = new_arguments(spec, quantized=True)
    arrays["param"] = arrays["param"].astype(np.float64)
    arrays["grad"] = arrays["grad"].astype(np.float64)
    first = re.escape(roles(spec)[2])
    # the message does not say why: see test_a_refused_state_says_why
    assert_rejected(spec, arrays, hyper, TypeError, f"^{first}: expected ")
    plain = {role: a.codes if isinstance(a, QuantizedState) else a for role, a in arrays.items()}
    assert_rejected(
        spec, plain, hyper, TypeError, f"^{first}: expected dtype float64 like param, got u?int8$"
    )


@pytest.mark.parametrize("name", GRAD_OPTIMIZERS)
def test_quantized_state_as_param_or_grad(name):
    spec = OPTIMIZERS[name]
    arrays, hyper = new_arguments(spec, quantized=True)
    grad = QuantizedState.from_array(arrays["grad"], signed=True)
    param = QuantizedState.from_array(arrays["param"], signed=True)
    assert_rejected(
        spec,
        dict(arrays, grad=grad),
        hyper,
        TypeError,
        "^grad: expected a numpy.ndarray like param, got QuantizedState$",
    )
    assert_rejected(
        spec,
        dict(arrays, param=param),
        hyper,
        TypeError,
        "^param: expected a numpy.ndarray or a list of them, got QuantizedState$",
    )
    lists = {role: [value] for role, value in dict(arrays, grad=grad).items()}
    assert_rejected(
        spec,
        lists,
        hyper,
        TypeError,
        r"^grad\[0\]: expected dtype float32, bfloat16 or float16 for a float32 param, got a "
        r"fusedopt\.quantize\.QuantizedState$",
    )


@pytest.mark.parametrize("name, role", QUANTIZED_ROLES)
def test_quantized_state_overlapping_memory(name, role):
    """Codes and scales are written: neither may share a byte with any array of the call."""
    spec = OPTIMIZERS[name]
    arrays, hyper = new_arguments(spec, quantized=True, master="bfloat16")
    q = arrays[role]

    def codes_over(a):  # codes on the first bytes of `a`
        return a.reshape(-1).view(np.uint8)[: q.codes.size].view(q.codes.dtype).reshape(SHAPE)

    def scales_over(a):
        return a.reshape(-1).view(np.uint8)[: q.scales.nbytes].view(np.float32)

    for other in ["param", "grad", "master"] + [s for s in roles(spec)[2:] if s != role]:
        targets = arrays[other]
        if isinstance(targets, QuantizedState):
            targets = [targets.codes, targets.scales]
        else:
            targets = [targets]
        for target in targets:
            broken = [unchecked(q.codes, scales_over(target))]
            if target.nbytes >= q.codes.nbytes:
                broken.append(unchecked(codes_over(target), q.scales))
            for bad in broken:
                assert_rejected(
                    spec, dict(arrays, **{role: bad}), hyper, ValueError, shares(role, other)
                )
    # its own codes and scales, four bytes in common; the message names the state twice: see
    # test_codes_overlapping_their_scales_are_named
    backing = np.zeros(q.codes.nbytes + q.scales.nbytes - 4, np.uint8)
    codes = backing[: q.codes.nbytes].view(q.codes.dtype).reshape(SHAPE)
    scales = backing[q.codes.nbytes - 4 :].view(np.float32)
    r = re.escape(role)
    assert_rejected(
        spec,
        dict(arrays, **{role: unchecked(codes, scales)}),
        hyper,
        ValueError,
        rf"^{r}(\.codes|\.scales)? and {r}(\.codes|\.scales)? share memory",
    )


# -------------------------------------------------------- messages and lifetimes of quantized state


def test_codes_overlapping_their_scales_are_named():
    spec = OPTIMIZERS["adam"]
    arrays, hyper = new_arguments(spec, quantized=True)
    backing = np.zeros(SHAPE[0] * SHAPE[1] + 8, np.uint8)
    arrays["exp_avg"] = unchecked(
        backing[:-8].view(np.int8).reshape(SHAPE), backing[-12:].view(np.float32)
    )
    assert_rejected(
        spec,
        arrays,
        hyper,
        ValueError,
        r"^exp_avg\.(codes|scales) and exp_avg\.(codes|scales) share memory",
    )


def test_codes_of_a_list_call_are_labelled_by_tensor():
    spec = OPTIMIZERS["adam"]
    arrays, hyper = new_arguments(spec, quantized=True, shape=LIST_SHAPES)
    q = arrays["exp_avg"][1]
    arrays["exp_avg"][1] = unchecked(read_only(q.codes), q.scales)
    assert_rejected(spec, arrays, hyper, ValueError, r"^exp_avg\[1\]\.codes: array is read-only$")


def test_strided_scales_are_called_strided():
    spec = OPTIMIZERS["adam"]
    arrays, hyper = new_arguments(spec, quantized=True)
    q = arrays["exp_avg"]
    arrays["exp_avg"] = unchecked(q.codes, strided(q.scales))
    assert_rejected(spec, arrays, hyper, ValueError, r"^exp_avg\.scales: .*strided")


@pytest.mark.parametrize("case", ["float32 state beside", "float64 param"])
def test_a_refused_state_says_why(case):
    spec = OPTIMIZERS["adam"]
    arrays, hyper = new_arguments(spec, quantized=True)
    if case == "float64 param":  # as a float64 param with bfloat16 state is reported
        arrays["param"] = arrays["param"].astype(np.float64)
        arrays["grad"] = arrays["grad"].astype(np.float64)
        match = "^exp_avg: expected dtype float64 like param, got "
    else:  # the row most of the arrays have decides: int8 states, beside amsgrad's max
        arrays["exp_avg_sq"] = arrays["exp_avg_sq"].dequantize()
        match = (
            r"^exp_avg_sq: expected a fusedopt\.quantize\.QuantizedState \(8-bit codes and "
            r"float32 scales\) like the call's other states, got an array of dtype float32$"
        )
    assert_rejected(spec, arrays, hyper, TypeError, match)


def test_states_of_two_low_precision_kinds_are_named_against_each_other():
    """A bfloat16 state beside an int8 one: no row has both, and the message compares one with
    the other, not with the float32 row that neither is in."""
    spec = OPTIMIZERS["adam"]
    arrays, hyper = new_arguments(spec, quantized=True)
    hyper = {k: v for k, v in hyper.items() if k != "amsgrad"}
    arrays.pop("max_exp_avg_sq", None)
    arrays["exp_avg"] = arrays["exp_avg"].dequantize().astype(ml_dtypes.bfloat16)
    match = r"^exp_avg_sq: expected dtype bfloat16 like exp_avg, got a fusedopt\.quantize\."
    assert_rejected(spec, arrays, hyper, TypeError, match)


def test_a_quantized_state_without_codes():
    spec = OPTIMIZERS["adam"]
    arrays, hyper = new_arguments(spec, quantized=True)
    arrays["exp_avg"] = QuantizedState.__new__(QuantizedState)
    with pytest.raises((TypeError, ValueError), match="^exp_avg"):
        call_fused(spec, arrays, hyper)


class WatchedState(QuantizedState):
    """A QuantizedState whose codes and scales are new views at each access. At each access,
    `alive` records whether every view handed out before is still alive: one that the binding
    holds is; one it dropped dies at once."""

    __slots__ = ("_codes", "_scales")
    refs: typing.ClassVar[list] = []
    alive: typing.ClassVar[list] = []

    def _view(self, array):
        WatchedState.alive.append(all(ref() is not None for ref in WatchedState.refs))
        view = array[...]
        WatchedState.refs.append(weakref.ref(view))
        return view

    @property
    def codes(self):
        return self._view(self._codes)

    @codes.setter
    def codes(self, value):
        self._codes = value

    @property
    def scales(self):
        return self._view(self._scales)

    @scales.setter
    def scales(self, value):
        self._scales = value


def test_the_codes_and_scales_written_are_held_for_the_call():
    spec = OPTIMIZERS["adam"]
    arrays, hyper = new_arguments(spec, quantized=True)
    for role in roles(spec)[2:]:
        arrays[role] = WatchedState(arrays[role].codes, arrays[role].scales)
    WatchedState.refs.clear()
    WatchedState.alive.clear()
    assert call_fused(spec, arrays, hyper) is True
    assert len(WatchedState.alive) == 6 and all(WatchedState.alive), WatchedState.alive


@pytest.mark.parametrize(
    "bad", [np.nan, np.inf, -np.inf, 0.0, -1.0, 3.0, 2.0**-127, 2.0**-149], ids=repr
)
@pytest.mark.parametrize("name", ["adam", "lion", "momentum"])
def test_int8_scales_that_the_encoder_never_writes(name, bad):
    """A scale that is not a power of two in [2**-126, 2**127] (NaN, inf, 0, negative, a
    subnormal, 3) would decode to NaN or to values the codes cannot hold: refused, by its place,
    before any array is written; in a list call too, where the bad scale is the last one."""
    spec = OPTIMIZERS[name]
    for shape, where in ((SHAPE, ""), (LIST_SHAPES, "[2]")):
        arrays, hyper = new_arguments(spec, quantized=True, shape=shape)
        role = roles(spec)[-1] if name != "momentum" else "momentum_buffer"
        state = arrays[role] if where == "" else arrays[role][2]
        state.scales[-1] = np.float32(bad)
        match = (
            f"^{re.escape(role + where)}.scales: scales must be powers of two in "
            rf"\[2\*\*-126, 2\*\*127\], as the encoder writes them; got .* "
            rf"at {state.scales.size - 1}$"
        )
        assert_rejected(spec, arrays, hyper, ValueError, match, context=f"shape {shape}")
        before = copy_arrays(arrays)
        with pytest.raises(ValueError, match="scales must be powers of two"):
            spec.call(spec.reference, arrays, {**hyper, "seed": 1})
        assert_identical(arrays, before, "arrays changed by the reference's rejected call")


@pytest.mark.parametrize("name", ["adam", "momentum"])
def test_int8_scales_at_the_ends_of_the_range_are_taken(name):
    """2**-126 (an all-zero block's) and 2**127 are scales the encoder writes: accepted."""
    spec = OPTIMIZERS[name]
    arrays, hyper = new_arguments(spec, quantized=True)
    role = roles(spec)[-1]
    arrays[role].scales[0] = np.float32(2.0**-126)
    arrays[role].scales[-1] = np.float32(2.0**127)
    assert call_fused(spec, arrays, hyper, seed=1) is True


@pytest.mark.parametrize("keyword", ["stochastic_rounding", "skip_if_nonfinite", "amsgrad"])
@pytest.mark.parametrize("value", ["False", "", 0, 1, None, np.float32(1.0)], ids=repr)
def test_flags_are_bools_not_truthy_objects(keyword, value):
    """A flag is a bool or NumPy's bool: the string "False" is true, so any other object is a
    TypeError naming the flag, and nothing is written."""
    spec = OPTIMIZERS["adam"]
    arrays, hyper = new_arguments(spec, master="bfloat16")
    hyper = {k: v for k, v in hyper.items() if k != keyword}
    match = f"^{keyword} must be a bool, got {type(value).__name__}$"
    assert_rejected(spec, arrays, hyper, TypeError, match, **{keyword: value})
    for good in (np.bool_(True), False):
        arrays, _ = new_arguments(spec, master="bfloat16")
        assert call_fused(spec, arrays, hyper, **{keyword: good}) is True
