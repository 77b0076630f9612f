"""At re-dense every learning rate becomes lr_scale x what it would have been, and no scheduler undoes it."""

from __future__ import annotations

import math
import warnings

import lightning.pytorch as pl
import pytest
import torch
from helpers import ConvLSTMNet, make_loader, make_trainer, seeded, timm_schedulers
from torch import nn
from torch.optim import lr_scheduler as S

from lightning_dsd import DSD, DSDCallback, Phase
from lightning_dsd.rules.lr import scale_learning_rates

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


# ---------------------------------------------------------------------------------------------- timm's schedulers

TIMM = timm_schedulers()
TIMM_SCHEDULERS = {  # each with the warm-up, minimum and cycle options that carry a learning rate of their own
    "cosine": lambda o, e: TIMM.CosineLRScheduler(o, t_initial=12, lr_min=0.002, warmup_t=3, warmup_lr_init=0.001,
                                                  cycle_limit=2, cycle_decay=0.5, t_in_epochs=e),
    "step": lambda o, e: TIMM.StepLRScheduler(o, decay_t=4, decay_rate=0.5, warmup_t=2, warmup_lr_init=0.004,
                                              t_in_epochs=e),
    "multistep": lambda o, e: TIMM.MultiStepLRScheduler(o, decay_t=[6, 11], decay_rate=0.3, warmup_t=2,
                                                        warmup_lr_init=0.01, t_in_epochs=e),
    "poly": lambda o, e: TIMM.PolyLRScheduler(o, t_initial=20, power=2.0, lr_min=0.001, warmup_t=2, t_in_epochs=e),
    "tanh": lambda o, e: TIMM.TanhLRScheduler(o, t_initial=20, lr_min=0.001, warmup_t=3, warmup_lr_init=0.002,
                                              t_in_epochs=e),
    "wsd": lambda o, e: TIMM.WSDLRScheduler(o, t_initial=20, decay_t=8, lr_min=0.001, stable_fn="rsqrt",
                                            warmup_t=3, warmup_lr_init=0.001, t_in_epochs=e),
    "cosine-noise": lambda o, e: TIMM.CosineLRScheduler(o, t_initial=20, lr_min=0.002, noise_range_t=(5, 25),
                                                        t_in_epochs=e),
}


def _timm_optimizer() -> torch.optim.Optimizer:
    """Two groups, the second with timm's layer-decay factor ``lr_scale``, which timm multiplies in itself."""
    params = [torch.nn.Parameter(torch.zeros(2)), torch.nn.Parameter(torch.zeros(2))]
    return torch.optim.AdamW([{"params": params[:1], "lr": 0.1}, {"params": params[1:], "lr": 0.1, "lr_scale": 0.5}])


@pytest.mark.parametrize("per_update", [False, True], ids=["step(epoch)", "step_update(num_updates)"])
@pytest.mark.parametrize("make_scheduler", TIMM_SCHEDULERS.values(), ids=TIMM_SCHEDULERS.keys())
def test_timm_schedulers_keep_every_later_lr_at_the_factor_times_the_unscaled_schedule(make_scheduler, per_update):
    reference_optimizer, scaled_optimizer = _timm_optimizer(), _timm_optimizer()
    reference = make_scheduler(reference_optimizer, not per_update)
    scaled = make_scheduler(scaled_optimizer, not per_update)
    for t in range(1, 30):
        if t == 5:  # inside the warm-up of most
            scale_learning_rates([scaled_optimizer], [scaled], 0.1)
        if t >= 5:
            for ref_group, group in zip(reference_optimizer.param_groups, scaled_optimizer.param_groups, strict=True):
                assert group["lr"] == pytest.approx(0.1 * ref_group["lr"], rel=1e-9, abs=1e-15), f"t={t}"
        for scheduler in (reference, scaled):
            scheduler.step_update(t) if per_update else scheduler.step(t)
    assert scaled_optimizer.param_groups[1]["lr_scale"] == 0.5, "timm's layer-decay factor is not a learning rate"


