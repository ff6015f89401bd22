"""A seeded synthetic world for weakly supervised segmentation: textured objects on textured backgrounds.

Every object class is recognisable from any patch *inside* the object (its two-colour texture), never from its
outline: shapes (circle, ellipse, square, blob), colours, sizes and positions are drawn independently of the class.
Objects are large (radius 22-34% of the image side, so that a 64-pixel CLIP sees their texture) and may occlude
each other, but every object keeps a visible part, so the image-level labels are exactly the ids in the mask.

Captions name the classes with a skewed vocabulary: for six of the eight classes the official class name is a rare
word (1% of mentions) while another word is used 70% of the time, which is the gap POLE's class-token selection
exploits.

Conventions (as PASCAL VOC in ``pole_hf.data.voc``): ``labels`` holds class indices ``0..C-1`` into
``class_names``; the mask holds ``class index + 1`` and 0 for background.
"""

from __future__ import annotations

import io
import numbers
import zlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import datasets
import numpy as np
from PIL import Image

from .painting import (
    SHAPES,
    TEXTURES,
    _background,
    _hsv,
    _pixel_grid,
    _shape_mask,
    _texture,
)


@dataclass(frozen=True)
class WorldClass:
    """One object class: official ``name`` (the ``ClassLabel`` name), ``texture`` (one of ``TEXTURES``) and caption
    ``words`` as ``(word, probability)`` pairs summing to 1."""

    name: str
    texture: str
    words: tuple[tuple[str, float], ...]



WORLD_CLASSES: tuple[WorldClass, ...] = (
    # Official name is a rare word (1% of mentions): POLE should pick (or learn) the frequent word's token.
    WorldClass("zebra", "horizontal_stripes",
               (("stripes", 0.70), ("bands", 0.19), ("streaks", 0.10), ("zebra", 0.01))),
    WorldClass("fence", "vertical_stripes", (("bars", 0.70), ("columns", 0.29), ("fence", 0.01))),
    WorldClass("chessboard", "checkerboard", (("checkers", 0.70), ("tiles", 0.29), ("chessboard", 0.01))),
    WorldClass("target", "rings", (("rings", 0.70), ("bullseye", 0.29), ("target", 0.01))),
    WorldClass("dots", "dots", (("spots", 0.70), ("freckles", 0.29), ("dots", 0.01))),
    # Official name is the frequent word: POLE should keep it.
    WorldClass("slashes", "diagonal_stripes", (("slashes", 0.70), ("diagonals", 0.25), ("twill", 0.05))),
    WorldClass("grid", "grid", (("grid", 0.70), ("mesh", 0.15), ("lattice", 0.10), ("netting", 0.05))),
    # Official name is a rare word (1% of mentions).
    WorldClass("zigzag", "zigzag", (("chevron", 0.70), ("lightning", 0.29), ("zigzag", 0.01))),
)
"""The default class table: official name, texture and caption vocabulary of each of the 8 classes."""

BACKGROUND_PHRASES: dict[str, str] = {"grass": "on grass", "sky": "in the sky", "water": "on water", "sand": "on sand"}
"""Background kinds and the phrase a caption appends when it mentions the background."""

CAPTION_TEMPLATES: tuple[str, ...] = ("a photo of {}", "a picture of {}", "{}", "an image of {}")
"""Caption templates; ``{}`` receives the class words joined as ``"A"``, ``"A and B"`` or ``"A, B and C"``."""


ImageSize = int | tuple[int, int]


def _as_rng(rng_or_seed: np.random.Generator | int | Sequence[int]) -> np.random.Generator:
    return rng_or_seed if isinstance(rng_or_seed, np.random.Generator) else np.random.default_rng(rng_or_seed)


def _size(image_size: ImageSize) -> tuple[int, int]:
    size = (image_size, image_size) if isinstance(image_size, numbers.Integral) else tuple(image_size)
    if len(size) != 2 or min(size) < 16:
        raise ValueError(f"image_size={image_size!r} is invalid: use an int or (height, width), at least 16 each")
    height, width = size
    return int(height), int(width)


