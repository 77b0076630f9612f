"""Resuming from a checkpoint taken mid-sparse-phase continues with the same masks, bit for bit."""

from __future__ import annotations

import pytest
import torch
from helpers import StepRecorder, make_loader, make_trainer, resumable_dsd, resumable_model
from lightning.pytorch.callbacks import ModelCheckpoint

from lightning_dsd import DSDCallback, Phase


def test_resuming_mid_sparse_phase_ends_bit_identical_to_an_uninterrupted_run(tmp_path):
    uninterrupted = resumable_model()
    dsd = resumable_dsd()
    checkpoints = ModelCheckpoint(dirpath=tmp_path, save_top_k=-1, every_n_epochs=1, filename="{epoch}")
    recorder = StepRecorder(dsd)
    make_trainer([dsd, checkpoints, recorder], max_epochs=10, enable_checkpointing=True).fit(
        uninterrupted, make_loader()
    )
    assert dsd.phase is Phase.REDENSE

    mid_sparse = tmp_path / "epoch=3.ckpt"  # the second of three sparse epochs has just ended
    state = torch.load(mid_sparse, weights_only=True)["callbacks"]["DSDCallback"]
    assert state["schedule"]["index"] == 1
    packed_bytes = sum(m["bits"].numel() for m in state["masks"].values())
    targeted = sum(p.numel() for n, p in uninterrupted.named_parameters() if n in recorder.masks_seen[0])
    assert packed_bytes <= targeted / 8 + len(state["masks"]), "masks are stored at one bit per weight"

    resumed_dsd = resumable_dsd()
    resumed_recorder = StepRecorder(resumed_dsd)
    resumed = resumable_model()
    make_trainer([resumed_dsd, resumed_recorder], max_epochs=10).fit(resumed, make_loader(), ckpt_path=mid_sparse)

    assert [p for p, _, _ in resumed_recorder.steps] == ["sparse"] * 4 + ["redense"] * 8
    assert all(zeros for _, _, zeros in resumed_recorder.steps)
    for name in recorder.masks_seen[0]:
        assert torch.equal(resumed_recorder.masks_seen[0][name], recorder.masks_seen[0][name]), name
    for (name, a), b in zip(uninterrupted.state_dict().items(), resumed.state_dict().values(), strict=False):
        assert torch.equal(a, b), f"{name} differs after resume"


def test_a_checkpoint_from_the_dense_phase_resumes_into_pruning_at_the_right_epoch(tmp_path):
    dsd = resumable_dsd()
    checkpoints = ModelCheckpoint(dirpath=tmp_path, save_top_k=-1, every_n_epochs=1, filename="{epoch}")
    uninterrupted = resumable_model()
    make_trainer([dsd, checkpoints], max_epochs=10, enable_checkpointing=True).fit(uninterrupted, make_loader())

    resumed_dsd = resumable_dsd()
    resumed = resumable_model()
    make_trainer([resumed_dsd], max_epochs=10).fit(resumed, make_loader(), ckpt_path=tmp_path / "epoch=0.ckpt")
    for a, b in zip(uninterrupted.state_dict().values(), resumed.state_dict().values(), strict=False):
        assert torch.equal(a, b)


def test_resuming_with_other_targets_is_refused_with_both_lists(tmp_path):
    dsd = resumable_dsd()
    checkpoints = ModelCheckpoint(dirpath=tmp_path, save_top_k=-1, every_n_epochs=1, filename="{epoch}")
    make_trainer([dsd, checkpoints], max_epochs=10, enable_checkpointing=True).fit(resumable_model(), make_loader())
    other = DSDCallback(0.5, dense_epochs=2, sparse_epochs=3, redense_epochs=2, exclude=["conv.*"])
    with pytest.raises(ValueError, match=r"`targets`: checkpoint \['conv.weight', .*this run \['lstm.weight_ih_l0'"):
        make_trainer([other], max_epochs=10).fit(resumable_model(), make_loader(), ckpt_path=tmp_path / "epoch=3.ckpt")
