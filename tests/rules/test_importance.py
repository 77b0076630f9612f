"""``importance``: the paper's own criterion (OBD's second-order saliency from a window of squared gradients) and
a user's callable, in every door, with the exactness, resumes and reports of magnitude pruning."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import warnings

import pytest
import torch
from helpers import ROOT, ConvLSTMNet, StepRecorder, make_loader, make_trainer, resumable_dsd, resumable_model, seeded
from hf_helpers import Tokens, arguments, gpt2
from lightning.pytorch import LightningModule
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from torch import nn
from torch.utils.data import DataLoader, TensorDataset
from torch.utils.tensorboard import SummaryWriter
from transformers import Trainer

from lightning_dsd import DSD, DSDCallback, Phase
from lightning_dsd.huggingface import DSDTrainerCallback
from lightning_dsd.rules.importance import GradientWindow
from lightning_dsd.rules.masks import NMPattern
from lightning_dsd.rules.plan import MaskPlan
from lightning_dsd.rules.reporting import RUN_RECORD_TAG, read_run_record


def permuted_scores(name: str, weight: torch.Tensor, grad_sq: torch.Tensor) -> torch.Tensor:
    """A criterion that ignores both: a fixed permutation of 0..N-1 per tensor, so the expected mask is known."""
    assert grad_sq.shape == weight.shape and grad_sq.dtype == torch.float32 and bool((grad_sq >= 0).all())
    generator = torch.Generator().manual_seed(len(name))
    return torch.randperm(weight.numel(), generator=generator).view(weight.shape).float()


def expected_by_permutation(shapes: dict[str, torch.Size], sparsity: float) -> dict[str, torch.Tensor]:
    """The slow, obvious reference: the round(s * N) lowest permuted scores go."""
    keep = {}
    for name, shape in shapes.items():
        scores = permuted_scores(name, torch.zeros(shape), torch.zeros(shape)).flatten()
        mask = torch.ones(scores.numel(), dtype=torch.bool)
        mask[torch.sort(scores).indices[: round(sparsity * scores.numel())]] = False
        keep[name] = mask.view(shape)
    return keep


# ---------------------------------------------------------------------------------------------- the math


def test_scores_prune_exactly_their_lowest_per_tensor_globally_and_per_nm_group_with_any_sign():
    with seeded(0):
        scores = {"a": torch.randn(6, 8), "b": torch.randn(5, 4)}
    scores["a"][0, :4] = scores["a"][0, 4]  # ties: the first go
    weights = {name: torch.zeros_like(s) for name, s in scores.items()}
    for name, keep in MaskPlan((0.4,)).decide(weights, 0, scores).items():
        flat = scores[name].flatten()
        reference = torch.ones_like(flat, dtype=torch.bool)
        reference[torch.sort(flat, stable=True).indices[: round(0.4 * flat.numel())]] = False
        assert torch.equal(keep, reference.view(keep.shape)), name
    keep = MaskPlan((0.4,), scope="global").decide(weights, 0, scores)
    flat = torch.cat([s.flatten() for s in scores.values()])
    reference = torch.ones_like(flat, dtype=torch.bool)
    reference[torch.sort(flat, stable=True).indices[: round(0.4 * flat.numel())]] = False
    assert torch.equal(torch.cat([k.flatten() for k in keep.values()]), reference), "one threshold, signs kept"
    nm = MaskPlan((NMPattern(2, 4),)).decide(weights, 0, scores)
    for name, keep in nm.items():
        groups = scores[name].reshape(-1, 4)
        reference = torch.ones_like(groups, dtype=torch.bool).scatter_(
            1, torch.sort(groups, dim=1, stable=True).indices[:, :2], False)
        assert torch.equal(keep.reshape(-1, 4), reference), f"{name}: the 2 highest of every 4, ties by position"


def test_the_window_counts_one_accumulated_gradient_once_per_optimizer_step_and_no_skipped_step():
    weight = nn.Parameter(torch.ones(3))
    optimizer = torch.optim.SGD([weight], lr=0.0)
    window = GradientWindow({"w": weight})
    window.attach([optimizer])
    for micro_batch in (torch.tensor([1.0, 2.0, 0.0]), torch.tensor([1.0, 0.0, 0.0])):  # accumulated
        (weight * micro_batch).sum().backward()
    optimizer.step()
    optimizer.zero_grad()
    scaler = torch.amp.GradScaler("cpu")
    scaler.scale((weight * torch.tensor([float("inf"), 0.0, 0.0])).sum()).backward()
    scaler.step(optimizer)  # inf found: the step is skipped, and so is its gradient
    assert window.counts == {"w": 1}
    assert torch.equal(window.mean_squared("w"), torch.tensor([4.0, 4.0, 0.0]))
    window.detach()
    assert not optimizer._optimizer_step_post_hooks


# ---------------------------------------------------------------------------------------------- the criterion


class DeadInputs(LightningModule):
    """8 inputs, of which the first 4 are always zero. Their weights start large (3.0), the others small: the
    criteria disagree. Magnitude keeps the dead weights because they are large; OBD sees their zero gradient."""

    def __init__(self) -> None:
        super().__init__()
        with seeded(1):
            self.hidden = nn.Linear(8, 6)
            self.out = nn.Linear(6, 2)
        with torch.no_grad():
            self.hidden.weight.mul_(0.3)
            self.hidden.weight[:, :4] = 3.0
        self.forwards: list[tuple[str, torch.Tensor]] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(torch.tanh(self.hidden(x)))

    def training_step(self, batch, batch_idx):
        x, y = batch
        return nn.functional.cross_entropy(self(x), y)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.05)


def dead_inputs_loader() -> DataLoader:
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(64, 8, generator=generator)
    x[:, :4] = 0.0
    return DataLoader(TensorDataset(x, (x[:, 4] > 0).long()), batch_size=16)


@pytest.mark.parametrize("importance", ["obd", "magnitude"])
def test_obd_prunes_exactly_the_large_weights_of_inputs_that_are_always_zero_and_magnitude_keeps_them(importance):
    model = DeadInputs()
    seen: list[tuple[str, torch.Tensor]] = []
    model.hidden.register_forward_pre_hook(lambda module, args: seen.append((dsd.phase.value, module.weight.clone())))
    dsd = DSDCallback(0.5, 4, 4, 2, interval="step", include=["hidden.weight"], importance=importance,
                      importance_steps=3, log_histograms=False)
    make_trainer([dsd], max_epochs=3).fit(model, dead_inputs_loader())
    sparse = [weight for phase, weight in seen if phase == "sparse"]
    assert len(sparse) == 4, "every forward of the sparse phase is read"
    dead, live = (slice(None), slice(0, 4)), (slice(None), slice(4, 8))
    for weight in sparse:
        pruned, kept = (dead, live) if importance == "obd" else (live, dead)
        assert bool((weight[pruned] == 0).all()), f"{importance} prunes these"
        assert bool((weight[kept] != 0).all()), f"{importance} keeps these"
    assert bool((model.hidden.weight[:, :4].abs() == 3.0).all()) is (importance == "magnitude")


# ---------------------------------------------------------------------------------------------- every door


@pytest.mark.slow
def test_a_callables_scores_decide_the_mask_exactly_through_dsdcallback():
    dsd = DSDCallback(0.5, 1, 1, 1, importance=permuted_scores, log_histograms=False)
    with seeded():
        model = ConvLSTMNet()
    recorder = StepRecorder(dsd)
    make_trainer([dsd, recorder], max_epochs=3).fit(model, make_loader())
    shapes = {name: p.shape for name, p in model.named_parameters() if name in recorder.masks_seen[0]}
    for name, keep in expected_by_permutation(shapes, 0.5).items():
        assert torch.equal(recorder.masks_seen[0][name], keep), name
    assert all(zeros for _, _, zeros in recorder.steps)


def test_a_callables_scores_decide_the_mask_exactly_through_dsd_in_a_plain_loop():
    with seeded(0):
        model = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 2))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    dsd = DSD(model, optimizer, 0.25, 3, 2, 1, interval="step", importance=permuted_scores, importance_steps=2)
    hooks = []
    for step in range(6):
        x = torch.randn(4, 6)
        optimizer.zero_grad()
        model(x).square().mean().backward()
        hooks.append((len(optimizer._optimizer_step_post_hooks), len(optimizer._optimizer_step_pre_hooks)))
        optimizer.step()
        dsd.step()
        if step == 2:
            shapes = {name: model.get_parameter(name).shape for name in dsd.target_names}
            for name, keep in expected_by_permutation(shapes, 0.25).items():
                assert torch.equal(dsd.masks[name], keep), name
    # (post, pre) hooks: the window's post-hook in steps 1-2 only; in the sparse steps 3-4 the constraint's two;
    # in re-dense's first step, the pre-hook that watches for a learning rate put back (gone by its second)
    assert hooks == [(0, 0), (1, 0), (1, 0), (1, 1), (1, 1), (0, 1)]


def test_a_callables_scores_decide_the_mask_exactly_through_the_transformers_trainer(tmp_path):
    model = gpt2()
    dsd = DSDTrainerCallback(0.5, 2, 2, 1, interval="step", importance=permuted_scores, log_histograms=False)
    trainer = Trainer(model=model, args=arguments(tmp_path, max_steps=4), train_dataset=Tokens(), callbacks=[dsd])
    trainer.train()
    assert dsd.phase is Phase.SPARSE
    seen = dsd.masks
    shapes = {name: model.get_parameter(name).shape for name in dsd.target_names}
    for name, keep in expected_by_permutation(shapes, 0.5).items():
        assert torch.equal(seen[name], keep), name
        assert bool((model.get_parameter(name)[~keep] == 0).all())


# ---------------------------------------------------------------------------------------------- cost, resumes


class HookCount(Callback):
    """The number of step post-hooks of the optimizer at each batch start, with the phase."""

    def __init__(self) -> None:
        self.counts: list[tuple[int, int]] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):  # after DSD's (it comes first)
        self.counts.append((trainer.global_step, len(trainer.optimizers[0]._optimizer_step_post_hooks)))


def obd_run(tmp_path=None, ckpt_path=None, **overrides):
    """D S D over 8 + 8 + 4 optimizer steps (4 a epoch), OBD's window the last 6 steps of the dense phase: the
    checkpoint at the end of epoch 0 (step 4) is in the window, the one at the end of epoch 2 mid-sparse."""
    dsd = resumable_dsd(dense_epochs=8, sparse_epochs=8, redense_epochs=4, interval="step", importance="obd",
                        importance_steps=6, log_histograms=False, **overrides)
    callbacks = [dsd, HookCount()]
    if tmp_path is not None:
        callbacks.append(ModelCheckpoint(dirpath=tmp_path, save_top_k=-1, every_n_epochs=1, filename="{epoch}"))
    model = resumable_model()
    make_trainer(callbacks, max_epochs=5, enable_checkpointing=tmp_path is not None).fit(
        model, make_loader(), ckpt_path=ckpt_path)
    return dsd, model, callbacks[1].counts


@pytest.mark.slow
def test_resumes_mid_window_and_mid_sparse_are_bit_identical_and_the_hook_lives_only_in_the_window(tmp_path):
    dsd, uninterrupted, counts = obd_run(tmp_path)
    base = counts[0][1]
    assert [(step, n - base) for step, n in counts[:9]] == [(0, 0), (1, 0), (2, 1), (3, 1), (4, 1), (5, 1), (6, 1),
                                                           (7, 1), (8, 1)], "hooked from step 2 until pruning"
    assert all(n == counts[8][1] for _, n in counts[8:16]), "sparse: the constraint's hook only"

    in_window = torch.load(tmp_path / "epoch=0.ckpt", weights_only=True)["callbacks"]["DSDCallback"]
    window = in_window["importance_window"]
    assert window["counts"] == {name: 2 for name in window["counts"]}, "steps 2 and 3 counted"
    targeted = {n: p for n, p in uninterrupted.named_parameters() if n in window["sums"]}
    assert all(window["sums"][n].dtype == torch.float32 and window["sums"][n].shape == p.shape
               for n, p in targeted.items()), "4 bytes per weight"
    assert in_window["config"]["importance"] == "obd"
    mid_sparse = torch.load(tmp_path / "epoch=2.ckpt", weights_only=True)["callbacks"]["DSDCallback"]
    assert "importance_window" not in mid_sparse, "only while the window is open"

    for checkpoint in ("epoch=0.ckpt", "epoch=2.ckpt"):
        _, resumed, _ = obd_run(ckpt_path=tmp_path / checkpoint)
        for (name, a), b in zip(uninterrupted.state_dict().items(), resumed.state_dict().values(), strict=True):
            assert torch.equal(a, b), f"{name} differs after resuming from {checkpoint}"


@pytest.mark.slow
def test_a_resume_that_changes_the_criterion_is_refused_and_an_older_checkpoint_reads_as_magnitude(tmp_path):
    dsd = resumable_dsd(log_histograms=False)
    checkpoints = ModelCheckpoint(dirpath=tmp_path, save_top_k=-1, every_n_epochs=1, filename="{epoch}")
    make_trainer([dsd, checkpoints], max_epochs=3, enable_checkpointing=True).fit(resumable_model(), make_loader())
    state = torch.load(tmp_path / "epoch=2.ckpt", weights_only=True)["callbacks"]["DSDCallback"]
    assert "importance" not in state["config"], "a magnitude run writes what earlier versions wrote"
    with pytest.raises(ValueError, match=r"`importance`: checkpoint 'magnitude', this run 'obd'"):
        make_trainer([resumable_dsd(importance="obd")], max_epochs=4).fit(
            resumable_model(), make_loader(), ckpt_path=tmp_path / "epoch=2.ckpt")


# ---------------------------------------------------------------------------------------------- refusals, reports


@pytest.mark.parametrize(("options", "message"), [
    (dict(importance="fisher"), r"`importance` must be 'magnitude', 'obd' or a callable .* Found: 'fisher'"),
    (dict(importance="obd", importance_steps=0), r"`importance_steps` must be an int >= 1. Found: 0"),
    (dict(importance="obd", dense_epochs=None, monitor="val_loss"),
     r"the dense phase of cycle 0 runs until `monitor` converges"),
    (dict(importance="obd", dense_epochs=0), r"the dense phase of cycle 0 has length 0, so the window holds no step"),
    (dict(importance=lambda weight, grad_sq: weight), r"`importance` is called as f\(name, weight, grad_sq\), but"
                                                    r" .*<lambda>\(weight, grad_sq\) cannot take those three"),
])
def test_criteria_that_cannot_work_are_refused_at_construction(options, message):
    with pytest.raises(ValueError, match=message):
        DSDCallback(**{**dict(sparsity=0.5, dense_epochs=1, sparse_epochs=1, redense_epochs=1), **options})


def test_a_callable_of_the_wrong_shape_is_refused_at_the_transition_and_nothing_is_pruned():
    with seeded(0):
        model = nn.Sequential(nn.Linear(4, 4))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    dsd = DSD(model, optimizer, 0.5, 1, 1, 1, importance=lambda name, weight, grad_sq: weight.flatten())
    model(torch.randn(2, 4)).sum().backward()
    optimizer.step()
    before = model[0].weight.detach().clone()
    with pytest.raises(ValueError, match=r"returned a Tensor of shape \(16,\) for `0.weight`, expected a tensor of"
                                         r" the weight's shape \(4, 4\).*Nothing was pruned"):
        dsd.step()
    assert dsd.phase is Phase.DENSE and torch.equal(model[0].weight, before)


def _logged_run_record(log_dir) -> dict:
    """The run record as ``compare`` reads it: the ``dsd/run`` text in the TensorBoard log."""
    events = EventAccumulator(str(log_dir), size_guidance={"tensors": 0})
    events.Reload()
    text = events.Tensors(f"{RUN_RECORD_TAG}/text_summary")[0].tensor_proto.string_val[0].decode()
    return read_run_record(text)


def test_the_note_and_the_run_record_name_the_criterion(caplog, tmp_path):
    with seeded(0):
        model = nn.Sequential(nn.Linear(4, 4))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    with SummaryWriter(tmp_path / "obd") as writer:
        dsd = DSD(model, optimizer, 0.5, 1, 1, 1, importance="obd", writer=writer)
    model(torch.randn(2, 4)).sum().backward()
    optimizer.step()
    with caplog.at_level("INFO", logger="lightning_dsd"):
        dsd.step()
    assert "lowest OBD saliency ½·h·w² pruned (importance='obd'; h, the mean squared gradient, over 1 optimizer" \
           " steps)" in caplog.text
    record = _logged_run_record(tmp_path / "obd")
    assert record["arm"] == "obd" and record["options"]["importance"] == "obd"
    with SummaryWriter(tmp_path / "custom") as writer:
        DSD(model, optimizer, 0.5, 1, 1, 1, importance=permuted_scores, writer=writer)
    custom = _logged_run_record(tmp_path / "custom")
    assert custom["arm"] == "custom" and custom["options"]["importance"] == "test_importance.permuted_scores"


@pytest.mark.slow
def test_the_beyond_page_example_runs_as_written_and_its_notes_name_each_criterion(tmp_path):
    page = (ROOT / "docs" / "beyond.md").read_text()
    block = next(b.split("```", 1)[0] for b in page.split("```python\n")[1:] if "importance=importance" in b)
    script = tmp_path / "importance_example.py"
    script.write_text(textwrap.dedent(block))
    run = subprocess.run([sys.executable, str(script)], cwd=tmp_path, timeout=300, capture_output=True, text=True,
                         env={**os.environ, "PYTHONWARNINGS": "ignore"})
    output = run.stdout + run.stderr
    assert run.returncode == 0, output[-5000:]
    assert "lowest OBD saliency ½·h·w² pruned (importance='obd'; h, the mean squared gradient, over 8 optimizer" \
        " steps)" in output
    assert "lowest scores of __main__.gradient_weighted pruned (importance='__main__.gradient_weighted'" in output


def test_every_transition_to_a_sparse_phase_has_its_window_with_per_cycle_sparsities_and_a_final_sparse_phase():
    """D S D S D S (0.5, then 0.25, then AC/DC's final phase at 0.25), interval="step", 2-step windows: each
    of the three prunings is ranked by the callable's scores, from a window of exactly its 2 steps before it."""
    with seeded(0):
        model = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 2))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    dsd = DSD(model, optimizer, (0.5, 0.25), 3, 2, 3, interval="step", final_sparse_epochs=2,
              importance=permuted_scores, importance_steps=2)
    shapes = {name: model.get_parameter(name).shape for name in dsd.target_names}
    windows, prunings = [], []
    for _ in range(3 + 2 + 3 + 2 + 3 + 2):
        optimizer.zero_grad()
        model(torch.randn(4, 6)).square().mean().backward()
        optimizer.step()
        windows.append(dict(dsd._engine.window_steps))
        before = dsd.phase_label
        dsd.step()
        if dsd.phase is Phase.SPARSE and dsd.phase_label != before:
            prunings.append((dsd.phase_label, {name: mask.clone() for name, mask in dsd.masks.items()}))
            assert windows[-1] == dict.fromkeys(shapes, 2), "the window counted the 2 steps before the transition"
    assert [label for label, _ in prunings] == ["sparse 1/2", "sparse 2/2", "final sparse"]
    for (_, masks), sparsity in zip(prunings, (0.5, 0.25, 0.25), strict=True):
        for name, keep in expected_by_permutation(shapes, sparsity).items():
            assert torch.equal(masks[name], keep), name
    assert sum(1 for counted in windows if counted) == 3 * 2, "open for 2 steps before each pruning, never else"


