"""Each run-level rule behaves the same in every door: ``DSDCallback`` (Lightning), ``DSD`` (plain and Fabric loops)
and ``DSDTrainerCallback`` (``transformers.Trainer``), each rule decided once (``DSDEngine`` or ``door.py``) and
tested here through each door with the real library: a phase that waits for a metric nobody computes, a missing
``monitor``, a restored state that contradicts its checkpoint, lazy modules, and a schedule the training cannot fit
(fractional ``num_train_epochs`` included)."""

from __future__ import annotations

import re
import warnings
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
from helpers import ConvLSTMNet, make_loader, make_trainer
from torch import nn
from torch.utils.data import Dataset

from lightning_dsd import DSD, DSDCallback, Phase

transformers = pytest.importorskip("transformers")
from transformers import GPT2Config, GPT2LMHeadModel, Trainer, TrainerCallback, TrainingArguments  # noqa: E402

from lightning_dsd.doors.transformers import DSDTrainerCallback  # noqa: E402
from lightning_dsd.doors.transformers.checkpoints import STATE_FILE  # noqa: E402
from lightning_dsd.rules.state import CheckpointStateError  # noqa: E402


class Tokens(Dataset):
    """``n`` random token sequences, as language-model examples."""

    def __init__(self, n: int) -> None:
        self.x = torch.randint(0, 48, (n, 8), generator=torch.Generator().manual_seed(1))

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int) -> dict:
        return {"input_ids": self.x[i], "labels": self.x[i]}


def gpt2() -> GPT2LMHeadModel:
    torch.manual_seed(0)
    return GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=48, n_positions=8, resid_pdrop=0.0,
                                      embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=0, eos_token_id=0))


def arguments(out: Path, **overrides) -> TrainingArguments:
    options = dict(output_dir=str(out), per_device_train_batch_size=2, learning_rate=1e-2, use_cpu=True,
                   report_to="none", save_strategy="no", disable_tqdm=True, seed=0)
    return TrainingArguments(**{**options, **overrides})


def weights(model: nn.Module) -> dict[str, torch.Tensor]:
    return {name: p.detach().clone() for name, p in model.named_parameters()}


class PhasePerStep(TrainerCallback):
    """The phase each optimizer step of the Trainer ran in."""

    def __init__(self, dsd: DSDTrainerCallback) -> None:
        self.dsd, self.phases = dsd, []

    def on_optimizer_step(self, args, state, control, **kwargs):
        self.phases.append(self.dsd.phase.value)


def schedule_warnings(caught) -> list[str]:
    return [str(w.message) for w in caught if "The DSD schedule needs" in str(w.message)]


# ---------------------------------------------------------------------------- a metric that is never computed


def test_transformers_refuses_a_phase_waiting_for_eval_loss_when_the_trainer_never_evaluates(tmp_path):
    model = gpt2()
    before = weights(model)
    dsd = DSDTrainerCallback(0.5, 1, None, 1, monitor="eval_loss")
    trainer = Trainer(model=model, args=arguments(tmp_path, num_train_epochs=3), train_dataset=Tokens(4),
                      callbacks=[dsd])
    with pytest.raises(ValueError, match=r"DSDTrainerCallback: `sparse_epochs` = None runs a phase until"
                                         r" `monitor='eval_loss'` converges, but `eval_strategy='no'`.*never evaluates"
                                         r".*`eval_strategy='epoch'`.*or give that phase a length"):
        trainer.train()
    assert trainer.state.global_step == 0 and dsd.phase is Phase.DENSE
    assert all(torch.equal(w, before[n]) for n, w in weights(model).items())


def test_lightning_refuses_a_waiting_phase_whose_metric_it_would_read_only_after_a_validation_that_never_runs():
    model = ConvLSTMNet()
    before = weights(model)
    dsd = DSDCallback(0.5, 1, None, 1, monitor="val_loss")
    trainer = make_trainer([dsd], max_epochs=4, limit_val_batches=0, check_val_every_n_epoch=2)
    with pytest.raises(ValueError, match=r"DSDCallback: `sparse_epochs` = None .* runs no validation loop .*"
                                         r"`check_val_every_n_epoch=2`.* after validation: never\. Add a validation"):
        trainer.fit(model, make_loader(), make_loader(seed=1))
    assert trainer.global_step == 0
    assert all(torch.equal(w, before[n]) for n, w in weights(model).items())


class LogsTrainLoss(ConvLSTMNet):
    """No validation loop: the monitored metric is logged in ``training_step``, as a user may legitimately do."""

    validation_step = None  # type: ignore[assignment]


