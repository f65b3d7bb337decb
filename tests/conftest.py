import pytest

import fusedopt


@pytest.fixture(autouse=True, scope="session")
def threads_always_run():
    """Without the late-worker rule (fusedopt.set_adaptive_threads; bindings.cpp, "Cores that
    other threads hold"): on a busy machine it would run calls on one thread, and the tests of
    how work is split across threads would then test one thread. tests/test_kernels.py tests
    the rule itself."""
    fusedopt.set_adaptive_threads(False)
    yield
    fusedopt.set_adaptive_threads(True)


def pytest_report_header(config):
    # Which fusedopt is under test matters: the installed wheel in CI, never python/ sources
    # without their compiled modules.
    return (
        f"fusedopt {fusedopt.__version__} from {fusedopt.__file__}; SIMD level "
        f"{fusedopt._core.simd_level()}; {fusedopt.get_num_threads()} threads"
    )
