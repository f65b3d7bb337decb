"""Optimizer classes with low-precision parameters, bfloat16 or int8 state, float32 master weights
and stochastic rounding: fused against reference kernels bit for bit, checkpoints that resume bit
for bit, old checkpoints, and refused options."""

from __future__ import annotations

import json

import ml_dtypes
import numpy as np
import pytest
from support import assert_same, assert_same_bits, state_arrays

from fusedopt import optim
from fusedopt.quantize import QuantizedState

BF16, F16 = ml_dtypes.bfloat16, np.float16
SHAPES = {"w1": (40, 70), "b1": (70,), "w2": (70, 3), "b2": (3,), "scale": ()}
# name: (param dtype, grad dtype, options)
STORAGE = {
    "bfloat16": (BF16, BF16, {}),
    "bfloat16-sr": (BF16, BF16, dict(stochastic_rounding=True, seed=3)),
    "bfloat16-state": (np.float32, np.float32, dict(state_dtype="bfloat16")),
    "bfloat16-all-sr": (BF16, BF16, dict(state_dtype=BF16, stochastic_rounding=True, seed=9)),
    "int8-state": (np.float32, np.float32, dict(state_dtype="int8")),
    "masters": (BF16, np.float32, dict(master_weights=True)),
    "masters-bf16-grads": (BF16, BF16, dict(master_weights=True, state_dtype="bfloat16")),
    "masters-int8-sr": (
        BF16,
        np.float32,
        dict(master_weights=True, state_dtype=np.int8, stochastic_rounding=True, seed=2**64 - 1),
    ),
    "float16-masters": (F16, F16, dict(master_weights=True)),
    "float16-sr": (F16, F16, dict(stochastic_rounding=True, seed=4)),
    "float16-masters-sr": (F16, np.float32, dict(master_weights=True, stochastic_rounding=True)),
    "float16-int8": (F16, np.float32, dict(state_dtype="int8")),
    "float16-bf16-state": (F16, F16, dict(state_dtype="bfloat16", stochastic_rounding=True)),
    "float16-masters-bf16-state": (F16, F16, dict(master_weights=True, state_dtype="bfloat16")),
}
CLASSES = {
    "SGD": (optim.SGD, dict(lr=0.05, momentum=0.9, nesterov=True)),
    "SGD-plain": (optim.SGD, dict(lr=0.05)),
    "Momentum": (optim.Momentum, dict(lr=0.05)),
    "Adam": (optim.Adam, dict(lr=0.01, amsgrad=True, weight_decay=0.1)),
    "AdamW": (optim.AdamW, dict(lr=0.01)),
    "Adamax": (optim.Adamax, dict(lr=0.01)),
    "NAdam": (optim.NAdam, dict(lr=0.01, weight_decay=0.1)),
    "RAdam": (optim.RAdam, dict(lr=0.01, weight_decay=0.1, decoupled_weight_decay=True)),
    "Adagrad": (optim.Adagrad, dict(lr=0.05, initial_accumulator_value=0.1)),
    "RMSprop": (optim.RMSprop, dict(lr=0.01, momentum=0.9, centered=True)),
    "Lion": (optim.Lion, dict(lr=1e-3, weight_decay=0.1)),
    "LAMB": (optim.LAMB, dict(lr=0.01, weight_decay=0.1)),
    "ScheduleFreeAdamW": (optim.ScheduleFreeAdamW, dict(lr=0.01, warmup_steps=3, weight_decay=0.1)),
    "ScheduleFreeSGD": (optim.ScheduleFreeSGD, dict(lr=0.05, warmup_steps=3, r=0.5)),
}


def model(dtype, seed=0):
    rng = np.random.default_rng(seed)
    return {n: np.asarray(rng.standard_normal(s), dtype) for n, s in SHAPES.items()}


def grads(params, dtype, rng):
    return {n: np.asarray(rng.standard_normal(p.shape), dtype) for n, p in params.items()}


