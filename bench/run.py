"""Benchmark fusedopt against the pure-NumPy reference.

    python bench/run.py --quick        # per optimizer, float32, 1e3/1e5/1e6/1e7 elements (< 1 min)
    python bench/run.py                # 1e2 ... 1e8 elements, float32 and float64
    python bench/run.py --threshold    # measure where a parallel region starts to pay off

Every figure is the median of many timed calls, each on a fresh set of arrays taken in turn
from a pool larger than the last-level cache (so small sizes are not flattered by a warm cache),
with the effective bandwidth (bytes the step must move per element x elements / time), and the
speed-up of fusedopt over NumPy measured in the same run. Results go to a Markdown table on
stdout and a JSON file (machine, versions, threads, every figure).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import numpy as np

import fusedopt
from fusedopt import _core
from fusedopt.registry import OPTIMIZERS

def roofline(spec, hyper):
    """The roofline probe with this optimizer's traffic: param and its buffers read and
    written, grad read, no arithmetic to speak of."""
    buffers = spec.buffers(hyper)

    def probe(param, grad, *state, step=None, **keywords):
        arrays = list(state) + [keywords[b] for b in buffers if b in keywords]
        _core.roofline(param, grad, *arrays, *[None] * (4 - len(arrays)))

    return probe


IMPLEMENTATIONS = {
    "fusedopt": lambda spec, hyper: spec.fused,
    "numpy": lambda spec, hyper: spec.reference,
    "roofline": roofline,
}
POOL_BYTES = 256 << 20  # rotate through at least this much memory: 8x this machine's L3
MAX_POOL = 4096


def machine() -> dict:
    cpu = platform.processor()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "numpy": np.__version__,
        "fusedopt": fusedopt.__version__,
        "threads": fusedopt.get_num_threads(),
        "parallel_min": _core.get_parallel_min(),
    }


def make_pool(spec, hyper, n, dtype, rng):
    """Independent argument sets, enough to cover POOL_BYTES, each param/grad random and the
    state zero."""
    set_bytes = max(1, n * spec.bytes_per_element(np.dtype(dtype).itemsize, hyper))
    count = max(1, min(MAX_POOL, math.ceil(POOL_BYTES / set_bytes)))
    if count > 1:
        count = max(count, 2)
    pool = []
    for _ in range(count):
        arrays = {role: rng.standard_normal(n).astype(dtype) for role in ("param", "grad")}
        arrays.update({b: np.zeros(n, dtype) for b in spec.buffers(hyper)})
        pool.append(arrays)
    return pool


def time_calls(spec, fn, hyper, pool, budget_s: float, min_calls: int, max_calls: int,
               gap_s: float = 0.0):
    """Seconds per call, one value per call, cycling through the pool; one warm-up round.
    With gap_s, the caller sleeps between calls, as a training loop computes gradients between
    steps: OpenMP's idle threads then fall asleep and must be woken."""
    for arrays in pool[: min(len(pool), 64)]:
        spec.call(fn, arrays, hyper, 1)
    times = []
    deadline = time.perf_counter() + budget_s
    step = 2
    while len(times) < max_calls and (len(times) < min_calls or time.perf_counter() < deadline):
        arrays = pool[len(times) % len(pool)]
        start = time.perf_counter()
        spec.call(fn, arrays, hyper, step)
        times.append(time.perf_counter() - start)
        step += 1
        if gap_s:
            time.sleep(gap_s)
    return times


def run(optimizers, sizes, dtypes, implementations, budget_s, rng):
    rows = []
    for name in optimizers:
        spec = OPTIMIZERS[name]
        hyper = spec.cases[0]
        for dtype in dtypes:
            itemsize = np.dtype(dtype).itemsize
            bpe = spec.bytes_per_element(itemsize, hyper)
            for n in sizes:
                pool = make_pool(spec, hyper, n, dtype, rng)
                row = {"optimizer": name, "hyper": hyper, "dtype": np.dtype(dtype).name,
                       "n": n, "bytes_per_element": bpe, "pool": len(pool)}
                for impl in implementations:
                    times = time_calls(spec, IMPLEMENTATIONS[impl](spec, hyper), hyper, pool,
                                       budget_s, min_calls=5, max_calls=20000)
                    median = statistics.median(times)
                    row[impl] = {"median_s": median, "calls": len(times),
                                 "gb_per_s": bpe * n / median / 1e9}
                if "fusedopt" in row and "numpy" in row:
                    row["speedup"] = row["numpy"]["median_s"] / row["fusedopt"]["median_s"]
                if "fusedopt" in row and "roofline" in row:
                    row["of_roofline"] = row["roofline"]["median_s"] / row["fusedopt"]["median_s"]
                rows.append(row)
                print_row(row, implementations)
                del pool
    return rows


