"""`tokenreduce bench vlm`: visual token reduction on the small LLaVA-style VLM (digit-scene VQA).

For every (method, keep) -- and (method, preset) for the named presets asked for, e.g. ``"paper"`` -- the run
measures, in one process:

* accuracy per question type (greedy ``generate``, the answer word after any rationale) on the held-out test questions, and
  agreement with the unreduced model's answers;
* analytic prefill FLOPs (vision tower + projector + LLM layers from the real per-layer token counts in
  ``Handle.stats``; scoring overhead excluded and reported as time) and decode FLOPs per token, the
  LLM's visual tokens averaged over layers, KV-cache bytes actually allocated;
* wall-clock of the prefill (one forward with cache) and of ``generate`` of a fixed number of tokens, on one
  batch, interleaved round-robin with the unreduced model (paired per-round speedups); ``clock="cpu"``
  (one thread) times process CPU seconds instead, immune to time slices lost to other processes, and
  ``malloc="retain"`` keeps freed memory in the heap (no page fault per fresh activation; as ``bench vit``);
* peak tensor memory of the prefill (exact allocation tracking, :func:`~tokenreduce.accounting.memory.peak_memory`).

``keep`` is the integration point's one meaning (the fraction of the visual-token work in the LLM kept); every
row records the requested ``keep`` (None for a preset whose budget is in the method's own terms) and the
``keep_achieved`` of the timed batch's prefill (``Handle.stats``). Method names, keeps and presets are checked
before any model loads (:func:`check_plan`).

Results: JSONL (with hardware/software metadata), plots (accuracy per type vs keep, accuracy vs measured
prefill speedup and vs FLOPs, and the patches each method keeps on one scene) and a self-contained HTML report.
"""

from __future__ import annotations

import copy
import functools
import json
from collections.abc import Callable, Collection, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

import tokenreduce as tr

from ..accounting.flops import vlm_prefill_flops
from ..accounting.memory import peak_memory
from ..core.errors import suggest
from ..registry import get_method
from .args import check_choice, check_device, check_methods, parse_keeps, split_list
from .smoke import SMOKE_MODEL, cell_model, resolve_model, smoke_vlm, smoke_vlm_config
from .sweep import (
    PARTS,
    CachedLoader,
    Cell,
    Sweep,
    budget_tuple,
    finished_cells,
    method_cells,
    run_sweep,
    without_metadata,
)
from .sweep.options import sweep_options
from .timing import CLOCKS, fixed_threads, interleaved, retain_freed_memory, speedup, timing_clock
from .vlm_report import kept_for_viz, vlm_report

__all__ = ["SMOKE", "OnDevice", "VlmBenchConfig", "VlmContext", "check_plan", "load_vlm_context", "register_cli",
           "run_vlm_bench", "run_vlm_cell", "vlm_sweep"]

VLM = "vlm-visual"
DEFAULT_METHODS = ("visionzip", "divprune", "hiprune", "pool", "random", "fastv", "sparsevlm", "pdrop", "todre")
DEFAULT_KEEPS = (1.0, 0.5, 0.25, 0.1, 0.05)


@dataclass
class VlmBenchConfig:
    methods: Sequence[str] = DEFAULT_METHODS
    keeps: Sequence[float] = DEFAULT_KEEPS
    presets: Sequence[str] = ()
    per_type: int = 100
    eval_batch: int = 50
    time_batch: int = 8
    gen_tokens: int = 8
    warmup: int = 1
    repeats: int = 5
    threads: int = 1
    clock: str = "wall"
    malloc: str = "retain"
    out: str = "results/vlm"
    viz_keep: float = 0.25
    method_kw: dict[str, dict[str, Any]] = field(default_factory=dict)
    parts: str = "all"
    device: str = "cpu"
    smoke: bool = False


#: ``--smoke``: a tiny random-weight small VLM, 2 questions per type, 3 methods x 2 keeps + FastV's paper preset
SMOKE = {"methods": ("visionzip", "fastv", "random"), "keeps": (1.0, 0.5), "presets": ("paper",), "per_type": 2,
         "eval_batch": 10, "time_batch": 2, "gen_tokens": 2, "repeats": 2}


