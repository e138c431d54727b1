"""What every method at the ``diffusion`` integration point shares: the budget over blocks and timesteps.

A :class:`DiffusionMethod` tells the diffusion adapter (``adapters/diffusion``) how to reduce the spatial
tokens of one transformer block of a diffusers denoiser at one sampling step. The adapter finds the blocks
(UNet transformer blocks, DiT blocks, plain attention blocks), captures the block input and calls
:meth:`MergeMethod.token_map` (merge before the operation, unmerge after, so the feature map keeps its
shape), :meth:`~tokenreduce.methods.diffusion.todo.ToDo.kv_map` (keys/values only) or the caching hooks
of :class:`~tokenreduce.methods.diffusion.toca.ToCa`.

``keep`` (a float in (0, 1]): the fraction of a block's spatial tokens that the reduced operation processes
(merging methods: the queries and keys of self-attention, ``N - int(N (1 - keep))`` tokens, ToMe for SD's
count at ``ratio = 1 - keep``; ToDo: the keys/values; ToCa: the tokens its MLP recomputes between full
steps). ``keep=1.0`` leaves the model untouched (bit-exact). A schedule over the sampling steps is either a
callable ``keep(t) -> float`` of the model's timestep argument ``t`` (e.g. ``lambda t: 0.5 if t > 500 else
1.0``), or a list with one keep per step, which needs ``scheduler=`` (its ``timesteps`` give the step index).
Counts (ints) are rejected: fractions only. The achieved token counts are in ``Handle.stats``.

Which blocks: those whose token grid is at most ``max_downsample`` times coarser than the model's finest
token grid (ToMe for SD's ``max_downsample``; 1 = the full-resolution blocks only, DiT: every block).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch

from ...core.budget import Keep, validate_fraction
from ...core.diffusion import merged_count, stride_partition
from ...core.errors import check_int

__all__ = ["DIFFUSION", "DiffusionMethod", "KeepSchedule", "MergeMethod", "SiteCall", "StrideMethod"]

DIFFUSION = "diffusion"

KeepSchedule = float | Sequence[float] | Callable[[float], float]

#: stride partitions a merging method keeps (one per block and timestep: 4096 covers 200 steps x 20 blocks)
PARTITIONS = 4096


@dataclass(frozen=True)
class SiteCall:
    """One reducing block at one forward: its position among the reducing blocks (``index`` of ``count``),
    name, token grid ``(h, w)``, ``downsample`` level, the model's timestep ``t`` and step index in the
    scheduler's timesteps (if known); ``run``/``tick``: the sampling run since ``tr.apply`` and its step,
    counted from the timesteps alone (a new timestep is the next step, a higher one a new run)."""

    index: int
    count: int
    name: str
    grid: tuple[int, int]
    downsample: int
    t: float
    step: int | None
    run: int = 0
    tick: int = 0

    @property
    def tokens(self) -> int:
        return self.grid[0] * self.grid[1]

    def generator(self, seed: int, salt: int = 0) -> torch.Generator:
        """A generator seeded by (seed, block, timestep): the same draws for a sample alone or in a batch, for
        both halves of a classifier-free-guidance batch, and in every run with the same seed."""
        key = (seed * 1_000_003 + self.index * 10_007 + round(self.t * 1000) + salt * 7_919) % (2**63 - 1)
        return torch.Generator().manual_seed(key)


@dataclass
class DiffusionMethod:
    """Base class: ``keep`` (float, per-step list or callable), ``max_downsample``, ``scheduler`` (needed by
    per-step lists and by caching methods), ``seed``."""

    keep: KeepSchedule = 1.0
    max_downsample: int = 1
    scheduler: Any = None
    seed: int = 0
    caches: ClassVar[bool] = False  # ToCa-style: reuse features across steps (needs fixed timesteps)
    kv_only: ClassVar[bool] = False  # reduces keys/values only (queries at full resolution)

    def __post_init__(self) -> None:
        k = self.keep
        if isinstance(k, Keep):  # what the public boundary makes of a list: a per-step schedule
            if k.value is None:
                raise TypeError(f"keep={k!r}: diffusion methods take fractions (a float, one float per sampling "
                                "step, or a callable keep(t)); token counts and thresholds are not accepted here")
            k = self.keep = k.value
        if callable(k):
            pass
        elif isinstance(k, (list, tuple)):
            if not k:
                raise ValueError("a keep schedule must have one value per sampling step, got an empty list")
            self.keep = tuple(validate_fraction(v, f"keep[{i}]") for i, v in enumerate(k))
            if self.scheduler is None:
                raise ValueError("a per-step keep list needs scheduler= (a diffusers scheduler whose timesteps give "
                                 "the step index); or pass a callable keep(t) of the timestep")
        else:
            validate_fraction(k)
        check_int("max_downsample", self.max_downsample, 1, "1, 2, 4, 8: the coarsest token grid reduced")

    @property
    def is_identity(self) -> bool:
        return not callable(self.keep) and all(v == 1.0 for v in (self.keep if isinstance(self.keep, tuple)
                                                                  else (self.keep,)))

    def keep_at(self, t: float, step: int | None) -> float:
        """The keep of the forward at timestep ``t`` (step index ``step``, None if unknown)."""
        k = self.keep
        if isinstance(k, tuple):
            if step is None or not 0 <= step < len(k):
                raise ValueError(f"keep has {len(k)} per-step values but the forward at timestep {t} is step "
                                 f"{step} of the scheduler's timesteps; give one keep per sampling step")
            return k[step]
        if callable(k):
            return validate_fraction(k(t), f"keep({t})")
        return k

    def min_keep(self) -> float:
        """The smallest keep this method accepts at a block (errors name it)."""
        return 0.0


@dataclass
class MergeMethod(DiffusionMethod):
    """A method that maps a block's tokens to fewer slots (:class:`~tokenreduce.core.diffusion.MergeMap`)
    before ``merge_attn`` (self-attention), ``merge_crossattn`` (the queries of cross-attention) and
    ``merge_mlp`` (the feed-forward), and maps the outputs back (ToMe for SD's three switches and defaults).

    ``rematch`` (int >= 1): build a block's token map at every ``rematch``-th sampling step of a run and reuse
    it at the steps in between (on that step's tokens: merge and unmerge still read the current features).
    1, the default, is every paper's own per-step matching. Larger values amortise the matching over steps, the
    "sequential redundancy (pattern reuse)" of ToMA (Lu et al., ICML 2025), whose release reuses destinations
    and merge weights across steps and across the blocks of a group (here: across steps only, per block):
    neighbouring steps' features, and so their best matches, change little. A map is rebuilt whenever the
    batch size or keep changes, and at the first step of every run."""

    merge_attn: bool = True
    merge_crossattn: bool = False
    merge_mlp: bool = False
    rematch: int = 1
    _maps: dict = field(default_factory=dict, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        super().__post_init__()
        check_int("rematch", self.rematch, 1, "build the token maps every rematch-th sampling step (1: every step)")

    @property
    def ops(self) -> frozenset[str]:
        on = {"attn": self.merge_attn, "cross": self.merge_crossattn, "mlp": self.merge_mlp}
        return frozenset(k for k, v in on.items() if v)

    def token_map(self, site: SiteCall, metric: torch.Tensor, keep: float) -> Any:
        raise NotImplementedError

    def map_for(self, site: SiteCall, metric: torch.Tensor, keep: float) -> Any:
        """The token map of this block call: :meth:`token_map`, or with ``rematch > 1`` the block's map of an
        earlier step of this run (fewer than ``rematch`` steps back, same batch size and keep)."""
        if self.rematch == 1:
            return self.token_map(site, metric, keep)
        batch = metric.shape[0]
        hit = self._maps.get(site.index)
        if hit is not None:
            run, tick, b, k, m = hit
            if run == site.run and 0 < site.tick - tick < self.rematch and b == batch and k == keep:
                return m
        m = self.token_map(site, metric, keep)
        self._maps[site.index] = (site.run, site.tick, batch, keep, m)
        return m


@dataclass
class StrideMethod(MergeMethod):
    """Merging on ToMe for SD's partition: one destination per ``sy x sx`` window (chosen at random per block
    and step when ``use_rand``, seeded by ``seed``; else the top-left cell), every other token a source."""

    sx: int = 2
    sy: int = 2
    use_rand: bool = True
    _partitions: dict = field(default_factory=dict, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        super().__post_init__()
        check_int("sx", self.sx, 1, "stride of the destination windows")
        check_int("sy", self.sy, 1, "stride of the destination windows")
        if self.sx * self.sy < 2:
            raise ValueError("sx * sy must be >= 2: a 1x1 window has no source token to merge")
        if not callable(self.keep):
            low = min(self.keep) if isinstance(self.keep, tuple) else self.keep
            if low < self.min_keep():
                raise ValueError(f"keep={low} leaves fewer tokens than one per {self.sy}x{self.sx} stride window: "
                                 f"accepted keep >= {self.min_keep():.4g} (1/(sx*sy)), or a smaller stride")

    def min_keep(self) -> float:
        return 1.0 / (self.sx * self.sy)

    def partition(self, site: SiteCall, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """``(src, dst)`` of the block at this step. A function of (seed, block, timestep) only, so it is kept
        (up to ``PARTITIONS`` of them): sampling again at the same timesteps reuses it."""
        key = (self.seed, self.sx, self.sy, self.use_rand, site.grid, device,
               (site.index, round(site.t * 1000)) if self.use_rand else None)
        part = self._partitions.get(key)
        if part is None:
            h, w = site.grid
            choice = None
            if self.use_rand:
                choice = torch.randint(self.sx * self.sy, (h // self.sy, w // self.sx),
                                       generator=site.generator(self.seed))
            if len(self._partitions) >= PARTITIONS:
                self._partitions.clear()
            part = self._partitions[key] = stride_partition(h, w, self.sx, self.sy, choice, device)
        return part

    def merged(self, site: SiteCall, keep: float, sources: int) -> int:
        """Tokens to merge away at ``keep`` (ToMe for SD's ``int(N * ratio)``), or a ValueError if that leaves
        fewer tokens than one per stride window."""
        r = merged_count(site.tokens, keep)
        if r > sources:
            windows = site.tokens - sources
            raise ValueError(
                f"keep={keep} keeps {site.tokens - r} of {site.tokens} tokens at block {site.name!r} "
                f"({site.grid[0]}x{site.grid[1]} grid), fewer than one per {self.sy}x{self.sx} stride window "
                f"({windows} windows): accepted keep >= {windows / site.tokens:.4g}, or a smaller stride")
        return r