def test_timms_plateau_scheduler_and_the_reduce_on_plateau_it_wraps_are_scaled():
    reference_optimizer, scaled_optimizer = _timm_optimizer(), _timm_optimizer()
    with pytest.warns(FutureWarning, match="deprecated"):
        make = lambda o: TIMM.PlateauLRScheduler(o, decay_rate=0.5, patience_t=1, warmup_t=2,  # noqa: E731
                                                 warmup_lr_init=0.01, lr_min=0.004, mode="min", noise_range_t=9)
        reference, scaled = make(reference_optimizer), make(scaled_optimizer)
    for epoch in range(1, 25):
        if epoch == 4:
            scale_learning_rates([scaled_optimizer], [scaled], 0.1)
        if epoch >= 4:
            for ref_group, group in zip(reference_optimizer.param_groups, scaled_optimizer.param_groups, strict=True):
                assert group["lr"] == pytest.approx(0.1 * ref_group["lr"], rel=1e-9, abs=1e-15), f"epoch {epoch}"
        loss = 1.0 if epoch % 6 else 0.5  # plateaus, with an occasional improvement; noise from epoch 9 on
        reference.step(epoch, loss)
        scaled.step(epoch, loss)
    assert reference_optimizer.param_groups[0]["lr"] < 0.1 * 0.5, "the plateau decayed the rate"


def test_a_timm_scheduler_of_another_param_group_field_is_left_alone():
    optimizer = _timm_optimizer()
    for group in optimizer.param_groups:
        group["initial_weight_decay"] = 0.05
    schedule = TIMM.StepLRScheduler(optimizer, decay_t=2, decay_rate=0.5)
    schedule.param_group_field = "weight_decay"  # timm's base class schedules any group field
    schedule.base_values = [0.05, 0.05]
    scale_learning_rates([optimizer], [schedule], 0.1)
    assert schedule.base_values == [0.05, 0.05]


def _timm_model(scheduler, per_update: bool) -> ConvLSTMNet:
    """ConvLSTMNet stepping a timm scheduler from ``lr_scheduler_step``, the way Lightning asks for it."""

    class WithTimm(ConvLSTMNet):
        def lr_scheduler_step(self, schedule, metric):
            if per_update:
                schedule.step_update(num_updates=self.global_step)
            else:
                schedule.step(epoch=self.current_epoch + 1)

    return WithTimm(scheduler=scheduler, scheduler_interval="step" if per_update else "epoch")


TRAINER_TIMM_SCHEDULERS = {  # 4 epochs of 4 steps; re-dense from epoch 2 (step 8)
    "cosine-step(epoch)": (lambda o: TIMM.CosineLRScheduler(o, t_initial=4, warmup_t=2, warmup_lr_init=0.01), False),
    "step-step_update": (lambda o: TIMM.StepLRScheduler(o, decay_t=3, decay_rate=0.8, warmup_t=4,
                                                        warmup_lr_init=0.01, t_in_epochs=False), True),
}


@pytest.mark.parametrize(("make_scheduler", "per_update"), TRAINER_TIMM_SCHEDULERS.values(),
                         ids=TRAINER_TIMM_SCHEDULERS.keys())
def test_in_a_trainer_timm_schedulers_keep_the_redense_lr_at_a_tenth_of_the_plain_runs(make_scheduler, per_update):
    def run(callbacks):
        lrs = []

        class Record(pl.Callback):
            def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
                lrs.append(trainer.optimizers[0].param_groups[0]["lr"])

        model = _timm_model(make_scheduler, per_update)
        make_trainer([*callbacks, Record()], max_epochs=4).fit(model, make_loader())
        return lrs

    plain = run([])
    dsd = DSDCallback(0.5, dense_epochs=1, sparse_epochs=1, redense_epochs=2)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with_dsd = run([dsd])
    assert not [w for w in caught if "undone" in str(w.message)], "timm's schedulers are known to DSD"
    assert dsd.phase is Phase.REDENSE
    assert with_dsd[:8] == plain[:8]
    assert with_dsd[8:] == pytest.approx([0.1 * lr for lr in plain[8:]], rel=1e-9)
    assert len(set(plain[8:])) > 1, "the schedule moves during re-dense"


