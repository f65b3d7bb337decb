"""The fused optimizers whose update is not one element-wise pass: ``muon_`` (matrix products)
and ``adafactor_`` (row, column and global reductions between passes).

They have no element-wise declaration: ``csrc/matrix.cpp`` and ``csrc/factored.cpp`` are
compiled into every SIMD level's kernel library beside the element-wise kernels, and this module
validates a call and hands the loaded level's function its pointers through ctypes (which
releases the GIL for the call). Nothing is written before every argument has been checked.
"""

from __future__ import annotations

import ctypes
import inspect
import math
import numbers
from typing import List, Optional, Sequence, Tuple, Union

import ml_dtypes
import numpy as np

from . import _dispatch, _overlap, reference
from ._dispatch import core as _core
from .quantize import BLOCK, QuantizedState, _check_scales

__all__ = ["adafactor_", "muon_"]

Matrices = Union[np.ndarray, Sequence[np.ndarray]]

_CODES = {
    np.dtype(np.float32): 0,
    np.dtype(np.float64): 1,
    np.dtype(ml_dtypes.bfloat16): 2,
    np.dtype(np.float16): 3,
}
_NAMES = {0: "float32", 1: "float64", 2: "bfloat16", 3: "float16", 4: "int8"}
_INT8 = 4  # a momentum buffer given as a QuantizedState (int8 codes and float32 scales)


class _MuonCall(ctypes.Structure):
    """``MuonCall`` of csrc/matrix.cpp, field for field."""

    _fields_ = [
        ("param", ctypes.c_void_p),
        ("grad", ctypes.c_void_p),
        ("momentum_buffer", ctypes.c_void_p),
        ("rows", ctypes.c_int64),
        ("cols", ctypes.c_int64),
        ("c_order", ctypes.c_int32),
        ("param_dtype", ctypes.c_int32),
        ("grad_dtype", ctypes.c_int32),
        ("state_dtype", ctypes.c_int32),
        ("decay", ctypes.c_double),
        ("step", ctypes.c_double),
        ("momentum", ctypes.c_double),
        ("a", ctypes.c_double),
        ("b", ctypes.c_double),
        ("c", ctypes.c_double),
        ("eps", ctypes.c_double),
        ("nesterov", ctypes.c_int32),
        ("ns_steps", ctypes.c_int32),
        ("threads", ctypes.c_int32),
        ("param_copy", ctypes.c_void_p),
        ("copy_dtype", ctypes.c_int32),
        ("stochastic", ctypes.c_int32),
        ("scales", ctypes.c_void_p),
        ("seed", ctypes.c_uint64),
        ("tensor", ctypes.c_uint64),
    ]


class _AdafactorCall(ctypes.Structure):
    """``AdafactorCall`` of csrc/factored.cpp, field for field."""

    _fields_ = [
        ("param", ctypes.c_void_p),
        ("grad", ctypes.c_void_p),
        ("row_var", ctypes.c_void_p),
        ("col_var", ctypes.c_void_p),
        ("variance", ctypes.c_void_p),
        ("batch", ctypes.c_int64),
        ("rows", ctypes.c_int64),
        ("cols", ctypes.c_int64),
        ("factored", ctypes.c_int32),
        ("param_dtype", ctypes.c_int32),
        ("grad_dtype", ctypes.c_int32),
        ("decay", ctypes.c_double),
        ("rho", ctypes.c_double),
        ("weight", ctypes.c_double),
        ("eps1", ctypes.c_double),
        ("eps2", ctypes.c_double),
        ("d", ctypes.c_double),
        ("maximize", ctypes.c_int32),
        ("threads", ctypes.c_int32),
        ("param_copy", ctypes.c_void_p),
        ("copy_dtype", ctypes.c_int32),
        ("stochastic", ctypes.c_int32),
        ("seed", ctypes.c_uint64),
        ("step", ctypes.c_uint64),
        ("tensor", ctypes.c_uint64),
    ]


def _level_function(name: str, call: type):
    try:
        function = getattr(_dispatch._loaded[_dispatch.LEVEL], name)
    except AttributeError:
        raise ImportError(
            f"fusedopt: the kernel library of level {_dispatch.LEVEL} has no {name} (built "
            "from older sources than the binding): reinstall fusedopt"
        ) from None
    function.argtypes = [ctypes.POINTER(call)]
    function.restype = ctypes.c_int
    return function


