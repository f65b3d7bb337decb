"""Optimizer classes: against the reference functions, against torch.optim, checkpoints,
freezing, groups, clipping."""

from __future__ import annotations

import copy as copy_module
import inspect
import os
import threading

import ml_dtypes
import numpy as np
import pytest
from support import (
    assert_identical,
    assert_same_bits,
    misaligned,
    peak_traced_bytes,
    state_arrays,
)

import fusedopt
from fusedopt import _functional, optim
from fusedopt.quantize import QuantizedState


def generated_cases(cls):
    """Hyperparameter sets from the class's own signature, so that every class is covered
    without a line here: the defaults, each flag flipped alone, every number changed, and
    every number changed with every flag flipped; sets the class rejects are left out."""
    defaults = {
        p.name: p.default
        for p in inspect.signature(cls).parameters.values()
        if p.default is not p.empty and p.kind is p.POSITIONAL_OR_KEYWORD
    }

    def varied(value):
        if isinstance(value, tuple):
            return tuple(v * 0.9 for v in value)
        return value * 0.5 if value else 0.1

    flags = [k for k, v in defaults.items() if isinstance(v, bool)]
    numbers = {k: varied(v) for k, v in defaults.items() if k not in flags}
    found = [{}] + [{f: not defaults[f]} for f in flags]
    found += [numbers, {**numbers, **{f: not defaults[f] for f in flags}}]
    valid = []
    for hyper in found:
        hyper = {"lr": defaults["lr"], **hyper}  # the training loop halves it in one group
        try:
            cls([np.zeros(1)], **hyper)
        except ValueError:
            continue
        valid.append(hyper)
    return valid


# (class, hyperparameter sets): the generated sets of every class, and by hand the
# combinations they miss (Nesterov needs momentum, ...).
EXTRA = {
    optim.SGD: [
        dict(lr=0.05),
        dict(lr=0.05, momentum=0.9),
        dict(lr=0.05, momentum=0.9, dampening=0.5, weight_decay=0.1),
        dict(lr=0.05, momentum=0.8, nesterov=True, maximize=True),
    ],
    optim.Momentum: [dict(lr=0.05, beta=0.9, weight_decay=0.01)],
    optim.Adam: [
        dict(lr=0.01),
        dict(lr=0.01, betas=(0.8, 0.99), weight_decay=0.1),
        dict(lr=0.01, amsgrad=True, maximize=True),
        dict(lr=0.01, weight_decay=0.1, decoupled_weight_decay=True),
    ],
    optim.AdamW: [dict(lr=0.01), dict(lr=0.01, weight_decay=0.3, amsgrad=True)],
    optim.Adagrad: [
        dict(lr=0.05),
        dict(lr=0.05, lr_decay=0.01, weight_decay=0.1, initial_accumulator_value=0.1),
    ],
    optim.RMSprop: [
        dict(lr=0.01),
        dict(lr=0.01, momentum=0.9, centered=True),
        dict(lr=0.01, alpha=0.9, weight_decay=0.1, maximize=True),
    ],
    optim.Lion: [dict(lr=1e-3), dict(lr=1e-3, betas=(0.8, 0.9), weight_decay=0.5)],
    optim.NAdam: [
        dict(lr=0.01, weight_decay=0.1),
        dict(lr=0.01, weight_decay=0.1, decoupled_weight_decay=True, maximize=True),
        dict(lr=0.01, betas=(0.95, 0.99), momentum_decay=0.1),
        dict(lr=0.01, betas=(0.99, 0.9), momentum_decay=40.0),  # mu_t = beta1 from t = 23
    ],
    optim.RAdam: [
        dict(lr=0.01, weight_decay=0.1),
        dict(lr=0.01, weight_decay=0.1, decoupled_weight_decay=True, maximize=True),
        dict(lr=0.01, betas=(0.8, 0.9)),  # rectified from step 6
        dict(lr=0.01, betas=(0.9, 0.6)),  # rho_inf = 4: never rectified
    ],
    optim.ScheduleFreeAdamW: [
        dict(lr=0.01, warmup_steps=5, weight_decay=0.1),
        dict(lr=0.01, betas=(0.8, 0.99), r=1.0, weight_lr_power=0.0),
    ],
    optim.ScheduleFreeSGD: [dict(lr=0.05, warmup_steps=5, weight_decay=0.1, momentum=0.5)],
}
CLASSES = {
    cls.__name__: (cls, generated_cases(cls) + EXTRA.get(cls, []))
    for cls in (getattr(optim, name) for name in optim.__all__)
    if isinstance(cls, type) and issubclass(cls, optim.Optimizer) and cls.kernel
}
CASES = [
    pytest.param(cls, hyper, id=f"{name}-{i}")
    for name, (cls, hypers) in CLASSES.items()
    for i, hyper in enumerate(hypers)
]
SHAPES = {"w1": (6, 5), "b1": (5,), "w2": (5, 3), "b2": (3,), "scale": ()}


def model(dtype=np.float64, seed=0):
    rng = np.random.default_rng(seed)
    return {name: np.asarray(rng.standard_normal(shape), dtype) for name, shape in SHAPES.items()}


def grads_for(params, rng):
    return {n: np.asarray(rng.standard_normal(p.shape), p.dtype) for n, p in params.items()}


def copy(params):
    return {n: p.copy() for n, p in params.items()}


def assert_same(a, b, context=""):
    assert_identical(a, b, context)


def run(cls, hyper, params, steps, seed=1, schedule=None, freeze=None, none_every=0):
    """A training loop with random gradients: groups, a None gradient now and then, frozen
    parameters for a while and learning-rate changes mid-run, per the arguments."""
    groups = [
        {"params": {k: params[k] for k in ("w1", "b1")}},
        {"params": {k: params[k] for k in ("w2", "b2", "scale")}, "lr": hyper["lr"] / 2},
    ]
    opt = cls(groups, **hyper)
    rng = np.random.default_rng(seed)
    for t in range(steps):
        grads = grads_for(params, rng)
        if none_every and t % none_every == 1:
            grads["b1"] = None
        if schedule:
            opt.param_groups[0]["lr"] = schedule(t)
        if freeze and t == freeze[0]:
            opt.freeze(["w2"])
        if freeze and t == freeze[1]:
            opt.unfreeze(["w2"])
        opt.step(grads)
    return opt


@pytest.mark.parametrize("dtype", [np.float32, np.float64], ids=["float32", "float64"])
@pytest.mark.parametrize("cls, hyper", CASES)
def test_class_matches_reference_loop(cls, hyper, dtype):
    """Bit for bit: the fused kernels give exactly what the reference formulas give, so the
    class on fused kernels and on the reference must agree exactly, with groups, None grads,
    freezing and a changing learning rate."""
    kwargs = dict(schedule=lambda t: hyper["lr"] * (1 + t % 3) / 2, freeze=(3, 6), none_every=4)
    fused = model(dtype)
    run(cls, hyper, fused, steps=10, **kwargs)
    expected = model(dtype)
    with optim.reference_kernels():  # fusedopt.reference's per-tensor NumPy loops
        run(cls, hyper, expected, steps=10, **kwargs)
    assert_same(fused, expected)


try:
    import torch
except ImportError:  # compared only where torch is installed
    torch = None

TORCH_CASES = [
    c
    for c in CASES
    if torch is not None
    and hasattr(torch.optim, c.values[0].__name__)
    and c.values[0] is not optim.Momentum
]


