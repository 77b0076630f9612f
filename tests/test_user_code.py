"""DSD in the Lightning code people already write: models built in ``configure_model`` or ``setup()``, meta-device
initialisation, ``BackboneFinetuning`` and param groups added later, resumes from checkpoints written without DSD,
a callback reused by a new Trainer, schedules that cannot fit, runs that stop inside a sparse phase, loggers that
share one ``save_dir``, FSDP1 handed to the ``DSD`` engine. Every case runs a real ``Trainer`` (or loop) and checks
the weights where the forward pass reads them, the learning rates and the files."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Optional

import lightning.pytorch as pl
import pytest
import torch
from helpers import ConvLSTMNet, StepRecorder, make_loader, make_trainer, run_worker, seeded
from lightning.pytorch.callbacks import BackboneFinetuning, EarlyStopping, ModelCheckpoint
from lightning.pytorch.loggers import Logger
from torch import nn
from torch.utils.data import DataLoader

from lightning_dsd import DSD, DSDCallback, Phase

WORKERS = Path(__file__).parent


class ForwardProbe(pl.Callback):
    """Reads every targeted weight where the forward pass uses it (a pre-hook on its module), training and
    evaluation forwards alike, and records per forward whether every pruned entry is exactly zero."""

    def __init__(self, dsd: DSDCallback) -> None:
        self.dsd = dsd
        self.forwards: list[tuple[str, bool, bool]] = []  # (phase, training, zeros hold)
        self._handles: list[Any] = []

    def on_fit_start(self, trainer, pl_module):
        for name, module in pl_module.named_modules():
            if isinstance(module, nn.Linear):
                self._handles.append(module.register_forward_pre_hook(
                    lambda m, args, name=name: self._check(m, f"{name}.weight")))

    def _check(self, module: nn.Module, weight_name: str) -> None:
        keep = self.dsd.masks.get(weight_name)
        zeros = keep is None or bool((module.weight[~keep.to(module.weight.device)] == 0).all())
        self.forwards.append((self.dsd.phase.value, module.training, zeros))

    def on_fit_end(self, trainer, pl_module):
        for handle in self._handles:
            handle.remove()


class Classifier(pl.LightningModule):
    """A small MLP classifier over ``make_loader``'s (4, 12) sequences; subclasses build it where users do."""

    def __init__(self, lr: float = 0.1) -> None:
        super().__init__()
        self.lr = lr

    def build(self) -> nn.Module:
        return nn.Sequential(nn.Flatten(), nn.Linear(48, 32), nn.ReLU(), nn.Linear(32, 3))

    def forward(self, x):
        return self.net(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        return nn.functional.cross_entropy(self(x), y)

    def validation_step(self, batch, batch_idx):
        x, y = batch
        self.log("val_loss", nn.functional.cross_entropy(self(x), y))

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=self.lr, momentum=0.9)


class BuiltInConfigureModel(Classifier):
    """Layers created in ``configure_model``, Lightning's hook for large models and delayed initialisation."""

    def configure_model(self):
        if not hasattr(self, "net"):
            self.net = self.build()


class HeadBuiltInSetup(Classifier):
    """The body in ``__init__``, the head in ``setup(stage)``, sized from the data (as from a datamodule)."""

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Flatten(), nn.Linear(48, 32), nn.ReLU())

    def setup(self, stage: str) -> None:
        if not hasattr(self, "head"):
            self.head = nn.Linear(32, self.trainer.datamodule.num_classes)

    def forward(self, x):
        return self.head(self.body(x))


class MetaDeviceInit(Classifier):
    """Built on the meta device in ``__init__`` (no memory), materialised in ``configure_model``."""

    def __init__(self) -> None:
        super().__init__()
        with torch.device("meta"):
            self.net = self.build()

    def configure_model(self):
        if self.net[1].weight.is_meta:
            self.net.to_empty(device=torch.device("cpu"))
            for module in self.net.modules():
                if isinstance(module, nn.Linear):
                    module.reset_parameters()


class Sequences(pl.LightningDataModule):
    """``make_loader``'s data as a datamodule that knows its number of classes."""

    num_classes = 3

    def train_dataloader(self):
        return make_loader()

    def val_dataloader(self):
        return make_loader(n=32, seed=1)


