"""examples/tune_finetune.py, --quick: Optuna's grid, random and TPE search over the optimizer
classes, MedianPruner, the sklearn.metrics evaluation, and resuming a study kept in sqlite."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pytest

optuna = pytest.importorskip("optuna", reason="optuna not installed: the example is not run")
pytest.importorskip("sklearn", reason="scikit-learn not installed: the example is not run")
pytest.importorskip("matplotlib", reason="matplotlib not installed: the example is not run")
pytest.importorskip("threadpoolctl", reason="threadpoolctl not installed: the example is not run")

EXAMPLE = Path(__file__).parent.parent / "examples" / "tune_finetune.py"


@pytest.fixture(scope="module")
def example():
    spec = importlib.util.spec_from_file_location("tune_finetune", EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def prepared(example):
    return example.prepare()


@pytest.fixture(scope="module")
def results(example, tmp_path_factory):
    out = tmp_path_factory.mktemp("tune_finetune")
    return example.run(quick=True, out=out), out


def test_every_sampler_finds_a_good_configuration(results):
    # Measured with --quick (16 trials, sampler seed 0), grid / random / TPE: validation
    # accuracy 0.953 / 0.954 / 0.946, test accuracy 0.978 / 0.972 / 0.972, ROC-AUC 0.9954 /
    # 0.9961 / 0.9969. The bounds leave room for BLAS rounding on other machines.
    for name, r in results[0]["samplers"].items():
        assert max(r["pruned"]["best"]) >= 0.92, (name, r["pruned"]["best"])
        assert r["best"]["reproduced"], name  # retrained: the same accuracy, bit for bit
        assert r["best"]["test"]["accuracy"] >= 0.93, (name, r["best"]["test"])
        assert r["best"]["test"]["roc_auc"] >= 0.98, (name, r["best"]["test"])


def test_pruning_stops_trials_and_saves_epochs(results):
    samplers = results[0]["samplers"]  # measured: 11, 6 and 4 of 16 trials pruned
    assert sum(r["pruned"]["pruned"] for r in samplers.values()) >= 1
    for name, r in samplers.items():
        assert r["full"]["pruned"] == 0, name
        assert r["pruned"]["epochs"] <= r["full"]["epochs"], name


def test_fused_and_reference_kernels_find_the_same_values(results):
    assert results[0]["speed"]["same values"]


def test_outputs(results):
    r, out = results
    text = (out / "tune_finetune.md").read_text()
    for name in ("grid", "random", "tpe"):
        assert f"| {name} |" in text
    assert "| optim.reference_kernels() |" in r["table"]
    for png in ("tune_finetune.png", "tune_finetune_importances.png", "tune_finetune_losses.png"):
        assert (out / png).stat().st_size > 10_000, png


def test_sqlite_study_resumes(example, prepared, tmp_path):
    """A study stopped after 4 trials continues from its database to the budget: the first
    trials kept, numbered on, no random configuration drawn twice."""
    storage = f"sqlite:///{tmp_path / 'tune.db'}"
    data, body = prepared
    budget = example.QUICK._replace(trials=8, epochs=2)
    first = example.run_study("random", 0, data, body, budget, True, storage, stop_after=4)
    before = [(t.number, t.params, t.state, t.value) for t in first.trials]
    assert len(before) == 4
    again = example.run_study("random", 0, data, body, budget, True, storage)
    trials = optuna.load_study(study_name=again.study_name, storage=storage).trials
    assert [t.number for t in trials] == list(range(8))
    assert [(t.number, t.params, t.state, t.value) for t in trials[:4]] == before
    lrs = [t.params["lr"] for t in trials]
    assert len(set(lrs)) == len(lrs)
    # nothing left to do: a third run adds no trial
    example.run_study("random", 0, data, body, budget, True, storage)
    assert len(optuna.load_study(study_name=again.study_name, storage=storage).trials) == 8


def test_sample_builds_every_class(example):
    """Every configuration the search space yields builds its optimizer through from_config."""
    sampler = optuna.samplers.RandomSampler(seed=0)
    study = optuna.create_study(sampler=sampler)
    names = set()
    for _ in range(60):
        trial = study.ask()
        config = example.sample(trial)
        hyper = {k: v for k, v in config.items() if k not in ("optimizer", "freeze_body")}
        opt = example.optim.from_config(config["optimizer"], [np.zeros(3, np.float32)], **hyper)
        assert type(opt).__name__ == config["optimizer"]
        names.add(config["optimizer"])
        study.tell(trial, 0.0)
    assert names == set(example.OPTIMIZERS)
