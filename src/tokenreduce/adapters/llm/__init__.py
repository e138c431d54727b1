"""LLM adapter: KV-cache reduction in HF decoder LLMs (Llama, Qwen2, Mistral, Gemma 3), at prefill and while
decoding, through transformers' own extension points — no copied forward pass:

* **Cache layers** (:mod:`.cache`). The model's ``DynamicCache`` keeps its object; its ``DynamicLayer`` /
  ``DynamicSlidingWindowLayer`` layers become :class:`KVLayer` / :class:`KVSlidingLayer` (subclasses, swapped
  by ``__class__`` like ToMe swaps blocks). Until a layer is compressed it *is* the parent class (identical
  code path, so ``keep=1`` reproduces ``generate()`` exactly). Once compressed it is *compact*: it stores only
  the kept keys/values, physically shorter, plus ``pos`` (B, Hkv, P), the logical position of every entry
  (-1 = empty slot of a shorter sample: batches are ragged, padding + mask). ``get_seq_length()`` stays the
  logical length, so position ids (RoPE) of new tokens are ``original length + step`` as if nothing was
  evicted; kept keys already carry their RoPE rotation. Entries stay in positional order; sliding-window
  layers drop entries that left the window by position, not by slot.
* **Decoding without copies** (:mod:`.cache`, :mod:`.eviction`). A compact layer evicts while decoding by
  emptying slots (pos -1) and writes each new token into an empty or expired slot (sliding windows become ring
  buffers), so a decoding step neither repacks nor grows the cache once it is at its budget; slots are then not
  in positional order, which the masks built from ``pos`` ignore (``KVLayer.in_place = False`` repacks in order
  every step; tests check both agree).
* **Attention interface** (:mod:`.attention`, :mod:`.run`). The model's ``attn_implementation`` (``sdpa`` or
  ``eager``) is wrapped by a registered ``tokenreduce_<impl>`` function that (a) gives compact layers their own
  mask built from ``pos`` (:mod:`.masks`: causal, padding, sliding window, ragged slots), (b) runs the original
  attention, (c) lets the method score and evict right after the layer's attention (:mod:`.eviction`, budgets
  in :mod:`.budget`; TokenSelect attends to a per-query selection instead, :mod:`.selection`), with the exact
  q/k the model computed: SnapKV scores the last window's queries only (W x N rows), TOVA one row,
  Knorm/StreamingLLM/random no attention at all. The model is never switched to eager.
* **A forward pre-hook** on the base model puts the layers in place and reads the 2D padding mask
  (:mod:`.state`), and a forward hook records :class:`KVStats` (:mod:`.stats`: KV bytes of the real tensors,
  kept entries per layer and sample).
* **Prompt filters** (:mod:`.filter`; phase ``"filter"``, GemFilter): ``generate`` gets a thin wrapper that
  first runs the model's own forward on the prompt up to the filter layer (the attention wrapper scores there
  and stops the forward by an exception, so later layers never run on the full prompt; chunked like generate()
  if ``prefill_chunk_size`` is set), then calls the original ``generate`` on the kept tokens and returns the
  original prompt + the continuation.

``Handle.remove()`` restores ``attn_implementation`` and removes hooks/attributes: the model is exactly as before.

Usage::

    q = tr.question_length(tok, document, document + question)  # the question's tokens, never evicted
    with tr.apply(model, "snapkv", keep=0.25, question_len=q, preset="question-max9") as h:
        out = model.generate(**enc, max_new_tokens=16)          # batches with left padding work too
    h.stats.keep_achieved, h.stats.kv_bytes, h.stats.kept      # what ran, real bytes, entries per layer/sample
    with tr.apply(model, "streaming-llm", keep=tr.Keep(count=1024)):  # a fixed 1024-entry cache per layer
        model.generate(**enc, prefill_chunk_size=512)           # chunked prefill: eviction between chunks

``keep`` is the fraction of the KV-cache entries kept, of every layer's cache as it exists (a sliding-window
layer holds at most window-1 entries; see ``methods.kv.BUDGET_DOC``); ``tr.Keep(count=n)`` a capacity per
layer; ``layers=`` restricts a method to some layers; ``question_len`` trailing prompt tokens are never evicted
and count in the budget (``tr.generate_with_question`` runs a whole QA prompt). :func:`capture_prefill` /
:func:`replay_prefill` (:mod:`.replay`) evaluate many methods on one prompt forward (benchmarks). Not supported (clear errors): StaticCache/quantized/offloaded caches,
flash/flex attention, 4D attention masks, cropping a compressed cache (assisted decoding).
"""

from .adapter import FAMILIES, LLMAdapter
from .cache import KVLayer, KVSlidingLayer
from .replay import PrefillCapture, capture_prefill, replay_prefill
from .stats import KVStats

__all__ = ["FAMILIES", "KVLayer", "KVSlidingLayer", "KVStats", "LLMAdapter", "PrefillCapture", "capture_prefill",
           "replay_prefill"]
