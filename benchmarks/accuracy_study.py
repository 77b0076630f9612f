"""Does DSD help, and when? A paired study with confidence intervals, in the regimes the paper claims.

For every seed, one dense phase is trained once and saved; every arm then resumes from that very
checkpoint, with the same data order (an epoch-seeded sampler), so the arms differ only where they differ:

1. ``dense``: plain training for the rest of the budget;
2. ``LLR``: the same, with the same 10x learning-rate drop at the epoch (each epoch, over cycles) where
   DSD enters re-dense (the paper's control: it separates DSD's effect from the lower learning rate);
3. ``DSD``: sparse then re-dense phases; ``sparse`` is its model at the end of its (last) sparse phase.

Per setting it reports the arms' mean ± std and the **paired** differences DSD - LLR and DSD - dense
(mean over seeds with a 95% t confidence interval; ``*`` where the interval excludes 0), and saves a plot
of the per-seed differences. Settings (all on data generated or shipped locally):

* ``mlp``: MNIST-1D, an over-parameterized MLP that overfits (train loss near 0), sparsity 0.5, with a
  sparsity sweep (``mlp-s0.3``, ``mlp-s0.8``) that reuses the same dense phase and controls;
* ``mlp-2cycles``: the same MLP with two DSD cycles ``(0.5, 0.25)``;
* ``cnn``: the MNIST-1D CNN with its first convolution kept dense (the paper's choice);
* ``gru``: a GRU reading MNIST-1D as a sequence, pruned at 0.8 (the paper's LSTM setting).

    python benchmarks/accuracy_study.py                              # the full study, 10 seeds
    python benchmarks/accuracy_study.py --seeds 1 --families mlp --epochs-scale 0.1   # smoke run
"""

from __future__ import annotations

import argparse
import logging
import math
import os
import statistics
import sys
import tempfile
import time
import warnings
from dataclasses import dataclass, field
from typing import Iterator, Optional, Sequence

import lightning.pytorch as pl
import torch
from scipy import stats
from torch.utils.data import DataLoader, Sampler

from lightning_dsd import DSDCallback
from lightning_dsd.demo import Classifier, Data, LearningRateDrop, PhaseAccuracy, accuracy, build_network, load_data


@dataclass(frozen=True)
class Setting:
    """One DSD arm: its sparsities (one per cycle) and the parameters kept dense."""

    name: str
    sparsities: tuple[float, ...]
    exclude: Optional[tuple[str, ...]] = None


@dataclass(frozen=True)
class Family:
    """Settings that share one dense phase and one pair of controls (same model and schedule)."""

    name: str
    dataset: str
    model: str
    epochs: tuple[int, int, int]  # dense, sparse, re-dense (per cycle)
    cycles: int
    settings: tuple[Setting, ...]

    @property
    def total(self) -> int:
        dense, sparse, redense = self.epochs
        return dense + self.cycles * (sparse + redense)

    @property
    def redense_starts(self) -> list[int]:
        dense, sparse, redense = self.epochs
        return [dense + cycle * (sparse + redense) + sparse for cycle in range(self.cycles)]


FAMILIES = {
    "mlp": Family("mlp", "mnist1d", "mlp", (40, 20, 20), 1, (
        Setting("mlp", (0.5,)), Setting("mlp-s0.3", (0.3,)), Setting("mlp-s0.8", (0.8,)))),
    "mlp-2cycles": Family("mlp-2cycles", "mnist1d", "mlp", (40, 15, 15), 2, (Setting("mlp-2cycles", (0.5, 0.25)),)),
    "cnn": Family("cnn", "mnist1d", "cnn", (40, 20, 20), 1, (Setting("cnn", (0.5,), exclude=("network.1.*",)),)),
    "gru": Family("gru", "mnist1d", "gru", (30, 15, 15), 1, (Setting("gru", (0.8,)),)),
}


