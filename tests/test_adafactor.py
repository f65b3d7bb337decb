"""Adafactor: fusedopt.adafactor_ against fusedopt.reference.adafactor_ (bit for bit),
optim.Adafactor against torch.optim.Adafactor, errors, thread counts and checkpoints."""

from __future__ import annotations

import inspect

import ml_dtypes
import numpy as np
import pytest

import fusedopt
from fusedopt import _matrix, optim, reference

try:
    import torch
except ImportError:  # the torch comparisons skip
    torch = None

BF16 = np.dtype(ml_dtypes.bfloat16)
ROWS = [
    (np.float32, np.float32),
    (np.float64, np.float64),
    (BF16, BF16),
    (BF16, np.float32),
    (np.float16, np.float16),
    (np.float16, np.float32),
]
ROW_IDS = ["-".join(np.dtype(d).name for d in row) for row in ROWS]
# scalars and vectors (a full variance), matrices and batches of them (factored), around the
# 8 lanes of the row sums, the 256-column blocks and the 2048-element chunks
SHAPES = [(), (1,), (7,), (3000,), (1, 1), (5, 3), (3, 5), (17, 300), (2, 3, 4), (2, 33, 257)]
HYPERS = [
    dict(),
    dict(lr=0.5, weight_decay=0.1, maximize=True),  # rho = 1/sqrt(t) from the start
    dict(eps=(1e-30, 1e-3), d=1.5, beta2_decay=-0.5),
    dict(eps=(0.1, 10.0)),  # alpha from eps2, every estimate clamped
]


def tensor(shape, row, rng):
    p = np.asarray(rng.standard_normal(shape), dtype=row[0])
    state = np.float64 if row[0] == np.float64 else np.float32
    shapes = _matrix.adafactor_state_shapes(p.shape)
    moments = {
        k: np.zeros(shapes[k], state) if k in shapes else None
        for k in ("row_var", "col_var", "variance")
    }
    return p, moments


def run(function, p, moments, row, steps, rng, **hyper):
    for step in range(1, steps + 1):
        g = np.asarray(rng.standard_normal(p.shape), dtype=row[1])
        assert function(p, g, *moments.values(), step=step, **hyper) is True