def test_lightning_warns_without_a_validation_loop_and_runs_on_a_metric_logged_in_training():
    dsd = DSDCallback(0.5, 1, None, 1, monitor="train_loss", min_delta=10.0, patience=0)
    phases = []

    class Phases(pl.Callback):
        def on_train_epoch_end(self, trainer, pl_module):
            phases.append(dsd.phase.value)

    with pytest.warns(UserWarning, match=r"runs no validation loop .*can only come from what the LightningModule logs"
                                         r" in training\. Log it there \(`self.log\('train_loss', ...\)`"):
        make_trainer([dsd, Phases()], max_epochs=5).fit(LogsTrainLoss(), make_loader(n=16))
    # min_delta=10, patience=0: the first check of the sparse phase improves on nothing seen, the second cannot, so
    # the metric logged in training ends the phase after two epochs.
    assert phases == ["dense", "sparse", "sparse", "redense"]


def test_the_loop_refuses_a_step_without_the_metric_before_the_pending_pruning_changes_anything():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 2))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    before = weights(model)
    dsd = DSD(model, optimizer, 0.5, 0, None, 1)  # pruned before the first training forward, or at the first step
    with pytest.raises(ValueError, match=r"The sparse phase runs until a metric converges.*`dsd.step\(val_loss\)`"):
        dsd.step()
    assert dsd.phase is Phase.DENSE and dsd.elapsed == 0 and not dsd.masks
    assert all(torch.equal(w, before[n]) for n, w in weights(model).items())
    dsd.step(1.0)  # with the metric: the pending pruning, then the check counted in the sparse phase
    assert dsd.phase is Phase.SPARSE and dsd.elapsed == 1 and int((model[0].weight == 0).sum()) == 64


# ---------------------------------------------------------------------------- one `monitor` rule


@pytest.mark.slow
def test_a_monitor_no_phase_waits_for_is_not_read_in_any_door(tmp_path):
    lightning = DSDCallback(0.5, 1, 1, 1, monitor="val_acc")  # never logged: not needed, every length is fixed
    make_trainer([lightning], max_epochs=3).fit(ConvLSTMNet(), make_loader(), make_loader(seed=1))
    hf = DSDTrainerCallback(0.5, 1, 1, 1, interval="step", monitor="eval_acc")
    args = arguments(tmp_path, max_steps=3, eval_strategy="steps", eval_steps=1)
    Trainer(model=gpt2(), args=args, train_dataset=Tokens(4), eval_dataset=Tokens(2), callbacks=[hf]).train()
    assert lightning.phase is hf.phase is Phase.REDENSE


def test_a_missing_monitor_that_a_phase_waits_for_is_refused_with_the_same_words_in_both_doors(tmp_path):
    with pytest.raises(RuntimeError) as lightning:
        make_trainer([DSDCallback(0.5, None, 1, 1, monitor="val_acc")], max_epochs=2).fit(
            ConvLSTMNet(), make_loader(), make_loader(seed=1))
    hf = DSDTrainerCallback(0.5, None, 1, 1, interval="step", monitor="eval_acc")
    args = arguments(tmp_path, max_steps=3, eval_strategy="steps", eval_steps=1)
    with pytest.raises(RuntimeError) as transformers_door:
        Trainer(model=gpt2(), args=args, train_dataset=Tokens(4), eval_dataset=Tokens(2), callbacks=[hf]).train()
    shape = r"(\w+)'s `monitor='(\w+)'` is not among the ([\w' ]+) metrics \[(.*)\]\. (.*)"
    found = [re.fullmatch(shape, str(error.value)) for error in (lightning, transformers_door)]
    assert all(found), [str(error.value) for error in (lightning, transformers_door)]
    assert [m.group(1) for m in found] == ["DSDCallback", "DSDTrainerCallback"]  # type: ignore[union-attr]
    assert "'val_loss'" in found[0].group(4) and "'eval_loss'" in found[1].group(4)  # type: ignore[union-attr]


# ---------------------------------------------------------------------------- a restored state is checked


def _interrupted_transformers_run(out: Path) -> None:
    """A DSD run (steps: dense 1-2, sparse 3-4, re-dense 5-6) saved at step 3, in its sparse phase."""
    dsd = DSDTrainerCallback(0.5, 2, 2, 2, interval="step")
    args = arguments(out, max_steps=3, save_strategy="steps", save_steps=3)
    Trainer(model=gpt2(), args=args, train_dataset=Tokens(8), callbacks=[dsd]).train()


