"""DSD's distributed primitives: plain weights under DDP, and the sharded DTensors of FSDP2 and tensor parallelism.

Under ``fully_shard`` or tensor parallelism a parameter is a :class:`~torch.distributed.tensor.DTensor`:
each rank holds one shard (``to_local()``), and the placements say how the full tensor is split over the
device mesh (``Shard(d)`` splits dim ``d``, unevenly when it does not divide; ``Replicate()`` copies it).
This module holds the operations every DSD rule is built from, and no rule itself (which masks to choose is
:class:`~lightning_dsd.rules.plan.MaskPlan`'s decision):

* views and gathers: a rank's part of a tensor (:func:`local_part`, :func:`local_slice`), the whole tensor or
  mask from the shards (:func:`full_tensor`, :func:`full_mask`, :class:`FullMasks`, one at a time);
* counts over ranks that take every entry once (:func:`counts_once`, :func:`counts_over_ranks`): one host
  sync and at most one all-reduce per count, whatever the number of tensors; each tensor's smallest and
  largest magnitude the same way (:func:`magnitude_ranges`);
* rank zero's value on every rank (:func:`from_rank_zero`), FSDP2's gathered copies dropped
  (:func:`reshard_gathered`), and the checks of what can be sharded (:func:`check_placements`,
  :func:`refuse_flat_shards`).

Every function here that gathers, sums or broadcasts is a collective: all ranks must call it, in the same
order. On plain tensors in one process they are the identity and need no process group.

Examples:
    >>> import torch
    >>> weights = {"a": torch.tensor([3.0, 0.0, 0.5]), "b": torch.tensor([[0.0, 4.0], [-2.0, 0.0]])}
    >>> count_zeros(weights)
    {'a': 1, 'b': 2}
    >>> local_part(weights["a"]) is weights["a"], full_mask(torch.tensor([True, False]), torch.zeros(2))
    (True, tensor([ True, False]))
"""

from __future__ import annotations

from typing import Callable, Iterator, Mapping, Sequence, TypeVar

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.distributed.fsdp import FSDPModule, FullyShardedDataParallel
from torch.distributed.tensor import DTensor, distribute_tensor

T = TypeVar("T")

_FSDP1_FLATTENED = "_fsdp_flattened"  # torch.distributed.fsdp._common_utils.FSDP_FLATTENED


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


def counts_over_ranks(tensors: Mapping[str, Tensor], count: Callable[[str, Tensor], Tensor]) -> Tensor:
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
def magnitude_ranges(tensors: Mapping[str, Tensor], absolute: bool = True) -> Tensor:
    """The smallest and largest magnitude of each full tensor, as the int32 bit patterns of ``float32`` ``|w|``
    (which order like the magnitudes), stacked ``(len(tensors), 2)`` on the CPU: on plain tensors, found here;
    when any is a ``DTensor``, found on each rank's local part (an empty one takes no part) and combined by
    one all-reduce of the stack (a collective). Nothing is gathered. With ``absolute=False`` the values
    themselves, any sign, as :func:`ordered_bits` keys.

    Examples:
        >>> magnitude_ranges({"a": torch.tensor([0.5, -0.5]), "b": torch.tensor([0.0, 2.0])}).tolist()
        [[1056964608, 1056964608], [0, 1073741824]]
    """
    if not tensors:
        return torch.zeros(0, 2, dtype=torch.int64)
    sharded = any_sharded(tensors)
    device = collective_device(next(iter(tensors.values())).device) if sharded else torch.device("cpu")
    empty = torch.tensor([-(2**40), -(2**40)], dtype=torch.int64, device=device)  # loses every maximum
    ranges = []
    for tensor in tensors.values():
        values = local_part(tensor).detach().float().flatten()
        bits = values.abs().view(torch.int32) if absolute else ordered_bits(values)
        if bits.numel() == 0:
            ranges.append(empty)
            continue
        ranges.append(torch.stack([-bits.min().long(), bits.max().long()]).to(device=device))
    stacked = torch.stack(ranges)  # (-smallest, largest): one maximum finds both
    if sharded and dist.is_initialized():
        dist.all_reduce(stacked, op=dist.ReduceOp.MAX)
    stacked = stacked.cpu()
    return torch.stack([-stacked[:, 0], stacked[:, 1]], dim=1)


def ordered_bits(values: Tensor) -> Tensor:
    """``float32`` values as int32 keys that order as the values do, any sign: a negative value's low 31 bits
    are flipped, so larger magnitudes come lower (``-0.0`` is made ``+0.0`` first, so the two tie). The same
    flip applied to a key's int32 gives back the value's bits.

    Examples:
        >>> keys = ordered_bits(torch.tensor([-2.0, -0.5, -0.0, 0.0, 1.0]))
        >>> keys.diff().tolist()[2], bool((keys.diff()[[0, 1, 3]] > 0).all())
        (0, True)
        >>> (keys ^ ((keys >> 31) & 0x7FFFFFFF)).view(torch.float32).tolist()
        [-2.0, -0.5, 0.0, 0.0, 1.0]
    """
    bits = (values.float() + 0.0).view(torch.int32)
    return bits ^ ((bits >> 31) & 0x7FFFFFFF)


@torch.no_grad()
def count_zeros(weights: Mapping[str, Tensor]) -> dict[str, int]:
    """Exact zeros in each full tensor, counted shard by shard (a collective when any is a ``DTensor``)."""
    zeros = counts_over_ranks(weights, lambda _, entries: (entries == 0).sum())
    return dict(zip(weights, zeros.tolist(), strict=True))


@torch.no_grad()
def pruned_per_tensor(masks: Mapping[str, Tensor], weights: Mapping[str, Tensor]) -> dict[str, int]:
    """How many entries of each full weight the (local) keep ``masks`` prune (a collective when any weight is
    a ``DTensor``)."""
    pruned = counts_over_ranks(weights, lambda name, _: (~masks[name]).sum())
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
