"""Non-finite gradients, extreme steps, 64-bit sizes, concurrency and fork."""

from __future__ import annotations

import gc
import multiprocessing
import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor

import ml_dtypes
import numpy as np
import pytest
from support import (
    MisstatedList,
    all_options,
    assert_identical,
    call,
    copy_arrays,
    make_arrays,
    new_grad,
)

import fusedopt
from fusedopt import _core
from fusedopt.quantize import QuantizedState
from fusedopt.registry import OPTIMIZERS

CHUNK, PARALLEL_MIN = _core.CHUNK, _core.get_parallel_min()
DTYPES = [np.float32, np.float64]
NONFINITE = [np.nan, np.inf, -np.inf]
SPECS = [pytest.param(spec, id=name) for name, spec in OPTIMIZERS.items()]
# Several tensors, the largest above the parallel threshold so threads run.
SHAPES = [(5,), (PARALLEL_MIN + CHUNK + 3,), (0,), (3, 4), (CHUNK,)]


@pytest.fixture
def restore_threads():
    yield
    fusedopt.set_num_threads(None)


# ---------------------------------------------------------------- all_finite


@pytest.mark.parametrize(
    "dtype", DTYPES + [ml_dtypes.bfloat16, np.float16], ids=lambda d: np.dtype(d).name
)
@pytest.mark.parametrize("threads", [1, 2, 3])
def test_all_finite_finds_every_position(dtype, threads, restore_threads):
    fusedopt.set_num_threads(threads)
    rng = np.random.default_rng(0)
    arrays = [rng.standard_normal(s).astype(dtype) for s in SHAPES]
    assert fusedopt.all_finite(arrays) is True
    assert fusedopt.all_finite(arrays[1]) is True
    for t, a in enumerate(arrays):
        flat = a.reshape(-1)
        for position in {0, flat.size // 2, flat.size - 1, CHUNK - 1, CHUNK} & set(
            range(flat.size)
        ):
            for bad in NONFINITE:
                saved = flat[position]
                flat[position] = bad
                assert fusedopt.all_finite(arrays) is False, (t, position, bad)
                flat[position] = saved
    assert fusedopt.all_finite(arrays) is True


def test_all_finite_edge_cases():
    assert fusedopt.all_finite([]) is True
    assert fusedopt.all_finite(np.zeros(0, np.float32)) is True
    assert fusedopt.all_finite(np.array(np.nan)) is False  # 0-d
    big = np.finfo(np.float32).max
    assert fusedopt.all_finite(np.array([big, -big, 1e-45], np.float32)) is True
    assert fusedopt.all_finite(np.asfortranarray(np.ones((3, 5)))) is True


def test_all_finite_rejects_bad_input():
    with pytest.raises(TypeError, match="arrays: expected a numpy.ndarray or a list"):
        fusedopt.all_finite(1.0)
    with pytest.raises(TypeError, match=r"arrays\[1\]: expected dtype float32"):
        fusedopt.all_finite([np.ones(3, np.float32), np.ones(3, np.float64)])
    with pytest.raises(
        TypeError, match="^arrays: expected dtype float32, float64, bfloat16 or float16, got int32"
    ):
        fusedopt.all_finite(np.ones(3, np.int32))
    with pytest.raises(ValueError, match="arrays: expected a C- or F-contiguous"):
        fusedopt.all_finite(np.ones(6)[::2])


# ---------------------------------------------------------------- non-finite gradients


def poison(arrays, value, rng):
    """Put `value` at a random element of the largest grad."""
    grad = max(arrays["grad"], key=lambda g: g.size)
    grad.reshape(-1)[rng.integers(grad.size)] = value


@pytest.mark.parametrize("bad", NONFINITE, ids=["nan", "inf", "-inf"])
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: np.dtype(d).name)
@pytest.mark.parametrize("spec", SPECS)
def test_nonfinite_gradients_propagate_like_the_reference(spec, dtype, bad):
    rng = np.random.default_rng(3)
    hyper = {**spec.cases[-1], **all_options(spec)}
    fused = make_arrays(spec, hyper, SHAPES, dtype, rng)
    for step in (1, 2):
        new_grad(fused, rng)
        poison(fused, bad, rng)
        expected = copy_arrays(fused)
        with np.errstate(all="ignore"):
            assert call(spec.fused, spec, fused, hyper, step) is True
            call(spec.reference, spec, expected, hyper, step)
        assert_identical(fused, expected, f"{spec.name} step {step}")


