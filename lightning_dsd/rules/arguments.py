"""Argument checks for every front door (the checks :class:`~lightning_dsd.rules.options.DSDOptions` declares, and
the doors' own), each raising before anything trains.

Every message names the argument, says what is allowed and shows what was passed.

Examples:
    >>> check_sparsities(0.5)
    (0.5,)
    >>> check_sparsities(1.5)  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    ...
    ValueError: `sparsity` must be a float in (0, 1) (the fraction of weights pruned) ... Found: 1.5.
"""

from __future__ import annotations

import math
from numbers import Integral, Real
from typing import Any, Mapping, Optional, Sequence, Union

from torch import nn

from lightning_dsd.rules import log
from lightning_dsd.rules.masks import NMPattern, Sparsity
from lightning_dsd.rules.selection import LayerSpec

_SPARSITY_RULE = (
    "`sparsity` must be a float in (0, 1) (the fraction of weights pruned) or an 'N:M' pattern such as '2:4',"
    " or a non-empty sequence of them, one per DSD cycle."
)


def _is_real(value: Any) -> bool:
    return isinstance(value, Real) and not isinstance(value, bool)


def _as_int(value: Any) -> Optional[int]:
    """``value`` as an ``int`` when it is an integer (numpy's included), never a bool; else ``None``."""
    return int(value) if isinstance(value, Integral) and not isinstance(value, bool) else None


def check_fraction(value: Any, rule: str) -> float:
    """``value`` as a float strictly between 0 and 1, else a ``ValueError`` with ``rule``."""
    if not _is_real(value) or math.isnan(value) or not 0 < value < 1:
        raise ValueError(f"{rule} Found: {value!r}.")
    return float(value)


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
    """One sparsity per cycle, from a float, an ``"N:M"`` string, or a sequence of them."""
    if isinstance(value, bytes) or (not _is_real(value) and not isinstance(value, (str, Sequence))):
        raise ValueError(f"{_SPARSITY_RULE} Found: {value!r}.")
    values = [value] if _is_real(value) or isinstance(value, str) else list(value)
    if not values:
        raise ValueError(f"{_SPARSITY_RULE} Found an empty sequence: {value!r}.")
    return tuple(check_sparsity(v) for v in values)


def check_layer_sparsity(value: Any) -> Optional[dict[str, Sparsity]]:
    """Per-layer overrides: a mapping from parameter-name glob to a sparsity (float or ``"N:M"``)."""
    if value is None:
        return None
    rule = (
        "`layer_sparsity` must map parameter-name glob patterns to a sparsity (a float in (0, 1) or 'N:M'),"
        " e.g. {'lstm.*': 0.8}."
    )
    if not isinstance(value, Mapping) or not value or not all(isinstance(k, str) and k for k in value):
        raise ValueError(f"{rule} Found: {value!r}.")
    return {pattern: check_sparsity(sparsity, rule) for pattern, sparsity in value.items()}


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


def check_choice(name: str, value: Any, allowed: Sequence[str]) -> str:
    if value not in allowed:
        raise ValueError(f"`{name}` must be one of {list(allowed)}. Found: {value!r}.")
    return value


def check_non_negative_int(name: str, value: Any, *, positive: bool = False) -> int:
    number = _as_int(value)
    if number is None or number < int(positive):
        raise ValueError(f"`{name}` must be an int >= {int(positive)}. Found: {value!r}.")
    return number


def check_real(name: str, value: Any, *, positive: bool = False) -> float:
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
    if not isinstance(value, bool):
        raise TypeError(f"`{name}` must be a bool. Found: {value!r}.")
    return value


def check_every_n(name: str, value: Any) -> Optional[int]:
    if value is None:
        return None
    number = _as_int(value)
    if number is None or number < 1:
        raise ValueError(f"`{name}` must be None or an int >= 1. Found: {value!r}.")
    return number


def check_figure_layers(value: Any) -> "int | tuple[str, ...]":
    """How many of the largest layers get the figure (an int >= 0), or glob patterns picking them."""
    rule = f"`figure_layers` must be an int >= 0 (how many of the largest layers) or glob patterns. Found: {value!r}."
    number = _as_int(value)
    if number is not None:
        if number < 0:
            raise ValueError(rule)
        return number
    if value is None or isinstance(value, bool):
        raise ValueError(rule)
    return check_patterns("figure_layers", value)  # type: ignore[return-value]  # not None: value is not None


def check_layer_types(value: Any) -> Optional[dict[Any, Any]]:
    """Declared linear-like layers: a mapping from a module class (or its ``"module.QualName"``) to a
    :class:`~lightning_dsd.rules.selection.LayerSpec`."""
    if value is None:
        return None
    rule = (
        "`layer_types` must map nn.Module subclasses (or their 'module.QualName' strings) to a LayerSpec,"
        " e.g. {MyLinear: LayerSpec(weights=('weight',), input_dim=0)}."
    )
    if not isinstance(value, Mapping) or not value:
        raise ValueError(f"{rule} Found: {value!r}.")
    for key, spec in value.items():
        is_module_type = isinstance(key, type) and issubclass(key, nn.Module)
        if not (is_module_type or (isinstance(key, str) and "." in key)) or not isinstance(spec, LayerSpec):
            raise ValueError(f"{rule} Found the entry {key!r}: {spec!r}.")
    return dict(value)
