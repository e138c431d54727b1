"""The `bench kv` report: tables (``<out>/report.txt``), plots and ``<out>/report.html`` from ``<out>/kv.jsonl``
(the latest run per configuration, :func:`.runs.latest_runs`) and, when present, kvpress's ``kvpress.jsonl``."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ..report import format_table, html_report, pareto_plot
from .agreement import agreement_rows
from .config import VARIANTS
from .runs import latest_runs

__all__ = ["REPORT_NOTES", "build_report"]

Table = tuple[str, list[dict[str, Any]]]
Image = tuple[str, Path]

REPORT_NOTES = (
    "KV-cache reduction measured on CPU (fp32, SDPA). kv_fraction = bytes of the real cache tensors right after the "
    "prompt / the bytes transformers' default DynamicCache(config) holds for the same prompt (Gemma 3: 15 sliding "
    "layers hold their last 511 entries, 3 global layers the whole prompt); every layer is compressed. Passcode "
    "cells are evaluated from one captured prompt forward replayed per method (adapters.llm.replay_prefill; "
    "replay_checked cells were also run through generate(): replay_mismatches must be 0). tokenselect selects per "
    "query from the whole cache (kv_fraction 1 by design). kvpress rows: 'all' = its pipeline's config-less cache "
    "(sliding layers hold the whole prompt, so its fractions are relative to a 1.8x larger cache); 'global' = its "
    "Gemma 3 default (sliding layers untouched: real fraction 0.93/0.85/0.78 at keep 0.75/0.5/0.25); '(question "
    "stepwise)' = the question fed one token per forward, which avoids the non-causal question mask transformers "
    "5.2 builds for a multi-token forward on a compressed cache. Timing: '+ chunked' = generate(prefill_chunk_size="
    "512); the decoding methods (streaming-llm, tova) evict between chunks, snapkv/knorm compress once after the "
    "full prompt. 'vs none+chunked' compares with the unreduced model under the same chunked prefill (chunking "
    "alone is faster on CPU: SDPA's masked sliding-window layers attend to the whole prompt in one forward). "
    "kvpress:* rows = kvpress's own path (context forward under press(model), then its pipeline's generate_answer) "
    "in the same process and rounds (kvpress's venv, transformers 5.2); kvpress:none = that path without a press "
    "(its config-less cache keeps every layer's whole prompt, 3.7x our unreduced KV bytes at 4k). Under "
    "transformers 5.2 generate(prefill_chunk_size=...) on Gemma 3 answers wrongly even unreduced (5.23: the same "
    "answer as one forward), so the '+ chunked' rows of the kvpress-venv table time a broken computation. "
    "gemfilter rows: the prompt is filtered by an early full-attention layer and generation runs on the kept tokens "
    "(no replay; kv_fraction counts the sliding layers' unchanged 511-entry windows, so it exceeds keep); "
    "'+ chunked' also chunks its filter pass. "
    "kv_bytes = after the prompt, kv_bytes_end = after the last token; peak memory and KV bytes come from the "
    "untimed memory part when it ran (before 2026-11-25 the adapter's prompt snapshot under chunked prefill was "
    "taken after the first chunk).")

_TIMING_OLD_COLS = ("candidate", "tokens", "prefill_s", "decode_tok_s", "total_s", "speedup_total", "speedup_total_low",
                    "speedup_total_high", "speedup_prefill", "peak_mem_bytes", "kv_fraction", "kv_bytes",
                    "kv_fraction_end")


def build_report(out: str | Path, kvpress: str | Path | None = None) -> Path:
    """Write ``report.txt``, the plots and ``report.html`` into ``out`` from ``out/kv.jsonl`` and kvpress's
    results (``kvpress``, default ``out/kvpress.jsonl``); returns the HTML report's path."""
    out = Path(out)
    parts = latest_runs(out / "kv.jsonl")
    meta = parts.pop("_meta", [{}])[0]
    samples = parts.get("passcode_sample", [])
    pc = _passcode_rows(samples, parts.get("passcode", []))
    tables, images = _passcode_tables(pc, samples, out)
    ppl_tables, ppl_images = _ppl_tables(parts.get("ppl", []), out)
    tables += ppl_tables + _timing_tables(parts.get("timing", []), parts.get("memory", []))
    images += ppl_images
    kvp_path = Path(kvpress) if kvpress else out / "kvpress.jsonl"
    if kvp_path.exists():
        tables += _kvpress_tables(latest_runs(kvp_path), pc, parts.get("kept_ours", []))
    text = "\n\n".join(format_table(rows, title=cap) for cap, rows in tables if rows)
    (out / "report.txt").write_text(text + "\n")
    return html_report("tokenreduce bench kv — Gemma 3 270M", meta, tables, images, out / "report.html",
                       notes=REPORT_NOTES)


