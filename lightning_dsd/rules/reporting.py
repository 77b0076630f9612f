"""What DSD shows in TensorBoard: weight histograms at the five moments of a cycle, scalars, the figure.

Tags (``<layer>`` is the parameter name, e.g. ``conv1.weight``):

* ``dsd_weights/<layer>/<n>_<moment>``: all weights at moment ``n`` of each cycle (``1_end_of_dense``,
  ``2_after_pruning``, ``3_end_of_sparse``, ``4_start_of_redense``, ``5_end_of_redense``);
  ``dsd_weights_nonzero/...`` the same without the exact zeros, whose spike otherwise hides the gap and
  the bimodal "soft boundary" (a tensor with no non-zero entry has no such histogram: it is skipped, and
  said once). The step is the training step of the moment, so a multi-cycle run shows one histogram per
  cycle in each tag.
* ``dsd_weights_timeline/<layer>``: all weights every ``histogram_every_n_epochs`` epochs, if asked.
* ``dsd/phase`` (0 dense, 1 sparse, 2 re-dense), ``dsd/cycle``, ``dsd/sparsity`` (exact zeros among all
  targeted weights, measured) and ``dsd_sparsity/<layer>``, ``dsd_lr/optimizer<i>_group<j>``: one value per
  step, at every epoch end and transition; where they share a step (the transitions due at the start of the next
  epoch), the value after the transitions (the engine logs them once the step's transitions are made).
* ``dsd/transitions`` (TEXT tab): what each transition did (what was pruned, the learning-rate change);
  the CUSTOM SCALARS tab groups phase, sparsity and learning rate in charts of their own.
* ``dsd/run`` (TEXT tab): the run's record, JSON in a code block, written when training starts (again at a
  resume) whatever the logging options: its arm (``dsd``, ``llr`` or ``dense``, from ``prune`` and
  ``lr_scale``), its seed (:func:`current_seed`), the schedule and every option. :mod:`lightning_dsd.tools.compare`
  pairs runs by it.
* ``dsd_figure/<layer>``: the paper's five-panel figure for each cycle, also saved as
  ``<output directory>/dsd_figures/cycle<c>_<layer>.png`` (and, under Lightning, handed to MLflow and W&B
  loggers as the run's files).

Where things go is the :class:`ReportSink`'s business: one :class:`~lightning_dsd.rules.sinks.WriterSink`
over a ``SummaryWriter`` (``DSD``'s as it is; ``DSDCallback``'s with a Lightning ``Trainer``'s loggers,
:class:`~lightning_dsd.doors.lightning.output.LoggerSink`; ``DSDTrainerCallback``'s with ``Trainer.log``,
:class:`~lightning_dsd.doors.transformers.output.TrainerLogSink`). Only rank zero writes, and only at
transitions and epoch ends, never per step. Sharded weights (``DTensor``) are shown whole: every rank takes part
in gathering them, one tensor at a time, and in counting zeros; a write that fails on rank zero fails only after
every rank has left the gathers, so no rank is left waiting in a collective.
"""

from __future__ import annotations

import importlib.util
import json
import os
from typing import Any, Callable, Iterator, Mapping, Optional, Protocol, Sequence

import torch
from torch import Tensor

from lightning_dsd.rules import log
from lightning_dsd.rules.phases import Moment, Phase
from lightning_dsd.rules.selection import matches_any
from lightning_dsd.rules.sharding import any_sharded, count_zeros, full_tensor

_MATPLOTLIB_AVAILABLE = importlib.util.find_spec("matplotlib") is not None
FIGURE_SAMPLE_SIZE = 200_000
PHASE_CODES = {Phase.DENSE: 0, Phase.SPARSE: 1, Phase.REDENSE: 2}
RUN_RECORD_TAG = "dsd/run"


def current_seed() -> int:
    """The seed of this run: ``seed_everything``'s (Lightning keeps it in the ``PL_GLOBAL_SEED`` environment
    variable, which Fabric's and LightningCLI's seeding set too), else ``torch.initial_seed()``.

    Examples:
        >>> import lightning.pytorch as pl
        >>> _ = pl.seed_everything(42, verbose=False)
        >>> current_seed()
        42
    """
    seed = os.environ.get("PL_GLOBAL_SEED")
    return int(seed) if seed is not None and seed.lstrip("-").isdigit() else torch.initial_seed()


def run_record_text(record: Mapping[str, Any]) -> str:
    """The record as the TEXT tab shows it: JSON in a Markdown code block, one key per line, nested ones indented
    (read back by :func:`read_run_record`).

    Examples:
        >>> print(run_record_text({"arm": "dsd", "options": {"lr_scale": 0.1}}))
        ```json
        {
          "arm": "dsd",
          "options": {
            "lr_scale": 0.1
          }
        }
        ```
    """
    return "```json\n" + json.dumps(record, sort_keys=True, indent=2) + "\n```"


def read_run_record(text: str) -> Any:
    """The record in the text of a ``dsd/run`` summary.

    Examples:
        >>> read_run_record(run_record_text({"arm": "llr", "seed": 3}))
        {'arm': 'llr', 'seed': 3}
    """
    body = text.strip()
    body = body.removeprefix("```json").removesuffix("```")
    return json.loads(body)