def groups(params, lr):
    return [
        {"params": {k: params[k] for k in ("w1", "b1")}},
        {"params": {k: params[k] for k in ("w2", "b2", "scale")}, "lr": lr / 2},
    ]


def train(cls, hyper, options, params, grad_dtype, steps, rng, opt=None):
    if opt is None:
        opt = cls(groups(params, hyper["lr"]), **hyper, **options)
    for t in range(steps):
        g = grads(params, grad_dtype, rng)
        if t % 3 == 1:
            g["b1"] = None  # a call without one tensor: the others' bits must not depend on it
        opt.step(g)
    return opt


@pytest.mark.parametrize("storage", STORAGE)
@pytest.mark.parametrize("cls_name", CLASSES)
def test_fused_class_equals_reference_class(cls_name, storage):
    """Every class with every storage option computes, on the fused kernels, exactly what it
    computes on fusedopt.reference: params, state, masters and quantized codes and scales.
    7 steps: RAdam's rectified step starts at 6."""
    cls, hyper = CLASSES[cls_name]
    param_dtype, grad_dtype, options = STORAGE[storage]
    fused = model(param_dtype)
    opt = train(cls, hyper, options, fused, grad_dtype, 7, np.random.default_rng(1))
    expected = model(param_dtype)
    with optim.reference_kernels():
        ref = train(cls, hyper, options, expected, grad_dtype, 7, np.random.default_rng(1))
    for name in fused:
        assert_same_bits(fused[name], expected[name], name)
        assert fused[name].dtype == param_dtype
    assert_same(opt, ref)
    state = opt.state["w1"]
    if options.get("master_weights"):
        assert state["master"].dtype == np.float32
        rounded = state["master"].astype(param_dtype)
        if options.get("stochastic_rounding"):  # rounded up or down, not always to nearest
            assert 0 < np.mean(fused["w1"] != rounded) < 0.9
        else:
            assert_same_bits(fused["w1"], rounded)
    if options.get("state_dtype") is not None and cls_name != "SGD-plain":
        stored = next(v for k, v in state.items() if k not in ("step", "master"))
        if options["state_dtype"] in ("int8", np.int8):
            assert isinstance(stored, QuantizedState)
        else:
            assert stored.dtype == BF16


@pytest.mark.parametrize("storage", ["bfloat16-all-sr", "int8-state", "masters-int8-sr"])
@pytest.mark.parametrize(
    "cls_name",
    ["SGD", "Adam", "NAdam", "RAdam", "Adagrad", "Lion", "LAMB", "ScheduleFreeAdamW"],
)
def test_checkpoint_resume_is_bit_exact(cls_name, storage, tmp_path):
    """Saved after 4 steps and loaded by Optimizer.load into the saved params, the run goes on
    exactly as the uninterrupted one: masters, quantized state and the stochastic-rounding
    stream included."""
    cls, hyper = CLASSES[cls_name]
    param_dtype, grad_dtype, options = STORAGE[storage]
    params = model(param_dtype)
    rng = np.random.default_rng(5)
    opt = train(cls, hyper, options, params, grad_dtype, 4, rng)
    opt.save(tmp_path / "ckpt.npz")
    saved = {n: p.copy() for n, p in params.items()}
    rng_state = rng.bit_generator.state
    train(cls, hyper, options, params, grad_dtype, 4, rng, opt)

    resumed = optim.Optimizer.load(tmp_path / "ckpt.npz", groups(saved, hyper["lr"]))
    assert (resumed.state_dtype, resumed.master_weights, resumed.seed) == (
        opt.state_dtype,
        opt.master_weights,
        opt.seed,
    )
    rng.bit_generator.state = rng_state
    train(cls, hyper, options, saved, grad_dtype, 4, rng, resumed)
    for name in params:
        assert_same_bits(saved[name], params[name], name)
    assert_same(resumed, opt)


