"""Fine-tuning the reference ViT with a vision method active (fast: tiny random-weight models, a few steps)."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch

import tokenreduce as tr
from tokenreduce.data.digits import ClutteredDigitsConfig
from tokenreduce.models.vit import (
    FinetuneConfig,
    TrainConfig,
    build_reference_vit,
    finetune_dir,
    finetune_reference_vit,
    load_finetuned_vit,
    parse_finetune_spec,
)
from tokenreduce.models.vit.train import make_optimizer, train_step

TINY = {"embed_dim": 32, "depth": 2, "num_heads": 2, "mlp_ratio": 2.0, "stem_channels": 8, "stem_extra_convs": 1}


def _base() -> TrainConfig:
    return TrainConfig(image_size=32, patch_size=8, data=ClutteredDigitsConfig(image_size=32, digit_scale=2.0),
                       epochs=1, samples_per_epoch=64, batch_size=32, val_samples=16, test_samples=16,
                       num_threads=1, **TINY)


def _config(**overrides) -> FinetuneConfig:
    kw = {"method": "tome", "keep": 0.7, "base": _base(), "steps": 4, "batch_size": 8, "num_threads": 1}
    kw.update(overrides)
    return FinetuneConfig(**kw)


def _model(config: FinetuneConfig) -> torch.nn.Module:
    torch.manual_seed(0)
    return build_reference_vit(**config.base.model_kwargs())


def test_finetune_runs_and_checkpoint_round_trips(tmp_path, monkeypatch):
    monkeypatch.setenv("TOKENREDUCE_CACHE", str(tmp_path))
    config = _config()
    model = _model(config)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    metrics = finetune_reference_vit(config, progress=False, model=model)
    assert metrics["steps"] == 4 and metrics["evaluated_with"] == "tome@0.7"
    assert all(math.isfinite(metrics[k]) for k in ("first_train_loss", "last_train_loss", "val_loss", "test_loss"))
    assert any(not torch.equal(before[k], v) for k, v in model.state_dict().items())  # it trained
    assert finetune_dir(config).parent == tmp_path / "reference_vit"
    loaded, info = load_finetuned_vit(config=config)
    assert not loaded.training and info["config"] == config and info["metrics"]["config_hash"] == config.config_hash()
    for k, v in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[k], v), k
    assert FinetuneConfig.from_dict(config.to_dict()) == config  # config.json round-trips (nested base)


@pytest.mark.parametrize("method", ["tome", "evit", "token-transforming", "cluster", "pool", "random"])
def test_gradients_reach_every_block_with_the_method_active(method):
    config = _config(method=method)
    model = _model(config).train()
    opt, sched = make_optimizer(model, 1e-3, 0.05, 4, 0.0, 0.1)
    x, y = torch.randn(4, 3, 32, 32), torch.randint(0, 10, (4,))
    with tr.apply(model, method, keep=0.85) as h:
        loss = train_step(model, opt, sched, x, y, 0.1, 1.0)
        assert h.stats.keep_achieved < 1.0  # the method really reduced tokens in this forward
    assert math.isfinite(loss.item())
    for i, block in enumerate(model.blocks):
        for name, p in block.named_parameters():
            assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0, (method, i, name)


def test_a_method_that_cuts_the_gradient_is_named(tmp_path, monkeypatch):
    monkeypatch.setenv("TOKENREDUCE_CACHE", str(tmp_path))
    config = _config(method="random", keep=0.85)
    model = _model(config)
    model.register_forward_hook(lambda m, i, out: out.detach())  # stands for a forward pass under no_grad
    with pytest.raises(RuntimeError, match="method 'random' cannot be fine-tuned"):
        finetune_reference_vit(config, progress=False, model=model)


def test_hash_covers_method_keep_base_and_steps_but_not_threads():
    c = _config()
    assert c.config_hash() != _config(method="evit").config_hash()
    assert c.config_hash() != _config(keep=0.8).config_hash()
    assert c.config_hash() != _config(steps=5).config_hash()
    assert c.config_hash() != _config(method_kw={"prop_attn": False}).config_hash()
    assert c.config_hash() != _config(base=dataclasses.replace(_base(), seed=3)).config_hash()
    assert c.config_hash() == _config(num_threads=2, eval_batch_size=7).config_hash()


@pytest.mark.parametrize(("kw", "needle"), [
    ({"method": "snapkv"}, r"must be a vision \(vit-layers\) method"),
    ({"method": "tomee"}, "must be a vision"),
    ({"keep": 64}, "keep=64 is invalid"),
    ({"keep": 1.5}, "keep=1.5 is invalid"),
    ({"steps": 0}, "steps=0 is invalid"),
    ({"lr": 0.0}, "lr=0.0 is out of range"),
])
def test_config_errors_name_the_bad_value(kw, needle):
    with pytest.raises(ValueError, match=needle):
        _config(**kw)


def test_spec_parsing_and_missing_checkpoint(tmp_path, monkeypatch):
    monkeypatch.setenv("TOKENREDUCE_CACHE", str(tmp_path))
    c = parse_finetune_spec("finetune:evit:0.5")
    assert (c.method, c.keep) == ("evit", 0.5)
    for bad in ("finetune:tome", "tome:0.5", "finetune:tome:x"):
        with pytest.raises(ValueError, match="finetune:<method>:<keep>"):
            parse_finetune_spec(bad)
    with pytest.raises(FileNotFoundError, match="tokenreduce train vit --reduce evit --keep 0.5"):
        load_finetuned_vit("evit", 0.5)
    assert not finetune_dir(c).exists()  # looking does not create it


def test_cli_refuses_non_vision_method_and_bad_keep_in_one_line(capsys, tmp_path, monkeypatch):
    from tokenreduce import cli

    monkeypatch.setenv("TOKENREDUCE_CACHE", str(tmp_path))
    for args, needle in ((["--reduce", "snapkv", "--keep", "0.5"], "must be a vision (vit-layers) method"),
                         (["--reduce", "tome", "--keep", "64"], "keep=64.0 is invalid"),
                         (["--reduce", "tome"], "needs --keep"),
                         (["--keep", "0.5"], "--keep needs --reduce")):
        monkeypatch.setattr("sys.argv", ["tokenreduce", "train", "vit", *args])
        with pytest.raises(SystemExit) as e:
            cli.main()
        err = capsys.readouterr().err
        assert e.value.code == 2, (args, err)
        assert needle in err and "Traceback" not in err and len(err.strip().splitlines()) == 2, err
    assert not (tmp_path / "reference_vit").exists()
