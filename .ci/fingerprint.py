"""A SHA-256 of what every kernel computes, in every storage row, on fixed inputs.

Two builds that print the same digest computed the same bits: CI compares the OpenMP wheel (at
its best SIMD level, on every core) with the serial build (FUSEDOPT_OPENMP=OFF, baseline level).
The largest tensor is above the parallel threshold, so the OpenMP build really splits it.

    python .ci/fingerprint.py            # prints one line per optimizer, then the digest
"""

from __future__ import annotations

import hashlib
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

from support import all_options, call, flat, make_arrays, new_grad  # noqa: E402

import fusedopt  # noqa: E402
from fusedopt import _core  # noqa: E402
from fusedopt.quantize import QuantizedState  # noqa: E402
from fusedopt.registry import OPTIMIZERS  # noqa: E402

DTYPES = {"float32": np.float32, "float64": np.float64, "int8": None}
DTYPES.update(bfloat16=np.dtype("bfloat16"), float16=np.float16)
SHAPES = [(1,), (7,), (_core.CHUNK + 1,), (_core.get_parallel_min() + _core.CHUNK + 3,), (33, 65)]
STEPS = 2


def as_row(spec, arrays, row):
    """float32 `arrays` stored as the storage row (param, grad, state dtype names) says."""
    param, grad, state = (DTYPES[name] for name in row)
    unsigned = spec.declaration.nonnegative_state

    def cast(role, a):
        if role == "param":
            return a.astype(param)
        if role == "grad":
            return a.astype(grad)
        if state is None:
            return QuantizedState.from_array(a, signed=role not in unsigned)
        return a.astype(state)

    return {role: [cast(role, a) for a in value] for role, value in arrays.items()}


def digest_of(spec, row) -> bytes:
    h = hashlib.sha256()
    for case in spec.cases:
        hyper = {**case, **all_options(spec)}
        rng = np.random.default_rng(list(map(ord, spec.name + "".join(row))))
        arrays = as_row(spec, make_arrays(spec, hyper, SHAPES, np.float32, rng), row)
        for step in range(1, STEPS + 1):
            new_grad(arrays, rng)
            arrays["grad"] = [g.astype(DTYPES[row[1]] or np.float32) for g in arrays["grad"]]
            call(spec.fused, spec, arrays, hyper, step)
        for label, a in flat(arrays):
            h.update(label.encode())
            h.update(np.ascontiguousarray(a).tobytes())
    return h.digest()


def main() -> None:
    total = hashlib.sha256()
    for name, spec in OPTIMIZERS.items():
        h = hashlib.sha256()
        for row in _core.STORAGE_ROWS:
            h.update(digest_of(spec, row))
        print(f"{name:10} {h.hexdigest()[:16]}")
        total.update(h.digest())
    print(
        f"fingerprint {total.hexdigest()}  ({len(OPTIMIZERS)} kernels x "
        f"{len(_core.STORAGE_ROWS)} storage rows; level {_core.simd_level()}, "
        f"{fusedopt.get_num_threads()} threads, {_core.THREADS})"
    )


if __name__ == "__main__":
    main()
