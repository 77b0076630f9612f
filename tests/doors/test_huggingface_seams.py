"""``DSDTrainerCallback`` where another part of ``transformers`` owns state DSD relies on: the best model the
Trainer loads at the end, weights-only checkpoints, a second Trainer resuming, hyperparameter-search folders; and
the Trainers built on ``Trainer`` (TRL's ``SFTTrainer``, ``Seq2SeqTrainer``). Real runs on tiny random-init
models, checked on the weights the returned model holds."""

from __future__ import annotations

import itertools
import logging
import os
import warnings
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

transformers = pytest.importorskip("transformers")
from hf_helpers import (  # noqa: E402
    RANK_ZERO_LOGGER,
    Exactness,
    Recorder,
    StopAt,
    Tokens,
    arguments,
    gpt2,
    weights,
)
from safetensors.torch import load_file  # noqa: E402
from transformers import EarlyStoppingCallback, Trainer, TrainerCallback  # noqa: E402

from lightning_dsd.doors.transformers import DSDTrainerCallback  # noqa: E402
from lightning_dsd.doors.transformers.checkpoints import STATE_FILE  # noqa: E402
from lightning_dsd.rules.state import CheckpointStateError  # noqa: E402


def zeros_in(model: torch.nn.Module, names: list[str]) -> int:
    params = dict(model.named_parameters())
    return sum(int((params[name] == 0).sum()) for name in names)


@contextmanager
def listening(caplog: pytest.LogCaptureFixture) -> Iterator[list[str]]:
    """Everything DSD says meanwhile: rank-zero infos (a log) and warnings (Python warnings)."""
    heard: list[str] = []
    caplog.clear()
    with caplog.at_level(logging.INFO, logger=RANK_ZERO_LOGGER), warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        yield heard
    heard += [r.getMessage() for r in caplog.records] + [str(w.message) for w in caught]


def messages(heard: list[str], text: str) -> list[str]:
    return [message for message in heard if text in message]


class Phases(TrainerCallback):
    """The DSD phase of each optimizer step, as the step ran."""

    def __init__(self, dsd: DSDTrainerCallback) -> None:
        self.dsd, self.at = dsd, {}

    def on_step_end(self, args, state, control, **kwargs):
        self.at[state.global_step] = self.dsd.phase.value


# ---------------------------------------------------------------------------------------------- the best model


def _best_model_run(out: Path, best_model_phase: str, metric: dict[int, float] | None = None, stopping: bool = False,
                    max_steps: int = 6, lr_scale: float = 0.1):
    """Steps 1-2 dense, 3-4 sparse, 5-6 re-dense (interval="step"), evaluated and saved after every step;
    ``metric`` forces the evaluation's ``eval_forced`` per step (lower is better), else ``eval_loss`` is used."""
    model = gpt2()
    dsd = DSDTrainerCallback(0.5, 2, 2, max_steps - 4, interval="step", lr_scale=lr_scale,
                             best_model_phase=best_model_phase)
    phases = Phases(dsd)
    callbacks = [dsd, phases] + ([EarlyStoppingCallback(early_stopping_patience=1)] if stopping else [])
    args = arguments(out, max_steps=max_steps, eval_strategy="steps", eval_steps=1, save_strategy="steps",
                     save_steps=1, load_best_model_at_end=True,
                     metric_for_best_model="eval_forced" if metric else "eval_loss", greater_is_better=False)
    trainer: Trainer

    def forced(_) -> dict[str, float]:
        return {"forced": metric[trainer.state.global_step]}

    trainer = Trainer(model=model, args=args, train_dataset=Tokens(), eval_dataset=Tokens(n=8, seed=2),
                      compute_metrics=forced if metric else None, callbacks=callbacks,
                      preprocess_logits_for_metrics=lambda logits, labels: logits[..., :1])
    trainer.train()
    return model, dsd, trainer, phases.at


