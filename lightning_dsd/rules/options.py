"""The options of a DSD run, declared once and checked once, whichever front door takes them.

:class:`DSDOptions` is the one declaration: each keyword option is a field with its default and its check.
The front doors (``DSDCallback``, ``DSD``, ``DSDTrainerCallback``) keep explicit signatures, which IDEs and
jsonargparse read, and hand their arguments to :func:`check_options` (:func:`door_options` picks them from
the door's ``locals()``); a test holds every door's defaults to the declaration's. Each message names the
argument, says what is allowed and shows what was passed (see :mod:`lightning_dsd.rules.arguments`). The meaning
of every option is written once, in :class:`~lightning_dsd.DSDCallback`'s docstring.

Examples:
    >>> options = check_options(0.5, 10, 10, 10)
    >>> options.sparsities, options.lengths, options.lr_scale
    ((0.5,), (10, 10, 10), 0.1)
    >>> check_options(0.5, None, 10, 10)  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    ...
    ValueError: `dense_epochs` = None runs a phase until a metric converges, so `monitor` must name ...
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields, is_dataclass
from typing import Any, Callable, Mapping, Optional, Sequence, Union

from typing_extensions import Annotated

from lightning_dsd.rules.arguments import (
    check_bool,
    check_choice,
    check_cycle_lengths,
    check_every_n,
    check_figure_layers,
    check_layer_sparsity,
    check_layer_types,
    check_length,
    check_non_negative_int,
    check_patterns,
    check_real,
    check_sparsities,
)
from lightning_dsd.rules.constraint import MASK_STORAGES
from lightning_dsd.rules.importance import Importance, check_importance, criterion_name
from lightning_dsd.rules.masks import NMPattern, Sparsity
from lightning_dsd.rules.phases import Phase, build_stages
from lightning_dsd.rules.plan import SCOPES, MaskPlan
from lightning_dsd.rules.redense import REDENSE_INITS, REDENSE_STATES
from lightning_dsd.rules.selection import LayerSpec, LayerType

INTERVALS = ("epoch", "step")
LENGTH_NAMES = ("dense_epochs", "sparse_epochs", "redense_epochs")

#: A cycle's phase length, or one per cycle.
CycleLengths = Union[Optional[int], tuple[Optional[int], ...]]
#: How a door's signature types ``sparse_epochs`` and ``redense_epochs``: one length, one per cycle, or ``None``.
#: ``Annotated`` keeps the union one type inside ``Optional``, which jsonargparse (and so ``LightningCLI``)
#: needs to read ``null`` as ``None`` for a required argument (from an evaluated signature: ``callback.py``
#: does not postpone its annotations); to type checkers it is the plain union.
LengthsArgument = Optional[Annotated[Union[int, Sequence[Optional[int]]], "one length, or one per cycle"]]


def _choice(*allowed: str) -> Callable[[str, Any], Any]:
    return lambda name, value: check_choice(name, value, allowed)


def _monitor(name: str, value: Any) -> Optional[str]:
    if value is not None and not (isinstance(value, str) and value):
        raise ValueError(f"`{name}` must be None or the name of a logged metric. Found: {value!r}.")
    return value


def _option(default: Any, check: Callable[[str, Any], Any]) -> Any:
    """A keyword option: its default and the check that turns what a user passed into its checked value."""
    return field(default=default, metadata={"check": check})


@dataclass(frozen=True)
class DSDOptions:
    """Everything that decides what DSD does, checked: the one declaration of every option that the front
    doors share (see :class:`~lightning_dsd.DSDCallback` for what each means). Each keyword option is a field
    with its default and its check; :func:`check_options` builds one from a door's arguments."""

    sparsities: tuple[Sparsity, ...]
    lengths: tuple[Optional[int], CycleLengths, CycleLengths]
    final_sparse_epochs: Optional[int] = _option(0, check_length)
    interval: str = _option("epoch", _choice(*INTERVALS))
    monitor: Optional[str] = _option(None, _monitor)
    mode: str = _option("min", _choice("min", "max"))
    patience: int = _option(3, check_non_negative_int)
    min_delta: float = _option(0.0, check_real)
    lr_scale: float = _option(0.1, lambda name, value: check_real(name, value, positive=True))
    include: Optional[tuple[str, ...]] = _option(None, check_patterns)
    exclude: Optional[tuple[str, ...]] = _option(None, check_patterns)
    layer_types: Optional[dict[LayerType, LayerSpec]] = _option(None, lambda _, value: check_layer_types(value))
    scope: str = _option("layer", _choice(*SCOPES))
    log_histograms: bool = _option(True, check_bool)
    histogram_every_n_epochs: Optional[int] = _option(None, check_every_n)
    histogram_layers: Optional[tuple[str, ...]] = _option(None, check_patterns)
    log_scalars: bool = _option(True, check_bool)
    figure_layers: Union[int, tuple[str, ...]] = _option(2, lambda _, value: check_figure_layers(value))
    layer_sparsity: Optional[dict[str, Sparsity]] = _option(None, lambda _, value: check_layer_sparsity(value))
    redense_init: str = _option("zero", _choice(*REDENSE_INITS))
    redense_state: str = _option("pruned", _choice(*REDENSE_STATES))
    seed: int = _option(0, check_non_negative_int)
    mask_storage: str = _option("weight_dtype", _choice(*MASK_STORAGES))
    prune: bool = _option(True, check_bool)
    importance: Importance = _option("magnitude", check_importance)
    importance_steps: int = _option(100, lambda name, value: check_non_negative_int(name, value, positive=True))

    @property
    def ends_sparse(self) -> bool:
        """Whether a final sparse phase follows the last re-dense (``final_sparse_epochs`` is not 0)."""
        return self.final_sparse_epochs != 0

    @property
    def cycle_sparsities(self) -> tuple[Sparsity, ...]:
        """The sparsity of every sparse phase, in order: one per cycle, then the last cycle's again for the final
        sparse phase (which the schedule numbers as cycle ``len(sparsities)``)."""
        return self.sparsities + (self.sparsities[-1:] if self.ends_sparse else ())

    def phase_lengths(self) -> dict[str, CycleLengths]:
        """Every length option by name, the final sparse phase's included."""
        return {**dict(zip(LENGTH_NAMES, self.lengths, strict=True)), "final_sparse_epochs": self.final_sparse_epochs}

    @property
    def waiting_lengths(self) -> list[str]:
        """The length options (by name) of which some phase runs until the monitored metric converges."""
        return _waiting(self.phase_lengths())

    @property
    def waits_for_metric(self) -> bool:
        """Whether some phase runs until the monitored metric converges (a length of ``None``)."""
        return bool(self.waiting_lengths)

    @property
    def arm(self) -> str:
        """What this run is in a comparison: ``"dsd"`` (it prunes by magnitude), ``"obd"`` or ``"custom"`` (it
        prunes by ``importance="obd"`` or by a callable), ``"llr"`` (the paper's control: the same clock and
        learning-rate drop, nothing pruned) or ``"dense"`` (``prune=False, lr_scale=1``: plain training).

        Examples:
            >>> [check_options(0.5, 1, 1, 1, **kw).arm for kw in ({}, {"importance": "obd"}, {"prune": False},
            ...                                                   {"prune": False, "lr_scale": 1.0})]
            ['dsd', 'obd', 'llr', 'dense']
        """
        if self.prune:
            return {"magnitude": "dsd", "obd": "obd"}.get(criterion_name(self.importance), "custom")
        return "dense" if self.lr_scale == 1 else "llr"

    def as_record(self) -> dict[str, Any]:
        """Every option as JSON-able values, as users write them (sparsities as floats or ``"N:M"``, layer types
        by their qualified names), for the run's record in its log.

        Examples:
            >>> record = check_options("2:4", 1, 1, 1).as_record()
            >>> record["sparsities"], record["lengths"], record["prune"]
            (['2:4'], [1, 1, 1], True)
        """
        return {f.name: _plain(getattr(self, f.name)) for f in fields(self)}


