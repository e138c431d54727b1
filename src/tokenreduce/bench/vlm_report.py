"""The `bench vlm` report: the results table, accuracy per question type vs keep, accuracy vs measured prefill
speedup and vs FLOPs, and the patches each method keeps on one test scene (:func:`kept_for_viz`)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import tokenreduce as tr

from .report import format_table, html_report, pareto_plot

__all__ = ["COLUMNS", "acc_plot", "kept_for_viz", "viz_plot", "viz_question", "vlm_report"]


def viz_question(data: Any) -> Any:
    for qa in data.qas:
        if qa.qtype == "detail":
            return qa
    return data.qas[0]


def kept_for_viz(ctx: Any, method: str, keep: float, kw: dict[str, Any]) -> dict[str, Any]:
    """Patch indices a method keeps on one scene: at the LLM input and, for inside-LLM methods, after its
    first in-LLM stage."""
    from ..models.vlm import encode_prompts, prompt_format

    model, data = ctx.model, ctx.data
    qa = viz_question(data)
    batch = encode_prompts(ctx.tokenizer, [qa.question], data.images[[qa.scene]], model.config.image_seq_length,
                           prompt=prompt_format(model))
    batch = {k: v.to(ctx.device) for k, v in batch.items()}
    try:
        with tr.apply(model, method, keep=keep, **kw) as h:
            model(**batch, use_cache=True)
            st = h.stats
    except (ValueError, RuntimeError) as e:
        return {"error": str(e)}
    entry = st.kept_patches[0][0] if st.kept_patches and st.kept_patches[0] else []
    out = {"input": entry, "stage": None, "stage_layer": None}
    if st.stage_patches:
        ords = st.stage_patches[0][0]
        out["stage"] = [entry[o] for o in ords if 0 <= o < len(entry)]
        out["stage_layer"] = st.stage_layers[0]
    return out


COLUMNS = ["method", "keep", "preset", "keep_achieved", "accuracy", "acc_identity", "acc_counting", "acc_spatial", "acc_comparison",
           "acc_detail", "agreement", "visual_tokens_avg", "gflops", "flops_ratio", "prefill_ms", "prefill_speedup",
           "gen_ms", "gen_speedup", "overhead_ms", "kv_bytes", "peak_mem_mb"]


def vlm_report(rows: list[dict[str, Any]], outdir: Path, cfg: Any, meta: dict[str, Any], data: Any,
            viz: dict[str, Any]) -> None:
    ok = [r for r in rows if "error" not in r]
    table = [{c: r.get(c) for c in COLUMNS} for r in ok]
    errors = [{"method": r["method"], "keep": r["keep"], "preset": r.get("preset"), "error": r["error"]}
              for r in rows if "error" in r]
    print(format_table(table, COLUMNS, title="small VLM: accuracy per question type vs speed"))
    if errors:
        print(format_table(errors, title="not run"))
    images = [("accuracy per question type vs keep", acc_plot(ok, outdir / "accuracy_vs_keep.png"))]
    if any(r.get("prefill_ms") is not None for r in ok if r["method"] != "none"):  # timing measured
        timed = [r for r in ok if r.get("prefill_speedup") is not None]
        images.append(("accuracy vs measured prefill speedup (same run)", pareto_plot(
            timed, x="prefill_speedup", y="accuracy", group="method", path=outdir / "pareto_prefill.png",
            title="small VLM: accuracy vs measured prefill speedup", xlabel="prefill speedup vs unreduced (x)",
            ylabel="VQA accuracy")))
    images.append(("accuracy vs analytic prefill FLOPs reduction", pareto_plot(
        ok, x="flops_ratio", y="accuracy", group="method", path=outdir / "pareto_flops.png",
        title="accuracy vs prefill FLOPs reduction", xlabel="FLOPs ratio (x)", ylabel="VQA accuracy")))
    images.append((f"patches kept on one test scene at keep={cfg.viz_keep} (dimmed = dropped)",
                   viz_plot(viz, data, outdir / "kept_patches.png")))
    notes = ("Accuracy: greedy generate, the answer word (after the rationale a spatial answer is trained with), on held-out digit scenes (base digits disjoint from "
             "training). keep: the fraction of the visual-token work in the LLM kept (the mean over decoder layers of the "
             "visual tokens they process, over those of the unreduced prompt), mapped onto each method's schedule (see "
             "tokenreduce.methods.vlm); keep_achieved: what ran; preset rows: the method's named setting (keep in its own terms). "
             "visual_tokens_avg: visual tokens averaged over LLM layers. Speedups: median of per-round "
             f"ratios vs the unreduced model, interleaved in the same run ({cfg.repeats} rounds, {cfg.threads} "
             f"thread(s), {cfg.clock} clock, batch {cfg.time_batch}; generate = {cfg.gen_tokens} new tokens). gflops: analytic "
             "prefill FLOPs per sample (vision + projector + LLM + head), scoring excluded (overhead_ms).")
    tables = [("results", table)] + ([("not run (clear errors)", errors)] if errors else [])
    html_report("tokenreduce: visual token reduction on the small VLM", meta, tables, images,
                outdir / "report.html", notes=notes)


def acc_plot(rows: list[dict[str, Any]], path: Path) -> Path:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    cols = ["accuracy", "acc_identity", "acc_counting", "acc_spatial", "acc_comparison", "acc_detail"]
    fig = Figure(figsize=(13, 7))
    FigureCanvasAgg(fig)
    base = next((r for r in rows if r["method"] == "none"), None)
    methods = list(dict.fromkeys(r["method"] for r in rows if r["method"] != "none"))
    for i, col in enumerate(cols):
        ax = fig.add_subplot(2, 3, i + 1)
        for j, m in enumerate(methods):
            rs = sorted((r for r in rows if r["method"] == m and r.get(col) is not None and r.get("keep") is not None
                         and r.get("preset") is None), key=lambda r: r["keep"])
            if rs:
                ax.plot([r["keep"] for r in rs], [r[col] for r in rs], marker="o", ms=3, color=f"C{j % 10}",
                        ls="-" if j < 10 else "--", label=m)
        if base is not None and base.get(col) is not None:
            ax.axhline(base[col], color="black", ls=":", lw=1, label="unreduced")
        ax.set_xscale("log")
        ax.set_title(col.replace("acc_", ""))
        ax.set_xlabel("keep")
        ax.grid(True, alpha=0.3)
        if i == 0:
            ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    return path


def viz_plot(viz: dict[str, Any], data: Any, path: Path) -> Path:
    import numpy as np
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    from ..data.vqa import render_scenes

    qa = viz_question(data)
    img = render_scenes(data.images[[qa.scene]], data.config)[0].astype(float) / 255
    H = img.shape[0]
    g = round((len(next(iter([v["input"] for v in viz.values() if "input" in v]), [])) or 0) ** 0.5) or 12
    panels = [("image", None)] + [(m, v) for m, v in viz.items()]
    cols = min(5, len(panels))
    rows_n = -(-len(panels) // cols)
    fig = Figure(figsize=(2.6 * cols, 2.9 * rows_n))
    FigureCanvasAgg(fig)
    for i, (name, v) in enumerate(panels):
        ax = fig.add_subplot(rows_n, cols, i + 1)
        ax.set_xticks([])
        ax.set_yticks([])
        if v is None:
            ax.imshow(img)
            ax.set_title(f"Q: {qa.question}\nA: {qa.answer}", fontsize=6)
            continue
        if "error" in v:
            ax.imshow(img * 0.2)
            ax.set_title(f"{name}: n/a", fontsize=8)
            continue
        staged = v.get("stage") is not None and len(v["stage"]) > 0
        kept = v["stage"] if staged else v["input"]
        grid = H // 8 if H % 8 == 0 else g
        p = H // grid
        mask = np.zeros((grid, grid))
        for k in kept:
            if 0 <= k < grid * grid:
                mask[k // grid, k % grid] = 1
        m = np.kron(mask, np.ones((p, p)))[..., None]
        ax.imshow(img * (0.2 + 0.8 * m))
        where = f"after layer {v['stage_layer']}" if staged else "LLM input"
        if v.get("stage") is not None and not staged:
            where += f"; none after layer {v['stage_layer']}"
        what = "cells (first patch shown)" if name == "pool" else "kept"
        ax.set_title(f"{name}: {len(kept)} {what}\n({where})", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    return path
