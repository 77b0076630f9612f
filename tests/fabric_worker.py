"""``DSD`` in a Lightning Fabric loop over 2 gloo CPU processes, run by test_fabric.py in a fresh interpreter
(Fabric re-executes the launching command for the other rank).

Strategies: ``ddp`` (``fabric.setup(model, optimizer)``), ``fsdp`` (Fabric's ``ModelParallelStrategy``: the
first layer gets its own ``fully_shard`` group, the others are the root's, which FSDP2 keeps gathered after
the evaluation forward run after every step; ``fabric.setup(model)`` + ``fabric.setup_optimizers``) and ``tp``
(the same strategy, tensor parallel: column- then row-wise, the last layer plain; every rank sees all data). Each
rank writes to ``<out>/rank<r>.pt``: full weights at the end of the dense phase, the full masks, whether
every pruned entry was zero after every optimizer step and in every forward pass (read where the forward
uses the weight), the learning rates and the final full weights. ``--save-at 1`` saves a checkpoint with
``fabric.save`` mid-sparse; ``--resume`` loads it into fresh objects with ``fabric.load``.
"""

from __future__ import annotations

import argparse
import os
from functools import partial

import torch
from lightning.fabric import Fabric
from lightning.fabric.strategies import DDPStrategy, ModelParallelStrategy
from torch import nn
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module
from torch.optim.optimizer import register_optimizer_step_post_hook
from torch.utils.data import DataLoader, TensorDataset
from torch.utils.tensorboard import SummaryWriter

from lightning_dsd import DSD, Phase
from lightning_dsd.rules.sharding import FullMasks, full_tensor, local_part

EPOCHS = 4  # dense 1, sparse 2, re-dense 1


def shard_first_layer_and_root(model: nn.Module, device_mesh) -> nn.Module:
    mesh = device_mesh["data_parallel"]
    fully_shard(model[0], mesh=mesh)
    fully_shard(model, mesh=mesh)  # model[2] and model[4] are the root's
    return model


def tensor_parallel_first_two_layers(model: nn.Module, device_mesh) -> nn.Module:
    plan = {"0": ColwiseParallel(), "2": RowwiseParallel()}  # model[4] stays a plain tensor
    return parallelize_module(model, device_mesh["tensor_parallel"], plan)


def build(strategy_name: str, fabric: Fabric):
    torch.manual_seed(3)
    model = nn.Sequential(nn.Linear(12, 10), nn.ReLU(), nn.Linear(10, 7), nn.ReLU(), nn.Linear(7, 1))
    if strategy_name == "ddp":
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.05)
        model, optimizer = fabric.setup(model, optimizer)
    else:
        model = fabric.setup(model)
        optimizer = fabric.setup_optimizers(torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.05))
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=1, gamma=0.9)
    return model, optimizer, scheduler


