"""Stage 2 -> stage 3 without glue: pseudo masks as a `datasets.Dataset`, and the segmentation training set.

`generate_cams.py --output_dir DIR` saves `DIR/dataset` (`Dataset.save_to_disk`) with the columns every
`pole_hf.data` loader has: `image`, `labels` (list of `ClassLabel`) and `mask`, here the *pseudo* mask (0 background,
class index + 1, 255 ignore), plus `gt_mask` when the source dataset had ground truth and `image_id`.
"""

from __future__ import annotations

import os

import datasets
import numpy as np
import torch
from PIL import Image

from ..data.spec import ExampleReader, example_ids

PSEUDO_MASK_DATASET = "dataset"


def build_pseudo_mask_dataset(dataset: datasets.Dataset, mask_dir: str, stems: list[str]) -> datasets.Dataset:
    """The source `dataset` with its `mask` column replaced by the pseudo masks `mask_dir/{stem}.png`.

    Args:
        dataset: the dataset the masks were made for (`image`, `labels`, optional `mask`).
        mask_dir: folder of `{stem}.png` pseudo masks.
        stems: the mask file stem of every row of `dataset`, in order (`pole_hf.naming.output_stems` of the ids, as
            generate_cams.py names its files); rows without a mask file are left out.

    Returns:
        A dataset with `image_id`, `image`, `labels`, `mask` (pseudo) and `gt_mask` (when `dataset` had masks).
    """
    if len(stems) != len(dataset):
        raise ValueError(f"got {len(stems)} file stems for a dataset of {len(dataset)} rows; pass one per row")
    ids = example_ids(dataset)
    keep = [i for i, name in enumerate(stems) if os.path.isfile(os.path.join(mask_dir, f"{name}.png"))]
    rows = dataset.select(keep)
    if "mask" in rows.column_names:
        rows = rows.rename_column("mask", "gt_mask")
    drop = [c for c in rows.column_names if c not in ("image", "labels", "gt_mask", "image_id")]
    rows = rows.remove_columns(drop)
    if "image_id" not in rows.column_names:
        rows = rows.add_column("image_id", [ids[i] for i in keep])
    paths = [os.path.join(mask_dir, f"{stems[i]}.png") for i in keep]
    with_masks = rows.add_column("mask", [{"bytes": _read_bytes(p), "path": None} for p in paths])
    return with_masks.cast_column("mask", datasets.Image())


def _read_bytes(path: str) -> bytes:
    with open(path, "rb") as f:
        return f.read()


def save_pseudo_mask_dataset(dataset: datasets.Dataset, mask_dir: str, stems: list[str], output_dir: str,
                             description: str = "") -> datasets.Dataset:
    """[`build_pseudo_mask_dataset`] saved with `save_to_disk` into `output_dir/dataset` (replaced atomically)."""
    import shutil

    built = build_pseudo_mask_dataset(dataset, mask_dir, stems)
    if description:
        built.info.description = description
    final = os.path.join(output_dir, PSEUDO_MASK_DATASET)
    partial = final + ".partial"
    shutil.rmtree(partial, ignore_errors=True)
    built.save_to_disk(partial)
    shutil.rmtree(final, ignore_errors=True)
    os.replace(partial, final)
    return built


def load_pseudo_masks(path: str) -> datasets.Dataset:
    """The pseudo-mask dataset `generate_cams.py --output_dir path` wrote (`path` or `path/dataset`)."""
    folder = os.path.join(path, PSEUDO_MASK_DATASET)
    if not os.path.isdir(folder):
        if os.path.isfile(os.path.join(path, "dataset_info.json")):
            folder = path
        else:
            raise FileNotFoundError(f"{path!r} holds no pseudo-mask dataset ({PSEUDO_MASK_DATASET}/): run "
                                    f"examples/generate_cams.py --output_dir {path} first (it writes it at the end)")
    return datasets.load_from_disk(folder)


class SegmentationTrainSet(torch.utils.data.Dataset):
    """(pixel values, labels) pairs with random scale, crop and horizontal flip, normalised by the model's image
    processor. The augmentation of image `i` in epoch `e` is drawn from `default_rng([seed, e, i])`: it does not
    depend on the number of processes nor on where a resumed run restarts.

    Args:
        dataset: rows with `image` and `mask` (0 background, class + 1, 255 ignore).
        processor: the model's image processor (its rescale / normalisation; its resize is not used in training).
        crop_size: side of the square training crop; smaller images are padded (image 0, mask 255).
        scale_range: range of the random rescale factor.
        seed: the augmentation seed.
    """

    def __init__(self, dataset: datasets.Dataset, processor, crop_size: int, scale_range=(0.5, 2.0), seed: int = 0):
        if "mask" not in dataset.column_names:
            raise ValueError(f"the training set has no 'mask' column (columns: {dataset.column_names}); pass "
                             "--masks DIR (pseudo masks) or a dataset with ground-truth masks")
        self.reader = ExampleReader(dataset)
        self.processor, self.crop_size = processor, int(crop_size)
        self.scale_range, self.seed, self.epoch = scale_range, int(seed), 0
        self.skipped: list[str] = []

    def __len__(self) -> int:
        return len(self.reader)

    def __getitem__(self, index: int):
        example = self.reader[index]
        size = self.crop_size
        if example.image is None or example.mask is None:
            self.skipped.append(example.id)  # stands in as an all-ignored crop: counts no pixel
            return self.blank()
        rng = np.random.default_rng([self.seed, self.epoch, int(index)])
        image, mask = example.image, Image.fromarray(np.asarray(example.mask, dtype=np.uint8))
        scale = rng.uniform(*self.scale_range)
        width, height = max(1, round(image.width * scale)), max(1, round(image.height * scale))
        image = np.asarray(image.resize((width, height), Image.BILINEAR))
        mask = np.asarray(mask.resize((width, height), Image.NEAREST))
        pad_h, pad_w = max(size - height, 0), max(size - width, 0)
        if pad_h or pad_w:
            image = np.pad(image, ((0, pad_h), (0, pad_w), (0, 0)))
            mask = np.pad(mask, ((0, pad_h), (0, pad_w)), constant_values=255)
        top = int(rng.integers(0, image.shape[0] - size + 1))
        left = int(rng.integers(0, image.shape[1] - size + 1))
        image, mask = image[top:top + size, left:left + size], mask[top:top + size, left:left + size]
        if rng.random() < 0.5:
            image, mask = image[:, ::-1], mask[:, ::-1]
        return np.ascontiguousarray(image), np.ascontiguousarray(mask)

    def blank(self):
        """An all-ignored stand-in crop (black image, mask 255): it adds no pixel to the loss."""
        size = self.crop_size
        return np.zeros((size, size, 3), np.uint8), np.full((size, size), 255, np.uint8)

    def collate(self, batch):
        """Stack a batch: processor-normalised `pixel_values` `[B, 3, S, S]` and int64 `labels` `[B, S, S]`."""
        pixels = self.processor(images=[image for image, _ in batch], do_resize=False,
                                return_tensors="pt")["pixel_values"]
        labels = torch.from_numpy(np.stack([mask for _, mask in batch]).astype(np.int64))
        return pixels, labels
