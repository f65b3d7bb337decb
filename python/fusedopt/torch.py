r"""Drop-in ``torch.optim`` optimizers for CPU tensors, running fusedopt's fused kernels on the
tensors' own memory.

>>> import fusedopt.torch
>>> opt = fusedopt.torch.AdamW(model.parameters(), lr=1e-3)   # was torch.optim.AdamW
>>> sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=1000)   # unchanged

Each class is a :class:`torch.optim.Optimizer` with the name, signature, defaults and
``param_groups`` of its ``torch.optim`` namesake (``Lion`` and ``Momentum``, which torch lacks,
take :mod:`fusedopt.optim`'s; ``ScheduleFreeAdamW`` and ``ScheduleFreeSGD`` the ``schedulefree``
package's ``AdamWScheduleFree`` and ``SGDScheduleFree``, names they also have here), so
schedulers, ``zero_grad``, ``add_param_group``, closures, the step hooks, ``state_dict`` and
the ``load_state_dict`` hooks work as with torch. Its update rule is that of the
:mod:`fusedopt.optim` class of the same name (the rule in LaTeX is in each function's
docstring, e.g. :func:`fusedopt.adamw_`); the hyperparameters are validated by that class and,
at construction, by torch's own class, so bad arguments raise torch's errors.

**Zero-copy.** Parameters and state are viewed as NumPy arrays once (``Tensor.numpy()``;
bfloat16 through its int16 bits and ``ml_dtypes.bfloat16``) and the views are kept. A step
issues one fused multi-tensor call per (group, dtype, step count): for a usual model, one call
per group. New gradients (after ``zero_grad()``) are not converted: one C++ pass of torch's own
tensor check (``TensorGuards``, as torch.compile guards its graphs' inputs) passes a call's
gradients, and their memory is lent to the kernel as it is; gradients that persist between
steps are viewed once; anything else takes a checked path that raises a clear error. The
kernels write the tensors' memory in place; nothing the size of the model is allocated by a
step.

**State** is torch tensors in torch's layout: ``state[p]["exp_avg"]``, ``"exp_avg_sq"``,
``"max_exp_avg_sq"``, ``"momentum_buffer"``, ``"sum"`` (Adagrad), ``"square_avg"``,
``"row_var"``/``"col_var"``/``"variance"`` (Adafactor), ``"mu_product"`` (NAdam), ... and
``"step"`` (not for Muon and
Schedule-Free, whose torch classes keep none) as a 0-d float32 tensor (float64 when torch's default
dtype is float64), so a ``state_dict()`` loads into the ``torch.optim`` class and the other way
round, and training continues as if it had not switched. The ``step`` tensors of the parameters of
one fused call are views into one small tensor, which the step advances with one operation. Fields
torch has no equivalent of:

- ``state[p]["master"]``: the float32 master weights (``master_weights=True``); a loaded
  master that is not float32 is dropped and made again from the parameter at the next step
  (torch's classes cast it to the parameter's dtype and carry it along without updating it:
  the steps they took are in the parameter);
- ``state[p]["<buffer>.codes"]`` (int8 or uint8) and ``"<buffer>.scales"`` (float32, one per
  256 elements) in place of ``"<buffer>"`` with ``state_dtype="int8"``
  (:class:`fusedopt.quantize.QuantizedState`); torch's classes cannot load these;
- ``state[p]["step"]`` for SGD and Momentum (torch's SGD keeps none), and for Muon with
  stochastic rounding or int8 state: the stochastic-rounding stream's step;
- ``state_dict()["fusedopt"]``: the storage options and the seed, and the count of skipped
  steps.

Options beyond torch's (keyword-only, as in :class:`fusedopt.optim.Optimizer`):
``master_weights``, ``state_dtype``, ``stochastic_rounding``, ``seed``, ``max_grad_norm``,
``skip_if_nonfinite``, ``impl``. torch's ``foreach`` and ``fused`` are accepted and change
nothing (the step is always one fused CPU call); ``capturable`` and ``differentiable`` must be
False.

Tensors must be dense, real (float32, float64, bfloat16, float16), contiguous and on the CPU:
anything else raises ``TypeError`` or ``ValueError`` naming the parameter. A lazy module's
parameters are taken before its dry run and checked at their first step (load the state after
it). Replacing a parameter's storage (``p.data = ...``) is noticed at the next step; state
tensors are updated in place, and state cleared, removed or given new tensors between steps is
what the next step uses, as torch's (missing state starts afresh; a dict assigned to
``state[p]`` is kept as a copy); a tensor's memory replaced behind it (``t.data = ...``) is not
seen. State whose dtype or shape does not fit its parameter (a buffer replaced, or the
parameter after ``model.double()``) is refused before anything is written, naming the
parameter and the key: convert the state too, or start it afresh (``del opt.state[p]``). With
``master_weights`` the update runs on the float32 masters (``state[p]["master"]``) and writes
the parameter from them: a change made to the parameter alone (in place, ``p.data = ...``, a
model's ``load_state_dict``) is overwritten at the next step; change the master too, or load
the optimizer's state as well.
A step bumps each updated parameter's autograd version, as torch's in-place updates do, so
that a graph built before it and used after it raises instead of using the new values.
"""

from __future__ import annotations

import collections
import copy
import functools
import inspect
import itertools
import operator
import warnings
import weakref
from typing import Any, Callable, Dict, List, Optional, Tuple

import ml_dtypes
import numpy as np

try:
    import torch
except ImportError as error:  # pragma: no cover - exercised only without torch
    raise ImportError("fusedopt.torch needs PyTorch: pip install 'fusedopt[torch]'") from error

from . import _matrix, _overlap, reference
from . import optim as _optim
from ._clip import clip_grad_norm_
from ._dispatch import core as _core
from ._functional import all_finite
from .quantize import BLOCK, QuantizedState

__all__ = ["CLASSES", "Optimizer"]  # and one class per fusedopt.optim class, below

# torch's keywords with no fusedopt counterpart: the values accepted. The step is always one
# fused call on CPU memory, so foreach and fused change nothing; CUDA graphs (capturable) and
# autograd through the step (differentiable) are not supported.
_TORCH_ONLY = {
    "foreach": (None, False, True),
    "fused": (None, False, True),
    "capturable": (False,),
    "differentiable": (False,),
}
# fusedopt's options beyond the hyperparameters, keyword-only after torch's arguments
_OPTIONS = {
    "master_weights": False,
    "state_dtype": None,
    "stochastic_rounding": False,
    "seed": 0,
    "max_grad_norm": None,
    "skip_if_nonfinite": False,
    "impl": None,
}
_TORCH_DTYPES = {
    torch.float32: "float32",
    torch.float64: "float64",
    torch.bfloat16: "bfloat16",
    torch.float16: "float16",
}
_FROM_NAME = {name: dtype for dtype, name in _TORCH_DTYPES.items()}
_data_ptr = torch.Tensor.data_ptr
_layout = operator.attrgetter("dtype", "shape", "strides")
_call = operator.methodcaller("__call__")
_grad = operator.attrgetter("grad")
_is_nested = operator.attrgetter("is_nested")
try:  # torch's C++ check of many tensors at once, the one torch.compile guards its graphs with
    from torch._C._dynamo.guards import TensorGuards as _TensorGuards
except ImportError:  # pragma: no cover - a torch without it: new gradients are viewed instead
    _TensorGuards = None


class _Memory:
    """Memory NumPy may view without owning it (a weakly referenced gradient's)."""

    __slots__ = ("__array_interface__",)


def _unowned(v: np.ndarray) -> np.ndarray:
    """A view of ``v``'s memory that holds no reference to its owner."""
    if v.size == 0:
        return v
    memory = _Memory()
    memory.__array_interface__ = {
        "data": (v.ctypes.data, False),
        "shape": (v.nbytes,),
        "typestr": "|u1",
        "version": 3,
    }
    return np.asarray(memory).view(v.dtype).reshape(v.shape)


def _numpy_refuses_zero_tensors() -> bool:
    """Whether ``Tensor.numpy()`` refuses a ZeroTensor (a zero view, with no memory). torch
    2.8 does not: its array is over memory the tensor does not have."""
    try:
        torch._efficientzerotensor((1,)).numpy()
    except RuntimeError:
        return True
    except AttributeError:  # pragma: no cover - a torch without ZeroTensors
        return True
    return False


if _numpy_refuses_zero_tensors():
    _tensor_numpy = torch.Tensor.numpy
else:

    def _tensor_numpy(t: torch.Tensor) -> np.ndarray:
        """``Tensor.numpy()``, refusing a ZeroTensor as later torch does."""
        if t._is_zerotensor():
            raise RuntimeError("Cannot convert a ZeroTensor to numpy: it has no memory to view")
        return t.numpy()


def _numpy(t: torch.Tensor) -> np.ndarray:
    """A NumPy view of a CPU tensor's memory (no copy); bfloat16 through its int16 bits."""
    if t.dtype == torch.bfloat16:
        return _tensor_numpy(t.view(torch.int16)).view(ml_dtypes.bfloat16)
    return _tensor_numpy(t)


def _scalar_dtype() -> torch.dtype:
    """torch's dtype for ``state["step"]`` (``torch.optim.optimizer._get_scalar_dtype``)."""
    return torch.float64 if torch.get_default_dtype() == torch.float64 else torch.float32


def _plain(value: Any) -> Any:
    """A hyperparameter as the kernels take it: tensors (torch allows lr and betas as
    tensors) as Python numbers, pairs as tuples."""
    if isinstance(value, torch.Tensor):
        return value.item()
    if isinstance(value, (tuple, list)):
        return tuple(_plain(v) for v in value)
    return value


