"""The cells of `tokenreduce bench diffusion` (:mod:`.diffusion`): what one worker computes for one denoiser.

A cell's rows are a function of its settings only: every sample's initial noise has its own generator
(:func:`~tokenreduce.models.diffusion.sample`), the methods draw from generators seeded per block and step, and
the ``tomesd`` package, which forks the process's global generator when a patched model first runs, gets
``torch.manual_seed(seed)`` first (inside ``fork_rng``: the process's generator is left as it was). So a cell
gives the same rows in any order, in any process and on any executor.

* the unreduced cell: FID and class accuracy of ``n_samples`` class-balanced samples (DDIM, classifier-free
  guidance) in the space of the digit network trained here, peak tensor memory of one denoiser forward;
* a method's keeps: keep=1 checked bit-exact on the first ``exact_samples`` samples (its quality is then the
  unreduced one); below 1, FID, class accuracy, PSNR/SSIM against the unreduced samples of the same seeds,
  the kept token counts, peak memory; on the UNet, the ``tomesd`` package (0.1.3) at ``ratio = 1 - keep``
  beside our ``tomesd``;
* a timing cell adds one interleaved group (:func:`~tokenreduce.bench.timing.interleaved`): the unreduced
  sampling loop on ``time_batch`` images, each keep, each keep's **zero-overhead limit**
  (:mod:`tokenreduce.methods.diffusion.limit`: the same operations of the same blocks on the same token
  counts, by slicing) and the package, so every ratio shares the machine's noise.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

import tokenreduce as tr

from ..accounting.memory import peak_memory
from ..adapters.base import find_adapter
from ..methods.diffusion.limit import SliceCache, SliceKV, SliceMerge
from .smoke import SMOKE_MODEL, smoke_denoiser, smoke_digit_features
from .sweep import Cell, budget_tuple, without_metadata
from .timing import fixed_threads, interleaved, retain_freed_memory, speedup, timing_clock

__all__ = ["PEER", "DiffusionContext", "Sampler", "load_diffusion_context", "model_kind", "reduced",
           "run_diffusion_cell", "zero_overhead_limit"]

#: the ``tomesd`` package's rows (method name)
PEER = "tomesd-package"
#: our ``tomesd``'s options that the package takes under the same name (the package runs with the same ones)
PEER_OPTIONS = ("max_downsample", "sx", "sy", "use_rand", "merge_attn", "merge_crossattn", "merge_mlp")


def model_kind(name: str) -> str:
    """``"unet"`` or ``"dit"`` from a cell's model name (``"unet/<checkpoint>"``, ``"smoke/dit"``)."""
    head, _, tail = name.partition("/")
    return tail if head == SMOKE_MODEL else head


# ---------------------------------------------------------------------------- the denoiser a cell runs on
@dataclass
class DiffusionContext:
    """What every cell of one denoiser shares in a worker: the model, the digit network of FID and class
    accuracy (against ``n_real`` held-out real images), and what cells compute on first use (the unreduced
    samples, the FID scorer), kept under the settings they depend on."""

    kind: str
    model: Any
    features: Any
    n_real: int
    _memo: dict[tuple[Any, ...], Any] = field(default_factory=dict, repr=False)

    def memo(self, key: tuple[Any, ...], fn: Callable[[], Any]) -> Any:
        if key not in self._memo:
            self._memo[key] = fn()
        return self._memo[key]


def load_diffusion_context(name: str, retain: bool = False) -> DiffusionContext:
    """The context of cell model ``name``: the trained denoiser and digit network cached in ~/.cache/tokenreduce
    (missing: the loader's FileNotFoundError names the ``tokenreduce train`` command), or the smoke ones
    (``"smoke/<kind>"``). ``retain``: this process keeps freed memory (:func:`retain_freed_memory`)."""
    if retain:
        retain_freed_memory()
    kind = model_kind(name)
    if name.startswith(f"{SMOKE_MODEL}/"):
        return DiffusionContext(kind, smoke_denoiser(kind), smoke_digit_features(), n_real=32)
    from ..models.diffusion import load_denoiser, load_features

    return DiffusionContext(kind, load_denoiser(kind)[0], load_features(train_if_missing=False)[0], n_real=1000)


