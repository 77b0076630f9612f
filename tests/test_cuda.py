"""CUDA-only checks: real 16-mixed with the GradScaler, fused optimizers, and FSDP's refusal.

They need a GPU, which CI does not have: there they are deselected by the ``cuda`` marker's skip. Run them
with ``pytest -m cuda`` on a machine with a GPU (the README says when they last ran and where).
"""

from __future__ import annotations

import lightning.pytorch as pl
import pytest
import torch
from helpers import ConvLSTMNet, OverflowsSometimes, StepRecorder, make_loader, make_trainer, seeded

from lightning_dsd import DSDCallback

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]

FUSED = {
    "adam-fused": lambda p: torch.optim.Adam(p, lr=1e-2, fused=True),
    "adamw-fused-amsgrad": lambda p: torch.optim.AdamW(p, lr=1e-2, weight_decay=0.1, amsgrad=True, fused=True),
    "sgd-fused-nesterov": lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9, nesterov=True, fused=True),
    "adam-capturable-foreach": lambda p: torch.optim.Adam(p, lr=1e-2, foreach=True, capturable=True),
}


def _gpu_trainer(callbacks, **kwargs):
    return make_trainer(callbacks, accelerator="cuda", devices=1, deterministic=False, **kwargs)


@pytest.mark.parametrize("make_optimizer", FUSED.values(), ids=FUSED.keys())
def test_fused_optimizers_on_cuda_keep_pruned_entries_zero(make_optimizer):
    with seeded():
        model = ConvLSTMNet(optimizer=make_optimizer)
    dsd = DSDCallback(0.5, 1, 1, 1)
    recorder = StepRecorder(dsd)
    _gpu_trainer([dsd, recorder]).fit(model, make_loader())
    assert [p for p, _, _ in recorder.steps] == ["dense"] * 4 + ["sparse"] * 4 + ["redense"] * 4
    assert all(zeros for _, _, zeros in recorder.steps)
    assert all(m.device.type == "cuda" for m in recorder.masks_seen[0].values()), "masks live beside the weights"


@pytest.mark.parametrize("fused", [False, True], ids=["foreach-adam", "fused-adam"])
def test_16_mixed_on_cuda_with_skipped_steps(fused):
    model = OverflowsSometimes(optimizer=lambda p: torch.optim.Adam(p, lr=1e-2, fused=fused))
    dsd = DSDCallback(0.5, 1, 1, 1)
    recorder = StepRecorder(dsd)
    _gpu_trainer([dsd, recorder], precision="16-mixed").fit(model, make_loader())
    assert len(model.skipped) == 3
    # The scaler skips a plain optimizer's step; a fused one is still called and skips the update inside.
    assert len(recorder.steps) == (12 if fused else 9)
    assert all(zeros for _, _, zeros in recorder.steps)


def test_bool_mask_storage_on_cuda():
    dsd = DSDCallback(0.5, 1, 2, 1, mask_storage="bool")
    mask_bytes = []

    class Probe(pl.Callback):
        def on_train_epoch_end(self, trainer, pl_module):
            mask_bytes.append(dsd.mask_bytes)

    recorder = StepRecorder(dsd)
    model = ConvLSTMNet()
    _gpu_trainer([dsd, Probe(), recorder]).fit(model, make_loader())
    targeted = sum(p.numel() for n, p in model.named_parameters() if n in dsd.target_names)
    assert mask_bytes == [0, targeted, targeted, 0]  # 1 byte per weight
    assert all(zeros for _, _, zeros in recorder.steps)


def test_bf16_mixed_on_cuda():
    dsd = DSDCallback(0.5, 1, 1, 1)
    recorder = StepRecorder(dsd)
    _gpu_trainer([dsd, recorder], precision="bf16-mixed").fit(ConvLSTMNet(), make_loader())
    assert all(zeros for _, _, zeros in recorder.steps) and len(recorder.steps) == 12


def test_fsdp_is_refused_at_setup_before_training():
    model = ConvLSTMNet()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match="Found strategy FSDPStrategy.*use `strategy=ModelParallelStrategy\\(\\)`"):
        _gpu_trainer([DSDCallback(0.5, 1, 1, 1)], strategy="fsdp").fit(model, make_loader())
    assert all(torch.equal(before[k], v.cpu()) for k, v in model.state_dict().items())
