"""KV-cache methods on tiny random-weight Llama / Qwen2 / Mistral / Gemma 3 models (real transformers classes).

Invariants (docs/design.md) for every registered kv-cache method: identity at keep=1 (generate() bit-identical,
model restored after exit), batch consistency with left padding and ragged kept counts, the cache really
shrinks (bytes of the real tensors), positions stay right after eviction (checked against a hand-built
attention mask on the unpatched model), determinism, clear errors.
"""

from __future__ import annotations

import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import tokenreduce as tr
from tests.tiny import decoder_llm as _tiny
from tokenreduce.accounting.kv import kv_bytes
from tokenreduce.adapters.llm import LLMAdapter

transformers = pytest.importorskip("transformers")
from transformers import (
    DynamicCache,
    Gemma3ForCausalLM,
    LlamaConfig,
    StaticCache,
)

KV_METHODS = [r["name"] for r in tr.methods("kv-cache")]
# knobs scaled to 40-token prompts (paper defaults assume thousands of tokens)
SMALL = {"snapkv": {"window_size": 4}, "pyramidkv": {"window_size": 4}, "tokenselect": {"n_init": 2, "n_local": 4}}
KEEP = {"pyramidkv": 0.7}  # a 4-layer pyramid at 0.5 would give the top layer < window
GEN = {"do_sample": False, "pad_token_id": 0, "output_logits": True, "return_dict_in_generate": True}
SLIDING = 16


@pytest.fixture(scope="module")
def models():
    cache: dict = {}

    def get(family: str, impl: str = "sdpa", dtype: torch.dtype = torch.float32):
        key = (family, impl, dtype)
        if key not in cache:
            cache[key] = _tiny(family, impl, dtype)
        return cache[key]

    return get


def _prompts(seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    a = torch.randint(3, 128, (1, 40), generator=g)
    b = torch.randint(3, 128, (1, 28), generator=g)
    ids = torch.zeros(2, 40, dtype=torch.long)
    ids[0], ids[1, 12:] = a, b
    mask = torch.ones(2, 40, dtype=torch.long)
    mask[1, :12] = 0
    return a, b, ids, mask


def _apply(model, name, keep=None, **kw):
    return tr.apply(model, name, keep=KEEP.get(name, 0.5) if keep is None else keep, **{**SMALL.get(name, {}), **kw})


def _logits(out):
    return torch.stack(out.logits, 1)


# ---------------------------------------------------------------------------- registry / matching
def test_all_methods_registered():
    expected = {"streaming-llm", "h2o", "snapkv", "tova", "knorm", "pyramidkv", "tokenselect", "random"}
    assert expected <= set(KV_METHODS)
    for r in tr.methods("kv-cache"):
        assert r["paper"] and r["equation"] and r["modality"] == "language"
        assert tr.registry.get_method(r["name"], "kv-cache").factory.__doc__


def test_adapter_matches_decoder_llms_only(models):
    from transformers import CLIPVisionConfig, LlavaConfig, LlavaForConditionalGeneration

    ad = LLMAdapter()
    for fam in ("llama", "qwen2", "mistral", "gemma3"):
        m = models(fam)
        assert ad.matches(m) and ad.matches(m.base_model)
    vis = CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                           image_size=32, patch_size=16)
    txt = LlamaConfig(vocab_size=300, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                      num_attention_heads=2, num_key_value_heads=1)
    llava = LlavaForConditionalGeneration(LlavaConfig(vision_config=vis, text_config=txt, image_token_index=299))
    assert not ad.matches(llava)


# ---------------------------------------------------------------------------- invariant 1: identity
@pytest.mark.parametrize("family", ["llama", "qwen2", "mistral", "gemma3"])
@pytest.mark.parametrize("name", KV_METHODS)
def test_identity_keep_1_is_bit_identical(models, family, name):
    m = models(family)
    _, _, ids, mask = _prompts()
    ref = m.generate(ids, attention_mask=mask, max_new_tokens=6, **GEN)
    with _apply(m, name, keep=1.0) as h:
        out = m.generate(ids, attention_mask=mask, max_new_tokens=6, **GEN)
    assert torch.equal(out.sequences, ref.sequences)
    assert torch.equal(_logits(out), _logits(ref))
    assert not h.active and m.config._attn_implementation == "sdpa"
    assert "_tokenreduce_handle" not in m.__dict__
    assert not m.model._forward_pre_hooks and not m.model._forward_hooks
    assert all("_tokenreduce_kv" not in layer.self_attn.__dict__ for layer in m.model.layers)


@pytest.mark.parametrize("family", ["llama", "gemma3"])
def test_identity_eager_and_restore_serialisation(models, family):
    m = models(family, "eager")
    a, _, _, _ = _prompts()
    sd = {k: v.clone() for k, v in m.state_dict().items()}
    cfg = m.config.to_dict()
    ref = m.generate(a, max_new_tokens=6, **GEN)
    with _apply(m, "snapkv", keep=1.0):
        out = m.generate(a, max_new_tokens=6, **GEN)
    assert torch.equal(_logits(out), _logits(ref))
    with _apply(m, "streaming-llm", keep=0.5):
        m.generate(a, max_new_tokens=3, **GEN)
    assert m.config.to_dict() == cfg and m.config._attn_implementation == "eager"
    assert all(torch.equal(v, sd[k]) for k, v in m.state_dict().items())
    assert torch.equal(_logits(m.generate(a, max_new_tokens=6, **GEN)), _logits(ref))


