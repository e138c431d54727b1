"""A small digit network trained here: its pooled features give FID, its logits class accuracy.

No Inception weights can be downloaded, so FID (Heusel et al. 2017: ||mu_r - mu_g||^2 +
Tr(S_r + S_g - 2 (S_r S_g)^(1/2))) is computed with torchmetrics' ``FrechetInceptionDistance`` on the 64-d
globally pooled last-conv features of this CNN (five 3x3 conv + BatchNorm + ReLU layers, two max-pools),
trained to classify the 32x32 digits of :mod:`.data`. The same network's prediction on a class-conditional
sample gives the class accuracy of the generator. Real statistics: held-out test-split images.
"""

from __future__ import annotations

import dataclasses
import json
import math
import time
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..._paths import cache_dir
from ..checkpoint import short_hash
from .data import NUM_CLASSES, data_version, digit_images

__all__ = ["DigitFeatures", "FeatureConfig", "FidScorer", "load_features", "sample_quality"]

FEATURES_VERSION = 1


@dataclass(frozen=True)
class FeatureConfig:
    steps: int = 1200
    batch_size: int = 128
    lr: float = 2e-3
    seed: int = 0
    test_samples: int = 2000

    def config_hash(self) -> str:
        return short_hash({**dataclasses.asdict(self), "_v": FEATURES_VERSION, "data": data_version()})


def _block(cin: int, cout: int) -> list[nn.Module]:
    return [nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True)]


class DigitFeatures(nn.Module):
    """``forward(x)`` -> (N, 64) features (what torchmetrics' FID calls); ``classify(x)`` -> (N, 10) logits."""

    num_features = 64

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(*_block(1, 32), *_block(32, 32), nn.MaxPool2d(2), *_block(32, 64),
                                  *_block(64, 64), nn.MaxPool2d(2), *_block(64, 64))
        self.head = nn.Linear(64, NUM_CLASSES)

    def forward(self, x: Tensor) -> Tensor:
        return self.body(x.float()).mean((2, 3))

    def classify(self, x: Tensor) -> Tensor:
        return self.head(self.forward(x))


def _train(config: FeatureConfig) -> tuple[DigitFeatures, dict[str, Any]]:
    torch.manual_seed(config.seed)
    net = DigitFeatures()
    opt = torch.optim.AdamW(net.parameters(), lr=config.lr, weight_decay=0.01)
    t0 = time.perf_counter()
    per_chunk = 8
    for step in range(config.steps):
        if step % per_chunk == 0:
            xs, ys = digit_images("train", config.batch_size * per_chunk, seed=config.seed * 7919 + step)
        i = (step % per_chunk) * config.batch_size
        x, y = xs[i: i + config.batch_size], ys[i: i + config.batch_size]
        for g in opt.param_groups:
            g["lr"] = config.lr * 0.5 * (1 + math.cos(math.pi * step / config.steps))
        loss = F.cross_entropy(net.classify(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    net.eval()
    xt, yt = digit_images("test", config.test_samples, seed=1)
    with torch.no_grad():
        acc = (net.classify(xt).argmax(-1) == yt).float().mean().item()
    return net, {"test_acc": acc, "n_test": config.test_samples, "train_time_s": time.perf_counter() - t0,
                 "config_hash": config.config_hash()}


def load_features(train_if_missing: bool = True, config: FeatureConfig | None = None,
                  force: bool = False) -> tuple[DigitFeatures, dict[str, Any]]:
    """The cached digit network (eval mode) and ``{"metrics", "path"}``; trained (~minutes) if missing."""
    config = config or FeatureConfig()
    out = cache_dir("diffusion", f"features-v{FEATURES_VERSION}-{config.config_hash()}")
    path = out / "model.pt"
    if force or not path.is_file():
        if not train_if_missing:
            raise FileNotFoundError(f"no digit feature network at {path}; run `tokenreduce train digit-features`")
        net, metrics = _train(config)
        torch.save(net.state_dict(), path)
        (out / "metrics.json").write_text(json.dumps(metrics, indent=2))
    net = DigitFeatures()
    net.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
    return net.eval(), {"metrics": json.loads((out / "metrics.json").read_text()), "path": path}


class _Float32Features(nn.Module):
    """The feature network as torchmetrics' extractor, kept in float32 while the FID statistics are float64
    (``set_dtype`` converts the metric's submodules; this one holds the network outside them)."""

    num_features = DigitFeatures.num_features

    def __init__(self, net: DigitFeatures) -> None:
        super().__init__()
        object.__setattr__(self, "net", net)

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x.float())


class FidScorer:
    """FID and class accuracy of generated batches against ``n_real`` held-out real images (real statistics
    computed once)."""

    def __init__(self, net: DigitFeatures, n_real: int = 1000, seed: int = 7) -> None:
        from torchmetrics.image.fid import FrechetInceptionDistance

        self.net = net
        self.fid = FrechetInceptionDistance(feature=_Float32Features(net), reset_real_features=False, normalize=True)
        self.fid.set_dtype(torch.float64)
        real, _ = digit_images("test", n_real, seed=seed)
        with torch.no_grad():
            self.fid.update(real, real=True)

    @torch.no_grad()
    def __call__(self, images: Tensor, labels: Tensor) -> dict[str, float]:
        self.fid.reset()
        self.fid.update(images.float(), real=False)
        acc = (self.net.classify(images).argmax(-1) == labels).float().mean().item()
        return {"fid": float(self.fid.compute()), "class_acc": acc}


def sample_quality(model: Any, n: int = 256, steps: int = 20, guidance: float = 2.0, seed: int = 0) -> dict[str, float]:
    """Unreduced FID and class accuracy of ``n`` class-balanced samples of a denoiser."""
    from .sampling import sample

    labels = torch.arange(n) % NUM_CLASSES
    images = sample(model, labels, steps=steps, guidance=guidance, seed=seed)
    net, _ = load_features()
    return {**FidScorer(net)(images, labels), "n": n, "steps": steps, "guidance": guidance}
