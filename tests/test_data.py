"""Loaders on tiny fabricated datasets: a VOC devkit, a COCO instances file, an imagefolder with metadata."""

from __future__ import annotations

import json
import os
import re

import datasets
import numpy as np
import pytest
from PIL import Image

from pole_hf.data import load_coco, load_imagefolder, load_voc
from pole_hf.data.spec import Example
from pole_hf.vocab import VOC_CLASSES

DOG, PERSON, CAT = VOC_CLASSES.index("dog"), VOC_CLASSES.index("person"), VOC_CLASSES.index("cat")
A, B, C = "2007_000032", "2007_000039", "2008_000123"


def voc_palette() -> list[int]:
    palette = []
    for index in range(256):
        r = g = b = 0
        c = index
        for bit in range(8):
            r |= ((c >> 0) & 1) << (7 - bit)
            g |= ((c >> 1) & 1) << (7 - bit)
            b |= ((c >> 2) & 1) << (7 - bit)
            c >>= 3
        palette += [r, g, b]
    return palette


def write_palette_png(path: str, indices: np.ndarray) -> None:
    image = Image.fromarray(indices.astype(np.uint8), mode="P")
    image.putpalette(voc_palette())
    image.save(path)


def write_xml(path: str, names: list[str]) -> None:
    objects = "".join(f"<object><name>{n}</name><difficult>{i % 2}</difficult></object>" for i, n in enumerate(names))
    with open(path, "w") as handle:
        handle.write(f"<annotation><filename>{os.path.basename(path)}</filename>{objects}</annotation>")


def mask_of(*regions: tuple[int, slice, slice], size=(12, 16)) -> np.ndarray:
    mask = np.zeros(size, dtype=np.uint8)
    for value, rows, cols in regions:
        mask[rows, cols] = value
    return mask


MASKS = {
    A: mask_of((DOG + 1, slice(2, 6), slice(3, 9)), (PERSON + 1, slice(7, 11), slice(0, 5)),
               (255, slice(6, 7), slice(0, 16))),
    B: mask_of((CAT + 1, slice(0, 12), slice(8, 16))),
    C: mask_of((PERSON + 1, slice(1, 4), slice(1, 4))),
}
LABELS = {A: ["person", "dog", "dog"], B: ["cat", "cat"], C: ["person"]}


@pytest.fixture
def voc_root(tmp_path):
    root = tmp_path / "VOCdevkit" / "VOC2012"
    for folder in ("JPEGImages", "Annotations", "SegmentationClass", "SegmentationClassAug", "ImageSets/Segmentation"):
        (root / folder).mkdir(parents=True)
    for image_id, mask in MASKS.items():
        Image.fromarray(np.full(mask.shape + (3,), 128, np.uint8)).save(root / "JPEGImages" / f"{image_id}.jpg")
        write_xml(str(root / "Annotations" / f"{image_id}.xml"), LABELS[image_id])
        Image.fromarray(mask, mode="L").save(root / "SegmentationClassAug" / f"{image_id}.png")
        if image_id != C:  # C has only an SBD mask
            write_palette_png(str(root / "SegmentationClass" / f"{image_id}.png"), mask)
    sets = root / "ImageSets" / "Segmentation"
    (sets / "train.txt").write_text(f"{A}\n{C}\n")
    (sets / "val.txt").write_text(f"{B}\n")
    (sets / "train_aug.txt").write_text(f"/JPEGImages/{A}.jpg /SegmentationClassAug/{A}.png\n{C}\n\n")
    return root


def test_voc_train_labels_and_palette_masks(voc_root):
    ds = load_voc(voc_root)
    assert ds.column_names == ["image", "mask", "labels", "image_id"]
    assert ds.features["labels"].feature.names == list(VOC_CLASSES)
    assert ds["image_id"] == [A, C]
    assert ds["labels"] == [sorted([DOG, PERSON]), [PERSON]]  # deduplicated, difficult kept, class order
    np.testing.assert_array_equal(np.array(ds[0]["mask"]), MASKS[A])  # palette indices, not colours
    assert ds[0]["mask"].mode == "P"
    assert ds[1]["mask"] is None  # no SegmentationClass mask for C
    assert ds[0]["image"].size == (16, 12)


def test_voc_images_are_lazy_paths(voc_root):
    raw = load_voc(voc_root).cast_column("image", datasets.Image(decode=False))[0]["image"]
    assert raw["bytes"] is None and raw["path"].endswith(f"{A}.jpg")


