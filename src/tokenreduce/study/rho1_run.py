"""What the ``rho1`` study runs: the mixed-quality stream, the reference model, one continued-training run per
cell, and the evaluations (held-out perplexity per window, the cloze probe per sentence).

The **mixed stream** (:func:`mixed_stream`): every paragraph of the LM corpus's ``stream`` split (real, unseen by
the base LM) plus junk of as many tokens as ``junk_fraction`` asks for (:mod:`tokenreduce.data.junk`: half
shuffled-word copies of the split's paragraphs, half templated boilerplate by default), pieces in random order,
joined by the end-of-text token; a per-token ``junk`` mask is kept for diagnostics only (no loss sees it).

The **reference** (:func:`reference_model`): the base LM trained further on the ``clean`` split (Rho-1 trains its
reference on a high-quality set), cached beside the base LM's checkpoint.

The **cloze probe** (:func:`cloze_items`): held-out sentences of the ``test`` split, the last word to pick among
itself and ``cloze_choices - 1`` sentence-final words of the same split with as many tokens, drawn with a fixed
seed before any model is run; a model is right when the true word has the highest ``log P(word | sentence)``.
"""

from __future__ import annotations

import copy
import json
import random
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from ..models.lm import Batch, LMConfig, OptimConfig

__all__ = ["Rho1Config", "Rho1Context", "SelectiveLoss", "cloze_items", "load_rho1_context", "mixed_stream",
           "reference_model", "run_rho1_cell"]


@dataclass
class Rho1Config:
    """Defaults: the full run (3 seeds x 150 steps of 16 x 128 tokens per condition, about 12 min of one CPU
    thread). ``model``: ``small_lm`` (the cached LM) or ``tiny`` (random weights: ``--smoke``); ``max_docs``
    caps the documents per split, ``max_windows`` the held-out windows, evenly spaced (0: all)."""

    keep: float = 0.6
    seeds: tuple[int, ...] = (0, 1, 2)
    steps: int = 150
    batch_size: int = 16
    lr: float = 5e-4
    junk_fraction: float = 0.5
    shuffled_share: float = 0.5
    ref_steps: int = 100
    ref_lr: float = 5e-4
    ref_seed: int = 0
    cloze_items: int = 400
    cloze_choices: int = 5
    eval_seed: int = 0
    spike_window: int = 20
    grad_spike: float = 2.0
    loss_spike: float = 1.25
    spike_margin: float = 0.02
    max_docs: int = 0
    max_windows: int = 320
    model: str = "small_lm"
    threads: int = 1


#: the smoke model: random weights, a BPE of 300 trained on a few documents
TINY = LMConfig(vocab_size=300, hidden_size=32, num_layers=2, num_heads=2, intermediate_size=64, seq_len=32,
                steps=1, batch_size=4)
_WORD = re.compile(r"^[a-z]{3,}$")


