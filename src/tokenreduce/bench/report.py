"""Presentation of benchmark results: terminal tables, Pareto plots, self-contained HTML.

Rows are plain dicts (as written by :class:`~tokenreduce.bench.results.ResultWriter`).
Spread columns follow the convention ``<col>_low`` / ``<col>_high`` (asymmetric
bracket, e.g. from :func:`~tokenreduce.bench.timing.speedup`) or ``<col>_err``
(symmetric); plots use them as error bars when present.
"""

from __future__ import annotations

import base64
import html
import io
import json
import math
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

__all__ = [
    "BASELINE_NAMES",
    "format_table",
    "format_value",
    "html_report",
    "pareto_front",
    "pareto_plot",
]

#: Values of the ``group`` column that mark the unreduced model.
BASELINE_NAMES: tuple[str, ...] = ("none", "unreduced", "baseline")

_MIME = {".png": "image/png", ".jpg": "image/jpeg", ".jpeg": "image/jpeg", ".svg": "image/svg+xml", ".gif": "image/gif"}


# ----------------------------------------------------------------------------- formatting
def format_value(v: Any, digits: int = 4) -> str:
    """Format one cell: ~``digits`` significant digits for floats, thousands separators
    for large numbers, scientific notation for tiny/huge floats, ``""`` for ``None``."""
    if v is None:
        return ""
    if isinstance(v, bool):
        return str(v)
    if isinstance(v, int):
        return f"{v:,}" if abs(v) >= 10_000 else str(v)
    if isinstance(v, float):
        if math.isnan(v) or math.isinf(v):
            return str(v)
        a = abs(v)
        if a == 0:
            return "0"
        if a >= 1e7 or a < 1e-3:
            return f"{v:.{max(digits - 1, 0)}e}"
        if a >= 10**digits:
            return f"{v:,.0f}"
        return f"{v:.{digits}g}"
    if isinstance(v, (list, tuple)):
        if len(v) > 6:
            return f"[{len(v)} values]"
        return "[" + ", ".join(format_value(x, digits) for x in v) + "]"
    if isinstance(v, dict):
        text = json.dumps(v, default=str)
        return text if len(text) <= 60 else text[:57] + "..."
    return str(v)


def _columns(rows: Sequence[dict[str, Any]], columns: Sequence[str] | None) -> list[str]:
    if columns is not None:
        return list(columns)
    cols: dict[str, None] = {}
    for row in rows:
        for k in row:
            cols.setdefault(k, None)
    return list(cols)


def _is_numeric_column(rows: Sequence[dict[str, Any]], col: str) -> bool:
    vals = [r.get(col) for r in rows if r.get(col) is not None]
    return bool(vals) and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in vals)


def _format_column(values: Sequence[Any], digits: int) -> list[str]:
    """Format one column's cells. Numeric columns containing floats get a common number
    of decimals (``digits`` significant digits for the largest magnitude) so that
    they line up; everything else goes through :func:`format_value`."""
    nums = [v for v in values if v is not None]
    numeric = bool(nums) and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in nums)
    if not numeric or not any(isinstance(v, float) for v in nums):
        return [format_value(v, digits) for v in values]
    finite = [abs(float(v)) for v in nums if math.isfinite(v)]
    top = max(finite, default=0.0)
    if top == 0.0 or top >= 1e7 or top < 1e-3:
        return [format_value(v, digits) for v in values]
    decimals = min(max(digits - 1 - math.floor(math.log10(top)), 0), 8)
    return [
        "" if v is None else (str(float(v)) if not math.isfinite(v) else f"{float(v):,.{decimals}f}") for v in values
    ]


def _cells(rows: Sequence[dict[str, Any]], cols: Sequence[str], digits: int) -> list[list[str]]:
    by_col = [_format_column([r.get(c) for r in rows], digits) for c in cols]
    return [list(line) for line in zip(*by_col, strict=True)] if cols else [[] for _ in rows]


def format_table(
    rows: Sequence[dict[str, Any]],
    columns: Sequence[str] | None = None,
    *,
    title: str | None = None,
    digits: int = 4,
    use_rich: bool = False,
) -> str:
    """Render rows as an aligned text table (numbers right-aligned, float columns with
    a common number of decimals).

    ``columns`` defaults to the union of row keys in first-seen order; missing
    cells are blank. ``use_rich=True`` renders a box-drawn table with rich (if
    installed) instead of plain ASCII. Returns the string (no trailing newline).
    """
    cols = _columns(rows, columns)
    numeric = {c: _is_numeric_column(rows, c) for c in cols}
    cells = _cells(rows, cols, digits)
    if use_rich:
        try:
            from rich.console import Console
            from rich.table import Table
        except ImportError:
            pass
        else:
            table = Table(title=title)
            for c in cols:
                table.add_column(c, justify="right" if numeric[c] else "left")
            for line in cells:
                table.add_row(*line)
            buf = io.StringIO()
            width = sum(max([len(c), *(len(x[i]) for x in cells)]) + 3 for i, c in enumerate(cols)) + 4
            Console(file=buf, width=max(width, 40), color_system=None, force_terminal=False).print(table)
            return buf.getvalue().rstrip("\n")
    widths = [max([len(c), *(len(line[i]) for line in cells)]) for i, c in enumerate(cols)]

    def fmt(values: Sequence[str]) -> str:
        parts = [v.rjust(w) if numeric[c] else v.ljust(w) for v, w, c in zip(values, widths, cols, strict=True)]
        return "  ".join(parts).rstrip()

    out = [] if title is None else [title]
    out.append(fmt(cols))
    out.append("  ".join("-" * w for w in widths))
    out.extend(fmt(line) for line in cells)
    return "\n".join(out)


