"""Valgrind memcheck of the kernels.

    valgrind --xml=yes --xml-file=vg.xml python .ci/memcheck.py     # the run
    python .ci/memcheck.py --report vg.xml                          # the verdict

The run: every kernel, both dtypes, lists with sizes around the SIMD widths, the chunk and the
parallel threshold, 1 and 2 threads, the non-finite check and an error path, each result checked
against the reference. The verdict fails on any error whose stack passes through fusedopt's
compiled modules; CPython under memcheck reports a few of its own (int.from_bytes at import),
which are counted but are not ours.
"""

import os
import sys
import xml.etree.ElementTree as ET


def report(path: str) -> int:
    """Memory errors (invalid reads and writes, uses of uninitialised values, bad frees) with a
    frame in fusedopt (the binding ``_core.*.so`` or a kernel library ``_kernels_<level>.so``)
    or NumPy fail: the arrays pass only through those two, and a value that fusedopt left
    uninitialised is reported where NumPy later reads it. Blocks still allocated at exit
    (os._exit leaves every module-lifetime allocation behind) are counted apart."""
    ours, theirs, leaks = [], 0, 0
    for error in ET.parse(path).getroot().iter("error"):
        kind = error.findtext("kind") or ""
        if kind.startswith("Leak_"):
            leaks += 1
        elif any(
            part in (f.findtext("obj") or "")
            for f in error.iter("frame")
            for part in ("/fusedopt/_core", "/fusedopt/_kernels_", "/numpy/")
        ):
            ours.append(kind)
        else:
            theirs += 1
    print(
        f"memcheck: {len(ours)} memory errors in fusedopt's or NumPy's frames {ours or ''}; "
        f"{theirs} in the interpreter's own (not fusedopt's); "
        f"{leaks} blocks still allocated at exit (not checked)"
    )
    return 1 if ours else 0


if len(sys.argv) == 3 and sys.argv[1] == "--report":
    sys.exit(report(sys.argv[2]))

import numpy as np  # noqa: E402

import fusedopt  # noqa: E402
from fusedopt import _core  # noqa: E402
from fusedopt.registry import OPTIMIZERS  # noqa: E402

CHUNK, PARALLEL_MIN = _core.CHUNK, _core.get_parallel_min()
SHAPES = [(), (1,), (7,), (17,), (CHUNK + 1,), (PARALLEL_MIN + 5,), (3, 5)]
rng = np.random.default_rng(0)
checked = 0
for threads in (1, 2):
    fusedopt.set_num_threads(threads)
    for spec in OPTIMIZERS.values():
        for hyper in spec.cases:
            for dtype in (np.float32, np.float64):
                arrays = {
                    role: [rng.standard_normal(s).astype(dtype) for s in SHAPES]
                    for role in ("param", "grad")
                }
                for buffer in spec.buffers(hyper):
                    arrays[buffer] = [np.zeros(s, dtype) for s in SHAPES]
                expected = {role: [a.copy() for a in v] for role, v in arrays.items()}
                for step in (1, 2):
                    spec.call(spec.fused, arrays, hyper, step)
                    spec.call(spec.reference, expected, hyper, step)
                for role in arrays:
                    for a, b in zip(arrays[role], expected[role]):
                        assert np.array_equal(a, b), (spec.name, hyper, role)
                checked += 1
    grads = [rng.standard_normal(s) for s in SHAPES]
    assert fusedopt.all_finite(grads)
    grads[-2][3] = np.nan
    assert not fusedopt.all_finite(grads)
try:
    fusedopt.adam_(
        np.zeros(4, np.float32),
        np.zeros(4, np.float16),
        np.zeros(4, np.float32),
        np.zeros(4, np.float32),
        step=1,
    )
except TypeError:
    pass
print(f"memcheck run: {checked} kernel configurations checked against the reference", flush=True)
# Skip interpreter finalization: CPython's shutdown garbage collection draws reports of its own
# under memcheck (none in fusedopt's frames), which would bury the ones that matter.
os._exit(0)
