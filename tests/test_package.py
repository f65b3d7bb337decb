"""The package surface: exports, version, SIMD dispatch, configuration report."""

from __future__ import annotations

import io
import os
import subprocess
import sys

import numpy as np
import pytest
from support import assert_same_bits

import fusedopt
from fusedopt import _core
from fusedopt._dispatch import LEVELS, runnable
from fusedopt.registry import OPTIMIZERS


def test_exports():
    for name in fusedopt.__all__:
        assert hasattr(fusedopt, name), name
    for spec in OPTIMIZERS.values():
        assert getattr(fusedopt, spec.fused.__name__) is spec.fused
        assert getattr(fusedopt.reference, spec.reference.__name__) is spec.reference
        assert spec.fused.__doc__ and "math::" in spec.fused.__doc__, spec.name


def test_a_type_checker_sees_every_exported_name(tmp_path):
    """The update functions are made at import from the declarations, so they are not in the
    source: mypy reported `Module "fusedopt" has no attribute "adam_"` for the package's main
    API, which py.typed tells it to check."""
    api = pytest.importorskip("mypy.api", reason="mypy not installed: pip install '.[test]'")
    user = tmp_path / "user.py"
    user.write_text(
        "import fusedopt\n"
        + "".join(f"from fusedopt import {name}\n" for name in fusedopt.__all__)
        + "".join(f"fusedopt.{name}\n" for name in fusedopt.__all__)
        + "reveal_type(fusedopt.adam_)\n"
    )
    out, err, status = api.run([str(user), "--cache-dir", str(tmp_path / "cache")])
    assert status == 0, out + err
    assert "-> builtins.bool" in out or "-> bool" in out, out


def test_version_matches_compiled_module():
    assert fusedopt.__version__ == _core.__version__


def runnable_levels():
    """Levels this CPU supports and this build includes, best first."""
    return runnable()


def test_dispatch_picks_the_best_runnable_level():
    expected = os.environ.get("FUSEDOPT_SIMD") or runnable_levels()[0]
    assert _core.simd_level() == expected


def run_python(code: str, **env):
    return subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        env={**os.environ, **env},
        timeout=300,  # a hang detector: generous on a loaded machine (sanitizers, CI jobs)
    )


@pytest.mark.parametrize("level", LEVELS)
def test_forcing_a_level(level):
    result = run_python("import fusedopt; print(fusedopt._core.simd_level())", FUSEDOPT_SIMD=level)
    if level in runnable_levels():
        assert result.returncode == 0, result.stderr
        assert result.stdout.strip() == level
    else:
        assert result.returncode != 0
        assert f"FUSEDOPT_SIMD={level}: this CPU or build cannot run it" in result.stderr


def test_unknown_level_is_an_error():
    result = run_python("import fusedopt", FUSEDOPT_SIMD="sse9")
    assert result.returncode != 0
    assert "FUSEDOPT_SIMD='sse9': expected one of" in result.stderr


def test_show_config():
    out = io.StringIO()
    fusedopt.show_config(file=out)
    text = out.getvalue()
    assert f"SIMD level:        {_core.simd_level()}" in text
    assert "Eigen:             3." in text
    assert f"threads:           {fusedopt.get_num_threads()}" in text


def test_omp_num_threads_is_honoured():
    result = run_python("import fusedopt; print(fusedopt.get_num_threads())", OMP_NUM_THREADS="3")
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == ("3" if _core.OPENMP else "1")  # serial build: one thread


def test_build_reports_its_threads():
    """show_config says whether the build has OpenMP threads or is serial (FUSEDOPT_OPENMP)."""
    out = io.StringIO()
    fusedopt.show_config(file=out)
    assert f"({_core.THREADS})" in out.getvalue()
    if _core.OPENMP:
        assert _core.THREADS.startswith("OpenMP "), _core.THREADS
    else:
        assert _core.THREADS.startswith("serial: "), _core.THREADS
        assert fusedopt.get_num_threads() == 1


def test_threadpoolctl_limits_apply():
    threadpoolctl = pytest.importorskip("threadpoolctl", reason="threadpoolctl not installed")
    default = fusedopt.get_num_threads()
    with threadpoolctl.threadpool_limits(limits=1, user_api="openmp"):
        assert fusedopt.get_num_threads() == 1
    assert fusedopt.get_num_threads() == default


@pytest.mark.parametrize("present", range(16), ids=lambda bits: f"{bits:04b}")
def test_roofline_probe_moves_memory_but_changes_nothing(present):
    """The benchmark's implementations share arrays with the probe: with any of its four
    buffers given or absent it must leave finite values as they are (it adds 0 * grad), and it
    writes the param and every buffer it is given (a NaN grad makes 0 * grad NaN)."""
    from fusedopt import _core

    rng = np.random.default_rng(0)
    for dtype in (np.float32, np.float64):
        arrays = [rng.standard_normal(5000).astype(dtype) for _ in range(6)]
        buffers = [arrays[2 + k] if present >> k & 1 else None for k in range(4)]
        given = [a for a in arrays[:2] + buffers if a is not None]
        before = [a.copy() for a in arrays]
        _core.roofline(*arrays[:2], *buffers)
        for a, b in zip(arrays, before):
            assert_same_bits(a, b)
        arrays[1][7] = np.nan
        _core.roofline(*arrays[:2], *buffers)
        has_nan = [any(a is g for g in given) for a in arrays]  # the grad and what is written
        assert [bool(np.isnan(a[7])) for a in arrays] == has_nan
