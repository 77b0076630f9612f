"""The DSD phase schedule: which phase runs, and when the current one is over.

Nothing here knows about Lightning. The schedule is a list of :class:`Stage` objects built once from the
user's arguments; a :class:`Schedule` walks through it, told the elapsed count (epochs or optimizer steps)
and the monitored metric by its caller. Its whole state is a handful of plain values, so resuming from a
checkpoint is a matter of :meth:`Schedule.state_dict` and :meth:`Schedule.load_state_dict`.

Examples:
    >>> schedule = Schedule(build_stages(cycles=2, dense=2, sparse=1, redense=1))
    >>> [f"{stage.phase.value}:{stage.cycle}" for stage in schedule.stages]
    ['dense:0', 'sparse:0', 'redense:0', 'sparse:1', 'redense:1']
    >>> schedule.is_due(now=1), schedule.is_due(now=2)
    (False, True)
    >>> schedule.advance(now=2).phase
    <Phase.SPARSE: 'sparse'>
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from enum import Enum
from typing import Any, Optional, Sequence, Union


class Phase(str, Enum):
    """The three DSD phases. The value is the plain string users see in logs and checkpoints.

    Examples:
        >>> Phase.SPARSE == "sparse"
        True
    """

    DENSE = "dense"
    SPARSE = "sparse"
    REDENSE = "redense"


class Moment(str, Enum):
    """The five moments of a DSD cycle that the paper's weight-distribution figure shows.

    Examples:
        >>> [moment.value for moment in Moment][:2]
        ['1_end_of_dense', '2_after_pruning']
    """

    END_OF_DENSE = "1_end_of_dense"
    AFTER_PRUNING = "2_after_pruning"
    END_OF_SPARSE = "3_end_of_sparse"
    START_OF_REDENSE = "4_start_of_redense"
    END_OF_REDENSE = "5_end_of_redense"


@dataclass(frozen=True)
class Stage:
    """One phase of one cycle: ``length`` epochs or steps, or ``None`` for "until the metric converges". (A
    cycle's sparsity is the mask plan's, :class:`~lightning_dsd.rules.plan.MaskPlan`.)"""

    phase: Phase
    cycle: int
    length: Optional[int]


def build_stages(
    cycles: int,
    dense: Optional[int],
    sparse: Union[Optional[int], Sequence[Optional[int]]],
    redense: Union[Optional[int], Sequence[Optional[int]]],
    final: Optional[int] = 0,
) -> tuple[Stage, ...]:
    """Lay out D S D (S D ...): one dense phase, then a sparse and a re-dense phase per cycle (one per sparsity),
    and, unless ``final`` is 0, a final sparse phase of that length (AC/DC's: the run ends sparse), numbered
    as cycle ``cycles``. ``sparse`` and ``redense`` are one length for every cycle or one per cycle (their count
    checked by :func:`~lightning_dsd.rules.options.check_options`).

    The re-dense phase of one cycle is the dense phase the next cycle prunes from, as in the paper's
    DeepSpeech 2 run (50% then 25%).

    Examples:
        >>> [s.phase.value for s in build_stages(1, dense=3, sparse=None, redense=3)]
        ['dense', 'sparse', 'redense']
        >>> [(s.phase.value, s.cycle, s.length) for s in build_stages(2, 2, (5, 5), 5, final=20)][-3:]
        [('sparse', 1, 5), ('redense', 1, 5), ('sparse', 2, 20)]
    """
    sparse_lengths = _per_cycle(sparse, cycles)
    redense_lengths = _per_cycle(redense, cycles)
    stages = [Stage(Phase.DENSE, 0, dense)]
    for cycle in range(cycles):
        stages.append(Stage(Phase.SPARSE, cycle, sparse_lengths[cycle]))
        stages.append(Stage(Phase.REDENSE, cycle, redense_lengths[cycle]))
    if final != 0:
        stages.append(Stage(Phase.SPARSE, cycles, final))
    return tuple(stages)


def _per_cycle(length: Union[Optional[int], Sequence[Optional[int]]], cycles: int) -> list[Optional[int]]:
    """One length per cycle (a sequence is one per cycle already: the options checked its count)."""
    return [length] * cycles if length is None or isinstance(length, int) else list(length)


class ConvergenceTracker:
    """EarlyStopping's notion of "no longer improving", restarted at every phase.

    A value improves on the best so far when it is better by more than ``min_delta`` in the direction of
    ``mode``. After ``patience`` checks in a row without improvement the metric has converged.

    Examples:
        >>> tracker = ConvergenceTracker(mode="min", patience=2, min_delta=0.0)
        >>> [tracker.update(v) for v in (1.0, 0.5, 0.6, 0.7)]
        [False, False, False, True]
    """

    def __init__(self, mode: str, patience: int, min_delta: float) -> None:
        self.mode = mode
        self.patience = patience
        self.min_delta = abs(min_delta)
        self.reset()

    def reset(self) -> None:
        self.best = math.inf if self.mode == "min" else -math.inf
        self.wait = 0

    def update(self, value: float) -> bool:
        """Record one check of the metric; return whether it has converged."""
        improved = value < self.best - self.min_delta if self.mode == "min" else value > self.best + self.min_delta
        if improved:
            self.best, self.wait = value, 0
        else:
            self.wait += 1
        return self.wait >= self.patience and not improved

    def state_dict(self) -> dict[str, Any]:
        return {"best": self.best, "wait": self.wait}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.best = float(state.get("best", self.best))
        self.wait = int(state.get("wait", self.wait))


class Schedule:
    """A cursor over the stages: where we are, since when, and whether the stage is over.

    ``now`` is whatever unit the stage lengths are counted in (completed epochs or optimizer steps); the
    caller passes it in, so the schedule itself holds no clock.
    """

    def __init__(self, stages: Sequence[Stage], tracker: Optional[ConvergenceTracker] = None) -> None:
        self.stages = tuple(stages)
        self.tracker = tracker
        self.index = 0
        self.started_at = 0
        self.converged = False

    @property
    def stage(self) -> Stage:
        return self.stages[self.index]

    @property
    def is_last(self) -> bool:
        return self.index == len(self.stages) - 1

    @property
    def in_final_sparse_phase(self) -> bool:
        """Whether the current stage is the final sparse phase (after the last re-dense), where the run ends
        sparse by design."""
        return self.is_last and self.index > 0 and self.stage.phase is Phase.SPARSE

    def is_due(self, now: int) -> bool:
        """Whether the current stage has run its course (the last stage is never left)."""
        return not self.is_last and self.is_over(now)

    @property
    def stage_waits_for_metric(self) -> bool:
        """Whether the current stage runs until the monitored metric converges (its length is ``None``; compare
        :attr:`~lightning_dsd.rules.options.DSDOptions.waits_for_metric`: whether some phase does)."""
        return self.stage.length is None

    def is_over(self, now: int) -> bool:
        length = self.stage.length
        return self.converged if length is None else now - self.started_at >= length

    def advance(self, now: int) -> Stage:
        """Move to the next stage, starting its count at ``now``; return it."""
        self.index += 1
        self.started_at = now
        self.converged = False
        if self.tracker is not None:
            self.tracker.reset()
        return self.stage

    def restart_at(self, now: int) -> None:
        """Count the current stage from ``now``: a loop took back the count the stage was entered at (a refused
        ``DSD.step``), and the stage, of length 0, is due again at ``now``."""
        self.started_at = now

    def observe(self, value: float) -> None:
        """Feed one check of the monitored metric to the current stage's convergence tracker."""
        if self.tracker is not None and self.tracker.update(value) and self.stage_waits_for_metric:
            self.converged = True

    def join(self, now: int) -> None:
        """Start the first stage at ``now`` instead of 0: DSD joins a run that has already trained (a resume from
        a checkpoint written without DSD), and its phase lengths count from there."""
        if self.index != 0:
            raise RuntimeError(f"the schedule can be joined only in its first stage, not in stage {self.index}")
        self.started_at = now

    def end(self) -> Optional[int]:
        """When (in epochs or steps, as ``now`` counts) the last stage will have run its course, from where the
        schedule stands; ``None`` when a stage still to finish waits for convergence.

        Examples:
            >>> schedule = Schedule(build_stages(1, dense=2, sparse=3, redense=1))
            >>> schedule.end(), schedule.advance(now=4).phase.value, schedule.end()
            (6, 'sparse', 8)
        """
        lengths = [stage.length for stage in self.stages[self.index:]]
        return None if None in lengths else self.started_at + sum(lengths)  # type: ignore[arg-type]

    def stage_at(self, now: int) -> Stage:
        """The stage a fixed-length schedule will be in at ``now`` (epochs or steps), from where it stands.

        Examples:
            >>> Schedule(build_stages(1, dense=2, sparse=3, redense=1)).stage_at(4).phase
            <Phase.SPARSE: 'sparse'>
        """
        end = self.started_at
        for stage in self.stages[self.index:]:
            end += stage.length or 0
            if now < end:
                return stage
        return self.stages[-1]

    def state_dict(self) -> dict[str, Any]:
        state: dict[str, Any] = {"index": self.index, "started_at": self.started_at, "converged": self.converged}
        if self.tracker is not None:
            state["tracker"] = self.tracker.state_dict()
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.index = int(state.get("index", 0))
        self.started_at = int(state.get("started_at", 0))
        self.converged = bool(state.get("converged", False))
        if self.tracker is not None and "tracker" in state:
            self.tracker.load_state_dict(state["tracker"])
