"""`tokenreduce bench diffusion`: token reduction in the DiT and UNet trained here, quality against measured speed.

For every model, method and keep (default {1, 0.75, 0.5, 0.3}) the run measures, in one process:

* quality of ``n_samples`` class-balanced samples (DDIM, classifier-free guidance, the same initial noise
  for every configuration): FID and class accuracy in the space of the digit network trained here
  (:mod:`tokenreduce.models.diffusion.features`), PSNR/SSIM against the unreduced model's samples of the same
  seeds; keep=1 is checked to be bit-exact;
* sampling time per image (the whole DDIM loop on ``time_batch`` images), interleaved round-robin with the
  unreduced model and with the **zero-overhead limit** of the same configuration (the same operations of the
  same blocks on the same token counts, by slicing: :mod:`tokenreduce.methods.diffusion.limit`), so the
  speedup, the limit and their ratio share the machine's noise; peak tensor memory of one denoiser forward;
* side by side on the UNet: the ``tomesd`` package (0.1.3) at ``ratio = 1 - keep``, same seeds, timed in the
  same interleaved group as our ``tomesd``.

Results: JSONL (with metadata), sample-grid PNGs, speed/quality plots and a self-contained HTML report.
``--smoke``: tiny random-weight models, a few samples and steps (seconds; used by the tests).
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

import tokenreduce as tr

from ..accounting.memory import peak_memory
from ..adapters.base import find_adapter
from ..methods.diffusion.limit import SliceCache, SliceKV, SliceMerge
from .report import format_table, html_report, pareto_plot
from .results import ResultWriter
from .timing import fixed_threads, interleaved, retain_freed_memory, speedup

__all__ = ["DiffusionBenchConfig", "register_cli", "run_diffusion_bench", "smoke_config"]

MERGING = ("tomesd", "tofu", "random", "pool")
DEFAULT_METHODS: dict[str, tuple[str, ...]] = {"unet": ("tomesd", "todo", "tofu", "random", "pool"),
                                               "dit": ("tomesd", "todo", "tofu", "toca", "random", "pool")}
DEFAULT_KEEPS = (1.0, 0.75, 0.5, 0.3)
PEER = "tomesd-package"


def smoke_config(out: str, **over: Any) -> DiffusionBenchConfig:
    """Tiny random-weight models, keeps 1 and 0.5, 4 samples, 2 steps, one timed round: the whole pipeline
    in seconds."""
    return DiffusionBenchConfig(**{"smoke": True, "keeps": (1.0, 0.5), "n_samples": 4, "exact_samples": 2, "steps": 2,
                                   "time_batch": 1, "repeats": 1, "warmup": 0, "toca_interval": 2, "out": out,
                                   **over})


@dataclass
class DiffusionBenchConfig:
    models: Sequence[str] = ("unet", "dit")
    methods: Sequence[str] | None = None  # None: DEFAULT_METHODS of each model
    keeps: Sequence[float] = DEFAULT_KEEPS
    n_samples: int = 200
    exact_samples: int = 16  # samples on which keep=1 is checked bit-exact
    steps: int = 20
    guidance: float = 2.0
    seed: int = 0
    time_batch: int = 4
    warmup: int = 1
    repeats: int = 3
    threads: int = 1
    clock: str = "cpu"  # process CPU time (one thread: immune to time slices lost on a shared machine) or "wall"
    peers: bool = True
    smoke: bool = False
    toca_interval: int = 3
    out: str = "results/diffusion"
    method_kw: dict[str, dict[str, Any]] = field(default_factory=dict)


# ---------------------------------------------------------------------------- models and metrics
def _load(kind: str, smoke: bool) -> tuple[Any, dict[str, Any]]:
    from ..models.diffusion import ClassConditional, DenoiserConfig, load_denoiser

    if smoke:
        torch.manual_seed(0)
        cfg = DenoiserConfig(kind=kind, depth=2, width=16, heads=2, channels=(8, 16), context_dim=8,
                             context_tokens=2)
        return ClassConditional(cfg).eval(), {"smoke": True}
    model, info = load_denoiser(kind, train_if_missing=True)
    return model, {"metrics": {k: v for k, v in info["metrics"].items() if k != "history"},
                   "path": str(info["path"])}


def _scorer(smoke: bool) -> Any:
    from ..models.diffusion.features import DigitFeatures, FidScorer, load_features

    if smoke:
        torch.manual_seed(0)
        return FidScorer(DigitFeatures().eval(), n_real=32)
    return FidScorer(load_features()[0])


def _fidelity(images: Tensor, base: Tensor) -> dict[str, float]:
    """Same-seed fidelity to the unreduced samples: mean per-image PSNR and SSIM (pixels in [-1, 1])."""
    from torchmetrics.functional.image import peak_signal_noise_ratio, structural_similarity_index_measure

    psnr = peak_signal_noise_ratio(images, base, data_range=2.0, dim=(1, 2, 3), reduction="elementwise_mean")
    ssim = structural_similarity_index_measure(images, base, data_range=2.0)
    return {"psnr": float(psnr), "ssim": float(ssim)}


def _method_kw(cfg: DiffusionBenchConfig, method: str, scheduler: Any) -> dict[str, Any]:
    kw = dict(cfg.method_kw.get(method, {}))
    if method == "toca":
        kw.setdefault("scheduler", scheduler)
        kw.setdefault("interval", cfg.toca_interval)
    return kw


def _limit(method: str, keep: float, kw: dict[str, Any], stats: Any) -> Any:
    """The zero-overhead reference of ``method`` at ``keep`` (its kept counts from ``stats``)."""
    if method == "toca":
        return SliceCache(keep=keep, **kw)
    flags = {k: kw[k] for k in ("max_downsample",) if k in kw}
    if method == "todo":
        return SliceKV(keep=keep, counts={i: int(k) for i, k in enumerate(stats.tokens_kv)}, **flags)
    flags |= {k: kw[k] for k in ("merge_attn", "merge_crossattn", "merge_mlp") if k in kw}
    counts = {i: int(k) for i, k in enumerate(stats.tokens_attn)}
    if not kw.get("merge_attn", True):
        counts = {i: int(k) for i, k in enumerate(stats.tokens_mlp)}
    return SliceMerge(keep=keep, counts=counts, **flags)


# ---------------------------------------------------------------------------- the run
def run_diffusion_bench(cfg: DiffusionBenchConfig | None = None, progress: bool = True) -> list[dict[str, Any]]:
    """Run the benchmark; returns the result rows (also written to ``<out>/results.jsonl``)."""
    cfg = cfg or DiffusionBenchConfig()
    if cfg.clock == "cpu" and cfg.threads != 1:
        raise ValueError(f"clock='cpu' measures one thread's compute and needs threads=1, got threads={cfg.threads}")
    outdir = Path(cfg.out)
    outdir.mkdir(parents=True, exist_ok=True)
    rows: list[dict[str, Any]] = []
    grids: list[tuple[str, Path]] = []
    infos: dict[str, Any] = {}
    allocator = retain_freed_memory()  # no page fault per fresh activation, for every candidate alike
    with fixed_threads(cfg.threads), ResultWriter(outdir / "results.jsonl", extra_meta={
            "bench": "diffusion", "config": asdict(cfg), "allocator": allocator}) as writer:
        scorer = _scorer(cfg.smoke)
        for kind in cfg.models:
            model, infos[kind] = _load(kind, cfg.smoke)
            model_rows, grid = _bench_model(cfg, kind, model, scorer, writer, outdir, progress)
            rows += model_rows
            grids.append((f"{kind}: samples (same seeds; rows: configuration, columns: class 0-9)", grid))
        writer.meta["models"] = infos
    _report(rows, grids, outdir, cfg, writer.meta)
    return rows


def _bench_model(cfg: DiffusionBenchConfig, kind: str, model: Any, scorer: Any, writer: ResultWriter,
                 outdir: Path, progress: bool) -> tuple[list[dict[str, Any]], Path]:
    from ..models.diffusion import ddim_scheduler, sample

    sched = ddim_scheduler(model.config, cfg.steps)
    labels = torch.arange(cfg.n_samples) % 10
    tlabels = torch.arange(cfg.time_batch) % 10

    def gen(m: Any = model, lab: Tensor = labels) -> Tensor:
        return sample(m, lab, steps=cfg.steps, guidance=cfg.guidance, seed=cfg.seed, scheduler=sched, batch_size=32)

    def log(msg: str) -> None:
        if progress:
            print(f"[diffusion bench] {kind}: {msg}", flush=True)

    base = gen()
    base_sub = gen(model, labels[: cfg.exact_samples])  # keep=1 is compared on the same batch (GEMM blocking)
    x = torch.randn(2 * cfg.time_batch, 1, 32, 32)
    fwd_args = (x, torch.full((x.shape[0],), int(sched.timesteps[0])), torch.arange(x.shape[0]) % 11)
    base_mem = peak_memory(lambda: model(*fwd_args)) / 2**20
    base_row = {"model": kind, "method": "none", "keep": 1.0, **scorer(base, labels), "psnr": None, "ssim": 1.0,
                "speedup": 1.0, "limit_speedup": 1.0, "efficiency": 1.0, "peak_mem_mb": base_mem, "mean_keep": 1.0}
    rows, samples = [base_row], [("unreduced", base[:10])]
    writer.write(base_row)
    log(f"unreduced FID {base_row['fid']:.2f}, class acc {base_row['class_acc']:.3f}")
    methods = list(cfg.methods) if cfg.methods is not None else list(DEFAULT_METHODS[kind])
    for method in methods:
        kw = _method_kw(cfg, method, sched)
        group: dict[str, Callable[[], Any]] = {"none": lambda: gen(model, tlabels)}
        per_keep: dict[float, dict[str, Any]] = {}
        handles = []
        for keep in cfg.keeps:
            if keep == 1.0:  # the identity: checked bit-exact on the first samples, its quality is the base's
                with tr.apply(model.net, method, keep=keep, **kw):
                    diff = (gen(model, labels[: cfg.exact_samples]) - base_sub).abs().max().item()
                exact = diff == 0.0
                per_keep[keep] = {"model": kind, "method": method, "keep": keep, "bit_exact": exact,
                                  "identity_max_diff": diff,
                                  **({k: base_row[k] for k in ("fid", "class_acc")} if exact else {}),
                                  "psnr": math.inf if exact else None, "ssim": 1.0 if exact else None,
                                  "mean_keep": 1.0}
                log(f"{method} keep 1.0: bit-exact on {cfg.exact_samples} samples: {exact} (max diff {diff:.3g})")
                continue
            with tr.apply(model.net, method, keep=keep, **kw) as h:
                images = gen()
                st = h.stats
            row = {"model": kind, "method": method, "keep": keep, **scorer(images, labels),
                   **_fidelity(images, base), "mean_keep": st.keep_run,
                   "tokens_attn": list(st.tokens_attn), "tokens_kv": list(st.tokens_kv),
                   "tokens_mlp": list(st.tokens_mlp), "site_tokens": list(st.site_tokens)}
            samples.append((f"{method} {keep}", images[:10]))
            mc = copy.deepcopy(model)
            group[f"method@{keep}"] = _caller(mc, gen, tlabels)
            handles.append(tr.apply(mc.net, method, keep=keep, **kw))
            lc = copy.deepcopy(model)
            group[f"limit@{keep}"] = _caller(lc, gen, tlabels)
            handles.append(find_adapter(lc.net).attach(lc.net, _limit(method, keep, kw, st), "limit"))
            with tr.apply(model.net, method, keep=keep, **kw):
                row["peak_mem_mb"] = peak_memory(lambda: model(*fwd_args)) / 2**20
            per_keep[keep] = row
            log(f"{method} keep {keep}: FID {row['fid']:.2f} acc {row['class_acc']:.3f} PSNR {row['psnr']:.1f}")
        peer_rows = _peer(cfg, kind, method, model, gen, tlabels, labels, base, scorer, group, samples)
        timings = interleaved(group, warmup=cfg.warmup, repeats=cfg.repeats, rotate=True, clock=cfg.clock)
        for h in handles:
            h.remove()
        base_t = timings["none"].median / cfg.time_batch
        for keep, row in [*per_keep.items(), *peer_rows]:
            name = f"{PEER}@{keep}" if row["method"] == PEER else f"method@{keep}"
            row["base_time_per_image_ms"] = base_t * 1e3
            if keep == 1.0 and row["method"] != PEER:
                row.update(speedup=1.0, limit_speedup=1.0, efficiency=1.0, time_per_image_ms=base_t * 1e3,
                           peak_mem_mb=base_mem)
            else:
                sp = speedup(timings["none"], timings[name], paired=True)
                row.update(speedup=sp.ratio, speedup_low=sp.low, speedup_high=sp.high,
                           time_per_image_ms=timings[name].median / cfg.time_batch * 1e3)
                if f"limit@{keep}" in timings:
                    lim = speedup(timings["none"], timings[f"limit@{keep}"], paired=True)
                    row.update(limit_speedup=lim.ratio, efficiency=sp.ratio / lim.ratio)
            writer.write(row)
            rows.append(row)
        log(f"{method}: speedups " + ", ".join(f"{r['keep']}: {r['speedup']:.2f}x" for r in per_keep.values()))
    return rows, _grid_png(samples, outdir / f"samples_{kind}.png")


def _caller(model: Any, gen: Callable[..., Tensor], labels: Tensor) -> Callable[[], Tensor]:
    return lambda: gen(model, labels)


def _peer(cfg: DiffusionBenchConfig, kind: str, method: str, model: Any, gen: Callable[..., Tensor],
          tlabels: Tensor, labels: Tensor, base: Tensor, scorer: Any, group: dict[str, Callable[[], Any]],
          samples: list[tuple[str, Tensor]]) -> list[tuple[float, dict[str, Any]]]:
    """The tomesd package beside our ``tomesd`` on the UNet: quality rows and timing candidates."""
    if not (cfg.peers and method == "tomesd" and kind == "unet"):
        return []
    import tomesd

    out = []
    for keep in [k for k in cfg.keeps if k < 1.0]:
        tomesd.apply_patch(model.net, ratio=1.0 - keep)
        try:
            images = gen()
        finally:
            tomesd.remove_patch(model.net)
        samples.append((f"{PEER} {keep}", images[:10]))
        out.append((keep, {"model": kind, "method": PEER, "keep": keep, **scorer(images, labels),
                           **_fidelity(images, base)}))
        pc = copy.deepcopy(model)
        tomesd.apply_patch(pc.net, ratio=1.0 - keep)
        group[f"{PEER}@{keep}"] = _caller(pc, gen, tlabels)
    return out


# ---------------------------------------------------------------------------- report
def _grid_png(samples: list[tuple[str, Tensor]], path: Path) -> Path:
    """Rows of samples (label, (n, 1, H, W) in [-1, 1]) as one labelled PNG."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    n = max(s.shape[0] for _, s in samples)
    H = samples[0][1].shape[-1]
    canvas = torch.ones(len(samples) * (H + 2), n * (H + 2))
    for r, (_, imgs) in enumerate(samples):
        for c in range(imgs.shape[0]):
            canvas[r * (H + 2): r * (H + 2) + H, c * (H + 2): c * (H + 2) + H] = (imgs[c, 0] + 1) / 2
    fig = Figure(figsize=(0.45 * n + 1.8, 0.45 * len(samples) + 0.3))
    FigureCanvasAgg(fig)
    ax = fig.add_axes((0.25, 0.0, 0.75, 1.0))
    ax.imshow(canvas.clamp(0, 1).numpy(), cmap="gray", vmin=0, vmax=1, interpolation="nearest")
    ax.set_yticks([r * (H + 2) + H / 2 for r in range(len(samples))], [label for label, _ in samples], fontsize=7)
    ax.set_xticks([])
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    return path