def test_format_1_checkpoints_still_load(tmp_path):
    """A checkpoint of format 1 (float arrays stored under their names) loads."""
    params = model(np.float32)
    opt = optim.Adam(params, lr=0.01)
    train(optim.Adam, dict(lr=0.01), {}, params, np.float32, 2, np.random.default_rng(0), opt)
    sd = opt.state_dict()
    arrays = {}
    for i, state in enumerate(sd["state"].values()):
        for key, value in list(state.items()):
            if isinstance(value, np.ndarray):
                arrays[f"state.{i}.{key}"], state[key] = value, f"state.{i}.{key}"
    meta = {k: v for k, v in sd.items() if k not in optim.Optimizer._DEFAULT_OPTIONS}
    meta["format_version"] = 1
    np.savez(tmp_path / "v1.npz", meta=np.array(json.dumps(meta)), **arrays)
    loaded = optim.Optimizer.load(tmp_path / "v1.npz", {n: p.copy() for n, p in params.items()})
    assert_same(loaded, opt)


def test_bad_options_are_refused():
    f32, f64 = model(np.float32), model(np.float64)
    with pytest.raises(ValueError, match="state_dtype: expected None, 'float32', 'bfloat16' or"):
        optim.Adam(f32, state_dtype="float16")
    with pytest.raises(ValueError, match="state_dtype: expected"):
        optim.Adam(f32, state_dtype=np.uint8)
    with pytest.raises(ValueError, match="parameter 'w1' is float64, whose state is float64"):
        optim.Adam(f64, state_dtype="bfloat16")
    with pytest.raises(ValueError, match=r"Invalid seed: -1"):
        optim.Adam(f32, seed=-1)
    with pytest.raises(TypeError, match="seed must be an integer, got float"):
        optim.Adam(f32, seed=1.0)
    with pytest.raises(TypeError, match="expected dtype float32, float64, bfloat16 or float16"):
        optim.Adam([np.zeros(3, np.int8)])


def test_bad_gradients_and_checkpoints_change_nothing(tmp_path):
    params = model(BF16)
    opt = optim.Adam(params, master_weights=True, state_dtype="int8")
    opt.step(grads(params, np.float32, np.random.default_rng(0)))
    before = {n: p.copy() for n, p in params.items()}
    state_before = list(state_arrays(opt))
    for dtype in (np.float64, F16):
        bad = grads(params, np.float32, np.random.default_rng(1))
        bad["b2"] = bad["b2"].astype(dtype)
        with pytest.raises(ValueError, match=r"gradient of 'b2': expected bfloat16 or float32"):
            opt.step(bad)
    for name in params:
        assert_same_bits(params[name], before[name])
    for (_, a), (_, b) in zip(state_arrays(opt), state_before):
        assert_same_bits(a, b)
    opt.save(tmp_path / "ckpt.npz")
    other = optim.Adam(model(BF16), master_weights=True)
    with pytest.raises(ValueError, match="checkpoint has state_dtype='int8', this optimizer None"):
        other.load_checkpoint(tmp_path / "ckpt.npz")
    plain = optim.Adam(model(BF16), state_dtype="int8")
    with pytest.raises(ValueError, match="checkpoint has master_weights=True"):
        plain.load_checkpoint(tmp_path / "ckpt.npz")


def test_stochastic_rounding_moves_bfloat16_params_that_nearest_rounding_freezes():
    """Updates far below half an ulp: round to nearest never moves bfloat16 params, stochastic
    rounding moves them by the right amount on average; masters move them too."""
    results = {}
    for name, options in {
        "nearest": {},
        "stochastic": dict(stochastic_rounding=True),
        "masters": dict(master_weights=True),
    }.items():
        params = {"w": np.ones(20000, BF16)}
        opt = optim.SGD(params, lr=1e-4, **options)
        for _ in range(100):
            opt.step({"w": np.ones(20000, np.float32)})
        results[name] = float(params["w"].astype(np.float64).mean())
    assert results["nearest"] == 1.0
    assert abs(results["stochastic"] - 0.99) < 5e-4
    assert abs(results["masters"] - 0.99) < 2**-8  # the master rounded: within half an ulp


