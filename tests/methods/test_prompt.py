"""Prompt compression (`tr.compress`) on tiny random models: every method honours the ratio in the LM's
tokens, is deterministic, is the identity at keep=1.0, handles long and CJK text, and rejects bad input."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import Tensor

import tokenreduce as tr
from tests.tiny import llama_for as _llama
from tokenreduce.adapters.prompt.scorer import CausalScorer
from tokenreduce.compress import RATIO_TOLERANCE
from tokenreduce.data.text import english_text

PROMPT_METHODS = [r["name"] for r in tr.methods("prompt")]
QUESTION = "What did the police say about the fire?"
CJK = ("東京は日本の首都です。人口は約千四百万人で、世界で最も大きな都市の一つです。"
       "北京是中国的首都，有三千多年的历史。今天天气很好，我们去公园散步吧！"
       "서울은 한국의 수도입니다. 한강이 도시를 가로질러 흐릅니다.")


@pytest.fixture(scope="module")
def lm(tok):
    return _llama(tok)


@pytest.fixture(scope="module")
def encoder(tok):
    from transformers import BertConfig, BertModel

    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=len(tok), hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                     intermediate_size=64)
    return BertModel(cfg).eval(), tok


@pytest.fixture(scope="module")
def text():
    return english_text(1200, start=3)


def _kw(method, encoder):
    return {"encoder": encoder} if method == "extractive" else {}


def _run(text, method, keep, lm, tok, encoder, **kw):
    return tr.compress(text, method=method, keep=keep, lm=lm, tokenizer=tok, question=QUESTION,
                       **_kw(method, encoder), **kw)


def _check(res, text, tok):
    n = len(tok(text, add_special_tokens=False).input_ids)
    assert res.n_tokens == n
    assert res.n_kept == len(tok(res.text, add_special_tokens=False).input_ids)
    assert math.isclose(res.kept_ratio, res.n_kept / n)
    assert abs(res.n_kept - res.target_tokens) <= max(1, RATIO_TOLERANCE * res.target_tokens), res
    # the output is made of the reported spans of the input, nothing else
    assert "".join(text[s:e] for s, e in res.spans) == res.text
    assert all(0 <= s < e <= len(text) for s, e in res.spans)


@pytest.mark.parametrize("method", PROMPT_METHODS)
@pytest.mark.parametrize("keep", [0.25, 0.6])
def test_ratio_honoured_and_deterministic(method, keep, text, lm, tok, encoder):
    a = _run(text, method, keep, lm, tok, encoder)
    b = _run(text, method, keep, lm, tok, encoder)
    _check(a, text, tok)
    assert abs(a.kept_ratio - keep) <= RATIO_TOLERANCE * keep
    assert a.text == b.text and a.spans == b.spans
    assert a.method == method and a.keep == keep and a.question == QUESTION
    assert set(a.timings) >= {"tokenize", "score", "select", "total"}


@pytest.mark.parametrize("method", PROMPT_METHODS)
def test_identity_at_keep_one(method, text, lm, tok, encoder):
    for keep in (1.0, tr.Keep(count=len(tok(text, add_special_tokens=False).input_ids))):
        res = _run(text, method, keep, lm, tok, encoder)
        assert res.text == text
        assert res.kept_ratio == 1.0 and res.spans == [(0, len(text))]


@pytest.mark.parametrize("method", PROMPT_METHODS)
def test_keep_count_is_a_token_count(method, text, lm, tok, encoder):
    res = _run(text, method, tr.Keep(count=40), lm, tok, encoder)
    assert res.target_tokens == 40
    _check(res, text, tok)


@pytest.mark.parametrize("method", PROMPT_METHODS)
def test_cjk_text_without_whitespace(method, lm, tok, encoder):
    kw = {"reorder": False} if method == "longllmlingua" else {}
    res = _run(CJK, method, 0.5, lm, tok, encoder, **kw)
    _check(res, CJK, tok)
    # no character is invented or split: the output is a subsequence of the input's characters
    it = iter(CJK)
    assert all(c in it for c in res.text)


@pytest.mark.parametrize("method", [m for m in PROMPT_METHODS if m not in ("truncate", "random", "extractive")])
def test_text_longer_than_the_lm_context_is_chunked(method, tok, encoder):
    small = _llama(tok, max_pos=48)
    long = english_text(3000, start=11)
    assert len(tok(long, add_special_tokens=False).input_ids) > 8 * 48
    res = _run(long, method, 0.3, small, tok, encoder)
    _check(res, long, tok)


def test_question_aware_methods_use_the_question(text, lm, tok, encoder):
    for method in ("longllmlingua", "extractive"):
        a = tr.compress(text, method=method, keep=0.3, lm=lm, tokenizer=tok, question=QUESTION, **_kw(method, encoder))
        b = tr.compress(text, method=method, keep=0.3, lm=lm, tokenizer=tok, question="How many homes burned?",
                        **_kw(method, encoder))
        assert a.text != b.text, method


def test_longllmlingua_reorders_documents(text, lm, tok):
    res = tr.compress(text, method="longllmlingua", keep=0.4, lm=lm, tokenizer=tok, question=QUESTION,
                      chunk_tokens=20)
    plain = tr.compress(text, method="longllmlingua", keep=0.4, lm=lm, tokenizer=tok, question=QUESTION,
                        chunk_tokens=20, reorder=False)
    assert sorted(res.spans) == sorted(plain.spans) or res.n_kept == plain.n_kept
    assert [s for s, _ in plain.spans] == sorted(s for s, _ in plain.spans)


def test_random_seed(text, tok):
    a = tr.compress(text, method="random", keep=0.5, tokenizer=tok, seed=1)
    b = tr.compress(text, method="random", keep=0.5, tokenizer=tok, seed=2)
    assert a.text != b.text


def test_methods_without_lm_need_only_the_tokenizer(text, tok, encoder):
    for method in ("truncate", "random"):
        _check(tr.compress(text, method=method, keep=0.5, tokenizer=tok), text, tok)
    _check(tr.compress(text, method="extractive", keep=0.5, tokenizer=tok, question=QUESTION, encoder=encoder),
           text, tok)


# ---------------------------------------------------------------------------- property test over texts/keeps
_WORDS = english_text(4000, start=40).split(" ")


@st.composite
def _texts(draw):
    i = draw(st.integers(0, len(_WORDS) - 80))
    k = draw(st.integers(5, 70))
    seps = draw(st.lists(st.sampled_from([" ", " ", " ", "  ", "\n", "\n\n", "\t", ""]), min_size=k, max_size=k))
    words = _WORDS[i:i + k]
    if draw(st.booleans()):
        words = words[: k // 2] + [CJK[j: j + 7] for j in range(0, 42, 7)] + words[k // 2:]
        seps = seps + [""] * 6
    return "".join(w + s for w, s in zip(words, seps)).strip() or "x"


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(t=_texts(), keep=st.floats(0.05, 1.0), method=st.sampled_from(["selective-context", "random", "truncate",
                                                                       "llmlingua", "longllmlingua"]))
def test_property_ratio_within_tolerance(t, keep, method, lm, tok):
    res = tr.compress(t, method=method, keep=keep, lm=lm, tokenizer=tok, question=QUESTION)
    _check(res, t, tok)
    if keep == 1.0:
        assert res.text == t


# ---------------------------------------------------------------------------- errors
def test_errors(text, lm, tok):
    with pytest.raises(ValueError, match="empty"):
        tr.compress("", keep=0.5, lm=lm, tokenizer=tok)
    with pytest.raises(ValueError, match="empty"):
        tr.compress("   \n ", keep=0.5, lm=lm, tokenizer=tok)
    with pytest.raises(ValueError, match="question without a context"):
        tr.compress("", method="longllmlingua", keep=0.5, lm=lm, tokenizer=tok, question="Why?")
    with pytest.raises(ValueError, match="question is empty"):
        tr.compress(text, method="longllmlingua", keep=0.5, lm=lm, tokenizer=tok, question="  ")
    for bad in (0.0, -0.5, 1.5, float("nan")):
        with pytest.raises(ValueError, match="out of range"):
            tr.compress(text, keep=bad, lm=lm, tokenizer=tok)
    with pytest.raises(TypeError):
        tr.compress(text, keep=True, lm=lm, tokenizer=tok)
    for bad in (0, 1, 5):  # keep=1 used to return the first token, against the docstring's promise
        with pytest.raises(TypeError, match=r"ambiguous.*Keep\(count="):
            tr.compress(text, keep=bad, lm=lm, tokenizer=tok)
    with pytest.raises(ValueError, match="larger than the text"):
        tr.compress(text, keep=tr.Keep(count=10 ** 6), lm=lm, tokenizer=tok)
    assert tr.compress(text, keep=tr.Keep(count=7), lm=lm, tokenizer=tok).target_tokens == 7
    with pytest.raises(ValueError, match="did you mean"):
        tr.compress(text, method="selective_context", keep=0.5, lm=lm, tokenizer=tok)
    with pytest.raises(ValueError, match="not available at integration point 'prompt'"):
        tr.compress(text, method="tome", keep=0.5, lm=lm, tokenizer=tok)
    with pytest.raises(ValueError, match="pass tokenizer="):
        tr.compress(text, keep=0.5, lm=lm)
    with pytest.raises(ValueError, match="pass lm="):
        tr.compress(text, method="selective-context", keep=0.5, tokenizer=tok)
    with pytest.raises(ValueError, match="question-aware"):
        tr.compress(text, method="longllmlingua", keep=0.5, lm=lm, tokenizer=tok)
    with pytest.raises(TypeError, match="str"):
        tr.compress(b"bytes", keep=0.5, lm=lm, tokenizer=tok)
    with pytest.raises(TypeError, match="accepted keywords"):
        tr.compress(text, method="selective-context", keep=0.5, lm=lm, tokenizer=tok, bogus=1)
    with pytest.raises(TypeError, match="causal LM"):
        tr.compress(text, method="selective-context", keep=0.5, lm="gpt", tokenizer=tok)


def test_slow_tokenizer_is_rejected(text, lm, tok):
    class Slow:  # what a slow (python) tokenizer looks like to compress: no character offsets
        is_fast = False
        convert_ids_to_tokens = tok.convert_ids_to_tokens

        def __call__(self, *a, **k):
            return tok(*a, **k)

    with pytest.raises(TypeError, match="fast tokenizer"):
        tr.compress(text, keep=0.5, lm=lm, tokenizer=Slow())


# ---------------------------------------------------------------------------- scorer
def test_scorer_matches_the_lm_logits(text, lm, tok):
    sc = CausalScorer(lm, tok, head_dtype=torch.float32)
    ids = tok(text, add_special_tokens=False).input_ids[:200]
    got = sc.text_logprobs(ids)
    with torch.no_grad():
        ref = torch.log_softmax(lm(input_ids=torch.tensor([ids])).logits[0, :-1].float(), -1)
    ref = ref.gather(1, torch.tensor(ids[1:])[:, None])[:, 0].numpy()
    assert np.isnan(got[0])  # MiniLM's tokenizer has no <bos>: the first token has no prediction
    np.testing.assert_allclose(got[1:], ref, atol=1e-4)
    assert sc.fast


def test_scorer_batches_padded_sequences_like_single_ones(lm, tok):
    sc = CausalScorer(lm, tok, head_dtype=torch.float32)
    seqs = [tok(s, add_special_tokens=False).input_ids for s in ("a short one here", english_text(300, start=5))]
    together = sc.logprobs(seqs)
    alone = [sc.logprobs([s])[0] for s in seqs]
    for a, b in zip(together, alone):
        np.testing.assert_allclose(a, b, atol=1e-4)


def test_scorer_windows_cover_every_token(tok):
    small = _llama(tok, max_pos=32)
    sc = CausalScorer(small, tok, head_dtype=torch.float32)
    ids = tok(english_text(800, start=2), add_special_tokens=False).input_ids
    lp = sc.text_logprobs(ids)
    assert len(lp) == len(ids) and np.isfinite(lp[1:]).all()
    # tokens inside the first window are scored exactly as in one forward
    with torch.no_grad():
        ref = torch.log_softmax(small(input_ids=torch.tensor([ids[:32]])).logits[0, :-1].float(), -1)
    np.testing.assert_allclose(lp[1:32], ref.gather(1, torch.tensor(ids[1:32])[:, None])[:, 0].numpy(), atol=1e-4)


def test_sampled_normaliser_is_close_to_the_exact_head(text, lm, tok):
    ids = tok(text, add_special_tokens=False).input_ids[:300]
    exact = CausalScorer(lm, tok, head_mode="exact", head_dtype=torch.float32).text_logprobs(ids)
    sc = CausalScorer(lm, tok, head_mode="sampled", head_dtype=torch.float32, anchor_stride=8, anchor_topk=64)
    approx = sc.text_logprobs(ids)
    anchors = np.arange(0, len(ids) - 1, 8) + 1  # text position t is row t-1 of the scored rows
    np.testing.assert_allclose(approx[anchors], exact[anchors], atol=1e-4)
    assert np.corrcoef(approx[1:], exact[1:])[0, 1] > 0.99
    with pytest.raises(ValueError, match="head_mode"):
        CausalScorer(lm, tok, head_mode="fast")


# ---------------------------------------------------------------------------- scorer: own attention, copies, packing
def _gemma3(tok, sliding: int = 5):
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig

    torch.manual_seed(0)
    cfg = Gemma3TextConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                           num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=512,
                           sliding_window=sliding, pad_token_id=tok.pad_token_id,
                           layer_types=["sliding_attention", "sliding_attention", "full_attention"],
                           attn_implementation="sdpa")
    return Gemma3ForCausalLM(cfg).eval()


@pytest.mark.parametrize("kind", ["causal", "cache", "sliding", "sliding-mask", "padding", "additive"])
def test_scorer_attention_matches_sdpa(kind):
    from tokenreduce.adapters.prompt.attention import scorer_attention

    g = torch.Generator().manual_seed(0)
    B, H, Hk, L, D = 2, 4, 2, 23, 8
    S = L + (6 if kind == "cache" else 0)
    q, k, v = (torch.randn(B, h, n, D, generator=g) for h, n in ((H, L), (Hk, S), (Hk, S)))
    qpos, kpos = torch.arange(S - L, S)[:, None], torch.arange(S)[None]
    allowed = kpos <= qpos
    window = 5 if kind.startswith("sliding") else None
    if window:
        allowed &= kpos > qpos - window
    allowed = allowed.expand(B, 1, L, S).clone()
    if kind == "padding":
        allowed[1, :, :, 15:] = False  # sample 1 is padded after 15 tokens
        allowed[0, :, 3] = False  # a fully masked query row (padding) gives zeros, never NaN
    mask: Tensor | None = None
    if kind in ("sliding-mask", "padding"):
        mask = allowed
    elif kind == "additive":
        mask = torch.zeros(B, 1, L, S).masked_fill(~allowed, torch.finfo(torch.float32).min)
    ref = torch.nn.functional.scaled_dot_product_attention(q, k.repeat_interleave(H // Hk, 1),
                                                           v.repeat_interleave(H // Hk, 1), attn_mask=allowed)
    ref = ref.transpose(1, 2)
    for block in (4, 256):
        got, w = scorer_attention(None, q, k, v, mask, sliding_window=window if mask is None else None, block=block)
        assert w is None and got.shape == (B, L, H, D)
        if kind == "padding":
            assert (got[0, 3] == 0).all()
            got, ref = got.clone(), ref.clone()
            got[0, 3] = ref[0, 3] = 0
        torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-5)


def test_scorer_copy_with_own_attention_matches_the_lm(text, tok):
    lm = _gemma3(tok)
    ids = tok(text, add_special_tokens=False).input_ids[:300]
    ref = CausalScorer(lm, tok, head_mode="exact").text_logprobs(ids)
    sc = CausalScorer(lm, tok, head_mode="exact", attention="blocked")
    assert sc.twin is not None and sc.twin is not lm
    np.testing.assert_allclose(sc.text_logprobs(ids), ref, atol=1e-4)
    # a text longer than the sliding window, in packed documents, equals the documents run one by one
    seqs = [ids[:40], ids[40:41], ids[41:120]]
    packed = sc.hidden_states(seqs)
    assert sc.pack
    for s_, h in zip(seqs, packed):
        torch.testing.assert_close(h, sc.hidden(torch.tensor([s_]))[0], atol=1e-5, rtol=1e-4)
    # the caller's LM is untouched
    assert lm.config._attn_implementation == "sdpa" and next(lm.parameters()).dtype == torch.float32
    bf = CausalScorer(lm, tok, head_mode="exact", body_dtype=torch.bfloat16)
    lp = bf.text_logprobs(ids)
    assert bf.body_dtype == torch.bfloat16 and next(bf.twin.parameters()).dtype == torch.bfloat16, bf.notes
    assert np.corrcoef(lp[1:], ref[1:])[0, 1] > 0.99
    assert next(lm.parameters()).dtype == torch.float32
    with pytest.raises(ValueError, match="attention"):
        CausalScorer(lm, tok, attention="flash")
    with pytest.raises(ValueError, match="body_dtype"):
        CausalScorer(lm, tok, body_dtype="half")


def test_packed_sequences_equal_padded_batches(lm, tok):
    sc = CausalScorer(lm, tok, head_mode="exact")
    seqs = [tok(s, add_special_tokens=False).input_ids for s in ("a short one", "x", english_text(200, start=4))]
    packed = sc.hidden_states(seqs)
    assert sc.pack and not sc.notes
    sc.pack = False
    padded = sc.hidden_states(seqs)
    for a, b in zip(packed, padded):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize(("method", "forwards"), [("selective-context", 1), ("llmlingua", 1), ("longllmlingua", 2)])
def test_scorer_forwards_per_compression(method, forwards, text, lm, tok):
    """selective-context and llmlingua (iterative="reuse") run the LM body once over the prompt; longllmlingua
    twice (packed documents + question, then the question + the documents that must lose tokens)."""
    tr.compress(text, method=method, keep=0.4, lm=lm, tokenizer=tok, question=QUESTION)  # scorer built + checked
    calls = []
    h = lm.model.register_forward_hook(lambda m, a, kw, out: calls.append(1), with_kwargs=True)
    try:
        res = tr.compress(text, method=method, keep=0.4, lm=lm, tokenizer=tok, question=QUESTION)
    finally:
        h.remove()
    _check(res, text, tok)
    assert len(calls) == forwards


@pytest.mark.parametrize("iterative", ["reuse", "kv"])
def test_llmlingua_iterative_modes(iterative, text, lm, tok, encoder):
    a = _run(text, "llmlingua", 0.4, lm, tok, encoder, iterative=iterative)
    b = _run(text, "llmlingua", 0.4, lm, tok, encoder, iterative=iterative)
    _check(a, text, tok)
    assert a.text == b.text
    with pytest.raises(ValueError, match="reuse"):
        _run(text, "llmlingua", 0.4, lm, tok, encoder, iterative="exact")