COLUMNS = ["model", "method", "keep", "mean_keep", "fid", "class_acc", "psnr", "ssim", "time_per_image_ms",
           "speedup", "limit_speedup", "efficiency", "peak_mem_mb", "bit_exact"]


def _report(rows: list[dict[str, Any]], grids: list[tuple[str, Path]], outdir: Path, cfg: DiffusionBenchConfig,
            meta: dict[str, Any]) -> None:
    table = [{c: r.get(c) for c in COLUMNS} for r in rows]
    print(format_table(table, COLUMNS, title="diffusion: quality vs measured sampling speed"))
    images = list(grids)
    for kind in cfg.models:
        mrows = [r for r in rows if r["model"] == kind]
        pts = [dict(r, psnr=min(r["psnr"], 50.0) if r["psnr"] is not None else 50.0) for r in mrows]
        if len(pts) > 1:
            images.append((f"{kind}: same-seed PSNR vs measured speedup",
                           pareto_plot(pts, x="speedup", y="psnr", group="method", path=outdir / f"psnr_{kind}.png",
                                       title=f"{kind}: PSNR to unreduced samples vs speedup (capped at 50 dB)",
                                       xlabel="measured sampling speedup (x)", ylabel="PSNR (dB)")))
            images.append((f"{kind}: class accuracy vs measured speedup",
                           pareto_plot(mrows, x="speedup", y="class_acc", group="method",
                                       path=outdir / f"acc_{kind}.png", title=f"{kind}: class accuracy vs speedup",
                                       xlabel="measured sampling speedup (x)", ylabel="class accuracy")))
    notes = (f"{cfg.n_samples} samples per configuration, DDIM {cfg.steps} steps, guidance {cfg.guidance}, "
             f"seed {cfg.seed}; FID and class accuracy in the feature space of the digit network trained here; "
             f"PSNR/SSIM against the unreduced samples of the same seeds. speedup: median of per-round ratios of "
             f"the whole sampling loop on {cfg.time_batch} images, interleaved with the unreduced model and the "
             f"zero-overhead limit ({cfg.repeats} rounds, {cfg.threads} thread(s), {cfg.clock} clock); "
             f"efficiency = speedup / limit.")
    html_report("tokenreduce: token reduction in diffusion models", meta, [("results", table)], images,
                outdir / "report.html", notes=notes)


