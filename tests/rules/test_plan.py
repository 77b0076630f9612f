"""The mask plan: per-layer sparsities, N:M patterns that must fit, and masks checked against the rules."""

from __future__ import annotations

import logging

import pytest
import torch
from helpers import TARGETS, ConvLSTMNet, StepRecorder, make_loader, make_trainer, run_recorded
from test_masks import reference_keep
from torch import nn

from lightning_dsd import DSDCallback
from lightning_dsd.rules.masks import NMPattern
from lightning_dsd.rules.plan import MaskPlan, global_masks


def test_layer_sparsity_overrides_matching_layers_first_match_wins(caplog):
    caplog.set_level(logging.INFO, logger="lightning_dsd")
    dsd = DSDCallback((0.5, 0.3), 1, 1, 1, layer_sparsity={"lstm.weight_ih*": 0.25, "lstm.*": 0.8, "head.*": "2:4"})
    recorder = run_recorded(dsd, max_epochs=5)
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


def test_two_four_sparsity_in_training_keeps_two_of_every_four_inputs():
    recorder = run_recorded(DSDCallback("2:4", 1, 1, 1))
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
    # A float for that layer makes it fine: that layer gets round(0.5 * N), the others 2 of every 4 inputs.
    dsd = DSDCallback("2:4", 1, 1, 1, layer_sparsity={"extra.*": 0.5})
    recorder = StepRecorder(dsd)
    make_trainer([dsd, recorder], max_epochs=2).fit(model, make_loader())
    masks = recorder.masks_seen[0]
    assert int((~masks["extra.weight"]).sum()) == 18
    assert all(bool((masks[n].movedim(1, -1).reshape(-1, 4).sum(dim=1) == 2).all()) for n in TARGETS)


def test_check_masks_accepts_what_the_plan_decides_and_names_every_rule_broken():
    weights = {"a": torch.randn(4, 8), "b": torch.randn(8, 4)}  # b stores (in, out)
    plan = MaskPlan((0.5, NMPattern(2, 4)), input_dims={"b": 0})
    for cycle in (0, 1):
        plan.check_masks(weights, plan.decide(weights, cycle), cycle)
    masks = plan.decide(weights, 0)
    with pytest.raises(ValueError, match=r"the mask of `a` prunes 15 of 32 weights, expected round\(0.5 \* 32\) = 16"):
        plan.check_masks(weights, {**masks, "a": _keep_one_more(masks["a"])}, 0)
    along_outputs = MaskPlan((NMPattern(2, 4),), input_dims={"b": 1}).decide(weights, 0)  # groups on the wrong dim
    with pytest.raises(ValueError, match=r"`b` does not prune exactly 2 of every 4 weights along its input dimension"):
        plan.check_masks(weights, {**plan.decide(weights, 1), "b": along_outputs["b"]}, 1)
    with pytest.raises(ValueError, match=r"missing \['b'\], unexpected \['c'\]"):
        plan.check_masks(weights, {"a": masks["a"], "c": masks["b"]}, 0)


def _keep_one_more(mask: torch.Tensor) -> torch.Tensor:
    mask = mask.clone()
    mask.view(-1)[int((~mask).flatten().nonzero()[0])] = True
    return mask


def test_global_scope_checks_the_count_over_all_targets():
    weights = {"a": torch.randn(4, 8), "b": torch.randn(6, 4)}
    plan = MaskPlan((0.3,), scope="global")
    masks = plan.decide(weights, 0)
    plan.check_masks(weights, masks, 0)
    assert sum(int((~m).sum()) for m in masks.values()) == round(0.3 * 56)
    with pytest.raises(ValueError, match=r"the masks prune 16 of 56 weights, expected round\(0.3 \* 56\) = 17"):
        plan.check_masks(weights, {"a": _keep_one_more(masks["a"]), "b": masks["b"]}, 0)


def test_global_masks_use_one_threshold_over_all_tensors():
    generator = torch.Generator().manual_seed(0)
    weights = {"a": torch.randn(30, 10, generator=generator), "b": 3 * torch.randn(50, generator=generator)}
    keep = global_masks(weights, 0.4)
    everything = torch.cat([w.flatten() for w in weights.values()])
    expected = reference_keep(everything, 0.4)
    assert torch.equal(torch.cat([keep["a"].flatten(), keep["b"].flatten()]), expected)
    assert keep["a"].shape == (30, 10)
