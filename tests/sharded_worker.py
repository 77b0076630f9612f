"""DSD on sharded models under ``ModelParallelStrategy`` (gloo, CPU processes), run by test_sharded_training.py in
a fresh interpreter (the strategy re-executes the launching command for the other ranks).

Layouts: ``fsdp`` (FSDP2 ``fully_shard`` over 2 ranks, uneven shards: the one-row output weight leaves rank 1
none), ``tp`` (``ColwiseParallel``/``RowwiseParallel`` over 2 ranks, plus one plain layer, all built in
``configure_model``), ``2d`` (tensor parallel inside FSDP2 on a 2 x 2 mesh, 4 ranks), ``gpt2`` (a
``transformers`` GPT-2 under FSDP2, 2 ranks). Each rank writes what it saw to ``<out>/rank<r>.pt``: full
weights at the ends of the dense and sparse phases and at the start of re-dense, the full masks, a check of
every pruned entry after every optimizer step, of the optimizer state at pruned entries, the learning rates
and the final full weights.
"""

from __future__ import annotations

import argparse
import os
from functools import partial

import lightning.pytorch as pl
import torch
import transformers
from helpers import seeded  # beside this script
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.strategies import ModelParallelStrategy
from torch import nn
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import DTensor
from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module
from torch.optim.optimizer import register_optimizer_step_post_hook
from torch.utils.data import DataLoader, TensorDataset

from lightning_dsd import DSDCallback, Phase
from lightning_dsd.rules.sharding import FullMasks, full_tensor, local_part

MESHES = {"fsdp": (2, 1), "fsdp_root": (2, 1), "tp": (1, 2), "2d": (2, 2), "gpt2": (2, 1)}


class ShardedNet(pl.LightningModule):
    """12 -> 10 -> 7 -> 1: FSDP2 shards 7 rows 4/3 and the one-row output weight 1/0; tensor parallel splits
    10 evenly (torch's tensor parallel layers need that), and FSDP2 then splits each 5-row half 3/2."""

    def __init__(self, layout: str, reshard_after_forward: bool = True, output_scale: float = 1.0) -> None:
        super().__init__()
        self.layout = layout
        self.reshard_after_forward = reshard_after_forward
        self.net = None if layout == "tp" else self._build()
        if self.net is not None:  # 0: zero-initialised, as LoRA's B or adaLN-Zero; 1e-3: a global threshold empties it
            with torch.no_grad():
                self.net[4].weight.mul_(output_scale)

    @staticmethod
    def _build() -> nn.Sequential:
        return nn.Sequential(nn.Linear(12, 10), nn.ReLU(), nn.Linear(10, 7), nn.ReLU(), nn.Linear(7, 1))

    def configure_model(self) -> None:
        if self.net is None:  # "tp" builds its layers here, as large models do: DSD sees none at `setup`
            with seeded(3):  # the same plain layer on every rank
                self.net = self._build()
        if self.layout in ("tp", "2d"):
            plan = {"0": ColwiseParallel(), "2": RowwiseParallel()}  # net.4 stays a plain tensor under "tp"
            parallelize_module(self.net, self.device_mesh["tensor_parallel"], plan)
        if self.layout in ("fsdp", "fsdp_root", "2d"):
            dp_mesh = self.device_mesh["data_parallel"]
            # "fsdp_root" gives only net.0 a group of its own: net.2 and net.4 are the root's, which FSDP2
            # keeps gathered after a forward without backward (an evaluation, the sanity check).
            layers = [self.net[0]] if self.layout == "fsdp_root" else [m for m in self.net if isinstance(m, nn.Linear)]
            # By default (None) FSDP2 reshards every module after its forward except the root.
            reshard = {} if self.reshard_after_forward else {"reshard_after_forward": False}
            for layer in layers:
                fully_shard(layer, mesh=dp_mesh, **reshard)
            fully_shard(self, mesh=dp_mesh, **reshard)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = nn.functional.mse_loss(self(x).squeeze(-1), y)
        self.log("train_loss", loss)
        return loss

    def validation_step(self, batch, batch_idx):
        x, y = batch
        self.log("val_loss", nn.functional.mse_loss(self(x).squeeze(-1), y), sync_dist=True)

    def configure_optimizers(self):
        return adamw_with_step_lr(self.parameters())


