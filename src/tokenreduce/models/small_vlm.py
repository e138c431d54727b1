"""A small LLaVA-style VLM trained here, on CPU, on the digit-scene VQA set (:mod:`tokenreduce.data.vqa`).

No pretrained VLM can be downloaded, so tokenreduce trains its own. It is a real
:class:`transformers.LlavaForConditionalGeneration` — a CLIP vision tower (96x96 scenes, 8x8 patches:
144 visual tokens + CLS), LLaVA's two-layer GELU projector and a Llama decoder (grouped-query attention,
RoPE) — so token-reduction methods reach it through exactly the code path they use on real LLaVA. The one
change inside the CLIP tower: its linear patch embedding is replaced by a small convolutional stem with the
same token grid (:class:`ConvStemPatchEmbed`; Xiao et al., 2021). Pilots (1 CPU thread, batch 32, held-out
val scenes): with digits at free 20-24 px positions neither patch embedding got per-patch digit accuracy
above 0.17 in 250 steps (the previous model of this module learned only counting); with digits snapped to
the patch grid (the scene default now) the digits read right per cell after 75 steps were 0.76 with the
stem vs 0.50 with linear patches.
Text uses a word-level tokenizer (``tokenizers`` WordLevel wrapped in ``PreTrainedTokenizerFast``) with an
``<image>`` token; :func:`encode_prompts` expands it to the 144 placeholders, as LLaVA's processor does.

Training, in LLaVA's order:

1. vision pre-training (``vision_steps``): the tower alone, with a linear head on every patch token
   predicting which digit's ink it shows (regular 0-9 in which cell, small 0-9, or background), which
   scene cell it lies in, and (model v3) the digit's value alone and its size (background / regular /
   small) — so visual tokens carry *what* and *where*, and "digit d" is one direction whatever its cell or
   size (:func:`_aux_loss`); the head is dropped afterwards.
2. visual instruction tuning (``steps``): projector + LLM + (default) the vision tower with its auxiliary
   loss still on, on fresh scenes every step (``freeze_vision=True`` keeps the tower frozen, as LLaVA-1.5
   does; models v2/v3 did). Each sequence is ``<image> q answer : a </s>`` (``prompt="image_first"``,
   LLaVA's layout; models up to ``v3-f5ac68a128`` used ``"question_first"``, ``q <image> answer :``)
   followed by up to ``qa_per_image - 1`` more ``q answer : a </s>`` turns; the loss is on answer tokens only (and ``</s>``); sometimes one turn is the
   dense ``describe`` task. The LM loss is the mean over question types of each type's mean answer-token
   loss (``loss_per_type``; :func:`_lm_loss`). Cosine learning-rate schedule with warm-up.

``vision_feature_layer=-1`` (the last CLIP layer; LLaVA-1.5 uses -2 of 24 layers, which would leave this
small tower's last layer untrained).

    model, tok, info = load_small_vlm()                 # cached in ~/.cache/tokenreduce/small_vlm/<hash>
    batch = encode_prompts(tok, ["what digit is at the top left ?"], images[:1], prompt=prompt_format(model))
    out = model.generate(**batch, max_new_tokens=2, do_sample=False)

Train with ``tokenreduce train vlm`` (or ``python scripts/train_vlm.py``).

Measured (default config, model v3 ``v3-42c6df0141``, tower frozen: 400 vision + 1100 + 600 warm-restart steps, 27 min
of training on 1 niced thread of a shared 2-core box; 200 held-out test questions per type, majority
baseline in parentheses): identity 0.46 (0.14), counting 0.925 (0.355), spatial 0.51 (0.505), comparison
0.59 (0.215), detail 0.865 (0.115). Model v2 (conjoined aux classes only, token-mean loss): identity
0.74, counting 0.495, spatial 0.54, comparison 0.59, detail 0.055. ``spatial`` is still not learned: its
training loss stays at chance (yes/no balanced over four relations, so neither digit's position alone
predicts the answer: no first-order gradient towards finding a digit by its value); on v3, a linear probe of
the answer position's hidden state (every layer, 1200 held-out spatial questions) reads the column of either
named digit at 0.31-0.38 (majority 0.37): the LLM never looks the digits up. A training-only
``where is the 3 ?`` -> ``top left`` task aimed at that look-up did not move it in an 800-step pilot (and
identity/detail stayed at chance in that run), so it was not kept.

Model ``v3-d06f2f86f5`` (tower frozen) adds two things to v3: the warm restart's 1000 steps train on
token-reduced images half the time (``restart_drop``), and spatial answers are trained with their rationale
first (``rationale``: ``3 top left , 7 center , no``), so each digit's cell is a supervised look-up of its
own. Measured (400 vision + 1100 + 1000 restart steps, 1,542 s on 1 thread; 200 test questions per type):
identity 0.335, counting 0.90, spatial 0.515, comparison 0.615, detail 0.805. The rationale did not teach
spatial, and it shows why: in 200 generated test rationales each named digit's cell is right 0.295 / 0.32
of the time (both 0.025), while 0.927 of the cells it names hold a regular digit and naming a random
occupied cell would score 0.355. The LLM knows which cells are occupied but does not bind a digit's value
to its cell in either direction (identity, cell -> value, is
0.335 too), although each visual token carries both (frozen-tower probes: value 0.91, cell 0.92): on
identity questions at most 0.29 of the answer position's visual attention falls on the asked cell (a cell is
1/9 of the patches), on detail questions 0.65 on the small digit's cell (``scripts/vlm_diagnostics.py``).
With the same training for 2500 + 0 steps: identity 0.355, counting 0.965, spatial 0.51, comparison 0.61,
detail 0.80. The default model (``v3-f5ac68a128``) also trains the vision tower in phase 2 (with its
auxiliary loss): 1,866 s on 1 thread; identity 0.39, counting 0.97, spatial 0.50, comparison 0.62, detail
0.985 -- better on counting and detail, spatial still at chance.

Why identity failed, measured (``scripts/vlm_diagnostics.py``, 200 test identity questions): given only the
asked cell's 16 visual tokens (original position ids) ``v3-f5ac68a128`` answers 0.93, given all 144 it
answers 0.39, given the asked cell and one other occupied cell 0.505 -- it reads a digit well but does not
find a cell. Three changes were trained from scratch (all 400 vision + 1100 + 1000 restart steps, ~1,950 s
on 1 thread each; test accuracy identity / counting / spatial / comparison / detail):

- ``route_weight=0.03`` (routing supervision, :func:`_routing_loss`), question first: 0.42 / 0.935 / 0.515 /
  0.605 / 0.97 (``v3-283d8e2fc1``; no gain). Weights 0.1 and 1.0 hurt every type in 800-step pilots: the
  routing gradient is ~20x the LM's and the shared clip at 1.0 then shrinks the LM's steps.
- ``prompt="image_first"`` alone: 0.74 / 0.98 / 0.47 / 0.665 / 0.97 (``v3-4066606555``). LLaVA's own layout
  is what fixes identity: the question's cell words sit next to ``answer :`` and just after the image.
- image first + routing 0.03: 0.645 / 0.96 / 0.50 / 0.66 / 0.975 (``v3-0738133f86``).
- the previous default (``v3-6f64beb21b``): image first + routing 0.03 + axis rationales (``rationale_axis``):
  **0.745 / 0.99 / 0.465 / 0.765 / 0.97**, 1,950 s. Best overall (0.787 vs 0.765 for image first alone, the
  difference is comparison); whether routing or the axis rationale brings it is not separated.

``spatial`` is still at chance in every model, and the diagnostics locate the last step: after the *true*
rationale, teacher-forced, ``v3-0738133f86`` writes the right yes/no 0.55 of the time -- the LLM has not
learned the relation itself (a 9 x 9 x 4 table of cell names, or 3 x 3 x 4 with axis rationales).

Two steps fail, measured on 600-step pilots (400 vision + 600 joint steps, no restart, 1 thread, ~630 s each;
test identity / counting / spatial / comparison / detail; the default config gives 0.33 / 0.97 / 0.465 /
0.58 / 0.92 at this length, and identity varies from 0.19 to 0.75 between such short runs). The variants
were applied by monkeypatching the question generator and the training target; none is in the library:

- the rationale also names the relation that holds (``3 left , 7 center , left of , yes``): 0.75 / 0.945 /
  0.475 / 0.63 / 0.88. The yes/no after the true rationale is right 0.49 of the time and its loss stays at
  ln 2: checking the derived relation against the question's relation is not learned either.
- GQA-style choice questions (``is the 3 left or right of the 7 ?`` -> ``left``; the answer then follows
  from the two axis words without the question's relation): 0.415 / 0.935 / 0.565 / 0.61 / 0.93. The
  relation step is partly learned: loss 0.54, answer after the true rationale right 0.645. The look-up is
  not learned. The generated rationale copies the question's digits 0.97 of the time, but names the copied
  digit's column/row correctly only 0.39 of the time (about chance).
- choice questions without ``describe``: 0.185 / 0.96 / 0.47 / 0.445 / 0.775.
- choice questions with ``describe`` in digit-value order: 0.375 / 0.92 / 0.605 / 0.64 / 0.92. The idea was
  that in cell order the digit word can be written from the cell the model has just looked at, a shortcut a
  rationale cannot use. Position given the copied digit is still right only 0.365 of the time.

So the spatial bottleneck is finding a digit by its value (value -> cell). Reading a cell's value
(identity) is learned.

Why the look-up is hard for this LLM, measured with the look-up probe (``scripts/vlm_diagnostics.py
--probe``: one attention head trained on the *fixed* projected visual tokens, query = a digit value): on
the choice-question pilot's tokens it learns value -> cell only slowly (0.33 after 600 probe steps, chance
0.11) while cell -> value reads 0.81 -- RoPE tells a query where a key is, but not the value it reads, so a
token found by its content carries its place back only if its features do, and here they do weakly. A
learned 2-D position embedding after the projector (``visual_position``, :class:`GridPositionProjector`)
fixes the tokens: the probe reads value -> cell 0.95 after 600 steps on a pilot trained with it. The LLM
still does not learn the look-up in 600-step pilots with it (test identity / counting / spatial /
comparison / detail; "place right" = the generated rationale names the copied digit's column/row right):

- yes/no questions: 0.56 / 0.97 / 0.50 / 0.67 / 0.93; digits copied 0.995, place right 0.33. The
  routing-supervised head (head 0 of layers 2 and 4) puts 0.37 / 0.36 of its visual attention on the
  named digit's cell (uniform 0.11), but a logistic probe reads the column from that head's output only
  0.51 / 0.48 of the time (chance 0.33; 1,200 rationale digits) and from the residual stream at most 0.38.
- choice questions: 0.39 / 0.95 / 0.515 / 0.62 / 0.925; place right 0.365.
- yes/no, half of the spatial training turns replaced by a direct look-up (``is the 3 ?`` -> ``top
  left``): 0.665 / 0.58 / 0.505 / 0.665 / 0.90; place right 0.37.
- choice questions with the place words and the answer as loss terms of their own (``lookup_loss``,
  ``relation_loss``): 0.655 / 0.95 / 0.535 / 0.645 / 0.91. The relation is learned (its loss 0.25 at step
  600), the look-up's loss stays at ln 3 (1.08).

Full-length models with the embedding (400 vision + 1100 + 1000 restart steps, two trained at once on the
2 cores, ~3,400 s each):

- yes/no questions (``spatial_choice=False``, ``v3-5e8d40d61f``): 0.85 / 0.975 / 0.49 / 0.72 / 0.965.
- ``v3-d705f465f1`` (the default before word grounding): choice questions + the embedding: 0.945 / 0.965 /
  0.495 / 0.745 / 0.955 (mean 0.821 vs 0.787 for ``v3-6f64beb21b``, the default before it, whose spatial questions were
  yes/no). The relation step is learned (training loss 0.01 at the end), identity gains 0.2; counting,
  comparison and detail are within 0.025 of the previous default (200 questions per type: one standard
  error is ~0.03). ``spatial`` (two answers per question: chance 0.5) is still not above chance: the
  generated rationale names the digits' places no better than chance, so the look-up is what is left.
  Its generated rationales often do not start with the question's first digit (1 of 8 inspected did):
  ``3 top , 2 center , above`` for ``is the 2 above or below the 3 ?`` names digits read off cells, with
  their places, and answers from the rationale's own order -- it reads a cell's digit (identity) where it
  should find a digit's cell. (Over 200 test questions both parts of the rationale are right 0.07.)

A next step this suggests, piloted by monkeypatch (not in the library; 600 steps, choice questions, the
embedding): the spatial rationale is the whole scene in cell order (the ``describe`` answer, which the
model writes well), so the look-up becomes a look-up in text. Test 0.32 / 0.955 / 0.46 / 0.525 / 0.825; its
place words are learned (loss 0.18), the answer after them is not yet (0.83) at 600 steps. Trained to full
length (400 + 1100 + 1000 steps, 1,312 s on 2 threads): 0.955 / 0.97 / 0.465 / 0.77 / 0.955, the answer's
loss still 0.77 (ln 2 = 0.69) -- even finding the question's digit in the model's own text is not learned,
so the obstacle is the question's digit as a query, not the visual tokens alone.

**Word grounding teaches the look-up** (``ground_weight``, :func:`_grounding_loss`). Each projected visual
token, read through the LLM's input embedding matrix (logits ``x E^T`` over closed word sets), must name its
digit's value word (``0``..``9``, inked patches) and its cell's column and row words -- LLaVA's stage-1
alignment of visual tokens to the LLM's word space, made explicit per patch. A digit's tokens then share a
direction with the word the question names it by, so finding "the 3" is the same-token match a copy head
makes in text, and what the match reads back (``left``) is a word the LM writes. 600-step pilots (test
identity / counting / spatial / comparison / detail; generated rationale's first / second part right, both
right; answer after the true rationale):

- ``ground_weight=0.1``: 0.74 / 0.935 / 0.515 / 0.655 / 0.94; parts 0.455 / 0.41, both 0.19; 0.675 (the
  choice pilot without it: 0.39 / 0.95 / 0.515 / 0.62 / 0.925, place right 0.365). The look-up's training
  loss falls below ln 3 (0.95 at step 550); the grounding loss itself is 0.02 by then.
- ``describe_order="value"`` (describe turns list digits by value, so each place is a look-up keyed by the
  digit just written), no grounding: 0.51 / 0.74 / 0.60 / 0.63 / 0.92; parts 0.39 / 0.26, both 0.06; 0.59.
  The look-up's loss stays at ln 3 (1.11).
- grounding + ``describe_order="value"``: 0.59 / 0.625 / 0.55 / 0.64 / 0.935; parts 0.465 / 0.465, both
  0.21; 0.545 -- no gain over grounding alone.
- grounding + ``lookup_loss`` + ``relation_loss``: 0.63 / 0.34 / 0.49 / 0.695 / 0.93; parts 0.29 / 0.34,
  both 0.075; 0.765.

**The default** (``v3-0e4ba3681b``): ``v3-d705f465f1`` + ``ground_weight=0.1``, 400 vision + 1100 + 1000
restart steps, 2,289 s on 1 thread (sharing the 2 cores with pilots): **identity 0.945, counting 0.95,
spatial 0.995, comparison 0.83, detail 0.945** (200 test questions per type; majority answer 0.14 / 0.355 /
0.305 / 0.215 / 0.115; a spatial question names its two possible answers, so a guess scores 0.5). The look-up is learned: its training loss is 0.03-0.1 by the end of the first joint phase
(val spatial 0.70 there), and the generated rationale names both digits' places right on 0.965 of the test
questions (first 0.99, second 0.975; 0.07 without grounding); after the true rationale the answer is right
1.0. Counting, identity and detail are within 0.02 of ``v3-d705f465f1``; comparison gains 0.085.
The same configuration with ``seed=1`` (another draw of training scenes and initial weights; 2,928 s,
sharing the cores): 0.965 / 0.96 / 0.96 / 0.815 / 0.955, both rationale parts right 0.865.
``scripts/vlm_diagnostics.py --probe`` on the default: the routing-supervised head of layer 2 puts 0.94 of its
visual attention on the asked cell (identity; 0.95 on the small digit's cell for detail). The look-up probe
on its *fixed* projected tokens reads value -> cell only 0.59 after 600 steps (0.95 on the ungrounded
pilot's tokens), cell -> value 0.77: the tokens alone are not what improved. Grounding supplies the match
between the question's word and the tokens, which the LLM did not find by itself.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import platform
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from tokenreduce._paths import cache_dir
from tokenreduce.data.vqa import (
    POSITION_NAMES,
    QA,
    QUESTION_TYPES,
    SPECIAL_TOKENS,
    VOCAB,
    VQA_VERSION,
    Scene,
    SceneConfig,
    cell_of_patch,
    generate_scenes,
    make_vqa_set,
    questions_for,
)

__all__ = [
    "MODEL_VERSION",
    "PROMPT_FORMATS",
    "GridPositionProjector",
    "VLMTrainConfig",
    "answer_questions",
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
    "register_cli",
    "train_small_vlm",
    "training_target",
]

MODEL_VERSION = 3
#: "image_first": ``<image> q answer :`` (LLaVA's layout); "question_first": ``q <image> answer :`` (the
#: instruction before the image, as InstructBLIP/Qwen-VL-style prompts do), which lets the visual tokens
#: attend to the question in the causal LLM.
PROMPT_FORMATS = ("image_first", "question_first")
_HASH_EXCLUDED = frozenset({"num_threads", "eval_every", "log_every"})
#: the warm restart's token-reduction augmentation (:func:`_reduce_plan`); absent from the hash when off
_DROP_FIELDS = ("restart_drop", "drop_min", "drop_merge", "drop_keep_positions")
#: the routing supervision (:func:`_routing_loss`); absent from the hash when off
_ROUTE_FIELDS = ("route_weight", "route_layers", "route_head")
#: options absent from the hash when off (false or 0), so models trained before they existed keep their hash
_OPTIONAL_FIELDS = ("rationale", "rationale_axis", "relation_loss", "text_relation", "visual_position",
                    "spatial_choice", "lookup_loss", "ground_weight")
#: accepted :attr:`VLMTrainConfig.describe_order` values (the first is the default, absent from the hash)
DESCRIBE_ORDERS = ("cell", "value")
_TRAIN_HINT = "run `tokenreduce train vlm` or `python scripts/train_vlm.py`"


@dataclass(frozen=True)
class VLMTrainConfig:
    """Architecture, data and optimisation of the small VLM (everything but the excluded speed knobs
    enters the cache hash)."""

    scene: SceneConfig = field(default_factory=SceneConfig)
    patch_size: int = 8
    stem_channels: int = 32
    vision_dim: int = 96
    vision_layers: int = 4
    vision_heads: int = 4
    text_dim: int = 128
    text_layers: int = 6
    text_heads: int = 4
    text_kv_heads: int = 2
    vision_steps: int = 400
    vision_batch_size: int = 32
    vision_lr: float = 2e-3
    steps: int = 1100
    restart_steps: int = 1000
    restart_lr: float = 1e-3
    restart_drop: float = 0.5
    drop_min: float = 0.03
    drop_merge: float = 0.25
    drop_keep_positions: float = 0.5
    batch_size: int = 16
    qa_per_image: int = 6
    prompt: str = "image_first"
    describe_prob: float = 0.5
    aux_weight: float = 0.5
    aux_value: bool = True
    loss_per_type: bool = True
    #: train ``spatial`` answers with their rationale first (``3 top left , 7 center , no``; QA.rationale):
    #: each named digit's position is then a supervised look-up of its own instead of a hidden step behind a
    #: balanced yes/no (absent from the hash when off: the v3 and drop-augmented models' hashes)
    rationale: bool = True
    #: spatial rationales name only the axis the relation compares (``is the 3 left of the 7 ?`` ->
    #: ``3 left , 7 center , yes``: each digit's column; above/below: its row) instead of the whole cell,
    #: so the yes/no after it is a 3 x 3 comparison instead of a 9 x 9 x 4 table (absent from the hash when off)
    rationale_axis: bool = True
    #: the yes/no after a spatial rationale is a loss term of its own (with ``loss_per_type``) instead of
    #: one of its turn's ~8 answer tokens (absent from the hash when off)
    relation_loss: bool = False
    #: the words a spatial rationale names a digit's place with (``3 left , 7 center``: ``left``,
    #: ``center``; the value -> cell look-up) are a loss term of their own instead of 2 of their turn's ~7
    #: tokens, of which the digits, commas and ``</s>`` are copied (absent from the hash when off)
    lookup_loss: bool = False
    #: text-only sequences per joint-phase batch (LLaVA-1.5 mixes language-only instruction data into
    #: visual instruction tuning): ``qa_per_image`` spatial turns about digits at random cells, no image, the
    #: loss on what text alone determines (the digits the rationale copies from the question and the yes/no
    #: after it; not the positions) -- the relation step without the visual look-up (0 = off, absent from
    #: the hash)
    text_relation: int = 0
    #: spatial questions in GQA's choice form (``is the 3 left or right of the 7 ?`` -> ``left``) instead of
    #: yes/no (:data:`~tokenreduce.data.vqa.SPATIAL_FORMS`), in training and in the held-out sets (absent
    #: from the hash when off)
    spatial_choice: bool = True
    #: RMS of a learned 2-D position embedding added to the projected visual tokens
    #: (:class:`GridPositionProjector`, initialised to a 2-D sine-cosine code); 0 = LLaVA's plain projector
    #: (absent from the hash when 0)
    visual_position: float = 1.0
    #: order of the ``describe`` task's items: ``"cell"`` (row-major, the digit written after the model has
    #: read a cell) or ``"value"`` (ascending digit value: each item's place is then a value -> cell look-up
    #: keyed by the digit just written, the step a spatial rationale needs) (absent from the hash when "cell")
    describe_order: str = "cell"
    #: weight of the word-grounding loss (:func:`_grounding_loss`): each projected visual token, read through
    #: the LLM's input embedding matrix, names its digit (``0``..``9``, inked patches) and its cell's column
    #: and row words, so a digit's visual tokens share a direction with the digit's word (0 = off, absent
    #: from the hash)
    ground_weight: float = 0.1
    ink_threshold: float = 0.12
    freeze_vision: bool = False
    #: weight of the routing supervision (:func:`_routing_loss`): at the positions that must look a digit up
    #: (``answer :`` of identity/comparison/detail turns, a rationale's or description's digit before its
    #: cell name, a description's ``,`` before the next digit), one head per layer in ``route_layers`` is
    #: trained to put its attention on the patches of the cells that hold the answer (0 = off, absent from
    #: the hash)
    route_weight: float = 0.03
    route_layers: tuple[int, ...] = (2, 4)
    route_head: int = 0
    lr: float = 1.5e-3
    min_lr_ratio: float = 0.05
    weight_decay: float = 0.01
    warmup_steps: int = 30
    grad_clip: float = 1.0
    seed: int = 0
    val_per_type: int = 60
    test_per_type: int = 200
    eval_seed: int = 4242
    num_threads: int = 1
    eval_every: int = 250
    log_every: int = 25

    def __post_init__(self) -> None:
        for name in ("patch_size", "vision_dim", "vision_layers", "vision_heads", "text_dim", "text_layers", "vision_batch_size",
                     "text_heads", "text_kv_heads", "steps", "batch_size", "qa_per_image", "val_per_type",
                     "test_per_type", "num_threads", "eval_every", "log_every"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"{name}={v!r} is invalid: must be an int >= 1")
        if isinstance(self.stem_channels, bool) or not isinstance(self.stem_channels, int) or self.stem_channels < 0:
            raise ValueError(f"stem_channels={self.stem_channels!r} is invalid: must be an int >= 0 (0 = linear patches)")
        if not 0 < self.ink_threshold < 1:
            raise ValueError(f"ink_threshold={self.ink_threshold!r} must be in (0, 1)")
        if self.scene.image_size % self.patch_size:
            raise ValueError(f"patch_size={self.patch_size} must divide scene.image_size={self.scene.image_size}")
        if self.text_heads % self.text_kv_heads or self.text_dim % self.text_heads:
            raise ValueError("text_kv_heads must divide text_heads, which must divide text_dim")
        if self.prompt not in PROMPT_FORMATS:
            raise ValueError(f"prompt={self.prompt!r} is invalid: accepted {PROMPT_FORMATS}")
        if not 0 < self.lr <= 1:
            raise ValueError(f"lr={self.lr!r} must be in (0, 1]")
        for name in ("restart_drop", "drop_merge", "drop_keep_positions"):
            if not 0 <= getattr(self, name) <= 1:
                raise ValueError(f"{name}={getattr(self, name)!r} must be in [0, 1]")
        if not 0 < self.drop_min <= 1:
            raise ValueError(f"drop_min={self.drop_min!r} must be in (0, 1]")
        if self.spatial_choice and self.text_relation:
            raise ValueError("text_relation builds yes/no spatial turns; it cannot be combined with spatial_choice")
        if not 0 <= self.visual_position <= 100:
            raise ValueError(f"visual_position={self.visual_position!r} must be in [0, 100] (0 = off)")
        if self.visual_position and self.text_dim % 4:
            raise ValueError(f"visual_position needs text_dim divisible by 4, got {self.text_dim}")
        if self.describe_order not in DESCRIBE_ORDERS:
            raise ValueError(f"describe_order={self.describe_order!r} is invalid: accepted {DESCRIBE_ORDERS}")
        if not 0 <= self.ground_weight <= 100:
            raise ValueError(f"ground_weight={self.ground_weight!r} must be in [0, 100] (0 = off)")
        if self.route_weight < 0:
            raise ValueError(f"route_weight={self.route_weight!r} must be >= 0")
        bad = [k for k in self.route_layers if not 0 <= k < self.text_layers]
        if self.route_weight and (bad or not self.route_layers):
            raise ValueError(f"route_layers={self.route_layers!r} is invalid: need LLM layers in [0, {self.text_layers - 1}]")
        if self.route_weight and not 0 <= self.route_head < self.text_heads:
            raise ValueError(f"route_head={self.route_head!r} must be in [0, {self.text_heads - 1}]")

    @property
    def spatial_form(self) -> str:
        return "choice" if self.spatial_choice else "yesno"

    @property
    def num_image_tokens(self) -> int:
        return (self.scene.image_size // self.patch_size) ** 2

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> VLMTrainConfig:
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - names
        if unknown:
            raise ValueError(f"unknown VLMTrainConfig fields {sorted(unknown)}; accepted: {sorted(names)}")
        d = dict(d)
        if isinstance(d.get("scene"), dict):
            d["scene"] = SceneConfig.from_dict(d["scene"])
        if isinstance(d.get("route_layers"), list):
            d["route_layers"] = tuple(d["route_layers"])
        return cls(**d)

    def parent(self) -> VLMTrainConfig | None:
        """The configuration this one continues from (a warm restart of the joint phase), if any."""
        return dataclasses.replace(self, restart_steps=0) if self.restart_steps > 0 else None

    def without_drop(self) -> VLMTrainConfig:
        """The same training without the token-reduction augmentation (model v3 ``v3-42c6df0141`` for the
        default config with ``restart_steps=600, rationale=False``)."""
        return dataclasses.replace(self, restart_drop=0.0)

    def config_hash(self) -> str:
        payload = {k: v for k, v in self.to_dict().items() if k not in _HASH_EXCLUDED}
        for k in _OPTIONAL_FIELDS:
            if not getattr(self, k):
                payload.pop(k)
        if self.describe_order == DESCRIBE_ORDERS[0]:
            payload.pop("describe_order")
        if self.route_weight == 0:  # no routing supervision: the fields do not exist for this model
            for k in _ROUTE_FIELDS:
                payload.pop(k)
        if self.restart_steps == 0:  # no warm restart: the fields do not exist for this model
            for k in ("restart_steps", "restart_lr") + _DROP_FIELDS:
                payload.pop(k)
        elif self.restart_drop == 0:  # no token-reduction augmentation: the v3 model's hash
            for k in _DROP_FIELDS:
                payload.pop(k)
        payload["_versions"] = {"model": MODEL_VERSION, "vqa": VQA_VERSION}
        return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:10]


# --------------------------------------------------------------------------- tokenizer and model
class ConvStemPatchEmbed(torch.nn.Module):
    """Convolutional stem in place of CLIP's linear patch embedding (Xiao et al., 2021, "Early Convolutions
    Help Transformers See Better"): 3x3 stride-2 convs (``channels``, doubled), one 3x3 stride-1 conv and a
    final ``k x k`` stride-``k`` conv to ``dim``, so the token grid is exactly CLIP's (``patch_size`` px per
    token) while each token describes its neighbourhood (receptive field ~19 px at patch 8) instead of one
    raw patch. A ViT with a linear patch embedding learned the digits of :mod:`tokenreduce.data.vqa` far
    more slowly on this CPU (see the module docstring). ``weight`` is the first conv's (CLIP reads the
    embedding's ``weight.dtype``)."""

    def __init__(self, patch_size: int, dim: int, channels: int = 32) -> None:
        super().__init__()
        if patch_size < 4 or patch_size & (patch_size - 1):
            raise ValueError(f"patch_size={patch_size} is invalid for the conv stem: need a power of 2 >= 4")
        layers: list[torch.nn.Module] = []
        cin, ch, stride = 3, channels, patch_size
        while stride > 2:
            layers += [torch.nn.Conv2d(cin, ch, 3, 2, 1), torch.nn.GELU()]
            cin, ch, stride = ch, ch * 2, stride // 2
        layers += [torch.nn.Conv2d(cin, cin, 3, 1, 1), torch.nn.GELU(), torch.nn.Conv2d(cin, dim, stride, stride)]
        self.proj = torch.nn.Sequential(*layers)

    @property
    def weight(self) -> torch.Tensor:
        return self.proj[0].weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x)

    def flops(self, image_size: int) -> float:
        """Forward FLOPs (2 x multiply-adds) for one ``image_size`` square image."""
        h, total = image_size, 0.0
        for layer in self.proj:
            if isinstance(layer, torch.nn.Conv2d):
                h = (h + 2 * layer.padding[0] - layer.kernel_size[0]) // layer.stride[0] + 1
                total += 2.0 * h * h * layer.in_channels * layer.kernel_size[0] * layer.kernel_size[1] * layer.out_channels
        return total


