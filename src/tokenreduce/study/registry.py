"""The studies (:data:`STUDIES`, looked up by :func:`get_study`) and what each one provides (:class:`Study`).

A study is a module exposing ``STUDY``, an instance of a :class:`Study` subclass; the registry names the module
so ``tokenreduce study --help`` imports no model code. Its configuration is a dataclass whose defaults are the
full-size run the issue asks for; ``--set field=value`` overrides a field (parsed by the default's type) and
``--smoke`` applies the study's ``smoke`` overrides (a tiny random-weight model, a handful of items).
"""

from __future__ import annotations

import dataclasses
import importlib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

from ..bench.sweep import Sweep
from ..core.errors import suggest
from .analysis import Hypothesis, Verdict

__all__ = ["PLANNED", "STUDIES", "Part", "Study", "StudyResult", "get_study", "parse_overrides"]

#: study name -> the module holding its ``STUDY``
STUDIES: dict[str, str] = {
    "distraction": "tokenreduce.study.distraction",
    "hallucination": "tokenreduce.study.hallucination",
    "train-reduction": "tokenreduce.study.train_reduction",
    "reasoning-length": "tokenreduce.study.reasoning_length",
    "rho1": "tokenreduce.study.rho1",
}
#: studies the issue asks for that are not built yet -> why
PLANNED: dict[str, str] = {}


@dataclass
class Part:
    """One tested claim of a study: its hypothesis, the table it is decided on (``strata``: the columns that
    split it, e.g. context length) and the verdict."""

    name: str
    hypothesis: Hypothesis
    table: list[dict[str, Any]]
    verdict: Verdict
    strata: tuple[str, ...] = ()


@dataclass
class StudyResult:
    """The parts (verdicts first in the report), further tables (e.g. accuracy per depth) and notes (what
    could not run, and why)."""

    parts: list[Part]
    tables: list[tuple[str, list[dict[str, Any]]]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


class Study:
    """What a study provides. Subclasses set ``name``, ``config`` (a dataclass type), ``smoke`` (overrides for
    ``--smoke``) and implement :meth:`sweep` and :meth:`analyse`; :meth:`missing_models` names the cached
    models a real run needs and the command that builds each."""

    name: ClassVar[str]
    config: ClassVar[type]
    smoke: ClassVar[Mapping[str, Any]] = {}

    @property
    def doc(self) -> str:
        return (type(self).__doc__ or "").strip()

    def make_config(self, smoke: bool = False, overrides: Mapping[str, Any] | None = None) -> Any:
        return dataclasses.replace(self.config(), **{**(self.smoke if smoke else {}), **(overrides or {})})

    def missing_models(self, cfg: Any) -> list[str]:
        """One line per cached model the real run needs and does not find (with the command that builds it)."""
        return []

    def sweep(self, cfg: Any, smoke: bool) -> Sweep:
        raise NotImplementedError

    def analyse(self, rows: list[dict[str, Any]], cfg: Any) -> StudyResult:
        raise NotImplementedError


def get_study(name: str) -> Study:
    """The registered study ``name``, or a ValueError suggesting close names."""
    if name in PLANNED:
        raise ValueError(f"study {name!r}: {PLANNED[name]}; available: {', '.join(STUDIES)}")
    if name not in STUDIES:
        raise ValueError(f"unknown study {name!r}{suggest(name, [*STUDIES, *PLANNED])}; available: "
                         f"{', '.join(STUDIES)}")
    return importlib.import_module(STUDIES[name]).STUDY


def _parse_value(text: str, default: Any, key: str) -> Any:
    def one(t: str, like: Any) -> Any:
        kind: Callable[[str], Any] = type(like) if like is not None else str
        if kind is bool:
            if t.lower() not in ("true", "false", "1", "0", "yes", "no"):
                raise ValueError(f"--set {key}={text}: {t!r} is not a boolean (true/false)")
            return t.lower() in ("true", "1", "yes")
        try:
            return kind(t)
        except ValueError:
            raise ValueError(f"--set {key}={text}: {t!r} is not a {kind.__name__}") from None

    if isinstance(default, (tuple, list)):
        like = default[0] if default else ""
        return tuple(one(t.strip(), like) for t in text.split(",") if t.strip())
    return one(text, default)


def parse_overrides(config: type, items: Sequence[str]) -> dict[str, Any]:
    """``["lengths=1024,2048", "n_prompts=64"]`` -> typed field values of the dataclass ``config`` (a comma list
    for a tuple field), or a ValueError naming the bad field and the accepted ones."""
    fields = {f.name: f for f in dataclasses.fields(config)}
    defaults = config()
    out: dict[str, Any] = {}
    for item in items:
        key, sep, value = item.partition("=")
        key = key.strip()
        if not sep:
            raise ValueError(f"--set {item!r}: write field=value, e.g. --set n_prompts=64")
        if key not in fields:
            raise ValueError(f"--set {key}: unknown field{suggest(key, fields)}; accepted: {', '.join(fields)}")
        out[key] = _parse_value(value.strip(), getattr(defaults, key), key)
    return out
