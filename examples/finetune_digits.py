"""Pretrain, checkpoint, fine-tune: a NumPy MLP on scikit-learn's digits with fusedopt.

    pip install ".[examples]" && python examples/finetune_digits.py

For each optimizer (GD, SGD, Momentum, Nesterov, Adagrad, RMSprop, Adam, AdamW, Lion):
1. pretrain a 64-64-64-5 MLP (ReLU, softmax cross-entropy, backprop by hand) on digits 0-4 and
   save a checkpoint of the model and the optimizer;
2. load it, replace the head, freeze the hidden layers and fine-tune the head on digits 5-9;
   then unfreeze and train all layers at a tenth of the learning rate, on a cosine schedule;
3. report test accuracies and times in a table, and plot the loss curves to a PNG;
4. run the same thing with fusedopt.reference (plain NumPy) and check the curves agree.
The digits ship with scikit-learn: nothing is downloaded.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np

import fusedopt
from fusedopt import optim, schedules

HIDDEN = 64
DTYPE = np.float32
# name -> (optimizer class, hyperparameters, full-batch gradient descent?)
OPTIMIZERS = {
    "GD": (optim.SGD, dict(lr=0.2), True),  # full batch: larger rates oscillate
    "SGD": (optim.SGD, dict(lr=0.05), False),
    "Momentum": (optim.Momentum, dict(lr=0.1, beta=0.9), False),
    "Nesterov": (optim.SGD, dict(lr=0.02, momentum=0.9, nesterov=True), False),
    "Adagrad": (optim.Adagrad, dict(lr=0.05), False),
    "RMSprop": (optim.RMSprop, dict(lr=1e-3), False),
    "Adam": (optim.Adam, dict(lr=2e-3), False),
    "AdamW": (optim.AdamW, dict(lr=2e-3, weight_decay=1e-2), False),
    "Lion": (optim.Lion, dict(lr=3e-3, weight_decay=1e-2), False),
}


def load_digits_tasks(seed: int = 0):
    """Two tasks from the digits (8x8 images, 1797 samples): 0-4 and 5-9, each split into
    80 % train and 20 % test, labels 0-4 within each task."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    x = (digits.data / 16.0).astype(DTYPE)
    y = digits.target
    rng = np.random.default_rng(seed)
    tasks = []
    for classes in (range(0, 5), range(5, 10)):
        index = rng.permutation(np.flatnonzero(np.isin(y, list(classes))))
        cut = int(0.8 * len(index))
        xs, ys = x[index], y[index] - classes.start
        tasks.append(((xs[:cut], ys[:cut]), (xs[cut:], ys[cut:])))
    return tasks


def init_layer(rng, n_in, n_out):
    """He initialisation for ReLU layers."""
    return (rng.standard_normal((n_in, n_out)) * np.sqrt(2.0 / n_in)).astype(DTYPE), np.zeros(
        n_out, DTYPE
    )


def init_mlp(seed: int, n_classes: int = 5):
    rng = np.random.default_rng(seed)
    params = {}
    for i, (n_in, n_out) in enumerate([(64, HIDDEN), (HIDDEN, HIDDEN), (HIDDEN, n_classes)], 1):
        params[f"W{i}"], params[f"b{i}"] = init_layer(rng, n_in, n_out)
    return params


def loss_and_grads(params, x, y):
    """Mean softmax cross-entropy and its gradients, by hand."""
    h1 = np.maximum(x @ params["W1"] + params["b1"], 0)
    h2 = np.maximum(h1 @ params["W2"] + params["b2"], 0)
    logits = h2 @ params["W3"] + params["b3"]
    logits -= logits.max(axis=1, keepdims=True)
    p = np.exp(logits)
    p /= p.sum(axis=1, keepdims=True)
    n = len(y)
    loss = -np.log(p[np.arange(n), y] + 1e-12).mean()
    d = p
    d[np.arange(n), y] -= 1
    d /= n
    grads = {"W3": h2.T @ d, "b3": d.sum(0)}
    d = (d @ params["W3"].T) * (h2 > 0)
    grads.update(W2=h1.T @ d, b2=d.sum(0))
    d = (d @ params["W2"].T) * (h1 > 0)
    grads.update(W1=x.T @ d, b1=d.sum(0))
    return float(loss), grads


def accuracy(params, x, y):
    h = np.maximum(x @ params["W1"] + params["b1"], 0)
    h = np.maximum(h @ params["W2"] + params["b2"], 0)
    return float(((h @ params["W3"] + params["b3"]).argmax(1) == y).mean())


def train(opt, params, data, epochs, full_batch, rng, losses, schedule=None, batch=64):
    x, y = data
    for _ in range(epochs):
        order = np.arange(len(y)) if full_batch else rng.permutation(len(y))
        size = len(y) if full_batch else batch
        for start in range(0, len(y), size):
            index = order[start : start + size]
            loss, grads = loss_and_grads(params, x[index], y[index])
            opt.step(grads)
            if schedule is not None:
                schedule.step()
            losses.append(loss)


