"""``DSD`` in a plain PyTorch loop (one process): the callback's guarantees, checked from the outside, what the
forward pass computes included; the same weights as a ``Trainer`` with ``DSDCallback``; resume through
``torch.save``; the bad inputs. Fabric under DDP and FSDP2 is in test_fabric.py."""

from __future__ import annotations

import glob
import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import ROOT, TARGETS, ConvLSTMNet, make_loader, make_trainer, seeded
from lightning.fabric import Fabric
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from torch import nn
from torch.utils.tensorboard import SummaryWriter

from lightning_dsd import DSD, DSDCallback, Phase
from lightning_dsd.rules.plan import MaskPlan
from lightning_dsd.rules.state import CheckpointStateError


def _model_and_optimizer(seed: int = 0):
    with seeded(seed):
        model = ConvLSTMNet()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=1, gamma=0.9)
    return model, optimizer, scheduler


def _train(model, optimizer, scheduler, dsd, epochs, probe=None, on_epoch_end=None, before_dsd_step=None):
    """The loop of the README: batches, scheduler, ``dsd.step()``; an eval forward between every step."""
    loader = make_loader()
    for epoch in range(epochs):
        for x, y in loader:
            optimizer.zero_grad()
            nn.functional.cross_entropy(model(x), y).backward()
            optimizer.step()
            if probe is not None:
                probe.after_step()
            with torch.no_grad():
                model.eval()
                model(x)  # an evaluation forward between steps
                model.train()
        scheduler.step()
        if before_dsd_step is not None:
            before_dsd_step(epoch)
        dsd.step()
        if on_epoch_end is not None:
            on_epoch_end(epoch)
        if dsd.finished:
            break


class Probe:
    """Reads every weight where the forward pass uses it (a forward pre-hook) and after every optimizer step."""

    def __init__(self, model: nn.Module, dsd: DSD) -> None:
        self.model, self.dsd = model, dsd
        self.forwards: list[tuple[str, bool]] = []
        self.steps: list[tuple[str, bool]] = []
        for module in (model.conv, model.lstm, model.head):
            module.register_forward_pre_hook(self._check)

    def _zeros_hold(self) -> bool:
        params = dict(self.model.named_parameters())
        return all(bool((params[name][~keep] == 0).all()) for name, keep in self.dsd.masks.items())

    def _check(self, module, args) -> None:
        self.forwards.append((self.dsd.phase.value, self._zeros_hold()))

    def after_step(self) -> None:
        self.steps.append((self.dsd.phase.value, self._zeros_hold()))


