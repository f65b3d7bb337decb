"""Pretrain, checkpoint, fine-tune: a NumPy MLP on scikit-learn's digits with fusedopt.

    pip install ".[examples]" && python examples/finetune_digits.py

For each optimizer (GD, SGD, Momentum, Nesterov, Adagrad, RMSprop, Adam, AdamW, Lion, NAdam,
RAdam, Adafactor, ScheduleFreeAdamW, ScheduleFreeSGD, LAMB, and Muon for the hidden layers'
weight matrices paired with AdamW for the biases and the head):
1. pretrain a 64-64-64-5 MLP (ReLU, softmax cross-entropy, backprop by hand) on digits 0-4 and
   save a checkpoint of the model and the optimizer(s);
2. load it, replace the head, freeze the hidden layers and fine-tune the head on digits 5-9;
   then unfreeze and train all layers at a tenth of the learning rate, on a cosine schedule
   (Schedule-Free at its constant rate, its average restarted for the new task: the average
   takes the schedule's place);
3. report test accuracies and times in a table, and plot the loss curves to a PNG;
4. run the same thing with fusedopt.reference (plain NumPy) and check the curves agree: bit for
   bit, or with Muon to rounding, in float32 and again in float64 (see ROUNDING_TOLERANCE).
Schedule-Free optimizers are evaluated and checkpointed in eval mode (the parameters hold the
average x) and trained in train mode (they hold y, where gradients are taken): see set_mode.
`--sweep [NAME ...]` prints the learning-rate sweep the rates come from. The digits ship with
scikit-learn: nothing is downloaded.
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
BODY = ("W1", "b1", "W2", "b2")  # the hidden layers, kept when the head is replaced
HEAD = ("W3", "b3")


def muon_with_adamw(params, lr, adamw_lr, weight_decay):
    """Muon for the hidden layers' weight matrices (W1, W2), AdamW for the biases and the head,
    as Muon's authors recommend: two optimizers over disjoint parameters, each stepped with
    the gradients of its own (see train). Muon takes 2-D parameters only. Its rate scales an
    orthogonalized update, whose entries have an RMS of 1 / sqrt(64) here where Adam's are
    about 1: the same rate moves a weight 8 times less."""
    hidden = {n: p for n, p in params.items() if p.ndim == 2 and n not in HEAD}
    rest = {n: p for n, p in params.items() if n not in hidden}
    return [
        optim.Muon(hidden, lr=lr, weight_decay=weight_decay),
        optim.AdamW(rest, lr=adamw_lr, weight_decay=weight_decay),
    ]


# name -> (optimizer class, or a function of the parameters that returns a list of optimizers;
# its hyperparameters; full-batch gradient descent?). The rates from NAdam on are sweep()'s
# picks; it picks Adam's and AdamW's 2e-3 too.
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
    "NAdam": (optim.NAdam, dict(lr=2e-3), False),
    "RAdam": (optim.RAdam, dict(lr=1e-2), False),
    "Adafactor": (optim.Adafactor, dict(lr=1e-2), False),
    "ScheduleFreeAdamW": (optim.ScheduleFreeAdamW, dict(lr=5e-3), False),
    "ScheduleFreeSGD": (optim.ScheduleFreeSGD, dict(lr=0.5), False),
    "Muon+AdamW": (muon_with_adamw, dict(lr=5e-3, adamw_lr=2e-3, weight_decay=1e-2), False),
    "LAMB": (optim.LAMB, dict(lr=2e-3, weight_decay=1e-2), False),
}
SCHEDULE_FREE = (optim.ScheduleFreeAdamW, optim.ScheduleFreeSGD)
# Runs with these optimizers agree with the reference to rounding, not bit for bit, so their
# loss curves are compared with a tolerance (max |difference|, in nats) in float32, and again
# in float64. Muon's Newton-Schulz iteration multiplies matrices with Eigen in fusedopt and
# with NumPy's BLAS in the reference: the same products summed in another order. A float32
# step agrees to rounding, and training amplifies it: over the full run the curves differ by
# 1e-6 to 4.9e-3 (seeds 0-5), as much as the reference differs from itself with the iteration
# on the transpose; the float32 tolerance is 4 times the largest. But 1 % more learning rate
# moves the curve by 2e-2 too: float32 cannot tell small errors from rounding. In float64,
# rounding moves it by under 1e-14 (0 here, 1.3e-15 between the two orders), and a Muon
# momentum of 0.94, no Nesterov or 1 % more learning rate by 1.8e-2 or more.
ROUNDING_TOLERANCE = {optim.Muon: {"float32": 2e-2, "float64": 1e-9}}


def load_digits_tasks(seed: int = 0, dtype=DTYPE):
    """Two tasks from the digits (8x8 images, 1797 samples): 0-4 and 5-9, each split into
    80 % train and 20 % test, labels 0-4 within each task."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    x = (digits.data / 16.0).astype(dtype)
    y = digits.target
    rng = np.random.default_rng(seed)
    tasks = []
    for classes in (range(0, 5), range(5, 10)):
        index = rng.permutation(np.flatnonzero(np.isin(y, list(classes))))
        cut = int(0.8 * len(index))
        xs, ys = x[index], y[index] - classes.start
        tasks.append(((xs[:cut], ys[:cut]), (xs[cut:], ys[cut:])))
    return tasks


