"""``python -m lightning_dsd.compare``: the paired numbers checked against values recomputed from the event files
with TensorBoard's own reader and SciPy, the PNG and JSON it writes, and every refusal in one table."""

from __future__ import annotations

import glob
import json
import os
import re
import runpy
import shutil
import subprocess
import sys
from pathlib import Path

import lightning.pytorch as pl
import matplotlib.image
import pytest
import torch
from helpers import ROOT
from scipy import stats
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from torch import nn
from torch.utils.tensorboard import SummaryWriter

from lightning_dsd import DSD
from lightning_dsd.rules import reporting
from lightning_dsd.tools.compare import CompareError, compare, main

ARMS = {"dsd": {}, "llr": {"prune": False}, "dense": {"prune": False, "lr_scale": 1.0}}
SEEDS = (0, 1, 2)


def log_run(logdir: Path, arm: str, seed: int, epochs=(2, 1, 2), metric="val_acc", name=None, sparsity=0.8,
            **options) -> None:
    """One real run of ``arm`` with ``DSD`` and a ``SummaryWriter``: a small MLP on a fixed noisy task, its
    validation accuracy logged after every epoch (``metric=None``: not logged)."""
    pl.seed_everything(seed, verbose=False)
    model = nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Linear(32, 3))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.3, momentum=0.9)
    data = torch.Generator().manual_seed(1234)  # one task for every run: the seeds differ in init only
    x = torch.randn(320, 8, generator=data)
    y = ((x[:, 0] + 0.5 * torch.randn(320, generator=data)) > 0).long() + (x[:, 1] > 0.5).long()
    writer = SummaryWriter(str(logdir / (name or f"{arm}_seed{seed}")))
    dsd = DSD(model, optimizer, sparsity, *epochs, writer=writer, log_histograms=False, figure_layers=0,
              **{**ARMS[arm], **options})
    for _ in range(sum(epochs)):
        for start in range(0, 256, 32):
            optimizer.zero_grad()
            nn.functional.cross_entropy(model(x[start:start + 32]), y[start:start + 32]).backward()
            optimizer.step()
        dsd.step()
        if metric:
            with torch.no_grad():
                writer.add_scalar(metric, (model(x[256:]).argmax(1) == y[256:]).float().mean().item(), dsd.elapsed)
    writer.close()


@pytest.fixture(scope="module")
def experiment(tmp_path_factory) -> Path:
    logdir = tmp_path_factory.mktemp("experiment")
    for seed in SEEDS:
        for arm in ARMS:
            log_run(logdir, arm, seed)
    return logdir


def recomputed(logdir: Path, metric: str, at: str, mode: str) -> dict[str, dict[int, float]]:
    """Each arm's metric per seed, from every directory of event files, with TensorBoard's EventAccumulator."""
    arms: dict[str, dict[int, float]] = {}
    for directory in sorted({os.path.dirname(f) for f in glob.glob(str(logdir / "**" / "events.out.tfevents.*"),
                                                                  recursive=True)}):
        events = EventAccumulator(directory, size_guidance={"scalars": 0, "tensors": 0})
        events.Reload()
        (text,) = [e.tensor_proto.string_val[0].decode() for e in events.Tensors("dsd/run/text_summary")]
        record = json.loads(re.fullmatch(r"```json\n(.*)\n```", text, re.S).group(1))
        assert f'\n  "arm": "{record["arm"]}",\n' in text, "the TEXT tab shows one key per line"
        values = [e.value for e in events.Scalars(metric)]
        arms.setdefault(record["arm"], {})[record["seed"]] = values[-1] if at == "last" else (
            max(values) if mode == "max" else min(values))
    return arms


@pytest.mark.parametrize(("at", "mode"), [("last", "max"), ("best", "max"), ("last", "min")])
def test_the_comparison_is_what_the_event_files_and_scipy_say(experiment, tmp_path, capsys, at, mode):
    out = tmp_path / "out" / "result.json"
    main([str(experiment), "--metric", "val_acc", "--mode", mode, "--at", at, "--json", str(out)])
    printed = capsys.readouterr().out
    result = json.loads(out.read_text())
    assert list(result) == ["metric", "mode", "at", "arms", "comparisons"]
    assert (result["metric"], result["mode"], result["at"]) == ("val_acc", mode, at)
    expected = recomputed(experiment, "val_acc", at, mode)
    assert result["arms"] == {arm: {str(s): pytest.approx(v, abs=0) for s, v in values.items()}
                              for arm, values in expected.items()}
    assert [(c["arm"], c["control"]) for c in result["comparisons"]] == [("dsd", "llr"), ("dsd", "dense"),
                                                                          ("llr", "dense")]
    rows = [line for line in printed.splitlines() if line.startswith("| `val_acc` |")]
    assert len(rows) == 3
    for comparison, row in zip(result["comparisons"], rows, strict=True):
        assert list(comparison) == ["arm", "control", "n", "mean", "low", "high", "detectable", "per_seed"]
        arm, control = expected[comparison["arm"]], expected[comparison["control"]]
        differences = [arm[s] - control[s] for s in SEEDS]
        assert comparison["per_seed"] == {str(s): pytest.approx(d, abs=1e-15) for s, d in zip(SEEDS, differences,
                                                                                               strict=True)}
        n, mean, sem = len(differences), sum(differences) / 3, stats.sem(differences)
        low, high = stats.t.interval(0.95, n - 1, loc=mean, scale=sem)
        detectable = (stats.t.ppf(0.975, n - 1) + stats.t.ppf(0.8, n - 1)) * sem
        assert comparison["n"] == 3
        for key, value in (("mean", mean), ("low", low), ("high", high), ("detectable", detectable)):
            assert comparison[key] == pytest.approx(value, rel=1e-9, abs=1e-12), key
        favouring = sum(d > 0 if mode == "max" else d < 0 for d in differences)
        assert row.startswith("| `val_acc` | 3 | ") and row.endswith(f"| {favouring}/3 |")
    assert "higher is better" in printed if mode == "max" else "lower is better" in printed
    assert "schedule 2/1/2 epochs" in printed
    assert matplotlib.image.imread(out.with_suffix(".png")).shape[2] in (3, 4), "the PNG is beside the JSON"


