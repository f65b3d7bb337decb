"""LAMB: the fused kernel (fusedopt.lamb_) against its reference bit for bit where the generated
tests (tests/test_kernels.py, from the declaration) do not reach: per-tensor norms of lists with
empty and 0-d tensors in every storage row, chunk-boundary sizes, and thread splits inside
small lists; the reference, optim.LAMB and fusedopt.torch.LAMB against pytorch_optimizer.Lamb in
float64; and the reference's fixed-order sum of squares against the kernels' (the one behind
fusedopt.global_norm)."""

from __future__ import annotations

import numpy as np
import pytest
from support import assert_identical, copy_arrays
from test_kernels import as_row

import fusedopt
from fusedopt import _core, optim, reference
from fusedopt.registry import OPTIMIZERS

SPEC = OPTIMIZERS["lamb"]
CHUNK = _core.CHUNK
# Sizes around the 8 lanes of the sums and the SIMD widths, and around chunk boundaries.
EDGE_SHAPES = [(), (0,), (1,), (7,), (8,), (9,), (17,), (CHUNK - 1,), (CHUNK,), (CHUNK + 1,),
               (2 * CHUNK + 9,), (0,), (33, 65)]  # fmt: skip
KERNEL_CASES = [
    dict(),
    dict(weight_decay=0.1, lr=0.05),
    dict(weight_decay=0.1, decoupled_weight_decay=False, maximize=True),
    dict(lr=0.5, clamp=0.5),  # every weight norm above the clamp
    dict(clamp=float("inf"), eps=1e-8),
]


def lamb_arrays(shapes, rng, scale=3.0):
    """float32 param, grad and nonzero moments (zero moments would hide the state's rounding)."""

    def draw(shape, factor, positive=False):
        x = np.asarray(rng.standard_normal(shape), np.float32)
        return np.asarray((np.abs(x) if positive else x) * np.float32(factor))

    return {
        "param": [draw(s, scale) for s in shapes],
        "grad": [draw(s, 1) for s in shapes],
        "exp_avg": [draw(s, 0.1) for s in shapes],
        "exp_avg_sq": [draw(s, 0.01, True) for s in shapes],
    }


@pytest.mark.parametrize("hyper", KERNEL_CASES, ids=str)
@pytest.mark.parametrize("row", _core.STORAGE_ROWS, ids="-".join)
def test_kernel_matches_reference_on_edge_lists(row, hyper):
    """One call over a list of edge sizes (empty and 0-d tensors among them), 3 steps, in every
    storage row: bit for bit reference.lamb_, which computes every tensor's norms alone."""
    rng = np.random.default_rng(11)
    arrays = as_row(lamb_arrays(EDGE_SHAPES, rng), row)
    expected = copy_arrays(arrays)
    for step in range(1, 4):
        grads = [np.asarray(rng.standard_normal(g.shape), g.dtype) for g in arrays["grad"]]
        arrays["grad"] = expected["grad"] = grads
        SPEC.call(SPEC.fused, arrays, hyper, step)
        SPEC.call(SPEC.reference, expected, hyper, step)
        assert_identical(arrays, expected, f"step {step}")


def test_norms_are_per_tensor():
    """A list call gives each tensor the result of a call on it alone: its own trust ratio."""
    rng = np.random.default_rng(2)
    shapes = [(100,), (CHUNK + 5,), (3, 4)]
    arrays = lamb_arrays(shapes, rng)
    arrays["param"][1] *= 100  # a weight norm far above the clamp beside two below it
    alone = copy_arrays(arrays)
    fusedopt.lamb_(*arrays.values(), step=2, weight_decay=0.01)
    for i in range(len(shapes)):
        fusedopt.lamb_(*(a[i] for a in alone.values()), step=2, weight_decay=0.01)
    assert_identical(arrays, alone)


@pytest.fixture
def small_parallel_threshold():
    threshold = _core.get_parallel_min()
    _core.set_parallel_min(1)
    yield
    _core.set_parallel_min(threshold)
    fusedopt.set_num_threads(None)


