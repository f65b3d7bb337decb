"""Learning-rate schedules: their formulas, resuming, and torch.optim.lr_scheduler."""

from __future__ import annotations

import copy
import json
import math

import numpy as np
import pytest
from support import assert_same_bits

from fusedopt import optim, schedules

try:
    import torch
except ImportError:  # compared only where torch is installed
    torch = None

STEPS = 40
# (our schedule, its kwargs, the torch equivalent as a function of the torch optimizer)
CASES = {
    "constant": (
        schedules.ConstantLR,
        dict(factor=0.5, total_iters=7),
        lambda o: torch.optim.lr_scheduler.ConstantLR(o, factor=0.5, total_iters=7),
    ),
    "step": (
        schedules.StepLR,
        dict(step_size=6, gamma=0.5),
        lambda o: torch.optim.lr_scheduler.StepLR(o, step_size=6, gamma=0.5),
    ),
    "exponential": (
        schedules.ExponentialLR,
        dict(gamma=0.93),
        lambda o: torch.optim.lr_scheduler.ExponentialLR(o, gamma=0.93),
    ),
    "cosine": (
        schedules.CosineAnnealingLR,
        dict(T_max=25, eta_min=0.001),
        lambda o: torch.optim.lr_scheduler.CosineAnnealingLR(o, T_max=25, eta_min=0.001),
    ),
    "linear": (
        schedules.LinearLR,
        dict(start_factor=0.1, total_iters=10),
        lambda o: torch.optim.lr_scheduler.LinearLR(o, start_factor=0.1, total_iters=10),
    ),
    "warmup+cosine": (
        schedules.WarmupCosineLR,
        dict(warmup_steps=8, total_steps=STEPS, eta_min=0.002, warmup_start_factor=0.05),
        lambda o: torch.optim.lr_scheduler.SequentialLR(
            o,
            [
                torch.optim.lr_scheduler.LinearLR(o, start_factor=0.05, total_iters=8),
                torch.optim.lr_scheduler.CosineAnnealingLR(o, T_max=STEPS - 8, eta_min=0.002),
            ],
            milestones=[8],
        ),
    ),
    "one-cycle": (
        schedules.OneCycleLR,
        dict(max_lr=0.5, total_steps=STEPS),
        lambda o: torch.optim.lr_scheduler.OneCycleLR(o, max_lr=0.5, total_steps=STEPS),
    ),
    "one-cycle 3-phase linear": (
        schedules.OneCycleLR,
        dict(max_lr=[0.5, 0.2], total_steps=STEPS, three_phase=True, anneal_strategy="linear"),
        lambda o: torch.optim.lr_scheduler.OneCycleLR(
            o, max_lr=[0.5, 0.2], total_steps=STEPS, three_phase=True, anneal_strategy="linear"
        ),
    ),
}


def sgd(lr=0.1):
    params = [np.zeros(3), np.zeros(2)]
    return optim.SGD(
        [{"params": [params[0]]}, {"params": [params[1]], "lr": lr / 2}], lr=lr, momentum=0.9
    )


def trace(sched, opt, steps=STEPS):
    lrs = [sched.get_last_lr()]
    for _ in range(steps):
        sched.step()
        lrs.append(sched.get_last_lr())
    return np.array(lrs)


def test_formulas():
    lrs = trace(schedules.CosineAnnealingLR(opt := sgd(), T_max=20, eta_min=0.01), opt)[:, 0]
    assert lrs[0] == 0.1 and lrs[10] == pytest.approx(0.055) and lrs[20] == pytest.approx(0.01)
    lrs = trace(schedules.StepLR(opt := sgd(), step_size=5, gamma=0.5), opt)[:, 0]
    assert lrs[4] == 0.1 and lrs[5] == 0.05 and lrs[10] == 0.025
    lrs = trace(schedules.LinearLR(opt := sgd(), start_factor=0.25, total_iters=4), opt)[:, 0]
    assert list(lrs[:6]) == pytest.approx([0.025, 0.04375, 0.0625, 0.08125, 0.1, 0.1])
    lrs = trace(schedules.WarmupCosineLR(opt := sgd(), warmup_steps=10, total_steps=30), opt)
    assert lrs[10, 0] == pytest.approx(0.1) and lrs[30, 0] == pytest.approx(0.0, abs=1e-15)
    assert lrs[10, 1] == pytest.approx(0.05)  # each group from its own base
    opt = optim.Adam([np.zeros(2)], lr=1.0)
    sched = schedules.OneCycleLR(opt, max_lr=1.0, total_steps=100, pct_start=0.25)
    lrs = trace(sched, opt, 99)[:, 0]
    assert lrs[0] == pytest.approx(1 / 25) and lrs[24] == pytest.approx(1.0)
    assert lrs[99] == pytest.approx(1 / 25 / 1e4)
    assert opt.param_groups[0]["betas"] == (pytest.approx(0.95), 0.999)


