"""Scaling the learning rate at re-dense so that no scheduler undoes it.

Every torch scheduler computes future learning rates linearly from a few learning-rate-valued
quantities: the param groups' ``lr``, ``initial_lr``, ``max_lr`` and ``min_lr`` (OneCycleLR), and the
scheduler's own ``base_lrs``, ``min_lrs`` (ReduceLROnPlateau), ``max_lrs`` (CyclicLR), ``eta_min``
(cosine schedules) and ``_last_lr``. Multiplying all of them by the same factor makes every later learning
rate exactly ``factor`` times what it would have been. Schedulers that wrap others (SequentialLR,
ChainedScheduler) are followed into their children. Anything else that keeps learning-rate state of its own
can be handed over as a scheduler that scales itself (:class:`ScalesItself`: a door wraps Lightning's
``BackboneFinetuning`` so).

timm's schedulers (subclasses of ``timm.scheduler.scheduler.Scheduler``, recognised by the class's name so that
timm stays optional) recompute every group's rate at each ``step(epoch)``/``step_update(num_updates)`` from
their own learning-rate-valued state: ``base_values`` (taken from the groups' ``initial_lr``), ``warmup_lr_init``,
``warmup_steps`` (the warm-up's increment per step), ``lr_min`` and, for ``PlateauLRScheduler``, the rates kept
to undo its noise (``restore_lr``) and the ``ReduceLROnPlateau`` it wraps (``lr_scheduler``). Every timm
schedule (cosine, tanh, poly, step, multistep, WSD, plateau; warm-up, cycles, k-decay, noise) is linear in
these, so they are scaled too; the times (``decay_t``, ``warmup_t``, ``t_initial``) and factors
(``decay_rate``, ``cycle_decay``, a group's layer-decay ``lr_scale``) are not learning rates and stay. A timm
scheduler of another group field (``param_group_field`` other than ``"lr"``) is left alone.

A scheduler of another kind may recompute the rate from state DSD does not know, and so undo the drop.
:class:`RateWatch` notices it: it watches the optimizers' first steps of re-dense and says so when a group's
rate goes back up towards where it was before the drop.

Examples:
    >>> import torch
    >>> optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    >>> scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=1, gamma=0.5)
    >>> scale_learning_rates([optimizer], [scheduler], 0.1)
    >>> optimizer.step(); scheduler.step(); optimizer.param_groups[0]["lr"]
    0.05
"""

from __future__ import annotations

import math
from functools import partial
from typing import Any, Callable, Iterable, Optional, Protocol, Sequence, runtime_checkable

from torch import Tensor
from torch.optim import Optimizer
from torch.optim.lr_scheduler import LRScheduler, ReduceLROnPlateau
from torch.utils.hooks import RemovableHandle

GROUP_LR_KEYS = ("lr", "initial_lr", "max_lr", "min_lr")
SCHEDULER_LR_ATTRIBUTES = (
    "base_lrs", "min_lrs", "max_lrs", "eta_min", "_last_lr"
)
#: The base class of timm's schedulers, by its full name (timm is not imported).
TIMM_SCHEDULER = "timm.scheduler.scheduler.Scheduler"
TIMM_LR_ATTRIBUTES = ("base_values", "warmup_lr_init", "warmup_steps", "lr_min", "restore_lr")


@runtime_checkable
class ScalesItself(Protocol):
    """A scheduler-like object that keeps learning-rate state of its own and multiplies it by ``factor`` when
    asked (re-dense), so that its later rates are ``factor`` times what they would have been.

    Examples:
        >>> class Warmup:
        ...     peak = 1.0
        ...     def scale_learning_rate(self, factor): self.peak *= factor
        >>> warmup = Warmup(); scale_learning_rates([], [warmup], 0.1); warmup.peak, is_known_scheduler(warmup)
        (0.1, True)
    """

    def scale_learning_rate(self, factor: float) -> None: ...


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


def unwrapped_scheduler(scheduler: Any) -> Any:
    """The scheduler behind a wrapper that holds it as ``.scheduler`` and steps it (accelerate's
    ``AcceleratedScheduler``): the one whose learning-rate state DSD scales.

    Examples:
        >>> import torch
        >>> optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
        >>> inner = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
        >>> class Wrapper:
        ...     def __init__(self, scheduler): self.scheduler = scheduler
        >>> unwrapped_scheduler(Wrapper(inner)) is inner, unwrapped_scheduler(inner) is inner
        (True, True)
    """
    while not _is_scheduler(scheduler) and (inner := getattr(scheduler, "scheduler", None)) is not None:
        if inner is scheduler:
            break
        scheduler = inner
    return scheduler


