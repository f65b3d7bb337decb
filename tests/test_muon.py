"""Muon: fusedopt.muon_ against fusedopt.reference.muon_, optim.Muon against torch.optim.Muon,
errors, thread counts and checkpoints."""

from __future__ import annotations

import inspect
import re
from unittest import mock

import ml_dtypes
import numpy as np
import pytest
from support import assert_same, assert_same_bits, misaligned

import fusedopt
from fusedopt import optim, reference
from fusedopt.quantize import QuantizedState

try:
    import torch
except ImportError:  # the torch comparisons skip
    torch = None
# torch.optim.Muon (and torch.optim._muon) came with torch 2.9: before, the comparisons skip.
TORCH_MUON = torch is not None and hasattr(torch.optim, "Muon")
NO_TORCH_MUON = "torch.optim.Muon needs torch 2.9: torch.optim comparison skipped"

BF16 = np.dtype(ml_dtypes.bfloat16)
# (param, grad, momentum_buffer) dtypes: every combination muon_ takes.
ROWS = [
    (np.float32, np.float32, np.float32),
    (np.float64, np.float64, np.float64),
    (np.float32, np.float32, BF16),
    (BF16, BF16, np.float32),
    (BF16, np.float32, BF16),
    (np.float16, np.float16, np.float32),
    (np.float16, np.float32, BF16),
]
ROW_IDS = ["-".join(np.dtype(d).name for d in row) for row in ROWS]
# Around the GEMM tiles (128 x 256 outputs) and the norm's chunks (2048 elements); wide and
# tall (transposed) matrices; 1 x 1.
SHAPES = [(1, 1), (3, 5), (5, 3), (64, 48), (130, 300), (300, 130), (257, 129)]


def arrays(shape, row, order, rng):
    p, g, b = (
        np.asarray(rng.standard_normal(shape), dtype=d, order=order)
        for d in (row[0], row[1], row[2])
    )
    return p, g, b


def copies(*arrays):
    return tuple(a.copy(order="K") for a in arrays)


def run(function, p, g, b, steps, rng, **hyper):
    for _ in range(steps):
        g[...] = rng.standard_normal(g.shape).astype(g.dtype)
        function(p, g, b, **hyper)


@pytest.mark.parametrize("order", ["C", "F"])
@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("row", ROWS, ids=ROW_IDS)
@pytest.mark.parametrize("nesterov", [True, False])
def test_without_newton_schulz_is_bit_exact(row, shape, order, nesterov):
    """With ns_steps=0 the step is element-wise passes and the Frobenius norm, which the
    reference computes in the kernels' order: the fused result is bit-identical in every
    storage row, after several steps (the buffer feeds back)."""
    hyper = dict(lr=0.02, weight_decay=0.1, nesterov=nesterov, ns_steps=0)
    fused = arrays(shape, row, order, np.random.default_rng(1))
    expected = copies(*fused)
    run(fusedopt.muon_, *fused, 3, np.random.default_rng(2), **hyper)
    run(reference.muon_, *expected, 3, np.random.default_rng(2), **hyper)
    for a, e, name in zip(fused, expected, ("param", "grad", "momentum_buffer")):
        assert_same_bits(a, e, name)


def orthogonalized(shape, dtype, rng, order="C"):
    """The update O of one step from a zero param and buffer (param = -lr O), fused and
    reference, and O from the same input in float64."""
    g = np.asarray(rng.standard_normal(shape), dtype=dtype, order=order)
    results = []
    for function in (fusedopt.muon_, reference.muon_):
        p, b = np.zeros(shape, dtype, order=order), np.zeros(shape, dtype, order=order)
        function(p, g, b, lr=1.0, weight_decay=0.0)
        results.append(-p.astype(np.float64) / reference.muon_adjusted_lr(1.0, None, shape))
    # the reference's input to the iteration, in float64: (1 - mu) g + mu (1 - mu) g
    u = reference._lerp(g, 0.05 * g, 0.95, dtype)
    exact = reference.newton_schulz(u.astype(np.float64))
    return results[0], results[1], exact


@pytest.mark.parametrize("shape", [(64, 48), (130, 300), (300, 130), (512, 512)], ids=str)
def test_float32_newton_schulz_is_as_accurate_as_numpys(shape):
    """The products are Eigen's GEMM, whose summation order differs from NumPy's BLAS: not bit
    for bit. Both are float32 GEMMs (relative error about sqrt(k) 2^-24 per product, k the inner
    size), amplified by the iteration (its slope at 0 is a = 3.4445, five times), so neither
    is closer to the exact iteration by more than a small factor. The test: measured against
    the iteration in float64 from the same input, the fused error is within 3x NumPy's, and
    both are below 1e-4 of the update's largest entry (measured: a few 1e-6 at these sizes)."""
    fused, ref, exact = orthogonalized(shape, np.float32, np.random.default_rng(0))
    scale = np.abs(exact).max()
    fused_error = np.abs(fused - exact).max() / scale
    ref_error = np.abs(ref - exact).max() / scale
    assert fused_error <= 3 * ref_error + 1e-7, (fused_error, ref_error)
    assert max(fused_error, ref_error) < 1e-4
    assert not np.array_equal(fused, exact)  # float32 results, not float64


