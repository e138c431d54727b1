"""The ``train-reduction`` study: does dropping tokens while training a ViT from scratch cost accuracy or
stability? (issue 20, part 2; Kong et al. 2025 put training beside inference as an integration point.)

**Design.** The reference ViT's recipe (:mod:`tokenreduce.models.vit`: cluttered digits generated fresh at
every step, the conv stem, 257 tokens, AdamW, warm-up + cosine, label smoothing, gradient clipping) trained from
its random initialisation, by the loop that fine-tunes it (:func:`~tokenreduce.models.vit.train.train_steps`),
under four conditions: the full model (``none``) and a registered vision method active in every forward pass
at budget ``keep`` -- ``random`` (random token dropping, a fresh draw every step), ``evit`` and ``tome``. Seed
``s`` fixes the initialisation and the training images and their order, the same for every condition, so the
conditions are paired by seed. Two budgets: **equal steps** (every run ``steps`` optimizer steps) and **equal
compute**: each reduced run first times one training step of its method and of the full model on the same batch,
interleaved (process CPU clock, one warm-up step each, then ``calib_rounds`` rounds of ``calib_steps`` steps in
alternating order; medians), and trains ``round(steps * t_full / t_method)`` steps: the steps the full run's CPU
time buys it (its schedule spans them). Reported per run: top-1 on ``test_samples`` held-out cluttered digits
(the reference ViT's test split) evaluated with the method on and off, training CPU seconds (the steps alone:
data generation excluded), and every step's loss and global gradient norm (before clipping).

**Hypothesis** (stated before the run, the paper's). Reduction in training costs little accuracy: each reduced
condition, evaluated as trained (method on), is within ``margin`` (1 point) of the full model's top-1 at equal
compute (non-inferiority: the lower 95% bound of the paired difference above ``-margin``); at equal steps the
same margin is tested. It does not destabilise training: no more loss spikes, and no more gradient-norm spikes,
than the full model (the upper 95% bound of the paired difference in spikes per run below ``spike_margin`` = 1),
at both budgets.

**Test.** Per condition, paired by seed with the full model: the mean over seeds with a bootstrap 95% CI, the
difference with a paired-bootstrap 95% CI (seeds resampled jointly, 10,000 resamples, seed 0). A *spike* is a
step whose loss (gradient norm) exceeds ``spike_k`` = 2 times the median of the ``spike_window`` = 50 steps
before it (both fixed before the run). Verdicts: *supported* when every reduced condition is within its margin,
*not supported* when none is, *mixed* otherwise; no verdict with fewer than ``min_seeds`` seeds. Further tables:
training cost, the across-seed spread of the smoothed loss (per-step std over seeds of its trailing mean over
``smooth`` steps, averaged over steps), the full model with the methods applied after training (no training
with them), and every run.
"""

from __future__ import annotations

import dataclasses
import statistics
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np

from ..bench.sweep import Cell, Sweep
from .analysis import BASELINE, Hypothesis, Metric, compare, decide
from .registry import Part, Study, StudyResult
from .stats import (
    bootstrap_ci,
    column_spread,
    count_spikes,
    paired_bootstrap,
    seed_spread,
    spike_ratios,
    trailing_mean,
)

__all__ = ["BUDGETS", "STUDY", "TrainReductionConfig", "TrainReductionStudy", "run_train_cell", "seconds_per_step"]

BUDGETS = ("steps", "compute")
_ON, _OFF = "with reduction", "without reduction"