#: The keyword options, in declaration order, with their defaults: what every front door's signature offers.
KEYWORD_OPTIONS: dict[str, Any] = {f.name: f.default for f in fields(DSDOptions) if "check" in f.metadata}


def check_options(
    sparsity: Any,
    dense_epochs: Any,
    sparse_epochs: Any,
    redense_epochs: Any,
    *,
    monitor_required: bool = True,
    **keywords: Any,
) -> DSDOptions:
    """Check a front door's arguments against the declaration (:class:`DSDOptions`) and return them checked.
    ``keywords`` are the keyword options (a missing one takes its default); ``monitor_required=False`` when
    the metric comes another way (``DSD.step(metric)``)."""
    unknown = sorted(set(keywords) - set(KEYWORD_OPTIONS))
    if unknown:
        raise TypeError(f"Unknown DSD option(s) {unknown}. The options are: {list(KEYWORD_OPTIONS)}.")
    sparsities = check_sparsities(sparsity)
    lengths = (
        check_length("dense_epochs", dense_epochs),
        check_cycle_lengths("sparse_epochs", sparse_epochs, len(sparsities)),
        check_cycle_lengths("redense_epochs", redense_epochs, len(sparsities)),
    )
    checked = {
        f.name: f.metadata["check"](f.name, keywords.get(f.name, f.default))
        for f in fields(DSDOptions)
        if "check" in f.metadata
    }
    options = DSDOptions(sparsities=sparsities, lengths=lengths, **checked)
    waiting = _waiting(options.phase_lengths())
    if waiting and options.monitor is None and monitor_required:
        raise ValueError(
            f"{', '.join(f'`{n}`' for n in waiting)} = None runs a phase until a metric converges, so"
            " `monitor` must name a logged metric (e.g. monitor='val_loss'). Found: monitor=None."
        )
    MaskPlan(options.cycle_sparsities, options.scope, options.layer_sparsity)  # what the plan refuses (global scope)
    _check_window(options)
    return options


