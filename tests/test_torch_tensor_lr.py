"""fusedopt.torch with a float32 tensor lr, as torch allows: the optim_db comparison
(tests/test_torch_adapter.py) builds its inputs under float64, where a tensor lr is float64, so
this file covers the float32 one. The adapter reads the tensor's value at each step, so an
lr scheduler that writes into it in place (torch's schedulers fill_ a tensor lr) is followed."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch", reason="torch not installed: fusedopt.torch skipped")
ft = pytest.importorskip("fusedopt.torch")

SHAPES = [(5, 3), (7,), (), (300,)]
# the classes whose torch.optim twins take a tensor lr in their for-loop implementation
NAMES = ["SGD", "Adam", "AdamW", "Adamax", "NAdam", "RAdam", "Adagrad", "RMSprop"]
HYPER = {"SGD": dict(momentum=0.9)}


def _params(seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(s, generator=g).requires_grad_() for s in SHAPES]


def _run(opt, params, steps, scheduler=None):
    for t in range(steps):
        g = torch.Generator().manual_seed(100 + t)
        for p in params:
            p.grad = torch.randn(p.shape, generator=g)
        opt.step()
        if scheduler is not None:
            scheduler.step()


@pytest.mark.parametrize("name", NAMES)
def test_float32_tensor_lr_equals_its_value(name):
    """A float32 tensor lr gives the bits of the Python float it holds."""
    assert torch.get_default_dtype() == torch.float32
    lr = torch.tensor(0.01)
    assert lr.dtype == torch.float32
    hyper = HYPER.get(name, {})
    with_tensor, with_float = _params(), _params()
    _run(getattr(ft, name)(with_tensor, lr=lr, **hyper), with_tensor, 8)
    _run(getattr(ft, name)(with_float, lr=lr.item(), **hyper), with_float, 8)
    for a, b in zip(with_tensor, with_float):
        assert torch.equal(a, b)


@pytest.mark.parametrize("name", NAMES)
def test_float32_tensor_lr_follows_a_scheduler_as_torch(name):
    """With a float32 tensor lr that StepLR halves in place every 5 steps, the adapter follows
    torch's for-loop optimizer given the same tensor lr and schedule, to float32 rounding."""
    hyper = HYPER.get(name, {})
    ours_params, their_params = _params(), _params()
    ours = getattr(ft, name)(ours_params, lr=torch.tensor(0.01), **hyper)
    theirs = getattr(torch.optim, name)(their_params, lr=torch.tensor(0.01), foreach=False, **hyper)
    for opt, params in ((ours, ours_params), (theirs, their_params)):
        _run(opt, params, 12, torch.optim.lr_scheduler.StepLR(opt, step_size=5, gamma=0.5))
    lr = ours.param_groups[0]["lr"]
    assert isinstance(lr, torch.Tensor) and lr.item() == pytest.approx(0.01 * 0.25)
    for a, b in zip(ours_params, their_params):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
