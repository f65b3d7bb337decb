"""Adam at 1e9 elements: fusedopt against torch's fused Adam (`torch._fused_adam_`, the kernel
of `torch.optim.Adam(fused=True)`) on the same arrays, torch's tensors views of fusedopt's, so
that a row takes only its own bytes (float32: 16 GB; all-bfloat16: 8 GB; float32 params with
int8 state, which torch has not: 10 GB). The rows run one after another, each on its own
arrays, freed before the next. In a row the libraries take turns, one timed call each a round,
each after an untimed one; the table gives medians, and the median of the rounds' ratios.

    python bench/billion.py [--n 1e9] [--rounds 5] [--out FILE.json]

Needs about 17 GB of free memory at 1e9 (for float32; --n 5e8 halves it).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import ml_dtypes
import numpy as np
from run import machine  # bench/, this script's folder

import fusedopt
from fusedopt.quantize import BLOCK, QuantizedState

BF16 = np.dtype(ml_dtypes.bfloat16)
HYPER = dict(lr=1e-4, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0)


def filled(n: int, dtype, seed: int, scale: float = 1.0, piece: int = 1 << 24) -> np.ndarray:
    """Uniform values in [-scale, scale) of ``dtype``, made a piece at a time (no float32
    temporary of the whole array)."""
    a = np.empty(n, dtype)
    for i, start in enumerate(range(0, n, piece)):
        values = np.random.default_rng([seed, i]).random(min(piece, n - start), np.float32)
        a[start : start + values.size] = (values * 2 - 1) * np.float32(scale)
    return a


def torch_view(a: np.ndarray):
    import torch

    if a.dtype == BF16:
        return torch.from_numpy(a.view(np.int16)).view(torch.bfloat16)
    return torch.from_numpy(a)


def row(name: str, n: int, param_dtype, state: str, stochastic: bool, with_torch: bool):
    """The row's steps: fusedopt's, and torch's on the same arrays where it has the row."""
    param = filled(n, param_dtype, 1)
    grad = filled(n, param_dtype, 2, 1e-2)
    if state == "int8":
        moments = [
            QuantizedState.full(n, 1e-3, signed=True),
            QuantizedState.full(n, 1e-6, signed=False),
        ]
    else:
        moments = [filled(n, param_dtype, seed, 1e-3) for seed in (3, 4)]
        np.abs(moments[1], out=moments[1])  # a second moment, never negative
    beta1, beta2 = HYPER["betas"]
    options = dict(stochastic_rounding=True, seed=1) if stochastic else {}

    def fused(step: int) -> None:
        fusedopt.adam_(
            param,
            grad,
            *moments,
            step=step,
            lr=HYPER["lr"],
            beta1=beta1,
            beta2=beta2,
            eps=HYPER["eps"],
            **options,
        )

    steps = {"fusedopt": fused}
    if with_torch:
        import torch

        tensors = [[torch_view(a)] for a in (param, grad, *moments)]
        count = torch.zeros((), dtype=torch.float32)

        def torch_fused(step: int) -> None:
            count.fill_(step - 1)  # torch's kernel counts the step itself
            torch._fused_adam_(
                *tensors,
                [],
                [count],
                lr=HYPER["lr"],
                beta1=beta1,
                beta2=beta2,
                weight_decay=0.0,
                eps=HYPER["eps"],
                amsgrad=False,
                maximize=False,
            )

        steps["torch fused"] = torch_fused
    return steps


def bytes_per_element(param_dtype, state: str) -> float:
    p = np.dtype(param_dtype).itemsize
    s = 1 + 4 / BLOCK if state == "int8" else p
    return 3 * p + 4 * s  # param read and written, grad read, two states read and written


ROWS = [
    ("float32", np.float32, "float32", False, True),
    ("all bfloat16", BF16, "bfloat16", False, True),
    ("all bfloat16, stochastic", BF16, "bfloat16", True, False),
    ("float32, int8 state", np.float32, "int8", False, False),
]


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=float, default=1e9)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--out")
    args = parser.parse_args(argv)
    n = int(args.n)
    try:
        import torch  # noqa: F401

        have_torch = True
    except ImportError:
        have_torch = False
    results = []
    for name, param_dtype, state, stochastic, torch_has_it in ROWS:
        steps = row(name, n, param_dtype, state, stochastic, torch_has_it and have_torch)
        times = {impl: [] for impl in steps}
        for fn in steps.values():  # warm-up
            fn(1)
        step = 2
        for _ in range(args.rounds):
            for impl, fn in steps.items():
                # each timed call after an untimed one of the same library: the other's idle
                # OpenMP threads may still spin on the cores for a while after its call
                fn(step)
                start = time.perf_counter()
                fn(step + 1)
                times[impl].append(time.perf_counter() - start)
                step += 2
        moved = bytes_per_element(param_dtype, state)
        entry = {"row": name, "bytes_per_element": moved}
        for impl, t in times.items():
            entry[impl] = statistics.median(t)
            entry[f"{impl} GB/s"] = moved * n / statistics.median(t) / 1e9
        if "torch fused" in times:
            ratios = [f / t for f, t in zip(times["fusedopt"], times["torch fused"])]
            entry["fusedopt / torch"] = statistics.median(ratios)
        results.append(entry)
        del steps
    m = machine()
    header = (
        f"`python bench/billion.py --n {args.n:g}`: {m['cpu']}, {m['cores']} cores, fusedopt "
        f"{fusedopt.__version__}, SIMD level {fusedopt._core.simd_level()}, "
        f"{fusedopt.get_num_threads()} threads; Adam, n = {n:,}, median of {args.rounds}"
    )
    lines = [
        header,
        "",
        "| storage | B/element | fusedopt | GB/s | torch fused | GB/s | fusedopt / torch |",
        "|---|---|---|---|---|---|---|",
    ]
    for e in results:
        torch_cells = (
            [f"{e['torch fused'] * 1e3:.4g} ms", f"{e['torch fused GB/s']:.1f}"]
            if "torch fused" in e
            else ["–", "–"]
        )
        ratio = f"{e['fusedopt / torch']:.2f}" if "fusedopt / torch" in e else "–"
        lines.append(
            f"| {e['row']} | {e['bytes_per_element']:.1f} | {e['fusedopt'] * 1e3:.4g} ms | "
            f"{e['fusedopt GB/s']:.1f} | {' | '.join(torch_cells)} | {ratio} |"
        )
    print("\n".join(lines))
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"header": header, "rows": results}, f, indent=1)
    return {"rows": results}


if __name__ == "__main__":
    main()
