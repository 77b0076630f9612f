"""DSD in the training setups users already have: DDP, mixed precision, manual optimization with several
optimizers, LightningCLI, torch.compile, and Lightning's other callbacks. Real Trainer runs on the CPU."""

from __future__ import annotations

import csv
import glob
import logging
import os
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
from helpers import (
    TARGETS,
    ConvLSTMNet,
    OverflowsSometimes,
    StepRecorder,
    make_loader,
    make_trainer,
    run_worker,
    seeded,
)
from lightning.pytorch.callbacks import EarlyStopping, LearningRateMonitor, StochasticWeightAveraging
from lightning.pytorch.cli import LightningCLI
from lightning.pytorch.loggers import CSVLogger
from lightning.pytorch.plugins import MixedPrecision
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from torch import nn

from lightning_dsd import DSDCallback, Phase

WORKER = Path(__file__).with_name("ddp_worker.py")


def _run_worker(out: Path, *args: str) -> list[dict]:
    return run_worker(WORKER, out, *args, ranks=2)


def _assert_ranks_agree(ranks: list[dict]) -> None:
    assert [r["world_size"] for r in ranks] == [2, 2]
    for rank in ranks:
        # 4 batches per rank and epoch, accumulated by 2: two real steps per epoch on each rank.
        assert [phase for phase, _, _ in rank["steps"]] == ["dense"] * 2 + ["sparse"] * 4 + ["redense"] * 2
        assert all(zeros for _, _, zeros in rank["steps"]), "pruned entries zero after every step on every rank"
    for name in TARGETS:
        assert torch.equal(ranks[0]["masks"][0][name], ranks[1]["masks"][0][name]), name
    for key, value in ranks[0]["params"].items():  # (BatchNorm statistics are per rank under DDP)
        assert torch.equal(value, ranks[1]["params"][key]), key


@pytest.mark.slow
def test_ddp_two_processes_with_accumulation_clipping_and_bit_identical_resume(tmp_path):
    full, resumed = tmp_path / "full", tmp_path / "resumed"
    full.mkdir(), resumed.mkdir()
    uninterrupted = _run_worker(full, "--strategy", "ddp")
    _assert_ranks_agree(uninterrupted)
    events = glob.glob(str(full / "tb" / "version_0" / "events.out.tfevents.*"))
    assert len(events) == 1, "only rank zero writes TensorBoard events"
    accumulator = EventAccumulator(events[0], size_guidance={"histograms": 0})
    accumulator.Reload()
    assert [e.step for e in accumulator.Histograms("dsd_weights/head.weight/2_after_pruning")] == [2]

    mid_sparse = full / "ckpt" / "epoch=1.ckpt"
    after_resume = _run_worker(resumed, "--strategy", "ddp", "--resume", str(mid_sparse))
    for rank in after_resume:
        assert [phase for phase, _, _ in rank["steps"]] == ["sparse"] * 2 + ["redense"] * 2
        assert all(zeros for _, _, zeros in rank["steps"])
        assert all(torch.equal(rank["masks"][0][n], uninterrupted[0]["masks"][0][n]) for n in TARGETS)
    for key, value in uninterrupted[0]["state_dict"].items():
        assert torch.equal(value, after_resume[0]["state_dict"][key]), f"{key} differs after a DDP resume"


