"""LLM adapter: KV-cache reduction in HF decoder LLMs (Llama, Qwen2, Mistral, Gemma 3), at prefill and while
decoding, through transformers' own extension points — no copied forward pass:

* **Cache layers.** The model's ``DynamicCache`` keeps its object; its ``DynamicLayer`` /
  ``DynamicSlidingWindowLayer`` layers become :class:`KVLayer` / :class:`KVSlidingLayer` (subclasses, swapped
  by ``__class__`` like ToMe swaps blocks). Until a layer is compressed it *is* the parent class (identical
  code path, so ``keep=1`` reproduces ``generate()`` exactly). Once compressed it is *compact*: it stores only
  the kept keys/values, physically shorter, plus ``pos`` (B, Hkv, P), the logical position of every entry
  (-1 = empty slot of a shorter sample: batches are ragged, padding + mask). ``get_seq_length()`` stays the
  logical length, so position ids (RoPE) of new tokens are ``original length + step`` as if nothing was
  evicted; kept keys already carry their RoPE rotation. Entries stay in positional order; sliding-window
  layers drop entries that left the window by position, not by slot.
* **Decoding without copies.** A compact layer evicts while decoding by emptying slots (pos -1) and writes each new
  token into an empty or expired slot (sliding windows become ring buffers), so a decoding step neither repacks
  nor grows the cache once it is at its budget; slots are then not in positional order, which the masks built
  from ``pos`` ignore (``KVLayer.in_place = False`` repacks in order every step; tests check both agree).
* **Attention interface.** The model's ``attn_implementation`` (``sdpa`` or ``eager``) is wrapped by a
  registered ``tokenreduce_<impl>`` function that (a) gives compact layers their own mask built from
  ``pos`` (causal, padding, sliding window, ragged slots), (b) runs the original attention, (c) lets the
  method score and evict right after the layer's attention, with the exact q/k the model computed: SnapKV
  scores the last window's queries only (W x N rows), TOVA one row, Knorm/StreamingLLM/random no attention at
  all. The model is never switched to eager.
* **A forward pre-hook** on the base model puts the layers in place, reads the 2D padding mask, and a forward
  hook records :class:`KVStats` (KV bytes of the real tensors, kept entries per layer and sample).
* **Prompt filters** (phase ``"filter"``, GemFilter): ``generate`` gets a thin wrapper that first runs the model's
  own forward on the prompt up to the filter layer (the attention wrapper scores there and stops the forward by
  an exception, so later layers never run on the full prompt; chunked like generate() if
  ``prefill_chunk_size`` is set), then calls the original ``generate`` on the kept tokens and returns the
  original prompt + the continuation.

``Handle.remove()`` restores ``attn_implementation`` and removes hooks/attributes: the model is exactly as before.

Usage::

    with tr.apply(model, "snapkv", keep=0.25, question_len=17, window_size="question") as h:
        out = model.generate(**enc, max_new_tokens=16)          # batches with left padding work too
    h.stats.prefill_kept_fraction, h.stats.kv_bytes, h.stats.kept  # real bytes, entries per layer/sample
    with tr.apply(model, "streaming-llm", keep=1024):           # a fixed 1024-entry cache per layer
        model.generate(**enc, prefill_chunk_size=512)           # chunked prefill: eviction between chunks

``keep`` applies to every layer's cache as it exists (a sliding-window layer holds at most window-1 entries);
``layers=`` restricts a method to some layers; ``question_len`` trailing prompt tokens are never evicted and
count in the budget. Not supported (clear errors): StaticCache/quantized/offloaded caches, flash/flex
attention, 4D attention masks, cropping a compressed cache (assisted decoding).
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from ..accounting.kv import kv_bytes
from ..core import kv as K
from ..methods.kv import KVContext, KVMethod
from .base import Handle, Patcher, Stats, register_adapter

__all__ = ["FAMILIES", "KVLayer", "KVSlidingLayer", "KVStats", "LLMAdapter", "PrefillCapture", "capture_prefill",
           "generate_with_question", "question_length", "replay_prefill"]

FAMILIES = {
    "llama": ("LlamaForCausalLM", "LlamaModel"),
    "qwen2": ("Qwen2ForCausalLM", "Qwen2Model"),
    "mistral": ("MistralForCausalLM", "MistralModel"),
    "gemma3": ("Gemma3ForCausalLM", "Gemma3TextModel"),
}
ATTN_IMPLS = ("sdpa", "eager")
_ATTR = "_tokenreduce_kv"
_STATE = "_tokenreduce_kv_state"


# ============================================================================ cache layers
def _compressible(parent: type, name: str, doc: str) -> type:
    """``parent`` (DynamicLayer or DynamicSlidingWindowLayer) plus the compact mode (see module docstring).
    A direct subclass, so existing parent instances can be re-classed in place (``__class__`` swap)."""

    class Layer(parent):  # type: ignore[valid-type, misc]
        #: decoding steps reuse slots (write the new entry into an evicted/expired slot, evict by emptying a slot)
        #: instead of repacking the cache in positional order every step; both give the same attention
        in_place: bool = True
        compact: bool
        pos: Tensor | None
        state: dict[str, Tensor]
        per_head: bool
        _tr_seen: int

        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            self._tr_init()

        def _dense_length(self) -> int:
            return int(parent.get_seq_length(self))

        def _tr_init(self) -> None:
            self.compact = False
            self.pos = None
            self.state = {}
            self.per_head = False
            self._tr_seen = 0
            self._owned = False  # keys/values are tensors this layer made (safe to overwrite slots in place)

        # -- logical length (drives position ids) vs physical entries (drive the mask)
        def logical_length(self) -> int:
            return self._tr_seen if self.compact else self._dense_length()

        def dense_positions(self, n: int, batch: int, heads: int, device: torch.device) -> Tensor:
            """Positions of the last ``n`` entries a dense layer returns/stores (they are contiguous)."""
            seen = self._dense_length()
            return torch.arange(seen - n, seen, device=device).view(1, 1, n).expand(batch, heads, n)

        def to_compact(self) -> None:
            """Switch a dense layer to explicit positions (nothing evicted)."""
            if self.compact:
                return
            seen = self._dense_length()
            if self.is_initialized and self.keys is not None and self.keys.numel():
                B, H, n, _ = self.keys.shape
                self.pos = self.dense_positions(n, B, H, self.keys.device).contiguous()
            else:
                self.pos = None
            self._tr_seen = seen
            self.compact = True

        def set_entries(self, keys: Tensor, values: Tensor, pos: Tensor, keep: Tensor,
                        state: dict[str, Tensor] | None = None) -> None:
            """Keep the entries where ``keep`` (B,H,N) is true, packed to the front of each row in positional
            order; shorter rows are padded with empty slots (pos -1)."""
            seen = self.logical_length()
            N = keys.shape[2]
            counts = keep.sum(-1)
            P = int(counts.max().item()) if counts.numel() else 0
            ar = torch.arange(N, device=keys.device)
            order = torch.where(keep, ar, ar + N).argsort(dim=-1)[..., :P]
            ok = keep.gather(2, order)
            D = keys.shape[-1]
            gi = order.unsqueeze(-1).expand(-1, -1, -1, D)
            self.keys = keys.gather(2, gi)
            self.values = values.gather(2, order.unsqueeze(-1).expand(-1, -1, -1, values.shape[-1]))
            self.pos = torch.where(ok, pos.gather(2, order), torch.full_like(order, -1))
            self.state = {k: torch.where(ok, v.gather(2, order), torch.zeros((), dtype=v.dtype, device=v.device))
                          for k, v in (state or {}).items()}
            self._tr_seen = seen
            self.compact = True
            self._owned = True
            if not self.is_initialized:
                self.dtype, self.device = keys.dtype, keys.device
                self.is_initialized = True

        def _append(self, key_states: Tensor, value_states: Tensor) -> tuple[Tensor, Tensor]:
            B, H, q, _ = key_states.shape
            new_pos = torch.arange(self._tr_seen, self._tr_seen + q, device=key_states.device).view(1, 1, q)
            new_pos = new_pos.expand(B, H, q)
            if self.keys is None or self.pos is None or not self.keys.numel():
                self.keys, self.values, self.pos = key_states, value_states, new_pos.contiguous()
                self.state = {k: torch.zeros(B, H, q, dtype=v.dtype, device=v.device) for k, v in self.state.items()}
                self._owned = False  # the model's own key/value tensors
            else:
                self.keys = torch.cat([self.keys, key_states], dim=-2)
                self.values = torch.cat([self.values, value_states], dim=-2)
                self.pos = torch.cat([self.pos, new_pos], dim=-1)
                self.state = {k: torch.cat([v, v.new_zeros(B, H, q)], dim=-1) for k, v in self.state.items()}
                self._owned = True
            if not self.is_initialized:
                self.dtype, self.device = key_states.dtype, key_states.device
                self.is_initialized = True
            self._tr_seen += q
            return self.keys, self.values

        def _dead(self) -> Tensor:
            """(B, H, P) slots holding no entry a query can see any more: empty (pos -1, evicted while decoding)
            or, in a sliding-window layer, left the window."""
            assert self.pos is not None
            dead = self.pos < 0
            window = getattr(self, "sliding_window", None)
            if window is not None:
                dead = dead | (self.pos <= self._tr_seen - window)
            return dead

        def _write_slot(self, dead: Tensor, key_states: Tensor, value_states: Tensor) -> tuple[Tensor, Tensor]:
            """Decoding step, one new entry: write it into each row's first dead slot (a ring buffer: no copy of
            the cache; entries are then not in positional order, which the masks built from ``pos`` ignore)."""
            assert self.keys is not None and self.values is not None and self.pos is not None
            B, H, _, D = key_states.shape
            slot = dead.to(torch.uint8).argmax(dim=-1, keepdim=True)  # (B, H, 1) first dead slot
            self.keys.scatter_(2, slot.unsqueeze(-1).expand(B, H, 1, D), key_states)
            self.values.scatter_(2, slot.unsqueeze(-1).expand(B, H, 1, value_states.shape[-1]), value_states)
            self.pos.scatter_(2, slot, torch.full_like(slot, self._tr_seen))
            for v in self.state.values():
                v.scatter_(2, slot, torch.zeros((), dtype=v.dtype, device=v.device).expand(B, H, 1))
            self._tr_seen += 1
            return self.keys, self.values

        def mark_dead(self, drop: Tensor) -> None:
            """Evict entries while decoding without moving the others: their slots become empty (pos -1) and the
            next decoding step writes into them (:meth:`_write_slot`)."""
            assert self.pos is not None
            self.pos.masked_fill_(drop, -1)

        def _drop_empty(self, alive: Tensor) -> None:
            """Drop entries that are no longer alive (left the window / empty slots), keeping order."""
            if self.keys is None or self.pos is None:
                return
            if bool(alive.all()):
                return
            self.set_entries(self.keys, self.values, self.pos, alive, self.state)

        # -- transformers Cache API
        def update(self, key_states: Tensor, value_states: Tensor, *args: Any, **kwargs: Any):
            if not self.compact:
                return super().update(key_states, value_states, *args, **kwargs)
            if key_states.shape[2] == 1 and self.in_place and self._owned and self.pos is not None and self.pos.numel():
                dead = self._dead()
                if bool(dead.any(dim=-1).all()):  # every row has a free slot: no copy
                    return self._write_slot(dead, key_states, value_states)
            window = getattr(self, "sliding_window", None)
            if window is not None and self.pos is not None:
                self._drop_empty((self.pos >= 0) & (self.pos > self._tr_seen - window))
            return self._append(key_states, value_states)

        def get_seq_length(self) -> int:
            return self.logical_length()

        def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
            if not self.compact:
                return super().get_mask_sizes(query_length)  # type: ignore[misc]
            # the model's own mask is not used for compact layers (the attention wrapper builds one from
            # `pos`); keep the one the model builds as small as possible. (transformers < 5.3 passes the
            # cache_position tensor instead of the query length: kvpress's venv, for the same-process timings)
            q = int(query_length.shape[0]) if isinstance(query_length, Tensor) else query_length
            return q, 0

        def crop(self, tokens_to_remove: int) -> None:
            if self.compact:
                raise NotImplementedError("tokenreduce: a compressed KV cache cannot be cropped (assisted decoding "
                                          "and rollback are not supported while a kv-cache method is applied)")
            super().crop(tokens_to_remove)  # type: ignore[misc]

        def _index_batch(self, fn: Callable[[Tensor], Tensor]) -> None:
            if self.pos is not None:
                self.pos = fn(self.pos)
            self.state = {k: fn(v) for k, v in self.state.items()}

        def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
            super().reorder_cache(beam_idx)  # type: ignore[misc]
            if self.compact:
                self._index_batch(lambda t: t.index_select(0, beam_idx.to(t.device)))

        def batch_repeat_interleave(self, repeats: int) -> None:
            super().batch_repeat_interleave(repeats)  # type: ignore[misc]
            if self.compact:
                self._index_batch(lambda t: t.repeat_interleave(repeats, dim=0))

        def batch_select_indices(self, indices: Tensor) -> None:
            super().batch_select_indices(indices)  # type: ignore[misc]
            if self.compact:
                self._index_batch(lambda t: t[indices, ...])

    Layer.__name__ = Layer.__qualname__ = name
    Layer.__doc__ = doc
    return Layer


def _layer_classes() -> tuple[type, type]:
    from transformers.cache_utils import DynamicLayer, DynamicSlidingWindowLayer

    return (_compressible(DynamicLayer, "KVLayer", "A ``DynamicLayer`` that can be compressed."),
            _compressible(DynamicSlidingWindowLayer, "KVSlidingLayer",
                          "A ``DynamicSlidingWindowLayer`` that can be compressed."))


KVLayer, KVSlidingLayer = _layer_classes()


def _convert_cache(cache: Any) -> None:
    """Swap the layers of a ``DynamicCache`` to the compressible subclasses (in place, data kept)."""
    from transformers.cache_utils import DynamicCache, DynamicLayer, DynamicSlidingWindowLayer

    if not isinstance(cache, DynamicCache):
        raise TypeError(
            f"unsupported cache type {type(cache).__name__}: tokenreduce kv-cache methods work on "
            f"transformers' DynamicCache (the default of generate()); StaticCache, quantized, offloaded and "
            f"encoder-decoder caches are not supported")
    if getattr(cache, "offloading", False):
        raise TypeError("unsupported cache: an offloaded DynamicCache is not supported by tokenreduce kv-cache methods")
    if cache.layer_class_to_replicate is not None and cache.layer_class_to_replicate is DynamicLayer:
        cache.layer_class_to_replicate = KVLayer
    for i, layer in enumerate(cache.layers):
        if isinstance(layer, (KVLayer, KVSlidingLayer)):
            continue
        if type(layer) is DynamicSlidingWindowLayer:
            layer.__class__ = KVSlidingLayer
        elif type(layer) is DynamicLayer:
            layer.__class__ = KVLayer
        else:
            raise TypeError(f"unsupported cache layer {i}: {type(layer).__name__}; tokenreduce kv-cache methods "
                            f"support DynamicLayer and DynamicSlidingWindowLayer")
        layer._tr_init()


def generate_with_question(model: nn.Module, tokenizer: Any, context: str, question: str, method: str,
                           keep: Any, max_new_tokens: int = 32, **kw: Any) -> tuple[str, KVStats]:
    """QA-pipeline convenience: ``context + question`` as one prompt, the question kept uncompressed
    (``question_len`` counted from the tokenizer), greedy decoding. Returns (generated text, stats).

    >>> text, st = generate_with_question(model, tok, document, "\nWhat is the pass key?\n", "snapkv", 0.25,
    ...                                   window_size="question")
    """
    import tokenreduce as tr

    prompt = context + question
    ids = tokenizer(prompt, return_tensors="pt").input_ids.to(next(model.parameters()).device)
    ql = question_length(tokenizer, context, prompt)
    with tr.apply(model, method, keep=keep, question_len=ql, **kw) as h, torch.inference_mode():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens,
                             do_sample=False)
        stats = h.stats
    return tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True), stats


def question_length(tokenizer: Any, context: str, full_prompt: str) -> int:
    """Tokens of ``full_prompt`` after its ``context`` prefix (the part to keep uncompressed)."""
    n_full = len(tokenizer(full_prompt).input_ids)
    n_ctx = len(tokenizer(context).input_ids)
    if not full_prompt.startswith(context) or n_full < n_ctx:
        raise ValueError("full_prompt must start with context")
    return n_full - n_ctx


# ============================================================================ prefill capture / replay
@dataclass
class PrefillCapture:
    """One unreduced prompt forward: per layer the (query, key, value) the attention received and its kwargs
    (scaling, softcap), plus the logits of the last prompt token. See :func:`replay_prefill`."""

    input_ids: Tensor
    attention_mask: Tensor
    layers: list[tuple[Tensor, Tensor, Tensor, dict[str, Any]]]
    last_logits: Tensor
    cache: Any = None  # the unreduced cache after the prompt (decoding from it appends, never writes in place)


def capture_prefill(model: nn.Module, input_ids: Tensor, attention_mask: Tensor | None = None) -> PrefillCapture:
    """Run the unreduced prompt forward once and keep every layer's q/k/v (an attention-interface wrapper that
    records and then calls the model's own attention). With :func:`replay_prefill` many kv-cache methods can be
    evaluated on one prompt for the cost of one prefill: eviction happens *after* each layer's attention, so a
    method's prompt forward computes exactly these tensors and logits (benchmarks; checked against the real
    path in tests/test_kv_methods.py)."""
    from transformers import DynamicCache
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS, AttentionInterface

    base = model.base_model
    config = base.config
    impl = config._attn_implementation
    if impl not in ATTN_IMPLS:
        raise TypeError(f"attn_implementation={impl!r} is not supported; accepted: {', '.join(ATTN_IMPLS)}")
    layers_out: dict[int, tuple[Tensor, Tensor, Tensor, dict[str, Any]]] = {}

    def capture(module: nn.Module, query: Tensor, key: Tensor, value: Tensor, attention_mask: Any, **kwargs: Any):
        layers_out[module.layer_idx] = (query, key, value, {k: kwargs.get(k) for k in ("scaling", "softcap")})
        inner = _family_eager(module) if impl == "eager" else ALL_ATTENTION_FUNCTIONS["sdpa"]
        return inner(module, query, key, value, attention_mask, **kwargs)

    name = f"tokenreduce_capture_{impl}"
    AttentionInterface.register(name, capture)
    ALL_MASK_ATTENTION_FUNCTIONS.register(name, ALL_MASK_ATTENTION_FUNCTIONS[impl])
    mask = torch.ones_like(input_ids) if attention_mask is None else attention_mask
    cache = DynamicCache(config=config)
    config._attn_implementation = name
    try:
        with torch.inference_mode():
            out = model(input_ids=input_ids, attention_mask=mask, past_key_values=cache, use_cache=True,
                        logits_to_keep=1)
    finally:
        config._attn_implementation = impl
    return PrefillCapture(input_ids, mask, [layers_out[i] for i in range(len(layers_out))], out.logits[:, -1], cache)


def replay_prefill(handle: Handle, capture: PrefillCapture) -> Any:
    """The prompt forward of an applied kv-cache method, rebuilt from a :class:`PrefillCapture` without
    recomputing the model: every layer's cache is filled with the captured keys/values and the method scores and
    evicts with the captured queries, exactly as the attention wrapper does after the layer's attention.
    Returns the (compressed) cache; ``handle.stats`` is set as after a real prefill; continue decoding with the
    model as usual (``capture.last_logits`` are the prompt's next-token logits)."""
    from transformers import DynamicCache

    model = handle.model
    base = model.base_model
    run = base.layers[0].self_attn.__dict__.get(_ATTR)
    if run is None:
        raise TypeError("replay_prefill needs the handle of a kv-cache method applied to this model")
    if run.method.phase == "filter":
        raise TypeError(f"{run.name} changes the prompt forward itself (a prompt filter): it cannot be replayed "
                        f"from a captured unreduced prefill; run generate()")
    cache = DynamicCache(config=base.config)
    run.pre_forward(base, (), {"input_ids": capture.input_ids, "attention_mask": capture.attention_mask,
                                "past_key_values": cache, "use_cache": True})
    f = run.fwd
    assert f is not None and f.is_prefill
    method = run.method
    with torch.inference_mode():
        for li, (query, key, value, kw) in enumerate(capture.layers):
            module = base.layers[li].self_attn
            k_all, v_all = cache.update(key, value, li)
            if method.is_identity or not method.compresses(li, run.num_layers):
                continue
            if method.phase in ("decode", "prefill"):
                t0 = time.perf_counter()
                run._reduce(li, cache.layers[li], f, query, k_all, v_all, module, kw)
                f.reduce_seconds += time.perf_counter() - t0
        run.post_forward(base, (), {}, None)
    return cache


# ============================================================================ stats
@dataclass
class KVStats(Stats):
    """:class:`Stats` of the last forward plus the KV-cache accounting.

    ``kept[l][b]``: real entries of layer l for sample b (mean over KV heads); ``slots[l]``: physical length
    of layer l (max over the batch); ``budgets[l][b]``: budget set at prefill (None: not limited);
    ``kv_bytes``: bytes of the key/value tensors the cache really holds (``kv_bytes_storage``: their
    storages); ``kv_bytes_unreduced``: what transformers' DynamicCache holds for the same tokens;
    ``kv_kept_fraction = kv_bytes / kv_bytes_unreduced``; ``evicted``: some entry was evicted in this forward.
    """

    kept: list[list[float]] = field(default_factory=list)
    slots: list[int] = field(default_factory=list)
    budgets: list[list[int] | None] = field(default_factory=list)
    layer_types: list[str] = field(default_factory=list)
    kv_bytes: int = 0
    kv_bytes_storage: int = 0
    kv_bytes_unreduced: int = 0
    kv_kept_fraction: float = 1.0
    logical_length: int = 0
    question_entries: list[int] = field(default_factory=list)
    evicted: bool = False
    attended: list[float] = field(default_factory=list)
    prefill_kv_bytes: int = 0
    prefill_kv_bytes_unreduced: int = 0
    prefill_kept: list[list[float]] = field(default_factory=list)
    filter_kept: list[list[int]] = field(default_factory=list)  # prompt filters: kept prompt columns per sample

    @property
    def prefill_kept_fraction(self) -> float:
        """KV bytes right after the prompt / what the unreduced cache held then."""
        return self.prefill_kv_bytes / self.prefill_kv_bytes_unreduced if self.prefill_kv_bytes_unreduced else 1.0


# ============================================================================ runtime
@dataclass
class _CacheState:
    """Per-cache bookkeeping (stored on the cache object, so several caches do not interfere)."""

    prompt_end: Tensor | None = None  # (B,) first column after the prompt
    question_start: Tensor | None = None  # (B,) first question column
    question_len: Tensor | None = None  # (B,)
    decoding: bool = False  # a one-token forward came after the prompt (chunked prefill is over)
    first_col: Tensor | None = None  # (B,) first real column (left padding)
    budgets: dict[int, Tensor] = field(default_factory=dict)  # layer -> (B,) budget
    compact: bool = False
    select_cache: dict[int, tuple[Tensor, Tensor]] = field(default_factory=dict)  # tokenselect reuse
    prefill: dict[str, Any] = field(default_factory=dict)  # stats snapshot right after the prompt


class _FilterDone(Exception):
    """Stops the filter pass at the filter layer (its layers after the filter layer never run)."""


@dataclass
class _FilterPass:
    """The prompt filter pass in progress: filter layer, whether this chunk ends the prompt, 2D mask, scores."""

    layer: int
    final: bool
    mask2d: Tensor  # (B, L) bool, L = prompt columns up to the end of this chunk
    question_len: Tensor  # (B,)
    budget: Tensor  # (B,) prompt tokens to keep
    scores: Tensor | None = None  # (B, 1, N) once the final chunk reached the filter layer
    forced: Tensor | None = None  # (B, 1, N) tokens the method always keeps


@dataclass
class _Forward:
    cache: Any
    mask2d: Tensor | None  # (B, L) bool, L >= logical length after this forward
    q_len: int
    batch: int
    is_prefill: bool
    cstate: _CacheState
    evicted: bool = False
    reduce_seconds: float = 0.0
    notes: list[str] = field(default_factory=list)
    attended: dict[int, float] = field(default_factory=dict)


class _KVRun:
    def __init__(self, model: nn.Module, base: nn.Module, method: KVMethod, name: str, impl: str,
                 inner: Callable[..., Any], attn_modules: list[nn.Module]) -> None:
        self.model, self.base, self.method, self.name = model, base, method, name
        self.impl, self.inner = impl, inner
        self.config = base.config
        self.num_layers = len(attn_modules)
        self.layer_types = list(getattr(self.config, "layer_types", None) or ["full_attention"] * self.num_layers)
        self.fwd: _Forward | None = None
        self._stats = KVStats(method=name)
        self.filter: _FilterPass | None = None  # set while a prompt filter pass runs (GemFilter)
        self.filter_removed = 0  # prompt columns the last filter removed (for the unreduced KV accounting)
        self.filter_seconds = 0.0
        self.filter_notes: list[str] = []
        self.in_generate = False  # a prompt filter acts inside generate() only
        self.filter_kept: list[list[int]] = []

    # ------------------------------------------------------------------ hooks on the base model
    def pre_forward(self, module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        from transformers.cache_utils import DynamicCache

        if self.filter is not None:  # the filter pass is a plain forward of the first layers
            return args, kwargs

        ids = kwargs.get("input_ids", args[0] if args else None)
        emb = kwargs.get("inputs_embeds")
        ref = ids if ids is not None else emb
        if ref is None:
            raise ValueError("tokenreduce kv-cache: the model got neither input_ids nor inputs_embeds")
        B, q_len = int(ref.shape[0]), int(ref.shape[1])
        cache = kwargs.get("past_key_values")
        use_cache = kwargs.get("use_cache")
        use_cache = self.config.use_cache if use_cache is None else use_cache
        if cache is None and use_cache:
            cache = DynamicCache(config=self.config)
            kwargs["past_key_values"] = cache
        if cache is None:
            self.fwd = None
            return args, kwargs
        _convert_cache(cache)
        mask = kwargs.get("attention_mask")
        if mask is not None and (isinstance(mask, dict) or mask.dim() != 2):
            raise TypeError("tokenreduce kv-cache methods need a 2D padding attention_mask (batch, length) or None; "
                            f"got {'a dict' if isinstance(mask, dict) else f'a {mask.dim()}D tensor'}")
        mask2d = None if mask is None else mask.to(torch.bool)
        cstate: _CacheState = getattr(cache, _STATE, None) or _CacheState()
        setattr(cache, _STATE, cstate)
        past = cache.get_seq_length()
        is_prefill = past == 0
        dev = ref.device
        if is_prefill:
            cstate.__init__()  # a fresh cache (or one that was reset)
            end = torch.full((B,), q_len, dtype=torch.long, device=dev)
            ql = self.method.question_len
            qlt = torch.as_tensor([ql] * B if isinstance(ql, int) else list(ql), dtype=torch.long, device=dev)
            if qlt.numel() != B:
                raise ValueError(f"question_len has {qlt.numel()} values but the batch has {B} samples")
            cstate.prompt_end, cstate.question_start, cstate.question_len = end, end - qlt, qlt
            if mask2d is not None:
                if mask2d.shape[1] < q_len:
                    raise ValueError(f"attention_mask has {mask2d.shape[1]} columns for {q_len} tokens")
                real = mask2d[:, :q_len]
                cstate.first_col = torch.where(real.any(1), real.float().argmax(1), torch.zeros(B, device=dev)).long()
                n_real = real.sum(1)
                if bool((qlt > n_real).any()):
                    raise ValueError(f"question_len={ql} is longer than a prompt ({int(n_real.min())} real tokens)")
            else:
                cstate.first_col = torch.zeros(B, dtype=torch.long, device=dev)
                if int(qlt.max()) > q_len:
                    raise ValueError(f"question_len={ql} is longer than the prompt ({q_len} tokens)")
        else:
            if not cstate.decoding and q_len > 1 and cstate.prompt_end is not None:
                # chunked prefill: the prompt (and its question, at its end) extends to this chunk
                cstate.prompt_end = torch.full_like(cstate.prompt_end, past + q_len)
                cstate.question_start = cstate.prompt_end - cstate.question_len
            elif q_len == 1:
                cstate.decoding = True
            if cstate.compact:
                for layer in cache.layers:
                    layer.to_compact()
        self.fwd = _Forward(cache, mask2d, q_len, B, is_prefill, cstate)
        return args, kwargs

    def post_forward(self, module: nn.Module, args: tuple, kwargs: dict, output: Any) -> Any:
        f = self.fwd
        if f is None or self.filter is not None:
            return output
        self._stats = self._collect(f)
        self.fwd = None
        return output

    def stats(self) -> KVStats:
        return self._stats

    # ------------------------------------------------------------------ attention wrapper
    def attention(self, module: nn.Module, query: Tensor, key: Tensor, value: Tensor, attention_mask: Any,
                  **kwargs: Any) -> Any:
        if self.filter is not None:
            return self._filter_attention(module, query, key, value, attention_mask, **kwargs)
        f = self.fwd
        if f is None:
            return self.inner(module, query, key, value, attention_mask, **kwargs)
        li = module.layer_idx
        layer = f.cache.layers[li]
        if layer.compact:
            attention_mask = self._mask(layer, f, query, key.shape[2], module)
        method = self.method
        if method.is_identity or not method.compresses(li, self.num_layers):
            return self.inner(module, query, key, value, attention_mask, **kwargs)
        if method.phase == "select" and not f.is_prefill:
            t0 = time.perf_counter()
            key, value, attention_mask = self._select(li, layer, f, query, key, value, attention_mask, module,
                                                      kwargs)
            f.reduce_seconds += time.perf_counter() - t0
        out = self.inner(module, query, key, value, attention_mask, **kwargs)
        if method.phase == "prefill" and not f.is_prefill and f.q_len > 1:
            f.notes.append(f"{method.name} compresses the prompt once: this {f.q_len}-token forward on a non-empty "
                           f"cache was appended uncompressed (chunked prefill is supported by decoding methods)")
        if method.phase == "decode" or (method.phase == "prefill" and f.is_prefill):
            t0 = time.perf_counter()
            self._reduce(li, layer, f, query, key, value, module, kwargs)
            f.reduce_seconds += time.perf_counter() - t0
        return out

    # ------------------------------------------------------------------ helpers
    def _valid(self, pos: Tensor, f: _Forward) -> Tensor:
        v = pos >= 0
        if f.mask2d is not None:
            B = pos.shape[0]
            g = f.mask2d.gather(1, pos.clamp(min=0).reshape(B, -1)).view_as(pos)
            v = v & g
        return v

    def _qpos(self, layer: Any, f: _Forward, device: torch.device) -> Tensor:
        end = layer.logical_length()
        return torch.arange(end - f.q_len, end, device=device)

    def _mask(self, layer: Any, f: _Forward, query: Tensor, n_keys: int, module: nn.Module) -> Tensor | None:
        pos = layer.pos
        if pos is None or pos.shape[-1] != n_keys:
            raise RuntimeError(f"tokenreduce: layer {module.layer_idx} holds {None if pos is None else pos.shape[-1]}"
                               f" positions for {n_keys} keys")
        valid = self._valid(pos, f)
        qpos = self._qpos(layer, f, pos.device)
        p = pos.unsqueeze(2)
        q = qpos.view(1, 1, -1, 1)
        allowed = valid.unsqueeze(2) & (p <= q)
        window = getattr(layer, "sliding_window", None)
        if window is not None:
            allowed = allowed & (q - p < window)
        if f.q_len == 1 and bool(allowed.all()):
            return None  # one query that sees every entry: no mask (the attention's fastest path)
        return self._to_attn_mask(allowed, layer.per_head, query)

    def _to_attn_mask(self, allowed: Tensor, per_head: bool, query: Tensor) -> Tensor:
        Hq, Hkv = query.shape[1], allowed.shape[1]
        if per_head and Hkv > 1:
            allowed = allowed.repeat_interleave(Hq // Hkv, dim=1)
        else:
            allowed = allowed[:, :1]
        if self.impl == "eager":
            return torch.zeros(allowed.shape, dtype=query.dtype, device=query.device).masked_fill(
                ~allowed, torch.finfo(query.dtype).min)
        return allowed

    def _entries(self, layer: Any, f: _Forward, key: Tensor, value: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """All entries this forward sees, with positions: (keys, values, pos)."""
        if layer.compact:
            return layer.keys, layer.values, layer.pos
        B, H, N, _ = key.shape
        return key, value, layer.dense_positions(N, B, H, key.device)

    def _context(self, li: int, layer: Any, f: _Forward, query: Tensor, keys: Tensor, pos: Tensor, valid: Tensor,
                 module: nn.Module, kwargs: dict) -> KVContext:
        cs = f.cstate
        rel = pos - cs.first_col.view(-1, 1, 1)
        return KVContext(query=query, keys=keys, pos=pos, valid=valid, qpos=self._qpos(layer, f, pos.device), rel=rel,
                         prompt_end=cs.prompt_end, question_start=cs.question_start, scaling=float(kwargs.get("scaling") or module.scaling), layer=li,
                         num_layers=self.num_layers, window=getattr(layer, "sliding_window", None),
                         softcap=kwargs.get("softcap"), is_prefill=f.is_prefill, state=dict(layer.state))

    def _regions(self, layer: Any, f: _Forward, pos: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """valid (real), alive (visible to the next query), question (protected) masks, (B, H, N)."""
        valid = self._valid(pos, f)
        alive = valid
        window = getattr(layer, "sliding_window", None)
        if window is not None:
            alive = alive & (pos > layer.logical_length() - window)
        cs = f.cstate
        question = (pos >= cs.question_start.view(-1, 1, 1)) & (pos < cs.prompt_end.view(-1, 1, 1))
        return valid, alive, question

    def _natural(self, layer: Any, f: _Forward) -> Tensor:
        """(B,) real entries an unreduced cache of this layer holds now (what ``keep`` is a fraction of)."""
        t = layer.logical_length()
        window = getattr(layer, "sliding_window", None)
        lo = 0 if window is None else max(0, t - window + 1)
        if f.mask2d is None:
            return torch.full((f.batch,), t - lo, dtype=torch.long)
        return f.mask2d[:, lo:t].sum(1).long()

    def _set_budget(self, li: int, layer: Any, f: _Forward) -> Tensor:
        """Budget of layer ``li`` (B,): a ratio ``keep`` is a fraction of what the unreduced cache holds at
        this point (so KV bytes follow ``keep`` during chunked prefill and decoding too); a count is fixed."""
        n = self._natural(layer, f).to(f.cstate.prompt_end.device)
        cs = f.cstate
        budget = self.method.layer_budget(li, self.num_layers, n, cs.prompt_end - cs.question_start)
        if f.is_prefill and bool((budget >= n).any()):
            f.notes.append(f"layer {li}: a budget >= the {int(n.min())} entries of a sample: nothing evicted there")
        cs.budgets[li] = budget
        return budget

    def _check_budget(self, li: int, budget: Tensor, n_forced: Tensor, n: Tensor) -> None:
        """A budget must hold the entries the method forces (sinks, windows) plus ``min_free``."""
        method = self.method
        need = n_forced + method.min_free  # (B, H)
        short = (need > budget.view(-1, 1)) & (n > budget.view(-1, 1))
        if bool(short.any()):
            b = int(budget.view(-1, 1).expand_as(need)[short].min())
            k = int(need[short].max())
            raise ValueError(
                f"{method.name}: the budget of layer {li} is {b} entries (keep="
                f"{method.layer_keep(li, self.num_layers)} of {int(n.max())} entries), smaller than "
                f"{method.forced_desc() or 'the forced entries'}"
                f"{' + the question' if self._has_question() and 'question' not in method.forced_desc() else ''}"
                f" = {k} entries; accepted: a keep giving at least {k} entries per layer")

    def _has_question(self) -> bool:
        ql = self.method.question_len
        return bool(ql if isinstance(ql, int) else any(ql))

    # ------------------------------------------------------------------ eviction
    def _reduce(self, li: int, layer: Any, f: _Forward, query: Tensor, key: Tensor, value: Tensor,
                module: nn.Module, kwargs: dict) -> None:
        method = self.method
        keys, values, pos = self._entries(layer, f, key, value)
        if method.phase == "prefill" and not f.is_prefill:
            return
        budget = self._set_budget(li, layer, f)  # grows with the sequence (ratio) or up to a fixed count
        valid, alive, question = self._regions(layer, f, pos)
        cand = alive
        n = cand.sum(-1)  # (B, H)
        if not bool((n > budget.view(-1, 1)).any()):
            if f.is_prefill and method.phase == "prefill":
                f.notes.append(f"layer {li}: {int(n.max())} entries <= budget, nothing evicted")
            if method.stateful:  # keep the method's per-entry state (H2O's sums) aligned with the entries
                ctx = self._context(li, layer, f, query, keys, pos, valid, module, kwargs)
                method.score(ctx)
                if layer.compact:
                    layer.state = dict(ctx.state)
                else:
                    layer.set_entries(keys, values, pos, alive, ctx.state)
                    f.cstate.compact = True
            return
        B, H, N = pos.shape
        ctx = self._context(li, layer, f, query, keys, pos, valid, module, kwargs)
        forced = (method.forced(ctx, budget).expand(B, H, N) | question) & cand  # the question stays, in budget
        self._check_budget(li, budget, forced.sum(-1), n)
        scores = method.score(ctx)
        scores = scores.expand(B, H, N) if scores.shape[1] == 1 else scores
        counts = torch.minimum(n, budget.view(-1, 1))
        idx, ok = K.select_in_order(scores, cand, forced, counts)
        keep = torch.zeros(B, H, N, dtype=torch.long, device=pos.device).scatter_add_(2, idx, ok.long()) > 0
        if f.q_len == 1 and layer.compact and layer.in_place and layer._owned and layer.keys is keys:
            # a decoding step evicts in place: slots emptied, refilled by the next token (no repacking copy)
            layer.state = dict(ctx.state)
            layer.mark_dead(cand & ~keep)
        else:
            layer.set_entries(keys, values, pos, keep, ctx.state)
        layer.per_head = layer.per_head or not method.shared_heads
        f.cstate.compact = True
        f.evicted = True

    # ------------------------------------------------------------------ tokenselect
    def _select(self, li: int, layer: Any, f: _Forward, query: Tensor, key: Tensor, value: Tensor,
                attention_mask: Any, module: nn.Module, kwargs: dict) -> tuple[Tensor, Tensor, Any]:
        method = self.method
        keys, values, pos = self._entries(layer, f, key, value)
        budget = self._set_budget(li, layer, f)
        _, alive, question = self._regions(layer, f, pos)
        qpos = self._qpos(layer, f, pos.device)
        alive = alive & (pos <= qpos[0])  # entries visible to this forward's first query
        n = alive[:, 0].sum(-1)
        if not bool((n > budget).any()):
            f.attended[li] = float(n.float().mean())
            return key, value, attention_mask
        B, H, N = pos.shape
        ctx = self._context(li, layer, f, query, keys, pos[:, :1], alive[:, :1], module, kwargs)
        forced = (method.forced(ctx, budget)[:, :1] | question[:, :1]) & alive[:, :1]
        self._check_budget(li, budget, forced.sum(-1), n.view(-1, 1))
        cand = alive[:, :1]
        middle = cand & ~forced
        n_mid = torch.clamp(budget - forced.sum(-1)[:, 0], min=0)  # (B,)
        qvec = query.float().mean(dim=2).reshape(B, -1)
        # selection cache (per sample): reuse the previous middle selection if the query barely moved
        reuse = torch.zeros(B, dtype=torch.bool, device=pos.device)
        prev = f.cstate.select_cache.get(li)
        if method.reuse_threshold is not None and prev is not None and prev[0].shape == qvec.shape:
            reuse = torch.nn.functional.cosine_similarity(qvec, prev[0], dim=-1) > method.reuse_threshold
        if bool(reuse.all()):
            assert prev is not None
            chosen = (pos[:, :1].unsqueeze(-1) == prev[1].view(B, 1, 1, -1)).any(-1) & middle
        else:
            scores = K.head_soft_vote(query, keys, middle)
            idx, ok = K.select_in_order(scores, middle, torch.zeros_like(middle), n_mid.view(-1, 1))
            chosen = torch.zeros(B, 1, N, dtype=torch.long, device=pos.device).scatter_add_(2, idx, ok.long()) > 0
            sel = torch.where(ok[:, 0], pos[:, 0].gather(1, idx[:, 0]), torch.full_like(idx[:, 0], -1))
            if bool(reuse.any()):
                assert prev is not None
                old = (pos[:, :1].unsqueeze(-1) == prev[1].view(B, 1, 1, -1)).any(-1) & middle
                chosen = torch.where(reuse.view(B, 1, 1), old, chosen)
                width = max(sel.shape[1], prev[1].shape[1])
                sel = torch.nn.functional.pad(sel, (0, width - sel.shape[1]), value=-1)
                old_sel = torch.nn.functional.pad(prev[1], (0, width - prev[1].shape[1]), value=-1)
                sel = torch.where(reuse.view(B, 1), old_sel, sel)
                qvec = torch.where(reuse.view(B, 1), prev[0], qvec)
            f.cstate.select_cache[li] = (qvec, sel)
        keep = (chosen | forced)  # (B, 1, N)
        counts = keep.sum(-1)
        P = int(counts.max())
        ar = torch.arange(N, device=pos.device)
        order = torch.where(keep, ar, ar + N).argsort(dim=-1)[..., :P]  # (B, 1, P)
        ok = keep.gather(2, order)
        D = keys.shape[-1]
        o = order.expand(B, H, P)
        k_sel = keys.gather(2, o.unsqueeze(-1).expand(B, H, P, D))
        v_sel = values.gather(2, o.unsqueeze(-1).expand(B, H, P, values.shape[-1]))
        p_sel = torch.where(ok, pos[:, :1].gather(2, order), torch.full_like(order, -1))  # (B, 1, P)
        qp = qpos.view(1, 1, -1, 1)
        allowed = ok.unsqueeze(2) & (p_sel.unsqueeze(2) <= qp)
        window = getattr(layer, "sliding_window", None)
        if window is not None:
            allowed = allowed & (qp - p_sel.unsqueeze(2) < window)
        f.attended[li] = float(counts.float().mean())
        return k_sel, v_sel, self._to_attn_mask(allowed, False, query)

    # ------------------------------------------------------------------ prompt filter (GemFilter)
    def _filter_attention(self, module: nn.Module, query: Tensor, key: Tensor, value: Tensor, attention_mask: Any,
                          **kwargs: Any) -> Any:
        fp = self.filter
        assert fp is not None
        li = module.layer_idx
        if li < fp.layer:
            return self.inner(module, query, key, value, attention_mask, **kwargs)
        if fp.final:  # the filter layer sees every prompt key: score with the last queries, then stop
            B, H, N, _ = key.shape
            dev = key.device
            pos = torch.arange(N, device=dev).view(1, 1, N).expand(B, H, N)
            valid = fp.mask2d[:, :N].view(B, 1, N).expand(B, H, N)
            first = torch.where(fp.mask2d.any(1), fp.mask2d.float().argmax(1), torch.zeros(B, device=dev)).long()
            end = torch.full((B,), N, dtype=torch.long, device=dev)
            ctx = KVContext(query=query, keys=key, pos=pos, valid=valid, qpos=torch.arange(N - query.shape[2], N,
                                                                                            device=dev),
                            rel=pos - first.view(-1, 1, 1), prompt_end=end, question_start=end - fp.question_len,
                            scaling=float(kwargs.get("scaling") or module.scaling), layer=li,
                            num_layers=self.num_layers, window=getattr(module, "sliding_window", None),
                            softcap=kwargs.get("softcap"), is_prefill=True)
            fp.scores = self.method.score(ctx)
            fp.forced = self.method.forced(ctx, fp.budget) & valid[:, :1]
        raise _FilterDone

    def filter_prompt(self, input_ids: Tensor, attention_mask: Tensor | None, chunk: int | None
                      ) -> tuple[Tensor, Tensor]:
        """GemFilter's selection: the model's forward up to the filter layer (chunked if ``chunk``), the method's
        scores there, its top-``keep`` per sample (its forced tokens included) in positional order. Returns the kept
        ids and their mask, left-padded like the input (pad id 0 under mask 0)."""
        method = self.method
        if input_ids is None or input_ids.dim() != 2:
            raise ValueError(f"{method.name} filters input_ids (batch, length); got "
                             f"{None if input_ids is None else tuple(input_ids.shape)} (inputs_embeds are not supported)")
        B, N = input_ids.shape
        dev = input_ids.device
        mask = torch.ones_like(input_ids, dtype=torch.bool) if attention_mask is None else attention_mask.bool()
        if mask.shape != input_ids.shape:
            raise ValueError(f"attention_mask {tuple(mask.shape)} does not match input_ids {tuple(input_ids.shape)}")
        ql = method.question_len
        qlt = torch.as_tensor([ql] * B if isinstance(ql, int) else list(ql), dtype=torch.long, device=dev)
        if qlt.numel() != B:
            raise ValueError(f"question_len has {qlt.numel()} values but the batch has {B} samples")
        n_real = mask.sum(1)
        if bool((qlt >= n_real).any()):
            raise ValueError(f"question_len={ql} leaves no context to filter in a prompt of {int(n_real.min())} "
                             f"real tokens")
        layer = method.filter_layer(self.layer_types)
        budget = method.layer_budget(layer, self.num_layers, n_real, qlt)
        t0 = time.perf_counter()
        fp = self._filter_pass(input_ids, mask, chunk, _FilterPass(layer, False, mask, qlt, budget))
        assert fp.scores is not None and fp.forced is not None
        n_forced = fp.forced.sum(-1).view(-1)
        if bool((n_forced > budget).any()):
            b = int(budget[n_forced > budget].min())
            raise ValueError(f"{method.name}: keep={method.keep} leaves {b} prompt tokens, fewer than "
                             f"{method.forced_desc()} ({int(n_forced.max())} tokens); accepted: a keep giving at "
                             f"least {int(n_forced.max())} tokens")
        self.filter_notes = []
        if bool((budget >= n_real).any()):
            self.filter_notes.append(f"{method.name}: a budget >= the {int(n_real.min())} prompt tokens of a sample: "
                                     f"nothing filtered there")
        idx, ok = K.select_in_order(fp.scores, mask.view(B, 1, N), fp.forced, budget.view(B, 1))
        idx, ok = idx[:, 0], ok[:, 0]
        Kmax = idx.shape[1]
        # left-pad: the n_ok valid slots (first, in order) move to the end of the row
        src = torch.arange(Kmax, device=dev).view(1, -1) - (Kmax - ok.sum(1, keepdim=True))
        keep_slot = src >= 0
        gathered = idx.gather(1, src.clamp(min=0))
        new_ids = torch.where(keep_slot, input_ids.gather(1, gathered), torch.zeros_like(gathered))
        self.filter_removed = N - Kmax
        self.filter_kept = [idx[b][ok[b]].tolist() for b in range(B)]
        self.filter_seconds = time.perf_counter() - t0
        return new_ids, keep_slot.long()

    def _filter_pass(self, input_ids: Tensor, mask: Tensor, chunk: int | None, fp: _FilterPass) -> _FilterPass:
        """The model's own forward over the prompt, stopped at the filter layer (``_FilterDone``) in every chunk;
        the final chunk's filter layer sees every prompt key and scores them (:meth:`_filter_attention`)."""
        from transformers import DynamicCache

        N = input_ids.shape[1]
        position_ids = (mask.long().cumsum(-1) - 1).clamp(min=0)  # as generate() builds them
        cache = DynamicCache(config=self.config)
        step = N if not chunk else int(chunk)
        try:
            with torch.inference_mode():
                for s in range(0, N, step):
                    e = min(N, s + step)
                    fp.final, fp.mask2d = e == N, mask[:, :e]
                    self.filter = fp
                    try:
                        self.base(input_ids=input_ids[:, s:e], attention_mask=mask[:, :e].long(),
                                  position_ids=position_ids[:, s:e], past_key_values=cache, use_cache=True)
                    except _FilterDone:
                        pass
        finally:
            self.filter = None
        if fp.scores is None or fp.scores.shape[-1] != N:
            raise RuntimeError(f"{self.method.name}: the filter layer {fp.layer} did not score the prompt")
        return fp

    # ------------------------------------------------------------------ stats
    def _collect(self, f: _Forward) -> KVStats:
        cache = f.cache
        kept: list[list[float]] = []
        slots: list[int] = []
        budgets: list[list[int] | None] = []
        unreduced = 0
        qent: list[int] = []
        B = f.batch
        for li, layer in enumerate(cache.layers):
            seen = layer.logical_length()
            keys = layer.keys
            if keys is None or not isinstance(keys, Tensor) or keys.numel() == 0:
                kept.append([0.0] * B)
                slots.append(0)
            else:
                _, H, P, D = keys.shape
                pos = layer.pos if layer.compact else layer.dense_positions(P, B, H, keys.device)
                alive = self._valid(pos, f) if pos is not None else torch.zeros(B, H, P, dtype=torch.bool)
                if getattr(layer, "sliding_window", None) is not None and pos is not None:
                    alive = alive & (pos > seen - layer.sliding_window)  # left the window: dropped at next update
                kept.append(alive.sum(-1).float().mean(1).tolist())
                slots.append(P)
                window = getattr(layer, "sliding_window", None)
                seen_full = seen + self.filter_removed  # a prompt filter removed these columns before the cache
                n_full = seen_full if window is None else min(seen_full, window - 1)
                unreduced += B * H * n_full * D * keys.element_size() * 2
            b = f.cstate.budgets.get(li)
            budgets.append(None if b is None else b.tolist())
        by = kv_bytes(cache)
        cs = f.cstate
        # analytic attention FLOPs of one decoded token (QK^T and AV, 2 FLOPs per multiply-add), per sample
        hq = int(self.config.num_attention_heads)
        hd = int(getattr(self.config, "head_dim", None) or self.config.hidden_size // hq)
        per_entry = 4.0 * hq * hd
        flops = {"attention_per_token": per_entry * sum(sum(k) / max(len(k), 1) for k in kept),
                 "attention_per_token_unreduced": per_entry * sum(
                     (layer.logical_length() if getattr(layer, "sliding_window", None) is None
                      else min(layer.logical_length(), layer.sliding_window - 1)) for layer in cache.layers)}
        if cs.prompt_end is not None:
            qent = (cs.prompt_end - cs.question_start).tolist()
        if self.method.phase == "filter" and not self.method.is_identity:
            if self.in_generate:
                f.notes.extend(self.filter_notes)
                f.reduce_seconds += self.filter_seconds if f.is_prefill else 0.0
            else:
                f.notes.append(f"{self.method.name} filters the prompt of generate(): this forward was not filtered")
        st = KVStats(
            method=self.name,
            input_tokens=cache.get_seq_length() + self.filter_removed,
            tokens_attn=[sum(k) / max(len(k), 1) for k in kept],
            final_tokens=[round(sum(k[b] for k in kept)) for b in range(B)] if kept else [],
            reduce_seconds=f.reduce_seconds,
            notes=list(dict.fromkeys(f.notes)),
            flops=flops,
            kept=kept,
            slots=slots,
            budgets=budgets,
            layer_types=self.layer_types[: len(kept)],
            kv_bytes=by["tensor"],
            kv_bytes_storage=by["storage"],
            kv_bytes_unreduced=unreduced,
            kv_kept_fraction=by["tensor"] / unreduced if unreduced else 1.0,
            logical_length=cache.get_seq_length(),
            question_entries=qent,
            evicted=f.evicted,
            attended=[f.attended.get(li, float("nan")) for li in range(len(kept))] if f.attended else [],
            filter_kept=self.filter_kept if self.in_generate else [],
        )
        if f.is_prefill or (not cs.decoding and f.q_len > 1):  # after the prompt (its last chunk if chunked)
            cs.prefill = {"prefill_kv_bytes": st.kv_bytes, "prefill_kv_bytes_unreduced": st.kv_bytes_unreduced,
                          "prefill_kept": kept}
        for k, v in cs.prefill.items():
            setattr(st, k, v)
        return st


# ============================================================================ attention functions
def _family_eager(module: nn.Module) -> Callable[..., Any]:
    mod = sys.modules.get(type(module).__module__)
    fn = getattr(mod, "eager_attention_forward", None)
    if fn is None:
        raise TypeError(f"{type(module).__name__}: no eager_attention_forward in {type(module).__module__}")
    return fn


def _make_attention(impl: str) -> Callable[..., Any]:
    def attention(module: nn.Module, query: Tensor, key: Tensor, value: Tensor, attention_mask: Any,
                  **kwargs: Any) -> Any:
        run = module.__dict__.get(_ATTR)
        if run is None:  # a module of a model this handle does not own: behave like the wrapped implementation
            from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

            inner = _family_eager(module) if impl == "eager" else ALL_ATTENTION_FUNCTIONS[impl]
            return inner(module, query, key, value, attention_mask, **kwargs)
        return run.attention(module, query, key, value, attention_mask, **kwargs)

    attention.__name__ = f"tokenreduce_{impl}_attention"
    return attention


_REGISTERED = False


def _register_interfaces() -> None:
    global _REGISTERED
    if _REGISTERED:
        return
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS, AttentionInterface

    for impl in ATTN_IMPLS:
        AttentionInterface.register(f"tokenreduce_{impl}", _make_attention(impl))
        ALL_MASK_ATTENTION_FUNCTIONS.register(f"tokenreduce_{impl}", ALL_MASK_ATTENTION_FUNCTIONS[impl])
    assert "tokenreduce_sdpa" in ALL_ATTENTION_FUNCTIONS
    _REGISTERED = True


# ============================================================================ adapter
def _family(model: nn.Module) -> str | None:
    for cls in type(model).__mro__:
        for fam, names in FAMILIES.items():
            if cls.__name__ in names and cls.__module__.startswith(f"transformers.models.{fam}."):
                return fam
    return None


def _filtered_generate(run: _KVRun, generate: Callable[..., Any]) -> Callable[..., Any]:
    """``model.generate`` behind a prompt filter: select, generate on the kept tokens, return the *original*
    prompt followed by the continuation (what the unpatched ``generate`` returns)."""

    def filtered(model: nn.Module, inputs: Tensor | None = None, *args: Any, **kwargs: Any) -> Any:
        ids = kwargs.pop("input_ids", None) if inputs is None else inputs
        if kwargs.get("inputs_embeds") is not None:
            raise ValueError(f"{run.name} filters input_ids; generate(inputs_embeds=...) is not supported")
        if kwargs.get("past_key_values") is not None:
            raise ValueError(f"{run.name} filters a fresh prompt; generate(past_key_values=...) is not supported")
        if run.method.is_identity:  # keep=1: nothing to filter, no filter pass
            return generate(ids, *args, **kwargs)
        gen_cfg = kwargs.get("generation_config") or getattr(model, "generation_config", None)
        chunk = kwargs.get("prefill_chunk_size", getattr(gen_cfg, "prefill_chunk_size", None))
        new_ids, new_mask = run.filter_prompt(ids, kwargs.pop("attention_mask", None), chunk)
        run.in_generate = True
        try:
            out = generate(new_ids, *args, attention_mask=new_mask, **kwargs)
        finally:
            run.filter_removed, run.in_generate = 0, False  # later plain forwards are not filtered
        cut = new_ids.shape[1]
        seqs = out if isinstance(out, Tensor) else out.sequences
        prompt = ids.repeat_interleave(seqs.shape[0] // ids.shape[0], dim=0)  # num_return_sequences / beams
        seqs = torch.cat([prompt, seqs[:, cut:]], dim=1)
        if isinstance(out, Tensor):
            return seqs
        out.sequences = seqs
        return out

    return filtered


class _Restore:
    def __init__(self, fn: Callable[[], None]) -> None:
        self.remove = fn


class LLMAdapter:
    """Adapter for HF decoder-only LLMs (integration point ``kv-cache``)."""

    integration = "kv-cache"
    name = "transformers decoder LLMs (Llama, Qwen2, Mistral, Gemma 3 text: *ForCausalLM / *Model)"

    def matches(self, model: nn.Module) -> bool:
        return _family(model) is not None

    def attach(self, model: nn.Module, method: Any, method_name: str) -> Handle:
        if not isinstance(method, KVMethod):
            raise TypeError(f"{method_name} is not a kv-cache method")
        base = model.base_model
        layers = getattr(base, "layers", None)
        if layers is None or not len(layers):
            raise TypeError(f"{type(model).__name__}: no decoder layers found at {type(base).__name__}.layers")
        config = base.config
        impl = config._attn_implementation
        if impl not in ATTN_IMPLS:
            raise TypeError(f"attn_implementation={impl!r} is not supported by tokenreduce kv-cache methods; "
                            f"accepted: {', '.join(ATTN_IMPLS)} (load the model with attn_implementation='sdpa')")
        _register_interfaces()
        attn_modules = [layer.self_attn for layer in layers]
        if impl == "eager":
            inner = _family_eager(attn_modules[0])
        else:
            from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

            inner = ALL_ATTENTION_FUNCTIONS["sdpa"]
        run = _KVRun(model, base, method, method_name, impl, inner, attn_modules)
        p = Patcher()
        for m in attn_modules:
            p.set_attr(m, _ATTR, run)
        old_impl = impl

        def restore() -> None:
            config._attn_implementation = old_impl

        config._attn_implementation = f"tokenreduce_{impl}"
        p.hook(_Restore(restore))
        p.hook(base.register_forward_pre_hook(run.pre_forward, with_kwargs=True))
        p.hook(base.register_forward_hook(run.post_forward, with_kwargs=True))
        if method.phase == "filter":
            if not hasattr(model, "generate"):
                raise TypeError(f"{method_name} filters the prompt of generate(): {type(model).__name__} has none "
                                f"(apply it to the *ForCausalLM model)")
            p.set_method(model, "generate", _filtered_generate(run, model.generate))
        return Handle(model, method_name, method, p, run.stats)


register_adapter(LLMAdapter())
