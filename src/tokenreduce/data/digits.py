"""The "cluttered digits" image-classification dataset.

Each image is a mostly-empty canvas (default 64x64) holding one real handwritten
digit from scikit-learn's :func:`~sklearn.datasets.load_digits` (1,797 8x8 images),
upscaled (x3 by default, with a little scale jitter) and placed at a random
position. Clutter makes the background non-trivial without making the label
ambiguous:

* a low-contrast texture background cropped from scikit-image's bundled
  photographs (camera, coins, text, brick, grass, ...);
* 1-3 *distractor fragments*: small, dimmer crops of OTHER digits, placed away
  from the target where possible.

The label is the class of the target digit (10 classes). Most 4x4 patches of a
64x64 image contain no target-digit ink, so token-reduction methods should be
able to drop them; :func:`patch_foreground` measures this per patch from the
``target_masks`` returned by :func:`generate_cluttered_digits`.

Train/val/test splits are disjoint in the underlying sklearn digits (stratified
70/10/20 by default, fixed ``split_seed``), so held-out accuracy is honest even
though each base digit can appear several times with different placements and
clutter. Generation is deterministic in ``(split, n, seed, config)`` and fast
(vectorised numpy; tens of thousands of images per second on one core).
"""

from __future__ import annotations

import dataclasses
import functools
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
from torch.utils.data import Dataset

from .config import config_from_dict

__all__ = [
    "DATASET_VERSION",
    "NUM_CLASSES",
    "SPLITS",
    "ClutteredDigits",
    "ClutteredDigitsBatch",
    "ClutteredDigitsConfig",
    "generate_cluttered_digits",
    "make_cluttered_digits",
    "patch_foreground",
    "split_indices",
]

#: Bump when the generator changes in a way that changes the produced images.
DATASET_VERSION = 1
NUM_CLASSES = 10
SPLITS: tuple[str, ...] = ("train", "val", "test")
_SPLIT_CODES = {"train": 11, "val": 22, "test": 33}
_BASE_SIZE = 8  # sklearn digits are 8x8
_MIN_IMAGE_SIZE, _MAX_IMAGE_SIZE = 32, 128
_TEXTURE_NAMES = ("camera", "coins", "text", "brick", "grass", "gravel", "moon", "page", "clock", "cell")
_MAX_N = 10_000_000
_PLACEMENT_CANDIDATES = 8


@dataclass(frozen=True)
class ClutteredDigitsConfig:
    """Parameters of the generator. Ranges are ``(low, high)`` and sampled uniformly.

    Attributes:
        image_size: Side of the square canvas in pixels, in [32, 128].
        channels: 3 (grayscale replicated, for ``in_chans=3`` models) or 1.
        digit_scale: Upscaling factor of the 8x8 target digit (3.0 -> 24x24).
        scale_jitter: Relative jitter of the target scale, in [0, 0.5).
        target_intensity: Peak brightness of the target digit, in (0, 1].
        n_distractors: Inclusive range of the number of distractor fragments.
        distractor_scale: Upscaling factor of distractor digits (before cropping).
        distractor_fragment: Side range, in source (8x8) pixels, of the fragment crop.
        distractor_intensity: Peak brightness of distractors; must stay below
            ``target_intensity`` so the label is unambiguous.
        background_level: Mean brightness of the texture background.
        background_amplitude: Standard deviation of the texture background.
        mean: Normalisation mean: ``image = (pixel - mean) / std``.
        std: Normalisation std (pixels are in [0, 1] before normalisation).
        split_fractions: Train/val/test fractions of the 1,797 base digits.
        split_seed: Seed of the (stratified) base-digit split; keep fixed.
    """

    image_size: int = 64
    channels: int = 3
    digit_scale: float = 3.0
    scale_jitter: float = 0.15
    target_intensity: tuple[float, float] = (0.8, 1.0)
    n_distractors: tuple[int, int] = (1, 3)
    distractor_scale: tuple[float, float] = (1.5, 2.0)
    distractor_fragment: tuple[int, int] = (3, 5)
    distractor_intensity: tuple[float, float] = (0.3, 0.5)
    background_level: tuple[float, float] = (0.05, 0.25)
    background_amplitude: tuple[float, float] = (0.02, 0.06)
    mean: float = 0.5
    std: float = 0.5
    split_fractions: tuple[float, float, float] = (0.7, 0.1, 0.2)
    split_seed: int = 0

    def __post_init__(self) -> None:
        _validate_config(self)

    @property
    def max_digit_size(self) -> int:
        """Largest possible side (pixels) of the upscaled target digit."""
        return round(_BASE_SIZE * self.digit_scale * (1.0 + self.scale_jitter))

    @classmethod
    def from_dict(cls, d: dict) -> ClutteredDigitsConfig:
        """Inverse of :func:`dataclasses.asdict` (lists from JSON become tuples)."""
        return config_from_dict(cls, d)


