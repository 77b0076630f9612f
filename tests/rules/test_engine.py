"""The engine on its own, driven as a front door drives it: plain objects for the optimizers, schedulers and
sink, the clock passed in. Every rule of a DSD run is here; the doors' tests check the mapping onto it."""

from __future__ import annotations

from typing import Any, Optional

import pytest
import torch
from torch import nn

from lightning_dsd.rules.engine import DoorTerms, DSDEngine, ReturnedCheckpoint
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
                                     **options), training, DoorTerms(name="Test"))
    engine.bind(model)
    return engine, training


def _started(model: nn.Module, optimizer: torch.optim.Optimizer, *lengths: Optional[int], **options: Any):
    engine, training = _engine(model, optimizer, *lengths, **options)
    engine.start(0, run=None)
    return engine, training


def test_transitions_prune_exactly_hand_the_targets_to_the_door_and_drop_the_learning_rate():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 2))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    engine, training = _started(model, optimizer, 1, 1, 1)
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
    engine, _ = _started(model, optimizer, 0, 2, 1)
    assert engine.pruned_now() == (["0.weight"], {"2.weight": "frozen", "4.weight": "no optimizer updates it"})
    engine.advance_if_due(0)
    state = engine.state_dict()
    assert sorted(state["masks"]) == ["0.weight"] and state["left_dense"] == {"2.weight": "frozen",
                                                                              "4.weight": "no optimizer updates it"}
    resumed, _ = _engine(model, optimizer, 0, 2, 1)
    resumed.load_state_dict(state)
    resumed.start(0, run=None)  # checks the restored state and enforces its masks
    assert sorted(resumed.masks) == ["0.weight"]
    damaged = {**state, "left_dense": {}}  # a mask missing without being listed as left dense
    with pytest.raises(ValueError, match=r"`masks`: masks for \['0.weight'\], expected the targets"):
        _engine(model, optimizer, 0, 2, 1)[0].load_state_dict(damaged)


def test_a_refused_transition_leaves_the_schedule_where_the_call_found_it():
    model = nn.Sequential(nn.Linear(4, 4))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    engine, _ = _started(model, optimizer, 1, 1, 1)
    before = engine.schedule.state_dict()
    with torch.no_grad():
        model[0].weight[0, 0] = float("inf")
    with pytest.raises(ValueError, match=r"Test cannot prune `0.weight`: 1 of its 16 weights are NaN or infinite"):
        engine.advance_if_due(1)
    assert engine.schedule.state_dict() == before and engine.masks == {}


def test_observe_takes_rank_zeros_value_and_says_whether_there_was_one():
    model = nn.Sequential(nn.Linear(4, 4))
    engine, _ = _engine(model, torch.optim.SGD(model.parameters(), lr=0.1), None, 1, 1, monitor="loss", patience=1)
    assert engine.schedule.stage_waits_for_metric
    assert engine.observe(None) is False
    assert engine.observe(1.0) is True and engine.observe(2.0) is True
    assert engine.schedule.is_due(0), "no improvement for `patience` checks: the dense phase converged"


def test_the_checkpoint_config_records_each_cycles_sparsity_from_the_mask_plan():
    model = nn.Sequential(nn.Linear(8, 8))
    training = Training([torch.optim.SGD(model.parameters(), lr=0.1)])
    engine = DSDEngine(check_options((0.5, "2:4", 0.1), 3, 2, 1, log_scalars=False), training)
    engine.bind(model)
    assert engine.state_dict()["config"]["stages"] == [
        ["dense", 0, 3, 0.0],
        ["sparse", 0, 2, 0.5], ["redense", 0, 1, 0.5],
        ["sparse", 1, 2, "2:4"], ["redense", 1, 1, "2:4"],
        ["sparse", 2, 2, 0.1], ["redense", 2, 1, 0.1],
    ]


