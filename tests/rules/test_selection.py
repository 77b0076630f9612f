"""Which parameters are targeted: defaults, include/exclude globs, tied and frozen weights."""

from __future__ import annotations

import dataclasses

import lightning.pytorch as pl
import pytest
import torch
from helpers import ConvLSTMNet, StepRecorder, make_loader, make_trainer, seeded
from torch import nn

from lightning_dsd import DSD, DSDCallback
from lightning_dsd.rules.selection import LayerSpec, Selection, select_parameters


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
    assert names == expected  # no bias, norm or bare parameter among them


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


class TinyResNet(nn.Module):
    """A ResNet's layout, as timm and torchvision write it: ``conv1`` reads the image, a residual block, ``fc``."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(8)
        self.block = nn.Sequential(nn.Conv2d(8, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU(),
                                   nn.Conv2d(8, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8))
        self.fc = nn.Linear(8, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.bn1(self.conv1(x)))
        return self.fc(torch.relu(h + self.block(h)).mean(dim=(2, 3)))


class TinyViT(nn.Module):
    """A ViT's layout: a patch-embedding convolution (``patch_embed.proj``, as timm names it), a class token and
    position embeddings (bare parameters), one encoder layer, a head."""

    def __init__(self) -> None:
        super().__init__()
        self.patch_embed = nn.Module()
        self.patch_embed.proj = nn.Conv2d(3, 8, kernel_size=4, stride=4)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, 8))
        self.pos_embed = nn.Parameter(torch.randn(1, 5, 8) * 0.02)
        self.block = nn.TransformerEncoderLayer(8, 2, dim_feedforward=16, batch_first=True)
        self.head = nn.Linear(8, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        tokens = self.patch_embed.proj(x).flatten(2).transpose(1, 2)
        tokens = torch.cat([self.cls_token.expand(len(x), -1, -1), tokens], dim=1) + self.pos_embed
        return self.head(self.block(tokens)[:, 0])


@pytest.mark.parametrize("model_type, first", [(TinyResNet, "conv1.weight"), (TinyViT, "patch_embed.proj.weight")])
def test_the_convolution_that_reads_the_input_is_left_dense_by_default_said_so_and_include_brings_it_back(
    model_type, first
):
    model = model_type()
    selection = select_parameters(model)
    assert first not in selection.selected and selection.input_convolution == [first]
    assert (f"Left dense by default: the convolution that reads the input ({first}), as in the paper (the first"
            " convolution registered; if another one reads the input, `exclude` that one); to prune it too, use"
            " `include` patterns that name every target, e.g. `include=['*.weight']`.") in selection.summary()
    assert len(selection.selected) == (3 if model_type is TinyResNet else 5)  # every other connection weight
    included = select_parameters(model, include=["*.weight", "*_weight"])
    assert first in included.selected and included.input_convolution == []
    assert "reads the input" not in included.summary()
    assert select_parameters(model, exclude=[first]).input_convolution == [], "excluded: nothing to say"


def test_only_an_image_or_video_convolution_registered_first_counts_as_reading_the_input():
    assert select_parameters(nn.Sequential(nn.Conv3d(1, 2, 3), nn.Flatten(), nn.Linear(2, 2))).input_convolution \
        == ["0.weight"]
    for model in (
        nn.Sequential(nn.Linear(4, 4), nn.Unflatten(1, (1, 2, 2)), nn.Conv2d(1, 2, 1)),  # a Linear first
        nn.Sequential(nn.Conv1d(4, 8, 3), nn.Conv1d(8, 8, 3)),  # sequence models: Conv1d often reads an embedding
        nn.Sequential(nn.ConvTranspose2d(4, 2, 3), nn.Conv2d(2, 2, 1)),  # a decoder reads a code
    ):
        selection = select_parameters(model)
        assert selection.input_convolution == [] and len(selection.selected) == 2


def test_a_sparse_phase_computes_with_a_dense_input_convolution_and_include_prunes_it_exactly():
    """What the model computes: forward pre-hooks read each convolution's weight in the sparse phase."""
    from lightning_dsd import DSD

    def sparse_forward(**options) -> dict[str, int]:
        torch.manual_seed(0)
        model = TinyResNet()
        dsd = DSD(model, torch.optim.SGD(model.parameters(), lr=0.1), 0.5, 1, 1, 1, log_histograms=False,
                  log_scalars=False, **options)
        dsd.step()  # the dense epoch ends: prune
        zeros: dict[str, int] = {}
        for name in ("conv1", "block.0", "block.3"):
            module = model.get_submodule(name)
            module.register_forward_pre_hook(
                lambda m, args, name=name: zeros.update({name: int((m.weight == 0).sum())}))
        model(torch.randn(2, 3, 8, 8))
        return zeros

    assert sparse_forward() == {"conv1": 0, "block.0": 288, "block.3": 288}
    assert sparse_forward(include=["*.weight"]) == {"conv1": round(0.5 * 216), "block.0": 288, "block.3": 288}


