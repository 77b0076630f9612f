"""Phases given as ``None`` end when the monitored metric stops improving, EarlyStopping-style."""

from __future__ import annotations

import pytest
from helpers import ConvLSTMNet, StepRecorder, make_loader, make_trainer

from lightning_dsd import DSDCallback


class ScriptedMetric(ConvLSTMNet):
    """Logs ``score`` (training) and ``val_score`` = ``script[epoch]``: convergence happens at known epochs."""

    def __init__(self, script: list[float]) -> None:
        super().__init__()
        self.script = script

    def training_step(self, batch, batch_idx):
        self.log("score", self.script[self.current_epoch], on_epoch=True, on_step=False)
        return super().training_step(batch, batch_idx)

    def validation_step(self, batch, batch_idx):
        self.log("val_score", self.script[self.current_epoch])


def _epoch_phases(recorder: StepRecorder, batches_per_epoch: int = 4) -> list[str]:
    return [phase for phase, _, _ in recorder.steps][::batches_per_epoch]


def test_each_none_phase_ends_after_patience_checks_without_improvement_and_the_tracker_restarts():
    # dense: improves at epochs 0-1, then 2 flat checks -> converged after epoch 3
    # sparse: fixed 1 epoch (epoch 4)
    # redense: best restarts; 9 at epoch 5 is a new best even though dense saw 1; flat at 6, 7 -> stop
    script = [3, 1, 1, 1, 5, 9, 9, 9, 0, 0]
    dsd = DSDCallback(0.5, None, 1, None, monitor="score", mode="min", patience=2)
    recorder = StepRecorder(dsd)
    trainer = make_trainer([dsd, recorder], max_epochs=10)
    trainer.fit(ScriptedMetric(script), make_loader())
    assert _epoch_phases(recorder) == ["dense"] * 4 + ["sparse"] + ["redense"] * 3
    assert trainer.current_epoch == 8


def test_min_delta_and_mode_max():
    script = [1.0, 1.05, 1.08, 1.5, 1.52, 1.53, 1.54, 1.55, 1.56, 1.57]
    dsd = DSDCallback(0.5, None, 1, 1, monitor="score", mode="max", patience=2, min_delta=0.1)
    recorder = StepRecorder(dsd)
    make_trainer([dsd, recorder], max_epochs=10).fit(ScriptedMetric(script), make_loader())
    # 1.0 best; 1.05, 1.08 not > 1.1 -> converged after epoch 2
    assert _epoch_phases(recorder) == ["dense"] * 3 + ["sparse", "redense"]


@pytest.mark.parametrize("check_val_every_n_epoch", [1, 2])
def test_validation_metrics_drive_convergence(check_val_every_n_epoch):
    # sparse starts at epoch 1; with validation every epoch the checks are 5 (best), 6 -> converged after
    # epoch 2; with validation every 2 epochs the checks are at epochs 1 (5: best), 3 (4: best), 5 (9) ->
    # converged after epoch 5. Metrics from epochs without validation are never counted as checks.
    script = [0, 5, 6, 4, 7, 9, 9, 9, 9, 9]
    dsd = DSDCallback(0.5, 1, None, 1, monitor="val_score", patience=0)
    recorder = StepRecorder(dsd)
    trainer = make_trainer([dsd, recorder], max_epochs=10, check_val_every_n_epoch=check_val_every_n_epoch)
    trainer.fit(ScriptedMetric(script), make_loader(), make_loader(seed=1))
    sparse_epochs = 2 if check_val_every_n_epoch == 1 else 5
    assert _epoch_phases(recorder) == ["dense"] + ["sparse"] * sparse_epochs + ["redense"]


def test_a_monitor_that_is_never_logged_fails_with_the_metrics_that_exist():
    dsd = DSDCallback(0.5, None, 1, 1, monitor="val_acc")
    with pytest.raises(RuntimeError, match=r"monitor='val_acc'.*not among the logged metrics.*'train_loss'"):
        make_trainer([dsd], max_epochs=3).fit(ConvLSTMNet(), make_loader())
