"""Checks of fusedopt.distributed run inside MPI jobs; tests/test_distributed.py launches them.

    mpiexec -n N python tests/mpi_checks.py checks OUT   # every check in CASES, one job
    mpiexec -n 2 python tests/mpi_checks.py abort OUT    # a rank raises inside step()

Each check runs on every rank; rank 0 writes OUT/results-N.json: check -> None if it passed on
every rank, else the failing ranks' tracebacks. One job per world size: mpiexec takes a second
to start. Models are small (a few thousand elements), so the job runs in seconds.
"""

from __future__ import annotations

import faulthandler
import hashlib
import json
import os
import sys
import traceback
from pathlib import Path

import ml_dtypes
import numpy as np
from support import assert_identical, assert_same_bits

from fusedopt import distributed, optim, schedules
from fusedopt.quantize import BLOCK, QuantizedState

BF16 = np.dtype(ml_dtypes.bfloat16)
# name, shape, order: tensors split across ranks at block boundaries, one F-ordered, a 0-d one
SPEC = [
    ("W1", (64, 40), "C"),
    ("b1", (40,), "C"),
    ("W2", (40, 30), "F"),
    ("b2", (30,), "C"),
    ("s", (), "C"),
    ("W3", (30, 10), "C"),
]
STEPS = 4
# class, hyperparameters: every optimizer, with the options that add state
OPTIMIZERS = [
    (optim.SGD, dict(lr=0.05)),
    (optim.SGD, dict(lr=0.05, momentum=0.9, nesterov=True)),
    (optim.Momentum, dict(lr=0.05, beta=0.9)),
    (optim.Adam, dict(lr=1e-2, amsgrad=True)),
    (optim.AdamW, dict(lr=1e-2, weight_decay=0.1)),
    (optim.Adamax, dict(lr=1e-2)),
    (optim.NAdam, dict(lr=1e-2)),
    (optim.RAdam, dict(lr=1e-2)),
    (optim.Adagrad, dict(lr=0.1, lr_decay=0.01, initial_accumulator_value=0.1)),
    (optim.RMSprop, dict(lr=1e-2, momentum=0.9, centered=True)),
    (optim.Lion, dict(lr=1e-3, weight_decay=0.1)),
]


def model(dtype=np.float32, spec=SPEC, seed=0):
    rng = np.random.default_rng(seed)
    return {
        name: np.asarray(rng.standard_normal(shape), order=order).astype(dtype, order="K")
        for name, shape, order in spec
    }


def groups(params):
    """Two groups with their own learning rates: the weights and the rest."""
    weights = {n: p for n, p in params.items() if n.startswith("W")}
    rest = {n: p for n, p in params.items() if not n.startswith("W")}
    return [{"params": weights}, {"params": rest, "lr": 3e-3}]


def rank_grads(params, step, rank, world, dtype=None):
    """Rank ``rank``'s gradients at ``step``: g + (rank - (N-1)/2) h, whose mean over the ranks
    is g at every world size; of ``dtype`` (a dict: by name), else the parameter's."""
    out = {}
    for i, (name, p) in enumerate(params.items()):
        g = np.random.default_rng([step, i, 0]).standard_normal(p.shape)
        h = np.random.default_rng([step, i, 1]).standard_normal(p.shape)
        v = g + (rank - (world - 1) / 2) * h
        order = "F" if p.flags.f_contiguous and not p.flags.c_contiguous else "C"
        like = dtype.get(name) if isinstance(dtype, dict) else dtype
        out[name] = np.asarray(v, order=order).astype(like or p.dtype, order="K")
    return out


def mean_grads(params, step, world, dtype=None):
    """The gradients averaged over the ranks, as a single process would use them."""
    all_grads = [rank_grads(params, step, r, world, dtype) for r in range(world)]
    out = {}
    for name in params:
        g = np.mean([a[name].astype(np.float64) for a in all_grads], axis=0)
        like = all_grads[0][name]
        order = "F" if like.flags.f_contiguous and not like.flags.c_contiguous else "C"
        out[name] = np.asarray(g, order=order).astype(like.dtype, order="K")
    return out


def copy(params):
    return {n: p.copy(order="K") for n, p in params.items()}


def digest(params):
    h = hashlib.sha256()
    for p in params.values():
        h.update(np.ascontiguousarray(p).view(np.uint8).tobytes())
    return h.hexdigest()


def same_on_every_rank(comm, params):
    digests = comm.allgather(digest(params))
    assert len(set(digests)) == 1, f"params differ across ranks: {digests}"


def on_every_rank(comm, check, *args, **kwargs):
    """Run a check that only some ranks can make (on their data), then raise on every rank if
    it failed on any: a rank leaving a case early would leave the others waiting."""
    try:
        check(*args, **kwargs)
        error = None
    except Exception:
        error = traceback.format_exc()
    errors = [e for e in comm.allgather(error) if e]
    if errors:
        raise AssertionError(errors[0])


def assert_state_close(got, want, rtol, atol=0.0):
    """Two state_dicts: same structure, arrays close (int8 codes and scales exactly)."""
    assert [g["names"] for g in got["param_groups"]] == [g["names"] for g in want["param_groups"]]
    assert set(got["state"]) == set(want["state"]), (set(got["state"]), set(want["state"]))
    for name, entry in want["state"].items():
        mine = got["state"][name]
        assert set(mine) == set(entry), (name, set(mine), set(entry))
        for key, value in entry.items():
            other = mine[key]
            if not isinstance(value, (np.ndarray, QuantizedState)):  # step, NAdam's mu_product
                assert other == value, (name, key, other, value)
            elif isinstance(value, QuantizedState):
                assert isinstance(other, QuantizedState), (name, key)
                assert other.codes.dtype == value.codes.dtype and other.shape == value.shape
                assert other.scales.shape == value.scales.shape, (name, key)
            else:
                assert other.dtype == value.dtype and other.shape == value.shape, (name, key)
                np.testing.assert_allclose(
                    other.astype(np.float64),
                    value.astype(np.float64),
                    rtol=rtol,
                    atol=atol,
                    err_msg=f"state {key!r} of {name!r}",
                )


