"""`tokenreduce bench encoder`: token reduction inside a real text encoder (all-MiniLM-L6-v2).

For every (method, keep), in one process:

* **fidelity**: cosine between the reduced and the unreduced sentence embeddings (size-aware mean pooling,
  :func:`tokenreduce.adapters.encoder.mean_pool`, then L2-normalised, as sentence-transformers does), on the
  50 Lee documents and on Lee background documents cut to 128 and 512 tokens;
* **quality**: Spearman correlation between the pairwise cosine similarities of the 50 Lee documents and the
  mean human similarity judgements (Lee, Pincombe & Welsh 2005), unreduced model in the same table;
* **throughput**: sentences/s at 128 and 512 tokens (batch 32, every sequence full length), interleaved
  round-robin with the unreduced model (``bench.timing.interleaved``, one group per method and length),
  speedup = median of per-round ratios.
"""

from __future__ import annotations

import copy
import functools
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

__all__ = ["SMOKE", "EncoderBenchConfig", "EncoderContext", "encoder_sweep", "load_encoder_context", "register_cli",
           "run_encoder_bench", "run_encoder_cell"]

DEFAULT_METHODS = ("tome", "evit", "pool", "random")
DEFAULT_KEEPS = (0.75, 0.5, 0.25)


@dataclass
class EncoderBenchConfig:
    methods: Sequence[str] = DEFAULT_METHODS
    keeps: Sequence[float] = DEFAULT_KEEPS
    time_keeps: Sequence[float] = (0.5,)
    lengths: Sequence[int] = (128, 512)
    batch: int = 32
    n_fidelity: int = 64
    warmup: int = 1
    repeats: int = 5
    threads: int = 2
    out: str = "results/encoder"
    parts: str = "all"
    device: str = "cpu"
    smoke: bool = False


@torch.inference_mode()
def _embed(model: Any, tok: Any, texts: Sequence[str], max_length: int, handle: Any = None,
           batch: int = 32) -> torch.Tensor:
    from ..adapters.encoder import mean_pool

    out = []
    device = next(model.parameters()).device
    for i in range(0, len(texts), batch):
        enc = tok(list(texts[i: i + batch]), padding=True, truncation=True, max_length=max_length,
                  return_tensors="pt").to(device)
        h = model(**enc).last_hidden_state
        out.append(F.normalize(mean_pool(handle, h, enc["attention_mask"]), dim=-1).cpu())
    return torch.cat(out)


def _forward(model: Any, enc: Any) -> Any:
    return model(**enc)


def _spearman(emb: torch.Tensor, human: Any) -> float:
    import numpy as np
    from scipy.stats import spearmanr

    sim = (emb @ emb.T).numpy()
    iu = np.triu_indices(len(sim), k=1)
    return float(spearmanr(sim[iu], np.asarray(human)[iu]).statistic)


#: ``--smoke``: a tiny random-weight BERT over all-MiniLM-L6-v2's tokenizer, 3 methods, lengths 32 and 64
SMOKE = {"methods": ("tome", "pool", "random"), "keeps": (0.6,), "time_keeps": (0.6,), "lengths": (32, 64),
         "batch": 4, "n_fidelity": 4, "repeats": 2, "warmup": 0, "threads": 1}


