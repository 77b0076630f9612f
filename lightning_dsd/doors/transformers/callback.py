"""``DSDTrainerCallback``: Dense-Sparse-Dense training for Hugging Face ``transformers.Trainer``.

The third front door to :class:`~lightning_dsd.rules.engine.DSDEngine`, beside :class:`~lightning_dsd.DSDCallback`
(Lightning) and :class:`~lightning_dsd.DSD` (Fabric and plain loops). It only maps the ``Trainer``'s events
onto the engine and keeps what is the ``Trainer``'s: its clock, its checkpoint folders, its loggers and its
distributed set-ups. Its subpackage, :mod:`lightning_dsd.doors.transformers`, is the only part of the package
that imports ``transformers`` (``pip install "lightning_dsd[transformers]"``); ``import lightning_dsd`` never
does.

How each event is used (the order is ``Trainer._inner_training_loop``'s):

* ``on_init_end`` / ``on_train_begin``: refuse FSDP1 and DeepSpeed; find the Trainer that trains (the bound one,
  else up the call stack); choose the targets in the model it trains; take the optimizer and scheduler it built
  (accelerate's ``AcceleratedOptimizer`` and ``AcceleratedScheduler`` unwrapped, so the engine's hooks sit on the
  optimizer that steps); on a resume, read and check DSD's state from the checkpoint folder before anything
  trains (and refuse a weights-only checkpoint, ``save_only_model=True``, when ``lr_scale != 1``: see
  :func:`~lightning_dsd.doors.transformers.checkpoints.refuse_a_fresh_schedule`).
* ``on_epoch_begin`` / ``on_step_begin``: the transitions now due (``interval="epoch"`` counts the Trainer's
  finished epochs, ``"step"`` its optimizer steps, ``state.global_step``). A transition therefore happens
  before the first forward pass of the next step, so the evaluation and the checkpoint of the step that
  ends a phase show that phase.
* ``on_pre_optimizer_step``: nothing more to do where gradient hooks masked every pruned target's gradient
  (else, FSDP2's sharded targets, the pruned entries' gradients are zeroed here). The Trainer clips gradients
  *before* this event, so in a sparse phase each target has a gradient hook that zeroes its pruned entries as
  backward computes them: ``max_grad_norm`` measures the
  sparse network's gradient, as under ``DSDCallback`` (FSDP2's sharded parameters excepted, see
  ``_hook_gradients``).
* ``on_evaluate``: ``monitor`` (e.g. ``"eval_loss"``) is read from the evaluation's metrics when a phase runs
  until it converges (a length of ``None``).
* ``on_save``: DSD's state (schedule, masks at 1 bit per weight, configuration) is written as
  ``dsd_state.pt`` inside the ``checkpoint-<step>`` folder the Trainer just wrote (the trial's folder under
  hyperparameter search), so it rotates with ``save_total_limit`` (:mod:`.checkpoints`, which also says how a
  resume finds and checks it).
* ``on_save`` / ``on_step_begin`` / ``on_epoch_begin``, before DSD's last phase (``best_model_phase="final"``):
  the Trainer's best-model record is emptied once each evaluation has been judged (:mod:`.best_model`).
* ``on_train_end``: the final histograms and the figure, and a report of the model ``train()`` returns (the
  best checkpoint loaded and its phase, or the last step's; its exact zeros).

The door's helpers, one job each: the ``TrainingArguments`` it refuses and how far they train
(:mod:`.arguments`), which Trainer runs it (:mod:`.binding`: the one given to :meth:`DSDTrainerCallback.bind`,
else the one up the call stack), DSD's state in the checkpoint folders (:mod:`.checkpoints`), the Trainer's
best-model record (:mod:`.best_model`) and where reports go (:mod:`.output`).

Examples:
    >>> dsd = DSDTrainerCallback(0.5, dense_epochs=1, sparse_epochs=1, redense_epochs=1, lr_scale=0.1)
    >>> dsd.phase.value, dsd.lr_scale
    ('dense', 0.1)
    >>> DSDTrainerCallback(0.5, 1, 1, 1, scope="everywhere")  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    ...
    ValueError: `scope` must be one of ...
"""

