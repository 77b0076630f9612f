"""The ``transformers.Trainer`` door: :class:`DSDTrainerCallback` (the only part of the package that imports
``transformers``)."""

from lightning_dsd.doors.transformers.callback import DSDTrainerCallback

__all__ = ["DSDTrainerCallback"]