@pytest.mark.slow
def test_ddp_obd_statistics_are_identical_on_every_rank_and_decide_the_masks(tmp_path):
    ranks = _run_worker(tmp_path, "--strategy", "ddp", "--importance", "obd")
    _assert_ranks_agree(ranks)
    windows = [rank["window"] for rank in ranks]
    assert windows[0]["counts"] == windows[1]["counts"] == dict.fromkeys(TARGETS, 2)  # one epoch: 2 real steps
    for name in TARGETS:  # DDP averages the gradients before the optimizer step the window reads
        assert torch.equal(windows[0]["sums"][name], windows[1]["sums"][name]) and windows[0]["sums"][name].any()
    # The masks are OBD's: the round(s * N) lowest ½·h·w² (ties by position), h the window's mean squared gradient.
    weights, window = ranks[0]["weights_at_transition"], windows[0]
    differs_from_magnitude = False
    for name in TARGETS:
        weight = weights[name]
        saliency = 0.5 * (window["sums"][name] / window["counts"][name]) * weight.float() ** 2
        expected = torch.ones(weight.numel(), dtype=torch.bool)
        expected[torch.sort(saliency.flatten(), stable=True).indices[: round(0.5 * weight.numel())]] = False
        assert torch.equal(ranks[0]["masks"][0][name], expected.view_as(weight)), name
        by_magnitude = torch.ones(weight.numel(), dtype=torch.bool)
        by_magnitude[torch.sort(weight.abs().flatten(), stable=True).indices[: round(0.5 * weight.numel())]] = False
        differs_from_magnitude |= not torch.equal(expected, by_magnitude)
    assert differs_from_magnitude, "a test of OBD must have masks magnitude would not choose"


@pytest.mark.slow
def test_ddp_spawn_with_a_global_threshold(tmp_path):
    ranks = _run_worker(tmp_path, "--strategy", "ddp_spawn", "--scope", "global")
    _assert_ranks_agree(ranks)
    masks = ranks[0]["masks"][0]
    total = sum(m.numel() for m in masks.values())
    assert sum(int((~m).sum()) for m in masks.values()) == round(0.5 * total)


def test_bf16_mixed_precision():
    dsd = DSDCallback(0.5, 1, 1, 1)
    recorder = StepRecorder(dsd)
    make_trainer([dsd, recorder], precision="bf16-mixed").fit(ConvLSTMNet(), make_loader())
    assert [p for p, _, _ in recorder.steps] == ["dense"] * 4 + ["sparse"] * 4 + ["redense"] * 4
    assert all(zeros for _, _, zeros in recorder.steps)


def test_16_mixed_precision_steps_skipped_by_the_grad_scaler_keep_pruned_entries_zero():
    dsd = DSDCallback(0.5, 1, 1, 1)
    recorder = StepRecorder(dsd)
    model = OverflowsSometimes(optimizer=lambda p: torch.optim.Adam(p, lr=1e-2))
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**8)
    trainer = make_trainer([dsd, recorder], plugins=[MixedPrecision("16-mixed", "cpu", scaler)])
    trainer.fit(model, make_loader())
    assert len(model.skipped) == 3
    assert len(recorder.steps) == 12 - 3, "skipped steps are not optimizer steps"
    assert scaler.get_scale() < 2.0**8
    assert all(zeros for _, _, zeros in recorder.steps)
    assert "sparse" in {p for p, _, _ in recorder.steps}


class TwoOptimizerGAN(pl.LightningModule):
    """Manual optimization: a generator and a discriminator, one with two param groups, and a frozen layer."""

    def __init__(self) -> None:
        super().__init__()
        self.automatic_optimization = False
        self.generator = nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Linear(32, 48))
        self.discriminator = nn.Sequential(nn.Conv1d(4, 8, 3), nn.ReLU(), nn.Flatten(), nn.Linear(80, 1))
        self.frozen = nn.Linear(48, 48)
        self.frozen.requires_grad_(False)

    def training_step(self, batch, batch_idx):
        real, _ = batch
        g_opt, d_opt = self.optimizers()
        fake = self.frozen(self.generator(torch.randn(real.shape[0], 8))).view(-1, 4, 12)
        d_loss = self.discriminator(fake.detach()).mean() - self.discriminator(real).mean()
        d_opt.zero_grad()
        self.manual_backward(d_loss)
        d_opt.step()
        g_loss = -self.discriminator(fake).mean()
        g_opt.zero_grad()
        self.manual_backward(g_loss)
        g_opt.step()

    def configure_optimizers(self):
        g_opt = torch.optim.Adam(
            [
                {"params": self.generator[0].parameters(), "lr": 1e-3},
                {"params": self.generator[2].parameters(), "lr": 2e-3},
            ]
        )
        d_opt = torch.optim.SGD(self.discriminator.parameters(), lr=0.01, momentum=0.5)
        return g_opt, d_opt