def mixed_stream(tokenizer: Any, docs: Sequence[str], junk_fraction: float, shuffled_share: float,
                 seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(ids, junk)``: 1-D token ids of the real paragraphs of ``docs`` and generated junk in random order, and
    the bool mask of the junk tokens (each piece's closing end-of-text token belongs to the piece)."""
    from ..data.junk import shuffled_words, templated_junk

    if not 0.0 <= junk_fraction < 1.0 or not 0.0 <= shuffled_share <= 1.0:
        raise ValueError(f"junk_fraction={junk_fraction!r} must be in [0, 1) and shuffled_share={shuffled_share!r} "
                         f"in [0, 1]")
    rng = random.Random(seed)
    paras = [p for d in docs for p in d.split("\n") if p.strip()]
    pieces = [(p, False) for p in paras]
    real = sum(len(x) for x in tokenizer(paras).input_ids)
    target = real * junk_fraction / (1.0 - junk_fraction)
    junk = 0
    while junk < target:
        text = (shuffled_words(rng.choice(paras), rng) if rng.random() < shuffled_share
                else templated_junk(rng, rng.randint(150, 900)))
        pieces.append((text, True))
        junk += len(tokenizer(text).input_ids)
    rng.shuffle(pieces)
    eot = tokenizer.eos_token_id
    ids: list[int] = []
    mask: list[bool] = []
    for toks, (_, is_junk) in zip(tokenizer([t for t, _ in pieces]).input_ids, pieces):
        ids += toks + [eot]
        mask += [is_junk] * (len(toks) + 1)
    return torch.tensor(ids, dtype=torch.long), torch.tensor(mask)


def cloze_items(tokenizer: Any, docs: Sequence[str], n: int, choices: int, seed: int) -> list[dict[str, Any]]:
    """Up to ``n`` multiple-choice items ``{"item", "prefix", "answer", "options"}`` from the sentences of
    ``docs`` (8-40 words ending in a lowercase word of 3+ letters and a period); the distractors are other
    sentence-final words of ``docs`` with the answer's token count (the options shuffled, seeded)."""
    rng = random.Random(seed)
    sents = []
    for d in docs:
        for s in re.split(r"(?<=[.!?])\s+", d.replace("\n", " ")):
            words = s.split()
            if 8 <= len(words) <= 40 and words[-1].endswith(".") and _WORD.match(words[-1][:-1]):
                sents.append((" ".join(words[:-1]), words[-1][:-1]))
    length = {w: len(tokenizer(" " + w).input_ids) for w in {w for _, w in sents}}
    by_len: dict[int, list[str]] = {}
    for w, k in sorted(length.items()):
        by_len.setdefault(k, []).append(w)
    rng.shuffle(sents)
    items = []
    for prefix, word in sents:
        pool = [w for w in by_len[length[word]] if w != word]
        if len(pool) < choices - 1:
            continue
        options = [word, *rng.sample(pool, choices - 1)]
        rng.shuffle(options)
        items.append({"item": len(items), "prefix": prefix, "answer": word, "options": options})
        if len(items) == n:
            break
    return items


@dataclass
class SelectiveLoss:
    """The training loss of a run: the ordinary mean cross-entropy (``reference`` None) or Rho-1's
    :func:`~tokenreduce.core.loss.rho1_selection` at ``keep`` with the reference's logits. Returns the loss and
    per-step diagnostics: ``loss_all`` (mean CE of every target token, the same quantity in both conditions),
    ``loss_real`` / ``loss_junk`` (on the real and junk targets) and ``selected_junk`` (the share of junk among
    the back-propagated targets)."""

    reference: torch.nn.Module | None = None
    keep: float = 1.0

    def __call__(self, model: torch.nn.Module, batch: Batch) -> tuple[torch.Tensor, dict[str, float]]:
        from ..core.loss import rho1_selection, token_cross_entropy

        x, y = batch["input_ids"], batch["labels"]
        logits = model(input_ids=x).logits
        junk = batch["junk"][:, 1:]
        if self.reference is None:
            losses, valid = token_cross_entropy(logits, y)
            loss = losses.sum() / valid.sum()
            token_loss, selected = losses.detach(), valid
        else:
            with torch.no_grad():
                ref_logits = self.reference(input_ids=x).logits
            sel = rho1_selection(logits, y, ref_logits, self.keep)
            loss, token_loss, selected = sel.loss, sel.token_loss, sel.selected
        extras = {"loss_all": token_loss.mean().item(), "loss_real": token_loss[~junk].mean().item(),
                  "loss_junk": token_loss[junk].mean().item() if junk.any() else float("nan"),
                  "selected_junk": (junk & selected).sum().item() / max(1, selected.sum().item())}
        return loss, extras


@dataclass
class Rho1Context:
    """What every cell of one model shares: the base LM's weights, the tokenizer, the reference, the held-out
    windows and cloze items, and the token ids of the splits (the streams are built per seed on demand)."""

    base: torch.nn.Module
    tokenizer: Any
    reference: torch.nn.Module
    lm_config: LMConfig
    test_windows: torch.Tensor
    cloze: list[dict[str, Any]]
    stream_docs: tuple[str, ...]
    info: dict[str, Any] = field(default_factory=dict)
    _streams: dict[tuple[Any, ...], tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)

    def stream(self, cfg: Any, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
        key = (cfg.junk_fraction, cfg.shuffled_share, seed)
        if key not in self._streams:
            self._streams = {key: mixed_stream(self.tokenizer, self.stream_docs, cfg.junk_fraction,
                                               cfg.shuffled_share, seed)}
        return self._streams[key]


def _config(fields: dict[str, Any]) -> Rho1Config:
    return Rho1Config(**{k: tuple(v) if isinstance(v, list) else v for k, v in fields.items()})


def _optim(lr: float) -> OptimConfig:
    return OptimConfig(lr=lr)


def reference_model(base: torch.nn.Module, ids: torch.Tensor, lm: LMConfig, cfg: Any, cache: Any = None
                    ) -> tuple[torch.nn.Module, dict[str, Any]]:
    """The base LM trained ``cfg.ref_steps`` more steps on the clean split's ``ids`` (windows of the base
    LM's length, seed ``cfg.ref_seed``); loaded from / saved to the directory ``cache`` when given."""
    from ..models.checkpoint import atomic_write, short_hash
    from ..models.lm import random_window_batches, train_causal_lm

    fields = {"ref_steps": cfg.ref_steps, "ref_lr": cfg.ref_lr, "batch_size": cfg.batch_size, "seed": cfg.ref_seed,
              "lm": lm.config_hash()}
    ref = copy.deepcopy(base)
    path = cache / f"reference-{short_hash(fields, compact=True)}" / "model.pt" if cache is not None else None
    if path is not None and path.is_file():
        ref.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
        return ref.eval(), json.loads(path.with_name("metrics.json").read_text())
    log = train_causal_lm(ref, random_window_batches(ids, cfg.batch_size, lm.seq_len, cfg.ref_seed), cfg.ref_steps,
                          _optim(cfg.ref_lr), desc="reference")
    info = {**fields, "final_loss": sum(log.loss[-20:]) / len(log.loss[-20:]), "seconds": log.seconds,
            "tokens": log.tokens}
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(path.with_name("metrics.json"), lambda p: p.write_text(json.dumps(info, indent=2)))
        atomic_write(path, lambda p: torch.save(ref.state_dict(), p))
    return ref.eval(), info


def load_rho1_context(config: dict[str, Any], name: str) -> Rho1Context:
    """The context of model ``name``: ``small_lm`` (the cached LM of ``tokenreduce train lm``) or ``tiny`` (random
    weights, a BPE of 300 trained on a few documents: ``--smoke``); ``config``: the study's configuration. Runs
    with the configuration's torch threads (the reference is trained here)."""
    from ..bench.timing import fixed_threads

    cfg = _config(config)
    with fixed_threads(cfg.threads):
        return _load_context(cfg, name)


def _load_context(cfg: Rho1Config, name: str) -> Rho1Context:
    from ..models.lm import (
        build_lm,
        checkpoint_dir,
        corpus_splits,
        encode_documents,
        eval_windows,
        load_small_lm,
        train_tokenizer,
    )

    splits = dict(corpus_splits())
    if cfg.max_docs:
        splits = {k: v[: cfg.max_docs] for k, v in splits.items()}
    if name == "tiny":
        torch.manual_seed(0)
        lm, tok = TINY, train_tokenizer(splits["train"][:5], TINY.vocab_size)
        base, cache = build_lm(TINY, vocab_size=len(tok)).eval(), None
    elif name == "small_lm":
        lm = LMConfig()
        base, tok, _ = load_small_lm(config=lm)
        cache = checkpoint_dir(lm)
    else:
        raise ValueError(f"unknown model {name!r} for the rho1 study; accepted: small_lm, tiny")
    clean = encode_documents(tok, splits["clean"])
    reference, ref_info = reference_model(base, clean, lm, cfg, cache)
    test = eval_windows(encode_documents(tok, splits["test"]), lm.seq_len, cfg.max_windows or None)
    cloze = cloze_items(tok, splits["test"], cfg.cloze_items, cfg.cloze_choices, cfg.eval_seed)
    return Rho1Context(base, tok, reference, lm, test, cloze, splits["stream"], {"reference": ref_info})


def _evaluate(ctx: Rho1Context, model: torch.nn.Module, head: dict[str, Any]) -> list[dict[str, Any]]:
    """Per held-out window its mean NLL, per cloze item right/wrong."""
    from ..models.lm import continuation_logprobs, window_nll

    nll = window_nll(model, ctx.test_windows)
    rows = [{**head, "part": "ppl", "item": i, "nll": float(v)} for i, v in enumerate(nll.tolist())]
    prefixes = [it["prefix"] for it in ctx.cloze for _ in it["options"]]
    conts = [" " + o for it in ctx.cloze for o in it["options"]]
    scores = continuation_logprobs(model, ctx.tokenizer, prefixes, conts) if ctx.cloze else []
    k = 0
    for it in ctx.cloze:
        s = scores[k : k + len(it["options"])]
        k += len(it["options"])
        best = it["options"][max(range(len(s)), key=s.__getitem__)]
        rows.append({**head, "part": "cloze", "item": it["item"], "correct": best == it["answer"]})
    return rows


def run_rho1_cell(ctx: Rho1Context, cell: Any) -> list[dict[str, Any]]:
    """One cell: ``base`` / ``reference`` evaluated as they are; ``none`` (full-token loss) and ``rho1``
    (:func:`~tokenreduce.rho1_loss` at the cell's keep) train a copy of the base LM on the seed's mixed stream
    for ``steps`` steps, then are evaluated. Rows: one ``run`` row (the training curves), ``ppl`` and ``cloze``
    rows."""
    from ..bench.timing import fixed_threads
    from ..models.lm import random_window_batches, train_causal_lm

    cfg = _config(cell.settings["config"])
    head = {"method": cell.method, "keep": cell.keep, "seed": cell.seed}
    with fixed_threads(cfg.threads):
        if cell.method in ("base", "reference"):
            model = ctx.base if cell.method == "base" else ctx.reference
            return [{**head, "part": "run", **({"reference": ctx.info["reference"]} if cell.method == "reference"
                                               else {})}, *_evaluate(ctx, model, head)]
        ids, junk = ctx.stream(cfg, cell.seed)
        model = copy.deepcopy(ctx.base)
        loss = SelectiveLoss(ctx.reference if cell.method == "rho1" else None, float(cell.keep))
        torch.manual_seed(cell.seed)
        batches = random_window_batches(ids, cfg.batch_size, ctx.lm_config.seq_len, cell.seed, {"junk": junk})
        log = train_causal_lm(model, batches, cfg.steps, _optim(cfg.lr), loss, desc=f"{cell.method} seed {cell.seed}")
        run = {**head, "part": "run", "loss": log.loss, "grad_norm": log.grad_norm, **log.extras,
               "tokens_seen": log.tokens, "seconds": log.seconds, "stream_tokens": int(ids.numel()),
               "stream_junk": float(junk.float().mean())}
        return [run, *_evaluate(ctx, model, head)]
