"""How pruned weights restart at re-dense: from zero (the paper), or small seeded noise."""

from __future__ import annotations

import lightning.pytorch as pl
import torch
from helpers import ConvLSTMNet, StepRecorder, make_loader, make_trainer, seeded

from lightning_dsd import DSDCallback, Phase


def _weights_at_redense_start(**options) -> tuple[dict, dict]:
    seen = {}

    class AtRedense(pl.Callback):
        def on_train_epoch_start(self, trainer, pl_module):
            if dsd.phase is Phase.REDENSE and not seen:
                seen.update({n: p.detach().clone() for n, p in pl_module.named_parameters()})

    dsd = DSDCallback(0.5, 1, 1, 1, **options)
    recorder = StepRecorder(dsd)
    with seeded():
        model = ConvLSTMNet()
    make_trainer([dsd, AtRedense(), recorder]).fit(model, make_loader())
    return seen, recorder.masks_seen[0]


def test_small_normal_redense_init_is_small_seeded_and_leaves_survivors_alone():
    weights, masks = _weights_at_redense_start(redense_init="small_normal", seed=3)
    again, _ = _weights_at_redense_start(redense_init="small_normal", seed=3)
    other, _ = _weights_at_redense_start(redense_init="small_normal", seed=4)
    zero, zero_masks = _weights_at_redense_start()
    for name, keep in masks.items():
        restarted = weights[name][~keep]
        assert (restarted != 0).all()
        assert 0.03 < float(restarted.std() / weights[name][keep].std()) < 0.3, name
        assert torch.equal(weights[name], again[name])
        assert not torch.equal(weights[name], other[name])
        assert torch.equal(weights[name][keep], zero[name][keep])
        assert (zero[name][~zero_masks[name]] == 0).all()
