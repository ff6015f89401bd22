"""PASCAL VOC 2012 (and its SBD "aug" extension) from a local devkit folder, as a ``datasets.Dataset``.

Layout read (``root`` is the ``VOC2012`` folder, or the ``VOCdevkit`` folder above it)::

    JPEGImages/<id>.jpg
    Annotations/<id>.xml                       image-level labels: every <object><name>, difficult ones included
                                               (without the xml, the classes present in the image's mask)
    SegmentationClass/<id>.png                 palette PNG: pixel values are class index + 1, 0 background, 255 ignore
    SegmentationClassAug/<id>.png              with use_aug=True (SBD masks, single channel)
    ImageSets/Segmentation/<split>.txt         one id per line; with use_aug=True, split "train" reads train_aug.txt

Images and masks are stored as file paths and decoded lazily by the ``datasets.Image`` feature. A mask whose size,
mode or values are wrong does not stop the load: `pole_hf.data.spec.ExampleReader` reports that example as
skipped (naming the file) when a run reads it, and ``check_sizes`` logs the size mismatches up front.
"""

from __future__ import annotations

import logging
import os
import xml.etree.ElementTree as ET
from collections.abc import Sequence

import datasets
import numpy as np
from PIL import Image

from ..vocab import VOC_CLASSES

logger = logging.getLogger(__name__)


def _require_dir(path: str, what: str) -> str:
    if not os.path.isdir(path):
        raise FileNotFoundError(f"{what} not found: {path} does not exist or is not a folder; check the VOC root")
    return path


def _find_voc_root(root: str) -> str:
    root = os.path.expanduser(os.fspath(root))
    _require_dir(root, "VOC root")
    nested = os.path.join(root, "VOC2012")
    if not os.path.isdir(os.path.join(root, "JPEGImages")) and os.path.isdir(nested):
        return nested
    return root


def _split_file(root: str, split: str, use_aug: bool) -> str:
    folder = _require_dir(os.path.join(root, "ImageSets", "Segmentation"), "VOC split folder")
    if use_aug and split == "train":
        for candidate in (os.path.join(folder, "train_aug.txt"),
                          os.path.join(root, "ImageSets", "SegmentationAug", "train_aug.txt")):
            if os.path.isfile(candidate):
                return candidate
        raise FileNotFoundError(
            f"use_aug=True needs {os.path.join(folder, 'train_aug.txt')}, which is missing: add the SBD train_aug list "
            "or call load_voc(..., use_aug=False)"
        )
    path = os.path.join(folder, f"{split}.txt")
    if not os.path.isfile(path):
        available = sorted(name[:-4] for name in os.listdir(folder) if name.endswith(".txt"))
        raise FileNotFoundError(f"VOC split file {path} is missing: use one of the splits {available}")
    return path


def _read_ids(path: str) -> list[str]:
    """Image ids from a split file; also accepts the "/JPEGImages/<id>.jpg /SegmentationClassAug/<id>.png" form."""
    ids = []
    with open(path, encoding="utf-8") as handle:
        for line in handle:
            if line.strip():
                ids.append(os.path.splitext(os.path.basename(line.split()[0]))[0])
    return ids


def _read_labels(xml_path: str, class_index: dict[str, int]) -> list[int]:
    """Sorted, deduplicated class indices of every ``<object><name>`` in a VOC annotation file."""
    if not os.path.isfile(xml_path):
        raise FileNotFoundError(f"VOC annotation {xml_path} is missing: every listed image needs its Annotations xml")
    try:
        tree = ET.parse(xml_path)
    except ET.ParseError as error:
        raise ValueError(f"VOC annotation {xml_path} is not valid XML ({error}): restore it") from error
    labels = set()
    for name in tree.getroot().iterfind("object/name"):
        label = (name.text or "").strip()
        if label not in class_index:
            raise ValueError(f"Label {label!r} in {xml_path} is not in class_names: add it or pass the matching list")
        labels.add(class_index[label])
    return sorted(labels)


