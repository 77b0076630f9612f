"""The DSD engine: every rule of a Dense-Sparse-Dense run, for one model and its optimizers, in any loop.

:class:`DSDEngine` owns the run: the schedule, the choice of targets, the masks of a sparse phase and their
enforcement, the learning-rate change and re-dense restart, the checkpoint state, every check made before
training and what is reported at each transition and at the end. It holds no clock and knows no training
framework. Every front door drives it through one lifecycle, translating its framework's events:

1. :meth:`~DSDEngine.bind` when the model is final: the targets are chosen, lazy modules shaped or refused;
2. :meth:`~DSDEngine.start` before the first step: every check before training (the optimizers, a metric that
   would never come, a restored state against the checkpoint's clock and weights, a door already used by
   another run, a training too short for the schedule), then reporting, and a restored sparse phase's masks;
3. :meth:`~DSDEngine.advance_if_due` at each epoch or optimizer step (with the elapsed count),
   :meth:`~DSDEngine.epoch_ended`, :meth:`~DSDEngine.observe_monitor` after an evaluation, and
   :meth:`~DSDEngine.stop_now` (whether to stop, with ``stop_at_end``);
4. :meth:`~DSDEngine.state_dict` / :meth:`~DSDEngine.load_state_dict` (checked, then taken);
5. :meth:`~DSDEngine.finish` at the end (or :meth:`~DSDEngine.interrupted`): the left-sparse warning, the last
   records and the report of the model the training returns.

A door gives it a :class:`Training`, which hands over the model's optimizers and schedulers and where reports
go, and a :class:`DoorTerms`, the door's name and how its users resume. The three front doors are
:class:`~lightning_dsd.DSDCallback` (a Lightning ``Trainer``), :class:`~lightning_dsd.DSD` (Lightning Fabric and
plain PyTorch loops) and :class:`~lightning_dsd.doors.transformers.callback.DSDTrainerCallback`
(``transformers.Trainer``).

Every change DSD makes to weights (pruning, restored masks, a re-dense restart) is followed by
``FSDPModule.reshard()`` on the model's FSDP2 modules (a local operation), so no forward pass computes with
a gathered copy taken before the change.

Examples:
    >>> import torch
    >>> from torch import nn
    >>> from lightning_dsd.rules.options import check_options
    >>> model = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 2))
    >>> optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    >>> class Quiet:  # a Training that logs nothing
    ...     optimizers, schedulers, sink = [optimizer], [], None
    ...     def sparse_phase_ending(self, cycle, targets): pass
    >>> engine = DSDEngine(check_options(0.5, 1, 1, 1, log_scalars=False, log_histograms=False), Quiet())
    >>> engine.bind(model)
    >>> engine.start(0, run=None)
    >>> engine.advance_if_due(1)  # one epoch done: prune
    >>> engine.phase.value, int((model[0].weight == 0).sum())
    ('sparse', 8)
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass
from typing import Any, Callable, Mapping, NamedTuple, Optional, Protocol, Sequence, Union

import torch
from torch import Tensor, nn
from torch.optim import Optimizer

from lightning_dsd.rules import log
from lightning_dsd.rules.constraint import SparseConstraint, unwrapped_optimizer
from lightning_dsd.rules.importance import GradientWindow, criterion_name, importance_scores
from lightning_dsd.rules.lr import (
    RateWatch,
    current_learning_rates,
    is_known_scheduler,
    scale_learning_rates,
    unwrapped_scheduler,
)
from lightning_dsd.rules.masks import disconnected_units
from lightning_dsd.rules.options import DSDOptions
from lightning_dsd.rules.phases import ConvergenceTracker, Moment, Phase, Schedule, Stage, build_stages
from lightning_dsd.rules.plan import SAME_MAGNITUDE, SAME_SCORE, MaskPlan, check_finite, same_magnitude, shown
from lightning_dsd.rules.preflight import TrainingLimit, shape_lazy_modules, warn_if_schedule_does_not_fit
from lightning_dsd.rules.redense import reinitialize_pruned, restart_optimizer_state
from lightning_dsd.rules.reporting import PhaseReporter, ReportSink, current_seed
from lightning_dsd.rules.selection import (
    Selection,
    check_selection,
    matches_any,
    select_parameters,
    shortened,
    unmatched_patterns,
)
from lightning_dsd.rules.sharding import (
    FullMasks,
    check_placements,
    count_zeros,
    counts_over_ranks,
    from_rank_zero,
    full_mask,
    local_slice,
    pruned_per_tensor,
    refuse_flat_shards,
    reshard_gathered,
)
from lightning_dsd.rules.state import CheckpointStateError, RunConfig, decode_state, encode_state
from lightning_dsd.version import __version__

#: Why a target that a gradient criterion cannot rank stays dense for a cycle: its window holds no step of it.
NO_WINDOW = "no optimizer step in the gradient window"
#: A transition warns when a tensor has at least this share of its output units cut off from every input.
DISCONNECTED_WARNING_SHARE = 0.1


@dataclass(frozen=True)
class DoorTerms:
    """How a front door is named in the engine's messages and how its users go on from a checkpoint.

    ``name`` is the door (``"DSDCallback"``); ``training`` is one training run in its terms (``"`fit`"``);
    ``resume`` says how to go on from a checkpoint (``"resume with `trainer.fit(model, ckpt_path=...)`"``);
    ``new`` how to start afresh; ``lazy`` where to run a forward pass that shapes lazy modules; ``returner``
    what hands the trained model back."""

    name: str = "DSDCallback"
    training: str = "`fit`"
    resume: str = "resume with `trainer.fit(model, ckpt_path=...)`"
    new: str = "give the Trainer a new DSDCallback(...)"
    lazy: str = "before `trainer.fit`, or set `self.example_input_array` in the LightningModule so DSD can run it"
    returner: str = "the Trainer"


class MetricSource(NamedTuple):
    """What a door can tell before training about the metric a phase waits for: whether it is ``measured``
    at all and, if not, why (``found``), what to do (``remedy``), and whether that is certain (``refuse``) or
    the metric may still come from elsewhere (a warning)."""

    measured: bool
    found: str = ""
    remedy: str = ""
    refuse: bool = True


class ReturnedCheckpoint(NamedTuple):
    """A checkpoint the training loaded at its end and returns instead of its last step's model (a best-model
    reload): where it is, where in the schedule it was saved (in words), whether that is the last phase, what
    loaded it, and what to do when it is not DSD's result."""

    path: str
    saved_in: str
    in_last_phase: bool
    loaded_by: str
    remedy: str


class Training(Protocol):
    """What a front door gives the engine: the optimizers and schedulers DSD acts on, where reports go
    (``None``: nowhere), and a hook called while the schedule still says "sparse", at the end of each
    sparse phase, with the targets (to export the sparse model)."""

    @property
    def optimizers(self) -> Sequence[Optimizer]: ...

    @property
    def schedulers(self) -> Sequence[Any]: ...

    @property
    def sink(self) -> Optional[ReportSink]: ...

    def sparse_phase_ending(self, cycle: int, targets: Mapping[str, Tensor]) -> None: ...


