"""``FinalPhaseCheckpoint`` ranks only the models of DSD's last phase."""

from __future__ import annotations

import glob
import os

import torch
from helpers import ConvLSTMNet, make_loader, make_trainer
from lightning.pytorch.callbacks import ModelCheckpoint

from lightning_dsd import DSDCallback, FinalPhaseCheckpoint


def test_final_phase_checkpoint_keeps_the_best_model_of_the_last_phase(tmp_path):
    dsd = DSDCallback(0.5, 2, 2, 2)
    anywhere = ModelCheckpoint(dirpath=tmp_path / "any", monitor="train_loss", filename="{epoch}")
    final = FinalPhaseCheckpoint(
        dsd, dirpath=tmp_path / "final", monitor="train_loss", filename="{epoch}", save_top_k=-1
    )
    make_trainer([dsd, anywhere, final], enable_checkpointing=True).fit(ConvLSTMNet(), make_loader())
    saved = sorted(os.path.basename(p) for p in glob.glob(str(tmp_path / "final" / "*.ckpt")))
    assert saved == ["epoch=4.ckpt", "epoch=5.ckpt"]
    assert os.path.basename(final.best_model_path) in saved
    ConvLSTMNet().load_state_dict(torch.load(final.best_model_path, weights_only=True)["state_dict"], strict=True)
