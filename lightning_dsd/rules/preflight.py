"""Checks made before anything trains, in every door: lazy modules are shaped or refused (DSD needs the shapes
of the weights it prunes), and a training limit that ends before the schedule does is warned about.

Examples:
    >>> limit = TrainingLimit("max_epochs", 2, 2, "epoch", "epoch")
    >>> limit.description, limit.setting_for(3)
    ('max_epochs=2', 'max_epochs=3')
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Optional

import torch
from torch import nn

from lightning_dsd.rules.log import warn
from lightning_dsd.rules.phases import Schedule
from lightning_dsd.rules.selection import uninitialized_parameters


def shape_lazy_modules(model: nn.Module, example: Any, owner: str, remedy: str) -> None:
    """Shape lazy modules (``nn.LazyLinear``, ...) with one forward pass of ``example`` (on the model's device),
    in evaluation mode without gradients, so no BatchNorm statistic or dropout draw is spent on it; with no
    example, refuse as :func:`refuse_lazy_modules` does."""
    if not uninitialized_parameters(model):
        return
    if example is None:
        refuse_lazy_modules(model, owner, remedy)
    modes = {module: module.training for module in model.modules()}
    model.eval()
    try:
        with torch.no_grad():
            if isinstance(example, (list, tuple)):
                model(*example)
            elif isinstance(example, dict):
                model(**example)
            else:
                model(example)
    finally:
        for module, training in modes.items():
            module.training = training


def refuse_lazy_modules(model: nn.Module, owner: str, remedy: str) -> None:
    """Refuse a model whose lazy modules (``nn.LazyLinear``, ...) no forward pass has shaped yet: DSD needs
    the shapes of the weights it prunes. ``remedy`` says what to do in the door's own terms."""
    lazy = uninitialized_parameters(model)
    if lazy:
        raise ValueError(
            f"{owner} needs the shapes of the weights it prunes, but {lazy} belong to lazy modules that no forward"
            f" pass has shaped yet. Run one forward pass (e.g. `model(example_batch)`) {remedy}."
        )


@dataclass(frozen=True)
class TrainingLimit:
    """The training argument that ends training first, as the user gave it, and when, in DSD's unit.

    ``argument`` counts ``unit`` (``"epoch"`` or ``"step"``: ``max_epochs``, ``num_train_epochs``, ``max_steps``);
    ``stops_at`` is the epoch or step count, in ``interval`` units, at which training stops (fractional when it
    stops inside an epoch: ``max_steps`` within an epoch, or ``num_train_epochs=2.5``); ``steps_per_epoch`` and
    ``per_epoch`` (what it is made of, in words) convert between the units where that is known.

    Examples:
        >>> limit = TrainingLimit("num_train_epochs", 2.5, 5.0, "step", "epoch", 2, "2 optimizer steps per epoch")
        >>> limit.description, limit.setting_for(6)
        ('num_train_epochs=2.5, which is 5 steps at 2 optimizer steps per epoch', 'num_train_epochs=3')
    """

    argument: str
    value: float
    stops_at: float
    interval: str
    unit: str
    steps_per_epoch: Optional[int] = None
    per_epoch: str = ""

    @property
    def description(self) -> str:
        """The argument as given and, where it counts another unit than the schedule, what it amounts to."""
        text = f"{self.argument}={_number(self.value)}"
        if self.unit != self.interval:
            text += f", which is {self.stops_at:g} {self.interval}s at {self.per_epoch}"
        return text

    def setting_for(self, end: int) -> str:
        """The value of the limiting argument that lets a schedule ending at ``end`` run to its end."""
        if self.unit == "step" and self.interval == "epoch":
            return f"{self.argument}={end * (self.steps_per_epoch or 1)}"
        if self.unit == "epoch" and self.interval == "step":
            return f"{self.argument}={math.ceil(end / (self.steps_per_epoch or 1))}"
        return f"{self.argument}={end}"


def warn_if_schedule_does_not_fit(schedule: Schedule, limit: Optional[TrainingLimit]) -> None:
    """Before training: warn, naming the limiting argument as the user gave it and the value that fits, when
    ``limit`` ends training before ``schedule`` (from where it stands: the current phase's start is said when
    DSD joined or resumed a run) has run every phase, and when a fractional epoch cuts the last one short.

    Examples:
        >>> import warnings
        >>> from lightning_dsd.rules.phases import build_stages
        >>> schedule = Schedule(build_stages(1, dense=1, sparse=1, redense=1))
        >>> with warnings.catch_warnings(record=True) as caught:
        ...     warnings.simplefilter("always")
        ...     warn_if_schedule_does_not_fit(schedule, TrainingLimit("num_train_epochs", 2.5, 2.5, "epoch", "epoch"))
        >>> print(caught[0].message)
        The DSD schedule needs 3 epochs (1 + 1 + 1), but the Trainer has num_train_epochs=2.5: training will stop \
in the redense phase (epoch 3 of 3 runs only 0.5 of its optimizer steps). Set num_train_epochs=3 to run every phase.
    """
    end = schedule.end()
    if end is None or limit is None or limit.stops_at >= end:
        return
    interval = limit.interval
    origin = f", the current {schedule.stage.phase.value} phase from {interval} {schedule.started_at}" if (
        schedule.started_at > 0) else ""
    stops_in = schedule.stage_at(max(math.ceil(limit.stops_at) - 1, 0)).phase.value
    whole = math.floor(limit.stops_at)
    cut = "" if limit.stops_at == whole else (
        f" ({interval} {whole + 1} of {end} runs only {limit.stops_at - whole:.2g} of its optimizer steps)")
    warn(
        f"The DSD schedule needs {end} {interval}s ({' + '.join(str(s.length) for s in schedule.stages)}{origin}),"
        f" but the Trainer has {limit.description}: training will stop in the {stops_in} phase{cut}. Set"
        f" {limit.setting_for(end)} to run every phase."
    )


def _number(value: float) -> str:
    """``3`` for 3 or 3.0, ``2.5`` for 2.5: a count as the user wrote it."""
    return str(int(value)) if float(value).is_integer() else f"{value:g}"
