"""`tokenreduce bench prompt`: prompt compression on passcode retrieval with Gemma 3 270M as scorer and reader.

Each sample is real English filler (Lee corpus) with a 5-digit pass key inserted at some depth, the question
"Now answer the quiz. What is the pass key?" and the answer prefix "The pass key is" (``data/passcode.py``).
For every context length, (method, keep) and sample, in one process and interleaved prompt by prompt with the
uncompressed prompt:

* compress the context (the question is passed to question-aware methods, never compressed);
* achieved ratio = Gemma tokens of the compressed context / of the original (re-tokenized output);
* passcode kept (the 5 digits survive in the compressed text) and answered (Gemma greedy-decodes 8 tokens
  after context + question + answer prefix; correct if the digits appear);
* compression latency, answer latency, end-to-end request time (compression + answer) against the uncompressed
  request, as the median of per-prompt paired ratios; over several lengths, the break-even length from which
  a method's request is faster than the uncompressed one (:mod:`.prompt_report`).

Peers (optional, ``--peers PYTHON``): the ``llmlingua`` (0.2.2) and ``selective-context`` (0.1.4) packages run in
their own virtualenv (``PYTHON`` is its interpreter, ``make peers`` builds it) on the same texts with the same
Gemma checkpoint as scorer; their outputs are measured and answered here exactly like ours. See
:data:`PEER_SCRIPT`.
"""

from __future__ import annotations

import functools
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from .prompt_peers import PEER_SCRIPT
from .prompt_report import prompt_summary

__all__ = ["PEER_SCRIPT", "SMOKE", "PromptBenchConfig", "PromptContext", "load_prompt_context", "prompt_summary",
           "prompt_sweep", "register_cli", "run_prompt_bench", "run_prompt_cell"]

DEFAULT_METHODS = ("longllmlingua", "extractive", "llmlingua", "selective-context", "truncate", "random")
DEFAULT_KEEPS = (0.5,)


@dataclass
class PromptBenchConfig:
    methods: Sequence[str] = DEFAULT_METHODS
    keeps: Sequence[float] = DEFAULT_KEEPS
    n_samples: int = 8
    lengths: Sequence[int] = (1100,)  # context lengths in Gemma tokens (a set of prompts per length)
    max_new_tokens: int = 8
    threads: int = 2
    seed: int = 0
    peers: str | None = None
    peer_methods: Sequence[str] = ("llmlingua", "longllmlingua", "selective-context")
    peer_keeps: Sequence[float] = (0.5,)
    out: str = "results/prompt"
    smoke: bool = False
    clock: str = "wall"  # "cpu": process CPU seconds (one thread), robust on a shared machine


def _answer(model: Any, tok: Any, prompt: str, max_new_tokens: int, tick: Any = time.perf_counter
            ) -> tuple[str, float]:
    from ..models.gemma import greedy_continuation

    t0 = tick()
    g = greedy_continuation(model, tok, prompt, max_new_tokens=max_new_tokens)
    return g, tick() - t0


def _forward(model: Any, tok: Any, text: str, tick: Any = time.perf_counter) -> float:
    """Seconds of one plain forward of the LM (its own dtype and attention) over <bos> + ``text``: the unit
    "one forward of the scorer" that compression latency is compared with."""
    import torch

    bos = [tok.bos_token_id] if tok.bos_token_id is not None else []  # the smoke tokenizer (WordPiece) has none
    ids = torch.tensor([bos + tok(text, add_special_tokens=False, verbose=False).input_ids])
    with torch.inference_mode():
        t0 = tick()
        model(input_ids=ids, use_cache=False, logits_to_keep=1)
        return tick() - t0


def _full_prompt(context: str, s: Any) -> str:
    return f"{context}\n{s.question}\n{s.answer_prefix}"


#: ``--smoke``: a tiny random-weight Gemma 3 over all-MiniLM-L6-v2's tokenizer, 2 prompts of ~200 tokens
SMOKE = {"methods": ("llmlingua", "selective-context", "truncate", "random"), "keeps": (0.5,), "n_samples": 2,
         "lengths": (200,), "max_new_tokens": 4, "threads": 1}


