"""Hyperparameter search for the fine-tuning of examples/finetune_digits.py, with Optuna.

    pip install ".[tune]"
    python examples/tune_finetune.py [--quick] [--storage sqlite:///tune.db] [--out DIR]

The model is finetune_digits.py's: a 64-64-64-5 MLP pretrained on digits 0-4 (Adam, once,
shared by every trial), whose head is replaced and fine-tuned on digits 5-9 from 25 labelled
images per digit (with all 537, most configurations score 98 % and a search has little to
find). A trial samples

- the optimizer: every element-wise class of fusedopt.optim but LAMB (SGD, Momentum, Adam,
  AdamW, Adamax, NAdam, RAdam, Adagrad, RMSprop, Lion, ScheduleFreeAdamW, ScheduleFreeSGD);
- its learning rate, log-uniform in [1e-4, 1];
- its momentum or betas (beta1 in [0.5, 0.99], beta2 in {0.99, 0.999, 0.9999}; SGD's and
  RMSprop's momentum in [0, 0.99], Momentum's beta in [0.5, 0.99]) and a log-uniform weight
  decay in [1e-6, 0.1];
- whether to freeze the pretrained body (train the head alone) or fine-tune all layers;

builds the optimizer from that flat dict with fusedopt.optim.from_config, fine-tunes for 15
epochs on a cosine schedule and returns the validation accuracy. Three samplers get the same
budget of trials, each from 5 sampler seeds: as many as GridSampler's grid has points
(optimizer x learning rate in {3e-4, 3e-3, 3e-2, 3e-1} x freeze: 12 x 4 x 2 = 96, the other
hyperparameters at the classes' defaults: a grid over all of them would need thousands of
trials), RandomSampler and TPESampler. MedianPruner,
fed each epoch's validation accuracy, stops trials that trail the median of earlier trials at
the same epoch; every study is run again without pruning to measure what it saved. The best
configuration of each sampler is trained again (it must reproduce its validation accuracy bit
for bit) and evaluated on the held-out test split with sklearn.metrics. Last, the same study
runs with fusedopt's kernels and inside optim.reference_kernels() (plain NumPy, bit-identical
results) to measure trials per minute.

Everything is seeded: the data split, the pretraining, the new head's initialisation and the
batch order are the same in every trial (data seed 0), so a trial's result is a function of its
configuration; the sampler seeds fix the searches. Everything runs on one thread (fusedopt and
NumPy's BLAS): run one process per core to search in parallel.

--storage keeps the studies in a database (sqlite:///tune.db) instead of memory: a run that is
interrupted, or stopped with --stop-after, continues where it stopped when run again, and
several processes given the same storage and distinct --worker numbers share the trials of
each study (then the order of the trials, and so TPE's choices, depend on timing). Writes to
--out (default bench/results): tune_finetune.md (tables), tune_finetune.png (optimization
history per sampler), tune_finetune_importances.png and tune_finetune_losses.png. The digits
ship with scikit-learn: nothing is downloaded.
"""

from __future__ import annotations

import argparse
import importlib.util
import inspect
import time
import warnings
from pathlib import Path
from typing import Any, Callable, NamedTuple, Optional, Sequence

import numpy as np

import fusedopt
from fusedopt import optim, schedules