def _is_scheduler(scheduler: Any) -> bool:
    return isinstance(scheduler, (LRScheduler, ReduceLROnPlateau)) or is_timm_scheduler(scheduler)


def _scale_scheduler(scheduler: Any, factor: float, seen: set[int]) -> None:
    scheduler = unwrapped_scheduler(scheduler)
    if id(scheduler) in seen:
        return
    seen.add(id(scheduler))
    if isinstance(scheduler, ScalesItself):
        scheduler.scale_learning_rate(factor)
        return
    timm = is_timm_scheduler(scheduler)
    if timm and getattr(scheduler, "param_group_field", "lr") != "lr":
        return
    for attribute in TIMM_LR_ATTRIBUTES if timm else SCHEDULER_LR_ATTRIBUTES:
        if hasattr(scheduler, attribute):
            setattr(scheduler, attribute, _scaled(getattr(scheduler, attribute), factor))
    children = [scheduler.lr_scheduler] if timm and hasattr(scheduler, "lr_scheduler") else []
    for child in [*children, *getattr(scheduler, "_schedulers", ())]:
        _scale_scheduler(child, factor, seen)


def is_timm_scheduler(scheduler: Any) -> bool:
    """Whether ``scheduler`` is one of timm's (its class derives from :data:`TIMM_SCHEDULER`).

    Examples:
        >>> is_timm_scheduler(object())
        False
    """
    return any(f"{cls.__module__}.{cls.__qualname__}" == TIMM_SCHEDULER for cls in type(scheduler).__mro__)


def is_known_scheduler(scheduler: Any) -> bool:
    """Whether :func:`scale_learning_rates` knows every learning-rate-valued state of ``scheduler``: torch's
    schedulers, timm's and any that :class:`ScalesItself` (also behind a wrapper, see :func:`unwrapped_scheduler`).

    Examples:
        >>> import torch
        >>> optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
        >>> is_known_scheduler(torch.optim.lr_scheduler.StepLR(optimizer, 1)), is_known_scheduler(object())
        (True, False)
    """
    scheduler = unwrapped_scheduler(scheduler)
    return _is_scheduler(scheduler) or isinstance(scheduler, ScalesItself)


def current_learning_rates(optimizers: Iterable[Optimizer]) -> list[list[float]]:
    """The ``lr`` of every param group, as floats: one list per optimizer, one entry per group."""
    return [[float(group["lr"]) for group in optimizer.param_groups] for optimizer in optimizers]


