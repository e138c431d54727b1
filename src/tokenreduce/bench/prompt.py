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

import functools
import statistics
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from .prompt_peers import PEER_SCRIPT

__all__ = ["PEER_SCRIPT", "SMOKE", "PromptBenchConfig", "PromptContext", "load_prompt_context", "prompt_sweep",
           "register_cli", "run_prompt_bench", "run_prompt_cell"]

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
    smoke: bool = False


def _answer(model: Any, tok: Any, prompt: str, max_new_tokens: int) -> tuple[str, float]:
    from ..models.gemma import greedy_continuation

    t0 = time.perf_counter()
    g = greedy_continuation(model, tok, prompt, max_new_tokens=max_new_tokens)
    return g, time.perf_counter() - t0


def _forward(model: Any, tok: Any, text: str) -> float:
    """Seconds of one plain forward of the LM (its own dtype and attention) over <bos> + ``text``: the unit
    "one forward of the scorer" that compression latency is compared with."""
    import torch

    bos = [tok.bos_token_id] if tok.bos_token_id is not None else []  # the smoke tokenizer (WordPiece) has none
    ids = torch.tensor([bos + tok(text, add_special_tokens=False, verbose=False).input_ids])
    with torch.inference_mode():
        t0 = time.perf_counter()
        model(input_ids=ids, use_cache=False, logits_to_keep=1)
        return time.perf_counter() - t0


def _full_prompt(context: str, s: Any) -> str:
    return f"{context}\n{s.question}\n{s.answer_prefix}"


def _med(xs: list[float]) -> float:
    return statistics.median(xs) if xs else float("nan")


#: ``--smoke``: a tiny random-weight Gemma 3 over all-MiniLM-L6-v2's tokenizer, 2 prompts of ~200 tokens
SMOKE = {"methods": ("llmlingua", "selective-context", "truncate", "random"), "keeps": (0.5,), "n_samples": 2,
         "target_tokens": 200, "max_new_tokens": 4, "threads": 1}


@dataclass
class PromptContext:
    """What every cell shares in a worker: the LM (scorer and reader), its tokenizer and the passcode prompts."""

    model: Any
    tok: Any
    samples: list[Any]

    def count(self, text: str) -> int:
        return len(self.tok(text, add_special_tokens=False, verbose=False).input_ids)


def load_prompt_context(name: str, n_samples: int, target_tokens: int, seed: int, model: Any = None,
                        tokenizer: Any = None) -> PromptContext:
    """Gemma 3 270M (``name`` "gemma3-270m"), the smoke LM (``"smoke"``) or the given one, and the prompts."""
    from ..data.passcode import make_passcode_samples
    from .smoke import SMOKE_MODEL, smoke_causal_lm

    if model is None:
        if name == SMOKE_MODEL:
            model, tokenizer = smoke_causal_lm()
        else:
            from ..models.gemma import load_gemma

            model, tokenizer = load_gemma()
    ctx = PromptContext(model, tokenizer, [])
    ctx.samples = make_passcode_samples(n_samples, target_tokens, ctx.count, seed=seed)
    return ctx


def _warm_up(ctx: PromptContext, methods: Sequence[str]) -> None:
    """Model caches, MiniLM load, bf16 head copy: not timed."""
    import tokenreduce as tr

    s0 = ctx.samples[0]
    warm = s0.context[:400]
    for m in methods:
        tr.compress(warm, method=m, keep=0.5, lm=ctx.model, tokenizer=ctx.tok, question=s0.question)
    _answer(ctx.model, ctx.tok, _full_prompt(warm, s0), 2)
    _forward(ctx.model, ctx.tok, warm)


def _base_rows(ctx: PromptContext, max_new_tokens: int) -> list[dict[str, Any]]:
    """The uncompressed prompts answered: one sample row each (with a plain forward's seconds)."""
    rows = []
    for i, s in enumerate(ctx.samples):
        tf = _forward(ctx.model, ctx.tok, s.context)
        g, ta = _answer(ctx.model, ctx.tok, s.prompt, max_new_tokens)
        rows.append({"kind": "sample", "method": "none", "keep": 1.0, "sample": i, "depth": s.depth,
                     "n_tokens": ctx.count(s.context), "kept_ratio": 1.0, "passcode_kept": True,
                     "correct": s.correct(g), "compress_s": 0.0, "answer_s": ta, "e2e_s": ta, "forward_s": tf,
                     "generated": g})
    return rows