class ClutteredDigitsBatch(NamedTuple):
    """Output of :func:`generate_cluttered_digits` (``n`` images of side ``H``).

    Attributes:
        images: float32 ``(n, C, H, H)``, normalised with the config's mean/std.
        labels: int64 ``(n,)`` class of the target digit, in ``[0, 10)``.
        target_masks: float32 ``(n, H, H)`` in [0, 1]: ink of the target digit only
            (no background, no distractors), for patch-level foreground analysis.
        boxes: int64 ``(n, 4)`` target box ``(top, left, height, width)`` in pixels.
        base_indices: int64 ``(n,)`` index of the target digit in ``load_digits``.
    """

    images: torch.Tensor
    labels: torch.Tensor
    target_masks: torch.Tensor
    boxes: torch.Tensor
    base_indices: torch.Tensor


# --------------------------------------------------------------------------- validation


def _check_range(name: str, value: tuple, lo: float, hi: float, *, integer: bool = False) -> None:
    """Check that ``value`` is a ``(low, high)`` pair with ``lo <= low <= high <= hi``."""
    if not (isinstance(value, tuple) and len(value) == 2):
        raise ValueError(f"{name} must be a (low, high) tuple, got {value!r}")
    a, b = value
    kind = int if integer else (int, float)
    if not all(isinstance(v, kind) and not isinstance(v, bool) for v in value):
        raise ValueError(f"{name} must contain {'integers' if integer else 'numbers'}, got {value!r}")
    if not (lo <= a <= b <= hi):
        raise ValueError(f"{name}={value!r} is invalid: need {lo} <= low <= high <= {hi}")


def _validate_config(c: ClutteredDigitsConfig) -> None:
    """Raise ``ValueError`` naming the first invalid field of ``c``."""
    if not isinstance(c.image_size, int) or not (_MIN_IMAGE_SIZE <= c.image_size <= _MAX_IMAGE_SIZE):
        raise ValueError(
            f"image_size={c.image_size!r} is out of range: must be an int in [{_MIN_IMAGE_SIZE}, {_MAX_IMAGE_SIZE}]"
        )
    if c.channels not in (1, 3):
        raise ValueError(f"channels={c.channels!r} is invalid: must be 1 or 3")
    if not (1.0 <= c.digit_scale <= 8.0):
        raise ValueError(f"digit_scale={c.digit_scale!r} is out of range: must be in [1, 8]")
    if not (0.0 <= c.scale_jitter < 0.5):
        raise ValueError(f"scale_jitter={c.scale_jitter!r} is out of range: must be in [0, 0.5)")
    if c.max_digit_size > c.image_size:
        raise ValueError(
            f"digit_scale={c.digit_scale} with scale_jitter={c.scale_jitter} gives digits up to "
            f"{c.max_digit_size}px, larger than image_size={c.image_size}; lower digit_scale or raise image_size"
        )
    _check_range("target_intensity", c.target_intensity, 1e-3, 1.0)
    _check_range("n_distractors", c.n_distractors, 0, 16, integer=True)
    _check_range("distractor_scale", c.distractor_scale, 0.5, 4.0)
    _check_range("distractor_fragment", c.distractor_fragment, 1, _BASE_SIZE - 2, integer=True)
    _check_range("distractor_intensity", c.distractor_intensity, 0.0, 1.0)
    if c.distractor_intensity[1] >= c.target_intensity[0]:
        raise ValueError(
            f"distractor_intensity={c.distractor_intensity!r} must stay below target_intensity[0]="
            f"{c.target_intensity[0]} so the label is unambiguous"
        )
    _check_range("background_level", c.background_level, 0.0, 1.0)
    _check_range("background_amplitude", c.background_amplitude, 0.0, 0.5)
    if not (c.std > 0):
        raise ValueError(f"std={c.std!r} is invalid: must be > 0")
    fr = c.split_fractions
    if len(fr) != 3 or any(f <= 0 for f in fr) or abs(sum(fr) - 1.0) > 1e-6:
        raise ValueError(f"split_fractions={fr!r} is invalid: need 3 positive fractions summing to 1")