def _fit(model: pl.LightningModule, dsd: DSDCallback, callbacks: list, **trainer_options) -> pl.Trainer:
    trainer = make_trainer([dsd, *callbacks], **trainer_options)
    trainer.fit(model, datamodule=Sequences())
    return trainer


# ---------------------------------------------------------------------------------------- models built late


@pytest.mark.parametrize("model_class", [BuiltInConfigureModel, HeadBuiltInSetup, MetaDeviceInit])
def test_layers_built_in_configure_model_or_setup_or_on_the_meta_device_are_pruned_in_every_forward(model_class):
    dsd = DSDCallback(0.5, 1, 1, 1)
    probe, recorder = ForwardProbe(dsd), StepRecorder(dsd)
    with seeded():
        model = model_class()
    _fit(model, dsd, [probe, recorder], max_epochs=3)

    expected = ["body.1.weight", "head.weight"] if model_class is HeadBuiltInSetup else ["net.1.weight", "net.3.weight"]
    assert dsd.target_names == expected
    masks = recorder.masks_seen[0]
    params = dict(model.named_parameters())
    assert sorted(masks) == expected
    for name in expected:
        assert int((~masks[name]).sum()) == round(0.5 * params[name].numel()), name
    sparse = [(training, zeros) for phase, training, zeros in probe.forwards if phase == "sparse"]
    assert {training for training, _ in sparse} == {True, False}, "training and validation forwards were read"
    assert all(zeros for _, zeros in sparse), "every forward of the sparse phase computes with the pruned weights"
    assert [p for p, _, _ in recorder.steps] == ["dense"] * 4 + ["sparse"] * 4 + ["redense"] * 4
    assert all(zeros for _, _, zeros in recorder.steps)


def test_a_resume_mid_sparse_of_a_model_built_in_configure_model_is_bit_identical(tmp_path):
    dsd = DSDCallback(0.5, 1, 2, 1)
    checkpoints = ModelCheckpoint(dirpath=tmp_path, save_top_k=-1, filename="{epoch}")
    with seeded():
        uninterrupted = BuiltInConfigureModel()
        make_trainer([dsd, checkpoints], max_epochs=4, enable_checkpointing=True).fit(uninterrupted, make_loader())

    resumed_dsd = DSDCallback(0.5, 1, 2, 1)
    recorder = StepRecorder(resumed_dsd)
    with seeded():
        resumed = BuiltInConfigureModel()
        make_trainer([resumed_dsd, recorder], max_epochs=4).fit(resumed, make_loader(),
                                                                ckpt_path=tmp_path / "epoch=1.ckpt")
    assert [p for p, _, _ in recorder.steps] == ["sparse"] * 4 + ["redense"] * 4
    assert all(zeros for _, _, zeros in recorder.steps)
    for (name, a), b in zip(uninterrupted.state_dict().items(), resumed.state_dict().values(), strict=True):
        assert torch.equal(a, b), name


@pytest.mark.slow
def test_a_model_built_in_configure_model_is_pruned_alike_on_both_ddp_ranks(tmp_path):
    ranks = run_worker(WORKERS / "ddp_worker.py", tmp_path, "--model", "configure_model", ranks=2)
    for rank in ranks:
        assert sorted(rank["masks"][0]) == ["net.1.weight", "net.3.weight"]
        assert [phase for phase, _, _ in rank["steps"]] == ["dense"] * 2 + ["sparse"] * 4 + ["redense"] * 2
        assert all(zeros for _, _, zeros in rank["steps"])
    for name, mask in ranks[0]["masks"][0].items():
        assert torch.equal(mask, ranks[1]["masks"][0][name]), name
    for name, value in ranks[0]["params"].items():
        assert torch.equal(value, ranks[1]["params"][name]), name


# ------------------------------------------------------------------------------- parameters that join later


class BackboneAndHead(Classifier):
    """BackboneFinetuning's documented pattern: a ``backbone`` attribute, an optimizer over trainable params."""

    def __init__(self) -> None:
        super().__init__(lr=0.05)
        self.backbone = nn.Sequential(nn.Flatten(), nn.Linear(48, 32), nn.ReLU())
        self.head = nn.Linear(32, 3)

    def forward(self, x):
        return self.head(self.backbone(x))

    def configure_optimizers(self):
        return torch.optim.SGD(filter(lambda p: p.requires_grad, self.parameters()), lr=self.lr, momentum=0.9)