def test_manual_optimization_with_two_optimizers_param_groups_and_a_frozen_layer(caplog):
    lrs = {}

    class LearningRates(pl.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            lrs.setdefault(dsd.phase, [g["lr"] for o in trainer.optimizers for g in o.param_groups])

    dsd = DSDCallback(0.5, 1, 1, 1)
    recorder = StepRecorder(dsd)
    caplog.set_level(logging.INFO, logger="lightning_dsd")
    make_trainer([dsd, LearningRates(), recorder], max_epochs=3).fit(TwoOptimizerGAN(), make_loader())

    assert sorted(dsd.target_names) == ["discriminator.0.weight", "discriminator.3.weight", "frozen.weight",
                                        "generator.0.weight", "generator.2.weight"]
    assert "Left dense in this cycle: frozen.weight (frozen)." in caplog.text
    assert sorted(recorder.masks_seen[0]) == ["discriminator.0.weight", "discriminator.3.weight",
                                              "generator.0.weight", "generator.2.weight"]
    assert [p for p, _, _ in recorder.steps] == ["dense"] * 8 + ["sparse"] * 8 + ["redense"] * 8
    assert all(zeros for _, _, zeros in recorder.steps)
    assert lrs[Phase.REDENSE] == pytest.approx([0.1 * lr for lr in lrs[Phase.DENSE]])
    assert lrs[Phase.DENSE] == pytest.approx([1e-3, 2e-3, 0.01])


class RawClosureSteps(ConvLSTMNet):
    """Manual optimization that steps the raw torch optimizer with a closure, bypassing Lightning's hooks:
    torch runs step pre-hooks before the closure's backward, so only the post-step re-mask can help."""

    def __init__(self) -> None:
        super().__init__()
        self.automatic_optimization = False

    def training_step(self, batch, batch_idx):
        x, y = batch
        optimizer = self.optimizers().optimizer

        def closure():
            optimizer.zero_grad()
            loss = nn.functional.cross_entropy(self(x), y)
            loss.backward()
            return loss

        optimizer.step(closure)


def test_a_raw_optimizer_stepped_with_a_closure_outside_lightning_keeps_zeros():
    dsd = DSDCallback(0.5, 1, 1, 1)
    recorder = StepRecorder(dsd)
    make_trainer([dsd, recorder]).fit(RawClosureSteps(), make_loader())
    assert [p for p, _, _ in recorder.steps] == ["dense"] * 4 + ["sparse"] * 4 + ["redense"] * 4
    assert all(zeros for _, _, zeros in recorder.steps)


class CLIModel(ConvLSTMNet):
    def __init__(self, learning_rate: float = 0.1) -> None:
        super().__init__()
        self.learning_rate = learning_rate

    def train_dataloader(self):
        return make_loader()


def _cli(args: list[str]) -> LightningCLI:
    return LightningCLI(CLIModel, args=args, save_config_kwargs={"overwrite": True})


def test_lightning_cli_configures_the_callback_from_yaml(tmp_path):
    config = tmp_path / "config.yaml"
    config.write_text(
        f"""
trainer:
  max_epochs: 10
  accelerator: cpu
  logger: false
  enable_checkpointing: false
  enable_progress_bar: false
  enable_model_summary: false
  default_root_dir: {tmp_path}
  callbacks:
    - class_path: lightning_dsd.DSDCallback
      init_args:
        sparsity: [0.5, 0.25]
        dense_epochs: 1
        sparse_epochs: 1
        redense_epochs: 1
        exclude: ["conv.*"]
        scope: global
"""
    )
    cli = _cli(["fit", "--config", str(config)])
    dsd = next(cb for cb in cli.trainer.callbacks if isinstance(cb, DSDCallback))
    assert dsd.sparsities == (0.5, 0.25) and dsd.scope == "global" and dsd.exclude == ("conv.*",)
    assert cli.trainer.current_epoch == 5 and dsd.phase is Phase.REDENSE and dsd.cycle == 1
    assert "conv.weight" not in dsd.target_names


def test_lightning_cli_configures_the_callback_from_the_command_line(tmp_path):
    cli = _cli([
        "fit", "--trainer.max_epochs=6", "--trainer.accelerator=cpu", "--trainer.logger=false",
        "--trainer.enable_checkpointing=false", "--trainer.enable_progress_bar=false",
        f"--trainer.default_root_dir={tmp_path}",
        "--trainer.callbacks+=lightning_dsd.DSDCallback", "--trainer.callbacks.sparsity=0.3",
        "--trainer.callbacks.dense_epochs=1", "--trainer.callbacks.sparse_epochs=null",
        "--trainer.callbacks.redense_epochs=1", "--trainer.callbacks.monitor=train_loss",
        "--trainer.callbacks.patience=1",
    ])
    dsd = next(cb for cb in cli.trainer.callbacks if isinstance(cb, DSDCallback))
    assert dsd.sparsities == (0.3,) and dsd.monitor == "train_loss"
    assert dsd.phase in (Phase.SPARSE, Phase.REDENSE)


@pytest.mark.slow
def test_torch_compile_trains_through_all_three_phases():
    class Compiled(ConvLSTMNet):
        def __init__(self):
            super().__init__(optimizer=lambda p: torch.optim.Adam(p, lr=1e-2))
            self.head = torch.compile(self.head)

    with seeded():
        eager = ConvLSTMNet(optimizer=lambda p: torch.optim.Adam(p, lr=1e-2))
    with seeded():
        compiled = Compiled()
    results = []
    for model in (eager, compiled):
        dsd = DSDCallback(0.5, 1, 1, 1)
        recorder = StepRecorder(dsd)
        make_trainer([dsd, recorder], max_epochs=3).fit(model, make_loader())
        assert [p for p, _, _ in recorder.steps] == ["dense"] * 4 + ["sparse"] * 4 + ["redense"] * 4
        assert all(zeros for _, _, zeros in recorder.steps)
        results.append(recorder.masks_seen[0])
    assert "head._orig_mod.weight" in results[1]
    assert torch.equal(results[0]["head.weight"], results[1]["head._orig_mod.weight"])
    x = torch.randn(4, 4, 12)
    eager.eval(), compiled.eval()
    # Inductor fuses and reorders float operations: the runs agree to rounding, not bit for bit.
    torch.testing.assert_close(compiled(x), eager(x), rtol=1e-3, atol=1e-3)


def test_early_stopping_is_allowed_but_warned_about():
    with pytest.warns(UserWarning, match="EarlyStopping may end training before DSD's last phase"):
        make_trainer([DSDCallback(0.5, 1, 1, 1), EarlyStopping("train_loss")], max_epochs=3).fit(
            ConvLSTMNet(), make_loader()
        )


def test_learning_rate_monitor_shows_the_redense_drop(tmp_path):
    logger = CSVLogger(tmp_path)
    make_trainer([DSDCallback(0.5, 1, 1, 1), LearningRateMonitor("epoch")], logger=logger).fit(
        ConvLSTMNet(), make_loader()
    )
    with open(os.path.join(logger.log_dir, "metrics.csv")) as handle:
        lrs = [float(row["lr-SGD"]) for row in csv.DictReader(handle) if row.get("lr-SGD")]
    assert lrs == pytest.approx([0.1, 0.1, 0.01])


def test_stochastic_weight_averaging_is_refused_before_training():
    model = ConvLSTMNet()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match="cannot run with StochasticWeightAveraging"):
        make_trainer([DSDCallback(0.5, 1, 1, 1), StochasticWeightAveraging(swa_lrs=0.01)]).fit(model, make_loader())
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