@dataclass
class PromptContext:
    """What every cell shares in a worker: the LM (scorer and reader), its tokenizer, and the passcode prompts
    of each (count, length, seed) a cell asked for (made once)."""

    model: Any
    tok: Any
    made: dict[tuple[int, int, int], list[Any]] = field(default_factory=dict)

    def count(self, text: str) -> int:
        return len(self.tok(text, add_special_tokens=False, verbose=False).input_ids)

    def samples(self, n: int, length: int, seed: int) -> list[Any]:
        """``n`` passcode prompts whose context has about ``length`` tokens of this tokenizer."""
        from ..data.passcode import make_passcode_samples

        if (n, length, seed) not in self.made:
            self.made[(n, length, seed)] = make_passcode_samples(n, length, self.count, seed=seed)
        return self.made[(n, length, seed)]


def load_prompt_context(name: str, model: Any = None, tokenizer: Any = None) -> PromptContext:
    """Gemma 3 270M (``name`` "gemma3-270m"), the smoke LM (``"smoke"``) or the given one."""
    from .smoke import SMOKE_MODEL, smoke_causal_lm

    if model is None:
        if name == SMOKE_MODEL:
            model, tokenizer = smoke_causal_lm()
        else:
            from ..models.gemma import load_gemma

            model, tokenizer = load_gemma()
    return PromptContext(model, tokenizer)


def _warm_up(ctx: PromptContext, samples: list[Any], methods: Sequence[str]) -> None:
    """Model caches, MiniLM load, bf16 head copy: not timed."""
    import tokenreduce as tr

    s0 = samples[0]
    warm = s0.context[:400]
    for m in methods:
        tr.compress(warm, method=m, keep=0.5, lm=ctx.model, tokenizer=ctx.tok, question=s0.question)
    _answer(ctx.model, ctx.tok, _full_prompt(warm, s0), 2)
    _forward(ctx.model, ctx.tok, warm)


def _base_row(ctx: PromptContext, i: int, s: Any, max_new_tokens: int, tick: Any) -> dict[str, Any]:
    """The uncompressed prompt answered, with one plain forward's seconds."""
    tf = _forward(ctx.model, ctx.tok, s.context, tick)
    g, ta = _answer(ctx.model, ctx.tok, s.prompt, max_new_tokens, tick)
    return {"kind": "sample", "method": "none", "keep": 1.0, "sample": i, "depth": s.depth,
            "n_tokens": ctx.count(s.context), "kept_ratio": 1.0, "passcode_kept": True, "correct": s.correct(g),
            "compress_s": 0.0, "answer_s": ta, "e2e_s": ta, "forward_s": tf, "generated": g}


def _method_row(ctx: PromptContext, i: int, s: Any, method: str, keep: float, max_new_tokens: int, tick: Any
                ) -> dict[str, Any]:
    import tokenreduce as tr

    t0 = tick()
    res = tr.compress(s.context, method=method, keep=keep, lm=ctx.model, tokenizer=ctx.tok, question=s.question)
    tc = tick() - t0
    g, ta = _answer(ctx.model, ctx.tok, _full_prompt(res.text, s), max_new_tokens, tick)
    return {"kind": "sample", "method": method, "keep": keep, "sample": i, "depth": s.depth,
            "n_tokens": res.n_tokens, "kept_ratio": res.kept_ratio, "passcode_kept": s.answer in res.text,
            "correct": s.correct(g), "compress_s": tc, "score_s": res.timings.get("score", 0.0),
            "answer_s": ta, "e2e_s": tc + ta, "generated": g, "notes": res.notes}


def _peer_row(ctx: PromptContext, i: int, s: Any, peer_method: str, keep: float, po: dict[str, Any],
              max_new_tokens: int, tick: Any) -> dict[str, Any]:
    """A peer package's compressed text (compressed in the peer's process) answered here like ours."""
    name = f"{peer_method} (package)"
    if po.get("error"):
        return {"kind": "sample", "method": name, "keep": keep, "sample": i, "error": po["error"]}
    text = po["text"]
    g, ta = _answer(ctx.model, ctx.tok, _full_prompt(text, s), max_new_tokens, tick)
    n = ctx.count(s.context)
    return {"kind": "sample", "method": name, "keep": keep, "sample": i, "depth": s.depth, "n_tokens": n,
            "kept_ratio": ctx.count(text) / n, "passcode_kept": s.answer in text, "correct": s.correct(g),
            "compress_s": po["seconds"], "answer_s": ta, "e2e_s": po["seconds"] + ta, "generated": g,
            "notes": ["compression time measured in the peer process (same machine, before the answers here)"]}


