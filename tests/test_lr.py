"""At re-dense every learning rate becomes lr_scale x what it would have been, and no scheduler undoes it."""

from __future__ import annotations

import math

import lightning.pytorch as pl
import pytest
import torch
from helpers import ConvLSTMNet, make_loader, make_trainer
from torch.optim import lr_scheduler as S

from lightning_dsd import DSDCallback, Phase
from lightning_dsd.lr import scale_learning_rates

SCHEDULERS = {
    "StepLR": lambda o: S.StepLR(o, step_size=3, gamma=0.5),
    "MultiStepLR": lambda o: S.MultiStepLR(o, milestones=[5, 12], gamma=0.3),
    "ExponentialLR": lambda o: S.ExponentialLR(o, gamma=0.9),
    "CosineAnnealingLR": lambda o: S.CosineAnnealingLR(o, T_max=10, eta_min=0.01),
    "CosineAnnealingWarmRestarts": lambda o: S.CosineAnnealingWarmRestarts(o, T_0=4, eta_min=0.005),
    "ReduceLROnPlateau": lambda o: S.ReduceLROnPlateau(o, factor=0.5, patience=1, min_lr=0.004),
    "OneCycleLR": lambda o: S.OneCycleLR(o, max_lr=[1.0, 0.5], total_steps=30),
    "CyclicLR": lambda o: S.CyclicLR(o, base_lr=0.01, max_lr=0.2, step_size_up=3, cycle_momentum=False),
    "LinearLR": lambda o: S.LinearLR(o, start_factor=0.2, total_iters=8),
    "PolynomialLR": lambda o: S.PolynomialLR(o, total_iters=25, power=2.0),
    "LambdaLR": lambda o: S.LambdaLR(o, lambda step: 1 / (1 + step)),
    "MultiplicativeLR": lambda o: S.MultiplicativeLR(o, lambda step: 0.95),
    "ConstantLR": lambda o: S.ConstantLR(o, factor=0.5, total_iters=12),
    "SequentialLR": lambda o: S.SequentialLR(
        o, [S.LinearLR(o, start_factor=0.1, total_iters=4), S.CosineAnnealingLR(o, T_max=20, eta_min=0.01)], [4]
    ),
    "ChainedScheduler": lambda o: S.ChainedScheduler([S.ExponentialLR(o, 0.95), S.StepLR(o, 4, 0.5)]),
}


def _optimizer() -> torch.optim.Optimizer:
    params = [torch.nn.Parameter(torch.zeros(2)), torch.nn.Parameter(torch.zeros(2))]
    return torch.optim.SGD([{"params": params[:1], "lr": 0.1}, {"params": params[1:], "lr": 0.05}], momentum=0.9)


def _step(optimizer, scheduler, t: int) -> None:
    optimizer.step()
    if isinstance(scheduler, S.ReduceLROnPlateau):
        scheduler.step(1.0 if t % 5 else 0.5)  # plateaus, with an occasional improvement
    else:
        scheduler.step()


@pytest.mark.parametrize("make_scheduler", SCHEDULERS.values(), ids=SCHEDULERS.keys())
def test_every_later_lr_is_exactly_the_factor_times_the_unscaled_schedule(make_scheduler):
    reference_optimizer, scaled_optimizer = _optimizer(), _optimizer()
    reference, scaled = make_scheduler(reference_optimizer), make_scheduler(scaled_optimizer)
    for t in range(30):
        if t == 7:
            scale_learning_rates([scaled_optimizer], [scaled], 0.1)
        if t >= 7:
            for ref_group, group in zip(reference_optimizer.param_groups, scaled_optimizer.param_groups, strict=False):
                assert group["lr"] == pytest.approx(0.1 * ref_group["lr"], rel=1e-9, abs=1e-15), f"step {t}"
        _step(reference_optimizer, reference, t)
        _step(scaled_optimizer, scaled, t)


def test_tensor_learning_rates_are_scaled_in_place():
    param = torch.nn.Parameter(torch.zeros(2))
    optimizer = torch.optim.Adam([param], lr=torch.tensor(0.01))
    lr = optimizer.param_groups[0]["lr"]
    scale_learning_rates([optimizer], [], 0.1)
    assert optimizer.param_groups[0]["lr"] is lr and math.isclose(float(lr), 0.001, rel_tol=1e-6)


@pytest.mark.parametrize(
    "make_scheduler, interval",
    [
        (lambda o: S.StepLR(o, step_size=2, gamma=0.5), "epoch"),
        (lambda o: S.OneCycleLR(o, max_lr=0.5, total_steps=24), "step"),
        (lambda o: S.CosineAnnealingLR(o, T_max=24, eta_min=0.02), "step"),
    ],
    ids=["StepLR-epoch", "OneCycleLR-step", "CosineAnnealingLR-step"],
)
def test_in_a_trainer_the_redense_lr_is_a_tenth_of_the_plain_runs(make_scheduler, interval):
    def run(callbacks):
        lrs = []

        class Record(pl.Callback):
            def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
                lrs.append(trainer.optimizers[0].param_groups[0]["lr"])

        model = ConvLSTMNet(scheduler=make_scheduler, scheduler_interval=interval)
        make_trainer([*callbacks, Record()], max_epochs=6).fit(model, make_loader())
        return lrs

    plain = run([])
    dsd = DSDCallback(0.5, dense_epochs=2, sparse_epochs=2, redense_epochs=2)
    with_dsd = run([dsd])
    assert dsd.phase is Phase.REDENSE
    assert with_dsd[:16] == plain[:16]
    assert with_dsd[16:] == pytest.approx([0.1 * lr for lr in plain[16:]], rel=1e-9)
