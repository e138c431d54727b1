"""Existence questions with a rationale: ``VLMTrainConfig(existence_rationale=True)``, ``is there the digit 7 ?``
-> ``<the scene's description> , yes|no``, and ``existence_lookup=True``, -> ``7 center , yes`` / ``7 , no``;
tiny random-weight models only."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from tokenreduce.data.vqa import QA, VOCAB, describe_answer, generate_scenes, questions_for
from tokenreduce.models.vlm import VLMTrainConfig, build_small_vlm, build_tokenizer, parse_answer, training_target
from tokenreduce.models.vlm.evaluation import answer_questions, encode_prompts, prompt_format
from tokenreduce.models.vlm.targets import (
    EXISTENCE_LOOKUP_TOKENS,
    EXISTENCE_NEW_TOKENS,
    LOSS_TYPES,
    lookup_rationale,
    ordered_description,
    routing_targets,
)

TINY = {"vision_dim": 32, "vision_layers": 1, "text_dim": 32, "text_layers": 2, "route_layers": (0,),
        "text_heads": 2, "text_kv_heads": 1, "batch_size": 8, "stem_channels": 0}


def test_target_is_the_description_then_the_answer():
    _, scenes, _ = generate_scenes("train", 30, seed=5)
    rng = np.random.default_rng(1)
    for i, s in enumerate(scenes):
        (qa,) = questions_for(s, i, rng, ("existence",))
        (desc,) = questions_for(s, i, rng, ("describe",))
        assert qa.rationale == desc.answer == describe_answer(s)
        target = training_target(qa, True, True, existence="description")
        assert target == f"{desc.answer} , {qa.answer}" and all(w in VOCAB for w in target.split())
        assert parse_answer(target.split() + ["</s>", "<pad>"]) == qa.answer
        assert training_target(qa, True, True) == qa.answer  # the flag off: the answer alone, as before
        assert len(target.split()) + 1 <= EXISTENCE_NEW_TOKENS
        # the routes are the description's: each digit word (and the word before it) -> that digit's cell
        routes = routing_targets(qa, s, True, True, existence="description")
        assert routes == routing_targets(desc, s, True, True) and routing_targets(qa, s, True, True) == []
        assert all(i < len(target.split()) - 2 for i, _ in routes)
    value = ordered_description(qa, s, "value")  # the rationale follows the describe task's order
    regular = [p for p in value.rationale.split(" , ") if not p.startswith("small")]
    assert [int(p.split()[0]) for p in regular] == sorted(int(p.split()[0]) for p in regular)


def test_lookup_target_is_the_digit_and_its_place():
    """``existence="lookup"``: the asked digit, its place when present (``small`` for the small digit), then the
    answer; the routes send the digit word to its cell, and only when the digit is present."""
    from tokenreduce.data.vqa import POSITION_NAMES

    _, scenes, _ = generate_scenes("train", 60, seed=7)
    rng = np.random.default_rng(2)
    seen = set()
    for i, s in enumerate(scenes):
        (qa,) = questions_for(s, i, rng, ("existence",))
        target = training_target(qa, True, True, existence="lookup")
        digit = int(qa.question.split()[-2])
        assert parse_answer(target.split() + ["</s>"]) == qa.answer and all(w in VOCAB for w in target.split())
        assert len(target.split()) + 1 <= EXISTENCE_LOOKUP_TOKENS
        routes = routing_targets(qa, s, True, True, existence="lookup")
        if qa.answer == "no":
            assert digit not in s.present and target == f"{digit} , no" and routes == []
            seen.add("absent")
            continue
        cell = s.digits.index(digit)
        place = "small" if cell == s.small_cell else POSITION_NAMES[cell]
        assert target == f"{digit} {place} , yes" and routes == [(0, (cell,))]
        seen.add("small" if place == "small" else "regular")
    assert seen == {"absent", "small", "regular"}
    assert lookup_rationale(QA(0, "existence", "is there the digit 3 ?", "yes", "1 top , small 3")) == "3 small"
    with pytest.raises(ValueError, match="accepted"):
        training_target(qa, True, existence="place")


def test_batch_tags_the_lookup_as_existence():
    """A look-up turn is the existence type's own term, every answer token of it (no ``describe`` part)."""
    from tokenreduce.models.vlm.batches import training_batch

    b = training_batch(VLMTrainConfig(**TINY, existence=True, existence_lookup=True), 0, build_tokenizer(),
                       reduce=True)
    ex = LOSS_TYPES.index("existence")
    turns = 0
    for row, lab, ty in zip(*(b[k].tolist() for k in ("input_ids", "labels", "answer_types"))):
        words = [VOCAB[t] for t in row]
        for k, w in enumerate(words):
            if w == ":" and words[k - 6: k - 3] == ["there", "the", "digit"]:
                end = words.index("</s>", k)
                assert words[k + 1] == words[k - 3]  # the answer starts with the asked digit
                assert ty[k + 1: end + 1] == [ex] * (end - k) and -100 not in lab[k + 1: end + 1]
                turns += 1
    assert turns > 0


