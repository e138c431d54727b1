"""A study's report: ``summary.txt`` and ``summary.json`` (verdicts, tables), ``plot.png`` (the first part's
metric against keep per method, the unreduced model as a band) and ``report.html`` (the verdicts first, then the
tables: condition, n, metric, 95% CI, difference against the unreduced model with its CI, p-values, then the
plot). Tables and HTML come from :mod:`tokenreduce.bench.report`."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from ..bench.report import format_table, html_report
from ..bench.results import to_jsonable
from .analysis import BASELINE
from .registry import Part, Study, StudyResult

__all__ = ["display_rows", "metric_plot", "write_report"]


def _num(v: Any) -> str:
    return "" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:.3f}"


def display_rows(part: Part) -> list[dict[str, Any]]:
    """The table as the report shows it: condition, n, metric, 95% CI, difference with CI, p, Holm p."""
    name = part.hypothesis.metric.name
    out = []
    for r in part.table:
        row = {k: r[k] for k in part.strata}
        row.update(method=r["method"], keep=r["keep"], n=r["n"], **{name: r[name]},
                   ci95=f"[{_num(r['ci_low'])}, {_num(r['ci_high'])}]")
        if "diff" in r:
            row.update(diff=f"{r['diff']:+.3f} [{r['diff_low']:+.3f}, {r['diff_high']:+.3f}]", p=r["p"],
                       p_holm=r.get("p_holm"), test=r["test"])
        out.append(row)
    return out


def metric_plot(part: Part, path: Path) -> Path | None:
    """The part's metric against keep, one line per method with 95% CI bars, the unreduced model as a dashed
    line with its CI band; one panel per stratum. None when the table is empty."""
    if not part.table:
        return None
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    name = part.hypothesis.metric.name
    strata = list(dict.fromkeys(tuple(r.get(k) for k in part.strata) for r in part.table))
    fig = Figure(figsize=(5.2 * len(strata), 4.2))
    FigureCanvasAgg(fig)
    for j, s in enumerate(strata):
        ax = fig.add_subplot(1, len(strata), j + 1)
        rows = [r for r in part.table if tuple(r.get(k) for k in part.strata) == s]
        for r in rows:
            if r["method"] == BASELINE:
                ax.axhline(r[name], color="black", ls="--", lw=1, label="unreduced")
                ax.axhspan(r["ci_low"], r["ci_high"], color="0.85", zorder=0)
        methods = list(dict.fromkeys(r["method"] for r in rows if r["method"] != BASELINE))
        for i, m in enumerate(methods):
            mr = sorted((r for r in rows if r["method"] == m), key=lambda r: r["keep"])
            xs = [r["keep"] for r in mr]
            ys = [r[name] for r in mr]
            err = [[max(0.0, y - r["ci_low"]) for y, r in zip(ys, mr)], [max(0.0, r["ci_high"] - y) for y, r in zip(ys, mr)]]
            ax.errorbar([x * (1 + 0.015 * (i - len(methods) / 2)) for x in xs], ys, yerr=err, marker="o", ms=4,
                        capsize=2, lw=1.2, label=m, color=f"C{i % 10}")
        ax.set_xscale("log")
        keeps = sorted({r["keep"] for r in rows if r["method"] != BASELINE})
        ax.minorticks_off()
        ax.set_xticks(keeps, labels=[f"{k:g}" for k in keeps])
        ax.set_xlabel("keep")
        ax.set_ylabel(name)
        ax.set_title(", ".join(f"{k}={v}" for k, v in zip(part.strata, s)) or part.name, fontsize=9)
        ax.grid(True, alpha=0.3)
        if j == 0:
            ax.legend(fontsize=7, loc="best")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    return path


def write_report(study: Study, result: StudyResult, cfg: Any, meta: dict[str, Any], out: Path,
                 smoke: bool) -> dict[str, Path]:
    """Writes the report files into ``out``; returns their paths."""
    out.mkdir(parents=True, exist_ok=True)
    title = f"Study: {study.name}" + (" (--smoke: random weights, no claim)" if smoke else "")
    lines = [title, ""]
    for p in result.parts:
        lines += [f"[{p.name}] verdict: {p.verdict.line}", f"  hypothesis: {p.hypothesis.text}",
                  f"  test: {p.hypothesis.test}", ""]
    lines += [f"note: {n}" for n in result.notes]
    for p in result.parts:
        lines += ["", format_table(display_rows(p), title=f"{p.name}: {p.hypothesis.metric.name}")]
    for caption, rows in result.tables:
        lines += ["", format_table(rows, title=caption) if rows else f"{caption}: (no rows)"]
    summary_txt = out / "summary.txt"
    summary_txt.write_text("\n".join(lines) + "\n")
    summary_json = out / "summary.json"
    summary_json.write_text(json.dumps(to_jsonable({
        "study": study.name, "smoke": smoke, "config": cfg,
        "parts": [{"name": p.name, "hypothesis": p.hypothesis.text, "test": p.hypothesis.test,
                   "metric": p.hypothesis.metric.name, "verdict": p.verdict.label, "verdict_line": p.verdict.line,
                   "table": p.table} for p in result.parts],
        "tables": [{"caption": c, "rows": r} for c, r in result.tables], "notes": result.notes}),
        allow_nan=True, indent=1))
    plot = metric_plot(result.parts[0], out / "plot.png") if result.parts else None
    notes = " ".join([*(f"VERDICT [{p.name}]: {p.verdict.line}. Hypothesis: {p.hypothesis.text} Test: "
                        f"{p.hypothesis.test}" for p in result.parts), *result.notes])
    tables = [(f"{p.name}: {p.hypothesis.metric.name} per condition", display_rows(p)) for p in result.parts]
    html = html_report(title, {**meta, "config": to_jsonable(cfg)}, [*tables, *result.tables],
                       [("metric vs keep per method", plot)] if plot else [], out / "report.html", notes=notes)
    paths = {"summary": summary_txt, "json": summary_json, "html": html}
    if plot:
        paths["plot"] = plot
    return paths
