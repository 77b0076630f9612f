"""Beyond the paper: per-layer sparsity, N:M patterns, the sensitivity scan, sparse export, re-dense init."""

from __future__ import annotations

import logging
import os

import lightning.pytorch as pl
import pytest
import torch
from conftest import TARGETS, ConvLSTMNet, StepRecorder, make_loader, make_trainer, seeded
from torch import nn

from lightning_dsd import DSDCallback, Phase, sensitivity_scan
from lightning_dsd.masks import NMPattern, magnitude_masks, nm_mask


def _run(dsd: DSDCallback, **trainer_options) -> StepRecorder:
    with seeded():
        model = ConvLSTMNet()
    recorder = StepRecorder(dsd)
    make_trainer([dsd, recorder], **trainer_options).fit(model, make_loader())
    assert all(zeros for _, _, zeros in recorder.steps)
    return recorder


# ------------------------------------------------------------------ per-layer sparsity


def test_layer_sparsity_overrides_matching_layers_first_match_wins(caplog):
    caplog.set_level(logging.INFO, logger="lightning.pytorch.utilities.rank_zero")
    dsd = DSDCallback((0.5, 0.3), 1, 1, 1, layer_sparsity={"lstm.weight_ih*": 0.25, "lstm.*": 0.8, "head.*": "2:4"})
    recorder = _run(dsd, max_epochs=5)
    assert dsd.layer_sparsities == {
        "conv.weight": [0.5, 0.3],
        "lstm.weight_ih_l0": [0.25, 0.25],
        "lstm.weight_hh_l0": [0.8, 0.8],
        "head.weight": ["2:4", "2:4"],
    }
    assert caplog.text.count("DSD sparsity per parameter") == 1
    for cycle, default in enumerate((0.5, 0.3)):
        masks = recorder.masks_seen[cycle]
        for name, expected in (("conv.weight", default), ("lstm.weight_ih_l0", 0.25), ("lstm.weight_hh_l0", 0.8)):
            assert int((~masks[name]).sum()) == round(expected * masks[name].numel()), (cycle, name)
        assert int((~masks["head.weight"]).sum()) == masks["head.weight"].numel() // 2


# ------------------------------------------------------------------ N:M


def reference_nm(weight: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """Group by group, with a stable sort: the obvious, slow way."""
    moved = weight.movedim(1, -1).contiguous()
    keep = torch.zeros_like(moved, dtype=torch.bool)
    flat_w, flat_k = moved.reshape(-1, moved.shape[-1]), keep.view(-1, moved.shape[-1])
    for row in range(flat_w.shape[0]):
        for start in range(0, flat_w.shape[1], m):
            group = flat_w[row, start:start + m].abs()
            order = torch.sort(group, stable=True).indices
            flat_k[row, start + order[m - n:]] = True
    return keep.movedim(-1, 1)


NM_CASES = [(shape, n, m) for shape in [(6, 8), (4, 8, 3), (5, 4, 3, 3), (3, 12), (2, 16)]
            for n, m in [(2, 4), (1, 4), (3, 8)] if shape[1] % m == 0]


@pytest.mark.parametrize("shape, n, m", NM_CASES)
def test_nm_masks_match_the_group_by_group_reference(shape, n, m):
    weight = torch.randint(-3, 4, shape).float()  # many ties
    assert torch.equal(nm_mask(weight, NMPattern(n, m)), reference_nm(weight, n, m))


def test_two_four_sparsity_in_training_keeps_two_of_every_four_inputs():
    recorder = _run(DSDCallback("2:4", 1, 1, 1))
    for name, mask in recorder.masks_seen[0].items():
        groups = mask.movedim(1, -1).reshape(-1, 4)
        assert (groups.sum(dim=1) == 2).all(), name


def test_nm_patterns_refuse_shapes_that_do_not_divide_before_training():
    class Odd(ConvLSTMNet):
        def __init__(self):
            super().__init__()
            self.head = nn.Linear(16, 3)
            self.extra = nn.Linear(6, 6)

    model = Odd()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match=r"`sparsity='2:4'`.*`extra.weight` has shape \(6, 6\): input size 6"):
        make_trainer([DSDCallback("2:4", 1, 1, 1)]).fit(model, make_loader())
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    # A float for that layer makes it fine.
    make_trainer([DSDCallback("2:4", 1, 1, 1, layer_sparsity={"extra.*": 0.5})], max_epochs=1).fit(model, make_loader())


# ------------------------------------------------------------------ sensitivity scan


def _trained_model() -> ConvLSTMNet:
    with seeded():
        model = ConvLSTMNet()
    make_trainer([], max_epochs=40).fit(model, make_loader(n=256))
    return model


