"""Studies: does token reduction improve quality, not only cost? (issue 19, "Beyond efficiency").

Each study states a hypothesis and its test before it runs, runs on the sweep harness
(:mod:`tokenreduce.bench.sweep`: one cell per prompt/item group, resumable), pairs every condition with the
unreduced model on the same items (:mod:`.analysis`, :mod:`.stats`) and ends with one verdict line per part:
supported / not supported / mixed, with the effect size, or no verdict when n is too small for its CI.
``tokenreduce study <name> [--smoke]``; docs/studies.md has the measured verdicts.
"""

from __future__ import annotations

from .analysis import BASELINE, Hypothesis, Metric, Verdict, compare, decide
from .cli import register_cli
from .registry import PLANNED, STUDIES, Part, Study, StudyResult, get_study, parse_overrides
from .run import StudyRun, run_study
from .stats import bootstrap_ci, holm, mcnemar_exact, min_n_for_halfwidth, paired_bootstrap, spike_flags, wilson

__all__ = [
    "BASELINE",
    "PLANNED",
    "STUDIES",
    "Hypothesis",
    "Metric",
    "Part",
    "Study",
    "StudyResult",
    "StudyRun",
    "Verdict",
    "bootstrap_ci",
    "compare",
    "decide",
    "get_study",
    "holm",
    "mcnemar_exact",
    "min_n_for_halfwidth",
    "paired_bootstrap",
    "parse_overrides",
    "register_cli",
    "run_study",
    "spike_flags",
    "wilson",
]
