"""Methods at the ``prompt`` integration point (``tr.compress``), one file each; importing the package
registers them. What they share (:class:`Prompt`, :class:`PromptMethod`) is in ``base.py``."""

from .base import PROMPT, Embedder, Prompt, PromptMethod, TokenScorer, in_order
from .extractive import Extractive
from .llmlingua import LLMLingua
from .longllmlingua import LongLLMLingua
from .random import RandomDrop
from .selective_context import SelectiveContext
from .truncate import Truncate

__all__ = ["PROMPT", "Embedder", "Extractive", "LLMLingua", "LongLLMLingua", "Prompt", "PromptMethod",
           "RandomDrop", "SelectiveContext", "TokenScorer", "Truncate", "in_order"]