def grid_sincos(grid: int, dim: int) -> torch.Tensor:
    """(grid * grid, dim) fixed 2-D sine-cosine position code of a row-major patch grid (MAE's
    ``get_2d_sincos_pos_embed``, He et al., 2022): half the channels encode the row, half the column, each as
    sin/cos at ``dim / 4`` frequencies ``10000^(-i / (dim / 4))``. ``dim`` must be a multiple of 4."""
    if dim % 4:
        raise ValueError(f"dim={dim} is invalid for a 2-D sine-cosine code: need a multiple of 4")
    q = dim // 4
    omega = 1.0 / 10000 ** (torch.arange(q, dtype=torch.float64) / q)
    row, col = torch.meshgrid(torch.arange(grid, dtype=torch.float64), torch.arange(grid, dtype=torch.float64),
                              indexing="ij")

    def code(p: torch.Tensor) -> torch.Tensor:
        a = p.flatten()[:, None] * omega
        return torch.cat([a.sin(), a.cos()], 1)

    return torch.cat([code(row), code(col)], 1).float()


class GridPositionProjector(torch.nn.Module):
    """LLaVA's two-layer GELU projector (same ``linear_1``/``linear_2`` weights) plus a learned 2-D position
    embedding added to its output, one row per patch of the grid, initialised to :func:`grid_sincos` at
    RMS ``scale``. RoPE in the LLM marks where a key sits, which lets a query find a *place* (identity:
    cell -> value), but it never enters the attention *values*, so a query that finds a digit by its content
    reads back no position (value -> cell, which ``spatial`` needs) unless the visual token carries it. The
    CLIP tower's features do (a cell probe reads 0.92), but weakly. Measured with the look-up probe of
    ``scripts/vlm_diagnostics.py --probe`` (one attention head on the fixed projected tokens, query = a
    digit value or a cell, held-out accuracy after 100 ... 600 steps): on the 600-step choice-question pilot
    without this embedding value -> cell reads 0.12 0.12 0.13 0.16 0.24 0.33 (chance 0.11; cell -> value
    0.81 after 600), on a 600-step pilot of the yes/no questions with it (``visual_position=1``) 0.42 0.54
    0.73 0.85 0.94 0.95 (cell -> value 0.46). The embedding is added *after* the projector so that the
    projector cannot learn to squash it. (The LLM itself has not learned the look-up with it yet: see the
    module docstring.)

    ``source_patches`` (b, k) gives the grid patch of each of ``k`` < grid^2 input tokens (a token
    reduction before the projector, :mod:`tokenreduce.adapters.vlm`); -1 adds nothing (a CLS token)."""

    takes_source_patches = True

    def __init__(self, config, grid: int, scale: float = 1.0) -> None:
        super().__init__()
        from transformers.activations import ACT2FN

        dim = config.text_config.hidden_size
        self.linear_1 = torch.nn.Linear(config.vision_config.hidden_size, dim, bias=config.multimodal_projector_bias)
        self.act = ACT2FN[config.projector_hidden_act]
        self.linear_2 = torch.nn.Linear(dim, dim, bias=config.multimodal_projector_bias)
        self.position = torch.nn.Parameter(grid_sincos(grid, dim) * (scale / math.sqrt(0.5)))

    def forward(self, image_features: torch.Tensor, source_patches: torch.Tensor | None = None) -> torch.Tensor:
        y = self.linear_2(self.act(self.linear_1(image_features)))
        n = self.position.shape[0]
        if source_patches is None:
            if y.shape[-2] != n:
                raise ValueError(f"{y.shape[-2]} visual tokens but the position embedding has {n} patches; "
                                 f"pass source_patches for a reduced token set")
            return y + self.position.to(y.dtype)
        if source_patches.shape != y.shape[:-1]:
            raise ValueError(f"source_patches has shape {tuple(source_patches.shape)}, expected {tuple(y.shape[:-1])}")
        pos = self.position.to(y.dtype)[source_patches.clamp_min(0)]
        return y + pos * (source_patches >= 0)[..., None].to(y.dtype)