def test_reduce_on_plateau():
    opt = sgd()
    sched = schedules.ReduceLROnPlateau(opt, factor=0.5, patience=2, cooldown=1, min_lr=0.02)
    lrs = []
    for metric in [5, 4, 4, 4, 4, 4, 4, 4, 4, 4, 4, 3]:
        sched.step(metric)
        lrs.append(sched.get_last_lr()[0])
    assert lrs == pytest.approx(
        [0.1, 0.1, 0.1, 0.1, 0.05, 0.05, 0.05, 0.05, 0.025, 0.025, 0.025, 0.025]
    )
    for _ in range(10):
        sched.step(3)
    assert sched.get_last_lr() == [0.02, 0.02]  # floored at min_lr


@pytest.mark.parametrize("name", CASES)
def test_resume_from_state_dict(name):
    cls, kwargs, _ = CASES[name]
    opt = sgd()
    sched = cls(opt, **kwargs)
    for _ in range(10):
        sched.step()
    state = sched.state_dict()
    expected = trace(sched, opt, 15)
    opt2 = sgd()
    sched2 = cls(opt2, **kwargs)
    sched2.load_state_dict(state)
    assert_same_bits(trace(sched2, opt2, 15), expected)


@pytest.mark.skipif(torch is None, reason="torch not installed: torch comparison skipped")
# torch before 2.9's SequentialLR starts its next schedule with step(0), which warns that
# step's epoch is deprecated (pytorch#149392): torch's warning, not the schedule's.
@pytest.mark.filterwarnings("ignore:The epoch parameter in:UserWarning")
@pytest.mark.parametrize("name", CASES)
def test_matches_torch(name):
    """The same learning rate (and momentum, for one-cycle) at every step as torch's schedule
    over the same optimizer; rtol 1e-12 as torch updates some schedules recursively."""
    cls, kwargs, make_torch = CASES[name]
    opt = sgd()
    sched = cls(opt, **kwargs)
    weights = [torch.zeros(3, requires_grad=True), torch.zeros(2, requires_grad=True)]
    topt = torch.optim.SGD(
        [{"params": [weights[0]]}, {"params": [weights[1]], "lr": 0.05}], lr=0.1, momentum=0.9
    )
    tsched = make_torch(topt)
    for step in range(STEPS):
        np.testing.assert_allclose(
            sched.get_last_lr(), tsched.get_last_lr(), rtol=1e-12, err_msg=f"step {step}"
        )
        momenta = [g["momentum"] for g in opt.param_groups]
        np.testing.assert_allclose(momenta, [g["momentum"] for g in topt.param_groups], rtol=1e-12)
        for w in weights:
            w.grad = torch.zeros_like(w)
        topt.step()
        opt.step([np.zeros(3), np.zeros(2)])
        sched.step()
        tsched.step()


@pytest.mark.skipif(torch is None, reason="torch not installed: torch comparison skipped")
def test_reduce_on_plateau_matches_torch():
    opt = sgd()
    sched = schedules.ReduceLROnPlateau(
        opt, mode="max", factor=0.3, patience=1, threshold=0.01, threshold_mode="abs", cooldown=2
    )
    w = torch.zeros(3, requires_grad=True)
    topt = torch.optim.SGD([{"params": [w]}, {"params": [torch.zeros(2)], "lr": 0.05}], lr=0.1)
    tsched = torch.optim.lr_scheduler.ReduceLROnPlateau(
        topt, mode="max", factor=0.3, patience=1, threshold=0.01, threshold_mode="abs", cooldown=2
    )
    rng = np.random.default_rng(0)
    for metric in np.cumsum(rng.standard_normal(60) * 0.1):
        sched.step(metric)
        tsched.step(metric)
        np.testing.assert_allclose(sched.get_last_lr(), tsched.get_last_lr(), rtol=1e-15)


