"""Magnitude (and score) masks: which entries to prune, and how to store that compactly.

A mask is a bool tensor of the weight's shape, ``True`` where the weight is kept. In each tensor of ``N``
entries exactly ``k = round(sparsity * N)`` entries with the smallest ``|w|`` are pruned (Python's
``round``, so halves go to the even neighbour); :func:`score_masks` does the same with the lowest scores of
another criterion (see :mod:`lightning_dsd.rules.importance`). Ties at the threshold are broken by position: the entry
that comes first in the flattened tensor is pruned first, so the result never depends on the backend.
The threshold is found with ``torch.kthvalue`` (linear time, no size limit, unlike ``torch.quantile``).

Examples:
    >>> import torch
    >>> w = torch.tensor([[0.3, -0.1], [0.1, 2.0]])
    >>> magnitude_masks({"w": w}, {"w": 0.5})["w"]
    tensor([[ True, False],
            [False,  True]])
    >>> magnitude_masks({"w": w}, {"w": 0.25})["w"]  # |-0.1| and |0.1| tie: the first one goes
    tensor([[ True, False],
            [ True,  True]])
    >>> unpack_mask(pack_mask(torch.tensor([True, False, True])), (3,))
    tensor([ True, False,  True])
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping, Optional, Sequence, Union

import torch
from torch import Tensor

_BIT_VALUES = torch.tensor([128, 64, 32, 16, 8, 4, 2, 1], dtype=torch.uint8)


@dataclass(frozen=True)
class NMPattern:
    """Structured N:M sparsity: in every group of ``m`` consecutive weights along the input dimension,
    the ``n`` largest in magnitude are kept (``2:4`` is the pattern sparse tensor cores accelerate).

    Examples:
        >>> NMPattern.parse("2:4"), str(NMPattern(1, 8))
        (NMPattern(n=2, m=4), '1:8')
    """

    n: int
    m: int

    @classmethod
    def parse(cls, text: str) -> "NMPattern":
        n, sep, m = text.partition(":")
        if not (sep and n.strip().isdigit() and m.strip().isdigit() and 0 < int(n) < int(m)):
            raise ValueError(f"an N:M pattern needs integers 0 < N < M, as in '2:4'. Found: {text!r}.")
        return cls(int(n), int(m))

    def __str__(self) -> str:
        return f"{self.n}:{self.m}"


Sparsity = Union[float, NMPattern]


def nm_mask(weight: Tensor, pattern: NMPattern, input_dim: int = 1) -> Tensor:
    """Keep the ``n`` largest |w| of every ``m`` consecutive entries along ``input_dim``.

    Ties are broken by position (the earlier entry is pruned first). The input size must divide by ``m``
    (see :func:`check_pattern_fits`).

    Examples:
        >>> nm_mask(torch.tensor([[0.1, -0.9, 0.3, 0.2, 5.0, 4.0, -3.0, 0.0]]), NMPattern(2, 4))
        tensor([[False,  True,  True, False,  True,  True, False, False]])
        >>> nm_mask(torch.tensor([[0.1], [-0.9], [0.3], [0.2]]), NMPattern(2, 4), input_dim=0).flatten()
        tensor([False,  True,  True, False])
    """
    return nm_score_mask(weight.detach().abs(), pattern, input_dim)


def nm_score_mask(scores: Tensor, pattern: NMPattern, input_dim: int = 1) -> Tensor:
    """Keep the ``n`` highest ``scores`` of every ``m`` consecutive entries along ``input_dim`` (ties broken by
    position, as :func:`nm_mask`, which is this with ``|w|`` as the scores).

    Examples:
        >>> nm_score_mask(torch.tensor([[-5.0, 0.1, 0.3, 0.2]]), NMPattern(2, 4))  # -5 is the lowest score
        tensor([[False, False,  True,  True]])
    """
    moved = scores.detach().movedim(input_dim, -1)
    if moved.shape[-1] % pattern.m:
        raise ValueError(f"input size {moved.shape[-1]} does not divide by {pattern.m}")
    groups = moved.float().reshape(-1, pattern.m)
    order = torch.sort(groups, dim=1, stable=True).indices
    keep = torch.ones_like(groups, dtype=torch.bool)
    keep.scatter_(1, order[:, : pattern.m - pattern.n], False)
    return keep.reshape(moved.shape).movedim(-1, input_dim)


def check_pattern_fits(name: str, shape: Sequence[int], pattern: NMPattern, input_dim: int) -> None:
    """Refuse an N:M ``pattern`` for a weight whose input size (``shape[input_dim]``) does not divide by M.

    Examples:
        >>> check_pattern_fits("fc.weight", (4, 6), NMPattern(2, 4), input_dim=1)  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ...
        ValueError: ... but `fc.weight` has shape (4, 6): input size 6 does not divide by 4. ...
    """
    if shape[input_dim] % pattern.m:
        raise ValueError(
            f"`sparsity='{pattern}'` groups {pattern.m} consecutive weights along the input dimension"
            f" (dim {input_dim}), but `{name}` has shape {tuple(shape)}: input size {shape[input_dim]} does not"
            f" divide by {pattern.m}. `exclude` it or give it a float in `layer_sparsity`."
        )


def pruned_count(numel: int, sparsity: float) -> int:
    """How many of ``numel`` entries a ``sparsity`` prunes: ``round(sparsity * numel)``."""
    return round(sparsity * numel)


def smallest_entries(scores: Tensor, k: int) -> Tensor:
    """Bool tensor marking the ``k`` smallest entries of the 1-D ``scores``, ties broken by position."""
    n = scores.numel()
    if k <= 0:
        return torch.zeros(n, dtype=torch.bool, device=scores.device)
    if k >= n:
        return torch.ones(n, dtype=torch.bool, device=scores.device)
    threshold = scores.kthvalue(k).values
    chosen = scores < threshold
    missing = k - int(chosen.sum())
    tied = torch.nonzero(scores == threshold).flatten()[:missing]
    chosen[tied] = True
    return chosen


def magnitude_masks(
    weights: Mapping[str, Tensor],
    sparsities: Mapping[str, Sparsity],
    input_dims: Optional[Mapping[str, int]] = None,
) -> dict[str, Tensor]:
    """Per-tensor ("layer") masks: each tensor loses its own ``round(sparsity * N)`` smallest entries, or
    follows its :class:`NMPattern` along its input dimension (``input_dims``, dim 1 where not given)."""
    with torch.no_grad():
        return {name: _lowest_pruned(weight.detach().abs(), sparsities[name], (input_dims or {}).get(name, 1))
                for name, weight in weights.items()}


def score_masks(
    scores: Mapping[str, Tensor],
    sparsities: Mapping[str, Sparsity],
    input_dims: Optional[Mapping[str, int]] = None,
) -> dict[str, Tensor]:
    """:func:`magnitude_masks` ranked by ``scores`` (one tensor of each weight's shape, any sign) instead of ``|w|``:
    the ``round(sparsity * N)`` lowest scores of each tensor are pruned, or the ``M - N`` lowest of every N:M group.

    Examples:
        >>> score_masks({"w": torch.tensor([[3.0, -1.0], [0.0, 2.0]])}, {"w": 0.5})["w"]
        tensor([[ True, False],
                [False,  True]])
    """
    with torch.no_grad():
        return {name: _lowest_pruned(score.detach(), sparsities[name], (input_dims or {}).get(name, 1))
                for name, score in scores.items()}


def _lowest_pruned(scores: Tensor, sparsity: Sparsity, input_dim: int) -> Tensor:
    """The keep mask of one tensor that prunes its lowest ``scores`` (``round(sparsity * N)``, or per N:M group)."""
    if isinstance(sparsity, NMPattern):
        return nm_score_mask(scores, sparsity, input_dim)
    flat = scores.flatten().float()
    return smallest_entries(flat, pruned_count(flat.numel(), sparsity)).logical_not_().view(scores.shape)


def disconnected_units(keep: Tensor, input_dim: int = 1) -> tuple[int, int]:
    """How many output units of a weight lost every input connection under the keep mask, out of how many.

    An output unit is a slice along the output dimension (dim 0, or dim 1 for weights stored ``(in, out)``,
    whose ``input_dim`` is 0); it is cut off when none of its entries is kept. Tensors of fewer than two
    dimensions have no such units.

    Examples:
        >>> disconnected_units(torch.tensor([[True, False], [False, False], [False, True]]))
        (1, 3)
        >>> disconnected_units(torch.tensor([[True, False], [False, False], [False, True]]), input_dim=0)
        (0, 2)
    """
    if keep.dim() < 2:
        return 0, 0
    output_dim = 1 if input_dim == 0 else 0
    kept_per_unit = keep.movedim(output_dim, 0).reshape(keep.shape[output_dim], -1).any(dim=1)
    return int((~kept_per_unit).sum()), keep.shape[output_dim]


def pack_mask(mask: Tensor) -> Tensor:
    """Pack a bool mask into a flat ``uint8`` tensor, 8 entries per byte (on the CPU, for checkpoints)."""
    flat = mask.detach().flatten().to(device="cpu", dtype=torch.uint8)
    flat = torch.nn.functional.pad(flat, (0, (-flat.numel()) % 8)).view(-1, 8)
    return (flat * _BIT_VALUES).sum(dim=1, dtype=torch.uint8)


def unpack_mask(packed: Tensor, shape: Sequence[int]) -> Tensor:
    """Invert :func:`pack_mask`: a bool tensor of ``shape`` on the CPU."""
    numel = int(torch.Size(shape).numel())
    bits = packed.to("cpu").unsqueeze(1).bitwise_and(_BIT_VALUES).ne(0).flatten()
    return bits[:numel].view(*shape)
