"""How far a ``Trainer`` will train, counted as DSD counts: in epochs, or in optimizer steps.

A ``Trainer`` stops at ``max_epochs`` or ``max_steps``, whichever comes first, and an epoch makes
``ceil(batches / accumulate_grad_batches)`` optimizer steps, its batches being those ``limit_train_batches``
leaves. :func:`training_limit` turns that into the one limit that stops training first, in the unit of
DSD's ``interval``, so a schedule that cannot fit is said before training starts, naming the argument.

Examples:
    >>> limit = TrainingLimit.of(max_epochs=10, max_steps=24, steps_per_epoch=8, batches="16 batches",
    ...                          accumulate=2, interval="epoch")
    >>> limit.stops_at, limit.description
    (3.0, 'max_steps=24, which is 3 epochs at 8 optimizer steps per epoch (16 batches, accumulate_grad_batches=2)')
    >>> limit.setting_for(6)
    'max_steps=48'
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Optional

import lightning.pytorch as pl
from lightning.pytorch.utilities import rank_zero_warn

from lightning_dsd.phases import Schedule


@dataclass(frozen=True)
class TrainingLimit:
    """The Trainer argument that ends training first, and when, in DSD's unit.

    ``stops_at`` is the epoch or step count at which training stops (possibly fractional: ``max_steps`` may
    fall inside an epoch); ``steps_per_epoch`` converts between the units where that is known.
    """

    argument: str
    value: int
    stops_at: float
    interval: str
    steps_per_epoch: Optional[int] = None
    per_epoch: str = ""

    @property
    def description(self) -> str:
        """The argument and, where it counts another unit than the schedule, what it amounts to."""
        text = f"{self.argument}={self.value}"
        if self.argument == "max_steps" and self.interval == "epoch":
            text += f", which is {self.stops_at:g} epochs at {self.per_epoch}"
        elif self.argument == "max_epochs" and self.interval == "step":
            text += f", which is {self.stops_at:g} steps at {self.per_epoch}"
        return text

    def setting_for(self, end: int) -> str:
        """The value of the limiting argument that lets a schedule ending at ``end`` run to its end."""
        if self.argument == "max_steps" and self.interval == "epoch":
            return f"max_steps={end * (self.steps_per_epoch or 1)}"
        if self.argument == "max_epochs" and self.interval == "step":
            return f"max_epochs={math.ceil(end / (self.steps_per_epoch or 1))}"
        return f"{self.argument}={end}"

    @classmethod
    def of(
        cls,
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
                candidates.append(cls("max_epochs", max_epochs, float(max_epochs), interval))
            elif steps_per_epoch is not None:
                steps = float(max_epochs * steps_per_epoch)
                candidates.append(cls("max_epochs", max_epochs, steps, interval, steps_per_epoch, per_epoch))
        if max_steps is not None and max_steps >= 0:
            if interval == "step":
                candidates.append(cls("max_steps", max_steps, float(max_steps), interval))
            elif steps_per_epoch:
                epochs = max_steps / steps_per_epoch
                candidates.append(cls("max_steps", max_steps, epochs, interval, steps_per_epoch, per_epoch))
        return min(candidates, key=lambda limit: limit.stops_at, default=None)


def warn_if_schedule_does_not_fit(trainer: "pl.Trainer", schedule: Schedule, interval: str) -> None:
    """Warn, naming the Trainer argument and the value that fits, when ``max_epochs`` or ``max_steps`` end
    training before ``schedule`` (from where it stands) has run every phase."""
    end = schedule.end()
    limit = None if end is None else training_limit(trainer, interval)
    if end is None or limit is None or limit.stops_at >= end:
        return
    origin = f", the current {schedule.stage.phase.value} phase from {interval} {schedule.started_at}" if (
        schedule.started_at > 0) else ""
    stops_in = schedule.stage_at(max(math.ceil(limit.stops_at) - 1, 0)).phase.value
    rank_zero_warn(
        f"The DSD schedule needs {end} {interval}s ({' + '.join(str(s.length) for s in schedule.stages)}{origin}),"
        f" but the Trainer has {limit.description}: training will stop in the {stops_in} phase. Set"
        f" {limit.setting_for(end)} to run every phase."
    )


def _counted(count: Any, unit: str) -> str:
    """``"1 batch"``, ``"4 batches"``."""
    plural = unit + ("es" if unit.endswith("ch") else "s")
    return f"{count} {unit if count == 1 else plural}"


def training_limit(trainer: "pl.Trainer", interval: str) -> Optional[TrainingLimit]:
    """The limit that ends this Trainer's fit first (see :class:`TrainingLimit`); known once the training
    data is set up (``on_train_start``)."""
    batches = trainer.num_training_batches
    accumulate = trainer.accumulate_grad_batches
    automatic = trainer.lightning_module.automatic_optimization
    known = automatic and isinstance(batches, int) and batches > 0
    steps_per_epoch = math.ceil(batches / accumulate) if known else None
    limit = trainer.limit_train_batches
    every_batch = isinstance(limit, float) and limit == 1.0  # an int 1 means one batch
    limited = _counted(batches, "batch") + ("" if every_batch else f", limit_train_batches={limit}")
    return TrainingLimit.of(trainer.max_epochs, trainer.max_steps, steps_per_epoch, limited, accumulate, interval)
