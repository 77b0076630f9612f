"""DSD's state in the ``transformers.Trainer``'s checkpoint folders: written into each ``checkpoint-<step>``
folder the Trainer saves (:data:`STATE_FILE`, so it rotates with ``save_total_limit``), found and checked at a
resume (:meth:`StateFiles.find`), and read back to say which phase a checkpoint was saved in
(:func:`phase_of_checkpoint`).

``trainer.train(resume_from_checkpoint=path)`` does not tell callbacks the path. DSD reads
``<args.output_dir>/checkpoint-<state.global_step>/dsd_state.pt`` (what ``resume_from_checkpoint=True`` and the
usual ``output_dir/checkpoint-N`` paths pick), or the folder named by
``TrainingArguments(resume_from_checkpoint=...)`` when that is set (the way to resume from a folder outside
``output_dir``). To be sure the file belongs to the checkpoint the Trainer restored, the run writes a small record
(a run token) into the ``TrainerState``'s ``stateful_callbacks`` under :data:`RECORD_KEY`, so it is saved in every
``trainer_state.json``; the file must carry that token and the restored step, or the resume is refused with what
was found. A checkpoint without that record was saved without DSD: DSD joins the run there and its phases count
from that step, as ``DSDCallback`` does. (``restore_callback_states_from_checkpoint=True`` makes the Trainer warn
that it ignores this entry: it is not a callback's own state.)

Examples:
    >>> import tempfile
    >>> from transformers import TrainerState
    >>> folder = checkpoint_folder(tempfile.mkdtemp(), 12)
    >>> os.path.basename(folder)
    'checkpoint-12'
    >>> StateFiles().find(folder, None, TrainerState(global_step=12)) is None  # no DSD record: joined, not restored
    True
"""

from __future__ import annotations

import os
from typing import Any, Mapping, Optional, Sequence

import torch
from transformers import TrainerState, TrainingArguments
from transformers.trainer import OPTIMIZER_NAME, OPTIMIZER_NAME_BIN, SCHEDULER_NAME
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

from lightning_dsd.rules import log
from lightning_dsd.rules.engine import DSDEngine
from lightning_dsd.rules.phases import Phase, Stage
from lightning_dsd.rules.state import CheckpointStateError

#: The file DSD writes inside each ``checkpoint-<step>`` folder.
STATE_FILE = "dsd_state.pt"
#: The key of DSD's record in ``TrainerState.stateful_callbacks`` (saved in ``trainer_state.json``).
RECORD_KEY = "lightning_dsd"


def checkpoint_folder(run_directory: str, step: int) -> str:
    """The folder the Trainer saves step ``step`` in (``_save_checkpoint``'s ``<run directory>/checkpoint-<step>``).

    Examples:
        >>> checkpoint_folder("out", 12)
        'out/checkpoint-12'
    """
    return os.path.join(run_directory, f"{PREFIX_CHECKPOINT_DIR}-{step}")


def run_directory(trainer: Any, args: TrainingArguments) -> str:
    """The folder the Trainer saves its ``checkpoint-<step>`` folders in, as its ``_save_checkpoint`` computes it
    (``Trainer._get_output_dir``): ``output_dir``, or the trial's folder under it during a
    ``hyperparameter_search``; ``output_dir`` when no Trainer was found."""
    output_dir = getattr(trainer, "_get_output_dir", None)
    if output_dir is None:
        return str(args.output_dir)
    return str(output_dir(getattr(trainer, "_trial", None)))


def run_records(state: TrainerState) -> dict[str, Any]:
    """``state.stateful_callbacks``: the dict the Trainer saves in ``trainer_state.json`` (typed as a list, the
    callbacks it is built from), where DSD keeps its record under :data:`RECORD_KEY`."""
    if not isinstance(state.stateful_callbacks, dict):
        state.stateful_callbacks = {}  # type: ignore[assignment]
    records: Any = state.stateful_callbacks
    return records


def holds_optimizer_and_scheduler(folder: str) -> bool:
    """Whether the Trainer restores its optimizer and scheduler from ``folder``: the test of its
    ``_load_optimizer_and_scheduler`` (an optimizer file or folder, and ``scheduler.pt``). A checkpoint saved with
    ``save_only_model=True`` holds neither: the Trainer then builds a fresh optimizer and learning-rate schedule."""
    optimizer = (os.path.isfile(os.path.join(folder, OPTIMIZER_NAME))
                 or os.path.isfile(os.path.join(folder, OPTIMIZER_NAME_BIN))
                 or any(OPTIMIZER_NAME_BIN.split(".")[0] in name and os.path.isdir(os.path.join(folder, name))
                        for name in os.listdir(folder)))
    return optimizer and os.path.isfile(os.path.join(folder, SCHEDULER_NAME))


