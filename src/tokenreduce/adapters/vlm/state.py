"""What the hooks of one attached VLM method share (:class:`RunState`): the prompt as the LLM gets it
(:class:`LlmInput`), what decoding needs from the last prefill (:class:`DecodePlan`), and the phase of the
current forward."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from torch import Tensor

from .stats import VlmStats

__all__ = ["DecodePlan", "LlmInput", "RunState", "StagePlan"]


@dataclass
class LlmInput:
    """The prompt as the LLM gets it, after the before-the-LLM compaction (if any)."""

    orig_len: int  # prompt length of the 2D mask generate keeps
    length: int  # prompt length of the LLM input
    real: Tensor  # (B, length) real tokens
    removed: Tensor  # (B,) prompt tokens removed before the LLM
    compacted: bool  # placeholders were dropped
    shift: Tensor  # (B,) decode position shift (tokens removed before the LLM, 0 with positions="keep")


@dataclass
class StagePlan:
    """The tokens an inside-LLM stage left in its layer group's cache."""

    layer: int
    real: Tensor  # (B, L_s) kept-token mask (prompt part of this group's cache)
    shift: Tensor  # (B,) decode position shift for this group
    compact: bool


@dataclass
class DecodePlan:
    """What decoding needs from the last prefill."""

    cache: Any  # weakref to the cache object
    prompt: LlmInput
    stages: list[StagePlan]


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
    pending_reduce: float = 0.0  # seconds spent reducing before the LLM, for the next prefill's stats
    stats: VlmStats = field(init=False)  # of the last prefill

    def __post_init__(self) -> None:
        self.stats = VlmStats(method=self.name)