def test_a_plain_loop_prunes_exactly_keeps_zeros_in_every_step_and_forward_and_scales_the_learning_rate():
    model, optimizer, scheduler = _model_and_optimizer()
    dsd = DSD(model, optimizer, 0.5, dense_epochs=2, sparse_epochs=2, redense_epochs=2, schedulers=[scheduler])
    probe = Probe(model, dsd)
    seen = {}

    def on_epoch_end(epoch):
        if dsd.phase is Phase.SPARSE and "masks" not in seen:
            seen["masks"] = dsd.masks
            seen["weights"] = {n: p.detach().clone() for n, p in model.named_parameters()}
            state = optimizer.state
            params = dict(model.named_parameters())
            seen["state_zero"] = all(
                bool((state[params[n]]["momentum_buffer"][~keep] == 0).all()) for n, keep in dsd.masks.items()
            )
        seen.setdefault(dsd.phase, optimizer.param_groups[0]["lr"])

    dense_weights = {}

    def before_dsd_step(epoch):
        if epoch == 1:  # the end of the dense phase: what the masks are decided from
            assert dsd.phase is Phase.DENSE and dsd.masks == {}
            dense_weights.update({n: p.detach().clone() for n, p in model.named_parameters() if n in TARGETS})

    _train(model, optimizer, scheduler, dsd, 10, probe, on_epoch_end, before_dsd_step)

    assert dsd.finished and dsd.phase is Phase.REDENSE and dsd.elapsed == 6
    assert dsd.target_names == TARGETS
    expected = MaskPlan((0.5,)).decide(dense_weights, cycle=0)  # the magnitudes at the end of the dense phase
    assert all(torch.equal(seen["masks"][n], expected[n]) for n in TARGETS)
    assert all(int((~m).sum()) == round(0.5 * m.numel()) for m in seen["masks"].values())
    assert seen["state_zero"], "momentum of pruned entries is zero"
    assert [p for p, _ in probe.steps] == ["dense"] * 8 + ["sparse"] * 8 + ["redense"] * 8
    assert all(zeros for _, zeros in probe.steps), "pruned entries are zero after every optimizer step"
    sparse_forwards = [zeros for phase, zeros in probe.forwards if phase == "sparse"]
    assert len(sparse_forwards) == 3 * 2 * 8 and all(sparse_forwards), "and in every forward, eval ones included"
    # StepLR(gamma=0.9) per epoch; x0.1 at re-dense, kept by the scheduler.
    assert seen[Phase.SPARSE] == pytest.approx(0.1 * 0.9**2)  # pruned at the 2nd step(), after 2 scheduler steps
    assert seen[Phase.REDENSE] == pytest.approx(0.1 * 0.9**4 * 0.1)


def test_a_plain_loop_and_a_trainer_with_the_callback_end_with_the_same_weights():
    model, optimizer, scheduler = _model_and_optimizer()
    dsd = DSD(model, optimizer, (0.5, 0.3), 1, 1, 1, schedulers=[scheduler], scope="global")
    _train(model, optimizer, scheduler, dsd, 5)

    with seeded(0):
        lightning_model = ConvLSTMNet(
            optimizer=lambda params: torch.optim.SGD(params, lr=0.1, momentum=0.9),
            scheduler=lambda opt: torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.9),
        )
    callback = DSDCallback((0.5, 0.3), 1, 1, 1, scope="global")
    make_trainer([callback], max_epochs=5).fit(lightning_model, make_loader())

    for name, weight in model.named_parameters():
        assert torch.equal(weight, dict(lightning_model.named_parameters())[name]), name


