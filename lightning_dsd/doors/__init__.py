"""The front doors: each translates its framework's events and objects into the engine's lifecycle.

:mod:`~lightning_dsd.doors.lightning` (``DSDCallback`` for a Lightning ``Trainer``, with its helpers),
:mod:`~lightning_dsd.doors.loop` (``DSD`` for Lightning Fabric and plain PyTorch loops) and
:mod:`~lightning_dsd.doors.transformers` (``DSDTrainerCallback`` for ``transformers.Trainer``); what they share
is in :mod:`~lightning_dsd.doors.base`.
"""
