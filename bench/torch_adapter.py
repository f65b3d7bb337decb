"""fusedopt.torch.Adam against torch.optim.Adam(fused=True) on a transformer-shaped model of 240
tensors (24 blocks of 10: qkv, out projection, two MLP matrices, their biases, a LayerNorm), at
d = 64 (1.2 M parameters) and d = 256 (19 M), float32 and all-bfloat16, in one run; d = 1 (552
parameters) measures what the adapter adds to a step.

Each row times, in interleaved blocks of steps (so that a shared machine's drift hits every
implementation alike), the median step of:
- ``torch fused``: ``torch.optim.Adam(fused=True)`` (bfloat16: torch keeps bfloat16 state);
- ``fusedopt.torch``: ``fusedopt.torch.Adam``, gradients persisting between steps
  (``zero_grad(set_to_none=False)`` or gradient accumulation);
- ``fusedopt.torch, new grads``: the same with new gradient tensors every step, as after
  ``zero_grad()`` (set_to_none=True, torch's default): torch's guard checks every gradient and
  their memory is lent to the kernel (``_core._borrow``). The tensors are three sets of
  aliases of one gradient memory, cycled, so that no set is seen at two steps running (as
  after ``zero_grad()``; two alternating sets would let the adapter reuse one set's views)
  and the memory traffic is that of the other rows;
- ``list call``: ``fusedopt.adam_`` on the cached NumPy views, the floor the adapter adds to.
The adapter's overhead per step is its time less the list call's. With ``--breakdown``, more
rows time the new-gradients step without lending and its parts alone (same interleaved
blocks):
- ``new grads, NumPy views``: the new-gradients step with lending off, every gradient
  converted to a NumPy view (the path before lending, and still that of the options that
  need views: skip_if_nonfinite, max_grad_norm, the reference implementation);
- ``new grads: borrowed``: the adapter's check and lending of the 240 new gradients
  (``Optimizer._grad_views`` with ``borrow``: torch's guard, ``_core._borrow``, weak
  references);
- ``new grads: views``: their conversion to checked NumPy views instead (``Tensor.numpy()``,
  the layout check, weak references);
- ``new grads: Tensor.numpy``: the ``Tensor.numpy()`` calls alone.

    python bench/torch_adapter.py [--blocks 15] [--steps 20] [--d 1 64 256] [--threads N]
                                  [--breakdown]
Results: bench/results/torch_adapter.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time

import torch

import fusedopt
import fusedopt.torch as ft

HERE = os.path.dirname(os.path.abspath(__file__))


def shapes(d: int):
    """The 240 tensors' shapes: 24 blocks of a pre-LayerNorm transformer layer."""
    block = [(3 * d, d), (3 * d,), (d, d), (d,), (d,), (d,), (4 * d, d), (4 * d,), (d, 4 * d), (d,)]
    return block * 24


