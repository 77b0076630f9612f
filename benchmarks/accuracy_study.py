"""Does DSD help, and when? A paired study with confidence intervals and real controls, in plain PyTorch loops.

Every (family, seed) trains one dense phase; every arm then continues from a copy of that very model and
optimizer, with the same batches (an order seeded by seed and epoch), so the arms of a seed differ only where
they differ. DSD runs through ``lightning_dsd.DSD``, the plain-loop front door. Arms:

* ``dense``: plain training for the rest of the budget; ``LLR``: the same with the 10x learning-rate drop at
  the epoch DSD enters re-dense (the paper's control for the lower learning rate);
* ``DSD <s>``: sparse, then re-dense (``+ih dense``: the GRU's input weights ``weight_ih`` left dense, as the
  paper keeps a network's first layer dense);
* controls on the MLP: ``WD-tuned`` (LLR with Adam's L2 weight decay chosen per seed on the validation split
  from 1e-5, 1e-4, 1e-3, trained from scratch), ``sparse-only`` (pruned at the same epoch, never re-densed,
  the same learning-rate drop), ``random-mask DSD`` (DSD with a random mask of the same per-tensor sparsity),
  ``DSD, Adam state cleared`` (Adam's moments *and step count* of the targets restart at re-dense);
* the AC/DC family (``mlp-acdc``, Peste et al., NeurIPS 2021), on the same MLP and budget: ``AC/DC <s>`` (two
  alternations of sparse and dense phases, each an eighth of the budget after the shared dense phase, then a
  final sparse phase to the end; ``lr_scale=1.0``, ``redense_state="all"``, and the same 10x learning-rate drop
  as LLR at the same epoch, which falls in its final phase), against ``sparse-only <s>``, DSD's sparse model at
  the end of its sparse phase and dense, at 0.8 and 0.9.

Data: MNIST-1D (generated locally; 10% of its training set held out for validation) and, for a character-level
causal transformer, Python's own documentation text (``pydoc_data.topics``, shipped with Python; 10% held out).
Metrics: test accuracy (classifiers), validation bits per character (the language model: lower is better).
Families and seeds are in ``FAMILIES``; every per-seed result, training loss and setting goes to a JSON file
beside the table.

    python benchmarks/accuracy_study.py                                # the full study, 2 processes
    python benchmarks/accuracy_study.py --seeds 2 --families mlp --epochs-scale 0.05   # smoke run
    python benchmarks/accuracy_study.py --families mlp-acdc --seeds 5 \
        --table benchmarks/results/accuracy_study_acdc.md                               # the AC/DC arm
    python benchmarks/accuracy_study.py --families mlp-obd cnn-obd \
        --table benchmarks/results/accuracy_study_obd.md --plot /tmp/obd.png            # magnitude vs OBD
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import logging
import math
import os
import statistics
import sys
import time
import warnings
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass
from typing import Any, Callable, Iterator, Optional, Sequence

import torch
from torch import Tensor, nn

from lightning_dsd import DSD, Phase
from lightning_dsd.rules.plan import MaskPlan
from lightning_dsd.tools.statistics import detectable as detectable_difference
from lightning_dsd.tools.statistics import interval

WEIGHT_DECAYS = (1e-5, 1e-4, 1e-3)


@dataclass(frozen=True)
class Arm:
    """One way to spend the budget after the shared dense phase."""

    name: str
    kind: str  # dense, llr, dsd, sparse-only, random-mask, clear-adam, wd, acdc
    sparsity: float = 0.0
    exclude: tuple[str, ...] = ()
    importance: str = "magnitude"  # DSD's criterion ("obd": the window of squared gradients before pruning)


@dataclass(frozen=True)
class Family:
    """Arms that share one dense phase, one schedule and one pair of controls."""

    name: str
    model: str  # mlp, cnn, gru, charlm
    epochs: tuple[int, int, int]  # dense, sparse, re-dense
    seeds: int
    arms: tuple[Arm, ...]
    lr: float = 3e-3
    weight_decays: tuple[float, ...] = WEIGHT_DECAYS  # the grid of the WD-tuned control
    dsd_dense: int = 0  # the last epochs of the dense phase, run by every arm (inside DSD: OBD's window is there)

    def scaled(self, scale: float) -> Family:
        epochs = tuple(max(1, round(e * scale)) for e in self.epochs)
        return dataclasses.replace(self, epochs=epochs)


DENSE, LLR = Arm("dense", "dense"), Arm("LLR", "llr")
IH_DENSE = ("network.gru.weight_ih_l0",)
FAMILIES = {
    "mlp": Family("mlp", "mlp", (40, 20, 20), 10, (
        DENSE, LLR, Arm("DSD 0.5", "dsd", 0.5), Arm("DSD 0.8", "dsd", 0.8),
        Arm("WD-tuned", "wd"), Arm("sparse-only 0.8", "sparse-only", 0.8),
        Arm("random-mask DSD 0.8", "random-mask", 0.8), Arm("DSD 0.8, Adam state cleared", "clear-adam", 0.8),
    )),
    "cnn": Family("cnn", "cnn", (40, 20, 20), 5, (
        DENSE, LLR, Arm("DSD 0.5, conv1 dense", "dsd", 0.5, ("network.1.*",)),
    )),
    "gru": Family("gru", "gru", (60, 15, 15), 5, (
        DENSE, LLR, Arm("DSD 0.8 (every target, the old arm)", "dsd", 0.8),
        Arm("DSD 0.8, ih dense", "dsd", 0.8, IH_DENSE), Arm("DSD 0.5, ih dense", "dsd", 0.5, IH_DENSE),
    )),
    "gru-long-redense": Family("gru-long-redense", "gru", (60, 15, 45), 5, (
        DENSE, LLR, Arm("DSD 0.8, ih dense, 45 re-dense", "dsd", 0.8, IH_DENSE),
    )),
    "mlp-acdc": Family("mlp-acdc", "mlp", (40, 20, 20), 10, (
        DENSE, LLR,
        *(Arm(f"{name} {s}", kind, s) for s in (0.8, 0.9)
          for name, kind in (("AC/DC", "acdc"), ("sparse-only", "sparse-only"), ("DSD", "dsd"))),
    )),
    "charlm": Family("charlm", "charlm", (8, 4, 4), 3, (
        DENSE, LLR, Arm("DSD 0.3", "dsd", 0.3), Arm("DSD 0.5", "dsd", 0.5),
    ), lr=2e-3),
}

#: magnitude against OBD's saliency (issue 34): the last dense epoch runs inside DSD in every arm, so that
#: `importance="obd"` has its window (the first 100 optimizer steps of that epoch) and both criteria share a clock.
for _name, _model, _seeds in (("mlp-obd", "mlp", 10), ("cnn-obd", "cnn", 10)):
    FAMILIES[_name] = Family(_name, _model, (40, 20, 20), _seeds, (
        DENSE, LLR, *(Arm(f"{label} {s}", "dsd", s, importance=importance) for s in (0.5, 0.8)
                      for label, importance in (("DSD", "magnitude"), ("OBD", "obd")))), dsd_dense=1)

OWN_RUN = ("mlp-acdc", "mlp-obd", "cnn-obd")  # families run by their own command (see the module docstring)


# ----------------------------------------------------------------------------------------------- the tasks


class CharTransformer(nn.Module):
    """A small causal character-level transformer: 2 pre-norm layers of width 64, 4 heads, context 64."""

    def __init__(self, vocabulary: int, width: int = 64, context: int = 64, layers: int = 2) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocabulary, width)
        self.position = nn.Parameter(torch.zeros(context, width))
        layer = nn.TransformerEncoderLayer(width, 4, 4 * width, dropout=0.0, batch_first=True, norm_first=True)
        self.blocks = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(width)
        self.head = nn.Linear(width, vocabulary)
        self.register_buffer("causal", nn.Transformer.generate_square_subsequent_mask(context), persistent=False)

    def forward(self, tokens: Tensor) -> Tensor:
        length = tokens.shape[1]
        hidden = self.embed(tokens) + self.position[:length]
        hidden = self.blocks(hidden, mask=self.causal[:length, :length], is_causal=True)
        return self.head(self.norm(hidden))


class Task:
    """Data, model, batches and metrics of one model family."""

    batch_size = 128

    def __init__(self, model: str) -> None:
        self.model = model
        if model == "charlm":
            import pydoc_data.topics

            text = "".join(pydoc_data.topics.topics[key] for key in sorted(pydoc_data.topics.topics))
            symbols = sorted(set(text))
            encoded = torch.tensor([symbols.index(c) for c in text], dtype=torch.long)
            split = int(0.9 * len(encoded))
            self.train_text, self.val_text, self.vocabulary = encoded[:split], encoded[split:], len(symbols)
            self.context, self.steps_per_epoch = 64, 100
            return
        from lightning_dsd.tools.demo import load_data

        data = load_data("mnist1d")
        x, y = data.train.tensors
        order = torch.randperm(len(x), generator=torch.Generator().manual_seed(12345))
        held_out = len(x) // 10
        self.val = (x[order[:held_out]], y[order[:held_out]])
        self.train = (x[order[held_out:]], y[order[held_out:]])
        self.test = data.test.tensors
        self.length, self.classes = data.length, data.classes

    def build(self, seed: int) -> nn.Module:
        torch.manual_seed(seed)
        if self.model == "charlm":
            return CharTransformer(self.vocabulary)
        from lightning_dsd.tools.demo import build_network

        return Wrapped(build_network(self.model, self.length, self.classes))

    def batches(self, seed: int, epoch: int) -> Iterator[tuple[Tensor, Tensor]]:
        generator = torch.Generator().manual_seed(seed * 100_003 + epoch)
        if self.model == "charlm":
            for _ in range(self.steps_per_epoch):
                starts = torch.randint(0, len(self.train_text) - self.context - 1, (32,), generator=generator)
                windows = torch.stack([self.train_text[s:s + self.context + 1] for s in starts.tolist()])
                yield windows[:, :-1], windows[:, 1:]
            return
        x, y = self.train
        order = torch.randperm(len(x), generator=generator)
        for start in range(0, len(x), self.batch_size):
            index = order[start:start + self.batch_size]
            yield x[index], y[index]

    @staticmethod
    def loss(model: nn.Module, inputs: Tensor, targets: Tensor) -> Tensor:
        logits = model(inputs)
        return nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1))

    @torch.no_grad()
    def evaluate(self, model: nn.Module, split: str) -> float:
        """Accuracy on ``split`` ("val" or "test") for classifiers; validation bits per character for the LM
        (its "test" is the same held-out text)."""
        model.eval()
        try:
            if self.model == "charlm":
                windows = self.val_text[: (len(self.val_text) - 1) // self.context * self.context + 1]
                inputs = windows[:-1].view(-1, self.context)
                targets = windows[1:].view(-1, self.context)
                pairs = list(zip(inputs.split(256), targets.split(256), strict=True))
                total = sum(self.loss(model, i, t).item() * len(i) for i, t in pairs)
                return total / len(inputs) / math.log(2)
            x, y = self.val if split == "val" else self.test
            return (model(x).argmax(dim=1) == y).float().mean().item()
        finally:
            model.train()

    @property
    def lower_is_better(self) -> bool:
        return self.model == "charlm"


class Wrapped(nn.Module):
    """The demo's networks under ``network.``, as the Lightning study named them (``network.1.*``)."""

    def __init__(self, network: nn.Module) -> None:
        super().__init__()
        self.network = network

    def forward(self, x: Tensor) -> Tensor:
        return self.network(x)


