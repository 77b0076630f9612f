"""``python -m lightning_dsd.compare LOGDIR --metric val_acc --mode max``: does DSD help *this* model?

Every run that ``DSDCallback``, ``DSD`` or ``DSDTrainerCallback`` logs to TensorBoard keeps a record (``dsd/run``, see
:mod:`lightning_dsd.rules.reporting`): its arm (``dsd``, ``llr`` for ``prune=False``, ``dense`` for ``prune=False,
lr_scale=1.0``), its seed, its schedule and its options. This tool finds every run under ``LOGDIR`` (every
directory of event files, read with TensorBoard's own reader), pairs the arms by seed, and prints one Markdown
table per pair of arms (dsd - llr, dsd - dense, llr - dense; with ``obd`` or ``custom`` arms, runs pruned by
``importance="obd"`` or a callable, also obd - dsd, obd - llr, custom - dsd, custom - llr) with the mean paired
difference of the metric, its 95% t interval, the smallest difference the seeds could detect with 80% power and
how many seeds favour the arm (the formulas are in :mod:`lightning_dsd.tools.statistics`).

The metric of a run is its last logged value (``--at last``) or its best one (``--at best``, by ``--mode``). A PNG
of the per-seed differences goes beside the ``--json`` file (``results.json`` -> ``results.png``), else into
``LOGDIR`` as ``dsd_compare_<metric>.png``; ``--plot FILE`` puts it elsewhere. ``--json FILE`` writes::

    {"metric", "mode", "at", "arms": {arm: {seed: value}},
     "comparisons": [{"arm", "control", "n", "mean", "low", "high", "detectable", "per_seed": {seed: difference}}]}

Refused, each with one message that says what was found, what was expected and what to do: no DSD run, two
runs of one arm and seed, runs of different schedules (or DSD arms of different sparsities or learning-rate
drops), a run without the metric, a single arm, seeds that not every arm ran, and fewer than 2 seeds.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import sys
from dataclasses import dataclass, field
from typing import Any, Optional, Sequence

from lightning_dsd.rules.reporting import RUN_RECORD_TAG, read_run_record
from lightning_dsd.tools.statistics import Paired, paired

ARMS = ("dsd", "obd", "custom", "llr", "dense")
PRUNING_ARMS = ("dsd", "obd", "custom")  # pruned by magnitude, by `importance="obd"`, by a callable
PAIRS = (("dsd", "llr"), ("dsd", "dense"), ("llr", "dense"), ("obd", "dsd"), ("obd", "llr"), ("custom", "dsd"),
         ("custom", "llr"))
AT = ("last", "best")
_RECORD = f"{RUN_RECORD_TAG}/text_summary"  # how torch's SummaryWriter names a text summary's tag
_HOW_TO_READ = (
    "Differences are arm - control, seed by seed. An interval that excludes 0 is a difference these seeds tell\n"
    "from seed-to-seed noise; `detectable` is the smallest true difference they would find 4 times in 5: a\n"
    "smaller effect needs more seeds (halving it takes about 4 times as many)."
)


class CompareError(ValueError):
    """The runs under the log directory cannot be compared as they are; the message says why and what to do."""


@dataclass
class Run:
    """One run: where its events are, what its record says, and the metric's logged ``(step, value)`` pairs."""

    name: str
    arm: str
    seed: int
    record: dict[str, Any]
    values: Optional[list[tuple[int, float]]]  # None: the metric was never logged
    scalar_tags: list[str] = field(default_factory=list)


@dataclass
class Comparison:
    """An arm against a control over the seeds both ran."""

    arm: str
    control: str
    per_seed: dict[int, float]
    result: Paired

    def as_json(self) -> dict[str, Any]:
        r = self.result
        return {"arm": self.arm, "control": self.control, "n": r.n, "mean": r.mean, "low": r.low, "high": r.high,
                "detectable": r.detectable, "per_seed": {str(seed): d for seed, d in self.per_seed.items()}}


