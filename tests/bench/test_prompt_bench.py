"""`bench prompt` tables: end-to-end request time beside compression time, per-prompt paired ratios against the
uncompressed request, and the break-even length over several context lengths (tiny random-weight Gemma 3)."""

from __future__ import annotations

import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from tokenreduce.bench.prompt_report import SUMMARY_COLUMNS, break_even_rows, prompt_summary


def _sample(i: int, e2e: float, compress: float = 0.0, method: str = "m", forward: float | None = None) -> dict:
    r = {"sample": i, "method": method, "kept_ratio": 0.5, "passcode_kept": True, "correct": i % 2 == 0,
         "compress_s": compress, "answer_s": e2e - compress, "e2e_s": e2e, "n_tokens": 100}
    if forward is not None:
        r["forward_s"] = forward
    return r


def test_summary_pairs_each_prompt_with_its_uncompressed_request():
    base = [_sample(i, e, method="none", forward=0.5) for i, e in enumerate([1.0, 2.0, 4.0])]
    rows = [_sample(0, 0.5, 0.1), _sample(1, 4.0, 0.2), _sample(2, 2.0, 0.4)]  # ratios 2.0, 0.5, 2.0
    s = prompt_summary("m", 0.5, 250, rows, base)
    assert s["tokens"] == 250 and s["e2e_speedup"] == 2.0  # median of paired ratios, not a ratio of medians
    assert (s["e2e_speedup_min"], s["e2e_speedup_max"]) == (0.5, 2.0)
    assert s["e2e_s"] == 2.0 and s["base_e2e_s"] == 2.0 and s["compress_s"] == 0.2
    assert s["compress_per_forward"] == pytest.approx(0.4)
    assert SUMMARY_COLUMNS.index("e2e_s") == SUMMARY_COLUMNS.index("compress_s") + 1  # side by side
    err = prompt_summary("m", 0.5, 250, [{"sample": 0, "error": "boom"}], base)
    assert err["error"] == "boom"


def test_break_even_is_the_shortest_length_from_which_every_longer_one_pays():
    def rows(method, ratios):
        return [{"method": method, "keep": 0.5, "tokens": n, "e2e_speedup": r} for n, r in ratios.items()]

    table = break_even_rows([
        {"method": "none", "keep": 1.0, "tokens": 250, "e2e_speedup": 1.0},
        *rows("a", {250: 0.8, 500: 1.1, 1000: 0.99, 2000: 1.3}),  # dips at 1000: pays from 2000
        *rows("b", {250: 1.2, 500: 1.3}),
        *rows("c", {250: 0.5, 500: 0.7}),
        *rows("d", {1000: 1.5}),  # one length: no break-even row
    ])
    by = {r["method"]: r for r in table}
    assert set(by) == {"a", "b", "c"}
    assert by["a"]["pays off from (tokens)"] == "2000" and by["a"]["e2e x @1000"] == 0.99
    assert by["b"]["pays off from (tokens)"] == "<= 250" and by["c"]["pays off from (tokens)"] == "> 500"


def test_prompt_bench_over_two_lengths_writes_the_break_even_table(tmp_path):
    pytest.importorskip("transformers")
    from tokenreduce.bench.prompt import run_prompt_bench
    from tokenreduce.bench.smoke import smoke_causal_lm

    model, tok = smoke_causal_lm()
    rows = run_prompt_bench(methods=["truncate"], keeps=[0.5], n_samples=2, target_tokens=[80, 160], threads=1,
                            max_new_tokens=2, out=str(tmp_path), model=model, tokenizer=tok, progress=False,
                            clock="cpu")
    got = {(r["method"], r["tokens"]) for r in rows}
    assert got == {("none", 80), ("truncate", 80), ("none", 160), ("truncate", 160)}
    for r in rows:
        assert r["e2e_s"] >= r["compress_s"] >= 0 and r["e2e_speedup_min"] <= r["e2e_speedup"] <= r["e2e_speedup_max"]
    text = (tmp_path / "summary.txt").read_text()
    assert "break-even" in text and "e2e x @80" in text and "e2e x @160" in text and "cpu clock" in text
    with pytest.raises(ValueError, match="needs threads=1"):
        run_prompt_bench(clock="cpu", threads=2, out=str(tmp_path / "x"), model=model, tokenizer=tok)
    with pytest.raises(ValueError, match="lengths must be whole numbers of tokens >= 50"):
        run_prompt_bench(target_tokens=[30], out=str(tmp_path / "x"), model=model, tokenizer=tok)
