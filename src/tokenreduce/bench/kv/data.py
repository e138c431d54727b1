"""The prompts `bench kv` runs on: passcode retrieval prompts (a 5-digit pass key in real English filler,
``data/passcode.py``), the timing prompt, and the prompts file that kvpress's venv reads (the export part)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from .config import AGREEMENT_CONFIGS, KVBenchConfig

__all__ = ["DEPTHS", "all_passcode_prompts", "export_for_kvpress", "passcode_prompts", "timing_prompt"]

DEPTHS = [0.1, 0.3, 0.5, 0.7, 0.9]


def passcode_prompts(tok: Any, length: int, n: int, seed: int = 0) -> list[dict[str, Any]]:
    """Passcode prompts (real filler) as dicts: prompt, context, answer, depth, tokens, question_len."""
    from ...data.passcode import make_passcode_samples
    from ...pipelines import question_length

    samples = make_passcode_samples(n, length, lambda s: len(tok(s).input_ids), depths=DEPTHS, seed=seed)
    out = []
    for i, s in enumerate(samples):
        out.append({"id": f"{length}-{i}", "prompt": s.prompt, "context": s.context,
                    "question": s.prompt[len(s.context):], "answer": s.answer, "depth": s.depth,
                    "tokens": len(tok(s.prompt).input_ids), "question_len": question_length(tok, s.context, s.prompt),
                    "length": length})
    return out


def all_passcode_prompts(tok: Any, cfg: KVBenchConfig) -> list[dict[str, Any]]:
    """The ``cfg.n_prompts`` passcode prompts of every length in ``cfg.lengths``, in order."""
    return [p for length in cfg.lengths for p in passcode_prompts(tok, length, cfg.n_prompts, cfg.seed)]


def timing_prompt(tok: Any, cfg: KVBenchConfig, length: int) -> tuple[dict[str, Any], torch.Tensor]:
    """The one passcode prompt of ``length`` tokens that the timing and memory parts share, and its ids
    (from ``cfg.timing_prompts``, the export part's JSON, if given: same prompt in a venv without the text)."""
    if cfg.timing_prompts:
        data = json.loads(Path(cfg.timing_prompts).read_text())
        found = [x for x in data.get("timing", []) if x["length"] == length and x.get("seed") == cfg.seed + 7]
        if not found:
            raise ValueError(f"{cfg.timing_prompts} has no timing prompt of length {length} (seed {cfg.seed + 7}); "
                             f"write it with --parts export --timing-lengths {length}")
        p = found[0]
    else:
        p = passcode_prompts(tok, length, 1, seed=cfg.seed + 7)[0]
    ids = tok(p["prompt"], return_tensors="pt").input_ids
    if ids.shape[1] != p["tokens"]:
        raise ValueError(f"the timing prompt has {ids.shape[1]} tokens here, {p['tokens']} where it was exported")
    return p, ids


def export_for_kvpress(tok: Any, cfg: KVBenchConfig, path: Path) -> Path:
    """Prompts + the configs both sides run, for ``scripts/kvpress_compare.py`` (runs in kvpress's venv)."""
    prompts = all_passcode_prompts(tok, cfg)
    timing = [dict(passcode_prompts(tok, length, 1, seed=cfg.seed + 7)[0], seed=cfg.seed + 7)
              for length in cfg.timing_lengths]
    data = {"prompts": prompts, "timing": timing, "agreement": {k: v["kvpress"] for k, v in AGREEMENT_CONFIGS.items()},
            "agreement_keeps": list(cfg.agreement_keeps), "max_new_tokens": cfg.max_new_tokens,
            "global_layers": None}
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data))
    return path
