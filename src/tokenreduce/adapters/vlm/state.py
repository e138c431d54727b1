"""What the hooks of one attached VLM method share (:class:`RunState`): the prompt as the LLM gets it
(:class:`LlmInput`), what decoding needs from the last prefill (:class:`DecodePlan`, which follows the
cache's beam reordering and batch expansion: :func:`follow_cache`), and the phase of the current forward."""

from __future__ import annotations

import dataclasses
import types
import weakref
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from .stats import VlmStats

__all__ = ["DecodePlan", "LlmInput", "RunState", "StagePlan", "follow_cache"]


@dataclass
class LlmInput:
    """The prompt as the LLM gets it, after the before-the-LLM compaction (if any)."""

    orig_len: int  # prompt length of the 2D mask generate keeps
    length: int  # prompt length of the LLM input
    real: Tensor  # (B, length) real tokens
    removed: Tensor  # (B,) prompt tokens removed before the LLM
    compacted: bool  # placeholders were dropped
    shift: Tensor  # (B,) decode position shift (tokens removed before the LLM, 0 with positions="keep")
    visual0: Tensor  # (B,) visual tokens (<image> placeholders) of the unreduced prompt

    def rows(self, pick: Callable[[Tensor], Tensor]) -> LlmInput:
        """The same prompt with ``pick`` applied to every per-row tensor (beam reordering, batch expansion)."""
        return dataclasses.replace(self, real=pick(self.real), removed=pick(self.removed), shift=pick(self.shift),
                                   visual0=pick(self.visual0))


@dataclass
class StagePlan:
    """The tokens an inside-LLM stage left in its layer group's cache."""

    layer: int
    real: Tensor  # (B, L_s) kept-token mask (prompt part of this group's cache)
    shift: Tensor  # (B,) decode position shift for this group
    compact: bool

    def rows(self, pick: Callable[[Tensor], Tensor]) -> StagePlan:
        return dataclasses.replace(self, real=pick(self.real), shift=pick(self.shift))


@dataclass
class DecodePlan:
    """What decoding needs from the last prefill."""

    cache: Any  # weakref to the cache object
    prompt: LlmInput
    stages: list[StagePlan]

    def rows(self, pick: Callable[[Tensor], Tensor]) -> DecodePlan:
        return DecodePlan(self.cache, self.prompt.rows(pick), [s.rows(pick) for s in self.stages])


@dataclass
class RunState:
    """Shared by the before-the-LLM hooks (which write the LLM input) and the inside-the-LLM hooks (which
    read it and write the decode plan and the stats)."""

    name: str
    phase: str = "off"  # "prefill", "decode" or "off" (a forward the method leaves alone)
    plan: DecodePlan | None = None
    prompt: LlmInput | None = None  # of the current prefill
    lm_ids: Tensor | None = None  # input_ids the LLM gets (after compaction)
    images_per_sample: float = 0.0
    image_sources: Tensor | None = None  # (n_img, K) patch index of each image token after reduction
    image_out: Tensor | None = None  # (n_img, K, D) the reduced projector output (features in image order)
    pending_reduce: float = 0.0  # seconds spent reducing before the LLM, for the next prefill's stats
    stats: VlmStats = field(init=False)  # of the last prefill

    def __post_init__(self) -> None:
        self.stats = VlmStats(method=self.name)


#: the cache's batch operations (beam search, contrastive search, ...) -> the same operation on a per-row tensor
_BATCH_OPS: dict[str, Callable[[Tensor, Any], Tensor]] = {
    "reorder_cache": lambda t, idx: t.index_select(0, idx.to(t.device)),
    "batch_select_indices": lambda t, idx: t.index_select(0, torch.as_tensor(idx, device=t.device)),
    "batch_repeat_interleave": lambda t, n: t.repeat_interleave(n, dim=0),
}


def follow_cache(cache: Any, state: RunState) -> None:
    """Make the decode plan of ``cache`` follow the cache's batch operations: generate's beam search reorders
    the cache's rows (``reorder_cache``) after every step, other decoders select or repeat them; the plan's
    per-row masks and position shifts must move with them. Binds wrappers of those methods to this cache
    object (once; a deep copy of the cache gets them bound to the copy, whose rows the plan does not follow)."""
    follows = cache.__dict__.get("_tokenreduce_follows")
    if follows is not None and follows() is state:
        return
    for name, op in _BATCH_OPS.items():
        method = getattr(type(cache), name, None)
        if method is None:
            continue

        def wrapped(self: Any, arg: Any, _method: Callable[..., None] = method,
                    _op: Callable[[Tensor, Any], Tensor] = op) -> None:
            _method(self, arg)
            plan = state.plan
            if plan is not None and plan.cache() is self:
                state.plan = plan.rows(lambda t: _op(t, arg))

        cache.__dict__[name] = types.MethodType(wrapped, cache)
    cache.__dict__["_tokenreduce_follows"] = weakref.ref(state)
