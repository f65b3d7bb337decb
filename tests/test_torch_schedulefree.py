"""fusedopt.torch.ScheduleFreeAdamW / ScheduleFreeSGD against the schedulefree package's torch
classes: float64 to rtol 1e-9 in train and eval mode, signatures, group entries, and
state_dict interchange both ways."""

from __future__ import annotations

import inspect

import pytest

torch = pytest.importorskip("torch", reason="torch not installed: fusedopt.torch skipped")
schedulefree = pytest.importorskip("schedulefree", reason="schedulefree not installed")
import fusedopt.torch as ft  # noqa: E402

SHAPES = [(5, 3), (7,), (), (2, 3, 4), (300,)]
PAIRS = {
    "ScheduleFreeAdamW": schedulefree.AdamWScheduleFree,
    "ScheduleFreeSGD": schedulefree.SGDScheduleFree,
}
CASES = [
    ("ScheduleFreeAdamW", {}),
    ("ScheduleFreeAdamW", dict(lr=0.01, betas=(0.8, 0.99), weight_decay=0.1, eps=1e-6)),
    ("ScheduleFreeAdamW", dict(lr=0.02, warmup_steps=5, r=0.5, weight_lr_power=1.0)),
    ("ScheduleFreeAdamW", dict(lr=0.01, warmup_steps=3, weight_lr_power=0.0)),
    ("ScheduleFreeSGD", {}),
    ("ScheduleFreeSGD", dict(lr=0.1, momentum=0.5, weight_decay=0.01)),
    ("ScheduleFreeSGD", dict(lr=0.5, warmup_steps=4, r=1.0, weight_lr_power=3.0)),
]


def _params(seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(s, generator=g, dtype=torch.float64).requires_grad_() for s in SHAPES]


def _step(opt, params, t, skip=()):
    g = torch.Generator().manual_seed(1000 + t)
    for i, p in enumerate(params):
        grad = torch.randn(p.shape, generator=g, dtype=torch.float64)
        p.grad = None if i in skip else grad  # schedulefree divides p.grad in place
    opt.step()


def _theirs(name, params, **kwargs):
    return PAIRS[name](params, foreach=False, **kwargs)


def _close(ours, theirs, opt=None, ref=None):
    for a, b in zip(ours, theirs):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=0)
        if opt is not None:
            assert set(opt.state[a]) == set(ref.state[b])
            for key, value in ref.state[b].items():
                torch.testing.assert_close(opt.state[a][key], value, rtol=1e-9, atol=1e-300)
    if opt is not None:
        for g, h in zip(opt.param_groups, ref.param_groups):
            assert set(g) == set(h)
            for key in ("k", "train_mode", "lr_max", "weight_sum", "scheduled_lr"):
                assert g[key] == pytest.approx(h[key], rel=1e-12), key


@pytest.mark.parametrize("name, kwargs", CASES, ids=str)
def test_matches_schedulefree_in_train_and_eval_mode(name, kwargs):
    """float64, 10 steps with eval/train switches between (and parameters without a
    gradient at some steps): params, z, exp_avg_sq and the group entries equal
    schedulefree's to rtol 1e-9 in both modes."""
    ours, theirs = _params(), _params()
    opt, ref = ft.CLASSES[name](ours, **kwargs), _theirs(name, theirs, **kwargs)
    for o in (opt, ref):
        o.train()
    for t in range(10):
        skip = {t % 5} if t % 3 == 2 else ()
        _step(opt, ours, t, skip)
        _step(ref, theirs, t, skip)
        _close(ours, theirs, opt, ref)
        if t % 4 == 3:
            opt.eval()
            ref.eval()
            _close(ours, theirs, opt, ref)
            opt.train()
            ref.train()
            _close(ours, theirs, opt, ref)
    opt.eval()
    ref.eval()
    _close(ours, theirs, opt, ref)


@pytest.mark.parametrize("name", sorted(PAIRS))
def test_signature_groups_and_eval_mode_as_schedulefree(name):
    """schedulefree's signature and defaults, then fusedopt's options; its group entries;
    a new optimizer is in eval mode and a step there raises, as schedulefree's does."""
    ours = inspect.signature(ft.CLASSES[name]).parameters
    theirs = inspect.signature(PAIRS[name]).parameters
    assert list(ours)[: len(theirs)] == list(theirs)
    for key, p in theirs.items():
        assert ours[key].default == p.default, key
    assert list(ours)[len(theirs) :] == list(ft._OPTIONS)
    params = [torch.zeros(3, requires_grad=True)]
    opt, ref = ft.CLASSES[name](params), PAIRS[name](params)
    assert opt.param_groups[0].keys() == ref.param_groups[0].keys()
    assert not opt.param_groups[0]["train_mode"]
    params[0].grad = torch.ones(3)
    with pytest.raises(RuntimeError, match="call .train"):
        opt.step()
    assert ft.AdamWScheduleFree is ft.ScheduleFreeAdamW
    assert ft.SGDScheduleFree is ft.ScheduleFreeSGD