# ---------------------------------------------------------------------------- what to run
def check_plan(methods: Sequence[str], keeps: Sequence[float] | str, presets: Sequence[str] = ()) -> list[float]:
    """The keeps as fractions, or a one-line ValueError (before any model loads) unless every method is a
    registered VLM method, every keep a fraction in (0, 1] (at least one unless presets are given) and every
    preset defined for at least one of the methods."""
    if not methods:
        raise ValueError("methods: give at least one method (tokenreduce list --integration vlm)")
    check_methods(methods, VLM, "methods")
    keeps = parse_keeps(keeps, "keeps") if len(keeps) or not presets else []
    offered = sorted({p for m in methods for p in get_method(m, VLM).presets})
    for p in presets:
        if p not in offered:
            raise ValueError(f"presets: unknown preset {p!r}{suggest(p, offered)} for {', '.join(methods)}; "
                             f"accepted: {', '.join(offered) or 'none'}")
    return keeps


def _row_keep(method: str, keep: float | None, preset: str | None) -> dict[str, Any]:
    """The requested budget of a row: ``keep`` (a preset's own keep when it is a fraction) and ``preset``."""
    if preset is None:
        return {"keep": keep}
    spec = get_method(method, VLM).presets.get(preset, {})
    k = spec.get("keep")
    return {"keep": k if isinstance(k, float) else None, "preset": preset, "keep_spec": repr(k)}


# ---------------------------------------------------------------------------- helpers
def _answers(model: nn.Module, tok: Any, data: Any, batch: int) -> list[str]:
    from ..models.vlm import answer_questions

    return answer_questions(model, tok, data.images, data.qas, batch_size=batch, generate=True)


def _accuracy(preds: Sequence[str], data: Any) -> dict[str, float]:
    per: dict[str, list[int]] = {}
    for qa, p in zip(data.qas, preds):
        per.setdefault(qa.qtype, []).append(int(p == qa.answer))
    out = {f"acc_{k}": sum(v) / len(v) for k, v in per.items()}
    out["accuracy"] = sum(map(sum, per.values())) / max(1, len(preds))
    return out


def _time_batch(tok: Any, data: Any, n: int, n_img_tokens: int, fmt: str = "image_first") -> dict[str, torch.Tensor]:
    from ..models.vlm import encode_prompts

    qas = data.qas[:n]
    return encode_prompts(tok, [q.question for q in qas], data.images[[q.scene for q in qas]], n_img_tokens,
                          prompt=fmt)


# ---------------------------------------------------------------------------- the model a cell runs on
class OnDevice(nn.Module):
    """The model with its inputs moved to its device first (the evaluation helpers build CPU batches)."""

    def __init__(self, model: nn.Module, device: str) -> None:
        super().__init__()
        self.inner, self.device_name = model, device
        self.config = model.config

    def _move(self, kw: dict[str, Any]) -> dict[str, Any]:
        return {k: v.to(self.device_name) if isinstance(v, torch.Tensor) else v for k, v in kw.items()}

    def forward(self, **kw: Any) -> Any:
        return self.inner(**self._move(kw))

    def generate(self, **kw: Any) -> Any:
        return self.inner.generate(**self._move(kw))


@dataclass
class VlmContext:
    """What every cell of one model shares in a worker: the model, tokenizer, test questions, the timing
    batch, and (computed on first use) the unreduced model's answers."""

    model: nn.Module
    tokenizer: Any
    data: Any
    time_batch: int
    gen_tokens: int
    eval_batch: int
    device: str = "cpu"

    def __post_init__(self) -> None:
        from ..models.vlm import prompt_format

        self.tb = _time_batch(self.tokenizer, self.data, self.time_batch, self.model.config.image_seq_length,
                              prompt_format(self.model))
        self.tb = {k: v.to(self.device) for k, v in self.tb.items()}
        self.prompt_tokens = float(self.tb["attention_mask"].sum(1).float().mean())
        self.gen_kw = {"max_new_tokens": self.gen_tokens, "min_new_tokens": self.gen_tokens, "do_sample": False}
        self.answering = self.model if self.device == "cpu" else OnDevice(self.model, self.device)
        self._base: tuple[list[str], dict[str, Any], int] | None = None

    @property
    def base(self) -> tuple[list[str], dict[str, Any], int]:
        """The unreduced model's answers, prefill FLOPs and KV bytes."""
        if self._base is None:
            pred = _answers(self.answering, self.tokenizer, self.data, self.eval_batch)
            self.model(**self.tb, use_cache=True)
            self._base = (pred, vlm_prefill_flops(self.model, None, self.prompt_tokens), _kv_bytes(self.model, self.tb))
        return self._base


