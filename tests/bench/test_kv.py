"""`bench kv` plumbing without the real Gemma: timing (clocks, paired ratios, prompts from a file), kvpress
candidate names, merging result files into one report. Tiny random-weight Gemma 3; no wall-clock thresholds."""

from __future__ import annotations

import json
import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

pytest.importorskip("transformers")

from tests.tiny import gemma3_sliding as _tiny_gemma
from tokenreduce.bench import kv as B
from tokenreduce.bench.results import ResultWriter, read_runs


class _Enc:
    def __init__(self, ids: list[int], pt: bool) -> None:
        self.input_ids = torch.tensor([ids]) if pt else ids


class _Tok:
    """Character-level stand-in for the Gemma tokenizer (the timing part only encodes and decodes)."""

    def __call__(self, text: str, return_tensors: str | None = None) -> _Enc:
        return _Enc([ord(c) % 120 + 1 for c in text], return_tensors == "pt")

    def decode(self, ids, skip_special_tokens: bool = True) -> str:
        return "".join(chr(int(i) + 64) for i in ids)


def _prompts_file(tmp_path, length: int = 300, seed: int = 7):
    text = ("the quick brown fox jumps over the lazy dog " * 20)[: length - 6] + "code?"
    tok = _Tok()
    p = {"id": f"{length}-0", "prompt": text + " ", "context": text, "question": " ", "answer": "12345", "depth": 0.5,
         "tokens": len(tok(text + " ").input_ids), "question_len": 3, "length": length, "seed": seed}
    path = tmp_path / "prompts.json"
    path.write_text(json.dumps({"prompts": [], "timing": [p]}))
    return path, p


@pytest.mark.parametrize("clock", ["cpu", "wall"])
def test_timing_rows_paired_ratios_and_clock(tmp_path, clock):
    prompts, p = _prompts_file(tmp_path)
    cfg = B.KVBenchConfig(parts=["timing"], timing_lengths=[300], timing_new_tokens=3, repeats=3, threads=1,
                          clock=clock, timing_prompts=str(prompts), timing_memory=False, timing_label="t",
                          timing_candidates=["none", "none + chunked prefill", "knorm@0.25",
                                             "streaming-llm@0.25 + chunked"], out=str(tmp_path))
    with ResultWriter(tmp_path / "kv.jsonl") as w:
        rows = B.run_timing(_tiny_gemma(), _Tok(), cfg, w)
    by = {r["candidate"]: r for r in rows}
    assert set(by) == set(cfg.timing_candidates)
    for r in rows:
        assert r["clock"] == clock and r["threads"] == 1 and r["rounds"] == 3 and r["timing_label"] == "t"
        assert r["tokens"] == p["tokens"] and len(r["total_times"]) == len(r["prefill_times"]) == 3
        assert len(r["loadavg_before"]) == 3 and r["decode_tok_s"] == pytest.approx(3 / r["decode_s"])
        for prefix in ("", "vs_chunked_"):
            for what in ("total", "prefill", "decode", "pd"):
                k = f"{prefix}speedup_{what}"
                assert r[f"{k}_min"] <= r[f"{k}_q1"] <= r[k] <= r[f"{k}_q3"] <= r[f"{k}_max"]
    assert by["none"]["speedup_total"] == 1.0 and by["none + chunked prefill"]["vs_chunked_speedup_total"] == 1.0
    # the paired ratio is the median of base/other per round, not a ratio of medians
    base, other = by["none"]["total_times"], by["knorm@0.25"]["total_times"]
    ratios = sorted(b / o for b, o in zip(base, other, strict=True))
    assert by["knorm@0.25"]["speedup_total"] == pytest.approx(ratios[1])
    assert by["knorm@0.25"]["kv_fraction"] == pytest.approx(0.25, abs=0.02)
    # prefill + decode: the request without its setup, per round
    pd = [a + b for a, b in zip(by["knorm@0.25"]["prefill_times"], by["knorm@0.25"]["decode_times"], strict=True)]
    assert by["knorm@0.25"]["pd_times"] == pytest.approx(pd) and by["knorm@0.25"]["pd_max"] == max(pd)
    # the report shows one table per timing label, with the clock and rounds in its caption
    B.build_report(tmp_path)
    text = (tmp_path / "report.txt").read_text()
    assert "Timing 't'" in text and f"{clock} clock" in text and "3 rounds" in text