def _method_rows(ctx: PromptContext, method: str, keep: float, max_new_tokens: int) -> list[dict[str, Any]]:
    import tokenreduce as tr

    rows = []
    for i, s in enumerate(ctx.samples):
        t0 = time.perf_counter()
        res = tr.compress(s.context, method=method, keep=keep, lm=ctx.model, tokenizer=ctx.tok, question=s.question)
        tc = time.perf_counter() - t0
        g, ta = _answer(ctx.model, ctx.tok, _full_prompt(res.text, s), max_new_tokens)
        rows.append({"kind": "sample", "method": method, "keep": keep, "sample": i, "depth": s.depth,
                     "n_tokens": res.n_tokens, "kept_ratio": res.kept_ratio, "passcode_kept": s.answer in res.text,
                     "correct": s.correct(g), "compress_s": tc, "score_s": res.timings.get("score", 0.0),
                     "answer_s": ta, "e2e_s": tc + ta, "generated": g, "notes": res.notes})
    return rows


def _peer_rows(ctx: PromptContext, s: dict[str, Any], keeps: Sequence[float]) -> list[dict[str, Any]]:
    from .prompt_peers import run_peers

    peer_out = run_peers(s["peers"], ctx.samples, keeps, s["peer_methods"], s["threads"])
    rows = []
    for (pm, k, i), po in sorted(peer_out.items()):
        name, smp = f"{pm} (package)", ctx.samples[i]
        if po.get("error"):
            rows.append({"kind": "sample", "method": name, "keep": k, "sample": i, "error": po["error"]})
            continue
        text = po["text"]
        g, ta = _answer(ctx.model, ctx.tok, _full_prompt(text, smp), s["max_new_tokens"])
        nk = ctx.count(text)
        rows.append({"kind": "sample", "method": name, "keep": k, "sample": i, "depth": smp.depth,
                     "n_tokens": ctx.count(smp.context), "kept_ratio": nk / ctx.count(smp.context),
                     "passcode_kept": smp.answer in text, "correct": smp.correct(g), "compress_s": po["seconds"],
                     "answer_s": ta, "e2e_s": po["seconds"] + ta, "generated": g,
                     "notes": ["compression time measured in the peer process (same machine, before our runs)"]})
    return rows


def run_prompt_cell(ctx: PromptContext, cell: Any) -> list[dict[str, Any]]:
    """The rows of one cell: per prompt one sample row, then one summary row per (method, keep). A method's
    cell answers the uncompressed prompts too (not written): its summary's ratios come from its own cell."""
    from .sweep import budget_tuple
    from .timing import fixed_threads

    s = dict(cell.settings)
    with fixed_threads(s["threads"]):
        _warm_up(ctx, s["warm_methods"])
        base = _base_rows(ctx, s["max_new_tokens"])
        if cell.method == "none":
            return [*base, {"kind": "summary", **_summary("none", 1.0, base, base)}]
        keeps = budget_tuple(cell.keep)
        if cell.method == "peers":
            rows = _peer_rows(ctx, s, keeps)
        else:
            rows = [r for k in keeps for r in _method_rows(ctx, cell.method, k, s["max_new_tokens"])]
    groups: dict[tuple[str, float], list[dict[str, Any]]] = {}
    for r in rows:
        groups.setdefault((r["method"], r["keep"]), []).append(r)
    return rows + [{"kind": "summary", **_summary(m, k, rs, base)} for (m, k), rs in groups.items()]


def prompt_sweep(cfg: PromptBenchConfig, model: Any = None, tokenizer: Any = None) -> Any:
    """One timing cell per (method, keep), one for the uncompressed prompts, one for the peers."""
    from .smoke import cell_model
    from .sweep import CachedLoader, Cell, Sweep

    name = cell_model(cfg.smoke, model is not None, lambda: "gemma3-270m")
    s = {"n_samples": cfg.n_samples, "target_tokens": cfg.target_tokens, "max_new_tokens": cfg.max_new_tokens,
         "threads": cfg.threads, "warm_methods": list(cfg.methods), "device": "cpu"}
    cells = [Cell("prompt", name, "none", 1.0, s, seed=cfg.seed, timing=True)]
    cells += [Cell("prompt", name, m, k, s, seed=cfg.seed, timing=True) for m in cfg.methods for k in cfg.keeps]
    if cfg.peers:
        cells.append(Cell("prompt", name, "peers", tuple(cfg.peer_keeps),
                          {**s, "peers": cfg.peers, "peer_methods": list(cfg.peer_methods)}, seed=cfg.seed,
                          timing=True))
    load = CachedLoader(functools.partial(load_prompt_context, n_samples=cfg.n_samples,
                                          target_tokens=cfg.target_tokens, seed=cfg.seed, model=model,
                                          tokenizer=tokenizer))
    return Sweep("prompt", cells, load, run_prompt_cell, cpus_per_cell=cfg.threads)