def _passcode_summary(samples: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Passcode rows per (variant, keep, length) from the per-prompt samples (the latest sample of each prompt),
    so runs over disjoint prompt ranges, or a run stopped early, still give exact counts (``n`` says how many)."""
    groups: dict[tuple[str, float, int], list[dict[str, Any]]] = {}
    for x in samples:
        groups.setdefault((x["variant"], x["keep"], x["length"]), []).append(x)
    rows = []
    for (variant, keep, length), recs in groups.items():
        ok = [r for r in recs if r.get("error") is None]
        fr = [r["kv_fraction"] for r in ok if r.get("kv_fraction") is not None]
        kb = [r["kv_bytes"] for r in ok if r.get("kv_bytes")]
        rows.append({"part": "passcode", "variant": variant, "keep": keep, "length": length,
                     "method": VARIANTS.get(variant, ("none", {}))[0],
                     "tokens": sum(r["tokens"] for r in recs) / len(recs), "n": len(ok),
                     "correct": sum(bool(r["correct"]) for r in ok),
                     "accuracy": sum(bool(r["correct"]) for r in ok) / len(ok) if ok else None,
                     "kv_fraction": sum(fr) / len(fr) if fr else None, "kv_saved": 1 - sum(fr) / len(fr) if fr else None,
                     "kv_bytes": sum(kb) / len(kb) if kb else None, "errors": len(recs) - len(ok),
                     "replay_checked": sum(r.get("replay_matches_generate") is not None for r in recs),
                     "replay_mismatches": sum(r.get("replay_matches_generate") is False for r in recs)})
    order = {v: i for i, v in enumerate(["none", *VARIANTS])}
    return sorted(rows, key=lambda r: (r["length"], order.get(r["variant"], 99), -r["keep"]))


def _passcode_rows(samples: list[dict[str, Any]], summaries: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The passcode rows (from the samples, else the runs' own summaries) with the unreduced cache's bytes."""
    pc = _passcode_summary(samples) or summaries
    for r in pc:  # the unreduced cache's bytes (measured by the adapter for the same prompts)
        un = [x["kv_bytes_unreduced"] for x in samples if x.get("kv_bytes_unreduced") and x["length"] == r["length"]
              and x["variant"] == r["variant"] and x["keep"] == r["keep"]]
        if not un:
            un = [x["kv_bytes_unreduced"] for x in samples if x.get("kv_bytes_unreduced") and x["length"] == r["length"]]
        r["kv_bytes_unreduced"] = sum(un) / len(un) if un else None
        if r["variant"] == "none":
            r["kv_bytes"] = r["kv_bytes_unreduced"]
    return pc


def _passcode_tables(pc: list[dict[str, Any]], samples: list[dict[str, Any]],
                     out: Path) -> tuple[list[Table], list[Image]]:
    """Accuracy and KV bytes per variant x keep, accuracy per depth of the pass key, one plot per length."""
    tables: list[Table] = []
    images: list[Image] = []
    if not pc:
        return tables, images
    cols = ["variant", "keep", "length", "tokens", "accuracy", "correct", "n", "kv_fraction", "kv_bytes",
            "kv_bytes_unreduced", "errors", "replay_checked", "replay_mismatches"]
    tables.append(("Passcode retrieval (question kept; kv_fraction = real KV bytes after the prompt / unreduced)",
                   [{c: r.get(c) for c in cols} for r in pc]))
    by_depth: dict[tuple[str, float, int], dict[float, list[bool]]] = {}
    for x in samples:
        if x.get("error") is None and x.get("correct") is not None:
            by_depth.setdefault((x["variant"], x["keep"], x["length"]), {}).setdefault(x["depth"], []).append(
                bool(x["correct"]))
    if by_depth:
        depths = sorted({d for v in by_depth.values() for d in v})
        tables.append(("Passcode retrieval per depth of the pass key (correct / prompts)",
                       [{"variant": k[0], "keep": k[1], "length": k[2],
                         **{f"depth {d:g}": (f"{sum(v[d])}/{len(v[d])}" if d in v else "-") for d in depths}}
                        for k, v in sorted(by_depth.items(), key=lambda kv: (kv[0][2], kv[0][0] != "none",
                                                                              kv[0][0], -kv[0][1]))]))
    for length in sorted({r["length"] for r in pc}):
        sub = [dict(r, variant=r["variant"]) for r in pc if r["length"] == length and r.get("accuracy") is not None]
        if sub:
            images.append((f"Passcode accuracy vs KV saved ({length}-token contexts)",
                           pareto_plot(sub, x="kv_saved", y="accuracy", group="variant", label="keep",
                                       path=out / f"passcode_{length}.png", xlabel="KV bytes saved (1 - kept)",
                                       ylabel="passcode accuracy",
                                       title=f"Gemma 3 270M, passcode, {length}-token contexts")))
    return tables, images


def _ppl_tables(pp: list[dict[str, Any]], out: Path) -> tuple[list[Table], list[Image]]:
    """The streaming perplexity table and its plot per segment."""
    if not pp:
        return [], []
    cols = ("variant", "budget", "tokens", "streams", "chunk", "ppl", "ppl_past_budget", "ppl_last_segment",
            "ppl_segments", "kv_fraction_end", "tokens_per_s")
    return ([("Streaming perplexity (token by token, fixed cache budget per layer)",
              [{k: r.get(k) for k in cols} for r in pp])],
            [("Streaming perplexity per segment", _ppl_plot(pp, out / "ppl.png"))])


def _ppl_plot(rows: list[dict[str, Any]], path: Path) -> Path:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(7.0, 4.2))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    for r in rows:
        seg = r["segment"]
        xs = [seg * (i + 1) for i in range(len(r["ppl_segments"]))]
        ax.plot(xs, r["ppl_segments"], marker="o", label=f"{r['variant']} ({r['ppl']:.1f})")
    ax.set_yscale("log")
    ax.set_xlabel("tokens streamed")
    ax.set_ylabel(f"perplexity of each {rows[0]['segment']}-token segment")
    ax.set_title(f"Gemma 3 270M, cache budget {next((r['budget'] for r in rows if r['budget']), '-')} per layer")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=130)
    return path


