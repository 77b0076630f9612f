"""Shared test helpers: small models, a step recorder and Trainer settings for real ``lightning.Trainer`` runs
on the CPU, seconds each. Imported by the test modules and by the scripts they run in fresh interpreters."""

from __future__ import annotations

import contextlib
import json
import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any, Callable, Iterator, Optional

import lightning.pytorch as pl
import torch
from torch import nn
from torch.optim.optimizer import register_optimizer_step_post_hook
from torch.utils.data import DataLoader, TensorDataset

from lightning_dsd import DSDCallback, Phase

#: This folder (helpers, and the scripts multi-process tests launch) and the repository root.
TESTS = Path(__file__).resolve().parent
ROOT = TESTS.parent


def sorted_global_keep(weights: dict[str, torch.Tensor], sparsity: float) -> dict[str, torch.Tensor]:
    """The slow, obvious reference for a global threshold: one stable sort of every |w| in order, the
    ``round(sparsity * total)`` first pruned (ties by position, tensor by tensor)."""
    flat = torch.cat([w.detach().abs().float().flatten() for w in weights.values()])
    keep = torch.ones_like(flat, dtype=torch.bool)
    keep[torch.sort(flat, stable=True).indices[: round(sparsity * flat.numel())]] = False
    pieces = keep.split([w.numel() for w in weights.values()])
    return {name: piece.view(w.shape) for (name, w), piece in zip(weights.items(), pieces, strict=True)}


def make_loader(n: int = 64, batch_size: int = 16, seed: int = 0) -> DataLoader:
    """Sequences of 4 channels x 12 steps, 3 classes; deterministic, never shuffled."""
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 4, 12, generator=generator)
    y = (x[:, 0].mean(dim=1) > 0).long() + (x[:, 1].mean(dim=1) > 0.3).long()
    return DataLoader(TensorDataset(x, y), batch_size=batch_size)


def sgd_momentum(params) -> torch.optim.Optimizer:
    return torch.optim.SGD(params, lr=0.1, momentum=0.9)


def adamw(params) -> torch.optim.Optimizer:
    return torch.optim.AdamW(params, lr=1e-2, weight_decay=0.05)


class ConvLSTMNet(pl.LightningModule):
    """Conv1d + BatchNorm + LSTM + Linear: every kind of layer DSD targets or must leave alone.

    ``optimizer`` builds the optimizer from the parameters; ``scheduler`` (optional) builds a scheduler.
    """

    def __init__(
        self,
        optimizer: Callable[..., torch.optim.Optimizer] = sgd_momentum,
        scheduler: Optional[Callable[[torch.optim.Optimizer], object]] = None,
        scheduler_interval: str = "epoch",
    ) -> None:
        super().__init__()
        self.conv = nn.Conv1d(4, 8, kernel_size=3, padding=1)
        self.norm = nn.BatchNorm1d(8)
        self.lstm = nn.LSTM(8, 16, batch_first=True)
        self.head = nn.Linear(16, 3)
        self.make_optimizer = optimizer
        self.make_scheduler = scheduler
        self.scheduler_interval = scheduler_interval

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.norm(self.conv(x)))
        out, _ = self.lstm(h.transpose(1, 2))
        return self.head(out[:, -1])

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = nn.functional.cross_entropy(self(x), y)
        self.log("train_loss", loss, on_epoch=True, on_step=False)
        return loss

    def validation_step(self, batch, batch_idx):
        x, y = batch
        self.log("val_loss", nn.functional.cross_entropy(self(x), y))

    def configure_optimizers(self):
        optimizer = self.make_optimizer(self.parameters())
        if self.make_scheduler is None:
            return optimizer
        scheduler = {"scheduler": self.make_scheduler(optimizer), "interval": self.scheduler_interval}
        if isinstance(scheduler["scheduler"], torch.optim.lr_scheduler.ReduceLROnPlateau):
            scheduler["monitor"] = "train_loss"
        return {"optimizer": optimizer, "lr_scheduler": scheduler}


TARGETS = ["conv.weight", "lstm.weight_ih_l0", "lstm.weight_hh_l0", "head.weight"]


def make_trainer(callbacks: list, max_epochs: int = 6, **kwargs) -> pl.Trainer:
    options = dict(
        max_epochs=max_epochs,
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        deterministic=True,
    )
    options.update(kwargs)
    return pl.Trainer(callbacks=callbacks, **options)


