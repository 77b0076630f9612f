"""The phase in a Lightning ``Trainer``'s progress bar, ``dsd=<phase>``, for the length of a fit: shown, not
output (nothing of it is kept; what DSD writes is :mod:`~lightning_dsd.doors.lightning.output`'s)."""

from __future__ import annotations

from typing import Any, Callable, Optional

import lightning.pytorch as pl


class ProgressBarPhase:
    """``dsd=<phase>`` in the progress bar: added to what the bar's public ``get_metrics`` returns for the
    length of a fit; a ``get_metrics`` the user set on the bar is left alone.

    Examples:
        >>> from lightning.pytorch.callbacks import TQDMProgressBar
        >>> bar, shown = TQDMProgressBar(), ProgressBarPhase()
        >>> shown.show(bar, lambda: "sparse"); "get_metrics" in vars(bar)
        True
        >>> shown.remove(bar); "get_metrics" in vars(bar)
        False
    """

    def __init__(self) -> None:
        self._installed: Optional[Any] = None

    def show(self, bar: Optional[Any], label: Callable[[], str]) -> None:
        if bar is None or "get_metrics" in vars(bar):
            return
        metrics_of_bar = bar.get_metrics

        def get_metrics(trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> dict[str, Any]:
            return {**metrics_of_bar(trainer, pl_module), "dsd": label()}

        bar.get_metrics = get_metrics
        self._installed = get_metrics

    def remove(self, bar: Optional[Any]) -> None:
        if bar is not None and self._installed is not None and vars(bar).get("get_metrics") is self._installed:
            del vars(bar)["get_metrics"]
        self._installed = None