@pytest.fixture
def torch_float64():
    """torch.optim.NAdam keeps its running product of momentum coefficients (mu_product) in a
    tensor of the default dtype: in float32 its steps are off by about 1e-7 relative."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(previous)


def torch_twin(cls, **hyper):
    """float64 parameters for ``cls`` and the same values as tensors for torch.optim's class
    of that name (foreach=False): (params, initial values, tensors, torch's, ours)."""
    params = model(np.float64)
    initial = copy(params)
    tparams = [torch.tensor(initial[n], requires_grad=True) for n in SHAPES]
    topt = getattr(torch.optim, cls.__name__)(tparams, foreach=False, **hyper)
    return params, initial, tparams, topt, cls(params, **hyper)


def step_both(params, tparams, topt, opt, rng):
    """One step of each with the same random gradients."""
    grads = grads_for(params, rng)
    for p, n in zip(tparams, SHAPES):
        p.grad = torch.tensor(grads[n])
    topt.step()
    opt.step(grads)


@pytest.mark.skipif(torch is None, reason="torch not installed: torch.optim comparison skipped")
@pytest.mark.parametrize("cls, hyper", TORCH_CASES)
def test_class_matches_torch(cls, hyper, torch_float64):
    """50 steps with random gradients in float64: parameter deltas equal torch.optim's (with
    foreach=False) to rtol 1e-9. Not bit for bit: torch rounds some steps differently (e.g.
    addcdiv computes value * (a / b), the reference (value * a) / b)."""
    params, initial, tparams, topt, opt = torch_twin(cls, **hyper)
    rng = np.random.default_rng(2)
    for _ in range(50):
        step_both(params, tparams, topt, opt, rng)
    for p, n in zip(tparams, SHAPES):
        np.testing.assert_allclose(
            params[n] - initial[n],
            p.detach().numpy() - initial[n],
            rtol=1e-9,
            atol=1e-12,
            err_msg=n,
        )


STEPWISE_TORCH_CASES = [
    (cls, hyper)
    for cls in (optim.NAdam, optim.RAdam)
    for hyper in [
        dict(),
        dict(weight_decay=0.1),
        dict(weight_decay=0.1, decoupled_weight_decay=True),
        dict(lr=0.01, betas=(0.8, 0.95), eps=1e-6, maximize=True),
    ]
] + [(optim.NAdam, dict(momentum_decay=40.0, betas=(0.99, 0.9)))]


@pytest.mark.skipif(torch is None, reason="torch not installed: torch.optim comparison skipped")
@pytest.mark.parametrize("cls, hyper", STEPWISE_TORCH_CASES)
def test_nadam_and_radam_match_torch_at_every_step(cls, hyper, torch_float64):
    """In float64, after every one of 100 steps, the parameter deltas and both moments equal
    torch.optim's to rtol 1e-9: RAdam's steps on both sides of its threshold rho_t > 5 (the
    rectified step starts at t = 6), NAdam's once its product of momentum coefficients is
    below 2**-54 (about t = 47 by default) and, with momentum_decay=40, once mu_t is beta1."""
    params, initial, tparams, topt, opt = torch_twin(cls, **hyper)
    rng = np.random.default_rng(3)
    for step in range(1, 101):
        step_both(params, tparams, topt, opt, rng)
        for p, n in zip(tparams, SHAPES):
            context = f"{n} step {step}"
            delta, expected = params[n] - initial[n], p.detach().numpy() - initial[n]
            np.testing.assert_allclose(delta, expected, rtol=1e-9, atol=1e-12, err_msg=context)
            for key in ("exp_avg", "exp_avg_sq"):
                expected = topt.state[p][key].numpy()
                np.testing.assert_allclose(
                    opt.state[n][key], expected, rtol=1e-9, atol=1e-12, err_msg=context
                )


@pytest.mark.skipif(torch is None, reason="torch not installed: torch.optim comparison skipped")
def test_nadam_with_a_one_cycle_momentum_matches_torch(torch_float64):
    """With beta1 changed at every step (OneCycleLR's cycle_momentum, fusedopt's and torch's
    schedule side by side), NAdam's steps and its mu_product are torch's: the product takes
    each step's beta1. A product from the step with the current beta1 alone is off by
    percents here."""
    from fusedopt.schedules import OneCycleLR

    params, initial, tparams, topt, opt = torch_twin(optim.NAdam)
    schedule = dict(max_lr=0.05, total_steps=40, base_momentum=0.5, max_momentum=0.95)
    tsched = torch.optim.lr_scheduler.OneCycleLR(topt, **schedule)
    sched = OneCycleLR(opt, **schedule)
    rng = np.random.default_rng(5)
    for step in range(1, 41):
        step_both(params, tparams, topt, opt, rng)
        tsched.step()
        sched.step()
        assert opt.param_groups[0]["betas"] == topt.param_groups[0]["betas"]
        for p, n in zip(tparams, SHAPES):
            delta, expected = params[n] - initial[n], p.detach().numpy() - initial[n]
            np.testing.assert_allclose(delta, expected, rtol=1e-9, atol=1e-12, err_msg=step)
            assert opt.state[n]["mu_product"] == topt.state[p]["mu_product"].item(), step
    derived = fusedopt.reference._nadam_mu_product(
        opt.param_groups[0]["betas"][0], 4e-3, opt.state["w1"]["step"]
    )
    assert abs(opt.state["w1"]["mu_product"] / derived - 1) > 0.01


def test_nadam_keeps_mu_product_through_checkpoints(tmp_path):
    """mu_product is state: saved and restored exactly (a run that is saved and loaded
    continues bit for bit), checked on loading, and derived from the step with the current
    beta1 where an older checkpoint lacks it."""
    rng = np.random.default_rng(6)
    grads = [grads_for(model(), rng) for _ in range(6)]
    a, b = model(), model()
    one, two = optim.NAdam(a), optim.NAdam(b)
    for t in range(3):
        one.param_groups[0]["betas"] = two.param_groups[0]["betas"] = (0.9 - 0.1 * t, 0.999)
        one.step(grads[t])
        two.step(grads[t])
    two.save(tmp_path / "nadam.npz")
    resumed_params = {n: v.copy() for n, v in b.items()}
    resumed = optim.NAdam(resumed_params)
    resumed.load_checkpoint(tmp_path / "nadam.npz")
    assert resumed.state["w1"]["mu_product"] == one.state["w1"]["mu_product"]
    for g in grads[3:]:
        one.step(g)
        resumed.step(g)
    assert_same(a, resumed_params, "resumed")
    sd, kept = two.state_dict(), two.state["w1"]["mu_product"]
    for bad in (1.0, -0.5, float("nan"), "0.5", True):
        sd["state"]["w1"]["mu_product"] = bad
        with pytest.raises(ValueError, match="mu_product"):
            two.load_state_dict(sd)
    assert two.state["w1"]["mu_product"] == kept
    for entry in sd["state"].values():  # as fusedopt wrote them before it kept the product
        del entry["mu_product"]
    two.load_state_dict(sd)
    two.step(grads[3])
    beta1, step = two.param_groups[0]["betas"][0], two.state["w1"]["step"]
    mu = beta1 * (1 - 0.5 * 0.96 ** (step * 4e-3))
    expected = fusedopt.reference._nadam_mu_product(beta1, 4e-3, step - 1) * mu
    assert two.state["w1"]["mu_product"] == expected


def test_radam_rectifies_from_step_6():
    """Before the rectification (rho_t <= 5) RAdam's step is momentum SGD with bias correction
    and eps plays no part; from step 6 (beta2 = 0.999) it does."""
    a, b = model(), model()
    small, large = optim.RAdam(a, eps=1e-8), optim.RAdam(b, eps=1.0)
    rng = np.random.default_rng(4)
    for step in range(1, 8):
        grads = grads_for(a, rng)
        small.step(grads)
        large.step(grads)
        if step <= 5:
            assert_same(a, b, f"step {step}")
        else:
            assert all(not np.array_equal(a[n], b[n]) for n in SHAPES), step


def test_one_fused_call_per_group_dtype_and_step(monkeypatch):
    calls = []
    real = _functional.adam_
    monkeypatch.setitem(
        _functional.FUNCTIONS, "adam_", lambda *a, **k: calls.append(len(a[0])) or real(*a, **k)
    )
    params = {**model(np.float32), "w64": np.zeros((4, 4))}
    opt = optim.Adam(
        [
            {"params": {k: params[k] for k in ("w1", "b1", "w64")}},
            {"params": {k: params[k] for k in ("w2", "b2", "scale")}},
        ]
    )
    opt.step(grads_for(params, np.random.default_rng(0)))
    assert sorted(calls) == [1, 2, 3]  # group 0: float32 x2 + float64 x1; group 1: 3 tensors
    calls.clear()
    grads = grads_for(params, np.random.default_rng(1))
    grads["b1"] = None  # b1's step count now lags: it needs a call of its own next time
    opt.step(grads)
    opt.step(grads_for(params, np.random.default_rng(2)))
    assert sorted(calls) == [1, 1, 1, 1, 1, 3, 3]
    assert opt.state["b1"]["step"] == 2 and opt.state["w1"]["step"] == 3


def test_frozen_equals_no_gradient():
    """A parameter frozen for some steps and then unfrozen ends exactly where one given no
    gradient for those steps ends: its state and step count are kept while frozen."""
    a, b = model(), model()
    opt_a, opt_b = optim.Adam(a, lr=0.01), optim.Adam(b, lr=0.01)
    rng_a, rng_b = np.random.default_rng(3), np.random.default_rng(3)
    for t in range(8):
        ga, gb = grads_for(a, rng_a), grads_for(b, rng_b)
        if t == 2:
            opt_a.freeze("w1")
        if t == 5:
            opt_a.unfreeze("w1")
        if 2 <= t < 5:
            gb["w1"] = None
        frozen_before = a["w1"].copy()
        opt_a.step(ga)
        opt_b.step(gb)
        if 2 <= t < 5:
            assert_same_bits(a["w1"], frozen_before)
    assert_same(a, b)


@pytest.mark.parametrize("option", ["max_grad_norm", "skip_if_nonfinite"])
def test_frozen_equals_no_gradient_with_clipping_and_the_finite_check(option):
    """A frozen parameter's gradient, given or not, enters neither the global norm that
    max_grad_norm clips to (nor is it scaled) nor the non-finite check: as a None gradient."""
    options = {"max_grad_norm": 0.5} if option == "max_grad_norm" else {"skip_if_nonfinite": True}
    a, b = model(), model()
    frozen_group = [{"params": {"w1": a["w1"]}, "frozen": True}, {"params": {"b1": a["b1"]}}]
    opt_a = optim.Adam({k: v for k, v in a.items() if k not in ("w1", "b1")}, lr=0.01, **options)
    opt_a.add_param_group(frozen_group[1])
    opt_a.add_param_group(frozen_group[0])
    opt_a.freeze("w2")
    opt_b = optim.Adam({k: v for k, v in b.items() if k not in ("w1", "b1")}, lr=0.01, **options)
    opt_b.add_param_group({"params": {"b1": b["b1"]}})
    opt_b.add_param_group({"params": {"w1": b["w1"]}})
    for t in range(3):
        ga, gb = grads_for(a, np.random.default_rng(t)), grads_for(b, np.random.default_rng(t))
        gb["w1"] = gb["w2"] = None
        if option == "skip_if_nonfinite":
            ga["w1"][0, 0] = ga["w2"][0, 0] = np.nan  # frozen: not part of the step
        given = {n: ga[n].copy() for n in ("w1", "w2")}
        assert opt_a.step(ga) and opt_b.step(gb)
        assert_same({n: ga[n] for n in given}, given)  # not clipped in place
    assert_same(a, b)
    assert opt_a.skipped_steps == 0


def test_reset_state():
    params = model()
    opt = optim.Adam(params)
    opt.step(grads_for(params, np.random.default_rng(0)))
    opt.reset_state(["w2", "b2"])
    assert set(opt.state) == {"w1", "b1", "scale"}
    opt.step(grads_for(params, np.random.default_rng(1)))
    assert opt.state["w2"]["step"] == 1 and opt.state["w1"]["step"] == 2
    with pytest.raises(KeyError, match="no parameter named 'nope'"):
        opt.reset_state("nope")


def test_frozen_group():
    params = model()
    opt = optim.SGD(
        [{"params": {"w1": params["w1"]}, "frozen": True}, {"params": {"b1": params["b1"]}}], lr=0.1
    )
    before = copy(params)
    opt.step({"w1": np.ones((6, 5)), "b1": np.ones(5)})
    assert_same_bits(params["w1"], before["w1"])
    assert not np.array_equal(params["b1"], before["b1"])
    opt.param_groups[0]["frozen"] = False
    opt.step({"w1": np.ones((6, 5)), "b1": np.ones(5)})
    assert not np.array_equal(params["w1"], before["w1"])


@pytest.mark.parametrize("cls, hyper", [c for c in CASES if c.id.endswith("-1") or "Lion" in c.id])
def test_checkpoint_resume_is_bit_exact(cls, hyper, tmp_path):
    """Save after 5 steps, keep going 5 more; a fresh optimizer loaded from the checkpoint over
    the saved parameters makes the same 5 steps bit for bit."""
    params = model(np.float32)
    opt = cls(params, **hyper)
    rng = np.random.default_rng(4)
    for _ in range(5):
        opt.step(grads_for(params, rng))
    opt.save(tmp_path / "opt.npz")
    saved_params = copy(params)
    rng_state = rng.bit_generator.state
    for _ in range(5):
        opt.step(grads_for(params, rng))

    resumed = saved_params
    opt2 = optim.Optimizer.load(tmp_path / "opt.npz", resumed)
    assert type(opt2) is cls
    rng.bit_generator.state = rng_state
    for _ in range(5):
        opt2.step(grads_for(resumed, rng))
    assert_same(resumed, params)
    for name in opt.state:
        assert_identical(opt2.state[name], opt.state[name], name)  # arrays and the step count


def test_state_dict_round_trip_and_hyperparameters():
    params = model()
    opt = optim.Adam(
        [{"params": {"w1": params["w1"]}, "lr": 0.5}, {"params": {"b1": params["b1"]}}],
        lr=0.01,
        amsgrad=True,
    )
    opt.step({"w1": np.ones((6, 5)), "b1": np.ones(5)})
    opt.freeze("b1")
    sd = opt.state_dict()
    opt2 = optim.Adam([{"params": {"w1": params["w1"]}}, {"params": {"b1": params["b1"]}}])
    opt2.load_state_dict(sd)
    assert opt2.param_groups[0]["lr"] == 0.5 and opt2.param_groups[1]["lr"] == 0.01
    assert opt2.param_groups[0]["betas"] == (0.9, 0.999) and opt2.param_groups[0]["amsgrad"]
    assert opt2.state_dict()["frozen"] == ["b1"]
    sd["state"]["w1"]["exp_avg"][0, 0] = 123.0  # state_dict returns copies
    assert opt.state["w1"]["exp_avg"][0, 0] != 123.0
    # the groups' lists too: neither optimizer shares one with the dict
    sd["param_groups"][0]["names"].append("x")
    sd["param_groups"][0]["betas"][0] = 0.5
    for o in (opt, opt2):
        assert o.param_groups[0]["names"] == ["w1"] and o.param_groups[0]["betas"] == (0.9, 0.999)


def snapshot(opt):
    sd = opt.state_dict()
    return repr({k: v for k, v in sd.items() if k != "state"}), {
        n: {k: (v.tobytes() if isinstance(v, np.ndarray) else v) for k, v in s.items()}
        for n, s in sd["state"].items()
    }


def test_bad_checkpoints_raise_and_change_nothing(tmp_path):
    params = model()
    opt = optim.Adam(params, lr=0.01)
    opt.step(grads_for(params, np.random.default_rng(5)))
    opt.save(tmp_path / "good.npz")
    data = (tmp_path / "good.npz").read_bytes()
    (tmp_path / "truncated.npz").write_bytes(data[: len(data) // 2])
    (tmp_path / "garbage.npz").write_bytes(b"not a zip file at all")
    optim.SGD(model(), lr=0.1).save(tmp_path / "sgd.npz")
    small = model()
    small["w1"] = np.zeros((2, 2))
    optim.Adam(small).step(grads_for(small, np.random.default_rng(0)))
    o = optim.Adam(small)
    o.step(grads_for(small, np.random.default_rng(0)))
    o.save(tmp_path / "shape.npz")
    other_names = optim.Adam({"x": np.zeros(3)})
    other_names.step({"x": np.ones(3)})
    other_names.save(tmp_path / "names.npz")

    before = snapshot(opt)
    for bad, message in [
        ("truncated.npz", "not a complete fusedopt checkpoint"),
        ("garbage.npz", "not a complete fusedopt checkpoint"),
        ("sgd.npz", "checkpoint of a SGD optimizer"),
        ("shape.npz", "expected float64 \\(6, 5\\)"),
        ("names.npz", "names or groups differ"),
        ("missing.npz", "not a complete fusedopt checkpoint"),
    ]:
        with pytest.raises(ValueError, match=message):
            opt.load_checkpoint(tmp_path / bad)
        assert snapshot(opt) == before, bad
    sd = opt.state_dict()
    sd["format_version"] = 99
    with pytest.raises(ValueError, match="unsupported checkpoint format"):
        opt.load_state_dict(sd)
    with pytest.raises(ValueError, match="holds a SGD optimizer, not a Adam"):
        optim.Adam.load(tmp_path / "sgd.npz", model())
    assert snapshot(opt) == before


def test_bad_checkpoint_entries_are_named_and_change_nothing():
    """A checkpoint's step counts, skipped-step count and frozen names are checked before
    anything is loaded: a bad one is a ValueError that names it, and the optimizer is left as
    it was (not with the checkpoint's groups and state but its own options)."""
    params = model()
    opt = optim.Adam(params, lr=0.01)
    opt.step(grads_for(params, np.random.default_rng(5)))
    before = snapshot(opt)

    def changed(**entries):
        sd = opt.state_dict()
        sd["param_groups"][0]["lr"] = 0.5  # would show if the groups were replaced
        sd["seed"] = 7
        for key, value in entries.items():
            if key == "step":
                sd["state"]["w1"]["step"] = value
            else:
                sd[key] = value
        return sd

    for entries, message in [
        ({"step": None}, r"^state of 'w1': invalid step None \(the steps taken"),
        ({"step": float("nan")}, r"^state of 'w1': invalid step nan"),
        ({"step": 1.5}, r"^state of 'w1': invalid step 1.5"),
        ({"step": "2"}, r"^state of 'w1': invalid step '2'"),
        ({"skipped_steps": "x"}, r"^checkpoint has skipped_steps='x': expected a count"),
        ({"skipped_steps": 2.7}, r"^checkpoint has skipped_steps=2.7"),
        ({"skipped_steps": -1}, r"^checkpoint has skipped_steps=-1"),
        ({"skipped_steps": True}, r"^checkpoint has skipped_steps=True"),
        ({"frozen": ["w1", "nope"]}, r"^checkpoint has unknown frozen parameters \['nope'\]"),
        ({"frozen": "w1"}, r"^checkpoint's frozen: expected a list of parameter names, got 'w1'"),
    ]:
        with pytest.raises(ValueError, match=message):
            opt.load_state_dict(changed(**entries))
        assert snapshot(opt) == before, entries
    for sd, error, message in [
        ([("state", {})], TypeError, "^state_dict: expected a dict, got list"),
        ({"state": {}}, ValueError, "^not a checkpoint of this library: no param_groups"),
        ({}, ValueError, "^not a checkpoint of this library: no state or param_groups"),
    ]:
        with pytest.raises(error, match=message):
            opt.load_state_dict(sd)
        assert snapshot(opt) == before
    # counts written by JSON as floats still load
    opt.load_state_dict(changed(step=3.0, skipped_steps=np.int64(2), frozen=["b1"]))
    assert opt.state["w1"]["step"] == 3 and opt.skipped_steps == 2 and opt.seed == 7


def test_a_hyperparameter_list_changed_in_place_is_a_change():
    """A group's list changed in place (``group["betas"][0] = ...``) is seen and checked at
    the next step, as an assignment is: the validated call is not kept past it."""
    rng = np.random.default_rng(0)
    grads = {"w": rng.standard_normal(5)}
    a, b = {"w": np.ones(5)}, {"w": np.ones(5)}
    opt_a = optim.Adam([{"params": a, "betas": [0.9, 0.999]}], lr=0.1)
    opt_b = optim.Adam([{"params": b, "betas": [0.9, 0.999]}], lr=0.1)
    opt_a.step(grads)
    opt_b.step(grads)
    opt_a.param_groups[0]["betas"][0] = 0.5
    opt_b.param_groups[0]["betas"] = [0.5, 0.999]
    opt_a.step(grads)
    opt_b.step(grads)
    assert_same(a, b)
    opt_a.param_groups[0]["amsgrad"] = 0  # equal to False, but not a bool: checked again
    with pytest.raises(TypeError, match="amsgrad must be a bool, got int"):
        opt_a.step(grads)
    opt_a.param_groups[0]["amsgrad"] = False
    opt_a.param_groups[0]["frozen"] = "no"  # truthy: it would have frozen the group
    with pytest.raises(TypeError, match="frozen must be True or False, got 'no'"):
        opt_a.step(grads)
    with pytest.raises(TypeError, match=r"frozen must be True or False, got \[False\]"):
        optim.Adam([{"params": {"v": np.ones(2)}, "frozen": [False]}])
    opt_a.param_groups[0]["frozen"] = False
    opt_a.param_groups[0]["betas"][1] = float("nan")
    before = a["w"].copy()
    with pytest.raises(ValueError, match="Invalid beta parameter at index 1: nan"):
        opt_a.step(grads)
    assert_same_bits(a["w"], before)
    # a checkpoint's lists are copied into the groups, not shared with the caller
    sd = opt_b.state_dict()
    opt_a.load_state_dict(sd)
    sd["param_groups"][0]["betas"][0] = 0.0
    assert opt_a.param_groups[0]["betas"][0] == 0.5


def test_clipping_a_read_only_gradient_names_its_parameter():
    params = {"w": np.ones(3), "b": np.ones(2), "s": np.ones(2)}
    read_only = np.ones(2)
    read_only.flags.writeable = False
    before = copy(params)
    opt = optim.Adam(params, max_grad_norm=1.0)
    with pytest.raises(ValueError, match=r"^gradient of 's': array is read-only, and max_grad"):
        opt.step({"w": np.ones(3), "b": None, "s": read_only})  # not "grads[1]"
    assert_same(params, before)
    assert opt.state == {}
    assert optim.Adam(params).step({"w": np.ones(3), "b": None, "s": read_only})  # only read


def test_group_names_are_one_string_per_array():
    w, b = np.ones(3), np.ones(2)
    with pytest.raises(ValueError, match=r"names: expected one per array \(2\), got 1"):
        optim.Adam([{"params": [w, b], "names": ["w"]}])
    with pytest.raises(ValueError, match=r"names: expected one per array \(1\), got 2"):
        optim.Adam([{"params": [w], "names": ["w", "b"]}])
    with pytest.raises(TypeError, match=r"names: expected a list of strings, got 'wb'"):
        optim.Adam([{"params": [w, b], "names": "wb"}])
    with pytest.raises(TypeError, match=r"names: expected strings, got \[0, 1\]"):
        optim.Adam([{"params": [w, b], "names": [0, 1]}])  # a checkpoint's keys are strings
    assert optim.Adam([{"params": [w, b], "names": ["w", "b"]}]).names == ["w", "b"]


def test_save_is_atomic(tmp_path, monkeypatch):
    """A crash while writing leaves the previous checkpoint intact and no temporary file."""
    params = model()
    opt = optim.Adam(params)
    opt.step(grads_for(params, np.random.default_rng(6)))
    path = tmp_path / "ckpt.npz"
    opt.save(path)
    good = path.read_bytes()
    opt.step(grads_for(params, np.random.default_rng(7)))

    def crash(file, **arrays):
        file.write(b"partial")
        raise KeyboardInterrupt("power cut")

    monkeypatch.setattr(np, "savez", crash)
    with pytest.raises(KeyboardInterrupt):
        opt.save(path)
    assert path.read_bytes() == good
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt.npz"]


def test_bad_steps_raise_before_any_update():
    params = model()
    opt = optim.Adam([{"params": {"w1": params["w1"]}}, {"params": {"b1": params["b1"]}}])
    before = copy(params)
    good = {"w1": np.ones((6, 5)), "b1": np.ones(5)}
    for grads, error, message in [
        ({**good, "zz": np.ones(3)}, ValueError, "unknown parameters"),
        ({**good, "b1": np.ones(4)}, ValueError, "gradient of 'b1'"),
        ({**good, "b1": np.ones(5, np.float32)}, ValueError, "gradient of 'b1'"),
        ({**good, "b1": [1.0] * 5}, TypeError, "gradient of 'b1'"),
        ({**good, "b1": params["b1"]}, ValueError, "gradient 'b1' and parameter 'b1' share"),
        # another call's parameter: refused before the first call writes it
        ({**good, "b1": params["w1"][0]}, ValueError, "gradient 'b1' and parameter 'w1' share"),
        ([np.ones((6, 5))], ValueError, "expected 2 gradients"),
        (None, TypeError, "^grads: expected a dict name -> gradient or a list of gradients"),
        (np.ones((2, 5)), TypeError, "^grads: expected a dict .* got ndarray"),  # not its rows
    ]:
        with pytest.raises(error, match=message):
            opt.step(grads)
        assert_same(params, before)
        assert opt.state == {}  # no state made for a step that did not run
    one = optim.Adam({"w1": params["w1"].copy()}, amsgrad=True)  # one call: the kernel refuses it
    one.step({"w1": good["w1"]})
    with pytest.raises(ValueError, match="gradient 'w1' and state 'max_exp_avg_sq' of 'w1' sh"):
        one.step({"w1": one.state["w1"]["max_exp_avg_sq"]})  # named as the step names arrays
    strided = np.zeros(8)  # state that shares no element with the param: not an overlap
    one = optim.Adam({"w": strided[2:4]})
    one.step({"w": np.ones(2)})
    one.state["w"]["exp_avg"] = strided[0:8:4]
    with pytest.raises(ValueError, match="^state 'exp_avg' of 'w': expected a C- or F-contig"):
        one.step({"w": np.ones(2)})  # the kernel's own error, not renamed an overlap
    w = np.ones((6, 5))
    fresh = optim.Adam({"a": w[:2], "b": w[1:3]})  # parameters that overlap: one call
    with pytest.raises(ValueError, match="parameter 'a' and parameter 'b' share memory"):
        fresh.step({"a": np.ones((2, 5)), "b": np.ones((2, 5))})
    assert fresh.state == {}
    assert np.all(w == 1)
    opt.param_groups[1]["lr"] = -1.0
    with pytest.raises(ValueError, match="Invalid learning rate"):
        opt.step(good)
    assert_same(params, before)
    opt.param_groups[1]["lr"] = 1e-3
    opt.step(good)
    before, state = copy(params), opt.state["b1"]["exp_avg"].copy()
    with pytest.raises(ValueError, match="gradient 'b1' and state 'exp_avg' of 'b1' share"):
        opt.step({**good, "b1": opt.state["b1"]["exp_avg"]})  # the second call's own state
    assert_same(params, before)
    assert_same_bits(opt.state["b1"]["exp_avg"], state)


@pytest.mark.parametrize("cls", [optim.ScheduleFreeSGD, optim.ScheduleFreeAdamW])
def test_a_schedule_free_switch_that_fails_writes_nothing(cls):
    """train()/eval() check every parameter, master and z before the first is written: a
    switch that stopped halfway would leave the earlier parameters switched and the mode
    unchanged, and the next attempt would move them twice. After the refusals, the same
    switches give the bits of a twin that never failed."""
    masters = cls is optim.ScheduleFreeAdamW
    dtype = ml_dtypes.bfloat16 if masters else np.float32

    def make():
        rng = np.random.default_rng(5)
        params = {n: rng.standard_normal(4).astype(dtype) for n in ("a", "b", "c")}
        groups = [{"params": {"a": params["a"]}}, {"params": {"b": params["b"], "c": params["c"]}}]
        opt = cls(groups, master_weights=masters)
        for _ in range(2):
            opt.step({n: rng.standard_normal(4).astype(np.float32) for n in params})
        return params, opt

    params, opt = make()
    twin_params, twin = make()

    before = {n: p.copy() for n, p in params.items()}
    state = {n: {k: v.copy() for k, v in s.items() if k != "step"} for n, s in opt.state.items()}

    def refused(error, match, undo):
        with pytest.raises(error, match=match):
            opt.eval()
        undo()
        assert_same(params, before)
        for n, s in state.items():
            for k, v in s.items():
                assert_same_bits(opt.state[n][k], v)
        assert all(g["train_mode"] for g in opt.param_groups)

    params["c"].setflags(write=False)
    refused(
        ValueError, "^parameter 'c': array is read-only", lambda: params["c"].setflags(write=True)
    )
    z = opt.state["c"]["z"]
    opt.state["c"]["z"] = z[:3]
    refused(
        ValueError,
        r"^state 'z' of 'c': expected the parameter's shape \(4,\)",
        lambda: opt.state["c"].update(z=z),
    )
    opt.state["c"]["z"] = list(z)
    refused(
        TypeError,
        "^state 'z' of 'c': expected a numpy.ndarray or QuantizedState",
        lambda: opt.state["c"].update(z=z),
    )
    group = opt.param_groups[1]
    if masters:
        master = opt.state["c"]["master"]
        master.setflags(write=False)
        refused(
            ValueError,
            "^state 'master' of 'c': array is read-only",
            lambda: master.setflags(write=True),
        )
        group["betas"] = (0.0, 0.999)
        refused(
            ValueError,
            r"^eval\(\) with betas 0.0: the parameters hold y = z",
            lambda: group.update(betas=(0.9, 0.999)),
        )
    good = group[opt.beta_name]
    group[opt.beta_name] = (-1.0, 0.999) if masters else -1.0
    refused(ValueError, "^Invalid", lambda: group.update({opt.beta_name: good}))
    for o in (opt, twin):
        o.eval()
    assert_same(params, twin_params)
    for o in (opt, twin):
        o.train()
    assert_same(params, twin_params)
    if masters:  # a pair given as a list (as JSON gives it back) switches as the tuple
        group["betas"] = list(group["betas"])
        for o in (opt, twin):
            o.eval()
        assert_same(params, twin_params)


@pytest.mark.parametrize("impl", [None, "reference"])
def test_replaced_state_is_refused_before_any_call_writes(impl):
    """State replaced by hand with an array no kernel takes: in a step of several fused calls
    (two groups), or of one call after clipping, every call's arrays are checked before the
    first writes, and the error names the parameter. Element-wise kernels and the matrix
    ones (Muon, Adafactor) alike; with impl="reference" too, whose calls the kernels' checks
    guard (the reference alone takes a float64 buffer, or a gradient that is the state)."""
    rng = np.random.default_rng(3)

    def two_groups(cls, shape, **options):
        arrays = {k: rng.standard_normal(shape).astype(np.float32) for k in ("a", "b")}
        groups = [{"params": {"a": arrays["a"]}}, {"params": {"b": arrays["b"]}, "lr": 0.02}]
        opt = cls(groups, impl=impl, **options)
        grads = {k: rng.standard_normal(shape).astype(np.float32) for k in arrays}
        opt.step(grads)
        return opt, arrays, grads

    def refused(opt, arrays, grads, error, message):
        before, given, state = copy(arrays), copy(grads), copy_module.deepcopy(opt.state)
        with pytest.raises(error, match=message):
            opt.step(grads)
        assert_same(arrays, before)
        assert_same(grads, given)  # clipping scales them in place: not before the checks
        assert opt.state.keys() == state.keys()
        for name, entry in state.items():  # codes, scales, steps and all
            assert_same(opt.state[name], entry, name)

    read_only = np.zeros(4, np.float32)
    read_only.flags.writeable = False
    for bad, error, message in [
        (np.zeros(4, np.float64), TypeError, "^state 'exp_avg' of 'b': expected dtype float32"),
        (np.zeros(3, np.float32), ValueError, "^state 'exp_avg' of 'b': expected shape"),
        (np.zeros(8, np.float32)[::2], ValueError, "^state 'exp_avg' of 'b': expected a C- or"),
        (read_only, ValueError, "^state 'exp_avg' of 'b': array is read-only"),
    ]:
        opt, arrays, grads = two_groups(optim.Adam, 4)
        opt.state["b"]["exp_avg"] = bad
        refused(opt, arrays, grads, error, message)
    opt, arrays, grads = two_groups(optim.Adam, 300, state_dtype="int8", max_grad_norm=0.5)
    opt.state["a"]["exp_avg"] = QuantizedState.from_array(np.ones(300, np.float32), signed=False)
    refused(opt, arrays, grads, TypeError, "^state 'exp_avg' of 'a' \\(codes\\): uint8")
    one = optim.SGD({"w": arrays["a"]}, momentum=0.9, max_grad_norm=0.5, impl=impl)  # clipped
    one.step({"w": grads["a"]})
    one.state["w"]["momentum_buffer"] = np.zeros(300)
    refused(one, {"w": arrays["a"]}, {"w": grads["a"]}, TypeError, "^state 'momentum_buffer' ")
    opt, arrays, grads = two_groups(optim.Muon, (3, 4))
    opt.state["b"]["momentum_buffer"] = np.zeros((3, 4))
    refused(opt, arrays, grads, TypeError, "^parameter 'b': momentum_buffer must be float32")
    opt, arrays, grads = two_groups(optim.Adafactor, (3, 4))
    opt.state["b"]["row_var"] = np.zeros((3, 2), np.float32)
    refused(opt, arrays, grads, ValueError, "^parameter 'b': row_var")
    one = optim.Adam({"w": arrays["a"]}, impl=impl)  # one call: the gradient is its state
    one.step({"w": grads["a"]})
    message = "gradient 'w' and state 'exp_avg' of 'w' share memory"
    refused(one, {"w": arrays["a"]}, {"w": one.state["w"]["exp_avg"]}, ValueError, message)


def test_every_tensor_a_kernels_message_names_is_a_parameter():
    """A kernel's message that compares one tensor with another of its call names both as the
    step names parameters, not by their places in the call; so do steps of calls that differ
    only in their step counts, which are checked as one."""
    params = {k: np.ones(3, np.float32) for k in "abc"}
    opt = optim.Adam([{"params": {"a": params["a"]}}, {"params": {k: params[k] for k in "bc"}}])
    opt.step({k: np.ones(3, np.float32) for k in "abc"})
    opt.step({"a": np.ones(3, np.float32), "b": None, "c": np.ones(3, np.float32)})
    assert [opt.state[k]["step"] for k in "abc"] == [2, 1, 2]  # b and c: two calls
    opt.state["c"]["exp_avg"] = np.zeros(3)
    message = "^state 'exp_avg' of 'c': expected dtype float32 like state 'exp_avg' of 'b', got"
    with pytest.raises(TypeError, match=message):
        opt.step({k: np.ones(3, np.float32) for k in "abc"})
    assert [opt.state[k]["step"] for k in "abc"] == [2, 1, 2]


def test_add_param_group_adds_the_whole_group_or_nothing():
    """A group refused by add_param_group leaves no parameter behind (a list step still takes
    one gradient per parameter, the name can be added again); a group added later steps, with
    stochastic rounding, to the bits of the same group given at construction (its parameters
    take the same places, which seed their random bits)."""
    rng = np.random.default_rng(8)
    start = {
        k: rng.standard_normal(s).astype(ml_dtypes.bfloat16)
        for k, s in (("w", (4, 5)), ("x", (7,)))
    }
    later = {k: v.copy() for k, v in start.items()}
    opt = optim.AdamW({"w": later["w"]}, stochastic_rounding=True, seed=4)
    with pytest.raises(ValueError, match="Invalid learning rate"):
        opt.add_param_group({"params": {"x": later["x"]}, "lr": -1.0})
    assert len(opt.param_groups) == 1 and opt.names == ["w"]
    opt.step([np.ones((4, 5), np.float32)])  # one gradient: x is not a parameter
    later["w"][...] = start["w"]
    opt = optim.AdamW({"w": later["w"]}, stochastic_rounding=True, seed=4)
    opt.add_param_group({"params": {"x": later["x"]}, "lr": 0.02})
    both = {k: v.copy() for k, v in start.items()}
    ref = optim.AdamW(
        [{"params": {"w": both["w"]}}, {"params": {"x": both["x"]}, "lr": 0.02}],
        stochastic_rounding=True,
        seed=4,
    )
    for _ in range(3):
        grads = {k: rng.standard_normal(v.shape).astype(np.float32) for k, v in start.items()}
        opt.step(grads)
        ref.step(grads)
    for k in start:
        assert later[k].tobytes() == both[k].tobytes(), k


def test_bad_construction():
    with pytest.raises(ValueError, match="Invalid learning rate"):
        optim.SGD(model(), lr=-1)
    with pytest.raises(ValueError, match="Invalid beta parameter at index 1"):
        optim.Adam(model(), betas=(0.9, 1.0))
    with pytest.raises(TypeError, match="single array"):
        optim.Adam(np.zeros(3))
    with pytest.raises(TypeError, match="float32, float64, bfloat16 or float16, got int32"):
        optim.Adam([np.zeros(3, np.int32)])
    with pytest.raises(ValueError, match="more than one group"):
        p = model()
        optim.Adam([{"params": {"w1": p["w1"]}}, {"params": {"w1": p["b1"]}}])
    with pytest.raises(ValueError, match="unknown hyperparameters"):
        optim.Adam([{"params": [np.zeros(3)], "momentum": 0.9}])
    with pytest.raises(ValueError, match="empty parameter list"):
        optim.Adam([])
    with pytest.raises(
        TypeError, match=r"a group's params: expected names that are strings, got \[1\]"
    ):
        optim.Adam({1: np.zeros(3)})  # not "1": step({1: g}) would not find it


def test_skip_if_nonfinite_and_max_grad_norm_options():
    params = model()
    opt = optim.Adam(params, lr=0.01, skip_if_nonfinite=True, max_grad_norm=1.0)
    before = copy(params)
    grads = grads_for(params, np.random.default_rng(8))
    grads["b2"][1] = np.inf
    assert opt.step(grads) is False and opt.skipped_steps == 1
    assert_same(params, before)
    assert opt.state == {}
    grads = {n: g * 100 for n, g in grads_for(params, np.random.default_rng(9)).items()}
    assert isinstance(grads["scale"], np.float64)  # 0-d arithmetic gives a scalar: accepted
    grads["scale"] = np.asarray(grads["scale"])  # (here as an array, to see it clipped)
    assert opt.step(grads) is True
    assert fusedopt.global_norm(list(grads.values())) == pytest.approx(1.0, rel=1e-6)
    opt.step({**grads, "scale": np.float64(0.5)})


@pytest.mark.parametrize("norm", [np.array(2.0), np.float32(2.0), 2])
def test_max_grad_norm_of_any_accepted_type_is_checkpointed_as_a_float(norm, tmp_path):
    """max_grad_norm as clip_grad_norm_ takes it (a 0-d array or NumPy scalar too) is kept as
    a float: the checkpoint's JSON holds it, and the loaded optimizer clips as the first."""
    params = model()
    opt = optim.Adam(params, lr=0.01, max_grad_norm=norm)
    assert type(opt.max_grad_norm) is float and opt.max_grad_norm == 2.0
    opt.step(grads_for(params, np.random.default_rng(8)))
    opt.save(tmp_path / "ckpt.npz")
    loaded = optim.Optimizer.load(tmp_path / "ckpt.npz", copy(params))
    assert loaded.max_grad_norm == 2.0
    opt.max_grad_norm = np.array(3.0)  # set later: state_dict() takes it as a float too
    assert opt.state_dict()["max_grad_norm"] == 3.0
    opt.max_grad_norm = "3"
    with pytest.raises(ValueError, match="Invalid max_grad_norm: '3'"):
        opt.state_dict()


# ---------------------------------------------------------------- global norm and clipping


def test_global_norm_and_clipping():
    rng = np.random.default_rng(10)
    grads = [rng.standard_normal(s) * 3 for s in [(0,), (7,), (70000,), (3, 5)]]
    expected = np.sqrt(sum(float(np.sum(g.astype(np.float64) ** 2)) for g in grads))
    assert fusedopt.global_norm(grads) == pytest.approx(expected, rel=1e-13)
    assert fusedopt.global_norm(grads + [None]) == fusedopt.global_norm(grads)
    original = [g.copy() for g in grads]
    norm = fusedopt.clip_grad_norm_(grads, 2.0)
    assert norm == fusedopt.global_norm(original)
    for g, o in zip(grads, original):
        np.testing.assert_allclose(g, o * (2.0 / (norm + 1e-6)), rtol=1e-15)
    assert fusedopt.clip_grad_norm_(grads, 1e9) == pytest.approx(2.0, rel=1e-6)  # no-op
    mixed = [rng.standard_normal(10).astype(np.float32), rng.standard_normal(20)]
    assert fusedopt.global_norm(mixed) == pytest.approx(
        np.sqrt(sum(float(np.sum(g.astype(np.float64) ** 2)) for g in mixed)), rel=1e-13
    )
    bad = [np.array([1.0, np.nan])]
    with pytest.raises(RuntimeError, match="non-finite"):
        fusedopt.clip_grad_norm_(bad, 1.0, error_if_nonfinite=True)
    assert_same_bits(bad[0], np.array([1.0, np.nan]))
    before = [g.copy() for g in grads]
    for bad_norm, error in [
        (-1.0, ValueError),
        (np.nan, ValueError),
        (np.inf, ValueError),
        (10**400, ValueError),
        (True, TypeError),
        ("1", TypeError),
        (np.array([1.0, 2.0]), TypeError),
    ]:
        with pytest.raises(error, match="max_norm"):
            fusedopt.clip_grad_norm_(grads, bad_norm)
        assert_identical({"grads": grads}, {"grads": before})
    # a 0-d array of a number is one, as float() takes it in torch's clip_grad_norm_
    assert fusedopt.clip_grad_norm_(grads, np.array(1.0)) == fusedopt.global_norm(before)
    for not_grads, got in [(3.0, "float"), ("ab", "str"), (None, "NoneType"),
                           ({"w": grads[1]}, "dict \\(its values\\(\\) are\\)")]:  # fmt: skip
        for fn in (fusedopt.global_norm, lambda g: fusedopt.clip_grad_norm_(g, 1.0)):
            with pytest.raises(TypeError, match=f"^grads: expected a numpy.ndarray or an iterable "
                               f"of them \\(None for no gradient\\), got {got}$"):  # fmt: skip
                fn(not_grads)


def test_misaligned_params_and_grads_are_named():
    """A view at an odd byte offset is refused by the parameter's name, when the optimizer is
    made (param) or before a step writes anything (grad)."""
    with pytest.raises(ValueError, match="^parameter 'w': expected an array aligned"):
        optim.Adam({"w": misaligned(np.ones(4, np.float32))})
    params = {"a": np.ones(4, np.float32), "w": np.ones(4, np.float32)}
    opt = optim.Adam(params, lr=0.1)
    grads = {"a": np.ones(4, np.float32), "w": misaligned(np.ones(4, np.float32))}
    with pytest.raises(ValueError, match="^gradient of 'w': expected an array aligned"):
        opt.step(grads)
    assert_same_bits(params["a"], np.ones(4, np.float32))
    assert not opt.state


@pytest.mark.parametrize(
    "options", [{}, {"skip_if_nonfinite": True}, {"max_grad_norm": 1.0}, {"groups": 2}], ids=str
)
def test_gradients_the_kernels_refuse_are_named_before_anything_changes(options):
    """A gradient in another memory layout than its parameter's, a strided one, or a parameter
    made read-only: the calls' kernels refuse them, named as the step names parameters, before
    the non-finite check, clipping or any call has touched anything, and no state is made."""
    options = dict(options)
    two = options.pop("groups", 1) == 2

    def fresh():
        params = {"w": np.ones((3, 4), np.float32), "b": np.ones(4, np.float32)}
        groups = [{"params": {"w": params["w"]}}, {"params": {"b": params["b"]}, "lr": 0.1}]
        return params, optim.Adam(groups if two else params, **options)

    # a NaN: a non-finite check that ran first would skip the step instead of refusing it
    good = {"w": np.ones((3, 4), np.float32), "b": np.array([np.nan, 1, 1, 1], np.float32)}
    for grads, message in [
        ({**good, "w": np.asfortranarray(good["w"])}, "^gradient of 'w': expected the memory"),
        ({**good, "b": np.ones(8, np.float32)[::2]}, "^gradient of 'b': expected a C- or F-"),
        (good, "^parameter 'b': array is read-only"),
    ]:
        params, opt = fresh()
        if "read-only" in message:
            params["b"].flags.writeable = False
        before = copy(params)
        given = {k: g.copy() for k, g in grads.items()}
        with pytest.raises(ValueError, match=message):
            opt.step(grads)
        assert_same(params, before)
        assert_same(grads, given)
        assert opt.state == {} and opt.skipped_steps == 0


def read_only(a):
    a.flags.writeable = False
    return a


@pytest.mark.parametrize(
    "case, match",
    [  # grads of two dtypes: one call each, the float16 one first (sorted by dtype)
        ("read-only", r"^grads\[3\]: array is read-only$"),
        ("strided", r"^grads\[3\]: expected a C- or F-contiguous array, got a strided view"),
        ("overlapping", r"^grads\[1\] and grads\[3\] share memory; an array that is updated"),
    ],
)
@pytest.mark.parametrize("dtypes", [(np.float16, np.float32), (np.float32, np.float32)])
def test_clipping_names_a_gradient_it_cannot_scale_and_changes_none(case, match, dtypes):
    """Whichever dtype's call would meet it, a gradient that cannot be scaled in place is
    named by its place in the list (not in one dtype's call), before any gradient is scaled."""
    first = np.full(8, 3.0, dtypes[0])
    second = np.full(8, 4.0, np.float32)
    bad = {
        "read-only": read_only(np.full(8, 5.0, dtypes[1])),
        "strided": np.full(16, 5.0, dtypes[1])[::2],
        "overlapping": second[:4] if dtypes[1] == np.float32 else None,
    }[case]
    if bad is None:  # a float16 view of the float32 grad's bytes: another dtype's call
        bad = second.view(np.uint8)[:16].view(np.float16)
    grads = [first, second, None, bad]
    before = [None if g is None else g.copy() for g in grads]
    for given in (grads, iter(grads)):  # an iterator is read once, and checked as a list
        with pytest.raises(ValueError, match=match):
            fusedopt.clip_grad_norm_(given, 1.0)
        for g, b in zip(grads, before):
            if g is not None:
                assert_same_bits(g, b)


def test_global_norm_is_bit_identical_for_any_thread_count():
    rng = np.random.default_rng(11)
    grads = [rng.standard_normal(s).astype(np.float32) for s in [(300001,), (5,), (70000,)]]
    norms = set()
    try:
        for threads in (1, 2, 3, os.cpu_count() or 1):
            fusedopt.set_num_threads(threads)
            norms.add(fusedopt.global_norm(grads))
    finally:
        fusedopt.set_num_threads(None)
    assert len(norms) == 1


@pytest.mark.skipif(torch is None, reason="torch not installed: torch comparison skipped")
def test_clip_grad_norm_matches_torch():
    rng = np.random.default_rng(12)
    grads = [rng.standard_normal(s) for s in [(30, 20), (20,), (1000,)]]
    tgrads = [torch.tensor(g) for g in grads]
    tparams = [torch.zeros_like(t, requires_grad=True) for t in tgrads]
    for p, g in zip(tparams, tgrads):
        p.grad = g.clone()
    tnorm = torch.nn.utils.clip_grad_norm_(tparams, 5.0, foreach=False)
    norm = fusedopt.clip_grad_norm_(grads, 5.0)
    assert norm == pytest.approx(float(tnorm), rel=1e-12)
    for g, p in zip(grads, tparams):
        np.testing.assert_allclose(g, p.grad.numpy(), rtol=1e-12)


@pytest.mark.skipif(torch is None, reason="torch not installed: torch comparison skipped")
@pytest.mark.parametrize("bad", [np.nan, np.inf], ids=["nan", "inf"])
@pytest.mark.parametrize("dtype", [np.float32, ml_dtypes.bfloat16], ids=["float32", "bfloat16"])
def test_clipping_a_nonfinite_norm_matches_torch(bad, dtype):
    """A NaN norm makes every gradient NaN (torch's clamp keeps the NaN coefficient; they
    were left as they were), an infinite one scales them by 0: finite elements 0, infinite
    ones NaN."""
    grads = [np.array([bad, 1.0, -2.0], dtype), np.ones((2, 3), dtype), np.ones(0, dtype)]
    tparams = [torch.zeros(g.shape, requires_grad=True) for g in grads]
    for p, g in zip(tparams, grads):
        p.grad = torch.tensor(g.astype(np.float32))
    tnorm = torch.nn.utils.clip_grad_norm_(tparams, 5.0, foreach=False)
    norm = fusedopt.clip_grad_norm_(grads, 5.0)
    assert np.isnan(norm) if np.isnan(bad) else norm == float(tnorm) == np.inf
    for g, p in zip(grads, tparams):
        expected = p.grad.numpy()
        np.testing.assert_array_equal(np.isnan(g.astype(np.float32)), np.isnan(expected))
        np.testing.assert_array_equal(g.astype(np.float32)[~np.isnan(expected)],
                                      expected[~np.isnan(expected)])  # fmt: skip


def test_every_class_is_covered():
    assert {"Adamax", "NAdam", "RAdam"} <= set(CLASSES)
    for name, (_, hypers) in CLASSES.items():
        assert len(hypers) >= 3, name
    if torch is not None:
        assert {c.values[0].__name__ for c in TORCH_CASES} >= {
            "SGD",
            "Adam",
            "AdamW",
            "Adamax",
            "NAdam",
            "RAdam",
            "Adagrad",
            "RMSprop",
        }


def test_impl_reference_is_per_instance(monkeypatch):
    """impl="reference" runs fusedopt.reference's function; the others are untouched."""
    calls = []
    real = fusedopt.reference.adam_
    monkeypatch.setattr(
        fusedopt.reference, "adam_", lambda *a, **k: calls.append(1) or real(*a, **k)
    )
    a, b = model(), model()
    plain, slow = optim.Adam(a, lr=0.01), optim.Adam(b, lr=0.01, impl="reference")
    grads = grads_for(a, np.random.default_rng(0))
    plain.step(grads)
    assert calls == []
    slow.step(grads)
    assert calls == [1]
    assert_same(a, b)
    with pytest.raises(ValueError, match="^impl: expected None, 'fused' or 'reference'"):
        optim.Adam(a, impl="numpy")


def test_reference_kernels_is_local_to_its_thread(monkeypatch):
    """reference_kernels() in one thread leaves an optimizer stepped in another thread on the
    fused kernels, and impl="fused" overrides it."""
    calls = []
    real = fusedopt.reference.adam_
    monkeypatch.setattr(
        fusedopt.reference,
        "adam_",
        lambda *a, **k: calls.append(threading.current_thread().name) or real(*a, **k),
    )
    params = model()
    opt, fused = optim.Adam(params), optim.Adam(model(seed=1), impl="fused")
    grads = grads_for(params, np.random.default_rng(0))
    inside, other = threading.Event(), threading.Event()

    def hold():
        with optim.reference_kernels():
            inside.set()
            other.wait(10)

    holder = threading.Thread(target=hold, name="holder")
    holder.start()
    inside.wait(10)
    opt.step(grads)  # this thread: not inside the block
    other.set()
    holder.join()
    assert calls == []
    with optim.reference_kernels():
        fused.step(grads)
        assert calls == []
        opt.step(grads)
    assert calls == [threading.current_thread().name]


def hyperparameters(opt):
    return [{k: v for k, v in g.items() if k not in ("params", "names")} for g in opt.param_groups]


def test_from_config_builds_every_class():
    """A flat dict, as a hyperparameter search samples it, builds the same optimizer as the
    class: any case of the name, beta1/beta2 for betas (a missing one the default), options
    passed through."""
    for name, (cls, hypers) in CLASSES.items():
        for hyper in hypers:
            flat = dict(hyper)
            if "betas" in flat:
                flat["beta1"], flat["beta2"] = flat.pop("betas")
            expected = hyperparameters(cls(model(), **hyper))
            for spelled in (name, name.lower(), name.upper(), cls):
                built = optim.from_config(spelled, model(), **flat)
                assert type(built) is cls
                assert hyperparameters(built) == expected, (spelled, hyper)
    lion = optim.from_config("lion", model(), beta2=0.95)
    assert lion.param_groups[0]["betas"] == (0.9, 0.95)
    adam = optim.from_config("Adam", model(), lr=0.1, betas=(0.8, 0.9), impl="reference")
    assert adam.param_groups[0]["betas"] == (0.8, 0.9) and adam.impl == "reference"
    sgd = optim.from_config("SGD", model(), lr=0.1, momentum=0.9, max_grad_norm=1.0, seed=3)
    assert sgd.max_grad_norm == 1.0 and sgd.seed == 3


def test_from_config_errors_name_what_is_accepted():
    with pytest.raises(
        ValueError,
        match=r"unknown optimizer 'adamm' \(did you mean Adam\?\): "
        r"expected one of .*AdamW.*SGD",
    ):
        optim.from_config("adamm", model())
    with pytest.raises(ValueError, match="unknown optimizer 'Optimizer'"):
        optim.from_config(optim.Optimizer, model())
    with pytest.raises(
        TypeError,
        match=r"^Lion does not take 'momentum': its hyperparameters are lr, betas \(or beta1, "
        r"beta2\), weight_decay, maximize; the options max_grad_norm, .*seed$",
    ):
        optim.from_config("Lion", model(), lr=1e-3, momentum=0.9)
    with pytest.raises(TypeError, match="^Momentum does not take 'beta1', 'beta2'"):
        optim.from_config("Momentum", model(), beta1=0.9, beta2=0.99)
    with pytest.raises(TypeError, match="^Adam: give betas or beta1/beta2, not both"):
        optim.from_config("Adam", model(), betas=(0.9, 0.99), beta1=0.8)
    with pytest.raises(ValueError, match="Invalid learning rate: -1"):  # the class's own check
        optim.from_config("RMSprop", model(), lr=-1.0)


@pytest.mark.parametrize(
    "name", sorted(n for n in optim.__all__ if n[0].isupper() and n != "Optimizer")
)
def test_two_groups_give_the_bits_of_one_optimizer_per_group(name):
    """A step of two groups (two fused calls, checked together for shared memory first), with
    a 1-D parameter where the class takes one and int8 state where it can have it: the bits of
    one optimizer per group, for every class, the second seeded as its call is (by the place of
    its first parameter)."""
    rng = np.random.default_rng(4)
    shapes = (
        {"w": (4, 5), "w2": (3, 3)} if name == "Muon" else {"w": (4, 5), "b": (7,), "w2": (3, 3)}
    )
    start = {k: rng.standard_normal(s).astype(np.float32) for k, s in shapes.items()}
    first, second = list(shapes)[:-1], list(shapes)[-1:]
    int8 = {} if name == "Adafactor" else {"state_dtype": "int8"}  # Adafactor's stay float32
    cls = getattr(optim, name)
    together = {k: v.copy() for k, v in start.items()}
    apart = {k: v.copy() for k, v in start.items()}
    opt = cls(
        [
            {"params": {k: together[k] for k in first}},
            {"params": {k: together[k] for k in second}, "lr": 0.02},
        ],
        **int8,
    )
    opts = [
        cls({k: apart[k] for k in first}, **int8),
        cls({k: apart[k] for k in second}, lr=0.02, seed=optim._call_seed(0, len(first)), **int8),
    ]
    for o in [opt, *opts]:
        if hasattr(o, "train"):
            o.train()
    for _ in range(3):
        grads = {k: rng.standard_normal(s).astype(np.float32) for k, s in shapes.items()}
        opt.step(grads)
        opts[0].step({k: grads[k] for k in first})
        opts[1].step({k: grads[k] for k in second})
    for k in shapes:
        assert together[k].tobytes() == apart[k].tobytes(), k


def test_clipping_checks_gradients_against_written_memory_before_it_scales_them():
    """max_grad_norm scales the gradients in place: one on another group's parameter, or on its
    own state in a step of one call, is refused before clipping writes anything."""
    w, b = np.full((4, 5), 100.0, np.float32), np.ones(5, np.float32)
    opt = optim.Adam([{"params": {"w": w}}, {"params": {"b": b}}], max_grad_norm=1.0)
    before = w.copy(), b.copy()
    with pytest.raises(ValueError, match="gradient 'b' and parameter 'w' share memory"):
        opt.step({"w": np.ones((4, 5), np.float32), "b": w[0]})
    assert_same_bits(w, before[0])
    assert_same_bits(b, before[1])
    single = optim.Adam({"b": b}, max_grad_norm=1.0)
    single.step({"b": np.full(5, 3.0, np.float32)})
    state = single.state["b"]["exp_avg"]
    saved = state.copy(), b.copy()
    with pytest.raises(ValueError, match="gradient 'b' and state 'exp_avg' of 'b' share memory"):
        single.step({"b": state})
    assert_same_bits(state, saved[0])
    assert_same_bits(b, saved[1])


@pytest.mark.parametrize("cls", sorted(set(optim._REGISTRY.values()), key=lambda c: c.__name__))
def test_class_signatures_list_the_options_every_optimizer_takes(cls):
    """help() and editors show state_dtype, master_weights, ... with the defaults the class
    passes on to Optimizer, and the signature binds as the constructor does."""
    if cls.__name__.startswith("_"):
        pytest.skip("not public")
    base = inspect.signature(optim.Optimizer.__init__).parameters
    options = [n for n, p in base.items() if p.kind is p.KEYWORD_ONLY]
    params = inspect.signature(cls).parameters
    for name in options:
        assert params[name].kind is inspect.Parameter.KEYWORD_ONLY, name
        assert params[name].default == base[name].default, name
    assert not any(p.kind is p.VAR_KEYWORD for p in params.values())
    opt = cls([np.zeros((4, 4), np.float32)], seed=7, state_dtype=None)
    assert opt.seed == 7


def _twins(cls, hyper, options):
    """Two optimizers of ``cls`` on equal parameters: the second builds its calls at every step;
    the first reuses the last step's where it finds them the same, and counts the steps that
    did."""
    rng = np.random.default_rng(7)
    shapes = {"w1": (6, 5), "b1": (5,), "w2": (5, 3), "b2": (3,)}
    if cls is optim.Muon:  # matrices only
        shapes = {"w1": (6, 5), "b1": (1, 5), "w2": (5, 3), "b2": (3, 2)}
    dtypes = {
        "w1": np.float32,
        "b1": np.float32,
        "w2": ml_dtypes.bfloat16,
        "b2": ml_dtypes.bfloat16,
    }
    start = {n: rng.standard_normal(s).astype(dtypes[n]) for n, s in shapes.items()}
    made = []
    for _ in range(2):
        params = {n: a.copy() for n, a in start.items()}
        groups = [
            {"params": {k: params[k] for k in ("w1", "b1")}},
            {"params": {k: params[k] for k in ("w2", "b2")}, "lr": hyper["lr"] / 2},
        ]
        made.append((cls(groups, **hyper, **options), params))
    (reusing, _), (building, _) = made
    building._calls_as_before = lambda *args: None
    reused = [0]
    as_before = reusing._calls_as_before

    def counted(*args):
        calls = as_before(*args)
        reused[0] += calls is not None
        return calls

    reusing._calls_as_before = counted
    return made, reused


def _assert_twins_same(made, when):
    (a, pa), (b, pb) = made
    for n in pa:
        assert_same_bits(pa[n], pb[n], f"{n} after {when}")
    ours, theirs = list(state_arrays(a)), list(state_arrays(b))
    assert [name for name, _ in ours] == [name for name, _ in theirs], when
    for (name, x), (_, y) in zip(ours, theirs):
        assert_same_bits(x, y, f"{name} after {when}")
    scalars = [
        {
            n: {k: v for k, v in s.items() if not isinstance(v, (np.ndarray, QuantizedState))}
            for n, s in sorted(o.state.items())
        }
        for o in (a, b)
    ]
    assert scalars[0] == scalars[1], when


@pytest.mark.parametrize(
    "options",
    [{}, {"skip_if_nonfinite": True, "max_grad_norm": 1.0}, {"stochastic_rounding": True}],
    ids=["plain", "checked", "stochastic"],
)
@pytest.mark.parametrize(
    "cls, hyper",
    [pytest.param(cls, hypers[0], id=name) for name, (cls, hypers) in CLASSES.items()]
    + [pytest.param(optim.SGD, dict(lr=0.05, momentum=0.9), id="SGD-momentum")],
)
def test_a_step_reusing_the_last_steps_calls_equals_one_building_them(cls, hyper, options):
    """A step reuses the last step's fused calls (Optimizer._calls_as_before) only where
    building them would give the same. Through step counts and state values that split a call,
    gradients of another dtype or missing, frozen parameters, a new lr, a hyperparameter that
    adds a state array, state replaced, changed, removed or loaded, a step count that cannot
    grow, a skipped step and a new group, its parameters and state stay the same bits as those
    of a twin that builds its calls at every step, it raises the same errors, and most of its
    steps reuse the calls."""
    made, reused = _twins(cls, hyper, options)
    (first, params), _ = made
    rng = np.random.default_rng(8)

    def random_grads():
        return {
            n: rng.standard_normal(p.shape).astype(np.float32).astype(p.dtype)
            for n, p in params.items()
        }

    def step_once(grads, when):
        outcomes = []
        for o, _ in made:
            try:
                outcomes.append(o.step({n: g if g is None else g.copy() for n, g in grads.items()}))
            except (TypeError, ValueError) as error:
                outcomes.append((type(error), str(error)))
        assert outcomes[0] == outcomes[1], when
        _assert_twins_same(made, when)

    def step(grads=None, when="a step"):
        step_once(grads or random_grads(), when)
        step_once(random_grads(), f"the step after {when}")

    def both(change):
        for o, _ in made:
            change(o)

    def arrays_of(state):
        return [k for k, v in sorted(state.items()) if isinstance(v, np.ndarray)]

    step()
    step(when="again")
    # state that splits a call of two tensors
    if "mu_product" in first.state["b1"]:
        both(lambda o: o.state["b1"].update(mu_product=o.state["b1"]["mu_product"] * 0.5))
        step(when="one tensor's mu_product changed")
    if "step" in first.state["w1"]:
        both(lambda o: [s.update(step=20) for s in o.state.values()])
        step(when="every step count changed")
        both(lambda o: [o.state[n].update(step=3) for n in ("w1", "w2")])
        step(when="one step count in each group changed")
        both(lambda o: [s.update(step=25) for s in o.state.values()])
        step(when="the step counts equal again")
        both(lambda o: [s.update(step=2**63 - 1) for s in o.state.values()])
        step(when="step counts that cannot grow")
        both(lambda o: [s.update(step=30) for s in o.state.values()])
        step(when="step counts that can grow again")
    # the gradients
    grads = {n: rng.standard_normal(p.shape).astype(np.float32) for n, p in params.items()}
    step(grads, "float32 gradients of bfloat16 parameters")
    mixed = {n: g.astype(params[n].dtype) for n, g in grads.items()}
    step({**mixed, "w2": grads["w2"]}, "one bfloat16 parameter's gradient float32")
    step_once({**mixed, "b1": None}, "a missing gradient")
    step({**mixed, "w1": None}, "another missing gradient, of the same dtype")
    both(lambda o: o.freeze("w2"))
    step(when="freeze")
    both(lambda o: o.unfreeze("w2"))
    step(when="unfreeze")
    # hyperparameters
    both(lambda o: o.param_groups[0].update(lr=o.param_groups[0]["lr"] * 0.5))
    step(when="a new lr")
    group = first.param_groups[1]
    more = {"amsgrad": True} if group.get("amsgrad") is False else {}
    more = {"momentum": 0.9} if group.get("momentum") == 0 else more
    if more:
        both(lambda o: o.param_groups[1].update(more))
        step(when=f"{more}, which adds a state array")
    # the state
    if arrays_of(first.state["w1"]):  # plain SGD has none
        key = arrays_of(first.state["w1"])[0]
        both(lambda o: o.state["w1"].update({key: o.state["w1"][key].copy()}))
        step(when="a buffer replaced")
        both(lambda o: np.multiply(o.state["w1"][key], 0.5, out=o.state["w1"][key]))
        step(when="a buffer changed in place")
    both(lambda o: o.state.pop("b2"))
    step(when="a state entry removed")
    both(lambda o: o.load_state_dict(o.state_dict()))
    step(when="loaded")
    if options.get("skip_if_nonfinite"):
        step({n: np.full(p.shape, np.nan, p.dtype) for n, p in params.items()}, "a skipped step")
    for o, ps in made:
        ps["w3"] = np.ones((2, 2), np.float32)
        o.add_param_group({"params": {"w3": ps["w3"]}})
    step(when="a new group")
    both(lambda o: o.state.clear())
    step(when="state cleared")
    assert reused[0] >= 10


@pytest.mark.parametrize("options", [{}, dict(state_dtype="int8")])
def test_save_and_load_take_no_second_copy_of_the_state(tmp_path, options):
    """save() writes the state's own arrays (numpy writes them in 16 MiB buffers), and
    load_checkpoint() and Optimizer.load() keep the arrays they have just read: a copy of a
    large model's state, as state_dict() and load_state_dict() make, would double it."""
    n = 1 << 22
    params = {"w": np.random.default_rng(0).standard_normal(n).astype(np.float32)}
    opt = optim.Adam(params, **options)
    opt.step({"w": np.ones(n, np.float32)})
    state = sum(v.nbytes for v in opt.state["w"].values() if hasattr(v, "nbytes"))
    path = tmp_path / "ckpt.npz"
    for what, call, most in [
        ("save", lambda: opt.save(path), 0.1 * state + (17 << 20)),
        ("load_checkpoint", lambda: opt.load_checkpoint(path), 1.1 * state),
        ("Optimizer.load", lambda: optim.Optimizer.load(path, params), 1.1 * state),
    ]:
        peak = peak_traced_bytes(call)
        assert peak < most, f"{what}: {peak / state:.2f} times the state's bytes at peak"
    loaded = optim.Optimizer.load(path, params)
    again = optim.Optimizer.load(path, params)
    for key, value in loaded.state["w"].items():  # each load its own arrays
        if isinstance(value, np.ndarray):
            assert not np.shares_memory(value, again.state["w"][key])