def _validate_call(split: str, n: int, seed: int) -> None:
    """Validate the common arguments of the generator functions."""
    if split not in SPLITS:
        raise ValueError(f"split={split!r} is invalid: must be one of {SPLITS}")
    if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or not (1 <= n <= _MAX_N):
        raise ValueError(f"n={n!r} is out of range: must be an int in [1, {_MAX_N}]")
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise ValueError(f"seed={seed!r} is invalid: must be a non-negative int")


# --------------------------------------------------------------------------- sources


def _read_digits_csv() -> np.ndarray | None:
    """Rows ``[64 pixels..., label]`` of sklearn's bundled ``digits.csv.gz``, if found.

    Reading the file directly (what ``load_digits`` does) avoids importing
    ``sklearn.datasets``, which takes seconds; ``None`` if the layout differs.
    """
    import importlib.util

    spec = importlib.util.find_spec("sklearn")
    for root in (spec.submodule_search_locations or []) if spec else []:
        path = Path(root) / "datasets" / "data" / "digits.csv.gz"
        if path.is_file():
            data = np.loadtxt(path, delimiter=",")
            if data.shape == (1797, 65):
                return data
    return None


@functools.lru_cache(maxsize=1)
def _base_digits() -> tuple[np.ndarray, np.ndarray]:
    """All sklearn digits as float32 ``(1797, 8, 8)`` in [0, 1] and int64 labels."""
    data = _read_digits_csv()
    if data is not None:
        raw, target = data[:, :-1].reshape(-1, _BASE_SIZE, _BASE_SIZE), data[:, -1]
    else:
        from sklearn.datasets import load_digits

        d = load_digits()
        raw, target = d.images, d.target
    images = (raw / 16.0).astype(np.float32)
    images.setflags(write=False)
    labels = target.astype(np.int64)
    labels.setflags(write=False)
    return images, labels


@functools.lru_cache(maxsize=1)
def _textures() -> tuple[np.ndarray, ...]:
    """Grayscale float32 photographs from ``skimage.data`` (bundled, no download)."""
    import skimage.data

    out = []
    for name in _TEXTURE_NAMES:
        img = np.asarray(getattr(skimage.data, name)(), dtype=np.float32)
        if img.ndim == 3:
            img = img[..., :3] @ np.array([0.299, 0.587, 0.114], dtype=np.float32)
        img = img / max(float(img.max()), 1.0)
        img.setflags(write=False)
        out.append(img)
    return tuple(out)


@functools.lru_cache(maxsize=8)
def _split_indices_cached(split: str, fractions: tuple[float, float, float], split_seed: int) -> np.ndarray:
    """Stratified, disjoint split of the base-digit indices (cached helper)."""
    _, labels = _base_digits()
    rng = np.random.default_rng(np.random.SeedSequence([split_seed, 0xD161]))
    parts: dict[str, list[np.ndarray]] = {s: [] for s in SPLITS}
    for cls in range(NUM_CLASSES):
        idx = rng.permutation(np.flatnonzero(labels == cls))
        n_train = round(fractions[0] * len(idx))
        n_val = round(fractions[1] * len(idx))
        parts["train"].append(idx[:n_train])
        parts["val"].append(idx[n_train : n_train + n_val])
        parts["test"].append(idx[n_train + n_val :])
    out = np.sort(np.concatenate(parts[split]))
    out.setflags(write=False)
    return out