def run_prompt_cell(ctx: PromptContext, cell: Any) -> list[dict[str, Any]]:
    """The rows of one cell (one context length): prompt by prompt the uncompressed prompt's sample row, then
    the method's, then one summary row per (method, keep). A method's cell answers the uncompressed prompts
    too (not written): its summary's ratios are paired per prompt within its own cell."""
    from .sweep import budget_tuple
    from .timing import CLOCKS, fixed_threads

    s = dict(cell.settings)
    length, mnt, clock = s["target_tokens"], s["max_new_tokens"], s.get("clock", "wall")
    tick = CLOCKS[clock]
    samples = ctx.samples(s["n_samples"], length, cell.seed)
    keeps = budget_tuple(cell.keep)
    rows: list[dict[str, Any]] = []
    base: list[dict[str, Any]] = []
    with fixed_threads(s["threads"]):
        _warm_up(ctx, samples, s["warm_methods"])
        peer_out: dict[tuple[str, float, int], dict[str, Any]] = {}
        if cell.method == "peers":
            from .prompt_peers import run_peers

            peer_out = run_peers(s["peers"], samples, keeps, s["peer_methods"], s["threads"], clock)
        for i, smp in enumerate(samples):
            base.append(_base_row(ctx, i, smp, mnt, tick))
            if cell.method == "peers":
                rows += [_peer_row(ctx, i, smp, pm, k, po, mnt, tick) for (pm, k, j), po in sorted(peer_out.items())
                         if j == i]
            elif cell.method != "none":
                rows += [_method_row(ctx, i, smp, cell.method, k, mnt, tick) for k in keeps]
    if cell.method == "none":
        return [*base, {"kind": "summary", **prompt_summary("none", 1.0, length, base, base)}]
    groups: dict[tuple[str, float], list[dict[str, Any]]] = {}
    for r in rows:
        groups.setdefault((r["method"], r["keep"]), []).append(r)
    return rows + [{"kind": "summary", **prompt_summary(m, k, length, rs, base)} for (m, k), rs in groups.items()]


def prompt_sweep(cfg: PromptBenchConfig, model: Any = None, tokenizer: Any = None) -> Any:
    """Per context length: one timing cell for the uncompressed prompts, one per (method, keep), one for the
    peers."""
    from .smoke import cell_model
    from .sweep import CachedLoader, Cell, Sweep

    name = cell_model(cfg.smoke, model is not None, lambda: "gemma3-270m")
    cells = []
    for length in cfg.lengths:
        s = {"n_samples": cfg.n_samples, "target_tokens": length, "max_new_tokens": cfg.max_new_tokens,
             "threads": cfg.threads, "warm_methods": list(cfg.methods), "device": "cpu"}
        if cfg.clock != "wall":  # (wall-clock cells keep the ids they had before the option existed)
            s["clock"] = cfg.clock
        cells.append(Cell("prompt", name, "none", 1.0, s, seed=cfg.seed, timing=True))
        cells += [Cell("prompt", name, m, k, s, seed=cfg.seed, timing=True) for m in cfg.methods for k in cfg.keeps]
        if cfg.peers:
            cells.append(Cell("prompt", name, "peers", tuple(cfg.peer_keeps),
                              {**s, "peers": cfg.peers, "peer_methods": list(cfg.peer_methods)}, seed=cfg.seed,
                              timing=True))
    load = CachedLoader(functools.partial(load_prompt_context, model=model, tokenizer=tokenizer))
    return Sweep("prompt", cells, load, run_prompt_cell, cpus_per_cell=cfg.threads)


