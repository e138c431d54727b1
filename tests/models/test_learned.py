"""The learned vision methods (DynamicViT, DiffRate): training on a tiny random-weight timm ViT (a few steps:
the loss decreases, gradients reach only the predictors/rates), what tr.apply loads and runs (hard removal,
counts as trained, exact restore, batch consistency) and the errors. Real-model checks are ``slow``."""

from __future__ import annotations

import io
import itertools

import pytest
import torch

import tokenreduce as tr
from tests.tiny import timm_vit
from tokenreduce.methods.vit.learned import weights_fingerprint
from tokenreduce.models.vit import FinetuneConfig
from tokenreduce.models.vit.learned import LearnedConfig, learned_dir, train_learned
from tokenreduce.models.vit.learned.diffrate import DiffRateTrainer
from tokenreduce.models.vit.learned.dynamicvit import DynamicViTTrainer

METHODS = ("dynamicvit", "diffrate")


def _batches(seed: int = 0, batch: int = 8):
    g = torch.Generator().manual_seed(seed)
    x, y = torch.randn(batch, 3, 32, 32, generator=g), torch.randint(0, 7, (batch,), generator=g)
    return itertools.repeat((x, y))  # one batch again and again: the loss must go down on it


def _config(method: str, **kw) -> LearnedConfig:
    return LearnedConfig(**{"method": method, "keep": 0.5, "steps": 25, "batch_size": 8, "lr": 3e-2, **kw})


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A tiny timm ViT with both methods trained at keep 0.5 in a temporary cache."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("TOKENREDUCE_CACHE", str(tmp_path_factory.mktemp("cache")))
        model = timm_vit()
        metrics = {m: train_learned(model, _config(m), _batches()) for m in METHODS}
        yield model, metrics


@pytest.fixture(scope="module")
def images() -> torch.Tensor:
    return torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("method", METHODS)
def test_training_lowers_the_loss_and_leaves_the_backbone_alone(trained, method):
    model, metrics = trained
    m = metrics[method]
    assert m["last_loss"] < m["first_loss"], (m["first_loss"], m["last_loss"])
    assert m["fingerprint"] == weights_fingerprint(model)  # frozen: the same weights after training
    assert all(p.requires_grad for p in model.parameters()) and not model.training  # flags restored


@pytest.mark.parametrize("trainer_cls", [DynamicViTTrainer, DiffRateTrainer])
def test_gradients_reach_only_the_learned_parts(trainer_cls):
    model = timm_vit().requires_grad_(False)
    cfg = _config("dynamicvit" if trainer_cls is DynamicViTTrainer else "diffrate")
    trainer = trainer_cls(model, 0.5, cfg)
    x, y = next(_batches())
    teacher = None
    if trainer.uses_teacher:
        with torch.no_grad():
            f = model.forward_features(x)
            teacher = (model.forward_head(f), f)
    loss, _ = trainer.loss(x, y, teacher)
    loss.backward()
    grads = [p.grad for p in trainer.parameters()]
    assert all(g is not None for g in grads) and sum(g.abs().sum() for g in grads) > 0
    assert all(p.grad is None for p in model.parameters())


def test_dynamicvit_removes_tokens_as_trained(trained, images):
    model, metrics = trained
    ratios = metrics["dynamicvit"]["learned"]["ratios"]
    with torch.no_grad(), tr.apply(model, "dynamicvit", keep=0.5) as h:
        model(images)
    st = h.stats
    layers = metrics["dynamicvit"]["learned"]["layers"]
    # hard: after each stage the MLP (and every later block) runs on rho^s of the 64 patches + CLS, no masks
    assert [st.tokens_mlp[l] for l in layers] == [1 + round(64 * r) for r in ratios]
    assert st.final_tokens == [1 + round(64 * ratios[-1])] * 3
    assert abs(st.keep_achieved - 0.5) < 0.03


def test_diffrate_runs_its_learned_counts(trained, images):
    model, metrics = trained
    learned = metrics["diffrate"]["learned"]
    expect, n = [], 64
    for p, m in zip(learned["prune"], learned["merge"]):
        n = min(n, round(p * 64), round(m * 64))
        expect.append(1 + n)
    with torch.no_grad(), tr.apply(model, "diffrate", keep=0.5) as h:
        model(images)
    assert h.stats.tokens_mlp == expect and h.stats.final_tokens == [expect[-1]] * 3
    assert expect[-1] < 65