def _small_vlm_name() -> str:
    from ..models.vlm import VLMTrainConfig, checkpoint_dir

    return f"small-vlm/{checkpoint_dir(VLMTrainConfig()).name}"


def _small_vlm(per_type: int) -> tuple[nn.Module, Any, Any]:
    from ..models.vlm import eval_set, load_small_vlm

    model, tokenizer, info = load_small_vlm()
    return model, tokenizer, eval_set("test", info["config"], per_type=per_type)


def load_vlm_context(name: str, per_type: int, time_batch: int, gen_tokens: int, eval_batch: int,
                     device: str = "cpu", retain: bool = False, model: nn.Module | None = None,
                     tokenizer: Any = None, data: Any = None) -> VlmContext:
    """The context of model ``name``: the small VLM and its test set, the smoke VLM (``"smoke"``) or the given
    ``model``/``tokenizer``/``data``; on ``device``; ``retain``: keep freed memory in this process."""
    model, tokenizer, data = resolve_model(name, (model, tokenizer, data), lambda: smoke_vlm(per_type),
                                           lambda: _small_vlm(per_type), retain)
    return VlmContext(model.eval().to(device), tokenizer, data, time_batch, gen_tokens, eval_batch, device)


def _model_info(name: str, train_if_missing: bool, model: nn.Module | None) -> dict[str, Any]:
    """Metrics, path and prompt format of the model, read without loading its weights (the small VLM is
    trained first when missing and ``train_if_missing``; else the loader's FileNotFoundError)."""
    from ..models.vlm import VLMTrainConfig, checkpoint_dir, load_small_vlm, prompt_format

    if model is not None:
        return {"prompt": prompt_format(model)}
    if name == SMOKE_MODEL:
        return {"prompt": smoke_vlm_config().prompt}
    path = checkpoint_dir(VLMTrainConfig()) / "model.pt"
    if not path.is_file():
        load_small_vlm(train_if_missing=train_if_missing)
    mp = path.with_name("metrics.json")
    return {"prompt": VLMTrainConfig().prompt, "path": path,
            "metrics": json.loads(mp.read_text()) if mp.is_file() else {}}


# ---------------------------------------------------------------------------- one cell
def _budget(b: Any) -> tuple[float | None, str | None]:
    """A cell's budget: a keep (float) or a preset (its name)."""
    return (None, b) if isinstance(b, str) else (b, None)


def _base_row(ctx: VlmContext) -> dict[str, Any]:
    model, tb = ctx.model, ctx.tb
    base_pred, base_fl, base_kv = ctx.base
    return {"method": "none", "keep": 1.0, "keep_achieved": 1.0, **_accuracy(base_pred, ctx.data), "agreement": 1.0,
            "gflops": base_fl["gflops"], "flops_ratio": 1.0, "decode_gflops": base_fl["decode_gflops"],
            "visual_tokens_avg": float(model.config.image_seq_length), "llm_input_tokens": ctx.prompt_tokens,
            "kv_bytes": base_kv, "peak_mem_mb": peak_memory(lambda: model(**tb, use_cache=True)) / 2**20}