class TinyGPT2(pl.LightningModule):
    """A random-init ``transformers`` GPT-2 (its tied word embedding is the output layer), each block and
    then the whole model sharded with FSDP2, as a user would write it."""

    def __init__(self) -> None:
        super().__init__()
        config = transformers.GPT2Config(vocab_size=50, n_positions=16, n_embd=24, n_layer=2, n_head=2)
        self.model = transformers.GPT2LMHeadModel(config)

    def configure_model(self) -> None:
        dp_mesh = self.device_mesh["data_parallel"]
        for block in self.model.transformer.h:
            fully_shard(block, mesh=dp_mesh)
        fully_shard(self.model, mesh=dp_mesh)

    def training_step(self, batch, batch_idx):
        (tokens,) = batch
        return self.model(input_ids=tokens, labels=tokens).loss

    def validation_step(self, batch, batch_idx):
        (tokens,) = batch
        self.log("val_loss", self.model(input_ids=tokens, labels=tokens).loss, sync_dist=True)

    def embedding_is_tied(self) -> bool:
        return self.model.lm_head.weight is self.model.transformer.wte.weight

    def configure_optimizers(self):
        return adamw_with_step_lr(self.parameters())


def grad_weighted(name: str, weight: torch.Tensor, grad_sq: torch.Tensor) -> torch.Tensor:
    """A user's criterion, elementwise (so it runs on DTensors as on plain tensors): |w| times the RMS gradient."""
    return weight.abs() * grad_sq.sqrt()


IMPORTANCES = {"magnitude": "magnitude", "obd": "obd", "callable": grad_weighted}


def adamw_with_step_lr(params):
    optimizer = torch.optim.AdamW(params, lr=1e-2, weight_decay=0.05)
    return {"optimizer": optimizer, "lr_scheduler": torch.optim.lr_scheduler.StepLR(optimizer, 1, gamma=0.9)}


def make_loader(layout: str) -> DataLoader:
    generator = torch.Generator().manual_seed(0)
    if layout == "gpt2":
        return DataLoader(TensorDataset(torch.randint(0, 50, (64, 16), generator=generator)), batch_size=8)
    x = torch.randn(64, 12, generator=generator)
    return DataLoader(TensorDataset(x, x[:, :3].sum(dim=1)), batch_size=8)


