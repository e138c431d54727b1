"""tokenreduce: token reduction for vision, language and multimodal transformers.

Every method is X' = P(X, E(X)) under a budget at an integration point (Kong et al. 2025):
criteria (E) score tokens, strategies (P) reduce them, ``Keep`` budgets say how many survive, adapters
place them in real model families. See docs/design.md.
"""

from . import methods as _methods_pkg  # noqa: F401  (importing the methods registers them)
from .adapters.base import Handle, Stats
from .adapters.encoder import mean_pool
from .api import apply, methods  # `tr.methods` is the function; the package stays tokenreduce.methods
from .compress import compress  # `tr.compress` is the function; the module stays tokenreduce.compress
from .core import Keep, Reducer, TokenState, criteria, strategies
from .core.loss import rho1_loss  # selective language modelling (Rho-1): token selection in the training loss
from .pipelines import generate_with_question, question_length  # kv-cache QA: count / keep the question

__version__ = "0.1.0"

__all__ = [
    "Handle",
    "Keep",
    "Reducer",
    "Stats",
    "TokenState",
    "__version__",
    "apply",
    "compress",
    "criteria",
    "generate_with_question",
    "mean_pool",
    "methods",
    "question_length",
    "rho1_loss",
    "strategies",
]
