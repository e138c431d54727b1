"""`tokenreduce bench diffusion --smoke` (tiny random-weight models: the whole sweep), its parts, resume, the Ray
executor giving the in-process quality rows, and the CLI entries."""

from __future__ import annotations

import functools
import importlib.util

import pytest
from typer.testing import CliRunner

pytest.importorskip("diffusers")
pytest.importorskip("torchmetrics")

from tokenreduce import cli
from tokenreduce.bench import diffusion as bench
from tokenreduce.bench.results import read_results, read_runs
from tokenreduce.bench.sweep import METADATA_FIELDS
from tokenreduce.bench.timing import fixed_threads

needs_ray = pytest.mark.skipif(importlib.util.find_spec("ray") is None,
                               reason="ray is not installed (pip install 'tokenreduce[ray]')")
#: fields that differ between two runs of the same cell (wall-clock)
TIMING_FIELDS = {"speedup", "speedup_low", "speedup_high", "limit_speedup", "efficiency", "efficiency_low",
                 "efficiency_high", "time_per_image_ms", "base_time_per_image_ms"}


@pytest.fixture(scope="module", autouse=True)
def _one_thread():  # tiny tensors: a second thread on a shared machine only spin-waits
    with fixed_threads(1):
        yield


def _app():
    cli._register_plugins()
    return cli.app


def _smoke(out, executor="local", **kw):
    return bench.run_diffusion_bench(bench.smoke_config(str(out), **kw), progress=False, executor=executor)


def _quality(rows):
    return [{k: v for k, v in r.items() if k not in TIMING_FIELDS and k not in METADATA_FIELDS} for r in rows]


def test_bench_diffusion_smoke(tmp_path):
    res = CliRunner().invoke(_app(), ["bench", "diffusion", "--smoke", "--methods", "tomesd,toca", "--out", str(tmp_path)])
    assert res.exit_code == 0, res.output
    meta, rows = read_results(tmp_path / "results.jsonl")
    assert meta["bench"] == "diffusion" and meta["sweep"]["cells"] == 2 + 2 * 2  # unreduced + a cell per method
    got = {(r["model"], r["method"], r["keep"]) for r in rows}
    for model in ("unet", "dit"):
        assert {(model, "none", 1.0), (model, "tomesd", 1.0), (model, "tomesd", 0.5), (model, "toca", 0.5)} <= got
    assert ("unet", "tomesd-package", 0.5) in got and ("dit", "tomesd-package", 0.5) not in got
    for r in rows:
        assert {"fid", "class_acc", "speedup", "peak_mem_mb"} <= set(r) or r["method"] == "tomesd-package"
        assert r["origin"]["executor"] == "local" and r["cell_id"]
        if r["method"] != "none" and r["keep"] == 1.0:
            assert r["bit_exact"] is True and r["speedup"] == 1.0
        if r["keep"] < 1.0:
            assert r["limit_speedup"] > 0 and 0 < r["ssim"] <= 1 and r["time_per_image_ms"] > 0
        if r["keep"] < 1.0 and r["method"] != "tomesd-package":
            assert 0 < r["efficiency_low"] <= r["efficiency"] <= r["efficiency_high"]
    for name in ("samples_unet.png", "samples_dit.png", "report.html"):
        assert (tmp_path / name).stat().st_size > 0


def test_accuracy_part_then_timing_part_give_the_quality_rows_of_one_cell(tmp_path):
    """Quality cells need no timing; the timing part copies their rows and adds the timing columns (the
    tomesd package's rows included: they are timed in our tomesd's group)."""
    with pytest.raises(FileNotFoundError, match="run parts='accuracy' first"):
        _smoke(tmp_path / "none", models=["unet"], methods=["tomesd"], parts="timing")
    acc = _smoke(tmp_path, models=["unet"], methods=["tomesd", "todo"], parts="accuracy")
    assert [(r["method"], r["keep"]) for r in acc] == [
        ("none", 1.0), ("tomesd", 1.0), ("tomesd", 0.5), ("tomesd-package", 0.5), ("todo", 1.0), ("todo", 0.5)]
    assert all("time_per_image_ms" not in r for r in acc)
    timed = _smoke(tmp_path, models=["unet"], methods=["tomesd", "todo"], parts="timing")
    assert _quality(timed) == _quality(acc)
    assert all(r["speedup"] > 0 and r["time_per_image_ms"] > 0 for r in timed if r["method"] != "none")
    assert all(r["limit_speedup"] > 0 for r in timed if r["keep"] < 1.0)