def _check_the_report_describes_the_returned_model(heard, model, dsd, trainer, phase_of_best: str, warned: bool):
    """The model the Trainer returned holds the weights of the checkpoint it names, and the report says which one,
    its phase and the zeros the model holds, counted here on the model itself."""
    best = trainer.state.best_model_checkpoint
    saved = load_file(os.path.join(best, "model.safetensors"))
    returned = weights(model)
    assert all(torch.equal(saved[name], returned[name]) for name in saved)
    zeros = zeros_in(model, dsd.target_names)
    step = int(best.rsplit("-", 1)[1])
    report = messages(heard, "the Trainer returns its best checkpoint")
    assert len(report) == 1
    assert f"{best}, saved at step {step} in the {phase_of_best} phase of cycle 0" in report[0]
    assert f"hold {zeros} exact zeros" in report[0]
    assert ("This model is not DSD's result" in report[0]) is warned
    assert not messages(heard, "the sparse model as it is can be used as such")
    return step, zeros


@pytest.mark.slow
def test_load_best_model_at_end_on_eval_loss_picks_the_last_phase_by_default_and_any_phase_when_asked(
    tmp_path, caplog
):
    # lr_scale=1e-3 keeps the re-dense model close to the sparse one: the run's best eval_loss is a dense model.
    with listening(caplog) as heard:
        model, dsd, trainer, phases = _best_model_run(tmp_path / "any", "any", lr_scale=1e-3)
    losses = {e["step"]: e["eval_loss"] for e in trainer.state.log_history if "eval_loss" in e}
    overall_best = min(losses, key=losses.get)
    assert phases[overall_best] == "dense" and trainer.state.best_model_checkpoint.endswith(f"-{overall_best}")
    step, zeros = _check_the_report_describes_the_returned_model(heard, model, dsd, trainer, "dense", warned=True)
    assert zeros == 0 and dsd.phase.value == "redense"

    with listening(caplog) as heard:
        model, dsd, trainer, phases = _best_model_run(tmp_path / "final", "final", lr_scale=1e-3)
    assert messages(heard, "is chosen among the checkpoints of DSD's last phase only")
    step, _ = _check_the_report_describes_the_returned_model(heard, model, dsd, trainer, "redense", warned=False)
    final_losses = {s: e for s, e in losses.items() if phases[s] == "redense"}
    assert step == min(final_losses, key=final_losses.get), "the best of the last phase"
    kept = sorted(int(p.name.split("-")[1]) for p in (tmp_path / "final").glob("checkpoint-*"))
    assert kept == [1, 2, 3, 4, 5, 6]  # no limit: rotation is not the point here


@pytest.mark.parametrize("best_model_phase, loaded, phase, warned", [
    ("any", 3, "sparse", True), ("final", 5, "redense", False),
])
def test_a_best_forced_mid_sparse_is_loaded_only_with_any_and_the_report_counts_its_zeros(
    tmp_path, caplog, best_model_phase, loaded, phase, warned
):
    metric = {1: 2.0, 2: 2.0, 3: 0.0, 4: 2.0, 5: 1.0, 6: 1.0}
    with listening(caplog) as heard:
        model, dsd, trainer, _ = _best_model_run(tmp_path, best_model_phase, metric)
    assert trainer.state.best_model_checkpoint == str(tmp_path / f"checkpoint-{loaded}")
    _, zeros = _check_the_report_describes_the_returned_model(heard, model, dsd, trainer, phase, warned)
    half = sum(round(0.5 * p.numel()) for n, p in model.named_parameters() if n in dsd.target_names)
    assert (zeros >= half) is (phase == "sparse"), "a sparse checkpoint holds the pruned zeros, a re-dense one not"
    assert dsd.phase.value == "redense"


@pytest.mark.parametrize("best_model_phase", ["any", "final"])
def test_early_stopping_ends_the_run_in_the_sparse_phase_only_with_any(tmp_path, caplog, best_model_phase):
    # Better in the dense phase, worse once pruned: patience 1 stops at the first sparse evaluation, unless the
    # best-model record is held empty before the last phase; there it stops at the first evaluation that fails.
    metric = {1: 2.0, 2: 1.0, 3: 5.0, 4: 5.0, 5: 3.0, 6: 3.0, 7: 3.0}
    with listening(caplog) as heard:
        model, dsd, trainer, phases = _best_model_run(tmp_path, best_model_phase, metric, stopping=True, max_steps=7)
    if best_model_phase == "any":
        assert max(phases) == 3 and dsd.phase.value == "sparse"
        assert messages(heard, "EarlyStoppingCallback may end training before DSD's last phase")
        _check_the_report_describes_the_returned_model(heard, model, dsd, trainer, "dense", warned=True)
    else:
        assert max(phases) == 6 and dsd.phase.value == "redense"
        assert not messages(heard, "EarlyStoppingCallback may end training")
        _check_the_report_describes_the_returned_model(heard, model, dsd, trainer, "redense", warned=False)
        assert trainer.state.best_model_checkpoint.endswith("checkpoint-5")