def _timing_tables(tm: list[dict[str, Any]], memory: list[dict[str, Any]]) -> list[Table]:
    """One table per timing label (the main environment first); peak memory and KV bytes from the untimed
    memory part where the timing rows lack them."""
    tables: list[Table] = []
    for r in tm:
        m = next((x for x in memory if x["candidate"] == r["candidate"]
                  and x["length"] == r["length"] and x.get("timing_label") == r.get("timing_label")), None)
        if m is not None and r.get("peak_mem_bytes") is None:  # the memory part (same candidates, untimed)
            r["peak_mem_bytes"] = m["peak_mem_bytes"]
            for k in ("kv_bytes", "kv_fraction", "kv_bytes_end", "kv_fraction_end"):
                if m.get(k) is not None:
                    r[k] = m[k]
    labels = list(dict.fromkeys(r.get("timing_label") for r in tm))
    for label in sorted(labels, key=lambda x: (x is not None, x != "main", labels.index(x))):
        sub = [r for r in tm if r.get("timing_label") == label]
        if label is None:  # rows from before timing labels: wall clock, 3 rounds, load not recorded
            cap = "Timing, earlier run (wall clock, 3 rounds, load not recorded; superseded by the tables below)"
            tables.append((cap, [{k: r.get(k) for k in _TIMING_OLD_COLS} for r in sub]))
            continue
        r0 = sub[0]
        load = [round(x, 2) for r in sub for x in (r.get("loadavg_before") or [])[:1] + (r.get("loadavg_after") or [])[:1]]
        cap = (f"Timing '{label}' vs the unreduced model (same process, interleaved, {r0.get('rounds')} rounds, "
               f"{r0.get('clock')} clock, {r0.get('threads')} thread(s), {r0.get('new_tokens')} new tokens, "
               f"transformers {r0.get('transformers')}, 1-min load {min(load, default=0):g}-{max(load, default=0):g}"
               "; speedups = median of per-round paired ratios [q1, q3])")
        rows = []
        for r in sub:
            row = {k: r.get(k) for k in ("candidate", "tokens", "prefill_s", "decode_tok_s", "total_s")}
            for prefix, name in (("", "vs none"), ("vs_chunked_", "vs none+chunked"),
                                 ("vs_kvpress_none_", "vs kvpress:none")):
                if f"{prefix}speedup_total" not in r:
                    continue
                for what in ("prefill", "decode", "total"):
                    key = f"{prefix}speedup_{what}"
                    row[f"{what} {name}"] = f"{r[key]:.3f} [{r[key + '_q1']:.3f}, {r[key + '_q3']:.3f}]"
            row.update({k: r.get(k) for k in ("peak_mem_bytes", "kv_fraction", "kv_bytes", "kv_bytes_end")})
            rows.append(row)
        tables.append((cap, rows))
        if any(r["candidate"].startswith("kvpress:") for r in sub) and any("speedup_pd" in r for r in sub):
            tables.append(_same_rounds_table(label, sub, cap))
    return tables


