"""Optimizer classes over the fused update functions, with torch.optim's conventions.

>>> opt = fusedopt.optim.Adam({"w1": w1, "b1": b1}, lr=1e-3)
>>> for batch in data:
...     grads = backward(batch)            # {"w1": ..., "b1": ...}, None for no gradient
...     opt.step(grads)

``params`` is a list of arrays, a dict name -> array, or a list of parameter groups
``{"params": list or dict, "lr": ..., ...}`` whose hyperparameters override the defaults and may
be changed between steps (``opt.param_groups[i]["lr"] = ...``). Parameters are named: by their
dict key, or ``"<group>.<index>"`` for lists. ``step(grads)`` takes gradients aligned with the
parameters (a list in the same order, or a dict by name); a None gradient skips that parameter
and its state. One step issues one fused multi-tensor call per (group, dtype, step count).

Parameters are float32, float64, bfloat16 (``ml_dtypes.bfloat16``) or float16; gradients have
the parameter's dtype, or float32 for a low-precision parameter (bfloat16 or float16 for a
float32 one). State is allocated lazily: in float32 (float64 for float64 parameters), or as
``state_dtype`` says, with float32 master weights for low-precision parameters when
``master_weights`` is on. ``state_dict()`` / ``load_state_dict()`` and ``save(path)`` /
``Optimizer.load(path, params)`` round-trip exactly: resuming from a checkpoint reproduces an
uninterrupted run bit for bit, quantized state and the stochastic-rounding stream included.
"""

from __future__ import annotations

import contextlib
import contextvars
import difflib
import functools
import inspect
import itertools
import json
import math
import operator
import os
import re
import tempfile
from typing import (
    Any,
    Callable,
    Dict,
    Iterable,
    List,
    Mapping,
    NamedTuple,
    Optional,
    Sequence,
    Tuple,
    Union,
)

import ml_dtypes
import numpy as np

from . import _functional, _matrix, _overlap, quantize, reference
from ._clip import _by_dtype, as_max_norm, clip_grad_norm_
from ._declarations import DECLARATIONS, Declaration
from ._dispatch import core as _core
from .quantize import QuantizedState, _check_scales, _memory_order

__all__ = [
    "SGD",
    "Adafactor",
    "Adagrad",
    "Adam",
    "AdamW",
    "Adamax",
    "LAMB",
    "Lion",
    "Momentum",
    "Muon",
    "NAdam",
    "Optimizer",
    "RAdam",
    "RMSprop",
    "ScheduleFreeAdamW",
    "ScheduleFreeSGD",
    "from_config",
    "reference_kernels",
]

FORMAT_VERSION = 2  # 2: low-precision arrays and quantized state; 1 still loads
Params = Union[Sequence[np.ndarray], Mapping[str, np.ndarray], Sequence[Mapping[str, Any]]]
Grads = Union[Sequence[Optional[np.ndarray]], Mapping[str, Optional[np.ndarray]]]

_REGISTRY: Dict[str, type] = {}


class _Plan(NamedTuple):
    """A group's kernel call: the declaration, its hyperparameters, and its buffers as
    (array name, state key)."""

    declaration: Declaration
    hyper: Dict[str, Any]
    arrays: Tuple[Tuple[str, str], ...]


_REFERENCE = contextvars.ContextVar("fusedopt_reference_kernels", default=False)


@contextlib.contextmanager
def reference_kernels():
    """Within this block, optimizers built without ``impl=`` compute with
    :mod:`fusedopt.reference` (plain NumPy, one tensor at a time) instead of the fused kernels:
    to read or check what they do. The results are bit-identical, only slower. The switch is
    local to the current thread (a context variable): other threads are not affected."""
    token = _REFERENCE.set(True)
    try:
        yield
    finally:
        _REFERENCE.reset(token)


_DTYPES = {
    "float32": np.dtype(np.float32),
    "float64": np.dtype(np.float64),
    "bfloat16": np.dtype(ml_dtypes.bfloat16),
    "float16": np.dtype(np.float16),
}
_LOW_PRECISION = ("bfloat16", "float16")
# The most steps a parameter's state can have taken: the next is the kernels' largest, 2**63 - 1.
_MAX_STEPS_TAKEN = 2**63 - 2
_ROWS = frozenset(_core.STORAGE_ROWS)  # (param, grad, state) dtype names the kernels take
_GOLDEN = 0x9E3779B97F4A7C15


_DTYPE_NAMES = {d: n for n, d in _DTYPES.items()}


def _dtype_name(dtype: np.dtype) -> Optional[str]:
    """The name of one of the parameter dtypes (native byte order only), else None."""
    name = _DTYPE_NAMES.get(dtype)
    return name if name is not None and dtype.isnative else None


def _count(value: Any, most: Optional[int] = None) -> Optional[int]:
    """``value`` as a count (an integer, or an integral float as JSON may give one, in
    [0, most]), else None: so that a checkpoint's bad count gets an error that names it."""
    if isinstance(value, np.ndarray) and value.ndim == 0:
        value = value.item()
    if isinstance(value, (bool, np.bool_)):
        return None
    if isinstance(value, (int, np.integer)):
        count = int(value)
    elif isinstance(value, (float, np.floating)) and math.isfinite(value) and value == int(value):
        count = int(value)
    else:
        return None
    return count if 0 <= count and (most is None or count <= most) else None


def _steps_taken(value: Any, shown: Any = None) -> int:
    """A checkpoint's step count of a parameter, else ValueError (``shown``: the value as the
    error shows it, where it is not ``value`` itself)."""
    steps = _count(value, _MAX_STEPS_TAKEN)
    if steps is None:
        shown = value if shown is None else shown
        raise ValueError(f"invalid step {shown!r} (the steps taken, 0 to 2**63 - 2)")
    return steps


def _skipped_steps(value: Any) -> int:
    """A checkpoint's ``skipped_steps``, else ValueError."""
    skipped = _count(value)
    if skipped is None:
        raise ValueError(f"checkpoint has skipped_steps={value!r}: expected a count")
    return skipped


def _check_same_storage(key: str, saved: Any, mine: Any, how: str = "") -> None:
    """That a checkpoint's ``state_dtype`` or ``master_weights`` is this optimizer's (None and
    "float32" are one state_dtype), else ValueError; ``how``: what builds one that is."""
    differ = (saved or "float32") != (mine or "float32") if key == "state_dtype" else saved != mine
    if differ:
        raise ValueError(
            f"checkpoint has {key}={saved!r}, this optimizer {mine!r}: build it with the "
            f"checkpoint's{how}"
        )


def _snapshot(value: Any) -> Any:
    """A hyperparameter's value as it is now, to compare with a later one: lists (betas, eps
    pairs) as tuples, so that a change in place compares unequal, and with its type, so that
    0 for False (or 1 for 1.0) is checked again."""
    if isinstance(value, list):
        return tuple(_snapshot(v) for v in value)
    return type(value), value


def _state_dtype(value: Any) -> Optional[str]:
    """``state_dtype`` as a name: None, "float32", "bfloat16" or "int8", from a name, a NumPy
    dtype or a torch dtype."""
    if value is None:
        return None
    if isinstance(value, str):
        name = value
    elif type(value).__module__ == "torch" and str(value).startswith("torch."):
        name = str(value)[len("torch.") :]  # torch.bfloat16, ... for fusedopt.torch's users
    else:
        try:
            dtype = np.dtype(value)
        except TypeError:
            dtype = None
        name = "int8" if dtype == np.int8 else (_dtype_name(dtype) if dtype is not None else None)
    if name not in ("float32", "bfloat16", "int8"):
        raise ValueError(
            f"state_dtype: expected None, 'float32', 'bfloat16' or 'int8', got {value!r}"
        )
    return name


class _Storage(NamedTuple):
    """How a parameter is stored and updated: the dtype the kernel's param has (float32 for
    masters), the state's dtype ("int8": quantized), the gradient dtypes it takes, and whether
    it has float32 master weights."""

    param: str
    state: str
    grads: Tuple[str, ...]
    master: bool


def _check_param(name: str, p: Any) -> np.ndarray:
    if not isinstance(p, np.ndarray):
        raise TypeError(f"parameter {name!r}: expected a numpy.ndarray, got {type(p).__name__}")
    if _dtype_name(p.dtype) is None:
        raise TypeError(
            f"parameter {name!r}: expected dtype float32, float64, bfloat16 or float16, "
            f"got {p.dtype}"
        )
    if not (p.flags.c_contiguous or p.flags.f_contiguous):
        raise ValueError(f"parameter {name!r}: expected a C- or F-contiguous array")
    if not p.flags.aligned:
        raise ValueError(
            f"parameter {name!r}: expected an array aligned to its element size, got a "
            "misaligned view"
        )
    if not p.flags.writeable:
        raise ValueError(f"parameter {name!r}: array is read-only")
    return p


def _check_max_grad_norm(value: Any) -> Optional[float]:
    """None, or what clip_grad_norm_ takes as max_norm (a real number or a 0-d array or tensor
    of one), finite and > 0, as a float (what a checkpoint's JSON can hold); else ValueError."""
    if value is None:
        return None
    norm = as_max_norm(value)
    if norm is None or not (norm > 0 and math.isfinite(norm)):
        raise ValueError(f"Invalid max_grad_norm: {value!r} (None or a finite number > 0)")
    return norm


def _call_seed(seed: int, first: int) -> int:
    """The seed of a fused call whose first tensor is parameter number ``first`` of an
    optimizer seeded ``seed``: ``seed`` itself for the first parameter's call, so that an
    optimizer of one call draws the bits of the function called with its seed."""
    return reference._mix64(seed ^ reference._mix64(first)) if first else seed


def _check_seed(seed: Any) -> None:
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)):
        raise TypeError(f"seed must be an integer, got {type(seed).__name__}")
    if not 0 <= seed < 2**64:
        raise ValueError(f"Invalid seed: {seed} (an integer in [0, 2**64))")


def _check_flag(name: str, value: Any) -> None:
    if not isinstance(value, (bool, np.bool_)):
        raise TypeError(f"{name} must be True or False, got {value!r}")


def _check_mu_product(what: str, value: Any) -> float:
    """NAdam's running product of momentum coefficients from a checkpoint: a real in [0, 1)."""
    if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)):
        raise ValueError(f"{what}: expected a real number in [0, 1), got {type(value).__name__}")
    if not 0 <= value < 1:  # also NaN
        raise ValueError(f"{what}: expected a real number in [0, 1), got {value!r}")
    return float(value)


# How the kernels name an array of a list call: "exp_avg[2]" (".codes" or ".scales" of an int8
# state), and the matrix functions a tensor: "muon_: tensor 2"
_KERNEL_ARRAY = re.compile(r"(\w+)\[(\d+)\](?:\.(codes|scales))?")
_KERNEL_LABEL = re.compile(_KERNEL_ARRAY.pattern + r"(?=: )")
_MATRIX_LABEL = re.compile(r"\w+_: tensor (\d+): (.*)", re.DOTALL)


class _StepCall:
    """One fused call of a step: parameters ``names`` of group ``index`` (those that share
    ``dtypes``, step and call key), their state ``buffers`` (keys), ``step`` and ``extra`` (the
    call key); and, once the call has been made, its lists of the tensors' state entries, params
    and state arrays, which the next step reuses where they are still the same objects."""

    __slots__ = (
        "index",
        "plan",
        "names",
        "buffers",
        "dtypes",
        "step",
        "extra",
        "states",
        "params",
        "arrays",
    )

    def __init__(self, index, plan, names, buffers, dtypes, step, extra, lists=(None,) * 3):
        self.index = index  # the group's, in param_groups
        self.plan, self.names, self.buffers = plan, names, buffers
        self.dtypes = dtypes  # the params' and the gradients'
        self.step, self.extra = step, extra
        self.states, self.params, self.arrays = lists


class _LastStep(NamedTuple):
    """What a step's calls were made from, kept for the next step (Optimizer._calls_as_before):
    the groups, the kernel and state arrays of their plans, and the names stepped (neither
    frozen nor without a gradient) with their gradients' dtypes."""

    groups: List[Dict[str, Any]]
    kernels: List[Tuple[Declaration, Tuple[Tuple[str, str], ...]]]
    names: List[str]
    dtypes: List[np.dtype]
    calls: List[_StepCall]


