"""Every fused kernel against fusedopt.reference, for every registry entry and case.

Tolerance: none. Each kernel performs the reference's IEEE operations in the same order (the
comment atop each csrc/kernels/*.hpp), with scalars prepared in double exactly as the reference
prepares them, no FMA contraction (-ffp-contract=off) and correctly rounded sqrt
(EIGEN_FAST_MATH=0). So the results agree bit for bit in float32 and float64, and any
difference means the formula, its order of operations or its rounding changed.
"""

from __future__ import annotations

import io
import os
import subprocess
import sys

import ml_dtypes
import numpy as np
import pytest
from support import (
    all_options,
    assert_identical,
    assert_same_bits,
    call,
    copy_arrays,
    make_arrays,
    new_grad,
)

import fusedopt
from fusedopt import _core, quantize, reference
from fusedopt.quantize import QuantizedState
from fusedopt.registry import OPTIMIZERS

CHUNK, PARALLEL_MIN = _core.CHUNK, _core.get_parallel_min()

# Shapes around SIMD widths (4, 8, 16 lanes), the chunk size and the parallel threshold; 2-D in
# both layouts; and lists of mixed sizes, empty tensors included, for multi-tensor calls.
SHAPES = {
    "0-d": (),
    "0": (0,),
    "1": (1,),
    "7": (7,),
    "15": (15,),
    "16": (16,),
    "17": (17,),
    "1000": (1000,),
    "chunk-1": (CHUNK - 1,),
    "chunk+1": (CHUNK + 1,),
    "parallel_min+5": (PARALLEL_MIN + 5,),
    "2^20+3": (2**20 + 3,),
    "33x65 C": ((33, 65), "C"),
    "33x65 F": ((33, 65), "F"),
    "list": [(0,), (1,), (17,), (CHUNK + 3,), (5, 7), (PARALLEL_MIN,), (0,), (999,)],
    "empty list": [],
}
# Past a core's L2 (several MiB in every row, on one thread: the tests that take it run there):
# the loops of most low-precision rows then prefetch ahead (csrc/level.cpp, prefetching_row),
# across chunks and up to each tensor's end, which lies at no chunk or block boundary. Only for
# the tests that name it: each call moves megabytes.
PAST_L2 = [(2**19 + 5,), (3 * CHUNK + 7,), (0,), (2**18 + 31,)]
ALL_SHAPES = {**SHAPES, "past L2": PAST_L2}
DTYPES = [np.float32, np.float64]
LOW = ("bfloat16", "float16")
DTYPE_OF = {
    "float32": np.float32,
    "float64": np.float64,
    "bfloat16": ml_dtypes.bfloat16,
    "float16": np.float16,
}
STEPS = 3

CASES = [
    pytest.param(spec, hyper, id=f"{name}-{i}")
    for name, spec in OPTIMIZERS.items()
    for i, hyper in enumerate(spec.cases)
]


def shape_and_order(value):
    if isinstance(value, tuple) and len(value) == 2 and isinstance(value[1], str):
        return value
    return value, "C"


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: np.dtype(d).name)
@pytest.mark.parametrize("shape_id", SHAPES)
@pytest.mark.parametrize(("spec", "hyper"), CASES)
def test_matches_reference(spec, hyper, shape_id, dtype):
    check_matches_reference(spec, hyper, shape_id, dtype, range(1, STEPS + 1))


def check_matches_reference(spec, hyper, shape_id, dtype, steps):
    rng = np.random.default_rng([len(shape_id), STEPS])
    shape, order = shape_and_order(SHAPES[shape_id])
    fused = make_arrays(spec, hyper, shape, dtype, rng, order)
    expected = copy_arrays(fused)
    for step in steps:
        new_grad(fused, rng)
        expected["grad"] = copy_arrays({"g": fused["grad"]})["g"]
        assert call(spec.fused, spec, fused, hyper, step) is True
        assert call(spec.reference, spec, expected, hyper, step) is True
        assert_identical(fused, expected, f"{spec.name} {hyper} step {step}")


def as_numpy_scalars(value, kind):
    """A case's hyperparameter value as NumPy scalars of ``kind`` (floats; ints as int64,
    bools as numpy.bool_), tuples element by element."""
    if isinstance(value, tuple):
        return tuple(as_numpy_scalars(v, kind) for v in value)
    if isinstance(value, bool):
        return np.bool_(value)
    if isinstance(value, int):
        return np.int64(value)
    if isinstance(value, float):
        return kind(value)
    return value


@pytest.mark.parametrize("kind", [np.float32, np.float64, np.longdouble])
@pytest.mark.parametrize("row", [("float32",) * 3, ("bfloat16", "bfloat16", "int8")], ids="-".join)
@pytest.mark.parametrize(("spec", "hyper"), CASES)
def test_numpy_scalar_hyperparameters_match_reference(spec, hyper, row, kind):
    """Hyperparameters and the step given as NumPy scalars: the kernels read them as the
    Python numbers they equal, and so does the reference (NumPy's promotion would otherwise
    run its formula in float64 for an np.float64 lr, or in float32 for np.float32 betas)."""
    rng = np.random.default_rng(5)
    given = {k: as_numpy_scalars(v, kind) for k, v in hyper.items()}
    fused = as_row(make_arrays(spec, hyper, (37,), np.float32, rng, "C"), row)
    expected = copy_arrays(fused)
    for step in range(1, 3):
        new_grad(fused, rng)
        fused["grad"] = fused["grad"].astype(DTYPE_OF[row[1]])
        expected["grad"] = fused["grad"].copy()
        options = {"seed": np.uint64(2**64 - 3)}
        if row[0] == "bfloat16" and takes_flag(spec.name, "stochastic_rounding"):
            options["stochastic_rounding"] = np.bool_(True)
        assert call(spec.fused, spec, fused, {**given, **options}, np.int64(step)) is True
        assert call(spec.reference, spec, expected, {**given, **options}, np.int64(step))
        assert_identical(fused, expected, f"{spec.name} {hyper} step {step}")


def test_every_registry_entry_has_cases_covering_its_options():
    for spec in OPTIMIZERS.values():
        assert spec.cases, spec.name
        for switch in spec.optional_state.values():
            assert any(case.get(switch) for case in spec.cases), (spec.name, switch)


