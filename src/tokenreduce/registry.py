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
import inspect
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar

from .core.budget import as_method_keep
from .core.errors import suggest

__all__ = ["INTEGRATIONS", "METHODS", "Integration", "MethodSpec", "get_method", "methods", "register",
           "resolve_integration"]

T = TypeVar("T")


@dataclass(frozen=True)
class Integration:
    """An integration point: where reducers go in a model family, and the one meaning ``keep`` has there (so
    that two methods at the same keep cost about the same; each method maps its paper's schedule onto it and
    reports the achieved value in ``Handle.stats.keep_achieved``)."""

    name: str
    aliases: tuple[str, ...]
    keep: str


INTEGRATIONS: dict[str, Integration] = {i.name: i for i in (
    Integration("vit-layers", ("vit",),
                "fraction of the token-block work kept: the mean over the blocks' attention and MLP halves of the "
                "tokens they process, over the input tokens"),
    Integration("encoder-layers", ("encoder", "bert"),
                "fraction of the token-block work kept, as for vit-layers (per sample, over its real tokens)"),
    Integration("kv-cache", ("kv", "llm"),
                "fraction of the KV-cache entries kept, over all layers (= KV bytes); for methods that evict while "
                "decoding, at every step, of what the unreduced cache holds"),
    Integration("prompt", ("text",), "fraction of the prompt's tokens kept (in the target LM's tokenizer)"),
    Integration("vlm-visual", ("vlm",),
                "fraction of the visual-token work in the LLM kept: the mean over decoder layers of the visual "
                "tokens they process, over the visual tokens of the unreduced prompt"),
    Integration("diffusion", ("unet", "dit"),
                "fraction of a block's spatial tokens that the reduced operation processes"),
)}