def test_voc_val_and_devkit_parent(voc_root):
    ds = load_voc(voc_root.parent, split="val")
    assert ds["image_id"] == [B] and ds["labels"] == [[CAT]]
    np.testing.assert_array_equal(np.array(ds[0]["mask"]), MASKS[B])


def test_voc_aug(voc_root):
    ds = load_voc(voc_root, use_aug=True)
    assert ds["image_id"] == [A, C]
    for row in ds:
        np.testing.assert_array_equal(np.array(row["mask"]), MASKS[row["image_id"]])


def test_voc_split_without_masks_has_no_mask_column(voc_root):
    (voc_root / "ImageSets" / "Segmentation" / "test.txt").write_text(f"{C}\n")
    assert "mask" not in load_voc(voc_root, split="test").column_names


def test_voc_custom_class_list(voc_root):
    ds = load_voc(voc_root, split="val", class_names=["cat", "dog", "person"])
    assert ds["labels"] == [[0]]


@pytest.mark.parametrize(
    ("break_it", "error", "pattern"),
    [
        (lambda r: None, FileNotFoundError, "nowhere"),
        (lambda r: os.rename(r / "Annotations", r / "Gone"), FileNotFoundError, "Annotations"),
        (lambda r: os.rename(r / "JPEGImages", r / "Gone"), FileNotFoundError, "JPEGImages"),
        (lambda r: os.remove(r / "JPEGImages" / f"{A}.jpg"), FileNotFoundError, f"{A}.jpg"),
        (lambda r: write_xml(str(r / "Annotations" / f"{A}.xml"), ["unicorn"]), ValueError, rf"'unicorn'.*{A}\.xml"),
    ],
    ids=["root", "annotations", "images", "image-file", "unknown-label"],
)
def test_voc_errors(voc_root, break_it, error, pattern):
    break_it(voc_root)
    root = voc_root / "nowhere" if pattern == "nowhere" else voc_root
    with pytest.raises(error, match=pattern):
        load_voc(root)


def test_voc_aug_errors(voc_root):
    with pytest.raises(FileNotFoundError, match="sand"):
        load_voc(voc_root, split="sand")
    os.remove(voc_root / "ImageSets" / "Segmentation" / "train_aug.txt")
    with pytest.raises(FileNotFoundError, match="train_aug.txt"):
        load_voc(voc_root, use_aug=True)
    os.rename(voc_root / "SegmentationClassAug", voc_root / "Gone")
    with pytest.raises(FileNotFoundError, match="SegmentationClassAug"):
        load_voc(voc_root, split="val", use_aug=True)


def rle_string(counts: list[int]) -> str:
    """pycocotools' rleToString, to test the decoder on compressed RLE."""
    chars = []
    for i, x in enumerate(counts):
        x = x - counts[i - 2] if i > 2 else x
        more = True
        while more:
            c = x & 0x1F
            x >>= 5
            more = x != -1 if c & 0x10 else x != 0
            chars.append(chr((c | 0x20 if more else c) + 48))
    return "".join(chars)


def rle_counts(mask: np.ndarray) -> list[int]:
    flat = mask.T.reshape(-1).astype(np.int8)
    edges = np.flatnonzero(np.diff(np.concatenate([[0], flat, [1 - flat[-1]]])))
    return np.diff(np.concatenate([[0], edges])).tolist()


@pytest.fixture
def coco(tmp_path):
    (tmp_path / "images").mkdir()
    for name in ("a.jpg", "b.jpg", "c.jpg"):
        Image.new("RGB", (10, 8)).save(tmp_path / "images" / name)
    kite = np.zeros((8, 10), bool)
    kite[2:7, 5:9] = True
    car = np.zeros((8, 10), bool)
    car[0:2, 0:3] = True
    data = {
        "images": [{"id": 1, "file_name": "a.jpg", "height": 8, "width": 10},
                   {"id": 7, "file_name": "b.jpg", "height": 8, "width": 10},
                   {"id": 9, "file_name": "c.jpg", "height": 8, "width": 10}],
        "categories": [{"id": 9, "name": "kite"}, {"id": 1, "name": "cat"}, {"id": 5, "name": "dog"}],
        "annotations": [
            {"id": 1, "image_id": 1, "category_id": 5, "iscrowd": 0, "area": 30.0,
             "segmentation": [[0, 0, 5, 0, 5, 4, 0, 4]]},
            {"id": 2, "image_id": 1, "category_id": 1, "iscrowd": 0, "area": 6.0,
             "segmentation": [[2, 2, 3, 2, 3, 4, 2, 4]]},
            {"id": 3, "image_id": 7, "category_id": 9, "iscrowd": 1, "area": 20.0,
             "segmentation": {"counts": rle_counts(kite), "size": [8, 10]}},
            {"id": 4, "image_id": 7, "category_id": 1, "iscrowd": 1, "area": 6.0,
             "segmentation": {"counts": rle_string(rle_counts(car)), "size": [8, 10]}},
        ],
    }
    path = tmp_path / "instances.json"
    path.write_text(json.dumps(data))
    return path, tmp_path / "images"


