import pytest

import fusedopt


@pytest.fixture(autouse=True, scope="session")
def threads_always_run():
    """Without the late-worker rule (bindings.cpp, "Cores that other threads hold"):
    on a busy machine it would run calls on one thread, and the tests of how work is split
    across threads would then test one thread. tests/test_kernels.py tests the rule itself."""
    late_start = fusedopt._core.get_late_start_ns()
    fusedopt._core.set_late_start_ns(2**62)
    fusedopt._core.set_busy(0, 0)
    yield
    fusedopt._core.set_late_start_ns(late_start)


def pytest_report_header(config):
    # Which fusedopt is under test matters: the installed wheel in CI, never python/ sources
    # without their compiled modules.
    return (
        f"fusedopt {fusedopt.__version__} from {fusedopt.__file__}; SIMD level "
        f"{fusedopt._core.simd_level()}; {fusedopt.get_num_threads()} threads"
    )
