"""The newcomer path: the demo command, the walkthrough notebook and the accuracy study, run for real."""

from __future__ import annotations

import glob
import json
import os
import re
import runpy
import shutil
import subprocess
import sys
import urllib.parse

import matplotlib.image
import nbformat
import pytest
from helpers import ROOT, tensorboard_server
from nbclient import NotebookClient

from lightning_dsd.tools.demo import main as demo_main
from lightning_dsd.tools.demo import run_demo


def test_the_demo_trains_dsd_and_a_baseline_and_tells_how_to_open_tensorboard(tmp_path, capsys):
    rows = run_demo(["--dataset", "digits", "--model", "mlp", "--epochs", "3", "2", "2", "--output", str(tmp_path)])
    assert list(rows) == ["after dense", "after sparse", "after re-dense (DSD)", "dense baseline (7 epochs)"]
    assert all(0.8 < accuracy <= 1.0 for accuracy in rows.values()), rows
    printed = capsys.readouterr().out
    assert f"tensorboard --logdir {tmp_path}" in printed
    assert re.search(r"dsd[=:] ?redense", printed)  # the progress bar (tqdm or rich) shows the phase
    assert glob.glob(str(tmp_path / "dsd" / "version_0" / "events.out.tfevents.*"))
    assert len(glob.glob(str(tmp_path / "dsd" / "version_0" / "dsd_figures" / "*.png"))) == 2


def test_the_demo_over_seeds_runs_the_three_arms_and_ends_with_their_paired_comparison(tmp_path, capsys):
    (tmp_path / "arms" / "dsd_seed9").mkdir(parents=True)  # an earlier call's run: replaced, not compared
    means = run_demo(["--dataset", "digits", "--epochs", "1", "1", "1", "--seeds", "2", "--output", str(tmp_path)])
    assert list(means) == ["dsd - llr", "dsd - dense", "llr - dense"]
    runs = sorted(path.name for path in (tmp_path / "arms").iterdir())
    assert runs == sorted(f"{arm}_seed{seed}" for arm in ("dsd", "llr", "dense") for seed in (0, 1))
    printed = capsys.readouterr().out
    tables = printed[printed.index("`val_acc`, last logged value"):]
    assert "2 seeds (0, 1) per arm; schedule 1/1/1 epochs" in tables
    for arm, control in (("dsd", "llr"), ("dsd", "dense"), ("llr", "dense")):
        assert f"| {arm} - {control} | seeds | mean difference | 95% t interval |" in tables
    assert f"tensorboard --logdir {tmp_path / 'arms'}" in tables
    with pytest.raises(SystemExit):
        run_demo(["--seeds", "0"])


@pytest.mark.slow
def test_the_demo_default_dataset_is_mnist1d_generated_locally(tmp_path):
    rows = run_demo(["--model", "cnn", "--epochs", "2", "1", "1", "--output", str(tmp_path)])
    assert all(0.3 < accuracy <= 1.0 for accuracy in rows.values()), rows  # 10 classes: chance is 0.1
    # Four epochs in, the CNN is still learning: each phase ends better than the dense phase did
    # (measured 0.43 -> 0.49 -> 0.52 for seed 0 and 0.46 -> 0.52 -> 0.56 for seed 1).
    assert rows["after dense"] < rows["after sparse"] < rows["after re-dense (DSD)"], rows


@pytest.mark.slow
def test_tensorboard_serves_both_runs_their_accuracy_and_the_transition_notes(tmp_path):
    run_demo(["--dataset", "digits", "--model", "mlp", "--epochs", "2", "2", "2", "--output", str(tmp_path)])
    runs = ("dsd/version_0", "dense_baseline/version_0")
    with tensorboard_server(tmp_path) as get_json:
        assert set(get_json("/data/runs", until=lambda r: len(r) == 2)) == set(runs)
        scalars = get_json("/data/plugin/scalars/tags", until=lambda t: all(r in t for r in runs))
        for run in runs:
            assert {"val_acc", "val_loss"} <= set(scalars[run])
            query = urllib.parse.urlencode({"run": run, "tag": "val_acc"})
            accuracies = get_json(f"/data/plugin/scalars/scalars?{query}")
            assert len(accuracies) == 6 and all(0.5 < value <= 1 for _, _, value in accuracies), run
        assert {"dsd/phase", "dsd/sparsity", "dsd_lr/optimizer0_group0"} <= set(scalars[runs[0]])
        text_tags = get_json("/data/plugin/text/tags")
        assert {run: sorted(tags) for run, tags in text_tags.items()} == {  # each run's record, the notes
            run: ["dsd/run/text_summary", "dsd/transitions/text_summary"] for run in runs}
        query = urllib.parse.urlencode({"run": runs[0], "tag": "dsd/transitions/text_summary"})
        notes = get_json(f"/data/plugin/text/text?{query}")
        assert [note["step"] for note in notes] == [24, 48]  # 12 steps an epoch, transitions after epochs 2 and 4
        assert "Pruned" in notes[0]["text"] and "learning rate x0.1" in notes[1]["text"]
        layout = get_json(f"/data/plugin/custom_scalars/layout?{urllib.parse.urlencode({'run': runs[0]})}")
        charts = {chart["title"]: chart["multiline"]["tag"] for chart in layout["category"][0]["chart"]}
        assert charts["learning rate"] == ["dsd_lr/.*"]