def _accuracy_rows(ctx: VlmContext, method: str, budgets: Sequence[Any], kw: dict[str, Any]
                   ) -> tuple[list[dict[str, Any]], dict[tuple[Any, str | None], dict[str, Any]]]:
    """Error rows and ``{(keep, preset): row}``: answers, FLOPs, visual tokens, KV bytes, peak memory."""
    model, tb, data = ctx.model, ctx.tb, ctx.data
    base_pred, base_fl, base_kv = ctx.base
    errors, per_keep = [], {}
    for keep, preset in map(_budget, budgets):
        row = {"method": method, **_row_keep(method, keep, preset)}
        try:
            with tr.apply(model, method, keep=keep, preset=preset, **kw) as h:
                pred = _answers(ctx.answering, ctx.tokenizer, data, ctx.eval_batch)
                model(**tb, use_cache=True)
                st = h.stats
                mem = peak_memory(lambda: model(**tb, use_cache=True)) / 2**20
        except (ValueError, RuntimeError) as e:  # e.g. a keep this method's schedule cannot reach
            row.update({"keep_achieved": None, "error": str(e)})
            errors.append(row)
            continue
        fl = vlm_prefill_flops(model, st, ctx.prompt_tokens)
        row.update({"keep_achieved": st.keep_achieved, **_accuracy(pred, data),
                    "agreement": sum(a == b for a, b in zip(pred, base_pred)) / max(1, len(pred)),
                    "gflops": fl["gflops"], "flops_ratio": base_fl["total"] / fl["total"],
                    "decode_gflops": fl["decode_gflops"],
                    "visual_tokens_avg": sum(st.visual_tokens) / max(1, len(st.visual_tokens)),
                    "visual_tokens_in": st.visual_input, "visual_tokens_last": st.visual_tokens[-1],
                    "llm_input_tokens": st.llm_input_tokens, "kv_bytes": st.kv_bytes,
                    "kv_ratio": st.kv_bytes / base_kv if base_kv else None, "peak_mem_mb": mem,
                    "tokens_attn": st.tokens_attn, "visual_tokens": st.visual_tokens, "notes": st.notes})
        per_keep[keep, preset] = row
    return errors, per_keep


def run_vlm_cell(ctx: VlmContext, cell: Cell) -> list[dict[str, Any]]:
    """The rows of one cell: the unreduced model's (timed alone in a timing cell), or a method's at the cell's
    budgets (accuracy; with ``cell.timing`` one interleaved timing group; in the timing part on the accuracy
    rows given)."""
    s = dict(cell.settings)
    given = without_metadata(list(cell.given))
    with fixed_threads(s["threads"]), torch.no_grad():
        if cell.method == "none":
            row = given[0] if given else _base_row(ctx)
            for k in _BASE_TIMING:  # a timing cell re-measures the unreduced model
                row.pop(k, None)
            if cell.timing:
                _time_base(ctx, row, s)
            return [row]
        kw = dict(s["method_kw"])
        if given:
            errors = [r for r in given if "error" in r]
            per_keep = {(None if r.get("preset") else r["keep"], r.get("preset")): r for r in given if "error" not in r}
        else:
            errors, per_keep = _accuracy_rows(ctx, cell.method, budget_tuple(cell.keep), kw)
        if cell.timing and per_keep:
            _time_method(ctx, cell.method, kw, per_keep, s)
    return errors + list(per_keep.values())


# ---------------------------------------------------------------------------- the benchmark
def vlm_sweep(cfg: VlmBenchConfig, model: nn.Module | None = None, tokenizer: Any = None, data: Any = None,
              finished: Collection[str] = ()) -> Sweep:
    """The benchmark as a grid of cells (:func:`~tokenreduce.bench.sweep.method_cells`; the unreduced model is
    timed alone), its loader and cell function."""
    name = cell_model(cfg.smoke, model is not None, _small_vlm_name)
    accuracy = {"per_type": cfg.per_type, "eval_batch": cfg.eval_batch, "time_batch": cfg.time_batch,
                "threads": cfg.threads, "device": cfg.device}
    timing = {"gen_tokens": cfg.gen_tokens, "warmup": cfg.warmup, "repeats": cfg.repeats, "clock": cfg.clock,
              "malloc": cfg.malloc}

    def budgets(method: str) -> list[Any]:
        return [*cfg.keeps, *(p for p in cfg.presets if p in get_method(method, VLM).presets)]

    cells = method_cells("vlm", name, cfg.methods, budgets, cfg.parts, accuracy, timing, cfg.method_kw, finished,
                         time_base=True)
    load = CachedLoader(functools.partial(
        load_vlm_context, per_type=cfg.per_type, time_batch=cfg.time_batch, gen_tokens=cfg.gen_tokens,
        eval_batch=cfg.eval_batch, device=cfg.device, retain=cfg.malloc == "retain" and cfg.parts != "accuracy",
        model=model, tokenizer=tokenizer, data=data))
    return Sweep("vlm", cells, load, run_vlm_cell, cpus_per_cell=cfg.threads,
                 gpus_per_cell=1.0 if cfg.device == "cuda" else 0.0)