@dataclass
class EncoderContext:
    """What every cell shares in a worker: the encoder, its tokenizer, the Lee documents and human judgements,
    the long documents, and (on first use) the unreduced embeddings."""

    model: Any
    tok: Any
    batch: int
    n_fidelity: int
    lengths: Sequence[int]
    device: str = "cpu"

    def __post_init__(self) -> None:
        from ..data.text import lee_documents, lee_similarity_matrix, lee_test_documents

        self.lee, self.human = list(lee_test_documents()), lee_similarity_matrix()
        # long real documents: consecutive background documents joined, so every text fills 512 tokens
        bg = list(lee_documents())
        n = max(self.batch, self.n_fidelity)
        self.long_texts = [" ".join(bg[i: i + 6]) for i in range(0, 6 * n, 6)][:n]
        self._refs: tuple[torch.Tensor, dict[int, torch.Tensor]] | None = None

    @property
    def refs(self) -> tuple[torch.Tensor, dict[int, torch.Tensor]]:
        """The unreduced embeddings of the Lee documents and of the long documents at each length."""
        if self._refs is None:
            self._refs = (_embed(self.model, self.tok, self.lee, 512),
                          {L: _embed(self.model, self.tok, self.long_texts[: self.n_fidelity], L) for L in self.lengths})
        return self._refs

    def encoded(self, length: int) -> Any:
        return self.tok(self.long_texts[: self.batch], padding="max_length", truncation=True, max_length=length,
                        return_tensors="pt").to(self.device)


def load_encoder_context(name: str, batch: int, n_fidelity: int, lengths: Sequence[int], device: str = "cpu",
                         model: Any = None, tokenizer: Any = None) -> EncoderContext:
    """all-MiniLM-L6-v2 (``name`` "all-MiniLM-L6-v2"), the smoke encoder (``"smoke"``) or the given one."""
    from .smoke import SMOKE_MODEL, smoke_encoder

    if model is None:
        if name == SMOKE_MODEL:
            model, tokenizer = smoke_encoder()
        else:
            from ..adapters.minilm import load_minilm

            model, tokenizer = load_minilm()
    return EncoderContext(model.eval().to(device), tokenizer, batch, n_fidelity, list(lengths), device)


def _quality(ctx: EncoderContext, method: str, keep: float) -> dict[str, Any]:
    import tokenreduce as tr

    ref_lee, refs = ctx.refs
    with tr.apply(ctx.model, method, keep=keep) as h:
        e = _embed(ctx.model, ctx.tok, ctx.lee, 512, h)
        row = {"method": method, "keep": keep, "spearman": _spearman(e, ctx.human),
               "cos_lee": float((e * ref_lee).sum(-1).mean())}
        for L in ctx.lengths:
            row[f"cos_{L}"] = float((_embed(ctx.model, ctx.tok, ctx.long_texts[: ctx.n_fidelity], L, h) * refs[L])
                                    .sum(-1).mean())
    return row


def _throughput(ctx: EncoderContext, method: str, rows: dict[float, dict[str, Any]], s: dict[str, Any]) -> None:
    """Per length, one interleaved group (the unreduced model and the method at each time keep); adds
    sentences/s and the paired speedup to the rows (to the unreduced row alone for ``method="none"``)."""
    import tokenreduce as tr

    from .timing import interleaved, speedup, timing_clock

    batch, clock = s["batch"], timing_clock("wall", s["device"])
    for L in s["lengths"]:
        enc = ctx.encoded(L)
        fns = {"none": functools.partial(_forward, ctx.model, enc)}
        copies = []
        for k in rows if method != "none" else ():
            mc = copy.deepcopy(ctx.model)
            copies.append(tr.apply(mc, method, keep=k))
            fns[f"{method}@{k}"] = functools.partial(_forward, mc, enc)
        with torch.inference_mode():
            t = interleaved(fns, warmup=s["warmup"], repeats=s["repeats"], rotate=True, clock=clock)
        for hk in copies:
            hk.remove()
        if method == "none":
            rows[1.0].update({f"sent_s_{L}": batch / t["none"].median, f"speedup_{L}": 1.0})
            continue
        for k, row in rows.items():
            sp = speedup(t["none"], t[f"{method}@{k}"], paired=True)
            row.update({f"sent_s_{L}": batch / t[f"{method}@{k}"].median, f"speedup_{L}": sp.ratio,
                        f"speedup_{L}_iqr": (sp.low, sp.high)})


