"""Argument checks for :class:`~lightning_dsd.DSDCallback`, each raising before anything trains.

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
from numbers import Real
from typing import Any, Mapping, Optional, Sequence

from torch import nn

from lightning_dsd.masks import NMPattern, Sparsity
from lightning_dsd.selection import LayerSpec

_SPARSITY_RULE = (
    "`sparsity` must be a float in (0, 1) (the fraction of weights pruned) or an 'N:M' pattern such as '2:4',"
    " or a non-empty sequence of them, one per DSD cycle."
)


def _is_real(value: Any) -> bool:
    return isinstance(value, Real) and not isinstance(value, bool)


def check_fraction(value: Any, rule: str) -> float:
    """``value`` as a float strictly between 0 and 1, else a ``ValueError`` with ``rule``."""
    if not _is_real(value) or math.isnan(value) or not 0 < value < 1:
        raise ValueError(f"{rule} Found: {value!r}.")
    return float(value)


def check_sparsity(value: Any, rule: str = _SPARSITY_RULE) -> Sparsity:
    """One sparsity: a float in (0, 1) or an ``"N:M"`` pattern."""
    if isinstance(value, str):
        try:
            return NMPattern.parse(value)
        except ValueError as error:
            raise ValueError(f"{rule} Found: {value!r} ({error})") from None
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
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(
            f"`{name}` must be an int >= 0, or None to run the phase until `monitor` converges. Found: {value!r}."
        )
    return value


def check_choice(name: str, value: Any, allowed: Sequence[str]) -> str:
    if value not in allowed:
        raise ValueError(f"`{name}` must be one of {list(allowed)}. Found: {value!r}.")
    return value


def check_non_negative_int(name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"`{name}` must be an int >= 0. Found: {value!r}.")
    return value


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
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"`{name}` must be None or an int >= 1. Found: {value!r}.")
    return value


def check_figure_layers(value: Any) -> "int | tuple[str, ...]":
    """How many of the largest layers get the figure (an int >= 0), or glob patterns picking them."""
    if isinstance(value, int) and not isinstance(value, bool):
        if value < 0:
            raise ValueError(f"`figure_layers` must be an int >= 0 or glob patterns. Found: {value!r}.")
        return value
    patterns = check_patterns("figure_layers", value)
    if patterns is None:
        raise ValueError(f"`figure_layers` must be an int >= 0 or glob patterns. Found: {value!r}.")
    return patterns


def check_layer_types(value: Any) -> Optional[dict[Any, Any]]:
    """Declared linear-like layers: a mapping from a module class (or its ``"module.QualName"``) to a
    :class:`~lightning_dsd.selection.LayerSpec`."""
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
