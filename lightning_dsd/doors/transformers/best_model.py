"""Where the ``transformers.Trainer``'s best model comes from under DSD (``best_model_phase``).

The Trainer keeps a record of its best evaluation (``metric_for_best_model``: ``state.best_metric``,
``best_global_step``, ``best_model_checkpoint``), which ``load_best_model_at_end``, ``save_strategy="best"``,
checkpoint rotation and ``EarlyStoppingCallback`` read. With ``best_model_phase="final"`` the best model is chosen
among the checkpoints of DSD's last phase only, as ``FinalPhaseCheckpoint`` does under Lightning: before that phase
the record is held empty after each evaluation (:func:`hold_best_model_record`), and a record restored by a resume
in the last phase that names a checkpoint of an earlier phase is emptied
(:func:`drop_a_restored_record_of_an_earlier_phase`). ``"any"`` leaves the Trainer's own choice alone.

Examples:
    >>> from transformers import TrainerState, TrainingArguments
    >>> args = TrainingArguments(output_dir="out", metric_for_best_model="eval_loss", use_cpu=True, report_to="none")
    >>> state = TrainerState(best_metric=0.5, best_global_step=4, best_model_checkpoint="out/checkpoint-4")
    >>> hold_best_model_record(args, state, "final", in_last_phase=False)  # a dense or sparse checkpoint: forgotten
    >>> state.best_metric, state.best_model_checkpoint
    (None, None)
"""

from __future__ import annotations

from typing import Sequence

from transformers import EarlyStoppingCallback, TrainerCallback, TrainerState, TrainingArguments

from lightning_dsd.doors.transformers.checkpoints import phase_of_checkpoint
from lightning_dsd.rules import log
from lightning_dsd.rules.phases import Stage

#: ``best_model_phase``: the checkpoints among which the Trainer's best model is chosen.
BEST_MODEL_PHASES = ("final", "any")


def say_how_the_best_model_is_chosen(args: TrainingArguments, best_model_phase: str, in_last_phase: bool,
                                     callbacks: Sequence[TrainerCallback]) -> None:
    """Once, before training: where the Trainer's best model comes from, and what ``EarlyStoppingCallback`` may do
    to the schedule."""
    early_stopping = any(isinstance(callback, EarlyStoppingCallback) for callback in callbacks)
    if args.metric_for_best_model is None or in_last_phase:
        return
    uses = [use for use, on in (("load_best_model_at_end", args.load_best_model_at_end),
                                ("save_strategy='best'", args.save_strategy == "best"),
                                ("EarlyStoppingCallback", early_stopping)) if on]
    if best_model_phase == "final":
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


def hold_best_model_record(args: TrainingArguments, state: TrainerState, best_model_phase: str,
                           in_last_phase: bool) -> None:
    """Before DSD's last phase (``best_model_phase="final"``), empty the best-model record the Trainer keeps
    (``_determine_best_metric`` after an evaluation; ``best_model_checkpoint`` set in ``_save_checkpoint``), so that
    its rotation, its ``save_strategy="best"`` comparisons, ``EarlyStoppingCallback`` and the final
    ``load_best_model_at_end`` only ever see checkpoints of the last phase. Called before any transition of the
    step, so an evaluation is judged by the phase it evaluated."""
    if best_model_phase == "final" and args.metric_for_best_model is not None and not in_last_phase:
        state.best_metric = state.best_global_step = state.best_model_checkpoint = None


def drop_a_restored_record_of_an_earlier_phase(state: TrainerState, best_model_phase: str, in_last_phase: bool,
                                               stages: Sequence[Stage]) -> None:
    """On a resume in DSD's last phase (``best_model_phase="final"``): the best-model record restored from
    ``trainer_state.json`` may name a checkpoint of an earlier phase (one a run with ``"any"`` chose); it is
    emptied, so that the best model still comes from the last phase."""
    restored = state.best_model_checkpoint
    if best_model_phase != "final" or not in_last_phase or restored is None:
        return
    where, last = phase_of_checkpoint(restored, stages)
    if not last:
        state.best_metric = state.best_global_step = state.best_model_checkpoint = None
        log.info(f"DSDTrainerCallback: the Trainer's best-model record, restored with the checkpoint, names"
                 f" {restored}, saved {where}: emptied, so the best model comes from DSD's last phase"
                 " (best_model_phase='final').")
