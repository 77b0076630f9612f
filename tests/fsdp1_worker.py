"""FSDP1 (torch's ``FullyShardedDataParallel``, what Fabric's ``strategy="fsdp"`` builds on GPUs) handed to the
``DSD`` engine over 2 gloo CPU processes, run by test_user_code.py in a fresh interpreter. Uneven flat shards:
the model has an odd number of parameters. Each rank tries ``DSD`` on the wrapped model and on the module FSDP1
wraps, and writes the refusals and whether any weight changed to ``<out>/rank<r>.pt``."""

from __future__ import annotations

import argparse
import os

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn
from torch.distributed.fsdp import FullyShardedDataParallel

from lightning_dsd import DSD


def run(rank: int, out: str, port: int) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    torch.manual_seed(0)
    model = FullyShardedDataParallel(
        nn.Sequential(nn.Linear(5, 7), nn.ReLU(), nn.Linear(7, 3)), use_orig_params=True, device_id=torch.device("cpu")
    )
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    before = [p.detach().clone() for p in model.parameters()]
    refused = {}
    for label, handed in (("wrapped", model), ("inner", model.module)):
        try:
            DSD(handed, optimizer, 0.5, 0, 1, 1)
        except ValueError as error:
            refused[label] = str(error)
    unchanged = all(torch.equal(a, b) for a, b in zip(before, model.parameters(), strict=True))
    torch.save({"refused": refused, "unchanged": unchanged}, os.path.join(out, f"rank{rank}.pt"))
    dist.barrier()
    dist.destroy_process_group()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    with __import__("socket").socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    mp.spawn(run, args=(args.out, port), nprocs=2)


if __name__ == "__main__":
    main()
