"""Which parameters are targeted: defaults, include/exclude globs, tied and frozen weights."""

from __future__ import annotations

import lightning.pytorch as pl
import pytest
import torch
from helpers import StepRecorder, make_loader, make_trainer
from torch import nn

from lightning_dsd import DSDCallback
from lightning_dsd.selection import LayerSpec, select_parameters


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


def test_frozen_parameters_are_chosen_like_any_other_since_each_transition_decides_what_it_prunes():
    zoo = Zoo()
    zoo.conv1.weight.requires_grad_(False)
    assert "conv1.weight" in select_parameters(zoo).selected
    assert "conv1.weight" not in select_parameters(zoo, exclude=["conv1.*"]).selected


def test_input_dimensions_follow_each_layer_layout():
    dims = select_parameters(Zoo()).input_dims
    assert dims["deconv.weight"] == 0  # ConvTranspose stores (in, out, k)
    assert {dims[n] for n in dims if n != "deconv.weight"} == {1}


def test_an_untied_embedding_is_left_dense_and_reported_and_a_bare_parameter_too():
    model = nn.Sequential(nn.Embedding(10, 4), nn.Linear(4, 3))
    model.register_parameter("positional", nn.Parameter(torch.zeros(4, 4)))
    selection = select_parameters(model)
    assert list(selection.selected) == ["1.weight"]
    assert selection.left_out == {"parameter": ["positional"], "Embedding": ["0.weight"]}
    assert "Left dense by default: parameter x1 (positional); Embedding x1 (0.weight)." in selection.summary()


class InOutLinear(nn.Module):
    """A user's own linear layer that stores its weight (in, out), as transformers' Conv1D does."""

    def __init__(self, n_in: int, n_out: int) -> None:
        super().__init__()
        self.kernel = nn.Parameter(torch.randn(n_in, n_out) / n_in**0.5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x @ self.kernel


@pytest.mark.parametrize("key", [InOutLinear, f"{__name__}.InOutLinear"], ids=["class", "qualified-name"])
def test_a_declared_custom_layer_is_targeted_and_pruned_two_of_four_along_its_input_dimension(key):
    class Net(pl.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.body = InOutLinear(8, 6)
            self.head = nn.Linear(6, 3)

        def training_step(self, batch, batch_idx):
            x, y = batch
            return nn.functional.cross_entropy(self.head(torch.relu(self.body(x.mean(dim=1).repeat(1, 2)[:, :8]))), y)

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1)

    dsd = DSDCallback("2:4", 1, 2, 1, layer_types={key: LayerSpec(("kernel",), input_dim=0)},
                      include=None, exclude="head.*")
    recorder = StepRecorder(dsd)
    make_trainer([dsd, recorder], max_epochs=4).fit(Net(), make_loader())
    assert dsd.target_names == ["body.kernel"] and dsd.selection.input_dims == {"body.kernel": 0}
    mask = recorder.masks_seen[0]["body.kernel"]
    # Groups of 4 consecutive inputs (rows); dim 1 (6 outputs) does not even divide by 4.
    assert bool((mask.movedim(0, -1).reshape(-1, 4).sum(dim=1) == 2).all())
    assert all(zeros for _, _, zeros in recorder.steps)
