"""The report of `tokenreduce bench diffusion` (:mod:`.diffusion`), made on the driver after the sweep: sample
grids (drawn again here from the cached models, same seeds), speed/quality plots, the table and the HTML page."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from .diffusion_cells import PEER, Sampler, model_kind, reduced
from .report import format_table, html_report, pareto_plot
from .sweep import Sweep
from .timing import fixed_threads

__all__ = ["COLUMNS", "diffusion_report", "grid_png", "sample_grids"]

COLUMNS = ["model", "method", "keep", "keep_achieved", "fid", "class_acc", "psnr", "ssim", "time_per_image_ms",
           "speedup", "limit_speedup", "efficiency", "peak_mem_mb", "bit_exact"]
#: samples per configuration in a grid (one of each class)
GRID_COLUMNS = 10


def sample_grids(sweep: Sweep, rows: list[dict[str, Any]], outdir: Path, threads: int) -> list[tuple[str, Path]]:
    """One PNG per denoiser: the first samples (one per class, the seeds of the quality samples, drawn as one
    batch) of the unreduced model and of every configuration below keep 1 that has rows, in row order."""
    settings = {(c.model, c.method): dict(c.settings) for c in sweep.cells}
    out = []
    for name in dict.fromkeys(c.model for c in sweep.cells):
        kind = model_kind(name)
        ctx = sweep.load(name)  # in process: already loaded by the sweep
        with fixed_threads(threads):
            base = Sampler(ctx, settings[name, "none"])
            labels = base.labels[:GRID_COLUMNS]
            strips = [("unreduced", base.gen(labels=labels))]
            for r in rows:
                if r.get("model") != kind or "error" in r or r["method"] == "none" or r["keep"] == 1.0:
                    continue
                sp = Sampler(ctx, settings[name, "tomesd" if r["method"] == PEER else r["method"]])
                with reduced(ctx.model, r["method"], r["keep"], sp.method_kw(r["method"]), sp.s["seed"]):
                    strips.append((f"{r['method']} {r['keep']}", sp.gen(labels=labels)))
        out.append((f"{kind}: samples (same seeds; rows: configuration, columns: class 0-9)",
                    grid_png(strips, outdir / f"samples_{kind}.png")))
    return out


def grid_png(samples: list[tuple[str, Tensor]], path: Path) -> Path:
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


def _plots(rows: list[dict[str, Any]], kind: str, outdir: Path) -> list[tuple[str, Path]]:
    """PSNR and class accuracy against the measured speedup (rows with timing only)."""
    mrows = [r for r in rows if r["model"] == kind and "speedup" in r]
    if len(mrows) < 2:
        return []
    pts = [dict(r, psnr=min(r["psnr"], 50.0) if r["psnr"] is not None else 50.0) for r in mrows]
    return [(f"{kind}: same-seed PSNR vs measured speedup",
             pareto_plot(pts, x="speedup", y="psnr", group="method", path=outdir / f"psnr_{kind}.png",
                         title=f"{kind}: PSNR to unreduced samples vs speedup (capped at 50 dB)",
                         xlabel="measured sampling speedup (x)", ylabel="PSNR (dB)")),
            (f"{kind}: class accuracy vs measured speedup",
             pareto_plot(mrows, x="speedup", y="class_acc", group="method", path=outdir / f"acc_{kind}.png",
                         title=f"{kind}: class accuracy vs speedup", xlabel="measured sampling speedup (x)",
                         ylabel="class accuracy"))]


def diffusion_report(rows: list[dict[str, Any]], grids: list[tuple[str, Path]], outdir: Path, cfg: Any,
                     meta: dict[str, Any]) -> None:
    """The table (printed and in ``report.html``), the grids and, where rows were timed, the plots."""
    errors = [r for r in rows if "error" in r]
    rows = [r for r in rows if "error" not in r]
    table = [{c: r.get(c) for c in COLUMNS} for r in rows]
    print(format_table(table, COLUMNS, title="diffusion: quality vs measured sampling speed"))
    images = list(grids)
    if cfg.parts != "accuracy":  # the accuracy part measures no speed
        for kind in cfg.models:
            images += _plots(rows, kind, outdir)
    notes = (f"{cfg.n_samples} samples per configuration, DDIM {cfg.steps} steps, guidance {cfg.guidance}, "
             f"seed {cfg.seed}; FID and class accuracy in the feature space of the digit network trained here; "
             f"PSNR/SSIM against the unreduced samples of the same seeds. speedup: median of per-round ratios of "
             f"the whole sampling loop on {cfg.time_batch} images, interleaved with the unreduced model and the "
             f"zero-overhead limit in one cell ({cfg.repeats} rounds, {cfg.threads} thread(s), {cfg.clock} clock); "
             f"efficiency: median of the per-round ratios limit time / method time (about speedup / limit; "
             f"efficiency_low/high in the JSONL: their quartiles). Sample grids: drawn again on the driver, same seeds.")
    if errors:
        notes += " Not run: " + "; ".join(f"{r.get('model', '?')} {r['method']}@{r['keep']}: {r['error']}"
                                          for r in errors)
    html_report("tokenreduce: token reduction in diffusion models", meta, [("results", table)], images,
                outdir / "report.html", notes=notes)
