"""A sweep cell: the inputs of one pure benchmark computation, and its stable id.

A cell is (benchmark, model, method, keep, settings, shard, seed, timing). Its rows are a function of these
inputs only, so the id (a hash of their canonical JSON) names the rows on any machine and in any run: the
harness skips a cell whose id already has rows in the results file. The id does not include the code version
(the git commit is recorded in every row instead), so a resumed sweep reuses rows computed by an earlier commit:
use a new ``--out`` or ``--no-resume`` after a change that alters results.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

__all__ = ["Cell", "canonical_json"]


def _canonical(obj: Any) -> Any:
    """JSON-ready form with a single spelling per value: tuples as lists, keys as strings, floats that are
    whole numbers kept as floats (``1.0`` and ``1`` differ: a keep is a fraction), NaN/inf as strings."""
    if isinstance(obj, float):
        return repr(obj) if math.isnan(obj) or math.isinf(obj) else obj
    if obj is None or isinstance(obj, (bool, int, str)):
        return obj
    if isinstance(obj, Mapping):
        return {str(k): _canonical(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_canonical(v) for v in obj]
    raise TypeError(f"a cell holds JSON values only (str, int, float, bool, None, lists, dicts), got "
                    f"{type(obj).__name__}: {obj!r}")


def canonical_json(obj: Any) -> str:
    """Sorted keys, no spaces, shortest float repr: the same text for the same value on every machine."""
    return json.dumps(_canonical(obj), sort_keys=True, separators=(",", ":"), ensure_ascii=True)


@dataclass(frozen=True, eq=False)
class Cell:
    """One unit of a sweep. ``keep`` is one budget or a tuple of them (a timing cell measures a method's keeps
    interleaved with the unreduced model in one group); ``settings`` holds every other input its rows depend
    on (JSON values); ``shard`` a slice of the data (e.g. a prompt index); ``timing``: the cell measures
    wall-clock and must run alone on its node; ``needs``: ids of cells whose rows are an input (e.g. a timing
    part copies the accuracy part's rows): the harness hands them over as ``given`` (not part of the id, which
    already names them through ``needs``)."""

    bench: str
    model: str
    method: str
    keep: Any = None
    settings: Mapping[str, Any] = field(default_factory=dict)
    shard: Any = None
    seed: int = 0
    timing: bool = False
    needs: tuple[str, ...] = ()
    given: tuple[dict[str, Any], ...] = field(default=(), repr=False)

    def __post_init__(self) -> None:
        canonical_json(self.key())  # fail at creation on a value that has no JSON form

    def key(self) -> dict[str, Any]:
        """The inputs as one JSON object (what the id hashes)."""
        return {"bench": self.bench, "model": self.model, "method": self.method, "keep": self.keep,
                "settings": dict(self.settings), "shard": self.shard, "seed": self.seed, "timing": self.timing,
                **({"needs": list(self.needs)} if self.needs else {})}

    @property
    def id(self) -> str:
        """16 hex digits of the SHA-256 of the inputs' canonical JSON."""
        return hashlib.sha256(canonical_json(self.key()).encode()).hexdigest()[:16]

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Cell) and self.id == other.id

    def __hash__(self) -> int:
        return hash(self.id)

    def __repr__(self) -> str:
        shard = "" if self.shard is None else f", shard={self.shard!r}"
        return f"Cell({self.bench}/{self.model}: {self.method} keep={self.keep!r}{shard}, id={self.id})"
