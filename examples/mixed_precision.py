"""What low-precision storage does to training: float32 vs bfloat16 params and 8-bit state.

    pip install ".[examples]"
    OMP_NUM_THREADS=1 OPENBLAS_NUM_THREADS=1 python examples/mixed_precision.py [--quick] \
        [--out DIR]

Two NumPy MLPs (ReLU, softmax cross-entropy, backprop by hand) are trained with the same
optimizer (fusedopt.optim.AdamW, lr 1e-3 on a cosine decay), seeds, data order and
hyperparameters under eight storage settings:

1. float32: float32 params and state;
2. bfloat16 (nearest): bfloat16 params and state, rounded to nearest even;
3. bfloat16 + stochastic rounding: the same, with bfloat16 stores rounded stochastically;
4. bfloat16 + float32 masters: bfloat16 params, float32 master weights and state;
5. bfloat16 state: float32 params, bfloat16 state, rounded to nearest even;
6. bfloat16 state + stochastic rounding: the same, rounded stochastically;
7. int8 state: float32 params, 8-bit block-quantized state (fusedopt.quantize), whose codes
   are always rounded stochastically;
8. bfloat16 + Kahan compensation: bfloat16 params with a bfloat16 compensation buffer that
   keeps what each rounding of the param lost (torch-optimi's alternative to float32 masters,
   2 B per element instead of 4), float32 state. fusedopt has no kernel for it: this script
   emulates it in NumPy around the float32 optimizer (KahanParams), to measure whether one is
   worth having.

Model A is a 64-128-128-10 MLP on scikit-learn's digits; model B a 128-256-256-256-16 MLP
on a synthetic 16-class problem (sklearn.datasets.make_classification). With bfloat16
params the forward and backward pass use the stored bfloat16 weights upcast to float32, and
the float32 gradients are passed to the optimizer as they are: only the storage is low
precision. Each (model, setting) runs over 3 seeds; the script prints a Markdown table (bytes
of param and optimizer state per parameter element, final training loss, test accuracy, time,
fraction of weights unchanged over the last epoch) and writes it with a plot of the loss curves
to --out (default bench/results): mixed_precision.md and mixed_precision.png.

Round to nearest stagnates: an AdamW update is about lr in size, and once the decaying lr is
below half a bfloat16 ulp of a weight (2**-9 relative), the rounded weight does not move.
Stochastic rounding keeps the expected update; float32 masters accumulate it. State rounded to
nearest loses small updates too: Adam's second moment changes by about 1 - beta2 = 0.1 % a
step, under a rounding step of bfloat16 (up to 0.8 %) or of the int8 codes (up to 12 %), so
rounded to nearest it drifts (up in bfloat16: smaller steps; int8 codes rounded to nearest lag
low, which is why fusedopt rounds them stochastically). The script measures that drift on
Gaussian gradients as well. Nothing is downloaded: the digits ship with
scikit-learn and model B's data is generated.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Any, Callable, NamedTuple, Optional

import ml_dtypes
import numpy as np

import fusedopt
from fusedopt import optim, schedules

BF16 = np.dtype(ml_dtypes.bfloat16)
F32 = np.dtype(np.float32)
SEEDS = (0, 1, 2)
HYPER = dict(lr=1e-3, betas=(0.9, 0.999), weight_decay=1e-2)
ETA_MIN = 1e-5  # the cosine decays lr to 1 % of its peak: late updates are small
DRIFT_STEPS = {False: 3000, True: 500}  # steps of the second-moment check (full, --quick)

# name -> (param dtype, optimizer options)
SETTINGS: dict[str, tuple[np.dtype, dict[str, Any]]] = {
    "float32": (F32, {}),
    "bfloat16 (nearest)": (BF16, dict(state_dtype="bfloat16")),
    "bfloat16 + stochastic rounding": (
        BF16,
        dict(state_dtype="bfloat16", stochastic_rounding=True),
    ),
    "bfloat16 + float32 masters": (BF16, dict(master_weights=True)),
    "bfloat16 state": (F32, dict(state_dtype="bfloat16")),
    "bfloat16 state + stochastic rounding": (
        F32,
        dict(state_dtype="bfloat16", stochastic_rounding=True),
    ),
    "int8 state": (F32, dict(state_dtype="int8")),
    "bfloat16 + Kahan compensation": (BF16, dict(kahan=True)),
}


class KahanParams:
    r"""bfloat16 params ``p`` with a bfloat16 Kahan compensation buffer ``c``, around a float32
    optimizer (as torch-optimi does it), under fusedopt's storage rule (float32 arithmetic, one
    rounding per stored array). Each step runs the optimizer on float32 copies of the params,
    which gives the update :math:`d`, then

    .. math::
        y = c + d, \qquad p' = \mathrm{bf16}(p + y), \qquad c' = \mathrm{bf16}(y - (p' - p))

    (:math:`p' - p` is exact in float32 unless the step moves the param's exponent by more
    than 16): ``c`` keeps what rounding the param lost, so updates far below half an ulp add
    up in it until they move the param. NumPy, for this experiment."""

    def __init__(self, params: dict[str, np.ndarray], **options: Any) -> None:
        self.params = params
        self.work = {k: v.astype(F32) for k, v in params.items()}
        self.compensation = {k: np.zeros(v.shape, BF16) for k, v in params.items()}
        self.optimizer = optim.AdamW(self.work, **options)

    @property
    def state(self) -> dict[str, dict[str, Any]]:
        """The optimizer's state per param, with its compensation buffer."""
        return {
            k: {**s, "compensation": self.compensation[k]} for k, s in self.optimizer.state.items()
        }

    def step(self, grads: dict[str, np.ndarray]) -> None:
        for k, p in self.params.items():
            self.work[k][...] = p  # exact: bfloat16 to float32
        self.optimizer.step(grads)
        for k, p in self.params.items():
            old = p.astype(F32)
            y = self.compensation[k].astype(F32) + (self.work[k] - old)
            new = (old + y).astype(BF16)
            self.compensation[k][...] = (y - (new.astype(F32) - old)).astype(BF16)
            p[...] = new


class Task(NamedTuple):
    """A model and its data: layer sizes, epochs, batch size, train and test sets."""

    name: str
    sizes: tuple[int, ...]
    epochs: int
    batch: int
    train: tuple[np.ndarray, np.ndarray]
    test: tuple[np.ndarray, np.ndarray]


def digits_task(epochs: int) -> Task:
    """Model A: the 8x8 digits (1797 images, 10 classes), 80 % train / 20 % test."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    x, y = (digits.data / 16.0).astype(F32), digits.target
    index = np.random.default_rng(0).permutation(len(y))
    cut = int(0.8 * len(y))
    train, test = index[:cut], index[cut:]
    return Task(
        "A: digits MLP 64-128-128-10",
        (64, 128, 128, 10),
        epochs,
        64,
        (x[train], y[train]),
        (x[test], y[test]),
    )


def synthetic_task(epochs: int, n_train: int, width: int) -> Task:
    """Model B: make_classification, 128 features (64 informative), 16 classes of 2 clusters
    each, 2 % label noise; standardized with the training set's statistics."""
    from sklearn.datasets import make_classification

    n_test = 2000
    x, y = make_classification(
        n_samples=n_train + n_test,
        n_features=128,
        n_informative=64,
        n_redundant=32,
        n_classes=16,
        n_clusters_per_class=2,
        class_sep=2.0,
        flip_y=0.02,
        random_state=0,
    )
    mean, std = x[:n_train].mean(0), x[:n_train].std(0)
    x = ((x - mean) / std).astype(F32)
    sizes = (128, width, width, width, 16)
    name = f"B: synthetic MLP {'-'.join(map(str, sizes))}"
    return Task(name, sizes, epochs, 128, (x[:n_train], y[:n_train]), (x[n_train:], y[n_train:]))


def init_mlp(rng: np.random.Generator, sizes: tuple[int, ...]) -> dict[str, np.ndarray]:
    """He-initialised float32 weights, zero biases."""
    params = {}
    for i, (n_in, n_out) in enumerate(zip(sizes[:-1], sizes[1:]), 1):
        params[f"W{i}"] = (rng.standard_normal((n_in, n_out)) * np.sqrt(2.0 / n_in)).astype(F32)
        params[f"b{i}"] = np.zeros(n_out, F32)
    return params


def forward(params: dict[str, np.ndarray], x: np.ndarray) -> tuple[list[np.ndarray], np.ndarray]:
    """The ReLU activations (input first) and the logits."""
    layers = len(params) // 2
    activations = [x]
    for i in range(1, layers):
        activations.append(np.maximum(activations[-1] @ params[f"W{i}"] + params[f"b{i}"], 0))
    return activations, activations[-1] @ params[f"W{layers}"] + params[f"b{layers}"]


def softmax_loss(logits: np.ndarray, y: np.ndarray) -> tuple[float, np.ndarray]:
    """Mean cross-entropy and the softmax probabilities."""
    logits = logits - logits.max(axis=1, keepdims=True)
    p = np.exp(logits)
    p /= p.sum(axis=1, keepdims=True)
    return float(-np.log(p[np.arange(len(y)), y] + 1e-12).mean()), p


def loss_and_grads(
    params: dict[str, np.ndarray], x: np.ndarray, y: np.ndarray
) -> tuple[float, dict[str, np.ndarray]]:
    """Loss and float32 gradients, by hand."""
    activations, logits = forward(params, x)
    loss, d = softmax_loss(logits, y)
    d[np.arange(len(y)), y] -= 1
    d /= len(y)
    grads = {}
    for i in range(len(params) // 2, 0, -1):
        grads[f"W{i}"], grads[f"b{i}"] = activations[i - 1].T @ d, d.sum(0)
        if i > 1:
            d = (d @ params[f"W{i}"].T) * (activations[i - 1] > 0)
    return loss, grads


def bytes_per_element(opt: Any, params: dict[str, np.ndarray]) -> tuple[float, float]:
    """(param bytes, optimizer state bytes) per parameter element, counted from the arrays:
    state buffers, masters, quantized codes and their per-block scales."""
    elements = sum(p.size for p in params.values())
    state = sum(v.nbytes for s in opt.state.values() for v in s.values() if hasattr(v, "nbytes"))
    return sum(p.nbytes for p in params.values()) / elements, state / elements


def train(
    task: Task,
    setting: str,
    seed: int,
    after_epoch: Optional[Callable[[int, Any], None]] = None,
) -> dict[str, Any]:
    """Train one model under one storage setting; the seed fixes the initial weights, the data
    order and the stochastic-rounding stream, identically for every setting. ``after_epoch``,
    if given, is called with the epoch (from 1) and the optimizer after each epoch."""
    dtype, options = SETTINGS[setting]
    params = {
        k: v.astype(dtype) for k, v in init_mlp(np.random.default_rng(seed), task.sizes).items()
    }
    kahan = options.get("kahan", False)
    opt: Any = (
        KahanParams(params, **HYPER)
        if kahan
        else optim.AdamW(params, **HYPER, seed=seed, **options)
    )
    x, y = task.train
    steps_per_epoch = -(-len(y) // task.batch)
    schedule = schedules.CosineAnnealingLR(
        opt.optimizer if kahan else opt, T_max=task.epochs * steps_per_epoch, eta_min=ETA_MIN
    )
    # A bfloat16 model computes with its stored weights, upcast; float32 ones are used as is.
    as_f32: Callable[[dict[str, np.ndarray]], dict[str, np.ndarray]] = (
        (lambda p: p) if dtype == F32 else (lambda p: {k: v.astype(F32) for k, v in p.items()})
    )
    order_rng = np.random.default_rng(seed + 1000)
    curve = []
    start = time.perf_counter()
    for epoch in range(task.epochs):
        if epoch == task.epochs - 1:
            before = {k: v.copy() for k, v in params.items()}
        order = order_rng.permutation(len(y))
        losses = []
        for first in range(0, len(y), task.batch):
            index = order[first : first + task.batch]
            loss, grads = loss_and_grads(as_f32(params), x[index], y[index])
            opt.step(grads)
            schedule.step()
            losses.append(loss)
        curve.append(float(np.mean(losses)))
        if after_epoch is not None:
            after_epoch(epoch + 1, opt)
    seconds = time.perf_counter() - start
    weights = as_f32(params)
    # bitwise comparison of the stored weights (the biases are a small part)
    unchanged = sum(
        int(
            np.count_nonzero(
                before[k].view(f"u{dtype.itemsize}") == params[k].view(f"u{dtype.itemsize}")
            )
        )
        for k in params
    ) / sum(p.size for p in params.values())
    param_bytes, state_bytes = bytes_per_element(opt, params)
    return {
        "curve": np.array(curve),
        "loss": softmax_loss(forward(weights, x)[1], y)[0],  # full training set, at the end
        "accuracy": float((forward(weights, task.test[0])[1].argmax(1) == task.test[1]).mean()),
        "unchanged": unchanged,
        "param bytes": param_bytes,
        "state bytes": state_bytes,
        "seconds": seconds,
    }


def summarize(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Means and sample standard deviations over seeds."""
    out: dict[str, Any] = {"runs": runs, "curves": np.array([r["curve"] for r in runs])}
    for key in ("loss", "accuracy", "unchanged", "param bytes", "state bytes", "seconds"):
        values = np.array([r[key] for r in runs])
        out[key] = float(values.mean())
        out[key + " std"] = float(values.std(ddof=1)) if len(values) > 1 else 0.0
    return out


def second_moment_drift(steps: int, n: int = 4096) -> dict[str, float]:
    """Adam's bias-corrected second moment after ``steps`` steps of gradients N(0, s**2) with a
    known scale s per element, as a mean of v_hat / s**2 (1 when unbiased), per state storage.
    With beta2 = 0.999 each step changes v by about 0.1 %, less than a rounding step of bfloat16
    (0.4 %-0.8 %) or of the 3-bit-mantissa int8 codes (6 %-12 %): rounded to nearest, v stops
    following the gradients, which changes the effective step size lr / sqrt(v_hat)."""
    scale = np.random.default_rng(0).uniform(0.5, 2.0, n).astype(F32)
    drift = {}
    storages = {
        "float32": {},
        "bfloat16": dict(state_dtype="bfloat16"),
        "bfloat16, stochastic rounding": dict(state_dtype="bfloat16", stochastic_rounding=True),
        "int8": dict(state_dtype="int8"),
    }
    for name, options in storages.items():
        w = np.zeros(n, F32)
        opt = optim.AdamW([w], **HYPER, **options)
        rng = np.random.default_rng(1)
        for _ in range(steps):
            opt.step([rng.standard_normal(n, dtype=F32) * scale])
        v = opt.state["0.0"]["exp_avg_sq"]
        v = v.dequantize() if hasattr(v, "dequantize") else v.astype(F32)
        drift[name] = float(np.mean(v / (1 - HYPER["betas"][1] ** steps) / scale**2))
    return drift


def run(quick: bool = False, out: Path = Path("bench/results")) -> dict[str, Any]:
    """Train both models under every setting and seed; write the table and the plot to ``out``.

    Returns {"tasks": {"A"|"B": {"name": ..., "settings": {setting: summary}}}, "drift": ...,
    "table": Markdown, "seconds": wall time}. ``quick`` is the reduced version for the tests.
    """
    from threadpoolctl import threadpool_limits

    start = time.perf_counter()
    fusedopt.set_num_threads(1)
    if quick:
        seeds = SEEDS[:2]
        tasks = {
            "A": digits_task(epochs=20),
            "B": synthetic_task(epochs=8, n_train=2000, width=128),
        }
    else:
        seeds = SEEDS
        tasks = {
            "A": digits_task(epochs=40),
            "B": synthetic_task(epochs=20, n_train=10000, width=256),
        }
    results: dict[str, Any] = {"tasks": {}, "seeds": seeds, "quick": quick}
    with threadpool_limits(1):  # NumPy's BLAS on one thread too: the runs are timed
        for key, task in tasks.items():
            settings = {s: summarize([train(task, s, seed) for seed in seeds]) for s in SETTINGS}
            results["tasks"][key] = {"name": task.name, "epochs": task.epochs, "settings": settings}
        results["drift"] = second_moment_drift(steps=DRIFT_STEPS[quick])
    results["seconds"] = time.perf_counter() - start
    results["table"] = table(results)
    out.mkdir(parents=True, exist_ok=True)
    (out / "mixed_precision.md").write_text(results["table"] + "\n")
    plot(results, out / "mixed_precision.png")
    return results


def table(results: dict[str, Any]) -> str:
    """The results as Markdown: one row per (model, setting), mean ± std over the seeds."""
    seeds = results["seeds"]
    lines = [
        f"fusedopt {fusedopt.__version__}, AdamW lr {HYPER['lr']:g} (cosine to {ETA_MIN:g}), "
        f"weight decay {HYPER['weight_decay']:g}, seeds {list(seeds)}, 1 thread"
        + (" (--quick)" if results["quick"] else ""),
        "",
        "| model | setting | param B/elem | state B/elem | final train loss | test accuracy | "
        "unchanged in last epoch | s/run |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for task in results["tasks"].values():
        for setting, r in task["settings"].items():
            lines.append(
                f"| {task['name']} | {setting} | {r['param bytes']:.0f} | {r['state bytes']:.3f} | "
                f"{r['loss']:.4f} ± {r['loss std']:.4f} | "
                f"{r['accuracy']:.4f} ± {r['accuracy std']:.4f} | "
                f"{r['unchanged']:.3f} | {r['seconds']:.2f} |"
            )
    lines += [
        "",
        "Final train loss: on the whole training set after the last step, with the stored "
        "weights. Unchanged: fraction of stored parameter elements (bit for bit) that the last "
        "epoch did not change. State bytes: optimizer state arrays (moments, float32 masters, "
        "int8 codes and per-256-element scales, the Kahan compensation buffer) per parameter "
        "element. s/run: wall seconds of training per run (a shared machine: indicative only; "
        "the Kahan setting is emulated in NumPy).",
        "",
        "Adam's bias-corrected second moment v_hat / E[g^2] after "
        f"{DRIFT_STEPS[results['quick']]} steps of Gaussian gradients (1 = unbiased):",
        "",
        "| state storage | v_hat / E[g^2] |",
        "|---|---|",
        *(f"| {name} | {ratio:.3f} |" for name, ratio in results["drift"].items()),
        "",
        f"{results['seconds']:.0f} s in all.",
    ]
    return "\n".join(lines)


def plot(results: dict[str, Any], path: Path) -> None:
    """Training loss per epoch, mean over seeds (band: min to max), one panel per model."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    tasks = results["tasks"]
    fig, axes = plt.subplots(1, len(tasks), figsize=(6.5 * len(tasks), 4.8))
    for ax, task in zip(np.atleast_1d(axes), tasks.values()):
        for setting, r in task["settings"].items():
            curves = r["curves"]
            epochs = np.arange(1, curves.shape[1] + 1)
            style = "--" if setting.endswith("state") else "-"
            (line,) = ax.plot(epochs, curves.mean(0), style, label=setting, lw=1.4)
            ax.fill_between(epochs, curves.min(0), curves.max(0), color=line.get_color(), alpha=0.2)
        ax.set_yscale("log")
        ax.set_xlabel("epoch")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_ylabel("training loss (mean of the epoch's minibatches)")
        ax.set_title(task["name"], fontsize=10)
        ax.grid(True, which="both", alpha=0.3)
    np.atleast_1d(axes)[0].legend(fontsize=8)
    fig.suptitle(
        f"fusedopt AdamW, storage precision vs training loss ({len(results['seeds'])} seeds)"
    )
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="the reduced run of the tests")
    parser.add_argument(
        "--out", type=Path, default=Path(__file__).resolve().parent.parent / "bench" / "results"
    )
    args = parser.parse_args()
    results = run(quick=args.quick, out=args.out)
    print(results["table"])
    print(f"\nwritten: {args.out / 'mixed_precision.md'}, {args.out / 'mixed_precision.png'}")


if __name__ == "__main__":
    main()