@pytest.mark.parametrize("row", [("float32",) * 3, ("float64",) * 3, ("bfloat16",) * 3,
                                 ("float16", "float32", "int8")], ids="-".join)  # fmt: skip
def test_thread_counts_give_the_same_bits(row, small_parallel_threshold):
    """1, 2 and 3 threads split even small lists (parallel threshold 1) inside tensors, so
    tensors' chunk sums come from different threads: the same bits every time, and the
    reference's."""
    results = []
    for threads in (1, 2, 3):
        fusedopt.set_num_threads(threads)
        rng = np.random.default_rng(5)
        arrays = as_row(lamb_arrays(EDGE_SHAPES + [(5 * CHUNK + 3,)], rng), row)
        expected = copy_arrays(arrays)
        SPEC.call(SPEC.fused, arrays, dict(weight_decay=0.1), 4)
        SPEC.call(SPEC.reference, expected, dict(weight_decay=0.1), 4)
        assert_identical(arrays, expected, f"{threads} threads")
        results.append(arrays)
    for threads, arrays in zip((2, 3), results[1:]):
        assert_identical(arrays, results[0], f"{threads} threads vs 1")


def test_bytes_moved_per_element():
    """Two passes: 16 bytes read per float32 element, then 16 read and 12 written."""
    assert SPEC.declaration.passes == 2
    assert SPEC.bytes_per_element(4, {}) == 44
    assert OPTIMIZERS["adam"].bytes_per_element(4, {}) == 28


def test_bad_input_changes_nothing():
    """An invalid clamp, a mismatched shape in the last tensor and a NaN hyperparameter are
    refused before the first pass: no tensor of the list is touched."""
    rng = np.random.default_rng(3)
    arrays = lamb_arrays([(10,), (CHUNK + 1,), (4,)], rng)
    saved = copy_arrays(arrays)
    with pytest.raises(ValueError, match="^Invalid clamp value: -1"):
        fusedopt.lamb_(*arrays.values(), step=1, clamp=-1.0)
    with pytest.raises(ValueError, match="^Invalid epsilon value: nan"):
        fusedopt.lamb_(*arrays.values(), step=1, eps=float("nan"))
    arrays["exp_avg_sq"][2] = np.zeros(5, np.float32)
    with pytest.raises(ValueError, match=r"exp_avg_sq\[2\]"):
        fusedopt.lamb_(*arrays.values(), step=1)
    arrays["exp_avg_sq"][2] = saved["exp_avg_sq"][2].copy()
    assert_identical(arrays, saved)


torch = pytest.importorskip("torch", reason="torch not installed: LAMB comparison skipped")
pytorch_optimizer = pytest.importorskip(
    "pytorch_optimizer", reason="pytorch_optimizer not installed: LAMB comparison skipped"
)

SHAPES = [(6, 5), (5,), (3000,), (), (0,)]
CASES = [
    dict(),
    dict(weight_decay=0.1),
    dict(weight_decay=0.1, decoupled_weight_decay=False),
    dict(lr=0.01, betas=(0.8, 0.99), eps=1e-8, maximize=True),
    dict(lr=0.05),  # weight norms above the clamp (10) and below it
]


