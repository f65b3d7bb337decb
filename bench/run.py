"""Benchmark fusedopt against the pure-NumPy reference.

    python bench/run.py --quick        # per optimizer, float32, 1e3/1e5/1e6/1e7 elements
                                       # (about two minutes on 2 cores)
    python bench/run.py                # 1e2 ... 1e8 elements, float32 and float64
    python bench/run.py --threshold    # measure where a parallel region starts to pay off
    python bench/run.py --table        # the README's table of every optimizer: 1e3 ... 1e7, all
                                       # peers, bench/results/optimizers.md
    python bench/run.py --storage      # Adam in every storage row (bfloat16, float16, int8 state,
                                       # masters, stochastic rounding): bench/low_precision.py

Every figure is the median of many timed calls, each on a fresh set of arrays taken in turn
from a pool larger than the last-level cache (so small sizes are not flattered by a warm cache),
with the effective bandwidth (bytes the step must move per element x elements / time), and the
speed-up of fusedopt over NumPy measured in the same run. The implementations compared in a
row take turns in blocks, so that their ratios do not measure the drift of a shared machine.
Results go to a Markdown table on stdout and a JSON file (machine, versions, threads, every
figure).
"""

from __future__ import annotations

import argparse
import importlib
import json
import math
import os
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Callable, Dict, List

import numpy as np

import fusedopt
from fusedopt import _core
from fusedopt.registry import OPTIMIZERS

try:
    import torch
except ImportError:  # torch columns only where it is installed
    torch = None
try:
    import numba
    import numba_twins
except ImportError:  # likewise numba's
    numba = numba_twins = None


def roofline_probe(spec, hyper, arrays):
    """The roofline probe with this optimizer's traffic: param and its buffers read and
    written, grad read, no arithmetic to speak of. A two-pass kernel (LAMB) first reads them
    all once more: a sum of squares over them stands for its first pass."""
    buffers = [arrays[b] for b in spec.buffers(hyper)]
    args = [arrays["param"], arrays["grad"], *buffers, *[None] * (4 - len(buffers))]
    if spec.declaration.passes == 2:
        read = [arrays["param"], arrays["grad"], *buffers]
        return lambda step: (_core.sum_squares(read), _core.roofline(*args))
    return lambda step: _core.roofline(*args)


# torch.optim equivalents of the registry's benchmark cases (cases[0]).
TORCH_CLASSES = {
    "sgd": "SGD",
    "momentum": "SGD",
    "adam": "Adam",
    "adamw": "AdamW",
    "adamax": "Adamax",
    "nadam": "NAdam",
    "radam": "RAdam",
    "adagrad": "Adagrad",
    "rmsprop": "RMSprop",
}
# The implementations each has on CPU (torch 2.13): Adamax, NAdam, RAdam and RMSprop take no
# fused=.
TORCH_MODES = {
    name: ("loop", "foreach")
    if name in ("adamax", "nadam", "radam", "rmsprop")
    else ("loop", "foreach", "fused")
    for name in TORCH_CLASSES
}
# Peers outside torch.optim, as (module, class): torch optimizers that take foreach= as torch's
# do (the schedulefree package's memory-efficient classes; train() is called before timing).
PEER_CLASSES = {
    "schedulefree_adamw": ("schedulefree", "AdamWScheduleFree"),
    "schedulefree_sgd": ("schedulefree", "SGDScheduleFree"),
    "lamb": ("pytorch_optimizer", "Lamb"),
}
TORCH_MODES.update({name: ("loop", "foreach") for name in PEER_CLASSES})


def torch_class(name):
    """The torch optimizer class compared with registry entry ``name`` (ImportError if its
    package is missing)."""
    if name in PEER_CLASSES:
        module, cls = PEER_CLASSES[name]
        return getattr(importlib.import_module(module), cls)
    return getattr(torch.optim, TORCH_CLASSES[name])


def torch_kwargs(name, hyper):
    h = dict(hyper)
    if name in ("adam", "adamw", "adamax", "nadam", "radam", "schedulefree_adamw", "lamb"):
        h["betas"] = (h.pop("beta1", 0.9), h.pop("beta2", 0.999))
    if name == "lamb":  # pytorch_optimizer's name; its clamp is a class attribute, 10
        h["weight_decouple"] = h.pop("decoupled_weight_decay", True)
        h.pop("clamp", None)
    for running in ("lr_max", "weight_sum"):  # schedulefree keeps these in its groups
        h.pop(running, None)
    return h