def _checked(classes: tuple[WorldClass, ...]) -> tuple[WorldClass, ...]:
    """Validate a class table: known textures, probabilities summing to 1, each word used by one class only."""
    phrases = CAPTION_TEMPLATES + tuple(BACKGROUND_PHRASES.values()) + ("and",)
    seen = {word: "the caption templates" for phrase in phrases for word in phrase.split()}
    for spec in classes:
        total = sum(p for _, p in spec.words)
        if spec.texture not in TEXTURES:
            raise ValueError(f"Class {spec.name!r} has unknown texture {spec.texture!r}: use one of {TEXTURES}")
        if abs(total - 1.0) > 1e-6 or spec.name not in dict(spec.words):
            raise ValueError(f"Words of class {spec.name!r} sum to {total:g}: list its official name among its words "
                             "and make the probabilities sum to 1")
        for word, _ in spec.words:
            if word in seen:
                raise ValueError(f"Word {word!r} of class {spec.name!r} is already used by {seen[word]}: pick another")
            seen[word] = f"class {spec.name!r}"
    return classes


class SyntheticWorld:
    """The rules of the synthetic world: classes, their textures and words, backgrounds, object layout.

    Args:
        classes: the class table (official name, texture, words with probabilities); defaults to ``WORLD_CLASSES``.
        object_count_weights: Probabilities of 1, 2, 3, ... objects per image (distinct classes).
        radius_range: Object radius as a fraction of the shorter image side.
        min_visible_fraction: Every object keeps at least this fraction of its in-image area unoccluded;
            an object that would hide more of an earlier one is resampled, and dropped after ``max_tries``.
        background_mention_prob: Probability that a caption mentions the background (``"... on grass"``).
        noise_std: Standard deviation of the per-pixel Gaussian noise added to the image (0-255 scale).
        max_tries: Placement attempts per object.
    """

    def __init__(
        self,
        classes: Sequence[WorldClass] = WORLD_CLASSES,
        object_count_weights: Sequence[float] = (0.5, 0.35, 0.15),
        radius_range: tuple[float, float] = (0.22, 0.34),
        min_visible_fraction: float = 0.3,
        background_mention_prob: float = 0.3,
        noise_std: float = 4.0,
        max_tries: int = 20,
    ):
        self.classes = _checked(tuple(classes))
        weights = np.asarray(object_count_weights, dtype=np.float64)
        if len(weights) > len(self.classes) or abs(weights.sum() - 1.0) > 1e-6:
            raise ValueError(f"object_count_weights={tuple(object_count_weights)} must sum to 1 with at most "
                             f"{len(self.classes)} entries (one per object count)")
        self.object_count_weights = weights
        self.radius_range = radius_range
        self.min_visible_fraction = min_visible_fraction
        self.background_mention_prob = background_mention_prob
        self.noise_std = noise_std
        self.max_tries = max_tries
        self._word_lists = [[w for w, _ in spec.words] for spec in self.classes]
        self._word_probs = [np.array([p for _, p in spec.words]) for spec in self.classes]

    @property
    def class_names(self) -> list[str]:
        """Official class names, in label order."""
        return [spec.name for spec in self.classes]

    @property
    def words(self) -> dict[str, list[tuple[str, float]]]:
        """Caption vocabulary per class: ``{class name: [(word, probability), ...]}``."""
        return {spec.name: list(spec.words) for spec in self.classes}

    @property
    def candidates(self) -> dict[str, list[str]]:
        """Caption words per class in the class table's order, ``{class name: [word, ...]}``: the candidates POLE's
        word selection chooses among."""
        return {spec.name: list(words) for spec, words in zip(self.classes, self._word_lists)}

    @property
    def background_kinds(self) -> list[str]:
        """Background kinds, e.g. ``["grass", "sky", "water", "sand"]``."""
        return list(BACKGROUND_PHRASES)

    @property
    def rare_name_classes(self) -> list[str]:
        """Classes whose official name is not their most frequent caption word."""
        return [spec.name for spec in self.classes if self.frequent_word(spec.name) != spec.name]

    def _index(self, cls: int | str) -> int:
        index = self.class_names.index(cls) if cls in self.class_names else cls
        if isinstance(index, str) or not 0 <= int(index) < len(self.classes):
            raise ValueError(f"Unknown class {cls!r}: use a name in {self.class_names} or an index below "
                             f"{len(self.classes)}")
        return int(index)

    def frequent_word(self, cls: int | str) -> str:
        """The word captions use most often for ``cls`` (a class name or index)."""
        spec = self.classes[self._index(cls)]
        return max(spec.words, key=lambda wp: wp[1])[0]

    def caption(
        self, labels: Sequence[int | str], rng: np.random.Generator | int, background: str | None = None
    ) -> str:
        """Write a caption naming ``labels`` with words drawn from the skewed vocabulary, in random order.

        Args:
            labels: class indices or names present in the image.
            rng: A numpy ``Generator`` (or a seed) to draw words, order, template and background mention.
            background: the image's background kind; mentioned with probability ``background_mention_prob``.

        Returns:
            A caption such as ``"a photo of stripes and dots"`` or ``"rings, grid and bars on grass"``.
        """
        rng = _as_rng(rng)
        indices = [self._index(label) for label in labels]
        if not indices:
            raise ValueError("caption() got no labels: pass at least one class index or name")
        words = [self._word_lists[i][rng.choice(len(self._word_probs[i]), p=self._word_probs[i])] for i in indices]
        words = [words[i] for i in rng.permutation(len(words))]
        listing = words[0] if len(words) == 1 else ", ".join(words[:-1]) + " and " + words[-1]
        text = CAPTION_TEMPLATES[rng.integers(len(CAPTION_TEMPLATES))].format(listing)
        if background is not None and rng.random() < self.background_mention_prob:
            text += " " + BACKGROUND_PHRASES[background]
        return text

    def _place_objects(self, rng: np.random.Generator, height: int, width: int) -> tuple[np.ndarray, list[dict]]:
        """Choose classes, shapes, positions; return the instance map (0 = background, k = k-th object), objects."""
        ys, xs = _pixel_grid(height, width)
        side = min(height, width)
        count = rng.choice(len(self.object_count_weights), p=self.object_count_weights) + 1
        classes = rng.choice(len(self.classes), size=count, replace=False)
        instances = np.zeros((height, width), dtype=np.uint8)
        areas: list[int] = []
        objects: list[dict[str, Any]] = []
        for cls in classes:
            for _ in range(self.max_tries):
                shape = SHAPES[rng.integers(len(SHAPES))]
                radius = rng.uniform(*self.radius_range) * side
                cy, cx = float(rng.uniform(0.15, 0.85) * height), float(rng.uniform(0.15, 0.85) * width)
                region = _shape_mask(shape, rng, ys - cy, xs - cx, radius)
                area = int(region.sum())
                if area < 0.03 * height * width:
                    continue
                left = np.bincount(instances[~region], minlength=len(objects) + 1)[1:]
                if all(left[k] >= self.min_visible_fraction * areas[k] for k in range(len(objects))):
                    break
            else:
                continue  # every try would hide an earlier object too much: drop this one
            instances[region] = len(objects) + 1
            areas.append(area)
            objects.append({"label": int(cls), "shape": shape, "center": (cy, cx), "radius": float(radius)})
        return instances, objects

    def sample(self, rng_or_seed: np.random.Generator | int | Sequence[int], image_size: ImageSize = 96) -> dict:
        """Draw one image of the world.

        Args:
            rng_or_seed: A numpy ``Generator``, or a seed (int or sequence of ints) for ``np.random.default_rng``.
            image_size: side length, or ``(height, width)``.

        Returns:
            A dict with ``image`` (uint8 ``(H, W, 3)``), ``mask`` (uint8 ``(H, W)``, class index + 1, 0 = background),
            ``instances`` (uint8 ``(H, W)``, k = k-th object, 0 = background), ``labels`` (sorted class indices
            present in the mask), ``caption`` (str), ``background`` (kind) and ``objects`` (per object: ``label``,
            ``shape``, ``center``, ``radius``, ``texture``, in drawing order).
        """
        rng = _as_rng(rng_or_seed)
        height, width = _size(image_size)
        background = self.background_kinds[rng.integers(len(BACKGROUND_PHRASES))]
        image = _background(background, rng, height, width)
        instances, objects = self._place_objects(rng, height, width)
        ys, xs = _pixel_grid(height, width)
        class_of_instance = np.zeros(len(objects) + 1, dtype=np.uint8)
        for k, obj in enumerate(objects, start=1):
            spec = self.classes[obj["label"]]
            obj["texture"] = spec.texture
            class_of_instance[k] = obj["label"] + 1
            hue = rng.random()
            light = _hsv(hue, rng.uniform(0.5, 1.0), rng.uniform(0.75, 1.0))
            dark = _hsv(hue + rng.uniform(0.3, 0.7), rng.uniform(0.4, 1.0), rng.uniform(0.1, 0.4))
            period = max(4.0, rng.uniform(0.055, 0.085) * min(height, width))
            visible = instances == k
            rows, cols = np.flatnonzero(visible.any(axis=1)), np.flatnonzero(visible.any(axis=0))
            box = (slice(rows[0], rows[-1] + 1), slice(cols[0], cols[-1] + 1))
            cy, cx = obj["center"]
            pattern = _texture(spec.texture, rng, ys[box] - cy, xs[box] - cx, period)
            inside = visible[box]
            image[box][inside] = np.where(pattern[inside][:, None], light, dark)
        image += rng.standard_normal(image.shape, dtype=np.float32) * self.noise_std
        image = np.clip(image, 0, 255).astype(np.uint8)
        mask = class_of_instance[instances]
        labels = sorted(obj["label"] for obj in objects)
        caption = self.caption(labels, rng, background=background)
        return {"image": image, "mask": mask, "instances": instances, "labels": labels, "caption": caption,
                "background": background, "objects": objects}

    def __repr__(self) -> str:
        return f"SyntheticWorld(classes={self.class_names}, backgrounds={self.background_kinds})"


