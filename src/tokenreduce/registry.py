"""Registry of named methods (``@register``), in the spirit of timm's ``@register_model``.

A method is a dataclass (or a factory ``factory(keep=..., **kw) -> method object``) registered under a name
at an integration point; the entry records its modality, paper and the equation it implements. Method
modules register themselves when imported; the package imports them (``tokenreduce/methods/__init__.py``),
so this module imports nothing of the package but ``core``.

    @register("tome", modality="vision", integration="vit-layers", paper="Bolya et al., ICLR 2023",
              equation="...")
    @dataclass
    class ToMe(VisionMethod): ...
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar

from .core.budget import as_method_keep
from .core.errors import suggest

__all__ = ["METHODS", "MethodSpec", "get_method", "methods", "register"]

T = TypeVar("T")


@dataclass(frozen=True)
class MethodSpec:
    name: str
    factory: Callable[..., Any]
    modality: str  # vision | language | multimodal
    integration: str  # vit-layers | kv-cache | prompt | vlm-visual | encoder-layers | ...
    paper: str
    equation: str = ""
    defaults: dict[str, Any] = field(default_factory=dict)
    cls: type | None = None  # the method's dataclass, when it is one

    def build(self, keep: Any = None, **kw: Any) -> Any:
        args = {**self.defaults, **kw}
        return self.factory(keep=keep, **args) if keep is not None else self.factory(**args)

    def keywords(self) -> list[str]:
        """The keywords a user may pass (the dataclass's init fields; class variables are not keywords)."""
        return accepted_keywords(self.cls) if self.cls is not None else []


METHODS: dict[str, MethodSpec] = {}


def accepted_keywords(cls: type) -> list[str]:
    """Init fields of a dataclass a user may set: not ClassVars, not ``init=False``, not ``_private``."""
    return [f.name for f in dataclasses.fields(cls) if f.init and not f.name.startswith("_")]


def _dataclass_factory(name: str, cls: type) -> Callable[..., Any]:
    """``cls(keep=keep, **kw)``; an unknown keyword becomes a TypeError listing the accepted ones."""

    def factory(keep: Any = None, **kw: Any) -> Any:
        if keep is not None:
            kw["keep"] = as_method_keep(keep)
        unknown = [k for k in kw if k not in accepted_keywords(cls)]
        if unknown:
            raise TypeError(f"{name}: unexpected keyword {', '.join(map(repr, unknown))}"
                            f"{suggest(unknown[0], accepted_keywords(cls))}; accepted keywords: "
                            f"{accepted_keywords(cls)}")
        return cls(**kw)

    factory.__doc__ = cls.__doc__
    factory.__name__ = f"make_{name.replace('-', '_')}"
    return factory


def register(name: str, *, modality: str, integration: str, paper: str, equation: str = "",
             **defaults: Any) -> Callable[[T], T]:
    """Decorator registering a method dataclass (or a factory function) under ``name`` at ``integration``.

    The same class may be registered at several integration points (stack the decorators)."""

    def deco(obj: T) -> T:
        key = (name, integration)
        if any((s.name, s.integration) == key for s in METHODS.values()):
            raise ValueError(f"method {name!r} already registered for integration {integration!r}")
        is_cls = isinstance(obj, type)
        if is_cls and not dataclasses.is_dataclass(obj):
            raise TypeError(f"register({name!r}): {obj.__name__} must be a dataclass (or pass a factory function)")
        factory = _dataclass_factory(name, obj) if is_cls else obj
        METHODS[f"{name}@{integration}"] = MethodSpec(name, factory, modality, integration, paper, equation, defaults,
                                                      obj if is_cls else None)
        return obj

    return deco


def get_method(name: str, integration: str | None = None) -> MethodSpec:
    """Look up a method by name (and integration point when a name exists at several)."""
    if not isinstance(name, str):
        raise TypeError(f"method must be a name (str), got {type(name).__name__}")
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
    rows = [
        {"name": s.name, "modality": s.modality, "integration": s.integration, "paper": s.paper,
         "equation": s.equation}
        for s in METHODS.values()
        if integration is None or s.integration == integration
    ]
    return sorted(rows, key=lambda r: (r["integration"], r["name"]))