class StepRecorder(pl.Callback):
    """Records, after every real optimizer step, the phase and whether every pruned entry is exactly zero.

    It uses torch's *global* step post-hook, which runs after every optimizer's own hooks, so it sees the
    weights exactly as the next forward pass will.
    """

    def __init__(self, dsd: DSDCallback) -> None:
        self.dsd = dsd
        self.steps: list[tuple[str, int, bool]] = []
        self.masks_seen: dict[int, dict[str, torch.Tensor]] = {}
        self._handle = None

    def on_train_start(self, trainer, pl_module):
        self._handle = register_optimizer_step_post_hook(self._after_step)
        self.module = pl_module

    def on_train_end(self, trainer, pl_module):
        self._handle.remove()

    def _after_step(self, optimizer, args, kwargs) -> None:
        masks = self.dsd.masks
        params = dict(self.module.named_parameters())
        zeros_hold = all(bool((params[name][~mask] == 0).all()) for name, mask in masks.items())
        if self.dsd.phase is Phase.SPARSE and self.dsd.options.prune and not masks:
            zeros_hold = False  # a sparse phase without masks holds no zeros: never count it as holding them
        self.steps.append((self.dsd.phase.value, self.dsd.cycle, zeros_hold))
        if self.dsd.phase is Phase.SPARSE:
            first = self.masks_seen.setdefault(self.dsd.cycle, {n: m.clone() for n, m in masks.items()})
            assert all(torch.equal(first[n], masks[n]) for n in first), "masks moved during a sparse phase"


def resumable_model() -> ConvLSTMNet:
    """The model of the resume tests: AdamW and a StepLR, so optimizer and scheduler state matter."""
    with seeded(7):
        return ConvLSTMNet(
            optimizer=lambda p: torch.optim.AdamW(p, lr=1e-2, weight_decay=0.05),
            scheduler=lambda o: torch.optim.lr_scheduler.StepLR(o, step_size=2, gamma=0.5),
        )


def resumable_dsd(**overrides) -> DSDCallback:
    """D S D over 2 + 3 + 2 epochs: epoch 3 ends in the middle of the sparse phase."""
    return DSDCallback(**{**dict(sparsity=0.5, dense_epochs=2, sparse_epochs=3, redense_epochs=2), **overrides})


def run_recorded(dsd: DSDCallback, **trainer_options) -> StepRecorder:
    """Fit a seeded ``ConvLSTMNet`` with ``dsd``; check zeros held after every step; return the recorder."""
    with seeded():
        model = ConvLSTMNet()
    recorder = StepRecorder(dsd)
    make_trainer([dsd, recorder], **trainer_options).fit(model, make_loader())
    assert all(zeros for _, _, zeros in recorder.steps)
    return recorder


@contextlib.contextmanager
def seeded(seed: int = 0) -> Iterator[None]:
    pl.seed_everything(seed, verbose=False)
    yield


class OverflowsSometimes(ConvLSTMNet):
    """Puts an inf into one gradient on chosen batches, so the GradScaler skips those optimizer steps."""

    OVERFLOW_BATCHES = {5, 6, 9}  # 0-based over the run: two in the sparse phase, one in re-dense

    def on_train_start(self):
        self.batches, self.skipped = 0, []

    def on_after_backward(self):
        if self.batches in self.OVERFLOW_BATCHES:
            self.head.weight.grad[0, 0] = float("inf")
            self.skipped.append(self.batches)
        self.batches += 1


@contextlib.contextmanager
def tensorboard_server(logdir) -> Iterator[Callable[..., Any]]:
    """The real TensorBoard server on a free loopback port; yields ``get_json(path, until=None)``, which
    retries (60 s at most) until the server answers and ``until(answer)`` holds."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    server = subprocess.Popen(
        [sys.executable, "-m", "tensorboard.main", "--logdir", str(logdir), "--host", "127.0.0.1",
         "--port", str(port), "--load_fast", "false", "--reload_interval", "1"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )

    def get_json(path: str, until: Optional[Callable[[Any], Any]] = None) -> Any:
        deadline, answer = time.monotonic() + 60, None
        while time.monotonic() < deadline:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=5) as response:
                    answer = json.loads(response.read())
                if until is None or until(answer):
                    return answer
            except OSError:
                pass
            time.sleep(0.5)
        raise AssertionError(f"TensorBoard did not serve {path} as expected within 60 s; last answer: {answer}")

    try:
        yield get_json
    finally:
        server.terminate()
        server.wait(timeout=30)


def run_worker(script: Path, out: Path, *args: str, ranks: int) -> list[dict]:
    """Run a multi-process worker script in a fresh interpreter; return what each rank saved to
    ``<out>/rank<r>.pt``. A failure shows the worker's output."""
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    run = subprocess.run([sys.executable, str(script), "--out", str(out), *args], env=env, timeout=300,
                         capture_output=True, text=True)
    assert run.returncode == 0, f"{script.name} failed ({run.returncode}):\n{run.stdout[-3000:]}\n{run.stderr[-5000:]}"
    return [torch.load(out / f"rank{rank}.pt", weights_only=False) for rank in range(ranks)]


def timm_schedulers() -> Any:
    """timm's own ``timm.scheduler`` package, imported without running ``timm/__init__.py``, which imports
    timm's models and so torchvision (whose registry build does not load with a CPU torch). The scheduler
    modules import only torch, numpy and each other: this is timm's real code, unchanged."""
    import importlib
    import importlib.util
    import types

    if "timm" not in sys.modules:
        spec = importlib.util.find_spec("timm")
        if spec is None or not spec.submodule_search_locations:
            raise ModuleNotFoundError("timm is not installed: `pip install --no-deps 'timm>=1.0'`")
        package = types.ModuleType("timm")
        package.__path__ = list(spec.submodule_search_locations)
        sys.modules["timm"] = package
    return importlib.import_module("timm.scheduler")