@pytest.mark.parametrize("name", sorted(PAIRS))
@pytest.mark.parametrize("mode", ["train", "eval"])
def test_state_dict_interchange_with_schedulefree(name, mode):
    """Saved in either mode, fusedopt's state_dict loads into schedulefree's class and
    schedulefree's into fusedopt's; the run continues as an uninterrupted schedulefree run
    (float64, rtol 1e-9)."""
    kwargs = dict(lr=0.05, warmup_steps=3, weight_decay=0.01)
    ref_params = _params()
    ref = _theirs(name, ref_params, **kwargs)
    ref.train()
    for t in range(8):
        _step(ref, ref_params, t)
    for first, then in ((ft.CLASSES[name], _theirs), (_theirs, ft.CLASSES[name])):
        params = _params()
        one = first(params, **kwargs) if first is not _theirs else _theirs(name, params, **kwargs)
        one.train()
        for t in range(4):
            _step(one, params, t)
        getattr(one, mode)()
        sd = one.state_dict()
        two = then(params, **kwargs) if then is not _theirs else _theirs(name, params, **kwargs)
        two.load_state_dict(sd)
        assert two.param_groups[0]["train_mode"] == (mode == "train")
        two.train()
        for t in range(4, 8):
            _step(two, params, t)
        _close(params, ref_params)


def test_zero_copy_one_call_per_dtype_and_no_state_before_a_gradient():
    """The step updates the tensors' memory in place; z starts at the parameter."""
    params = [torch.randn(64, 32, requires_grad=True), torch.randn(32, requires_grad=True)]
    opt = ft.ScheduleFreeAdamW(params, lr=0.01)
    opt.train()
    ptrs = [p.data_ptr() for p in params]
    start = [p.detach().clone() for p in params]
    params[0].grad = torch.randn(64, 32)
    opt.step()
    assert [p.data_ptr() for p in params] == ptrs
    assert opt.state[params[1]] == {}
    assert opt.param_groups[0]["k"] == 1
    z_ptr = opt.state[params[0]]["z"].data_ptr()
    params[0].grad = torch.randn(64, 32)
    opt.step()
    assert opt.state[params[0]]["z"].data_ptr() == z_ptr
    assert torch.equal(params[1], start[1])
    assert not torch.equal(params[0], start[0])


@pytest.mark.parametrize("name", sorted(PAIRS))
@pytest.mark.parametrize("options", [{}, {"master_weights": True}], ids=["bf16", "masters"])
def test_bfloat16_matches_the_numpy_class_bit_for_bit(name, options):
    """bfloat16 parameters (with float32 masters, or not) step and switch modes as
    fusedopt.optim's class does on the same bits."""
    from fusedopt import optim

    params = [p.detach().bfloat16().requires_grad_() for p in _params()]
    arrays = {str(i): ft._numpy(p.detach()).copy() for i, p in enumerate(params)}
    opt = ft.CLASSES[name](params, lr=0.01, warmup_steps=2, **options)
    ref = getattr(optim, name)(arrays, lr=0.01, warmup_steps=2, **options)
    opt.train()
    for t in range(4):
        g = torch.Generator().manual_seed(1000 + t)
        grads = [torch.randn(p.shape, generator=g).bfloat16() for p in params]
        for p, grad in zip(params, grads):
            p.grad = grad
        opt.step()
        ref.step({str(i): ft._numpy(grad) for i, grad in enumerate(grads)})
    for switch in ("eval", "train", "eval"):
        getattr(opt, switch)()
        getattr(ref, switch)()
        for i, p in enumerate(params):
            assert ft._numpy(p.detach()).tobytes() == arrays[str(i)].tobytes()
            for key, value in opt.state[p].items():
                assert ft._numpy(value).tobytes() == ref.state[str(i)][key].tobytes(), key


def test_eval_with_beta1_zero_is_refused_before_any_parameter_changes():
    """With betas[0] = 0 the parameters hold y = z, from which x cannot be recovered: eval()
    is a ValueError (schedulefree divides by zero), and no group's parameters have moved."""
    params = _params()
    opt = ft.ScheduleFreeAdamW(
        [{"params": params[:2]}, {"params": params[2:], "betas": (0.0, 0.999)}], lr=0.01
    )
    opt.train()  # schedulefree's classes start in eval mode
    _step(opt, params, 0)
    before = [p.detach().clone() for p in params]
    with pytest.raises(ValueError, match=r"^eval\(\) with betas 0.0: the parameters hold y = z"):
        opt.eval()
    for p, b in zip(params, before):
        assert torch.equal(p, b)
    assert all(g["train_mode"] for g in opt.param_groups)


def test_a_group_added_takes_the_optimizers_mode():
    """A group added without train_mode is in the mode the optimizer is in (its parameters
    are y = x = z until their first step): stepping on in train mode needs no train() call,
    and in eval mode train() switches it with the rest. The NumPy classes as the adapters."""
    import numpy as np

    from fusedopt import optim

    p = torch.nn.Parameter(torch.randn(3))
    opt = ft.ScheduleFreeAdamW([p], lr=0.01)
    opt.train()
    p.grad = torch.ones(3)
    opt.step()
    q = torch.nn.Parameter(torch.randn(2))
    opt.add_param_group({"params": [q]})
    q.grad = torch.ones(2)
    opt.step()
    assert [g["train_mode"] for g in opt.param_groups] == [True, True]
    opt.eval()
    opt.add_param_group({"params": [torch.nn.Parameter(torch.randn(2))]})
    assert [g["train_mode"] for g in opt.param_groups] == [False] * 3
    numpy_opt = optim.ScheduleFreeSGD({"a": np.ones(3)}, lr=0.1)
    numpy_opt.step({"a": np.ones(3)})
    numpy_opt.eval()
    numpy_opt.add_param_group({"params": {"b": np.ones(2)}})
    numpy_opt.add_param_group({"params": {"c": np.ones(2)}, "train_mode": True})
    assert [g["train_mode"] for g in numpy_opt.param_groups] == [False, False, True]
    numpy_opt.train()
    numpy_opt.step({"a": np.ones(3), "b": np.ones(2), "c": np.ones(2)})
