"""The options of a DSD run, declared once and checked once, whichever front door takes them.

:class:`DSDOptions` is the one declaration: each keyword option is a field with its default and its check,
side by side. The checks are the functions of this module, each raising before anything trains with a message
that names the argument, says what is allowed and shows what was passed. The front doors (``DSDCallback``,
``DSD``, ``DSDTrainerCallback``) keep explicit signatures, which IDEs and jsonargparse read, and hand their
arguments to :func:`check_options` (:func:`door_options` picks them from the door's ``locals()``); a test holds
every door's defaults to the declaration's. The meaning of every option is written once, under its field of
:class:`DSDOptions`; the doors document only what is theirs.

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

import math
from dataclasses import dataclass, field, fields, is_dataclass
from functools import partial
from numbers import Integral, Real
from typing import Any, Callable, Generic, Mapping, NoReturn, Optional, Sequence, TypeVar, Union, overload

from torch import nn
from typing_extensions import Annotated, Never

from lightning_dsd.rules import log
from lightning_dsd.rules.constraint import MASK_STORAGES
from lightning_dsd.rules.importance import Importance, check_importance, criterion_name
from lightning_dsd.rules.masks import NMPattern, Sparsity
from lightning_dsd.rules.phases import Phase, build_stages
from lightning_dsd.rules.plan import check_scope
from lightning_dsd.rules.redense import REDENSE_INITS, REDENSE_STATES
from lightning_dsd.rules.selection import LayerSpec, LayerType

T = TypeVar("T")

INTERVALS = ("epoch", "step")
LENGTH_NAMES = ("dense_epochs", "sparse_epochs", "redense_epochs")

#: A cycle's phase length, or one per cycle.
CycleLengths = Union[Optional[int], tuple[Optional[int], ...]]
#: How a door's signature types ``sparse_epochs`` and ``redense_epochs``: one length, one per cycle, or ``None``.
#: ``Annotated`` keeps the union one type inside ``Optional``, which jsonargparse (and so ``LightningCLI``)
#: needs to read ``null`` as ``None`` for a required argument (from an evaluated signature: ``callback.py``
#: does not postpone its annotations); to type checkers it is the plain union.
LengthsArgument = Optional[Annotated[Union[int, Sequence[Optional[int]]], "one length, or one per cycle"]]

# ------------------------------------------------------------------ the checks: each returns the checked value or
# raises, before anything trains, naming the option, saying what is allowed and showing what was passed


def _is_real(value: Any) -> bool:
    return isinstance(value, Real) and not isinstance(value, bool)


def _as_int(value: Any) -> Optional[int]:
    """``value`` as an ``int`` when it is an integer (numpy's included), never a bool; else ``None``."""
    return int(value) if isinstance(value, Integral) and not isinstance(value, bool) else None


def check_choice(name: str, value: Any, allowed: Sequence[str]) -> str:
    """One of ``allowed``."""
    if value not in allowed:
        raise ValueError(f"`{name}` must be one of {list(allowed)}. Found: {value!r}.")
    return value


def check_non_negative_int(name: str, value: Any, *, positive: bool = False) -> int:
    """An int >= 0 (>= 1 when ``positive``), numpy's included, never a bool."""
    number = _as_int(value)
    if number is None or number < int(positive):
        raise ValueError(f"`{name}` must be an int >= {int(positive)}. Found: {value!r}.")
    return number


def check_real(name: str, value: Any, *, positive: bool = False) -> float:
    """A finite number (> 0 when ``positive``), as a float."""
    if not _is_real(value) or math.isnan(value) or math.isinf(value) or (positive and value <= 0):
        allowed = "a finite number > 0" if positive else "a finite number"
        raise ValueError(f"`{name}` must be {allowed}. Found: {value!r}.")
    return float(value)


def check_patterns(name: str, value: Any) -> Optional[tuple[str, ...]]:
    """Glob patterns: ``None``, one string, or a non-empty sequence of strings."""
    if value is None:
        return None
    patterns = (value,) if isinstance(value, str) else value
    if (
        not isinstance(patterns, Sequence)
        or not patterns
        or not all(isinstance(p, str) and p for p in patterns)
    ):
        raise ValueError(
            f"`{name}` must be None, a glob pattern string or a non-empty sequence of them"
            f" (matched against `model.named_parameters()` names, e.g. 'features.0.*'). Found: {value!r}."
        )
    return tuple(patterns)


def check_bool(name: str, value: Any) -> bool:
    """A bool (not a truthy value: ``1`` and ``"yes"`` are refused)."""
    if not isinstance(value, bool):
        raise TypeError(f"`{name}` must be a bool. Found: {value!r}.")
    return value


def check_every_n(name: str, value: Any) -> Optional[int]:
    """``None`` (never) or an int >= 1."""
    if value is None:
        return None
    number = _as_int(value)
    if number is None or number < 1:
        raise ValueError(f"`{name}` must be None or an int >= 1. Found: {value!r}.")
    return number


def check_fraction(value: Any, rule: str) -> float:
    """``value`` as a float strictly between 0 and 1, else a ``ValueError`` with ``rule``."""
    if not _is_real(value) or math.isnan(value) or not 0 < value < 1:
        raise ValueError(f"{rule} Found: {value!r}.")
    return float(value)


_SPARSITY_RULE = (
    "`sparsity` must be a float in (0, 1) (the fraction of weights pruned) or an 'N:M' pattern such as '2:4',"
    " or a non-empty sequence of them, one per DSD cycle."
)


def _base_60_digits(value: Any) -> Optional[tuple[int, int]]:
    """``(N, M)`` with ``value == 60 * N + M`` and ``0 <= M < 60``, for a whole number ``value >= 60`` (what YAML 1.1
    makes of an unquoted ``N:M``, or jsonargparse's float of it); else ``None``."""
    if not _is_real(value) or not math.isfinite(value) or value != int(value) or value < 60:
        return None
    n, m = divmod(int(value), 60)
    return n, m


def read_base_60(value: Any) -> Optional[NMPattern]:
    """The ``N:M`` pattern a whole-number sparsity was written as, with a warning to quote it; ``None`` for
    anything else. YAML 1.1 (PyYAML, OmegaConf and so Hydra, jsonargparse and so ``LightningCLI``) reads an unquoted
    ``2:4`` as the base-60 integer ``2 * 60 + 4 = 124``; an integer ``60 * N + M`` (``M < 60``) of a valid
    pattern (``0 < N < M``) is read back as that pattern (also as the float ``124.0``). No whole number is a valid
    sparsity, so this never changes a valid value.

    Examples:
        >>> import warnings
        >>> with warnings.catch_warnings(record=True) as caught:
        ...     warnings.simplefilter("always")
        ...     read_base_60(124), read_base_60(0.5), read_base_60(242)  # 242 is 4:2, no valid pattern
        (NMPattern(n=2, m=4), None, None)
        >>> print(caught[0].message)  # doctest: +ELLIPSIS
        Read the sparsity 124 as the N:M pattern '2:4': YAML 1.1 reads an unquoted 2:4 as the base-60 integer ...
    """
    digits = _base_60_digits(value)  # an int, or the whole-number float jsonargparse may make of it
    if digits is None or not 0 < digits[0] < digits[1]:
        return None
    n, m = digits
    log.warn(
        f"Read the sparsity {value:g} as the N:M pattern '{n}:{m}': YAML 1.1 reads an unquoted {n}:{m} as the"
        f" base-60 integer {n} * 60 + {m} = {value:g}. Quote the pattern ('{n}:{m}') to silence this warning; if you"
        " meant a fraction of the weights, write a float in (0, 1) such as 0.5."
    )
    return NMPattern(n, m)


def check_sparsity(value: Any, rule: str = _SPARSITY_RULE) -> Sparsity:
    """One sparsity: a float in (0, 1) or an ``"N:M"`` pattern, or YAML's base-60 integer of one (read back by
    :func:`read_base_60`, with a warning). A whole number that YAML would have made of an invalid ``N:M`` is
    refused with that reading spelled out.

    Examples:
        >>> check_sparsity(242)  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ...
        ValueError: `sparsity` must be ... Found: 242, which is how YAML 1.1 reads an unquoted 4:2 ...
    """
    if isinstance(value, str):
        try:
            return NMPattern.parse(value)
        except ValueError as error:
            raise ValueError(f"{rule} Found: {value!r} ({error})") from None
    pattern = read_base_60(value)
    if pattern is not None:
        return pattern
    digits = _base_60_digits(value)
    if digits is not None:
        n, m = digits
        raise ValueError(
            f"{rule} Found: {value!r}, which is how YAML 1.1 reads an unquoted {n}:{m} (the base-60 integer"
            f" {n} * 60 + {m}), and {n}:{m} is no N:M pattern (integers 0 < N < M). Quote the pattern you meant,"
            " as in '2:4', or write a float in (0, 1)."
        )
    return check_fraction(value, rule)


def check_sparsities(value: Any) -> tuple[Sparsity, ...]:
    """One sparsity per cycle, from a float, an ``"N:M"`` string, or a sequence of them.

    Examples:
        >>> check_sparsities(0.5), check_sparsities((0.5, "2:4"))
        ((0.5,), (0.5, NMPattern(n=2, m=4)))
        >>> check_sparsities(1.5)  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ...
        ValueError: `sparsity` must be a float in (0, 1) (the fraction of weights pruned) ... Found: 1.5.
    """
    if isinstance(value, bytes) or (not _is_real(value) and not isinstance(value, (str, Sequence))):
        raise ValueError(f"{_SPARSITY_RULE} Found: {value!r}.")
    values = [value] if _is_real(value) or isinstance(value, str) else list(value)
    if not values:
        raise ValueError(f"{_SPARSITY_RULE} Found an empty sequence: {value!r}.")
    return tuple(check_sparsity(v) for v in values)


def check_length(name: str, value: Any) -> Optional[int]:
    """A phase length: an int >= 0, or ``None`` for "until the monitored metric converges"."""
    if value is None:
        return None
    length = _as_int(value)
    if length is None or length < 0:
        raise ValueError(
            f"`{name}` must be an int >= 0, or None to run the phase until `monitor` converges. Found: {value!r}."
        )
    return length


def check_cycle_lengths(name: str, value: Any, cycles: int) -> Union[Optional[int], tuple[Optional[int], ...]]:
    """A phase length for every cycle (as :func:`check_length`), or a sequence of them, one per cycle.

    Examples:
        >>> check_cycle_lengths("sparse_epochs", [5, 5, 20], cycles=3)
        (5, 5, 20)
        >>> check_cycle_lengths("sparse_epochs", [5, 5], cycles=3)  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ...
        ValueError: `sparse_epochs` gives 2 lengths, but `sparsity` gives 3 cycles: ...
    """
    if isinstance(value, (str, bytes)) or not isinstance(value, Sequence):
        return check_length(name, value)
    lengths = tuple(check_length(f"{name}[{i}]", length) for i, length in enumerate(value))
    if len(lengths) != cycles:
        raise ValueError(
            f"`{name}` gives {len(lengths)} length{'s' if len(lengths) != 1 else ''}, but `sparsity` gives"
            f" {cycles} cycle{'s' if cycles != 1 else ''}: pass one length for every cycle, or a sequence of"
            f" exactly {cycles} (one per cycle, in order). Found: {name}={value!r}."
        )
    return lengths


# The checks of one option each.


def check_monitor(name: str, value: Any) -> Optional[str]:
    """The metric a phase of length ``None`` waits for: ``None``, or a non-empty name."""
    if value is not None and not (isinstance(value, str) and value):
        raise ValueError(f"`{name}` must be None or the name of a logged metric. Found: {value!r}.")
    return value


def check_layer_types(name: str, value: Any) -> Optional[dict[Any, Any]]:
    """Declared linear-like layers: a mapping from a module class (or its ``"module.QualName"``) to a
    :class:`~lightning_dsd.rules.selection.LayerSpec`."""
    if value is None:
        return None
    rule = (
        f"`{name}` must map nn.Module subclasses (or their 'module.QualName' strings) to a LayerSpec,"
        " e.g. {MyLinear: LayerSpec(weights=('weight',), input_dim=0)}."
    )
    if not isinstance(value, Mapping) or not value:
        raise ValueError(f"{rule} Found: {value!r}.")
    for key, spec in value.items():
        is_module_type = isinstance(key, type) and issubclass(key, nn.Module)
        if not (is_module_type or (isinstance(key, str) and "." in key)) or not isinstance(spec, LayerSpec):
            raise ValueError(f"{rule} Found the entry {key!r}: {spec!r}.")
    return dict(value)


def check_figure_layers(name: str, value: Any) -> "int | tuple[str, ...]":
    """How many of the largest layers get the figure (an int >= 0), or glob patterns picking them."""
    rule = f"`{name}` must be an int >= 0 (how many of the largest layers) or glob patterns. Found: {value!r}."
    number = _as_int(value)
    if number is not None:
        if number < 0:
            raise ValueError(rule)
        return number
    if value is None or isinstance(value, bool):
        raise ValueError(rule)
    return check_patterns(name, value)  # type: ignore[return-value]  # not None: value is not None


def check_layer_sparsity(name: str, value: Any) -> Optional[dict[str, Sparsity]]:
    """Per-layer overrides: a mapping from parameter-name glob to a sparsity (float or ``"N:M"``)."""
    if value is None:
        return None
    rule = (
        f"`{name}` must map parameter-name glob patterns to a sparsity (a float in (0, 1) or 'N:M'),"
        " e.g. {'lstm.*': 0.8}."
    )
    if not isinstance(value, Mapping) or not value or not all(isinstance(k, str) and k for k in value):
        raise ValueError(f"{rule} Found: {value!r}.")
    return {pattern: check_sparsity(sparsity, rule) for pattern, sparsity in value.items()}


# ------------------------------------------------------------------ the declaration


#: What a field's check is given (the option's name and what was passed) and returns (the checked value).
Check = Callable[[str, Any], Any]


def _one_of(*allowed: str) -> Check:
    """The check of an option that takes one of ``allowed`` (:func:`check_choice`)."""
    return lambda name, value: check_choice(name, value, allowed)


def _option(default: Any, check: Check) -> Any:
    """A keyword option: its default and the check that turns what a user passed into its checked value."""
    return field(default=default, metadata={"check": check})


@dataclass(frozen=True)
class DSDOptions:
    """Everything that decides what DSD does, checked: the one declaration of every option the front doors
    share, and the one place each is documented. Each keyword option is declared as
    ``name: type = _option(default, check)``, its meaning written under it; the doors take the keywords with these
    names and defaults, and every field is read on a door under its name (``dsd.lr_scale``, see
    :class:`ReadsOptions`). :func:`check_options` builds one from a door's arguments."""

    sparsities: tuple[Sparsity, ...]
    """The sparsity of each cycle, from a door's first argument ``sparsity``: the fraction of weights a sparse
    phase prunes, in (0, 1), or an ``"N:M"`` pattern (keep the N largest of every M consecutive weights along the
    input dimension); one value, or a sequence of them, one per cycle (``(0.5, 0.25)`` runs D S D S D). Checked
    by :func:`check_sparsities` (YAML's base-60 reading of an unquoted ``N:M`` is read back, see
    :func:`read_base_60`)."""

    lengths: tuple[Optional[int], CycleLengths, CycleLengths]
    """A door's ``(dense_epochs, sparse_epochs, redense_epochs)``, counted in what ``interval`` says:

    - ``dense_epochs``: length of the first dense phase; ``0`` prunes before the first step (the paper's use on
      pre-trained models); ``None`` runs it until ``monitor`` converges.
    - ``sparse_epochs``: length of each sparse phase, likewise, or a sequence of lengths, one per cycle (a
      sequence whose length is not the number of cycles is refused).
    - ``redense_epochs``: length of each re-dense phase, likewise (one length, or one per cycle).

    Checked by :func:`check_length` and :func:`check_cycle_lengths`."""

    final_sparse_epochs: Optional[int] = _option(0, check_length)
    """Length of a final sparse phase after the last re-dense, whose masks are decided afresh (by ``importance``)
    at the last cycle's sparsity (numbered cycle ``len(sparsities)``); the run then ends sparse, as AC/DC does
    (Peste et al., NeurIPS 2021; see the AC/DC recipe in the docs): the zeros hold to the last step, in the
    final model, its ``state_dict`` and the last checkpoint (and ``DSDCallback``'s ``export_sparse`` saves it
    when training ends). ``0`` (the default): no final phase, the run ends re-densed; ``None``: until
    ``monitor`` converges (then the training's own limits, the ``Trainer``'s or your loop's, end the run)."""

    interval: str = _option("epoch", _one_of(*INTERVALS))
    """``"epoch"`` or ``"step"``: what the lengths count (optimizer steps for ``"step"``)."""

    monitor: Optional[str] = _option(None, check_monitor)
    """Metric that decides convergence for phases given as ``None``; a phase of length ``None`` needs one. It is
    read, and required, only while some phase waits for it."""

    mode: str = _option("min", _one_of("min", "max"))
    """``"min"`` or ``"max"``: which direction of ``monitor`` is an improvement."""

    patience: int = _option(3, check_non_negative_int)
    """Checks without improvement after which a phase has converged."""

    min_delta: float = _option(0.0, check_real)
    """Smallest change of ``monitor`` that counts as an improvement."""

    lr_scale: float = _option(0.1, partial(check_real, positive=True))
    """Factor applied to every learning rate at each re-dense (paper: 0.1): every learning rate, scheduler
    included, becomes ``lr_scale`` times what it would have been, and each further re-dense multiplies it by
    ``lr_scale`` again."""

    include: Optional[tuple[str, ...]] = _option(None, check_patterns)
    """Glob patterns over parameter names that replace the default targets (the connection weights of
    linear-like layers, see :mod:`lightning_dsd.rules.selection`; embeddings are left dense unless tied to an
    output layer, and so is the ``Conv2d``/``Conv3d`` that reads the input, as in the paper:
    ``include=["*.weight"]`` brings it back in a CNN)."""

    exclude: Optional[tuple[str, ...]] = _option(None, check_patterns)
    """Glob patterns over parameter names never to prune (e.g. ``"stem.*"``)."""

    layer_types: Optional[dict[LayerType, LayerSpec]] = _option(None, check_layer_types)
    """Your own linear-like modules: a mapping from the module class (or its ``"module.QualName"``) to a
    :class:`~lightning_dsd.rules.selection.LayerSpec` naming its connection weights and their input dimension,
    e.g. ``{MyLinear: LayerSpec(input_dim=0)}``."""

    scope: str = _option("layer", lambda _, value: check_scope(value))
    """``"layer"`` (a threshold per tensor, the paper's) or ``"global"`` (one over all targets; with neither
    ``layer_sparsity`` nor ``"N:M"`` patterns, which :func:`~lightning_dsd.rules.plan.check_scope` refuses)."""

    log_histograms: bool = _option(True, check_bool)
    """Log weight histograms to TensorBoard at the five moments of every cycle."""

    histogram_every_n_epochs: Optional[int] = _option(None, check_every_n)
    """Also log a histogram timeline every this many epochs (``None``: never)."""

    histogram_layers: Optional[tuple[str, ...]] = _option(None, check_patterns)
    """Glob patterns picking the targeted layers that get histograms (``None``: all)."""

    log_scalars: bool = _option(True, check_bool)
    """Log phase, cycle, measured sparsity and learning rates (at every epoch end and every transition) to every
    logger, and a text note of every transition to TensorBoard."""

    figure_layers: Union[int, tuple[str, ...]] = _option(2, check_figure_layers)
    """The five-panel figure is drawn for this many of the largest targeted layers, or for the targeted layers
    matching these glob patterns; ``0`` turns it off."""

    layer_sparsity: Optional[dict[str, Sparsity]] = _option(None, check_layer_sparsity)
    """Per-layer overrides, a mapping from parameter-name glob to a sparsity (float or ``"N:M"``) used in every
    cycle; the first matching pattern wins. Needs ``scope="layer"``."""

    redense_init: str = _option("zero", _one_of(*REDENSE_INITS))
    """How pruned weights restart at re-dense: ``"zero"`` (the paper's) or ``"small_normal"`` (normal noise with
    a tenth of the standard deviation of the layer's surviving weights, drawn from a generator seeded with
    ``seed`` and the cycle)."""

    redense_state: str = _option("pruned", _one_of(*REDENSE_STATES))
    """How the optimizer state of the pruned tensors restarts at each re-dense: ``"pruned"`` (the paper's: zero
    at the pruned entries, the rest kept) or ``"all"`` (AC/DC's: the whole state of every pruned tensor is
    dropped and the optimizer builds it afresh, so Adam's moments and its step count restart together, bias
    correction included)."""

    seed: int = _option(0, check_non_negative_int)
    """Seed of the random re-dense initialisation (``redense_init="small_normal"``)."""

    mask_storage: str = _option("weight_dtype", _one_of(*MASK_STORAGES))
    """How masks are kept during sparse phases: ``"weight_dtype"`` (one element of the weight's dtype per
    weight, applied with a fused multiply: the fastest measured) or ``"bool"`` (1 byte per weight, applied by
    the same fused multiply; bool multiplies run at about 0.4 of copy speed on the CPU, see the performance
    docs)."""

    prune: bool = _option(True, check_bool)
    """``False`` runs the paper's LLR control instead of DSD: the same clock and transitions, the learning rate
    drops by ``lr_scale`` exactly where DSD would re-dense, and no weight is ever pruned (no masks, no zeroed
    optimizer state, no restart). With ``lr_scale=1.0`` as well it is the plain dense baseline. Every run
    records its arm (``dsd``, ``llr`` or ``dense``; ``obd`` or ``custom`` for another ``importance``, see
    :attr:`arm`), seed and options in its log, for :mod:`lightning_dsd.tools.compare`; see "Does it help my
    model?" in the docs."""

    importance: Importance = _option("magnitude", check_importance)
    """Which weights a sparse phase prunes (see :mod:`lightning_dsd.rules.importance`): ``"magnitude"`` (the
    paper's ``|w|``), ``"obd"`` (Optimal Brain Damage's saliency ``½·h·w²``, with ``h`` the mean squared
    gradient of each weight over a window of optimizer steps just before the transition, the empirical Fisher's
    estimate of the Hessian's diagonal), or a callable ``f(name, weight, grad_sq)`` returning a tensor of scores
    of ``weight``'s shape (``grad_sq``: that mean squared gradient). The lowest scores are pruned, with the
    counts, tie-breaking and N:M groups of magnitudes. Phases before a sparse phase then need fixed lengths
    (the window must know where the transition is)."""

    importance_steps: int = _option(100, partial(check_non_negative_int, positive=True))
    """The window's length, in optimizer steps: with ``interval="step"`` the last ``importance_steps`` steps
    before each transition to a sparse phase (all of the phase when it is shorter); with ``interval="epoch"``
    the first ``importance_steps`` optimizer steps of the last epoch before it (an epoch's end is not known in
    steps). Outside the window no hook runs."""

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
    check_scope(options.scope, options.cycle_sparsities, options.layer_sparsity)  # what `scope` takes with the rest
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


class Option(Generic[T]):
    """The typed, read-only read of one checked option on a front door: ``door.<name>`` is
    ``door.options.<name>``, of the field's type to type checkers (so a misspelt option is an error there, not an
    ``Any``), and writing it raises. Declared once, in :class:`ReadsOptions`, for every field of
    :class:`DSDOptions`."""

    name: str

    def __set_name__(self, owner: type, name: str) -> None:
        self.name = name

    @overload
    def __get__(self, door: None, owner: type) -> Option[T]: ...

    @overload
    def __get__(self, door: ReadsOptions, owner: type) -> T: ...

    def __get__(self, door: Optional[ReadsOptions], owner: type) -> Union[Option[T], T]:
        if door is None:  # read on the class: the descriptor itself
            return self
        return getattr(door.options, self.name)  # of the field's type, as declared

    def __set__(self, door: ReadsOptions, value: Never) -> NoReturn:
        raise AttributeError(f"`{self.name}` is a checked DSD option, read-only once the door is built. Build a new"
                             f" {type(door).__name__} with {self.name}={value!r}.")


class ReadsOptions:
    """Every checked option as a typed, read-only attribute of a front door, named as its keyword
    (``dsd.scope``, ``dsd.lr_scale``, ...), and the positional ones as ``dsd.sparsities`` and ``dsd.lengths``:
    one :class:`Option` per field of :class:`DSDOptions`, with the field's type, read from ``self.options``
    (a test holds these to the declaration)."""

    options: DSDOptions

    sparsities: Option[tuple[Sparsity, ...]] = Option()
    lengths: Option[tuple[Optional[int], CycleLengths, CycleLengths]] = Option()
    final_sparse_epochs: Option[Optional[int]] = Option()
    interval: Option[str] = Option()
    monitor: Option[Optional[str]] = Option()
    mode: Option[str] = Option()
    patience: Option[int] = Option()
    min_delta: Option[float] = Option()
    lr_scale: Option[float] = Option()
    include: Option[Optional[tuple[str, ...]]] = Option()
    exclude: Option[Optional[tuple[str, ...]]] = Option()
    layer_types: Option[Optional[dict[LayerType, LayerSpec]]] = Option()
    scope: Option[str] = Option()
    log_histograms: Option[bool] = Option()
    histogram_every_n_epochs: Option[Optional[int]] = Option()
    histogram_layers: Option[Optional[tuple[str, ...]]] = Option()
    log_scalars: Option[bool] = Option()
    figure_layers: Option[Union[int, tuple[str, ...]]] = Option()
    layer_sparsity: Option[Optional[dict[str, Sparsity]]] = Option()
    redense_init: Option[str] = Option()
    redense_state: Option[str] = Option()
    seed: Option[int] = Option()
    mask_storage: Option[str] = Option()
    prune: Option[bool] = Option()
    importance: Option[Importance] = Option()
    importance_steps: Option[int] = Option()