_MUON = _level_function("fusedopt_muon_step", _MuonCall)
_ADAFACTOR = _level_function("fusedopt_adafactor_step", _AdafactorCall)


def _real(name: str, value, low: float = 0.0, high: float = math.inf, fn: str = "muon_") -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{fn}: {name} must be a real number, got {type(value).__name__}")
    try:
        number = float(value)
    except OverflowError:  # an integer past double's range: no finite number
        number = math.inf if value > 0 else -math.inf
    if not (math.isfinite(number) and low <= number <= high):
        bounds = f">= {low:g}" if high == math.inf else f"<= {high:g}"
        raise ValueError(f"{fn}: invalid {name}: {number} (a finite number {bounds})")
    return number


def _check_hyper(lr, weight_decay, momentum, nesterov, ns_coefficients, eps, ns_steps, adjust):
    lr, weight_decay = _real("lr", lr), _real("weight_decay", weight_decay)
    momentum, eps = _real("momentum", momentum), _real("eps", eps)
    _check_flag("muon_", "nesterov", nesterov)
    if not isinstance(ns_coefficients, (tuple, list)) or len(ns_coefficients) != 3:
        raise ValueError(
            f"muon_: ns_coefficients must be a tuple of 3 numbers (a, b, c), "
            f"got {ns_coefficients!r}"
        )
    coefficients = tuple(_real("ns_coefficients", c, -math.inf) for c in ns_coefficients)
    if isinstance(ns_steps, bool) or not isinstance(ns_steps, numbers.Integral):
        raise TypeError(f"muon_: ns_steps must be an integer, got {type(ns_steps).__name__}")
    if not 0 <= ns_steps < 100:
        raise ValueError(f"muon_: invalid ns_steps: {ns_steps} (an integer in [0, 100))")
    if adjust not in (None, "original", "match_rms_adamw"):
        raise ValueError(
            f"muon_: adjust_lr_fn must be None, 'original' or 'match_rms_adamw', got {adjust!r}"
        )
    return lr, weight_decay, momentum, bool(nesterov), coefficients, eps, int(ns_steps)


def _as_list(fn: str, name: str, value, quantized: bool = False) -> List[np.ndarray]:
    """One array or a list of them as a list, for function ``fn``; ``quantized``:
    QuantizedStates count as arrays."""
    kinds = (np.ndarray, QuantizedState) if quantized else np.ndarray
    if isinstance(value, kinds):
        return [value]
    if not isinstance(value, (list, tuple)):
        raise TypeError(
            f"{fn}: {name} must be a numpy.ndarray or a list of them, got {type(value).__name__}"
        )
    values = list(value)
    for i, a in enumerate(values):
        if not isinstance(a, kinds):
            raise TypeError(f"{fn}: {name}[{i}] must be a numpy.ndarray, got {type(a).__name__}")
    return values


def _check_flag(fn: str, name: str, value) -> None:
    """A flag is a bool (or NumPy's), never another object's truth: "False" is true."""
    if not isinstance(value, (bool, np.bool_)):
        raise TypeError(f"{fn}: {name} must be a bool, got {type(value).__name__}")


def _check_storage(
    fn: str, stochastic_rounding, seed, optional: bool = False
) -> Tuple[bool, Optional[int]]:
    """``stochastic_rounding`` (a bool, as the element-wise functions take it) and ``seed``
    (None if ``optional`` and not given)."""
    _check_flag(fn, "stochastic_rounding", stochastic_rounding)
    if optional and seed is None:
        return bool(stochastic_rounding), None
    if isinstance(seed, bool) or not isinstance(seed, numbers.Integral):
        raise TypeError(f"{fn}: seed must be an integer, got {type(seed).__name__}")
    if not 0 <= seed < 2**64:
        raise ValueError(f"{fn}: Invalid seed: {seed} (an integer in [0, 2**64))")
    return bool(stochastic_rounding), int(seed)


