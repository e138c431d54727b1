"""VLM adapter: visual token reduction in transformers' LLaVA family (integration point ``vlm-visual``).

Supported: ``LlavaForConditionalGeneration`` / ``LlavaModel`` (LLaVA-1.5 style: one patch grid per image),
and for the inside-the-LLM methods also ``LlavaNext*`` / ``LlavaOnevision*`` (same placeholder -> LLM code
path; their anyres image tokens are not one grid, so before-the-LLM methods refuse them). The language
model must be a RoPE decoder with ``layers``/``rotary_emb`` (Llama, Mistral, Qwen2, ...), attention
``sdpa`` or ``eager``, and the cache a ``DynamicCache`` (generate's default).

How, with hooks and instance attributes only (``Handle.remove()`` restores the model exactly):

* **before the LLM** (:mod:`.before_llm`, :mod:`.vision`) — the projector's ``forward`` is wrapped: the
  method reduces each image's vision features (``where="pre"``) or projected features (``"post"``); the
  vision attention it needs ([CLS] row, mean attention, keys) is computed from forward hooks on the q/k
  projections of the few encoder layers it names. A projector that adds a per-patch position embedding
  (``takes_source_patches = True``, the small VLM's :class:`~tokenreduce.models.small_vlm.GridPositionProjector`)
  gets each kept token's source patch (``source_patches``) after a ``"pre"`` reduction. A forward pre-hook
  on ``LlavaModel`` then drops the surplus ``<image>`` placeholders from ``input_ids`` (so HF's
  placeholder-count check holds) and re-pads ragged rows; positions are re-indexed (``positions="compact"``)
  or each kept token keeps its patch slot's id (``"keep"``).
* **inside the LLM** (:mod:`.inside_llm`) — forward pre-hooks on the decoder layers: at a stage layer the
  method scores the visual tokens (attention rows of the last/rater text tokens computed from that layer's
  own q/k, for those rows only), the hidden states are gathered, and that layer and all later ones get
  their own 4D mask and rotary embeddings for the shorter sequence; their KV cache holds only the survivors.
* **decoding** — generate keeps a 2D mask and position ids for the *original* prompt. The ``LlavaModel``
  pre-hook maps them to the compacted prompt, and the layer pre-hooks translate them per layer group: the
  prompt part of the mask is replaced by the group's kept-token mask, positions shifted by the tokens
  removed before them (when the method re-indexes positions).

The model's parts are found in :mod:`.parts`; what ``Handle.stats`` reports is :class:`.stats.VlmStats`.
Importing this package registers the adapter.
"""

from .adapter import VlmAdapter
from .parts import LLAVA_CLASSES
from .stats import VlmStats

__all__ = ["LLAVA_CLASSES", "VlmAdapter", "VlmStats"]