@pytest.mark.parametrize("shape", [(64, 48), (130, 300), (300, 130)], ids=str)
@pytest.mark.parametrize("order", ["C", "F"])
def test_float64_matches_reference(shape, order):
    """In float64 the iteration agrees with NumPy's to 1e-12 relative (different summation
    orders; the iteration amplifies each product's 1e-16 by at most a few hundred)."""
    fused, ref, exact = orthogonalized(shape, np.float64, np.random.default_rng(0), order)
    np.testing.assert_allclose(fused, ref, rtol=0, atol=1e-12 * np.abs(ref).max())
    np.testing.assert_allclose(fused, exact, rtol=0, atol=1e-12 * np.abs(ref).max())


@pytest.mark.parametrize("order", ["C", "F"])
@pytest.mark.parametrize("shape", SHAPES[1:], ids=str)
@pytest.mark.parametrize("row", ROWS, ids=ROW_IDS)
def test_matches_reference_in_every_row(row, shape, order):
    """Five steps with the default hyperparameters, each from the same arrays (the fused
    ones): the momentum buffer is bit for bit the reference's (element-wise, no product
    involved); the params agree to the products' float32 rounding (see above: 1e-4 of the
    update lr' |O| at most), and in low precision to one unit in the last place (a product's
    last bits can move a rounding to its neighbour). A rounding that differs stays in the
    param, so the steps are compared one at a time, not as two diverging runs."""
    lr = 0.02
    fused = arrays(shape, row, order, np.random.default_rng(1))
    rng = np.random.default_rng(2)
    for step in range(5):
        fused[1][...] = rng.standard_normal(shape).astype(row[1])
        expected = copies(*fused)
        fusedopt.muon_(*fused, lr=lr)
        reference.muon_(*expected, lr=lr)
        assert_same_bits(fused[2], expected[2])
        p, e = fused[0].astype(np.float64), expected[0].astype(np.float64)
        step_size = reference.muon_adjusted_lr(lr, None, shape)  # |O| <= about 1.2
        if row[0] in (np.float32, np.float64):
            relative = 1e-4 if row[0] == np.float32 else 1e-12
            bound = relative * step_size + np.spacing(np.abs(e).astype(row[0]))
        else:  # one unit in the last place of the larger of the two
            bound = np.spacing(np.maximum(np.abs(p), np.abs(e)).astype(row[0])).astype(float)
        assert np.all(np.abs(p - e) <= bound), (step, np.abs(p - e).max())


@pytest.mark.parametrize("shape", [(300, 520), (129, 257)], ids=str)
def test_bit_identical_for_every_thread_count(shape):
    """Each product runs in fixed tiles, the norm in fixed chunks: the threads only decide
    who computes which."""
    results = []
    try:
        for threads in (1, 2, 3):
            fusedopt.set_num_threads(threads)
            p, g, b = arrays(shape, ROWS[0], "C", np.random.default_rng(5))
            run(fusedopt.muon_, p, g, b, 2, np.random.default_rng(6))
            results.append((p, b))
    finally:
        fusedopt.set_num_threads(None)
    for p, b in results[1:]:
        assert_same_bits(p, results[0][0])
        assert_same_bits(b, results[0][1])


def test_sum_squares_is_the_kernels_order():
    """reference._sum_squares: per chunk, eight lanes summed in sequence, combined pairwise,
    chunks in order; here against a plain loop (and a different order would differ)."""
    x = np.random.default_rng(0).standard_normal(2048 * 2 + 13) * 1e3
    total = 0.0
    for start in range(0, x.size, 2048):
        acc = [0.0] * 8
        for i, v in enumerate(x[start : start + 2048]):
            acc[i % 8] += v * v
        total += ((acc[0] + acc[1]) + (acc[2] + acc[3])) + ((acc[4] + acc[5]) + (acc[6] + acc[7]))
    assert reference._sum_squares(x) == total
    assert fusedopt._core.CHUNK == reference._CHUNK


def test_lists_equal_one_call_per_tensor():
    rng = np.random.default_rng(3)
    shapes = [(6, 5), (5, 9), (40, 3)]
    one = [arrays(s, ROWS[0], "C", rng) for s in shapes]
    many = [copies(*t) for t in one]
    for t in one:
        fusedopt.muon_(*t, lr=0.1)
    assert fusedopt.muon_(*(list(x) for x in zip(*many)), lr=0.1) is True
    for t, m in zip(one, many):
        for a, b in zip(t, m):
            assert_same_bits(a, b)


