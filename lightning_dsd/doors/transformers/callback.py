"""``DSDTrainerCallback``: Dense-Sparse-Dense training for Hugging Face ``transformers.Trainer``.

The third front door to :class:`~lightning_dsd.rules.engine.DSDEngine`, beside :class:`~lightning_dsd.DSDCallback`
(Lightning) and :class:`~lightning_dsd.DSD` (Fabric and plain loops). It only maps the ``Trainer``'s events
onto the engine and keeps what is the ``Trainer``'s: its clock, its checkpoint folders, its loggers and its
distributed set-ups. This module is the only one that imports ``transformers``
(``pip install "lightning_dsd[transformers]"``); ``import lightning_dsd`` never does.

How each event is used (the order is ``Trainer._inner_training_loop``'s):

* ``on_init_end`` / ``on_train_begin``: refuse FSDP1 and DeepSpeed; choose the targets in the model the
  ``Trainer`` trains; take the optimizer and scheduler it built (accelerate's ``AcceleratedOptimizer`` and
  ``AcceleratedScheduler`` unwrapped, so the engine's hooks sit on the optimizer that steps); on a resume,
  read and check DSD's state from the checkpoint folder before anything trains (and refuse a weights-only
  checkpoint, ``save_only_model=True``, when ``lr_scale != 1``: see ``_refuse_a_fresh_schedule``).
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
  hyperparameter search), so it rotates with ``save_total_limit``.
* ``on_save`` / ``on_step_begin`` / ``on_epoch_begin``, before DSD's last phase (``best_model_phase="final"``):
  the Trainer's best-model record is emptied once each evaluation has been judged (see the class).
* ``on_train_end``: the final histograms and the figure, and a report of the model ``train()`` returns (the
  best checkpoint loaded and its phase, or the last step's; its exact zeros).

**Finding the Trainer.** ``transformers`` hands callbacks ``args``, ``state``, ``control``, the model, its
optimizer, scheduler and dataloaders, never the ``Trainer``. Two things need it: the ``dsd/*`` scalars go
through ``Trainer.log`` (so W&B, MLflow, TensorBoard and every other reporting callback receive them, in
the Trainer's own records ``state.log_history``), and the TensorBoard directory is read from the Trainer's
``TensorBoardCallback``. At every ``on_train_begin`` (a resume may run the callback in a second Trainer)
the callback looks up the call stack for the ``Trainer`` whose callback list holds it; it is only read
and its public ``log`` called. If none is found (a loop driving the callbacks itself), scalars go to
TensorBoard directly and DSD says so once.

**Finding the checkpoint on resume.** ``trainer.train(resume_from_checkpoint=path)`` does not tell
callbacks the path. DSD reads ``<args.output_dir>/checkpoint-<state.global_step>/dsd_state.pt`` (what
``resume_from_checkpoint=True`` and the usual ``output_dir/checkpoint-N`` paths pick), or the folder named
by ``TrainingArguments(resume_from_checkpoint=...)`` when that is set (the way to resume from a folder
outside ``output_dir``). To be sure the file belongs to the checkpoint the Trainer restored, the run writes
a small record (a run token) into the ``TrainerState``'s ``stateful_callbacks`` under ``"lightning_dsd"``,
so it is saved in every ``trainer_state.json``; the file must carry that token and the restored step, or
the resume is refused with what was found. A checkpoint without that record was saved without DSD: DSD joins
the run there and its phases count from that step, as ``DSDCallback`` does.
(``restore_callback_states_from_checkpoint=True`` makes the
Trainer warn that it ignores this entry: it is not a callback's own state.)

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

import glob
import math
import os
import sys
import uuid
from functools import partial
from typing import Any, Callable, Mapping, Optional, Sequence

import torch
from torch import Tensor, nn
from torch.distributed.tensor import DTensor
from torch.optim import Optimizer
from torch.utils.hooks import RemovableHandle
from transformers import (
    EarlyStoppingCallback,
    Trainer,
    TrainerCallback,
    TrainerControl,
    TrainerState,
    TrainingArguments,
)
from transformers.trainer import OPTIMIZER_NAME, OPTIMIZER_NAME_BIN, SCHEDULER_NAME
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

from lightning_dsd.doors.base import ReadsEngine
from lightning_dsd.rules import log
from lightning_dsd.rules.arguments import check_bool, check_choice
from lightning_dsd.rules.engine import DoorTerms, DSDEngine, MetricSource, ReturnedCheckpoint
from lightning_dsd.rules.options import KEYWORD_OPTIONS, LengthsArgument, check_options
from lightning_dsd.rules.phases import Phase
from lightning_dsd.rules.preflight import TrainingLimit, refuse_lazy_modules
from lightning_dsd.rules.sharding import from_rank_zero
from lightning_dsd.rules.sinks import FIGURE_FOLDER, WriterSink
from lightning_dsd.rules.state import CheckpointStateError

#: The file DSD writes inside each ``checkpoint-<step>`` folder.
STATE_FILE = "dsd_state.pt"
#: The key of DSD's record in ``TrainerState.stateful_callbacks`` (saved in ``trainer_state.json``).
RECORD_KEY = "lightning_dsd"

#: How the engine names this door and its users' ways to resume.
_TERMS = DoorTerms(
    name="DSDTrainerCallback",
    training="`train()`",
    resume="resume with `trainer.train(resume_from_checkpoint=...)`",
    new="give the Trainer a new DSDTrainerCallback(...)",
    lazy="before `Trainer(model=...)`, which takes no example input",
)

#: ``best_model_phase``: the checkpoints among which the Trainer's best model is chosen.
BEST_MODEL_PHASES = ("final", "any")

#: The shared keyword options (:data:`~lightning_dsd.rules.options.KEYWORD_OPTIONS`, declared once for every door).
SHARED_OPTIONS = tuple(KEYWORD_OPTIONS)


class DSDTrainerCallback(ReadsEngine, TrainerCallback):
    r"""Train Dense → Sparse → Re-dense inside ``transformers.Trainer``: ``callbacks=[DSDTrainerCallback(...)]``.

    Args:
        sparsity: as for :class:`~lightning_dsd.DSDCallback`.
        dense_epochs: as for :class:`~lightning_dsd.DSDCallback`: ``interval="epoch"`` counts the Trainer's
            epochs, ``"step"`` its optimizer steps (``state.global_step``, one per ``gradient_accumulation_steps``
            batches).
        sparse_epochs: likewise (one length, or one per cycle).
        redense_epochs: likewise (one length, or one per cycle).
        stop_at_end: set ``control.should_training_stop`` when the last phase ends.
        best_model_phase: where the Trainer's best model (``metric_for_best_model``: ``load_best_model_at_end``,
            ``save_strategy="best"``, ``EarlyStoppingCallback``) is chosen. ``"final"`` (the default): among the
            checkpoints of DSD's last phase only, DSD's result, as ``FinalPhaseCheckpoint`` does under Lightning.
            Before that phase the Trainer's best-model record (``state.best_metric``, ``best_global_step``,
            ``best_model_checkpoint``) is held empty after each evaluation, so no dense or sparse checkpoint is
            loaded at the end or protected from rotation, and ``EarlyStoppingCallback`` (which counts from
            ``state.best_metric``) cannot stop training before the last phase. ``"any"``: the Trainer's own choice
            among every checkpoint of the run, whatever its phase.
        **options: every other keyword of :class:`~lightning_dsd.DSDCallback` that the other doors share
            (:data:`SHARED_OPTIONS`: ``final_sparse_epochs``, ``interval``, ``monitor``, ``lr_scale``, ``include``,
            ``exclude``, ``scope``, ``layer_sparsity``, ``redense_state``, the logging options, ...), with the
            name, default, check and meaning it has there. ``monitor`` names a metric of ``on_evaluate``
            (``"eval_loss"``, ``"eval_accuracy"``).

    Reports: histograms, transition notes and the figure go to the directory of the Trainer's TensorBoard
    run (``report_to="tensorboard"``: ``TENSORBOARD_LOGGING_DIR`` or ``output_dir/runs/<date_host>``), through
    a ``SummaryWriter`` of DSD's own in that directory; scalars go through ``Trainer.log`` to every
    integration (TensorBoard shows them under ``train/dsd/...``, its callback's prefix). Figures are also
    saved under ``<that directory>/dsd_figures``.
    """

    def __init__(
        self,
        sparsity: Any,
        dense_epochs: Optional[int],
        sparse_epochs: LengthsArgument,
        redense_epochs: LengthsArgument,
        *,
        stop_at_end: bool = True,
        best_model_phase: str = "final",
        **options: Any,
    ) -> None:
        unknown = sorted(set(options) - set(SHARED_OPTIONS))
        if unknown:
            raise TypeError(
                f"DSDTrainerCallback got unknown keyword(s) {unknown}. It takes the options DSDCallback shares with"
                f" the other doors: {list(SHARED_OPTIONS)}, and `stop_at_end`, `best_model_phase`. (`export_sparse`"
                " is Lightning's: here every `checkpoint-N` folder of the sparse phase holds the sparse model.)"
            )
        self.options = check_options(sparsity, dense_epochs, sparse_epochs, redense_epochs, **options)
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
        self._said_no_folder = False

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

    def on_init_end(self, args: TrainingArguments, state: TrainerState, control: TrainerControl,
                    **kwargs: Any) -> None:
        check_training_arguments(args)
        _refuse_lazy_modules(kwargs.get("model"))

    def on_train_begin(self, args: TrainingArguments, state: TrainerState, control: TrainerControl,
                       **kwargs: Any) -> None:
        check_training_arguments(args)
        self._trainer = _calling_trainer(self)  # the Trainer that runs now (a resume may be a second one)
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
        _records(state)[RECORD_KEY] = {"token": self._token, "file": STATE_FILE}
        self._say_how_the_best_model_is_chosen(args)
        self._hold_best_model_record(args, state)
        if resuming:
            self._drop_a_restored_best_model_record_of_an_earlier_phase(args, state)
        self._started = self._training = True
        self._hook_gradients()

    # ------------------------------------------------------------------ the best model

    def _say_how_the_best_model_is_chosen(self, args: TrainingArguments) -> None:
        """Once, before training: where the Trainer's best model comes from, and what ``EarlyStoppingCallback``
        may do to the schedule."""
        callbacks = self._trainer.callback_handler.callbacks if self._trainer is not None else []
        early_stopping = any(isinstance(callback, EarlyStoppingCallback) for callback in callbacks)
        if args.metric_for_best_model is None or self.in_last_phase:
            return
        uses = [use for use, on in (("load_best_model_at_end", args.load_best_model_at_end),
                                    ("save_strategy='best'", args.save_strategy == "best"),
                                    ("EarlyStoppingCallback", early_stopping)) if on]
        if self.best_model_phase == "final":
            log.info(
                f"DSDTrainerCallback: the Trainer's best model (`metric_for_best_model={args.metric_for_best_model!r}`"
                f"{': ' + ', '.join(uses) if uses else ''}) is chosen among the checkpoints of DSD's last phase only"
                " (best_model_phase='final'): before it, the Trainer's best-model record stays empty after each"
                " evaluation, so no dense or sparse checkpoint is loaded at the end, and EarlyStoppingCallback cannot"
                " stop training before the last phase. Pass best_model_phase='any' to choose among every checkpoint."
            )
        elif early_stopping:
            log.warn(
                "EarlyStoppingCallback may end training before DSD's last phase (e.g. while the pruned model"
                " recovers), and with load_best_model_at_end the Trainer then returns its best checkpoint, of whatever"
                " phase (best_model_phase='any'). To stop each phase when a metric stops improving, give"
                " DSDTrainerCallback `monitor=` and pass `None` as that phase's length; or keep the default"
                " best_model_phase='final', under which early stopping counts only in the last phase."
            )

    def _hold_best_model_record(self, args: TrainingArguments, state: TrainerState) -> None:
        """Before DSD's last phase (``best_model_phase="final"``), empty the best-model record the Trainer keeps
        (``_determine_best_metric`` after an evaluation; ``best_model_checkpoint`` set in ``_save_checkpoint``),
        so that its rotation, its ``save_strategy="best"`` comparisons, ``EarlyStoppingCallback`` and the final
        ``load_best_model_at_end`` only ever see checkpoints of the last phase. Called before any transition
        of the step, so an evaluation is judged by the phase it evaluated."""
        if self.best_model_phase == "final" and args.metric_for_best_model is not None and not self.in_last_phase:
            state.best_metric = state.best_global_step = state.best_model_checkpoint = None

    def _drop_a_restored_best_model_record_of_an_earlier_phase(self, args: TrainingArguments,
                                                               state: TrainerState) -> None:
        """On a resume in DSD's last phase (``best_model_phase="final"``): the best-model record restored from
        ``trainer_state.json`` may name a checkpoint of an earlier phase (one a run with ``"any"`` chose); it is
        emptied, so that the best model still comes from the last phase."""
        restored = state.best_model_checkpoint
        if self.best_model_phase != "final" or not self.in_last_phase or restored is None:
            return
        where, last = self._phase_of_checkpoint(restored)
        if not last:
            state.best_metric = state.best_global_step = state.best_model_checkpoint = None
            log.info(f"DSDTrainerCallback: the Trainer's best-model record, restored with the checkpoint, names"
                           f" {restored}, saved {where}: emptied, so the best model comes from DSD's last phase"
                           " (best_model_phase='final').")

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
            returned = ReturnedCheckpoint(loaded, *self._phase_of_checkpoint(loaded), "load_best_model_at_end",
                                          "keep best_model_phase='final' (the default) to choose the best model"
                                          " among those only")
        self._engine.finish(self._now(state), returned)
        self._hold_best_model_record(args, state)
        if self._sink is not None:
            self._sink.close()

    def _phase_of_checkpoint(self, folder: str) -> tuple[str, bool]:
        """Where ``folder``'s ``dsd_state.pt`` places it (``"at step N in the sparse phase of cycle 0"``), and
        whether that is the schedule's last phase."""
        path = os.path.join(folder, STATE_FILE)
        stages = self._engine.schedule.stages
        try:
            saved = torch.load(path, map_location="cpu", weights_only=True)
            index = int(saved["dsd"]["schedule"]["index"])
            stage, step = stages[index], saved["global_step"]
        except Exception as error:  # no DSD state there (saved before DSD joined the run), or a foreign file
            return f"without a readable DSD state ({path}: {type(error).__name__}), in no phase DSD knows", False
        last = index == len(stages) - 1
        return f"at step {step} in the {stage.phase.value} phase of cycle {stage.cycle}{' (the last)' * last}", last

    # ------------------------------------------------------------------ checkpoints

    def on_save(self, args: TrainingArguments, state: TrainerState, control: TrainerControl,
                **kwargs: Any) -> None:
        """Write DSD's state into the folder the Trainer has just saved (every rank builds it: a collective
        for sharded weights; the rank that saves writes it, through a temporary file)."""
        self._hold_best_model_record(args, state)
        saved = {"dsd": self._engine.state_dict(), "global_step": state.global_step, "token": self._token}
        folder = checkpoint_folder(self._run_directory(args), state.global_step)
        if not args.should_save:
            return
        if not os.path.isdir(folder):
            if not self._said_no_folder:
                self._said_no_folder = True
                log.warn(
                    f"DSDTrainerCallback did not find the checkpoint the Trainer has just saved at step"
                    f" {state.global_step}: there is no folder {folder}, so DSD's state ({STATE_FILE}) is not saved"
                    " with it and a resume from it will be refused. Save checkpoints where the Trainer's"
                    " `_save_checkpoint` does (`output_dir`, or the trial's folder under hyperparameter search)."
                )
            return
        path = os.path.join(folder, STATE_FILE)
        torch.save(saved, path + ".tmp")
        os.replace(path + ".tmp", path)

    def _run_directory(self, args: TrainingArguments) -> str:
        """The folder the Trainer saves its ``checkpoint-<step>`` folders in, as its ``_save_checkpoint``
        computes it (``Trainer._get_output_dir``): ``output_dir``, or the trial's folder under it during a
        ``hyperparameter_search``; ``output_dir`` when no Trainer was found."""
        output_dir = getattr(self._trainer, "_get_output_dir", None)
        if output_dir is None:
            return str(args.output_dir)
        return str(output_dir(getattr(self._trainer, "_trial", None)))

    def _restore(self, args: TrainingArguments, state: TrainerState) -> Optional[str]:
        """Find, read and check the DSD state of the checkpoint the Trainer restored (see the module
        docstring) and return its run token; ``None`` for a checkpoint saved without DSD (DSD then joins the run
        from there). Raise :class:`~lightning_dsd.rules.state.CheckpointStateError` before anything changes."""
        step = state.global_step
        record = _records(state).get(RECORD_KEY)
        if record is None:
            return None
        token = record.get("token") if isinstance(record, Mapping) else None
        if not isinstance(token, str):
            raise CheckpointStateError(
                f"its trainer_state.json holds {record!r} under `stateful_callbacks[{RECORD_KEY!r}]`, expected"
                " DSD's record, a mapping with a `token` string"
            )
        folders = [checkpoint_folder(self._run_directory(args), step)]
        if isinstance(args.resume_from_checkpoint, str):
            folders.insert(0, args.resume_from_checkpoint)
        found = []
        for folder in dict.fromkeys(folders):
            path = os.path.join(folder, STATE_FILE)
            if not os.path.isfile(path):
                found.append(f"{path}: no such file")
                continue
            try:
                saved = torch.load(path, map_location="cpu", weights_only=True)
            except Exception as error:  # a truncated or foreign file: say which and why
                raise CheckpointStateError(f"{path} cannot be read ({type(error).__name__}: {error})") from None
            if not isinstance(saved, Mapping) or "dsd" not in saved:
                raise CheckpointStateError(f"{path} holds {type(saved).__name__}, expected DSD's saved mapping"
                                           " with a `dsd` entry")
            if saved.get("token") != token or saved.get("global_step") != step:
                found.append(f"{path}: saved at step {saved.get('global_step')!r} by run {saved.get('token')!r}")
                continue
            self._engine.load_state_dict(saved["dsd"])
            self._refuse_a_fresh_schedule(folder)
            log.info(f"DSDTrainerCallback resumed the {self.phase_label} phase at step {step} from {path}.")
            return token
        raise CheckpointStateError(
            f"the Trainer resumed at step {step} of DSD run {token!r}, but no DSD state of that step and run was"
            f" found ({'; '.join(found)})",
            "Resume from a checkpoint folder under `output_dir`, or name the folder with"
            " `TrainingArguments(resume_from_checkpoint=...)` as well as in `train(...)`.",
        )


    def _refuse_a_fresh_schedule(self, folder: str) -> None:
        """Refuse, before any step, to resume DSD from a checkpoint without optimizer and scheduler state
        (``save_only_model=True``) when DSD scales the learning rate (``lr_scale != 1``): the Trainer would start
        its learning-rate schedule afresh from step 0, so a re-dense phase, behind or ahead, would not train at
        ``lr_scale`` times the rate of the run the checkpoint comes from. (The masks do not depend on the
        optimizer; the learning rate does.)"""
        if self.lr_scale == 1 or holds_optimizer_and_scheduler(folder):
            return
        redense = next((stage for stage in self._engine.schedule.stages if stage.phase is Phase.REDENSE), None)
        if redense is None:
            return
        behind = self._engine.schedule.index >= self._engine.schedule.stages.index(redense)
        raise CheckpointStateError(
            f"{folder} holds no optimizer and scheduler state (no {OPTIMIZER_NAME} and {SCHEDULER_NAME}: it was saved"
            f" with `save_only_model=True`), so the Trainer would start a fresh learning-rate schedule from step 0;"
            f" the checkpoint is in the {self.phase_label} phase of cycle {self.cycle}, and DSD's re-dense phase"
            f" {'behind it' if behind else 'ahead'} scales the rate by lr_scale={self.lr_scale:g}: re-dense would"
            " train at lr_scale times the fresh schedule's rate, not the run's",
            "Resume from a checkpoint saved with `save_only_model=False` (the default), which holds the optimizer"
            " and the schedule.",
        )


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


def check_training_arguments(args: TrainingArguments) -> None:
    """Refuse, before anything trains, the set-ups whose parameters DSD cannot prune per tensor."""
    if getattr(args, "deepspeed", None):
        raise ValueError(
            "DSDTrainerCallback supports one device, DDP and FSDP2 (`fsdp='full_shard'`, fsdp_config version 2)."
            f" Found a DeepSpeed configuration (`deepspeed={args.deepspeed!r}`): DeepSpeed flattens parameters into"
            " partitions that mix layers, so per-tensor magnitude thresholds cannot be computed. Use FSDP2 instead."
        )
    if getattr(args, "fsdp", None):
        config: Any = args.fsdp_config or {}  # a dict once TrainingArguments has read it
        version = int(config.get("version", config.get("fsdp_version", 2)))
        if version != 2:
            raise ValueError(
                "DSDTrainerCallback supports one device, DDP and FSDP2. Found FSDP version"
                f" {version} (`fsdp_config={dict(config)!r}`), whose flat parameters mix layers, so per-tensor"
                " magnitude thresholds cannot be computed. Use FSDP2: `fsdp_config={'version': 2}`."
            )


def training_limit(args: TrainingArguments, state: TrainerState, train_dataloader: Any,
                   interval: str) -> Optional[TrainingLimit]:
    """The argument that ends the Trainer's training, as the user gave it (``max_steps`` when set, else
    ``num_train_epochs``, which may be fractional), and where it stops in ``interval`` units: after
    ``state.max_steps`` optimizer steps (``ceil(num_train_epochs * steps_per_epoch)``), an epoch making
    ``ceil(batches / gradient_accumulation_steps)`` of them, as ``Trainer.set_initial_training_values`` counts.
    ``None`` where that is unknown (an epoch clock over a dataloader without a length)."""
    try:
        batches: Optional[int] = len(train_dataloader)
    except TypeError:
        batches = None
    accumulate = args.gradient_accumulation_steps
    steps_per_epoch = max(math.ceil(batches / accumulate), 1) if batches else None
    if state.max_steps <= 0 or (interval == "epoch" and steps_per_epoch is None):
        return None
    stops_at = float(state.max_steps) if interval == "step" else state.max_steps / (steps_per_epoch or 1)
    argument, value, unit = (("max_steps", args.max_steps, "step") if args.max_steps > 0
                             else ("num_train_epochs", args.num_train_epochs, "epoch"))
    per_epoch = (f"{steps_per_epoch} optimizer steps per epoch ({batches} batches,"
                 f" gradient_accumulation_steps={accumulate})")
    return TrainingLimit(argument, value, stops_at, interval, unit, steps_per_epoch, per_epoch)


def checkpoint_folder(run_directory: str, step: int) -> str:
    """The folder the Trainer saves step ``step`` in (``_save_checkpoint``'s ``<run directory>/checkpoint-<step>``).

    Examples:
        >>> checkpoint_folder("out", 12)
        'out/checkpoint-12'
    """
    return os.path.join(run_directory, f"{PREFIX_CHECKPOINT_DIR}-{step}")


def holds_optimizer_and_scheduler(folder: str) -> bool:
    """Whether the Trainer restores its optimizer and scheduler from ``folder``: the test of its
    ``_load_optimizer_and_scheduler`` (an optimizer file or folder, and ``scheduler.pt``). A checkpoint saved with
    ``save_only_model=True`` holds neither: the Trainer then builds a fresh optimizer and learning-rate schedule."""
    optimizer = (os.path.isfile(os.path.join(folder, OPTIMIZER_NAME))
                 or os.path.isfile(os.path.join(folder, OPTIMIZER_NAME_BIN))
                 or any(OPTIMIZER_NAME_BIN.split(".")[0] in name and os.path.isdir(os.path.join(folder, name))
                        for name in os.listdir(folder)))
    return optimizer and os.path.isfile(os.path.join(folder, SCHEDULER_NAME))


def _records(state: TrainerState) -> dict[str, Any]:
    """``state.stateful_callbacks``: the dict the Trainer saves in ``trainer_state.json`` (typed as a list, the
    callbacks it is built from)."""
    if not isinstance(state.stateful_callbacks, dict):
        state.stateful_callbacks = {}  # type: ignore[assignment]
    records: Any = state.stateful_callbacks
    return records


def _refuse_lazy_modules(model: Any) -> None:
    """Refuse lazy modules when the Trainer is built: it offers no example input to shape them, and counts every
    parameter's size before training."""
    if isinstance(model, nn.Module):
        refuse_lazy_modules(model, "DSDTrainerCallback", "before `Trainer(model=...)`, which takes no example input")


def _calling_trainer(callback: TrainerCallback) -> Optional[Trainer]:
    """The ``Trainer`` up the call stack whose callbacks include ``callback`` (see the module docstring)."""
    frame = sys._getframe(1)
    while frame is not None:
        candidate = frame.f_locals.get("self")
        if isinstance(candidate, Trainer) and any(c is callback for c in candidate.callback_handler.callbacks):
            return candidate
        frame = frame.f_back  # type: ignore[assignment]
    return None


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
