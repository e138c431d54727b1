"""Visual token reduction for LLaVA-style VLMs (integration point ``vlm-visual``), one file per method;
importing the package registers them. What every method shares is in :mod:`.base`.

Two places, as in the papers:

* **before the LLM** (``visionzip``, ``divprune``, ``hiprune``, ``pool``, ``random``, ``trim``; stage 1 of ``todre``):
  each image's visual tokens are reduced once, on the vision features before LLaVA's projector
  (``where = "pre"``) or on the projected features (``"post"``); the prompt then carries fewer image
  placeholders, so the LLM sees a shorter sequence. ``positions="compact"`` (default): contiguous position
  ids, as LLaVA builds its input sequence from the reduced features (the papers' code); ``"keep"``: every
  surviving token keeps the id it has in the unreduced prompt (its patch's slot; the text after the image
  keeps its ids too), so the LLM sees the image at the positions it was trained with.
* **inside the LLM** (``fastv``, ``sparsevlm``, ``pdrop``; stage 2 of ``todre``): at chosen decoder layers
  the visual tokens' hidden states are pruned during prefill, so later layers compute and cache only the
  survivors (their KV cache is really smaller); text tokens are never removed. Scores use the attention
  the last (or rater) text tokens pay, computed from a layer's own q/k for those few query rows.

``keep`` is one thing for every method here (``tr.methods()``, integration point ``vlm-visual``): the
**fraction of the visual-token work in the LLM kept**, the mean over the decoder layers of the visual tokens
they process, over the visual tokens of the unreduced prompt (:func:`~tokenreduce.core.visual.visual_work`).
Each method maps it onto its own schedule; ``Handle.stats.keep_achieved`` reports what ran (from the
per-layer ``visual_tokens``), ``Handle.stats.notes`` what a budget could not honour exactly:

=========== ============================================================== ===============================
method      keep -> the method's schedule                                  preset ``"paper"``
=========== ============================================================== ===============================
visionzip   keep x N tokens per image (before the LLM: work = keep)        keep = 64/576
divprune    keep x N tokens per image                                      keep = 0.098
hiprune     keep x N tokens per image                                      keep = 192/576
pool        the grid with about keep x N cells per image                   --
random      keep x N tokens per image                                      --
trim        keep x N tokens per image (K - 1 most question-similar + 1     --
            average of the rest); reads the prompt's text
fastv       f = 1 - R kept from ``layer`` K on, (K + (L-K) f) / L = keep;    Keep([0.5]) (R = 50%)
            keep < K/L unreachable
sparsevlm   the official 64-token list's shape (66 : 30 : 17) scaled so     Keep((66, 30, 17) / 576)
            that the all-layer average (recycled tokens included) is keep
pdrop       lambda solved so that the all-layer average is keep; never      Keep([0.5, 0.25, 0.125])
            fewer than one visual token per image at a stage
todre       stage 1 keeps keep x L / ``layer`` per image, all visual        Keep([0.1]) (stage 1)
            tokens dropped from ``layer`` on; keep > layer/L unreachable
            (keep = 1.0: identity)
=========== ============================================================== ===============================

A keep a schedule cannot reach is a ValueError naming the reachable range (raised by ``tr.apply`` on
models with a fixed number of tokens per image). The papers' own budgets stay reachable in the methods'
own terms: ``tr.Keep(count=n)`` is n visual tokens per image for the before-the-LLM methods and ToDRE's stage
1 (refused by the inside-LLM ones, which prune a sample's visual tokens together), ``tr.Keep([...])`` the
per-stage fractions of fastv, sparsevlm, pdrop and todre, and ``preset="paper"`` the paper's setting.
"""

from .base import VLM, ModelInfo, StageDecision, StageView, VlmMethod
from .divprune import DivPrune
from .fastv import FastV
from .hiprune import HiPrune
from .pdrop import PDrop
from .pool import PoolVLM
from .random import RandomVLM
from .sparsevlm import SparseVLM
from .todre import ToDRE
from .trim import Trim
from .visionzip import VisionZip

__all__ = [
    "VLM",
    "DivPrune",
    "FastV",
    "HiPrune",
    "ModelInfo",
    "PDrop",
    "PoolVLM",
    "RandomVLM",
    "SparseVLM",
    "StageDecision",
    "StageView",
    "ToDRE",
    "Trim",
    "VisionZip",
    "VlmMethod",
]