def test_skip_if_nonfinite_changes_nothing():
    p, g, b = arrays((4, 6), ROWS[0], "C", np.random.default_rng(0))
    g[1, 2] = np.nan
    before = copies(p, g, b)
    assert fusedopt.muon_(p, g, b, skip_if_nonfinite=True) is False
    assert reference.muon_(p, g, b, skip_if_nonfinite=True) is False
    for a, e in zip((p, g, b), before):
        assert_same_bits(a, e)


def test_zero_gradient_gives_zero_update():
    """||U|| = 0: eps keeps the division finite and the update is 0 (weight decay only)."""
    p = np.ones((3, 4), np.float32)
    fusedopt.muon_(p, np.zeros_like(p), np.zeros_like(p), lr=0.1, weight_decay=0.5)
    assert_same_bits(p, np.full(p.shape, np.float32(1 - 0.1 * 0.5)))


def test_adjusted_lr_is_torchs():
    assert reference.muon_adjusted_lr(0.1, None, (8, 2)) == 0.1 * 2
    assert reference.muon_adjusted_lr(0.1, "original", (2, 8)) == 0.1
    assert reference.muon_adjusted_lr(0.1, "match_rms_adamw", (2, 9)) == pytest.approx(0.06)
    if TORCH_MUON:
        from torch.optim._muon import _adjust_lr

        for fn in (None, "original", "match_rms_adamw"):
            for shape in ((8, 2), (2, 8), (5, 5)):
                assert reference.muon_adjusted_lr(0.1, fn, shape) == _adjust_lr(
                    0.1, fn, torch.Size(shape)
                )


# ------------------------------------------------------------------ errors


def bad_calls():
    p, g, b = (np.zeros((4, 3), np.float32) for _ in range(3))
    yield "2-D", (np.zeros(4, np.float32), np.zeros(4, np.float32), np.zeros(4, np.float32)), {}
    yield "2-D", (np.zeros((2, 2, 2)),) * 1 + (np.zeros((2, 2, 2)), np.zeros((2, 2, 2))), {}
    yield "param must be", (p.astype(np.int32), g, b), {}
    yield "grad must be float32", (p, g.astype(np.float64), b), {}
    yield "momentum_buffer must be float32 or bfloat16", (p, g, b.astype(np.float16)), {}
    yield "momentum_buffer has shape", (p, g, np.zeros((3, 4), np.float32)), {}
    yield "memory order", (p, np.asfortranarray(g), b), {}
    yield "grad must be aligned", (p, misaligned(g), b), {}
    yield "momentum_buffer must be aligned", (p, g, misaligned(b)), {}
    yield "must not overlap", (p, p, b), {}
    yield "ns_steps", (p, g, b), dict(ns_steps=100)
    yield "ns_steps must be an integer", (p, g, b), dict(ns_steps=2.0)
    yield "adjust_lr_fn", (p, g, b), dict(adjust_lr_fn="rms")
    yield "ns_coefficients", (p, g, b), dict(ns_coefficients=(1.0, 2.0))
    yield "invalid lr", (p, g, b), dict(lr=-1.0)
    yield "invalid lr: inf", (p, g, b), dict(lr=10**400)  # past a double's range
    yield "invalid weight_decay: -inf", (p, g, b), dict(weight_decay=-(10**400))
    yield "invalid momentum", (p, g, b), dict(momentum=float("nan"))
    yield "nesterov must be a bool", (p, g, b), dict(nesterov=1)
    yield "stochastic_rounding must be a bool", (p, g, b), dict(stochastic_rounding="False")
    yield "skip_if_nonfinite must be a bool", (p, g, b), dict(skip_if_nonfinite="no")
    yield "lists of one length", ([p], [g, g], [b]), {}
    yield "tensors 0 and 1 overlap", ([p, np.zeros((4, 3), np.float32)], [g, g], [b, b]), {}


@pytest.mark.parametrize("match, args, hyper", list(bad_calls()))
def test_bad_calls_raise_and_change_nothing(match, args, hyper):
    flat = [a for x in args for a in (x if isinstance(x, list) else [x])]
    before = [a.copy() for a in flat]
    with pytest.raises((TypeError, ValueError), match=match):
        fusedopt.muon_(*args, **hyper)
    for a, e in zip(flat, before):
        assert_same_bits(a, e)


