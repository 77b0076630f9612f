"""``DSD``: Dense-Sparse-Dense training in your own loop, plain PyTorch or Lightning Fabric.

The same engine as :class:`~lightning_dsd.DSDCallback` (:mod:`lightning_dsd.rules.engine`), with the same options
(:class:`~lightning_dsd.rules.options.DSDOptions`), checks, masks, enforcement, learning-rate change, re-dense
restart, checkpoint state and reports; you tell it when an epoch (or an optimizer step) is done with
:meth:`DSD.step`.

Between steps nothing else is needed: the pruned entries' gradients are zeroed by a step pre-hook of each
optimizer (after backward, and so after any gradient clipping: call :meth:`DSD.mask_gradients` before
clipping to clip the sparse network's gradient, as the callback does) and the weights are re-zeroed by a
step post-hook, whatever calls ``optimizer.step()`` (a ``GradScaler``, Fabric, accumulation).

Examples:
    >>> import torch
    >>> from torch import nn
    >>> model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 2))
    >>> optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    >>> dsd = DSD(model, optimizer, 0.5, dense_epochs=1, sparse_epochs=1, redense_epochs=1)
    >>> x, y = torch.randn(32, 8), torch.randint(0, 2, (32,))
    >>> for epoch in range(3):
    ...     optimizer.zero_grad()
    ...     nn.functional.cross_entropy(model(x), y).backward()
    ...     optimizer.step()
    ...     dsd.step()
    ...     if epoch == 0:  # after the first step(): pruned
    ...         print(dsd.phase.value, int((model[0].weight == 0).sum()))
    sparse 64
    >>> dsd.phase.value, dsd.finished
    ('redense', True)
"""

from __future__ import annotations

from typing import Any, Mapping, Optional, Sequence, Union

from lightning.fabric.wrappers import _FabricModule
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel
from torch.optim import Optimizer
from torch.utils.hooks import RemovableHandle

from lightning_dsd.doors.base import ReadsEngine
from lightning_dsd.doors.lightning.cli import SparsityValue
from lightning_dsd.rules import log
from lightning_dsd.rules.constraint import unwrapped_optimizer
from lightning_dsd.rules.engine import DoorTerms, DSDEngine
from lightning_dsd.rules.importance import Importance
from lightning_dsd.rules.options import LengthsArgument, check_options, door_options
from lightning_dsd.rules.phases import Stage
from lightning_dsd.rules.selection import LayerSpec, LayerType
from lightning_dsd.rules.sharding import from_rank_zero
from lightning_dsd.rules.sinks import WriterSink
from lightning_dsd.rules.state import CheckpointStateError


