"""Sweeps (tokenreduce.bench.sweep): stable cell ids, resume after a crash or an interrupt, failing cells as error
rows, the Ray executor's errors, and `bench vit --smoke` giving the same accuracy rows in process and on Ray."""

from __future__ import annotations

import functools
import importlib.util
import sys

import pytest
import torch

from tokenreduce.bench import vit as vit_bench
from tokenreduce.bench.results import read_runs
from tokenreduce.bench.sweep import METADATA_FIELDS, CachedLoader, Cell, Sweep, finished_cells, run_sweep

HAS_RAY = importlib.util.find_spec("ray") is not None
needs_ray = pytest.mark.skipif(not HAS_RAY, reason="ray is not installed (pip install 'tokenreduce[ray]')")
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")

#: fields that differ between two runs of the same cell: where/when it ran, and wall-clock
TIMING_FIELDS = {"speedup", "speedup_low", "speedup_high", "limit_speedup", "efficiency", "time_ms", "base_time_ms",
                 "overhead_ms"}


# ---------------------------------------------------------------------------- cells
def test_cell_id_is_a_stable_hash_of_the_inputs():
    c = Cell("vit", "smoke", "tome", 0.5, {"threads": 1, "n_images": 32})
    assert c.id == "efa00509e8850587"  # the same on every machine, in every run (a changed hash breaks every resume)
    assert c.id == Cell("vit", "smoke", "tome", 0.5, {"n_images": 32, "threads": 1}).id  # key order is irrelevant
    assert c.id == Cell("vit", "smoke", "tome", 0.5, {"threads": 1, "n_images": 32}).id
    for other in (Cell("vit", "smoke", "tome", 0.6, {"threads": 1, "n_images": 32}),
                  Cell("vit", "smoke", "tome", 0.5, {"threads": 2, "n_images": 32}),
                  Cell("vit", "smoke", "tome", 0.5, {"threads": 1, "n_images": 32}, timing=True),
                  Cell("vit", "smoke", "tome", 0.5, {"threads": 1, "n_images": 32}, seed=1),
                  Cell("vit", "smoke", "tome", 0.5, {"threads": 1, "n_images": 32}, shard=0)):
        assert other.id != c.id
    with pytest.raises(TypeError, match="JSON values only"):
        Cell("vit", "smoke", "tome", 0.5, {"model": object()})


def test_cell_id_is_the_same_in_another_process():
    code = ("from tokenreduce.bench.sweep import Cell; "
            "print(Cell('vit', 'smoke', 'tome', (1.0, 0.5), {'a': [1, 2.5], 'b': None}, shard=3).id)")
    import subprocess

    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         env={**__import__("os").environ, "PYTHONHASHSEED": "123"}).stdout.strip()
    assert out == Cell("vit", "smoke", "tome", (1.0, 0.5), {"a": [1, 2.5], "b": None}, shard=3).id


# ---------------------------------------------------------------------------- the harness on a toy grid
def _square(calls: list[int], fail: set[int], interrupt_at: int | None, ctx: dict, cell: Cell) -> list[dict]:
    calls.append(cell.shard)
    if interrupt_at is not None and len(calls) == interrupt_at:
        raise KeyboardInterrupt
    if cell.shard in fail:
        raise RuntimeError(f"shard {cell.shard} broke")
    return [{"method": cell.method, "shard": cell.shard, "value": ctx["base"] + cell.shard ** 2}]


def _toy(calls, fail=(), interrupt_at=None, n=6) -> Sweep:
    cells = [Cell("toy", "m", "square", None, {"n": n}, shard=i) for i in range(n)]
    load = CachedLoader(lambda name: {"base": 100})
    return Sweep("toy", cells, load, functools.partial(_square, calls, set(fail), interrupt_at))


def test_a_failing_cell_is_an_error_row_and_the_sweep_goes_on(tmp_path, capsys):
    path = tmp_path / "r.jsonl"
    calls: list[int] = []
    res = run_sweep(_toy(calls, fail={2}), path, progress=False)
    assert calls == [0, 1, 2, 3, 4, 5] and (res.ran, res.failed, res.resumed) == (6, 1, 0)
    assert "6 cells, 6 run, 0 from earlier runs, 1 failed" in capsys.readouterr().err
    bad = res.rows[2]
    assert bad["cell_failed"] and bad["error"] == "RuntimeError: shard 2 broke" and bad["shard"] == 2
    assert [r.get("value") for r in res.rows] == [100, 101, None, 109, 116, 125]
    # a rerun retries the failed cell only; its new rows replace the error row
    calls.clear()
    res = run_sweep(_toy(calls), path, progress=False)
    assert calls == [2] and (res.ran, res.resumed, res.failed) == (1, 5, 0)
    assert [r["value"] for r in res.rows] == [100, 101, 104, 109, 116, 125]
    assert len(finished_cells(path)) == 6