@pytest.mark.slow
def test_transformers_refuses_a_restored_state_whose_masks_prune_weights_the_checkpoint_holds_non_zero(tmp_path):
    from safetensors.torch import load_file, save_file

    _interrupted_transformers_run(tmp_path)
    folder = tmp_path / "checkpoint-3"
    saved = torch.load(folder / STATE_FILE, weights_only=True)
    assert saved["dsd"]["schedule"]["index"] == 1 and saved["dsd"]["masks"]  # sparse, with its masks
    checkpoint = load_file(folder / "model.safetensors")
    damaged = "transformer.h.0.mlp.c_fc.weight"
    checkpoint[damaged] = torch.ones_like(checkpoint[damaged])  # the weights of another run: nothing is zero
    save_file(checkpoint, folder / "model.safetensors", metadata={"format": "pt"})

    model, dsd = gpt2(), DSDTrainerCallback(0.5, 2, 2, 2, interval="step")
    trainer = Trainer(model=model, args=arguments(tmp_path, max_steps=6), train_dataset=Tokens(8), callbacks=[dsd])
    with pytest.raises(CheckpointStateError, match=r"its masks prune weights that the checkpoint's model holds as"
                                                   rf" non-zero \(`{damaged}`: \d+\)"):
        trainer.train(resume_from_checkpoint=True)
    assert trainer.state.global_step == 3  # restored, and not one step further
    assert all(torch.equal(checkpoint[n], w) for n, w in weights(model).items() if n in checkpoint)


@pytest.mark.slow
def test_transformers_refuses_a_restored_phase_begun_after_the_checkpoints_step(tmp_path):
    _interrupted_transformers_run(tmp_path)
    path = tmp_path / "checkpoint-3" / STATE_FILE
    saved = torch.load(path, weights_only=True)
    saved["dsd"]["schedule"]["started_at"] = 5
    torch.save(saved, path)
    dsd = DSDTrainerCallback(0.5, 2, 2, 2, interval="step")
    trainer = Trainer(model=gpt2(), args=arguments(tmp_path, max_steps=6), train_dataset=Tokens(8), callbacks=[dsd])
    with pytest.raises(CheckpointStateError, match=r"`schedule.started_at` is step 5, after step 3"):
        trainer.train(resume_from_checkpoint=True)
    assert trainer.state.global_step == 3


# ---------------------------------------------------------------------------- lazy modules


class LazyCausalLM(nn.Module):
    """A model whose head is an ``nn.LazyLinear``, which no forward pass has shaped."""

    def __init__(self) -> None:
        super().__init__()
        self.embed, self.head = nn.Embedding(48, 8), nn.LazyLinear(48)

    def forward(self, input_ids, labels=None):
        logits = self.head(self.embed(input_ids))
        return {"loss": nn.functional.cross_entropy(logits.flatten(0, 1), labels.flatten()), "logits": logits}


def test_transformers_refuses_lazy_modules_when_the_trainer_is_built_with_its_own_remedy(tmp_path):
    dsd = DSDTrainerCallback(0.5, 1, 1, 1)
    with pytest.raises(ValueError, match=r"DSDTrainerCallback needs the shapes of the weights it prunes, but"
                                         r" \['head.weight', 'head.bias'\] belong to lazy modules.*Run one forward pass"
                                         r" .* before `Trainer\(model=...\)`, which takes no example input"):
        Trainer(model=LazyCausalLM(), args=arguments(tmp_path), train_dataset=Tokens(4), callbacks=[dsd])


# ---------------------------------------------------------------------------- the schedule does not fit


@pytest.mark.parametrize("epochs, phases, stops_in", [
    (1.5, ["dense"] * 2 + ["sparse"], "the sparse phase (epoch 2 of 3 runs only 0.5 of its optimizer steps)"),
    (2.5, ["dense"] * 2 + ["sparse"] * 2 + ["redense"], "the redense phase (epoch 3 of 3 runs only 0.5 of its"
     " optimizer steps)"),
])
def test_transformers_fractional_epochs_are_reported_as_given_and_the_phase_they_cut_short_is_named(
    tmp_path, epochs, phases, stops_in
):
    dsd = DSDTrainerCallback(0.5, 1, 1, 1)  # 2 optimizer steps per epoch
    recorder = PhasePerStep(dsd)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        Trainer(model=gpt2(), args=arguments(tmp_path, num_train_epochs=epochs), train_dataset=Tokens(4),
                callbacks=[dsd, recorder]).train()
    assert recorder.phases == phases  # what the Trainer ran: ceil(epochs * 2) optimizer steps
    assert schedule_warnings(caught) == [
        f"The DSD schedule needs 3 epochs (1 + 1 + 1), but the Trainer has num_train_epochs={epochs}: training will"
        f" stop in {stops_in}. Set num_train_epochs=3 to run every phase."
    ]