@pytest.mark.parametrize("per_update", [False, True], ids=["step(epoch)", "step_update(num_updates)"])
def test_in_a_plain_loop_a_timm_scheduler_given_to_dsd_keeps_the_redense_lr_at_a_tenth(per_update):
    def run(with_dsd: bool):
        with seeded(0):
            model = ConvLSTMNet()
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
        schedule = TIMM_SCHEDULERS["cosine"](optimizer, not per_update)
        dsd = DSD(model, optimizer, 0.5, 1, 1, 2, schedulers=[schedule]) if with_dsd else None
        lrs, updates = [], 0
        for epoch in range(4):
            for x, y in make_loader():
                lrs.append(optimizer.param_groups[0]["lr"])
                optimizer.zero_grad()
                nn.functional.cross_entropy(model(x), y).backward()
                optimizer.step()
                updates += 1
                if per_update:
                    schedule.step_update(updates)
            if not per_update:
                schedule.step(epoch + 1)
            if dsd is not None:
                dsd.step()
        return lrs

    plain, with_dsd = run(False), run(True)
    assert with_dsd[:8] == plain[:8]
    assert with_dsd[8:] == pytest.approx([0.1 * lr for lr in plain[8:]], rel=1e-9)
    assert len(set(plain[8:])) > 1


# ------------------------------------------------------------------------ a scheduler DSD does not know

class FromItsOwnStart:
    """A scheduler DSD does not know: every step sets each group's rate from the rates it stored at the start."""

    def __init__(self, optimizer: torch.optim.Optimizer, gamma: float = 0.9) -> None:
        self.optimizer, self.gamma, self.t = optimizer, gamma, 0
        self.start = [group["lr"] for group in optimizer.param_groups]

    def step(self) -> None:
        self.t += 1
        for group, start in zip(self.optimizer.param_groups, self.start, strict=True):
            group["lr"] = start * self.gamma**self.t

    def state_dict(self) -> dict:
        return {"t": self.t, "start": self.start}

    def load_state_dict(self, state: dict) -> None:
        self.t, self.start = state["t"], state["start"]


def _loop_with(make_scheduler, handed_to_dsd: bool, epochs: int = 4):
    """A plain loop, DSD 1 + 1 + 2 epochs, the scheduler stepped per epoch before ``dsd.step()``."""
    with seeded(0):
        model = ConvLSTMNet()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    schedule = make_scheduler(optimizer)
    dsd = DSD(model, optimizer, 0.5, 1, 1, 2, schedulers=[schedule] if handed_to_dsd else [])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(epochs):
            for x, y in make_loader():
                optimizer.zero_grad()
                nn.functional.cross_entropy(model(x), y).backward()
                optimizer.step()
            schedule.step()
            dsd.step()
    undone = [str(w.message) for w in caught if "was undone" in str(w.message)]
    return undone, optimizer


def test_a_scheduler_dsd_does_not_know_that_puts_the_rate_back_is_named_in_a_warning():
    undone, optimizer = _loop_with(FromItsOwnStart, handed_to_dsd=True)
    assert len(undone) == 1
    # re-dense began after 2 epochs at 0.1 * 0.9**2 = 0.081, set to 0.0081; the scheduler put 0.0729 back
    assert "(x0.1) was undone at the first optimizer steps of re-dense: optimizer 0 group 0: 0.081 before, set to" \
        " 0.0081, now 0.0729" in undone[0]
    assert "the scheduler(s) FromItsOwnStart, which DSD does not know" in undone[0]
    assert "multiply its learning-rate state by 0.1 at re-dense yourself" in undone[0]
    assert optimizer.param_groups[0]["lr"] == pytest.approx(0.1 * 0.9**4), "said, not changed"
    assert not optimizer._optimizer_step_pre_hooks, "the watch removed its hook after judging"


def test_a_torch_scheduler_not_handed_to_dsd_is_noticed_and_one_handed_over_is_not():
    make = lambda o: S.LambdaLR(o, lambda epoch: 0.9**epoch)  # noqa: E731  # recomputes from its base_lrs
    undone, _ = _loop_with(make, handed_to_dsd=False)
    assert len(undone) == 1
    assert "DSD scaled every scheduler it was given (none); something else set the rate" in undone[0]
    undone, optimizer = _loop_with(make, handed_to_dsd=True)
    assert undone == [] and optimizer.param_groups[0]["lr"] == pytest.approx(0.1 * 0.9**4 * 0.1)
    assert not optimizer._optimizer_step_pre_hooks, "the watch stopped at the scheduler's first step"