def split_indices(split: str, config: ClutteredDigitsConfig | None = None) -> np.ndarray:
    """Indices into ``sklearn.datasets.load_digits()`` of the base digits of ``split``.

    The three splits are disjoint and stratified by class. Returns a read-only array.
    """
    if split not in SPLITS:
        raise ValueError(f"split={split!r} is invalid: must be one of {SPLITS}")
    config = config or ClutteredDigitsConfig()
    return _split_indices_cached(split, tuple(config.split_fractions), config.split_seed)


# --------------------------------------------------------------------------- rendering


@functools.lru_cache(maxsize=64)
def _bilinear_matrix(in_size: int, out_size: int) -> np.ndarray:
    """``(out_size, in_size)`` matrix ``M`` so that ``M @ img @ M.T`` resizes bilinearly."""
    m = np.zeros((out_size, in_size), dtype=np.float32)
    centers = (np.arange(out_size) + 0.5) * in_size / out_size - 0.5
    centers = np.clip(centers, 0.0, in_size - 1.0)
    lo = np.floor(centers).astype(int)
    hi = np.minimum(lo + 1, in_size - 1)
    w = (centers - lo).astype(np.float32)
    rows = np.arange(out_size)
    np.add.at(m, (rows, lo), 1.0 - w)
    np.add.at(m, (rows, hi), w)
    return m


def _upscale_grouped(digits: np.ndarray, sizes: np.ndarray) -> list[np.ndarray]:
    """Upscale each 8x8 ``digits[i]`` to ``sizes[i]`` square pixels (bilinear)."""
    out: list[np.ndarray] = [None] * len(digits)  # type: ignore[list-item]
    for s in np.unique(sizes):
        sel = np.flatnonzero(sizes == s)
        m = _bilinear_matrix(_BASE_SIZE, int(s))
        up = np.einsum("ij,njk,lk->nil", m, digits[sel], m, optimize=True)
        for j, i in enumerate(sel):
            out[i] = up[j]
    return out


def _uniform(rng: np.random.Generator, bounds: tuple[float, float], n: int) -> np.ndarray:
    """``n`` uniform samples in ``[low, high]`` (float32)."""
    return rng.uniform(bounds[0], bounds[1], size=n).astype(np.float32)


