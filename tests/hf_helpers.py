"""What the ``transformers.Trainer`` tests share: a token dataset, models built from tiny random-init configs
(dropout off, so runs repeat bit for bit), training arguments, and callbacks that stop or record a run."""

from __future__ import annotations

from pathlib import Path

import torch
from torch.utils.data import Dataset
from transformers import (
    BertConfig,
    BertForSequenceClassification,
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForSequenceClassification,
    TrainerCallback,
    TrainingArguments,
)

from lightning_dsd.huggingface import DSDTrainerCallback

#: Where DSD's notes go.
RANK_ZERO_LOGGER = "lightning_dsd"


class Tokens(Dataset):
    """Random token sequences, as language-model examples or (``classes``) labelled for classification."""

    def __init__(self, n: int = 32, length: int = 8, vocab: int = 48, classes: int = 0, seed: int = 1) -> None:
        generator = torch.Generator().manual_seed(seed)
        self.x = torch.randint(0, vocab, (n, length), generator=generator)
        self.y = torch.randint(0, max(classes, 1), (n,), generator=generator)
        self.classes = classes

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int) -> dict:
        return {"input_ids": self.x[i], "labels": self.y[i] if self.classes else self.x[i]}


def gpt2() -> GPT2LMHeadModel:
    torch.manual_seed(0)
    return GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=16, n_head=2, vocab_size=48, n_positions=8, resid_pdrop=0.0,
                                      embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=0, eos_token_id=0))


def bert() -> BertForSequenceClassification:
    torch.manual_seed(0)
    return BertForSequenceClassification(BertConfig(
        vocab_size=48, hidden_size=16, num_hidden_layers=2, num_attention_heads=2, intermediate_size=32,
        max_position_embeddings=8, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, num_labels=3))


def llama() -> LlamaForSequenceClassification:
    torch.manual_seed(0)
    return LlamaForSequenceClassification(LlamaConfig(
        vocab_size=48, hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
        num_key_value_heads=1, max_position_embeddings=8, num_labels=3, pad_token_id=0))


def arguments(out: Path, **overrides) -> TrainingArguments:
    options = dict(output_dir=str(out), per_device_train_batch_size=4, per_device_eval_batch_size=8, learning_rate=1e-2,
                   use_cpu=True, report_to="none", save_strategy="no", disable_tqdm=True, seed=0, logging_steps=1)
    return TrainingArguments(**{**options, **overrides})


def weights(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {name: p.detach().clone() for name, p in model.named_parameters()}


class StopAt(TrainerCallback):
    """Ends training after ``step`` optimizer steps, as a crash would (the schedule is the full run's)."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == self.step:
            control.should_training_stop = True


class Recorder(TrainerCallback):
    """Sees what the Trainer's reporting integrations see: every ``on_log``, and every step's learning rate."""

    def __init__(self) -> None:
        self.logs: list[dict] = []
        self.lrs: list[float] = []

    def on_log(self, args, state, control, logs=None, **kwargs):
        self.logs.append(dict(logs or {}))

    def on_optimizer_step(self, args, state, control, optimizer=None, **kwargs):
        self.lrs.append(optimizer.param_groups[0]["lr"])


class Exactness(TrainerCallback):
    """Checks DSD where the weights are used: a forward pre-hook on each module holding a target asserts the
    pruned entries are exactly zero in every forward (training and evaluation) of a sparse phase, and after
    every optimizer step the weights and AdamW's state are zero there."""

    def __init__(self, dsd: DSDTrainerCallback) -> None:
        self.dsd = dsd
        self.forwards = {"train": 0, "eval": 0}
        self.steps = 0

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        owners = {}
        for module_name, module in model.named_modules():
            for param_name, _ in module.named_parameters(recurse=False):
                owners[f"{module_name}.{param_name}" if module_name else param_name] = module
        for name in self.dsd.target_names:
            owners[name].register_forward_pre_hook(self._hook(name, owners[name]))

    def _hook(self, name, module):
        attribute = name.rsplit(".", 1)[1]

        def check(mod, inputs):
            masks = self.dsd.masks
            if self.dsd.phase.value == "sparse":
                assert not getattr(mod, attribute)[~masks[name]].any(), f"{name}: a pruned weight is non-zero"
                self.forwards["train" if mod.training else "eval"] += 1

        return check

    def on_optimizer_step(self, args, state, control, optimizer=None, model=None, **kwargs):
        if self.dsd.phase.value != "sparse":
            return
        params = dict(model.named_parameters())
        for name, keep in self.dsd.masks.items():
            param = params[name]
            assert not param[~keep].any()
            for value in optimizer.state[param].values():
                if isinstance(value, torch.Tensor) and value.shape == param.shape:
                    assert not value[~keep].any(), f"{name}: optimizer state non-zero at a pruned entry"
        self.steps += 1


# ---------------------------------------------------------------------------------------------- packaging
