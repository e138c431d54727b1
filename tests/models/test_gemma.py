"""Gemma 3 270M loader: fast unit tests of the tokenizer rebuild, slow tests against the real cache.

The slow tests need the converted checkpoint (``tokenreduce convert gemma``); they skip
cleanly when it is missing.
"""

from __future__ import annotations

import os
import re
import time
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from tokenreduce.models import gemma as G

spm = pytest.importorskip("sentencepiece")

SP = "\u2581"


# ---------------------------------------------------------------------------------------------
# Fast: vocab -> ModelProto conversion on a tiny synthetic vocabulary
# ---------------------------------------------------------------------------------------------


def _tiny_vocab():
    """A GGUF-style vocabulary: control/unk, user-defined whitespace runs *spelled with spaces* (as
    llama.cpp writes them), 256 byte pieces, then normal pieces with descending scores."""
    tokens = ["<pad>", "<eos>", "<bos>", "<unk>", "<start_of_turn>", "\n", "\n\n", "  ", "   ", "\t"]
    types = [G.CONTROL, G.CONTROL, G.CONTROL, G.CONTROL, G.CONTROL] + [G.USER_DEFINED] * 5
    scores = [-1000.0] * len(tokens)
    tokens += [f"<0x{b:02X}>" for b in range(256)]
    types += [G.BYTE] * 256
    scores += [0.0] * 256
    normal = [SP, "h", "e", "l", "o", "w", "r", "d", SP + "w", "he", "ll", "hell", "hello", "or", "wor", SP + "wor",
              SP + "world", "ld", "orld", "world"]  # fmt: skip
    tokens += normal
    types += [G.NORMAL] * len(normal)
    scores += [-float(i) for i in range(len(normal))]
    return tokens, scores, types


def _tiny_proto(**kw):
    tokens, scores, types = _tiny_vocab()
    return G.build_sentencepiece_proto(tokens, scores, types, unk_id=3, bos_id=2, eos_id=1, pad_id=0, **kw)


def test_spm_piece_whitespace_mapping():
    assert G.spm_piece_from_gguf("  ", G.USER_DEFINED) == SP * 2
    assert G.spm_piece_from_gguf("    ", G.USER_DEFINED) == SP * 4
    assert G.spm_piece_from_gguf("\n\n", G.USER_DEFINED) == "\n\n"  # only spaces are escaped
    assert G.spm_piece_from_gguf("\t", G.USER_DEFINED) == "\t"
    assert G.spm_piece_from_gguf(SP + "the", G.NORMAL) == SP + "the"
    assert G.spm_piece_from_gguf("<0x20>", G.BYTE) == "<0x20>"
    assert G.spm_piece_from_gguf("<bos>", G.CONTROL) == "<bos>"


def test_proto_roundtrip_fields():
    tokens, scores, _ = _tiny_vocab()
    parsed = G.parse_sentencepiece_proto(_tiny_proto())
    pieces = parsed["pieces"]
    assert len(pieces) == len(tokens)
    assert pieces[7] == (SP * 2, -1000.0, G.USER_DEFINED)
    assert pieces[8][0] == SP * 3
    assert pieces[3] == ("<unk>", -1000.0, G.UNKNOWN)  # GGUF's CONTROL <unk> becomes UNKNOWN
    assert pieces[2][2] == G.CONTROL and pieces[10][2] == G.BYTE
    assert [p[1] for p in pieces[-3:]] == scores[-3:]
    t = parsed["trainer_spec"]
    assert t["model_type"] == 2 and t["vocab_size"] == len(tokens) and t["byte_fallback"] == 1
    assert (t["unk_id"], t["bos_id"], t["eos_id"], t["pad_id"]) == (3, 2, 1, 0)
    assert (t["bos_piece"], t["eos_piece"], t["unk_piece"]) == ("<bos>", "<eos>", "<unk>")
    n = parsed["normalizer_spec"]
    assert n == {"name": "identity", "add_dummy_prefix": 0, "remove_extra_whitespaces": 0, "escape_whitespaces": 1}


def test_proto_negative_pad_id_roundtrip():
    tokens, scores, types = _tiny_vocab()
    proto = G.build_sentencepiece_proto(tokens, scores, types, unk_id=3, bos_id=2, eos_id=1, pad_id=-1)
    assert G.parse_sentencepiece_proto(proto)["trainer_spec"]["pad_id"] == -1