def test_without_the_demo_extra_the_demo_says_what_to_install_in_one_line(monkeypatch, tmp_path):
    for name in [name for name in sys.modules if name.split(".")[0] == "mnist1d"] + ["mnist1d"]:
        monkeypatch.setitem(sys.modules, name, None)  # as if `pip install lightning-dsd` had no [demo]
    monkeypatch.setattr(sys, "argv", ["lightning-dsd-demo", "--epochs", "1", "1", "1", "--output", str(tmp_path)])
    with pytest.raises(SystemExit) as stopped:
        demo_main()
    assert str(stopped.value) == 'The demo needs `mnist1d`: pip install "lightning-dsd[demo]"'


def test_the_console_script_is_installed():
    script = shutil.which("lightning-dsd-demo", path=os.path.dirname(sys.executable))
    assert script is not None
    result = subprocess.run([script, "--help"], capture_output=True, text=True, check=True)
    for option in ("--dataset", "--model", "--sparsity", "--epochs", "--seed", "--seeds", "--output"):
        assert option in result.stdout


@pytest.mark.slow
def test_the_walkthrough_notebook_runs_top_to_bottom(tmp_path, monkeypatch):
    monkeypatch.setenv("DSD_NOTEBOOK_EPOCHS", "2")
    monkeypatch.setenv("DSD_NOTEBOOK_LOGDIR", str(tmp_path))
    notebook = nbformat.read(ROOT / "notebooks" / "dsd_walkthrough.ipynb", as_version=4)
    assert all(not cell.get("outputs") for cell in notebook.cells if cell.cell_type == "code"), "commit it stripped"
    resources = {"metadata": {"path": str(tmp_path)}}
    NotebookClient(notebook, timeout=600, kernel_name="python3", resources=resources).execute()
    images = [o for cell in notebook.cells for o in cell.get("outputs", []) if "image/png" in o.get("data", {})]
    assert len(images) == 2, "the five-panel figures are shown inline"
    printed = "".join(o.get("text", "") for cell in notebook.cells for o in cell.get("outputs", []))
    assert "dense baseline" in printed and "tensorboard --logdir" in printed


def _cells(table: str) -> list[dict[str, str]]:
    header, _, *rows = table.strip().splitlines()
    columns = [cell.strip() for cell in header.strip("|").split("|")]
    return [dict(zip(columns, (c.strip() for c in row.strip("|").split("|")), strict=True)) for row in rows]


def _interval(text: str) -> tuple[float, float, float]:
    match = re.fullmatch(r"([+-]\d+\.\d\d) \[([+-]\d+\.\d\d), ([+-]\d+\.\d\d)\]\*?", text)
    assert match, text
    mean, low, high = map(float, match.groups())
    assert low <= mean <= high
    assert text.endswith("*") == (low > 0 or high < 0), "* marks exactly the intervals that exclude 0"
    return mean, low, high


@pytest.mark.slow
def test_the_accuracy_study_smoke_run_writes_paired_tables_per_seed_results_and_a_plot(tmp_path):
    study = runpy.run_path(str(ROOT / "benchmarks" / "accuracy_study.py"))
    table_path, plot_path = tmp_path / "study.md", tmp_path / "study.png"
    text = study["main"](["--seeds", "2", "--families", "mlp", "charlm", "--epochs-scale", "0.05", "--processes", "1",
                          "--table", str(table_path), "--plot", str(plot_path)])
    classifiers, language_model, controls = [_cells(t) for t in text.split("\n\n")[1:4]]
    raw = json.loads(table_path.with_suffix(".json").read_text())
    seeds = raw["per_seed"]["mlp"]
    assert [s["seed"] for s in seeds] == [0, 1] and raw["families"]["mlp"]["epochs"] == [2, 1, 1]
    assert [row["arm"] for row in classifiers] == [arm["name"] for arm in raw["families"]["mlp"]["arms"]]
    for row in classifiers:
        tests = [s["arms"][row["arm"]]["test"] for s in seeds]
        assert float(row["test accuracy %"].split(" ± ")[0]) == pytest.approx(100 * sum(tests) / 2, abs=0.006)
        assert float(row["train loss"]) == pytest.approx(sum(s["arms"][row["arm"]]["train_loss"] for s in seeds) / 2,
                                                         abs=6e-4)
        if row["arm"] not in ("dense", "LLR"):
            mean, _, _ = _interval(row["- LLR (95% CI)"])
            llr = [s["arms"]["LLR"]["test"] for s in seeds]
            assert mean == pytest.approx(100 * (sum(tests) - sum(llr)) / 2, abs=0.006), "paired mean"
    assert [row["arm"] for row in language_model] == ["dense", "LLR", "DSD 0.3", "DSD 0.5"]
    assert all(2 < float(row["bits/char (val)"].split(" ± ")[0]) < 8 for row in language_model)
    assert [row["DSD 0.8 -"] for row in controls] == ["WD-tuned", "sparse-only 0.8", "random-mask DSD 0.8",
                                                      "DSD 0.8, Adam state cleared", "LLR"]
    for row in controls:
        _interval(row["points (95% CI)"])
    assert all(s["arms"]["WD-tuned"]["weight_decay"] in raw["weight_decays"] for s in seeds)
    assert text in table_path.read_text() or table_path.read_text() in text
    assert matplotlib.image.imread(plot_path).shape[2] in (3, 4)
