"""`tokenreduce bench diffusion`: token reduction in the DiT and UNet trained here, quality against measured speed.

For every model, method and keep (default {1, 0.75, 0.5, 0.3}) the sweep measures (:mod:`.diffusion_cells`):

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

It is a sweep (docs/sweeps.md): per denoiser one unreduced cell and, per method, ``--parts all`` one timing cell
(quality of every keep, then the timing group), ``--parts accuracy`` one cell per keep (no wall-clock) or
``--parts timing`` one timing cell over the finished quality cells; ``--executor local | ray``, resumable.
Results: JSONL (with metadata), and on the driver after the sweep sample-grid PNGs, speed/quality plots and a
self-contained HTML report (:mod:`.diffusion_report`). ``--smoke``: tiny random-weight models, a few samples
and steps (seconds; used by the tests).
"""

from __future__ import annotations

import dataclasses
import functools
import json
from collections.abc import Collection, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from .args import check_choice, check_methods, parse_keeps, parse_method_kw, split_list
from .diffusion_cells import PEER, load_diffusion_context, model_kind, run_diffusion_cell
from .diffusion_report import diffusion_report, sample_grids
from .smoke import SMOKE_MODEL
from .sweep import PARTS, CachedLoader, Sweep, finished_cells, method_cells, run_sweep, without_metadata
from .sweep.options import sweep_options
from .timing import retain_freed_memory

__all__ = ["PEER", "SMOKE", "DiffusionBenchConfig", "diffusion_sweep", "register_cli", "run_diffusion_bench",
           "smoke_config"]

MODELS = ("unet", "dit")
DEFAULT_METHODS: dict[str, tuple[str, ...]] = {"unet": ("tomesd", "todo", "tofu", "random", "pool"),
                                               "dit": ("tomesd", "todo", "tofu", "toca", "random", "pool")}
DEFAULT_KEEPS = (1.0, 0.75, 0.5, 0.3)

#: ``--smoke``: tiny random-weight models, one method per kind of zero-overhead limit (merging with the tomesd
#: package beside it, keys/values, caching), keeps 1 and 0.5, 4 samples, 2 steps, one timed round (seconds)
SMOKE: dict[str, Any] = {"methods": ("tomesd", "todo", "toca"), "keeps": (1.0, 0.5), "n_samples": 4,
                         "exact_samples": 2, "steps": 2, "time_batch": 1, "repeats": 1, "warmup": 0,
                         "toca_interval": 2}


@dataclass
class DiffusionBenchConfig:
    models: Sequence[str] = MODELS
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
    parts: str = "all"
    device: str = "cpu"


def smoke_config(out: str, **over: Any) -> DiffusionBenchConfig:
    """:data:`SMOKE`'s settings (``over`` overrides them): the whole pipeline in seconds."""
    return DiffusionBenchConfig(**{**SMOKE, "smoke": True, "out": out, **over})


def _check(cfg: DiffusionBenchConfig) -> None:
    """Every check before anything is loaded or written."""
    if not cfg.models:
        raise ValueError(f"--models: give at least one of {', '.join(MODELS)}")
    for kind in cfg.models:
        check_choice(kind, MODELS, "--models")
    if cfg.methods is not None:
        check_methods(cfg.methods, "diffusion")
    check_methods(cfg.method_kw, "diffusion", "--method-kw")
    cfg.keeps = parse_keeps(cfg.keeps, "--keep")
    check_choice(cfg.parts, PARTS, "--parts")
    check_choice(cfg.clock, ("cpu", "wall"), "--clock")
    if cfg.clock == "cpu" and cfg.threads != 1:
        raise ValueError(f"clock='cpu' measures one thread's compute and needs threads=1, got threads={cfg.threads}")
    if cfg.device != "cpu":
        raise ValueError(f"--device {cfg.device}: bench diffusion runs on the CPU only (the sampler draws its noise "
                         "and steps the scheduler there); accepted: cpu")


def _model_name(kind: str, smoke: bool) -> str:
    if smoke:
        return f"{SMOKE_MODEL}/{kind}"
    from ..models.diffusion import checkpoint_dir, default_config

    return f"{kind}/{checkpoint_dir(default_config(kind)).name}"


def _model_info(name: str) -> dict[str, Any]:
    """The denoiser's training metrics and path for the run header, read without loading it (trained first,
    with the digit network, if missing: workers only load)."""
    if name.startswith(f"{SMOKE_MODEL}/"):
        return {"smoke": True}
    from ..models.diffusion import checkpoint_dir, default_config, load_denoiser, load_features

    kind = model_kind(name)
    path = checkpoint_dir(default_config(kind)) / "model.pt"
    if not path.is_file():
        load_denoiser(kind, train_if_missing=True)
    load_features(train_if_missing=True)
    metrics = path.with_name("metrics.json")
    info = json.loads(metrics.read_text()) if metrics.is_file() else {}
    return {"metrics": {k: v for k, v in info.items() if k != "history"}, "path": str(path)}