def test_cpu_clock_needs_one_thread(tmp_path):
    cfg = B.KVBenchConfig(parts=["timing"], threads=2, clock="cpu", out=str(tmp_path))
    with pytest.raises(ValueError, match="needs threads=1"):
        B.run_timing(None, None, cfg, None)
    with pytest.raises(ValueError, match="needs threads=1"):
        B.run_kv_bench(cfg)
    with pytest.raises(ValueError, match="clock must be"):
        B.run_kv_bench(B.KVBenchConfig(parts=["timing"], threads=1, clock="gpu", out=str(tmp_path)))


def test_timing_prompt_from_file_checks_length_and_tokens(tmp_path):
    prompts, p = _prompts_file(tmp_path)
    cfg = B.KVBenchConfig(timing_prompts=str(prompts))
    q, ids = B.timing_prompt(_Tok(), cfg, 300)
    assert q["id"] == p["id"] and ids.shape == (1, p["tokens"])
    with pytest.raises(ValueError, match="no timing prompt of length 400"):
        B.timing_prompt(_Tok(), cfg, 400)


def test_parse_kvpress_candidate():
    assert B.parse_kvpress_candidate("kvpress:SnapKVPress@0.25") == ("SnapKVPress", 0.25, "all")
    assert B.parse_kvpress_candidate("kvpress:KnormPress@0.5/global") == ("KnormPress", 0.5, "global")
    assert B.parse_kvpress_candidate("kvpress:none") == (None, 1.0, "all")
    for bad in ("SnapKVPress@0.25", "kvpress:SnapKVPress", "kvpress:SnapKVPress@1.5", "kvpress:X@0.5/sliding"):
        with pytest.raises(ValueError):
            B.parse_kvpress_candidate(bad)
    with pytest.raises(ValueError):  # checked before the model is loaded
        B.run_kv_bench(B.KVBenchConfig(parts=["timing"], timing_kvpress=["SnapKVPress@2"]))


def _write_run(path, rows, **meta):
    with ResultWriter(path, meta={"note": "test", **meta}) as w:
        for r in rows:
            w.write(r)
    return w.run_id


def test_merge_results_parts_filter_idempotent_and_report(tmp_path):
    a, b = tmp_path / "a.jsonl", tmp_path / "b.jsonl"
    old = {"part": "timing", "candidate": "none", "length": 4096, "tokens": 4100, "total_s": 9.0}
    sample = {"part": "passcode_sample", "variant": "none", "keep": 1.0, "length": 1100, "prompt": "1100-0",
              "depth": 0.5, "tokens": 1089, "correct": True, "error": None, "kv_fraction": 1.0, "kv_bytes": None}
    ra = _write_run(a, [old, sample])
    new = {"part": "timing", "timing_label": "main", "candidate": "none", "length": 4096, "tokens": 4100,
           "total_s": 8.0, "rounds": 7, "clock": "cpu", "threads": 1, "new_tokens": 128, "transformers": "x",
           "loadavg_before": [1.0, 1.0, 1.0], "loadavg_after": [2.0, 2.0, 2.0], "speedup_total": 1.0,
           "speedup_total_q1": 1.0, "speedup_total_q3": 1.0, "speedup_prefill": 1.0, "speedup_prefill_q1": 1.0,
           "speedup_prefill_q3": 1.0, "speedup_decode": 1.0, "speedup_decode_q1": 1.0, "speedup_decode_q3": 1.0}
    rb = _write_run(b, [new])
    dest = tmp_path / "out" / "kv.jsonl"
    assert B.merge_results([f"{a}@passcode_sample", b], dest) == {"runs": 2, "rows": 2}
    runs = read_runs(dest)
    assert list(runs) == [ra, rb]
    assert [r["part"] for r in runs[ra][1]] == ["passcode_sample"]  # the old timing row was left out
    assert B.merge_results([a, b], dest) == {"runs": 0, "rows": 0}  # runs already there are skipped
    with pytest.raises(FileNotFoundError):
        B.merge_results([tmp_path / "missing.jsonl"], dest)
    B.build_report(dest.parent)
    text = (dest.parent / "report.txt").read_text()
    assert "Timing 'main'" in text and "earlier run" not in text and "1-min load 1-2" in text
    assert "Passcode retrieval" in text
    # a peer venv's timing run merged last: its own table after the main one; the header keeps the main run
    c = tmp_path / "c.jsonl"
    _write_run(c, [dict(new, timing_label="kvpress venv", candidate="kvpress:none")],
               config={"timing_label": "kvpress venv"})
    assert B.merge_results([c], dest)["runs"] == 1
    assert B.latest_runs(dest)["_meta"][0]["run_id"] == rb
    B.build_report(dest.parent)
    text = (dest.parent / "report.txt").read_text()
    assert text.index("Timing 'main'") < text.index("Timing 'kvpress venv'")


