"""DSD on sharded parameters: the DTensors of FSDP2 (``fully_shard``) and of tensor parallelism.

Under Lightning's ``ModelParallelStrategy`` a parameter is a :class:`~torch.distributed.tensor.DTensor`:
each rank holds one shard (``to_local()``), and the placements say how the full tensor is split over the
device mesh (``Shard(d)`` splits dim ``d``, unevenly when it does not divide; ``Replicate()`` copies it).
DSD must prune exactly what it would prune on the full tensor, so:

* masks are decided on full tensors gathered **one at a time** (:func:`decide_masks`, scope ``"layer"``
  and N:M), with the very function used on one device; each rank keeps only the slice of its shard
  (:func:`local_slice`). Scope ``"global"`` gathers nothing: :func:`global_masks` finds the exact k-th
  smallest magnitude over all targets by bisection on float bit patterns, summing counts over ranks;
* counts over ranks take every entry once (:func:`counts_once`);
* checkpoints hold full masks (gathered one at a time by :class:`FullMasks`), so they resume on any mesh.

Every function here that gathers or sums is a collective: all ranks must call it, in the same order. On
plain tensors they are the identity and need no process group, so one process runs them as is.

Examples:
    >>> import torch
    >>> from lightning_dsd.plan import MaskPlan
    >>> weights = {"a": torch.tensor([3.0, -1.0, 0.5]), "b": torch.tensor([[0.2, 4.0], [-2.0, 0.1]])}
    >>> masks = decide_masks(MaskPlan((0.4,), scope="global"), weights, cycle=0)
    >>> masks["a"], masks["b"]
    (tensor([ True,  True, False]), tensor([[False,  True],
            [ True, False]]))
    >>> pruned_total(masks, weights)
    (3, 7)
"""

from __future__ import annotations

from functools import partial
from typing import Callable, Iterator, Mapping, Sequence

import torch
import torch.distributed as dist
from torch import Tensor
from torch.distributed.tensor import DTensor, distribute_tensor

from lightning_dsd.masks import pruned_count
from lightning_dsd.plan import MaskPlan

_LARGEST_BITS = 0x7FFFFFFF  # above every non-negative float32 bit pattern, NaN included


def any_sharded(tensors: Mapping[str, Tensor]) -> bool:
    """Whether any of ``tensors`` is a ``DTensor``: then DSD works shard by shard, with collectives."""
    return any(isinstance(t, DTensor) for t in tensors.values())


def local_part(tensor: Tensor) -> Tensor:
    """The entries this rank holds: ``to_local()`` of a ``DTensor`` (a view: writing to it writes the
    shard), the tensor itself otherwise."""
    return tensor.to_local() if isinstance(tensor, DTensor) else tensor


def full_tensor(tensor: Tensor) -> Tensor:
    """The whole tensor on every rank (a collective for a ``DTensor``), the tensor itself otherwise."""
    return tensor.full_tensor().detach() if isinstance(tensor, DTensor) else tensor.detach()


def local_slice(full: Tensor, like: Tensor) -> Tensor:
    """The part of ``full`` (a tensor of ``like``'s global shape, the same on every rank) that this rank
    holds of ``like``; no communication. ``full`` itself when ``like`` is not a ``DTensor``."""
    if not isinstance(like, DTensor):
        return full
    return distribute_tensor(full, like.device_mesh, like.placements, src_data_rank=None).to_local()


def full_mask(local_mask: Tensor, like: Tensor) -> Tensor:
    """The whole bool mask of ``like`` from each rank's ``local_mask`` (a collective for a ``DTensor``)."""
    if not isinstance(like, DTensor):
        return local_mask.bool()
    shards = DTensor.from_local(
        local_mask.to(torch.uint8), like.device_mesh, like.placements, shape=like.shape, stride=like.stride()
    )
    return shards.full_tensor().bool()


def counts_once(tensor: Tensor) -> bool:
    """Whether this rank's entries of ``tensor`` take part in sums over ranks, so that each entry counts
    once: a plain tensor, which every rank holds whole, counts on rank zero; a ``DTensor`` shard counts on
    the copy of its mesh that holds rank zero (a parameter on a sub-mesh, e.g. the data-parallel mesh of a
    2-D layout, has one copy of it per tensor-parallel rank), by the first rank along each mesh dimension
    it is replicated on."""
    if not isinstance(tensor, DTensor):
        return not dist.is_initialized() or dist.get_rank() == 0
    mesh = tensor.device_mesh
    coordinate: Sequence[int] = mesh.get_coordinate() or ()
    placements = zip(tensor.placements, coordinate, strict=True)
    holds_rank_zero = bool((mesh.mesh == 0).any())
    return holds_rank_zero and all(index == 0 or not placement.is_replicate() for placement, index in placements)


def _sum_over_ranks(counts: Tensor) -> Tensor:
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(counts)
    return counts


def _device_of(tensors: Mapping[str, Tensor]) -> torch.device:
    """Where counts travel: the weights' device (NCCL needs CUDA tensors, gloo takes CPU ones)."""
    return next(iter(tensors.values())).device if tensors else torch.device("cpu")


def _counts_over_ranks(tensors: Mapping[str, Tensor], count: Callable[[str, Tensor], int]) -> list[int]:
    """``count(name, entries)`` of each full tensor: on plain tensors, counted here; when any is a
    ``DTensor``, counted on each rank's local part and summed over ranks, each entry once (a collective)."""
    if not any_sharded(tensors):
        return [count(name, tensor) for name, tensor in tensors.items()]
    local = [count(name, local_part(t)) if counts_once(t) else 0 for name, t in tensors.items()]
    return _sum_over_ranks(torch.tensor(local, dtype=torch.int64, device=_device_of(tensors))).tolist()