def run_pair(comm, cls, hyper, dtype, steps=STEPS, grad_dtype=None, **options):
    """The same training with ZeroRedundancyOptimizer on the ranks' gradients and with one
    optimizer on their mean: a step with a frozen parameter, a None gradient and a schedule."""
    rank, world = comm.Get_rank(), comm.Get_size()
    params = model(dtype)
    ref_params = copy(params)
    zero = distributed.ZeroRedundancyOptimizer(groups(params), cls, comm, **hyper, **options)
    ref = cls(groups(ref_params), **hyper, **options)
    zsched = schedules.StepLR(zero, step_size=2, gamma=0.5)
    rsched = schedules.StepLR(ref, step_size=2, gamma=0.5)
    for step in range(1, steps + 1):
        grads = rank_grads(params, step, rank, world, grad_dtype)
        mean = mean_grads(params, step, world, grad_dtype)
        if step == 2:
            grads["b1"] = mean["b1"] = None
            zero.freeze("W3")
            ref.freeze("W3")
        if step == 3:
            zero.unfreeze("W3")
            ref.unfreeze("W3")
        zero.step(grads)
        ref.step(mean)
        zsched.step()
        rsched.step()
    same_on_every_rank(comm, params)
    zero.consolidate_state_dict(to=world - 1)
    sd = zero.state_dict() if rank == world - 1 else None
    return params, ref_params, sd, ref, zero


def check_float64_state(sd, ref, cls, hyper):
    if sd is not None:
        assert_state_close(sd, ref.state_dict(), rtol=1e-12, atol=1e-14)
        cls(groups(model(np.float64)), **hyper).load_state_dict(sd)  # loads as it is


def check_every_optimizer_float64(comm):
    for cls, hyper in OPTIMIZERS:
        for clip in (None, 1.0):
            params, ref_params, sd, ref, _ = run_pair(
                comm, cls, hyper, np.float64, max_grad_norm=clip
            )
            for name in params:
                np.testing.assert_allclose(
                    params[name],
                    ref_params[name],
                    rtol=1e-12,
                    atol=1e-14,
                    err_msg=f"{cls.__name__} {name}",
                )
            on_every_rank(comm, check_float64_state, sd, ref, cls, hyper)


def check_every_optimizer_float32(comm):
    for cls, hyper in OPTIMIZERS:
        params, ref_params, sd, ref, _ = run_pair(
            comm, cls, hyper, np.float32, skip_if_nonfinite=True
        )
        for name in params:
            np.testing.assert_allclose(
                params[name],
                ref_params[name],
                rtol=1e-5,
                atol=1e-6,
                err_msg=f"{cls.__name__} {name}",
            )
        if sd is not None:
            on_every_rank(comm, assert_state_close, sd, ref.state_dict(), rtol=1e-5, atol=1e-6)
        else:
            on_every_rank(comm, lambda: None)


def check_skip_nonfinite(comm):
    """A NaN on one rank only skips the step on every rank, as one process skips it; without
    the skip, clipping makes every parameter NaN on every rank, as one process's does."""
    rank, world = comm.Get_rank(), comm.Get_size()
    params = model()
    before = copy(params)
    zero = distributed.ZeroRedundancyOptimizer(params, optim.Adam, comm, skip_if_nonfinite=True)
    grads = rank_grads(params, 1, rank, world)
    if rank == world - 1:
        grads["W2"][3, 4] = np.nan
    assert zero.step(grads) is False and zero.skipped_steps == 1
    assert_identical(params, before)
    assert zero.step(rank_grads(params, 1, rank, world)) is True
    # without the skip, clipping to a NaN norm makes every gradient NaN, as clip_grad_norm_ does
    params = model()
    zero = distributed.ZeroRedundancyOptimizer(params, optim.SGD, comm, lr=0.1, max_grad_norm=1.0)
    assert zero.step(grads) is True
    assert all(np.isnan(p).all() for p in params.values())


def check_two_dtypes(comm):
    """float32 and float64 parameters in one model: one flat space each."""
    rank, world = comm.Get_rank(), comm.Get_size()
    params, ref_params = model(np.float32), model(np.float32)
    params["W2"], ref_params["W2"] = (model(np.float64)["W2"] for _ in range(2))
    zero = distributed.ZeroRedundancyOptimizer(params, optim.AdamW, comm, lr=1e-2)
    ref = optim.AdamW(ref_params, lr=1e-2)
    for step in range(1, STEPS + 1):
        zero.step(rank_grads(params, step, rank, world))
        ref.step(mean_grads(params, step, world))
    same_on_every_rank(comm, params)
    for name in params:
        rtol = 1e-12 if params[name].dtype == np.float64 else 1e-5
        np.testing.assert_allclose(params[name], ref_params[name], rtol=rtol, atol=1e-6)


def check_masters_bfloat16(comm):
    """bfloat16 parameters with float32 masters, rounded to nearest: deterministic, so the
    masters match one process's; the parameters are the masters rounded."""
    params, ref_params, sd, ref, _ = run_pair(
        comm, optim.AdamW, dict(lr=1e-2), BF16, grad_dtype=np.float32, master_weights=True
    )
    for name in params:
        a, b = params[name].astype(np.float32), ref_params[name].astype(np.float32)
        np.testing.assert_allclose(a, b, rtol=2**-7, atol=1e-6, err_msg=name)
    if sd is not None:
        on_every_rank(comm, assert_state_close, sd, ref.state_dict(), rtol=1e-5, atol=1e-6)
    else:
        on_every_rank(comm, lambda: None)


LR = 1e-2  # the learning rate of check_int8_state's runs


