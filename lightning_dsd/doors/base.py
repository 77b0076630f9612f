"""What every front door shares: the read-only state it shows, read from its engine. A door (``DSDCallback``,
``DSD``, ``DSDTrainerCallback``) owns an engine and maps its framework onto it; nothing here knows a framework.

Examples:
    >>> from lightning_dsd import DSDCallback
    >>> door = DSDCallback(0.5, 1, 1, 1)
    >>> door.phase.value, door.in_last_phase, door.lr_scale
    ('dense', False, 0.1)
"""

from __future__ import annotations

from typing import Union

from torch import Tensor, nn

from lightning_dsd.rules.engine import DSDEngine
from lightning_dsd.rules.options import ReadsOptions
from lightning_dsd.rules.phases import Phase
from lightning_dsd.rules.selection import Selection


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

    def select_targets(self, model: nn.Module) -> Selection:
        """Which parameters DSD prunes in ``model`` (after ``configure_model``, ``fabric.setup`` or sharding):
        by default those the options choose (``include``, ``exclude``, ``layer_types``). Override it in a
        subclass to choose them your way; return a :class:`~lightning_dsd.rules.selection.Selection` of ``model``'s
        own parameters, by name (filtering the default keeps its input dimensions and tied names).

        Examples:
            >>> import dataclasses
            >>> from torch import nn
            >>> from lightning_dsd import DSDCallback
            >>> class LargeOnly(DSDCallback):
            ...     def select_targets(self, model):
            ...         chosen = super().select_targets(model)
            ...         large = {n: p for n, p in chosen.selected.items() if p.numel() >= 1024}
            ...         return dataclasses.replace(chosen, selected=large)
            >>> model = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 2))
            >>> list(LargeOnly(0.5, 1, 1, 1).select_targets(model).selected)
            ['0.weight']
        """
        return self._engine.default_selection(model)

    @property
    def in_last_phase(self) -> bool:
        """Whether the schedule has reached its last phase: the final re-dense, or the final sparse phase when
        ``final_sparse_epochs`` is set (the run ends sparse)."""
        return self._engine.schedule.is_last