def build_tokenizer():
    """Word-level ``PreTrainedTokenizerFast`` over :data:`~tokenreduce.data.vqa.VOCAB` (left padding)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(VOCAB)}, unk_token=SPECIAL_TOKENS["unk"]))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token=SPECIAL_TOKENS["pad"], bos_token=SPECIAL_TOKENS["bos"],
        eos_token=SPECIAL_TOKENS["eos"], unk_token=SPECIAL_TOKENS["unk"],
        extra_special_tokens={"image_token": SPECIAL_TOKENS["image"]}, padding_side="left")
    return fast


def build_small_vlm(config: VLMTrainConfig | None = None, attn_implementation: str = "sdpa"):
    """Untrained :class:`LlavaForConditionalGeneration` of ``config``."""
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

    c = config or VLMTrainConfig()
    ids = {name: VOCAB.index(tok) for name, tok in SPECIAL_TOKENS.items()}
    vision = CLIPVisionConfig(image_size=c.scene.image_size, patch_size=c.patch_size, hidden_size=c.vision_dim,
                              intermediate_size=4 * c.vision_dim, num_hidden_layers=c.vision_layers,
                              num_attention_heads=c.vision_heads, projection_dim=c.vision_dim)
    text = LlamaConfig(vocab_size=len(VOCAB), hidden_size=c.text_dim, intermediate_size=3 * c.text_dim,
                       num_hidden_layers=c.text_layers, num_attention_heads=c.text_heads,
                       num_key_value_heads=c.text_kv_heads, max_position_embeddings=512, rms_norm_eps=1e-6,
                       pad_token_id=ids["pad"], bos_token_id=ids["bos"], eos_token_id=ids["eos"])
    cfg = LlavaConfig(vision_config=vision, text_config=text, image_token_id=ids["image"],
                      image_seq_length=c.num_image_tokens, vision_feature_layer=-1,
                      vision_feature_select_strategy="default", projector_hidden_act="gelu",
                      pad_token_id=ids["pad"], eos_token_id=ids["eos"], bos_token_id=ids["bos"])
    cfg.vqa_prompt = c.prompt  # read back by answer_questions / the benchmark
    cfg.vqa_rationale = c.rationale
    cfg.vqa_rationale_axis = c.rationale_axis
    model = LlavaForConditionalGeneration._from_config(cfg, attn_implementation=attn_implementation)
    if c.visual_position:
        model.model.multi_modal_projector = GridPositionProjector(cfg, c.scene.image_size // c.patch_size,
                                                                  c.visual_position)
    if c.stem_channels:
        model.model.vision_tower.embeddings.patch_embedding = ConvStemPatchEmbed(c.patch_size, c.vision_dim,
                                                                                 c.stem_channels)
    model.generation_config.pad_token_id = ids["pad"]
    model.generation_config.eos_token_id = ids["eos"]
    model.generation_config.bos_token_id = ids["bos"]
    return model


def encode_prompts(tokenizer, questions: Sequence[str], images: torch.Tensor | None = None,
                   num_image_tokens: int | None = None, answers: Sequence[str] | None = None,
                   prompt: str = "question_first") -> dict[str, torch.Tensor]:
    """LLaVA-style batch: ``<image>`` x N + question + ``answer :`` (or the question first, see
    :data:`PROMPT_FORMATS`), left-padded, and ``pixel_values``.

    ``num_image_tokens`` defaults to a square patch grid of ``images`` at patch 8.
    """
    if prompt not in PROMPT_FORMATS:
        raise ValueError(f"prompt={prompt!r} is invalid: accepted {PROMPT_FORMATS}")
    if images is not None and images.shape[0] != len(questions):
        raise ValueError(f"{len(questions)} questions but {images.shape[0]} images")
    if num_image_tokens is None:
        if images is None:
            raise ValueError("give images or num_image_tokens")
        num_image_tokens = (images.shape[-1] // 8) ** 2
    img = " ".join([SPECIAL_TOKENS["image"]] * num_image_tokens)
    texts = [(f"{img} {q} answer :" if prompt == "image_first" else f"{q} {img} answer :") +
             (f" {a}" if answers is not None else "")
             for q, a in zip(questions, answers if answers is not None else [None] * len(questions))]
    enc = tokenizer(texts, return_tensors="pt", padding=True)
    out = {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}
    if images is not None:
        out["pixel_values"] = images
    return out


# --------------------------------------------------------------------------- data for training
#: per-patch class: 0 background, 1 + 10 * cell + d regular digit d in scene cell ``cell`` (what and where
#: conjoined), 91 + d small digit d
_N_WHAT = 101
#: auxiliary head outputs: what (101) | where (9 cells) | value (bg + 10 digits, shared by regular and small
#: digits) | size (bg, regular, small)
_N_AUX = _N_WHAT + 9 + 11 + 3


def _patch_class(cell: int, value: int, small: bool) -> int:
    return 91 + value if small else 1 + 10 * cell + value


def _patch_value(labels: torch.Tensor) -> torch.Tensor:
    """The digit value (0-9) of each patch class of :func:`_patch_class`, regular or small alike
    (meaningless where the class is 0, background)."""
    return torch.where(labels >= 91, labels - 91, (labels - 1) % 10)


def _patch_labels(scenes, ink: torch.Tensor, c: VLMTrainConfig) -> torch.Tensor:
    """(n, P) class of each patch (:func:`_patch_class`): the digit whose ink covers more than
    ``ink_threshold`` of the patch, conjoined with its scene cell for regular digits, else 0 (background)."""
    g = c.scene.image_size // c.patch_size
    cell = torch.from_numpy(cell_of_patch(g, c.scene.image_size))
    per_cell = torch.tensor([[0 if v < 0 else _patch_class(k, v, k == s.small_cell) for k, v in enumerate(s.digits)]
                             for s in scenes])[:, cell]
    frac = F.avg_pool2d(ink[:, None].float(), c.patch_size)[:, 0].flatten(1)
    return torch.where(frac > c.ink_threshold, per_cell, torch.zeros_like(per_cell))


def _aux_loss(head: torch.nn.Module, patches: torch.Tensor, labels: torch.Tensor, c: VLMTrainConfig
              ) -> tuple[torch.Tensor, torch.Tensor]:
    """Auxiliary vision loss, per patch token: (a) which digit (regular, in which cell / small) or background
    it shows (:func:`_patch_labels`), (b) its own scene cell (0..8), so visual tokens carry *what* and *where*
    explicitly, and conjoined (a "3 in the top left" feature, which the LLM can read from a plain average
    of the visual tokens instead of having to learn position-routing attention first).
    With ``c.aux_value`` (model v3) two more targets per patch: (c) the digit *value* alone (background or
    0-9, the same class for a regular and a small digit) and (d) its *size* (background, regular, small), so
    "digit d" is one direction shared by every cell and both sizes. Without them the 101 conjoined classes
    left the small digits' features orthogonal to the regular ones of the same value (centred class-mean
    cosine, small d vs regular d 0.62 = vs regular d' 0.62 on model v2): the LLM's digit read-out learned on
    regular digits did not transfer, its attention never found the one small-digit patch (mass 0.00-0.01,
    uniform 0.007) and ``detail``/``spatial`` stayed at chance.
    ``head`` maps D -> :data:`_N_AUX` (or 101 + 9). Returns (loss, what logits (n, P, 101))."""
    cell = torch.from_numpy(cell_of_patch(c.scene.image_size // c.patch_size, c.scene.image_size))
    out = head(patches)
    what, where = out[..., :_N_WHAT], out[..., _N_WHAT:_N_WHAT + 9]
    loss = F.cross_entropy(what.flatten(0, 1), labels.flatten()) + \
        F.cross_entropy(where.flatten(0, 1), cell.expand(patches.shape[0], -1).flatten())
    if c.aux_value:
        value = torch.where(labels == 0, 0, _patch_value(labels) + 1)
        size = torch.where(labels == 0, 0, torch.where(labels >= 91, 2, 1))
        loss = loss + F.cross_entropy(out[..., _N_WHAT + 9:_N_WHAT + 20].flatten(0, 1), value.flatten()) + \
            F.cross_entropy(out[..., _N_WHAT + 20:].flatten(0, 1), size.flatten())
    return loss, what


_DIGIT_IDS = [VOCAB.index(str(v)) for v in range(10)]
_COLUMN_IDS = [VOCAB.index(w) for w in ("left", "center", "right")]
_ROW_IDS = [VOCAB.index(w) for w in ("top", "center", "bottom")]


def _grounding_loss(tokens: torch.Tensor, embedding: torch.Tensor, labels: torch.Tensor, c: VLMTrainConfig
                    ) -> torch.Tensor:
    """Word grounding of the projected visual tokens (``ground_weight``): each token (b, P, D) is read
    through the LLM's input embedding matrix (V, D) -- logits ``x E^T`` over closed word sets -- and must
    name (a) its digit's value word (``0``..``9``; inked patches only, regular and small alike) and (b) its
    cell's column word (``left``/``center``/``right``) and row word (``top``/``center``/``bottom``).
    A digit's visual tokens then share a direction with the word the question names it by, so finding
    "the 3" among the visual tokens is the same-token match a copy head makes in text, and the token's
    place is carried by place words the LM already writes. The mean of the three cross-entropies."""
    g = c.scene.image_size // c.patch_size
    cell = torch.from_numpy(cell_of_patch(g, c.scene.image_size)).to(tokens.device)
    row, col = (cell // 3).expand(tokens.shape[0], -1), (cell % 3).expand(tokens.shape[0], -1)
    logits = tokens.float() @ embedding.float().T
    ink = labels != 0
    value = _patch_value(labels)
    terms = [F.cross_entropy(logits[..., _COLUMN_IDS].flatten(0, 1), col.flatten()),
             F.cross_entropy(logits[..., _ROW_IDS].flatten(0, 1), row.flatten())]
    if ink.any():
        terms.append(F.cross_entropy(logits[..., _DIGIT_IDS][ink], value[ink]))
    return torch.stack(terms).mean()


def _cell_readout(what: torch.Tensor, scenes, c: VLMTrainConfig) -> float:
    """Fraction of digits read right from the patch classes: the most frequent non-background class among
    a cell's patches (a probe of the vision tower alone)."""
    cell = torch.from_numpy(cell_of_patch(c.scene.image_size // c.patch_size, c.scene.image_size))
    pred = what.argmax(-1)
    ok = n = 0
    for b, s in enumerate(scenes):
        for k, v in enumerate(s.digits):
            if v < 0:
                continue
            p = pred[b][cell == k]
            p = p[p != 0]
            got = int(torch.mode(p).values) if len(p) else 0
            ok += got == _patch_class(k, v, k == s.small_cell)
            n += 1
    return ok / max(1, n)


def _reduce_plan(c: VLMTrainConfig, rng) -> tuple[str | None, Any, list[int], bool]:
    """Token-reduction augmentation of one training image (warm restart, ``restart_drop`` > 0): with
    probability ``restart_drop`` the LLM gets only K = ``keep`` x N of the image's visual tokens, keep
    log-uniform in [``drop_min``, 1): a random subset of the patches (``"subset"``) or, with probability
    ``drop_merge``, the patch grid average-pooled to about K cells (``"pool"``, merged tokens); their position
    ids are the original ones (``drop_keep_positions``) or contiguous (the text after the image moves up).
    Returns (kind or None, indices / pooled grid, source patch of each kept token, original positions)."""
    N = c.num_image_tokens
    g = c.scene.image_size // c.patch_size
    if rng.random() >= c.restart_drop:
        return None, None, list(range(N)), True
    r = math.exp(rng.uniform(math.log(c.drop_min), 0.0))
    k = max(1, min(N - 1, round(r * N)))
    keep_pos = bool(rng.random() < c.drop_keep_positions)
    if rng.random() < c.drop_merge:
        gh = max(1, min(g, round(math.sqrt(k))))
        gw = max(1, min(g, round(k / gh)))
        src = [(i * g // gh) * g + j * g // gw for i in range(gh) for j in range(gw)]
        return "pool", (gh, gw), src, keep_pos
    idx = sorted(rng.choice(N, size=k, replace=False).tolist())
    return "subset", idx, idx, keep_pos


def _routing_targets(qa: QA, scene, rationale: bool, axis: bool = False) -> list[tuple[int, tuple[int, ...]]]:
    """Where a turn must look (:func:`_routing_loss`): ``(i, cells)`` pairs, ``i`` = -1 for the last prompt
    token (``:``, which predicts the first answer word) or the index of the answer word (= token: the
    tokenizer is word-level) whose next word needs the digits in ``cells``:

    - identity / comparison / detail: ``:`` -> the asked cell(s) / the small digit's cell;
    - spatial with a rationale (``3 top left , 7 center , no``): each digit word -> its cell (the next words
      name it); without a rationale ``:`` -> both digits' cells;
    - describe (``3 top left , 7 center , small 5``): each regular digit word -> its cell, ``:`` and every
      ``,`` -> the cell described next, ``small`` -> the small digit's cell.
    Counting has none."""
    d, words = scene.digits, training_target(qa, rationale, axis).split()
    if qa.qtype == "identity":
        return [(-1, (POSITION_NAMES.index(qa.question[len("what digit is at the "):-2]),))]
    if qa.qtype == "comparison":
        a, b = qa.question[len("which is larger , the "):-len(" digit ?")].split(" digit or the ")
        return [(-1, (POSITION_NAMES.index(a), POSITION_NAMES.index(b)))]
    if qa.qtype == "detail":
        return [(-1, (scene.small_cell,))]
    if qa.qtype == "spatial":
        cells = tuple(d.index(int(w)) for w in qa.question.split() if w.isdigit())
        if not (rationale and qa.rationale):
            return [(-1, cells)]
        return [(i, (d.index(int(w)),)) for i, w in enumerate(words) if w.isdigit() and i < len(words) - 1]
    if qa.qtype == "describe":
        out: list[tuple[int, tuple[int, ...]]] = []
        prev = -1  # the word before the next item (``:`` for the first)
        i = 0
        while i < len(words):
            if words[i] == "small":
                out += [(prev, (scene.small_cell,)), (i, (scene.small_cell,))]
                i += 2
            else:
                cell = d.index(int(words[i]))
                out += [(prev, (cell,)), (i, (cell,))]
                i += 1 + len(POSITION_NAMES[cell].split())
            prev = i  # the ``,``
            i += 1
        return out
    return []


def _ordered_description(qa: QA, scene, order: str) -> QA:
    """A ``describe`` turn with its regular digits in ``order`` (:data:`DESCRIBE_ORDERS`; the generator
    writes them by cell); the small digit stays last."""
    if order == "cell":
        return qa
    parts = qa.answer.split(" , ")
    small = [p for p in parts if p.startswith("small ")]
    regular = sorted((p for p in parts if not p.startswith("small ")), key=lambda p: int(p.split()[0]))
    return qa._replace(answer=" , ".join(regular + small))


def _training_batch(c: VLMTrainConfig, step: int, tok, reduce: bool = False) -> dict[str, Any]:
    """One instruction-tuning batch; with ``reduce`` (the warm restart with ``restart_drop`` > 0) each
    image may reach the LLM reduced (:func:`_reduce_plan`): ``reduce`` holds the plans and the batch has
    fewer ``<image>`` placeholders for those and explicit ``position_ids``."""
    import numpy as np

    images, scenes, ink = generate_scenes("train", c.batch_size, seed=c.seed * 1_000_003 + step, config=c.scene)
    rng = np.random.default_rng([c.seed, step, 99])
    drng = np.random.default_rng([c.seed, step, 7])
    image_id = VOCAB.index(SPECIAL_TOKENS["image"])
    eos = VOCAB.index(SPECIAL_TOKENS["eos"])
    seqs, labs, tys, poss, plans = [], [], [], [], []
    #: (sample, first visual position, query position, cells, patch of each visual token)
    routes: list[tuple[int, int, int, tuple[int, ...], list[int]]] = []
    for i, s in enumerate(scenes):
        kind, arg, src, keep_pos = _reduce_plan(c, drng) if reduce else (None, None, list(range(c.num_image_tokens)), True)
        plans.append((kind, arg))
        ids_img = [image_id] * len(src)
        qas, seen = [], set()
        for _ in range(-(-c.qa_per_image // 3)):  # several draws: other cells / pairs / relations each time
            for qa in questions_for(s, i, rng, QUESTION_TYPES, c.spatial_form):
                if qa.question not in seen:
                    seen.add(qa.question)
                    qas.append(qa)
        rng.shuffle(qas)
        qas = qas[: c.qa_per_image]
        if rng.random() < c.describe_prob:
            qas = qas[: c.qa_per_image - 1] + [_ordered_description(qa, s, c.describe_order)
                                               for qa in questions_for(s, i, rng, ("describe",))]
        ids, lab, ty = [], [], []
        route: list[tuple[int, tuple[int, ...]]] = []  # (sequence position, cells) of this image
        for j, qa in enumerate(qas):
            if j == 0 and c.prompt == "question_first":
                q = tok(qa.question, add_special_tokens=False)["input_ids"] + ids_img + \
                    tok("answer :", add_special_tokens=False)["input_ids"]
            else:
                q = (ids_img if j == 0 else []) + tok(f"{qa.question} answer :", add_special_tokens=False)["input_ids"]
            target = training_target(qa, c.rationale, c.rationale_axis)
            a = tok(target, add_special_tokens=False)["input_ids"] + [eos]
            if c.route_weight and kind != "pool":  # a pooled token has no single cell
                first = len(ids) + len(q)  # position of the first answer token
                route += [(first + k, cells) for k, cells in _routing_targets(qa, s, c.rationale, c.rationale_axis)]
            ids += q + a
            lab += [-100] * len(q) + a
            ty += [-1] * len(q) + [_LOSS_TYPES.index(qa.qtype)] * len(a)
            if target != qa.answer:
                ty[-2] = _RELATION  # the scored answer after a rationale (the relation step): own tag
                for k, t in enumerate(a[:-2]):  # the rationale's place words (the look-up): own tag
                    if VOCAB[t] in _PLACE_WORDS:
                        ty[len(ty) - len(a) + k] = _LOOKUP
        start = ids.index(image_id)
        if keep_pos:  # the ids the tokens have in the unreduced sequence
            removed = c.num_image_tokens - len(src)
            pos = list(range(start)) + [start + p for p in src] + \
                list(range(start + c.num_image_tokens, len(ids) + removed))
        else:
            pos = list(range(len(ids)))
        routes += [(i, start, p, cells, src) for p, cells in route]
        seqs.append(ids)
        labs.append(lab)
        tys.append(ty)
        poss.append(pos)
    trng = np.random.default_rng([c.seed, step, 13])
    for _ in range(c.text_relation):
        ids, lab, ty = _text_relation_sequence(c, trng, tok)
        seqs.append(ids)
        labs.append(lab)
        tys.append(ty)
        poss.append(list(range(len(ids))))
    L = max(map(len, seqs))
    pad = VOCAB.index(SPECIAL_TOKENS["pad"])
    input_ids = torch.full((len(seqs), L), pad)
    labels = torch.full((len(seqs), L), -100)
    types = torch.full((len(seqs), L), -1)
    mask = torch.zeros((len(seqs), L), dtype=torch.long)
    position_ids = torch.zeros((len(seqs), L), dtype=torch.long)
    for i, (s, lb, ty, ps) in enumerate(zip(seqs, labs, tys, poss)):  # right padding for training
        input_ids[i, : len(s)] = torch.tensor(s)
        labels[i, : len(lb)] = torch.tensor(lb)
        types[i, : len(ty)] = torch.tensor(ty)
        mask[i, : len(s)] = 1
        position_ids[i, : len(ps)] = torch.tensor(ps)
    out = {"input_ids": input_ids, "attention_mask": mask, "labels": labels, "pixel_values": images,
           "patch_labels": _patch_labels(scenes, ink, c), "answer_types": types}
    if reduce:
        out["position_ids"] = position_ids
        out["reduce"] = plans
    if c.route_weight:
        g = c.scene.image_size // c.patch_size
        cell = torch.from_numpy(cell_of_patch(g, c.scene.image_size))
        target = torch.zeros(len(routes), c.num_image_tokens, dtype=torch.bool)
        for r, (_, _, _, cells, src) in enumerate(routes):  # a reduced image: its kept patches' cells
            target[r, : len(src)] = torch.isin(cell[torch.tensor(src)], torch.tensor(cells))
        keep = target.any(1)  # the digits a reduced image lost cannot be found
        routes = [x for x, k in zip(routes, keep.tolist()) if k]
        target = target[keep]
        out["route"] = (torch.tensor([r[0] for r in routes], dtype=torch.long),
                        torch.tensor([r[1] for r in routes], dtype=torch.long),
                        torch.tensor([r[2] for r in routes], dtype=torch.long), target)
    return out


#: target words a text-only relation turn is trained on (the positions need the image)
_TEXT_ONLY_WORDS = frozenset([str(i) for i in range(10)] + [",", "yes", "no", SPECIAL_TOKENS["eos"]])


def _text_relation_sequence(c: VLMTrainConfig, rng, tok) -> tuple[list[int], list[int], list[int]]:
    """One text-only training sequence (``text_relation``): ``qa_per_image`` spatial turns, each about a
    fresh random arrangement of 2-4 digits (no image), labels on the words text alone determines
    (:data:`_TEXT_ONLY_WORDS`); ``(input ids, labels, answer types)``."""
    ids: list[int] = []
    lab: list[int] = []
    ty: list[int] = []
    text, eos = _LOSS_TYPES.index("text"), VOCAB.index(SPECIAL_TOKENS["eos"])
    turns = 0
    while turns < c.qa_per_image:
        k = int(rng.integers(2, 5))
        digits = [-1] * 9
        for cell, v in zip(rng.permutation(9)[:k].tolist(), rng.permutation(10)[:k].tolist()):
            digits[cell] = v
        qas = questions_for(Scene(tuple(digits), -1, ((0, 0, 0),) * 9), 0, rng, ("spatial",))
        if not qas:
            continue
        qa = qas[0]
        q = tok(f"{qa.question} answer :", add_special_tokens=False)["input_ids"]
        a = tok(training_target(qa, c.rationale, c.rationale_axis), add_special_tokens=False)["input_ids"] + [eos]
        trained = [VOCAB[t] in _TEXT_ONLY_WORDS for t in a]
        ids += q + a
        lab += [-100] * len(q) + [t if ok else -100 for t, ok in zip(a, trained)]
        ty += [-1] * len(q) + [text if ok else -1 for ok in trained]
        ty[-2] = _RELATION
        turns += 1
    return ids, lab, ty


def _train_forward(model, b: dict[str, Any]):
    """The training forward; a batch with ``reduce`` plans (:func:`_training_batch`) builds the LLM input
    itself: per image, its projected visual tokens reduced by the plan (subset or average pooling of the
    patch grid), scattered into the (fewer) ``<image>`` placeholders, with the batch's position ids."""
    plans = b.pop("reduce", None)
    if plans is None:
        return model(**b)
    feats = model.model.get_image_features(pixel_values=b.pop("pixel_values"), return_dict=True).pooler_output
    parts = []
    for f, (kind, arg) in zip(feats, plans):
        if kind == "subset":
            f = f[torch.as_tensor(arg)]
        elif kind == "pool":
            n, d = f.shape
            g = math.isqrt(n)
            f = F.adaptive_avg_pool2d(f.T.reshape(d, g, g), arg).reshape(d, -1).T
        parts.append(f)
    ids = b.pop("input_ids")
    emb = model.get_input_embeddings()(ids)
    vis = (ids == model.config.image_token_id)[..., None]
    emb = emb.masked_scatter(vis, torch.cat(parts).to(emb.dtype))
    return model(inputs_embeds=emb, **b)


class _RouteProbe:
    """Captures the inputs of the supervised LLM layers' attention during a training forward (a forward
    pre-hook on ``self_attn``) for :func:`_routing_loss`."""

    def __init__(self, model, layers: Sequence[int]) -> None:
        self.inputs: dict[int, tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]] = {}
        lm = model.model.language_model
        self.attn = {k: lm.layers[k].self_attn for k in layers}
        self.handles = [a.register_forward_pre_hook(self._hook(k), with_kwargs=True) for k, a in self.attn.items()]

    def _hook(self, layer: int):
        def hook(module, args, kwargs):
            h = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]
            self.inputs[layer] = (h, kwargs["position_embeddings"])
        return hook

    def remove(self) -> None:
        for h in self.handles:
            h.remove()


def _routing_loss(probe: _RouteProbe, route: tuple[torch.Tensor, ...], mask: torch.Tensor, head: int
                  ) -> torch.Tensor:
    """Routing supervision (attention supervision, as in Qiao et al., 2018, "Exploring Human-like Attention
    Supervision in Visual Question Answering", here with the scene's ground-truth cells instead of human
    maps): for each query position r, -log of the share of head ``head``'s attention (softmax over every key
    it may see) that falls on the visual tokens of r's target cells, averaged over rows and supervised
    layers. Without it the LLM reads digits well (identity 0.93 when it sees only the asked cell's tokens)
    but does not learn to find a cell among 144 tokens (0.39)."""
    b, start, qpos, target = route
    if b.numel() == 0:
        return torch.zeros(())
    losses = []
    for layer, (h, (cos, sin)) in probe.inputs.items():
        attn = probe.attn[layer]
        rope = sys.modules[type(attn).__module__].apply_rotary_pos_emb  # the model's own RoPE
        cos, sin = cos.expand(h.shape[0], -1, -1), sin.expand(h.shape[0], -1, -1)
        hd = attn.head_dim
        group = attn.config.num_attention_heads // attn.config.num_key_value_heads
        q = attn.q_proj(h[b, qpos]).view(len(b), 1, -1, hd)[:, :, head]  # (R, 1, hd)
        k = attn.k_proj(h).view(h.shape[0], 1, h.shape[1], -1, hd)[..., head // group, :]  # (B, 1, L, hd)
        q, _ = rope(q, q, cos[b, qpos], sin[b, qpos])
        k, _ = rope(k, k, cos, sin)
        scores = torch.einsum("rd,rld->rl", q[:, 0], k[b, 0]) * attn.scaling
        L = h.shape[1]
        allowed = (torch.arange(L)[None] <= qpos[:, None]) & mask[b].bool()
        logp = scores.float().masked_fill(~allowed, float("-inf")).log_softmax(-1)
        cols = (start[:, None] + torch.arange(target.shape[1])[None]).clamp(max=L - 1)  # reduced images: fewer
        tgt = logp.gather(1, cols).masked_fill(~target, float("-inf"))
        losses.append(-tgt.logsumexp(-1).mean())
    return torch.stack(losses).mean()


#: question types of the training turns (index = ``answer_types`` in a training batch); ``relation`` tags
#: the scored answer word written after a rationale (the yes/no of a spatial turn), ``text`` the other
#: trained words of text-only turns (``text_relation``)
_LOSS_TYPES: tuple[str, ...] = QUESTION_TYPES + ("describe", "relation", "text", "lookup")
_RELATION = _LOSS_TYPES.index("relation")
#: ``lookup`` tags the place words of a spatial rationale (``left``, ``top``, ``center`` ...)
_LOOKUP = _LOSS_TYPES.index("lookup")
_PLACE_WORDS = frozenset(w for name in POSITION_NAMES for w in name.split())


def _lm_loss(logits: torch.Tensor, labels: torch.Tensor, types: torch.Tensor, per_type: bool,
             relation_term: bool = False, lookup_term: bool = False) -> tuple[torch.Tensor, dict[str, float]]:
    """Next-token cross-entropy on the answer tokens: the mean over tokens, or (``per_type``) the mean over
    question types of each type's mean, so a type's weight does not depend on how often the sampler draws
    it or how many tokens its answers have (``describe`` answers are ~10 tokens, a ``detail`` turn is in
    ~5% of turns). ``relation_term``: the answer word after a rationale (tagged ``relation``) is a term of
    its own instead of one of its turn's ~8 tokens; ``lookup_term``: likewise the rationale's place words
    (tagged ``lookup``). Also returns each tag's mean (for logging; ``relation`` and ``lookup`` always
    separately)."""
    y, t = labels[:, 1:], types[:, 1:]
    ce = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), y.flatten(), reduction="none",
                         ignore_index=-100).view(y.shape)
    per = {name: ce[t == k].mean() for k, name in enumerate(_LOSS_TYPES) if (t == k).any()}
    if per_type:
        spatial = _LOSS_TYPES.index("spatial")
        tl = t if relation_term else torch.where(t == _RELATION, spatial, t)
        tl = tl if lookup_term else torch.where(tl == _LOOKUP, spatial, tl)
        terms = [ce[tl == k].mean() for k in range(len(_LOSS_TYPES)) if (tl == k).any()]
        loss = torch.stack(terms).mean()
    else:
        loss = ce[y != -100].mean()
    return loss, {k: v.item() for k, v in per.items()}


# --------------------------------------------------------------------------- evaluation
def eval_set(split: str, config: VLMTrainConfig | None = None, per_type: int | None = None):
    """The exact held-out set behind the reported accuracies (``split`` = "val" or "test")."""
    c = config or VLMTrainConfig()
    if split not in ("val", "test"):
        raise ValueError(f"split={split!r} is invalid: must be 'val' or 'test'")
    n = per_type or (c.val_per_type if split == "val" else c.test_per_type)
    return make_vqa_set(split, 10 * n, seed=c.eval_seed, config=c.scene, per_type=n, spatial=c.spatial_form)


@torch.no_grad()
def prompt_format(model) -> str:
    """The prompt layout a small VLM was trained with (stored on its config; default image first)."""
    return getattr(model.config, "vqa_prompt", "image_first")


_AXIS_WORDS = {"col": ("left", "center", "right"), "row": ("top", "center", "bottom")}


def axis_rationale(qa: QA) -> str:
    """A spatial rationale on the relation's axis only: ``3 top left , 7 center`` for ``is the 3 left of
    the 7 ?`` -> ``3 left , 7 center`` (columns); for above/below the rows (``3 top , 7 center``)."""
    horizontal = " left of " in qa.question or " right of " in qa.question
    out = []
    for part in qa.rationale.split(" , "):
        digit, name = part.split(" ", 1)
        row, col = divmod(POSITION_NAMES.index(name), 3)
        out.append(f"{digit} {_AXIS_WORDS['col'][col] if horizontal else _AXIS_WORDS['row'][row]}")
    return " , ".join(out)


def training_target(qa: QA, rationale: bool, axis: bool = False) -> str:
    """The text a model learns to write for ``qa`` (before ``</s>``): the answer, or with ``rationale`` and
    a question that has one, ``<rationale> , <answer>`` (``axis``: :func:`axis_rationale`)."""
    if not (rationale and qa.rationale):
        return qa.answer
    return f"{axis_rationale(qa) if axis else qa.rationale} , {qa.answer}"


#: new tokens that hold the longest trained answer (``3 bottom right , 7 bottom left , yes`` + ``</s>``)
RATIONALE_NEW_TOKENS = 10


def parse_answer(words: Sequence[str]) -> str:
    """The answer in generated ``words``: those before ``</s>``, then the first word after the last ``,``
    (the rationale's end) or the first word when there is none (one-word answers; an answer never
    contains a comma)."""
    eos = SPECIAL_TOKENS["eos"]
    words = list(words[: words.index(eos)] if eos in words else words)
    if "," in words:
        words = words[len(words) - words[::-1].index(","):]
    return words[0] if words else ""


def answer_questions(model, tok, images: torch.Tensor, qas: Sequence[QA], batch_size: int = 32,
                     generate: bool = False, max_new_tokens: int = 2) -> list[str]:
    """Each question's answer word (greedy, :func:`parse_answer`): by ``generate`` or, equivalently for
    one-word answers, the argmax of the prefill logits at the last prompt position (faster). A model trained
    with rationales (``config.vqa_rationale``) writes one before a spatial answer, so questions that have
    one are always answered by ``generate`` with at least :data:`RATIONALE_NEW_TOKENS` new tokens."""
    model.eval()
    n_img = model.config.image_seq_length
    rationale = bool(getattr(model.config, "vqa_rationale", False))
    out: list[str] = []
    for i in range(0, len(qas), batch_size):
        chunk = qas[i : i + batch_size]
        batch = encode_prompts(tok, [q.question for q in chunk], images[[q.scene for q in chunk]], n_img,
                               prompt=prompt_format(model))
        long = rationale and any(q.rationale for q in chunk)
        if generate or long:
            n_new = max(max_new_tokens, RATIONALE_NEW_TOKENS) if long else max_new_tokens
            gen = model.generate(**batch, max_new_tokens=n_new, do_sample=False)
            new = gen[:, batch["input_ids"].shape[1]:].tolist()
            out += [parse_answer([VOCAB[t] for t in row]) for row in new]
        else:
            first = model(**batch, logits_to_keep=1).logits[:, -1].argmax(-1)
            out += [VOCAB[int(t)] for t in first]
    return out


def evaluate_vqa(model, tok, data, batch_size: int = 32, generate: bool = False) -> dict[str, Any]:
    """Accuracy overall and per question type on a :class:`~tokenreduce.data.vqa.VQASet`."""
    preds = answer_questions(model, tok, data.images, data.qas, batch_size, generate)
    per: dict[str, list[int]] = {}
    for qa, p in zip(data.qas, preds):
        per.setdefault(qa.qtype, []).append(int(p == qa.answer))
    acc = {t: sum(v) / len(v) for t, v in per.items()}
    return {"acc": sum(map(sum, per.values())) / max(1, len(preds)), "acc_by_type": acc,
            "n_by_type": {t: len(v) for t, v in per.items()}, "predictions": preds}


# --------------------------------------------------------------------------- training
def checkpoint_dir(config: VLMTrainConfig | None = None) -> Path:
    c = config or VLMTrainConfig()
    return cache_dir("small_vlm", f"v{MODEL_VERSION}-{c.config_hash()}")


def _atomic(path: Path, write) -> None:
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    write(tmp)
    os.replace(tmp, path)


@torch.no_grad()
def _vision_probe(model, aux, c: VLMTrainConfig, n: int = 200) -> dict[str, float]:
    """The vision tower alone on held-out ``val`` scenes (unseen base digits): per-patch class accuracy on
    inked patches and digits read right per cell (:func:`_cell_readout`)."""
    images, scenes, ink = generate_scenes("val", n, seed=c.eval_seed + 1, config=c.scene)
    tower = model.model.vision_tower
    was = tower.training
    tower.eval()
    what = aux(tower(images).last_hidden_state[:, 1:])[..., :_N_WHAT]
    tower.train(was)
    pl = _patch_labels(scenes, ink, c)
    return {"patch_acc_ink": (what.argmax(-1) == pl)[pl != 0].float().mean().item(),
            "cell_readout": _cell_readout(what, scenes, c)}


def _joint_phase(model, aux, feats: dict, tok, c: VLMTrainConfig, steps: int, lr: float, warmup: int,
                 seed_offset: int, val, history: list, progress: bool, t_offset: float, reduce: bool = False) -> float:
    """LLaVA-style joint training (answers' LM loss + the auxiliary vision loss); returns seconds spent.
    ``reduce``: token-reduction augmentation (:func:`_reduce_plan`)."""
    frozen = c.freeze_vision
    model.model.vision_tower.requires_grad_(not frozen)
    params = [p for p in model.parameters() if p.requires_grad] + ([] if frozen else list(aux.parameters()))
    decay = [p for p in params if p.ndim >= 2]
    no_decay = [p for p in params if p.ndim < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": c.weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}], lr=lr)

    def lr_at(s: int) -> float:
        if s < warmup:
            return (s + 1) / warmup
        t = (s - warmup) / max(1, steps - warmup)
        return c.min_lr_ratio + (1 - c.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * min(t, 1.0)))

    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_at)
    spent, loss_ema = 0.0, None
    type_ema: dict[str, float] = {}
    for step in range(steps):
        t0 = time.perf_counter()
        model.train()
        if frozen:  # LLaVA keeps its (pre-trained) vision encoder frozen
            model.model.vision_tower.eval()
        b = _training_batch(c, seed_offset + step, tok, reduce=reduce)
        pl = b.pop("patch_labels")
        labels, types = b.pop("labels"), b.pop("answer_types")
        route = b.pop("route", None)
        probe = _RouteProbe(model, c.route_layers) if route is not None else None
        projected: list[torch.Tensor] = []
        ground = model.model.multi_modal_projector.register_forward_hook(
            lambda m, a, o, keep=projected: keep.append(o)) if c.ground_weight else None
        try:
            out = _train_forward(model, b)
        finally:
            if probe is not None:
                probe.remove()
            if ground is not None:
                ground.remove()
        lm_loss, per_type = _lm_loss(out.logits, labels, types, c.loss_per_type, c.relation_loss, c.lookup_loss)
        route_loss = _routing_loss(probe, route, b["attention_mask"], c.route_head) if probe is not None else None
        if frozen:
            aux_loss, loss = torch.zeros(()), lm_loss
        else:
            aux_loss, _ = _aux_loss(aux, feats["v"][:, 1:], pl, c)
            loss = lm_loss + c.aux_weight * aux_loss
        if route_loss is not None:
            loss = loss + c.route_weight * route_loss
            per_type["route"] = route_loss.item()  # logged beside the types' losses
        if projected:
            ground_loss = _grounding_loss(projected[0], model.get_input_embeddings().weight, pl, c)
            loss = loss + c.ground_weight * ground_loss
            per_type["ground"] = ground_loss.item()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, c.grad_clip)
        opt.step()
        sched.step()
        spent += time.perf_counter() - t0
        loss_ema = lm_loss.item() if loss_ema is None else 0.95 * loss_ema + 0.05 * lm_loss.item()
        for k, v in per_type.items():
            type_ema[k] = v if k not in type_ema else 0.95 * type_ema[k] + 0.05 * v
        if progress and (step + 1) % c.log_every == 0:
            eta = spent / (step + 1) * (steps - step - 1)
            print(f"step {seed_offset + step + 1} ({step + 1}/{steps}) lm_loss={loss_ema:.3f} aux={aux_loss.item():.3f} "
                  f"lr={sched.get_last_lr()[0]:.2e} {t_offset + spent:.0f}s (eta {eta / 60:.1f} min) per type: "
                  + " ".join(f"{k}={v:.2f}" for k, v in type_ema.items()), flush=True)
        if (step + 1) % c.eval_every == 0 or step + 1 == steps:
            r = evaluate_vqa(model, tok, val)
            history.append({"step": seed_offset + step + 1, "lm_loss": loss_ema, "train_loss_by_type": dict(type_ema),
                            "val_acc": r["acc"],
                            "val_acc_by_type": r["acc_by_type"], "train_time_s": t_offset + spent})
            if progress:
                print(f"  val acc {r['acc']:.3f} " + " ".join(f"{k}={v:.2f}" for k, v in r["acc_by_type"].items()),
                      flush=True)
    return spent


def train_small_vlm(config: VLMTrainConfig | None = None, progress: bool = True) -> dict[str, Any]:
    """Train, evaluate (val during training, test at the end, per question type), cache, return metrics.

    With ``restart_steps > 0`` the model continues from its :meth:`~VLMTrainConfig.parent` checkpoint
    (trained first if missing) with a warm restart of the joint phase (``restart_lr``, new data).
    """
    import transformers

    c = config or VLMTrainConfig()
    prev = torch.get_num_threads()
    torch.set_num_threads(c.num_threads)
    try:
        t_start = time.perf_counter()
        torch.manual_seed(c.seed)
        tok = build_tokenizer()
        model = build_small_vlm(c)
        aux = torch.nn.Linear(c.vision_dim, _N_AUX if c.aux_value else _N_WHAT + 9)
        feats: dict[str, torch.Tensor] = {}
        hook = model.model.vision_tower.register_forward_hook(
            lambda m, a, o: feats.__setitem__("v", o.hidden_states[-1] if o.hidden_states is not None else o.last_hidden_state))
        val = eval_set("val", c)
        history: list[dict[str, Any]] = []
        train_time = 0.0
        parent = c.parent()
        vision_probe = None
        if parent is not None:
            ppath = checkpoint_dir(parent) / "model.pt"
            if not ppath.is_file():
                train_small_vlm(parent, progress=progress)
            model.load_state_dict(torch.load(ppath, map_location="cpu", weights_only=True))
            pm = json.loads(ppath.with_name("metrics.json").read_text())
            history = list(pm.get("history", []))
            vision_probe = pm.get("vision_probe")  # the tower is the parent's (frozen in the joint phase)
            train_time = float(pm.get("train_time_s", 0.0))
            train_time += _joint_phase(model, aux, feats, tok, c, c.restart_steps, c.restart_lr, 10, c.steps, val,
                                       history, progress, train_time, reduce=c.restart_drop > 0)
        else:
            # phase 1: the vision tower alone learns what/where per cell (LLaVA starts from a trained encoder)
            vparams = list(model.model.vision_tower.parameters()) + list(aux.parameters())
            vopt = torch.optim.AdamW(vparams, lr=c.vision_lr, weight_decay=c.weight_decay)
            for step in range(c.vision_steps):
                t0 = time.perf_counter()
                model.train()
                images, scenes, ink = generate_scenes("train", c.vision_batch_size, seed=c.seed * 7_000_003 + step,
                                                      config=c.scene)
                for g in vopt.param_groups:
                    g["lr"] = c.vision_lr * min(1.0, (step + 1) / c.warmup_steps) * (
                        0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * step / c.vision_steps)))
                out = model.model.vision_tower(images, output_hidden_states=True)
                pl = _patch_labels(scenes, ink, c)
                vloss, logits = _aux_loss(aux, out.hidden_states[-1][:, 1:], pl, c)
                vopt.zero_grad(set_to_none=True)
                vloss.backward()
                torch.nn.utils.clip_grad_norm_(vparams, c.grad_clip)
                vopt.step()
                train_time += time.perf_counter() - t0
                if progress and (step + 1) % c.log_every == 0:
                    ink_acc = (logits.argmax(-1) == pl)[pl != 0].float().mean().item()
                    print(f"vision step {step + 1}/{c.vision_steps} loss={vloss.item():.3f} "
                          f"train patch acc (ink)={ink_acc:.3f} {train_time:.0f}s", flush=True)
            vision_probe = _vision_probe(model, aux, c)
            if progress:
                print(f"vision probe (val scenes, unseen digits): {vision_probe}", flush=True)
            # phase 2: projector + LLM (vision tower frozen unless freeze_vision=False)
            train_time += _joint_phase(model, aux, feats, tok, c, c.steps, c.lr, c.warmup_steps, 0, val, history,
                                       progress, train_time)
        hook.remove()
        test = eval_set("test", c)
        t_eval = time.perf_counter()
        r = evaluate_vqa(model, tok, test, generate=True)
        out_dir = checkpoint_dir(c)
        metrics = {
            "test_acc": r["acc"], "test_acc_by_type": r["acc_by_type"], "n_test_by_type": r["n_by_type"],
            "val_acc": history[-1]["val_acc"], "val_acc_by_type": history[-1]["val_acc_by_type"],
            "chance_by_type": _chance(test), "train_time_s": train_time,
            "test_eval_time_s": time.perf_counter() - t_eval, "total_time_s": time.perf_counter() - t_start,
            "steps": c.steps + c.restart_steps, "vision_steps": c.vision_steps, "vision_probe": vision_probe,
            "sequences_seen": (c.steps + c.restart_steps) * c.batch_size, "num_threads": c.num_threads,
            "num_params": sum(p.numel() for p in model.parameters()), "history": history,
            "parent": parent.config_hash() if parent is not None else None,
            "config_hash": c.config_hash(), "checkpoint": str(out_dir),
            "versions": {"torch": torch.__version__, "transformers": transformers.__version__,
                         "python": platform.python_version()},
        }
        model.eval()
        _atomic(out_dir / "config.json", lambda p: p.write_text(json.dumps(c.to_dict(), indent=2)))
        _atomic(out_dir / "model.pt", lambda p: torch.save(model.state_dict(), p))
        _atomic(out_dir / "metrics.json", lambda p: p.write_text(json.dumps(metrics, indent=2)))
        return metrics
    finally:
        torch.set_num_threads(prev)


