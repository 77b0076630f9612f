"""DSD across processes: plain weights under DDP, and the sharded DTensors of FSDP2 and tensor parallelism.

Under ``fully_shard`` or tensor parallelism a parameter is a :class:`~torch.distributed.tensor.DTensor`:
each rank holds one shard (``to_local()``), and the placements say how the full tensor is split over the
device mesh (``Shard(d)`` splits dim ``d``, unevenly when it does not divide; ``Replicate()`` copies it).
DSD must prune exactly what it would prune on the full tensor, so:

* :func:`decide_masks` is the one place masks are decided, for one process, DDP (rank zero decides and
  broadcasts) and DTensors: full tensors are gathered **one at a time** (scope ``"layer"`` and N:M) and
  decided with the very function used on one device; each rank keeps only the slice of its shard
  (:func:`local_slice`). Scope ``"global"`` gathers nothing: :func:`global_masks` finds the exact k-th
  smallest magnitude over all targets by bisection on float bit patterns, summing counts over ranks;
* counts over ranks take every entry once (:func:`counts_once`), one host sync and one all-reduce per count;
* checkpoints hold full masks (gathered one at a time by :class:`FullMasks`), so they resume on any mesh.

Every function here that gathers, sums or broadcasts is a collective: all ranks must call it, in the same
order. On plain tensors in one process they are the identity and need no process group.

Examples:
    >>> import torch
    >>> from lightning_dsd.plan import MaskPlan
    >>> weights = {"a": torch.tensor([3.0, -1.0, 0.5]), "b": torch.tensor([[0.2, 4.0], [-2.0, 0.1]])}
    >>> masks = decide_masks(MaskPlan((0.4,), scope="global"), weights, cycle=0)
    >>> masks["a"], masks["b"]
    (tensor([ True,  True, False]), tensor([[False,  True],
            [ True, False]]))
    >>> pruned_per_tensor(masks, weights)
    {'a': 1, 'b': 2}
"""

from __future__ import annotations

from typing import Callable, Iterator, Mapping, Sequence, TypeVar

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.distributed.fsdp import FSDPModule, FullyShardedDataParallel
from torch.distributed.tensor import DTensor, distribute_tensor

from lightning_dsd.masks import pack_mask, pruned_count, unpack_mask
from lightning_dsd.plan import MaskPlan

T = TypeVar("T")

_FSDP1_FLATTENED = "_fsdp_flattened"  # torch.distributed.fsdp._common_utils.FSDP_FLATTENED
_LARGEST_BITS = 0x7FFFFFFF  # above every non-negative float32 bit pattern, NaN included


def any_sharded(tensors: Mapping[str, Tensor]) -> bool:
    """Whether any of ``tensors`` is a ``DTensor``: then DSD works shard by shard, with collectives."""
    return any(isinstance(t, DTensor) for t in tensors.values())


def local_part(tensor: Tensor) -> Tensor:
    """The entries this rank holds: ``to_local()`` of a ``DTensor`` (a view: writing to it writes the
    shard), the tensor itself otherwise."""
    return tensor.to_local() if isinstance(tensor, DTensor) else tensor


def full_tensor(tensor: Tensor) -> Tensor:
    """The whole tensor on every rank, on the tensor's device (a collective for a ``DTensor``, which travels
    through :func:`collective_device`), the tensor itself otherwise."""
    if not isinstance(tensor, DTensor):
        return tensor.detach()
    device = collective_device(tensor.device)
    if device == tensor.device:
        return tensor.full_tensor().detach()
    moved = DTensor.from_local(
        tensor.to_local().to(device), tensor.device_mesh, tensor.placements, shape=tensor.shape, stride=tensor.stride()
    )
    return moved.full_tensor().detach().to(tensor.device)


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
    return full_tensor(shards).bool()


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
    if dist.is_initialized():
        dist.all_reduce(counts)
    return counts


def collective_device(data: torch.device) -> torch.device:
    """Where tensors of ``data``'s device travel between ranks: the current CUDA device when the default
    process group is NCCL (which takes only CUDA tensors, also for the CPU shards of FSDP2's
    ``CPUOffloadPolicy``), ``data`` itself otherwise (gloo takes both)."""
    if data.type == "cpu" and dist.is_initialized() and dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return data


