"""DSD's files and scalars where MLflow and W&B show a run's: read back through the tools' own clients."""

from __future__ import annotations

import filecmp
import glob
import os
import sys

import matplotlib.image
import pytest
import torch
from helpers import ConvLSTMNet, make_loader, make_trainer, seeded
from lightning.pytorch.loggers import MLFlowLogger, TensorBoardLogger, WandbLogger

from lightning_dsd import DSDCallback
from lightning_dsd.doors.lightning.output import hand_to_loggers

FIGURE = "cycle0_lstm.weight_hh_l0.png"  # the largest targeted layer's figure
SPARSE_FILES = ["cycle0.ckpt", "cycle0_sparse_state_dict.pt"]
SHARDS = [".metadata", "__0_0.distcp"]  # a sharded checkpoint folder (ModelParallelStrategy), as DCP writes it


@pytest.fixture(autouse=True)
def _mlflow_forgets_the_tracking_uri(monkeypatch):
    """``MLFlowLogger`` sets mlflow's process-wide tracking URI, and ``MLFLOW_TRACKING_URI`` with it, which the
    next test's MLflow (transformers' integration) would use: both are reset after each test."""
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    yield
    if "mlflow" in sys.modules:
        sys.modules["mlflow"].set_tracking_uri(None)


def _sharded_checkpoint(run_dir, cycle: int) -> str:
    folder = run_dir / "dsd_sparse" / f"cycle{cycle}.ckpt"
    folder.mkdir(parents=True)
    for name in SHARDS:
        (folder / name).write_text(name)
    return str(folder)


def _file_store(tmp_path, monkeypatch) -> str:
    """A file store under ``tmp_path``: MLflow 3.7+ keeps it in maintenance mode, behind this opt-in."""
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
    return "file:" + str(tmp_path / "mlruns")


def _fit(tmp_path, logger) -> DSDCallback:
    """Dense 1, sparse 1, re-dense 1 epoch of 2 steps; one figure layer, the sparse model exported."""
    with seeded():
        model = ConvLSTMNet()
    dsd = DSDCallback(0.5, 1, 1, 1, export_sparse="sparse", figure_layers=1, log_histograms=False)
    trainer = make_trainer([dsd], max_epochs=3, limit_train_batches=2, logger=logger, default_root_dir=tmp_path)
    trainer.fit(model, make_loader(n=32))
    return dsd


def _check_the_exported_model_is_the_sparse_one(state_dict_path: str, checkpoint_path: str) -> None:
    """The sparse state dict holds each target as a sparse tensor with half its weights pruned, equal to the
    checkpoint's dense weights."""
    sparse = torch.load(state_dict_path, weights_only=True)
    checkpoint = torch.load(checkpoint_path, weights_only=False)["state_dict"]
    weight = sparse["lstm.weight_hh_l0"]
    assert weight.layout == torch.sparse_csr
    dense = weight.to_dense()
    assert (dense == 0).sum().item() == dense.numel() // 2
    assert torch.equal(dense, checkpoint["lstm.weight_hh_l0"])