def test_without_json_the_png_goes_into_the_log_directory_and_the_api_gives_the_same_numbers(experiment, tmp_path,
                                                                                           capsys):
    logdir = tmp_path / "logs"
    shutil.copytree(experiment, logdir)
    report = main([str(logdir), "--metric", "val_acc", "--mode", "max"])
    assert (logdir / "dsd_compare_val_acc.png").exists() and str(logdir / "dsd_compare_val_acc.png") in (
        capsys.readouterr().out)
    again = compare(str(experiment), "val_acc", "max")
    assert again.as_json() == report.as_json()
    assert sorted(run.name for run in report.runs) == sorted(f"{arm}_seed{s}" for arm in ARMS for s in SEEDS)


def _copy(experiment: Path, logdir: Path, keep=lambda name: True) -> None:
    for run in experiment.iterdir():
        if run.is_dir() and keep(run.name):
            shutil.copytree(run, logdir / run.name)


def _unpaired(experiment, logdir):
    _copy(experiment, logdir, keep=lambda name: name != "llr_seed1")


def _missing_metric(experiment, logdir):
    _copy(experiment, logdir, keep=lambda name: name != "dense_seed2")
    log_run(logdir, "dense", 2, metric="val_loss")


def _mixed_schedules(experiment, logdir):
    _copy(experiment, logdir, keep=lambda name: name != "llr_seed1")
    log_run(logdir, "llr", 1, epochs=(1, 1, 1))


def _mixed_sparsities(experiment, logdir):
    _copy(experiment, logdir, keep=lambda name: name != "dsd_seed2")
    log_run(logdir, "dsd", 2, sparsity=0.5)


def _mixed_drops(experiment, logdir):
    _copy(experiment, logdir, keep=lambda name: name != "llr_seed0")
    log_run(logdir, "llr", 0, lr_scale=0.5)


def _one_seed(experiment, logdir):
    _copy(experiment, logdir, keep=lambda name: name.endswith("seed0"))


def _duplicate(experiment, logdir):
    _copy(experiment, logdir)
    shutil.copytree(experiment / "dsd_seed1", logdir / "old" / "dsd_seed1")


def _one_arm(experiment, logdir):
    _copy(experiment, logdir, keep=lambda name: name.startswith("dsd"))


def _no_dsd_run(experiment, logdir):
    writer = SummaryWriter(str(logdir / "someone_elses_run"))
    writer.add_scalar("val_acc", 0.5, 1)
    writer.close()


REFUSALS = [
    (_unpaired, r"unpaired seeds under .* \(dsd: seeds 0, 1, 2; llr: seeds 0, 2; dense: seeds 0, 1, 2\)\. Expected"
                r" every arm to have run every seed; missing: llr seed 1\. Run the missing runs"),
    (_missing_metric, r"1 of the 9 runs under .* never logged `val_acc`: dense_seed2 \(its scalars: .*val_loss.*\)\."
                      r" Expected every run to log it .* Metrics every run logs: .*dsd/phase"),
    (_mixed_schedules, r"runs of different schedules are mixed under .*: 2/1/2 epochs \(.*\); 1/1/1 epochs"
                       r" \(llr_seed1\)\. Expected one experiment, .* Put each experiment in a directory of its own"),
    (_mixed_sparsities, r"dsd runs of different sparsities are mixed under .*: 0\.8 \(dsd_seed0, dsd_seed1\); 0\.5"
                        r" \(dsd_seed2\)"),
    (_mixed_drops, r"dsd and llr runs with different learning-rate drops \(`lr_scale`\) are mixed .* x0\.5"
                   r" \(llr_seed0\)"),
    (_one_seed, r"only one seed under .* \(dsd: seeds 0; llr: seeds 0; dense: seeds 0\): a t interval needs .* at"
                r" least 2 paired seeds, .* Run more seeds of every arm"),
    (_duplicate, r"more than one run of the same arm and seed under .* \(dsd seed 1: dsd_seed1, old/dsd_seed1\)\."
                 r" Expected one run per arm and seed, .* Move the extra runs"),
    (_one_arm, r"only the `dsd` arm was found under .* \(dsd: seeds 0, 1, 2\)\. Expected at least two arms to compare:"
               r" run `llr` \(prune=False\) and `dense` \(prune=False, lr_scale=1\.0\)"),
    (_no_dsd_run, r"found no DSD run under .*: 1 runs of event files, none logged by DSDCallback or DSD\. Expected one"
                  r" run per arm"),
]