def _check_kind(what: str, t: Any) -> None:
    """TypeError unless ``t`` is a dense tensor of a dtype fusedopt takes (on any device)."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{what}: expected a torch.Tensor, got {type(t).__name__}")
    if t.layout != torch.strided:
        raise TypeError(f"{what}: sparse tensors ({t.layout}) are not supported")
    if t.is_complex():
        raise TypeError(f"{what}: complex tensors ({t.dtype}) are not supported")
    if t.dtype not in _TORCH_DTYPES:
        raise TypeError(
            f"{what}: expected dtype float32, float64, bfloat16 or float16, got {t.dtype}"
        )


def _mismatch(
    what: str, dtype: torch.dtype, shape: Any, t: torch.Tensor, like: str, fix: str
) -> Exception:
    """The error for ``t`` not of ``dtype`` and ``shape`` (those of ``like``, "a float32
    (3,) parameter"): a TypeError where the dtype differs, else a ValueError."""
    name = operator.methodcaller("removeprefix", "torch.")
    return (TypeError if t.dtype != dtype else ValueError)(
        f"{what}: expected {name(str(dtype))} {tuple(shape)} for {like}, got "
        f"{name(str(t.dtype))} {tuple(t.shape)} ({fix})"
    )


def _described(p: torch.Tensor) -> str:
    """``p`` as _mismatch's ``like`` names a parameter: "a bfloat16 (4, 8) parameter"."""
    return f"a {str(p.dtype).removeprefix('torch.')} {tuple(p.shape)} parameter"


def _check_tensor(what: str, t: Any, written: bool = True) -> None:
    """TypeError/ValueError unless ``t`` is a tensor fusedopt can update in place (or read
    where it is: not ``written``)."""
    _check_kind(what, t)
    if t.device.type != "cpu":
        raise ValueError(
            f"{what}: on {t.device}; fusedopt.torch updates CPU tensors (for a model on an "
            "accelerator, keep the optimizer on the host: fusedopt.torch.CPUOffload)"
        )
    if not t.is_contiguous():
        why = (
            "it cannot be updated in place without a copy"
            if written
            else "fusedopt makes no hidden copies: pass t.contiguous()"
        )
        raise ValueError(
            f"{what}: expected a contiguous tensor, got strides {t.stride()} for shape "
            f"{tuple(t.shape)} ({why})"
        )


def _check_grad(what: str, g: torch.Tensor, p: torch.Tensor, storage: Any) -> None:
    """As _check_tensor, and a gradient the kernel can read where it is, like the parameter.
    One that requires grad (``backward(create_graph=True)``) is read as torch's step reads
    it, its values without the graph."""
    _check_tensor(what, g, written=False)
    if g.is_neg() or g._is_zerotensor():
        kind, fix = ("negative", "g.resolve_neg()") if g.is_neg() else ("zero", "torch.zeros")
        raise ValueError(
            f"{what}: a lazy {kind} view, whose memory does not hold its values (fusedopt "
            f"makes no hidden copies: pass {fix})"
        )
    if _TORCH_DTYPES[g.dtype] not in storage.grads or g.shape != p.shape:
        raise ValueError(
            f"{what}: expected {' or '.join(storage.grads)} {tuple(p.shape)} like the "
            f"parameter, got {g.dtype} {tuple(g.shape)}"
        )


class _Rebuild(Exception):
    """Raised within a step when a gradient's dtype differs from its call's."""


class _Call:
    """One fused call of a group: the parameters that share dtypes and step count, with
    their views, their state's views, and their ``step`` tensors (views of ``steps``); the
    gradients' dtype and per parameter their expected (shape, strides)."""

    __slots__ = (
        "index",
        "everyone",
        "params",
        "buffers",
        "steps",
        "extra",
        "grad_dtype",
        "convert",
        "layouts",
        "last",
        "kept",
        "guard",
        "tensors",
        "first",
    )

    def __init__(self, index, everyone, params, buffers, steps, extra, grad_dtype):
        self.index: List[int] = index
        self.everyone = everyone  # the group's every parameter, in order
        self.tensors: List[torch.Tensor] = []  # the call's parameters (set by _build)
        # the first parameter's place among the optimizer's (set by _build; seeds its bits)
        self.first = 0
        self.last: Optional[list] = None  # weak references to the last step's gradients
        self.kept: Optional[tuple] = None  # (weak references, views, data_ptrs) kept
        self.params: List[np.ndarray] = params
        self.buffers: Dict[str, list] = buffers
        self.steps: np.ndarray = steps
        self.extra: Any = extra
        self.grad_dtype = (
            np.dtype(ml_dtypes.bfloat16)
            if grad_dtype == torch.bfloat16
            else (np.dtype(_TORCH_DTYPES[grad_dtype]))
        )
        self.convert = _numpy if grad_dtype == torch.bfloat16 else _tensor_numpy
        size = self.grad_dtype.itemsize
        self.layouts = [
            (self.grad_dtype, v.shape, tuple(s // v.itemsize * size for s in v.strides))
            for v in params
        ]
        self.guard = _gradient_guard(grad_dtype, params)


def _gradient_guard(dtype: torch.dtype, params: List[np.ndarray]) -> Any:
    """torch's check that tensors are gradients a call's kernel may read where they are (its
    ``TensorGuards``, which torch.compile guards its graphs' inputs with): one C++ pass over
    them all, cheaper than one ``Tensor.numpy()``. A tensor passes if it is a plain
    ``torch.Tensor`` (no subclass) with the dispatch keys of a dense CPU tensor (not sparse,
    mkldnn, quantized, meta, a negative, conjugate or zero view, a functorch or functional
    wrapper, ...), ``dtype``, not requiring grad, its parameter's shape, C-contiguous (strides
    checked where a dimension has more than one element), and no other tensor of the call.
    None where torch has no such check: gradients are viewed instead."""
    if _TensorGuards is None:
        return None
    examples = {n: torch.empty((0,) * n, dtype=dtype) for n in {v.ndim for v in params}}
    strides = []
    for v in params:
        expected, step = [], 1
        for n in reversed(v.shape):
            expected.append(step if n != 1 and v.size else None)
            step *= n
        strides.append(expected[::-1])
    try:
        return _TensorGuards(
            *(examples[v.ndim] for v in params),
            dynamic_dims_sizes=[list(v.shape) for v in params],
            dynamic_dims_strides=strides,
        )
    except (TypeError, RuntimeError):  # pragma: no cover - another torch's signature
        return None


def _all_equal(values: np.ndarray) -> bool:
    """Whether a 1-D array's elements are equal: its bytes are the first one's, repeated."""
    return values.tobytes() == values[:1].tobytes() * len(values)


def _layout_guard(params: List[torch.Tensor]) -> Any:
    """torch's C++ check (``TensorGuards``) that tensors are of the types, dtypes, shapes,
    strides and dispatch keys that ``params`` have now; None where torch has none, or where
    one of them has no layout yet (a lazy module's: the group is built again once it has a
    gradient)."""
    if _TensorGuards is None:
        return None
    try:
        with torch._C.DisableTorchFunction():
            return _TensorGuards(
                *params,
                dynamic_dims_sizes=[list(p.shape) for p in params],
                dynamic_dims_strides=[list(p.stride()) for p in params],
            )
    except (TypeError, RuntimeError):  # pragma: no cover - another torch's signature
        return None


class _TrackedEntry(dict):
    """A parameter's state, a dict as torch keeps it, that counts each change in its
    optimizer's counter (``changes[0]``)."""

    __slots__ = ("changes",)

    def __init__(self, changes: List[int], *args: Any, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.changes = changes

    def __reduce__(self) -> Any:
        return _TrackedEntry, (self.changes, dict(self))


class _TrackedState(collections.defaultdict):
    """An optimizer's ``state``, torch's defaultdict of dicts, that counts each change to it or
    to a parameter's entry in ``changes[0]``: a step compares one count to see whether the
    state its calls view is still there. (A tensor's storage replaced in place, ``t.data =
    ...``, is not a change to the dicts: it is not seen.)"""

    def __init__(self, changes: List[int], items: Any = ()):
        super().__init__(functools.partial(_TrackedEntry, changes))
        self.changes = changes
        for key, value in items:
            dict.__setitem__(self, key, self._entry(value))

    def _entry(self, value: Any) -> Any:
        if isinstance(value, _TrackedEntry) and value.changes is self.changes:
            return value
        return _TrackedEntry(self.changes, value) if isinstance(value, dict) else value

    def __setitem__(self, key: Any, value: Any) -> None:
        self.changes[0] += 1
        super().__setitem__(key, self._entry(value))

    def update(self, *args: Any, **kwargs: Any) -> None:
        for key, value in dict(*args, **kwargs).items():
            self[key] = value

    def setdefault(self, key: Any, default: Any = None) -> Any:
        if key not in self:
            self[key] = default
        return self[key]

    def __ior__(self, other: Any) -> "_TrackedState":
        self.update(other)
        return self

    def __reduce__(self) -> Any:
        return _TrackedState, (self.changes, list(self.items()))


def _counting(name: str) -> Callable[..., Any]:
    """dict's method ``name``, counting a change first."""
    method = getattr(dict, name)

    @functools.wraps(method)
    def counted(self, *args: Any, **kwargs: Any) -> Any:
        self.changes[0] += 1
        return method(self, *args, **kwargs)

    return counted


for _name in ("__delitem__", "clear", "pop", "popitem"):
    setattr(_TrackedState, _name, _counting(_name))
for _name in (
    "__setitem__",
    "__delitem__",
    "__ior__",
    "clear",
    "pop",
    "popitem",
    "setdefault",
    "update",
):
    setattr(_TrackedEntry, _name, _counting(_name))


class _Group:
    """What a parameter group's step reuses: the fusedopt group of its hyperparameters, the
    data pointers and gradient pattern its calls were built for, and the calls."""

    __slots__ = ("group", "hyper", "ptrs", "layouts", "mask", "calls", "kernel")

    def __init__(self, group, hyper):
        self.group = group
        self.hyper = hyper
        self.ptrs: Optional[list] = None
        # torch's check that the parameters still have the shapes and strides the calls view
        # them with (``p.data`` replaced by a view at the same address); None where torch has
        # none
        self.layouts: Any = None
        self.mask: Optional[list] = None
        self.calls: Optional[List[_Call]] = None  # None: to be built at the next step
        # the kernel and state arrays the calls were built for: a hyperparameter that changes
        # them (momentum turned on, amsgrad, ...) rebuilds the calls; a new lr does not
        self.kernel: Any = None


class Optimizer(torch.optim.Optimizer):
    """Base of the adapters: a ``torch.optim.Optimizer`` whose step is a
    :mod:`fusedopt.optim` class's fused step on the tensors' memory.

    A subclass names ``fused_class`` (its :mod:`fusedopt.optim` class) and ``torch_class``
    (torch's class of the same name, or None); :func:`_adapter` builds every one from these.
    """

    fused_class: type = _optim.Optimizer
    torch_class: Optional[type] = None
    _signature: inspect.Signature
    #: the shape of the stand-in parameter the fusedopt instance is built on
    _probe_shape: Tuple[int, ...] = (1,)
    #: whether torch's checks need stand-ins of the parameters' shapes (Muon: 2-D only)
    _shaped_stand_ins = False
    #: whether the state has torch's ``"step"`` (torch's Muon keeps none)
    _keeps_step = True
    #: group entries beyond the hyperparameters, at their start (Schedule-Free's k, ...)
    _group_defaults: Dict[str, Any] = {}
    #: arguments of the peer's signature after the fusedopt class's (Schedule-Free's foreach)
    _extra_parameters: Tuple[inspect.Parameter, ...] = ()
    #: the class each adapter is a drop-in for, where torch has none (for the docstrings)
    _peers: Dict[str, str] = {"LAMB": "``pytorch_optimizer.Lamb``"}

    def __init__(self, params: Any, *args: Any, **kwargs: Any):
        bound = self._signature.bind(self, params, *args, **kwargs)
        bound.apply_defaults()
        arguments = dict(bound.arguments)
        del arguments["self"], arguments["params"]
        options = {k: arguments.pop(k) for k in _OPTIONS}
        for key, allowed in _TORCH_ONLY.items():
            if key in arguments and arguments[key] not in allowed:
                raise ValueError(
                    f"{type(self).__name__}: {key}={arguments[key]!r} is not supported "
                    f"(fusedopt.torch takes {' or '.join(map(repr, allowed))})"
                )
        if not isinstance(params, torch.Tensor):
            params = [_listed(item) for item in params]
        if self.torch_class is not None:
            # torch's own checks, with torch's errors, on stand-ins of the tensors in copies
            # of the groups (torch fills in their defaults); the instance is dropped
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                checked = self.torch_class(_stand_ins(params, self._shaped_stand_ins), **arguments)
            eager = bool(checked.state)  # torch's Adagrad creates its state at construction
        else:
            eager = False
        hyper = {k: _plain(v) for k, v in arguments.items() if k not in _TORCH_ONLY}
        # fusedopt's checks of the hyperparameters and options, on a stand-in parameter; the
        # instance's storage logic, group plans and fused update are what steps reuse
        probe = np.zeros(self._probe_shape, np.float32)
        self._fused = self.fused_class([probe], **hyper, **options)
        # whether a step may lend new gradients' memory to the kernel (_grad_views): where the
        # update hands the gradients to a fused kernel as they are
        self._borrows = (
            _TensorGuards is not None
            and type(self)._update in _PASS_THROUGH
            and type(self._fused)._update in _PASS_THROUGH
        )
        self._fused_keys = tuple(k for k in self._fused.defaults if k != "frozen")
        self._groups: Dict[int, _Group] = {}
        self._storage: Dict[torch.Tensor, Any] = {}
        self.skipped_steps = 0
        # the group keys torch's class has: its arguments, and what it fixes (AdamW's
        # decoupled_weight_decay), as the fusedopt class fixes it too
        fixed = {k: v for k, v in self._fused.defaults.items() if k != "frozen"}
        super().__init__(params, {**fixed, **self._group_defaults, **arguments})
        self._changes = [0]  # changes to the state, counted by _TrackedState
        self._built_at = -1  # the count when the calls were last built
        self.state = _TrackedState(self._changes, self.state.items())
        if eager:  # as torch's class, so that its state_dict has every parameter's state
            for group in self.param_groups:
                plan = self._fused._plan(self._hyper(group, {}))
                for p in filter(self._storage.__contains__, group["params"]):  # not lazy
                    for array, key in plan.arrays:
                        self._buffer(group, plan, array, key, p)
                    self.state[p]["step"] = torch.zeros((), dtype=_scalar_dtype())

    # ------------------------------------------------------------------ parameters

    def add_param_group(self, param_group: Dict[str, Any]) -> None:
        """torch's ``add_param_group``, after checking that fusedopt can update every tensor
        in place and every hyperparameter is valid for the kernel. A lazy module's
        uninitialized parameter (``torch.nn.LazyLinear``'s before its first forward pass) is
        checked at the first step that updates it, as its state is made then."""
        _listed(param_group)  # a generator is read once: torch stores a list too
        params = param_group["params"]
        params = [params] if isinstance(params, torch.Tensor) else list(params)
        index = len(self.param_groups)
        checked = []
        for i, p in enumerate(params):
            p = p[1] if isinstance(p, tuple) and len(p) == 2 else p  # (name, param)
            if torch.nn.parameter.is_lazy(p):
                continue  # no data yet: _build checks it, as it checks every parameter
            what = f"parameter {i} of group {index}"
            _check_tensor(what, p)
            checked.append((p, self._fused._storage_of(what, _numpy(p.detach()))))
        super().add_param_group(param_group)
        added = self.param_groups[-1]
        try:
            self._fused._plan(self._hyper(added, {}))  # fusedopt's validation of the group
        except (TypeError, ValueError):
            self.param_groups.pop()
            raise
        for p, storage in checked:
            self._storage[p] = storage

    def _hyper(self, group: Dict[str, Any], into: Dict[str, Any]) -> Dict[str, Any]:
        """The fusedopt group of a torch group's hyperparameters (updated in place, so that
        fusedopt's plan cache, keyed by the dict, holds)."""
        defaults = self._fused.defaults
        for key in self._fused_keys:
            into[key] = _plain(group.get(key, defaults[key]))
        into.setdefault("frozen", False)
        return into

    # ------------------------------------------------------------------ the step

    def step(self, closure: Optional[Callable[[], Any]] = None) -> Any:
        """One fused update of every parameter that has a gradient; returns the closure's
        loss (None without a closure).

        With ``skip_if_nonfinite``, a step whose gradients hold a NaN or an infinity changes
        nothing and is counted in ``skipped_steps``; with ``max_grad_norm`` the gradients are
        first clipped in place to that global L2 norm.
        """
        # Within torch.compile the step runs outside dynamo (NumPy and the kernels: nothing
        # to trace). Eagerly it is called directly: dynamo.disable's wrapper costs about as
        # much as converting 80 gradients, at every step.
        if torch.compiler.is_compiling():
            return _untraced_step(self, closure)
        return self._step(closure)

    def _step(self, closure: Optional[Callable[[], Any]]) -> Any:
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        fused = self._fused
        # new gradients are lent to the kernels, unless an option needs them as NumPy views
        borrow = (
            self._borrows
            and not fused.skip_if_nonfinite
            and fused.max_grad_norm is None
            and not self._reference_impl()
        )
        # the state this step creates (see _build), removed again if the step is refused or
        # skipped before a call writes: emptied once one has
        created: List[Tuple[torch.Tensor, Optional[set]]] = []
        try:
            self._run_step(borrow, created)
        except (TypeError, ValueError):  # refusals: raised before a kernel writes
            self._forget(created)
            raise
        return loss

    def _run_step(self, borrow: bool, created: list) -> None:
        fused = self._fused
        if self._state_changed():
            for entry in self._groups.values():
                entry.calls = None
        work = []  # every group is checked and converted before anything is written
        for group in self.param_groups:
            entry = self._entry(group)
            plan = fused._plan(self._hyper(group, entry.hyper))
            params = group["params"]
            grads = list(map(_grad, params))
            mask = list(map(operator.is_not, grads, itertools.repeat(None)))
            # those without a gradient are in no call (and a lazy one has no data yet)
            ptrs = [_data_ptr(p) if m else 0 for p, m in zip(params, mask)]
            kernel = (plan.declaration, plan.arrays)
            if (
                mask != entry.mask
                or ptrs != entry.ptrs
                or entry.calls is None
                or (kernel != entry.kernel)
                or not self._calls_agree(entry, params)
            ):
                self._build(entry, plan, grads, mask, ptrs, created)
            try:
                calls = [(c, self._grad_views(entry, c, grads, borrow)) for c in entry.calls]
            except _Rebuild:  # a gradient's dtype changed: regroup the calls
                self._build(entry, plan, grads, mask, ptrs, created)
                calls = [(c, self._grad_views(entry, c, grads, borrow)) for c in entry.calls]
            work.append((entry, plan, calls))
        self._built_at = self._changes[0]  # the builds' own changes included
        clipping = fused.max_grad_norm is not None
        checked = clipping or sum(len(calls) for _, _, calls in work) > 1
        if checked:
            self._check_step_overlap(work, clipping)
        views = [] if borrow else [v for _, _, calls in work for _, vs in calls for v in vs]
        if fused.skip_if_nonfinite:
            by_dtype: Dict[Any, List[np.ndarray]] = {}
            for v in views:
                by_dtype.setdefault(v.dtype, []).append(v)
            if not all(map(all_finite, by_dtype.values())):
                self.skipped_steps += 1
                self._forget(created)
                return
        if fused.max_grad_norm is not None and views:
            clip_grad_norm_(views, fused.max_grad_norm)
        for entry, plan, calls in work:
            for c, grad_views in calls:
                step = self._call_step(entry, c)
                try:
                    self._update(plan, c.params, grad_views, c.buffers, step, c.extra, c.first)
                except ValueError as error:
                    if not checked:  # a lone call: name the arrays the kernel refused
                        fused._relabel(error, lambda: self._check_step_overlap(work, False))
                    raise
                created.clear()  # written: kept whatever follows
                _increment_version(c.tensors)  # as an in-place update by torch would
                c.steps += 1
                if self._regroup_after(c):
                    entry.calls = None

    def _entry(self, group: Dict[str, Any]) -> _Group:
        entry = self._groups.get(id(group))
        if entry is None or entry.group is not group:
            entry = self._groups[id(group)] = _Group(group, {})
        return entry

    def _check_hyperparameters(self) -> None:
        """Every group's hyperparameters, as a step checks them first (CPUOffload checks them
        before it copies anything)."""
        for group in self.param_groups:
            self._fused._plan(self._hyper(group, self._entry(group).hyper))

    def _checked_storage(self, what: str, p: torch.Tensor, g: torch.Tensor) -> Any:
        """The storage of parameter ``p`` (``what``), after checking that a step can update it
        with the gradient ``g``."""
        _check_tensor(what, p)  # p.data may have been replaced since
        storage = self._fused._storage_of(what, _numpy(p.detach()))
        _check_grad(f"gradient of {what}", g, p, storage)
        return storage

    def _forget(self, created: List[Tuple[torch.Tensor, Optional[set]]]) -> None:
        """Remove the state a step created before it was refused or skipped: the keys each
        parameter's state lacked, or its entry; calls viewing it are built again."""
        if not created:
            return
        for p, keys in reversed(created):
            if keys is None:
                self.state.pop(p, None)
            else:
                for key in set(self.state[p]) - keys:
                    del self.state[p][key]
        created.clear()
        for entry in self._groups.values():
            entry.calls = None

    def _check_step_overlap(self, work: list, clipping: bool) -> None:
        """That no gradient shares memory with a parameter, state or master that a step of
        several fused calls writes. Each call checks its own arrays, but only when it runs: a
        later call's error would come after the earlier calls had written, and a gradient
        written by an earlier call would be read changed. With clipping, the gradients, which
        it scales in place, count as written too, even in a step of one call. The names are
        made only for the error."""
        gradients: List[Any] = []  # each call's views, or the Borrowed lending its memory
        arrays: List[np.ndarray] = []
        columns: list = []
        for entry, _, calls in work:
            for c, views in calls:
                gradients += [views] if isinstance(views, _core.Borrowed) else views
                _overlap.add_column(arrays, columns, ("parameter", entry), c.index, c.params)
                for key, xs in c.buffers.items():
                    label = (f"state {key!r} of parameter", entry)
                    _overlap.add_column(arrays, columns, label, c.index, xs)
        read = sum(len(c.index) for _, _, calls in work for c, _ in calls)
        extents = _overlap.byte_extents(gradients + arrays)
        written = np.arange(len(extents)) >= (0 if clipping else read)
        pair = _overlap.first_overlap(extents, written)
        if pair is not None:
            groups = {id(entry): self._index(entry.group) for entry, _, _ in work}
            labels = [
                f"gradient of parameter {i} of group {groups[id(entry)]}"
                for entry, _, calls in work
                for c, _ in calls
                for i in c.index
            ]
            labels += [
                f"{what} {i} of group {groups[id(entry)]}"
                for (what, entry), i in _overlap.names(columns)
            ]
            raise ValueError(
                f"{labels[pair[0]]} and {labels[pair[1]]} share memory; an array that a step "
                "writes must not overlap any other"
            )

    def _grad_views(self, entry: _Group, call: _Call, grads: list, borrow: bool = False) -> Any:
        """The gradients of a call as its kernel takes them. Gradients that persist between
        steps: the views kept of them. New ones, with ``borrow``: their memory, lent to the
        kernel as it is (``_core._borrow``: no array made per gradient) once torch's check of
        the call's gradients (``call.guard``) passed them all. Else NumPy views of their
        memory, in two loops in C: the conversions, and the comparison of each view's (dtype,
        shape, strides) with the parameter's; anything else takes the checked path, which
        raises the clear errors."""
        chosen = grads if call.everyone else [grads[i] for i in call.index]
        kept = call.kept
        if (
            kept is not None
            and all(map(operator.is_, chosen, map(_call, kept[0])))
            and list(map(_data_ptr, chosen)) == kept[2]
        ):
            # the same gradient tensors, on the same memory, as when kept; they are the last
            # step's now (else two alternating sets of gradients would rebuild the kept views
            # every other step)
            call.last = kept[0]
            return kept[1]
        views = None
        if borrow and call.guard is not None:
            # no torch function mode answers for the tensors here; a nested tensor, whose
            # strides throw in C++, never reaches the guard (it would abort the process)
            with torch._C.DisableTorchFunction():
                if not any(map(_is_nested, chosen)) and call.guard.check(*chosen):
                    views = _core._borrow(chosen, call.params, call.grad_dtype)
        if views is None:
            try:
                views = list(map(call.convert, chosen))
            except (RuntimeError, TypeError):
                views = None
            if views is None or list(map(_layout, views)) != call.layouts:
                views = [self._checked_grad(entry, call, i, grads[i]) for i in call.index]
        refs = list(map(weakref.ref, chosen))
        if call.last is not None and all(map(operator.is_, chosen, map(_call, call.last))):
            # Persistent gradients (zero_grad(set_to_none=False), accumulation): keep views
            # that do not own the tensors, so that a later zero_grad() still frees them;
            # they are used only while the same tensors, alive, have the same data_ptr.
            arrays = views if isinstance(views, list) else list(map(call.convert, chosen))
            call.kept = (refs, list(map(_unowned, arrays)), list(map(_data_ptr, chosen)))
        call.last = refs
        return views

    def _checked_grad(self, entry: _Group, call: _Call, i: int, g: torch.Tensor) -> np.ndarray:
        """The view of a gradient that the fast path did not take, or a clear error."""
        p = entry.group["params"][i]
        what = f"gradient of parameter {i} of group {self._index(entry.group)}"
        _check_grad(what, g, p, self._storage[p])
        v = _numpy(g.detach())
        if v.dtype != call.grad_dtype:
            raise _Rebuild
        if not v.flags.c_contiguous:  # torch's contiguity and NumPy's differ in corner cases
            raise ValueError(f"{what}: expected a contiguous tensor, got strides {g.stride()}")
        return v

    def _index(self, group: Dict[str, Any]) -> int:
        return next(i for i, g in enumerate(self.param_groups) if g is group)

    def _offset(self, group: Dict[str, Any]) -> int:
        """The place of the group's first parameter among the optimizer's (which keys its
        random bits)."""
        return sum(len(g["params"]) for g in self.param_groups[: self._index(group)])

    def _build(self, entry: _Group, plan, grads: list, mask: list, ptrs: list, created) -> None:
        """The group's fused calls: its parameters with a gradient, by (dtypes, step, extra),
        with their state created on first use and viewed once. ``created`` gets (parameter,
        the keys its state had, or None for no entry) for each, before its state is touched."""
        group = entry.group
        keys: Dict[Tuple[Any, ...], List[int]] = {}
        for i, (p, g) in enumerate(zip(group["params"], grads)):
            if g is None:
                continue
            created.append((p, set(self.state[p]) if p in self.state else None))
            what = f"parameter {i} of group {self._index(group)}"
            self._storage[p] = self._checked_storage(what, p, g)
            state = self.state[p]
            step = int(state["step"]) if "step" in state else 0
            keys.setdefault((p.dtype, g.dtype, step, self._call_key(group, state)), []).append(i)
        calls = []
        offset = self._offset(group)
        for (_, g_dtype, step, extra), index in keys.items():
            params = [group["params"][i] for i in index]
            steps = torch.full((len(index),), float(step), dtype=_scalar_dtype())
            buffers = self._call_buffers(group, plan, params)
            if self._keeps_step:
                for j, p in enumerate(params):
                    self.state[p]["step"] = steps[j]
            views = [_numpy(p.detach()) for p in params]
            everyone = index == list(range(len(group["params"])))
            call = _Call(index, everyone, views, buffers, steps.numpy(), extra, g_dtype)
            call.tensors, call.first = params, offset + index[0]
            self._built(group, call)
            calls.append(call)
        entry.calls, entry.mask, entry.ptrs = calls, mask, ptrs
        entry.kernel = (plan.declaration, plan.arrays)
        entry.layouts = _layout_guard(group["params"])

    def _calls_agree(self, entry: _Group, params: list) -> bool:
        """Whether the group's calls still hold for its parameters: each has the shape and
        strides its views were made with, and each call's parameters still share their step
        count (a ``"step"`` tensor is a view of its call's ``steps``, which an in-place
        change such as ``state[p]["step"].zero_()`` changes for that parameter alone)."""
        if entry.layouts is not None:
            with torch._C.DisableTorchFunction():
                if not entry.layouts.check(*params):
                    return False
        for call in entry.calls:
            if len(call.index) > 1 and not (_all_equal(call.steps) and self._extra_agrees(call)):
                return False
        return True

    def _extra_agrees(self, call: _Call) -> bool:
        """Whether what else a call's parameters share (``_call_key``), where each keeps a
        view of it in its state, is still equal for them all."""
        return True

    def _state_changed(self) -> bool:
        """Whether the state changed since the last step's calls were built: ``self.state``
        replaced (then tracked again), or any change through it (``opt.state.clear()``,
        ``opt.state[p] = {}``, ``opt.state[p]["exp_avg"] = t``), which _TrackedState counts.
        The calls are then built again, as torch's step would see the change: missing state
        starts afresh, new tensors are viewed."""
        state = self.state
        if type(state) is not _TrackedState or state.changes is not self._changes:
            self.state = _TrackedState(self._changes, state.items())
            return True
        return self._changes[0] != self._built_at

    def _call_buffers(self, group, plan, params: List[torch.Tensor]) -> Dict[str, list]:
        """The state views of a fused call's parameters, by state key."""
        buffers: Dict[str, list] = {}
        for array, key in plan.arrays:
            buffers[key] = [self._buffer(group, plan, array, key, p) for p in params]
        if self._storage[params[0]].master:
            buffers["master"] = [self._master(group, p) for p in params]
        return buffers

    def _call_key(self, group: Dict[str, Any], state: Dict[str, Any]) -> Any:
        """What else must be equal for parameters to share a fused call (the fusedopt
        class's rule); truthy: the calls are regrouped after the step."""
        return self._fused._call_key(group, state)

    def _built(self, group: Dict[str, Any], call: _Call) -> None:
        """Finish a call _build made (its parameters' state exists): state kept per call."""

    def _regroup_after(self, call: _Call) -> bool:
        """Whether the calls are built again after this one ran: after SGD's first momentum
        step (a truthy ``extra``), the next ones are ordinary."""
        return bool(call.extra)

    def _call_step(self, entry: _Group, call: _Call) -> int:
        """The step count a call's update takes: its parameters' steps so far, plus one."""
        return int(call.steps[0]) + 1

    def _update(self, plan, params, grads, buffers, step: int, extra: Any, first: int) -> None:
        """One fused call (the fusedopt class's)."""
        self._fused._update(plan, params, grads, buffers, step, extra, first)

    def _reference_impl(self) -> bool:
        """Whether the fusedopt instance computes with fusedopt.reference."""
        return self._fused._reference_impl()

    def _state_shape(self, key: str, p: torch.Tensor) -> Tuple[int, ...]:
        """The shape of state ``key`` of ``p``: the parameter's, unless factored."""
        return tuple(p.shape)

    def _buffer(self, group, plan, array: str, key: str, p: torch.Tensor) -> Any:
        """The NumPy view (or QuantizedState of views) of state buffer ``key`` of ``p``,
        created at its initial value if it does not exist."""
        state, storage = self.state[p], self._storage[p]
        if storage.state == "int8":
            codes, scales = f"{key}.codes", f"{key}.scales"
            if codes not in state and scales not in state:
                start = self._fused._new_buffer(group, plan, array, key, _numpy(p.detach()), "int8")
                state[codes] = torch.from_numpy(start.codes)
                state[scales] = torch.from_numpy(start.scales)
            signed = self._fused._signed_codes(plan, array)
            shape = tuple(p.shape)
            c = self._checked_state(group, p, codes, torch.int8 if signed else torch.uint8, shape)
            blocks = (-(-p.numel() // BLOCK),)
            return QuantizedState(
                c.numpy(), self._checked_state(group, p, scales, torch.float32, blocks).numpy()
            )
        dtype = _FROM_NAME[storage.state]
        if key not in state:
            state[key] = torch.full_like(p, self._fused._init_buffer(group, key), dtype=dtype)
        return _numpy(self._checked_state(group, p, key, dtype, self._state_shape(key, p)))

    def _master(self, group: Dict[str, Any], p: torch.Tensor) -> np.ndarray:
        state = self.state[p]
        if "master" not in state:
            state["master"] = p.detach().to(torch.float32, copy=True)
        return _numpy(self._checked_state(group, p, "master", torch.float32, tuple(p.shape)))

    def _checked_state(self, group, p: torch.Tensor, key: str, dtype, shape) -> torch.Tensor:
        """State ``key`` of ``p``, checked to be what the kernel takes for the parameter's
        storage (dtype, shape, a contiguous CPU tensor) as the step's calls are built: the
        kernel's own check would come only when its call runs, after the earlier calls had
        written. Its errors name the parameter (the name is made only for an error)."""
        state = self.state[p]
        t = state.get(key)
        if (
            isinstance(t, torch.Tensor)
            and t.dtype == dtype
            and t.shape == shape
            and t.layout == torch.strided
            and t.device.type == "cpu"
            and t.is_contiguous()
        ):
            return t
        what = f"state {key!r} of {self._name(group, p)}"
        if key not in state:  # the other half of an int8 buffer is there
            raise ValueError(f"{what}: missing (int8 state is codes and scales together)")
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{what}: expected a torch.Tensor, got {type(t).__name__}")
        if t.dtype != dtype or t.shape != shape:
            # e.g. model.double() between steps: torch's step refuses mixed dtypes too
            raise _mismatch(
                what,
                dtype,
                shape,
                t,
                _described(p),
                "a parameter changed since its state was made needs its state converted too, "
                "or started afresh: del opt.state[p]",
            )
        if dtype in _TORCH_DTYPES:
            _check_tensor(what, t)
        raise ValueError(f"{what}: expected a contiguous CPU tensor")

    def _name(self, group: Dict[str, Any], p: torch.Tensor) -> str:
        """``p`` as errors name it: "parameter 1 of group 0"."""
        i = next(i for i, q in enumerate(group["params"]) if q is p)
        return f"parameter {i} of group {self._index(group)}"

    # ------------------------------------------------------------------ state

    def __getstate__(self) -> Dict[str, Any]:
        """Everything but the cached views (rebuilt at the next step): torch's keeps only
        ``defaults``, ``state`` and ``param_groups``, which would lose the fusedopt class."""
        state = dict(self.__dict__)
        state["_groups"] = {}
        fused = state["_fused"] = copy.copy(self._fused)
        fused._plans = {}  # validated plans, which hold the kernels: made again when needed
        return state

    def state_dict(self) -> Dict[str, Any]:
        """torch's ``state_dict`` (the state tensors themselves, not copies, as torch's), with
        fusedopt's options under ``"fusedopt"``."""
        sd = super().state_dict()
        # plain dicts, as torch's; what else its state holds (opt.state["epoch"] = 3), as it is
        sd["state"] = {i: dict(s) if isinstance(s, dict) else s for i, s in sd["state"].items()}
        sd["fusedopt"] = {
            **self._fused._storage_options(),
            "skipped_steps": self.skipped_steps,
        }
        return sd

    def load_state_dict(self, state_dict: Dict[str, Any]) -> None:
        """torch's ``load_state_dict`` (from this class or torch's), then the state in the
        dtypes this optimizer keeps (torch casts floating state to the parameter's dtype,
        which would round float32 masters and state of bfloat16 parameters), as copies. A
        master that is not float32 (torch's cast) is dropped: made again from the parameter.
        As torch's, the load pre-hooks run first (what they return is what is checked and
        loaded), the post-hooks once the state is in place."""
        state_dict = state_dict.copy()  # shallow, as torch's: a pre-hook may change it
        for hook in self._optimizer_load_state_dict_pre_hooks.values():
            result = hook(self, state_dict)
            if result is not None:
                state_dict = result
        self._load(state_dict)
        for hook in self._optimizer_load_state_dict_post_hooks.values():
            hook(self)

    def _load(self, state_dict: Dict[str, Any]) -> None:
        """load_state_dict after its pre-hooks: everything checked first, then loaded."""
        options = state_dict.get("fusedopt", {})
        for key in ("state_dtype", "master_weights"):
            if key not in options:
                continue
            _optim._check_same_storage(key, options[key], getattr(self._fused, key))
        # the options it restores, checked before anything changes
        stochastic_rounding = options.get("stochastic_rounding", self._fused.stochastic_rounding)
        _optim._check_flag("stochastic_rounding", stochastic_rounding)
        _optim._check_seed(options.get("seed", self._fused.seed))
        skipped_steps = _optim._skipped_steps(options.get("skipped_steps", 0))
        # the state as this optimizer keeps it, checked before torch's load changes anything
        # (torch's own checks of the groups come first in it: a mismatch raises there)
        saved_groups = state_dict["param_groups"]
        layouts: Dict[torch.Tensor, Dict[str, Any]] = {}
        extras: Dict[Any, Any] = {}  # state kept under other keys than parameters, as torch's
        if len(saved_groups) == len(self.param_groups) and all(
            len(s["params"]) == len(g["params"]) for s, g in zip(saved_groups, self.param_groups)
        ):
            saved_ids = [i for g in saved_groups for i in g["params"]]
            params = [p for g in self.param_groups for p in g["params"]]
            by_param = dict(zip(saved_ids, params))
            signed: Dict[torch.Tensor, Dict[str, bool]] = {p: {} for p in params}
            for group in self.param_groups if self._fused.state_dtype == "int8" else ():
                plan = self._fused._plan(self._hyper(group, {}))
                keys = {k: self._fused._signed_codes(plan, a) for a, k in plan.arrays}
                signed.update({p: keys for p in group["params"]})
            for saved_id, saved in state_dict["state"].items():
                if saved_id not in by_param and not isinstance(saved_id, int):
                    extras[saved_id] = saved  # torch keeps it as it is
                    continue
                if saved_id not in by_param:
                    raise ValueError(
                        f"checkpoint has state for parameter id {saved_id!r}, which none of "
                        "its param_groups lists"
                    )
                p = by_param[saved_id]
                try:
                    layouts[p] = self._layout(p, saved, signed[p])
                except ValueError as error:
                    raise ValueError(f"checkpoint parameter {saved_id!r}: {error}") from None
        # torch's load of the groups, its hooks left out (they run around this one); the state
        # is this one's: torch would cast every state tensor to its param's dtype first (int8
        # codes to float32, four times their bytes), only for this to replace them
        hooks = (
            self._optimizer_load_state_dict_pre_hooks,
            self._optimizer_load_state_dict_post_hooks,
        )
        self._optimizer_load_state_dict_pre_hooks = collections.OrderedDict()
        self._optimizer_load_state_dict_post_hooks = collections.OrderedDict()
        try:
            super().load_state_dict({**state_dict, "state": {}})
        finally:
            self._optimizer_load_state_dict_pre_hooks = hooks[0]
            self._optimizer_load_state_dict_post_hooks = hooks[1]
        # tracked now, as the step would make them: else it would wrap copies of the entries,
        # and those the caller took from opt.state after the load would no longer be its state
        self.state = _TrackedState(self._changes, self.state.items())
        for p, entry in layouts.items():
            self.state[p] = entry
        self.state.update(extras)
        self._fused.seed = int(options.get("seed", self._fused.seed))
        self._fused.stochastic_rounding = bool(stochastic_rounding)
        self.skipped_steps = skipped_steps
        self._groups.clear()

    def _layout(
        self, p: torch.Tensor, saved: Dict[str, Any], signed_codes: Dict[str, bool]
    ) -> Dict[str, Any]:
        """A loaded state entry as this optimizer keeps it: copies, in its dtypes.
        ``signed_codes``: whether the int8 form of each state buffer of ``p``'s plan has
        signed codes."""
        storage = self._storage.get(p)
        if storage is None:  # a lazy module's parameter, not stepped yet
            if torch.nn.parameter.is_lazy(p):
                raise ValueError(
                    "uninitialized (a lazy module's): run a forward pass before loading the "
                    "optimizer's state"
                )
            _check_tensor("the parameter", p)
            storage = self._fused._storage_of("the parameter", _numpy(p.detach()))
        entry: Dict[str, Any] = {}
        for key, value in saved.items():
            if value is None:
                continue  # torch's SGD may keep None
            if not isinstance(value, torch.Tensor):
                value = torch.tensor(value)
            if key == "step":
                if self._keeps_step:
                    _optim._steps_taken(value.item() if value.numel() == 1 else None, value)
                    entry[key] = value.detach().to(_scalar_dtype(), copy=True).reshape(())
                continue
            if key.endswith(".codes") or key.endswith(".scales"):
                dtype = value.dtype
            elif key == "master":
                if value.dtype != torch.float32:
                    # cast by torch's class, which carries it along without updating it: the
                    # steps taken since are in the parameter, which the next step starts from
                    continue
                dtype = torch.float32
            else:
                if storage.state == "int8":
                    raise ValueError(
                        f"state {key!r}: this optimizer keeps int8 state ({key}.codes, "
                        f"{key}.scales), the checkpoint {value.dtype}"
                    )
                dtype = _FROM_NAME[storage.state]
            if key.endswith(".scales"):
                scales = value.detach().to("cpu", copy=True).contiguous()
                if scales.dtype != torch.float32 or scales.dim() != 1:
                    raise ValueError(f"state {key!r}: expected 1-D float32 scales")
                blocks = -(-p.numel() // BLOCK)
                if scales.numel() != blocks:
                    raise ValueError(
                        f"state {key!r}: expected {blocks} scales (one per {BLOCK} elements), "
                        f"got {scales.numel()}"
                    )
                _optim._check_scales(f"state {key!r}", scales.numpy())
                entry[key] = scales
                continue
            if key.endswith(".codes"):
                signed = signed_codes.get(key[: -len(".codes")])
                if signed is not None and dtype != (torch.int8 if signed else torch.uint8):
                    raise ValueError(
                        f"state {key!r}: expected {'int8' if signed else 'uint8'} codes, got "
                        f"{dtype}"
                    )
            expected = self._state_shape(key, p)
            if tuple(value.shape) != expected:
                raise ValueError(
                    f"state {key!r}: expected shape {expected}, got {tuple(value.shape)}"
                )
            entry[key] = value.detach().to("cpu", dtype, copy=True).contiguous()
        # int8 state is codes and scales together: either alone would fail every step
        for key in entry:
            base, _, half = key.rpartition(".")
            other = {"codes": ".scales", "scales": ".codes"}.get(half)
            if base and other is not None and base + other not in entry:
                raise ValueError(f"state {key!r} without {base + other!r}")
        if "step" not in entry and entry and self._keeps_step:
            entry["step"] = torch.zeros((), dtype=_scalar_dtype())
        return entry


@torch._dynamo.disable
def _untraced_step(optimizer: Optimizer, closure: Optional[Callable[[], Any]]) -> Any:
    return optimizer._step(closure)


@functools.lru_cache(maxsize=64)
def _mu_products(step: int, beta1: float, momentum_decay: float, dtype) -> torch.Tensor:
    """torch.optim.NAdam's ``mu_product`` after ``step`` steps with this beta1 throughout:
    the product of the momentum coefficients, accumulated as torch does in ``dtype``."""
    product = torch.ones((), dtype=dtype)
    for t in range(1, step + 1):
        product *= beta1 * (1.0 - 0.5 * (0.96 ** (t * momentum_decay)))
    return product


def _increments_lists() -> bool:
    """Whether torch.autograd.graph.increment_version takes a list (later torch) or only one
    tensor."""
    try:
        torch.autograd.graph.increment_version([torch.zeros(1)])
    except (TypeError, AttributeError):
        return False
    return True


if _increments_lists():
    _increment_version = torch.autograd.graph.increment_version
else:

    def _increment_version(tensors: List[torch.Tensor]) -> None:
        for t in tensors:
            torch.autograd.graph.increment_version(t)


def _listed(item: Any) -> Any:
    """A group dict with its params as a list where they are an iterator (such as
    ``module.parameters()``), since both torch's checks and the optimizer read them; anything
    else as it is."""
    if isinstance(item, dict):
        inner = item.get("params")
        if inner is not None and iter(inner) is inner:  # an iterator; torch refuses a set
            item["params"] = list(inner)
    return item


def _stand_ins(params: Any, shaped: bool = False) -> Any:
    """``params`` with each tensor replaced by an empty one of its dtype and device (the same
    one for the same tensor), for torch's checks: torch's Adagrad, for one, allocates its
    state at construction. ``shaped``: of the tensor's shape instead, one element broadcast
    (for torch's Muon, which checks the parameters' dimensions)."""
    if isinstance(params, torch.Tensor):
        return params
    memo: Dict[int, torch.Tensor] = {}

    def stand_in(p: Any) -> Any:
        if isinstance(p, tuple) and len(p) == 2:
            return (p[0], stand_in(p[1]))
        if not isinstance(p, torch.Tensor):
            return p
        if id(p) not in memo:
            memo[id(p)] = (
                torch.empty((), dtype=p.dtype, device=p.device).expand(p.shape)
                if shaped and not torch.nn.parameter.is_lazy(p)  # a lazy one has no shape
                else torch.empty(0, dtype=p.dtype, device=p.device)
            )
        return memo[id(p)]

    out = []
    for item in params:
        if isinstance(item, dict):
            group = dict(item)
            inner = group.get("params")
            if isinstance(inner, torch.Tensor):
                group["params"] = stand_in(inner)
            elif inner is not None:
                group["params"] = [stand_in(p) for p in inner]
            out.append(group)
        else:
            out.append(stand_in(item))
    return out


def _adapter(
    name: str, fused_class: type, torch_class: Optional[type], base: type = Optimizer
) -> type:
    """The adapter of ``fused_class``: torch's signature where torch has the class (its
    hyperparameters come from torch's signature, and :mod:`fusedopt.optim`'s classes take
    torch's names), else the fusedopt class's; fusedopt's options keyword-only after them."""
    source = torch_class.__init__ if torch_class is not None else fused_class.__init__
    P = inspect.Parameter
    parameters = [
        p
        for p in inspect.signature(source).parameters.values()
        if p.kind in (P.POSITIONAL_OR_KEYWORD, P.KEYWORD_ONLY, P.POSITIONAL_ONLY)
    ]
    parameters += list(base._extra_parameters)
    parameters += [P(k, P.KEYWORD_ONLY, default=v) for k, v in _OPTIONS.items()]
    signature = inspect.Signature(parameters)
    rule = f":func:`fusedopt.{fused_class.kernel or name.lower()}_`"
    doc = (
        f"{name} on CPU tensors with fusedopt's fused kernel ({rule}; "
        f":class:`fusedopt.optim.{name}`), a drop-in for "
        + (
            f"``torch.optim.{name}``"
            if torch_class is not None
            else base._peers.get(name, "a torch.optim optimizer")
        )
        + ".\n\n"
        + inspect.cleandoc(fused_class.__doc__ or "")
        + ("\n\n" + inspect.cleandoc(base.__doc__) if base is not Optimizer else "")
        + "\n\nSee :mod:`fusedopt.torch` for the state layout and the options."
    )
    cls = type(
        name,
        (base,),
        {
            "fused_class": fused_class,
            "torch_class": torch_class,
            "_signature": signature,
            "__doc__": doc,
            "__module__": __name__,
        },
    )
    cls.__init__ = _init_with_signature(signature)
    return cls


def _init_with_signature(signature: inspect.Signature) -> Callable[..., None]:
    def __init__(self, params, *args, **kwargs):
        Optimizer.__init__(self, params, *args, **kwargs)

    __init__.__signature__ = signature
    return __init__


# The fusedopt.optim classes adapted: the element-wise ones, whose state buffers have their
# parameter's shape and which step through optim.Optimizer's generic step (what the adapter's
# calls, views and torch-layout state assume). Classes with factored state, their own step or
# parameters of one rank only have an adapter base of their own (MATRIX, SCHEDULE_FREE below).
ELEMENTWISE = (
    "SGD",
    "Momentum",
    "Adam",
    "AdamW",
    "Adamax",
    "NAdam",
    "RAdam",
    "Adagrad",
    "RMSprop",
    "Lion",
    "LAMB",
)


class _MuonAdapter(Optimizer):
    """As torch's Muon: every parameter must be 2-D (ValueError otherwise, at construction
    and in ``add_param_group``); the state is ``momentum_buffer`` only, no ``"step"``, unless
    stochastic rounding or int8 state needs one for its random stream (as SGD's)."""

    _probe_shape = (1, 1)
    _shaped_stand_ins = True

    @property
    def _keeps_step(self) -> bool:  # type: ignore[override]
        fused = self._fused
        return fused.stochastic_rounding or fused.state_dtype == "int8"

    def _load(self, state_dict: Dict[str, Any]) -> None:
        """As the base's, with the checkpoint's stochastic-rounding option in force while the
        state is laid out: whether it keeps its ``"step"`` depends on it."""
        fused, before = self._fused, self._fused.stochastic_rounding
        fused.stochastic_rounding = bool(
            state_dict.get("fusedopt", {}).get("stochastic_rounding", before)
        )
        try:
            super()._load(state_dict)
        except BaseException:
            fused.stochastic_rounding = before
            raise


class _AdafactorAdapter(Optimizer):
    """State as torch's Adafactor: ``"step"``, and ``row_var`` (the last dimension 1) and
    ``col_var`` (the second-to-last 1) for parameters of 2 or more dimensions, else
    ``variance`` (the parameter's shape); float32 for bfloat16 and float16 parameters, where
    torch keeps the gradient's dtype (a checkpoint's are converted on loading)."""

    def _state_shape(self, key: str, p: torch.Tensor) -> Tuple[int, ...]:
        return tuple(_matrix.adafactor_state_shapes(tuple(p.shape)).get(key, p.shape))

    def _call_buffers(self, group, plan, params: List[torch.Tensor]) -> Dict[str, list]:
        buffers: Dict[str, list] = {"row_var": [], "col_var": [], "variance": []}
        for p in params:
            state, dtype = self.state[p], _FROM_NAME[self._storage[p].state]
            shapes = _matrix.adafactor_state_shapes(tuple(p.shape))
            for key, views in buffers.items():
                if key not in shapes:
                    views.append(None)
                    continue
                if key not in state:
                    state[key] = torch.zeros(shapes[key], dtype=dtype)
                views.append(_numpy(self._checked_state(group, p, key, dtype, shapes[key])))
        if self._storage[params[0]].master:
            buffers["master"] = [self._master(group, p) for p in params]
        return buffers

    def _update(self, plan, params, grads, buffers, step: int, extra: Any, first: int) -> None:
        masters = buffers.get("master")
        self._fused._step_factored(plan, params, grads, buffers, masters, step, first)


class _NAdamAdapter(Optimizer):
    r"""As torch's NAdam: the state keeps ``mu_product``, a 0-d tensor in torch's scalar dtype
    (float32, float64 where that is the default dtype) that each step multiplies by its
    :math:`\mu_t`, as torch's does; so with beta1 changed during training (a one-cycle
    schedule's momentum) the steps are torch's. A state without it (a fusedopt checkpoint
    written before it was kept) continues from the product of its step with the current
    beta1."""

    def _call_key(self, group: Dict[str, Any], state: Dict[str, Any]) -> Any:
        # parameters whose products are equal share a call, and step together from then on
        product = state.get("mu_product")
        return None if product is None else float(product)

    def _built(self, group: Dict[str, Any], call: _Call) -> None:
        # the call's products in one tensor, each parameter's state["mu_product"] a view of it
        # (as its "step" is of call.steps): a step multiplies them all at once
        dtype = _scalar_dtype()
        products = torch.empty(len(call.tensors), dtype=dtype)
        for j, p in enumerate(call.tensors):
            product = self.state[p].get("mu_product")
            if product is None:
                beta1 = float(_plain(group["betas"])[0])
                step = int(call.steps[j])
                product = _mu_products(step, beta1, float(group["momentum_decay"]), dtype)
            products[j] = product
            self.state[p]["mu_product"] = products[j]
        call.extra = products

    def _regroup_after(self, call: _Call) -> bool:
        return False

    def _extra_agrees(self, call: _Call) -> bool:
        return _all_equal(call.extra.numpy())  # a state's "mu_product" changed in place

    def _update(self, plan, params, grads, buffers, step: int, products, first: int) -> None:
        beta1, psi = plan.hyper["beta1"], plan.hyper["momentum_decay"]
        after = products * (beta1 * (1.0 - 0.5 * (0.96 ** (step * psi))))  # torch's mu_t
        self._fused._update(plan, params, grads, buffers, step, after[0].item(), first)
        products.copy_(after)

    def state_dict(self) -> Dict[str, Any]:
        """As the base's; a state loaded without ``mu_product`` and not stepped since gets it
        derived, as its next step will, so that torch's NAdam loads it."""
        sd = super().state_dict()
        by_id = {i: g for g in sd["param_groups"] for i in g["params"]}
        for i, s in sd["state"].items():
            if i in by_id and "step" in s and "mu_product" not in s:
                group = by_id[i]
                beta1, psi = float(_plain(group["betas"])[0]), float(group["momentum_decay"])
                product = _mu_products(int(s["step"]), beta1, psi, _scalar_dtype())
                s["mu_product"] = product.clone()
        return sd

    def _layout(
        self, p: torch.Tensor, saved: Dict[str, Any], signed_codes: Dict[str, bool]
    ) -> Dict[str, Any]:
        saved = dict(saved)
        product = saved.pop("mu_product", None)
        entry = super()._layout(p, saved, signed_codes)
        if product is not None:
            try:
                value = torch.as_tensor(product).detach()
            except (TypeError, ValueError, RuntimeError):
                raise ValueError(
                    f"state 'mu_product': expected a real number in [0, 1), got {product!r}"
                ) from None
            if value.numel() != 1 or value.is_complex() or value.dtype == torch.bool:
                raise ValueError(
                    f"state 'mu_product': expected a real number in [0, 1), got {value!r}"
                )
            _optim._check_mu_product("state 'mu_product'", value.item())
            entry["mu_product"] = value.to("cpu", _scalar_dtype(), copy=True).reshape(())
        return entry


class _ScheduleFreeAdapter(Optimizer):
    r"""As the ``schedulefree`` package's torch classes (``AdamWScheduleFree``,
    ``SGDScheduleFree``, also importable under these names): their signature with
    ``foreach`` (accepted, no effect), and their group entries ``k``, ``train_mode``,
    ``lr_max`` (-1 at the start), ``weight_sum`` and ``scheduled_lr``, so that a
    ``state_dict`` loads into theirs and the other way round. A new optimizer is in eval mode,
    as theirs: call :meth:`train` before the first step (a step in eval mode raises
    RuntimeError) and :meth:`eval` before evaluating or saving the weights. The state is ``z``
    (and ``exp_avg_sq`` for AdamW), no ``"step"``: the step count is the group's ``k``."""

    _keeps_step = False

    def add_param_group(self, param_group: Dict[str, Any]) -> None:
        """As the base's; a group added without ``train_mode`` takes the optimizer's mode,
        in which its parameters (y = x = z until its first step) already are."""
        super().add_param_group(_optim._in_current_mode(self.param_groups, param_group))

    _peers = {
        "ScheduleFreeAdamW": "``schedulefree.AdamWScheduleFree``",
        "ScheduleFreeSGD": "``schedulefree.SGDScheduleFree``",
    }
    _group_defaults = {
        "k": 0,
        "train_mode": False,
        "weight_sum": 0.0,
        "lr_max": -1.0,
        "scheduled_lr": 0.0,
    }
    _extra_parameters = (
        inspect.Parameter(
            "foreach",
            inspect.Parameter.POSITIONAL_OR_KEYWORD,
            default=hasattr(torch, "_foreach_mul_"),
        ),
    )

    def _hyper(self, group: Dict[str, Any], into: Dict[str, Any]) -> Dict[str, Any]:
        super()._hyper(group, into)
        into["lr_max"] = max(into["lr_max"], 0.0)  # schedulefree starts at -1: max(lr, .)
        return into

    def _call_key(self, group: Dict[str, Any], state: Dict[str, Any]) -> Any:
        return None  # every parameter steps with the group's count: one call per dtype

    def _call_step(self, entry: _Group, call: _Call) -> int:
        return int(entry.group["k"]) + 1

    def _update(self, plan, params, grads, buffers, step: int, extra: Any, first: int) -> None:
        self._fused._update(plan, params, grads, buffers, step, step, first)

    def _buffer(self, group, plan, array: str, key: str, p: torch.Tensor) -> Any:
        storage = self._storage[p]
        if key == "z" and "z" not in self.state[p] and storage.state != "int8":
            self.state[p]["z"] = p.detach().to(_FROM_NAME[storage.state], copy=True)
        return super()._buffer(group, plan, array, key, p)

    def _step(self, closure: Optional[Callable[[], Any]]) -> Any:
        """One Schedule-Free step of every parameter with a gradient; every group's ``k``,
        ``lr_max``, ``weight_sum`` and ``scheduled_lr`` advance as ``schedulefree``'s do.
        Returns the closure's loss."""
        if not all(group["train_mode"] for group in self.param_groups):
            raise RuntimeError(
                f"{type(self).__name__}.step() in eval mode: call .train() before stepping "
                "(the parameters hold the average x in eval mode)"
            )
        skipped = self.skipped_steps
        loss = super()._step(closure)
        if self.skipped_steps != skipped:
            return loss
        for group in self.param_groups:
            k = int(group["k"]) + 1
            lr, lr_max, weight_sum, _ = reference.schedulefree_averaging(
                k,
                _plain(group["lr"]),
                warmup_steps=group["warmup_steps"],
                r=group["r"],
                weight_lr_power=group["weight_lr_power"],
                lr_max=group["lr_max"],
                weight_sum=group["weight_sum"],
            )
            group.update(k=k, lr_max=lr_max, weight_sum=weight_sum, scheduled_lr=lr)
        return loss

    @torch.no_grad()
    def train(self) -> None:
        r"""Switch the parameters to :math:`y`, where gradients are taken:
        :math:`\theta \leftarrow \theta + (1 - \beta)(z - \theta)` (no-op in train mode)."""
        self._switch(True)

    @torch.no_grad()
    def eval(self) -> None:
        r"""Switch the parameters to the average :math:`x`, the weights to evaluate and keep:
        :math:`\theta \leftarrow \theta + (1 - 1/\beta)(z - \theta)` (no-op in eval mode)."""
        self._switch(False)

    def _switch(self, to_train: bool) -> None:
        groups = [g for g in self.param_groups if bool(g["train_mode"]) != to_train]
        weights = []  # every group's, before any parameter is written
        for group in groups:
            name = self._fused.beta_name
            weights.append(_optim._switch_weight(_plain(group[name]), to_train, name))
        for group, weight in zip(groups, weights):
            offset = self._offset(group)
            for i, p in enumerate(group["params"]):
                state = self.state.get(p, {})
                if "z" in state:
                    z = _numpy(state["z"])
                elif "z.codes" in state:
                    z = QuantizedState(state["z.codes"].numpy(), state["z.scales"].numpy())
                else:
                    continue
                master = _numpy(state["master"]) if "master" in state else None
                key = (
                    _optim._switch_key(self._fused.seed, int(group["k"]), to_train, offset + i)
                    if self._fused.stochastic_rounding
                    else None
                )
                _optim._lerp_(_numpy(p.detach()), z, weight, master, key)
            group["train_mode"] = to_train


# The updates that hand the gradients to a fused kernel as they are: a step of an adapter whose
# update and whose fusedopt class's update are both here may lend new gradients' memory to the
# kernel instead of NumPy views. Any other (Muon's and Adafactor's NumPy work, an override) gets
# views.
_PASS_THROUGH = frozenset(
    {
        Optimizer._update,
        _ScheduleFreeAdapter._update,
        _NAdamAdapter._update,
        _optim.Optimizer._update,
        _optim.SGD._update,
        _optim.NAdam._update,
        _optim._ScheduleFree._update,
    }
)

# The adapted classes whose state or update is not element-wise, by their adapter's base.
MATRIX = {"Muon": _MuonAdapter, "Adafactor": _AdafactorAdapter}
OWN_STATE = {"NAdam": _NAdamAdapter}
SCHEDULE_FREE = {"ScheduleFreeAdamW": _ScheduleFreeAdapter, "ScheduleFreeSGD": _ScheduleFreeAdapter}


def _classes() -> Dict[str, type]:
    found = {}
    for name in _optim.__all__:
        fused_class = getattr(_optim, name)
        base = {**MATRIX, **SCHEDULE_FREE, **OWN_STATE}.get(name, Optimizer)
        if name in ELEMENTWISE or base is not Optimizer:
            found[name] = _adapter(name, fused_class, getattr(torch.optim, name, None), base)
    return found


CLASSES: Dict[str, type] = _classes()
"""The adapters by name: one per :mod:`fusedopt.optim` class."""
globals().update(CLASSES)
__all__ += sorted(CLASSES)
# the schedulefree package's names, for a drop-in import
AdamWScheduleFree = CLASSES["ScheduleFreeAdamW"]
SGDScheduleFree = CLASSES["ScheduleFreeSGD"]
__all__ += ["AdamWScheduleFree", "SGDScheduleFree"]


class CPUOffload:
    r"""The ZeRO-Offload pattern: the model's parameters and gradients stay where the model
    is (bfloat16 on an accelerator, say), the optimizer's state and float32 master weights
    live in host memory, and the step runs there with fusedopt.

    >>> model = model.to("cuda", torch.bfloat16)
    >>> offload = fusedopt.torch.CPUOffload(model.parameters(), fusedopt.torch.AdamW, lr=1e-3)
    >>> sched = torch.optim.lr_scheduler.CosineAnnealingLR(offload.optimizer, T_max=1000)
    >>> for x, y in data:
    ...     loss = loss_fn(model(x), y)
    ...     loss.backward()
    ...     offload.step()          # grads to host, fused step, params back
    ...     offload.zero_grad()
    ...     sched.step()

    Each step copies every gradient into a host buffer (pinned, with non-blocking copies,
    when the parameter is on a CUDA device and ``pin_memory`` is not False), waits for the
    copies, runs ``optimizer_class``'s fused step on host copies of the parameters, and copies
    the updated parameters back. Parameters already on the CPU are updated where they are,
    with no copy (``copy=True`` forces the host copies, for tests). Low-precision parameters
    get ``master_weights=True`` unless told otherwise, so the update runs on float32 masters.

    A parameter of the model changed since the last step (in place, as a model's
    ``load_state_dict`` changes it, or given new data) is copied to the host before the step,
    so the step updates the weights the model holds. Its master weights, where it has them,
    start again from it too, unless the optimizer's state was loaded since (resuming from a
    checkpoint of both: the loaded masters are kept, bit for bit). A change is seen by the
    parameter's autograd version and data_ptr: one made through ``p.data`` or a NumPy view is
    not; make it under ``torch.no_grad()``. A lazy module's parameters (``torch.nn.LazyLinear``'s
    before its first forward pass) are accepted: their host copies are made at the first step
    after it. A parameter's host copy keeps the dtype and shape it was made with: a step after
    ``model.float()`` (or with a gradient the host copy cannot take, or a sparse one) is a
    TypeError/ValueError naming the parameter, raised before anything is copied.

    ``optimizer`` is the host optimizer (a :class:`fusedopt.torch.Optimizer`): give it to the
    schedulers; ``state_dict``/``load_state_dict`` are its.
    """

    def __init__(
        self,
        params: Any,
        optimizer_class: Optional[type] = None,
        *,
        pin_memory: Optional[bool] = None,
        copy: bool = False,
        **kwargs: Any,
    ):
        optimizer_class = optimizer_class or CLASSES["AdamW"]
        groups = list(params)
        if not groups:
            raise ValueError("optimizer got an empty parameter list")
        if not isinstance(groups[0], dict):
            groups = [{"params": groups}]
        self.params: List[torch.Tensor] = []
        self._host: List[torch.Tensor] = []
        self._grads: List[Optional[torch.Tensor]] = []
        self._names: List[str] = []  # as the optimizer's errors name them
        self._device = False  # whether any parameter lives off the host
        host_of: Dict[torch.Tensor, torch.Tensor] = {}
        host_groups = []
        for index, group in enumerate(groups):
            tensors = group["params"]
            tensors = [tensors] if isinstance(tensors, torch.Tensor) else list(tensors)
            hosts = []
            for i, p in enumerate(tensors):
                if not isinstance(p, torch.Tensor):
                    raise TypeError(f"params: expected tensors, got {type(p).__name__}")
                if p in host_of:  # one host copy: the optimizer's own duplicate checks see it
                    hosts.append(host_of[p])
                    continue
                if p.device.type == "cpu" and not copy:
                    host = p
                elif torch.nn.parameter.is_lazy(p):  # made at the first step that sees it
                    host = torch.nn.parameter.UninitializedParameter(device="cpu", dtype=p.dtype)
                    self._device = True
                else:
                    _check_kind(f"parameter {i} of group {index}", p)  # before copy_ fails
                    host = self._new_host(p, pin_memory)
                    host.copy_(p.detach())
                    self._device = True
                self.params.append(p)
                self._host.append(host)
                self._grads.append(None)
                self._names.append(f"parameter {i} of group {index}")
                host_of[p] = host
                hosts.append(host)
            host_groups.append({**group, "params": hosts})
        low = any(p.dtype in (torch.bfloat16, torch.float16) for p in self.params)
        kwargs.setdefault("master_weights", low)
        self.optimizer = optimizer_class(host_groups, **kwargs)
        # each parameter's autograd version and data_ptr as the host last saw them: one that
        # differs at a step was changed outside it; and the master tensors after the last step
        # (one replaced since was loaded)
        self._pin_memory = pin_memory
        self._seen = [self._version_of(p) for p in self.params]
        self._masters: List[Optional[torch.Tensor]] = [None] * len(self.params)

    @staticmethod
    def _new_host(p: torch.Tensor, pin_memory: Optional[bool]) -> torch.Tensor:
        """An empty host tensor like ``p``: pinned for a CUDA parameter, unless told."""
        pin = (p.device.type == "cuda") if pin_memory is None else pin_memory
        return torch.empty(p.shape, dtype=p.dtype, pin_memory=pin)

    @staticmethod
    def _version_of(p: torch.Tensor) -> Tuple[int, int]:
        if torch.nn.parameter.is_lazy(p):  # no data yet: any later version differs
            return -1, 0
        return p._version, p.data_ptr()

    def _check(self, changed: List[int]) -> None:
        """TypeError/ValueError, before a step copies or writes anything, for a parameter
        whose host copy cannot take it (its dtype or shape changed: ``model.float()``), or
        whose gradient the host cannot take, and for what the host optimizer would refuse
        after the model's changes (the parameters ``changed``) are copied: a hyperparameter
        (``lr=-1``), a gradient of a parameter updated where it is. Without changes nothing is
        copied that a refused step would leave changed: the host optimizer's own checks then
        come before it writes anything."""
        if changed:
            self.optimizer._check_hyperparameters()
        for p, host, what in zip(self.params, self._host, self._names):
            if torch.nn.parameter.is_lazy(p):  # checked when its host copy is made
                continue
            if host is p:
                if changed and p.grad is not None:
                    self.optimizer._checked_storage(what, p, p.grad)
                continue
            pending = torch.nn.parameter.is_lazy(host)  # made at this step, like p
            if not pending and (p.dtype != host.dtype or p.shape != host.shape):
                raise _mismatch(
                    what,
                    host.dtype,
                    host.shape,
                    p,
                    "its host copy",
                    "a CPUOffload keeps each parameter's dtype and shape: convert the model "
                    "back, or make a new CPUOffload",
                )
            g = p.grad
            if g is None:
                continue
            _check_kind(f"gradient of {what}", g)
            # torch's rule for assigning host.grad (grad_dtype None: any dtype); a shape
            # mismatch would broadcast in the copy
            dtype = p.dtype if pending else getattr(host, "grad_dtype", host.dtype)
            if g.shape != p.shape or (dtype is not None and g.dtype != dtype):
                raise _mismatch(
                    f"gradient of {what}",
                    dtype or g.dtype,
                    p.shape,
                    g,
                    "the host copy of " + _described(p),
                    "a host copy takes gradients of its dtype and shape",
                )

    def _changed(self) -> List[int]:
        """The parameters (by place) changed since the last step, lazy ones left out."""
        return [
            i
            for i, p in enumerate(self.params)
            if self._version_of(p) != self._seen[i] and not torch.nn.parameter.is_lazy(p)
        ]

    def _take_changes(self, changed: List[int]) -> None:
        """Copy each parameter ``changed`` since the last step to its host copy, and to its
        master unless the optimizer's state was loaded since."""
        for i in changed:
            p, host = self.params[i], self._host[i]
            if torch.nn.parameter.is_lazy(host):  # a lazy module's, run for the first time
                host.materialize(p.shape)
                host.data = self._new_host(p, self._pin_memory)
            with torch.no_grad():
                if host is not p:
                    host.copy_(p.detach())
                master = self.optimizer.state.get(host, {}).get("master")
                if master is not None and master is self._masters[i]:
                    master.copy_(host)
            self._seen[i] = self._version_of(p)

    def _note_step(self) -> None:
        state = self.optimizer.state
        self._seen = [self._version_of(p) for p in self.params]
        self._masters = [state.get(host, {}).get("master") for host in self._host]

    def step(self, closure: Optional[Callable[[], Any]] = None) -> Any:
        """Copy the gradients to the host, step there, copy the parameters back; returns the
        closure's loss."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        changed = self._changed()
        self._check(changed)  # all of it before anything is copied: a refused step changes nothing
        self._take_changes(changed)  # first: it makes the host copies of lazy parameters run since
        synchronize = False
        for i, (p, host) in enumerate(zip(self.params, self._host)):
            if host is p:
                continue
            if p.grad is None:
                host.grad = None
                continue
            buffer = self._grads[i]
            if buffer is None or buffer.dtype != p.grad.dtype:
                buffer = self._grads[i] = torch.empty(
                    p.shape, dtype=p.grad.dtype, pin_memory=host.is_pinned()
                )
            # detached: a gradient that requires grad would chain each step's graph to the last
            buffer.copy_(p.grad.detach(), non_blocking=host.is_pinned())
            synchronize |= p.device.type == "cuda"
            host.grad = buffer
        if synchronize:
            torch.cuda.synchronize()
        self.optimizer.step()
        with torch.no_grad():
            for p, host in zip(self.params, self._host):
                if host is not p and host.grad is not None:
                    p.copy_(host, non_blocking=host.is_pinned())
        self._note_step()
        return loss

    def zero_grad(self, set_to_none: bool = True) -> None:
        """The model's gradients (the host buffers are kept for the next step)."""
        for p in self.params:
            if p.grad is None:
                continue
            if set_to_none:
                p.grad = None
            else:
                p.grad.zero_()

    @property
    def param_groups(self) -> List[Dict[str, Any]]:
        return self.optimizer.param_groups

    def state_dict(self) -> Dict[str, Any]:
        return self.optimizer.state_dict()

    def load_state_dict(self, state_dict: Dict[str, Any]) -> None:
        self.optimizer.load_state_dict(state_dict)


__all__.append("CPUOffload")
