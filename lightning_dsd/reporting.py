"""What DSD shows in TensorBoard: weight histograms at the five moments of a cycle, scalars, the figure.

Tags (``<layer>`` is the parameter name, e.g. ``conv1.weight``):

* ``dsd_weights/<layer>/<n>_<moment>``: all weights at moment ``n`` of each cycle (``1_end_of_dense``,
  ``2_after_pruning``, ``3_end_of_sparse``, ``4_start_of_redense``, ``5_end_of_redense``);
  ``dsd_weights_nonzero/...`` the same without the exact zeros, whose spike otherwise hides the gap and
  the bimodal "soft boundary". The step is the ``global_step`` of the moment, so a multi-cycle run shows
  one histogram per cycle in each tag.
* ``dsd_weights_timeline/<layer>``: all weights every ``histogram_every_n_epochs`` epochs, if asked.
* ``dsd/phase`` (0 dense, 1 sparse, 2 re-dense), ``dsd/cycle``, ``dsd/sparsity`` (exact zeros among all
  targeted weights, measured) and ``dsd_sparsity/<layer>``: at every epoch end and transition;
  ``dsd_lr/optimizer<i>_group<j>``: at every epoch end and transition. Scalars go to every logger.
* ``dsd/transitions`` (TEXT tab): what each transition did (what was pruned, the learning-rate change);
  the CUSTOM SCALARS tab groups phase, sparsity and learning rate in charts of their own.
* ``dsd_figure/<layer>``: the paper's five-panel figure for each cycle, also saved as
  ``<output directory>/dsd_figures/cycle<c>_<layer>.png`` (see :func:`output_directory`).

Histograms and figures need a ``TensorBoardLogger``; without one they are skipped with one warning.
Only rank zero writes, and only at transitions and epoch ends, never per step. Sharded weights (``DTensor``)
are shown whole: every rank takes part in gathering them, one tensor at a time, and in counting zeros.
"""

from __future__ import annotations

import os
from typing import Iterator, Mapping, Optional, Sequence

import lightning.pytorch as pl
import torch
from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from lightning_utilities.core.imports import RequirementCache
from torch import Tensor

from lightning_dsd.phases import Moment, Phase
from lightning_dsd.selection import matches_any
from lightning_dsd.sharding import any_sharded, count_zeros, full_tensor

_MATPLOTLIB_AVAILABLE = RequirementCache("matplotlib")
FIGURE_SAMPLE_SIZE = 200_000
PHASE_CODES = {Phase.DENSE: 0, Phase.SPARSE: 1, Phase.REDENSE: 2}


def output_directory(trainer: "pl.Trainer") -> str:
    """Where everything DSD writes goes (figures, sparse exports): the TensorBoard logger's directory, else
    the first logger's ``log_dir`` or ``save_dir`` (what ``Trainer.log_dir`` reads, without its collective),
    else ``default_root_dir``.

    Examples:
        >>> import lightning.pytorch as pl
        >>> output_directory(pl.Trainer(logger=False, default_root_dir="runs", enable_progress_bar=False))
        'runs'
    """
    tensorboard = next((logger for logger in trainer.loggers if isinstance(logger, TensorBoardLogger)), None)
    if tensorboard is not None:
        return tensorboard.log_dir
    if trainer.loggers:
        first = trainer.loggers[0]
        directory = getattr(first, "log_dir", None) or first.save_dir
        if directory:
            return str(directory)
    return trainer.default_root_dir