@pytest.mark.parametrize("bad", [np.nan, np.inf, 0.0, -1.0, 3.0], ids=repr)
def test_int8_scales_that_the_encoder_never_writes(bad):
    """A scale that is not a power of two in [2**-126, 2**127] would decode to NaN or to values
    the codes cannot hold: refused before anything is written, as the element-wise kernels do."""
    p, g = np.ones((4, 300), np.float32), np.ones((4, 300), np.float32)
    b = QuantizedState.from_array(np.full((4, 300), 0.5, np.float32), signed=True)
    b.scales[-1] = bad
    before = [p.copy(), b.codes.copy(), b.scales.copy()]
    for function in (fusedopt.muon_, reference.muon_):
        with pytest.raises(ValueError, match=r"momentum_buffer: scales must be powers of two"):
            function(p, g, b, seed=1)
        for a, e in zip([p, b.codes, b.scales], before):
            assert_same_bits(a, e)


def test_read_only_param_raises():
    p, g, b = (np.zeros((4, 3), np.float32) for _ in range(3))
    p.flags.writeable = False
    with pytest.raises(ValueError, match="param is read-only"):
        fusedopt.muon_(p, g, b)


def test_class_rejects_what_it_cannot_do():
    with pytest.raises(ValueError, match="2-D parameters: parameter 'b' has shape"):
        optim.Muon({"w": np.zeros((3, 3)), "b": np.zeros(3)})
    with pytest.raises(ValueError, match="adjust_lr_fn"):
        optim.Muon([np.zeros((3, 3))], adjust_lr_fn="other")
    with pytest.raises(ValueError, match="'0.0' is float64, whose state is float64"):
        optim.Muon([np.zeros((3, 3))], state_dtype="int8")


# ------------------------------------------------------------------ the class


def model(dtype=np.float64, seed=0):
    rng = np.random.default_rng(seed)
    return {n: rng.standard_normal(s).astype(dtype) for n, s in SHAPES_MODEL.items()}


SHAPES_MODEL = {"w1": (6, 5), "w2": (5, 8), "w3": (32, 16)}


@pytest.mark.skipif(not TORCH_MUON, reason=NO_TORCH_MUON)
def test_class_signature_is_torchs():
    ours = inspect.signature(optim.Muon).parameters
    theirs = inspect.signature(torch.optim.Muon).parameters
    for name, p in theirs.items():
        if name != "params":
            assert ours[name].default == p.default, name
    options = optim.Optimizer.__init__.__kwdefaults__  # fusedopt's own, every class's
    assert [n for n in ours if n not in options] == list(theirs)


def bfloat16_free_torch():
    """torch 2.13's Newton-Schulz casts the update to bfloat16 (``grad.bfloat16()``). With
    that cast patched to a copy in the input's dtype, torch's own code runs in float64."""
    import torch.optim._muon as muon_module

    assert "grad.bfloat16()" in inspect.getsource(muon_module._zeropower_via_newtonschulz)
    return mock.patch.object(torch.Tensor, "bfloat16", lambda self: self.clone())


TORCH_CASES = [
    dict(),
    dict(lr=0.02, weight_decay=0.01),
    dict(lr=0.02, nesterov=False),
    dict(lr=0.02, momentum=0.3),  # lerp's other formulas
    dict(lr=0.01, adjust_lr_fn="match_rms_adamw", weight_decay=0.0),
    dict(lr=0.01, ns_steps=3, ns_coefficients=(2.0, -1.5, 0.5), eps=1e-3),
]


@pytest.mark.skipif(not TORCH_MUON, reason=NO_TORCH_MUON)
@pytest.mark.parametrize("hyper", TORCH_CASES, ids=str)
def test_class_matches_torch_in_float64(hyper):
    """50 steps in float64: params and momentum buffers equal torch.optim.Muon's to rtol 1e-9
    after every step, torch's iteration kept in float64 (see bfloat16_free_torch)."""
    params = model()
    tparams = [torch.tensor(params[n].copy(), requires_grad=True) for n in SHAPES_MODEL]
    topt = torch.optim.Muon(tparams, **hyper)
    opt = optim.Muon(params, **hyper)
    rng = np.random.default_rng(3)
    with bfloat16_free_torch():
        for step in range(50):
            grads = {n: rng.standard_normal(s) for n, s in SHAPES_MODEL.items()}
            for p, n in zip(tparams, SHAPES_MODEL):
                p.grad = torch.tensor(grads[n])
            topt.step()
            opt.step(grads)
            for p, n in zip(tparams, SHAPES_MODEL):
                context = f"{n} step {step}"
                np.testing.assert_allclose(
                    params[n], p.detach().numpy(), rtol=1e-9, atol=1e-12, err_msg=context
                )
                np.testing.assert_allclose(
                    opt.state[n]["momentum_buffer"],
                    topt.state[p]["momentum_buffer"].numpy(),
                    rtol=1e-9,
                    atol=1e-12,
                    err_msg=context,
                )


