"""``DSDTrainerCallback``: real ``transformers.Trainer.train()`` runs on the CPU, with GPT-2, BERT and Llama built
from tiny random-init configs (dropout off, so runs repeat bit for bit)."""

from __future__ import annotations

import configparser
import glob
import json
import logging
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

transformers = pytest.importorskip("transformers")
from helpers import ROOT, TESTS  # noqa: E402
from hf_helpers import (  # noqa: E402
    RANK_ZERO_LOGGER,
    Exactness,
    Recorder,
    StopAt,
    Tokens,
    arguments,
    bert,
    gpt2,
    llama,
    weights,
)
from transformers import (  # noqa: E402
    Trainer,
    TrainerCallback,
    TrainerControl,
    TrainerState,
)

from lightning_dsd import DSDCallback  # noqa: E402
from lightning_dsd.doors.transformers import DSDTrainerCallback  # noqa: E402
from lightning_dsd.doors.transformers.arguments import check_training_arguments  # noqa: E402
from lightning_dsd.doors.transformers.checkpoints import RECORD_KEY, STATE_FILE  # noqa: E402
from lightning_dsd.rules.state import CheckpointStateError  # noqa: E402

IMPORTERS = """
import sys, traceback
importers = []
class Spy:  # records the module that imports transformers (the innermost frame outside importlib)
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] == "transformers":
            frames = [f for f in traceback.extract_stack() if "importlib" not in f.filename
                      and f.filename != "<string>"]
            importers.append(frames[-1].filename)
sys.meta_path.insert(0, Spy())
import lightning_dsd
assert not [name for name in sys.modules if name.startswith("lightning_dsd.doors.transformers")]
print(sorted(set(importers)))
"""