class RandomMaskPlan(MaskPlan):
    """Masks of exactly the plan's per-tensor sparsity, at random positions (the control for magnitude)."""

    def decide(self, weights, cycle, scores=None):  # type: ignore[no-untyped-def]  # random: no scores
        generator = torch.Generator().manual_seed(777 + cycle)
        masks = {}
        for name, weight in weights.items():
            pruned = round(float(self.sparsities[cycle]) * weight.numel())
            keep = torch.ones(weight.numel(), dtype=torch.bool)
            keep[torch.randperm(weight.numel(), generator=generator)[:pruned]] = False
            masks[name] = keep.view(weight.shape)
        return masks


# ----------------------------------------------------------------------------------------------- training


@dataclass
class ArmResult:
    test: float
    val: float
    train_loss: float
    sparse_test: Optional[float] = None
    zeros: Optional[float] = None  # the share of exact zeros among the targets at the end (AC/DC: its sparsity)
    weight_decay: Optional[float] = None
    tried: Optional[dict[str, dict[str, float]]] = None  # WD-tuned: validation and test of every decay tried


def _epochs(task: Task, model: nn.Module, optimizer: torch.optim.Optimizer, seed: int, epochs: range,
            after_epoch: Callable[[int], None] = lambda epoch: None) -> float:
    """Train ``epochs``; return the mean training loss of the last one."""
    last = 0.0
    for epoch in epochs:
        losses = []
        for inputs, targets in task.batches(seed, epoch):
            optimizer.zero_grad()
            loss = task.loss(model, inputs, targets)
            loss.backward()
            optimizer.step()
            losses.append(loss.item())
        last = statistics.mean(losses)
        after_epoch(epoch)
    return last


