"""The sharding module's functions on plain tensors (one process: no collective) and on DTensors over a
one-process gloo group; the multi-process runs are in test_sharded_training.py."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
from helpers import sorted_global_keep
from torch import nn
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor import DTensor, Partial, Replicate, Shard, distribute_tensor

from lightning_dsd.rules.masks import NMPattern
from lightning_dsd.rules.plan import MaskPlan, global_masks
from lightning_dsd.rules.sharding import (
    FullMasks,
    check_placements,
    count_zeros,
    counts_once,
    full_mask,
    local_slice,
    pruned_per_tensor,
    refuse_flat_shards,
)


def _random_weights(generator: torch.Generator) -> dict[str, torch.Tensor]:
    weights = {}
    for i in range(int(torch.randint(1, 4, (1,), generator=generator))):
        shape = tuple(torch.randint(1, 7, (2,), generator=generator).tolist())
        weights[f"w{i}"] = torch.randint(-3, 4, shape, generator=generator).float() / 2  # many ties, zeros
    return weights


@pytest.mark.parametrize("seed", range(40))
def test_the_bisected_global_threshold_prunes_exactly_what_a_sort_prunes(seed):
    generator = torch.Generator().manual_seed(seed)
    weights = _random_weights(generator)
    sparsity = float(torch.rand(1, generator=generator))
    expected = sorted_global_keep(weights, sparsity)
    masks = global_masks(weights, sparsity)
    assert all(torch.equal(masks[name], expected[name]) for name in weights)


@pytest.mark.parametrize("sparsity", [0.0, 1e-9, 0.999999, 1.0])
def test_global_masks_at_the_edges_keep_or_prune_everything_as_round_says(sparsity):
    weights = {"a": torch.randn(3, 4), "b": torch.randn(5)}
    masks = global_masks(weights, sparsity)
    assert sum(int((~m).sum()) for m in masks.values()) == round(sparsity * 17)


def test_layer_scope_and_nm_decisions_are_the_plans_own_on_plain_tensors():
    weights = {"fc.weight": torch.randn(4, 8), "conv.weight": torch.randn(6, 4, 3)}
    plan = MaskPlan((0.3,), layer_sparsity={"fc.*": NMPattern(2, 4)}, input_dims={"fc.weight": 1})
    masks = plan.decide(weights, cycle=0)
    expected = {"fc.weight": plan.decide({"fc.weight": weights["fc.weight"]}, 0)["fc.weight"],
                "conv.weight": sorted_global_keep({"conv.weight": weights["conv.weight"]}, 0.3)["conv.weight"]}
    assert all(torch.equal(masks[n], expected[n]) for n in weights)
    assert pruned_per_tensor(masks, weights) == {"fc.weight": 32 // 2, "conv.weight": round(0.3 * 72)}


def test_counts_and_full_masks_of_plain_tensors_need_no_process_group():
    weights = {"w": torch.tensor([0.0, 1.0, 0.0]), "v": torch.ones(2, 2)}
    assert count_zeros(weights) == {"w": 2, "v": 0}
    assert counts_once(weights["w"])
    keep = {"w": torch.tensor([False, True, False]), "v": torch.ones(2, 2, dtype=torch.bool)}
    assert all(torch.equal(FullMasks(keep, weights)[n], keep[n]) for n in weights)
    assert local_slice(keep["w"], weights["w"]) is keep["w"]


@pytest.fixture
def one_process_mesh(tmp_path):
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        yield init_device_mesh("cpu", (1,))
    finally:
        dist.destroy_process_group()


def test_dtensor_shards_are_sliced_gathered_and_counted_like_the_full_tensor(one_process_mesh):
    full = torch.tensor([[0.0, 2.0], [-1.0, 0.0], [3.0, 0.5]])
    sharded = distribute_tensor(full, one_process_mesh, [Shard(0)])
    replicated = distribute_tensor(full, one_process_mesh, [Replicate()])
    keep = full != 0
    assert torch.equal(local_slice(keep, sharded), keep)
    assert torch.equal(full_mask(keep, sharded), keep)
    assert count_zeros({"s": sharded, "r": replicated}) == {"s": 2, "r": 2}
    assert counts_once(sharded) and counts_once(replicated)
    masks = MaskPlan((0.5,), scope="global").decide({"s": sharded, "r": replicated}, cycle=0)
    expected = sorted_global_keep({"s": full, "r": full}, 0.5)
    assert torch.equal(masks["s"], expected["s"]) and torch.equal(masks["r"], expected["r"])


def test_a_partial_placement_is_refused_naming_the_parameter(one_process_mesh):
    pending = DTensor.from_local(torch.ones(2, 2), one_process_mesh, [Partial()])
    with pytest.raises(ValueError, match=r"`head.weight` has placements \(Partial\(sum\),\).*`exclude` it"):
        check_placements({"head.weight": pending})


def test_the_global_threshold_sends_one_stacked_count_per_bisection_round_whatever_the_number_of_targets(
    one_process_mesh, monkeypatch
):
    generator = torch.Generator().manual_seed(0)
    full = {f"layer{i}.weight": torch.randn(3, 5, generator=generator) for i in range(64)}
    sharded = {name: distribute_tensor(w, one_process_mesh, [Shard(0)]) for name, w in full.items()}
    sent = []
    all_reduce = dist.all_reduce

    def counting_all_reduce(tensor, *args, **kwargs):
        sent.append(tensor.shape)
        return all_reduce(tensor, *args, **kwargs)

    monkeypatch.setattr(dist, "all_reduce", counting_all_reduce)
    to_python = []  # each read of a count into Python is a host sync on a GPU
    monkeypatch.setattr(torch.Tensor, "__int__", lambda t: to_python.append(1) or t.item())
    masks = global_masks(sharded, 0.3)
    expected = sorted_global_keep(full, 0.3)
    assert all(torch.equal(masks[name], expected[name]) for name in full)
    # 31 bisection rounds over the float32 bit patterns, then the count below the threshold and the ties.
    assert sent == [torch.Size([64])] * 33, "one all-reduce of all 64 counts per round, not one per target"
    assert len(to_python) <= 34, "about one read of the summed count per round, not one per target per round"


def test_models_sharded_into_flat_parameters_are_refused_naming_fully_shard():
    class DeepSpeedEngine(nn.Module):  # what deepspeed.initialize returns, matched by its class name
        def __init__(self) -> None:
            super().__init__()
            self.module = nn.Linear(4, 4)

    with pytest.raises(ValueError, match=r"found DeepSpeedEngine at `the model`.*`fully_shard`"):
        refuse_flat_shards(DeepSpeedEngine())
    flattened = nn.Linear(4, 4)
    flattened.weight._fsdp_flattened = True  # how FSDP1 marks the parameters it manages (use_orig_params=True)
    with pytest.raises(ValueError, match=r"found an FSDP1-flattened parameter at `weight`"):
        refuse_flat_shards(flattened)