@pytest.fixture
def restore_threads():
    yield
    fusedopt.set_num_threads(None)


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: np.dtype(d).name)
@pytest.mark.parametrize("name", OPTIMIZERS)
def test_thread_count_does_not_change_results(name, dtype, restore_threads):
    """1, 2, 3 threads and the default split the work at different places; every split must
    give the same bits. Sizes are above the parallel threshold so the threads really run."""
    spec = OPTIMIZERS[name]
    hyper = {**spec.cases[-1], **all_options(spec)}
    shapes = [(3 * PARALLEL_MIN + 11,), (CHUNK * 5 + 1,), (7,), (PARALLEL_MIN // 2, 3)]
    results = {}
    for threads in (1, 2, 3, None):
        fusedopt.set_num_threads(threads)
        rng = np.random.default_rng(1)
        arrays = make_arrays(spec, hyper, shapes, dtype, rng)
        for step in range(1, STEPS + 1):
            new_grad(arrays, rng)
            call(spec.fused, spec, arrays, hyper, step)
        results[threads] = arrays
    for threads, arrays in results.items():
        assert_identical(arrays, results[1], f"{threads} threads vs 1")


def test_set_num_threads(restore_threads):
    default = fusedopt.get_num_threads()
    assert default >= 1
    fusedopt.set_num_threads(3)
    # a serial build (no OpenMP) takes the count and runs on one thread
    assert fusedopt.get_num_threads() == (3 if _core.OPENMP else 1)
    fusedopt.set_num_threads(None)
    assert fusedopt.get_num_threads() == default
    fusedopt.set_num_threads(np.int64(2))  # a NumPy integer is one (it was refused)
    assert fusedopt.get_num_threads() == (2 if _core.OPENMP else 1)
    for bad, got in [(0, "0"), (-1, "-1"), (2**31, str(2**31)), (10**30, str(10**30))]:
        with pytest.raises(
            ValueError, match=f"^threads must be between 1 and 2147483647 or None, got {got}$"
        ):
            fusedopt.set_num_threads(bad)
    for bad, got in [(1.5, "float"), (True, "bool"), ("2", "str"), (np.bool_(True), "bool")]:
        with pytest.raises(
            TypeError, match=f"^threads must be a positive integer or None, got {got}$"
        ):
            fusedopt.set_num_threads(bad)
    assert fusedopt.get_num_threads() == (2 if _core.OPENMP else 1)  # unchanged by each


@pytest.fixture
def busy_rule():
    """The late-worker rule's settings and state as conftest.py leaves them (off), after."""
    settings = _core.get_late_start_ns(), _core.get_busy_base_ns(), _core.get_busy_parallel_min()
    yield
    _core.set_late_start_ns(settings[0])
    _core.set_busy_base_ns(settings[1])
    _core.set_busy_parallel_min(settings[2])
    _core.set_busy(0, 0)


def test_adaptive_threads_turn_the_rule_on_and_off(restore_threads, busy_rule):
    """set_adaptive_threads(False) ends what the rule had marked and makes no region late;
    True brings back the threshold the module was built with; anything but a bool is a
    TypeError that changes nothing."""
    fusedopt.set_num_threads(2)
    built = fusedopt._LATE_START_NS
    assert 0 < built < 2**62
    fusedopt.set_adaptive_threads(True)
    assert fusedopt.get_adaptive_threads() and _core.get_late_start_ns() == built
    _core.set_busy(10**9, 3)
    if _core.OPENMP:
        assert _core.threads_for_call(2 * PARALLEL_MIN) == 1
    fusedopt.set_adaptive_threads(False)
    assert not fusedopt.get_adaptive_threads() and _core.get_late_start_ns() >= 2**62
    assert _core.busy_for_ns() == 0 and _core.late_probes() == 0
    if _core.OPENMP:
        assert _core.threads_for_call(2 * PARALLEL_MIN) == 2
    for bad in (0, 1, None, "off"):
        with pytest.raises(TypeError, match="^enabled must be a bool, got"):
            fusedopt.set_adaptive_threads(bad)
    assert not fusedopt.get_adaptive_threads()
    out = io.StringIO()
    fusedopt.show_config(out)
    assert "adaptive: off" in out.getvalue()


@pytest.mark.skipif(not _core.OPENMP, reason="a serial build opens no parallel region")
def test_a_late_worker_sends_smaller_calls_to_the_calling_thread(restore_threads, busy_rule):
    """A probe (a region opened while the cores are not marked busy) whose last thread started
    later than the threshold marks them busy for the base time, doubled for each late probe in
    a row before it, up to 2**8 times. Meanwhile a call of p threads runs on one where (p - 1)
    / p of it is below busy_parallel_min, with the same bits; a late region of a larger call
    starts the time again, not doubled; one in time changes nothing; a probe in time ends the
    doubling. With a threshold of 0 every region is late (its last thread started after it
    opened), and with a base of 1 s no time ends while the test checks it."""
    fusedopt.set_num_threads(2)
    base = 10**9
    _core.set_busy_base_ns(base)
    small = 2 * PARALLEL_MIN
    _core.set_busy_parallel_min(4 * PARALLEL_MIN)
    large = 8 * PARALLEL_MIN  # (p - 1) / p of it is busy_parallel_min
    rng = np.random.default_rng(0)
    param, grad = rng.standard_normal((2, small), dtype=np.float32)
    m, v = np.zeros_like(param), np.zeros_like(param)
    expected = [a.copy() for a in (param, m, v)]
    fusedopt.adam_(*expected[:1], grad, *expected[1:], step=1)  # two threads, none late
    assert _core.busy_for_ns() == 0 and _core.threads_for_call(small) == 2

    _core.set_late_start_ns(0)
    fusedopt.adam_(param, grad, m, v, step=1)
    for got, want in zip((param, m, v), expected):
        np.testing.assert_array_equal(got, want)
    assert 0 < _core.busy_for_ns() <= base and _core.late_probes() == 1
    assert _core.threads_for_call(small) == 1
    assert _core.threads_for_call(large - 2) == 1
    assert _core.threads_for_call(large) == 2
    assert _core.threads_for_call(PARALLEL_MIN - 1) == 1

    # half the time left: a late region would start it again, a whole base
    _core.set_busy(base // 2, 1)
    for _ in range(3):  # on the calling thread: no region
        fusedopt.adam_(param, grad, m, v, step=2)
    assert 0 < _core.busy_for_ns() <= base // 2
    big, big_grad = np.zeros((2, large), np.float32)
    fusedopt.sgd_(big, big_grad, lr=0.1)  # late while busy: the time again, not doubled
    assert base // 2 < _core.busy_for_ns() <= base and _core.late_probes() == 1
    _core.set_late_start_ns(2**62)
    fusedopt.sgd_(big, big_grad, lr=0.1)  # in time while busy: nothing changes
    assert 0 < _core.busy_for_ns() <= base and _core.late_probes() == 1

    _core.set_late_start_ns(0)
    for late_probes in range(1, 12):
        _core.set_busy(0, late_probes)  # the time is over: the next region is a probe
        fusedopt.sgd_(big, big_grad, lr=0.1)
        window = base << min(late_probes, 8)
        assert window // 2 < _core.busy_for_ns() <= window, late_probes
        assert _core.late_probes() == late_probes + 1

    _core.set_busy(0, 5)
    _core.set_late_start_ns(2**62)
    fusedopt.adam_(param, grad, m, v, step=3)  # a probe in time
    assert _core.busy_for_ns() == 0 and _core.late_probes() == 0
    assert _core.threads_for_call(small) == 2


@pytest.mark.skipif(not _core.OPENMP, reason="a serial build opens no parallel region")
def test_the_matrix_code_reports_late_workers(restore_threads, busy_rule):
    """Adafactor's and Muon's regions (in the level library) report how late their last thread
    started, as the element-wise kernels' do. While the cores are busy, Adafactor runs a call
    below busy_parallel_min on the calling thread (no region, so no late one starts the time
    again); Muon keeps its threads (its cost is not in proportion to its elements)."""
    fusedopt.set_num_threads(2)
    shape = (256, 2 * PARALLEL_MIN // 256)
    rng = np.random.default_rng(0)
    param, grad = rng.standard_normal((2, *shape), dtype=np.float32)
    row_var, col_var = np.zeros((shape[0], 1), np.float32), np.zeros((1, shape[1]), np.float32)
    _core.set_busy_base_ns(10**9)
    _core.set_late_start_ns(0)  # every region is late
    fusedopt.adafactor_(param, grad, row_var, col_var, None, step=1)
    assert _core.busy_for_ns() > 0 and _core.late_probes() == 1
    _core.set_busy(10**9 // 2, 1)  # half the time left: a late region would start it again
    fusedopt.adafactor_(param, grad, row_var, col_var, None, step=2)
    assert 0 < _core.busy_for_ns() <= 10**9 // 2
    fusedopt.muon_(param, grad, np.zeros_like(param))
    assert 10**9 // 2 < _core.busy_for_ns() <= 10**9 and _core.late_probes() == 1


LATE_WORKER = """
import os, numpy as np, fusedopt
from fusedopt import _core
os.sched_setaffinity(0, {0})  # the threads OpenMP makes share the one CPU
fusedopt.set_num_threads(2)
param, grad = np.ones((2, 1 << 23), np.float32)
fusedopt.set_adaptive_threads(False)
fusedopt.sgd_(param, grad, lr=0.1)  # makes OpenMP's worker, with the rule off
# every thread but this one idle-scheduled (else at the lowest priority): the worker, woken,
# neither preempts this thread nor runs before it while it computes its half
main = str(os.getpid())
for task in os.listdir("/proc/self/task"):
    if task != main:
        try:
            os.sched_setscheduler(int(task), os.SCHED_IDLE, os.sched_param(0))
        except (AttributeError, OSError):
            os.setpriority(os.PRIO_PROCESS, int(task), 19)
fusedopt.set_adaptive_threads(True)
fusedopt.sgd_(param, grad, lr=0.1)
print(_core.busy_for_ns() > 0, _core.late_probes())
"""


@pytest.mark.skipif(
    not _core.OPENMP
    or not hasattr(os, "sched_setaffinity")
    or not os.path.isdir("/proc/self/task"),
    reason="OpenMP; Linux's affinity and tasks",
)
def test_a_worker_without_a_core_is_late():
    """Two threads on one CPU, the worker idle-scheduled: it starts only when the calling
    thread gives up the CPU, after its half of 8Mi elements, milliseconds later. The default
    threshold finds it late. (At equal priority the woken worker may take the CPU at once, and
    then it is not late. On a machine busy with other processes the scheduler may still run it
    early, while the calling thread waits for the CPU: so up to five fresh processes, and a
    build that does not measure fails all five. Three were not enough on a loaded machine.)"""
    outcomes = []
    for _ in range(5):
        result = subprocess.run(
            [sys.executable, "-c", LATE_WORKER], capture_output=True, text=True, check=True
        )
        busy, late_probes = result.stdout.split()
        outcomes.append((busy, int(late_probes)))
        if busy == "True" and int(late_probes) >= 1:
            break
    assert outcomes[-1][0] == "True" and outcomes[-1][1] >= 1, outcomes


# ---------------------------------------------------------------- low-precision storage

LOW_ROWS = [row for row in _core.STORAGE_ROWS if len(set(row)) > 1 or row[0] in LOW]
LOW_SHAPES = ["0", "17", "chunk+1", "33x65 F", "list"]


# States that are never negative: their int8 form has uint8 codes, the others int8 codes.
UNSIGNED = {name for spec in OPTIMIZERS.values() for name in spec.declaration.nonnegative_state}


def as_row(arrays, row, stored_by=None):
    """`arrays` (float32, one tensor or lists; a state may be quantized) stored as the row says:
    param, grad, state; "int8" states quantized, with uint8 codes where never negative: to
    nearest, or with ``stored_by=(spec, step)`` as the kernels store them at that step
    (stochastically, with the bits of seed 0, the step, the tensor, the element and the state's
    array slot)."""
    param, grad, state = (DTYPE_OF.get(name) for name in row)

    def cast(role, a, tensor):
        if isinstance(a, QuantizedState):
            if state is None and stored_by is None:  # stays as it is
                return a
            a = a.dequantize()
        if role not in ("param", "grad", "master") and state is None:  # int8
            x, signed = a.astype(np.float32), role not in UNSIGNED
            if stored_by is None:
                return QuantizedState.from_array(x, signed=signed)
            spec, step = stored_by
            slot = [a.name for a in spec.declaration.arrays].index(role) - 1
            key = reference._tensor_key(0, step if spec.takes_step else 0, tensor)
            bits = reference._slot_bits(key, x.size, slot)
            return QuantizedState(*quantize.encode(x, signed, bits))
        dtype = (
            np.float32
            if role == "master"
            else param
            if role == "param"
            else grad
            if role == "grad"
            else state
        )
        with np.errstate(over="ignore"):  # past float16's range: inf, as the kernels store
            return a.astype(dtype, order="K")

    return {
        role: [cast(role, a, i) for i, a in enumerate(value)]
        if isinstance(value, list)
        else cast(role, value, 0)
        for role, value in arrays.items()
    }


@pytest.mark.parametrize("shape_id", LOW_SHAPES)
@pytest.mark.parametrize("row", LOW_ROWS, ids="-".join)
@pytest.mark.parametrize(("spec", "hyper"), CASES)
def test_low_precision_is_the_float32_formula_rounded_once(spec, hyper, row, shape_id):
    """Every array is loaded and converted to float32, the float32 formula runs as it does for
    float32 arrays, and each result is rounded once, to nearest even, when it is stored. So the
    fused result is bit-identical to the float32 reference run on the upcast arrays and then
    rounded; and fusedopt.reference's own low-precision path agrees."""
    check_rounded_once(spec, hyper, row, shape_id, range(1, STEPS + 1))


def check_rounded_once(spec, hyper, row, shape_id, steps):
    rng = np.random.default_rng([len(shape_id), sum(map(len, row))])
    shape, order = shape_and_order(ALL_SHAPES[shape_id])
    fused = as_row(make_arrays(spec, hyper, shape, np.float32, rng, order), row)
    reference = copy_arrays(fused)
    for step in steps:
        new_grad(fused, rng)
        fused = as_row(fused, row)  # the new grad in the row's grad dtype
        reference["grad"] = copy_arrays({"g": fused["grad"]})["g"]
        upcast = as_row(copy_arrays(reference), ("float32",) * 3)
        expected = as_row(copy_arrays(upcast), ("float32",) * 3)
        call(spec.reference, spec, expected, hyper, step)
        expected = as_row(expected, row, stored_by=(spec, step))  # rounded once
        assert call(spec.fused, spec, fused, hyper, step) is True
        assert call(spec.reference, spec, reference, hyper, step) is True
        assert_identical(fused, expected, f"{spec.name} {hyper} {row} step {step}")
        assert_identical(reference, expected, f"reference {spec.name} {hyper} {row} {step}")


# Formulas whose branch or scalars change after the first steps, with steps on both sides:
# RAdam is rectified from t = 6 (beta2 = 0.999), and NAdam's product of momentum coefficients
# stops mattering below 2**-54, at t = 48 by default.
LATER_STEPS = {"radam": range(4, 9), "nadam": (47, 48, 49, 500)}


@pytest.mark.parametrize("shape_id", LOW_SHAPES)
@pytest.mark.parametrize("row", [("float32",) * 3, ("float64",) * 3, *LOW_ROWS], ids="-".join)
@pytest.mark.parametrize("name", LATER_STEPS)
def test_later_steps_match_reference_in_every_row(name, row, shape_id):
    spec = OPTIMIZERS[name]
    for hyper in spec.cases:
        if row[0] == row[1] == row[2] and row[0] not in LOW:
            check_matches_reference(spec, hyper, shape_id, DTYPE_OF[row[0]], LATER_STEPS[name])
        else:
            check_rounded_once(spec, hyper, row, shape_id, LATER_STEPS[name])


def test_nadam_shortcuts_keep_torchs_product():
    """fusedopt.reference._nadam_mu_product (and its C++ twin) stops multiplying below 2**-54
    and once mu_i is beta1: the terms 1 - prod and 1 - prod * mu_(t+1) are then exactly those
    of the plain running product torch keeps, or within rounding of it."""

    def plain(beta1, psi, step):
        product = 1.0
        for i in range(1, step + 1):
            product *= beta1 * (1 - 0.5 * 0.96 ** (i * psi))
        return product

    for beta1, psi in [(0.9, 4e-3), (0.45, 2e-3), (0.999, 4e-3), (0.0, 4e-3), (0.9, 0.0)]:
        for step in (1, 2, 30, 47, 48, 49, 300, 2000):
            mu_next = beta1 * (1 - 0.5 * 0.96 ** ((step + 1) * psi))
            short, full = reference._nadam_mu_product(beta1, psi, step), plain(beta1, psi, step)
            assert (1 - short, 1 - short * mu_next) == (1 - full, 1 - full * mu_next)
    for beta1, psi in [(0.99, 40.0), (0.999, 2.0)]:  # mu_i is beta1 from i = 23, 450
        for step in (22, 23, 24, 600, 3000):
            mu_next = beta1 * (1 - 0.5 * 0.96 ** ((step + 1) * psi))
            short, full = reference._nadam_mu_product(beta1, psi, step), plain(beta1, psi, step)
            assert 1 - short == pytest.approx(1 - full, rel=1e-13, abs=0)
            assert 1 - short * mu_next == pytest.approx(1 - full * mu_next, rel=1e-13, abs=0)


def test_nadam_mu_product_none_is_the_product_of_the_step():
    """mu_product=None (the default) is _nadam_mu_product of the step and this call's beta1,
    bit for bit, in the kernel and the reference; a given product is used as it is."""
    rng = np.random.default_rng(7)
    names = ("param", "grad", "exp_avg", "exp_avg_sq")
    base = {n: rng.standard_normal(97).astype(np.float32) for n in names}
    base["exp_avg_sq"] = np.abs(base["exp_avg_sq"])
    hyper = dict(step=5, beta1=0.8)
    derived = reference._nadam_mu_product(0.8, 4e-3, 5)
    results = {}
    for impl in (fusedopt, reference):
        for product in (None, derived, 0.25):
            arrays = copy_arrays(base)
            impl.nadam_(**arrays, mu_product=product, **hyper)
            results[impl.__name__, product] = arrays
    for impl in (fusedopt, reference):
        assert_identical(results[impl.__name__, None], results[impl.__name__, derived])
        assert_identical(results[impl.__name__, 0.25], results["fusedopt.reference", 0.25])
        changed = results[impl.__name__, 0.25]["param"]
        assert not np.array_equal(results[impl.__name__, None]["param"], changed)
    arrays = copy_arrays(base)
    with pytest.raises(TypeError, match="mu_product value must be a real number or None, got str"):
        fusedopt.nadam_(**arrays, mu_product="0.5", **hyper)
    for bad in (1.0, -0.1, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="Invalid mu_product value"):
            fusedopt.nadam_(**arrays, mu_product=bad, **hyper)
    assert_identical(arrays, base)


@pytest.mark.parametrize(
    "row", [("bfloat16", "bfloat16", "bfloat16"), ("float16", "float32", "float32")], ids="-".join
)
@pytest.mark.parametrize("name", OPTIMIZERS)
def test_low_precision_thread_count_does_not_change_results(name, row, restore_threads):
    spec = OPTIMIZERS[name]
    hyper = {**spec.cases[-1], **all_options(spec)}
    shapes = [(3 * PARALLEL_MIN + 11,), (CHUNK * 5 + 1,), (7,)]
    results = {}
    for threads in (1, 2, 3):
        fusedopt.set_num_threads(threads)
        rng = np.random.default_rng(1)
        arrays = as_row(make_arrays(spec, hyper, shapes, np.float32, rng), row)
        for step in range(1, STEPS + 1):
            new_grad(arrays, rng)
            arrays = as_row(arrays, row)
            call(spec.fused, spec, arrays, hyper, step)
        results[threads] = arrays
    for threads, arrays in results.items():
        assert_identical(arrays, results[1], f"{threads} threads vs 1")


@pytest.mark.parametrize(
    ("dtypes", "message"),
    [
        (
            ("float16", "float16", "float16"),
            r"^exp_avg: expected dtype float32, bfloat16 or int8 "
            r"\(a fusedopt.quantize.QuantizedState\) for a float16 param, got float16$",
        ),
        (
            ("float32", "float64", "float32"),
            "^grad: expected dtype float32, bfloat16 or float16 for a float32 param, got float64$",
        ),
        (
            ("bfloat16", "float64", "float32"),
            "^grad: expected dtype bfloat16 or float32 for a bfloat16 param, got float64$",
        ),
        (  # "float16" is in "bfloat16": the allowed dtypes are compared as dtypes, not text
            ("bfloat16", "bfloat16", "float16"),
            r"^exp_avg: expected dtype float32, bfloat16 or int8 "
            r"\(a fusedopt.quantize.QuantizedState\) for a bfloat16 param, got float16$",
        ),
        (
            ("float64", "float64", "bfloat16"),
            "^exp_avg: expected dtype float64 like param, got bfloat16$",
        ),
        (
            ("float32", "float32", "int8"),
            r"^exp_avg: expected a fusedopt.quantize.QuantizedState \(8-bit codes and float32 "
            r"scales\) like the call's other states, got an array of dtype int8$",
        ),
        (
            ("int32", "float32", "float32"),
            "^param: expected dtype float32, float64, bfloat16 or float16, got int32$",
        ),
    ],
)
def test_storage_combinations_without_a_row_are_refused(dtypes, message):
    """Float16 state, float64 grads for a float32 param and the like raise a TypeError that
    says what the param's dtype allows, and change nothing."""
    param, grad, state = (DTYPE_OF.get(d, np.dtype(d)) for d in dtypes)
    arrays = [np.ones(4, param), np.ones(4, grad), np.zeros(4, state), np.zeros(4, state)]
    before = [a.copy() for a in arrays]
    with pytest.raises(TypeError, match=message):
        fusedopt.adam_(*arrays, step=1)
    for a, b in zip(arrays, before):
        assert_same_bits(a, b)
    mixed = [
        np.ones(4, np.float32),
        np.ones(4, np.float32),
        np.zeros(4, np.float32),
        np.zeros(4, ml_dtypes.bfloat16),
    ]
    with pytest.raises(
        TypeError, match="^exp_avg_sq: expected dtype float32 like exp_avg, got bfloat16$"
    ):
        fusedopt.adam_(*mixed, step=1)  # one dtype for every state buffer


def test_norm_and_clipping_take_low_precision_grads():
    """global_norm accumulates the upcast values in double; clip_grad_norm_ scales each
    bfloat16 or float16 grad in float32 and rounds once."""
    rng = np.random.default_rng(0)
    grads = [
        rng.standard_normal(3000).astype(ml_dtypes.bfloat16),
        rng.standard_normal(CHUNK + 5).astype(np.float16),
        rng.standard_normal(7),
    ]
    exact = np.sqrt(sum(float(np.sum(g.astype(np.float64) ** 2)) for g in grads))
    np.testing.assert_allclose(fusedopt.global_norm(grads), exact, rtol=1e-12)
    expected = [g.copy() for g in grads]
    total = fusedopt.clip_grad_norm_(grads, 1.0)
    coef = 1.0 / (total + 1e-6)
    for g, e in zip(grads, expected):
        compute = np.float64 if e.dtype == np.float64 else np.float32
        rounded = (e.astype(compute) * compute(coef)).astype(e.dtype)
        assert_same_bits(g, rounded)


# Bit patterns that the conversions treat apart: NaNs with payloads (signaling, quiet, negative),
# the infinities, subnormals, the smallest normal, the largest finite and ones. float16's F16C
# converts blocks of eight; bfloat16 results are rounded a vector lane at a time at the avx512 and
# avx2 levels (32 and 16 elements, lanes.hpp), whose stores are redone with the NaN fix-up for a
# lane that holds a NaN.
SPECIALS = {
    "float16": np.array(
        [0x7C01, 0x7E01, 0xFD00, 0x7C00, 0xFC00, 0x0001, 0x8001, 0x03FF, 0x0400, 0x7BFF, 0xFBFF]
        + [0x3C00, 0xBC00, 0x0000, 0x8000],
        np.uint16,
    ).view(np.float16),
    "bfloat16": np.array(
        [0x7F81, 0x7FC1, 0xFFC3, 0x7F80, 0xFF80, 0x0001, 0x8001, 0x007F, 0x0080, 0x7F7F, 0xFF7F]
        + [0x3F80, 0xBF80, 0x0000, 0x8000],
        np.uint16,
    ).view(ml_dtypes.bfloat16),
}


def takes_flag(name: str, flag: str) -> bool:
    return flag in {h.name for h in OPTIMIZERS[name].declaration.arguments}


@pytest.mark.parametrize(
    "row",
    [row for row in _core.STORAGE_ROWS if "float16" in row or "bfloat16" in row],
    ids="-".join,
)
@pytest.mark.parametrize(
    "name, flag",
    [(name, None) for name in OPTIMIZERS]
    + [
        (name, flag)
        for name in OPTIMIZERS
        for flag in ("maximize", "amsgrad")
        if takes_flag(name, flag)
    ],
)
@pytest.mark.parametrize("stochastic", [False, True], ids=["nearest", "stochastic"])
def test_special_low_precision_values_convert_as_the_reference_does(name, flag, row, stochastic):
    """Special float16 and bfloat16 values in every low-precision array: in a chunk's first
    blocks, in blocks of subnormal results without a NaN (rounded by the vector lanes' integer
    arithmetic, with no redo), and at the end, in the tail converted one by one. Bit for bit the
    reference's results, NaN payloads included, with maximize the signs that its negation gives
    them, with amsgrad numpy.maximum's choice of NaN, and rounded to nearest or stochastically."""
    spec = OPTIMIZERS[name]
    hyper = {**spec.cases[0], flag: True} if flag else dict(spec.cases[0])
    if stochastic:
        hyper.update(stochastic_rounding=True, seed=11)
    rng = np.random.default_rng(7)
    size = 2048 + 77  # a whole chunk, then two lanes of 32 (four of 16) and a tail (F16C's: 5)
    arrays = as_row(make_arrays(spec, hyper, (size,), np.float32, rng), row)
    for role, value in arrays.items():
        if not (isinstance(value, np.ndarray) and value.dtype.name in SPECIALS):
            continue
        specials = np.tile(SPECIALS[value.dtype.name], 3)  # 45
        # the param's (the last in the tail), the grad's and each state's apart: which of two
        # different NaNs an operation returns (the grad's negated with maximize) is the
        # compiler's choice, as it may commute operands
        states = [r for r in arrays if r not in ("param", "grad", "master")]
        place = {"param": 0, "grad": 1}
        at = specials.size * (place[role] if role in place else 2 + states.index(role))
        value[4 + at : 4 + at + specials.size] = specials
        value[value.size - at - specials.size : value.size - at] = specials
        # two blocks of subnormals, no NaN, where the gradient is zero: subnormal moments
        largest = 0x007F if value.dtype.name == "bfloat16" else 0x03FF
        bits = rng.integers(1, largest + 1, 64, dtype=np.uint16)
        value[1024:1088] = (bits | (rng.integers(0, 2, 64, dtype=np.uint16) << 15)).view(
            value.dtype
        )
    arrays["grad"][1024:1088] = 0
    expected = copy_arrays(arrays)
    with np.errstate(all="ignore"):
        call(spec.fused, spec, arrays, hyper, 1)
        call(spec.reference, spec, expected, hyper, 1)
    for role, value in arrays.items():
        pairs = (
            [(value.codes, expected[role].codes), (value.scales, expected[role].scales)]
            if isinstance(value, QuantizedState)
            else [(value, expected[role])]
        )
        for actual, wanted in pairs:
            bits = {1: np.uint8, 2: np.uint16, 4: np.uint32, 8: np.uint64}[actual.dtype.itemsize]
            np.testing.assert_array_equal(actual.view(bits), wanted.view(bits), err_msg=role)


@pytest.mark.parametrize(
    "row", [row for row in _core.STORAGE_ROWS if row[2] != "int8"], ids="-".join
)
@pytest.mark.parametrize(
    "name, flag, first, second",
    [("adamax", None, "exp_inf", "grad"), ("adam", "amsgrad", "max_exp_avg_sq", "exp_avg_sq")],
)
def test_numpy_maximum_keeps_its_first_nan(name, flag, first, second, row):
    """Where both operands of numpy.maximum are NaN it returns the first: Adamax's
    beta2 * exp_inf against |g| + eps, AMSGrad's max_exp_avg_sq against v. Each NaN comes from
    one array, of another sign and payload, so the one kept shows in the stored bits (a
    low-precision NaN keeps its sign), in vector lanes and in the tail."""
    spec = OPTIMIZERS[name]
    hyper = {**spec.cases[0], flag: True} if flag else dict(spec.cases[0])
    size = 2048 + 77
    arrays = make_arrays(spec, hyper, (size,), np.float32, np.random.default_rng(5))
    nan_at = np.arange(0, size, 3)
    arrays[first][nan_at] = np.array(0xFFC00123, np.uint32).view(np.float32)
    arrays[second][nan_at] = np.array(0x7FC00456, np.uint32).view(np.float32)
    arrays = as_row(arrays, row)
    expected = copy_arrays(arrays)
    with np.errstate(all="ignore"):
        call(spec.fused, spec, arrays, hyper, 1)
        call(spec.reference, spec, expected, hyper, 1)
    kept = expected[first].astype(np.float32)[nan_at]
    assert np.isnan(kept).all() and np.signbit(kept).all()  # the first operand's NaN
    assert_same_bits(arrays[first], expected[first], first)


# The probe tests' sizes: two chunks and a tail, in cache; and past the L2, where it prefetches
# for the rows that do.
PROBE_SIZES = pytest.mark.parametrize(
    "n", [2 * CHUNK + 77, PAST_L2[0][0]], ids=["in cache", "past L2"]
)


@PROBE_SIZES
@pytest.mark.parametrize(
    ("dtype", "state"),
    [
        (np.float32, np.float32),
        (ml_dtypes.bfloat16, ml_dtypes.bfloat16),
        (ml_dtypes.bfloat16, np.float32),  # a row whose loops prefetch past the L2
        (np.float16, np.float32),  # no float16 state
    ],
    ids=["float32", "bfloat16", "bfloat16-float32", "float16-float32"],
)
@pytest.mark.parametrize("stochastic", [False, True], ids=["to nearest", "stochastic"])
def test_the_roofline_probe_touches_every_element(dtype, state, n, stochastic, restore_threads):
    """The probe adds 0 * grad to the param and each buffer: an infinite grad makes every
    element NaN, in every chunk and its tail (a probe that skipped some would time less work),
    in one loop or, past the L2, in blocks (all-bfloat16 only stochastically, as its row)."""
    fusedopt.set_num_threads(1)  # past the L2 on one thread, as PAST_L2
    grad = np.full(n, np.inf, dtype)
    arrays = [np.ones(n, dtype), np.ones(n, state), np.ones(n, state)]
    _core.roofline(
        arrays[0], grad, arrays[1], arrays[2], None, None, seed=1, stochastic_rounding=stochastic
    )
    for a in arrays:
        assert np.isnan(a.astype(np.float32)).all()


@PROBE_SIZES
def test_the_roofline_probe_reencodes_int8_state_to_the_same_values(n, restore_threads):
    """With int8 state the probe decodes, stores (with the random bits a kernel's store draws)
    and encodes each piece again: decoded values lie on their grid, so they come back
    unchanged, in every chunk and its tail (a -0 as +0: the probe adds +0 to it); an infinite
    grad makes every one NaN."""
    fusedopt.set_num_threads(1)  # past the L2 on one thread, as PAST_L2
    rng = np.random.default_rng(3)
    grad = np.ones(n, np.float32)
    m = QuantizedState(*quantize.encode(rng.standard_normal(n).astype(np.float32), True))
    v = QuantizedState(*quantize.encode(np.abs(rng.standard_normal(n)).astype(np.float32), False))
    before = [quantize.decode(s.codes, s.scales) for s in (m, v)]
    _core.roofline(np.ones(n, np.float32), grad, m, v, None, None, seed=1)
    for state, values in zip((m, v), before):
        assert_same_bits(quantize.decode(state.codes, state.scales), values + np.float32(0))
    _core.roofline(np.ones(n, np.float32), grad * np.inf, m, v, None, None, seed=2)
    for state in (m, v):
        assert np.isnan(quantize.decode(state.codes, state.scales)).all()


# ---------------------------------------------------------------- stochastic rounding

SR_ROWS = [
    row for row in _core.STORAGE_ROWS if row[0] in ("bfloat16", "float16") or row[2] == "bfloat16"
]


@pytest.mark.parametrize("shape_id", ["17", "chunk+1", "33x65 F", "list"])
@pytest.mark.parametrize("row", SR_ROWS, ids="-".join)
@pytest.mark.parametrize(("spec", "hyper"), CASES)
def test_stochastic_rounding_matches_reference(spec, hyper, row, shape_id):
    """The kernels' random bits and rounding are those of fusedopt.reference's independent
    NumPy implementation, bit for bit, for every bfloat16 and float16 array they write."""
    rng = np.random.default_rng([len(shape_id), 7])
    shape, order = shape_and_order(ALL_SHAPES[shape_id])
    fused = as_row(make_arrays(spec, hyper, shape, np.float32, rng, order), row)
    reference = copy_arrays(fused)
    sr = {**hyper, "stochastic_rounding": True, "seed": 2**64 - 1 - len(shape_id)}
    for step in range(1, STEPS + 1):
        new_grad(fused, rng)
        fused = as_row(fused, row)
        reference["grad"] = copy_arrays({"g": fused["grad"]})["g"]
        seeded = sr if spec.takes_step else {**sr, "seed": sr["seed"] - step}
        call(spec.fused, spec, fused, seeded, step)
        call(spec.reference, spec, reference, seeded, step)
        assert_identical(fused, reference, f"{spec.name} {hyper} {row} step {step}")


@pytest.mark.parametrize(
    "dtype, start, update",
    [
        (ml_dtypes.bfloat16, 1.0, 1e-4),  # half an ulp below 1: 2**-9
        (np.float16, 1.0, 1e-4),  # 2**-12
        (np.float16, -1e-6, -1e-9),  # a subnormal: 2**-25
        (np.float16, 6.1e-5, -1e-9),  # the largest subnormals, crossing to the normals
        (np.float16, -60000.0, 10.0),  # near the largest float16: 16
    ],
)
def test_stochastic_rounding_is_unbiased(dtype, start, update):
    """Low-precision params at `start`, updates far below half an ulp (in brackets): round to
    nearest never moves them; stochastic rounding's mean after 200 steps is
    start - 200 update, within 5 standard errors of the mean (1e5 params)."""
    n, steps = 100_000, 200
    nearest = np.full(n, start, dtype)
    stochastic = np.full(n, start, dtype)
    grad = np.full(n, update, np.float32)
    for step in range(steps):
        fusedopt.sgd_(nearest, grad, lr=1.0)
        fusedopt.sgd_(stochastic, grad, lr=1.0, stochastic_rounding=True, seed=step)
    assert np.all(nearest == nearest[0]) and float(nearest[0]) == float(dtype(start))
    values = stochastic.astype(np.float64)
    expected = float(dtype(start)) - steps * update
    mean = float(values.mean())
    spread = float(values.std()) / np.sqrt(n)
    assert abs(mean - expected) < 5 * spread, (mean, spread)
    assert spread > 0  # the params really spread: not a constant shift


def test_stochastic_rounding_past_the_largest_float16_reaches_inf_as_often_as_it_should():
    """65504 + 8 lies a quarter of the way from the largest float16 to 2**16, the next step up,
    which is inf: a quarter of the elements become inf (within 5 standard errors); to nearest
    none does (they round to inf from 65520)."""
    n = 100_000
    param = np.full(n, 65504, np.float16)
    fusedopt.sgd_(param, np.full(n, -8, np.float32), lr=1.0, stochastic_rounding=True, seed=1)
    share = float(np.mean(np.isposinf(param)))
    assert abs(share - 0.25) < 5 * np.sqrt(0.25 * 0.75 / n), share
    assert np.all((param == 65504) | np.isposinf(param))
    nearest = np.full(n, 65504, np.float16)
    fusedopt.sgd_(nearest, np.full(n, -8, np.float32), lr=1.0)
    assert np.all(nearest == 65504)


def chi_square_z(cells, bins):
    """How many standard deviations the chi-square statistic of `cells` (ints in [0, bins)),
    against equal counts, lies above its mean (the normal approximation, bins large)."""
    counts = np.bincount(cells, minlength=bins)
    expected = len(cells) / bins
    return (((counts - expected) ** 2 / expected).sum() - (bins - 1)) / np.sqrt(2 * (bins - 1))


@pytest.mark.parametrize("seed", [0, 2**64 - 1])
def test_random_bits_of_every_slot_are_uniform_and_pairwise_independent(seed):
    """The 16 bits of each array slot (0-3), for consecutive elements, are uniform: so every
    array's rounding is unbiased. No slot's bits follow another's, in the same element or one
    1, 16, 256, 1024, 2048, 4096 or 8192 places on (a matrix's next row, the next chunk): the top
    5 bits of one against the top or low 5 bits of another fill 1024 cells evenly; and slots
    2 and 3, remixed from slots 0 and 1, fill 512 cells evenly with them (top 3 bits each). A
    remix that reuses bits, permutes them (a rotation) or xors them fails, and so does a
    hash of the counter without its Weyl multiply (dependent 16-8192 elements apart). Nor
    does one follow another at the same element in the next step or tensor, whose Weyl terms
    differ from these by one constant. Chi-square tests, one-sided: counts more even than
    chance bias nothing."""
    n = 1 << 21
    key = reference._tensor_key(seed, 7, 3)
    slots = [reference._slot_bits(key, n, slot).astype(np.int64) for slot in range(4)]
    top, low = [s >> 11 for s in slots], [s & 31 for s in slots]  # 5 bits each
    for s in range(4):
        assert chi_square_z(slots[s] >> 6, 1024) < 6, s
        assert chi_square_z(slots[s] & 1023, 1024) < 6, s
        for t in range(4):
            if t != s:
                assert chi_square_z(top[s] * 32 + top[t], 1024) < 6, (s, t)
                assert chi_square_z(top[s] * 32 + low[t], 1024) < 6, (s, t)
            for lag in (1, 16, 256, 1024, 2048, 4096, 8192):
                assert chi_square_z(top[s][:-lag] * 32 + top[t][lag:], 1024) < 6, (s, t, lag)
                assert chi_square_z(top[s][:-lag] * 32 + low[t][lag:], 1024) < 6, (s, t, lag)
    for remixed in (2, 3):
        joint = (slots[0] >> 13) * 64 + (slots[1] >> 13) * 8 + (slots[remixed] >> 13)
        assert chi_square_z(joint, 512) < 6, remixed
    for step, tensor in [(8, 3), (7, 4)]:
        other = reference._tensor_key(seed, step, tensor)
        for t in range(4):
            theirs = reference._slot_bits(other, n, t).astype(np.int64)
            for s in range(4):
                assert chi_square_z(top[s] * 32 + (theirs >> 11), 1024) < 6, (s, t, step, tensor)
                assert chi_square_z(top[s] * 32 + (theirs & 31), 1024) < 6, (s, t, step, tensor)


def sr_run(threads, seed, step=3):
    fusedopt.set_num_threads(threads)
    rng = np.random.default_rng(0)
    shapes = [(3 * PARALLEL_MIN + 11,), (CHUNK * 5 + 1,), (7,)]
    arrays = [
        [rng.standard_normal(s).astype(ml_dtypes.bfloat16) for s in shapes] for _ in range(2)
    ] + [[np.zeros(s, ml_dtypes.bfloat16) for s in shapes] for _ in range(2)]
    fusedopt.adam_(*arrays, step=step, lr=1e-3, stochastic_rounding=True, seed=seed)
    return arrays


def test_stochastic_rounding_is_reproducible_and_seeded(restore_threads):
    """The bits are a pure function of (seed, step, tensor, element): the same for every thread
    count and run; another seed or step gives other bits."""
    first = sr_run(1, seed=5)
    for threads in (1, 2, 3):
        again = sr_run(threads, seed=5)
        for a, b in zip(first, again):
            for x, y in zip(a, b):
                assert x.tobytes() == y.tobytes(), threads
    for other in (sr_run(2, seed=6), sr_run(2, seed=5, step=4)):
        assert first[0][0].tobytes() != other[0][0].tobytes()


def test_stochastic_rounding_arguments():
    p = np.ones(4, np.float16)
    with pytest.raises(TypeError, match="^sgd_\\(\\): seed is required"):
        fusedopt.sgd_(p, p.copy(), lr=0.1, stochastic_rounding=True)
    b = np.ones(4, ml_dtypes.bfloat16)
    for bad, error in [(-1, ValueError), (2**64, ValueError), (1.5, TypeError), (True, TypeError)]:
        with pytest.raises(error, match="seed"):
            fusedopt.sgd_(b, b.copy(), lr=0.1, stochastic_rounding=True, seed=bad)
    assert np.all(p == 1) and np.all(b == 1)
    # float32 and float64 arrays are stored exactly: the flag changes nothing there
    f = np.ones(4, np.float32)
    fusedopt.sgd_(f, np.ones(4, np.float32), lr=0.1, stochastic_rounding=True, seed=1)
    assert_same_bits(f, np.full(4, np.float32(1) - np.float32(0.1)))


# ---------------------------------------------------------------- master weights

MASTER_ROWS = [
    (copy, row)
    for copy in LOW
    for row in _core.STORAGE_ROWS
    if row[0] == "float32" and row[1] in ("float32", copy) and row[2] != "float64"
]


@pytest.mark.parametrize("shape_id", ["17", "chunk+1", "33x65 F", "list"])
@pytest.mark.parametrize(("copy", "row"), MASTER_ROWS, ids=lambda x: "-".join(x))
@pytest.mark.parametrize(("spec", "hyper"), CASES)
def test_master_weights_are_the_float32_formula_with_the_param_rounded(
    spec, hyper, copy, row, shape_id
):
    """With float32 masters of a low-precision param, the update is the float32 formula on the
    master (grad and state upcast as for any row) and the param is the updated master rounded
    to nearest even: the param's old value is never read."""
    rng = np.random.default_rng([len(shape_id), len(copy), sum(map(len, row))])
    shape, order = shape_and_order(ALL_SHAPES[shape_id])
    fused = as_row(make_arrays(spec, hyper, shape, np.float32, rng, order), row)
    fused["master"] = fused["param"]
    fused = as_row(fused, (copy, *row[1:]))
    if isinstance(fused["param"], list):  # garbage in the params: only the masters count
        fused["param"] = [np.full_like(p, 7) for p in fused["param"]]
    else:
        fused["param"] = np.full_like(fused["param"], 7)
    reference = copy_arrays(fused)
    for step in range(1, STEPS + 1):
        new_grad(fused, rng)
        fused = as_row(fused, (copy, *row[1:]))
        reference["grad"] = copy_arrays({"g": fused["grad"]})["g"]
        on_master = as_row({k: v for k, v in copy_arrays(fused).items() if k != "param"}, row)
        on_master["param"] = on_master.pop("master")
        expected = as_row(copy_arrays(on_master), ("float32",) * 3)
        call(spec.reference, spec, expected, hyper, step)
        expected = as_row(expected, row, stored_by=(spec, step))  # the state rounded once
        expected["master"] = expected.pop("param")
        expected["param"] = as_row({"param": expected["master"]}, (copy, copy, copy))["param"]
        masters = {"master": fused["master"]}
        assert call(spec.fused, spec, fused, {**hyper, **masters}, step) is True
        assert call(spec.reference, spec, reference, {**hyper, "master": reference["master"]}, step)
        names = sorted(expected)
        expected = {k: expected[k] for k in names}
        assert_identical({k: fused[k] for k in names}, expected, f"{spec.name} {row} {step}")
        assert_identical({k: reference[k] for k in names}, expected, f"reference {step}")


# The optimizers of the prefetching tests: Adam with the most arrays (AMSGrad's three states),
# Lion and momentum, whose int8 state the issue asks for, and plain SGD, with no state (its
# bfloat16 row is all-bfloat16, and prefetches only stochastically).
PREFETCHED = [c for c in CASES if c.id in ("adam-2", "lion-0", "momentum-0", "sgd-0")]


@pytest.mark.parametrize("row", LOW_ROWS, ids="-".join)
@pytest.mark.parametrize(("spec", "hyper"), PREFETCHED)
def test_prefetching_loops_give_the_same_bits(spec, hyper, row, restore_threads):
    """Arrays past a core's L2, where the loops prefetch: rounded once to nearest, as in cache;
    stochastically, with the reference's bits; with masters, the param their rounded copy."""
    fusedopt.set_num_threads(1)  # one thread's share is the whole call: past any core's L2
    check_rounded_once(spec, hyper, row, "past L2", range(1, 3))
    if row in SR_ROWS:
        test_stochastic_rounding_matches_reference(spec, hyper, row, "past L2")
    for copy, master_row in MASTER_ROWS:
        if master_row == row:
            test_master_weights_are_the_float32_formula_with_the_param_rounded(
                spec, hyper, copy, row, "past L2"
            )


def test_quantized_state_follows_an_exponential_moving_average():
    """Adam's second moment moves 0.1 % a step, far below a step of the 3-bit codes: rounded to
    nearest it would stall (about 0.3 of the float32 value after 1000 steps), and a block
    maximum saturating at its scale biases stochastic rounding down (0.97 after 1000 steps).
    Stochastic rounding against a scale every element fits in tracks float32 (measured 1.000
    and 0.993 after 1000 and 3000 steps)."""
    n = 4096
    rng = np.random.default_rng(1)
    scale = rng.uniform(0.5, 2.0, n).astype(np.float32)
    quantized = [np.zeros(n, np.float32), None, QuantizedState.zeros((n,), signed=True)]
    quantized.append(QuantizedState.zeros((n,), signed=False))
    exact = [np.zeros(n, np.float32), None, np.zeros(n, np.float32), np.zeros(n, np.float32)]
    for step in range(1, 1501):
        grad = rng.standard_normal(n, dtype=np.float32) * scale
        for arrays in (quantized, exact):
            arrays[1] = grad
            fusedopt.adam_(*arrays, step=step, lr=1e-3)
    ratio = quantized[3].dequantize().sum() / exact[3].sum()
    assert abs(ratio - 1) < 0.02, ratio


SWITCHED = [
    pytest.param(spec, buffer, id=f"{name}-{buffer}")
    for name, spec in OPTIMIZERS.items()
    for buffer in spec.optional_state
]


@pytest.mark.parametrize("low", ["bfloat16", "int8"])
@pytest.mark.parametrize("spec, buffer", SWITCHED)
def test_a_buffer_given_with_its_switch_off_is_ignored_by_both(spec, buffer, low):
    """A bfloat16 or int8 buffer given while its option is off is neither read nor written, and
    needs no seed, in the kernel and in the reference alike (the reference asked for a seed
    for the random bits of a store it never makes)."""
    rng = np.random.default_rng(7)
    hyper = {**spec.cases[0], "stochastic_rounding": True}
    hyper.pop(spec.optional_state[buffer], None)  # the switch's default: off
    arrays = make_arrays(spec, hyper, [(5,), (300,)], np.float32, rng)

    def stored_low(shape):
        x = rng.standard_normal(shape).astype(np.float32)
        if low == "int8":
            return QuantizedState.from_array(x, signed=True)
        return x.astype(ml_dtypes.bfloat16)

    before = {buffer: [stored_low(s) for s in [(5,), (300,)]]}
    fused_buffer, reference_buffer = copy_arrays(before), copy_arrays(before)
    expected = copy_arrays(arrays)
    step = {"step": 1} if spec.takes_step else {}
    spec.fused(*arrays.values(), **hyper, **step, **fused_buffer)
    spec.reference(*expected.values(), **hyper, **step, **reference_buffer)
    assert_identical(arrays, expected)
    assert_identical(fused_buffer, before)
    assert_identical(reference_buffer, before)