class DSDEngine:
    """Every DSD rule for one model (see the module docstring). ``terms`` name the front door in messages;
    ``stop_at_end`` is whether :meth:`stop_now` ends training once the last phase has run its course."""

    def __init__(self, options: DSDOptions, training: Training, terms: DoorTerms = DoorTerms(),
                 stop_at_end: bool = True) -> None:
        self.options = options
        self.training = training
        self.terms = terms
        self.stop_at_end = stop_at_end
        tracker = None
        if options.waits_for_metric:
            tracker = ConvergenceTracker(options.mode, options.patience, options.min_delta)
        stages = build_stages(len(options.sparsities), *options.lengths, final=options.final_sparse_epochs)
        self.schedule = Schedule(stages, tracker)
        self.reporter = PhaseReporter(options.log_histograms, options.log_scalars, options.figure_layers)
        if not options.prune:
            self.reporter.figure_title = "LLR control (prune=False, nothing pruned): weight distribution"
        self.selection = Selection(selected={})
        self.plan: Optional[MaskPlan] = None  # built at `bind`, with the targets' input dimensions
        self._model: Optional[nn.Module] = None
        self._run: Any = None  # the training run (a Trainer) of the latest `start`; `None` before any
        self._started = False
        self._restored = False  # a state was loaded since the latest `start`, to be checked at the next
        self._completed = False  # the latest training finished the whole schedule
        self._stopping_said = False
        self._last_now = 0  # the latest count a door gave (`start`, `advance_if_due`, `finish`)
        self._optimizers_seen: weakref.WeakSet[Optimizer] = weakref.WeakSet()  # those of the latest `start`
        self._constraint: Optional[SparseConstraint] = None
        self._restored_masks: Optional[dict[str, Tensor]] = None
        self._left_dense: dict[str, str] = {}  # targets the current sparse phase does not prune, with why
        self._rate_watch: Optional[RateWatch] = None  # from a re-dense to its first scheduler steps
        # The scalars due at the sink's current step (weights, learning rates), logged once at the end of
        # ``advance_if_due`` or ``finish``: an epoch end and the transitions after it share a step.
        self._due_scalars: Optional[tuple[dict[str, nn.Parameter], list[list[float]]]] = None
        self._window: Optional[GradientWindow] = None  # the gradient statistics of `importance`, while open

    def __getstate__(self) -> dict[str, Any]:
        """Picklable (``ddp_spawn`` sends the callback to its processes; a copy has seen no optimizer)."""
        state = dict(vars(self))
        state["_optimizers_seen"] = None
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        vars(self).update(state)
        self._optimizers_seen = weakref.WeakSet()

    # ------------------------------------------------------------------ read-only state

    @property
    def owner(self) -> str:
        """The front door's name, as messages give it."""
        return self.terms.name

    @property
    def phase(self) -> Phase:
        return self.schedule.stage.phase

    @property
    def cycle(self) -> int:
        return self.schedule.stage.cycle

    @property
    def targets(self) -> dict[str, nn.Parameter]:
        return self.selection.selected

    @property
    def masks(self) -> dict[str, Tensor]:
        """Bool keep masks by parameter name in a sparse phase (this rank's shard of a ``DTensor``), else empty."""
        if self._constraint is not None:
            return self._constraint.keep_masks()
        return dict(self._restored_masks or {})

    @property
    def mask_bytes(self) -> int:
        if self._constraint is None:
            return 0
        return sum(mask.numel() * mask.element_size() for mask in self._constraint.masks)

    @property
    def layer_sparsities(self) -> dict[str, list[Union[float, str]]]:
        return self.plan.per_layer(list(self.targets)) if self.plan is not None else {}

    @property
    def phase_label(self) -> str:
        if self.schedule.in_final_sparse_phase:
            return "final sparse"
        cycles = len(self.options.sparsities)
        return self.phase.value if cycles == 1 else f"{self.phase.value} {self.cycle + 1}/{cycles}"

    def is_finished(self, now: int) -> bool:
        """Whether the last phase has run its course at ``now``."""
        return self.schedule.is_last and self.schedule.is_over(now)

    @property
    def _sink(self) -> Optional[ReportSink]:
        return self.training.sink

    # ------------------------------------------------------------------ set-up

    def bind(self, model: nn.Module, select: Optional[Callable[[nn.Module], Selection]] = None,
             example: Any = None) -> None:
        """Choose the targets in ``model`` (its FSDP2 modules resharded first, so they are the shards the
        optimizers own), with ``select`` (a door's :meth:`~lightning_dsd.doors.base.ReadsEngine.select_targets`,
        which a user may override; by default the options' ``include``, ``exclude`` and ``layer_types``), and check
        everything about the model that can be checked before training. Lazy modules are shaped by one forward
        pass of ``example`` (see :func:`~lightning_dsd.rules.preflight.shape_lazy_modules`), or refused."""
        shape_lazy_modules(model, example, self.owner, self.terms.lazy)
        refuse_flat_shards(model, self.owner)
        reshard_gathered(model)
        options = self.options
        selection = select(model) if select is not None else self.default_selection(model)
        _check_chosen(model, selection, self.owner)
        check_selection(model, selection, options.include, options.exclude)
        check_placements(selection.selected)
        plan = MaskPlan(options.cycle_sparsities, options.scope, options.layer_sparsity, selection.input_dims)
        plan.check_fits(selection.selected)
        self._model, self.selection, self.plan = model, selection, plan
        self._warn_about_unmatched_patterns(model)
        for message in plan.prunes_nothing(selection.selected):
            log.warn(f"{self.owner}: {message}")
        self.reporter.choose_figure_layers(self.targets)

    def default_selection(self, model: nn.Module) -> Selection:
        """The targets the options choose in ``model``: :func:`~lightning_dsd.rules.selection.select_parameters` with
        ``include``, ``exclude`` and ``layer_types``."""
        return select_parameters(model, self.options.include, self.options.exclude, self.options.layer_types)

    def start(self, now: int, run: Any, *, limit: Optional[TrainingLimit] = None,
              metric_source: Optional[MetricSource] = None, every_optimizer_owns_a_target: bool = False) -> None:
        """Before the first step of a training run (``run``: the door's Trainer, or ``None``), at ``now`` (its
        epoch or step count), once :meth:`bind` has chosen the targets and any saved state was loaded.

        Every check before training is made here, in this order, before anything changes: the metric a phase
        waits for (``metric_source``, see :class:`MetricSource`); the optimizers (each must update a target with
        ``every_optimizer_owns_a_target``; every learning rate must be a number); whether the schedule goes on
        (a restored state agrees with the checkpoint's clock and weights; a door whose schedule an earlier
        training finished, or left midway with another ``run``, or whose count went back, is refused; a run
        resumed without DSD's state is joined at ``now``); and a training ``limit`` that ends before the
        schedule does (a warning). Then the run's record is written, a restored sparse phase's masks are
        enforced and the gradient window opens if due."""
        if metric_source is not None:
            self._check_metric_source(metric_source)
        self._check_optimizers(self.training.optimizers, every_optimizer_owns_a_target)
        self._continue_or_join(now, run)
        warn_if_schedule_does_not_fit(self.schedule, limit)
        self._run, self._started, self._restored, self._completed = run, True, False, False
        self._optimizers_seen = weakref.WeakSet(unwrapped_optimizer(o) for o in self.training.optimizers)
        self._stopping_said = False
        self._last_now = now
        self._start_reporting()
        self._resume_sparse_phase()
        self.update_window(now)

    def _continue_or_join(self, now: int, run: Any) -> None:
        """Whether this training continues the schedule (see :meth:`start`)."""
        unit, terms = self.options.interval, self.terms
        if self._restored:
            self._check_restored(now)
        elif not self._started:
            if now > 0:
                self._join(now, "the checkpoint holds no DSD state")
        elif self._completed:
            raise RuntimeError(
                f"This {terms.name} already ran its whole schedule in an earlier {terms.training}"
                f" ({' -> '.join(s.phase.value for s in self.schedule.stages)}), so another {terms.training} with"
                f" it would train without DSD. To run DSD again, {terms.new}; to go on from a saved run,"
                f" {terms.resume}."
            )
        elif run is not self._run:
            raise RuntimeError(
                f"This {terms.name} stopped in the {self.phase.value} phase of cycle {self.cycle} (begun at {unit}"
                f" {self.schedule.started_at}) of an earlier {terms.training} with another Trainer, whose {unit}"
                f" count this Trainer does not share (it is at {unit} {now}). To go on from that run,"
                f" {terms.resume} from its checkpoint; to run DSD afresh, {terms.new}."
            )
        elif now < self._last_now:
            raise RuntimeError(
                f"This {terms.name} already ran in an earlier {terms.training} up to {unit} {self._last_now} (the"
                f" {self.phase.value} phase of cycle {self.cycle}), so a new one from {unit} {now} would start in the"
                f" middle of its schedule. To run DSD afresh, {terms.new}; to go on, {terms.resume}."
            )
        else:
            self._carry_learning_rate_drops()

    def _carry_learning_rate_drops(self) -> None:
        """The same training goes on (a second ``fit`` of the same Trainer): optimizers it built afresh
        (Lightning calls ``configure_optimizers`` at every ``fit``) start from the configured rates, so they, and
        the schedulers that drive them, get the re-dense drops already made, ``lr_scale`` once per re-dense
        (exactly what those rates would be had the schedule run without the break). Optimizers the earlier
        training already used keep their (scaled) rates."""
        redenses = sum(stage.phase is Phase.REDENSE for stage in self.schedule.stages[1:self.schedule.index + 1])
        fresh = [o for o in self.training.optimizers if unwrapped_optimizer(o) not in self._optimizers_seen]
        if not redenses or not fresh or self.options.lr_scale == 1:
            return
        factor = self.options.lr_scale ** redenses
        optimizers = [unwrapped_optimizer(o) for o in fresh]
        driving = [scheduler for scheduler in self.training.schedulers
                   if getattr(unwrapped_scheduler(scheduler), "optimizer", None) in optimizers]
        before = current_learning_rates(optimizers)
        scale_learning_rates(optimizers, driving, factor)
        log.info(f"{self.owner} goes on in the {self.phase_label} phase of cycle {self.cycle} with optimizers built"
                 f" afresh: their learning rates take the {redenses} re-dense drop(s) already made (x{factor:g}):"
                 f" {_format_lrs(before)} -> {_format_lrs(current_learning_rates(optimizers))}.")

    def stop_now(self, now: int, stopping: bool = False) -> bool:
        """Whether the door should stop training at ``now``: ``stop_at_end`` is set, the last phase has run its
        course and the training is not ``stopping`` already. Said once."""
        if not (self.stop_at_end and self.is_finished(now)) or stopping:
            return False
        if not self._stopping_said:
            self._stopping_said = True
            log.info(f"DSD finished its last phase ({self.phase.value}, cycle {self.cycle}): stopping.")
        return True

    def finish(self, now: int, returned: Optional[ReturnedCheckpoint] = None) -> None:
        """At the end of a training run, at ``now``: a warning when it stopped inside a sparse phase (unless
        the training returns a loaded checkpoint, ``returned``), the last records (histograms, the cycle's
        figure; in the final sparse phase the closing note and the door's export), and one line on the model
        the training returns: that checkpoint, or the last step's model, with the exact zeros its targets hold
        (counted on the model itself; a collective for sharded weights)."""
        self._completed = self.is_finished(now)
        self._last_now = max(self._last_now, now)
        if returned is None:
            self._warn_if_left_sparse(now)
        self._training_ended()
        self._report_returned_model(now, returned)

    def interrupted(self, now: int) -> None:
        """Training ended by an exception or an interrupt at ``now``: the left-sparse warning, if it applies."""
        self._warn_if_left_sparse(now)

    def _report_returned_model(self, now: int, returned: Optional[ReturnedCheckpoint]) -> None:
        targets = {name: param.detach() for name, param in self.targets.items()}
        zeros = sum(count_zeros(targets).values())
        total = sum(param.numel() for param in targets.values())
        held = f"its {len(targets)} targeted tensors hold {zeros} exact zeros of {total} weights"
        unit = self.options.interval
        returner = self.terms.returner
        if returned is None:
            log.info(f"{self.owner}: {returner} returns the model of the last step ({unit} {now}), in the"
                     f" {self.phase_label} phase of cycle {self.cycle}; {held}.")
            return
        message = (f"{self.owner}: {returner} returns its best checkpoint ({returned.loaded_by}), {returned.path},"
                   f" saved {returned.saved_in}; {held}. DSD's schedule itself stopped at {unit} {now} in the"
                   f" {self.phase_label} phase of cycle {self.cycle}.")
        if returned.in_last_phase:
            log.info(message)
        else:
            log.warn(f"{message} This model is not DSD's result, a model of its last phase: {returned.remedy}.")

    def _check_optimizers(self, optimizers: Sequence[Optimizer], every_one_must_own_a_target: bool) -> None:
        """Before training: where the user named the optimizers for DSD, refuse one that updates none of the
        targets (usually one built for another copy of the model); warn about trainable targets that no
        optimizer updates yet (they stay dense unless one owns them at a transition, see :meth:`pruned_now`)."""
        for index, optimizer in enumerate(optimizers):
            if every_one_must_own_a_target and not _owned_by([optimizer]) & {id(p) for p in self.targets.values()}:
                raise ValueError(
                    f"{self.owner} was given optimizer {index} ({type(optimizer).__name__}), which updates none of"
                    f" the {len(self.targets)} weights DSD prunes ({shortened(list(self.targets), quoted=True)})."
                    " Build the optimizer from this model's parameters (after `fabric.setup(model)` or `fully_shard`,"
                    " which replace them) and pass it, or leave it out."
                )
        for index, optimizer in enumerate(optimizers):
            for number, group in enumerate(optimizer.param_groups):
                lr = group.get("lr")
                if not isinstance(lr, (int, float, Tensor)) or isinstance(lr, bool):
                    raise ValueError(
                        f"{self.owner} reads and scales every learning rate (x{self.options.lr_scale:g} at each"
                        f" re-dense), but param group {number} of optimizer {index} ({type(optimizer).__name__}) has"
                        f" lr={lr!r}: it computes its own step size (e.g. Adafactor with `relative_step=True`), which"
                        " DSD cannot scale. Give it an explicit learning rate (for Adafactor: `lr=1e-3,"
                        " relative_step=False, scale_parameter=False`)."
                    )
        owned = _owned_by(optimizers)
        orphans = [name for name, p in self.targets.items() if p.requires_grad and id(p) not in owned]
        if orphans:
            log.warn(
                f"{self.owner}: no optimizer updates {shortened(orphans, quoted=True)} yet. A target that no"
                " optimizer owns (or that is frozen) when a sparse phase begins stays dense for that cycle, and the"
                " transition note says so; one added later (`optimizer.add_param_group`, BackboneFinetuning) is"
                " pruned from the next transition on. An optimizer built before `fully_shard` or `fabric.setup`"
                " holds the old parameters: build it from the model's current ones."
            )

    def pruned_now(self) -> tuple[list[str], dict[str, str]]:
        """The targets a sparse phase starting now prunes, and why each other target stays dense; rank zero's
        answer on every rank, so all ranks prune alike. A target is pruned when it trains (``requires_grad``),
        one of the optimizers updates it, and magnitude can rank its entries: one whose entries all have the
        same magnitude (see :func:`~lightning_dsd.rules.plan.same_magnitude`; a zero-initialised ``lora_B`` before
        any step) would be pruned by index order, so it stays dense for this cycle, with a warning.
        Refuses non-finite weights first (:func:`~lightning_dsd.rules.plan.check_finite`). A collective for sharded
        weights (counts and one all-reduce of magnitude ranges, nothing gathered)."""
        owned = _owned_by(self.training.optimizers)
        left_dense = {
            name: "frozen" if not param.requires_grad else "no optimizer updates it"
            for name, param in self.targets.items()
            if not param.requires_grad or id(param) not in owned
        }
        candidates = {name: param for name, param in self.targets.items() if name not in left_dense}
        check_finite(candidates, self.owner)
        if self.options.importance == "magnitude":  # another criterion's scores are checked alike (`_prune`)
            for name, magnitude in same_magnitude(candidates).items():
                left_dense[name] = f"{SAME_MAGNITUDE} {magnitude:g}"
        pruned = [name for name in self.targets if name not in left_dense]
        return from_rank_zero((pruned, left_dense))

    @property
    def _trainable_targets(self) -> dict[str, nn.Parameter]:
        """The targets that train now (``requires_grad``): what the sparsity scalars show."""
        return {name: param for name, param in self.targets.items() if param.requires_grad}

    @property
    def _histogram_targets(self) -> dict[str, nn.Parameter]:
        """The trainable targets that ``histogram_layers`` picks: what the histograms and figures show."""
        patterns = self.options.histogram_layers
        trainable = self._trainable_targets.items()
        return {name: p for name, p in trainable if patterns is None or matches_any(name, patterns)}

    def _warn_about_unmatched_patterns(self, model: nn.Module) -> None:
        options = self.options
        every_name = [name for name, _ in model.named_parameters(remove_duplicate=False)]
        figure_patterns = None if isinstance(options.figure_layers, int) else options.figure_layers
        targets = list(self.targets)
        messages = [
            *unmatched_patterns("include", options.include, every_name),
            *unmatched_patterns("exclude", options.exclude, every_name),
            *unmatched_patterns("layer_sparsity", list(options.layer_sparsity or ()), targets),
            *unmatched_patterns("histogram_layers", options.histogram_layers, targets),
            *unmatched_patterns("figure_layers", figure_patterns, targets),
        ]
        for message in messages:
            log.warn(f"{self.owner}: {message} Check the pattern against `model.named_parameters()`.")

    # ------------------------------------------------------------------ the schedule

    def advance_if_due(self, now: int) -> None:
        """Make every transition due at ``now`` (elapsed epochs or optimizer steps since training began), one
        after the other.

        Each transition happens whole or not at all: what can refuse it (the masks, from non-finite weights) is
        decided before its weights or learning rates change, and a report that fails to be written is warned
        about, not raised, so it cannot leave a phase that says "sparse" without its masks. A refused transition
        leaves the schedule where the transitions before it, in the same call, left it (a re-dense that was made
        stays made, with its learning-rate change, and is not made again): the next call tries the refused one
        again."""
        self._last_now = max(self._last_now, now)
        try:
            while self.schedule.is_due(now):
                before, due_scalars = self.schedule.state_dict(), self._due_scalars
                try:
                    self._transition(now)
                except Exception:
                    self.schedule.load_state_dict(before)
                    self._due_scalars = due_scalars
                    raise
        finally:
            self.update_window(now)
            self._log_due_scalars()

    # ------------------------------------------------------------------ the gradient window of `importance`

    def window_is_due(self, now: int) -> bool:
        """Whether ``importance``'s gradient window is open at ``now``: a criterion other than magnitude prunes,
        the next stage is a sparse phase, and ``now`` is within ``importance_steps`` optimizer steps of it
        (``interval="step"``) or in the last epoch before it (``interval="epoch"``, whose first
        ``importance_steps`` optimizer steps are counted)."""
        options, schedule = self.options, self.schedule
        if options.importance == "magnitude" or not options.prune or schedule.is_last:
            return False
        length = schedule.stage.length
        if schedule.stages[schedule.index + 1].phase is not Phase.SPARSE or length is None:
            return False
        end = schedule.started_at + length
        return end - (options.importance_steps if options.interval == "step" else 1) <= now < end

    def update_window(self, now: int) -> None:
        """Open the gradient window (hook the optimizers' steps) when it is due at ``now``; otherwise close it
        and let its statistics go. Outside the window no hook exists."""
        if self.window_is_due(now):
            if self._window is None:
                limit = self.options.importance_steps if self.options.interval == "epoch" else None
                self._window = GradientWindow(self.targets, limit)
            self._window.attach([unwrapped_optimizer(o) for o in self.training.optimizers])
        elif self._window is not None:
            self._window.detach()
            self._window = None

    def _scores(self, pruning: Mapping[str, Tensor]) -> Optional[dict[str, Tensor]]:
        """The scores of ``importance`` for the weights a transition prunes (``None`` for magnitude); each of
        them has steps in the window (see :meth:`_unwindowed`)."""
        importance = self.options.importance
        if importance == "magnitude" or not pruning:
            return None
        assert self._window is not None
        return importance_scores(importance, pruning, self._window, self.owner)

    def _unwindowed(self, pruning: Mapping[str, Tensor]) -> list[str]:
        """The targets a gradient criterion cannot rank at this transition: its window counted no optimizer step
        of them (trained only since the window ended, such as a backbone unfrozen at the transition, or a run that
        joined or resumed after the window had begun, without its statistics)."""
        if self.options.importance == "magnitude":
            return []
        counted = self._window.counts if self._window is not None else {}
        return [name for name in pruning if not counted.get(name)]

    @property
    def window_steps(self) -> dict[str, int]:
        """The optimizer steps the open gradient window has counted, per target (empty when it is closed)."""
        return dict(self._window.counts) if self._window is not None else {}

    def _transition(self, now: int) -> None:
        """The one transition due now: into a sparse phase (prune) or out of one (re-dense)."""
        finished = self.schedule.stage
        if finished.phase is Phase.SPARSE:
            self._record(Moment.END_OF_SPARSE, finished.cycle)
            self.training.sparse_phase_ending(finished.cycle, self.targets)
        upcoming = self.schedule.stages[self.schedule.index + 1]
        if upcoming.phase is Phase.SPARSE:
            self._prune(upcoming, now)
        else:
            self.schedule.advance(now)
            self._redense(finished)

    def _join(self, now: int, why: str) -> None:
        """Start the schedule at ``now`` rather than 0: DSD joins a run that has already trained (``why``), and
        its phase lengths count from there. Said in one line."""
        self.schedule.join(now)
        spans, start, unit = [], now, self.options.interval
        for stage in self.schedule.stages:
            if stage.length is None:
                spans.append(f"{stage.phase.value} until `{self.options.monitor}` converges")
                break
            spans.append(f"{stage.phase.value} {unit}s {start}-{start + stage.length - 1}")
            start += stage.length
        log.info(f"{self.owner} joins this run at {unit} {now} ({why}), and its phases count from there:"
                       f" {', '.join(spans)}.")

    def _warn_if_left_sparse(self, now: int) -> None:
        """Say so when training stops inside a sparse phase (early stopping, a time limit, an interrupt): the
        model holds its pruned zeros and was not re-densed, and how to finish, in the door's terms.
        Nothing is said in the final sparse phase (``final_sparse_epochs``): there the run ends sparse by design."""
        if self.phase is not Phase.SPARSE or self.schedule.in_final_sparse_phase:
            return
        length, unit = self.schedule.stage.length, self.options.interval
        planned = "" if length is None else f", planned to end at {unit} {self.schedule.started_at + length}"
        log.warn(
            f"Training stopped in the sparse phase of cycle {self.cycle} (at {unit} {now}{planned}): the model holds"
            f" the pruned zeros ({len(self.masks)} pruned tensors) and was not re-densed. To finish DSD,"
            f" {self.terms.resume} from a checkpoint of this run; the sparse model as it is can be used as such."
        )

    def _check_metric_source(self, source: MetricSource) -> None:
        """Before training, when a phase runs until ``monitor`` converges: where the door can tell that the metric
        is never computed (see :class:`MetricSource`), refuse (it is certain: a phase would never end) or warn (the
        metric may still come from elsewhere). The same words in every door; a door whose metric comes with each
        check (``DSD.step(metric)``) has nothing to check here."""
        if source.measured or not self.options.waits_for_metric:
            return
        waiting = ", ".join(f"`{name}`" for name in self.options.waiting_lengths)
        message = (f"{self.owner}: {waiting} = None runs a phase until `monitor={self.options.monitor!r}` converges,"
                   f" but {source.found}. {source.remedy}")
        if source.refuse:
            raise ValueError(message)
        log.warn(message)

    def observe_monitor(self, metrics: Mapping[str, Any], source: str, remedy: str) -> None:
        """One check of ``monitor`` among a door's ``metrics`` (``source`` names them), when some phase runs until
        it converges; nothing is read otherwise. A missing metric raises, listing ``metrics`` and ``remedy``."""
        monitor = self.options.monitor
        if monitor is None or not self.options.waits_for_metric:
            return
        value = metrics.get(monitor)
        if value is None:
            raise RuntimeError(f"{self.owner}'s `monitor={monitor!r}` is not among {source} {sorted(metrics)}."
                               f" {remedy}")
        self.observe(float(value))

    def observe(self, value: Optional[float]) -> bool:
        """One check of the monitored metric: every rank takes rank zero's value (see
        :func:`~lightning_dsd.rules.sharding.from_rank_zero`), so that every rank moves alike. Return whether rank
        zero had one (``None``: no value this time)."""
        shared = from_rank_zero(value)
        if shared is not None:
            self.schedule.observe(float(shared))
        return shared is not None

    # ------------------------------------------------------------------ transitions

    def _prune(self, stage: Stage, now: int) -> None:
        if stage.cycle > 0:
            self._record(Moment.END_OF_REDENSE, stage.cycle - 1)
            self._draw_figure(stage.cycle - 1)
        self._record(Moment.END_OF_DENSE, stage.cycle)
        if not self.options.prune:
            self._enter_sparse_phase_unpruned(stage, now)
            return
        names, left_dense = self.pruned_now()
        pruning = {name: self.targets[name] for name in names}
        for name in self._unwindowed(pruning):
            left_dense[name] = NO_WINDOW
            del pruning[name]
        scores = self._scores(pruning)
        if scores is not None:  # entries a criterion scores alike cannot be ranked (the same on every rank)
            for name, score in same_magnitude(scores, absolute=False).items():
                left_dense[name] = f"{SAME_SCORE} {score:g}"
                del pruning[name], scores[name]
        if stage.cycle == 0:
            log.info(self.selection.summary(left_dense))
            if self.options.layer_sparsity:
                log.info(f"DSD sparsity per parameter, one value per cycle: {self.layer_sparsities}")
        self._warn_about_unranked(stage.cycle, left_dense)
        self._left_dense = left_dense
        steps = max(self.window_steps.values(), default=0)
        assert self.plan is not None, "a transition before bind"
        masks = self.plan.decide(pruning, stage.cycle, scores) if pruning else {}
        self.schedule.advance(now)
        self.update_window(now)  # the statistics have served: let them go
        self._enforce(masks)
        self._record(Moment.AFTER_PRUNING, stage.cycle)
        learning_rates = current_learning_rates(self.training.optimizers)
        self._log_scalars(learning_rates)
        pruned = pruned_per_tensor(masks, pruning)
        total, pruned_sum = sum(p.numel() for p in pruning.values()), sum(pruned.values())
        final = self.schedule.in_final_sparse_phase
        until = "to the end of training, which ends sparse" if final else "for this phase"
        text = (
            f"DSD cycle {stage.cycle}: {'final ' if final else ''}sparse phase. Pruned {pruned_sum}/{total} weights"
            f" ({pruned_sum / max(total, 1):.1%}) in {len(masks)} tensors, scope={self.options.scope!r},"
            f" {self._criterion_note(steps)}; the masks stay fixed {until}. Learning rate unchanged:"
            f" {_format_lrs(learning_rates)}."
        )
        whole = [name for name, count in pruned.items() if count and count == self.targets[name].numel()]
        if whole:
            text += f" Pruned whole (every entry): {', '.join(whole)}."
        if left_dense:
            listed = ", ".join(f"{name} ({reason})" for name, reason in left_dense.items())
            text += f" Left dense in this cycle: {listed}."
            unranked = (SAME_MAGNITUDE, SAME_SCORE, NO_WINDOW)  # (targets the criterion cannot rank: own warning)
            untrained = [name for name, reason in left_dense.items() if not reason.startswith(unranked)]
            if not masks and untrained:
                log.warn(
                    f"DSD cycle {stage.cycle}: nothing was pruned: every target is frozen or updated by no optimizer"
                    f" ({shortened(untrained, quoted=True)}). Check that the optimizers DSD was given train this model."
                )
        text += self._disconnected_note(masks)
        self._note(text)

    def _warn_about_unranked(self, cycle: int, left_dense: Mapping[str, str]) -> None:
        """Warn about the targets left dense because the criterion cannot rank their entries (no gradient
        statistics, or all equal), one warning per reason."""
        criterion = f"`importance={criterion_name(self.options.importance)}`"
        why = {
            NO_WINDOW: f"{criterion} ranks by the squared gradients of the window before the transition, and it"
            " counted no optimizer step of them (they began training after it, as a backbone unfrozen at the"
            " transition does, or the run joined or resumed after the window had begun, without its statistics)."
            " They are pruned from the next transition at which they have trained through its window.",
            SAME_MAGNITUDE: "in each, every weight has the same magnitude, so magnitude cannot rank them and pruning"
            " would cut by position (index order). This is a layer that has not trained yet from a zero (or"
            " constant) init, such as LoRA's `lora_B` with `dense_epochs=0`. Train a dense phase first"
            " (`dense_epochs` >= 1) to prune it from this cycle on, or `exclude` it to keep it dense on purpose.",
            SAME_SCORE: f"in each, every weight has the same score under {criterion} (compared in float32), so it"
            " cannot rank them and pruning would cut by position (index order). With 'obd' this is a layer whose"
            " gradient was zero throughout the window (a unit that never fires, an expert no token was routed"
            " to); with a callable, scores that do not depend on the weight. `exclude` it, or rank it by"
            " magnitude.",
        }
        for reason, explanation in why.items():
            names = [name for name, given in left_dense.items() if given.startswith(reason)]
            if names:
                log.warn(f"DSD cycle {cycle}: left {shortened(names, quoted=True)} dense in this sparse phase:"
                               f" {explanation}")

    def _criterion_note(self, steps: int) -> str:
        """Which criterion chose the masks, as the transition note says it."""
        importance = self.options.importance
        if importance == "magnitude":
            return "lowest |w| pruned (importance='magnitude')"
        what = "OBD saliency ½·h·w²" if importance == "obd" else f"scores of {criterion_name(importance)}"
        return (f"lowest {what} pruned (importance={criterion_name(importance)!r}; h, the mean squared gradient, over"
                f" {steps} optimizer steps)")

    def _enter_sparse_phase_unpruned(self, stage: Stage, now: int) -> None:
        """The LLR control (``prune=False``): the sparse phase starts on DSD's clock and nothing is pruned, so no
        weight, gradient or optimizer state is touched."""
        self.schedule.advance(now)
        self._record(Moment.AFTER_PRUNING, stage.cycle)
        learning_rates = current_learning_rates(self.training.optimizers)
        self._log_scalars(learning_rates)
        self._note(
            f"DSD cycle {stage.cycle}: sparse phase of the LLR control (prune=False): nothing is pruned, the weights"
            f" train on as they are. Learning rate unchanged: {_format_lrs(learning_rates)}."
        )

    def _disconnected_note(self, masks: Mapping[str, Tensor]) -> str:
        """Per tensor, the output units the masks cut off from every input (a collective for sharded weights:
        each mask is gathered whole in turn); a warning when that is a large share of a tensor's units."""
        found = []
        for name, local in masks.items():
            param = self.targets[name]
            cut, units = disconnected_units(full_mask(local, param), self.selection.input_dims.get(name, 1))
            if cut:
                found.append((name, cut, units))
        if not found:
            return ""
        listed = ", ".join(f"{name} {cut}/{units}" for name, cut, units in found)
        large = [f"{name} ({cut}/{units})" for name, cut, units in found if cut >= DISCONNECTED_WARNING_SHARE * units]
        if large:
            log.warn(
                f"DSD cycle {self.cycle}: pruning cut {', '.join(large)} output units off from every input, so"
                " they compute only their bias until re-dense. A small tensor that feeds the whole network (an"
                " RNN's `weight_ih` reading one feature, a first layer) is best left dense: `exclude` it, or give"
                " it a lower `layer_sparsity`."
            )
        return f" Output units cut off from every input: {listed}."

    def _enforce(self, masks: Mapping[str, Tensor]) -> None:
        """Start enforcing ``masks`` (this rank's parts): zero the pruned weights, their gradients and optimizer
        state, hook the optimizers, and drop FSDP2's gathered copies of the changed weights."""
        self.release()
        self._constraint = SparseConstraint(self.targets, masks, self.options.mask_storage)
        self._constraint.attach(self.training.optimizers)
        self._restored_masks = None
        self._weights_changed()

    def _check_restored(self, now: int) -> None:
        """Refuse a restored state that contradicts the checkpoint's own clock and weights (``now``: where the
        training resumes from the same checkpoint): a phase begun after ``now``, or masks that prune weights the
        restored model holds as non-zero (the state of another run, or damaged). A collective for sharded
        weights."""
        self._check_started_by(self.schedule.started_at, now)
        live = self._pruned_but_nonzero()
        if live:
            listed = ", ".join(f"`{name}`: {count}" for name, count in live.items())
            raise CheckpointStateError(
                f"its masks prune weights that the checkpoint's model holds as non-zero ({listed}), while a sparse"
                " phase keeps every pruned weight at exactly zero: the DSD state and the weights come from different"
                " runs, or one of them is damaged"
            )

    def _check_started_by(self, started_at: int, now: int) -> None:
        """Refuse a restored phase that begins after ``now``, where the training resumes from the checkpoint."""
        unit = self.options.interval
        if started_at > now:
            raise CheckpointStateError(f"its `schedule.started_at` is {unit} {started_at}, after {unit} {now}, where"
                                       " the training resumes from the same checkpoint")

    @torch.no_grad()
    def _pruned_but_nonzero(self) -> dict[str, int]:
        """In a sparse phase restored from a checkpoint, before its masks are enforced: how many entries each
        mask prunes whose weight is not zero (a collective for sharded weights). A consistent checkpoint has
        none: the sparse phase kept every pruned weight at exactly zero."""
        masks = self._restored_masks
        if self.phase is not Phase.SPARSE or not masks:
            return {}
        weights = {name: self.targets[name] for name in masks}
        def live(name: str, entries: Tensor) -> Tensor:
            return ((entries != 0) & ~masks[name].to(entries.device)).sum()

        counts = counts_over_ranks(weights, live)
        return {name: count for name, count in zip(weights, counts.tolist(), strict=True) if count}

    def _resume_sparse_phase(self) -> None:
        """At the start of training in a sparse phase (a resume): enforce the restored masks."""
        if self.phase is Phase.SPARSE and self.options.prune:
            self._enforce(self._restored_masks if self._restored_masks is not None else self.masks)

    def _redense(self, finished: Stage) -> None:
        restarted = 0
        zeroed: list[str] = []
        kept: list[str] = []
        if self._constraint is not None:
            keep = self._constraint.keep_masks()
            zeroed, kept = self._constraint.zero_optimizer_state(self.training.optimizers)
            if self.options.redense_state == "all":
                restarted = restart_optimizer_state(self.training.optimizers, self._constraint.params)
            self._constraint.detach()
            self._constraint = None
            self._left_dense = {}
            seed = self.options.seed + finished.cycle
            reinitialize_pruned(self.targets, keep, self.options.redense_init, seed=seed)
            self._weights_changed()
        optimizers = self.training.optimizers
        before = current_learning_rates(optimizers)
        scale_learning_rates(optimizers, self.training.schedulers, self.options.lr_scale)
        after = current_learning_rates(optimizers)
        self._watch_rates(before, after)
        restart = "zero" if self.options.redense_init == "zero" else "small noise"
        if not self.options.prune:
            self._note(
                f"DSD cycle {finished.cycle}: re-dense phase of the LLR control (prune=False): no weight was pruned;"
                f" learning rate x{self.options.lr_scale:g}: {_format_lrs(before)} -> {_format_lrs(after)}."
            )
        else:
            state = ("the whole optimizer state of the pruned tensors restarts (moments and step counts;"
                     f" {restarted} tensors)" if self.options.redense_state == "all"
                     else _state_restart(zeroed, kept))
            self._note(
                f"DSD cycle {finished.cycle}: re-dense phase. The constraint is lifted and pruned weights restart"
                f" from {restart}; {state}; learning rate x{self.options.lr_scale:g}: {_format_lrs(before)} ->"
                f" {_format_lrs(after)}."
            )
        self._record(Moment.START_OF_REDENSE, finished.cycle)
        self._log_scalars(after)

    def _watch_rates(self, before: list[list[float]], after: list[list[float]]) -> None:
        """Watch the first steps of re-dense for a scheduler DSD does not know putting the rate back (see
        :class:`~lightning_dsd.rules.lr.RateWatch`); a warning then, once."""
        self._stop_watching_rates()
        unknown = [type(unwrapped_scheduler(s)).__name__ for s in self.training.schedulers if not is_known_scheduler(s)]
        if unknown and self.options.lr_scale != 1:  # said now: the watch only sees the first steps of re-dense
            log.warn(
                f"{self.owner}: re-dense multiplied every learning rate by {self.options.lr_scale:g}, and the"
                " learning-rate state of the schedulers DSD knows (torch's, timm's, BackboneFinetuning); it does"
                f" not know {', '.join(unknown)}. If one computes the rate from learning-rate state of its own, its"
                " next step puts the rate back, and re-dense trains at the old rate. Use a torch or timm scheduler,"
                f" or multiply its learning-rate state by {self.options.lr_scale:g} at re-dense yourself."
            )
        if self.options.lr_scale != 1 and before != after:
            last_step = 2 if self.options.interval == "step" else None  # else: the first step after an epoch end
            self._rate_watch = RateWatch(self.training.optimizers, before, after, self.options.lr_scale,
                                         self.training.schedulers, lambda text: log.warn(f"{self.owner}: {text}"),
                                         last_step)

    def _stop_watching_rates(self) -> None:
        if self._rate_watch is not None:
            self._rate_watch.stop()
            self._rate_watch = None

    def _weights_changed(self) -> None:
        if self._model is not None:
            reshard_gathered(self._model)

    # ------------------------------------------------------------------ the sparse phase, step by step

    def mask_gradients(self, optimizer: Any, already_masked: bool = False) -> None:
        """Zero the pruned entries' gradients before ``optimizer`` steps (after backward and unscaling), or, with
        ``already_masked``, note that the door's gradient hooks did (see :meth:`SparseConstraint.mask_gradients`)."""
        if self._constraint is not None:
            self._constraint.mask_gradients(unwrapped_optimizer(optimizer), already_masked)

    def forget_masked_gradients(self) -> None:
        """A new batch: its gradients are not masked yet."""
        if self._constraint is not None:
            self._constraint.forget_masked_gradients()

    def release(self) -> None:
        """Remove the optimizer hooks (the masks are kept for :attr:`masks` and checkpoints; the gradient window's
        statistics too, and its hooks come back at the next :meth:`update_window`)."""
        self._stop_watching_rates()
        if self._constraint is not None:
            self._constraint.detach()
        if self._window is not None:
            self._window.detach()

    # ------------------------------------------------------------------ reporting

    def _report(self, write: Callable[[ReportSink], Any]) -> None:
        """Run one report on the sink, if any. A report that fails (a full disk, a closed writer) is warned
        about and training goes on: every rank has finished the report's gathers by then (see
        :mod:`lightning_dsd.rules.reporting`), and DSD's own state is never left half-changed by a log."""
        if self._sink is None:
            return
        try:
            write(self._sink)
        except Exception as error:  # a log must not stop training nor corrupt a transition
            log.warn(f"{self.owner} could not write a report ({type(error).__name__}: {error}); training and"
                           " DSD go on, the report is missing.")

    def _record(self, moment: Moment, cycle: int) -> None:
        self._report(lambda sink: self.reporter.record(sink, moment, cycle, self._histogram_targets))

    def _draw_figure(self, cycle: int) -> None:
        self._report(lambda sink: self.reporter.draw_figure(sink, cycle))

    def _note(self, text: str) -> None:
        if self._sink is None:
            log.info(text)
        self._report(lambda sink: self.reporter.note_transition(sink, text))

    def _log_scalars(self, learning_rates: Optional[list[list[float]]] = None) -> None:
        """Make the scalars of now (after this transition or epoch end) the step's: logged once, by
        :meth:`_log_due_scalars`, so a step with an epoch end and transitions gets one value, the last."""
        lrs = learning_rates if learning_rates is not None else current_learning_rates(self.training.optimizers)
        self._due_scalars = (self._trainable_targets, lrs)

    def flush_scalars(self) -> None:
        """Log the scalars held for this step now: for a door that knows no transition follows at this step and
        whose loggers may close before :meth:`_training_ended` (the ``transformers`` integrations end their runs
        at ``on_train_end``, before a user's callback)."""
        self._log_due_scalars()

    def _log_due_scalars(self) -> None:
        if self._due_scalars is not None:
            weights, lrs = self._due_scalars
            self._due_scalars = None
            self._report(lambda sink: self.reporter.log_scalars(sink, self.phase, self.cycle, weights, lrs))

    def _start_reporting(self) -> None:
        """Before the first step: the run's record (see :meth:`_run_record`) and the TensorBoard chart layout."""
        self._report(lambda sink: self.reporter.write_run_record(sink, self._run_record()))
        self._report(self.reporter.write_chart_layout)

    def _run_record(self) -> dict[str, Any]:
        """What :mod:`lightning_dsd.tools.compare` reads from the log: the arm (``"dsd"``, ``"llr"`` or ``"dense"``,
        from the options), the seed (see :func:`~lightning_dsd.rules.reporting.current_seed`), the schedule and every
        option."""
        config = self._run_config()
        return {"arm": self.options.arm, "seed": current_seed(), "lightning_dsd": __version__,
                "schedule": {"interval": config.interval, "stages": config.stages}, "options": self.options.as_record()}

    def epoch_ended(self, epoch: int) -> None:
        """At the end of epoch ``epoch`` (0-based): scalars (logged at the door's next :meth:`advance_if_due`,
        at the same step, unless a transition there replaces them), and the histogram timeline when it is due."""
        self._log_scalars()
        if self._rate_watch is not None:
            self._rate_watch.epoch_ended()
        every = self.options.histogram_every_n_epochs
        if every and (epoch + 1) % every == 0:
            self._report(lambda sink: self.reporter.log_timeline(sink, self._histogram_targets))

    def _training_ended(self) -> None:
        """The last look: the histograms of the moment training stopped at, and the cycle's figure. In the final
        sparse phase (the run ends sparse) also the closing note and the door's sparse export."""
        self.release()
        self._log_due_scalars()
        final_moment = {Phase.DENSE: Moment.END_OF_DENSE, Phase.SPARSE: Moment.END_OF_SPARSE}
        self._record(final_moment.get(self.phase, Moment.END_OF_REDENSE), self.cycle)
        if self.schedule.in_final_sparse_phase:
            masks = self.masks
            pruned = sum(pruned_per_tensor(masks, {name: self.targets[name] for name in masks}).values())
            self._note(f"DSD cycle {self.cycle}: training ended in the final sparse phase, as planned: the model holds"
                       f" {pruned} pruned zeros in {len(masks)} tensors; it is the run's sparse model.")
            self.training.sparse_phase_ending(self.cycle, self.targets)
        if self.phase is not Phase.DENSE:
            self._draw_figure(self.cycle)

    # ------------------------------------------------------------------ checkpointing

    def state_dict(self) -> dict[str, Any]:
        """The schedule and, in a sparse phase, the full masks at 1 bit per weight (a sharded weight's mask is
        gathered from its shards, one tensor at a time, on every rank), so a resume works on any mesh."""
        sparse = self.phase is Phase.SPARSE
        masks = FullMasks(self.masks, self.targets) if sparse else {}
        window = self._window.state_dict() if self._window is not None and self._window.counts else None
        return encode_state(self.schedule.state_dict(), masks, self._run_config(), self._left_dense if sparse else {},
                            window)

    def load_state_dict(self, state: Any, now: Optional[int] = None) -> None:
        """Check a saved DSD state against this run (see :mod:`lightning_dsd.rules.state`), then take it; a damaged
        or mismatched state raises before anything changes. Without ``now`` (a Trainer restores its callbacks
        before training begins) it is checked against the checkpoint's clock and weights at the next
        :meth:`start`, where a sparse phase's masks apply. With ``now``, the count it resumes at (a loop restoring
        its state mid-run), it is checked against that count and a sparse phase's masks apply at once (not against
        the weights, which a loop may load after DSD's state: the masks zero what they prune either way)."""
        self._load(state, now)
        self._restored = now is None
        if now is not None:
            self._resume_sparse_phase()
            self.update_window(now)

    def _load(self, state: Any, now: Optional[int]) -> None:
        shapes = {name: list(param.shape) for name, param in self.targets.items()}

        def check_masks(masks: Mapping[str, Tensor], cycle: int, left_dense: Mapping[str, str]) -> None:
            pruned = {name: param for name, param in self.targets.items() if name not in left_dense}
            assert self.plan is not None, "load_state_dict before bind"
            self.plan.check_masks(pruned, masks, cycle)

        schedule, masks, left_dense, window = decode_state(state, self._run_config(), check_masks, shapes)
        if now is not None:  # checked against the count it resumes at before anything changes
            self._check_started_by(int(schedule["started_at"]), now)
        if self._constraint is not None:  # a sparse phase this run had started gives way to the saved one
            self._constraint.detach()
            self._constraint = None
        if self._window is not None:  # so does a gradient window this run had opened
            self._window.detach()
            self._window = None
        if window is not None:
            limit = self.options.importance_steps if self.options.interval == "epoch" else None
            self._window = GradientWindow(self.targets, limit)
            self._window.load_state_dict(window)
        self.schedule.load_state_dict(schedule)
        local_masks = {name: local_slice(mask, self.targets[name]) for name, mask in masks.items()}  # one at a time
        self._restored_masks = local_masks or None
        self._left_dense = left_dense

    def _run_config(self) -> RunConfig:
        sparsities = self.options.cycle_sparsities
        stages = [[s.phase.value, s.cycle, s.length, 0.0 if s.phase is Phase.DENSE else shown(sparsities[s.cycle])]
                  for s in self.schedule.stages]
        layer_sparsity = self.options.layer_sparsity
        shown_layers = {p: shown(s) for p, s in layer_sparsity.items()} if layer_sparsity else None
        return RunConfig(stages, self.options.interval, self.options.scope, shown_layers, list(self.targets),
                         self.options.prune, criterion_name(self.options.importance))