@pytest.mark.parametrize("bad", NONFINITE, ids=["nan", "inf", "-inf"])
@pytest.mark.parametrize("spec", SPECS)
def test_skip_if_nonfinite_changes_nothing(spec, bad):
    rng = np.random.default_rng(4)
    hyper = {**spec.cases[-1], **all_options(spec), "skip_if_nonfinite": True}
    fused = make_arrays(spec, hyper, SHAPES, np.float32, rng)
    expected = copy_arrays(fused)
    # A finite step is applied, exactly as the reference applies it.
    assert call(spec.fused, spec, fused, hyper, 1) is True
    assert call(spec.reference, spec, expected, hyper, 1) is True
    assert_identical(fused, expected, "finite step")
    # A non-finite gradient anywhere skips the whole step: every tensor, param and state.
    new_grad(fused, rng)
    poison(fused, bad, rng)
    before = copy_arrays(fused)
    assert call(spec.fused, spec, fused, hyper, 2) is False
    assert call(spec.reference, spec, expected | {"grad": before["grad"]}, hyper, 2) is False
    assert_identical(fused, before, "skipped step")


# ---------------------------------------------------------------- extreme hyperparameters


@pytest.mark.parametrize("step", [10**7, 2**53, 2**62])
@pytest.mark.parametrize("spec", [s for s in SPECS if s.values[0].takes_step])
def test_huge_step_counts(spec, step):
    """Bias corrections and learning-rate decay stay finite and equal the reference's."""
    rng = np.random.default_rng(5)
    for hyper in spec.cases:
        fused = make_arrays(spec, hyper, [(17,), (CHUNK + 1,)], np.float64, rng)
        expected = copy_arrays(fused)
        call(spec.fused, spec, fused, hyper, step)
        call(spec.reference, spec, expected, hyper, step)
        assert_identical(fused, expected, f"step {step}")
        assert all(np.isfinite(a).all() for a in fused["param"])


@pytest.mark.parametrize("weight_decay", [1e-46, 5e-324], ids=["below-float32", "least-double"])
@pytest.mark.parametrize(
    "dtype", [np.float32, np.float64, ml_dtypes.bfloat16], ids=lambda d: np.dtype(d).name
)
@pytest.mark.parametrize(
    "spec", [s for s in SPECS if "weight_decay" in s.values[0].declaration.defaults()]
)
def test_a_weight_decay_that_rounds_to_zero_is_still_taken(spec, dtype, weight_decay):
    """Whether the weight decay term is taken is decided on the value given, as the reference
    and torch decide it, not on its rounding to the compute type: a float32 coefficient of 0
    still adds 0 * param, NaN for an infinite param (the kernels skipped the term)."""
    rng = np.random.default_rng(6)
    decouples = "decoupled_weight_decay" in spec.declaration.defaults()
    for decoupled in [False, True] if decouples else [None]:
        hyper = {**spec.cases[-1], **all_options(spec), "weight_decay": weight_decay}
        if decouples:
            hyper["decoupled_weight_decay"] = decoupled
        fused = make_arrays(spec, hyper, [(5,), (CHUNK + 3,)], dtype, rng)
        for param in fused["param"]:
            param.reshape(-1)[[0, -1]] = [np.inf, -np.inf]
        expected = copy_arrays(fused)
        with np.errstate(all="ignore"):
            call(spec.fused, spec, fused, hyper, 1)
            call(spec.reference, spec, expected, hyper, 1)
        assert_identical(fused, expected, f"decoupled={decoupled}")


# ---------------------------------------------------------------- 64-bit sizes


