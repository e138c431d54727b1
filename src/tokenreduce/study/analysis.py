"""From per-item rows to a study's table and verdict.

:func:`compare` pairs every condition with the unreduced model on the same items (per stratum, e.g. context
length) and gives, per condition: n, the metric with its 95% CI, the difference against the unreduced model with
its paired-bootstrap CI, and a paired p-value (exact McNemar for right/wrong, the paired bootstrap otherwise).
:func:`decide` applies a :class:`Hypothesis`, stated before the run, to that table: Holm-adjusted p-values over
the tested family, and one verdict line, *supported* / *not supported* / *mixed*, with the effect size, or no
verdict when n is too small for the CI the study promises.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from .stats import bootstrap_ci, holm, mcnemar_exact, min_n_for_halfwidth, paired_bootstrap, wilson

__all__ = ["BASELINE", "KINDS", "Hypothesis", "Metric", "Verdict", "compare", "decide"]

#: the condition name of the unreduced model in every study
BASELINE = "none"
KINDS = ("proportion", "ratio", "mean")
Row = dict[str, Any]


def _ratio(v: np.ndarray) -> float:
    den = v[:, 1].sum()
    return float(v[:, 0].sum() / den) if den else math.nan


@dataclass(frozen=True)
class Metric:
    """What a table measures. ``field``: the item rows' column; ``kind``: ``"proportion"`` (a bool per item:
    Wilson CI, McNemar), ``"ratio"`` (a (numerator, denominator) pair per item, the ratio of sums: bootstrap)
    or ``"mean"`` (a number per item: bootstrap); ``higher_is_better`` sets the direction of an improvement."""

    field: str
    kind: str = "proportion"
    higher_is_better: bool = True
    label: str = ""

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"Metric kind {self.kind!r} is not accepted; accepted: {', '.join(KINDS)}")

    @property
    def name(self) -> str:
        return self.label or self.field


def _values(rows: Sequence[Row], metric: Metric) -> np.ndarray:
    if metric.kind == "ratio":
        return np.array([[float(a), float(b)] for a, b in (r[metric.field] for r in rows)])
    return np.array([float(r[metric.field]) for r in rows])


def _stat(metric: Metric) -> Callable[[np.ndarray], float] | None:
    return _ratio if metric.kind == "ratio" else None


def _estimate(rows: Sequence[Row], metric: Metric, seed: int) -> tuple[float, float, float]:
    if metric.kind == "proportion":
        return wilson(sum(bool(r[metric.field]) for r in rows), len(rows))
    v, stat = _values(rows, metric), _stat(metric)
    return bootstrap_ci(v, stat, seed=seed) if stat else bootstrap_ci(v, seed=seed)


def _difference(base: Sequence[Row], rows: Sequence[Row], metric: Metric, seed: int) -> dict[str, float]:
    a, b, stat = _values(base, metric), _values(rows, metric), _stat(metric)
    d = paired_bootstrap(a, b, stat, seed=seed) if stat else paired_bootstrap(a, b, seed=seed)
    if metric.kind == "proportion":
        d["p"] = mcnemar_exact([bool(x) for x in a], [bool(x) for x in b])["p"]
    return d


def compare(items: Sequence[Row], metric: Metric, strata: Sequence[str] = (), condition: Sequence[str] =
            ("method", "keep"), item: str = "item", seed: int = 0) -> list[Row]:
    """One row per (stratum, condition): the unreduced model (``method`` :data:`BASELINE`) first, then the
    others paired with it on the items both answered (rows with an ``error`` or a missing metric are left out
    of both). Columns: the strata and condition fields, ``n``, the metric, ``ci_low``/``ci_high``, ``diff``
    (condition - unreduced) with ``diff_low``/``diff_high``, ``p`` and ``test``."""
    usable = [r for r in items if not r.get("error") and r.get(metric.field) is not None]
    groups: dict[tuple[Any, ...], dict[tuple[Any, ...], dict[Any, Row]]] = {}
    for r in usable:
        s = tuple(r.get(k) for k in strata)
        c = tuple(r.get(k) for k in condition)
        groups.setdefault(s, {}).setdefault(c, {})[r[item]] = r
    test = "McNemar exact" if metric.kind == "proportion" else "paired bootstrap"
    out: list[Row] = []
    for s, conds in groups.items():
        base_key = next((c for c in conds if c[0] == BASELINE), None)
        head = dict(zip(strata, s))
        if base_key is None:
            continue
        base = conds[base_key]
        ordered = [base_key] + [c for c in conds if c != base_key]
        for c in ordered:
            ids = [i for i in conds[c] if i in base]
            if not ids:
                continue
            rows = [conds[c][i] for i in ids]
            m, lo, hi = _estimate(rows, metric, seed)
            row: Row = {**head, **dict(zip(condition, c)), "n": len(ids), metric.name: m, "ci_low": lo, "ci_high": hi}
            if c != base_key:
                d = _difference([base[i] for i in ids], rows, metric, seed)
                row.update(diff=d["diff"], diff_low=d["low"], diff_high=d["high"], p=d["p"], test=test)
            out.append(row)
    return out


@dataclass(frozen=True)
class Hypothesis:
    """A claim stated before the run. ``treated(row)``: the conditions it predicts an improvement for over the
    unreduced model; ``contrast(row)``: those it predicts none for (None: no prediction); ``max_halfwidth``: the
    95% CI half-width (at p = 1/2) the study promises for a proportion: a smaller n gets no verdict
    (``min_items`` for the other kinds). ``margin``: a non-inferiority claim instead -- the treated conditions
    are no worse than the unreduced model by more than ``margin`` (the CI's worse bound of the difference)."""

    text: str
    test: str
    metric: Metric
    treated: Callable[[Row], bool]
    contrast: Callable[[Row], bool] | None = None
    alpha: float = 0.05
    max_halfwidth: float = 0.15
    margin: float | None = None
    min_items: int = 10


@dataclass(frozen=True)
class Verdict:
    """``label``: supported / not supported / mixed / no verdict; ``line``: the sentence with the effect size."""

    label: str
    line: str
    effect: Row | None = None

    def __str__(self) -> str:
        return self.line


def _fmt(r: Row, metric: Metric, strata: Sequence[str]) -> str:
    where = ", ".join(f"{k}={r[k]}" for k in strata if k in r)
    cond = f"{r.get('method')} keep={r.get('keep')}" + (f" ({where})" if where else "")
    return (f"{cond}: {metric.name} {r[metric.name]:.3f} vs unreduced, difference {r['diff']:+.3f} "
            f"[95% CI {r['diff_low']:+.3f}, {r['diff_high']:+.3f}], Holm p={r['p_holm']:.3g}")


def _non_inferior(family: list[Row], hyp: Hypothesis, strata: Sequence[str]) -> Verdict:
    m, margin = hyp.metric, float(hyp.margin or 0.0)
    treated = [r for r in family if hyp.treated(r)]
    for r in family:
        worst = r["diff_high"] if not m.higher_is_better else -r["diff_low"]
        r["non_inferior"] = bool(worst < margin)
    ok = [r for r in treated if r["non_inferior"]]
    label = "supported" if len(ok) == len(treated) else "not supported" if not ok else "mixed"
    worst_row = max(treated, key=lambda r: r["diff_high"] if not m.higher_is_better else -r["diff_low"])
    where = ", ".join(f"{k}={worst_row[k]}" for k in strata if k in worst_row)
    line = (f"{label} ({len(ok)} of {len(treated)} treated conditions within the margin {margin:.3g}); "
            f"{worst_row['method']}{' (' + where + ')' if where else ''}: {m.name} difference "
            f"{worst_row['diff']:+.3f} [95% CI {worst_row['diff_low']:+.3f}, {worst_row['diff_high']:+.3f}]")
    return Verdict(label, line, worst_row)


def decide(table: list[Row], hyp: Hypothesis, strata: Sequence[str] = ()) -> Verdict:
    """Adds ``p_holm`` and ``significant`` to the tested rows of ``table`` (the family: treated and contrast
    conditions) and returns the verdict: *no verdict* when some tested condition has fewer items than the CI
    needs; *not supported* when no treated condition improves significantly; *mixed* when one does but another
    treated condition is significantly worse or a contrast condition improves too; else *supported*."""
    m = hyp.metric
    family = [r for r in table if r.get("method") != BASELINE and
              (hyp.treated(r) or (hyp.contrast is not None and hyp.contrast(r)))]
    if not family:
        return Verdict("no verdict", "no verdict: the run holds no condition the hypothesis is about")
    small = min(r["n"] for r in family)
    if m.kind == "proportion":
        need = min_n_for_halfwidth(hyp.max_halfwidth)
        if small < need:
            return Verdict("no verdict", f"no verdict: n={small} items per condition is too small for a 95% CI "
                                         f"of half-width <= {hyp.max_halfwidth} (needs n >= {need})")
    elif small < hyp.min_items:
        return Verdict("no verdict", f"no verdict: n={small} items per condition, fewer than the {hyp.min_items} "
                                     f"the bootstrap CI needs")
    if hyp.margin is not None:
        return _non_inferior(family, hyp, strata)
    for r, p in zip(family, holm([r["p"] for r in family])):
        r["p_holm"] = p
        sign = 1 if m.higher_is_better else -1
        r["significant"] = bool(p < hyp.alpha)
        r["better"] = bool(p < hyp.alpha and sign * r["diff"] > 0)
        r["worse"] = bool(p < hyp.alpha and sign * r["diff"] < 0)
    treated = [r for r in family if hyp.treated(r)]
    better = [r for r in treated if r["better"]]
    worse = [r for r in treated if r["worse"]]
    contrast_better = [r for r in family if hyp.contrast is not None and hyp.contrast(r) and r["better"]]
    sign = 1 if m.higher_is_better else -1
    counts = f"{len(better)} of {len(treated)} treated conditions significantly better, {len(worse)} worse"
    if hyp.contrast is not None:
        counts += f"; {len(contrast_better)} contrast condition(s) significantly better"
    if not better:
        best = max(treated, key=lambda r: sign * r["diff"]) if treated else None
        return Verdict("not supported", f"not supported ({counts}); largest effect: "
                       + (_fmt(best, m, strata) if best else "none"), best)
    top = max(better, key=lambda r: sign * r["diff"])
    label = "mixed" if worse or contrast_better else "supported"
    return Verdict(label, f"{label} ({counts}); largest effect: {_fmt(top, m, strata)}", top)