# ----------------------------------------------------------------------------- Pareto plot
def _num(v: Any) -> float | None:
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        return None
    f = float(v)
    return None if math.isnan(f) else f


def pareto_front(rows: Iterable[dict[str, Any]], x: str = "speedup", y: str = "accuracy") -> list[dict[str, Any]]:
    """Rows not dominated in (``x``, ``y``), both maximised; sorted by ``x`` ascending.

    A row is dominated if another has ``x`` and ``y`` at least as large and one of
    them strictly larger. Rows with a missing/NaN ``x`` or ``y`` are ignored.
    """
    pts = [r for r in rows if _num(r.get(x)) is not None and _num(r.get(y)) is not None]
    pts.sort(key=lambda r: (-float(r[x]), -float(r[y])))
    front: list[dict[str, Any]] = []
    best_y = -math.inf
    for r in pts:
        if float(r[y]) > best_y:
            front.append(r)
            best_y = float(r[y])
    return front[::-1]


def _err(rows: Sequence[dict[str, Any]], col: str) -> list[list[float]] | list[float] | None:
    """Error-bar extents for matplotlib from ``<col>_low/_high`` or ``<col>_err`` columns."""
    lo_k, hi_k, err_k = f"{col}_low", f"{col}_high", f"{col}_err"
    if all(_num(r.get(lo_k)) is not None and _num(r.get(hi_k)) is not None for r in rows):
        lower = [max(float(r[col]) - float(r[lo_k]), 0.0) for r in rows]
        upper = [max(float(r[hi_k]) - float(r[col]), 0.0) for r in rows]
        return [lower, upper]
    if all(_num(r.get(err_k)) is not None for r in rows):
        return [float(r[err_k]) for r in rows]
    return None


def pareto_plot(
    rows: Sequence[dict[str, Any]],
    x: str = "speedup",
    y: str = "accuracy",
    group: str = "method",
    path: str | Path = "pareto.png",
    *,
    label: str | None = "keep",
    baseline: str | Sequence[str] = BASELINE_NAMES,
    title: str | None = None,
    xlabel: str | None = None,
    ylabel: str | None = None,
    dpi: int = 150,
) -> Path:
    """Plot ``y`` against ``x`` as a PNG: one line per ``group`` value, points ordered by
    ``label`` (e.g. keep ratio, annotated next to each point) when every row of the
    group has it, else by ``x``. Rows whose ``group`` is in ``baseline`` (the unreduced
    model) are drawn as a star; the Pareto frontier over all rows (both axes
    maximised) is highlighted. Error bars come from ``<x>_low``/``<x>_high`` or
    ``<x>_err`` columns (same for ``y``) when present. Uses the Agg canvas
    directly (no pyplot, no global backend change). Returns the path written.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    base_names = {baseline} if isinstance(baseline, str) else set(baseline)
    usable = [r for r in rows if _num(r.get(x)) is not None and _num(r.get(y)) is not None]
    if not usable:
        raise ValueError(f"no rows with numeric {x!r} and {y!r}")

    fig = Figure(figsize=(7.0, 4.8))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)

    front = pareto_front(usable, x, y)
    if len(front) > 1:
        ax.plot(
            [float(r[x]) for r in front],
            [float(r[y]) for r in front],
            "-",
            color="0.55",
            lw=7,
            alpha=0.3,
            solid_capstyle="round",
            zorder=1,
            label="Pareto frontier",
        )
    ax.scatter(
        [float(r[x]) for r in front],
        [float(r[y]) for r in front],
        s=150,
        facecolors="none",
        edgecolors="0.25",
        linewidths=1.2,
        zorder=4,
        label=None if len(front) > 1 else "Pareto frontier",
    )

    groups: dict[str, list[dict[str, Any]]] = {}
    for r in usable:
        groups.setdefault(str(r.get(group)), []).append(r)
    colors = iter(f"C{i}" for i in range(1_000))
    for name, grp in groups.items():
        is_base = name in base_names
        if label and all(_num(r.get(label)) is not None for r in grp):
            grp = sorted(grp, key=lambda r: -float(r[label]))
        else:
            grp = sorted(grp, key=lambda r: float(r[x]))
        xs = [float(r[x]) for r in grp]
        ys = [float(r[y]) for r in grp]
        color = "black" if is_base else next(colors)
        xerr, yerr = _err(grp, x), _err(grp, y)
        if xerr is not None or yerr is not None:
            ax.errorbar(
                xs, ys, xerr=xerr, yerr=yerr, fmt="none", ecolor=color, elinewidth=1, capsize=3, alpha=0.7, zorder=2
            )
        if is_base:
            ax.scatter(
                xs,
                ys,
                marker="*",
                s=260,
                color="gold",
                edgecolors="black",
                linewidths=0.8,
                zorder=5,
                label=f"{name} (unreduced)",
            )
        else:
            ax.plot(xs, ys, "-o", color=color, ms=5, lw=1.5, zorder=3, label=name)
        if label and not is_base:
            for r, xv, yv in zip(grp, xs, ys, strict=True):
                if _num(r.get(label)) is not None:
                    ax.annotate(
                        format_value(r[label], 3),
                        (xv, yv),
                        textcoords="offset points",
                        xytext=(4, 4),
                        fontsize=7,
                        color=color,
                    )

    ax.set_xlabel(xlabel or x)
    ax.set_ylabel(ylabel or y)
    if title:
        ax.set_title(title)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8, loc="best")
    fig.tight_layout()
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=dpi, format="png")
    return out


# ----------------------------------------------------------------------------- HTML
_CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:2em auto;max-width:1100px;color:#222;padding:0 1em}
h1{font-size:1.6em;border-bottom:2px solid #ddd;padding-bottom:.3em}
h2{font-size:1.2em;margin-top:1.8em}
table{border-collapse:collapse;margin:.5em 0 1em;font-size:.9em}
th,td{border:1px solid #ddd;padding:.3em .6em;vertical-align:top}
th{background:#f3f3f3;text-align:left}
td.num{text-align:right;font-variant-numeric:tabular-nums;font-family:ui-monospace,Menlo,Consolas,monospace}
tr:nth-child(even) td{background:#fafafa}
table.meta th{width:14em}
figure{margin:1em 0}
figure img{max-width:100%;border:1px solid #eee}
figcaption{font-size:.9em;color:#555}
caption{caption-side:top;text-align:left;font-weight:600;padding:.3em 0}
"""