def _name_tensor(error: Exception, plan: _Plan, names: List[str]) -> None:
    """Raise ``error`` again with its tensors named as the step names parameters (``state
    'exp_avg' of 'w'`` for ``exp_avg[2]``, wherever the message names one), when a fused call
    of the step (of parameters ``names``) refused it; returns if it starts with no tensor."""
    message = str(error)
    keys = dict(plan.arrays)

    def label(found: re.Match) -> str:
        role, index, part = found.groups()
        if int(index) >= len(names) or role not in ("param", "grad", "master", *keys):
            return found.group(0)
        name = names[int(index)]
        if role == "param":
            return f"parameter {name!r}"
        if role == "grad":
            return f"gradient of {name!r}"
        return f"state {keys.get(role, role)!r} of {name!r}" + (f" ({part})" if part else "")

    kernel, matrix = _KERNEL_LABEL.match(message), _MATRIX_LABEL.fullmatch(message)
    if kernel and label(kernel) != kernel.group(0):
        renamed = _KERNEL_ARRAY.sub(label, message)
    elif matrix and int(matrix.group(1)) < len(names):
        renamed = f"parameter {names[int(matrix.group(1))]!r}: {matrix.group(2)}"
    else:
        return
    raise type(error)(renamed) from error


class Optimizer:
    """Base class: parameter groups, lazy state, freezing, checkpoints, and the generic step.

    A subclass names its ``kernel`` (a declaration in ``_core.OPTIMIZERS``) and sets
    ``defaults`` in ``__init__``. Each group's hyperparameters that the kernel declares are
    passed to it as they are, ``betas`` as ``beta1``/``beta2``; the state buffers are the
    kernel's written arrays whose option is on, named in the state as ``state_names`` says
    (torch's names). A subclass overrides ``_kernel_arguments`` where its hyperparameters map
    otherwise, ``_check_group`` to validate hyperparameters only it has, and ``_init_buffer``
    for a buffer that does not start at zero.

    The options every optimizer takes as keywords (``max_grad_norm``, ``skip_if_nonfinite``,
    ``impl``, ``state_dtype``, ``master_weights``, ``stochastic_rounding``, ``seed``) are
    documented in :meth:`Optimizer.__init__`.
    """

    kernel: str = ""
    state_names: Mapping[str, str] = {}
    #: state entries that are numbers, not arrays: key -> check(what, value), the value kept
    _scalar_state: Mapping[str, Callable[[str, Any], Any]] = {}
    #: whether a call's parameters share their step counts (the kernel's step); else the
    #: kernel's step is the group's, from _call_key, and the counts only count
    _steps_per_parameter = True

    def __init__(
        self,
        params: Params,
        defaults: Dict[str, Any],
        *,
        max_grad_norm: Optional[float] = None,
        skip_if_nonfinite: bool = False,
        impl: Optional[str] = None,
        state_dtype: Optional[Union[str, np.dtype, type]] = None,
        master_weights: bool = False,
        stochastic_rounding: bool = False,
        seed: int = 0,
    ):
        """Build the optimizer over ``params``; state is allocated at each parameter's first step.
        The keyword arguments are the options, the same for every class.

        Args:
            params: a list of arrays, a dict name -> array, or a list of parameter groups
                ``{"params": list or dict, <hyperparameter>: value, ...}`` (see the module's
                docstring). Parameters are C- or F-contiguous, writeable float32, float64,
                bfloat16 (``ml_dtypes.bfloat16``) or float16 arrays.
            defaults: (``Optimizer`` itself, for subclasses) the class's hyperparameters and
                their values. A class takes its own as arguments instead (``lr``, ``betas``,
                ...: see its docstring and signature).

        Keyword Args:
            max_grad_norm: first clip the step's gradients, in place, to this global L2 norm,
                as :func:`fusedopt.clip_grad_norm_` does (a finite number > 0; None, the
                default: no clipping).
            skip_if_nonfinite: skip a step whose gradients hold a NaN or an infinity: nothing
                is written and ``step`` returns False, counted in ``skipped_steps`` (default
                False).
            impl: ``"fused"`` computes with the fused kernels, ``"reference"`` with
                :mod:`fusedopt.reference` (plain NumPy: bit-identical, slower; the arrays
                are checked by the kernels' rules first, so both take and refuse the same);
                None (the default) the kernels, but the reference inside
                :func:`reference_kernels`.
            state_dtype: the state buffers' storage: None or ``"float32"`` (the default:
                float32), ``"bfloat16"``, or ``"int8"``: 8-bit block-quantized
                (:class:`fusedopt.quantize.QuantizedState`: int8 codes, uint8 for a state that
                is never negative, one float32 scale per 256 elements, always rounded
                stochastically with ``seed``). A NumPy dtype or type (``np.int8``,
                ``ml_dtypes.bfloat16``) or a torch dtype (``torch.bfloat16``) names the same.
                float64 parameters keep float64 state: with them any value but None is a
                ValueError. Some classes take fewer (see their docstrings).
            master_weights: keep float32 master weights of bfloat16 and float16 parameters in
                their state (``state[name]["master"]``): the update runs on the masters and
                writes each parameter as its master rounded, in the same pass; their gradients
                may be in the parameter's dtype or float32. float32 and float64 parameters are
                unaffected (default False).
            stochastic_rounding: round what is stored in bfloat16 or float16 (parameters, a
                master's parameter copy, bfloat16 state) up or down at random, with the
                probabilities that make it unbiased, instead of to nearest even (default
                False).
            seed: the random stream of stochastic rounding and of int8 state, an integer in
                [0, 2**64) (default 0). The bits are a function of (seed, step, the place
                among the optimizer's parameters of the first parameter of the fused call, the
                parameter's place in that call, element, array slot): no two parameters share
                random bits in a step, whatever calls they fall in. Checkpoints keep it, so a
                resumed run draws the bits an uninterrupted one would.

        Raises:
            TypeError, ValueError: for an invalid option, hyperparameter or parameter, or a
                parameter with no kernel for its dtype and these options, before any state is
                made.
        """
        max_grad_norm = _check_max_grad_norm(max_grad_norm)
        if impl not in (None, "fused", "reference"):
            raise ValueError(f"impl: expected None, 'fused' or 'reference', got {impl!r}")
        _check_seed(seed)
        _check_flag("master_weights", master_weights)
        _check_flag("stochastic_rounding", stochastic_rounding)
        _check_flag("skip_if_nonfinite", skip_if_nonfinite)
        self.impl = impl
        self.state_dtype = _state_dtype(state_dtype)
        self.master_weights = bool(master_weights)
        self.stochastic_rounding = bool(stochastic_rounding)
        self.seed = int(seed)
        self._storage: Dict[str, _Storage] = {}
        self.defaults = dict(defaults, frozen=False)
        self.max_grad_norm = max_grad_norm
        self.skip_if_nonfinite = bool(skip_if_nonfinite)
        self.skipped_steps = 0
        self.param_groups: List[Dict[str, Any]] = []
        self._params: Dict[str, np.ndarray] = {}  # name -> array, in order
        self._position: Dict[str, int] = {}  # name -> its place in _params
        self._frozen: set = set()
        self.state: Dict[str, Dict[str, Any]] = {}
        self._plans: Dict[int, Tuple[Tuple[Any, ...], _Plan]] = {}  # id(group) -> its plan
        self._last_step: Optional[_LastStep] = None
        for group in self._groups(params):
            self.add_param_group(group)
        if not self._params:
            raise ValueError("optimizer got an empty parameter list")

    # ------------------------------------------------------------------ parameters

    @staticmethod
    def _groups(params: Params) -> List[Dict[str, Any]]:
        if isinstance(params, np.ndarray):
            raise TypeError(
                "params: expected a list or dict of arrays, or a list of groups, "
                "got a single array (wrap it in a list)"
            )
        if isinstance(params, Mapping):
            return [{"params": params}]
        params = list(params)
        if params and all(isinstance(p, Mapping) for p in params):
            return [dict(g) for g in params]
        return [{"params": params}]

    def add_param_group(self, group: Dict[str, Any]) -> None:
        """Add a group ``{"params": list or dict of arrays, <hyperparameter>: value, ...}``."""
        if "params" not in group:
            raise ValueError("a parameter group needs a 'params' entry")
        unknown = set(group) - set(self.defaults) - {"params", "names"}
        if unknown:
            raise ValueError(f"unknown hyperparameters in parameter group: {sorted(unknown)}")
        index = len(self.param_groups)
        params = group["params"]
        if isinstance(params, np.ndarray):
            raise TypeError("a group's params must be a list or dict of arrays")
        if isinstance(params, Mapping):
            names, arrays = list(params), list(params.values())
            if not all(isinstance(n, str) for n in names):  # step(grads) finds them by name
                raise TypeError(f"a group's params: expected names that are strings, got {names!r}")
        else:
            arrays = list(params)
            if isinstance(group.get("names"), str):
                raise TypeError(
                    f"a group's names: expected a list of strings, got {group['names']!r}"
                )
            names = list(group.get("names") or [f"{index}.{i}" for i in range(len(arrays))])
            if len(names) != len(arrays):
                raise ValueError(
                    f"a group's names: expected one per array ({len(arrays)}), got {len(names)}"
                )
            if not all(isinstance(n, str) for n in names):  # checkpoints key state by name
                raise TypeError(f"a group's names: expected strings, got {names!r}")
        storage = {}
        for name, p in zip(names, arrays):
            _check_param(name, p)
            if name in self._params or name in storage:
                raise ValueError(f"parameter {name!r} appears in more than one group")
            if any(p is q for q in self._params.values()):
                raise ValueError(f"parameter {name!r} is the same array as another parameter")
            storage[name] = self._storage_of(f"parameter {name!r}", p)
        full = {**self.defaults, **{k: v for k, v in group.items() if k not in ("params", "names")}}
        full["params"], full["names"] = arrays, names
        self._validate_group(full)  # before anything is added: a refused group leaves no trace
        for name, p in zip(names, arrays):
            self._position[name] = len(self._params)
            self._params[name] = p
        self._storage.update(storage)
        self.param_groups.append(full)

    def _master_and_state(self, what: str, dtype: str) -> Tuple[bool, str]:
        """Whether parameter ``what`` (as errors name it) of ``dtype`` gets masters, and its
        state's dtype, from the options; ValueError for options that cannot apply to it."""
        master = self.master_weights and dtype in _LOW_PRECISION
        state = "float64" if dtype == "float64" else self.state_dtype or "float32"
        if dtype == "float64" and self.state_dtype not in (None, "float64"):
            raise ValueError(
                f"state_dtype={self.state_dtype!r}: {what} is float64, whose state is float64"
            )
        return master, state

    def _storage_of(self, what: str, p: np.ndarray) -> _Storage:
        """How parameter ``what`` (as errors name it: ``parameter 'w'``) is stored, from the
        options and the kernels' storage rows."""
        dtype = _dtype_name(p.dtype)
        master, state = self._master_and_state(what, dtype)
        param = "float32" if master else dtype
        grads = tuple(g for pr, g, st in _core.STORAGE_ROWS if pr == param and st == state)
        if master:  # the param's dtype or float32, as without masters
            grads = tuple(g for g in grads if g in (dtype, "float32"))
        else:
            grads = tuple(g for g in grads if (dtype, g, state) in _ROWS)
        if not grads:
            raise ValueError(
                f"state_dtype={self.state_dtype!r}: no kernel takes {what}, {dtype}, with "
                f"{state} state"
            )
        return _Storage(param, state, grads, master)

    def _validate_group(self, group: Dict[str, Any]) -> None:
        """Raise TypeError/ValueError for an invalid hyperparameter of the group."""
        self._plan(group)

    def _plan(self, group: Dict[str, Any]) -> _Plan:
        """The group's kernel call, validated (:meth:`_build_plan`). Kept until the group's
        hyperparameters change, so a step validates only what changed. They are compared by
        value: a list changed in place (``group["betas"][0] = 0.95``) is a change."""
        values = tuple((k, _snapshot(v)) for k, v in group.items() if k not in ("params", "names"))
        cached = self._plans.get(id(group))
        if cached is not None and cached[0] == values:
            return cached[1]
        plan = self._build_plan(group)
        self._plans[id(group)] = (values, plan)
        return plan

    def _build_plan(self, group: Dict[str, Any]) -> _Plan:
        """The group's kernel call, validated: hyperparameters only this class has by
        ``_check_group``, the kernel's by the kernel's own rules."""
        betas = group.get("betas")
        if betas is not None and (not isinstance(betas, (tuple, list)) or len(betas) != 2):
            raise ValueError(f"Invalid betas: expected a pair (beta1, beta2), got {betas!r}")
        _check_flag("frozen", group["frozen"])
        self._check_group(group)
        declaration = self._declaration(group)
        hyper = self._kernel_arguments(group)
        declaration.check(hyper)
        arrays = tuple((b, self.state_names.get(b, b)) for b in declaration.buffers(hyper))
        return _Plan(declaration, hyper, arrays)

    def _check_group(self, group: Dict[str, Any]) -> None:
        """Validate the hyperparameters of the group that the kernel does not take."""

    def _declaration(self, group: Dict[str, Any]) -> Declaration:
        return DECLARATIONS[self.kernel]

    def _kernel_arguments(self, group: Dict[str, Any]) -> Dict[str, Any]:
        """The kernel's hyperparameters from the group's."""
        values = dict(group)
        if "betas" in values:
            values["beta1"], values["beta2"] = values.pop("betas")
        declared = {h.name for h in self._declaration(group).arguments}
        return {k: v for k, v in values.items() if k in declared}

    @property
    def names(self) -> List[str]:
        return list(self._params)

    def freeze(self, names: Union[str, Iterable[str]]) -> None:
        """Stop updating these parameters; their state is kept as it is."""
        self._frozen |= set(self._known([names] if isinstance(names, str) else names))

    def unfreeze(self, names: Union[str, Iterable[str]]) -> None:
        """Resume updating these parameters from the state they were frozen with."""
        self._frozen -= set(self._known([names] if isinstance(names, str) else names))

    def reset_state(self, names: Optional[Iterable[str]] = None) -> None:
        """Forget the state (buffers and step count) of these parameters, or of all: e.g. for a
        layer that was replaced. It is created afresh at their next step."""
        for name in self._known(
            self._params if names is None else [names] if isinstance(names, str) else names
        ):
            self.state.pop(name, None)

    def _frozen_names(self) -> set:
        """The parameters a step leaves alone: those frozen and those of frozen groups."""
        return self._frozen.union(*(g["names"] for g in self.param_groups if g["frozen"]))

    def _known(self, names: Iterable[str]) -> List[str]:
        names = list(names)
        for name in names:
            if name not in self._params:
                raise KeyError(f"no parameter named {name!r}")
        return names

    # ------------------------------------------------------------------ the step

    def _align(self, grads: Grads, memory: bool = True) -> Dict[str, Optional[np.ndarray]]:
        """The gradients by parameter name, each an array of a dtype and the shape its
        parameter takes, else TypeError/ValueError naming it; with ``memory``, also in the
        parameter's layout, aligned, and sharing no memory with it (a step leaves those to its
        calls' kernels, which check them all before the first writes)."""
        if isinstance(grads, np.ndarray) or not isinstance(grads, Iterable):
            # an array's rows would be taken for the gradients of as many parameters
            raise TypeError(
                "grads: expected a dict name -> gradient or a list of gradients (one per "
                f"parameter, None to skip one), got {type(grads).__name__}"
            )
        if isinstance(grads, Mapping):
            unknown = set(grads) - set(self._params)
            if unknown:
                raise ValueError(f"gradients for unknown parameters: {sorted(unknown)}")
            aligned = {name: grads.get(name) for name in self._params}
        else:
            grads = list(grads)
            if len(grads) != len(self._params):
                raise ValueError(
                    f"expected {len(self._params)} gradients, one per parameter "
                    f"(None to skip one), got {len(grads)}"
                )
            aligned = dict(zip(self._params, grads))
        # Check every gradient before anything is written: a step is several fused calls.
        # a dtype of the other byte order is not equal to a native one: it has no name here
        params, storages, names_of = self._params, self._storage, _DTYPE_NAMES
        for name, g in aligned.items():
            if g is None:
                continue
            p = params[name]
            if type(g) is not np.ndarray:  # (the test for the usual case costs least)
                if isinstance(g, np.generic) and p.ndim == 0:
                    # NumPy arithmetic on 0-d arrays gives scalars; a gradient is only read
                    g = aligned[name] = np.asarray(g)
                if not isinstance(g, np.ndarray):
                    raise TypeError(
                        f"gradient of {name!r}: expected a numpy.ndarray or None, "
                        f"got {type(g).__name__}"
                    )
            allowed = storages[name].grads
            if names_of.get(g.dtype) not in allowed or g.shape != p.shape:
                expected = " or ".join(sorted(allowed, key=lambda d: d != _dtype_name(p.dtype)))
                raise ValueError(
                    f"gradient of {name!r}: expected {expected} {p.shape} like the "
                    f"parameter, got {g.dtype} {g.shape}"
                )
            if not memory:
                continue
            g_flags, p_flags = g.flags, p.flags
            same_layout = (g_flags.c_contiguous and p_flags.c_contiguous) or (
                g_flags.f_contiguous and p_flags.f_contiguous
            )
            if not g_flags.aligned:
                raise ValueError(
                    f"gradient of {name!r}: expected an array aligned to its element size, got "
                    "a misaligned view"
                )
            if not same_layout:
                raise ValueError(
                    f"gradient of {name!r}: expected the parameter's contiguous memory layout"
                )
            if np.may_share_memory(g, p):
                raise ValueError(f"gradient of {name!r} shares memory with the parameter")
            if not p_flags.writeable:  # made read-only since it was added
                raise ValueError(f"parameter {name!r}: array is read-only")
        return aligned

    def step(self, grads: Grads) -> bool:
        """Update every parameter that has a gradient and is not frozen.

        Returns False if ``skip_if_nonfinite`` found a NaN or infinity in the gradients (then
        nothing changed and ``skipped_steps`` counts it), True otherwise. With
        ``max_grad_norm``, the gradients are first clipped in place to that global L2 norm.
        """
        aligned = self._align(grads, memory=False)  # the rest the calls' kernels check
        plans = [self._plan(group) for group in self.param_groups]  # all valid before any call
        # the gradients the step uses: a frozen parameter's, as None's, enter neither the
        # clipping norm nor the non-finite check
        frozen = self._frozen_names()
        active = [(name, g) for name, g in aligned.items() if g is not None and name not in frozen]
        state_of = self.state
        for name, g in active if self.max_grad_norm is not None else ():
            if not g.flags.writeable:  # refused before clipping writes the grads
                raise ValueError(
                    f"gradient of {name!r}: array is read-only, and max_grad_norm clips the "
                    "gradients in place"
                )
        added: List[Tuple[str, Optional[str]]] = []  # new state (name, key; None: the entry)
        # the loops below run once per tensor and step: their lookups are hoisted, and a
        # subclass's hooks called only where it has them
        storages = self._storage
        call_key = self._call_key if type(self)._call_key is not Optimizer._call_key else None
        after_update = (
            self._after_update if type(self)._after_update is not Optimizer._after_update else None
        )
        per_parameter = self._steps_per_parameter
        # all made, and checked, before any runs
        stepped = [name for name, _ in active], [g.dtype for _, g in active]
        reused = self._calls_as_before(plans, stepped, call_key)
        calls = reused if reused is not None else []
        self._last_step = None  # until this step's calls have run
        for index, (group, plan) in enumerate(
            zip(self.param_groups, plans) if reused is None else ()
        ):
            if group["frozen"]:
                continue
            buffers = [key for _, key in plan.arrays]
            present = (frozenset(buffers), frozenset(buffers + ["master"]))  # without, with master
            keys: Dict[Tuple[Any, ...], List[str]] = {}
            for name, p in zip(group["names"], group["params"]):
                g = aligned[name]
                if g is None or name in frozen:
                    continue
                state = state_of.get(name)
                if state is None:
                    state = state_of[name] = {"step": 0}
                    added.append((name, None))
                elif state.get("step", 0) > _MAX_STEPS_TAKEN:
                    self._forget(added)  # refused before anything is written or clipped
                    raise ValueError(
                        f"state of {name!r}: step {state['step']} cannot grow "
                        f"(a kernel counts at most 2**63 - 1 steps)"
                    )
                step = state["step"] + 1 if per_parameter else None
                key = (p.dtype, g.dtype, step, call_key(group, state) if call_key else None)
                storage = storages[name]
                if not state.keys() >= present[storage.master]:  # created at first use
                    for array, b in plan.arrays:  # in the parameter's layout
                        if b not in state:
                            state[b] = self._new_buffer(group, plan, array, b, p, storage.state)
                            added.append((name, b))
                    if storage.master and "master" not in state:
                        state["master"] = p.astype(np.float32, order="K")
                        added.append((name, "master"))
                keys.setdefault(key, []).append(name)
            for (p_dtype, g_dtype, step, extra), names in keys.items():
                masters = ["master"] if self._storage[names[0]].master else []
                dtypes = (p_dtype, g_dtype)
                calls.append(_StepCall(index, plan, names, buffers + masters, dtypes, step, extra))
        clipping = self.max_grad_norm is not None and bool(active)
        written = [(call.names, call.buffers) for call in calls]
        checked = len(calls) > 1 or clipping
        # the gradients are read (the non-finite check) or written (clipping) before the first
        # call checks its arrays: then every call's are checked first
        read_first = clipping or (self.skip_if_nonfinite and bool(active))
        ran = 0
        current = None  # the call running or being checked, whose errors name its tensors

        def run(call: _StepCall, check: bool = False) -> None:
            nonlocal current
            current = call
            names = call.names
            if call.states is None:
                states = call.states = [state_of[n] for n in names]
                call.params = [self._params[n] for n in names]
                call.arrays = {b: [state[b] for state in states] for b in call.buffers}
            self._update(
                call.plan,
                call.params,
                [aligned[n] for n in names],
                call.arrays,
                call.step,
                call.extra,
                self._position[names[0]],
                check,
            )

        try:
            if checked:
                clipped = [name for name, _ in active] if clipping else []
                self._check_step_overlap(aligned, written, clipped)
            # every call's checks before anything is written: a call checks its own arrays as
            # it runs, after the calls before it (and clipping) have written. Calls that differ
            # only in their step count (or a call key) are checked as one: those do not enter
            # the arrays' checks, and one check of many tensors costs about one of a few.
            checks: Dict[Tuple[Any, ...], _StepCall] = {}
            for call in calls if read_first else calls[1:]:
                first = call.names[0]
                key = (
                    id(call.plan),
                    *call.buffers,
                    self._params[first].dtype,
                    aligned[first].dtype,
                )
                merged = checks.get(key)
                checks[key] = (
                    call
                    if merged is None
                    else _StepCall(
                        call.index,
                        call.plan,
                        merged.names + call.names,
                        call.buffers,
                        call.dtypes,
                        merged.step,
                        merged.extra,
                    )
                )
            for call in checks.values():
                run(call, check=True)
            current = None
            finite = _functional.all_finite
            grads_used = [g for _, g in active]
            if self.skip_if_nonfinite and not all(finite(gs) for gs, _ in _by_dtype(grads_used)):
                self._forget(added)  # a skipped step makes no state either
                self.skipped_steps += 1
                return False
            if clipping:
                clip_grad_norm_([g for _, g in active], self.max_grad_norm)
            for call in calls:
                run(call)
                ran += 1
                for state in call.states:
                    state["step"] += 1
                    if after_update:
                        after_update(state, call.extra)
        except (TypeError, ValueError) as error:
            if not ran:  # refused before any call wrote: the state is left as it was found
                try:
                    if isinstance(error, ValueError) and not checked:
                        check = functools.partial(self._check_step_overlap, aligned, written, [])
                        self._relabel(error, check)
                    if current is not None:
                        _name_tensor(error, current.plan, current.names)
                finally:
                    self._forget(added)
            raise
        self._last_step = _LastStep(
            list(self.param_groups),
            [(plan.declaration, plan.arrays) for plan in plans],
            *stepped,
            calls,
        )
        return True

    def _calls_as_before(
        self,
        plans: List[_Plan],
        stepped: Tuple[List[str], List[np.dtype]],
        call_key: Optional[Callable[..., Any]],
    ) -> Optional[List[_StepCall]]:
        """The last step's calls, at this step's plans and counts, where building them again
        would give the same calls: the same groups, kernels and state arrays (a new lr does not
        matter) and names ``stepped``, each gradient of the dtype it had; every tensor's state
        entry and buffers the objects they were (so that none is created); and in each call,
        step counts and call keys still equal, and unequal to those of the group's other
        calls. Else None, and the step builds them. Building costs more per tensor than the
        kernels take on small tensors; checking this costs a fraction of it."""
        last = self._last_step
        groups = self.param_groups
        if (
            last is None
            or len(groups) != len(last.groups)
            or not all(map(operator.is_, groups, last.groups))
            or [(plan.declaration, plan.arrays) for plan in plans] != last.kernels
            or stepped[0] != last.names
            or stepped[1] != last.dtypes
        ):
            return None
        state_get, per_parameter = self.state.get, self._steps_per_parameter
        calls, keys = [], set()
        for call in last.calls:
            states = call.states
            if not all(map(operator.is_, map(state_get, call.names), states)):
                return None
            for b, arrays in call.arrays.items():
                if not all(map(operator.is_, map(dict.get, states, itertools.repeat(b)), arrays)):
                    return None
            steps = list(map(dict.get, states, itertools.repeat("step")))
            taken = steps[0]
            if None in steps:
                return None
            if per_parameter:  # one count for the call, and the build's error if it cannot grow
                if steps.count(taken) != len(steps) or taken > _MAX_STEPS_TAKEN:
                    return None
            elif max(steps) > _MAX_STEPS_TAKEN:
                return None
            extra = None
            if call_key is not None:
                extras = [call_key(groups[call.index], state) for state in states]
                extra = extras[0]
                if extras.count(extra) != len(extras):
                    return None
            step = taken + 1 if per_parameter else None
            keys.add((call.index, call.dtypes, step, extra))
            plan, lists = plans[call.index], (states, call.params, call.arrays)
            calls.append(
                _StepCall(
                    call.index, plan, call.names, call.buffers, call.dtypes, step, extra, lists
                )
            )
        return calls if len(keys) == len(calls) else None

    @staticmethod
    def _relabel(error: ValueError, check: Callable[[], None]) -> None:
        """After a lone call's kernel refused arrays that share memory, which it names by place
        in the call (``param[0] and grad[0] share memory``): the step's own overlap check,
        which names them by parameter, raises instead where it finds an overlap too."""
        if "share memory" not in str(error):
            return
        try:
            check()
        except ValueError as labelled:
            raise labelled from error

    def _check_step_overlap(
        self, grads: Dict[str, Any], calls: List[tuple], clipped: List[str]
    ) -> None:
        """That no gradient shares memory with a parameter, state or master that a step of
        several fused calls writes. Each call checks its own arrays, but only when it runs: a
        later call's error would come after the earlier calls had written, and a gradient
        written by an earlier call would be read changed. With clipping, the gradients it
        scales in place (``clipped``, every one given) count as written too, even in a step of
        one call."""
        read = [] if clipped else [n for names, _ in calls for n in names]
        gradients = [grads[n] for n in clipped or read]
        arrays: List[np.ndarray] = []
        columns: list = []
        for names, buffers in calls:
            state = [self.state[n] for n in names]
            _overlap.add_column(
                arrays, columns, "parameter", names, [self._params[n] for n in names]
            )
            for b in buffers:
                _overlap.add_column(
                    arrays, columns, f"state {b!r} of", names, [s[b] for s in state]
                )
        written = np.arange(len(gradients) + len(arrays)) >= len(read)
        pair = _overlap.first_overlap(_overlap.byte_extents(gradients + arrays), written)
        if pair is not None:
            labels = [("gradient", n) for n in clipped or read]
            labels += _overlap.names(columns)
            (what, n), (other, m) = labels[pair[0]], labels[pair[1]]
            raise ValueError(
                f"{what} {n!r} and {other} {m!r} share memory; an array that a step writes "
                "must not overlap any other"
            )

    def _init_buffer(self, group: Dict[str, Any], buffer: str) -> float:
        return 0.0

    def _new_buffer(self, group, plan: _Plan, array: str, key: str, p: np.ndarray, dtype: str):
        """A state buffer of ``p`` at its initial value: an array of ``dtype`` in ``p``'s layout,
        or for "int8" quantized, with uint8 codes if the kernel declares it never negative."""
        value = self._init_buffer(group, key)
        if dtype != "int8":
            return np.full_like(p, value, dtype=_DTYPES[dtype])
        signed = self._signed_codes(plan, array)
        return QuantizedState.full(p.shape, value, signed, order=_memory_order(p))

    def _signed_codes(self, plan: _Plan, array: str) -> bool:
        """Whether the int8 form of state ``array`` has signed codes: unless never negative."""
        return array not in plan.declaration.nonnegative_state

    def _state_shape(self, key: str, p: np.ndarray) -> Tuple[int, ...]:
        """The shape of state ``key`` of parameter ``p`` (the parameter's, unless factored)."""
        return p.shape

    def _call_key(self, group: Dict[str, Any], state: Dict[str, Any]) -> Any:
        """What else, read before this step creates any buffer, must be equal for tensors to
        share one fused call; passed to _update as ``extra``."""
        return None

    def _after_update(self, state: Dict[str, Any], extra: Any) -> None:
        """Record in a parameter's state what its call, run with ``extra``, changed but the
        arrays and the step."""

    def _forget(self, added: List[Tuple[str, Optional[str]]]) -> None:
        """Remove the state a refused step created: (name, key), or (name, None) for the entry."""
        for name, key in reversed(added):
            if key is None:
                del self.state[name]
            else:
                del self.state[name][key]

    def _update(
        self,
        plan: _Plan,
        params: List[np.ndarray],
        grads: List[np.ndarray],
        buffers: Dict[str, List[np.ndarray]],
        step: int,
        extra: Any,
        first: int,
        check: bool = False,
    ) -> None:
        """One fused call for tensors that share dtypes and step count; ``first`` is the place
        of its first tensor among the optimizer's parameters (see :meth:`_rounding`). With
        ``check``, the call's checks of its arguments alone: nothing is written."""
        arrays = {name: buffers[key] for name, key in plan.arrays}
        if "master" in buffers:
            arrays["master"] = buffers["master"]
        hyper = {**plan.hyper, "step": step} if plan.declaration.takes_step else plan.hyper
        hyper = {**hyper, **self._rounding(step, plan.declaration.takes_step, first)}
        name = plan.declaration.function_name
        self._call(
            _functional.FUNCTIONS[name],
            getattr(reference, name),
            _core.CHECKS[plan.declaration.name],
            (params, grads),
            {**arrays, **hyper},
            check,
        )

    def _call(self, fused, twin, checks, arrays: tuple, options: dict, check: bool) -> None:
        """``fused(*arrays, **options)``, or its :mod:`fusedopt.reference` ``twin`` with
        impl="reference", whose arguments the fused function's ``checks`` decide too; with
        ``check``, the checks alone."""
        reference_impl = self._reference_impl()
        if check or reference_impl:
            checks(*arrays, **options)
            if check:
                return
        (twin if reference_impl else fused)(*arrays, **options)

    def _reference_impl(self) -> bool:
        """Whether this optimizer computes with fusedopt.reference (impl, or reference_kernels)."""
        return self.impl == "reference" or (self.impl is None and _REFERENCE.get())

    def _rounding(self, step: int, takes_step: bool, first: int) -> Dict[str, Any]:
        """The kernel's ``seed`` (and ``stochastic_rounding``) for a call at ``step`` whose first
        tensor is parameter number ``first``: the random bits of stochastic rounding and of int8
        state. The kernel keys its bits by (seed, step, place in the call, element), so each
        call mixes ``first`` into the seed: the first tensors of two calls would share bits
        otherwise. Without a step argument the bits depend on the seed alone, so each step
        gets its own too."""
        seed = _call_seed(self.seed, first)
        if not takes_step:
            seed = (seed * _GOLDEN + step) % 2**64
        options: Dict[str, Any] = {"seed": seed}
        if self.stochastic_rounding:
            options["stochastic_rounding"] = True
        return options

    # ------------------------------------------------------------------ state

    def state_dict(self) -> Dict[str, Any]:
        """Plain data: hyperparameters by group, per-parameter state; copies, sharing no list or
        array with the optimizer."""
        return self._state_dict(copy=True)

    def _state_dict(self, copy: bool) -> Dict[str, Any]:
        """state_dict(); without ``copy``, the state's arrays are the optimizer's own (for
        save(), which only reads them: a copy of a large model's state would double it)."""
        groups = [
            {
                k: (list(v) if isinstance(v, (tuple, list)) else v)
                for k, v in g.items()
                if k != "params"
            }
            for g in self.param_groups
        ]
        state = {
            name: {
                k: (v.copy() if copy and isinstance(v, (np.ndarray, QuantizedState)) else v)
                for k, v in s.items()
            }
            for name, s in self.state.items()
        }
        return {
            "format_version": FORMAT_VERSION,
            "optimizer": type(self).__name__,
            "param_groups": groups,
            "state": state,
            "frozen": sorted(self._frozen),
            "skipped_steps": self.skipped_steps,
            "max_grad_norm": _check_max_grad_norm(self.max_grad_norm),
            "skip_if_nonfinite": self.skip_if_nonfinite,
            **self._storage_options(),
        }

    def _storage_options(self) -> Dict[str, Any]:
        return {
            "state_dtype": self.state_dtype,
            "master_weights": self.master_weights,
            "stochastic_rounding": self.stochastic_rounding,
            "seed": self.seed,
        }

    def load_state_dict(self, state_dict: Mapping[str, Any]) -> None:
        """Restore a state_dict(); checks everything first and raises ValueError (TypeError for
        an option of the wrong type) on any mismatch, leaving the optimizer unchanged.

        As in torch.optim, what the checkpoint holds replaces what this optimizer was built
        with: the groups' hyperparameters, ``max_grad_norm``, ``skip_if_nonfinite``,
        ``stochastic_rounding`` and ``seed`` (an option the checkpoint lacks is kept).
        ``state_dtype`` and ``master_weights`` must match the checkpoint's. int8 state loads
        bit for bit into a parameter of the memory layout (C or F order) it was saved with;
        into the other one, its blocks (which follow memory order) are decoded and encoded
        again in the parameter's, rounded to nearest."""
        self._load_state_dict(state_dict, adopt=False)

    def _load_state_dict(self, sd: Mapping[str, Any], adopt: bool) -> None:
        """load_state_dict(); with ``adopt``, the state's arrays are taken as they are where
        they have the parameter's memory layout, not copied: for a checkpoint just read, which
        nothing else holds (a copy of a large model's state would double it)."""
        if not isinstance(sd, Mapping):
            raise TypeError(f"state_dict: expected a dict, got {type(sd).__name__}")
        missing = [k for k in ("state", "param_groups") if k not in sd]
        if missing:
            raise ValueError(f"not a checkpoint of this library: no {' or '.join(missing)}")
        if sd.get("format_version") not in (1, FORMAT_VERSION):
            raise ValueError(
                f"unsupported checkpoint format {sd.get('format_version')!r} "
                f"(this fusedopt reads 1 to {FORMAT_VERSION})"
            )
        for key in ("state_dtype", "master_weights"):
            saved = sd.get(key, Optimizer._DEFAULT_OPTIONS[key])
            _check_same_storage(key, saved, getattr(self, key), " (Optimizer.load does)")
        stochastic_rounding = sd.get("stochastic_rounding", self.stochastic_rounding)
        seed = sd.get("seed", self.seed)
        max_grad_norm = sd.get("max_grad_norm", self.max_grad_norm)
        skip_if_nonfinite = sd.get("skip_if_nonfinite", self.skip_if_nonfinite)
        _check_flag("stochastic_rounding", stochastic_rounding)
        _check_flag("skip_if_nonfinite", skip_if_nonfinite)
        _check_seed(seed)
        max_grad_norm = _check_max_grad_norm(max_grad_norm)
        if sd.get("optimizer") != type(self).__name__:
            raise ValueError(
                f"checkpoint of a {sd.get('optimizer')} optimizer, this is a {type(self).__name__}"
            )
        groups = sd["param_groups"]
        if [g["names"] for g in groups] != [g["names"] for g in self.param_groups]:
            raise ValueError(
                "checkpoint parameter names or groups differ from this optimizer's: "
                f"{[g['names'] for g in groups]} vs "
                f"{[g['names'] for g in self.param_groups]}"
            )
        new_groups = []
        for saved, current in zip(groups, self.param_groups):
            unknown = set(saved) - set(current)
            if unknown:
                raise ValueError(f"checkpoint has unknown hyperparameters {sorted(unknown)}")
            group = dict(current)
            group.update(
                {
                    # the checkpoint's lists copied: the group must not share the caller's
                    k: (
                        tuple(v)
                        if isinstance(current.get(k), tuple)
                        else (list(v) if isinstance(v, list) else v)
                    )
                    for k, v in saved.items()
                    if k != "names"  # equal to the current names, and the caller's list
                }
            )
            self._validate_group(group)
            new_groups.append(group)
        # whether the int8 form of each of the plan's state buffers has signed codes, by
        # parameter (a buffer the plan does not use, kept from an earlier step, is not checked)
        signed: Dict[str, Dict[str, bool]] = {}
        for group in new_groups:
            plan = self._plan(group)
            keys = {k: self._signed_codes(plan, a) for a, k in plan.arrays}
            signed.update({n: keys for n in group["names"]})
        new_state = {}
        for name, s in sd["state"].items():
            if name not in self._params:
                raise ValueError(f"checkpoint has state for unknown parameter {name!r}")
            p = self._params[name]
            storage = self._storage[name]
            order = "F" if p.flags.f_contiguous and not p.flags.c_contiguous else "C"
            entry = {}
            for key, value in s.items():
                if key == "step":
                    try:
                        entry[key] = _steps_taken(value)
                    except ValueError as error:
                        raise ValueError(f"state of {name!r}: {error}") from None
                    continue
                if key in self._scalar_state:
                    entry[key] = self._scalar_state[key](f"state {key!r} of {name!r}", value)
                    continue
                if key == "master" and not storage.master:
                    raise ValueError(f"state of {name!r}: master weights, but it has none")
                if storage.state == "int8" and key != "master":
                    if not isinstance(value, QuantizedState) or value.shape != p.shape:
                        raise ValueError(
                            f"state {key!r} of {name!r}: expected a QuantizedState of shape "
                            f"{p.shape}, got {type(value).__name__} "
                            f"{getattr(value, 'shape', '')}"
                        )
                    want_signed = signed[name].get(key, value.signed)  # as _new_buffer makes them
                    if value.signed != want_signed:
                        want, got = ("int8", "uint8") if want_signed else ("uint8", "int8")
                        raise ValueError(
                            f"state {key!r} of {name!r}: expected a QuantizedState with {want} "
                            f"codes, got {got} codes"
                        )
                    _check_scales(f"state {key!r} of {name!r}", value.scales)
                    entry[key] = _quantized_in_order(value, order, adopt)
                    continue
                dtype = "float32" if key == "master" else storage.state
                value = np.asarray(value)
                shape = self._state_shape(key, p)
                if value.dtype != _DTYPES[dtype] or value.shape != shape:
                    raise ValueError(
                        f"state {key!r} of {name!r}: expected {dtype} {shape}"
                        f"{' like the parameter' if shape == p.shape else ''}, "
                        f"got {value.dtype} {value.shape}"
                    )
                entry[key] = np.asarray(value, order=order) if adopt else value.copy(order=order)
            if "step" not in entry:
                raise ValueError(f"state of {name!r}: missing step")
            if storage.master and "master" not in entry:  # else rebuilt from the rounded param
                raise ValueError(f"state of {name!r}: missing its float32 master weights")
            new_state[name] = entry
        frozen = sd.get("frozen", [])
        if not isinstance(frozen, (list, tuple, set)) or not all(
            isinstance(n, str) for n in frozen
        ):
            raise ValueError(
                f"checkpoint's frozen: expected a list of parameter names, got {frozen!r}"
            )
        frozen = set(frozen)
        unknown_frozen = sorted(map(str, frozen - set(self._params)))
        if unknown_frozen:
            raise ValueError(f"checkpoint has unknown frozen parameters {unknown_frozen}")
        skipped_steps = _skipped_steps(sd.get("skipped_steps", 0))
        self.param_groups, self.state, self._frozen = new_groups, new_state, frozen
        self._plans.clear()
        self.skipped_steps = skipped_steps
        self.max_grad_norm = max_grad_norm
        self.skip_if_nonfinite = bool(skip_if_nonfinite)
        self.stochastic_rounding = bool(stochastic_rounding)
        self.seed = int(seed)

    _DEFAULT_OPTIONS = {
        "state_dtype": None,
        "master_weights": False,
        "stochastic_rounding": False,
        "seed": 0,
    }

    def save(self, path: Union[str, os.PathLike]) -> None:
        """Write the state to an .npz file atomically: a temporary file in the same folder,
        flushed to disk, then renamed over ``path``; a crash never leaves a partial file."""
        _write_checkpoint(self._state_dict(copy=False), path)

    @staticmethod
    def read_checkpoint(path: Union[str, os.PathLike]) -> Dict[str, Any]:
        """The state_dict saved at ``path``; ValueError if it is not a complete checkpoint."""
        try:
            with open(path, "rb") as file, np.load(file, allow_pickle=False) as data:
                sd = json.loads(str(data["meta"]))
                for s in sd["state"].values():
                    for key, value in s.items():
                        if isinstance(value, str):  # format 1: the array's name
                            s[key] = data[value]
                        elif isinstance(value, dict) and "codes" in value:
                            s[key] = QuantizedState(data[value["codes"]], data[value["scales"]])
                        elif isinstance(value, dict):
                            s[key] = data[value["array"]].view(_DTYPES[value["dtype"]])
        except Exception as e:  # OSError, zipfile.BadZipFile, EOFError, ... of a bad file
            raise ValueError(f"{os.fspath(path)}: not a complete fusedopt checkpoint ({e})") from e
        return sd

    def load_checkpoint(self, path: Union[str, os.PathLike]) -> None:
        """Restore this optimizer from a file written by save()."""
        self._load_state_dict(self.read_checkpoint(path), adopt=True)

    @classmethod
    def load(cls, path: Union[str, os.PathLike], params: Params) -> "Optimizer":
        """A new optimizer of the saved class over ``params``, restored from ``path``."""
        sd = cls.read_checkpoint(path)
        kind = _REGISTRY.get(sd.get("optimizer"))
        if kind is None or not issubclass(kind, cls):
            raise ValueError(
                f"{os.fspath(path)} holds a {sd.get('optimizer')} optimizer, not a {cls.__name__}"
            )
        options = {k: sd.get(k, v) for k, v in Optimizer._DEFAULT_OPTIONS.items()}
        opt = kind(params, **options)
        opt._load_state_dict(sd, adopt=True)
        return opt

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        _REGISTRY[cls.__name__] = cls
        # The options a class passes on as **options, in its signature: help() and editors
        # list them with their defaults and types.
        own = inspect.signature(cls.__init__)
        kinds = {p.kind for p in own.parameters.values()}
        if inspect.Parameter.VAR_POSITIONAL in kinds or inspect.Parameter.VAR_KEYWORD not in kinds:
            cls.__signature__ = None  # its own, not a parent's rewritten one
        else:
            params = [
                p
                for p in own.parameters.values()
                if p.kind is not p.VAR_KEYWORD and p.name != "self"
            ]
            names = {p.name for p in params}
            options = [
                p
                for p in inspect.signature(Optimizer.__init__).parameters.values()
                if p.kind is p.KEYWORD_ONLY and p.name not in names
            ]
            cls.__signature__ = own.replace(parameters=params + options)

    def __repr__(self) -> str:
        groups = ", ".join(
            "{"
            + ", ".join(f"{k}={v!r}" for k, v in g.items() if k not in ("params", "names"))
            + f", {len(g['params'])} params}}"
            for g in self.param_groups
        )
        return f"{type(self).__name__}([{groups}])"