class GroupLearningRates(pl.Callback):
    """The learning rate of every param group at the first batch of each epoch."""

    def __init__(self) -> None:
        self.by_epoch: dict[int, list[float]] = {}

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if batch_idx == 0:
            self.by_epoch[trainer.current_epoch] = [g["lr"] for g in trainer.optimizers[0].param_groups]


@pytest.mark.parametrize("unfreeze_at", [1, 3])
def test_backbone_finetuning_prunes_the_backbone_once_it_trains_and_scales_its_learning_rate(unfreeze_at, caplog):
    dsd = DSDCallback(0.5, 2, 2, 2)
    finetuning = BackboneFinetuning(unfreeze_backbone_at_epoch=unfreeze_at, backbone_initial_ratio_lr=0.5,
                                    lambda_func=lambda epoch: 1.0, verbose=False)
    recorder, lrs, probe = StepRecorder(dsd), GroupLearningRates(), ForwardProbe(dsd)
    caplog.set_level(logging.INFO, logger="lightning_dsd")
    with seeded():
        model = BackboneAndHead()
    _fit(model, dsd, [finetuning, recorder, lrs, probe], max_epochs=6)

    masks = recorder.masks_seen[0]
    assert all(zeros for _, _, zeros in recorder.steps) and all(zeros for _, _, zeros in probe.forwards)
    if unfreeze_at == 1:  # trainable and in the optimizer when the sparse phase begins (epoch 2): pruned
        assert sorted(masks) == ["backbone.1.weight", "head.weight"]
        assert "Left dense in this cycle" not in caplog.text
    else:  # still frozen at epoch 2: dense for this cycle, and the note says why
        assert sorted(masks) == ["head.weight"]
        assert "Left dense in this cycle: backbone.1.weight (frozen)." in caplog.text
    # The backbone's group, added by add_param_group at `unfreeze_at`, drops to a tenth at re-dense like the rest.
    before, after = lrs.by_epoch[3], lrs.by_epoch[4]
    assert len(before) == len(after) == 2
    assert after == pytest.approx([0.1 * lr for lr in before])


def test_the_dsd_door_prunes_a_param_group_added_later_and_leaves_an_unowned_target_dense_with_a_note(caplog):
    with seeded():
        model = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 2))
    optimizer = torch.optim.SGD(model[4].parameters(), lr=0.1, momentum=0.9)
    caplog.set_level(logging.INFO, logger="lightning_dsd")
    with pytest.warns(UserWarning, match=r"no optimizer updates `0.weight`, `2.weight` yet"):
        dsd = DSD(model, optimizer, 0.5, dense_epochs=1, sparse_epochs=1, redense_epochs=1, log_scalars=False,
                  log_histograms=False, figure_layers=0)
    x, y = torch.randn(16, 6), torch.randn(16, 2)

    def epoch() -> None:
        optimizer.zero_grad()
        nn.functional.mse_loss(model(x), y).backward()
        optimizer.step()
        dsd.step()

    optimizer.add_param_group({"params": model[2].parameters(), "lr": 0.2})  # 2 joins; 0 never does
    epoch()
    assert dsd.phase is Phase.SPARSE and sorted(dsd.masks) == ["2.weight", "4.weight"]
    assert "Left dense in this cycle: 0.weight (no optimizer updates it)." in caplog.text
    dense_first = model[0].weight.detach().clone()
    epoch()
    assert torch.equal(model[0].weight, dense_first), "a target no optimizer updates is left as it is"
    assert dsd.phase is Phase.REDENSE
    assert [g["lr"] for g in optimizer.param_groups] == pytest.approx([0.01, 0.02])


# ------------------------------------------------------------------------------- resumes and reused callbacks


class EpochPhases(pl.Callback):
    def __init__(self, dsd: DSDCallback) -> None:
        self.dsd, self.phases = dsd, {}

    def on_train_epoch_end(self, trainer, pl_module):
        self.phases[trainer.current_epoch] = self.dsd.phase.value


