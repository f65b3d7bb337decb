"""Inputs and expected outputs for golden_driver.cpp, computed by fusedopt.reference.

Every optimizer, each of its registry cases, in several storage rows (float32, float64, the
bfloat16 and float16 ones), on one call of three tensors whose sizes straddle SIMD widths and
chunk boundaries. The state comes from earlier reference steps, so it is not zero. The driver,
cross-compiled for another architecture, runs the kernels on the inputs and must reproduce the
outputs bit for bit.

    python .ci/aarch64/make_golden.py OUTDIR

OUTDIR/cases.txt has one line per case:
    <id> <kernel> <storage row> <step> <tensors> <size>... <roles> <present>...
    <hypers> <name>=<value>...   (all on one line)
OUTDIR/<id>.in and <id>.out hold, tensor after tensor, every present array's raw bytes in the
row's dtypes, before and after the call.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

from fusedopt import _core
from fusedopt.registry import OPTIMIZERS

BF16 = np.dtype("bfloat16")
DTYPES = {"float32": np.float32, "float64": np.float64, "bfloat16": BF16, "float16": np.float16}
ROWS = [
    ("float32", "float32", "float32"),
    ("float64", "float64", "float64"),
    ("bfloat16", "bfloat16", "float32"),
    ("bfloat16", "bfloat16", "bfloat16"),
    ("bfloat16", "float32", "float32"),
    ("float16", "float16", "float32"),
    ("float32", "float32", "bfloat16"),
]
SIZES = [7, _core.CHUNK + 1, 3 * _core.CHUNK + 37]
STEP = 3  # the recorded call; steps 1 and 2 make the state


def arrays_for(spec, hyper, row, rng):
    param, grad, state = (DTYPES[name] for name in row)
    tensors = []
    for n in SIZES:
        arrays = {
            "param": rng.standard_normal(n).astype(param),
            "grad": rng.standard_normal(n).astype(grad),
        }
        for buffer in spec.buffers(hyper):
            arrays[buffer] = np.zeros(n, dtype=state)
        tensors.append(arrays)
    return tensors


def reference_step(spec, hyper, tensors, step):
    for arrays in tensors:
        spec.call(spec.reference, arrays, hyper, step)


def raw(spec, tensors) -> bytes:
    roles = [a.name for a in spec.declaration.arrays]
    return b"".join(
        np.ascontiguousarray(arrays[role]).tobytes()
        for arrays in tensors
        for role in roles
        if role in arrays
    )


def main(out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    rows = [tuple(r) for r in _core.STORAGE_ROWS]
    lines = []
    for name, spec in OPTIMIZERS.items():
        for c, hyper in enumerate(spec.cases):
            for row in ROWS:
                rng = np.random.default_rng([c, len(lines)])
                tensors = arrays_for(spec, hyper, row, rng)
                for step in range(1, STEP):
                    reference_step(spec, hyper, tensors, step)
                    for arrays in tensors:
                        arrays["grad"] = rng.standard_normal(arrays["grad"].size).astype(
                            arrays["grad"].dtype
                        )
                case = f"c{len(lines):04d}"
                (out / f"{case}.in").write_bytes(raw(spec, tensors))
                reference_step(spec, hyper, tensors, STEP)
                (out / f"{case}.out").write_bytes(raw(spec, tensors))
                roles = [a.name for a in spec.declaration.arrays]
                present = [str(int(role in tensors[0])) for role in roles]
                values = [f"{k}={float(v)!r}" for k, v in hyper.items()]
                lines.append(
                    " ".join(
                        [case, name, str(rows.index(row)), str(STEP if spec.takes_step else 0)]
                        + [str(len(SIZES))]
                        + [str(n) for n in SIZES]
                        + [str(len(roles))]
                        + present
                        + [str(len(values))]
                        + values
                    )
                )
    (out / "cases.txt").write_text("\n".join(lines) + "\n")
    print(f"{len(lines)} cases in {out}")


if __name__ == "__main__":
    main(Path(sys.argv[1]))