def _drop_lr(optimizer: torch.optim.Optimizer, factor: float = 0.1) -> None:
    for group in optimizer.param_groups:
        group["lr"] *= factor


def run_arm(task: Task, family: Family, arm: Arm, seed: int, start: dict[str, Any]) -> ArmResult:
    dense, sparse, redense = family.epochs
    total = dense + sparse + redense
    start_epoch = dense - family.dsd_dense
    if arm.kind == "wd":
        return _tuned_weight_decay(task, family, seed)
    model = task.build(seed)
    model.load_state_dict(start["model"])
    optimizer = torch.optim.Adam(model.parameters(), lr=family.lr)
    optimizer.load_state_dict(copy.deepcopy(start["optimizer"]))
    result: dict[str, Any] = {}

    if arm.kind in ("dense", "llr"):
        drop = (lambda epoch: _drop_lr(optimizer) if epoch + 1 == dense + sparse else None) if arm.kind == "llr" else (
            lambda epoch: None)
        loss = _epochs(task, model, optimizer, seed, range(start_epoch, total), drop)
        return ArmResult(task.evaluate(model, "test"), task.evaluate(model, "val"), loss)

    if arm.kind == "acdc":
        return _acdc(task, family, arm, seed, model, optimizer)
    sparse_length, redense_length = (sparse + redense, 0) if arm.kind == "sparse-only" else (sparse, redense)
    dsd = DSD(model, optimizer, arm.sparsity, family.dsd_dense, sparse_length, redense_length,
              exclude=list(arm.exclude) or None, log_histograms=False, log_scalars=False, importance=arm.importance)
    if arm.kind == "random-mask":
        dsd._engine.plan = RandomMaskPlan(dsd._engine.plan.sparsities, input_dims=dsd._engine.plan.input_dims)

    def after_epoch(epoch: int) -> None:
        was = dsd.phase
        if arm.kind == "sparse-only" and epoch + 1 == dense + sparse:
            _drop_lr(optimizer)  # the same drop as LLR and DSD, with the mask kept
        if epoch + 1 == dense + sparse:
            result["sparse_test"] = task.evaluate(model, "test")
        dsd.step()
        if arm.kind == "clear-adam" and was is Phase.SPARSE and dsd.phase is Phase.REDENSE:
            for param in dsd.selection.selected.values():
                optimizer.state[param] = {}  # Adam restarts these: zero moments, step 0, fresh bias correction

    loss = _epochs(task, model, optimizer, seed, range(start_epoch, total), after_epoch)
    return ArmResult(task.evaluate(model, "test"), task.evaluate(model, "val"), loss, result.get("sparse_test"))


