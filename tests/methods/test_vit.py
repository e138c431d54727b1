"""Every registered vision method x every supported ViT family x eager/SDPA against docs/design.md's invariants,
on tiny random-weight configs of the real timm/transformers classes."""

from __future__ import annotations

import io
import pickle

import pytest
import torch
from torch import nn

import tokenreduce as tr
from tests.tiny import clip_vision as _clip
from tests.tiny import hf_vit as _hf_vit
from tests.tiny import hf_vit_model as _hf_vit_model
from tests.tiny import timm_vit as _timm

# the learned methods (dynamicvit, diffrate) need parts trained for the model: tests/models/test_learned.py
VISION_METHODS = [r["name"] for r in tr.methods("vit-layers") if not r["trained_by"]]
IMG = 32


MODELS = {
    "timm": _timm,
    "timm-avgpool": lambda a: _timm(a, "avg"),
    "hf-vit-cls": _hf_vit,
    "hf-vit": _hf_vit_model,
    "clip": _clip,
}


def _out(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    y = model(x) if not hasattr(model, "config") else model(pixel_values=x)
    if isinstance(y, torch.Tensor):
        return y
    for k in ("logits", "pooler_output"):
        if getattr(y, k, None) is not None:
            return getattr(y, k)
    raise AssertionError("no output")


@pytest.fixture(scope="module")
def images() -> torch.Tensor:
    return torch.randn(3, 3, IMG, IMG, generator=torch.Generator().manual_seed(1))


def _module_dicts(model: nn.Module) -> dict[str, set[str]]:
    return {n: set(m.__dict__) for n, m in model.named_modules()}


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize("family", list(MODELS))
@pytest.mark.parametrize("method", VISION_METHODS)
@torch.no_grad()
def test_identity_reduction_and_restore(family, attn, method, images):
    model = MODELS[family](attn)
    before_dicts = _module_dicts(model)
    buf = io.BytesIO()
    torch.save(model.state_dict(), buf)
    ref = _out(model, images)

    # invariant 1: keep=1 is the unpatched model
    with tr.apply(model, method, keep=1.0) as h:
        torch.testing.assert_close(_out(model, images), ref, rtol=0, atol=0)
    assert h.stats.final_tokens == [h.stats.input_tokens] * 3

    # a real reduction reduces, and is deterministic (invariant 4)
    with tr.apply(model, method, keep=0.5) as h:
        y1 = _out(model, images)
        y2 = _out(model, images)
        st = h.stats
    torch.testing.assert_close(y1, y2, rtol=0, atol=0)
    assert torch.isfinite(y1).all()
    assert len(st.tokens_attn) == len(st.tokens_mlp) == 4
    assert max(st.final_tokens) < st.input_tokens
    assert st.tokens_mlp[-1] < st.tokens_attn[0]

    # restored exactly: outputs, state dict, no leftover attributes, picklable
    torch.testing.assert_close(_out(model, images), ref, rtol=0, atol=0)
    assert _module_dicts(model) == before_dicts
    buf2 = io.BytesIO()
    torch.save(model.state_dict(), buf2)
    assert buf.getvalue() == buf2.getvalue()
    pickle.dumps(model)


@pytest.mark.parametrize("family", ["timm", "hf-vit-cls", "clip"])
@pytest.mark.parametrize("method", VISION_METHODS)
@torch.no_grad()
def test_batch_consistency(family, method, images):
    """Invariant 2: each sample of a batch gives what it gives alone."""
    model = MODELS[family]("sdpa")
    with tr.apply(model, method, keep=0.5):
        batch = _out(model, images)
        for i in range(images.shape[0]):
            torch.testing.assert_close(batch[i: i + 1], _out(model, images[i: i + 1]), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("family", ["timm", "hf-vit-cls"])
@pytest.mark.parametrize("method", ["evit", "random", "token-transforming"])
@torch.no_grad()
def test_ragged_threshold_budget_is_batch_consistent(family, method, images):
    """Threshold budgets keep a different count per sample: padding + masks must carry it."""
    model = MODELS[family]("sdpa")
    budget = tr.Keep(threshold=1.0 / 65 if method != "random" else 0.5)
    with tr.apply(model, method, keep=budget) as h:
        batch = _out(model, images)
        counts = h.stats.final_tokens
        for i in range(images.shape[0]):
            torch.testing.assert_close(batch[i: i + 1], _out(model, images[i: i + 1]), rtol=1e-4, atol=1e-5)
    if method != "random":
        assert len(set(counts)) > 1, f"expected ragged counts, got {counts}"


@torch.no_grad()
def test_tome_r_and_keep_targets(images):
    model = _timm("sdpa")
    with tr.apply(model, "tome", r=4) as h:
        model(images)
    assert h.stats.tokens_attn == [65, 61, 57, 53] and h.stats.final_tokens == [49] * 3
    with tr.apply(model, "tome", keep=tr.Keep(count=16)) as h:  # a count: the final reducible tokens
        model(images)
    assert h.stats.final_tokens == [1 + 16] * 3  # CLS + 16 of 64 patches
    with tr.apply(model, "tome", keep=0.75) as h:  # a fraction: of the token-block work
        model(images)
    assert abs(h.stats.keep_achieved - 0.75) < 0.02 and h.stats.keep == 0.75
    with tr.apply(model, "tome", r=0) as h:
        torch.testing.assert_close(model(images), _timm("sdpa")(images), rtol=0, atol=0)
    with pytest.raises(ValueError, match="too small for ToMe"), tr.apply(model, "tome", keep=tr.Keep(count=1)):
        model(images)
    with pytest.raises(ValueError, match=r"below the least token-block work.*accepted: keep in \[0\.5"), \
            tr.apply(model, "tome", keep=0.25):
        model(images)


@torch.no_grad()
@pytest.mark.parametrize("keep", [0.9, 0.75, 0.6])
def test_keep_means_the_same_work_for_every_method(keep, images):
    """One meaning of keep on ViT layers: the fraction of the token-block work kept. Every method lands
    within a few points of it (and so of each other), whatever its own schedule; it reports what it ran."""
    model = _timm("sdpa")
    for method in VISION_METHODS:
        with tr.apply(model, method, keep=keep) as h:
            model(images)
        st = h.stats
        work = sum(a + b for a, b in zip(st.tokens_attn, st.tokens_mlp)) / (2 * len(st.tokens_attn) * st.input_tokens)
        assert abs(st.keep_achieved - work) < 1e-9, method  # what is reported is what ran
        assert abs(st.keep_achieved - keep) < 0.04, (method, keep, st.keep_achieved)


def test_keep_is_required_and_never_a_plain_int(images):
    model = _timm("sdpa")
    with pytest.raises(TypeError, match="keep is required: fraction of the token-block work"):
        tr.apply(model, "evit")
    for bad in (1, 2):  # keep=1 used to leave CLS plus one token
        with pytest.raises(TypeError, match=r"ambiguous.*tr.Keep\(count="):
            tr.apply(model, "tome", keep=bad)
    assert not hasattr(model.blocks[0], "__dict__") or "forward" not in model.blocks[0].__dict__  # nothing patched


def test_cls_methods_refuse_a_model_without_cls(images):
    """EViT and Token Transforming rank by the [CLS] token's attention; on a ViT without one they used to rank
    by the first patch, silently."""
    from timm.models.vision_transformer import VisionTransformer

    m = VisionTransformer(img_size=IMG, patch_size=4, embed_dim=32, depth=4, num_heads=2, num_classes=7,
                          class_token=False, global_pool="avg").eval()
    for method in ("evit", "token-transforming"):
        with pytest.raises(TypeError, match=r"\[CLS\].*has none.*tome, cluster, pool, random"):
            tr.apply(m, method, keep=0.75)
        assert "forward" not in m.blocks[0].__dict__
    with tr.apply(m, "tome", keep=0.75), torch.no_grad():
        assert m(images).shape == (3, 7)


def test_removed_handle_refuses_to_be_entered(images):
    model = _timm("sdpa")
    h = tr.apply(model, "tome", keep=0.75)
    h.remove()
    with pytest.raises(RuntimeError, match="removed.*unreduced"), h:
        pass


@torch.no_grad()
def test_bf16_runs(images):
    model = _timm("sdpa").to(torch.bfloat16)
    for method in VISION_METHODS:
        with tr.apply(model, method, keep=0.5):
            y = model(images.to(torch.bfloat16))
        assert y.dtype == torch.bfloat16 and torch.isfinite(y.float()).all()


@torch.no_grad()
def test_unmerge_maps_back_to_grid(images):
    model = _hf_vit_model("sdpa")
    with tr.apply(model, "tome", keep=tr.Keep(count=32)) as h:
        out = model(pixel_values=images).last_hidden_state
        full = h.unmerge(out)
    assert out.shape[1] == 33 and full.shape == (3, 65, 32)


@torch.no_grad()
def test_errors_are_clear(images):
    model = _timm("sdpa")
    with pytest.raises(ValueError, match=r"keep=0.0 is out of range.*\(0, 1\]"):
        tr.apply(model, "tome", keep=0.0)
    with pytest.raises(ValueError, match=r"keep=1.5 is out of range"):
        tr.apply(model, "evit", keep=1.5)
    with pytest.raises(ValueError, match="did you mean 'tome'"):
        tr.apply(model, "tomee", keep=0.5)
    with pytest.raises(TypeError, match="unsupported model Linear.*timm VisionTransformer"):
        tr.apply(nn.Linear(3, 3), "tome", keep=0.5)
    with pytest.raises(TypeError, match="accepted keywords"):
        tr.apply(model, "evit", keep=0.5, rr=3)
    with pytest.raises(ValueError, match="layers \\[9\\] out of range"):
        tr.apply(model, "evit", keep=0.5, layers=[1, 9])
    with tr.apply(model, "evit", keep=tr.Keep(count=1000)), pytest.raises(ValueError, match="larger than the sequence"):
        model(images)
    with tr.apply(model, "tome", keep=0.5):
        with pytest.raises(ValueError, match="NaN"):
            model(images.masked_fill(images > 2, float("nan")))
        with pytest.raises(RuntimeError, match="already has tokenreduce method 'tome'"):
            tr.apply(model, "evit", keep=0.5)
    torch.testing.assert_close(model(images), _timm("sdpa")(images), rtol=0, atol=0)


def test_methods_table_lists_papers():
    rows = tr.methods("vit-layers")
    names = {r["name"] for r in rows}
    assert {"tome", "evit", "token-transforming", "cluster", "pool", "random"} <= names
    assert all(r["paper"] and r["integration"] == "vit-layers" for r in rows)


@pytest.mark.slow
@torch.no_grad()
def test_reference_vit_accuracy_under_reduction():
    """On the trained reference ViT (cached; skipped if missing): keep=1 reproduces the recorded test
    accuracy on the same images, and every method at keep=0.75 stays within 10 points of it."""
    from tokenreduce.models.vit import checkpoint_dir, load_reference_vit, reference_eval_set

    if not (checkpoint_dir() / "model.pt").is_file():
        pytest.skip("reference ViT not trained (tokenreduce train vit)")
    model, info = load_reference_vit()
    images, labels = reference_eval_set("test", info["config"])
    images, labels = images[:500], labels[:500]
    base = (model(images).argmax(-1) == labels).float().mean().item()
    assert base > 0.5, f"reference ViT accuracy {base:.3f} is not clearly above chance (0.1)"
    for method in VISION_METHODS:
        with tr.apply(model, method, keep=1.0):
            assert (model(images).argmax(-1) == labels).float().mean().item() == base
        with tr.apply(model, method, keep=0.75) as h:
            acc = (model(images).argmax(-1) == labels).float().mean().item()
        assert acc > base - 0.10, f"{method} at keep=0.75: {acc:.3f} vs unreduced {base:.3f}"
        assert h.stats.mean_keep < 1.0