def check_int8_state(comm):
    """int8 state (bfloat16 params with masters, stochastic rounding; float32 params): on one
    rank the same bits as one process; on more, a different random stream, so close."""
    world = comm.Get_size()
    for dtype, options in [
        (BF16, dict(master_weights=True, stochastic_rounding=True)),
        (np.float32, {}),
        (BF16, dict(stochastic_rounding=True)),
    ]:
        params, ref_params, sd, ref, zero = run_pair(
            comm, optim.AdamW, dict(lr=LR), dtype, state_dtype="int8", seed=7, **options
        )
        for name in params:
            a, b = params[name].astype(np.float32), ref_params[name].astype(np.float32)
            if world == 1:
                assert_same_bits(a, b, name)
                continue
            # Other random bits, not a misplaced shard: each step's stochastic rounding can land
            # the two a bfloat16 ulp further apart, and their updates differ by under lr in all
            # (other int8 codes). A flat 0.05 was 3.2 ulps at magnitudes 2-4: 15 % of seeds
            # reached 4 there, with any hash of the random bits.
            # (the ulp of the largest magnitude the element can have had on the way)
            largest = np.maximum(abs(a), abs(b)) + STEPS * LR
            ulp = np.ldexp(np.float32(1), np.frexp(largest)[1] - 8)
            bound = STEPS * (ulp if dtype == BF16 else 0) + LR
            assert np.all(np.abs(a - b) <= bound), (name, np.max(np.abs(a - b) / bound))
        on_every_rank(comm, check_int8_sd, sd, ref, dtype, options, world)


def check_int8_sd(sd, ref, dtype, options, world):
    if sd is None:
        return
    # one rank: the same bits; more: other random bits, so the masters are only close
    tolerance = dict(rtol=0, atol=0) if world == 1 else dict(rtol=0.02, atol=5e-3)
    assert_state_close(sd, ref.state_dict(), **tolerance)
    if world == 1:
        want = ref.state_dict()["state"]
        for name, entry in sd["state"].items():
            assert_identical(entry, want[name], name)  # int8 codes and scales, masters, step
    fresh = optim.AdamW(groups(model(dtype)), lr=1e-2, state_dtype="int8", **options)
    fresh.load_state_dict(sd)
    assert fresh.seed == 7


def check_int8_load_order(comm):
    """An int8 checkpoint saved over C- or F-ordered parameters loads into ZeRO over either
    order as into one process: bit for bit where the orders agree, re-encoded otherwise (its
    scales follow its codes' memory order, not the parameter's)."""
    spec = [("W", (40, 30), "F"), ("b", (300,), "C")]
    for saved, loaded in [("F", "C"), ("C", "F"), ("F", "F")]:
        at = {"W": saved}
        params = model(spec=[(n, s, at.get(n, o)) for n, s, o in spec])
        saver = optim.AdamW(params, lr=1e-2, state_dtype="int8", seed=3)
        for step in range(1, 4):
            saver.step(mean_grads(params, step, 1))
        sd = saver.state_dict()
        target = [(n, s, loaded if n == "W" else o) for n, s, o in spec]
        ref = optim.AdamW(model(spec=target), lr=1e-2, state_dtype="int8")
        ref.load_state_dict(sd)
        zero = distributed.ZeroRedundancyOptimizer(
            model(spec=target), optim.AdamW, comm, lr=1e-2, state_dtype="int8"
        )
        zero.load_state_dict(sd)
        zero.consolidate_state_dict(to=0)
        if comm.Get_rank() == 0:
            got, want = zero.state_dict()["state"], ref.state_dict()["state"]
            for name, entry in want.items():
                assert_identical(got[name], entry, f"{name} saved {saved}, loaded {loaded}")


def check_schedule_free(comm):
    """Schedule-Free: the groups' k, lr_max and weight_sum advance as in one process (the
    same bits on one rank), checkpoints carry them, and train()/eval() switch every slice."""
    rank, world = comm.Get_rank(), comm.Get_size()
    for cls, hyper in [
        (optim.ScheduleFreeAdamW, dict(lr=1e-2, warmup_steps=2)),
        (optim.ScheduleFreeSGD, dict(lr=0.1, weight_lr_power=1.0)),
    ]:
        for dtype in (np.float32, np.float64):
            params, ref_params, sd, ref, zero = run_pair(comm, cls, hyper, dtype)
            for switch in ("eval", "train"):
                getattr(zero, switch)()
                getattr(ref, switch)()
                same_on_every_rank(comm, params)
                for name in params:
                    if world == 1:
                        assert_same_bits(params[name], ref_params[name], name)
                    else:
                        rtol = 1e-12 if dtype == np.float64 else 1e-5
                        np.testing.assert_allclose(
                            params[name], ref_params[name], rtol=rtol, atol=rtol, err_msg=name
                        )
            for mine, want in zip(zero.param_groups, ref.param_groups):
                assert mine["k"] == want["k"] == STEPS, (mine["k"], want["k"])
                for key in ("lr_max", "weight_sum", "train_mode"):
                    assert mine[key] == want[key], (key, mine[key], want[key])
            if sd is not None:
                for mine, want in zip(sd["param_groups"], ref.state_dict()["param_groups"]):
                    assert [mine[k] for k in ("k", "lr_max", "weight_sum")] == [
                        want[k] for k in ("k", "lr_max", "weight_sum")
                    ]
            # its checkpoint, loaded into a fresh ZeRO optimizer, steps on as it does
            zero.consolidate_state_dict(to=0)
            saved = comm.bcast(zero.state_dict() if rank == 0 else None, root=0)
            twin_params = copy(params)
            twin = distributed.ZeroRedundancyOptimizer(groups(twin_params), cls, comm, **hyper)
            twin.load_state_dict(saved)
            for z, p in ((zero, params), (twin, twin_params)):
                z.step(rank_grads(p, 8, rank, world))
            assert_identical(params, twin_params)
            assert [g["k"] for g in twin.param_groups] == [g["k"] for g in zero.param_groups]
            zero.eval()
            expect_all(
                comm,
                lambda z=zero, p=params: z.step(rank_grads(p, 9, rank, world)),
                RuntimeError,
                "eval mode",
            )
    expect_all(
        comm,
        distributed.ZeroRedundancyOptimizer(model(), optim.Adam, comm).eval,
        TypeError,
        "Adam has no train and eval modes",
    )