@pytest.mark.parametrize("hyper", HYPERS, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("row", ROWS, ids=ROW_IDS)
def test_matches_reference_bit_for_bit(row, shape, hyper):
    """Every sum (row and column means, the norms) runs in double in the same order in both,
    every element-wise operation in the compute type, rounded once: the same bits."""
    p, moments = tensor(shape, row, np.random.default_rng(1))
    q, expected = p.copy(), {k: None if v is None else v.copy() for k, v in moments.items()}
    run(fusedopt.adafactor_, p, moments, row, 4, np.random.default_rng(2), **hyper)
    run(reference.adafactor_, q, expected, row, 4, np.random.default_rng(2), **hyper)
    np.testing.assert_array_equal(p, q, strict=True)
    for key in moments:
        if moments[key] is not None:
            np.testing.assert_array_equal(moments[key], expected[key], err_msg=key, strict=True)


def test_lists_equal_one_call_per_tensor():
    rng = np.random.default_rng(0)
    tensors = [tensor(s, ROWS[0], rng) for s in [(4, 5), (6,), (2, 3, 4)]]
    copies = [
        (p.copy(), {k: None if v is None else v.copy() for k, v in m.items()}) for p, m in tensors
    ]
    grads = [rng.standard_normal(p.shape).astype(np.float32) for p, _ in tensors]
    for (p, m), g in zip(tensors, grads):
        fusedopt.adafactor_(p, g, *m.values(), step=1)
    fusedopt.adafactor_(
        [p for p, _ in copies],
        grads,
        *([m[k] for _, m in copies] for k in ("row_var", "col_var", "variance")),
        step=1,
    )
    for (p, _), (q, _) in zip(tensors, copies):
        np.testing.assert_array_equal(p, q)


@pytest.mark.parametrize("shape", [(3, 700, 600), (20000,)], ids=str)
def test_bit_identical_for_every_thread_count(shape):
    results = []
    try:
        for threads in (1, 2, 3):
            fusedopt.set_num_threads(threads)
            p, moments = tensor(shape, ROWS[0], np.random.default_rng(5))
            run(fusedopt.adafactor_, p, moments, ROWS[0], 2, np.random.default_rng(6))
            results.append((p, moments))
    finally:
        fusedopt.set_num_threads(None)
    for p, moments in results[1:]:
        np.testing.assert_array_equal(p, results[0][0])
        for k, v in moments.items():
            if v is not None:
                np.testing.assert_array_equal(v, results[0][1][k])


def test_lane_sums_are_the_kernels_order():
    x = np.random.default_rng(0).standard_normal((3, 19)) * 1e3
    for row, total in zip(x, reference._lane_sums_of_squares(x)):
        acc = [0.0] * 8
        for i, v in enumerate(row):
            acc[i % 8] += v * v
        assert total == ((acc[0] + acc[1]) + (acc[2] + acc[3])) + (
            (acc[4] + acc[5]) + (acc[6] + acc[7])
        )


def test_state_bytes_per_element():
    """Factored: 4 (rows + cols) bytes for rows x cols elements; vectors 4 bytes each."""
    opt = optim.Adafactor(
        {"w": np.zeros((1024, 4096), np.float32), "b": np.zeros(4096, np.float32)}
    )
    opt.step({"w": np.ones((1024, 4096), np.float32), "b": np.ones(4096, np.float32)})
    w = sum(v.nbytes for v in opt.state["w"].values() if isinstance(v, np.ndarray))
    b = sum(v.nbytes for v in opt.state["b"].values() if isinstance(v, np.ndarray))
    assert w == 4 * (1024 + 4096) and w / (1024 * 4096) < 0.005
    assert b / 4096 == 4


# ------------------------------------------------------------------ errors


def bad_calls():
    p = np.zeros((4, 3), np.float32)
    g = np.zeros((4, 3), np.float32)
    r, c = np.zeros((4, 1), np.float32), np.zeros((1, 3), np.float32)
    yield "step must be an integer", (p, g, r, c, None), dict(step=1.0)
    yield "invalid step", (p, g, r, c, None), dict(step=0)
    yield "beta2_decay", (p, g, r, c, None), dict(step=1, beta2_decay=0.5)
    yield "invalid d", (p, g, r, c, None), dict(step=1, d=0.5)
    yield "eps must be a pair", (p, g, r, c, None), dict(step=1, eps=1e-3)
    yield (
        "row_var must be float32 \\(4, 1\\)",
        (p, g, np.zeros((1, 4), np.float32), c, None),
        dict(step=1),
    )
    yield "variance must be None", (p, g, r, c, np.zeros((4, 3), np.float32)), dict(step=1)
    yield "col_var must be a float32", (p, g, r, None, None), dict(step=1)
    yield "grad must be float32", (p, g.astype(np.float64), r, c, None), dict(step=1)
    yield "C-contiguous", (np.zeros((4, 3), np.float32, order="F"), g, r, c, None), dict(step=1)
    yield "must not overlap", (p, p, r, c, None), dict(step=1)
    yield "param must be", (p.astype(np.int64), g, r, c, None), dict(step=1)


@pytest.mark.parametrize("match, args, hyper", list(bad_calls()))
def test_bad_calls_raise_and_change_nothing(match, args, hyper):
    before = [None if a is None else a.copy() for a in args]
    with pytest.raises((TypeError, ValueError), match=match):
        fusedopt.adafactor_(*args, **hyper)
    for a, e in zip(args, before):
        if a is not None:
            np.testing.assert_array_equal(a, e)


def test_class_rejects_what_it_cannot_do():
    for options in (dict(master_weights=True), dict(stochastic_rounding=True)):
        with pytest.raises(ValueError, match="Adafactor does not take"):
            optim.Adafactor([np.zeros((3, 3), np.float32)], **options)
    with pytest.raises(ValueError, match="state_dtype"):
        optim.Adafactor([np.zeros((3, 3), np.float32)], state_dtype="bfloat16")
    with pytest.raises(ValueError, match="invalid d"):
        optim.Adafactor([np.zeros((3, 3))], d=0.5)


# ------------------------------------------------------------------ the class

SHAPES_MODEL = {"w1": (6, 5), "b1": (5,), "w2": (2, 3, 4), "scale": ()}


def model(dtype=np.float64, seed=0):
    rng = np.random.default_rng(seed)
    return {n: np.asarray(rng.standard_normal(s), dtype) for n, s in SHAPES_MODEL.items()}


def test_class_signature_is_torchs():
    if torch is None:
        pytest.skip("torch not installed")
    ours = inspect.signature(optim.Adafactor).parameters
    theirs = inspect.signature(torch.optim.Adafactor).parameters
    assert [n for n in ours if n != "options"] == list(theirs)
    for name, p in theirs.items():
        if name != "params":
            assert ours[name].default == p.default and ours[name].kind == p.kind, name


TORCH_CASES = [
    dict(),
    dict(lr=0.5, weight_decay=0.1, maximize=True),
    dict(lr=0.05, eps=(1e-20, 1e-2), d=1.5, beta2_decay=-0.5),
]


@pytest.mark.skipif(torch is None, reason="torch not installed: torch.optim comparison skipped")
@pytest.mark.parametrize("hyper", TORCH_CASES, ids=str)
def test_class_matches_torch_in_float64(hyper):
    """50 steps in float64: params and moments equal torch.optim.Adafactor's (foreach=False) to
    rtol 1e-9 after every step (the sums' orders and torch's rsqrt differ in the last bits)."""
    params = model()
    tparams = [torch.tensor(params[n].copy(), requires_grad=True) for n in SHAPES_MODEL]
    topt = torch.optim.Adafactor(tparams, foreach=False, **hyper)
    opt = optim.Adafactor(params, **hyper)
    rng = np.random.default_rng(3)
    for step in range(50):
        grads = {n: np.asarray(rng.standard_normal(s)) for n, s in SHAPES_MODEL.items()}
        for p, n in zip(tparams, SHAPES_MODEL):
            p.grad = torch.tensor(grads[n])
        topt.step()
        opt.step(grads)
        for p, n in zip(tparams, SHAPES_MODEL):
            context = f"{n} step {step}"
            np.testing.assert_allclose(
                params[n], p.detach().numpy(), rtol=1e-9, atol=1e-12, err_msg=context
            )
            for key in ("row_var", "col_var", "variance"):
                if key in topt.state[p]:
                    np.testing.assert_allclose(
                        opt.state[n][key],
                        topt.state[p][key].numpy(),
                        rtol=1e-9,
                        atol=1e-15,
                        err_msg=f"{context} {key}",
                    )


@pytest.mark.parametrize("dtype", [np.float32, BF16])
def test_class_fused_equals_reference(dtype):
    fused, expected = model(dtype), model(dtype)
    opts = [
        optim.Adafactor(fused, weight_decay=0.1),
        optim.Adafactor(expected, weight_decay=0.1, impl="reference"),
    ]
    rng = np.random.default_rng(1)
    for _ in range(4):
        grads = {n: np.asarray(rng.standard_normal(s), dtype) for n, s in SHAPES_MODEL.items()}
        for opt in opts:
            opt.step(grads)
    for n in SHAPES_MODEL:
        np.testing.assert_array_equal(fused[n], expected[n])


def test_checkpoint_resumes_bit_for_bit(tmp_path):
    params = model(np.float32)
    opt = optim.from_config("adafactor", params, lr=0.05)
    assert isinstance(opt, optim.Adafactor)
    rng = np.random.default_rng(0)

    def grads():
        return {n: np.asarray(rng.standard_normal(s), np.float32) for n, s in SHAPES_MODEL.items()}

    for _ in range(3):
        opt.step(grads())
    opt.save(tmp_path / "adafactor.npz")
    saved = {n: p.copy() for n, p in params.items()}
    later = [grads() for _ in range(2)]
    for g in later:
        opt.step(g)
    resumed = optim.Optimizer.load(tmp_path / "adafactor.npz", saved)
    assert isinstance(resumed, optim.Adafactor)
    assert resumed.state["w1"]["row_var"].shape == (6, 1)
    for g in later:
        resumed.step(g)
    for n in SHAPES_MODEL:
        np.testing.assert_array_equal(saved[n], params[n])
        for key, value in opt.state[n].items():
            np.testing.assert_array_equal(resumed.state[n][key], value)
