"""The ViT benchmark runner end to end on a tiny random timm ViT (structure, not speed)."""

from __future__ import annotations

import json

import pytest
import torch

from tests.tiny import timm_vit
from tokenreduce.bench.vit import run_vit_bench, zero_overhead_forward


@torch.no_grad()
def test_zero_overhead_forward_matches_model_when_unreduced():
    m = timm_vit(classes=5)
    x = torch.randn(2, 3, 32, 32)
    f = zero_overhead_forward(m, [65] * 4, [65] * 4)
    torch.testing.assert_close(f(x), m(x))
    assert f(x).shape == (2, 5)
    assert zero_overhead_forward(m, [65, 40, 30, 20], [40, 30, 20, 10])(x).shape == (2, 5)


def test_run_vit_bench_writes_results(tmp_path):
    m = timm_vit(classes=5)
    g = torch.Generator().manual_seed(0)
    images, labels = torch.randn(24, 3, 32, 32, generator=g), torch.randint(0, 5, (24,), generator=g)
    rows = run_vit_bench(methods=["tome", "random"], keeps=[1.0, 0.5], out=str(tmp_path), n_images=24,
                         repeats=2, warmup=1, time_batch=8, threads=1, model=m, images=images, labels=labels,
                         progress=False, malloc="default")
    assert [r["method"] for r in rows] == ["none", "tome", "tome", "random", "random"]
    base = rows[0]
    for r in rows[1:]:
        assert 0 <= r["accuracy"] <= 1 and r["speedup"] > 0 and r["limit_speedup"] > 0
        assert r["efficiency"] == r["speedup"] / r["limit_speedup"]
        if r["keep"] == 1.0:  # identity: same predictions, same FLOPs
            assert r["agreement"] == 1.0 and r["accuracy"] == base["accuracy"]
            assert abs(r["flops_ratio"] - 1.0) < 1e-9
        else:
            assert r["flops_ratio"] > 1.0 and r["mean_tokens"] < base["mean_tokens"]
    lines = (tmp_path / "results.jsonl").read_text().splitlines()
    meta = json.loads(lines[0])
    assert meta["type"] == "meta" and len(lines) == 1 + len(rows) and meta["allocator"] == "default"
    assert (tmp_path / "pareto.png").stat().st_size > 1000
    html = (tmp_path / "report.html").read_text()
    assert "data:image/png;base64" in html and "tome" in html


def test_run_vit_bench_cpu_clock_needs_one_thread(tmp_path):
    m = timm_vit(classes=5)
    images, labels = torch.randn(8, 3, 32, 32), torch.randint(0, 5, (8,))
    with pytest.raises(ValueError, match="needs threads=1"):
        run_vit_bench(methods=["random"], keeps=[0.5], out=str(tmp_path), n_images=8, repeats=1, warmup=0,
                      time_batch=8, threads=2, model=m, images=images, labels=labels, progress=False, clock="cpu")
    rows = run_vit_bench(methods=["random"], keeps=[0.5], out=str(tmp_path), n_images=8, repeats=2, warmup=0,
                         time_batch=8, threads=1, model=m, images=images, labels=labels, progress=False,
                         clock="cpu")
    assert rows[1]["speedup"] > 0 and rows[1]["limit_speedup"] > 0


def test_run_vit_bench_rejects_unknown_malloc_mode(tmp_path):
    m = timm_vit(classes=5)
    images, labels = torch.randn(8, 3, 32, 32), torch.randint(0, 5, (8,))
    with pytest.raises(ValueError, match="malloc: 'jemalloc' is not accepted"):
        run_vit_bench(methods=["random"], keeps=[0.5], out=str(tmp_path), n_images=8, repeats=1, warmup=0,
                      time_batch=8, threads=1, model=m, images=images, labels=labels, progress=False,
                      malloc="jemalloc")


def test_run_vit_bench_evaluates_a_finetuned_checkpoint(tmp_path, monkeypatch):
    """``reference="finetune:<method>:<keep>"`` benchmarks the cached fine-tuned model (here random weights
    saved where fine-tuning would), its cells named by its checkpoint; a missing one names the command."""
    from tokenreduce.models.vit import build_reference_vit, finetune_dir, parse_finetune_spec

    monkeypatch.setenv("TOKENREDUCE_CACHE", str(tmp_path / "cache"))
    kw = {"methods": ["tome"], "keeps": [0.6], "out": str(tmp_path / "r"), "n_images": 8, "threads": 1, "progress": False,
              "parts": "accuracy", "reference": "finetune:tome:0.6"}
    with pytest.raises(FileNotFoundError, match="tokenreduce train vit --reduce tome --keep 0.6"):
        run_vit_bench(**kw)
    with pytest.raises(ValueError, match="finetune:<method>:<keep>"):
        run_vit_bench(**{**kw, "reference": "tome@0.6"})
    out = finetune_dir(parse_finetune_spec("finetune:tome:0.6"))
    out.mkdir(parents=True)
    torch.manual_seed(0)
    torch.save(build_reference_vit(depth=6).state_dict(), out / "model.pt")
    rows = run_vit_bench(**kw)
    assert [r["method"] for r in rows] == ["none", "tome"] and 0 <= rows[1]["accuracy"] <= 1
    meta = json.loads((tmp_path / "r" / "results.jsonl").read_text().splitlines()[0])
    assert meta["model_path"] == str(out / "model.pt") and meta["config"]["model"] == "finetune:tome:0.6"
