"""Command-line arguments of the benchmarks, checked before anything is loaded: comma lists of method names
(against the registry, with suggestions), keeps (fractions in (0, 1]) and choices. Each raises a ValueError
with one readable line; ``tokenreduce`` prints it and exits non-zero."""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from typing import Any

from ..core.budget import validate_fraction
from ..core.errors import suggest
from ..registry import METHODS, resolve_integration

__all__ = ["DEVICES", "check_choice", "check_device", "check_methods", "parse_keeps", "parse_method_kw", "split_list"]


def split_list(text: str) -> list[str]:
    """``"a, b,,c"`` -> ``["a", "b", "c"]``."""
    return [x.strip() for x in text.split(",") if x.strip()]


def parse_keeps(text: str | Sequence[float], option: str = "--keep") -> list[float]:
    """Keep fractions from ``"1,0.5,0.25"`` (or a sequence): each a number in (0, 1]; ``1`` is the unreduced
    model (on the command line every keep is a fraction)."""
    items = split_list(text) if isinstance(text, str) else list(text)
    if not items:
        raise ValueError(f"{option}: give at least one keep, e.g. {option} 1,0.5")
    out = []
    for item in items:
        try:
            value = float(item)
        except (TypeError, ValueError):
            raise ValueError(f"{option}: {item!r} is not a number; keeps are fractions in (0, 1], "
                             f"e.g. {option} 1,0.5,0.25") from None
        out.append(validate_fraction(value, f"{option} {item}"))
    return out


def parse_method_kw(text: str, option: str = "--method-kw") -> dict[str, dict[str, Any]]:
    """Per-method keyword arguments from JSON, ``'{"tomesd": {"merge_mlp": true}}'`` ("" -> ``{}``): an object
    of objects keyed by method name (the names are checked with :func:`check_methods` by the caller)."""
    if not text.strip():
        return {}
    try:
        value = json.loads(text)
    except json.JSONDecodeError as e:
        raise ValueError(f"{option}: {text!r} is not JSON ({e.msg}); give an object of objects, e.g. "
                         f"{option} '{{\"tomesd\": {{\"merge_mlp\": true}}}}'") from None
    if not isinstance(value, dict) or not all(isinstance(v, dict) for v in value.values()):
        raise ValueError(f"{option}: {text!r} must be a JSON object mapping method names to objects of keyword "
                         f"arguments, e.g. {option} '{{\"tomesd\": {{\"merge_mlp\": true}}}}'")
    return value


def check_methods(names: Iterable[str], integration: str, option: str = "--methods",
                  extra: Iterable[str] = ()) -> list[str]:
    """The names, or a ValueError naming the unknown ones (with close matches) and the accepted ones."""
    integration = resolve_integration(integration)
    known = sorted({s.name for s in METHODS.values() if s.integration == integration} | set(extra))
    names = list(names)
    bad = [n for n in names if n not in known]
    if bad:
        raise ValueError(f"{option}: unknown method {bad[0]!r}{suggest(bad[0], known)} at {integration}; "
                         f"accepted: {', '.join(known)}")
    return names


def check_choice(value: str, choices: Sequence[str], option: str) -> str:
    if value not in choices:
        raise ValueError(f"{option}: {value!r} is not accepted{suggest(value, choices)}; accepted: "
                         f"{', '.join(choices)}")
    return value


DEVICES = ("cpu", "cuda")


def check_device(device: str, option: str = "--device") -> str:
    """``cpu`` or ``cuda`` (the latter only where torch sees a GPU)."""
    check_choice(device, DEVICES, option)
    if device == "cuda":
        import torch

        if not torch.cuda.is_available():
            raise ValueError(f"{option} cuda: torch sees no CUDA device here (torch {torch.__version__}); use "
                             f"{option} cpu")
    return device