def obd_against_magnitude(family: Family, seeds: list[dict[str, Any]]) -> list[dict[str, str]]:
    """``importance="obd"`` against magnitude at each sparsity, paired by seed: the final model (after re-dense) and
    the sparse model at the end of the sparse phase."""
    rows = []
    for sparsity in sorted({arm.sparsity for arm in family.arms if arm.importance == "obd"}):
        for key, label in (("test", "final"), ("sparse_test", "end of sparse")):
            differences = [s["arms"][f"OBD {sparsity}"][key] - s["arms"][f"DSD {sparsity}"][key] for s in seeds]
            rows.append({"family": family.name, "sparsity": f"{sparsity:g}", "model": label,
                         "OBD - magnitude, points (95% CI)": shown_interval(differences, 100.0),
                         "detectable (80% power)": detectable(differences, 100.0),
                         "seeds favouring OBD": f"{sum(d > 0 for d in differences)}/{len(differences)}"})
    return rows


def acdc_lengths(family: Family) -> tuple[int, int]:
    """AC/DC's schedule in the family's budget after the shared dense phase: two alternations of sparse and
    dense phases of ``a`` epochs each (an eighth of the budget: 5 of 40), then a final sparse phase to the end
    (at least 1 epoch, which overruns the budget only at smoke-run scales)."""
    _, sparse, redense = family.epochs
    alternation = max(1, (sparse + redense) // 8)
    return alternation, max(1, sparse + redense - 4 * alternation)


def _acdc(task: Task, family: Family, arm: Arm, seed: int, model: nn.Module,
          optimizer: torch.optim.Optimizer) -> ArmResult:
    """AC/DC from the shared dense model (its warm-up): S a, D a, S a, D a, final S to the end of the budget,
    no extra learning-rate drop at decompression (``lr_scale=1.0``), the whole Adam state of the targets
    restarted at each one (``redense_state="all"``), and the run's own schedule: the same 10x drop as LLR, at the
    same epoch (within the final sparse phase)."""
    dense, sparse, redense = family.epochs
    alternation, final = acdc_lengths(family)
    acdc = DSD(model, optimizer, (arm.sparsity, arm.sparsity), 0, alternation, alternation,
               final_sparse_epochs=final, lr_scale=1.0, redense_state="all", log_histograms=False, log_scalars=False)

    def after_epoch(epoch: int) -> None:
        if epoch + 1 == dense + sparse:
            _drop_lr(optimizer)
        acdc.step()

    loss = _epochs(task, model, optimizer, seed, range(dense, dense + 4 * alternation + final), after_epoch)
    assert acdc.finished and acdc.phase is Phase.SPARSE, "AC/DC ends in its final sparse phase"
    targets = acdc.selection.selected.values()
    zeros = sum(int((p == 0).sum()) for p in targets) / sum(p.numel() for p in targets)
    return ArmResult(task.evaluate(model, "test"), task.evaluate(model, "val"), loss, zeros=zeros)


def _tuned_weight_decay(task: Task, family: Family, seed: int) -> ArmResult:
    """LLR with Adam's L2 weight decay, trained from scratch for each value of the family's grid; the best on
    validation is kept, and every value's validation and test results are recorded."""
    dense, sparse, redense = family.epochs
    results = []
    for decay in family.weight_decays:
        model = task.build(seed)
        optimizer = torch.optim.Adam(model.parameters(), lr=family.lr, weight_decay=decay)
        loss = _epochs(task, model, optimizer, seed, range(dense + sparse + redense),
                       lambda epoch, o=optimizer: _drop_lr(o) if epoch + 1 == dense + sparse else None)
        results.append(ArmResult(task.evaluate(model, "test"), task.evaluate(model, "val"), loss, weight_decay=decay))
    best = (min if task.lower_is_better else max)(results, key=lambda result: result.val)
    best.tried = {f"{r.weight_decay:g}": {"val": r.val, "test": r.test} for r in results}
    return best


def _quiet_worker() -> None:
    """A worker process: one thread (the workers share the cores), no warnings, Lightning's errors only."""
    torch.set_num_threads(1)
    warnings.filterwarnings("ignore")
    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)


