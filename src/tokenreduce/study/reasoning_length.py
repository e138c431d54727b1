"""The ``reasoning-length`` study: can a small reasoning LM skip chain-of-thought tokens (TokenSkip) without losing
accuracy?

**Setup.** The reasoning LM of this project (:mod:`tokenreduce.models.reasoning`: a 0.86M-parameter Llama with a
character vocabulary) solves multi-step modular arithmetic by writing every step out (``7+3=0;0*2=0;...#5``).
TokenSkip (Xia et al. 2025): each chain token is scored by the full-chain model's own self-information given the
question (the Selective Context / LLMLingua criterion, :mod:`tokenreduce.models.reasoning.compress`), chains are
compressed to gamma in {1.0, 0.8, 0.6, 0.4} (tokens kept in order, the answer untouched), and the full-chain model
is fine-tuned on a mixture of them with gamma in the prompt. At test time the same held-out problems are asked of
the full-chain model (the baseline, ``none``) and of the TokenSkip model prompted with each gamma (``tokenskip``
at keep = gamma): answer accuracy and generated tokens (greedy decoding with a KV cache) on every item, and the
generation time of one item alone on every ``time_every``-th item (all conditions of the item timed interleaved,
``repeats`` rotated rounds after a warm-up, median per item).

**Hypothesis** (stated before the run). Accuracy holds within 2 points of the full-chain model down to some
gamma < 1, while the generated tokens fall proportionally.

**Test.** Per condition, paired with the full-chain model on the same items: accuracy with a Wilson 95% CI, the
difference with a paired-bootstrap 95% CI (10,000 resamples, seed 0) and the exact McNemar test; the generated
tokens as the ratio of means with a paired-bootstrap CI. A gamma < 1 *passes* when (a) accuracy is non-inferior:
the lower 95% bound of the difference is above -``margin`` (0.02), and (b) the tokens fall proportionally: the
upper 95% bound of the token ratio is at most gamma + ``length_tolerance`` (0.10). *Supported*: some gamma < 1
passes (the effect size is that of the smallest passing gamma); *mixed*: (a) holds at some gamma and (b) at some
gamma, never both at once; *not supported*: otherwise. No verdict under 39 items per condition (a 95% Wilson CI
of half-width 0.15). TokenSkip at gamma 1.0 is reported against the full-chain model (does the fine-tune cost
anything at full length?), outside the hypothesis.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np

from ..bench.sweep import CachedLoader, Cell, Sweep
from .analysis import BASELINE, Hypothesis, Metric, Verdict, compare, decide
from .registry import Part, Study, StudyResult
from .stats import paired_bootstrap

__all__ = ["STUDY", "ReasoningLengthConfig", "ReasoningLengthStudy", "load_reasoners", "run_reasoning_cell"]

METHOD = "tokenskip"
SMOKE = "smoke"


@dataclass
class ReasoningLengthConfig:
    """Defaults: 1,000 held-out problems (a 2-point non-inferiority margin needs the paired CI of the difference
    narrower than that), gamma 1.0/0.8/0.6/0.4; every ``time_every``-th item (50) timed in 3 interleaved rounds
    after one warm-up round; ``max_new_tokens`` 0: room for the longest full chain."""

    n_items: int = 1000
    gammas: tuple[float, ...] = (1.0, 0.8, 0.6, 0.4)
    items_per_cell: int = 50
    repeats: int = 3
    time_every: int = 20
    clock: str = "wall"
    max_new_tokens: int = 0
    margin: float = 0.02
    length_tolerance: float = 0.10
    threads: int = 1
    seed: int = 0
    max_halfwidth: float = 0.15
    #: the TokenSkip fine-tune to ask: ``TokenSkipConfig(force_keep=...)`` (``""``: the first one; ``";="``:
    #: the step markers always kept, as TokenSkip's ``force_tokens``)
    force_keep: str = ""
    #: its learning rate (TokenSkipConfig.lr; 1e-3: the first fine-tunes)
    tokenskip_lr: float = 1e-3

    def tokenskip(self) -> Any:
        """The :class:`~tokenreduce.models.reasoning.TokenSkipConfig` of the fine-tune this study asks."""
        from ..models.reasoning import TokenSkipConfig

        return TokenSkipConfig(force_keep=self.force_keep, lr=self.tokenskip_lr)


def _smoke_reasoners() -> tuple[Any, Any, Any, Any]:
    """A tiny random-weight full-chain model and its TokenSkip fine-tune of two steps (the whole compression and
    fine-tuning path, in a second)."""
    from ..models.reasoning import ReasonerConfig, TokenSkipConfig, build_model, build_tokenizer, fit, tokenskip_data
    from ..models.reasoning.tokenskip import _batches

    base_cfg = ReasonerConfig(hidden=32, layers=2, heads=2, mlp=64, steps=2, batch_size=8)
    base = build_model(base_cfg, seed=0)
    ts_cfg = TokenSkipConfig(base=base_cfg, n_problems=16, steps=2, batch_size=8)
    ts = build_model(base_cfg)
    ts.load_state_dict(base.state_dict())
    prompts, completions, _ = tokenskip_data(base, ts_cfg)
    fit(ts, _batches(prompts, completions, 8, 0), 2, 1e-3, 0.0, 1.0, progress=False)
    return base.eval(), ts.eval(), build_tokenizer(), base_cfg


def load_reasoners(name: str, cfg: Any = None) -> tuple[Any, Any, Any, Any]:
    """(full-chain model, TokenSkip model, tokenizer, ReasonerConfig): the cached ones (``cfg``: the
    TokenSkipConfig, default the first fine-tune), or the smoke pair."""
    if name == SMOKE:
        return _smoke_reasoners()
    from ..models.reasoning import TokenSkipConfig, load_reasoner, load_tokenskip

    cfg = cfg or TokenSkipConfig()
    base, tok, _ = load_reasoner(cfg.base)
    ts, _, _ = load_tokenskip(cfg)
    return base, ts, tok, cfg.base


def _conditions(gammas: tuple[float, ...]) -> list[tuple[str, float, float | None]]:
    """(method, keep, gamma in the prompt): the full-chain model first."""
    return [(BASELINE, 1.0, None), *((METHOD, float(g), float(g)) for g in gammas)]


def run_reasoning_cell(ctx: tuple[Any, Any, Any, Any], cell: Cell) -> list[dict[str, Any]]:
    """Every condition on the cell's items: the scored greedy answers (batched per condition), then on every
    ``time_every``-th item the single-item generations of all conditions timed interleaved (``repeats`` rounds,
    rotated)."""
    from ..bench.timing import fixed_threads, interleaved
    from ..data.chains import make_problems
    from ..models.reasoning import greedy, parse_completion, prompt_text
    from ..models.reasoning.tokenizer import ANSWER_MARK
    from ..models.reasoning.train import max_new_tokens

    base, ts, tok, model_cfg = ctx
    cfg = ReasoningLengthConfig(**{k: tuple(v) if isinstance(v, list) else v
                                   for k, v in cell.settings["config"].items()})
    lo = cell.shard * cfg.items_per_cell
    problems = make_problems("test", cfg.n_items, cfg.seed, model_cfg.task)[lo: lo + cfg.items_per_cell]
    limit = cfg.max_new_tokens or max_new_tokens(model_cfg)
    conds = _conditions(cfg.gammas)
    mark = tok.convert_tokens_to_ids(ANSWER_MARK)
    rows = []
    with fixed_threads(cfg.threads):
        outs = {(m, k): greedy(base if m == BASELINE else ts, [prompt_text(p.question, g) for p in problems], limit)
                for m, k, g in conds}
        for j, p in enumerate(problems):
            times = {}
            if (lo + j) % cfg.time_every == 0:
                calls = {(m, k): (lambda mdl=(base if m == BASELINE else ts), q=prompt_text(p.question, g):
                                  greedy(mdl, [q], limit)) for m, k, g in conds}
                times = interleaved(calls, warmup=1, repeats=cfg.repeats, rotate=True, clock=cfg.clock)
            for m, k, _ in conds:
                out = outs[(m, k)][j]
                text = tok.decode(out, skip_special_tokens=True)
                answer = parse_completion(text)[1]
                n_chain = out.index(mark) if mark in out else len(out) - (out[-1:] == [tok.eos_token_id])
                t = times.get((m, k))
                rows.append({"part": "item", "item": lo + j, "method": m, "keep": k, "ops": len(p.steps),
                             "correct": answer == p.answer, "answered": answer is not None,
                             "gen_tokens": len(out), "chain_tokens": n_chain,
                             "reference_chain_tokens": len(p.chain), "seconds": t.median if t else None,
                             "seconds_iqr": t.iqr if t else None, "output": text})
    return rows


def _ratio(base: list[dict[str, Any]], rows: list[dict[str, Any]], field: str, seed: int) -> tuple[float, float, float]:
    """Ratio of means (condition / full-chain model) on paired items, with its paired-bootstrap 95% CI."""
    a = np.array([float(r[field]) for r in base])
    b = np.array([float(r[field]) for r in rows])
    d = paired_bootstrap(a, b, lambda v: float(np.log(v.mean())), seed=seed)
    return math.exp(d["diff"]), math.exp(d["low"]), math.exp(d["high"])


def _paired(items: list[dict[str, Any]]) -> dict[float, tuple[list[dict[str, Any]], list[dict[str, Any]]]]:
    """keep -> (full-chain rows, TokenSkip rows) on the items both have."""
    base = {r["item"]: r for r in items if r["method"] == BASELINE}
    out: dict[float, tuple[list[dict[str, Any]], list[dict[str, Any]]]] = {}
    for k in sorted({r["keep"] for r in items if r["method"] == METHOD}, reverse=True):
        mine = {r["item"]: r for r in items if r["method"] == METHOD and r["keep"] == k}
        ids = sorted(set(mine) & set(base))
        out[k] = ([base[i] for i in ids], [mine[i] for i in ids])
    return out


def length_table(items: list[dict[str, Any]], seed: int) -> list[dict[str, Any]]:
    """Per gamma: generated and chain tokens per item (means) and seconds per timed item (median, IQR over
    items), and the ratios to the full-chain model on the same items (ratios of means with paired-bootstrap 95%
    CIs; the median of the per-item time ratios)."""
    out: list[dict[str, Any]] = []
    pairs = _paired(items)
    if not pairs:
        return out
    first = next(iter(pairs.values()))[0]
    for label, k, rows, base in [(BASELINE, 1.0, first, first)] + [(METHOD, k, b, a) for k, (a, b) in pairs.items()]:
        if not rows:
            continue
        timed = [(r, b) for r, b in zip(rows, base) if r["seconds"] is not None and b["seconds"] is not None]
        sec = np.array([r["seconds"] for r, _ in timed])
        row: dict[str, Any] = {"method": label, "keep": k, "n": len(rows),
                               "gen_tokens": float(np.mean([r["gen_tokens"] for r in rows])),
                               "chain_tokens": float(np.mean([r["chain_tokens"] for r in rows])),
                               "n_timed": len(timed)}
        if timed:
            row.update(seconds_median=float(np.median(sec)),
                       seconds_iqr=float(np.quantile(sec, 0.75) - np.quantile(sec, 0.25)))
        if label != BASELINE:
            for field, name, a, b in (("gen_tokens", "token_ratio", base, rows), ("chain_tokens", "chain_ratio", base,
                                      rows), ("seconds", "time_ratio", [t[1] for t in timed], [t[0] for t in timed])):
                if a:
                    m, lo, hi = _ratio(a, b, field, seed)
                    row.update({name: m, f"{name}_low": lo, f"{name}_high": hi})
            if timed:
                row["time_ratio_item_median"] = float(np.median([r["seconds"] / b["seconds"] for r, b in timed]))
        out.append(row)
    return out


def _verdict(acc_table: list[dict[str, Any]], lengths: list[dict[str, Any]], acc_verdict: Verdict,
             cfg: ReasoningLengthConfig) -> Verdict:
    """The combined verdict of the docstring's test, from the non-inferiority flags of :func:`decide` and the
    token ratios."""
    if acc_verdict.label == "no verdict":
        return acc_verdict
    ratio = {r["keep"]: r for r in lengths if r["method"] == METHOD}
    rows = []
    for r in acc_table:
        if r["method"] != METHOD or r["keep"] >= 1.0 or r["keep"] not in ratio:
            continue
        t = ratio[r["keep"]]
        acc_ok, len_ok = bool(r["non_inferior"]), bool(t["token_ratio_high"] <= r["keep"] + cfg.length_tolerance)
        r.update(proportional=len_ok, passes=acc_ok and len_ok, token_ratio=t["token_ratio"],
                 token_ratio_low=t["token_ratio_low"], token_ratio_high=t["token_ratio_high"])
        rows.append(r)
    if not rows:
        return Verdict("no verdict", "no verdict: the run holds no TokenSkip condition with gamma < 1")

    def effect(r: dict[str, Any]) -> str:
        return (f"gamma {r['keep']:g}: accuracy {r['accuracy']:.3f} vs {r['accuracy'] - r['diff']:.3f} full chain, "
                f"difference {r['diff']:+.3f} [95% CI {r['diff_low']:+.3f}, {r['diff_high']:+.3f}], McNemar "
                f"p={r['p']:.3g}; generated tokens x{r['token_ratio']:.2f} [{r['token_ratio_low']:.2f}, "
                f"{r['token_ratio_high']:.2f}]")

    passing = [r for r in rows if r["passes"]]
    if passing:
        best = min(passing, key=lambda r: r["keep"])
        return Verdict("supported", f"supported (accuracy within {cfg.margin:g} and tokens proportional at "
                       f"{len(passing)} of {len(rows)} gammas < 1); smallest passing {effect(best)}", best)
    worst = min(rows, key=lambda r: r["keep"])
    acc_any, len_any = any(r["non_inferior"] for r in rows), any(r["proportional"] for r in rows)
    label = "mixed" if acc_any and len_any else "not supported"
    why = ("accuracy holds at some gamma and tokens fall proportionally at another, never both"
           if label == "mixed" else "accuracy never within the margin" if not acc_any
           else "tokens never fall proportionally")
    return Verdict(label, f"{label} ({why}); at the smallest {effect(worst)}", worst)


class ReasoningLengthStudy(Study):
    __doc__ = __doc__
    name = "reasoning-length"
    config = ReasoningLengthConfig
    smoke: ClassVar[dict[str, Any]] = {"n_items": 4, "items_per_cell": 2, "gammas": (1.0, 0.6), "repeats": 1, "time_every": 2,
                                       "max_new_tokens": 12}

    def missing_models(self, cfg: ReasoningLengthConfig) -> list[str]:
        from ..models.reasoning import checkpoint_dir, tokenskip_dir

        ts = cfg.tokenskip()
        out = []
        if not (checkpoint_dir(ts.base) / "model.pt").is_file():
            out.append("the reasoning LM is not cached: build it with `tokenreduce train reasoner`")
        if not (tokenskip_dir(ts) / "model.pt").is_file():
            force = (f" --force-keep '{cfg.force_keep}'" if cfg.force_keep else "") + (
                f" --lr {cfg.tokenskip_lr:g}" if ts.lr != type(ts).lr else "")
            out.append("its TokenSkip fine-tune is not cached: build it with `tokenreduce train reasoner "
                       f"--tokenskip{force}` (after `tokenreduce train reasoner`)")
        return out

    def sweep(self, cfg: ReasoningLengthConfig, smoke: bool) -> Sweep:
        from ..bench.timing import CLOCKS
        from ..models.reasoning import gamma_token, tokenskip_dir

        for g in cfg.gammas:
            gamma_token(g)
        if cfg.clock not in CLOCKS:
            raise ValueError(f"clock={cfg.clock!r} is invalid: one of {', '.join(CLOCKS)}")
        for name in ("n_items", "items_per_cell", "repeats", "time_every", "threads"):
            if getattr(cfg, name) < 1:
                raise ValueError(f"{name}={getattr(cfg, name)!r} is invalid: an int >= 1")
        trained = cfg.tokenskip().gammas
        unseen = [g for g in cfg.gammas if g not in trained]
        if unseen and not smoke:
            raise ValueError(f"gammas {unseen} were not in the TokenSkip fine-tune's mixture {trained}")
        model = SMOKE if smoke else tokenskip_dir(cfg.tokenskip()).name
        fields = ("n_items", "gammas", "items_per_cell", "repeats", "time_every", "clock", "max_new_tokens", "threads",
                  "seed")
        settings = {"config": {k: getattr(cfg, k) for k in fields}}
        n_cells = -(-cfg.n_items // cfg.items_per_cell)
        cells = [Cell("study/reasoning-length", model, METHOD, tuple(cfg.gammas), settings, shard=i, timing=True)
                 for i in range(n_cells)]
        load = CachedLoader(functools.partial(load_reasoners, cfg=cfg.tokenskip()))
        return Sweep("study/reasoning-length", cells, load, run_reasoning_cell,
                     meta={"bench": "study/reasoning-length", "study": self.name}, cpus_per_cell=float(cfg.threads))

    def analyse(self, rows: list[dict[str, Any]], cfg: ReasoningLengthConfig) -> StudyResult:
        items = [r for r in rows if r.get("part") == "item"]
        hyp = Hypothesis(
            f"TokenSkip on the reasoning LM: accuracy holds within {cfg.margin:g} of the full-chain model down to "
            f"some gamma < 1 while the generated tokens fall proportionally (ratio <= gamma + "
            f"{cfg.length_tolerance:g})",
            "per gamma, paired with the full-chain model on the same problems: Wilson 95% CI, paired-bootstrap CI "
            "of the accuracy difference (non-inferior when its lower bound > -margin), exact McNemar test; "
            "generated tokens as a ratio of means with a paired-bootstrap CI (proportional when its upper bound "
            "<= gamma + tolerance); supported when some gamma < 1 passes both",
            Metric("correct", "proportion", True, "accuracy"),
            treated=lambda r: r["method"] == METHOD and r["keep"] < 1.0, margin=cfg.margin,
            max_halfwidth=cfg.max_halfwidth)
        table = compare(items, hyp.metric, seed=cfg.seed)
        lengths = length_table(items, cfg.seed)
        verdict = _verdict(table, lengths, decide(table, hyp), cfg)
        caption = ("generated tokens, chain tokens and generation time per item vs the full-chain model (ratios of "
                   f"means with paired-bootstrap 95% CIs; time: {cfg.clock} clock, median of {cfg.repeats} "
                   f"interleaved rounds per timed item)")
        tables = [(caption, lengths)]
        by_ops = sorted(compare(items, hyp.metric, strata=("ops",), seed=cfg.seed), key=lambda r: r["ops"])
        tables.append(("accuracy per number of operations", [{k: r.get(k) for k in (
            "ops", "method", "keep", "n", "accuracy", "ci_low", "ci_high", "diff", "p")} for r in by_ops]))
        notes = []
        unanswered = [r for r in items if not r["answered"]]
        if unanswered:
            notes.append(f"{len(unanswered)} generation(s) ended without an answer (no '#' within the token limit), "
                         f"counted wrong; e.g. {unanswered[0]['method']}@{unanswered[0]['keep']:g}: "
                         f"{unanswered[0]['output'][:60]!r}")
        return StudyResult([Part("accuracy and length per gamma", hyp, table, verdict)], tables, notes)


STUDY = ReasoningLengthStudy()
