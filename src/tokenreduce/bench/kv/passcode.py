"""The passcode part: retrieval of a pass key hidden at several depths of real filler, per method x keep, with
the real KV kept (cache tensor bytes right after the prompt / the unreduced cache's bytes) and the kept entries
per layer. The question is kept uncompressed (``question_len``). Each prompt is run forward once and the
captured prefill is replayed for every method (``adapters.llm.replay_prefill``); on the first
``check_replay`` prompts every cell is also run through ``generate()`` to check the replay."""

from __future__ import annotations

import time
from typing import Any

import torch

from .config import VARIANTS, KVBenchConfig
from .data import passcode_prompts
from .model import greedy, progress

__all__ = ["passcode_combos", "passcode_indices", "passcode_summary", "replay_greedy", "run_passcode",
           "run_passcode_prompt"]


def _resolve_layers(model: Any, kw: dict[str, Any]) -> dict[str, Any]:
    """``layers="global"|"sliding"`` -> the indices of those layers in the model's ``config.layer_types``."""
    if kw.get("layers") in ("global", "sliding"):
        want = "full_attention" if kw["layers"] == "global" else "sliding_attention"
        types = getattr(model.config, "layer_types", None) or ["full_attention"] * model.config.num_hidden_layers
        kw = dict(kw, layers=[i for i, t in enumerate(types) if t == want])
    return kw


def replay_greedy(model: Any, handle: Any | None, cap: Any, n: int) -> torch.Tensor:
    """Greedy continuation of ``n`` tokens after a replayed prefill (:func:`~tokenreduce.adapters.llm.replay_prefill`):
    the same forwards ``generate()`` makes (one token each, logical positions from the cache). Returns
    prompt + continuation like ``generate()``. ``handle=None``: the unreduced model, from the captured cache."""
    from ...adapters.llm import replay_prefill

    cache = replay_prefill(handle, cap) if handle is not None else cap.cache
    nxt = cap.last_logits.argmax(-1, keepdim=True)
    toks, mask = [nxt], cap.attention_mask
    with torch.inference_mode():
        for _ in range(n - 1):
            mask = torch.cat([mask, mask.new_ones(mask.shape[0], 1)], dim=1)
            logits = model(input_ids=nxt, attention_mask=mask, past_key_values=cache, use_cache=True,
                           logits_to_keep=1).logits
            nxt = logits[:, -1].argmax(-1, keepdim=True)
            toks.append(nxt)
    return torch.cat([cap.input_ids, *toks], dim=1)


def passcode_combos(cfg: KVBenchConfig) -> list[tuple[str, float]]:
    """(variant, keep) of every passcode cell: the unreduced model first (``cfg.baseline``), then variants x keeps."""
    combos = [(v, k) for v in cfg.variants for k in cfg.keeps]
    return [("none", 1.0), *combos] if cfg.baseline else combos


def run_passcode_prompt(model: Any, tok: Any, cfg: KVBenchConfig, p: dict[str, Any], pi: int) -> list[dict[str, Any]]:
    """One ``passcode_sample`` row per (variant, keep) of :func:`passcode_combos` on prompt ``p`` (its index
    ``pi`` among the n of its length: the first ``cfg.check_replay`` are also run through ``generate()``)."""
    import tokenreduce as tr

    from ...adapters.llm import capture_prefill

    length = p["length"]
    ids = tok(p["prompt"], return_tensors="pt").input_ids
    cap = capture_prefill(model, ids) if cfg.replay else None  # one prompt forward for every method
    rows = []
    for variant, keep in passcode_combos(cfg):
        t0 = time.perf_counter()
        rec: dict[str, Any] = {"prompt": p["id"], "depth": p["depth"], "tokens": p["tokens"]}
        try:
            if variant == "none":
                if cap is not None and pi >= cfg.check_replay:
                    out = replay_greedy(model, None, cap, cfg.max_new_tokens)
                else:
                    out = greedy(model, ids, cfg.max_new_tokens)
                rec.update(kv_fraction=1.0, keep_achieved=1.0, kv_bytes=None, kept=None,
                           replayed=pi >= cfg.check_replay)
            else:
                name, kw = VARIANTS[variant]
                with tr.apply(model, name, keep=keep, question_len=p["question_len"],
                              **_resolve_layers(model, kw)) as h:
                    # a prompt filter (GemFilter) changes the prompt forward itself: no replay
                    replay = cap is not None and h.method.phase != "filter"
                    if replay:
                        out = replay_greedy(model, h, cap, cfg.max_new_tokens)
                    else:
                        out = greedy(model, ids, cfg.max_new_tokens)
                    st = h.stats
                rec.update(kv_fraction=st.prefill_kept_fraction, keep_achieved=st.keep_achieved,
                           kv_bytes=st.prefill_kv_bytes,
                           kv_bytes_unreduced=st.prefill_kv_bytes_unreduced,
                           kept=[k[0] for k in st.prefill_kept], replayed=replay)
                if replay and pi < cfg.check_replay:  # the real path must give the same tokens
                    with tr.apply(model, name, keep=keep, question_len=p["question_len"],
                                  **_resolve_layers(model, kw)) as h2:
                        ref = greedy(model, ids, cfg.max_new_tokens)
                    rec["replay_matches_generate"] = bool(torch.equal(ref, out))
                    rec["replay_matches_kv_bytes"] = h2.stats.prefill_kv_bytes == st.prefill_kv_bytes
            text = tok.decode(out[0, ids.shape[1]:], skip_special_tokens=True)
            rec.update(output=text, correct=p["answer"] in text, error=None)
        except (ValueError, TypeError) as e:  # e.g. a budget smaller than a method's window
            rec.update(output=None, correct=None, error=str(e))
        rec["seconds"] = time.perf_counter() - t0
        rows.append({"part": "passcode_sample", "variant": variant, "keep": keep, "length": length, **rec})
    return rows