def _sibling(name: str):
    """finetune_digits.py, next to this file (examples/ is not a package)."""
    spec = importlib.util.spec_from_file_location(name, Path(__file__).with_name(f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


finetune = _sibling("finetune_digits")

# LAMB is left out until this search is measured again with it: one more category changes every
# seeded sampler's draws, and the quick test's bounds (tests/test_tune_example.py) were measured
# on the others (with it, seed 0's random search drew no LAMB trial and its best fell to 0.900).
OPTIMIZERS = tuple(
    name
    for name in optim.__all__
    if isinstance(getattr(optim, name), type) and getattr(optim, name).kernel and name != "LAMB"
)
BODY = ("W1", "b1", "W2", "b2")
SAMPLERS = ("grid", "random", "tpe")
DATA_SEED = 0
PER_CLASS = 25  # labelled images per digit to fine-tune on: with all 537, most trials score 98 %
BATCH = 25
LR = (1e-4, 1.0)  # log-uniform
GRID_LR = (3e-4, 3e-3, 3e-2, 3e-1)
PRETRAIN_EPOCHS = 30


class Budget(NamedTuple):
    """How much a run searches: trials per study, sampler seeds, fine-tuning epochs per trial,
    and the trials and repeats of the fused-vs-reference timing."""

    trials: int
    seeds: tuple[int, ...]
    epochs: int
    speed_trials: int
    speed_repeats: int


GRID_POINTS = len(OPTIMIZERS) * len(GRID_LR) * 2  # x freeze: GridSampler's whole grid
FULL = Budget(
    trials=GRID_POINTS, seeds=(0, 1, 2, 3, 4), epochs=15, speed_trials=80, speed_repeats=5
)
QUICK = Budget(trials=16, seeds=(0,), epochs=15, speed_trials=8, speed_repeats=1)


class Data(NamedTuple):
    """Digits 0-4 to pretrain on; digits 5-9 (labels 0-4): a few labelled images per digit to
    fine-tune on, the rest of finetune_digits.py's training split for validation (the
    objective), and its test split, held out for the final evaluation."""

    pretrain: tuple[np.ndarray, np.ndarray]
    train: tuple[np.ndarray, np.ndarray]
    val: tuple[np.ndarray, np.ndarray]
    test: tuple[np.ndarray, np.ndarray]


def prepare(per_class: int = PER_CLASS) -> tuple[Data, dict[str, np.ndarray]]:
    """The data splits and the pretrained body (finetune_digits.py's Adam, lr 2e-3)."""
    (pre_train, _), (fine_train, fine_test) = finetune.load_digits_tasks(DATA_SEED)
    x, y = fine_train  # already shuffled: the first images of each digit are the train split
    train = np.concatenate([np.flatnonzero(y == digit)[:per_class] for digit in range(5)])
    val = np.setdiff1d(np.arange(len(y)), train)
    train = np.random.default_rng(DATA_SEED).permutation(train)
    data = Data(pre_train, (x[train], y[train]), (x[val], y[val]), fine_test)
    params = finetune.init_mlp(DATA_SEED)
    opt = optim.Adam(params, lr=2e-3)
    rng = np.random.default_rng(DATA_SEED)
    finetune.train(opt, params, data.pretrain, PRETRAIN_EPOCHS, False, rng, [])
    return data, {k: params[k] for k in BODY}


def takes(name: str, argument: str) -> bool:
    return argument in inspect.signature(getattr(optim, name)).parameters


def sample(trial, grid: bool = False) -> dict[str, Any]:
    """One configuration, define-by-run: the hyperparameters a class takes are sampled under
    its argument names, so ``trial.params`` minus optimizer and freeze_body goes to
    optim.from_config as it is. ``grid``: only what GridSampler's grid holds."""
    config = {
        "optimizer": trial.suggest_categorical("optimizer", OPTIMIZERS),
        "lr": trial.suggest_float("lr", *LR, log=True),
        "freeze_body": trial.suggest_categorical("freeze_body", (False, True)),
    }
    if grid:
        return config
    name = config["optimizer"]
    config["weight_decay"] = trial.suggest_float("weight_decay", 1e-6, 0.1, log=True)
    if takes(name, "betas"):
        config["beta1"] = trial.suggest_float("beta1", 0.5, 0.99)
        config["beta2"] = trial.suggest_categorical("beta2", (0.99, 0.999, 0.9999))
    elif takes(name, "momentum"):  # SGD, RMSprop
        config["momentum"] = trial.suggest_float("momentum", 0.0, 0.99)
    elif takes(name, "beta"):  # Momentum
        config["beta"] = trial.suggest_float("beta", 0.5, 0.99)
    return config


def grid_space() -> dict[str, Sequence[Any]]:
    return {"optimizer": OPTIMIZERS, "lr": GRID_LR, "freeze_body": (False, True)}


class Run(NamedTuple):
    """One fine-tuning: the model, per-epoch mean training loss, validation loss and
    validation accuracy, and whether the loss became non-finite."""

    params: dict[str, np.ndarray]
    train_loss: list[float]
    val_loss: list[float]
    val_accuracy: list[float]
    diverged: bool


def logits(params: dict[str, np.ndarray], x: np.ndarray) -> np.ndarray:
    h = np.maximum(x @ params["W1"] + params["b1"], 0)
    h = np.maximum(h @ params["W2"] + params["b2"], 0)
    return h @ params["W3"] + params["b3"]


def probabilities(params: dict[str, np.ndarray], x: np.ndarray) -> np.ndarray:
    z = logits(params, x).astype(np.float64)
    z -= z.max(axis=1, keepdims=True)
    p = np.exp(z)
    return p / p.sum(axis=1, keepdims=True)


def fine_tune(
    config: dict[str, Any],
    data: Data,
    body: dict[str, np.ndarray],
    epochs: int,
    trial=None,
) -> Run:
    """Fine-tune a copy of ``body`` with a new head under ``config``; after each epoch report
    the validation accuracy to ``trial`` and stop if its pruner says so (optuna.TrialPruned)."""
    import optuna

    params = {k: v.copy() for k, v in body.items()}
    params["W3"], params["b3"] = finetune.init_layer(
        np.random.default_rng(DATA_SEED + 1), finetune.HIDDEN, 5
    )
    hyper = {k: v for k, v in config.items() if k not in ("optimizer", "freeze_body")}
    opt = optim.from_config(config["optimizer"], params, **hyper)
    if config["freeze_body"]:
        opt.freeze(BODY)
    steps = epochs * -(-len(data.train[1]) // BATCH)
    cosine = schedules.CosineAnnealingLR(opt, T_max=steps)
    rng = np.random.default_rng(DATA_SEED + 2)  # the same batches in every trial
    run = Run(params, [], [], [], False)
    with np.errstate(all="ignore"):  # a diverging trial overflows: it ends, it is not an error
        for epoch in range(epochs):
            losses: list[float] = []
            finetune.train(opt, params, data.train, 1, False, rng, losses, cosine, BATCH)
            x, y = data.val
            p = probabilities(params, x)
            run.train_loss.append(float(np.mean(losses)))
            run.val_loss.append(float(-np.log(p[np.arange(len(y)), y] + 1e-12).mean()))
            run.val_accuracy.append(float((p.argmax(1) == y).mean()))
            if not np.isfinite(run.train_loss[-1]):
                return run._replace(diverged=True)
            if trial is not None:
                trial.report(run.val_accuracy[-1], epoch)
                if trial.should_prune():
                    raise optuna.TrialPruned()
    return run


def objective(
    data: Data, body: dict[str, np.ndarray], epochs: int, grid: bool
) -> Callable[[Any], float]:
    """The function Optuna calls with each trial: the last epoch's validation accuracy."""

    def run_trial(trial) -> float:
        run = fine_tune(sample(trial, grid), data, body, epochs, trial)
        trial.set_user_attr("diverged", run.diverged)
        return run.val_accuracy[-1]

    return run_trial


def make_sampler(name: str, seed: int):
    import optuna

    if name == "grid":
        return optuna.samplers.GridSampler(grid_space(), seed=seed)
    if name == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    if name == "tpe":
        return optuna.samplers.TPESampler(seed=seed)
    raise ValueError(f"unknown sampler {name!r}: expected one of {SAMPLERS}")


def run_study(
    sampler: str,
    seed: int,
    data: Data,
    body: dict[str, np.ndarray],
    budget: Budget,
    pruning: bool = True,
    storage: Optional[str] = None,
    stop_after: Optional[int] = None,
    worker: int = 0,
):
    """Run (or continue) one study until it holds ``budget.trials`` finished trials, or for at
    most ``stop_after`` new trials. With a ``storage`` URL the study is loaded if it exists.

    A continued sampler is seeded from (seed, trials already in the study, worker): resumed
    with the seed it started with, RandomSampler would draw its first configurations again.
    TPESampler learns from every stored trial, GridSampler skips the grid points already run.
    """
    import optuna
    from optuna.study import MaxTrialsCallback
    from optuna.trial import TrialState

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    pruner = (
        optuna.pruners.MedianPruner(n_startup_trials=5, n_warmup_steps=2)
        if pruning
        else optuna.pruners.NopPruner()
    )
    study = optuna.create_study(
        study_name=f"tune_finetune-{sampler}-seed{seed}-{'pruned' if pruning else 'full'}",
        storage=storage,
        direction="maximize",
        pruner=pruner,
        load_if_exists=True,
    )
    started = len(study.trials)
    sampler_seed = int(np.random.SeedSequence([seed, started, worker]).generate_state(1)[0])
    study.sampler = make_sampler(sampler, sampler_seed if started or worker else seed)
    finished = (TrialState.COMPLETE, TrialState.PRUNED)
    remaining = budget.trials - len(study.get_trials(deepcopy=False, states=finished))
    if stop_after is not None:
        remaining = min(remaining, stop_after)
    if remaining > 0:
        cpu = time.process_time()
        study.optimize(
            objective(data, body, budget.epochs, grid=sampler == "grid"),
            n_trials=remaining,
            callbacks=[MaxTrialsCallback(budget.trials, states=finished)],
        )
        # CPU time, not wall time: on a shared machine other processes' load skews the latter
        cpu += study.user_attrs.get("cpu seconds", 0.0) - time.process_time()
        study.set_user_attr("cpu seconds", -cpu)
    return study


def best_so_far(study, trials: int) -> np.ndarray:
    """The best validation accuracy after each of the first ``trials`` trials (NaN until one
    completes; after a grid smaller than the budget, its final best)."""
    from optuna.trial import TrialState

    best, out = -np.inf, []
    for t in sorted(study.trials, key=lambda t: t.number)[:trials]:
        if t.state == TrialState.COMPLETE:
            best = max(best, t.value)
        out.append(best if np.isfinite(best) else np.nan)
    return np.array(out + out[-1:] * (trials - len(out)))


def summarize(studies: list, budget: Budget) -> dict[str, Any]:
    from optuna.trial import TrialState

    trials = [t for s in studies for t in s.trials]
    return {
        "best": [s.best_value for s in studies],
        "curves": np.array([best_so_far(s, budget.trials) for s in studies]),
        "pruned": sum(t.state == TrialState.PRUNED for t in trials),
        "trials": len(trials),
        "epochs": sum(len(t.intermediate_values) for t in trials),
        "diverged": sum(bool(t.user_attrs.get("diverged")) for t in trials),
        "seconds": sum(s.user_attrs.get("cpu seconds", 0.0) for s in studies),
    }


def evaluate(params: dict[str, np.ndarray], test: tuple[np.ndarray, np.ndarray]) -> dict:
    """sklearn.metrics on the held-out split: accuracy, macro precision/recall/F1,
    one-vs-rest ROC-AUC of the softmax probabilities, and the confusion matrix."""
    from sklearn import metrics

    x, y = test
    p = probabilities(params, x)
    predicted = p.argmax(1)
    precision, recall, f1, _ = metrics.precision_recall_fscore_support(
        y, predicted, average="macro", zero_division=0
    )
    return {
        "accuracy": metrics.accuracy_score(y, predicted),
        "precision": precision,
        "recall": recall,
        "f1": f1,
        "roc_auc": metrics.roc_auc_score(y, p, multi_class="ovr"),
        "confusion": metrics.confusion_matrix(y, predicted, labels=range(5)),
    }


def speed(data: Data, body: dict[str, np.ndarray], budget: Budget) -> dict[str, Any]:
    """Trials per minute of the same study (RandomSampler, no pruning, in memory) with the
    fused kernels and with optim.reference_kernels(), alternated ``speed_repeats`` times
    (medians), from the process's CPU time and from the wall clock; the two must find the same
    values, as their arithmetic is the same."""
    timing = budget._replace(trials=budget.speed_trials)
    rates: dict[str, dict[str, list[float]]] = {
        kernels: {"cpu": [], "wall": []} for kernels in ("fused", "reference")
    }
    values = {}
    for _ in range(budget.speed_repeats):
        for kernels, rate in rates.items():
            cpu, wall = time.process_time(), time.perf_counter()
            if kernels == "fused":
                study = run_study("random", 0, data, body, timing, pruning=False)
            else:
                with optim.reference_kernels():
                    study = run_study("random", 0, data, body, timing, pruning=False)
            rate["cpu"].append(len(study.trials) / (time.process_time() - cpu) * 60)
            rate["wall"].append(len(study.trials) / (time.perf_counter() - wall) * 60)
            values[kernels] = [t.value for t in study.trials]
    out: dict[str, Any] = {
        (kernels, clock): float(np.median(v))
        for kernels, rate in rates.items()
        for clock, v in rate.items()
    }
    out["same values"] = values["fused"] == values["reference"]
    out["trials"] = budget.speed_trials
    out["repeats"] = budget.speed_repeats
    return out


def run(
    quick: bool = False,
    out: Path = Path("bench/results"),
    budget: Optional[Budget] = None,
    storage: Optional[str] = None,
    stop_after: Optional[int] = None,
    worker: int = 0,
    plots: bool = True,
) -> dict[str, Any]:
    """Every sampler and seed, with and without pruning; the best configurations evaluated on
    the test split; the fused-vs-reference timing; tables and plots written to ``out``.

    Returns {"samplers": {name: {"pruned": summary, "full": summary, "studies": the pruned
    studies, "full studies": the others, "best": ...}}, "speed": ..., "table": Markdown,
    "seconds": wall time}. With ``stop_after``, a run that leaves a study short of its budget
    returns only {"samplers": {name: {"pruned": studies, "full": studies}}} and writes
    nothing.
    """
    import optuna
    from threadpoolctl import threadpool_limits

    budget = budget or (QUICK if quick else FULL)
    start = time.perf_counter()
    fusedopt.set_num_threads(1)
    results: dict[str, Any] = {"budget": budget, "quick": quick, "samplers": {}}
    with threadpool_limits(1):
        data, body = prepare()
        for sampler in SAMPLERS:
            r: dict[str, Any] = {"pruned": [], "full": []}
            for seed in budget.seeds:
                for pruning in (True, False):
                    r["pruned" if pruning else "full"].append(
                        run_study(
                            sampler, seed, data, body, budget, pruning, storage, stop_after, worker
                        )
                    )
            results["samplers"][sampler] = r
        if stop_after is not None and not complete(results, budget):
            return results  # run again to continue
        for sampler, r in results["samplers"].items():
            r["studies"], r["full studies"] = r["pruned"], r["full"]
            r["pruned"], r["full"] = summarize(r["pruned"], budget), summarize(r["full"], budget)
            best = max((s.best_trial for s in r["studies"]), key=lambda t: t.value)
            config = sample(optuna.trial.FixedTrial(best.params), sampler == "grid")
            again = fine_tune(config, data, body, budget.epochs)
            r["best"] = {
                "config": config,
                "value": best.value,
                "reproduced": again.val_accuracy[-1] == best.value,
                "run": again,
                "test": evaluate(again.params, data.test),
            }
        results["speed"] = speed(data, body, budget)
    results["seconds"] = time.perf_counter() - start
    results["table"] = table(results)
    out.mkdir(parents=True, exist_ok=True)
    (out / "tune_finetune.md").write_text(results["table"] + "\n")
    if plots:
        plot_history(results, out / "tune_finetune.png")
        plot_importances(results, out / "tune_finetune_importances.png")
        plot_losses(results, out / "tune_finetune_losses.png")
    return results


def complete(results: dict[str, Any], budget: Budget) -> bool:
    """Whether every study holds its budget of finished trials (or its whole grid)."""
    from optuna.trial import TrialState

    finished = (TrialState.COMPLETE, TrialState.PRUNED)
    grid = int(np.prod([len(v) for v in grid_space().values()]))
    return all(
        len(s.get_trials(deepcopy=False, states=finished))
        >= (min(budget.trials, grid) if name == "grid" else budget.trials)
        for name, r in results["samplers"].items()
        for kind in ("pruned", "full")
        for s in r[kind]
    )


def describe(config: dict[str, Any]) -> str:
    """A configuration in a few words: 'Adam lr 3.1e-03 betas (0.91, 0.999) wd 2e-05, body
    frozen'."""
    parts = [config["optimizer"], f"lr {config['lr']:.2g}"]
    if "beta1" in config:
        parts.append(f"betas ({config['beta1']:.2f}, {config['beta2']})")
    for key in ("momentum", "beta"):
        if key in config:
            parts.append(f"{key} {config[key]:.2f}")
    if "weight_decay" in config:
        parts.append(f"wd {config['weight_decay']:.1e}")
    return " ".join(parts) + (", body frozen" if config["freeze_body"] else ", all layers")


def table(results: dict[str, Any]) -> str:
    """The results as Markdown."""
    budget = results["budget"]
    samplers = results["samplers"]
    marks = [n for n in (10, 20, 40) if n < budget.trials] + [budget.trials]
    lines = [
        f"fusedopt {fusedopt.__version__}; {budget.trials} trials per study, sampler seeds "
        f"{list(budget.seeds)}, {budget.epochs} fine-tuning epochs per trial, 1 thread"
        + (" (--quick)" if results["quick"] else ""),
        "",
        "Best validation accuracy (digits 5-9) after n trials, MedianPruner on, mean over the "
        "seeds (min-max):",
        "",
        "| sampler | " + " | ".join(f"n = {n}" for n in marks) + " | best configuration |",
        "|---|" + "---|" * len(marks) + "---|",
    ]
    for name, r in samplers.items():
        curves = r["pruned"]["curves"]
        cells = [
            f"{np.nanmean(curves[:, n - 1]):.3f} ({np.nanmin(curves[:, n - 1]):.3f}-"
            f"{np.nanmax(curves[:, n - 1]):.3f})"
            for n in marks
        ]
        lines.append(f"| {name} | " + " | ".join(cells) + f" | {describe(r['best']['config'])} |")
    lines += [
        "",
        "Pruning (all seeds): trials stopped, epochs trained, CPU seconds of the studies, and "
        "the best accuracy found, with MedianPruner and without (no pruner):",
        "",
        "| sampler | pruned trials | epochs with / without | CPU s with / without | saved | "
        "best with / without |",
        "|---|---|---|---|---|---|",
    ]
    for name, r in samplers.items():
        p, f = r["pruned"], r["full"]
        lines.append(
            f"| {name} | {p['pruned']} of {p['trials']} | {p['epochs']} / {f['epochs']} | "
            f"{p['seconds']:.2f} / {f['seconds']:.2f} | {1 - p['seconds'] / f['seconds']:.0%} | "
            f"{max(p['best']):.3f} / {max(f['best']):.3f} |"
        )
    diverged = sum(r[kind]["diverged"] for r in samplers.values() for kind in ("pruned", "full"))
    lines += ["", f"Trials whose loss became NaN or infinite (ended early): {diverged}."]
    lines += [
        "",
        "Each sampler's best configuration, trained again (same validation accuracy: "
        + ("yes" if all(r["best"]["reproduced"] for r in samplers.values()) else "NO")
        + ") and evaluated on the held-out test split (sklearn.metrics; macro averages, "
        "ROC-AUC one-vs-rest):",
        "",
        "| sampler | validation acc. | test acc. | precision | recall | F1 | ROC-AUC |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, r in samplers.items():
        t = r["best"]["test"]
        lines.append(
            f"| {name} | {r['best']['value']:.3f} | {t['accuracy']:.3f} | {t['precision']:.3f} | "
            f"{t['recall']:.3f} | {t['f1']:.3f} | {t['roc_auc']:.4f} |"
        )
    top = max(samplers, key=lambda n: samplers[n]["best"]["value"])
    confusion = samplers[top]["best"]["test"]["confusion"]
    lines += [
        "",
        f"Confusion matrix on the test split of the best configuration ({top}: "
        f"{describe(samplers[top]['best']['config'])}); rows: true digit, columns: predicted:",
        "",
        "| | " + " | ".join(str(d) for d in range(5, 10)) + " |",
        "|---|" + "---|" * 5,
        *(
            f"| {d} | " + " | ".join(map(str, row)) + " |"
            for d, row in zip(range(5, 10), confusion)
        ),
    ]
    s = results["speed"]
    lines += [
        "",
        f"Trials per minute of one study (RandomSampler, {s['trials']} trials, no pruning; "
        f"median of {s['repeats']}), by the process's CPU time (one thread: a core's rate) and "
        "by the wall clock of a shared machine; the same trials and values with both kernels: "
        + ("yes" if s["same values"] else "NO"),
        "",
        "| kernels | trials / CPU minute | trials / minute (wall) | CPU s / trial |",
        "|---|---|---|---|",
    ]
    for kernels, label in (("fused", "fusedopt"), ("reference", "optim.reference_kernels()")):
        lines.append(
            f"| {label} | {s[kernels, 'cpu']:.0f} | {s[kernels, 'wall']:.0f} | "
            f"{60 / s[kernels, 'cpu']:.4f} |"
        )
    lines += [
        "",
        f"fusedopt: {s['fused', 'cpu'] / s['reference', 'cpu']:.2f}x the trials per CPU minute "
        f"({s['fused', 'wall'] / s['reference', 'wall']:.2f}x by the wall clock). "
        f"{results['seconds']:.0f} s in all.",
    ]
    return "\n".join(lines)


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_history(results: dict[str, Any], path: Path) -> None:
    """One panel per sampler: every trial's validation accuracy (x: pruned, at its last
    reported epoch) and the best so far, per seed and their mean; a last panel compares the
    means, zoomed in."""
    from optuna.trial import TrialState

    plt = _pyplot()
    samplers = results["samplers"]
    fig, axes = plt.subplots(1, len(samplers) + 1, figsize=(4.5 * (len(samplers) + 1), 4.2))
    for i, (ax, (name, r)) in enumerate(zip(axes, samplers.items())):
        for study in r["studies"]:
            done = [t for t in study.trials if t.state == TrialState.COMPLETE]
            pruned = [t for t in study.trials if t.state == TrialState.PRUNED]
            ax.plot([t.number for t in done], [t.value for t in done], ".", color="C0", alpha=0.3)
            ax.plot(
                [t.number for t in pruned],
                [t.intermediate_values[t.last_step] for t in pruned],
                "x",
                color="C3",
                alpha=0.4,
                ms=4,
            )
        curves = r["pruned"]["curves"]
        for curve in curves:
            ax.plot(curve, color=f"C{i + 1}", lw=0.8, alpha=0.5)
        mean = np.nanmean(curves, axis=0)
        ax.plot(mean, color=f"C{i + 1}", lw=2, label="best so far (mean over seeds)")
        axes[-1].plot(np.arange(1, len(mean) + 1), mean, color=f"C{i + 1}", lw=2, label=name)
        ax.set_title(f"{name}: best {max(r['pruned']['best']):.3f}")
        ax.set_xlabel("trial")
        ax.set_ylim(0.0, 1.0)
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("validation accuracy (digits 5-9)")
    axes[0].plot([], [], ".", color="C0", label="completed trial")
    axes[0].plot([], [], "x", color="C3", label="pruned (last epoch reported)")
    axes[0].legend(loc="lower right", fontsize=8)
    axes[-1].set_title("best so far, mean over seeds")
    axes[-1].set_xlabel("trials")
    axes[-1].set_ylim(0.9, 1.0)
    axes[-1].grid(alpha=0.3)
    axes[-1].legend(loc="lower right")
    budget = results["budget"]
    fig.suptitle(
        f"Optuna over fusedopt.optim, fine-tuning on digits 5-9: {budget.trials} trials per "
        f"study, {len(budget.seeds)} sampler seed(s), MedianPruner"
    )
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def plot_importances(results: dict[str, Any], path: Path) -> None:
    """Optuna's fANOVA importances over the random search without pruning (all seeds): its
    trials cover the space evenly and all complete, where TPE's cluster and pruning leaves
    only the good ones complete."""
    import optuna

    plt = _pyplot()
    pooled = optuna.create_study(direction="maximize")
    pooled.add_trials([t for s in results["samplers"]["random"]["full studies"] for t in s.trials])
    with warnings.catch_warnings(), plt.rc_context():  # Optuna sets its own style
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        ax = optuna.visualization.matplotlib.plot_param_importances(
            pooled, evaluator=optuna.importance.FanovaImportanceEvaluator(seed=0)
        )
        ax.set_title(f"fANOVA importances, {len(pooled.trials)} random-search trials", loc="left")
        ax.figure.set_size_inches(7, 4)
        ax.figure.tight_layout()
        ax.figure.savefig(path, dpi=100)
        plt.close(ax.figure)


def plot_losses(results: dict[str, Any], path: Path) -> None:
    """Training and validation loss per epoch of each sampler's best configuration."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7.5, 4.5))
    for i, (name, r) in enumerate(results["samplers"].items()):
        run_ = r["best"]["run"]
        epochs = np.arange(1, len(run_.train_loss) + 1)
        label = f"{name}: {describe(r['best']['config'])}"
        ax.plot(epochs, run_.train_loss, "-", color=f"C{i + 1}", label=label)
        ax.plot(epochs, run_.val_loss, "--", color=f"C{i + 1}")
    ax.set_yscale("log")
    ax.set_xlabel("fine-tuning epoch (digits 5-9)")
    ax.set_ylabel("cross-entropy: train (solid), validation (dashed)")
    ax.set_title("The best configuration of each sampler")
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3, which="both")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="the reduced run of the tests")
    parser.add_argument(
        "--trials", type=int, help=f"trials per study (default {GRID_POINTS}, --quick 16)"
    )
    parser.add_argument("--storage", help="an Optuna storage URL, e.g. sqlite:///tune.db")
    parser.add_argument("--stop-after", type=int, help="at most this many new trials per study")
    parser.add_argument("--worker", type=int, default=0, help="this process's number (seeds)")
    parser.add_argument(
        "--out", type=Path, default=Path(__file__).resolve().parent.parent / "bench" / "results"
    )
    args = parser.parse_args()
    budget = QUICK if args.quick else FULL
    if args.trials:
        budget = budget._replace(trials=args.trials)
    results = run(args.quick, args.out, budget, args.storage, args.stop_after, args.worker)
    if "table" not in results:
        print(f"stopped after {args.stop_after} new trials per study: run again to continue")
        return
    print(results["table"])
    print(f"\nwritten to {args.out}: tune_finetune.md, tune_finetune*.png")


if __name__ == "__main__":
    main()
