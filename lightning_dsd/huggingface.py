"""``DSDTrainerCallback``: Dense-Sparse-Dense training for Hugging Face ``transformers.Trainer``.

The third front door to :class:`~lightning_dsd.engine.DSDEngine`, beside :class:`~lightning_dsd.DSDCallback`
(Lightning) and :class:`~lightning_dsd.DSD` (Fabric and plain loops). It only maps the ``Trainer``'s events
onto the engine and keeps what is the ``Trainer``'s: its clock, its checkpoint folders, its loggers and its
distributed set-ups. This module is the only one that imports ``transformers``
(``pip install "lightning_dsd[transformers]"``); ``import lightning_dsd`` never does.

How each event is used (the order is ``Trainer._inner_training_loop``'s):

* ``on_init_end`` / ``on_train_begin``: refuse FSDP1 and DeepSpeed; choose the targets in the model the
  ``Trainer`` trains; take the optimizer and scheduler it built (accelerate's ``AcceleratedOptimizer`` and
  ``AcceleratedScheduler`` unwrapped, so the engine's hooks sit on the optimizer that steps); on a resume,
  read and check DSD's state from the checkpoint folder before anything trains.
* ``on_epoch_begin`` / ``on_step_begin``: the transitions now due (``interval="epoch"`` counts the Trainer's
  finished epochs, ``"step"`` its optimizer steps, ``state.global_step``). A transition therefore happens
  before the first forward pass of the next step, so the evaluation and the checkpoint of the step that
  ends a phase show that phase.
* ``on_pre_optimizer_step``: the pruned entries' gradients are zeroed (the optimizer's step pre-hook would
  do it too). The Trainer clips gradients *before* this event, so in a sparse phase each target also has a
  gradient hook that zeroes its pruned entries as backward computes them: ``max_grad_norm`` measures the
  sparse network's gradient, as under ``DSDCallback`` (FSDP2's sharded parameters excepted, see
  ``_hook_gradients``).
* ``on_evaluate``: ``monitor`` (e.g. ``"eval_loss"``) is read from the evaluation's metrics when a phase runs
  until it converges (a length of ``None``).
* ``on_save``: DSD's state (schedule, masks at 1 bit per weight, configuration) is written as
  ``dsd_state.pt`` inside the ``checkpoint-<step>`` folder the Trainer just wrote, so it rotates with
  ``save_total_limit``.
* ``on_train_end``: the final histograms and the figure.

**Finding the Trainer.** ``transformers`` hands callbacks ``args``, ``state``, ``control``, the model, its
optimizer, scheduler and dataloaders, never the ``Trainer``. Two things need it: the ``dsd/*`` scalars go
through ``Trainer.log`` (so W&B, MLflow, TensorBoard and every other reporting callback receive them, in
the Trainer's own records ``state.log_history``), and the TensorBoard directory is read from the Trainer's
``TensorBoardCallback``. At ``on_init_end`` (or the first ``on_train_begin``, for a callback added later)
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

import math
import os
import sys
import uuid
from functools import partial
from typing import Any, Mapping, Optional, Sequence

import torch
from lightning.fabric.utilities.rank_zero import rank_zero_info, rank_zero_warn
from torch import Tensor, nn
from torch.distributed.tensor import DTensor
from torch.optim import Optimizer
from torch.utils.hooks import RemovableHandle
from transformers import Trainer, TrainerCallback, TrainerControl, TrainerState, TrainingArguments

from lightning_dsd.arguments import check_bool
from lightning_dsd.door import ReadsEngine
from lightning_dsd.engine import DSDEngine
from lightning_dsd.options import KEYWORD_OPTIONS, LengthsArgument, check_options
from lightning_dsd.phases import Phase
from lightning_dsd.sharding import from_rank_zero
from lightning_dsd.state import CheckpointStateError

#: The file DSD writes inside each ``checkpoint-<step>`` folder.
STATE_FILE = "dsd_state.pt"
#: The key of DSD's record in ``TrainerState.stateful_callbacks`` (saved in ``trainer_state.json``).
RECORD_KEY = "lightning_dsd"

#: The shared keyword options (:data:`~lightning_dsd.options.KEYWORD_OPTIONS`, declared once for every door).
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
        **options: Any,
    ) -> None:
        unknown = sorted(set(options) - set(SHARED_OPTIONS))
        if unknown:
            raise TypeError(
                f"DSDTrainerCallback got unknown keyword(s) {unknown}. It takes the options DSDCallback shares with"
                f" the other doors: {list(SHARED_OPTIONS)}, and `stop_at_end`. (`export_sparse` is Lightning's:"
                " here every `checkpoint-N` folder of the sparse phase holds the sparse model.)"
            )
        self.options = check_options(sparsity, dense_epochs, sparse_epochs, redense_epochs, **options)
        self.stop_at_end = check_bool("stop_at_end", stop_at_end)
        self._engine = DSDEngine(self.options, self, owner="DSDTrainerCallback")
        self._trainer: Optional[Trainer] = None
        self._optimizers: list[Optimizer] = []
        self._schedulers: list[Any] = []
        self._sink: Optional[TrainerSink] = None
        self._token: Optional[str] = None
        self._gradient_hooks: list[RemovableHandle] = []
        self._hooked_cycle: Optional[int] = None
        self._started = False
        self._training = False

    # ------------------------------------------------------------------ what the engine asks of a door

    @property
    def optimizers(self) -> Sequence[Optimizer]:
        return self._optimizers

    @property
    def schedulers(self) -> Sequence[Any]:
        return self._schedulers

    @property
    def sink(self) -> Optional[TrainerSink]:
        return self._sink

    def sparse_phase_ending(self, cycle: int, targets: Mapping[str, Tensor]) -> None:
        """Nothing to export: the ``checkpoint-N`` folders of the sparse phase hold the sparse model."""

    # ------------------------------------------------------------------ set-up

    def on_init_end(self, args: TrainingArguments, state: TrainerState, control: TrainerControl,
                    **kwargs: Any) -> None:
        check_training_arguments(args)
        self._trainer = self._trainer or _calling_trainer(self)

    def on_train_begin(self, args: TrainingArguments, state: TrainerState, control: TrainerControl,
                       **kwargs: Any) -> None:
        check_training_arguments(args)
        self._trainer = self._trainer or _calling_trainer(self)
        resuming = state.global_step > 0
        if self._started:
            if not resuming:
                raise RuntimeError(
                    "This DSDTrainerCallback already ran in an earlier `train()`, so a new one from step 0 would"
                    " start in the middle of its schedule. Give the Trainer a new DSDTrainerCallback(...), or"
                    " resume with `trainer.train(resume_from_checkpoint=...)`."
                )
            self._engine = DSDEngine(self.options, self, owner="DSDTrainerCallback")
        model = kwargs.get("model")
        if not isinstance(model, nn.Module):
            raise RuntimeError(f"DSDTrainerCallback needs the model at `on_train_begin`; the Trainer passed {model!r}.")
        self._optimizers = _torch_optimizers(kwargs.get("optimizer"))
        self._schedulers = _torch_schedulers(kwargs.get("lr_scheduler"))
        self._engine.bind(model)
        self._engine.check_optimizers(self._optimizers, every_one_must_own_a_target=False)
        token = self._restore(args, state) if resuming else None  # checked and taken before anything is written
        if resuming and token is None:
            self._engine.join(self._now(state), "the checkpoint holds no DSD state")
        self._token = token or from_rank_zero(uuid.uuid4().hex)
        self._sink = TrainerSink(self._trainer, args, state, self.options)
        self._sink.say_what_is_skipped()
        _records(state)[RECORD_KEY] = {"token": self._token, "file": STATE_FILE}
        self._warn_if_schedule_does_not_fit(state)
        self._started = self._training = True
        self._engine.start_reporting()
        self._engine.resume_sparse_phase()
        self._hook_gradients()

    def _warn_if_schedule_does_not_fit(self, state: TrainerState) -> None:
        schedule = self._engine.schedule
        end = schedule.end()
        limit = int(state.num_train_epochs) if self.interval == "epoch" else state.max_steps
        if end is not None and limit and limit < end:
            unit = "num_train_epochs" if self.interval == "epoch" else "max_steps"
            rank_zero_warn(
                f"The DSD schedule needs {end} {self.interval}s"
                f" ({' + '.join(str(s.length) for s in schedule.stages)}), but the Trainer runs {unit}={limit}:"
                f" training will stop in the {schedule.stage_at(limit - 1).phase.value} phase. Set {unit}={end} to"
                " run every phase."
            )

    # ------------------------------------------------------------------ the clock

    def _now(self, state: TrainerState) -> int:
        """Finished epochs (``state.epoch`` is ``epoch + (step + 1) / steps_in_epoch``, a whole number at
        each epoch's end) or optimizer steps."""
        return math.floor(state.epoch or 0) if self.interval == "epoch" else state.global_step

    def on_epoch_begin(self, args: TrainingArguments, state: TrainerState, control: TrainerControl,
                       **kwargs: Any) -> None:
        self._engine.advance_if_due(self._now(state))
        self._hook_gradients()

    def on_step_begin(self, args: TrainingArguments, state: TrainerState, control: TrainerControl,
                      **kwargs: Any) -> None:
        self._engine.forget_masked_gradients()
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
        for optimizer in self._optimizers:
            self._engine.mask_gradients(optimizer)

    def on_step_end(self, args: TrainingArguments, state: TrainerState, control: TrainerControl,
                    **kwargs: Any) -> None:
        if self.interval == "step":
            self._stop_if_finished(state, control)

    def on_epoch_end(self, args: TrainingArguments, state: TrainerState, control: TrainerControl,
                     **kwargs: Any) -> None:
        self._engine.epoch_ended(max(math.floor(state.epoch or 0) - 1, 0))
        if self.interval == "epoch":
            self._stop_if_finished(state, control)

    def on_evaluate(self, args: TrainingArguments, state: TrainerState, control: TrainerControl,
                    metrics: Optional[Mapping[str, float]] = None, **kwargs: Any) -> None:
        if self.monitor is None or not self._training:
            return
        value = (metrics or {}).get(self.monitor)
        if value is None:
            raise RuntimeError(
                f"DSDTrainerCallback's `monitor={self.monitor!r}` is not among the evaluation's metrics"
                f" {sorted(metrics or {})}. Name one of them (the Trainer prefixes them with `eval_`)."
            )
        self._engine.observe(float(value))
        self._stop_if_finished(state, control)

    def _stop_if_finished(self, state: TrainerState, control: TrainerControl) -> None:
        if self.stop_at_end and self._engine.is_finished(self._now(state)) and not control.should_training_stop:
            control.should_training_stop = True
            rank_zero_info(f"DSD finished its last phase ({self.phase.value}, cycle {self.cycle}): stopping.")

    def on_train_end(self, args: TrainingArguments, state: TrainerState, control: TrainerControl,
                     **kwargs: Any) -> None:
        self._training = False
        self._hook_gradients()
        self._engine.warn_if_left_sparse(self._now(state), "resume with `trainer.train(resume_from_checkpoint=...)`")
        self._engine.training_ended()
        if self._sink is not None:
            self._sink.close()

    # ------------------------------------------------------------------ checkpoints

    def on_save(self, args: TrainingArguments, state: TrainerState, control: TrainerControl,
                **kwargs: Any) -> None:
        """Write DSD's state into the folder the Trainer has just saved (every rank builds it: a collective
        for sharded weights; the rank that saves writes it, through a temporary file)."""
        saved = {"dsd": self._engine.state_dict(), "global_step": state.global_step, "token": self._token}
        folder = checkpoint_folder(args, state.global_step)
        if args.should_save and os.path.isdir(folder):
            path = os.path.join(folder, STATE_FILE)
            torch.save(saved, path + ".tmp")
            os.replace(path + ".tmp", path)

    def _restore(self, args: TrainingArguments, state: TrainerState) -> Optional[str]:
        """Find, read and check the DSD state of the checkpoint the Trainer restored (see the module
        docstring) and return its run token; ``None`` for a checkpoint saved without DSD (DSD then joins the run
        from there). Raise :class:`~lightning_dsd.state.CheckpointStateError` before anything changes."""
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
        folders = [checkpoint_folder(args, step)]
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
            rank_zero_info(f"DSDTrainerCallback resumed the {self.phase_label} phase at step {step} from {path}.")
            return token
        raise CheckpointStateError(
            f"the Trainer resumed at step {step} of DSD run {token!r}, but no DSD state of that step and run was"
            f" found ({'; '.join(found)})",
            "Resume from a checkpoint folder under `output_dir`, or name the folder with"
            " `TrainingArguments(resume_from_checkpoint=...)` as well as in `train(...)`.",
        )


class TrainerSink:
    """A :class:`~lightning_dsd.reporting.ReportSink` for a ``transformers.Trainer``: scalars through
    ``Trainer.log`` (every reporting integration gets them), histograms, text and figures through a
    ``SummaryWriter`` of DSD's own in the Trainer's TensorBoard directory; only rank zero writes."""

    def __init__(self, trainer: Optional[Trainer], args: TrainingArguments, state: TrainerState,
                 options: Any) -> None:
        self._trainer = trainer
        self._state = state
        self._options = options
        self._report_to = list(args.report_to or [])
        directory = tensorboard_directory(trainer, args) if state.is_world_process_zero else None
        self.directory = directory
        self._writer: Optional[Any] = None
        if directory is not None:
            from torch.utils.tensorboard import SummaryWriter

            self._writer = SummaryWriter(log_dir=directory)
        self._logs, self._histograms = from_rank_zero((bool(self._report_to), self._writer is not None))

    @property
    def is_rank_zero(self) -> bool:
        return bool(self._state.is_world_process_zero)

    @property
    def step(self) -> int:
        return int(self._state.global_step)

    @property
    def has_loggers(self) -> bool:
        return self._logs

    @property
    def has_histograms(self) -> bool:
        return self._histograms

    def tensorboard(self) -> Optional[Any]:
        if not self.is_rank_zero or self._writer is None:
            return None
        return self._writer if self._trainer is None else TrainPrefixedLayout(self._writer)

    def log_metrics(self, metrics: dict[str, float]) -> None:
        if not self.is_rank_zero:
            return
        if self._trainer is not None:
            self._trainer.log(dict(metrics))
        elif self._writer is not None:
            for tag, value in metrics.items():
                self._writer.add_scalar(tag, value, self.step)

    def figure_directory(self) -> Optional[str]:
        return os.path.join(self.directory, "dsd_figures") if self.directory is not None else None

    def figure_saved(self, path: str) -> None:
        """Nothing more: the TensorBoard run's directory is where the figure is kept."""

    def say_what_is_skipped(self) -> None:
        """Once, before training: what the Trainer's reporting set-up cannot show."""
        options = self._options
        wants_histograms = options.log_histograms or bool(options.figure_layers)
        if not self._report_to:
            if options.log_scalars or wants_histograms:
                rank_zero_info(
                    "DSDTrainerCallback logs nothing (report_to='none'): no dsd/* scalars, weight histograms,"
                    " TensorBoard notes or figures; transition notes are printed only. Use report_to='tensorboard'"
                    " (and any other integration) to keep them."
                )
            return
        if self._trainer is None and self.is_rank_zero:
            rank_zero_warn(
                "DSDTrainerCallback could not find the transformers.Trainer that runs it, so its dsd/* scalars go"
                " to TensorBoard only (if any), not through `Trainer.log` to the other integrations."
            )
        if not self._histograms and wants_histograms:
            rank_zero_warn(
                "DSDTrainerCallback skips weight histograms, TensorBoard notes and the figure: they need"
                f" report_to to include 'tensorboard' (it is {self._report_to}). Scalars go through Trainer.log."
            )

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()


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


def checkpoint_folder(args: TrainingArguments, step: int) -> str:
    """The folder the Trainer saves step ``step`` in (``_save_checkpoint``'s ``output_dir/checkpoint-<step>``)."""
    return os.path.join(str(args.output_dir), f"checkpoint-{step}")


def _records(state: TrainerState) -> dict[str, Any]:
    """``state.stateful_callbacks``: the dict the Trainer saves in ``trainer_state.json`` (typed as a list, the
    callbacks it is built from)."""
    if not isinstance(state.stateful_callbacks, dict):
        state.stateful_callbacks = {}  # type: ignore[assignment]
    records: Any = state.stateful_callbacks
    return records


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


def _torch_schedulers(scheduler: Any) -> list[Any]:
    """The scheduler behind accelerate's ``AcceleratedScheduler``, whose learning rates re-dense scales."""
    from accelerate.scheduler import AcceleratedScheduler

    while isinstance(scheduler, AcceleratedScheduler):
        scheduler = scheduler.scheduler
    return [] if scheduler is None else [scheduler]
