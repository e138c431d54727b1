"""The diffusion models trained here: data, configs, sampling (fast, tiny configs) and, with ``-m slow``, the
trained DiT/UNet from ~/.cache/tokenreduce (``tokenreduce train dit|unet|digit-features``)."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("diffusers")

import tokenreduce as tr
from tokenreduce.bench.timing import fixed_threads
from tokenreduce.models.diffusion import (
    ClassConditional,
    DenoiserConfig,
    default_config,
    digit_images,
    sample,
)


@pytest.fixture(scope="module", autouse=True)
def _one_thread():  # tiny tensors: a second thread on a shared machine only spin-waits
    with fixed_threads(1):
        yield


def test_digit_images_are_real_digits_in_range():
    x, y = digit_images("val", 20, seed=3)
    assert x.shape == (20, 1, 32, 32) and x.min() >= -1 and x.max() <= 1
    assert set(y.tolist()) <= set(range(10))
    assert torch.equal(digit_images("val", 20, seed=3)[0], x)


def test_config_hash_tracks_what_changes_weights():
    c = default_config("dit")
    assert c.config_hash() == default_config("dit", num_threads=2).config_hash()
    assert c.config_hash() != default_config("dit", steps=10).config_hash()
    with pytest.raises(ValueError, match="kind='vae' is invalid"):
        DenoiserConfig(kind="vae")
    with pytest.raises(ValueError, match="heads=5 must divide width=96"):
        DenoiserConfig(kind="dit", heads=5)


@pytest.mark.parametrize("kind", ["dit", "unet"])
def test_sample_i_is_the_same_alone_or_in_a_batch(kind):
    torch.manual_seed(0)
    model = ClassConditional(DenoiserConfig(kind=kind, depth=1, width=16, heads=2, channels=(8, 16),
                                            context_dim=8, context_tokens=2)).eval()
    labels = torch.tensor([3, 7, 1])
    both = sample(model, labels, steps=2, seed=5)
    alone = sample(model, labels[1:2], steps=2, seed=5, start=1)
    torch.testing.assert_close(both[1:2], alone, atol=1e-5, rtol=1e-5)
    assert both.shape == (3, 1, 32, 32) and both.abs().max() <= 1


# ---------------------------------------------------------------------------- trained models (-m slow)
@pytest.fixture(scope="module")
def trained():
    from tokenreduce.models.diffusion import load_denoiser, load_features

    try:
        models = {k: load_denoiser(k)[0] for k in ("dit", "unet")}
        net = load_features(train_if_missing=False)[0]
    except FileNotFoundError as e:
        pytest.skip(str(e))
    return models, net


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["dit", "unet"])
def test_trained_model_draws_the_asked_digits(trained, kind):
    """Conditioning works: well above chance (0.1). Measured on 100 samples by `bench diffusion`: the UNet's
    class accuracy is about 0.53 (it often draws another digit), the DiT's higher (docs/diffusion.md)."""
    models, net = trained
    labels = torch.arange(20) % 10
    images = sample(models[kind], labels, steps=20, guidance=2.0, seed=0)
    with torch.no_grad():
        acc = (net.classify(images).argmax(-1) == labels).float().mean().item()
    assert acc >= (0.6 if kind == "dit" else 0.4), f"{kind}: class accuracy {acc:.2f} of its samples"


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["dit", "unet"])
def test_trained_model_keep_one_exact_and_tomesd_close(trained, kind):
    from torchmetrics.functional.image import peak_signal_noise_ratio

    model = trained[0][kind]
    labels = torch.arange(10)
    base = sample(model, labels, steps=10, seed=1)
    with tr.apply(model.net, "tomesd", keep=1.0):
        assert torch.equal(sample(model, labels, steps=10, seed=1), base)
    with tr.apply(model.net, "tomesd", keep=0.5) as h:
        reduced = sample(model, labels, steps=10, seed=1)
        assert 0.5 <= h.stats.keep_run < 1.0
    assert peak_signal_noise_ratio(reduced, base, data_range=2.0) > 15.0


@pytest.mark.slow
def test_trained_unet_matches_the_tomesd_package(trained):
    tomesd = pytest.importorskip("tomesd")
    net = trained[0]["unet"].net
    g = torch.Generator().manual_seed(0)
    x, t, ctx = torch.randn(4, 1, 32, 32, generator=g), torch.full((4,), 400), torch.randn(4, 4, 32, generator=g)
    kw = {"encoder_hidden_states": ctx}
    if net.config.num_class_embeds:
        kw["class_labels"] = torch.arange(4)
    with torch.no_grad():
        tomesd.apply_patch(net, ratio=0.5, use_rand=False)
        theirs = net(x, t, **kw).sample
        tomesd.remove_patch(net)
        with tr.apply(net, "tomesd", keep=0.5, use_rand=False):
            ours = net(x, t, **kw).sample
    torch.testing.assert_close(ours, theirs, atol=1e-4, rtol=1e-4)