def _quantized_in_order(state: QuantizedState, order: str, adopt: bool) -> QuantizedState:
    """``state`` with its codes in memory order ``order``: bit for bit if its blocks already
    follow that order (``state`` itself if ``adopt``, else a copy), else decoded and encoded
    again (to nearest), since a block holds other elements in the other order."""
    codes = state.codes
    if (codes.flags.c_contiguous and codes.flags.f_contiguous) or _memory_order(codes) == order:
        return state if adopt else state.copy()
    return QuantizedState(*quantize._in_order(codes, state.scales, order))


def _json_scalar(value: Any) -> Any:
    """A NumPy scalar (a hyperparameter given as ``np.float32(1e-3)``, a ``np.uint64`` seed) as
    the Python number it holds, for json.dumps."""
    if isinstance(value, np.generic):
        return value.item()
    raise TypeError(f"Object of type {type(value).__name__} is not JSON serializable")


def _write_checkpoint(sd: Dict[str, Any], path: Union[str, os.PathLike]) -> None:
    """Write a state_dict to an .npz file atomically (see ``Optimizer.save``); its state
    entries are rewritten to name the arrays."""
    arrays = {}
    for i, s in enumerate(sd["state"].values()):
        for key, value in list(s.items()):
            at = f"state.{i}.{key}"
            if isinstance(value, QuantizedState):
                arrays[f"{at}.codes"], arrays[f"{at}.scales"] = value.codes, value.scales
                s[key] = {"codes": f"{at}.codes", "scales": f"{at}.scales"}
            elif isinstance(value, np.ndarray):
                # .npy has no bfloat16: its bits are stored as uint16, its name beside
                dtype = _dtype_name(value.dtype)
                arrays[at] = value.view(np.uint16) if dtype == "bfloat16" else value
                s[key] = {"array": at, "dtype": dtype}
    arrays["meta"] = np.array(json.dumps(sd, default=_json_scalar))
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=".fusedopt-", suffix=".npz.tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            np.savez(f, **arrays)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def _arguments(arguments: Dict[str, Any]) -> Dict[str, Any]:
    """A class's hyperparameters from the arguments of its ``__init__`` (its ``locals()`` on
    entry): each one but ``params`` and the options, ``betas`` as a tuple."""
    return {
        k: tuple(v) if k == "betas" else v
        for k, v in arguments.items()
        if k not in ("self", "params", "options", "__class__")
    }


