"""Schedule-Free AdamW and SGD: against the `schedulefree` package's classes in float64 (train and
eval mode, warmup, polynomial weighting, learning-rate changes), the group scalars and their
checkpoints, and the train()/eval() switch. The kernels against fusedopt.reference, in every
storage row, are covered by the declaration-driven tests (test_kernels.py)."""

from __future__ import annotations

import ml_dtypes
import numpy as np
import pytest
from support import assert_same_bits, peak_traced_bytes

import fusedopt
from fusedopt import optim, quantize, reference

torch = pytest.importorskip("torch", reason="torch not installed: schedulefree comparison skipped")
schedulefree = pytest.importorskip(
    "schedulefree", reason="schedulefree not installed: comparison skipped"
)

SHAPES = {"w1": (6, 5), "b1": (5,), "w2": (5, 3), "b2": (3,), "scale": ()}


def model(dtype=np.float64, seed=0):
    rng = np.random.default_rng(seed)
    return {n: np.asarray(rng.standard_normal(s), dtype) for n, s in SHAPES.items()}


def groups_of(params, lr):
    return [
        {"params": {k: params[k] for k in ("w1", "b1")}},
        {"params": {k: params[k] for k in ("w2", "b2", "scale")}, "lr": lr / 2},
    ]


def torch_groups(tparams, lr):
    return [
        {"params": [tparams[k] for k in ("w1", "b1")]},
        {"params": [tparams[k] for k in ("w2", "b2", "scale")], "lr": lr / 2},
    ]


PEERS = {
    "AdamW": (optim.ScheduleFreeAdamW, "AdamWScheduleFreeReference", "AdamWScheduleFree"),
    "SGD": (optim.ScheduleFreeSGD, "SGDScheduleFreeReference", "SGDScheduleFree"),
}
CASES = [
    ("AdamW", dict(lr=0.01)),
    ("AdamW", dict(lr=0.01, warmup_steps=10, weight_decay=0.1)),
    ("AdamW", dict(lr=0.02, betas=(0.8, 0.99), eps=1e-6, warmup_steps=7, r=0.5)),
    ("AdamW", dict(lr=0.01, warmup_steps=5, weight_lr_power=0.0, weight_decay=0.05)),
    ("SGD", dict(lr=0.05)),
    ("SGD", dict(lr=0.05, warmup_steps=10, weight_decay=0.1)),
    ("SGD", dict(lr=0.1, momentum=0.6, warmup_steps=4, r=1.0, weight_lr_power=1.0)),
]
STEPS = 60
EVAL_AT = {5, 12, 30, 59}  # steps after which both switch to eval, compare x, and back


@pytest.mark.parametrize("peer", ["reference", "memory-efficient"])
@pytest.mark.parametrize("kind, hyper", CASES, ids=lambda c: str(c))
def test_matches_schedulefree(kind, hyper, peer):
    """60 steps in float64 with warmup, two groups (the second at half the lr) and an lr
    change at step 40: after every step the parameters (y) equal schedulefree's to rtol 1e-9,
    and at four points both switch to eval mode, the parameters (x) are compared, and both
    switch back. Also the groups' running lr_max and weight_sum."""
    cls, reference_name, efficient_name = PEERS[kind]
    params = model()
    tparams = {n: torch.tensor(p.copy(), requires_grad=True) for n, p in params.items()}
    lr = hyper["lr"]
    opt = cls(groups_of(params, lr), **hyper)
    peer_cls = getattr(schedulefree, reference_name if peer == "reference" else efficient_name)
    extra = {} if peer == "reference" else {"foreach": False}
    topt = peer_cls(torch_groups(tparams, lr), **hyper, **extra)
    topt.train()
    rng = np.random.default_rng(5)
    for step in range(1, STEPS + 1):
        if step == 40:
            opt.param_groups[0]["lr"] = topt.param_groups[0]["lr"] = lr * 3
        grads = {n: rng.standard_normal(p.shape) for n, p in params.items()}
        for n, p in tparams.items():
            p.grad = torch.tensor(grads[n])
        topt.step()
        opt.step(grads)
        modes = ["train", "eval"] if step in EVAL_AT else ["train"]
        for mode in modes:
            if mode == "eval":
                topt.eval()
                opt.eval()
            for n, p in tparams.items():
                np.testing.assert_allclose(
                    params[n],
                    p.detach().numpy(),
                    rtol=1e-9,
                    atol=1e-12,
                    err_msg=f"{n} step {step} {mode}",
                )
            if mode == "eval":
                topt.train()
                opt.train()
        for group, tgroup in zip(opt.param_groups, topt.param_groups):
            assert group["k"] == tgroup["k"] == step
            assert group["lr_max"] == pytest.approx(tgroup["lr_max"], rel=1e-15)
            assert group["weight_sum"] == pytest.approx(tgroup["weight_sum"], rel=1e-12)