def test_bad_arguments():
    with pytest.raises(TypeError, match="fusedopt.optim.Optimizer"):
        schedules.StepLR(object(), step_size=1)
    with pytest.raises(TypeError, match="fusedopt.optim.Optimizer"):
        schedules.ReduceLROnPlateau(object())
    with pytest.raises(TypeError, match="fusedopt.optim.Optimizer"):
        schedules.OneCycleLR(object(), max_lr=1.0, total_steps=3)
    with pytest.raises(ValueError, match="warmup_steps"):
        schedules.WarmupCosineLR(sgd(), warmup_steps=10, total_steps=10)
    opt = sgd()
    sched = schedules.OneCycleLR(opt, max_lr=1.0, total_steps=3)
    for _ in range(3):
        sched.step()
    with pytest.raises(ValueError, match="Tried to step 4 times"):
        sched.step()
    with pytest.raises(ValueError, match="momentum or beta1"):
        schedules.OneCycleLR(optim.Adagrad([np.zeros(1)]), max_lr=1.0, total_steps=3)
    assert math.isfinite(opt.param_groups[0]["lr"])


def _plateau(opt):
    return schedules.ReduceLROnPlateau(opt, factor=0.5, patience=1)


@pytest.mark.parametrize(
    "make",
    [lambda o: schedules.StepLR(o, step_size=2), _plateau],
    ids=["StepLR", "ReduceLROnPlateau"],
)
def test_load_state_dict_checks_everything_first(make):
    """A state_dict with a value of the wrong kind, per-group values for another number of
    groups, or another schedule's keys is refused naming what is wrong, and the schedule and
    the optimizer's rates are as they were."""
    opt = sgd()
    sched = make(opt)
    plateau = isinstance(sched, schedules.ReduceLROnPlateau)
    for metric in range(3):
        sched.step(metric) if plateau else sched.step()
    good = sched.state_dict()
    per_group = "base_lrs" if "base_lrs" in good else "min_lrs"
    fresh = make(opt2 := sgd())
    before, lrs = copy.deepcopy(fresh.state_dict()), fresh.get_last_lr()
    other = schedules.ExponentialLR(sgd(), gamma=0.5).state_dict()
    bad = [
        (TypeError, "state_dict: expected a dict", [("last_epoch", 3)]),
        (TypeError, r"state_dict\['last_epoch'\]: expected a number", {**good, "last_epoch": None}),
        (TypeError, r"state_dict\['last_epoch'\]: expected an int", {**good, "last_epoch": 2.5}),
        (
            ValueError,
            r"state_dict\['last_epoch'\]: expected an int >= 0",
            {**good, "last_epoch": -1},
        ),
        (
            ValueError,
            rf"state_dict\['{per_group}'\]: expected one value per parameter group \(2, or",
            {**good, per_group: [0.5, 0.5, 0.5]},
        ),
        (
            TypeError,
            rf"state_dict\['{per_group}'\]: expected a number",
            {**good, per_group: [0.5, "x"]},
        ),
        (ValueError, f"not a {type(fresh).__name__} state", other),
    ]
    if plateau:
        bad += [
            (ValueError, "mode max2 is unknown", {**good, "mode": "max2"}),
            (TypeError, r"state_dict\['factor'\]: expected a number", {**good, "factor": None}),
        ]
    else:
        bad += [(ValueError, "Invalid step_size: 0", {**good, "step_size": 0})]
    for error, match, state in bad:
        with pytest.raises(error, match=match):
            fresh.load_state_dict(state)
        assert fresh.state_dict() == before and fresh.get_last_lr() == lrs, match
    fresh.load_state_dict(good)
    assert fresh.state_dict() == good
    assert opt2.param_groups[0]["lr"] == (
        opt.param_groups[0]["lr"] if "base_lrs" in good else 0.1  # plateau: the optimizer's
    )


def test_a_refused_step_changes_nothing():
    """OneCycleLR stepped past its total_steps: the ValueError leaves the step count and the
    rates as they were, so the schedule's state is still the last good one."""
    opt = sgd()
    sched = schedules.OneCycleLR(opt, max_lr=1.0, total_steps=3)
    for _ in range(3):
        sched.step()
    before, lrs = copy.deepcopy(sched.state_dict()), sched.get_last_lr()
    with pytest.raises(ValueError, match="Tried to step 4 times"):
        sched.step()
    assert sched.state_dict() == before and sched.get_last_lr() == lrs


