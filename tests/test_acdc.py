"""A run that ends sparse (AC/DC: ``final_sparse_epochs``, per-cycle lengths, ``redense_state="all"``), through
both doors: exact zeros to the last step and in every forward of the final phase, a fresh magnitude mask at the
last cycle's sparsity, the zeros in the final model, its last checkpoint and its sparse export, no "not
re-densed" warning, and resumes bit-identical in every phase, the final one included."""

from __future__ import annotations

import glob
import warnings

import torch
from helpers import TARGETS, ConvLSTMNet, StepRecorder, make_loader, make_trainer, resumable_model, seeded
from lightning.pytorch.callbacks import ModelCheckpoint
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from torch import nn
from torch.utils.tensorboard import SummaryWriter

from lightning_dsd import DSD, DSDCallback, Phase
from lightning_dsd.rules.plan import MaskPlan

# D 1 | S 1 (0.5) R 1 | S 2 (0.7) R 1 | final S 2 (0.7): 8 epochs.
ACDC = dict(sparsity=(0.5, 0.7), dense_epochs=1, sparse_epochs=(1, 2), redense_epochs=(1, 1),
            final_sparse_epochs=2, lr_scale=1.0, redense_state="all")
PHASES = ["dense", "sparse", "redense", "sparse", "sparse", "redense", "sparse", "sparse"]
CYCLES = [0, 0, 0, 1, 1, 1, 2, 2]


class ForwardProbe:
    """Reads the targeted weights where each forward uses them (a forward pre-hook), in training and eval."""

    def __init__(self, model: nn.Module, door) -> None:
        self.model, self.door = model, door
        self.forwards: list[tuple[str, bool, bool]] = []  # phase label, training?, zeros hold
        for module in (model.conv, model.lstm, model.head):
            module.register_forward_pre_hook(self._check)

    def _check(self, module, args) -> None:
        self.forwards.append((self.door.phase_label, module.training, _zeros_hold(self.model, self.door)))

    def final(self, training: bool) -> list[bool]:
        return [zeros for label, mode, zeros in self.forwards if label == "final sparse" and mode == training]


def _loop_run(epochs: int = 8, **overrides):
    with seeded(0):
        model = ConvLSTMNet()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    dsd = DSD(model, optimizer, **{**ACDC, **overrides})
    return model, optimizer, dsd


def _loop_train(model, optimizer, dsd, epochs, probe=None, on_epoch_end=None, before_step=None):
    loader = make_loader()
    for epoch in range(epochs):
        for x, y in loader:
            optimizer.zero_grad()
            nn.functional.cross_entropy(model(x), y).backward()
            optimizer.step()
            with torch.no_grad():
                model.eval()
                model(x)  # an evaluation forward between steps
                model.train()
            if probe is not None:
                probe.append((dsd.phase.value, dsd.cycle, _zeros_hold(model, dsd)))
        if before_step is not None:
            before_step(epoch)
        dsd.step()
        if on_epoch_end is not None:
            on_epoch_end(epoch)
        if dsd.finished:
            break


def _zeros_hold(model: nn.Module, door) -> bool:
    """Every pruned entry is zero; a sparse phase without masks holds no zeros (never counted as holding them)."""
    params, masks = dict(model.named_parameters()), door.masks
    if door.phase is Phase.SPARSE and not masks:
        return False
    return all(bool((params[name][~keep] == 0).all()) for name, keep in masks.items())


