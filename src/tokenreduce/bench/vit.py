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
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

import tokenreduce as tr

from ..accounting.flops import ViTDims, timm_vit_dims
from ..accounting.memory import peak_memory
from .args import check_choice, check_methods, parse_keeps, split_list
from .report import format_table, html_report, pareto_plot
from .results import ResultWriter
from .timing import fixed_threads, interleaved, retain_freed_memory, speedup

__all__ = ["VitBenchConfig", "register_cli", "run_vit_bench", "zero_overhead_forward"]

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


def _load(train_if_missing: bool) -> tuple[nn.Module, dict[str, Any], Tensor, Tensor]:
    from ..models.vit import load_reference_vit, reference_eval_set

    model, info = load_reference_vit(train_if_missing=train_if_missing)
    images, labels = reference_eval_set("test", info["config"])
    return model, info, images, labels


def run_vit_bench(methods: Sequence[str] = DEFAULT_METHODS, keeps: Sequence[float] = DEFAULT_KEEPS,
                  out: str = "results/vit", n_images: int = 1000, repeats: int = 7, warmup: int = 2,
                  time_batch: int = 64, threads: int = 2, train_if_missing: bool = False,
                  model: nn.Module | None = None, images: Tensor | None = None, labels: Tensor | None = None,
                  progress: bool = True, method_kw: dict[str, dict[str, Any]] | None = None,
                  clock: str = "wall", malloc: str = "retain") -> list[dict[str, Any]]:
    """Run the ViT benchmark; returns the result rows (also written to ``out/results.jsonl``).

    ``model``/``images``/``labels`` override the reference ViT and its test set (tests use tiny ones).
    ``clock="cpu"`` times with the process CPU clock (robust to a shared machine's lost time slices); it
    needs ``threads=1``. ``malloc="retain"`` (default) keeps freed memory in the process heap for the
    whole run (:func:`~tokenreduce.bench.timing.retain_freed_memory`: no page fault per fresh activation
    tensor, for the unreduced model, the limit and every method alike); ``"default"`` leaves glibc alone.
    """
    from tqdm.auto import tqdm

    # every check before anything is loaded or written
    check_methods(methods, "vit-layers")
    keeps = parse_keeps(keeps, "keeps")
    check_choice(clock, ("wall", "cpu"), "clock")
    if clock == "cpu" and threads != 1:
        raise ValueError(f"clock='cpu' measures one thread's compute and needs threads=1, got threads={threads}")
    check_choice(malloc, MALLOC_MODES, "malloc")
    cfg = VitBenchConfig(methods=list(methods), keeps=list(keeps), n_images=n_images, time_batch=time_batch,
                         warmup=warmup, repeats=repeats, threads=threads, clock=clock, malloc=malloc, out=out,
                         method_kw=method_kw or {})
    allocator = retain_freed_memory() if malloc == "retain" else "default"
    info: dict[str, Any] = {}
    if model is None:
        model, info, images, labels = _load(train_if_missing)
    assert images is not None and labels is not None
    images, labels = images[:n_images], labels[:n_images]
    model.eval()
    outdir = Path(out)
    outdir.mkdir(parents=True, exist_ok=True)
    dims: ViTDims = timm_vit_dims(model)
    base_flops = dims.flops()
    tbatch = images[:time_batch]
    rows: list[dict[str, Any]] = []
    extra = {"bench": "vit", "config": asdict(cfg), "allocator": allocator, "model_metrics": info.get("metrics", {}),
             "model_path": str(info.get("path", ""))}
    with fixed_threads(threads), ResultWriter(outdir / "results.jsonl", extra_meta=extra) as writer, \
            torch.inference_mode():
        base_pred = _predict(model, images, 250)
        base_acc = (base_pred == labels).float().mean().item()
        base_row = {"method": "none", "keep": 1.0, "keep_achieved": 1.0, "accuracy": base_acc, "agreement": 1.0,
                    "gflops": base_flops["gflops"], "flops_ratio": 1.0, "speedup": 1.0, "speedup_low": 1.0,
                    "speedup_high": 1.0, "limit_speedup": 1.0, "efficiency": 1.0, "overhead_ms": 0.0,
                    "peak_mem_mb": peak_memory(lambda: model(tbatch)) / 2**20, "mean_tokens": float(dims.num_tokens),
                    "final_tokens": float(dims.num_tokens)}
        writer.write(base_row)
        rows.append(base_row)
        for _ in range(max(3, cfg.warmup)):  # a warm process before the first timed group (it read low before)
            model(tbatch)
        jobs = [(m, k) for m in cfg.methods for k in cfg.keeps]
        bar = tqdm(total=len(jobs), desc="vit bench", disable=not progress)
        for method in cfg.methods:
            kw = cfg.method_kw.get(method, {})
            fns: dict[str, Callable[[], Any]] = {"none": lambda: model(tbatch)}
            handles: dict[float, Any] = {}
            per_keep: dict[float, dict[str, Any]] = {}
            for keep in list(cfg.keeps):
                # accuracy on the full test set, stats from the timing batch
                try:
                    with tr.apply(model, method, keep=keep, **kw) as h:
                        pred = _predict(model, images, 250)
                        model(tbatch)
                        st = h.stats
                except ValueError as e:  # a keep this method's schedule cannot reach on this model: say so
                    writer.write({"method": method, "keep": keep, "error": str(e)})
                    rows.append({"method": method, "keep": keep, "error": str(e)})
                    bar.update(1)
                    continue
                ta = [round(t) for t in st.tokens_attn]
                tm = [round(t) for t in st.tokens_mlp]
                fl = dims.flops(st.tokens_attn, st.tokens_mlp)
                per_keep[keep] = {
                    "method": method, "keep": keep, "keep_achieved": st.keep_achieved,
                    "accuracy": (pred == labels).float().mean().item(),
                    "agreement": (pred == base_pred).float().mean().item(),
                    "gflops": fl["gflops"], "flops_ratio": base_flops["total"] / fl["total"],
                    "mean_tokens": sum(st.tokens_attn) / len(st.tokens_attn),
                    "final_tokens": sum(st.final_tokens) / len(st.final_tokens),
                    "tokens_attn": st.tokens_attn, "tokens_mlp": st.tokens_mlp,
                }
                handles[keep] = (ta, tm)
            # timing: one interleaved group per method (unreduced, each keep, each keep's limit)
            overhead: dict[float, list[float]] = {}
            copies = []
            for keep in per_keep:
                ta, tm = handles[keep]
                fns[f"limit@{keep}"] = functools.partial(zero_overhead_forward(model, ta, tm), tbatch)
                fns[f"method@{keep}"], hk = _timed_copy(model, method, keep, kw, tbatch, overhead.setdefault(keep, []))
                copies.append(hk)
            timings = interleaved(fns, warmup=cfg.warmup, repeats=cfg.repeats, rotate=True, clock=cfg.clock)
            for hk in copies:
                hk.remove()
            for keep, row in per_keep.items():
                sp = speedup(timings["none"], timings[f"method@{keep}"], paired=True)
                lim = speedup(timings["none"], timings[f"limit@{keep}"], paired=True)
                ov = sorted(overhead[keep][cfg.warmup:] or [0.0])
                with tr.apply(model, method, keep=keep, **kw):
                    mem = peak_memory(lambda: model(tbatch)) / 2**20
                row.update({"speedup": sp.ratio, "speedup_low": sp.low, "speedup_high": sp.high,
                            "limit_speedup": lim.ratio, "efficiency": sp.ratio / lim.ratio,
                            "time_ms": timings[f"method@{keep}"].median * 1e3,
                            "base_time_ms": timings["none"].median * 1e3,
                            "overhead_ms": ov[len(ov) // 2] * 1e3, "peak_mem_mb": mem})
                writer.write(row)
                rows.append(row)
                bar.update(1)
        bar.close()
    _report(rows, outdir, cfg, writer.meta)
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
    png = pareto_plot(rows, x="speedup", y="accuracy", group="method", path=outdir / "pareto.png",
                      title="reference ViT: accuracy vs measured speedup (same run)",
                      xlabel="measured speedup vs unreduced (x)", ylabel="top-1 accuracy")
    png2 = pareto_plot(rows, x="flops_ratio", y="accuracy", group="method", path=outdir / "pareto_flops.png",
                       title="accuracy vs analytic FLOPs reduction", xlabel="FLOPs ratio (x)", ylabel="top-1")
    notes = ("speedup: median of per-round ratios vs the unreduced model, interleaved in the same run "
             f"({cfg.repeats} rounds, {cfg.threads} threads, batch {cfg.time_batch}, {cfg.clock} clock, "
             f"allocator: {meta.get('allocator', 'default')}); limit_speedup: the same "
             "blocks run directly on the kept token counts (zero overhead); efficiency = speedup / limit. "
             "keep: the fraction of the token-block work kept; keep_achieved: what ran.")
    if errors:
        notes += " Not run (keep out of the method's reach): " + "; ".join(
            f"{r['method']}@{r['keep']}: {r['error']}" for r in errors)
    html_report("tokenreduce: vision methods on the reference ViT", meta, [("results", table)],
                [("accuracy vs measured speedup", png), ("accuracy vs FLOPs ratio", png2)],
                outdir / "report.html", notes=notes)


def register_cli(bench_app: Any) -> None:
    import typer

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
    ) -> None:
        """Vision methods on the reference ViT: accuracy, agreement, FLOPs, measured speedup vs limit."""
        run_vit_bench(methods=split_list(methods), keeps=parse_keeps(keep), out=out, n_images=n_images, repeats=repeats,
                      time_batch=time_batch, threads=threads, train_if_missing=train, clock=clock,
                      malloc=malloc)