class Record:
    """What every rank sees: pruned entries after each optimizer step and in each forward pass."""

    def __init__(self, model: nn.Module, dsd: DSD) -> None:
        self.dsd = dsd
        self.steps: list[tuple[str, bool]] = []
        self.forwards: list[tuple[str, bool, bool]] = []
        self.lrs: list[float] = []
        self.phases: list[str] = []
        self.full_masks: dict = {}
        register_optimizer_step_post_hook(self._after_step)
        for name in dsd.target_names:
            module_name, _, attribute = name.rpartition(".")
            module = model.get_submodule(module_name)
            module.register_forward_pre_hook(partial(self._before_forward, name=name, attribute=attribute))

    def _after_step(self, optimizer, args, kwargs) -> None:
        targets = self.dsd.selection.selected
        zeros = all(bool((local_part(targets[n])[~keep] == 0).all()) for n, keep in self.dsd.masks.items())
        self.steps.append((self.dsd.phase.value, zeros))

    def _before_forward(self, module, args, *, name, attribute) -> None:
        used = full_tensor(getattr(module, attribute))  # FSDP2's gathered weight, what the forward computes with
        stored = full_tensor(self.dsd.selection.selected[name])
        pruned_zero = True
        if self.dsd.phase is Phase.SPARSE:
            if self.dsd.cycle not in self.full_masks:
                self.full_masks[self.dsd.cycle] = dict(FullMasks(self.dsd.masks, self.dsd.selection.selected))
            pruned_zero = bool((used[~self.full_masks[self.dsd.cycle][name]] == 0).all())
        self.forwards.append((self.dsd.phase.value, torch.equal(used, stored), pruned_zero))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--strategy", choices=["ddp", "fsdp", "tp"], required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--save-at", type=int, default=None, help="fabric.save after this many epochs")
    parser.add_argument("--resume", default=None)
    parser.add_argument("--writer", action="store_true", help="a SummaryWriter on rank 0 only, None elsewhere")
    parser.add_argument("--convergence", action="store_true",
                        help="a sparse phase that ends when the metric, given on rank 0 only, stops improving")
    args = parser.parse_args()

    layouts = {"fsdp": (shard_first_layer_and_root, 2, 1), "tp": (tensor_parallel_first_two_layers, 1, 2)}
    strategy = DDPStrategy() if args.strategy == "ddp" else ModelParallelStrategy(*layouts[args.strategy])
    fabric = Fabric(accelerator="cpu", devices=2, strategy=strategy)
    fabric.launch()
    model, optimizer, scheduler = build(args.strategy, fabric)
    writer = SummaryWriter(os.path.join(args.out, "tb")) if args.writer and fabric.global_rank == 0 else None
    dsd = DSD(model, optimizer, 0.5, dense_epochs=1, sparse_epochs=None if args.convergence else 2, redense_epochs=1,
              schedulers=[scheduler], writer=writer, patience=1, histogram_every_n_epochs=1)
    record = Record(model, dsd)
    first_epoch = 0
    if args.resume is not None:
        state = {"model": model, "optimizer": optimizer, "scheduler": scheduler, "dsd": dsd}
        fabric.load(args.resume, state)
        # ModelParallelStrategy's sharded checkpoint hands back the saved state of everything but the model and
        # optimizers instead of restoring it: the one line the docs show.
        for name, obj in (("scheduler", scheduler), ("dsd", dsd)):
            if state[name] is not obj:
                obj.load_state_dict(state[name])
        first_epoch = dsd.elapsed
        record.steps.clear()  # torch's set_optimizer_state_dict takes a step of zero gradients to build the state

    generator = torch.Generator().manual_seed(0)
    x = torch.randn(64, 12, generator=generator)
    loader = fabric.setup_dataloaders(DataLoader(TensorDataset(x, x[:, :3].sum(dim=1)), batch_size=8))
    out: dict = {}
    for epoch in range(first_epoch, EPOCHS):
        for inputs, targets in loader:
            optimizer.zero_grad()
            fabric.backward(nn.functional.mse_loss(model(inputs).squeeze(-1), targets))
            optimizer.step()
            with torch.no_grad():  # an evaluation forward between steps: FSDP2's root stays gathered
                model(inputs)
        scheduler.step()
        if dsd.phase is Phase.DENSE:
            out["dense_end"] = {n: full_tensor(p).clone() for n, p in dsd.selection.selected.items()}
        # --convergence: the metric exists on rank 0 only (1.0 every epoch: converged after one flat check)
        dsd.step(1.0 if args.convergence and fabric.global_rank == 0 else None)
        record.lrs.append(optimizer.param_groups[0]["lr"])
        record.phases.append(dsd.phase.value)
        if dsd.phase is Phase.SPARSE and "masks" not in out:
            out["masks"] = {n: m.clone() for n, m in FullMasks(dsd.masks, dsd.selection.selected).items()}
        if args.save_at == epoch + 1:
            fabric.save(os.path.join(args.out, "mid_sparse.ckpt"),
                        {"model": model, "optimizer": optimizer, "scheduler": scheduler, "dsd": dsd})
        if dsd.finished:
            break

    out.update(
        steps=record.steps, forwards=record.forwards, lrs=record.lrs, phases=record.phases, finished=dsd.finished,
        names=dsd.target_names, final={n: full_tensor(p).clone() for n, p in dsd.selection.selected.items()},
        sharded={n: type(p).__name__ for n, p in dsd.selection.selected.items()},
    )
    if writer is not None:
        writer.close()
    torch.save(out, os.path.join(args.out, f"rank{fabric.global_rank}.pt"))
    # Leave together: a process group left to the interpreter's exit can abort it ("terminate called without
    # an active exception") while gloo's threads still run.
    fabric.barrier()
    torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
