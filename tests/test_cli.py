"""The `tokenreduce` command line."""

from __future__ import annotations

from typer.testing import CliRunner

from tokenreduce import cli


def _app():
    cli._register_plugins()
    return cli.app


def test_list_shows_registered_methods():
    res = CliRunner().invoke(_app(), ["list", "--integration", "vit-layers"])
    assert res.exit_code == 0, res.output
    for name in ("tome", "evit", "token-transforming", "cluster", "pool", "random"):
        assert name in res.output


def test_bench_vit_is_registered():
    res = CliRunner().invoke(_app(), ["bench", "vit", "--help"])
    assert res.exit_code == 0, res.output
    assert "--keep" in res.output and "--methods" in res.output


def test_convert_gemma_is_registered():
    res = CliRunner().invoke(_app(), ["convert", "gemma", "--help"])
    assert res.exit_code == 0, res.output


def test_train_vlm_options_address_the_cached_model(tmp_path, monkeypatch):
    """`tokenreduce train vlm` builds its config from the options: a cached checkpoint of that config is
    reported instead of retrained (``--ground-weight 0``: the model trained before word grounding)."""
    import json

    from tokenreduce.models.vlm import VLMTrainConfig, checkpoint_dir

    monkeypatch.setenv("TOKENREDUCE_CACHE", str(tmp_path))
    for c, acc in ((VLMTrainConfig(ground_weight=0.0), 0.25), (VLMTrainConfig(), 0.75)):
        d = checkpoint_dir(c)
        (d / "model.pt").write_bytes(b"")
        (d / "metrics.json").write_text(json.dumps({"test_acc": acc, "test_acc_by_type": {}}))
    res = CliRunner().invoke(_app(), ["train", "vlm", "--ground-weight", "0"])
    assert res.exit_code == 0, res.output
    assert "d705f465f1" in res.output and "test acc 0.250" in res.output
    res = CliRunner().invoke(_app(), ["train", "vlm"])
    assert res.exit_code == 0, res.output
    assert "0e4ba3681b" in res.output and "test acc 0.750" in res.output


def _main(args, capsys):
    """The console script (``tokenreduce ...``): its exit code and stderr."""
    import sys

    old = sys.argv
    sys.argv = ["tokenreduce", *args]
    try:
        with __import__("pytest").raises(SystemExit) as e:
            cli.main()
    finally:
        sys.argv = old
    return e.value.code, capsys.readouterr()


def test_list_accepts_short_integration_names_and_refuses_unknown_ones(capsys):
    res = CliRunner().invoke(_app(), ["list", "--integration", "kv"])
    assert res.exit_code == 0 and "snapkv" in res.output and "tome" not in res.output
    code, out = _main(["list", "--integration", "kv-cach"], capsys)
    assert code == 2 and "did you mean 'kv-cache'" in out.err and "Traceback" not in out.err


def test_list_one_method_shows_keep_meaning_knobs_and_doc():
    res = CliRunner().invoke(_app(), ["list", "snapkv"])
    assert res.exit_code == 0, res.output
    out = " ".join(res.output.split())
    assert "fraction of the KV-cache entries kept" in out and "window_size=32" in out and "SnapKV" in out
    assert "phase" not in out.split("knobs:")[1].split("\n")[0]  # class variables are not knobs


def test_bench_errors_are_one_line_and_come_before_any_work(capsys, tmp_path):
    """Names, keeps and choices are checked before a model loads; the error is one line, exit code 2."""
    for args, needle in ((["bench", "vit", "--methods", "tomee"], "did you mean 'tome'"),
                         (["bench", "vit", "--keep", "abc"], "'abc' is not a number"),
                         (["bench", "vit", "--keep", "0.5,2"], "out of range"),
                         (["bench", "vit", "--clock", "gpu"], "'gpu' is not accepted"),
                         (["bench", "encoder", "--methods", "tomee"], "did you mean 'tome'"),
                         (["bench", "prompt", "--methods", "selective"], "did you mean"),
                         (["bench", "kv", "--dtype", "fp16"], "'fp16' is not accepted"),
                         (["bench", "kv", "--keeps", "0.5,abc"], "'abc' is not a number"),
                         (["bench", "kv", "--variants", "snapkvv"], "unknown variants"),
                         (["bench", "kv", "--lengths", "1k"], "whole numbers of tokens"),
                         (["list", "tomee"], "did you mean 'tome'")):
        code, out = _main([*args, "--out", str(tmp_path / "r")] if args[0] == "bench" else args, capsys)
        assert code == 2, (args, out)
        assert needle in out.err and "Traceback" not in out.err and len(out.err.strip().splitlines()) == 2, out.err
    assert not (tmp_path / "r").exists()  # nothing written


def test_help_shows_defaults():
    res = CliRunner().invoke(_app(), ["bench", "vit", "--help"])
    assert "[default: tome,evit" in " ".join(res.output.split()).replace("│ ", "")


def test_every_command_help_renders():
    """Every command and sub-command prints its help (help texts hold brackets that rich markup would parse)."""
    import typer.main

    group = typer.main.get_command(_app())
    paths = [[]]
    for name, cmd in group.commands.items():
        paths.append([name])
        paths += [[name, sub] for sub in getattr(cmd, "commands", {})]
    assert len(paths) > 15
    for path in paths:
        res = CliRunner().invoke(_app(), [*path, "--help"])
        assert res.exit_code == 0, (path, res.output, res.exception)
        assert "Usage:" in res.output, path