def run_prompt_bench(methods: Sequence[str] = DEFAULT_METHODS, keeps: Sequence[float] = DEFAULT_KEEPS,
                     n_samples: int = 8, target_tokens: int = 1100, out: str = "results/prompt",
                     threads: int = 2, peers: str | None = None, max_new_tokens: int = 8, seed: int = 0,
                     peer_methods: Sequence[str] = ("llmlingua", "longllmlingua", "selective-context"),
                     peer_keeps: Sequence[float] = (0.5,), model: Any = None, tokenizer: Any = None,
                     progress: bool = True, smoke: bool = False, executor: str = "local",
                     address: str | None = None, resume: bool = True) -> list[dict[str, Any]]:
    """Run the prompt benchmark; returns the summary rows (per-sample rows go to ``out/results.jsonl``).
    ``smoke``: a tiny random-weight Gemma 3 and :data:`SMOKE`'s settings; ``executor``, ``address``,
    ``resume``: as in ``bench vit`` (docs/sweeps.md). CPU only (the scorer runs on the LM's device)."""
    from .args import check_methods, parse_keeps
    from .report import format_table, html_report
    from .sweep import run_sweep, without_metadata

    if smoke:
        methods, keeps, n_samples, target_tokens, max_new_tokens, threads = (SMOKE[k] for k in (
            "methods", "keeps", "n_samples", "target_tokens", "max_new_tokens", "threads"))
    check_methods(methods, "prompt")  # every check before anything is loaded or written
    keeps, peer_keeps = parse_keeps(keeps, "keeps"), parse_keeps(peer_keeps, "peer_keeps")
    if peers is not None and not Path(peers).is_file():
        raise FileNotFoundError(f"--peers {peers}: no such python interpreter (build the peers' virtualenv with "
                                f"`make peers`)")
    cfg = PromptBenchConfig(methods=list(methods), keeps=list(keeps), n_samples=n_samples,
                            target_tokens=target_tokens, max_new_tokens=max_new_tokens, threads=threads, seed=seed,
                            peers=peers, peer_methods=list(peer_methods), peer_keeps=list(peer_keeps), out=out,
                            smoke=smoke)
    if model is None and not smoke:
        from ..models.gemma import gemma_cache_dir, gemma_cache_ready
        from ..models.gemma.cache import missing_cache_message

        if not gemma_cache_ready():
            raise FileNotFoundError(missing_cache_message(gemma_cache_dir()))
    outdir = Path(out)
    sweep = prompt_sweep(cfg, model, tokenizer)
    sweep.meta = {"bench": "prompt", "config": asdict(cfg)}
    result = run_sweep(sweep, outdir / "results.jsonl", executor=executor, address=address, resume=resume,
                       progress=progress)
    rows = [{k: v for k, v in r.items() if k != "kind"}
            for r in without_metadata(result.rows) if r.get("kind") == "summary" or r.get("cell_failed")]
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
                      "e2e = compression + answer; base = the uncompressed prompt answered in the same cell; "
                      "forward_s = one plain fp32 forward of Gemma over the context in the same cell, "
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


def register_cli(bench_app: Any) -> None:
    import typer

    from .sweep.options import sweep_options

    o = sweep_options()

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
        executor: str = o.executor, address: str = o.address, resume: bool = o.resume, smoke: bool = o.smoke,
    ) -> None:
        """Prompt compression on passcode retrieval with Gemma 3 270M: ratio, accuracy, latency (+ peers)."""
        from .args import parse_keeps, split_list

        if smoke and out == "results/prompt":
            out = "results/prompt/smoke"
        run_prompt_bench(methods=split_list(methods), keeps=parse_keeps(keep), n_samples=n, target_tokens=tokens, out=out,
                         threads=threads, peers=peers,
                         peer_methods=split_list(peer_methods), peer_keeps=parse_keeps(peer_keep, "--peer-keep"),
                         smoke=smoke, executor=executor, address=address, resume=resume)