@pytest.mark.parametrize(("make", "message"), REFUSALS, ids=[make.__name__.strip("_") for make, _ in REFUSALS])
def test_what_cannot_be_compared_is_refused_with_one_clear_message(experiment, tmp_path, capsys, make, message):
    logdir = tmp_path / "logs"
    logdir.mkdir()
    make(experiment, logdir)
    with pytest.raises(CompareError, match=message):
        compare(str(logdir), "val_acc", "max")
    with pytest.raises(SystemExit, match=r"^compare: " + message):
        main([str(logdir), "--metric", "val_acc", "--mode", "max", "--json", str(tmp_path / "never.json")])
    assert not (tmp_path / "never.json").exists() and capsys.readouterr().out == "", "no table, no wrong number"


def test_an_empty_directory_and_a_missing_one_are_refused(tmp_path):
    with pytest.raises(CompareError, match=r"found no DSD run under .*: no event files at all"):
        compare(str(tmp_path), "val_acc", "max")
    with pytest.raises(CompareError, match=r"is not a directory"):
        compare(str(tmp_path / "nowhere"), "val_acc", "max")


def _docs_block(opening: str) -> str:
    page = (ROOT / "docs" / "does_it_help.md").read_text()
    blocks = [block.split("\n", 1)[1] for block in page.split("```")[1::2]]  # each fenced block, less its language
    return next(block for block in blocks if block.startswith(opening))


def test_the_docs_loop_over_seeds_and_arms_runs_as_written_and_compare_reads_it(tmp_path, monkeypatch):
    """The page's shell loop runs under bash with `python` standing in to record each call; the training calls of
    2 of its 5 seeds then run the page's script in this interpreter (a fresh one costs seconds each), and the
    comparison runs as the page writes it, `python -m lightning_dsd.compare`, in a fresh interpreter."""
    (tmp_path / "train_arm.py").write_text(_docs_block("# train_arm.py"))
    loop = _docs_block("for seed in")
    (tmp_path / "bin").mkdir()
    (tmp_path / "bin" / "python").write_text('#!/bin/sh\necho "$@" >> calls.txt\n')
    (tmp_path / "bin" / "python").chmod(0o755)
    env = {**os.environ, "PATH": f"{tmp_path / 'bin'}:{os.environ['PATH']}"}
    subprocess.run(["bash", "-c", loop], cwd=tmp_path, env=env, check=True, timeout=60)
    calls = (tmp_path / "calls.txt").read_text().splitlines()
    trainings = sorted(call for call in calls if call.startswith("train_arm.py"))
    assert trainings == sorted(f"train_arm.py {arm} {seed}" for arm in ARMS for seed in range(5))
    (command,) = [call for call in calls if not call.startswith("train_arm.py")]
    assert calls[-1] == command == "-m lightning_dsd.compare runs/my_model --metric val_acc --mode max --json" \
                                   " runs/my_model.json"

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(reporting, "_MATPLOTLIB_AVAILABLE", False)  # no five-panel figures: most of a run's time
    for call in trainings:
        _, arm, seed = call.split()
        if int(seed) < 2:
            monkeypatch.setattr(sys, "argv", ["train_arm.py", arm, seed])
            runpy.run_path(str(tmp_path / "train_arm.py"), run_name="__main__")
    run = subprocess.run([sys.executable, *command.split()], cwd=tmp_path, capture_output=True, text=True,
                         timeout=300, env={**os.environ, "PYTHONWARNINGS": "ignore"})
    assert run.returncode == 0, run.stdout + run.stderr
    assert "`val_acc`, last logged value, higher is better; 2 seeds (0, 1) per arm; schedule 3/2/2 epochs." in (
        run.stdout)
    header = "| dsd - llr | seeds | mean difference | 95% t interval | detectable (80% power) | seeds favouring dsd |"
    assert header in run.stdout and header in _docs_block("`val_acc`, last logged value")
    result = json.loads((tmp_path / "runs" / "my_model.json").read_text())
    assert result["arms"] == {arm: {str(s): v for s, v in values.items()}
                              for arm, values in recomputed(tmp_path / "runs" / "my_model", "val_acc", "last",
                                                            "max").items()}
    assert (tmp_path / "runs" / "my_model.png").exists()
