"""Where reports go: :class:`WriterSink`, the one :class:`~lightning_dsd.rules.reporting.ReportSink` of every door.

A sink is a ``SummaryWriter``-like writer (histograms, text, figures, and scalars by default), the step that
the door's clock reads, whether this process writes (rank zero) and the directory figures are saved in, under
:data:`FIGURE_FOLDER`. The loop door (:class:`~lightning_dsd.DSD`) uses it as it is; a framework door subclasses
it only where its framework differs: where scalars go (a Lightning ``Trainer``'s loggers, ``Trainer.log`` in
``transformers``) and who keeps a run's files (MLflow's artifacts, W&B's files).

Examples:
    >>> import os, tempfile
    >>> from torch.utils.tensorboard import SummaryWriter
    >>> writer = SummaryWriter(log_dir=tempfile.mkdtemp())
    >>> sink = WriterSink(writer, step=lambda: 3)
    >>> sink.has_loggers, sink.has_histograms, sink.step, sink.tensorboard() is writer
    (True, True, 3, True)
    >>> sink.figure_directory() == os.path.join(writer.log_dir, FIGURE_FOLDER)
    True
    >>> sink.log_metrics({"dsd/phase": 1.0})  # add_scalar("dsd/phase", 1.0, 3), on rank zero
    >>> writer.close()
    >>> WriterSink(None, step=lambda: 0).has_loggers  # no writer: nothing is logged
    False
"""

from __future__ import annotations

import os
from typing import Any, Callable, Optional

import torch.distributed as dist

from lightning_dsd.rules.sharding import from_rank_zero

#: The folder, under a run's directory, that figure PNGs are saved in (and the name the run's tracking tools
#: list them under: MLflow's artifacts, W&B's files).
FIGURE_FOLDER = "dsd_figures"


class WriterSink:
    """A :class:`~lightning_dsd.rules.reporting.ReportSink` over a ``torch.utils.tensorboard.SummaryWriter`` (or
    anything with its ``add_histogram``/``add_scalar``/``add_text``/``add_figure``/``add_custom_scalars``): rank
    zero writes, every rank gathers. What is logged is rank zero's call (it has the writer; other ranks may pass
    ``None`` or their own), so every rank joins the same gathers.

    Args:
        writer: the writer, or ``None`` (nothing logged). One with ``add_scalar`` only gets the scalars.
        step: reads the step logged values are filed under from the door's clock.
        directory: the run's directory, figures go under its :data:`FIGURE_FOLDER`; by default the writer's
            ``log_dir`` (``None``: figures are not saved as files).
        rank_zero: whether this process writes; by default whether its ``torch.distributed`` rank is 0.
        logs: whether anything is logged at all; by default whether there is a writer (a door whose scalars go
            elsewhere says so). Rank zero's answer counts, on every rank.

    A subclass changes only what its framework does differently: :meth:`log_metrics` (where scalars go),
    :meth:`figure_saved` (who else keeps the figure), :attr:`directory`.
    """

    def __init__(
        self,
        writer: Optional[Any],
        step: Callable[[], int],
        *,
        directory: Optional[str] = None,
        rank_zero: Optional[bool] = None,
        logs: Optional[bool] = None,
    ) -> None:
        self._writer = writer
        self._step = step
        self._directory = directory
        self._rank_zero = (dist.get_rank() == 0 if dist.is_initialized() else True) if rank_zero is None else rank_zero
        wants = writer is not None if logs is None else logs
        self._logs, self._histograms = from_rank_zero((bool(wants), hasattr(writer, "add_histogram")))

    @property
    def is_rank_zero(self) -> bool:
        return self._rank_zero

    @property
    def step(self) -> int:
        return int(self._step())

    @property
    def has_loggers(self) -> bool:
        return self._logs

    @property
    def has_histograms(self) -> bool:
        return self._histograms

    @property
    def directory(self) -> Optional[str]:
        """The run's directory: figures are saved under its :data:`FIGURE_FOLDER` (``None``: not saved)."""
        return self._directory if self._directory is not None else getattr(self._writer, "log_dir", None)

    def tensorboard(self) -> Optional[Any]:
        """The writer for histograms, text and figures, on rank zero; ``None`` elsewhere or without one."""
        return self._writer if self.is_rank_zero and hasattr(self._writer, "add_histogram") else None

    def log_metrics(self, metrics: dict[str, float]) -> None:
        """Each scalar to the writer at :attr:`step`, on rank zero."""
        if self.is_rank_zero and self._writer is not None:
            step = self.step
            for tag, value in metrics.items():
                self._writer.add_scalar(tag, value, step)

    def figure_directory(self) -> Optional[str]:
        directory = self.directory
        return os.path.join(directory, FIGURE_FOLDER) if directory else None

    def figure_saved(self, path: str) -> None:
        """Nothing more: the run's directory is where the figure is kept."""
