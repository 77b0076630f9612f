"""What the transformers door reads in ``TrainingArguments``: the set-ups it refuses before anything trains
(:func:`check_training_arguments`: DeepSpeed, FSDP1) and how far the ``Trainer`` will train, in DSD's unit
(:func:`training_limit`, for :func:`~lightning_dsd.rules.preflight.warn_if_schedule_does_not_fit`).

Examples:
    >>> from transformers import TrainerState, TrainingArguments
    >>> args = TrainingArguments(output_dir="out", num_train_epochs=2.5, gradient_accumulation_steps=2,
    ...                          max_steps=12, use_cpu=True, report_to="none")
    >>> check_training_arguments(args)  # one device: nothing to refuse
    >>> limit = training_limit(args, TrainerState(max_steps=12), train_dataloader=range(16), interval="epoch")
    >>> limit.description
    'max_steps=12, which is 1.5 epochs at 8 optimizer steps per epoch (16 batches, gradient_accumulation_steps=2)'
"""

from __future__ import annotations

import math
from typing import Any, Optional

from transformers import TrainerState, TrainingArguments

from lightning_dsd.rules.preflight import TrainingLimit


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