def _draw_base(rng: np.random.Generator, pool: np.ndarray, n: int) -> np.ndarray:
    """``n`` base indices cycling through shuffled copies of ``pool`` (class-balanced)."""
    reps = -(-n // len(pool))
    return np.concatenate([rng.permutation(pool) for _ in range(reps)])[:n]


def _render_background(rng: np.random.Generator, n: int, size: int, c: ClutteredDigitsConfig) -> np.ndarray:
    """Low-contrast photo-texture backgrounds, float32 ``(n, size, size)`` in [0, 1]."""
    textures = _textures()
    which = rng.integers(0, len(textures), size=n)
    u = rng.random((n, 2))
    orient = rng.integers(0, 8, size=n)
    crops = np.empty((n, size, size), dtype=np.float32)
    for i in range(n):
        tex = textures[which[i]]
        y = int(u[i, 0] * (tex.shape[0] - size + 1))
        x = int(u[i, 1] * (tex.shape[1] - size + 1))
        crop = tex[y : y + size, x : x + size]
        if orient[i] & 1:
            crop = crop[::-1]
        if orient[i] & 2:
            crop = crop[:, ::-1]
        if orient[i] & 4:
            crop = crop.T
        crops[i] = crop
    mu = crops.mean(axis=(1, 2), keepdims=True)
    sd = crops.std(axis=(1, 2), keepdims=True) + 1e-3
    level = _uniform(rng, c.background_level, n)[:, None, None]
    amp = _uniform(rng, c.background_amplitude, n)[:, None, None]
    return np.clip(level + amp * (crops - mu) / sd, 0.0, 1.0)


def _place_targets(rng: np.random.Generator, n: int, c: ClutteredDigitsConfig) -> tuple[np.ndarray, np.ndarray]:
    """Target sizes ``(n,)`` and top-left corners ``(n, 2)`` inside the canvas."""
    jitter = rng.uniform(-c.scale_jitter, c.scale_jitter, size=n)
    sizes = np.rint(_BASE_SIZE * c.digit_scale * (1.0 + jitter)).astype(np.int64)
    sizes = np.clip(sizes, 1, c.image_size)
    corners = (rng.random((n, 2)) * (c.image_size - sizes + 1)[:, None]).astype(np.int64)
    return sizes, corners


def _box_overlap(y: np.ndarray, x: np.ndarray, h: np.ndarray, w: np.ndarray, box: np.ndarray) -> np.ndarray:
    """Overlap area between boxes ``(y, x, h, w)`` and ``box = (top, left, size)`` (broadcast)."""
    ty, tx, ts = box[..., 0], box[..., 1], box[..., 2]
    oy = np.clip(np.minimum(y + h, ty + ts) - np.maximum(y, ty), 0, None)
    ox = np.clip(np.minimum(x + w, tx + ts) - np.maximum(x, tx), 0, None)
    return oy * ox


def _render_distractors(
    rng: np.random.Generator,
    canvas: np.ndarray,
    targets: np.ndarray,
    pool: np.ndarray,
    target_box: np.ndarray,
    c: ClutteredDigitsConfig,
) -> None:
    """Paste dim fragments of other digits into ``canvas`` (in place, max-composite)."""
    digits, _ = _base_digits()
    n, size = canvas.shape[0], canvas.shape[1]
    counts = rng.integers(c.n_distractors[0], c.n_distractors[1] + 1, size=n)
    owner = np.repeat(np.arange(n), counts)
    m = len(owner)
    if m == 0:
        return
    src = pool[rng.integers(0, len(pool), size=m)]
    clash = src == targets[owner]  # never use the target digit itself as a distractor
    src[clash] = pool[(np.searchsorted(pool, src[clash]) + 1) % len(pool)]
    full = np.rint(_BASE_SIZE * _uniform(rng, c.distractor_scale, m)).astype(np.int64)
    lo, hi = c.distractor_fragment
    fh = rng.integers(lo, hi + 1, size=m)
    fw = rng.integers(lo, hi + 1, size=m)
    # fragment window in source pixels: rows anywhere, columns in the inked centre (1..6)
    sy = (rng.random(m) * (_BASE_SIZE - fh + 1)).astype(np.int64)
    sx = 1 + (rng.random(m) * np.maximum(_BASE_SIZE - 2 - fw + 1, 1)).astype(np.int64)
    scale = full / _BASE_SIZE
    py0, px0 = np.rint(sy * scale).astype(np.int64), np.rint(sx * scale).astype(np.int64)
    ph = np.clip(np.rint(fh * scale).astype(np.int64), 1, full - py0)
    pw = np.clip(np.rint(fw * scale).astype(np.int64), 1, full - px0)
    # choose, among a few random positions, the one overlapping the target the least
    k = _PLACEMENT_CANDIDATES
    cy = (rng.random((m, k)) * (size - ph + 1)[:, None]).astype(np.int64)
    cx = (rng.random((m, k)) * (size - pw + 1)[:, None]).astype(np.int64)
    ov = _box_overlap(cy, cx, ph[:, None], pw[:, None], target_box[owner][:, None, :])
    best = np.argmin(ov, axis=1)
    ys, xs = cy[np.arange(m), best], cx[np.arange(m), best]
    intensity = _uniform(rng, c.distractor_intensity, m)
    ups = _upscale_grouped(digits[src], full)
    for j in range(m):
        frag = ups[j][py0[j] : py0[j] + ph[j], px0[j] : px0[j] + pw[j]] * intensity[j]
        region = canvas[owner[j], ys[j] : ys[j] + ph[j], xs[j] : xs[j] + pw[j]]
        np.maximum(region, frag, out=region)


def generate_cluttered_digits(
    split: str,
    n: int,
    seed: int = 0,
    config: ClutteredDigitsConfig | None = None,
) -> ClutteredDigitsBatch:
    """Generate ``n`` cluttered-digit images of ``split`` with their annotations.

    Args:
        split: ``"train"``, ``"val"`` or ``"test"``; base digits of different splits
            are disjoint (see :func:`split_indices`).
        n: Number of images, in [1, 10_000_000]. Base digits are drawn by cycling
            through shuffled copies of the split, so classes stay balanced.
        seed: Non-negative int. Same ``(split, n, seed, config)`` -> identical output;
            the same seed gives different images in different splits.
        config: Generator parameters (default :class:`ClutteredDigitsConfig`).

    Returns:
        A :class:`ClutteredDigitsBatch` (images, labels, target_masks, boxes, base_indices).

    Raises:
        ValueError: On an unknown split, a bad ``n`` or a negative seed.
    """
    _validate_call(split, n, seed)
    c = config or ClutteredDigitsConfig()
    n = int(n)
    rng = np.random.default_rng(np.random.SeedSequence([int(seed), _SPLIT_CODES[split], DATASET_VERSION]))
    digits, labels = _base_digits()
    pool = split_indices(split, c)
    base = _draw_base(rng, pool, n)
    size = c.image_size

    canvas = _render_background(rng, n, size, c)
    sizes, corners = _place_targets(rng, n, c)
    box = np.stack([corners[:, 0], corners[:, 1], sizes], axis=1)
    _render_distractors(rng, canvas, base, pool, box, c)

    masks = np.zeros((n, size, size), dtype=np.float32)
    intensity = _uniform(rng, c.target_intensity, n)
    for i, up in enumerate(_upscale_grouped(digits[base], sizes)):
        y, x, s = box[i]
        masks[i, y : y + s, x : x + s] = up
        region = canvas[i, y : y + s, x : x + s]
        np.maximum(region, up * intensity[i], out=region)

    images = torch.from_numpy(canvas).unsqueeze(1)
    images = images.sub_(c.mean).div_(c.std)
    if c.channels == 3:
        images = images.expand(-1, 3, -1, -1).contiguous()
    return ClutteredDigitsBatch(
        images=images,
        labels=torch.from_numpy(labels[base].copy()),
        target_masks=torch.from_numpy(masks),
        boxes=torch.from_numpy(np.concatenate([box[:, :2], box[:, 2:], box[:, 2:]], axis=1)),
        base_indices=torch.from_numpy(base.astype(np.int64)),
    )


def make_cluttered_digits(
    split: str,
    n: int,
    seed: int = 0,
    image_size: int | None = None,
    config: ClutteredDigitsConfig | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Images float32 ``(n, C, H, H)`` and labels int64 ``(n,)`` of a split.

    ``image_size`` (default: ``config.image_size``, i.e. 64) overrides the config's
    canvas size. See :func:`generate_cluttered_digits` for the other arguments.
    """
    c = config or ClutteredDigitsConfig()
    if image_size is not None and image_size != c.image_size:
        c = dataclasses.replace(c, image_size=image_size)
    batch = generate_cluttered_digits(split, n, seed=seed, config=c)
    return batch.images, batch.labels


def patch_foreground(target_masks: torch.Tensor, patch_size: int = 4, threshold: float = 0.05) -> torch.Tensor:
    """Boolean ``(n, num_patches)``: does a patch contain target-digit ink > ``threshold``?

    Patches are in row-major order, matching a ViT patch embedding (no CLS token).
    """
    if target_masks.ndim != 3:
        raise ValueError(f"target_masks must be (n, H, W), got shape {tuple(target_masks.shape)}")
    h, w = target_masks.shape[-2:]
    if patch_size < 1 or h % patch_size or w % patch_size:
        raise ValueError(f"patch_size={patch_size} must be >= 1 and divide the image size {h}x{w}")
    pooled = torch.nn.functional.max_pool2d(target_masks.unsqueeze(1), patch_size)
    return (pooled.flatten(1) > threshold)


class ClutteredDigits(Dataset):
    """Map-style dataset over a pre-generated :func:`generate_cluttered_digits` batch.

    ``dataset[i]`` is ``(image (C, H, W) float32, label int64 scalar tensor)``.
    """

    def __init__(self, split: str, n: int, seed: int = 0, config: ClutteredDigitsConfig | None = None) -> None:
        self.split = split
        self.seed = seed
        self.config = config or ClutteredDigitsConfig()
        self.batch = generate_cluttered_digits(split, n, seed=seed, config=self.config)

    def __len__(self) -> int:
        return int(self.batch.labels.shape[0])

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.batch.images[index], self.batch.labels[index]
