"""`tokenreduce bench <name> --smoke` for every benchmark: tiny random-weight models of the real classes, the
whole path (grid, cells, executor, results file, report) in seconds, from the command line."""

from __future__ import annotations

import sys

import pytest

from tokenreduce import cli
from tokenreduce.bench.results import read_runs
from tokenreduce.bench.sweep import finished_cells

#: bench -> (results file, a row field every smoke run writes)
BENCHES = {"vit": ("results.jsonl", "accuracy"), "encoder": ("results.jsonl", "spearman"),
           "vlm": ("results.jsonl", "accuracy"), "prompt": ("results.jsonl", "kind"),
           "kv": ("kv.jsonl", "part"), "diffusion": ("results.jsonl", "ssim")}
#: bench -> the extra it needs
EXTRAS = {"diffusion": "diffusers"}


def _cli(args, monkeypatch):
    monkeypatch.setattr(sys, "argv", ["tokenreduce", *args])
    cli.main()


@pytest.mark.parametrize("bench", sorted(BENCHES))
def test_smoke_runs_every_bench_end_to_end_and_resumes(bench, tmp_path, monkeypatch, capsys):
    if bench in EXTRAS:
        pytest.importorskip(EXTRAS[bench])
    name, field = BENCHES[bench]
    out = tmp_path / bench
    _cli(["bench", bench, "--smoke", "--out", str(out)], monkeypatch)
    runs = read_runs(out / name)
    (meta, rows), = runs.values()
    assert meta["sweep"]["executor"] == "local" and meta["sweep"]["run"] == meta["sweep"]["cells"] > 1
    assert rows and all(field in r for r in rows if "cell_id" in r and not r.get("error"))
    assert not any(r.get("cell_failed") for r in rows), [r["error"] for r in rows if r.get("cell_failed")]
    assert all(r["origin"]["executor"] == "local" for r in rows if "cell_id" in r)
    assert (out / "report.html").stat().st_size > 1000
    assert len(finished_cells(out / name)) == meta["sweep"]["cells"]
    capsys.readouterr()
    _cli(["bench", bench, "--smoke", "--out", str(out)], monkeypatch)  # everything is there: nothing runs
    assert len(read_runs(out / name)) == 1
    assert f"{meta['sweep']['cells']} from earlier runs, 0 failed" in capsys.readouterr().err