def run_seed(family: Family, seed: int) -> dict[str, Any]:
    """One seed of one family: the shared dense phase, then every arm from a copy of it."""
    task = Task(family.model)
    model = task.build(seed)
    optimizer = torch.optim.Adam(model.parameters(), lr=family.lr)
    dense = family.epochs[0] - family.dsd_dense
    val_history: list[float] = []
    loss = _epochs(task, model, optimizer, seed, range(dense),
                   lambda epoch: val_history.append(task.evaluate(model, "val")))
    start = {"model": copy.deepcopy(model.state_dict()), "optimizer": copy.deepcopy(optimizer.state_dict())}
    arms = {arm.name: asdict(run_arm(task, family, arm, seed, start)) for arm in family.arms}
    return {"family": family.name, "seed": seed, "dense_phase": {
        "train_loss": loss, "val_metric_by_epoch": val_history}, "arms": arms}


# ----------------------------------------------------------------------------------------------- statistics
# The statistics are lightning_dsd.tools.statistics', the ones `python -m lightning_dsd.compare` prints.


def detectable(differences: Sequence[float], scale: float) -> str:
    """The smallest true mean difference this many seeds find with 80% power at the 5% level, given the spread
    of the paired differences seen: (t_0.975 + t_0.8) x sd / sqrt(n) (see lightning_dsd.tools.statistics)."""
    return f"{detectable_difference(differences, scale):.2f}" if len(differences) >= 2 else ""