# the settings each passcode variant / timing candidate ran with before they became presets (labels unchanged)
_SETTINGS = {
    "snapkv": {"window_size": 32, "pooling": "avgpool", "kernel_size": 5},
    "snapkv-q": {"window_size": "question", "pooling": "avgpool", "kernel_size": 5},
    "snapkv-q-max9": {"window_size": "question", "pooling": "maxpool", "kernel_size": 9},
    "pyramidkv-q": {"window_size": "question"},
    "tokenselect": {"n_init": 4, "n_local": 16},
    "gemfilter": {"window_size": 1, "pooling": "avgpool", "kernel_size": 5},
    "gemfilter-q-max9": {"window_size": "question", "pooling": "maxpool", "kernel_size": 9},
}


def test_variants_use_the_methods_presets():
    import tokenreduce as tr

    runs = {**{v: (name, kw) for v, (name, kw) in B.VARIANTS.items()},
            **{c: (name, kw) for c, (name, _, _, kw) in B.TIMING_CANDIDATES.items() if name}}
    for label, (name, kw) in runs.items():
        kw = {k: v for k, v in kw.items() if k != "layers"}
        method = tr.registry.get_method(name, "kv-cache").build(keep=0.25, question_len=3, **kw)
        expected = _SETTINGS.get(label.split("@")[0], {})
        assert {k: getattr(method, k) for k in expected} == expected, label
        assert all(k == "preset" for k in kw), (label, kw)  # no setting repeated by hand
    assert {"snapkv-q-max9", "tokenselect", "pyramidkv-q", "gemfilter-q-max9"} <= set(B.DEFAULT_VARIANTS)


def test_ppl_part_holds_a_cache_capacity(tmp_path):
    """The streaming perplexity runs each method at a fixed cache of ppl_budget entries (tr.Keep(count=...))."""
    cfg = B.KVBenchConfig(ppl_tokens=48, ppl_budget=16, ppl_segment=16, ppl_streams=1, ppl_chunk=8, out=str(tmp_path))
    with ResultWriter(tmp_path / "kv.jsonl") as w:
        rows = B.run_ppl(_tiny_gemma(), _Tok(), cfg, w)
    by = {r["variant"]: r for r in rows}
    assert by["full cache"]["kv_fraction_end"] == 1.0
    for label in ("window (no sinks)", "streaming-llm", "h2o", "tova"):
        assert by[label]["budget"] == 16 and by[label]["kv_fraction_end"] == pytest.approx(16 / 48), label


def test_kvpress_venv_options_are_checked_before_anything_loads(tmp_path, monkeypatch):
    from tokenreduce.bench.peers import PeerEnvError

    with pytest.raises(ValueError, match="--timing-kvpress"):  # the venv runs the timing with kvpress's presses
        B.run_kv_bench(B.KVBenchConfig(parts=["timing"], kvpress_python="/x/python", out=str(tmp_path)))
    with pytest.raises(FileNotFoundError, match="make peers"):
        B.run_kv_bench(B.KVBenchConfig(parts=["timing"], kvpress_python=str(tmp_path / "python"),
                                       timing_kvpress=["none"], out=str(tmp_path)))
    monkeypatch.setattr("importlib.util.find_spec", lambda name, *a: None)  # kvpress not in this python
    with pytest.raises(PeerEnvError, match=r"kvpress.*make peers.*--kvpress-python \.venv-kvpress/bin/python"):
        B.run_kv_bench(B.KVBenchConfig(parts=["timing"], timing_kvpress=["none"], out=str(tmp_path)))
    assert not (tmp_path / "kv.jsonl").exists()


