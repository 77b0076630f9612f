"""The options of a DSD run, checked once, whichever front door takes them (``DSDCallback`` or ``DSD``).

:func:`check_options` is the one place where the arguments both front doors share are validated; each
message names the argument, says what is allowed and shows what was passed (see
:mod:`lightning_dsd.arguments`). The result is a frozen :class:`DSDOptions` the engine reads.

Examples:
    >>> options = check_options(0.5, 10, 10, 10)
    >>> options.sparsities, options.lengths, options.lr_scale
    ((0.5,), (10, 10, 10), 0.1)
    >>> check_options(0.5, None, 10, 10)  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    ...
    ValueError: `dense_epochs` = None runs a phase until a metric converges, so `monitor` must name ...
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping, Optional, Union

from lightning_dsd.arguments import (
    check_bool,
    check_choice,
    check_every_n,
    check_figure_layers,
    check_layer_sparsity,
    check_layer_types,
    check_length,
    check_non_negative_int,
    check_patterns,
    check_real,
    check_sparsities,
)
from lightning_dsd.constraint import MASK_STORAGES
from lightning_dsd.masks import Sparsity
from lightning_dsd.plan import SCOPES, MaskPlan
from lightning_dsd.redense import REDENSE_INITS
from lightning_dsd.selection import LayerSpec, LayerType

INTERVALS = ("epoch", "step")


@dataclass(frozen=True)
class DSDOptions:
    """Everything that decides what DSD does, checked (see :class:`~lightning_dsd.DSDCallback` for each)."""

    sparsities: tuple[Sparsity, ...]
    lengths: tuple[Optional[int], Optional[int], Optional[int]]
    interval: str = "epoch"
    monitor: Optional[str] = None
    mode: str = "min"
    patience: int = 3
    min_delta: float = 0.0
    lr_scale: float = 0.1
    include: Optional[tuple[str, ...]] = None
    exclude: Optional[tuple[str, ...]] = None
    layer_types: Optional[dict[LayerType, LayerSpec]] = None
    scope: str = "layer"
    layer_sparsity: Optional[dict[str, Sparsity]] = None
    redense_init: str = "zero"
    seed: int = 0
    mask_storage: str = "weight_dtype"
    log_histograms: bool = True
    histogram_every_n_epochs: Optional[int] = None
    histogram_layers: Optional[tuple[str, ...]] = None
    log_scalars: bool = True
    figure_layers: Union[int, tuple[str, ...]] = 2

    @property
    def waits_for_metric(self) -> bool:
        """Whether some phase runs until the monitored metric converges (a length of ``None``)."""
        return None in self.lengths


def check_options(
    sparsity: Any,
    dense_epochs: Any,
    sparse_epochs: Any,
    redense_epochs: Any,
    *,
    interval: Any = "epoch",
    monitor: Any = None,
    mode: Any = "min",
    patience: Any = 3,
    min_delta: Any = 0.0,
    lr_scale: Any = 0.1,
    include: Any = None,
    exclude: Any = None,
    layer_types: Optional[Mapping[LayerType, LayerSpec]] = None,
    scope: Any = "layer",
    layer_sparsity: Any = None,
    redense_init: Any = "zero",
    seed: Any = 0,
    mask_storage: Any = "weight_dtype",
    log_histograms: Any = True,
    histogram_every_n_epochs: Any = None,
    histogram_layers: Any = None,
    log_scalars: Any = True,
    figure_layers: Any = 2,
    monitor_required: bool = True,
) -> DSDOptions:
    """Check every shared option, in the order of the signature, and return them as :class:`DSDOptions`.
    ``monitor_required=False`` when the metric comes another way (``DSD.step(metric)``)."""
    sparsities = check_sparsities(sparsity)
    lengths = {
        "dense_epochs": check_length("dense_epochs", dense_epochs),
        "sparse_epochs": check_length("sparse_epochs", sparse_epochs),
        "redense_epochs": check_length("redense_epochs", redense_epochs),
    }
    checked_interval = check_choice("interval", interval, INTERVALS)
    if monitor is not None and not (isinstance(monitor, str) and monitor):
        raise ValueError(f"`monitor` must be None or the name of a logged metric. Found: {monitor!r}.")
    waiting = [name for name, length in lengths.items() if length is None]
    if waiting and monitor is None and monitor_required:
        raise ValueError(
            f"{', '.join(f'`{n}`' for n in waiting)} = None runs a phase until a metric converges, so"
            " `monitor` must name a logged metric (e.g. monitor='val_loss'). Found: monitor=None."
        )
    checked_scope = check_choice("scope", scope, SCOPES)
    checked_layer_sparsity = check_layer_sparsity(layer_sparsity)
    MaskPlan(sparsities, checked_scope, checked_layer_sparsity)  # what the plan refuses (a global scope's limits)
    dense, sparse, redense = lengths.values()
    return DSDOptions(
        sparsities=sparsities,
        lengths=(dense, sparse, redense),
        interval=checked_interval,
        monitor=monitor,
        mode=check_choice("mode", mode, ("min", "max")),
        patience=check_non_negative_int("patience", patience),
        min_delta=check_real("min_delta", min_delta),
        lr_scale=check_real("lr_scale", lr_scale, positive=True),
        include=check_patterns("include", include),
        exclude=check_patterns("exclude", exclude),
        layer_types=check_layer_types(layer_types),
        scope=checked_scope,
        layer_sparsity=checked_layer_sparsity,
        redense_init=check_choice("redense_init", redense_init, REDENSE_INITS),
        seed=check_non_negative_int("seed", seed),
        mask_storage=check_choice("mask_storage", mask_storage, MASK_STORAGES),
        log_histograms=check_bool("log_histograms", log_histograms),
        histogram_every_n_epochs=check_every_n("histogram_every_n_epochs", histogram_every_n_epochs),
        histogram_layers=check_patterns("histogram_layers", histogram_layers),
        log_scalars=check_bool("log_scalars", log_scalars),
        figure_layers=check_figure_layers(figure_layers),
    )



class ReadsOptions:
    """The checked options as read-only attributes of a front door (``dsd.sparsities``, ``dsd.scope``, ...)."""

    options: DSDOptions

    @property
    def sparsities(self) -> tuple[Sparsity, ...]:
        return self.options.sparsities

    @property
    def interval(self) -> str:
        return self.options.interval

    @property
    def monitor(self) -> Optional[str]:
        return self.options.monitor

    @property
    def scope(self) -> str:
        return self.options.scope

    @property
    def include(self) -> Optional[tuple[str, ...]]:
        return self.options.include

    @property
    def exclude(self) -> Optional[tuple[str, ...]]:
        return self.options.exclude

    @property
    def layer_sparsity(self) -> Optional[dict[str, Sparsity]]:
        return self.options.layer_sparsity

    @property
    def lr_scale(self) -> float:
        return self.options.lr_scale