def test_an_interrupted_sweep_resumes_without_recomputing_finished_cells(tmp_path, monkeypatch):
    real = bench.run_diffusion_cell
    calls: list[tuple[str, str]] = []

    def counted(ctx, cell, interrupt_at=None):
        calls.append((ctx.kind, cell.method))
        if len(calls) == interrupt_at:
            raise KeyboardInterrupt
        return real(ctx, cell)

    kw = {"models": ["dit"], "methods": ["tomesd", "pool"], "parts": "accuracy"}
    monkeypatch.setattr(bench, "run_diffusion_cell", functools.partial(counted, interrupt_at=3))
    with pytest.raises(KeyboardInterrupt):
        _smoke(tmp_path, **kw)
    assert calls == [("dit", "none"), ("dit", "tomesd"), ("dit", "tomesd")]
    monkeypatch.setattr(bench, "run_diffusion_cell", counted)
    calls.clear()
    rows = _smoke(tmp_path, **kw)
    assert calls == [("dit", "tomesd"), ("dit", "pool"), ("dit", "pool")]  # none and tomesd@1 were finished
    assert [(r["method"], r["keep"]) for r in rows] == [("none", 1.0), ("tomesd", 1.0), ("tomesd", 0.5),
                                                        ("pool", 1.0), ("pool", 0.5)]
    calls.clear()
    assert _quality(_smoke(tmp_path, **kw)) == _quality(rows) and calls == []  # all finished: nothing runs


@needs_ray
@pytest.mark.ray
def test_bench_diffusion_smoke_on_ray_gives_the_local_quality_rows(tmp_path):
    """In process and on a local Ray instance: equal rows field by field (FID, class accuracy, PSNR/SSIM, kept
    counts, peak memory, the tomesd package's rows), timing and metadata aside."""
    kw = {"models": ["unet"], "methods": ["tomesd", "toca"]}
    local = _smoke(tmp_path / "local", **kw)
    on_ray = _smoke(tmp_path / "ray", executor="ray", **kw)
    assert _quality(on_ray) == _quality(local)
    assert any(r["method"] == "tomesd-package" for r in on_ray)
    assert all(r["speedup"] > 0 for r in on_ray)
    (_, written_l), = read_runs(tmp_path / "local" / "results.jsonl").values()
    (meta_r, written_r), = read_runs(tmp_path / "ray" / "results.jsonl").values()
    assert sorted(r["cell_id"] for r in written_r) == sorted(r["cell_id"] for r in written_l)  # written as finished
    assert all(r["origin"]["executor"] == "ray" and r["origin"]["node_id"] for r in written_r)
    assert meta_r["sweep"]["executor"] == "ray" and meta_r["bench"] == "diffusion"


@pytest.mark.parametrize(("args", "message"), [
    (["--models", "unet,sd"], "--models: 'sd' is not accepted"),
    (["--methods", "tome"], "--methods: unknown method 'tome'"),
    (["--keep", "1,1.5"], "--keep 1.5"),
    (["--device", "cuda"], "--device cuda: bench diffusion runs on the CPU only"),
    (["--parts", "speed"], "--parts: 'speed' is not accepted"),
    (["--method-kw", "{tomesd"], "--method-kw: '{tomesd' is not JSON"),
    (["--method-kw", '{"tomesd": true}'], "must be a JSON object mapping method names to objects"),
    (["--method-kw", '{"tome": {"merge_mlp": true}}'], "--method-kw: unknown method 'tome'"),
])
def test_bad_arguments_are_refused_before_any_work(tmp_path, args, message):
    res = CliRunner().invoke(_app(), ["bench", "diffusion", "--smoke", *args, "--out", str(tmp_path / "r")])
    assert res.exit_code != 0 and message in str(res.exception), (res.output, res.exception)
    assert not (tmp_path / "r").exists()


