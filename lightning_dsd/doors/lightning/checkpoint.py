"""``FinalPhaseCheckpoint``: a ``ModelCheckpoint`` that only considers the last DSD phase.

A plain ``ModelCheckpoint(monitor=...)`` ranks every epoch of the run together, so its "best" may be a
dense-phase model that DSD went on to improve. This one ignores everything before DSD's last phase, the
final re-dense: its ``best_model_path`` is the best *DSD* model. When the run ends sparse
(``final_sparse_epochs``), the last phase is the final sparse one, and the best model is the best of the
final sparse models, every one of them holding the final masks' zeros.

Examples:
    >>> from lightning_dsd import DSDCallback
    >>> dsd = DSDCallback(0.5, dense_epochs=10, sparse_epochs=10, redense_epochs=10)
    >>> best = FinalPhaseCheckpoint(dsd, monitor="val_loss", mode="min")
    >>> best.monitor
    'val_loss'
"""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.callbacks import ModelCheckpoint
from typing_extensions import override

from lightning_dsd.doors.lightning.callback import DSDCallback


class FinalPhaseCheckpoint(ModelCheckpoint):
    """``ModelCheckpoint`` (same arguments) that saves nothing until ``dsd`` reaches its last phase."""

    def __init__(self, dsd: DSDCallback, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.dsd = dsd

    @override
    def on_train_batch_end(self, trainer: "pl.Trainer", *args: Any, **kwargs: Any) -> None:
        if self.dsd.in_last_phase:
            super().on_train_batch_end(trainer, *args, **kwargs)

    @override
    def on_train_epoch_end(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> None:
        if self.dsd.in_last_phase:
            super().on_train_epoch_end(trainer, pl_module)

    @override
    def on_validation_end(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> None:
        if self.dsd.in_last_phase:
            super().on_validation_end(trainer, pl_module)