class Sampler:
    """A cell's sampling settings over a context: DDIM scheduler, class-balanced labels, the sampler, and the
    unreduced results (computed once per worker and settings)."""

    def __init__(self, ctx: DiffusionContext, s: dict[str, Any]) -> None:
        from ..models.diffusion import ddim_scheduler

        self.ctx, self.s = ctx, s
        self.sched = ddim_scheduler(ctx.model.config, s["steps"])
        self.labels = torch.arange(s["n_samples"]) % 10
        self.tlabels = torch.arange(s["time_batch"]) % 10
        self._key = (s["steps"], s["guidance"], s["seed"], s["threads"])

    def gen(self, model: Any = None, labels: Tensor | None = None) -> Tensor:
        from ..models.diffusion import sample

        return sample(self.ctx.model if model is None else model, self.labels if labels is None else labels,
                      steps=self.s["steps"], guidance=self.s["guidance"], seed=self.s["seed"], scheduler=self.sched,
                      batch_size=32)

    def base(self) -> Tensor:
        return self.ctx.memo(("base", self.s["n_samples"], *self._key), self.gen)

    def base_exact(self) -> Tensor:
        """The first ``exact_samples`` unreduced samples drawn as one batch (keep=1 is compared on the same
        batch: GEMM blocking depends on it)."""
        n = self.s["exact_samples"]
        return self.ctx.memo(("exact", n, *self._key), lambda: self.gen(labels=self.labels[:n]))

    def quality(self, images: Tensor) -> dict[str, float]:
        """FID and class accuracy of ``images`` (samples of :attr:`labels`)."""
        from ..models.diffusion.features import FidScorer

        scorer = self.ctx.memo(("scorer", self.s["threads"]),
                               lambda: FidScorer(self.ctx.features, n_real=self.ctx.n_real))
        return scorer(images, self.labels)

    def base_quality(self) -> dict[str, float]:
        return self.ctx.memo(("base_quality", self.s["n_samples"], *self._key), lambda: self.quality(self.base()))

    def peak_mem_mb(self, model: Any = None) -> float:
        """Peak tensor memory (MiB) of one denoiser forward on the guided batch of ``time_batch`` images."""
        n = 2 * self.s["time_batch"]
        x = torch.randn(n, 1, 32, 32, generator=torch.Generator().manual_seed(self.s["seed"]))
        args = (x, torch.full((n,), int(self.sched.timesteps[0])), torch.arange(n) % 11)
        m = self.ctx.model if model is None else model
        with torch.no_grad():  # sampling runs without autograd: its saved activations are not inference memory
            return peak_memory(lambda: m(*args)) / 2**20

    def base_mem_mb(self) -> float:
        return self.ctx.memo(("base_mem", self.s["time_batch"], *self._key), self.peak_mem_mb)

    def method_kw(self, method: str) -> dict[str, Any]:
        """The method's keyword arguments (the cells' ``method_kw``); a caching method gets the scheduler."""
        kw = dict(self.s.get("method_kw", {}))
        if method == "toca":
            kw.setdefault("scheduler", self.sched)
        return kw


@contextmanager
def reduced(model: Any, method: str, keep: float, kw: dict[str, Any], seed: int) -> Iterator[Any]:
    """``model``'s denoiser reduced by ``method`` at ``keep`` (yields the handle), or by the ``tomesd`` package
    for :data:`PEER` (``ratio = 1 - keep`` and our ``tomesd``'s :data:`PEER_OPTIONS` in ``kw``; its random choice
    forked from the global generator seeded by ``seed``; yields None)."""
    if method != PEER:
        with tr.apply(model.net, method, keep=keep, **kw) as h:
            yield h
        return
    import tomesd

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        _patch_peer(model.net, keep, kw)
        try:
            yield None
        finally:
            tomesd.remove_patch(model.net)