@pytest.mark.parametrize("interval", ["epoch", "step"])
def test_resuming_from_a_checkpoint_without_dsd_state_starts_the_schedule_where_dsd_joins(interval, tmp_path, caplog):
    checkpoints = ModelCheckpoint(dirpath=tmp_path, save_top_k=-1, filename="{epoch}")
    with seeded():
        model = BuiltInConfigureModel()
    make_trainer([checkpoints], max_epochs=3, enable_checkpointing=True).fit(model, make_loader())  # 12 steps

    dsd = DSDCallback(0.5, 2, 2, 2) if interval == "epoch" else DSDCallback(0.5, 4, 4, 4, interval="step")
    phases, recorder = EpochPhases(dsd), StepRecorder(dsd)
    caplog.set_level(logging.INFO, logger="lightning_dsd")
    with pytest.warns() as warned:
        make_trainer([dsd, phases, recorder], max_epochs=9 if interval == "epoch" else 6).fit(
            BuiltInConfigureModel(), make_loader(), ckpt_path=tmp_path / "epoch=2.ckpt")
    assert not [w for w in warned if "The DSD schedule needs" in str(w.message)], "the joined schedule fits"
    if interval == "epoch":
        assert phases.phases == {3: "dense", 4: "dense", 5: "sparse", 6: "sparse", 7: "redense", 8: "redense"}
        assert "DSDCallback joins this run at epoch 3 (the checkpoint holds no DSD state)" in caplog.text
        assert "dense epochs 3-4, sparse epochs 5-6, redense epochs 7-8" in caplog.text
    else:
        assert [phase for phase, _, _ in recorder.steps] == ["dense"] * 4 + ["sparse"] * 4 + ["redense"] * 4
        assert "dense steps 12-15, sparse steps 16-19, redense steps 20-23" in caplog.text
    assert all(zeros for _, _, zeros in recorder.steps) and dsd.phase is Phase.REDENSE


def test_a_callback_left_mid_schedule_is_refused_by_a_new_trainer_naming_ckpt_path():
    dsd = DSDCallback(0.5, 1, 2, 1)
    with seeded():
        model = BuiltInConfigureModel()
    make_trainer([dsd], max_epochs=2).fit(model, make_loader())  # stops in the sparse phase
    assert dsd.phase is Phase.SPARSE
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    with pytest.raises(RuntimeError, match=r"stopped in the sparse phase of cycle 0 .*another Trainer.*ckpt_path"):
        make_trainer([dsd], max_epochs=4).fit(model, make_loader())
    assert all(torch.equal(p, before[name]) for name, p in model.named_parameters())


class StopAtEpochEnd(pl.Callback):
    """Stops the fit at the end of epoch ``epoch``, once (a user's own stop, an EarlyStopping that fired)."""

    def __init__(self, epoch: int) -> None:
        self.epoch = epoch

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.current_epoch == self.epoch:
            trainer.should_stop, self.epoch = True, -1


class LearningRates(pl.Callback):
    """The learning rate each epoch trains at (read after DSD's transitions of that epoch start)."""

    def __init__(self) -> None:
        self.rates: list[float] = []

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.rates.append(trainer.optimizers[0].param_groups[0]["lr"])


@pytest.mark.parametrize("stop_after", [1, 2])  # in the sparse phase; in the re-dense phase, after its drop
def test_a_second_fit_of_the_same_trainer_goes_on_with_the_learning_rate_drops_already_made(stop_after, caplog):
    # Lightning builds new optimizers (configure_optimizers) at every fit; the schedule goes on, and so must the
    # re-dense drops: every epoch trains at the rate of the same schedule run in one fit.
    caplog.set_level("INFO", logger="lightning_dsd")
    options = dict(log_histograms=False, log_scalars=False, figure_layers=0)
    whole = LearningRates()
    make_trainer([DSDCallback((0.5, 0.5), 1, 1, 2, **options), whole], max_epochs=7).fit(ConvLSTMNet(), make_loader())
    rates = LearningRates()
    dsd = DSDCallback((0.5, 0.5), 1, 1, 2, **options)
    trainer = make_trainer([dsd, StopAtEpochEnd(stop_after), rates], max_epochs=7)
    model = ConvLSTMNet()
    trainer.fit(model, make_loader())
    assert trainer.current_epoch == stop_after + 1
    trainer.fit(model, make_loader())
    assert dsd.phase is Phase.REDENSE and dsd.cycle == 1
    assert rates.rates == pytest.approx(whole.rates) and whole.rates == pytest.approx([0.1, 0.1, 0.01, 0.01, 0.01,
                                                                                      0.001, 0.001])
    carried = "their learning rates take the 1 re-dense drop(s) already made (x0.1): 0.1 -> 0.01."
    assert (carried in caplog.text) is (stop_after == 2)