def _read_mlflow_run(tmp_path, tracking_uri: str, run_id: str, local_run_dir: str) -> None:
    """The figure and both sparse files are the run's artifacts, downloaded equal to the local copies; the
    scalars are the run's metrics."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri)
    assert [a.path for a in client.list_artifacts(run_id, "dsd_figures")] == [f"dsd_figures/{FIGURE}"]
    assert sorted(a.path for a in client.list_artifacts(run_id, "dsd_sparse")) == [
        f"dsd_sparse/{name}" for name in SPARSE_FILES
    ]
    downloaded = tmp_path / "downloaded"
    figure = client.download_artifacts(run_id, f"dsd_figures/{FIGURE}", str(downloaded))
    assert filecmp.cmp(figure, os.path.join(local_run_dir, "dsd_figures", FIGURE), shallow=False)
    assert matplotlib.image.imread(figure).ndim == 3  # a PNG image
    sparse_dir = client.download_artifacts(run_id, "dsd_sparse", str(downloaded))
    _check_the_exported_model_is_the_sparse_one(*(os.path.join(sparse_dir, name) for name in SPARSE_FILES[::-1]))

    phases = sorted(client.get_metric_history(run_id, "dsd/phase"), key=lambda m: (m.step, m.timestamp))
    # One value per step: each epoch end (steps 2, 4, 6) shows the phase after that step's transition.
    assert [(m.step, m.value) for m in phases] == [(2, 1.0), (4, 2.0), (6, 2.0)]
    assert 0.5 in {m.value for m in client.get_metric_history(run_id, "dsd/sparsity")}  # 840 of 1680 pruned
    assert {m.value for m in client.get_metric_history(run_id, "dsd_lr/optimizer0_group0")} == {0.1, 0.1 * 0.1}


def test_mlflow_file_store_lists_figures_and_sparse_exports_as_the_runs_artifacts(tmp_path, monkeypatch, caplog):
    monkeypatch.chdir(tmp_path)  # mlflow writes under the working directory
    tracking_uri = _file_store(tmp_path, monkeypatch)
    logger = MLFlowLogger(experiment_name="dsd", tracking_uri=tracking_uri)
    caplog.set_level("INFO", logger="lightning_dsd")
    with pytest.warns(UserWarning, match=r"figures are saved as PNG under .* and handed to MLFlowLogger as the run's"):
        _fit(tmp_path, logger)
    local_run_dir = os.path.join(str(tmp_path / "mlruns"), logger.experiment_id, logger.run_id)
    assert f"under {local_run_dir}, and hands them to MLFlowLogger as the run's files" in caplog.text
    _read_mlflow_run(tmp_path, tracking_uri, logger.run_id, local_run_dir)


@pytest.mark.slow  # MLflow builds its database schema
def test_mlflow_with_a_database_store_and_no_save_dir_keeps_the_local_copy_under_default_root_dir(
    tmp_path, monkeypatch
):
    monkeypatch.chdir(tmp_path)  # mlflow's default artifact root is under the working directory
    tracking_uri = f"sqlite:///{tmp_path}/mlflow.db"
    logger = MLFlowLogger(experiment_name="dsd", tracking_uri=tracking_uri)
    assert logger.save_dir is None
    with pytest.warns(UserWarning, match="handed to MLFlowLogger"):
        dsd = _fit(tmp_path / "root", logger)
    local_run_dir = os.path.join(str(tmp_path / "root"), logger.experiment_id, logger.run_id)
    assert dsd.exported_sparse_models[0]["checkpoint"] == os.path.join(local_run_dir, "dsd_sparse", "cycle0.ckpt")
    _read_mlflow_run(tmp_path, tracking_uri, logger.run_id, local_run_dir)


def test_mlflow_beside_tensorboard_gets_the_files_of_the_tensorboard_directory(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    tracking_uri = _file_store(tmp_path, monkeypatch)
    mlflow_logger = MLFlowLogger(experiment_name="dsd", tracking_uri=tracking_uri)
    tensorboard = TensorBoardLogger(tmp_path, name="tb")
    _fit(tmp_path, [mlflow_logger, tensorboard])
    assert os.path.exists(os.path.join(tensorboard.log_dir, "dsd_figures", FIGURE))  # TensorBoard's as before
    _read_mlflow_run(tmp_path, tracking_uri, mlflow_logger.run_id, tensorboard.log_dir)


def test_mlflow_takes_a_sharded_checkpoints_folder_whole_under_its_name(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    tracking_uri = _file_store(tmp_path, monkeypatch)
    logger = MLFlowLogger(experiment_name="dsd", tracking_uri=tracking_uri)
    trainer = make_trainer([], logger=logger, default_root_dir=tmp_path)
    hand_to_loggers(trainer, _sharded_checkpoint(tmp_path / "run", 0), str(tmp_path / "run"))
    from mlflow.tracking import MlflowClient

    listed = MlflowClient(tracking_uri).list_artifacts(logger.run_id, "dsd_sparse/cycle0.ckpt")
    assert sorted(a.path for a in listed) == [f"dsd_sparse/cycle0.ckpt/{name}" for name in SHARDS]


def test_mlflow_that_cannot_take_a_file_gets_a_warning_naming_where_it_is_and_training_goes_on(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    logger = MLFlowLogger(experiment_name="dsd", tracking_uri=_file_store(tmp_path, monkeypatch))

    def refuse(*args, **kwargs):
        raise ConnectionError("the tracking server is down")

    monkeypatch.setattr(logger.experiment, "log_artifact", refuse)
    with pytest.warns(UserWarning, match=r"could not hand dsd_sparse.cycle0.ckpt to MLFlowLogger \(ConnectionError:"
                      r" the tracking server is down\); it is saved at .*cycle0.ckpt"):
        dsd = _fit(tmp_path, logger)
    assert dsd.phase == "redense" and os.path.exists(dsd.exported_sparse_models[0]["checkpoint"])


@pytest.mark.slow  # W&B starts its service process
def test_wandb_offline_run_holds_figures_and_sparse_exports_in_its_files_and_the_scalars(tmp_path, monkeypatch):
    import wandb

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("WANDB_MODE", "offline")  # restored afterwards (WandbLogger sets it for offline runs)
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    monkeypatch.setenv("WANDB_SILENT", "true")
    logger = WandbLogger(project="dsd", save_dir=str(tmp_path), offline=True)
    try:
        with pytest.warns(UserWarning, match="handed to WandbLogger"):
            _fit(tmp_path, logger)
        run_files, summary = logger.experiment.dir, dict(logger.experiment.summary)  # the run's last values
        sharded = _sharded_checkpoint(tmp_path / "sharded", 1)
        hand_to_loggers(make_trainer([], logger=logger), sharded, str(tmp_path / "sharded"))
    finally:
        wandb.finish()
    assert os.listdir(os.path.join(run_files, "dsd_figures")) == [FIGURE]
    assert sorted(os.listdir(os.path.join(run_files, "dsd_sparse"))) == SPARSE_FILES + ["cycle1.ckpt"]
    assert sorted(os.listdir(os.path.join(run_files, "dsd_sparse", "cycle1.ckpt"))) == SHARDS  # a folder, whole
    _check_the_exported_model_is_the_sparse_one(*(os.path.join(run_files, "dsd_sparse", n) for n in SPARSE_FILES[::-1]))
    assert (summary["dsd/phase"], summary["dsd/cycle"], summary["dsd_lr/optimizer0_group0"]) == (2.0, 0.0, 0.1 * 0.1)
    assert glob.glob(str(tmp_path / "wandb" / "offline-run-*" / "files" / "dsd_figures" / FIGURE))
    local_run_dir = tmp_path / "dsd" / logger.version  # <save_dir>/<project>/<run id>, ModelCheckpoint's rule
    assert filecmp.cmp(local_run_dir / "dsd_figures" / FIGURE, os.path.join(run_files, "dsd_figures", FIGURE))


@pytest.mark.slow  # MLflow builds its database schema
def test_transformers_with_mlflow_and_wandb_gets_the_scalars_in_the_trainers_one_run_and_the_figures_as_files(
    tmp_path, monkeypatch
):
    """The transformers door's scalars go through ``Trainer.log``, so MLflow's integration records them in the
    run it started (DSD opens none); the figure, kept in the TensorBoard run's directory, is handed to the MLflow
    run (by id: the last one is drawn after the integration ended its run) and to the W&B run's files."""
    transformers = pytest.importorskip("transformers")
    import wandb
    from mlflow.tracking import MlflowClient

    from lightning_dsd.huggingface import DSDTrainerCallback

    monkeypatch.chdir(tmp_path)
    tracking_uri = f"sqlite:///{tmp_path}/mlflow.db"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", tracking_uri)
    monkeypatch.setenv("MLFLOW_EXPERIMENT_NAME", "dsd")
    for name, value in (("WANDB_MODE", "offline"), ("WANDB_DIR", str(tmp_path)), ("WANDB_SILENT", "true"),
                        ("WANDB_PROJECT", "dsd"), ("TENSORBOARD_LOGGING_DIR", str(tmp_path / "tb"))):
        monkeypatch.setenv(name, value)
    torch.manual_seed(0)
    model = transformers.GPT2LMHeadModel(transformers.GPT2Config(
        n_layer=1, n_embd=16, n_head=2, vocab_size=48, n_positions=8, bos_token_id=0, eos_token_id=0))
    tokens = torch.randint(0, 48, (8, 8), generator=torch.Generator().manual_seed(1))
    data = [{"input_ids": row, "labels": row} for row in tokens]
    args = transformers.TrainingArguments(
        output_dir=str(tmp_path / "out"), per_device_train_batch_size=4, num_train_epochs=3, use_cpu=True,
        report_to=["mlflow", "tensorboard", "wandb"], save_strategy="no",
        disable_tqdm=True, seed=0, logging_steps=1)
    dsd = DSDTrainerCallback(0.5, 1, 1, 1, figure_layers=1, log_histograms=False)
    try:
        transformers.Trainer(model=model, args=args, train_dataset=data, callbacks=[dsd]).train()
        wandb_files = wandb.run.dir
    finally:
        wandb.finish()

    client = MlflowClient(tracking_uri)
    runs = client.search_runs([client.get_experiment_by_name("dsd").experiment_id])
    assert len(runs) == 1  # DSD's logs opened no run of their own
    run_id = runs[0].info.run_id
    phases = client.get_metric_history(run_id, "dsd/phase")
    # One value per step: each epoch end (steps 2, 4, 6) shows the phase after that step's transition.
    assert [(m.step, m.value) for m in phases] == [(2, 1.0), (4, 2.0), (6, 2.0)]
    assert 0.5 in {m.value for m in client.get_metric_history(run_id, "dsd/sparsity")}
    local = glob.glob(str(tmp_path / "tb" / "**" / "dsd_figures" / "*.png"), recursive=True)
    assert len(local) == 1, local  # one cycle, one layer
    figure = os.path.basename(local[0])
    assert [a.path for a in client.list_artifacts(run_id, "dsd_figures")] == [f"dsd_figures/{figure}"]
    assert filecmp.cmp(client.download_artifacts(run_id, f"dsd_figures/{figure}", str(tmp_path / "down")), local[0],
                       shallow=False)
    assert os.listdir(os.path.join(wandb_files, "dsd_figures")) == [figure]
