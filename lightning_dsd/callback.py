"""``DSDCallback``: Dense-Sparse-Dense training (Han et al., ICLR 2017) for any Lightning ``Trainer``.

The callback only coordinates: the schedule lives in :mod:`lightning_dsd.phases`, the choice of targets in
:mod:`lightning_dsd.selection`, the masks in :mod:`lightning_dsd.masks`, their enforcement in
:mod:`lightning_dsd.constraint` and the learning-rate change in :mod:`lightning_dsd.lr`.
"""

from __future__ import annotations

from functools import partial
from typing import Any, Mapping, Optional, Sequence, Union

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback, EarlyStopping, StochasticWeightAveraging
from lightning.pytorch.strategies import (
    DDPStrategy,
    DeepSpeedStrategy,
    FSDPStrategy,
    ModelParallelStrategy,
    SingleDeviceStrategy,
)
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from torch import Tensor, nn
from typing_extensions import override

from lightning_dsd.arguments import (
    check_bool,
    check_choice,
    check_every_n,
    check_figure_layers,
    check_layer_sparsity,
    check_layer_types,
    check_length,
    check_non_negative_int,
    check_patterns,
    check_real,
    check_sparsities,
)
from lightning_dsd.constraint import MASK_STORAGES, SparseConstraint
from lightning_dsd.export import export_sparse_model
from lightning_dsd.lr import current_learning_rates, scale_learning_rates
from lightning_dsd.masks import NMPattern, pack_mask, unpack_mask
from lightning_dsd.phases import ConvergenceTracker, Moment, Phase, Schedule, Stage, build_stages
from lightning_dsd.plan import SCOPES, MaskPlan, shown
from lightning_dsd.redense import REDENSE_INITS, reinitialize_pruned
from lightning_dsd.reporting import PhaseReporter, output_directory
from lightning_dsd.selection import (
    LayerSpec,
    LayerType,
    Selection,
    check_selection,
    matches_any,
    select_parameters,
    uninitialized_parameters,
    unmatched_patterns,
)
from lightning_dsd.sharding import FullMasks, any_sharded, check_placements, local_slice, pruned_total
from lightning_dsd.sharding import decide_masks as decide_sharded_masks
from lightning_dsd.state import RunConfig, decode_state, encode_state


