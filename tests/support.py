"""Building the arguments of an update function from its registry entry, and calling it."""

from __future__ import annotations

import copy
import math
from typing import Any, Dict, Mapping

import ml_dtypes
import numpy as np

from fusedopt.quantize import QuantizedState
from fusedopt.registry import OptimizerSpec

Arrays = Dict[str, Any]  # role name -> one array, or a list of arrays (one per tensor)


def all_options(spec: OptimizerSpec) -> Dict[str, Any]:
    """Hyperparameters that switch on every optional buffer of `spec`."""
    switches = {"amsgrad": True, "centered": True, "momentum": 0.9}
    return {switch: switches[switch] for switch in spec.optional_state.values()}


def make_arrays(
    spec: OptimizerSpec, hyper: Mapping[str, Any], shape, dtype, rng, order: str = "C"
) -> Arrays:
    """Random param and grad, zero state (valid for every formula), in the given shape and
    layout; `shape` may be a list of shapes for a multi-tensor call."""
    if isinstance(shape, list):
        tensors = [make_arrays(spec, hyper, s, dtype, rng, order) for s in shape]
        return (
            {role: [t[role] for t in tensors] for role in tensors[0]}
            if tensors
            else {role: [] for role in ("param", "grad") + spec.buffers(hyper)}
        )
    arrays = {
        role: np.asarray(rng.standard_normal(shape), dtype=dtype, order=order)
        for role in ("param", "grad")
    }
    for buffer in spec.buffers(hyper):
        arrays[buffer] = np.zeros(shape, dtype=dtype, order=order)
    return arrays


def new_grad(arrays: Arrays, rng) -> None:
    def fresh(g):
        return np.asarray(
            rng.standard_normal(g.shape),
            dtype=g.dtype,
            order="F" if g.flags.f_contiguous and g.ndim > 1 else "C",
        )

    grad = arrays["grad"]
    arrays["grad"] = [fresh(g) for g in grad] if isinstance(grad, list) else fresh(grad)


def call(fn, spec: OptimizerSpec, arrays: Arrays, hyper: Mapping[str, Any], step: int = 1):
    """``fn`` on ``arrays`` at ``step``. A kernel without a step gets seed 0 unless ``hyper``
    names one (it needs one where it draws random bits): the expected values of stochastic
    stores are computed with the bits of seed 0."""
    if not spec.takes_step and "seed" not in hyper:
        hyper = {**hyper, "seed": 0}
    return spec.call(fn, arrays, hyper, step)


def copy_arrays(arrays: Arrays) -> Arrays:
    return copy.deepcopy(arrays)


def flat(arrays: Arrays):
    """(label, array) for every array, lists flattened, quantized states (and any object that
    holds codes and scales, as a bad argument may) as codes and scales."""
    for role, value in arrays.items():
        for label, a in (
            [(f"{role}[{i}]", a) for i, a in enumerate(value)]
            if isinstance(value, list)
            else [(role, value)]
        ):
            if hasattr(a, "codes") and hasattr(a, "scales"):
                yield f"{label}.codes", a.codes
                yield f"{label}.scales", a.scales
            else:
                yield label, a


def assert_identical(actual: Arrays, expected: Arrays, context: str = "") -> None:
    """Bit for bit but for NaN payloads: same dtype, same values, NaN in the same places, and
    the same sign bits, of zeros and NaNs too (assert_array_equal takes -0.0 for 0.0 and any
    NaN for any other). Payloads are not compared: which of two NaN operands an operation
    returns depends on the order a compiler gives them."""
    actual, expected = list(flat(actual)), list(flat(expected))
    assert [label for label, _ in actual] == [label for label, _ in expected], context
    for (label, a), (_, b) in zip(actual, expected):
        if not isinstance(b, np.ndarray):  # a deliberately bad argument
            assert type(a) is type(b) and a == b, f"{context}: {label}"
            continue
        assert a.dtype == b.dtype, f"{context}: {label} dtype {a.dtype} != {b.dtype}"
        assert_same_bits(a, b, f"{context}: {label}")


