"""The whole of DSD, written out by hand in a plain torch loop, against ``DSDCallback`` in a real ``Trainer``:
the same data, the same initialisation, and at the end the same weights, bit for bit."""

from __future__ import annotations

import torch
from helpers import TARGETS, ConvLSTMNet, make_loader, make_trainer, seeded
from torch import nn

from lightning_dsd import DSDCallback

DENSE, SPARSE, REDENSE, SPARSITY, LR = 2, 2, 2, 0.5, 0.1


def _stable_sort_keep(weight: torch.Tensor, sparsity: float) -> torch.Tensor:
    """The paper's pruning, the obvious way: the round(s*N) smallest |w| go, earlier entries first on ties."""
    order = torch.sort(weight.detach().abs().flatten(), stable=True).indices
    keep = torch.ones(weight.numel(), dtype=torch.bool)
    keep[order[: round(sparsity * weight.numel())]] = False
    return keep.view(weight.shape)


def _dsd_by_hand(model: ConvLSTMNet) -> None:
    optimizer = torch.optim.SGD(model.parameters(), lr=LR, momentum=0.9)
    params = dict(model.named_parameters())
    keep: dict[str, torch.Tensor] = {}
    for epoch in range(DENSE + SPARSE + REDENSE):
        if epoch == DENSE:  # dense -> sparse: prune, and zero what the optimizer remembers of pruned entries
            keep = {name: _stable_sort_keep(params[name], SPARSITY) for name in TARGETS}
            with torch.no_grad():
                for name, mask in keep.items():
                    params[name][~mask] = 0
                    optimizer.state[params[name]]["momentum_buffer"][~mask] = 0
        if epoch == DENSE + SPARSE:  # sparse -> re-dense: lift the constraint, a tenth of the learning rate
            keep = {}
            for group in optimizer.param_groups:
                group["lr"] *= 0.1
        model.train()
        for x, y in make_loader():
            optimizer.zero_grad(set_to_none=True)
            nn.functional.cross_entropy(model(x), y).backward()
            for name, mask in keep.items():
                params[name].grad[~mask] = 0
            optimizer.step()
            with torch.no_grad():
                for name, mask in keep.items():
                    params[name][~mask] = 0


def test_a_trainer_with_dsdcallback_matches_dsd_written_by_hand_bit_for_bit():
    with seeded(3):
        by_hand = ConvLSTMNet()
    with seeded(3):
        with_callback = ConvLSTMNet()
    assert all(torch.equal(a, b) for a, b in zip(by_hand.state_dict().values(), with_callback.state_dict().values(),
                                                 strict=True))

    _dsd_by_hand(by_hand)
    dsd = DSDCallback(SPARSITY, DENSE, SPARSE, REDENSE)
    make_trainer([dsd], max_epochs=DENSE + SPARSE + REDENSE).fit(with_callback, make_loader())

    for (name, expected), actual in zip(by_hand.state_dict().items(), with_callback.state_dict().values(),
                                        strict=True):
        assert torch.equal(expected, actual), name
    assert dsd.target_names == TARGETS
