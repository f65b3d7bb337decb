"""Data parallel (all-reduce) against ZeRO-1 (reduce-scatter + all-gather) with
fusedopt.distributed: measured step times at N = 1, 2, 4 ranks on this machine, bytes per step
against the theory, and a model of the step at N = 8-64 nodes from the measured kernel and copy
bandwidths and a stated network bandwidth.

    pip install ".[distributed]" && python bench/distributed.py [--elements 4e6] [--steps 15]

It launches ``mpiexec -n N`` itself and writes bench/results/distributed.md and .json. AdamW,
float32 parameters, 1 OpenMP thread per rank; the ranks share this machine's cores, so at N
above the core count they are oversubscribed and the times show overhead, not speed-up.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

import fusedopt
from fusedopt import optim

SIZES = [1, 2, 4]
ADAMW_BYTES = 28  # per element: param r/w 8, grad r 4, exp_avg r/w 8, exp_avg_sq r/w 8
COPY_BYTES = 8  # per element of a float32 copy: read 4, write 4
NETWORK_GBPS = 100  # stated, for the model: Gb/s per node, each direction
LATENCY_S = 10e-6  # stated, for the model: per message
MODEL_ELEMENTS = 1_000_000_000
MODEL_NODES = [8, 16, 32, 64]


def shapes(elements: int):
    """A stack of square layers and their biases, about ``elements`` in all."""
    width = 1024
    layers = max(1, elements // (width * width + width))
    return {f"W{i}": (width, width) for i in range(layers)} | {
        f"b{i}": (width,) for i in range(layers)
    }


def job(out: Path, elements: int, steps: int) -> None:
    """One MPI job: median step times (max over ranks) of all-reduce data parallelism and of
    ZeRO-1, and at N = 1 the kernel and copy bandwidths."""
    from mpi4py import MPI

    from fusedopt import distributed

    comm = MPI.COMM_WORLD
    rank, size = comm.Get_rank(), comm.Get_size()
    rng = np.random.default_rng(rank)
    params = {n: rng.standard_normal(s, dtype=np.float32) for n, s in shapes(elements).items()}
    total = sum(p.size for p in params.values())

    def grads():
        return {n: rng.standard_normal(p.shape, dtype=np.float32) * 1e-3 for n, p in params.items()}

    def timed(step, best=False) -> float:
        """Median (or with ``best`` the minimum) over ``steps`` calls, after 2 warm-up ones, of
        the slowest rank's time."""
        times = []
        for i in range(steps + 2):
            g = grads()
            comm.Barrier()
            start = time.perf_counter()
            step(g)
            elapsed = comm.allreduce(time.perf_counter() - start, op=MPI.MAX)
            if i >= 2:
                times.append(elapsed)
        return min(times) if best else statistics.median(times)

    ddp = optim.AdamW(dict(params))
    zero = distributed.ZeroRedundancyOptimizer(dict(params), optim.AdamW, comm)
    result = {
        "ranks": size,
        "elements": total,
        "allreduce_s": timed(lambda g: distributed.allreduce_mean_(g, comm)),
        "ddp_step_s": timed(lambda g: ddp.step(g)),
        "zero_s": timed(zero.step),
        "zero_state_bytes": comm.allreduce(zero.state_bytes(), op=MPI.MAX),
        "ddp_state_bytes": distributed._state_bytes(ddp.state),
    }
    result["ddp_s"] = result["allreduce_s"] + result["ddp_step_s"]
    if size == 1:  # this machine's bandwidths, all cores: what the model scales from
        fusedopt.set_num_threads(os.cpu_count())
        full = timed(lambda g: ddp.step(g), best=True)
        flat = np.concatenate([p.reshape(-1) for p in params.values()])
        target = np.empty_like(flat)
        copy = timed(lambda g: np.copyto(target, flat), best=True)
        result["kernel_GBps"] = ADAMW_BYTES * total / full / 1e9
        result["copy_GBps"] = COPY_BYTES * total / copy / 1e9
        result["threads"] = os.cpu_count()
    if rank == 0:
        (out / f"job-{size}.json").write_text(json.dumps(result))


def model(kernel: float, copy: float, nodes: int, elements: int = MODEL_ELEMENTS) -> dict:
    """Seconds per step of AdamW over ``elements`` float32 parameters on ``nodes`` nodes, from
    bandwidths in GB/s: ring all-reduce of the gradients then the whole step, against ring
    reduce-scatter + all-gather around a step of 1/N. Both pack the gradients and unpack a
    result (two float32 copies); ZeRO-1 also copies its slice of the parameters in."""
    net = NETWORK_GBPS / 8 * 1e9  # bytes/s
    p_bytes = 4 * elements
    ring = (nodes - 1) / nodes * p_bytes / net + (nodes - 1) * LATENCY_S  # RS or AG
    step = ADAMW_BYTES * elements / (kernel * 1e9)
    copies = 2 * COPY_BYTES * elements / (copy * 1e9)
    ddp = {"comm": 2 * ring, "step": step, "copies": copies}
    zero = {"comm": 2 * ring, "step": step / nodes, "copies": copies * (1 + 0.5 / nodes)}
    return {
        "nodes": nodes,
        "sent_GB": 2 * (nodes - 1) / nodes * p_bytes / 1e9,
        "ddp_s": sum(ddp.values()),
        "zero_s": sum(zero.values()),
        "ddp": ddp,
        "zero": zero,
        # per node: params 4 + grads 4 + state 8 (1/N of it with ZeRO-1) + ZeRO's flat
        # buffer 4, B per element
        "ddp_GB": 16 * elements / 1e9,
        "zero_GB": (8 + 8 / nodes + 4) * elements / 1e9,
    }


