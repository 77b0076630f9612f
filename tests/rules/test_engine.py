"""The engine on its own, driven as a front door drives it: plain objects for the optimizers, schedulers and
sink, the clock passed in. Every rule of a DSD run is here; the doors' tests check the mapping onto it."""

from __future__ import annotations

from typing import Any, Optional

import pytest
import torch
from torch import nn

from lightning_dsd.rules.engine import DSDEngine
from lightning_dsd.rules.options import check_options
from lightning_dsd.rules.phases import Phase


class Training:
    """A front door's side of the engine: its optimizers, no scheduler, no reports; it records the exports."""

    def __init__(self, optimizers: list[torch.optim.Optimizer]) -> None:
        self.optimizers, self.schedulers, self.sink = optimizers, [], None
        self.exported: list[tuple[int, list[str]]] = []

    def sparse_phase_ending(self, cycle: int, targets: Any) -> None:
        self.exported.append((cycle, sorted(targets)))


def _engine(model: nn.Module, optimizer: torch.optim.Optimizer, *lengths: Optional[int], **options: Any):
    training = Training([optimizer])
    engine = DSDEngine(check_options(0.5, *lengths, log_scalars=False, log_histograms=False, figure_layers=0,
                                     **options), training, owner="Test")
    engine.bind(model)
    return engine, training


def test_transitions_prune_exactly_hand_the_targets_to_the_door_and_drop_the_learning_rate():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 2))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    engine, training = _engine(model, optimizer, 1, 1, 1)
    engine.advance_if_due(0)
    assert engine.phase is Phase.DENSE
    engine.advance_if_due(1)
    assert engine.phase is Phase.SPARSE and sorted(engine.masks) == ["0.weight", "2.weight"]
    assert [int((m == 0).sum()) for m in (model[0].weight, model[2].weight)] == [12, 6]
    engine.advance_if_due(2)
    assert engine.phase is Phase.REDENSE and engine.masks == {}
    assert training.exported == [(0, ["0.weight", "2.weight"])]
    assert optimizer.param_groups[0]["lr"] == pytest.approx(0.01)
    assert engine.is_finished(3) and not engine.is_finished(2)


def test_a_cycle_prunes_what_trains_and_is_owned_and_the_checkpoint_remembers_what_it_left_dense():
    model = nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 6), nn.ReLU(), nn.Linear(6, 2))
    model[2].requires_grad_(False)
    optimizer = torch.optim.SGD([*model[0].parameters(), *model[2].parameters()], lr=0.1)  # model[4]: no optimizer
    engine, _ = _engine(model, optimizer, 0, 2, 1)
    assert engine.pruned_now() == (["0.weight"], {"2.weight": "frozen", "4.weight": "no optimizer updates it"})
    engine.advance_if_due(0)
    state = engine.state_dict()
    assert sorted(state["masks"]) == ["0.weight"] and state["left_dense"] == {"2.weight": "frozen",
                                                                              "4.weight": "no optimizer updates it"}
    resumed, _ = _engine(model, optimizer, 0, 2, 1)
    resumed.load_state_dict(state)
    resumed.resume_sparse_phase()
    assert sorted(resumed.masks) == ["0.weight"]
    damaged = {**state, "left_dense": {}}  # a mask missing without being listed as left dense
    with pytest.raises(ValueError, match=r"`masks`: masks for \['0.weight'\], expected the targets"):
        _engine(model, optimizer, 0, 2, 1)[0].load_state_dict(damaged)


def test_a_refused_transition_leaves_the_schedule_where_the_call_found_it():
    model = nn.Sequential(nn.Linear(4, 4))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    engine, _ = _engine(model, optimizer, 1, 1, 1)
    before = engine.schedule.state_dict()
    with torch.no_grad():
        model[0].weight[0, 0] = float("inf")
    with pytest.raises(ValueError, match=r"Test cannot prune `0.weight`: 1 of its 16 weights are NaN or infinite"):
        engine.advance_if_due(1)
    assert engine.schedule.state_dict() == before and engine.masks == {}


def test_observe_takes_rank_zeros_value_and_says_whether_there_was_one():
    model = nn.Sequential(nn.Linear(4, 4))
    engine, _ = _engine(model, torch.optim.SGD(model.parameters(), lr=0.1), None, 1, 1, monitor="loss", patience=1)
    assert engine.schedule.waits_for_metric
    assert engine.observe(None) is False
    assert engine.observe(1.0) is True and engine.observe(2.0) is True
    assert engine.schedule.is_due(0), "no improvement for `patience` checks: the dense phase converged"


def test_the_checkpoint_config_records_each_cycles_sparsity_from_the_mask_plan():
    model = nn.Sequential(nn.Linear(8, 8))
    training = Training([torch.optim.SGD(model.parameters(), lr=0.1)])
    engine = DSDEngine(check_options((0.5, "2:4", 0.1), 3, 2, 1, log_scalars=False), training)
    engine.bind(model)
    assert engine.run_config().stages == [
        ["dense", 0, 3, 0.0],
        ["sparse", 0, 2, 0.5], ["redense", 0, 1, 0.5],
        ["sparse", 1, 2, "2:4"], ["redense", 1, 1, "2:4"],
        ["sparse", 2, 2, 0.1], ["redense", 2, 1, 0.1],
    ]