def test_in_a_trainer_an_epoch_stepped_scheduler_dsd_does_not_know_is_caught_after_the_first_redense_epoch():
    class Unknown(ConvLSTMNet):
        def lr_scheduler_step(self, schedule, metric):
            schedule.step()

    dsd = DSDCallback(0.5, dense_epochs=1, sparse_epochs=1, redense_epochs=2)
    model = Unknown(scheduler=FromItsOwnStart)
    with pytest.warns(UserWarning, match=r"DSDCallback: DSD's re-dense drop .* undone .* FromItsOwnStart") as caught:
        make_trainer([dsd], max_epochs=4).fit(model, make_loader())
    assert sum("was undone" in str(w.message) for w in caught) == 1


@pytest.mark.parametrize("schedule", ["warm restart at re-dense's first step", "warm-up beginning at re-dense"])
def test_a_scheduler_dsd_scaled_whose_own_schedule_raises_the_rate_in_redense_is_not_taken_for_undoing_it(schedule):
    """Found by an adversarial review: the watch used to warn here (and advise scaling the rate again)."""
    make = {
        "warm restart at re-dense's first step": lambda o: S.CosineAnnealingWarmRestarts(o, T_0=4),
        "warm-up beginning at re-dense": lambda o: S.SequentialLR(
            o, [S.ConstantLR(o, 1.0, total_iters=7), S.LinearLR(o, 0.01, 1.0, total_iters=4)], milestones=[7]),
    }[schedule]
    rates = []
    for with_dsd in (True, False):
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 2))
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
        scheduler = make(optimizer)
        dsd = DSD(model, optimizer, 0.5, 3, 4, 4, schedulers=[scheduler], interval="step",
                  log_histograms=False) if with_dsd else None
        x, y = torch.randn(32, 8), torch.randint(0, 2, (32,))
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            for _ in range(11):
                optimizer.zero_grad()
                torch.nn.functional.cross_entropy(model(x), y).backward()
                optimizer.step()
                scheduler.step()
                if dsd is not None:
                    dsd.step()
                rates.append(optimizer.param_groups[0]["lr"])
        assert not [w for w in caught if "undone" in str(w.message)]
    dsd_rates, twin = rates[:11], rates[11:]
    assert max(dsd_rates[7:]) > 3 * dsd_rates[6]  # the schedule itself raises the rate in re-dense
    assert [a / b for a, b in zip(dsd_rates[7:], twin[7:], strict=True)] == pytest.approx([0.1] * 4, rel=1e-9)


def test_with_a_step_clock_the_rate_watch_ends_at_the_second_step_of_redense_without_a_scheduler():
    model = torch.nn.Linear(4, 2)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    dsd = DSD(model, optimizer, 0.5, 1, 1, 3, interval="step", log_histograms=False)
    watching = []
    for _ in range(5):
        watching.append(len(optimizer._optimizer_step_pre_hooks))
        optimizer.zero_grad()
        model(torch.randn(3, 4)).sum().backward()
        optimizer.step()
        dsd.step()
    # step 0 dense, 1 sparse (the constraint's hook), 2-4 re-dense: the watch judges at the second and goes
    assert watching == [0, 1, 1, 1, 0]


def test_a_scheduler_dsd_does_not_know_is_named_at_redense_even_when_it_steps_after_the_watch():
    """Found by an adversarial review: a scheduler stepped every other epoch put the rate back after the watch had
    stopped, and nothing was said. Now the re-dense itself names it."""
    with seeded(0):
        model = ConvLSTMNet()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    schedule = FromItsOwnStart(optimizer)
    dsd = DSD(model, optimizer, 0.5, 1, 1, 4, schedulers=[schedule])
    with pytest.warns(UserWarning, match=r"DSD: re-dense multiplied every learning rate by 0.1, .* it does not know"
                                         r" FromItsOwnStart. If one computes the rate from learning-rate state of"
                                         r" its own, its next step puts the rate back"):
        for epoch in range(6):
            for x, y in make_loader():
                optimizer.zero_grad()
                nn.functional.cross_entropy(model(x), y).backward()
                optimizer.step()
            if epoch % 2:
                schedule.step()  # every other epoch: after the watch has judged
            dsd.step()
