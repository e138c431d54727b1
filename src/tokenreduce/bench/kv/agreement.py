"""Agreement with kvpress: our kept positions for the configurations kvpress shares exactly
(``AGREEMENT_CONFIGS``: the context compressed alone, no question, ``rounding="floor"`` like kvpress's
``int(n k)``), and their Jaccard overlap with the positions ``scripts/kvpress_compare.py`` records."""

from __future__ import annotations

from typing import Any

from .config import AGREEMENT_CONFIGS, KVBenchConfig
from .data import all_passcode_prompts
from .model import progress

__all__ = ["agreement_rows", "run_agreement"]


def run_agreement(model: Any, tok: Any, cfg: KVBenchConfig, writer: Any) -> list[dict[str, Any]]:
    """Our kept positions for the configurations kvpress shares (context alone, no question, floor budgets)."""
    import tokenreduce as tr

    from ...adapters.llm import capture_prefill, replay_prefill

    rows = []
    prompts = all_passcode_prompts(tok, cfg)
    bar = progress("kept positions (ours)", total=len(prompts) * len(AGREEMENT_CONFIGS) * len(cfg.agreement_keeps))
    for p in prompts:
        n_ctx = len(tok(p["context"]).input_ids)  # the prompt's own tokens up to the context boundary
        ids = tok(p["prompt"], return_tensors="pt").input_ids[:, :n_ctx]
        cap = capture_prefill(model, ids)  # one context forward, replayed per configuration (= the real path)
        for label, conf in AGREEMENT_CONFIGS.items():
            name, kw = conf["ours"]
            for keep in cfg.agreement_keeps:
                with tr.apply(model, name, keep=keep, rounding="floor", **kw) as h:
                    cache = replay_prefill(h, cap)
                kept = {}
                for li, layer in enumerate(cache.layers):
                    layer.to_compact()  # a layer with nothing to evict gets its (dense) positions
                    pos = layer.pos[0, 0]
                    kept[li] = sorted(set(pos[pos >= 0].tolist()))
                rows.append(writer.write(part="kept_ours", config=label, keep=keep, prompt=p["id"], kept=kept,
                                         n_layers=len(cache.layers)))
                bar.update(1)
        del cap
    bar.close()
    return rows


def agreement_rows(ours: list[dict[str, Any]], theirs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Jaccard overlap of the kept positions per (configuration, keep, layer kind), over layers and prompts:
    ``ours`` = our ``kept_ours`` rows, ``theirs`` = kvpress's ``kvpress_kept`` rows (layers where both keep
    nothing are skipped)."""
    idx = {(r["config"], float(r["keep"]), r["prompt"]): r for r in theirs if r.get("kept")}
    acc: dict[tuple[str, float, str], list[float]] = {}
    for r in ours:
        t = idx.get((r["config"], float(r["keep"]), r["prompt"]))
        if t is None:
            continue
        for li, pos in r["kept"].items():
            a, b = set(pos), set(t["kept"].get(str(li), t["kept"].get(li, [])))
            kind = "sliding" if t.get("layer_types", {}).get(str(li), "") == "sliding_attention" else "global"
            if not a and not b:
                continue
            acc.setdefault((r["config"], float(r["keep"]), kind), []).append(len(a & b) / max(len(a | b), 1))
    return [{"part": "agreement", "config": c, "keep": k, "layers": kind, "jaccard_mean": sum(v) / len(v),
             "jaccard_min": min(v), "identical_fraction": sum(x == 1.0 for x in v) / len(v), "n_layer_prompts": len(v)}
            for (c, k, kind), v in sorted(acc.items())]
