"""Which ``transformers.Trainer`` runs the callback. ``transformers`` hands callbacks ``args``, ``state``,
``control``, the model, its optimizer, scheduler and dataloaders, never the ``Trainer``; the door needs it for
``Trainer.log`` (the ``dsd/*`` scalars reach every reporting integration and ``state.log_history``), the Trainer's
``TensorBoardCallback`` (its directory), its MLflow and W&B runs, and its checkpoint folders.

The Trainer the user bound with ``DSDTrainerCallback.bind(trainer)`` (:func:`checked_binding`) is the one; else
the callback looks up the call stack for the ``Trainer`` whose callback list holds it (:func:`calling_trainer`),
which finds it whenever ``Trainer.train()`` runs the events, and finds none where a loop of one's own drives them.
:func:`training_trainer` applies that rule at each ``on_train_begin`` (a resume may run the callback in a second
Trainer): a bound Trainer that is not the one training is refused, never written to.

Examples:
    >>> from transformers import TrainerCallback
    >>> calling_trainer(TrainerCallback()) is None  # no Trainer up this call stack
    True
    >>> checked_binding("trainer", TrainerCallback())  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    ...
    TypeError: DSDTrainerCallback.bind(trainer) takes a transformers.Trainer; it was given str.
"""

from __future__ import annotations

import sys
from typing import Any, Optional

from transformers import Trainer, TrainerCallback, TrainerState


def holds(trainer: Trainer, callback: TrainerCallback) -> bool:
    """Whether ``callback`` (this very object) is among ``trainer``'s callbacks."""
    return any(held is callback for held in trainer.callback_handler.callbacks)


def checked_binding(trainer: Any, callback: TrainerCallback) -> Trainer:
    """``trainer``, once it is a ``Trainer`` that holds ``callback`` (``Trainer(..., callbacks=[dsd])`` or
    ``trainer.add_callback(dsd)`` first); refused otherwise."""
    if not isinstance(trainer, Trainer):
        raise TypeError(f"DSDTrainerCallback.bind(trainer) takes a transformers.Trainer; it was given"
                        f" {type(trainer).__name__}.")
    if not holds(trainer, callback):
        names = [type(held).__name__ for held in trainer.callback_handler.callbacks]
        raise ValueError(
            f"DSDTrainerCallback.bind(trainer): this Trainer does not hold this callback (its callbacks are {names})."
            " Give the callback to the Trainer first, `Trainer(..., callbacks=[dsd])` or `trainer.add_callback(dsd)`,"
            " then `dsd.bind(trainer)`."
        )
    return trainer


def training_trainer(bound: Optional[Trainer], callback: TrainerCallback, state: TrainerState) -> Optional[Trainer]:
    """The Trainer whose ``train()`` begins (at ``on_train_begin``, given its ``state``): the bound one, else the
    one up the call stack (:func:`calling_trainer`), else ``None``. A bound Trainer that no longer holds the
    callback, or whose ``state`` is not the one training (another Trainer runs the callback: a resume in a new
    Trainer that was not bound), is refused before anything is written to it."""
    if bound is None:
        return calling_trainer(callback)
    if holds(bound, callback) and bound.state is state:
        return bound
    why = ("no longer holds this callback" if not holds(bound, callback)
           else "is not the one training now (the TrainerState of this `train()` is not its `state`)")
    raise RuntimeError(
        f"DSDTrainerCallback is bound (`dsd.bind(trainer)`) to a Trainer that {why}, so its scalars, reports and"
        " checkpoint state would go to the wrong run. Bind the Trainer that trains, `dsd.bind(trainer)`, before its"
        " `train()`: a Trainer built to resume is bound the same way."
    )


def calling_trainer(callback: TrainerCallback) -> Optional[Trainer]:
    """The ``Trainer`` up the call stack whose callbacks include ``callback``: the fallback where none is bound."""
    frame = sys._getframe(1)
    while frame is not None:
        candidate = frame.f_locals.get("self")
        if isinstance(candidate, Trainer) and holds(candidate, callback):
            return candidate
        frame = frame.f_back  # type: ignore[assignment]
    return None