def _patch_peer(net: Any, keep: float, kw: dict[str, Any]) -> None:
    """The ``tomesd`` package on ``net`` at ``ratio = 1 - keep`` with the options of our ``tomesd`` it shares."""
    import tomesd

    tomesd.apply_patch(net, ratio=1.0 - keep, **{k: v for k, v in kw.items() if k in PEER_OPTIONS})


def _fidelity(images: Tensor, base: Tensor) -> dict[str, float]:
    """Same-seed fidelity to the unreduced samples: mean per-image PSNR and SSIM (pixels in [-1, 1])."""
    from torchmetrics.functional.image import peak_signal_noise_ratio, structural_similarity_index_measure

    psnr = peak_signal_noise_ratio(images, base, data_range=2.0, dim=(1, 2, 3), reduction="elementwise_mean")
    ssim = structural_similarity_index_measure(images, base, data_range=2.0)
    return {"psnr": float(psnr), "ssim": float(ssim)}


# ---------------------------------------------------------------------------- quality
def _base_row(sp: Sampler) -> dict[str, Any]:
    return {"model": sp.ctx.kind, "method": "none", "keep": 1.0, **sp.base_quality(), "psnr": None, "ssim": 1.0,
            "speedup": 1.0, "limit_speedup": 1.0, "efficiency": 1.0, "peak_mem_mb": sp.base_mem_mb(),
            "keep_achieved": 1.0}


def _identity_row(sp: Sampler, method: str, kw: dict[str, Any]) -> dict[str, Any]:
    """keep=1: bit-exact on the first samples, its quality is then the unreduced one's."""
    n = sp.s["exact_samples"]
    with reduced(sp.ctx.model, method, 1.0, kw, sp.s["seed"]):
        diff = (sp.gen(labels=sp.labels[:n]) - sp.base_exact()).abs().max().item()
    exact = diff == 0.0
    return {"model": sp.ctx.kind, "method": method, "keep": 1.0, "bit_exact": exact, "identity_max_diff": diff,
            **({k: sp.base_quality()[k] for k in ("fid", "class_acc")} if exact else {}),
            "psnr": math.inf if exact else None, "ssim": 1.0 if exact else None, "keep_achieved": 1.0,
            "speedup": 1.0, "limit_speedup": 1.0, "efficiency": 1.0, "peak_mem_mb": sp.base_mem_mb()}


def _reduced_row(sp: Sampler, method: str, keep: float, kw: dict[str, Any]) -> dict[str, Any]:
    model, seed = sp.ctx.model, sp.s["seed"]
    with reduced(model, method, keep, kw, seed) as h:
        images = sp.gen()
        st = h.stats if h is not None else None
    row = {"model": sp.ctx.kind, "method": method, "keep": keep, **sp.quality(images), **_fidelity(images, sp.base())}
    if st is not None:
        row.update({"keep_achieved": st.keep_run, "tokens_attn": list(st.tokens_attn), "tokens_kv": list(st.tokens_kv),
                    "tokens_mlp": list(st.tokens_mlp), "site_tokens": list(st.site_tokens)})
        with reduced(model, method, keep, kw, seed):
            row["peak_mem_mb"] = sp.peak_mem_mb()
    return row


def _quality(sp: Sampler, method: str, keeps: Sequence[float]) -> list[dict[str, Any]]:
    """The method's rows at ``keeps`` (a keep the method refuses: an error row), then the package's beside
    our ``tomesd`` on the UNet."""
    kw = sp.method_kw(method)
    rows = []
    for keep in keeps:
        try:
            rows.append(_identity_row(sp, method, kw) if keep == 1.0 else _reduced_row(sp, method, keep, kw))
        except ValueError as e:  # e.g. a keep leaving fewer tokens than one per stride window
            rows.append({"model": sp.ctx.kind, "method": method, "keep": keep, "error": str(e)})
    if sp.s.get("peers") and method == "tomesd":
        rows += [_reduced_row(sp, PEER, keep, kw) for keep in keeps if keep < 1.0]
    return rows