@pytest.mark.parametrize("team", [1, 2, 3, 16, 1024])
@pytest.mark.parametrize(
    "sizes",
    [
        [3 * 2**31 + 5],
        [2**31 - 1, 0, 7, 2**33 + 1, 1],
        [2**62 + 3, 5],
        [0, 0],
    ],
    ids=["6Gi", "mixed", "2^62", "empty"],
)
def test_thread_split_is_64_bit(sizes, team):
    """The split of a call across threads, computed by the kernels' own code for sizes far
    beyond 2^31 (nothing is allocated): contiguous, covering, on chunk starts, even."""
    ranges = _core._thread_ranges(sizes, team)
    starts = np.concatenate([[0], np.cumsum(sizes, dtype=np.int64)]).tolist()
    total = starts[-1]
    assert ranges[0][0] == 0 and ranges[-1][1] == total
    for (_, e0), (b1, _) in zip(ranges, ranges[1:]):
        assert e0 == b1
    for begin, end in ranges:
        assert 0 <= begin <= end <= total
        tensor = max(t for t in range(len(sizes)) if starts[t] <= begin)
        assert (begin - starts[tensor]) % CHUNK == 0 or begin == total
        # an even share, give or take a chunk
        assert abs((end - begin) - total / team) <= CHUNK + 1 or total < team * CHUNK


# ---------------------------------------------------------------- threads and processes


@pytest.mark.parametrize("spec", SPECS)
def test_thread_counts_including_all_cores(spec, restore_threads):
    hyper = {**spec.cases[-1], **all_options(spec)}
    results = []
    for threads in sorted({1, 2, 3, os.cpu_count() or 1}):
        fusedopt.set_num_threads(threads)
        rng = np.random.default_rng(6)
        arrays = make_arrays(spec, hyper, SHAPES, np.float32, rng)
        for step in (1, 2):
            new_grad(arrays, rng)
            call(spec.fused, spec, arrays, hyper, step)
        results.append(arrays)
    for arrays in results[1:]:
        assert_identical(arrays, results[0], "thread count")


def train(spec, hyper, seed, steps=4):
    rng = np.random.default_rng(seed)
    arrays = make_arrays(spec, hyper, SHAPES, np.float32, rng)
    for step in range(1, steps + 1):
        new_grad(arrays, rng)
        call(spec.fused, spec, arrays, hyper, step)
    return arrays


@pytest.mark.parametrize("spec", SPECS)
def test_concurrent_python_threads(spec):
    """The GIL is released in the kernels: models updated from 4 Python threads at once come
    out exactly as when updated one after the other."""
    hyper = {**spec.cases[-1], **all_options(spec)}
    serial = [train(spec, hyper, seed) for seed in range(6)]
    with ThreadPoolExecutor(max_workers=4) as pool:
        concurrent = list(pool.map(lambda seed: train(spec, hyper, seed), range(6)))
    for a, b in zip(concurrent, serial):
        assert_identical(a, b, "concurrent vs serial")


FORK_AFTER_MUON = """
import os, signal, numpy as np, fusedopt
fusedopt.set_adaptive_threads(False)  # the child's call would go parallel, busy or not
param, grad = np.ones((2, 256, 256), np.float32)
fusedopt.muon_(param, grad, np.zeros_like(param))  # the level library's region, the binding none
pid = os.fork()
if pid == 0:
    signal.alarm(120)  # a hang detector, generous for a loaded machine
    p, g, m, v = np.ones((4, 1 << 17), np.float32)
    fusedopt.adam_(p, g, m, v, step=1)
    os._exit(0)
print(os.waitpid(pid, 0)[1])
"""


