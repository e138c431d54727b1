"""Model-agnostic benchmark harness: timing, analytic FLOPs, peak memory, metadata,
JSON-lines results and reports (tables, Pareto plots, self-contained HTML).

Measurement rules: compare timings only within one run against the unreduced
model, run candidates interleaved (:func:`interleaved`) with warm-up and repeats,
report median and spread, and keep the unreduced model and the zero-overhead
limit (:func:`flops_speedup`) in every timing table.
"""

from __future__ import annotations

from ..accounting.flops import BLOCK_PARTS, ViTDims, block_flops, flops_speedup, hf_vit_dims, timm_vit_dims, vit_flops
from ..accounting.memory import MemoryTracker, peak_memory
from .meta import environment
from .report import BASELINE_NAMES, format_table, format_value, html_report, pareto_front, pareto_plot
from .results import ResultWriter, read_results, read_runs, to_jsonable
from .timing import Speedup, Timing, fixed_threads, interleaved, measure, quantile, speedup

__all__ = [
    "BASELINE_NAMES",
    "BLOCK_PARTS",
    "MemoryTracker",
    "ResultWriter",
    "Speedup",
    "Timing",
    "ViTDims",
    "block_flops",
    "environment",
    "fixed_threads",
    "flops_speedup",
    "format_table",
    "format_value",
    "hf_vit_dims",
    "html_report",
    "interleaved",
    "measure",
    "pareto_front",
    "pareto_plot",
    "peak_memory",
    "quantile",
    "read_results",
    "read_runs",
    "speedup",
    "timm_vit_dims",
    "to_jsonable",
    "vit_flops",
]
