"""The tables of `bench prompt`: one summary row per (length, method, keep) with compression time beside the
end-to-end request time (compression + answer) and its paired ratio to the uncompressed request, and the
break-even table: from which context length each method's whole request is no slower than the uncompressed one
on this machine."""

from __future__ import annotations

import statistics
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

__all__ = ["SUMMARY_COLUMNS", "break_even_rows", "prompt_summary", "write_prompt_report"]

#: the summary table's columns: compression and end-to-end seconds side by side, then the paired ratio
SUMMARY_COLUMNS = ["method", "keep", "tokens", "achieved", "passcode_kept", "correct", "compress_s", "e2e_s",
                   "base_e2e_s", "e2e_speedup", "e2e_speedup_range", "answer_s", "compress_per_forward",
                   "achieved_min", "achieved_max", "max_rel_dev", "forward_s", "compress_per_base_answer"]


def _med(xs: list[float]) -> float:
    return statistics.median(xs) if xs else float("nan")


def prompt_summary(method: str, keep: float, length: int, rs: list[dict[str, Any]],
                   base: list[dict[str, Any]]) -> dict[str, Any]:
    """One summary row from a cell's sample rows ``rs`` and its uncompressed rows ``base`` (same prompts, same
    cell). ``e2e_speedup`` = median over prompts of (uncompressed request seconds / this method's request
    seconds, compression + answer) for the same prompt, with its quartiles and extremes; > 1: faster."""
    from .kv.timing import paired_stats

    ok = [r for r in rs if not r.get("error")]
    n = len(rs)
    if not ok:
        return {"method": method, "keep": keep, "tokens": length, "n": n,
                "error": rs[0].get("error") if rs else "no rows"}
    by_sample = {b["sample"]: b for b in base}
    paired = [(by_sample[r["sample"]], r) for r in ok if r["sample"] in by_sample]
    ratios = paired_stats([b["e2e_s"] for b, _ in paired], [r["e2e_s"] for _, r in paired])
    ach = [r["kept_ratio"] for r in ok]
    be = _med([b["e2e_s"] for b in base])
    cpf = [r["compress_s"] / b["forward_s"] for b, r in paired if b.get("forward_s")]
    return {
        "method": method, "keep": keep, "tokens": length, "n": n,
        "prompt_tokens": _med([b["n_tokens"] for b in base]),
        "achieved": statistics.fmean(ach), "achieved_min": min(ach), "achieved_max": max(ach),
        "max_rel_dev": max(abs(a - keep) / keep for a in ach),
        "passcode_kept": f"{sum(r['passcode_kept'] for r in ok)}/{n}",
        "correct": f"{sum(r['correct'] for r in ok)}/{n}",
        "compress_s": _med([r["compress_s"] for r in ok]), "answer_s": _med([r["answer_s"] for r in ok]),
        "e2e_s": _med([r["e2e_s"] for r in ok]), "base_e2e_s": be,
        "e2e_speedup": ratios["ratio"], "e2e_speedup_q1": ratios["q1"], "e2e_speedup_q3": ratios["q3"],
        "e2e_speedup_min": ratios["min"], "e2e_speedup_max": ratios["max"],
        "compress_per_base_answer": _med([r["compress_s"] for r in ok]) / be if be else float("nan"),
        "forward_s": _med([b["forward_s"] for b in base if "forward_s" in b]), "compress_per_forward": _med(cpf),
    }


def break_even_rows(rows: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """Per (method, keep) measured at two or more lengths: the end-to-end ratio at each length and the
    break-even length, the shortest measured length from which the ratio is >= 1 at it and at every longer
    measured length ("<= L": already at the shortest; "> L": not up to the longest)."""
    groups: dict[tuple[str, float], dict[int, float]] = {}
    for r in rows:
        if r.get("method") not in (None, "none") and r.get("e2e_speedup") is not None and r.get("tokens"):
            groups.setdefault((r["method"], r["keep"]), {})[int(r["tokens"])] = float(r["e2e_speedup"])
    out = []
    for (method, keep), by_len in groups.items():
        if len(by_len) < 2:
            continue
        lengths = sorted(by_len)
        pays = [L for i, L in enumerate(lengths) if all(by_len[x] >= 1.0 for x in lengths[i:])]
        if not pays:
            verdict = f"> {lengths[-1]}"
        elif pays[0] == lengths[0]:
            verdict = f"<= {lengths[0]}"
        else:
            verdict = str(pays[0])
        out.append({"method": method, "keep": keep, **{f"e2e x @{L}": by_len[L] for L in lengths},
                    "pays off from (tokens)": verdict})
    return out


def _display(r: Mapping[str, Any]) -> dict[str, Any]:
    row = {c: r.get(c) for c in SUMMARY_COLUMNS}
    if r.get("e2e_speedup_min") is not None:
        row["e2e_speedup_range"] = f"[{r['e2e_speedup_min']:.2f}, {r['e2e_speedup_max']:.2f}]"
    if r.get("error"):
        row["method"] = f"{r.get('method')} (error: {str(r['error'])[:80]})"
    return row


def write_prompt_report(rows: Sequence[Mapping[str, Any]], config: Mapping[str, Any], outdir: Path) -> str:
    """Write ``summary.txt`` (summary + break-even tables) and ``report.html`` into ``outdir``; returns the text."""
    from .report import format_table, html_report

    rows = sorted(rows, key=lambda r: (r.get("tokens") or 0, r.get("method") != "none"))
    summary = [_display(r) for r in rows]
    lengths = sorted({int(r["tokens"]) for r in rows if r.get("tokens")})
    title = (f"passcode retrieval, Gemma 3 270M, {config['n_samples']} prompts per length of ~"
             f"{', '.join(map(str, lengths))} tokens ({config['threads']} thread(s), {config.get('clock', 'wall')} clock; "
             f"seconds are medians over prompts; "
             f"e2e = compression + answer; e2e_speedup = median of per-prompt uncompressed/compressed request "
             f"seconds [min, max])")
    tables = [("summary", summary)]
    text = format_table(summary, SUMMARY_COLUMNS, title=title)
    be = break_even_rows(rows)
    if be:
        tables.append(("break-even: end-to-end request time vs the uncompressed request, per context length", be))
        text += "\n\n" + format_table(be, title="break-even on this machine: e2e ratio (>1: the whole request is "
                                                "faster than the uncompressed one) per context length")
    outdir.mkdir(parents=True, exist_ok=True)
    (outdir / "summary.txt").write_text(text + "\n")
    html_report("tokenreduce: prompt compression (passcode, Gemma 3 270M)", {"config": dict(config)}, tables, [],
                outdir / "report.html",
                notes="achieved: Gemma tokens of the compressed context / original (mean, min, max); passcode_kept "
                      "and correct are counts out of the prompts; seconds are medians over prompts; "
                      "e2e = compression + answer, the whole request; base = the uncompressed prompt answered in "
                      "the same cell, interleaved prompt by prompt; e2e_speedup = median over prompts of base e2e / "
                      "e2e of the same prompt [min, max]; forward_s = one plain fp32 forward of Gemma over the "
                      "context in the same cell, compress_per_forward = median over prompts of compression "
                      "seconds / that forward. Break-even: the shortest measured length from which e2e_speedup >= 1 "
                      "at every longer measured length. Peer packages compress in their own process (before the "
                      "answers, which run here).")
    return text
