"""The rho1 study's parts: the mixed-quality stream, the cloze items, the loss it trains with, spike flags."""

from __future__ import annotations

import pytest
import torch

from tokenreduce.models.lm import train_tokenizer
from tokenreduce.study.rho1_run import SelectiveLoss, cloze_items, mixed_stream
from tokenreduce.study.stats import spike_flags

DOCS = [("The river flows slowly through the old town. Many people walk along its banks in the evening.\n"
         "In winter the water freezes and children skate on the thick ice near the bridge."),
        ("The library holds thousands of books about history. Scholars come from far away to read the rare maps.\n"
         "A new wing was added to the building in the last century to store the growing collection.")]


@pytest.fixture(scope="module")
def tok():
    return train_tokenizer(DOCS * 3, 300)


def test_mixed_stream_has_the_junk_fraction_asked(tok):
    ids, junk = mixed_stream(tok, DOCS, 0.5, 0.5, seed=1)
    assert ids.shape == junk.shape and junk.dtype == torch.bool
    assert 0.45 < junk.float().mean().item() < 0.8  # at least half, up to one junk piece over
    again = mixed_stream(tok, DOCS, 0.5, 0.5, seed=1)
    assert torch.equal(ids, again[0]) and not torch.equal(ids, mixed_stream(tok, DOCS, 0.5, 0.5, seed=2)[0])
    clean, none = mixed_stream(tok, DOCS, 0.0, 0.5, seed=1)
    assert not none.any() and (clean == tok.eos_token_id).sum() == 4  # the four paragraphs
    with pytest.raises(ValueError, match="junk_fraction=1.0"):
        mixed_stream(tok, DOCS, 1.0, 0.5, seed=0)


def test_cloze_items_are_fixed_and_fair(tok):
    items = cloze_items(tok, DOCS, 10, 3, seed=0)
    assert items == cloze_items(tok, DOCS, 10, 3, seed=0) and items
    for it in items:
        assert it["answer"] in it["options"] and len(set(it["options"])) == 3
        assert len({len(tok(" " + o).input_ids) for o in it["options"]}) == 1  # same token count


def test_selective_loss_reports_the_junk_it_selects(tok):
    from tokenreduce.models.lm import LMConfig, build_lm

    torch.manual_seed(0)
    cfg = LMConfig(vocab_size=300, hidden_size=32, num_layers=1, num_heads=2, intermediate_size=64, seq_len=16)
    model, ref = build_lm(cfg, vocab_size=len(tok)), build_lm(cfg, vocab_size=len(tok))
    x = torch.randint(0, len(tok), (2, 16))
    batch = {"input_ids": x, "labels": x, "junk": torch.arange(16).expand(2, 16) >= 8}
    full, extras = SelectiveLoss()(model, batch)
    assert extras["selected_junk"] == pytest.approx(8 / 15) and full.item() == pytest.approx(extras["loss_all"])
    _, e2 = SelectiveLoss(ref, 0.6)(model, batch)
    assert e2["loss_all"] == pytest.approx(extras["loss_all"]) and 0 <= e2["selected_junk"] <= 1


def test_spike_flags():
    assert spike_flags([1, 1, 1, 3, 1, 1], 3, 2.0) == [True, False, False]
    assert spike_flags([1, 2], 3, 2.0) == []
    assert spike_flags([1, 1, float("nan")], 2, 2.0) == [True]
    with pytest.raises(ValueError, match="window"):
        spike_flags([1, 2, 3], 0, 2.0)