class ReportSink(Protocol):
    """Where a :class:`PhaseReporter` writes: a TensorBoard ``SummaryWriter`` (or anything with its
    ``add_histogram``/``add_text``/``add_figure``/``add_custom_scalars``) and scalar loggers."""

    @property
    def is_rank_zero(self) -> bool:
        """Whether this process writes (every process takes part in gathers all the same)."""

    @property
    def step(self) -> int:
        """The step logged values are filed under."""

    @property
    def has_loggers(self) -> bool:
        """Whether anything is logged at all (the same answer on every rank)."""

    @property
    def has_histograms(self) -> bool:
        """Whether rank zero has a writer for histograms (the same answer on every rank, which decides what
        every rank gathers)."""

    def tensorboard(self) -> Optional[Any]:
        """The ``SummaryWriter`` for histograms, text and figures, or ``None``."""

    def log_metrics(self, metrics: dict[str, float]) -> None:
        """Log scalars (on rank zero) at :attr:`step`."""

    def figure_directory(self) -> Optional[str]:
        """Where figure PNGs are saved, or ``None`` for nowhere."""

    def figure_saved(self, path: str) -> None:
        """Called on rank zero after each figure PNG is saved under :meth:`figure_directory`: hand it to the
        run's tracking tool where that tool keeps a run's files (MLflow's artifacts, W&B's files), or do
        nothing where the directory is all there is (TensorBoard)."""


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
        self._warned_empty: set[str] = set()
        self._figure_names: list[str] = []
        self.figure_title = "DSD weight distribution"
        self._samples: dict[str, Tensor] = {}
        self._snapshots: dict[tuple[int, Moment], dict[str, Tensor]] = {}

    # -------------------------------------------------------------- the five moments

    def choose_figure_layers(self, weights: Mapping[str, Tensor]) -> None:
        """The layers drawn in figures: the ``figure_layers`` largest, or those matching its patterns."""
        if isinstance(self.figure_layers, int):
            by_size = sorted(weights, key=lambda name: -weights[name].numel())
            self._figure_names = by_size[: self.figure_layers]
        else:
            self._figure_names = [name for name in weights if matches_any(name, self.figure_layers)]

    @torch.no_grad()
    def record(self, sink: ReportSink, moment: Moment, cycle: int, weights: Mapping[str, Tensor]) -> None:
        """Log the histograms of ``moment`` and keep a sample of the figure layers for the cycle's figure."""
        if not sink.has_loggers:
            return
        histograms = self.histograms and sink.has_histograms
        wanted = [name for name in weights if histograms or name in self._figure_names]
        tensorboard = sink.tensorboard() if histograms else None
        snapshot = {}

        def write(name: str, values: Tensor) -> None:
            if tensorboard is not None:
                tensorboard.add_histogram(f"dsd_weights/{name}/{moment.value}", values, sink.step)
                self._histogram_of_nonzero(tensorboard, name, moment, values, sink)
            if name in self._figure_names:
                snapshot[name] = self._sample(name, values)

        _write_each(sink, weights, wanted, write)
        if sink.is_rank_zero and self._figure_names:
            self._snapshots[(cycle, moment)] = snapshot

    def _histogram_of_nonzero(
        self, tensorboard: Any, name: str, moment: Moment, values: Tensor, sink: ReportSink
    ) -> None:
        tag = f"dsd_weights_nonzero/{name}/{moment.value}"
        nonzero = values[values != 0]
        if nonzero.numel():
            tensorboard.add_histogram(tag, nonzero, sink.step)
            return
        if name not in self._warned_empty:
            self._warned_empty.add(name)
            log.warn(
                f"DSD skips the histogram `{tag}` (and later ones of `{name}` while it stays so): every entry of"
                " the tensor is zero, so there is no non-zero value to show. Its `dsd_weights/` histogram shows"
                " the zeros."
            )

    def _sample(self, name: str, flat: Tensor) -> Tensor:
        """The same random subset of entries at every moment, so panels compare like with like."""
        if flat.numel() <= FIGURE_SAMPLE_SIZE:
            return flat.clone()
        if name not in self._samples:
            generator = torch.Generator().manual_seed(0)
            self._samples[name] = torch.randperm(flat.numel(), generator=generator)[:FIGURE_SAMPLE_SIZE]
        return flat[self._samples[name]]

    def log_timeline(self, sink: ReportSink, weights: Mapping[str, Tensor]) -> None:
        if not (self.histograms and sink.has_histograms):
            return
        tensorboard = sink.tensorboard()

        def write(name: str, values: Tensor) -> None:
            if tensorboard is not None:
                tensorboard.add_histogram(f"dsd_weights_timeline/{name}", values, sink.step)

        _write_each(sink, weights, list(weights), write)

    # -------------------------------------------------------------- transitions and charts

    def note_transition(self, sink: ReportSink, text: str) -> None:
        """Say what a transition did, on the console and, kept with the run, in TensorBoard's TEXT tab."""
        log.info(text)
        if self.scalars and sink.is_rank_zero and (tensorboard := sink.tensorboard()) is not None:
            tensorboard.add_text("dsd/transitions", text, sink.step)

    def write_run_record(self, sink: ReportSink, record: Mapping[str, Any]) -> None:
        """Keep the run's record in its log (``dsd/run``), whatever the logging options: comparisons need it."""
        if sink.is_rank_zero and (tensorboard := sink.tensorboard()) is not None:
            tensorboard.add_text(RUN_RECORD_TAG, run_record_text(record), sink.step)

    def write_chart_layout(self, sink: ReportSink) -> None:
        """Group DSD's scalars in TensorBoard's CUSTOM SCALARS tab: phase, sparsity and learning rate, each a
        chart of its own (one value per step, at every epoch end and transition, so each reads as a step at
        the transition)."""
        if self.scalars and sink.is_rank_zero and (tensorboard := sink.tensorboard()) is not None:
            tensorboard.add_custom_scalars({"DSD": {
                "phase (0 dense, 1 sparse, 2 re-dense)": ["Multiline", [r"dsd/phase"]],
                "measured sparsity of the targets": ["Multiline", [r"dsd/sparsity", r"dsd_sparsity/.*"]],
                "learning rate": ["Multiline", [r"dsd_lr/.*"]],
            }})

    # -------------------------------------------------------------- scalars

    def log_scalars(
        self,
        sink: ReportSink,
        phase: Phase,
        cycle: int,
        weights: Mapping[str, Tensor],
        learning_rates: Optional[Sequence[Sequence[float]]] = None,
    ) -> None:
        if not (self.scalars and sink.has_loggers) or not (sink.is_rank_zero or any_sharded(weights)):
            return
        zeros = count_zeros(weights)  # a collective for sharded weights: every rank counts its shards
        if not sink.is_rank_zero:
            return
        total = sum(w.numel() for w in weights.values())
        metrics = {
            "dsd/phase": float(PHASE_CODES[phase]),
            "dsd/cycle": float(cycle),
            **({"dsd/sparsity": sum(zeros.values()) / total} if total else {}),
            **{f"dsd_sparsity/{name}": zeros[name] / w.numel() for name, w in weights.items() if w.numel()},
        }
        for i, group_lrs in enumerate(learning_rates or ()):
            metrics.update({f"dsd_lr/optimizer{i}_group{j}": lr for j, lr in enumerate(group_lrs)})
        sink.log_metrics(metrics)

    # -------------------------------------------------------------- the figure

    def draw_figure(self, sink: ReportSink, cycle: int) -> None:
        """Draw, log and save the five-panel figure of ``cycle`` for each figure layer."""
        if not (sink.is_rank_zero and sink.has_loggers and self._figure_names):
            return
        if not _MATPLOTLIB_AVAILABLE:
            if not self._warned_matplotlib:
                self._warned_matplotlib = True
                log.warn(
                    "DSD skips the five-panel figure: matplotlib is not installed"
                    " (`pip install lightning-dsd[figures]`). Histograms and scalars are unaffected."
                )
            return
        from lightning_dsd.rules.figure import five_panel_figure

        tensorboard = sink.tensorboard()
        directory = sink.figure_directory()
        if directory is not None:
            os.makedirs(directory, exist_ok=True)
        for name in self._figure_names:
            panels = {m: self._snapshots[(cycle, m)][name] for m in Moment if (cycle, m) in self._snapshots}
            figure = five_panel_figure(name, cycle, panels, title=self.figure_title)
            if directory is not None:
                path = os.path.join(directory, f"cycle{cycle}_{name}.png")
                figure.savefig(path, dpi=80)
                sink.figure_saved(path)
            if tensorboard is not None:
                tensorboard.add_figure(f"dsd_figure/{name}", figure, sink.step, close=False)
        for moment in Moment:
            self._snapshots.pop((cycle, moment), None)


def _write_each(
    sink: ReportSink, weights: Mapping[str, Tensor], names: Sequence[str], write: Callable[[str, Tensor], None]
) -> None:
    """``write(name, values)`` on rank zero for each named weight, gathered whole one tensor at a time. Every
    rank gathers a sharded weight with the others (a collective); an error of a write is raised only after
    the last gather, so it cannot leave the other ranks waiting in one."""
    failure: Optional[BaseException] = None
    for name, values in _full_values(sink, weights, names):
        if failure is None:
            try:
                write(name, values)
            except Exception as error:  # re-raised below, once every rank is past the gathers
                failure = error
    if failure is not None:
        raise failure


def _full_values(sink: ReportSink, weights: Mapping[str, Tensor], names: Sequence[str]) -> Iterator[tuple[str, Tensor]]:
    """The flattened float values of each named weight, whole, on rank zero; one tensor at a time. Every
    rank gathers a sharded weight with the others (a collective), only rank zero gets the values."""
    for name in names:
        values = full_tensor(weights[name])
        if sink.is_rank_zero:
            yield name, values.flatten().float().cpu()
