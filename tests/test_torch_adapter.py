"""fusedopt.torch: the adapters against torch.optim on torch's own test inputs (optim_db),
zero-copy, state_dict interchange with torch's classes, schedulers, closures, hooks,
mixed precision against fusedopt.optim, and torch.compile."""

from __future__ import annotations

import collections
import contextlib
import copy
import inspect
import re
import tracemalloc
import warnings
from unittest import mock

import ml_dtypes
import numpy as np
import pytest
from support import assert_same_bits

torch = pytest.importorskip("torch", reason="torch not installed: fusedopt.torch skipped")
try:
    from torch.testing._internal import common_optimizers
except ImportError:  # expecttest missing: only the tests on optim_db's inputs skip
    common_optimizers = None
needs_optim_db = pytest.mark.skipif(
    common_optimizers is None, reason="torch's optim_db needs expecttest (the test extra)"
)
from test_muon import bfloat16_free_torch  # noqa: E402

import fusedopt.torch as ft  # noqa: E402
from fusedopt import optim  # noqa: E402

SHAPES = [(5, 3), (7,), (), (2, 3, 4), (300,)]
MATRICES = [(5, 3), (3, 7), (1, 1), (16, 16), (40, 9)]  # Muon takes 2-D parameters only
BOTH = [
    info
    for info in (common_optimizers.optim_db if common_optimizers else [])
    if info.optim_cls.__name__ in ft.CLASSES
    and info.optim_cls is getattr(torch.optim, info.optim_cls.__name__, None)
]


def _float64_inputs(info):
    """optim_db's CPU inputs made under float64 as the default dtype, as the tests run: a
    tensor lr is then float64 (torch's Muon computes 1 - lr * weight_decay in the lr's dtype)."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        return info.optim_inputs_func(device="cpu", dtype=torch.float64)
    finally:
        torch.set_default_dtype(previous)


INPUTS = [
    pytest.param(info.optim_cls.__name__, oi.kwargs, id=f"{info.optim_cls.__name__}-{oi.desc}")
    for info in BOTH
    for oi in _float64_inputs(info)
]
_ERROR_INPUTS = [
    (info.optim_cls.__name__, ei)
    for info in BOTH
    for ei in info.optim_error_inputs_func(device="cpu", dtype=torch.float64)
]
ERRORS = [
    pytest.param(name, ei, id=f"{name}-{ei.optimizer_error_input.desc}")
    for name, ei in _ERROR_INPUTS
    if ei.error_on == common_optimizers.OptimizerErrorEnum.CONSTRUCTION_ERROR
]
# torch raises these at the first step (complex parameters: RuntimeError); fusedopt.torch
# checks every tensor when it is added, so the same inputs fail at construction (TypeError)
STEP_ERRORS = [
    pytest.param(name, ei, id=f"{name}-{ei.optimizer_error_input.desc}")
    for name, ei in _ERROR_INPUTS
    if ei.error_on == common_optimizers.OptimizerErrorEnum.STEP_ERROR
]


@pytest.fixture
def float64_default():
    """torch.optim.NAdam keeps mu_product in the default dtype: float64, as the kernel's."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(previous)


def _params(dtype=torch.float64, seed=0, shapes=SHAPES):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(s, generator=g, dtype=dtype).requires_grad_() for s in shapes]


def _grads(step, dtype=torch.float64, shapes=SHAPES):
    g = torch.Generator().manual_seed(1000 + step)
    return [torch.randn(s, generator=g, dtype=dtype) for s in shapes]


def _sparse_gradient():
    """A sparse (3, 4) gradient. Its invariant checks are opted into by the context manager:
    torch 2.11 warns even when they are asked for by argument (pytorch#178274)."""
    with torch.sparse.check_sparse_tensor_invariants(enable=True):
        return torch.sparse_coo_tensor([[0], [1]], [1.0], (3, 4))


def _run(opt, params, steps, start=0):
    shapes = [tuple(p.shape) for p in params]
    for t in range(start, start + steps):
        for p, g in zip(params, _grads(t, params[0].dtype, shapes)):
            p.grad = g.clone()
        opt.step()


def _shapes(name):
    return MATRICES if name == "Muon" else SHAPES


def _float64_torch(name):
    """torch's Muon casts its Newton-Schulz iteration to bfloat16: patched to keep float64
    (tests/test_muon.py's bfloat16_free_torch), so that torch's own code runs in float64."""
    return bfloat16_free_torch() if name == "Muon" else contextlib.nullcontext()


def _torch_loop(name, params, **kwargs):
    """torch's for-loop implementation (foreach=False where the class has foreach)."""
    kwargs = {k: v for k, v in kwargs.items() if k not in ("foreach", "fused")}
    cls = getattr(torch.optim, name)
    if "foreach" in inspect.signature(cls).parameters:
        kwargs["foreach"] = False
    return cls(params, **kwargs)


@needs_optim_db
def test_optim_db_is_covered():
    """Every optimizer both libraries have is driven, with every CPU input."""
    names = sorted({info.optim_cls.__name__ for info in BOTH})
    assert names == sorted(n for n in ft.CLASSES if hasattr(torch.optim, n))
    # optim_db's Muon entries (7 inputs, 8 construction errors, 1 step error) from torch 2.9 on
    muon = int(hasattr(torch.optim, "Muon"))
    assert len(INPUTS) >= 57 + 7 * muon
    assert len(ERRORS) >= 77 + 8 * muon and len(STEP_ERRORS) >= 1 + muon


@needs_optim_db
@pytest.mark.parametrize("name, kwargs", INPUTS)
def test_matches_torch_on_optim_db_inputs(name, kwargs, float64_default):
    """float64, 8 steps: parameters and every state buffer equal torch's for-loop
    implementation to rtol 1e-9 after every step."""
    ours, theirs = _params(shapes=_shapes(name)), _params(shapes=_shapes(name))
    opt = ft.CLASSES[name](ours, **copy.deepcopy(kwargs))
    ref = _torch_loop(name, theirs, **copy.deepcopy(kwargs))
    for t in range(8):
        _run(opt, ours, 1, t)
        with _float64_torch(name):
            _run(ref, theirs, 1, t)
        for a, b in zip(ours, theirs):
            torch.testing.assert_close(a, b, rtol=1e-9, atol=0)
    for a, b in zip(ours, theirs):
        # torch's layout: the same keys (SGD's "step" is the stochastic-rounding stream's)
        extra = {"step"} if name == "SGD" else set()
        assert set(opt.state[a]) == set(ref.state[b]) | extra
        for key, value in ref.state[b].items():
            torch.testing.assert_close(opt.state[a][key], value, rtol=1e-9, atol=1e-300)


@needs_optim_db
@pytest.mark.parametrize("name, error_input", ERRORS)
def test_construction_errors_as_torch(name, error_input):
    """Every construction error input of optim_db raises torch's error type and message."""
    oi = error_input.optimizer_error_input
    params = oi.params if oi.params is not None else [torch.randn(2, 2, requires_grad=True)]
    assert error_input.error_on == common_optimizers.OptimizerErrorEnum.CONSTRUCTION_ERROR
    if issubclass(error_input.error_type, Warning):
        with pytest.warns(error_input.error_type, match=error_input.error_regex):
            ft.CLASSES[name](params, **oi.kwargs)
    else:
        with pytest.raises(error_input.error_type, match=error_input.error_regex):
            ft.CLASSES[name](params, **oi.kwargs)


@needs_optim_db
@pytest.mark.parametrize("name, error_input", STEP_ERRORS)
def test_step_error_inputs_fail_at_construction(name, error_input):
    """optim_db's step errors (complex parameters) are caught when the parameters are added,
    before any step, with a TypeError that names the parameter."""
    oi = error_input.optimizer_error_input
    assert oi.params is not None and any(p.is_complex() for p in oi.params)
    with pytest.raises(TypeError, match="parameter 0 of group 0: complex tensors"):
        ft.CLASSES[name](oi.params, **oi.kwargs)


@pytest.mark.parametrize("name", sorted(ft.CLASSES))
def test_signature_and_groups_as_torch(name):
    """torch's signature and param_group keys; fusedopt's options keyword-only after."""
    ours = inspect.signature(ft.CLASSES[name])
    params = [torch.zeros(3, 3, requires_grad=True)]
    opt = ft.CLASSES[name](params)
    torch_cls = getattr(torch.optim, name, None)
    if torch_cls is not None:
        theirs = inspect.signature(torch_cls)
        assert list(ours.parameters)[: len(theirs.parameters)] == list(theirs.parameters)
        for key, p in theirs.parameters.items():
            assert ours.parameters[key].default == p.default
        assert set(opt.param_groups[0]) == set(torch_cls(params).param_groups[0])
    assert list(ours.parameters)[-7:] == list(ft._OPTIONS)


def test_zero_copy_and_no_allocation():
    """The kernel writes the tensors' memory: data_ptr() of params and state never changes,
    and a step of a 4 M-parameter model allocates nothing like its size, in NumPy (traced by
    tracemalloc) or in torch (its profiler's memory events)."""
    params = [torch.randn(1000, 1000, requires_grad=True) for _ in range(4)]
    params += [torch.randn(1000, requires_grad=True) for _ in range(4)]
    opt = ft.AdamW(params, lr=1e-3, amsgrad=True)
    for p in params:
        p.grad = torch.randn_like(p)
    ptrs = [p.data_ptr() for p in params]
    opt.step()  # creates the state
    state_ptrs = {
        (i, k): v.data_ptr() for i, p in enumerate(params) for k, v in opt.state[p].items()
    }
    before = [p.detach().clone() for p in params]
    model_bytes = sum(p.numel() * 4 for p in params)
    tracemalloc.start()
    with warnings.catch_warnings():
        # torch 2.11 warns of profiling cycles where no schedule makes any (fixed by pytorch#180387)
        warnings.filterwarnings("ignore", "Warning: Profiler clears events", UserWarning)
        with torch.profiler.profile(
            activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True
        ) as prof:
            opt.step()
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    torch_bytes = sum(max(e.cpu_memory_usage, 0) for e in prof.events())
    assert peak < model_bytes / 100, peak
    assert torch_bytes < model_bytes / 100, torch_bytes
    assert [p.data_ptr() for p in params] == ptrs
    assert {
        (i, k): v.data_ptr() for i, p in enumerate(params) for k, v in opt.state[p].items()
    } == state_ptrs
    assert all(not torch.equal(a, b) for a, b in zip(before, params))  # it did update


def test_one_fused_call_per_group_and_dtype(monkeypatch):
    """A step is one fused call per (group, dtype): not a loop over parameters."""
    calls = []
    original = optim.Optimizer._update

    def counting(self, plan, params, *args):
        calls.append(len(params))
        return original(self, plan, params, *args)

    monkeypatch.setattr(optim.Optimizer, "_update", counting)
    f32 = [torch.randn(4, 3, requires_grad=True) for _ in range(10)]
    f64 = [torch.randn(4, dtype=torch.float64, requires_grad=True) for _ in range(5)]
    other = [torch.randn(2, requires_grad=True) for _ in range(3)]
    opt = ft.Adam([{"params": f32 + f64}, {"params": other, "lr": 0.1}])
    for p in f32 + f64 + other:
        p.grad = torch.randn_like(p)
    opt.step()
    opt.step()
    assert sorted(calls) == sorted([10, 5, 3] * 2)


def test_state_dict_interchange_with_torch(float64_default):
    """fusedopt -> torch.optim.AdamW mid-training, and torch -> fusedopt, continue as an
    uninterrupted torch run (float64, rtol 1e-9); fusedopt -> fusedopt bit for bit."""
    kwargs = dict(lr=1e-2, weight_decay=0.1, amsgrad=True)
    ref_params = _params()
    ref = _torch_loop("AdamW", ref_params, **kwargs)
    _run(ref, ref_params, 10)

    a = _params()
    opt = ft.AdamW(a, **kwargs)
    _run(opt, a, 5)
    b = [p.detach().clone().requires_grad_() for p in a]
    switched = _torch_loop("AdamW", b, **kwargs)
    switched.load_state_dict(opt.state_dict())
    _run(switched, b, 5, 5)
    for x, y in zip(b, ref_params):
        torch.testing.assert_close(x, y, rtol=1e-9, atol=0)

    c = _params()
    topt = _torch_loop("AdamW", c, **kwargs)
    _run(topt, c, 5)
    back = ft.AdamW(c, **kwargs)
    back.load_state_dict(topt.state_dict())
    _run(back, c, 5, 5)
    for x, y in zip(c, ref_params):
        torch.testing.assert_close(x, y, rtol=1e-9, atol=0)

    d = _params()
    one = ft.AdamW(d, **kwargs)
    _run(one, d, 5)
    e = [p.detach().clone().requires_grad_() for p in d]
    two = ft.AdamW(e, **kwargs)
    two.load_state_dict(copy.deepcopy(one.state_dict()))
    _run(one, d, 5, 5)
    _run(two, e, 5, 5)
    for x, y in zip(d, e):
        assert torch.equal(x, y)