def test_the_schedule_warning_has_the_same_words_in_lightning_and_transformers(tmp_path):
    with warnings.catch_warnings(record=True) as lightning:
        warnings.simplefilter("always")
        make_trainer([DSDCallback(0.5, 1, 1, 1)], max_epochs=2).fit(ConvLSTMNet(), make_loader(n=16))
    with warnings.catch_warnings(record=True) as hf:
        warnings.simplefilter("always")
        Trainer(model=gpt2(), args=arguments(tmp_path, num_train_epochs=2), train_dataset=Tokens(4),
                callbacks=[DSDTrainerCallback(0.5, 1, 1, 1)]).train()
    expected = ("The DSD schedule needs 3 epochs (1 + 1 + 1), but the Trainer has max_epochs=2: training will stop in"
                " the sparse phase. Set max_epochs=3 to run every phase.")
    assert schedule_warnings(lightning) == [expected]
    assert schedule_warnings(hf) == [expected.replace("max_epochs", "num_train_epochs")]


@pytest.mark.slow
def test_a_joined_run_that_does_not_fit_says_where_the_phase_began_in_both_doors(tmp_path):
    first = make_trainer([], max_epochs=1)
    first.fit(ConvLSTMNet(), make_loader(n=16))
    first.save_checkpoint(tmp_path / "plain.ckpt")
    with warnings.catch_warnings(record=True) as lightning:
        warnings.simplefilter("always")
        make_trainer([DSDCallback(0.5, 1, 1, 1)], max_epochs=3).fit(ConvLSTMNet(), make_loader(n=16),
                                                                   ckpt_path=tmp_path / "plain.ckpt")
    args = arguments(tmp_path / "hf", max_steps=4, save_strategy="steps", save_steps=2)
    Trainer(model=gpt2(), args=args, train_dataset=Tokens(8), callbacks=[]).train()  # saved without DSD
    with warnings.catch_warnings(record=True) as hf:
        warnings.simplefilter("always")
        Trainer(model=gpt2(), args=arguments(tmp_path / "hf", max_steps=6), train_dataset=Tokens(8),
                callbacks=[DSDTrainerCallback(0.5, 1, 2, 2, interval="step")]).train(
            resume_from_checkpoint=str(tmp_path / "hf" / "checkpoint-4"))
    assert schedule_warnings(lightning) == [
        "The DSD schedule needs 4 epochs (1 + 1 + 1, the current dense phase from epoch 1), but the Trainer has"
        " max_epochs=3: training will stop in the sparse phase. Set max_epochs=4 to run every phase."]
    assert schedule_warnings(hf) == [
        "The DSD schedule needs 9 steps (1 + 2 + 2, the current dense phase from step 4), but the Trainer has"
        " max_steps=6: training will stop in the sparse phase. Set max_steps=9 to run every phase."]


def _zeros(model: nn.Module, names: list[str]) -> int:
    return sum(int((model.get_parameter(name) == 0).sum()) for name in names)


def test_every_door_ends_with_one_line_on_the_model_it_returns_its_zeros_counted_on_the_model(caplog):
    caplog.set_level("INFO", logger="lightning_dsd")
    model = ConvLSTMNet()
    dsd = DSDCallback(0.5, 1, 2, 1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the schedule does not fit: it stops inside the sparse phase, on purpose
        make_trainer([dsd], max_epochs=2).fit(model, make_loader())
    names = dsd.target_names
    total = sum(model.get_parameter(name).numel() for name in names)
    assert f"DSDCallback: the Trainer returns the model of the last step (epoch 2), in the sparse phase of cycle 0;" \
        f" its {len(names)} targeted tensors hold {_zeros(model, names)} exact zeros of {total} weights." in caplog.text
    assert _zeros(model, names) >= total // 2

    plain = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 2))
    loop = DSD(plain, torch.optim.SGD(plain.parameters(), lr=0.1), 0.5, 1, 1, 1)
    for _ in range(3):
        loop.step()
    assert loop.finished
    assert "DSD: the loop returns the model of the last step (epoch 3), in the redense phase of cycle 0; its 2" \
        f" targeted tensors hold {_zeros(plain, loop.target_names)} exact zeros of 80 weights." in caplog.text