def test_averaging_scalars_are_schedulefrees():
    """schedulefree_averaging, the kernels' scalars, gives schedulefree's warmed-up lr and
    running sums exactly (same operations in double), through warmup and an lr change."""
    p = torch.zeros(3, requires_grad=True)
    topt = schedulefree.SGDScheduleFreeReference([p], lr=0.3, warmup_steps=6, r=0.7)
    lr_max = weight_sum = 0.0
    for step in range(1, 20):
        if step == 10:
            topt.param_groups[0]["lr"] = 0.1
        p.grad = torch.ones(3)
        topt.step()
        group = topt.param_groups[0]
        lr, lr_max, weight_sum, _ = reference.schedulefree_averaging(
            step, group["lr"], warmup_steps=6, r=0.7, lr_max=lr_max, weight_sum=weight_sum
        )
        assert (lr, lr_max, weight_sum) == (
            group["scheduled_lr"],
            group["lr_max"],
            group["weight_sum"],
        )


def test_functional_loop_equals_the_class():
    """The documented loop over the function, advancing lr_max and weight_sum with
    schedulefree_averaging, computes what the class computes, bit for bit."""
    hyper = dict(lr=0.01, warmup_steps=3, weight_decay=0.1)
    params = model()
    opt = optim.ScheduleFreeAdamW([params["w1"]], **hyper)
    w = model()["w1"]
    z, v = w.copy(), np.zeros_like(w)
    lr_max = weight_sum = 0.0
    rng = np.random.default_rng(2)
    for step in range(1, 12):
        g = rng.standard_normal(w.shape)
        opt.step([g])
        fusedopt.schedulefree_adamw_(
            w, g, z, v, step=step, lr_max=lr_max, weight_sum=weight_sum, **hyper
        )
        _, lr_max, weight_sum, _ = reference.schedulefree_averaging(
            step, 0.01, warmup_steps=3, lr_max=lr_max, weight_sum=weight_sum
        )
        assert_same_bits(params["w1"], w)
        assert_same_bits(opt.state["0.0"]["z"], z)


@pytest.mark.parametrize("cls", [optim.ScheduleFreeAdamW, optim.ScheduleFreeSGD])
def test_eval_then_train_restores_y(cls):
    """eval() writes x = y + (1 - 1/beta)(z - y) and train() y back, to rounding (float64);
    both are no-ops when already in that mode; step() in eval mode raises."""
    params = model()
    opt = cls(params, lr=0.01)
    rng = np.random.default_rng(0)
    for _ in range(5):
        opt.step({n: rng.standard_normal(p.shape) for n, p in params.items()})
    y = {n: p.copy() for n, p in params.items()}
    opt.train()
    for n in params:
        assert_same_bits(params[n], y[n])
    opt.eval()
    opt.eval()
    beta = opt.param_groups[0]["betas"][0] if "betas" in opt.defaults else 0.9
    for n in params:
        z = opt.state[n]["z"]
        np.testing.assert_allclose(params[n], y[n] + (1 - 1 / beta) * (z - y[n]), rtol=1e-13)
    with pytest.raises(RuntimeError, match=r"eval mode: call \.train\(\)"):
        opt.step({n: np.zeros_like(p) for n, p in params.items()})
    opt.train()
    for n in params:
        np.testing.assert_allclose(params[n], y[n], rtol=1e-12, atol=1e-15)