@dataclass
class TrainReductionConfig:
    """Defaults: a scaled-down from-scratch study whose 35 runs fit ~40 min of one CPU thread: the reference
    ViT's recipe (data, conv stem, 257 tokens, AdamW, warm-up + cosine, lr 1e-3) at width 64 (2 heads of 32),
    4 blocks, 384 steps of 16 images, against the reference's 192 wide, 6 blocks, 768 steps of 32 (~25 min per
    run on 2 threads). Pilots (one seed, full model, val images): 96 wide x 160 steps of 32 and 64 wide x 250
    steps of 32 (lr 1e-3 and 2e-3) never left the chance plateau (loss 2.30); 64 wide x 460 steps of 16 left
    it at ~step 150 (val 0.76). The full size: ``--set embed_dim=192 --set depth=6 --set num_heads=3 --set
    batch_size=32 --set steps=768``."""

    methods: tuple[str, ...] = ("random", "evit", "tome")
    keep: float = 0.5
    seeds: int = 5
    budgets: tuple[str, ...] = BUDGETS
    embed_dim: int = 64
    depth: int = 4
    num_heads: int = 2
    patch_size: int = 4
    stem_channels: int = 24
    steps: int = 384
    batch_size: int = 16
    lr: float = 1e-3
    warmup_fraction: float = 0.05
    min_lr_ratio: float = 0.01
    test_samples: int = 1000
    calib_rounds: int = 3
    calib_steps: int = 2
    spike_k: float = 2.0
    spike_window: int = 50
    smooth: int = 20
    margin: float = 0.01
    spike_margin: float = 1.0
    min_seeds: int = 5
    threads: int = 1
    eval_batch_size: int = 250

    def __post_init__(self) -> None:
        bad = [b for b in self.budgets if b not in BUDGETS]
        if bad or not self.budgets:
            raise ValueError(f"budgets={self.budgets!r} is invalid: a non-empty subset of {BUDGETS}")
        if not self.methods:
            raise ValueError("methods=() is invalid: name at least one vision method, e.g. random,evit,tome")
        if isinstance(self.keep, bool) or not 0.0 < float(self.keep) < 1.0:
            raise ValueError(f"keep={self.keep!r} is invalid: must be a fraction in (0, 1)")
        if self.seeds < 2:
            raise ValueError(f"seeds={self.seeds!r} is invalid: the study pairs by seed and needs >= 2")

    def train_config(self, seed: int) -> Any:
        """The reference ViT's :class:`~tokenreduce.models.vit.TrainConfig` at this study's size and ``seed``."""
        from ..models.vit import TrainConfig

        return TrainConfig(embed_dim=self.embed_dim, depth=self.depth, num_heads=self.num_heads,
                           patch_size=self.patch_size, stem_channels=self.stem_channels, epochs=1,
                           samples_per_epoch=self.steps * self.batch_size, batch_size=self.batch_size, lr=self.lr,
                           warmup_fraction=self.warmup_fraction, min_lr_ratio=self.min_lr_ratio, seed=seed,
                           test_samples=self.test_samples, num_threads=self.threads,
                           eval_batch_size=self.eval_batch_size)

    def train_run(self, seed: int, method: str | None, steps: int) -> Any:
        from ..models.vit.train import TrainRun

        return TrainRun(self.train_config(seed), steps, self.batch_size, self.lr, self.warmup_fraction,
                        self.min_lr_ratio, method=method, keep=float(self.keep) if method else 1.0,
                        fresh_draws=True, same_prefix=True)


def seconds_per_step(cfg: TrainReductionConfig, seed: int, methods: list[str | None]) -> dict[str, Any]:
    """Process-CPU seconds of one training step of each condition (``None``: the full model), interleaved on
    the run's first batch: one warm-up step each, then ``calib_rounds`` rounds of ``calib_steps`` steps each,
    the order reversed every other round. Returns ``{"median": {name: s}, "steps": {name: [s, ...]}}``."""
    from contextlib import ExitStack

    import tokenreduce as tr

    from ..models.vit.train import init_model, make_optimizer, run_steps

    data = cfg.train_config(seed)
    batch = next(iter(cfg.train_run(seed, None, cfg.steps).batches()))
    names = [m or BASELINE for m in methods]
    with ExitStack() as stack:
        runs = []
        for m in methods:
            model = init_model(data).train()
            if m:
                stack.enter_context(tr.apply(model, m, keep=float(cfg.keep)))
            runs.append((model, *make_optimizer(model, cfg.lr, data.weight_decay, cfg.steps, cfg.warmup_fraction,
                                                cfg.min_lr_ratio)))
        for model, opt, sched in runs:  # warm-up
            run_steps(model, opt, sched, [batch], data.label_smoothing, data.grad_clip)
        timed: dict[str, list[float]] = {n: [] for n in names}
        for r in range(cfg.calib_rounds):
            order = list(range(len(runs)))[:: -1 if r % 2 else 1]
            for i in order:
                model, opt, sched = runs[i]
                log = run_steps(model, opt, sched, [batch] * cfg.calib_steps, data.label_smoothing, data.grad_clip)
                timed[names[i]] += log.step_cpu_s
    return {"median": {n: statistics.median(v) for n, v in timed.items()}, "steps": timed}


def _evaluate(model: Any, images: Any, labels: Any, method: str | None, cfg: TrainReductionConfig) -> float:
    import tokenreduce as tr

    from ..models.vit import evaluate

    if method is None:
        return evaluate(model, images, labels, cfg.eval_batch_size)["acc"]
    with tr.apply(model, method, keep=float(cfg.keep)):
        return evaluate(model, images, labels, cfg.eval_batch_size)["acc"]