def test_an_interrupted_sweep_resumes_without_recomputing_finished_cells(tmp_path):
    path = tmp_path / "r.jsonl"
    calls: list[int] = []
    with pytest.raises(KeyboardInterrupt):
        run_sweep(_toy(calls, interrupt_at=4), path, progress=False)
    assert calls == [0, 1, 2, 3]
    assert sorted(r["shard"] for _, rows in read_runs(path).values() for r in rows) == [0, 1, 2]  # all kept
    calls.clear()
    res = run_sweep(_toy(calls), path, progress=False)
    assert calls == [3, 4, 5] and res.resumed == 3
    assert [r["value"] for r in res.rows] == [100, 101, 104, 109, 116, 125]
    calls.clear()
    res = run_sweep(_toy(calls), path, progress=False)  # nothing left to do: nothing run, nothing written
    assert calls == [] and res.ran == 0 and len(read_runs(path)) == 2
    calls.clear()
    run_sweep(_toy(calls), path, progress=False, resume=False)
    assert calls == [0, 1, 2, 3, 4, 5]


def test_rows_carry_cell_id_and_origin(tmp_path):
    res = run_sweep(_toy([], n=2), tmp_path / "r.jsonl", progress=False)
    cell = _toy([], n=2).cells[1]
    row = res.rows[1]
    assert row["cell_id"] == cell.id and set(METADATA_FIELDS) <= set(row)
    o = row["origin"]
    assert o["executor"] == "local" and o["device"] == "cpu" and o["cell_rows"] == 1 and o["host"]
    assert {"git_commit", "versions", "cpu_model", "node_id", "seconds"} <= set(o)
    assert o["versions"]["torch"] == torch.__version__.split("+")[0]
    meta = next(iter(read_runs(tmp_path / "r.jsonl").values()))[0]
    assert meta["sweep"] == {"executor": "local", "address": None, "cells": 2, "run": 2, "resumed": 0}


def test_a_timing_part_needs_the_rows_it_copies(tmp_path):
    base = Cell("toy", "m", "square", None, {}, shard=1)
    needy = Cell("toy", "m", "square", None, {"part": "timing"}, shard=2, needs=(base.id,))
    sweep = Sweep("toy", [needy], CachedLoader(lambda name: {"base": 0}), functools.partial(_square, [], set(), None))
    with pytest.raises(FileNotFoundError, match="needs the rows of 1 cell"):
        run_sweep(sweep, tmp_path / "r.jsonl", progress=False)
    assert not (tmp_path / "r.jsonl").exists()


# ---------------------------------------------------------------------------- bench vit as a sweep
def _vit(tmp_path, **kw):
    return vit_bench.run_vit_bench(smoke=True, out=str(tmp_path), progress=False, malloc="default", **kw)


def _accuracy_fields(rows):
    return [{k: v for k, v in r.items() if k not in TIMING_FIELDS and k not in METADATA_FIELDS} for r in rows]


def test_bench_vit_smoke_resumes_after_an_interrupt(tmp_path, monkeypatch):
    real = vit_bench.run_vit_cell
    calls: list[str] = []

    def counted(ctx, cell, interrupt_at=None):
        calls.append(cell.method)
        if len(calls) == interrupt_at:
            raise KeyboardInterrupt
        return real(ctx, cell)

    monkeypatch.setattr(vit_bench, "run_vit_cell", functools.partial(counted, interrupt_at=3))
    with pytest.raises(KeyboardInterrupt):
        _vit(tmp_path)
    assert calls == ["none", "tome", "evit"]
    monkeypatch.setattr(vit_bench, "run_vit_cell", counted)
    calls.clear()
    rows = _vit(tmp_path)
    assert calls == ["evit", "random"]  # none and tome came from the interrupted run
    assert [r["method"] for r in rows] == ["none", "tome", "tome", "evit", "evit", "random", "random"]
    assert (tmp_path / "report.html").is_file()


def test_bench_vit_failing_cell_is_reported_and_retried(tmp_path, monkeypatch):
    real = vit_bench.run_vit_cell

    def broken(ctx, cell):
        if cell.method == "evit":
            raise RuntimeError("evit exploded")
        return real(ctx, cell)

    monkeypatch.setattr(vit_bench, "run_vit_cell", broken)
    rows = _vit(tmp_path, parts="accuracy")
    bad = [r for r in rows if r.get("cell_failed")]
    assert [(r["method"], r["keep"]) for r in bad] == [("evit", 1.0), ("evit", 0.6)]
    assert "RuntimeError: evit exploded" in (tmp_path / "report.html").read_text()
    assert "cell_id" not in bad[0]  # returned rows hold the benchmark's fields; the file adds id and origin
    monkeypatch.setattr(vit_bench, "run_vit_cell", real)
    again = _vit(tmp_path, parts="accuracy")
    assert not any(r.get("cell_failed") for r in again)
    assert _accuracy_fields(again)[:3] == _accuracy_fields(rows)[:3]  # the unreduced and tome rows were reused