def init_layer(rng, n_in, n_out, dtype=DTYPE):
    """He initialisation for ReLU layers."""
    return (rng.standard_normal((n_in, n_out)) * np.sqrt(2.0 / n_in)).astype(dtype), np.zeros(
        n_out, dtype
    )


def init_mlp(seed: int, n_classes: int = 5, dtype=DTYPE):
    rng = np.random.default_rng(seed)
    params = {}
    for i, (n_in, n_out) in enumerate([(64, HIDDEN), (HIDDEN, HIDDEN), (HIDDEN, n_classes)], 1):
        params[f"W{i}"], params[f"b{i}"] = init_layer(rng, n_in, n_out, dtype)
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


def logits(params, x):
    h = np.maximum(x @ params["W1"] + params["b1"], 0)
    h = np.maximum(h @ params["W2"] + params["b2"], 0)
    return h @ params["W3"] + params["b3"]


def accuracy(params, x, y):
    return float((logits(params, x).argmax(1) == y).mean())


def as_list(item):
    return list(item) if isinstance(item, (list, tuple)) else [item]


def own(opt, names):
    """Those of ``names`` that ``opt`` optimizes."""
    return [n for n in names if n in opt.names]


def set_mode(opts, training):
    """Schedule-Free optimizers' parameters hold y, where gradients are taken, in train mode,
    and the average x, the weights to evaluate and keep, in eval mode; the others have one."""
    for opt in opts:
        if isinstance(opt, SCHEDULE_FREE):
            if training:
                opt.train()
            else:
                opt.eval()


def train(opts, params, data, epochs, full_batch, rng, losses, schedule=None, batch=64):
    """``opts``: an optimizer, or a list of optimizers over disjoint parameters (Muon and
    AdamW); ``schedule``: None, a schedule, or a list of schedules."""
    opts = as_list(opts)
    schedules_ = [] if schedule is None else as_list(schedule)
    x, y = data
    for _ in range(epochs):
        order = np.arange(len(y)) if full_batch else rng.permutation(len(y))
        size = len(y) if full_batch else batch
        for start in range(0, len(y), size):
            index = order[start : start + size]
            loss, grads = loss_and_grads(params, x[index], y[index])
            for opt in opts:  # each optimizer gets the gradients of its own parameters
                opt.step({n: grads[n] for n in opt.names})
            for s in schedules_:
                s.step()
            losses.append(loss)