def _as_masters(fn: str, master, one: bool, count: int) -> list:
    """``master`` as one entry per tensor (None without masters)."""
    if master is None:
        return [None] * count
    if one:
        if not isinstance(master, np.ndarray):
            raise TypeError(
                f"{fn}: master must be a numpy.ndarray like param, got {type(master).__name__}"
            )
        return [master]
    # copied first: the length checked is then that of the entries used, whatever __len__ says
    masters = list(master) if isinstance(master, (list, tuple)) else None
    if masters is None or len(masters) != count:
        raise ValueError(f"{fn}: master must be a list of {count} arrays like param")
    for i, m in enumerate(masters):
        if not isinstance(m, np.ndarray):
            raise TypeError(f"{fn}: master[{i}] must be a numpy.ndarray, got {type(m).__name__}")
    return masters


def _check_master(fn: str, at: str, p: np.ndarray, m: np.ndarray, c_order: bool) -> None:
    """float32 masters of a bfloat16 or float16 param: its shape and memory order, writeable."""
    if p.dtype not in (np.dtype(ml_dtypes.bfloat16), np.dtype(np.float16)):
        raise TypeError(
            f"{fn}: {at}master: float32 master weights are for a bfloat16 or float16 param, "
            f"got a {p.dtype} param"
        )
    if m.dtype != np.float32 or not m.dtype.isnative:
        raise TypeError(f"{fn}: {at}master must be float32, got {m.dtype}")
    if m.shape != p.shape:
        raise ValueError(f"{fn}: {at}master has shape {m.shape}, expected {p.shape}")
    if not (m.flags.c_contiguous if c_order else m.flags.f_contiguous):
        raise ValueError(
            f"{fn}: {at}master must be contiguous in the param's memory order "
            f"({'C' if c_order else 'Fortran'})"
        )
    if not m.flags.writeable:
        raise ValueError(f"{fn}: {at}master is read-only")