def test_without_load_best_model_at_end_the_report_names_the_last_steps_model_and_its_zeros(tmp_path, caplog):
    model, dsd = gpt2(), DSDTrainerCallback(0.5, 1, 2, 1, interval="step")
    with listening(caplog) as heard:
        Trainer(model=model, args=arguments(tmp_path, max_steps=2), train_dataset=Tokens(), callbacks=[dsd]).train()
    zeros = zeros_in(model, dsd.target_names)
    assert zeros > 0
    report = messages(heard, "the Trainer returns the model of the last step")
    assert len(report) == 1 and f"(step 2), in the sparse phase of cycle 0; its {len(dsd.target_names)} targeted" \
        f" tensors hold {zeros} exact zeros" in report[0]
    assert messages(heard, "the sparse model as it is can be used as such")


# ---------------------------------------------------------------------------------------------- weights only


def _weights_only_trainer(out: Path, stop_at: int | None = None, save_only_model: bool = True):
    model, dsd = gpt2(), DSDTrainerCallback(0.5, 2, 3, 3, interval="step")  # sparse: steps 3-5
    callbacks = [dsd] + ([StopAt(stop_at)] if stop_at else [])
    args = arguments(out, max_steps=8, save_strategy="steps", save_steps=2, save_only_model=save_only_model)
    return model, dsd, Trainer(model=model, args=args, train_dataset=Tokens(n=48), callbacks=callbacks)


@pytest.mark.slow
def test_a_weights_only_checkpoint_is_refused_before_any_step_in_every_phase_unless_the_rate_is_never_scaled(tmp_path):
    _weights_only_trainer(tmp_path, stop_at=6)[2].train()  # checkpoint-2 dense, -4 sparse, -6 re-dense
    assert not (tmp_path / "checkpoint-6" / "optimizer.pt").exists()
    for step, phase, where in ((6, "redense", "behind it"), (4, "sparse", "ahead"), (2, "dense", "ahead")):
        # The resuming Trainer's own arguments do not say save_only_model: the checkpoint folder decides.
        model, _, trainer = _weights_only_trainer(tmp_path, save_only_model=False)
        with pytest.raises(CheckpointStateError, match=rf"checkpoint-{step} holds no optimizer and scheduler state"
                                                       rf" .*`save_only_model=True`.*the {phase} phase of cycle 0,"
                                                       rf" and DSD's re-dense phase {where} scales the rate by"
                                                       r" lr_scale=0.1"):
            trainer.train(resume_from_checkpoint=str(tmp_path / f"checkpoint-{step}"))
        assert trainer.state.global_step == step  # restored, and not one step further
        saved = load_file(tmp_path / f"checkpoint-{step}" / "model.safetensors")
        assert all(torch.equal(saved[name], w) for name, w in weights(model).items() if name in saved)

    model = gpt2()  # lr_scale=1.0: DSD never scales the rate, so the fresh schedule is the Trainer's own affair
    dsd = DSDTrainerCallback(0.5, 2, 3, 3, interval="step", lr_scale=1.0)
    masks = {}
    step_end = {"on_step_end": lambda *a, **k: masks.update(dsd.masks)}
    trainer = Trainer(model=model, args=arguments(tmp_path / "unscaled", max_steps=8, save_strategy="steps",
                                                  save_steps=2, save_only_model=True),
                      train_dataset=Tokens(n=48), callbacks=[dsd, StopAt(4)])
    trainer.train()
    dsd = DSDTrainerCallback(0.5, 2, 3, 3, interval="step", lr_scale=1.0)
    trainer = Trainer(model=gpt2(), args=arguments(tmp_path / "unscaled", max_steps=8, save_strategy="steps",
                                                   save_steps=2, save_only_model=True),
                      train_dataset=Tokens(n=48), callbacks=[dsd, type("Masks", (TrainerCallback,), step_end)()])
    trainer.train(resume_from_checkpoint=True)
    assert trainer.state.global_step == 8 and dsd.phase.value == "redense"
    assert masks, "step 5 ran sparse, with the masks of the checkpoint"


