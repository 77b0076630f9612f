"""What DSD shows, read back the way a user sees it: TensorBoard's own reader, its server, the PNG, the bar."""

from __future__ import annotations

import csv
import glob
import logging
import os
import urllib.parse
import urllib.request

import lightning.pytorch as pl
import matplotlib.image
import numpy as np
import pytest
import torch
from helpers import TARGETS, ConvLSTMNet, StepRecorder, make_loader, make_trainer, seeded, tensorboard_server
from lightning.pytorch.callbacks import RichProgressBar, TQDMProgressBar
from lightning.pytorch.loggers import CSVLogger, Logger, TensorBoardLogger
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from torch import nn

from lightning_dsd import DSDCallback
from lightning_dsd.rules.phases import Moment

MOMENT_STEPS = {  # dense 2, sparse 2, re-dense 2 epochs of 4 steps
    Moment.END_OF_DENSE: 8,
    Moment.AFTER_PRUNING: 8,
    Moment.END_OF_SPARSE: 16,
    Moment.START_OF_REDENSE: 16,
    Moment.END_OF_REDENSE: 24,
}


def _run(tmp_path, loggers, **dsd_options):
    pruned_weights = {}

    class AtPruning(pl.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            if dsd.masks and not pruned_weights:
                pruned_weights.update({n: p.detach().clone() for n, p in pl_module.named_parameters()})

    with seeded():
        model = ConvLSTMNet()
    dsd = DSDCallback(0.5, 2, 2, 2, **dsd_options)
    recorder = StepRecorder(dsd)
    trainer = make_trainer([dsd, AtPruning(), recorder], logger=loggers, default_root_dir=tmp_path)
    trainer.fit(model, make_loader())
    return dsd, recorder, pruned_weights


def _accumulator(log_dir: str) -> EventAccumulator:
    accumulator = EventAccumulator(log_dir, size_guidance={"histograms": 0, "scalars": 0, "images": 0})
    accumulator.Reload()
    return accumulator


def test_histograms_for_every_layer_and_moment_at_the_moments_global_step(tmp_path):
    logger = TensorBoardLogger(tmp_path, name="run")
    dsd, recorder, pruned = _run(tmp_path, logger)
    accumulator = _accumulator(logger.log_dir)
    tags = set(accumulator.Tags()["histograms"])
    for layer in TARGETS:
        for moment, step in MOMENT_STEPS.items():
            for kind in ("dsd_weights", "dsd_weights_nonzero"):
                events = accumulator.Histograms(f"{kind}/{layer}/{moment.value}")
                assert [e.step for e in events] == [step], (kind, layer, moment)
    assert not any(tag.startswith("dsd_weights_timeline") for tag in tags)

    masks = recorder.masks_seen[0]
    for layer in TARGETS:
        keep = masks[layer]
        threshold = float(pruned[layer].abs()[keep].min())
        everything = accumulator.Histograms(f"dsd_weights/{layer}/{Moment.AFTER_PRUNING.value}")[0].histogram_value
        nonzero = accumulator.Histograms(f"dsd_weights_nonzero/{layer}/{Moment.AFTER_PRUNING.value}")[0].histogram_value
        assert everything.num == keep.numel()
        assert nonzero.num == int(keep.sum()) == keep.numel() - round(0.5 * keep.numel())
        # No mass strictly inside the threshold: buckets [low, high) inside (-t, t) are empty.
        lower_limits = [-np.inf, *nonzero.bucket_limit[:-1]]
        for low, high, count in zip(lower_limits, nonzero.bucket_limit, nonzero.bucket, strict=False):
            if -threshold < low and high < threshold:
                assert count == 0, (layer, low, high, count)
        assert min(abs(nonzero.min), abs(nonzero.max)) >= threshold * (1 - 1e-6)
        restored = accumulator.Histograms(f"dsd_weights/{layer}/{Moment.START_OF_REDENSE.value}")[0].histogram_value
        restored_lower = [-np.inf, *restored.bucket_limit[:-1]]
        buckets = zip(restored_lower, restored.bucket_limit, restored.bucket, strict=False)
        zero_bucket = [count for low, high, count in buckets if low <= 0 < high]
        assert zero_bucket == [round(0.5 * keep.numel())], "the restored zeros form a spike at re-dense"


def test_phase_and_measured_sparsity_scalars(tmp_path):
    logger = TensorBoardLogger(tmp_path, name="run")
    dsd, recorder, _ = _run(tmp_path, logger)
    accumulator = _accumulator(logger.log_dir)

    def scalar(tag):
        return {e.step: e.value for e in accumulator.Scalars(tag)}

    # epoch ends at steps 4, 8 (dense), 12, 16 (sparse), 20, 24 (re-dense); transitions at 8 and 16.
    phase = scalar("dsd/phase")
    assert phase[4] == 0 and phase[12] == 1 and phase[20] == 2 and phase[24] == 2
    masks = recorder.masks_seen[0]
    expected_global = sum(round(0.5 * m.numel()) for m in masks.values()) / sum(m.numel() for m in masks.values())
    sparsity = scalar("dsd/sparsity")
    assert sparsity[12] == pytest.approx(expected_global, abs=1e-7)
    assert sparsity[4] == 0.0 and sparsity[24] < 0.01
    for layer, mask in masks.items():
        assert scalar(f"dsd_sparsity/{layer}")[12] == pytest.approx(round(0.5 * mask.numel()) / mask.numel())
    # One value per step: at an epoch end that a transition follows at the same step, the after-transition one.
    def events(tag):
        return [(e.step, round(e.value, 6)) for e in accumulator.Scalars(tag)]

    assert events("dsd_lr/optimizer0_group0") == [(4, 0.1), (8, 0.1), (12, 0.1), (16, 0.01), (20, 0.01), (24, 0.01)]
    assert events("dsd/phase") == [(4, 0), (8, 1), (12, 1), (16, 2), (20, 2), (24, 2)]
    for tag in accumulator.Tags()["scalars"]:
        steps = [e.step for e in accumulator.Scalars(tag)]
        assert len(steps) == len(set(steps)), tag


def test_the_five_panel_figure_is_logged_and_saved_as_png(tmp_path):
    logger = TensorBoardLogger(tmp_path, name="run")
    _run(tmp_path, logger, figure_layers=["lstm.*", "head.weight"])
    accumulator = _accumulator(logger.log_dir)
    assert set(accumulator.Tags()["images"]) == {
        "dsd_figure/lstm.weight_ih_l0", "dsd_figure/lstm.weight_hh_l0", "dsd_figure/head.weight"
    }
    paths = sorted(glob.glob(os.path.join(logger.log_dir, "dsd_figures", "*.png")))
    assert [os.path.basename(p) for p in paths] == [
        "cycle0_head.weight.png", "cycle0_lstm.weight_hh_l0.png", "cycle0_lstm.weight_ih_l0.png"
    ]
    image = matplotlib.image.imread(paths[0])
    height, width = image.shape[:2]
    assert width > 3 * height
    bar_colour = np.array([0x2A, 0x6F, 0xB0]) / 255
    is_bar = (np.abs(image[..., :3] - bar_colour) < 0.02).all(axis=-1)
    columns_with_bars = is_bar.any(axis=0)
    fifths = np.array_split(columns_with_bars, 5)
    assert all(f.any() for f in fifths), "each of the five panels has a histogram drawn in it"


def test_default_figure_layers_are_the_largest_two(tmp_path):
    logger = TensorBoardLogger(tmp_path, name="run")
    _run(tmp_path, logger, log_histograms=False)
    accumulator = _accumulator(logger.log_dir)
    assert set(accumulator.Tags()["images"]) == {"dsd_figure/lstm.weight_hh_l0", "dsd_figure/lstm.weight_ih_l0"}
    assert accumulator.Tags()["histograms"] == []


def test_options_turn_each_kind_of_logging_off_and_pick_layers(tmp_path):
    logger = TensorBoardLogger(tmp_path, name="run")
    _run(tmp_path, logger, log_scalars=False, figure_layers=0, histogram_layers="head.*", histogram_every_n_epochs=2)
    accumulator = _accumulator(logger.log_dir)
    tags = accumulator.Tags()
    assert not any(t.startswith("dsd") for t in tags["scalars"])
    assert tags["images"] == []
    assert {t.split("/")[1] for t in tags["histograms"]} == {"head.weight"}
    assert [e.step for e in accumulator.Histograms("dsd_weights_timeline/head.weight")] == [8, 16, 24]
    assert not os.path.exists(os.path.join(logger.log_dir, "dsd_figures"))


def test_with_csv_and_tensorboard_loggers_scalars_go_to_both(tmp_path):
    tensorboard, csv_logger = TensorBoardLogger(tmp_path, name="tb"), CSVLogger(tmp_path, name="csv")
    _run(tmp_path, [csv_logger, tensorboard])
    assert "dsd_weights/head.weight/2_after_pruning" in _accumulator(tensorboard.log_dir).Tags()["histograms"]
    with open(os.path.join(csv_logger.log_dir, "metrics.csv")) as handle:
        rows = list(csv.DictReader(handle))
    assert {"dsd/phase", "dsd/sparsity", "dsd_sparsity/head.weight"} <= set(rows[0])
    phases = [(int(row["step"]), float(row["dsd/phase"])) for row in rows if row["dsd/phase"]]
    assert phases == [(4, 0), (8, 1), (12, 1), (16, 2), (20, 2), (24, 2)], "one row per step, after the transition"


def test_a_csv_logger_alone_gets_scalars_and_pngs_and_one_clear_warning(tmp_path):
    csv_logger = CSVLogger(tmp_path, name="csv")
    with pytest.warns(UserWarning, match="skips weight histograms.*TensorBoardLogger.*CSVLogger") as caught:
        _run(tmp_path, csv_logger)
    assert sum("DSDCallback" in str(w.message) for w in caught) == 1
    with open(os.path.join(csv_logger.log_dir, "metrics.csv")) as handle:
        assert "dsd/phase" in next(csv.reader(handle))
    assert len(glob.glob(os.path.join(csv_logger.log_dir, "dsd_figures", "*.png"))) == 2


def test_without_any_logger_training_runs_says_so_once_and_nothing_is_written(tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="lightning_dsd")
    dsd, recorder, _ = _run(tmp_path, False)
    assert caplog.text.count("DSDCallback logs nothing: the Trainer has no logger") == 1
    assert all(zeros for _, _, zeros in recorder.steps)
    assert os.listdir(tmp_path) == []


def test_figures_and_exports_share_the_tensorboard_directory_whatever_the_logger_order(tmp_path):
    csv_logger, tensorboard = CSVLogger(tmp_path, name="csv"), TensorBoardLogger(tmp_path, name="tb")
    dsd, _, _ = _run(tmp_path, [csv_logger, tensorboard], export_sparse="checkpoint")
    assert dsd.exported_sparse_models[0]["checkpoint"] == os.path.join(tensorboard.log_dir, "dsd_sparse", "cycle0.ckpt")
    assert len(glob.glob(os.path.join(tensorboard.log_dir, "dsd_figures", "*.png"))) == 2
    assert not os.path.exists(os.path.join(csv_logger.log_dir, "dsd_sparse"))


class _RemoteLogger(Logger):
    """A logger that keeps nothing on local disk (as MLflow with a remote URI): no log_dir, no save_dir."""

    name, version = "remote", 0

    def log_hyperparams(self, params, *args, **kwargs) -> None:
        pass

    def log_metrics(self, metrics, step=None) -> None:
        pass


def test_with_a_logger_that_has_no_directory_everything_goes_under_default_root_dir_as_modelcheckpoint_does(
    tmp_path, caplog
):
    caplog.set_level(logging.INFO, logger="lightning_dsd")
    run_dir = tmp_path / "root" / "remote" / "version_0"  # <default_root_dir>/<name>/<version>, ModelCheckpoint's rule
    with pytest.warns(UserWarning, match="figures are saved as PNG under .*root.remote.version_0.dsd_figures"):
        dsd, _, _ = _run(tmp_path / "root", _RemoteLogger(), export_sparse="checkpoint")
    assert dsd.exported_sparse_models[0]["checkpoint"] == str(run_dir / "dsd_sparse" / "cycle0.ckpt")
    assert len(glob.glob(str(run_dir / "dsd_figures" / "*.png"))) == 2
    assert caplog.text.count(f"DSDCallback writes its figures and sparse exports under {run_dir}") == 1


class _ProgressBarProbe(pl.Callback):
    """Reads what the progress bar would show, through its public ``get_metrics``, at every epoch end."""

    def __init__(self) -> None:
        self.shown: list[str] = []

    def on_train_epoch_end(self, trainer, pl_module):
        self.shown.append(trainer.progress_bar_callback.get_metrics(trainer, pl_module)["dsd"])


@pytest.mark.parametrize("bar", [TQDMProgressBar, RichProgressBar])
def test_the_progress_bar_shows_the_phase_and_forgets_it_after_fit(bar, capfd):
    dsd, probe, progress_bar = DSDCallback((0.5, 0.3), 1, 1, 1), _ProgressBarProbe(), bar()
    trainer = make_trainer([dsd, probe, progress_bar], max_epochs=5, enable_progress_bar=True)
    trainer.fit(ConvLSTMNet(), make_loader())
    assert probe.shown == ["dense 1/2", "sparse 1/2", "redense 1/2", "sparse 2/2", "redense 2/2"]
    assert "dsd" not in progress_bar.get_metrics(trainer, trainer.lightning_module)
    if bar is TQDMProgressBar:
        assert "dsd=redense 2/2" in "".join(capfd.readouterr())


class _SetsGetMetricsOnTheBar(pl.Callback):
    """Sets the user's own ``get_metrics`` on the bar instance, after DSD installed its one, at ``epoch``."""

    def __init__(self, get_metrics, epoch: int) -> None:
        self.get_metrics, self.epoch = get_metrics, epoch

    def on_train_epoch_start(self, trainer, pl_module):
        if trainer.current_epoch == self.epoch:
            trainer.progress_bar_callback.get_metrics = self.get_metrics


@pytest.mark.parametrize("set_during_fit", [False, True], ids=["set before fit", "set during fit"])
def test_a_get_metrics_the_user_set_on_the_bar_outlives_fit(tmp_path, set_during_fit):
    def users_get_metrics(trainer, pl_module):
        return {"mine": 1}

    bar = TQDMProgressBar()
    callbacks = [DSDCallback(0.5, 1, 1, 1), bar]
    if set_during_fit:
        callbacks.append(_SetsGetMetricsOnTheBar(users_get_metrics, epoch=1))
    else:
        bar.get_metrics = users_get_metrics
    trainer = make_trainer(callbacks, max_epochs=3, enable_progress_bar=True, default_root_dir=tmp_path)
    trainer.fit(ConvLSTMNet(), make_loader())
    assert vars(bar).get("get_metrics") is users_get_metrics
    assert bar.get_metrics(trainer, trainer.lightning_module) == {"mine": 1}


@pytest.mark.slow
def test_the_real_tensorboard_server_serves_the_histograms(tmp_path):
    logger = TensorBoardLogger(tmp_path, name="run", version=0)
    _run(tmp_path, logger)
    with tensorboard_server(tmp_path) as get_json:
        tags = get_json("/data/plugin/histograms/tags", until=lambda tags: tags.get("run/version_0"))
        run_tags = tags["run/version_0"]
        for layer in TARGETS:
            assert f"dsd_weights_nonzero/{layer}/3_end_of_sparse" in run_tags
        query = urllib.parse.urlencode({"run": "run/version_0", "tag": "dsd_weights/head.weight/2_after_pruning"})
        (wall_time, step, buckets), = get_json(f"/data/plugin/histograms/histograms?{query}")
        assert step == 8
        assert sum(count for _, _, count in buckets) == pytest.approx(torch.Size([3, 16]).numel())


class ZeroInitHead(ConvLSTMNet):
    """A zero-initialised output layer (LoRA's B, adaLN-Zero, zero-init residual branches) at a transition before any
    step: magnitude cannot rank it, so it stays dense for that cycle, and trains away from zero."""

    def __init__(self) -> None:
        super().__init__()
        nn.init.zeros_(self.head.weight)


def test_a_zero_initialised_layer_pruned_before_any_step_logs_what_is_true_and_trains_on(tmp_path):
    logger = TensorBoardLogger(tmp_path, name="run")
    dsd = DSDCallback(0.5, 0, 2, 1)
    with seeded():
        model = ZeroInitHead()
    with pytest.warns(UserWarning, match=r"skips the histogram `dsd_weights_nonzero/head.weight/1_end_of_dense`.*"
                                         r"every entry of the tensor is zero") as warned:
        make_trainer([dsd], max_epochs=3, logger=logger).fit(model, make_loader())
    assert sum("skips the histogram" in str(w.message) for w in warned) == 1, "said once"
    tags = set(_accumulator(logger.log_dir).Tags()["histograms"])
    assert {"dsd_weights/head.weight/1_end_of_dense", "dsd_weights/head.weight/2_after_pruning"} <= tags
    assert "dsd_weights_nonzero/head.weight/2_after_pruning" not in tags, "nothing non-zero to show"
    assert "dsd_weights_nonzero/head.weight/3_end_of_sparse" in tags, "trained away from zero: shown again"
    assert "dsd_weights_nonzero/conv.weight/2_after_pruning" in tags


class TinyLayerNet(ConvLSTMNet):
    """One layer 1000x smaller in magnitude than the rest: a global threshold prunes it whole."""

    def __init__(self) -> None:
        super().__init__()
        with torch.no_grad():
            self.head.weight.mul_(1e-3)


def test_a_global_threshold_that_prunes_a_tensor_whole_says_so_and_logs_on(tmp_path, caplog):
    logger = TensorBoardLogger(tmp_path, name="run")
    dsd = DSDCallback(0.5, 1, 1, 1, scope="global")
    with seeded():
        model = TinyLayerNet()
    caplog.set_level(logging.INFO, logger="lightning_dsd")
    make_trainer([dsd], max_epochs=3, logger=logger).fit(model, make_loader())
    assert "Pruned whole (every entry): head.weight." in caplog.text
    notes = _accumulator(logger.log_dir).Tensors("dsd/transitions/text_summary")
    (note,) = [e.tensor_proto.string_val[0].decode() for e in notes if b"sparse phase" in e.tensor_proto.string_val[0]]
    assert "Pruned whole (every entry): head.weight." in note
    assert "Output units cut off from every input: " in note and note.endswith(", head.weight 3/3.")


def test_output_units_cut_off_from_every_input_are_counted_per_tensor_and_a_large_share_warned_about(caplog):
    class OneFeatureGRU(pl.LightningModule):  # each step reads one value: weight_ih_l0 is 48 x 1
        def __init__(self) -> None:
            super().__init__()
            self.gru = nn.GRU(1, 16, batch_first=True)
            self.head = nn.Linear(16, 3)

        def training_step(self, batch, batch_idx):
            x, y = batch
            out, _ = self.gru(x[:, 0].unsqueeze(-1))
            return nn.functional.cross_entropy(self.head(out[:, -1]), y)

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1)

    dsd = DSDCallback(0.8, 1, 1, 1)
    caplog.set_level(logging.INFO, logger="lightning_dsd")
    with seeded():
        model = OneFeatureGRU()
    with pytest.warns(UserWarning, match=r"cut gru.weight_ih_l0 \(38/48\) output units off from every input"):
        make_trainer([dsd], max_epochs=3).fit(model, make_loader())
    # weight_ih_l0 is 48 x 1: each of the round(0.8 * 48) = 38 pruned entries is a whole row.
    assert "Output units cut off from every input: gru.weight_ih_l0 38/48" in caplog.text