def _check_real(
    group: Dict[str, Any],
    name: str,
    label: str,
    low: float = 0.0,
    high: float = math.inf,
    high_open: bool = True,
) -> None:
    """TypeError unless ``group[name]`` is a real number, ValueError unless it lies in
    ``[low, high)`` (or ``[low, high]``), with torch's wording."""
    value = group[name]
    if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)):
        raise TypeError(f"{label} must be a real number, got {type(value).__name__}")
    if not (low <= value and (value < high if high_open else value <= high)):
        raise ValueError(f"Invalid {label}: {value}")


class SGD(Optimizer):
    r"""Stochastic gradient descent with optional momentum, as ``torch.optim.SGD``.

    Without momentum :func:`fusedopt.sgd_`; with momentum :func:`fusedopt.momentum_`, whose
    buffer starts, as PyTorch's, as the first gradient itself (undamped):
    :math:`b_1 = g_1`, then :math:`b_t = \mu b_{t-1} + (1 - \tau) g_t`.

    Options common to every class (``state_dtype``, ``master_weights``,
    ``stochastic_rounding``, ``seed``, ``impl``, ``max_grad_norm``, ``skip_if_nonfinite``): see
    :meth:`Optimizer.__init__`.
    """

    kernel = "sgd"  # "momentum" for groups with momentum

    def __init__(
        self,
        params: Params,
        lr: float = 1e-3,
        momentum: float = 0.0,
        dampening: float = 0.0,
        weight_decay: float = 0.0,
        nesterov: bool = False,
        maximize: bool = False,
        **options: Any,
    ):
        super().__init__(params, _arguments(locals()), **options)

    def _declaration(self, group):
        return DECLARATIONS["momentum" if group["momentum"] != 0 else "sgd"]

    def _check_group(self, group):
        # Nesterov without momentum is an error even though plain SGD has no nesterov
        momentum = DECLARATIONS["momentum"]
        momentum.check({h.name: group[h.name] for h in momentum.arguments})

    def _call_key(self, group, state):
        # this step creates the buffer (never without momentum: fusedopt.torch rebuilds its
        # calls after a first momentum step, and keeps an int8 buffer as its codes and scales)
        return group["momentum"] != 0 and not (
            "momentum_buffer" in state or "momentum_buffer.codes" in state
        )

    def _update(self, plan, params, grads, buffers, step, first_momentum_step, first, check=False):
        # b_1 = g_1: from the new zero buffer with no dampening, mu * 0 + 1 * g is exactly g.
        if first_momentum_step and plan.declaration.name == "momentum":
            plan = plan._replace(hyper={**plan.hyper, "dampening": 0.0})
        super()._update(plan, params, grads, buffers, step, None, first, check)


