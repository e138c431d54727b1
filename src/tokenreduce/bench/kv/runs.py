"""`bench kv` results files: one run per invocation (a meta line + its rows, ``bench/results.py``). Parts run
separately (other venvs, prompt ranges, lengths) are appended to one file (:func:`merge_results`) and read back
with the latest run winning per configuration (:func:`latest_runs`)."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ..results import read_runs

__all__ = ["latest_runs", "merge_results"]

_KEYS = {"passcode": ("variant", "keep", "length"), "passcode_sample": ("variant", "keep", "length", "prompt"),
         "ppl": ("variant", "budget", "tokens"), "timing": ("timing_label", "candidate", "length"), "prompts": ("length",),
         "memory": ("timing_label", "candidate", "length"),
         "kept_ours": ("config", "keep", "prompt"), "kvpress_passcode": ("press", "layers", "keep"),
         "kvpress_kept": ("config", "keep", "prompt")}


def latest_runs(path: Path) -> dict[str, list[dict[str, Any]]]:
    """Rows of every run, per part, the latest run winning for the same configuration (parts and lengths may
    come from separate invocations); ``_meta`` holds the latest main run's metadata (a run labelled for another
    venv, e.g. the kvpress timing, does not replace it)."""
    parts: dict[str, dict[Any, dict[str, Any]]] = {}
    meta: dict[str, Any] = {}
    if not path.exists():
        return {}
    for m, rows in read_runs(path).values():
        for i, r in enumerate(rows):
            part = r.get("part", "?")
            key = tuple(json.dumps(r.get(k), sort_keys=True) for k in _KEYS[part]) if part in _KEYS else (m["run_id"], i)
            parts.setdefault(part, {})[key] = r
        if (m.get("config") or {}).get("timing_label", "main") == "main" or not meta:
            meta = m  # the header describes the main environment, not a peer venv's timing run
    out = {k: list(v.values()) for k, v in parts.items()}
    out["_meta"] = [meta]
    return out


def merge_results(sources: Sequence[str | Path], dest: str | Path) -> dict[str, int]:
    """Append the runs of several results files (JSONL, one run = a meta line + its rows) to ``dest``, in the
    order given, so the report's later-run-wins rule picks the newest part. A source ``"path@part1+part2"`` keeps
    only those parts' rows (the meta line stays). Runs already in ``dest`` (same ``run_id``) are skipped, so a
    merge can be re-run. Returns ``{"runs": n, "rows": m}`` appended."""
    dest = Path(dest)
    have = set(read_runs(dest)) if dest.exists() else set()
    lines: list[str] = []
    runs = rows = 0
    for src in sources:
        path_s, _, keep = str(src).partition("@")
        path = Path(path_s)
        if not path.exists():
            raise FileNotFoundError(f"merge: {path} does not exist")
        parts = set(keep.split("+")) if keep else None
        for rid, (meta, rs) in read_runs(path).items():
            if rid in have:
                continue
            sel = [r for r in rs if parts is None or r.get("part") in parts]
            if parts is not None and not sel:
                continue
            have.add(rid)
            lines.append(json.dumps({"type": "meta", **meta}))
            lines += [json.dumps({"type": "row", **r}) for r in sel]
            runs, rows = runs + 1, rows + len(sel)
    if lines:
        dest.parent.mkdir(parents=True, exist_ok=True)
        with dest.open("a", encoding="utf-8") as fh:
            fh.write("\n".join(lines) + "\n")
    return {"runs": runs, "rows": rows}