class ShardRecorder(pl.Callback):
    """What every rank sees; gathers are collectives, so every rank runs every hook here."""

    def __init__(self, dsd: DSDCallback, out: str) -> None:
        self.dsd, self.out = dsd, out
        self.probe: ForwardProbe | None = None
        self.record: dict = {"steps": [], "lrs": [], "local_shapes": {}, "state_zero": []}

    def _targets(self):
        return self.dsd.selection.selected

    def on_train_start(self, trainer, pl_module):
        self._handle = register_optimizer_step_post_hook(self._after_step)
        self.record["local_shapes"] = {n: tuple(local_part(p).shape) for n, p in self._targets().items()}
        self.record["sharded"] = {n: isinstance(p, DTensor) for n, p in self._targets().items()}

    def on_train_epoch_start(self, trainer, pl_module):  # runs after DSD's, which may have just pruned
        self.record["lrs"].append([g["lr"] for g in trainer.optimizers[0].param_groups])
        if self.dsd.phase is Phase.SPARSE and "masks" not in self.record:
            self.record["masks"] = {n: m.clone() for n, m in FullMasks(self.dsd.masks, self._targets()).items()}
            self.record["local_masks"] = {n: m.clone() for n, m in self.dsd.masks.items()}
        if self.dsd.phase is Phase.REDENSE and "redense_start" not in self.record:
            self.record["redense_start"] = {n: full_tensor(p).clone() for n, p in self._targets().items()}
        if self.dsd.phase_label == "final sparse" and "final_masks" not in self.record:
            self.record["final_masks"] = {n: m.clone() for n, m in FullMasks(self.dsd.masks, self._targets()).items()}

    def on_train_epoch_end(self, trainer, pl_module):
        if self.dsd.phase is Phase.DENSE:
            self.record["dense_end"] = {n: full_tensor(p).clone() for n, p in self._targets().items()}
            window = self.dsd._engine._window  # the open gradient window of `importance`, just before pruning
            if window is not None:
                self.record["grad_sq"] = {n: full_tensor(window.mean_squared(n, p)).clone()
                                          for n, p in self._targets().items()}
                self.record["window_steps"] = dict(window.counts)
        if self.dsd.phase is Phase.REDENSE:
            self.record["redense_end"] = {n: full_tensor(p).clone() for n, p in self._targets().items()}
        if self.dsd.phase is Phase.SPARSE:
            self.record["sparse_end"] = {n: full_tensor(p).clone() for n, p in self._targets().items()}
            state = trainer.optimizers[0].state
            self.record["state_zero"].append(all(
                bool((local_part(value)[~mask] == 0).all())
                for name, mask in self.dsd.masks.items()
                for value in state[self._targets()[name]].values()
                if isinstance(value, torch.Tensor) and value.shape == self._targets()[name].shape
            ))

    def _after_step(self, optimizer, args, kwargs):
        masks = self.dsd.masks
        zeros = all(bool((local_part(self._targets()[n])[~m] == 0).all()) for n, m in masks.items())
        self.record["steps"].append((self.dsd.phase.value, zeros))

    def on_train_end(self, trainer, pl_module):
        self._handle.remove()
        self.record["final"] = {n: full_tensor(p).clone() for n, p in pl_module.named_parameters()}
        self.record["world_size"] = trainer.world_size
        self.record["tied"] = pl_module.embedding_is_tied() if isinstance(pl_module, TinyGPT2) else None
        self.record["forwards"] = self.probe.forwards if self.probe is not None else None
        torch.save(self.record, os.path.join(self.out, f"rank{trainer.global_rank}.pt"))