def run_vlm_bench(methods: Sequence[str] = DEFAULT_METHODS, keeps: Sequence[float] = DEFAULT_KEEPS,
                  presets: Sequence[str] = (), out: str = "results/vlm", per_type: int = 100, repeats: int = 5, warmup: int = 1,
                  time_batch: int = 8, gen_tokens: int = 8, threads: int = 1, eval_batch: int = 50,
                  train_if_missing: bool = False, model: nn.Module | None = None, tokenizer: Any = None,
                  data: Any = None, progress: bool = True, method_kw: dict[str, dict[str, Any]] | None = None,
                  viz_keep: float = 0.25, parts: str = "all", clock: str = "wall",
                  malloc: str = "retain", device: str = "cpu", smoke: bool = False, executor: str = "local",
                  address: str | None = None, resume: bool = True) -> list[dict[str, Any]]:
    """Run the VLM benchmark; returns the result rows (also written to ``out/results.jsonl``).

    ``keeps``: fractions of the visual-token work; ``presets``: named method settings (``tokenreduce list
    NAME``) run as extra rows for the methods that define them (``preset`` column).

    ``parts``: "all" (one process measures everything), "accuracy" (everything but wall-clock: run it at low
    priority, or spread over a cluster) or "timing" (wall-clock only, for the (method, keep) rows of the
    accuracy cells in ``out/results.jsonl`` with the settings of the last "accuracy" run there, which it copies
    with the timing columns added: run it alone, e.g. under a lock, on a shared machine). ``model``/
    ``tokenizer``/``data`` override the trained small VLM and its test set (tests use tiny ones); ``smoke``
    uses a tiny random-weight small VLM and :data:`SMOKE`'s settings. ``clock``: "wall" or "cpu" (process CPU
    seconds; needs ``threads=1``); ``malloc``: "retain" (keep freed memory in the heap for the whole process,
    recorded as ``allocator``) or "default". ``device``: "cpu" or "cuda" (CUDA events). ``executor``: "local"
    or "ray" (``address``: an existing cluster); ``resume``: skip the cells already in the results file.
    """
    if smoke:
        methods, keeps, presets, per_type, eval_batch, time_batch, gen_tokens, repeats = (SMOKE[k] for k in (
            "methods", "keeps", "presets", "per_type", "eval_batch", "time_batch", "gen_tokens", "repeats"))
    # every check before anything is loaded or written
    keeps = check_plan(methods, keeps, presets)
    check_choice(parts, PARTS, "parts")
    check_choice(clock, sorted(CLOCKS), "clock")
    if clock == "cpu" and threads != 1:
        raise ValueError(f"clock='cpu' measures one thread's compute and needs threads=1, got threads={threads}")
    check_choice(malloc, ("retain", "default"), "malloc")
    check_device(device)
    timing_clock(clock, device)
    cfg = VlmBenchConfig(methods=list(methods), keeps=list(keeps), presets=list(presets), per_type=per_type, eval_batch=eval_batch,
                         time_batch=time_batch, gen_tokens=gen_tokens, warmup=warmup, repeats=repeats,
                         threads=threads, clock=clock, malloc=malloc, out=out, viz_keep=viz_keep,
                         method_kw=method_kw or {}, parts=parts, device=device, smoke=smoke)
    outdir = Path(out)
    results = outdir / "results.jsonl"
    finished: Collection[str] = ()
    if parts == "timing":
        finished = _adopt_accuracy_run(cfg, results)
    info = _model_info(cell_model(smoke, model is not None, _small_vlm_name), train_if_missing, model)
    if info["prompt"] == "question_first":  # SparseVLM's raters must see the question
        cfg.method_kw.setdefault("sparsevlm", {}).setdefault("raters_from", "all_text")
    sweep = vlm_sweep(cfg, model, tokenizer, data, finished)
    allocator = retain_freed_memory() if malloc == "retain" and parts != "accuracy" else "default"
    sweep.meta = {"bench": "vlm", "parts": parts, "config": asdict(cfg), "allocator": allocator,
                  "model_metrics": {k: v for k, v in info.get("metrics", {}).items() if k != "history"},
                  "model_path": str(info.get("path", ""))}
    # the timing part measures again whenever it runs (that is what it is for); the other parts resume
    result = run_sweep(sweep, results, executor=executor, address=address, resume=resume and parts != "timing",
                       progress=progress)
    rows = without_metadata(result.rows)
    ctx = sweep.load(sweep.cells[0].model)  # the viz panel runs here (in process: the model is loaded already)
    viz = {m: kept_for_viz(ctx, m, cfg.viz_keep, cfg.method_kw.get(m, {})) for m in cfg.methods}
    meta = dict(result.meta, n_questions=len(ctx.data.qas),
                questions_per_type={k: len(v) for k, v in ctx.data.by_type().items()})
    vlm_report(rows, outdir, cfg, meta, ctx.data, viz)
    return rows


