"""What the cached checkpoints of :mod:`tokenreduce.models` share: a configuration stored as ``config.json``
beside its weights and addressed by a short hash of its fields, and files written atomically."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any, ClassVar

__all__ = ["JsonFields", "StoredConfig", "atomic_write", "save_checkpoint", "short_hash"]

#: field -> (the JSON type its value has in ``config.json``, how to rebuild the field's value from it)
JsonFields = dict[str, tuple[type, Callable[[Any], Any]]]


def short_hash(payload: dict[str, Any], compact: bool = False) -> str:
    """First 10 hex digits of the sha256 of ``payload`` as sorted-key JSON (``compact``: no spaces after the
    separators). A checkpoint's address: the exact bytes hashed must never change."""
    blob = json.dumps(payload, sort_keys=True, separators=(",", ":") if compact else None)
    return hashlib.sha256(blob.encode()).hexdigest()[:10]


class StoredConfig:
    """Mixin of a frozen dataclass configuration that is stored as JSON beside its checkpoint.

    ``_JSON_FIELDS`` (a class variable, not a field) maps a field to ``(json type, rebuild)``: a value
    of that JSON type read back from ``config.json`` is rebuilt with ``rebuild`` (a nested config's
    ``from_dict``, ``tuple`` ...). ``_HASH_EXCLUDED`` names the fields that only change speed, left out of
    :meth:`hash_payload`.
    """

    _JSON_FIELDS: ClassVar[JsonFields] = {}
    _HASH_EXCLUDED: ClassVar[frozenset[str]] = frozenset()

    def to_dict(self) -> dict[str, Any]:
        """JSON-serialisable dict (nested dataclasses become dicts)."""
        return dataclasses.asdict(self)  # type: ignore[call-overload]

    @classmethod
    def from_dict(cls, d: dict[str, Any]):
        """Inverse of :meth:`to_dict`; raises ``ValueError`` naming unknown fields and the accepted ones."""
        names = {f.name for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
        unknown = set(d) - names
        if unknown:
            raise ValueError(f"unknown {cls.__name__} fields {sorted(unknown)}; accepted: {sorted(names)}")
        d = dict(d)
        for name, (json_type, rebuild) in cls._JSON_FIELDS.items():
            if isinstance(d.get(name), json_type):
                d[name] = rebuild(d[name])
        return cls(**d)

    def hash_payload(self) -> dict[str, Any]:
        """The fields that determine the trained weights (all but ``_HASH_EXCLUDED``), as in :meth:`to_dict`."""
        return {k: v for k, v in self.to_dict().items() if k not in self._HASH_EXCLUDED}


def atomic_write(path: Path, write: Callable[[Path], object]) -> None:
    """``write(tmp)`` to a temporary file next to ``path``, then rename it to ``path``, so readers (and a
    cache check) never see a partial file."""
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    write(tmp)
    os.replace(tmp, path)


def save_checkpoint(out: Path, config: StoredConfig, metrics: dict[str, Any], model: Any = None) -> None:
    """``config.json`` and ``metrics.json`` into ``out``, then, given ``model``, its state dict as ``model.pt``
    (last: the file a cache check looks for), each atomically."""
    atomic_write(out / "config.json", lambda p: p.write_text(json.dumps(config.to_dict(), indent=2)))
    atomic_write(out / "metrics.json", lambda p: p.write_text(json.dumps(metrics, indent=2)))
    if model is not None:
        import torch

        atomic_write(out / "model.pt", lambda p: torch.save(model.state_dict(), p))
