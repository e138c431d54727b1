"""Model-free building blocks: TokenState, budgets, criteria, strategies, Reducer."""

from . import criteria, strategies
from .budget import Keep
from .reducer import Reducer
from .state import TokenState

__all__ = ["Keep", "Reducer", "TokenState", "criteria", "strategies"]