@pytest.mark.skipif(torch is None, reason="torch not installed: torch comparison skipped")
@pytest.mark.parametrize("name", ["constant", "step", "exponential", "cosine", "linear"])
def test_loads_torchs_checkpoint(name):
    """The checkpoint of torch's scheduler of the same name (its step bookkeeping ignored)
    resumes the fusedopt schedule where torch's was: the same rates from there on."""
    cls, kwargs, make_torch = CASES[name]
    w = [torch.zeros(3, requires_grad=True), torch.zeros(2, requires_grad=True)]
    topt = torch.optim.SGD([{"params": [w[0]]}, {"params": [w[1]], "lr": 0.05}], lr=0.1)
    tsched = make_torch(topt)
    for _ in range(9):
        topt.step()
        tsched.step()
    sched = cls(opt := sgd(), **kwargs)
    sched.load_state_dict(tsched.state_dict())
    for _ in range(STEPS - 9):
        np.testing.assert_allclose(sched.get_last_lr(), tsched.get_last_lr(), rtol=1e-12)
        topt.step()
        tsched.step()
        sched.step()
    assert opt.param_groups[1]["lr"] == sched.get_last_lr()[1]


@pytest.mark.skipif(torch is None, reason="torch not installed: torch comparison skipped")
def test_reduce_on_plateau_loads_torchs_checkpoint():
    """torch's ReduceLROnPlateau checkpoint (its derived mode_worse, default_min_lr and
    _last_lr ignored) resumes the fusedopt one: the same decisions from there on."""
    w = torch.zeros(3, requires_grad=True)
    topt = torch.optim.SGD([{"params": [w]}, {"params": [torch.zeros(2)], "lr": 0.05}], lr=0.1)
    tsched = torch.optim.lr_scheduler.ReduceLROnPlateau(topt, factor=0.5, patience=1, cooldown=1)
    metrics = [5, 4, 4, 4, 4, 3, 3, 3, 3, 3, 3, 3]
    for metric in metrics[:5]:
        tsched.step(metric)
    opt = sgd()
    sched = schedules.ReduceLROnPlateau(opt, factor=0.5, patience=1, cooldown=1)
    sched.load_state_dict(tsched.state_dict())
    for group, tgroup in zip(opt.param_groups, topt.param_groups):
        group["lr"] = tgroup["lr"]  # the optimizer's own checkpoint, in a resume
    for metric in metrics[5:]:
        sched.step(metric)
        tsched.step(metric)
        assert sched.get_last_lr() == tsched.get_last_lr()


def test_a_json_round_trip_of_a_state_loads_again_and_again():
    """A state saved as JSON (OneCycleLR's phases, tuples, come back as lists) loads, and so
    does every state saved after it, into the same schedule and a new one."""
    made = [schedules.OneCycleLR(sgd(), max_lr=0.5, total_steps=20) for _ in range(2)]
    for _ in range(5):
        made[0].step()
    saved = json.loads(json.dumps(made[0].state_dict()))
    for schedule in made + made:
        schedule.load_state_dict(saved)
        schedule.load_state_dict(schedule.state_dict())
        assert schedule.last_epoch == 5
    assert made[0].get_last_lr() == made[1].get_last_lr()


def test_per_group_lists_of_another_length_are_refused_as_torch_refuses_them():
    """A max_lr or min_lr list with a value for other than each group: a ValueError, as
    torch's schedulers raise (not an IndexError at the first step, nor a checkpoint that will
    not load)."""
    for make in (
        lambda o, v: schedules.OneCycleLR(o, v, total_steps=10),
        lambda o, v: schedules.ReduceLROnPlateau(o, min_lr=v),
    ):
        for values in ([1.0], [1.0, 2.0, 3.0]):
            with pytest.raises(
                ValueError, match=r"_lr: expected one value per parameter group \(2\)"
            ):
                make(sgd(), values)
        make(sgd(), (1.0, 2.0))


def _grown(lr=0.1):
    """sgd() with a third group added, as after the schedule was made."""
    opt = sgd(lr)
    opt.add_param_group({"params": [np.zeros(4)], "lr": lr / 4})
    return opt