def shown_interval(differences: Sequence[float], scale: float) -> str:
    mean, low, high = interval(differences, scale)
    if len(differences) < 2:
        return f"{mean:+.2f}"
    return f"{mean:+.2f} [{low:+.2f}, {high:+.2f}]{'*' if low > 0 or high < 0 else ''}"


def _mean_std(values: Sequence[float], scale: float) -> str:
    std = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{scale * statistics.mean(values):.2f} ± {scale * std:.2f}"


def summarize(family: Family, seeds: list[dict[str, Any]], lm: bool) -> list[dict[str, str]]:
    """One row per arm: metric mean ± std, last-epoch training loss, and the paired differences against LLR
    and dense (for the LM in bits per character: negative is better)."""
    scale = 1.0 if lm else 100.0
    rows = []
    for arm in family.arms:
        values = [s["arms"][arm.name]["test"] for s in seeds]
        row = {
            "family": family.name,
            "arm": arm.name,
            "bits/char (val)" if lm else "test accuracy %": _mean_std(values, scale),
            "train loss": f"{statistics.mean(s['arms'][arm.name]['train_loss'] for s in seeds):.3f}",
        }
        for control in ("LLR", "dense"):
            row[f"- {control} (95% CI)"] = "" if arm.name in ("dense", "LLR") else shown_interval(
                [s["arms"][arm.name]["test"] - s["arms"][control]["test"] for s in seeds], scale)
        row["detectable vs LLR (80% power)"] = "" if arm.name in ("dense", "LLR") else detectable(
            [s["arms"][arm.name]["test"] - s["arms"]["LLR"]["test"] for s in seeds], scale)
        rows.append(row)
    return rows


def is_it_dsd(seeds: list[dict[str, Any]]) -> list[dict[str, str]]:
    """The MLP's DSD 0.8 against each control, paired by seed."""
    rows = []
    for control in ("WD-tuned", "sparse-only 0.8", "random-mask DSD 0.8", "DSD 0.8, Adam state cleared", "LLR"):
        differences = [s["arms"]["DSD 0.8"]["test"] - s["arms"][control]["test"] for s in seeds]
        rows.append({"DSD 0.8 -": control, "points (95% CI)": shown_interval(differences, 100.0),
                     "seeds DSD better": f"{sum(d > 0 for d in differences)}/{len(differences)}"})
    return rows