def model(d: int, dtype: torch.dtype, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    params = [torch.randn(s, generator=g).to(dtype).requires_grad_() for s in shapes(d)]
    grads = [torch.randn(s, generator=g).mul_(1e-2).to(dtype) for s in shapes(d)]
    return params, grads


def implementations(d: int, dtype: torch.dtype, breakdown: bool = False):
    """name -> a function doing one step, each on its own copy of the model."""
    out = {}
    params, grads = model(d, dtype)
    opt = torch.optim.Adam(params, lr=1e-3, fused=True)
    for p, g in zip(params, grads):
        p.grad = g
    out["torch fused"] = opt.step

    options = {"state_dtype": "bfloat16"} if dtype == torch.bfloat16 else {}
    params, grads = model(d, dtype)
    opt = ft.Adam(params, lr=1e-3, **options)
    for p, g in zip(params, grads):
        p.grad = g
    out["fusedopt.torch"] = opt.step
    opt.step()  # state created, views cached
    entry = next(iter(opt._groups.values()))
    call = entry.calls[0]
    views = opt._grad_views(entry, call, grads)
    arrays = call.buffers
    counter = [int(call.steps[0])]

    def list_call(call=call, views=views, arrays=arrays, counter=counter):
        counter[0] += 1
        fusedopt.adam_(
            call.params,
            views,
            arrays["exp_avg"],
            arrays["exp_avg_sq"],
            step=counter[0],
            lr=1e-3,
        )

    out["list call"] = list_call

    params, grads = model(d, dtype)
    opt2 = ft.Adam(params, lr=1e-3, **options)
    sets = [grads] + [[g.detach() for g in grads] for _ in range(2)]  # new tensor objects
    flip = [0]

    def new_grads(params=params, opt=opt2, sets=sets, flip=flip):
        # zero_grad() then backward: the step sees new gradient tensors (here the next of
        # three sets of aliases; assigning 240 references is timed too, and subtracted)
        flip[0] = (flip[0] + 1) % len(sets)
        for p, g in zip(params, sets[flip[0]]):
            p.grad = g
        opt.step()

    out["fusedopt.torch, new grads"] = new_grads
    if breakdown:
        params3, _ = model(d, dtype)
        opt3 = ft.Adam(params3, lr=1e-3, **options)
        opt3._borrows = False  # every new gradient viewed through Tensor.numpy()
        flip3 = [0]

        def new_grads_views(params=params3, opt=opt3, sets=sets, flip=flip3):
            flip[0] = (flip[0] + 1) % len(sets)
            for p, g in zip(params, sets[flip[0]]):
                p.grad = g
            opt.step()

        out["new grads, NumPy views"] = new_grads_views
        new_grads()  # state and calls made
        entry2 = next(iter(opt2._groups.values()))
        call2 = entry2.calls[0]

        def borrowed(sets=sets, flip=flip, opt=opt2, entry=entry2, call=call2):
            flip[0] = (flip[0] + 1) % len(sets)
            opt._grad_views(entry, call, sets[flip[0]], True)

        out["new grads: borrowed"] = borrowed

        def views(sets=sets, flip=flip, opt=opt2, entry=entry2, call=call2):
            flip[0] = (flip[0] + 1) % len(sets)
            opt._grad_views(entry, call, sets[flip[0]])

        def conversions(sets=sets, flip=flip, convert=call2.convert):
            flip[0] = (flip[0] + 1) % len(sets)
            list(map(convert, sets[flip[0]]))

        out["new grads: views"] = views
        out["new grads: Tensor.numpy"] = conversions
    return out


def assign_cost(d: int, dtype: torch.dtype, repeats: int = 200) -> float:
    """Seconds to assign 240 gradients (part of the 'new grads' row, not of a step)."""
    params, grads = model(d, dtype)
    t0 = time.perf_counter()
    for _ in range(repeats):
        for p, g in zip(params, grads):
            p.grad = g
    return (time.perf_counter() - t0) / repeats


def measure(d: int, dtype: torch.dtype, blocks: int, steps: int, breakdown: bool = False):
    impls = implementations(d, dtype, breakdown)
    for f in impls.values():  # warm up
        for _ in range(3):
            f()
    times = {name: [] for name in impls}
    for _ in range(blocks):
        for name, f in impls.items():
            f()  # untimed: the previous implementation's OpenMP threads may still be spinning
            t0 = time.perf_counter()
            for _ in range(steps):
                f()
            times[name].append((time.perf_counter() - t0) / steps)
    med = {name: statistics.median(v) for name, v in times.items()}
    assign = assign_cost(d, dtype)
    med["fusedopt.torch, new grads"] -= assign
    if "new grads, NumPy views" in med:
        med["new grads, NumPy views"] -= assign
    return med, times


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--blocks", type=int, default=15)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--d", type=int, nargs="+", default=[1, 64, 256])
    parser.add_argument("--out", default=os.path.join(HERE, "results", "torch_adapter"))
    parser.add_argument(
        "--threads", type=int, default=None, help="threads of torch and of fusedopt alike"
    )
    parser.add_argument(
        "--breakdown", action="store_true", help="also time the new gradients' conversion"
    )
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
        fusedopt.set_num_threads(args.threads)
    rows = []
    for dtype in (torch.float32, torch.bfloat16):
        for d in args.d:
            med, times = measure(d, dtype, args.blocks, args.steps, args.breakdown)
            n = sum(torch.Size(s).numel() for s in shapes(d))
            base = med["torch fused"]
            row = {
                "dtype": str(dtype).replace("torch.", ""),
                "d": d,
                "tensors": len(shapes(d)),
                "elements": n,
                "median_s": med,
                "ratio_to_torch_fused": {k: v / base for k, v in med.items()},
                "adapter_overhead_s": med["fusedopt.torch"] - med["list call"],
                "new_grads_overhead_s": med["fusedopt.torch, new grads"] - med["list call"],
                "blocks_s": times,
            }
            rows.append(row)
            print(
                f"{row['dtype']:8s} d={d:4d} "
                + "  ".join(f"{k}: {v * 1e3:.3f} ms ({v / base:.2f}x)" for k, v in med.items())
            )
    result = {
        "machine": {
            "platform": platform.platform(),
            "processor": platform.processor(),
            "cpus": os.cpu_count(),
            "torch": torch.__version__,
            "torch_threads": torch.get_num_threads(),
            "fusedopt_threads": fusedopt.get_num_threads(),
            "fusedopt_level": fusedopt._LEVEL,
        },
        "load_average": os.getloadavg(),
        "command": " ".join(["python", "bench/torch_adapter.py", *(argv or sys.argv[1:])]),
        "blocks": args.blocks,
        "steps_per_block": args.steps,
        "rows": rows,
    }
    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    with open(args.out + ".json", "w") as f:
        json.dump(result, f, indent=1)
    with open(args.out + ".md", "w") as f:
        f.write(markdown(result))


def markdown(result) -> str:
    names = list(result["rows"][0]["median_s"])
    lines = [
        "# fusedopt.torch.Adam vs torch.optim.Adam(fused=True), 240 tensors",
        "",
        f"{result['machine']}",
        "",
        f"`{result['command']}`; load average at the end {result['load_average']}."
        if "command" in result
        else "",
        "",
        f"Medians of {result['blocks']} interleaved blocks of {result['steps_per_block']} steps; "
        "ratio to torch fused in brackets. bfloat16: params and grads bfloat16; fusedopt with "
        "state_dtype='bfloat16' (torch's fused Adam keeps bfloat16 state too).",
        "",
        "| dtype | d | elements | " + " | ".join(names) + " | adapter overhead | with new grads |",
        "|---" * (len(names) + 5) + "|",
    ]
    for r in result["rows"]:
        cells = [
            f"{r['median_s'][k] * 1e3:.3f} ms ({r['ratio_to_torch_fused'][k]:.2f}x)" for k in names
        ]
        lines.append(
            f"| {r['dtype']} | {r['d']} | {r['elements']:,} | "
            + " | ".join(cells)
            + f" | {r['adapter_overhead_s'] * 1e6:.0f} us"
            + f" | {r['new_grads_overhead_s'] * 1e6:.0f} us |"
        )
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