class ForwardProbe(pl.Callback):
    """What the forward pass computes with: a forward pre-hook on the module of every target compares the
    weight the module holds at that moment (FSDP2's gathered copy, or the DTensor itself) with the full
    stored weight (gathered from the shards DSD writes) and, in a sparse phase, checks the pruned entries
    are zero. Every rank runs every forward, so the gathers inside the hook are collectives all reach."""

    def __init__(self, dsd: DSDCallback) -> None:
        self.dsd = dsd
        self.forwards: list[dict] = []
        self._full_masks: dict = {}
        self._handles: list = []

    def on_fit_start(self, trainer, pl_module):  # after DSD chose its targets (its on_fit_start runs first)
        for name, param in self.dsd.selection.selected.items():
            names = self.dsd.selection.tied.get(name, [name])
            for alias in names:
                module_name, _, attribute = alias.rpartition(".")
                module = pl_module.get_submodule(module_name)
                hook = partial(self._check, trainer=trainer, name=name, alias=alias, attribute=attribute, param=param)
                self._handles.append(module.register_forward_pre_hook(hook))

    def _check(self, module, args, *, trainer, name, alias, attribute, param):
        used = full_tensor(getattr(module, attribute))
        stored = full_tensor(param)
        phase = self.dsd.phase
        pruned_zero = None
        if phase is Phase.SPARSE and name not in self.dsd.masks:  # left dense for this phase: nothing pruned
            pruned_zero = True
        elif phase is Phase.SPARSE:
            if name not in self._full_masks or self._full_masks[name][0] != self.dsd.cycle:
                self._full_masks[name] = (self.dsd.cycle, FullMasks(self.dsd.masks, self.dsd.selection.selected)[name])
            keep = self._full_masks[name][1]
            pruned_zero = bool((used[~keep] == 0).all())
        self.forwards.append({
            "phase": phase.value, "training": module.training, "sanity": trainer.sanity_checking, "name": alias,
            "step": trainer.global_step, "same_as_stored": torch.equal(used, stored), "pruned_zero": pruned_zero,
            "masked": name in self.dsd.masks,
        })

    def on_train_end(self, trainer, pl_module):
        for handle in self._handles:
            handle.remove()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--layout", choices=sorted(MESHES), required=True)
    parser.add_argument("--scope", default="layer")
    parser.add_argument("--sparsity", default="0.5")
    parser.add_argument("--redense-init", default="zero")
    parser.add_argument("--single-file", action="store_true", help="save_distributed_checkpoint=False")
    parser.add_argument("--precision", default="32-true")
    parser.add_argument("--out", required=True)
    parser.add_argument("--resume", default=None)
    parser.add_argument("--export-sparse", action="store_true", help="export_sparse='sparse'")
    parser.add_argument("--data-parallel", type=int, default=None, help="another data-parallel size")
    parser.add_argument("--probe", action="store_true", help="check the weights every forward pass uses")
    parser.add_argument("--validate", choices=["none", "sanity", "epoch"], default="none",
                        help="evaluation forwards: none, the sanity check only, or also a validation every epoch")
    parser.add_argument("--keep-gathered", action="store_true", help="fully_shard(reshard_after_forward=False)")
    parser.add_argument("--output-scale", type=float, default=1.0, help="net.4 starts at this times its init")
    parser.add_argument("--dense-epochs", type=int, default=1)
    parser.add_argument("--no-checkpoints", action="store_true", help="no ModelCheckpoint (its save reshards)")
    parser.add_argument("--final-sparse", type=int, default=0, help="final_sparse_epochs: the run ends sparse")
    parser.add_argument("--importance", choices=sorted(IMPORTANCES), default="magnitude")
    args = parser.parse_args()
    sparsity = args.sparsity if ":" in args.sparsity else float(args.sparsity)
    dp, tp = MESHES[args.layout]
    dp = args.data_parallel or dp
    with seeded(3):
        model = TinyGPT2() if args.layout == "gpt2" else ShardedNet(
            args.layout, reshard_after_forward=not args.keep_gathered, output_scale=args.output_scale
        )
    # An N:M pattern needs input sizes that divide by M: the 7-input output layer gets a float instead.
    layer_sparsity = {"net.4.*": 0.5} if isinstance(sparsity, str) else None
    dsd = DSDCallback(
        sparsity, args.dense_epochs, 2, 1, scope=args.scope, redense_init=args.redense_init,
        layer_sparsity=layer_sparsity, figure_layers=1, export_sparse="sparse" if args.export_sparse else None,
        histogram_every_n_epochs=1, final_sparse_epochs=args.final_sparse, importance=IMPORTANCES[args.importance],
    )
    recorder = ShardRecorder(dsd, args.out)
    callbacks = [dsd, ForwardProbe(dsd), recorder] if args.probe else [dsd, recorder]
    if args.resume is None and not args.no_checkpoints:
        callbacks.append(ModelCheckpoint(dirpath=os.path.join(args.out, "ckpt"), save_top_k=-1, filename="{epoch}",
                                         save_on_train_epoch_end=True))
    strategy = ModelParallelStrategy(
        data_parallel_size=dp, tensor_parallel_size=tp, save_distributed_checkpoint=not args.single_file
    )
    trainer = pl.Trainer(
        accelerator="cpu",
        devices=dp * tp,
        strategy=strategy,
        max_epochs=args.dense_epochs + 3 + args.final_sparse,
        callbacks=callbacks,
        accumulate_grad_batches=2,
        # torch's clip_grad_norm_ cannot mix plain and DTensor gradients ("tp": net.4 is plain) nor DTensors on
        # different meshes ("2d": net.4 is on the data-parallel mesh only), so those two do not clip.
        gradient_clip_val=0.5 if args.layout in ("fsdp", "gpt2") else None,
        precision=args.precision,
        enable_checkpointing=args.resume is None and not args.no_checkpoints,
        enable_progress_bar=False,
        enable_model_summary=False,
        deterministic=True,
        logger=TensorBoardLogger(args.out, name="tb", version=0),
        limit_val_batches=2,  # the sanity check's 2 batches, and as many every epoch with --validate epoch
        check_val_every_n_epoch=1 if args.validate == "epoch" else 1000,
    )
    if args.probe:
        recorder.probe = callbacks[1]
    val_loader = None if args.validate == "none" else make_loader(args.layout)
    trainer.fit(model, make_loader(args.layout), val_loader, ckpt_path=args.resume)


if __name__ == "__main__":
    main()