@dataclass
class Report:
    """The whole comparison: each arm's metric per seed and every pair of arms, with the runs it read."""

    logdir: str
    metric: str
    mode: str
    at: str
    arms: dict[str, dict[int, float]]
    comparisons: list[Comparison]
    runs: list[Run]

    def as_json(self) -> dict[str, Any]:
        return {"metric": self.metric, "mode": self.mode, "at": self.at,
                "arms": {arm: {str(seed): v for seed, v in values.items()} for arm, values in self.arms.items()},
                "comparisons": [comparison.as_json() for comparison in self.comparisons]}

    def tables(self) -> str:
        """One Markdown table per pair of arms, with each seed's difference below it."""
        better = "higher" if self.mode == "max" else "lower"
        at = "last logged value" if self.at == "last" else f"best logged value ({self.mode})"
        schedule = _schedule_text(self.runs[0].record)
        seeds = sorted(next(iter(self.arms.values())))
        blocks = [f"`{self.metric}`, {at}, {better} is better; {len(seeds)} seeds ({_listed(seeds)}) per arm;"
                  f" schedule {schedule}."]
        for comparison in self.comparisons:
            r, arm, control = comparison.result, comparison.arm, comparison.control
            places = _decimals(r.detectable, list(comparison.per_seed.values()))
            lines = [
                f"| {arm} - {control} | seeds | mean difference | 95% t interval | detectable (80% power) |"
                f" seeds favouring {arm} |",
                "|---|---|---|---|---|---|",
                f"| `{self.metric}` | {r.n} | {r.mean:+.{places}f} | [{r.low:+.{places}f}, {r.high:+.{places}f}]"
                f"{'*' if r.low > 0 or r.high < 0 else ''} | {r.detectable:.{places}f} | {r.favouring}/{r.n} |",
            ]
            per_seed = ", ".join(f"{seed}: {d:+.{places}f}" for seed, d in comparison.per_seed.items())
            blocks.append("\n".join(lines) + f"\n\nper seed ({arm} - {control}): {per_seed}")
        blocks.append(_HOW_TO_READ + " `*`: the interval excludes 0.")
        return "\n\n".join(blocks)


def compare(logdir: str, metric: str, mode: str, at: str = "last") -> Report:
    """Read every run under ``logdir``, check that they make one paired experiment, and compare the arms."""
    if mode not in ("min", "max"):
        raise CompareError(f"`mode` must be 'min' or 'max' (is a lower or a higher `{metric}` better?)."
                           f" Found: {mode!r}.")
    if at not in AT:
        raise CompareError(f"`at` must be one of {list(AT)}. Found: {at!r}.")
    runs = find_runs(logdir, metric)
    _check_one_experiment(runs, logdir)
    missing = [run for run in runs if not run.values]
    if missing:
        shared = sorted(set.intersection(*(set(run.scalar_tags) for run in runs)))
        raise CompareError(
            f"{len(missing)} of the {len(runs)} runs under {logdir} never logged `{metric}`: "
            + "; ".join(f"{run.name} (its scalars: {_listed(sorted(run.scalar_tags)) or 'none'})" for run in missing)
            + f". Expected every run to log it (e.g. `self.log({metric!r}, ...)` in the LightningModule). Metrics every"
            f" run logs: {_listed(shared) or 'none'}; pass one of them as --metric, or rerun these runs."
        )
    pick = max if mode == "max" else min
    arms: dict[str, dict[int, float]] = {}
    for run in sorted(runs, key=lambda r: (ARMS.index(r.arm), r.seed)):
        values = run.values or []
        arms.setdefault(run.arm, {})[run.seed] = values[-1][1] if at == "last" else pick(v for _, v in values)
    _check_paired(arms, logdir)
    comparisons = []
    for arm, control in PAIRS:
        if arm in arms and control in arms:
            differences = {seed: arms[arm][seed] - arms[control][seed] for seed in sorted(arms[arm])}
            result = paired(list(differences.values()), higher_is_better=mode == "max")
            comparisons.append(Comparison(arm, control, differences, result))
    return Report(logdir, metric, mode, at, arms, comparisons, runs)


