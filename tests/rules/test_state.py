"""A checkpoint's DSD state is checked before it is used: damaged or mismatched states are refused with
one clear message and nothing changes; allowed changes resume; a run killed with SIGKILL resumes bit for bit."""

from __future__ import annotations

import copy
import hashlib
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import TESTS, StepRecorder, make_loader, make_trainer, resumable_dsd, resumable_model
from lightning.pytorch.callbacks import ModelCheckpoint
from torch import Tensor

from lightning_dsd.rules.state import STATE_VERSION, RunConfig


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """One uninterrupted run with a checkpoint after every epoch, and its final weights."""
    directory = tmp_path_factory.mktemp("checkpoints")
    model = resumable_model()
    checkpoints = ModelCheckpoint(dirpath=directory, save_top_k=-1, every_n_epochs=1, filename="{epoch}")
    make_trainer([resumable_dsd(), checkpoints], max_epochs=7, enable_checkpointing=True).fit(model, make_loader())
    return directory, {k: v.clone() for k, v in model.state_dict().items()}


def _damaged(run, tmp_path, damage, source: str = "epoch=3.ckpt") -> Path:
    checkpoint = torch.load(run[0] / source, weights_only=True)
    checkpoint["callbacks"]["DSDCallback"] = damage(checkpoint["callbacks"]["DSDCallback"])
    path = tmp_path / "damaged.ckpt"
    torch.save(checkpoint, path)
    return path


def _set(state, path: str, value):
    state = copy.deepcopy(state)
    *parents, last = path.split("/")
    target = state
    for key in parents:
        target = target[key]
    target[last] = value
    return state


def _zero_bits(state):
    state = copy.deepcopy(state)
    state["masks"]["conv.weight"]["bits"].zero_()
    return state


def _without(path: str):
    def damage(state):
        state = copy.deepcopy(state)
        *parents, last = path.split("/")
        target = state
        for key in parents:
            target = target[key]
        del target[last]
        return state

    return damage


DAMAGED = {
    "mask-shape": (lambda s: _set(s, "masks/conv.weight/shape", [8, 3]),
                   r"`masks\['conv.weight'\].shape` is \[8, 3\], expected the weight's shape \[8, 4, 3\]"),
    "mask-bits-truncated": (lambda s: _set(s, "masks/conv.weight/bits", s["masks"]["conv.weight"]["bits"][:-1]),
                            r"`masks\['conv.weight'\].bits` is a torch.uint8 tensor of shape \[11\], expected a uint8"
                            r" tensor of 12 bytes \(1 bit for each of 96 weights\)"),
    "every-weight-pruned": (_zero_bits, r"`masks`: the mask of `conv.weight` prunes 96 of 96 weights, expected"
                                        r" round\(0.5 \* 96\) = 48"),
    "mask-missing": (_without("masks/head.weight"),
                     r"`masks`: masks for \['conv.weight', 'lstm.weight_hh_l0', 'lstm.weight_ih_l0'\], expected the"
                     r" targets .*missing \['head.weight'\]"),
    "no-masks-in-sparse": (lambda s: _set(s, "masks", {}),
                           r"it was saved in the sparse phase of cycle 0 but holds no masks"),
    "index-past-the-end": (lambda s: _set(s, "schedule/index", 9),
                           r"`schedule.index` is 9, expected an int in 0..2 \(the schedule has 3 phases\)"),
    "negative-started-at": (lambda s: _set(s, "schedule/started_at", -1),
                            r"`schedule.started_at` is -1, expected an int >= 0"),
    "future-version": (lambda s: _set(s, "version", 99),
                       r"its DSD state `version` is 99, but this lightning_dsd \(0.1.0\) reads versions 1 to 2."
                       r" Upgrade"),
    "config-damaged": (_without("config/scope"), r"its `config` entry is .*expected a mapping with the keys"),
    "not-a-mapping": (lambda s: [s], r"its DSD state is \[.*expected a mapping"),
}


@pytest.mark.parametrize("damage, message", DAMAGED.values(), ids=DAMAGED.keys())
def test_a_damaged_state_is_refused_before_anything_trains_or_changes(run, tmp_path, damage, message):
    path = _damaged(run, tmp_path, damage)
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    model, dsd = resumable_model(), resumable_dsd()
    recorder = StepRecorder(dsd)
    with pytest.raises(ValueError, match=r"DSD cannot resume from this checkpoint: " + message):
        make_trainer([dsd, recorder], max_epochs=7).fit(model, make_loader(), ckpt_path=path)
    assert recorder.steps == []  # not one optimizer step
    saved = torch.load(path, weights_only=True)
    assert all(torch.equal(saved["state_dict"][k], v) for k, v in model.state_dict().items())  # no mask applied
    assert hashlib.sha256(path.read_bytes()).hexdigest() == digest


def test_masks_in_a_dense_phase_are_refused(run, tmp_path):
    sparse_masks = torch.load(run[0] / "epoch=3.ckpt", weights_only=True)["callbacks"]["DSDCallback"]["masks"]
    path = _damaged(run, tmp_path, lambda s: _set(s, "masks", sparse_masks), source="epoch=0.ckpt")
    with pytest.raises(ValueError, match=r"saved in the dense phase but holds masks for \['conv.weight'"):
        make_trainer([resumable_dsd()], max_epochs=7).fit(resumable_model(), make_loader(), ckpt_path=path)