def check_one_rank_bits(comm):
    """On one rank, one process's bits where no other stream of random bits enters: clipping
    sums squares per gradient dtype over the tensors as clip_grad_norm_ does and stores the
    scaled bfloat16 gradients in bfloat16; stochastic rounding with bfloat16 and float32
    gradients makes one process's fused calls (by gradient dtype) and so draws its bits."""
    rank, world = comm.Get_rank(), comm.Get_size()
    spec = [("a", (640,), "C"), ("b", (300,), "C"), ("c", (777,), "C")]
    for seed in range(6):  # sums of squares of the tensors or of their concatenation differ
        params = model(np.float64, spec, seed)
        ref_params = copy(params)
        zero = distributed.ZeroRedundancyOptimizer(
            params, optim.SGD, comm, lr=0.1, max_grad_norm=1.0
        )
        ref = optim.SGD(ref_params, lr=0.1, max_grad_norm=1.0)
        for step in range(10 * seed, 10 * seed + 3):
            zero.step(rank_grads(params, step, rank, world))
            ref.step(mean_grads(params, step, world))
        if world == 1:
            assert_identical(params, ref_params, f"seed {seed}")
    # both dtypes in one group: one process makes a fused call for each
    mixed = {n: (BF16 if i % 2 else np.float32) for i, (n, _, _) in enumerate(SPEC)}
    for dtype, grad_dtype, options in [
        (np.float32, None, dict(max_grad_norm=1.0)),
        (BF16, None, dict(max_grad_norm=1.0)),
        (BF16, mixed, dict(max_grad_norm=1.0)),
        (BF16, mixed, dict(stochastic_rounding=True, seed=5)),
    ]:
        params, ref_params, _, _, _ = run_pair(
            comm, optim.AdamW, dict(lr=1e-2), dtype, grad_dtype=grad_dtype, **options
        )
        if comm.Get_size() == 1:
            for name in params:
                assert_same_bits(params[name], ref_params[name], f"{name} {dtype} {options}")


def check_memory_balance(comm):
    """The largest rank holds at most 1/N of the state plus one block (plus a block's scales)."""
    rank, world = comm.Get_rank(), comm.Get_size()
    spec = [
        ("a", (3000,), "C"),
        ("b", (5000,), "C"),
        ("c", (700,), "C"),
        ("d", (1,), "C"),
        ("e", (2049,), "C"),
    ]
    for dtype, options, per_element in [
        (np.float32, {}, 8),
        (BF16, dict(master_weights=True, state_dtype="int8"), 6),
    ]:
        params = model(dtype, spec)
        ref_params = copy(params)
        zero = distributed.ZeroRedundancyOptimizer(params, optim.AdamW, comm, **options)
        ref = optim.AdamW(ref_params, **options)
        grads = rank_grads(params, 1, rank, world, np.float32)
        zero.step(grads)
        ref.step(grads)
        full = distributed._state_bytes(ref.state)
        sizes = comm.allgather(zero.state_bytes())
        bound = full / world + BLOCK * per_element + 2 * 4
        assert max(sizes) <= bound, (sizes, full, bound)
        assert sum(sizes) == full, (sizes, full)


def check_errors(comm):
    rank, world = comm.Get_rank(), comm.Get_size()
    # parameters that differ across ranks: names, shapes, order
    if world > 1:
        for change, words in [
            (lambda p: {("X" if n == "b2" else n): v for n, v in p.items()}, "'X'"),
            (lambda p: {**p, "b1": np.zeros(41, np.float32)}, "(41,)"),
            (lambda p: dict(reversed(list(p.items()))), "parameter 0"),
            (lambda p: {n: v.astype(np.float64) for n, v in p.items()}, "float64"),
        ]:
            params = model()
            if rank == 1:
                params = change(params)
            try:
                distributed.ZeroRedundancyOptimizer(params, optim.Adam, comm)
            except ValueError as e:
                assert "every rank must pass the same parameters" in str(e), e
                assert "rank 1" in str(e) and words in str(e), e
            else:
                raise AssertionError("mismatched parameters were not detected")
        params = model()
        try:  # a different hyperparameter
            distributed.ZeroRedundancyOptimizer(params, optim.Adam, comm, lr=0.1 * (rank + 1))
        except ValueError as e:
            assert "hyperparameters" in str(e), e
        else:
            raise AssertionError("mismatched hyperparameters were not detected")
    # a bad gradient, a bad hyperparameter, None gradients on some ranks only: every rank
    # raises, nothing changes
    params = model()
    before = copy(params)
    zero = distributed.ZeroRedundancyOptimizer(params, optim.Adam, comm)
    last = world - 1
    grads = rank_grads(params, 1, rank, world)
    bad = dict(grads, W1=np.zeros((3, 3), np.float32)) if rank == last else grads
    expect(comm, lambda: zero.step(bad), ValueError, "gradient of 'W1'", last)
    zero.param_groups[0]["lr"] = -1.0 if rank == last else 1e-3
    expect(comm, lambda: zero.step(grads), ValueError, "Invalid learning rate", last)
    zero.param_groups[0]["lr"] = 1e-3
    if world > 1:
        nones = dict(grads, b2=None) if rank == last else grads
        try:
            zero.step(nones)
        except ValueError as e:
            assert "['b2'] are None on some ranks" in str(e), e
        else:
            raise AssertionError("None gradients on some ranks were not detected")
    assert_identical(params, before)
    assert zero.optim.state == {}
    try:
        zero.state_dict()
    except RuntimeError as e:
        assert "consolidate_state_dict" in str(e)
    else:
        raise AssertionError("state_dict() without consolidation")
    assert zero.step(grads) is True


