"""``sensitivity_scan``: how much each layer suffers when pruned alone, to pick per-layer sparsities.

For every targeted layer and every sparsity, the layer alone is magnitude-pruned (exactly as DSD's sparse
phase would), the model is evaluated, and everything is put back: parameters, buffers (a metric that runs
the model in training mode moves BatchNorm statistics) and train/eval modes, bit for bit, also when the
metric raises.

Examples:
    >>> import torch
    >>> from torch import nn
    >>> from torch.utils.data import DataLoader, TensorDataset
    >>> torch.manual_seed(0) and None
    >>> model = nn.Sequential(nn.Linear(4, 16), nn.ReLU(), nn.Linear(16, 2))
    >>> loader = DataLoader(TensorDataset(torch.randn(32, 4), torch.randint(0, 2, (32,))), batch_size=8)
    >>> table = sensitivity_scan(model, loader, sparsities=(0.5, 0.9))
    >>> [(row.layer, row.sparsity) for row in table.rows][:3]
    [('0.weight', 0.0), ('0.weight', 0.5), ('0.weight', 0.9)]
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Iterable, Mapping, Optional, Sequence, Union

import torch
from lightning_utilities.core.imports import RequirementCache
from torch import nn
from torchmetrics.classification import MulticlassAccuracy

from lightning_dsd.rules.importance import Importance, check_importance, criterion_name, obd_saliency
from lightning_dsd.rules.masks import magnitude_masks, score_masks
from lightning_dsd.rules.options import check_fraction, check_patterns
from lightning_dsd.rules.selection import select_parameters

Metric = Callable[[nn.Module, Iterable[Any]], float]


@torch.no_grad()
def accuracy(model: nn.Module, dataloader: Iterable[Any]) -> float:
    """Top-1 accuracy over ``(inputs, labels)`` batches, in eval mode (torchmetrics): the default metric."""
    model.eval()
    device = next(model.parameters()).device
    metric: Optional[MulticlassAccuracy] = None
    for inputs, labels in dataloader:
        logits = model(inputs.to(device))
        if metric is None:
            metric = MulticlassAccuracy(num_classes=logits.shape[-1], average="micro").to(device)
        metric.update(logits, labels.to(device))
    if metric is None:
        raise ValueError("`sensitivity_scan`'s accuracy needs at least one batch; the dataloader is empty.")
    return float(metric.compute())


@dataclass(frozen=True)
class SensitivityRow:
    layer: str
    sparsity: float
    metric: float


@dataclass(frozen=True)
class SensitivityTable:
    """The scan's result: one row per (layer, sparsity), sparsity 0.0 being the unpruned model."""

    rows: tuple[SensitivityRow, ...]

    def by_layer(self) -> dict[str, dict[float, float]]:
        table: dict[str, dict[float, float]] = {}
        for row in self.rows:
            table.setdefault(row.layer, {})[row.sparsity] = row.metric
        return table

    def to_markdown(self) -> str:
        layers = self.by_layer()
        sparsities = sorted({row.sparsity for row in self.rows})
        lines = ["| layer | " + " | ".join(f"{s:g}" for s in sparsities) + " |", "|---|" + "---|" * len(sparsities)]
        lines += [f"| {layer} | " + " | ".join(f"{values[s]:.4g}" for s in sparsities) + " |"
                  for layer, values in layers.items()]
        return "\n".join(lines)

    def plot(self) -> Any:
        """A ``matplotlib.figure.Figure`` with one curve per layer (needs matplotlib)."""
        if not RequirementCache("matplotlib"):
            raise ModuleNotFoundError("SensitivityTable.plot needs matplotlib: `pip install lightning-dsd[figures]`.")
        from matplotlib.figure import Figure

        figure = Figure(figsize=(7, 4), layout="constrained")
        ax = figure.subplots()
        for layer, values in self.by_layer().items():
            ax.plot(list(values), list(values.values()), marker="o", label=layer)
        ax.set_xlabel("sparsity of this layer alone")
        ax.set_ylabel("metric")
        ax.legend(fontsize=7)
        return figure

    def __str__(self) -> str:
        return self.to_markdown()


def sensitivity_scan(
    model: nn.Module,
    dataloader: Iterable[Any],
    sparsities: Sequence[float] = (0.25, 0.5, 0.75),
    metric: Optional[Metric] = None,
    include: Optional[Union[str, Sequence[str]]] = None,
    exclude: Optional[Union[str, Sequence[str]]] = None,
    importance: Importance = "magnitude",
    grad_sq: Optional[Mapping[str, torch.Tensor]] = None,
) -> SensitivityTable:
    """Prune each targeted layer alone at each sparsity, evaluate with ``metric(model, dataloader)`` (top-1
    accuracy by default), restore the model exactly, and return the table.

    ``include``/``exclude`` select the layers as in :class:`~lightning_dsd.DSDCallback`. ``importance`` ranks the
    weights as DSD's option does (``"magnitude"``, ``"obd"`` or a callable ``f(name, weight, grad_sq)``); the
    last two read ``grad_sq``, each layer's mean squared gradient by name (e.g. the average of ``p.grad ** 2``
    over a few training batches).
    """
    importance = check_importance("importance", importance)
    rule = "`sparsities` must be floats in (0, 1)."
    levels = [check_fraction(s, rule) for s in sparsities]
    if not levels:
        raise ValueError(f"{rule} Found an empty sequence.")
    targets = select_parameters(model, check_patterns("include", include), check_patterns("exclude", exclude)).selected
    if not targets:
        raise ValueError("sensitivity_scan found nothing to prune: check `include`/`exclude`.")
    missing = [name for name in targets if importance != "magnitude" and name not in (grad_sq or {})]
    if missing:
        raise ValueError(f"`importance={criterion_name(importance)}` ranks by each weight's mean squared gradient, but"
                         f" `grad_sq` has none for {missing}. Pass `grad_sq={{name: mean of p.grad ** 2}}` for every"
                         " scanned layer, or use importance='magnitude'.")
    measure = metric or accuracy
    saved_state = {key: value.clone() for key, value in model.state_dict(keep_vars=False).items()}
    saved_modes = {module: module.training for module in model.modules()}

    def restore() -> None:
        with torch.no_grad():
            for key, value in model.state_dict(keep_vars=True).items():
                value.copy_(saved_state[key])
        for module, training in saved_modes.items():
            module.training = training

    rows = []
    try:
        unpruned = float(measure(model, dataloader))
        restore()
        for name, weight in targets.items():
            rows.append(SensitivityRow(name, 0.0, unpruned))
            for level in levels:
                if importance == "magnitude":
                    keep = magnitude_masks({name: weight}, {name: level})[name]
                else:
                    score = obd_saliency if importance == "obd" else importance
                    assert callable(score) and grad_sq is not None
                    scores = score(name, weight.detach(), grad_sq[name].to(weight.device).float())
                    keep = score_masks({name: scores}, {name: level})[name]
                with torch.no_grad():
                    weight.mul_(keep.to(weight.dtype))
                rows.append(SensitivityRow(name, level, float(measure(model, dataloader))))
                restore()
    finally:
        restore()
    return SensitivityTable(tuple(rows))