@pytest.mark.parametrize("name", [n for n in sorted(ft.CLASSES) if hasattr(torch.optim, n)])
def test_every_class_round_trips_with_torch(name, float64_default):
    """Each adapter's state_dict loads into torch's class (NAdam with its mu_product), and
    torch's into the adapter, and the run continues as torch's uninterrupted one."""
    kwargs = {"momentum": 0.9} if name in ("SGD", "RMSprop") else {}
    shapes = _shapes(name)
    with _float64_torch(name):
        ref_params = _params(shapes=shapes)
        ref = _torch_loop(name, ref_params, **kwargs)
        _run(ref, ref_params, 8)
        a = _params(shapes=shapes)
        opt = ft.CLASSES[name](a, **kwargs)
        _run(opt, a, 4)
        switched = _torch_loop(name, a, **kwargs)
        switched.load_state_dict(opt.state_dict())
        _run(switched, a, 4, 4)
        for x, y in zip(a, ref_params):
            torch.testing.assert_close(x, y, rtol=1e-9, atol=0)
        b = _params(shapes=shapes)  # and back: torch for 4 steps, then the adapter
        theirs = _torch_loop(name, b, **kwargs)
        _run(theirs, b, 4)
        ours = ft.CLASSES[name](b, **kwargs)
        ours.load_state_dict(theirs.state_dict())
        _run(ours, b, 4, 4)
        for x, y in zip(b, ref_params):
            torch.testing.assert_close(x, y, rtol=1e-9, atol=0)


@pytest.mark.parametrize("default_dtype", [torch.float32, torch.float64])
def test_nadam_with_one_cycle_momentum_steps_as_torchs(default_dtype):
    """OneCycleLR changes beta1 at every step (cycle_momentum): NAdam's mu_product takes each
    step's, in torch's scalar dtype (float32 unless the default dtype is float64), so the
    parameters (float64) and the state, mu_product exactly, equal torch's NAdam's after every
    step; a state_dict switched mid-cycle either way continues as torch's run."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(default_dtype)
    try:
        schedule = dict(max_lr=0.05, total_steps=24, base_momentum=0.5, max_momentum=0.95)

        def run(opt, params, steps, start=0):
            sched = torch.optim.lr_scheduler.OneCycleLR(opt, **schedule)
            with warnings.catch_warnings():  # to the step a checkpoint was taken at
                warnings.filterwarnings(
                    "ignore", "Detected call of `lr_scheduler.step", UserWarning
                )
                for _ in range(start):
                    sched.step()
            for t in range(start, start + steps):
                _run(opt, params, 1, t)
                sched.step()
                yield t

        ours, theirs = _params(), _params()
        opt, ref = ft.NAdam(ours), _torch_loop("NAdam", theirs)
        for _ in zip(run(opt, ours, 24), run(ref, theirs, 24)):
            for a, b in zip(ours, theirs):
                torch.testing.assert_close(a, b, rtol=1e-9, atol=0)
                assert set(opt.state[a]) == set(ref.state[b])
                for key, value in ref.state[b].items():
                    torch.testing.assert_close(opt.state[a][key], value, rtol=1e-9, atol=1e-300)
                assert torch.equal(opt.state[a]["mu_product"], ref.state[b]["mu_product"])
        for first, second in (("ours", "theirs"), ("theirs", "ours")):
            make = {"ours": ft.NAdam, "theirs": lambda ps: _torch_loop("NAdam", ps)}
            params = _params()
            before = make[first](params)
            for _ in run(before, params, 10):
                pass
            after = make[second](params)
            after.load_state_dict(before.state_dict())
            for _ in run(after, params, 14, 10):
                pass
            for a, b in zip(params, theirs):
                torch.testing.assert_close(a, b, rtol=1e-9, atol=0, msg=f"{first} -> {second}")
    finally:
        torch.set_default_dtype(previous)


def test_nadam_state_loaded_without_mu_product_still_loads_into_torch(float64_default):
    """A state without mu_product (a fusedopt checkpoint from before it was kept) is given
    the product of its step, in state_dict() before the next step too; a bad one is refused
    with its name."""
    params = _params()
    opt = ft.NAdam(params)
    _run(opt, params, 3)
    sd = opt.state_dict()
    expected = {i: s["mu_product"].clone() for i, s in sd["state"].items()}
    for s in sd["state"].values():
        del s["mu_product"]
    again = ft.NAdam(_params())
    again.load_state_dict(sd)
    saved = again.state_dict()
    for i, product in expected.items():
        assert torch.equal(saved["state"][i]["mu_product"], product)
    _torch_loop("NAdam", _params()).load_state_dict(saved)
    for bad in ("x", 1.0, float("nan"), torch.ones(2)):
        broken = copy.deepcopy(opt.state_dict())
        broken["state"][0]["mu_product"] = bad
        with pytest.raises(ValueError, match="mu_product"):
            ft.NAdam(_params()).load_state_dict(broken)


def test_scheduler_closure_hooks_zero_grad():
    """lr_scheduler changes the lr the kernel uses; step returns the closure's loss; the
    step hooks run; zero_grad sets grads to None."""
    ours, theirs = _params(torch.float32), _params(torch.float32)
    opt = ft.SGD(ours, lr=0.1, momentum=0.9)
    ref = _torch_loop("SGD", theirs, lr=0.1, momentum=0.9)
    s1 = torch.optim.lr_scheduler.StepLR(opt, step_size=2, gamma=0.5)
    s2 = torch.optim.lr_scheduler.StepLR(ref, step_size=2, gamma=0.5)
    seen = []
    opt.register_step_pre_hook(lambda o, a, k: seen.append("pre"))
    opt.register_step_post_hook(lambda o, a, k: seen.append("post"))
    for t in range(6):
        for params, o, s in ((ours, opt, s1), (theirs, ref, s2)):
            o.zero_grad()
            assert all(p.grad is None for p in params)

            def closure(params=params, t=t):
                loss = sum((p * g).sum() for p, g in zip(params, _grads(t, torch.float32)))
                loss.backward()
                return loss

            loss = o.step(closure)
            assert isinstance(loss, torch.Tensor)
            s.step()
        for a, b in zip(ours, theirs):
            torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)
    assert opt.param_groups[0]["lr"] == pytest.approx(0.0125)
    assert seen == ["pre", "post"] * 6


def test_param_groups_added_later_and_grads_missing():
    """add_param_group, parameters without a gradient (skipped, their step not advanced),
    and a parameter whose storage was replaced (p.data = ...) are followed."""
    a, b = _params(torch.float32), _params(torch.float32)
    opt = ft.Adam(a[:3], lr=0.01)
    ref = _torch_loop("Adam", b[:3], lr=0.01)
    opt.add_param_group({"params": a[3:], "lr": 0.1})
    ref.add_param_group({"params": b[3:], "lr": 0.1})
    for t in range(6):
        for params, o in ((a, opt), (b, ref)):
            for i, (p, g) in enumerate(zip(params, _grads(t, torch.float32))):
                p.grad = None if (i + t) % 3 == 0 else g
            o.step()
        if t == 2:
            for params in (a, b):
                params[1].data = params[1].data.clone()
        for x, y in zip(a, b):
            torch.testing.assert_close(x, y, rtol=1e-6, atol=1e-7)
    for x, y in zip(a, b):
        if ref.state[y]:
            assert float(opt.state[x]["step"]) == float(ref.state[y]["step"])


def test_a_parameter_viewed_anew_at_the_same_address_and_an_edited_step_are_followed():
    """What a step's reused calls cannot see by data pointers: one parameter's ``"step"``
    changed in place (a view of its call's step counts), followed as torch.optim follows it
    (the same values, to float64 rounding); and ``p.data`` replaced by another view of the
    same memory, refused as such a parameter is at a first step (cut to its first rows: its
    state no longer fits; transposed: not contiguous), naming it, before any group is
    written."""
    for cls in ("Adam", "NAdam"):
        results = {}
        for name, module in (("ours", ft), ("torch", torch.optim)):
            gen = torch.Generator().manual_seed(0)
            params = [
                torch.nn.Parameter(torch.randn(4, 4, generator=gen, dtype=torch.float64))
                for _ in range(3)
            ]
            groups = [{"params": params[:1]}, {"params": params[1:], "lr": 0.05}]
            opt = getattr(module, cls)(groups, lr=0.1)
            for t in range(6):
                if t == 3:  # this parameter's bias correction (NAdam: its product) anew
                    key = "mu_product" if cls == "NAdam" else "step"
                    opt.state[params[2]][key].fill_(1.0 if cls == "NAdam" else 0.0)
                for p in params:
                    p.grad = torch.randn(p.shape, generator=gen, dtype=torch.float64)
                opt.step()
            results[name] = params, [float(opt.state[p]["step"]) for p in params]
        (ours, our_steps), (theirs, their_steps) = results["ours"], results["torch"]
        assert our_steps == their_steps == [6.0, 6.0, 6.0 if cls == "NAdam" else 3.0]
        for a, b in zip(ours, theirs):
            torch.testing.assert_close(a, b, rtol=1e-12, atol=0)
    ours = [torch.nn.Parameter(p.detach().clone()) for p in ours]
    for p in ours:
        p.grad = torch.ones_like(p)
    opt = ft.Adam([{"params": ours[:1]}, {"params": ours[1:], "lr": 0.05}], lr=0.1)
    opt.step()
    for view, match in [
        (
            lambda d: d[:2],
            "^state 'exp_avg' of parameter 1 of group 1: expected float64 \\(2, 4\\)",
        ),
        (lambda d: d.t(), "^parameter 1 of group 1: expected a contiguous tensor"),
    ]:
        kept = ours[2].data
        ours[2].data = view(kept)  # the same data_ptr
        ours[2].grad = torch.ones_like(ours[2])
        before = [p.detach().clone() for p in ours]
        with pytest.raises(ValueError, match=match):
            opt.step()
        for p, b in zip(ours, before):
            assert torch.equal(p, b)
        assert [float(opt.state[p]["step"]) for p in ours] == [1.0] * 3
        ours[2].data, ours[2].grad = kept, torch.ones_like(kept)


def _set_float64_grad(p):
    """A float64 (3, 4) gradient of p, a float32 (3, 4) parameter: torch 2.9 on refuses one
    of another dtype unless told (grad_dtype); before, it takes one only through .data."""
    g = torch.randn(3, 4, dtype=torch.float64)
    if hasattr(p, "grad_dtype"):
        p.grad_dtype = None
        p.grad = g
    else:
        p.grad = torch.zeros(3, 4)
        p.grad.data = g
    assert p.grad.dtype == torch.float64


def test_clear_errors():
    """Tensors fusedopt cannot update in place are refused, naming the parameter."""
    with pytest.raises(ValueError, match="parameter 0 of group 0: expected a contiguous"):
        ft.Adam([torch.randn(4, 3).t().requires_grad_()])
    with pytest.raises(TypeError, match="complex"):
        ft.Adam([torch.randn(3, dtype=torch.complex64, requires_grad=True)])
    with pytest.raises(ValueError, match="on meta"):
        ft.Adam([torch.empty(3, device="meta", requires_grad=True)])
    with pytest.raises(ValueError, match="capturable=True is not supported"):
        ft.Adam([torch.randn(3, requires_grad=True)], capturable=True)
    p = torch.randn(3, 4, requires_grad=True)
    opt = ft.Adam([p])
    before = p.detach().clone()
    p.grad = torch.randn(4, 3).t()
    with pytest.raises(
        ValueError, match="gradient of parameter 0 of group 0: expected a contiguous"
    ):
        opt.step()
    _set_float64_grad(p)
    with pytest.raises(ValueError, match="expected float32 or bfloat16 or float16 \\(3, 4\\)"):
        opt.step()
    p.grad = _sparse_gradient()
    with pytest.raises(TypeError, match="sparse"):
        opt.step()
    assert torch.equal(p, before) and not opt.state[p].get("exp_avg", torch.zeros(1)).any()


def test_requires_grad_false_with_a_gradient_is_updated_as_torch_does():
    """torch.optim updates a tensor that has a .grad whatever its requires_grad: so does the
    adapter."""
    a, b = torch.ones(3), torch.ones(3)
    opt, ref = ft.SGD([a], lr=0.5), _torch_loop("SGD", [b], lr=0.5)
    for p, o in ((a, opt), (b, ref)):
        p.grad = torch.full((3,), 2.0)
        o.step()
    assert torch.equal(a, b) and torch.equal(a, torch.zeros(3))


MATRIX_STORAGE = [
    ("Muon", dict(master_weights=True)),
    ("Muon", dict(master_weights=True, stochastic_rounding=True, seed=3)),
    ("Muon", dict(state_dtype="bfloat16", stochastic_rounding=True, seed=4)),
    ("Muon", dict(state_dtype="int8", stochastic_rounding=True, seed=5)),
    ("Muon", dict(master_weights=True, state_dtype="int8")),
    ("Adafactor", dict(master_weights=True)),
    ("Adafactor", dict(master_weights=True, stochastic_rounding=True, seed=6)),
    ("Adafactor", dict(stochastic_rounding=True, seed=2**64 - 1)),
]


@pytest.mark.parametrize(
    "name, options",
    MATRIX_STORAGE,
    ids=[f"{n}-" + ",".join(f"{k}={v}" for k, v in o.items()) for n, o in MATRIX_STORAGE],
)
def test_matrix_adapters_with_storage_options(name, options):
    """bfloat16 parameters with masters, stochastic rounding and int8 state: the same bits as
    fusedopt.optim's class (masters, codes and scales included); a state_dict taken mid-run
    resumes bit for bit (Muon keeps a "step" for the random stream only with these options)."""
    shapes = MATRICES if name == "Muon" else SHAPES
    params = _params(torch.bfloat16, shapes=shapes)
    arrays = {str(i): ft._numpy(p.detach()).copy() for i, p in enumerate(params)}
    opt = ft.CLASSES[name](params, lr=0.01, weight_decay=0.05, **options)
    ref = getattr(optim, name)(arrays, lr=0.01, weight_decay=0.05, **options)
    grads = [_grads(t, torch.bfloat16, shapes) for t in range(5)]
    for t in range(3):
        for p, g in zip(params, grads[t]):
            p.grad = g
        opt.step()
        ref.step({str(i): ft._numpy(g) for i, g in enumerate(grads[t])})
    for i, p in enumerate(params):
        assert_same_bits(ft._numpy(p.detach()), arrays[str(i)])
        state, expected = opt.state[p], ref.state[str(i)]
        if name == "Muon":  # torch's Muon keeps no step: only the random stream needs one
            needs_step = options.get("stochastic_rounding") or options.get("state_dtype") == "int8"
            assert ("step" in state) == bool(needs_step)
        if options.get("master_weights"):
            assert state["master"].dtype == torch.float32
        for key, value in state.items():
            if key == "step":
                continue
            buffer, _, part = key.partition(".")
            wanted = getattr(expected[buffer], part) if part else expected[key]
            assert_same_bits(ft._numpy(value), wanted, key)
    saved = [p.detach().clone().requires_grad_() for p in params]
    sd = copy.deepcopy(opt.state_dict())
    for t in range(3, 5):
        for p, g in zip(params, grads[t]):
            p.grad = g
        opt.step()
    resumed = ft.CLASSES[name](saved, lr=0.01, weight_decay=0.05, **options)
    resumed.load_state_dict(sd)
    for t in range(3, 5):
        for p, g in zip(saved, grads[t]):
            p.grad = g
        resumed.step()
    for p, q in zip(params, saved):
        assert torch.equal(p.view(torch.int16), q.view(torch.int16))
        assert opt.state[p].keys() == resumed.state[q].keys()
        for key, value in opt.state[p].items():
            assert torch.equal(resumed.state[q][key], value), key


STORAGE = [
    dict(),
    dict(master_weights=True),
    dict(master_weights=True, stochastic_rounding=True, seed=3),
    dict(state_dtype="bfloat16", stochastic_rounding=True),
    dict(state_dtype="int8", seed=5),
]


@pytest.mark.parametrize(
    "options", STORAGE, ids=lambda o: ",".join(f"{k}={v}" for k, v in o.items()) or "plain"
)
@pytest.mark.parametrize("name", ["AdamW", "SGD", "Lion"])
def test_bfloat16_matches_numpy_class_bit_for_bit(name, options):
    """bfloat16 parameters with every storage option, in two groups: the same bits as
    fusedopt.optim's class on the same arrays (the adapter reuses its storage rules, seeds and
    calls, and seeds each call by its first parameter's place as the class does)."""
    # dampening: only a first momentum step ignores it (the buffer starts as the gradient)
    hyper = {"momentum": 0.9, "dampening": 0.5} if name == "SGD" else {}
    tparams = [p.detach().to(torch.bfloat16).requires_grad_() for p in _params(torch.float32)]
    arrays = [p.detach().view(torch.int16).numpy().copy().view(ml_dtypes.bfloat16) for p in tparams]
    opt = ft.CLASSES[name](
        [{"params": tparams[:2]}, {"params": tparams[2:]}], lr=1e-2, **hyper, **options
    )
    ref = getattr(optim, name)(
        [{"params": arrays[:2]}, {"params": arrays[2:]}], lr=1e-2, **hyper, **options
    )
    for t in range(5):
        grads = [g.to(torch.bfloat16) for g in _grads(t, torch.float32)]
        for p, g in zip(tparams, grads):
            p.grad = g
        opt.step()
        ref.step([g.view(torch.int16).numpy().view(ml_dtypes.bfloat16) for g in grads])
        for p, a in zip(tparams, arrays):
            assert np.array_equal(p.detach().view(torch.int16).numpy(), a.view(np.int16))
    if options.get("master_weights"):
        assert opt.state[tparams[0]]["master"].dtype == torch.float32
    if options.get("state_dtype") == "int8":
        key = "momentum_buffer" if name == "SGD" else "exp_avg"
        assert f"{key}.codes" in opt.state[tparams[0]]
    sd = copy.deepcopy(opt.state_dict())
    again = ft.CLASSES[name](
        [{"params": tparams[:2]}, {"params": tparams[2:]}], lr=1e-2, **hyper, **options
    )
    again.load_state_dict(sd)  # masters and state keep their dtypes (torch would cast them)
    for p in tparams:
        for key, value in opt.state[p].items():
            assert again.state[p][key].dtype == value.dtype
            assert torch.equal(again.state[p][key], value)


@pytest.mark.parametrize(
    "options", [dict(stochastic_rounding=True, seed=7), dict(master_weights=True, seed=8)]
)
@pytest.mark.parametrize("name", ["AdamW", "Lion", "Muon", "Adafactor"])
def test_float16_with_stochastic_rounding_matches_numpy_class_bit_for_bit(name, options):
    """float16 parameters rounded stochastically (directly, or as masters' copies): the same
    bits as fusedopt.optim's class on the same arrays, in two groups."""
    options = {**options, "stochastic_rounding": True}
    shapes = [(6, 5), (4, 7), (3, 3)] if name == "Muon" else [(6, 5), (7,), (300,)]
    tparams = [p.detach().to(torch.float16).requires_grad_() for p in _params(shapes=shapes)]
    arrays = [ft._numpy(p.detach()).copy() for p in tparams]
    start = [a.copy() for a in arrays]
    opt = ft.CLASSES[name]([{"params": tparams[:1]}, {"params": tparams[1:]}], **options)
    ref = getattr(optim, name)([{"params": arrays[:1]}, {"params": arrays[1:]}], **options)
    for t in range(3):
        grads = [g.to(torch.float16) for g in _grads(t, shapes=shapes)]
        for p, g in zip(tparams, grads):
            p.grad = g
        opt.step()
        ref.step([ft._numpy(g) for g in grads])
    for p, a in zip(tparams, arrays):
        assert np.array_equal(p.detach().view(torch.int16).numpy(), a.view(np.int16))
    assert all(not np.array_equal(a, b) for a, b in zip(arrays, start))  # they moved


@pytest.mark.parametrize("name", ["AdamW", "ScheduleFreeAdamW", "ScheduleFreeSGD", "Muon"])
def test_a_parameter_without_a_gradient_keeps_the_bits_of_the_numpy_class(name):
    """Stochastic rounding after a step where one parameter had no gradient: its step count
    lags the others', which splits AdamW's calls (the kernel takes each parameter's step)
    but not Schedule-Free's (the group's k); the adapter's calls, and so their seeds, are the
    class's either way."""
    rng = np.random.default_rng(0)
    shape = (8, 8) if name == "Muon" else (64,)
    tparams = [torch.tensor(rng.standard_normal(shape)).to(torch.bfloat16) for _ in range(3)]
    tparams = [p.requires_grad_() for p in tparams]
    arrays = [p.detach().view(torch.int16).numpy().copy().view(ml_dtypes.bfloat16) for p in tparams]
    opt = ft.CLASSES[name](tparams, lr=1e-2, stochastic_rounding=True)
    ref = getattr(optim, name)(arrays, lr=1e-2, stochastic_rounding=True)
    if hasattr(opt, "train"):
        opt.train()
    for t in range(4):
        grads = [torch.tensor(rng.standard_normal(shape)).to(torch.bfloat16) for _ in tparams]
        if t == 0:
            grads[0] = None
        for p, g in zip(tparams, grads):
            p.grad = g
        opt.step()
        ref.step([None if g is None else ft._numpy(g) for g in grads])
    for p, a in zip(tparams, arrays):
        assert np.array_equal(p.detach().view(torch.int16).numpy(), a.view(np.int16))


@pytest.mark.parametrize("what", ["model", "train step"])
@pytest.mark.filterwarnings("ignore:The .grad attribute of a Tensor that is not a leaf")
def test_torch_compile_training_loop(what):
    """A compiled model's loop trains with the adapter, and so does a compiled function that
    runs the whole step: the optimizer's step is not traced (torch._dynamo.disable). The
    losses equal an eager run's. (The warning filtered is dynamo's own, resuming after the
    step's graph break.)"""
    torch.manual_seed(0)
    x, y = torch.randn(64, 8), torch.randn(64, 1)
    losses = {}
    for compiled in (False, True):
        torch.manual_seed(1)
        model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Tanh(), torch.nn.Linear(16, 1))
        opt = ft.AdamW(model.parameters(), lr=1e-2)
        forward = (
            torch.compile(model, backend="aot_eager") if compiled and what == "model" else model
        )

        def train_step(forward=forward, opt=opt):
            opt.zero_grad()
            loss = torch.nn.functional.mse_loss(forward(x), y)
            loss.backward()
            opt.step()
            return loss.detach()

        run = (
            torch.compile(train_step, backend="aot_eager")
            if compiled and what != "model"
            else train_step
        )
        losses[compiled] = torch.stack([run() for _ in range(20)])
    assert losses[True][-1] < 0.7 * losses[True][0]
    torch.testing.assert_close(losses[True], losses[False], rtol=1e-5, atol=1e-6)