from __future__ import annotations

import math
import os
import uuid
from functools import partial
from typing import Any, Mapping, Optional, Sequence, Union

from torch import Tensor, nn
from torch.distributed.tensor import DTensor
from torch.optim import Optimizer
from torch.utils.hooks import RemovableHandle
from transformers import Trainer, TrainerCallback, TrainerControl, TrainerState, TrainingArguments

from lightning_dsd.doors.base import ReadsEngine
from lightning_dsd.doors.transformers.arguments import check_training_arguments, training_limit
from lightning_dsd.doors.transformers.best_model import (
    BEST_MODEL_PHASES,
    drop_a_restored_record_of_an_earlier_phase,
    hold_best_model_record,
    say_how_the_best_model_is_chosen,
)
from lightning_dsd.doors.transformers.binding import checked_binding, training_trainer
from lightning_dsd.doors.transformers.checkpoints import (
    RECORD_KEY,
    STATE_FILE,
    StateFiles,
    checkpoint_folder,
    phase_of_checkpoint,
    refuse_a_fresh_schedule,
    run_directory,
    run_records,
)
from lightning_dsd.doors.transformers.output import TrainerLogSink
from lightning_dsd.rules import log
from lightning_dsd.rules.engine import DoorTerms, DSDEngine, MetricSource, ReturnedCheckpoint
from lightning_dsd.rules.importance import Importance
from lightning_dsd.rules.options import LengthsArgument, check_bool, check_choice, check_options, door_options
from lightning_dsd.rules.phases import Phase
from lightning_dsd.rules.preflight import refuse_lazy_modules
from lightning_dsd.rules.selection import LayerSpec, LayerType
from lightning_dsd.rules.sharding import from_rank_zero

#: How the engine names this door and its users' ways to resume.
_TERMS = DoorTerms(
    name="DSDTrainerCallback",
    training="`train()`",
    resume="resume with `trainer.train(resume_from_checkpoint=...)`",
    new="give the Trainer a new DSDTrainerCallback(...)",
    lazy="before `Trainer(model=...)`, which takes no example input",
)