# ------------------------------------------------------------------ found by an adversarial review, fixed


class DeadLayer(nn.Module):
    """``a`` sits behind a ReLU that never fires: its gradient is zero throughout, so every OBD score of it is 0."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b, self.head = nn.Linear(8, 8), nn.Linear(8, 8), nn.Linear(8, 2)
        with torch.no_grad():
            self.a.bias.fill_(-100.0)

    def forward(self, x):
        return self.head(torch.relu(self.a(x)) + torch.relu(self.b(x)))


def _dead_layer_run(importance):
    with seeded(0):
        model = DeadLayer()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    dsd = DSD(model, optimizer, 0.5, 3, 1, 1, interval="step", importance=importance, log_histograms=False)
    x, y = torch.randn(32, 8), torch.randint(0, 2, (32,))
    for _ in range(3):
        optimizer.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        optimizer.step()
        dsd.step()
    return model, dsd


@pytest.mark.parametrize("importance", ["obd", "constant", "float64 that rounds to one float32"])
def test_a_tensor_whose_scores_are_all_equal_is_left_dense_with_the_reason_never_cut_by_position(importance):
    criterion = {"obd": "obd", "constant": lambda name, weight, grad_sq: torch.ones_like(weight),
                 "float64 that rounds to one float32":
                     lambda name, weight, grad_sq: 1.0 + weight.double().abs() * 1e-12}[importance]
    with pytest.warns(UserWarning, match=r"DSD cycle 0: left `a.weight`.* dense in this sparse phase: in each, every"
                                         r" weight has the same score under `importance="):
        model, dsd = _dead_layer_run(criterion)
    assert dsd.phase is Phase.SPARSE and "a.weight" not in dsd.masks
    assert dsd._engine._left_dense["a.weight"].startswith("every weight has the score")
    assert int((model.a.weight == 0).sum()) == 0  # nothing cut
    if importance == "obd":  # the live layers are ranked as usual
        assert int((model.b.weight == 0).sum()) == 32 and int((model.head.weight == 0).sum()) == 8


def test_a_tensor_of_one_magnitude_that_the_criterion_can_rank_is_pruned_by_its_scores():
    with seeded(0):
        model = nn.Sequential(nn.Linear(4, 4))
    with torch.no_grad():
        model[0].weight.fill_(0.25)  # one magnitude: magnitude could not rank it, the permuted scores can
    optimizer = torch.optim.SGD(model.parameters(), lr=0.0)
    dsd = DSD(model, optimizer, 0.5, 2, 1, 1, interval="step", importance=permuted_scores, importance_steps=2)
    for _ in range(2):
        optimizer.zero_grad()
        model(torch.randn(3, 4)).sum().backward()
        optimizer.step()
        dsd.step()
    expected = expected_by_permutation({"0.weight": torch.Size([4, 4])}, 0.5)["0.weight"]
    assert torch.equal(dsd.masks["0.weight"], expected)


def test_a_callable_that_works_in_place_cannot_change_the_weights():
    with seeded(0):
        model = nn.Sequential(nn.Linear(4, 4))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.0)  # no step changes a weight: only DSD could
    before = model[0].weight.detach().clone()
    dsd = DSD(model, optimizer, 0.5, 1, 1, 1, interval="step", importance=lambda name, w, g: w.abs_())
    optimizer.zero_grad()
    model(torch.randn(3, 4)).sum().backward()
    optimizer.step()
    dsd.step()
    keep = dsd.masks["0.weight"]
    assert torch.equal(model[0].weight[keep], before[keep]) and bool((before < 0).any())


def test_infinite_scores_are_refused_with_how_to_keep_a_weight():
    with seeded(0):
        model = nn.Sequential(nn.Linear(4, 4))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    never = lambda name, w, g: torch.where(w > 0, torch.inf, w.abs())  # noqa: E731
    dsd = DSD(model, optimizer, 0.5, 1, 1, 1, interval="step", importance=never)
    optimizer.zero_grad()
    model(torch.randn(3, 4)).sum().backward()
    optimizer.step()
    with pytest.raises(ValueError, match=r"gave NaN or infinite scores \(`0.weight`: \d+\); DSD ranks finite scores"
                                         r" only.* give it a large finite score"):
        dsd.step()
    assert not dsd.masks


class BackboneAndHead(LightningModule):
    """A backbone that BackboneFinetuning unfreezes (adding its param group to the optimizer) and a head."""

    def __init__(self) -> None:
        super().__init__()
        self.backbone = nn.Sequential(nn.Linear(6, 8), nn.ReLU())
        self.head = nn.Linear(8, 2)

    def training_step(self, batch, batch_idx):
        x, y = batch
        return nn.functional.cross_entropy(self.head(self.backbone(x)), y)

    def configure_optimizers(self):
        return torch.optim.SGD(filter(lambda p: p.requires_grad, self.parameters()), lr=0.1)


@pytest.mark.parametrize("unfreeze_at", [2, 3])
def test_a_backbone_that_joins_the_optimizer_in_or_after_the_window_is_ranked_or_left_dense_never_a_crash(
        unfreeze_at):
    """Found by an adversarial review: a param group added during the window was never hooked, and the
    transition refused the run after its dense phase. Unfrozen at the window's epoch (2), the backbone is hooked
    and ranked (DSD's hooks first: the group joins after the window opened); unfrozen at the transition (3, its
    hooks first: trainable when DSD prunes), it has no statistics and stays dense for the cycle, said."""
    from lightning.pytorch.callbacks import BackboneFinetuning

    with seeded(0):
        model = BackboneAndHead()
    dsd = DSDCallback(0.5, 3, 1, 1, importance="obd", importance_steps=2)
    finetuning = BackboneFinetuning(unfreeze_backbone_at_epoch=unfreeze_at, backbone_initial_ratio_lr=1.0)
    x = torch.randn(32, 6)
    loader = DataLoader(TensorDataset(x, (x[:, 0] > 0).long()), batch_size=8)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        callbacks = [dsd, finetuning] if unfreeze_at == 2 else [finetuning, dsd]
        make_trainer(callbacks, max_epochs=4).fit(model, loader)
    unranked = [str(w.message) for w in caught if "counted no optimizer step of them" in str(w.message)]
    if unfreeze_at == 2:
        assert "backbone.0.weight" in dsd.masks and not unranked
    else:
        assert "backbone.0.weight" not in dsd.masks and dsd._engine._left_dense["backbone.0.weight"] == \
            "no optimizer step in the gradient window"
        assert len(unranked) == 1 and "`backbone.0.weight`" in unranked[0]
    assert "head.weight" in dsd.masks