class DSD(ReadsEngine):
    r"""Dense → Sparse → Re-dense for a plain PyTorch or Lightning Fabric training loop.

    Build it once the model and its optimizers are ready (after ``fabric.setup``), call :meth:`step` after each
    epoch (``interval="epoch"``) or each optimizer step (``interval="step"``): after the ``dense_epochs``-th
    call the model is pruned, after ``dense + sparse`` calls it is re-densified, and so on. With
    ``dense_epochs=0`` it is pruned just before the first forward pass in training mode (so a checkpoint can
    be loaded first).

    Args:
        model: the model, as built or as ``fabric.setup`` / ``DistributedDataParallel`` hand it back (names
            are the model's own, without wrapper prefixes).
        optimizers: the optimizer, or a list of them, that train the targeted weights (Fabric's wrappers are
            fine). Each must update some target, and every target must be updated by one.
        sparsity: the sparsity of each cycle (:attr:`~lightning_dsd.rules.options.DSDOptions.sparsities`).
        dense_epochs: the length of the first dense phase; this and the next two are
            :attr:`~lightning_dsd.rules.options.DSDOptions.lengths`. Here they count :meth:`step` calls, and
            ``None`` runs the phase until the metric given to :meth:`step` converges (``mode``, ``patience``,
            ``min_delta``).
        sparse_epochs: the length of each sparse phase, or one per cycle.
        redense_epochs: the length of each re-dense phase, or one per cycle.
        schedulers: the learning-rate scheduler, or a list of them, to keep the re-dense learning-rate change
            through.
        writer: where histograms, scalars and transition notes go: a ``SummaryWriter`` (on rank zero; other
            ranks may pass ``None``), or ``None`` for console notes only.

    Every other keyword is an option of :class:`~lightning_dsd.rules.options.DSDOptions`, which declares its
    default, its check and its meaning once for every door (``monitor`` excepted: the metric comes with
    :meth:`step`); ``prune=False`` runs the paper's LLR control on the same clock, nothing pruned.
    """

    def __init__(
        self,
        model: nn.Module,
        optimizers: Union[Optimizer, Sequence[Optimizer]],
        sparsity: Union[SparsityValue, float, str, Sequence[Union[SparsityValue, float, str]]],
        dense_epochs: Optional[int],
        sparse_epochs: LengthsArgument,
        redense_epochs: LengthsArgument,
        *,
        schedulers: Any = None,
        writer: Optional[Any] = None,
        final_sparse_epochs: Optional[int] = 0,
        interval: str = "epoch",
        mode: str = "min",
        patience: int = 3,
        min_delta: float = 0.0,
        lr_scale: float = 0.1,
        include: Optional[Union[str, Sequence[str]]] = None,
        exclude: Optional[Union[str, Sequence[str]]] = None,
        layer_types: Optional[Mapping[LayerType, LayerSpec]] = None,
        scope: str = "layer",
        log_histograms: bool = True,
        histogram_every_n_epochs: Optional[int] = None,
        histogram_layers: Optional[Union[str, Sequence[str]]] = None,
        log_scalars: bool = True,
        figure_layers: Union[int, Sequence[str]] = 2,
        layer_sparsity: Optional[Mapping[str, Union[SparsityValue, float, str]]] = None,
        redense_init: str = "zero",
        redense_state: str = "pruned",
        seed: int = 0,
        mask_storage: str = "weight_dtype",
        prune: bool = True,
        importance: Importance = "magnitude",
        importance_steps: int = 100,
    ) -> None:
        self.options = check_options(
            sparsity, dense_epochs, sparse_epochs, redense_epochs, monitor_required=False, **door_options(locals())
        )
        self._model = _unwrapped_module(model)
        unwrapped = [unwrapped_optimizer(o) for o in _as_list(optimizers, "optimizers", Optimizer)]
        self._optimizers = list({id(o): o for o in unwrapped}.values())  # one optimizer given twice is one
        many = isinstance(schedulers, (list, tuple))
        self._schedulers = list(schedulers) if many else [] if schedulers is None else [schedulers]
        self._elapsed = 0
        self._said_finished = False
        self._sink = WriterSink(writer, lambda: self._elapsed)
        self._engine = DSDEngine(self.options, self, _TERMS)
        self._engine.bind(self._model, self.select_targets)
        self._engine.start(self._elapsed, run=None, every_optimizer_owns_a_target=True)
        self._pending_start: Optional[RemovableHandle] = None
        if self._engine.schedule.is_due(0):
            self._pending_start = self._model.register_forward_pre_hook(self._start_before_training, prepend=True)

    # ------------------------------------------------------------------ what the engine asks of a loop

    @property
    def optimizers(self) -> Sequence[Optimizer]:
        return self._optimizers

    @property
    def schedulers(self) -> Sequence[Any]:
        return self._schedulers

    @property
    def sink(self) -> WriterSink:
        return self._sink

    def sparse_phase_ending(self, cycle: int, targets: Mapping[str, Tensor]) -> None:
        """Nothing to export: save ``dsd.state_dict()`` with your model for that."""

    # ------------------------------------------------------------------ read-only state

    @property
    def finished(self) -> bool:
        """Whether the last phase has run its course: :meth:`step` does nothing from then on."""
        return self._engine.is_finished(self._elapsed)

    @property
    def elapsed(self) -> int:
        """How many times :meth:`step` has been called (restored by :meth:`load_state_dict`)."""
        return self._elapsed

    # ------------------------------------------------------------------ the loop

    def step(self, metric: Optional[Union[float, Tensor]] = None) -> None:
        """One epoch (or optimizer step, with ``interval="step"``) is done: report it and make the transitions
        now due. ``metric`` (e.g. the validation loss) decides when a phase of length ``None`` ends; under
        several processes rank zero's value counts."""
        if self.finished:
            if not self._said_finished:
                self._said_finished = True
                log.warn(
                    f"DSD finished its schedule after {self._elapsed} steps ({self.phase.value} phase, cycle"
                    f" {self.cycle}); `step()` does nothing from now on. Check `dsd.finished` to end the loop."
                )
            return
        value = None
        if self.options.waits_for_metric:  # every rank takes rank zero's metric (None included)
            value = from_rank_zero(None if metric is None else float(metric))
            counted = self._counted_stage()
            if value is None and counted.length is None:  # refused before any transition, the pending one included
                raise ValueError(
                    f"The {counted.phase.value} phase runs until a metric converges (its length is None), so `step()`"
                    " needs that metric each time on rank zero, e.g. `dsd.step(val_loss)`."
                )
        self._start_if_pending()
        if value is not None:
            self._engine.schedule.observe(value)  # rank zero's, shared above
        self._elapsed += 1  # reports of this epoch's end and of the transitions are filed under the new count
        if self.interval == "epoch":
            self._engine.epoch_ended(self._elapsed - 1)
        schedule = self._engine.schedule
        index = schedule.index
        try:
            self._engine.advance_if_due(self._elapsed)  # a refused transition leaves the schedule as it found it
        except Exception:
            self._elapsed -= 1  # and the refused call does not count: a retry makes the refused transition
            if schedule.index != index:  # at the same count; one made before it (a zero-length phase) stays made,
                schedule.restart_at(self._elapsed)  # counted from here, so a state saved now resumes
            raise
        if self.finished:
            self._engine.finish(self._elapsed)

    def _counted_stage(self) -> Stage:
        """The stage this :meth:`step` counts: the current one, or, while the transitions due before any training
        (``dense_epochs=0``) are pending, the first one they lead to (of a length other than 0)."""
        schedule = self._engine.schedule
        if self._pending_start is None:
            return schedule.stage
        return next((stage for stage in schedule.stages[schedule.index:] if stage.length != 0), schedule.stages[-1])

    def mask_gradients(self) -> None:
        """Zero the pruned entries' gradients now (before gradient clipping, so it measures the sparse
        network's gradient); without this call, the optimizer's step pre-hook does it."""
        for optimizer in self._optimizers:
            self._engine.mask_gradients(optimizer)

    def _start_before_training(self, module: nn.Module, args: Any) -> None:
        if module.training:
            self._start_if_pending()

    def _start_if_pending(self) -> None:
        """The transitions due before any training (``dense_epochs=0``), made once."""
        if self._pending_start is not None:
            self._pending_start.remove()
            self._pending_start = None
            self._engine.advance_if_due(self._elapsed)

    # ------------------------------------------------------------------ checkpointing

    def state_dict(self) -> dict[str, Any]:
        """The callback's checkpoint state (schedule, full masks at 1 bit per weight, configuration) and the
        number of :meth:`step` calls; plain data, read by ``torch.load(..., weights_only=True)``. A collective
        for sharded weights: call it on every rank."""
        return {**self._engine.state_dict(), "elapsed": self._elapsed}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Check ``state`` against this run, then take it: the schedule, the step count and, in a sparse phase,
        the masks, enforced at once. A damaged or mismatched state raises before anything changes."""
        elapsed = state.get("elapsed") if isinstance(state, Mapping) else None
        if not isinstance(elapsed, int) or isinstance(elapsed, bool) or elapsed < 0:
            raise CheckpointStateError(
                f"its `elapsed` entry is {elapsed!r}, expected the int >= 0 of `DSD.step()` calls"
                " (a Trainer's checkpoint keeps DSDCallback's state, which has none)"
            )
        self._engine.load_state_dict({key: value for key, value in state.items() if key != "elapsed"}, now=elapsed)
        self._elapsed = elapsed
        self._said_finished = False
        if self._pending_start is not None and not self._engine.schedule.is_due(elapsed):
            self._pending_start.remove()
            self._pending_start = None


_TERMS = DoorTerms(
    name="DSD",
    training="loop",
    resume="load `dsd.load_state_dict(...)` with the model",
    new="build a new DSD(...)",
    lazy="before `DSD(...)`",
    returner="the loop",
)


def _as_list(value: Any, name: str, kind: type) -> list[Any]:
    """One object or a list of them, as a list (``kind`` checked)."""
    values = list(value) if isinstance(value, (list, tuple)) else [value]
    if not values or not all(isinstance(v, kind) for v in values):
        raise TypeError(f"`{name}` must be a torch {kind.__name__} or a non-empty list of them. Found: {value!r}.")
    return values


def _unwrapped_module(model: nn.Module) -> nn.Module:
    """The user's own module behind Fabric's and DDP's wrappers, whose parameter names have no prefixes."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"`model` must be a torch nn.Module. Found: {type(model).__name__}.")
    while isinstance(model, (_FabricModule, DistributedDataParallel)):
        model = model.module
    return model
