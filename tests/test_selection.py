"""Which parameters are targeted: defaults, include/exclude globs, tied and frozen weights."""

from __future__ import annotations

import torch
from torch import nn

from lightning_dsd.selection import select_parameters


class Zoo(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(10, 8)
        self.conv1 = nn.Conv2d(1, 4, 3)
        self.conv3d = nn.Conv3d(1, 2, 3)
        self.deconv = nn.ConvTranspose1d(4, 4, 3)
        self.bn = nn.BatchNorm2d(4)
        self.ln = nn.LayerNorm(8)
        self.gru = nn.GRU(8, 8, num_layers=2, bidirectional=True)
        self.lstm = nn.LSTM(8, 8, proj_size=4)
        self.attn = nn.MultiheadAttention(8, 2)
        self.head = nn.Linear(8, 10)
        self.head.weight = self.embed.weight  # tied: pruned once, under its first name
        self.positional = nn.Parameter(torch.zeros(4, 8))  # a bare 2-D parameter: only by `include`


def test_default_targets_are_the_weight_matrices_and_kernels_only():
    names = set(select_parameters(Zoo()).selected)
    gru = {
        f"gru.weight_{kind}_l{layer}{suffix}"
        for kind in ("ih", "hh")
        for layer in (0, 1)
        for suffix in ("", "_reverse")
    }
    expected = {
        "embed.weight", "conv1.weight", "conv3d.weight", "deconv.weight",
        "lstm.weight_ih_l0", "lstm.weight_hh_l0", "lstm.weight_hr_l0",
        "attn.in_proj_weight", "attn.out_proj.weight",
    } | gru
    assert names == expected
    assert not any("bias" in n or n.startswith(("bn.", "ln.")) for n in names)


def test_tied_weights_appear_once():
    selected = select_parameters(Zoo()).selected
    assert sum(p is selected["embed.weight"] for p in selected.values()) == 1


def test_include_replaces_the_defaults_with_matching_parameters_of_two_or_more_dims():
    names = set(select_parameters(Zoo(), include=["conv1.*", "positional"]).selected)
    assert names == {"conv1.weight", "positional"}  # conv1.bias is 1-D


def test_exclude_removes_matches_from_the_defaults():
    names = set(select_parameters(Zoo(), exclude=["conv1.*", "gru.*", "attn.*"]).selected)
    assert names == {"embed.weight", "conv3d.weight", "deconv.weight", "lstm.weight_ih_l0", "lstm.weight_hh_l0",
                     "lstm.weight_hr_l0"}


def test_frozen_parameters_are_skipped_by_default_and_reported_but_taken_when_included():
    zoo = Zoo()
    zoo.conv1.weight.requires_grad_(False)
    selection = select_parameters(zoo)
    assert "conv1.weight" not in selection.selected
    assert selection.skipped_frozen == ["conv1.weight"]
    assert "conv1.weight" in select_parameters(zoo, include=["conv1.weight"]).selected