def _r(xs: list[float]) -> list[float]:
    return [float(f"{x:.5g}") for x in xs]


def run_train_cell(ctx: Any, cell: Cell) -> list[dict[str, Any]]:
    """One training run from scratch: the cell's method (``none``: the full model) at its budget and seed,
    evaluated on the held-out test images with the method on and off (the full model: off, and with every
    method of the study applied after training)."""
    from ..bench.timing import fixed_threads
    from ..models.vit import reference_eval_set
    from ..models.vit.finetune import checked_train_steps
    from ..models.vit.train import init_model

    cfg = TrainReductionConfig(**{k: tuple(v) if isinstance(v, list) else v
                                  for k, v in cell.settings["config"].items()})
    budget, seed = cell.settings["budget"], cell.seed
    method = None if cell.method == BASELINE else cell.method
    with fixed_threads(cfg.threads):
        steps, calib = cfg.steps, None
        if budget == "compute" and method is not None:
            calib = seconds_per_step(cfg, seed, [None, method])
            steps = max(1, round(cfg.steps * calib["median"][BASELINE] / calib["median"][method]))
        run = cfg.train_run(seed, method, steps)
        model = init_model(run.data)
        log = checked_train_steps(model, run, desc=f"{cell.method} ({budget}, seed {seed})")
        images, labels = reference_eval_set("test", run.data)
        row: dict[str, Any] = {
            "part": "run", "method": cell.method, "keep": cell.keep, "budget": budget, "seed": seed, "steps": steps,
            "acc_off": _evaluate(model, images, labels, None, cfg), "train_cpu_s": log.cpu_s,
            "cpu_per_step": log.cpu_s / steps, "train_wall_s": log.wall_s, "n_test": int(labels.shape[0]),
            "losses": _r(log.losses), "grad_norms": _r(log.grad_norms)}
        if method is None:
            row["acc_on"] = row["acc_off"]
            row["posthoc"] = {m: _evaluate(model, images, labels, m, cfg) for m in cell.settings["posthoc"]}
        else:
            row["acc_on"] = _evaluate(model, images, labels, method, cfg)
        if calib is not None:
            row["calibration"] = calib
    return [row]


def _with_stability(row: dict[str, Any], cfg: TrainReductionConfig) -> dict[str, Any]:
    """A run's row with its spike counts, the largest step-over-running-median ratio of the loss and the
    gradient norm, and its final loss (the mean of the last ``smooth`` steps)."""
    row = dict(row, final_loss=statistics.mean(row["losses"][-cfg.smooth:]))
    for key, series in (("loss", row["losses"]), ("grad", row["grad_norms"])):
        ratios = spike_ratios(series, cfg.spike_window)
        row[f"{key}_spikes"] = count_spikes(series, cfg.spike_k, cfg.spike_window)
        row[f"{key}_max_ratio"] = float(ratios.max()) if len(ratios) else None
    return row


#: the fields a training run depends on (the others only select runs or analyse them)
_CONFIG_FIELDS = tuple(f.name for f in dataclasses.fields(TrainReductionConfig) if f.name not in
                       ("seeds", "budgets", "methods", "spike_k", "spike_window", "smooth", "margin", "spike_margin",
                        "min_seeds"))


def _no_context(model_name: str) -> None:
    """Every cell builds its own model from scratch: no shared context."""
    return


