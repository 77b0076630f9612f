"""The one implementation of the paired statistics, against SciPy as the reference."""

from __future__ import annotations

import math
import statistics as python_statistics

import pytest
from scipy import stats

from lightning_dsd.tools.statistics import detectable, interval, paired, t_quantile


@pytest.mark.parametrize("df", [*range(1, 41), 60, 99, 100, 250, 1000])
def test_t_quantiles_are_scipys_to_the_last_digits(df):
    for p in (0.6, 0.8, 0.9, 0.95, 0.975, 0.995, 0.025, 0.2):
        assert t_quantile(p, df) == pytest.approx(stats.t.ppf(p, df), rel=1e-12)


@pytest.mark.parametrize("bad", [(0.0, 3), (1.0, 3), (0.5, 0), (0.9, 2.5)])
def test_t_quantile_refuses_what_it_cannot_answer(bad):
    with pytest.raises(ValueError, match=r"t_quantile needs 0 < p < 1 and an int df >= 1"):
        t_quantile(*bad)


@pytest.mark.parametrize("differences", [[0.5, -0.1], [0.012, 0.004, -0.003, 0.02, 0.007], [1.0, 2.0, 4.0, 8.0] * 3])
def test_the_interval_and_detectable_difference_are_scipys_and_the_power_is_what_the_docs_say(differences):
    n = len(differences)
    mean, low, high = interval(differences, scale=100.0)
    sem = stats.sem(differences)
    reference = stats.t.interval(0.95, n - 1, loc=python_statistics.mean(differences), scale=sem)
    assert mean / 100 == pytest.approx(python_statistics.mean(differences), rel=1e-12)
    assert (low / 100, high / 100) == pytest.approx(reference, rel=1e-11)
    test = stats.ttest_1samp(differences, 0.0)  # the interval excludes 0 exactly when the paired t-test rejects
    assert (low > 0 or high < 0) is bool(test.pvalue < 0.05)
    found = detectable(differences)
    assert found == pytest.approx((stats.t.ppf(0.975, n - 1) + stats.t.ppf(0.8, n - 1)) * sem, rel=1e-12)
    result = paired(differences)
    assert (result.n, result.detectable) == (n, found)
    assert result.favouring == sum(d > 0 for d in differences)
    assert paired(differences, higher_is_better=False).favouring == sum(d < 0 for d in differences)


@pytest.mark.parametrize(("n", "power"), [(2, 0.73), (3, 0.77), (5, 0.79), (10, 0.80), (30, 0.80)])
def test_the_exact_power_at_the_detectable_difference_is_the_documented_one(n, power):
    """The non-central t power of the two-sided paired test at 5%, for a true difference equal to ``detectable``
    at a true spread equal to the one seen: the figures quoted in lightning_dsd.tools.statistics."""
    differences = [math.sin(i + 1.0) for i in range(n)]
    noncentrality = detectable(differences) / (python_statistics.stdev(differences) / math.sqrt(n))
    critical = stats.t.ppf(0.975, n - 1)
    exact = stats.nct.sf(critical, n - 1, noncentrality) + stats.nct.cdf(-critical, n - 1, noncentrality)
    assert round(exact, 2) == power


def test_fewer_than_two_differences_have_no_spread():
    assert interval([0.25]) == (0.25, 0.25, 0.25)
    with pytest.raises(ValueError, match=r"needs the spread of at least 2 paired differences. Found: 1"):
        detectable([0.25])
    with pytest.raises(ValueError, match=r"at least 2 seeds. Found: 1"):
        paired([0.25])