@pytest.mark.parametrize(
    "cls, options",
    [
        (optim.AdamW, dict(stochastic_rounding=True)),
        (optim.AdamW, dict(state_dtype="int8")),
        (optim.RMSprop, dict(stochastic_rounding=True, state_dtype="bfloat16")),  # no step
        (optim.Muon, dict(stochastic_rounding=True)),
        (optim.Adafactor, dict(stochastic_rounding=True)),
    ],
)
def test_no_two_parameters_share_random_bits(cls, options):
    """Equal bfloat16 parameters with equal gradients, each first in a fused call of its own
    (two groups, and a float32 one beside them in the first): what is rounded at random differs
    between them, as the kernel's key of (seed, step, place in the call, element) alone would
    not make it."""
    rng = np.random.default_rng(5)
    start = rng.standard_normal((64, 64)).astype(BF16)
    params = {"a": start.copy(), "f": start.astype(np.float32), "b": start.copy()}
    opt = cls(
        [{"params": {"a": params["a"], "f": params["f"]}}, {"params": {"b": params["b"]}}],
        lr=0.01,
        **options,
    )
    grad = rng.standard_normal((64, 64)).astype(np.float32)
    for _ in range(3):
        opt.step({"a": grad.astype(BF16), "f": grad, "b": grad.astype(BF16)})
    a, b = opt.state["a"], opt.state["b"]
    if options.get("state_dtype") == "int8":
        assert a["exp_avg"].codes.tobytes() != b["exp_avg"].codes.tobytes()
        return
    assert params["a"].tobytes() != params["b"].tobytes()


def test_int8_state_of_an_optimizer_without_a_step_follows_float32():
    """RMSprop's kernel takes no step, so its random bits depend on the seed alone: the class
    gives every step its own seed, or each element would round with the same bits every step
    and its moving average would stall like one rounded to nearest (measured 0.58 of float32
    after 1500 steps with one seed; 1.00 with a seed per step)."""
    n = 4096
    rng = np.random.default_rng(2)
    scale = rng.uniform(0.5, 2.0, n).astype(np.float32)
    runs = {}
    for state_dtype in ("int8", None):
        params = [np.zeros(n, np.float32)]
        opt = optim.RMSprop(params, lr=1e-4, alpha=0.999, state_dtype=state_dtype)
        grads = np.random.default_rng(3)
        for _ in range(1500):
            opt.step([grads.standard_normal(n, dtype=np.float32) * scale])
        square_avg = opt.state["0.0"]["square_avg"]
        runs[state_dtype] = (
            square_avg.dequantize() if isinstance(square_avg, QuantizedState) else square_avg
        )
    ratio = runs["int8"].sum() / runs[None].sum()
    assert abs(ratio - 1) < 0.02, ratio


@pytest.mark.parametrize("stochastic", [False, True], ids=["nearest", "stochastic"])
def test_bfloat16_stores_of_nan_and_inf_keep_ml_dtypes_bits(stochastic):
    """A NaN stored as bfloat16 is the quiet NaN of its sign, 0x7FC0 or 0xFFC0, whatever its
    payload, as ml_dtypes rounds it; infs, zeros and ties to nearest keep its bits too. Seen
    through the masters' param copy, compared with the master after the step (so that the
    formula's own NaNs are not in question). assert_array_equal ignores NaN bits: the bits
    are compared."""
    import fusedopt

    special = np.array(
        [0x7F800001, 0xFF800001, 0x7FC12345, 0xFFFFFFFF, 0x7FBFFFFF, 0x7F800000, 0xFF800000]
        + [0x00000000, 0x80000000, 0x00000001, 0x807FFFFF, 0x3F808000, 0x3F818000, 0x7F7FFFFF],
        np.uint32,
    ).view(np.float32)
    rng = np.random.default_rng(8)
    master = rng.standard_normal(301).astype(np.float32)
    master[::21][: special.size] = special  # in the vector loops and in the tail
    master[-special.size :] = special
    state = [np.zeros_like(master) for _ in range(2)]
    grad = np.zeros_like(master)  # zero step: the master keeps its value
    with np.errstate(all="ignore"):
        param = master.astype(BF16)
        fusedopt.adam_(
            param,
            grad,
            *state,
            master=master,
            step=1,
            lr=0.0,
            stochastic_rounding=stochastic,
            seed=3,
        )
        expected = master.astype(BF16).view(np.uint16)
    nonfinite = ~np.isfinite(master)
    np.testing.assert_array_equal(param.view(np.uint16)[nonfinite], expected[nonfinite])
    assert set(param.view(np.uint16)[np.isnan(master)]) == {0x7FC0, 0xFFC0}
    if not stochastic:
        np.testing.assert_array_equal(param.view(np.uint16), expected)


