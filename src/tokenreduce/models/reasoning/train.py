"""Training the reasoning LM (a small ``LlamaForCausalLM``), greedy decoding and accuracy, loading the cached
checkpoint. The loop (:func:`fit`) is the plain one of supervised fine-tuning: AdamW, warm-up + cosine
(:func:`tokenreduce.models.training.warmup_cosine`), gradient clipping, the loss on the completion tokens only;
the full-chain model and the TokenSkip fine-tune (:mod:`.tokenskip`) both run it."""

from __future__ import annotations

import time
from collections.abc import Iterator, Sequence
from typing import Any

import torch

from tokenreduce.data.chains import ChainProblem, make_problems

from ..checkpoint import save_checkpoint
from ..training import ensure_trained, load_checkpoint, torch_threads, warmup_cosine
from .config import ReasonerConfig, checkpoint_dir
from .tokenizer import build_tokenizer, completion_text, parse_completion, prompt_text

__all__ = ["Batch", "accuracy", "build_model", "encode", "fit", "greedy", "load_reasoner", "train_reasoner"]

#: (prompts, completions) of one training step, as text
Batch = tuple[list[str], list[str]]
TRAIN_HINT = "build it once with `tokenreduce train reasoner{}`"


def build_model(config: ReasonerConfig, seed: int | None = None) -> Any:
    """A freshly initialised ``LlamaForCausalLM`` of ``config`` (eval mode; seeded by ``seed``)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    if seed is not None:
        torch.manual_seed(seed)
    cfg = LlamaConfig(**config.llama_kwargs())
    cfg._attn_implementation = "sdpa"
    return LlamaForCausalLM(cfg).eval()


def encode(tok: Any, prompts: Sequence[str], completions: Sequence[str]) -> dict[str, torch.Tensor]:
    """``<bos> prompt completion <eos>`` right-padded: ``input_ids``, ``attention_mask`` and ``labels`` (-100 on
    ``<bos>``, the prompt and the padding: the loss is on the completion and ``<eos>``)."""
    p_ids = tok(list(prompts), add_special_tokens=False)["input_ids"]
    c_ids = tok(list(completions), add_special_tokens=False)["input_ids"]
    seqs = [[tok.bos_token_id, *p, *c, tok.eos_token_id] for p, c in zip(p_ids, c_ids)]
    L = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), L), tok.pad_token_id, dtype=torch.long)
    labels = torch.full((len(seqs), L), -100, dtype=torch.long)
    mask = torch.zeros((len(seqs), L), dtype=torch.long)
    for i, (s, p) in enumerate(zip(seqs, p_ids)):
        ids[i, : len(s)] = torch.tensor(s)
        mask[i, : len(s)] = 1
        labels[i, 1 + len(p): len(s)] = ids[i, 1 + len(p): len(s)]
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def fit(model: Any, batches: Iterator[Batch], steps: int, lr: float, warmup_fraction: float, min_lr_ratio: float,
        weight_decay: float = 0.0, grad_clip: float = 1.0, progress: bool = True, desc: str = "train",
        log_every: int = 100) -> list[dict[str, float]]:
    """``steps`` AdamW steps on ``batches`` (warm-up + cosine, clipping; no decay on norms); returns the mean
    training loss per ``log_every`` steps. Leaves the model in eval mode."""
    from tqdm.auto import tqdm

    tok = build_tokenizer()
    decay = [p for n, p in model.named_parameters() if p.ndim >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.ndim < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}], lr=lr, betas=(0.9, 0.98))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, warmup_cosine(steps, max(1, round(warmup_fraction * steps)),
                                                                 min_lr_ratio))
    model.train()
    history: list[dict[str, float]] = []
    acc, n_acc, t0 = 0.0, 0, time.perf_counter()
    bar = tqdm(total=steps, desc=desc, disable=not progress, dynamic_ncols=True, mininterval=2.0)
    for step in range(steps):
        prompts, completions = next(batches)
        loss = model(**encode(tok, prompts, completions)).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
        opt.step()
        sched.step()
        acc, n_acc = acc + loss.item(), n_acc + 1
        bar.update(1)
        if (step + 1) % log_every == 0 or step + 1 == steps:
            history.append({"step": step + 1, "loss": acc / n_acc, "seconds": time.perf_counter() - t0})
            bar.set_postfix(loss=f"{acc / n_acc:.4f}")
            acc, n_acc = 0.0, 0
    bar.close()
    model.eval()
    return history


@torch.inference_mode()
def greedy(model: Any, prompts: Sequence[str], max_new_tokens: int) -> list[list[int]]:
    """Greedy continuations of ``prompts`` (``<bos>`` prepended, left-padded, KV cache), each up to and
    including ``<eos>`` or ``max_new_tokens`` long."""
    tok = build_tokenizer()
    enc = tok([tok.bos_token + p for p in prompts], add_special_tokens=False, padding=True, return_tensors="pt")
    ids, mask = enc["input_ids"], enc["attention_mask"]
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    out = model(input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=True)
    nxt = out.logits[:, -1].argmax(-1)
    gen, done = [nxt], nxt == tok.eos_token_id
    for _ in range(max_new_tokens - 1):
        if bool(done.all()):
            break
        mask = torch.cat([mask, torch.ones_like(mask[:, :1])], 1)
        pos = pos[:, -1:] + 1
        out = model(input_ids=nxt[:, None], attention_mask=mask, position_ids=pos,
                    past_key_values=out.past_key_values, use_cache=True)
        nxt = out.logits[:, -1].argmax(-1)
        gen.append(nxt)
        done = done | (nxt == tok.eos_token_id)
    rows = torch.stack(gen, 1).tolist()
    return [r[: r.index(tok.eos_token_id) + 1] if tok.eos_token_id in r else r for r in rows]


def max_new_tokens(config: ReasonerConfig) -> int:
    """Room for the longest full chain, ``#``, the answer and ``<eos>`` (and a little slack)."""
    return 6 * config.task.max_ops * config.chain + 8


