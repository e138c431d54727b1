"""Text-encoder methods (integration point ``encoder-layers``) on tiny random BERT-family encoders against
docs/design.md's invariants: identity, exact restore, padded batches = samples alone (ragged), determinism,
conservation of the size-weighted mean in the 1D pool, clear errors."""

from __future__ import annotations

import io
import pickle

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import tokenreduce as tr
from tests.tiny import bert as _bert
from tests.tiny import roberta as _roberta
from tokenreduce.adapters.encoder import mean_pool, padding_from_4d
from tokenreduce.core.state import TokenState
from tokenreduce.core.strategies import pool1d

ENCODER_METHODS = [r["name"] for r in tr.methods("encoder-layers")]
TEXTS = ["a short one", "this is a much longer sentence, with many more tokens in it than the first one has",
         "medium length sentence here"]


MODELS = {
    "bert-sdpa": lambda t: _bert(t, "sdpa"),
    "bert-eager": lambda t: _bert(t, "eager"),
    "roberta-sdpa": _roberta,
}


def _hidden(model, enc):
    out = model(**enc)
    return out.last_hidden_state if hasattr(out, "last_hidden_state") else out.logits


@pytest.mark.parametrize("family", list(MODELS))
@pytest.mark.parametrize("method", ENCODER_METHODS)
def test_invariants(family, method, tok):
    model = MODELS[family](tok)
    enc = tok(TEXTS, padding=True, return_tensors="pt")
    with torch.no_grad():
        ref = model(**enc).last_hidden_state
        ref_pool = mean_pool(None, ref, enc["attention_mask"])
        sd = {k: v.clone() for k, v in model.state_dict().items()}

        # 1. identity at keep=1.0, and mean_pool = the usual masked mean
        with tr.apply(model, method, keep=1.0) as h:
            out = model(**enc).last_hidden_state
            torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(mean_pool(h, out), ref_pool, atol=1e-5, rtol=1e-5)

        # 2. reduction: fewer tokens, ragged, batch = each sample alone, deterministic
        h = tr.apply(model, method, keep=0.75)  # of the token-block work (4 layers: 0.5 is near the floor)
        out = model(**enc).last_hidden_state
        pooled = mean_pool(h, out)
        final = h.stats.final_tokens
        assert out.shape[1] < ref.shape[1]
        assert len(set(final)) > 1, "samples of different lengths keep different numbers of tokens"
        for i, t in enumerate(TEXTS):
            e1 = tok([t], return_tensors="pt")
            o1 = model(**e1).last_hidden_state
            torch.testing.assert_close(mean_pool(h, o1)[0], pooled[i], atol=1e-5, rtol=1e-4)
            torch.testing.assert_close(o1[0, 0], out[i, 0], atol=1e-5, rtol=1e-4)  # [CLS] kept, first
            assert o1.shape[1] == final[i]
        again = model(**enc).last_hidden_state
        torch.testing.assert_close(again, out)
        assert torch.isfinite(pooled).all()
        h.remove()

        # 3. exact restore
        torch.testing.assert_close(model(**enc).last_hidden_state, ref)
        assert all(torch.equal(sd[k], v) for k, v in model.state_dict().items())
        assert "forward" not in model.encoder.layer[0].__dict__
        pickle.dumps(model)
        torch.save(model.state_dict(), io.BytesIO())


def test_task_head_and_stats(tok):
    model = _bert(tok, cls="BertForSequenceClassification")
    enc = tok(TEXTS, padding=True, return_tensors="pt")
    with torch.no_grad(), tr.apply(model, "tome", keep=0.75) as h:
        logits = model(**enc).logits
        assert logits.shape == (3, 3) and torch.isfinite(logits).all()
        st_ = h.stats
        assert st_.input_tokens == enc["input_ids"].shape[1]
        assert len(st_.tokens_attn) == 4 and st_.tokens_attn[0] > st_.tokens_attn[-1]


def test_random_seed_and_keep_schedule(tok):
    model = _bert(tok)
    enc = tok(TEXTS, padding=True, return_tensors="pt")
    with torch.no_grad():
        with tr.apply(model, "random", keep=0.5, seed=1) as h:
            a = mean_pool(h, model(**enc).last_hidden_state)
        with tr.apply(model, "random", keep=0.5, seed=2) as h:
            b = mean_pool(h, model(**enc).last_hidden_state)
        assert not torch.allclose(a, b)
        with tr.apply(model, "pool", keep=[0.8, 0.6, 0.5], layers=[0, 1, 2]) as h:
            model(**enc)
            t = h.stats.tokens_attn  # real tokens entering each block's attention
            assert t[0] > t[1] > t[2] > t[3]