def resolve_integration(name: str) -> str:
    """The canonical integration-point name for ``name`` or one of its aliases (ValueError otherwise)."""
    for i in INTEGRATIONS.values():
        if name == i.name or name in i.aliases:
            return i.name
    known = [n for i in INTEGRATIONS.values() for n in (i.name, *i.aliases)]
    listed = "; ".join(f"{i.name} (or {' / '.join(i.aliases)})" for i in INTEGRATIONS.values())
    raise ValueError(f"unknown integration point {name!r}{suggest(name, known)}; accepted: {listed}")


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
    presets: dict[str, dict[str, Any]] = field(default_factory=dict)  # named settings (may include keep)
    budget_knobs: tuple[str, ...] = ()  # keywords that set a budget themselves (ToMe's r): keep may be left out
    keep_doc: str = ""  # where a method's keep is a fraction of something else than the integration point's
    trained_by: str = ""  # a learned method: the command that trains its parts (applying it needs them)

    def build(self, keep: Any = None, preset: str | None = None, **kw: Any) -> Any:
        """The method object for ``keep`` and keywords (over the preset's settings, over the defaults).

        ``keep`` is required unless the preset gives one or a budget knob is passed: a missing budget never
        silently means "do nothing" or "the paper's budget"."""
        settings = dict(self.defaults)
        if preset is not None:
            if preset not in self.presets:
                raise ValueError(f"{self.name}: unknown preset {preset!r}{suggest(preset, self.presets)}; "
                                 f"presets: {sorted(self.presets) or 'none'}")
            settings.update(self.presets[preset])
        settings.update(kw)
        if keep is None:
            keep = settings.pop("keep", None)
        else:
            settings.pop("keep", None)
        if keep is None and not any(k in kw for k in self.budget_knobs) and self.integration != "prompt":
            raise TypeError(
                f"{self.name}: keep is required: {self.keep_meaning() or 'the fraction of tokens kept'}, a float "
                f"in (0, 1] (1.0 = unreduced) or tr.Keep(count=n)"
                + (f"; or a preset that sets one ({', '.join(p for p, v in self.presets.items() if 'keep' in v)})"
                   if any("keep" in v for v in self.presets.values()) else "")
                + (f"; or {' / '.join(k + '=' for k in self.budget_knobs)}" if self.budget_knobs else ""))
        return self.factory(keep=keep, **settings) if keep is not None else self.factory(**settings)

    def keep_meaning(self) -> str:
        if self.keep_doc:
            return self.keep_doc
        integ = INTEGRATIONS.get(self.integration)
        return integ.keep if integ else ""

    def keywords(self) -> list[str]:
        """The keywords a user may pass (the dataclass's init fields; class variables are not keywords)."""
        return accepted_keywords(self.cls) if self.cls is not None else []

    def knobs(self) -> dict[str, Any]:
        """Keyword -> default, for the method's knobs (``keep`` excluded)."""
        if self.cls is None:
            return {}
        out: dict[str, Any] = {}
        for f in dataclasses.fields(self.cls):
            if f.init and not f.name.startswith("_") and f.name != "keep":
                default = f.default if f.default is not dataclasses.MISSING else (
                    f.default_factory() if f.default_factory is not dataclasses.MISSING else None)
                out[f.name] = self.defaults.get(f.name, default)
        return out

    @property
    def doc(self) -> str:
        return inspect.cleandoc((self.cls or self.factory).__doc__ or "")


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
             presets: dict[str, dict[str, Any]] | None = None, budget_knobs: tuple[str, ...] = (),
             keep_meaning: str = "", trained_by: str = "", **defaults: Any) -> Callable[[T], T]:
    """Decorator registering a method dataclass (or a factory function) under ``name`` at ``integration``.

    ``presets``: named settings users reach with ``tr.apply(..., preset=name)`` (documented in
    ``tokenreduce list NAME``; a preset may include ``keep``). ``budget_knobs``: keywords that set a budget
    themselves, so ``keep`` may be left out when one is given. ``keep_meaning``: only for a method whose keep
    cannot be the integration point's (say what it is a fraction of instead). ``trained_by``: for a learned
    method, the command that trains the parts it loads (``tr.methods()`` shows it). The same class may be registered
    at several integration points (stack the decorators)."""
    if integration not in INTEGRATIONS:
        raise ValueError(f"register({name!r}): unknown integration point {integration!r}; accepted: "
                         f"{sorted(INTEGRATIONS)}")

    def deco(obj: T) -> T:
        key = (name, integration)
        if any((s.name, s.integration) == key for s in METHODS.values()):
            raise ValueError(f"method {name!r} already registered for integration {integration!r}")
        is_cls = isinstance(obj, type)
        if is_cls and not dataclasses.is_dataclass(obj):
            raise TypeError(f"register({name!r}): {obj.__name__} must be a dataclass (or pass a factory function)")
        factory = _dataclass_factory(name, obj) if is_cls else obj
        METHODS[f"{name}@{integration}"] = MethodSpec(name, factory, modality, integration, paper, equation, defaults,
                                                      obj if is_cls else None, dict(presets or {}),
                                                      tuple(budget_knobs), keep_meaning, trained_by)
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
        integration = resolve_integration(integration)
        for s in cands:
            if s.integration == integration:
                return s
        raise ValueError(
            f"method {name!r} is not available at integration point {integration!r}; "
            f"it is registered for: {', '.join(s.integration for s in cands)}"
        )
    return cands[0]


def methods(integration: str | None = None) -> list[dict[str, Any]]:
    """Table of registered methods: name, modality, integration point (or one of its aliases, e.g. "kv"),
    paper, equation, what keep means there, knobs with their defaults, presets and the docstring."""
    integration = resolve_integration(integration) if integration is not None else None
    rows = [
        {"name": s.name, "modality": s.modality, "integration": s.integration, "paper": s.paper,
         "equation": s.equation, "keep": s.keep_meaning(), "knobs": s.knobs(), "presets": dict(s.presets),
         "trained_by": s.trained_by, "doc": s.doc}
        for s in METHODS.values()
        if integration is None or s.integration == integration
    ]
    return sorted(rows, key=lambda r: (r["integration"], r["name"]))