class Momentum(Optimizer):
    r"""Momentum as in the textbooks: an exponential moving average of the gradients.

    .. math::
        v_t = \beta v_{t-1} + (1 - \beta)\, g_t, \qquad \theta_t = \theta_{t-1} - \alpha v_t

    :func:`fusedopt.momentum_` with dampening equal to the momentum; ``beta`` = :math:`\beta`,
    ``lr`` = :math:`\alpha`.

    Options common to every class (``state_dtype``, ``master_weights``,
    ``stochastic_rounding``, ``seed``, ``impl``, ``max_grad_norm``, ``skip_if_nonfinite``): see
    :meth:`Optimizer.__init__`.
    """

    kernel = "momentum"

    def __init__(
        self,
        params: Params,
        lr: float = 1e-2,
        beta: float = 0.9,
        weight_decay: float = 0.0,
        maximize: bool = False,
        **options: Any,
    ):
        super().__init__(params, _arguments(locals()), **options)

    def _check_group(self, group):
        _check_real(group, "beta", "beta value", 0.0, 1.0)

    def _kernel_arguments(self, group):
        return dict(
            lr=group["lr"],
            momentum=group["beta"],
            dampening=group["beta"],
            weight_decay=group["weight_decay"],
            maximize=group["maximize"],
        )