def test_errors(tok):
    model = _bert(tok)
    enc = tok(TEXTS, padding=True, return_tensors="pt")
    for bad in (0.0, 1.5):
        with pytest.raises(ValueError, match="out of range"):
            tr.apply(model, "tome", keep=bad)
    with pytest.raises(TypeError, match="ambiguous"):
        tr.apply(model, "tome", keep=-1)
    with pytest.raises(ValueError, match="did you mean"):
        tr.apply(model, "tomee", keep=0.5)
    with pytest.raises(ValueError, match="not available at integration point 'encoder-layers'"):
        tr.apply(model, "snapkv", keep=0.5)
    with pytest.raises(ValueError, match="attention_mask"):
        mean_pool(None, torch.zeros(2, 3, 4))
    with torch.no_grad(), tr.apply(model, "tome", keep=0.75) as h:
        with pytest.raises(RuntimeError, match="not run a forward"):
            mean_pool(h, torch.zeros(3, 5, 32))
        out = model(**enc).last_hidden_state
        with pytest.raises(ValueError, match="do not match"):
            mean_pool(h, out[:, :-1])
    from transformers import BertConfig, BertModel

    dec = BertModel(BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                               intermediate_size=64, is_decoder=True))
    with pytest.raises(TypeError, match="decoder"):
        tr.apply(dec, "tome", keep=0.5)


def test_padding_from_4d_mask():
    x = torch.zeros(2, 4, 8)
    real = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0]], dtype=torch.bool)
    b4 = real[:, None, None, :].expand(2, 1, 4, 4)
    assert torch.equal(padding_from_4d(b4, x), real)
    add = torch.zeros(2, 1, 4, 4).masked_fill(~b4, torch.finfo(torch.float32).min)
    assert torch.equal(padding_from_4d(add, x), real)
    assert torch.equal(padding_from_4d(real.long(), x), real)
    assert padding_from_4d(None, x) is None
    with pytest.raises(ValueError, match="tokens"):
        padding_from_4d(real[:, :3], x)


# ---------------------------------------------------------------------------- pool1d
@settings(max_examples=40, deadline=None)
@given(lengths=st.lists(st.integers(1, 12), min_size=1, max_size=4), frac=st.floats(0.05, 1.0),
       protected=st.integers(0, 1))
def test_pool1d_conserves_size_and_mean(lengths, frac, protected):
    B, N, D = len(lengths), max(lengths) + protected, 3
    g = torch.Generator().manual_seed(sum(lengths))
    x = torch.randn(B, N, D, generator=g, dtype=torch.float64)
    mask = torch.arange(N)[None] < (torch.tensor(lengths) + protected)[:, None]
    s = TokenState.from_tensor(x, mask=mask, protected=protected)
    counts = torch.tensor([max(1, round(frac * n)) for n in lengths])
    out = pool1d(s, counts)
    out.validate()
    assert torch.equal(out.reducible_counts(), counts)
    torch.testing.assert_close(out.size.sum(1), s.size.sum(1))
    mean_in = (x * s.size[..., None]).sum(1) / s.size.sum(1, keepdim=True)
    mean_out = (out.x * out.size[..., None]).sum(1) / out.size.sum(1, keepdim=True)
    torch.testing.assert_close(mean_out, mean_in)
    if protected:
        torch.testing.assert_close(out.x[:, 0], x[:, 0])
    # bins are consecutive and differ in length by at most one
    for b, n in enumerate(lengths):
        sizes = out.size[b, protected: protected + int(counts[b])]
        assert sizes.max() - sizes.min() <= 1 and sizes.sum() == n
        src = out.source[b, protected: protected + int(counts[b])]
        assert torch.all(src[1:] > src[:-1])


@pytest.mark.parametrize("method", ENCODER_METHODS)
def test_all_padding_row_and_what_users_pool_with(method, tok):
    """A batch row that is all padding (BERT `pool` used to crash on it), and the output being shorter than the
    input's attention mask: h.attention_mask is the mask of the output tokens, tr.mean_pool the size-aware mean."""
    model = _bert(tok)
    enc = tok(TEXTS, padding=True, return_tensors="pt")
    enc["attention_mask"][1] = 0
    with torch.no_grad(), tr.apply(model, method, keep=0.75) as h:
        out = model(**enc).last_hidden_state
        mask = h.attention_mask
        assert mask.shape == out.shape[:2] and mask[1].sum() == 0 and mask.sum(1).tolist() == h.stats.final_tokens
        usual = (out * mask[..., None]).sum(1) / mask.sum(1, keepdim=True).clamp(min=1)  # the usual masked mean
        pooled = tr.mean_pool(h, out)
        assert torch.isfinite(usual).all() and pooled.shape == usual.shape
        assert abs(h.stats.keep_achieved - 0.75) < 0.1  # the empty row neither counts nor asks for anything