def test_coco_labels_and_masks(coco):
    path, images = coco
    ds = load_coco(path, images, with_masks=True)
    assert ds.features["labels"].feature.names == ["cat", "dog", "kite"]  # categories in id order
    assert ds["labels"] == [[0, 1], [0, 2], []]
    assert ds["image_id"] == [1, 7, 9]
    expected = np.zeros((8, 10), np.uint8)
    expected[0:5, 0:6] = 2  # dog polygon (inclusive corners), drawn first: larger area
    expected[2:5, 2:4] = 1  # cat on top
    np.testing.assert_array_equal(np.array(ds[0]["mask"]), expected)
    expected = np.zeros((8, 10), np.uint8)
    expected[2:7, 5:9] = 3  # uncompressed RLE
    expected[0:2, 0:3] = 1  # compressed RLE
    np.testing.assert_array_equal(np.array(ds[1]["mask"]), expected)
    assert not np.array(ds[2]["mask"]).any()
    assert "mask" not in load_coco(path, images).column_names


def test_coco_class_names_and_errors(coco, tmp_path):
    path, images = coco
    assert load_coco(path, images, class_names=["kite", "dog", "cat", "bus"])["labels"] == [[1, 2], [0, 2], []]
    with pytest.raises(ValueError, match="'kite'.*not in class_names"):
        load_coco(path, images, class_names=["cat", "dog"])
    with pytest.raises(FileNotFoundError, match="missing.json"):
        load_coco(tmp_path / "missing.json", images)
    Image.new("RGB", (11, 8)).save(images / "a.jpg")  # the JSON says 10x8: skipped when read, not fatal
    from pole_hf.data.spec import iter_examples

    first = next(iter_examples(load_coco(path, images, with_masks=True)))
    assert first.image is None and "is 10x8 but its image is 11x8" in first.error
    os.remove(images / "b.jpg")
    with pytest.raises(FileNotFoundError, match=r"b\.jpg"):
        load_coco(path, images)


@pytest.fixture
def folder(tmp_path):
    rows = [("0.png", ["dog", "cat"]), ("1.png", []), ("2.png", ["cat", "cat"])]
    with open(tmp_path / "metadata.jsonl", "w") as handle:
        for i, (name, labels) in enumerate(rows):
            Image.new("RGB", (6, 4), (i * 40, 0, 0)).save(tmp_path / name)
            Image.new("L", (6, 4), i).save(tmp_path / f"m{i}.png")
            handle.write(json.dumps({"file_name": name, "mask_file_name": f"m{i}.png", "tags": labels}) + "\n")
    return tmp_path


def test_imagefolder_jsonl_lists(folder):
    ds = load_imagefolder(folder, label_column="tags")
    assert ds.features["labels"].feature.names == ["cat", "dog"]
    assert sorted(ds["labels"], key=len) == [[], [0], [0, 1]]
    assert "tags" not in ds.column_names and "mask" in ds.column_names
    ds = load_imagefolder(folder, label_column="tags", class_names=["dog", "cat", "bird"])
    assert ds.features["labels"].feature.names == ["dog", "cat", "bird"]
    with pytest.raises(ValueError, match=r"'dog'.*known classes are \['cat'\]"):
        load_imagefolder(folder, label_column="tags", class_names=["cat"])
    with pytest.raises(ValueError, match="no label column 'labels'"):
        load_imagefolder(folder)


def test_imagefolder_csv_strings(tmp_path):
    Image.new("RGB", (6, 4)).save(tmp_path / "0.png")
    Image.new("RGB", (6, 4)).save(tmp_path / "1.png")
    (tmp_path / "metadata.csv").write_text("file_name,labels\n0.png,dog; cat\n1.png,sheep\n")
    ds = load_imagefolder(tmp_path)
    assert ds.features["labels"].feature.names == ["cat", "dog", "sheep"]
    assert sorted(ds["labels"]) == [[0, 1], [2]]


def test_imagefolder_missing_path(tmp_path):
    with pytest.raises(FileNotFoundError, match="nowhere"):
        load_imagefolder(str(tmp_path / "nowhere"))