def run_encoder_cell(ctx: EncoderContext, cell: Any) -> list[dict[str, Any]]:
    """The rows of one cell: the unreduced model's, or a method's at the cell's keeps (fidelity and Spearman;
    with ``cell.timing`` the throughput of its time keeps, interleaved with the unreduced model)."""
    from .sweep import budget_tuple, without_metadata
    from .timing import fixed_threads

    s = dict(cell.settings)
    with fixed_threads(s["threads"]):
        if cell.given:  # the timing part: the accuracy part's rows
            rows = without_metadata(list(cell.given))
        elif cell.method == "none":
            ref_lee, _ = ctx.refs
            rows = [{"method": "none", "keep": 1.0, "spearman": _spearman(ref_lee, ctx.human), "cos_lee": 1.0,
                     **{f"cos_{L}": 1.0 for L in ctx.lengths}}]
        else:
            rows = [_quality(ctx, cell.method, k) for k in budget_tuple(cell.keep)]
        if cell.timing:
            timed = {r["keep"]: r for r in rows if cell.method == "none" or r["keep"] in s["time_keeps"]}
            _throughput(ctx, cell.method, timed, s)
    return rows


def encoder_sweep(cfg: EncoderBenchConfig, model: Any = None, tokenizer: Any = None,
                  finished: Any = ()) -> Any:
    """The benchmark as a grid of cells, its loader and cell function."""
    from .smoke import cell_model
    from .sweep import CachedLoader, Sweep, method_cells

    name = cell_model(cfg.smoke, model is not None, lambda: "all-MiniLM-L6-v2")
    accuracy = {"lengths": list(cfg.lengths), "n_fidelity": cfg.n_fidelity, "threads": cfg.threads,
                "device": cfg.device}
    timing = {"time_keeps": list(cfg.time_keeps), "batch": cfg.batch, "warmup": cfg.warmup, "repeats": cfg.repeats}
    cells = method_cells("encoder", name, cfg.methods, lambda m: cfg.keeps, cfg.parts, accuracy, timing, {},
                         finished, time_base=True)
    load = CachedLoader(functools.partial(load_encoder_context, batch=cfg.batch, n_fidelity=cfg.n_fidelity,
                                          lengths=cfg.lengths, device=cfg.device, model=model, tokenizer=tokenizer))
    return Sweep("encoder", cells, load, run_encoder_cell, cpus_per_cell=cfg.threads,
                 gpus_per_cell=1.0 if cfg.device == "cuda" else 0.0)


