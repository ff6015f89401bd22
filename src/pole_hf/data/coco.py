"""COCO-style instance annotations (``instances_*.json``) as a ``datasets.Dataset`` of image-level labels and masks.

Category ids (sparse in COCO: 1..90 for 80 classes) are mapped to contiguous class indices in the order of
``class_names``; by default the categories sorted by id. With ``with_masks=True`` every annotation is rasterised into a
single class mask (pixel value = class index + 1, 0 = background): polygons with ``PIL.ImageDraw`` (no anti-aliasing),
uncompressed and compressed RLE (crowd regions) decoded here without ``pycocotools``. Larger annotations are drawn
first so smaller ones stay visible where they overlap; crowd regions are painted with their class like the others.
Masks are built in memory as PNG bytes; images stay file paths decoded lazily by ``datasets.Image``. An annotation
whose polygons all have fewer than 3 points has no region: it is skipped (label and region), and the skipped ones are
counted in one warning. An image whose file size disagrees with the JSON, or that cannot be read, does not stop the
load: the runs that read it skip it by name (``pole_hf.data.spec.ExampleReader``).
"""

from __future__ import annotations

import io
import json
import logging
import os
from collections.abc import Sequence
from typing import Any

import datasets
import numpy as np
from PIL import Image, ImageDraw

logger = logging.getLogger(__name__)


def _degenerate_polygons(annotation: dict) -> bool:
    """True for a polygon annotation none of whose polygons has 3 points (it would paint nothing)."""
    segmentation = annotation.get("segmentation")
    return isinstance(segmentation, list) and not any(len(polygon) >= 6 for polygon in segmentation)


def _rle_counts_from_string(counts: str) -> list[int]:
    """Decode COCO's compressed RLE string (pycocotools ``rleFrString``) into run lengths."""
    runs: list[int] = []
    position = 0
    while position < len(counts):
        value, shift, more = 0, 0, True
        while more:
            char = ord(counts[position]) - 48
            value |= (char & 0x1F) << (5 * shift)
            more = bool(char & 0x20)
            position += 1
            shift += 1
            if not more and char & 0x10:
                value |= -1 << (5 * shift)
        if len(runs) > 2:
            value += runs[-2]
        runs.append(value)
    return runs


def _decode_rle(segmentation: dict[str, Any]) -> np.ndarray:
    """Binary ``(height, width)`` mask of an RLE segmentation (runs alternate 0/1 in column-major order)."""
    height, width = segmentation["size"]
    counts = segmentation["counts"]
    runs = _rle_counts_from_string(counts) if isinstance(counts, str) else list(counts)
    values = np.arange(len(runs)) % 2
    flat = np.repeat(values.astype(bool), runs)
    if flat.size != height * width:
        raise ValueError(f"RLE runs cover {flat.size} pixels but its size is {height}x{width}: fix the annotation")
    return flat.reshape(width, height).T


def _annotation_region(annotation: dict, height: int, width: int, where: str) -> np.ndarray:
    """Binary ``(height, width)`` region of one annotation (polygons or RLE)."""
    segmentation = annotation.get("segmentation")
    if isinstance(segmentation, dict):
        if list(segmentation["size"]) != [height, width]:
            raise ValueError(f"Annotation {annotation.get('id')} in {where} has RLE size {segmentation['size']} "
                             f"but its image is {height}x{width}: fix the annotation or the image entry")
        return _decode_rle(segmentation)
    canvas = Image.new("1", (width, height), 0)
    draw = ImageDraw.Draw(canvas)
    for polygon in segmentation or []:
        if len(polygon) >= 6:
            draw.polygon([float(c) for c in polygon], fill=1)
    return np.array(canvas)


def _rasterise(
    annotations: list[dict], category_to_class: dict[int, int], height: int, width: int, where: str
) -> np.ndarray:
    """Class mask of an image's annotations, larger ones drawn first."""
    mask = np.zeros((height, width), dtype=np.uint8)
    for annotation in sorted(annotations, key=lambda a: -float(a.get("area", 0.0))):
        mask[_annotation_region(annotation, height, width, where)] = category_to_class[annotation["category_id"]] + 1
    return mask


def _png(array: np.ndarray) -> dict[str, Any]:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG", compress_level=1)
    return {"bytes": buffer.getvalue(), "path": None}