def test_a_call_whose_second_transition_is_refused_keeps_the_first_made_once():
    # A zero-length re-dense followed by the next cycle's prune, refused (a weight went infinite): the re-dense
    # stays made (constraint lifted, learning rate x0.1 once), the schedule says so, and the retry prunes
    # without scaling the learning rate again.
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 4))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    training = Training([optimizer])
    engine = DSDEngine(check_options((0.5, 0.5), 1, 1, (0, 1), log_scalars=False, log_histograms=False,
                                     figure_layers=0), training, DoorTerms(name="Test"))
    engine.bind(model)
    engine.start(0, run=None)
    engine.advance_if_due(1)
    assert engine.phase is Phase.SPARSE and engine.cycle == 0
    with torch.no_grad():
        model[0].weight[0, 0] = float("inf")
    with pytest.raises(ValueError, match="NaN or infinite"):
        engine.advance_if_due(2)
    assert (engine.phase, engine.cycle, engine.masks) == (Phase.REDENSE, 0, {})
    assert optimizer.param_groups[0]["lr"] == pytest.approx(0.01)
    with torch.no_grad():
        model[0].weight[0, 0] = 1.0
    engine.advance_if_due(2)
    assert engine.phase is Phase.SPARSE and engine.cycle == 1 and int((model[0].weight == 0).sum()) == 8
    assert optimizer.param_groups[0]["lr"] == pytest.approx(0.01)


def test_start_decides_whether_a_second_training_continues_the_schedule():
    model = nn.Sequential(nn.Linear(4, 4))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    first, other = object(), object()
    engine, _ = _engine(model, optimizer, 1, 2, 1)
    engine.start(0, run=first)
    engine.advance_if_due(1)
    engine.finish(2)  # stopped mid-sparse
    with pytest.raises(RuntimeError, match=r"stopped in the sparse phase of cycle 0 .*another Trainer"):
        engine.start(2, run=other)
    with pytest.raises(RuntimeError, match=r"already ran in an earlier `fit` up to epoch 2 .* from epoch 0"):
        engine.start(0, run=first)
    engine.start(2, run=first)  # the same training goes on where it stopped
    engine.advance_if_due(3)
    engine.advance_if_due(4)
    engine.finish(4)
    with pytest.raises(RuntimeError, match=r"already ran its whole schedule"):
        engine.start(4, run=first)
    saved = engine.state_dict()
    resumed, _ = _engine(model, optimizer, 1, 2, 1)
    resumed.start(3, run=other)  # fresh, at epoch 3 without DSD state: it joins the run there
    assert resumed.schedule.started_at == 3 and resumed.phase is Phase.DENSE
    restored, _ = _engine(model, optimizer, 1, 2, 1)
    restored.load_state_dict(saved)
    with pytest.raises(ValueError, match=r"`schedule.started_at` is epoch 3, after epoch 2"):
        restored.start(2, run=other)


def test_stop_now_is_said_once_and_finish_describes_the_model_returned(caplog):
    caplog.set_level("INFO", logger="lightning_dsd")
    model = nn.Sequential(nn.Linear(4, 4))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    engine, _ = _started(model, optimizer, 1, 1, 1)
    engine.advance_if_due(1)
    assert not engine.stop_now(2)
    engine.advance_if_due(2)
    assert engine.stop_now(3) and engine.stop_now(3) and not engine.stop_now(3, stopping=True)
    assert sum("finished its last phase" in r.message for r in caplog.records) == 1
    engine.finish(3)
    assert "Test: the Trainer returns the model of the last step (epoch 3), in the redense phase of cycle 0; its 1" \
        " targeted tensors hold 8 exact zeros of 16 weights." in caplog.text  # restarted at zero, untrained
    with pytest.warns(UserWarning, match=r"returns its best checkpoint \(a reload\), ckpt-1, saved at epoch 1 in the"
                      r" dense phase; .* not DSD's result, a model of its last phase: do this\."):
        engine.finish(3, ReturnedCheckpoint("ckpt-1", "at epoch 1 in the dense phase", False, "a reload", "do this"))
