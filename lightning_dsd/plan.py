"""What the masks of each DSD cycle must be: the sparsity every target gets, and the masks that follow.

A :class:`MaskPlan` is the policy half of pruning, free of Lightning: it resolves per-layer overrides,
checks that N:M patterns fit the weights' input dimensions, decides masks from weights (one threshold per
tensor, or one over all targets), and checks masks that come from elsewhere (a checkpoint) against the
same rules, entry count for entry count.

Examples:
    >>> import torch
    >>> plan = MaskPlan(sparsities=(0.5,), layer_sparsity={"fc.*": NMPattern(2, 4)})
    >>> weights = {"conv.weight": torch.randn(4, 2, 3), "fc.weight": torch.randn(2, 8)}
    >>> plan.per_layer(weights)
    {'conv.weight': [0.5], 'fc.weight': ['2:4']}
    >>> masks = plan.decide(weights, cycle=0)
    >>> [int((~m).sum()) for m in masks.values()]
    [12, 8]
    >>> plan.check_masks(weights, masks, cycle=0)  # masks this plan decided pass its own check
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Mapping, Optional, Sequence, Union

from torch import Tensor

from lightning_dsd.masks import (
    NMPattern,
    Sparsity,
    check_pattern_fits,
    global_magnitude_masks,
    magnitude_masks,
    pruned_count,
)
from lightning_dsd.selection import matches_any

SCOPES = ("layer", "global")


def shown(sparsity: Sparsity) -> Union[float, str]:
    """A sparsity as users write it: a float, or ``"N:M"``."""
    return str(sparsity) if isinstance(sparsity, NMPattern) else sparsity


@dataclass(frozen=True)
class MaskPlan:
    """The sparsity of every cycle, how it is spread over the targets, and the targets' input dimensions.

    Args:
        sparsities: one sparsity per cycle (a float or an :class:`NMPattern`).
        scope: ``"layer"`` (a threshold per tensor) or ``"global"`` (one threshold over all targets).
        layer_sparsity: per-layer overrides, parameter-name glob to sparsity; the first match wins.
        input_dims: each target's input dimension (dim 1 where not given), along which N:M groups lie.
    """

    sparsities: tuple[Sparsity, ...]
    scope: str = "layer"
    layer_sparsity: Optional[Mapping[str, Sparsity]] = None
    input_dims: Mapping[str, int] = field(default_factory=dict)

    def resolve(self, names: Sequence[str], cycle: int) -> dict[str, Sparsity]:
        """The sparsity of each named target in ``cycle``, after ``layer_sparsity`` overrides."""
        default = self.sparsities[cycle]
        overrides = (self.layer_sparsity or {}).items()
        return {name: next((s for pattern, s in overrides if matches_any(name, [pattern])), default) for name in names}

    def per_layer(self, names: Sequence[str]) -> dict[str, list[Union[float, str]]]:
        """The sparsity each target gets in each cycle, as users write it."""
        cycles = [self.resolve(list(names), cycle) for cycle in range(len(self.sparsities))]
        return {name: [shown(cycle[name]) for cycle in cycles] for name in names}

    def check_fits(self, weights: Mapping[str, Tensor]) -> None:
        """Refuse, before training, an N:M pattern that does not fit a target's input dimension."""
        for cycle in range(len(self.sparsities)):
            for name, sparsity in self.resolve(list(weights), cycle).items():
                if isinstance(sparsity, NMPattern):
                    check_pattern_fits(name, weights[name].shape, sparsity, self.input_dims.get(name, 1))

    def prunes_nothing(self, weights: Mapping[str, Tensor]) -> list[str]:
        """One message per cycle and target whose float sparsity rounds to no pruned weight (``round(s * N) == 0``),
        or, for ``scope="global"``, per cycle whose sparsity prunes nothing over all targets.

        Examples:
            >>> import torch
            >>> MaskPlan((0.001, 0.5)).prunes_nothing({"head.weight": torch.zeros(10, 16)})
            ['sparsity 0.001 prunes no weight of `head.weight` in cycle 0: round(0.001 * 160) = 0.']
        """
        messages = []
        for cycle, sparsity in enumerate(self.sparsities):
            if self.scope == "global":
                total = sum(w.numel() for w in weights.values())
                if pruned_count(total, float(sparsity)) == 0:  # type: ignore[arg-type]
                    messages.append(f"sparsity {shown(sparsity)} prunes no weight in cycle {cycle} (scope='global'):"
                                    f" round({shown(sparsity)} * {total}) = 0.")
                continue
            for name, resolved in self.resolve(list(weights), cycle).items():
                numel = weights[name].numel()
                if not isinstance(resolved, NMPattern) and pruned_count(numel, resolved) == 0:
                    messages.append(f"sparsity {resolved} prunes no weight of `{name}` in cycle {cycle}:"
                                    f" round({resolved} * {numel}) = 0.")
        return messages

    def decide(self, weights: Mapping[str, Tensor], cycle: int) -> dict[str, Tensor]:
        """Keep masks (``True`` = kept) for the targets at the start of ``cycle``'s sparse phase."""
        if self.scope == "global":
            return global_magnitude_masks(weights, float(self.sparsities[cycle]))  # type: ignore[arg-type]
        return magnitude_masks(weights, self.resolve(list(weights), cycle), self.input_dims)

    def check_masks(self, weights: Mapping[str, Tensor], masks: Mapping[str, Tensor], cycle: int) -> None:
        """Raise ``ValueError`` unless ``masks`` are for exactly these targets, with their shapes, and prune
        exactly what this plan prescribes in ``cycle``: ``round(s * N)`` per tensor (``"layer"``), the
        global count over all targets (``"global"``), or ``M - N`` in every N:M group."""
        if set(masks) != set(weights):
            missing, unexpected = sorted(set(weights) - set(masks)), sorted(set(masks) - set(weights))
            raise ValueError(f"masks for {sorted(masks)}, expected the targets {sorted(weights)}"
                             f" (missing {missing}, unexpected {unexpected})")
        for name, weight in weights.items():
            if tuple(masks[name].shape) != tuple(weight.shape):
                raise ValueError(f"the mask of `{name}` has shape {tuple(masks[name].shape)}, expected the"
                                 f" weight's shape {tuple(weight.shape)}")
        if self.scope == "global":
            pruned, total = pruned_fraction(masks)
            expected = pruned_count(total, float(self.sparsities[cycle]))  # type: ignore[arg-type]
            if pruned != expected:
                raise ValueError(f"the masks prune {pruned} of {total} weights, expected"
                                 f" round({shown(self.sparsities[cycle])} * {total}) = {expected} (scope='global')")
            return
        for name, sparsity in self.resolve(list(weights), cycle).items():
            mask = masks[name]
            if isinstance(sparsity, NMPattern):
                groups = (~mask).movedim(self.input_dims.get(name, 1), -1).reshape(-1, sparsity.m).sum(dim=1)
                if not bool((groups == sparsity.m - sparsity.n).all()):
                    raise ValueError(f"the mask of `{name}` does not prune exactly {sparsity.m - sparsity.n} of every"
                                     f" {sparsity.m} weights along its input dimension (sparsity '{sparsity}')")
                continue
            pruned, expected = int((~mask).sum()), pruned_count(mask.numel(), sparsity)
            if pruned != expected:
                raise ValueError(f"the mask of `{name}` prunes {pruned} of {mask.numel()} weights, expected"
                                 f" round({sparsity} * {mask.numel()}) = {expected}")


def pruned_fraction(masks: Mapping[str, Tensor]) -> tuple[int, int]:
    """How many entries ``masks`` prune, out of how many.

    Examples:
        >>> import torch
        >>> pruned_fraction({"w": torch.tensor([True, False, False, True])})
        (2, 4)
    """
    return sum(int((~m).sum()) for m in masks.values()), sum(m.numel() for m in masks.values())
