"""compare() pairs conditions with the unreduced model; decide() gives each verdict, or none when n is small."""

from __future__ import annotations

import math

import pytest

from tokenreduce.study.analysis import Hypothesis, Metric, compare, decide


def _items(acc: dict[tuple[str, float], list[bool]], stratum: int = 1) -> list[dict]:
    return [{"length": stratum, "method": m, "keep": k, "item": i, "correct": c}
            for (m, k), cs in acc.items() for i, c in enumerate(cs)]


def _hyp(treated=("a",), contrast=None, **kw) -> Hypothesis:
    return Hypothesis("h", "t", Metric("correct", "proportion", True, "accuracy"), lambda r: r["method"] in treated,
                      None if contrast is None else (lambda r: r["method"] in contrast), **kw)


N = 60
ACC = Metric("correct", "proportion", True, "accuracy")
BASE = [True] * 30 + [False] * 30


def test_compare_pairs_on_common_items_and_reports_ci_and_mcnemar():
    items = _items({("none", 1.0): BASE, ("a", 0.5): [True] * 50 + [False] * 10})
    items.append({"length": 1, "method": "a", "keep": 0.5, "item": 99, "correct": True})  # no baseline partner
    items[0]["error"] = "failed"  # left out of both sides
    base, a = compare(items, Metric("correct", label="accuracy"), strata=("length",))
    assert base["method"] == "none" and "diff" not in base and base["n"] == a["n"] == N - 1
    assert a["accuracy"] == pytest.approx(49 / 59) and a["ci_low"] < a["accuracy"] < a["ci_high"]
    assert a["diff"] == pytest.approx(20 / 59) and a["diff_low"] > 0 and a["p"] < 1e-4
    assert a["test"] == "McNemar exact"


def test_decide_supported_not_supported_mixed():
    better, worse, same = [True] * 50 + [False] * 10, [True] * 5 + [False] * 55, list(BASE)
    t = compare(_items({("none", 1.0): BASE, ("a", 0.5): better, ("b", 0.5): same}), ACC)
    v = decide(t, _hyp(contrast=("b",)))
    assert v.label == "supported" and "1 of 1 treated" in v.line and "a keep=0.5" in v.line
    t = compare(_items({("none", 1.0): BASE, ("a", 0.5): same}), ACC)
    assert decide(t, _hyp()).label == "not supported"
    t = compare(_items({("none", 1.0): BASE, ("a", 0.5): better, ("a", 0.25): worse}), ACC)
    assert decide(t, _hyp()).label == "mixed"
    t = compare(_items({("none", 1.0): BASE, ("a", 0.5): better, ("b", 0.5): better}), ACC)
    assert decide(t, _hyp(contrast=("b",))).label == "mixed"  # the contrast improves too


def test_lower_is_better_direction():
    fewer = [True] * 5 + [False] * 55
    m = Metric("correct", "proportion", False, "rate")
    t = compare(_items({("none", 1.0): BASE, ("a", 0.5): fewer}), m)
    h = Hypothesis("h", "t", m, lambda r: r["method"] == "a")
    assert decide(t, h).label == "supported"


def test_no_verdict_when_n_is_too_small_for_the_ci():
    t = compare(_items({("none", 1.0): BASE[20:40], ("a", 0.5): [True] * 20}), ACC)
    v = decide(t, _hyp())
    assert v.label == "no verdict" and "n=20" in v.line and "needs n >= 39" in v.line
    assert decide(t, _hyp(max_halfwidth=0.25)).label == "supported"


def test_non_inferiority_and_ratio_metric():
    items = [{"method": m, "keep": 1.0, "item": i, "nll": 2.0 + 0.01 * (i % 3) + d}
             for m, d in (("none", 0.0), ("s", 0.02), ("w", 0.5)) for i in range(20)]
    h = Hypothesis("h", "t", Metric("nll", "mean", False), lambda r: r["method"] == "s", margin=math.log(1.1))
    t = compare(items, h.metric)
    assert decide(t, h).label == "supported"
    h2 = Hypothesis("h", "t", Metric("nll", "mean", False), lambda r: r["method"] in ("s", "w"), margin=math.log(1.1))
    assert decide(compare(items, h2.metric), h2).label == "mixed"
    ratio = [{"method": m, "keep": 1.0, "item": i, "h": [int(i % 4 == 0) + (m == "x"), 4]} for m in ("none", "x")
             for i in range(20)]
    base, x = compare(ratio, Metric("h", "ratio", False))
    assert base["h"] == pytest.approx(5 / 80) and x["diff"] == pytest.approx(20 / 80) and x["test"] == "paired bootstrap"


def test_metric_kind_is_checked():
    with pytest.raises(ValueError, match="accepted: proportion, ratio, mean"):
        Metric("x", "median")
