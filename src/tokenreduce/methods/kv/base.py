"""What every KV-cache method shares: :class:`KVContext` (what a method sees of one layer's cache),
:class:`KVMethod` (the base class) and the observation-window/pooling validation of SnapKV, PyramidKV and
GemFilter. Each method is a criterion (which cache entries matter) + a budget, placed by the LLM adapter
(``adapters/llm/``) into the model's own ``DynamicCache`` and attention interface.

Every method answers three questions for one attention layer, given a :class:`KVContext`:

* ``score(ctx)``  -> (B, H, N) scores (higher = keep), H = KV heads (per-head selection) or 1 (shared);
* ``forced(ctx)`` -> (B, 1|H, N) entries that must stay (attention sinks, observation window, recent window);
  they count against the layer's budget ``ctx.budget``. They are knobs sized for long prompts: where they leave
  no room in a budget (with the question), they shrink for that layer and sample (see :data:`BUDGET_DOC`) and
  the method says so in ``ctx.notes`` (the stats' notes);
* ``phase``: ``"prefill"`` compress once after the prompt (SnapKV, PyramidKV, Knorm, random), ``"decode"`` keep
  the cache at its budget after every forward (StreamingLLM, H2O, TOVA: evict as the cache grows),
  ``"select"`` keep the cache whole and attend to a per-query selection (TokenSelect), or ``"filter"`` select
  prompt tokens with an early layer and run the whole generation on them (GemFilter: prefill itself shrinks).

:data:`BUDGET_DOC` (appended to every method's docstring, so ``tokenreduce list NAME`` shows it) says what
``keep`` and ``question_len`` mean here.
"""

from __future__ import annotations

import textwrap
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from torch import Tensor

from ...core import kv as K
from ...core import ops
from ...core.budget import Keep, KeepLike, validate_keep_value

__all__ = ["BUDGET_DOC", "KV", "QUESTION_PRESETS", "KVContext", "KVMethod", "check_window_and_pooling",
           "shrunk_window"]

KV = "kv-cache"

# presets of the methods with an observation window (SnapKV, GemFilter): the question as the window, and with
# max pooling over 9 tokens (bench kv's best settings on passcode retrieval)
QUESTION_PRESETS: dict[str, dict[str, Any]] = {
    "question": {"window_size": "question"},
    "question-max9": {"window_size": "question", "pooling": "maxpool", "kernel_size": 9},
}