@pytest.mark.parametrize("foreach", [False, True])
@pytest.mark.parametrize("hyper", CASES, ids=str)
def test_reference_matches_pytorch_optimizer(hyper, foreach):
    """50 steps on a list of tensors (an empty and a 0-d one among them) in float64: every
    parameter and both moments equal pytorch_optimizer.Lamb's to rtol 1e-9 after every step."""
    rng = np.random.default_rng(1)
    params = [np.asarray(rng.standard_normal(s) * 3) for s in SHAPES]
    tparams = [torch.tensor(p.copy(), requires_grad=True) for p in params]
    peer = dict(hyper)
    if "decoupled_weight_decay" in peer:
        peer["weight_decouple"] = peer.pop("decoupled_weight_decay")
    topt = pytorch_optimizer.Lamb(tparams, foreach=foreach, **peer)
    ours = dict(hyper)
    if "betas" in ours:
        ours["beta1"], ours["beta2"] = ours.pop("betas")
    exp_avg = [np.zeros(s) for s in SHAPES]
    exp_avg_sq = [np.zeros(s) for s in SHAPES]
    for step in range(1, 51):
        grads = [np.asarray(rng.standard_normal(s)) for s in SHAPES]
        for t, g in zip(tparams, grads):
            t.grad = torch.tensor(g)
        topt.step()
        reference.lamb_(params, grads, exp_avg, exp_avg_sq, step=step, **ours)
        for i, t in enumerate(tparams):
            context = f"tensor {i} step {step}"
            np.testing.assert_allclose(
                params[i], t.detach().numpy(), rtol=1e-9, atol=1e-12, err_msg=context
            )
            for mine, key in ((exp_avg, "exp_avg"), (exp_avg_sq, "exp_avg_sq")):
                np.testing.assert_allclose(
                    mine[i], topt.state[t][key].numpy(), rtol=1e-9, atol=1e-12, err_msg=context
                )


@pytest.mark.parametrize("n", [0, 1, 7, 8, 9, 2047, 2048, 2049, 10007])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_sum_squares_is_the_kernels(n, dtype):
    """The reference's sum of squares adds in the kernels' fixed order: the same bits as
    _core.sum_squares, for sizes around the 8 lanes and the 2048-element chunk."""
    x = np.random.default_rng(n).standard_normal(n).astype(dtype)
    assert reference._sum_squares(x) == _core.sum_squares([x])


def peer_arguments(hyper):
    """pytorch_optimizer.Lamb's keywords for ours (weight_decouple)."""
    peer = dict(hyper)
    if "decoupled_weight_decay" in peer:
        peer["weight_decouple"] = peer.pop("decoupled_weight_decay")
    return peer


@pytest.mark.parametrize("adapter", [False, True], ids=["optim.LAMB", "fusedopt.torch.LAMB"])
@pytest.mark.parametrize("hyper", CASES, ids=str)
def test_classes_match_pytorch_optimizer(hyper, adapter):
    """optim.LAMB (NumPy arrays) and fusedopt.torch.LAMB (the tensors themselves), 30 steps
    in float64 on a list with an empty and a 0-d tensor: every parameter and both moments
    equal pytorch_optimizer.Lamb's to rtol 1e-9 after every step."""
    rng = np.random.default_rng(4)
    start = [np.asarray(rng.standard_normal(s) * 3) for s in SHAPES]
    peer_params = [torch.tensor(p.copy(), requires_grad=True) for p in start]
    peer = pytorch_optimizer.Lamb(peer_params, **peer_arguments(hyper))
    if adapter:
        import fusedopt.torch

        ours_params = [torch.tensor(p.copy(), requires_grad=True) for p in start]
        ours = fusedopt.torch.LAMB(ours_params, **hyper)
        arrays = [p.detach().numpy() for p in ours_params]
    else:
        arrays = [p.copy() for p in start]
        ours = optim.LAMB(arrays, **hyper)
    for step in range(1, 31):
        grads = [np.asarray(rng.standard_normal(s)) for s in SHAPES]
        for t, g in zip(peer_params, grads):
            t.grad = torch.tensor(g)
        peer.step()
        if adapter:
            for t, g in zip(ours_params, grads):
                t.grad = torch.tensor(g)
            ours.step()
        else:
            ours.step(grads)
        for i, t in enumerate(peer_params):
            context = f"tensor {i} step {step}"
            np.testing.assert_allclose(
                arrays[i], t.detach().numpy(), rtol=1e-9, atol=1e-12, err_msg=context
            )
            state = ours.state[ours_params[i]] if adapter else ours.state[f"0.{i}"]
            for key in ("exp_avg", "exp_avg_sq"):
                mine = state[key].numpy() if adapter else state[key]
                np.testing.assert_allclose(
                    mine, peer.state[t][key].numpy(), rtol=1e-9, atol=1e-12, err_msg=context
                )