def _same_rounds_table(label: str, sub: list[dict[str, Any]], cap: str) -> Table:
    """Ours and kvpress's presses timed in the same rounds: prefill + decode seconds (the request without its
    setup) per candidate, median [min, max], and the median of per-round ratios to the same unreduced 'none'."""
    from .config import TIMING_CANDIDATES
    from .kvpress import parse_kvpress_candidate

    rows = []
    for r in sorted(sub, key=lambda r: (r["length"], r["candidate"].startswith("kvpress:"))):
        c = r["candidate"]
        if c.startswith("kvpress:"):
            press, keep, mode = parse_kvpress_candidate(c)
            side, what, layers = "kvpress", press or "none (its pipeline)", mode
        else:
            name, keep, chunk, _ = TIMING_CANDIDATES.get(c, (c, None, None, {}))
            side, what = "tokenreduce", c.split("@")[0] if name else "none"
            layers = "all" + (f", prefill chunks of {chunk}" if chunk else "")
        row = {"side": side, "method / press": what, "keep": keep if keep is not None else 1.0, "layers": layers,
               "tokens": r.get("tokens"), "prefill+decode_s": r.get("pd_s"), "iqr_s": r.get("pd_iqr"),
               "range_s": f"[{r['pd_min']:.3f}, {r['pd_max']:.3f}]" if r.get("pd_min") is not None else None}
        for prefix, ref in (("", "none"), ("vs_kvpress_none_", "kvpress:none")):
            k = f"{prefix}speedup_pd"
            if k in r:
                row[f"ratio vs {ref} [q1, q3]"] = f"{r[k]:.3f} [{r[k + '_q1']:.3f}, {r[k + '_q3']:.3f}]"
        row["kv_bytes"] = r.get("kv_bytes")
        rows.append(row)
    head = cap.split(" vs the unreduced model ", 1)[-1]
    title = (f"Timing '{label}': tokenreduce and kvpress in the same rounds against the same unreduced 'none' "
             f"({head.split('; speedups')[0].lstrip('(')}; prefill+decode = the timed request without setup, median "
             f"and [min, max] over rounds; ratio = median of per-round paired ratios, > 1: faster)")
    return title, rows


def _kvpress_tables(kp: dict[str, list[dict[str, Any]]], pc: list[dict[str, Any]],
                    kept_ours: list[dict[str, Any]]) -> list[Table]:
    """Side by side with kvpress's results (``kp``, per part): accuracies, kept-position agreement, timings."""
    tables: list[Table] = []
    acc = kp.get("kvpress_passcode", [])
    if acc:
        side = []
        for r in acc:
            ours = next((o for o in pc if o["variant"] == r.get("ours_variant") and
                         abs(o["keep"] - r["keep"]) < 1e-9), None)
            side.append({"method": r["press"], "layers": r["layers"], "keep": r["keep"],
                         "kvpress_accuracy": r["accuracy"], "kvpress_kv_fraction": r["kv_fraction"],
                         "ours_variant": r.get("ours_variant"),
                         "ours_accuracy": ours["accuracy"] if ours else None,
                         "ours_kv_fraction": ours["kv_fraction"] if ours else None,
                         # timed in kvpress_compare.py's own process (1.1k prompts, other load): not comparable
                         # with ours; the same-process comparison is the 'kvpress venv' timing table
                         "kvpress_prefill_s (other process)": r.get("prefill_s"),
                         "kvpress_decode_tok_s (other process)": r.get("decode_tok_s"),
                         "kvpress_error": r.get("error")})
        tables.append(("Side by side with kvpress 0.5.5 (same model, prompts, question kept)", side))
    ag = agreement_rows(kept_ours, kp.get("kvpress_kept", []))
    if ag:
        tables.append(("Kept positions, identical configurations (Jaccard of kept sets per layer)", ag))
    kt = kp.get("kvpress_timing", [])
    if kt:
        cap = "kvpress timings (its own process/venv; not comparable, see the 'kvpress venv' timing table)"
        tables.append((cap, kt))
    return tables