@pytest.mark.parametrize("dtype", [np.float32, BF16])
def test_class_fused_and_reference(dtype):
    fused, expected = model(dtype), model(dtype)
    opts = [optim.Muon(fused, lr=0.02), optim.Muon(expected, lr=0.02, impl="reference")]
    rng = np.random.default_rng(1)
    for _ in range(4):
        grads = {n: rng.standard_normal(s).astype(dtype) for n, s in SHAPES_MODEL.items()}
        for opt in opts:
            opt.step(grads)
    for n in SHAPES_MODEL:
        assert_same_bits(opts[0].state[n]["momentum_buffer"], opts[1].state[n]["momentum_buffer"])
        np.testing.assert_allclose(
            fused[n].astype(np.float64), expected[n].astype(np.float64), rtol=1e-2, atol=1e-4
        )


def test_two_param_groups_with_adamw(tmp_path):
    """The recommended pairing: Muon for hidden matrices, AdamW for the rest; from_config
    builds it by name; checkpoints resume bit for bit."""
    params = {**model(np.float32), "bias": np.zeros(8, np.float32)}
    hidden = {n: p for n, p in params.items() if p.ndim == 2}
    other = {n: p for n, p in params.items() if n not in hidden}
    muon = optim.from_config("muon", hidden, lr=0.02, momentum=0.9)
    adamw = optim.AdamW(other, lr=1e-3)
    assert isinstance(muon, optim.Muon) and muon.param_groups[0]["momentum"] == 0.9
    rng = np.random.default_rng(0)

    def step(grads):
        muon.step({n: grads[n] for n in hidden})
        adamw.step({n: grads[n] for n in other})

    def grads():
        return {n: rng.standard_normal(p.shape).astype(np.float32) for n, p in params.items()}

    for _ in range(3):
        step(grads())
    muon.save(tmp_path / "muon.npz")
    saved = {n: p.copy() for n, p in hidden.items()}
    later = [grads() for _ in range(2)]
    for g in later:
        muon.step({n: g[n] for n in hidden})
    resumed_params = {n: p.copy() for n, p in saved.items()}
    resumed = optim.Optimizer.load(tmp_path / "muon.npz", resumed_params)
    assert isinstance(resumed, optim.Muon)
    for g in later:
        resumed.step({n: g[n] for n in hidden})
    for n in hidden:
        assert_same_bits(resumed_params[n], hidden[n])
        assert_same_bits(resumed.state[n]["momentum_buffer"], muon.state[n]["momentum_buffer"])


# ------------------------------------------------------------------ storage options
# Masters, stochastic rounding and int8 momentum (the element-wise kernels' storage, issue 10):
# (param, grad, momentum_buffer, master, stochastic rounding); "int8" is a QuantizedState.
STORAGE = [
    (BF16, BF16, np.float32, True, False),
    (BF16, np.float32, BF16, True, True),
    (np.float16, np.float16, np.float32, True, False),
    (np.float16, np.float32, "int8", True, False),
    (BF16, BF16, BF16, False, True),
    (BF16, np.float32, np.float32, False, True),
    (np.float32, np.float32, BF16, False, True),
    (np.float32, np.float32, "int8", False, False),
    (BF16, BF16, "int8", False, True),
    (BF16, np.float32, "int8", True, True),
    (np.float16, np.float16, np.float32, False, True),
    (np.float16, np.float32, "int8", True, True),
]
STORAGE_IDS = [
    "-".join(str(np.dtype(d)) if d != "int8" else d for d in row[:3])
    + ("-master" if row[3] else "")
    + ("-sr" if row[4] else "")
    for row in STORAGE
]


def storage_arrays(shape, case, order, rng):
    """param, grad, momentum_buffer and master (or None) of a STORAGE case."""
    p_dtype, g_dtype, state, master, _ = case
    p = np.asarray(rng.standard_normal(shape), p_dtype, order=order)
    g = np.asarray(rng.standard_normal(shape), g_dtype, order=order)
    if state == "int8":
        b = QuantizedState.from_array(
            np.asarray(rng.standard_normal(shape), np.float32, order=order), signed=True
        )
    else:
        b = np.asarray(rng.standard_normal(shape), state, order=order)
    m = np.asarray(rng.standard_normal(shape), np.float32, order=order) if master else None
    return p, g, b, m


def copied(x):
    if x is None:
        return None
    return x.copy() if isinstance(x, QuantizedState) else x.copy(order="K")


def assert_bits(a, e, name):
    if isinstance(a, QuantizedState):
        assert_same_bits(a.codes, e.codes, name)
        assert_same_bits(a.scales, e.scales, name)
    elif a is not None:
        assert_same_bits(a, e, name)


