"""`tokenreduce bench vit`: vision methods on the reference ViT, accuracy against measured speed.

For every (method, keep) the run measures, in one process:

* top-1 accuracy and agreement with the unreduced model's predictions on the held-out test images;
* analytic GFLOPs from the real kept token counts (``Handle.stats``) and the FLOPs ratio;
* wall-clock of one batch, interleaved round-robin with the unreduced model and with the
  **zero-overhead limit** — the same blocks run directly on the kept token counts (slicing, no scoring,
  no gathers) — so the speedup, the limit and their ratio share the machine's noise;
* scoring overhead (time inside the method's scoring + reduction) and peak tensor memory.

Results: JSONL (with hardware/software metadata), a Pareto plot (accuracy vs measured speedup) and a
self-contained HTML report.
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
from torch import Tensor, nn

import tokenreduce as tr

from ..accounting.flops import ViTDims, timm_vit_dims
from ..accounting.memory import peak_memory
from .args import check_choice, check_device, check_methods, parse_keeps, split_list
from .report import format_table, html_report, pareto_plot
from .smoke import cell_model, resolve_model, smoke_vit
from .sweep import CachedLoader, Cell, Sweep, finished_cells, run_sweep, without_metadata
from .sweep.grid import PARTS, budget_tuple, method_cells
from .sweep.options import sweep_options
from .timing import fixed_threads, interleaved, retain_freed_memory, speedup, timing_clock

__all__ = ["SMOKE", "VitBenchConfig", "VitContext", "load_vit_context", "register_cli", "run_vit_bench", "run_vit_cell",
           "vit_sweep", "zero_overhead_forward"]

DEFAULT_METHODS = ("tome", "evit", "token-transforming", "cluster", "pool", "random")
DEFAULT_KEEPS = (1.0, 0.8, 0.7, 0.6, 0.5)  # of the token-block work (registry.INTEGRATIONS)
MALLOC_MODES = ("retain", "default")


@dataclass
class VitBenchConfig:
    methods: Sequence[str] = DEFAULT_METHODS
    keeps: Sequence[float] = DEFAULT_KEEPS
    n_images: int = 1000
    eval_batch: int = 250
    time_batch: int = 64
    warmup: int = 2
    repeats: int = 7
    threads: int = 2
    clock: str = "wall"
    malloc: str = "retain"
    out: str = "results/vit"
    method_kw: dict[str, dict[str, Any]] = field(default_factory=dict)
    parts: str = "all"
    device: str = "cpu"
    smoke: bool = False
    model: str = "reference"  # or finetune:<method>:<keep> (models/vit/finetune.py)


#: ``--smoke``: tiny random-weight reference ViT, 32 images, 3 methods x 2 keeps, 2 timed rounds (seconds)
SMOKE = {"methods": ("tome", "evit", "random"), "keeps": (1.0, 0.6), "n_images": 32, "time_batch": 8, "warmup": 1,
         "repeats": 2, "threads": 1}


def zero_overhead_forward(model: nn.Module, tokens_attn: Sequence[int], tokens_mlp: Sequence[int]
                          ) -> Callable[[Tensor], Tensor]:
    """The speed limit of a reduction schedule: timm ViT blocks run directly on the kept counts.

    Block l's attention half runs on the first ``tokens_attn[l]`` tokens and its MLP half on the first
    ``tokens_mlp[l]`` (a slice: no scoring, no gather, no bias), then the usual norm and head.
    """
    blocks = list(model.blocks)
    if len(tokens_attn) != len(blocks) or len(tokens_mlp) != len(blocks):
        raise ValueError(f"need one count per block ({len(blocks)}), got {len(tokens_attn)}/{len(tokens_mlp)}")

    def fwd(images: Tensor) -> Tensor:
        x = model.norm_pre(model.patch_drop(model._pos_embed(model.patch_embed(images))))
        for b, na, nm in zip(blocks, tokens_attn, tokens_mlp):
            x = x[:, :na]
            x = x + b.drop_path1(b.ls1(b.attn(b.norm1(x))))
            x = x[:, :nm]
            x = x + b.drop_path2(b.ls2(b.mlp(b.norm2(x))))
        return model.forward_head(model.norm(x))

    return fwd


@torch.inference_mode()
def _predict(model: nn.Module, images: Tensor, batch: int) -> Tensor:
    return torch.cat([model(images[i: i + batch]).argmax(-1) for i in range(0, images.shape[0], batch)])


# ---------------------------------------------------------------------------- the model a cell runs on
@dataclass
class VitContext:
    """What every cell of one model shares in a worker: the model, the test images, the timing batch, its
    FLOPs accounting and (computed on first use) the unreduced model's predictions."""

    model: nn.Module
    images: Tensor
    labels: Tensor
    time_batch: int
    eval_batch: int

    def __post_init__(self) -> None:
        self.tbatch = self.images[: self.time_batch]
        self.dims: ViTDims = timm_vit_dims(self.model)
        self.base_flops = self.dims.flops()
        self._base_pred: Tensor | None = None

    @property
    def base_pred(self) -> Tensor:
        if self._base_pred is None:
            self._base_pred = _predict(self.model, self.images, self.eval_batch)
        return self._base_pred