class EpochSeededSampler(Sampler[int]):
    """A shuffle that depends only on (seed, epoch), so every arm resumed at epoch e sees the same order."""

    def __init__(self, size: int, seed: int) -> None:
        self.size, self.seed, self.epoch = size, seed, 0

    def set_epoch(self, epoch: int) -> None:  # Lightning calls this at every epoch start
        self.epoch = epoch

    def __iter__(self) -> Iterator[int]:
        generator = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
        return iter(torch.randperm(self.size, generator=generator).tolist())

    def __len__(self) -> int:
        return self.size


def _trainer(epochs: int, callbacks: list) -> pl.Trainer:
    return pl.Trainer(max_epochs=epochs, accelerator="cpu", logger=False, callbacks=callbacks,
                      enable_checkpointing=False, enable_model_summary=False, enable_progress_bar=False,
                      num_sanity_val_steps=0, deterministic=True)


@dataclass
class SeedResult:
    dense: float
    llr: float
    dsd: dict[str, float] = field(default_factory=dict)
    sparse: dict[str, float] = field(default_factory=dict)


def run_family(family: Family, data: Data, seed: int, directory: str, scale: float) -> SeedResult:
    """One seed of one family: the shared dense phase, then every arm resumed from it."""
    dense_epochs, sparse_epochs, redense_epochs = (max(1, round(e * scale)) for e in family.epochs)
    family = Family(family.name, family.dataset, family.model, (dense_epochs, sparse_epochs, redense_epochs),
                    family.cycles, family.settings)
    loader = DataLoader(data.train, batch_size=128, sampler=EpochSeededSampler(len(data.train), seed))

    def module() -> Classifier:
        pl.seed_everything(seed, verbose=False)
        return Classifier(build_network(family.model, data.length, data.classes), data.classes, lr=3e-3)

    dense_phase = os.path.join(directory, f"{family.name}-seed{seed}-dense.ckpt")
    trainer = _trainer(dense_epochs, [])
    trainer.fit(module(), loader)
    trainer.save_checkpoint(dense_phase)

    def resume(callbacks: list) -> Classifier:
        model = module()
        _trainer(family.total, callbacks).fit(model, loader, ckpt_path=dense_phase)
        return model

    result = SeedResult(dense=accuracy(resume([]), data.test),
                        llr=accuracy(resume([LearningRateDrop(family.redense_starts, 0.1)]), data.test))
    for setting in family.settings:
        dsd = DSDCallback(setting.sparsities, dense_epochs, sparse_epochs, redense_epochs, exclude=setting.exclude)
        phases = PhaseAccuracy(dsd, data.test)
        result.dsd[setting.name] = accuracy(resume([dsd, phases]), data.test)
        last_sparse = "sparse" if family.cycles == 1 else f"sparse{family.cycles - 1}"
        result.sparse[setting.name] = phases.at_phase_end[last_sparse]
    return result


def paired(differences: Sequence[float]) -> str:
    """Mean of paired differences in points, with a 95% t interval and ``*`` where it excludes 0."""
    mean = 100 * statistics.mean(differences)
    if len(differences) < 2:
        return f"{mean:+.2f}"
    half = 100 * stats.t.ppf(0.975, len(differences) - 1) * statistics.stdev(differences) / math.sqrt(len(differences))
    significant = "*" if abs(mean) > half else ""
    return f"{mean:+.2f} [{mean - half:+.2f}, {mean + half:+.2f}]{significant}"


def _mean_std(values: Sequence[float]) -> str:
    std = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{100 * statistics.mean(values):.2f} ± {100 * std:.2f}"