def test_int8_state_loads_into_the_other_memory_order():
    """int8 blocks follow memory order: state saved for a C-ordered parameter and loaded into
    an F-ordered one (or back) is decoded and encoded again in the new order, to nearest, not
    read with another block's scale. In the same order it loads bit for bit."""
    rng = np.random.default_rng(0)
    params = {"w": rng.standard_normal((40, 30)).astype(np.float32)}
    opt = optim.AdamW(params, state_dtype="int8")
    # rows of very different magnitudes, so that C and F blocks get different scales
    g = rng.standard_normal((40, 30)) * 10.0 ** np.linspace(-4, 2, 40)[:, None]
    opt.step({"w": g.astype(np.float32)})
    sd = opt.state_dict()
    same = optim.AdamW({"w": params["w"].copy()}, state_dtype="int8")
    same.load_state_dict(sd)
    assert_same(same, opt)
    for order in ("F", "C"):  # C-saved state into an F parameter, then that back into C
        other = optim.AdamW({"w": np.array(params["w"], order=order)}, state_dtype="int8")
        other.load_state_dict(sd)
        for key in ("exp_avg", "exp_avg_sq"):
            saved, loaded = sd["state"]["w"][key], other.state["w"][key]
            want = QuantizedState.from_array(
                np.array(saved.dequantize(), order=order), saved.signed
            )
            assert loaded.codes.flags[f"{order}_CONTIGUOUS"], (order, key)
            assert_same_bits(loaded.codes, want.codes, f"{order} {key}")
            assert_same_bits(loaded.scales, want.scales, f"{order} {key}")
            # every element within half a code step of its new block: 2**-4 relative for a
            # normal code, half the subnormal step (2**-16 or 2**-32 of the scale) below
            block = np.arange(40 * 30).reshape(40, 30, order=order) // 256
            subnormal_step = loaded.scales[block] * 2.0 ** (-16 if saved.signed else -32)
            exact, got = saved.dequantize(), loaded.dequantize()
            bound = np.maximum(2.0**-4 * np.abs(exact), subnormal_step / 2)
            assert np.all(np.abs(got - exact) <= bound), (order, key)
            if order == "F":  # F blocks span rows of all magnitudes: small ones round away
                assert np.count_nonzero(got != exact) > 0, key
        sd = other.state_dict()
    other.step({"w": np.array(g, np.float32)})  # and it trains on


@pytest.mark.parametrize("cls", [optim.Muon, optim.Adafactor])
def test_matrix_optimizers_refuse_float32_grads_of_float64_params_before_any_call(cls):
    """A step of several fused calls checks every gradient first: a float64 parameter's
    float32 gradient, which its kernel refuses, must not be found after another call wrote."""
    params = {"a": np.ones((16, 24), BF16), "b": np.ones((16, 24))}
    opt = cls(params, lr=1e-2)
    before = {n: p.copy() for n, p in params.items()}
    with pytest.raises(ValueError, match=r"gradient of 'b': expected float64 \(16, 24\)"):
        opt.step({n: np.ones((16, 24), np.float32) for n in params})
    for name in params:
        assert_same_bits(params[name], before[name], name)
    assert opt.state == {}