def test_kvpress_venv_commands_carry_the_settings(tmp_path):
    from pathlib import Path

    from tokenreduce.bench.kv.venv import KVPRESS_LABEL, kvpress_compare_command, kvpress_venv_command

    cfg = B.KVBenchConfig(parts=["timing"], timing_lengths=[1024, 4096], timing_candidates=["none", "knorm@0.25"],
                          timing_kvpress=["none", "KnormPress@0.25"], clock="cpu", threads=1, repeats=5,
                          kvpress_python="/v/bin/python", timing_memory=False, keeps=[0.5, 0.25])
    cmd = kvpress_venv_command(cfg, Path("/p.json"), Path("/o"))
    assert cmd[:3] == ["/v/bin/python", "-m", "tokenreduce.bench.kv"] and "--no-timing-memory" in cmd
    opts = dict(zip(cmd[3::2], cmd[4::2], strict=False))
    assert opts["--timing-lengths"] == "1024,4096" and opts["--timing-kvpress"] == "none,KnormPress@0.25"
    assert opts["--timing-candidates"] == "none,knorm@0.25" and opts["--timing-label"] == KVPRESS_LABEL
    assert (opts["--clock"], opts["--threads"], opts["--repeats"], opts["--parts"]) == ("cpu", "1", "5", "timing")
    cmp = kvpress_compare_command(B.KVBenchConfig(parts=["passcode"], keeps=[0.5, 0.25], threads=1,
                                                  kvpress_python="/v/bin/python"), Path("/p.json"), Path("/k.jsonl"))
    assert cmp[1].endswith("scripts/kvpress_compare.py") and "--skip-kept" in cmp and "--skip-passcode" not in cmp
    assert cmp[cmp.index("--keeps") + 1] == "0.5,0.25"


def test_same_rounds_table_pairs_ours_and_kvpress_with_the_same_none(tmp_path):
    def row(candidate, pd, ratio, kv=None):
        r = {"part": "timing", "timing_label": "kvpress venv", "candidate": candidate, "length": 1024, "tokens": 1030,
             "rounds": 5, "clock": "cpu", "threads": 1, "new_tokens": 32, "transformers": "5.2.0", "pd_s": pd,
             "pd_iqr": 0.01, "pd_min": pd - 0.1, "pd_max": pd + 0.1, "kv_bytes": kv}
        for prefix, x in (("", ratio), ("vs_kvpress_none_", ratio * 1.1)):
            for what in ("total", "prefill", "decode", "pd"):
                r.update({f"{prefix}speedup_{what}{q}": x for q in ("", "_q1", "_q3", "_min", "_max")})
        return r

    rows = [row("none", 2.0, 1.0), row("snapkv-q-max9@0.25", 1.6, 1.25, 10), row("kvpress:none", 2.2, 0.9),
            row("kvpress:SnapKVPress@0.25/global", 1.9, 1.05, 20)]
    _write_run(tmp_path / "kv.jsonl", rows, config={"timing_label": "kvpress venv"})
    B.build_report(tmp_path)
    text = (tmp_path / "report.txt").read_text()
    table = text[text.index("tokenreduce and kvpress in the same rounds"):]
    assert "cpu clock" in table and "transformers 5.2.0" in table
    lines = {ln.split()[0] + " " + ln.split()[1]: ln for ln in table.splitlines()[3:] if ln.strip()}
    assert "1.250 [1.250, 1.250]" in lines["tokenreduce snapkv-q-max9"]
    assert "global" in lines["kvpress SnapKVPress"] and "1.050 [1.050, 1.050]" in lines["kvpress SnapKVPress"]
    assert "[1.500, 1.700]" in lines["tokenreduce snapkv-q-max9"]  # prefill+decode [min, max]


def test_kvpress_side_resumes_from_its_results_file(tmp_path, monkeypatch):
    from pathlib import Path

    from tokenreduce.bench.kv import venv

    ran = []
    monkeypatch.setattr(venv, "check_kvpress_python", lambda cfg: cfg.kvpress_python)
    monkeypatch.setattr(venv, "_run", lambda cmd, what: ran.append(what))
    cfg = B.KVBenchConfig(parts=["passcode", "agreement"], kvpress_python="/v/bin/python", out=str(tmp_path))
    venv.run_compare_in_kvpress_venv(cfg, Path("/p.json"))
    assert ran == ["kvpress_compare.py"]
    _write_run(tmp_path / "kvpress.jsonl", [{"part": "kvpress_passcode", "press": "SnapKVPress", "layers": "all",
                                             "keep": 0.5}])
    venv.run_compare_in_kvpress_venv(cfg, Path("/p.json"))  # the kept positions are still missing: runs
    assert len(ran) == 2
    venv.run_compare_in_kvpress_venv(B.KVBenchConfig(parts=["passcode"], kvpress_python="/v/bin/python",
                                                     out=str(tmp_path)), Path("/p.json"))
    assert len(ran) == 2  # every part asked for is there: skipped