def fmt_time(seconds: float) -> str:
    if seconds < 1e-3:
        return f"{seconds * 1e6:.1f} µs"
    return f"{seconds * 1e3:.2f} ms"


HEADER_PRINTED = False


def print_row(row, implementations):
    global HEADER_PRINTED
    if not HEADER_PRINTED:
        cols = ["optimizer", "dtype", "n", "B/elem"]
        for impl in implementations:
            cols += [f"{impl} median", f"{impl} GB/s"]
        cols += ["speed-up vs numpy", "of roofline"]
        print("| " + " | ".join(cols) + " |")
        print("|" + "---|" * len(cols))
        HEADER_PRINTED = True
    cells = [row["optimizer"], row["dtype"], f"{row['n']:.0e}", str(row["bytes_per_element"])]
    for impl in implementations:
        cells += [fmt_time(row[impl]["median_s"]), f"{row[impl]['gb_per_s']:.1f}"]
    cells.append(f"{row['speedup']:.1f}x" if "speedup" in row else "")
    cells.append(f"{row['of_roofline']:.0%}" if "of_roofline" in row else "")
    print("| " + " | ".join(cells) + " |", flush=True)


def threshold(rng, budget_s, gap_s):
    """Adam, float32: serial vs parallel at sizes around the threshold; the smallest size from
    which parallel is faster at every larger size measured."""
    spec, hyper = OPTIMIZERS["adam"], {}
    threads = fusedopt.get_num_threads()
    default = _core.get_parallel_min()
    sizes = [int(2 ** (k / 2)) for k in range(20, 39)]  # 1 Ki ... 512 Ki
    print(f"| n | serial | parallel ({threads} threads) | parallel/serial |\n|---|---|---|---|")
    results = []
    try:
        for n in sizes:
            pool = make_pool(spec, hyper, n, np.float32, rng)
            medians = []
            for parallel_min in (sys.maxsize, 0):
                _core.set_parallel_min(parallel_min)
                times = time_calls(spec, spec.fused, hyper, pool, budget_s, 20, 20000, gap_s)
                medians.append(statistics.median(times))
            results.append((n, *medians))
            print(f"| {n} | {fmt_time(medians[0])} | {fmt_time(medians[1])} | "
                  f"{medians[1] / medians[0]:.2f} |", flush=True)
    finally:
        _core.set_parallel_min(default)
    crossover = next((n for i, (n, _, _) in enumerate(results)
                      if all(p < s for _, s, p in results[i:])), None)
    print(f"\nparallel wins from n = {crossover} (compiled default: {default})")
    return {"threads": threads, "gap_s": gap_s, "sizes": results, "crossover": crossover}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true",
                        help="float32 at 1e3, 1e5, 1e6, 1e7 elements, every optimizer")
    parser.add_argument("--threshold", action="store_true",
                        help="measure the size from which a parallel region pays off")
    parser.add_argument("--optimizers", nargs="+", choices=sorted(OPTIMIZERS),
                        default=list(OPTIMIZERS))
    parser.add_argument("--sizes", nargs="+", type=float,
                        help="element counts (default: 1e2 ... 1e8, capped by memory)")
    parser.add_argument("--dtypes", nargs="+", choices=["float32", "float64"])
    parser.add_argument("--gap", type=float, default=0.0,
                        help="with --threshold: seconds to sleep between calls")
    parser.add_argument("--threads", type=int, help="kernel threads (default: all)")
    parser.add_argument("--budget", type=float, help="seconds of timing per figure")
    parser.add_argument("--out", type=Path, help="JSON output (default bench/results/<mode>.json)")
    args = parser.parse_args(argv)

    rng = np.random.default_rng(0)
    if args.threads:
        fusedopt.set_num_threads(args.threads)
    mode = "threshold" if args.threshold else "quick" if args.quick else "full"
    result = {"mode": mode, "machine": machine(),
              "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    print(f"fusedopt {fusedopt.__version__}, {result['machine']['cpu']}, "
          f"{result['machine']['threads']} threads, numpy {np.__version__}\n")
    if args.threshold:
        result["threshold"] = threshold(rng, args.budget or 0.2, args.gap)
    else:
        if args.quick:
            sizes, dtypes, budget = [1e3, 1e5, 1e6, 1e7], ["float32"], 0.25
        else:
            sizes = [10 ** (k / 2) for k in range(4, 17)]  # 1e2 ... 1e8
            dtypes, budget = ["float32", "float64"], 0.5
        sizes = [int(s) for s in (args.sizes or sizes)]
        result["rows"] = run(args.optimizers, sizes, args.dtypes or dtypes,
                             list(IMPLEMENTATIONS), args.budget or budget, rng)
    out = args.out or Path(__file__).parent / "results" / f"{mode}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1) + "\n")
    print(f"\nwrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