class RateWatch:
    """After a re-dense drop: watch each optimizer's next steps for a rate put back by something DSD did not scale.

    ``before`` and ``after`` are :func:`current_learning_rates` on either side of the drop, ``factor`` the drop
    (``lr_scale``). A step pre-hook on each optimizer compares its groups' rates with ``after``; once a rate has
    changed (a scheduler stepped) it judges that step and removes itself. A group whose rate went back up more
    than half way to its old value, on a log scale (for ``factor=0.1``: by more than 3.2x), was put back:
    ``warn`` gets one message naming the schedulers DSD does not know (:func:`is_known_scheduler`), the group and
    its rates. A watch that has seen no change by the first step after :meth:`epoch_ended` stops too (an
    epoch's scheduler steps have run by then), or by step ``last_step`` of an optimizer when given (a step
    clock: the first step's scheduler has run by the second): it costs a few comparisons per step, and only
    then.

    Examples:
        >>> import torch
        >>> optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
        >>> watch = RateWatch([optimizer], [[1.0]], [[0.1]], 0.1, [], print)
        >>> optimizer.param_groups[0]["lr"] = 0.1; optimizer.step()  # the drop holds: nothing changed
        >>> optimizer.param_groups[0]["lr"] = 1.0; optimizer.step()  # doctest: +ELLIPSIS
        DSD's re-dense drop of the learning rate (x0.1) was undone at the first optimizer steps of re-dense: ...
        >>> watch.watching
        False
    """

    def __init__(
        self,
        optimizers: Sequence[Optimizer],
        before: list[list[float]],
        after: list[list[float]],
        factor: float,
        schedulers: Sequence[Any],
        warn: Callable[[str], None],
        last_step: Optional[int] = None,
    ) -> None:
        self.factor = factor
        self._before, self._after = before, after
        self._schedulers = list(schedulers)
        self._warn = warn
        self._epoch_ended = False
        self._last_step = last_step
        self._steps: dict[int, int] = {}
        self._handles: dict[int, RemovableHandle] = {}
        for index, optimizer in enumerate(optimizers):
            self._handles[index] = optimizer.register_step_pre_hook(partial(self._check, index))

    @property
    def watching(self) -> bool:
        return bool(self._handles)

    def epoch_ended(self) -> None:
        """An epoch ended: the next step of each optimizer is its last one watched."""
        self._epoch_ended = True

    def stop(self) -> None:
        for handle in self._handles.values():
            handle.remove()
        self._handles.clear()

    def _check(self, index: int, optimizer: Optimizer, args: Any, kwargs: Any) -> None:
        now = [float(group["lr"]) for group in optimizer.param_groups]
        after, before = self._after[index], self._before[index]
        self._steps[index] = step = self._steps.get(index, 0) + 1
        last = self._epoch_ended or (self._last_step is not None and step >= self._last_step)
        if now == after[: len(now)] and not last:
            return
        self._handles.pop(index).remove()
        explained = self._set_by_known_schedulers(optimizer)
        put_back = [(group, before[group], after[group], lr) for group, lr in enumerate(now)
                    if group < len(after) and group not in explained and _went_back(lr, before[group], after[group])]
        if put_back:
            self._warn(self._message(index, put_back))

    def _set_by_known_schedulers(self, optimizer: Optimizer) -> set[int]:
        """The groups of ``optimizer`` whose rate a scheduler DSD scaled set itself, so a rise there is that
        schedule's own (a warm restart, a warm-up starting in re-dense), already ``factor`` times what it would
        have been: every group when a timm scheduler drives it (it writes the rates it computes from the scaled
        values), else the groups whose rate equals a torch scheduler's last computed one (``_last_lr``). None
        while a scheduler DSD does not know is among those it was given."""
        schedulers = [unwrapped_scheduler(s) for s in self._schedulers]
        if not all(is_known_scheduler(s) for s in schedulers):
            return set()
        own = [s for s in schedulers if getattr(s, "optimizer", None) is optimizer]
        if any(is_timm_scheduler(s) for s in own):
            return set(range(len(optimizer.param_groups)))
        return {group for s in own for group, (lr, last) in enumerate(zip(
            [g["lr"] for g in optimizer.param_groups], getattr(s, "_last_lr", None) or [], strict=False)) if lr == last}

    def _message(self, index: int, put_back: list[tuple[int, float, float, float]]) -> str:
        groups = "; ".join(f"optimizer {index} group {group}: {was:.3g} before, set to"
                           f" {set_to:.3g}, now {lr:.3g}" for group, was, set_to, lr in put_back)
        unknown = [type(s).__name__ for s in self._schedulers if not is_known_scheduler(s)]
        if unknown:
            cause = (f"the scheduler(s) {', '.join(unknown)}, which DSD does not know, recomputed the rate from"
                     " learning-rate-valued state of their own that DSD did not scale")
        else:
            named = ", ".join(type(s).__name__ for s in self._schedulers) or "none"
            cause = (f"DSD scaled every scheduler it was given ({named}); something else set the rate: a scheduler"
                     " not handed to DSD, or code that sets `param_group['lr']`")
        return (
            f"DSD's re-dense drop of the learning rate (x{self.factor:g}) was undone at the first optimizer steps"
            f" of re-dense: {groups}. Probably {cause}. Training goes on at the restored rate, not DSD's. Hand"
            " torch's and timm's schedulers to DSD (the Trainer's `configure_optimizers`, `DSD(...,"
            " schedulers=...)`); for any other scheduler, multiply its learning-rate state by"
            f" {self.factor:g} at re-dense yourself, or use a torch or timm scheduler."
        )


def _went_back(lr: float, before: float, after: float) -> bool:
    """Whether ``lr`` went from ``after`` more than half way back to ``before`` on a log scale.

    Examples:
        >>> _went_back(0.0346, 0.0375, 0.00375), _went_back(0.0034, 0.0375, 0.00375), _went_back(0.0, 1.0, 0.1)
        (True, False, False)
    """
    if min(lr, before, after) <= 0 or before == after:
        return False
    return math.log(lr / after) / math.log(before / after) > 0.5
