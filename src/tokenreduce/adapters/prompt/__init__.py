"""The models behind prompt compression's criteria: the causal-LM scorer (:mod:`.scorer`) and its own
attention kernel (:mod:`.attention`). The sentence encoder is :mod:`tokenreduce.adapters.minilm`."""

from .attention import SCORER_ATTENTION, register_scorer_attention, scorer_attention
from .scorer import CausalScorer, get_scorer

__all__ = ["SCORER_ATTENTION", "CausalScorer", "get_scorer", "register_scorer_attention", "scorer_attention"]