# ---------------------------------------------------------------------------------------------- a second Trainer


@pytest.mark.slow
def test_a_callback_reused_by_a_second_trainer_logs_into_that_trainer_at_its_steps(tmp_path, monkeypatch):
    dsd = DSDTrainerCallback(0.5, 2, 2, 2, interval="step")
    args = arguments(tmp_path, max_steps=6, save_strategy="steps", save_steps=2, report_to="tensorboard")
    monkeypatch.setenv("TENSORBOARD_LOGGING_DIR", str(tmp_path / "tb_first"))
    first = Trainer(model=gpt2(), args=args, train_dataset=Tokens(), callbacks=[dsd, StopAt(3)])
    first.train()
    before = [dict(entry) for entry in first.state.log_history]
    first_files = {p: p.stat().st_size for p in (tmp_path / "tb_first").iterdir()}
    monkeypatch.setenv("TENSORBOARD_LOGGING_DIR", str(tmp_path / "tb_second"))
    second = Trainer(model=gpt2(), args=args, train_dataset=Tokens(), callbacks=[dsd])
    second.train(resume_from_checkpoint=str(tmp_path / "checkpoint-2"))
    assert first.state.log_history == before, "the first Trainer's records were written to"
    assert {p: p.stat().st_size for p in (tmp_path / "tb_first").iterdir()} == first_files
    logged = {entry["step"]: entry["dsd/phase"] for entry in second.state.log_history if "dsd/phase" in entry}
    assert logged[2] == 1.0 and logged[4] == 2.0  # pruned before step 3, re-densed before step 5: its own steps
    events = EventAccumulator(str(tmp_path / "tb_second"), size_guidance={"histograms": 0})
    events.Reload()
    assert "dsd_weights/transformer.wte.weight/2_after_pruning" in events.Tags()["histograms"]
    assert "train/dsd/phase" in events.Tags()["scalars"]
    assert dsd.phase.value == "redense"


# ------------------------------------------------------------------------------------ binding the Trainer


def drive(trainer: Trainer, steps: int) -> None:
    """A loop of one's own that drives the Trainer's callbacks: no Trainer method is on the call stack of an event,
    so the stack walk finds no Trainer there."""
    args, state, control, handler = trainer.args, trainer.state, trainer.control, trainer.callback_handler
    model, loader = trainer.model, trainer.get_train_dataloader()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    handler.model, handler.optimizer, handler.train_dataloader = model, optimizer, loader
    state.max_steps, state.global_step = steps, 0
    handler.on_train_begin(args, state, control)
    for batch in itertools.islice(loader, steps):
        handler.on_step_begin(args, state, control)
        model(**batch).loss.backward()
        handler.on_pre_optimizer_step(args, state, control)
        optimizer.step()
        optimizer.zero_grad()
        state.global_step += 1
        state.epoch = state.global_step / len(loader)
        handler.on_step_end(args, state, control)
    handler.on_train_end(args, state, control)


@pytest.mark.parametrize("bound", [True, False])
def test_a_bound_trainer_gets_the_scalars_through_trainer_log_where_a_loop_of_ones_own_drives_its_callbacks(
        tmp_path, monkeypatch, bound):
    monkeypatch.setenv("TENSORBOARD_LOGGING_DIR", str(tmp_path / "tb"))
    dsd, integration = DSDTrainerCallback(0.5, 1, 1, 1, interval="step"), Recorder()
    trainer = Trainer(model=gpt2(), args=arguments(tmp_path, report_to="tensorboard"), train_dataset=Tokens(),
                      callbacks=[integration, dsd])
    if bound:
        assert dsd.bind(trainer) is dsd
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        drive(trainer, steps=3)
    logged = {entry["step"]: entry["dsd/phase"] for entry in trainer.state.log_history if "dsd/phase" in entry}
    not_found = [w for w in caught if "could not find the transformers.Trainer" in str(w.message)]
    if bound:  # through Trainer.log: the Trainer's records and every integration
        assert logged == {1: 1.0, 2: 2.0} and not not_found
        assert [log["dsd/phase"] for log in integration.logs if "dsd/phase" in log] == [1.0, 2.0]
    else:  # the stack walk found nothing: TensorBoard only, and said
        assert logged == {} and len(not_found) == 1
    assert dsd.phase.value == "redense"