class StateFiles:
    """DSD's :data:`STATE_FILE` in the Trainer's checkpoint folders: written at each save, found and checked at a
    resume. A folder the Trainer did not save where DSD looks is warned about once."""

    def __init__(self) -> None:
        self._said_no_folder = False

    def save(self, folder: str, step: int, saved: Mapping[str, Any]) -> None:
        """Write ``saved`` into ``folder``, the checkpoint the Trainer has just saved (through a temporary file,
        so a crash leaves no half-written state)."""
        if not os.path.isdir(folder):
            if not self._said_no_folder:
                self._said_no_folder = True
                log.warn(
                    f"DSDTrainerCallback did not find the checkpoint the Trainer has just saved at step {step}:"
                    f" there is no folder {folder}, so DSD's state ({STATE_FILE}) is not saved with it and a resume"
                    " from it will be refused. Save checkpoints where the Trainer's `_save_checkpoint` does"
                    " (`output_dir`, or the trial's folder under hyperparameter search)."
                )
            return
        path = os.path.join(folder, STATE_FILE)
        torch.save(dict(saved), path + ".tmp")
        os.replace(path + ".tmp", path)

    def find(self, run_folder: str, resume_from: Optional[str],
             state: TrainerState) -> Optional[tuple[str, str, Mapping[str, Any]]]:
        """The DSD state of the checkpoint the Trainer restored (see the module docstring): its run token, its
        folder and what was saved there; ``None`` for a checkpoint saved without DSD (DSD then joins the run from
        there). ``run_folder`` is the folder of this step's checkpoint in the run's directory, ``resume_from`` the
        folder ``TrainingArguments(resume_from_checkpoint=...)`` names, looked in first. Raise
        :class:`~lightning_dsd.rules.state.CheckpointStateError` when the record or the file is damaged, or no
        file of that step and run is found."""
        step = state.global_step
        record = run_records(state).get(RECORD_KEY)
        if record is None:
            return None
        token = record.get("token") if isinstance(record, Mapping) else None
        if not isinstance(token, str):
            raise CheckpointStateError(
                f"its trainer_state.json holds {record!r} under `stateful_callbacks[{RECORD_KEY!r}]`, expected"
                " DSD's record, a mapping with a `token` string"
            )
        found = []
        for folder in dict.fromkeys([resume_from, run_folder] if resume_from else [run_folder]):
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
            return token, folder, saved
        raise CheckpointStateError(
            f"the Trainer resumed at step {step} of DSD run {token!r}, but no DSD state of that step and run was"
            f" found ({'; '.join(found)})",
            "Resume from a checkpoint folder under `output_dir`, or name the folder with"
            " `TrainingArguments(resume_from_checkpoint=...)` as well as in `train(...)`.",
        )


def phase_of_checkpoint(folder: str, stages: Sequence[Stage]) -> tuple[str, bool]:
    """Where ``folder``'s :data:`STATE_FILE` places it among the schedule's ``stages`` (``"at step N in the sparse
    phase of cycle 0"``), and whether that is the schedule's last phase."""
    path = os.path.join(folder, STATE_FILE)
    try:
        saved = torch.load(path, map_location="cpu", weights_only=True)
        index = int(saved["dsd"]["schedule"]["index"])
        stage, step = stages[index], saved["global_step"]
    except Exception as error:  # no DSD state there (saved before DSD joined the run), or a foreign file
        return f"without a readable DSD state ({path}: {type(error).__name__}), in no phase DSD knows", False
    last = index == len(stages) - 1
    return f"at step {step} in the {stage.phase.value} phase of cycle {stage.cycle}{' (the last)' * last}", last


def refuse_a_fresh_schedule(folder: str, engine: DSDEngine) -> None:
    """Refuse, before any step, to resume DSD from a checkpoint without optimizer and scheduler state
    (``save_only_model=True``) when DSD scales the learning rate (``lr_scale != 1``): the Trainer would start its
    learning-rate schedule afresh from step 0, so a re-dense phase, behind or ahead, would not train at
    ``lr_scale`` times the rate of the run the checkpoint comes from. (The masks do not depend on the optimizer;
    the learning rate does.)"""
    lr_scale = engine.options.lr_scale
    if lr_scale == 1 or holds_optimizer_and_scheduler(folder):
        return
    schedule = engine.schedule
    redense = next((stage for stage in schedule.stages if stage.phase is Phase.REDENSE), None)
    if redense is None:
        return
    behind = schedule.index >= schedule.stages.index(redense)
    raise CheckpointStateError(
        f"{folder} holds no optimizer and scheduler state (no {OPTIMIZER_NAME} and {SCHEDULER_NAME}: it was saved"
        f" with `save_only_model=True`), so the Trainer would start a fresh learning-rate schedule from step 0;"
        f" the checkpoint is in the {engine.phase_label} phase of cycle {engine.cycle}, and DSD's re-dense phase"
        f" {'behind it' if behind else 'ahead'} scales the rate by lr_scale={lr_scale:g}: re-dense would"
        " train at lr_scale times the fresh schedule's rate, not the run's",
        "Resume from a checkpoint saved with `save_only_model=False` (the default), which holds the optimizer"
        " and the schedule.",
    )
