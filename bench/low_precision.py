"""Adam at 1e7 elements in every storage row (int8 state, float32 masters of bfloat16 params
included), to nearest and with stochastic rounding, against float32 and torch's fused Adam in
float32 and bfloat16: medians of interleaved calls, with the bytes each moves per element and
the row's probe (the same arrays read and written, converted and quantized the same way, a
master row's master and param copy included, with no formula: the time the storage alone
costs; it rounds its own stores to nearest, one element at a time, so a stochastic row's probe
rounds stochastically only a master's param copy, a float16 param written back from float32,
and int8 codes, as the step does), and its time in cache (the same call on arrays that fit the
threads' L2 caches: the time the arithmetic alone costs, which no saving of bytes can go below;
the probe's too, which leaves out the formula's share).
Then issue 10's targets, and each row against its probe, as paired ratios: each the median of
ratios of two calls made back to back, which drift in the machine's memory speed between calls
seconds apart does not enter. Each target also gets its bound, the row's probe against the same
reference: about the least the row's bytes take in that run (the rows run at 85-115 % of their
probes), so where it exceeds the target the row could not meet it then. Prints Markdown tables
and writes them as JSON (--out).

    python bench/low_precision.py [--n 1e7] [--calls 9] [--rounds 11] [--out FILE.json]
    python bench/run.py --storage [--out FILE.json]       # the same; FUSEDOPT_SIMD: the level
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path
from typing import Optional

import ml_dtypes
import numpy as np
from run import machine, time_interleaved  # bench/, this script's folder

import fusedopt
from fusedopt import _core
from fusedopt.quantize import BLOCK, QuantizedState

DTYPES = {
    "float32": np.float32,
    "float64": np.float64,
    "bfloat16": ml_dtypes.bfloat16,
    "float16": np.float16,
}


def state_array(dtype: str, n: int, signed: bool, normal=None):
    """A state buffer: zeros, as a step starts it, or `normal` (float32 standard normal values)
    scaled to a moment's size (positive unless signed)."""
    values = np.zeros(n, np.float32)
    if normal is not None:
        values = normal * np.float32(1e-2)
        values = values if signed else np.abs(values)
    if dtype == "int8":
        return QuantizedState.from_array(values, signed=signed)
    return values.astype(DTYPES[dtype])


def bytes_per_element(param: str, grad: str, state: str, master: Optional[str]) -> float:
    """Adam's memory traffic per element: the param (or master) read and written (with a
    master, the low-precision param only written), the grad read, two states read and written
    (int8: a code and a 256th of a float32 scale each way)."""
    size = {"float32": 4, "float64": 8, "bfloat16": 2, "float16": 2, "int8": 1 + 4 / BLOCK}
    moved = size[grad] + 2 * 2 * size[state]
    return moved + (2 * size[master] + size[param] if master else 2 * size[param])


def l2_cache_bytes() -> tuple[int, bool]:
    """One core's L2 cache, and whether the OS said (else 512 KiB, the smallest of current x86
    server cores, is assumed)."""
    from run import cpu_caches  # bench/run.py, which imports this module only when it runs it

    sizes = [size for level, size in cpu_caches() if level == 2]
    return (sizes[0], True) if sizes else (512 << 10, False)


