"""``tokenreduce bench kv`` (registered by ``tokenreduce/cli.py``; ``python -m tokenreduce.bench.kv`` runs it
alone, for venvs without the other benchmarks' dependencies)."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

from ..args import parse_keeps
from ..args import split_list as _split
from .config import DEFAULT_VARIANTS, PARTS, TIMING_CANDIDATES, VARIANTS, KVBenchConfig
from .report import build_report
from .run import run_kv_bench
from .runs import merge_results
from .sweep import SMOKE

__all__ = ["parse_lengths", "register_cli"]


def parse_lengths(s: str, option: str) -> list[int]:
    """Comma-separated token counts (``--lengths 1024,4096``; also ``bench prompt --tokens``)."""
    try:
        return [int(x) for x in _split(s)]
    except ValueError:
        raise ValueError(f"{option}: {s!r} must be comma-separated whole numbers of tokens, e.g. 1024,4096") from None


def register_cli(bench_app: Any) -> None:
    """Add the ``kv`` command to ``bench_app`` (a typer app)."""
    import typer

    from ..sweep.options import sweep_options

    o = sweep_options()

    @bench_app.command("kv")
    def kv(
        parts: str = typer.Option("passcode,ppl,timing", help=", ".join(PARTS)),
        variants: str = typer.Option(",".join(DEFAULT_VARIANTS), help=f"passcode variants, of: {', '.join(VARIANTS)} "
                                     "(see bench/kv/config.py VARIANTS)"),
        keeps: str = typer.Option("0.5,0.25,0.1", help="keep values (keep=1 is the unreduced baseline)"),
        baseline: bool = typer.Option(True, help="also run the unreduced model on the passcode prompts"),
        replay: bool = typer.Option(True, help="capture each prompt's forward once and replay it per method"),
        check_replay: int = typer.Option(1, help="prompts on which each cell is re-run with generate() as a check"),
        prompt_range: str = typer.Option("", help="a:b = only passcode prompts a..b-1 of the n (parallel runs)"),
        lengths: str = typer.Option("1100", help="passcode context lengths in tokens"),
        n_prompts: int = typer.Option(8, help="passcode prompts per length"),
        ppl_tokens: int = typer.Option(1536, help="tokens streamed for perplexity"),
        ppl_budget: int = typer.Option(256, help="cache entries per layer for the streaming perplexity"),
        ppl_streams: int = typer.Option(2, help="independent texts streamed as one batch"),
        ppl_chunk: int = typer.Option(8, help="tokens per forward while streaming (1 = token by token)"),
        timing_lengths: str = typer.Option("1024,4096", help="prompt lengths for timing"),
        timing_new_tokens: int = typer.Option(32, help="decoded tokens in the timed generate()"),
        timing_candidates: str = typer.Option(",".join(TIMING_CANDIDATES), help="timed candidates ('none' first)"),
        timing_memory: bool = typer.Option(True, help="peak memory inside the timing part (else: part 'memory')"),
        timing_kvpress: str = typer.Option("", help="kvpress presses timed in the same rounds, e.g. "
                                           "SnapKVPress@0.25,StreamingLLMPress@0.25/global,none (needs kvpress)"),
        timing_prompts: str = typer.Option("", help="timing prompts from this JSON (written by --parts export)"),
        kvpress_python: str = typer.Option("", help="kvpress's venv python (make peers: .venv-kvpress/bin/python): "
                                           "the timing part runs there, ours and --timing-kvpress in the same rounds"),
        timing_label: str = typer.Option("main", help="name of this timing run (one report table per name)"),
        clock: str = typer.Option("wall", help="wall (elapsed) or cpu (process CPU time; needs --threads 1)"),
        repeats: int = typer.Option(3, help="timed rounds (interleaved)"),
        threads: int = typer.Option(2, help="torch threads"),
        dtype: str = typer.Option("fp32", help="fp32 or bf16"),
        attn: str = typer.Option("sdpa", help="sdpa or eager"),
        out: str = typer.Option("results/kv", help="output directory"),
        quick: bool = typer.Option(False, help="a smoke run: 2 prompts, keep 0.25, short ppl/timing"),
        report_only: bool = typer.Option(False, help="only rebuild the report from <out>/kv.jsonl"),
        merge: str = typer.Option("", help="append the runs of these results files (comma-separated; "
                                           "path@part1+part2 keeps only those parts) to <out>/kv.jsonl first"),
        merge_kvpress: str = typer.Option("", help="the same for <out>/kvpress.jsonl (kvpress_compare.py's files)"),
        executor: str = o.executor, address: str = o.address, resume: bool = o.resume, smoke: bool = o.smoke,
    ) -> None:
        """KV-cache methods on Gemma 3 270M: passcode retrieval, streaming perplexity, timings (+ kvpress)."""
        for srcs, name in ((merge, "kv.jsonl"), (merge_kvpress, "kvpress.jsonl")):
            if srcs:
                n = merge_results(_split(srcs), Path(out) / name)
                print(f"merged {n['runs']} runs ({n['rows']} rows) into {Path(out) / name}")
        if report_only:
            print(build_report(out))
            return
        cfg = KVBenchConfig(parts=_split(parts), variants=_split(variants), keeps=parse_keeps(keeps, "--keeps"),
                            lengths=parse_lengths(lengths, "--lengths"), n_prompts=n_prompts, ppl_tokens=ppl_tokens,
                            ppl_budget=ppl_budget, ppl_streams=ppl_streams, ppl_chunk=ppl_chunk,
                            timing_lengths=parse_lengths(timing_lengths, "--timing-lengths"),
                            timing_new_tokens=timing_new_tokens, timing_candidates=_split(timing_candidates),
                            timing_memory=timing_memory, timing_kvpress=_split(timing_kvpress),
                            timing_prompts=timing_prompts or None, kvpress_python=kvpress_python or None,
                            clock=clock,
                            timing_label=timing_label,
                            repeats=repeats, threads=threads, dtype=dtype,
                            attn=attn, out=out, baseline=baseline, replay=replay, check_replay=check_replay,
                            prompt_range=tuple(int(x) for x in prompt_range.split(":")) if prompt_range else None)
        if quick:
            cfg.n_prompts, cfg.keeps, cfg.ppl_tokens, cfg.ppl_budget = 2, [0.25], 256, 64
            cfg.timing_lengths, cfg.repeats, cfg.timing_new_tokens = [512], 1, 8
        if smoke:
            cfg = dataclasses.replace(cfg, **SMOKE, out=out if out != "results/kv" else "results/kv/smoke")
        path = run_kv_bench(cfg, smoke=smoke, executor=executor, address=address, resume=resume)
        print((Path(cfg.out) / "report.txt").read_text())
        print(f"report: {path}")