def workflow(name, tasks, epochs, folder: Path, seed=0):
    """Pretrain, checkpoint, load, fine-tune; returns accuracies and the loss curve."""
    cls, hyper, full_batch = OPTIMIZERS[name]
    (pre_train, pre_test), (fine_train, fine_test) = tasks
    rng = np.random.default_rng(seed)
    losses = []

    # 1. pretrain on 0-4, checkpoint model and optimizer
    params = init_mlp(seed)
    opt = cls(params, **hyper)
    train(opt, params, pre_train, epochs[0], full_batch, rng, losses)
    pretrain_accuracy = accuracy(params, *pre_test)
    np.savez(folder / f"{name}-model.npz", **params)
    opt.save(folder / f"{name}-optimizer.npz")

    # 2. load, replace the head, fine-tune it alone on 5-9, then everything at lr / 10
    with np.load(folder / f"{name}-model.npz") as saved:
        params = {k: saved[k].copy() for k in saved.files}
    opt = optim.Optimizer.load(folder / f"{name}-optimizer.npz", params)
    params["W3"][...], params["b3"][...] = init_layer(np.random.default_rng(seed + 1), HIDDEN, 5)
    opt.reset_state(["W3", "b3"])
    hidden = ["W1", "b1", "W2", "b2"]
    opt.freeze(hidden)
    train(opt, params, fine_train, epochs[1], full_batch, rng, losses)
    head_accuracy = accuracy(params, *fine_test)
    opt.unfreeze(hidden)
    for group in opt.param_groups:
        group["lr"] = group["lr"] / 10
    steps = epochs[2] * (1 if full_batch else -(-len(fine_train[1]) // 64))
    cosine = schedules.CosineAnnealingLR(opt, T_max=steps)
    train(opt, params, fine_train, epochs[2], full_batch, rng, losses, schedule=cosine)
    return {
        "pretrain": pretrain_accuracy,
        "head only": head_accuracy,
        "all layers": accuracy(params, *fine_test),
        "losses": np.array(losses),
    }


def run(epochs=(30, 10, 20), folder: Path = Path("examples/output"), plot=True, names=None):
    folder.mkdir(parents=True, exist_ok=True)
    tasks = load_digits_tasks()
    results = {}
    for name in names or OPTIMIZERS:
        start = time.perf_counter()
        results[name] = workflow(name, tasks, epochs, folder)
        results[name]["seconds"] = time.perf_counter() - start
        start = time.perf_counter()
        with optim.reference_kernels():
            reference = workflow(name, tasks, epochs, folder)
        results[name]["reference seconds"] = time.perf_counter() - start
        results[name]["agree"] = bool(np.array_equal(results[name]["losses"], reference["losses"]))
    if plot:
        plot_losses(results, folder / "finetune_digits.png", epochs)
    return results


def plot_losses(results, path, epochs):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(9, 5))
    for name, r in results.items():
        losses = r["losses"]
        smooth = np.convolve(losses, np.ones(5) / 5, mode="valid") if len(losses) > 50 else losses
        ax.plot(np.linspace(0, 1, len(smooth)), smooth, label=name, lw=1.2)
    ax.set_yscale("log")
    ax.set_xlabel("training progress: pretrain 0-4  |  head on 5-9  |  all layers on 5-9")
    ax.set_ylabel("training loss (moving average of 5 steps)")
    total = sum(epochs)
    for edge in (epochs[0] / total, (epochs[0] + epochs[1]) / total):
        ax.axvline(edge, color="grey", lw=0.8, ls="--")
    ax.set_title("fusedopt: a NumPy MLP on scikit-learn digits, pretrain then fine-tune")
    ax.legend(ncol=3, fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def table(results):
    lines = [
        "| optimizer | pretrain acc (0-4) | head only (5-9) | all layers (5-9) | "
        "fusedopt s | reference s | curves agree |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, r in results.items():
        lines.append(
            f"| {name} | {r['pretrain']:.3f} | {r['head only']:.3f} | "
            f"{r['all layers']:.3f} | {r['seconds']:.2f} | "
            f"{r['reference seconds']:.2f} | {'yes, bit for bit' if r['agree'] else 'NO'} |"
        )
    return "\n".join(lines)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "output")
    args = parser.parse_args()
    start = time.perf_counter()
    results = run(folder=args.out)
    print(table(results))
    print(
        f"\nloss curves: {args.out / 'finetune_digits.png'}; "
        f"{time.perf_counter() - start:.1f} s in all, fusedopt {fusedopt.__version__}"
    )
    if not all(r["agree"] for r in results.values()):
        raise SystemExit("fusedopt and fusedopt.reference disagree")


if __name__ == "__main__":
    main()