def _read_instances(annotation_file: str, image_dir: str) -> dict:
    """The instances JSON, checked: the file and folder exist and it has images, annotations and categories."""
    if not os.path.isfile(annotation_file):
        raise FileNotFoundError(f"COCO annotation file {annotation_file} does not exist: pass the instances JSON path")
    if not os.path.isdir(image_dir):
        raise FileNotFoundError(f"COCO image folder {image_dir} does not exist: pass the folder holding the images")
    with open(annotation_file, encoding="utf-8") as handle:
        coco = json.load(handle)
    missing = [key for key in ("images", "annotations", "categories") if key not in coco]
    if missing:
        raise ValueError(f"{annotation_file} lacks the keys {missing}: it is not a COCO instances file")
    return coco


def _annotations_by_image(coco: dict, categories: list[dict], category_to_class: dict, names: list[str],
                          annotation_file: str) -> dict[Any, list[dict]]:
    """Each image id's usable annotations; degenerate polygons are skipped and named in a warning, an unknown
    category or image id raises."""
    by_image: dict[Any, list[dict]] = {image["id"]: [] for image in coco["images"]}
    degenerate = [a.get("id") for a in coco["annotations"] if _degenerate_polygons(a)]
    if degenerate:
        logger.warning("%s: skipped %d annotation(s) whose polygons have fewer than 3 points (no region): ids %s",
                       annotation_file, len(degenerate), degenerate[:10])
    for annotation in coco["annotations"]:
        if _degenerate_polygons(annotation):
            continue
        category = annotation["category_id"]
        if category not in category_to_class:
            name = next((c["name"] for c in categories if c["id"] == category), None)
            raise ValueError(f"Annotation {annotation.get('id')} in {annotation_file} has category "
                             f"{name or category!r}, which is not in class_names {names}: add it or drop it")
        if annotation["image_id"] not in by_image:
            raise ValueError(f"Annotation {annotation.get('id')} in {annotation_file} refers to unknown image id "
                             f"{annotation['image_id']}: add the image to 'images'")
        by_image[annotation["image_id"]].append(annotation)
    return by_image


def load_coco(
    annotation_file: str | os.PathLike,
    image_dir: str | os.PathLike,
    class_names: Sequence[str] | None = None,
    with_masks: bool = False,
) -> datasets.Dataset:
    """Load a COCO-style instances JSON with its image folder.

    Args:
        annotation_file: path to the instances JSON (``images``, ``annotations``, ``categories``).
        image_dir: folder holding the images named by ``images[].file_name``.
        class_names: class names in label order; defaults to the JSON's categories sorted by id. Every category that
            an annotation uses must be in it.
        with_masks: rasterise segmentations into a ``mask`` column (class index + 1, 0 = background).

    Returns:
        A ``datasets.Dataset`` with ``image``, ``labels`` (``List(ClassLabel)``), ``image_id`` and, with
        ``with_masks=True``, ``mask``. Images without annotations are kept with empty labels.
    """
    annotation_file, image_dir = os.fspath(annotation_file), os.fspath(image_dir)
    coco = _read_instances(annotation_file, image_dir)
    categories = sorted(coco["categories"], key=lambda c: c["id"])
    names = [c["name"] for c in categories] if class_names is None else list(class_names)
    if with_masks and len(names) > 254:
        raise ValueError(f"{len(names)} classes do not fit an 8-bit mask: use at most 254 classes with masks")
    class_index = {name: i for i, name in enumerate(names)}
    category_to_class = {c["id"]: class_index[c["name"]] for c in categories if c["name"] in class_index}
    by_image = _annotations_by_image(coco, categories, category_to_class, names, annotation_file)

    columns: dict[str, list] = {"image": [], "labels": [], "image_id": []}
    if with_masks:
        columns["mask"] = []
    for entry in coco["images"]:
        path = os.path.join(image_dir, entry["file_name"])
        if not os.path.isfile(path):
            raise FileNotFoundError(f"Image {path} listed in {annotation_file} does not exist: check image_dir")
        annotations = by_image[entry["id"]]
        columns["image"].append(path)
        columns["labels"].append(sorted({category_to_class[a["category_id"]] for a in annotations}))
        columns["image_id"].append(entry["id"])
        if with_masks:
            height, width = int(entry["height"]), int(entry["width"])
            columns["mask"].append(_png(_rasterise(annotations, category_to_class, height, width, annotation_file)))

    id_type = "int64" if all(isinstance(i, int) for i in columns["image_id"]) else "string"
    if id_type == "string":
        columns["image_id"] = [str(i) for i in columns["image_id"]]
    features = {"image": datasets.Image(), "labels": datasets.List(datasets.ClassLabel(names=names)),
                "image_id": datasets.Value(id_type)}
    if with_masks:
        features["mask"] = datasets.Image()
    return datasets.Dataset.from_dict(columns, features=datasets.Features(features))