class DSDCallback(Callback):
    r"""Train Dense → Sparse → Re-dense, exactly as the DSD paper does, with one line in the ``Trainer``.

    **Dense**: normal training. **Sparse**: at the transition, in every targeted tensor of ``N`` weights
    the ``round(sparsity * N)`` smallest in magnitude are pruned; the mask is fixed for the phase and
    pruned weights stay exactly zero after every optimizer step. **Re-dense**: the constraint is lifted,
    pruned weights restart from zero (with zeroed optimizer state) and every learning rate, scheduler
    included, becomes ``lr_scale`` times what it would have been. Several sparsities run several cycles
    (``(0.5, 0.25)`` runs D S D S D); each re-dense multiplies the learning rate by ``lr_scale`` again.

    The model is never reparametrized: its ``state_dict``, parameters and forward pass stay those of the
    plain model in every phase.

    Args:
        sparsity: fraction of weights pruned in the sparse phase, in (0, 1), or an ``"N:M"`` pattern (keep
            the N largest of every M consecutive weights along the input dimension), or one per cycle.
        dense_epochs: length of the first dense phase; ``0`` prunes before the first step (the paper's use
            on pre-trained models); ``None`` runs it until ``monitor`` converges.
        sparse_epochs: length of each sparse phase, likewise.
        redense_epochs: length of each re-dense phase, likewise.
        interval: ``"epoch"`` or ``"step"``: what the three lengths count (optimizer steps for ``"step"``).
        monitor: metric that decides convergence for phases given as ``None``.
        mode: ``"min"`` or ``"max"``: which direction of ``monitor`` is an improvement.
        patience: checks without improvement after which a phase has converged.
        min_delta: smallest change of ``monitor`` that counts as an improvement.
        lr_scale: factor applied to every learning rate at each re-dense (paper: 0.1).
        include: glob patterns over parameter names that replace the default targets (the connection
            weights of linear-like layers, see :mod:`lightning_dsd.selection`; embeddings are left dense
            unless tied to an output layer).
        exclude: glob patterns over parameter names never to prune (e.g. ``"conv1.*"``: the paper keeps
            the first convolution dense).
        layer_types: your own linear-like modules: a mapping from the module class (or its
            ``"module.QualName"``) to a :class:`~lightning_dsd.selection.LayerSpec` naming its connection
            weights and their input dimension, e.g. ``{MyLinear: LayerSpec(input_dim=0)}``.
        scope: ``"layer"`` (a threshold per tensor, the paper's) or ``"global"`` (one over all targets).
        stop_at_end: stop the ``Trainer`` when the last phase ends.
        log_histograms: log weight histograms to TensorBoard at the five moments of every cycle.
        histogram_every_n_epochs: also log a histogram timeline every this many epochs (``None``: never).
        histogram_layers: glob patterns picking the targeted layers that get histograms (``None``: all).
        log_scalars: log phase, cycle, measured sparsity and learning rates (at every epoch end and every
            transition) to every logger, and a text note of every transition to TensorBoard.
        figure_layers: the five-panel figure is drawn for this many of the largest targeted layers, or for
            the targeted layers matching these glob patterns; ``0`` turns it off.
        layer_sparsity: per-layer overrides, a mapping from parameter-name glob to a sparsity (float or
            ``"N:M"``) used in every cycle; the first matching pattern wins. Needs ``scope="layer"``.
        export_sparse: at the end of each sparse phase, save the sparse model under
            ``<output directory>/dsd_sparse/`` (see :func:`~lightning_dsd.reporting.output_directory`):
            ``"checkpoint"`` (a normal Lightning checkpoint) or ``"sparse"``
            (that, plus a ``state_dict`` whose pruned tensors are torch sparse tensors).
        redense_init: how pruned weights restart at re-dense: ``"zero"`` (the paper's) or
            ``"small_normal"`` (normal noise with a tenth of the standard deviation of the layer's
            surviving weights, drawn from a generator seeded with ``seed`` and the cycle).
        seed: seed of the random re-dense initialisation.
        mask_storage: how masks are kept during sparse phases: ``"weight_dtype"`` (one element of the
            weight's dtype per weight, applied with a fused multiply: the fastest measured) or ``"bool"``
            (1 byte per weight, applied by the same fused multiply; bool multiplies run at about 0.4 of copy
            speed on the CPU, see the performance docs).

    The current phase is shown in the progress bar as ``dsd=<phase>``. See :mod:`lightning_dsd.reporting`
    for every TensorBoard tag.

    Examples:
        >>> import lightning.pytorch as pl
        >>> dsd = DSDCallback(sparsity=0.5, dense_epochs=10, sparse_epochs=10, redense_epochs=10)
        >>> trainer = pl.Trainer(max_epochs=30, callbacks=[dsd], logger=False, enable_progress_bar=False)
        >>> dsd.phase
        <Phase.DENSE: 'dense'>
    """

    def __init__(
        self,
        sparsity: Union[float, str, Sequence[Union[float, str]]],
        dense_epochs: Optional[int],
        sparse_epochs: Optional[int],
        redense_epochs: Optional[int],
        *,
        interval: str = "epoch",
        monitor: Optional[str] = None,
        mode: str = "min",
        patience: int = 3,
        min_delta: float = 0.0,
        lr_scale: float = 0.1,
        include: Optional[Union[str, Sequence[str]]] = None,
        exclude: Optional[Union[str, Sequence[str]]] = None,
        layer_types: Optional[Mapping[LayerType, LayerSpec]] = None,
        scope: str = "layer",
        stop_at_end: bool = True,
        log_histograms: bool = True,
        histogram_every_n_epochs: Optional[int] = None,
        histogram_layers: Optional[Union[str, Sequence[str]]] = None,
        log_scalars: bool = True,
        figure_layers: Union[int, Sequence[str]] = 2,
        layer_sparsity: Optional[Mapping[str, Union[float, str]]] = None,
        export_sparse: Optional[str] = None,
        redense_init: str = "zero",
        seed: int = 0,
        mask_storage: str = "weight_dtype",
    ) -> None:
        super().__init__()
        self.sparsities = check_sparsities(sparsity)
        lengths = {
            "dense_epochs": check_length("dense_epochs", dense_epochs),
            "sparse_epochs": check_length("sparse_epochs", sparse_epochs),
            "redense_epochs": check_length("redense_epochs", redense_epochs),
        }
        self.interval = check_choice("interval", interval, ("epoch", "step"))
        if monitor is not None and not (isinstance(monitor, str) and monitor):
            raise ValueError(f"`monitor` must be None or the name of a logged metric. Found: {monitor!r}.")
        waiting = [name for name, length in lengths.items() if length is None]
        if waiting and monitor is None:
            raise ValueError(
                f"{', '.join(f'`{n}`' for n in waiting)} = None runs a phase until a metric converges, so"
                " `monitor` must name a logged metric (e.g. monitor='val_loss'). Found: monitor=None."
            )
        self.monitor = monitor
        self.mode = check_choice("mode", mode, ("min", "max"))
        self.patience = check_non_negative_int("patience", patience)
        self.min_delta = check_real("min_delta", min_delta)
        self.lr_scale = check_real("lr_scale", lr_scale, positive=True)
        self.include = check_patterns("include", include)
        self.exclude = check_patterns("exclude", exclude)
        self.layer_types = check_layer_types(layer_types)
        self.scope = check_choice("scope", scope, SCOPES)
        self.layer_sparsity = check_layer_sparsity(layer_sparsity)
        uses_patterns = any(isinstance(s, NMPattern) for s in self.sparsities)
        if self.scope == "global" and (self.layer_sparsity or uses_patterns):
            raise ValueError(
                "`scope='global'` sets one threshold over all targets, so it takes neither `layer_sparsity` nor"
                f" 'N:M' patterns. Found: layer_sparsity={layer_sparsity!r}, sparsity={sparsity!r}."
            )
        self.export_sparse = None if export_sparse is None else check_choice(
            "export_sparse", export_sparse, ("checkpoint", "sparse")
        )
        self.redense_init = check_choice("redense_init", redense_init, REDENSE_INITS)
        self.seed = check_non_negative_int("seed", seed)
        self.mask_storage = check_choice("mask_storage", mask_storage, MASK_STORAGES)
        self.exported_sparse_models: list[dict[str, Any]] = []
        self.stop_at_end = check_bool("stop_at_end", stop_at_end)
        self.histogram_every_n_epochs = check_every_n("histogram_every_n_epochs", histogram_every_n_epochs)
        self.histogram_layers = check_patterns("histogram_layers", histogram_layers)
        self._reporter = PhaseReporter(
            histograms=check_bool("log_histograms", log_histograms),
            scalars=check_bool("log_scalars", log_scalars),
            figure_layers=check_figure_layers(figure_layers),
        )

        tracker = ConvergenceTracker(self.mode, self.patience, self.min_delta) if monitor is not None else None
        self._schedule = Schedule(build_stages(self.sparsities, *lengths.values()), tracker)
        self._selection = Selection(selected={})
        self._plan = MaskPlan(self.sparsities, self.scope, self.layer_sparsity)
        self._histogram_targets: dict[str, nn.Parameter] = {}
        self._constraint: Optional[SparseConstraint] = None
        self._restored_masks: Optional[dict[str, Tensor]] = None
        self._check_on_train_epoch_end = True
        self._schedule_completed = False

    # ------------------------------------------------------------------ read-only state

    @property
    def phase(self) -> Phase:
        """The current phase: :attr:`Phase.DENSE`, :attr:`Phase.SPARSE` or :attr:`Phase.REDENSE`."""
        return self._schedule.stage.phase

    @property
    def cycle(self) -> int:
        """The 0-based DSD cycle (one per sparsity)."""
        return self._schedule.stage.cycle

    @property
    def masks(self) -> dict[str, Tensor]:
        """Bool masks by parameter name, ``True`` where the weight is kept; empty outside sparse phases. For
        a sharded parameter (``DTensor``) the mask of this rank's shard, shaped like ``param.to_local()``."""
        if self._constraint is not None:
            return self._constraint.keep_masks()
        return dict(self._restored_masks or {})

    @property
    def mask_bytes(self) -> int:
        """Memory the masks of the current sparse phase hold on the weights' devices (0 outside one): one
        element of the weight's dtype per targeted weight, or 1 byte with ``mask_storage="bool"``."""
        if self._constraint is None:
            return 0
        return sum(mask.numel() * mask.element_size() for mask in self._constraint.masks)

    @property
    def layer_sparsities(self) -> dict[str, list[Union[float, str]]]:
        """The sparsity each targeted parameter gets in each cycle, after ``layer_sparsity`` overrides."""
        return self._plan.per_layer(list(self._targets))

    @property
    def selection(self) -> Selection:
        """What was chosen to prune (at ``setup``; under ``ModelParallelStrategy`` at ``on_fit_start``, after
        ``configure_model``), with input dimensions, tied names and what was left dense."""
        return self._selection

    @property
    def _targets(self) -> dict[str, nn.Parameter]:
        return self._selection.selected

    @property
    def phase_label(self) -> str:
        """The phase as the progress bar shows it: ``"sparse"``, or ``"sparse 2/3"`` over several cycles."""
        cycles = len(self.sparsities)
        return self.phase.value if cycles == 1 else f"{self.phase.value} {self.cycle + 1}/{cycles}"

    @property
    def in_last_phase(self) -> bool:
        """Whether the schedule has reached its last phase (the final re-dense)."""
        return self._schedule.is_last

    @property
    def target_names(self) -> list[str]:
        """Names of the parameters this callback prunes (known once ``fit`` has set it up)."""
        return list(self._targets)

    # ------------------------------------------------------------------ set-up checks

    @override
    def setup(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", stage: str) -> None:
        if stage != TrainerFn.FITTING:
            return
        self._check_strategy(trainer)
        self._check_other_callbacks(trainer)
        if not isinstance(trainer.strategy, ModelParallelStrategy):
            self._choose_targets(trainer, pl_module)
        self._reporter.check_loggers(trainer)
        if trainer.is_global_zero and trainer.loggers and (self._reporter.figure_layers or self.export_sparse):
            rank_zero_info(f"DSDCallback writes its figures and sparse exports under {output_directory(trainer)}.")
        self._show_phase_in_progress_bar(trainer)
        self._warn_if_schedule_does_not_fit(trainer)
        self._check_on_train_epoch_end = trainer.val_check_interval == 1.0 and trainer.check_val_every_n_epoch == 1

    @override
    def on_fit_start(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> None:
        # ModelParallelStrategy builds or shards the model in `configure_model`, after `setup`: the targets
        # are the sharded parameters it leaves, known here (before any checkpoint is restored).
        if isinstance(trainer.strategy, ModelParallelStrategy):
            self._choose_targets(trainer, pl_module)

    def _choose_targets(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> None:
        _materialize_lazy_modules(pl_module)
        self._selection = self._select_targets(pl_module)
        check_placements(self._targets)
        self._plan = MaskPlan(self.sparsities, self.scope, self.layer_sparsity, self._selection.input_dims)
        self._plan.check_fits(self._targets)
        self._warn_about_unmatched_patterns(pl_module)
        self._histogram_targets = {
            name: param
            for name, param in self._targets.items()
            if self.histogram_layers is None or matches_any(name, self.histogram_layers)
        }
        self._reporter.choose_figure_layers(self._targets)

    @staticmethod
    def _check_strategy(trainer: "pl.Trainer") -> None:
        strategy = trainer.strategy
        flattens = isinstance(strategy, (FSDPStrategy, DeepSpeedStrategy))
        if flattens or not isinstance(strategy, (SingleDeviceStrategy, DDPStrategy, ModelParallelStrategy)):
            raise ValueError(
                f"DSDCallback supports single-device training, DDP (`strategy='ddp'`, ...) and sharded models"
                f" under `ModelParallelStrategy` (FSDP2's `fully_shard`, tensor parallel, or both). Found strategy"
                f" {type(strategy).__name__}"
                + (", which flattens parameters into shards that mix layers, so per-tensor magnitude thresholds"
                   " cannot be computed." if flattens else ".")
                + " To run DSD on a sharded model, use `strategy=ModelParallelStrategy()` and apply `fully_shard`"
                " (and/or `parallelize_module`) in your LightningModule's `configure_model`."
            )

    def _show_phase_in_progress_bar(self, trainer: "pl.Trainer") -> None:
        """Add ``dsd=<phase>`` to what the progress bar's public ``get_metrics`` returns, until teardown."""
        bar = trainer.progress_bar_callback
        if bar is None or "get_metrics" in vars(bar):
            return
        metrics_of_bar = bar.get_metrics

        def get_metrics(trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> dict[str, Any]:
            return {**metrics_of_bar(trainer, pl_module), "dsd": self.phase_label}

        bar.get_metrics = get_metrics  # type: ignore[method-assign]

    def _check_not_finished(self) -> None:
        """Called at train start, after a checkpoint (if any) was restored: it resets the flag."""
        if self._schedule_completed:
            raise RuntimeError(
                "This DSDCallback already ran its whole schedule in an earlier `fit`"
                f" ({' -> '.join(f'{s.phase.value}' for s in self._schedule.stages)}), so another `fit` with it"
                " would train without DSD. To run DSD again, give the Trainer a new DSDCallback(...); to go on"
                " from a saved run, resume with `trainer.fit(model, ckpt_path=...)`."
            )

    def _check_other_callbacks(self, trainer: "pl.Trainer") -> None:
        callbacks: list[Callback] = trainer.callbacks  # type: ignore[attr-defined]  # set by Lightning at init
        if any(isinstance(cb, StochasticWeightAveraging) for cb in callbacks):
            raise ValueError(
                "DSDCallback cannot run with StochasticWeightAveraging: SWA replaces the learning-rate schedule"
                " that re-dense scales and, at the end, overwrites the weights with an average taken across"
                " phases (sparse ones included). Run SWA in a separate `fit` after DSD has finished."
            )
        if any(isinstance(cb, EarlyStopping) for cb in callbacks):
            rank_zero_warn(
                "EarlyStopping may end training before DSD's last phase (e.g. while the pruned model recovers)."
                " To stop each phase when a metric stops improving, give DSDCallback `monitor=` and pass `None`"
                " as that phase's length; keep EarlyStopping only if stopping in the middle of DSD is intended."
            )

    def _select_targets(self, pl_module: "pl.LightningModule") -> Selection:
        selection = select_parameters(pl_module, self.include, self.exclude, self.layer_types)
        check_selection(pl_module, selection, self.include, self.exclude)
        return selection

    def _warn_about_unmatched_patterns(self, pl_module: "pl.LightningModule") -> None:
        every_name = [name for name, _ in pl_module.named_parameters(remove_duplicate=False)]
        figure_patterns = None if isinstance(self._reporter.figure_layers, int) else self._reporter.figure_layers
        messages = [
            *unmatched_patterns("include", self.include, every_name),
            *unmatched_patterns("exclude", self.exclude, every_name),
            *unmatched_patterns("layer_sparsity", list(self.layer_sparsity or ()), list(self._targets)),
            *unmatched_patterns("histogram_layers", self.histogram_layers, list(self._targets)),
            *unmatched_patterns("figure_layers", figure_patterns, list(self._targets)),
        ]
        for message in messages:
            rank_zero_warn(f"DSDCallback: {message} Check the pattern against `model.named_parameters()`.")

    def _warn_if_schedule_does_not_fit(self, trainer: "pl.Trainer") -> None:
        needed = self._schedule.required_length()
        limit = trainer.max_epochs if self.interval == "epoch" else trainer.max_steps
        if needed is not None and limit is not None and limit >= 0 and limit < needed:
            unit = "max_epochs" if self.interval == "epoch" else "max_steps"
            rank_zero_warn(
                f"The DSD schedule needs {needed} {self.interval}s"
                f" ({' + '.join(str(s.length) for s in self._schedule.stages)}), but the Trainer has"
                f" {unit}={limit}: training will stop in the {self._schedule.stage_at(limit).phase.value} phase."
                f" Set {unit}={needed} to run every phase."
            )

    # ------------------------------------------------------------------ training hooks

    @override
    def on_train_start(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> None:
        self._check_not_finished()
        self._reporter.write_chart_layout(trainer)
        if self.phase is Phase.SPARSE:
            self._enforce(trainer, self._restored_masks if self._restored_masks is not None else self.masks)

    @override
    def on_train_epoch_start(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> None:
        self._advance_if_due(trainer)

    @override
    def on_train_batch_start(
        self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", batch: Any, batch_idx: int
    ) -> None:
        if self._constraint is not None:
            self._constraint.forget_masked_gradients()
        self._advance_if_due(trainer)

    @override
    def on_before_optimizer_step(
        self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", optimizer: torch.optim.Optimizer
    ) -> None:
        if self._constraint is not None:
            self._constraint.mask_gradients(optimizer)

    @override
    def on_train_batch_end(
        self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if self.interval == "step":
            self._stop_if_finished(trainer, trainer.global_step)

    @override
    def on_train_epoch_end(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> None:
        if self._check_on_train_epoch_end and not self._should_skip_check(trainer):
            self._observe_monitor(trainer)
        if self.interval == "epoch":
            self._stop_if_finished(trainer, trainer.current_epoch + 1)
        self._reporter.log_scalars(
            trainer, self.phase, self.cycle, self._targets, current_learning_rates(trainer.optimizers)
        )
        every = self.histogram_every_n_epochs
        if every and self._reporter.histograms and (trainer.current_epoch + 1) % every == 0:
            self._reporter.log_timeline(trainer, self._histogram_targets)

    @override
    def on_validation_end(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> None:
        if not self._check_on_train_epoch_end and not self._should_skip_check(trainer):
            self._observe_monitor(trainer)
            self._stop_if_finished(trainer, self._now(trainer))

    @override
    def on_train_end(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> None:
        self._schedule_completed = self._schedule.is_last and self._schedule.is_over(self._now(trainer))
        self._release_hooks()
        final_moment = {Phase.DENSE: Moment.END_OF_DENSE, Phase.SPARSE: Moment.END_OF_SPARSE}
        self._record(trainer, final_moment.get(self.phase, Moment.END_OF_REDENSE), self.cycle)
        if self.phase is not Phase.DENSE:
            self._reporter.draw_figure(trainer, self.cycle)

    @override
    def teardown(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", stage: str) -> None:
        self._release_hooks()
        if trainer.progress_bar_callback is not None:
            vars(trainer.progress_bar_callback).pop("get_metrics", None)

    # ------------------------------------------------------------------ phase transitions

    def _now(self, trainer: "pl.Trainer") -> int:
        return trainer.current_epoch if self.interval == "epoch" else trainer.global_step

    @staticmethod
    def _should_skip_check(trainer: "pl.Trainer") -> bool:
        return trainer.state.fn != TrainerFn.FITTING or trainer.sanity_checking

    def _advance_if_due(self, trainer: "pl.Trainer") -> None:
        now = self._now(trainer)
        while self._schedule.is_due(now):
            finished = self._schedule.stage
            if finished.phase is Phase.SPARSE:
                self._finish_sparse(trainer, finished)
            stage = self._schedule.advance(now)
            if stage.phase is Phase.SPARSE:
                self._prune(trainer, stage)
            else:
                self._redense(trainer, finished)
        self._stop_if_finished(trainer, now)

    def _record(self, trainer: "pl.Trainer", moment: Moment, cycle: int) -> None:
        self._reporter.record(trainer, moment, cycle, self._histogram_targets)

    def _prune(self, trainer: "pl.Trainer", stage: Stage) -> None:
        if stage.cycle > 0:
            self._record(trainer, Moment.END_OF_REDENSE, stage.cycle - 1)
            self._reporter.draw_figure(trainer, stage.cycle - 1)
        self._record(trainer, Moment.END_OF_DENSE, stage.cycle)
        if stage.cycle == 0:
            rank_zero_info(self._selection.summary())
            if self.layer_sparsity:
                rank_zero_info(f"DSD sparsity per parameter, one value per cycle: {self.layer_sparsities}")
        masks = self._decide_masks(trainer, stage.cycle)
        self._enforce(trainer, masks)
        self._record(trainer, Moment.AFTER_PRUNING, stage.cycle)
        learning_rates = current_learning_rates(trainer.optimizers)
        self._reporter.log_scalars(trainer, self.phase, self.cycle, self._targets, learning_rates)
        pruned, total = pruned_total(masks, self._targets)
        self._reporter.note_transition(
            trainer,
            f"DSD cycle {stage.cycle}: sparse phase. Pruned {pruned}/{total} weights ({pruned / total:.1%}) in"
            f" {len(masks)} tensors, scope={self.scope!r}; the masks stay fixed for this phase. Learning rate"
            f" unchanged: {_format_lrs(learning_rates)}.",
        )

    def _decide_masks(self, trainer: "pl.Trainer", cycle: int) -> dict[str, Tensor]:
        """Masks from the current weights: for sharded weights, each rank's part of the full tensors' masks
        (see :mod:`lightning_dsd.sharding`); otherwise decided on rank zero and broadcast (as packed bits) so
        every rank prunes alike; a single process keeps them as they are."""
        if any_sharded(self._targets):
            return decide_sharded_masks(self._plan, self._targets, cycle)
        if trainer.world_size == 1:
            return self._plan.decide(self._targets, cycle)
        packed: dict[str, Tensor] = {}
        if trainer.is_global_zero:
            packed = {name: pack_mask(mask) for name, mask in self._plan.decide(self._targets, cycle).items()}
        packed = trainer.strategy.broadcast(packed, src=0)
        return {name: unpack_mask(bits, self._targets[name].shape) for name, bits in packed.items()}

    def _enforce(self, trainer: "pl.Trainer", masks: dict[str, Tensor]) -> None:
        self._release_hooks()
        self._constraint = SparseConstraint(self._targets, masks, self.mask_storage)
        self._constraint.attach(trainer.optimizers)
        self._restored_masks = None

    def _finish_sparse(self, trainer: "pl.Trainer", finished: Stage) -> None:
        """The sparse phase's last look: its histograms, and the exported sparse model (saved while the
        schedule still says "sparse", so its callback state is that of the sparse phase)."""
        self._record(trainer, Moment.END_OF_SPARSE, finished.cycle)
        if self.export_sparse is not None:
            as_sparse_tensors = self.export_sparse == "sparse"
            self.exported_sparse_models.append(
                export_sparse_model(trainer, self._targets, finished.cycle, sparse_tensors=as_sparse_tensors)
            )

    def _redense(self, trainer: "pl.Trainer", finished: Stage) -> None:
        if self._constraint is not None:
            keep = self._constraint.keep_masks()
            self._constraint.detach(trainer.optimizers)
            self._constraint = None
            reinitialize_pruned(self._targets, keep, self.redense_init, seed=self.seed + finished.cycle)
        before = current_learning_rates(trainer.optimizers)
        schedulers = [config.scheduler for config in trainer.lr_scheduler_configs]
        scale_learning_rates(trainer.optimizers, schedulers, self.lr_scale)
        after = current_learning_rates(trainer.optimizers)
        self._reporter.note_transition(
            trainer,
            f"DSD cycle {finished.cycle}: re-dense phase. The constraint is lifted and pruned weights restart from"
            f" {'zero' if self.redense_init == 'zero' else 'small noise'}; learning rate x{self.lr_scale:g}:"
            f" {_format_lrs(before)} -> {_format_lrs(after)}.",
        )
        self._record(trainer, Moment.START_OF_REDENSE, finished.cycle)
        self._reporter.log_scalars(trainer, self.phase, self.cycle, self._targets, after)

    def _observe_monitor(self, trainer: "pl.Trainer") -> None:
        if self.monitor is None:
            return
        value = trainer.callback_metrics.get(self.monitor)
        if value is None:
            raise RuntimeError(
                f"DSDCallback's `monitor={self.monitor!r}` is not among the logged metrics. Log it with"
                f" `self.log({self.monitor!r}, ...)` or pick one of: {sorted(trainer.callback_metrics)}."
            )
        self._schedule.observe(trainer.strategy.broadcast(float(value), src=0))

    def _stop_if_finished(self, trainer: "pl.Trainer", now: int) -> None:
        if self.stop_at_end and self._schedule.is_last and self._schedule.is_over(now) and not trainer.should_stop:
            trainer.should_stop = True
            rank_zero_info(f"DSD finished its last phase ({self.phase.value}, cycle {self.cycle}): stopping.")

    def _release_hooks(self) -> None:
        if self._constraint is not None:
            self._constraint.detach()

    # ------------------------------------------------------------------ checkpointing

    @override
    def state_dict(self) -> dict[str, Any]:
        """The schedule and, in a sparse phase, the full masks at 1 bit per weight (a sharded weight's mask
        is gathered from its shards, one tensor at a time, on every rank), so a resume works on any mesh."""
        masks = FullMasks(self.masks, self._targets) if self.phase is Phase.SPARSE else {}
        return encode_state(self._schedule.state_dict(), masks, self._run_config())

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Check the checkpoint's DSD state against this callback (see :mod:`lightning_dsd.state`), then
        take it; a damaged or mismatched state raises before anything changes."""
        shapes = {name: list(param.shape) for name, param in self._targets.items()}
        check_masks = partial(self._plan.check_masks, self._targets)
        schedule, masks = decode_state(state_dict, self._run_config(), check_masks, shapes)
        self._schedule.load_state_dict(schedule)
        local_masks = {name: local_slice(mask, self._targets[name]) for name, mask in masks.items()}  # one at a time
        self._restored_masks = local_masks or None
        self._schedule_completed = False

    def _run_config(self) -> RunConfig:
        stages = [[s.phase.value, s.cycle, s.length, shown(s.sparsity)] for s in self._schedule.stages]
        layer_sparsity = {p: shown(s) for p, s in self.layer_sparsity.items()} if self.layer_sparsity else None
        return RunConfig(stages, self.interval, self.scope, layer_sparsity, list(self._targets))


def _format_lrs(lrs: list[list[float]]) -> str:
    return ", ".join(f"{lr:.3g}" for group_lrs in lrs for lr in group_lrs)


def _materialize_lazy_modules(pl_module: "pl.LightningModule") -> None:
    """Shape lazy modules (``nn.LazyLinear``, ...) with one forward pass of ``example_input_array``, as
    Lightning's model summary does; without it, refuse with what to do."""
    lazy = uninitialized_parameters(pl_module)
    if not lazy:
        return
    example = pl_module.example_input_array
    if example is None:
        raise ValueError(
            f"DSDCallback needs the shapes of the weights it prunes, but {lazy} belong to lazy modules that no"
            " forward pass has shaped yet. Run one forward pass (e.g. `model(example_batch)`) before"
            " `trainer.fit`, or set `self.example_input_array` in the LightningModule so DSD can run it."
        )
    with torch.no_grad():
        if isinstance(example, (list, tuple)):
            pl_module(*example)
        elif isinstance(example, dict):
            pl_module(**example)
        else:
            pl_module(example)
