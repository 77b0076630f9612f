"""DSD through real ``lightning.Trainer`` runs: phases, exact pruning, zeros after every step, re-dense."""

from __future__ import annotations

import weakref

import lightning.pytorch as pl
import pytest
import torch
from helpers import TARGETS, ConvLSTMNet, StepRecorder, make_loader, make_trainer, seeded

from lightning_dsd import DSDCallback, Phase
from lightning_dsd.rules.masks import magnitude_masks


class _DriftingSGD(torch.optim.Optimizer):
    """Plain SGD that also nudges every weight, zero gradient or not: only a post-step re-mask keeps zeros."""

    def __init__(self, params, lr: float) -> None:
        super().__init__(params, {"lr": lr})

    @torch.no_grad()
    def step(self, closure=None):
        loss = closure() if closure is not None else None
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is not None:
                    p.add_(p.grad, alpha=-group["lr"]).add_(1e-3)
        return loss


OPTIMIZERS = {
    "sgd-momentum-nesterov-wd": lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9, nesterov=True, weight_decay=1e-3),
    "adam": lambda p: torch.optim.Adam(p, lr=1e-2),
    "adamw-amsgrad": lambda p: torch.optim.AdamW(p, lr=1e-2, weight_decay=0.1, amsgrad=True),
    "rmsprop-centered-momentum": lambda p: torch.optim.RMSprop(p, lr=1e-3, momentum=0.5, centered=True),
    "adagrad": lambda p: torch.optim.Adagrad(p, lr=0.1),
    "nadam": lambda p: torch.optim.NAdam(p, lr=1e-2),
    "radam": lambda p: torch.optim.RAdam(p, lr=1e-2),
    "adamax": lambda p: torch.optim.Adamax(p, lr=1e-2),
    "drifting-custom-optimizer": lambda p: _DriftingSGD(p, lr=0.1),
}


@pytest.mark.parametrize("make_optimizer", OPTIMIZERS.values(), ids=OPTIMIZERS.keys())
def test_pruned_entries_are_exactly_zero_after_every_optimizer_step(make_optimizer):
    with seeded():
        model = ConvLSTMNet(optimizer=make_optimizer)
    dsd = DSDCallback(0.5, dense_epochs=2, sparse_epochs=2, redense_epochs=2)
    recorder = StepRecorder(dsd)
    make_trainer([dsd, recorder]).fit(model, make_loader())

    phases = [phase for phase, _, _ in recorder.steps]
    assert phases == ["dense"] * 8 + ["sparse"] * 8 + ["redense"] * 8
    assert all(zeros for _, _, zeros in recorder.steps)
    for name, mask in recorder.masks_seen[0].items():
        assert int((~mask).sum()) == round(0.5 * mask.numel()), name


@pytest.mark.parametrize("make_optimizer", [OPTIMIZERS["adamw-amsgrad"], OPTIMIZERS["drifting-custom-optimizer"]],
                         ids=["adamw-amsgrad", "drifting-custom-optimizer"])
@pytest.mark.parametrize("storage, dtype", [("bool", torch.bool), ("weight_dtype", torch.float32)])
def test_each_mask_storage_keeps_the_same_invariants(make_optimizer, storage, dtype):
    with seeded():
        model = ConvLSTMNet(optimizer=make_optimizer)
    dsd = DSDCallback(0.5, dense_epochs=1, sparse_epochs=2, redense_epochs=1, mask_storage=storage)
    recorder = StepRecorder(dsd)

    mask_bytes = []

    class MaskMemory(pl.Callback):
        def on_train_epoch_end(self, trainer, pl_module):
            mask_bytes.append(dsd.mask_bytes)

    make_trainer([dsd, MaskMemory(), recorder], max_epochs=4).fit(model, make_loader())
    targeted = sum(p.numel() for n, p in model.named_parameters() if n in dsd.target_names)
    per_weight = torch.empty(0, dtype=dtype).element_size()
    assert mask_bytes == [0, targeted * per_weight, targeted * per_weight, 0]
    assert [phase for phase, _, _ in recorder.steps] == ["dense"] * 4 + ["sparse"] * 8 + ["redense"] * 4
    assert all(zeros for _, _, zeros in recorder.steps)
    for mask in recorder.masks_seen[0].values():
        assert int((~mask).sum()) == round(0.5 * mask.numel())


