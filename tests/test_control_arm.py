"""The paper's LLR control in one flag (``prune=False``), through both doors: the same run as DSD until DSD prunes,
no zero weight ever, the learning-rate drop on DSD's step, a checkpoint without masks that resumes, and the run's
record (arm, seed, options) read back from the event files with TensorBoard's own reader."""

from __future__ import annotations

import glob

import pytest
import torch
from helpers import TARGETS, ConvLSTMNet, make_loader, make_trainer, seeded
from lightning.pytorch.loggers import TensorBoardLogger
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from torch import nn
from torch.optim.optimizer import register_optimizer_step_post_hook
from torch.utils.tensorboard import SummaryWriter

from lightning_dsd import DSD, DSDCallback, Phase
from lightning_dsd.rules.reporting import read_run_record
from lightning_dsd.rules.state import CheckpointStateError

ARMS = {"dsd": {}, "llr": {"prune": False}, "dense": {"prune": False, "lr_scale": 1.0}}
STEPS_PER_EPOCH = 4  # make_loader(): 64 samples, batches of 16


def _events(directory) -> EventAccumulator:
    accumulator = EventAccumulator(str(directory), size_guidance={"tensors": 0, "scalars": 0})
    accumulator.Reload()
    return accumulator


def _texts(accumulator: EventAccumulator, tag: str) -> list[tuple[int, str]]:
    return [(event.step, event.tensor_proto.string_val[0].decode()) for event in accumulator.Tensors(tag)]


