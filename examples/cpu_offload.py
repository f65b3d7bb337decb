"""The ZeRO-Offload pattern with fusedopt.torch.CPUOffload: a small transformer in bfloat16 on
the accelerator (CUDA where there is one, else the CPU), AdamW's state and float32 master
weights in host memory, the step on the host with fusedopt's fused kernel.

    python examples/cpu_offload.py [--steps 60] [--d 256] [--layers 4] [--lr 3e-4]

Prints the loss every 10 steps and the median time of the offloaded step (gradients to host,
fused step, parameters back) against the forward and backward pass.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

import fusedopt.torch as ft


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--d", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--lr", type=float, default=3e-4)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    torch.manual_seed(0)
    layer = torch.nn.TransformerEncoderLayer(
        args.d, nhead=4, dim_feedforward=4 * args.d, batch_first=True
    )
    model = torch.nn.Sequential(
        torch.nn.TransformerEncoder(layer, args.layers), torch.nn.Linear(args.d, 1)
    ).to(device, torch.bfloat16)
    offload = ft.CPUOffload(model.parameters(), ft.AdamW, lr=args.lr, weight_decay=0.01)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(offload.optimizer, T_max=args.steps)
    # a learnable target: the mean of a fixed random projection of the sequence
    x = torch.randn(32, 16, args.d, device=device, dtype=torch.bfloat16)
    y = (x.float() @ torch.randn(args.d, 1, device=device) / args.d**0.5).mean(1)
    losses, forward_backward, steps = [], [], []
    for t in range(args.steps):
        sync()
        t0 = time.perf_counter()
        loss = torch.nn.functional.mse_loss(model(x).float().mean(1), y)
        loss.backward()
        sync()
        t1 = time.perf_counter()
        offload.step()
        sync()
        t2 = time.perf_counter()
        offload.zero_grad()
        sched.step()
        losses.append(loss.item())
        forward_backward.append(t1 - t0)
        steps.append(t2 - t1)
        if t % 10 == 0 or t == args.steps - 1:
            print(f"step {t:4d}  loss {loss.item():.4f}")
    params = sum(p.numel() for p in model.parameters())
    result = {
        "device": str(device),
        "parameters": params,
        "first_loss": losses[0],
        "last_loss": losses[-1],
        "forward_backward_ms": 1e3 * statistics.median(forward_backward[5:]),
        "offloaded_step_ms": 1e3 * statistics.median(steps[5:]),
    }
    print(
        f"{params:,} bfloat16 parameters on {device}; AdamW state and masters on the host: "
        f"{12 * params / 2**20:.1f} MiB. Median step {result['offloaded_step_ms']:.2f} ms, "
        f"forward + backward {result['forward_backward_ms']:.2f} ms"
    )
    return result


if __name__ == "__main__":
    main()
