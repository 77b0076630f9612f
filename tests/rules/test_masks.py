"""Magnitude masks against a slow, obvious reference: a stable sort of |w|."""

from __future__ import annotations

import pytest
import torch

from lightning_dsd.rules.masks import (
    NMPattern,
    magnitude_masks,
    nm_mask,
    pack_mask,
    smallest_entries,
    unpack_mask,
)


def reference_keep(weight: torch.Tensor, sparsity: float) -> torch.Tensor:
    """Prune the round(s*N) smallest |w|, ties by position: a stable sort says exactly that."""
    flat = weight.abs().flatten()
    order = torch.sort(flat, stable=True).indices
    keep = torch.ones_like(flat, dtype=torch.bool)
    keep[order[: round(sparsity * flat.numel())]] = False
    return keep.view(weight.shape)


@pytest.mark.parametrize("shape", [(7,), (5, 3), (4, 3, 3), (8, 4, 3, 3), (1, 1)])
@pytest.mark.parametrize("sparsity", [0.01, 0.25, 0.3, 0.5, 0.8, 0.99])
def test_layer_masks_match_the_sort_based_reference(shape, sparsity):
    weight = torch.randn(shape, generator=torch.Generator().manual_seed(3))
    keep = magnitude_masks({"w": weight}, {"w": sparsity})["w"]
    assert torch.equal(keep, reference_keep(weight, sparsity))
    assert int((~keep).sum()) == round(sparsity * weight.numel())


def test_ties_are_broken_by_position_whatever_the_tie_count():
    weight = torch.tensor([0.5, -0.5, 0.5, 0.1, -0.5, 2.0, 0.5])  # five entries tie at |0.5|
    keep = magnitude_masks({"w": weight}, {"w": 0.5})["w"]  # round(3.5) = 4: 0.1, then the first three 0.5s
    assert keep.tolist() == [False, False, False, False, True, True, True]


def test_quantized_weights_with_massive_ties_still_prune_exactly_k():
    weight = torch.randint(-3, 4, (1000,)).float()
    for sparsity in (0.1, 0.37, 0.5, 0.9):
        keep = magnitude_masks({"w": weight}, {"w": sparsity})["w"]
        assert torch.equal(keep, reference_keep(weight, sparsity))


def test_rounding_is_pythons_round():
    weight = torch.arange(1.0, 11.0)  # N = 10
    assert int((~magnitude_masks({"w": weight}, {"w": 0.25})["w"]).sum()) == round(2.5) == 2
    assert int((~magnitude_masks({"w": weight}, {"w": 0.35})["w"]).sum()) == round(3.5) == 4
    assert int((~magnitude_masks({"w": torch.ones(3)}, {"w": 0.1})["w"]).sum()) == 0


def test_half_precision_weights_give_the_same_masks_as_their_float_values():
    weight = torch.randn(64, 32).to(torch.bfloat16)
    keep = magnitude_masks({"w": weight}, {"w": 0.5})["w"]
    assert torch.equal(keep, reference_keep(weight.float(), 0.5))


def test_masks_over_16m_entries_where_torch_quantile_refuses():
    weight = torch.randn(17_000_000, generator=torch.Generator().manual_seed(1))
    keep = magnitude_masks({"w": weight}, {"w": 0.5})["w"]
    assert int((~keep).sum()) == round(0.5 * weight.numel())
    assert weight.abs()[~keep].max() <= weight.abs()[keep].min()


def test_smallest_entries_edge_cases():
    scores = torch.tensor([3.0, 1.0, 2.0])
    assert smallest_entries(scores, 0).tolist() == [False, False, False]
    assert smallest_entries(scores, 3).tolist() == [True, True, True]
    assert smallest_entries(scores, 1).tolist() == [False, True, False]


@pytest.mark.parametrize("shape", [(1,), (7,), (8,), (9,), (3, 5, 7), (64, 64)])
def test_pack_unpack_roundtrip_at_one_bit_per_entry(shape):
    mask = torch.rand(shape, generator=torch.Generator().manual_seed(2)) > 0.5
    packed = pack_mask(mask)
    assert packed.dtype == torch.uint8 and packed.numel() == -(-mask.numel() // 8)
    assert torch.equal(unpack_mask(packed, shape), mask)


def reference_nm(weight: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """Group by group, with a stable sort: the obvious, slow way."""
    moved = weight.movedim(1, -1).contiguous()
    keep = torch.zeros_like(moved, dtype=torch.bool)
    flat_w, flat_k = moved.reshape(-1, moved.shape[-1]), keep.view(-1, moved.shape[-1])
    for row in range(flat_w.shape[0]):
        for start in range(0, flat_w.shape[1], m):
            group = flat_w[row, start:start + m].abs()
            order = torch.sort(group, stable=True).indices
            flat_k[row, start + order[m - n:]] = True
    return keep.movedim(-1, 1)


NM_CASES = [(shape, n, m) for shape in [(6, 8), (4, 8, 3), (5, 4, 3, 3), (3, 12), (2, 16)]
            for n, m in [(2, 4), (1, 4), (3, 8)] if shape[1] % m == 0]


@pytest.mark.parametrize("shape, n, m", NM_CASES)
def test_nm_masks_match_the_group_by_group_reference(shape, n, m):
    weight = torch.randint(-3, 4, shape).float()  # many ties
    assert torch.equal(nm_mask(weight, NMPattern(n, m)), reference_nm(weight, n, m))