def _save(path, model, optimizer, scheduler, dsd):
    torch.save({"model": model.state_dict(), "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict(), "dsd": dsd.state_dict()}, path)


def test_resume_mid_sparse_in_fresh_objects_is_bit_identical(tmp_path):
    model, optimizer, scheduler = _model_and_optimizer()
    dsd = DSD(model, optimizer, 0.5, 1, 2, 1, schedulers=[scheduler], redense_init="small_normal")
    _train(model, optimizer, scheduler, dsd, 2)
    assert dsd.phase is Phase.SPARSE
    _save(tmp_path / "mid_sparse.pt", model, optimizer, scheduler, dsd)
    saved_masks = dsd.masks
    _train(model, optimizer, scheduler, dsd, 10)

    fresh_model, fresh_optimizer, fresh_scheduler = _model_and_optimizer(seed=1)  # other weights
    resumed = DSD(fresh_model, fresh_optimizer, 0.5, 1, 2, 1, schedulers=[fresh_scheduler], redense_init="small_normal")
    checkpoint = torch.load(tmp_path / "mid_sparse.pt", weights_only=True)
    resumed.load_state_dict(checkpoint["dsd"])  # before the model: the order does not matter
    fresh_model.load_state_dict(checkpoint["model"])
    fresh_optimizer.load_state_dict(checkpoint["optimizer"])
    fresh_scheduler.load_state_dict(checkpoint["scheduler"])
    assert resumed.phase is Phase.SPARSE and resumed.elapsed == 2
    assert sorted(resumed.masks) == sorted(TARGETS)
    assert all(torch.equal(resumed.masks[n], m) for n, m in saved_masks.items())
    _train(fresh_model, fresh_optimizer, fresh_scheduler, resumed, 10)

    assert resumed.finished
    for (name, weight), resumed_weight in zip(model.named_parameters(), fresh_model.parameters(), strict=True):
        assert torch.equal(weight, resumed_weight), name


def test_dense_epochs_0_prunes_just_before_the_first_training_forward_so_a_checkpoint_loads_first(tmp_path):
    model, optimizer, scheduler = _model_and_optimizer()
    dsd = DSD(model, optimizer, 0.5, 0, 1, 1, schedulers=[scheduler])
    trained = {n: p.detach().clone() for n, p in model.named_parameters()}
    with torch.no_grad():
        model.eval()
        model(next(iter(make_loader()))[0])  # evaluating the pre-trained model first: still dense
        model.train()
    assert dsd.phase is Phase.DENSE and all(torch.equal(p, trained[n]) for n, p in model.named_parameters())
    probe = Probe(model, dsd)
    _train(model, optimizer, scheduler, dsd, 2, probe)
    assert [p for p, _ in probe.steps] == ["sparse"] * 4 + ["redense"] * 4
    assert all(zeros for _, zeros in probe.forwards + probe.steps)

    # A run resumed in its re-dense phase: building DSD(dense_epochs=0) must not prune the loaded weights.
    _save(tmp_path / "redense.pt", model, optimizer, scheduler, dsd)
    fresh_model, fresh_optimizer, fresh_scheduler = _model_and_optimizer()
    checkpoint = torch.load(tmp_path / "redense.pt", weights_only=True)
    fresh_model.load_state_dict(checkpoint["model"])
    resumed = DSD(fresh_model, fresh_optimizer, 0.5, 0, 1, 1, schedulers=[fresh_scheduler])
    resumed.load_state_dict(checkpoint["dsd"])
    fresh_model(next(iter(make_loader()))[0])
    assert resumed.phase is Phase.REDENSE
    assert all(torch.equal(p, model.state_dict()[n]) for n, p in fresh_model.named_parameters())


def test_a_phase_of_length_none_ends_when_the_metric_given_to_step_converges():
    model, optimizer, scheduler = _model_and_optimizer()
    dsd = DSD(model, optimizer, 0.5, None, 1, 1, patience=2)
    for loss in (1.0, 0.5, 0.6, 0.7):
        assert dsd.phase is Phase.DENSE
        dsd.step(torch.tensor(loss))
    assert dsd.phase is Phase.SPARSE, "two checks without improvement: converged"
    with pytest.raises(ValueError, match=r"runs until a metric converges.*`dsd.step\(val_loss\)`"):
        DSD(*_model_and_optimizer()[:2], 0.5, None, 1, 1).step()


def test_interval_step_counts_optimizer_steps_across_epochs():
    model, optimizer, _ = _model_and_optimizer()
    dsd = DSD(model, optimizer, 0.5, 3, 2, 1, interval="step")
    phases = []
    for _ in range(2):  # 4 steps an epoch: the phases follow steps, not epochs
        for x, y in make_loader():
            optimizer.zero_grad()
            nn.functional.cross_entropy(model(x), y).backward()
            optimizer.step()
            dsd.step()
            phases.append(dsd.phase.value)
    assert phases[:6] == ["dense", "dense", "sparse", "sparse", "redense", "redense"]
    assert dsd.finished and dsd.elapsed == 6


def test_step_after_the_schedule_finished_does_nothing_and_says_so_once():
    model, optimizer, _ = _model_and_optimizer()
    dsd = DSD(model, optimizer, 0.5, 1, 1, 1)
    for _ in range(3):
        dsd.step()
    assert dsd.finished
    with pytest.warns(UserWarning, match=r"finished its schedule after 3 steps.*does nothing") as warned:
        dsd.step()
        dsd.step()
    assert len([w for w in warned if "finished its schedule" in str(w.message)]) == 1
    assert dsd.elapsed == 3 and dsd.phase is Phase.REDENSE


def test_the_writer_gets_the_callbacks_histograms_scalars_and_transition_notes(tmp_path):
    model, optimizer, scheduler = _model_and_optimizer()
    writer = SummaryWriter(tmp_path / "run")
    dsd = DSD(model, optimizer, 0.5, 1, 1, 1, schedulers=[scheduler], writer=writer)
    _train(model, optimizer, scheduler, dsd, 3)
    writer.close()
    (events,) = glob.glob(str(tmp_path / "run" / "events.out.tfevents.*"))
    accumulator = EventAccumulator(events, size_guidance={"histograms": 0, "scalars": 0, "tensors": 0})
    accumulator.Reload()
    tags = accumulator.Tags()
    moments = ["1_end_of_dense", "2_after_pruning", "3_end_of_sparse", "4_start_of_redense", "5_end_of_redense"]
    for name in TARGETS:
        for moment in moments:
            assert f"dsd_weights/{name}/{moment}" in tags["histograms"]
            assert f"dsd_weights_nonzero/{name}/{moment}" in tags["histograms"]
    assert [e.step for e in accumulator.Histograms("dsd_weights/head.weight/2_after_pruning")] == [1]
    # one value per step (DSD.step()'s count): each epoch's end shares its step with the transitions after it
    assert [(e.step, e.value) for e in accumulator.Scalars("dsd/phase")] == [(1, 1.0), (2, 2.0), (3, 2.0)]
    assert accumulator.Scalars("dsd/sparsity")[0].value == pytest.approx(0.5, abs=1e-3)
    # logged at the end of the 3rd epoch: 3 StepLR steps, and x0.1 since re-dense
    assert accumulator.Scalars("dsd_lr/optimizer0_group0")[-1].value == pytest.approx(0.1 * 0.9**3 * 0.1)
    notes = [e.tensor_proto.string_val[0].decode() for e in accumulator.Tensors("dsd/transitions/text_summary")]
    assert notes[0].startswith("DSD cycle 0: sparse phase. Pruned") and notes[1].startswith("DSD cycle 0: re-dense")


@pytest.mark.parametrize(
    ("build", "message"),
    [
        (lambda m, o: DSD(m, o, 0.5, 1, 1, 1, include="norm.*"),
         r"DSD found nothing to prune with include=\[.norm\.\*.\]"),
        (lambda m, o: DSD(m, torch.optim.SGD(nn.Linear(2, 2).parameters(), lr=0.1), 0.5, 1, 1, 1),
         r"optimizer 0 \(SGD\), which updates none of the 4 weights"),
        (lambda m, o: DSD(m, [o, torch.optim.SGD(nn.Linear(2, 2).parameters(), lr=0.1)], 0.5, 1, 1, 1),
         r"optimizer 1 \(SGD\), which updates none"),
        (lambda m, o: DSD(m, o, 1.5, 1, 1, 1), r"`sparsity` must be a float in \(0, 1\).*Found: 1.5"),
        (lambda m, o: DSD(m, "adam", 0.5, 1, 1, 1), r"`optimizers` must be a torch Optimizer"),
    ],
)
def test_bad_input_gets_one_clear_error_before_anything_changes(build, message):
    model, optimizer, _ = _model_and_optimizer()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    with pytest.raises((ValueError, TypeError), match=message):
        build(model, optimizer)
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())


def test_a_state_from_another_configuration_or_damaged_is_refused_before_anything_changes(tmp_path):
    model, optimizer, scheduler = _model_and_optimizer()
    dsd = DSD(model, optimizer, 0.5, 1, 2, 1, schedulers=[scheduler])
    _train(model, optimizer, scheduler, dsd, 2)
    state = dsd.state_dict()
    torch.save(state, tmp_path / "dsd.pt")
    assert torch.load(tmp_path / "dsd.pt", weights_only=True)["elapsed"] == 2

    other_model, other_optimizer, _ = _model_and_optimizer()
    other = DSD(other_model, other_optimizer, 0.3, 1, 2, 1)
    with pytest.raises(CheckpointStateError, match=r"sparsity of cycle 0: checkpoint 0.5, this run 0.3"):
        other.load_state_dict(state)
    assert other.phase is Phase.DENSE and other.elapsed == 0 and other.masks == {}

    same = DSD(other_model, other_optimizer, 0.5, 1, 2, 1)
    damaged = {**state, "masks": {**state["masks"], "head.weight": {"bits": torch.zeros(1, dtype=torch.uint8),
                                                                     "shape": [3, 16]}}}
    with pytest.raises(CheckpointStateError, match=r"`masks\['head.weight'\].bits`"):
        same.load_state_dict(damaged)
    with pytest.raises(CheckpointStateError, match=r"`elapsed` entry is None"):
        same.load_state_dict({key: value for key, value in state.items() if key != "elapsed"})
    assert same.phase is Phase.DENSE and same.elapsed == 0 and same.masks == {}
    assert all(bool((p != 0).all()) for n, p in other_model.named_parameters() if n in TARGETS), "nothing pruned"


def test_fabrics_wrappers_are_seen_through_names_are_the_models_own_and_notes_reach_the_console(caplog):
    model, optimizer, _ = _model_and_optimizer()
    fabric = Fabric(accelerator="cpu", devices=1)
    fabric_model, fabric_optimizer = fabric.setup(model, optimizer)
    assert any(name.startswith("_forward_module.") for name, _ in fabric_model.named_parameters())
    caplog.set_level(logging.INFO, logger="lightning_dsd")
    dsd = DSD(fabric_model, fabric_optimizer, 0.5, 0, 1, 1)
    x, y = next(iter(make_loader()))
    fabric_optimizer.zero_grad()
    fabric.backward(nn.functional.cross_entropy(fabric_model(x), y))
    fabric_optimizer.step()
    assert dsd.target_names == TARGETS and sorted(dsd.masks) == sorted(TARGETS)
    assert all(bool((dict(model.named_parameters())[n][~keep] == 0).all()) for n, keep in dsd.masks.items())
    assert "DSD cycle 0: sparse phase. Pruned 840/1680 weights" in caplog.text


def _docs_example(first_line: str) -> str:
    page = (ROOT / "docs" / "loops.md").read_text()
    return next(block.split("```", 1)[0] for block in page.split("```python\n")[1:] if block.startswith(first_line))


def run_docs_example(tmp_path: Path, first_line: str) -> str:
    script = tmp_path / first_line.split()[1].rstrip(":")
    script.write_text(_docs_example(first_line))
    run = subprocess.run([sys.executable, str(script)], cwd=tmp_path, timeout=300, capture_output=True, text=True,
                         env={**os.environ, "PYTHONWARNINGS": "ignore"})
    output = run.stdout + run.stderr
    assert run.returncode == 0, output[-5000:]
    return output


def test_the_docs_plain_loop_runs_as_written(tmp_path):
    output = run_docs_example(tmp_path, "# plain_dsd.py")
    assert "DSD cycle 0: sparse phase. Pruned 704/1408 weights (50.0%) in 2 tensors" in output
    assert "finished after 12 epochs in the redense phase" in output
    saved = torch.load(tmp_path / "plain_dsd.pt", weights_only=True)
    assert saved["dsd"]["elapsed"] == 12


def test_the_readme_points_to_this_page_and_stays_a_door():
    readme = (ROOT / "README.md").read_text()
    assert len(readme) < 8000
    assert "dsd = DSD(model, optimizer, 0.5, 10, 10, 10)" in readme and "(docs/loops.md)" in readme


def test_steps_given_a_closure_compute_every_evaluation_sparse_lbfgs_and_sgd_included():
    for make_optimizer in (lambda p: torch.optim.LBFGS(p, lr=0.5, max_iter=4),
                           lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9)):
        with seeded(0):
            model = ConvLSTMNet()
        optimizer = make_optimizer(model.parameters())
        dsd = DSD(model, optimizer, 0.5, 1, 2, 1)
        probe = Probe(model, dsd)
        for _ in range(2):
            for x, y in make_loader():
                def closure(x=x, y=y, model=model, optimizer=optimizer):
                    optimizer.zero_grad()
                    loss = nn.functional.cross_entropy(model(x), y)
                    loss.backward()
                    return loss

                optimizer.step(closure)
                probe.after_step()
            dsd.step()
        evaluations = [zeros for phase, zeros in probe.forwards if phase == "sparse"]
        assert len(evaluations) >= 4 and all(evaluations), f"{type(optimizer).__name__}: a closure saw pruned weights"
        assert all(zeros for _, zeros in probe.steps)
        params = dict(model.named_parameters())
        for name, keep in dsd.masks.items():
            for value in optimizer.state[params[name]].values():
                if isinstance(value, torch.Tensor) and value.shape == keep.shape:
                    assert bool((value[~keep] == 0).all()), f"{type(optimizer).__name__} state of {name}"