@pytest.mark.skipif(not hasattr(os, "fork"), reason="no fork() on this platform")
def test_fork_after_a_matrix_region_does_not_hang():
    """A region that only the matrix code (Muon's level library) opened made libgomp's threads
    too: the forked child's element-wise kernels run on one thread, not into libgomp's hang."""
    result = subprocess.run(
        [sys.executable, "-c", FORK_AFTER_MUON], capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["0"], "the forked child hung (SIGALRM) or failed"


def step_in_child(queue):
    arrays = train(OPTIMIZERS["adam"], {}, seed=7)
    queue.put([a.tobytes() for a in arrays["param"]])


@pytest.mark.skipif(
    "fork" not in multiprocessing.get_all_start_methods(), reason="no fork() on this platform"
)
@pytest.mark.filterwarnings("ignore:This process .* is multi-threaded:DeprecationWarning")
def test_fork_after_parallel_region_does_not_hang():
    """GNU libgomp hangs a forked child that opens a parallel region after the parent did;
    fusedopt runs such a child's kernels on one thread instead, with the same results."""
    expected = train(OPTIMIZERS["adam"], {}, seed=7)  # opens a parallel region here
    context = multiprocessing.get_context("fork")
    queue = context.Queue()
    child = context.Process(target=step_in_child, args=(queue,))
    child.start()
    try:
        # before join: the child flushes the queue, then exits. A hang detector: generous for
        # a loaded machine (sanitizers, CI jobs side by side).
        result = queue.get(timeout=300)
    except Exception:
        child.kill()
        pytest.fail("the forked child hung")
    child.join(timeout=300)
    assert child.exitcode == 0
    assert result == [a.tobytes() for a in expected["param"]]


# ---------------------------------------------------------------- lists that misstate or change


def _adam_arrays(rng, dtype=np.float32) -> dict[str, list[np.ndarray]]:
    shapes = [(3,), (CHUNK + 70,), (2, 5)]
    return {
        role: [rng.standard_normal(s).astype(dtype) for s in shapes]
        for role in ("param", "grad", "exp_avg", "exp_avg_sq")
    }


@pytest.mark.parametrize("stated", [0, 2, 5, 1 << 20])
def test_a_list_that_misstates_its_length_is_read_as_it_is(stated):
    """The binding reads a list's own items, not as many as its __len__ states (reading past
    a list's end was undefined behaviour, a crash or garbage)."""
    rng = np.random.default_rng(0)
    expected = _adam_arrays(rng)
    expected["exp_avg_sq"] = [np.abs(v) for v in expected["exp_avg_sq"]]
    actual = copy_arrays(expected)
    fusedopt.adam_(*expected.values(), step=3)
    fusedopt.adam_(*(MisstatedList(a, stated) for a in actual.values()), step=3)
    assert_identical({k: list(v) for k, v in actual.items()}, expected)

    # masters too; and lists whose stated lengths agree but whose contents do not are refused
    params = [p.astype(ml_dtypes.bfloat16) for p in expected["param"]]
    masters = MisstatedList([p.astype(np.float32) for p in params], stated)
    grads = [g.astype(ml_dtypes.bfloat16) for g in expected["grad"]]
    fusedopt.sgd_(params, grads, master=masters, lr=0.5)
    assert_identical({"param": params}, {"param": [m.astype(ml_dtypes.bfloat16) for m in masters]})
    with pytest.raises(ValueError, match=r"^grad: expected 3 arrays like param, got 2$"):
        fusedopt.sgd_(params, MisstatedList(grads[:2], 3), lr=0.5)


def test_a_quantized_state_that_empties_the_lists_while_checked():
    """Python code the checks run (here a QuantizedState subclass's attribute) may empty the
    call's lists and free their arrays: the call holds its own references and updates the arrays
    it was given, as a twin call does (it read freed memory, and crashed)."""

    class Emptying(QuantizedState):
        __slots__ = ()

        def __getattribute__(self, name):
            if name == "codes":
                for value in lists.values():
                    value.clear()
                gc.collect()
            return object.__getattribute__(self, name)

    rng = np.random.default_rng(1)
    shapes = [(300,), (7, 9)]
    params = [rng.standard_normal(s).astype(ml_dtypes.bfloat16) for s in shapes]
    base = {
        "param": params,
        "grad": [rng.standard_normal(s).astype(np.float32) for s in shapes],
        "exp_avg": [QuantizedState.zeros(s, signed=True) for s in shapes],
        "master": [p.astype(np.float32) for p in params],
    }
    expected = copy_arrays(base)

    def lion(a):
        fusedopt.lion_(a["param"], a["grad"], a["exp_avg"], master=a["master"], lr=0.1, seed=5)

    lion(expected)
    lists = copy_arrays(base)
    q = lists["exp_avg"][1]
    lists["exp_avg"][1] = Emptying(q.codes, q.scales)
    # the results; the grads and states are held by the lists alone, freed when emptied
    updated = {role: list(lists[role]) for role in ("param", "master")}
    del q
    lion(lists)
    assert not any(lists.values())
    assert_identical(updated, {role: expected[role] for role in updated})