def _train_mlp(make, dtype, steps=200):
    """A 16-64-64-4 GELU MLP, cross-entropy on generated 4-class data, batches of 64, AdamW
    under a cosine schedule: the loss at every step."""
    torch.manual_seed(0)
    x = torch.randn(512, 16, dtype=dtype)
    y = (x @ torch.randn(16, 4, dtype=dtype) + 0.1 * torch.randn(512, 4, dtype=dtype)).argmax(1)
    torch.manual_seed(1)
    model = torch.nn.Sequential(
        torch.nn.Linear(16, 64),
        torch.nn.GELU(),
        torch.nn.Linear(64, 64),
        torch.nn.GELU(),
        torch.nn.Linear(64, 4),
    ).to(dtype)
    opt = make(model.parameters())
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=steps)
    losses = []
    for t in range(steps):
        batch = torch.arange(t * 64, t * 64 + 64) % 512
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(model(x[batch]), y[batch])
        loss.backward()
        opt.step()
        sched.step()
        losses.append(loss.item())
    return torch.tensor(losses, dtype=torch.float64)


@pytest.fixture
def one_thread():
    """torch on one thread: its pool's hand-offs dominate steps this small, and on a loaded
    machine they stretch a second's training to a minute."""
    import fusedopt

    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    fusedopt.set_num_threads(1)
    yield
    torch.set_num_threads(previous)
    fusedopt.set_num_threads(None)


@pytest.mark.parametrize("dtype, rtol", [(torch.float32, 1e-5), (torch.float64, 1e-12)])
def test_mlp_loss_curve_matches_torch_fused_adamw(dtype, rtol, one_thread):
    """A real model trained with torch.optim.AdamW(fused=True) and fusedopt.torch.AdamW: the
    same loss curve over 200 steps (the loss falls from 1.36 to 0.025).

    Not bit for bit: torch's fused kernel and fusedopt's round the bias corrections and the
    update in a different order, so parameters differ by an ulp after a step and the
    training dynamics carry it on. Measured, float32: the curves differ by at most 1.3e-6
    relative, where torch's own for-loop AdamW differs from its fused one by 6.8e-7; float64:
    1.1e-15 (1.3e-15 for torch's two). So float32 is checked to 1e-5 and float64 to 1e-12,
    and the difference must be of the order of torch's own between its implementations."""
    kwargs = dict(lr=3e-3, weight_decay=0.05)
    fused = _train_mlp(lambda p: torch.optim.AdamW(p, fused=True, **kwargs), dtype)
    ours = _train_mlp(lambda p: ft.AdamW(p, **kwargs), dtype)
    loop = _train_mlp(lambda p: torch.optim.AdamW(p, foreach=False, **kwargs), dtype)
    assert fused[-1] < 0.05 * fused[0]
    torch.testing.assert_close(ours, fused, rtol=rtol, atol=0)
    ours_gap = ((ours - fused).abs() / fused).max()
    torch_gap = ((loop - fused).abs() / fused).max()
    assert ours_gap <= 10 * torch_gap + 1e-15, (ours_gap, torch_gap)


@pytest.mark.parametrize("copy_", [False, True], ids=["in place", "host copies"])
def test_cpu_offload_equals_the_host_optimizer(copy_):
    """CPUOffload on a bfloat16 model: with host copies (the accelerator path, its copies
    run on CPU here) and in place, the same bits as fusedopt.torch.AdamW with float32 masters
    on the model itself; its state is on the host, masters float32."""

    def model():
        torch.manual_seed(0)
        return torch.nn.Sequential(
            torch.nn.Linear(8, 32), torch.nn.GELU(), torch.nn.Linear(32, 1)
        ).to(torch.bfloat16)

    a, b = model(), model()
    offload = ft.CPUOffload(a.parameters(), ft.AdamW, lr=1e-2, copy=copy_)
    direct = ft.AdamW(b.parameters(), lr=1e-2, master_weights=True)
    sched = torch.optim.lr_scheduler.StepLR(offload.optimizer, step_size=3)
    x = torch.randn(64, 8).to(torch.bfloat16)
    for _ in range(6):
        for m, opt in ((a, offload), (b, direct)):
            opt.zero_grad()
            m(x).float().pow(2).mean().backward()
            opt.step()
        sched.step()
        direct.param_groups[0]["lr"] = offload.param_groups[0]["lr"]
        for p, q in zip(a.parameters(), b.parameters()):
            assert torch.equal(p, q)
    state = offload.state_dict()["state"][0]
    assert state["master"].dtype == torch.float32 and state["exp_avg"].device.type == "cpu"


