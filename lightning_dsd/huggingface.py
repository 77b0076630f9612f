"""The public import path of the ``transformers.Trainer`` door (kept apart from ``lightning_dsd``, so that
``import lightning_dsd`` never imports transformers); it lives in :mod:`lightning_dsd.doors.transformers`.

Examples:
    >>> from lightning_dsd.huggingface import DSDTrainerCallback
    >>> DSDTrainerCallback(0.5, 1, 1, 1).phase.value
    'dense'
"""

from lightning_dsd.doors.transformers import DSDTrainerCallback

__all__ = ["DSDTrainerCallback"]