def test_non_finite_weights_are_refused_at_the_transition_and_nothing_is_pruned():
    model, optimizer, _ = _model_and_optimizer()
    dsd = DSD(model, optimizer, 0.5, 1, 1, 1)
    with torch.no_grad():
        model.head.weight[0, :3] = float("nan")
    with pytest.raises(ValueError, match=r"cannot prune `head.weight`: 3 of its 48 weights are NaN or infinite"):
        dsd.step()
    assert dsd.phase is Phase.DENSE and dsd.masks == {} and int((model.conv.weight == 0).sum()) == 0
    assert dsd.elapsed == 0, "the refused call did not count"
    with torch.no_grad():
        model.head.weight[0, :3] = 1.0  # repaired: the same call now prunes, and the schedule is on time
    dsd.step()
    assert dsd.phase is Phase.SPARSE and dsd.elapsed == 1


def test_a_report_that_fails_is_warned_about_and_the_transition_still_happens():
    class FailsOnce:
        failed = False

        def add_histogram(self, *args, **kwargs):
            if not FailsOnce.failed:
                FailsOnce.failed = True
                raise OSError("disk full")

        def add_scalar(self, *args, **kwargs):
            pass

        def add_text(self, *args, **kwargs):
            pass

        def add_custom_scalars(self, *args, **kwargs):
            pass

    model, optimizer, _ = _model_and_optimizer()
    dsd = DSD(model, optimizer, 0.5, 1, 1, 1, writer=FailsOnce(), figure_layers=0)
    with pytest.warns(UserWarning, match=r"could not write a report \(OSError: disk full\); training and DSD go on"):
        dsd.step()
    assert dsd.phase is Phase.SPARSE and sorted(dsd.masks) == sorted(TARGETS)
    assert all(int((~keep).sum()) == round(0.5 * keep.numel()) for keep in dsd.masks.values())