class TrainReductionStudy(Study):
    __doc__ = __doc__
    name = "train-reduction"
    config = TrainReductionConfig
    smoke: ClassVar[dict[str, Any]] = {
        "seeds": 2, "embed_dim": 32, "depth": 4, "num_heads": 2, "patch_size": 8, "stem_channels": 8, "steps": 6,
        "batch_size": 4, "test_samples": 16, "calib_rounds": 2, "calib_steps": 1, "spike_window": 3, "smooth": 2}

    def sweep(self, cfg: TrainReductionConfig, smoke: bool) -> Sweep:
        import tokenreduce as tr

        known = [r["name"] for r in tr.methods("vit-layers")]
        bad = [m for m in cfg.methods if m not in known]
        if bad:
            raise ValueError(f"methods {bad} are not vision (vit-layers) methods; accepted: {', '.join(known)}")
        cfg.train_config(0)  # a bad size fails here, before anything runs
        settings = {k: getattr(cfg, k) for k in _CONFIG_FIELDS}
        model = "smoke" if smoke else f"vit-{cfg.embed_dim}x{cfg.depth}"
        cells = [Cell("study/train-reduction", model, BASELINE, 1.0, {"config": settings, "budget": "steps",
                      "posthoc": list(cfg.methods)}, seed=s) for s in range(cfg.seeds)]
        cells += [Cell("study/train-reduction", model, m, float(cfg.keep), {"config": settings, "budget": b}, seed=s)
                  for b in cfg.budgets for m in cfg.methods for s in range(cfg.seeds)]
        return Sweep("study/train-reduction", cells, _no_context, run_train_cell,
                     meta={"bench": "study/train-reduction", "study": self.name}, cpus_per_cell=float(cfg.threads))

    def analyse(self, rows: list[dict[str, Any]], cfg: TrainReductionConfig) -> StudyResult:
        runs = [_with_stability(r, cfg) for r in rows if r.get("part") == "run" and not r.get("error")]
        failed = [r for r in rows if r.get("error")]
        parts: list[Part] = []
        acc = Metric("acc", "mean", True, "top-1")
        for budget in [b for b in ("compute", "steps") if b in cfg.budgets]:
            hyp = Hypothesis(
                f"trained from scratch with {', '.join(cfg.methods)} at keep {cfg.keep} active, the ViT evaluated as "
                f"trained is within {cfg.margin:.3g} top-1 of the full model at equal {budget}",
                "paired by seed: paired-bootstrap 95% CI of the top-1 difference (seeds resampled jointly); "
                f"non-inferior when its lower bound is above -{cfg.margin:.3g}",
                acc, treated=lambda r: r["evaluated"] == _ON, margin=cfg.margin, min_items=cfg.min_seeds)
            table = compare(_accuracy_items(runs, budget), acc, strata=("evaluated",), item="seed")
            parts.append(Part(f"accuracy at equal {budget}", hyp, table, decide(table, hyp, ("evaluated",)),
                              ("evaluated",)))
        for key, what in (("loss", "loss"), ("grad", "gradient-norm")):
            hyp = Hypothesis(
                f"training with reduction gives no more {what} spikes (steps above {cfg.spike_k:g}x the median of the "
                f"{cfg.spike_window} steps before) than the full model: within {cfg.spike_margin:g} spike per run",
                "paired by seed: paired-bootstrap 95% CI of the difference in spikes per run; non-inferior when its "
                f"upper bound is below {cfg.spike_margin:g}",
                Metric(f"{key}_spikes", "mean", False, f"{what} spikes"), treated=lambda r: r["method"] != BASELINE,
                margin=cfg.spike_margin, min_items=cfg.min_seeds)
            items = [r for b in cfg.budgets for r in _budget_runs(runs, b)]
            table = compare(items, hyp.metric, strata=("budget",), item="seed")
            parts.append(Part(f"{what} spikes", hyp, table, decide(table, hyp, ("budget",)), ("budget",)))
        spread = (f"loss spread across seeds: per-step std over seeds of the {cfg.smooth}-step trailing mean of the "
                  "loss, averaged over the steps (95% bootstrap CI over seeds)")
        posthoc = ("the full model with the methods applied after training (not trained with them), against the "
                   "models trained with them at equal steps (evaluated with the method on)")
        tables = [("training cost (process CPU seconds of the steps, mean over seeds; ratio paired by seed)",
                   _cost_table(runs, cfg)), (spread, _spread_table(runs, cfg)), (posthoc, _posthoc_table(runs, cfg)),
                  ("every run", _run_table(runs))]
        notes = [(f"{len(failed)} run(s) failed and are left out, e.g. {failed[0].get('method')}: "
                 f"{failed[0].get('error')}")] if failed else []
        return StudyResult(parts, tables, notes)


def _budget_runs(runs: list[dict[str, Any]], budget: str) -> list[dict[str, Any]]:
    """The full model's runs (one budget for both: its steps are its compute) and the reduced runs at ``budget``,
    labelled with it."""
    return [dict(r, budget=budget) for r in runs if r["method"] == BASELINE or r["budget"] == budget]


def _accuracy_items(runs: list[dict[str, Any]], budget: str) -> list[dict[str, Any]]:
    """Per run and evaluation: the full model (always without reduction) in both strata, a reduced run's top-1
    with its method on and off."""
    out = []
    for r in _budget_runs(runs, budget):
        for evaluated, key in ((_ON, "acc_on"), (_OFF, "acc_off")):
            out.append({"method": r["method"], "keep": r["keep"], "seed": r["seed"], "evaluated": evaluated,
                        "budget": budget, "acc": r["acc_off"] if r["method"] == BASELINE else r[key]})
    return out