def generate(
    num_images: int,
    seed: int = 0,
    image_size: ImageSize = 96,
    split: str | None = None,
    world: SyntheticWorld | None = None,
) -> Iterator[dict[str, Any]]:
    """Yield ``num_images`` samples of the world as numpy arrays (see ``SyntheticWorld.sample``).

    Image ``i`` is drawn from ``np.random.default_rng([seed, crc32(split), i])``: it depends only on ``seed``,
    ``split`` (``None`` means ``"train"``), ``i`` and ``image_size``, never on ``num_images``.

    Args:
        num_images: how many images to yield.
        seed: non-negative base seed.
        image_size: side length, or ``(height, width)``.
        split: split name; different names give disjoint random streams.
        world: the world's rules; defaults to ``SyntheticWorld()``.
    """
    if num_images < 0 or seed < 0:
        raise ValueError(f"num_images={num_images} and seed={seed} must both be non-negative")
    world = world or SyntheticWorld()
    stream = zlib.crc32(str(split or "train").encode("utf-8"))
    for index in range(num_images):
        yield world.sample(np.random.default_rng([seed, stream, index]), image_size)


def _png(array: np.ndarray) -> dict[str, Any]:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG", compress_level=1)
    return {"bytes": buffer.getvalue(), "path": None}


def load_synthetic(
    num_images: int = 1000,
    seed: int = 0,
    image_size: ImageSize = 96,
    split: str | None = None,
    world: SyntheticWorld | None = None,
    with_caption: bool = True,
) -> datasets.Dataset:
    """Generate the synthetic world as an in-memory ``datasets.Dataset``.

    Columns: ``image`` (RGB), ``mask`` (mode "L", class index + 1, 0 = background), ``labels``
    (``List(ClassLabel)``) and ``caption``. Images are stored as PNG bytes (about 20 KB per 96-px image); for very
    large worlds iterate ``generate`` instead or ``save_to_disk`` the result.

    Args:
        num_images: how many images.
        seed: non-negative base seed; the same seed gives byte-identical images and masks.
        image_size: side length, or ``(height, width)``.
        split: split name (``None`` means ``"train"``); different names give different images.
        world: the world's rules; defaults to ``SyntheticWorld()``.
        with_caption: whether to include the ``caption`` column.

    Returns:
        A ``datasets.Dataset`` of ``num_images`` rows.
    """
    world = world or SyntheticWorld()
    labels = datasets.List(datasets.ClassLabel(names=world.class_names))
    features = {"image": datasets.Image(), "mask": datasets.Image(), "labels": labels,
                "caption": datasets.Value("string")}
    features = datasets.Features({k: v for k, v in features.items() if with_caption or k != "caption"})
    columns: dict[str, list] = {name: [] for name in features}
    for sample in generate(num_images, seed=seed, image_size=image_size, split=split, world=world):
        for name, values in columns.items():
            values.append(_png(sample[name]) if name in ("image", "mask") else sample[name])
    info = datasets.DatasetInfo(
        description=f"pole_hf synthetic world: {num_images} images, seed={seed}, size={image_size}, {world!r}",
        features=features,
    )
    return datasets.Dataset.from_dict(
        columns, features=features, info=info, split=datasets.NamedSplit(split or "train")
    )