@pytest.mark.parametrize("order", ["C", "F"])
@pytest.mark.parametrize("shape", [(1, 1), (5, 3), (130, 300), (300, 130)], ids=str)
@pytest.mark.parametrize("case", STORAGE, ids=STORAGE_IDS)
def test_storage_options_are_bit_exact_without_newton_schulz(case, shape, order):
    """With masters, stochastic rounding and int8 momentum, ns_steps=0 (element-wise passes
    and the norm): params, masters, buffers (codes and scales) are the reference's bit for bit
    after several steps, each with its own seed."""
    rng = np.random.default_rng(7)
    fused = list(storage_arrays(shape, case, order, rng))
    expected = [copied(x) for x in fused]
    for step in range(3):
        g = np.asarray(rng.standard_normal(shape), case[1], order=order)
        hyper = dict(lr=0.02, ns_steps=0, stochastic_rounding=case[4], seed=2**64 - 1 - step)
        fusedopt.muon_(fused[0], g, fused[2], master=fused[3], **hyper)
        reference.muon_(expected[0], g, expected[2], master=expected[3], **hyper)
        for a, e, name in zip(fused, expected, ("param", "grad", "momentum_buffer", "master")):
            if name != "grad":
                assert_bits(a, e, f"{name} step {step}")
    if case[3]:  # the param is its master rounded
        rounded = fused[3].astype(case[0])
        if case[4]:  # up or down, not always to nearest
            assert rounded.size < 100 or 0 < np.mean(fused[0] != rounded) < 0.9
        else:
            assert_same_bits(fused[0], rounded)


@pytest.mark.parametrize(
    "case", [c for c in STORAGE if c[3]], ids=[i for c, i in zip(STORAGE, STORAGE_IDS) if c[3]]
)
def test_masters_are_the_float32_step_of_the_master(case):
    """With the products too (default ns_steps): the step with masters is the float32 step on
    the master, bit for bit (the same kernel), and the param its rounding; the old param is
    never read."""
    p_dtype, g_dtype, state, master, sr = case
    rng = np.random.default_rng(3)
    p, g, b, m = storage_arrays((150, 70), case, "C", rng)
    p[...] = 7  # garbage: only the master counts
    q, c = copied(m), copied(b)
    fusedopt.muon_(p, g, b, master=m, lr=0.02, stochastic_rounding=sr, seed=1)
    fusedopt.muon_(q, g.astype(np.float32), c, lr=0.02, stochastic_rounding=sr, seed=1)
    assert_same_bits(m, q)
    assert_bits(b, c, "momentum_buffer")
    if not sr:
        assert_same_bits(p, q.astype(p_dtype))


def sr_matrices(threads, seed):
    fusedopt.set_num_threads(threads)
    rng = np.random.default_rng(0)
    shapes = [(300, 520), (9, 7)]  # above the parallel threshold; a tensor index of 1
    p = [rng.standard_normal(s).astype(BF16) for s in shapes]
    g = [rng.standard_normal(s).astype(BF16) for s in shapes]
    b = [rng.standard_normal(s).astype(BF16) for s in shapes]
    q = [QuantizedState.from_array(rng.standard_normal(s).astype(np.float32), True) for s in shapes]
    fusedopt.muon_(p, g, b, lr=0.02, stochastic_rounding=True, seed=seed)
    r = [rng.standard_normal(s).astype(BF16) for s in shapes]
    fusedopt.muon_(r, g, q, lr=0.02, stochastic_rounding=True, seed=seed)
    return [x.tobytes() for x in p + b + r] + [x.codes.tobytes() for x in q]


def test_stochastic_rounding_is_reproducible_seeded_and_thread_independent():
    """The random bits (of the param, the bfloat16 buffer and the int8 codes) are a function of
    (seed, tensor, element): the same for every thread count and run, others for another
    seed."""
    try:
        first = sr_matrices(1, seed=5)
        assert sr_matrices(2, seed=5) == first
        assert sr_matrices(1, seed=5) == first
        other = sr_matrices(2, seed=6)
    finally:
        fusedopt.set_num_threads(None)
    assert all(a != b for a, b in zip(first, other))


def test_stochastic_rounding_is_unbiased():
    """ns_steps=0 and a constant gradient: every element's update is lr / sqrt(numel) = 1e-4,
    far below half an ulp of bfloat16 params at 1 (2**-9): round to nearest never moves them;
    with stochastic rounding their mean after 200 steps is 1 - 200e-4 = 0.98, within 5
    standard errors of the mean (the spread of the params over sqrt(numel)). A biased rounding
    (always down, or to nearest) misses by far more."""
    shape, steps = (200, 500), 200
    lr = 1e-4 * np.sqrt(200 * 500)
    runs = {}
    for stochastic in (False, True):
        p = np.ones(shape, BF16)
        b = np.zeros(shape, BF16)
        g = np.ones(shape, BF16)
        for step in range(steps):
            hyper = dict(lr=lr, weight_decay=0.0, ns_steps=0, stochastic_rounding=stochastic)
            fusedopt.muon_(p, g, b, seed=step, **hyper)
        runs[stochastic] = p.astype(np.float64)
    assert np.all(runs[False] == 1.0)
    mean = runs[True].mean()
    spread = runs[True].std() / np.sqrt(runs[True].size)
    assert spread > 0
    assert abs(mean - (1 - steps * 1e-4)) < 5 * spread, (mean, spread)


