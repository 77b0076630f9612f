"""``SparseConstraint`` on its own, with raw torch optimizers: what attaching zeroes, what each step keeps,
what detaching leaves behind."""

from __future__ import annotations

import pytest
import torch

from lightning_dsd.rules.constraint import SparseConstraint, keeps_pruned_zeros


def _setup(storage: str, optimizer_class=torch.optim.Adam):
    torch.manual_seed(0)
    weight = torch.nn.Parameter(torch.randn(4, 6))
    keep = torch.rand(4, 6) > 0.5
    optimizer = optimizer_class([weight], lr=0.1)
    weight.grad = torch.randn(4, 6)
    optimizer.step()  # some optimizer state to zero
    return weight, keep, optimizer


@pytest.mark.parametrize("storage, dtype", [("weight_dtype", torch.float32), ("bool", torch.bool)])
def test_attach_zeroes_weights_gradients_and_state_of_pruned_entries_and_masks_keep_one_polarity(storage, dtype):
    weight, keep, optimizer = _setup(storage)
    weight.grad = torch.ones(4, 6)
    constraint = SparseConstraint({"w": weight}, {"w": keep}, storage)
    constraint.attach([optimizer])
    assert constraint.masks[0].dtype == dtype
    assert torch.equal(constraint.keep_masks()["w"], keep)  # True = kept, in both storages
    assert (weight[~keep] == 0).all() and (weight.grad[~keep] == 0).all()
    for key in ("exp_avg", "exp_avg_sq"):
        assert (optimizer.state[weight][key][~keep] == 0).all()
    constraint.detach()


class _Drifting(torch.optim.SGD):
    """A subclass: not trusted to preserve zeros, so it gets the post-step re-mask."""

    @torch.no_grad()
    def step(self, closure=None):
        super().step(closure)
        for group in self.param_groups:
            for p in group["params"]:
                p.add_(1.0)


@pytest.mark.parametrize("storage", ["weight_dtype", "bool"])
@pytest.mark.parametrize("optimizer_class", [torch.optim.Adam, _Drifting], ids=["adam", "drifting-subclass"])
def test_a_plain_loop_keeps_pruned_entries_zero_after_every_step_until_detached(storage, optimizer_class):
    weight, keep, optimizer = _setup(storage, optimizer_class)
    constraint = SparseConstraint({"w": weight}, {"w": keep}, storage)
    constraint.attach([optimizer])
    assert keeps_pruned_zeros(optimizer) is (optimizer_class is torch.optim.Adam)
    for _ in range(3):
        optimizer.zero_grad()
        (weight * torch.randn(4, 6)).sum().backward()
        optimizer.step()
        assert (weight[~keep] == 0).all()
    constraint.zero_optimizer_state([optimizer])
    constraint.detach()
    optimizer.zero_grad()
    (weight * torch.randn(4, 6)).sum().backward()
    optimizer.step()
    assert (weight[~keep] != 0).all(), "no hook may stay behind after detach"
