"""``DSDCallback``: Dense-Sparse-Dense training (Han et al., ICLR 2017) for any Lightning ``Trainer``.

The callback is the ``Trainer``'s front door to :class:`~lightning_dsd.rules.engine.DSDEngine`, which holds every
DSD rule. It keeps only what is Lightning's: the strategy and callback checks, the mapping of Lightning's
hooks to the engine's clock (epochs or optimizer steps), the progress bar, the loggers and the output
directory, sparse exports and the ``Trainer``'s checkpoint state.
"""

# Annotations are evaluated here (no `from __future__ import annotations`): jsonargparse, and so LightningCLI,
# reads `LengthsArgument` as one optional type only from an evaluated signature, so that `null` means None.
from typing import Any, Mapping, Optional, Sequence, Union

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import BackboneFinetuning, Callback, EarlyStopping, StochasticWeightAveraging
from lightning.pytorch.strategies import (
    DDPStrategy,
    DeepSpeedStrategy,
    FSDPStrategy,
    ModelParallelStrategy,
    SingleDeviceStrategy,
)
from lightning.pytorch.trainer.states import TrainerFn
from torch import Tensor
from torch.optim import Optimizer
from typing_extensions import override

from lightning_dsd.doors.base import ReadsEngine
from lightning_dsd.doors.lightning.cli import SparsityValue
from lightning_dsd.doors.lightning.export import export_sparse_model
from lightning_dsd.doors.lightning.finetuning import BackboneRates
from lightning_dsd.doors.lightning.limits import training_limit
from lightning_dsd.doors.lightning.output import LoggerSink
from lightning_dsd.doors.lightning.progress import ProgressBarPhase
from lightning_dsd.rules import log
from lightning_dsd.rules.engine import DSDEngine, MetricSource
from lightning_dsd.rules.importance import Importance
from lightning_dsd.rules.options import LengthsArgument, check_bool, check_choice, check_options, door_options
from lightning_dsd.rules.selection import LayerSpec, LayerType, uninitialized_parameters