def check_elementwise_only(comm):
    """Classes whose update reads whole tensors (LAMB's norms, Muon's and Adafactor's matrix
    updates) would be wrong on flat slices: refused, naming the classes ZeRO takes."""
    for cls in (optim.LAMB, optim.Adafactor, optim.Muon):
        params = {"W": model()["W1"]}
        before = copy(params)
        expect_all(
            comm,
            lambda c=cls, p=params: distributed.ZeroRedundancyOptimizer(p, c, comm),
            ValueError,
            f"element-wise updates only; {cls.__name__} computes",
        )
        try:
            distributed.ZeroRedundancyOptimizer(params, cls, comm)
        except ValueError as e:
            takes = str(e).split("It takes ")[1].split(", ")
            assert "AdamW" in takes and "ScheduleFreeSGD" in takes and "LAMB" not in takes, e
        assert_identical(params, before)


def expect(comm, call, kind, words, failing):
    """``call`` raises on every rank: ``kind`` on the failing one, RuntimeError naming it on
    the others."""
    rank = comm.Get_rank()
    try:
        call()
    except Exception as e:
        if rank == failing:
            assert isinstance(e, kind) and words in str(e), repr(e)
        else:
            assert isinstance(e, RuntimeError), repr(e)
            assert f"failed on rank {failing}" in str(e) and words in str(e), e
    else:
        raise AssertionError(f"no error on rank {rank}")


def check_allreduce_mean(comm):
    rank, world = comm.Get_rank(), comm.Get_size()
    rng = np.random.default_rng(0)
    shapes = [
        ((100,), np.float32, "C"),
        ((7, 3), np.float64, "C"),
        ((300,), BF16, "C"),
        ((5, 4), np.float32, "F"),
        ((), np.float16, "C"),
    ]
    base = [np.asarray(rng.standard_normal(s), order=o).astype(d, order="K") for s, d, o in shapes]

    def mine(r):
        return [np.asarray(b.astype(np.float64) * (r + 1)).astype(b.dtype, order="K") for b in base]

    for bucket in (8, 64, distributed.DEFAULT_BUCKET_BYTES):
        grads = mine(rank)
        grads.insert(2, None)
        distributed.allreduce_mean_(grads, comm, bucket_bytes=bucket)
        assert grads[2] is None
        grads = [g for g in grads if g is not None]
        digests = comm.allgather([digest({"g": g}) for g in grads])
        assert all(d == digests[0] for d in digests), "allreduce_mean_ differs across ranks"
        for g, b in zip(grads, base):
            want = np.mean(
                [
                    m.astype(np.float64)
                    for m in [mine(r)[base_index(base, b)] for r in range(world)]
                ],
                axis=0,
            )
            rtol = {np.dtype(np.float64): 1e-14, np.dtype(np.float32): 1e-6}.get(g.dtype, 2**-7)
            np.testing.assert_allclose(g.astype(np.float64), want, rtol=rtol, atol=1e-3 * rtol)
            assert g.flags.f_contiguous == b.flags.f_contiguous or g.ndim < 2

    last = world - 1
    grads = mine(rank)
    extra = [*grads, np.zeros(3, np.float32)] if rank == last else grads
    try:
        distributed.allreduce_mean_(extra, comm)
    except ValueError as e:
        assert world > 1 and "different numbers of gradient elements" in str(e), e
    else:
        assert world == 1, "different gradients were not detected"
    bad = [*grads, "x"] if rank == last else grads
    expect(comm, lambda: distributed.allreduce_mean_(bad, comm), TypeError, "grads[5]", last)
    assert_identical({"grads": grads}, {"grads": mine(rank)})


def base_index(base, b):
    return next(i for i, x in enumerate(base) if x is b)


def check_save(comm, out: Path):
    """At N = 2: 3 steps, checkpoints (one file and shards), 3 more steps: the uninterrupted
    run that check_resume continues at other world sizes."""
    rank, world = comm.Get_rank(), comm.Get_size()
    for label, dtype, options in CHECKPOINTS:
        params = model(dtype)
        zero = distributed.ZeroRedundancyOptimizer(
            groups(params), optim.AdamW, comm, lr=1e-2, seed=3, **options
        )
        for step in range(1, 7):
            if step == 4:
                zero.save(out / f"{label}.npz")
                zero.save_shards(out / f"{label}-shards.json")
                if label == "float64":  # a second save replaces the first's shard files
                    first = sorted(p.name for p in out.glob(f"{label}-shards.json.*"))
                    zero.save_shards(out / f"{label}-shards.json")
                    second = sorted(p.name for p in out.glob(f"{label}-shards.json.*"))
                    assert len(first) == len(second) == world and not set(first) & set(second)
                if rank == 0:
                    np.savez(out / f"{label}-params.npz", **bits(params))
            zero.step(rank_grads(params, step, rank, world, grad_dtype(dtype)))
        if rank == 0:
            np.savez(out / f"{label}-final.npz", **bits(params))


CHECKPOINTS = [
    ("float64", np.float64, {}),
    ("int8", BF16, dict(master_weights=True, state_dtype="int8", stochastic_rounding=True)),
]


def grad_dtype(dtype):
    return np.float32 if dtype == BF16 else None


def bits(params):
    return {n: (p.view(np.uint16) if p.dtype == BF16 else p) for n, p in params.items()}


def unbits(data, dtype):
    return {n: (data[n].view(BF16) if dtype == BF16 else data[n]) for n, _, _ in SPEC}


