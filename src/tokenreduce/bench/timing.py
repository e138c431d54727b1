"""Wall-clock timing for benchmarks on noisy machines.

Rules this module is built around (the project's measurement rules):

* compare timings only *within one run*, against the unreduced model measured in
  the same run;
* warm up, repeat, and report the median together with a spread (IQR);
* on a shared machine, run the candidates **interleaved** (ABCABC...) so that
  load spikes from other jobs hit every candidate equally — :func:`interleaved`
  is the main entry point for that reason.

``torch.inference_mode()`` / ``torch.no_grad()`` are the caller's business: wrap
the callables (or the call to :func:`interleaved`) yourself.
"""

from __future__ import annotations

import gc
import math
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import torch

__all__ = [
    "CLOCKS",
    "CUDA_CLOCK",
    "Speedup",
    "Timing",
    "fixed_threads",
    "interleaved",
    "measure",
    "paired_ratios",
    "quantile",
    "retain_freed_memory",
    "speedup",
    "timing_clock",
]

SyncArg = Callable[[], None] | str | None


def quantile(values: list[float] | tuple[float, ...], q: float) -> float:
    """Quantile ``q`` in [0, 1] with linear interpolation (numpy's default method)."""
    if not values:
        raise ValueError("quantile of an empty sequence")
    if not 0.0 <= q <= 1.0:
        raise ValueError(f"q must be in [0, 1], got {q}")
    xs = sorted(values)
    pos = (len(xs) - 1) * q
    lo = math.floor(pos)
    hi = math.ceil(pos)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


@dataclass(frozen=True)
class Timing:
    """Repeated wall-clock samples of one callable, in seconds (one call per sample)."""

    times: list[float] = field(default_factory=list)

    def __post_init__(self) -> None:
        if not self.times:
            raise ValueError("Timing needs at least one sample")

    @property
    def n(self) -> int:
        """Number of samples."""
        return len(self.times)

    @property
    def median(self) -> float:
        return quantile(self.times, 0.5)

    @property
    def q1(self) -> float:
        """First quartile (25th percentile)."""
        return quantile(self.times, 0.25)

    @property
    def q3(self) -> float:
        """Third quartile (75th percentile)."""
        return quantile(self.times, 0.75)

    @property
    def iqr(self) -> float:
        """Inter-quartile range ``q3 - q1`` in seconds."""
        return self.q3 - self.q1

    @property
    def mean(self) -> float:
        return sum(self.times) / len(self.times)

    @property
    def min(self) -> float:
        return min(self.times)

    @property
    def max(self) -> float:
        return max(self.times)

    @property
    def spread(self) -> float:
        """Relative spread: ``iqr / median`` (0.05 means the IQR is 5 % of the median)."""
        med = self.median
        return self.iqr / med if med > 0 else math.inf

    def to_dict(self) -> dict[str, Any]:
        """Summary plus raw samples, JSON-serialisable (used by the results writer)."""
        return {
            "median": self.median,
            "iqr": self.iqr,
            "q1": self.q1,
            "q3": self.q3,
            "mean": self.mean,
            "min": self.min,
            "max": self.max,
            "spread": self.spread,
            "n": self.n,
            "times": list(self.times),
        }

    def __str__(self) -> str:
        return f"{self.median * 1e3:.3f} ms ± {self.spread * 100:.1f}% (IQR/median, n={self.n})"


class Speedup(NamedTuple):
    """Speed-up of a candidate over a base: ``ratio`` > 1 means the candidate is faster.

    ``low``/``high`` bracket the ratio (see :func:`speedup` for how).
    """

    ratio: float
    low: float
    high: float


@contextmanager
def fixed_threads(n: int | None) -> Iterator[int]:
    """Run the block with ``torch.set_num_threads(n)``, restoring the previous value on exit.

    ``n=None`` leaves the thread count alone (yields the current value). Inter-op
    threads are not touched: torch only allows setting them once per process.
    """
    previous = torch.get_num_threads()
    if n is None:
        yield previous
        return
    if n < 1:
        raise ValueError(f"number of threads must be >= 1, got {n}")
    torch.set_num_threads(n)
    try:
        yield torch.get_num_threads()
    finally:
        torch.set_num_threads(previous)


_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # glibc <malloc.h>
RETAIN_BYTES = 1 << 30


