"""The ``train-reduction`` study: from-scratch training with a method active (tiny random-weight ViT, a few
steps), spike counting on synthetic series, the pairing by seed, and the verdicts on synthetic runs."""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest
import torch

import tokenreduce as tr
from tokenreduce.models.vit.train import init_model, make_optimizer, run_steps, train_steps
from tokenreduce.study import get_study
from tokenreduce.study.stats import (
    bootstrap_ci,
    column_spread,
    count_spikes,
    seed_spread,
    spike_ratios,
    trailing_mean,
)
from tokenreduce.study.train_reduction import TrainReductionConfig, TrainReductionStudy

STUDY = get_study("train-reduction")


def _cfg(**kw) -> TrainReductionConfig:
    return STUDY.make_config(smoke=True, overrides=kw)


@pytest.mark.parametrize("method", ["random", "evit", "tome"])
def test_a_few_steps_from_scratch_with_the_method_active_lower_the_loss(method):
    cfg = _cfg()
    data = cfg.train_config(seed=0)
    model = init_model(data).train()
    x, y = next(iter(cfg.train_run(0, None, cfg.steps).batches()))
    opt, sched = make_optimizer(model, 3e-3, data.weight_decay, 30, 0.0, 1.0)
    with tr.apply(model, method, keep=cfg.keep) as h:
        log = run_steps(model, opt, sched, [(x, y)] * 30, data.label_smoothing, data.grad_clip)
        assert h.stats.keep_achieved < 1.0  # the method reduced tokens in these forwards
    assert len(log.losses) == len(log.grad_norms) == len(log.step_cpu_s) == 30
    assert all(math.isfinite(v) and v > 0 for v in log.grad_norms) and log.cpu_s > 0
    assert np.mean(log.losses[-5:]) < np.mean(log.losses[:5]) - 0.05, log.losses


def test_train_steps_draws_random_anew_every_step_and_unpatches(monkeypatch):
    import tokenreduce.models.vit.train as train_mod

    cfg = _cfg()
    run = cfg.train_run(3, "random", 4)
    assert run.fresh_draws and run.keep == cfg.keep
    seeds: list[int] = []
    real = train_mod.run_steps

    def spy(model, *a, before_step=None, **kw):
        def before(i):
            before_step(i)
            seeds.append(model._tokenreduce_handle.method.seed)
        return real(model, *a, before_step=before if before_step else None, **kw)

    monkeypatch.setattr(train_mod, "run_steps", spy)
    model = init_model(run.data)
    log = train_steps(model, run)
    assert len(log.losses) == 4 and seeds == [3 * 1_000_003 + i for i in range(4)]
    assert getattr(model, "_tokenreduce_handle", None) is None  # unpatched afterwards
    seeds.clear()
    train_steps(init_model(run.data), dataclasses.replace(run, method="tome"))
    assert seeds == []  # a deterministic method has nothing to draw


def test_same_seed_same_init_and_data_whatever_the_condition():
    cfg = _cfg()
    a, b = cfg.train_run(1, None, 6), cfg.train_run(1, "tome", 6)
    for (xa, ya), (xb, yb) in zip(a.batches(), b.batches()):
        assert torch.equal(xa, xb) and torch.equal(ya, yb)
    longer = list(cfg.train_run(1, "tome", 9).batches())  # an equal-compute run: the same batches, then more
    assert len(longer) == 9 and all(torch.equal(x, lx) for (x, _), (lx, _) in zip(a.batches(), longer))
    ma, mb = init_model(a.data), init_model(b.data)
    assert all(torch.equal(p, q) for p, q in zip(ma.parameters(), mb.parameters()))
    other = next(iter(cfg.train_run(2, None, 6).batches()))[0]
    assert not torch.equal(other, next(iter(a.batches()))[0])
    cells = STUDY.sweep(cfg, smoke=True).cells
    by_seed = {(c.method, c.settings["budget"], c.seed) for c in cells}
    assert len(cells) == cfg.seeds * (1 + len(cfg.methods) * len(cfg.budgets)) == len(by_seed)


def test_spikes_on_a_synthetic_series():
    x = [1.0] * 20
    x[10], x[15], x[3] = 3.0, 2.0, 5.0  # 2.0 is exactly k x median: not a spike; step 3 is inside the window
    assert count_spikes(x, 2.0, 5) == 1
    assert count_spikes(x, 1.5, 5) == 2
    r = spike_ratios(x, 5)
    assert len(r) == 15 and r[10 - 5] == 3.0 and r.max() == 3.0
    assert count_spikes([1.0, 2.0, 4.0, 8.0, 16.0], 1.9, 1) == 4  # against the step before it only
    assert count_spikes([1.0] * 3, 2.0, 5) == 0  # shorter than the window
    x2 = [1.0] * 8 + [10.0] * 8  # a level shift: spikes until the running median catches up
    assert count_spikes(x2, 2.0, 4) == 2
    with pytest.raises(ValueError, match="k must be > 1"):
        count_spikes(x, 1.0, 5)
    with pytest.raises(ValueError, match="window=0 is invalid"):
        spike_ratios(x, 0)


def test_trailing_mean_and_seed_spread():
    assert np.allclose(trailing_mean([1, 2, 3, 4], 2), [1, 1.5, 2.5, 3.5])
    assert seed_spread([[1, 1, 1], [1, 1, 1]], 2) == 0.0
    a, b = [0.0] * 6, [2.0] * 6
    assert math.isclose(seed_spread([a, b], 3), np.std([0.0, 2.0], ddof=1))
    assert math.isclose(seed_spread([a, b + [9.0] * 4], 3), seed_spread([a, b], 3))  # common steps only
    with pytest.raises(ValueError, match="at least 2 seeds"):
        seed_spread([a], 2)
    curves = np.random.default_rng(0).random((5, 30))
    assert bootstrap_ci(curves, column_spread) == bootstrap_ci(curves, lambda c: column_spread(c))  # batched = loop