def workflow(name, tasks, epochs, folder: Path, seed=0):
    """Pretrain, checkpoint, load, fine-tune; returns accuracies and the loss curve."""
    make, hyper, full_batch = OPTIMIZERS[name]
    (pre_train, pre_test), (fine_train, fine_test) = tasks
    dtype = pre_train[0].dtype
    rng = np.random.default_rng(seed)
    losses = []

    # 1. pretrain on 0-4, evaluate, checkpoint model and optimizer(s)
    params = init_mlp(seed, dtype=dtype)
    opts = as_list(make(params, **hyper))
    train(opts, params, pre_train, epochs[0], full_batch, rng, losses)
    set_mode(opts, training=False)
    pretrain_accuracy = accuracy(params, *pre_test)
    np.savez(folder / f"{name}-model.npz", **params)
    checkpoints = [
        folder / f"{name}-optimizer{'' if len(opts) == 1 else '-' + type(opt).__name__}.npz"
        for opt in opts
    ]
    for opt, path in zip(opts, checkpoints):
        opt.save(path)

    # 2. load, replace the head, fine-tune it alone on 5-9, then everything at lr / 10 (but
    # Schedule-Free)
    with np.load(folder / f"{name}-model.npz") as saved:
        params = {k: saved[k].copy() for k in saved.files}
    opts = as_list(make(params, **hyper))  # built as before, then restored from the checkpoint
    for opt, path in zip(opts, checkpoints):
        opt.load_checkpoint(path)
    params["W3"][...], params["b3"][...] = init_layer(
        np.random.default_rng(seed + 1), HIDDEN, 5, dtype
    )
    for opt in opts:
        opt.reset_state(own(opt, HEAD))
        opt.freeze(own(opt, BODY))
        if isinstance(opt, SCHEDULE_FREE):
            # Its average x weighs every step of the group alike: over the pretraining steps
            # the new head's x would stay near its random start. Restart it for the new task.
            for group in opt.param_groups:
                group.update(k=0, lr_max=0.0, weight_sum=0.0)
    set_mode(opts, training=True)
    train(opts, params, fine_train, epochs[1], full_batch, rng, losses)
    set_mode(opts, training=False)
    head_accuracy = accuracy(params, *fine_test)
    set_mode(opts, training=True)
    steps = epochs[2] * (1 if full_batch else -(-len(fine_train[1]) // 64))
    cosines = []
    for opt in opts:
        opt.unfreeze(own(opt, BODY))
        if isinstance(opt, SCHEDULE_FREE):
            continue  # a constant rate: the average x takes the place of the lower, decaying one
        for group in opt.param_groups:
            group["lr"] = group["lr"] / 10
        cosines.append(schedules.CosineAnnealingLR(opt, T_max=steps))
    train(opts, params, fine_train, epochs[2], full_batch, rng, losses, schedule=cosines)
    set_mode(opts, training=False)
    return {
        "pretrain": pretrain_accuracy,
        "head only": head_accuracy,
        "all layers": accuracy(params, *fine_test),
        "losses": np.array(losses),
        "tolerance": next(
            (ROUNDING_TOLERANCE[type(opt)] for opt in opts if type(opt) in ROUNDING_TOLERANCE),
            None,
        ),
    }


def fused_and_reference(name, tasks, epochs, folder):
    """The workflow with fusedopt, then with fusedopt.reference; and their seconds."""
    start = time.perf_counter()
    fused = workflow(name, tasks, epochs, folder)
    fused["seconds"] = time.perf_counter() - start
    start = time.perf_counter()
    with optim.reference_kernels():
        reference = workflow(name, tasks, epochs, folder)
    fused["reference seconds"] = time.perf_counter() - start
    return fused, reference


def curve_difference(losses, reference):
    """The largest |difference| between two loss curves (inf if their lengths differ)."""
    if len(losses) != len(reference):
        return np.inf
    return float(np.max(np.abs(losses - reference), initial=0.0))


def run(epochs=(30, 10, 20), folder: Path = Path("examples/output"), plot=True, names=None):
    folder.mkdir(parents=True, exist_ok=True)
    tasks = load_digits_tasks()
    results = {}
    for name in names or OPTIMIZERS:
        r, reference = fused_and_reference(name, tasks, epochs, folder)
        results[name] = r
        r["bit for bit"] = bool(np.array_equal(r["losses"], reference["losses"]))
        r["difference"] = curve_difference(r["losses"], reference["losses"])
        r["agree"] = r["bit for bit"]
        if not r["agree"] and r["tolerance"]:  # to rounding: in float32, and again in float64
            fused64, reference64 = fused_and_reference(
                name, load_digits_tasks(dtype=np.float64), epochs, folder
            )
            r["float64 difference"] = curve_difference(fused64["losses"], reference64["losses"])
            r["agree"] = (
                r["difference"] <= r["tolerance"]["float32"]
                and r["float64 difference"] <= r["tolerance"]["float64"]
            )
    if plot:
        plot_losses(results, folder / "finetune_digits.png", epochs)
    return results


def plot_losses(results, path, epochs):
    """The loss curves in two panels: the optimizers up to Lion, and the newer ones (each
    OPTIMIZERS entry after Lion lands there) with Adam dashed for comparison."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    classic = list(OPTIMIZERS)[: list(OPTIMIZERS).index("Lion") + 1]
    panels = [
        (title, [n for n in results if (n in classic) == first])
        for title, first in (("GD to Lion", True), ("newer optimizers (Adam dashed)", False))
    ]
    panels = [(title, names) for title, names in panels if names]
    fig, axes = plt.subplots(
        1, len(panels), figsize=(7 * len(panels), 5), sharey=True, squeeze=False
    )
    total = sum(epochs)
    for ax, (title, names) in zip(axes[0], panels):
        colors = plt.cm.tab10.colors
        extra = ["Adam"] if "Adam" in results and "Adam" not in names else []
        for i, name in enumerate(names + extra):
            losses = results[name]["losses"]
            smooth = (
                np.convolve(losses, np.ones(5) / 5, mode="valid") if len(losses) > 50 else losses
            )
            style = dict(color="black", ls="--", alpha=0.6) if name in extra else {}
            style.setdefault("color", colors[i % len(colors)])
            ax.plot(np.linspace(0, 1, len(smooth)), smooth, label=name, lw=1.1, **style)
        for edge in (epochs[0] / total, (epochs[0] + epochs[1]) / total):
            ax.axvline(edge, color="grey", lw=0.8, ls=":")
        ax.set_yscale("log")
        ax.set_xlabel("training progress: pretrain 0-4  |  head on 5-9  |  all layers on 5-9")
        ax.set_title(title)
        ax.legend(ncol=2, fontsize=8, loc="lower left")
    axes[0][0].set_ylabel("training loss (moving average of 5 steps)")
    fig.suptitle("fusedopt: a NumPy MLP on scikit-learn digits, pretrain then fine-tune")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def sweep(names, seeds=(0, 1, 2), epochs=30, target=0.01):
    """The learning-rate sweep behind OPTIMIZERS, on the pretraining task: train on 80 % of
    digits 0-4's training split with each rate on a 1-2-5 grid (x 1/10 to x 10 of the rate in
    OPTIMIZERS), validate on the other 20 %, and pick the smallest rate whose validation loss,
    the mean over ``seeds``, is below ``target``: the gentlest that learns the task in the
    budget (larger ones only fit this easy task harder). Returns a Markdown table."""
    (x, y), _ = load_digits_tasks()[0]
    cut = int(0.8 * len(y))
    (x, y), (xv, yv) = (x[:cut], y[:cut]), (x[cut:], y[cut:])
    lines = [
        f"Pretraining on {cut} images of digits 0-4, {epochs} epochs, validated on the other "
        f"{len(yv)}; mean of seeds {list(seeds)}. Picked: the smallest rate with validation "
        f"loss < {target}.",
        "",
        "| optimizer | lr | validation loss | validation acc | picked |",
        "|---|---|---|---|---|",
    ]
    for name in names:
        make, hyper, full_batch = OPTIMIZERS[name]
        grid = [m * 10.0**e for e in range(-6, 2) for m in (1, 2, 5)]
        grid = [lr for lr in grid if 0.1 - 1e-9 <= lr / hyper["lr"] <= 10 + 1e-9]
        picked = False
        for lr in grid:
            scores = []
            for seed in seeds:
                params = init_mlp(seed)
                opts = as_list(make(params, **dict(hyper, lr=lr)))
                with np.errstate(all="ignore"):  # a rate too large diverges: it scores badly
                    train(opts, params, (x, y), epochs, full_batch, np.random.default_rng(seed), [])
                set_mode(opts, training=False)
                z = logits(params, xv).astype(np.float64)
                z -= z.max(1, keepdims=True)
                log_p = z - np.log(np.exp(z).sum(1, keepdims=True))
                scores.append((-log_p[np.arange(len(yv)), yv].mean(), (z.argmax(1) == yv).mean()))
            loss, acc = np.mean(scores, axis=0)
            pick = not picked and loss < target
            picked |= pick
            lines.append(f"| {name} | {lr:g} | {loss:.4f} | {acc:.3f} | {'yes' if pick else ''} |")
    return "\n".join(lines)


def agreement(r):
    if r["bit for bit"]:
        return "yes, bit for bit"
    if "float64 difference" not in r:
        return f"NO, by {r['difference']:.1e}"
    tolerance = r["tolerance"]
    return (
        f"{'yes' if r['agree'] else 'NO'}, to rounding: {r['difference']:.1e} "
        f"(tolerance {tolerance['float32']:.0e}), in float64 "
        f"{r['float64 difference']:.1e} ({tolerance['float64']:.0e})"
    )


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
            f"{r['reference seconds']:.2f} | {agreement(r)} |"
        )
    return "\n".join(lines)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "output")
    parser.add_argument(
        "--sweep", nargs="*", metavar="NAME", help="print the learning-rate sweep (see sweep)"
    )
    args = parser.parse_args()
    if args.sweep is not None:
        print(sweep(args.sweep or list(OPTIMIZERS)))
        return
    start = time.perf_counter()
    results = run(folder=args.out)
    text = (
        f"{table(results)}\n\n{time.perf_counter() - start:.1f} s in all, "
        f"fusedopt {fusedopt.__version__}"
    )
    (args.out / "finetune_digits.md").write_text(text + "\n")
    print(f"{text}\ntable and loss curves: {args.out / 'finetune_digits.md'}, .png")
    if not all(r["agree"] for r in results.values()):
        raise SystemExit("fusedopt and fusedopt.reference disagree")


if __name__ == "__main__":
    main()