def torch_step(mode):
    """A torch.optim step over the same arrays (shared memory), in one of torch's three
    implementations: a for-loop, foreach (multi-tensor) or fused (one kernel)."""

    def prepare(spec, hyper, arrays):
        params = arrays["param"] if isinstance(arrays["param"], list) else [arrays["param"]]
        grads = arrays["grad"] if isinstance(arrays["grad"], list) else [arrays["grad"]]
        tensors = []
        for p, g in zip(params, grads):
            t = torch.from_numpy(p)
            t.grad = torch.from_numpy(g)
            tensors.append(t)
        flags = {
            "loop": dict(foreach=False),
            "foreach": dict(foreach=True),
            "fused": dict(fused=True),
        }[mode]
        opt = torch_class(spec.name)(tensors, **torch_kwargs(spec.name, hyper), **flags)
        if hasattr(opt, "train"):  # schedulefree: steps only in train mode
            opt.train()
        return lambda step: opt.step()

    return prepare


def torch_supports(mode):
    def check(spec, hyper):
        if torch is None or mode not in TORCH_MODES.get(spec.name, ()):
            return False
        # and a trial step, for a torch that lacks a mode declared here
        try:
            t = torch.zeros(2)
            t.grad = torch.zeros(2)
            flags = {
                "loop": dict(foreach=False),
                "foreach": dict(foreach=True),
                "fused": dict(fused=True),
            }[mode]
            opt = torch_class(spec.name)([t], **torch_kwargs(spec.name, hyper), **flags)
            if hasattr(opt, "train"):
                opt.train()
            opt.step()
            return True
        except (ImportError, RuntimeError, TypeError, ValueError):
            return False

    return check


def numba_supports(spec, hyper):
    return numba_twins is not None and spec.name in numba_twins.TWINS


_checked_twins = set()


def numba_step(spec, hyper, arrays):
    """The numba twin, compiled and checked against the reference once per optimizer, dtype
    and hyperparameters before it is timed."""
    key = (spec.name, arrays["param"].dtype.name, repr(sorted(hyper.items())))
    if key not in _checked_twins:
        numba_twins.check(spec, hyper, arrays["param"].dtype)
        _checked_twins.add(key)
    return spec.bind(numba_twins.TWINS[spec.name], arrays, hyper)


def call_step(kind):
    def prepare(spec, hyper, arrays):
        return spec.bind(spec.fused if kind == "fused" else spec.reference, arrays, hyper)

    return prepare


def always(spec, hyper):
    return True


# name -> (is it available for this optimizer, prepare(spec, hyper, arrays) -> step(step))
IMPLEMENTATIONS = {
    "fusedopt": (always, call_step("fused")),
    "numpy": (always, call_step("reference")),
    "roofline": (always, roofline_probe),
    "torch-loop": (torch_supports("loop"), torch_step("loop")),
    "torch-foreach": (torch_supports("foreach"), torch_step("foreach")),
    "torch-fused": (torch_supports("fused"), torch_step("fused")),
    "numba": (numba_supports, numba_step),
}


def cpu_caches() -> list[tuple[int, int]]:
    """(level, bytes) of each of the first CPU's caches, as Linux's sysfs lists them (none
    elsewhere)."""
    caches = []
    for index in Path("/sys/devices/system/cpu/cpu0/cache").glob("index*"):
        try:
            level = int((index / "level").read_text())
            text = (index / "size").read_text().strip()
            scale = {"K": 1 << 10, "M": 1 << 20}.get(text[-1:], 1)
            caches.append((level, int(text.rstrip("KM")) * scale))
        except (OSError, ValueError):
            pass
    return caches


def last_level_cache_bytes() -> int:
    """The largest CPU cache (0 where the OS does not say): sysconf where it has the entries,
    else sysfs."""
    sizes = []
    for key in ("SC_LEVEL4_CACHE_SIZE", "SC_LEVEL3_CACHE_SIZE", "SC_LEVEL2_CACHE_SIZE"):
        try:
            sizes.append(int(os.sysconf(key)))
        except (ValueError, OSError):
            pass
    return max(sizes + [size for _, size in cpu_caches()], default=0)


# Rotate through at least this much memory, so that no call finds its arrays in a cache: four
# times the last-level cache (some server CPUs have hundreds of MiB of L3), and at least 256 MiB.
POOL_BYTES = max(256 << 20, 4 * last_level_cache_bytes())
MAX_POOL = 4096  # small sizes: call overhead, not the cache, decides


