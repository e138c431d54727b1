"""Configuration of the small VLM and the address of its cached checkpoint.

:class:`VLMTrainConfig` holds what a user sets (architecture, steps, learning rates, seeds, held-out set
sizes, threads); the training recipe's switches, which the experiments of
``docs/experiments/small_vlm.md`` varied, are grouped in :class:`VLMRecipe`, which it inherits: they are
set and read flat (``VLMTrainConfig(ground_weight=0.0)``, ``c.ground_weight``), as every cached
``config.json`` stores them. The defaults are the current default model's.

A checkpoint lives in ``cache_dir("small_vlm", "v<MODEL_VERSION>-<config hash>")``
(:func:`checkpoint_dir`). A switch that is off (false, 0, or its first accepted value) is left out of the
hash, so a model trained before the switch existed keeps its address.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar

from tokenreduce._paths import cache_dir
from tokenreduce.data.vqa import VQA_VERSION, SceneConfig

from ..checkpoint import JsonFields, StoredConfig, short_hash

__all__ = ["DESCRIBE_ORDERS", "MODEL_VERSION", "PROMPT_FORMATS", "VLMRecipe", "VLMTrainConfig", "checkpoint_dir"]

MODEL_VERSION = 3
#: "image_first": ``<image> q answer :`` (LLaVA's layout); "question_first": ``q <image> answer :`` (the
#: instruction before the image, as InstructBLIP/Qwen-VL-style prompts do), which lets the visual tokens
#: attend to the question in the causal LLM.
PROMPT_FORMATS = ("image_first", "question_first")
#: accepted :attr:`VLMRecipe.describe_order` values (the first is the default, absent from the hash)
DESCRIBE_ORDERS = ("cell", "value")
#: the warm restart's token-reduction augmentation (:func:`~tokenreduce.models.vlm.batches.training_batch`);
#: absent from the hash when off
_DROP_FIELDS = ("restart_drop", "drop_min", "drop_merge", "drop_keep_positions")
#: the routing supervision (:func:`~tokenreduce.models.vlm.losses.routing_loss`); absent from the hash when off
_ROUTE_FIELDS = ("route_weight", "route_layers", "route_head")
#: options absent from the hash when off (false or 0), so models trained before they existed keep their hash
_OPTIONAL_FIELDS = ("rationale", "rationale_axis", "relation_loss", "text_relation", "visual_position",
                    "spatial_choice", "lookup_loss", "ground_weight", "existence", "existence_rationale",
                    "existence_text", "existence_lookup")


@dataclass(frozen=True)
class VLMRecipe:
    """The training recipe's switches (see ``docs/experiments/small_vlm.md`` for what each one measured).

    Token-reduction augmentation of the warm restart (``restart_drop`` > 0): with probability
    ``restart_drop`` an image reaches the LLM with only K = keep x N of its visual tokens, keep log-uniform
    in [``drop_min``, 1): a random subset of the patches or, with probability ``drop_merge``, the patch grid
    average-pooled to about K cells; their position ids are the original ones with probability
    ``drop_keep_positions``, else contiguous.
    """

    restart_drop: float = 0.5
    drop_min: float = 0.03
    drop_merge: float = 0.25
    drop_keep_positions: float = 0.5
    #: prompt layout (:data:`PROMPT_FORMATS`)
    prompt: str = "image_first"
    #: probability that one turn of an image is the dense ``describe`` task
    describe_prob: float = 0.5
    #: order of the ``describe`` task's items: ``"cell"`` (row-major, the digit written after the model has
    #: read a cell) or ``"value"`` (ascending digit value: each item's place is then a value -> cell look-up
    #: keyed by the digit just written, the step a spatial rationale needs) (absent from the hash when "cell")
    describe_order: str = "cell"
    #: weight of the auxiliary per-patch vision loss (:func:`~tokenreduce.models.vlm.losses.aux_loss`)
    aux_weight: float = 0.5
    #: the auxiliary loss also predicts each patch's digit value and size (model v3)
    aux_value: bool = True
    #: share of a patch a digit's ink must cover for the patch to be labelled with that digit
    ink_threshold: float = 0.12
    #: the LM loss is the mean over question types of each type's mean answer-token loss
    #: (:func:`~tokenreduce.models.vlm.losses.lm_loss`) instead of the mean over tokens
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
    #: (:class:`~tokenreduce.models.vlm.model.GridPositionProjector`, initialised to a 2-D sine-cosine
    #: code); 0 = LLaVA's plain projector (absent from the hash when 0)
    visual_position: float = 1.0
    #: weight of the word-grounding loss (:func:`~tokenreduce.models.vlm.losses.grounding_loss`): each
    #: projected visual token, read through the LLM's input embedding matrix, names its digit (``0``..``9``,
    #: inked patches) and its cell's column and row words, so a digit's visual tokens share a direction with
    #: the digit's word (0 = off, absent from the hash)
    ground_weight: float = 0.1
    #: keep the vision tower frozen after its pre-training, as LLaVA-1.5 does (models v2/v3 did)
    freeze_vision: bool = False
    #: weight of the routing supervision (:func:`~tokenreduce.models.vlm.losses.routing_loss`): at the
    #: positions that must look a digit up (``answer :`` of identity/comparison/detail turns, a rationale's or
    #: description's digit before its cell name, a description's ``,`` before the next digit), one head per
    #: layer in ``route_layers`` is trained to put its attention on the patches of the cells that hold the
    #: answer (0 = off, absent from the hash)
    route_weight: float = 0.03
    route_layers: tuple[int, ...] = (2, 4)
    route_head: int = 0
    #: the last joint phase (the warm restart, when there is one) also trains POPE-style existence questions
    #: (``is there the digit 7 ?`` -> ``yes``/``no``, the absent digit drawn uniformly: the ``existence`` type
    #: of :func:`~tokenreduce.data.vqa.questions_for`), so the parent is the default model's parent (absent from
    #: the hash when off)
    existence: bool = False
    #: with ``existence``: its answers are trained with a rationale first, the scene's description
    #: (``is there the digit 7 ?`` -> ``3 top left , 7 center , yes``; QA.rationale), so the yes/no is a match
    #: of the question's digit against words the model wrote, and evaluation generates the description before
    #: scoring the final word (absent from the hash when off)
    existence_rationale: bool = False
    #: with ``existence_rationale``: text-only sequences per batch of ``qa_per_image`` existence turns about
    #: random digit arrangements (no image), the description given, only the yes/no after it trained: the
    #: match step without the image, as ``text_relation`` does for spatial turns (0 = off, absent from the hash)
    existence_text: int = 0
    #: with ``existence``: its answers are trained with a look-up first, the asked digit and its place
    #: (``is there the digit 7 ?`` -> ``7 center , yes``; absent: ``7 , no``): the existence decision is the
    #: word after the digit (a place or ``,``), where the model looks a digit up as in a spatial rationale
    #: (absent from the hash when off)
    existence_lookup: bool = False

    def __post_init__(self) -> None:
        if not 0 < self.ink_threshold < 1:
            raise ValueError(f"ink_threshold={self.ink_threshold!r} must be in (0, 1)")
        if self.prompt not in PROMPT_FORMATS:
            raise ValueError(f"prompt={self.prompt!r} is invalid: accepted {PROMPT_FORMATS}")
        for name in ("restart_drop", "drop_merge", "drop_keep_positions"):
            if not 0 <= getattr(self, name) <= 1:
                raise ValueError(f"{name}={getattr(self, name)!r} must be in [0, 1]")
        if not 0 < self.drop_min <= 1:
            raise ValueError(f"drop_min={self.drop_min!r} must be in (0, 1]")
        if self.spatial_choice and self.text_relation:
            raise ValueError("text_relation builds yes/no spatial turns; it cannot be combined with spatial_choice")
        if not 0 <= self.visual_position <= 100:
            raise ValueError(f"visual_position={self.visual_position!r} must be in [0, 100] (0 = off)")
        if self.describe_order not in DESCRIBE_ORDERS:
            raise ValueError(f"describe_order={self.describe_order!r} is invalid: accepted {DESCRIBE_ORDERS}")
        if not 0 <= self.ground_weight <= 100:
            raise ValueError(f"ground_weight={self.ground_weight!r} must be in [0, 100] (0 = off)")
        if self.existence_rationale and not self.existence:
            raise ValueError("existence_rationale=True needs existence=True (it trains the existence type's target)")
        if self.existence_lookup and not self.existence:
            raise ValueError("existence_lookup=True needs existence=True (it trains the existence type's target)")
        if self.existence_lookup and self.existence_rationale:
            raise ValueError("existence_lookup and existence_rationale are two forms of the existence answer; "
                             "set at most one")
        if self.existence_text and not self.existence_rationale:
            raise ValueError(f"existence_text={self.existence_text!r} needs existence_rationale=True")
        if self.route_weight < 0:
            raise ValueError(f"route_weight={self.route_weight!r} must be >= 0")

    @property
    def spatial_form(self) -> str:
        return "choice" if self.spatial_choice else "yesno"

    @property
    def existence_form(self) -> str:
        """What the model writes for an existence question (:data:`~.targets.EXISTENCE_FORMS`)."""
        return "lookup" if self.existence_lookup else "description" if self.existence_rationale else "answer"


@dataclass(frozen=True)
class VLMTrainConfig(VLMRecipe, StoredConfig):
    """Architecture, data and optimisation of the small VLM, plus the recipe's switches
    (:class:`VLMRecipe`). Everything but the speed knobs (``num_threads``, ``eval_every``, ``log_every``)
    enters the cache hash.

    Phase 1 trains the vision tower alone for ``vision_steps`` (``vision_batch_size``, ``vision_lr``);
    phase 2 trains projector + LLM (+ tower) for ``steps`` (``batch_size`` scenes of ``qa_per_image``
    turns, ``lr`` with ``warmup_steps`` and cosine decay to ``lr * min_lr_ratio``); ``restart_steps`` > 0
    continues that model with a warm restart (peak ``restart_lr``), cached under its own hash.
    """

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
    batch_size: int = 16
    qa_per_image: int = 6
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

    _HASH_EXCLUDED: ClassVar[frozenset[str]] = frozenset({"num_threads", "eval_every", "log_every"})
    _JSON_FIELDS: ClassVar[JsonFields] = {"scene": (dict, SceneConfig.from_dict), "route_layers": (list, tuple)}

    def __post_init__(self) -> None:
        for name in ("patch_size", "vision_dim", "vision_layers", "vision_heads", "text_dim", "text_layers", "vision_batch_size",
                     "text_heads", "text_kv_heads", "steps", "batch_size", "qa_per_image", "val_per_type",
                     "test_per_type", "num_threads", "eval_every", "log_every"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"{name}={v!r} is invalid: must be an int >= 1")
        if isinstance(self.stem_channels, bool) or not isinstance(self.stem_channels, int) or self.stem_channels < 0:
            raise ValueError(f"stem_channels={self.stem_channels!r} is invalid: must be an int >= 0 (0 = linear patches)")
        if self.scene.image_size % self.patch_size:
            raise ValueError(f"patch_size={self.patch_size} must divide scene.image_size={self.scene.image_size}")
        if self.text_heads % self.text_kv_heads or self.text_dim % self.text_heads:
            raise ValueError("text_kv_heads must divide text_heads, which must divide text_dim")
        if not 0 < self.lr <= 1:
            raise ValueError(f"lr={self.lr!r} must be in (0, 1]")
        super().__post_init__()
        if self.visual_position and self.text_dim % 4:
            raise ValueError(f"visual_position needs text_dim divisible by 4, got {self.text_dim}")
        bad = [k for k in self.route_layers if not 0 <= k < self.text_layers]
        if self.route_weight and (bad or not self.route_layers):
            raise ValueError(f"route_layers={self.route_layers!r} is invalid: need LLM layers in [0, {self.text_layers - 1}]")
        if self.route_weight and not 0 <= self.route_head < self.text_heads:
            raise ValueError(f"route_head={self.route_head!r} must be in [0, {self.text_heads - 1}]")

    @property
    def num_image_tokens(self) -> int:
        return (self.scene.image_size // self.patch_size) ** 2

    def parent(self) -> VLMTrainConfig | None:
        """The configuration this one continues from (a warm restart of the joint phase), if any."""
        if self.restart_steps == 0:
            return None
        # existence: the restart's alone
        return dataclasses.replace(self, restart_steps=0, existence=False, existence_rationale=False, existence_text=0,
                                   existence_lookup=False)

    def without_drop(self) -> VLMTrainConfig:
        """The same training without the token-reduction augmentation (model v3 ``v3-42c6df0141`` for the
        default config with ``restart_steps=600, rationale=False``)."""
        return dataclasses.replace(self, restart_drop=0.0)

    def config_hash(self) -> str:
        payload = self.hash_payload()
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
        return short_hash(payload)


def checkpoint_dir(config: VLMTrainConfig | None = None) -> Path:
    """Cache directory of the checkpoint of ``config`` (default: the default model; created if missing)."""
    c = config or VLMTrainConfig()
    return cache_dir("small_vlm", f"v{MODEL_VERSION}-{c.config_hash()}")
