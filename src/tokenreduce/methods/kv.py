"""KV-cache methods for decoder LLMs: each is a criterion (which cache entries matter) + a budget, placed by
the LLM adapter (``adapters/llm.py``) into the model's own ``DynamicCache`` and attention interface.

Every method answers three questions for one attention layer, given a :class:`KVContext`:

* ``score(ctx)``  -> (B, H, N) scores (higher = keep), H = KV heads (per-head selection) or 1 (shared);
* ``forced(ctx)`` -> (B, 1, N) entries that must stay (attention sinks, observation window, recent window);
  they count against the budget, and a budget smaller than them is an error;
* ``phase``: ``"prefill"`` compress once after the prompt (SnapKV, PyramidKV, Knorm, random), ``"decode"`` keep
  the cache at its budget after every forward (StreamingLLM, H2O, TOVA: evict as the cache grows),
  ``"select"`` keep the cache whole and attend to a per-query selection (TokenSelect), or ``"filter"`` select
  prompt tokens with an early layer and run the whole generation on them (GemFilter: prefill itself shrinks).

``keep`` (float in (0, 1] or int >= 1) is the fraction/count of each layer's cache entries that survive, *per
layer as the layer's cache exists* (a Gemma 3 sliding-window layer holds at most window-1 entries, a global
layer the whole prompt). For the decoding methods a ratio is a fraction of what the unreduced cache holds at
every step (the cache grows by ``keep`` per new token, and chunked prefill works), a count is a fixed cache
size (the papers' setting: StreamingLLM/H2O/TOVA caches of N tokens). ``question_len`` trailing prompt tokens (int, or one per sample) are never evicted;
they count against the budget, so the cache holds ``keep`` of its entries in every layer whatever the split
(context vs question of a QA pipeline). SnapKV/PyramidKV's observation window is the end of the prompt, i.e.
the question in that setting (``window_size="question"`` makes it exactly the question).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from torch import Tensor

from ..core import kv as K
from ..core import ops
from ..core.budget import Keep, KeepLike, validate_keep_value
from ..registry import register

__all__ = [
    "H2O",
    "KV",
    "TOVA",
    "GemFilter",
    "KVContext",
    "KVMethod",
    "Knorm",
    "PyramidKV",
    "RandomKV",
    "SnapKV",
    "StreamingLLM",
    "TokenSelect",
]

KV = "kv-cache"


# ---------------------------------------------------------------------------- what a method sees
@dataclass
class KVContext:
    """One layer's cache at the moment a method scores it (built by the adapter, no model knowledge).

    query (B,Hq,Q,D) of this forward (after RoPE); keys (B,Hkv,N,D) all entries (cache + this forward's);
    pos (B,Hkv,N) logical position (column) of each entry, -1 for empty slots; valid (B,Hkv,N) real tokens;
    qpos (Q,) columns of this forward's queries; rel (B,Hkv,N) position relative to the sample's first real
    token (left padding removed); prompt_end (B,) first column after the prompt, question_start (B,) first
    column of the uncompressed question (= prompt_end without one); window: sliding window of
    the layer (None = global); state: per-entry tensors a method keeps between forwards (e.g. H2O's sums),
    aligned with the entries (the adapter gathers/pads them with the cache).
    """

    query: Tensor
    keys: Tensor
    pos: Tensor
    valid: Tensor
    qpos: Tensor
    rel: Tensor
    prompt_end: Tensor
    question_start: Tensor
    scaling: float
    layer: int
    num_layers: int
    window: int | None = None
    softcap: float | None = None
    is_prefill: bool = True
    state: dict[str, Tensor] = field(default_factory=dict)
    _probs: dict[Any, Tensor] = field(default_factory=dict, repr=False)

    @property
    def num_queries(self) -> int:
        return self.query.shape[2]

    def allowed(self, qpos: Tensor) -> Tensor:
        """(B, Hkv, Q, N) which entries the queries at columns ``qpos`` may see (causal, padding, window)."""
        p = self.pos.unsqueeze(2)  # (B, H, 1, N)
        q = qpos.view(1, 1, -1, 1)
        ok = self.valid.unsqueeze(2) & (p <= q)
        if self.window is not None:
            ok = ok & (q - p < self.window)
        return ok

    def probs(self, last: int | None = None) -> Tensor:
        """Attention (B,Hkv,G,W,N) of the last ``last`` queries of this forward (all if None) over the entries;
        computed here from q and k, only the rows asked for (the model keeps its SDPA/eager attention)."""
        Q = self.num_queries
        w = Q if last is None else min(last, Q)
        if w not in self._probs:
            qs = self.qpos[Q - w:]
            self._probs[w] = ops.attention_probs(self.query[:, :, Q - w:], self.keys, self.scaling, self.allowed(qs),
                                               self.softcap)
        return self._probs[w]

    def column_sums(self, chunk: int = 256) -> Tensor:
        """H2O's accumulated attention over *all* queries of this forward, (B, Hkv, N), in query chunks so
        the Q x N matrix is never materialised at once."""
        Q = self.num_queries
        total = None
        for s in range(0, Q, chunk):
            e = min(Q, s + chunk)
            p = ops.attention_probs(self.query[:, :, s:e], self.keys, self.scaling, self.allowed(self.qpos[s:e]),
                                  self.softcap)
            part = K.accumulated_attention(p)
            total = part if total is None else total + part
        assert total is not None
        return total

    def recent(self, n: int | Tensor) -> Tensor:
        """(B, H, N) the ``n`` most recent real entries (by position) of each row; ``n`` int or (B,)."""
        newest = self.pos.masked_fill(~self.valid, -1).amax(dim=-1, keepdim=True)
        n_t = torch.as_tensor(n, device=self.pos.device).reshape(-1, 1, 1)
        return self.valid & (self.pos > newest - n_t)

    def first(self, n: int) -> Tensor:
        """(B, H, N) the first ``n`` real tokens of each sample (attention sinks)."""
        return self.valid & (self.rel < n)

    def prompt_tail(self, n: int | Tensor) -> Tensor:
        """(B, H, N) the last ``n`` prompt tokens (the observation window); ``n`` int or (B,)."""
        end = self.prompt_end.view(-1, 1, 1)
        n_t = torch.as_tensor(n, device=self.pos.device).reshape(-1, 1, 1)
        return self.valid & (self.pos >= end - n_t) & (self.pos < end)

    @property
    def question_len(self) -> Tensor:
        return self.prompt_end - self.question_start

    def window_probs(self, n: int | Tensor) -> Tensor:
        """Attention (B,Hkv,G,W,N) of the last ``n`` prompt queries (``n`` int or one per sample; rows of
        queries outside a sample's window are zero)."""
        n_t = torch.as_tensor(n, device=self.pos.device).reshape(-1)
        w = int(n_t.max().item())
        p = self.probs(last=w)
        rows = self.qpos[self.num_queries - p.shape[3]:].view(1, -1)  # (1, W)
        inside = rows >= (self.prompt_end.view(-1, 1) - n_t.view(-1, 1).expand(len(self.prompt_end), 1))
        return p * inside.view(inside.shape[0], 1, 1, -1, 1).to(p.dtype)


# ---------------------------------------------------------------------------- base
@dataclass
class KVMethod:
    """Base class (see module docstring). Subclasses set ``phase``/``shared_heads`` and override ``score``."""

    keep: KeepLike = 1.0
    question_len: int | Sequence[int] = 0
    layers: Sequence[int] | None = None  # layers to compress (None: all)
    rounding: str = "round"  # budget of a ratio keep: round(keep n) or "floor" (kvpress's int(keep n))

    phase: ClassVar[str] = "prefill"
    shared_heads: ClassVar[bool] = False  # one selection for all KV heads of a layer
    stateful: ClassVar[bool] = False  # keeps per-entry state between forwards (ctx.state)
    name: ClassVar[str] = "kv"

    def __post_init__(self) -> None:
        if isinstance(self.keep, (Keep, list, tuple)):
            raise TypeError(f"{self.name}: keep must be a float in (0, 1] or an int >= 1 (one budget per layer); "
                            f"got {self.keep!r}")
        validate_keep_value(self.keep)
        self.budget = Keep.of(self.keep)
        ql = self.question_len
        vals = [ql] if isinstance(ql, int) else list(ql)
        for v in vals:
            if isinstance(v, bool) or not isinstance(v, int) or v < 0:
                raise ValueError(f"question_len must be an int >= 0 or one such int per sample, got {ql!r}")
        if self.rounding not in ("round", "floor"):
            raise ValueError(f"rounding={self.rounding!r} is not supported; accepted: 'round', 'floor'")
        if self.layers is not None:
            self.layers = tuple(self.layers)
            if any(isinstance(v, bool) or not isinstance(v, int) or v < 0 for v in self.layers):
                raise ValueError(f"layers must be layer indices (ints >= 0), got {self.layers!r}")

    def compresses(self, layer: int, num_layers: int) -> bool:
        """Whether ``layer`` is reduced at all (``layers=`` restricts the method to some layers)."""
        if self.layers is not None:
            bad = [v for v in self.layers if v >= num_layers]
            if bad:
                raise ValueError(f"layers {bad} out of range: the model has {num_layers} layers (0..{num_layers - 1})")
            return layer in self.layers
        return True

    @property
    def is_identity(self) -> bool:
        return self.budget.is_identity

    def layer_keep(self, layer: int, num_layers: int) -> float | int:
        """The keep value of ``layer`` (for messages; PyramidKV varies it)."""
        return self.keep  # type: ignore[return-value]

    def layer_budget(self, layer: int, num_layers: int, n: Tensor, question_len: Tensor) -> Tensor:
        """(B,) entries layer ``layer`` keeps out of ``n`` (B,) (question included): ``round(keep n)``
        (at least 1) for a ratio, ``min(keep, n)`` for a count."""
        kv = self.layer_keep(layer, num_layers)
        if isinstance(kv, float):
            exact = n.double() * kv
            b = torch.floor(exact + 1e-9) if self.rounding == "floor" else torch.round(exact)
            return torch.minimum(b.long().clamp(min=1), n)
        return torch.minimum(torch.full_like(n, int(kv)), n)

    def forced(self, ctx: KVContext, budget: Tensor) -> Tensor:
        return torch.zeros_like(ctx.valid[:, :1])

    min_free: ClassVar[int] = 0  # entries the budget must hold beyond the forced ones

    def forced_desc(self) -> str:
        return ""

    def score(self, ctx: KVContext) -> Tensor:
        raise NotImplementedError


def _check_window_and_pooling(m: Any) -> None:
    """Validate an observation window (``window_size``: int >= 1 or "question") and a 1D pooling
    (``kernel_size`` odd >= 1, ``pooling`` avgpool|maxpool), shared by SnapKV/PyramidKV and GemFilter."""
    ws = m.window_size
    if ws == "question":
        if not any([m.question_len] if isinstance(m.question_len, int) else m.question_len):
            raise ValueError("window_size='question' needs question_len= (the question is the window)")
    elif isinstance(ws, bool) or not isinstance(ws, int) or ws < 1:
        raise ValueError(f"window_size must be an int >= 1 or 'question', got {ws!r}")
    if not isinstance(m.kernel_size, int) or m.kernel_size < 1 or m.kernel_size % 2 == 0:
        raise ValueError(f"kernel_size must be an odd int >= 1, got {m.kernel_size!r}")
    if m.pooling not in ("avgpool", "maxpool"):
        raise ValueError(f"pooling={m.pooling!r} is not supported; accepted: 'avgpool', 'maxpool'")


# ---------------------------------------------------------------------------- decoding eviction
@dataclass
class StreamingLLM(KVMethod):
    """StreamingLLM (Xiao et al., "Efficient Streaming Language Models with Attention Sinks", ICLR 2024).

    The cache keeps the first ``sinks`` tokens (attention sinks) and a rolling window of the most recent
    ones, Sec. 3.2: ``KV = KV[0:sinks] ++ KV[t-w+1 : t]``, ``w = budget - sinks``. Evicts after every forward
    (prefill included) so the cache never exceeds the budget; no scores are computed. Paper default: 4 sinks.
    """

    sinks: int = 4
    phase: ClassVar[str] = "decode"
    shared_heads: ClassVar[bool] = True
    min_free: ClassVar[int] = 1  # a window of at least one recent token
    name: ClassVar[str] = "streaming-llm"

    def __post_init__(self) -> None:
        super().__post_init__()
        if isinstance(self.sinks, bool) or not isinstance(self.sinks, int) or self.sinks < 0:
            raise ValueError(f"sinks must be an int >= 0, got {self.sinks!r}")

    def forced(self, ctx: KVContext, budget: Tensor) -> Tensor:
        return ctx.first(self.sinks)[:, :1]

    def forced_desc(self) -> str:
        return f"sinks ({self.sinks}) + a window of at least 1"

    def score(self, ctx: KVContext) -> Tensor:
        return ctx.pos[:, :1].float()  # most recent first


@dataclass
class H2O(KVMethod):
    """H2O, Heavy-Hitter Oracle (Zhang et al., NeurIPS 2023), Alg. 1.

    Per head, every entry accumulates the attention it receives from every query so far,
    ``F_i = sum_{t} A_t[i]`` (prompt queries included); the cache keeps the ``recent`` most recent entries and
    the heavy hitters ``argtop_{budget - recent} F`` among the rest, evicting after every forward.
    Paper default: half heavy hitters, half recent (``recent_ratio=0.5``).
    """

    recent_ratio: float = 0.5
    phase: ClassVar[str] = "decode"
    stateful: ClassVar[bool] = True
    name: ClassVar[str] = "h2o"

    def __post_init__(self) -> None:
        super().__post_init__()
        if not 0.0 <= self.recent_ratio <= 1.0:
            raise ValueError(f"recent_ratio must be in [0, 1], got {self.recent_ratio!r}")

    def forced(self, ctx: KVContext, budget: Tensor) -> Tensor:
        return ctx.recent(torch.round(budget.double() * self.recent_ratio).long())

    def forced_desc(self) -> str:
        return f"the recent window ({self.recent_ratio:g} of the budget)"

    def score(self, ctx: KVContext) -> Tensor:
        if ctx.is_prefill or "acc" not in ctx.state:
            acc = ctx.column_sums()
        else:
            old = ctx.state["acc"]
            new = K.accumulated_attention(ctx.probs())
            acc = torch.cat([old, torch.zeros_like(new[..., old.shape[-1]:])], dim=-1) + new
        ctx.state["acc"] = acc
        return acc


@dataclass
class TOVA(KVMethod):
    """TOVA, Token Omission Via Attention (Oren et al., "Transformers are Multi-State RNNs", 2024), Sec. 3.3.

    Whenever the cache exceeds its budget, drop the entries with the lowest attention from the current query,
    averaged over all heads of the layer, ``s_i = mean_h softmax(q_t K_h^T / sqrt(d))_i`` (one selection per
    layer, shared by the heads); the prompt is reduced the same way with the last prompt token as the query.
    """

    phase: ClassVar[str] = "decode"
    shared_heads: ClassVar[bool] = True
    name: ClassVar[str] = "tova"

    def score(self, ctx: KVContext) -> Tensor:
        return K.last_query_attention(ctx.probs(last=1))


# ---------------------------------------------------------------------------- prefill compression
@dataclass
class SnapKV(KVMethod):
    """SnapKV (Li et al., "SnapKV: LLM Knows What You are Looking for Before Generation", 2024), Alg. 1.

    After the prompt, per KV head: attention of the last ``window_size`` prompt queries (the observation
    window, i.e. the question) over the prefix, ``C = sum_{q in window} softmax(q K^T/sqrt(d))``, pooled along
    the sequence ``S = smooth1d(C, kernel_size)``; keep the window plus ``argtop_{budget - window} S``.
    Defaults of the reference code: window 32, kernel 5, average pooling. ``window_size="question"`` makes the
    observation window exactly the question (``question_len`` tokens per sample), the paper's QA framing.
    """

    window_size: int | str = 32
    kernel_size: int = 5
    pooling: str = "avgpool"
    name: ClassVar[str] = "snapkv"

    def __post_init__(self) -> None:
        super().__post_init__()
        _check_window_and_pooling(self)

    def window(self, ctx: KVContext) -> int | Tensor:
        return ctx.question_len if self.window_size == "question" else self.window_size

    def forced(self, ctx: KVContext, budget: Tensor) -> Tensor:
        return ctx.prompt_tail(self.window(ctx))[:, :1]

    def forced_desc(self) -> str:
        if self.window_size == "question":
            return "the observation window (the question)"
        return f"the observation window ({self.window_size} tokens)"

    def score(self, ctx: KVContext) -> Tensor:
        w = self.window(ctx)
        return K.snapkv_votes(ctx.window_probs(w), self.kernel_size, self.pooling, exclude=ctx.prompt_tail(w))


@dataclass
class PyramidKV(SnapKV):
    """PyramidKV (Cai et al., "PyramidKV: Dynamic KV Cache Compression based on Pyramidal Information
    Funneling", 2024), Eq. 6-7: SnapKV's selection with layer-wise budgets that shrink linearly with depth,
    ``k_l = k_0 - l (k_0 - k_{L-1}) / (L-1)``, ``k_{L-1} = k / beta``, mean over layers = ``keep``; the
    observation window is kept on top of the pyramid in every layer, as in the reference code
    (:meth:`layer_budget`). Paper default beta = 20; takes a ratio ``keep``.
    """

    beta: float = 20.0
    name: ClassVar[str] = "pyramidkv"

    def __post_init__(self) -> None:
        super().__post_init__()
        if not isinstance(self.keep, float):
            raise TypeError(f"pyramidkv distributes a ratio over layers: keep must be a float in (0, 1], "
                            f"got {self.keep!r}")
        if not self.beta >= 1:
            raise ValueError(f"beta must be >= 1, got {self.beta!r}")

    def layer_keep(self, layer: int, num_layers: int) -> float:
        r = K.pyramid_ratios(float(self.keep), num_layers, self.beta)[layer]
        return min(max(r, 1e-9), 1.0)

    def layer_budget(self, layer: int, num_layers: int, n: Tensor, question_len: Tensor) -> Tensor:
        """The reference code's arithmetic on token counts: with ``w`` the window and ``s = round(keep n) - w``
        the mean selectable entries, ``s_min = s // beta``, ``s_max = 2 s - s_min`` (if ``s_max > n - w``:
        ``s_max = n - w``, ``s_min = 2 s - s_max``), layer l keeps ``w + s_max - l (s_max - s_min)/(L-1)``."""
        w = question_len if self.window_size == "question" else torch.full_like(n, int(self.window_size))
        w = torch.minimum(w, n)
        s = torch.round(n.double() * float(self.keep)).long() - w
        s_min = torch.div(s, self.beta, rounding_mode="floor").long()
        s_max = 2 * s - s_min
        over = s_max > n - w
        s_max = torch.where(over, n - w, s_max)
        s_min = torch.where(over, 2 * s - s_max, s_min)
        if num_layers == 1:
            sel = s
        else:
            sel = torch.round(s_max.double() - layer * (s_max - s_min).double() / (num_layers - 1)).long()
        return torch.minimum(w + sel.clamp(min=0), n).clamp(min=1) if bool((s >= 0).all()) else w + s


@dataclass
class Knorm(KVMethod):
    """Knorm (Devoto et al., "A Simple and Effective L2 Norm-Based Strategy for KV Cache Compression", EMNLP
    2024): after the prompt keep, per KV head, the entries with the lowest key norm, ``s_i = -||k_i||_2``."""

    name: ClassVar[str] = "knorm"

    def score(self, ctx: KVContext) -> Tensor:
        return K.key_norm_scores(ctx.keys)


@dataclass
class RandomKV(KVMethod):
    """Random baseline: after the prompt keep a seeded random subset per KV head (``seed``); scores depend only
    on (seed, layer, head, position in the sample), so a sample keeps the same entries alone or in a batch."""

    seed: int = 0
    name: ClassVar[str] = "random"

    def score(self, ctx: KVContext) -> Tensor:
        return K.positional_random_scores(ctx.rel, self.seed, salt=ctx.layer)


# ---------------------------------------------------------------------------- early-layer prompt filter
@dataclass
class GemFilter(KVMethod):
    """GemFilter (Shi, Ming, Xu, Hao, Ding, Zhang, Liang, "Discovering the Gems in Early Layers: Accelerating
    Long-Context LLMs with 1000x Input Token Reduction", arXiv:2409.17422, 2024), Alg. 1.

    ``generate()`` first runs only layers ``0..r`` on the prompt (``r`` = ``layer``, an early layer; the layers
    after it never run on the full prompt), scores every prompt token by r's attention logits of the last query
    summed over the heads, ``s = sum_h q_h^{last} K_h^T`` (raw inner products, as the reference code), smooths
    them along the sequence (``pool1d``, average, kernel 5) and keeps the ``keep`` best tokens *in their
    original order*; then the whole generation runs on those tokens alone, as a shorter prompt with contiguous
    positions (the reference code re-encodes the selected ids). Prefill costs ``(r+1)/L`` of a full-prompt
    forward plus a forward of the kept tokens; every layer's cache holds only kept tokens.

    Beyond the paper: the ``question_len`` trailing tokens and the last prompt token are always kept (the
    QA split of the other methods); ``window_size`` > 1 or ``"question"`` sums the logits of that many last
    queries (SnapKV's observation window; paper: 1). ``layer=None`` takes the last full-attention layer at or
    before 40% of the depth (the paper's LLaMA-3.1-8B setting is 13 of 32; a sliding-window layer cannot see
    the whole prompt). A plain ``model(...)`` forward is not filtered: the method acts on ``generate()``.
    """

    layer: int | None = None
    window_size: int | str = 1
    kernel_size: int = 5
    pooling: str = "avgpool"
    phase: ClassVar[str] = "filter"
    shared_heads: ClassVar[bool] = True
    min_free: ClassVar[int] = 0
    name: ClassVar[str] = "gemfilter"

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.layer is not None and (isinstance(self.layer, bool) or not isinstance(self.layer, int)
                                       or self.layer < 0):
            raise ValueError(f"layer must be an int >= 0 (the filter layer) or None, got {self.layer!r}")
        _check_window_and_pooling(self)
        if self.layers is not None:
            raise ValueError("gemfilter filters the prompt once for all layers: layers= is not accepted; "
                             "use layer= for the filter layer")

    def filter_layer(self, layer_types: Sequence[str]) -> int:
        """The filter layer ``r`` for a model with these layer types ("full_attention" / "sliding_attention")."""
        n = len(layer_types)
        if self.layer is not None:
            if self.layer >= n:
                raise ValueError(f"layer={self.layer} is out of range: the model has {n} layers (0..{n - 1})")
            if layer_types[self.layer] == "sliding_attention":
                full = [i for i, t in enumerate(layer_types) if t != "sliding_attention"]
                raise ValueError(f"layer={self.layer} is a sliding-window layer and cannot see the whole prompt; "
                                 f"accepted: a full-attention layer {full}")
            return self.layer
        target = round(0.4 * (n - 1))
        full = [i for i, t in enumerate(layer_types) if t != "sliding_attention"]
        if not full:
            raise ValueError("gemfilter needs a full-attention layer to score the whole prompt; this model has "
                             "sliding-window layers only (give layer= explicitly)")
        before = [i for i in full if i <= target]
        return before[-1] if before else full[0]

    def window(self, ctx: KVContext) -> Tensor:
        """(B,) queries summed per sample: ``window_size`` or the sample's question length."""
        if self.window_size == "question":
            return ctx.question_len.clamp(min=1)
        return torch.full_like(ctx.prompt_end, int(self.window_size))

    def forced(self, ctx: KVContext, budget: Tensor) -> Tensor:
        return (ctx.prompt_tail(ctx.question_len) | ctx.prompt_tail(1))[:, :1]

    def forced_desc(self) -> str:
        return "the question + the last prompt token"

    def score(self, ctx: KVContext) -> Tensor:
        w = self.window(ctx)  # (B,)
        W = min(int(w.max().item()), ctx.num_queries)
        q = ctx.query[:, :, -W:]
        rows = ctx.qpos[-W:].view(1, -1)
        inside = rows >= (ctx.prompt_end.view(-1, 1) - w.view(-1, 1))  # (B, W) queries in the sample's window
        q = q * inside.view(inside.shape[0], 1, W, 1).to(q.dtype)
        fill = 0.0 if self.pooling == "avgpool" else float("-inf")
        s = K.gemfilter_scores(q, ctx.keys, ctx.valid[:, :1], fill=fill)
        return ops.smooth1d(s, self.kernel_size, self.pooling)


# ---------------------------------------------------------------------------- per-query selection
@dataclass
class TokenSelect(KVMethod):
    """TokenSelect (Wu et al., "TokenSelect: Efficient Long-Context Inference and Length Extrapolation for LLMs
    via Dynamic Token-Level KV Cache Selection", 2025), Sec. 3.

    The cache is kept whole; each decoding query attends only to ``n_init`` initial tokens, ``n_local`` recent
    tokens and the top tokens by the head soft vote ``S_i = sum_h softmax_i(q_h . k_{h,i})`` (Eq. 7-8), the
    selection shared by all heads; ``budget = keep x entries`` in total. Selection cache (Sec. 3.4): if the
    cosine similarity of consecutive queries exceeds ``reuse_threshold`` the previous selection is reused.
    Reference defaults: n_init 128, n_local 512, threshold 0.9. The prompt is prefilled in full here (the
    paper also selects inside chunked prefill); the KV bytes do not shrink — the attended tokens do.
    """

    n_init: int = 128
    n_local: int = 512
    reuse_threshold: float | None = 0.9
    phase: ClassVar[str] = "select"
    shared_heads: ClassVar[bool] = True
    name: ClassVar[str] = "tokenselect"

    def __post_init__(self) -> None:
        super().__post_init__()
        for k in ("n_init", "n_local"):
            v = getattr(self, k)
            if isinstance(v, bool) or not isinstance(v, int) or v < 0:
                raise ValueError(f"{k} must be an int >= 0, got {v!r}")
        if self.reuse_threshold is not None and not -1.0 <= self.reuse_threshold <= 1.0:
            raise ValueError(f"reuse_threshold must be in [-1, 1] or None, got {self.reuse_threshold!r}")

    def forced(self, ctx: KVContext, budget: Tensor) -> Tensor:
        return (ctx.first(self.n_init) | ctx.recent(self.n_local))[:, :1]

    def forced_desc(self) -> str:
        return f"n_init ({self.n_init}) + n_local ({self.n_local})"

    def score(self, ctx: KVContext) -> Tensor:
        return K.head_soft_vote(ctx.query, ctx.keys, ctx.valid[:, :1])


# ---------------------------------------------------------------------------- registration
def _reg(cls: type, paper: str, equation: str) -> None:
    register(cls.name, modality="language", integration=KV, paper=paper, equation=equation)(cls)


_reg(StreamingLLM, "Xiao et al., Efficient Streaming Language Models with Attention Sinks, ICLR 2024",
     "KV = KV[:sinks] ++ KV[t-w+1:t], w = budget - sinks")
_reg(H2O, "Zhang et al., H2O: Heavy-Hitter Oracle for Efficient Generative Inference of LLMs, NeurIPS 2023",
     "F_i = sum_t A_t[i]; keep recent + argtop F")
_reg(SnapKV, "Li et al., SnapKV: LLM Knows What You are Looking for Before Generation, NeurIPS 2024",
     "S = smooth1d(sum_{q in window} softmax(qK^T/sqrt d)); keep window + argtop S")
_reg(TOVA, "Oren et al., Transformers are Multi-State RNNs (TOVA), EMNLP 2024",
     "evict argmin_i mean_h softmax(q_t K_h^T/sqrt d)_i")
_reg(Knorm, "Devoto et al., A Simple and Effective L2 Norm-Based Strategy for KV Cache Compression, EMNLP 2024",
     "keep argtop -||k_i||_2")
_reg(PyramidKV, "Cai et al., PyramidKV: Dynamic KV Cache Compression based on Pyramidal Information Funneling, 2024",
     "k_l = k_0 - l(k_0-k_{L-1})/(L-1), k_{L-1} = keep/beta; SnapKV scores")
_reg(TokenSelect, "Wu et al., TokenSelect: Efficient Long-Context Inference via Dynamic Token-Level KV Cache "
                  "Selection, 2025", "S_i = sum_h softmax_i(q_h k_{h,i}); attend to init + local + argtop S")
_reg(GemFilter, "Shi et al., Discovering the Gems in Early Layers: Accelerating Long-Context LLMs with 1000x Input "
                "Token Reduction (GemFilter), 2024", "s = smooth1d(sum_h q_h^last K_h^T) at layer r; prompt' = top-k(s)")
_reg(RandomKV, "random baseline", "keep a seeded random subset per head")
