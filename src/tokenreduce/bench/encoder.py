"""`tokenreduce bench encoder`: token reduction inside a real text encoder (all-MiniLM-L6-v2).

For every (method, keep), in one process:

* **fidelity**: cosine between the reduced and the unreduced sentence embeddings (size-aware mean pooling,
  :func:`tokenreduce.adapters.encoder.mean_pool`, then L2-normalised, as sentence-transformers does), on the
  50 Lee documents and on Lee background documents cut to 128 and 512 tokens;
* **quality**: Spearman correlation between the pairwise cosine similarities of the 50 Lee documents and the
  mean human similarity judgements (Lee, Pincombe & Welsh 2005), unreduced model in the same table;
* **throughput**: sentences/s at 128 and 512 tokens (batch 32, every sequence full length), interleaved
  round-robin with the unreduced model (``bench.timing.interleaved``), speedup = median of per-round ratios.
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

__all__ = ["EncoderBenchConfig", "register_cli", "run_encoder_bench"]

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


@torch.inference_mode()
def _embed(model: Any, tok: Any, texts: Sequence[str], max_length: int, handle: Any = None,
           batch: int = 32) -> torch.Tensor:
    from ..adapters.encoder import mean_pool

    out = []
    for i in range(0, len(texts), batch):
        enc = tok(list(texts[i: i + batch]), padding=True, truncation=True, max_length=max_length, return_tensors="pt")
        h = model(**enc).last_hidden_state
        out.append(F.normalize(mean_pool(handle, h, enc["attention_mask"]), dim=-1))
    return torch.cat(out)


def _forward(model: Any, enc: Any) -> Any:
    return model(**enc)


def _spearman(emb: torch.Tensor, human: Any) -> float:
    import numpy as np
    from scipy.stats import spearmanr

    sim = (emb @ emb.T).numpy()
    iu = np.triu_indices(len(sim), k=1)
    return float(spearmanr(sim[iu], np.asarray(human)[iu]).statistic)


def run_encoder_bench(methods: Sequence[str] = DEFAULT_METHODS, keeps: Sequence[float] = DEFAULT_KEEPS,
                      time_keeps: Sequence[float] = (0.5,), lengths: Sequence[int] = (128, 512), batch: int = 32,
                      n_fidelity: int = 64, repeats: int = 5, warmup: int = 1, threads: int = 2,
                      out: str = "results/encoder", model: Any = None, tokenizer: Any = None,
                      progress: bool = True) -> list[dict[str, Any]]:
    """Run the encoder benchmark; returns the rows (also in ``out/results.jsonl``)."""
    import sys

    import tokenreduce as tr

    from ..adapters.minilm import load_minilm
    from ..data.text import lee_documents, lee_similarity_matrix, lee_test_documents
    from .args import check_methods, parse_keeps
    from .report import format_table, html_report
    from .results import ResultWriter
    from .timing import fixed_threads, interleaved, speedup

    check_methods(methods, "encoder-layers")  # every check before anything is loaded or written
    keeps, time_keeps = parse_keeps(keeps, "keeps"), parse_keeps(time_keeps, "time_keeps")
    cfg = EncoderBenchConfig(methods=list(methods), keeps=list(keeps), time_keeps=list(time_keeps),
                             lengths=list(lengths), batch=batch, n_fidelity=n_fidelity, warmup=warmup, repeats=repeats,
                             threads=threads, out=out)
    if model is None:
        model, tokenizer = load_minilm()
    tok = tokenizer
    log = (lambda *a: print(*a, file=sys.stderr, flush=True)) if progress else (lambda *a: None)
    outdir = Path(out)
    outdir.mkdir(parents=True, exist_ok=True)
    lee, human = list(lee_test_documents()), lee_similarity_matrix()
    # long real documents: consecutive background documents joined, so every text fills 512 tokens
    bg = list(lee_documents())
    long_texts = [" ".join(bg[i: i + 6]) for i in range(0, 6 * max(batch, n_fidelity), 6)][: max(batch, n_fidelity)]
    rows: list[dict[str, Any]] = []
    with fixed_threads(threads), ResultWriter(outdir / "results.jsonl",
                                              extra_meta={"bench": "encoder", "config": asdict(cfg)}) as writer:
        ref_lee = _embed(model, tok, lee, 512)
        refs = {L: _embed(model, tok, long_texts[:n_fidelity], L) for L in cfg.lengths}
        base = {"method": "none", "keep": 1.0, "spearman": _spearman(ref_lee, human), "cos_lee": 1.0,
                **{f"cos_{L}": 1.0 for L in cfg.lengths}}
        log(f"unreduced: spearman={base['spearman']:.4f}")
        quality: dict[tuple[str, float], dict[str, Any]] = {}
        for m in cfg.methods:
            for k in cfg.keeps:
                with tr.apply(model, m, keep=k) as h:
                    e = _embed(model, tok, lee, 512, h)
                    row = {"method": m, "keep": k, "spearman": _spearman(e, human),
                           "cos_lee": float((e * ref_lee).sum(-1).mean())}
                    for L in cfg.lengths:
                        row[f"cos_{L}"] = float((_embed(model, tok, long_texts[:n_fidelity], L, h) * refs[L]).sum(-1)
                                                .mean())
                quality[(m, k)] = row
                log(f"{m}@{k}: " + ", ".join(f"{a}={b:.4f}" for a, b in row.items() if isinstance(b, float)))
        # throughput: one interleaved group per length
        for L in cfg.lengths:
            enc = tok(long_texts[:batch], padding="max_length", truncation=True, max_length=L, return_tensors="pt")
            fns = {"none": functools.partial(_forward, model, enc)}
            copies = []
            for m in cfg.methods:
                for k in cfg.time_keeps:
                    mc = copy.deepcopy(model)
                    copies.append(tr.apply(mc, m, keep=k))
                    fns[f"{m}@{k}"] = functools.partial(_forward, mc, enc)
            with torch.inference_mode():
                t = interleaved(fns, warmup=cfg.warmup, repeats=cfg.repeats, rotate=True)
            for hk in copies:
                hk.remove()
            base[f"sent_s_{L}"] = batch / t["none"].median
            base[f"speedup_{L}"] = 1.0
            for m in cfg.methods:
                for k in cfg.time_keeps:
                    sp = speedup(t["none"], t[f"{m}@{k}"], paired=True)
                    quality[(m, k)][f"sent_s_{L}"] = batch / t[f"{m}@{k}"].median
                    quality[(m, k)][f"speedup_{L}"] = sp.ratio
                    quality[(m, k)][f"speedup_{L}_iqr"] = (sp.low, sp.high)
            log(f"L={L}: " + ", ".join(f"{n}={batch / tt.median:.1f}/s" for n, tt in t.items()))
        rows = [base] + [quality[(m, k)] for m in cfg.methods for k in cfg.keeps]
        for r in rows:
            writer.write(r)
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
                      "sent_s: sentences/s, speedup: median per-round ratio vs unreduced, interleaved in one run.")
    return rows


def register_cli(bench_app: Any) -> None:
    import typer

    @bench_app.command("encoder")
    def encoder(
        methods: str = typer.Option(",".join(DEFAULT_METHODS), help="comma-separated encoder methods"),
        keep: str = typer.Option(",".join(str(k) for k in DEFAULT_KEEPS), help="keeps for fidelity/Spearman"),
        time_keep: str = typer.Option("0.5", help="keeps for the throughput measurement"),
        repeats: int = typer.Option(5, help="timed rounds (interleaved)"),
        n_fidelity: int = typer.Option(64, help="documents for the 128/512-token fidelity"),
        threads: int = typer.Option(2, help="torch threads"),
        out: str = typer.Option("results/encoder", help="output directory"),
    ) -> None:
        """all-MiniLM-L6-v2 with token reduction: cosine fidelity, Spearman vs human judgements, sentences/s."""
        from .args import parse_keeps, split_list

        run_encoder_bench(methods=split_list(methods), keeps=parse_keeps(keep), time_keeps=parse_keeps(time_keep, "--time-keep"),
                          repeats=repeats, n_fidelity=n_fidelity, threads=threads, out=out)
