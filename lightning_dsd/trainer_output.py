"""Where ``DSDCallback`` writes: the ``Trainer``'s loggers, and the output directory beside them.

Examples:
    >>> import lightning.pytorch as pl
    >>> trainer = pl.Trainer(logger=False, default_root_dir="runs", enable_progress_bar=False)
    >>> output_directory(trainer)
    'runs'
    >>> TrainerSink(trainer).has_loggers
    False
"""

from __future__ import annotations

import os
from typing import Any, Callable, Optional

import lightning.pytorch as pl
from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn


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


class ProgressBarPhase:
    """``dsd=<phase>`` in the progress bar: added to what the bar's public ``get_metrics`` returns for the
    length of a fit; a ``get_metrics`` the user set on the bar is left alone.

    Examples:
        >>> from lightning.pytorch.callbacks import TQDMProgressBar
        >>> bar, shown = TQDMProgressBar(), ProgressBarPhase()
        >>> shown.show(bar, lambda: "sparse"); "get_metrics" in vars(bar)
        True
        >>> shown.remove(bar); "get_metrics" in vars(bar)
        False
    """

    def __init__(self) -> None:
        self._installed: Optional[Any] = None

    def show(self, bar: Optional[Any], label: Callable[[], str]) -> None:
        if bar is None or "get_metrics" in vars(bar):
            return
        metrics_of_bar = bar.get_metrics

        def get_metrics(trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> dict[str, Any]:
            return {**metrics_of_bar(trainer, pl_module), "dsd": label()}

        bar.get_metrics = get_metrics
        self._installed = get_metrics

    def remove(self, bar: Optional[Any]) -> None:
        if bar is not None and self._installed is not None and vars(bar).get("get_metrics") is self._installed:
            del vars(bar)["get_metrics"]
        self._installed = None


class TrainerSink:
    """A :class:`~lightning_dsd.reporting.ReportSink` over a ``Trainer``: histograms, text and figures to its
    ``TensorBoardLogger``, scalars to every logger, at the ``global_step``; figures also as PNG files under
    ``<output directory>/dsd_figures``."""

    def __init__(self, trainer: "pl.Trainer") -> None:
        self.trainer = trainer

    @property
    def is_rank_zero(self) -> bool:
        return self.trainer.is_global_zero

    @property
    def step(self) -> int:
        return self.trainer.global_step

    @property
    def has_loggers(self) -> bool:
        return bool(self.trainer.loggers)

    @property
    def has_histograms(self) -> bool:
        return _tensorboard_logger(self.trainer) is not None

    def tensorboard(self) -> Optional[Any]:
        logger = _tensorboard_logger(self.trainer)
        return None if logger is None else logger.experiment

    def log_metrics(self, metrics: dict[str, float]) -> None:
        for logger in self.trainer.loggers:
            logger.log_metrics(metrics, step=self.trainer.global_step)

    def figure_directory(self) -> Optional[str]:
        return os.path.join(output_directory(self.trainer), "dsd_figures")

    def check_loggers(self, histograms: bool, scalars: bool, figures: bool) -> None:
        """Say once, before training, what the Trainer's loggers cannot show."""
        if not self.trainer.loggers:
            if histograms or scalars or figures:
                rank_zero_info("DSDCallback logs nothing: the Trainer has no logger (logger=False).")
        elif _tensorboard_logger(self.trainer) is None and (histograms or figures):
            rank_zero_warn(
                "DSDCallback skips weight histograms and the figure's TensorBoard image: they need a"
                f" TensorBoardLogger and the loggers are {[type(lg).__name__ for lg in self.trainer.loggers]}."
                f" Scalars go to every logger; figures are saved as PNG under {self.figure_directory()}."
            )