def test_a_parameter_made_read_only_fails_the_step_before_any_call():
    params = {"a": np.ones((5, 30), BF16), "b": np.ones((5, 30), np.float32)}
    opt = optim.AdamW(params, lr=1e-2)  # two fused calls: bfloat16 and float32
    g = {n: np.ones((5, 30), np.float32) for n in params}
    opt.step(g)
    params["b"].flags.writeable = False
    before = {n: p.copy() for n, p in params.items()}
    state_before = list(state_arrays(opt))
    with pytest.raises(ValueError, match="parameter 'b': array is read-only"):
        opt.step(g)
    for name in params:
        assert_same_bits(params[name], before[name], name)
    for (_, a), (_, b) in zip(state_arrays(opt), state_before):
        assert_same_bits(a, b)
    assert [s["step"] for s in opt.state.values()] == [1, 1]


def test_load_state_dict_checks_the_options_and_int8_state_it_restores():
    src = optim.AdamW({"a": np.ones((5, 300), BF16)}, stochastic_rounding=True, seed=5)
    src.step({"a": np.ones((5, 300), BF16)})
    dst = optim.AdamW({"a": np.ones((5, 300), BF16)})
    for key, value, error, message in [
        ("seed", -5, ValueError, "Invalid seed: -5"),
        ("seed", 2**70, ValueError, "Invalid seed"),
        ("seed", "x", TypeError, "seed must be an integer, got str"),
        ("stochastic_rounding", "no", TypeError, "stochastic_rounding must be True or False"),
        ("max_grad_norm", -1.0, ValueError, "Invalid max_grad_norm"),
        ("skip_if_nonfinite", None, TypeError, "skip_if_nonfinite must be True or False"),
    ]:
        sd = src.state_dict()
        sd[key] = value
        with pytest.raises(error, match=message):
            dst.load_state_dict(sd)
        assert (dst.stochastic_rounding, dst.seed, dst.max_grad_norm, dst.state) == (
            False,
            0,
            None,
            {},
        )

    params = model(np.float32)
    q8 = optim.Adam(params, state_dtype="int8")
    q8.step(grads(params, np.float32, np.random.default_rng(0)))
    good = q8.state_dict()

    def flipped(state):  # the same values with the other codes' signedness
        return QuantizedState.from_array(state.dequantize(), not state.signed)

    def scaled(state, value):
        scales = state.scales.copy()
        scales[0] = value
        return QuantizedState(state.codes.copy(), scales)

    fresh = optim.Adam(model(np.float32), state_dtype="int8")
    for key, make, message in [
        ("exp_avg", flipped, "'exp_avg' of 'w1': expected a QuantizedState with int8 codes"),
        ("exp_avg_sq", flipped, "'exp_avg_sq' of 'w1': expected a QuantizedState with uint8"),
        ("exp_avg", lambda s: scaled(s, 3.0), "scales must be powers of two"),
        ("exp_avg", lambda s: scaled(s, np.inf), "scales must be powers of two"),
        ("exp_avg_sq", lambda s: scaled(s, 0.0), "scales must be powers of two"),
    ]:
        sd = q8.state_dict()
        sd["state"]["w1"][key] = make(good["state"]["w1"][key])
        with pytest.raises(ValueError, match=message):
            fresh.load_state_dict(sd)
        assert fresh.state == {}