class Adam(Optimizer):
    """Adam (Kingma & Ba 2015), as ``torch.optim.Adam``: :func:`fusedopt.adam_`, with AMSGrad
    and decoupled (AdamW) weight decay as options.

    Options common to every class (``state_dtype``, ``master_weights``,
    ``stochastic_rounding``, ``seed``, ``impl``, ``max_grad_norm``, ``skip_if_nonfinite``): see
    :meth:`Optimizer.__init__`.
    """

    kernel = "adam"

    def __init__(
        self,
        params: Params,
        lr: float = 1e-3,
        betas: Tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0.0,
        amsgrad: bool = False,
        maximize: bool = False,
        decoupled_weight_decay: bool = False,
        **options: Any,
    ):
        super().__init__(params, _arguments(locals()), **options)


class AdamW(Adam):
    """AdamW (Loshchilov & Hutter 2019), as ``torch.optim.AdamW``: Adam with decoupled weight
    decay, 1e-2 by default.

    Options common to every class (``state_dtype``, ``master_weights``,
    ``stochastic_rounding``, ``seed``, ``impl``, ``max_grad_norm``, ``skip_if_nonfinite``): see
    :meth:`Optimizer.__init__`.
    """

    kernel = "adamw"

    def _check_group(self, group):
        if not group.get("decoupled_weight_decay", True):
            raise ValueError(
                "AdamW always decouples weight decay: use Adam for decoupled_weight_decay=False"
            )

    def __init__(
        self,
        params: Params,
        lr: float = 1e-3,
        betas: Tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 1e-2,
        amsgrad: bool = False,
        maximize: bool = False,
        **options: Any,
    ):
        super().__init__(params, lr, betas, eps, weight_decay, amsgrad, maximize, True, **options)


class Adamax(Optimizer):
    """Adamax (Kingma & Ba 2015, section 7.1), as ``torch.optim.Adamax``:
    :func:`fusedopt.adamax_`.

    Options common to every class (``state_dtype``, ``master_weights``,
    ``stochastic_rounding``, ``seed``, ``impl``, ``max_grad_norm``, ``skip_if_nonfinite``): see
    :meth:`Optimizer.__init__`.
    """

    kernel = "adamax"

    def __init__(
        self,
        params: Params,
        lr: float = 2e-3,
        betas: Tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0.0,
        maximize: bool = False,
        **options: Any,
    ):
        super().__init__(params, _arguments(locals()), **options)


class NAdam(Optimizer):
    r"""NAdam (Dozat 2016), as ``torch.optim.NAdam``: :func:`fusedopt.nadam_`, with torch's
    momentum schedule (``momentum_decay``) and decoupled (NAdamW) weight decay as an option.
    The state is ``exp_avg``, ``exp_avg_sq`` and, as torch's, ``mu_product``: the product of
    the momentum coefficients :math:`\mu_1 \cdots \mu_t` (a float), each taken with its
    step's beta1, so a schedule that changes beta1 (a one-cycle schedule's momentum) takes
    the steps torch's takes. A checkpoint without it (written before fusedopt kept it)
    continues from the product of its step with the current beta1, as it was computed then.

    Options common to every class (``state_dtype``, ``master_weights``,
    ``stochastic_rounding``, ``seed``, ``impl``, ``max_grad_norm``, ``skip_if_nonfinite``): see
    :meth:`Optimizer.__init__`.
    """

    kernel = "nadam"

    def __init__(
        self,
        params: Params,
        lr: float = 2e-3,
        betas: Tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0.0,
        momentum_decay: float = 4e-3,
        decoupled_weight_decay: bool = False,
        maximize: bool = False,
        **options: Any,
    ):
        super().__init__(params, _arguments(locals()), **options)

    _scalar_state = {"mu_product": _check_mu_product}

    def _call_key(self, group, state):
        # the product after this step (torch's mu_product *= mu_t): tensors share a call only
        # where it is equal
        beta1, psi, step = float(group["betas"][0]), float(group["momentum_decay"]), state["step"]
        before = state.get("mu_product")
        if before is None:
            before = reference._nadam_mu_product(beta1, psi, step)
        return before * (beta1 * (1 - 0.5 * 0.96 ** ((step + 1) * psi)))

    def _update(self, plan, params, grads, buffers, step, mu_product, first, check=False):
        plan = plan._replace(hyper={**plan.hyper, "mu_product": mu_product})
        super()._update(plan, params, grads, buffers, step, None, first, check)

    def _after_update(self, state, mu_product):
        state["mu_product"] = mu_product


class RAdam(Optimizer):
    """RAdam (Liu et al. 2020), as ``torch.optim.RAdam``: :func:`fusedopt.radam_`, rectified
    Adam steps once the SMA length exceeds 5, and decoupled weight decay as an option.

    Options common to every class (``state_dtype``, ``master_weights``,
    ``stochastic_rounding``, ``seed``, ``impl``, ``max_grad_norm``, ``skip_if_nonfinite``): see
    :meth:`Optimizer.__init__`.
    """

    kernel = "radam"

    def __init__(
        self,
        params: Params,
        lr: float = 1e-3,
        betas: Tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0.0,
        decoupled_weight_decay: bool = False,
        maximize: bool = False,
        **options: Any,
    ):
        super().__init__(params, _arguments(locals()), **options)


class Adagrad(Optimizer):
    """Adagrad (Duchi et al. 2011), as ``torch.optim.Adagrad``: :func:`fusedopt.adagrad_`, the
    accumulator starting at ``initial_accumulator_value``.

    Options common to every class (``state_dtype``, ``master_weights``,
    ``stochastic_rounding``, ``seed``, ``impl``, ``max_grad_norm``, ``skip_if_nonfinite``): see
    :meth:`Optimizer.__init__`.
    """

    kernel = "adagrad"
    state_names = {"sum_sq": "sum"}

    def __init__(
        self,
        params: Params,
        lr: float = 1e-2,
        lr_decay: float = 0.0,
        weight_decay: float = 0.0,
        initial_accumulator_value: float = 0.0,
        eps: float = 1e-10,
        maximize: bool = False,
        **options: Any,
    ):
        super().__init__(params, _arguments(locals()), **options)

    def _check_group(self, group):
        _check_real(group, "initial_accumulator_value", "initial_accumulator_value")

    def _init_buffer(self, group, buffer):
        return group["initial_accumulator_value"]


class RMSprop(Optimizer):
    """RMSprop (Hinton 2012), as ``torch.optim.RMSprop``: :func:`fusedopt.rmsprop_`, centered
    and with momentum as options.

    Options common to every class (``state_dtype``, ``master_weights``,
    ``stochastic_rounding``, ``seed``, ``impl``, ``max_grad_norm``, ``skip_if_nonfinite``): see
    :meth:`Optimizer.__init__`.
    """

    kernel = "rmsprop"

    def __init__(
        self,
        params: Params,
        lr: float = 1e-2,
        alpha: float = 0.99,
        eps: float = 1e-8,
        weight_decay: float = 0.0,
        momentum: float = 0.0,
        centered: bool = False,
        maximize: bool = False,
        **options: Any,
    ):
        super().__init__(params, _arguments(locals()), **options)


class Lion(Optimizer):
    """Lion (Chen et al. 2023): :func:`fusedopt.lion_`, the sign of an interpolated momentum
    with decoupled weight decay.

    Options common to every class (``state_dtype``, ``master_weights``,
    ``stochastic_rounding``, ``seed``, ``impl``, ``max_grad_norm``, ``skip_if_nonfinite``): see
    :meth:`Optimizer.__init__`.
    """

    kernel = "lion"

    def __init__(
        self,
        params: Params,
        lr: float = 1e-4,
        betas: Tuple[float, float] = (0.9, 0.99),
        weight_decay: float = 0.0,
        maximize: bool = False,
        **options: Any,
    ):
        super().__init__(params, _arguments(locals()), **options)


class LAMB(Optimizer):
    """LAMB (You et al. 2020), as ``pytorch_optimizer.Lamb`` with its defaults:
    :func:`fusedopt.lamb_`, Adam directions scaled per tensor by the trust ratio
    ``min(||param||, clamp) / (||update|| + eps)``; decoupled weight decay by default, an L2
    term in the update with ``decoupled_weight_decay=False``. Each group is one fused call of
    two passes (the norms of every tensor, then the update); the state is ``exp_avg`` and
    ``exp_avg_sq`` (``pytorch_optimizer``'s names).

    Options common to every class (``state_dtype``, ``master_weights``,
    ``stochastic_rounding``, ``seed``, ``impl``, ``max_grad_norm``, ``skip_if_nonfinite``): see
    :meth:`Optimizer.__init__`.
    """

    kernel = "lamb"

    def __init__(
        self,
        params: Params,
        lr: float = 1e-3,
        betas: Tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-6,
        weight_decay: float = 0.0,
        decoupled_weight_decay: bool = True,
        clamp: float = 10.0,
        maximize: bool = False,
        **options: Any,
    ):
        super().__init__(params, _arguments(locals()), **options)


