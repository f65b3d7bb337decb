import fusedopt


def pytest_report_header(config):
    # Which fusedopt is under test matters: the installed wheel in CI, never python/ sources
    # without their compiled modules.
    return (
        f"fusedopt {fusedopt.__version__} from {fusedopt.__file__}; SIMD level "
        f"{fusedopt._core.simd_level()}; {fusedopt.get_num_threads()} threads"
    )