def run_encoder_bench(methods: Sequence[str] = DEFAULT_METHODS, keeps: Sequence[float] = DEFAULT_KEEPS,
                      time_keeps: Sequence[float] = (0.5,), lengths: Sequence[int] = (128, 512), batch: int = 32,
                      n_fidelity: int = 64, repeats: int = 5, warmup: int = 1, threads: int = 2,
                      out: str = "results/encoder", model: Any = None, tokenizer: Any = None,
                      progress: bool = True, parts: str = "all", device: str = "cpu", smoke: bool = False,
                      executor: str = "local", address: str | None = None, resume: bool = True) -> list[dict[str, Any]]:
    """Run the encoder benchmark; returns the rows (also in ``out/results.jsonl``). One cell per method holds
    its fidelity rows and, per length, one throughput group interleaving the unreduced model with the
    method's ``time_keeps`` (a subset of ``keeps``); ``parts``, ``device``, ``smoke``, ``executor``,
    ``address``, ``resume`` as in ``bench vit`` (docs/sweeps.md)."""
    from .args import check_choice, check_device, check_methods, parse_keeps
    from .report import format_table, html_report
    from .sweep import PARTS, finished_cells, run_sweep, without_metadata

    if smoke:
        methods, keeps, time_keeps, lengths, batch, n_fidelity, repeats, warmup, threads = (SMOKE[k] for k in (
            "methods", "keeps", "time_keeps", "lengths", "batch", "n_fidelity", "repeats", "warmup", "threads"))
    check_methods(methods, "encoder-layers")  # every check before anything is loaded or written
    keeps, time_keeps = parse_keeps(keeps, "keeps"), parse_keeps(time_keeps, "time_keeps")
    if set(time_keeps) - set(keeps):
        raise ValueError(f"time_keeps {sorted(set(time_keeps) - set(keeps))} are not among the keeps {keeps}: a timed "
                         "keep is a row of the table")
    check_choice(parts, PARTS, "parts")
    check_device(device)
    cfg = EncoderBenchConfig(methods=list(methods), keeps=list(keeps), time_keeps=list(time_keeps),
                             lengths=list(lengths), batch=batch, n_fidelity=n_fidelity, warmup=warmup, repeats=repeats,
                             threads=threads, out=out, parts=parts, device=device, smoke=smoke)
    outdir = Path(out)
    results = outdir / "results.jsonl"
    sweep = encoder_sweep(cfg, model, tokenizer, finished_cells(results) if parts == "timing" else ())
    if parts == "timing" and len(sweep.cells) == 1:
        raise FileNotFoundError(f"parts='timing' needs the rows of an accuracy run in {results}; run "
                                "parts='accuracy' first")
    sweep.meta = {"bench": "encoder", "config": asdict(cfg)}
    rows = without_metadata(run_sweep(sweep, results, executor=executor, address=address,
                                      resume=resume and parts != "timing", progress=progress).rows)
    cols = ["method", "keep", "cos_lee", *[f"cos_{L}" for L in cfg.lengths], "spearman",
            *[c for L in cfg.lengths for c in (f"sent_s_{L}", f"speedup_{L}")]]
    table = format_table(rows, cols, title=f"all-MiniLM-L6-v2: fidelity, Spearman vs human (Lee 50), sentences/s "
                                           f"(batch {batch}, {threads} threads)")
    print(table)
    (outdir / "summary.txt").write_text(table + "\n")
    html_report("tokenreduce: text-encoder token reduction (all-MiniLM-L6-v2)", {"config": asdict(cfg)},
                [("results", [{c: r.get(c) for c in cols} for r in rows])], [], outdir / "report.html",
                notes="cos_*: mean cosine of reduced vs unreduced embeddings (Lee 50 docs at <=512 tokens; background "
                      "docs cut to 128/512 tokens); spearman: vs the Lee human similarity judgements; "
                      "sent_s: sentences/s, speedup: median per-round ratio vs unreduced, interleaved in one cell "
                      "per method (the unreduced row: timed alone).")
    return rows


def register_cli(bench_app: Any) -> None:
    import typer

    from .sweep.options import sweep_options

    o = sweep_options()

    @bench_app.command("encoder")
    def encoder(
        methods: str = typer.Option(",".join(DEFAULT_METHODS), help="comma-separated encoder methods"),
        keep: str = typer.Option(",".join(str(k) for k in DEFAULT_KEEPS), help="keeps for fidelity/Spearman"),
        time_keep: str = typer.Option("0.5", help="keeps for the throughput measurement"),
        repeats: int = typer.Option(5, help="timed rounds (interleaved)"),
        n_fidelity: int = typer.Option(64, help="documents for the 128/512-token fidelity"),
        threads: int = typer.Option(2, help="torch threads"),
        out: str = typer.Option("results/encoder", help="output directory"),
        parts: str = typer.Option("all", help="all | accuracy (fidelity only: cells run in parallel) | timing "
                                              "(throughput for the accuracy rows in --out)"),
        executor: str = o.executor, address: str = o.address, resume: bool = o.resume, smoke: bool = o.smoke,
        device: str = o.device,
    ) -> None:
        """all-MiniLM-L6-v2 with token reduction: cosine fidelity, Spearman vs human judgements, sentences/s."""
        from .args import parse_keeps, split_list

        if smoke and out == "results/encoder":
            out = "results/encoder/smoke"
        run_encoder_bench(methods=split_list(methods), keeps=parse_keeps(keep), time_keeps=parse_keeps(time_keep, "--time-keep"),
                          repeats=repeats, n_fidelity=n_fidelity, threads=threads, out=out, parts=parts, device=device,
                          smoke=smoke, executor=executor, address=address, resume=resume)