class DSDCallback(ReadsEngine, Callback):
    r"""Train Dense → Sparse → Re-dense, exactly as the DSD paper does, with one line in the ``Trainer``.

    **Dense**: normal training. **Sparse**: at the transition, in every targeted tensor of ``N`` weights
    the ``round(sparsity * N)`` smallest in magnitude (or by ``importance``) are pruned; the mask is fixed for the
    phase and pruned weights stay exactly zero after every optimizer step. **Re-dense**: the constraint is lifted,
    pruned weights restart from zero (with zeroed optimizer state) and every learning rate, scheduler
    included, becomes ``lr_scale`` times what it would have been. Several sparsities run several cycles
    (``(0.5, 0.25)`` runs D S D S D); each re-dense multiplies the learning rate by ``lr_scale`` again.
    With ``final_sparse_epochs`` the run ends sparse, as AC/DC does: after the last re-dense one more sparse
    phase prunes afresh at the last cycle's sparsity, and the final model holds its zeros.

    The model is never reparametrized: its ``state_dict``, parameters and forward pass stay those of the
    plain model in every phase.

    Args:
        sparsity: the sparsity of each cycle (:attr:`~lightning_dsd.rules.options.DSDOptions.sparsities`).
        dense_epochs: the length of the first dense phase, in epochs (or optimizer steps with ``interval="step"``);
            this and the next two are :attr:`~lightning_dsd.rules.options.DSDOptions.lengths`.
        sparse_epochs: the length of each sparse phase, or one per cycle.
        redense_epochs: the length of each re-dense phase, or one per cycle.
        stop_at_end: stop the ``Trainer`` when the last phase ends.
        export_sparse: at the end of each sparse phase, save the sparse model under
            ``<output directory>/dsd_sparse/`` (see :func:`~lightning_dsd.doors.lightning.output.output_directory`):
            ``"checkpoint"`` (a normal Lightning checkpoint) or ``"sparse"``
            (that, plus a ``state_dict`` whose pruned tensors are torch sparse tensors).

    Every other keyword is an option of :class:`~lightning_dsd.rules.options.DSDOptions`, which declares its
    default, its check and its meaning once for every door. Here ``monitor`` names a metric the
    ``LightningModule`` logs (``self.log``), checked after each validation run (or at each training epoch end
    when validation runs every epoch or not at all).

    The current phase is shown in the progress bar as ``dsd=<phase>``. See :mod:`lightning_dsd.rules.reporting`
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
        sparsity: Union[SparsityValue, float, str, Sequence[Union[SparsityValue, float, str]]],
        dense_epochs: Optional[int],
        sparse_epochs: LengthsArgument,
        redense_epochs: LengthsArgument,
        *,
        final_sparse_epochs: Optional[int] = 0,
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
        layer_sparsity: Optional[Mapping[str, Union[SparsityValue, float, str]]] = None,
        export_sparse: Optional[str] = None,
        redense_init: str = "zero",
        redense_state: str = "pruned",
        seed: int = 0,
        mask_storage: str = "weight_dtype",
        prune: bool = True,
        importance: Importance = "magnitude",
        importance_steps: int = 100,
    ) -> None:
        super().__init__()
        self.options = check_options(sparsity, dense_epochs, sparse_epochs, redense_epochs, **door_options(locals()))
        self.export_sparse = None if export_sparse is None else check_choice(
            "export_sparse", export_sparse, ("checkpoint", "sparse")
        )
        if self.export_sparse is not None and not self.options.prune:
            raise ValueError(f"`export_sparse={export_sparse!r}` saves the pruned model of each sparse phase, but"
                             " `prune=False` (the LLR control) prunes nothing. Leave `export_sparse` out of this arm.")
        self.exported_sparse_models: list[dict[str, Any]] = []
        self._trainer: Optional[pl.Trainer] = None
        self._sink: Optional[LoggerSink] = None
        self._engine = DSDEngine(self.options, self, stop_at_end=check_bool("stop_at_end", stop_at_end))
        self._progress_bar = ProgressBarPhase()
        self._check_on_train_epoch_end = True
        self._bound_this_fit = False
        self._training_this_fit = False
        self._pending_state: Optional[dict[str, Any]] = None  # a checkpoint's state, read before the targets are

    @property
    def stop_at_end(self) -> bool:
        """Whether training stops once DSD's last phase has run its course."""
        return self._engine.stop_at_end

    # ------------------------------------------------------------------ what the engine asks of a Trainer

    @property
    def optimizers(self) -> Sequence[Optimizer]:
        return self._trainer.optimizers if self._trainer is not None else []

    @property
    def schedulers(self) -> Sequence[Any]:
        """The Trainer's schedulers, and the ``BackboneFinetuning`` callbacks that schedule a param group."""
        if self._trainer is None:
            return []
        callbacks = self._trainer.callbacks  # type: ignore[attr-defined]  # set by Lightning at init
        finetuning = [BackboneRates(cb) for cb in callbacks if isinstance(cb, BackboneFinetuning)]
        return [config.scheduler for config in self._trainer.lr_scheduler_configs] + finetuning

    @property
    def sink(self) -> Optional[LoggerSink]:
        return self._sink

    def sparse_phase_ending(self, cycle: int, targets: Mapping[str, Tensor]) -> None:
        """Export the sparse model, while the schedule still says "sparse" (so its callback state is that of
        the sparse phase)."""
        if self.export_sparse is not None and self._trainer is not None:
            as_sparse_tensors = self.export_sparse == "sparse"
            self.exported_sparse_models.append(
                export_sparse_model(self._trainer, targets, cycle, sparse_tensors=as_sparse_tensors)
            )

    # ------------------------------------------------------------------ set-up checks

    @override
    def setup(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", stage: str) -> None:
        if stage != TrainerFn.FITTING:
            return
        self._check_strategy(trainer)  # refusals first, before DSD reads or writes anything of this Trainer
        self._check_other_callbacks(trainer)
        self._trainer, self._sink = trainer, LoggerSink(trainer)
        self._bound_this_fit = self._training_this_fit = False
        self._pending_state = None  # one left by a fit that failed before `on_fit_start` is not this fit's
        self._sink.check_loggers(
            self.options.log_histograms, self.options.log_scalars, bool(self.options.figure_layers)
        )
        if trainer.is_global_zero and trainer.loggers and (self.options.figure_layers or self.export_sparse):
            self._sink.say_where_files_go()
        self._progress_bar.show(trainer.progress_bar_callback, lambda: self.phase_label)
        self._check_on_train_epoch_end = trainer.val_check_interval == 1.0 and trainer.check_val_every_n_epoch == 1

    @override
    def on_fit_start(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> None:
        # The model is final here, for every strategy: after `LightningModule.setup`, `configure_model` (layers
        # built there, meta-device weights materialized there, FSDP2/TP sharding) and the strategy's own set-up.
        # A checkpoint's DSD state read before this point (every strategy but ModelParallelStrategy restores
        # callbacks earlier) is checked and taken now, against these targets.
        example = None
        if uninitialized_parameters(pl_module):  # shaped as Lightning's model summary shapes them
            example = pl_module.example_input_array
            example = None if example is None else pl_module._apply_batch_transfer_handler(example)
        self._engine.bind(pl_module, self.select_targets, example)
        self._bound_this_fit = True
        if self._pending_state is not None:
            state, self._pending_state = self._pending_state, None
            self.load_state_dict(state)

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

    def _metric_source(self, trainer: "pl.Trainer") -> MetricSource:
        """Without a validation loop, a metric that a phase waits for can only be logged in training: DSD would
        never read it when it reads after each validation (``check_val_every_n_epoch`` or ``val_check_interval``
        set: refused); otherwise ``training_step`` may log it (a warning)."""
        if trainer.enable_validation:
            return MetricSource(measured=True)
        no_validation = ("this Trainer runs no validation loop (no `val_dataloader` with a `validation_step`, or"
                         " `limit_val_batches=0`)")
        if self._check_on_train_epoch_end:
            return MetricSource(
                False, f"{no_validation}, so the metric can only come from what the LightningModule logs in training",
                f"Log it there (`self.log({self.monitor!r}, ...)` in `training_step`) or add a validation loop: DSD"
                " raises at the first epoch end without it.", refuse=False)
        return MetricSource(
            False, f"{no_validation} and, with `check_val_every_n_epoch={trainer.check_val_every_n_epoch}`,"
            f" `val_check_interval={trainer.val_check_interval}`, DSD reads the metric after validation: never",
            "Add a validation loop that logs it, or set `check_val_every_n_epoch=1, val_check_interval=1.0` so"
            " that DSD reads it at each training epoch end, or give that phase a length.", refuse=True)

    def _check_other_callbacks(self, trainer: "pl.Trainer") -> None:
        callbacks: list[Callback] = trainer.callbacks  # type: ignore[attr-defined]  # set by Lightning at init
        averaging = next((cb for cb in callbacks if isinstance(cb, _WEIGHT_AVERAGING)), None)
        if averaging is not None:
            raise ValueError(
                f"DSDCallback cannot run with {type(averaging).__name__}: weight averaging evaluates, and at the end"
                " leaves in the model, an average taken across phases, so the sparse phase's zeros are neither in"
                " its evaluation forwards nor in the final model (StochasticWeightAveraging also replaces the"
                " learning-rate schedule that re-dense scales). Average in a separate `fit` after DSD has finished."
            )
        if any(isinstance(cb, EarlyStopping) for cb in callbacks):
            log.warn(
                "EarlyStopping may end training before DSD's last phase (e.g. while the pruned model recovers)."
                " To stop each phase when a metric stops improving, give DSDCallback `monitor=` and pass `None`"
                " as that phase's length; keep EarlyStopping only if stopping in the middle of DSD is intended."
            )

    # ------------------------------------------------------------------ training hooks

    @override
    def on_train_start(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> None:
        self._engine.start(self._now(trainer), trainer, limit=training_limit(trainer, self.interval),
                           metric_source=self._metric_source(trainer))
        self._training_this_fit = True

    @override
    def on_train_epoch_start(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> None:
        self._advance_if_due(trainer)

    @override
    def on_train_batch_start(
        self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", batch: Any, batch_idx: int
    ) -> None:
        self._engine.forget_masked_gradients()
        self._advance_if_due(trainer)

    @override
    def on_before_optimizer_step(
        self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", optimizer: torch.optim.Optimizer
    ) -> None:
        self._engine.mask_gradients(optimizer)

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
        self._engine.epoch_ended(trainer.current_epoch)

    @override
    def on_validation_end(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> None:
        if not self._check_on_train_epoch_end and not self._should_skip_check(trainer):
            self._observe_monitor(trainer)
            self._stop_if_finished(trainer, self._now(trainer))

    @override
    def on_train_end(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> None:
        self._engine.finish(self._now(trainer))

    @override
    def on_exception(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", exception: BaseException) -> None:
        if self._training_this_fit:
            self._engine.interrupted(self._now(trainer))

    @override
    def teardown(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", stage: str) -> None:
        self._engine.release()
        self._progress_bar.remove(trainer.progress_bar_callback)

    # ------------------------------------------------------------------ the clock

    def _now(self, trainer: "pl.Trainer") -> int:
        return trainer.current_epoch if self.interval == "epoch" else trainer.global_step

    @staticmethod
    def _should_skip_check(trainer: "pl.Trainer") -> bool:
        return trainer.state.fn != TrainerFn.FITTING or trainer.sanity_checking

    def _advance_if_due(self, trainer: "pl.Trainer") -> None:
        now = self._now(trainer)
        self._engine.advance_if_due(now)
        self._stop_if_finished(trainer, now)

    def _observe_monitor(self, trainer: "pl.Trainer") -> None:
        self._engine.observe_monitor(trainer.callback_metrics, "the logged metrics",
                                     f"Log it with `self.log({self.monitor!r}, ...)` or name one of them.")

    def _stop_if_finished(self, trainer: "pl.Trainer", now: int) -> None:
        if self._engine.stop_now(now, stopping=trainer.should_stop):
            trainer.should_stop = True

    # ------------------------------------------------------------------ checkpointing

    @override
    def state_dict(self) -> dict[str, Any]:
        """The schedule and, in a sparse phase, the full masks at 1 bit per weight (a sharded weight's mask
        is gathered from its shards, one tensor at a time, on every rank), so a resume works on any mesh."""
        return self._engine.state_dict()

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Check the checkpoint's DSD state against this callback (see :mod:`lightning_dsd.rules.state`), then
        take it; a damaged or mismatched state raises before anything changes. Read before the model is final
        (``on_fit_start``), it is kept until then and checked against the targets chosen there."""
        if not self._bound_this_fit:
            self._pending_state = state_dict
            return
        self._engine.load_state_dict(state_dict)


#: Weight averaging: SWA, and the ``WeightAveraging`` family (``EMAWeightAveraging``, ...) of Lightning >= 2.6.
_WEIGHT_AVERAGING: tuple[type, ...] = tuple(
    cls for cls in (StochasticWeightAveraging, getattr(pl.callbacks, "WeightAveraging", None)) if cls is not None
)
