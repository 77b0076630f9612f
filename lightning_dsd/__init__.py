"""Dense-Sparse-Dense training (Han et al., ICLR 2017): a PyTorch Lightning callback, ``DSD`` for Lightning
Fabric and plain PyTorch loops, and ``lightning_dsd.huggingface.DSDTrainerCallback`` for ``transformers.Trainer``
(imported from its module, so ``import lightning_dsd`` never imports transformers), over one engine.

Examples:
    >>> from lightning_dsd import DSDCallback, Phase
    >>> DSDCallback(sparsity=0.5, dense_epochs=10, sparse_epochs=10, redense_epochs=10).phase is Phase.DENSE
    True
"""

from lightning_dsd.callback import DSDCallback
from lightning_dsd.checkpoint import FinalPhaseCheckpoint
from lightning_dsd.loop import DSD
from lightning_dsd.phases import Phase
from lightning_dsd.selection import LayerSpec
from lightning_dsd.sensitivity import SensitivityTable, sensitivity_scan
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