# ---------------------------------------------------------------------------- timing
def zero_overhead_limit(method: str, keep: float, kw: dict[str, Any], row: dict[str, Any]) -> Any:
    """The zero-overhead reference of ``method`` at ``keep`` with options ``kw``: the same operations on its kept
    counts, read from ``row``'s ``tokens_attn`` / ``tokens_kv`` / ``tokens_mlp`` (a quality row, or the method's
    ``Handle.stats``' lists)."""
    if method == "toca":
        return SliceCache(keep=keep, **kw)
    flags = {k: kw[k] for k in ("max_downsample",) if k in kw}
    if method == "todo":
        return SliceKV(keep=keep, counts={i: int(k) for i, k in enumerate(row["tokens_kv"])}, **flags)
    flags |= {k: kw[k] for k in ("merge_attn", "merge_crossattn", "merge_mlp") if k in kw}
    counts = {i: int(k) for i, k in enumerate(row["tokens_attn"])}
    if not kw.get("merge_attn", True):
        counts = {i: int(k) for i, k in enumerate(row["tokens_mlp"])}
    return SliceMerge(keep=keep, counts=counts, **flags)


def _caller(sp: Sampler, model: Any) -> Callable[[], Tensor]:
    return lambda: sp.gen(model, sp.tlabels)


def _time_group(sp: Sampler, method: str, rows: list[dict[str, Any]]) -> None:
    """One interleaved group: the unreduced sampling loop, each keep below 1, its limit and the package's; adds
    the timing columns to ``rows``."""
    s, model = sp.s, sp.ctx.model
    kw = sp.method_kw(method)
    group: dict[str, Callable[[], Any]] = {"none": _caller(sp, model)}
    handles = []
    for row in rows:
        keep = row["keep"]
        if "error" in row or keep == 1.0:
            continue
        copied = copy.deepcopy(model)
        group[f"{row['method']}@{keep}"] = _caller(sp, copied)
        if row["method"] == PEER:
            _patch_peer(copied.net, keep, kw)
            continue
        handles.append(tr.apply(copied.net, method, keep=keep, **kw))
        lc = copy.deepcopy(model)
        group[f"limit@{keep}"] = _caller(sp, lc)
        handles.append(find_adapter(lc.net).attach(lc.net, zero_overhead_limit(method, keep, kw, row), "limit"))
    timings = interleaved(group, warmup=s["warmup"], repeats=s["repeats"], rotate=True,
                          clock=timing_clock(s["clock"], s["device"]))
    for h in handles:
        h.remove()
    base_t = timings["none"].median / s["time_batch"] * 1e3
    for row in rows:
        if "error" in row:
            continue
        keep, name = row["keep"], f"{row['method']}@{row['keep']}"
        row["base_time_per_image_ms"] = base_t
        if name not in timings:  # keep=1: the unreduced model
            row.update(speedup=1.0, limit_speedup=1.0, efficiency=1.0, time_per_image_ms=base_t)
            continue
        sp_ = speedup(timings["none"], timings[name], paired=True)
        row.update(speedup=sp_.ratio, speedup_low=sp_.low, speedup_high=sp_.high,
                   time_per_image_ms=timings[name].median / s["time_batch"] * 1e3)
        if f"limit@{keep}" in timings:
            lim = speedup(timings["none"], timings[f"limit@{keep}"], paired=True)
            # efficiency: per round, limit time / method time (paired like the speedup: noise that hits a round
            # hits both); its median and quartiles
            eff = speedup(timings[f"limit@{keep}"], timings[name], paired=True)
            row.update(limit_speedup=lim.ratio, efficiency=eff.ratio, efficiency_low=eff.low, efficiency_high=eff.high)


def run_diffusion_cell(ctx: DiffusionContext, cell: Cell) -> list[dict[str, Any]]:
    """The rows of one cell: the unreduced model's, or a method's at the cell's keeps (quality; with
    ``cell.timing`` also the interleaved timing group; in the timing part on the quality rows given)."""
    s = dict(cell.settings)
    with fixed_threads(s["threads"]):
        sp = Sampler(ctx, s)
        if cell.method == "none":
            return [_base_row(sp)]
        rows = without_metadata(list(cell.given)) if cell.given else _quality(sp, cell.method, budget_tuple(cell.keep))
        if cell.timing:
            _time_group(sp, cell.method, rows)
    return rows