def run_study(families: Sequence[str], seeds: int, scale: float) -> tuple[list[dict[str, str]], dict]:
    rows, differences = [], {}
    cached: dict[str, Data] = {}
    with tempfile.TemporaryDirectory() as directory:
        for name in families:
            family = FAMILIES[name]
            data = cached.setdefault(family.dataset, load_data(family.dataset))
            results = []
            for seed in range(seeds):
                results.append(run_family(family, data, seed, directory, scale))
                last = results[-1]
                print(f"  {name} seed {seed}: dense {100 * last.dense:.1f}, LLR {100 * last.llr:.1f}, "
                      + ", ".join(f"{s} {100 * v:.1f}" for s, v in last.dsd.items()), file=sys.stderr, flush=True)
            for setting in family.settings:
                dsd = [r.dsd[setting.name] for r in results]
                versus_llr = [d - r.llr for d, r in zip(dsd, results, strict=True)]
                versus_dense = [d - r.dense for d, r in zip(dsd, results, strict=True)]
                differences[setting.name] = {"DSD - LLR": versus_llr, "DSD - dense": versus_dense}
                rows.append({
                    "setting": setting.name,
                    "sparsity": "/".join(f"{s:g}" for s in setting.sparsities),
                    "dense": _mean_std([r.dense for r in results]),
                    "LLR": _mean_std([r.llr for r in results]),
                    "sparse": _mean_std([r.sparse[setting.name] for r in results]),
                    "DSD": _mean_std(dsd),
                    "DSD - LLR (95% CI)": paired(versus_llr),
                    "DSD - dense (95% CI)": paired(versus_dense),
                })
    return rows, differences


def markdown_table(rows: list[dict[str, str]]) -> str:
    header = list(rows[0])
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(row[h] for h in header) + " |" for row in rows]
    return "\n".join(lines)


def plot_differences(differences: dict, path: str) -> None:
    """One point per seed for each setting and comparison, with the mean and its 95% interval."""
    from matplotlib.figure import Figure

    figure = Figure(figsize=(4 + 1.2 * len(differences), 3.6), layout="constrained")
    axes = figure.subplots(1, 2, sharey=True)
    for ax, comparison in zip(axes, ("DSD - LLR", "DSD - dense"), strict=True):
        for x, by_comparison in enumerate(differences.values()):
            values = [100 * d for d in by_comparison[comparison]]
            jitter = [x + 0.15 * ((i % 5) - 2) / 2 for i in range(len(values))]
            ax.scatter(jitter, values, s=12, color="#2a6fb0", alpha=0.7)
            if len(values) > 1:
                half = stats.t.ppf(0.975, len(values) - 1) * statistics.stdev(values) / math.sqrt(len(values))
                ax.errorbar([x + 0.3], [statistics.mean(values)], yerr=[half], fmt="o", color="#c0392b", capsize=4)
        ax.axhline(0, color="grey", linewidth=0.8)
        ax.set_xticks(range(len(differences)), list(differences), rotation=30, fontsize=8)
        ax.set_title(f"{comparison} (points of test accuracy)", fontsize=10)
    figure.savefig(path, dpi=90)


def main(argv: Sequence[str] | None = None) -> str:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--families", nargs="+", default=list(FAMILIES), choices=list(FAMILIES))
    parser.add_argument("--seeds", type=int, default=10)
    parser.add_argument("--epochs-scale", type=float, default=1.0, help="multiply every phase length (smoke runs)")
    parser.add_argument("--table", default="benchmarks/results/accuracy_study.md", help="where the table goes")
    parser.add_argument("--plot", default="docs/accuracy_study.png", help="where the plot of differences goes")
    args = parser.parse_args(argv)
    warnings.filterwarnings("ignore")
    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    started = time.perf_counter()
    rows, differences = run_study(args.families, args.seeds, args.epochs_scale)
    elapsed = time.perf_counter() - started
    schedule = "; ".join(f"{f}: {'/'.join(map(str, FAMILIES[f].epochs))} x{FAMILIES[f].cycles}" for f in args.families)
    text = (
        f"Test accuracy (%) on MNIST-1D, mean ± std over {args.seeds} seeds, and paired differences DSD - control"
        f" in points (mean [95% t interval], * = excludes 0). Epochs dense/sparse/re-dense x cycles: {schedule}"
        f" (scaled by {args.epochs_scale:g}). Adam lr 3e-3, batch 128; every arm of a seed resumes from one shared"
        f" dense phase. {elapsed:.0f} s on {torch.get_num_threads()} CPU threads.\n\n{markdown_table(rows)}\n"
    )
    print(text)
    for path in (args.table, args.plot):
        os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    with open(args.table, "w") as table:
        table.write(text)
    plot_differences(differences, args.plot)
    print(f"({elapsed:.0f} s; table in {args.table}, plot in {args.plot})")
    return markdown_table(rows)


if __name__ == "__main__":
    main()
