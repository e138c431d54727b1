"""TRIM (question-aware reduction before the LLM): its score, selection and aggregate token as pure tensor
functions, and through ``tr.apply`` on a tiny random-weight LLaVA: the kept tokens depend on the question
each image is asked with. The invariants every VLM method meets (identity, batch, beams, positions) are in
``test_vlm.py``."""

from __future__ import annotations

import pytest
import torch

import tokenreduce as tr
from tests.methods.test_vlm import NTOK, _batch, _gen, _model, _prompt
from tokenreduce.core.criteria import question_similarity
from tokenreduce.methods.vlm import Trim


def test_score_is_softmax_of_cosine_to_the_pooled_question():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 6, 8, generator=g)
    text = torch.randn(2, 3, 8, generator=g)
    mask = torch.tensor([[True, True, False], [True, False, False]])
    s = question_similarity(x, text, mask)
    t = torch.stack([text[0, :2].mean(0), text[1, 0]])
    ref = torch.cosine_similarity(x, t[:, None], dim=-1).softmax(-1)
    torch.testing.assert_close(s, ref)
    smax = question_similarity(x, text, mask, pool="max")
    ref_max = torch.stack([torch.cosine_similarity(x[0, :, None], text[0, None, :2], dim=-1).amax(-1),
                           torch.cosine_similarity(x[1], text[1, :1], dim=-1)]).softmax(-1)
    torch.testing.assert_close(smax, ref_max)
    empty = question_similarity(x, text, torch.zeros_like(mask))  # no text: every token alike
    torch.testing.assert_close(empty, torch.full_like(empty, 1 / 6))
    with pytest.raises(ValueError, match="pool='sum' is invalid"):
        question_similarity(x, text, mask, pool="sum")


def test_keeps_the_tokens_like_the_question_and_averages_the_rest():
    """The tokens that point along the question's word survive (in patch order); the last token is the mean
    of the others, with their count as its size."""
    word = torch.tensor([1.0, 0, 0, 0])
    x = torch.tensor([[[0, 1.0, 0, 0], [0.9, 0.1, 0, 0], [0, 0, 1.0, 0], [1.0, 0, 0.1, 0], [0, 0, 0, 1.0],
                       [0, 0.5, 0.5, 0]]])
    q = (word[None, None], torch.ones(1, 1, dtype=torch.bool))
    out, src, size = Trim(keep=0.5).reduce_image(x, {"question": q})
    assert src.tolist() == [[1, 3, -1]] and size.tolist() == [[1, 1, 4]]
    torch.testing.assert_close(out[0, :2], x[0, [1, 3]])
    torch.testing.assert_close(out[0, 2], x[0, [0, 2, 4, 5]].mean(0))
    out, src, size = Trim(keep=0.5, aggregate=False).reduce_image(x, {"question": q})
    assert src.tolist() == [[0, 1, 3]]  # the third: a tie at cos 0 among 0, 2, 4, 5 -> the lower index
    assert size.tolist() == [[1, 1, 1]] and out.shape == (1, 3, 4)


def test_errors_name_the_value():
    with pytest.raises(ValueError, match="pool='best' is invalid"):
        Trim(keep=0.5, pool="best")
    with pytest.raises(ValueError, match="aggregate token has no patch"):
        Trim(keep=0.5, positions="keep")
    with pytest.raises(RuntimeError, match="needs the prompt's text"):
        Trim(keep=0.5).reduce_image(torch.zeros(1, 4, 2), {})
    Trim(keep=0.5, positions="keep", aggregate=False)  # fine: pure selection


def test_registered_with_its_paper():
    (row,) = [r for r in tr.methods("vlm-visual") if r["name"] == "trim"]
    assert "TRIM" in row["paper"] and "softmax" in row["equation"]


def test_the_question_decides_what_is_kept():
    """One image asked two different questions in one batch: the kept patches differ between the rows (and
    each row equals the same prompt alone: batch consistency)."""
    torch.manual_seed(0)
    model = _model()
    a, b = _prompt(1, 3, 6, 11), _prompt(1, 3, 6, 12)
    batch = _batch([a, b], [1, 1])
    batch["pixel_values"] = batch["pixel_values"][:1].expand(2, -1, -1, -1).clone()  # the same image twice
    with tr.apply(model, "trim", keep=0.5, aggregate=False) as h:
        out = _gen(model, batch)
        kept = h.stats.kept_patches
        assert kept[0] != kept[1] and all(len(k[0]) == NTOK // 2 for k in kept)
        alone = _gen(model, {k: v[1:] for k, v in batch.items()})
    assert alone.sequences[0, -4:].tolist() == out.sequences[1, -4:].tolist()
