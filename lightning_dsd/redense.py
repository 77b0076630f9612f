"""How pruned weights restart at re-dense.

``"zero"`` is the paper's choice: the pruned weights are already exactly zero, nothing to do.
``"small_normal"`` follows the authors' suggestion to try other restarts: each pruned weight gets
``N(0, (0.1 * std)^2)`` noise, ``std`` being the standard deviation of the layer's surviving weights, drawn
on the CPU from a generator seeded with ``seed`` (so every DDP rank draws the same values). A sharded
parameter (``DTensor``) is gathered whole, one at a time, so its restart is the same full tensor on any mesh;
each rank then keeps its shard's part.

Examples:
    >>> import torch
    >>> w = torch.nn.Parameter(torch.tensor([2.0, 0.0, -2.0, 0.0]))
    >>> keep = {"w": torch.tensor([True, False, True, False])}
    >>> reinitialize_pruned({"w": w}, keep, "small_normal", seed=0)
    >>> bool((w[~keep["w"]] != 0).all()), bool((w[~keep["w"]].abs() < 1.5).all()), w[0].item()
    (True, True, 2.0)
"""

from __future__ import annotations

from typing import Mapping

import torch
from torch import Tensor

from lightning_dsd.sharding import full_mask, full_tensor, local_part, local_slice

REDENSE_INITS = ("zero", "small_normal")
SMALL_NORMAL_SCALE = 0.1


@torch.no_grad()
def reinitialize_pruned(params: Mapping[str, Tensor], keep: Mapping[str, Tensor], mode: str, seed: int) -> None:
    """Give the pruned entries (``~keep``) of each parameter their re-dense starting values, in place."""
    if mode == "zero":
        return
    generator = torch.Generator().manual_seed(seed)
    for name, mask in keep.items():
        param = params[name]
        weight = full_tensor(param)
        kept = full_mask(mask, param).to(weight.device)
        survivors = weight[kept].float()
        std = float(survivors.std()) if survivors.numel() > 1 else 0.0
        noise = torch.randn(param.shape, generator=generator) * (SMALL_NORMAL_SCALE * std)
        restarted = torch.where(kept, weight, noise.to(device=weight.device, dtype=weight.dtype))
        local_part(param).copy_(local_slice(restarted, param))
