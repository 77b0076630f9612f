"""``FinalPhaseCheckpoint`` ranks only the models of DSD's last phase."""

from __future__ import annotations

import glob
import os

import torch
from helpers import ConvLSTMNet, make_loader, make_trainer
from lightning.pytorch.callbacks import ModelCheckpoint

from lightning_dsd import DSDCallback, FinalPhaseCheckpoint


class ScoredByEpoch(ConvLSTMNet):
    """Logs ``score`` = SCORES[epoch]: the best (lowest) overall is a dense epoch's, the best of the last phase
    (epochs 4-5 of a 2/2/2 schedule) is epoch 4's, and the last epoch's is not the best."""

    SCORES = (0.1, 0.9, 0.8, 0.7, 0.4, 0.6)

    def training_step(self, batch, batch_idx):
        self.log("score", self.SCORES[self.current_epoch], on_step=False, on_epoch=True)
        return super().training_step(batch, batch_idx)


def test_final_phase_checkpoint_keeps_the_best_model_of_the_last_phase(tmp_path):
    dsd = DSDCallback(0.5, 2, 2, 2)
    anywhere = ModelCheckpoint(dirpath=tmp_path / "any", monitor="score", filename="{epoch}", save_top_k=1)
    final = FinalPhaseCheckpoint(dsd, dirpath=tmp_path / "final", monitor="score", filename="{epoch}", save_top_k=1)
    make_trainer([dsd, anywhere, final], enable_checkpointing=True).fit(ScoredByEpoch(), make_loader())
    assert os.path.basename(anywhere.best_model_path) == "epoch=0.ckpt"  # a plain ModelCheckpoint keeps a dense model
    saved = sorted(os.path.basename(p) for p in glob.glob(str(tmp_path / "final" / "*.ckpt")))
    assert saved == ["epoch=4.ckpt"] and os.path.basename(final.best_model_path) == "epoch=4.ckpt"
    ConvLSTMNet().load_state_dict(torch.load(final.best_model_path, weights_only=True)["state_dict"], strict=True)