def test_import_lightning_dsd_does_not_import_transformers():
    # torchmetrics (under Lightning) imports transformers whenever it is installed; lightning_dsd never does.
    run = subprocess.run([sys.executable, "-c", IMPORTERS], capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr[-2000:]
    assert "lightning_dsd" not in run.stdout, f"lightning_dsd imports transformers: {run.stdout}"
    door = ROOT / "lightning_dsd" / "doors" / "transformers"
    for source in (ROOT / "lightning_dsd").rglob("*.py"):
        if door not in source.parents:
            imports = [line for line in source.read_text().splitlines() if line.startswith(("import ", "from "))]
            assert not [line for line in imports if line.split()[1].split(".")[0] == "transformers"], source.name


def test_the_extra_installs_transformers_with_accelerate():
    setup = configparser.ConfigParser()
    setup.read(ROOT / "setup.cfg")
    extras = setup["options.extras_require"]
    assert "transformers>=5.0" in extras["transformers"] and "accelerate>=" in extras["transformers"]
    assert "lightning-dsd[transformers]" in extras["integrations"] and "integrations" in extras["test"]


# ---------------------------------------------------------------------------------------------- options


@pytest.mark.parametrize("options", [
    dict(sparsity=1.5), dict(interval="batch"), dict(scope="everywhere"), dict(lr_scale=0),
    dict(dense_epochs=None), dict(mask_storage="bits"),
])
def test_options_are_checked_once_with_the_other_doors_messages(options):
    given = {"sparsity": 0.5, "dense_epochs": 1, "sparse_epochs": 1, "redense_epochs": 1, **options}
    with pytest.raises(ValueError) as lightning:
        DSDCallback(**given)
    with pytest.raises(ValueError) as transformers_door:
        DSDTrainerCallback(**given)
    assert str(transformers_door.value) == str(lightning.value)


def test_a_lightning_only_keyword_is_refused_by_the_explicit_signature():
    with pytest.raises(TypeError, match=r"unexpected keyword argument 'export_sparse'"):
        DSDTrainerCallback(0.5, 1, 1, 1, export_sparse="sparse")  # type: ignore[call-arg]


def test_fsdp1_and_deepspeed_are_refused_before_anything_trains(tmp_path):
    fsdp1 = arguments(tmp_path, fsdp="full_shard", fsdp_config={"version": 1})
    with pytest.raises(ValueError, match=r"Found FSDP version 1 .*Use FSDP2: `fsdp_config=\{'version': 2\}`"):
        DSDTrainerCallback(0.5, 1, 1, 1).on_init_end(fsdp1, TrainerState(), TrainerControl())
    check_training_arguments(arguments(tmp_path, fsdp="full_shard", fsdp_config={"version": 2}))  # FSDP2 is fine

    class DeepSpeedArguments:  # TrainingArguments(deepspeed=...) needs the deepspeed package, not installed here
        deepspeed = {"zero_optimization": {"stage": 3}}
        fsdp = None

    with pytest.raises(ValueError, match="Found a DeepSpeed configuration .*Use FSDP2 instead"):
        check_training_arguments(DeepSpeedArguments())  # type: ignore[arg-type]


# ---------------------------------------------------------------------------------------------- exactness


def test_gpt2_every_forward_evaluation_included_is_exact_and_clipping_sees_the_sparse_gradient(tmp_path, monkeypatch):
    import lightning_dsd.rules.constraint as constraint

    passes = []  # whole-tensor masking passes over gradients: one when the constraint attaches, none per step
    mask_gradients_of = constraint._mask_gradients_of
    monkeypatch.setattr(constraint, "_mask_gradients_of", lambda t: passes.append(1) or mask_gradients_of(t))
    model = gpt2()
    dsd = DSDTrainerCallback(0.5, 2, 3, 2, interval="step")
    exactness = Exactness(dsd)
    args = arguments(tmp_path, max_steps=7, gradient_accumulation_steps=2, max_grad_norm=0.05,
                     eval_strategy="steps", eval_steps=1, optim="adamw_torch")
    clipped = []

    class ClippedGradients(TrainerCallback):  # before DSD's own hook: what the Trainer's clipping measured
        def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
            if dsd.phase.value == "sparse":
                params = dict(model.named_parameters())
                clipped.append(all(not params[n].grad[~keep].any() for n, keep in dsd.masks.items()))

    trainer = Trainer(model=model, args=args, train_dataset=Tokens(), eval_dataset=Tokens(n=8, seed=2),
                      callbacks=[ClippedGradients(), dsd, exactness])
    seen = {}

    class Phases(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            seen[state.global_step] = (dsd.phase.value, {n: int((~m).sum()) for n, m in dsd.masks.items()})

    trainer.add_callback(Phases())
    trainer.train()
    assert [seen[step][0] for step in range(1, 8)] == ["dense"] * 2 + ["sparse"] * 3 + ["redense"] * 2
    params = dict(model.named_parameters())
    assert all(count == round(0.5 * params[name].numel()) for name, count in seen[3][1].items())
    # The tied embedding is pruned once, by one name, and stays the output layer's weight.
    assert "transformer.wte.weight" in seen[3][1] and "lm_head.weight" not in seen[3][1]
    assert model.lm_head.weight is model.transformer.wte.weight
    assert exactness.steps == 3
    assert clipped == [True, True, True], "max_grad_norm measured gradients of pruned entries"
    assert passes == [1], "the gradient hooks masked them: no second pass before each step"
    grad_norms = [log["grad_norm"] for log in trainer.state.log_history if "grad_norm" in log]
    assert min(grad_norms) > 0.05  # the clipping was active
    assert exactness.forwards["train"] == 3 * 2 * 9 and exactness.forwards["eval"] >= 3 * 9


def test_a_run_with_per_cycle_lengths_ends_sparse_with_zeros_in_every_forward_and_no_left_sparse_warning(
    tmp_path, recwarn
):
    model = gpt2()
    dsd = DSDTrainerCallback(0.5, 1, [1], [1], interval="step", final_sparse_epochs=2, lr_scale=1.0,
                             redense_state="all")
    exactness = Exactness(dsd)
    args = arguments(tmp_path, max_steps=8, eval_strategy="steps", eval_steps=1, optim="adamw_torch")
    seen = {}

    class Phases(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            seen[state.global_step] = dsd.phase_label

    trainer = Trainer(model=model, args=args, train_dataset=Tokens(), eval_dataset=Tokens(n=8, seed=2),
                      callbacks=[dsd, exactness, Phases()])
    trainer.train()
    assert list(seen.values()) == ["dense", "sparse", "redense", "final sparse", "final sparse"], "stop_at_end"
    assert dsd.in_last_phase and exactness.steps == 3 and exactness.forwards["eval"] > 0
    params = dict(model.named_parameters())
    assert all(not params[name][~keep].any() for name, keep in dsd.masks.items()), "the run ends sparse"
    assert not [w for w in recwarn if "not re-densed" in str(w.message)]


def test_the_optimizer_that_steps_is_the_one_dsd_hooks_behind_accelerates_wrapper(tmp_path):
    from accelerate.optimizer import AcceleratedOptimizer

    dsd = DSDTrainerCallback(0.5, 1, 2, 1, interval="step")
    trainer = Trainer(model=gpt2(), args=arguments(tmp_path, max_steps=4), train_dataset=Tokens(), callbacks=[dsd])
    trainer.train()
    assert isinstance(trainer.optimizer, AcceleratedOptimizer)
    assert list(dsd.optimizers) == [trainer.optimizer.optimizer]


# ---------------------------------------------------------------------------------------------- learning rate


@pytest.mark.parametrize("scheduler", ["linear", "cosine"])
def test_redense_gives_lr_scale_times_the_learning_rate_of_a_twin_run_without_dsd(tmp_path, scheduler):
    histories = []
    for with_dsd in (False, True):
        recorder = Recorder()
        callbacks = [recorder] + ([DSDTrainerCallback(0.5, 3, 3, 4, interval="step")] if with_dsd else [])
        args = arguments(tmp_path / str(with_dsd), max_steps=10, lr_scheduler_type=scheduler, warmup_steps=2)
        Trainer(model=gpt2(), args=args, train_dataset=Tokens(n=40), callbacks=callbacks).train()
        histories.append(recorder.lrs)
    plain, dsd = histories
    assert len(plain) == len(dsd) == 10
    assert dsd[:6] == plain[:6]
    assert dsd[6:] == pytest.approx([0.1 * lr for lr in plain[6:]], rel=1e-12)
    assert plain[1] > plain[0] and plain[9] < plain[6]  # warm-up, then decay: a schedule, not a constant


# ---------------------------------------------------------------------------------------------- checkpoints


def _resumable_run(out: Path, with_dsd: bool, stop_at: int | None = None, resume: bool = False, **dsd_options):
    model = gpt2()
    dsd = DSDTrainerCallback(0.5, 2, 4, 2, interval="step", **dsd_options) if with_dsd else None
    callbacks = [c for c in (dsd, StopAt(stop_at) if stop_at else None) if c is not None]
    args = arguments(out, max_steps=8, save_strategy="steps", save_steps=2, save_total_limit=1,
                     gradient_accumulation_steps=2)
    trainer = Trainer(model=model, args=args, train_dataset=Tokens(n=48), callbacks=callbacks)
    trainer.train(resume_from_checkpoint=True if resume else None)
    return model, dsd, trainer


@pytest.fixture(scope="module")
def interrupted(tmp_path_factory):
    """A DSD run stopped at step 4 (mid-sparse: steps 3-6), its checkpoints rotated by save_total_limit=1."""
    out = tmp_path_factory.mktemp("interrupted")
    _resumable_run(out, with_dsd=True, stop_at=4)
    return out


def test_a_resume_mid_sparse_from_the_latest_checkpoint_is_bit_identical_where_the_plain_trainer_is(
    tmp_path, interrupted
):
    # First the Trainer itself: without DSD a resume repeats the uninterrupted run bit for bit.
    plain, _, _ = _resumable_run(tmp_path / "plain", with_dsd=False)
    _resumable_run(tmp_path / "plain_cut", with_dsd=False, stop_at=4)
    plain_resumed, _, _ = _resumable_run(tmp_path / "plain_cut", with_dsd=False, resume=True)
    plain_weights, plain_resumed_weights = weights(plain), weights(plain_resumed)
    assert all(torch.equal(w, plain_resumed_weights[n]) for n, w in plain_weights.items())

    full, full_dsd, _ = _resumable_run(tmp_path / "dsd", with_dsd=True)
    resumed_dir = tmp_path / "dsd_cut"
    shutil.copytree(interrupted, resumed_dir)
    resumed, resumed_dsd, trainer = _resumable_run(resumed_dir, with_dsd=True, resume=True)
    assert trainer.state.global_step == 8 and resumed_dsd.phase.value == full_dsd.phase.value == "redense"
    different = [n for n, w in weights(full).items() if not torch.equal(w, weights(resumed)[n])]
    assert not different, f"differ after the resume: {different}"


def test_dsd_state_rotates_with_its_checkpoint_folder_and_is_recorded_in_trainer_state(interrupted):
    folders = sorted(os.path.basename(p) for p in glob.glob(str(interrupted / "checkpoint-*")))
    assert folders == ["checkpoint-4"]  # checkpoint-2 went, with its dsd_state.pt
    for folder in folders:
        saved = torch.load(interrupted / folder / STATE_FILE, weights_only=True)
        state = json.loads((interrupted / folder / "trainer_state.json").read_text())
        assert saved["global_step"] == int(folder.split("-")[1])
        assert saved["token"] == state["stateful_callbacks"][RECORD_KEY]["token"]
        assert saved["dsd"]["schedule"]["index"] == 1 and saved["dsd"]["masks"]  # sparse, with its masks


@pytest.mark.parametrize("damage, message", [
    ("garbage", r"dsd_state.pt cannot be read"),
    ("missing", r"no DSD state of that step and run was found .*no such file"),
    ("other run", r"saved at step 4 by run 'someone else'"),
    ("other sparsity", r"sparsity of cycle 0: checkpoint 0.5, this run 0.25"),
])
def test_a_damaged_or_foreign_dsd_state_is_refused_before_training_changes_anything(
    tmp_path, interrupted, damage, message
):
    out = tmp_path / "run"
    shutil.copytree(interrupted, out)
    path = out / "checkpoint-4" / STATE_FILE
    if damage == "garbage":
        path.write_bytes(b"not a torch file")
    elif damage == "missing":
        path.unlink()
    elif damage == "other run":
        saved = torch.load(path, weights_only=True)
        torch.save({**saved, "token": "someone else"}, path)
    model = gpt2()
    sparsity = 0.25 if damage == "other sparsity" else 0.5
    dsd = DSDTrainerCallback(sparsity, 2, 4, 2, interval="step")
    trainer = Trainer(model=model, args=arguments(out, max_steps=8, gradient_accumulation_steps=2),
                      train_dataset=Tokens(n=48), callbacks=[dsd])
    with pytest.raises(CheckpointStateError, match=message):
        trainer.train(resume_from_checkpoint=True)
    assert trainer.state.global_step == 4  # restored, and not one step further
    from safetensors.torch import load_file

    saved_weights = load_file(out / "checkpoint-4" / "model.safetensors")
    assert all(torch.equal(saved_weights[n], w) for n, w in weights(model).items() if n in saved_weights)


def test_an_epoch_clock_resumed_mid_epoch_with_evaluation_every_two_steps_is_bit_identical(tmp_path):
    def run(out, stop_at=None, resume=False):
        model, dsd = gpt2(), DSDTrainerCallback(0.5, 1, 1, 1)  # 2 optimizer steps per epoch
        args = arguments(out, num_train_epochs=3, save_strategy="steps", save_steps=1, eval_strategy="steps",
                         eval_steps=2)
        callbacks = [dsd] + ([StopAt(stop_at)] if stop_at else [])
        trainer = Trainer(model=model, args=args, train_dataset=Tokens(n=8), eval_dataset=Tokens(n=8, seed=2),
                          callbacks=callbacks)
        trainer.train(resume_from_checkpoint=True if resume else None)
        return model, dsd

    full, _ = run(tmp_path / "full")
    run(tmp_path / "cut", stop_at=3)  # epoch 1.5: the middle of the sparse epoch
    resumed, dsd = run(tmp_path / "cut", resume=True)
    assert dsd.phase.value == "redense"
    assert all(torch.equal(w, weights(resumed)[n]) for n, w in weights(full).items())


def test_a_checkpoint_saved_without_dsd_is_joined_and_the_phases_count_from_its_step(tmp_path, caplog):
    args = arguments(tmp_path, max_steps=6, save_strategy="steps", save_steps=2)
    Trainer(model=gpt2(), args=args, train_dataset=Tokens(), callbacks=[StopAt(2)]).train()
    dsd, seen = DSDTrainerCallback(0.5, 1, 2, 1, interval="step"), {}

    class Phases(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            seen[state.global_step] = dsd.phase.value

    with caplog.at_level(logging.INFO, logger=RANK_ZERO_LOGGER):
        Trainer(model=gpt2(), args=args, train_dataset=Tokens(), callbacks=[dsd, Phases()]).train(
            resume_from_checkpoint=True)
    assert seen == {3: "dense", 4: "sparse", 5: "sparse", 6: "redense"}
    assert any("joins this run at step 2 (the checkpoint holds no DSD state)" in r.getMessage() for r in caplog.records)


def test_a_checkpoint_outside_output_dir_is_found_through_training_arguments(tmp_path, interrupted):
    elsewhere = tmp_path / "moved" / "checkpoint-4"
    shutil.copytree(interrupted / "checkpoint-4", elsewhere)

    def resume(**overrides):
        dsd = DSDTrainerCallback(0.5, 2, 4, 2, interval="step")
        args = arguments(tmp_path / "new_output", max_steps=8, gradient_accumulation_steps=2, **overrides)
        trainer = Trainer(model=gpt2(), args=args, train_dataset=Tokens(n=48), callbacks=[dsd])
        trainer.train(resume_from_checkpoint=str(elsewhere))
        return dsd

    with pytest.raises(CheckpointStateError, match=r"new_output/checkpoint-4/dsd_state.pt: no such file.*"
                                                   r"TrainingArguments\(resume_from_checkpoint=...\)"):
        resume()
    assert resume(resume_from_checkpoint=str(elsewhere)).phase.value == "redense"


def test_dense_epochs_0_evaluates_the_pretrained_model_first_then_prunes_before_the_first_step(tmp_path):
    dsd = DSDTrainerCallback(0.5, 0, 2, 1, interval="step")
    phases = []

    class AtEvaluation(TrainerCallback):
        def on_evaluate(self, args, state, control, **kwargs):
            phases.append((state.global_step, dsd.phase.value))

    args = arguments(tmp_path, max_steps=3, eval_on_start=True, eval_strategy="steps", eval_steps=1)
    trainer = Trainer(model=llama(), args=args, train_dataset=Tokens(classes=3), eval_dataset=Tokens(n=8, classes=3),
                      callbacks=[dsd, AtEvaluation()])
    trainer.train()
    assert phases == [(0, "dense"), (1, "sparse"), (2, "sparse"), (3, "redense")]
    with pytest.raises(RuntimeError, match="already ran its whole schedule in an earlier `train\\(\\)`"):
        trainer.train()


# ---------------------------------------------------------------------------------------------- logging


def test_reports_reach_the_trainers_tensorboard_run_and_every_integration_through_trainer_log(tmp_path, monkeypatch):
    logdir = tmp_path / "tb"
    monkeypatch.setenv("TENSORBOARD_LOGGING_DIR", str(logdir))
    integration = Recorder()  # an integration (W&B, MLflow) is a callback that comes before the user's
    dsd = DSDTrainerCallback(0.5, 1, 1, 1)  # interval="epoch": the Trainer's epochs, 2 optimizer steps each
    seen = {}

    class Phases(TrainerCallback):
        def on_step_begin(self, args, state, control, **kwargs):
            seen[state.global_step] = dsd.phase.value

    args = arguments(tmp_path / "out", num_train_epochs=3, gradient_accumulation_steps=2, report_to="tensorboard")
    trainer = Trainer(model=gpt2(), args=args, train_dataset=Tokens(n=16), callbacks=[integration, dsd, Phases()])
    trainer.train()
    assert seen == {0: "dense", 1: "dense", 2: "sparse", 3: "sparse", 4: "redense", 5: "redense"}
    phases = [log["dsd/phase"] for log in integration.logs if "dsd/phase" in log]
    assert phases == [1.0, 2.0, 2.0]  # one value per step: pruning (epoch 1's end), re-dense (2's), epoch 3's end
    assert any("dsd_sparsity/transformer.wte.weight" in log for log in integration.logs)
    steps = [entry["step"] for entry in trainer.state.log_history if "dsd/phase" in entry]
    assert steps == [2, 4, 6]
    events = EventAccumulator(str(logdir), size_guidance={"histograms": 0, "images": 0, "tensors": 0})
    events.Reload()
    tags = events.Tags()
    assert "train/dsd/phase" in tags["scalars"]  # transformers' TensorBoardCallback prefixes train/
    assert "dsd_weights/transformer.wte.weight/2_after_pruning" in tags["histograms"]
    assert "dsd_weights/transformer.wte.weight/5_end_of_redense" in tags["histograms"]
    assert any(tag.startswith("dsd_figure/") for tag in tags["images"])
    assert any(tag.startswith("dsd/transitions") for tag in tags["tensors"])
    assert glob.glob(str(logdir / "dsd_figures" / "cycle0_*.png"))
    # The CUSTOM SCALARS charts name the tags as TensorBoard matches them (from the start of the tag).
    from tensorboard.plugins.custom_scalar import layout_pb2

    layout = layout_pb2.Layout()
    layout.ParseFromString(events.Tensors("custom_scalars__config__")[0].tensor_proto.string_val[0])
    regexes = [regex for category in layout.category for chart in category.chart
               for regex in chart.multiline.tag]
    assert "train/dsd/phase" in regexes
    assert all(any(re.match(regex, tag) for tag in tags["scalars"]) for regex in regexes)


def test_with_report_to_none_dsd_says_once_what_it_skips(tmp_path, caplog):
    with caplog.at_level(logging.INFO, logger=RANK_ZERO_LOGGER):
        dsd = DSDTrainerCallback(0.5, 1, 1, 1, interval="step")
        Trainer(model=gpt2(), args=arguments(tmp_path, max_steps=3), train_dataset=Tokens(), callbacks=[dsd]).train()
    said = [r.getMessage() for r in caplog.records if "logs nothing (report_to='none')" in r.getMessage()]
    assert len(said) == 1
    assert not glob.glob(str(tmp_path / "**" / "events.out.tfevents*"), recursive=True)


# ---------------------------------------------------------------------------------------------- models


def test_bert_with_a_frozen_base_prunes_only_what_trains_and_says_the_base_stays_dense(tmp_path, caplog):
    model = bert()
    for param in model.bert.parameters():
        param.requires_grad_(False)
    model.bert.pooler.dense.weight.requires_grad_(True)
    dsd = DSDTrainerCallback(0.5, 1, 2, 1, interval="step")
    pruned = {}

    class Pruned(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            pruned.update(dsd.masks)

    with caplog.at_level(logging.INFO, logger=RANK_ZERO_LOGGER):
        Trainer(model=model, args=arguments(tmp_path, max_steps=4), train_dataset=Tokens(classes=3),
                callbacks=[dsd, Pruned()]).train()
    assert sorted(pruned) == ["bert.pooler.dense.weight", "classifier.weight"]
    notes = [r.getMessage() for r in caplog.records if "sparse phase. Pruned" in r.getMessage()]
    assert len(notes) == 1 and "bert.encoder.layer.0.attention.self.query.weight (frozen)" in notes[0]
    assert not (model.bert.encoder.layer[0].attention.self.query.weight == 0).any()


def test_llama_classification_converges_phase_by_phase_on_eval_loss_read_from_on_evaluate(tmp_path):
    # min_delta=10: the first evaluation of a phase improves on nothing seen, the second cannot, so each phase
    # of length None ends after its second evaluation (patience=1), whatever the losses are.
    dsd = DSDTrainerCallback(0.5, None, None, 2, interval="step", monitor="eval_loss", patience=1, min_delta=10.0)
    seen = {}

    class Phases(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            seen[state.global_step] = (dsd.phase.value, {n: int((~m).sum()) for n, m in dsd.masks.items()})

    model = llama()
    args = arguments(tmp_path, max_steps=8, eval_strategy="steps", eval_steps=2)
    Trainer(model=model, args=args, train_dataset=Tokens(classes=3), eval_dataset=Tokens(n=8, classes=3, seed=2),
            callbacks=[dsd, Phases()]).train()
    assert [seen[s][0] for s in range(1, 9)] == ["dense"] * 4 + ["sparse"] * 4
    params = dict(model.named_parameters())
    assert seen[5][1] and all(count == round(0.5 * params[n].numel()) for n, count in seen[5][1].items())
    assert "score.weight" in seen[5][1] and "model.layers.0.self_attn.q_proj.weight" in seen[5][1]


def test_a_monitor_the_evaluation_does_not_report_is_refused_with_what_it_reports(tmp_path):
    dsd = DSDTrainerCallback(0.5, None, 1, 1, interval="step", monitor="eval_acc")
    args = arguments(tmp_path, max_steps=4, eval_strategy="steps", eval_steps=1)
    trainer = Trainer(model=llama(), args=args, train_dataset=Tokens(classes=3),
                      eval_dataset=Tokens(n=8, classes=3), callbacks=[dsd])
    with pytest.raises(RuntimeError, match=r"`monitor='eval_acc'` is not among .*'eval_loss'"):
        trainer.train()


# ---------------------------------------------------------------------------------------------- distributed


@pytest.mark.slow
def test_ddp_over_two_gloo_processes_prunes_identically_on_both_ranks(tmp_path):
    env = {**os.environ, "PYTHONWARNINGS": "ignore",
           "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
               str(TESTS / "hf_worker.py"), "--out", str(tmp_path), "--mode", "ddp"]
    run = subprocess.run(command, env=env, timeout=300, capture_output=True, text=True)
    assert run.returncode == 0, f"{run.stdout[-3000:]}\n{run.stderr[-5000:]}"
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in range(2)]
    assert ranks[0]["masks"] and set(ranks[0]["masks"]) == set(ranks[1]["masks"])
    for name, mask in ranks[0]["masks"].items():
        assert torch.equal(mask, ranks[1]["masks"][name]), f"{name}: the ranks pruned differently"
        assert torch.equal(mask, ranks[0]["saved_masks"][name]), f"{name}: the checkpoint holds other masks"
    assert all(all(rank["zeros"]) and len(rank["zeros"]) == 3 for rank in ranks)
    assert all(rank["tied"] for rank in ranks)


# ---------------------------------------------------------------------------------------------- docs


def _docs_script(tmp_path: Path) -> str:
    page = (ROOT / "docs" / "transformers.md").read_text()
    script = page.split("```python\n# dsd_transformers.py", 1)[1].split("```", 1)[0]
    path = tmp_path / "dsd_transformers.py"
    path.write_text("# dsd_transformers.py" + script)
    env = {**os.environ, "PYTHONWARNINGS": "ignore",
           "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    run = subprocess.run([sys.executable, str(path)], cwd=tmp_path, timeout=300, capture_output=True, text=True,
                         env=env)
    output = run.stdout + run.stderr
    assert run.returncode == 0, output[-5000:]
    return output


@pytest.mark.slow
def test_the_docs_script_runs_as_written(tmp_path):
    output = _docs_script(tmp_path)
    assert "DSD cycle 0: sparse phase. Pruned" in output
    assert "DSD cycle 0: re-dense phase." in output
    assert "DSDTrainerCallback resumed the sparse phase at step 6 from dsd_gpt2/checkpoint-6/dsd_state.pt" in output
    assert "finished in the redense phase after 12 steps" in output


def test_the_readme_has_a_transformers_section_and_stays_under_8000_characters():
    readme = (ROOT / "README.md").read_text()
    assert len(readme) < 8000
    assert "DSDTrainerCallback" in readme and "(docs/transformers.md)" in readme
