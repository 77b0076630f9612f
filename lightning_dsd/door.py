"""What every front door shares: the read-only state it shows and the lazy modules it refuses. A door
(``DSDCallback``, ``DSD``) owns an engine and maps its framework onto it; nothing here knows a framework.

Examples:
    >>> from lightning_dsd import DSDCallback
    >>> door = DSDCallback(0.5, 1, 1, 1)
    >>> door.phase.value, door.in_last_phase, door.lr_scale
    ('dense', False, 0.1)
"""

from __future__ import annotations

from typing import Any, Union

import torch
from torch import Tensor, nn

from lightning_dsd.engine import DSDEngine
from lightning_dsd.options import ReadsOptions
from lightning_dsd.phases import Phase
from lightning_dsd.selection import Selection, uninitialized_parameters


class ReadsEngine(ReadsOptions):
    """The read-only state of a front door, read from its engine (and every option, from its options)."""

    _engine: DSDEngine

    @property
    def phase(self) -> Phase:
        """The current phase: :attr:`Phase.DENSE`, :attr:`Phase.SPARSE` or :attr:`Phase.REDENSE`."""
        return self._engine.phase

    @property
    def cycle(self) -> int:
        """The 0-based DSD cycle (one per sparsity)."""
        return self._engine.cycle

    @property
    def masks(self) -> dict[str, Tensor]:
        """Bool keep masks by the model's own parameter names in a sparse phase (``True`` = kept; this rank's
        shard, shaped like ``param.to_local()``, for a ``DTensor``), else empty."""
        return self._engine.masks

    @property
    def mask_bytes(self) -> int:
        """Memory the masks of the current sparse phase hold on the weights' devices (0 outside one): one
        element of the weight's dtype per pruned tensor's weight, or 1 byte with ``mask_storage="bool"``."""
        return self._engine.mask_bytes

    @property
    def layer_sparsities(self) -> dict[str, list[Union[float, str]]]:
        """The sparsity each targeted parameter gets in each cycle, after ``layer_sparsity`` overrides."""
        return self._engine.layer_sparsities

    @property
    def selection(self) -> Selection:
        """What is targeted, with input dimensions, tied names and what was left dense by default."""
        return self._engine.selection

    @property
    def target_names(self) -> list[str]:
        """Names of the parameters DSD targets (each sparse phase prunes those that train then)."""
        return list(self._engine.targets)

    @property
    def phase_label(self) -> str:
        """The phase as the progress bar shows it: ``"sparse"``, or ``"sparse 2/3"`` over several cycles."""
        return self._engine.phase_label

    @property
    def in_last_phase(self) -> bool:
        """Whether the schedule has reached its last phase: the final re-dense, or the final sparse phase when
        ``final_sparse_epochs`` is set (the run ends sparse)."""
        return self._engine.schedule.is_last


def shape_lazy_modules(model: nn.Module, example: Any, owner: str, remedy: str) -> None:
    """Shape lazy modules (``nn.LazyLinear``, ...) with one forward pass of ``example`` (on the model's device),
    in evaluation mode without gradients, so no BatchNorm statistic or dropout draw is spent on it; with no
    example, refuse as :func:`refuse_lazy_modules` does."""
    if not uninitialized_parameters(model):
        return
    if example is None:
        refuse_lazy_modules(model, owner, remedy)
    modes = {module: module.training for module in model.modules()}
    model.eval()
    try:
        with torch.no_grad():
            if isinstance(example, (list, tuple)):
                model(*example)
            elif isinstance(example, dict):
                model(**example)
            else:
                model(example)
    finally:
        for module, training in modes.items():
            module.training = training


def refuse_lazy_modules(model: nn.Module, owner: str, remedy: str) -> None:
    """Refuse a model whose lazy modules (``nn.LazyLinear``, ...) no forward pass has shaped yet: DSD needs
    the shapes of the weights it prunes. ``remedy`` says what to do in the door's own terms."""
    lazy = uninitialized_parameters(model)
    if lazy:
        raise ValueError(
            f"{owner} needs the shapes of the weights it prunes, but {lazy} belong to lazy modules that no forward"
            f" pass has shaped yet. Run one forward pass (e.g. `model(example_batch)`) {remedy}."
        )