def _counts_over_ranks(tensors: Mapping[str, Tensor], count: Callable[[str, Tensor], Tensor]) -> Tensor:
    """``count(name, entries)`` (a 0-dim integer tensor) of each full tensor, stacked on the CPU: on plain
    tensors, counted here; when any is a ``DTensor``, counted on each rank's local part and summed over
    ranks, each entry once (a collective). The counts stay on their device until one transfer brings the
    stack back: one host sync and at most one all-reduce per call, whatever the number of tensors."""
    if not tensors:
        return torch.zeros(0, dtype=torch.int64)
    sharded = any_sharded(tensors)
    device = collective_device(next(iter(tensors.values())).device) if sharded else torch.device("cpu")
    counts = [
        count(name, local_part(t)).to(device=device, dtype=torch.int64)
        if not sharded or counts_once(t) else torch.zeros((), dtype=torch.int64, device=device)
        for name, t in tensors.items()
    ]
    stacked = torch.stack(counts)
    return (_sum_over_ranks(stacked) if sharded else stacked).cpu()


@torch.no_grad()
def count_zeros(weights: Mapping[str, Tensor]) -> dict[str, int]:
    """Exact zeros in each full tensor, counted shard by shard (a collective when any is a ``DTensor``)."""
    zeros = _counts_over_ranks(weights, lambda _, entries: (entries == 0).sum())
    return dict(zip(weights, zeros.tolist(), strict=True))


@torch.no_grad()
def pruned_per_tensor(masks: Mapping[str, Tensor], weights: Mapping[str, Tensor]) -> dict[str, int]:
    """How many entries of each full weight the (local) keep ``masks`` prune (a collective when any weight is
    a ``DTensor``)."""
    pruned = _counts_over_ranks(weights, lambda name, _: (~masks[name]).sum())
    return dict(zip(weights, pruned.tolist(), strict=True))


def reshard_gathered(model: nn.Module) -> None:
    """Free the gathered (unsharded) parameters FSDP2 keeps after a forward without backward (the root
    module's, and every module's with ``reshard_after_forward=False``), so the next forward gathers the
    shards afresh: called after every change DSD makes to sharded weights. Local: no collective.

    Examples:
        >>> reshard_gathered(torch.nn.Linear(2, 2))  # no FSDP2 module: nothing to do
    """
    for module in model.modules():
        if isinstance(module, FSDPModule):
            module.reshard()


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
    bad = _counts_over_ranks(weights, lambda _, entries: (~torch.isfinite(entries)).sum()).tolist()
    found = [(name, count) for name, count in zip(weights, bad, strict=True) if count]
    if found:
        listed = ", ".join(f"`{name}`: {count} of its {weights[name].numel()} weights" for name, count in found)
        raise ValueError(
            f"{owner} cannot prune {listed} are NaN or infinite at the transition to the sparse phase, so their"
            " magnitudes cannot be ranked. Training has diverged: lower the learning rate or clip gradients,"
            " and resume from an earlier checkpoint. Nothing was pruned."
        )


def refuse_flat_shards(model: nn.Module, owner: str = "DSD") -> None:
    """Refuse, before anything changes, a model sharded by FSDP1 (torch's ``FullyShardedDataParallel``, what
    Fabric's ``strategy="fsdp"`` and Lightning's ``FSDPStrategy`` build) or DeepSpeed: their flat shards mix
    the entries of several layers, so no rank holds a tensor whose magnitudes can be ranked. Local: every rank
    refuses alike, as every rank holds the same wrappers.

    Examples:
        >>> refuse_flat_shards(torch.nn.Linear(2, 2))  # a plain model passes
    """
    flat = next(
        (
            (name or "the model", type(module).__name__)
            for name, module in model.named_modules()
            if isinstance(module, FullyShardedDataParallel)
            or any(cls.__name__ == "DeepSpeedEngine" for cls in type(module).__mro__)
        ),
        None,
    )
    if flat is None:  # the module FSDP1 wraps, handed over without its wrapper: FSDP1 marks the parameters it flattened
        flat = next(((name, "an FSDP1-flattened parameter") for name, p in model.named_parameters()
                     if getattr(p, _FSDP1_FLATTENED, False)), None)
    if flat is not None:
        raise ValueError(
            f"{owner} cannot prune a model whose parameters are flattened into shards: found {flat[1]} at"
            f" `{flat[0]}` (FSDP1, as Lightning's `FSDPStrategy` and Fabric's `strategy='fsdp'` build it, or"
            " DeepSpeed). A flat shard mixes the entries of several layers, so per-tensor magnitude thresholds"
            " cannot be computed on it. Shard the model with FSDP2's `fully_shard` instead (Lightning and Fabric:"
            " `strategy=ModelParallelStrategy(...)`, applying `fully_shard` in `configure_model` or the"
            " parallelize function), or train without sharding (DDP). Nothing was changed."
        )


