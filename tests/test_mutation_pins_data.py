"""Behaviours of the dataset specs and the safe example reader (pole_hf.data.spec) that mutation testing found
unpinned: spec parsing, class names, example ids, image and mask reading and their checks, with hand-made inputs."""

from __future__ import annotations

import io

import datasets
import numpy as np
import pytest
from PIL import Image

from pole_hf.data.spec import _read, _read_mask, class_names_of, example_ids, load_dataset_spec
from pole_hf.images import ImageInputError


def png_bytes(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def labelled(names: list[str], labels: list[list[int]], **columns) -> datasets.Dataset:
    features = {"labels": datasets.List(datasets.ClassLabel(names=names))}
    features.update({name: datasets.Value("string") for name in columns})
    return datasets.Dataset.from_dict({"labels": labels, **columns}, features=datasets.Features(features))


def test_class_names_of_reads_the_label_order():
    assert class_names_of(labelled(["zebra", "ant", "cow"], [[0], [2, 1]])) == ["zebra", "ant", "cow"]


@pytest.mark.parametrize("feature", [datasets.List(datasets.Value("int64")), datasets.ClassLabel(names=["a", "b"])],
                         ids=["list-of-ints", "plain-classlabel"])
def test_class_names_of_refuses_labels_that_are_not_a_list_of_classlabel(feature):
    value = [[0]] if isinstance(feature, datasets.List) else [0]
    dataset = datasets.Dataset.from_dict({"labels": value}, features=datasets.Features({"labels": feature}))
    with pytest.raises(ValueError, match="not a list of ClassLabel"):
        class_names_of(dataset)


def test_example_ids_use_the_image_id_column_and_pad_missing_ones():
    dataset = labelled(["a"], [[0]] * 4, image_id=["cat_7", None, "", "0"])
    assert example_ids(dataset) == ["cat_7", "000001", "000002", "0"]  # "0" is an id, not a missing one
    assert example_ids(labelled(["a"], [[0]] * 3)) == ["000000", "000001", "000002"]


def test_read_accepts_pil_bytes_and_paths_as_rgb(tmp_path):
    grey = Image.new("L", (5, 3), 77)
    grey.save(tmp_path / "g.png")
    for value in (grey, {"bytes": png_bytes(grey), "path": None}, {"bytes": None, "path": str(tmp_path / "g.png")}):
        image = _read(value, "g")
        assert image.mode == "RGB" and image.size == (5, 3) and np.asarray(image).tolist()[0][0] == [77, 77, 77]


@pytest.mark.parametrize(("value", "pattern"), [
    ({"bytes": b"not a png", "path": None}, "image 'x' is corrupt or not an image"),
    ({"bytes": None, "path": None}, "example 'x' has no image data"),
    ({"bytes": None, "path": ""}, "example 'x' has no image data"),
    ("a string", "example 'x' has no image data"),
], ids=["corrupt", "nothing", "empty-path", "string"])
def test_read_names_the_example_of_an_unreadable_image(value, pattern):
    with pytest.raises(ImageInputError, match=pattern):
        _read(value, "x")


@pytest.mark.parametrize("mode", ["L", "P", "1", "I", "I;16"])
def test_read_mask_accepts_every_single_channel_mode_as_uint8_ids(mode):
    ids = np.array([[0, 1, 1], [0, 0, 1]], np.uint8)
    mask = Image.fromarray(ids, mode="L").convert(mode) if mode != "1" else Image.fromarray(ids.astype(bool))
    out = _read_mask(mask, (3, 2), 1, "m")  # a PIL image (PNG cannot hold mode I)
    assert out.dtype == np.uint8 and out.tolist() == ids.tolist()


def test_read_mask_from_a_path_and_from_a_pil_image(tmp_path):
    ids = np.array([[3, 255], [0, 20]], np.uint8)
    Image.fromarray(ids, mode="L").save(tmp_path / "m.png")
    assert _read_mask({"bytes": None, "path": str(tmp_path / "m.png")}, (2, 2), 20, "m").tolist() == ids.tolist()
    assert _read_mask(Image.fromarray(ids, mode="L"), (2, 2), 20, "m").tolist() == ids.tolist()


def test_read_mask_values_run_from_0_to_num_classes_and_255():
    top = np.array([[0, 4, 255]], np.uint8)
    assert _read_mask(Image.fromarray(top, mode="L"), (3, 1), 4, "m").tolist() == top.tolist()
    with pytest.raises(ImageInputError, match=r"mask 'm' has values \[5\] outside 0..4 and 255"):
        _read_mask(Image.fromarray(np.array([[0, 5, 255]], np.uint8), mode="L"), (3, 1), 4, "m")
    with pytest.raises(ImageInputError, match=r"values \[254\]"):
        _read_mask(Image.fromarray(np.array([[254]], np.uint8), mode="L"), (1, 1), 4, "m")
    # without a class count every value is kept
    assert _read_mask(Image.fromarray(np.array([[200]], np.uint8), mode="L"), (1, 1), None, "m").tolist() == [[200]]


def test_read_mask_keeps_values_of_a_16_bit_mask_below_256():
    ids = np.array([[0, 7]], np.uint16)
    out = _read_mask(Image.fromarray(ids).convert("I;16"), (2, 1), 7, "m")
    assert out.tolist() == [[0, 7]]


@pytest.mark.parametrize("size", [(4, 2), (3, 3)], ids=["other-width", "other-height"])
def test_read_mask_of_another_size_is_refused(size):
    mask = Image.fromarray(np.zeros((2, 3), np.uint8), mode="L")
    with pytest.raises(ImageInputError, match=rf"mask 'm' is 3x2 but its image is {size[0]}x{size[1]}"):
        _read_mask(mask, size, 1, "m")


def test_read_mask_refuses_colour_and_corrupt_masks():
    with pytest.raises(ImageInputError, match="mask 'm' is a RGB image"):
        _read_mask(Image.new("RGB", (2, 2)), (2, 2), 1, "m")
    with pytest.raises(ImageInputError, match="mask 'm' is corrupt or not an image"):
        _read_mask({"bytes": b"garbage", "path": None}, (2, 2), 1, "m")


def test_synthetic_spec_sizes_splits_and_count():
    small = load_dataset_spec("synthetic", split="val", num_images=3, seed=1, image_size=16)
    assert len(small) == 3 and small[0]["image"].size == (16, 16)
    again = load_dataset_spec("synthetic", split="val", num_images=3, seed=1, image_size=16)
    other = load_dataset_spec("synthetic", split="test", num_images=3, seed=1, image_size=16)
    assert again["labels"] == small["labels"]
    assert [np.asarray(e["image"]).tolist() for e in other] != [np.asarray(e["image"]).tolist() for e in small]
    assert len(load_dataset_spec("synthetic", image_size=16)) == 200  # the default count
    with pytest.raises(ValueError, match="split 'training' is not a split of the synthetic world"):
        load_dataset_spec("synthetic", split="training")


def test_imagefolder_spec_keeps_the_first_images_and_the_class_order(tmp_path):
    for i in range(3):
        Image.new("RGB", (4, 4), (i, 0, 0)).save(tmp_path / f"{i}.png")
    (tmp_path / "metadata.csv").write_text("file_name,labels\n0.png,dog\n1.png,cat\n2.png,dog; cat\n")
    dataset = load_dataset_spec(f"imagefolder:{tmp_path}", num_images=2, class_names=["dog", "cat", "cow"])
    assert len(dataset) == 2 and class_names_of(dataset) == ["dog", "cat", "cow"]
    assert sorted(dataset["labels"]) == [[0], [1]]
    assert len(load_dataset_spec(f"imagefolder:{tmp_path}", num_images=10)) == 3  # more than there are: all
    assert len(load_dataset_spec(f"imagefolder:{tmp_path}", num_images=0)) == 0


@pytest.mark.parametrize(("spec", "pattern"), [
    ("coco:/only/annotations.json", "needs 'coco:ANNOTATIONS.json,IMAGE_DIR'"),
    ("vocx:/data", "unknown dataset spec 'vocx:/data'"),
])
def test_bad_specs_are_refused_by_name(spec, pattern):
    with pytest.raises(ValueError, match=pattern):
        load_dataset_spec(spec)


def tiny_voc(root, ids_by_split: dict[str, list[str]]) -> None:
    """A VOC2012 folder: grey images, one 'dog' (or 'cat' for odd ids) annotation each, no masks."""
    for folder in ("JPEGImages", "Annotations", "SegmentationClass", "ImageSets/Segmentation"):
        (root / folder).mkdir(parents=True, exist_ok=True)
    for split, ids in ids_by_split.items():
        (root / "ImageSets" / "Segmentation" / f"{split}.txt").write_text("".join(f"{i}\n" for i in ids))
        for n, image_id in enumerate(ids):
            Image.new("RGB", (4, 3), 128).save(root / "JPEGImages" / f"{image_id}.jpg")
            name = "cat" if n % 2 else "dog"
            (root / "Annotations" / f"{image_id}.xml").write_text(
                f"<annotation><object><name>{name}</name></object></annotation>")


def test_voc_spec_reads_its_split_with_the_given_class_order(tmp_path):
    tiny_voc(tmp_path / "VOC2012", {"train": ["t0", "t1", "t2"], "val": ["v0", "v1"]})
    val = load_dataset_spec(f"voc:{tmp_path / 'VOC2012'}", split="val", class_names=["cat", "dog"])
    assert val["image_id"] == ["v0", "v1"] and val["labels"] == [[1], [0]] and class_names_of(val) == ["cat", "dog"]
    train = load_dataset_spec(f"voc:{tmp_path}", num_images=2)  # the VOCdevkit folder above; VOC's own classes
    assert train["image_id"] == ["t0", "t1"] and len(class_names_of(train)) == 20


def test_coco_spec_splits_annotations_from_images_at_the_comma(tmp_path):
    (tmp_path / "images").mkdir()
    Image.new("RGB", (4, 3)).save(tmp_path / "images" / "a.jpg")
    path = tmp_path / "instances.json"
    path.write_text('{"images": [{"id": 3, "file_name": "a.jpg", "height": 3, "width": 4}], '
                    '"categories": [{"id": 2, "name": "kite"}], "annotations": [{"id": 1, "image_id": 3, '
                    '"category_id": 2, "iscrowd": 0, "area": 4.0, "segmentation": [[0, 0, 2, 0, 2, 2, 0, 2]]}]}')
    dataset = load_dataset_spec(f"coco:{path},{tmp_path / 'images'}", class_names=["cow", "kite"])
    assert dataset["labels"] == [[1]] and "mask" in dataset.column_names  # masks are read for the runs
    assert np.asarray(dataset[0]["mask"]).max() == 2


def test_read_keeps_the_stored_grid_of_an_exif_rotated_image():
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 CW to display"
    buffer = io.BytesIO()
    Image.new("RGB", (6, 2), 200).save(buffer, format="JPEG", exif=exif)
    stored = buffer.getvalue()
    assert _read(Image.open(io.BytesIO(stored)), "r").size == (6, 2)
    assert _read({"bytes": stored, "path": None}, "r").size == (6, 2)


def test_synthetic_spec_seed_picks_the_stream():
    first, second = (load_dataset_spec("synthetic", num_images=2, seed=s, image_size=16) for s in (0, 1))
    assert [np.asarray(e["image"]).tolist() for e in first] != [np.asarray(e["image"]).tolist() for e in second]
    assert load_dataset_spec("synthetic", num_images=1)[0]["image"].size == (96, 96)  # the default size
    default = load_dataset_spec("synthetic", num_images=2, image_size=16)  # the default seed is 0
    assert [np.asarray(e["image"]).tolist() for e in default] == [np.asarray(e["image"]).tolist() for e in first]


def test_imagefolder_spec_reads_the_named_split(tmp_path):
    for split, count in (("train", 1), ("test", 2)):
        (tmp_path / split).mkdir()
        for i in range(count):
            Image.new("RGB", (4, 4)).save(tmp_path / split / f"{i}.png")
        rows = "".join(f"{i}.png,dog\n" for i in range(count))
        (tmp_path / split / "metadata.csv").write_text("file_name,labels\n" + rows)
    assert len(load_dataset_spec(f"imagefolder:{tmp_path}", split="test")) == 2
    assert len(load_dataset_spec(f"imagefolder:{tmp_path}")) == 1