def test_a_group_added_after_the_schedule_is_left_alone_and_resumes():
    """A schedule made before add_param_group schedules the groups it was made for, and
    leaves the added one's rate alone (torch's chainable forms would scale it from its rate
    when added: documented); its checkpoint loads into the same schedule of a resumed run,
    made after the group was added, and continues with the same rates."""
    opt = sgd()
    sched = schedules.CosineAnnealingLR(opt, T_max=10)
    opt.add_param_group({"params": [np.zeros(4)], "lr": 0.025})
    for _ in range(3):
        sched.step()
    assert opt.param_groups[2]["lr"] == 0.025
    resumed_opt = _grown()
    resumed = schedules.CosineAnnealingLR(resumed_opt, T_max=10)
    resumed.load_state_dict(sched.state_dict())
    for _ in range(3):
        sched.step()
        resumed.step()
        assert resumed.get_last_lr() == sched.get_last_lr()
    assert resumed.get_last_lr()[2] == 0.025
    if torch is not None:  # the groups it was made for, as torch's
        w = [torch.zeros(3), torch.zeros(2), torch.zeros(4)]
        topt = torch.optim.SGD([{"params": [w[0]]}, {"params": [w[1]], "lr": 0.05}], lr=0.1)
        tsched = torch.optim.lr_scheduler.CosineAnnealingLR(topt, T_max=10)
        topt.add_param_group({"params": [w[2]], "lr": 0.025})
        for _ in range(6):
            topt.step()
            tsched.step()
        np.testing.assert_allclose(sched.get_last_lr()[:2], tsched.get_last_lr()[:2], rtol=1e-12)
    one_cycle = schedules.OneCycleLR(opt := sgd(), 1.0, total_steps=10)
    opt.add_param_group({"params": [np.zeros(4)], "lr": 0.025})
    lrs = one_cycle.get_last_lr()
    with pytest.raises(
        ValueError, match="OneCycleLR made for 2 parameter groups, the optimizer has 3"
    ):
        one_cycle.step()
    assert one_cycle.get_last_lr() == lrs and one_cycle.last_epoch == 0
    state = one_cycle.state_dict()  # lists for other numbers of groups: refused, named
    with pytest.raises(ValueError, match="expected as many values in each of base_lrs, max_lrs"):
        one_cycle.load_state_dict({**state, "max_lrs": state["max_lrs"][:1]})
    assert one_cycle.state_dict() == state


def test_reduce_on_plateau_reduces_a_group_added_since_as_torch():
    """Groups added after ReduceLROnPlateau was made with one min_lr take it (torch's
    default_min_lr); made with a list, a reduction is a RuntimeError that changes nothing.
    Its checkpoints, and those from before default_min_lr was kept, load."""
    metrics = [3, 3, 3, 3, 3, 3]
    opt = sgd()
    sched = schedules.ReduceLROnPlateau(opt, patience=0, min_lr=0.004)
    opt.add_param_group({"params": [np.zeros(4)], "lr": 1.0})
    for metric in metrics:
        sched.step(metric)
    if torch is not None:
        w = [torch.zeros(3), torch.zeros(2), torch.zeros(4)]
        topt = torch.optim.SGD([{"params": [w[0]]}, {"params": [w[1]], "lr": 0.05}], lr=0.1)
        tsched = torch.optim.lr_scheduler.ReduceLROnPlateau(topt, patience=0, min_lr=0.004)
        topt.add_param_group({"params": [w[2]], "lr": 1.0})
        for metric in metrics:
            tsched.step(metric)
        assert sched.get_last_lr() == tsched.get_last_lr()
        assert sched.min_lrs == tsched.min_lrs
    assert opt.param_groups[2]["lr"] == 0.004 and sched.min_lrs == [0.004] * 3
    # its checkpoint, and one without default_min_lr (from an earlier version)
    for state in (sched.state_dict(), {**sched.state_dict(), "default_min_lr": None}):
        fresh = schedules.ReduceLROnPlateau(_grown(), patience=0, min_lr=[0.1, 0.2, 0.3])
        old = {k: v for k, v in state.items() if k != "default_min_lr"}
        fresh.load_state_dict(old)
        assert fresh.default_min_lr == 0.004 and fresh.state_dict() == sched.state_dict()
        fresh.load_state_dict(state)
        assert fresh.default_min_lr == state["default_min_lr"]
    with pytest.raises(TypeError, match="default_min_lr: expected None or a number, got 'x'"):
        fresh.load_state_dict({**state, "default_min_lr": "x"})
    opt = sgd()
    sched = schedules.ReduceLROnPlateau(opt, patience=0, min_lr=[0.01, 0.02])
    sched.step(3)
    opt.add_param_group({"params": [np.zeros(4)], "lr": 1.0})
    before = copy.deepcopy(sched.state_dict()), sched.get_last_lr()
    with pytest.raises(RuntimeError, match="min_lr for each of 2 parameter groups, the optim"):
        sched.step(3)
    assert (sched.state_dict(), sched.get_last_lr()) == before