def _adopt_accuracy_run(cfg: VlmBenchConfig, results: Path) -> set[str]:
    """The timing part measures the accuracy part's rows: it adopts the settings of the last accuracy run in
    ``results`` (per_type, eval_batch, viz_keep, method_kw) and returns the finished cells' ids."""
    from .results import read_runs

    if not results.is_file():
        raise FileNotFoundError(f"parts='timing' needs the rows of an accuracy run in {results}; run parts='accuracy' first")
    runs = [m for m, _ in read_runs(results).values() if m.get("parts") == "accuracy"]
    if not runs:
        raise FileNotFoundError(f"parts='timing' needs the rows of an accuracy run in {results}; run parts='accuracy' first")
    pc = runs[-1].get("config", {})
    for k in ("per_type", "eval_batch", "viz_keep", "method_kw"):
        setattr(cfg, k, pc.get(k, getattr(cfg, k)))
    return set(finished_cells(results))


#: the unreduced row's timing columns (:func:`_time_base`)
_BASE_TIMING = ("prefill_ms", "gen_ms", "prefill_speedup", "gen_speedup")


def _time_base(ctx: VlmContext, row: dict[str, Any], s: dict[str, Any]) -> None:
    """The unreduced model's prefill and generate, interleaved with each other (its speedups are 1)."""
    model, tb = ctx.model, ctx.tb
    t = interleaved({"prefill": lambda: model(**tb, use_cache=True), "gen": lambda: model.generate(**tb, **ctx.gen_kw)},
                    warmup=s["warmup"], repeats=s["repeats"], rotate=True, clock=timing_clock(s["clock"], s["device"]))
    row.update({"prefill_ms": t["prefill"].median * 1e3, "gen_ms": t["gen"].median * 1e3, "prefill_speedup": 1.0,
                "gen_speedup": 1.0})