def test_proto_loads_in_sentencepiece_and_encodes():
    sp = spm.SentencePieceProcessor(model_proto=_tiny_proto())
    assert sp.get_piece_size() == len(_tiny_vocab()[0])
    assert (sp.bos_id(), sp.eos_id(), sp.unk_id(), sp.pad_id()) == (2, 1, 3, 0)
    pieces = lambda s: [sp.id_to_piece(i) for i in sp.encode(s)]
    assert pieces("hello world") == ["hello", SP + "world"]
    # user-defined whitespace runs are matched whole, longest first; no dummy prefix
    assert pieces("hello  world") == ["hello", SP * 2, "world"]
    assert pieces("hello   world") == ["hello", SP * 3, "world"]
    assert pieces("hello\n\nworld") == ["hello", "\n\n", "world"]
    # byte fallback for characters not in the vocabulary
    assert pieces("hé") == ["h", "<0xC3>", "<0xA9>"]
    assert sp.decode(sp.encode("hello  world\n\nhé")) == "hello  world\n\nhé"
    assert sp.is_control(2) and sp.is_unknown(3) and sp.is_byte(10)


def test_proto_rejects_duplicates_after_mapping():
    tokens, scores, types = _tiny_vocab()
    tokens[-1] = SP * 2  # collides with the respelled "  "
    with pytest.raises(ValueError, match="duplicate piece"):
        G.build_sentencepiece_proto(tokens, scores, types, unk_id=3, bos_id=2, eos_id=1)


def test_fast_tokenizer_matches_sentencepiece_on_tiny_vocab():
    proto = _tiny_proto()
    sp = spm.SentencePieceProcessor(model_proto=proto)
    parsed = G.parse_sentencepiece_proto(proto)
    pieces = [p for p, _, _ in parsed["pieces"]]
    types = [t for _, _, t in parsed["pieces"]]
    scores = [s for _, s, _ in parsed["pieces"]]
    tok = G.build_fast_tokenizer(pieces, scores, types, bos_id=2, eos_id=1, unk_id=3, pad_id=0)
    for text in ["hello world", "hello  world", "hello   world", "world\n\nhello", "hé wor", " hello", "helloworld"]:
        assert tok(text, add_special_tokens=False).input_ids == sp.encode(text), text
        assert tok.decode(tok(text, add_special_tokens=False).input_ids) == text
    assert tok("hello").input_ids[0] == 2  # <bos>


def test_missing_cache_error_message(tmp_path, monkeypatch):
    monkeypatch.setenv("TOKENREDUCE_CACHE", str(tmp_path))
    assert G.gemma_cache_dir() == tmp_path / G.CACHE_SUBDIR
    assert not G.gemma_cache_ready()
    with pytest.raises(FileNotFoundError) as err:
        G.load_gemma()
    msg = str(err.value)
    assert "tokenreduce convert gemma" in msg
    assert str(tmp_path / G.CACHE_SUBDIR) in msg


def test_cache_not_ready_without_meta(tmp_path):
    d = tmp_path / "gemma3-270m"
    d.mkdir()
    for name in ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json", "tokenizer.model"):
        (d / name).write_text("{}")
    assert not G.gemma_cache_ready(d)  # an interrupted conversion has no meta file
    (d / G.META_FILE).write_text('{"schema": 1, "checks": {"passed": false}}')
    assert not G.gemma_cache_ready(d)


# ---------------------------------------------------------------------------------------------
# Slow: the real converted checkpoint
# ---------------------------------------------------------------------------------------------

LEE = None
try:
    import gensim

    LEE = Path(gensim.__file__).parent / "test" / "test_data" / "lee_background.cor"
except ImportError:  # pragma: no cover
    pass

needs_cache = pytest.mark.skipif(
    not G.gemma_cache_ready(), reason="Gemma cache missing: run `tokenreduce convert gemma`"
)


@pytest.fixture(scope="module")
def gemma():
    if not G.gemma_cache_ready():
        pytest.skip("Gemma cache missing: run `tokenreduce convert gemma`")
    return G.load_gemma()


@pytest.fixture(scope="module")
def sp_ref():
    if not G.gemma_cache_ready():
        pytest.skip("Gemma cache missing")
    return spm.SentencePieceProcessor(model_file=str(G.gemma_cache_dir() / "tokenizer.model"))


def _lee_docs() -> list[str]:
    if LEE is None or not LEE.is_file():
        pytest.skip("gensim's lee_background.cor not available")
    return [line.strip() for line in LEE.read_text().splitlines() if line.strip()]