def accuracy(model: Any, problems: Sequence[ChainProblem], config: ReasonerConfig, gamma: float | None = None,
             batch: int = 100) -> dict[str, float]:
    """Answer accuracy and mean generated tokens of batched greedy decoding on ``problems``."""
    tok = build_tokenizer()
    right, tokens = 0, 0
    for i in range(0, len(problems), batch):
        ps = problems[i: i + batch]
        for p, g in zip(ps, greedy(model, [prompt_text(q.question, gamma) for q in ps], max_new_tokens(config))):
            right += parse_completion(tok.decode(g, skip_special_tokens=True))[1] == p.answer
            tokens += len(g)
    return {"acc": right / len(problems), "gen_tokens": tokens / len(problems), "n": len(problems)}


def problem_batches(problems: Sequence[ChainProblem], batch_size: int, chain: bool) -> Iterator[Batch]:
    """Consecutive batches of (prompts, completions) of ``problems`` (cycling)."""
    i = 0
    while True:
        ps = [problems[(i + k) % len(problems)] for k in range(batch_size)]
        i += batch_size
        yield ([prompt_text(p.question) for p in ps],
               [completion_text(p.chain if chain else "", p.answer) for p in ps])


def train_reasoner(config: ReasonerConfig | None = None, progress: bool = True) -> dict[str, Any]:
    """Train the model of ``config`` on ``steps x batch_size`` fresh problems, measure it on the validation
    problems (accuracy, generated tokens), cache it; returns the metrics."""
    config = config or ReasonerConfig()
    with torch_threads(config.num_threads):
        t0 = time.perf_counter()
        model = build_model(config, seed=config.seed)
        problems = make_problems("train", config.steps * config.batch_size, config.seed, config.task)
        history = fit(model, problem_batches(problems, config.batch_size, config.chain), config.steps, config.lr,
                      config.warmup_fraction, config.min_lr_ratio, config.weight_decay, config.grad_clip, progress,
                      desc="train reasoner" + ("" if config.chain else " (no chain)"))
        train_time = time.perf_counter() - t0
        val = accuracy(model, make_problems("val", config.val_items, 0, config.task), config)
        out = checkpoint_dir(config)
        metrics = {"val_acc": val["acc"], "val_gen_tokens": val["gen_tokens"], "n_val": val["n"],
                   "train_time_s": train_time, "total_time_s": time.perf_counter() - t0,
                   "num_params": sum(p.numel() for p in model.parameters()), "num_threads": config.num_threads,
                   "history": history, "config_hash": config.config_hash(), "checkpoint": str(out / "model.pt")}
        save_checkpoint(out, config, metrics, model)
        return metrics


def load_reasoner(config: ReasonerConfig | None = None, train_if_missing: bool = False,
                  progress: bool = True) -> tuple[Any, Any, dict[str, Any]]:
    """``(model, tokenizer, info)`` of the cached model of ``config`` (eval mode); FileNotFoundError naming
    ``tokenreduce train reasoner`` when it is not cached and ``train_if_missing`` is False."""
    config = config or ReasonerConfig()
    path = checkpoint_dir(config) / "model.pt"
    hint = TRAIN_HINT.format("" if config.chain else " --no-chain")
    ensure_trained(path, train_if_missing, lambda: train_reasoner(config, progress),
                   f"no trained reasoning LM at {path}; {hint} (one thread, about 15 minutes)")
    model = build_model(config)
    metrics = load_checkpoint(model, path)
    return model.eval(), build_tokenizer(), {"config": config, "metrics": metrics, "path": path}
