"""Paired differences between two arms over seeds: mean, 95% t interval, the smallest detectable difference.

The one implementation of these statistics: :mod:`lightning_dsd.tools.compare` and the study
(``benchmarks/accuracy_study.py``) both call it. Pure Python, no SciPy: Student's t distribution for an integer
number of degrees of freedom ``ν`` has an elementary distribution function (Abramowitz and Stegun 26.7.3 and
26.7.4, in ``θ = atan(t / √ν)``), and :func:`t_quantile` inverts it by bisection to the last bit of a float
(checked against ``scipy.stats.t`` in the tests).

For ``n`` paired differences ``d`` with mean ``m`` and standard deviation ``s``:

* the 95% t interval is ``m ± t(0.975, n - 1) · s / √n``;
* *detectable* is the smallest true mean difference a two-sided paired t-test at the 5% level finds with 80%
  power at the spread seen: ``(t(0.975, n - 1) + t(0.8, n - 1)) · s / √n``. This is the usual approximation;
  the exact power of the test at that difference (non-central t) is 73% with 2 seeds, 77% with 3, 79% with 5
  and 80% from 10 on;
* the seeds that *favour* the arm are those whose difference goes its way (above 0 when higher is better).

Examples:
    >>> round(t_quantile(0.975, 4), 6)
    2.776445
    >>> result = paired([0.010, 0.020, 0.000, 0.030])
    >>> round(result.mean, 4), round(result.low, 4), round(result.high, 4), result.favouring
    (0.015, -0.0055, 0.0355, 3)
"""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass
from typing import Sequence


def t_two_sided(theta: float, df: int) -> float:
    """``P(|T| < √df · tan θ)`` for Student's t with ``df`` (an int >= 1) degrees of freedom (A&S 26.7.3-4)."""
    c2, sine, cosine = math.cos(theta) ** 2, math.sin(theta), math.cos(theta)
    total, term = 1.0, 1.0
    if df % 2:
        if df == 1:
            return 2 * theta / math.pi
        for k in range(1, (df - 3) // 2 + 1):
            term *= 2 * k / (2 * k + 1) * c2
            total += term
        return 2 / math.pi * (theta + sine * cosine * total)
    for k in range(1, (df - 2) // 2 + 1):
        term *= (2 * k - 1) / (2 * k) * c2
        total += term
    return sine * total


def t_quantile(p: float, df: int) -> float:
    """The ``p`` quantile of Student's t with ``df`` degrees of freedom (an int >= 1), ``0 < p < 1``."""
    if not (isinstance(df, int) and df >= 1 and 0 < p < 1):
        raise ValueError(f"t_quantile needs 0 < p < 1 and an int df >= 1. Found: p={p!r}, df={df!r}.")
    if p < 0.5:
        return -t_quantile(1 - p, df)
    target, low, high = 2 * p - 1, 0.0, math.pi / 2
    while low < (middle := (low + high) / 2) < high:  # until the bracket is two adjacent floats
        if t_two_sided(middle, df) < target:
            low = middle
        else:
            high = middle
    return math.sqrt(df) * math.tan((low + high) / 2)


def interval(differences: Sequence[float], scale: float = 1.0) -> tuple[float, float, float]:
    """Mean of paired differences and its 95% t interval, times ``scale``; one difference gives its value three
    times."""
    mean = scale * statistics.mean(differences)
    if len(differences) < 2:
        return mean, mean, mean
    spread = statistics.stdev(differences) / math.sqrt(len(differences))
    half = scale * t_quantile(0.975, len(differences) - 1) * spread
    return mean, mean - half, mean + half


def detectable(differences: Sequence[float], scale: float = 1.0) -> float:
    """The smallest true mean difference these seeds find with 80% power at the 5% level, given the spread of
    the paired differences seen: ``(t_0.975 + t_0.8) · sd / √n``, times ``scale`` (needs two differences)."""
    n = len(differences)
    if n < 2:
        raise ValueError(f"a detectable difference needs the spread of at least 2 paired differences. Found: {n}.")
    factor = t_quantile(0.975, n - 1) + t_quantile(0.8, n - 1)
    return scale * factor * statistics.stdev(differences) / math.sqrt(n)


@dataclass(frozen=True)
class Paired:
    """The comparison of an arm with a control over ``n`` seeds (differences are arm - control)."""

    n: int
    mean: float
    low: float
    high: float
    detectable: float
    favouring: int  # seeds whose difference goes the arm's way


def paired(differences: Sequence[float], higher_is_better: bool = True) -> Paired:
    """Every statistic of :class:`Paired` for ``differences`` (at least 2)."""
    if len(differences) < 2:
        raise ValueError(f"a paired comparison needs at least 2 seeds. Found: {len(differences)}.")
    mean, low, high = interval(differences)
    favouring = sum((d > 0) if higher_is_better else (d < 0) for d in differences)
    return Paired(len(differences), mean, low, high, detectable(differences), favouring)
