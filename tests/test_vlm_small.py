"""Slow tests on the trained small VLM (needs ~/.cache/tokenreduce/small_vlm; `tokenreduce train vlm`).

Run with ``pytest -m slow tests/test_vlm_small.py``.
"""

from __future__ import annotations

import pytest
import torch

import tokenreduce as tr

pytestmark = pytest.mark.slow

METHODS = [r["name"] for r in tr.methods("vlm-visual")]


@pytest.fixture(scope="module")
def vlm():
    from tokenreduce.models.small_vlm import eval_set, load_small_vlm

    try:
        model, tok, info = load_small_vlm()
    except FileNotFoundError as e:
        pytest.skip(str(e))
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield model, tok, info, eval_set("test", info["config"], per_type=20)
    torch.set_num_threads(n)


def test_trained_accuracy_is_clearly_above_chance(vlm):
    _, _, info, _ = vlm
    m = info["metrics"]
    for t, acc in m["test_acc_by_type"].items():
        assert acc > m["chance_by_type"][t] + 0.05, (t, acc, m["chance_by_type"][t])


def test_reported_accuracy_reproduces(vlm):
    from tokenreduce.models.small_vlm import evaluate_vqa

    model, tok, info, data = vlm
    r = evaluate_vqa(model, tok, data, generate=True)
    assert r["acc"] > sum(info["metrics"]["chance_by_type"].values()) / 5 + 0.05


@pytest.mark.parametrize("name", [n for n in METHODS if n != "todre"])
def test_identity_on_trained_model(vlm, name):
    from tokenreduce.models.small_vlm import answer_questions

    model, tok, _, data = vlm
    qas = data.qas[:16]
    ref = answer_questions(model, tok, data.images, qas, batch_size=8, generate=True)
    with tr.apply(model, name, keep=1.0):
        out = answer_questions(model, tok, data.images, qas, batch_size=8, generate=True)
    assert out == ref


@pytest.mark.parametrize("name", METHODS)
def test_reduction_keeps_most_answers_and_shrinks_cache(vlm, name):
    from tokenreduce.models.small_vlm import answer_questions, encode_prompts

    model, tok, _, data = vlm
    qas = data.qas[:40]
    ref = answer_questions(model, tok, data.images, qas, batch_size=20, generate=True)
    with tr.apply(model, name, keep=0.5) as h:
        out = answer_questions(model, tok, data.images, qas, batch_size=20, generate=True)
        batch = encode_prompts(tok, [q.question for q in qas[:4]], data.images[[q.scene for q in qas[:4]]])
        with torch.no_grad():
            model(**batch, use_cache=True)
        kv = h.stats.kv_bytes
    with torch.no_grad():
        cache = model(**batch, use_cache=True).past_key_values
        full_kv = sum(l.keys.numel() * l.keys.element_size() * 2 for l in cache.layers)
    agree = sum(a == b for a, b in zip(out, ref)) / len(ref)
    assert agree >= 0.5, (name, agree)
    assert kv < full_kv


def test_batch_equals_single_on_trained_model(vlm):
    from tokenreduce.models.small_vlm import answer_questions

    model, tok, _, data = vlm
    qas = data.qas[:6]
    with tr.apply(model, "fastv", keep=0.25):
        batched = answer_questions(model, tok, data.images, qas, batch_size=6, generate=True)
        single = [answer_questions(model, tok, data.images, [q], batch_size=1, generate=True)[0] for q in qas]
    assert batched == single