def test_binding_is_refused_for_a_trainer_that_does_not_hold_the_callback(tmp_path):
    dsd = DSDTrainerCallback(0.5, 1, 1, 1)
    trainer = Trainer(model=gpt2(), args=arguments(tmp_path), train_dataset=Tokens())
    with pytest.raises(ValueError, match=r"this Trainer does not hold this callback .*`trainer.add_callback\(dsd\)`"):
        dsd.bind(trainer)
    with pytest.raises(TypeError, match="takes a transformers.Trainer; it was given str"):
        dsd.bind("trainer")  # type: ignore[arg-type]
    trainer.add_callback(dsd)
    assert dsd.bind(trainer) is dsd


def test_a_second_trainer_resuming_is_bound_explicitly_and_one_left_unbound_is_refused(tmp_path, monkeypatch):
    monkeypatch.setenv("TENSORBOARD_LOGGING_DIR", str(tmp_path / "tb"))
    dsd = DSDTrainerCallback(0.5, 2, 2, 2, interval="step")
    args = arguments(tmp_path, max_steps=6, save_strategy="steps", save_steps=2, report_to="tensorboard")
    first = Trainer(model=gpt2(), args=args, train_dataset=Tokens(), callbacks=[dsd, StopAt(3)])
    dsd.bind(first)
    first.train()
    before = [dict(entry) for entry in first.state.log_history]
    assert {entry["step"]: entry["dsd/phase"] for entry in before if "dsd/phase" in entry}[2] == 1.0  # the bound one
    second = Trainer(model=gpt2(), args=args, train_dataset=Tokens(), callbacks=[dsd])
    with pytest.raises(RuntimeError, match=r"bound \(`dsd.bind\(trainer\)`\) to a Trainer that is not the one"
                                           r" training now"):  # still bound to the first: refused, not written to
        second.train(resume_from_checkpoint=str(tmp_path / "checkpoint-2"))
    assert first.state.log_history == before
    dsd.bind(second)
    second.train(resume_from_checkpoint=str(tmp_path / "checkpoint-2"))
    assert first.state.log_history == before, "the first Trainer's records were written to"
    logged = {entry["step"]: entry["dsd/phase"] for entry in second.state.log_history if "dsd/phase" in entry}
    assert logged[2] == 1.0 and logged[4] == 2.0  # pruned before step 3, re-densed before step 5: its own steps
    assert dsd.phase.value == "redense"


# ---------------------------------------------------------------------------------------------- trial folders


class PhasesPerTrial(TrainerCallback):
    """The DSD phase of each optimizer step, one list per `train()` (each trial of a search)."""

    def __init__(self, dsd: DSDTrainerCallback) -> None:
        self.dsd, self.seen = dsd, []

    def on_train_begin(self, args, state, control, **kwargs):
        self.seen.append([])

    def on_step_end(self, args, state, control, **kwargs):
        self.seen[-1].append(self.dsd.phase.value)


@pytest.mark.slow
def test_a_hyperparameter_search_runs_the_whole_schedule_in_every_trial_and_saves_into_each_trials_folder(tmp_path):
    pytest.importorskip("optuna")
    dsd = DSDTrainerCallback(0.5, 1, 2, 1, interval="step")
    phases = PhasesPerTrial(dsd)
    trainer = Trainer(model_init=gpt2, args=arguments(tmp_path, max_steps=4, save_strategy="steps", save_steps=2),
                      train_dataset=Tokens(), eval_dataset=Tokens(n=8), callbacks=[dsd, phases])
    trainer.hyperparameter_search(
        hp_space=lambda trial: {"learning_rate": trial.suggest_float("learning_rate", 1e-3, 1e-2, log=True)},
        backend="optuna", n_trials=2, direction="minimize")
    assert phases.seen == [["dense", "sparse", "sparse", "redense"]] * 2  # each trial, from its start
    for trial in ("run-0", "run-1"):  # Trainer._get_output_dir: output_dir/run-<trial.number>
        folder = tmp_path / trial
        assert sorted(p.name for p in folder.glob("checkpoint-*")) == ["checkpoint-2", "checkpoint-4"]
        saved = torch.load(folder / "checkpoint-2" / STATE_FILE, weights_only=True)
        assert saved["global_step"] == 2 and saved["dsd"]["masks"]
    assert not list(tmp_path.glob("checkpoint-*"))