def find_runs(logdir: str, metric: str) -> list[Run]:
    """Every directory of event files under ``logdir`` that holds a DSD run's record, read with TensorBoard's
    ``EventMultiplexer`` (every scalar kept); runs without a record are named on stderr and left out."""
    from tensorboard.backend.event_processing import event_accumulator, event_multiplexer

    if not os.path.isdir(logdir):
        raise CompareError(f"{logdir} is not a directory. Expected the log directory the runs wrote to (e.g. the"
                           " `save_dir` of their TensorBoardLogger).")
    keep_all = {event_accumulator.SCALARS: 0, event_accumulator.TENSORS: 0, event_accumulator.HISTOGRAMS: 1,
                event_accumulator.IMAGES: 1, event_accumulator.COMPRESSED_HISTOGRAMS: 1}
    multiplexer = event_multiplexer.EventMultiplexer(size_guidance=keep_all)
    multiplexer.AddRunsFromDirectory(logdir)
    multiplexer.Reload()
    runs, unrecorded = [], []
    for name in sorted(multiplexer.Runs()):
        accumulator = multiplexer.GetAccumulator(name)
        tags = accumulator.Tags()
        if _RECORD not in tags.get(event_accumulator.TENSORS, []):
            unrecorded.append(name)
            continue
        records = [read_run_record(event.tensor_proto.string_val[0].decode()) for event in accumulator.Tensors(_RECORD)]
        kinds = sorted({f"{record['arm']} seed {record['seed']}" for record in records})
        if len(kinds) > 1:
            raise CompareError(
                f"the run {name} holds records of different arms or seeds ({_listed(kinds)}): two runs wrote to one"
                " directory. Expected one run per directory; give each arm and seed its own run name (e.g."
                " `TensorBoardLogger(..., version=f'{arm}_seed{seed}')`) and rerun them."
            )
        record = records[-1]  # a resumed run writes its record again, the same arm and seed
        scalars = list(tags.get(event_accumulator.SCALARS, []))
        values = [(e.step, e.value) for e in accumulator.Scalars(metric)] if metric in scalars else None
        runs.append(Run(name, record["arm"], int(record["seed"]), record, values, scalars))
    if unrecorded:
        print(f"compare: left out {len(unrecorded)} run(s) without a `{RUN_RECORD_TAG}` record (not logged by"
              f" DSDCallback or DSD): {_listed(unrecorded)}", file=sys.stderr)
    if not runs:
        found = f"{len(unrecorded)} runs of event files, none logged by DSDCallback or DSD" if unrecorded else (
            "no event files at all")
        raise CompareError(
            f"found no DSD run under {logdir}: {found}. Expected one run per arm (DSDCallback(...) for dsd,"
            " prune=False for llr, prune=False and lr_scale=1.0 for dense) and seed, each logged with a"
            " TensorBoardLogger (or a SummaryWriter given to DSD). See the docs' page \"Does it help my model?\"."
        )
    return runs


def _check_one_experiment(runs: list[Run], logdir: str) -> None:
    """One run per arm and seed; one schedule; one learning-rate drop for dsd and llr; one sparsity for dsd."""
    seen: dict[tuple[str, int], list[str]] = {}
    for run in runs:
        seen.setdefault((run.arm, run.seed), []).append(run.name)
    duplicates = {key: names for key, names in seen.items() if len(names) > 1}
    if duplicates:
        listed = "; ".join(f"{arm} seed {seed}: {_listed(names)}" for (arm, seed), names in sorted(duplicates.items()))
        raise CompareError(
            f"more than one run of the same arm and seed under {logdir} ({listed}). Expected one run per arm and"
            " seed, so that each seed pairs one run of each arm. Move the extra runs (an older version of a rerun,"
            " another experiment) out of this directory, or give them seeds of their own."
        )
    checks = [
        ("schedule", runs, lambda run: _schedule_text(run.record), "runs of different schedules"),
        ("lr_scale", [r for r in runs if r.arm != "dense"], lambda run: f"x{run.record['options']['lr_scale']:g}",
         "dsd and llr runs with different learning-rate drops (`lr_scale`)"),
        ("sparsity", [r for r in runs if r.arm in PRUNING_ARMS],
         lambda run: "/".join(str(s) for s in run.record["options"]["sparsities"]), "dsd runs of different sparsities"),
    ]
    for _, group, describe, problem in checks:
        kinds: dict[str, list[str]] = {}
        for run in group:
            kinds.setdefault(describe(run), []).append(run.name)
        if len(kinds) > 1:
            listed = "; ".join(f"{kind} ({_listed(names)})" for kind, names in kinds.items())
            raise CompareError(
                f"{problem} are mixed under {logdir}: {listed}. Expected one experiment, whose arms differ only in"
                " `prune` and `lr_scale`. Put each experiment in a directory of its own and compare each alone."
            )


def _check_paired(arms: dict[str, dict[int, float]], logdir: str) -> None:
    found = "; ".join(f"{arm}: seeds {_listed(sorted(values))}" for arm, values in arms.items())
    if len(arms) < 2:
        (arm,) = arms
        others = " and ".join(f"`{a}` ({_ARM_OPTIONS[a]})" for a in ("dsd", "llr", "dense") if a != arm)
        raise CompareError(
            f"only the `{arm}` arm was found under {logdir} ({found}). Expected at least two arms to compare: run"
            f" {others} with the same seeds and schedule."
        )
    every_seed = set().union(*arms.values())
    missing = {arm: sorted(every_seed - set(values)) for arm, values in arms.items() if every_seed - set(values)}
    if missing:
        listed = "; ".join(f"{arm} seed {_listed(seeds)}" for arm, seeds in missing.items())
        raise CompareError(
            f"unpaired seeds under {logdir} ({found}). Expected every arm to have run every seed; missing: {listed}."
            " Run the missing runs (or move the unpaired ones out of this directory)."
        )
    if len(every_seed) < 2:
        raise CompareError(
            f"only one seed under {logdir} ({found}): a t interval needs the spread of at least 2 paired seeds, and"
            " 5 to 10 are usual. Run more seeds of every arm."
        )