# ------------------------------------------------------------------------- schedules that cannot fit, early stops


@pytest.mark.parametrize(
    ("interval", "trainer_options", "message"),
    [
        ("epoch", dict(max_steps=10),
         r"needs 6 epochs \(2 \+ 2 \+ 2\), but the Trainer has max_steps=10, which is 2.5 epochs at 4 optimizer"
         r" steps per epoch \(4 batches, accumulate_grad_batches=1\): training will stop in the sparse phase \(epoch 3"
         r" of 6 runs only 0.5 of its optimizer steps\)\. Set max_steps=24"),
        ("epoch", dict(max_epochs=3, limit_train_batches=2),
         r"needs 6 epochs .*max_epochs=3: training will stop in the sparse phase. Set max_epochs=6"),
        ("epoch", dict(max_steps=5, accumulate_grad_batches=2),
         r"max_steps=5, which is 2.5 epochs at 2 optimizer steps per epoch \(4 batches, accumulate_grad_batches=2\).*"
         r"Set max_steps=12"),
        ("step", dict(max_epochs=2, limit_train_batches=1),
         r"needs 6 steps .*max_epochs=2, which is 2 steps at 1 optimizer step per epoch \(1 batch,"
         r" limit_train_batches=1, accumulate_grad_batches=1\): training will stop in the dense phase."
         r" Set max_epochs=6"),
        ("step", dict(max_epochs=1, accumulate_grad_batches=2),
         r"max_epochs=1, which is 2 steps .*accumulate_grad_batches=2.*Set max_epochs=3"),
        ("step", dict(max_steps=3),
         r"needs 6 steps .*max_steps=3: training will stop in the sparse phase. Set max_steps=6"),
    ],
)
def test_a_schedule_that_the_trainer_cannot_fit_is_warned_about_naming_the_limiting_argument(
    interval, trainer_options, message
):
    dsd = DSDCallback(0.5, 2, 2, 2, interval=interval)
    with pytest.warns(UserWarning, match=message):
        make_trainer([dsd], **{"max_epochs": 10, **trainer_options}).fit(BuiltInConfigureModel(), make_loader())


@pytest.mark.parametrize(
    ("interval", "trainer_options"),
    [("epoch", dict(max_epochs=6)), ("epoch", dict(max_epochs=10, max_steps=24)),
     ("step", dict(max_epochs=2)), ("step", dict(max_epochs=-1, max_steps=6)),
     ("step", dict(max_epochs=3, accumulate_grad_batches=2))],
)
def test_a_schedule_that_fits_is_not_warned_about(interval, trainer_options, recwarn):
    dsd = DSDCallback(0.5, 2, 2, 2, interval=interval)
    make_trainer([dsd], **trainer_options).fit(BuiltInConfigureModel(), make_loader())
    assert not [w for w in recwarn if "The DSD schedule needs" in str(w.message)]
    assert dsd.phase is Phase.REDENSE


class StopsImproving(Classifier):
    """Logs a validation loss that gets worse from the second epoch, so EarlyStopping ends the run."""

    def validation_step(self, batch, batch_idx):
        self.log("val_loss", float(self.current_epoch))


def test_a_run_that_early_stopping_ends_inside_the_sparse_phase_says_the_model_was_not_redensed():
    dsd = DSDCallback(0.5, 1, 3, 1)
    stop = EarlyStopping(monitor="val_loss", patience=1)
    with seeded():
        model = StopsImproving()
        model.net = model.build()
    with pytest.warns(UserWarning, match=r"Training stopped in the sparse phase of cycle 0 \(at epoch 2, planned to"
                                         r" end at epoch 4\): the model holds the pruned zeros \(2 pruned tensors\)"
                                         r" and was not re-densed. To finish DSD, resume"):
        make_trainer([dsd, stop], max_epochs=5).fit(model, make_loader(), make_loader(n=32, seed=1))
    assert dsd.phase is Phase.SPARSE
    assert int((model.net[1].weight == 0).sum()) == 48 * 32 // 2


class Interrupted(BuiltInConfigureModel):
    def training_step(self, batch, batch_idx):
        if self.current_epoch == 2:
            raise KeyboardInterrupt
        return super().training_step(batch, batch_idx)


