"""LAMB's reference function (fusedopt.reference.lamb_, the spec of the fused kernel still to be
written) against pytorch_optimizer.Lamb in float64, and its fixed-order sum of squares against
the kernels' (the one behind fusedopt.global_norm)."""

from __future__ import annotations

import numpy as np
import pytest

from fusedopt import _core, reference

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
