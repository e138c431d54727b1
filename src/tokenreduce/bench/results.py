"""Benchmark results as JSON lines.

A results file is a sequence of runs. Each run starts with a header line
``{"type": "meta", "run_id": ..., <environment>}`` followed by one line per
result row ``{"type": "row", "run_id": ..., <row>}``. Several runs may be
appended to the same file; timings should only be compared within one run.
"""

from __future__ import annotations

import dataclasses
import json
import uuid
from pathlib import Path
from typing import Any, Self, TextIO

from .meta import environment

__all__ = ["ResultWriter", "read_results", "read_runs", "to_jsonable"]

_RESERVED = ("type", "run_id")


def to_jsonable(obj: Any) -> Any:
    """Convert common benchmark values to JSON types.

    Handles objects with ``to_dict()`` (e.g. :class:`~tokenreduce.bench.timing.Timing`),
    dataclasses, namedtuples, numpy scalars/arrays, scalar torch tensors, paths,
    sets and nested containers. Raises ``TypeError`` for anything else.
    """
    if obj is None or isinstance(obj, (bool, int, str)):
        return obj
    if isinstance(obj, float):
        return obj
    if hasattr(obj, "to_dict") and callable(obj.to_dict):
        return to_jsonable(obj.to_dict())
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return to_jsonable(dataclasses.asdict(obj))
    if isinstance(obj, tuple) and hasattr(obj, "_asdict"):
        return to_jsonable(obj._asdict())
    if isinstance(obj, dict):
        return {str(k): to_jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple, set, frozenset)):
        return [to_jsonable(v) for v in obj]
    if isinstance(obj, Path):
        return str(obj)
    if hasattr(obj, "tolist") and callable(obj.tolist):  # numpy scalars/arrays, torch tensors
        return to_jsonable(obj.tolist())
    if hasattr(obj, "item") and callable(obj.item):
        return to_jsonable(obj.item())
    raise TypeError(f"cannot serialise {type(obj).__name__} to JSON")


def _dumps(obj: dict[str, Any]) -> str:
    return json.dumps(to_jsonable(obj), allow_nan=True, ensure_ascii=False)


class ResultWriter:
    """Append benchmark rows to a JSON-lines file, one run per writer.

    The meta header (``environment()`` unless ``meta`` is given, plus any
    ``extra_meta`` such as the benchmark config) is written when the writer is
    created. Every row is flushed immediately, so a crashed run keeps its rows.
    Use as a context manager or call :meth:`close`.
    """

    def __init__(
        self,
        path: str | Path,
        *,
        run_id: str | None = None,
        meta: dict[str, Any] | None = None,
        extra_meta: dict[str, Any] | None = None,
    ) -> None:
        self.path = Path(path)
        self.run_id = run_id or uuid.uuid4().hex[:12]
        self.meta: dict[str, Any] = dict(environment() if meta is None else meta)
        if extra_meta:
            self.meta.update(extra_meta)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._fh: TextIO | None = open(self.path, "a", encoding="utf-8")  # noqa: SIM115 (closed in close())
        self._write_line({**self.meta, "type": "meta", "run_id": self.run_id})

    def _write_line(self, obj: dict[str, Any]) -> None:
        if self._fh is None:
            raise ValueError("ResultWriter is closed")
        self._fh.write(_dumps(obj) + "\n")
        self._fh.flush()

    def write(self, row: dict[str, Any] | None = None, **fields: Any) -> dict[str, Any]:
        """Append one row (dict and/or keyword fields); returns the row as written."""
        data = {**(row or {}), **fields}
        clash = [k for k in _RESERVED if k in data]
        if clash:
            raise ValueError(f"row keys {clash} are reserved")
        record = {"type": "row", "run_id": self.run_id, **data}
        self._write_line(record)
        return record

    def close(self) -> None:
        if self._fh is not None:
            self._fh.close()
            self._fh = None

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def read_runs(path: str | Path) -> dict[str, tuple[dict[str, Any], list[dict[str, Any]]]]:
    """All runs in a results file: ``{run_id: (meta, rows)}`` in file order.

    The ``"type"`` key is stripped; ``"run_id"`` is kept in meta and rows. Blank
    lines are ignored; a truncated last line (crash mid-write) is skipped.
    """
    runs: dict[str, tuple[dict[str, Any], list[dict[str, Any]]]] = {}
    lines = Path(path).read_text(encoding="utf-8").splitlines()
    for i, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError:
            if i == len(lines) - 1:
                continue
            raise
        kind = obj.pop("type", "row")
        rid = obj.get("run_id")
        if kind == "meta":
            runs[rid] = (obj, [])
        else:
            if rid not in runs:
                runs[rid] = ({"run_id": rid}, [])
            runs[rid][1].append(obj)
    return runs


def read_results(path: str | Path, run_id: str | None = None) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """``(meta, rows)`` of one run: ``run_id`` if given, else the last run in the file."""
    runs = read_runs(path)
    if not runs:
        raise ValueError(f"no results in {path}")
    if run_id is None:
        run_id = list(runs)[-1]
    if run_id not in runs:
        raise KeyError(f"run {run_id!r} not in {path} (have {list(runs)})")
    return runs[run_id]
