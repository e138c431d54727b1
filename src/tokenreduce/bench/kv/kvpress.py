"""The bridge to NVIDIA kvpress 0.5.5, which runs in its own virtualenv (transformers >= 4.56, < 5.3): kvpress
timing candidates (``kvpress:<Press>@<keep>[/global]``), kvpress's own path timed like ours, and its Gemma 3
rule of hooking only the global layers (also used by ``scripts/kvpress_compare.py``).

This module is imported in kvpress's venv (tokenreduce installed there with ``--no-deps``): it imports only the
standard library and torch at module level; transformers and kvpress are imported inside the functions that
need them, with APIs that transformers 4.56-5.2 share."""

from __future__ import annotations

import contextlib
import types
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import torch

__all__ = ["KVPRESS_MODES", "kvpress_global_only", "kvpress_labels", "kvpress_timing_call",
           "parse_kvpress_candidate"]

KVPRESS_MODES = ("all", "global")


def parse_kvpress_candidate(label: str) -> tuple[str | None, float, str]:
    """``"kvpress:SnapKVPress@0.25"`` -> (press class, keep, mode); ``/global`` = kvpress's Gemma 3 default (sliding
    layers untouched, transformers' config-aware cache), else ``all`` (every layer hooked, the config-less
    cache of kvpress's pipeline). ``"kvpress:none"``: the pipeline's path without a press (its own reference)."""
    if not label.startswith("kvpress:"):
        raise ValueError(f"not a kvpress candidate: {label!r}")
    body, _, mode = label[len("kvpress:"):].partition("/")
    mode = mode or "all"
    if mode not in KVPRESS_MODES:
        raise ValueError(f"kvpress candidate {label!r}: mode must be one of {KVPRESS_MODES}")
    if body == "none":
        return None, 1.0, mode
    press, sep, keep = body.partition("@")
    if not sep or not press:
        raise ValueError(f"kvpress candidate {label!r}: expected kvpress:<Press>@<keep>[/global] or kvpress:none")
    k = float(keep)
    if not 0.0 < k < 1.0:
        raise ValueError(f"kvpress candidate {label!r}: keep must be in (0, 1), got {k}")
    return press, k, mode


def kvpress_labels(names: Iterable[str]) -> list[str]:
    """Timing candidate labels of kvpress presses given with or without the ``kvpress:`` prefix."""
    return [k if k.startswith("kvpress:") else f"kvpress:{k}" for k in names]


def kvpress_timing_call(model: Any, tok: Any, ids: torch.Tensor, p: dict[str, Any], label: str, T: int,
                        info: dict[str, dict[str, Any]], split: dict[str, list[tuple[float, float]]] | None,
                        clock: str = "wall") -> Callable[[], str]:
    """kvpress's own path, timed like ours: the context forward under the press (``press(model)`` hooks), then
    its pipeline's ``generate_answer`` (question forward with logical position ids + greedy tokens), ``1 + T``
    generated tokens. Prefill = the context forward; decode = question + tokens (the question is ~20 tokens).
    kvpress is imported here only (an optional peer: run this in kvpress's venv)."""
    from transformers import DynamicCache

    from ...accounting.kv import kv_bytes
    from ..timing import CLOCKS

    try:
        import kvpress
        from kvpress.pipeline import KVPressTextGenerationPipeline
    except ImportError as e:  # pragma: no cover - depends on the venv
        raise ImportError("kvpress timing candidates need kvpress (its own venv: `make peers`, then run the bench "
                          "with that venv's python after `pip install -e . --no-deps`)") from e
    press_name, keep, mode = parse_kvpress_candidate(label)
    tick = CLOCKS[clock]
    n_ctx = ids.shape[1] - int(p["question_len"])
    ctx, q = ids[:, :n_ctx], ids[:, n_ctx:]
    # its pipeline's own generate_answer, bound to the model and tokenizer (the method reads only these two)
    pipe = types.SimpleNamespace(model=model, tokenizer=tok)
    generate_answer = KVPressTextGenerationPipeline.generate_answer
    press = None if press_name is None else getattr(kvpress, press_name)(compression_ratio=1 - keep)

    def hooks():
        if press is None:
            return contextlib.nullcontext()
        if mode == "all":
            return press(model)
        return kvpress_global_only(press, model)

    def fn():
        cache = DynamicCache(config=model.config) if mode == "global" else DynamicCache()
        with torch.inference_mode():
            t0 = tick()
            with hooks():
                model.model(input_ids=ctx, past_key_values=cache)
            t1 = tick()
            by_prefill = kv_bytes(cache)["tensor"]  # outside both timed phases
            t1b = tick()
            answer = generate_answer(pipe, q, cache, n_ctx, 1 + T)
            t2 = tick()
        info.setdefault(label, {}).update(kv_bytes=by_prefill, kv_bytes_end=kv_bytes(cache)["tensor"])
        if split is not None:
            split[label].append((t1 - t0, t2 - t1b))
            info[label]["output"] = answer
        return answer

    return fn


@contextlib.contextmanager
def kvpress_global_only(press: Any, model: Any) -> Iterator[None]:
    """kvpress's ``BasePress.__call__`` with its Gemma3ForConditionalGeneration rule (sliding layers skipped).
    Also used by ``scripts/kvpress_compare.py``."""
    press.post_init_from_model(model)
    hooks = []
    try:
        lm = model.model
        for layer in lm.layers:
            if layer.self_attn.is_sliding:
                continue
            layer.self_attn.rotary_emb = lm.rotary_emb
            hooks.append(layer.self_attn.register_forward_hook(press.forward_hook, with_kwargs=True))
        yield
    finally:
        for h in hooks:
            h.remove()