@torch.no_grad()
def count_zeros(weights: Mapping[str, Tensor]) -> dict[str, int]:
    """Exact zeros in each full tensor, counted shard by shard (a collective when any is a ``DTensor``)."""
    zeros = _counts_over_ranks(weights, lambda _, entries: int((entries == 0).sum()))
    return dict(zip(weights, zeros, strict=True))


@torch.no_grad()
def pruned_total(masks: Mapping[str, Tensor], weights: Mapping[str, Tensor]) -> tuple[int, int]:
    """How many entries the (local) keep ``masks`` prune over the full ``weights``, out of how many (a
    collective when any weight is a ``DTensor``)."""
    pruned = _counts_over_ranks(weights, lambda name, _: int((~masks[name]).sum()))
    return sum(pruned), sum(w.numel() for w in weights.values())


def check_placements(weights: Mapping[str, Tensor]) -> None:
    """Refuse, before training, a sharded target with a ``Partial`` placement (values still to be summed).

    Examples:
        >>> check_placements({"w": torch.zeros(2)})  # plain tensors always pass
    """
    for name, weight in weights.items():
        if isinstance(weight, DTensor) and any(p.is_partial() for p in weight.placements):
            raise ValueError(
                f"DSDCallback prunes sharded parameters that are split or copied over the mesh, but `{name}` has"
                f" placements {weight.placements}: its full values are a pending reduction, not a weight."
                " Shard it with `fully_shard` or `parallelize_module`, or `exclude` it."
            )


@torch.no_grad()
def decide_masks(plan: MaskPlan, weights: Mapping[str, Tensor], cycle: int) -> dict[str, Tensor]:
    """Each rank's keep masks for its shards, equal to the slices of the masks ``plan.decide`` gives on
    the full tensors (a collective): per tensor, each full tensor is gathered in turn, decided, sliced
    and let go; for ``scope="global"``, by :func:`global_masks`, which gathers at most one tensor."""
    if plan.scope == "global":
        return global_masks(weights, float(plan.sparsities[cycle]))  # type: ignore[arg-type]
    masks = {}
    for name, weight in weights.items():
        decided = plan.decide({name: full_tensor(weight)}, cycle)[name]
        masks[name] = local_slice(decided, weight)
    return masks


@torch.no_grad()
def global_masks(weights: Mapping[str, Tensor], sparsity: float) -> dict[str, Tensor]:
    """Local keep masks pruning the ``round(sparsity * total)`` smallest magnitudes over all ``weights``,
    ties broken by position in the order of ``weights`` then within each full flattened tensor: exactly
    :func:`lightning_dsd.masks.global_magnitude_masks` on the full tensors, without gathering them.

    The threshold is the k-th smallest ``float32`` magnitude, found by bisection over its bit pattern
    (non-negative floats order like their bits): 31 rounds, each a count of the local shards and one
    all-reduce of a number per tensor. Only a tensor whose ties are split by the count is gathered, to
    find which of its tied entries come first.
    """
    bits = {name: local_part(w).detach().abs().float().flatten().view(torch.int32) for name, w in weights.items()}
    total = sum(w.numel() for w in weights.values())
    k = pruned_count(total, sparsity)
    if k <= 0 or k >= total:
        return {name: torch.full(local_part(w).shape, k <= 0, device=w.device) for name, w in weights.items()}

    def count(predicate: Callable[[Tensor], Tensor]) -> list[int]:
        return _counts_over_ranks(weights, lambda name, _: int(predicate(bits[name]).sum()))

    low, high = 0, _LARGEST_BITS
    while low < high:  # the smallest t with at least k magnitudes <= t is the k-th smallest
        middle = (low + high) // 2
        if sum(count(partial(torch.le, other=middle))) >= k:
            high = middle
        else:
            low = middle + 1
    threshold = low
    missing = k - sum(count(partial(torch.lt, other=threshold)))
    tied = count(partial(torch.eq, other=threshold))
    masks = {}
    for (name, weight), n_tied in zip(weights.items(), tied, strict=True):
        prune_ties = min(missing, n_tied)
        missing -= prune_ties
        local_bits = bits[name]
        keep = local_bits > threshold
        if prune_ties == 0:
            keep |= local_bits == threshold
        elif prune_ties < n_tied:  # the first prune_ties tied entries of the full tensor go
            full_bits = full_tensor(weight).abs().float().flatten().view(torch.int32)
            full_keep = full_bits > threshold
            later_ties = torch.nonzero(full_bits == threshold).flatten()[prune_ties:]
            full_keep[later_ties] = True
            keep = local_slice(full_keep.view(weight.shape), weight).flatten()
        masks[name] = keep.view(local_part(weight).shape)
    return masks


class FullMasks(Mapping[str, Tensor]):
    """Full bool masks read from local ones, each gathered when it is read (so one at a time when
    iterated): what a checkpoint stores, whatever the mesh. Reading one is a collective.

    Examples:
        >>> import torch
        >>> masks = FullMasks({"w": torch.tensor([True, False])}, {"w": torch.zeros(2)})
        >>> dict(masks)
        {'w': tensor([ True, False])}
    """

    def __init__(self, local_masks: Mapping[str, Tensor], weights: Mapping[str, Tensor]) -> None:
        self._local_masks = local_masks
        self._weights = weights

    def __getitem__(self, name: str) -> Tensor:
        return full_mask(self._local_masks[name], self._weights[name])

    def __iter__(self) -> Iterator[str]:
        return iter(self._local_masks)

    def __len__(self) -> int:
        return len(self._local_masks)
