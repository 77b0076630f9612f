"""Lightning's ``BackboneFinetuning`` as a scheduler DSD can scale at re-dense.

``BackboneFinetuning`` sets the backbone's param group itself, at each epoch start, from its own
``previous_backbone_lr`` (and ``backbone_initial_lr``, when given). :class:`BackboneRates` hands those to the
rules as a :class:`~lightning_dsd.rules.lr.ScalesItself`, so that re-dense multiplies them with every other
learning rate and the backbone group trains at ``lr_scale`` times what it would have.

Examples:
    >>> from lightning.pytorch.callbacks import BackboneFinetuning
    >>> finetuning = BackboneFinetuning(unfreeze_backbone_at_epoch=1, backbone_initial_lr=0.01)
    >>> finetuning.previous_backbone_lr = 0.02
    >>> BackboneRates(finetuning).scale_learning_rate(0.1)
    >>> round(finetuning.previous_backbone_lr, 6), round(finetuning.backbone_initial_lr, 6)
    (0.002, 0.001)
"""

from __future__ import annotations

from lightning.pytorch.callbacks import BackboneFinetuning

#: The learning-rate-valued attributes of ``BackboneFinetuning`` (``None`` until set).
BACKBONE_LR_ATTRIBUTES = ("previous_backbone_lr", "backbone_initial_lr")


class BackboneRates:
    """The learning-rate state of one ``BackboneFinetuning`` callback, scaled in place."""

    def __init__(self, finetuning: BackboneFinetuning) -> None:
        self.finetuning = finetuning

    def scale_learning_rate(self, factor: float) -> None:
        for attribute in BACKBONE_LR_ATTRIBUTES:
            value = getattr(self.finetuning, attribute, None)
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                setattr(self.finetuning, attribute, value * factor)
