"""fusedopt.distributed under real MPI jobs: ``mpiexec -n 1/2/3/4`` runs tests/mpi_checks.py.

One job per world size runs every check of mpi_checks.CASES (mpiexec takes about a second to
start); each check is reported here as its own test. Skipped where mpi4py or mpiexec is missing
(``pip install ".[distributed]"`` brings both).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("mpi4py", reason="mpi4py not installed: pip install '.[distributed]'")

import mpi_checks  # noqa: E402

SCRIPT = Path(__file__).parent / "mpi_checks.py"
# mpiexec beside this Python first (the mpich wheel installs it in the venv), then on PATH
MPIEXEC = shutil.which("mpiexec", path=os.path.dirname(sys.executable)) or shutil.which("mpiexec")
if MPIEXEC is None:
    pytest.skip("no mpiexec: pip install '.[distributed]'", allow_module_level=True)
TIMEOUT = 300  # seconds for a job of every check; a hang fails the test instead of the suite
SIZES = [1, 2, 3, 4]


def launch(n: int, mode: str, out: Path, *args: str, timeout: float = TIMEOUT):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    command = [MPIEXEC, "-n", str(n), sys.executable, *args, str(SCRIPT), mode, str(out)]
    return subprocess.run(command, capture_output=True, text=True, timeout=timeout, env=env)


@pytest.fixture(scope="module")
def jobs(tmp_path_factory):
    """world size -> results of its job; N = 2 runs first (it writes the checkpoints that
    N = 1 and 3 resume)."""
    out = tmp_path_factory.mktemp("mpi")
    results = {}

    def run(n: int):
        if n not in results:
            if n != 2:
                run(2)
            job = launch(n, "checks", out)
            path = out / f"results-{n}.json"
            if job.returncode != 0 or not path.exists():
                pytest.fail(
                    f"mpiexec -n {n} failed ({job.returncode}):\n{job.stdout}\n{job.stderr}"
                )
            results[n] = json.loads(path.read_text())
        return results[n]

    return run


CHECKS = [
    pytest.param(n, name, id=f"{name}-n{n}")
    for n in SIZES
    for name in [
        *mpi_checks.CASES,
        *(c for c, (_, sizes) in mpi_checks.CHECKPOINT_CASES.items() if n in sizes),
    ]
]


@pytest.mark.parametrize("n, check", CHECKS)
def test_mpi(jobs, n, check):
    errors = jobs(n)[check]
    assert errors is None, "\n".join(errors)


def test_rank_raising_in_step_aborts_the_job(tmp_path):
    """Rank 1 raises inside step() after communication began: the job ends with the error and
    a clear message, instead of rank 0 waiting in the next collective forever."""
    job = launch(2, "abort", tmp_path, timeout=120)
    assert job.returncode != 0
    assert "planted failure" in job.stderr
    assert "rank 1 of 2 raised in ZeroRedundancyOptimizer.step()" in job.stderr
    assert not list(tmp_path.glob("not-aborted-*"))


def test_rank_raising_outside_step_ends_the_job_under_mpi4py(tmp_path):
    """Rank 1 raises in its training loop while rank 0 waits in step(): ``python -m mpi4py``
    aborts the job (as the module's docstring recommends)."""
    job = launch(2, "uncaught", tmp_path, "-m", "mpi4py", timeout=120)
    assert job.returncode != 0
    assert "planted failure in the training loop" in job.stderr
    assert not list(tmp_path.glob("not-aborted-*"))


def test_data_parallel_example(tmp_path):
    """examples/data_parallel.py, 3 epochs on 2 ranks: float64 curves equal one process's to
    rounding, state split in two."""
    pytest.importorskip("sklearn", reason="scikit-learn not installed: the example is not run")
    pytest.importorskip("matplotlib", reason="matplotlib not installed: the example is not run")
    example = Path(__file__).parent.parent / "examples" / "data_parallel.py"
    env = dict(os.environ, OMP_NUM_THREADS="1")
    command = [
        MPIEXEC,
        "-n",
        "2",
        sys.executable,
        "-m",
        "mpi4py",
        str(example),
        "--epochs",
        "3",
        "--out",
        str(tmp_path),
    ]
    job = subprocess.run(command, capture_output=True, text=True, timeout=300, env=env)
    assert job.returncode == 0, job.stdout + job.stderr
    table = (tmp_path / "data_parallel.md").read_text()
    float64 = next(line for line in table.splitlines() if line.startswith("| float64 |"))
    cells = [c.strip() for c in float64.split("|")[1:-1]]
    state, per_rank, ratio, gaps = int(cells[1]), cells[2].split(" / "), float(cells[3]), cells[4]
    assert len(per_rank) == 2 and sum(map(int, per_rank)) == state and ratio <= 1.0
    assert all(float(g) < 1e-12 for g in gaps.split(" / ")), gaps
    assert (tmp_path / "data_parallel.png").stat().st_size > 10_000
