"""Two builds of a kernel library (`_kernels_<level>.so`) in one process: Adam in the storage
rows of `bench/low_precision.py`, each call made with one library and then the other on the same
arrays (each first in every other alternation), so that both see the machine as it is then. On a
shared machine whose memory speed swings from run to run, this separates a change from the noise
that comparing two runs would mix in.

    python bench/ab_kernels.py OLD.so NEW.so [--n 1e7] [--calls 11] [--others]

With --others, the rows are instead momentum, Lion, RMSprop, Adagrad, Adamax, NAdam, RAdam, LAMB
and the schedule-free AdamW and SGD, each with float32 and with bfloat16 params, grads and state
(to nearest, and all but RMSprop stochastically too).

With --zeros F, a fraction F of the elements (at random) is zero in every array, as where a
gradient is exactly zero (a dead ReLU unit's, an embedding row's that no batch used) and so is
its moment: then every int8 state block holds zero codes.

Prints each row's median time with each library and the median (and the 20th and 80th
percentiles, as `bench/low_precision.py`'s summary takes them) of the per-call ratios new/old.
At sizes whose arrays fit the last-level cache the second call of a pair finds them there:
compare in cache (~1e4, ~1e5) or well above it (1e7), not in between.
"""

from __future__ import annotations

import argparse
import ctypes
import statistics
import time

import numpy as np
from low_precision import DTYPES, state_array, summary  # bench/, this script's folder

import fusedopt
from fusedopt import _core
from fusedopt.registry import OPTIMIZERS

# (param, grad, state, master, stochastic), dtypes named as bench/low_precision.py names them
ROWS = {
    "float32/float32/float32": ("float32", "float32", "float32", False, False),
    "float32/float32/bfloat16": ("float32", "float32", "bfloat16", False, False),
    "float32/bfloat16/bfloat16": ("float32", "bfloat16", "bfloat16", False, False),
    "bfloat16/bfloat16/float32": ("bfloat16", "bfloat16", "float32", False, False),
    "bfloat16/float32/bfloat16": ("bfloat16", "float32", "bfloat16", False, False),
    "bfloat16/bfloat16/bfloat16": ("bfloat16", "bfloat16", "bfloat16", False, False),
    "bfloat16/bfloat16/bfloat16 + master": ("bfloat16", "bfloat16", "bfloat16", True, False),
    "bfloat16/bfloat16/float32 + master": ("bfloat16", "bfloat16", "float32", True, False),
    "bfloat16/bfloat16/bfloat16 stochastic": ("bfloat16", "bfloat16", "bfloat16", False, True),
    "bfloat16/bfloat16/bfloat16 + master stochastic": (
        "bfloat16",
        "bfloat16",
        "bfloat16",
        True,
        True,
    ),
    "float32/float32/int8": ("float32", "float32", "int8", False, False),
    "bfloat16/bfloat16/int8": ("bfloat16", "bfloat16", "int8", False, False),
    "bfloat16/bfloat16/int8 stochastic": ("bfloat16", "bfloat16", "int8", False, True),
    "bfloat16/float32/int8 stochastic": ("bfloat16", "float32", "int8", False, True),
}


def adam_row(values, param, grad, state, master, stochastic):
    """A step of Adam on copies of `values` stored as the row says (states as
    bench/low_precision.py makes them, at a moment's scale)."""
    arrays = [
        values.astype(DTYPES[param]),
        values.astype(DTYPES[grad]),
        state_array(state, values.size, signed=True, normal=values),
        state_array(state, values.size, signed=False, normal=values),
    ]
    extra = {"master": values.copy()} if master else {}
    return lambda step: fusedopt.adam_(
        *arrays, step=step, lr=1e-4, stochastic_rounding=stochastic, seed=step, **extra
    )


def other_rows(values) -> dict:
    """Steps of optimizers other than Adam on copies of `values`, float32 and all-bfloat16, with
    the arrays their registry entries take (the state zero)."""

    def row(spec, dtype, stochastic=False, **hyper):
        arrays = {role: values.astype(DTYPES[dtype]) for role in ("param", "grad")}
        arrays.update({b: np.zeros(values.size, DTYPES[dtype]) for b in spec.buffers(hyper)})
        options = {"lr": 1e-4, "stochastic_rounding": stochastic, "seed": 1, **hyper}
        return spec.bind(spec.fused, arrays, options)

    rows = {}
    for name, hyper in (
        ("momentum", {"momentum": 0.9}),
        ("lion", {}),
        ("rmsprop", {}),
        ("adagrad", {}),
        ("adamax", {}),
        ("nadam", {}),
        ("radam", {}),
        ("lamb", {}),
        ("schedulefree_adamw", {}),
        ("schedulefree_sgd", {}),
    ):
        spec = OPTIMIZERS[name]
        rows[f"{name} float32"] = row(spec, "float32", **hyper)
        rows[f"{name} bfloat16"] = row(spec, "bfloat16", **hyper)
        if name != "rmsprop":
            rows[f"{name} bfloat16 stochastic"] = row(spec, "bfloat16", True, **hyper)
    return rows


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("old")
    parser.add_argument("new")
    parser.add_argument("--n", type=float, default=1e7)
    parser.add_argument("--calls", type=int, default=11)
    parser.add_argument("--others", action="store_true", help="other optimizers than Adam")
    parser.add_argument("--zeros", type=float, default=0.0, help="the fraction of zeros")
    args = parser.parse_args(argv)
    libraries = {name: ctypes.CDLL(path) for name, path in (("old", args.old), ("new", args.new))}
    tables = {
        name: ctypes.cast(library.fusedopt_kernel_table, ctypes.c_void_p).value
        for name, library in libraries.items()
    }
    fusedopt.set_adaptive_threads(False)  # every call on every thread
    rng = np.random.default_rng(0)
    values = rng.standard_normal(int(args.n)).astype(np.float32)
    values[rng.random(values.size) < args.zeros] = 0.0
    if args.others:
        steps = other_rows(values)
    else:
        steps = {name: adam_row(values, *row) for name, row in ROWS.items()}
    times = {(name, which): [] for name in steps for which in tables}
    for step in range(1, args.calls + 1):
        for name, fn in steps.items():
            # each library first in every other alternation: the second call of a pair tends
            # to be the faster
            for which, table in list(tables.items())[:: 1 if step % 2 else -1]:
                _core._use_kernels(table)
                start = time.perf_counter()
                fn(step)
                times[name, which].append(time.perf_counter() - start)
    print(
        f"{'Other optimizers' if args.others else 'Adam'}, n = {int(args.n):,}, "
        f"{fusedopt.get_num_threads()} threads, "
        f"{args.calls} alternations; old {args.old}, new {args.new}"
        + (f"; a fraction {args.zeros} of zeros" if args.zeros else "")
    )
    print(f"| row | old | new | new/old: median (20th-80th percentile of {args.calls}) |")
    print("|---|---|---|---|")

    def duration(seconds: float) -> str:
        return f"{seconds * 1e3:.3f} ms" if seconds >= 1e-3 else f"{seconds * 1e6:.1f} µs"

    for name in steps:
        old, new = times[name, "old"], times[name, "new"]
        mid, low, high = summary([b / a for a, b in zip(old, new)])
        print(
            f"| {name} | {duration(statistics.median(old))} | "
            f"{duration(statistics.median(new))} | {mid:.3f} ({low:.3f}-{high:.3f}) |"
        )


if __name__ == "__main__":
    main()