class _ScheduleFree(Optimizer):
    r"""Schedule-Free optimizers (Defazio et al. 2024) with the ``schedulefree`` package's
    conventions. The parameters hold :math:`y` (where gradients are taken) in train mode and
    the average :math:`x` (the weights to evaluate and to keep) in eval mode: call
    :meth:`eval` before evaluating or saving the model's weights and :meth:`train` before
    the next step. Switching is one element-wise pass over the parameters and ``z``,
    :math:`\theta \leftarrow \theta + w (z - \theta)` with :math:`w = 1 - 1/\beta` (to eval) or
    :math:`1 - \beta` (to train), rounded once on store as a step rounds (stochastically for a
    bfloat16 or float16 param with ``stochastic_rounding``, on bits of their own from the seed,
    the group's step and the direction). Unlike ``schedulefree``'s classes, a new optimizer
    starts in train mode (at the start :math:`x = y = z`, so no switch is due).

    Each group keeps ``k`` (its steps so far), ``lr_max`` and ``weight_sum`` (the running
    maximum of the warmed-up learning rate and sum of the averaging weights) and
    ``train_mode``, as ``schedulefree``'s groups do; they are in :meth:`state_dict` and the
    checkpoints. As there, a group's step count, warmup and averaging weights count every
    step of the optimizer, whether or not a parameter had a gradient. The state of a parameter
    is ``z`` (started at the parameter's value) and, for AdamW, ``exp_avg_sq``.
    """

    #: the group's entry that is the interpolation weight beta of y = (1 - beta) z + beta x
    beta_name = ""
    _steps_per_parameter = False  # the kernel's step is the group's k, as in the torch adapter

    def __init__(self, params: Params, defaults: Dict[str, Any], **options: Any):
        defaults = dict(defaults, k=0, lr_max=0.0, weight_sum=0.0, train_mode=True)
        super().__init__(params, defaults, **options)

    def add_param_group(self, group: Dict[str, Any]) -> None:
        """As :meth:`Optimizer.add_param_group`; a group added without ``train_mode`` takes
        the optimizer's mode (:func:`_in_current_mode`)."""
        super().add_param_group(_in_current_mode(self.param_groups, group))

    def _check_group(self, group):
        k = group["k"]
        if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 0:
            raise ValueError(f"Invalid k: {k!r} (the group's step count, an integer >= 0)")
        if not isinstance(group["train_mode"], (bool, np.bool_)):
            raise TypeError(f"train_mode must be a bool, got {type(group['train_mode']).__name__}")

    def _new_buffer(self, group, plan, array, key, p, dtype):
        if key != "z":
            return super()._new_buffer(group, plan, array, key, p, dtype)
        # z starts at x = y = the parameter (its float32 master, where it has one, is p)
        if dtype != "int8":
            return p.astype(_DTYPES[dtype], order="K")
        # p's values rounded to float32 and encoded, a piece at a time (no float32 copy of p)
        return QuantizedState(*quantize._encode(p, True, None, quantize.BLOCK))

    def _call_key(self, group, state):
        return group["k"] + 1  # the kernel's step is the group's, as in schedulefree

    def _update(self, plan, params, grads, buffers, step, group_step, first, check=False):
        super()._update(plan, params, grads, buffers, group_step, None, first, check)

    def step(self, grads: Grads) -> bool:
        """One Schedule-Free step (see :meth:`Optimizer.step`); in eval mode a RuntimeError
        (call :meth:`train` first), as ``schedulefree`` raises."""
        self._check_train_mode()
        if not super().step(grads):
            return False
        for group in self.param_groups:
            if group["frozen"]:
                continue
            hyper = self._kernel_arguments(group)
            group["k"] += 1
            _, group["lr_max"], group["weight_sum"], _ = reference.schedulefree_averaging(
                group["k"],
                hyper["lr"],
                warmup_steps=hyper["warmup_steps"],
                r=hyper["r"],
                weight_lr_power=hyper["weight_lr_power"],
                lr_max=hyper["lr_max"],
                weight_sum=hyper["weight_sum"],
            )
        return True

    def _check_train_mode(self) -> None:
        if not all(g["train_mode"] for g in self.param_groups):
            raise RuntimeError(
                f"{type(self).__name__}.step() in eval mode: call .train() before stepping "
                "(the parameters hold the average x in eval mode)"
            )

    def train(self) -> None:
        """Switch the parameters to :math:`y`, where gradients are taken (no-op in train mode)."""
        self._switch(True)

    def eval(self) -> None:
        """Switch the parameters to the average :math:`x`, the weights to evaluate and keep
        (no-op in eval mode)."""
        self._switch(False)

    def _switch_plan(self, to_train: bool) -> List[Tuple[Dict[str, Any], float]]:
        """The groups a switch moves and their weights, everything checked: a switch that
        stopped halfway would leave some parameters at x and others at y, and a second attempt
        would move the first ones twice."""
        plan = []
        for group in self.param_groups:
            if group["train_mode"] == to_train:
                continue
            self._validate_group(group)
            plan.append((group, _switch_weight(group[self.beta_name], to_train, self.beta_name)))
            for name, p in zip(group["names"], group["params"]):
                state = self.state.get(name, {})
                if "z" in state:
                    _check_switch(name, p, state["z"], state.get("master"))
        return plan

    def _switch(self, to_train: bool) -> None:
        for group, weight in self._switch_plan(to_train):  # checked before anything is written
            for name, p in zip(group["names"], group["params"]):
                state = self.state.get(name, {})
                if "z" in state:
                    key = (
                        _switch_key(self.seed, group["k"], to_train, self._position[name])
                        if self.stochastic_rounding
                        else None
                    )
                    _lerp_(p, state["z"], weight, state.get("master"), key)
            group["train_mode"] = to_train


_REGISTRY.pop("_ScheduleFree")  # a base, not an optimizer from_config builds


def _switch_key(seed: int, k: int, to_train: bool, position: int) -> int:
    """The key of the random bits with which a Schedule-Free switch of parameter number
    ``position`` at its group's step ``k`` rounds stochastically: a stream apart from every
    step's (keyed by a call's seed, a step and a place in the call), and from the other
    direction's."""
    return reference._tensor_key(reference._mix64(seed ^ _SWITCH_SALT), 2 * k + to_train, position)


_SWITCH_SALT = 0x5F3759DF5F3759DF


def _in_current_mode(param_groups: List[Dict[str, Any]], group: Dict[str, Any]) -> Dict[str, Any]:
    """A Schedule-Free group to add, with the mode of the groups there (where it gives none):
    its parameters, y = x = z until their first step, are in it already."""
    if param_groups and "train_mode" not in group:
        return {**group, "train_mode": param_groups[0]["train_mode"]}
    return group


def _switch_weight(value: Any, to_train: bool, beta_name: str) -> float:
    """The weight of a Schedule-Free switch's interpolation toward z, for the group's
    ``beta_name`` entry ``value`` (AdamW's betas pair, of which beta1; SGD's momentum):
    1 - beta to y, 1 - 1/beta to x, which y and z determine only for beta > 0 (else y = z),
    so a ValueError then."""
    beta = value[0] if isinstance(value, (tuple, list)) else value
    if to_train:
        return 1 - beta
    if beta == 0:
        raise ValueError(
            f"eval() with {beta_name} {beta!r}: the parameters hold y = z, from which the "
            "average x cannot be recovered (the interpolation needs a weight > 0)"
        )
    return 1 - 1 / beta


def _check_switch(name: str, param: np.ndarray, z: Any, master: Optional[np.ndarray]) -> None:
    """ValueError/TypeError unless a Schedule-Free switch can write ``param`` (and its master)
    from state ``z``: checked for every parameter before the first is written."""
    _check_param(name, param)  # made read-only, say, since it was added
    for key, a in (("z", z), ("master", master)):
        if a is None:
            continue
        if not isinstance(a, (np.ndarray, QuantizedState)) or (
            key == "master" and isinstance(a, QuantizedState)
        ):
            raise TypeError(
                f"state {key!r} of {name!r}: expected a numpy.ndarray"
                f"{' or QuantizedState' if key == 'z' else ''}, got {type(a).__name__}"
            )
        if a.shape != param.shape:
            raise ValueError(
                f"state {key!r} of {name!r}: expected the parameter's shape {param.shape}, got "
                f"{a.shape}"
            )
    if master is not None and not master.flags.writeable:
        raise ValueError(f"state 'master' of {name!r}: array is read-only")


def _lerp_(
    param: np.ndarray,
    z: Any,
    weight: float,
    master: Optional[np.ndarray],
    key: Optional[int] = None,
) -> None:
    """param <- param + weight * (z - param), computed as the kernels compute (float32, float64
    for float64) and rounded once on store; with a master, on the master and the param is the
    master rounded. With a random-bits ``key`` (:func:`_switch_key`) a bfloat16 or float16
    param is rounded stochastically, as a step with ``stochastic_rounding`` stores it: else
    each switch would move it by a rounding error of the same sign, and switching to eval and
    back every few steps would add them up. The arrays are taken in pieces in the param's
    memory order (the random bits' element order), so that a switch of arrays laid out alike,
    as the optimizers make them, needs no temporary of the whole param."""
    order = _memory_order(param)
    laid_out = "C_CONTIGUOUS" if order == "C" else "F_CONTIGUOUS"
    if not all(a.flags[laid_out] for a in (param, master) if a is not None):
        # No flat view to write pieces through (a torch parameter whose .data a strided view
        # replaced, a master laid out otherwise): the switch runs on copies laid out as the
        # param's elements are ordered in memory (its random bits' order), written back.
        work = param.copy(order="K")
        work_master = None
        if master is not None:
            work_master = np.empty_like(work, dtype=master.dtype)
            work_master[...] = master
        _lerp_(work, z, weight, work_master, key)
        param[...] = work
        if master is not None:
            master[...] = work_master
        return
    target = param if master is None else master
    compute = np.float64 if target.dtype == np.float64 else np.float32
    param_out, target_in, master_out = (
        a if a is None else a.reshape(-1, order=order) for a in (param, target, master)
    )
    codes = scales = None
    if isinstance(z, QuantizedState) and (
        z.codes.ndim < 2 or _memory_order(z.codes) == order  # its blocks in that order
    ):
        codes, scales = z.codes.reshape(-1, order=order), z.scales
    else:  # a copy where laid out otherwise
        z = (z.dequantize() if isinstance(z, QuantizedState) else z).reshape(-1, order=order)
    stochastic = reference._STOCHASTIC.get(param.dtype) if key is not None else None
    for piece, its_scales in quantize._pieces(param.size, quantize.BLOCK):
        if codes is None:
            zs = z[piece].astype(compute)
        else:
            zs = quantize._decode(codes[piece], scales[its_scales], quantize.BLOCK)
        x = target_in[piece].astype(compute)
        x += weight * (zs - x)
        if master is not None:
            master_out[piece] = x
        if stochastic is None:
            param_out[piece] = x
        else:
            param_out[piece] = stochastic(x, key, 0, start=piece.start)


class ScheduleFreeAdamW(_ScheduleFree):
    """Schedule-Free AdamW (Defazio et al. 2024), as ``schedulefree.AdamWScheduleFree``:
    :func:`fusedopt.schedulefree_adamw_`, with linear warmup over ``warmup_steps``, polynomial
    weighting ``r`` and ``weight_lr_power``; :meth:`train` and :meth:`eval` switch the
    parameters between :math:`y` and the average :math:`x` (see ``_ScheduleFree``).

    Options common to every class (``state_dtype``, ``master_weights``,
    ``stochastic_rounding``, ``seed``, ``impl``, ``max_grad_norm``, ``skip_if_nonfinite``): see
    :meth:`Optimizer.__init__`.
    """

    kernel = "schedulefree_adamw"
    beta_name = "betas"

    def __init__(
        self,
        params: Params,
        lr: float = 0.0025,
        betas: Tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0.0,
        warmup_steps: int = 0,
        r: float = 0.0,
        weight_lr_power: float = 2.0,
        **options: Any,
    ):
        super().__init__(params, _arguments(locals()), **options)


