"""The cost of ``importance="obd"``'s gradient window, side by side in one run: the optimizer step of a plain
model, of the same model under ``DSD(importance="obd")`` outside its window (dense, before it: no hook), and
inside it (the step post-hook adds each weight's squared gradient to a float32 sum).

    python benchmarks/importance_window.py            # MLP 3x1024, batch 64, SGD momentum, CPU
    python benchmarks/importance_window.py --device cuda

Rounds interleave the three set-ups (``--rounds`` rounds of ``--steps`` steps each); each figure is the median
over rounds of the per-round median step time, and the ratios are per round, medians over rounds.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from torch import nn

from lightning_dsd import DSD


def mlp(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(1024, 1024), nn.ReLU(), nn.Linear(1024, 1024), nn.ReLU(), nn.Linear(1024, 1024))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--steps", type=int, default=20)
    args = parser.parse_args()
    device = torch.device(args.device)
    setups = {}
    for name in ("plain", "outside the window", "inside the window"):
        model = mlp(0).to(device)
        optimizer = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)
        if name != "plain":  # a dense phase of 10**9 steps: the window (all of it, or its last step) open or not
            dsd = DSD(model, optimizer, 0.5, 10**9, 1, 1, interval="step", importance="obd",
                      importance_steps=10**9 if name == "inside the window" else 1, log_histograms=False,
                      log_scalars=False)
            assert bool(dsd._engine.window_is_due(0)) is (name == "inside the window")
        setups[name] = (model, optimizer)
    x = torch.randn(64, 1024, device=device)

    def step(model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
        optimizer.zero_grad()
        model(x).square().mean().backward()
        optimizer.step()

    times: dict[str, list[float]] = {name: [] for name in setups}
    for _ in range(args.rounds):
        for name, (model, optimizer) in setups.items():
            step(model, optimizer)  # warm
            per_step = []
            for _ in range(args.steps):
                if device.type == "cuda":
                    torch.cuda.synchronize()
                started = time.perf_counter()
                step(model, optimizer)
                if device.type == "cuda":
                    torch.cuda.synchronize()
                per_step.append(time.perf_counter() - started)
            times[name].append(statistics.median(per_step))
    print(f"MLP 3x1024 (3.1M weights targeted), batch 64, SGD momentum, {device.type}, torch {torch.__version__};"
          f" {args.rounds} rounds x {args.steps} steps\n")
    print("| set-up | step (ms) | ratio to plain |\n|---|---|---|")
    for name, values in times.items():
        ratio = statistics.median(v / p for v, p in zip(values, times["plain"], strict=True))
        print(f"| {name} | {statistics.median(values) * 1e3:.2f} | {ratio:.3f} |")


if __name__ == "__main__":
    main()
