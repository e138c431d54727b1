"""`tokenreduce bench diffusion --smoke` (tiny random-weight models: the whole pipeline) and the CLI entries."""

from __future__ import annotations

import pytest
from typer.testing import CliRunner

pytest.importorskip("diffusers")
pytest.importorskip("torchmetrics")

from tokenreduce import cli
from tokenreduce.bench.results import read_results
from tokenreduce.bench.timing import fixed_threads


@pytest.fixture(scope="module", autouse=True)
def _one_thread():  # tiny tensors: a second thread on a shared machine only spin-waits
    with fixed_threads(1):
        yield


def _app():
    cli._register_plugins()
    return cli.app


def test_bench_diffusion_smoke(tmp_path):
    res = CliRunner().invoke(_app(), ["bench", "diffusion", "--smoke", "--methods", "tomesd,toca", "--out", str(tmp_path)])
    assert res.exit_code == 0, res.output
    meta, rows = read_results(tmp_path / "results.jsonl")
    assert meta["bench"] == "diffusion"
    got = {(r["model"], r["method"], r["keep"]) for r in rows}
    for model in ("unet", "dit"):
        assert {(model, "none", 1.0), (model, "tomesd", 1.0), (model, "tomesd", 0.5), (model, "toca", 0.5)} <= got
    assert ("unet", "tomesd-package", 0.5) in got and ("dit", "tomesd-package", 0.5) not in got
    for r in rows:
        assert {"fid", "class_acc", "speedup", "peak_mem_mb"} <= set(r) or r["method"] == "tomesd-package"
        if r["method"] != "none" and r["keep"] == 1.0:
            assert r["bit_exact"] is True and r["speedup"] == 1.0
        if r["keep"] < 1.0:
            assert r["limit_speedup"] > 0 and 0 < r["ssim"] <= 1 and r["time_per_image_ms"] > 0
    for name in ("samples_unet.png", "samples_dit.png", "report.html"):
        assert (tmp_path / name).stat().st_size > 0


def test_diffusion_commands_are_registered():
    app = _app()
    for args in (["train", "dit", "--help"], ["train", "unet", "--help"], ["train", "digit-features", "--help"]):
        assert CliRunner().invoke(app, args).exit_code == 0
    res = CliRunner().invoke(app, ["list", "--integration", "diffusion"])
    assert res.exit_code == 0, res.output
    for name in ("tomesd", "todo", "tofu", "toca", "random", "pool"):
        assert name in res.output
