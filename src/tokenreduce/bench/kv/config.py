"""What `bench kv` runs: the passcode variants, the perplexity and timing candidates, the configurations shared
with kvpress, and the run configuration (:class:`KVBenchConfig`)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

__all__ = [
    "AGREEMENT_CONFIGS",
    "DEFAULT_VARIANTS",
    "PARTS",
    "PPL_VARIANTS",
    "TIMING_CANDIDATES",
    "VARIANTS",
    "KVBenchConfig",
]

# label -> (registered method, keyword arguments); the settings that work best are the methods' presets
# (documented in their docstrings: `tokenreduce list snapkv`), e.g. "question-max9" = the question as SnapKV's window,
# max pooling over 9 tokens
VARIANTS: dict[str, tuple[str, dict[str, Any]]] = {
    "streaming-llm": ("streaming-llm", {}),
    "h2o": ("h2o", {}),
    "tova": ("tova", {}),
    "snapkv": ("snapkv", {}),  # paper defaults: window 32, avgpool kernel 5
    "snapkv-q": ("snapkv", {"preset": "question"}),
    "snapkv-q-max9": ("snapkv", {"preset": "question-max9"}),
    "pyramidkv-q": ("pyramidkv", {"preset": "question"}),
    "knorm": ("knorm", {}),
    "random": ("random", {}),
    "tokenselect": ("tokenselect", {"preset": "short"}),  # 4/16: the paper's 128/512 would crowd 1k-token budgets
    "gemfilter": ("gemfilter", {}),  # paper: last query, avgpool 5 (+ the question kept, as every variant here)
    "gemfilter-q-max9": ("gemfilter", {"preset": "question-max9"}),
    # diagnostics (not run by default): StreamingLLM on Gemma's global layers only, sliding layers untouched
    # (what kvpress's default does), to separate the method from the cost of shrinking the sliding windows
    "streaming-llm-global": ("streaming-llm", {"layers": "global"}),
}
DEFAULT_VARIANTS = tuple(v for v in VARIANTS if v != "streaming-llm-global")
PPL_VARIANTS: dict[str, tuple[str | None, dict[str, Any]]] = {
    "full cache": (None, {}),
    "window (no sinks)": ("streaming-llm", {"sinks": 0}),
    "streaming-llm": ("streaming-llm", {"sinks": 4}),
    "h2o": ("h2o", {}),
    "tova": ("tova", {}),
}
# label -> (method or None, keep, generate() prefill chunk or None, kwargs)
TIMING_CANDIDATES: dict[str, tuple[str | None, float | None, int | None, dict[str, Any]]] = {
    "none": (None, None, None, {}),
    "none + chunked prefill": (None, None, 512, {}),
    "snapkv-q-max9@0.25": ("snapkv", 0.25, None, {"preset": "question-max9"}),
    "knorm@0.25": ("knorm", 0.25, None, {}),
    # compressed once after the whole prompt, like kvpress's StreamingLLMPress / TOVAPress (same-rounds table)
    "streaming-llm@0.25": ("streaming-llm", 0.25, None, {}),
    "tova@0.25": ("tova", 0.25, None, {}),
    "streaming-llm@0.25 + chunked": ("streaming-llm", 0.25, 512, {}),
    "tova@0.25 + chunked": ("tova", 0.25, 512, {}),
    "h2o@0.25 + chunked": ("h2o", 0.25, 512, {}),
    "pyramidkv-q@0.25": ("pyramidkv", 0.25, None, {"preset": "question"}),
    "tokenselect@0.25": ("tokenselect", 0.25, None, {"preset": "short"}),
    "random@0.25": ("random", 0.25, None, {}),
    "gemfilter-q-max9@0.25": ("gemfilter", 0.25, None, {"preset": "question-max9"}),
    "gemfilter-q-max9@0.25 + chunked": ("gemfilter", 0.25, 512, {"preset": "question-max9"}),
}
# configurations ours and kvpress share exactly (context compressed alone, no question, floor budgets)
AGREEMENT_CONFIGS: dict[str, dict[str, Any]] = {
    "snapkv": {"ours": ("snapkv", {"window_size": 64, "kernel_size": 5}), "kvpress": ("SnapKVPress",
                                                                                      {"window_size": 64,
                                                                                       "kernel_size": 5})},
    "knorm": {"ours": ("knorm", {}), "kvpress": ("KnormPress", {})},
    "streaming-llm": {"ours": ("streaming-llm", {"sinks": 4}), "kvpress": ("StreamingLLMPress", {"n_sink": 4})},
    "tova": {"ours": ("tova", {}), "kvpress": ("TOVAPress", {})},
}
PARTS = ("passcode", "ppl", "timing", "memory", "agreement", "export")


@dataclass
class KVBenchConfig:
    """One `bench kv` run: which parts, variants, budgets, lengths, clocks and where to write (``out``)."""

    parts: Sequence[str] = ("passcode", "ppl", "timing")
    variants: Sequence[str] = DEFAULT_VARIANTS
    keeps: Sequence[float] = (0.5, 0.25, 0.1)
    lengths: Sequence[int] = (1100,)
    n_prompts: int = 8
    max_new_tokens: int = 7
    ppl_tokens: int = 1536
    ppl_budget: int = 256  # a cache capacity: tr.Keep(count=ppl_budget) entries per layer
    ppl_segment: int = 128
    ppl_streams: int = 2
    ppl_chunk: int = 8
    timing_lengths: Sequence[int] = (1024, 4096)
    timing_new_tokens: int = 32
    timing_candidates: Sequence[str] = tuple(TIMING_CANDIDATES)
    timing_memory: bool = True  # peak memory inside the timing part (else: the separate "memory" part)
    timing_kvpress: Sequence[str] = ()  # kvpress presses timed in the same rounds ("SnapKVPress@0.25[/global]")
    timing_prompts: str | None = None  # JSON with "timing" prompts (export part): venvs without the text data
    timing_label: str = "main"  # names a timing run (the report shows one table per label, e.g. "kvpress venv")
    kvpress_python: str | None = None  # kvpress's venv python: the timing part runs there (ours + kvpress, .venv)
    clock: str = "wall"  # "cpu": process CPU time (one thread), immune to time slices lost on a shared machine
    repeats: int = 3
    agreement_keeps: Sequence[float] = (0.5, 0.25)
    threads: int | None = 2
    dtype: str = "fp32"
    attn: str = "sdpa"
    out: str = "results/kv"
    seed: int = 0
    baseline: bool = True  # run the unreduced model in the passcode part (skip when merging runs)
    replay: bool = True  # one prompt forward per prompt, replayed for every method (adapters.llm.replay_prefill)
    check_replay: int = 1  # prompts on which every cell is also run through generate() to check the replay
    prompt_range: tuple[int, int] | None = None  # run only prompts [a, b) of the n (the report merges samples)

