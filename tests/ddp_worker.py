"""DSD under real DDP (gloo, 2 CPU processes), run by test_compatibility.py in a fresh interpreter.

``strategy="ddp"`` re-executes the launching command for rank 1, so it cannot run inside pytest itself.
Each rank writes what it saw to ``<out>/rank<r>.pt``.
"""

from __future__ import annotations

import argparse
import os

import lightning.pytorch as pl
import torch
from helpers import ConvLSTMNet, StepRecorder, adamw, make_loader, make_trainer, seeded  # beside this script
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import TensorBoardLogger
from test_user_code import BuiltInConfigureModel

from lightning_dsd import DSDCallback


class DumpPerRank(pl.Callback):
    def __init__(self, out: str, recorder: StepRecorder, dsd: DSDCallback) -> None:
        self.out, self.recorder, self.dsd = out, recorder, dsd
        self.window = self.weights_at_transition = None

    def on_train_epoch_end(self, trainer, pl_module):
        if trainer.current_epoch == 0:  # the last dense epoch: `importance`'s gradient window is open
            self.window = self.dsd.state_dict().get("importance_window")
            self.weights_at_transition = {k: v.detach().clone() for k, v in pl_module.named_parameters()}

    def on_train_end(self, trainer, pl_module):
        torch.save(
            {
                "steps": self.recorder.steps,
                "masks": self.recorder.masks_seen,
                "state_dict": {k: v.detach().cpu() for k, v in pl_module.state_dict().items()},
                "params": {k: v.detach().cpu() for k, v in pl_module.named_parameters()},
                "world_size": trainer.world_size,
                "window": self.window,
                "weights_at_transition": self.weights_at_transition,
            },
            os.path.join(self.out, f"rank{trainer.global_rank}.pt"),
        )


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--strategy", default="ddp")
    parser.add_argument("--scope", default="layer")
    parser.add_argument("--out", required=True)
    parser.add_argument("--resume", default=None)
    parser.add_argument("--model", choices=["init", "configure_model"], default="init",
                        help="build the layers in __init__ or in configure_model (Lightning's hook for large models)")
    parser.add_argument("--importance", default="magnitude")
    args = parser.parse_args()
    with seeded(3):
        model = ConvLSTMNet(optimizer=adamw) if args.model == "init" else BuiltInConfigureModel()
    dsd = DSDCallback(0.5, 1, 2, 1, scope=args.scope, importance=args.importance)
    recorder = StepRecorder(dsd)
    callbacks = [dsd, recorder, DumpPerRank(args.out, recorder, dsd)]
    if args.resume is None:
        callbacks.append(ModelCheckpoint(dirpath=os.path.join(args.out, "ckpt"), save_top_k=-1, filename="{epoch}"))
    trainer = make_trainer(
        callbacks,
        max_epochs=4,
        strategy=args.strategy,
        devices=2,
        accumulate_grad_batches=2,
        gradient_clip_val=0.5,
        enable_checkpointing=args.resume is None,
        logger=TensorBoardLogger(args.out, name="tb", version=0),
    )
    trainer.fit(model, make_loader(n=128), ckpt_path=args.resume)


if __name__ == "__main__":
    main()