# ---------------------------------------------------------------------------- invariant 2: batch consistency
BATCH_CASES = [(f, i, n) for f, i in (("llama", "sdpa"), ("gemma3", "sdpa")) for n in KV_METHODS] + [
    (f, i, n) for f, i in (("gemma3", "eager"), ("qwen2", "eager"), ("mistral", "sdpa"))
    for n in ("snapkv", "streaming-llm", "h2o", "tokenselect")]


@pytest.mark.parametrize("family,impl,name", BATCH_CASES)
def test_batch_with_left_padding_matches_each_sample_alone(models, family, impl, name):
    m = models(family, impl)
    a, b, ids, mask = _prompts()
    with _apply(m, name) as h:
        batch = m.generate(ids, attention_mask=mask, max_new_tokens=8, **GEN)
        kept = h.stats.kept
        alone_a = m.generate(a, max_new_tokens=8, **GEN)
        alone_b = m.generate(b, max_new_tokens=8, **GEN)
    assert torch.equal(batch.sequences[0, 40:], alone_a.sequences[0, 40:])
    assert torch.equal(batch.sequences[1, 40:], alone_b.sequences[0, 28:])
    torch.testing.assert_close(_logits(batch)[0], _logits(alone_a)[0], atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(_logits(batch)[1], _logits(alone_b)[0], atol=1e-4, rtol=1e-4)
    if name != "tokenselect" and family != "mistral":  # ragged: samples keep different numbers of entries
        assert any(k[0] != k[1] for k in kept)  # (Mistral here: every layer is a 16-token window)


# ---------------------------------------------------------------------------- invariant: the cache shrinks
FILTERS = ["gemfilter"]  # prompt filters act on generate() (tests of their own below)


@pytest.mark.parametrize("family", ["llama", "gemma3"])
@pytest.mark.parametrize("name", [n for n in KV_METHODS if n not in ("tokenselect", *FILTERS)])
def test_cache_really_shrinks(models, family, name):
    m = models(family)
    a, _, _, _ = _prompts()
    keep = KEEP.get(name, 0.5)
    full = DynamicCache(config=m.config)
    with torch.no_grad():
        m(a, past_key_values=full)
    with _apply(m, name, keep=keep) as h, torch.no_grad():
        cache = DynamicCache(config=m.config)
        m(a, past_key_values=cache)
        st = h.stats
    assert st.kv_bytes_unreduced == kv_bytes(full)["tensor"]
    assert st.kv_bytes == kv_bytes(cache)["tensor"] < 0.8 * st.kv_bytes_unreduced
    for li, layer in enumerate(cache.layers):
        n_full = full.layers[li].keys.shape[-2]
        assert layer.keys.shape[-2] == st.slots[li] <= n_full
        assert st.slots[li] < n_full or (name == "pyramidkv" and li == 0)  # pyramid: layer 0 may keep all
        assert layer.get_seq_length() == 40  # logical length: position ids continue at 40
        if layer.compact:
            assert layer.pos.shape == layer.keys.shape[:3]
            real = layer.pos[layer.pos >= 0].view(layer.pos.shape[0], layer.pos.shape[1], -1)
            assert torch.all(real[..., 1:] > real[..., :-1]), "kept entries must stay in positional order"
    if name != "pyramidkv":  # one budget for every layer: bytes follow keep (rounding per layer)
        assert st.kv_kept_fraction == pytest.approx(keep, abs=0.06)
    else:
        ratios = [st.tokens_attn[li] / full.layers[li].keys.shape[-2] for li in range(len(cache.layers))]
        assert ratios == sorted(ratios, reverse=True) and ratios[0] > ratios[-1]  # lower layers keep more


def test_decoding_methods_hold_the_budget_while_generating(models):
    m = models("llama")
    a, _, _, _ = _prompts()
    for name in ("streaming-llm", "h2o", "tova"):
        with _apply(m, name, keep=tr.Keep(count=20)) as h:  # a count: a fixed cache size (the papers' setting)
            m.generate(a, max_new_tokens=12, **GEN)
            assert all(k[0] == 20 for k in h.stats.kept), (name, h.stats.kept)
            assert h.stats.logical_length == 40 + 11
        with _apply(m, name, keep=0.25) as h:  # a ratio: a fraction of the unreduced cache at every step
            m.generate(a, max_new_tokens=12, **GEN)
            assert all(k[0] == round(0.25 * 51) for k in h.stats.kept), (name, h.stats.kept)
            assert h.stats.kv_kept_fraction == pytest.approx(13 / 51)
    with _apply(m, "snapkv", keep=0.5) as h:  # prefill method: compressed once, then the cache grows
        m.generate(a, max_new_tokens=12, **GEN)
        assert all(round(k[0]) == 20 + 11 for k in h.stats.kept)


def test_tokenselect_attends_to_the_budget_and_keeps_the_cache(models):
    m = models("llama")
    a, _, _, _ = _prompts()
    with _apply(m, "tokenselect", keep=0.5, reuse_threshold=None) as h:
        m.generate(a, max_new_tokens=4, **GEN)
        st = h.stats
    assert st.kv_kept_fraction == 1.0
    assert all(x == round(0.5 * 43) for x in st.attended), st.attended  # 40 + 3 fed tokens


# ---------------------------------------------------------------------------- positions after compression
def _stream_reference(m, seq, n_prompt, rows):
    """Logits of the unpatched model with a hand-built mask: prompt rows causal, decode rows see only what a
    StreamingLLM cache holds (``rows(layer_type, i)`` -> allowed columns of row i)."""
    L = seq.shape[1]
    masks = {}
    for kind in ("full_attention", "sliding_attention"):
        allow = torch.tril(torch.ones(L, L, dtype=torch.bool))
        if kind == "sliding_attention":
            allow &= ~torch.tril(torch.ones(L, L, dtype=torch.bool), diagonal=-SLIDING)
        for i in range(n_prompt, L):
            row = torch.zeros(L, dtype=torch.bool)
            row[rows(kind, i)] = True
            allow[i] = row
        masks[kind] = torch.zeros(1, 1, L, L).masked_fill(~allow, torch.finfo(torch.float32).min)
    am = masks if isinstance(m, Gemma3ForCausalLM) else masks["full_attention"]
    with torch.no_grad():
        return m(seq, attention_mask=am).logits[0, n_prompt - 1:]


@pytest.mark.parametrize("family,impl", [("llama", "sdpa"), ("llama", "eager"), ("gemma3", "sdpa")])
def test_positions_after_eviction_match_hand_reference(models, family, impl):
    """StreamingLLM keeps sinks + a rolling window: decode token i must see exactly cols [0,4) + [i-W, i] with
    its true position (RoPE) — compared with the unpatched model under an explicit attention mask."""
    m = models(family, impl)
    a, _, _, _ = _prompts()
    n, sinks, T = 40, 4, 8
    with tr.apply(m, "streaming-llm", keep=tr.Keep(count=20), sinks=sinks):  # a fixed cache of 20 entries per layer
        out = m.generate(a, max_new_tokens=T, **GEN)
    w_full = 20 - sinks  # global layers: 4 sinks + 16 recent entries, + the new token

    def rows(kind, i):
        if kind == "full_attention":
            return list(range(sinks)) + list(range(i - w_full, i + 1))
        return list(range(i - SLIDING + 1, i + 1))  # a 16-token window holds 15 < 20 entries: untouched

    ref = _stream_reference(m, out.sequences[:, : n + T - 1], n, rows)
    torch.testing.assert_close(_logits(out)[0], ref, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("family", ["llama", "gemma3"])
def test_in_place_decoding_equals_repacking_every_step(models, family, monkeypatch):
    """Decoding evicts by emptying slots and refills them (no copy); the old way repacks the cache in positional
    order every step. Same tokens, logits and kept entries; a count budget holds at most budget + 1 slots."""
    from tokenreduce.adapters.llm import KVLayer, KVSlidingLayer

    m = models(family)
    _, _, ids, mask = _prompts()
    for name, keep in (("streaming-llm", tr.Keep(count=20)), ("h2o", tr.Keep(count=20)), ("tova", 0.5),
                       ("snapkv", 0.5)):
        with _apply(m, name, keep=keep) as h:
            fast = m.generate(ids, attention_mask=mask, max_new_tokens=10, **GEN)
            kept_fast = h.stats.kept
        cache = fast.past_key_values
        with monkeypatch.context() as mp:
            mp.setattr(KVLayer, "in_place", False)
            mp.setattr(KVSlidingLayer, "in_place", False)
            with _apply(m, name, keep=keep) as h:
                slow = m.generate(ids, attention_mask=mask, max_new_tokens=10, **GEN)
                kept_slow = h.stats.kept
        assert torch.equal(fast.sequences, slow.sequences), name
        torch.testing.assert_close(_logits(fast), _logits(slow), atol=1e-5, rtol=1e-5)
        assert kept_fast == kept_slow, name
        if name in ("streaming-llm", "h2o"):  # a count: at most budget + 1 slots (one freed per step)
            assert all(layer.keys.shape[-2] <= 21 for layer in cache.layers)


def test_plain_forward_loop_uses_logical_positions(models):
    """Without generate(): a manual decode loop (no position_ids, no mask) continues at the logical length."""
    m = models("llama")
    a, _, _, _ = _prompts()
    with tr.apply(m, "streaming-llm", keep=tr.Keep(count=20), sinks=4), torch.no_grad():
        cache = DynamicCache(config=m.config)
        out = m(a, past_key_values=cache)
        nxt = out.logits[:, -1:].argmax(-1)
        step = m(nxt, past_key_values=cache).logits[0, -1]
    seq = torch.cat([a, nxt], 1)
    ref = _stream_reference(m, seq, 40, lambda kind, i: list(range(4)) + list(range(i - 16, i + 1)))[-1]
    torch.testing.assert_close(step, ref, atol=1e-5, rtol=1e-5)


# ---------------------------------------------------------------------------- question kept, determinism
def test_question_tokens_are_never_evicted(models):
    m = models("gemma3")
    a, _, _, _ = _prompts()
    for name in ("snapkv", "knorm", "streaming-llm", "h2o", "tova", "random"):
        with _apply(m, name, keep=0.5, question_len=6) as h, torch.no_grad():
            cache = DynamicCache(config=m.config)
            m(a, past_key_values=cache)
            for layer in cache.layers:
                for col in range(34, 40):
                    assert bool((layer.pos == col).any(-1).all()), (name, col)
            assert h.stats.question_entries == [6]


def test_random_is_deterministic_per_seed(models):
    m = models("llama")
    a, _, _, _ = _prompts()

    def kept_positions(seed):
        with tr.apply(m, "random", keep=0.5, seed=seed), torch.no_grad():
            cache = DynamicCache(config=m.config)
            m(a, past_key_values=cache)
            return [layer.pos.clone() for layer in cache.layers]

    p0, p0b, p1 = kept_positions(0), kept_positions(0), kept_positions(1)
    assert all(torch.equal(x, y) for x, y in zip(p0, p0b))
    assert any(not torch.equal(x, y) for x, y in zip(p0, p1))


def test_bf16_runs_and_shrinks(models):
    m = models("gemma3", "sdpa", torch.bfloat16)
    a, _, ids, mask = _prompts()
    ref = m.generate(a, max_new_tokens=4, **GEN)
    with _apply(m, "snapkv", keep=1.0):
        assert torch.equal(m.generate(a, max_new_tokens=4, **GEN).sequences, ref.sequences)
    with _apply(m, "snapkv", keep=0.5) as h:
        out = m.generate(ids, attention_mask=mask, max_new_tokens=4, **GEN)
        assert out.sequences.shape == (2, 44)
        assert h.stats.kv_kept_fraction < 0.8


# ---------------------------------------------------------------------------- errors
@pytest.mark.parametrize("keep", [0.0, -0.5, 1.5])
def test_keep_out_of_range(models, keep):
    with pytest.raises(ValueError, match=r"keep=.*out of range"):
        tr.apply(models("llama"), "snapkv", keep=keep)


@pytest.mark.parametrize("keep", [0, 1, 20])
def test_plain_int_keep_is_refused(models, keep):
    """keep=20 used to be a 20-entry cache: a count is only ever tr.Keep(count=20) (a capacity per layer)."""
    m = models("llama")
    with pytest.raises(TypeError, match=rf"keep={keep}: a plain int is ambiguous.*tr.Keep\(count={keep}\)"):
        tr.apply(m, "streaming-llm", keep=keep)
    assert m.config._attn_implementation == "sdpa" and "_tokenreduce_handle" not in m.__dict__


def test_clear_errors(models):
    m = models("llama")
    a, _, _, _ = _prompts()
    with pytest.raises(TypeError, match="keep must be"):
        tr.apply(m, "snapkv", keep="half")
    with pytest.raises(TypeError, match="accepted keywords"):
        tr.apply(m, "snapkv", keep=0.5, windw=3)
    with pytest.raises(ValueError, match="did you mean"):
        tr.apply(m, "snapk", keep=0.5)
    with pytest.raises(TypeError, match="unsupported model .*Llama"):
        tr.apply(torch.nn.Linear(2, 2), "snapkv", keep=0.5)
    with pytest.raises(ValueError, match=r"fewer than the question \(30 entries.*accepted: keep >= 0\.75"), \
            tr.apply(m, "snapkv", keep=0.5, question_len=30):
        m.generate(a, max_new_tokens=2, **GEN)
    with pytest.raises(ValueError, match=r"fewer than the question.*accepted: tr.Keep\(count=30\)"), \
            tr.apply(m, "h2o", keep=tr.Keep(count=20), question_len=30):
        m.generate(a, max_new_tokens=2, **GEN)
    with tr.apply(m, "snapkv", keep=0.5), pytest.raises(TypeError, match="unsupported cache type StaticCache"):
        m(a, past_key_values=StaticCache(config=m.config, max_cache_len=64))
    with pytest.raises(ValueError, match="question_len"), tr.apply(m, "snapkv", keep=0.5, question_len=50):
        m.generate(a, max_new_tokens=2, **GEN)
    with pytest.raises(TypeError, match=r"pyramidkv .*ratio.*got tr.Keep\(count=10\)"):
        tr.apply(m, "pyramidkv", keep=tr.Keep(count=10))


def test_budget_larger_than_sequence_evicts_nothing_and_says_so(models):
    m = models("llama")
    a, _, _, _ = _prompts()
    ref = m.generate(a, max_new_tokens=4, **GEN)
    with tr.apply(m, "knorm", keep=tr.Keep(count=1000)) as h:
        out = m.generate(a, max_new_tokens=4, **GEN)
        assert h.stats.kv_kept_fraction == 1.0
    with tr.apply(m, "knorm", keep=tr.Keep(count=1000)) as h, torch.no_grad():
        m(a, past_key_values=DynamicCache(config=m.config))
        assert any("nothing evicted" in n for n in h.stats.notes), h.stats.notes
    assert torch.equal(_logits(out), _logits(ref))


def test_flash_attention_is_rejected():
    m = _tiny("llama")
    m.config._attn_implementation = "flash_attention_2"
    with pytest.raises(TypeError, match="attn_implementation='flash_attention_2' is not supported.*accepted: sdpa, eager"):
        tr.apply(m, "snapkv", keep=0.5)


def test_chunked_prefill_with_decoding_methods(models):
    """generate(prefill_chunk_size=...) works with eviction between chunks: the cache holds ``keep`` of the
    unreduced cache after every chunk, the question (in the last chunk) is kept."""
    m = models("gemma3")
    a, _, _, _ = _prompts()
    for name in ("streaming-llm", "tova", "h2o"):
        with _apply(m, name, keep=0.5, question_len=3) as h:
            out = m.generate(a, max_new_tokens=3, prefill_chunk_size=16, **GEN)
            st = h.stats
        assert out.sequences.shape == (1, 43)
        assert st.prefill_kept_fraction == pytest.approx(0.5, abs=0.04)
        assert st.question_entries == [3]
        # "after the prompt" = after its last chunk (not the first one)
        with torch.no_grad():
            full = DynamicCache(config=m.config)
            m(a, past_key_values=full)
        assert st.prefill_kv_bytes_unreduced == kv_bytes(full)["tensor"]
    with _apply(m, "tova", keep=0.5, question_len=3) as h, torch.no_grad():
        cache = DynamicCache(config=m.config)
        for s in range(0, 40, 16):  # the same chunks by hand: the question is the end of the last chunk
            m(a[:, s: s + 16], past_key_values=cache)
        for layer in cache.layers:
            assert all(bool((layer.pos == c).any()) for c in range(37, 40))


def test_snapkv_question_window_per_sample(models):
    """window_size='question' with a different question length per sample: batch == each sample alone."""
    m = models("llama")
    a, b, ids, mask = _prompts()
    with tr.apply(m, "snapkv", keep=0.5, window_size="question", question_len=[6, 4]):
        batch = m.generate(ids, attention_mask=mask, max_new_tokens=5, **GEN)
    with tr.apply(m, "snapkv", keep=0.5, window_size="question", question_len=6):
        alone_a = m.generate(a, max_new_tokens=5, **GEN)
    with tr.apply(m, "snapkv", keep=0.5, window_size="question", question_len=4):
        alone_b = m.generate(b, max_new_tokens=5, **GEN)
    torch.testing.assert_close(_logits(batch)[0], _logits(alone_a)[0], atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(_logits(batch)[1], _logits(alone_b)[0], atol=1e-4, rtol=1e-4)
    with pytest.raises(ValueError, match="window_size='question' needs question_len"):
        tr.apply(m, "snapkv", keep=0.5, window_size="question")


# ---------------------------------------------------------------------------- prefill capture / replay (bench)
@pytest.mark.parametrize("family", ["llama", "gemma3"])
@pytest.mark.parametrize("name", [n for n in KV_METHODS if n not in FILTERS])
def test_replayed_prefill_equals_generate(models, family, name):
    """bench kv evaluates many methods on one captured prompt forward: the replay must give generate()'s tokens,
    logits and kept entries exactly (padded batch, question kept)."""
    from tokenreduce.adapters.llm import capture_prefill, replay_prefill

    m = models(family)
    _, _, ids, mask = _prompts()
    cap = capture_prefill(m, ids, mask)
    kw = {"question_len": 3} if name in ("snapkv", "pyramidkv") else {}
    with _apply(m, name, **kw) as h:
        ref = m.generate(ids, attention_mask=mask, max_new_tokens=5, **GEN)
        st_ref = h.stats
        prefill_ref = (st_ref.prefill_kv_bytes, st_ref.prefill_kept)
        cache = replay_prefill(h, cap)
        assert (h.stats.prefill_kv_bytes, h.stats.prefill_kept) == prefill_ref
        nxt = cap.last_logits.argmax(-1, keepdim=True)
        logits, toks, mk = [cap.last_logits], [nxt], mask
        with torch.no_grad():
            for _ in range(4):
                mk = torch.cat([mk, mk.new_ones(2, 1)], 1)
                lg = m(input_ids=nxt, attention_mask=mk, past_key_values=cache, use_cache=True).logits[:, -1]
                nxt = lg.argmax(-1, keepdim=True)
                logits.append(lg)
                toks.append(nxt)
        assert h.stats.kv_bytes == st_ref.kv_bytes
    assert torch.equal(torch.cat(toks, 1), ref.sequences[:, 40:])
    torch.testing.assert_close(torch.stack(logits, 1), _logits(ref), atol=1e-5, rtol=1e-5)


def test_prompt_filters_cannot_be_replayed(models):
    from tokenreduce.adapters.llm import capture_prefill, replay_prefill

    m = models("llama")
    a, _, _, _ = _prompts()
    cap = capture_prefill(m, a)
    with _apply(m, "gemfilter") as h, pytest.raises(TypeError, match="cannot be replayed"):
        replay_prefill(h, cap)


# ---------------------------------------------------------------------------- GemFilter (prompt filter)
def _gemfilter_reference(m, ids, layer, keep, question_len, window=1, kernel=5, pooling="avgpool"):
    """GemFilter's selection written out from the unpatched model's q/k at the filter layer (Alg. 1)."""
    import torch.nn.functional as F

    from tokenreduce.adapters.llm import capture_prefill

    q, k, _, _ = capture_prefill(m, ids).layers[layer]
    N = ids.shape[1]
    kk = k.repeat_interleave(q.shape[1] // k.shape[1], 1)
    s = (q[:, :, N - window:] @ kk.transpose(-1, -2)).sum(dim=(1, 2))  # (1, N) raw logits, all heads
    pool = F.avg_pool1d if pooling == "avgpool" else F.max_pool1d
    s = pool(s.unsqueeze(1), kernel, 1, kernel // 2)[:, 0, :N]
    s[:, N - max(question_len, 1):] = float("inf")
    budget = round(keep * N)
    return sorted(s[0].topk(budget).indices.tolist())


@pytest.mark.parametrize("family", ["llama", "gemma3"])
def test_gemfilter_selects_by_the_filter_layer_and_generates_on_the_kept_tokens(models, family):
    m = models(family)
    a, _, _, _ = _prompts()
    layer = 2  # gemma3 here: layers 0,1,3 slide, 2 is global (also the default there)
    with _apply(m, "gemfilter", keep=0.5, question_len=3, layer=layer) as h:
        out = m.generate(a, max_new_tokens=6, **GEN)
        st = h.stats
    kept = st.filter_kept[0]
    assert kept == _gemfilter_reference(m, a, layer, 0.5, 3)
    assert out.sequences.shape == (1, 46) and torch.equal(out.sequences[:, :40], a)  # the original prompt back
    ref = m.generate(a[:, kept], max_new_tokens=6, **GEN)  # Alg. 1: the whole model on the kept tokens only
    assert torch.equal(out.sequences[:, 40:], ref.sequences[:, 20:])
    torch.testing.assert_close(_logits(out), _logits(ref))
    cache = out.past_key_values
    assert st.kv_bytes == kv_bytes(cache)["tensor"]
    full = DynamicCache(config=m.config)
    with torch.no_grad():
        m(a, past_key_values=full)
        m(a[:, :5], past_key_values=full)  # 45 columns, as the cache after 6 generated tokens
    assert st.kv_bytes_unreduced == kv_bytes(full)["tensor"]
    assert st.input_tokens == 45 and st.prefill_kept_fraction < 0.8
    for layer_ in cache.layers:
        assert layer_.keys.shape[-2] <= 20 + 5


def test_gemfilter_window_maxpool_and_default_layer(models):
    m = models("gemma3")
    a, _, _, _ = _prompts()
    kw = {"window_size": "question", "pooling": "maxpool", "kernel_size": 3}
    with _apply(m, "gemfilter", keep=0.4, question_len=4, **kw) as h:
        m.generate(a, max_new_tokens=2, **GEN)
        kept = h.stats.filter_kept[0]
    assert h.method.filter_layer(m.config.layer_types) == 2  # the only full-attention layer <= 40% depth
    assert kept == _gemfilter_reference(m, a, 2, 0.4, 4, window=4, kernel=3, pooling="maxpool")
    from tokenreduce.methods.kv import GemFilter
    assert GemFilter(layer=None).filter_layer(["full_attention"] * 32) == 12  # 0.4 x 31 (paper: 13 of 32)


def test_gemfilter_chunked_filter_pass_selects_the_same(models):
    m = models("gemma3")
    _, _, ids, mask = _prompts()
    with _apply(m, "gemfilter", keep=0.5, question_len=2) as h:
        one = m.generate(ids, attention_mask=mask, max_new_tokens=5, **GEN)
        kept_one = h.stats.filter_kept
        chunked = m.generate(ids, attention_mask=mask, max_new_tokens=5, prefill_chunk_size=16, **GEN)
        kept_chunked = h.stats.filter_kept
    assert kept_one == kept_chunked and len(kept_one[0]) == 20 and len(kept_one[1]) == 14  # ragged (28 real)
    assert torch.equal(one.sequences, chunked.sequences)


def test_gemfilter_errors_and_notes(models):
    m = models("gemma3")
    a, _, _, _ = _prompts()
    with pytest.raises(ValueError, match="sliding-window layer"), _apply(m, "gemfilter", keep=0.5, layer=1):
        m.generate(a, max_new_tokens=1, **GEN)
    with pytest.raises(ValueError, match="out of range"), _apply(m, "gemfilter", keep=0.5, layer=9):
        m.generate(a, max_new_tokens=1, **GEN)
    with pytest.raises(ValueError, match="fewer than the question"), \
            _apply(m, "gemfilter", keep=tr.Keep(count=3), question_len=5):
        m.generate(a, max_new_tokens=1, **GEN)
    with pytest.raises(ValueError, match="layers= is not accepted"):
        tr.apply(m, "gemfilter", keep=0.5, layers=[2])
    with _apply(m, "gemfilter", keep=0.5) as h:
        with pytest.raises(ValueError, match="inputs_embeds"):
            m.generate(inputs_embeds=m.get_input_embeddings()(a), max_new_tokens=1, **GEN)
        with torch.no_grad():
            m(a)
        assert any("was not filtered" in n for n in h.stats.notes)
    with _apply(m, "gemfilter", keep=tr.Keep(count=40)) as h:  # the whole prompt: nothing filtered, and it says so
        out = m.generate(a, max_new_tokens=3, **GEN)
        assert any("nothing filtered" in n for n in h.stats.notes)
    assert torch.equal(out.sequences, m.generate(a, max_new_tokens=3, **GEN).sequences)


def test_gemfilter_with_several_returned_sequences(models):
    m = models("llama")
    a, _, _, _ = _prompts()
    with _apply(m, "gemfilter", keep=0.5) as h:
        out = m.generate(a, max_new_tokens=3, num_beams=2, num_return_sequences=2, do_sample=False, pad_token_id=0)
        kept = h.stats.filter_kept[0]
    ref = m.generate(a[:, kept], max_new_tokens=3, num_beams=2, num_return_sequences=2, do_sample=False,
                     pad_token_id=0)
    assert out.shape == (2, 43) and torch.equal(out[:, :40], a.expand(2, 40))
    assert torch.equal(out[:, 40:], ref[:, 20:])


# ---------------------------------------------------------------------------- one meaning of keep
def _achieved_from_counts(name, st):
    """The kv-cache meaning of keep, from the stats' own counts (see KVStats)."""
    phase = tr.registry.get_method(name, "kv-cache").cls.phase
    if phase == "filter":
        return sum(map(len, st.filter_kept)) / sum(st.filter_prompt)
    if phase == "select":
        return sum(st.attended) / sum(st.attendable)
    kept, total = (st.prefill_kept, st.prefill_unreduced) if phase == "prefill" else (st.kept, st.unreduced)
    return sum(map(sum, kept)) / sum(map(sum, total))


@pytest.mark.parametrize("family", ["llama", "gemma3"])
@pytest.mark.parametrize("keep", [0.5, 0.25])
def test_keep_is_the_fraction_of_kv_entries_for_every_method(models, family, keep):
    """One meaning of keep at the kv-cache: the fraction of the cache entries kept over all layers (after the prompt
    for methods that compress it once, at every step for the decoding ones; TokenSelect: of the entries a query
    attends to; GemFilter: of the prompt tokens). Every method lands within a few points of it and reports what
    its own counts say."""
    m = models(family)
    _, _, ids, mask = _prompts()
    for name in KV_METHODS:
        with _apply(m, name, keep=keep) as h:
            m.generate(ids, attention_mask=mask, max_new_tokens=4, **GEN)
            st = h.stats
        assert st.keep == keep, name
        assert st.keep_achieved == pytest.approx(_achieved_from_counts(name, st), abs=1e-12), name
        assert abs(st.keep_achieved - keep) < 0.04, (name, st.keep_achieved)
        if family == "llama":  # what keep is a fraction of: the unreduced cache (40 + 3 and 28 + 3 real tokens)
            assert st.unreduced == [[43, 31]] * 4, name
            assert name == "gemfilter" or st.prefill_unreduced == [[40, 28]] * 4, name


def test_keep_achieved_of_decoding_methods_at_every_step_and_of_counts(models):
    m = models("gemma3")
    a, _, _, _ = _prompts()
    with tr.apply(m, "h2o", keep=0.25) as h, torch.no_grad():
        cache = DynamicCache(config=m.config)
        nxt = m(a, past_key_values=cache).logits[:, -1:].argmax(-1)
        for _ in range(5):  # every step holds a quarter of what the unreduced cache holds then
            nxt = m(nxt, past_key_values=cache).logits[:, -1:].argmax(-1)
            assert abs(h.stats.keep_achieved - 0.25) < 0.03
    with tr.apply(m, "streaming-llm", keep=tr.Keep(count=10)) as h:  # a capacity: keep is None, achieved = counts
        m.generate(a, max_new_tokens=3, **GEN)
        st = h.stats
    assert st.keep is None and st.keep_achieved == pytest.approx(4 * 10 / (3 * 15 + 42))


@pytest.mark.parametrize("name", KV_METHODS)
def test_capacity_above_what_a_layer_holds_evicts_nothing_and_says_so(models, name):
    """tr.Keep(count=n) is a cache capacity per layer; one larger than what a layer holds evicts nothing there,
    and every method says so in the stats' notes (also after generate(): the prompt's notes stay visible)."""
    m = models("gemma3")
    a, _, _, _ = _prompts()
    ref = m.generate(a, max_new_tokens=4, **GEN)
    if name == "pyramidkv":  # a pyramid distributes a fraction: its widest layer may hold everything
        with pytest.raises(TypeError, match="ratio"):
            tr.apply(m, name, keep=tr.Keep(count=1000))
        with _apply(m, name, keep=0.7) as h:
            m.generate(a, max_new_tokens=4, **GEN)
        assert any("holds every entry of a sample in layers [" in n for n in h.stats.notes), h.stats.notes
        return
    with _apply(m, name, keep=tr.Keep(count=1000)) as h:
        out = m.generate(a, max_new_tokens=4, **GEN)
        st = h.stats
    assert torch.equal(out.sequences, ref.sequences)
    assert st.keep is None and st.keep_achieved == 1.0
    nothing = {"gemfilter": "nothing filtered", "tokenselect": "nothing left out of attention"}.get(name,
                                                                                                   "nothing evicted")
    assert any(nothing in n for n in st.notes), st.notes


def test_paper_defaults_degrade_gracefully_on_short_prompts(models):
    """The README's `tr.apply(llm, "snapkv", keep=0.25)` on a prompt under ~128 tokens (window 32), PyramidKV
    likewise, TokenSelect's 128 + 512 initial/local tokens under ~2,560: the forced entries shrink to half the
    budget (of what the question leaves), the method runs at keep, and the stats say so."""
    m = models("llama")
    a, _, _, _ = _prompts()
    cases = {"snapkv": "the observation window (32) left no room in a budget of 10 entries: shrunk to 5",
             "pyramidkv": "the observation window (32) left no room in a budget of 10 entries: shrunk to 5",
             "tokenselect": "n_init + n_local (128 + 512) left no room in a budget of 11 entries: shrunk to 5"}
    for name, note in cases.items():
        with tr.apply(m, name, keep=0.25) as h:
            m.generate(a, max_new_tokens=4, **GEN)
            st = h.stats
        assert any(note in n for n in st.notes), (name, st.notes)
        assert abs(st.keep_achieved - 0.25) < 0.03, name
    with tr.apply(m, "snapkv", keep=0.25) as h, torch.no_grad():
        cache = DynamicCache(config=m.config)
        m(a, past_key_values=cache)
    assert all(bool((layer.pos == c).any(-1).all()) for layer in cache.layers for c in range(35, 40))  # window 5


def test_sinks_and_recent_window_shrink_to_fit(models):
    m = models("llama")
    a, _, _, _ = _prompts()
    with tr.apply(m, "streaming-llm", keep=tr.Keep(count=3), sinks=4) as h, torch.no_grad():
        cache = DynamicCache(config=m.config)
        nxt = m(a, past_key_values=cache).logits[:, -1:].argmax(-1)
        m(nxt, past_key_values=cache)
        st = h.stats
    assert any("the attention sinks (4) left no room in a budget of 3 entries: shrunk to 1" in n for n in st.notes)
    assert all(sorted(layer.pos[0, 0][layer.pos[0, 0] >= 0].tolist()) == [0, 39, 40] for layer in cache.layers)
    with tr.apply(m, "streaming-llm", keep=0.1) as h:  # a chunk of 16 at keep 0.1: a budget of 2 entries
        out = m.generate(a, max_new_tokens=3, prefill_chunk_size=16, **GEN)
    assert out.sequences.shape == (1, 43)
    # H2O while decoding: the question (older than the recent tokens) and the recent window share the budget
    with tr.apply(m, "h2o", keep=tr.Keep(count=20), question_len=15) as h:
        m.generate(a, max_new_tokens=8, **GEN)
        st = h.stats
    assert any("h2o: the recent window (0.5 of the budget) left no room in a budget of 20 entries" in n
               for n in st.notes), st.notes
    assert all(k[0] == 20 for k in st.kept) and st.question_entries == [15]


def test_question_longer_than_the_budget_names_the_least_keep(models):
    m = models("llama")
    a, _, _, _ = _prompts()
    with pytest.raises(ValueError, match=r"tokenselect: the budget of layer 0 is 10 entries \(keep=0.25 of 41 "
                                         r"entries\), fewer than the question \(20 entries, never evicted\); "
                                         r"accepted: keep >= 0.488"), \
            tr.apply(m, "tokenselect", keep=0.25, question_len=20):
        m.generate(a, max_new_tokens=2, **GEN)


# ---------------------------------------------------------------------------- presets, public helpers
PRESETS = {("snapkv", "question"): {"window_size": "question"},
           ("snapkv", "question-max9"): {"window_size": "question", "pooling": "maxpool", "kernel_size": 9},
           ("gemfilter", "question-max9"): {"window_size": "question", "pooling": "maxpool", "kernel_size": 9},
           ("pyramidkv", "question"): {"window_size": "question"},
           ("tokenselect", "short"): {"n_init": 4, "n_local": 16}}


@pytest.mark.parametrize("name,preset", list(PRESETS))
def test_presets_are_the_benchmarks_settings(models, name, preset):
    m = models("llama")
    a, _, _, _ = _prompts()
    with tr.apply(m, name, keep=0.5, preset=preset, question_len=4) as h:
        assert all(getattr(h.method, k) == v for k, v in PRESETS[name, preset].items())
        by_preset = m.generate(a, max_new_tokens=4, **GEN)
    with tr.apply(m, name, keep=0.5, question_len=4, **PRESETS[name, preset]):
        by_hand = m.generate(a, max_new_tokens=4, **GEN)
    assert torch.equal(by_preset.sequences, by_hand.sequences)
    row = next(r for r in tr.methods("kv") if r["name"] == name)
    assert row["presets"][preset] == PRESETS[name, preset] and f'"{preset}"' in row["doc"]


class _CharTok:
    """A character-level tokenizer over the tiny models' vocabulary."""

    def __call__(self, text, return_tensors=None):
        ids = [ord(c) % 120 + 3 for c in text]

        class Enc:
            input_ids = torch.tensor([ids]) if return_tensors == "pt" else ids

        return Enc()

    def decode(self, ids, skip_special_tokens=True):
        return "".join(chr(int(i) + 60) for i in ids)


def test_question_length_and_generate_with_question_are_public(models):
    m = models("llama")
    tok = _CharTok()
    context, question = "a long document about many things " * 2, "\nwhat?\n"
    assert tr.question_length(tok, context, context + question) == len(question)
    text, st = tr.generate_with_question(m, tok, context, question, "snapkv", 0.5, max_new_tokens=3,
                                         preset="question")
    assert len(text) == 3 and st.question_entries == [len(question)] and abs(st.keep_achieved - 0.5) < 0.01
    doc = next(r for r in tr.methods("kv") if r["name"] == "h2o")["doc"]
    assert "tr.question_length(" in doc and "tr.generate_with_question(" in doc


# ---------------------------------------------------------------------------- errors of the adapter
def test_unknown_keyword_lists_only_real_knobs(models):
    m = models("llama")
    with pytest.raises(TypeError, match=r"unexpected keyword 'sink'.*did you mean 'sinks'") as e:
        tr.apply(m, "streaming-llm", keep=0.5, sink=2)
    accepted = str(e.value).split("accepted keywords:")[1]
    assert "'sinks'" in accepted and "'question_len'" in accepted
    for class_var in ("phase", "name", "min_free", "shared_heads", "stateful"):
        assert f"'{class_var}'" not in accepted
        with pytest.raises(TypeError, match=f"unexpected keyword '{class_var}'"):
            tr.apply(m, "streaming-llm", keep=0.5, **{class_var: 1})
    assert m.config._attn_implementation == "sdpa"


def test_second_apply_is_refused_before_touching_the_model(models):
    m = models("llama")
    a, _, _, _ = _prompts()
    ref = m.generate(a, max_new_tokens=4, **GEN)
    with tr.apply(m, "snapkv", keep=0.5) as h:
        first = m.generate(a, max_new_tokens=4, **GEN)
        with pytest.raises(RuntimeError, match=r"LlamaForCausalLM already has tokenreduce method 'snapkv' applied; "
                                               r"call .remove\(\) on its handle first"):
            tr.apply(m, "h2o", keep=0.5)
        with pytest.raises(RuntimeError, match=r"LlamaModel already has tokenreduce method 'snapkv' applied .*"
                                               r"call .remove\(\) on its handle first"):
            tr.apply(m.model, "h2o", keep=0.5)
        assert "_tokenreduce_handle" not in m.model.__dict__ and h.active
        assert torch.equal(m.generate(a, max_new_tokens=4, **GEN).sequences, first.sequences)  # still the first
    assert m.config._attn_implementation == "sdpa" and not m.model._forward_pre_hooks
    assert torch.equal(m.generate(a, max_new_tokens=4, **GEN).sequences, ref.sequences)


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_inputs_embeds_are_refused(models, bad):
    m = models("llama")
    a, _, _, _ = _prompts()
    emb = m.get_input_embeddings()(a).detach().clone()
    emb[0, 3, 5] = bad
    with tr.apply(m, "snapkv", keep=0.5):
        with pytest.raises(ValueError, match="inputs_embeds contains 1 NaN/Inf values; token reduction needs finite"):
            m(inputs_embeds=emb)
        with pytest.raises(ValueError, match="inputs_embeds contains 1 NaN/Inf"):
            m.generate(inputs_embeds=emb, max_new_tokens=2, **GEN)