def _by(runs: list[dict[str, Any]], method: str, budget: str) -> dict[int, dict[str, Any]]:
    return {r["seed"]: r for r in _budget_runs(runs, budget) if r["method"] == method}


def _conditions(runs: list[dict[str, Any]], cfg: TrainReductionConfig) -> list[tuple[str, str]]:
    return [(BASELINE, "steps")] + [(m, b) for b in cfg.budgets for m in cfg.methods if _by(runs, m, b)]


def _cost_table(runs: list[dict[str, Any]], cfg: TrainReductionConfig) -> list[dict[str, Any]]:
    full = _by(runs, BASELINE, "steps")
    out = []
    for m, b in _conditions(runs, cfg):
        rs = _by(runs, m, b)
        if not rs:
            continue
        seeds = [s for s in rs if s in full]
        row: dict[str, Any] = {"method": m, "budget": "both" if m == BASELINE else b, "runs": len(rs),
                               "steps (median)": statistics.median(r["steps"] for r in rs.values()),
                               "train CPU s": statistics.mean(r["train_cpu_s"] for r in rs.values()),
                               "CPU s/step": statistics.mean(r["cpu_per_step"] for r in rs.values())}
        if m != BASELINE and seeds:
            row["CPU vs full (separate runs)"] = statistics.mean(rs[s]["train_cpu_s"] / full[s]["train_cpu_s"]
                                                                 for s in seeds)
        ratio = _interleaved_ratios(runs, m)
        if m != BASELINE and ratio:
            row["s/step vs full (interleaved)"] = statistics.median(ratio.values())
            row["compute vs full (interleaved)"] = statistics.median(
                r["steps"] * ratio[s] / cfg.steps for s, r in rs.items() if s in ratio)
        out.append(row)
    return out


def _interleaved_ratios(runs: list[dict[str, Any]], method: str) -> dict[int, float]:
    """Per seed, the method's training-step cost over the full model's, from the equal-compute run's
    interleaved timing (:func:`seconds_per_step`: both on the same batch, alternating). The CPU seconds of
    separate runs are not comparable when the machine's load differed between them (contention inflates process
    CPU time: the full runs of 2026-12-07 measured 0.21-0.33 s/step at load 5-15, 0.14-0.17 interleaved at 2)."""
    return {r["seed"]: r["calibration"]["median"][method] / r["calibration"]["median"][BASELINE]
            for r in runs if r["method"] == method and r.get("calibration")}


def _spread_table(runs: list[dict[str, Any]], cfg: TrainReductionConfig) -> list[dict[str, Any]]:
    out = []
    for m, b in _conditions(runs, cfg):
        rs = list(_by(runs, m, b).values())
        if len(rs) < 2:
            continue
        n = min(len(r["losses"]) for r in rs)
        smooth = np.stack([trailing_mean(r["losses"][:n], cfg.smooth) for r in rs])
        value, lo, hi = bootstrap_ci(smooth, column_spread)
        half = [r["losses"][n // 2:n] for r in rs]
        out.append({"method": m, "budget": "both" if m == BASELINE else b, "seeds": len(rs), "steps": n,
                    "loss std across seeds": value, "ci95": f"[{lo:.4f}, {hi:.4f}]",
                    "second half": seed_spread(half, cfg.smooth),
                    "final loss (mean)": statistics.mean(r["final_loss"] for r in rs)})
    return out


def _posthoc_table(runs: list[dict[str, Any]], cfg: TrainReductionConfig) -> list[dict[str, Any]]:
    full = _by(runs, BASELINE, "steps")
    out = []
    for m in cfg.methods:
        trained = _by(runs, m, "steps")
        seeds = [s for s in full if s in trained and m in full[s].get("posthoc", {})]
        if not seeds:
            continue
        post = [full[s]["posthoc"][m] for s in seeds]
        d = paired_bootstrap(post, [trained[s]["acc_on"] for s in seeds])
        out.append({"method": m, "keep": cfg.keep, "seeds": len(seeds),
                     "full model, method applied after training": statistics.mean(post),
                     "trained with the method": statistics.mean(trained[s]["acc_on"] for s in seeds),
                     "difference": f"{d['diff']:+.3f} [{d['low']:+.3f}, {d['high']:+.3f}]"})
    return out


def _run_table(runs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    keys = ("method", "budget", "seed", "steps", "acc_on", "acc_off", "train_cpu_s", "cpu_per_step", "final_loss",
            "loss_spikes", "grad_spikes", "loss_max_ratio", "grad_max_ratio")
    return [{k: r.get(k) for k in keys} for r in runs]


STUDY = TrainReductionStudy()