def test_config_hash_unchanged_when_off():
    """The previous models keep their cache folders; the flag needs ``existence`` and shares its parent."""
    assert VLMTrainConfig().config_hash() == "0e4ba3681b"
    assert VLMTrainConfig(existence=True).config_hash() == "0478aeed2d"
    e = VLMTrainConfig(existence=True, existence_rationale=True)
    assert e.config_hash() not in ("0e4ba3681b", "0478aeed2d")
    assert e.parent() == VLMTrainConfig().parent()
    with pytest.raises(ValueError, match="existence_rationale=True needs existence=True"):
        VLMTrainConfig(existence_rationale=True)
    t = VLMTrainConfig(existence=True, existence_rationale=True, existence_text=8)
    assert t.config_hash() != e.config_hash() and t.parent() == e.parent()
    with pytest.raises(ValueError, match="existence_text=8 needs existence_rationale=True"):
        VLMTrainConfig(existence=True, existence_text=8)
    lk = VLMTrainConfig(existence=True, existence_lookup=True)
    assert lk.config_hash() not in (e.config_hash(), "0478aeed2d") and lk.parent() == e.parent()
    assert (lk.existence_form, e.existence_form, VLMTrainConfig().existence_form) == ("lookup", "description", "answer")
    with pytest.raises(ValueError, match="existence_lookup=True needs existence=True"):
        VLMTrainConfig(existence_lookup=True)
    with pytest.raises(ValueError, match="set at most one"):
        VLMTrainConfig(existence=True, existence_lookup=True, existence_rationale=True)


def test_batch_tags_the_rationale_as_a_description():
    """In a training batch an existence turn's rationale is tagged ``describe`` and only its yes/no and
    ``</s>`` are tagged ``existence``."""
    from tokenreduce.models.vlm.batches import training_batch

    tok = build_tokenizer()
    b = training_batch(VLMTrainConfig(**TINY, existence=True, existence_rationale=True), 0, tok)
    ex = LOSS_TYPES.index("existence")
    ids, types = b["input_ids"], b["answer_types"]
    n_turns = 0
    for row, ty in zip(ids.tolist(), types.tolist()):
        for k, t in enumerate(ty):
            if t == ex and VOCAB[row[k]] in ("yes", "no"):
                n_turns += 1
                assert VOCAB[row[k - 1]] == "," and ty[k - 1] == LOSS_TYPES.index("describe")
                assert ty[k + 1] == ex and VOCAB[row[k + 1]] == "</s>"
    assert n_turns > 0 and int((types == ex).sum()) == 2 * n_turns


class _Scripted:
    """Stands in for ``model.generate``: writes ``words`` after the prompt and records ``max_new_tokens``."""

    def __init__(self, words: str) -> None:
        self.ids = [VOCAB.index(w) for w in words.split()]
        self.calls: list[int] = []

    def __call__(self, input_ids, max_new_tokens, **kw):
        self.calls.append(max_new_tokens)
        new = torch.tensor(self.ids[:max_new_tokens]).expand(input_ids.shape[0], -1)
        return torch.cat([input_ids, new], 1)