def check_resume(comm, out: Path):
    """Resume N = 2's checkpoints here, from the file and from the shards (the same state),
    and continue like the uninterrupted run."""
    rank, world = comm.Get_rank(), comm.Get_size()
    for label, dtype, options in CHECKPOINTS:
        params = unbits(np.load(out / f"{label}-params.npz"), dtype)
        shards_params = copy(params)
        zero = distributed.ZeroRedundancyOptimizer.load(out / f"{label}.npz", groups(params), comm)
        other = distributed.ZeroRedundancyOptimizer(
            groups(shards_params), optim.AdamW, comm, **options
        )
        other.load_shards(out / f"{label}-shards.json")
        assert_state_close(other.optim.state_dict(), zero.optim.state_dict(), rtol=0)
        for name, entry in zero.optim.state.items():
            for key, value in entry.items():
                if isinstance(value, QuantizedState):
                    assert np.array_equal(value.codes, other.optim.state[name][key].codes)
        assert other.param_groups[1]["lr"] == 3e-3 and zero.optim.seed == other.optim.seed
        for step in range(4, 7):
            zero.step(rank_grads(params, step, rank, world, grad_dtype(dtype)))
            other.step(rank_grads(shards_params, step, rank, world, grad_dtype(dtype)))
        same_on_every_rank(comm, params)
        assert digest(params) == digest(shards_params)
        final = unbits(np.load(out / f"{label}-final.npz"), dtype)
        for name in params:
            a, b = params[name].astype(np.float64), final[name].astype(np.float64)
            if label == "float64":
                np.testing.assert_allclose(a, b, rtol=1e-12, atol=1e-14, err_msg=name)
            else:  # another world size draws other random bits
                np.testing.assert_allclose(a, b, rtol=0.02, atol=5e-3, err_msg=name)
        if world == 1:  # a plain optimizer resumes the same checkpoint to the same bits
            plain_params = unbits(np.load(out / f"{label}-params.npz"), dtype)
            plain = optim.Optimizer.load(out / f"{label}.npz", groups(plain_params))
            for step in range(4, 7):
                plain.step(rank_grads(plain_params, step, 0, 1, grad_dtype(dtype)))
            assert digest(plain_params) == digest(params), label


def expect_all(comm, call, kind, words):
    """``call`` raises ``kind`` with ``words`` on every rank alike."""
    try:
        call()
    except kind as e:
        assert words in str(e), e
    else:
        raise AssertionError(f"no {kind.__name__} on rank {comm.Get_rank()}")


def check_agreement(comm):
    """What one rank alone does differently raises on every rank and changes nothing, where it
    would hang or silently corrupt the parameters."""
    rank, world = comm.Get_rank(), comm.Get_size()
    last = world - 1
    if world > 1:
        # options that add an Allreduce on some ranks only, or change the local optimizer
        for option in [
            dict(max_grad_norm=1.0),
            dict(skip_if_nonfinite=True),
            dict(seed=7),
            dict(stochastic_rounding=True),
        ]:
            mine = option if rank == last else {}
            expect_all(
                comm,
                lambda m=mine: distributed.ZeroRedundancyOptimizer(model(), optim.Adam, comm, **m),
                ValueError,
                "options",
            )
        # parameter values
        params = model()
        if rank == last:
            params["b2"][3] += 1
        expect_all(
            comm,
            lambda: distributed.ZeroRedundancyOptimizer(params, optim.Adam, comm),
            ValueError,
            "values of parameter 'b2' differ",
        )
    params = model()
    zero = distributed.ZeroRedundancyOptimizer(groups(params), optim.Adam, comm, lr=1e-2)
    zero.step(rank_grads(params, 1, rank, world))
    before, state = copy(params), zero.optim.state_dict()
    grads = rank_grads(params, 2, rank, world)
    if world > 1:
        # a parameter frozen on one rank only, a schedule stepped on one rank only, clipping
        # switched on on one rank only
        if rank == last:
            zero.freeze("W2")
        expect_all(comm, lambda: zero.step(grads), ValueError, "['W2'] are frozen on some")
        zero.unfreeze("W2")
        zero.param_groups[1]["lr"] = 1e-3 if rank == last else 3e-3
        expect_all(comm, lambda: zero.step(grads), ValueError, "hyperparameters of groups [1]")
        zero.param_groups[1]["lr"] = 3e-3
        zero._full.max_grad_norm = 1.0 if rank == last else None
        expect_all(comm, lambda: zero.step(grads), ValueError, "max_grad_norm")
        zero._full.max_grad_norm = None
        assert_identical(params, before)
        assert_state_close(zero.optim.state_dict(), state, rtol=0)
        # consolidate_state_dict to different ranks, or to a bad one on one rank only
        expect_all(comm, lambda: zero.consolidate_state_dict(to=rank), ValueError, "different")
        to = world if rank == last else 0
        expect(comm, lambda: zero.consolidate_state_dict(to=to), ValueError, "to:", last)
        # allreduce_mean_ with another memory order on one rank
        g = np.arange(12.0).reshape(3, 4)
        g = np.asfortranarray(g) if rank == last else g
        expect_all(comm, lambda: distributed.allreduce_mean_([g], comm), ValueError, "orders")
        # allreduce_mean_ with another bucket size on one rank
        gs = [np.full(1000, rank + 1.0, np.float32), np.full(1000, 10.0 * rank, np.float32)]
        kept = [g.copy() for g in gs]
        expect_all(
            comm,
            lambda: distributed.allreduce_mean_(gs, comm, bucket_bytes=4096 * (1 + (rank == last))),
            ValueError,
            "different bucket_bytes",
        )
        assert_identical({"g": gs}, {"g": kept})
        # bucket sizes past any buffer's, past an int64 too: one bucket on every rank
        huge = 2**64 if rank == last else 2**70
        distributed.allreduce_mean_(gs, comm, bucket_bytes=huge)
        mean = np.mean([np.full(1000, r + 1.0) for r in range(world)], axis=0)
        np.testing.assert_allclose(gs[0], mean, rtol=1e-6)
        gs = [g.copy() for g in kept]
        expect_all(
            comm,
            lambda: distributed.allreduce_mean_(gs, comm, bucket_bytes=huge if rank else 4096),
            ValueError,
            "different bucket_bytes",
        )
        assert_identical({"g": gs}, {"g": kept})
        # a bfloat16 model's gradient in float32 on one rank only: the local optimizers would
        # make other fused calls (grouped by gradient dtype)
        low = model(ml_dtypes.bfloat16)
        lazy = distributed.ZeroRedundancyOptimizer(low, optim.Adam, comm, master_weights=True)
        dtypes = {"b1": np.float32} if rank == last else {}
        low_grads = rank_grads(low, 1, rank, world, dtypes)
        kept = copy(low)
        expect_all(comm, lambda: lazy.step(low_grads), ValueError, "gradients' dtypes differ")
        assert_identical(low, kept)
    # every rank alike: frozen parameters keep their values
    zero.freeze("W2")
    assert zero.step(grads) is True
    assert_same_bits(params["W2"], before["W2"])
    assert not np.array_equal(params["W1"], before["W1"])
    same_on_every_rank(comm, params)