def table(jobs: list, models: list, args) -> str:
    one = next(j for j in jobs if j["ranks"] == 1)
    p = one["elements"]
    lines = [
        f"fusedopt {fusedopt.__version__}: `python bench/distributed.py` — AdamW, {p} float32 "
        f"parameters, median of {args.steps} steps; {os.cpu_count()} cores shared by the "
        "ranks, 1 thread each (N = 4 is oversubscribed: the times show overhead, not "
        "speed-up). Sent: bytes each rank sends per step in a ring algorithm, from the "
        "buffer sizes (theory; MPICH picks its own algorithm on one machine).",
        "",
        "| N | sent B/rank, all-reduce 2(N-1)/N·4P | sent B/rank, reduce-scatter + all-gather "
        "| all-reduce ms | DDP step ms (all-reduce + AdamW on P) | ZeRO-1 step ms | state B, "
        "DDP / ZeRO-1 largest rank |",
        "|---|---|---|---|---|---|---|",
    ]
    for j in jobs:
        n = j["ranks"]
        sent = 2 * (n - 1) / n * 4 * j["elements"]
        lines.append(
            f"| {n} | {sent:.3g} | {sent:.3g} | {1e3 * j['allreduce_s']:.1f} | "
            f"{1e3 * j['ddp_s']:.1f} | {1e3 * j['zero_s']:.1f} | "
            f"{j['ddp_state_bytes']} / {j['zero_state_bytes']} |"
        )
    lines += [
        "",
        f"Model: {MODEL_ELEMENTS:.0e} float32 parameters, AdamW, one rank per node, "
        f"{NETWORK_GBPS} Gb/s per node (stated), {1e6 * LATENCY_S:.0f} µs per message; the "
        f"optimizer step at this machine's measured {one['kernel_GBps']:.1f} GB/s "
        f"({ADAMW_BYTES} B per element, {one['threads']} threads) and copies at "
        f"{one['copy_GBps']:.1f} GB/s (best of {args.steps} calls: the machine is shared). "
        "Both move the same bytes; ZeRO-1 steps 1/N of the "
        "elements and keeps 1/N of the state, and holds a float32 buffer of every parameter.",
        "",
        "| nodes | sent GB/node | DDP s (comm + step + copies) | ZeRO-1 s | ZeRO-1 / DDP "
        "time | memory GB/node, DDP / ZeRO-1 |",
        "|---|---|---|---|---|---|",
    ]
    for m in models:
        d, z = m["ddp"], m["zero"]
        lines.append(
            f"| {m['nodes']} | {m['sent_GB']:.2f} | {m['ddp_s']:.2f} ({d['comm']:.2f} + "
            f"{d['step']:.2f} + {d['copies']:.2f}) | {m['zero_s']:.2f} ({z['comm']:.2f} + "
            f"{z['step']:.2f} + {z['copies']:.2f}) | {m['zero_s'] / m['ddp_s']:.2f} | "
            f"{m['ddp_GB']:.1f} / {m['zero_GB']:.1f} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--elements", type=float, default=4e6)
    parser.add_argument("--steps", type=int, default=15)
    parser.add_argument("--job", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results")
    args = parser.parse_args()
    if args.job is not None:
        job(args.job, int(args.elements), args.steps)
        return
    mpiexec = shutil.which("mpiexec", path=os.path.dirname(sys.executable)) or "mpiexec"
    env = dict(os.environ, OMP_NUM_THREADS="1")
    jobs = []
    with tempfile.TemporaryDirectory() as folder:
        for n in SIZES:
            command = [
                mpiexec,
                "-n",
                str(n),
                sys.executable,
                __file__,
                "--job",
                folder,
                "--elements",
                str(args.elements),
                "--steps",
                str(args.steps),
            ]
            subprocess.run(command, check=True, env=env)
            jobs.append(json.loads((Path(folder) / f"job-{n}.json").read_text()))
    one = jobs[0]
    models = [model(one["kernel_GBps"], one["copy_GBps"], n) for n in MODEL_NODES]
    text = table(jobs, models, args)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "distributed.md").write_text(text + "\n")
    (args.out / "distributed.json").write_text(json.dumps({"jobs": jobs, "model": models}))
    print(text)


if __name__ == "__main__":
    main()
