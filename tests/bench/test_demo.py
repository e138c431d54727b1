"""`tokenreduce demo` end to end on the real packaged models (slow: needs Gemma 3 270M converted)."""

from __future__ import annotations

import json

import pytest

pytestmark = pytest.mark.slow


def test_demo_writes_its_three_tables_and_a_report(tmp_path):
    from tokenreduce.models.gemma import gemma_cache_ready

    if not gemma_cache_ready():
        pytest.skip("Gemma 3 270M is not converted (tokenreduce convert gemma)")
    from tokenreduce.bench.demo import run_demo

    report = run_demo(str(tmp_path), n_prompts=1, context_tokens=120)
    assert report.is_file() and "pass-key retrieval" in report.read_text()
    rows = [json.loads(line) for line in (tmp_path / "results.jsonl").read_text().splitlines()]
    parts = {r.get("part") for r in rows if "part" in r}
    assert parts == {"kv-cache", "prompt", "encoder"}
    kv = [r for r in rows if r.get("part") == "kv-cache" and r["method"] != "none"]
    assert all(abs(r["kv_kept"] - 0.25) < 0.05 for r in kv)  # a quarter of the KV bytes, as asked
    prompt = [r for r in rows if r.get("part") == "prompt"]
    for r in prompt:  # the whole request beside the compression time (issue 25)
        assert r["request_seconds"] >= r["answer_seconds"] > 0 and r["request_speedup"] > 0
    assert next(r for r in prompt if r["method"] == "none")["request_speedup"] == 1.0
