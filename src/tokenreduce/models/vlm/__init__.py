"""A small LLaVA-style VLM trained here, on CPU, on the digit-scene VQA set (:mod:`tokenreduce.data.vqa`).

No pretrained VLM can be downloaded, so tokenreduce trains its own. It is a real
:class:`transformers.LlavaForConditionalGeneration` -- a CLIP vision tower (96x96 scenes, 8x8 patches:
144 visual tokens + CLS), LLaVA's two-layer GELU projector and a Llama decoder (grouped-query attention,
RoPE) -- so token-reduction methods reach it through exactly the code path they use on real LLaVA. Changes
to LLaVA's parts: CLIP's linear patch embedding is a small convolutional stem with the same token grid
(:class:`~tokenreduce.models.vlm.model.ConvStemPatchEmbed`; Xiao et al., 2021), the projector adds a learned
2-D position embedding (:class:`GridPositionProjector`), and ``vision_feature_layer=-1`` (the last CLIP
layer; LLaVA-1.5 uses -2 of 24 layers, which would leave this small tower's last layer untrained). Text uses
a word-level tokenizer with an ``<image>`` token; :func:`encode_prompts` expands it to the 144
placeholders, as LLaVA's processor does.

    model, tok, info = load_small_vlm()                 # cached in ~/.cache/tokenreduce/small_vlm/<hash>
    batch = encode_prompts(tok, ["what digit is at the top left ?"], images[:1], prompt=prompt_format(model))
    out = model.generate(**batch, max_new_tokens=2, do_sample=False)

Train it once with ``tokenreduce train vlm`` (or ``python scripts/train_vlm.py``; about 40 min on one CPU
thread). The training recipe is described in :mod:`tokenreduce.models.vlm.train`, its switches in
:class:`VLMRecipe`.

The default model ``v3-0e4ba3681b`` (:class:`VLMTrainConfig`: 400 vision + 1100 + 1000 warm-restart steps,
2,289 s on 1 thread) answers the 200 held-out test questions per type with accuracy **identity 0.945,
counting 0.95, spatial 0.995, comparison 0.83, detail 0.945** (majority answer 0.14 / 0.355 / 0.305 /
0.215 / 0.115; a spatial question names its two possible answers, so a guess scores 0.5). What was tried on
the way, with every measurement, is in ``docs/experiments/small_vlm.md``.

Modules: :mod:`~tokenreduce.models.vlm.config` (configuration, checkpoint address),
:mod:`~tokenreduce.models.vlm.model` (the network and tokenizer), :mod:`~tokenreduce.models.vlm.targets`,
:mod:`~tokenreduce.models.vlm.batches` and :mod:`~tokenreduce.models.vlm.losses` (what training feeds and
optimises), :mod:`~tokenreduce.models.vlm.train` (the loop, loading), :mod:`~tokenreduce.models.vlm.evaluation`
(prompts, answers, accuracy), :mod:`~tokenreduce.models.vlm.cli` (``tokenreduce train vlm``).
"""

from __future__ import annotations

from .config import DESCRIBE_ORDERS, MODEL_VERSION, PROMPT_FORMATS, VLMRecipe, VLMTrainConfig, checkpoint_dir
from .evaluation import answer_questions, encode_prompts, eval_set, evaluate_vqa, parse_answer, prompt_format
from .model import GridPositionProjector, build_small_vlm, build_tokenizer, grid_sincos
from .targets import RATIONALE_NEW_TOKENS, axis_rationale, training_target
from .train import load_small_vlm, train_small_vlm

__all__ = [
    "DESCRIBE_ORDERS",
    "MODEL_VERSION",
    "PROMPT_FORMATS",
    "RATIONALE_NEW_TOKENS",
    "GridPositionProjector",
    "VLMRecipe",
    "VLMTrainConfig",
    "answer_questions",
    "axis_rationale",
    "build_small_vlm",
    "build_tokenizer",
    "checkpoint_dir",
    "encode_prompts",
    "eval_set",
    "evaluate_vqa",
    "grid_sincos",
    "load_small_vlm",
    "parse_answer",
    "prompt_format",
    "train_small_vlm",
    "training_target",
]