def _check_window(options: DSDOptions) -> None:
    """Refuse a gradient criterion whose window cannot be placed: it opens ``importance_steps`` before a
    transition to a sparse phase, which a phase that runs until a metric converges does not announce."""
    if options.importance == "magnitude" or not options.prune:
        return
    stages = build_stages(len(options.sparsities), *options.lengths, final=options.final_sparse_epochs)
    before_sparse = [before for before, after in zip(stages, stages[1:], strict=False) if after.phase is Phase.SPARSE]
    empty = [f"the {before.phase.value} phase of cycle {before.cycle}" for before in before_sparse
             if before.length == 0]
    if empty:
        raise ValueError(
            f"`importance={criterion_name(options.importance)}` reads the gradients of the optimizer steps just before"
            f" each sparse phase, but {', '.join(empty)} has length 0, so the window holds no step. Train at least"
            " one epoch (or step) before pruning, or use importance='magnitude'."
        )
    waiting = [f"the {before.phase.value} phase of cycle {before.cycle}" for before in before_sparse
               if before.length is None]
    if waiting:
        raise ValueError(
            f"`importance={criterion_name(options.importance)}` reads the gradients of a window of"
            f" `importance_steps` optimizer steps just before each sparse phase, but {', '.join(waiting)} runs until"
            " `monitor` converges, so its end (and the window's start) is not known in advance. Give the phases"
            " before a sparse phase fixed lengths, or use importance='magnitude'."
        )


def _plain(value: Any) -> Any:
    """``value`` as JSON-able data: tuples as lists, N:M patterns and classes as text, dataclasses as dicts."""
    if isinstance(value, NMPattern):
        return str(value)
    if isinstance(value, type):
        return f"{value.__module__}.{value.__qualname__}"
    if callable(value):
        return criterion_name(value)
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, Mapping):
        return {str(_plain(k)): _plain(v) for k, v in value.items()}
    if is_dataclass(value):
        return {f.name: _plain(getattr(value, f.name)) for f in fields(value)}
    return value


def _waiting(lengths: Mapping[str, CycleLengths]) -> list[str]:
    """The length options (by name) of which some phase runs until the metric converges."""
    return [name for name, length in lengths.items()
            if length is None or (isinstance(length, tuple) and None in length)]


def door_options(arguments: Mapping[str, Any]) -> dict[str, Any]:
    """The keyword options among a front door's arguments (``locals()`` at the top of its ``__init__``), so that
    a door hands them on without writing each one again."""
    return {name: arguments[name] for name in KEYWORD_OPTIONS if name in arguments}


class ReadsOptions:
    """Every checked option as a read-only attribute of a front door, named as its keyword (``dsd.scope``,
    ``dsd.lr_scale``, ...), and the positional ones as ``dsd.sparsities`` and ``dsd.lengths``: the attributes
    are the fields of :class:`DSDOptions`, read from ``self.options``."""

    options: DSDOptions

    def __getattr__(self, name: str) -> Any:  # only called for names the door itself does not have
        if name in _OPTION_FIELDS and "options" in vars(self):
            return getattr(self.options, name)
        raise AttributeError(f"{type(self).__name__!r} object has no attribute {name!r}")

    def __setattr__(self, name: str, value: Any) -> None:
        if name in _OPTION_FIELDS:
            raise AttributeError(f"`{name}` is a checked DSD option, read-only once the door is built. Build a new"
                                 f" {type(self).__name__} with {name}={value!r}.")
        super().__setattr__(name, value)


_OPTION_FIELDS = frozenset(f.name for f in fields(DSDOptions))