def register_cli(bench_app: Any) -> None:
    import typer

    @bench_app.command("diffusion")
    def diffusion(
        models: str = typer.Option("unet,dit", help="comma-separated: unet, dit"),
        methods: str = typer.Option("", help="comma-separated method names (default: every method per model)"),
        keep: str = typer.Option("", help="comma-separated keep values (default 1,0.75,0.5,0.3; smoke: 1,0.5)"),
        n_samples: int = typer.Option(200, help="samples per configuration (FID, class accuracy, PSNR/SSIM)"),
        steps: int = typer.Option(20, help="DDIM steps"),
        guidance: float = typer.Option(2.0, help="classifier-free guidance scale"),
        time_batch: int = typer.Option(4, help="images per timed sampling loop"),
        repeats: int = typer.Option(3, help="timed rounds (interleaved)"),
        threads: int = typer.Option(1, help="torch threads"),
        clock: str = typer.Option("cpu", help="cpu (process CPU time; needs --threads 1) or wall"),
        peers: bool = typer.Option(True, help="run the tomesd package beside tomesd on the UNet"),
        smoke: bool = typer.Option(False, help="tiny random-weight models, a few samples (seconds)"),
        out: str = typer.Option("results/diffusion", help="output directory"),
    ) -> None:
        """Diffusion methods on the DiT and UNet trained here: FID, class accuracy, PSNR/SSIM, speed vs limit."""
        kw: dict[str, Any] = {"models": [m.strip() for m in models.split(",") if m.strip()],
                              "methods": [m.strip() for m in methods.split(",") if m.strip()] or None,
                              "guidance": guidance, "threads": threads, "clock": clock, "peers": peers}
        if keep:
            kw["keeps"] = [float(k) for k in keep.split(",")]
        if smoke:
            run_diffusion_bench(smoke_config(out, **kw))
            return
        run_diffusion_bench(DiffusionBenchConfig(n_samples=n_samples, steps=steps, time_batch=time_batch,
                                                 repeats=repeats, out=out, **kw))