def _chance(data) -> dict[str, float]:
    """Accuracy of always answering the most frequent answer of each type (majority baseline)."""
    from collections import Counter

    out = {}
    for t, qas in data.by_type().items():
        out[t] = Counter(q.answer for q in qas).most_common(1)[0][1] / len(qas)
    return out


def load_small_vlm(train_if_missing: bool = False, config: VLMTrainConfig | None = None, progress: bool = True,
                   attn_implementation: str = "sdpa"):
    """``(model, tokenizer, info)`` of the cached small VLM (eval mode); ``info`` has config/metrics/path.

    Raises FileNotFoundError naming the training command when no checkpoint exists.
    """
    c = config or VLMTrainConfig()
    path = checkpoint_dir(c) / "model.pt"
    if not path.is_file():
        if not train_if_missing:
            raise FileNotFoundError(f"no trained small VLM at {path}; {_TRAIN_HINT} (about 25-40 min on 2 shared CPU cores)")
        train_small_vlm(c, progress=progress)
    model = build_small_vlm(c, attn_implementation=attn_implementation)
    model.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
    model.eval()
    mp = path.with_name("metrics.json")
    return model, build_tokenizer(), {"config": c, "metrics": json.loads(mp.read_text()) if mp.is_file() else {},
                                      "path": path}