def test_an_interrupted_run_inside_the_sparse_phase_says_the_model_was_not_redensed():
    dsd = DSDCallback(0.5, 1, 3, 1)
    with pytest.warns(UserWarning, match=r"Training stopped in the sparse phase of cycle 0 \(at epoch 2"):
        with pytest.raises((SystemExit, KeyboardInterrupt)):
            make_trainer([dsd], max_epochs=5).fit(Interrupted(), make_loader())


# ----------------------------------------------------------------------------------------------- loggers


class RunTracker(Logger):
    """A logger like MLflow's or W&B's: every run shares ``save_dir``, with its own ``name`` and ``version``,
    and there is no ``log_dir``."""

    def __init__(self, save_dir: Path, version: str) -> None:
        super().__init__()
        self._save_dir, self._version = str(save_dir), version
        self.metrics: list[dict[str, float]] = []

    @property
    def name(self) -> str:
        return "experiment"

    @property
    def version(self) -> str:
        return self._version

    @property
    def save_dir(self) -> Optional[str]:
        return self._save_dir

    def log_metrics(self, metrics, step=None):
        self.metrics.append(dict(metrics))

    def log_hyperparams(self, params, *args, **kwargs):
        pass


def test_runs_whose_logger_shares_one_save_dir_each_write_their_exports_and_figures_in_their_own_directory(tmp_path):
    written = {}
    for run in ("run_a", "run_b"):
        dsd = DSDCallback(0.5, 1, 1, 1, export_sparse="checkpoint", figure_layers=1)
        logger = RunTracker(tmp_path, run)
        with seeded():
            make_trainer([dsd], max_epochs=3, logger=logger).fit(BuiltInConfigureModel(), make_loader())
        run_dir = tmp_path / "experiment" / run
        assert dsd.exported_sparse_models[0]["checkpoint"] == str(run_dir / "dsd_sparse" / "cycle0.ckpt")
        assert any(m.get("dsd/phase") == 1.0 for m in logger.metrics), "scalars reach the logger"
        written[run] = sorted(p.relative_to(run_dir).as_posix() for p in run_dir.rglob("*") if p.is_file())
    assert written["run_a"] == written["run_b"] == ["dsd_figures/cycle0_net.1.weight.png", "dsd_sparse/cycle0.ckpt"]
    assert not (tmp_path / "dsd_sparse").exists() and not (tmp_path / "dsd_figures").exists()


# --------------------------------------------------------------------------------------------- small things


def test_a_sparsity_that_prunes_no_weight_of_a_tensor_says_so_before_training():
    with pytest.warns(UserWarning, match=r"sparsity 0.001 prunes no weight of `net.3.weight` in cycle 0:"
                                         r" round\(0.001 \* 96\) = 0"):
        make_trainer([DSDCallback(0.001, 1, 1, 1)], max_epochs=3).fit(BuiltInConfigureModel(), make_loader())


@pytest.mark.slow
def test_fsdp1_handed_to_the_dsd_engine_is_refused_on_every_rank_before_any_weight_changes(tmp_path):
    ranks = run_worker(WORKERS / "fsdp1_worker.py", tmp_path, ranks=2)
    for rank in ranks:
        assert set(rank["refused"]) == {"wrapped", "inner"}
        for message in rank["refused"].values():
            assert "cannot prune a model whose parameters are flattened into shards" in message
            assert "`fully_shard`" in message and "ModelParallelStrategy" in message
        assert rank["unchanged"]


# ------------------------------------------------------------------------ what already held, still holds


class TunableClassifier(BuiltInConfigureModel):
    """What the Tuner needs: a ``batch_size`` and an ``lr`` attribute, and its own data."""

    def __init__(self) -> None:
        super().__init__()
        self.batch_size = 4

    def train_dataloader(self):
        return make_loader(batch_size=self.batch_size)

    def val_dataloader(self):
        return make_loader(n=32, seed=1, batch_size=self.batch_size)


