"""Bad input is refused with a message naming the argument, the value and what is allowed,
before anything trains or the model changes."""

from __future__ import annotations

import lightning.pytorch as pl
import pytest
import torch
from conftest import ConvLSTMNet, make_loader, make_trainer
from torch import nn
from torch.nn.parameter import is_lazy

from lightning_dsd import DSDCallback
from lightning_dsd.selection import LayerSpec

VALID = dict(sparsity=0.5, dense_epochs=1, sparse_epochs=1, redense_epochs=1)

CONSTRUCTION_ERRORS = [
    (dict(sparsity=0.0), ValueError, r"`sparsity` must be a float in \(0, 1\).*Found: 0.0"),
    (dict(sparsity=1.0), ValueError, r"`sparsity`.*Found: 1.0"),
    (dict(sparsity=-0.2), ValueError, r"`sparsity`.*Found: -0.2"),
    (dict(sparsity=float("nan")), ValueError, r"`sparsity`.*Found: nan"),
    (dict(sparsity="0.5"), ValueError, r"`sparsity`.*Found: '0.5'"),
    (dict(sparsity=True), ValueError, r"`sparsity`.*Found: True"),
    (dict(sparsity=[]), ValueError, r"`sparsity`.*empty sequence"),
    (dict(sparsity=(0.5, 1.2)), ValueError, r"`sparsity`.*Found: 1.2"),
    (dict(dense_epochs=-1), ValueError, r"`dense_epochs` must be an int >= 0, or None.*Found: -1"),
    (dict(sparse_epochs=2.5), ValueError, r"`sparse_epochs` must be an int >= 0.*Found: 2.5"),
    (dict(redense_epochs="3"), ValueError, r"`redense_epochs`.*Found: '3'"),
    (dict(dense_epochs=None), ValueError, r"`dense_epochs` = None.*`monitor` must name a logged metric"),
    (dict(interval="batch"), ValueError, r"`interval` must be one of \['epoch', 'step'\]. Found: 'batch'"),
    (dict(mode="maximize"), ValueError, r"`mode` must be one of \['min', 'max'\]. Found: 'maximize'"),
    (dict(scope="model"), ValueError, r"`scope` must be one of \['layer', 'global'\]. Found: 'model'"),
    (dict(patience=-1), ValueError, r"`patience` must be an int >= 0. Found: -1"),
    (dict(min_delta=float("inf")), ValueError, r"`min_delta` must be a finite number. Found: inf"),
    (dict(lr_scale=0), ValueError, r"`lr_scale` must be a finite number > 0. Found: 0"),
    (dict(lr_scale=-0.1), ValueError, r"`lr_scale`.*Found: -0.1"),
    (dict(include=[]), ValueError, r"`include` must be None, a glob pattern string.*Found: \[\]"),
    (dict(exclude=[3]), ValueError, r"`exclude`.*Found: \[3\]"),
    (dict(monitor=""), ValueError, r"`monitor` must be None or the name of a logged metric. Found: ''"),
    (dict(stop_at_end="yes"), TypeError, r"`stop_at_end` must be a bool. Found: 'yes'"),
    (dict(sparsity="4:2"), ValueError, r"`sparsity`.*'N:M'.*Found: '4:2' \(an N:M pattern needs integers 0 < N < M"),
    (dict(sparsity="2-4"), ValueError, r"`sparsity`.*Found: '2-4'"),
    (dict(layer_sparsity={"lstm.*": 1.5}), ValueError, r"`layer_sparsity` must map.*Found: 1.5"),
    (dict(layer_sparsity=[0.5]), ValueError, r"`layer_sparsity` must map.*Found: \[0.5\]"),
    (dict(layer_sparsity={"a.*": 0.5}, scope="global"), ValueError, r"`scope='global'`.*neither `layer_sparsity`"),
    (dict(sparsity="2:4", scope="global"), ValueError, r"`scope='global'`.*nor 'N:M' patterns"),
    (dict(export_sparse="onnx"), ValueError, r"`export_sparse` must be one of \['checkpoint', 'sparse'\]. Found: 'onnx'"),  # noqa: E501
    (dict(redense_init="he"), ValueError, r"`redense_init` must be one of \['zero', 'small_normal'\]. Found: 'he'"),
    (dict(seed=-1), ValueError, r"`seed` must be an int >= 0. Found: -1"),
    (dict(histogram_every_n_epochs=0), ValueError, r"`histogram_every_n_epochs` must be None or an int >= 1"),
    (dict(figure_layers=-1), ValueError, r"`figure_layers` must be an int >= 0 or glob patterns. Found: -1"),
    (dict(mask_storage="uint8"), ValueError, r"`mask_storage` must be one of \['weight_dtype', 'bool'\]"),
    (dict(log_histograms=1), TypeError, r"`log_histograms` must be a bool. Found: 1"),
    (dict(layer_types=[nn.Linear]), ValueError, r"`layer_types` must map nn.Module subclasses.*Found: \[<class"),
    (dict(layer_types={nn.Linear: 0}), ValueError, r"`layer_types` must map.*Found the entry <class.*Linear'>: 0"),
    (dict(layer_types={"Conv1D": LayerSpec()}), ValueError, r"`layer_types` must map.*Found the entry 'Conv1D'"),
]