# --------------------------------------------------------------------------- CLI
def register_cli(train_app) -> None:
    import typer

    @train_app.command("vlm")
    def train_vlm(
        steps: int = typer.Option(VLMTrainConfig.steps, help="Optimisation steps"),
        batch_size: int = typer.Option(VLMTrainConfig.batch_size, help="Scenes per step"),
        threads: int = typer.Option(VLMTrainConfig.num_threads, help="torch threads (1 is fastest on a busy 2-core box)"),
        restart_steps: int = typer.Option(VLMTrainConfig.restart_steps,
                                          help="Continue the --steps model for this many more steps (warm restart)"),
        restart_lr: float = typer.Option(VLMTrainConfig.restart_lr, help="Peak learning rate of the warm restart"),
        restart_drop: float = typer.Option(VLMTrainConfig.restart_drop,
                                           help="Share of warm-restart images reduced (token-reduction augmentation; "
                                                "0 with --restart-steps 600 = model v3)"),
        rationale: bool = typer.Option(VLMTrainConfig.rationale,
                                       help="Train spatial answers with their rationale first (--no-rationale: v3)"),
        route_weight: float = typer.Option(VLMTrainConfig.route_weight,
                                           help="Weight of the routing (attention) supervision; 0 = off"),
        ground_weight: float = typer.Option(VLMTrainConfig.ground_weight,
                                            help="Weight of the visual tokens' word grounding; 0 = off "
                                                 "(the previous default, v3-d705f465f1)"),
        force: bool = typer.Option(False, help="Retrain even if a cached checkpoint exists"),
    ) -> None:
        """Train the small LLaVA-style VLM on digit-scene VQA (cached in ~/.cache/tokenreduce/small_vlm)."""
        c = VLMTrainConfig(steps=steps, batch_size=batch_size, num_threads=threads, restart_steps=restart_steps,
                           restart_lr=restart_lr, restart_drop=restart_drop, rationale=rationale,
                           route_weight=route_weight, ground_weight=ground_weight)
        path = checkpoint_dir(c) / "model.pt"
        if path.is_file() and not force:
            m = json.loads(path.with_name("metrics.json").read_text())
            typer.echo(f"cached: {path}\ntest acc {m['test_acc']:.3f} by type {m['test_acc_by_type']}")
            return
        m = train_small_vlm(c)
        typer.echo(json.dumps({k: m[k] for k in ("test_acc", "test_acc_by_type", "chance_by_type", "train_time_s",
                                                   "checkpoint")}, indent=2))
