"""Dense-Sparse-Dense training (Han et al., ICLR 2017): a PyTorch Lightning callback, ``DSD`` for Lightning
Fabric and plain PyTorch loops, and ``lightning_dsd.huggingface.DSDTrainerCallback`` for
``transformers.Trainer`` (imported from its module, so ``import lightning_dsd`` never imports transformers),
over one engine (:mod:`lightning_dsd.rules`) behind three doors (:mod:`lightning_dsd.doors`), with tools
around a run (:mod:`lightning_dsd.tools`).

Examples:
    >>> from lightning_dsd import DSDCallback, Phase
    >>> DSDCallback(sparsity=0.5, dense_epochs=10, sparse_epochs=10, redense_epochs=10).phase is Phase.DENSE
    True
"""

from lightning_dsd.doors.lightning.callback import DSDCallback
from lightning_dsd.doors.lightning.checkpoint import FinalPhaseCheckpoint
from lightning_dsd.doors.loop import DSD
from lightning_dsd.rules.phases import Phase
from lightning_dsd.rules.selection import LayerSpec
from lightning_dsd.tools.sensitivity import SensitivityTable, sensitivity_scan
from lightning_dsd.version import __version__

__all__ = [
    "DSD",
    "DSDCallback",
    "FinalPhaseCheckpoint",
    "LayerSpec",
    "Phase",
    "SensitivityTable",
    "__version__",
    "sensitivity_scan",
]
