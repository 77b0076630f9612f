"""Where the transformers door's reports go: :class:`TrainerLogSink`, the door's
:class:`~lightning_dsd.rules.sinks.WriterSink` (scalars through ``Trainer.log``, the rest to the Trainer's
TensorBoard directory), that directory (:func:`tensorboard_directory`) and the hand-over of figures to the
Trainer's MLflow and W&B runs (:func:`tracking_uploads`).

Examples:
    >>> from transformers import TrainingArguments
    >>> args = TrainingArguments(output_dir="out", use_cpu=True, report_to="none")
    >>> tensorboard_directory(None, args) is None  # no report_to="tensorboard": no directory
    True
    >>> tracking_uploads(None)  # no Trainer, no integration to hand figures to
    []
"""

from __future__ import annotations

import glob
import os
from functools import partial
from typing import Any, Callable, Mapping, Optional, Sequence

from transformers import Trainer, TrainerState, TrainingArguments

from lightning_dsd.rules import log
from lightning_dsd.rules.sinks import FIGURE_FOLDER, WriterSink


class TrainerLogSink(WriterSink):
    """The :class:`~lightning_dsd.rules.sinks.WriterSink` of a ``transformers.Trainer``: scalars through
    ``Trainer.log`` (every reporting integration gets them), histograms, text and figures through a
    ``SummaryWriter`` of DSD's own in the Trainer's TensorBoard directory, figures handed to its MLflow and W&B
    runs too; only rank zero writes."""

    def __init__(self, trainer: Optional[Trainer], args: TrainingArguments, state: TrainerState,
                 options: Any) -> None:
        self._trainer = trainer
        self._options = options
        self._report_to = list(args.report_to or [])
        directory = tensorboard_directory(trainer, args) if state.is_world_process_zero else None
        writer: Optional[Any] = None
        if directory is not None:
            from torch.utils.tensorboard import SummaryWriter

            writer = SummaryWriter(log_dir=directory)
            if trainer is not None:  # name the charts' scalars as the Trainer's TensorBoardCallback writes them
                writer = TrainPrefixedLayout(writer)
        super().__init__(writer, lambda: int(state.global_step), directory=directory,
                         rank_zero=bool(state.is_world_process_zero), logs=bool(self._report_to))
        self._prefix, self._trainer_logs = "", True
        self._uploads = tracking_uploads(trainer) if self.is_rank_zero and directory is not None else []

    def integrations_closed(self) -> None:
        """From ``on_train_end`` on, the Trainer's reporting integrations have ended their runs (they come before
        user callbacks), and ``Trainer.log`` would make MLflow open a new run: scalars go to DSD's TensorBoard
        writer only, under the tags ``Trainer.log`` gives them (``train/...``)."""
        self._prefix = "train/" if self._trainer is not None else ""
        self._trainer_logs = False

    def log_metrics(self, metrics: dict[str, float]) -> None:
        if not self.is_rank_zero:
            return
        if self._trainer is not None and self._trainer_logs:
            self._trainer.log(dict(metrics))
        else:
            super().log_metrics({self._prefix + tag: value for tag, value in metrics.items()})

    def figure_saved(self, path: str) -> None:
        """Hand the figure, kept in the TensorBoard run's directory, to the runs of the Trainer's MLflow and W&B
        integrations too (as ``dsd_figures/<file>``), where their UIs list a run's files. The last figure is
        drawn after they ended their runs at ``on_train_end``: MLflow takes it by run id, W&B's run is still open.
        A run that fails to take it gets a warning saying where the file is; training goes on."""
        for name, upload in self._uploads:
            try:
                upload(path)
            except Exception as error:  # the figure is on disk already: a tracking server must not end training
                log.warn(f"DSDTrainerCallback could not hand {os.path.basename(path)} to {name}"
                         f" ({type(error).__name__}: {error}); it is saved at {path}.")

    def say_what_is_skipped(self) -> None:
        """Once, before training: what the Trainer's reporting set-up cannot show."""
        options = self._options
        wants_histograms = options.log_histograms or bool(options.figure_layers)
        if not self._report_to:
            if options.log_scalars or wants_histograms:
                log.info(
                    "DSDTrainerCallback logs nothing (report_to='none'): no dsd/* scalars, weight histograms,"
                    " TensorBoard notes or figures; transition notes are printed only. Use report_to='tensorboard'"
                    " (and any other integration) to keep them."
                )
            return
        if self._trainer is None and self.is_rank_zero:
            log.warn(
                "DSDTrainerCallback could not find the transformers.Trainer that runs it, so its dsd/* scalars go"
                " to TensorBoard only (if any), not through `Trainer.log` to the other integrations."
            )
        if not self.has_histograms and wants_histograms:
            log.warn(
                "DSDTrainerCallback skips weight histograms, TensorBoard notes and the figure: they need"
                f" report_to to include 'tensorboard' (it is {self._report_to}). Scalars go through Trainer.log."
            )

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()  # DSD's own writer (the Trainer's TensorBoardCallback has its own)


