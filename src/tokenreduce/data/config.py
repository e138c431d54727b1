"""Building a dataset config back from its JSON form (shared by the digit and scene configs)."""

from __future__ import annotations

import dataclasses
from typing import Any, TypeVar

__all__ = ["config_from_dict"]

T = TypeVar("T")


def config_from_dict(cls: type[T], d: dict[str, Any]) -> T:
    """Inverse of :func:`dataclasses.asdict` for a flat config (lists from JSON become tuples); an unknown
    field is a ValueError naming the accepted ones."""
    names = {f.name for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    unknown = set(d) - names
    if unknown:
        raise ValueError(f"unknown {cls.__name__} fields {sorted(unknown)}; accepted: {sorted(names)}")
    return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in d.items()})
