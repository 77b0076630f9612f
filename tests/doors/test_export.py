"""The sparse model saved at the end of each sparse phase: a plain checkpoint, and optionally sparse tensors."""

from __future__ import annotations

import os

import pytest
import torch
from helpers import TARGETS, ConvLSTMNet, run_recorded

from lightning_dsd import DSDCallback


@pytest.mark.parametrize("mode", ["checkpoint", "sparse"])
def test_the_sparse_model_is_exported_at_the_end_of_each_sparse_phase(tmp_path, mode):
    dsd = DSDCallback((0.5, 0.8), 1, 1, 1, export_sparse=mode)
    recorder = run_recorded(dsd, max_epochs=5, default_root_dir=tmp_path)
    assert [e["cycle"] for e in dsd.exported_sparse_models] == [0, 1]
    for exported, sparsity in zip(dsd.exported_sparse_models, (0.5, 0.8), strict=False):
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