def _flatten(meta: dict[str, Any], prefix: str = "") -> list[tuple[str, Any]]:
    items: list[tuple[str, Any]] = []
    for k, v in meta.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict) and v:
            items.extend(_flatten(v, key + "."))
        else:
            items.append((key, v))
    return items


def _html_table(rows: Sequence[dict[str, Any]], caption: str | None = None, digits: int = 4) -> str:
    cols = _columns(rows, None)
    numeric = {c: _is_numeric_column(rows, c) for c in cols}
    out = ["<table>"]
    if caption:
        out.append(f"<caption>{html.escape(caption)}</caption>")
    out.append("<thead><tr>" + "".join(f"<th>{html.escape(c)}</th>" for c in cols) + "</tr></thead><tbody>")
    for line in _cells(rows, cols, digits):
        tds = [
            ('<td class="num">' if numeric[c] else "<td>") + html.escape(cell) + "</td>"
            for c, cell in zip(cols, line, strict=True)
        ]
        out.append("<tr>" + "".join(tds) + "</tr>")
    out.append("</tbody></table>")
    return "\n".join(out)


def html_report(
    title: str,
    meta: dict[str, Any],
    tables: Sequence[tuple[str, Sequence[dict[str, Any]]]],
    images: Sequence[tuple[str, str | Path]],
    path: str | Path,
    *,
    notes: str | None = None,
    digits: int = 4,
) -> Path:
    """Write a self-contained HTML report (inline CSS, images embedded as base64
    data URIs) with the tables, the images and the run metadata (nested dicts
    flattened to dotted keys). ``notes`` is an optional paragraph of plain text shown
    under the title. Returns the path written.
    """
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        f"<title>{html.escape(title)}</title>",
        f"<style>{_CSS}</style></head><body>",
        f"<h1>{html.escape(title)}</h1>",
    ]
    if notes:
        parts.append(f"<p>{html.escape(notes)}</p>")
    for caption, rows in tables:
        parts.append(f"<h2>{html.escape(caption)}</h2>")
        parts.append(_html_table(rows, digits=digits) if rows else "<p><em>(no rows)</em></p>")
    for caption, img in images:
        img_path = Path(img)
        mime = _MIME.get(img_path.suffix.lower(), "application/octet-stream")
        data = base64.b64encode(img_path.read_bytes()).decode("ascii")
        parts.append(
            f'<figure><img src="data:{mime};base64,{data}" alt="{html.escape(caption, quote=True)}">'
            f"<figcaption>{html.escape(caption)}</figcaption></figure>"
        )
    parts.append("<h2>Environment</h2>")
    meta_rows = "".join(
        f"<tr><th>{html.escape(k)}</th><td>{html.escape(format_value(v, digits) if not isinstance(v, str) else v)}</td></tr>"
        for k, v in _flatten(meta)
    )
    parts.append(f'<table class="meta"><tbody>{meta_rows}</tbody></table>')
    parts.append("</body></html>")
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("\n".join(parts), encoding="utf-8")
    return out
