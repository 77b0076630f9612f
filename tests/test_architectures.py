"""DSD on real third-party architectures: Hugging Face ``transformers`` models built from tiny random-init
configs (nothing downloaded) and Lightning's own demo Transformer, each through every phase of a real
``Trainer`` run: the default targets the README's "Architectures tested" table promises, exact zeros after
every sparse step, N:M groups along each layer's true input dimension, the learning-rate drop, unchanged
state_dict keys and tied weights that stay tied."""

from __future__ import annotations

import ast
import logging
from pathlib import Path
from typing import Callable

import lightning.pytorch as pl
import pytest
import torch
from helpers import StepRecorder, make_trainer, seeded
from lightning.pytorch.demos import Transformer as LightningDemoTransformer
from torch import nn
from torch.utils.data import DataLoader, Dataset

import lightning_dsd
from lightning_dsd import DSDCallback
from lightning_dsd.rules.selection import select_parameters

transformers = pytest.importorskip("transformers")
transformers.logging.set_verbosity_error()

VOCAB, SEQ, HIDDEN, LAYERS = 64, 8, 16, 2


class _Batches(Dataset):
    """``n`` random batches made by ``make(generator)``, the same ones on every epoch."""

    def __init__(self, make: Callable[[torch.Generator], dict], n: int = 4) -> None:
        generator = torch.Generator().manual_seed(0)
        self.batches = [make(generator) for _ in range(n)]

    def __len__(self) -> int:
        return len(self.batches)

    def __getitem__(self, index: int) -> dict:
        return self.batches[index]


def _tokens(generator: torch.Generator) -> dict:
    ids = torch.randint(0, VOCAB, (4, SEQ), generator=generator)
    return {"input_ids": ids, "labels": ids}


def _classified_tokens(generator: torch.Generator) -> dict:
    return {"input_ids": torch.randint(0, VOCAB, (4, SEQ), generator=generator),
            "labels": torch.randint(0, 3, (4,), generator=generator)}


def _images(generator: torch.Generator) -> dict:
    return {"pixel_values": torch.randn(4, 4, 8, 8, generator=generator),
            "labels": torch.randint(0, 3, (4,), generator=generator)}