def retain_freed_memory(nbytes: int = RETAIN_BYTES) -> str:
    """Keep freed blocks of up to ``nbytes`` in the process heap instead of returning them to the OS.

    glibc serves large allocations (above a threshold that adapts between 128 KiB and 32 MiB) with
    ``mmap`` and unmaps them on free, and trims the heap top; the next tensor of that size then pays one
    page fault per 4 KiB on first touch. A forward pass that allocates tens of MB of activations per
    call pays this every call: on this machine a ToMe merge step (batch 64, 257 tokens, the first reference ViT's width 96) took
    ~4,000 minor faults per call, about half its time. Fixing the thresholds (``mallopt``
    M_MMAP_THRESHOLD and M_TRIM_THRESHOLD) is the glibc counterpart of the jemalloc/tcmalloc advice in
    PyTorch's CPU performance guide. It applies to the whole process and every candidate of a
    benchmark equally, and cannot be undone (glibc's adaptive threshold stays off).

    Returns a description for the run's metadata: ``"glibc mallopt: mmap/trim threshold <n>"`` or
    ``"unavailable (...)"`` when the C library is not glibc.
    """
    if nbytes < 0 or nbytes > 2**31 - 1:
        raise ValueError(f"nbytes must be in 0..{2**31 - 1} (a C int), got {nbytes}")
    try:
        import ctypes
        import ctypes.util

        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError) as e:  # not glibc (musl, macOS, Windows)
        return f"unavailable ({type(e).__name__})"
    for n in (nbytes, min(nbytes, 32 << 20)):  # older glibc caps the mmap threshold at 32 MiB
        if mallopt(_M_MMAP_THRESHOLD, n) == 1 and mallopt(_M_TRIM_THRESHOLD, n) == 1:
            return f"glibc mallopt: mmap/trim threshold {n}"
    return "unavailable (mallopt refused)"


def _resolve_sync(sync: SyncArg) -> Callable[[], None] | None:
    if sync is None:
        return None
    if callable(sync):
        return sync
    if sync == "auto":
        # Only synchronise if CUDA is actually in use; never initialise it ourselves.
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            return torch.cuda.synchronize
        return None
    raise ValueError(f"sync must be a callable, 'auto' or None, got {sync!r}")


CLOCKS: dict[str, Callable[[], float]] = {"wall": time.perf_counter, "cpu": time.process_time}
#: GPU time between two CUDA events recorded around the calls (the stream synchronised first and after)
CUDA_CLOCK = "cuda"


def _clock(clock: str) -> Callable[[], float] | None:
    """``"wall"``: elapsed time. ``"cpu"``: CPU seconds of this process, immune to time slices lost to other
    processes on a shared machine; it equals the compute time of a call only with one torch thread (with
    more, it sums every thread's CPU, spin-waits included). ``"cuda"``: CUDA events (returns None)."""
    if clock == CUDA_CLOCK:
        if not torch.cuda.is_available():
            raise ValueError("clock='cuda' times with CUDA events and needs a CUDA device; torch sees none")
        return None
    if clock not in CLOCKS:
        raise ValueError(f"clock must be one of {sorted(CLOCKS)} or {CUDA_CLOCK!r}, got {clock!r}")
    return CLOCKS[clock]


def timing_clock(clock: str, device: str) -> str:
    """The clock a benchmark times with: CUDA events for ``device="cuda"`` (a CPU clock would time only the
    kernel launches), else ``clock`` (``"cpu"`` on CUDA is refused)."""
    if device == "cuda":
        if clock == "cpu":
            raise ValueError("clock='cpu' measures this process's CPU time, not GPU work: use clock='wall' with "
                             "device='cuda' (timed with CUDA events)")
        return CUDA_CLOCK
    return clock


def _time_cuda(fn: Callable[[], Any], number: int) -> float:
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    torch.cuda.synchronize()
    start.record()
    for _ in range(number):
        fn()
    end.record()
    end.synchronize()
    return start.elapsed_time(end) / 1e3 / number


def _time_once(fn: Callable[[], Any], sync: Callable[[], None] | None, number: int = 1,
               clock: Callable[[], float] | None = time.perf_counter) -> float:
    """Seconds per call, averaged over ``number`` back-to-back calls (``clock=None``: CUDA events)."""
    if clock is None:
        return _time_cuda(fn, number)
    if sync is not None:
        sync()
    start = clock()
    for _ in range(number):
        fn()
    if sync is not None:
        sync()
    return (clock() - start) / number


@contextmanager
def _gc_paused(pause: bool) -> Iterator[None]:
    """Collect once, then keep the cyclic GC from firing inside the timed region."""
    if not pause:
        yield
        return
    was_enabled = gc.isenabled()
    gc.collect()
    gc.disable()
    try:
        yield
    finally:
        if was_enabled:
            gc.enable()


