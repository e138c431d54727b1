"""tr.rho1_loss (selective language modelling, Rho-1): keep=1.0 is the ordinary loss, -100 is never a target,
only the selected tokens get gradients, the reference gets none, errors name the bad value."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import tokenreduce as tr
from tokenreduce.core.loss import rho1_selection, token_cross_entropy


def _batch(b=3, n=17, v=50, seed=0):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(b, n, v, generator=g)
    labels = torch.randint(0, v, (b, n), generator=g)
    labels[0, :6] = -100
    return logits, labels, torch.randn(b, n, v, generator=g)


def _ce(logits, labels):
    return F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1), ignore_index=-100)


def test_keep_one_is_the_ordinary_loss_exactly():
    for seed in range(10):
        logits, labels, ref = _batch(seed=seed)
        assert torch.equal(tr.rho1_loss(logits, labels, ref, keep=1.0), _ce(logits, labels))


def test_keep_one_is_the_hf_causal_lm_loss():
    from tokenreduce.models.lm import LMConfig, build_lm

    torch.manual_seed(0)
    model = build_lm(LMConfig(vocab_size=300, hidden_size=32, num_layers=1, num_heads=2, intermediate_size=64))
    x = torch.randint(0, 300, (2, 12))
    out = model(input_ids=x, labels=x)
    torch.testing.assert_close(tr.rho1_loss(out.logits, x, out.logits.detach() * 0, keep=1.0), out.loss)


def test_selects_the_top_excess_loss_tokens():
    logits, labels, ref = _batch()
    sel = rho1_selection(logits, labels, ref, keep=0.6)
    losses, valid = token_cross_entropy(logits, labels)
    n = int(valid.sum())
    assert int(sel.selected.sum()) == round(0.6 * n)
    ref_losses, _ = token_cross_entropy(ref, labels)
    excess = (losses - ref_losses)[valid]
    threshold = excess.sort(descending=True).values[round(0.6 * n) - 1]
    assert bool((excess[sel.selected[valid]] >= threshold).all())
    torch.testing.assert_close(sel.loss, losses[sel.selected].mean())


def test_ignored_labels_are_never_selected_and_change_nothing():
    logits, labels, ref = _batch()
    sel = rho1_selection(logits, labels, ref, keep=1.0)
    assert not sel.selected[0, :5].any() and sel.selected[0, 5:].all()  # targets labels[0, 1:6] are -100
    logits2 = logits.clone()
    logits2[0, :5] = torch.randn(5, logits.shape[-1])  # the logits predicting ignored labels
    assert torch.equal(tr.rho1_loss(logits2, labels, ref, keep=0.6), tr.rho1_loss(logits, labels, ref, keep=0.6))


def test_only_selected_tokens_get_gradients_and_the_reference_none():
    logits, labels, ref = _batch()
    logits.requires_grad_(True)
    ref.requires_grad_(True)
    sel = rho1_selection(logits, labels, ref, keep=0.5)
    sel.loss.backward()
    has_grad = logits.grad[:, :-1].abs().sum(-1) > 0
    assert torch.equal(has_grad, sel.selected)
    assert not logits.grad[:, -1].any()  # the last position predicts nothing
    assert ref.grad is None


def test_no_valid_label_gives_a_zero_with_gradients():
    logits, labels, ref = _batch()
    logits.requires_grad_(True)
    loss = tr.rho1_loss(logits, torch.full_like(labels, -100), ref)
    loss.backward()
    assert loss.item() == 0.0 and not logits.grad.any()


def test_errors_name_the_bad_value():
    logits, labels, ref = _batch()
    for keep in (0.0, 1.5, -0.1, float("nan")):
        with pytest.raises(ValueError, match=r"keep=.* out of range.*\(0, 1\]"):
            tr.rho1_loss(logits, labels, ref, keep=keep)
    with pytest.raises(TypeError, match="keep=1"):
        tr.rho1_loss(logits, labels, ref, keep=1)
    with pytest.raises(ValueError, match="labels"):
        tr.rho1_loss(logits, labels[:, :-1], ref)
    with pytest.raises(ValueError, match="ref_logits must be"):
        tr.rho1_loss(logits, labels, ref[:2])
    with pytest.raises(ValueError, match="reference model's tokenizer differs.*49.*50"):
        tr.rho1_loss(logits, labels, ref[..., :49])
    with pytest.raises(ValueError, match="seq >= 2"):
        tr.rho1_loss(logits[:, :1], labels[:, :1], ref[:, :1])
