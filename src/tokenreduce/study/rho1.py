"""The ``rho1`` study: does selective language modelling (Rho-1; Lin et al., NeurIPS 2024) make continued training
on a mixed-quality stream better than training on every token?

**Setup.** The small LM of ``tokenreduce train lm`` (the base) is trained further on a stream of real Wikipedia
paragraphs it never saw (the corpus's ``stream`` split) mixed with junk we control -- by default 50% of the
stream's tokens: half shuffled-word copies of the split's paragraphs, half templated boilerplate (spam offers,
navigation bars, cookie banners, ids): :mod:`.rho1_run`. Two conditions, at equal optimiser steps and equal
tokens seen (the same batches, seed by seed): ``none``, the ordinary loss on every token, and ``rho1``,
:func:`tokenreduce.rho1_loss` at keep 0.6 (the paper keeps 60-70%) with a reference model = the base trained
further on the ``clean`` split. Three seeds each (the seed draws the junk and the batches; both conditions share
them). The base and the reference are evaluated too, for context (outside the hypotheses).

**Hypotheses** (stated before the run), after the paper's claims:

1. *clean perplexity*: rho1 reaches a lower perplexity on held-out clean text (the ``test`` split) than
   full-token training;
2. *downstream probe*: rho1 picks the right last word of held-out sentences more often (a 5-way cloze, the
   options drawn before any model runs, :func:`~.rho1_run.cloze_items`);
3. *stability*: rho1 does not destabilise training: its rate of gradient-norm spikes (a step's pre-clip norm above
   2x the median of the 20 steps before) is at most 2 points above full-token training's (non-inferiority).

**Test.** Items are held-out 128-token windows (NLL per token), cloze sentences (right/wrong) and, for stability,
(seed, step) pairs. Perplexity and cloze: each item's value averaged over the 3 seeds per condition, rho1 paired
with full-token training on the same items: paired-bootstrap 95% CI of the difference (10,000 resamples, seed 0)
and its two-sided bootstrap p; per part, *supported* when rho1 is significantly better (p < 0.05), else *not
supported*. Stability: *supported* (non-inferior) when the upper 95% bound of the paired-bootstrap difference of
the spike rates is below 0.02. The per-seed table shows whether each seed
agrees (3 seeds are too few for a CI over seeds; the seed spread is reported, not tested). No verdict with fewer
than 10 items (39 step pairs for the spike rate).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence
from dataclasses import asdict
from typing import Any, ClassVar

import numpy as np

from ..bench.sweep import CachedLoader, Cell, Sweep
from .analysis import BASELINE, Hypothesis, Metric, compare, decide
from .registry import Part, Study, StudyResult
from .rho1_run import Rho1Config, load_rho1_context, run_rho1_cell
from .stats import spike_flags

__all__ = ["STUDY", "Rho1Config", "Rho1Study"]

RHO1 = "rho1"
CONTEXT = ("base", "reference")


def _runs(rows: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    return [r for r in rows if r.get("part") == "run" and "loss" in r and not r.get("error")]


def _seed_mean(rows: Sequence[dict[str, Any]], part: str, field: str) -> list[dict[str, Any]]:
    """One row per (method, keep, item): ``field`` averaged over the seeds."""
    acc: dict[tuple[Any, ...], list[float]] = {}
    for r in rows:
        if r.get("part") == part and not r.get("error"):
            acc.setdefault((r["method"], r["keep"], r["item"]), []).append(float(r[field]))
    return [{"method": m, "keep": k, "item": i, field: float(np.mean(v)), "seeds": len(v)}
            for (m, k, i), v in acc.items()]


def _stability_items(runs: Sequence[dict[str, Any]], cfg: Rho1Config) -> list[dict[str, Any]]:
    out = []
    for r in runs:
        g = spike_flags(r["grad_norm"], cfg.spike_window, cfg.grad_spike)
        lo = spike_flags(r["loss_all"], cfg.spike_window, cfg.loss_spike)
        for j, (gs, ls) in enumerate(zip(g, lo)):
            out.append({"method": r["method"], "keep": r["keep"], "item": f"{r['seed']}:{j + cfg.spike_window}",
                        "grad_spike": gs, "loss_spike": ls})
    return out


def _mean(xs: Sequence[float]) -> float:
    return float(np.mean(xs)) if len(xs) else math.nan


def _per_seed(rows: Sequence[dict[str, Any]], cfg: Rho1Config) -> list[dict[str, Any]]:
    out = []
    for r in _runs(rows):
        m, s = r["method"], r["seed"]
        nll = [x["nll"] for x in rows if x.get("part") == "ppl" and x["method"] == m and x["seed"] == s]
        cz = [x["correct"] for x in rows if x.get("part") == "cloze" and x["method"] == m and x["seed"] == s]
        tail = max(1, len(r["loss"]) // 6)
        out.append({"method": m, "keep": r["keep"], "seed": s, "test_ppl": math.exp(_mean(nll)),
                    "cloze_acc": _mean(cz), "final_loss_all": _mean(r["loss_all"][-tail:]),
                    "final_loss_real": _mean(r["loss_real"][-tail:]), "final_loss_junk": _mean(r["loss_junk"][-tail:]),
                    "selected_junk": _mean(r["selected_junk"]),
                    "loss_spikes": sum(spike_flags(r["loss_all"], cfg.spike_window, cfg.loss_spike)),
                    "grad_spikes": sum(spike_flags(r["grad_norm"], cfg.spike_window, cfg.grad_spike)),
                    "max_grad_norm": max(r["grad_norm"]), "median_grad_norm": float(np.median(r["grad_norm"])),
                    "tokens_seen": r["tokens_seen"], "seconds": r["seconds"]})
    return out


def _across_seeds(rows: Sequence[dict[str, Any]], per_seed: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per condition: mean and standard deviation over seeds of the held-out perplexity and final loss, and the
    per-step standard deviation of the all-token training loss across seeds, averaged over steps."""
    out = []
    for m in dict.fromkeys(r["method"] for r in per_seed):
        ps = [r for r in per_seed if r["method"] == m]
        curves = np.array([r["loss_all"] for r in _runs(rows) if r["method"] == m])
        out.append({"method": m, "seeds": len(ps), "test_ppl_mean": _mean([r["test_ppl"] for r in ps]),
                    "test_ppl_sd": float(np.std([r["test_ppl"] for r in ps], ddof=1)) if len(ps) > 1 else math.nan,
                    "final_loss_sd": float(np.std([r["final_loss_all"] for r in ps], ddof=1)) if len(ps) > 1
                    else math.nan,
                    "loss_sd_across_seeds": float(curves.std(axis=0, ddof=1).mean()) if len(curves) > 1 else math.nan,
                    "loss_spikes": sum(r["loss_spikes"] for r in ps), "grad_spikes": sum(r["grad_spikes"] for r in ps),
                    "selected_junk": _mean([r["selected_junk"] for r in ps])})
    return out


