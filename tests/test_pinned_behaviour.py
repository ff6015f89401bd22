"""Behaviours a mutation run found unpinned (issue #17): each test is a hand computation, a round trip or a
boundary case, so that the one-line mutants listed there fail."""

import datasets
import numpy as np
import pytest
import torch
from PIL import Image

from pole_hf.cam import CamOutput
from pole_hf.evaluation import ConfusionMatrix, ThresholdSweep, evaluate_cams
from pole_hf.objective import masked_images


def test_confusion_matrix_rows_are_targets_and_precision_recall_by_hand():
    target = np.array([[0, 0, 1, 1], [1, 1, 2, 2]])
    pred = np.array([[0, 1, 1, 1], [1, 2, 2, 0]])
    matrix = ConfusionMatrix(3).update(pred, target)
    expected = np.array([[1, 1, 0],   # target 0: predicted 0 once, 1 once
                         [0, 3, 1],   # target 1: 1 three times, 2 once
                         [1, 0, 1]])  # target 2: 0 once, 2 once
    np.testing.assert_array_equal(matrix.matrix, expected)
    np.testing.assert_allclose(matrix.precision(), [1 / 2, 3 / 4, 1 / 2])  # correct / predicted
    np.testing.assert_allclose(matrix.class_accuracy(), [1 / 2, 3 / 4, 1 / 2 * 1])  # correct / target
    matrix = ConfusionMatrix(3).update(np.array([1, 1, 1]), np.array([0, 1, 2]))
    np.testing.assert_allclose(matrix.precision(), [np.nan, 1 / 3, np.nan])
    np.testing.assert_allclose(matrix.class_accuracy(), [0, 1, 0])


def test_threshold_sweep_ties_go_to_the_first_setting():
    cams = np.array([[[1.0, 1.0], [0.0, 0.0]]], np.float32)
    target = np.array([[1, 1], [0, 0]])
    sweep = ThresholdSweep(2, [0.3, 0.5, 0.7], mode="threshold").update(cams, [1], target)
    assert [m for _, m in sweep.curve()] == [1.0, 1.0, 1.0]
    assert sweep.best() == (0.3, 1.0)


def mask_cams(model, processor, images, class_indices, **options):
    """Stands in for the model's CAMs: the map of class c is where the image's red channel equals 40 (c + 1)."""
    outputs = []
    for image, labels in zip(images, class_indices):
        red = np.asarray(image)[..., 0].astype(np.int64)
        cams = np.stack([(red == 40 * (label + 1)).astype(np.float32) for label in labels])
        outputs.append(CamOutput(cams=torch.from_numpy(cams), class_indices=torch.tensor(labels)))
    return outputs


def test_evaluate_cams_scores_perfect_maps_as_perfect(tiny_model, monkeypatch):
    import pole_hf.cam_inference

    monkeypatch.setattr(pole_hf.cam_inference, "batched_cams", mask_cams)
    masks = [np.array([[0, 1, 1, 0], [0, 3, 3, 0], [0, 0, 0, 0]], np.uint8),
             np.array([[2, 2, 0, 0], [2, 2, 0, 1], [0, 0, 0, 1]], np.uint8)]
    images = [Image.fromarray(np.stack([m.astype(np.uint8) * 40] * 3, -1)) for m in masks]
    labels = [sorted({int(v) - 1 for v in np.unique(m) if v}) for m in masks]
    names = tiny_model.config.class_names
    data = datasets.Dataset.from_dict(
        {"image": images, "mask": [Image.fromarray(m) for m in masks], "labels": labels},
        features=datasets.Features({"image": datasets.Image(), "mask": datasets.Image(),
                                    "labels": datasets.List(datasets.ClassLabel(names=names))}))
    result = evaluate_cams(tiny_model, data, processor=object(), progress=False)
    assert result["miou"] == 1.0 and result["per_class_iou"] == {"background": 1.0, "cat": 1.0, "dog": 1.0,
                                                                 "sofa": 1.0}


def test_masked_images_in_pixel_space_turn_masked_parts_black():
    mean, std = (0.5, 0.4, 0.3), (0.2, 0.25, 0.5)
    raw = torch.rand(1, 3, 4, 4)
    pixels = (raw - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)
    cam = torch.zeros(1, 4, 4)
    cam[..., :2] = 1.0  # left half is the object
    fg, bg = masked_images(pixels, cam, image_mean=mean, image_std=std)
    black = (0 - torch.tensor(mean).view(3, 1, 1)) / torch.tensor(std).view(3, 1, 1)
    torch.testing.assert_close(fg[0, :, :, :2], pixels[0, :, :, :2])
    torch.testing.assert_close(fg[0, :, :, 2:], black.expand(3, 4, 2))
    torch.testing.assert_close(bg[0, :, :, 2:], pixels[0, :, :, 2:])
    torch.testing.assert_close(bg[0, :, :, :2], black.expand(3, 4, 2))
    fg_plain, bg_plain = masked_images(pixels, cam)  # normalised space (CLIMS): masked parts become 0 = the mean
    assert torch.all(fg_plain[0, :, :, 2:] == 0) and torch.all(bg_plain[0, :, :, :2] == 0)


@pytest.fixture
def voc(tmp_path):
    from test_data import MASKS, write_palette_png

    from pole_hf.vocab import VOC_CLASSES

    root = tmp_path / "VOC2012"
    for folder in ("JPEGImages", "Annotations", "SegmentationClass", "SegmentationClassAug", "ImageSets/Segmentation"):
        (root / folder).mkdir(parents=True)
    ids = list(MASKS)
    for image_id, mask in MASKS.items():
        Image.fromarray(np.full(mask.shape + (3,), 128, np.uint8)).save(root / "JPEGImages" / f"{image_id}.jpg")
        write_palette_png(str(root / "SegmentationClass" / f"{image_id}.png"), mask)
        Image.fromarray(mask, mode="L").save(root / "SegmentationClassAug" / f"{image_id}.png")
        names = [VOC_CLASSES[v - 1] for v in np.unique(mask) if 0 < v < 255]
        (root / "Annotations" / f"{image_id}.xml").write_text(
            "<annotation>" + "".join(f"<object><name>{n}</name></object>" for n in names) + "</annotation>")
    sets = root / "ImageSets" / "Segmentation"
    (sets / "train.txt").write_text(f"{ids[0]}\n")
    (sets / "val.txt").write_text(f"{ids[1]}\n")
    (sets / "train_aug.txt").write_text(f"{ids[0]}\n{ids[2]}\n")
    return root, ids


def test_voc_aug_reads_train_aug_only_for_train(voc):
    from pole_hf.data import load_voc

    root, ids = voc
    assert load_voc(root, split="train", use_aug=True)["image_id"] == [ids[0], ids[2]]
    assert load_voc(root, split="val", use_aug=True)["image_id"] == [ids[1]]


def test_palette_masks_are_class_indices_and_heights_are_checked(voc):
    from test_data import MASKS, write_palette_png

    from pole_hf.data import load_voc
    from pole_hf.data.spec import iter_examples

    root, ids = voc
    example = next(iter_examples(load_voc(root, split="train")))
    np.testing.assert_array_equal(example.mask, MASKS[ids[0]])  # indices, not the palette colours' luminance
    height, width = MASKS[ids[0]].shape
    write_palette_png(str(root / "SegmentationClass" / f"{ids[0]}.png"), np.zeros((height + 1, width)))
    example = next(iter_examples(load_voc(root, split="train")))  # same width, other height
    assert example.image is None and f"is {width}x{height + 1} but its image is {width}x{height}" in example.error