def test_an_optimizer_given_twice_is_one_and_the_learning_rate_drops_once():
    model, optimizer, _ = _model_and_optimizer()
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda epoch: 1.0)
    dsd = DSD(model, [optimizer, optimizer], 0.5, 1, 1, 1, schedulers=[scheduler, scheduler])
    _train(model, optimizer, scheduler, dsd, 3)
    assert dsd.finished and optimizer.param_groups[0]["lr"] == pytest.approx(0.01)


def test_lazy_modules_and_an_elapsed_count_before_the_phase_are_refused_clearly():
    lazy = nn.Sequential(nn.LazyLinear(4), nn.ReLU(), nn.Linear(4, 2))
    with pytest.raises(ValueError, match=r"lazy modules.*Run one forward pass .* before `DSD\(...\)`"):
        DSD(lazy, torch.optim.SGD(lazy.parameters(), lr=0.1), 0.5, 1, 1, 1)
    model, optimizer, scheduler = _model_and_optimizer()
    dsd = DSD(model, optimizer, 0.5, 1, 2, 1, schedulers=scheduler)  # one scheduler, not in a list
    _train(model, optimizer, scheduler, dsd, 2)
    state = {**dsd.state_dict(), "elapsed": 0}
    fresh = DSD(*_model_and_optimizer()[:2], 0.5, 1, 2, 1)
    with pytest.raises(CheckpointStateError, match=r"`schedule.started_at` is epoch 1, after epoch 0, where the"):
        fresh.load_state_dict(state)
    assert (fresh.phase, fresh.elapsed, fresh.masks) == (Phase.DENSE, 0, {}), "refused before anything changed"