class LanguageModel(pl.LightningModule):
    """Any module called with a batch dict; a ``transformers`` model returns its own loss."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def training_step(self, batch, batch_idx):
        if isinstance(self.model, LightningDemoTransformer):
            ids = batch["input_ids"]
            return nn.functional.nll_loss(self.model(ids, ids), ids.flatten())
        return self.model(**batch).loss

    def configure_optimizers(self):
        return torch.optim.AdamW(self.parameters(), lr=1e-3, weight_decay=0.01)


def _per_layer(names: list[str], layers: int = LAYERS) -> list[str]:
    return [name.format(i) for i in range(layers) for name in names]


def gpt2():
    config = transformers.GPT2Config(vocab_size=VOCAB, n_positions=SEQ, n_embd=HIDDEN, n_layer=LAYERS, n_head=2,
                                     bos_token_id=0, eos_token_id=0)
    targets = ["transformer.wte.weight"] + _per_layer(
        ["transformer.h.{}.attn.c_attn.weight", "transformer.h.{}.attn.c_proj.weight",
         "transformer.h.{}.mlp.c_fc.weight", "transformer.h.{}.mlp.c_proj.weight"])
    return transformers.GPT2LMHeadModel(config), targets, _tokens


def bert():
    config = transformers.BertConfig(vocab_size=VOCAB, hidden_size=HIDDEN, num_hidden_layers=LAYERS,
                                     num_attention_heads=2, intermediate_size=32, max_position_embeddings=SEQ,
                                     num_labels=3)
    targets = _per_layer(
        ["bert.encoder.layer.{}.attention.self.query.weight", "bert.encoder.layer.{}.attention.self.key.weight",
         "bert.encoder.layer.{}.attention.self.value.weight", "bert.encoder.layer.{}.attention.output.dense.weight",
         "bert.encoder.layer.{}.intermediate.dense.weight", "bert.encoder.layer.{}.output.dense.weight"]
    ) + ["bert.pooler.dense.weight", "classifier.weight"]
    return transformers.BertForSequenceClassification(config), targets, _classified_tokens


def llama():
    config = transformers.LlamaConfig(vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=32,
                                      num_hidden_layers=LAYERS, num_attention_heads=2, num_key_value_heads=1,
                                      max_position_embeddings=SEQ, tie_word_embeddings=False)
    targets = _per_layer(
        ["model.layers.{}.self_attn.q_proj.weight", "model.layers.{}.self_attn.k_proj.weight",
         "model.layers.{}.self_attn.v_proj.weight", "model.layers.{}.self_attn.o_proj.weight",
         "model.layers.{}.mlp.gate_proj.weight", "model.layers.{}.mlp.up_proj.weight",
         "model.layers.{}.mlp.down_proj.weight"]
    ) + ["lm_head.weight"]
    return transformers.LlamaForCausalLM(config), targets, _tokens


def vit():
    config = transformers.ViTConfig(image_size=8, patch_size=4, num_channels=4, hidden_size=HIDDEN,
                                    num_hidden_layers=LAYERS, num_attention_heads=2, intermediate_size=32,
                                    num_labels=3)
    # The patch projection (a Conv2d) reads the image: left dense by default, as the paper keeps a CNN's first layer.
    targets = _per_layer(
        ["vit.layers.{}.attention.q_proj.weight", "vit.layers.{}.attention.k_proj.weight",
         "vit.layers.{}.attention.v_proj.weight", "vit.layers.{}.attention.o_proj.weight",
         "vit.layers.{}.mlp.fc1.weight", "vit.layers.{}.mlp.fc2.weight"]
    ) + ["classifier.weight"]
    return transformers.ViTForImageClassification(config), targets, _images


def lightning_demo_transformer():
    model = LightningDemoTransformer(vocab_size=VOCAB, ninp=HIDDEN, nhead=2, nhid=32, nlayers=1)
    targets = [
        "transformer.encoder.layers.0.self_attn.in_proj_weight",
        "transformer.encoder.layers.0.self_attn.out_proj.weight",
        "transformer.encoder.layers.0.linear1.weight", "transformer.encoder.layers.0.linear2.weight",
        "transformer.decoder.layers.0.self_attn.in_proj_weight",
        "transformer.decoder.layers.0.self_attn.out_proj.weight",
        "transformer.decoder.layers.0.multihead_attn.in_proj_weight",
        "transformer.decoder.layers.0.multihead_attn.out_proj.weight",
        "transformer.decoder.layers.0.linear1.weight", "transformer.decoder.layers.0.linear2.weight", "decoder.weight",
    ]
    return model, targets, _tokens


ARCHITECTURES = {"gpt2": gpt2, "bert": bert, "llama": llama, "vit": vit, "lightning-demo": lightning_demo_transformer}
#: The input dimension of every default target, by layer class (GPT-2's Conv1D stores (in, out)).
INPUT_DIM_OF = {"Conv1D": 0}


class LearningRates(pl.Callback):
    def __init__(self) -> None:
        self.lrs: list[float] = []

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        self.lrs.append(optimizer.param_groups[0]["lr"])


@pytest.mark.parametrize("architecture", ARCHITECTURES)
def test_every_phase_on_a_real_architecture(architecture, caplog):
    with seeded():
        model, expected_targets, make_batch = ARCHITECTURES[architecture]()
    module = LanguageModel(model)
    keys_before = list(module.state_dict())
    dsd = DSDCallback((0.5, "2:4"), dense_epochs=2, sparse_epochs=3, redense_epochs=2, interval="step")
    recorder, lrs = StepRecorder(dsd), LearningRates()
    loader = DataLoader(_Batches(make_batch), batch_size=None)
    with caplog.at_level(logging.INFO, logger="lightning_dsd"):
        make_trainer([dsd, recorder, lrs], max_epochs=-1, max_steps=12).fit(module, loader)

    # The default targets are the ones the README's table promises.
    assert dsd.target_names == ["model." + name for name in expected_targets]
    assert "DSD prunes" in caplog.text and "Left dense by default" in caplog.text
    if architecture == "vit":
        assert ("Left dense by default: the convolution that reads the input"
                " (model.vit.embeddings.patch_embeddings.projection.weight)") in caplog.text

    # Exact pruning: zeros after every optimizer step; round(s*N) per tensor, then 2 of every 4 inputs.
    assert [phase for phase, _, _ in recorder.steps] == ["dense"] * 2 + (["sparse"] * 3 + ["redense"] * 2) * 2
    assert all(zeros for _, _, zeros in recorder.steps)
    for name, mask in recorder.masks_seen[0].items():
        assert int((~mask).sum()) == round(0.5 * mask.numel()), name
    for name, mask in recorder.masks_seen[1].items():
        input_dim = INPUT_DIM_OF.get(dsd.selection.layer_types[name], 1)
        assert dsd.selection.input_dims[name] == input_dim
        groups = mask.movedim(input_dim, -1).reshape(-1, 4)
        assert bool((groups.sum(dim=1) == 2).all()), name

    # The learning rate drops by lr_scale at each re-dense.
    assert lrs.lrs[:5] == [1e-3] * 5
    assert lrs.lrs[5:10] == pytest.approx([1e-4] * 5)
    assert lrs.lrs[10:] == pytest.approx([1e-5] * 2)

    # The final model is the plain model: same keys, strict load into a fresh one.
    assert list(module.state_dict()) == keys_before
    with seeded():
        plain = ARCHITECTURES[architecture]()[0]
    plain.load_state_dict(model.state_dict(), strict=True)


def test_gpt2_tied_embedding_is_pruned_once_as_the_output_layer_and_stays_tied(caplog):
    with seeded():
        model, _, make_batch = gpt2()
    dsd = DSDCallback(0.5, dense_epochs=1, sparse_epochs=2, redense_epochs=1, interval="step")
    recorder = StepRecorder(dsd)
    with caplog.at_level(logging.INFO, logger="lightning_dsd"):
        make_trainer([dsd, recorder], max_epochs=-1, max_steps=4).fit(
            LanguageModel(model), DataLoader(_Batches(make_batch), batch_size=None))
    assert model.lm_head.weight is model.transformer.wte.weight
    assert dsd.target_names.count("model.transformer.wte.weight") == 1
    assert "model.lm_head.weight" not in dsd.target_names
    tied = ["model.transformer.wte.weight", "model.lm_head.weight"]
    assert dsd.selection.tied == {"model.transformer.wte.weight": tied}
    assert dsd.selection.left_out == {"Embedding": ["model.transformer.wpe.weight"]}
    assert "Conv1D x8" in caplog.text
    assert "Tied, pruned once and kept tied: model.transformer.wte.weight = model.lm_head.weight" in caplog.text
    assert "Left dense by default: Embedding x1 (model.transformer.wpe.weight)" in caplog.text
    assert all(zeros for _, _, zeros in recorder.steps)


def test_bert_embeddings_are_left_dense_and_can_be_opted_in_with_include():
    with seeded():
        model = bert()[0]
    embeddings = ["bert.embeddings.word_embeddings.weight", "bert.embeddings.position_embeddings.weight",
                  "bert.embeddings.token_type_embeddings.weight"]
    assert select_parameters(model).left_out["Embedding"] == embeddings
    included = select_parameters(model, include=["bert.embeddings.word_embeddings.*"])
    assert list(included.selected) == embeddings[:1] and included.input_dims == {embeddings[0]: 1}


def test_transformers_layers_are_recognised_by_name_so_only_the_transformers_door_imports_transformers():
    class Conv1D(nn.Module):  # what transformers.pytorch_utils.Conv1D looks like from outside
        def __init__(self) -> None:
            super().__init__()
            self.weight = nn.Parameter(torch.zeros(3, 5))

    Conv1D.__module__, Conv1D.__qualname__ = "transformers.pytorch_utils", "Conv1D"
    selection = select_parameters(nn.Sequential(Conv1D()))
    assert selection.input_dims == {"0.weight": 0} and selection.layer_types == {"0.weight": "Conv1D"}
    package = Path(lightning_dsd.__file__).parent
    door = package / "doors" / "transformers"  # the transformers door, behind the `transformers` extra
    sources = list(package.rglob("*.py"))
    assert package / "rules" / "selection.py" in sources
    for source in sources:
        if door in source.parents:
            continue
        for node in ast.walk(ast.parse(source.read_text())):
            imported = [a.name for a in node.names] if isinstance(node, ast.Import) else (
                [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
            assert not any(name.split(".")[0] == "transformers" for name in imported), source.name
