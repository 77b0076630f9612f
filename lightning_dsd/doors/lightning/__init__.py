"""The Lightning ``Trainer`` door: :class:`DSDCallback`, and what it needs of the Trainer: its training
limits (:mod:`.limits`), where its output goes (:mod:`.output`), the phase in its progress bar
(:mod:`.progress`), sparse exports (:mod:`.export`), :class:`FinalPhaseCheckpoint` (:mod:`.checkpoint`), and
``LightningCLI``'s reading of a sparsity (:mod:`.cli`)."""

from lightning_dsd.doors.lightning.callback import DSDCallback
from lightning_dsd.doors.lightning.checkpoint import FinalPhaseCheckpoint

__all__ = ["DSDCallback", "FinalPhaseCheckpoint"]
