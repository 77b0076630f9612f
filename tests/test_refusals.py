"""Models and setups DSD cannot serve are refused at ``setup`` with one clear message, before anything trains
or the model changes; mistakes that may be intended are warned about."""

from __future__ import annotations

from types import SimpleNamespace

import lightning.pytorch as pl
import pytest
import torch
from helpers import ConvLSTMNet, make_loader, make_trainer
from lightning.pytorch.strategies import FSDPStrategy
from torch import nn
from torch.nn.parameter import is_lazy

from lightning_dsd import DSDCallback

VALID = dict(sparsity=0.5, dense_epochs=1, sparse_epochs=1, redense_epochs=1)

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


def test_fsdp1_which_flattens_parameters_is_refused_naming_the_sharded_way_to_run_dsd():
    # FSDP1 needs a GPU to reach `setup` (test_cuda.py runs it there); the check reads only the strategy.
    trainer = SimpleNamespace(strategy=FSDPStrategy())
    with pytest.raises(ValueError, match=r"Found strategy FSDPStrategy, which flattens.*ModelParallelStrategy.*"
                                         r"fully_shard.*configure_model"):
        DSDCallback(**VALID).setup(trainer, ConvLSTMNet(), "fit")  # type: ignore[arg-type]