def test_int8_momentum_follows_float32():
    """The int8 buffer is rounded stochastically with a seed per step (the class derives it
    from the step: the kernel takes none), so it tracks the float32 momentum. Its codes keep 3
    mantissa bits (a rounding error up to 2**-4 of an element per step), unbiased, and the
    buffer forgets them at 1 - momentum a step. Over 300 steps of random gradients, measured:
    its norm 1.003 of float32's, the buffer and the params 0.12 and 0.11 (relative) from
    float32's; with one seed for every step (each element rounded with the same bits: biased)
    1.25, 0.67 and 0.84. The bounds sit between: 3%, 0.2 and 0.2."""
    rng = np.random.default_rng(4)
    grads = [{"w": rng.standard_normal((64, 96)).astype(np.float32)} for _ in range(300)]
    runs = {}
    for state_dtype in ("int8", None):
        params = {"w": np.zeros((64, 96), np.float32)}
        opt = optim.Muon(params, lr=0.01, momentum=0.95, state_dtype=state_dtype)
        for g in grads:
            opt.step(g)
        buf = opt.state["w"]["momentum_buffer"]
        if isinstance(buf, QuantizedState):
            buf = buf.dequantize()
        runs[state_dtype] = (buf, params["w"])
    (q, qp), (f, fp) = runs["int8"], runs[None]
    assert abs(np.linalg.norm(q) / np.linalg.norm(f) - 1) < 0.03
    assert np.linalg.norm(q - f) / np.linalg.norm(f) < 0.2
    assert np.linalg.norm(qp - fp) / np.linalg.norm(fp) < 0.2


CLASS_OPTIONS = {
    "masters": (BF16, dict(master_weights=True)),
    "masters-bf16-sr": (BF16, dict(master_weights=True, state_dtype="bfloat16", seed=3)),
    "bf16-sr": (BF16, dict(state_dtype=BF16, stochastic_rounding=True, seed=2**64 - 1)),
    "int8": (np.float32, dict(state_dtype="int8")),
    "masters-int8-sr": (
        np.float16,
        dict(master_weights=True, state_dtype=np.int8, seed=11),
    ),
    "bf16-int8-sr": (BF16, dict(state_dtype="int8", stochastic_rounding=True, seed=8)),
}


@pytest.mark.parametrize("options", CLASS_OPTIONS, ids=str)
def test_class_storage_options_fused_and_reference(options):
    """optim.Muon with every storage option, ns_steps=0: the fused class and the reference
    class agree bit for bit (params, masters, buffers and codes)."""
    dtype, opts = CLASS_OPTIONS[options]
    fused, expected = model(dtype), model(dtype)
    hyper = dict(lr=0.02, ns_steps=0)
    a = optim.Muon(fused, **hyper, **opts)
    e = optim.Muon(expected, **hyper, **opts, impl="reference")
    rng = np.random.default_rng(1)
    for _ in range(4):
        grads = {n: rng.standard_normal(s).astype(dtype) for n, s in SHAPES_MODEL.items()}
        a.step(grads)
        e.step(grads)
    for n in SHAPES_MODEL:
        assert_same_bits(fused[n], expected[n])
    assert_same(a, e)
    if opts.get("master_weights"):
        assert a.state["w1"]["master"].dtype == np.float32


@pytest.mark.parametrize("options", ["masters-bf16-sr", "bf16-int8-sr", "masters-int8-sr"])
def test_checkpoint_with_storage_options_resumes_bit_for_bit(options, tmp_path):
    """Saved and loaded by Optimizer.load: masters, int8 codes and scales, the seed and the
    stochastic-rounding stream continue exactly as the uninterrupted run."""
    dtype, opts = CLASS_OPTIONS[options]
    params = model(dtype)
    opt = optim.Muon(params, lr=0.02, **opts)
    rng = np.random.default_rng(0)
    grads = [
        {n: rng.standard_normal(s).astype(dtype) for n, s in SHAPES_MODEL.items()} for _ in range(5)
    ]
    for g in grads[:3]:
        opt.step(g)
    opt.save(tmp_path / "muon.npz")
    saved = {n: p.copy() for n, p in params.items()}
    for g in grads[3:]:
        opt.step(g)
    resumed = optim.Optimizer.load(tmp_path / "muon.npz", saved)
    assert (resumed.master_weights, resumed.state_dtype, resumed.seed) == (
        opt.master_weights,
        opt.state_dtype,
        opt.seed,
    )
    for g in grads[3:]:
        resumed.step(g)
    for n in SHAPES_MODEL:
        assert_same_bits(saved[n], params[n])
    assert_same(resumed, opt)