def _runs(shift: dict[str, float], spikes: dict[str, int] | None = None, seeds: int = 5) -> list[dict]:
    """Synthetic run rows: per-seed accuracies that vary a lot across seeds, each method a fixed shift from
    the full model of the same seed (so only the pairing by seed makes the difference exact)."""
    rng = np.random.default_rng(0)
    base = {s: 0.6 + 0.3 * rng.random() for s in range(seeds)}
    rows = []
    for s in reversed(range(seeds)):  # order must not matter
        losses = list(2.3 - 0.001 * np.arange(60) + 0.01 * rng.standard_normal(60))
        common = {"seed": s, "losses": losses, "grad_norms": [1.0] * 60, "train_cpu_s": 10.0, "cpu_per_step": 0.1,
                  "steps": 60}
        rows.append({"part": "run", "method": "none", "keep": 1.0, "budget": "steps", "acc_on": base[s],
                     "acc_off": base[s], "posthoc": {m: base[s] - 0.1 for m in shift}, **common})
        for m, d in shift.items():
            g = [1.0] * 60
            for i in range((spikes or {}).get(m, 0)):
                g[55 - 2 * i] = 5.0
            for b in ("steps", "compute"):
                rows.append({"part": "run", "method": m, "keep": 0.5, "budget": b, "acc_on": base[s] + d,
                             "acc_off": base[s] + d - 0.2, **common, "grad_norms": g})
    return rows


def test_verdicts_pair_by_seed():
    cfg = dataclasses.replace(TrainReductionConfig(), methods=("random", "tome"), spike_window=10)
    res = TrainReductionStudy().analyse(_runs({"random": -0.005, "tome": 0.002}), cfg)
    parts = {p.name: p for p in res.parts}
    acc = parts["accuracy at equal compute"]
    row = next(r for r in acc.table if r["method"] == "random" and r["evaluated"] == "with reduction")
    assert math.isclose(row["diff"], -0.005) and math.isclose(row["diff_low"], -0.005)  # exact: paired by seed
    assert acc.verdict.label == "supported" and "random" in acc.verdict.line
    off = next(r for r in acc.table if r["method"] == "random" and r["evaluated"] == "without reduction")
    assert math.isclose(off["diff"], -0.205) and "non_inferior" not in off  # reported, outside the hypothesis
    assert parts["loss spikes"].verdict.label == "supported"

    res = TrainReductionStudy().analyse(_runs({"random": -0.03, "tome": 0.0}, spikes={"tome": 3}), cfg)
    parts = {p.name: p for p in res.parts}
    assert parts["accuracy at equal steps"].verdict.label == "mixed"
    assert parts["gradient-norm spikes"].verdict.label == "mixed"
    spikes = next(r for r in parts["gradient-norm spikes"].table if r["method"] == "tome")
    assert spikes["diff"] == 3.0
    post = dict(res.tables)[next(c for c, _ in res.tables if c.startswith("the full model with"))]
    assert math.isclose(next(r for r in post if r["method"] == "tome")["trained with the method"] -
                        next(r for r in post if r["method"] == "tome")["full model, method applied after training"], 0.1)

    few = TrainReductionStudy().analyse(_runs({"random": 0.0}, seeds=3), cfg)
    assert all(p.verdict.label == "no verdict" for p in few.parts)


@pytest.mark.parametrize(("kw", "needle"), [
    ({"budgets": ("steps", "flops")}, "budgets=.* is invalid"),
    ({"keep": 1.0}, r"keep=1.0 is invalid: must be a fraction in \(0, 1\)"),
    ({"seeds": 1}, "seeds=1 is invalid"),
])
def test_config_errors_name_the_bad_value(kw, needle):
    with pytest.raises(ValueError, match=needle):
        TrainReductionConfig(**kw)


def test_unknown_method_is_refused_before_anything_runs():
    with pytest.raises(ValueError, match="not vision .* methods; accepted: .*tome"):
        STUDY.sweep(_cfg(methods=("tome", "snapkv")), smoke=True)


def test_cost_table_uses_the_interleaved_timing_not_separate_runs():
    """Separate runs' CPU seconds depend on the machine's load when each ran; the cost ratio comes from the
    equal-compute run's interleaved timing: steps x (method s/step / full s/step) / the full run's steps."""
    cfg = dataclasses.replace(TrainReductionConfig(), methods=("tome",), steps=60)
    rows = _runs({"tome": 0.0})
    for r in rows:
        if r["method"] == "tome" and r["budget"] == "compute":
            r.update(steps=90, calibration={"median": {"none": 0.2, "tome": 0.1}})
    cost = dict(TrainReductionStudy().analyse(rows, cfg).tables)
    table = next(t for c, t in cost.items() if c.startswith("training cost"))
    steps_row = next(r for r in table if r["method"] == "tome" and r["budget"] == "steps")
    compute_row = next(r for r in table if r["method"] == "tome" and r["budget"] == "compute")
    assert math.isclose(steps_row["s/step vs full (interleaved)"], 0.5)
    assert math.isclose(steps_row["compute vs full (interleaved)"], 0.5)
    assert math.isclose(compute_row["compute vs full (interleaved)"], 90 * 0.5 / 60)
    assert math.isclose(compute_row["CPU vs full (separate runs)"], 1.0)  # the synthetic runs all say 10 s
