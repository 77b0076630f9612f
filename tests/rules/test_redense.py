"""How pruned weights restart at re-dense: from zero (the paper), or small seeded noise; what the re-dense note says
of their optimizer state, for Adam and for Adafactor's factored moments."""

from __future__ import annotations

import logging

import lightning.pytorch as pl
import pytest
import torch
from helpers import ConvLSTMNet, StepRecorder, make_loader, make_trainer, seeded

from lightning_dsd import DSD, DSDCallback, Phase


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


def _redense_of(make_optimizer, caplog) -> tuple[str, dict, dict, dict]:
    """A plain loop (DSD 1 + 1 + 1 epochs): the re-dense note, and each target's optimizer state just before and
    just after the re-dense transition, with the masks."""
    with seeded():
        model = torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.ReLU(), torch.nn.Linear(8, 3))
    optimizer = make_optimizer(model.parameters())
    dsd = DSD(model, optimizer, 0.5, 1, 1, 1)
    targets = {name: p for name, p in model.named_parameters() if name.endswith("weight")}
    data = torch.randn(32, 6, generator=torch.Generator().manual_seed(0))
    caplog.set_level(logging.INFO, logger="lightning_dsd")
    before = masks = {}
    for _ in range(2):
        for x in data.split(8):
            optimizer.zero_grad()
            model(x).square().mean().backward()
            optimizer.step()
        if dsd.phase is Phase.SPARSE:
            masks = dsd.masks
            before = {n: {k: v.clone() if torch.is_tensor(v) else v for k, v in optimizer.state[p].items()}
                      for n, p in targets.items()}
        dsd.step()
    assert dsd.phase is Phase.REDENSE
    after = {n: dict(optimizer.state[p]) for n, p in targets.items()}
    (note,) = [line for line in caplog.text.splitlines() if "re-dense phase." in line]
    return note, before, after, masks


def test_the_redense_note_says_which_optimizer_state_was_zeroed_adam(caplog):
    note, before, after, masks = _redense_of(lambda p: torch.optim.Adam(p, lr=1e-2), caplog)
    assert "their optimizer state: `exp_avg`, `exp_avg_sq` zeroed at the pruned entries; `step` kept (not one" \
        " value per weight)" in note
    for name, keep in masks.items():
        for key in ("exp_avg", "exp_avg_sq"):
            assert (after[name][key][~keep] == 0).all() and torch.equal(after[name][key][keep], before[name][key][keep])
        assert torch.equal(after[name]["step"], before[name]["step"])


def test_the_redense_note_is_true_for_adafactors_factored_moments(caplog):
    from transformers.optimization import Adafactor

    make = lambda p: Adafactor(p, lr=1e-2, relative_step=False, scale_parameter=False, beta1=0.9)  # noqa: E731
    note, before, after, masks = _redense_of(make, caplog)
    assert "their optimizer state: `exp_avg` zeroed at the pruned entries; `RMS`, `exp_avg_sq_col`," \
        " `exp_avg_sq_row`, `step` kept (not one value per weight)" in note
    assert "restarts at zero" not in note
    for name, keep in masks.items():
        assert (after[name]["exp_avg"][~keep] == 0).all()
        for key in ("exp_avg_sq_row", "exp_avg_sq_col", "RMS"):  # one value per row, per column, per tensor
            assert torch.equal(after[name][key], before[name][key]), (name, key)
        assert after[name]["step"] == before[name]["step"]


def test_an_optimizer_that_computes_its_own_step_size_is_refused_before_anything_changes():
    from transformers.optimization import Adafactor

    with seeded():
        model = ConvLSTMNet()
    optimizer = Adafactor(model.parameters(), lr=None, relative_step=True)  # no learning rate DSD could scale
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    with pytest.raises(ValueError, match=r"param group 0 of optimizer 0 \(Adafactor\) has lr=None: it computes its"
                                         r" own step size .* Give it an explicit learning rate \(for Adafactor:"):
        DSD(model, optimizer, 0.5, 0, 1, 1)
    assert all(torch.equal(p, before[name]) for name, p in model.named_parameters())
