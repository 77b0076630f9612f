"""How far a Lightning ``Trainer`` will train, counted as DSD counts: in epochs, or in optimizer steps.

A ``Trainer`` stops at ``max_epochs`` or ``max_steps``, whichever comes first, and an epoch makes
``ceil(batches / accumulate_grad_batches)`` optimizer steps, its batches being those ``limit_train_batches``
leaves. :func:`training_limit` turns that into the one limit that stops training first, in the unit of
DSD's ``interval`` (a :class:`~lightning_dsd.doors.base.TrainingLimit`), so that
:func:`~lightning_dsd.doors.base.warn_if_schedule_does_not_fit` says a schedule that cannot fit before training
starts, naming the argument.

Examples:
    >>> limit = first_limit(max_epochs=10, max_steps=24, steps_per_epoch=8, batches="16 batches", accumulate=2,
    ...                     interval="epoch")
    >>> limit.stops_at, limit.description
    (3.0, 'max_steps=24, which is 3 epochs at 8 optimizer steps per epoch (16 batches, accumulate_grad_batches=2)')
    >>> limit.setting_for(6)
    'max_steps=48'
"""

from __future__ import annotations

import math
from typing import Any, Optional

import lightning.pytorch as pl

from lightning_dsd.rules.preflight import TrainingLimit


def first_limit(
    max_epochs: Optional[int],
    max_steps: int,
    steps_per_epoch: Optional[int],
    batches: str,
    accumulate: int,
    interval: str,
) -> Optional[TrainingLimit]:
    """The first limit of ``max_epochs`` and ``max_steps`` (``None``/``-1``: none) in ``interval`` units;
    ``steps_per_epoch`` is ``None`` where it is unknown (an iterable dataset, manual optimization)."""
    step_count = _counted(steps_per_epoch, "optimizer step")
    per_epoch = f"{step_count} per epoch ({batches}, accumulate_grad_batches={accumulate})"
    candidates = []
    if max_epochs is not None and max_epochs >= 0:
        if interval == "epoch":
            candidates.append(TrainingLimit("max_epochs", max_epochs, float(max_epochs), interval, "epoch"))
        elif steps_per_epoch is not None:
            steps = float(max_epochs * steps_per_epoch)
            candidates.append(TrainingLimit("max_epochs", max_epochs, steps, interval, "epoch", steps_per_epoch,
                                            per_epoch))
    if max_steps is not None and max_steps >= 0:
        if interval == "step":
            candidates.append(TrainingLimit("max_steps", max_steps, float(max_steps), interval, "step"))
        elif steps_per_epoch:
            epochs = max_steps / steps_per_epoch
            candidates.append(TrainingLimit("max_steps", max_steps, epochs, interval, "step", steps_per_epoch,
                                            per_epoch))
    return min(candidates, key=lambda limit: limit.stops_at, default=None)


def _counted(count: Any, unit: str) -> str:
    """``"1 batch"``, ``"4 batches"``."""
    plural = unit + ("es" if unit.endswith("ch") else "s")
    return f"{count} {unit if count == 1 else plural}"


def training_limit(trainer: "pl.Trainer", interval: str) -> Optional[TrainingLimit]:
    """The limit that ends this Trainer's fit first (see :func:`first_limit`); known once the training
    data is set up (``on_train_start``)."""
    batches = trainer.num_training_batches
    accumulate = trainer.accumulate_grad_batches
    automatic = trainer.lightning_module.automatic_optimization
    known = automatic and isinstance(batches, int) and batches > 0
    steps_per_epoch = math.ceil(batches / accumulate) if known else None
    limit = trainer.limit_train_batches
    every_batch = isinstance(limit, float) and limit == 1.0  # an int 1 means one batch
    limited = _counted(batches, "batch") + ("" if every_batch else f", limit_train_batches={limit}")
    return first_limit(trainer.max_epochs, trainer.max_steps, steps_per_epoch, limited, accumulate, interval)