def test_method_kw_reach_the_method_its_limit_and_the_tomesd_package(tmp_path, monkeypatch):
    """--method-kw: ToMe for SD's merge_mlp switch merges the feed-forward too (its kept counts in the rows), the
    zero-overhead limit runs the same operations, and the package beside it gets the same switch."""
    import tomesd

    from tokenreduce.bench import diffusion_cells

    patched, limits = [], []
    real_patch, real_limit = tomesd.apply_patch, diffusion_cells.zero_overhead_limit
    monkeypatch.setattr(tomesd, "apply_patch", lambda net, **kw: patched.append(kw) or real_patch(net, **kw))
    monkeypatch.setattr(diffusion_cells, "zero_overhead_limit", lambda *a: limits.append(real_limit(*a)) or limits[-1])
    res = CliRunner().invoke(_app(), ["bench", "diffusion", "--smoke", "--models", "unet", "--methods", "tomesd",
                                      "--method-kw", '{"tomesd": {"merge_mlp": true}}', "--out", str(tmp_path)])
    assert res.exit_code == 0, res.output
    _, rows = read_results(tmp_path / "results.jsonl")
    row, = (r for r in rows if r["method"] == "tomesd" and r["keep"] == 0.5)
    reduced = [i for i, (a, n) in enumerate(zip(row["tokens_attn"], row["site_tokens"], strict=True)) if a < n]
    assert reduced and all(row["tokens_mlp"][i] == row["tokens_attn"][i] for i in reduced)
    assert patched and all(kw["merge_mlp"] is True and kw["ratio"] == 0.5 for kw in patched)
    assert limits and all(lim.merge_mlp and lim.ops == {"attn", "mlp"} for lim in limits)


def test_diffusion_commands_are_registered():
    app = _app()
    for args in (["train", "dit", "--help"], ["train", "unet", "--help"], ["train", "digit-features", "--help"]):
        assert CliRunner().invoke(app, args).exit_code == 0
    res = CliRunner().invoke(app, ["list", "--integration", "diffusion"])
    assert res.exit_code == 0, res.output
    for name in ("tomesd", "todo", "tofu", "toca", "random", "pool"):
        assert name in res.output


def test_overhead_script_times_method_and_limit_on_a_random_dit(tmp_path, monkeypatch):
    """scripts/diffusion_overhead.py: one row per method and batch, with the achieved counts the limit ran on
    and the efficiency (per-round limit / method time) inside its quartiles; a malformed model name is refused
    naming the accepted forms."""
    import json
    import runpy
    import sys
    from pathlib import Path

    script = Path(__file__).parents[2] / "scripts" / "diffusion_overhead.py"
    mod = runpy.run_path(str(script))
    with pytest.raises(ValueError, match=r"model '12x384': accepted 'trained' or '<depth>x<width>/<heads>'"):
        mod["build"]("12x384")
    out = tmp_path / "o.jsonl"
    monkeypatch.setattr(sys, "argv", ["x", "--models", "2x16/2", "--batches", "1,2", "--steps", "1", "--repeats", "1",
                                      "--out", str(out)])
    mod["main"]()
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [(r["method"], r["batch"]) for r in rows] == [("tomesd", 1), ("tofu", 1), ("tomesd", 2), ("tofu", 2)]
    for r in rows:
        assert r["kept_tokens"] == [128] and r["model"] == "2x16/2" and r["params"] > 0
        assert r["speedup"] > 0 and r["limit"] > 0
        assert 0 < r["efficiency_iqr"][0] <= r["efficiency"] <= r["efficiency_iqr"][1]
