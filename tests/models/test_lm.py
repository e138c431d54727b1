"""The small decoder LM (tokenreduce.models.lm): the generic training loop on a tiny random-weight Llama (loss
decreases, a pluggable loss such as Rho-1's trains too), the BPE tokenizer, the evaluation helpers, the config's
errors; the corpus splits; slow: the cached LM's held-out perplexity."""

from __future__ import annotations

import math

import pytest
import torch

import tokenreduce as tr
from tokenreduce.models.lm import (
    LMConfig,
    OptimConfig,
    build_lm,
    continuation_logprobs,
    encode_documents,
    eval_windows,
    random_window_batches,
    same_tokenizer,
    train_causal_lm,
    train_tokenizer,
    window_nll,
)

TEXTS = ["The cat sat on the mat. The dog sat on the log. A bird sat on the tree.",
         "Rivers flow to the sea, and the sea gives rain to the rivers again.",
         "The cat and the dog sat together on the mat by the log near the tree."] * 3
TINY = LMConfig(vocab_size=300, hidden_size=32, num_layers=2, num_heads=2, intermediate_size=64, seq_len=16,
                steps=1, batch_size=8)


@pytest.fixture(scope="module")
def tok():
    return train_tokenizer(TEXTS, 300)


def _model(tok):
    torch.manual_seed(0)
    return build_lm(TINY, vocab_size=len(tok))


def test_tokenizer_roundtrips_and_compares(tok):
    ids = tok("The cat sat on the mat.").input_ids
    assert tok.decode(ids) == "The cat sat on the mat." and max(ids) < len(tok) <= 300
    assert tok.eos_token_id == 0 and tok.decode([0]) == "<|endoftext|>"
    assert same_tokenizer(tok, train_tokenizer(TEXTS, 300)) and not same_tokenizer(tok, train_tokenizer(TEXTS, 280))


def test_training_loop_lowers_the_loss(tok):
    ids = encode_documents(tok, TEXTS)
    model = _model(tok)
    log = train_causal_lm(model, random_window_batches(ids, 8, 16, seed=0), 40, OptimConfig(lr=1e-2))
    assert len(log.loss) == len(log.grad_norm) == len(log.lr) == 40 and log.tokens == 40 * 8 * 16
    assert sum(log.loss[-5:]) / 5 < 0.7 * sum(log.loss[:5]) / 5
    assert all(math.isfinite(g) and g > 0 for g in log.grad_norm)


def test_pluggable_loss_rho1_trains_and_logs_extras(tok):
    ids = encode_documents(tok, TEXTS)
    ref, model = _model(tok).eval(), _model(tok)
    seen = []

    def rho1(m, batch):
        with torch.no_grad():
            ref_logits = ref(input_ids=batch["input_ids"]).logits
        loss = tr.rho1_loss(m(input_ids=batch["input_ids"]).logits, batch["labels"], ref_logits, keep=0.6)
        seen.append(batch["marker"].shape)
        return loss, {"twice": 2 * loss.item()}

    before = {k: v.clone() for k, v in ref.state_dict().items()}
    batches = random_window_batches(ids, 8, 16, seed=0, extra={"marker": torch.arange(ids.numel())})
    log = train_causal_lm(model, batches, 30, OptimConfig(lr=1e-2), loss_fn=rho1,
                          evaluate=lambda: {"nll": window_nll(model, eval_windows(ids, 16)).mean().item()},
                          eval_every=10)
    assert seen[0] == (8, 16) and log.extras["twice"] == pytest.approx([2 * x for x in log.loss])
    assert [s for s, _ in log.evals] == [10, 20, 30] and log.evals[-1][1]["nll"] < log.loss[0]
    assert sum(log.loss[-5:]) < sum(log.loss[:5])
    assert all(torch.equal(v, ref.state_dict()[k]) for k, v in before.items())  # the reference is untouched


def test_batches_are_seeded_windows(tok):
    ids = torch.arange(100)
    a, b = next(random_window_batches(ids, 4, 10, seed=3)), next(random_window_batches(ids, 4, 10, seed=3))
    assert torch.equal(a["input_ids"], b["input_ids"]) and torch.equal(a["labels"], a["input_ids"])
    assert bool(((a["input_ids"][:, 1:] - a["input_ids"][:, :-1]) == 1).all())  # contiguous windows
    assert eval_windows(ids, 10).shape == (10, 10) and eval_windows(ids, 10, 3)[:, 0].tolist() == [0, 40, 90]
    with pytest.raises(ValueError, match="fewer than seq_len"):
        next(random_window_batches(ids[:5], 2, 10, seed=0))


def test_continuation_logprobs_match_a_manual_sum(tok):
    model = _model(tok).eval()
    got = continuation_logprobs(model, tok, ["The cat sat on the", "Rivers flow"], [" mat", " to the sea"])
    for prefix, cont, lp in zip(["The cat sat on the", "Rivers flow"], [" mat", " to the sea"], got):
        a, b = [0] + tok(prefix).input_ids, tok(cont).input_ids
        with torch.no_grad():
            logp = model(input_ids=torch.tensor([a + b])).logits.log_softmax(-1)[0]
        want = sum(logp[len(a) - 1 + i, t].item() for i, t in enumerate(b))
        assert lp == pytest.approx(want, abs=1e-4)


def test_config_errors_name_the_field():
    with pytest.raises(ValueError, match="num_heads=5 must divide hidden_size=192"):
        LMConfig(num_heads=5)
    with pytest.raises(ValueError, match="steps=0 is invalid"):
        LMConfig(steps=0)
    with pytest.raises(ValueError, match="lr=0.0 is out of range"):
        OptimConfig(lr=0.0)
    assert LMConfig.from_dict(LMConfig().to_dict()) == LMConfig()
    assert LMConfig(num_threads=2).config_hash() == LMConfig().config_hash() != LMConfig(steps=10).config_hash()


def test_corpus_splits_are_disjoint_articles():
    from tokenreduce.data.wiki import split_articles, wiki_articles
    from tokenreduce.models.lm import SPLITS

    arts = wiki_articles()
    parts = split_articles(arts, SPLITS)
    titles = [a.title for p in parts.values() for a in p]
    assert len(titles) == len(set(titles)) == len(arts)
    chars = {k: sum(len(a.text) for a in v) for k, v in parts.items()}
    total = sum(chars.values())
    assert total > 2_000_000
    for k, f in SPLITS.items():
        assert abs(chars[k] / total - f) < 0.05, (k, chars[k] / total)
    assert all("[[" not in p and "'''" not in p for a in arts for p in a.paragraphs)


@pytest.mark.slow
def test_cached_small_lm_has_its_measured_perplexity():
    from tokenreduce.models.lm import corpus_splits, load_small_lm, perplexity

    model, tok, info = load_small_lm()
    test = eval_windows(encode_documents(tok, corpus_splits()["test"]), info["config"].seq_len)
    ppl = perplexity(model, test)
    assert ppl == pytest.approx(info["metrics"]["test_ppl"], rel=1e-4) and ppl < 200