def test_a_plain_loop_with_per_cycle_lengths_ends_sparse_with_a_fresh_mask_and_restarted_adam_state():
    model, optimizer, dsd = _loop_run()
    forwards = ForwardProbe(model, dsd)
    steps: list[tuple[str, int, bool]] = []
    before_final: dict[str, torch.Tensor] = {}
    seen: dict[str, object] = {}

    def before_step(epoch):
        if epoch == 5:  # the end of the last re-dense: what the final masks are decided from
            before_final.update({n: p.detach().clone() for n, p in model.named_parameters() if n in TARGETS})

    def on_epoch_end(epoch):
        params = dict(model.named_parameters())
        if epoch == 1:  # re-dense of cycle 0 has just begun: the targets' Adam state restarts, the rest's is kept
            seen["targets_state"] = [dict(optimizer.state[params[n]]) for n in TARGETS]
            seen["bias_step"] = float(optimizer.state[params["head.bias"]]["step"])
        if epoch == 2:  # one re-dense epoch (4 steps) later: Adam's step count restarted with the moments
            seen["target_step"] = float(optimizer.state[params["head.weight"]]["step"])
        seen.setdefault(f"lr{epoch}", optimizer.param_groups[0]["lr"])

    _loop_train(model, optimizer, dsd, 20, steps, on_epoch_end, before_step)

    assert dsd.finished and dsd.elapsed == 8 and dsd.phase is Phase.SPARSE and dsd.cycle == 2 and dsd.in_last_phase
    assert [(p, c) for p, c, _ in steps] == [(p, c) for p, c in zip(PHASES, CYCLES, strict=True) for _ in range(4)]
    assert all(zeros for _, _, zeros in steps), "pruned entries are zero after every step, the last one included"
    assert len(forwards.final(True)) == len(forwards.final(False)) == 2 * 4 * 3
    assert all(forwards.final(True) + forwards.final(False)), "zeros in every forward of the final phase"
    expected = MaskPlan((0.7,)).decide(before_final, cycle=0)  # fresh, from the magnitudes after the last re-dense
    assert all(torch.equal(dsd.masks[n], expected[n]) for n in TARGETS)
    state = model.state_dict()
    for name in TARGETS:
        assert int((state[name] == 0).sum()) >= round(0.7 * state[name].numel()), name
        assert bool((state[name][~dsd.masks[name]] == 0).all()), name
    assert dsd.layer_sparsities["head.weight"] == [0.5, 0.7, 0.7]
    assert seen["targets_state"] == [{}] * len(TARGETS) and seen["bias_step"] == 8.0
    assert seen["target_step"] == 4.0
    assert {seen[f"lr{e}"] for e in range(8)} == {1e-2}, "lr_scale=1.0: the learning rate never changes"


def test_redense_state_pruned_keeps_the_step_count_and_the_kept_moments():
    model, optimizer, dsd = _loop_run(redense_state="pruned", final_sparse_epochs=0, sparse_epochs=1,
                                      redense_epochs=1, sparsity=0.5)
    params = dict(model.named_parameters())
    _loop_train(model, optimizer, dsd, 2)  # dense, sparse: re-dense begins now
    state = optimizer.state[params["head.weight"]]
    assert dsd.phase is Phase.REDENSE and float(state["step"]) == 8.0
    pruned = params["head.weight"].detach() == 0
    assert bool((state["exp_avg"][pruned] == 0).all()) and bool((state["exp_avg"][~pruned] != 0).any())


def test_a_plain_loop_resumes_bit_identical_in_the_final_sparse_phase(tmp_path):
    model, optimizer, dsd = _loop_run()
    _loop_train(model, optimizer, dsd, 7)
    assert dsd.phase_label == "final sparse" and not dsd.finished
    torch.save({"model": model.state_dict(), "optimizer": optimizer.state_dict(), "dsd": dsd.state_dict()},
               tmp_path / "final.pt")
    saved_masks = dsd.masks
    _loop_train(model, optimizer, dsd, 20)

    fresh_model, fresh_optimizer, resumed = _loop_run()
    checkpoint = torch.load(tmp_path / "final.pt", weights_only=True)
    assert checkpoint["dsd"]["config"]["stages"][-1] == ["sparse", 2, 2, 0.7]
    fresh_model.load_state_dict(checkpoint["model"])
    fresh_optimizer.load_state_dict(checkpoint["optimizer"])
    resumed.load_state_dict(checkpoint["dsd"])
    assert resumed.phase_label == "final sparse" and all(torch.equal(resumed.masks[n], saved_masks[n]) for n in TARGETS)
    _loop_train(fresh_model, fresh_optimizer, resumed, 20)
    assert resumed.finished
    for (name, weight), other in zip(model.state_dict().items(), fresh_model.state_dict().values(), strict=True):
        assert torch.equal(weight, other), name