def diffusion_sweep(cfg: DiffusionBenchConfig, finished: Collection[str] = ()) -> Sweep:
    """The benchmark as a grid of cells (:func:`~tokenreduce.bench.sweep.method_cells` per denoiser), its loader
    and cell function. ``finished``: ids of cells already in the results file (the timing part runs over them)."""
    accuracy = {"n_samples": cfg.n_samples, "exact_samples": cfg.exact_samples, "steps": cfg.steps,
                "guidance": cfg.guidance, "seed": cfg.seed, "time_batch": cfg.time_batch, "threads": cfg.threads,
                "device": cfg.device}
    timing = {"warmup": cfg.warmup, "repeats": cfg.repeats, "clock": cfg.clock}
    method_kw = {**cfg.method_kw, "toca": {"interval": cfg.toca_interval, **cfg.method_kw.get("toca", {})}}
    cells = []
    for kind in cfg.models:
        methods = list(cfg.methods) if cfg.methods is not None else list(DEFAULT_METHODS[kind])
        cells += method_cells("diffusion", _model_name(kind, cfg.smoke), methods, lambda m: cfg.keeps, cfg.parts,
                              {**accuracy, "peers": cfg.peers and kind == "unet"}, timing, method_kw, finished)
    load = CachedLoader(functools.partial(load_diffusion_context, retain=cfg.parts != "accuracy"))
    return Sweep("diffusion", cells, load, run_diffusion_cell, cpus_per_cell=cfg.threads)


def run_diffusion_bench(cfg: DiffusionBenchConfig | None = None, progress: bool = True, executor: str = "local",
                        address: str | None = None, resume: bool = True) -> list[dict[str, Any]]:
    """Run the benchmark; returns the result rows (also written to ``<out>/results.jsonl``).

    ``cfg.parts``: "all", "accuracy" (quality only: cells run in parallel anywhere) or "timing" (the timing
    columns for the quality rows already in ``out``, same settings). ``executor``: "local" (this process) or
    "ray" (``address``: an existing cluster); ``resume``: skip the cells whose rows are already in the results
    file (docs/sweeps.md)."""
    cfg = dataclasses.replace(cfg) if cfg is not None else DiffusionBenchConfig()
    _check(cfg)
    outdir = Path(cfg.out)
    results = outdir / "results.jsonl"
    sweep = diffusion_sweep(cfg, finished_cells(results) if cfg.parts == "timing" else ())
    if cfg.parts == "timing" and not any(c.timing for c in sweep.cells):
        raise FileNotFoundError(f"parts='timing' needs the rows of an accuracy run with these settings in {results}; "
                                "run parts='accuracy' first")
    names = list(dict.fromkeys(c.model for c in sweep.cells))
    allocator = retain_freed_memory() if cfg.parts != "accuracy" else "default"
    sweep.meta = {"bench": "diffusion", "parts": cfg.parts, "config": asdict(cfg), "allocator": allocator,
                  "models": {model_kind(n): _model_info(n) for n in names}}
    # the timing part measures again whenever it runs (that is what it is for); the other parts resume
    result = run_sweep(sweep, results, executor=executor, address=address, resume=resume and cfg.parts != "timing",
                       progress=progress)
    kinds = {c.id: model_kind(c.model) for c in sweep.cells}
    rows = without_metadata([{"model": kinds.get(r.get("cell_id"), "?"), **r} for r in result.rows])
    grids = sample_grids(sweep, rows, outdir, cfg.threads)
    diffusion_report(rows, grids, outdir, cfg, result.meta)
    return rows


def register_cli(bench_app: Any) -> None:
    import typer

    o = sweep_options()

    @bench_app.command("diffusion")
    def diffusion(
        models: str = typer.Option(",".join(MODELS), help="comma-separated: unet, dit"),
        methods: str = typer.Option("", help="comma-separated method names (default: every method per model; "
                                             "smoke: tomesd,todo,toca)"),
        keep: str = typer.Option("", help="comma-separated keep values (default 1,0.75,0.5,0.3; smoke: 1,0.5)"),
        n_samples: int = typer.Option(200, help="samples per configuration (FID, class accuracy, PSNR/SSIM)"),
        steps: int = typer.Option(20, help="DDIM steps"),
        guidance: float = typer.Option(2.0, help="classifier-free guidance scale"),
        time_batch: int = typer.Option(4, help="images per timed sampling loop"),
        repeats: int = typer.Option(3, help="timed rounds (interleaved)"),
        threads: int = typer.Option(1, help="torch threads"),
        clock: str = typer.Option("cpu", help="cpu (process CPU time; needs --threads 1) or wall"),
        peers: bool = typer.Option(True, help="run the tomesd package beside tomesd on the UNet"),
        parts: str = typer.Option("all", help="all | accuracy (no wall-clock: cells run in parallel) | timing "
                                              "(timing columns for the quality rows in --out; run it alone)"),
        out: str = typer.Option("results/diffusion", help="output directory"),
        method_kw: str = typer.Option("", help="per-method options as JSON, e.g. '{\"tomesd\": {\"merge_mlp\": true}}' "
                                                "(the tomesd package beside tomesd gets the options it shares)"),
        executor: str = o.executor, address: str = o.address, resume: bool = o.resume, smoke: bool = o.smoke,
        device: str = o.device,
    ) -> None:
        """Diffusion methods on the DiT and UNet trained here: FID, class accuracy, PSNR/SSIM, speed vs limit."""
        kw: dict[str, Any] = {"models": split_list(models), "guidance": guidance, "threads": threads, "clock": clock,
                              "peers": peers, "parts": parts, "device": device,
                              "method_kw": parse_method_kw(method_kw),
                              **({"methods": split_list(methods)} if split_list(methods) else {}),
                              **({"keeps": parse_keeps(keep)} if keep else {})}
        if smoke:
            cfg = smoke_config("results/diffusion/smoke" if out == "results/diffusion" else out, **kw)
        else:
            cfg = DiffusionBenchConfig(n_samples=n_samples, steps=steps, time_batch=time_batch, repeats=repeats,
                                       out=out, **kw)
        run_diffusion_bench(cfg, executor=executor, address=address, resume=resume)