class ScheduleFreeSGD(_ScheduleFree):
    """Schedule-Free SGD (Defazio et al. 2024), as ``schedulefree.SGDScheduleFree``:
    :func:`fusedopt.schedulefree_sgd_`, ``momentum`` in (0, 1) being the interpolation
    between :math:`z` and the average :math:`x`; warmup and weighting as
    :class:`ScheduleFreeAdamW`.

    Options common to every class (``state_dtype``, ``master_weights``,
    ``stochastic_rounding``, ``seed``, ``impl``, ``max_grad_norm``, ``skip_if_nonfinite``): see
    :meth:`Optimizer.__init__`.
    """

    kernel = "schedulefree_sgd"
    beta_name = "momentum"

    def __init__(
        self,
        params: Params,
        lr: float = 1.0,
        momentum: float = 0.9,
        weight_decay: float = 0.0,
        warmup_steps: int = 0,
        r: float = 0.0,
        weight_lr_power: float = 2.0,
        **options: Any,
    ):
        super().__init__(params, _arguments(locals()), **options)


def _matrix_grads(dtype: str) -> Tuple[str, ...]:
    """The gradient dtypes muon_ and adafactor_ take for a ``dtype`` parameter: its own, and
    float32 for float32 and low-precision ones (float64 parameters take float64 only)."""
    return (dtype,) if dtype in ("float32", "float64") else (dtype, "float32")


class Muon(Optimizer):
    r"""Muon (Jordan et al. 2024), as ``torch.optim.Muon``: :func:`fusedopt.muon_`, for the 2-D
    weights of hidden layers. Momentum with a Nesterov-style average, the update
    orthogonalized by ``ns_steps`` Newton-Schulz steps (in float32, float64 for float64
    params, with Eigen's matrix products on all threads; torch runs them in bfloat16), then
    decoupled weight decay and a step scaled by ``adjust_lr_fn``. State: ``momentum_buffer``.

    Muon is for hidden layers' matrices only: a parameter that is not 2-D raises ValueError.
    Optimize embeddings, output heads, biases and gains with AdamW, in an optimizer of their
    own, as Muon's authors do::

        hidden = {n: p for n, p in params.items() if p.ndim == 2 and n not in ("embed", "head")}
        other = {n: p for n, p in params.items() if n not in hidden}
        muon = optim.Muon(hidden, lr=0.02, weight_decay=0.01)
        adamw = optim.AdamW(other, lr=3e-4, weight_decay=0.01)
        ...
        muon.step({n: grads[n] for n in hidden})
        adamw.step({n: grads[n] for n in other})

    Options as for every optimizer: ``state_dtype`` (the momentum buffer: float32, bfloat16 or
    int8, block-quantized with signed codes), ``master_weights`` (float32 masters of bfloat16
    and float16 matrices: the step runs on them), ``stochastic_rounding`` and ``seed`` (the
    kernel takes no step, so each step's seed is derived from ``seed`` and the step count),
    ``impl``, ``max_grad_norm`` and ``skip_if_nonfinite``: see :meth:`Optimizer.__init__`.
    """

    def __init__(
        self,
        params: Params,
        lr: float = 1e-3,
        weight_decay: float = 0.1,
        momentum: float = 0.95,
        nesterov: bool = True,
        ns_coefficients: Tuple[float, float, float] = reference.MUON_NS_COEFFICIENTS,
        eps: float = 1e-7,
        ns_steps: int = 5,
        adjust_lr_fn: Optional[str] = None,
        **options: Any,
    ):
        hyper = _arguments(locals())
        hyper["ns_coefficients"] = tuple(ns_coefficients)
        super().__init__(params, hyper, **options)

    def _storage_of(self, what: str, p: np.ndarray) -> _Storage:
        if p.ndim != 2:
            raise ValueError(
                f"Muon only supports 2-D parameters: {what} has shape {p.shape}; optimize it "
                "with e.g. AdamW in another optimizer or parameter group"
            )
        dtype = _dtype_name(p.dtype)
        master, state = self._master_and_state(what, dtype)
        grads = _matrix_grads(dtype)
        return _Storage("float32" if master else dtype, state, grads, master)

    def _signed_codes(self, plan, array):
        return True  # the momentum buffer

    def _build_plan(self, group: Dict[str, Any]) -> _Plan:
        hyper = {k: group[k] for k in self.defaults if k != "frozen"}
        _matrix._check_hyper(
            hyper["lr"],
            hyper["weight_decay"],
            hyper["momentum"],
            hyper["nesterov"],
            hyper["ns_coefficients"],
            hyper["eps"],
            hyper["ns_steps"],
            hyper["adjust_lr_fn"],
        )
        return _Plan(None, hyper, (("momentum_buffer", "momentum_buffer"),))

    def _update(self, plan, params, grads, buffers, step, extra, first, check=False) -> None:
        arrays = (params, grads, buffers["momentum_buffer"])
        options = {"master": buffers.get("master"), **plan.hyper}
        options.update(self._rounding(step, False, first))
        checks = functools.partial(_matrix.check_arguments, _matrix.muon_)
        self._call(_matrix.muon_, reference.muon_, checks, arrays, options, check)


class Adafactor(Optimizer):
    r"""Adafactor (Shazeer & Stern 2018), as ``torch.optim.Adafactor`` (torch 2.13's variant):
    :func:`fusedopt.adafactor_`. The second moment of a parameter of 2 or more dimensions is
    factored over its last two: ``row_var`` and ``col_var`` (torch's shapes), about 0 bytes of
    state per element for large matrices (4 (rows + cols) / (rows cols) in float32); vectors keep
    a full ``variance`` (4 bytes per element). The step size is relative to the parameter's RMS
    and the update is clipped to RMS ``d``. ``foreach`` is accepted for torch's signature and
    has no effect: every step is fused.

    Options as for every optimizer (see :meth:`Optimizer.__init__`): ``master_weights``
    (float32 masters of bfloat16 and float16 parameters: the step is the float32 step of the
    master), ``stochastic_rounding``
    and ``seed`` (for bfloat16 and float16 parameters), ``impl``, ``max_grad_norm`` and
    ``skip_if_nonfinite``. The moments are float32 (float64 for float64 parameters), and
    ``state_dtype`` other than None or "float32" is refused (ValueError): the factored moments
    are about 0 bytes per element, so bfloat16 or int8 ones would save nothing but add
    rounding error; only the full ``variance`` of vectors, small beside the matrices, could
    shrink.
    """

    def __init__(
        self,
        params: Params,
        lr: float = 1e-2,
        beta2_decay: float = -0.8,
        eps: Tuple[Optional[float], float] = (None, 1e-3),
        d: float = 1.0,
        weight_decay: float = 0.0,
        *,
        foreach: Optional[bool] = None,
        maximize: bool = False,
        **options: Any,
    ):
        hyper = _arguments(locals())
        hyper["eps"] = tuple(eps)
        if _state_dtype(options.get("state_dtype")) not in (None, "float32"):
            raise ValueError(
                "Adafactor keeps float32 moments: state_dtype must be None or float32 (factored, "
                "they take about 0 bytes per element: narrower ones would save nothing)"
            )
        self._names_of: Dict[int, str] = {}
        super().__init__(params, hyper, **options)

    def _storage_of(self, what: str, p: np.ndarray) -> _Storage:
        dtype = _dtype_name(p.dtype)
        if p.ndim >= 2 and not p.flags.c_contiguous:
            raise ValueError(f"Adafactor: {what} must be C-contiguous")
        master, state = self._master_and_state(what, dtype)
        grads = _matrix_grads(dtype)
        return _Storage("float32" if master else dtype, state, grads, master)

    def add_param_group(self, group: Dict[str, Any]) -> None:
        super().add_param_group(group)
        added = self.param_groups[-1]
        self._names_of.update({id(p): n for n, p in zip(added["names"], added["params"])})

    def _state_shape(self, key: str, p: np.ndarray) -> Tuple[int, ...]:
        return _matrix.adafactor_state_shapes(p.shape).get(key, p.shape)

    def _build_plan(self, group: Dict[str, Any]) -> _Plan:
        hyper = {k: group[k] for k in self.defaults if k not in ("frozen", "foreach")}
        _matrix._check_adafactor_hyper(
            1,
            hyper["lr"],
            hyper["beta2_decay"],
            tuple(hyper["eps"]) if isinstance(hyper["eps"], list) else hyper["eps"],
            hyper["d"],
            hyper["weight_decay"],
            hyper["maximize"],
        )
        return _Plan(None, hyper, ())

    def _update(self, plan, params, grads, buffers, step, extra, first, check=False) -> None:
        states, added = [], []
        for p in params:
            name = self._names_of[id(p)]
            state = self.state[name]
            for key, shape in _matrix.adafactor_state_shapes(p.shape).items():
                if key not in state:
                    state[key] = np.zeros(
                        shape, np.float64 if p.dtype == np.float64 else np.float32
                    )
                    added.append((name, key))
            states.append(state)
        moments = {k: [s.get(k) for s in states] for k in ("row_var", "col_var", "variance")}
        try:
            self._step_factored(
                plan, params, grads, moments, buffers.get("master"), step, first, check
            )
        except (TypeError, ValueError):  # refused before it wrote: the moments were not made
            self._forget(added)
            raise

    def _step_factored(self, plan, params, grads, moments, masters, step, first, check=False):
        """The fused (or reference) call on the moments' lists, by name (the torch adapter's
        too, whose state is its own); with ``check``, only its checks."""
        arrays = (params, grads, moments["row_var"], moments["col_var"], moments["variance"])
        options = {"step": step, "master": masters, **plan.hyper}
        options.update(self._rounding(step, True, first))
        checks = functools.partial(_matrix.check_arguments, _matrix.adafactor_)
        self._call(_matrix.adafactor_, reference.adafactor_, checks, arrays, options, check)


_OPTIONS = (
    "max_grad_norm",
    "skip_if_nonfinite",
    "impl",
    "state_dtype",
    "master_weights",
    "stochastic_rounding",
    "seed",
)


def from_config(name: Union[str, type], params: Params, **hyperparameters: Any) -> Optimizer:
    """The optimizer class called ``name`` over ``params``, built from a flat dict of
    hyperparameters such as a hyperparameter search samples.

    ``name`` is a class name in any case (``"adamw"``, ``"AdamW"``) or an :class:`Optimizer`
    subclass. Samplers draw scalars, so ``beta1`` and ``beta2`` may stand for ``betas`` (a
    missing one keeps the class's default). The options every optimizer takes
    (``max_grad_norm``, ``state_dtype``, ``impl``, ...) pass through.

    An unknown name raises ValueError listing the classes; a hyperparameter the class does not
    take raises TypeError listing the ones it does, before anything is built.

    >>> opt = from_config("AdamW", params, lr=3e-4, beta1=0.9, beta2=0.98, weight_decay=0.1)
    """
    if isinstance(name, type) and issubclass(name, Optimizer) and name is not Optimizer:
        cls = name
    else:
        by_lower = {k.lower(): v for k, v in _REGISTRY.items()}
        cls = by_lower.get(name.lower()) if isinstance(name, str) else None
        if cls is None:
            label = getattr(name, "__name__", name)
            close = difflib.get_close_matches(str(label).lower(), by_lower, n=1)
            hint = f" (did you mean {by_lower[close[0]].__name__}?)" if close else ""
            raise ValueError(
                f"unknown optimizer {label!r}{hint}: expected one of {', '.join(sorted(_REGISTRY))}"
            )
    signature = inspect.signature(cls.__init__)
    own = [
        p.name
        for p in signature.parameters.values()
        if p.name not in ("self", "params") and p.kind is p.POSITIONAL_OR_KEYWORD
    ]
    hyper = dict(hyperparameters)
    split = {k: hyper.pop(k) for k in ("beta1", "beta2") if k in hyper}
    if split and "betas" in own:
        if "betas" in hyper:
            raise TypeError(f"{cls.__name__}: give betas or beta1/beta2, not both")
        betas = list(signature.parameters["betas"].default)
        for i, key in enumerate(("beta1", "beta2")):
            betas[i] = split.get(key, betas[i])
        hyper["betas"] = tuple(betas)
    else:
        hyper.update(split)  # reported below as unknown
    unknown = sorted(set(hyper) - set(own) - set(_OPTIONS))
    if unknown:
        accepted = ["betas (or beta1, beta2)" if k == "betas" else k for k in own]
        raise TypeError(
            f"{cls.__name__} does not take {', '.join(map(repr, unknown))}: its hyperparameters "
            f"are {', '.join(accepted)}; the options {', '.join(_OPTIONS)}"
        )
    return cls(params, **hyper)
