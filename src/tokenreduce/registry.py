"""Registry of named methods (``@register``), in the spirit of timm's ``@register_model``.

A method is a registered factory ``factory(keep=..., **kw) -> method object``; the entry records its
modality, integration point, paper and the equation it implements, and the adapters that can host it.
"""

from __future__ import annotations

import difflib
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

__all__ = ["METHODS", "MethodSpec", "get_method", "methods", "register", "register_dataclass", "suggest"]


@dataclass(frozen=True)
class MethodSpec:
    name: str
    factory: Callable[..., Any]
    modality: str  # vision | language | multimodal
    integration: str  # vit-layers | kv-cache | prompt | vlm-visual | encoder-layers | training
    paper: str
    equation: str = ""
    defaults: dict[str, Any] = field(default_factory=dict)

    def build(self, keep: Any = None, **kw: Any) -> Any:
        args = {**self.defaults, **kw}
        return self.factory(keep=keep, **args) if keep is not None else self.factory(**args)


METHODS: dict[str, MethodSpec] = {}


def suggest(name: str, choices: Iterable[str]) -> str:
    """' (did you mean ...?)' for close matches, else ''."""
    close = difflib.get_close_matches(name, list(choices), n=3, cutoff=0.5)
    return f" (did you mean {', '.join(repr(c) for c in close)}?)" if close else ""


def register(name: str, *, modality: str, integration: str, paper: str, equation: str = "",
             **defaults: Any) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Decorator registering a method factory under ``name``."""

    def deco(factory: Callable[..., Any]) -> Callable[..., Any]:
        key = (name, integration)
        if any((s.name, s.integration) == key for s in METHODS.values()):
            raise ValueError(f"method {name!r} already registered for integration {integration!r}")
        METHODS[f"{name}@{integration}"] = MethodSpec(name, factory, modality, integration, paper, equation, defaults)
        return factory

    return deco


def register_dataclass(name: str, cls: type, *, modality: str, integration: str, paper: str, equation: str = "",
                       hidden: tuple[str, ...] = ("needs",)) -> Callable[..., Any]:
    """Register a method implemented as a dataclass with a ``keep`` field: ``cls(keep=keep, **kw)``.

    The factory validates ``keep`` (float in (0, 1], int >= 1, or a ``Keep``/schedule) and turns an unknown
    keyword into a TypeError that lists the accepted ones (dataclass fields minus ``hidden``).
    """
    from .core.budget import Keep, validate_keep_value

    def factory(keep: Any = None, **kw: Any) -> Any:
        if keep is not None:
            if not isinstance(keep, (Keep, list, tuple)):
                validate_keep_value(keep)
            kw["keep"] = keep
        try:
            return cls(**kw)
        except TypeError as e:  # unknown keyword
            allowed = [f for f in cls.__dataclass_fields__ if f not in hidden]
            raise TypeError(f"{name}: {e}; accepted keywords: {allowed}") from None

    factory.__doc__ = cls.__doc__
    factory.__name__ = f"make_{name.replace('-', '_')}"
    return register(name, modality=modality, integration=integration, paper=paper, equation=equation)(factory)


def get_method(name: str, integration: str | None = None) -> MethodSpec:
    """Look up a method by name (and integration point when a name exists at several)."""
    if not isinstance(name, str):
        raise TypeError(f"method must be a name (str), got {type(name).__name__}")
    _load_builtin()
    cands = [s for s in METHODS.values() if s.name == name]
    if not cands:
        names = sorted({s.name for s in METHODS.values()})
        raise ValueError(f"unknown method {name!r}{suggest(name, names)}; registered: {', '.join(names)}")
    if integration is not None:
        for s in cands:
            if s.integration == integration:
                return s
        raise ValueError(
            f"method {name!r} is not available at integration point {integration!r}; "
            f"it is registered for: {', '.join(s.integration for s in cands)}"
        )
    return cands[0]


def methods(integration: str | None = None) -> list[dict[str, str]]:
    """Table of registered methods: name, modality, integration point, paper, equation."""
    _load_builtin()
    rows = [
        {"name": s.name, "modality": s.modality, "integration": s.integration, "paper": s.paper,
         "equation": s.equation}
        for s in METHODS.values()
        if integration is None or s.integration == integration
    ]
    return sorted(rows, key=lambda r: (r["integration"], r["name"]))


def _load_builtin() -> None:
    """Import the built-in method modules (they register themselves)."""
    import importlib

    importlib.import_module("tokenreduce.methods")