def _finetuned(spec: str) -> Any:
    """The :class:`~tokenreduce.models.vit.FinetuneConfig` of ``--model`` ``spec`` (None for "reference")."""
    from ..models.vit import parse_finetune_spec

    return None if spec == "reference" else parse_finetune_spec(spec)


def _reference_name(spec: str = "reference") -> str:
    from ..models.vit import TrainConfig, checkpoint_dir, finetune_dir

    ft = _finetuned(spec)
    return f"reference-vit/{(checkpoint_dir(TrainConfig()) if ft is None else finetune_dir(ft)).name}"


def _reference(spec: str = "reference") -> tuple[nn.Module, Tensor, Tensor]:
    from ..models.vit import load_finetuned_vit, load_reference_vit, reference_eval_set

    ft = _finetuned(spec)
    model, info = load_reference_vit() if ft is None else load_finetuned_vit(config=ft)
    base = info["config"] if ft is None else ft.base
    return (model, *reference_eval_set("test", base))


def _model_info(name: str, train_if_missing: bool, spec: str = "reference") -> dict[str, Any]:
    """The reference ViT's (or the fine-tuned one's) metrics and path for the run header, read without loading
    it (the reference trained first if it is missing and ``train_if_missing``; else the loader's
    FileNotFoundError)."""
    if not name.startswith("reference-vit/"):
        return {}
    from ..models.vit import TrainConfig, checkpoint_dir, finetune_dir, load_finetuned_vit, load_reference_vit

    ft = _finetuned(spec)
    path = (checkpoint_dir(TrainConfig()) if ft is None else finetune_dir(ft)) / "model.pt"
    if not path.is_file():
        if ft is None:
            load_reference_vit(train_if_missing=train_if_missing)
        else:
            load_finetuned_vit(config=ft)  # raises, naming the command that builds it
    metrics = path.with_name("metrics.json")
    return {"metrics": json.loads(metrics.read_text()) if metrics.is_file() else {}, "path": path}


def load_vit_context(name: str, n_images: int, time_batch: int, eval_batch: int = 250, device: str = "cpu",
                     retain: bool = False, model: nn.Module | None = None, images: Tensor | None = None,
                     labels: Tensor | None = None, reference: str = "reference") -> VitContext:
    """The context of model ``name``: the reference ViT (or, ``reference="finetune:<method>:<keep>"``, its
    fine-tuned checkpoint) and its test set, the smoke ViT (``"smoke"``) or the given ``model``/``images``/
    ``labels``; on ``device``; ``retain``: this process keeps freed memory
    (:func:`~tokenreduce.bench.timing.retain_freed_memory`)."""
    model, images, labels = resolve_model(name, (model, images, labels), lambda: smoke_vit(n_images),
                                          functools.partial(_reference, reference), retain)
    assert images is not None and labels is not None
    model = model.eval().to(device)
    return VitContext(model, images[:n_images].to(device), labels[:n_images].to(device), time_batch, eval_batch)


