"""Which block size for int8 state: the codec's error on real Adam moments, per block size.

    pip install ".[examples]"
    python bench/block_size.py [--out bench/results]

Trains model B of examples/mixed_precision.py (the 128-256-256-256-16 MLP on a synthetic
16-class problem) in float32 with AdamW as there, takes its moments (exp_avg, signed codes;
exp_avg_sq, unsigned codes) after the first epoch, a quarter of the way and at the end, and
quantizes every tensor's with blocks of 32 to 4096 elements: the NumPy twin of the kernels'
codec (fusedopt.quantize; the kernels use 256), rounded stochastically as the kernels round.
Per block size it reports the bytes per element, the relative RMS error of m and of v, the
error of Adam's step direction m_hat / (sqrt(v_hat) + eps) (RMS over all elements, relative,
and the median of each element's relative error), and the share of nonzero moments that decode
to zero. Writes block_size.md to --out.
"""

from __future__ import annotations

import argparse
import importlib.util
import time
from pathlib import Path

import numpy as np

import fusedopt
from fusedopt import quantize

ROOT = Path(__file__).resolve().parent.parent
BLOCKS = (32, 64, 128, 256, 512, 1024, 2048, 4096)
EPS = 1e-8


def load_example():
    spec = importlib.util.spec_from_file_location(
        "mixed_precision", ROOT / "examples" / "mixed_precision.py"
    )
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    return example


def snapshots(example, epochs: int, at: tuple[int, ...]) -> dict[int, dict]:
    """Model B trained in float32 by examples/mixed_precision.py (seed 0); the step count and a
    copy of every tensor's exp_avg and exp_avg_sq after each epoch in ``at``."""
    out = {}

    def capture(epoch, opt):
        if epoch in at:
            out[epoch] = {
                "step": next(iter(opt.state.values()))["step"],
                "m": {k: s["exp_avg"].copy() for k, s in opt.state.items()},
                "v": {k: s["exp_avg_sq"].copy() for k, s in opt.state.items()},
            }

    task = example.synthetic_task(epochs=epochs, n_train=10000, width=256)
    example.train(task, "float32", 0, after_epoch=capture)
    return out


def round_trip(x: np.ndarray, signed: bool, block: int, rng: np.random.Generator) -> np.ndarray:
    bits = rng.integers(0, 1 << 32, x.size, dtype=np.uint32)
    codes, scales = quantize._encode(x, signed, bits, block)
    return quantize._decode(codes, scales, block)


def errors(snapshot: dict, block: int, betas: tuple[float, float]) -> dict[str, float]:
    """The codec's errors on one snapshot's moments at one block size."""
    rng = np.random.default_rng(0)
    b1, b2 = betas
    t = snapshot["step"]
    m, v, m_hat, v_hat = [], [], [], []
    for k in snapshot["m"]:
        m.append(snapshot["m"][k].ravel())
        v.append(snapshot["v"][k].ravel())
        m_hat.append(round_trip(snapshot["m"][k], True, block, rng).ravel())
        v_hat.append(round_trip(snapshot["v"][k], False, block, rng).ravel())
    m, v, m_hat, v_hat = (np.concatenate(a).astype(np.float64) for a in (m, v, m_hat, v_hat))

    def step_direction(m_, v_):
        return (m_ / (1 - b1**t)) / (np.sqrt(v_ / (1 - b2**t)) + EPS)

    u, u_hat = step_direction(m, v), step_direction(m_hat, v_hat)
    moving = u != 0
    return {
        "m": float(np.linalg.norm(m_hat - m) / np.linalg.norm(m)),
        "v": float(np.linalg.norm(v_hat - v) / np.linalg.norm(v)),
        "step": float(np.linalg.norm(u_hat - u) / np.linalg.norm(u)),
        "step median": float(np.median(np.abs(u_hat - u)[moving] / np.abs(u)[moving])),
        "m lost": float(np.mean(m_hat[m != 0] == 0)),
        "v lost": float(np.mean(v_hat[v != 0] == 0)),
    }


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results")
    args = parser.parse_args(argv)
    start = time.perf_counter()
    example = load_example()
    at = (1, max(1, args.epochs // 4), args.epochs)
    shots = snapshots(example, args.epochs, at)
    lines = [
        f"fusedopt {fusedopt.__version__}: AdamW moments of model B "
        f"(examples/mixed_precision.py, float32, seed 0, {args.epochs} epochs), each tensor "
        "quantized with the int8 codec at each block size (stochastic rounding, as the kernels "
        "round); the kernels' block is 256. Errors relative, over all elements of all tensors; "
        "step: Adam's m_hat / (sqrt(v_hat) + eps); lost: share of nonzero moments that decode "
        "to 0.",
        "",
        "| epoch (step) | block | B/element | m error | v error | step error | "
        "step error, median element | m lost | v lost |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for epoch, shot in shots.items():
        for block in BLOCKS:
            e = errors(shot, block, example.HYPER["betas"])
            lines.append(
                f"| {epoch} ({shot['step']}) | {block} | {1 + 4 / block:.3f} | {e['m']:.4f} | "
                f"{e['v']:.4f} | {e['step']:.4f} | {e['step median']:.4f} | "
                f"{e['m lost']:.4f} | {e['v lost']:.4f} |"
            )
    lines += ["", f"{time.perf_counter() - start:.0f} s."]
    text = "\n".join(lines)
    print(text)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "block_size.md").write_text(text + "\n")


if __name__ == "__main__":
    main()
