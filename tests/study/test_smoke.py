"""`tokenreduce study <name> --smoke`: every study end to end on tiny random-weight models (seconds): items file,
summary, plot, HTML with the verdict first, no verdict at smoke size, resume."""

from __future__ import annotations

import json
import sys

import pytest

from tokenreduce import cli
from tokenreduce.bench.results import read_runs


def _cli(args, monkeypatch):
    monkeypatch.setattr(sys, "argv", ["tokenreduce", *args])
    cli.main()


@pytest.mark.parametrize("name", ["distraction", "hallucination", "train-reduction", "reasoning-length", "rho1"])
def test_smoke_study_end_to_end_and_resumes(name, tmp_path, monkeypatch, capsys):
    out = tmp_path / name
    _cli(["study", name, "--smoke", "--out", str(out)], monkeypatch)
    printed = capsys.readouterr()
    (meta, rows), = read_runs(out / "items.jsonl").values()
    assert not any(r.get("cell_failed") for r in rows), [r.get("error") for r in rows if r.get("cell_failed")]
    assert rows and meta["sweep"]["run"] == meta["sweep"]["cells"]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["smoke"] and summary["parts"]
    assert all(p["verdict"] == "no verdict" for p in summary["parts"])  # smoke sizes are too small for a CI
    assert "no verdict: n=" in printed.out
    html = (out / "report.html").read_text()
    assert html.index("VERDICT") < html.index("<table") and (out / "plot.png").stat().st_size > 1000
    assert "ci95" in html and "p_holm" in html
    _cli(["study", name, "--smoke", "--out", str(out)], monkeypatch)
    assert len(read_runs(out / "items.jsonl")) == 1  # everything resumed: no new run
    assert "0 failed" in capsys.readouterr().err
    _cli(["study", name, "--smoke", "--out", str(out), "--report-only"], monkeypatch)
    assert json.loads((out / "summary.json").read_text())["parts"] == summary["parts"]
    assert len(read_runs(out / "items.jsonl")) == 1


def test_report_only_on_a_partial_run_says_so(tmp_path):
    from tokenreduce.study import run_study

    out = tmp_path / "d"
    run = run_study("distraction", smoke=True, out=out, overrides={"n_prompts": 2, "ppl": False}, progress=False)
    part = run_study("distraction", smoke=True, out=out, overrides={"n_prompts": 3, "ppl": False}, report_only=True)
    assert part.result.notes[0].startswith("partial: the report holds 0 of the 3 cells")  # n is in every cell id
    assert run.result.parts[0].table[0]["n"] == 2


def test_cli_errors_name_the_fix(monkeypatch, capsys):
    with pytest.raises(SystemExit) as e:
        _cli(["study", "halucination", "--smoke"], monkeypatch)
    assert e.value.code == 2 and "did you mean 'hallucination'" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        _cli(["study", "distraction", "--smoke", "--set", "n_prompt=2"], monkeypatch)
    assert "did you mean 'n_prompts'" in capsys.readouterr().err
