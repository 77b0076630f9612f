"""How pruned weights restart at re-dense.

``"zero"`` is the paper's choice: the pruned weights are already exactly zero, nothing to do.
``"small_normal"`` follows the authors' suggestion to try other restarts: each pruned weight gets
``N(0, (0.1 * std)^2)`` noise, ``std`` being the standard deviation of the layer's surviving weights, drawn
on the CPU from a generator seeded with ``seed`` (so every DDP rank draws the same values). A sharded
parameter (``DTensor``) is gathered whole, one at a time, so its restart is the same full tensor on any mesh;
each rank then keeps its shard's part.

The optimizer state restarts as ``redense_state`` says: ``"pruned"`` (the paper's) zeroes the pruned entries'
state and keeps the rest, kept entries' moments and each tensor's step count included (done by the sparse
constraint as it is lifted); ``"all"`` (AC/DC's, :func:`restart_optimizer_state`) drops the whole state of
every targeted weight, so its optimizer takes it up as a new optimizer would: Adam's moments *and* its step
count restart, and bias correction damps the fresh moments as at a first step (zeroed moments under the old
step count would move every entry by several times ``lr``; see the guide).

Examples:
    >>> import torch
    >>> w = torch.nn.Parameter(torch.tensor([2.0, 0.0, -2.0, 0.0]))
    >>> keep = {"w": torch.tensor([True, False, True, False])}
    >>> reinitialize_pruned({"w": w}, keep, "small_normal", seed=0)
    >>> bool((w[~keep["w"]] != 0).all()), bool((w[~keep["w"]].abs() < 1.5).all()), w[0].item()
    (True, True, 2.0)
"""

from __future__ import annotations

from typing import Iterable, Mapping

import torch
from torch import Tensor
from torch.optim import Optimizer

from lightning_dsd.rules.sharding import full_mask, full_tensor, local_part, local_slice

REDENSE_INITS = ("zero", "small_normal")
REDENSE_STATES = ("pruned", "all")
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


def restart_optimizer_state(optimizers: Iterable[Optimizer], params: Iterable[Tensor]) -> int:
    """Drop the optimizer state of ``params`` (``redense_state="all"``): each optimizer builds it afresh at its
    next step, as for a parameter it has never updated. Return how many parameters' state was dropped.

    Examples:
        >>> w = torch.nn.Parameter(torch.ones(3))
        >>> adam = torch.optim.Adam([w], lr=0.1)
        >>> w.grad = torch.ones(3); adam.step()
        >>> restart_optimizer_state([adam], [w]), dict(adam.state[w])
        (1, {})
    """
    wanted = {id(p) for p in params}
    dropped = 0
    for optimizer in optimizers:
        for param in [p for p in optimizer.state if id(p) in wanted]:
            del optimizer.state[param]
            dropped += 1
    return dropped