class PhaseReporter:
    """Logs histograms, scalars and figures for the layers it is given; silent on ranks other than zero.

    Examples:
        >>> reporter = PhaseReporter(histograms=True, scalars=True, figure_layers=2)
        >>> reporter.figure_layers
        2
    """

    def __init__(self, histograms: bool, scalars: bool, figure_layers: int | Sequence[str]) -> None:
        self.histograms = histograms
        self.scalars = scalars
        self.figure_layers = figure_layers
        self._warned_matplotlib = False
        self._figure_names: list[str] = []
        self._samples: dict[str, Tensor] = {}
        self._snapshots: dict[tuple[int, Moment], dict[str, Tensor]] = {}

    # -------------------------------------------------------------- where things go

    @staticmethod
    def _tensorboard(trainer: "pl.Trainer") -> Optional[TensorBoardLogger]:
        return next((logger for logger in trainer.loggers if isinstance(logger, TensorBoardLogger)), None)

    def check_loggers(self, trainer: "pl.Trainer") -> None:
        """Say once, before training, what the Trainer's loggers cannot show."""
        if not trainer.loggers:
            if self.histograms or self.scalars or self.figure_layers:
                rank_zero_info("DSDCallback logs nothing: the Trainer has no logger (logger=False).")
        elif self._tensorboard(trainer) is None and (self.histograms or self.figure_layers):
            rank_zero_warn(
                "DSDCallback skips weight histograms and the figure's TensorBoard image: they need a"
                f" TensorBoardLogger and the loggers are {[type(lg).__name__ for lg in trainer.loggers]}."
                f" Scalars go to every logger; figures are saved as PNG under {self.figure_directory(trainer)}."
            )

    def figure_directory(self, trainer: "pl.Trainer") -> str:
        return os.path.join(output_directory(trainer), "dsd_figures")

    # -------------------------------------------------------------- the five moments

    def choose_figure_layers(self, weights: Mapping[str, Tensor]) -> None:
        """The layers drawn in figures: the ``figure_layers`` largest, or those matching its patterns."""
        if isinstance(self.figure_layers, int):
            by_size = sorted(weights, key=lambda name: -weights[name].numel())
            self._figure_names = by_size[: self.figure_layers]
        else:
            self._figure_names = [name for name in weights if matches_any(name, self.figure_layers)]

    @torch.no_grad()
    def record(self, trainer: "pl.Trainer", moment: Moment, cycle: int, weights: Mapping[str, Tensor]) -> None:
        """Log the histograms of ``moment`` and keep a sample of the figure layers for the cycle's figure."""
        if not trainer.loggers:
            return
        tensorboard = self._tensorboard(trainer) if self.histograms else None
        wanted = [name for name in weights if tensorboard is not None or name in self._figure_names]
        snapshot = {}
        for name, values in _full_values(trainer, weights, wanted):
            if tensorboard is not None:
                tensorboard.experiment.add_histogram(f"dsd_weights/{name}/{moment.value}", values, trainer.global_step)
                tensorboard.experiment.add_histogram(
                    f"dsd_weights_nonzero/{name}/{moment.value}", values[values != 0], trainer.global_step
                )
            if name in self._figure_names:
                snapshot[name] = self._sample(name, values)
        if trainer.is_global_zero and self._figure_names:
            self._snapshots[(cycle, moment)] = snapshot

    def _sample(self, name: str, flat: Tensor) -> Tensor:
        """The same random subset of entries at every moment, so panels compare like with like."""
        if flat.numel() <= FIGURE_SAMPLE_SIZE:
            return flat.clone()
        if name not in self._samples:
            generator = torch.Generator().manual_seed(0)
            self._samples[name] = torch.randperm(flat.numel(), generator=generator)[:FIGURE_SAMPLE_SIZE]
        return flat[self._samples[name]]

    def log_timeline(self, trainer: "pl.Trainer", weights: Mapping[str, Tensor]) -> None:
        if (tensorboard := self._tensorboard(trainer)) is not None:
            for name, values in _full_values(trainer, weights, list(weights)):
                tensorboard.experiment.add_histogram(f"dsd_weights_timeline/{name}", values, trainer.global_step)

    # -------------------------------------------------------------- transitions and charts

    def note_transition(self, trainer: "pl.Trainer", text: str) -> None:
        """Say what a transition did, on the console and, kept with the run, in TensorBoard's TEXT tab."""
        rank_zero_info(text)
        if self.scalars and trainer.is_global_zero and (tensorboard := self._tensorboard(trainer)) is not None:
            tensorboard.experiment.add_text("dsd/transitions", text, trainer.global_step)

    def write_chart_layout(self, trainer: "pl.Trainer") -> None:
        """Group DSD's scalars in TensorBoard's CUSTOM SCALARS tab: phase, sparsity and learning rate, each a
        chart of its own (values are logged at every epoch end and at every transition, so each reads as
        a step at the transition)."""
        if self.scalars and trainer.is_global_zero and (tensorboard := self._tensorboard(trainer)) is not None:
            tensorboard.experiment.add_custom_scalars({"DSD": {
                "phase (0 dense, 1 sparse, 2 re-dense)": ["Multiline", [r"dsd/phase"]],
                "measured sparsity of the targets": ["Multiline", [r"dsd/sparsity", r"dsd_sparsity/.*"]],
                "learning rate": ["Multiline", [r"dsd_lr/.*"]],
            }})

    # -------------------------------------------------------------- scalars

    def log_scalars(
        self,
        trainer: "pl.Trainer",
        phase: Phase,
        cycle: int,
        weights: Mapping[str, Tensor],
        learning_rates: Optional[Sequence[Sequence[float]]] = None,
    ) -> None:
        if not (self.scalars and trainer.loggers) or not (trainer.is_global_zero or any_sharded(weights)):
            return
        zeros = count_zeros(weights)  # a collective for sharded weights: every rank counts its shards
        if not trainer.is_global_zero:
            return
        total = sum(w.numel() for w in weights.values())
        metrics = {
            "dsd/phase": float(PHASE_CODES[phase]),
            "dsd/cycle": float(cycle),
            "dsd/sparsity": sum(zeros.values()) / total,
            **{f"dsd_sparsity/{name}": zeros[name] / w.numel() for name, w in weights.items()},
        }
        for i, group_lrs in enumerate(learning_rates or ()):
            metrics.update({f"dsd_lr/optimizer{i}_group{j}": lr for j, lr in enumerate(group_lrs)})
        for logger in trainer.loggers:
            logger.log_metrics(metrics, step=trainer.global_step)

    # -------------------------------------------------------------- the figure

    def draw_figure(self, trainer: "pl.Trainer", cycle: int) -> list[str]:
        """Draw, log and save the five-panel figure of ``cycle`` for each figure layer; return the PNG paths."""
        if not (trainer.is_global_zero and trainer.loggers and self._figure_names):
            return []
        if not _MATPLOTLIB_AVAILABLE:
            if not self._warned_matplotlib:
                self._warned_matplotlib = True
                rank_zero_warn(
                    "DSDCallback skips the five-panel figure: matplotlib is not installed"
                    " (`pip install lightning-dsd[figures]`). Histograms and scalars are unaffected."
                )
            return []
        from lightning_dsd.figure import five_panel_figure

        tensorboard = self._tensorboard(trainer)
        directory = self.figure_directory(trainer)
        os.makedirs(directory, exist_ok=True)
        paths = []
        for name in self._figure_names:
            panels = {m: self._snapshots[(cycle, m)][name] for m in Moment if (cycle, m) in self._snapshots}
            figure = five_panel_figure(name, cycle, panels)
            path = os.path.join(directory, f"cycle{cycle}_{name}.png")
            figure.savefig(path, dpi=80)
            paths.append(path)
            if tensorboard is not None:
                tensorboard.experiment.add_figure(f"dsd_figure/{name}", figure, trainer.global_step, close=False)
        for moment in Moment:
            self._snapshots.pop((cycle, moment), None)
        return paths


def _full_values(
    trainer: "pl.Trainer", weights: Mapping[str, Tensor], names: Sequence[str]
) -> Iterator[tuple[str, Tensor]]:
    """The flattened float values of each named weight, whole, on rank zero; one tensor at a time. Every
    rank gathers a sharded weight with the others (a collective), only rank zero gets the values."""
    for name in names:
        values = full_tensor(weights[name])
        if trainer.is_global_zero:
            yield name, values.flatten().float().cpu()