class WeightWatcher:
    """The targeted weights as every training forward pass reads them (a forward pre-hook) and as every optimizer
    step leaves them (torch's global post-hook, after DSD's own), with the learning rate of that step."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self.forwards: list[dict[str, torch.Tensor]] = []
        self.steps: list[tuple[dict[str, torch.Tensor], float]] = []
        self._handles = [model.register_forward_pre_hook(self._before_forward),
                         register_optimizer_step_post_hook(self._after_step)]

    def _weights(self) -> dict[str, torch.Tensor]:
        params = dict(self.model.named_parameters())
        return {name: params[name].detach().clone() for name in TARGETS}

    def _before_forward(self, module, args) -> None:
        if module.training:
            self.forwards.append(self._weights())

    def _after_step(self, optimizer, args, kwargs) -> None:
        self.steps.append((self._weights(), optimizer.param_groups[0]["lr"]))

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()


def _fit(arm: str, tmp_path) -> WeightWatcher:
    with seeded(3):
        model = ConvLSTMNet()
    watcher = WeightWatcher(model)
    dsd = DSDCallback(0.5, 1, 1, 1, figure_layers=1 if arm == "llr" else 0, **ARMS[arm])
    logger = TensorBoardLogger(str(tmp_path), name="runs", version=f"{arm}_seed3")
    make_trainer([dsd], logger=logger, max_epochs=3).fit(model, make_loader())
    watcher.remove()
    return watcher


def _same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return all(torch.equal(a[name], b[name]) for name in TARGETS)


def _has_zero(weights: dict[str, torch.Tensor]) -> bool:
    return any(bool((w == 0).any()) for w in weights.values())


def test_dsd_and_its_controls_train_identically_until_they_differ_and_llr_never_zeroes_a_weight(tmp_path):
    runs = {arm: _fit(arm, tmp_path) for arm in ARMS}
    pruned_at = STEPS_PER_EPOCH  # DSD prunes before the first forward pass of epoch 1
    dropped_at = 2 * STEPS_PER_EPOCH  # ... and re-denses, the learning rate x0.1, before the first of epoch 2
    assert all(len(run.forwards) == len(run.steps) == 3 * STEPS_PER_EPOCH for run in runs.values())
    dsd, llr, dense = runs["dsd"], runs["llr"], runs["dense"]
    for i in range(pruned_at):
        assert _same(dsd.forwards[i], llr.forwards[i]) and _same(dsd.steps[i][0], llr.steps[i][0]), f"step {i}"
    assert _has_zero(dsd.forwards[pruned_at]) and not _same(dsd.forwards[pruned_at], llr.forwards[pruned_at])
    for i in range(dropped_at):  # no learning-rate drop yet: the control and the plain baseline are one run
        assert _same(llr.forwards[i], dense.forwards[i]) and _same(llr.steps[i][0], dense.steps[i][0]), f"step {i}"
    assert not _same(llr.steps[dropped_at][0], dense.steps[dropped_at][0])
    for arm in ("llr", "dense"):
        assert not any(_has_zero(w) for w in runs[arm].forwards), f"{arm}: a zero weight in a forward pass"
        assert not any(_has_zero(w) for w, _ in runs[arm].steps), f"{arm}: a zero weight after a step"
    lrs = {arm: [lr for _, lr in run.steps] for arm, run in runs.items()}
    assert lrs["dsd"] == lrs["llr"] == [0.1] * dropped_at + [pytest.approx(0.01)] * STEPS_PER_EPOCH
    assert lrs["dense"] == [0.1] * 3 * STEPS_PER_EPOCH

    for arm in ARMS:  # what each run keeps in its log, read back with TensorBoard's reader
        events = _events(tmp_path / "runs" / f"{arm}_seed3")
        ((step, text),) = _texts(events, "dsd/run/text_summary")
        record = read_run_record(text)
        assert step == 0 and record["arm"] == arm and record["seed"] == 3
        assert record["options"]["prune"] is (arm == "dsd") and record["options"]["sparsities"] == [0.5]
        assert record["schedule"] == {"interval": "epoch", "stages": [["dense", 0, 1, 0.0], ["sparse", 0, 1, 0.5],
                                                                      ["redense", 0, 1, 0.5]]}
        notes = _texts(events, "dsd/transitions/text_summary")
        assert [s for s, _ in notes] == [pruned_at, dropped_at], "the notes fall on DSD's steps in every arm"
        if arm == "dsd":
            assert "Pruned" in notes[0][1]
        else:
            assert "LLR control (prune=False): nothing is pruned" in notes[0][1]
            assert "no weight was pruned" in notes[1][1] and f"x{0.1 if arm == 'llr' else 1:g}" in notes[1][1]
        measured = [event.value for event in events.Scalars("dsd/sparsity")]
        assert (max(measured) == 0) is (arm != "dsd")
        dropped = [event.step for event in events.Scalars("dsd_lr/optimizer0_group0") if event.value < 0.05]
        assert (dropped[:1] == [dropped_at]) is (arm != "dense"), "the logged drop is on DSD's step"
    figures = glob.glob(str(tmp_path / "runs" / "llr_seed3" / "dsd_figures" / "*.png"))
    assert len(figures) == 1


def _loop(prune: bool, writer=None, seed: int = 0) -> tuple[DSD, nn.Module, torch.optim.Optimizer]:
    with seeded(seed):
        model = ConvLSTMNet()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    return DSD(model, optimizer, 0.5, 1, 2, 1, prune=prune, writer=writer), model, optimizer


def _train_epoch(model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
    for x, y in make_loader():
        optimizer.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        optimizer.step()


def test_the_llr_arm_of_a_plain_loop_checkpoints_without_masks_and_resumes_only_as_llr(tmp_path):
    writer = SummaryWriter(str(tmp_path / "llr"))
    llr, model, optimizer = _loop(prune=False, writer=writer, seed=5)
    _train_epoch(model, optimizer)
    llr.step()
    assert llr.phase is Phase.SPARSE and llr.masks == {}
    _train_epoch(model, optimizer)
    assert not any(bool((p == 0).any()) for n, p in model.named_parameters() if n in TARGETS)
    state = llr.state_dict()
    assert state["masks"] == {} and state["config"]["prune"] is False

    resumed, resumed_model, _ = _loop(prune=False)
    resumed_model.load_state_dict(model.state_dict())
    resumed.load_state_dict(state)
    assert resumed.phase is Phase.SPARSE and resumed.elapsed == 1 and resumed.masks == {}
    assert all(torch.equal(p, dict(model.named_parameters())[n]) for n, p in resumed_model.named_parameters())

    pruning, _, _ = _loop(prune=True)
    with pytest.raises(CheckpointStateError, match=r"`prune`: checkpoint False, this run True"):
        pruning.load_state_dict(state)
    with pytest.raises(CheckpointStateError, match=r"LLR control \(`prune=False`\), which prunes nothing, but"
                                                   r" holds masks"):
        resumed.load_state_dict({**state, "masks": _masks_of_a_dsd_run()})

    dsd_state = _dsd_state_in_sparse_phase()
    assert "prune" not in dsd_state["config"], "a DSD checkpoint is written as before the flag existed"
    again, _, _ = _loop(prune=True)
    again.load_state_dict(dsd_state)  # an older checkpoint, without `prune`, is a pruning run's
    assert again.phase is Phase.SPARSE and sorted(again.masks) == sorted(TARGETS)
    control, _, _ = _loop(prune=False)
    with pytest.raises(CheckpointStateError, match=r"`prune`: checkpoint True, this run False"):
        control.load_state_dict(dsd_state)

    for _ in range(3):
        llr.step()
    assert llr.finished
    writer.close()
    (record,) = [read_run_record(text) for _, text in _texts(_events(tmp_path / "llr"), "dsd/run/text_summary")]
    assert record["arm"] == "llr" and record["seed"] == 5 and record["options"]["lengths"] == [1, 2, 1]


def _dsd_state_in_sparse_phase() -> dict:
    dsd, model, optimizer = _loop(prune=True)
    _train_epoch(model, optimizer)
    dsd.step()
    return dsd.state_dict()


def _masks_of_a_dsd_run() -> dict:
    return _dsd_state_in_sparse_phase()["masks"]


def test_the_flag_is_checked_once_for_every_door_and_export_sparse_is_refused_without_pruning():
    with pytest.raises(TypeError, match=r"`prune` must be a bool. Found: 'no'"):
        DSDCallback(0.5, 1, 1, 1, prune="no")
    with pytest.raises(TypeError, match=r"`prune` must be a bool. Found: 0"):
        _loop(prune=0)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"`export_sparse='sparse'` saves the pruned model .* prunes nothing"):
        DSDCallback(0.5, 1, 1, 1, prune=False, export_sparse="sparse")
    assert [DSDCallback(0.5, 1, 1, 1, **options).options.arm for options in ARMS.values()] == list(ARMS)
