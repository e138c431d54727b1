"""KV-cache methods for decoder LLMs (integration point ``kv-cache``), one file each; importing the package
registers them. What they share (:class:`KVContext`, :class:`KVMethod`, the budget and the three questions
every method answers) is described in :mod:`.base`; the LLM adapter (``adapters/llm/``) places them in the
model's own ``DynamicCache`` and attention interface."""

from .base import BUDGET_DOC, KV, QUESTION_PRESETS, KVContext, KVMethod, check_window_and_pooling, shrunk_window
from .gemfilter import GemFilter
from .h2o import H2O
from .knorm import Knorm
from .pyramidkv import PyramidKV
from .random import RandomKV
from .snapkv import SnapKV
from .streaming_llm import StreamingLLM
from .tokenselect import TokenSelect
from .tova import TOVA

__all__ = ["BUDGET_DOC", "H2O", "KV", "QUESTION_PRESETS", "TOVA", "GemFilter", "KVContext", "KVMethod", "Knorm",
           "PyramidKV", "RandomKV", "SnapKV", "StreamingLLM", "TokenSelect", "check_window_and_pooling", "shrunk_window"]