def check_checkpoint_safety(comm, out: Path):
    """state_dict() copies; a load failing on one rank changes no rank; save_shards removes only
    its own shard files; load_shards names the first mismatching parameter."""
    rank, world = comm.Get_rank(), comm.Get_size()
    last = world - 1
    folder = out / f"safety-{world}"
    if rank == 0:
        folder.mkdir(exist_ok=True)
    comm.Barrier()
    params = model()
    zero = distributed.ZeroRedundancyOptimizer(groups(params), optim.Adam, comm, lr=1e-2)
    zero.step(rank_grads(params, 1, rank, world))
    zero.consolidate_state_dict(to=0)
    if rank == 0:
        sd = zero.state_dict()
        sd["state"]["W1"]["exp_avg"][...] = 123.0
        assert not (zero.state_dict()["state"]["W1"]["exp_avg"] == 123.0).any()
    zero.reset_state("b1")
    expect_all(comm, zero.state_dict, RuntimeError, "consolidate_state_dict")
    zero.consolidate_state_dict(to=0)
    zero.freeze("b1")
    expect_all(comm, zero.state_dict, RuntimeError, "consolidate_state_dict")
    zero.unfreeze("b1")
    zero.consolidate_state_dict(to=0)
    sd = comm.bcast(zero.state_dict() if rank == 0 else None, root=0)
    # a checkpoint with other hyperparameters, broken on the last rank only: nothing changes
    state = zero.optim.state_dict()
    changed = {**sd, "param_groups": [dict(g, lr=0.5) for g in sd["param_groups"]]}
    if rank == last:
        changed = {**changed, "optimizer": "SGD"}
    expect(comm, lambda: zero.load_state_dict(changed), ValueError, "SGD", last)
    assert zero.param_groups[0]["lr"] == 1e-2 and zero.optim.param_groups[0]["lr"] == 1e-2
    assert_state_close(zero.optim.state_dict(), state, rtol=0)
    # save_shards: the old manifest names a file outside the folder and a stranger
    path = folder / "ckpt.json"
    zero.save_shards(path)
    victim, stranger = out / f"victim-{world}.txt", folder / "notes.txt"
    if rank == 0:
        victim.write_text("keep")
        stranger.write_text("keep")
        manifest = json.loads(path.read_text())
        manifest["files"] += [f"../{victim.name}", stranger.name]
        path.write_text(json.dumps(manifest))
        first = set(manifest["files"][:world])
    comm.Barrier()
    zero.save_shards(path)
    if rank == 0:
        assert victim.exists() and stranger.exists()
        assert not any((folder / name).exists() for name in first)
        assert len(list(folder.glob("ckpt.json.*.npz"))) == world
    comm.Barrier()
    # load_shards into other shapes or orders of the same sizes
    for change, words in [
        ({"W1": ((40, 64), "C")}, "'W1': saved with shape [64, 40], here [40, 64]"),
        ({"W2": ((40, 30), "C")}, "'W2': saved with order 'F', here 'C'"),
    ]:
        spec = [(n, *change.get(n, (s, o))) for n, s, o in SPEC]
        other = distributed.ZeroRedundancyOptimizer(
            groups(model(spec=spec)), optim.Adam, comm, lr=1e-2
        )
        expect_all(comm, lambda other=other: other.load_shards(path), Exception, words)


def expect_somewhere(comm, call, kind, words, failing):
    """``call`` raises on every rank (no rank left waiting): ``kind`` with ``words`` where
    ``failing``, RuntimeError naming a failed rank elsewhere."""
    try:
        call()
    except (kind, RuntimeError) as e:
        assert words in str(e) if failing else "failed on rank" in str(e), e
    else:
        raise AssertionError(f"no error on rank {comm.Get_rank()}")