def test_a_trainer_run_ends_sparse_in_its_model_last_checkpoint_and_export_without_the_left_sparse_warning(
    tmp_path,
):
    dsd = DSDCallback(**ACDC, export_sparse="sparse", log_histograms=False, figure_layers=0)
    recorder = StepRecorder(dsd)
    model = resumable_model()
    probe = ForwardProbe(model, dsd)
    checkpoints = ModelCheckpoint(dirpath=tmp_path, save_last=True, save_top_k=-1, every_n_epochs=1,
                                  filename="{epoch}")
    trainer = make_trainer([dsd, checkpoints, recorder], max_epochs=20, enable_checkpointing=True,
                           default_root_dir=tmp_path, limit_val_batches=1)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer.fit(model, make_loader(), make_loader(seed=1))
    assert not [w for w in caught if "not re-densed" in str(w.message)]
    assert trainer.current_epoch == 8, "stop_at_end ends the run with its final sparse phase"
    assert [(p, c) for p, c, _ in recorder.steps] == [(p, c) for p, c in zip(PHASES, CYCLES, strict=True)
                                                      for _ in range(4)]
    assert all(zeros for _, _, zeros in recorder.steps)
    assert dsd.in_last_phase and dsd.phase_label == "final sparse"
    assert all(probe.final(True)) and len(probe.final(True)) == 2 * 4 * 3
    assert all(probe.final(False)) and len(probe.final(False)) == 2 * 3, "the validation forwards too"

    masks = recorder.masks_seen[2]
    assert masks.keys() == set(TARGETS) and all(torch.equal(dsd.masks[n], masks[n]) for n in TARGETS)
    last = torch.load(tmp_path / "last.ckpt", weights_only=True)
    [export] = [e for e in dsd.exported_sparse_models if e["cycle"] == 2]
    exported = torch.load(export["checkpoint"], weights_only=True)
    sparse_tensors = torch.load(export["sparse_state_dict"], weights_only=True)
    assert last["callbacks"]["DSDCallback"]["config"]["stages"][-1] == ["sparse", 2, 2, 0.7]
    for name in TARGETS:
        for weights in (model.state_dict(), last["state_dict"], exported["state_dict"]):
            assert bool((weights[name][~masks[name]] == 0).all()), name
            assert torch.equal(weights[name], model.state_dict()[name]), "nothing reparametrized: the same tensor"
        assert torch.equal(sparse_tensors[name].to_dense(), model.state_dict()[name]), name
    assert "weight_orig" not in str(list(last["state_dict"]))
    assert [e["cycle"] for e in dsd.exported_sparse_models] == [0, 1, 2]


def test_a_trainer_run_that_ends_sparse_resumes_bit_identical_in_every_phase(tmp_path):
    options = {**ACDC, "log_histograms": False, "figure_layers": 0}
    checkpoints = ModelCheckpoint(dirpath=tmp_path, save_top_k=-1, every_n_epochs=1, filename="{epoch}")
    uninterrupted = resumable_model()
    make_trainer([DSDCallback(**options), checkpoints], max_epochs=20, enable_checkpointing=True).fit(
        uninterrupted, make_loader())

    for epoch in (0, 2, 4, 6):  # checkpoints of the dense, re-dense, second sparse and final sparse phases
        resumed_dsd = DSDCallback(**options)
        recorder = StepRecorder(resumed_dsd)
        resumed = resumable_model()
        make_trainer([resumed_dsd, recorder], max_epochs=20).fit(resumed, make_loader(),
                                                                 ckpt_path=tmp_path / f"epoch={epoch}.ckpt")
        assert resumed_dsd.phase_label == "final sparse" and all(zeros for _, _, zeros in recorder.steps)
        assert [(p, c) for p, c, _ in recorder.steps][0] == (PHASES[epoch + 1], CYCLES[epoch + 1])
        for (name, a), b in zip(uninterrupted.state_dict().items(), resumed.state_dict().values(), strict=True):
            assert torch.equal(a, b), f"{name} differs after resuming from epoch {epoch}"


def test_the_final_sparse_phase_has_its_histograms_figure_and_notes(tmp_path):
    writer = SummaryWriter(tmp_path / "run")
    model, optimizer, dsd = _loop_run(writer=writer, figure_layers=1, sparsity=0.5, sparse_epochs=1,
                                      redense_epochs=1, final_sparse_epochs=1, dense_epochs=1)
    _loop_train(model, optimizer, dsd, 20)
    writer.close()
    assert dsd.finished and dsd.elapsed == 4
    (events,) = glob.glob(str(tmp_path / "run" / "events.out.tfevents.*"))
    accumulator = EventAccumulator(events, size_guidance={"histograms": 0, "tensors": 0})
    accumulator.Reload()
    # cycle 0 at steps 1 and 3 (its sparse phase ends when step() is called the 2nd time); the final one, at the end
    assert [e.step for e in accumulator.Histograms("dsd_weights/head.weight/2_after_pruning")] == [1, 3]
    assert [e.step for e in accumulator.Histograms("dsd_weights/head.weight/3_end_of_sparse")] == [2, 4]
    notes = [e.tensor_proto.string_val[0].decode() for e in accumulator.Tensors("dsd/transitions/text_summary")]
    assert notes[2].startswith("DSD cycle 1: final sparse phase. Pruned") and "to the end of training" in notes[2]
    assert notes[3].startswith("DSD cycle 1: training ended in the final sparse phase, as planned")
    assert len(glob.glob(str(tmp_path / "run" / "dsd_figures" / "cycle1_*.png"))) == 1
