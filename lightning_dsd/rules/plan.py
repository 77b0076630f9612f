r"""What the masks of each DSD cycle must be, and the one place they are decided, on any number of processes.

A :class:`MaskPlan` is the policy of pruning, free of Lightning: it resolves per-layer overrides, checks that
N:M patterns fit the weights' input dimensions, decides masks from weights (one threshold per tensor, or one
over all targets), and checks masks that come from elsewhere (a checkpoint) against the same rules, entry
count for entry count. :meth:`MaskPlan.decide` gives every rank exactly the masks one process would decide
from the full tensors, whether the weights are plain (one process; DDP, where rank zero decides and
broadcasts) or sharded ``DTensor``\ s (FSDP2, tensor parallelism), built on the primitives of
:mod:`lightning_dsd.rules.sharding`:

* ``scope="layer"`` and N:M: each full tensor is decided on its own (a sharded one gathered **one at a time**,
  decided, sliced to this rank's shard and let go);
* ``scope="global"``: the exact k-th smallest magnitude over all targets, found by bisection on float bit
  patterns with counts summed over ranks (:func:`global_masks`), gathering nothing but, at most, the one
  tensor whose ties the count splits.

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
    >>> weights = {"a": torch.tensor([3.0, -1.0, 0.5]), "b": torch.tensor([[0.2, 4.0], [-2.0, 0.1]])}
    >>> masks = MaskPlan((0.4,), scope="global").decide(weights, cycle=0)
    >>> masks["a"], masks["b"]
    (tensor([ True,  True, False]), tensor([[False,  True],
            [ True, False]]))
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Optional, Sequence, Union

import torch
import torch.distributed as dist
from torch import Tensor

from lightning_dsd.rules.masks import (
    NMPattern,
    Sparsity,
    check_pattern_fits,
    magnitude_masks,
    pack_mask,
    pruned_count,
    score_masks,
    unpack_mask,
)
from lightning_dsd.rules.selection import matches_any
from lightning_dsd.rules.sharding import (
    any_sharded,
    counts_over_ranks,
    full_tensor,
    local_part,
    local_slice,
    magnitude_ranges,
    ordered_bits,
)

SCOPES = ("layer", "global")
_LARGEST_BITS = 0x7FFFFFFF  # above every non-negative float32 bit pattern, NaN included
_SMALLEST_BITS = -0x80000000  # at or below every float32 bit pattern in the order of _score_bits


def shown(sparsity: Sparsity) -> Union[float, str]:
    """A sparsity as users write it: a float, or ``"N:M"``."""
    return str(sparsity) if isinstance(sparsity, NMPattern) else sparsity


def check_scope(
    scope: Any, sparsities: Sequence[Sparsity] = (), layer_sparsity: Optional[Mapping[str, Sparsity]] = None
) -> str:
    """``scope`` checked, with what it takes: one of :data:`SCOPES`; ``"global"`` sets one threshold over all
    targets, so it takes neither ``layer_sparsity`` nor N:M ``sparsities``. The one check of ``scope``, for the
    options and for :class:`MaskPlan`.

    Examples:
        >>> check_scope("global", (0.5,))
        'global'
        >>> check_scope("global", (NMPattern(2, 4),))  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ...
        ValueError: `scope='global'` sets one threshold over all targets, so it takes neither ...
    """
    if scope not in SCOPES:
        raise ValueError(f"`scope` must be one of {list(SCOPES)}. Found: {scope!r}.")
    if scope == "global" and (layer_sparsity or any(isinstance(s, NMPattern) for s in sparsities)):
        overrides = {p: shown(s) for p, s in layer_sparsity.items()} if layer_sparsity else None
        raise ValueError(
            "`scope='global'` sets one threshold over all targets, so it takes neither `layer_sparsity` nor"
            f" 'N:M' patterns. Found: layer_sparsity={overrides!r}, sparsity={[shown(s) for s in sparsities]!r}."
        )
    return str(scope)


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

    def __post_init__(self) -> None:
        check_scope(self.scope, self.sparsities, self.layer_sparsity)

    def global_sparsity(self, cycle: int) -> Optional[float]:
        """The one sparsity over all targets in ``cycle`` under ``scope="global"``; ``None`` per layer."""
        sparsity = self.sparsities[cycle]
        return sparsity if self.scope == "global" and isinstance(sparsity, float) else None

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
        for cycle in range(len(self.sparsities)):
            overall = self.global_sparsity(cycle)
            if overall is not None:
                total = sum(w.numel() for w in weights.values())
                if pruned_count(total, overall) == 0:
                    messages.append(f"sparsity {overall} prunes no weight in cycle {cycle} (scope='global'):"
                                    f" round({overall} * {total}) = 0.")
                continue
            for name, resolved in self.resolve(list(weights), cycle).items():
                numel = weights[name].numel()
                if not isinstance(resolved, NMPattern) and pruned_count(numel, resolved) == 0:
                    messages.append(f"sparsity {resolved} prunes no weight of `{name}` in cycle {cycle}:"
                                    f" round({resolved} * {numel}) = 0.")
        return messages

    @torch.no_grad()
    def decide(self, weights: Mapping[str, Tensor], cycle: int, scores: Optional[Mapping[str, Tensor]] = None
               ) -> dict[str, Tensor]:
        """This rank's keep masks (``True`` = kept) for the targets at the start of ``cycle``'s sparse phase,
        equal on every rank to what one process decides from the full tensors (see the module docstring). A
        collective when a process group runs more than one rank: every rank calls it, with the same names.

        ``scores`` (one tensor per weight, laid out like it: a ``DTensor`` for a sharded weight) rank the entries
        instead of their magnitudes: the lowest are pruned, with the same counts and tie-breaking."""
        ranked = dict(weights) if scores is None else {name: scores[name] for name in weights}
        absolute = scores is None
        sharded = any_sharded(ranked)
        if sharded and self.global_sparsity(cycle) is None:
            return {name: local_slice(self._decide_per_layer({name: full_tensor(w)}, cycle, absolute)[name], w)
                    for name, w in ranked.items()}
        if sharded or not (dist.is_initialized() and dist.get_world_size() > 1):
            return self._decide_local(ranked, cycle, absolute)
        # DDP: rank zero decides and broadcasts packed bits, so every rank prunes alike even where the replicas'
        # weights differ in the last bit.
        on_rank_zero = dist.get_rank() == 0
        packed = [{name: pack_mask(mask) for name, mask in self._decide_local(ranked, cycle, absolute).items()}
                  if on_rank_zero else None]
        dist.broadcast_object_list(packed, src=0)
        decided: dict[str, Tensor] = packed[0] or {}
        return {name: unpack_mask(bits, weights[name].shape).to(weights[name].device) for name, bits in decided.items()}

    def _decide_local(self, ranked: Mapping[str, Tensor], cycle: int, absolute: bool) -> dict[str, Tensor]:
        overall = self.global_sparsity(cycle)
        if overall is not None:
            return global_masks(ranked, overall, absolute)
        return self._decide_per_layer(ranked, cycle, absolute)

    def _decide_per_layer(self, ranked: Mapping[str, Tensor], cycle: int, absolute: bool) -> dict[str, Tensor]:
        masks = magnitude_masks if absolute else score_masks
        return masks(ranked, self.resolve(list(ranked), cycle), self.input_dims)

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
        overall = self.global_sparsity(cycle)
        if overall is not None:
            pruned, total = pruned_and_total(masks)
            expected = pruned_count(total, overall)
            if pruned != expected:
                raise ValueError(f"the masks prune {pruned} of {total} weights, expected"
                                 f" round({overall} * {total}) = {expected} (scope='global')")
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


def pruned_and_total(masks: Mapping[str, Tensor]) -> tuple[int, int]:
    """How many entries ``masks`` prune, and out of how many.

    Examples:
        >>> pruned_and_total({"w": torch.tensor([True, False, False, True])})
        (2, 4)
    """
    return sum(int((~m).sum()) for m in masks.values()), sum(m.numel() for m in masks.values())


@torch.no_grad()
def check_finite(weights: Mapping[str, Tensor], owner: str = "DSD") -> None:
    """Refuse to decide masks from weights with NaN or infinite entries (a diverged run): magnitudes that do
    not order would silently prune fewer than ``round(sparsity * N)``. A collective when any weight is a
    ``DTensor``, so every rank raises alike.

    Examples:
        >>> check_finite({"w": torch.tensor([1.0, float("nan")])})
        Traceback (most recent call last):
        ...
        ValueError: DSD cannot prune `w`: 1 of its 2 weights are NaN or infinite ...
    """
    bad = counts_over_ranks(weights, lambda _, entries: (~torch.isfinite(entries)).sum()).tolist()
    found = [(name, count) for name, count in zip(weights, bad, strict=True) if count]
    if found:
        listed = ", ".join(f"`{name}`: {count} of its {weights[name].numel()} weights" for name, count in found)
        raise ValueError(
            f"{owner} cannot prune {listed} are NaN or infinite at the transition to the sparse phase, so their"
            " magnitudes cannot be ranked. Training has diverged: lower the learning rate or clip gradients,"
            " and resume from an earlier checkpoint. Nothing was pruned."
        )


#: Why a target that magnitude cannot rank stays dense for a cycle (see :func:`same_magnitude`).
SAME_MAGNITUDE = "every weight has magnitude"
#: Why a target that ``importance``'s scores cannot rank stays dense for a cycle (all its scores are equal).
SAME_SCORE = "every weight has the score"


@torch.no_grad()
def same_magnitude(weights: Mapping[str, Tensor], absolute: bool = True) -> dict[str, float]:
    """The tensors whose entries all have the same magnitude (``|w|`` equal in ``float32`` for every entry, all
    zeros included), with that magnitude. Magnitude cannot rank their entries, so a mask would prune by
    position alone: by index order, whatever the sparsity, the scope or the N:M pattern. This is what a
    zero-initialised layer looks like before it trains (LoRA's ``lora_B``, adaLN-Zero, zero-init residual
    branches). A collective when any weight is a ``DTensor``: one all-reduce of each tensor's smallest and
    largest magnitude, nothing gathered (see :func:`~lightning_dsd.rules.sharding.magnitude_ranges`).

    With ``absolute=False`` the ``weights`` are scores (of ``importance``), compared as they are, any sign:
    the tensors whose scores are all equal in ``float32``.

    Examples:
        >>> same_magnitude({"lora_B": torch.zeros(4, 2), "ones": -torch.ones(3), "w": torch.tensor([0.5, 1.0])})
        {'lora_B': 0.0, 'ones': 1.0}
        >>> same_magnitude({"dead": torch.full((3,), -2.0), "signs": torch.tensor([1.0, -1.0])}, absolute=False)
        {'dead': -2.0}
    """
    ranges = magnitude_ranges(weights, absolute)
    found = {}
    for name, (smallest, largest) in zip(weights, ranges.tolist(), strict=True):
        if smallest == largest:
            bits = torch.tensor(int(smallest), dtype=torch.int32)
            bits = bits if absolute else bits ^ ((bits >> 31) & 0x7FFFFFFF)  # the key's flip, undone
            found[name] = float(bits.view(torch.float32))
    return found


@torch.no_grad()
def global_masks(weights: Mapping[str, Tensor], sparsity: float, absolute: bool = True) -> dict[str, Tensor]:
    """Local keep masks pruning the ``round(sparsity * total)`` smallest magnitudes over all ``weights``,
    ties broken by position in the order of ``weights`` then within each full flattened tensor, whether the
    weights are plain or sharded (then without gathering them: a collective). With ``absolute=False`` the
    ``weights`` are scores, any sign, ranked as they are: their lowest values are pruned.

    The threshold is the k-th smallest ``float32`` magnitude, found by bisection over its bit pattern
    (non-negative floats order like their bits): 31 rounds, each counting every local tensor on its device,
    then one host sync and, for sharded weights, one all-reduce of the stacked counts. Sharded magnitudes are
    made one shard at a time, so at most one float32 copy of a shard exists at once; plain ones are made once
    (4 bytes per weight, for the length of the call). Only a tensor whose ties are split by the count is
    gathered, to find which of its tied entries come first.

    Examples:
        >>> global_masks({"a": torch.tensor([0.5, -0.5]), "b": torch.tensor([0.5, 2.0])}, 0.5)  # ties: first go
        {'a': tensor([False, False]), 'b': tensor([True, True])}
        >>> global_masks({"a": torch.tensor([0.5, -0.5]), "b": torch.tensor([-3.0, 2.0])}, 0.5, absolute=False)
        {'a': tensor([ True, False]), 'b': tensor([False,  True])}
    """
    total = sum(w.numel() for w in weights.values())
    k = pruned_count(total, sparsity)
    if k <= 0 or k >= total:
        return {name: torch.full(local_part(w).shape, k <= 0, device=w.device) for name, w in weights.items()}
    def bits_of(entries: Tensor) -> Tensor:
        return _score_bits(entries, absolute)

    made_once = {} if any_sharded(weights) else {name: bits_of(w) for name, w in weights.items()}

    def count(compare: Callable[[Tensor, int], Tensor], threshold: int) -> Tensor:
        def of_tensor(name: str, entries: Tensor) -> Tensor:
            bits = made_once[name] if name in made_once else bits_of(entries)
            return compare(bits, threshold).sum()

        return counts_over_ranks(weights, of_tensor)

    low, high = 0 if absolute else _SMALLEST_BITS, _LARGEST_BITS
    while low < high:  # the smallest t with at least k magnitudes <= t is the k-th smallest
        middle = (low + high) // 2
        if int(count(torch.le, middle).sum()) >= k:
            high = middle
        else:
            low = middle + 1
    threshold = low
    missing = k - int(count(torch.lt, threshold).sum())
    tied = count(torch.eq, threshold).tolist()
    masks = {}
    for (name, weight), n_tied in zip(weights.items(), tied, strict=True):
        prune_ties = min(missing, n_tied)
        missing -= prune_ties
        local_bits = made_once[name] if name in made_once else bits_of(local_part(weight))
        keep = local_bits > threshold
        if prune_ties == 0:
            keep |= local_bits == threshold
        elif prune_ties < n_tied:  # the first prune_ties tied entries of the full tensor go
            full_bits = bits_of(full_tensor(weight))
            full_keep = full_bits > threshold
            later_ties = torch.nonzero(full_bits == threshold).flatten()[prune_ties:]
            full_keep[later_ties] = True
            keep = local_slice(full_keep.view(weight.shape), weight).flatten()
        masks[name] = keep.view(local_part(weight).shape)
    return masks


def _score_bits(entries: Tensor, absolute: bool = True) -> Tensor:
    """The float32 magnitudes of ``entries`` (``absolute``) or the entries themselves, flattened, as int32 that
    order like the floats: non-negative floats order like their bit patterns; a negative float's low 31 bits
    are flipped so that larger magnitudes come lower (``-0.0`` is made ``+0.0`` first, so the two tie)."""
    values = entries.detach().float().flatten()
    return values.abs().view(torch.int32) if absolute else ordered_bits(values)
