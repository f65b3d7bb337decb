"""Adam at 1e7 elements in every storage row, to nearest and with stochastic rounding, against
float32 and torch's fused Adam in float32 and bfloat16: medians of interleaved calls.

    python bench/low_precision.py [--n 1e7] [--calls 9]      # FUSEDOPT_SIMD picks the level

Until bench/run.py has rows per storage type, this is the measurement of issue 10's targets.
"""

from __future__ import annotations

import argparse
import statistics
import time

import ml_dtypes
import numpy as np

import fusedopt
from fusedopt import _core

DTYPES = {
    "float32": np.float32,
    "float64": np.float64,
    "bfloat16": ml_dtypes.bfloat16,
    "float16": np.float16,
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=float, default=1e7)
    parser.add_argument("--calls", type=int, default=9)
    args = parser.parse_args()
    n = int(args.n)
    rng = np.random.default_rng(0)
    steps = {}
    for row in _core.STORAGE_ROWS:
        if row[0] == "float64":
            continue
        param, grad, state = (DTYPES[d] for d in row)
        for stochastic in (False, True):
            if stochastic and "bfloat16" not in (row[0], row[2]):
                continue
            arrays = [
                rng.standard_normal(n).astype(param),
                rng.standard_normal(n).astype(grad),
                np.zeros(n, state),
                np.zeros(n, state),
            ]
            name = "/".join(row) + (" stochastic" if stochastic else "")
            steps[name] = lambda step, a=arrays, sr=stochastic: fusedopt.adam_(
                *a, step=step, lr=1e-4, stochastic_rounding=sr, seed=step
            )
    try:
        import torch
    except ImportError:
        torch = None
    if torch is not None:
        for dtype in (torch.float32, torch.bfloat16):
            p = torch.randn(n, dtype=dtype, requires_grad=True)
            p.grad = torch.randn(n, dtype=dtype)
            opt = torch.optim.Adam([p], lr=1e-4, fused=True)
            steps[f"torch fused {str(dtype)[6:]}"] = lambda step, o=opt: o.step()
    times = {name: [] for name in steps}
    for step in range(1, args.calls + 1):
        for name, fn in steps.items():
            start = time.perf_counter()
            fn(step)
            times[name].append(time.perf_counter() - start)
    medians = {name: statistics.median(t) for name, t in times.items()}
    base = medians["float32/float32/float32"]
    torch_bf16 = medians.get("torch fused bfloat16")
    print(
        f"fusedopt {fusedopt.__version__}, SIMD level {_core.simd_level()}, "
        f"{fusedopt.get_num_threads()} threads, Adam, n = {n:,}, median of {args.calls}"
    )
    print("| storage (param/grad/state) | median | vs fusedopt float32 | vs torch fused bf16 |")
    print("|---|---|---|---|")
    for name, t in medians.items():
        versus = f"{t / torch_bf16:.2f}x" if torch_bf16 else "–"
        print(f"| {name} | {t * 1e3:.2f} ms | {t / base:.2f}x | {versus} |")


if __name__ == "__main__":
    main()
