"""TokenSkip fine-tuning (Xia et al. 2025, Sec. 3.2): the full-chain model is fine-tuned on a mixture of its
task's chains compressed to the ratios ``gammas`` (one ratio drawn per training problem), with the ratio written
in the prompt as a control token (``7+3*2-5?<g60>``), so at test time the prompt chooses how short the chain is.

Differences from the paper, all forced by scale: the chains are the task's reference chains (the paper compresses
the model's own correct outputs; a correct output of this model *is* the reference chain); every weight is
fine-tuned (the paper: LoRA on 3-14B models); the importance criterion is the full-chain model's own
self-information (:mod:`.compress`; the paper: LLMLingua-2).
"""

from __future__ import annotations

import random
import time
from collections.abc import Iterator, Sequence
from typing import Any

from tokenreduce.data.chains import make_problems

from ..checkpoint import save_checkpoint
from ..training import ensure_trained, load_checkpoint, torch_threads
from .compress import compressed_chains, kept_by_role
from .config import TokenSkipConfig, tokenskip_dir
from .tokenizer import build_tokenizer, completion_text, prompt_text
from .train import Batch, accuracy, build_model, fit, load_reasoner

__all__ = ["finetune_tokenskip", "load_tokenskip", "tokenskip_data"]

TOKENSKIP_HINT = "build it once with `tokenreduce train reasoner --tokenskip`"


def tokenskip_data(base: Any, config: TokenSkipConfig) -> tuple[list[str], list[str], list[float]]:
    """(prompts, completions, gammas) of the fine-tuning mixture: ``n_problems`` training problems (their own
    seed stream), each with a ratio drawn uniformly from ``gammas`` and its chain compressed to it by
    ``criterion`` under the full-chain model ``base``."""
    problems = make_problems("train", config.n_problems, 1000 + config.seed, config.base.task)
    rng = random.Random(config.seed)
    gammas = [rng.choice(config.gammas) for _ in problems]
    chains = compressed_chains(base, problems, gammas, config.criterion, config.seed, config.force_keep)
    prompts = [prompt_text(p.question, g) for p, g in zip(problems, gammas)]
    return prompts, [completion_text(c, p.answer) for c, p in zip(chains, problems)], gammas


def _batches(prompts: Sequence[str], completions: Sequence[str], batch_size: int, seed: int) -> Iterator[Batch]:
    """Shuffled epochs over the mixture."""
    rng = random.Random(seed)
    order: list[int] = []
    while True:
        if len(order) < batch_size:
            fresh = list(range(len(prompts)))
            rng.shuffle(fresh)
            order += fresh
        idx, order = order[:batch_size], order[batch_size:]
        yield [prompts[i] for i in idx], [completions[i] for i in idx]


def finetune_tokenskip(config: TokenSkipConfig | None = None, progress: bool = True, base: Any = None) -> dict[str, Any]:
    """Compress, fine-tune, measure on the validation problems at every gamma, cache; returns the metrics.
    ``base``: the full-chain model to start from (default: the cached one of ``config.base``)."""
    config = config or TokenSkipConfig()
    with torch_threads(config.num_threads):
        t0 = time.perf_counter()
        if base is None:
            base = load_reasoner(config.base)[0]
        model = build_model(config.base)
        model.load_state_dict(base.state_dict())
        prompts, completions, gammas = tokenskip_data(base, config)
        t_data = time.perf_counter() - t0
        history = fit(model, _batches(prompts, completions, config.batch_size, config.seed), config.steps, config.lr,
                      config.warmup_fraction, config.min_lr_ratio, config.base.weight_decay, config.base.grad_clip,
                      progress, desc="TokenSkip fine-tune")
        train_time = time.perf_counter() - t0 - t_data
        val = make_problems("val", config.base.val_items, 0, config.base.task)
        tok = build_tokenizer()
        n_chain = {g: [len(tok(c.partition("#")[0], add_special_tokens=False)["input_ids"])
                       for c, gg in zip(completions, gammas) if gg == g] for g in config.gammas}
        out = tokenskip_dir(config)
        metrics = {"val": {f"{g:g}": accuracy(model, val, config.base, gamma=g) for g in config.gammas},
                   "kept_by_role": kept_by_role(base, val[:200], config.gammas, config.criterion, config.seed,
                                                 config.force_keep),
                   "train_chain_tokens": {f"{g:g}": sum(v) / max(1, len(v)) for g, v in n_chain.items()},
                   "data_time_s": t_data, "train_time_s": train_time, "total_time_s": time.perf_counter() - t0,
                   "num_threads": config.num_threads, "history": history, "config_hash": config.config_hash(),
                   "base": config.base.config_hash(), "checkpoint": str(out / "model.pt"),
                   "examples": [{"prompt": p, "completion": c} for p, c in list(zip(prompts, completions))[:8]]}
        save_checkpoint(out, config, metrics, model)
        return metrics


def load_tokenskip(config: TokenSkipConfig | None = None, train_if_missing: bool = False,
                   progress: bool = True) -> tuple[Any, Any, dict[str, Any]]:
    """``(model, tokenizer, info)`` of the cached TokenSkip model of ``config``; FileNotFoundError naming
    ``tokenreduce train reasoner --tokenskip`` when it is not cached and ``train_if_missing`` is False."""
    config = config or TokenSkipConfig()
    path = tokenskip_dir(config) / "model.pt"
    ensure_trained(path, train_if_missing, lambda: finetune_tokenskip(config, progress),
                   f"no TokenSkip reasoning LM at {path}; {TOKENSKIP_HINT} (after `tokenreduce train reasoner`)")
    model = build_model(config.base)
    metrics = load_checkpoint(model, path)
    return model.eval(), build_tokenizer(), {"config": config, "metrics": metrics, "path": path}