def test_load_state_dict_takes_the_checkpoints_options_and_keeps_those_it_lacks():
    """As torch.optim's hyperparameters: the checkpoint's options replace the constructor's;
    an option the checkpoint does not hold (format 1 has none) is kept, not reset."""
    params = model(BF16)
    plain = optim.AdamW(params)
    plain.step(grads(params, BF16, np.random.default_rng(0)))
    sd = plain.state_dict()
    opt = optim.AdamW(model(BF16), stochastic_rounding=True, seed=7, max_grad_norm=1.0)
    opt.load_state_dict(sd)
    assert (opt.stochastic_rounding, opt.seed, opt.max_grad_norm) == (False, 0, None)
    for key in ("stochastic_rounding", "seed", "max_grad_norm"):
        del sd[key]
    opt = optim.AdamW(model(BF16), stochastic_rounding=True, seed=7, max_grad_norm=1.0)
    opt.load_state_dict(sd)
    assert (opt.stochastic_rounding, opt.seed, opt.max_grad_norm) == (True, 7, 1.0)


@pytest.mark.parametrize(
    "saved, loaded", [(None, "float32"), ("float32", None), (None, np.float32)]
)
def test_state_dtype_none_and_float32_are_one_option_on_load(saved, loaded):
    params = model(np.float32)
    opt = optim.Adam(params, state_dtype=saved)
    opt.step(grads(params, np.float32, np.random.default_rng(0)))
    other = optim.Adam(model(np.float32), state_dtype=loaded)
    other.load_state_dict(opt.state_dict())
    assert_same(other, opt)


def test_gradient_errors_name_only_the_dtypes_allowed():
    opt = optim.AdamW({"a": np.ones((5, 300), F16)}, master_weights=True, state_dtype="bfloat16")
    with pytest.raises(
        ValueError, match=r"gradient of 'a': expected float16 or float32 \(5, 300\)"
    ):
        opt.step({"a": np.ones((5, 300), BF16)})
    assert opt.step({"a": np.ones((5, 300), F16)})
    opt = optim.AdamW({"a": np.ones((5, 300), BF16)}, master_weights=True)
    with pytest.raises(ValueError, match=r"expected bfloat16 or float32 \(5, 300\) like"):
        opt.step({"a": np.ones((5, 300), F16)})


@pytest.mark.parametrize("option", ["master_weights", "stochastic_rounding"])
@pytest.mark.parametrize("value", ["no", None, 1.0])
def test_storage_flags_must_be_booleans(option, value):
    with pytest.raises(TypeError, match=f"{option} must be True or False"):
        optim.AdamW(model(BF16), **{option: value})


def test_state_dtype_takes_torch_dtypes():
    """fusedopt.torch's users name dtypes as torch does."""
    torch = pytest.importorskip("torch")
    for given, name in [
        (torch.bfloat16, "bfloat16"),
        (torch.int8, "int8"),
        (torch.float32, "float32"),
    ]:
        assert optim.AdamW(model(np.float32), state_dtype=given).state_dtype == name
    for bad in (torch.float16, torch.uint8):
        with pytest.raises(ValueError, match=f"state_dtype: expected None.*got {bad}"):
            optim.AdamW(model(np.float32), state_dtype=bad)


def test_int8_state_of_a_buffer_no_longer_used_still_loads():
    """SGD's momentum turned off after it made its int8 buffer: the buffer stays in the state
    and the checkpoint loads (its codes are not checked against a plan that lacks it)."""
    g = {"w": np.ones(300, np.float32)}
    opt = optim.SGD({"w": np.ones(300, np.float32)}, lr=0.1, momentum=0.9, state_dtype="int8")
    opt.step(g)
    opt.param_groups[0]["momentum"] = 0.0
    opt.step(g)
    other = optim.SGD({"w": np.ones(300, np.float32)}, lr=0.1, momentum=0.9, state_dtype="int8")
    other.load_state_dict(opt.state_dict())
    assert_same(other, opt)


def test_subclass_signatures_are_their_own():
    """A subclass that takes no **options keeps its own signature, not its parent's with the
    options added."""
    import inspect

    class Mine(optim.AdamW):
        def __init__(self, params, foo=1):
            super().__init__(params)

    assert list(inspect.signature(Mine).parameters) == ["params", "foo"]

    class Forwarding(optim.AdamW):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)

    assert list(inspect.signature(Forwarding).parameters) == ["args", "kwargs"]


