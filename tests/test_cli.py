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