def acdc_rows(family: Family, seeds: list[dict[str, Any]]) -> list[dict[str, str]]:
    """The models of the AC/DC family against dense, paired by seed: LLR (dense with the learning-rate drop the
    sparse arms have), then per sparsity AC/DC's final model, sparse-only's and DSD's at the end of its sparse
    phase; and dense itself."""
    dense = [s["arms"]["dense"]["test"] for s in seeds]
    rows = [{"model": "dense", "sparsity": "0", "test accuracy %": _mean_std(dense, 100.0), "- dense (95% CI)": "",
             "detectable (80% power)": "", "seeds >= dense": ""}]
    models = [("LLR (dense, the same learning-rate drop)", 0.0, "LLR", "test")]
    for sparsity in sorted({arm.sparsity for arm in family.arms if arm.sparsity}):
        models += [(f"AC/DC {sparsity}, final sparse model", sparsity, f"AC/DC {sparsity}", "test"),
                   (f"sparse-only {sparsity}", sparsity, f"sparse-only {sparsity}", "test"),
                   (f"DSD {sparsity}, sparse model (end of its sparse phase)", sparsity, f"DSD {sparsity}",
                    "sparse_test")]
    for label, sparsity, arm, key in models:
        values = [s["arms"][arm][key] for s in seeds]
        differences = [v - d for v, d in zip(values, dense, strict=True)]
        rows.append({"model": label, "sparsity": f"{sparsity:g}", "test accuracy %": _mean_std(values, 100.0),
                     "- dense (95% CI)": shown_interval(differences, 100.0),
                     "detectable (80% power)": detectable(differences, 100.0),
                     "seeds >= dense": f"{sum(d >= 0 for d in differences)}/{len(differences)}"})
    return rows


def acdc_against_sparse(family: Family, seeds: list[dict[str, Any]]) -> list[dict[str, str]]:
    """AC/DC's final sparse model against the other sparse models of the same sparsity, paired by seed."""
    rows = []
    for sparsity in sorted({arm.sparsity for arm in family.arms if arm.sparsity}):
        acdc = [s["arms"][f"AC/DC {sparsity}"]["test"] for s in seeds]
        for label, arm, key in (("LLR (dense)", "LLR", "test"),
                                (f"sparse-only {sparsity}", f"sparse-only {sparsity}", "test"),
                                (f"DSD {sparsity}, sparse model", f"DSD {sparsity}", "sparse_test")):
            differences = [a - s["arms"][arm][key] for a, s in zip(acdc, seeds, strict=True)]
            rows.append({"AC/DC at": f"{sparsity:g}", "AC/DC final sparse model -": label,
                         "points (95% CI)": shown_interval(differences, 100.0),
                         "seeds AC/DC better": f"{sum(d > 0 for d in differences)}/{len(differences)}"})
    return rows


def markdown_table(rows: list[dict[str, str]]) -> str:
    header = list(rows[0])
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(row[h] for h in header) + " |" for row in rows]
    return "\n".join(lines)


def plot(results: dict[str, list[dict[str, Any]]], path: str) -> None:
    """Per-seed differences DSD - LLR of every DSD arm of the classifiers, with means and 95% intervals."""
    from matplotlib.figure import Figure

    series = [(f"{name}: {arm}", [100 * (s["arms"][arm]["test"] - s["arms"]["LLR"]["test"]) for s in seeds])
              for name, seeds in results.items() if FAMILIES[name].model != "charlm"
              for arm in seeds[0]["arms"] if arm not in ("dense", "LLR")]
    figure = Figure(figsize=(2 + 0.9 * len(series), 4.2), layout="constrained")
    ax = figure.subplots()
    for x, (_, values) in enumerate(series):
        ax.scatter([x - 0.1] * len(values), values, s=12, color="#2a6fb0", alpha=0.7)
        mean, low, high = interval(values, 1.0)
        ax.errorbar([x + 0.15], [mean], yerr=[[mean - low], [high - mean]], fmt="o", color="#c0392b", capsize=4)
    ax.axhline(0, color="grey", linewidth=0.8)
    ax.set_xticks(range(len(series)), [label for label, _ in series], rotation=40, ha="right", fontsize=7)
    ax.set_ylabel("arm - LLR (points)")
    figure.savefig(path, dpi=90)