def _bfloat16_switches(master, stochastic, seed=0, n=1 << 14):
    """A bfloat16 ScheduleFreeSGD (momentum 0.9) of one parameter at 1.0, its z set so that
    eval() puts x at 1 + 0.3 ulp in float32: for eval() and then train(), the params after the
    switch and the float32 value they round (from the master, or from the stored param). The
    torch adapter's switches from the same state store the same bits."""
    from fusedopt import torch as ft

    p = np.ones(n, ml_dtypes.bfloat16)
    opt = optim.ScheduleFreeSGD(
        {"w": p}, lr=0.1, master_weights=master, stochastic_rounding=stochastic, seed=seed
    )
    opt.step({"w": np.zeros(n, np.float32)})  # y, x and z stay at 1
    w = np.float32(1 - 1 / 0.9)
    z = opt.state["w"]["z"]
    z[...] = 1 + np.float32(0.3 * 2.0**-7) / w
    switched = []
    for switch, weight in ((opt.eval, w), (opt.train, np.float32(0.1))):
        start = (opt.state["w"]["master"] if master else p).astype(np.float32)
        switch()
        switched.append((p.astype(np.float32), start + weight * (z - start)))
    t = torch.ones(n, dtype=torch.bfloat16)
    topt = ft.SGDScheduleFree(
        [t], lr=0.1, master_weights=master, stochastic_rounding=stochastic, seed=seed
    )
    t.grad = torch.zeros(n, dtype=torch.bfloat16)
    topt.train()  # schedulefree's classes start in eval mode
    topt.step()
    topt.state[t]["z"].copy_(torch.from_numpy(z))
    for switch, (stored, _) in zip((topt.eval, topt.train), switched):
        switch()
        assert_same_bits(t.float().numpy(), stored, "torch adapter")
    return switched


@pytest.mark.parametrize("master", [False, True], ids=["bfloat16", "float32 masters"])
def test_a_stochastic_switch_rounds_bfloat16_params_without_bias(master):
    """With stochastic_rounding, eval() and train() round a bfloat16 param stochastically, as a
    step stores it: to one of the float32 value's two neighbours, up as often as the value
    lies above the lower one (5 sd of 2**14 elements is at most 0.02), on bits that are the
    seed's and the same in the torch adapter. Rounded to nearest, eval() moves every element
    down by 0.3 ulp here."""
    switched = _bfloat16_switches(master, stochastic=True)
    for stored, value in switched:
        bits = value.view(np.uint32)
        lower = (bits & np.uint32(0xFFFF0000)).view(np.float32)  # positive: toward zero
        upper = ((bits & np.uint32(0xFFFF0000)) + np.uint32(0x10000)).view(np.float32)
        up = (stored == upper) & (value != lower)
        assert np.all(up | (stored == lower))
        chance = (value - lower) / (upper - lower)
        assert abs(up.mean() - chance.mean()) < 0.02, (up.mean(), chance.mean())
    assert abs((switched[0][0].mean() - 1) / 2**-7 - 0.3) < 0.02  # x's mean: 1 + 0.3 ulp
    again = _bfloat16_switches(master, stochastic=True)
    other = _bfloat16_switches(master, stochastic=True, seed=1)
    for (a, _), (b, _) in zip(again, switched):
        assert_same_bits(a, b)
    assert np.mean(again[0][0] != other[0][0]) > 0.3  # a new seed, new bits: 0.42 expected
    (x, _), _ = _bfloat16_switches(master, stochastic=False)
    assert np.all(x == 1.0)


def _switch_of_whole_arrays(param, z, weight, master, key):
    """The switch as one NumPy expression over whole arrays: what optim._lerp_ computes in
    pieces of whole int8 blocks (so that a switch of a large model needs no temporaries of it),
    its random bits in the param's memory order."""
    target = param if master is None else master
    compute = np.float64 if target.dtype == np.float64 else np.float32
    zs = z.dequantize() if isinstance(z, quantize.QuantizedState) else z.astype(compute)
    x = target.astype(compute)
    x += weight * (zs - x)
    if master is not None:
        master[...] = x
    if key is not None and param.dtype in reference._STOCHASTIC:
        in_order = np.empty_like(param, dtype=x.dtype)  # x laid out as the param
        in_order[...] = x
        rounded = reference._STOCHASTIC[param.dtype](in_order.ravel(order="K"), key, 0)
        param.ravel(order="K")[...] = rounded
    else:
        param[...] = x