# ---------------------------------------------------------------------------- one cell
def _base_row(ctx: VitContext) -> dict[str, Any]:
    model, tbatch, dims = ctx.model, ctx.tbatch, ctx.dims
    return {"method": "none", "keep": 1.0, "keep_achieved": 1.0,
            "accuracy": (ctx.base_pred == ctx.labels).float().mean().item(), "agreement": 1.0,
            "gflops": ctx.base_flops["gflops"], "flops_ratio": 1.0, "speedup": 1.0, "speedup_low": 1.0,
            "speedup_high": 1.0, "limit_speedup": 1.0, "efficiency": 1.0, "overhead_ms": 0.0,
            "peak_mem_mb": peak_memory(lambda: model(tbatch)) / 2**20, "mean_tokens": float(dims.num_tokens),
            "final_tokens": float(dims.num_tokens)}


def _accuracy(ctx: VitContext, method: str, keeps: Sequence[float], kw: dict[str, Any]
              ) -> tuple[list[dict[str, Any]], dict[float, dict[str, Any]]]:
    """Error rows (a keep out of the method's reach) and ``{keep: row}``: accuracy on the test set, stats of
    the timing batch, FLOPs, peak memory."""
    model, tbatch, dims = ctx.model, ctx.tbatch, ctx.dims
    errors, per_keep = [], {}
    for keep in keeps:
        # accuracy on the full test set, stats from the timing batch
        try:
            with tr.apply(model, method, keep=keep, **kw) as h:
                pred = _predict(model, ctx.images, ctx.eval_batch)
                model(tbatch)
                st = h.stats
                mem = peak_memory(lambda: model(tbatch)) / 2**20
        except ValueError as e:  # a keep this method's schedule cannot reach on this model: say so
            errors.append({"method": method, "keep": keep, "error": str(e)})
            continue
        fl = dims.flops(st.tokens_attn, st.tokens_mlp)
        per_keep[keep] = {
            "method": method, "keep": keep, "keep_achieved": st.keep_achieved,
            "accuracy": (pred == ctx.labels).float().mean().item(),
            "agreement": (pred == ctx.base_pred).float().mean().item(),
            "gflops": fl["gflops"], "flops_ratio": ctx.base_flops["total"] / fl["total"],
            "mean_tokens": sum(st.tokens_attn) / len(st.tokens_attn),
            "final_tokens": sum(st.final_tokens) / len(st.final_tokens),
            "tokens_attn": st.tokens_attn, "tokens_mlp": st.tokens_mlp, "peak_mem_mb": mem,
        }
    return errors, per_keep


