"""Peak activation memory of a callable.

On CUDA the caching allocator keeps exact statistics, so :func:`peak_memory` uses
``torch.cuda.reset_peak_memory_stats`` / ``max_memory_allocated``. On CPU, process
RSS is useless for this (weights dominate and the allocator caches), so
:class:`MemoryTracker` counts live tensor storage exactly: a ``TorchDispatchMode``
sees the output of every aten op, records each new storage (deduplicated by
``data_ptr``, so views and in-place ops count once), adds its ``nbytes`` and
subtracts them via ``weakref.finalize`` when the storage is freed.

What the tracker does *not* see: scratch buffers allocated inside a single C++
kernel (e.g. a fused attention kernel's workspace), tensors created outside
the dispatcher, and memory that existed before entry (weights, inputs) — the
result is the peak of bytes allocated *during* the call, above the entry baseline.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

__all__ = ["MemoryTracker", "peak_memory"]


def _storage_ptr(t: torch.Tensor) -> int:
    try:
        return t.untyped_storage().data_ptr()
    except (RuntimeError, NotImplementedError):  # sparse / exotic layouts
        return 0


class MemoryTracker(TorchDispatchMode):
    """Dispatch mode tracking live bytes of tensor storages created while it is active.

    Use as a context manager; afterwards ``peak`` is the maximum number of tracked
    live bytes seen and ``current`` the bytes still alive. ``devices`` restricts
    tracking to those device types (e.g. ``{"cpu"}``); ``None`` tracks all.
    """

    def __init__(self, devices: set[str] | None = None) -> None:
        super().__init__()
        self.devices = devices
        self.current = 0
        self.peak = 0
        self._live: dict[tuple[str, int], int] = {}
        self._finalizers: list[weakref.finalize] = []

    def _free(self, key: tuple[str, int], nbytes: int) -> None:
        if self._live.get(key) == nbytes:
            del self._live[key]
            self.current -= nbytes

    def _track(self, t: torch.Tensor) -> None:
        if self.devices is not None and t.device.type not in self.devices:
            return
        if t.device.type == "meta":
            return
        try:
            storage = t.untyped_storage()
        except (RuntimeError, NotImplementedError):  # sparse / exotic layouts
            return
        nbytes = storage.nbytes()
        ptr = storage.data_ptr()
        if nbytes == 0 or ptr == 0:
            return
        key = (str(t.device), ptr)
        known = self._live.get(key)
        if known == nbytes:
            return
        if known is not None:  # same address re-registered with a new size
            self.current -= known
        self._live[key] = nbytes
        self.current += nbytes
        self.peak = max(self.peak, self.current)
        self._finalizers.append(weakref.finalize(storage, self._free, key, nbytes))

    def __torch_dispatch__(
        self,
        func: Any,
        types: Any,
        args: tuple[Any, ...] = (),
        kwargs: dict[str, Any] | None = None,
    ) -> Any:
        kwargs = kwargs or {}
        # Outputs aliasing an input (in-place ops, views, out=) allocate nothing new:
        # either the input is already tracked or it predates the tracker (baseline).
        inputs = {p for p in (_storage_ptr(t) for t in tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)) if p}
        out = func(*args, **kwargs)
        for leaf in tree_leaves(out):
            if isinstance(leaf, torch.Tensor) and _storage_ptr(leaf) not in inputs:
                self._track(leaf)
        return out

    def __exit__(self, *exc: object) -> Any:
        result = super().__exit__(*exc)
        # Storages that outlive the block no longer need callbacks into this tracker.
        for fin in self._finalizers:
            fin.detach()
        self._finalizers.clear()
        return result


def _cuda_peak(fn: Callable[[], Any], device: torch.device) -> int:
    torch.cuda.synchronize(device)
    baseline = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    fn()
    torch.cuda.synchronize(device)
    return int(torch.cuda.max_memory_allocated(device) - baseline)


def peak_memory(fn: Callable[[], Any], *, device: str | torch.device | None = None) -> int:
    """Peak bytes of tensor memory allocated during ``fn()``, above the level at entry.

    ``device``: a CUDA device uses the CUDA allocator statistics (includes library
    workspaces); anything else uses the exact :class:`MemoryTracker`. ``None``
    picks CUDA if it is initialised in this process (a model was moved there),
    else the tracker. Tracking slows ``fn`` down; never time inside it.
    """
    if device is None:
        use_cuda = torch.cuda.is_available() and torch.cuda.is_initialized()
        dev = torch.device("cuda", torch.cuda.current_device()) if use_cuda else torch.device("cpu")
    else:
        dev = torch.device(device)
    if dev.type == "cuda":
        return _cuda_peak(fn, dev)
    with MemoryTracker() as tracker:
        fn()
    return int(tracker.peak)