@pytest.mark.parametrize(("bad_mask", "pattern"), [
    (lambda path: write_palette_png(path, np.zeros((5, 5))), r"is 5x5 but its image is 16x12"),
    (lambda path: write_palette_png(path, np.full((12, 16), 50)), r"values \[50\] outside 0..20 and 255"),
    (lambda path: Image.fromarray(np.zeros((12, 16, 3), np.uint8)).save(path), r"is a RGB image"),
    (lambda path: open(path, "wb").write(b"garbage"), r"corrupt or not an image"),
], ids=["size", "value-50", "rgb", "corrupt"])
def test_voc_bad_mask_is_skipped_by_name_not_fatal(voc_root, bad_mask, pattern):
    from pole_hf.data.spec import iter_examples

    bad_mask(str(voc_root / "SegmentationClass" / f"{A}.png"))
    dataset = load_voc(voc_root, split="train")
    examples = list(iter_examples(dataset))
    assert [e.id for e in examples] == [A, C]
    bad = examples[0]
    assert bad.image is None and bad.mask is None and re.search(pattern, bad.error) and f"{A}.png" in bad.error
    assert examples[1].image is not None


def test_voc_labels_from_masks_without_annotations(voc_root):
    import shutil

    shutil.rmtree(voc_root / "Annotations")
    dataset = load_voc(voc_root, split="val")
    assert dataset["labels"] == [[CAT]]
    train = load_voc(voc_root, split="train", use_aug=True)
    assert train["labels"] == [sorted([DOG, PERSON]), [PERSON]]


def test_voc_rgb_mask_without_annotations_is_refused_by_name(voc_root):
    import shutil

    from pole_hf.masks import mask_to_image

    shutil.rmtree(voc_root / "Annotations")
    path = voc_root / "SegmentationClass" / f"{B}.png"
    with Image.open(path) as mask:
        coloured = np.asarray(mask_to_image(np.asarray(mask)).convert("RGB"))  # VOC colours: luminance is not an id
    Image.fromarray(coloured).save(path)
    with pytest.raises(ValueError, match=rf"{B}.png is a RGB image: masks must be single-channel"):
        load_voc(voc_root, split="val")


def test_dataset_images_keep_their_stored_grid_beside_masks(tmp_path):
    """An EXIF-rotated JPEG beside an unrotated mask: both stay in the stored pixel grid (aligned)."""
    from pole_hf.data.spec import iter_examples

    root = tmp_path / "VOC2012"
    for folder in ("JPEGImages", "Annotations", "SegmentationClass", "ImageSets/Segmentation"):
        (root / folder).mkdir(parents=True)
    pixels = np.zeros((12, 16, 3), np.uint8)
    pixels[:, :8] = 255  # left half white
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 CW to display"
    Image.fromarray(pixels).save(root / "JPEGImages" / f"{A}.jpg", exif=exif, quality=100)
    write_palette_png(str(root / "SegmentationClass" / f"{A}.png"), mask_of((DOG + 1, slice(0, 12), slice(0, 8))))
    write_xml(str(root / "Annotations" / f"{A}.xml"), ["dog"])
    (root / "ImageSets" / "Segmentation" / "train.txt").write_text(f"{A}\n")
    example = next(iter_examples(load_voc(root)))
    assert example.error is None and example.image.size == (16, 12)
    image = np.asarray(example.image.convert("L")) > 128
    assert (image == (example.mask == DOG + 1)).mean() > 0.95  # the white half is the dog half


def test_coco_polygon_under_three_points_is_skipped_and_counted(coco, caplog):
    path, images = coco
    data = json.loads(path.read_text())
    data["annotations"].append({"id": 99, "image_id": 9, "category_id": data["categories"][0]["id"],
                                "segmentation": [[1, 1, 4, 4]], "area": 0.0, "iscrowd": 0})
    path.write_text(json.dumps(data))
    with caplog.at_level("WARNING"):
        ds = load_coco(path, images, with_masks=True)
    assert ds["labels"][2] == [] and not np.array(ds[2]["mask"]).any()
    assert "skipped 1 annotation(s) whose polygons have fewer than 3 points" in caplog.text and "[99]" in caplog.text


def test_example_targets_are_its_unique_labels_ascending():
    example = Example(index=0, id="a", image=None, labels=[3, 1, 3, 0], mask=None)
    assert example.targets == [0, 1, 3]
    assert Example(index=1, id="b", image=None, labels=[], mask=None).targets == []