def machine() -> dict:
    cpu, flags = None, None  # of the first processor listed
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key.strip() == "model name" and cpu is None:
                    cpu = value.strip()
                elif key.strip() in ("flags", "Features") and flags is None:
                    flags = value.split()
    except OSError:
        pass
    simd = (
        "sse4_2",
        "avx",
        "avx2",
        "fma",
        "bmi2",
        "avx512f",
        "avx512bw",
        "avx512vl",
        "avx512dq",
        "neon",
        "asimd",
        "sve",
    )
    return {
        "cpu": cpu or platform.processor(),
        "cpu_flags": [f for f in flags or [] if f in simd],
        "cores": os.cpu_count(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "numpy": np.__version__,
        "torch": torch.__version__ if torch is not None else None,
        "numba": numba.__version__ if numba is not None else None,
        "fusedopt": fusedopt.__version__,
        "simd_level": _core.simd_level(),
        "threads": fusedopt.get_num_threads(),
        "parallel_min": _core.get_parallel_min(),
        "last_level_cache_bytes": last_level_cache_bytes(),
        "pool_bytes": POOL_BYTES,
    }


def make_pool(spec, hyper, n, dtype, rng):
    """Independent argument sets, enough to cover POOL_BYTES, each param/grad random and the
    state zero (a single set for sizes that do not fit twice in memory)."""
    set_bytes = max(1, n * spec.bytes_per_element(np.dtype(dtype).itemsize, hyper))
    count = max(1, min(MAX_POOL, math.ceil(POOL_BYTES / set_bytes)))
    pool = []
    for _ in range(count):
        arrays = {role: rng.standard_normal(n).astype(dtype) for role in ("param", "grad")}
        arrays.update({b: np.zeros(n, dtype) for b in spec.buffers(hyper)})
        pool.append(arrays)
    return pool


def time_interleaved(
    steps: Dict[str, List[Callable[[int], Any]]],
    budget_s: float,
    min_calls: int,
    max_calls: int,
    gap_s: float = 0.0,
    blocks: int = 8,
):
    """Seconds per call of each implementation, one value per timed call. Each has its
    prepared steps (one per argument set of the pool), run once each as a warm-up. Then the
    implementations take turns in `blocks` rounds, each timing calls for its share of the
    budget, so that all see the same machine: on a shared machine the bandwidth drifts by
    tens of percent within seconds, and ratios of figures taken at different times would
    measure the drift. A block of short calls starts with an untimed one, as the previous
    implementation's threads may still be spinning. With gap_s, the caller sleeps between
    calls, as a training loop computes gradients between steps: OpenMP's idle threads then
    fall asleep and must be woken."""
    call_s = {}  # a warm call's time, from the warm-up
    for impl, impl_steps in steps.items():
        for step_fn in impl_steps[: min(len(impl_steps), 64)]:
            start = time.perf_counter()
            step_fn(1)
            call_s[impl] = time.perf_counter() - start
    times: Dict[str, List[float]] = {impl: [] for impl in steps}
    calls = 0
    step = 2

    def call(impl_steps):
        # the next argument set for every call, whichever implementation makes it: when
        # implementations share the pool's arrays, none finds them in cache
        nonlocal calls, step
        step_fn = impl_steps[calls % len(impl_steps)]
        calls += 1
        start = time.perf_counter()
        step_fn(step)
        elapsed = time.perf_counter() - start
        step += 1
        if gap_s:
            time.sleep(gap_s)
        return elapsed

    for block in range(blocks):
        for impl, impl_steps in steps.items():
            impl_times = times[impl]
            if call_s[impl] < 0.02:  # untimed: where a millisecond of spinning would show
                call(impl_steps)
            due = math.ceil(min_calls * (block + 1) / blocks)
            cap = max(due, max_calls * (block + 1) // blocks)
            deadline = time.perf_counter() + budget_s / blocks
            while len(impl_times) < cap and (
                len(impl_times) < due or time.perf_counter() < deadline
            ):
                impl_times.append(call(impl_steps))
    return times


def time_calls(steps, budget_s: float, min_calls: int, max_calls: int, gap_s: float = 0.0):
    """time_interleaved for one implementation."""
    return time_interleaved({"": steps}, budget_s, min_calls, max_calls, gap_s)[""]


def set_threads(threads):
    fusedopt.set_num_threads(threads)
    if torch is not None:
        torch.set_num_threads(fusedopt.get_num_threads())
    if numba is not None:
        numba.set_num_threads(min(fusedopt.get_num_threads(), numba.config.NUMBA_NUM_THREADS))


def run(optimizers, sizes, dtypes, implementations, budget_s, rng):
    print_header(implementations)
    rows = []
    for name in optimizers:
        spec = OPTIMIZERS[name]
        hyper = spec.cases[0]
        for dtype in dtypes:
            itemsize = np.dtype(dtype).itemsize
            bpe = spec.bytes_per_element(itemsize, hyper)
            for n in sizes:
                if 3 * n * bpe > available_memory():  # arrays, torch's state, NumPy temporaries
                    print(
                        f"| {name} | {np.dtype(dtype).name} | {n:.0e} | skipped: needs "
                        f"~{3 * n * bpe / 2**30:.1f} GiB |"
                    )
                    continue
                pool = make_pool(spec, hyper, n, dtype, rng)
                row = {
                    "optimizer": name,
                    "hyper": hyper,
                    "dtype": np.dtype(dtype).name,
                    "n": n,
                    "bytes_per_element": bpe,
                    "pool": len(pool),
                    "threads": fusedopt.get_num_threads(),
                }
                # Every implementation updates the same arrays (torch's through shared
                # memory, with state of its own): which values they hold does not change
                # the time of a step.
                steps = {
                    impl: [IMPLEMENTATIONS[impl][1](spec, hyper, arrays) for arrays in pool]
                    for impl in implementations
                    if IMPLEMENTATIONS[impl][0](spec, hyper)
                }
                times = time_interleaved(steps, budget_s, min_calls=5, max_calls=20000)
                del steps
                for impl, impl_times in times.items():
                    median = statistics.median(impl_times)
                    row[impl] = {
                        "median_s": median,
                        "calls": len(impl_times),
                        "gb_per_s": bpe * n / median / 1e9,
                    }
                if "fusedopt" in row and "numpy" in row:
                    row["speedup"] = row["numpy"]["median_s"] / row["fusedopt"]["median_s"]
                if "fusedopt" in row and "roofline" in row:
                    row["of_roofline"] = row["roofline"]["median_s"] / row["fusedopt"]["median_s"]
                rows.append(row)
                print_row(row, implementations)
                del pool
    return rows


def transformer_shapes(d: int, blocks: int = 24):
    """The 10 tensors of each of `blocks` transformer blocks of width d: attention (4 d x d),
    MLP (d x 4d, 4d x d), two layer norms (gain and bias)."""
    block = [(d, d)] * 4 + [(d, 4 * d), (4 * d, d)] + [(d,)] * 4
    return block * blocks


def optim_step(spec, hyper, arrays):
    """A step of the fusedopt.optim class over the same params and grads: the list call plus
    what the class does per tensor (its checks, its state, the grouping into calls). The class
    keeps its own state; the arrays' buffers go unused."""
    opt = fusedopt.optim.from_config(spec.name, arrays["param"], **hyper)
    return lambda step: opt.step(arrays["grad"])


def many_tensors(widths, budget_s, rng):
    """Adam on a 240-tensor model in one multi-tensor call, against one flat call over the same
    number of elements, a step of fusedopt.optim.Adam (the list call and the class's work per
    tensor), torch's fused Adam over the 240 tensors, and NumPy."""
    spec, hyper = OPTIMIZERS["adam"], {}
    rows = []
    print("\n" + MANY_TENSORS_HEADER)
    for d in widths:
        shapes = transformer_shapes(d)
        n = sum(math.prod(s) for s in shapes)
        set_bytes = n * spec.bytes_per_element(4, hyper)
        count = max(1, min(16, math.ceil(POOL_BYTES / set_bytes)))

        def model(flat, n=n, shapes=shapes):  # bound now: called within this iteration
            if flat:
                return {
                    r: (rng.standard_normal(n) if r in ("param", "grad") else np.zeros(n)).astype(
                        np.float32
                    )
                    for r in ("param", "grad", "exp_avg", "exp_avg_sq")
                }
            return {
                r: [
                    (rng.standard_normal(s) if r in ("param", "grad") else np.zeros(s)).astype(
                        np.float32
                    )
                    for s in shapes
                ]
                for r in ("param", "grad", "exp_avg", "exp_avg_sq")
            }

        steps = {}
        for impl, flat in [
            ("fusedopt list", False),
            ("fusedopt flat", True),
            ("fusedopt.optim", False),
            ("torch fused", False),
            ("numpy", False),
        ]:
            if impl == "torch fused" and not torch_supports("fused")(spec, hyper):
                continue
            prepare = {
                "fusedopt list": call_step("fused"),
                "fusedopt flat": call_step("fused"),
                "fusedopt.optim": optim_step,
                "torch fused": torch_step("fused"),
                "numpy": call_step("reference"),
            }[impl]
            steps[impl] = [prepare(spec, hyper, model(flat)) for _ in range(count)]
        times = time_interleaved(steps, budget_s, 5, 20000)
        del steps
        medians = {impl: statistics.median(t) for impl, t in times.items()}
        row = {
            "d": d,
            "tensors": len(shapes),
            "elements": n,
            "bytes_per_element": 28,
            **{k: v for k, v in medians.items()},
        }
        row["list_over_flat"] = medians["fusedopt list"] / medians["fusedopt flat"]
        row["optim_over_list"] = medians["fusedopt.optim"] / medians["fusedopt list"]
        if "torch fused" in medians:
            row["speedup_vs_torch_fused"] = medians["torch fused"] / medians["fusedopt list"]
        rows.append(row)
        print(many_tensors_line(row), flush=True)
    return rows


MANY_TENSORS_HEADER = (
    "| d | tensors | elements | fusedopt list | fusedopt flat | list / flat | "
    "fusedopt.optim | optim / list | torch fused | vs torch | numpy | GB/s (list) |"
    "\n|---|---|---|---|---|---|---|---|---|---|---|---|"
)


def many_tensors_line(row) -> str:
    """A row of many_tensors' table."""
    torch_cells = (
        (f"{fmt_time(row['torch fused'])} | {row['speedup_vs_torch_fused']:.2f}x")
        if "torch fused" in row
        else "– | –"
    )
    return (
        f"| {row['d']} | {row['tensors']} | {row['elements']:,} | "
        f"{fmt_time(row['fusedopt list'])} | {fmt_time(row['fusedopt flat'])} | "
        f"{row['list_over_flat']:.2f} | {fmt_time(row['fusedopt.optim'])} | "
        f"{row['optim_over_list']:.2f} | {torch_cells} | {fmt_time(row['numpy'])} | "
        f"{28 * row['elements'] / row['fusedopt list'] / 1e9:.1f} |"
    )


def available_memory() -> int:
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    return 1 << 62


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def memory(n, rng):
    """Extra memory of one Adam step on n float32 elements: NumPy allocations seen by
    tracemalloc, and growth of the resident set, for fusedopt and the NumPy reference."""
    import tracemalloc

    spec, hyper = OPTIMIZERS["adam"], {}
    rows = []
    print(
        f"\n| Adam, {n:.0e} float32 | peak traced allocations | per element | RSS growth |"
        "\n|---|---|---|---|"
    )
    for impl in ("fusedopt", "numpy"):
        arrays = {
            r: (rng.standard_normal(n) if r in ("param", "grad") else np.zeros(n)).astype(
                np.float32
            )
            for r in ("param", "grad", "exp_avg", "exp_avg_sq")
        }
        fn = spec.fused if impl == "fusedopt" else spec.reference
        spec.call(fn, arrays, hyper, 1)  # warm: first-call allocations are not per step
        tracemalloc.start()
        rss = rss_bytes()
        tracemalloc.reset_peak()
        base = tracemalloc.get_traced_memory()[0]
        spec.call(fn, arrays, hyper, 2)
        peak = tracemalloc.get_traced_memory()[1] - base
        growth = rss_bytes() - rss
        tracemalloc.stop()
        rows.append(
            {"implementation": impl, "n": n, "peak_traced_bytes": peak, "rss_growth_bytes": growth}
        )
        print(f"| {impl} | {peak:,} B | {peak / n:.2f} B | {growth:,} B |", flush=True)
    return rows


def plot(rows, folder: Path):
    """GB/s against size per optimizer (float32, all threads), the roofline probe dashed; and
    fusedopt's speed-up over NumPy."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    threads = max(r["threads"] for r in rows)
    rows = [r for r in rows if r["dtype"] == "float32" and r["threads"] == threads]
    names = list(dict.fromkeys(r["optimizer"] for r in rows))
    # one colour per implementation in every panel, though not every panel has every one
    colors = {impl: f"C{i}" for i, impl in enumerate(IMPLEMENTATIONS)}
    colors["roofline"] = "black"
    fig, axes = plt.subplots(2, math.ceil(len(names) / 2), figsize=(16, 7), squeeze=False)
    for ax, name in zip(axes.flat, names):
        mine = [r for r in rows if r["optimizer"] == name]
        for impl in IMPLEMENTATIONS:
            points = [(r["n"], r[impl]["gb_per_s"]) for r in mine if impl in r]
            if points:
                x, y = zip(*points)
                ax.plot(
                    x, y, "--" if impl == "roofline" else "-o", ms=3, label=impl, color=colors[impl]
                )
        ax.set_xscale("log")
        ax.set_title(f"{name} ({mine[0]['bytes_per_element']} B/element)")
        ax.set_xlabel("elements")
        ax.set_ylabel("GB/s")
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(names) :]:
        ax.axis("off")
    axes.flat[0].legend(fontsize=8)
    fig.suptitle(f"float32, {threads} threads: effective bandwidth (bytes moved / time)")
    fig.tight_layout()
    fig.savefig(folder / "bandwidth.png", dpi=110)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(8, 5))
    for name in names:
        points = [(r["n"], r["speedup"]) for r in rows if r["optimizer"] == name and "speedup" in r]
        if points:  # a run without NumPy has no speed-up
            x, y = zip(*points)
            ax.plot(x, y, "-o", ms=3, label=name)
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.axhline(1, color="grey", lw=0.8)
    ax.set_xlabel("elements")
    ax.set_ylabel("speed-up over the NumPy reference")
    ax.set_title(f"fusedopt vs NumPy, float32, {threads} threads")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(folder / "speedup.png", dpi=110)
    plt.close(fig)


def fmt_time(seconds: float) -> str:
    if seconds < 1e-3:
        return f"{seconds * 1e6:.1f} µs"
    return f"{seconds * 1e3:.2f} ms"


def print_header(implementations):
    cols = ["optimizer", "dtype", "n", "B/elem"]
    for impl in implementations:
        cols += [f"{impl} median", f"{impl} GB/s"]
    cols += ["speed-up vs numpy", "of roofline"]
    print("| " + " | ".join(cols) + " |")
    print("|" + "---|" * len(cols))


def print_row(row, implementations):
    cells = [row["optimizer"], row["dtype"], f"{row['n']:.0e}", str(row["bytes_per_element"])]
    for impl in implementations:
        figure = row.get(impl)
        cells += (
            [fmt_time(figure["median_s"]), f"{figure['gb_per_s']:.1f}"] if figure else ["–", "–"]
        )
    cells.append(f"{row['speedup']:.1f}x" if "speedup" in row else "")
    cells.append(f"{row['of_roofline']:.0%}" if "of_roofline" in row else "")
    print("| " + " | ".join(cells) + " |", flush=True)


TORCH_PEERS = ("torch-loop", "torch-foreach", "torch-fused")


def optimizers_table(rows) -> str:
    """The README's table of the element-wise optimizers from `run`'s rows (float32, one thread
    count): state and bytes per element, the 1e7 figures against the probe, torch's three
    implementations and NumPy, and the worst ratio to torch's fastest over the sizes measured."""
    big = max(r["n"] for r in rows)
    lines = [
        f"| optimizer | state B/elem | moved B/elem | time at {big:.0e} | GB/s | of probe | "
        "vs torch loop | vs foreach | vs fused | vs NumPy | vs numba | "
        "vs torch's fastest, worst size |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]

    def ratio(row, impl):  # > 1: fusedopt is faster
        return f"{row[impl]['median_s'] / row['fusedopt']['median_s']:.2f}x" if impl in row else "–"

    for name in dict.fromkeys(r["optimizer"] for r in rows):
        mine = [r for r in rows if r["optimizer"] == name]
        row = next(r for r in mine if r["n"] == big)
        spec = OPTIMIZERS[name]
        state = len(spec.buffers(row["hyper"])) * np.dtype(row["dtype"]).itemsize
        worst = [
            (min(r[i]["median_s"] for i in TORCH_PEERS if i in r) / r["fusedopt"]["median_s"], r)
            for r in mine
            if any(i in r for i in TORCH_PEERS)
        ]
        worst_cell = (
            "{:.2f}x at {:.0e}".format(*min((w, r["n"]) for w, r in worst)) if worst else "–"
        )
        lines.append(
            f"| {name} | {state} | {row['bytes_per_element']} | "
            f"{fmt_time(row['fusedopt']['median_s'])} | {row['fusedopt']['gb_per_s']:.1f} | "
            f"{row['of_roofline']:.0%} | {ratio(row, 'torch-loop')} | "
            f"{ratio(row, 'torch-foreach')} | {ratio(row, 'torch-fused')} | "
            f"{row['speedup']:.1f}x | {ratio(row, 'numba')} | {worst_cell} |"
        )
    return "\n".join(lines) + "\n"


def threshold(rng, budget_s, gap_s):
    """Adam, float32: serial vs parallel at sizes around the threshold; the smallest size from
    which parallel is faster at every larger size measured."""
    spec, hyper = OPTIMIZERS["adam"], {}
    threads = fusedopt.get_num_threads()
    default = _core.get_parallel_min()
    sizes = [int(2 ** (k / 2)) for k in range(20, 39)]  # 1 Ki ... 512 Ki
    print(f"| n | serial | parallel ({threads} threads) | parallel/serial |\n|---|---|---|---|")
    results = []
    adaptive = fusedopt.get_adaptive_threads()
    fusedopt.set_adaptive_threads(False)  # parallel means every thread here
    try:
        for n in sizes:
            pool = make_pool(spec, hyper, n, np.float32, rng)
            medians = []
            steps = [call_step("fused")(spec, hyper, arrays) for arrays in pool]
            for parallel_min in (sys.maxsize, 0):
                _core.set_parallel_min(parallel_min)
                times = time_calls(steps, budget_s, 20, 20000, gap_s)
                medians.append(statistics.median(times))
            results.append((n, *medians))
            print(
                f"| {n} | {fmt_time(medians[0])} | {fmt_time(medians[1])} | "
                f"{medians[1] / medians[0]:.2f} |",
                flush=True,
            )
    finally:
        _core.set_parallel_min(default)
        fusedopt.set_adaptive_threads(adaptive)
    crossover = next(
        (n for i, (n, _, _) in enumerate(results) if all(p < s for _, s, p in results[i:])), None
    )
    print(f"\nparallel wins from n = {crossover} (compiled default: {default})")
    return {"threads": threads, "gap_s": gap_s, "sizes": results, "crossover": crossover}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--quick",
        action="store_true",
        help="float32 at 1e3, 1e5, 1e6, 1e7 elements, every optimizer",
    )
    parser.add_argument(
        "--threshold",
        action="store_true",
        help="measure the size from which a parallel region pays off",
    )
    parser.add_argument(
        "--table",
        action="store_true",
        help="every optimizer, float32, all threads, 1e3 ... 1e7 against every peer: the "
        "README's table (bench/results/optimizers.md)",
    )
    parser.add_argument(
        "--optimizers", nargs="+", choices=sorted(OPTIMIZERS), default=list(OPTIMIZERS)
    )
    parser.add_argument(
        "--sizes",
        nargs="+",
        type=float,
        help="element counts (default: 1e2 ... 1e8, capped by memory)",
    )
    parser.add_argument("--dtypes", nargs="+", choices=["float32", "float64"])
    parser.add_argument(
        "--gap", type=float, default=0.0, help="with --threshold: seconds to sleep between calls"
    )
    parser.add_argument(
        "--threads",
        type=int,
        nargs="+",
        help="kernel thread counts (default: all cores; full run: 1 and all)",
    )
    parser.add_argument(
        "--storage",
        action="store_true",
        help="Adam at 1e7 elements in every storage row, against its probe and torch "
        "(bench/low_precision.py)",
    )
    parser.add_argument(
        "--implementations",
        nargs="+",
        choices=list(IMPLEMENTATIONS),
        help="the implementations timed (default: the mode's)",
    )
    parser.add_argument(
        "--many-tensors",
        action="store_true",
        help="only the full run's 240-tensor table: Adam as a list call, one flat call, "
        "fusedopt.optim.Adam's step, torch's fused Adam and NumPy (many_tensors.json and .md)",
    )
    parser.add_argument("--budget", type=float, help="seconds of timing per figure")
    parser.add_argument(
        "--out",
        type=Path,
        help="JSON output (default bench/results/<mode>.json: quick.json, full.json, "
        "threshold.json, many_tensors.json; --table: optimizers.json; --storage: storage.json)",
    )
    args = parser.parse_args(argv)
    if args.storage:
        import low_precision

        if len(args.threads or []) > 1 or args.budget or args.sizes or args.dtypes:
            parser.error("--storage takes one --threads count and --out (1e7 elements, Adam)")
        set_threads(args.threads[0] if args.threads else None)
        low_precision.main(["--out", str(args.out)] if args.out else [])
        return 0

    rng = np.random.default_rng(0)
    mode = (
        "threshold"
        if args.threshold
        else "many_tensors"
        if args.many_tensors
        else "table"
        if args.table
        else "quick"
        if args.quick
        else "full"
    )
    result = {
        "mode": mode,
        "machine": machine(),
        "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    print(
        f"fusedopt {fusedopt.__version__}, {result['machine']['cpu']}, "
        f"{result['machine']['threads']} threads, numpy {np.__version__}\n"
    )
    out = args.out or Path(__file__).parent / "results" / (
        "optimizers.json" if args.table else f"{mode}.json"
    )
    out.parent.mkdir(parents=True, exist_ok=True)
    if args.threshold:
        set_threads(args.threads[0] if args.threads else None)
        result["threshold"] = threshold(rng, args.budget or 0.2, args.gap)
    elif args.many_tensors:
        set_threads(args.threads[0] if args.threads else None)
        result["many_tensors"] = many_tensors([8, 64, 256], args.budget or 0.3, rng)
        out.with_suffix(".md").write_text(
            f"`python bench/run.py --many-tensors` ({time.strftime('%Y-%m-%d')}): "
            f"{result['machine']['cpu']}, {result['machine']['simd_level']}, "
            f"{fusedopt.get_num_threads()} threads, load average {os.getloadavg()[0]:.1f}; "
            "float32 Adam, medians\n\n"
            + "\n".join([MANY_TENSORS_HEADER, *map(many_tensors_line, result["many_tensors"])])
            + "\n"
        )
        set_threads(None)
    else:
        if args.table:
            sizes, dtypes, budget = [1e3, 1e4, 1e5, 1e6, 1e7], ["float32"], 0.25
            implementations = list(IMPLEMENTATIONS)
            thread_counts = args.threads[:1] if args.threads else [None]
        elif args.quick:
            sizes, dtypes, budget = [1e3, 1e5, 1e6, 1e7], ["float32"], 0.25
            implementations = ["fusedopt", "numpy", "roofline", "torch-fused"]
            thread_counts = args.threads or [None]
        else:
            sizes = [10.0**k for k in range(2, 9)]  # 1e2 ... 1e8
            dtypes, budget = ["float32", "float64"], 0.3
            implementations = list(IMPLEMENTATIONS)
            thread_counts = args.threads or sorted({os.cpu_count() or 1, 1}, reverse=True)
        sizes = [int(s) for s in (args.sizes or sizes)]
        implementations = args.implementations or implementations
        result["rows"] = []
        for threads in thread_counts:
            set_threads(threads)
            print(f"-- {fusedopt.get_num_threads()} threads")
            # NumPy runs on one thread whatever the setting: timed once, at the first count
            impls = (
                implementations
                if threads == thread_counts[0]
                else [i for i in implementations if i != "numpy"]
            )
            result["rows"] += run(
                args.optimizers, sizes, args.dtypes or dtypes, impls, args.budget or budget, rng
            )
        set_threads(None)
        if args.table:
            table = optimizers_table(result["rows"])
            (out.with_suffix(".md")).write_text(
                f"`python bench/run.py --table` ({time.strftime('%Y-%m-%d')}): "
                f"{result['machine']['cpu']}, {result['machine']['simd_level']}, "
                f"{result['machine']['threads']} threads, load average "
                f"{os.getloadavg()[0]:.1f}; float32, medians\n\n" + table
            )
            print("\n" + table)
        elif not args.quick:
            result["many_tensors"] = many_tensors([64, 256], args.budget or budget, rng)
            result["memory"] = memory(10**7, rng)
            try:
                plot(result["rows"], out.parent)
                print(f"plots: {out.parent / 'bandwidth.png'}, {out.parent / 'speedup.png'}")
            except ImportError:
                print("matplotlib not installed: no plots")
    out.write_text(json.dumps(result, indent=1) + "\n")
    print(f"\nwrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