@pytest.mark.parametrize(
    "bad",
    [dict(sparsity="4:2"), dict(interval="batch"), dict(mode="up"), dict(patience=-1), dict(lr_scale=0),
     dict(include=[""]), dict(scope="model"), dict(scope="global", layer_sparsity={"head.*": 0.2}),
     dict(layer_sparsity={"head.*": 2}), dict(redense_init="uniform"), dict(seed=-1), dict(mask_storage="bits"),
     dict(dense_epochs=-2)],
)
def test_the_loop_and_the_callback_refuse_a_bad_option_with_the_same_words(bad):
    options = {"sparsity": 0.5, "dense_epochs": 1, "sparse_epochs": 1, "redense_epochs": 1, **bad}
    with pytest.raises(ValueError) as from_callback:
        DSDCallback(**options)
    model, optimizer, _ = _model_and_optimizer()
    with pytest.raises(ValueError) as from_loop:
        DSD(model, optimizer, **options)
    assert str(from_loop.value) == str(from_callback.value)


def test_a_step_refused_after_a_zero_length_redense_keeps_it_made_once_and_its_state_resumes():
    # Two cycles, the first re-dense of length 0: the step that ends cycle 0's sparse phase re-denses, then
    # prunes again. A weight gone infinite refuses the prune; the re-dense stays made (x0.1 once), a state saved
    # now loads, and the retry, after the weight is fixed, prunes at the count planned, without a second drop.
    model, optimizer, _ = _model_and_optimizer()
    dsd = DSD(model, optimizer, (0.5, 0.5), 1, 1, (0, 1), log_histograms=False, log_scalars=False, figure_layers=0)
    dsd.step()
    assert dsd.phase is Phase.SPARSE
    with torch.no_grad():
        model.head.weight[0, 0] = float("nan")
    with pytest.raises(ValueError, match="NaN or infinite"):
        dsd.step()
    assert (dsd.phase, dsd.cycle, dsd.elapsed, dsd.masks) == (Phase.REDENSE, 0, 1, {})
    assert optimizer.param_groups[0]["lr"] == pytest.approx(0.01)
    saved = dsd.state_dict()
    fresh_model, fresh_optimizer, _ = _model_and_optimizer()
    resumed = DSD(fresh_model, fresh_optimizer, (0.5, 0.5), 1, 1, (0, 1), log_histograms=False, log_scalars=False,
                  figure_layers=0)
    resumed.load_state_dict(saved)
    assert (resumed.phase, resumed.cycle, resumed.elapsed) == (Phase.REDENSE, 0, 1)
    with torch.no_grad():
        model.head.weight[0, 0] = 0.5
    dsd.step()
    assert (dsd.phase, dsd.cycle, dsd.elapsed, dsd._engine.schedule.started_at) == (Phase.SPARSE, 1, 2, 2)
    assert optimizer.param_groups[0]["lr"] == pytest.approx(0.01) and dsd.masks