def test_gradient_accumulation_and_clipping_keep_pruned_entries_zero():
    gradients_seen_by_clipping_are_masked = []

    class BeforeClipping(pl.Callback):
        def on_before_optimizer_step(self, trainer, pl_module, optimizer):
            params = dict(pl_module.named_parameters())
            gradients_seen_by_clipping_are_masked.extend(
                bool((params[name].grad[~mask] == 0).all()) for name, mask in dsd.masks.items()
            )

    with seeded():
        model = ConvLSTMNet(optimizer=lambda p: torch.optim.Adam(p, lr=1e-2))
    dsd = DSDCallback(0.4, dense_epochs=1, sparse_epochs=2, redense_epochs=1)
    recorder = StepRecorder(dsd)
    trainer = make_trainer([dsd, BeforeClipping(), recorder], accumulate_grad_batches=3, gradient_clip_val=0.05)
    trainer.fit(model, make_loader(n=96))

    # 6 batches per epoch, accumulated by 3: two real optimizer steps per epoch.
    assert [phase for phase, _, _ in recorder.steps] == ["dense"] * 2 + ["sparse"] * 4 + ["redense"] * 2
    assert all(zeros for _, _, zeros in recorder.steps)
    assert len(gradients_seen_by_clipping_are_masked) == 4 * len(TARGETS)
    assert all(gradients_seen_by_clipping_are_masked)


def test_masks_are_chosen_from_the_weights_at_the_transition():
    snapshots = {}

    class Snapshot(pl.Callback):
        def on_train_epoch_end(self, trainer, pl_module):
            snapshots[trainer.current_epoch] = {n: p.detach().clone() for n, p in pl_module.named_parameters()}

    with seeded():
        model = ConvLSTMNet()
    dsd = DSDCallback(0.3, dense_epochs=2, sparse_epochs=1, redense_epochs=0, stop_at_end=False)
    recorder = StepRecorder(dsd)
    make_trainer([Snapshot(), dsd, recorder], max_epochs=3).fit(model, make_loader())

    end_of_dense = {name: snapshots[1][name] for name in TARGETS}
    expected = magnitude_masks(end_of_dense, dict.fromkeys(TARGETS, 0.3))
    assert sorted(recorder.masks_seen[0]) == sorted(TARGETS)
    for name in TARGETS:
        assert torch.equal(recorder.masks_seen[0][name], expected[name]), name


def test_dense_epochs_zero_prunes_the_pretrained_weights_before_the_first_step():
    with seeded():
        model = ConvLSTMNet()
    pretrained = {name: p.detach().clone() for name, p in model.named_parameters() if name in TARGETS}
    dsd = DSDCallback(0.5, dense_epochs=0, sparse_epochs=1, redense_epochs=1)
    recorder = StepRecorder(dsd)
    make_trainer([dsd, recorder]).fit(model, make_loader())

    assert [phase for phase, _, _ in recorder.steps] == ["sparse"] * 4 + ["redense"] * 4
    expected = magnitude_masks(pretrained, dict.fromkeys(TARGETS, 0.5))
    assert all(torch.equal(recorder.masks_seen[0][n], expected[n]) for n in TARGETS)


def test_redense_restores_pruned_weights_from_zero_with_zeroed_state_and_a_tenth_of_the_lr():
    seen = {}

    class AtRedenseStart(pl.Callback):
        def on_train_epoch_start(self, trainer, pl_module):
            if dsd.phase is Phase.REDENSE and "weights" not in seen:
                optimizer = trainer.optimizers[0]
                seen["weights"] = {n: p.detach().clone() for n, p in pl_module.named_parameters()}
                seen["state"] = {n: {k: v.clone() for k, v in optimizer.state[p].items()}
                                 for n, p in pl_module.named_parameters()}
                seen["lr"] = optimizer.param_groups[0]["lr"]

    with seeded():
        model = ConvLSTMNet(optimizer=lambda p: torch.optim.Adam(p, lr=0.02))
    dsd = DSDCallback(0.5, dense_epochs=1, sparse_epochs=1, redense_epochs=1, mask_storage="bool")
    recorder = StepRecorder(dsd)

    class KeepMasks(pl.Callback):
        def on_train_epoch_end(self, trainer, pl_module):
            if dsd.phase is Phase.SPARSE:
                seen["masks"] = {name: mask.clone() for name, mask in dsd.masks.items()}
                seen["mask_ref"] = weakref.ref(dsd.masks["conv.weight"])  # bool storage: the stored mask itself

    make_trainer([dsd, AtRedenseStart(), KeepMasks(), recorder]).fit(model, make_loader())

    assert seen["lr"] == pytest.approx(0.002, rel=1e-12)
    assert seen["mask_ref"]() is None, "the sparse phase's masks must be freed at re-dense"
    assert dsd.masks == {}
    for name, keep in seen["masks"].items():
        assert (seen["weights"][name][~keep] == 0).all()
        for key in ("exp_avg", "exp_avg_sq"):
            assert (seen["state"][name][key][~keep] == 0).all(), (name, key)
    # Re-dense really is dense again (no re-mask hook left behind): the formerly pruned entries move.
    final = dict(model.named_parameters())
    assert all(bool((final[name][~keep] != 0).any()) for name, keep in seen["masks"].items())