_ARM_OPTIONS = {"dsd": "DSDCallback(...) as it is", "obd": "importance='obd'", "custom": "importance=<a callable>",
                "llr": "prune=False", "dense": "prune=False, lr_scale=1.0"}


def _schedule_text(record: dict[str, Any]) -> str:
    schedule = record["schedule"]
    lengths = "/".join("until converged" if length is None else str(length) for _, _, length, *_ in schedule["stages"])
    return f"{lengths} {schedule['interval']}s"


def _listed(items: Sequence[Any]) -> str:
    return ", ".join(str(item) for item in items)


def _decimals(detectable: float, differences: Sequence[float]) -> int:
    """Enough decimals to show the detectable difference (or the largest difference) to 2 significant digits."""
    scale = detectable or max((abs(d) for d in differences), default=0.0)
    return 4 if not scale or not math.isfinite(scale) else min(10, max(1, 1 - math.floor(math.log10(scale))))


def plot(report: Report, path: str) -> None:
    """Each seed's difference of every pair of arms, with their mean and 95% t interval (needs matplotlib)."""
    from matplotlib.figure import Figure

    figure = Figure(figsize=(2.2 + 1.6 * len(report.comparisons), 3.6), layout="constrained")
    ax = figure.subplots()
    for x, comparison in enumerate(report.comparisons):
        seeds, differences = zip(*comparison.per_seed.items(), strict=True)
        ax.scatter([x - 0.12] * len(differences), differences, s=14, color="#2a6fb0", alpha=0.8, label=None)
        for seed, d in zip(seeds, differences, strict=True):
            ax.annotate(str(seed), (x - 0.12, d), xytext=(-9, 0), textcoords="offset points", fontsize=6,
                        ha="right", va="center", color="#2a6fb0")
        r = comparison.result
        ax.errorbar([x + 0.12], [r.mean], yerr=[[r.mean - r.low], [r.high - r.mean]], fmt="o", color="#c0392b",
                    capsize=4)
    ax.axhline(0, color="grey", linewidth=0.8)
    ax.set_xticks(range(len(report.comparisons)), [f"{c.arm} - {c.control}" for c in report.comparisons])
    ax.set_xlim(-0.6, len(report.comparisons) - 0.4)
    ax.set_ylabel(f"difference in {report.metric} ({report.at})")
    ax.set_title(f"per seed (blue) and mean with 95% t interval (red); {'higher' if report.mode == 'max' else 'lower'}"
                 " is better", fontsize=8)
    figure.savefig(path, dpi=90)


def plot_path(report: Report, json_path: Optional[str], plot: Optional[str]) -> str:
    """Where the PNG goes: ``plot``, else beside the JSON file, else in the log directory."""
    if plot:
        return plot
    if json_path:
        return os.path.splitext(json_path)[0] + ".png"
    safe = re.sub(r"[^A-Za-z0-9_.-]+", "_", report.metric)
    return os.path.join(report.logdir, f"dsd_compare_{safe}.png")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m lightning_dsd.compare",
        description="Compare DSD with its controls (llr, dense), seed by seed, from the TensorBoard logs of the runs.",
    )
    parser.add_argument("logdir", help="the directory the runs logged to (every run below it is read)")
    parser.add_argument("--metric", required=True, help="a scalar every run logs, e.g. val_acc")
    parser.add_argument("--mode", required=True, choices=("max", "min"), help="max: higher is better; min: lower is")
    parser.add_argument("--at", choices=AT, default="last", help="each run's last logged value, or its best")
    parser.add_argument("--json", help="write the numbers to this file (the PNG goes beside it)")
    parser.add_argument("--plot", help="write the PNG of per-seed differences here instead")
    return parser


def main(argv: Optional[Sequence[str]] = None) -> Report:
    """The command line: print the tables, write the PNG (and the JSON); a refusal exits with its message."""
    args = build_parser().parse_args(argv)
    try:
        report = compare(args.logdir, args.metric, args.mode, args.at)
    except CompareError as error:
        raise SystemExit(f"compare: {error}") from None
    print(report.tables())
    if args.json:
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        with open(args.json, "w") as file:
            json.dump(report.as_json(), file, indent=1)
        print(f"\nNumbers: {args.json}")
    path = plot_path(report, args.json, args.plot)
    try:
        plot(report, path)
        print(f"Per-seed differences: {path}")
    except ModuleNotFoundError as error:
        if (error.name or "").split(".")[0] != "matplotlib":
            raise
        print("No PNG: matplotlib is not installed (pip install \"lightning-dsd[figures]\").", file=sys.stderr)
    return report


if __name__ == "__main__":
    main()
