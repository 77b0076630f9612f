"""``sensitivity_scan``: each layer pruned alone exactly as DSD would, and the model put back bit for bit."""

from __future__ import annotations

import pytest
import torch
from helpers import TARGETS, ConvLSTMNet, make_loader, make_trainer, seeded
from torch import nn

from lightning_dsd import sensitivity_scan
from lightning_dsd.rules.masks import magnitude_masks


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


def test_sensitivity_scan_ranks_by_obd_from_the_given_squared_gradients():
    model = nn.Sequential(nn.Linear(4, 2))
    with torch.no_grad():
        model[0].weight.copy_(torch.tensor([[5.0, 0.1, 0.2, 0.3], [4.0, 0.4, 0.5, 0.6]]))
    grad_sq = {"0.weight": torch.tensor([[0.0, 1.0, 1.0, 1.0], [0.0, 1.0, 1.0, 1.0]])}  # input 0: no gradient
    seen = []

    def zeros_seen(model, loader):
        seen.append(model[0].weight.detach().clone())
        return 0.0

    sensitivity_scan(model, [None], sparsities=(0.25,), metric=zeros_seen, importance="obd", grad_sq=grad_sq)
    assert torch.equal(seen[1][:, 0], torch.zeros(2)) and bool((seen[1][:, 1:] != 0).all()), "the large, dead ones"
    with pytest.raises(ValueError, match=r"`grad_sq` has none for \['0.weight'\]"):
        sensitivity_scan(model, [None], sparsities=(0.25,), metric=zeros_seen, importance="obd")
