"""Visual token reduction for LLaVA-style VLMs (integration point ``vlm-visual``), one file per method;
importing the package registers them. What every method shares is in :mod:`.base`.

Two places, as in the papers:

* **before the LLM** (``visionzip``, ``divprune``, ``hiprune``, ``pool``, ``random``; stage 1 of ``todre``):
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

``keep``, per method (a float fraction in (0, 1] or an int count of visual tokens per image):

=========== ======================================================================== =====================
method      keep means                                                               paper default
=========== ======================================================================== =====================
visionzip   tokens per image (dominant + contextual, 54:10 as LLaVA's 64-token cfg)  64/576
divprune    tokens per image                                                         0.098 (~56/576)
hiprune     tokens per image (anchors + buffers + registers)                         192/576
pool        tokens per image (average pooling of the patch grid)                     --
random      tokens per image (seeded)                                                --
fastv       visual tokens kept from ``layer`` on (FastV's 1 - R)                     K=2, R=50% -> 0.5
sparsevlm   visual fraction averaged over the layers from the 1st pruned one on,        64/576
            split over stages in the official 64-token list's shape (66 : 30 : 17)
pdrop       PyramidDrop's lambda: fraction kept at each stage (lambda, lambda^2, ...)  0.5
todre       tokens per image after stage 1 (diversity); all visual tokens dropped    0.1
            from ``layer`` on (information migration); keep=1: identity
=========== ======================================================================== =====================

The layer-averaged visual-token fraction each run really had is in ``Handle.stats`` (``visual_tokens``
per layer) and in the benchmark's FLOPs.
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
    "VisionZip",
    "VlmMethod",
]
