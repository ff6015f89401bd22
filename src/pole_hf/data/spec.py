"""Dataset specs for scripts and the CLI (``synthetic``, ``voc:/path``, ``coco:ann.json,images/``,
``imagefolder:path``), and per-example reading that turns a bad image into a reported skip, not a crash."""

from __future__ import annotations

import io
from collections.abc import Iterator
from dataclasses import dataclass

import datasets
import numpy as np
from PIL import Image

from ..images import ImageInputError, load_image

SPEC_HELP = "synthetic | voc:/path/VOC2012 | coco:/path/instances.json,/path/images | imagefolder:/path/or/repo"
SYNTHETIC_SPLITS = ("train", "val", "validation", "test")
"""Split names a `synthetic` spec accepts (each its own random stream; a typo would silently be another stream)."""


def load_dataset_spec(spec: str, split: str = "train", num_images: int | None = None, seed: int = 0,
                      image_size: int = 96, class_names: list[str] | None = None) -> datasets.Dataset:
    """Load a dataset from a spec string (see `SPEC_HELP`); `num_images` keeps the first N examples and
    `class_names` fixes the label order of VOC, COCO and image-folder data (e.g. a model's classes)."""
    named = {"class_names": class_names} if class_names else {}
    from . import load_coco, load_imagefolder, load_synthetic, load_voc

    kind, _, arg = spec.partition(":")
    if kind == "synthetic":
        if split not in SYNTHETIC_SPLITS:
            raise ValueError(f"split {split!r} is not a split of the synthetic world: use one of {SYNTHETIC_SPLITS}")
        dataset = load_synthetic(num_images=num_images or 200, seed=seed, image_size=image_size, split=split)
    elif kind == "voc":
        dataset = load_voc(arg, split=split, **named)
    elif kind == "coco":
        annotation, _, image_dir = arg.partition(",")
        if not image_dir:
            raise ValueError(f"dataset spec {spec!r} needs 'coco:ANNOTATIONS.json,IMAGE_DIR'")
        dataset = load_coco(annotation, image_dir, with_masks=True, **named)
    elif kind == "imagefolder":
        dataset = load_imagefolder(arg, split=split, **named)
    else:
        raise ValueError(f"unknown dataset spec {spec!r}: use {SPEC_HELP}")
    if num_images is not None and kind != "synthetic":
        dataset = dataset.select(range(min(num_images, len(dataset))))
    return dataset


def class_names_of(dataset: datasets.Dataset) -> list[str]:
    """The class names of a dataset's `labels` column (a list of `ClassLabel`)."""
    feature = dataset.features["labels"]
    inner = getattr(feature, "feature", None)
    if inner is None or not hasattr(inner, "names"):
        raise ValueError("the dataset's 'labels' column is not a list of ClassLabel: load it with pole_hf.data")
    return list(inner.names)


@dataclass
class Example:
    """One example read safely: `image` is `None` and `error` says why when the image could not be read."""

    index: int
    id: str
    image: Image.Image | None
    labels: list[int]
    mask: np.ndarray | None
    error: str | None = None

    @property
    def targets(self) -> list[int]:
        """The image's unique class indices, ascending (its CAM targets)."""
        return sorted(set(self.labels))


def _read(value, name: str) -> Image.Image:
    """A dataset image as RGB in its stored pixel grid (no EXIF rotation: masks are drawn on that grid)."""
    if isinstance(value, Image.Image):
        return load_image(value, exif=False)
    if isinstance(value, dict):
        if value.get("bytes") is not None:
            try:
                return load_image(Image.open(io.BytesIO(value["bytes"])), exif=False)
            except (OSError, SyntaxError, ValueError) as err:
                raise ImageInputError(f"image {name!r} is corrupt or not an image: {err}") from err
        if value.get("path"):
            return load_image(value["path"], exif=False)
    raise ImageInputError(f"example {name!r} has no image data")


def example_ids(dataset: datasets.Dataset) -> list[str]:
    """Every example's id as an [`ExampleReader`] names it: the `image_id` column, else the zero-padded index."""
    column = dataset["image_id"] if "image_id" in dataset.column_names else [None] * len(dataset)
    return [_example_id(value, index) for index, value in enumerate(column)]


def _example_id(value, index: int) -> str:
    return str(value) if value not in (None, "") else f"{index:06d}"


class ExampleReader:
    """Random access to a dataset's examples with images decoded by `pole_hf.images` (documented conversions);
    an unreadable image comes back as `image=None` with the error, so dataset runs can log and skip it.

    The image and mask columns are cast to undecoded once, so reading never goes through datasets' own decoder.
    """

    def __init__(self, dataset: datasets.Dataset):
        labels = dataset.features.get("labels")
        names = getattr(getattr(labels, "feature", None), "names", None)
        self.num_classes = len(names) if names else None
        raw = dataset
        for column in ("image", "mask"):
            if column in raw.features and isinstance(raw.features[column], datasets.Image):
                raw = raw.cast_column(column, datasets.Image(decode=False))
        self.raw = raw

    def __len__(self) -> int:
        return len(self.raw)

    def __getitem__(self, index: int) -> Example:
        item = self.raw[int(index)]
        image_value = item["image"]
        name = item.get("image_id") or (image_value.get("path") if isinstance(image_value, dict) else None)
        example_id = _example_id(item.get("image_id"), int(index))
        try:
            image = _read(image_value, name or example_id)
            mask = None if item.get("mask") is None else _read_mask(item["mask"], image.size, self.num_classes,
                                                                     _source_name(item["mask"], example_id))
        except ImageInputError as err:
            return Example(int(index), example_id, None, list(item["labels"]), None, str(err))
        return Example(int(index), example_id, image, list(item["labels"]), mask)


def iter_examples(dataset: datasets.Dataset, indices=None) -> Iterator[Example]:
    """Yield the examples of `dataset` (or of `indices`) read by an [`ExampleReader`]."""
    reader = ExampleReader(dataset)
    for index in (range(len(reader)) if indices is None else indices):
        yield reader[index]


def _source_name(value, fallback: str) -> str:
    return (value.get("path") if isinstance(value, dict) else None) or f"the mask of {fallback}"


def _read_mask(value, size: tuple[int, int], num_classes: int | None, name: str) -> np.ndarray:
    """A mask as class indices, checked against its image: one channel, the image's size, values in
    0..num_classes or 255. A bad mask raises `ImageInputError` naming it (the example is then skipped)."""
    try:
        if isinstance(value, Image.Image):
            mask = value
        else:
            mask = Image.open(io.BytesIO(value["bytes"]) if value.get("bytes") is not None else value["path"])
        mask.load()
    except (OSError, SyntaxError, ValueError) as err:
        raise ImageInputError(f"mask {name!r} is corrupt or not an image: {err}") from err
    if mask.mode not in ("L", "P", "1", "I", "I;16"):
        raise ImageInputError(f"mask {name!r} is a {mask.mode} image: masks must be single-channel class indices "
                              "(palette or grayscale PNG)")
    if mask.size != size:
        raise ImageInputError(f"mask {name!r} is {mask.size[0]}x{mask.size[1]} but its image is {size[0]}x{size[1]}")
    array = np.asarray(mask).astype(np.int64)
    if num_classes is not None:
        bad = np.setdiff1d(np.unique(array), [*range(num_classes + 1), 255])
        if bad.size:
            raise ImageInputError(f"mask {name!r} has values {bad[:5].tolist()} outside 0..{num_classes} and 255 "
                                  "(class index + 1, 0 background, 255 ignore)")
    return array.astype(np.uint8)
