"""examples/finetune_digits.py runs end to end, reduced: pretrain, checkpoint, load, fine-tune."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

from fusedopt import optim

pytest.importorskip("sklearn", reason="scikit-learn not installed: the example is not run")
pytest.importorskip("matplotlib", reason="matplotlib not installed: the example is not run")

EXAMPLE = Path(__file__).parent.parent / "examples" / "finetune_digits.py"

# Lower bounds on the test accuracy after pretraining and after fine-tuning all layers.
# Measured with these epochs: Adam 1.000 / 0.878, Nesterov 0.994 / 0.950, Muon+AdamW
# 1.000 / 0.800, ScheduleFreeAdamW 1.000 / 0.994. The bounds leave room for BLAS rounding on
# other machines.
BOUNDS = {
    "Adam": (0.95, 0.80),
    "Nesterov": (0.95, 0.80),
    "Muon+AdamW": (0.95, 0.70),
    "ScheduleFreeAdamW": (0.95, 0.90),
}


def test_finetune_digits(tmp_path):
    spec = importlib.util.spec_from_file_location("finetune_digits", EXAMPLE)
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    results = example.run(epochs=(15, 5, 10), folder=tmp_path, names=list(BOUNDS))
    for name, r in results.items():
        pretrain, all_layers = BOUNDS[name]
        assert r["pretrain"] >= pretrain, (name, r["pretrain"])
        assert r["all layers"] >= all_layers, (name, r["all layers"])
        assert r["agree"], f"{name}: fusedopt and fusedopt.reference curves differ"
    # the others bit for bit; Muon to rounding (measured: 3.6e-7 here), so again in float64 (0)
    assert all(results[n]["bit for bit"] for n in BOUNDS if n != "Muon+AdamW")
    muon = results["Muon+AdamW"]
    assert muon["bit for bit"] or muon["float64 difference"] <= 1e-9, muon["float64 difference"]
    assert (tmp_path / "finetune_digits.png").stat().st_size > 10_000
    assert (tmp_path / "Adam-optimizer.npz").exists()
    for part in ("Muon", "AdamW"):  # Muon for the hidden weights, AdamW for the rest
        assert (tmp_path / f"Muon+AdamW-optimizer-{part}.npz").exists()
    # Schedule-Free is checkpointed in eval mode: the saved model holds the average x
    saved = optim.Optimizer.read_checkpoint(tmp_path / "ScheduleFreeAdamW-optimizer.npz")
    assert [g["train_mode"] for g in saved["param_groups"]] == [False]
    assert "| Adam |" in example.table(results)
