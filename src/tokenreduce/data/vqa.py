"""Digit-scene VQA: real handwritten digits on real photographs, with generated questions and short answers.

A scene is a square canvas (default 96x96) cut from a low-contrast crop of a scikit-image photograph
(astronaut, coffee, chelsea, rocket, ...), with 2-4 real handwritten digits from scikit-learn's
``load_digits`` upscaled 2x (16 px: 2x2 patches of 8 px) into the cells of a 3x3 grid (distinct values, at
a random position inside the cell snapped to the 8-px patch grid), and, in about half of the scenes, one
extra *small* digit at its native 8x8 resolution (exactly one patch) in another cell. Snapping to the patch
grid (``align``) is what a small vision encoder trained on CPU in minutes can resolve: each digit covers
whole patches, so every patch token has one digit (or none) to describe. Most patches are background, so a VLM reading these scenes is a natural test bed for visual token reduction, and the
question types probe different kinds of visual evidence:

==============  ===============================================  =====================================
type            question                                         answer
==============  ===============================================  =====================================
identity        ``what digit is at the top left ?``              a digit (the regular digit there)
counting        ``how many digits are there ?``                  a number (small digit included)
spatial         ``is the 3 left of the 7 ?`` (left/right of,      ``yes`` / ``no`` (balanced)
                above/below: by grid row/column); or the
                choice form (``spatial="choice"``, GQA's):       ``left`` / ``right`` / ``above`` /
                ``is the 3 left or right of the 7 ?``            ``below`` (balanced)
comparison      ``which is larger , the top digit or the left     the larger digit
                digit ?``
detail          ``what is the small digit ?``                     the small digit (needs ~1-2 patches)
==============  ===============================================  =====================================

``describe`` (``describe the image .`` -> ``3 top left , 7 center``) is a dense training-only task.
A ``spatial`` question also carries its rationale (:attr:`QA.rationale`: where each named digit is), which a
model may be trained to write before the answer (``3 top left , 7 center , no``); an ``existence`` question's
rationale is the scene's description (``3 top left , 7 center , yes`` for ``is there the digit 7 ?``); the answer
alone is scored.

The small digit (8 px, exactly one 8-px patch when aligned) is resolvable at the small VLM's patch size: a
linear probe on the frozen conv-stem CLIP tower's patch features of the v2 model read its value right on
0.79 of held-out small-digit patches (0.92 for regular digits), never confusing it with a regular digit.

Held-out scenes use base digits from the disjoint ``val``/``test`` splits of
:func:`tokenreduce.data.digits.split_indices` (stratified, fixed seed), so held-out accuracy is honest.
Generation is deterministic in ``(split, n, seed, config)``.

Text uses a closed word-level vocabulary (:data:`VOCAB`); a prompt is ``<image>`` followed by the words of
the question and ``answer :``; the answer is one word followed by ``</s>``.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np
import torch

from .config import config_from_dict
from .digits import split_indices

__all__ = [
    "POSITION_NAMES",
    "QA",
    "QUESTION_TYPES",
    "SPATIAL_FORMS",
    "SPECIAL_TOKENS",
    "TRAIN_ONLY_TYPES",
    "VOCAB",
    "VQA_VERSION",
    "Scene",
    "SceneConfig",
    "VQASet",
    "cell_of_patch",
    "describe_answer",
    "existence_question",
    "generate_scenes",
    "make_vqa_set",
    "questions_for",
    "render_scenes",
]

#: Bump when the generator changes in a way that changes scenes or questions.
VQA_VERSION = 2
QUESTION_TYPES: tuple[str, ...] = ("identity", "counting", "spatial", "comparison", "detail")
#: types only trained (``describe``), or trained by a model that asks for them (``existence``: POPE-style
#: ``is there the digit 7 ?``, ``VLMTrainConfig(existence=True)``); neither is in the VQA benchmark
TRAIN_ONLY_TYPES: tuple[str, ...] = ("describe", "existence")
POSITION_NAMES: tuple[str, ...] = ("top left", "top", "top right", "left", "center", "right",
                                   "bottom left", "bottom", "bottom right")
_RELATIONS = ("left of", "right of", "above", "below")
_OPPOSITE = {"left of": "right of", "right of": "left of", "above": "below", "below": "above"}
#: forms of the ``spatial`` questions: ``"yesno"`` (``is the 3 left of the 7 ?`` -> ``yes``/``no``) or
#: ``"choice"`` (GQA's ``is the 3 left or right of the 7 ?`` -> ``left``; ``above or below`` -> ``above``)
SPATIAL_FORMS = ("yesno", "choice")
_PHOTOS = ("astronaut", "coffee", "chelsea", "rocket", "camera", "coins", "brick", "grass", "gravel",
           "immunohistochemistry", "hubble_deep_field")
_SPLIT_CODES = {"train": 101, "val": 202, "test": 303}

SPECIAL_TOKENS = {"pad": "<pad>", "bos": "<s>", "eos": "</s>", "unk": "<unk>", "image": "<image>"}
_WORDS = sorted({
    "what", "digit", "is", "at", "the", "how", "many", "digits", "are", "there", "?", "which", "larger", ",",
    "or", "small", "yes", "no", "describe", "image", ".", "answer", ":", "left", "right", "of", "above",
    "below", "top", "bottom", "center", *[str(i) for i in range(10)],
})
#: Closed vocabulary: special tokens first (ids 0..4), then words.
VOCAB: tuple[str, ...] = tuple(SPECIAL_TOKENS.values()) + tuple(_WORDS)


@dataclass(frozen=True)
class SceneConfig:
    """Scene generator parameters (ranges are ``(low, high)``, sampled uniformly).

    ``image_size`` is the canvas side (cells of ``image_size // 3``); ``n_digits`` regular digits per scene
    at ``digit_scale`` x the 8x8 source (16 px); ``small_prob`` chance of one extra small digit at
    ``small_scale`` (8 px); ``align`` snaps digit positions to multiples of this many pixels (0: free); digit brightness ``digit_intensity`` over a photo background of mean level
    ``background_level`` and contrast ``background_amplitude``; ``mean``/``std`` normalise pixels.
    """

    image_size: int = 96
    n_digits: tuple[int, int] = (2, 4)
    digit_scale: tuple[float, float] = (2.0, 2.0)
    small_prob: float = 0.5
    small_scale: tuple[float, float] = (1.0, 1.0)
    digit_intensity: tuple[float, float] = (0.75, 1.0)
    background_level: tuple[float, float] = (0.1, 0.35)
    background_amplitude: tuple[float, float] = (0.03, 0.08)
    mean: float = 0.5
    std: float = 0.5
    align: int = 8

    def __post_init__(self) -> None:
        if isinstance(self.align, bool) or not isinstance(self.align, int) or not 0 <= self.align <= self.image_size // 3:
            raise ValueError(f"align={self.align!r} must be an int in [0, {self.image_size // 3}] (0 = no snapping)")
        if not isinstance(self.image_size, int) or not 48 <= self.image_size <= 256 or self.image_size % 3:
            raise ValueError(f"image_size={self.image_size!r} must be an int in [48, 256] divisible by 3")
        lo, hi = self.n_digits
        if not (isinstance(lo, int) and isinstance(hi, int) and 1 <= lo <= hi <= 8):
            raise ValueError(f"n_digits={self.n_digits!r} must be ints with 1 <= low <= high <= 8")
        cell = self.image_size // 3
        if 8 * self.digit_scale[1] > cell:
            raise ValueError(f"digit_scale={self.digit_scale} gives digits larger than a cell ({cell} px)")
        if not 0.0 <= self.small_prob <= 1.0:
            raise ValueError(f"small_prob={self.small_prob!r} must be in [0, 1]")
        if self.small_scale[1] >= self.digit_scale[0]:
            raise ValueError(f"small_scale={self.small_scale} must stay below digit_scale={self.digit_scale}")
        if not self.std > 0:
            raise ValueError(f"std={self.std!r} must be > 0")

    @classmethod
    def from_dict(cls, d: dict) -> SceneConfig:
        """Inverse of :func:`dataclasses.asdict` (lists from JSON become tuples)."""
        return config_from_dict(cls, d)


class Scene(NamedTuple):
    """One scene's annotation: ``digits[cell]`` = value or -1, ``small_cell`` (-1 if none), ``boxes[cell]``
    = (top, left, size) in pixels (zeros for empty cells)."""

    digits: tuple[int, ...]
    small_cell: int
    boxes: tuple[tuple[int, int, int], ...]

    @property
    def regular_cells(self) -> list[int]:
        return [c for c, v in enumerate(self.digits) if v >= 0 and c != self.small_cell]

    @property
    def count(self) -> int:
        return sum(v >= 0 for v in self.digits)

    @property
    def present(self) -> set[int]:
        """The digit values in the scene (regular and small)."""
        return {v for v in self.digits if v >= 0}


class QA(NamedTuple):
    scene: int  # index into the set's images/scenes
    qtype: str
    question: str
    answer: str
    #: the evidence a model may be trained to write before the answer (``spatial``: where each named digit
    #: is, ``3 top left , 7 center``; ``existence``: the scene's description, :func:`describe_answer`);
    #: empty for the other types. Evaluation reads only the answer.
    rationale: str = ""


@dataclass
class VQASet:
    """Images ``(n, 3, H, W)`` float32 (normalised), their :class:`Scene` annotations, ink masks
    ``(n, H, W)`` of all digits, and the questions :class:`QA` (``qa.scene`` indexes the images)."""

    images: torch.Tensor
    scenes: list[Scene]
    ink: torch.Tensor
    qas: list[QA]
    config: SceneConfig

    def by_type(self) -> dict[str, list[QA]]:
        out: dict[str, list[QA]] = {}
        for qa in self.qas:
            out.setdefault(qa.qtype, []).append(qa)
        return out


# --------------------------------------------------------------------------- sources
@functools.lru_cache(maxsize=1)
def _digits() -> tuple[np.ndarray, np.ndarray]:
    from sklearn.datasets import load_digits

    d = load_digits()
    return (d.images / 16.0).astype(np.float32), d.target.astype(np.int64)


@functools.lru_cache(maxsize=1)
def _photos() -> tuple[np.ndarray, ...]:
    """RGB float32 photographs in [0, 1] (grayscale ones replicated), downscaled x2 for more content/crop."""
    import skimage.data

    out = []
    for name in _PHOTOS:
        img = np.asarray(getattr(skimage.data, name)(), dtype=np.float32)
        if img.ndim == 2:
            img = np.repeat(img[..., None], 3, axis=2)
        img = img[..., :3] / max(float(img.max()), 1.0)
        h, w = img.shape[0] // 2 * 2, img.shape[1] // 2 * 2
        img = img[:h, :w].reshape(h // 2, 2, w // 2, 2, 3).mean(axis=(1, 3))
        out.append(np.ascontiguousarray(img))
    return tuple(out)


def _upscale(img: np.ndarray, size: int) -> np.ndarray:
    t = torch.from_numpy(img)[None, None]
    return torch.nn.functional.interpolate(t, size=(size, size), mode="bilinear", align_corners=False)[0, 0].numpy()


def _validate(split: str, n: int, seed: int) -> None:
    if split not in _SPLIT_CODES:
        raise ValueError(f"split={split!r} is invalid: must be one of {tuple(_SPLIT_CODES)}")
    if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or not 1 <= n <= 10_000_000:
        raise ValueError(f"n={n!r} is out of range: must be an int in [1, 10_000_000]")
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise ValueError(f"seed={seed!r} is invalid: must be a non-negative int")


# --------------------------------------------------------------------------- scenes
def generate_scenes(split: str, n: int, seed: int = 0, config: SceneConfig | None = None
                    ) -> tuple[torch.Tensor, list[Scene], torch.Tensor]:
    """``n`` scenes of ``split``: images (n, 3, H, W) normalised, annotations, ink masks (n, H, W)."""
    _validate(split, n, seed)
    c = config or SceneConfig()
    rng = np.random.default_rng(np.random.SeedSequence([int(seed), _SPLIT_CODES[split], VQA_VERSION]))
    digits, labels = _digits()
    pool = np.asarray(split_indices(split))
    by_class = [pool[labels[pool] == k] for k in range(10)]
    H = c.image_size
    cell = H // 3
    photos = _photos()
    images = np.empty((n, H, H, 3), dtype=np.float32)
    ink = np.zeros((n, H, H), dtype=np.float32)
    scenes: list[Scene] = []
    for i in range(n):
        # background: low-contrast crop of a photo, random flip
        p = photos[rng.integers(len(photos))]
        y, x = rng.integers(0, p.shape[0] - H + 1), rng.integers(0, p.shape[1] - H + 1)
        crop = p[y:y + H, x:x + H]
        if rng.random() < 0.5:
            crop = crop[:, ::-1]
        mu, sd = crop.mean(axis=(0, 1), keepdims=True), crop.std() + 1e-3
        bg = rng.uniform(*c.background_level) + rng.uniform(*c.background_amplitude) * (crop - mu) / sd
        canvas = np.clip(bg, 0.0, 1.0)
        k = int(rng.integers(c.n_digits[0], c.n_digits[1] + 1))
        has_small = rng.random() < c.small_prob and k < 9
        cells = rng.permutation(9)[: k + int(has_small)]
        values = rng.permutation(10)[: len(cells)]
        cell_digits = [-1] * 9
        boxes = [(0, 0, 0)] * 9
        small_cell = int(cells[-1]) if has_small else -1
        for cl, v in zip(cells.tolist(), values.tolist()):
            scale = c.small_scale if cl == small_cell else c.digit_scale
            size = round(8 * rng.uniform(*scale))
            r, q = divmod(cl, 3)
            if c.align:  # snap to the patch grid: a digit covers whole patches
                top = r * cell + c.align * int(rng.integers(0, (cell - size) // c.align + 1))
                left = q * cell + c.align * int(rng.integers(0, (cell - size) // c.align + 1))
            else:
                top = r * cell + int(rng.integers(0, cell - size + 1))
                left = q * cell + int(rng.integers(0, cell - size + 1))
            src = by_class[v][rng.integers(len(by_class[v]))]
            up = np.clip(_upscale(digits[src], size), 0.0, 1.0)
            level = rng.uniform(*c.digit_intensity)
            region = canvas[top:top + size, left:left + size]
            np.maximum(region, (up * level)[..., None], out=region)
            ink[i, top:top + size, left:left + size] = np.maximum(ink[i, top:top + size, left:left + size], up)
            cell_digits[cl] = v
            boxes[cl] = (top, left, size)
        images[i] = canvas
        scenes.append(Scene(tuple(cell_digits), small_cell, tuple(boxes)))
    t = torch.from_numpy(images).permute(0, 3, 1, 2).contiguous()
    return (t - c.mean) / c.std, scenes, torch.from_numpy(ink)


def render_scenes(images: torch.Tensor, config: SceneConfig | None = None) -> np.ndarray:
    """Undo the normalisation: (n, 3, H, W) -> uint8 (n, H, W, 3) for plots."""
    c = config or SceneConfig()
    x = (images * c.std + c.mean).clamp(0, 1).permute(0, 2, 3, 1).numpy()
    return (x * 255).round().astype(np.uint8)


def cell_of_patch(grid: int, image_size: int = 96) -> np.ndarray:
    """(grid*grid,) scene-cell index (0..8) of each patch of a ``grid`` x ``grid`` patch layout."""
    centers = (np.arange(grid) + 0.5) * image_size / grid
    rc = np.minimum((centers // (image_size // 3)).astype(int), 2)
    return (rc[:, None] * 3 + rc[None, :]).reshape(-1)


# --------------------------------------------------------------------------- questions
def _rel_holds(rel: str, a: int, b: int) -> bool | None:
    """Does ``rel`` hold between cells a and b? None when undecidable (same column/row)."""
    (ra, ca), (rb, cb) = divmod(a, 3), divmod(b, 3)
    if rel in ("left of", "right of"):
        return None if ca == cb else (ca < cb) == (rel == "left of")
    return None if ra == rb else (ra < rb) == (rel == "above")


def _spatial_question(a: str, b: str, rel: str, holds: bool, spatial: str) -> tuple[str, str]:
    """(question, answer) of a spatial question about digits ``a`` and ``b`` (see :data:`SPATIAL_FORMS`)."""
    if spatial == "yesno":
        return f"is the {a} {rel} the {b} ?", "yes" if holds else "no"
    true = rel if holds else _OPPOSITE[rel]
    if true in ("left of", "right of"):
        return f"is the {a} left or right of the {b} ?", true.split()[0]
    return f"is the {a} above or below the {b} ?", true


def existence_question(digit: int) -> str:
    """POPE's question (Li et al. 2023) in this vocabulary: ``is there the digit 7 ?``."""
    return f"is there the digit {digit} ?"


def describe_answer(scene: Scene) -> str:
    """The ``describe`` task's answer: each regular digit with its cell, by cell, then the small digit
    (``3 top left , 7 center , small 5``); also an ``existence`` question's rationale."""
    d = scene.digits
    words = " , ".join(f"{d[c]} {POSITION_NAMES[c]}" for c in scene.regular_cells)
    if scene.small_cell >= 0:
        words += f" , small {d[scene.small_cell]}"
    return words


def questions_for(scene: Scene, idx: int, rng: np.random.Generator, types: tuple[str, ...] = QUESTION_TYPES,
                  spatial: str = "yesno") -> list[QA]:
    """One question of each type in ``types`` that the scene supports (``detail`` needs a small digit,
    ``comparison``/``spatial`` two regular digits); ``spatial`` is the form of the spatial questions
    (:data:`SPATIAL_FORMS`; the same random draws in both forms)."""
    if spatial not in SPATIAL_FORMS:
        raise ValueError(f"spatial={spatial!r} is invalid: accepted {SPATIAL_FORMS}")
    out: list[QA] = []
    reg = scene.regular_cells
    d = scene.digits
    for t in types:
        if t == "identity" and reg:
            cl = int(rng.choice(reg))
            out.append(QA(idx, t, f"what digit is at the {POSITION_NAMES[cl]} ?", str(d[cl])))
        elif t == "counting":
            out.append(QA(idx, t, "how many digits are there ?", str(scene.count)))
        elif t == "spatial" and len(reg) >= 2:
            want = bool(rng.random() < 0.5)
            cands = [(a, b, r) for a in reg for b in reg if a != b for r in _RELATIONS if _rel_holds(r, a, b) is not None]
            good = [x for x in cands if _rel_holds(x[2], x[0], x[1]) == want] or cands
            if not good:
                continue
            a, b, r = good[int(rng.integers(len(good)))]
            question, ans = _spatial_question(str(d[a]), str(d[b]), r, bool(_rel_holds(r, a, b)), spatial)
            why = f"{d[a]} {POSITION_NAMES[a]} , {d[b]} {POSITION_NAMES[b]}"
            out.append(QA(idx, t, question, ans, why))
        elif t == "comparison" and len(reg) >= 2:
            a, b = rng.choice(reg, size=2, replace=False).tolist()
            out.append(QA(idx, t, f"which is larger , the {POSITION_NAMES[a]} digit or the {POSITION_NAMES[b]} digit ?",
                          str(max(d[a], d[b]))))
        elif t == "detail" and scene.small_cell >= 0:
            out.append(QA(idx, t, "what is the small digit ?", str(d[scene.small_cell])))
        elif t == "describe":
            out.append(QA(idx, t, "describe the image .", describe_answer(scene)))
        elif t == "existence":  # a present digit or, as often, an absent one drawn uniformly
            present = sorted(scene.present)
            if present and rng.random() < 0.5:
                out.append(QA(idx, t, existence_question(int(rng.choice(present))), "yes", describe_answer(scene)))
            else:
                absent = [v for v in range(10) if v not in present]
                out.append(QA(idx, t, existence_question(int(rng.choice(absent))), "no", describe_answer(scene)))
    return out


def make_vqa_set(split: str, n_scenes: int, seed: int = 0, config: SceneConfig | None = None,
                 types: tuple[str, ...] = QUESTION_TYPES, per_type: int | None = None,
                 spatial: str = "yesno") -> VQASet:
    """Scenes plus questions. ``per_type``: keep at most this many questions of each type (balanced
    held-out sets; scenes are drawn until every type has ``per_type`` questions or ``n_scenes`` is reached);
    ``spatial``: the spatial questions' form (:data:`SPATIAL_FORMS`).
    """
    bad = [t for t in types if t not in QUESTION_TYPES + TRAIN_ONLY_TYPES]
    if bad:
        raise ValueError(f"unknown question types {bad}; accepted: {QUESTION_TYPES + TRAIN_ONLY_TYPES}")
    c = config or SceneConfig()
    images, scenes, ink = generate_scenes(split, n_scenes, seed, c)
    rng = np.random.default_rng(np.random.SeedSequence([int(seed), _SPLIT_CODES[split], VQA_VERSION, 7]))
    qas: list[QA] = []
    counts = {t: 0 for t in types}
    for i, s in enumerate(scenes):
        for qa in questions_for(s, i, rng, types, spatial):
            if per_type is None or counts[qa.qtype] < per_type:
                qas.append(qa)
                counts[qa.qtype] += 1
    if per_type is not None:  # keep only the scenes that carry questions
        used = sorted({qa.scene for qa in qas})
        remap = {old: new for new, old in enumerate(used)}
        images, ink = images[used], ink[used]
        scenes = [scenes[i] for i in used]
        qas = [qa._replace(scene=remap[qa.scene]) for qa in qas]
    return VQASet(images, scenes, ink, qas, c)