def bad_storage_calls():
    shape = (4, 3)
    p, g = np.zeros(shape, BF16), np.zeros(shape, np.float32)
    b, m = np.zeros(shape, np.float32), np.zeros(shape, np.float32)
    f32 = np.zeros(shape, np.float32)
    q = QuantizedState.zeros(shape, signed=True)
    wrong_scales = QuantizedState.zeros(shape, signed=True)
    wrong_scales.scales = np.zeros(2, np.float32)  # QuantizedState checks only when made
    yield (
        TypeError,
        "master: float32 master weights are for a bfloat16 or float16 param, got a float32",
        (f32, g, b),
        dict(master=m),
    )  # noqa: E501
    yield (
        TypeError,
        "master must be float32, got float64",
        (p, g, b),
        dict(master=m.astype(np.float64)),
    )  # noqa: E501
    yield (
        ValueError,
        "master has shape \\(3, 4\\), expected \\(4, 3\\)",
        (p, g, b),
        dict(master=np.zeros((3, 4), np.float32)),
    )  # noqa: E501
    yield (
        ValueError,
        "master must be contiguous in the param's memory order",
        (p, g, b),
        dict(master=np.asfortranarray(np.zeros((4, 3), np.float32))),
    )  # noqa: E501
    yield (
        TypeError,
        "master must be a numpy.ndarray like param, got list",
        (p, g, b),
        dict(master=[m]),
    )  # noqa: E501
    yield ValueError, "master must be a list of 1 arrays", ([p], [g], [b]), dict(master=[m, m])
    yield ValueError, "momentum_buffer and master share memory", (p, g, b), dict(master=b)
    yield ValueError, "Invalid seed: -1", (p, g, b), dict(seed=-1)
    yield ValueError, "Invalid seed", (p, g, b), dict(seed=2**64)
    yield TypeError, "seed must be an integer, got float", (p, g, b), dict(seed=1.0)
    yield (
        TypeError,
        "momentum_buffer.codes must be int8",
        (p, g, QuantizedState.zeros(shape, signed=False)),
        {},
    )  # noqa: E501
    yield (
        ValueError,
        "momentum_buffer.codes has shape",
        (p, g, QuantizedState.zeros((3, 4), signed=True)),
        {},
    )  # noqa: E501
    yield (
        ValueError,
        "momentum_buffer.scales must be float32 of shape \\(1,\\)",
        (p, g, wrong_scales),
        {},
    )  # noqa: E501
    yield (
        TypeError,
        "momentum_buffer must be float64 for a float64 param",
        (np.zeros(shape), np.zeros(shape), q),
        {},
    )  # noqa: E501
    yield (
        ValueError,
        "momentum_buffer.codes must be contiguous in the param's memory order",
        (p, g, QuantizedState(np.asfortranarray(q.codes), q.scales.copy())),
        {},
    )  # noqa: E501


@pytest.mark.parametrize("error, match, args, options", list(bad_storage_calls()))
def test_bad_storage_arguments_raise_and_change_nothing(error, match, args, options):
    """Masters, seeds and int8 buffers that cannot apply: a TypeError or ValueError that names
    the argument, before anything is written."""
    everything = [*args, *options.values()]
    flat = []
    for x in everything:
        for a in x if isinstance(x, list) else [x]:
            flat += [a.codes, a.scales] if isinstance(a, QuantizedState) else [a]
    flat = [a for a in flat if isinstance(a, np.ndarray)]
    for a in flat:
        a[...] = 3  # not zeros: a step would change them
    before = [a.copy(order="K") for a in flat]
    with pytest.raises(error, match=match):
        fusedopt.muon_(*args, lr=0.1, **options)
    for a, e in zip(flat, before):
        assert_same_bits(a, e)


@pytest.mark.parametrize("fn", [fusedopt.muon_, reference.muon_], ids=["fused", "reference"])
def test_muon_needs_a_seed_to_draw_random_bits(fn):
    """muon_ has no step: its random bits are a function of the seed alone, so a call that
    draws any (stochastic rounding of bfloat16, an int8 buffer) needs one; others do not."""
    rng = np.random.default_rng(0)
    param = rng.standard_normal((8, 12)).astype(BF16)
    grad = rng.standard_normal((8, 12)).astype(np.float32)
    for buffer, options in [
        (np.zeros((8, 12), np.float32), dict(stochastic_rounding=True)),
        (QuantizedState.zeros((8, 12), signed=True), {}),
    ]:
        before = param.copy()
        with pytest.raises(TypeError, match=rf"^muon_\(\): {re.escape(reference.SEED_NEEDED)}$"):
            fn(param, grad, buffer, lr=0.01, **options)
        assert_same_bits(param, before)
        assert fn(param, grad, buffer, lr=0.01, seed=4, **options) is True
    assert fn(param, grad, np.zeros((8, 12), np.float32), lr=0.01) is True  # to nearest