def test_bench_vit_timing_part_adds_timing_to_the_accuracy_rows(tmp_path):
    with pytest.raises(FileNotFoundError, match="run parts='accuracy' first"):
        _vit(tmp_path / "none", parts="timing")
    acc = _vit(tmp_path, parts="accuracy")
    assert all("speedup" not in r for r in acc if r["method"] != "none")
    timed = _vit(tmp_path, parts="timing")
    assert [{k: r[k] for k in a} for r, a in zip(_accuracy_fields(timed), _accuracy_fields(acc), strict=True)] == \
        _accuracy_fields(acc)  # the accuracy rows, copied
    assert all(r["speedup"] > 0 and r["limit_speedup"] > 0 for r in timed)


# ---------------------------------------------------------------------------- the Ray executor
def test_executor_ray_without_ray_names_the_extra(tmp_path, monkeypatch, capsys):
    from tokenreduce import cli

    monkeypatch.setitem(sys.modules, "ray", None)  # `import ray` raises ImportError
    monkeypatch.setattr(sys, "argv", ["tokenreduce", "bench", "vit", "--smoke", "--executor", "ray", "--out",
                                      str(tmp_path / "r")])
    with pytest.raises(SystemExit) as e:
        cli.main()
    err = capsys.readouterr().err
    assert e.value.code == 2 and "pip install 'tokenreduce[ray]'" in err and len(err.strip().splitlines()) == 2
    assert not (tmp_path / "r" / "results.jsonl").exists()


@needs_ray
def test_unreachable_address_is_one_line(tmp_path, monkeypatch, capsys):
    from tokenreduce import cli

    monkeypatch.setattr(sys, "argv", ["tokenreduce", "bench", "vit", "--smoke", "--executor", "ray", "--address",
                                      "127.0.0.1:9", "--out", str(tmp_path / "r")])
    with pytest.raises(SystemExit) as e:
        cli.main()
    err = capsys.readouterr().err
    assert e.value.code == 2 and "--address 127.0.0.1:9: no Ray cluster reachable there" in err, err
    assert len(err.strip().splitlines()) == 2 and "Traceback" not in err
    assert not (tmp_path / "r" / "results.jsonl").exists()


@needs_ray
@pytest.mark.ray
def test_bench_vit_smoke_on_ray_gives_the_local_accuracy_rows(tmp_path):
    """`tokenreduce bench vit --smoke --executor ray` (a local 2-CPU Ray instance) and the same in process give
    equal rows field by field, timing and metadata aside; the Ray rows say where they ran."""
    local = _vit(tmp_path / "local")
    on_ray = _vit(tmp_path / "ray", executor="ray")
    assert _accuracy_fields(on_ray) == _accuracy_fields(local)
    assert all(r["speedup"] > 0 for r in on_ray)
    (_meta_l, written_l), = read_runs(tmp_path / "local" / "results.jsonl").values()
    (meta_r, written_r), = read_runs(tmp_path / "ray" / "results.jsonl").values()
    assert [r["cell_id"] for r in written_r] == [r["cell_id"] for r in written_l]  # same cells, same ids
    assert all(r["origin"]["executor"] == "ray" and r["origin"]["node_id"] for r in written_r)
    assert meta_r["sweep"]["executor"] == "ray" and meta_r["bench"] == "vit"


# ---------------------------------------------------------------------------- CUDA
@needs_cuda
def test_bench_vit_smoke_on_cuda_records_the_device_and_times_with_events(tmp_path):
    rows = _vit(tmp_path, device="cuda")
    assert all(r["speedup"] > 0 for r in rows)
    (meta, written), = read_runs(tmp_path / "results.jsonl").values()
    assert meta["config"]["device"] == "cuda"
    assert all(r["origin"]["device"] == "cuda" and r["origin"]["gpu"] for r in written)


@needs_cuda
def test_cuda_clock_times_gpu_work():
    from tokenreduce.bench.timing import interleaved

    x = torch.randn(512, 512, device="cuda")
    t = interleaved({"mm": lambda: x @ x, "mm3": lambda: x @ x @ x @ x}, warmup=1, repeats=3, clock="cuda")
    assert t["mm3"].median > t["mm"].median > 0


def test_device_cuda_without_cuda_is_refused_before_any_work(tmp_path):
    if torch.cuda.is_available():
        pytest.skip("CUDA is present")
    with pytest.raises(ValueError, match="--device cuda: torch sees no CUDA device"):
        _vit(tmp_path / "r", device="cuda")
    assert not (tmp_path / "r").exists()
