"""Muon's step on transformer shapes (d = 256, 512, 1024; d x d and 4d x d) against
torch.optim.Muon: medians of interleaved steps, GFLOP/s of the Newton-Schulz products against
the machine's measured float32 GEMM peak, and how far each iteration is from the exact one.

    python bench/muon.py [--dims 256 512 1024] [--repeats 7]   # FUSEDOPT_SIMD picks the level

Implementations, all float32 params and gradients:
- fusedopt: fusedopt.muon_ (iteration in float32, Eigen GEMM at the loaded SIMD level);
- torch: torch.optim.Muon.step() as shipped (torch 2.13 casts the iteration to bfloat16);
- torch-f32: the same code with the cast patched to float32 (the same arithmetic as ours);
- numpy: fusedopt.reference.muon_ (NumPy's BLAS matmul, float32).
FLOPs per step: ns_steps (5) x (4 m^2 n + 2 m^3) for an m x n update, m <= n (X X^T, A A, B X);
the element-wise passes are not counted. The peak is the median of numpy float32 matmuls of
2048 x 2048 (its BLAS, all threads), and of Eigen's float32 GEMM as fusedopt runs it (one
Newton-Schulz step on 2048 x 2048 through fusedopt.muon_ with ns_steps=1, minus nothing: a
lower bound). Writes bench/results/muon.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from pathlib import Path
from unittest import mock

import numpy as np

import fusedopt
from fusedopt import reference

try:
    import torch
except ImportError:
    torch = None

RESULTS = Path(__file__).parent / "results"


def flops(shape, ns_steps=5):
    m, n = sorted(shape)
    return ns_steps * (4 * m * m * n + 2 * m**3)


def timed(fn):
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def gemm_peak(repeats):
    """GFLOP/s of numpy's float32 matmul at 2048^3 (median), and of fusedopt's own products:
    muon_ with ns_steps=1 on a 2048 x 2048 matrix is 6 * 2048^3 flops plus element-wise passes
    (so a lower bound of its GEMM rate)."""
    n = 2048
    rng = np.random.default_rng(0)
    a, b = (rng.standard_normal((n, n)).astype(np.float32) for _ in range(2))
    a @ b
    numpy_times = [timed(lambda: a @ b) for _ in range(repeats)]
    p, g, m = (rng.standard_normal((n, n)).astype(np.float32) for _ in range(3))
    fusedopt.muon_(p, g, m, ns_steps=1)
    ours = [timed(lambda: fusedopt.muon_(p, g, m, ns_steps=1)) for _ in range(repeats)]
    return (
        2 * n**3 / statistics.median(numpy_times) / 1e9,
        flops((n, n), 1) / statistics.median(ours) / 1e9,
    )


def torch_step(shape, rng, float32_iteration):
    p = torch.tensor(rng.standard_normal(shape).astype(np.float32), requires_grad=True)
    p.grad = torch.tensor(rng.standard_normal(shape).astype(np.float32))
    opt = torch.optim.Muon([p], lr=0.02)
    if not float32_iteration:
        return opt.step
    patch = mock.patch.object(torch.Tensor, "bfloat16", lambda self: self.float())

    def step():
        with patch:
            opt.step()

    return step


def accuracy(shape, rng):
    """Max relative error of each iteration's result against the float64 iteration from the
    same float32 input: relative Frobenius norm of the difference."""
    g = rng.standard_normal(shape).astype(np.float32)
    exact = reference.newton_schulz(g.astype(np.float64))

    def error(o):
        return float(np.linalg.norm(o.astype(np.float64) - exact) / np.linalg.norm(exact))

    p, b = np.zeros(shape, np.float32), np.zeros(shape, np.float32)
    # momentum 0, no Nesterov: the iteration's input is g itself; param = -lr' O
    fusedopt.muon_(p, g, b, lr=1.0, weight_decay=0.0, momentum=0.0, nesterov=False)
    p = p / np.float32(reference.muon_adjusted_lr(1.0, None, shape))
    out = {"fusedopt": error(-p), "numpy": error(reference.newton_schulz(g))}
    if torch is not None:
        from torch.optim._muon import _zeropower_via_newtonschulz as ns

        coefficients = reference.MUON_NS_COEFFICIENTS
        bf16 = ns(torch.tensor(g), coefficients, 5, 1e-7).float().numpy()
        out["torch"] = error(bf16)
        out["torch_vs_fusedopt"] = float(
            np.linalg.norm(bf16.astype(np.float64) + p) / np.linalg.norm(p.astype(np.float64))
        )
    return out


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dims", type=int, nargs="+", default=[256, 512, 1024])
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--threads", type=int, default=0, help="0: every implementation's default")
    parser.add_argument("--out", default="muon", help="results file stem in bench/results")
    args = parser.parse_args(argv)
    if args.threads:
        fusedopt.set_num_threads(args.threads)
        if torch is not None:
            torch.set_num_threads(args.threads)
    rng = np.random.default_rng(0)
    numpy_peak, eigen_peak = gemm_peak(args.repeats)
    rows = []
    for d in args.dims:
        for shape in ((d, d), (4 * d, d)):
            impls = {}
            p, g, m = (rng.standard_normal(shape).astype(np.float32) for _ in range(3))
            impls["fusedopt"] = lambda p=p, g=g, m=m: fusedopt.muon_(p, g, m, lr=0.02)
            p2, g2, m2 = p.copy(), g.copy(), m.copy()
            impls["numpy"] = lambda p=p2, g=g2, m=m2: reference.muon_(p, g, m, lr=0.02)
            if torch is not None:
                impls["torch"] = torch_step(shape, rng, False)
                impls["torch-f32"] = torch_step(shape, rng, True)
            for fn in impls.values():
                fn()  # warm up
            times = {name: [] for name in impls}
            for _ in range(args.repeats):  # interleaved: the machine is shared
                for name, fn in impls.items():
                    times[name].append(timed(fn))
            medians = {name: statistics.median(t) for name, t in times.items()}
            row = {
                "shape": list(shape),
                "gflop": flops(shape) / 1e9,
                "ms": {k: v * 1e3 for k, v in medians.items()},
                "gflops": {k: flops(shape) / v / 1e9 for k, v in medians.items()},
                "accuracy": accuracy(shape, rng),
            }
            rows.append(row)
            print(json.dumps(row))
    flags = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    result = {
        "machine": platform.processor() or platform.machine(),
        "cpu_bf16_matrix_units": sorted({f for f in ("amx_bf16", "avx512_bf16") if f in flags}),
        "load_average": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
        "threads": fusedopt.get_num_threads(),
        "torch_threads": torch.get_num_threads() if torch is not None else None,
        "simd_level": fusedopt._core.simd_level(),
        "torch": torch.__version__ if torch is not None else None,
        "numpy_sgemm_peak_gflops": numpy_peak,
        "fusedopt_gemm_gflops": eigen_peak,
        "rows": rows,
    }
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / f"{args.out}.json").write_text(json.dumps(result, indent=1) + "\n")
    (RESULTS / f"{args.out}.md").write_text(markdown(result))
    print(markdown(result))


def markdown(r):
    peak = r["numpy_sgemm_peak_gflops"]
    names = list(r["rows"][0]["ms"])
    lines = [
        f"# Muon step, float32 ({r['simd_level']}, {r['threads']} threads; torch "
        f"{r['torch']}, {r['torch_threads']} threads)",
        "",
        f"GEMM peak measured: numpy float32 matmul 2048^3 {peak:.1f} GFLOP/s; fusedopt's "
        f"products in one Newton-Schulz step at 2048 x 2048 {r['fusedopt_gemm_gflops']:.1f} "
        "GFLOP/s. Medians of interleaved steps from one run (`python bench/muon.py`); load "
        f"average {r['load_average']} on this shared machine; CPU bfloat16 matrix units: "
        f"{', '.join(r['cpu_bf16_matrix_units']) or 'none'} (torch's bfloat16 products use them).",
        "",
        "| shape | GFLOP/step | "
        + " | ".join(f"{n} ms (GFLOP/s, % peak)" for n in names)
        + " | fusedopt vs torch | vs torch-f32 | vs numpy |",
        "|---|---|" + "---|" * len(names) + "---|---|---|",
    ]
    for row in r["rows"]:
        ms, gf = row["ms"], row["gflops"]
        cells = [f"{ms[n]:.2f} ({gf[n]:.0f}, {100 * gf[n] / peak:.0f} %)" for n in names]
        ratios = [
            f"{ms[n] / ms['fusedopt']:.2f}x" if n in ms else "-"
            for n in ("torch", "torch-f32", "numpy")
        ]
        lines.append(
            f"| {row['shape'][0]} x {row['shape'][1]} | {row['gflop']:.2f} | "
            + " | ".join(cells)
            + " | "
            + " | ".join(ratios)
            + " |"
        )
    lines += [
        "",
        "Relative Frobenius error of the orthogonalized update against the float64 iteration "
        "from the same float32 gradient:",
        "",
        "| shape | fusedopt (float32) | numpy (float32) | torch (bfloat16) | torch vs fusedopt |",
        "|---|---|---|---|---|",
    ]
    for row in r["rows"]:
        a = {"torch": float("nan"), "torch_vs_fusedopt": float("nan"), **row["accuracy"]}
        lines.append(
            f"| {row['shape'][0]} x {row['shape'][1]} | {a['fusedopt']:.1e} | {a['numpy']:.1e} "
            f"| {a['torch']:.1e} | {a['torch_vs_fusedopt']:.1e} |"
        )
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