def test_two_cycles_run_d_s_d_s_d_with_each_cycles_sparsity_and_a_compounding_lr_drop():
    lrs = {}

    class LrPerPhase(pl.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            lrs.setdefault((dsd.phase.value, dsd.cycle), trainer.optimizers[0].param_groups[0]["lr"])

    with seeded():
        model = ConvLSTMNet()
    dsd = DSDCallback((0.5, 0.25), dense_epochs=1, sparse_epochs=1, redense_epochs=1)
    recorder = StepRecorder(dsd)
    trainer = make_trainer([dsd, LrPerPhase(), recorder], max_epochs=20)
    trainer.fit(model, make_loader())

    assert trainer.current_epoch == 5, "stop_at_end stops after the last phase"
    order = [(p, c) for p, c, _ in recorder.steps]
    assert order == [("dense", 0)] * 4 + [("sparse", 0)] * 4 + [("redense", 0)] * 4 + [("sparse", 1)] * 4 + [
        ("redense", 1)
    ] * 4
    assert all(zeros for _, _, zeros in recorder.steps)
    for cycle, sparsity in enumerate((0.5, 0.25)):
        for mask in recorder.masks_seen[cycle].values():
            assert int((~mask).sum()) == round(sparsity * mask.numel())
    assert lrs[("sparse", 0)] == pytest.approx(0.1)
    assert lrs[("redense", 0)] == pytest.approx(0.01)
    assert lrs[("sparse", 1)] == pytest.approx(0.01)
    assert lrs[("redense", 1)] == pytest.approx(0.001)


def test_global_scope_prunes_the_fraction_of_all_targets_with_one_threshold():
    with seeded():
        model = ConvLSTMNet()
    dsd = DSDCallback(0.6, dense_epochs=1, sparse_epochs=1, redense_epochs=0, scope="global", stop_at_end=False)
    recorder = StepRecorder(dsd)
    make_trainer([dsd, recorder], max_epochs=2).fit(model, make_loader())

    masks = recorder.masks_seen[0]
    total = sum(m.numel() for m in masks.values())
    assert sum(int((~m).sum()) for m in masks.values()) == round(0.6 * total)
    per_layer = {n: float((~m).float().mean()) for n, m in masks.items()}
    assert max(per_layer.values()) - min(per_layer.values()) > 0.05, "a global threshold prunes layers unevenly"


def test_step_interval_switches_phases_at_exact_optimizer_steps():
    with seeded():
        model = ConvLSTMNet()
    dsd = DSDCallback(0.5, dense_epochs=5, sparse_epochs=6, redense_epochs=3, interval="step")
    recorder = StepRecorder(dsd)
    trainer = make_trainer([dsd, recorder], max_epochs=10, accumulate_grad_batches=2)
    trainer.fit(model, make_loader(n=128))

    assert [phase for phase, _, _ in recorder.steps] == ["dense"] * 5 + ["sparse"] * 6 + ["redense"] * 3
    assert trainer.global_step == 14
    assert all(zeros for _, _, zeros in recorder.steps)


def test_stop_at_end_false_keeps_training_in_the_last_redense():
    dsd = DSDCallback(0.5, dense_epochs=1, sparse_epochs=1, redense_epochs=1, stop_at_end=False)
    recorder = StepRecorder(dsd)
    trainer = make_trainer([dsd, recorder], max_epochs=5)
    trainer.fit(ConvLSTMNet(), make_loader())
    assert trainer.current_epoch == 5
    assert [phase for phase, _, _ in recorder.steps][-8:] == ["redense"] * 8


def test_a_max_epochs_too_short_for_the_schedule_warns_with_the_epochs_needed():
    dsd = DSDCallback(0.5, dense_epochs=3, sparse_epochs=3, redense_epochs=3)
    with pytest.warns(UserWarning, match=r"needs 9 epochs.*max_epochs=4.*sparse phase.*max_epochs=9"):
        make_trainer([dsd], max_epochs=4, limit_train_batches=1).fit(ConvLSTMNet(), make_loader())


def test_the_model_stays_a_plain_model_in_every_phase(tmp_path):
    saved = {}

    class SaveEachPhase(pl.Callback):
        def on_train_epoch_end(self, trainer, pl_module):
            path = tmp_path / f"{dsd.phase.value}.ckpt"
            trainer.save_checkpoint(path)
            saved[dsd.phase.value] = path
            assert not any(m._forward_pre_hooks or m._forward_hooks for m in pl_module.modules())

    model = ConvLSTMNet()
    params_before = {name: id(p) for name, p in model.named_parameters()}
    keys_before = set(model.state_dict())
    dsd = DSDCallback(0.5, dense_epochs=1, sparse_epochs=1, redense_epochs=1)
    make_trainer([dsd, SaveEachPhase()]).fit(model, make_loader())

    assert {name: id(p) for name, p in model.named_parameters()} == params_before
    assert set(model.state_dict()) == keys_before
    assert sorted(saved) == ["dense", "redense", "sparse"]
    for phase, path in saved.items():
        checkpoint = torch.load(path, weights_only=True)
        plain = ConvLSTMNet()
        plain.load_state_dict(checkpoint["state_dict"], strict=True)
        x = torch.randn(2, 4, 12)
        plain.eval(), model.eval()
        if phase == "redense":
            torch.testing.assert_close(plain(x), model(x), rtol=0, atol=0)