BUDGET_DOC = """
Budget (every kv-cache method; PyramidKV, TokenSelect and GemFilter say above how theirs differs): ``keep`` is
a float fraction in (0, 1] of the KV-cache entries kept, over all layers (= KV bytes): each layer keeps
``round(keep x n)`` of the ``n`` entries its unreduced cache holds (a Gemma 3 sliding-window layer at most
window-1, a global layer the whole sequence); methods that evict while decoding hold that at every step, of what
the unreduced cache holds then (chunked prefill works). ``tr.Keep(count=n)`` is a cache capacity: a fixed cache
of ``n`` entries per layer (the StreamingLLM/H2O/TOVA papers' setting); a capacity at least what a layer holds
evicts nothing there, and the stats' notes say so. ``h.stats.keep_achieved`` is what ran (``prefill_kept`` /
``prefill_unreduced`` entries after the prompt for methods that compress the prompt once, ``kept`` /
``unreduced`` for those that evict while decoding).

Forced entries (observation window, sinks, recent window, TokenSelect's initial/local tokens) are knobs sized
for long prompts: where they leave no room in a layer's budget they shrink for that layer and sample (SnapKV's
window to half the budget, StreamingLLM's sinks and TokenSelect's tokens to half of what the question leaves,
H2O's recent window to what the question leaves) and the stats' notes say so.

Question: ``question_len`` trailing prompt tokens (an int, or one per sample) are never evicted and count in
the budget, so the cache holds ``keep`` of its entries whatever the split between context and question; a
budget smaller than the question raises ValueError naming the least keep. Count them with
``tr.question_length(tokenizer, context, context + question)``, or run a whole QA prompt with
``tr.generate_with_question(model, tokenizer, context, question, method, keep)``.
"""


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
    aligned with the entries (the adapter gathers/pads them with the cache). budget (B,) the entries this layer
    keeps; natural (B,) the entries its unreduced cache holds now (what ``keep`` is a fraction of); question
    (B,Hkv,N) the question entries it holds (never evicted, in the budget); notes: what the method tells the stats
    (e.g. a window shrunk to fit the budget).
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
    budget: Tensor | None = None
    natural: Tensor | None = None
    question: Tensor | None = None
    notes: list[str] = field(default_factory=list)
    _probs: dict[Any, Tensor] = field(default_factory=dict, repr=False)

    @property
    def num_queries(self) -> int:
        return self.query.shape[2]

    def allowed(self, qpos: Tensor) -> Tensor:
        """(B, Hkv, Q, N) which entries the queries at columns ``qpos`` may see (causal, padding, window)."""
        return K.visible(self.pos, self.valid, qpos, self.window)

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

    def first(self, n: int | Tensor) -> Tensor:
        """(B, H, N) the first ``n`` real tokens of each sample (attention sinks); ``n`` int or (B,)."""
        return self.valid & (self.rel < torch.as_tensor(n, device=self.rel.device).reshape(-1, 1, 1))

    def prompt_tail(self, n: int | Tensor) -> Tensor:
        """(B, H, N) the last ``n`` prompt tokens (the observation window); ``n`` int or (B,)."""
        end = self.prompt_end.view(-1, 1, 1)
        n_t = torch.as_tensor(n, device=self.pos.device).reshape(-1, 1, 1)
        return self.valid & (self.pos >= end - n_t) & (self.pos < end)

    @property
    def question_len(self) -> Tensor:
        return self.prompt_end - self.question_start

    def question_held(self) -> Tensor:
        """(B,) question entries this layer holds (0 without a question)."""
        if self.question is None:
            return torch.zeros_like(self.prompt_end)
        return self.question.sum(-1).amax(1)

    def room(self, min_free: int = 0) -> Tensor:
        """(B,) entries of the budget the question leaves, less ``min_free`` (what a method's own forced
        entries and its selection share)."""
        assert self.budget is not None, "the adapter sets ctx.budget before forced()"
        return self.budget - self.question_held() - min_free

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
    """Base class (see module docstring). Subclasses set ``phase``/``shared_heads`` and override ``score``;
    :data:`BUDGET_DOC` is appended to every subclass's docstring."""

    keep: KeepLike = 1.0
    question_len: int | Sequence[int] = 0
    layers: Sequence[int] | None = None  # layers to compress (None: all)
    rounding: str = "round"  # budget of a ratio keep: round(keep n) or "floor" (kvpress's int(keep n))

    phase: ClassVar[str] = "prefill"
    shared_heads: ClassVar[bool] = False  # one selection for all KV heads of a layer
    stateful: ClassVar[bool] = False  # keeps per-entry state between forwards (ctx.state)
    min_free: ClassVar[int] = 0  # entries the budget must hold beyond the forced ones
    name: ClassVar[str] = "kv"

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if cls.__doc__ and "Budget (every kv-cache method" not in cls.__doc__:  # indented like a class docstring
            cls.__doc__ = cls.__doc__.rstrip() + "\n\n" + textwrap.indent(BUDGET_DOC.strip("\n"), "    ") + "\n    "

    def __post_init__(self) -> None:
        if isinstance(self.keep, (Keep, list, tuple)):
            raise TypeError(f"{self.name}: keep must be a float in (0, 1] or tr.Keep(count=n) (one budget per layer); "
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

    @property
    def keep_fraction(self) -> float | None:
        """The requested fraction (``Stats.keep``): None for a count (a cache capacity)."""
        return self.keep if isinstance(self.keep, float) else None

    def keep_desc(self, layer: int, num_layers: int) -> str:
        """``keep=0.25`` / ``Keep(count=20)`` of ``layer`` (for messages; PyramidKV varies it)."""
        kv = self.layer_keep(layer, num_layers)
        return f"keep={kv:.4g}" if isinstance(kv, float) else f"Keep(count={kv})"

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

    def forced(self, ctx: KVContext) -> Tensor:
        """(B, 1|H, N) entries that must stay (see the module docstring); none by default."""
        return torch.zeros_like(ctx.valid[:, :1])

    def forced_desc(self) -> str:
        return ""

    def shrink_note(self, ctx: KVContext, knob: str, size: int | str, fitted: Tensor, fits: Tensor,
                    budget: Tensor | None = None) -> None:
        """Record in ``ctx.notes`` that ``knob`` (of ``size`` entries) was shrunk to ``fitted`` (B,) where it left
        no room (``fits`` (B,) False) in ``budget`` (B,) (default: the layer's)."""
        budget = ctx.budget if budget is None else budget
        b = int(budget[~fits].min()) if budget is not None else 0
        ctx.notes.append(f"{self.name}: {knob} ({size}) left no room in a budget of {b} entries: shrunk to "
                         f"{int(fitted[~fits].min())} there")

    def score(self, ctx: KVContext) -> Tensor:
        raise NotImplementedError


def shrunk_window(window: int, budget: Tensor) -> tuple[Tensor, Tensor]:
    """An observation window of ``window`` tokens fitted to budgets (B,): unchanged where it leaves room for a
    selected entry (``window < budget``), else half the budget (at least 1). Returns (windows (B,), fits (B,))."""
    fits = budget > window
    return torch.where(fits, torch.full_like(budget, window), (budget // 2).clamp(min=1)), fits


def check_window_and_pooling(m: Any) -> None:
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
