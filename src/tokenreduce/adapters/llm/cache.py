"""Compressible cache layers: the model's ``DynamicLayer`` / ``DynamicSlidingWindowLayer`` become
:class:`KVLayer` / :class:`KVSlidingLayer` (direct subclasses, swapped in by ``__class__`` like ToMe swaps
blocks, :func:`convert_cache`). Until a layer is compressed it *is* the parent class (identical code path, so
``keep=1`` reproduces ``generate()`` exactly). Once compressed it is *compact*: it stores only the kept
keys/values plus ``pos`` (B, Hkv, P), the logical position of every entry (-1 = empty slot), and while decoding
it evicts by emptying slots and writes new tokens into empty or expired slots (see the package docstring)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

__all__ = ["KVLayer", "KVSlidingLayer", "convert_cache"]


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

        def evicts_in_place(self, keys: Tensor) -> bool:
            """Whether a decoding step may evict from ``keys`` (this layer's own tensor) by emptying slots."""
            return self.compact and self.in_place and self._owned and self.keys is keys

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


def convert_cache(cache: Any) -> None:
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