@pytest.mark.parametrize("copy_", [False, True], ids=["in place", "host copies"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cpu_offload_takes_the_models_changes(copy_, dtype):
    """A model changed between steps (in place, new data) is what the next step updates,
    masters included, as a fresh offload of the changed model would update it; a resume that
    loads the model and the offload's state, in either order, continues bit for bit."""

    def model(seed):
        torch.manual_seed(seed)
        return torch.nn.Linear(40, 3).to(dtype)

    def train(m, offload, steps, first):
        for k in range(first, first + steps):
            torch.manual_seed(100 + k)
            m(torch.randn(5, 40, dtype=dtype)).float().pow(2).mean().backward()
            offload.step()
            offload.zero_grad()

    options = dict(lr=1e-2, stochastic_rounding=dtype == torch.bfloat16, copy=copy_)
    changed, fresh = model(0), model(1)
    offload = ft.CPUOffload(changed.parameters(), ft.AdamW, **options)
    train(changed, offload, 2, 0)
    with torch.no_grad():
        changed.bias.copy_(fresh.bias)
        if not copy_:  # in place, a new data_ptr would rebuild the calls whatever their state
            changed.weight.copy_(fresh.weight)
    if copy_:
        changed.weight.data = fresh.weight.detach().clone()
    offload.optimizer.state.clear()  # so that both start their state afresh
    other = ft.CPUOffload(fresh.parameters(), ft.AdamW, **options)
    train(changed, offload, 3, 2)
    train(fresh, other, 3, 2)
    for p, q in zip(changed.parameters(), fresh.parameters()):
        assert torch.equal(p, q)

    whole = model(0)
    train(whole, ft.CPUOffload(whole.parameters(), ft.AdamW, **options), 6, 0)
    first = model(0)
    offload = ft.CPUOffload(first.parameters(), ft.AdamW, **options)
    train(first, offload, 3, 0)
    saved = copy.deepcopy((first.state_dict(), offload.state_dict()))
    for order in ("model first", "offload first"):
        resumed = model(2)
        again = ft.CPUOffload(resumed.parameters(), ft.AdamW, **options)
        train(resumed, again, 2, 50)
        loads = [(resumed, saved[0])]
        loads.insert(order == "model first", (again, copy.deepcopy(saved[1])))
        for target, state in loads:
            target.load_state_dict(state)
        train(resumed, again, 3, 3)
        for p, q in zip(resumed.parameters(), whole.parameters()):
            assert torch.equal(p, q), order


@pytest.mark.parametrize("copy_", [False, True], ids=["in place", "host copies"])
def test_cpu_offload_restarts_masters_from_a_changed_model(copy_):
    """A bfloat16 model changed in place with its optimizer state kept: the masters start
    again from it, so a step that changes nothing (lr 0) leaves the new weights, where the
    old masters would write the old ones back."""
    torch.manual_seed(0)
    m = torch.nn.Linear(16, 4).to(torch.bfloat16)
    offload = ft.CPUOffload(m.parameters(), ft.AdamW, lr=1e-2, copy=copy_)
    for _ in range(2):
        m(torch.randn(3, 16, dtype=torch.bfloat16)).float().sum().backward()
        offload.step()
        offload.zero_grad()
    new = [torch.randn(p.shape).to(torch.bfloat16) for p in m.parameters()]
    with torch.no_grad():
        for p, value in zip(m.parameters(), new):
            p.copy_(value)
    offload.param_groups[0]["lr"] = 0.0
    m(torch.randn(3, 16, dtype=torch.bfloat16)).float().sum().backward()
    offload.step()
    for p, value in zip(m.parameters(), new):
        assert torch.equal(p, value)


def test_cpu_offload_copies_gradients_without_their_graph():
    """Gradients that require grad (backward(create_graph=True)) are copied to the host
    without their graph: a host buffer holding one would chain each step's graph to the
    last, and keep them all alive."""
    torch.manual_seed(0)
    m = torch.nn.Linear(6, 2)
    offload = ft.CPUOffload(m.parameters(), ft.Adam, lr=0.1, copy=True)
    for _ in range(3):
        offload.zero_grad()
        with warnings.catch_warnings():  # torch's: a reference cycle through .grad
            warnings.simplefilter("ignore", UserWarning)
            m(torch.randn(4, 6)).pow(2).sum().backward(create_graph=True)
        offload.step()
        assert all(g is not None and g.grad_fn is None for g in offload._grads)


def _offload_snapshot(model, offload):
    """Copies of what a refused CPUOffload step must leave as it was: the model's parameters,
    the host copies and the optimizer's state (masters included)."""
    return copy.deepcopy(
        ([p.detach() for p in model.parameters()], offload._host, offload.optimizer.state_dict())
    )


def _assert_same(before, after):
    for a, b in zip(before[0] + before[1], after[0] + after[1]):
        assert a.dtype == b.dtype and torch.equal(a, b)
    for key, entry in before[2]["state"].items():
        for name, value in entry.items():
            assert torch.equal(value, after[2]["state"][key][name]), (key, name)


@pytest.mark.parametrize(
    "start, to", [(torch.bfloat16, torch.float32), (torch.float32, torch.float64)]
)
def test_cpu_offload_refuses_a_model_of_another_dtype_before_any_change(start, to):
    """A model cast after the offload was made (``model.float()``) does not fit its host
    copies: the step is a TypeError naming the parameter, raised before anything is copied
    (the host copies and the masters, which hold more precision than the model, are as they
    were), as is a gradient of another dtype than the host copy takes."""
    torch.manual_seed(0)
    m = torch.nn.Linear(8, 4).to(start)
    offload = ft.CPUOffload(m.parameters(), ft.AdamW, lr=1e-3, copy=True)
    for _ in range(3):
        m(torch.randn(16, 8, dtype=start)).float().pow(2).mean().backward()
        offload.step()
        offload.zero_grad()
    if start == torch.bfloat16:  # the masters are not the model's values
        master = offload.optimizer.state[offload._host[0]]["master"]
        assert not torch.equal(master, m.weight.detach().float())
    m.to(to)
    m(torch.randn(16, 8, dtype=to)).float().pow(2).mean().backward()
    before = _offload_snapshot(m, offload)
    name = str(start).removeprefix("torch.")
    with pytest.raises(TypeError, match=rf"^parameter 0 of group 0: expected {name} \(4, 8\)"):
        offload.step()
    _assert_same(before, _offload_snapshot(m, offload))

    m.to(start)
    m.weight.grad = None
    m.weight.grad_dtype = to  # torch lets the model take gradients of another dtype
    m.weight.grad = torch.ones(4, 8, dtype=to)
    before = _offload_snapshot(m, offload)
    with pytest.raises(TypeError, match=r"^gradient of parameter 0 of group 0: expected"):
        offload.step()
    _assert_same(before, _offload_snapshot(m, offload))


@pytest.mark.parametrize(
    "refusal, copy_", [("lr", False), ("lr", True), ("gradient", False)], ids=str
)
def test_cpu_offload_refuses_what_the_host_optimizer_would_before_any_change(refusal, copy_):
    """A step the host optimizer would refuse (a negative lr; a gradient it cannot read where
    it is, of a parameter updated in place) is refused before the offload copies anything: a
    change to the model made since the last step, which a step copies into the host copies and
    restarts the masters from, is in neither yet."""
    torch.manual_seed(0)
    m = torch.nn.Linear(8, 4).to(torch.bfloat16)
    offload = ft.CPUOffload(m.parameters(), ft.AdamW, lr=1e-3, copy=copy_)

    def backward():
        m(torch.randn(16, 8, dtype=torch.bfloat16)).float().pow(2).mean().backward()

    for _ in range(2):
        backward()
        offload.step()
        offload.zero_grad()
    with torch.no_grad():
        m.weight.add_(1.0)
    backward()
    if refusal == "lr":
        offload.param_groups[0]["lr"] = -1.0
        error, message = ValueError, r"^Invalid learning rate: -1.0"
    else:
        m.weight.grad = m.weight.grad.t().contiguous().t()  # the same values, strided
        error, message = ValueError, r"^gradient of parameter 0 of group 0: expected a contig"
    before = _offload_snapshot(m, offload)
    with pytest.raises(error, match=message):
        offload.step()
    _assert_same(before, _offload_snapshot(m, offload))

    offload.param_groups[0]["lr"] = 0.0  # the change taken, and nothing more
    m.weight.grad = m.weight.grad.contiguous()
    offload.step()
    master = offload.optimizer.state[offload._host[0]]["master"]
    assert torch.equal(master, m.weight.detach().float())


@pytest.mark.parametrize("copy_", [False, True], ids=["in place", "host copies"])
def test_cpu_offload_refuses_a_parameter_in_two_groups(copy_):
    """The same parameter twice is refused with or without host copies: each occurrence
    shares one host copy, so the optimizer's own checks see it (torch's, for two groups)."""
    p = torch.nn.Parameter(torch.ones(4))
    groups = [{"params": [p], "lr": 0.1}, {"params": [p], "lr": 1.0}]
    with pytest.raises(ValueError, match="some parameters appear in more than one parameter"):
        ft.CPUOffload(groups, ft.SGD, copy=copy_)
    with pytest.warns(UserWarning, match="duplicate parameters"):  # torch's, for one group
        offload = ft.CPUOffload([p, p], ft.SGD, copy=copy_, lr=0.1)
    p.grad = torch.ones(4)
    with pytest.raises(ValueError, match="parameter 0 of group 0 and parameter 1 of group 0"):
        offload.step()
    assert torch.equal(p.detach(), torch.ones(4))


@pytest.mark.parametrize("copy_", [False, True], ids=["in place", "host copies"])
def test_cpu_offload_refuses_sparse_tensors_as_the_adapter_does(copy_):
    """A sparse gradient (``nn.Embedding(sparse=True)``) or parameter: the adapter's
    TypeError, with host copies too (checked before a copy that torch cannot make), and
    nothing changed."""
    torch.manual_seed(0)
    emb = torch.nn.Embedding(10, 4, sparse=True)
    offload = ft.CPUOffload(emb.parameters(), ft.AdamW, lr=1e-2, copy=copy_)
    emb(torch.tensor([1, 2])).sum().backward()
    before = _offload_snapshot(emb, offload)
    message = "gradient of parameter 0 of group 0: sparse tensors (torch.sparse_coo) are not"
    with pytest.raises(TypeError, match=re.escape(message)):
        offload.step()
    _assert_same(before, _offload_snapshot(emb, offload))
    assert not offload.optimizer.state
    sparse = torch.nn.Parameter(torch.eye(3).to_sparse())
    with pytest.raises(TypeError, match=re.escape("parameter 0 of group 0: sparse tensors")):
        ft.CPUOffload([sparse], ft.AdamW, copy=copy_)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
def test_cpu_offload_on_cuda_equals_the_host_optimizer():
    """CPUOffload with the model on a CUDA device: pinned host buffers, non-blocking copies
    both ways, the state on the host; given the same gradients, the parameters it copies back
    are bit for bit those of fusedopt.torch.AdamW with float32 masters on a CPU model, step
    after step (each step reads the parameters the previous one copied back)."""
    torch.manual_seed(0)
    shapes = [(64, 8), (64,), (1, 64), (1,), (4097,)]  # 4097: more than a chunk, odd
    cpu = [torch.randn(s).to(torch.bfloat16) for s in shapes]
    cuda = [p.detach().to("cuda").requires_grad_() for p in cpu]
    for p in cpu:
        p.requires_grad_()
    offload = ft.CPUOffload(cuda, ft.AdamW, lr=1e-2, stochastic_rounding=True, seed=3)
    direct = ft.AdamW(cpu, lr=1e-2, master_weights=True, stochastic_rounding=True, seed=3)
    assert all(host.is_pinned() for host in offload._host)
    for step in range(5):
        grads = [torch.randn(s).to(torch.bfloat16) for s in shapes]
        for p, q, g in zip(cuda, cpu, grads):
            p.grad, q.grad = g.to("cuda"), g.clone()
        offload.step()
        direct.step()
        if step == 0:
            assert all(b.is_pinned() for b in offload._grads)
        for p, q in zip(cuda, cpu):
            assert p.device.type == "cuda"
            assert torch.equal(p.cpu(), q.detach()), step
        offload.zero_grad()
    state = offload.state_dict()["state"][0]
    assert state["master"].dtype == torch.float32 and state["exp_avg"].device.type == "cpu"


def test_cpu_offload_example_trains():
    """examples/cpu_offload.py, small: the bfloat16 transformer's loss falls."""
    import importlib.util
    import os

    path = os.path.join(os.path.dirname(__file__), "..", "examples", "cpu_offload.py")
    spec = importlib.util.spec_from_file_location("cpu_offload", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    result = module.main(
        ["--steps", "20", "--d", "32", "--layers", "1", "--lr", "3e-3", "--device", "cpu"]
    )
    assert result["last_loss"] < 0.5 * result["first_loss"]


def test_persistent_gradients_reused_without_holding_their_memory():
    """Gradients that persist between steps (zero_grad(set_to_none=False)) are viewed once;
    a gradient whose storage was replaced is seen; the optimizer holds no reference that
    would keep a gradient alive after zero_grad()."""
    import gc
    import weakref

    a, b = _params(torch.float32), _params(torch.float32)
    opt = ft.Adam(a, lr=0.01)
    ref = _torch_loop("Adam", b, lr=0.01)
    for t in range(8):
        for params, o in ((a, opt), (b, ref)):
            o.zero_grad(set_to_none=False)
            for p, g in zip(params, _grads(t, torch.float32)):
                if p.grad is None:
                    p.grad = g
                else:
                    p.grad.copy_(g)
            if t == 5:
                params[0].grad.data = params[0].grad.data.clone()  # new memory, same tensor
            o.step()
        for x, y in zip(a, b):
            torch.testing.assert_close(x, y, rtol=1e-6, atol=1e-7)
    assert opt._groups[id(opt.param_groups[0])].calls[0].kept is not None
    grad = weakref.ref(a[0].grad)
    opt.zero_grad()
    gc.collect()
    assert grad() is None


def test_two_alternating_gradient_sets_do_not_rebuild_the_kept_views(monkeypatch):
    """Kept views of one persistent set of gradients stay in use when another set alternates
    with it (double-buffered gradients): they are made once, not every other step, and the
    updates are torch's."""
    made = []
    unowned = ft._unowned
    monkeypatch.setattr(ft, "_unowned", lambda v: made.append(v) or unowned(v))
    a, b = _params(torch.float32), _params(torch.float32)
    opt, ref = ft.Adam(a, lr=0.01), _torch_loop("Adam", b, lr=0.01)
    sets = {id(params): [_grads(s, torch.float32) for s in range(2)] for params in (a, b)}
    for which in [0, 0, 1, 0, 1, 0, 1, 0]:
        for params, o in ((a, opt), (b, ref)):
            for p, g in zip(params, sets[id(params)][which]):
                p.grad = g
            o.step()
        for x, y in zip(a, b):
            torch.testing.assert_close(x, y, rtol=1e-6, atol=1e-7)
    assert len(made) == len(a)  # set 0's views, once


def test_skip_if_nonfinite_and_max_grad_norm():
    """skip_if_nonfinite: a step with a NaN gradient changes nothing and is counted (the
    closure's loss still returned); max_grad_norm: as torch's clip_grad_norm_ then the step;
    an invalid group added later is refused and not kept."""
    a = _params(torch.float32)
    before = [p.detach().clone() for p in a]
    opt = ft.Adam(a, lr=0.1, skip_if_nonfinite=True)
    for p, g in zip(a, _grads(0, torch.float32)):
        p.grad = g
    a[1].grad[0] = float("nan")
    assert opt.step(lambda: 7.0) == 7.0
    assert opt.skipped_steps == 1 and all(torch.equal(x, y) for x, y in zip(a, before))
    assert "fusedopt" in opt.state_dict() and opt.state_dict()["fusedopt"]["skipped_steps"] == 1

    a, b = _params(torch.float32), _params(torch.float32)
    opt = ft.Adam(a, lr=0.1, max_grad_norm=0.5)
    ref = _torch_loop("Adam", b, lr=0.1)
    for t in range(3):
        for params in (a, b):
            for p, g in zip(params, _grads(t, torch.float32)):
                p.grad = g
        torch.nn.utils.clip_grad_norm_(b, 0.5, foreach=False)
        opt.step()
        ref.step()
        for x, y in zip(a, b):
            torch.testing.assert_close(x, y, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="Invalid learning rate"):
        opt.add_param_group({"params": [torch.zeros(2, requires_grad=True)], "lr": -1.0})
    assert len(opt.param_groups) == 1


def test_adagrad_state_created_at_construction_as_torch():
    """torch's Adagrad creates its state at construction (and its step reads it for every
    parameter with a gradient): the adapter's too, so torch loads its state_dict even for a
    parameter that has not had a gradient yet."""
    a = _params(torch.float32)
    opt = ft.Adagrad(a, lr=0.1, initial_accumulator_value=0.5)
    assert all(torch.equal(opt.state[p]["sum"], torch.full_like(p, 0.5)) for p in a)
    for p, g in zip(a[1:], _grads(0, torch.float32)[1:]):
        p.grad = g
    opt.step()
    theirs = _torch_loop("Adagrad", a, lr=0.1, initial_accumulator_value=0.5)
    theirs.load_state_dict(opt.state_dict())
    a[0].grad = torch.ones_like(a[0])
    theirs.step()
    assert float(theirs.state[a[0]]["step"]) == 1.0


def test_deepcopy_and_pickle_continue_identically():
    """copy.deepcopy and pickle (torch.save of the optimizer) keep the fusedopt class and the
    options; the copies step as the original does."""
    import pickle

    a = _params(torch.float32)
    opt = ft.AdamW(a, lr=0.01, amsgrad=True, seed=4)
    _run(opt, a, 2)
    for clone in (copy.deepcopy(opt), pickle.loads(pickle.dumps(opt))):
        params = [p for g in clone.param_groups for p in g["params"]]
        assert all(p.data_ptr() != q.data_ptr() for p, q in zip(params, a))
        _run(clone, params, 2, 2)
        expected = [p.detach().clone().requires_grad_() for p in a]
        ref = ft.AdamW(expected, lr=0.01, amsgrad=True, seed=4)
        ref.load_state_dict(copy.deepcopy(opt.state_dict()))
        _run(ref, expected, 2, 2)
        assert all(torch.equal(p, q) for p, q in zip(params, expected))


def test_muon_refuses_parameters_that_are_not_2d_as_torch():
    """torch's ValueError at construction; fusedopt's also in add_param_group, which torch's
    Muon does not check (its step would fail later). Before torch 2.9, which has no Muon to
    check first, fusedopt's at construction too."""
    has_torchs = hasattr(torch.optim, "Muon")
    assert (ft.Muon.torch_class is not None) == has_torchs
    match = "Muon only supports 2D parameters" if has_torchs else "Muon only supports 2-D param"
    with pytest.raises(ValueError, match=match):
        ft.Muon([torch.zeros(3, 3, requires_grad=True), torch.zeros(3, requires_grad=True)])
    opt = ft.Muon([torch.zeros(3, 3, requires_grad=True)])
    with pytest.raises(ValueError, match="2-D parameters: parameter 0 of group 1 has shape"):
        opt.add_param_group({"params": [torch.zeros(2, 2, 2, requires_grad=True)]})
    assert len(opt.param_groups) == 1


def test_storage_errors_name_the_parameter_once():
    """The fusedopt class's storage errors, raised for the adapter: the parameter named as the
    adapter names it, not quoted inside the class's own wording."""
    double = torch.zeros(3, dtype=torch.float64, requires_grad=True)
    with pytest.raises(ValueError, match=r"'bfloat16': parameter 0 of group 0 is float64, whose"):
        ft.AdamW([double], state_dtype="bfloat16")
    with pytest.raises(ValueError, match=r"'bfloat16': parameter 0 of group 1 is float64, whose"):
        ft.AdamW([torch.zeros(3, requires_grad=True)], state_dtype="bfloat16").add_param_group(
            {"params": [double]}
        )


@pytest.mark.parametrize("name", ["Adafactor", "Muon"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_matrix_adapters_match_the_numpy_classes_bit_for_bit(name, dtype):
    """The adapters step the tensors' memory as fusedopt.optim's classes step arrays: the same
    bits for parameters and state (bfloat16 through its int16 view), and in torch's layout."""
    shapes = MATRICES if name == "Muon" else SHAPES
    params = _params(dtype, shapes=shapes)
    arrays = {str(i): ft._numpy(p.detach()).copy() for i, p in enumerate(params)}
    opt = ft.CLASSES[name](params, lr=0.01, weight_decay=0.05)
    ref = getattr(optim, name)(arrays, lr=0.01, weight_decay=0.05)
    for t in range(3):
        grads = _grads(t, dtype, shapes)
        for p, g in zip(params, grads):
            p.grad = g
        opt.step()
        ref.step({str(i): ft._numpy(g) for i, g in enumerate(grads)})
    for i, p in enumerate(params):
        assert_same_bits(ft._numpy(p.detach()), arrays[str(i)])
        state = {k: v for k, v in opt.state[p].items() if k != "step"}
        assert state.keys() == {k for k in ref.state[str(i)] if k != "step"}
        for key, value in state.items():
            assert tuple(value.shape) == ref.state[str(i)][key].shape
            assert_same_bits(ft._numpy(value), ref.state[str(i)][key])


# ------------------------------------------------------------------ new gradients, lent


def _bits(opt, params):
    """Every byte of the parameters and of their state, as copies."""
    return [ft._numpy(p.detach()).tobytes() for p in params] + [
        ft._numpy(v).tobytes()
        for p in params
        for _, v in sorted(opt.state.get(p, {}).items())
        if isinstance(v, torch.Tensor)
    ]


def _lending_and_viewing(name, dtype, options=None, shapes=SHAPES):
    """Two optimizers on equal parameters in two groups: one lends new gradients' memory to
    the kernel (the default), the other views every gradient through Tensor.numpy()."""
    pairs = []
    for borrows in (True, False):
        params = _params(dtype, shapes=shapes)
        opt = ft.CLASSES[name](
            [{"params": params[:2]}, {"params": params[2:], "lr": 0.05}], **(options or {})
        )
        if hasattr(opt, "train"):
            opt.train()
        assert opt._borrows, name
        opt._borrows = borrows
        pairs.append((opt, params))
    return pairs


LENT = [
    ("Adam", torch.float32, {}),
    ("AdamW", torch.float32, dict(amsgrad=True, weight_decay=0.1)),
    ("SGD", torch.float32, dict(lr=0.1, momentum=0.9, nesterov=True)),
    ("NAdam", torch.float64, dict(decoupled_weight_decay=True, weight_decay=0.1)),
    ("RMSprop", torch.float32, dict(momentum=0.5, centered=True)),
    ("Adagrad", torch.float32, {}),
    ("Lion", torch.bfloat16, dict(state_dtype="bfloat16", stochastic_rounding=True, seed=2)),
    ("AdamW", torch.bfloat16, dict(master_weights=True)),
    ("Adam", torch.float16, dict(master_weights=True)),
    ("ScheduleFreeAdamW", torch.float32, dict(warmup_steps=2)),
]


@pytest.mark.parametrize(("name", "dtype", "options"), LENT, ids=lambda x: str(x))
def test_new_gradients_lent_equal_the_views_bit_for_bit(name, dtype, options, monkeypatch):
    """New gradient tensors at every step (as after zero_grad()): lent to the kernel, through
    torch's guard and _core._borrow, with no Tensor.numpy(), they give the bits the NumPy views
    give, parameters and every state buffer, step after step; a step without a gradient for
    one parameter, and SGD's first momentum step, regroup the calls as before."""
    borrowed = []
    borrow = ft._core._borrow
    monkeypatch.setattr(ft._core, "_borrow", lambda *a: borrowed.append(len(a[0])) or borrow(*a))
    (lending, a), (viewing, b) = _lending_and_viewing(name, dtype, options)
    for t in range(6):
        grads = _grads(t, dtype)
        for params in (a, b):
            for i, (p, g) in enumerate(zip(params, grads)):
                p.grad = None if (t == 3 and i == 1) else g.clone()
        lending.step()
        viewing.step()
        assert _bits(lending, a) == _bits(viewing, b), t
    assert sum(borrowed) == 6 * len(a) - 1  # every gradient of every step, lent


def test_a_step_with_new_gradients_makes_no_numpy_array_of_them(monkeypatch):
    """After the first step (which views the parameters and state once), steps with new
    gradients never call Tensor.numpy(): their memory goes to the kernel as it is."""
    params = _params(torch.float32)
    opt = ft.Adam(params, lr=0.01)
    _run(opt, params, 1)

    def refused(self, *args, **kwargs):
        raise AssertionError("Tensor.numpy() called")

    before = _bits(opt, params)
    monkeypatch.setattr(torch.Tensor, "numpy", refused)
    _run(opt, params, 3, 1)
    monkeypatch.undo()
    assert _bits(opt, params) != before


def _bad_gradients():
    """name -> a function setting a gradient of p, a (3, 4) float32 parameter, that the
    kernel must not read where it is."""

    def other_shape(p):
        p.grad = torch.randn(3, 4)
        p.grad.data = torch.randn(4, 3)  # 12 elements, as the parameter's

    def other_size(p):
        p.grad = torch.randn(3, 4)
        p.grad.data = torch.randn(5)

    return {
        "float64": _set_float64_grad,
        "transposed": lambda p: setattr(p, "grad", torch.randn(4, 3).t()),
        "strided": lambda p: setattr(p, "grad", torch.randn(3, 8)[:, ::2]),
        "shape (4, 3)": other_shape,
        "size 5": other_size,
        "sparse": lambda p: setattr(p, "grad", _sparse_gradient()),
        "negative view": lambda p: setattr(p, "grad", torch.randn(3, 4)._neg_view()),
        "zero tensor": lambda p: setattr(p, "grad", torch._efficientzerotensor((3, 4))),
        "the parameter's memory": lambda p: setattr(p, "grad", p.detach()),
    }


@pytest.mark.parametrize("case", list(_bad_gradients()))
def test_a_gradient_not_lent_gets_the_same_error_arrays_untouched(case):
    """A gradient of another dtype, shape, size or layout, sparse, a negative or zero view, or
    the parameter's own memory: torch's guard refuses it (or the overlap check), and the step
    raises the error the NumPy views raise (or the adapter's own check), naming the parameter, with
    every parameter and state byte as it was. The step has two fused calls; a gradient on its
    parameter's memory is tried in each, the second too: the step checks every call's
    gradients before the first call runs."""
    for bad in (0, 1) if case == "the parameter's memory" else (1,):
        shapes = [(5,), (3, 4), (7,)]
        shapes[bad], shapes[1] = shapes[1], shapes[bad]  # (3, 4), the bad one's
        errors = []
        for borrows in (True, False):
            params = _params(torch.float32, shapes=shapes)
            opt = ft.Adam([{"params": params[:1]}, {"params": params[1:]}], lr=0.1)
            opt._borrows = borrows
            _run(opt, params, 2)
            before = _bits(opt, params)
            for p, g in zip(params, _grads(9, torch.float32, shapes)):
                p.grad = g
            _bad_gradients()[case](params[bad])
            with pytest.raises((TypeError, ValueError, RuntimeError)) as raised:
                opt.step()
            assert _bits(opt, params) == before
            errors.append((type(raised.value), str(raised.value)))
        assert errors[0] == errors[1]
        assert f"parameter 0 of group {bad}" in errors[0][1] or "grad[0]" in errors[0][1]


@pytest.mark.parametrize(
    "name", ["Adam", "AdamW", "Adamax", "NAdam", "RAdam", "Adagrad", "RMSprop"]
)
def test_eps_zero_is_accepted_as_by_torch(name):
    """torch checks 0 <= eps: eps=0 steps (here on gradients that keep every denominator
    nonzero) as torch's class does."""
    params = [torch.nn.Parameter(torch.linspace(-1, 1, 8)) for _ in range(2)]
    ours = ft.CLASSES[name]([params[0]], eps=0.0)
    theirs = getattr(torch.optim, name)([params[1]], eps=0.0)
    for i in range(3):
        for p, opt in zip(params, (ours, theirs)):
            p.grad = torch.linspace(0.5, 2, 8) * (i + 1)
            opt.step()
    torch.testing.assert_close(params[0], params[1], rtol=1e-6, atol=1e-7)


def test_a_gradient_that_requires_grad_is_read_as_torch_reads_it():
    """After backward(create_graph=True) the gradients require grad; torch's step reads their
    values, and so does this one (through the checked path: torch's guard refuses them)."""
    results = []
    for module in (torch.optim, ft):
        torch.manual_seed(0)
        model = torch.nn.Linear(6, 2)
        opt = module.Adam(model.parameters(), lr=0.1)
        for _ in range(3):
            opt.zero_grad()
            with warnings.catch_warnings():  # torch's: a reference cycle through .grad
                warnings.simplefilter("ignore", UserWarning)
                model(torch.randn(4, 6)).pow(2).sum().backward(create_graph=True)
            assert all(p.grad.requires_grad for p in model.parameters())
            opt.step()
        results.append([p.detach().clone() for p in model.parameters()])
    for ours, theirs in zip(*results):
        torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-6)


def test_a_gradient_on_memory_another_call_writes_is_refused_before_any_call():
    """A gradient on the memory of another group's parameter, or of its own state: refused
    before anything is written (one fused call would otherwise write what a later one reads
    as its gradient, or fail after the earlier calls wrote)."""
    params = _params(torch.float32, shapes=[(12,), (3, 4)])
    opt = ft.Adam([{"params": params[:1]}, {"params": params[1:]}], lr=0.1)
    _run(opt, params, 2)
    before = _bits(opt, params)
    for alias, other in (
        (lambda: params[0].detach().view(3, 4), "parameter 0 of group 0"),
        (lambda: opt.state[params[1]]["exp_avg"], "state 'exp_avg' of parameter 0 of group 1"),
    ):
        params[0].grad = torch.ones(12)
        params[1].grad = alias()
        with pytest.raises(ValueError, match="share memory") as raised:
            opt.step()
        assert _bits(opt, params) == before
        assert "gradient of parameter 0 of group 1" in str(raised.value)
        assert other in str(raised.value)


def test_gradients_the_guard_refuses_but_the_views_take_are_updated_as_before():
    """Gradients torch's guard does not pass but NumPy views take (a Parameter as gradient,
    one tensor as two parameters' gradients) and one it passes with an odd stride on a
    dimension of one element: the same bits either way."""
    shapes = [(1, 3), (4,), (4,)]
    (lending, a), (viewing, b) = _lending_and_viewing("Adam", torch.float32, {}, shapes)
    for t in range(3):
        for params in (a, b):
            shared = torch.randn(4, generator=torch.Generator().manual_seed(t))
            params[0].grad = torch.empty_strided((1, 3), (7, 1)).copy_(torch.ones(1, 3) * t)
            params[1].grad = torch.nn.Parameter(shared.clone(), requires_grad=False)
            params[2].grad = shared
        lending.step()
        viewing.step()
        assert _bits(lending, a) == _bits(viewing, b)


@pytest.mark.filterwarnings("ignore:The PyTorch API of nested tensors")
def test_a_nested_tensor_never_reaches_the_guard():
    """torch's guard reads a strided nested tensor's strides, which throw in C++ and would
    abort the process: the adapter refuses it first, with torch's error from the checked
    path."""
    params = _params(torch.float32, shapes=[(3, 4), (4,)])
    opt = ft.Adam(params, lr=0.1)
    _run(opt, params, 1)
    entry = next(iter(opt._groups.values()))
    nested = torch.nested.nested_tensor([torch.randn(4) for _ in range(3)])
    with pytest.raises(RuntimeError):
        opt._grad_views(entry, entry.calls[0], [nested, torch.randn(4)], True)


def test_lent_memory_is_checked_by_the_binding_as_arrays_are():
    """_core._borrow's memory, in a kernel call: its dtype must be the call's grad dtype, its
    shapes the params', one per param; it is refused for an argument that is written and in
    a single-array call; its bytes join the overlap check; memory at address 0 (a zero
    tensor's) is not lent. Every array is untouched after each refusal."""
    import fusedopt

    core = ft._core
    params = [np.random.rand(3, 4).astype(np.float32), np.random.rand(5).astype(np.float32)]
    m, v = [np.zeros_like(x) for x in params], [np.zeros_like(x) for x in params]
    grads = [torch.randn(3, 4), torch.randn(5)]
    lent = core._borrow(grads, params, np.dtype(np.float32))
    as_float64 = core._borrow(grads, params, np.dtype(np.float64))
    aliases = core._borrow([torch.from_numpy(x) for x in params], params, np.dtype(np.float32))
    arrays = [x.copy() for x in params + m + v]
    refusals = [
        (TypeError, "grad\\[0\\]: expected dtype float32", (params, as_float64, m, v)),
        (ValueError, "grad\\[0\\]: expected shape \\(5,\\) like param, got \\(3, 4\\)",
         (params[::-1], lent, m[::-1], v[::-1])),
        (ValueError, "grad: expected 1 arrays like param, got 2", (params[:1], lent, m[:1], v[:1])),
        (TypeError, "exp_avg: is updated in place", (params, lent, lent, v)),
        (TypeError, "grad: expected a numpy.ndarray like param", (params[0], lent, m[0], v[0])),
        (ValueError, "param\\[\\d\\] and grad\\[\\d\\] share memory", (params, aliases, m, v)),
    ]  # fmt: skip
    for error, message, args in refusals:
        with pytest.raises(error, match=message):
            fusedopt.adam_(*args, step=1, lr=0.1)
        for x, y in zip(params + m + v, arrays):
            assert_same_bits(x, y)
    zero = torch._efficientzerotensor(5)
    assert core._borrow([zero], params[1:], np.dtype(np.float32)) is None
    with pytest.raises(ValueError, match="an array in like per object"):
        core._borrow(grads, params[:1], np.dtype(np.float32))
    with pytest.raises(TypeError, match="floating dtype"):
        core._borrow(grads, params, np.dtype(np.int32))
    with pytest.raises(TypeError):
        core.Borrowed()

    class Emptying(torch.Tensor):  # a data_ptr that empties the lists given: they are copied
        def data_ptr(self):
            shapes.clear(), objects.clear(), objects.extend([self] * 9)
            return super().data_ptr()

    objects = [g.as_subclass(Emptying) for g in grads]
    shapes = [x.copy() for x in params]
    emptied = core._borrow(objects, shapes, np.dtype(np.float32))
    assert not shapes
    twins = [[[x.copy() for x in a] for a in (params, m, v)] for _ in range(2)]
    for (p, m_copy, v_copy), memory in zip(twins, (emptied, lent)):
        fusedopt.adam_(p, memory, m_copy, v_copy, step=1, lr=0.1)
    for x, y in zip(*(sum(twin, []) for twin in twins)):
        assert_same_bits(x, y)
    expected = [x.copy() for x in params]
    fusedopt.adam_(expected, [g.numpy() for g in grads], [x.copy() for x in m],
                   [x.copy() for x in v], step=1, lr=0.1)  # fmt: skip
    fusedopt.adam_(params, lent, m, v, step=1, lr=0.1)
    for x, y in zip(params, expected):
        assert_same_bits(x, y)


def test_only_updates_that_pass_gradients_to_a_kernel_lend():
    """Lending is for the adapters whose update hands the gradients to a fused kernel as they
    are: not Muon's or Adafactor's (NumPy work on the views), nor an adapter or fusedopt class
    that overrides the update. torch has the guard it needs (else views, at today's cost)."""
    assert ft._TensorGuards is not None
    p = [torch.zeros(3, 3, requires_grad=True)]
    assert all(ft.CLASSES[n](p)._borrows for n in ft.ELEMENTWISE + ("ScheduleFreeSGD",))
    assert not ft.Muon(p)._borrows and not ft.Adafactor(p)._borrows

    class Custom(ft.Adam):
        def _update(self, plan, params, grads, buffers, step, extra, first):
            super()._update(plan, params, list(grads), buffers, step, extra, first)

    assert not Custom(p)._borrows


@pytest.mark.parametrize("name", sorted(ft.CLASSES))
def test_two_groups_give_the_bits_of_one_optimizer_per_group(name):
    """A step of two groups (two fused calls, checked together for shared memory first), with
    a 1-D parameter where the class takes one and int8 state where it can have it: the bits of
    one optimizer per group, for every class, the second seeded as its call is (by the place of
    its first parameter)."""
    matrices = name == "Muon"
    shapes = [(4, 5), (3, 3)] if matrices else [(4, 5), (7,), (3, 3)]
    int8 = {} if name == "Adafactor" else {"state_dtype": "int8"}  # Adafactor's stay float32
    together = _params(torch.float32, shapes=shapes)
    apart = [p.detach().clone().requires_grad_() for p in together]
    cls = ft.CLASSES[name]
    split = len(shapes) - 1
    opt = cls([{"params": together[:split]}, {"params": together[split:], "lr": 0.02}], **int8)
    seed = optim._call_seed(0, split)
    opts = [cls(apart[:split], **int8), cls(apart[split:], lr=0.02, seed=seed, **int8)]
    for o in [opt, *opts]:
        if hasattr(o, "train"):
            o.train()
    for t in range(3):
        for params in (together, apart):
            for p, g in zip(params, _grads(t, torch.float32, shapes)):
                p.grad = g
        opt.step()
        for o in opts:
            o.step()
    assert [p.detach().numpy().tobytes() for p in together] == [
        p.detach().numpy().tobytes() for p in apart
    ]


def test_a_refused_or_skipped_step_creates_no_state_and_names_the_arrays():
    """A step refused before any call writes (by the step's check of several calls, or by a
    lone call's kernel, whose error is given the step's names), or skipped for a NaN, leaves
    no state behind; the next good step then runs as the first."""
    p, q = _params(torch.float32, shapes=[(5,), (4,)])
    opt = ft.Adam([{"params": [p]}, {"params": [q]}], lr=0.1, amsgrad=True)
    p.grad, q.grad = torch.ones(5), p.detach()[:4]
    with pytest.raises(ValueError, match="of group 1 and parameter 0 of group 0 share"):
        opt.step()
    assert len(opt.state) == 0
    lone = ft.Adam([p], lr=0.1, amsgrad=True)
    p.grad = p.detach()
    with pytest.raises(ValueError, match="gradient of parameter 0 of group 0 and parameter 0"):
        lone.step()
    assert len(lone.state) == 0
    p.grad = torch.ones(5)
    lone.step()
    p.grad = lone.state[p]["max_exp_avg_sq"]
    with pytest.raises(ValueError, match="state 'max_exp_avg_sq' of parameter 0 of group 0"):
        lone.step()
    assert lone.state[p]["step"] == 1
    skipping = ft.Adam([q], lr=0.1, skip_if_nonfinite=True)
    q.grad = torch.full((4,), float("nan"))
    skipping.step()
    assert len(skipping.state) == 0 and skipping.skipped_steps == 1
    start, r = q.detach().clone(), q.detach().clone().requires_grad_()
    q.grad = r.grad = torch.ones(4)
    skipping.step()
    ft.Adam([r], lr=0.1).step()
    assert torch.equal(q.detach(), r.detach()) and not torch.equal(q.detach(), start)


def test_clipping_checks_gradients_against_written_memory_before_it_scales_them():
    """max_grad_norm scales the gradients in place: one on its own state, in a step of one
    call, is refused before clipping writes anything."""
    params = _params(torch.float32, shapes=[(5,)])
    opt = ft.Adam(params, lr=0.1, max_grad_norm=1.0)
    _run(opt, params, 2)
    before = _bits(opt, params)
    params[0].grad = opt.state[params[0]]["exp_avg"]
    with pytest.raises(ValueError, match="state 'exp_avg' of parameter 0 of group 0 share"):
        opt.step()
    assert _bits(opt, params) == before


def test_load_state_dict_checks_the_options_it_restores_first():
    """A checkpoint whose seed is invalid is refused before any state or hyperparameter
    changes; its stochastic rounding and seed apply to float16 params as to bfloat16 ones."""
    p = torch.nn.Parameter(torch.ones(300, dtype=torch.bfloat16))
    p.grad = torch.ones(300, dtype=torch.bfloat16)
    src = ft.AdamW([p], lr=1e-2, stochastic_rounding=True, seed=3)
    src.step()
    half = torch.nn.Parameter(torch.ones(300, dtype=torch.float16))
    dst = ft.AdamW([half], lr=0.5)
    dst.load_state_dict(copy.deepcopy(src.state_dict()))
    assert dst._fused.stochastic_rounding and dst._fused.seed == 3
    for seed, error in [(-1, ValueError), (2**64, ValueError), ("x", TypeError)]:
        sd = copy.deepcopy(src.state_dict())
        sd["fusedopt"]["seed"] = seed
        other = ft.AdamW([torch.nn.Parameter(torch.ones(300, dtype=torch.bfloat16))], lr=0.5)
        with pytest.raises(error, match="seed"):
            other.load_state_dict(sd)
        assert len(other.state) == 0 and other.param_groups[0]["lr"] == 0.5


def test_groups_given_as_generators_keep_their_parameters():
    """module.parameters() inside group dicts, at construction and in add_param_group, as
    torch.optim takes them (a generator is read once)."""
    m = torch.nn.Sequential(torch.nn.Linear(5, 4), torch.nn.Linear(4, 2))
    opt = ft.SGD([{"params": m[0].parameters()}, {"params": m[1].parameters(), "lr": 0.02}], lr=0.1)
    assert [len(g["params"]) for g in opt.param_groups] == [2, 2]
    opt = ft.SGD(m[0].parameters(), lr=0.1)
    opt.add_param_group({"params": m[1].parameters(), "lr": 0.02})
    assert [len(g["params"]) for g in opt.param_groups] == [2, 2]
    before = [p.detach().clone() for p in m.parameters()]
    m(torch.randn(3, 5)).sum().backward()
    opt.step()
    assert all(not torch.equal(p, b) for p, b in zip(m.parameters(), before))


def test_a_refused_load_state_dict_changes_nothing():
    """State that this optimizer cannot keep (bfloat16 for int8, a wrong shape) is refused
    before torch's load replaces the groups' hyperparameters or any state."""
    params = [torch.nn.Parameter(torch.randn(300, dtype=torch.bfloat16)) for _ in range(2)]
    theirs = torch.optim.AdamW([torch.nn.Parameter(p.detach().clone()) for p in params], lr=0.05)
    for p in theirs.param_groups[0]["params"]:
        p.grad = torch.ones_like(p)
    theirs.step()
    ours = ft.AdamW(params, lr=0.01, state_dtype="int8")
    for p in params:
        p.grad = torch.ones_like(p)
    ours.step()
    before = copy.deepcopy(ours.state_dict())
    with pytest.raises(ValueError, match="this optimizer keeps int8 state"):
        ours.load_state_dict(theirs.state_dict())
    wrong = copy.deepcopy(before)
    wrong["state"][1]["exp_avg.codes"] = torch.zeros(3, dtype=torch.int8)
    with pytest.raises(
        ValueError,
        match=r"^checkpoint parameter 1: state 'exp_avg.codes': expected shape \(300,\), got \(3,",
    ):
        ours.load_state_dict(wrong)
    after = ours.state_dict()
    assert after["param_groups"] == before["param_groups"]
    for i, state in before["state"].items():
        assert after["state"][i].keys() == state.keys()
        for key, value in state.items():
            assert torch.equal(after["state"][i][key], value), (i, key)


def test_a_step_bumps_the_parameters_autograd_version():
    """A graph that saved a parameter before a step and is used after it raises, as with
    torch's in-place updates, instead of silently using the new values."""
    for opt_class, options in [(ft.SGD, {}), (ft.AdamW, dict(master_weights=True))]:
        lin = torch.nn.Linear(3, 3).to(torch.bfloat16 if options else torch.float32)
        opt = opt_class(lin.parameters(), lr=0.5, **options)
        x = torch.randn(2, 3, dtype=lin.weight.dtype, requires_grad=True)
        lin(x).sum().backward()
        version = lin.weight._version
        opt.step()
        assert lin.weight._version > version
        saved = (lin(x) ** 2).sum()
        lin(x).sum().backward()
        opt.step()
        with pytest.raises(RuntimeError, match="modified by an inplace operation"):
            torch.autograd.grad(saved, x)


@pytest.mark.parametrize("name", sorted(ft.CLASSES))
def test_steps_reuse_their_fused_calls(name):
    """A step rebuilds its calls (the tensors' views, checks and grouping) only when something
    changed: not at every step (SGD without momentum did, 25 times slower at 200 tensors)."""
    shape = (8, 8) if name == "Muon" else (100,)
    params = [torch.nn.Parameter(torch.zeros(shape)) for _ in range(3)]
    for p in params:
        p.grad = torch.ones(shape)
    for hyper in [{}, dict(momentum=0.9)] if name == "SGD" else [{}]:
        opt = ft.CLASSES[name](params, lr=0.01, **hyper)
        if hasattr(opt, "train"):  # Schedule-Free steps in train mode
            opt.train()
        opt.step()
        opt.step()  # SGD's first momentum step regroups once
        cls = type(opt)
        with mock.patch.object(cls, "_build", autospec=True, side_effect=cls._build) as build:
            for _ in range(3):
                opt.step()
        assert build.call_count == 0, hyper


@pytest.mark.parametrize("name", ["SGD", "RMSprop"])
def test_a_state_buffer_turned_on_mid_run_is_created(name):
    """Momentum set in a group after some steps: the step's calls are rebuilt with the new
    buffer, and SGD then matches torch's (torch's RMSprop cannot do this at all)."""
    p = torch.nn.Parameter(torch.ones(10))
    q = torch.nn.Parameter(torch.ones(10))
    ours = ft.CLASSES[name]([p], lr=0.1)
    theirs = torch.optim.SGD([q], lr=0.1) if name == "SGD" else None
    for i in range(4):
        if i == 2:
            ours.param_groups[0]["momentum"] = 0.9
            if theirs is not None:
                theirs.param_groups[0]["momentum"] = 0.9
        p.grad = torch.full((10,), float(i + 1))
        ours.step()
        if theirs is not None:
            q.grad = torch.full((10,), float(i + 1))
            theirs.step()
    assert "momentum_buffer" in ours.state[p]
    if theirs is not None:
        torch.testing.assert_close(p, q, rtol=0, atol=1e-6)


RESETS = {
    "state replaced": lambda opt, p: setattr(opt, "state", collections.defaultdict(dict)),
    "state cleared": lambda opt, p: opt.state.clear(),
    "entry deleted": lambda opt, p: opt.state.__delitem__(p),
    "entry emptied": lambda opt, p: opt.state.__setitem__(p, {}),
    "buffer replaced": lambda opt, p: opt.state[p].__setitem__("exp_avg", torch.full((6,), 0.5)),
    "step replaced": lambda opt, p: opt.state[p].__setitem__("step", torch.tensor(1.0)),
}


@pytest.mark.parametrize("reset", RESETS.values(), ids=RESETS.keys())
def test_state_reset_or_replaced_between_steps_is_what_the_next_step_uses(reset):
    """As torch's step: state cleared or removed starts afresh, new tensors are used (and
    updated in place, where the caller can see them), a new step count counts on."""
    params = [torch.nn.Parameter(torch.linspace(-1, 1, 6)) for _ in range(2)]
    ours, theirs = ft.Adam([params[0]], lr=0.1), torch.optim.Adam([params[1]], lr=0.1)
    for i in range(5):
        if i == 3:
            for opt, p in ((ours, params[0]), (theirs, params[1])):
                reset(opt, p)
        for p in params:
            p.grad = torch.linspace(0.5, 2, 6) * (-1) ** i
        ours.step()
        theirs.step()
    torch.testing.assert_close(params[0], params[1], rtol=0, atol=1e-6)
    mine, torchs = ours.state[params[0]], theirs.state[params[1]]
    assert mine.keys() == torchs.keys()
    for key in mine:
        torch.testing.assert_close(mine[key], torchs[key], rtol=0, atol=1e-6)
    assert mine["exp_avg"].data_ptr() == ours.state_dict()["state"][0]["exp_avg"].data_ptr()


def test_a_set_of_parameters_in_a_group_is_refused_as_by_torch():
    a, b = (torch.nn.Parameter(torch.ones(3)) for _ in range(2))
    with pytest.raises(TypeError, match="ordered collections"):
        ft.SGD([{"params": {a, b}}], lr=0.1)
    opt = ft.SGD([a], lr=0.1)
    with pytest.raises(TypeError, match="ordered collections"):
        opt.add_param_group({"params": {b}})
    assert len(opt.param_groups) == 1


def test_load_state_dict_checks_int8_codes_and_scales_first():
    """Codes and scales the steps could not use (scales not powers of two or not one per 256
    elements, codes of the wrong sign, either without the other) are refused at load, naming
    the parameter and the key, with nothing loaded."""
    params = [torch.nn.Parameter(torch.randn(300)) for _ in range(2)]
    for p in params:
        p.grad = torch.ones_like(p)
    src = ft.AdamW(params, lr=0.01, state_dtype="int8")
    src.step()
    good = copy.deepcopy(src.state_dict())
    for key, value, message in [
        ("exp_avg.scales", lambda v: torch.full_like(v, 3.0), "scales must be powers of two"),
        ("exp_avg.codes", lambda v: v.view(torch.uint8), "expected int8 codes, got torch.uint8"),
        ("exp_avg_sq.codes", lambda v: v.view(torch.int8), "expected uint8 codes, got torch.int8"),
        ("exp_avg.scales", lambda v: v[:1].clone(), r"expected 2 scales \(one per 256 elements"),
        ("exp_avg.scales", lambda v: torch.ones(3), "expected 2 scales"),
        ("exp_avg.scales", None, "'exp_avg.codes' without 'exp_avg.scales'"),
        ("exp_avg_sq.codes", None, "'exp_avg_sq.scales' without 'exp_avg_sq.codes'"),
    ]:
        sd = copy.deepcopy(good)
        if value is None:
            del sd["state"][1][key]
        else:
            sd["state"][1][key] = value(sd["state"][1][key])
        dst = ft.AdamW(
            [torch.nn.Parameter(torch.randn(300)) for _ in range(2)], lr=0.5, state_dtype="int8"
        )
        with pytest.raises(ValueError, match=f"^checkpoint parameter 1: state .*{message}"):
            dst.load_state_dict(sd)
        assert len(dst.state) == 0 and dst.param_groups[0]["lr"] == 0.5
    sd = copy.deepcopy(good)
    del sd["fusedopt"]["stochastic_rounding"]  # a seed alone: kept options, no KeyError
    sd["fusedopt"]["seed"] = 11
    dst = ft.AdamW(params, lr=0.5, state_dtype="int8", stochastic_rounding=True)
    dst.load_state_dict(sd)
    assert (dst._fused.seed, dst._fused.stochastic_rounding) == (11, True)


@pytest.mark.parametrize("options", [dict(state_dtype="int8"), dict(master_weights=True)])
def test_load_state_dict_allocates_only_the_state_it_loads(options):
    """Loading copies the state once. torch's own load would first cast each state tensor to
    its param's dtype (int8 codes to float32: four times their bytes; masters to bfloat16),
    only for the adapter to replace it: five times the int8 state's bytes. The profiler counts
    the CPU allocations of torch tensors."""
    n = 1 << 20
    dtype = torch.bfloat16 if options.get("master_weights") else torch.float32
    p = torch.nn.Parameter(torch.randn(n, dtype=dtype))
    p.grad = torch.randn(n, dtype=dtype)
    opt = ft.AdamW([p], **options)
    opt.step()
    sd = opt.state_dict()
    state_bytes = sum(t.nbytes for t in sd["state"][0].values())
    activities = [torch.profiler.ProfilerActivity.CPU]
    with torch.profiler.profile(activities=activities, profile_memory=True) as prof:
        opt.load_state_dict(sd)
    allocated = sum(max(e.self_cpu_memory_usage, 0) for e in prof.key_averages())
    assert allocated < 1.1 * state_bytes, (allocated, state_bytes)


def test_load_state_dict_takes_state_dtype_none_and_float32_as_one_option():
    """As fusedopt.optim's load_state_dict: None, "float32" and torch.float32 are one option,
    in both directions."""
    params = [torch.nn.Parameter(torch.randn(30))]
    params[0].grad = torch.ones(30)
    saved = {}
    for state_dtype in (None, "float32", torch.float32):
        opt = ft.Adam(params, lr=0.01, state_dtype=state_dtype)
        opt.step()
        saved[state_dtype] = copy.deepcopy(opt.state_dict())
    for mine in saved:
        for theirs, sd in saved.items():
            opt = ft.Adam([torch.nn.Parameter(torch.randn(30))], lr=0.5, state_dtype=mine)
            opt.load_state_dict(sd)
            assert opt.param_groups[0]["lr"] == 0.01, (mine, theirs)
    with pytest.raises(ValueError, match="checkpoint has state_dtype=None, this optimizer 'bf"):
        ft.Adam(params, lr=0.5, state_dtype="bfloat16").load_state_dict(saved[None])


def _set(key, value):
    return lambda opt, p: opt.state[p].__setitem__(key, value)


CHANGED = {  # a parameter or its state changed between steps: (options, change, key, error)
    "p.data double": ({}, lambda opt, p: setattr(p, "data", p.data.double()), "exp_avg", TypeError),
    "p.data reshaped": (
        {},
        lambda opt, p: setattr(p, "data", torch.ones(20, 15)),
        "exp_avg",
        ValueError,
    ),
    "buffer dtype": (
        {},
        _set("exp_avg", torch.zeros(300, dtype=torch.bfloat16)),
        "exp_avg",
        TypeError,
    ),
    "buffer shape": ({}, _set("exp_avg_sq", torch.zeros(30)), "exp_avg_sq", ValueError),
    "buffer strided": ({}, _set("exp_avg", torch.zeros(600)[::2]), "exp_avg", ValueError),
    "buffer not a tensor": ({}, _set("exp_avg", np.zeros(300, np.float32)), "exp_avg", TypeError),
    "master dtype": (
        {"master_weights": True},
        _set("master", torch.zeros(300, dtype=torch.bfloat16)),
        "master",
        TypeError,
    ),
    "master shape": (
        {"master_weights": True},
        _set("master", torch.zeros(30)),
        "master",
        ValueError,
    ),
    "codes dtype": (
        {"state_dtype": "int8"},
        _set("exp_avg.codes", torch.zeros(300, dtype=torch.uint8)),
        "exp_avg.codes",
        TypeError,
    ),
    "scales length": (
        {"state_dtype": "int8"},
        _set("exp_avg.scales", torch.ones(1)),
        "exp_avg.scales",
        ValueError,
    ),
    "Adafactor variance": (
        {"name": "Adafactor"},
        _set("variance", torch.zeros(30)),
        "variance",
        ValueError,
    ),
    "scales missing": (
        {"state_dtype": "int8"},
        lambda opt, p: opt.state[p].pop("exp_avg_sq.scales"),
        "exp_avg_sq.scales",
        ValueError,
    ),
}


@pytest.mark.parametrize("case", CHANGED.values(), ids=CHANGED.keys())
def test_a_later_groups_changed_state_is_refused_before_any_group_is_written(case):
    """State that no longer fits its parameter (p.data replaced after model.double(), a
    buffer replaced with another dtype or shape) is refused as the step's calls are built,
    naming the parameter and the state: no group is written, no step counted."""
    options, change, key, error = case
    options = dict(options)
    name = options.pop("name", "AdamW")
    dtype = torch.bfloat16 if options.get("master_weights") else torch.float32
    params = [torch.nn.Parameter(torch.randn(300).to(dtype)) for _ in range(4)]
    groups = [{"params": params[:2]}, {"params": params[2:]}]
    opt = ft.CLASSES[name](groups, lr=0.01, **options)
    for p in params:
        p.grad = torch.ones_like(p)
    opt.step()
    change(opt, params[2])
    for p in params:
        p.grad = torch.ones_like(p)
    before = _bits(opt, params[:2])
    with pytest.raises(error, match=rf"^state '{key}' of parameter 0 of group 1: "):
        opt.step()
    assert _bits(opt, params[:2]) == before
    assert [int(opt.state[p]["step"]) for p in params] == [1] * 4


def test_a_master_cast_by_torchs_class_is_made_again_from_the_parameter():
    """fusedopt -> torch.optim -> fusedopt with master_weights: torch's class carries the
    master along cast to the parameter's dtype and never updates it. That master is dropped
    at load and made again from the parameter, as a missing one is, so the steps torch took
    are kept (the stale master undid them)."""
    p = torch.nn.Parameter(torch.randn(1000).to(torch.bfloat16))
    ours = ft.AdamW([p], lr=1e-2, master_weights=True)
    _run(ours, [p], 3)
    theirs = torch.optim.AdamW([p], lr=1e-2)
    theirs.load_state_dict(ours.state_dict())
    _run(theirs, [p], 30, start=3)
    assert theirs.state[p]["master"].dtype == torch.bfloat16
    torchs = p.detach().clone()
    sd = theirs.state_dict()
    back = ft.AdamW([p], lr=1e-2, master_weights=True)
    back.load_state_dict(sd)
    q = torch.nn.Parameter(torchs.clone())
    without = ft.AdamW([q], lr=1e-2, master_weights=True)
    without.load_state_dict({**sd, "state": {0: {**sd["state"][0], "master": None}}})
    _run(back, [p], 1, start=33)
    _run(without, [q], 1, start=33)
    assert torch.equal(p, q)
    assert torch.equal(back.state[p]["master"], without.state[q]["master"])
    # one step of lr 1e-2 from where torch left it, and a bfloat16 rounding (stale: 0.2)
    assert (p.detach().float() - torchs.float()).abs().max() < 0.05


def _train_alongside(x, steps, ours, theirs):
    """``steps`` steps of each (model, optimizer) pair on the same loss; then their models'
    parameters are torch's to float64 rounding."""
    for _ in range(steps):
        for model, opt in (ours, theirs):
            opt.zero_grad()
            model(x).pow(2).sum().backward()
            opt.step()
    for p, q in zip(ours[0].parameters(), theirs[0].parameters()):
        torch.testing.assert_close(p, q, rtol=1e-9, atol=0)


@pytest.mark.parametrize("name", ["Adam", "Adagrad", "Adafactor"])
def test_a_lazy_modules_parameters_are_made_at_the_first_step(name):
    """torch.nn.LazyLinear's parameters, uninitialized when the optimizer is built (Adagrad's
    state, made at construction for the others, included), are checked and given state at
    the first step after the dry run: the steps are torch's. State loaded before the dry run
    is refused, naming the parameter; after it, it loads."""
    torch.manual_seed(0)
    lazy = torch.nn.LazyLinear(4, dtype=torch.float64)
    ours, loading = (ft.CLASSES[name](lazy.parameters(), lr=0.1) for _ in range(2))
    stepped = torch.nn.Linear(3, 4, dtype=torch.float64)
    source = ft.CLASSES[name](stepped.parameters(), lr=0.1)
    stepped(torch.ones(1, 3, dtype=torch.float64)).sum().backward()
    source.step()
    with pytest.raises(ValueError, match="^checkpoint parameter 0: uninitialized"):
        ours.load_state_dict(source.state_dict())
    assert len(ours.state) == 0
    x = torch.randn(5, 3, dtype=torch.float64)
    lazy(x)  # the dry run
    loading.load_state_dict(source.state_dict())
    assert loading.state[lazy.weight].keys() == source.state[stepped.weight].keys()
    plain = copy.deepcopy(lazy)
    theirs = getattr(torch.optim, name)(plain.parameters(), lr=0.1)
    _train_alongside(x, 3, (lazy, ours), (plain, theirs))


@pytest.mark.parametrize("name", ["Adam", "SGD"])  # torch's Adagrad refuses lazy parameters
def test_a_lazy_branch_not_yet_run_does_not_stop_the_others(name):
    """A model whose lazy branch has not run yet trains its other parameters, as with torch's
    classes: a parameter without a gradient is in no call, so its missing data is not read."""
    torch.manual_seed(0)
    dense, lazy = torch.nn.Linear(4, 4, dtype=torch.float64), torch.nn.LazyLinear(2)
    plain = copy.deepcopy(dense)
    ours = ft.CLASSES[name](list(dense.parameters()) + list(lazy.parameters()), lr=0.1)
    theirs = getattr(torch.optim, name)(list(plain.parameters()) + list(lazy.parameters()), lr=0.1)
    _train_alongside(torch.randn(3, 4, dtype=torch.float64), 2, (dense, ours), (plain, theirs))


@pytest.mark.parametrize("copy_", [False, True], ids=["in place", "host copies"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cpu_offload_takes_a_lazy_modules_parameters(copy_, dtype):
    """CPUOffload over a model with a lazy layer: its host copy (with ``copy``) is made at
    the first step after the dry run, and the steps are those of fusedopt's AdamW on the
    model itself (masters for bfloat16, as the offload makes them)."""

    def model():
        torch.manual_seed(0)
        return torch.nn.Sequential(torch.nn.LazyLinear(3, dtype=dtype), torch.nn.Linear(3, 2))

    a, b = model(), model()
    offload = ft.CPUOffload(a.parameters(), ft.AdamW, lr=0.1, copy=copy_)
    direct = ft.AdamW(b.parameters(), lr=0.1, master_weights=dtype == torch.bfloat16)
    x = torch.randn(5, 4, dtype=dtype)
    for _ in range(3):
        for m, opt in ((a, offload), (b, direct)):
            torch.manual_seed(1)  # the lazy layer's initial weights, drawn at its first run
            opt.zero_grad()
            m[1](m[0](x).float()).pow(2).sum().backward()
            opt.step()
        for p, q in zip(a.parameters(), b.parameters()):
            assert torch.equal(p, q)
    assert (offload._host[0] is a[0].weight) != copy_


def test_load_state_dict_checks_the_counts_first():
    """A checkpoint's skipped_steps and step counts are checked before anything is loaded: a
    bad step would be refused by its call's kernel only at a later step, after other groups
    had been written."""
    params = [torch.nn.Parameter(torch.ones(2)) for _ in range(2)]
    opt = ft.Adam([{"params": [params[0]]}, {"params": [params[1]]}], lr=0.01)
    for p in params:
        p.grad = torch.ones(2)
    opt.step()
    before = copy.deepcopy(opt.state_dict())

    def changed(skipped=None, step=None):
        sd = copy.deepcopy(opt.state_dict())
        sd["param_groups"][0]["lr"] = 0.5
        if skipped is not None:
            sd["fusedopt"]["skipped_steps"] = skipped
        if step is not None:
            sd["state"][1]["step"] = torch.tensor(step)
        return sd

    for entries, message in [
        ({"skipped": "x"}, r"^checkpoint has skipped_steps='x': expected a count"),
        ({"skipped": -3}, r"^checkpoint has skipped_steps=-3"),
        ({"skipped": 2.5}, r"^checkpoint has skipped_steps=2.5"),
        ({"step": -1.0}, r"^checkpoint parameter 1: invalid step tensor\(-1\.\)"),
        ({"step": 2.5}, r"^checkpoint parameter 1: invalid step tensor\(2\.5000\)"),
        ({"step": 1e30}, r"^checkpoint parameter 1: invalid step"),
        ({"step": [1.0, 2.0]}, r"^checkpoint parameter 1: invalid step"),
    ]:
        with pytest.raises(ValueError, match=message):
            opt.load_state_dict(changed(**entries))
        after = opt.state_dict()
        assert after["param_groups"] == before["param_groups"], entries
        assert after["fusedopt"] == before["fusedopt"], entries
        for i in (0, 1):
            assert torch.equal(after["state"][i]["step"], before["state"][i]["step"]), entries
    opt.load_state_dict(changed(skipped=2, step=3.0))
    assert opt.skipped_steps == 2 and opt.state[params[1]]["step"] == 3


def test_load_state_dict_hooks_act_as_on_torchs():
    """torch's load_state_dict pre-hooks change what is checked and loaded, post-hooks the
    loaded state, as on torch's classes; their handles still remove them."""
    params = [torch.nn.Parameter(torch.linspace(-1, 1, 6)) for _ in range(3)]
    source = ft.Adam([params[0]], lr=0.1)
    params[0].grad = torch.ones(6)
    source.step()

    def pre(opt, sd):
        sd["param_groups"] = [{**sd["param_groups"][0], "lr": 0.25}]
        return {**sd, "state": {0: {**sd["state"][0], "exp_avg": torch.full((6,), 3.0)}}}

    def post(opt):
        opt.state[opt.param_groups[0]["params"][0]]["exp_avg_sq"] = torch.full((6,), 7.0)

    loaded = []
    for opt, p in (
        (ft.Adam([params[1]], lr=0.1), params[1]),
        (torch.optim.Adam([params[2]]), params[2]),
    ):
        handles = [opt.register_load_state_dict_pre_hook(pre)]
        handles.append(opt.register_load_state_dict_post_hook(post))
        opt.load_state_dict(source.state_dict())
        loaded.append((opt.param_groups[0]["lr"], dict(opt.state[p])))
        for handle in handles:
            handle.remove()
        opt.load_state_dict(source.state_dict())
        assert opt.param_groups[0]["lr"] == 0.1 and torch.equal(
            opt.state[p]["exp_avg"], source.state[params[0]]["exp_avg"]
        )
    (lr, ours), (torchs_lr, torchs) = loaded
    assert lr == torchs_lr == 0.25 and ours.keys() == torchs.keys()
    for key in ours:
        assert torch.equal(ours[key], torchs[key]), key
    refusing = ft.Adam([params[1]], lr=0.1)
    refusing.register_load_state_dict_pre_hook(
        lambda opt, sd: {**sd, "state": {0: {**sd["state"][0], "exp_avg": torch.zeros(5)}}}
    )
    with pytest.raises(ValueError, match="state 'exp_avg': expected shape"):
        refusing.load_state_dict(source.state_dict())


@pytest.mark.parametrize("name", ["Adam", "NAdam"])
def test_state_under_other_keys_than_parameters_is_kept_as_torchs(name):
    """What a user keeps in ``opt.state`` under a key that is no parameter (a global step
    count) is in state_dict() and loaded back as it is, both ways with torch's class, as
    torch's keeps it; a parameter id that no group lists is still refused."""
    p = torch.nn.Parameter(torch.randn(3))
    opt = getattr(ft, name)([p])
    p.grad = torch.ones(3)
    opt.step()
    opt.state["global_step"] = 5
    sd = opt.state_dict()
    assert sd["state"]["global_step"] == 5 and set(sd["state"]) == {0, "global_step"}
    for module in (ft, torch.optim):
        q = torch.nn.Parameter(torch.randn(3))
        other = getattr(module, name)([q])
        other.load_state_dict(sd)
        assert other.state["global_step"] == 5
        q.grad = torch.ones(3)
        other.step()
        assert getattr(ft, name)([q]).load_state_dict(other.state_dict()) is None
    with pytest.raises(ValueError, match="checkpoint has state for parameter id 3, which none"):
        opt.load_state_dict({**sd, "state": {**sd["state"], 3: {}}})


def test_state_taken_after_load_state_dict_stays_the_optimizers():
    """An entry taken from opt.state after load_state_dict is the optimizer's state at the
    next steps, as torch's: its "step" advances, and a tensor put in it is the one used."""
    p = torch.nn.Parameter(torch.randn(3))
    opt = ft.Adam([p], lr=0.1)
    p.grad = torch.ones(3)
    opt.step()
    opt.load_state_dict(opt.state_dict())
    entry = opt.state[p]
    opt.step()
    assert entry is opt.state[p] and float(entry["step"]) == 2.0
    entry["exp_avg"] = torch.zeros(3)
    opt.step()
    torch.testing.assert_close(opt.state[p]["exp_avg"], torch.full((3,), 0.1), rtol=0, atol=0)
