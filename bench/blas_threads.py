"""A fusedopt step right after NumPy's matrix products: what BLAS's idle threads cost it, and
what each remedy in the README's "Threads and processes" gives back.

    python bench/blas_threads.py [--rounds 3] [--steps 400] [--batch 128] [--state float32]
        [--optimizer Adam]
    python bench/blas_threads.py --sizes
    python bench/blas_threads.py --pauses

NumPy's OpenBLAS keeps its worker threads spinning for a while after each matrix product. A
fusedopt step that starts then finds its OpenMP threads sharing cores with them, and each
parallel region waits for the scheduler to run the thread that is behind: a time slice.
fusedopt notices a region whose worker started late and, for a while, runs the calls below 4Mi
elements times p / (p - 1) (p threads) on the calling thread (the README's "Threads and
processes"). This trains an MLP on scikit-learn's digits (64-256-256-10, ReLU, softmax
cross-entropy, backprop by hand in NumPy, `fusedopt.optim.Adam` or --optimizer's class) under
each setting below, each in a fresh process (environment variables are read when a library
loads), the settings in turn for --rounds rounds:

- default: nothing set;
- not adapting: fusedopt's late-worker rule off (`fusedopt.set_adaptive_threads(False)`), as
  before it had one;
- `OPENBLAS_NUM_THREADS=1`: BLAS on the calling thread;
- `OPENBLAS_THREAD_TIMEOUT=4`: BLAS's workers sleep after 2**4 ticks of waiting, not 2**28;
- `fusedopt.set_num_threads(1)`: fusedopt on the calling thread;
- `OMP_WAIT_POLICY=passive`: fusedopt's OpenMP threads sleep at once when idle;
- `threadpool_limits(1, "blas")` (threadpoolctl) around each forward and backward pass.

It prints, per setting, the median over the run's steps of the optimizer step, of the forward
and backward pass and of the whole iteration, in microseconds, one column per round (rounds
are minutes apart on a shared machine); and each setting's parameters after the run are
checked to be the same bits as the default's (fusedopt's results do not depend on threads).

With --sizes it times instead one `fusedopt.adam_` call on float32 arrays of 2**18 to 10**7
elements, right after a matrix product (a (128, 256) by (256, 256) one) and with none before
it, on all threads and on one, with the late-worker rule off: where the time a late worker
loses outweighs what the other cores save, which sets the size below which the rule runs
calls on one thread (`_core.get_busy_parallel_min()`).

With --pauses it times one `fusedopt.adam_` call of 1e5 elements after a pause of 5, 20 and
50 ms with nothing else running, 40 times each, with the rule and without: how often an idle
worker starts late on its own (run it under OMP_WAIT_POLICY=passive too).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from contextlib import nullcontext
from typing import Any, Callable, Dict, List

SETTINGS: Dict[str, Dict[str, str]] = {
    "default": {},
    "not adapting": {},
    "OPENBLAS_NUM_THREADS=1": {"OPENBLAS_NUM_THREADS": "1"},
    "OPENBLAS_THREAD_TIMEOUT=4": {"OPENBLAS_THREAD_TIMEOUT": "4"},
    "fusedopt.set_num_threads(1)": {},
    "OMP_WAIT_POLICY=passive": {"OMP_WAIT_POLICY": "passive"},
    'threadpool_limits(1, "blas") around the passes': {},
}
# set by the parent for every child, so that only the setting differs
CLEARED = ("OPENBLAS_NUM_THREADS", "OPENBLAS_THREAD_TIMEOUT", "OMP_WAIT_POLICY", "OMP_NUM_THREADS")


def child(setting: str, steps: int, batch: int, state: str, optimizer: str) -> Dict[str, Any]:
    """Train under `setting` in this process; the medians (µs) and a digest of the params."""
    import hashlib

    import numpy as np
    from sklearn.datasets import load_digits

    import fusedopt
    from fusedopt import optim

    if setting == "fusedopt.set_num_threads(1)":
        fusedopt.set_num_threads(1)
    if setting == "not adapting":
        fusedopt.set_adaptive_threads(False)
    limit: Callable[[], Any] = nullcontext
    if setting.startswith("threadpool_limits"):
        from threadpoolctl import threadpool_limits

        def limit() -> Any:
            return threadpool_limits(1, "blas")

    digits = load_digits()
    x, y = (digits.data / 16.0).astype(np.float32), digits.target
    rng = np.random.default_rng(0)
    sizes = (64, 256, 256, 10)
    params = {}
    for i, (n_in, n_out) in enumerate(zip(sizes[:-1], sizes[1:]), 1):
        params[f"W{i}"] = (rng.standard_normal((n_in, n_out)) * np.sqrt(2 / n_in)).astype(
            np.float32
        )
        params[f"b{i}"] = np.zeros(n_out, np.float32)
    options = {} if state == "float32" else {"state_dtype": state}
    opt = getattr(optim, optimizer)(params, lr=1e-3, **options)
    layers = len(sizes) - 1

    def grads(xb: np.ndarray, yb: np.ndarray) -> Dict[str, np.ndarray]:
        activations = [xb]
        for i in range(1, layers):
            activations.append(np.maximum(activations[-1] @ params[f"W{i}"] + params[f"b{i}"], 0))
        logits = activations[-1] @ params[f"W{layers}"] + params[f"b{layers}"]
        p = np.exp(logits - logits.max(axis=1, keepdims=True))
        d = p / p.sum(axis=1, keepdims=True)
        d[np.arange(len(yb)), yb] -= 1
        d /= len(yb)
        g = {}
        for i in range(layers, 0, -1):
            g[f"W{i}"], g[f"b{i}"] = activations[i - 1].T @ d, d.sum(0)
            if i > 1:
                d = (d @ params[f"W{i}"].T) * (activations[i - 1] > 0)
        return g

    order = rng.permutation(np.resize(np.arange(len(y)), (steps + 1) * batch))
    passes, updates, whole = [], [], []
    for s in range(steps + 1):
        index = order[s * batch : (s + 1) * batch]
        t0 = time.perf_counter()
        with limit():
            g = grads(x[index], y[index])
        t1 = time.perf_counter()
        opt.step(g)
        t2 = time.perf_counter()
        if s:  # the first builds the state
            passes.append(t1 - t0)
            updates.append(t2 - t1)
            whole.append(t2 - t0)
    digest = hashlib.sha256(b"".join(params[k].tobytes() for k in sorted(params))).hexdigest()
    return {
        "step": statistics.median(updates) * 1e6,
        "passes": statistics.median(passes) * 1e6,
        "iteration": statistics.median(whole) * 1e6,
        "params": digest[:16],
        "parameters": sum(p.size for p in params.values()),
    }


def sizes() -> None:
    """The --sizes table: median ms of one Adam call, after a matrix product and without."""
    import numpy as np

    import fusedopt
    from fusedopt import _core

    fusedopt.set_adaptive_threads(False)
    threads = fusedopt.get_num_threads()
    rng = np.random.default_rng(0)
    a, b = rng.standard_normal((128, 256), np.float32), rng.standard_normal((256, 256), np.float32)
    print(
        f"fusedopt {fusedopt.__version__}, {os.cpu_count()} CPUs, float32 Adam, one call, median "
        f"ms. While the cores are busy, the rule runs a call of {threads} threads on one below "
        f"{_core.get_busy_parallel_min() * threads // max(threads - 1, 1):,} elements\n"
    )
    columns = [(threads, True), (1, True), (threads, False), (1, False)]
    names = [
        f"{t} thread{'s' * (t > 1)}, {'after a product' if p else 'none before'}"
        for t, p in columns
    ]
    print("| elements | " + " | ".join(names) + " |\n|---|" + "---|" * len(columns))
    for n in (1 << 18, 1 << 20, 1 << 21, 1 << 22, 1 << 23, 10**7):
        param, grad, m = rng.standard_normal((3, n), np.float32)
        v = np.abs(m)
        times = []
        for t, product in columns:
            fusedopt.set_num_threads(t)
            time.sleep(0.5)  # BLAS's threads, spinning after the last column's products, sleep
            calls = []
            for _ in range(max(7, 3 * 10**7 // n)):
                if product:
                    a @ b
                start = time.perf_counter()
                fusedopt.adam_(param, grad, m, v, step=1)
                calls.append(time.perf_counter() - start)
            times.append(statistics.median(calls) * 1e3)
        print(f"| {n:,} | " + " | ".join(f"{ms:.2f}" for ms in times) + " |")
    fusedopt.set_num_threads(None)


def pauses() -> None:
    """The --pauses table: one call after a pause, with the rule off and on."""
    import numpy as np

    import fusedopt

    n, calls = 10**5, 40
    param, grad, m = np.random.default_rng(0).standard_normal((3, n), np.float32)
    v = np.abs(m)
    print(
        f"fusedopt {fusedopt.__version__}, {os.cpu_count()} CPUs, {fusedopt.get_num_threads()} "
        f"threads, OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY', '(unset)')}; float32 Adam "
        f"of {n:,} elements after each pause, {calls} calls: median and 80th percentile (ms), "
        "calls over 1 ms\n"
    )
    print("| pause | rule | median | 80th percentile | over 1 ms |\n|---|---|---|---|---|")
    for pause in (0.005, 0.02, 0.05):
        for rule in ("off", "on"):
            fusedopt.set_adaptive_threads(rule == "on")
            fusedopt.adam_(param, grad, m, v, step=1)
            times = []
            for _ in range(calls):
                time.sleep(pause)
                start = time.perf_counter()
                fusedopt.adam_(param, grad, m, v, step=1)
                times.append(time.perf_counter() - start)
            times.sort()
            print(
                f"| {pause * 1e3:.0f} ms | {rule} | {statistics.median(times) * 1e3:.3f} | "
                f"{times[int(0.8 * calls)] * 1e3:.3f} | {sum(t > 1e-3 for t in times)} |"
            )
    fusedopt.set_adaptive_threads(True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=400)
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--state", default="float32", help="the optimizer's state_dtype")
    parser.add_argument("--optimizer", default="Adam", help="a class of fusedopt.optim")
    parser.add_argument("--sizes", action="store_true", help="one call's time by size instead")
    parser.add_argument("--pauses", action="store_true", help="one call after a pause instead")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.sizes:
        sizes()
        return
    if args.pauses:
        pauses()
        return
    if args.child:
        print(json.dumps(child(args.child, args.steps, args.batch, args.state, args.optimizer)))
        return

    import fusedopt

    results: Dict[str, List[Dict[str, Any]]] = {name: [] for name in SETTINGS}
    for _ in range(args.rounds):
        for name, env in SETTINGS.items():
            environ = {k: v for k, v in os.environ.items() if k not in CLEARED}
            environ.update(env)
            command = [sys.executable, __file__, "--child", name, "--steps", str(args.steps)]
            command += ["--batch", str(args.batch), "--state", args.state]
            command += ["--optimizer", args.optimizer]
            out = subprocess.run(command, env=environ, check=True, capture_output=True, text=True)
            results[name].append(json.loads(out.stdout))
    first = results["default"][0]
    print(
        f"fusedopt {fusedopt.__version__}, {os.cpu_count()} CPUs, digits MLP 64-256-256-10 "
        f"({first['parameters']:,} parameters), {args.optimizer} with {args.state} state, batch "
        f"{args.batch}, median of {args.steps} steps per run; µs, one column per round\n"
    )
    header = "| setting | step | forward and backward | iteration | params as default's |"
    print(header + "\n|---|---|---|---|---|")
    for name, runs in results.items():
        same = all(r["params"] == first["params"] for r in runs)

        def cells(key: str) -> str:
            return ", ".join(f"{r[key]:.0f}" for r in runs)  # noqa: B023

        row = [name, cells("step"), cells("passes"), cells("iteration"), "yes" if same else "NO"]
        print("| " + " | ".join(row) + " |")


if __name__ == "__main__":
    main()
