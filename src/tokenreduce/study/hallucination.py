"""The ``hallucination`` study: does text-guided visual token reduction make the small VLM name fewer digits
that are not there?

**Hypothesis** (stated before the run). On the small LLaVA-style VLM of this project, describing digit scenes of
rising clutter (more digits, busier photo backgrounds: :data:`CLUTTER`), text-guided reduction -- FastV, SparseVLM
and PyramidDrop, which rank visual tokens by the text's attention inside the LLM -- lowers the share of
descriptions that name a digit absent from the scene (CHAIR_s, Rohrbach et al. 2018) against the unreduced model
at keep 0.5, 0.25 or 0.1; diversity/pooling reduction (DivPrune, average pooling) does not. The question-aware
before-LLM variant the issue also names is TRIM (``trim``: the visual tokens most similar to the question's
embeddings, the rest averaged into one), added to the text-guided group when it was registered (after the first
CHAIR run on the default model, which therefore has three text-guided methods). VisionZip, HiPrune, ToDRE and
random are run and reported outside the hypothesis.

**Test.** Per clutter level, every (method, keep) is paired with the unreduced model on the same scenes: CHAIR_s
with a Wilson 95% CI, the difference with a paired-bootstrap CI, the exact McNemar test, Holm's adjustment over
the text-guided and diversity/pooling conditions. *Supported*: some text-guided condition significantly lower,
none significantly higher, and no diversity/pooling condition significantly lower; *mixed*: some lower but one of
the others holds; *not supported*: no text-guided condition significantly lower. No verdict under 39 scenes per
condition. Reported beside it: CHAIR_i (per mention, bootstrap CI) and recall (digits present that are named), so
that "says less" is not mistaken for "hallucinates less".

**POPE** (Li et al. 2023): existence questions ``is there the digit 7 ?`` with absent digits drawn at random, by
frequency and adversarially (look-alike digits): accuracy, precision and yes-rate. The default small VLM was never
trained on existence questions (its question types: identity, counting, spatial, comparison, detail, describe), so
by default (``pope="diagnostic"``) only the unreduced model is asked, to show what it answers. ``--set
model=existence`` uses the VLM whose warm restart also trained them (``tokenreduce train vlm --existence``; absent
digits drawn uniformly in training, never the look-alike or frequency draws of the probes); ``--set
model=existence-rationale`` the one trained to write the scene's description before the yes/no (``tokenreduce
train vlm --existence --existence-rationale``; only the final yes/no is scored), ``existence-rationale-text`` the
same with text-only existence turns in every batch (``... --existence-text 8``): none of these three learned the
type (held-out accuracy 0.47-0.53). ``--set model=existence-lookup`` is the one that did (0.945): it writes the
asked digit and its place before the yes/no (``7 center , yes``, absent ``7 , no``; ``tokenreduce train vlm
--existence --existence-lookup``; only the final yes/no is scored). ``--set pope=all`` runs every condition (what
``--smoke`` does); the same hypothesis and test apply to POPE accuracy per setting.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

from ..bench.sweep import CachedLoader, Cell, Sweep, budget_tuple, method_cells
from .analysis import BASELINE, Hypothesis, Metric, compare, decide
from .registry import Part, Study, StudyResult

__all__ = ["CLUTTER", "CONTRAST", "STUDY", "TEXT_GUIDED", "HallucinationConfig", "HallucinationStudy"]

TEXT_GUIDED = ("fastv", "sparsevlm", "pdrop", "trim")
CONTRAST = ("divprune", "pool")
#: clutter level -> SceneConfig overrides (the model was trained on "low": 2-4 digits, amplitude 0.03-0.08)
CLUTTER: dict[str, dict[str, Any]] = {
    "low": {},
    "medium": {"n_digits": (4, 6), "background_amplitude": (0.08, 0.15)},
    "high": {"n_digits": (6, 8), "background_amplitude": (0.15, 0.25), "background_level": (0.2, 0.45)},
}
POPE_MODES = ("diagnostic", "all", "off")
#: which cached small VLM answers -> its VLMTrainConfig overrides (each one a `tokenreduce train vlm` flag of
#: the same name): the default; the one whose warm restart also trained existence questions; the same with the
#: scene's description as their rationale (``3 top left , 7 center , yes``); with 8 text-only sequences of
#: such turns per batch (the match step without the image); and with the asked digit's place as the rationale
#: (``7 center , yes``, absent ``7 , no``)
_VLM_VARIANTS: dict[str, dict[str, Any]] = {
    "default": {},
    "existence": {"existence": True},
    "existence-rationale": {"existence": True, "existence_rationale": True},
    "existence-rationale-text": {"existence": True, "existence_rationale": True, "existence_text": 8},
    "existence-lookup": {"existence": True, "existence_lookup": True},
}
VLM_MODELS = tuple(_VLM_VARIANTS)
DESCRIBE = "describe the image ."


@dataclass
class HallucinationConfig:
    """Defaults: the full size of the issue (every visual method, keeps 0.5/0.25/0.1, three clutter levels)."""

    methods: tuple[str, ...] = ("fastv", "sparsevlm", "pdrop", "trim", "divprune", "pool", "visionzip", "hiprune",
                                "todre", "random")
    keeps: tuple[float, ...] = (0.5, 0.25, 0.1)
    clutter: tuple[str, ...] = ("low", "medium", "high")
    n_scenes: int = 200
    describe_tokens: int = 40
    pope: str = "diagnostic"
    pope_per_scene: int = 2
    model: str = "default"
    batch: int = 50
    threads: int = 1
    seed: int = 4242
    max_halfwidth: float = 0.15


def vlm_config(model: str) -> Any:
    """The training configuration of the cached small VLM ``model`` (:data:`VLM_MODELS`)."""
    from ..bench.args import check_choice
    from ..models.vlm import VLMTrainConfig

    check_choice(model, VLM_MODELS, "model")
    return VLMTrainConfig(**_VLM_VARIANTS[model])


def load_vlm(name: str) -> tuple[Any, Any, Any]:
    """(model, tokenizer, scene config): the cached small VLM ``small-vlm/<checkpoint>[:<model>]`` (no suffix:
    the default), or the smoke VLM (``"smoke"``)."""
    from ..bench.smoke import SMOKE_MODEL, smoke_vlm, smoke_vlm_config

    if name == SMOKE_MODEL:
        model, tok, _ = smoke_vlm(1)
        return model, tok, smoke_vlm_config().scene
    from ..models.vlm import load_small_vlm

    model, tok, info = load_small_vlm(config=vlm_config(name.split(":", 1)[1] if ":" in name else "default"))
    return model.eval(), tok, info["config"].scene


@functools.lru_cache(maxsize=8)
def _scenes(scene_cfg: Any, clutter: str, n: int, seed: int) -> tuple[Any, Any]:
    from ..data.vqa import generate_scenes

    images, scenes, _ = generate_scenes("test", n, seed, dataclasses.replace(scene_cfg, **CLUTTER[clutter]))
    return images, scenes


def _describe(model: Any, tok: Any, images: Any, cfg: HallucinationConfig) -> list[list[str]]:
    import torch

    from ..data.vqa import VOCAB
    from ..models.vlm import encode_prompts, prompt_format

    out: list[list[str]] = []
    for i in range(0, len(images), cfg.batch):
        img = images[i: i + cfg.batch]
        batch = encode_prompts(tok, [DESCRIBE] * len(img), img, model.config.image_seq_length,
                               prompt=prompt_format(model))
        with torch.no_grad():
            gen = model.generate(**batch, max_new_tokens=cfg.describe_tokens, do_sample=False)
        out += [[VOCAB[t] for t in row] for row in gen[:, batch["input_ids"].shape[1]:].tolist()]
    return out


def _pope(model: Any, tok: Any, images: Any, scenes: Any, cfg: HallucinationConfig) -> list[dict[str, Any]]:
    import torch

    from ..data.existence import POPE_SETTINGS, pope_probes
    from ..data.vqa import QA
    from ..models.vlm import answer_questions

    rows = []
    for setting in POPE_SETTINGS:
        probes = pope_probes(scenes, setting, cfg.pope_per_scene, cfg.seed)
        qas = [QA(p.scene, "existence", p.question, p.answer) for p in probes]
        with torch.no_grad():
            answers = answer_questions(model, tok, images, qas, batch_size=cfg.batch)
        rows += [{"part": "pope", "setting": setting, "item": f"{p.scene}-{p.digit}", "digit": p.digit,
                  "label": p.answer, "answer": a, "correct": a == p.answer, "said_yes": a == "yes"}
                 for p, a in zip(probes, answers)]
    return rows


def _items(model: Any, tok: Any, scene_cfg: Any, cfg: HallucinationConfig, clutter: str, pope: bool
           ) -> list[dict[str, Any]]:
    from ..data.existence import chair_scores

    images, scenes = _scenes(scene_cfg, clutter, cfg.n_scenes, cfg.seed)
    rows = []
    for i, (words, s) in enumerate(zip(_describe(model, tok, images, cfg), scenes)):
        c = chair_scores(words, s)
        text = " ".join(words[: words.index("</s>")] if "</s>" in words else words)
        rows.append({"part": "describe", "item": i, "output": text, "hallucinated": c["hallucinated"] > 0,
                     "chair_i": [c["hallucinated"], c["mentions"]], "recall": [c["named_present"], c["present"]],
                     "n_digits": s.count})
    if pope:
        rows += _pope(model, tok, images, scenes, cfg)
    return rows


def run_hallucination_cell(ctx: tuple[Any, Any, Any], cell: Cell) -> list[dict[str, Any]]:
    import tokenreduce as tr

    from ..bench.timing import fixed_threads

    model, tok, scene_cfg = ctx
    s = cell.settings
    cfg = HallucinationConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in s["config"].items()})
    clutter = s["clutter"]
    pope = cfg.pope == "all" or (cfg.pope == "diagnostic" and cell.method == BASELINE)
    head = {"clutter": clutter, "method": cell.method}
    with fixed_threads(cfg.threads):
        if cell.method == BASELINE:
            return [{**head, "keep": 1.0, **r} for r in _items(model, tok, scene_cfg, cfg, clutter, pope)]
        rows = []
        for keep in budget_tuple(cell.keep):
            try:
                with tr.apply(model, cell.method, keep=keep) as h:
                    items = _items(model, tok, scene_cfg, cfg, clutter, pope)
                    achieved = h.stats.keep_achieved
            except (ValueError, RuntimeError) as e:  # a keep this method's schedule cannot reach
                rows.append({**head, "keep": keep, "part": "describe", "item": None, "error": str(e)})
                continue
            rows += [{**head, "keep": keep, "keep_achieved": achieved, **r} for r in items]
        return rows


class HallucinationStudy(Study):
    __doc__ = __doc__
    name = "hallucination"
    config = HallucinationConfig
    smoke: ClassVar[dict[str, Any]] = {"methods": ("fastv", "divprune"), "keeps": (0.5,), "clutter": ("high",),
             "n_scenes": 4, "describe_tokens": 8, "pope": "all", "pope_per_scene": 1, "batch": 4}

    def missing_models(self, cfg: HallucinationConfig) -> list[str]:
        from ..bench.args import check_choice
        from ..models.vlm import checkpoint_dir

        check_choice(cfg.model, VLM_MODELS, "model")
        path = checkpoint_dir(vlm_config(cfg.model)) / "model.pt"
        flags = [f"--{k.replace('_', '-')}" + ("" if v is True else f" {v}") for k, v in _VLM_VARIANTS[cfg.model].items()]
        cmd = " ".join(["tokenreduce train vlm", *flags])
        return [] if path.is_file() else [f"the small VLM is not cached ({path}): build it with `{cmd}`"]

    def sweep(self, cfg: HallucinationConfig, smoke: bool) -> Sweep:
        from ..bench.args import check_choice, check_methods, parse_keeps
        from ..bench.smoke import cell_model

        check_methods(cfg.methods, "vlm-visual", "methods")
        parse_keeps(cfg.keeps, "keeps")
        check_choice(cfg.pope, POPE_MODES, "pope")
        check_choice(cfg.model, VLM_MODELS, "model")
        for c in cfg.clutter:
            check_choice(c, tuple(CLUTTER), "clutter")

        def real() -> str:
            from ..models.vlm import checkpoint_dir

            suffix = "" if cfg.model == "default" else f":{cfg.model}"  # the default's cell ids predate the choice
            return f"small-vlm/{checkpoint_dir(vlm_config(cfg.model)).name}{suffix}"

        name = cell_model(smoke, False, real)
        conf = {k: v for k, v in dataclasses.asdict(cfg).items() if k not in ("methods", "keeps", "clutter",
                                                                               "max_halfwidth", "model")}
        cells: list[Cell] = []
        for c in cfg.clutter:
            cells += method_cells("study/hallucination", name, cfg.methods, lambda m: [tuple(cfg.keeps)], "accuracy",
                                  {"clutter": c, "config": conf}, {}, {})
        return Sweep("study/hallucination", cells, CachedLoader(load_vlm), run_hallucination_cell,
                     meta={"bench": "study/hallucination", "study": self.name}, cpus_per_cell=float(cfg.threads))

    def analyse(self, rows: list[dict[str, Any]], cfg: HallucinationConfig) -> StudyResult:
        def treated(r: dict[str, Any]) -> bool:
            return r["method"] in TEXT_GUIDED

        def contrast(r: dict[str, Any]) -> bool:
            return r["method"] in CONTRAST

        desc = [r for r in rows if r.get("part") == "describe"]
        chair = Hypothesis(
            "text-guided reduction (FastV, SparseVLM, PyramidDrop, TRIM) lowers CHAIR_s of the small VLM's scene "
            "descriptions against the unreduced model; diversity/pooling (DivPrune, pooling) does not",
            "per clutter level, paired with the unreduced model on the same scenes: Wilson 95% CI, paired-bootstrap "
            "CI of the difference, exact McNemar test, Holm over the text-guided and diversity/pooling conditions",
            Metric("hallucinated", "proportion", False, "CHAIR_s"), treated, contrast, max_halfwidth=cfg.max_halfwidth)
        t1 = compare(desc, chair.metric, strata=("clutter",), seed=cfg.seed % 2**32)
        parts = [Part("hallucination in descriptions (CHAIR_s)", chair, t1, decide(t1, chair, ("clutter",)),
                      ("clutter",))]
        tables = [(f"{name} per clutter level", _short(compare(desc, Metric(field, "ratio", better, name),
                                                               strata=("clutter",), seed=cfg.seed)))
                  for field, better, name in (("chair_i", False, "CHAIR_i"), ("recall", True, "recall"))]
        pope = [r for r in rows if r.get("part") == "pope"]
        notes = []
        if any(r["method"] != BASELINE for r in pope):
            ph = Hypothesis("text-guided reduction raises POPE accuracy; diversity/pooling does not",
                            "per (clutter, setting), paired: Wilson CI, paired bootstrap, exact McNemar, Holm",
                            Metric("correct", "proportion", True, "POPE accuracy"), treated, contrast,
                            max_halfwidth=cfg.max_halfwidth)
            t2 = compare(pope, ph.metric, strata=("clutter", "setting"), seed=cfg.seed)
            parts.append(Part("existence questions (POPE)", ph, t2, decide(t2, ph, ("clutter", "setting")),
                              ("clutter", "setting")))
        elif pope:
            notes.append("POPE: the cached small VLM was not trained on existence questions; only the unreduced "
                         "model was asked (diagnostic table), no verdict. Train a model with the type, then "
                         "--set pope=all.")
        if pope:
            tables.append(("POPE: accuracy, precision and yes-rate", pope_summary(pope)))
        tables.append(("example descriptions (first 3 scenes, unreduced model)",
                       [{k: r[k] for k in ("clutter", "item", "output", "n_digits")} for r in desc
                        if r["method"] == BASELINE and isinstance(r["item"], int) and r["item"] < 3]))
        errors = [r for r in rows if r.get("error")]
        if errors:
            notes.append(f"{len(errors)} condition(s) failed, e.g. {errors[0]['method']}@{errors[0]['keep']}: "
                         f"{errors[0]['error']}")
        return StudyResult(parts, tables, notes)


def pope_summary(rows: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """POPE's three numbers per (clutter, setting, method, keep): accuracy, precision of ``yes``, yes-rate."""
    groups: dict[tuple[Any, ...], list[dict[str, Any]]] = {}
    for r in rows:
        groups.setdefault((r["clutter"], r["setting"], r["method"], r["keep"]), []).append(r)
    out = []
    for (c, s, m, k), rs in groups.items():
        yes = [r for r in rs if r["said_yes"]]
        out.append({"clutter": c, "setting": s, "method": m, "keep": k, "n": len(rs),
                    "accuracy": sum(r["correct"] for r in rs) / len(rs),
                    "precision": sum(r["label"] == "yes" for r in yes) / len(yes) if yes else None,
                    "yes_rate": len(yes) / len(rs),
                    "answers": ", ".join(f"{a}:{n}" for a, n in sorted(_count(r["answer"] for r in rs).items()))})
    return out


def _count(xs: Any) -> dict[str, int]:
    from collections import Counter

    return dict(Counter(xs))


def _short(table: list[dict[str, Any]]) -> list[dict[str, Any]]:
    drop = ("test",)
    return [{k: v for k, v in r.items() if k not in drop} for r in table]


STUDY = HallucinationStudy()