class TrainPrefixedLayout:
    """A ``SummaryWriter`` whose CUSTOM SCALARS layout names the scalars as transformers' ``TensorBoardCallback``
    writes what goes through ``Trainer.log``: with ``train/`` before each tag (``rewrite_logs``), since TensorBoard
    matches a chart's regex at the start of the tag. Everything else is the writer's own."""

    def __init__(self, writer: Any) -> None:
        self._writer = writer

    def __getattr__(self, name: str) -> Any:
        return getattr(self._writer, name)

    def add_custom_scalars(self, layout: Mapping[str, Mapping[str, Sequence[Any]]]) -> None:
        prefixed = {}
        for category, charts in layout.items():
            prefixed[category] = {title: [kind, [f"train/{regex}" for regex in regexes]]
                                  for title, (kind, regexes) in charts.items()}
        self._writer.add_custom_scalars(prefixed)


def tensorboard_directory(trainer: Optional[Trainer], args: TrainingArguments) -> Optional[str]:
    """The directory the Trainer's TensorBoard run writes to: its ``TensorBoardCallback``'s writer's, else the
    directory that callback chose (set at its ``on_train_begin``, which runs before any user callback's),
    else ``TENSORBOARD_LOGGING_DIR``; ``None`` without ``report_to="tensorboard"``."""
    if "tensorboard" not in (args.report_to or []):
        return None
    if trainer is not None:
        from transformers.integrations import TensorBoardCallback

        for callback in trainer.callback_handler.callbacks:
            if isinstance(callback, TensorBoardCallback):
                writer = getattr(callback, "tb_writer", None)
                directory = getattr(writer, "log_dir", None) or callback.logging_dir
                if directory:
                    return str(directory)
    directory = os.getenv("TENSORBOARD_LOGGING_DIR")
    return os.path.expanduser(directory) if directory else None


def tracking_uploads(trainer: Optional[Trainer]) -> list[tuple[str, Callable[[str], None]]]:
    """For each of the Trainer's MLflow and W&B integrations with a run open (at DSD's ``on_train_begin``, after
    theirs), its name and how to add a figure to that run's files under ``dsd_figures/``."""
    if trainer is None:
        return []
    from transformers.integrations import MLflowCallback, WandbCallback

    uploads: list[tuple[str, Callable[[str], None]]] = []
    for callback in trainer.callback_handler.callbacks:
        if isinstance(callback, MLflowCallback) and callback._ml_flow.active_run() is not None:
            from mlflow.tracking import MlflowClient

            client, run_id = MlflowClient(), callback._ml_flow.active_run().info.run_id
            uploads.append(("MLflow", partial(_log_mlflow_artifact, client, run_id)))
        elif isinstance(callback, WandbCallback) and getattr(callback._wandb, "run", None) is not None:
            uploads.append(("W&B", partial(_save_wandb_file, callback._wandb.run)))
    return uploads


def _log_mlflow_artifact(client: Any, run_id: str, path: str) -> None:
    client.log_artifact(run_id, path, artifact_path=FIGURE_FOLDER)


def _save_wandb_file(run: Any, path: str) -> None:
    run.save(glob.escape(path), base_path=os.path.dirname(os.path.dirname(path)), policy="now")