@pytest.mark.parametrize("kwargs, message", [
    (dict(weights="weight"), r"`LayerSpec.weights` must be a tuple of parameter-name patterns. Found: 'weight'"),
    (dict(input_dim=-1), r"`LayerSpec.input_dim` must be an int >= 0. Found: -1"),
])
def test_bad_layer_specs_are_refused(kwargs, message):
    with pytest.raises(ValueError, match=message):
        LayerSpec(**kwargs)


@pytest.mark.parametrize("overrides, error, message", CONSTRUCTION_ERRORS, ids=[str(c[0]) for c in CONSTRUCTION_ERRORS])
def test_bad_arguments_are_refused_at_construction(overrides, error, message):
    with pytest.raises(error, match=message):
        DSDCallback(**{**VALID, **overrides})


class NothingToPrune(pl.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(4)
        self.bias = nn.Parameter(torch.zeros(4))

    def training_step(self, batch, batch_idx):
        return self.norm(batch[0].mean(-1)).sum() + self.bias.sum()

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


class LazyHead(ConvLSTMNet):
    def __init__(self) -> None:
        super().__init__()
        self.head = nn.LazyLinear(3)


class SparseEmbedding(ConvLSTMNet):
    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(5, 4, sparse=True)


SETUP_ERRORS = [
    (ConvLSTMNet, dict(include=["encoder.*"]), r"nothing to prune with include=\['encoder.\*'\].*'conv.weight'"),
    (ConvLSTMNet, dict(exclude=["*"]), r"nothing to prune.*exclude=\['\*'\]"),
    (NothingToPrune, dict(), r"nothing to prune.*parameters are: \['bias', 'norm.weight', 'norm.bias'\]"),
    (LazyHead, dict(), r"\['head.weight', 'head.bias'\] belong to lazy modules.*forward pass.*example_input_array"),
    (SparseEmbedding, dict(include=["embed.weight"]), r"cannot prune \['embed.weight'\]: the embedding has `sparse"),
]


@pytest.mark.parametrize(
    "model_class, overrides, message", SETUP_ERRORS, ids=[str(c[1]) or c[0].__name__ for c in SETUP_ERRORS]
)
def test_models_with_nothing_to_prune_are_refused_before_training_changes_them(model_class, overrides, message):
    model = model_class()
    before = {k: v.clone() for k, v in model.state_dict().items() if not is_lazy(v)}
    with pytest.raises(ValueError, match=message):
        make_trainer([DSDCallback(**{**VALID, **overrides})]).fit(model, make_loader())
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items() if k in before)


def test_a_lazy_module_is_shaped_by_example_input_array_and_then_pruned():
    model = LazyHead()
    model.example_input_array = torch.randn(2, 4, 12)
    dsd = DSDCallback(**VALID)
    make_trainer([dsd], max_epochs=3).fit(model, make_loader())
    assert "head.weight" in dsd.target_names and model.head.weight.shape == (3, 16)


def test_a_second_fit_with_a_finished_callback_is_refused_and_says_how_to_run_dsd_again(tmp_path):
    model, dsd = ConvLSTMNet(), DSDCallback(**VALID)
    first = make_trainer([dsd], max_epochs=3)
    first.fit(model, make_loader())
    first.save_checkpoint(tmp_path / "end.ckpt")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(RuntimeError, match=r"already ran its whole schedule.*new DSDCallback.*ckpt_path"):
        make_trainer([dsd], max_epochs=3).fit(model, make_loader())
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    # Resuming through a checkpoint is the documented way on: the same instance then takes the saved state.
    make_trainer([dsd], max_epochs=4).fit(model, make_loader(), ckpt_path=tmp_path / "end.ckpt")
    assert dsd.phase.value == "redense"


@pytest.mark.parametrize("option, value, message", [
    ("exclude", ["conv.wieght"], r"`exclude` pattern 'conv.wieght' matches no parameter. Nearest.*\['conv.weight'\]"),
    ("include", ["head.weight", "haed.*"], r"`include` pattern 'haed.\*' matches no parameter"),
    ("layer_sparsity", {"lstm2.*": 0.8}, r"`layer_sparsity` pattern 'lstm2.\*' matches no parameter"),
    ("histogram_layers", ["norm.*"], r"`histogram_layers` pattern 'norm.\*' matches no parameter"),
    ("figure_layers", ["fc.*"], r"`figure_layers` pattern 'fc.\*' matches no parameter"),
])
def test_a_pattern_that_matches_nothing_is_warned_about_with_the_nearest_names(option, value, message):
    with pytest.warns(UserWarning, match=message):
        make_trainer([DSDCallback(**{**VALID, option: value})], max_epochs=1).fit(ConvLSTMNet(), make_loader())