def in_cache_sizes(bytes_per_elem: float) -> tuple[int, int]:
    """Two sizes for the in-cache slope: the larger's arrays fill at most half of each thread's
    L2 cache, the smaller is about a quarter of it. Both are whole chunks of 2048 elements, the
    same number per thread (a call lasts as long as its largest share), and at least the
    size from which calls run on every thread (else the two would run different paths)."""
    threads = max(1, fusedopt.get_num_threads())
    unit = 2048 * threads
    smallest = -(-_core.get_parallel_min() // unit) * unit
    large = int(threads * l2_cache_bytes()[0] / (2 * bytes_per_elem)) // unit * unit
    small = max(smallest, large // 4 // unit * unit)
    return max(large, 2 * small), small


def per_element_in_cache(calls: dict, rounds: int, repeats: int = 200) -> dict:
    """Each row's marginal time per element with its arrays in cache: `calls[name]` is a pair
    of (size, step) at two sizes, each step timed `repeats` times in a row (the arrays stay in
    cache); the difference of the two times over the difference of the sizes drops what a call
    costs whatever its size. Median of `rounds`, the rows interleaved."""
    slopes = {name: [] for name in calls}
    for _ in range(rounds):
        for name, ((n1, step1), (n2, step2)) in calls.items():
            elapsed = []
            for step in (step1, step2):
                step(1)  # into cache
                start = time.perf_counter()
                for i in range(repeats):
                    step(i + 2)
                elapsed.append((time.perf_counter() - start) / repeats)
            slopes[name].append((elapsed[0] - elapsed[1]) / (n1 - n2))
    return {name: statistics.median(s) for name, s in slopes.items()}


# issue 10's targets at 1e7: (row, reference, the most row/reference may take)
TARGETS = [
    ("bfloat16/bfloat16/bfloat16 stochastic", "torch fused bfloat16", 0.6),
    ("bfloat16/bfloat16/bfloat16 stochastic", "float32/float32/float32", 0.65),
    ("bfloat16/bfloat16/bfloat16 + master", "float32/float32/float32", 0.85),
    ("float32/float32/int8", "torch fused float32", 0.8),
]
PROBE_BAND = (0.85, 1.15)  # every other row: its probe's time over its own


def paired_ratios(calls: dict, pairs: list, rounds: int) -> dict:
    """Per pair (a, b) of names in `calls`, `rounds` ratios of a's time to b's, each from two
    calls made back to back (a first in every other round), each after an untimed call of its
    own: so each ratio sees one state of the machine, where the medians of the main table come
    from calls up to a round (seconds) apart, in which a shared machine's memory speed can
    swing by tens of percent."""
    ratios = {pair: [] for pair in pairs}

    def timed(fn, step):
        fn(step)  # another library's idle threads may still be spinning
        start = time.perf_counter()
        fn(step + 1)
        return time.perf_counter() - start

    step = 2
    for r in range(rounds):
        for a, b in pairs:
            first, second = (a, b) if r % 2 == 0 else (b, a)
            t = {first: timed(calls[first], step), second: timed(calls[second], step + 2)}
            step += 4
            ratios[a, b].append(t[a] / t[b])
    return ratios


def summary(ratios: list) -> tuple[float, float, float]:
    """The median of `ratios` and its 20th and 80th percentiles (the sorted ratios' values at
    round(q (n - 1)): the 3rd and 9th of 11)."""
    ordered = sorted(ratios)
    at = lambda q: ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]  # noqa: E731
    return statistics.median(ordered), at(0.2), at(0.8)


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=float, default=1e7)
    parser.add_argument("--calls", type=int, default=9)
    parser.add_argument("--rounds", type=int, default=11, help="paired calls per ratio")
    parser.add_argument(
        "--out",
        type=Path,
        default=Path(__file__).parent / "results" / "storage.json",
        help="JSON output (default bench/results/storage.json)",
    )
    args = parser.parse_args(argv)
    if args.rounds < 2:
        parser.error("--rounds: at least 2, so that each call of a pair comes first in some")
    n = int(args.n)
    rng = np.random.default_rng(0)
    drawn = {}

    def normal(size: int, which: str) -> np.ndarray:
        """Standard normal float32 values, drawn once per size and use: every row copies the
        same ones, as drawing is slow next to a step at large sizes."""
        if (size, which) not in drawn:
            drawn[size, which] = rng.standard_normal(size, dtype=np.float32)
        return drawn[size, which]

    steps, traffic, probes = {}, {}, {}
    # (param, grad, state, master): every row, and masters of bfloat16 params
    configs = [(*row, None) for row in _core.STORAGE_ROWS if row[0] != "float64"]
    configs += [
        ("bfloat16", grad, state, "float32")
        for grad in ("bfloat16", "float32")
        for state in ("float32", "bfloat16", "int8")
        if ("float32", grad, state) in _core.STORAGE_ROWS
    ]

    def probe(arrays, state, master, stochastic):
        """The probe of a row whose step takes `arrays`: the same param and grad (shared)."""
        size = arrays[0].size
        # Adam's kinds of int8 codes: signed for the first buffer, unsigned for the second
        # (the roofline declares it never negative, as Adam its second moment); nonzero
        # values, as a step's state is after its first step (a block of zeros takes the
        # codec's general loops, the typical block its shorter ones). A master row's probe
        # reads and writes the master and writes the param copy, as its step (rounded as
        # the step rounds it); the probe's own stores round to nearest.
        buffers = [
            state_array(state, size, signed=signed, normal=normal(size, "state"))
            for signed in (True, False)
        ]
        # a kernel without a step: a new seed each call, as its callers must pass
        extra = {"master": arrays[0].astype(np.float32)} if master else {}
        return lambda step, a=arrays[:2] + buffers, sr=stochastic, kw=extra: _core.roofline(
            *a, None, None, seed=step, stochastic_rounding=sr, **kw
        )

    def adam_row(param, grad, state, master, stochastic, size):
        arrays = [
            normal(size, "param").astype(DTYPES[param]),
            normal(size, "grad").astype(DTYPES[grad]),
            state_array(state, size, signed=True),
            state_array(state, size, signed=False),
        ]
        extra = {"master": arrays[0].astype(np.float32)} if master else {}
        return arrays, lambda step: fusedopt.adam_(
            *arrays, step=step, lr=1e-4, stochastic_rounding=stochastic, seed=step, **extra
        )

    in_cache = {}  # per row, (size, step) at two sizes whose arrays fit the L2 caches
    for param, grad, state, master in configs:
        for stochastic in (False, True):
            if stochastic and "bfloat16" not in (param, state) and param != "float16":
                continue
            name = f"{param}/{grad}/{state}" + (" + master" if master else "")
            name += " stochastic" if stochastic else ""
            arrays, steps[name] = adam_row(param, grad, state, master, stochastic, n)
            traffic[name] = bytes_per_element(param, grad, state, master)
            in_cache[name] = [
                (size, adam_row(param, grad, state, master, stochastic, size)[1])
                for size in in_cache_sizes(traffic[name])
            ]
            probes[name] = probe(arrays, state, master, stochastic)
            # the probe in cache too: where the row takes longer than its probe there, the
            # difference is the formula's arithmetic
            row = (param, grad, state, master, stochastic)
            in_cache[f"probe {name}"] = [
                (size, probe(adam_row(*row, size)[0], state, master, stochastic))
                for size in in_cache_sizes(traffic[name])
            ]
    try:
        import torch
    except ImportError:
        torch = None
    if torch is not None:

        def torch_adam(dtype, size):
            p = torch.randn(size, dtype=dtype, requires_grad=True)
            p.grad = torch.randn(size, dtype=dtype)
            opt = torch.optim.Adam([p], lr=1e-4, fused=True)
            return lambda step: opt.step()

        for dtype in (torch.float32, torch.bfloat16):
            name = f"torch fused {str(dtype)[6:]}"
            steps[name] = torch_adam(dtype, n)
            traffic[name] = 7 * (4 if dtype == torch.float32 else 2)
            in_cache[name] = [
                (size, torch_adam(dtype, size)) for size in in_cache_sizes(traffic[name])
            ]
    calls = {**steps, **{f"probe {name}": fn for name, fn in probes.items()}}
    # One timed call per row and round, each after an untimed one: the previous row's library
    # (torch's OpenMP runtime or fusedopt's) may still be spinning its idle threads, which
    # slowed the next call by a third or more on 2 cores.
    times = time_interleaved(
        {name: [fn] for name, fn in calls.items()},
        budget_s=0.0,
        min_calls=args.calls,
        max_calls=args.calls,
        blocks=args.calls,
    )
    pairs = [(row, ref) for row, ref, _ in TARGETS if row in calls and ref in calls]
    # each target's bound: the row's probe against the reference, about the least the row's
    # bytes take
    pairs += [(f"probe {row}", ref) for row, ref in list(pairs) if f"probe {row}" in calls]
    pairs += [(f"probe {name}", name) for name in probes]
    paired = {pair: summary(r) for pair, r in paired_ratios(calls, pairs, args.rounds).items()}
    medians = {name: statistics.median(t) for name, t in times.items()}
    cached = {name: n * t for name, t in per_element_in_cache(in_cache, args.calls).items()}
    l2, l2_found = l2_cache_bytes()
    probe_of = {name: medians.pop(f"probe {name}") for name in probes}
    target_rows = {row for row, _ in pairs if not row.startswith("probe ")}
    base = medians["float32/float32/float32"]
    torch_f32 = medians.get("torch fused float32")
    torch_bf16 = medians.get("torch fused bfloat16")
    print(
        f"fusedopt {fusedopt.__version__}, SIMD level {_core.simd_level()}, "
        f"{fusedopt.get_num_threads()} threads, Adam, n = {n:,}, median of {args.calls}; "
        f"in cache: the time per element with the arrays in L2 ({l2 >> 10} KiB a core"
        f"{'' if l2_found else ', assumed'}), times n; paired: the median (20th-80th "
        f"percentile) of {args.rounds} ratios of calls made back to back"
    )
    print(
        "| storage (param/grad/state) | B/element | median | GB/s | probe | % of probe "
        "| % of probe, paired | vs fusedopt float32 | vs torch fused f32 | vs torch fused bf16 "
        "| in cache | in cache vs fusedopt float32 | probe in cache, % of row |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    result = {
        "mode": "storage",
        "machine": machine(),
        "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "n": n,
        "calls": args.calls,
        "rounds": args.rounds,
        "l2_bytes": l2,
        "l2_assumed": not l2_found,  # the OS did not say: 512 KiB assumed
        "rows": [],
        "targets": [],
    }
    for name, t in medians.items():
        probe_pair = paired.get((f"probe {name}", name))
        result["rows"].append(
            {
                "storage": name,
                "bytes_per_element": traffic[name],
                "median_s": t,
                "times_s": times[name],
                "probe_median_s": probe_of.get(name),
                "probe_over_row_paired": list(probe_pair) if probe_pair else None,
                "in_cache_s": cached[name],
                "probe_in_cache_s": cached.get(f"probe {name}"),
            }
        )
        f32 = f"{t / torch_f32:.2f}x" if torch_f32 else "–"
        bf16 = f"{t / torch_bf16:.2f}x" if torch_bf16 else "–"
        probe = probe_of.get(name)
        probe_cached = cached.get(f"probe {name}")
        # a slope at or below 0, the probe's or the row's: its cost there is below the noise
        in_cache_of_probe = (
            f"{100 * probe_cached / cached[name]:.0f} %"
            if probe_cached and probe_cached > 0 and cached[name] > 0
            else "–"
        )
        against = f"{probe * 1e3:.2f} ms | {100 * probe / t:.0f} %" if probe else "– | –"
        if (f"probe {name}", name) in paired:
            mid, low, high = paired[f"probe {name}", name]
            against += f" | {100 * mid:.0f} % ({100 * low:.0f}-{100 * high:.0f})"
        else:
            against += " | –"
        print(
            f"| {name} | {traffic[name]:.1f} | {t * 1e3:.2f} ms | "
            f"{traffic[name] * n / t / 1e9:.1f} | {against} | {t / base:.2f}x | {f32} | {bf16} | "
            f"{cached[name] * 1e3:.2f} ms | {cached[name] / base:.2f}x | {in_cache_of_probe} |"
        )

    low, high = PROBE_BAND
    outside = {  # row: its probe's time over its own, paired
        name: mid
        for (probe, name), (mid, _, _) in paired.items()
        if probe == f"probe {name}" and not low <= mid <= high and name not in target_rows
    }
    print(
        "\nTargets (issue 10), paired ratios; the bound: the row's probe against the same "
        "reference, about the least the row's bytes take in this run:"
    )
    print("| row | against | target | paired ratio | of the medians | met | bound |")
    print("|---|---|---|---|---|---|---|")
    for row, ref, most in TARGETS:
        if (row, ref) not in paired:
            continue
        mid, lo, hi = paired[row, ref]
        bound = paired.get((f"probe {row}", ref))
        target = {
            "row": row,
            "against": ref,
            "at_most": most,
            "paired": [mid, lo, hi],
            "of_medians": medians[row] / medians[ref],
            "met": mid <= most,
            "bound_paired": list(bound) if bound else None,
        }
        result["targets"].append(target)
        shown = f"{bound[0]:.2f}x ({bound[1]:.2f}-{bound[2]:.2f})" if bound else "–"
        print(
            f"| {row} | {ref} | ≤ {most}x | {mid:.2f}x ({lo:.2f}-{hi:.2f}) | "
            f"{target['of_medians']:.2f}x | {'yes' if target['met'] else 'no'} | {shown} |"
        )
    counted = sum(1 for name in probes if name not in target_rows)
    band = f"{100 * low:.0f}-{100 * high:.0f} %"
    listed = f"{len(outside)} outside" + (
        ": " + ", ".join(f"{name} {100 * mid:.1f} %" for name, mid in outside.items())
        if outside
        else ""
    )
    print(
        f"| every other row with a probe ({counted}) | its probe | {band} | {listed} | | "
        f"{'yes' if not outside else 'no'} | |"
    )
    result["probe_band"] = {"band": [low, high], "rows": counted, "outside": outside}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    print(f"\nwrote {args.out}")
    return result


if __name__ == "__main__":
    main()
