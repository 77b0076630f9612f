"""The schedule on its own: stages, when each is over, convergence, and its plain-data state."""

from __future__ import annotations

import math

import pytest

from lightning_dsd.rules.phases import ConvergenceTracker, Phase, Schedule, build_stages


def test_stages_run_d_s_d_then_s_d_per_further_sparsity():
    stages = build_stages(3, dense=3, sparse=2, redense=1)
    assert [(s.phase, s.cycle, s.length) for s in stages] == [
        (Phase.DENSE, 0, 3),
        (Phase.SPARSE, 0, 2), (Phase.REDENSE, 0, 1),
        (Phase.SPARSE, 1, 2), (Phase.REDENSE, 1, 1),
        (Phase.SPARSE, 2, 2), (Phase.REDENSE, 2, 1),
    ]


def test_a_fixed_schedule_advances_exactly_at_the_counted_lengths_and_never_leaves_the_last_stage():
    schedule = Schedule(build_stages(1, dense=2, sparse=3, redense=1))
    walked = []
    for now in range(10):
        while schedule.is_due(now):
            schedule.advance(now)
        walked.append(schedule.stage.phase.value)
    assert walked == ["dense"] * 2 + ["sparse"] * 3 + ["redense"] * 5
    assert schedule.is_last and schedule.is_over(6) and not schedule.is_over(5)
    assert schedule.end() == 6
    fresh = Schedule(build_stages(1, dense=2, sparse=3, redense=1))
    assert fresh.end() == 6
    assert [fresh.stage_at(t).phase.value for t in (0, 1, 2, 4, 5, 99)] == [
        "dense", "dense", "sparse", "sparse", "redense", "redense"]
    fresh.join(3)  # DSD joins a run at epoch 3: every phase counts from there
    assert fresh.end() == 9
    assert [fresh.stage_at(t).phase.value for t in (3, 4, 5, 7, 8)] == ["dense", "dense", "sparse", "sparse", "redense"]


def test_a_phase_of_length_none_ends_when_the_tracker_says_converged_and_the_tracker_restarts():
    schedule = Schedule(build_stages(1, dense=None, sparse=1, redense=1), ConvergenceTracker("min", 1, 0.0))
    assert schedule.end() is None
    for value in (1.0, 0.5):
        schedule.observe(value)
    assert not schedule.is_due(now=100)
    schedule.observe(0.6)  # no improvement for patience=1 check: converged
    assert schedule.is_due(now=3)
    schedule.advance(3)
    assert schedule.tracker.best == math.inf and schedule.tracker.wait == 0


@pytest.mark.parametrize("mode, values, converged_after", [
    ("min", (3.0, 2.0, 2.0, 2.5), 4),
    ("max", (1.0, 2.0, 1.5, 1.9), 4),
])
def test_the_tracker_follows_early_stopping_rule(mode, values, converged_after):
    tracker = ConvergenceTracker(mode, patience=2, min_delta=0.0)
    results = [tracker.update(v) for v in values]
    assert results.index(True) + 1 == converged_after


def test_min_delta_makes_small_improvements_count_as_none():
    tracker = ConvergenceTracker("min", patience=1, min_delta=0.1)
    assert [tracker.update(v) for v in (1.0, 0.95)] == [False, True]


def test_state_round_trips_as_plain_values():
    schedule = Schedule(build_stages(1, dense=None, sparse=2, redense=1), ConvergenceTracker("min", 2, 0.0))
    schedule.observe(1.0)
    schedule.advance(4)
    state = schedule.state_dict()
    assert state == {"index": 1, "started_at": 4, "converged": False, "tracker": {"best": math.inf, "wait": 0}}
    restored = Schedule(build_stages(1, dense=None, sparse=2, redense=1), ConvergenceTracker("min", 2, 0.0))
    restored.load_state_dict(state)
    assert restored.state_dict() == state and restored.stage.phase is Phase.SPARSE