def _seed_diffs(per_seed: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    base = {r["seed"]: r for r in per_seed if r["method"] == BASELINE}
    return [{"seed": r["seed"], "ppl_full": base[r["seed"]]["test_ppl"], "ppl_rho1": r["test_ppl"],
             "ppl_diff": r["test_ppl"] - base[r["seed"]]["test_ppl"],
             "cloze_diff": r["cloze_acc"] - base[r["seed"]]["cloze_acc"]}
            for r in per_seed if r["method"] == RHO1 and r["seed"] in base]


def _is_rho1(r: dict[str, Any]) -> bool:
    return r["method"] == RHO1


class Rho1Study(Study):
    __doc__ = __doc__
    name = "rho1"
    config = Rho1Config
    smoke: ClassVar[dict[str, Any]] = {"model": "tiny", "steps": 4, "batch_size": 2, "ref_steps": 2, "cloze_items": 4,
                                       "max_docs": 1, "max_windows": 6, "spike_window": 2}

    def missing_models(self, cfg: Rho1Config) -> list[str]:
        from ..models.lm import checkpoint_dir

        if cfg.model == "small_lm" and not (checkpoint_dir() / "model.pt").is_file():
            return ["the small LM is not cached: build it with `tokenreduce train lm`"]
        return []

    def sweep(self, cfg: Rho1Config, smoke: bool) -> Sweep:
        from ..core.budget import validate_fraction

        validate_fraction(cfg.keep)
        settings = {"config": {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(cfg).items()
                               if k != "seeds"}}
        cells = [Cell("study/rho1", cfg.model, m, 1.0, settings) for m in CONTEXT]
        cells += [Cell("study/rho1", cfg.model, m, k, settings, seed=s)
                  for s in cfg.seeds for m, k in ((BASELINE, 1.0), (RHO1, cfg.keep))]
        load = CachedLoader(functools.partial(load_rho1_context, settings["config"]))
        return Sweep("study/rho1", cells, load, run_rho1_cell, meta={"bench": "study/rho1", "study": self.name},
                     cpus_per_cell=float(cfg.threads))

    def analyse(self, rows: list[dict[str, Any]], cfg: Rho1Config) -> StudyResult:
        train = f"{cfg.steps} steps x {cfg.batch_size} windows of a stream with {cfg.junk_fraction:.0%} junk"
        ppl = Hypothesis(
            f"Rho-1 (keep {cfg.keep}, reference = base + {cfg.ref_steps} steps on the clean split) lowers held-out "
            f"clean-text perplexity against full-token continued training ({train}, {len(cfg.seeds)} seeds)",
            "per held-out 128-token window, NLL averaged over seeds; paired bootstrap 95% CI of the difference "
            "(rho1 - full) and its two-sided p; supported when significantly lower (p < 0.05)",
            Metric("nll", "mean", False, "held-out NLL"), treated=_is_rho1)
        cloze = Hypothesis(
            f"Rho-1 raises the accuracy of a {cfg.cloze_choices}-way last-word cloze on held-out sentences",
            "per sentence, right/wrong averaged over seeds; paired bootstrap 95% CI of the difference and its p",
            Metric("correct", "mean", True, "cloze accuracy"), treated=_is_rho1)
        stab = Hypothesis(
            f"Rho-1 does not destabilise training: its gradient-norm spike rate (pre-clip norm > {cfg.grad_spike}x "
            f"the median of the {cfg.spike_window} steps before) is at most {cfg.spike_margin} above full-token "
            f"training's",
            "per (seed, step), paired by seed and step; non-inferior when the upper 95% bound of the paired-bootstrap "
            "difference of the spike rate is below the margin",
            Metric("grad_spike", "proportion", False, "gradient-norm spike rate"), treated=_is_rho1,
            margin=cfg.spike_margin)
        t_ppl = compare(_seed_mean(rows, "ppl", "nll"), ppl.metric, seed=cfg.eval_seed)
        for r in t_ppl:
            r["ppl"] = math.exp(r["held-out NLL"])
            if "diff" in r:
                r.update(ppl_ratio=math.exp(r["diff"]), ratio_low=math.exp(r["diff_low"]),
                         ratio_high=math.exp(r["diff_high"]))
        t_cloze = compare(_seed_mean(rows, "cloze", "correct"), cloze.metric, seed=cfg.eval_seed)
        runs = _runs(rows)
        stab_items = _stability_items(runs, cfg)
        t_stab = compare(stab_items, stab.metric, seed=cfg.eval_seed)
        parts = [Part("clean perplexity", ppl, t_ppl, decide(t_ppl, ppl)),
                 Part("downstream probe (cloze)", cloze, t_cloze, decide(t_cloze, cloze)),
                 Part("stability", stab, t_stab, decide(t_stab, stab))]
        per_seed = _per_seed(rows, cfg)
        loss_spikes = compare(stab_items, Metric("loss_spike", "proportion", False, "loss spike rate"))
        caption_seed = ("per seed: held-out perplexity, cloze accuracy, final training losses (last sixth of the "
                        "steps; all / real / junk targets), share of junk among the back-propagated targets, spikes")
        caption_spikes = (f"loss spikes (all-token loss > {cfg.loss_spike}x the median of the {cfg.spike_window} "
                          f"steps before), per (seed, step)")
        tables = [(caption_seed, per_seed),
                  ("across seeds: spread of perplexity and loss, spike counts", _across_seeds(rows, per_seed)),
                  ("rho1 - full per seed (same batches)", _seed_diffs(per_seed)),
                  (caption_spikes, _short(loss_spikes))]
        notes = [(f"{len(cfg.seeds)} seeds; both conditions see the same {train} batches per seed; rho1 "
                  f"back-propagates {cfg.keep:.0%} of their tokens")]
        ref = [r for r in rows if r.get("part") == "run" and r.get("reference")]
        if ref:
            notes.append(f"reference: {ref[0]['reference']}")
        errors = [r for r in rows if r.get("error")]
        if errors:
            notes.append(f"{len(errors)} cell(s) failed, e.g. {errors[0]['method']}: {errors[0]['error']}")
        return StudyResult(parts, tables, notes)


def _short(table: list[dict[str, Any]]) -> list[dict[str, Any]]:
    keep = ("method", "keep", "n", "loss spike rate", "ci_low", "ci_high", "diff", "diff_low", "diff_high", "p")
    return [{k: r[k] for k in keep if k in r} for r in table]


STUDY = Rho1Study()