def main(argv: Sequence[str] | None = None) -> str:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--families", nargs="+", default=[name for name in FAMILIES if name not in OWN_RUN],
                        choices=list(FAMILIES), help=f"default: all but {', '.join(OWN_RUN)}, which run on their own")
    parser.add_argument("--seeds", type=int, default=None, help="seeds per family (default: each family's own)")
    parser.add_argument("--epochs-scale", type=float, default=1.0, help="multiply every phase length (smoke runs)")
    parser.add_argument("--processes", type=int, default=2, help="worker processes (1: run here)")
    parser.add_argument("--weight-decays", type=float, nargs="+", default=list(WEIGHT_DECAYS),
                        help="the grid the WD-tuned control chooses from on the validation split")
    parser.add_argument("--table", default="benchmarks/results/accuracy_study.md", help="where the tables go")
    parser.add_argument("--plot", default="docs/accuracy_study.png", help="where the plot of differences goes")
    args = parser.parse_args(argv)
    started = time.perf_counter()
    families = {name: dataclasses.replace(FAMILIES[name].scaled(args.epochs_scale),
                                          weight_decays=tuple(args.weight_decays)) for name in args.families}
    jobs = [(family, seed) for family in families.values() for seed in range(args.seeds or family.seeds)]
    jobs.sort(key=lambda job: -{"gru": 8, "charlm": 3, "cnn": 2}.get(job[0].model, 1) * sum(job[0].epochs))
    if args.processes == 1:  # here, leaving this process's threads and logging as they are
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            finished = [run_seed(family, seed) for family, seed in jobs]
    else:
        with ProcessPoolExecutor(args.processes, initializer=_quiet_worker) as pool:
            finished = list(pool.map(run_seed, *zip(*jobs, strict=True)))
    results: dict[str, list[dict[str, Any]]] = {name: [] for name in families}
    for seed_result in sorted(finished, key=lambda r: (r["family"], r["seed"])):
        results[seed_result["family"]].append(seed_result)
    elapsed = time.perf_counter() - started

    classifier_rows = [row for name, seeds in results.items() if families[name].model != "charlm"
                       and name != "mlp-acdc" for row in summarize(families[name], seeds, lm=False)]
    obd_rows = [row for name, seeds in results.items() if any(a.importance == "obd" for a in families[name].arms)
                for row in obd_against_magnitude(families[name], seeds)]
    tables = [markdown_table(classifier_rows)] if classifier_rows else []
    if "charlm" in results:
        tables.append(markdown_table(summarize(families["charlm"], results["charlm"], lm=True)))
    if "mlp" in results:
        tables.append(markdown_table(is_it_dsd(results["mlp"])))
    if "mlp-acdc" in results:
        alternation, final = acdc_lengths(families["mlp-acdc"])
        tables.append(f"AC/DC: dense {families['mlp-acdc'].epochs[0]} (shared), then S {alternation}, D"
                      f" {alternation}, S {alternation}, D {alternation}, final S {final} epochs.\n\n"
                      + markdown_table(acdc_rows(families["mlp-acdc"], results["mlp-acdc"])))
        tables.append(markdown_table(acdc_against_sparse(families["mlp-acdc"], results["mlp-acdc"])))
    if obd_rows:
        tables.append(markdown_table(obd_rows))
    schedule = "; ".join(f"{name}: {'/'.join(map(str, f.epochs))}, {len(results[name])} seeds"
                         for name, f in families.items())
    command = " ".join(["python benchmarks/accuracy_study.py", *(sys.argv[1:] if argv is None else argv)])
    text = (
        f"Paired study (dense/sparse/re-dense epochs, seeds: {schedule}; epochs scaled by {args.epochs_scale:g}).\n"
        f"Command: `{command}`.\n"
        f"Differences are arm - control per seed: mean [95% t interval], * = excludes 0; points of test accuracy,\n"
        f"bits per character for the LM (lower is better). {elapsed:.0f} s with {args.processes} worker"
        f" process(es) on {os.cpu_count()} CPUs.\n\n" + "\n\n".join(tables) + "\n"
    )
    print(text)
    for path in (args.table, args.plot):
        os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    with open(args.table, "w") as table:
        table.write(text)
    with open(os.path.splitext(args.table)[0] + ".json", "w") as raw:
        json.dump({"elapsed_s": elapsed, "epochs_scale": args.epochs_scale, "weight_decays": args.weight_decays,
                   "families": {name: asdict(f) for name, f in families.items()}, "per_seed": results}, raw, indent=1)
    if classifier_rows:
        plot({name: seeds for name, seeds in results.items() if name != "mlp-acdc"}, args.plot)
    print(f"({elapsed:.0f} s; tables in {args.table}, per-seed results beside it, plot in {args.plot})")
    return text


if __name__ == "__main__":
    main()