def _time_group(ctx: VitContext, method: str, kw: dict[str, Any], per_keep: dict[float, dict[str, Any]],
                s: dict[str, Any]) -> None:
    """One interleaved group (unreduced, each keep, each keep's limit); adds the timing columns to the rows."""
    model, tbatch = ctx.model, ctx.tbatch
    for _ in range(max(3, s["warmup"])):  # a warm process before the timed group (the first one read low)
        model(tbatch)
    fns: dict[str, Callable[[], Any]] = {"none": lambda: model(tbatch)}
    overhead: dict[float, list[float]] = {}
    copies = []
    for keep, row in per_keep.items():
        ta, tm = [round(t) for t in row["tokens_attn"]], [round(t) for t in row["tokens_mlp"]]
        fns[f"limit@{keep}"] = functools.partial(zero_overhead_forward(model, ta, tm), tbatch)
        fns[f"method@{keep}"], hk = _timed_copy(model, method, keep, kw, tbatch, overhead.setdefault(keep, []))
        copies.append(hk)
    timings = interleaved(fns, warmup=s["warmup"], repeats=s["repeats"], rotate=True,
                          clock=timing_clock(s["clock"], s["device"]))
    for hk in copies:
        hk.remove()
    for keep, row in per_keep.items():
        sp = speedup(timings["none"], timings[f"method@{keep}"], paired=True)
        lim = speedup(timings["none"], timings[f"limit@{keep}"], paired=True)
        ov = sorted(overhead[keep][s["warmup"]:] or [0.0])
        row.update({"speedup": sp.ratio, "speedup_low": sp.low, "speedup_high": sp.high,
                    "limit_speedup": lim.ratio, "efficiency": sp.ratio / lim.ratio,
                    "time_ms": timings[f"method@{keep}"].median * 1e3,
                    "base_time_ms": timings["none"].median * 1e3,
                    "overhead_ms": ov[len(ov) // 2] * 1e3})


def run_vit_cell(ctx: VitContext, cell: Cell) -> list[dict[str, Any]]:
    """The rows of one cell: the unreduced model's, or a method's at the cell's keeps (accuracy; with
    ``cell.timing`` also the interleaved timing group; in the timing part on the accuracy rows given)."""
    s = dict(cell.settings)
    with fixed_threads(s["threads"]), torch.inference_mode():
        if cell.method == "none":
            return [_base_row(ctx)]
        if cell.given:  # the timing part: the accuracy part's rows
            given = without_metadata(list(cell.given))
            errors = [r for r in given if "error" in r]
            per_keep = {r["keep"]: r for r in given if "error" not in r}
        else:
            errors, per_keep = _accuracy(ctx, cell.method, budget_tuple(cell.keep), s["method_kw"])
        if cell.timing and per_keep:
            _time_group(ctx, cell.method, s["method_kw"], per_keep, s)
    return errors + list(per_keep.values())


# ---------------------------------------------------------------------------- the sweep
def vit_sweep(cfg: VitBenchConfig, model: nn.Module | None = None, images: Tensor | None = None,
              labels: Tensor | None = None, finished: Collection[str] = ()) -> Sweep:
    """The benchmark as a grid of cells (:func:`~tokenreduce.bench.sweep.method_cells`), its loader and cell
    function. ``finished``: ids of cells already in the results file (the timing part runs over them)."""
    name = cell_model(cfg.smoke, model is not None, functools.partial(_reference_name, cfg.model))
    accuracy = {"n_images": cfg.n_images, "eval_batch": cfg.eval_batch, "time_batch": cfg.time_batch,
                "threads": cfg.threads, "device": cfg.device}
    timing = {"warmup": cfg.warmup, "repeats": cfg.repeats, "clock": cfg.clock, "malloc": cfg.malloc}
    cells = method_cells("vit", name, cfg.methods, lambda m: cfg.keeps, cfg.parts, accuracy, timing,
                         cfg.method_kw, finished)
    load = CachedLoader(functools.partial(load_vit_context, n_images=cfg.n_images, time_batch=cfg.time_batch,
                                          eval_batch=cfg.eval_batch, device=cfg.device,
                                          retain=cfg.malloc == "retain" and cfg.parts != "accuracy",
                                          model=model, images=images, labels=labels, reference=cfg.model))
    return Sweep("vit", cells, load, run_vit_cell, cpus_per_cell=cfg.threads,
                 gpus_per_cell=1.0 if cfg.device == "cuda" else 0.0)


def run_vit_bench(methods: Sequence[str] = DEFAULT_METHODS, keeps: Sequence[float] = DEFAULT_KEEPS,
                  out: str = "results/vit", n_images: int = 1000, repeats: int = 7, warmup: int = 2,
                  time_batch: int = 64, threads: int = 2, train_if_missing: bool = False,
                  model: nn.Module | None = None, images: Tensor | None = None, labels: Tensor | None = None,
                  progress: bool = True, method_kw: dict[str, dict[str, Any]] | None = None,
                  clock: str = "wall", malloc: str = "retain", parts: str = "all", device: str = "cpu",
                  smoke: bool = False, executor: str = "local", address: str | None = None,
                  resume: bool = True, reference: str = "reference") -> list[dict[str, Any]]:
    """Run the ViT benchmark; returns the result rows (also written to ``out/results.jsonl``).

    ``model``/``images``/``labels`` override the reference ViT and its test set (tests use tiny ones);
    ``smoke=True`` uses a tiny random-weight reference ViT and :data:`SMOKE`'s settings instead.
    ``clock="cpu"`` times with the process CPU clock (robust to a shared machine's lost time slices); it
    needs ``threads=1``. ``malloc="retain"`` (default) keeps freed memory in the process heap for the
    whole run (:func:`~tokenreduce.bench.timing.retain_freed_memory`: no page fault per fresh activation
    tensor, for the unreduced model, the limit and every method alike); ``"default"`` leaves glibc alone.
    ``parts``: "all", "accuracy" (no wall-clock: cells run in parallel) or "timing" (the timing columns for
    the accuracy rows already in ``out``). ``device``: "cpu" or "cuda" (timed with CUDA events).
    ``executor``: "local" (this process) or "ray" (``address``: an existing cluster); ``resume``: skip the
    cells whose rows are already in ``out/results.jsonl`` (docs/sweeps.md). ``reference``: "reference" (the
    reference ViT) or "finetune:<method>:<keep>" (its cached fine-tuned checkpoint, ``tokenreduce train vit
    --reduce METHOD --keep K``; the unreduced row is then the fine-tuned model without reduction).
    """
    if smoke:
        methods, keeps, n_images, time_batch, warmup, repeats, threads = (SMOKE[k] for k in (
            "methods", "keeps", "n_images", "time_batch", "warmup", "repeats", "threads"))
    # every check before anything is loaded or written
    check_methods(methods, "vit-layers")
    keeps = parse_keeps(keeps, "keeps")
    check_choice(clock, ("wall", "cpu"), "clock")
    if clock == "cpu" and threads != 1:
        raise ValueError(f"clock='cpu' measures one thread's compute and needs threads=1, got threads={threads}")
    check_choice(malloc, MALLOC_MODES, "malloc")
    check_choice(parts, PARTS, "parts")
    check_device(device)
    timing_clock(clock, device)
    _finetuned(reference)  # a malformed --model fails here, before anything loads
    cfg = VitBenchConfig(methods=list(methods), keeps=list(keeps), n_images=n_images, time_batch=time_batch,
                         warmup=warmup, repeats=repeats, threads=threads, clock=clock, malloc=malloc, out=out,
                         method_kw=method_kw or {}, parts=parts, device=device, smoke=smoke, model=reference)
    outdir = Path(out)
    results = outdir / "results.jsonl"
    sweep = vit_sweep(cfg, model, images, labels, finished_cells(results) if parts == "timing" else ())
    if parts == "timing" and len(sweep.cells) == 1:
        raise FileNotFoundError(f"parts='timing' needs the rows of an accuracy run in {results}; run "
                                "parts='accuracy' first")
    info = _model_info(sweep.cells[0].model, train_if_missing, reference)
    allocator = retain_freed_memory() if malloc == "retain" and parts != "accuracy" else "default"
    sweep.meta = {"bench": "vit", "config": asdict(cfg), "allocator": allocator,
                  "model_metrics": info.get("metrics", {}), "model_path": str(info.get("path", ""))}
    # the timing part measures again whenever it runs (that is what it is for); the other parts resume
    result = run_sweep(sweep, results, executor=executor, address=address, resume=resume and parts != "timing",
                       progress=progress)
    rows = without_metadata(result.rows)
    _report(rows, outdir, cfg, result.meta)
    return rows


def _timed_copy(model: nn.Module, method: str, keep: float, kw: dict[str, Any], batch: Tensor,
                sink: list[float]) -> tuple[Callable[[], Any], Any]:
    """A patched deep copy of ``model`` (patched once, as a user would) and a call recording the overhead."""
    m = copy.deepcopy(model)
    h = tr.apply(m, method, keep=keep, **kw)

    def call() -> Any:
        y = m(batch)
        sink.append(h.stats.reduce_seconds)
        return y

    return call, h


COLUMNS = ["method", "keep", "keep_achieved", "accuracy", "agreement", "gflops", "flops_ratio", "limit_speedup", "speedup",
           "efficiency", "overhead_ms", "mean_tokens", "final_tokens", "peak_mem_mb"]


def _report(rows: list[dict[str, Any]], outdir: Path, cfg: VitBenchConfig, meta: dict[str, Any]) -> None:
    errors = [r for r in rows if "error" in r]
    rows = [r for r in rows if "error" not in r]
    table = [{c: r.get(c) for c in COLUMNS} for r in rows]
    print(format_table(table, COLUMNS, title="reference ViT: accuracy vs measured speed"))
    images = []
    if cfg.parts != "accuracy":  # the accuracy part measures no speed
        images.append(("accuracy vs measured speedup", pareto_plot(
            rows, x="speedup", y="accuracy", group="method", path=outdir / "pareto.png",
            title="reference ViT: accuracy vs measured speedup (same run)",
            xlabel="measured speedup vs unreduced (x)", ylabel="top-1 accuracy")))
    images.append(("accuracy vs FLOPs ratio", pareto_plot(
        rows, x="flops_ratio", y="accuracy", group="method", path=outdir / "pareto_flops.png",
        title="accuracy vs analytic FLOPs reduction", xlabel="FLOPs ratio (x)", ylabel="top-1")))
    notes = ("speedup: median of per-round ratios vs the unreduced model, interleaved in the same cell "
             f"({cfg.repeats} rounds, {cfg.threads} threads, batch {cfg.time_batch}, "
             f"{timing_clock(cfg.clock, cfg.device)} clock, device {cfg.device}, "
             f"allocator: {meta.get('allocator', 'default')}); limit_speedup: the same "
             "blocks run directly on the kept token counts (zero overhead); efficiency = speedup / limit. "
             "keep: the fraction of the token-block work kept; keep_achieved: what ran.")
    if errors:
        notes += " Not run (keep out of the method's reach): " + "; ".join(
            f"{r['method']}@{r['keep']}: {r['error']}" for r in errors)
    html_report("tokenreduce: vision methods on the reference ViT", meta, [("results", table)], images,
                outdir / "report.html", notes=notes)


def register_cli(bench_app: Any) -> None:
    import typer

    o = sweep_options()

    @bench_app.command("vit")
    def vit(
        methods: str = typer.Option(",".join(DEFAULT_METHODS), help="comma-separated method names"),
        keep: str = typer.Option(",".join(str(k) for k in DEFAULT_KEEPS), help="comma-separated keep values"),
        out: str = typer.Option("results/vit", help="output directory"),
        n_images: int = typer.Option(1000, help="test images for accuracy"),
        repeats: int = typer.Option(7, help="timed rounds (interleaved)"),
        time_batch: int = typer.Option(64, help="images per timed forward"),
        threads: int = typer.Option(2, help="torch threads"),
        clock: str = typer.Option("wall", help="wall (elapsed) or cpu (process CPU time; needs --threads 1)"),
        train: bool = typer.Option(True, help="train the reference ViT if it is not cached"),
        malloc: str = typer.Option("retain", help="retain (keep freed memory in the heap: no page fault per "
                                   "fresh activation) or default (glibc's adaptive mmap threshold)"),
        parts: str = typer.Option("all", help="all | accuracy (no wall-clock: cells run in parallel) | timing "
                                              "(timing columns for the accuracy rows in --out; run it alone)"),
        executor: str = o.executor, address: str = o.address, resume: bool = o.resume, smoke: bool = o.smoke,
        device: str = o.device,
        model: str = typer.Option("reference", help="reference, or finetune:<method>:<keep> (the reference ViT "
                                  "fine-tuned with that method: tokenreduce train vit --reduce METHOD --keep K)"),
    ) -> None:
        """Vision methods on the reference ViT: accuracy, agreement, FLOPs, measured speedup vs limit."""
        if smoke and out == "results/vit":
            out = "results/vit/smoke"
        run_vit_bench(methods=split_list(methods), keeps=parse_keeps(keep), out=out, n_images=n_images, repeats=repeats,
                      time_batch=time_batch, threads=threads, train_if_missing=train, clock=clock,
                      malloc=malloc, parts=parts, device=device, smoke=smoke, executor=executor, address=address,
                      resume=resume, reference=model)