def _check_chosen(model: nn.Module, selection: Any, owner: str) -> None:
    """Refuse what a ``select_targets`` override returned when it is not a ``Selection`` of ``model``'s own
    parameters (by identity: a copy, or another model's, would be pruned without changing what this one
    computes)."""
    if not isinstance(selection, Selection):
        raise TypeError(f"{owner}.select_targets must return a lightning_dsd.rules.selection.Selection; it returned a"
                        f" {type(selection).__name__}. Build one with `Selection(selected={{name: parameter}})`, or"
                        " filter `super().select_targets(model)`.")
    own = {id(param) for param in model.parameters()}
    foreign = [name for name, param in selection.selected.items() if id(param) not in own]
    if foreign:
        raise ValueError(f"{owner}.select_targets chose {shortened(foreign, quoted=True)}, which are not parameters"
                         " of the model DSD trains (a copy, or another model's). Return the model's own parameters,"
                         " from `model.named_parameters()` of the model it is given.")


def _owned_by(optimizers: Sequence[Optimizer]) -> set[int]:
    """The identities of every parameter the ``optimizers`` update, in any param group."""
    return {id(p) for optimizer in optimizers for group in optimizer.param_groups for p in group["params"]}


def _state_restart(zeroed: Sequence[str], kept: Sequence[str]) -> str:
    """What re-dense did to the pruned entries' optimizer state (``redense_state="pruned"``), as
    :meth:`SparseConstraint.zero_optimizer_state` found it.

    Examples:
        >>> print(_state_restart(["exp_avg", "exp_avg_sq"], ["step"]))  # doctest: +ELLIPSIS
        their optimizer state: `exp_avg`, `exp_avg_sq` zeroed at the pruned entries; `step` kept (not one value ...
        >>> print(_state_restart([], ["exp_avg_sq_col", "exp_avg_sq_row", "step"]))  # doctest: +ELLIPSIS
        their optimizer state: no entry holds one value per weight, so none is zeroed at the pruned entries; ...
    """
    if not zeroed and not kept:
        return "their optimizer holds no state for them: nothing to restart"
    text = "their optimizer state: " + (f"{_named(zeroed)} zeroed at the pruned entries" if zeroed else
                                        "no entry holds one value per weight, so none is zeroed at the pruned entries")
    return text + (f"; {_named(kept)} kept (not one value per weight)" if kept else "")


def _named(names: Sequence[str]) -> str:
    return ", ".join(f"`{name}`" for name in names)


def _format_lrs(lrs: list[list[float]]) -> str:
    return ", ".join(f"{lr:.3g}" for group_lrs in lrs for lr in group_lrs)
