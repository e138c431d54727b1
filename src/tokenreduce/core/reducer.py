"""`Reducer`: the model-free composition X' = P(X, E(X)) under a budget (Kong et al. 2025, Sec. 2)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from torch import Tensor

from .budget import Keep, KeepLike
from .criteria import Criterion, get_criterion
from .state import TokenState, check_finite
from .strategies import get_strategy

__all__ = ["Reducer"]


@dataclass
class Reducer:
    """Compose a criterion (E), a strategy (P) and a budget.

    >>> state = Reducer("attention", "prune", Keep(0.5))(state, attn=attn)
    >>> state = Reducer("similarity", "merge", Keep(0.5))(state)

    ``strategy_kw`` are passed to the strategy (e.g. ``{"algo": "kmeans"}`` for ``cluster``).
    Each strategy declares its inputs (``needs``, see :func:`tokenreduce.core.strategies.strategy`): a score
    criterion feeds ``scores``; ``metric`` comes from a metric criterion, else from ``metric=`` in the
    context, else the token features (``transform`` needs both).
    """

    criterion: str | Criterion
    strategy: str | Callable[..., TokenState]
    budget: KeepLike = 0.5
    strategy_kw: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self._criterion = get_criterion(self.criterion)
        self._strategy = get_strategy(self.strategy)
        self.budget = Keep.of(self.budget)
        needs = getattr(self._strategy, "needs", None)  # declared by @strategy; None: a plain callable
        got = self._criterion.kind
        if needs is None:
            return
        if got == "score" and "scores" not in needs and needs:
            raise ValueError(
                f"strategy {self.strategy!r} compares tokens and needs a metric criterion (e.g. 'similarity'), "
                f"got {self.criterion!r} (kind {got!r})"
            )
        if got == "metric" and "scores" in needs:
            raise ValueError(
                f"strategy {self.strategy!r} ranks tokens and needs a score criterion "
                f"(e.g. 'attention', 'norm', 'random'), got {self.criterion!r} (kind {got!r})"
            )

    def __call__(self, state: TokenState, stage: int = 0, **ctx: Tensor) -> TokenState:
        if not isinstance(state, TokenState):
            raise TypeError(f"Reducer expects a TokenState, got {type(state).__name__}; use TokenState.from_tensor(x)")
        check_finite(state.x)
        out = self._criterion(state, **ctx)
        budget: Keep = self.budget  # type: ignore[assignment]
        scores = out if self._criterion.kind == "score" else None
        counts = budget.counts(state.reducible_counts(), scores=scores, valid=state.reducible(), stage=stage)
        needs = getattr(self._strategy, "needs", None)
        if needs is None:  # a user's callable: (state, criterion output, counts)
            return self._strategy(state, out, counts, **self.strategy_kw)
        # a score criterion feeds "scores"; the metric comes from the criterion, the context or the features
        inputs = {"scores": scores, "metric": out if scores is None else ctx.get("metric", state.x)}
        return self._strategy(state, counts=counts, **{k: inputs[k] for k in needs}, **self.strategy_kw)