def test_a_checkpoint_folder_dsd_cannot_find_is_warned_about_once_with_the_folder_looked_for(tmp_path):
    class Elsewhere(Trainer):  # a subclass that saves its checkpoints somewhere of its own
        def _save_checkpoint(self, model, trial):
            self.save_model(str(tmp_path / "elsewhere" / f"step-{self.state.global_step}"), _internal_call=True)

    dsd = DSDTrainerCallback(0.5, 1, 2, 1, interval="step")
    trainer = Elsewhere(model=gpt2(), args=arguments(tmp_path, max_steps=4, save_strategy="steps", save_steps=1),
                        train_dataset=Tokens(), callbacks=[dsd])
    with pytest.warns(UserWarning, match=r"there is no folder .*checkpoint-1, so DSD's state \(dsd_state.pt\) is not"
                                         r" saved with it") as caught:
        trainer.train()
    assert len([w for w in caught if "did not find the checkpoint" in str(w.message)]) == 1


# ------------------------------------------------------------------------------------------ built on Trainer


WORDS = [f"w{i}" for i in range(29)]


def word_tokenizer():
    """A word-level tokenizer built here (nothing downloaded): ids 0-2 are pad, eos and unk."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"[PAD]": 0, "[EOS]": 1, "[UNK]": 2, **{word: i + 3 for i, word in enumerate(WORDS)}}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, pad_token="[PAD]", eos_token="[EOS]",
                                   unk_token="[UNK]")


class ExactInGenerate(Exactness):
    """:class:`Exactness`, counting also the forwards that ``model.generate`` makes in a sparse phase."""

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        super().on_train_begin(args, state, control, model=model, **kwargs)
        self.forwards["generate"], generate, checked = 0, model.generate, self

        def counted(*args, **kwargs):
            before = checked.forwards["eval"]
            output = generate(*args, **kwargs)
            checked.forwards["generate"] += checked.forwards["eval"] - before
            return output

        model.generate = counted


def _lr_ratios(dsd_lrs: list[float], plain_lrs: list[float], redense_from: int) -> list[float]:
    assert len(dsd_lrs) == len(plain_lrs) and dsd_lrs[:redense_from] == plain_lrs[:redense_from]
    return [d / p for d, p in zip(dsd_lrs[redense_from:], plain_lrs[redense_from:], strict=True)]


@pytest.mark.slow
def test_trl_sft_trainer_keeps_every_sparse_forward_exact_and_redense_at_lr_scale_times_the_twins(tmp_path):
    trl = pytest.importorskip("trl")
    from datasets import Dataset
    from transformers import LlamaConfig, LlamaForCausalLM

    generator = torch.Generator().manual_seed(0)
    texts = [" ".join(WORDS[int(i)] for i in torch.randint(0, len(WORDS), (6,), generator=generator))
             for _ in range(24)]
    data = Dataset.from_dict({"text": texts})
    lrs = {}
    for with_dsd in (True, False):
        torch.manual_seed(0)
        model = LlamaForCausalLM(LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                                             num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=16,
                                             pad_token_id=0, bos_token_id=1, eos_token_id=1))
        dsd = DSDTrainerCallback(0.5, 2, 2, 2, interval="step")
        recorder, exactness = Recorder(), Exactness(dsd)
        config = trl.SFTConfig(output_dir=str(tmp_path / str(with_dsd)), max_steps=6, per_device_train_batch_size=4,
                               per_device_eval_batch_size=8, learning_rate=1e-2, use_cpu=True, report_to="none",
                               save_strategy="no", eval_strategy="steps", eval_steps=1, max_length=16,
                               disable_tqdm=True, seed=0, lr_scheduler_type="linear")
        trainer = trl.SFTTrainer(model=model, args=config, train_dataset=data, eval_dataset=data.select(range(8)),
                                 processing_class=word_tokenizer(),
                                 callbacks=[recorder] + ([dsd, exactness] if with_dsd else []))
        trainer.train()
        lrs[with_dsd] = recorder.lrs
        if with_dsd:
            assert exactness.steps == 2 and exactness.forwards["train"] >= 2 * 15 and exactness.forwards["eval"] >= 15
            assert "lm_head.weight" in dsd.target_names and dsd.phase.value == "redense"
    assert _lr_ratios(lrs[True], lrs[False], 4) == pytest.approx([0.1, 0.1], rel=1e-12)


def _seq2seq_model(kind: str) -> torch.nn.Module:
    torch.manual_seed(0)
    if kind == "t5":
        from transformers import T5Config, T5ForConditionalGeneration

        return T5ForConditionalGeneration(T5Config(vocab_size=32, d_model=16, d_kv=8, d_ff=32, num_layers=2,
                                                   num_heads=2, dropout_rate=0.0, pad_token_id=0, eos_token_id=1,
                                                   decoder_start_token_id=0))
    from transformers import BartConfig, BartForConditionalGeneration

    return BartForConditionalGeneration(BartConfig(
        vocab_size=32, d_model=16, encoder_layers=1, decoder_layers=1, encoder_attention_heads=2,
        decoder_attention_heads=2, encoder_ffn_dim=32, decoder_ffn_dim=32, max_position_embeddings=16, dropout=0.0,
        attention_dropout=0.0, activation_dropout=0.0, pad_token_id=0, bos_token_id=2, eos_token_id=1,
        decoder_start_token_id=1, forced_eos_token_id=1))


class Pairs(torch.utils.data.Dataset):
    """Source and target token sequences (ids 3-31; 0-2 are special)."""

    def __init__(self, n: int = 24, seed: int = 1) -> None:
        generator = torch.Generator().manual_seed(seed)
        self.x = torch.randint(3, 32, (n, 6), generator=generator)
        self.y = torch.randint(3, 32, (n, 4), generator=generator)

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int) -> dict:
        return {"input_ids": self.x[i], "attention_mask": torch.ones_like(self.x[i]), "labels": self.y[i]}


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["t5", "bart"])
def test_seq2seq_trainer_with_predict_with_generate_is_exact_in_every_generate_forward(tmp_path, kind):
    from transformers import Seq2SeqTrainer, Seq2SeqTrainingArguments

    lrs = {}
    for with_dsd in (True, False):
        model = _seq2seq_model(kind)
        dsd = DSDTrainerCallback(0.5, 2, 2, 2, interval="step")
        recorder, exactness = Recorder(), ExactInGenerate(dsd)
        args = Seq2SeqTrainingArguments(
            output_dir=str(tmp_path / str(with_dsd)), max_steps=6, per_device_train_batch_size=4,
            per_device_eval_batch_size=8, learning_rate=1e-2, use_cpu=True, report_to="none", save_strategy="no",
            eval_strategy="steps", eval_steps=1, predict_with_generate=True, generation_max_length=5,
            disable_tqdm=True, seed=0)
        trainer = Seq2SeqTrainer(model=model, args=args, train_dataset=Pairs(), eval_dataset=Pairs(n=8, seed=2),
                                 compute_metrics=lambda p: {"generated": float(p.predictions.shape[-1])},
                                 callbacks=[recorder] + ([dsd, exactness] if with_dsd else []))
        trainer.train()
        lrs[with_dsd] = recorder.lrs
        if with_dsd:
            assert exactness.steps == 2 and exactness.forwards["train"] > 0
            assert exactness.forwards["generate"] > exactness.forwards["eval"] - exactness.forwards["generate"] > 0
            assert dsd.phase.value == "redense"
            assert any("eval_generated" in entry for entry in trainer.state.log_history)
    assert _lr_ratios(lrs[True], lrs[False], 4) == pytest.approx([0.1, 0.1], rel=1e-12)


# ---------------------------------------------------------------------------- found by an adversarial review, fixed


@pytest.mark.slow
def test_a_resume_in_the_last_phase_drops_a_restored_best_model_record_of_an_earlier_phase(tmp_path, caplog):
    """A run with best_model_phase="any" chose dense step 1 as its best; resumed in re-dense with "final", the
    restored record is emptied, and the model returned is one of the last phase."""
    metric = {1: 0.1, 2: 0.5, 3: 3.0, 4: 3.0, 5: 2.0, 6: 1.5, 7: 1.2, 8: 1.1}  # dense step 1 is best overall

    def run(best_model_phase, stop=None, resume=None):
        model = gpt2()
        dsd = DSDTrainerCallback(0.5, 2, 2, 4, interval="step", best_model_phase=best_model_phase)
        args = arguments(tmp_path, max_steps=8, eval_strategy="steps", eval_steps=1, save_strategy="steps",
                         save_steps=1, load_best_model_at_end=True, metric_for_best_model="eval_forced",
                         greater_is_better=False)
        trainer: Trainer

        def forced(_):
            return {"forced": metric[trainer.state.global_step]}

        trainer = Trainer(model=model, args=args, train_dataset=Tokens(), eval_dataset=Tokens(n=8, seed=2),
                          compute_metrics=forced, callbacks=[dsd] + ([StopAt(stop)] if stop else []),
                          preprocess_logits_for_metrics=lambda logits, labels: logits[..., :1])
        trainer.train(resume_from_checkpoint=resume)
        return model, trainer

    run("any", stop=6)
    with listening(caplog) as heard:
        model, trainer = run("final", resume=str(tmp_path / "checkpoint-6"))
    assert messages(heard, "best-model record, restored with the checkpoint, names") and \
        messages(heard, "checkpoint-1, saved at step 1 in the dense phase of cycle 0: emptied")
    assert trainer.state.best_model_checkpoint == str(tmp_path / "checkpoint-8")  # 1.1: the last phase's best
    saved = load_file(tmp_path / "checkpoint-8" / "model.safetensors")
    assert all(torch.equal(saved[name], w) for name, w in weights(model).items() if name in saved)


@pytest.mark.slow
def test_training_again_after_a_hyperparameter_search_starts_the_schedule_afresh(tmp_path, caplog):
    pytest.importorskip("optuna")
    dsd = DSDTrainerCallback(0.5, 1, 2, 1, interval="step")
    phases = PhasesPerTrial(dsd)
    trainer = Trainer(model_init=gpt2, args=arguments(tmp_path, max_steps=4), train_dataset=Tokens(),
                      eval_dataset=Tokens(n=8), callbacks=[dsd, phases])
    space = lambda trial: {"learning_rate": trial.suggest_float("lr", 1e-3, 1e-2)}  # noqa: E731
    best = trainer.hyperparameter_search(hp_space=space, backend="optuna", n_trials=1, direction="minimize")
    trainer.args.learning_rate = best.hyperparameters["lr"]
    with listening(caplog) as heard:
        trainer.train()  # the usual final training with the best hyperparameters: no trial
    assert messages(heard, "starts its schedule afresh for the training after the hyperparameter search")
    assert phases.seen == [["dense", "sparse", "sparse", "redense"]] * 2


@pytest.mark.slow
def test_the_last_scalars_reach_the_trainers_log_when_training_is_stopped_where_a_transition_was_due(tmp_path,
                                                                                                   monkeypatch):
    monkeypatch.setenv("TENSORBOARD_LOGGING_DIR", str(tmp_path / "tb"))
    dsd = DSDTrainerCallback(0.5, 1, 1, 1)  # epochs of 2 steps: the sparse phase was due at step 2
    args = arguments(tmp_path, num_train_epochs=3, per_device_train_batch_size=16, report_to="tensorboard")
    trainer = Trainer(model=gpt2(), args=args, train_dataset=Tokens(), callbacks=[dsd, StopAt(2)])
    trainer.train()
    logged = [(entry["step"], entry["dsd/phase"]) for entry in trainer.state.log_history if "dsd/phase" in entry]
    assert logged == [(2, 0.0)]  # the dense epoch's end, logged once, while the Trainer's integrations are open
