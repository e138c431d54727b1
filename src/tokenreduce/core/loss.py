"""Token selection in the training loss: selective language modelling (Rho-1; Lin et al., NeurIPS 2024, "Not All
Tokens Are What You Need for Pretraining").

Token reduction at the loss: every token is still in the forward pass, but only the tokens a reference model
marks as worth learning are back-propagated. Pure tensor functions, usable in any training loop.

**Shift convention** (Hugging Face causal LMs): ``labels`` are aligned with the *inputs*, as in
``model(input_ids, labels=input_ids)``; position ``t`` of ``logits`` predicts ``labels[:, t + 1]``, so the
functions drop the last logit and the first label themselves. Label ``-100`` marks a position that is never
a target (padding, prompt).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .budget import validate_fraction

__all__ = ["IGNORE_INDEX", "Rho1Selection", "rho1_loss", "rho1_selection", "token_cross_entropy"]

#: the label of a position that is not a target (PyTorch's and Hugging Face's ``ignore_index``)
IGNORE_INDEX = -100


def _check_logits_labels(logits: torch.Tensor, labels: torch.Tensor, name: str = "logits") -> None:
    if logits.ndim != 3 or labels.ndim != 2 or tuple(logits.shape[:2]) != tuple(labels.shape):
        raise ValueError(f"{name} must be (batch, seq, vocab) and labels (batch, seq) with the same batch and seq; "
                         f"got {name} {tuple(logits.shape)} and labels {tuple(labels.shape)}")
    if labels.shape[1] < 2:
        raise ValueError(f"a causal-LM loss needs seq >= 2 (position t predicts label t+1), got seq={labels.shape[1]}")


def token_cross_entropy(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token cross-entropy of a causal LM, HF shift convention (module docstring).

    Returns ``(losses, valid)``, both ``(batch, seq - 1)``: ``losses[b, t] = -log softmax(logits[b, t])[labels[b,
    t + 1]]`` (0 where ``valid`` is False, i.e. the label is -100). Computed in float32 whatever the logits' dtype.
    """
    _check_logits_labels(logits, labels)
    targets = labels[:, 1:]
    flat = logits[:, :-1].reshape(-1, logits.shape[-1]).float()
    losses = F.cross_entropy(flat, targets.reshape(-1), ignore_index=IGNORE_INDEX, reduction="none")
    return losses.view(targets.shape), targets != IGNORE_INDEX


@dataclass
class Rho1Selection:
    """What :func:`rho1_selection` computed: ``loss`` (the scalar to back-propagate), ``selected`` (bool
    ``(batch, seq - 1)``: the targets that entered it), ``excess`` (``L_theta - L_ref`` per target, detached;
    ``-inf`` at ignored labels), ``token_loss`` (``L_theta`` per target, detached; 0 at ignored labels)."""

    loss: torch.Tensor
    selected: torch.Tensor
    excess: torch.Tensor
    token_loss: torch.Tensor


def rho1_selection(logits: torch.Tensor, labels: torch.Tensor, ref_logits: torch.Tensor,
                   keep: float = 0.6) -> Rho1Selection:
    """Selective language modelling with the details (:class:`Rho1Selection`); :func:`rho1_loss` is its ``loss``.

    See :func:`rho1_loss` for the equation, the arguments and the errors.
    """
    keep = validate_fraction(keep)
    _check_logits_labels(logits, labels)
    if ref_logits.ndim != 3 or tuple(ref_logits.shape[:2]) != tuple(logits.shape[:2]):
        raise ValueError(f"ref_logits must be (batch, seq, vocab) like logits; got ref_logits "
                         f"{tuple(ref_logits.shape)} and logits {tuple(logits.shape)}")
    if ref_logits.shape[-1] != logits.shape[-1]:
        raise ValueError(f"the reference model's tokenizer differs from the trained model's: ref_logits have a "
                         f"vocabulary of {ref_logits.shape[-1]}, logits of {logits.shape[-1]} (train the reference "
                         f"with the trained model's tokenizer)")
    losses, valid = token_cross_entropy(logits, labels)
    with torch.no_grad():
        ref_losses, _ = token_cross_entropy(ref_logits.detach(), labels)
        excess = (losses.detach() - ref_losses).masked_fill(~valid, float("-inf"))
        n_valid = int(valid.sum())
        k = min(n_valid, max(1, round(keep * n_valid)))
        selected = torch.zeros_like(valid)
        if n_valid:
            top = torch.topk(excess.reshape(-1), k).indices
            selected.view(-1)[top] = True
    if not n_valid:  # nothing to learn: a zero that keeps the graph (backward gives zero gradients)
        loss = logits.sum() * 0.0
    elif k == n_valid:  # every token: the ordinary loss, bit for bit (same reduction as F.cross_entropy)
        loss = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]).float(), labels[:, 1:].reshape(-1),
                               ignore_index=IGNORE_INDEX)
    else:
        loss = (losses * selected).sum() / k
    return Rho1Selection(loss, selected, excess, losses.detach())


def rho1_loss(logits: torch.Tensor, labels: torch.Tensor, ref_logits: torch.Tensor, keep: float = 0.6) -> torch.Tensor:
    """Selective language modelling loss (Rho-1; Lin et al., NeurIPS 2024, Eq. 3-4).

    A reference model, trained on clean, high-quality text, scores every target token ``x_i`` of the batch by
    its *excess loss* ``S(x_i) = L_theta(x_i) - L_ref(x_i)`` (high: the trained model has yet to learn a token
    the reference finds predictable); only the top ``keep`` fraction of the batch's valid tokens by ``S`` is
    back-propagated::

        L_SLM(theta) = 1 / (keep * N) * sum_i I_keep(x_i) * L_theta(x_i),   L_theta(x_i) = -log P_theta(x_i | x_<i)

    with ``N`` the batch's valid target tokens (labels != -100) and ``I_keep(x_i) = 1`` for the
    ``round(keep * N)`` tokens of largest ``S`` (at least one). ``keep=1.0`` is exactly the ordinary mean
    cross-entropy (the ``loss`` of a Hugging Face causal LM). The paper keeps 60-70% of the tokens.

    Args:
        logits: ``(batch, seq, vocab)`` of the model being trained (gradients flow to them).
        labels: ``(batch, seq)`` token ids aligned with the inputs (HF causal-LM convention: the function
            shifts, ``logits[:, t]`` predicts ``labels[:, t + 1]``); ``-100`` is never a target.
        ref_logits: ``(batch, seq, vocab)`` of the reference model on the same inputs (detached: no gradient
            reaches them or the reference).
        keep: the fraction of valid tokens back-propagated, a float in (0, 1].

    Returns:
        The scalar loss: the mean cross-entropy over the selected tokens (a zero with gradients when no label
        is valid).

    Raises:
        ValueError: ``keep`` outside (0, 1], shapes that do not match, or a reference vocabulary of another size
            ("the reference model's tokenizer differs").
        TypeError: ``keep`` not a float (e.g. the int ``1``; write ``1.0``).
    """
    return rho1_selection(logits, labels, ref_logits, keep).loss
