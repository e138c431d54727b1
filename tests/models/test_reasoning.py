"""The reasoning LM: its character tokenizer, TokenSkip's chain compression, the training loop on a tiny
config, checkpoint addresses and the missing-model error."""

from __future__ import annotations

import numpy as np
import pytest

from tokenreduce.data.chains import make_problems
from tokenreduce.models.reasoning import (
    ReasonerConfig,
    TokenSkipConfig,
    build_model,
    build_tokenizer,
    chain_importance,
    checkpoint_dir,
    compress_chain,
    fit,
    gamma_token,
    greedy,
    load_reasoner,
    parse_completion,
    prompt_text,
    tokenskip_data,
    tokenskip_dir,
)
from tokenreduce.models.reasoning.train import problem_batches

TINY = ReasonerConfig(hidden=32, layers=2, heads=2, mlp=64, steps=2, batch_size=8)


def _is_subsequence(short: str, long: str) -> bool:
    it = iter(long)
    return all(c in it for c in short)


def test_tokenizer_is_one_token_per_character_and_roundtrips():
    tok = build_tokenizer()
    text = prompt_text("7+3*2", 0.6) + "7+3=0;0*2=0;#0"
    enc = tok(text, add_special_tokens=False, return_offsets_mapping=True)
    assert len(enc["input_ids"]) == len(text) - len("<g60>") + 1
    assert tok.convert_ids_to_tokens(enc["input_ids"][6]) == "<g60>" and enc["offset_mapping"][6] == (6, 11)
    assert tok.decode(enc["input_ids"]) == text and tok.is_fast
    assert gamma_token(1.0) == "<g100>" and gamma_token(0.4) == "<g40>"
    with pytest.raises(ValueError, match="gamma=0.45 has no control token"):
        gamma_token(0.45)
    assert parse_completion("1+2=3;#3") == ("1+2=3;", "3") and parse_completion("1+2=3;") == ("1+2=3;", None)


@pytest.mark.parametrize("gamma", [1.0, 0.8, 0.6, 0.4, 0.1])
def test_compression_respects_ratio_and_order(gamma):
    rng = np.random.default_rng(0)
    for p in make_problems("train", 20, seed=5):
        chain = p.chain
        out = compress_chain(chain, rng.random(len(chain)), gamma)
        assert len(out) == max(1, round(gamma * len(chain)))
        assert _is_subsequence(out, chain)
    assert compress_chain("1+2=3;", np.arange(6.0), 0.5) == "=3;"  # the highest scores, in order
    with pytest.raises(ValueError, match="gamma=0 is out of range"):
        compress_chain("1+2=3;", np.zeros(6), 0)


def test_tokenskip_data_never_drops_the_answer_and_puts_gamma_in_the_prompt():
    base = build_model(TINY, seed=0)
    cfg = TokenSkipConfig(base=TINY, n_problems=24)
    prompts, completions, gammas = tokenskip_data(base, cfg)
    problems = make_problems("train", 24, 1000 + cfg.seed, TINY.task)
    assert set(gammas) <= set(cfg.gammas) and len(set(gammas)) > 1
    for prompt, comp, g, p in zip(prompts, completions, gammas, problems):
        assert prompt == p.question + "?" + gamma_token(g)
        chain, answer = parse_completion(comp)
        assert comp.endswith("#" + p.answer) and answer == p.answer
        assert len(chain) == max(1, round(g * len(p.chain))) and _is_subsequence(chain, p.chain)
    assert (prompts, completions) == tokenskip_data(base, cfg)[:2]  # deterministic


def test_importance_is_one_score_per_chain_token():
    base = build_model(TINY, seed=0)
    problems = make_problems("val", 5)
    si = chain_importance(base, problems)
    assert [len(s) for s in si] == [len(p.chain) for p in problems]
    assert all(np.isfinite(s).all() and (s >= 0).all() for s in si)
    r = chain_importance(base, problems, "random", seed=3)
    assert all(np.array_equal(a, b) for a, b in zip(r, chain_importance(base, problems, "random", seed=3)))
    with pytest.raises(ValueError, match="criterion='entropy'"):
        chain_importance(base, problems, "entropy")


def test_forced_characters_survive_every_ratio_within_its_budget():
    """TokenSkip's force_tokens: the step markers are kept first, the rest of the budget by score, in order."""
    from tokenreduce.models.reasoning.compress import compressed_chains

    base = build_model(TINY, seed=0)
    problems = make_problems("val", 6)
    for gamma in (0.8, 0.6, 0.4):
        plain = compressed_chains(base, problems, [gamma] * 6)
        forced = compressed_chains(base, problems, [gamma] * 6, force_keep=";=")
        for p, a, b in zip(problems, plain, forced):
            assert len(a) == len(b) == max(1, round(gamma * len(p.chain))) and _is_subsequence(b, p.chain)
            n_marks = sum(c in ";=" for c in p.chain)
            assert sum(c in ";=" for c in b) == min(n_marks, len(b))
    assert TokenSkipConfig(force_keep="").config_hash() == TokenSkipConfig().config_hash()
    assert TokenSkipConfig(force_keep=";=").config_hash() != TokenSkipConfig().config_hash()
    assert TokenSkipConfig(lr=1e-4).config_hash() != TokenSkipConfig().config_hash()


def test_training_a_tiny_model_lowers_the_loss_and_it_generates():
    model = build_model(TINY, seed=0)
    problems = make_problems("train", 16, seed=0, config=TINY.task)
    hist = fit(model, problem_batches(problems, 16, True), 40, 1e-2, 0.1, 0.5, progress=False, log_every=10)
    assert hist[-1]["loss"] < 0.8 * hist[0]["loss"]
    assert not model.training
    out = greedy(model, [prompt_text(problems[0].question), prompt_text(problems[1].question)], 10)
    assert len(out) == 2 and all(1 <= len(o) <= 10 for o in out)


def test_checkpoint_addresses_and_the_missing_model_error(tmp_path, monkeypatch):
    monkeypatch.setenv("TOKENREDUCE_CACHE", str(tmp_path))
    assert ReasonerConfig().config_hash() == ReasonerConfig(num_threads=2).config_hash()
    assert ReasonerConfig().config_hash() != ReasonerConfig(chain=False).config_hash()
    assert TokenSkipConfig().config_hash() != TokenSkipConfig(base=ReasonerConfig(steps=7)).config_hash()
    assert checkpoint_dir().parent == tokenskip_dir().parent == tmp_path / "reasoner"
    assert ReasonerConfig.from_dict(TINY.to_dict()) == TINY
    with pytest.raises(FileNotFoundError, match="tokenreduce train reasoner --no-chain"):
        load_reasoner(ReasonerConfig(chain=False))
    with pytest.raises(ValueError, match="needs chain=True"):
        TokenSkipConfig(base=ReasonerConfig(chain=False))
    with pytest.raises(ValueError, match="max_positions=40 is too short"):
        ReasonerConfig(max_positions=40)


def test_kept_by_role_shares_follow_the_ratio():
    from tokenreduce.models.reasoning.compress import kept_by_role

    base = build_model(TINY, seed=0)
    shares = kept_by_role(base, make_problems("val", 6), (1.0, 0.5), "random", seed=0)
    assert shares["1"] == {"restated": 1.0, "result": 1.0, "syntax": 1.0}
    assert 0.3 < np.mean(list(shares["0.5"].values())) < 0.7