def test_the_tuner_then_fit_runs_the_schedule_from_the_start(tmp_path):
    from lightning.pytorch.tuner import Tuner

    dsd = DSDCallback(0.5, 1, 1, 1)
    recorder = StepRecorder(dsd)
    with seeded():
        model = TunableClassifier()
    trainer = make_trainer([dsd, recorder], max_epochs=3, default_root_dir=tmp_path)  # the Tuner saves there
    tuner = Tuner(trainer)
    tuner.scale_batch_size(model, mode="power", max_trials=2, steps_per_trial=1)
    tuner.lr_find(model, num_training=4, min_lr=1e-3, max_lr=1e-1)
    assert dsd.phase is Phase.DENSE and not dsd.masks, "tuning leaves the schedule at its start"
    recorder.steps.clear()
    trainer.fit(model)
    steps = len(model.train_dataloader())
    assert [p for p, _, _ in recorder.steps] == ["dense"] * steps + ["sparse"] * steps + ["redense"] * steps
    assert all(zeros for _, _, zeros in recorder.steps)


def test_validate_test_and_predict_alone_change_no_weight():
    dsd = DSDCallback(0.5, 0, 1, 1)
    with seeded():
        model = BuiltInConfigureModel()
        model.configure_model()
    model.test_step = model.validation_step
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    trainer = make_trainer([dsd])
    trainer.validate(model, make_loader())
    trainer.test(model, make_loader())
    trainer.predict(model, DataLoader([torch.randn(2, 4, 12) for _ in range(2)], batch_size=None))
    assert all(torch.equal(p, before[name]) for name, p in model.named_parameters())
    assert dsd.phase is Phase.DENSE


def test_validation_twice_an_epoch_with_a_phase_that_waits_for_convergence():
    dsd = DSDCallback(0.5, 1, None, 1, monitor="val_loss", patience=1)
    recorder = StepRecorder(dsd)
    with seeded():
        model = StopsImproving()
        model.net = model.build()
    make_trainer([dsd, recorder], max_epochs=6, val_check_interval=0.5).fit(model, make_loader(),
                                                                            make_loader(n=32, seed=1))
    assert dsd.phase is Phase.REDENSE
    # `val_loss` is the epoch number, so the two checks of epoch 1 (steps 6 and 8) see 1 and 1: no improvement at
    # the second, and with patience 1 the sparse phase ends after that one epoch. Observed once an epoch (only at
    # its end), it would take epoch 2's worse value to converge: 8 sparse steps.
    assert [p for p, _, _ in recorder.steps] == ["dense"] * 4 + ["sparse"] * 4 + ["redense"] * 4
    assert all(zeros for _, _, zeros in recorder.steps)


# ------------------------------------------------------------------- found by an adversarial review, fixed


class FreezesEverything(pl.Callback):
    def on_train_epoch_start(self, trainer, pl_module):
        for module in pl_module.modules():
            if isinstance(module, nn.Linear):
                module.weight.requires_grad_(False)


def test_a_sparse_phase_in_which_every_target_is_frozen_prunes_nothing_and_says_so():
    dsd = DSDCallback(0.5, 1, 1, 1)
    with seeded():
        model = BuiltInConfigureModel()
    with pytest.warns(UserWarning, match=r"DSD cycle 0: nothing was pruned: every target is frozen or updated by no"
                                         r" optimizer \(`net.1.weight`, `net.3.weight`\)"):
        make_trainer([dsd, FreezesEverything()], max_epochs=3).fit(model, make_loader())
    assert dsd.phase is Phase.REDENSE and int((model.net[1].weight == 0).sum()) == 0


@pytest.mark.parametrize("averaging", ["EMAWeightAveraging", "StochasticWeightAveraging"])
def test_weight_averaging_which_would_undo_the_zeros_in_evaluation_and_at_the_end_is_refused(averaging):
    import lightning.pytorch.callbacks as callbacks

    if not hasattr(callbacks, averaging):
        pytest.skip(f"this Lightning has no {averaging}")
    made = getattr(callbacks, averaging)(swa_lrs=0.01) if averaging == "StochasticWeightAveraging" else (
        getattr(callbacks, averaging)(decay=0.9))
    with seeded():
        model = BuiltInConfigureModel()
    with pytest.raises(ValueError, match=rf"DSDCallback cannot run with {averaging}: weight averaging"):
        make_trainer([DSDCallback(0.5, 1, 1, 1), made], max_epochs=3).fit(model, make_loader())


class FailsToConfigureOptimizers(BuiltInConfigureModel):
    fail = True

    def configure_optimizers(self):
        if FailsToConfigureOptimizers.fail:
            raise RuntimeError("a bug in configure_optimizers")
        return super().configure_optimizers()


