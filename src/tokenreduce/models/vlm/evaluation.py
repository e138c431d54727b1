"""Asking the small VLM questions and scoring it: prompts (:func:`encode_prompts`), the held-out sets behind the
reported accuracies (:func:`eval_set`), answers (:func:`answer_questions`, :func:`parse_answer`) and accuracy
per question type (:func:`evaluate_vqa`)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from tokenreduce.data.vqa import QA, QUESTION_TYPES, SPECIAL_TOKENS, VOCAB, make_vqa_set

from .config import PROMPT_FORMATS, VLMTrainConfig
from .targets import rationale_tokens

__all__ = ["answer_questions", "chance_by_type", "encode_prompts", "eval_set", "evaluate_vqa", "parse_answer",
           "prompt_format"]


def encode_prompts(tokenizer, questions: Sequence[str], images: torch.Tensor | None = None,
                   num_image_tokens: int | None = None, answers: Sequence[str] | None = None,
                   prompt: str = "question_first") -> dict[str, torch.Tensor]:
    """LLaVA-style batch: ``<image>`` x N + question + ``answer :`` (or the question first, see
    :data:`PROMPT_FORMATS`), left-padded, and ``pixel_values``.

    ``num_image_tokens`` defaults to a square patch grid of ``images`` at patch 8.
    """
    if prompt not in PROMPT_FORMATS:
        raise ValueError(f"prompt={prompt!r} is invalid: accepted {PROMPT_FORMATS}")
    if images is not None and images.shape[0] != len(questions):
        raise ValueError(f"{len(questions)} questions but {images.shape[0]} images")
    if num_image_tokens is None:
        if images is None:
            raise ValueError("give images or num_image_tokens")
        num_image_tokens = (images.shape[-1] // 8) ** 2
    img = " ".join([SPECIAL_TOKENS["image"]] * num_image_tokens)
    texts = [(f"{img} {q} answer :" if prompt == "image_first" else f"{q} {img} answer :") +
             (f" {a}" if answers is not None else "")
             for q, a in zip(questions, answers if answers is not None else [None] * len(questions))]
    enc = tokenizer(texts, return_tensors="pt", padding=True)
    out = {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}
    if images is not None:
        out["pixel_values"] = images
    return out


def eval_set(split: str, config: VLMTrainConfig | None = None, per_type: int | None = None,
             types: tuple[str, ...] = QUESTION_TYPES):
    """The exact held-out set behind the reported accuracies (``split`` = "val" or "test"; ``types``: the
    benchmark's question types, or e.g. ``("existence",)`` for a model trained on that type)."""
    c = config or VLMTrainConfig()
    if split not in ("val", "test"):
        raise ValueError(f"split={split!r} is invalid: must be 'val' or 'test'")
    n = per_type or (c.val_per_type if split == "val" else c.test_per_type)
    return make_vqa_set(split, 10 * n, seed=c.eval_seed, config=c.scene, types=types, per_type=n,
                        spatial=c.spatial_form)


@torch.no_grad()
def prompt_format(model) -> str:
    """The prompt layout a small VLM was trained with (stored on its config; default image first)."""
    return getattr(model.config, "vqa_prompt", "image_first")


def parse_answer(words: Sequence[str]) -> str:
    """The answer in generated ``words``: those before ``</s>``, then the first word after the last ``,``
    (the rationale's end) or the first word when there is none (one-word answers; an answer never
    contains a comma)."""
    eos = SPECIAL_TOKENS["eos"]
    words = list(words[: words.index(eos)] if eos in words else words)
    if "," in words:
        words = words[len(words) - words[::-1].index(","):]
    return words[0] if words else ""


def answer_questions(model, tok, images: torch.Tensor, qas: Sequence[QA], batch_size: int = 32,
                     generate: bool = False, max_new_tokens: int = 2) -> list[str]:
    """Each question's answer word (greedy, :func:`parse_answer`): by ``generate`` or, equivalently for
    one-word answers, the argmax of the prefill logits at the last prompt position (faster). A model trained
    with rationales writes one before the answer -- spatial questions with ``config.vqa_rationale``,
    existence questions with a ``config.vqa_existence`` form other than ``answer`` -- so those are always answered by
    ``generate`` with enough new tokens for the rationale (:func:`~.targets.rationale_tokens`); the word
    after it is the answer."""
    model.eval()
    n_img = model.config.image_seq_length
    spatial = bool(getattr(model.config, "vqa_rationale", False))
    existence = getattr(model.config, "vqa_existence", "answer")
    out: list[str] = []
    for i in range(0, len(qas), batch_size):
        chunk = qas[i : i + batch_size]
        batch = encode_prompts(tok, [q.question for q in chunk], images[[q.scene for q in chunk]], n_img,
                               prompt=prompt_format(model))
        long = max(rationale_tokens(q, spatial, existence) for q in chunk)
        if generate or long:
            gen = model.generate(**batch, max_new_tokens=max(max_new_tokens, long), do_sample=False)
            new = gen[:, batch["input_ids"].shape[1]:].tolist()
            out += [parse_answer([VOCAB[t] for t in row]) for row in new]
        else:
            first = model(**batch, logits_to_keep=1).logits[:, -1].argmax(-1)
            out += [VOCAB[int(t)] for t in first]
    return out


def evaluate_vqa(model, tok, data, batch_size: int = 32, generate: bool = False) -> dict[str, Any]:
    """Accuracy overall and per question type on a :class:`~tokenreduce.data.vqa.VQASet`."""
    preds = answer_questions(model, tok, data.images, data.qas, batch_size, generate)
    per: dict[str, list[int]] = {}
    for qa, p in zip(data.qas, preds):
        per.setdefault(qa.qtype, []).append(int(p == qa.answer))
    acc = {t: sum(v) / len(v) for t, v in per.items()}
    return {"acc": sum(map(sum, per.values())) / max(1, len(preds)), "acc_by_type": acc,
            "n_by_type": {t: len(v) for t, v in per.items()}, "predictions": preds}


def chance_by_type(data) -> dict[str, float]:
    """Accuracy of always answering the most frequent answer of each type (majority baseline)."""
    from collections import Counter

    out = {}
    for t, qas in data.by_type().items():
        out[t] = Counter(q.answer for q in qas).most_common(1)[0][1] / len(qas)
    return out
