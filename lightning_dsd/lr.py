"""Scaling the learning rate at re-dense so that no scheduler undoes it.

Every torch scheduler computes future learning rates linearly from a few learning-rate-valued
quantities: the param groups' ``lr``, ``initial_lr``, ``max_lr`` and ``min_lr`` (OneCycleLR), and the
scheduler's own ``base_lrs``, ``min_lrs`` (ReduceLROnPlateau), ``max_lrs`` (CyclicLR), ``eta_min``
(cosine schedules) and ``_last_lr``. Multiplying all of them by the same factor makes every later learning
rate exactly ``factor`` times what it would have been. Schedulers that wrap others (SequentialLR,
ChainedScheduler) are followed into their children. Lightning's ``BackboneFinetuning`` schedules the
backbone's param group itself, from its ``previous_backbone_lr`` (and ``backbone_initial_lr``, when given):
handed over as a scheduler, it is scaled the same way.

Examples:
    >>> import torch
    >>> optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    >>> scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=1, gamma=0.5)
    >>> scale_learning_rates([optimizer], [scheduler], 0.1)
    >>> optimizer.step(); scheduler.step(); optimizer.param_groups[0]["lr"]
    0.05
"""

from __future__ import annotations

from typing import Any, Iterable

from torch import Tensor
from torch.optim import Optimizer

GROUP_LR_KEYS = ("lr", "initial_lr", "max_lr", "min_lr")
SCHEDULER_LR_ATTRIBUTES = (
    "base_lrs", "min_lrs", "max_lrs", "eta_min", "_last_lr", "previous_backbone_lr", "backbone_initial_lr"
)


def _scaled(value: Any, factor: float) -> Any:
    if isinstance(value, Tensor):
        return value.mul_(factor)
    if isinstance(value, (list, tuple)):
        return type(value)(_scaled(v, factor) for v in value)
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return value * factor
    return value


def scale_learning_rates(optimizers: Iterable[Optimizer], schedulers: Iterable[Any], factor: float) -> None:
    """Multiply the learning rate of every param group, and every scheduler's idea of it, by ``factor``."""
    seen: set[int] = set()
    for optimizer in optimizers:
        for group in optimizer.param_groups:
            for key in GROUP_LR_KEYS:
                if key in group:
                    group[key] = _scaled(group[key], factor)
    for scheduler in schedulers:
        _scale_scheduler(scheduler, factor, seen)


def _scale_scheduler(scheduler: Any, factor: float, seen: set[int]) -> None:
    if id(scheduler) in seen:
        return
    seen.add(id(scheduler))
    for attribute in SCHEDULER_LR_ATTRIBUTES:
        if hasattr(scheduler, attribute):
            setattr(scheduler, attribute, _scaled(getattr(scheduler, attribute), factor))
    for child in getattr(scheduler, "_schedulers", ()):
        _scale_scheduler(child, factor, seen)


def current_learning_rates(optimizers: Iterable[Optimizer]) -> list[list[float]]:
    """The ``lr`` of every param group, as floats: one list per optimizer, one entry per group."""
    return [[float(group["lr"]) for group in optimizer.param_groups] for optimizer in optimizers]
