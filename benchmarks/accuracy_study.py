"""Does DSD help, and compared to what? Test accuracy, mean ± std over seeds, for four arms:

1. ``dense``: plain training for the whole budget;
2. ``LLR``: the same budget with the same 10x learning-rate drop at the epoch DSD enters re-dense (the
   paper's control: it separates DSD's effect from the lower learning rate);
3. ``sparse``: the DSD run's model at the end of its sparse phase (a 50%-sparse model);
4. ``DSD``: the DSD run at the end.

Plus the mean |w| of the targeted weights at the end of dense and at the end of DSD (the paper reports
that it shrinks). Runs on MNIST-1D (MLP and CNN) and scikit-learn's digits (MLP).

    python benchmarks/accuracy_study.py                    # the full study, ~20 minutes on 2 CPU cores
    python benchmarks/accuracy_study.py --seeds 1 --epochs 2 1 1 --configs digits:mlp   # smoke run
"""

from __future__ import annotations

import argparse
import logging
import statistics
import sys
import time
import warnings
from typing import Sequence

from lightning_dsd.demo import load_data, train_dense, train_dsd

DEFAULT_CONFIGS = ("mnist1d:mlp", "mnist1d:cnn", "digits:mlp")


def _mean_std(values: Sequence[float]) -> str:
    std = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{100 * statistics.mean(values):.2f} ± {100 * std:.2f}"


def run_study(configs: Sequence[str], seeds: int, epochs: Sequence[int], sparsity: float) -> list[dict[str, str]]:
    dense_epochs, sparse_epochs, redense_epochs = epochs
    total = sum(epochs)
    rows = []
    for config in configs:
        dataset, model = config.split(":")
        data = load_data(dataset)
        arms: dict[str, list[float]] = {"dense": [], "LLR": [], "sparse": [], "DSD": []}
        mean_abs_before, mean_abs_after = [], []
        for seed in range(seeds):
            dsd = train_dsd(data, model, sparsity, epochs, seed)
            arms["DSD"].append(dsd.accuracy)
            arms["sparse"].append(dsd.phase_accuracy["sparse"])
            mean_abs_before.append(dsd.phase_mean_abs["dense"])
            mean_abs_after.append(dsd.phase_mean_abs["redense"])
            arms["dense"].append(train_dense(data, model, total, seed).accuracy)
            arms["LLR"].append(train_dense(data, model, total, seed, lr_drop_at=dense_epochs + sparse_epochs).accuracy)
            print(f"  {config} seed {seed}: " + ", ".join(f"{k} {100 * v[-1]:.1f}" for k, v in arms.items()),
                  file=sys.stderr, flush=True)
        rows.append({
            "config": f"{dataset} {model.upper()}",
            **{arm: _mean_std(values) for arm, values in arms.items()},
            "DSD - dense": f"{100 * (statistics.mean(arms['DSD']) - statistics.mean(arms['dense'])):+.2f}",
            "DSD - LLR": f"{100 * (statistics.mean(arms['DSD']) - statistics.mean(arms['LLR'])):+.2f}",
            "mean abs(w) dense -> DSD": (
                f"{statistics.mean(mean_abs_before):.4f} -> {statistics.mean(mean_abs_after):.4f}"
            ),
        })
    return rows


def markdown_table(rows: list[dict[str, str]]) -> str:
    header = list(rows[0])
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(row[h] for h in header) + " |" for row in rows]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> str:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--configs", nargs="+", default=list(DEFAULT_CONFIGS), help="dataset:model pairs")
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--epochs", type=int, nargs=3, default=[30, 15, 15], metavar=("DENSE", "SPARSE", "REDENSE"))
    parser.add_argument("--sparsity", type=float, default=0.5)
    args = parser.parse_args(argv)
    warnings.filterwarnings("ignore")
    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    started = time.perf_counter()
    table = markdown_table(run_study(args.configs, args.seeds, args.epochs, args.sparsity))
    print(f"Test accuracy (%), mean ± std over {args.seeds} seeds; epochs dense/sparse/re-dense ="
          f" {'/'.join(map(str, args.epochs))}, sparsity {args.sparsity}, Adam lr 3e-3, batch 128.\n")
    print(table)
    print(f"\n({time.perf_counter() - started:.0f} s)")
    return table


if __name__ == "__main__":
    main()
