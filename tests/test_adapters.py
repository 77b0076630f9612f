"""DSD on adapters: a real PEFT LoRA model (``peft.get_peft_model`` on a tiny random-init Llama) trained with
``transformers.Trainer`` and ``DSDTrainerCallback``, read where the forward pass uses the weights; and the rule
behind it, on plain models, under both scopes and N:M: a target whose entries all have one magnitude (LoRA's
zero-initialised ``lora_B`` before any step) cannot be ranked, so it stays dense for that cycle, said in the
summary, the transition note, a warning and the checkpoint's ``left_dense``."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import torch
from torch import nn
from torch.utils.data import Dataset

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")
from transformers import LlamaConfig, LlamaForCausalLM, Trainer, TrainerCallback, TrainingArguments  # noqa: E402

from lightning_dsd import DSD  # noqa: E402
from lightning_dsd.doors.transformers import DSDTrainerCallback  # noqa: E402
from lightning_dsd.doors.transformers.checkpoints import STATE_FILE  # noqa: E402

RANK_ZERO_LOGGER = "lightning_dsd"
PREFIX = "base_model.model.model.layers"


class Tokens(Dataset):
    def __init__(self, n: int = 16, length: int = 8, vocab: int = 48) -> None:
        self.x = torch.randint(0, vocab, (n, length), generator=torch.Generator().manual_seed(1))

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int) -> dict:
        return {"input_ids": self.x[i], "labels": self.x[i]}


def lora_llama() -> nn.Module:
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=48, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                                         num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=8))
    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], lora_dropout=0.0)
    return peft.get_peft_model(model, config)


def module_numel(name: str) -> int:
    """The size of a LoRA ``lora_B`` of this model: (out, r), q_proj 16 outputs, v_proj 8."""
    return (16 if "q_proj" in name else 8) * 4


class SparseForwards(TrainerCallback):
    """A forward pre-hook on every LoRA matrix and base layer records, in each sparse-phase forward, how many
    entries of the weight the module computes with are exactly zero."""

    def __init__(self, model: nn.Module, dsd: DSDTrainerCallback) -> None:
        self.dsd, self.zeros = dsd, {}
        for name, module in model.named_modules():
            if isinstance(module, nn.Linear) and (".lora_" in name or name.endswith(("base_layer", "k_proj"))):
                module.register_forward_pre_hook(self._hook(name))

    def _hook(self, name: str):
        def record(module, args):
            if self.dsd.phase.value == "sparse":
                self.zeros.setdefault(name, []).append(int((module.weight == 0).sum()))
        return record


def _train(out: Path, dense_epochs: int, caplog) -> tuple[DSDTrainerCallback, SparseForwards]:
    model = lora_llama()
    dsd = DSDTrainerCallback(0.5, dense_epochs, 2, 1, interval="step")
    probe = SparseForwards(model, dsd)
    args = TrainingArguments(output_dir=str(out), per_device_train_batch_size=4, learning_rate=1e-2, use_cpu=True,
                             report_to="none", save_strategy="steps", save_steps=1, disable_tqdm=True, seed=0,
                             max_steps=dense_epochs + 3)
    with caplog.at_level(logging.INFO, logger=RANK_ZERO_LOGGER):
        Trainer(model=model, args=args, train_dataset=Tokens(), callbacks=[dsd, probe]).train()
    return dsd, probe


def test_lora_with_dense_epochs_0_prunes_lora_a_leaves_the_zero_lora_b_and_the_frozen_base_dense_and_says_so(
    tmp_path, caplog
):
    with pytest.warns(UserWarning, match=r"left .*lora_B.* dense in this sparse phase: .* same magnitude, so"
                                         r" magnitude cannot rank them .*`dense_epochs` >= 1"):
        dsd, probe = _train(tmp_path, 0, caplog)
    messages = [r.getMessage() for r in caplog.records]
    (summary,) = [m for m in messages if m.startswith("DSD prunes")]
    assert summary.startswith("DSD prunes 4 tensors (256 weights): Linear x4. Left dense because frozen: Linear x15 (")
    assert "Left dense because every weight has magnitude 0: Linear x4 (" in summary
    (note,) = [m for m in messages if "sparse phase. Pruned" in m]
    assert "Pruned 128/256 weights" in note
    assert f"{PREFIX}.0.self_attn.q_proj.lora_B.default.weight (every weight has magnitude 0)" in note
    assert f"{PREFIX}.0.self_attn.q_proj.base_layer.weight (frozen)" in note

    # What the model computed with in every sparse forward: lora_A exactly half zeros; lora_B dense (zero at the
    # first step, then trained away from zero, never masked back); the frozen base untouched.
    for name, zeros in probe.zeros.items():
        if ".lora_A." in name:
            assert set(zeros) == {32}, name  # round(0.5 * 4 * 16)
        elif ".lora_B." in name:
            assert zeros[0] == module_numel(name) and zeros[-1] == 0, name  # first forward: no step yet
        else:
            assert set(zeros) == {0}, name
    assert len(probe.zeros) == 4 + 4 + 6

    checkpoint = torch.load(tmp_path / "checkpoint-1" / STATE_FILE, weights_only=False)
    left_dense = checkpoint["left_dense"] if "left_dense" in checkpoint else checkpoint["dsd"]["left_dense"]
    assert left_dense[f"{PREFIX}.1.self_attn.v_proj.lora_B.default.weight"] == "every weight has magnitude 0"
    assert left_dense[f"{PREFIX}.1.self_attn.v_proj.base_layer.weight"] == "frozen"


def test_lora_after_a_dense_step_prunes_both_adapter_matrices_and_only_the_frozen_base_stays_dense(tmp_path, caplog):
    dsd, probe = _train(tmp_path, 1, caplog)
    (summary,) = [r.getMessage() for r in caplog.records if r.getMessage().startswith("DSD prunes")]
    assert summary.startswith("DSD prunes 8 tensors (448 weights): Linear x8. Left dense because frozen: Linear x15")
    assert "magnitude 0" not in summary
    for name, zeros in probe.zeros.items():
        numel = {"lora_A": 64, "q_proj.lora_B": 64, "v_proj.lora_B": 32}
        expected = next((n // 2 for key, n in numel.items() if key in name), 0)
        assert set(zeros) == {expected}, name


def _zero_head_net() -> nn.Sequential:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 4))
    nn.init.zeros_(model[4].weight)
    return model


@pytest.mark.parametrize("sparsity, scope", [(0.5, "layer"), (0.5, "global"), ("2:4", "layer")])
def test_an_all_zero_target_stays_dense_under_every_scope_and_pattern_and_the_rest_is_pruned_exactly(
    sparsity, scope, caplog
):
    model = _zero_head_net()
    dsd = DSD(model, torch.optim.SGD(model.parameters(), lr=0.1), sparsity, 0, 2, 1, scope=scope,
              log_histograms=False, log_scalars=False)
    with pytest.warns(UserWarning, match=r"left `4.weight` dense"), \
            caplog.at_level(logging.INFO, logger=RANK_ZERO_LOGGER):
        dsd.step()  # dense_epochs=0: the sparse phase began before this first epoch
    assert dsd.phase.value == "sparse" and sorted(dsd.masks) == ["0.weight", "2.weight"]
    assert sum(int((~mask).sum()) for mask in dsd.masks.values()) == 64  # half of the 128 that magnitude ranks
    assert "Left dense in this cycle: 4.weight (every weight has magnitude 0)." in caplog.text
    state = dsd.state_dict()
    twin = _zero_head_net()
    resumed = DSD(twin, torch.optim.SGD(twin.parameters(), lr=0.1), sparsity, 0, 2, 1, scope=scope,
                  log_histograms=False, log_scalars=False)
    resumed.load_state_dict(state)  # the checkpoint's `left_dense` explains the missing mask
    assert sorted(resumed.masks) == ["0.weight", "2.weight"]


def test_a_constant_nonzero_target_is_not_ranked_either_but_a_tensor_with_two_magnitudes_is():
    model = _zero_head_net()
    with torch.no_grad():
        model[4].weight.fill_(-0.25)
        model[2].weight.fill_(0.25)
        model[2].weight[0, 0] = 0.5  # one entry differs: magnitude ranks the tensor (ties by position)
    dsd = DSD(model, torch.optim.SGD(model.parameters(), lr=0.1), 0.5, 0, 2, 1, log_histograms=False,
              log_scalars=False)
    with pytest.warns(UserWarning, match=r"left `4.weight` dense"):
        dsd.step()
    assert sorted(dsd.masks) == ["0.weight", "2.weight"] and bool(dsd.masks["2.weight"][0, 0])
