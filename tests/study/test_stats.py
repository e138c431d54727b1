"""The study statistics against known values: scipy where it has the same method, textbook examples else."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import stats as sps

from tokenreduce.study.stats import bootstrap_ci, holm, mcnemar_exact, min_n_for_halfwidth, paired_bootstrap, wilson


@pytest.mark.parametrize("k,n", [(0, 10), (1, 10), (5, 10), (10, 10), (81, 263), (37, 64), (63, 64)])
def test_wilson_matches_scipy(k, n):
    p, lo, hi = wilson(k, n)
    ci = sps.binomtest(k, n).proportion_ci(0.95, method="wilson")
    assert p == k / n
    assert lo == pytest.approx(ci.low, abs=1e-12) and hi == pytest.approx(ci.high, abs=1e-12)


def test_wilson_textbook_example():
    """Newcombe (1998), Table I, example (a) 81/263: 0.2553 to 0.3662."""
    _, lo, hi = wilson(81, 263)
    assert round(lo, 4) == 0.2553 and round(hi, 4) == 0.3662


def test_wilson_rejects_bad_counts():
    for k, n in ((3, 2), (-1, 5), (0, 0), (1.5, 3)):
        with pytest.raises(ValueError, match="0 <= k <= n"):
            wilson(k, n)
    with pytest.raises(ValueError, match="confidence"):
        wilson(1, 2, confidence=95)


@pytest.mark.parametrize("b,c", [(0, 0), (1, 0), (5, 1), (3, 9), (10, 10), (0, 6), (0, 5)])
def test_mcnemar_exact_is_the_binomial_test_of_the_discordant_pairs(b, c):
    x = [True] * b + [False] * c + [True] * 7 + [False] * 4
    y = [False] * b + [True] * c + [True] * 7 + [False] * 4
    r = mcnemar_exact(x, y)
    assert (r["b"], r["c"]) == (b, c)
    want = 1.0 if b + c == 0 else sps.binomtest(min(b, c), b + c, 0.5).pvalue
    assert r["p"] == pytest.approx(want, rel=1e-12)


def test_mcnemar_textbook_smallest_significant_split():
    """0 vs 6 discordant pairs is the smallest split significant at 5% (p = 2 / 64), 0 vs 5 is not."""
    assert mcnemar_exact([False] * 6, [True] * 6)["p"] == pytest.approx(2 / 64)
    assert mcnemar_exact([False] * 5, [True] * 5)["p"] == pytest.approx(2 / 32)
    with pytest.raises(ValueError, match="equally long"):
        mcnemar_exact([True], [True, False])


def test_holm_hand_computed():
    assert holm([0.01, 0.04, 0.03]) == pytest.approx([0.03, 0.06, 0.06])
    assert holm([0.5, 0.01]) == pytest.approx([0.5, 0.02])
    out = holm([math.nan, 0.02, 0.04])
    assert math.isnan(out[0]) and out[1:] == pytest.approx([0.04, 0.04])


def test_min_n_for_halfwidth_is_the_least_such_n():
    for h in (0.05, 0.1, 0.15, 0.2):
        n = min_n_for_halfwidth(h)
        w = lambda m: (wilson(m // 2, m)[2] - wilson(m // 2, m)[1]) / 2 if m % 2 == 0 else None
        z = 1.959963984540054
        assert z / (2 * math.sqrt(n + z * z)) <= h < z / (2 * math.sqrt(n - 1 + z * z))
        if w(n + n % 2) is not None:
            assert w(n + n % 2) <= h + 1e-12
    assert min_n_for_halfwidth(0.15) == 39


def test_paired_bootstrap_exact_cases_and_seed():
    x = np.arange(20, dtype=float)
    d = paired_bootstrap(x, x + 1.0)
    assert d["diff"] == 1.0 and d["low"] == d["high"] == 1.0 and d["p"] == 0.0
    same = paired_bootstrap(x, x)
    assert same == {"diff": 0.0, "low": 0.0, "high": 0.0, "p": 1.0}
    rng = np.random.default_rng(3)
    a, b = rng.normal(size=40), rng.normal(size=40) + 0.3
    assert paired_bootstrap(a, b) == paired_bootstrap(a, b)  # fixed seed
    assert paired_bootstrap(a, b, seed=1) != paired_bootstrap(a, b, seed=2)
    with pytest.raises(ValueError, match="same items"):
        paired_bootstrap(a, b[:-1])


def test_paired_bootstrap_agrees_with_scipy_percentile_bootstrap():
    rng = np.random.default_rng(0)
    a = rng.normal(size=60)
    b = a + rng.normal(0.2, 0.5, size=60)
    ours = paired_bootstrap(a, b, n_boot=20_000)
    ref = sps.bootstrap((a, b), lambda u, v, axis=-1: np.mean(v, axis=axis) - np.mean(u, axis=axis), paired=True,
                        method="percentile", n_resamples=20_000, random_state=0).confidence_interval
    assert ours["low"] == pytest.approx(ref.low, abs=0.02) and ours["high"] == pytest.approx(ref.high, abs=0.02)


def test_bootstrap_ci_of_a_ratio_and_an_all_zero_denominator():
    pairs = np.array([[1, 4], [0, 3], [2, 5], [0, 2]] * 5, dtype=float)
    value, lo, hi = bootstrap_ci(pairs, lambda v: v[:, 0].sum() / v[:, 1].sum() if v[:, 1].sum() else math.nan)
    assert value == pytest.approx(15 / 70) and lo < value < hi
    value, lo, hi = bootstrap_ci(np.zeros((5, 2)), lambda v: v[:, 0].sum() / v[:, 1].sum() if v[:, 1].sum() else math.nan)
    assert math.isnan(value) and math.isnan(lo) and math.isnan(hi)