def test_sensitivity_scan_matches_pruning_each_layer_by_hand_and_restores_the_model_exactly():
    model = _trained_model()
    model.train()
    model.norm.eval()  # a mix of modes, to be restored as found
    before = {k: v.clone() for k, v in model.state_dict().items()}
    loader = make_loader(seed=5)

    def loss_in_train_mode(m, data):  # moves BatchNorm statistics: the scan must undo that too
        m.train()
        return float(sum(nn.functional.cross_entropy(m(x), y) for x, y in data))

    table = sensitivity_scan(model, loader, sparsities=(0.5, 0.9), metric=loss_in_train_mode)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert model.training and not model.norm.training

    for layer in TARGETS:
        for sparsity in (0.5, 0.9):
            by_hand = ConvLSTMNet()
            by_hand.load_state_dict(before)
            weight = dict(by_hand.named_parameters())[layer]
            with torch.no_grad():
                weight.mul_(magnitude_masks({layer: weight}, {layer: sparsity})[layer])
            assert table.by_layer()[layer][sparsity] == pytest.approx(loss_in_train_mode(by_hand, loader), rel=1e-6)
    assert set(table.by_layer()["head.weight"]) == {0.0, 0.5, 0.9}
    assert "| head.weight |" in table.to_markdown()
    assert len(table.plot().axes[0].lines) == len(TARGETS)


def test_sensitivity_scan_restores_the_model_when_the_metric_raises():
    model = _trained_model()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    calls = []

    def flaky(m, data):
        calls.append(1)
        if len(calls) == 3:
            raise RuntimeError("evaluation failed")
        return 0.0

    with pytest.raises(RuntimeError, match="evaluation failed"):
        sensitivity_scan(model, make_loader(), metric=flaky)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_sensitivity_scan_default_metric_is_accuracy_and_heavy_pruning_hurts():
    model = _trained_model()
    table = sensitivity_scan(model, make_loader(), sparsities=(0.99,), include=["head.weight"])
    values = table.by_layer()["head.weight"]
    assert 0.0 <= values[0.99] < values[0.0] <= 1.0


# ------------------------------------------------------------------ sparse-model export


@pytest.mark.parametrize("mode", ["checkpoint", "sparse"])
def test_the_sparse_model_is_exported_at_the_end_of_each_sparse_phase(tmp_path, mode):
    dsd = DSDCallback((0.5, 0.8), 1, 1, 1, export_sparse=mode)
    recorder = _run(dsd, max_epochs=5, default_root_dir=tmp_path)
    assert [e["cycle"] for e in dsd.exported_sparse_models] == [0, 1]
    for exported, sparsity in zip(dsd.exported_sparse_models, (0.5, 0.8)):
        assert exported["checkpoint"] == os.path.join(tmp_path, "dsd_sparse", f"cycle{exported['cycle']}.ckpt")
        assert exported["checkpoint_bytes"] == os.path.getsize(exported["checkpoint"])
        checkpoint = torch.load(exported["checkpoint"], weights_only=True)
        plain = ConvLSTMNet()
        plain.load_state_dict(checkpoint["state_dict"], strict=True)
        masks = recorder.masks_seen[exported["cycle"]]
        for name in TARGETS:
            weight = checkpoint["state_dict"][name]
            assert int((weight == 0).sum()) >= round(sparsity * weight.numel())
            assert (weight[~masks[name]] == 0).all()
        assert checkpoint["callbacks"]["DSDCallback"]["schedule"]["index"] == 1 + 2 * exported["cycle"]
        if mode == "sparse":
            sparse = torch.load(exported["sparse_state_dict"], weights_only=True)
            assert exported["sparse_state_dict_bytes"] == os.path.getsize(exported["sparse_state_dict"])
            for name in TARGETS:
                assert sparse[name].layout in (torch.sparse_csr, torch.sparse_coo)
                assert torch.equal(sparse[name].to_dense(), checkpoint["state_dict"][name])
            assert sparse["norm.running_mean"].layout == torch.strided
        else:
            assert "sparse_state_dict" not in exported


# ------------------------------------------------------------------ re-dense initialisation


def _weights_at_redense_start(**options) -> tuple[dict, dict]:
    seen = {}

    class AtRedense(pl.Callback):
        def on_train_epoch_start(self, trainer, pl_module):
            if dsd.phase is Phase.REDENSE and not seen:
                seen.update({n: p.detach().clone() for n, p in pl_module.named_parameters()})

    dsd = DSDCallback(0.5, 1, 1, 1, **options)
    recorder = StepRecorder(dsd)
    with seeded():
        model = ConvLSTMNet()
    make_trainer([dsd, AtRedense(), recorder]).fit(model, make_loader())
    return seen, recorder.masks_seen[0]


def test_small_normal_redense_init_is_small_seeded_and_leaves_survivors_alone():
    weights, masks = _weights_at_redense_start(redense_init="small_normal", seed=3)
    again, _ = _weights_at_redense_start(redense_init="small_normal", seed=3)
    other, _ = _weights_at_redense_start(redense_init="small_normal", seed=4)
    zero, zero_masks = _weights_at_redense_start()
    for name, keep in masks.items():
        restarted = weights[name][~keep]
        assert (restarted != 0).all()
        assert 0.03 < float(restarted.std() / weights[name][keep].std()) < 0.3, name
        assert torch.equal(weights[name], again[name])
        assert not torch.equal(weights[name], other[name])
        assert torch.equal(weights[name][keep], zero[name][keep])
        assert (zero[name][~zero_masks[name]] == 0).all()
