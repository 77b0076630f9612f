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
from lightning_dsd.sharding import FullMasks, full_tensor, local_part

MESHES = {"fsdp": (2, 1), "tp": (1, 2), "2d": (2, 2), "gpt2": (2, 1)}


class ShardedNet(pl.LightningModule):
    """12 -> 10 -> 7 -> 1: FSDP2 shards 7 rows 4/3 and the one-row output weight 1/0; tensor parallel splits
    10 evenly (torch's tensor parallel layers need that), and FSDP2 then splits each 5-row half 3/2."""

    def __init__(self, layout: str) -> None:
        super().__init__()
        self.layout = layout
        self.net = None if layout == "tp" else self._build()

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
        if self.layout in ("fsdp", "2d"):
            dp_mesh = self.device_mesh["data_parallel"]
            for layer in self.net:
                if isinstance(layer, nn.Linear):
                    fully_shard(layer, mesh=dp_mesh)
            fully_shard(self, mesh=dp_mesh)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = nn.functional.mse_loss(self(x).squeeze(-1), y)
        self.log("train_loss", loss)
        return loss

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

    def embedding_is_tied(self) -> bool:
        return self.model.lm_head.weight is self.model.transformer.wte.weight

    def configure_optimizers(self):
        return adamw_with_step_lr(self.parameters())


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

    def on_train_epoch_end(self, trainer, pl_module):
        if self.dsd.phase is Phase.DENSE:
            self.record["dense_end"] = {n: full_tensor(p).clone() for n, p in self._targets().items()}
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
        torch.save(self.record, os.path.join(self.out, f"rank{trainer.global_rank}.pt"))


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
    args = parser.parse_args()
    sparsity = args.sparsity if ":" in args.sparsity else float(args.sparsity)
    dp, tp = MESHES[args.layout]
    dp = args.data_parallel or dp
    with seeded(3):
        model = TinyGPT2() if args.layout == "gpt2" else ShardedNet(args.layout)
    # An N:M pattern needs input sizes that divide by M: the 7-input output layer gets a float instead.
    layer_sparsity = {"net.4.*": 0.5} if isinstance(sparsity, str) else None
    dsd = DSDCallback(
        sparsity, 1, 2, 1, scope=args.scope, redense_init=args.redense_init, layer_sparsity=layer_sparsity,
        figure_layers=1, export_sparse="sparse" if args.export_sparse else None, histogram_every_n_epochs=1,
    )
    callbacks = [dsd, ShardRecorder(dsd, args.out)]
    if args.resume is None:
        callbacks.append(ModelCheckpoint(dirpath=os.path.join(args.out, "ckpt"), save_top_k=-1, filename="{epoch}"))
    strategy = ModelParallelStrategy(
        data_parallel_size=dp, tensor_parallel_size=tp, save_distributed_checkpoint=not args.single_file
    )
    trainer = pl.Trainer(
        accelerator="cpu",
        devices=dp * tp,
        strategy=strategy,
        max_epochs=4,
        callbacks=callbacks,
        accumulate_grad_batches=2,
        # torch's clip_grad_norm_ cannot mix plain and DTensor gradients ("tp": net.4 is plain) nor DTensors on
        # different meshes ("2d": net.4 is on the data-parallel mesh only), so those two do not clip.
        gradient_clip_val=0.5 if args.layout in ("fsdp", "gpt2") else None,
        precision=args.precision,
        enable_checkpointing=args.resume is None,
        enable_progress_bar=False,
        enable_model_summary=False,
        deterministic=True,
        logger=TensorBoardLogger(args.out, name="tb", version=0),
    )
    trainer.fit(model, make_loader(args.layout), ckpt_path=args.resume)


if __name__ == "__main__":
    main()
