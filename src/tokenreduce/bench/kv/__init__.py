"""`tokenreduce bench kv`: KV-cache methods on the real Gemma 3 270M (CPU), in one process per part:

* **passcode** (:mod:`.passcode`) — retrieval of a 5-digit pass key hidden at several depths in real English
  filler (Lee corpus), contexts of ``--lengths`` tokens; the question is kept uncompressed (``question_len``);
  accuracy per method x keep with the *real* KV kept (bytes of the cache tensors right after the prompt / the
  unreduced cache's bytes) and the kept entries per layer;
* **ppl** (:mod:`.ppl`) — perplexity of real text streamed token by token past a fixed cache budget
  (StreamingLLM's experiment): the full cache, window attention (no sinks), StreamingLLM, H2O, TOVA;
* **timing** and **memory** (:mod:`.timing`) — prefill seconds, decode tokens/s, peak tensor memory and KV bytes
  against the unreduced model, interleaved in the same process (``--timing-lengths``), also with generate()'s
  chunked prefill (then the decoding methods evict between chunks, so prefill attention itself shrinks); every
  ratio is the median of the per-round paired ratios with quartiles and extremes; ``--clock cpu --threads 1``
  times process CPU seconds (robust on a shared machine; the 1-min load average is recorded);
  ``--timing-kvpress`` adds kvpress presses to the same rounds (run in kvpress's venv, prompts from
  ``--timing-prompts``, the export part's JSON);
* **kvpress** (:mod:`.kvpress`, :mod:`.agreement`) — side by side with NVIDIA kvpress 0.5.5 (its own venv;
  ``scripts/kvpress_compare.py`` reads the prompts this bench exports and writes ``kvpress.jsonl``):
  accuracies, timings, and agreement of the kept positions for identically configured methods (ours with
  ``rounding="floor"`` like kvpress's ``int(n k)``).

What runs is declared in :mod:`.config`, the prompts come from :mod:`.data`. Results: ``<out>/kv.jsonl`` (one
run per invocation, with metadata), ``<out>/*.png`` and ``<out>/report.html`` (:mod:`.report`). Parts run
separately (other venvs, prompt ranges, lengths) are combined with ``--merge a.jsonl,b.jsonl@part`` (appended to
``<out>/kv.jsonl``, :mod:`.runs`; the report keeps the latest run per configuration). The same-process kvpress
timing, with tokenreduce installed in kvpress's venv without its dependencies (``make peers`` builds that venv
as ``.venv-kvpress``), is one command with ``--kvpress-python .venv-kvpress/bin/python`` (:mod:`.venv`: it also
runs ``scripts/kvpress_compare.py`` there for the passcode/agreement parts; the README's "Peers" section has the
command), or by hand::

    tokenreduce bench kv --parts export,timing --timing-lengths 4096 --threads 1 --clock cpu --out results/kv/t
    .venv-kvpress/bin/python -m tokenreduce.bench.kv --parts timing \\
        --timing-prompts results/kv/t/kvpress_prompts.json --timing-lengths 4096 --threads 1 --clock cpu \\
        --timing-kvpress none,SnapKVPress@0.25,StreamingLLMPress@0.25 --timing-label "kvpress venv" --out results/kv/k
    tokenreduce bench kv --report-only --out results/kv --merge results/kv/t/kv.jsonl@timing,results/kv/k/kv.jsonl

At module level every module imports only the standard library, torch and tokenreduce's bench helpers;
transformers, kvpress, matplotlib, tqdm and typer are imported where they are used (the package is imported in
kvpress's venv, whose transformers is older: :mod:`.kvpress`).
"""

from __future__ import annotations

from .agreement import agreement_rows, run_agreement
from .cli import register_cli
from .config import AGREEMENT_CONFIGS, DEFAULT_VARIANTS, PPL_VARIANTS, TIMING_CANDIDATES, VARIANTS, KVBenchConfig
from .data import DEPTHS, export_for_kvpress, passcode_prompts, timing_prompt
from .kvpress import KVPRESS_MODES, kvpress_global_only, parse_kvpress_candidate
from .passcode import run_passcode
from .ppl import run_ppl
from .report import REPORT_NOTES, build_report
from .run import run_kv_bench
from .runs import latest_runs, merge_results
from .timing import run_memory, run_timing

__all__ = [
    "AGREEMENT_CONFIGS",
    "DEFAULT_VARIANTS",
    "DEPTHS",
    "KVPRESS_MODES",
    "PPL_VARIANTS",
    "REPORT_NOTES",
    "TIMING_CANDIDATES",
    "VARIANTS",
    "KVBenchConfig",
    "agreement_rows",
    "build_report",
    "export_for_kvpress",
    "kvpress_global_only",
    "latest_runs",
    "merge_results",
    "parse_kvpress_candidate",
    "passcode_prompts",
    "register_cli",
    "run_agreement",
    "run_kv_bench",
    "run_memory",
    "run_passcode",
    "run_ppl",
    "run_timing",
    "timing_prompt",
]
