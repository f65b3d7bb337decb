"""Adafactor's step against torch.optim.Adafactor (for-loop and foreach) and the NumPy
reference: medians of interleaved steps, GB/s at the bytes each step moves, state bytes per
element.

    python bench/adafactor.py [--repeats 9]        # FUSEDOPT_SIMD picks the level

Bytes moved per float32 element, as fusedopt's three passes read and write: a matrix (factored)
reads the param and the grad twice in pass A (the param's norm, the grad's row sums and its
column sums), the grad in pass B, the grad and the param and writes the param in pass C:
28 bytes; a vector reads the param (A), the grad and the variance and writes the variance (B),
reads the grad, the variance and the param and writes the param (C): 32 bytes. Writes
bench/results/adafactor.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from pathlib import Path

import numpy as np

import fusedopt
from fusedopt import _matrix, reference

try:
    import torch
except ImportError:
    torch = None

RESULTS = Path(__file__).parent / "results"
SHAPES = [(1024, 1024), (4096, 1024), (4096, 4096), (10_000_000,)]


def bytes_moved(shape):
    return 28 if len(shape) >= 2 else 32


def state_bytes(shape):
    return sum(4 * int(np.prod(s)) for s in _matrix.adafactor_state_shapes(shape).values())


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=9)
    args = parser.parse_args(argv)
    rng = np.random.default_rng(0)
    rows = []
    for shape in SHAPES:
        n = int(np.prod(shape))
        p = rng.standard_normal(shape).astype(np.float32)
        g = rng.standard_normal(shape).astype(np.float32)
        moments = {
            k: np.zeros(s, np.float32) if s is not None else None
            for k, s in {
                "row_var": None,
                "col_var": None,
                "variance": None,
                **_matrix.adafactor_state_shapes(shape),
            }.items()
        }
        counter = {"fusedopt": 0, "numpy": 0}

        def fused(p=p, g=g, m=moments, counter=counter):
            counter["fusedopt"] += 1
            fusedopt.adafactor_(p, g, *m.values(), step=counter["fusedopt"])

        q, m2 = p.copy(), {k: None if v is None else v.copy() for k, v in moments.items()}

        def numpy_step(q=q, g=g, m=m2, counter=counter):
            counter["numpy"] += 1
            reference.adafactor_(q, g, *m.values(), step=counter["numpy"])

        impls = {"fusedopt": fused, "numpy": numpy_step}
        if torch is not None:
            for mode in ("loop", "foreach"):
                t = torch.tensor(p.copy(), requires_grad=True)
                t.grad = torch.tensor(g)
                impls[f"torch-{mode}"] = torch.optim.Adafactor([t], foreach=mode == "foreach").step
        for fn in impls.values():
            fn()
        times = {k: [] for k in impls}
        for _ in range(args.repeats):
            for k, fn in impls.items():
                start = time.perf_counter()
                fn()
                times[k].append(time.perf_counter() - start)
        ms = {k: statistics.median(v) * 1e3 for k, v in times.items()}
        row = {
            "shape": list(shape),
            "ms": ms,
            "gb_s": {k: bytes_moved(shape) * n / (v / 1e3) / 1e9 for k, v in ms.items()},
            "bytes_moved_per_element": bytes_moved(shape),
            "state_bytes_per_element": state_bytes(shape) / n,
        }
        rows.append(row)
        print(json.dumps(row))
    result = {
        "threads": fusedopt.get_num_threads(),
        "simd_level": fusedopt._core.simd_level(),
        "torch": torch.__version__ if torch is not None else None,
        "load_average": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
        "rows": rows,
    }
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "adafactor.json").write_text(json.dumps(result, indent=1) + "\n")
    (RESULTS / "adafactor.md").write_text(markdown(result))
    print(markdown(result))


def markdown(r):
    names = list(r["rows"][0]["ms"])
    lines = [
        f"# Adafactor step, float32 ({r['simd_level']}, {r['threads']} threads; torch "
        f"{r['torch']}; load average {r['load_average']})",
        "",
        "Medians of interleaved steps from one run (`python bench/adafactor.py`).",
        "",
        "| shape | state B/elem | moved B/elem | "
        + " | ".join(f"{n} ms (GB/s)" for n in names)
        + " | fusedopt vs torch-loop | vs torch-foreach | vs numpy |",
        "|---|---|---|" + "---|" * len(names) + "---|---|---|",
    ]
    for row in r["rows"]:
        ms, gb = row["ms"], row["gb_s"]
        cells = [f"{ms[n]:.2f} ({gb[n]:.1f})" for n in names]
        ratios = [
            f"{ms[n] / ms['fusedopt']:.2f}x" if n in ms else "-"
            for n in ("torch-loop", "torch-foreach", "numpy")
        ]
        shape = " x ".join(map(str, row["shape"]))
        lines.append(
            f"| {shape} | {row['state_bytes_per_element']:.4f} | "
            f"{row['bytes_moved_per_element']} | " + " | ".join(cells + ratios) + " |"
        )
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
