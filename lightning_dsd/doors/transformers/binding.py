"""Which ``transformers.Trainer`` runs the callback. ``transformers`` hands callbacks ``args``, ``state``,
``control``, the model, its optimizer, scheduler and dataloaders, never the ``Trainer``; the door needs it for
``Trainer.log`` (the ``dsd/*`` scalars reach every reporting integration and ``state.log_history``), the Trainer's
``TensorBoardCallback`` (its directory), its MLflow and W&B runs, and its checkpoint folders.

The callback looks up the call stack for the ``Trainer`` whose callback list holds it (:func:`calling_trainer`),
at each ``on_train_begin`` (a resume may run the callback in a second Trainer), which finds it whenever
``Trainer.train()`` runs the events.

Examples:
    >>> from transformers import TrainerCallback
    >>> calling_trainer(TrainerCallback()) is None  # no Trainer up this call stack
    True
"""

from __future__ import annotations

import sys
from typing import Optional

from transformers import Trainer, TrainerCallback


def holds(trainer: Trainer, callback: TrainerCallback) -> bool:
    """Whether ``callback`` (this very object) is among ``trainer``'s callbacks."""
    return any(held is callback for held in trainer.callback_handler.callbacks)


def calling_trainer(callback: TrainerCallback) -> Optional[Trainer]:
    """The ``Trainer`` up the call stack whose callbacks include ``callback``."""
    frame = sys._getframe(1)
    while frame is not None:
        candidate = frame.f_locals.get("self")
        if isinstance(candidate, Trainer) and holds(candidate, callback):
            return candidate
        frame = frame.f_back  # type: ignore[assignment]
    return None
