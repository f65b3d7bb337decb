"""Each storage row's time against its probe over several runs of the storage benchmark: the
median, lowest and highest paired ratio (probe / row) and how often the row fell outside the
probe's band (counted over the band's rows: the targets' rows are not in it), so that a row
that is outside in run after run reads apart from noise. With it,
the medians of the row's time at n over its time in cache (near 1: its arithmetic, not its
bytes, sets its time) and, where the runs have it, of its probe's time in cache over its own
(what the probe leaves out, the formula, costs where memory does not bind; – where the
probe's or the row's cost there is below the timing's noise).

    python bench/probe_band.py RUN1.json RUN2.json ...   # the JSON of bench/run.py --storage
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", type=Path, nargs="+", help="JSON files of bench/run.py --storage")
    args = parser.parse_args(argv)
    ratios: dict = {}
    bound: dict = {}  # the row's time at n over its time in cache
    cached: dict = {}  # the probe's time in cache over the row's
    outside: dict = {}
    band = None
    for path in args.runs:
        run = json.loads(path.read_text())
        band = run["probe_band"]["band"]
        for row in run["rows"]:
            paired = row.get("probe_over_row_paired")
            if paired:
                ratios.setdefault(row["storage"], []).append(paired[0])
                bound.setdefault(row["storage"], []).append(row["median_s"] / row["in_cache_s"])
                if row.get("probe_in_cache_s") and row["in_cache_s"] > 0:
                    cached.setdefault(row["storage"], []).append(
                        row["probe_in_cache_s"] / row["in_cache_s"]
                    )
        for name in run["probe_band"]["outside"]:
            outside[name] = outside.get(name, 0) + 1
    print(f"{len(args.runs)} runs; band {band[0]:.0%}-{band[1]:.0%} of the probe\n")
    print(
        "| row | median | lowest | highest | runs outside | at n over in cache "
        "| probe in cache, % of row |"
    )
    print("|---|---|---|---|---|---|---|")
    median = statistics.median
    for name, values in sorted(ratios.items(), key=lambda item: median(item[1])):
        # a median at or below 0: the probe's cost in cache is below the timing's noise
        probe_cached = (
            f"{median(cached[name]):.0%}" if name in cached and median(cached[name]) > 0 else "–"
        )
        print(
            f"| {name} | {median(values):.1%} | {min(values):.1%} | {max(values):.1%} | "
            f"{outside.get(name, 0)} | {median(bound[name]):.2f}x | {probe_cached} |"
        )


if __name__ == "__main__":
    main()