def assert_same_bits(a: np.ndarray, b: np.ndarray, label: str = "") -> None:
    """Same shape, dtype and values, NaN in the same places, and for floats (bfloat16 too)
    the same sign bits, of zeros and NaNs: what assert_array_equal leaves out."""
    assert a.dtype == b.dtype, f"{label}: dtype {a.dtype} != {b.dtype}"
    if a.dtype == ml_dtypes.bfloat16:  # exact in float32, where NumPy knows bfloat16 NaN for NaN
        a, b = a.astype(np.float32), b.astype(np.float32)
    np.testing.assert_array_equal(a, b, err_msg=label, strict=True)
    if a.dtype.kind == "f":
        differ = np.flatnonzero(np.signbit(a) != np.signbit(b))
        assert differ.size == 0, (
            f"{label}: sign bits differ at {differ.size} elements, first "
            f"{differ[0]}: {a.flat[differ[0]]!r} != {b.flat[differ[0]]!r}"
        )


def invalid_values(h) -> list:
    """Values outside a real hyperparameter's declared range (``fusedopt._declarations``'s
    HyperArg): NaN, the open or just-outside ends, and the infinities it excludes, as floats
    and as integers past a double's range (which no float conversion takes)."""
    values = [math.nan, -math.inf, -(10**400)]
    values.append(h.low if h.low_open else h.low - 0.1)
    if math.isinf(h.high):
        if h.high_open:
            values += [math.inf, 10**400]  # [low, inf): infinity itself is refused
    else:
        values.append(h.high if h.high_open else h.high + 0.1)
        values += [math.inf, 10**400]
    return values


def accepted_dtypes(spec: OptimizerSpec, arrays: Arrays) -> bool:
    """Whether the dtypes of `arrays` (one tensor) are a storage row of the kernels: the param's,
    the grad's and one dtype for every state buffer."""
    from fusedopt import _core

    states = {
        np.dtype(a).name if isinstance(a, type) else a.dtype.name
        for role, a in arrays.items()
        if role not in ("param", "grad")
    }
    if len(states) > 1:
        return False
    for param, grad, state in _core.STORAGE_ROWS:
        if (
            arrays["param"].dtype.name == param
            and arrays["grad"].dtype.name == grad
            and (not states or states == {state})
        ):
            return True
    return False


def state_arrays(opt):
    """(name, array) of every array in an optim class's state; int8 state as codes and scales."""
    for name, state in sorted(opt.state.items()):
        for key, value in sorted(state.items()):
            if isinstance(value, QuantizedState):
                yield f"{name}.{key}.codes", value.codes
                yield f"{name}.{key}.scales", value.scales
            elif isinstance(value, np.ndarray):
                yield f"{name}.{key}", value


def assert_same(a, b):
    """Two optim classes' state is the same bits: arrays, masters, int8 codes and scales."""
    ours, theirs = list(state_arrays(a)), list(state_arrays(b))  # zip(strict=) is Python 3.10+
    assert [name for name, _ in ours] == [name for name, _ in theirs]
    for (name, x), (_, y) in zip(ours, theirs):
        assert_same_bits(x, y, name)


def misaligned(a):
    """A copy of `a` one byte past an aligned address (np.frombuffer at an odd offset)."""
    a = np.asarray(a)
    backing = np.zeros(a.nbytes + a.itemsize, np.uint8)
    view = backing[1 : 1 + a.nbytes].view(a.dtype).reshape(a.shape, order="A")
    view[...] = a
    assert not view.flags.aligned
    return view


def peak_traced_bytes(fn) -> int:
    """The most memory that ``fn()`` held at once beyond what was held before, as tracemalloc
    counts it (NumPy reports its arrays' allocations to it)."""
    import tracemalloc

    tracemalloc.start()
    try:
        fn()
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


class MisstatedList(list):
    """A list whose ``__len__`` states another size than it holds."""

    def __init__(self, items, stated: int) -> None:
        super().__init__(items)
        self.stated = stated

    def __len__(self) -> int:
        return self.stated