# ------------------------------------------------------------------ the override point: select_targets


def _head_only(door_class):
    """A door of ``door_class`` whose ``select_targets`` keeps only the output layer of the default targets."""

    class HeadOnly(door_class):
        def select_targets(self, model):
            chosen = super().select_targets(model)
            return dataclasses.replace(chosen, selected={n: p for n, p in chosen.selected.items() if "head" in n})

    return HeadOnly


def test_an_overridden_select_targets_decides_what_the_lightning_door_prunes():
    dsd = _head_only(DSDCallback)(0.5, 1, 1, 1)
    recorder = StepRecorder(dsd)
    with seeded():
        model = ConvLSTMNet()
    make_trainer([dsd, recorder], max_epochs=2).fit(model, make_loader())
    assert dsd.target_names == ["head.weight"] and list(recorder.masks_seen[0]) == ["head.weight"]
    assert int((model.head.weight == 0).sum()) == model.head.weight.numel() // 2
    assert int((model.lstm.weight_ih_l0 == 0).sum()) == 0 and int((model.conv.weight == 0).sum()) == 0


def test_an_overridden_select_targets_decides_what_the_loop_and_transformers_doors_prune(tmp_path):
    from hf_helpers import Tokens, arguments, gpt2
    from transformers import Trainer

    from lightning_dsd.huggingface import DSDTrainerCallback

    with seeded():
        model = nn.Sequential(nn.Linear(8, 8), nn.ReLU())
        model.add_module("head", nn.Linear(8, 2))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    dsd = _head_only(DSD)(model, optimizer, 0.5, 0, 1, 1)
    model(torch.randn(2, 8)).sum().backward()  # the first training forward prunes (dense_epochs=0)
    assert list(dsd.masks) == ["head.weight"] and int((model[0].weight == 0).sum()) == 0

    class LastBlockOnly(DSDTrainerCallback):
        def select_targets(self, model):
            chosen = super().select_targets(model)
            kept = {n: p for n, p in chosen.selected.items() if n.startswith("transformer.h.1.")}
            return dataclasses.replace(chosen, selected=kept)

    callback = LastBlockOnly(0.5, 1, 1, 1, interval="step")
    gpt = gpt2()
    Trainer(model=gpt, args=arguments(tmp_path, max_steps=2), train_dataset=Tokens(), callbacks=[callback]).train()
    assert callback.target_names and all(n.startswith("transformer.h.1.") for n in callback.target_names)
    assert int((gpt.transformer.h[0].attn.c_attn.weight == 0).sum()) == 0
    assert int((gpt.transformer.h[1].attn.c_attn.weight == 0).sum()) > 0


@pytest.mark.parametrize(("chosen", "message"), [
    (lambda model: {"head.weight": model.head.weight}, r"must return a lightning_dsd.rules.selection.Selection; it"
                                                        r" returned a dict"),
    (lambda model: Selection(selected={"head.weight": nn.Parameter(model.head.weight.detach().clone())}),
     r"chose `head.weight`, which are not parameters of the model DSD trains"),
])
def test_a_select_targets_that_returns_no_selection_of_the_models_own_parameters_is_refused(chosen, message):
    class Wrong(DSDCallback):
        def select_targets(self, model):
            return chosen(model)

    with seeded():
        model = ConvLSTMNet()
    with pytest.raises((TypeError, ValueError), match=message):
        make_trainer([Wrong(0.5, 1, 1, 1)], max_epochs=2).fit(model, make_loader())