def _check_quantized(at: str, p: np.ndarray, q: QuantizedState, c_order: bool) -> None:
    """An int8 momentum buffer: signed codes like the param, the scales of its blocks."""
    name = f"muon_: {at}momentum_buffer"
    codes, scales = q.codes, q.scales
    if not isinstance(codes, np.ndarray) or not isinstance(scales, np.ndarray):
        raise TypeError(f"{name}: codes and scales must be numpy.ndarrays")
    if codes.dtype != np.int8:
        raise TypeError(
            f"{name}.codes must be int8 (the signed format: the momentum has a sign), "
            f"got {codes.dtype}"
        )
    if codes.shape != p.shape:
        raise ValueError(f"{name}.codes has shape {codes.shape}, expected {p.shape}")
    if not (codes.flags.c_contiguous if c_order else codes.flags.f_contiguous):
        raise ValueError(
            f"{name}.codes must be contiguous in the param's memory order "
            f"({'C' if c_order else 'Fortran'})"
        )
    blocks = -(-p.size // BLOCK)
    if scales.dtype != np.float32 or scales.shape != (blocks,):
        raise ValueError(
            f"{name}.scales must be float32 of shape ({blocks},) (one per {BLOCK} elements), "
            f"got {scales.dtype} {scales.shape}"
        )
    if not scales.flags.c_contiguous:
        raise ValueError(f"{name}.scales must be contiguous")
    for part, a in (("codes", codes), ("scales", scales)):
        if not a.flags.writeable:
            raise ValueError(f"{name}.{part} is read-only")
    _check_scales(name, scales)


def _check_own_memory(fn: str, at: str, named) -> None:
    """Each of a tensor's arrays, (name, argument) pairs, is aligned to its element size (the
    kernels' typed loads of a misaligned view would be undefined behaviour), and no two share
    memory."""
    arrays = [
        (f"{name}{part}", a)
        for name, x in named
        for part, a in zip(
            (".codes", ".scales") if isinstance(x, QuantizedState) else ("",), _overlap.arrays_of(x)
        )
    ]
    for name, x in arrays:
        if not x.flags.aligned:
            raise ValueError(
                f"{fn}: {at}{name} must be aligned to its element size, got a misaligned view"
            )
    for k, (name, x) in enumerate(arrays):
        for other, y in arrays[k + 1 :]:
            if np.may_share_memory(x, y):
                raise ValueError(f"{fn}: {at}{name} and {other} share memory: must not overlap")


def _check_tensor(
    i: int, p: np.ndarray, g: np.ndarray, b, master: Optional[np.ndarray]
) -> Tuple[int, int, int]:
    at = f"tensor {i}: " if i >= 0 else ""
    if p.ndim != 2:
        raise ValueError(
            f"muon_: {at}Muon updates 2-D matrices only, got a param of shape {p.shape}; "
            "optimize other parameters (biases, gains, embeddings) with e.g. adamw_"
        )
    pc = _CODES.get(p.dtype) if p.dtype.isnative else None
    if pc is None:
        raise TypeError(
            f"muon_: {at}param must be float32, float64, bfloat16 or float16, got {p.dtype}"
        )
    grads = (1,) if pc == 1 else tuple(dict.fromkeys((pc, 0)))
    states = (1,) if pc == 1 else (0, 2, _INT8)
    c_order = p.flags.c_contiguous
    for name, a, allowed in (("grad", g, grads), ("momentum_buffer", b, states)):
        if isinstance(a, QuantizedState) and name == "momentum_buffer" and pc != 1:
            _check_quantized(at, p, a, c_order)
            continue
        code = _CODES.get(a.dtype) if isinstance(a, np.ndarray) and a.dtype.isnative else None
        if code not in allowed:
            expected = " or ".join(_NAMES[c] for c in allowed)
            if _INT8 in allowed:
                expected += " (a fusedopt.quantize.QuantizedState)"
            got = a.dtype if isinstance(a, np.ndarray) else type(a).__name__
            raise TypeError(
                f"muon_: {at}{name} must be {expected} for a {p.dtype} param, got {got}"
            )
        if a.shape != p.shape:
            raise ValueError(f"muon_: {at}{name} has shape {a.shape}, expected {p.shape}")
    for name, a in (("param", p), ("grad", g), ("momentum_buffer", b)):
        if isinstance(a, np.ndarray) and not (
            a.flags.c_contiguous if c_order else a.flags.f_contiguous
        ):
            raise ValueError(
                f"muon_: {at}{name} must be contiguous in the param's memory order "
                f"({'C' if c_order else 'Fortran'})"
            )
    for name, a in (("param", p), ("momentum_buffer", b)):
        if isinstance(a, np.ndarray) and not a.flags.writeable:
            raise ValueError(f"muon_: {at}{name} is read-only")
    if master is not None:
        _check_master("muon_", at, p, master, c_order)
    _check_own_memory(
        "muon_", at, (("param", p), ("grad", g), ("momentum_buffer", b), ("master", master))
    )
    return pc, _CODES[g.dtype], _INT8 if isinstance(b, QuantizedState) else _CODES[b.dtype]


def _check_no_overlap(fn: str, tensors) -> None:
    """No written array of one tensor (every one but the grad, the second; a QuantizedState's
    codes and scales) overlaps an array of another (each tensor's own were checked before)."""
    arrays, written, owner = [], [], []
    for t, args in enumerate(tensors):
        for role, x in enumerate(args):
            for a in _overlap.arrays_of(x):
                arrays.append(a)
                written.append(role != 1)
                owner.append(t)
    pair = _overlap.first_overlap(_overlap.byte_extents(arrays), written)
    if pair is not None:
        u, t = sorted(owner[i] for i in pair)
        raise ValueError(
            f"{fn}: arrays of tensors {u} and {t} overlap: every tensor's param and state must "
            "be its own"
        )


def _muon_checked(
    param,
    grad,
    momentum_buffer,
    lr,
    weight_decay,
    momentum,
    nesterov,
    ns_coefficients,
    eps,
    ns_steps,
    adjust_lr_fn,
    skip_if_nonfinite,
    stochastic_rounding,
    seed,
    master,
):
    """muon_'s checks of its arguments (all of them, before anything is written), and what
    they return: the lists of tensors, each tensor's dtype codes, the storage options and the
    hyperparameters as numbers."""
    hyper = _check_hyper(
        lr, weight_decay, momentum, nesterov, ns_coefficients, eps, ns_steps, adjust_lr_fn
    )
    stochastic, seed = _check_storage("muon_", stochastic_rounding, seed, optional=True)
    _check_flag("muon_", "skip_if_nonfinite", skip_if_nonfinite)
    one = isinstance(param, np.ndarray)
    params = _as_list("muon_", "param", param)
    grads = _as_list("muon_", "grad", grad)
    buffers = _as_list("muon_", "momentum_buffer", momentum_buffer, quantized=True)
    if not len(params) == len(grads) == len(buffers):
        raise ValueError(
            f"muon_: param, grad and momentum_buffer must be lists of one length, got "
            f"{len(params)}, {len(grads)} and {len(buffers)}"
        )
    masters = _as_masters("muon_", master, one, len(params))
    codes = [
        _check_tensor(-1 if one else i, p, g, m, w)
        for i, (p, g, m, w) in enumerate(zip(params, grads, buffers, masters))
    ]
    _check_no_overlap("muon_", list(zip(params, grads, buffers, masters)))
    seed = reference._seed("muon_", seed, False, stochastic, [params, buffers])
    return params, grads, buffers, masters, codes, stochastic, seed, hyper


def muon_(
    param: Matrices,
    grad: Matrices,
    momentum_buffer: Union[Matrices, QuantizedState, Sequence[QuantizedState]],
    *,
    lr: float = 1e-3,
    weight_decay: float = 0.1,
    momentum: float = 0.95,
    nesterov: bool = True,
    ns_coefficients: Tuple[float, float, float] = reference.MUON_NS_COEFFICIENTS,
    eps: float = 1e-7,
    ns_steps: int = 5,
    adjust_lr_fn: Optional[str] = None,
    skip_if_nonfinite: bool = False,
    stochastic_rounding: bool = False,
    seed: Optional[int] = None,
    master: Optional[Matrices] = None,
) -> bool:
    checked = _muon_checked(**locals())
    params, grads, buffers, masters, codes, stochastic, seed, hyper = checked
    lr, weight_decay, momentum, nesterov, (a, b, c), eps, ns_steps = hyper
    if skip_if_nonfinite and not all(_core.all_finite(g) for g in grads if g.size):
        return False
    threads = _core.get_num_threads()
    for t, (p, g, m, w, (pc, gc, sc)) in enumerate(zip(params, grads, buffers, masters, codes)):
        if p.size == 0:
            continue
        quantized = isinstance(m, QuantizedState)
        call = _MuonCall(
            param=(p if w is None else w).ctypes.data,
            grad=g.ctypes.data,
            momentum_buffer=(m.codes if quantized else m).ctypes.data,
            rows=p.shape[0],
            cols=p.shape[1],
            c_order=int(p.flags.c_contiguous),
            param_dtype=pc if w is None else 0,
            grad_dtype=gc,
            state_dtype=sc,
            decay=1 - lr * weight_decay,
            step=reference.muon_adjusted_lr(lr, adjust_lr_fn, p.shape),
            momentum=momentum,
            a=a,
            b=b,
            c=c,
            eps=eps,
            nesterov=int(nesterov),
            ns_steps=ns_steps,
            threads=threads if p.size >= _core.get_parallel_min() else 1,
            param_copy=None if w is None else p.ctypes.data,
            copy_dtype=0 if w is None else pc,
            stochastic=int(stochastic),
            scales=m.scales.ctypes.data if quantized else None,
            seed=seed,
            tensor=t,
        )
        if _MUON(ctypes.byref(call)) != 0:  # unreachable: the dtypes were checked above
            raise RuntimeError("muon_: the kernel library has no such storage combination")
    return True


muon_.__doc__ = f"""{reference.muon_.__doc__.rstrip()}

    The fused step: one call per matrix, its element-wise passes and every matrix product on
    all the kernels' threads (:func:`fusedopt.set_num_threads`), with Eigen's GEMM compiled
    for the loaded SIMD level; bit-identical for every thread count. The momentum buffer and
    the norm agree with :func:`fusedopt.reference.muon_` bit for bit, the products to
    rounding (their summation order is Eigen's, not NumPy's BLAS's).

    Args:
        param: a 2-D array or a list of them (float32, float64, bfloat16 or float16; C- or
            Fortran-contiguous), updated in place.
        grad: the gradients, in the param's dtype or float32 (float64 for float64), read only.
        momentum_buffer: the moving average of the gradients (start at zero), float32,
            bfloat16 or int8 (a :class:`fusedopt.quantize.QuantizedState` with int8 codes in
            the param's memory order; always rounded stochastically, with ``seed``) (float64
            for float64), updated in place.
        lr: learning rate (>= 0; default 1e-3).
        weight_decay: decoupled weight decay (>= 0; default 0.1).
        momentum: the moving average's factor (>= 0; default 0.95).
        nesterov: use the Nesterov-style average (default True).
        ns_coefficients: the quintic's (a, b, c) (default (3.4445, -4.7750, 2.0315)).
        eps: lower bound of the Frobenius norm that scales the update (>= 0; default 1e-7).
        ns_steps: Newton-Schulz steps, in [0, 100) (default 5).
        adjust_lr_fn: None or "original" (lr * sqrt(max(1, rows/cols))) or "match_rms_adamw"
            (0.2 lr sqrt(max(rows, cols))).
        skip_if_nonfinite: do nothing and return False if a grad holds a NaN or an infinity.
        stochastic_rounding: round what is stored in bfloat16 or float16 (the param, its
            copy of a master, a bfloat16 momentum buffer) up or down at random, without bias,
            instead of to nearest even.
        seed: the random stream of stochastic rounding and of an int8 buffer, an integer in
            [0, 2**64); the bits are a function of (seed, tensor, element): required where
            random bits are drawn (TypeError without it), a new one each step
            (:class:`fusedopt.optim.Muon` does).
        master: float32 master weights of bfloat16 or float16 params (the param's shape and
            memory order), updated in place: the step runs on them and the param is written
            as the master rounded; the param's own value is not read.

    Returns:
        True if the step was applied; False if ``skip_if_nonfinite`` skipped it.
"""


def _check_adafactor_hyper(step, lr, beta2_decay, eps, d, weight_decay, maximize):
    fn = "adafactor_"
    if isinstance(step, bool) or not isinstance(step, numbers.Integral):
        raise TypeError(f"{fn}: step must be an integer, got {type(step).__name__}")
    if not 1 <= step < 2**63:
        raise ValueError(f"{fn}: invalid step: {step} (the count of steps, from 1)")
    lr = _real("lr", lr, fn=fn)
    beta2_decay = _real("beta2_decay", beta2_decay, -math.inf, 0.0, fn=fn)
    if not isinstance(eps, (tuple, list)) or len(eps) != 2:
        raise ValueError(f"{fn}: eps must be a pair (eps1 or None, eps2), got {eps!r}")
    eps1 = None if eps[0] is None else _real("eps[0]", eps[0], fn=fn)
    eps2 = _real("eps[1]", eps[1], fn=fn)
    d = _real("d", d, 1.0, fn=fn)
    weight_decay = _real("weight_decay", weight_decay, fn=fn)
    _check_flag(fn, "maximize", maximize)
    return int(step), lr, beta2_decay, eps1, eps2, d, weight_decay, bool(maximize)


def adafactor_state_shapes(shape: Tuple[int, ...]) -> dict:
    """The state of a param of ``shape``, as torch.optim.Adafactor keeps it: ``row_var`` (the
    last dimension 1) and ``col_var`` (the second-to-last 1) for 2 or more dimensions, else
    ``variance`` (the param's shape)."""
    if len(shape) >= 2:
        return {"row_var": shape[:-1] + (1,), "col_var": shape[:-2] + (1, shape[-1])}
    return {"variance": tuple(shape)}


def _check_adafactor_tensor(i, p, g, r, c, v, master):
    at = f"tensor {i}: " if i >= 0 else ""
    pc = _CODES.get(p.dtype) if p.dtype.isnative else None
    if pc is None:
        raise TypeError(
            f"adafactor_: {at}param must be float32, float64, bfloat16 or float16, got {p.dtype}"
        )
    grads = (1,) if pc == 1 else tuple(dict.fromkeys((pc, 0)))
    code = _CODES.get(g.dtype) if isinstance(g, np.ndarray) and g.dtype.isnative else None
    if code not in grads:
        expected = " or ".join(_NAMES[c] for c in grads)
        got = g.dtype if isinstance(g, np.ndarray) else type(g).__name__
        raise TypeError(f"adafactor_: {at}grad must be {expected} for a {p.dtype} param, got {got}")
    if g.shape != p.shape:
        raise ValueError(f"adafactor_: {at}grad has shape {g.shape}, expected {p.shape}")
    state = np.dtype(np.float64 if pc == 1 else np.float32)
    shapes = adafactor_state_shapes(p.shape)
    given = {"row_var": r, "col_var": c, "variance": v}
    for name, a in given.items():
        if name not in shapes:
            if a is not None:
                raise ValueError(
                    f"adafactor_: {at}{name} must be None for a param of {p.ndim} dimensions"
                )
            continue
        if not isinstance(a, np.ndarray):
            raise TypeError(
                f"adafactor_: {at}{name} must be a {state} numpy.ndarray, got {type(a).__name__}"
            )
        if a.dtype != state or a.shape != shapes[name]:
            raise ValueError(
                f"adafactor_: {at}{name} must be {state} {shapes[name]}, got {a.dtype} {a.shape}"
            )
        if not a.flags.c_contiguous or not a.flags.writeable:
            raise ValueError(f"adafactor_: {at}{name} must be C-contiguous and writeable")
    if not (p.flags.c_contiguous and g.flags.c_contiguous):
        raise ValueError(f"adafactor_: {at}param and grad must be C-contiguous")
    if not p.flags.writeable:
        raise ValueError(f"adafactor_: {at}param is read-only")
    if master is not None:
        _check_master("adafactor_", at, p, master, True)
    named = (("param", p), ("grad", g), ("row_var", r), ("col_var", c), ("variance", v))
    _check_own_memory("adafactor_", at, (*named, ("master", master)))
    return pc, _CODES[g.dtype]


def _adafactor_checked(
    param,
    grad,
    row_var,
    col_var,
    variance,
    step,
    lr,
    beta2_decay,
    eps,
    d,
    weight_decay,
    maximize,
    stochastic_rounding,
    seed,
    master,
):
    """adafactor_'s checks of its arguments (all of them, before anything is written), and
    what they return: each tensor's arrays and dtype codes, the storage options and the
    hyperparameters as numbers."""
    hyper = _check_adafactor_hyper(step, lr, beta2_decay, eps, d, weight_decay, maximize)
    stochastic, seed = _check_storage("adafactor_", stochastic_rounding, seed)
    one = isinstance(param, np.ndarray)
    params = _as_list("adafactor_", "param", param)
    if one:
        grads, rows, cols, variances = [grad], [row_var], [col_var], [variance]
    else:
        lists = []
        for name, value in (
            ("grad", grad),
            ("row_var", row_var),
            ("col_var", col_var),
            ("variance", variance),
        ):
            entries = list(value) if isinstance(value, (list, tuple)) else None
            if entries is None or len(entries) != len(params):
                raise ValueError(
                    f"adafactor_: {name} must be a list of {len(params)} entries like param "
                    "(None where a tensor has no such state)"
                )
            lists.append(entries)
        grads, rows, cols, variances = lists
    masters = _as_masters("adafactor_", master, one, len(params))
    tensors = list(zip(params, grads, rows, cols, variances, masters))
    codes = [_check_adafactor_tensor(-1 if one else i, *arrays) for i, arrays in enumerate(tensors)]
    _check_no_overlap("adafactor_", tensors)
    return tensors, codes, stochastic, seed, hyper


def adafactor_(
    param: Matrices,
    grad: Matrices,
    row_var: Union[None, np.ndarray, Sequence[Optional[np.ndarray]]],
    col_var: Union[None, np.ndarray, Sequence[Optional[np.ndarray]]],
    variance: Union[None, np.ndarray, Sequence[Optional[np.ndarray]]],
    *,
    step: int,
    lr: float = 1e-2,
    beta2_decay: float = -0.8,
    eps: Tuple[Optional[float], float] = (None, 1e-3),
    d: float = 1.0,
    weight_decay: float = 0.0,
    maximize: bool = False,
    stochastic_rounding: bool = False,
    seed: int = 0,
    master: Optional[Matrices] = None,
) -> bool:
    checked = _adafactor_checked(**locals())
    tensors, codes, stochastic, seed, hyper = checked
    step, lr, beta2_decay, eps1, eps2, d, weight_decay, maximize = hyper
    weight = float(step) ** beta2_decay
    rho = min(lr, 1 / float(step) ** 0.5)
    for t, ((p, g, r, c, v, w), (pc, gc)) in enumerate(zip(tensors, codes)):
        if p.size == 0:
            continue
        factored = p.ndim >= 2
        # eps1's default: the machine epsilon of what the step updates (the master, if any)
        e1 = float(ml_dtypes.finfo(p.dtype if w is None else w.dtype).eps) if eps1 is None else eps1
        call = _AdafactorCall(
            param=(p if w is None else w).ctypes.data,
            grad=g.ctypes.data,
            row_var=r.ctypes.data if factored else None,
            col_var=c.ctypes.data if factored else None,
            variance=None if factored else v.ctypes.data,
            batch=int(np.prod(p.shape[:-2])) if factored else 1,
            rows=p.shape[-2] if factored else 1,
            cols=p.shape[-1] if factored else p.size,
            factored=int(factored),
            param_dtype=pc if w is None else 0,
            grad_dtype=gc,
            decay=1 - lr * weight_decay,
            rho=rho,
            weight=weight,
            eps1=e1,
            eps2=eps2,
            d=d,
            maximize=int(maximize),
            threads=_core.threads_for_call(p.size),  # one while other threads hold the cores
            param_copy=None if w is None else p.ctypes.data,
            copy_dtype=0 if w is None else pc,
            stochastic=int(stochastic),
            seed=seed,
            step=step,
            tensor=t,
        )
        if _ADAFACTOR(ctypes.byref(call)) != 0:  # unreachable: the dtypes were checked above
            raise RuntimeError("adafactor_: the kernel library has no such storage combination")
    return True


# The reference's text, without its pointer to a private helper (the Args below say it).
_ADAFACTOR_RULE = reference.adafactor_.__doc__.rstrip().replace(" (:func:`_in_compute_type`)", "")
adafactor_.__doc__ = f"""{_ADAFACTOR_RULE}

    The fused step: per tensor three parallel passes (reductions, the update's norm, the
    update), every sum in double in an order fixed by the shape: bit-identical to
    :func:`fusedopt.reference.adafactor_` and for every thread count.

    Args:
        param: an array or a list of them (float32, float64, bfloat16 or float16;
            C-contiguous), updated in place.
        grad: the gradients, in the param's dtype or float32 (float64 for float64).
        row_var, col_var: the factored moments of a param of 2 or more dimensions, else None:
            float32 (float64 for a float64 param), C-contiguous, updated in place; ``row_var``
            has the param's shape with the last dimension 1 (``shape[:-1] + (1,)``),
            ``col_var`` with the second-to-last 1 (``shape[:-2] + (1, shape[-1])``), as
            ``torch.optim.Adafactor`` keeps them. With lists, one entry per tensor.
        variance: the second moment of a vector or scalar param (the param's shape, float32,
            float64 for float64, C-contiguous, updated in place), else None.
        step: the count of steps including this one (from 1).
        lr: the relative step size's bound (>= 0; default 1e-2).
        beta2_decay: c in beta2_t = 1 - t^c (<= 0; default -0.8).
        eps: (eps1 or None for the param dtype's machine epsilon, eps2) (default (None, 1e-3)).
        d: the update clipping threshold (>= 1; default 1).
        weight_decay: decoupled weight decay (>= 0; default 0).
        maximize: ascend instead (default False).
        stochastic_rounding: round a bfloat16 or float16 param (or a master's copy) up or down
            at random, without bias, instead of to nearest even.
        seed: the random stream of stochastic rounding, an integer in [0, 2**64); the bits
            are a function of (seed, step, tensor, element) and of array slot 0, the param's.
        master: float32 master weights of bfloat16 or float16 params (the param's shape,
            C-contiguous), updated in place: the step is the float32 step of the master (its
            RMS, eps1's default float32 epsilon) and the param is written as the master
            rounded; the param's own value is not read.

    The moments stay float32: factored they take about 0 bytes per element, so bfloat16 or
    8-bit moments would save nothing worth their rounding error.

    Returns:
        True.
"""


_CHECKED = {muon_: _muon_checked, adafactor_: _adafactor_checked}


def check_arguments(function, *args, **kwargs) -> None:
    """The checks that ``function`` (:func:`muon_` or :func:`adafactor_`) makes of these
    arguments, nothing run: for a step of several calls, which checks them all before the
    first one writes (fusedopt.optim)."""
    bound = inspect.signature(function).bind(*args, **kwargs)
    bound.apply_defaults()
    _CHECKED[function](**bound.arguments)