def check_placements(weights: Mapping[str, Tensor]) -> None:
    """Refuse, before training, a sharded target with a ``Partial`` placement (values still to be summed).

    Examples:
        >>> check_placements({"w": torch.zeros(2)})  # plain tensors always pass
    """
    for name, weight in weights.items():
        if isinstance(weight, DTensor) and any(p.is_partial() for p in weight.placements):
            raise ValueError(
                f"DSD prunes sharded parameters that are split or copied over the mesh, but `{name}` has"
                f" placements {weight.placements}: its full values are a pending reduction, not a weight."
                " Shard it with `fully_shard` or `parallelize_module`, or `exclude` it."
            )


def from_rank_zero(value: T) -> T:
    """``value`` as rank zero has it, on every rank (a broadcast when a process group runs several ranks), so
    that every rank takes the same decision from it.

    Examples:
        >>> from_rank_zero(0.5)  # one process: the value itself
        0.5
    """
    if not (dist.is_initialized() and dist.get_world_size() > 1):
        return value
    holder = [value]
    dist.broadcast_object_list(holder, src=0)
    return holder[0]


@torch.no_grad()
def decide_masks(plan: MaskPlan, weights: Mapping[str, Tensor], cycle: int) -> dict[str, Tensor]:
    """This rank's keep masks for ``cycle``, equal on every rank to ``plan.decide`` on the full tensors (a
    collective when a process group runs more than one rank). The one place that says how:

    * sharded weights (any ``DTensor``): for ``scope="global"`` by :func:`global_masks`, which gathers at
      most one tensor; otherwise each full tensor is gathered in turn, decided, sliced to this rank's
      shard and let go;
    * plain weights over several ranks (DDP): decided on rank zero and broadcast as packed bits, so every
      rank prunes alike even where their weights differ in the last bit;
    * one process: decided here.
    """
    if any_sharded(weights):
        if plan.scope == "global":
            return global_masks(weights, float(plan.sparsities[cycle]))  # type: ignore[arg-type]
        masks = {}
        for name, weight in weights.items():
            decided = plan.decide({name: full_tensor(weight)}, cycle)[name]
            masks[name] = local_slice(decided, weight)
        return masks
    if not (dist.is_initialized() and dist.get_world_size() > 1):
        return plan.decide(weights, cycle)
    packed = [
        {name: pack_mask(mask).cpu() for name, mask in plan.decide(weights, cycle).items()}
        if dist.get_rank() == 0 else None
    ]
    dist.broadcast_object_list(packed, src=0)
    broadcast: dict[str, Tensor] = packed[0] or {}
    return {name: unpack_mask(bits, weights[name].shape).to(weights[name].device) for name, bits in broadcast.items()}


@torch.no_grad()
def global_masks(weights: Mapping[str, Tensor], sparsity: float) -> dict[str, Tensor]:
    """Local keep masks pruning the ``round(sparsity * total)`` smallest magnitudes over all ``weights``,
    ties broken by position in the order of ``weights`` then within each full flattened tensor: exactly
    :func:`lightning_dsd.masks.global_magnitude_masks` on the full tensors, without gathering them.

    The threshold is the k-th smallest ``float32`` magnitude, found by bisection over its bit pattern
    (non-negative floats order like their bits): 31 rounds, each counting every local shard on its device,
    then one all-reduce of the stacked counts and one host sync. Magnitudes are made one tensor at a time,
    so at most one float32 copy of a shard exists at once. Only a tensor whose ties are split by the count
    is gathered, to find which of its tied entries come first.
    """
    total = sum(w.numel() for w in weights.values())
    k = pruned_count(total, sparsity)
    if k <= 0 or k >= total:
        return {name: torch.full(local_part(w).shape, k <= 0, device=w.device) for name, w in weights.items()}

    def count(compare: Callable[[Tensor, int], Tensor], threshold: int) -> Tensor:
        return _counts_over_ranks(weights, lambda _, entries: compare(_magnitude_bits(entries), threshold).sum())

    low, high = 0, _LARGEST_BITS
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
        local_bits = _magnitude_bits(local_part(weight))
        keep = local_bits > threshold
        if prune_ties == 0:
            keep |= local_bits == threshold
        elif prune_ties < n_tied:  # the first prune_ties tied entries of the full tensor go
            full_bits = _magnitude_bits(full_tensor(weight))
            full_keep = full_bits > threshold
            later_ties = torch.nonzero(full_bits == threshold).flatten()[prune_ties:]
            full_keep[later_ties] = True
            keep = local_slice(full_keep.view(weight.shape), weight).flatten()
        masks[name] = keep.view(local_part(weight).shape)
    return masks


def _magnitude_bits(entries: Tensor) -> Tensor:
    """The float32 magnitudes of ``entries``, flattened, as their int32 bit patterns (which order alike)."""
    return entries.detach().abs().float().flatten().view(torch.int32)


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