@pytest.mark.parametrize("order", ["C", "F"])
@pytest.mark.parametrize(
    "dtype, z_kind, master, key",
    [
        (np.float32, "float32", False, None),
        (np.float64, "float64", False, None),
        (ml_dtypes.bfloat16, "bfloat16", False, None),
        (ml_dtypes.bfloat16, "float32", False, 77),
        (np.float16, "float32", False, 77),
        (ml_dtypes.bfloat16, "float32", True, 77),
        (np.float32, "int8", False, None),
        (np.float32, "int8 of the other order", False, None),
        (ml_dtypes.bfloat16, "int8", True, 5),
    ],
)
def test_a_switch_in_pieces_equals_one_of_whole_arrays(
    monkeypatch, order, dtype, z_kind, master, key
):
    """Every storage a switch takes, in both layouts, in pieces of 2 blocks over a parameter of
    several pieces and a short last block, against the whole arrays at once."""
    monkeypatch.setattr(quantize, "_PIECE", 2 * quantize.BLOCK)
    rng = np.random.default_rng(8)
    shape = (37, 29)  # 1073 elements: 2 pieces and a part, the last block short
    p = np.asarray(rng.standard_normal(shape), dtype, order=order)
    m = p.astype(np.float32) + np.float32(1e-3) if master else None
    # magnitudes that differ from element to element, so that the int8 blocks' scales differ
    values = (rng.standard_normal(shape) * np.exp2(rng.integers(-8, 8, shape))).astype(np.float32)
    if z_kind.startswith("int8"):
        other = "C" if order == "F" else "F"
        z = quantize.QuantizedState.from_array(
            np.asarray(values, order=other if "other" in z_kind else order), signed=True
        )
    else:
        z = np.asarray(values, z_kind, order=order)
    expected_p, expected_m = p.copy(order="K"), None if m is None else m.copy(order="K")
    for weight in (np.float32(1 - 1 / 0.9), np.float32(0.1)):
        optim._lerp_(p, z, weight, m, key)
        _switch_of_whole_arrays(expected_p, z, weight, expected_m, key)
        assert_same_bits(p, expected_p)
        if master:
            assert_same_bits(m, expected_m)


def test_a_switch_writes_a_param_or_master_laid_out_otherwise():
    """A strided param (a torch parameter whose .data a view replaced), or a master in the other
    layout than its param's, has no flat view in the param's order to write pieces through:
    the switch runs on copies and writes them back, with the bits of the whole arrays at once."""
    rng = np.random.default_rng(4)
    base = rng.standard_normal((8, 12)).astype(np.float32)
    for param, master in [
        (base[:, ::2], None),
        (np.asfortranarray(base.astype(ml_dtypes.bfloat16))[:, ::2], None),  # bits in F order
        (np.asfortranarray(base.astype(ml_dtypes.bfloat16)), base.copy()),  # C master, F param
    ]:
        z = rng.standard_normal(param.shape).astype(np.float32)
        before = param.copy()
        expected_p = param.copy(order="K")  # the random bits follow memory order
        expected_m = None if master is None else master.copy(order="K")
        optim._lerp_(param, z, np.float32(0.25), master, 7)
        _switch_of_whole_arrays(expected_p, z, np.float32(0.25), expected_m, 7)
        assert_same_bits(param, expected_p)
        assert not np.array_equal(param, before)
        if master is not None:
            assert_same_bits(master, expected_m)


@pytest.mark.parametrize("options", [{}, dict(stochastic_rounding=True, master_weights=True)])
def test_a_switch_takes_no_temporary_of_the_whole_param(options):
    """eval() and train() of a large model must fit beside it: they take a few pieces' worth of
    temporaries (tracemalloc counts NumPy's arrays), not several arrays of the param's size."""
    n = 1 << 21
    p = np.ones(n, ml_dtypes.bfloat16)
    opt = optim.ScheduleFreeAdamW({"w": p}, lr=0.1, **options)
    opt.step({"w": np.full(n, 0.5, np.float32)})
    for switch in (opt.eval, opt.train):
        peak = peak_traced_bytes(switch)
        assert peak < 4 << 20, f"{switch.__name__}: {peak / n:.2f} bytes an element at peak"