def check_audit_2026_12_05(comm, out: Path):
    """What an audit found: each refused on every rank, nothing changed, no rank left waiting.
    - parameters that share memory (stepped once where one process steps twice);
    - save_shards with a NumPy scalar hyperparameter (its manifest failed, shards left behind);
      with a path one rank lacks (the others waited in bcast);
    - load_shards of a manifest one rank reads as JSON null (an AttributeError there, a hang);
    - a Schedule-Free eval() with beta1 = 0, or with a parameter made read-only (the job was
      aborted; on one rank the mode was left switched)."""
    rank, world = comm.Get_rank(), comm.Get_size()
    base = np.zeros(1000, np.float32)
    expect_all(
        comm,
        lambda: distributed.ZeroRedundancyOptimizer(
            {"a": base[:600], "b": base[400:]}, optim.SGD, comm, lr=0.1
        ),  # fmt: skip
        ValueError,
        "parameter 'a' and parameter 'b' share memory",
    )
    folder = Path(comm.bcast(str(out) if rank == 0 else None, root=0)) / "audit"
    if rank == 0:
        folder.mkdir(exist_ok=True)
    comm.Barrier()
    params = model()
    zero = distributed.ZeroRedundancyOptimizer(params, optim.AdamW, comm, lr=np.float32(5e-4))
    zero.step(rank_grads(params, 1, rank, world))
    path = folder / f"shards-{world}.json"
    zero.save_shards(path)
    comm.Barrier()
    twin_params = copy(params)
    twin = distributed.ZeroRedundancyOptimizer(twin_params, optim.AdamW, comm, lr=5e-4)
    twin.load_shards(path)
    for z, p in ((zero, params), (twin, twin_params)):
        z.step(rank_grads(p, 2, rank, world))
    assert_identical(params, twin_params)
    before = sorted(os.listdir(folder))
    comm.Barrier()
    last = rank == world - 1
    expect_somewhere(comm, lambda: zero.save_shards(None if last else path), TypeError,
                     "NoneType", last)  # fmt: skip
    bad = folder / f"null-{world}-{rank}.json"
    bad.write_text("null" if rank == world - 1 else path.read_text())
    expect_somewhere(comm, lambda: twin.load_shards(bad), ValueError, "manifest", rank == world - 1)
    bad.unlink()
    comm.Barrier()
    assert sorted(os.listdir(folder)) == before
    for cls, hyper in [(optim.ScheduleFreeAdamW, dict(betas=(0.0, 0.999))),
                       (optim.ScheduleFreeSGD, dict(momentum=0.9))]:  # fmt: skip
        params = model()
        zero = distributed.ZeroRedundancyOptimizer(params, cls, comm, lr=0.1, **hyper)
        zero.step(rank_grads(params, 1, rank, world))
        if cls is optim.ScheduleFreeSGD:
            params["W2"].flags.writeable = rank != world - 1
        before = copy(params)
        if cls is optim.ScheduleFreeAdamW:
            expect_all(comm, zero.eval, ValueError, "eval() with betas 0.0")
        else:
            expect_somewhere(comm, zero.eval, ValueError, "'W2': array is read-only",
                             rank == world - 1)  # fmt: skip
            params["W2"].flags.writeable = True
        assert_identical(params, before)
        assert all(g["train_mode"] for g in zero.param_groups)
    zero.eval()  # now it can: one switch, not two
    ref_params = model()
    ref = distributed.ZeroRedundancyOptimizer(ref_params, optim.ScheduleFreeSGD, comm, lr=0.1,
                                              momentum=0.9)  # fmt: skip
    ref.step(rank_grads(ref_params, 1, rank, world))
    ref.eval()
    assert_identical(params, ref_params)


CASES = {
    "every_optimizer_float64": check_every_optimizer_float64,
    "every_optimizer_float32": check_every_optimizer_float32,
    "skip_nonfinite": check_skip_nonfinite,
    "two_dtypes": check_two_dtypes,
    "masters_bfloat16": check_masters_bfloat16,
    "int8_state": check_int8_state,
    "int8_load_order": check_int8_load_order,
    "schedule_free": check_schedule_free,
    "elementwise_only": check_elementwise_only,
    "one_rank_bits": check_one_rank_bits,
    "memory_balance": check_memory_balance,
    "errors": check_errors,
    "allreduce_mean": check_allreduce_mean,
    "agreement": check_agreement,
}
CHECKPOINT_CASES = {
    "save": (check_save, [2]),
    "resume": (check_resume, [1, 3]),
    "checkpoint_safety": (check_checkpoint_safety, [1, 2, 3, 4]),
    "audit_2026_12_05": (check_audit_2026_12_05, [1, 2, 3]),
}


def run_checks(comm, out: Path) -> None:
    world = comm.Get_size()
    cases = dict(CASES)
    cases.update({n: c for n, (c, sizes) in CHECKPOINT_CASES.items() if world in sizes})
    results = {}
    for name, check in cases.items():
        try:
            check(comm, out) if name in CHECKPOINT_CASES else check(comm)
            error = None
        except Exception:
            error = traceback.format_exc()
        errors = comm.gather(error, root=0)
        results[name] = [f"rank {r}: {e}" for r, e in enumerate(errors or []) if e] or None
    if comm.Get_rank() == 0:
        (out / f"results-{world}.json").write_text(json.dumps(results, indent=1))


def run_abort(comm, out: Path) -> None:
    """Rank 1 raises inside the second step, after the gradients' reduce-scatter."""
    rank, world = comm.Get_rank(), comm.Get_size()
    params = model()
    zero = distributed.ZeroRedundancyOptimizer(params, optim.Adam, comm)
    zero.step(rank_grads(params, 1, rank, world))
    if rank == 1:

        def planted(grads):
            raise RuntimeError("planted failure")

        zero.optim.step = planted
    zero.step(rank_grads(params, 2, rank, world))
    comm.Barrier()
    (out / f"not-aborted-{rank}").write_text("")


def run_uncaught(comm, out: Path) -> None:
    """Rank 1 raises in its own code while rank 0 is in step(): under ``python -m mpi4py``
    the job ends."""
    rank, world = comm.Get_rank(), comm.Get_size()
    params = model()
    zero = distributed.ZeroRedundancyOptimizer(params, optim.Adam, comm)
    if rank == 1:
        raise RuntimeError("planted failure in the training loop")
    zero.step(rank_grads(params, 1, rank, world))
    (out / f"not-aborted-{rank}").write_text("")


if __name__ == "__main__":
    from mpi4py import MPI

    mode, out = sys.argv[1], Path(sys.argv[2])
    # a hang shows where each rank waits, before the launcher's timeout kills the job
    faulthandler.dump_traceback_later(float(os.environ.get("MPI_CHECKS_TIMEOUT", 240)), exit=True)
    os.makedirs(out, exist_ok=True)
    {"checks": run_checks, "abort": run_abort, "uncaught": run_uncaught}[mode](MPI.COMM_WORLD, out)