@pytest.mark.parametrize("method", METHODS)
def test_restore_is_exact_and_batches_are_consistent(trained, images, method):
    model, _ = trained
    buf = io.BytesIO()
    torch.save(model.state_dict(), buf)
    dicts = {n: set(m.__dict__) for n, m in model.named_modules()}
    with torch.no_grad():
        ref = model(images)
        with tr.apply(model, method, keep=1.0):  # identity needs nothing trained
            torch.testing.assert_close(model(images), ref, rtol=0, atol=0)
        with tr.apply(model, method, keep=0.5):
            batch = model(images)
            for i in range(3):
                torch.testing.assert_close(batch[i:i + 1], model(images[i:i + 1]), rtol=1e-4, atol=1e-5)
        assert not torch.equal(batch, ref)
        torch.testing.assert_close(model(images), ref, rtol=0, atol=0)
    assert {n: set(m.__dict__) for n, m in model.named_modules()} == dicts
    buf2 = io.BytesIO()
    torch.save(model.state_dict(), buf2)
    assert buf.getvalue() == buf2.getvalue()


@pytest.mark.parametrize("method", METHODS)
def test_errors_name_the_training_command_and_ranges(trained, method):
    model, _ = trained
    with pytest.raises(FileNotFoundError, match=rf"train it with `tokenreduce train vit --reduce {method} --keep 0.6`"):
        tr.apply(model, method, keep=0.6)  # trained at 0.5 only
    other = timm_vit(classes=5)  # other weights: nothing trained for them
    with pytest.raises(FileNotFoundError, match="no trained .* for this model"):
        tr.apply(other, method, keep=0.5)
    assert "forward" not in other.blocks[0].__dict__  # nothing left patched
    with pytest.raises(ValueError, match=r"keep=1.5 is out of range.*\(0, 1\]"):
        tr.apply(model, method, keep=1.5)
    with pytest.raises(ValueError, match="float fraction"):
        tr.apply(model, method, keep=tr.Keep(count=8))
    with pytest.raises(ValueError, match=r"keep=1.0 is invalid.*\(0, 1\)"):
        LearnedConfig(method=method, keep=1.0)
    with pytest.raises(ValueError, match="is a learned method.*train vit --reduce"):
        FinetuneConfig(method=method, keep=0.5)


def test_config_errors_and_unreachable_keep(tmp_path, monkeypatch):
    monkeypatch.setenv("TOKENREDUCE_CACHE", str(tmp_path))
    with pytest.raises(ValueError, match=r"not a learned vision method; accepted: \['diffrate', 'dynamicvit'\]"):
        LearnedConfig(method="tome")
    with pytest.raises(ValueError, match=r"steps=0 is invalid"):
        LearnedConfig(steps=0)
    with pytest.raises(ValueError, match=r"below the least token-block work.*accepted: keep in \["):
        train_learned(timm_vit(), _config("dynamicvit", keep=0.05, steps=1), _batches())
    assert LearnedConfig(method="diffrate").lr == 5e-2 and LearnedConfig().lr == 1e-3  # the papers' rates
    assert learned_dir(timm_vit(), _config("diffrate")).name == "keep0.5"


def test_learned_methods_are_listed_with_their_command():
    rows = {r["name"]: r for r in tr.methods("vit")}
    assert rows["dynamicvit"]["trained_by"] == "tokenreduce train vit --reduce dynamicvit --keep K"
    assert "FLOPs" in rows["diffrate"]["keep"] and rows["tome"]["trained_by"] == ""


@pytest.mark.slow
@torch.no_grad()
@pytest.mark.parametrize("method", METHODS)
def test_reference_vit_learned_at_half_keep(method):
    """On the reference ViT with its trained parts (cached; skipped if missing): at keep 0.5 the method removes
    tokens and stays within 10 points of the unreduced top-1 on 500 test images."""
    from tokenreduce.models.vit import checkpoint_dir, load_reference_vit, reference_eval_set

    if not (checkpoint_dir() / "model.pt").is_file():
        pytest.skip("reference ViT not trained (tokenreduce train vit)")
    model, info = load_reference_vit()
    if not (learned_dir(model, LearnedConfig(method=method, keep=0.5)) / "artifact.pt").is_file():
        pytest.skip(f"{method} not trained (tokenreduce train vit --reduce {method} --keep 0.5)")
    x, y = reference_eval_set("test", info["config"])
    x, y = x[:500], y[:500]
    base = (model(x).argmax(-1) == y).float().mean().item()
    with tr.apply(model, method, keep=0.5) as h:
        acc = (model(x).argmax(-1) == y).float().mean().item()
    assert h.stats.keep_achieved < 0.75 and acc > base - 0.10, (acc, base, h.stats.keep_achieved)


def test_bench_vit_runs_the_learned_methods(trained, tmp_path):
    from tokenreduce.bench.vit import run_vit_bench

    model, _ = trained
    g = torch.Generator().manual_seed(2)
    images, labels = torch.randn(8, 3, 32, 32, generator=g), torch.randint(0, 7, (8,), generator=g)
    rows = run_vit_bench(methods=list(METHODS), keeps=[0.5], out=str(tmp_path), n_images=8, repeats=1, warmup=0,
                         time_batch=4, threads=1, model=model, images=images, labels=labels, progress=False,
                         malloc="default")
    assert [r["method"] for r in rows] == ["none", *METHODS]
    assert all(r["final_tokens"] < 65 and r["speedup"] > 0 for r in rows[1:])
