"""What every adapter shares: the adapter registry, the `Handle` returned by `tr.apply`, and exact
patch/restore bookkeeping."""

from __future__ import annotations

import types
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol, Self

from torch import nn

__all__ = ["ADAPTERS", "Adapter", "Handle", "Patcher", "Stats", "find_adapter", "register_adapter"]

_MISSING = object()
_MARK = "_tokenreduce_handle"


class Adapter(Protocol):
    name: str  # family name shown to users
    integration: str  # integration point its methods are registered at

    def matches(self, model: nn.Module) -> bool: ...

    def attach(self, model: nn.Module, method: Any, method_name: str) -> Handle: ...


ADAPTERS: list[Adapter] = []
# Modules that register adapters, in matching order (the first adapter whose `matches` is true wins).
ADAPTER_MODULES: list[str] = ["vit", "vlm", "llm", "encoder", "diffusion"]


def register_adapter(adapter: Adapter) -> Adapter:
    ADAPTERS.append(adapter)
    return adapter


def find_adapter(model: nn.Module) -> Adapter:
    """The adapter for ``model`` or a TypeError naming the supported families."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"tr.apply expects a torch.nn.Module, got {type(model).__name__}")
    import importlib

    for mod in ADAPTER_MODULES:  # importing registers the adapters
        importlib.import_module(f"tokenreduce.adapters.{mod}")

    for a in ADAPTERS:
        if a.matches(model):
            return a
    fams = "; ".join(a.name for a in ADAPTERS)
    raise TypeError(f"unsupported model {type(model).__name__}: tokenreduce supports {fams}")


class Patcher:
    """Sets attributes/hooks on modules and undoes them exactly (instance attributes are deleted again,
    pre-existing ones restored)."""

    def __init__(self) -> None:
        self._undo: list[Callable[[], None]] = []

    def set_attr(self, obj: Any, name: str, value: Any) -> None:
        old = obj.__dict__.get(name, _MISSING)

        def undo() -> None:
            if old is _MISSING:
                obj.__dict__.pop(name, None)
            else:
                obj.__dict__[name] = old

        obj.__dict__[name] = value
        self._undo.append(undo)

    def set_method(self, obj: Any, name: str, fn: Callable[..., Any]) -> None:
        self.set_attr(obj, name, types.MethodType(fn, obj))

    def hook(self, handle: Any) -> None:
        self._undo.append(handle.remove)

    def undo(self) -> None:
        while self._undo:
            self._undo.pop()()


@dataclass
class Stats:
    """What the last forward did. ``keep``: the requested fraction (None for counts, thresholds, schedules);
    ``keep_achieved``: what ran, in the integration point's meaning of keep (``tr.methods()["keep"]``);
    ``tokens_attn[l]``/``tokens_mlp[l]``: mean real tokens entering block l's attention / MLP;
    ``final_tokens``: per sample after the last block; ``reduce_seconds``: time spent in scoring + reducing
    (overhead); ``flops``: analytic estimate from the kept counts (if known)."""

    method: str
    input_tokens: int = 0
    keep: float | None = None
    keep_achieved: float = 1.0
    tokens_attn: list[float] = field(default_factory=list)
    tokens_mlp: list[float] = field(default_factory=list)
    final_tokens: list[int] = field(default_factory=list)
    reduce_seconds: float = 0.0
    notes: list[str] = field(default_factory=list)
    flops: dict[str, float] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)

    @property
    def mean_keep(self) -> float:
        """Average over blocks of (tokens entering attention / input tokens)."""
        if not self.tokens_attn or not self.input_tokens:
            return 1.0
        return sum(self.tokens_attn) / (len(self.tokens_attn) * self.input_tokens)


class Handle:
    """Returned by ``tr.apply``: ``.stats``, ``.remove()``, context manager (restores on exit)."""

    def __init__(self, model: nn.Module, method_name: str, method: Any, patcher: Patcher,
                 stats_fn: Callable[[], Stats], extras: dict[str, Callable[..., Any]] | None = None) -> None:
        if getattr(model, _MARK, None) is not None:
            patcher.undo()
            raise RuntimeError(
                f"{type(model).__name__} already has tokenreduce method "
                f"{getattr(model, _MARK).method_name!r} applied; call .remove() on its handle first"
            )
        self.model, self.method_name, self.method = model, method_name, method
        self._patcher, self._stats_fn = patcher, stats_fn
        self._extras = extras or {}
        model.__dict__[_MARK] = self
        self.active = True

    @property
    def stats(self) -> Stats:
        return self._stats_fn()

    @property
    def attention_mask(self) -> Any:
        """The (B, K) 0/1 mask of the last forward's output tokens (real tokens vs padding of a ragged batch):
        what the usual masked mean pools with when the output is shorter than the input's mask. For the
        size-weighted mean that equals the unreduced masked mean at keep=1.0, use ``tr.mean_pool(h, out)``."""
        if "attention_mask" not in self._extras:
            raise NotImplementedError(f"{self.method_name}: this integration point keeps its token positions")
        mask = self._extras["attention_mask"]()
        if mask is None:
            raise RuntimeError("no forward pass has run since tr.apply")
        return mask

    def unmerge(self, y: Any) -> Any:
        """Map the last forward's reduced token outputs (B,K,D) back to the input tokens (B,N,D)."""
        if "unmerge" not in self._extras:
            raise NotImplementedError(f"{self.method_name}: this integration point has no token map to unmerge")
        return self._extras["unmerge"](y)

    def remove(self) -> None:
        """Restore the model exactly as it was (idempotent)."""
        if self.active:
            self._patcher.undo()
            self.model.__dict__.pop(_MARK, None)
            self.active = False

    def __enter__(self) -> Self:
        if not self.active:
            raise RuntimeError(f"{self!r}: the handle was removed, so the model would run unreduced; "
                               f"call tr.apply again")
        return self

    def __exit__(self, *exc: object) -> None:
        self.remove()

    def __repr__(self) -> str:
        state = "active" if self.active else "removed"
        return f"Handle({self.method_name!r} on {type(self.model).__name__}, {state})"
