"""The ``transformers.Trainer`` door: :class:`DSDTrainerCallback` (the only part of the package that imports
``transformers``), and what it needs of the Trainer, one module each: the ``TrainingArguments`` it refuses and how
far they train (:mod:`.arguments`), which Trainer runs it (:mod:`.binding`), DSD's state in the checkpoint folders
(:mod:`.checkpoints`), the Trainer's best-model record (:mod:`.best_model`), where reports go (:mod:`.output`)."""

from lightning_dsd.doors.transformers.callback import DSDTrainerCallback

__all__ = ["DSDTrainerCallback"]