def passcode_summary(cfg: KVBenchConfig, length: int, samples: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One ``passcode`` row per (variant, keep) from its ``passcode_sample`` rows of ``length``: accuracy, KV
    fraction and bytes, kept entries per layer."""
    rows = []
    for variant, keep in passcode_combos(cfg):
        recs = [r for r in samples if r["length"] == length and r["variant"] == variant and r["keep"] == keep]
        if not recs:
            continue
        ok = [r for r in recs if r["error"] is None]
        n_correct = sum(bool(r["correct"]) for r in ok)
        fr = [r["kv_fraction"] for r in ok]
        kept = [r["kept"] for r in ok if r.get("kept")]
        rows.append({
            "part": "passcode", "variant": variant, "method": VARIANTS.get(variant, ("none", {}))[0],
            "keep": keep, "length": length, "tokens": sum(r["tokens"] for r in recs) / len(recs),
            "n": len(ok), "correct": n_correct, "accuracy": n_correct / len(ok) if ok else None,
            "kv_fraction": sum(fr) / len(fr) if fr else None,
            "kv_saved": 1 - sum(fr) / len(fr) if fr else None,
            "keep_achieved": sum(r["keep_achieved"] for r in ok) / len(ok) if ok else None,
            "kv_bytes": (sum(r["kv_bytes"] for r in ok) / len(ok)) if ok and ok[0]["kv_bytes"] else None,
            "kept_per_layer": [sum(k[i] for k in kept) / len(kept) for i in range(len(kept[0]))] if kept else None,
            "errors": len(recs) - len(ok), "error": next((r["error"] for r in recs if r["error"]), None),
            "seconds": sum(r["seconds"] for r in recs) / len(recs),
        })
    return rows


def passcode_indices(cfg: KVBenchConfig) -> range:
    """The prompts this run covers: ``cfg.prompt_range`` (a:b) of the n of each length, or all n."""
    a, b = cfg.prompt_range if cfg.prompt_range is not None else (0, cfg.n_prompts)
    return range(max(0, a), min(b, cfg.n_prompts))


def run_passcode(model: Any, tok: Any, cfg: KVBenchConfig, writer: Any) -> list[dict[str, Any]]:
    """Every variant x keep (and the unreduced model) on the passcode prompts of each length. Writes a
    ``prompts`` row per length, a ``passcode_sample`` row per prompt and cell, and returns (and writes) one
    ``passcode`` row per cell: accuracy, KV fraction and bytes, kept entries per layer."""
    rows: list[dict[str, Any]] = []
    for length in cfg.lengths:
        prompts = passcode_prompts(tok, length, cfg.n_prompts, cfg.seed)
        writer.write(part="prompts", length=length, prompts=prompts)
        samples = []
        idx = passcode_indices(cfg)  # a slice of the n prompts (parallel runs merged by the report)
        bar = progress(f"passcode {length} tok", total=len(idx))
        for pi in idx:
            for r in run_passcode_prompt(model, tok, cfg, prompts[pi], pi):
                samples.append(writer.write(r))
            bar.update(1)
        bar.close()
        rows += [writer.write(r) for r in passcode_summary(cfg, length, samples)]
    return rows