@pytest.mark.parametrize("mode", ["train", "eval"])
@pytest.mark.parametrize("cls", [optim.ScheduleFreeAdamW, optim.ScheduleFreeSGD])
def test_checkpoint_resume_is_bit_exact(cls, mode, tmp_path):
    """The group scalars (k, lr_max, weight_sum, train_mode) are in the checkpoint: saved after
    4 steps (in either mode, the parameters saved with it) and loaded into a fresh optimizer,
    the run goes on exactly as the uninterrupted one."""
    hyper = dict(lr=0.05, warmup_steps=6, r=0.5, weight_decay=0.01)
    rng = np.random.default_rng(3)
    grads = [{n: rng.standard_normal(s) for n, s in SHAPES.items()} for _ in range(9)]
    params = model()
    opt = cls(groups_of(params, 0.05), **hyper)
    for g in grads[:4]:
        opt.step(g)
    if mode == "eval":
        opt.eval()
    opt.save(tmp_path / "ckpt.npz")
    saved = {n: p.copy() for n, p in params.items()}
    opt.train()
    for g in grads[4:]:
        opt.step(g)
    resumed = optim.Optimizer.load(tmp_path / "ckpt.npz", groups_of(saved, 0.05))
    assert type(resumed) is cls
    assert resumed.param_groups[0]["train_mode"] == (mode == "train")
    resumed.train()
    for g in grads[4:]:
        resumed.step(g)
    for n in params:
        assert_same_bits(saved[n], params[n], n)
    assert [g["weight_sum"] for g in resumed.param_groups] == [
        g["weight_sum"] for g in opt.param_groups
    ]


def test_group_scalars_are_validated():
    params = model()
    with pytest.raises(ValueError, match="Invalid momentum value: 1.0"):
        optim.ScheduleFreeSGD(params, momentum=1.0)
    with pytest.raises(ValueError, match="Invalid warmup_steps value: -1"):
        optim.ScheduleFreeAdamW(params, warmup_steps=-1)
    opt = optim.ScheduleFreeAdamW(params)
    sd = opt.state_dict()
    sd["param_groups"][0]["k"] = -2
    with pytest.raises(ValueError, match="Invalid k: -2"):
        opt.load_state_dict(sd)
    sd["param_groups"][0]["k"] = 0
    sd["param_groups"][0]["weight_sum"] = -1.0
    with pytest.raises(ValueError, match="Invalid weight_sum value: -1.0"):
        opt.load_state_dict(sd)


@pytest.mark.parametrize("name", ["schedulefree_sgd_", "schedulefree_adamw_"])
@pytest.mark.parametrize(
    "hyper, step", [({"r": 1000.0}, 3), ({"lr": 1e300}, 1), ({"lr_max": 1e300}, 2)], ids=str
)
def test_averaging_weights_past_a_doubles_range_are_refused(name, hyper, step):
    """Where step**r * lr_max**weight_lr_power overflows, c_t would be inf / inf: the step
    would write NaN into every parameter. It is a ValueError, with nothing written; so is a
    class built with such an lr."""
    rng = np.random.default_rng(0)
    adamw = name == "schedulefree_adamw_"
    arrays = [rng.standard_normal(5).astype(np.float32) for _ in range(4 if adamw else 3)]
    if adamw:
        arrays[3] = np.abs(arrays[3])  # exp_avg_sq
    before = [a.copy() for a in arrays]
    with pytest.raises(ValueError, match="^Invalid averaging weights") as fused:
        getattr(fusedopt, name)(*arrays, step=step, **hyper)
    for a, b in zip(arrays, before):
        assert_same_bits(a, b)
    with pytest.raises(ValueError) as spec:  # the reference, with the kernel's message
        getattr(reference, name)(*arrays, step=step, **hyper)
    assert str(spec.value) == str(fused.value)
    if "lr" in hyper:
        cls = optim.ScheduleFreeAdamW if adamw else optim.ScheduleFreeSGD
        with pytest.raises(ValueError, match="^Invalid averaging weights"):
            cls({"w": arrays[0]}, **hyper)


def test_from_config_names():
    params = model()
    assert type(optim.from_config("schedulefreeadamw", params)) is optim.ScheduleFreeAdamW
    assert type(optim.from_config("ScheduleFreeSGD", model(), momentum=0.8)) is (
        optim.ScheduleFreeSGD
    )