def test_max_grad_norm_takes_numbers_and_skip_if_nonfinite_a_boolean():
    torch = pytest.importorskip("torch")
    for value in (1, 0.5, np.float32(2.0), np.array(1.0), torch.tensor(1.0)):
        opt = optim.AdamW(model(np.float32), max_grad_norm=value)
        assert type(opt.max_grad_norm) is float and opt.max_grad_norm == float(value)
        opt.step({k: np.full(v.shape, 10.0, v.dtype) for k, v in model(np.float32).items()})
    for value in (0, -1.0, np.inf, "1", True, np.True_, np.ones(2), 10**400):
        with pytest.raises(ValueError, match="Invalid max_grad_norm"):
            optim.AdamW(model(np.float32), max_grad_norm=value)
    with pytest.raises(TypeError, match="skip_if_nonfinite must be True or False"):
        optim.AdamW(model(np.float32), skip_if_nonfinite="no")


def test_a_step_count_that_cannot_grow_is_refused_before_anything_is_written():
    """A checkpoint's step must leave room for the next (a kernel counts at most 2**63 - 1):
    load_state_dict refuses more, and a step that finds one (set by hand) raises before it
    clips the grads or updates another parameter."""
    params = {"a": np.ones(4, np.float32), "b": np.ones(4, np.float32)}
    opt = optim.Adam(params, lr=0.1, max_grad_norm=0.5)
    opt.step({k: np.ones(4, np.float32) for k in params})
    sd = opt.state_dict()
    sd["state"]["b"]["step"] = 2**63 - 1
    with pytest.raises(ValueError, match=r"state of 'b': invalid step .*0 to 2\*\*63 - 2"):
        opt.load_state_dict(sd)
    opt.state["b"]["step"] = 2**63 - 1
    before = {k: v.copy() for k, v in params.items()}
    grads = {k: np.ones(4, np.float32) for k in params}
    with pytest.raises(ValueError, match=r"state of 'b': step 9223372036854775807 cannot grow"):
        opt.step(grads)
    for k in params:
        assert_same_bits(params[k], before[k])
        assert_same_bits(grads[k], np.ones(4, np.float32))
    assert opt.state["a"]["step"] == 1
    opt.state["b"]["step"] = 2**63 - 2  # the last step a kernel counts
    assert opt.step(grads)


def test_a_checkpoint_without_the_masters_it_needs_is_refused():
    """Rebuilt from the rounded param, a master would lose what rounding dropped: resuming
    would not be bit-exact, so a low-precision param's missing master is an error."""
    params = model(BF16)
    opt = optim.AdamW(params, lr=1e-2, master_weights=True)
    opt.step(grads(params, BF16, np.random.default_rng(1)))
    sd = opt.state_dict()
    name = next(iter(sd["state"]))
    del sd["state"][name]["master"]
    with pytest.raises(ValueError, match=f"state of {name!r}: missing its float32 master weights"):
        optim.AdamW(model(BF16), lr=1e-2, master_weights=True).load_state_dict(sd)


def test_numpy_scalar_hyperparameters_are_saved(tmp_path):
    """Hyperparameters given as NumPy scalars, as the constructor takes them, are written to a
    checkpoint as the numbers they hold, and a resumed run is bit-identical."""
    params = model(BF16)
    opt = optim.AdamW(
        params,
        lr=np.float32(1e-2),
        betas=(np.float64(0.9), 0.999),
        master_weights=True,
        stochastic_rounding=np.bool_(True),
        seed=np.uint64(7),
    )
    opt.step(grads(params, BF16, np.random.default_rng(1)))
    opt.save(tmp_path / "c.npz")
    resumed = {k: v.copy() for k, v in params.items()}
    other = optim.AdamW.load(tmp_path / "c.npz", resumed)
    g = grads(params, BF16, np.random.default_rng(2))
    opt.step(g)
    other.step(g)
    assert_same(other, opt)
    for k in params:
        assert_same_bits(resumed[k], params[k], k)