@pytest.mark.slow
@needs_cache
def test_config_shape(gemma):
    model, _ = gemma
    c = model.config
    assert type(model).__name__ == "Gemma3ForCausalLM" and not model.training
    assert (c.num_hidden_layers, c.num_attention_heads, c.num_key_value_heads, c.sliding_window) == (18, 4, 1, 512)
    assert c.layer_types.count("full_attention") == 3
    assert 260e6 < sum(p.numel() for p in model.parameters()) < 275e6
    assert next(model.parameters()).dtype.is_floating_point


@pytest.mark.slow
@needs_cache
def test_tokenizer_matches_sentencepiece(gemma, sp_ref):
    _, tok = gemma
    ids = tok(G.CHECK_SENTENCE, add_special_tokens=False).input_ids
    assert len(ids) == len(sp_ref.encode(G.CHECK_SENTENCE))
    assert ids == sp_ref.encode(G.CHECK_SENTENCE)
    for doc in _lee_docs()[:40]:
        assert tok(doc, add_special_tokens=False).input_ids == sp_ref.encode(doc)
    tricky = "a  b   c\t\td\n\n\ne" + " " * 40 + "f café 東京 🙂 3.14159"
    assert tok(tricky, add_special_tokens=False).input_ids == sp_ref.encode(tricky)
    assert tok.decode(sp_ref.encode(tricky)) == tricky


@pytest.mark.slow
@needs_cache
def test_bos_added(gemma):
    _, tok = gemma
    ids = tok("The capital of France is").input_ids
    assert ids[0] == tok.bos_token_id == 2
    assert ids.count(2) == 1
    assert tok.convert_ids_to_tokens(ids)[1:] == ["The", SP + "capital", SP + "of", SP + "France", SP + "is"]


@pytest.mark.slow
@needs_cache
def test_greedy_paris(gemma):
    """This Q4_K_M base model continues exactly "The capital of France is" greedily with " the capital
    of the country of France." — " Paris" is its 3rd most likely next token. So: Paris must be a
    top-5 next token there, and the greedy continuation of "... is the city of" must contain it."""
    model, tok = gemma
    cont = G.greedy_continuation(model, tok, G.FRANCE_PROMPT, max_new_tokens=8)
    rank, prob = G.next_token_rank(model, tok, G.FRANCE_PROMPT, " Paris")
    cont2 = G.greedy_continuation(model, tok, G.PARIS_PROMPT, max_new_tokens=8)
    print(f"\n{G.FRANCE_PROMPT!r} -> {cont!r}; ' Paris' rank {rank} p={prob:.3f}\n{G.PARIS_PROMPT!r} -> {cont2!r}")
    assert rank <= 5
    assert "Paris" in cont2


@pytest.mark.slow
@needs_cache
def test_perplexity_lee(gemma):
    model, tok = gemma
    text = " ".join(_lee_docs()[:3])
    ppl = G.perplexity(model, tok, text, max_tokens=512)
    print(f"\nperplexity on the first 512 tokens of lee_background.cor: {ppl:.2f}")
    assert 5 < ppl < 150


@pytest.mark.slow
@needs_cache
def test_passkey_retrieval(gemma):
    model, tok = gemma
    docs = _lee_docs()
    words = " ".join(docs[:8]).split()
    filler_a = " ".join(words[:300])
    filler_b = " ".join(words[300:600])
    prompt = (
        "There is important info hidden inside a lot of irrelevant text. Find it and memorize it.\n\n"
        f"{filler_a}\n\nThe pass key is 71432. Remember it. 71432 is the pass key.\n\n{filler_b}\n\n"
        "Now answer the quiz. What is the pass key? The pass key is"
    )
    n = len(tok(prompt).input_ids)
    assert 700 < n < 1000, n
    cont = G.greedy_continuation(model, tok, prompt, max_new_tokens=8)
    print(f"\npasskey prompt {n} tokens -> {cont!r}")
    assert "71432" in re.sub(r"\s", "", cont)


@pytest.mark.slow
@needs_cache
def test_prefill_speed_sanity(gemma):
    import torch

    model, tok = gemma
    ids = tok(" ".join(_lee_docs()[:10]), return_tensors="pt").input_ids[:, :1200]
    with torch.inference_mode():
        model(input_ids=ids[:, :64], use_cache=False)  # warm-up
        t = time.perf_counter()
        model(input_ids=ids, use_cache=True, logits_to_keep=1)  # a prefill needs only the last logits
        dt = time.perf_counter() - t
    print(f"\nprefill {ids.shape[1]} tokens fp32/sdpa: {dt:.2f}s (load avg {os.getloadavg()[0]:.1f})")
    assert dt < 120  # only catches pathological slowness: the 2 cores are shared with other jobs