@pytest.mark.parametrize("form", ["description", "lookup", "answer"])
def test_evaluation_scores_only_the_final_answer(form):
    """A model with a rationale form is asked by generation long enough for its rationale and scored on the
    word after it; a model without one answers from the prefill logits, as before."""
    torch.manual_seed(0)
    c = VLMTrainConfig(**TINY, existence=True, existence_rationale=form == "description",
                       existence_lookup=form == "lookup")
    model, tok = build_small_vlm(c), build_tokenizer()
    assert model.config.vqa_existence == form
    script = _Scripted("3 top left , 7 center , small 5 , yes </s>" if form != "lookup" else "7 center , yes </s>")
    model.generate = script
    images = torch.zeros(2, 3, 96, 96)
    qas = [QA(0, "existence", "is there the digit 7 ?", "yes"), QA(1, "existence", "is there the digit 2 ?", "no")]
    answers = answer_questions(model, tok, images, qas)
    if form != "answer":
        long = EXISTENCE_NEW_TOKENS if form == "description" else EXISTENCE_LOOKUP_TOKENS
        assert answers == ["yes", "yes"] and script.calls == [long]
    else:
        assert script.calls == [] and len(answers) == 2 and all(a in VOCAB for a in answers)


def test_study_accepts_the_model():
    from tokenreduce.study.hallucination import VLM_MODELS, vlm_config

    assert VLM_MODELS == ("default", "existence", "existence-rationale", "existence-rationale-text", "existence-lookup")
    assert vlm_config("existence-lookup") == VLMTrainConfig(existence=True, existence_lookup=True)
    assert vlm_config("existence-rationale") == VLMTrainConfig(existence=True, existence_rationale=True)
    assert vlm_config("existence").config_hash() == "0478aeed2d"
    with pytest.raises(ValueError, match="accepted: default, existence, existence-rationale"):
        vlm_config("pope")


def test_text_only_existence_turns():
    """existence_text: text-only sequences of existence turns, the description given (not trained), only the
    yes/no and </s> after it trained, the yes/no right for the description it follows."""
    from tokenreduce.models.vlm.batches import training_batch

    c = VLMTrainConfig(**{**TINY, "batch_size": 2}, existence=True, existence_rationale=True, existence_text=3)
    b = training_batch(c, 0, build_tokenizer())
    assert b["input_ids"].shape[0] == 5 and b["pixel_values"].shape[0] == 2
    text = LOSS_TYPES.index("text")
    for ids, lab, ty in zip(*(b[k][2:].tolist() for k in ("input_ids", "labels", "answer_types"))):
        assert VOCAB.index("<image>") not in ids and set(ty) <= {-1, text}
        trained = [VOCAB[t] for t in lab if t != -100]
        assert trained[1::2] == ["</s>"] * c.qa_per_image and set(trained[::2]) <= {"yes", "no"}
        assert sum(k == text for k in ty) == 2 * c.qa_per_image
        words = [VOCAB[t] for t in ids if VOCAB[t] != "<pad>"]
        for turn in " ".join(words).split(" </s>")[:-1]:
            question, target = turn.strip().split(" answer : ")
            *desc, answer = target.split(" , ")
            digits = {p.split()[0] for p in desc}
            assert answer == ("yes" if question.split()[-2] in digits else "no")


@pytest.mark.slow
def test_trained_lookup_model_answers_existence():
    """The cached look-up model (``tokenreduce train vlm --existence --existence-lookup``, ``v3-69587c3f47``;
    measured 0.945 on 200 held-out existence questions, majority 0.53): on 60 held-out questions it is well above
    the majority answer, and its yes/no follows the look-up it wrote (a place word -> ``yes``, none -> ``no``)."""
    from tokenreduce.models.vlm import eval_set, load_small_vlm

    c = VLMTrainConfig(existence=True, existence_lookup=True)
    try:
        model, tok, _ = load_small_vlm(config=c)
    except FileNotFoundError as e:
        pytest.skip(str(e))
    data = eval_set("test", c, per_type=60, types=("existence",))
    qas = data.by_type()["existence"]
    torch.set_num_threads(1)
    batch = encode_prompts(tok, [q.question for q in qas], data.images[[q.scene for q in qas]],
                           model.config.image_seq_length, prompt=prompt_format(model))
    with torch.no_grad():
        gen = model.generate(**batch, max_new_tokens=EXISTENCE_LOOKUP_TOKENS, do_sample=False)
    outs = [[VOCAB[t] for t in row] for row in gen[:, batch["input_ids"].shape[1]:].tolist()]
    answers = [parse_answer(w) for w in outs]
    assert answers == answer_questions(model, tok, data.images, qas)
    assert sum(a == q.answer for a, q in zip(answers, qas)) / len(qas) >= 0.85
    consistent = [("yes" if w[1] != "," else "no") == a for w, a in zip(outs, answers) if a in ("yes", "no")]
    assert len(consistent) >= 55 and sum(consistent) >= 0.95 * len(consistent)
