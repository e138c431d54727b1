"""Gemma's tokenizer, rebuilt from the GGUF's vocabulary.

The GGUF carries Gemma's SentencePiece vocabulary (pieces, scores, token types) but no merges and
no ``tokenizer.model``. We rebuild a SentencePiece BPE ``ModelProto`` from that vocabulary
(:func:`build_sentencepiece_proto`) and save it as ``tokenizer.model`` -- the reference that
``sentencepiece`` itself runs. llama.cpp respells Gemma's user-defined runs of ``▁`` as real
spaces (``"  "``); we map them back to ``▁``. The ModelProto is written with a small hand-rolled
protobuf encoder (:mod:`tokenreduce.models.gemma.protobuf`) because the ``protobuf`` package is not
installed in this environment.

The fast tokenizer (``tokenizer.json``, class ``GemmaTokenizer``) is built from the same pieces
(:func:`build_fast_tokenizer`) and checked token-for-token against ``sentencepiece`` during the
conversion; the conversion fails if they disagree.
"""

from __future__ import annotations

import struct
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .protobuf import pb_bytes, pb_fields, pb_float, pb_int

__all__ = ["BYTE", "CONTROL", "NORMAL", "SPACE", "UNKNOWN", "UNUSED", "USER_DEFINED", "GGUFVocab",
           "build_fast_tokenizer", "build_sentencepiece_proto", "parse_sentencepiece_proto", "read_gguf_vocab",
           "spm_piece_from_gguf"]


# SentencePiece piece types (same numbering in GGUF's tokenizer.ggml.token_type).
NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6
SPACE = "\u2581"  # "▁", SentencePiece's escaped space


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
        body = pb_bytes(1, piece) + pb_float(2, float(score))
        if ty != NORMAL:  # NORMAL is the proto default
            body += pb_int(3, ty)
        out += pb_bytes(1, body)

    byte_fallback = any(ty == BYTE for ty in types)

    def name(idx: int) -> str:
        return pieces[idx] if 0 <= idx < len(pieces) else ""

    trainer = (
        pb_int(_TRAINER["model_type"], _BPE)
        + pb_int(_TRAINER["vocab_size"], len(pieces))
        + pb_int(_TRAINER["split_by_whitespace"], 0)
        + pb_int(_TRAINER["split_digits"], 1)
        + pb_int(_TRAINER["allow_whitespace_only_pieces"], 1)
        + pb_int(_TRAINER["byte_fallback"], int(byte_fallback))
        + pb_int(_TRAINER["unk_id"], unk_id)
        + pb_int(_TRAINER["bos_id"], bos_id)
        + pb_int(_TRAINER["eos_id"], eos_id)
        + pb_int(_TRAINER["pad_id"], pad_id)
        + pb_bytes(_TRAINER["unk_piece"], name(unk_id))
        + pb_bytes(_TRAINER["bos_piece"], name(bos_id))
        + pb_bytes(_TRAINER["eos_piece"], name(eos_id))
        + pb_bytes(_TRAINER["pad_piece"], name(pad_id) or "<pad>")
    )
    normalizer = (
        pb_bytes(_NORMALIZER["name"], "identity")
        + pb_int(_NORMALIZER["add_dummy_prefix"], int(add_dummy_prefix))
        + pb_int(_NORMALIZER["remove_extra_whitespaces"], 0)
        + pb_int(_NORMALIZER["escape_whitespaces"], 1)
    )
    out += pb_bytes(2, trainer)
    out += pb_bytes(3, normalizer)
    return bytes(out)


def parse_sentencepiece_proto(data: bytes) -> dict:
    """Decode what :func:`build_sentencepiece_proto` writes (pieces + the trainer/normalizer fields
    it sets). Independent of the ``protobuf`` package; used by tests and the self-check."""
    pieces: list[tuple[str, float, int]] = []
    trainer: dict[str, Any] = {}
    normalizer: dict[str, Any] = {}
    t_names = {v: k for k, v in _TRAINER.items()}
    n_names = {v: k for k, v in _NORMALIZER.items()}
    for field, wire, value in pb_fields(data):
        if field == 1:
            piece, score, ty = "", 0.0, NORMAL
            for f, w, v in pb_fields(value):
                if f == 1:
                    piece = v.decode("utf-8")
                elif f == 2:
                    score = struct.unpack("<f", v)[0]
                elif f == 3:
                    ty = v
            pieces.append((piece, score, ty))
        elif field in (2, 3):
            names, target = (t_names, trainer) if field == 2 else (n_names, normalizer)
            for f, w, v in pb_fields(value):
                key = names.get(f, f)
                if w == 2:
                    target[key] = v.decode("utf-8")
                elif w == 0:
                    target[key] = v - (1 << 64) if v >= 1 << 63 else v
                else:
                    target[key] = v
    return {"pieces": pieces, "trainer_spec": trainer, "normalizer_spec": normalizer}


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