def test_a_truncated_file_fails_in_lightnings_loader_before_dsd_or_training_touch_anything(run, tmp_path):
    data = (run[0] / "epoch=3.ckpt").read_bytes()
    path = tmp_path / "truncated.ckpt"
    path.write_bytes(data[: len(data) // 2])
    model = resumable_model()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    recorder = StepRecorder(dsd := resumable_dsd())
    with pytest.raises(OSError):  # torch's zip reader, through Lightning: not DSD's to word
        make_trainer([dsd, recorder], max_epochs=7).fit(model, make_loader(), ckpt_path=path)
    assert recorder.steps == [] and dsd.masks == {}
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


MISMATCHED = {
    "sparsity": (dict(sparsity=0.6), r"sparsity of cycle 0: checkpoint 0.5, this run 0.6"),
    "finished-dense-length": (dict(dense_epochs=3),
                              r"length of the finished dense phase of cycle 0: checkpoint 2, this run 3"),
    "scope": (dict(scope="global"), r"`scope`: checkpoint 'layer', this run 'global'"),
    "interval": (dict(interval="step"), r"`interval`: checkpoint 'epoch', this run 'step'"),
    "layer-sparsity": (dict(layer_sparsity={"head.*": 0.25}), r"`layer_sparsity`: checkpoint None, this run"),
    "targets": (dict(exclude="head.*"), r"`targets`: checkpoint \[.*'head.weight'\], this run \["),
}


@pytest.mark.parametrize("overrides, message", MISMATCHED.values(), ids=MISMATCHED.keys())
def test_a_configuration_that_would_change_the_masks_or_the_past_is_refused(run, overrides, message):
    with pytest.raises(ValueError, match=r"differs from this run's in what has already happened: .*" + message):
        make_trainer([resumable_dsd(**overrides)], max_epochs=7).fit(
            resumable_model(), make_loader(), ckpt_path=run[0] / "epoch=3.ckpt")


def test_phases_not_yet_finished_may_change_length_on_resume(run):
    dsd = resumable_dsd(sparse_epochs=2, redense_epochs=4)  # the current sparse phase ends one epoch earlier
    recorder = StepRecorder(dsd)
    make_trainer([dsd, recorder], max_epochs=8).fit(resumable_model(), make_loader(), ckpt_path=run[0] / "epoch=3.ckpt")
    assert [phase for phase, _, _ in recorder.steps] == ["redense"] * 16  # epochs 4..7
    assert all(zeros for _, _, zeros in recorder.steps)


def test_a_version_1_state_without_configuration_is_migrated_and_resumes_exactly(run, tmp_path):
    path = _damaged(run, tmp_path, lambda s: _set(_without("config")(s), "version", 1))
    model = resumable_model()
    make_trainer([resumable_dsd()], max_epochs=7).fit(model, make_loader(), ckpt_path=path)
    assert all(torch.equal(run[1][k], v) for k, v in model.state_dict().items())


def test_the_state_is_plain_data_that_torch_loads_with_weights_only(run):
    def plain(value) -> bool:
        if isinstance(value, dict):
            return all(isinstance(k, str) and plain(v) for k, v in value.items())
        if isinstance(value, list):
            return all(plain(v) for v in value)
        return value is None or isinstance(value, (Tensor, bool, int, float, str))

    for epoch in range(7):
        state = torch.load(run[0] / f"epoch={epoch}.ckpt", weights_only=True)["callbacks"]["DSDCallback"]
        assert state["version"] == STATE_VERSION and plain(state)
        assert RunConfig.from_state(state["config"]).targets == [
            "conv.weight", "lstm.weight_ih_l0", "lstm.weight_hh_l0", "head.weight"]


KILLED_RUN = """
import os, signal, sys
import lightning.pytorch as pl
from lightning.pytorch.callbacks import ModelCheckpoint
from helpers import make_loader, make_trainer, resumable_dsd, resumable_model

directory, kill_at = sys.argv[1], int(sys.argv[2])

class KillAt(pl.Callback):
    def on_train_epoch_start(self, trainer, pl_module):  # after DSD's own hook: a transition just happened
        if trainer.current_epoch == kill_at:
            os.kill(os.getpid(), signal.SIGKILL)

checkpoints = ModelCheckpoint(dirpath=directory, save_last=True, every_n_epochs=1)
make_trainer([resumable_dsd(), KillAt(), checkpoints], max_epochs=7, enable_checkpointing=True).fit(
    resumable_model(), make_loader())
"""


@pytest.mark.slow
@pytest.mark.parametrize("kill_at", [2, 3, 5], ids=["at-pruning", "mid-sparse", "at-redense"])
def test_a_run_killed_with_sigkill_resumes_from_last_ckpt_bit_for_bit(run, tmp_path, kill_at):
    environment = {**os.environ, "PYTHONPATH": os.pathsep.join([str(TESTS), os.environ.get("PYTHONPATH", "")])}
    killed = subprocess.run([sys.executable, "-c", KILLED_RUN, str(tmp_path), str(kill_at)], env=environment,
                            capture_output=True, text=True, timeout=300)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    assert torch.load(tmp_path / "last.ckpt", weights_only=True)["epoch"] == kill_at - 1

    model = resumable_model()
    make_trainer([resumable_dsd()], max_epochs=7).fit(model, make_loader(), ckpt_path=tmp_path / "last.ckpt")
    assert all(torch.equal(run[1][k], v) for k, v in model.state_dict().items())
