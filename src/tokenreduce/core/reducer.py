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
    Strategies that need both a metric and scores (``transform``) take the metric from ``metric=`` in
    the context (or the token features) and the scores from the criterion.
    """

    criterion: str | Criterion
    strategy: str | Callable[..., TokenState]
    budget: KeepLike = 0.5
    strategy_kw: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self._criterion = get_criterion(self.criterion)
        self._strategy = get_strategy(self.strategy)
        self.budget = Keep.of(self.budget)
        want = getattr(self._strategy, "input_kind", None)
        got = self._criterion.kind
        if want == "metric" and got != "metric" and self._strategy.__name__ != "transform":
            raise ValueError(
                f"strategy {self.strategy!r} compares tokens and needs a metric criterion (e.g. 'similarity'), "
                f"got {self.criterion!r} (kind {got!r})"
            )
        if want == "score" and got != "score":
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
        valid = state.reducible()
        scores = out if out.dim() == 2 else None
        counts = budget.counts(state.reducible_counts(), scores=scores, valid=valid, stage=stage)
        name = self._strategy.__name__
        if name == "transform":
            metric = ctx.get("metric", state.x)
            if scores is None:
                raise ValueError("strategy 'transform' needs a score criterion to pick its target tokens")
            return self._strategy(state, metric, counts, scores, **self.strategy_kw)
        if name == "pool":
            return self._strategy(state, counts, **self.strategy_kw)
        return self._strategy(state, out, counts, **self.strategy_kw)
