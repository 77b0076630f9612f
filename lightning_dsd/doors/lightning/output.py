"""Where ``DSDCallback`` writes: the ``Trainer``'s loggers, the output directory beside them, and the run's
files in the loggers that keep them (MLflow's artifacts, W&B's files).

Examples:
    >>> import lightning.pytorch as pl
    >>> trainer = pl.Trainer(logger=False, default_root_dir="runs", enable_progress_bar=False)
    >>> output_directory(trainer)
    'runs'
    >>> LoggerSink(trainer).has_loggers
    False
"""

from __future__ import annotations

import glob
import os
from typing import Optional

import lightning.pytorch as pl
from lightning.pytorch.loggers import Logger, MLFlowLogger, TensorBoardLogger, WandbLogger

from lightning_dsd.rules import log
from lightning_dsd.rules.sinks import WriterSink


def output_directory(trainer: "pl.Trainer") -> str:
    """Where everything DSD writes goes (figures, sparse exports), one directory per run: the TensorBoard
    logger's ``log_dir``, else ``ModelCheckpoint``'s rule for the first logger,
    ``<save_dir or default_root_dir>/<name>/<version>`` (MLflow, W&B and Comet runs share one ``save_dir``
    and differ by name and version), else ``default_root_dir``."""
    tensorboard = _tensorboard_logger(trainer)
    if tensorboard is not None:
        return tensorboard.log_dir
    if not trainer.loggers:
        return trainer.default_root_dir
    first = trainer.loggers[0]
    version = first.version if isinstance(first.version, str) else f"version_{first.version}"
    return os.path.join(first.save_dir or trainer.default_root_dir, str(first.name), version)


def _tensorboard_logger(trainer: "pl.Trainer") -> Optional[TensorBoardLogger]:
    return next((logger for logger in trainer.loggers if isinstance(logger, TensorBoardLogger)), None)


def file_keeping_loggers(trainer: "pl.Trainer") -> list[Logger]:
    """The Trainer's loggers that keep a run's files in their own store, where their UI lists them: MLflow
    (the run's artifacts) and W&B (the run's files). DSD hands them what it writes under
    :func:`output_directory` (see :func:`hand_to_loggers`).

    Examples:
        >>> import lightning.pytorch as pl
        >>> file_keeping_loggers(pl.Trainer(logger=False, enable_progress_bar=False))
        []
    """
    return [logger for logger in trainer.loggers if isinstance(logger, (MLFlowLogger, WandbLogger))]


def hand_to_loggers(trainer: "pl.Trainer", path: str, directory: str) -> None:
    """On rank zero, hand ``path`` (a file or a folder that DSD wrote under the output ``directory``) to each
    logger that keeps a run's files, at the same place relative to ``directory``: MLflow logs it as an
    artifact of the logger's run (``dsd_figures/cycle0_fc.weight.png``), W&B saves it among the run's files
    (``files/dsd_figures/...``; ``wandb`` links or copies it there and uploads it now, or at ``wandb sync``
    offline). The local file stays where it is. A logger that fails to take it (a server that is down) gets a
    warning that says where the file is; training goes on."""
    if not trainer.is_global_zero:
        return
    relative = os.path.relpath(path, directory)
    for logger in file_keeping_loggers(trainer):
        try:
            if isinstance(logger, MLFlowLogger) and os.path.isdir(path):
                logger.experiment.log_artifacts(logger.run_id, path, artifact_path=relative)
            elif isinstance(logger, MLFlowLogger):
                logger.experiment.log_artifact(logger.run_id, path, artifact_path=os.path.dirname(relative))
            elif isinstance(logger, WandbLogger):
                files = [os.path.join(root, f) for root, _, names in os.walk(path) for f in names] or [path]
                for file in files:
                    logger.experiment.save(glob.escape(file), base_path=directory, policy="now")
        except Exception as error:  # the file is on disk already: a tracking server's failure must not end training
            log.warn(
                f"DSD could not hand {relative} to {type(logger).__name__} ({type(error).__name__}: {error}); it is"
                f" saved at {path}. Upload it to the run by hand once the tracking server is reachable."
            )


class LoggerSink(WriterSink):
    """The :class:`~lightning_dsd.rules.sinks.WriterSink` of a Lightning ``Trainer``: its writer is the
    ``TensorBoardLogger``'s (histograms, text and figures), scalars go to every logger at the ``global_step``, and
    figures, saved as PNG files under ``<output directory>/dsd_figures``, are handed to MLflow and W&B loggers as the
    run's files (:func:`hand_to_loggers`)."""

    def __init__(self, trainer: "pl.Trainer") -> None:
        self.trainer = trainer
        tensorboard = _tensorboard_logger(trainer)  # its writer exists from `setup` on (Lightning opens it first)
        super().__init__(None if tensorboard is None else tensorboard.experiment, lambda: trainer.global_step,
                         rank_zero=trainer.is_global_zero, logs=bool(trainer.loggers))

    @property
    def directory(self) -> str:
        """The run's :func:`output_directory`."""
        return output_directory(self.trainer)

    def log_metrics(self, metrics: dict[str, float]) -> None:
        """Scalars to every logger (each writes on rank zero only)."""
        for logger in self.trainer.loggers:
            logger.log_metrics(metrics, step=self.trainer.global_step)

    def figure_saved(self, path: str) -> None:
        hand_to_loggers(self.trainer, path, self.directory)

    def say_where_files_go(self) -> None:
        """Say once, at ``setup``, where figures and sparse exports are written, and which loggers get them."""
        keepers = [type(logger).__name__ for logger in file_keeping_loggers(self.trainer)]
        handed = f", and hands them to {', '.join(keepers)} as the run's files" if keepers else ""
        directory = output_directory(self.trainer)
        log.info(f"DSDCallback writes its figures and sparse exports under {directory}{handed}.")

    def check_loggers(self, histograms: bool, scalars: bool, figures: bool) -> None:
        """Say once, before training, what the Trainer's loggers cannot show."""
        if not self.trainer.loggers:
            if histograms or scalars or figures:
                log.info("DSDCallback logs nothing: the Trainer has no logger (logger=False).")
        elif _tensorboard_logger(self.trainer) is None and (histograms or figures):
            log.warn(
                "DSDCallback skips weight histograms and the figure's TensorBoard image: they need a"
                f" TensorBoardLogger and the loggers are {[type(lg).__name__ for lg in self.trainer.loggers]}."
                f" Scalars go to every logger; figures are saved as PNG under {self.figure_directory()}"
                + (" and handed to " + ", ".join(type(lg).__name__ for lg in file_keeping_loggers(self.trainer))
                   + " as the run's files." if file_keeping_loggers(self.trainer) else ".")
            )