def measure(
    fn: Callable[[], Any],
    *,
    warmup: int = 2,
    repeats: int = 7,
    min_time: float = 0.0,
    max_repeats: int = 10_000,
    number: int = 1,
    sync: SyncArg = "auto",
    pause_gc: bool = True,
    clock: str = "wall",
) -> Timing:
    """Time ``fn()``: ``warmup`` untimed calls, then at least ``repeats`` timed calls.

    Sampling continues past ``repeats`` until the timed calls add up to at least
    ``min_time`` seconds (capped at ``max_repeats`` samples). Each sample is the mean
    time per call over ``number`` back-to-back calls (default 1; raise it only for
    sub-millisecond functions where timer overhead matters).
    ``sync`` is called before and after each call ("auto": ``torch.cuda.synchronize``
    if CUDA is initialised). Python's cyclic GC is paused while timing (like
    :mod:`timeit`) unless ``pause_gc=False``.

    ``clock``: ``"wall"`` (default) or ``"cpu"`` (process CPU time, see :func:`_clock`).

    Prefer :func:`interleaved` when comparing candidates on a shared machine.
    """
    if warmup < 0 or repeats < 1 or number < 1:
        raise ValueError("need warmup >= 0, repeats >= 1 and number >= 1")
    sync_fn = _resolve_sync(sync)
    tick = _clock(clock)
    for _ in range(warmup):
        fn()
    times: list[float] = []
    with _gc_paused(pause_gc):
        while len(times) < repeats or (sum(times) * number < min_time and len(times) < max_repeats):
            times.append(_time_once(fn, sync_fn, number, tick))
    return Timing(times)


def interleaved(
    fns: Mapping[str, Callable[[], Any]],
    warmup: int = 2,
    repeats: int = 7,
    *,
    rotate: bool = False,
    number: int = 1,
    sync: SyncArg = "auto",
    pause_gc: bool = True,
    on_round: Callable[[int], None] | None = None,
    clock: str = "wall",
) -> dict[str, Timing]:
    """Time several candidates round-robin (ABCABC...) so machine noise hits all of them.

    Runs ``warmup`` untimed rounds and then ``repeats`` timed rounds; in each round
    every candidate is called once. With ``rotate=True`` the starting candidate
    shifts every round (ABC, BCA, CAB, ...) to also cancel position effects (e.g.
    a candidate always running right after a cache-thrashing one). Sample ``i`` of
    every candidate comes from round ``i``, so samples are paired across candidates
    (see ``speedup(..., paired=True)``). ``on_round(i)`` is called after each timed
    round (progress bars). ``number``: calls per sample and ``clock`` (``"wall"`` or ``"cpu"``), as in
    :func:`measure`. Returns ``{name: Timing}`` in the order of ``fns``.
    """
    if not fns:
        raise ValueError("interleaved() needs at least one candidate")
    if warmup < 0 or repeats < 1 or number < 1:
        raise ValueError("need warmup >= 0, repeats >= 1 and number >= 1")
    names = list(fns)
    sync_fn = _resolve_sync(sync)
    tick = _clock(clock)

    def order(round_idx: int) -> list[str]:
        if not rotate:
            return names
        k = round_idx % len(names)
        return names[k:] + names[:k]

    for r in range(warmup):
        for name in order(r):
            fns[name]()
    samples: dict[str, list[float]] = {name: [] for name in names}
    with _gc_paused(pause_gc):
        for r in range(repeats):
            for name in order(r):
                samples[name].append(_time_once(fns[name], sync_fn, number, tick))
            if on_round is not None:
                on_round(r)
    return {name: Timing(samples[name]) for name in names}


def speedup(base: Timing, other: Timing, *, paired: bool = False) -> Speedup:
    """Speed-up of ``other`` relative to ``base`` (``base time / other time``).

    Unpaired (default): ``ratio = median(base) / median(other)`` with the
    conservative bracket ``low = q1(base) / q3(other)``, ``high = q3(base) / q1(other)``.

    ``paired=True`` (for samples from the same rounds of :func:`interleaved`): the
    per-round ratios ``base[i] / other[i]`` are formed and their median and
    quartiles are returned; this cancels noise that hit both candidates in a round.
    """
    if paired:
        ratios = paired_ratios(base.times, other.times)
        return Speedup(quantile(ratios, 0.5), quantile(ratios, 0.25), quantile(ratios, 0.75))
    return Speedup(base.median / other.median, base.q1 / other.q3, base.q3 / other.q1)


def paired_ratios(base: Sequence[float], other: Sequence[float]) -> list[float]:
    """Per-round ratios ``base[i] / other[i]`` of samples from the same rounds of :func:`interleaved`
    (> 1: ``other`` is faster); ``base`` and ``other`` must have the same number of samples."""
    if len(base) != len(other):
        raise ValueError(f"paired speedup needs equal sample counts ({len(base)} vs {len(other)})")
    return [b / o for b, o in zip(base, other, strict=True)]