def run_prompt_bench(methods: Sequence[str] = DEFAULT_METHODS, keeps: Sequence[float] = DEFAULT_KEEPS,
                     n_samples: int = 8, target_tokens: int | Sequence[int] = 1100, out: str = "results/prompt",
                     threads: int = 2, peers: str | None = None, max_new_tokens: int = 8, seed: int = 0,
                     peer_methods: Sequence[str] = ("llmlingua", "longllmlingua", "selective-context"),
                     peer_keeps: Sequence[float] = (0.5,), model: Any = None, tokenizer: Any = None,
                     progress: bool = True, smoke: bool = False, executor: str = "local",
                     address: str | None = None, resume: bool = True, clock: str = "wall"
                     ) -> list[dict[str, Any]]:
    """Run the prompt benchmark; returns the summary rows (per-sample rows go to ``out/results.jsonl``).
    ``target_tokens``: one context length or several (then also the break-even table: from which length each
    method's whole request beats the uncompressed one). ``smoke``: a tiny random-weight Gemma 3 and
    :data:`SMOKE`'s settings; ``executor``, ``address``, ``resume``: as in ``bench vit`` (docs/sweeps.md).
    ``clock``: "wall" (elapsed) or "cpu" (process CPU seconds, also in the peer process; needs ``threads=1``).
    CPU only (the scorer runs on the LM's device)."""
    from .args import check_choice, check_methods, parse_keeps
    from .kv.timing import check_clock
    from .prompt_report import write_prompt_report
    from .sweep import run_sweep, without_metadata

    lengths = [target_tokens] if isinstance(target_tokens, int) else list(target_tokens)
    if smoke:
        methods, keeps, n_samples, lengths, max_new_tokens, threads = (SMOKE[k] for k in (
            "methods", "keeps", "n_samples", "lengths", "max_new_tokens", "threads"))
    check_methods(methods, "prompt")  # every check before anything is loaded or written
    keeps, peer_keeps = parse_keeps(keeps, "keeps"), parse_keeps(peer_keeps, "peer_keeps")
    if not lengths or any(not isinstance(n, int) or n < 50 for n in lengths):
        raise ValueError(f"target_tokens: context lengths must be whole numbers of tokens >= 50, got {lengths}")
    if peers is not None:
        if not Path(peers).is_file():
            raise FileNotFoundError(f"--peers {peers}: no such python interpreter (build the peers' virtualenv "
                                    f"with `make peers`)")
        from .peers import check_peer_python, script_imports

        check_peer_python(peers, "prompt", script_imports(PEER_SCRIPT))  # one interpreter start, no imports
    cfg = PromptBenchConfig(methods=list(methods), keeps=list(keeps), n_samples=n_samples, lengths=list(lengths),
                            max_new_tokens=max_new_tokens, threads=threads, seed=seed, peers=peers,
                            peer_methods=list(peer_methods), peer_keeps=list(peer_keeps), out=out, smoke=smoke,
                            clock=clock)
    check_choice(clock, ("wall", "cpu"), "clock")
    check_clock(cfg)
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
    print(write_prompt_report(rows, asdict(cfg), outdir))
    return rows


def register_cli(bench_app: Any) -> None:
    import typer

    from .sweep.options import sweep_options

    o = sweep_options()

    @bench_app.command("prompt")
    def prompt(
        methods: str = typer.Option(",".join(DEFAULT_METHODS), help="comma-separated prompt methods"),
        keep: str = typer.Option(",".join(str(k) for k in DEFAULT_KEEPS), help="comma-separated keep values"),
        n: int = typer.Option(8, help="passcode prompts (per context length)"),
        tokens: str = typer.Option("1100", help="comma-separated context lengths in Gemma tokens (several: also "
                                                "the break-even table, e.g. 250,500,1000,2000)"),
        out: str = typer.Option("results/prompt", help="output directory"),
        threads: int = typer.Option(2, help="torch threads"),
        peers: str = typer.Option(None, help="python of the peers' virtualenv (make peers: "
                                             ".venv-peers-prompt/bin/python)"),
        peer_methods: str = typer.Option("llmlingua,longllmlingua,selective-context", help="peer methods to run"),
        peer_keep: str = typer.Option("0.5", help="comma-separated keep values for the peers"),
        clock: str = typer.Option("wall", help="wall (elapsed) or cpu (process CPU time; needs --threads 1)"),
        executor: str = o.executor, address: str = o.address, resume: bool = o.resume, smoke: bool = o.smoke,
    ) -> None:
        """Prompt compression on passcode retrieval with Gemma 3 270M: ratio, accuracy, end-to-end latency,
        break-even length (+ peers)."""
        from .args import parse_keeps, split_list
        from .kv.cli import parse_lengths

        lengths = parse_lengths(tokens, "--tokens")
        if smoke and out == "results/prompt":
            out = "results/prompt/smoke"
        run_prompt_bench(methods=split_list(methods), keeps=parse_keeps(keep), n_samples=n, target_tokens=lengths,
                         out=out, threads=threads, peers=peers,
                         peer_methods=split_list(peer_methods), peer_keeps=parse_keeps(peer_keep, "--peer-keep"),
                         smoke=smoke, executor=executor, address=address, resume=resume, clock=clock)