class DSDTrainerCallback(ReadsEngine, TrainerCallback):
    r"""Train Dense → Sparse → Re-dense inside ``transformers.Trainer``: ``callbacks=[DSDTrainerCallback(...)]``.

    Args:
        sparsity: the sparsity of each cycle (:attr:`~lightning_dsd.rules.options.DSDOptions.sparsities`).
        dense_epochs: the length of the first dense phase; this and the next two are
            :attr:`~lightning_dsd.rules.options.DSDOptions.lengths`. Here ``interval="epoch"`` counts the
            Trainer's epochs, ``"step"`` its optimizer steps (``state.global_step``, one per
            ``gradient_accumulation_steps`` batches).
        sparse_epochs: the length of each sparse phase, or one per cycle.
        redense_epochs: the length of each re-dense phase, or one per cycle.
        stop_at_end: set ``control.should_training_stop`` when the last phase ends.
        best_model_phase: where the Trainer's best model (``metric_for_best_model``: ``load_best_model_at_end``,
            ``save_strategy="best"``, ``EarlyStoppingCallback``) is chosen. ``"final"`` (the default): among the
            checkpoints of DSD's last phase only, DSD's result, as ``FinalPhaseCheckpoint`` does under Lightning.
            Before that phase the Trainer's best-model record (``state.best_metric``, ``best_global_step``,
            ``best_model_checkpoint``) is held empty after each evaluation, so no dense or sparse checkpoint is
            loaded at the end or protected from rotation, and ``EarlyStoppingCallback`` (which counts from
            ``state.best_metric``) cannot stop training before the last phase. ``"any"``: the Trainer's own choice
            among every checkpoint of the run, whatever its phase.

    Every other keyword is an option of :class:`~lightning_dsd.rules.options.DSDOptions`, which declares its
    default, its check and its meaning once for every door (``export_sparse`` is Lightning's: here every
    ``checkpoint-N`` folder of the sparse phase holds the sparse model). Here ``monitor`` names a metric of
    ``on_evaluate`` (``"eval_loss"``, ``"eval_accuracy"``).

    Reports: histograms, transition notes and the figure go to the directory of the Trainer's TensorBoard
    run (``report_to="tensorboard"``: ``TENSORBOARD_LOGGING_DIR`` or ``output_dir/runs/<date_host>``), through
    a ``SummaryWriter`` of DSD's own in that directory; scalars go through ``Trainer.log`` to every
    integration (TensorBoard shows them under ``train/dsd/...``, its callback's prefix). Figures are also
    saved under ``<that directory>/dsd_figures``.

    The Trainer is the one given to :meth:`bind` (``dsd.bind(trainer)``), else the one whose callbacks hold this
    callback up the call stack of each ``train()``.
    """

    def __init__(
        self,
        sparsity: Union[float, str, Sequence[Union[float, str]]],
        dense_epochs: Optional[int],
        sparse_epochs: LengthsArgument,
        redense_epochs: LengthsArgument,
        *,
        stop_at_end: bool = True,
        best_model_phase: str = "final",
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
        log_histograms: bool = True,
        histogram_every_n_epochs: Optional[int] = None,
        histogram_layers: Optional[Union[str, Sequence[str]]] = None,
        log_scalars: bool = True,
        figure_layers: Union[int, Sequence[str]] = 2,
        layer_sparsity: Optional[Mapping[str, Union[float, str]]] = None,
        redense_init: str = "zero",
        redense_state: str = "pruned",
        seed: int = 0,
        mask_storage: str = "weight_dtype",
        prune: bool = True,
        importance: Importance = "magnitude",
        importance_steps: int = 100,
    ) -> None:
        self.options = check_options(sparsity, dense_epochs, sparse_epochs, redense_epochs, **door_options(locals()))
        self.best_model_phase = check_choice("best_model_phase", best_model_phase, BEST_MODEL_PHASES)
        self._engine = DSDEngine(self.options, self, _TERMS, stop_at_end=check_bool("stop_at_end", stop_at_end))
        self._trainer: Optional[Trainer] = None
        self._optimizers: list[Optimizer] = []
        self._schedulers: list[Any] = []
        self._sink: Optional[TrainerLogSink] = None
        self._token: Optional[str] = None
        self._gradient_hooks: list[RemovableHandle] = []
        self._hooked_cycle: Optional[int] = None
        self._started = False
        self._training = False
        self._trial: Any = None  # the hyperparameter-search trial of the last `train()`
        self._bound: Optional[Trainer] = None  # the Trainer given to `bind`
        self._state_files = StateFiles()

    @property
    def stop_at_end(self) -> bool:
        """Whether ``control.should_training_stop`` is set once DSD's last phase has run its course."""
        return self._engine.stop_at_end

    # ------------------------------------------------------------------ what the engine asks of a door

    @property
    def optimizers(self) -> Sequence[Optimizer]:
        return self._optimizers

    @property
    def schedulers(self) -> Sequence[Any]:
        return self._schedulers

    @property
    def sink(self) -> Optional[TrainerLogSink]:
        return self._sink

    def sparse_phase_ending(self, cycle: int, targets: Mapping[str, Tensor]) -> None:
        """Nothing to export: the ``checkpoint-N`` folders of the sparse phase hold the sparse model."""

    # ------------------------------------------------------------------ set-up

    def bind(self, trainer: Trainer) -> DSDTrainerCallback:
        """Tell the callback which ``Trainer`` runs it, and return the callback.

        ``transformers`` never hands callbacks the ``Trainer``; DSD needs it for ``Trainer.log`` (its ``dsd/*``
        scalars reach every reporting integration and ``state.log_history``), the Trainer's TensorBoard
        directory, its MLflow and W&B runs and its checkpoint folders. Unbound, the callback finds the Trainer up
        the call stack at each ``train()``, which works whenever ``Trainer.train()`` runs the events; bind it where
        a loop of your own drives the Trainer's callbacks, or to say it outright. A bound Trainer wins over that
        search. Bind again to move the callback to another Trainer (one built to resume); a ``train()`` of a
        Trainer other than the bound one is refused, before anything is written.

        Args:
            trainer: the ``transformers.Trainer`` that holds this callback (``Trainer(..., callbacks=[dsd])`` or
                ``trainer.add_callback(dsd)``); another is refused.

        Examples:
            >>> import tempfile
            >>> from transformers import GPT2Config, GPT2LMHeadModel, Trainer, TrainingArguments
            >>> model = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=8, n_head=2, vocab_size=16, n_positions=8))
            >>> args = TrainingArguments(output_dir=tempfile.mkdtemp(), use_cpu=True, report_to="none")
            >>> dsd = DSDTrainerCallback(0.5, 1, 1, 1)
            >>> trainer = Trainer(model=model, args=args, callbacks=[dsd])
            >>> dsd.bind(trainer) is dsd
            True
            >>> DSDTrainerCallback(0.5, 1, 1, 1).bind(trainer)  # doctest: +ELLIPSIS
            Traceback (most recent call last):
            ...
            ValueError: DSDTrainerCallback.bind(trainer): this Trainer does not hold this callback ...
        """
        self._bound = checked_binding(trainer, self)
        return self

    def on_init_end(self, args: TrainingArguments, state: TrainerState, control: TrainerControl,
                    **kwargs: Any) -> None:
        check_training_arguments(args)
        _refuse_lazy_modules(kwargs.get("model"))

    def on_train_begin(self, args: TrainingArguments, state: TrainerState, control: TrainerControl,
                       **kwargs: Any) -> None:
        check_training_arguments(args)
        self._trainer = training_trainer(self._bound, self, state)  # a resume may run in a second Trainer
        resuming = state.global_step > 0
        trial = getattr(self._trainer, "_trial", None)  # set for each run of `hyperparameter_search`
        # A new trial of a search, or the training after it (which runs without a trial): a run of its own.
        new_trial, self._trial = trial is not self._trial, trial
        if self._started and new_trial:
            name = state.trial_name or getattr(trial, "number", None)  # an Optuna trial's number
            run = ("a new trial of the hyperparameter search" + ("" if name is None else f" ({name})")
                   if trial is not None else "the training after the hyperparameter search")
            log.info(f"DSDTrainerCallback starts its schedule afresh for {run}.")
            self._engine = DSDEngine(self.options, self, _TERMS, stop_at_end=self.stop_at_end)
        model = kwargs.get("model")
        if not isinstance(model, nn.Module):
            raise RuntimeError(f"DSDTrainerCallback needs the model at `on_train_begin`; the Trainer passed {model!r}.")
        self._optimizers = _torch_optimizers(kwargs.get("optimizer"))
        scheduler = kwargs.get("lr_scheduler")  # accelerate's AcceleratedScheduler: lr.py scales the one it wraps
        self._schedulers = [] if scheduler is None else [scheduler]
        self._engine.bind(model, self.select_targets)
        token = self._restore(args, state) if resuming else None  # checked and taken before anything is written
        self._token = token or from_rank_zero(uuid.uuid4().hex)
        self._sink = TrainerLogSink(self._trainer, args, state, self.options)
        self._engine.start(
            self._now(state), self._trainer,
            limit=training_limit(args, state, kwargs.get("train_dataloader"), self.interval),
            metric_source=MetricSource(
                args.eval_strategy != "no", "`eval_strategy='no'`: the Trainer never evaluates, so that phase would"
                " never end", "Evaluate with `eval_strategy='epoch'` (or `'steps'` and `eval_steps`) and an"
                " `eval_dataset`, or give that phase a length."),
        )
        self._sink.say_what_is_skipped()
        run_records(state)[RECORD_KEY] = {"token": self._token, "file": STATE_FILE}
        callbacks = self._trainer.callback_handler.callbacks if self._trainer is not None else []
        say_how_the_best_model_is_chosen(args, self.best_model_phase, self.in_last_phase, callbacks)
        self._hold_best_model_record(args, state)
        if resuming:
            drop_a_restored_record_of_an_earlier_phase(state, self.best_model_phase, self.in_last_phase,
                                                       self._engine.schedule.stages)
        self._started = self._training = True
        self._hook_gradients()

    def _hold_best_model_record(self, args: TrainingArguments, state: TrainerState) -> None:
        """Before DSD's last phase, the Trainer's best-model record is held empty (:mod:`.best_model`)."""
        hold_best_model_record(args, state, self.best_model_phase, self.in_last_phase)

    # ------------------------------------------------------------------ the clock

    def _now(self, state: TrainerState) -> int:
        """Finished epochs (``state.epoch`` is ``epoch + (step + 1) / steps_in_epoch``, a whole number at
        each epoch's end) or optimizer steps."""
        return math.floor(state.epoch or 0) if self.interval == "epoch" else state.global_step

    def on_epoch_begin(self, args: TrainingArguments, state: TrainerState, control: TrainerControl,
                       **kwargs: Any) -> None:
        self._hold_best_model_record(args, state)
        self._engine.advance_if_due(self._now(state))
        self._hook_gradients()

    def on_step_begin(self, args: TrainingArguments, state: TrainerState, control: TrainerControl,
                      **kwargs: Any) -> None:
        self._engine.forget_masked_gradients()
        self._hold_best_model_record(args, state)
        self._engine.advance_if_due(self._now(state))
        self._hook_gradients()

    def _hook_gradients(self) -> None:
        """Keep a gradient hook on each target while a sparse phase runs: the Trainer clips gradients before
        any event, so the pruned entries' gradients are zeroed as backward computes them (a tensor hook, before
        they are accumulated and before DDP's reducer sees them), and ``max_grad_norm`` measures the sparse
        network's gradient, as ``DSDCallback`` does. FSDP2's sharded parameters get their gradients by a
        reduce-scatter, not through such a hook: theirs are masked at ``on_pre_optimizer_step``, after clipping."""
        sparse = self._training and self._engine.phase is Phase.SPARSE
        if self._gradient_hooks and (not sparse or self._hooked_cycle != self._engine.cycle):
            for handle in self._gradient_hooks:
                handle.remove()
            self._gradient_hooks, self._hooked_cycle = [], None
        if sparse and self._hooked_cycle is None:
            targets = self._engine.targets
            self._gradient_hooks = [targets[name].register_hook(partial(_masked_gradient, keep=keep))
                                    for name, keep in self._engine.masks.items()
                                    if not isinstance(targets[name], DTensor)]
            self._hooked_cycle = self._engine.cycle

    def on_pre_optimizer_step(self, args: TrainingArguments, state: TrainerState, control: TrainerControl,
                              **kwargs: Any) -> None:
        # Where every pruned target has a gradient hook, its gradients were masked as backward computed them:
        # once is enough. FSDP2's sharded targets have none, and are masked here.
        hooked = self._hooked_cycle is not None and len(self._gradient_hooks) == len(self._engine.masks)
        for optimizer in self._optimizers:
            self._engine.mask_gradients(optimizer, already_masked=hooked)

    def on_step_end(self, args: TrainingArguments, state: TrainerState, control: TrainerControl,
                    **kwargs: Any) -> None:
        if self.interval == "step":
            self._stop_if_finished(state, control)

    def on_epoch_end(self, args: TrainingArguments, state: TrainerState, control: TrainerControl,
                     **kwargs: Any) -> None:
        self._engine.epoch_ended(max(math.floor(state.epoch or 0) - 1, 0))
        stopping = control.should_training_stop or state.global_step >= state.max_steps
        if stopping or not self._engine.schedule.is_due(self._now(state)):  # no transition follows at this step:
            self._engine.flush_scalars()  # log while the integrations' runs are open
        if self.interval == "epoch":
            self._stop_if_finished(state, control)

    def on_evaluate(self, args: TrainingArguments, state: TrainerState, control: TrainerControl,
                    metrics: Optional[Mapping[str, float]] = None, **kwargs: Any) -> None:
        if not self._training:
            return
        self._engine.observe_monitor(metrics or {}, "the evaluation's metrics",
                                     "Name one of them (the Trainer prefixes them with `eval_`).")
        self._stop_if_finished(state, control)

    def _stop_if_finished(self, state: TrainerState, control: TrainerControl) -> None:
        if self._engine.stop_now(self._now(state), stopping=control.should_training_stop):
            control.should_training_stop = True

    def on_train_end(self, args: TrainingArguments, state: TrainerState, control: TrainerControl,
                     **kwargs: Any) -> None:
        self._training = False
        self._hook_gradients()
        if self._sink is not None:
            self._sink.integrations_closed()
        loaded = state.best_model_checkpoint if args.load_best_model_at_end else None
        returned = None
        if loaded is not None:
            where, last = phase_of_checkpoint(loaded, self._engine.schedule.stages)
            returned = ReturnedCheckpoint(loaded, where, last, "load_best_model_at_end",
                                          "keep best_model_phase='final' (the default) to choose the best model"
                                          " among those only")
        self._engine.finish(self._now(state), returned)
        self._hold_best_model_record(args, state)
        if self._sink is not None:
            self._sink.close()

    # ------------------------------------------------------------------ checkpoints

    def on_save(self, args: TrainingArguments, state: TrainerState, control: TrainerControl,
                **kwargs: Any) -> None:
        """Write DSD's state into the folder the Trainer has just saved (every rank builds it: a collective
        for sharded weights; the rank that saves writes it, through a temporary file)."""
        self._hold_best_model_record(args, state)
        saved = {"dsd": self._engine.state_dict(), "global_step": state.global_step, "token": self._token}
        if args.should_save:
            folder = checkpoint_folder(run_directory(self._trainer, args), state.global_step)
            self._state_files.save(folder, state.global_step, saved)

    def _restore(self, args: TrainingArguments, state: TrainerState) -> Optional[str]:
        """Take the DSD state of the checkpoint the Trainer restored, found and checked (:mod:`.checkpoints`), and
        return its run token; ``None`` for a checkpoint saved without DSD (DSD then joins the run from there).
        Raise :class:`~lightning_dsd.rules.state.CheckpointStateError` before anything changes."""
        resume_from = args.resume_from_checkpoint if isinstance(args.resume_from_checkpoint, str) else None
        run_folder = checkpoint_folder(run_directory(self._trainer, args), state.global_step)
        found = self._state_files.find(run_folder, resume_from, state)
        if found is None:
            return None
        token, folder, saved = found
        self._engine.load_state_dict(saved["dsd"])
        refuse_a_fresh_schedule(folder, self._engine)
        log.info(f"DSDTrainerCallback resumed the {self.phase_label} phase at step {state.global_step} from"
                 f" {os.path.join(folder, STATE_FILE)}.")
        return token


def _refuse_lazy_modules(model: Any) -> None:
    """Refuse lazy modules when the Trainer is built: it offers no example input to shape them, and counts every
    parameter's size before training."""
    if isinstance(model, nn.Module):
        refuse_lazy_modules(model, "DSDTrainerCallback", "before `Trainer(model=...)`, which takes no example input")


def _masked_gradient(grad: Tensor, keep: Tensor) -> Tensor:
    return grad.mul(keep)


def _torch_optimizers(optimizer: Any) -> list[Optimizer]:
    """The torch optimizer behind accelerate's ``AcceleratedOptimizer`` (its hooks fire whoever steps it)."""
    from accelerate.optimizer import AcceleratedOptimizer

    while isinstance(optimizer, AcceleratedOptimizer):
        optimizer = optimizer.optimizer
    if not isinstance(optimizer, Optimizer):
        raise RuntimeError(f"DSDTrainerCallback needs the Trainer's torch optimizer; it passed {optimizer!r}.")
    return [optimizer]