def test_a_checkpoint_state_read_by_a_fit_that_failed_early_does_not_reach_the_next_fit(tmp_path):
    checkpoints = ModelCheckpoint(dirpath=tmp_path, save_top_k=-1, filename="{epoch}")
    with seeded():
        make_trainer([DSDCallback(0.5, 1, 3, 1), checkpoints], max_epochs=2, enable_checkpointing=True).fit(
            BuiltInConfigureModel(), make_loader())
    dsd = DSDCallback(0.5, 1, 3, 1)
    with pytest.raises(RuntimeError, match="a bug in configure_optimizers"):
        make_trainer([dsd], max_epochs=6).fit(FailsToConfigureOptimizers(), make_loader(),
                                              ckpt_path=tmp_path / "epoch=1.ckpt")
    FailsToConfigureOptimizers.fail = False
    phases = EpochPhases(dsd)
    make_trainer([dsd, phases], max_epochs=6).fit(FailsToConfigureOptimizers(), make_loader())  # no ckpt_path
    assert phases.phases == {0: "dense", 1: "sparse", 2: "sparse", 3: "sparse", 4: "redense"}


class LazyBodyHeadInSetup(Classifier):
    """A lazy body shaped by ``example_input_array``, BatchNorm and dropout, and a head built in ``setup``."""

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Flatten(), nn.LazyLinear(32), nn.BatchNorm1d(32), nn.Dropout(0.5))
        self.example_input_array = 100 * torch.randn(4, 4, 12)

    def setup(self, stage: str) -> None:
        if not hasattr(self, "head"):
            self.head = nn.Linear(32, 3)

    def forward(self, x):
        return self.head(self.body(x))


class BatchNormAtFitStart(pl.Callback):
    def on_fit_start(self, trainer, pl_module):
        self.batches = int(pl_module.body[2].num_batches_tracked)
        self.training = pl_module.training


def test_lazy_modules_are_shaped_once_the_model_is_final_in_eval_mode_without_touching_batchnorm():
    dsd, seen = DSDCallback(0.5, 1, 1, 1), BatchNormAtFitStart()
    with seeded():
        model = LazyBodyHeadInSetup()
    make_trainer([dsd, seen], max_epochs=3).fit(model, make_loader())
    assert dsd.target_names == ["body.1.weight", "head.weight"]
    assert seen.batches == 0, "the shaping forward pass left BatchNorm's running statistics alone"
    assert seen.training is True


def _mid_sparse_checkpoint(tmp_path: Path) -> Path:
    checkpoints = ModelCheckpoint(dirpath=tmp_path, save_top_k=-1, filename="{epoch}")
    with seeded():
        make_trainer([DSDCallback(0.5, 1, 3, 1), checkpoints], max_epochs=3, enable_checkpointing=True).fit(
            BuiltInConfigureModel(), make_loader())
    return tmp_path / "epoch=1.ckpt"  # the first of three sparse epochs has just ended


@pytest.mark.parametrize(
    ("damage", "message"),
    [
        (lambda c: c["callbacks"]["DSDCallback"]["schedule"].update(started_at=100),
         r"`schedule.started_at` is epoch 100, after epoch 2, where the training resumes"),
        (lambda c: c["state_dict"]["net.1.weight"].fill_(1.0),
         r"its masks prune weights that the checkpoint's model holds as non-zero \(`net.1.weight`: 768\)"),
    ],
    ids=["phase-begins-after-the-resume", "weights-not-zero-where-pruned"],
)
def test_a_dsd_state_that_contradicts_the_checkpoints_own_clock_or_weights_is_refused_before_training(
    tmp_path, damage, message
):
    checkpoint = torch.load(_mid_sparse_checkpoint(tmp_path), weights_only=False)
    damage(checkpoint)
    torch.save(checkpoint, tmp_path / "damaged.ckpt")
    model = BuiltInConfigureModel()
    with pytest.raises(ValueError, match=message):
        make_trainer([DSDCallback(0.5, 1, 3, 1)], max_epochs=5).fit(model, make_loader(),
                                                                    ckpt_path=tmp_path / "damaged.ckpt")
    for name, value in model.state_dict().items():  # the checkpoint's weights, untouched by masks or steps
        assert torch.equal(value, checkpoint["state_dict"][name]), name