def _time_method(ctx: VlmContext, method: str, kw: dict[str, Any],
                 per_keep: dict[tuple[Any, str | None], dict[str, Any]], s: dict[str, Any]) -> None:
    """One interleaved timing group per method (unreduced + each keep; prefill and generate); adds the
    timing columns to the rows in ``per_keep``."""
    model, tb, gen_kw = ctx.model, ctx.tb, ctx.gen_kw
    fns: dict[str, Callable[[], Any]] = {"none/prefill": lambda: model(**tb, use_cache=True),
                                         "none/gen": lambda: model.generate(**tb, **gen_kw)}
    copies, overhead = [], {}
    for keep, preset in per_keep:
        label = preset or keep
        m2 = copy.deepcopy(model)
        h2 = tr.apply(m2, method, keep=keep, preset=preset, **kw)
        copies.append(h2)
        sink = overhead.setdefault(label, [])
        fns[f"{label}/prefill"] = _prefill_call(m2, h2, tb, sink)
        fns[f"{label}/gen"] = (lambda m=m2: m.generate(**tb, **gen_kw))
    timings = interleaved(fns, warmup=s["warmup"], repeats=s["repeats"], rotate=True,
                          clock=timing_clock(s["clock"], s["device"]))
    for h2 in copies:
        h2.remove()
    for (keep, preset), row in per_keep.items():
        label = preset or keep
        sp = speedup(timings["none/prefill"], timings[f"{label}/prefill"], paired=True)
        sg = speedup(timings["none/gen"], timings[f"{label}/gen"], paired=True)
        ov = sorted(overhead[label][s["warmup"]:] or [0.0])
        row.update({"prefill_ms": timings[f"{label}/prefill"].median * 1e3,
                    "base_prefill_ms": timings["none/prefill"].median * 1e3,
                    "prefill_speedup": sp.ratio, "prefill_speedup_low": sp.low, "prefill_speedup_high": sp.high,
                    "gen_ms": timings[f"{label}/gen"].median * 1e3,
                    "base_gen_ms": timings["none/gen"].median * 1e3,
                    "gen_speedup": sg.ratio, "gen_speedup_low": sg.low, "gen_speedup_high": sg.high,
                    "overhead_ms": ov[len(ov) // 2] * 1e3})


def _prefill_call(m: nn.Module, h: Any, tb: dict[str, torch.Tensor], sink: list[float]) -> Callable[[], Any]:
    def call() -> Any:
        y = m(**tb, use_cache=True)
        sink.append(h.stats.reduce_seconds)
        return y

    return call


def _kv_bytes(model: nn.Module, tb: dict[str, torch.Tensor]) -> int:
    cache = model(**tb, use_cache=True).past_key_values
    return int(sum(l.keys.numel() * l.keys.element_size() * 2 for l in cache.layers))


def register_cli(bench_app: Any) -> None:
    import typer

    o = sweep_options()

    @bench_app.command("vlm")
    def vlm(
        methods: str = typer.Option(",".join(DEFAULT_METHODS), help="comma-separated method names"),
        keep: str = typer.Option(",".join(str(k) for k in DEFAULT_KEEPS),
                                 help="comma-separated keeps: fractions in (0, 1] of the visual-token work in the LLM"),
        presets: str = typer.Option("", help="comma-separated method presets to run as extra rows, e.g. paper"),
        out: str = typer.Option("results/vlm", help="output directory"),
        per_type: int = typer.Option(100, help="test questions per question type"),
        repeats: int = typer.Option(5, help="timed rounds (interleaved)"),
        time_batch: int = typer.Option(8, help="prompts per timed prefill/generate"),
        gen_tokens: int = typer.Option(8, help="new tokens per timed generate"),
        threads: int = typer.Option(1, help="torch threads (1 is steadiest on a shared 2-core box)"),
        clock: str = typer.Option("wall", help="wall | cpu (process CPU seconds, needs --threads 1: immune to time "
                                               "slices lost to other processes on a shared machine)"),
        malloc: str = typer.Option("retain", help="retain (keep freed memory in the heap: no page fault per fresh "
                                                  "activation) | default"),
        train: bool = typer.Option(False, help="train the small VLM if it is not cached (25-45 min)"),
        parts: str = typer.Option("all", help="all | accuracy (no wall-clock; run niced) | timing (wall-clock for "
                                              "the rows of the last accuracy run in --out; run alone/under a lock)"),
        executor: str = o.executor, address: str = o.address, resume: bool = o.resume, smoke: bool = o.smoke,
        device: str = o.device,
    ) -> None:
        """Visual token reduction on the small VLM: accuracy per question type, agreement, FLOPs, latency, memory."""
        if smoke and out == "results/vlm":
            out = "results/vlm/smoke"
        names, pre = split_list(methods), split_list(presets)
        keeps = parse_keeps(keep) if split_list(keep) or not pre else []
        run_vlm_bench(methods=names, keeps=keeps, presets=pre, out=out, per_type=per_type, repeats=repeats,
                      time_batch=time_batch, gen_tokens=gen_tokens, threads=threads, train_if_missing=train,
                      parts=parts, clock=clock, malloc=malloc, device=device, smoke=smoke, executor=executor,
                      address=address, resume=resume)
