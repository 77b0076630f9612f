"""DSD in a Hugging Face Accelerate loop (``accelerator.prepare``), through the ``DSD`` door: the optimizer and
scheduler accelerate hands back are wrappers (``AcceleratedOptimizer``, ``AcceleratedScheduler``); DSD acts on
the torch objects behind them. Real accelerate, one CPU process, with gradient accumulation."""

from __future__ import annotations

import pytest
import torch
from helpers import ConvLSTMNet, make_loader, seeded
from torch import nn

from lightning_dsd import DSD, Phase

accelerate = pytest.importorskip("accelerate")


def _accelerate_run(with_dsd: bool) -> tuple[list[float], list[tuple[str, bool, bool]], nn.Module]:
    """4 epochs of 4 batches, accumulated by 2 (2 optimizer steps an epoch), under a LambdaLR, which recomputes
    each rate from its ``base_lrs``; dense 1, sparse 1, re-dense 2. Returns each step's learning rate and, for
    every forward, (phase, training?, pruned weights all zero in the weights the forward reads)."""
    with seeded():
        model = ConvLSTMNet()
    accelerator = accelerate.Accelerator(cpu=True, gradient_accumulation_steps=2)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0 / (1 + step))
    model, optimizer, loader, scheduler = accelerator.prepare(model, optimizer, make_loader(), scheduler)
    dsd = DSD(model, optimizer, 0.5, 1, 1, 2, schedulers=[scheduler], log_histograms=False) if with_dsd else None
    forwards: list[tuple[str, bool, bool]] = []

    def check(module, args):
        if dsd is not None:
            params = dict(model.named_parameters())
            zeros = all(bool((params[n][~keep] == 0).all()) for n, keep in dsd.masks.items())
            forwards.append((dsd.phase.value, module.training, zeros and (dsd.phase is not Phase.SPARSE or
                                                                          bool(dsd.masks))))

    for module in (model.conv, model.lstm, model.head):
        module.register_forward_pre_hook(check)
    rates = []
    for _ in range(4):
        model.train()
        for x, y in loader:
            with accelerator.accumulate(model):
                accelerator.backward(nn.functional.cross_entropy(model(x), y))
                optimizer.step()
                scheduler.step()
                optimizer.zero_grad()
            if accelerator.sync_gradients:
                rates.append(optimizer.param_groups[0]["lr"])
        model.eval()
        with torch.no_grad():
            model(next(iter(loader))[0])  # an evaluation forward between epochs
        if dsd is not None:
            dsd.step()
    return rates, forwards, model


def test_an_accelerate_loop_keeps_the_zeros_in_every_forward_and_the_redense_rate_through_its_scheduler_wrapper():
    rates, forwards, _ = _accelerate_run(with_dsd=True)
    twin, _, _ = _accelerate_run(with_dsd=False)
    assert len(rates) == len(twin) == 8  # 2 optimizer steps an epoch
    ratios = [rate / plain for rate, plain in zip(rates, twin, strict=True)]
    assert ratios[:4] == pytest.approx([1.0] * 4, rel=1e-12) and ratios[4:] == pytest.approx([0.1] * 4, rel=1e-12)
    sparse = [f for f in forwards if f[0] == "sparse"]
    assert {training for _, training, _ in sparse} == {True, False} and all(zeros for _, _, zeros in sparse)