def _labels_from_mask(mask_path: str, num_classes: int) -> list[int]:
    """Class indices present in a mask (values 1..num_classes; 0 background and 255 ignore left out)."""
    with Image.open(mask_path) as mask:
        if mask.mode not in ("L", "P"):  # an RGB mask's luminance is not its class ids (the readers refuse it too)
            raise ValueError(f"VOC mask {mask_path} is a {mask.mode} image: masks must be single-channel class "
                             "indices ('P' as the devkit ships them, or 'L'); convert it with "
                             "pole_hf.masks.image_to_mask")
        values = np.unique(np.asarray(mask))
    return [int(v) - 1 for v in values if 1 <= v <= num_classes]


def load_voc(
    root: str | os.PathLike,
    split: str = "train",
    use_aug: bool = False,
    class_names: Sequence[str] = VOC_CLASSES,
    check_sizes: bool = True,
) -> datasets.Dataset:
    """Load a split of a local PASCAL VOC 2012 devkit.

    Args:
        root: the ``VOC2012`` folder (or the ``VOCdevkit`` folder holding it).
        split: A split file name in ``ImageSets/Segmentation`` (``"train"``, ``"val"``, ``"trainval"``, ...).
        use_aug: Read masks from ``SegmentationClassAug`` and, for ``split="train"``, ids from ``train_aug.txt``.
        class_names: foreground class names in label order (mask value = index + 1).
        check_sizes: Log the masks whose size differs from their image's (reads only the file headers); such
            examples are skipped, and counted, by the runs that read them.

    Returns:
        A ``datasets.Dataset`` with ``image``, ``labels`` (``List(ClassLabel)``), ``image_id`` and, when at least one
        image of the split has a mask, ``mask`` (``None`` for images without one).
    """
    root = _find_voc_root(root)
    image_dir = _require_dir(os.path.join(root, "JPEGImages"), "VOC image folder")
    annotation_dir = os.path.join(root, "Annotations")
    mask_dir = os.path.join(root, "SegmentationClassAug" if use_aug else "SegmentationClass")
    _require_dir(mask_dir, "VOC augmented mask folder (use_aug=True)" if use_aug else "VOC mask folder")
    class_index = {name: i for i, name in enumerate(class_names)}

    images, masks, labels, ids, mismatched = [], [], [], [], []
    for image_id in _read_ids(_split_file(root, split, use_aug)):
        image_path = os.path.join(image_dir, f"{image_id}.jpg")
        if not os.path.isfile(image_path):
            raise FileNotFoundError(f"VOC image {image_path} is missing but listed in the {split!r} split")
        mask_path = os.path.join(mask_dir, f"{image_id}.png")
        if not os.path.isfile(mask_path):
            mask_path = None
        elif check_sizes:
            try:
                with Image.open(image_path) as image, Image.open(mask_path) as mask:
                    if image.size != mask.size:
                        mismatched.append(f"{mask_path} ({mask.size[0]}x{mask.size[1]}, image "
                                          f"{image.size[0]}x{image.size[1]})")
            except OSError:
                pass  # unreadable files are reported per example when a run reads them
        xml_path = os.path.join(annotation_dir, f"{image_id}.xml")
        if os.path.isfile(xml_path):
            labels.append(_read_labels(xml_path, class_index))
        elif mask_path is not None:
            labels.append(_labels_from_mask(mask_path, len(class_names)))
        else:
            raise FileNotFoundError(f"VOC image {image_id} has neither {xml_path} nor a mask in {mask_dir}: its "
                                    "labels are unknown; restore one of them or drop the id from the split file")
        images.append(image_path)
        masks.append(mask_path)
        ids.append(image_id)
    if mismatched:
        logger.warning("%d VOC mask(s) differ in size from their images and will be skipped: %s", len(mismatched),
                       "; ".join(mismatched[:5]) + (" ..." if len(mismatched) > 5 else ""))

    columns = {"image": images, "mask": masks, "labels": labels, "image_id": ids}
    labels_feature = datasets.List(datasets.ClassLabel(names=list(class_names)))
    features = {"image": datasets.Image(), "mask": datasets.Image(), "labels": labels_feature,
                "image_id": datasets.Value("string")}
    if all(path is None for path in masks):
        del columns["mask"], features["mask"]
    return datasets.Dataset.from_dict(columns, features=datasets.Features(features), split=datasets.NamedSplit(split))
