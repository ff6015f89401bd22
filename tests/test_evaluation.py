"""Tests of the streaming confusion matrix, the threshold sweep and the shipped `evaluate` mean-IoU metric."""

import evaluate
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from pole_hf.evaluation import (
    ConfusionMatrix,
    ThresholdSweep,
    evaluate_masks,
    load_mean_iou_metric,
    metric_path,
)
from pole_hf.masks import BackgroundRule, cams_to_mask

FAST = settings(max_examples=40, deadline=None)


@st.composite
def labelled_pair(draw, num_classes=None, with_ignore=True):
    """A (pred, target, num_classes) triple of equal-shaped label maps, some target pixels set to 255."""
    if num_classes is None:
        num_classes = draw(st.integers(1, 8))
    shape = draw(hnp.array_shapes(min_dims=2, max_dims=2, min_side=1, max_side=12))
    labels = st.integers(0, num_classes - 1)
    pred = draw(hnp.arrays(np.uint8, shape, elements=labels))
    target = draw(hnp.arrays(np.uint8, shape, elements=labels))
    if with_ignore:
        ignore = draw(hnp.arrays(np.bool_, shape))
        target = np.where(ignore, 255, target).astype(np.uint8)
    return pred, target, num_classes


def _reference_iou(pred, target, num_classes):
    """Direct per-class IoU, written independently of the bincount code."""
    keep = target != 255
    values = []
    for c in range(num_classes):
        p, t = (pred == c) & keep, (target == c) & keep
        union = (p | t).sum()
        values.append((p & t).sum() / union if union else np.nan)
    return np.array(values)


@FAST
@given(labelled_pair())
def test_iou_matches_direct_definition(data):
    pred, target, num_classes = data
    matrix = ConfusionMatrix(num_classes).update(pred, target)
    np.testing.assert_allclose(matrix.iou(), _reference_iou(pred, target, num_classes), equal_nan=True)
    keep = target != 255
    assert matrix.matrix.sum() == keep.sum() and matrix.matrix.dtype == np.int64
    if keep.any():
        assert matrix.pixel_accuracy() == pytest.approx((pred[keep] == target[keep]).mean())


@FAST
@given(labelled_pair())
def test_mask_against_itself_scores_one(data):
    _, target, num_classes = data
    matrix = ConfusionMatrix(num_classes).update(target, target)
    if (target != 255).any():
        assert matrix.miou() == 1.0 and matrix.pixel_accuracy() == 1.0
        present = np.isin(np.arange(num_classes), target)
        assert np.isnan(matrix.iou()[~present]).all()
    else:
        assert np.isnan(matrix.miou())


@FAST
@given(labelled_pair(), st.data())
def test_ignored_pixels_never_count(data, draw):
    pred, target, num_classes = data
    # changing the prediction where the target is ignored changes nothing
    other = draw.draw(hnp.arrays(np.uint8, pred.shape, elements=st.integers(0, num_classes - 1)))
    changed = np.where(target == 255, other, pred)
    first = ConfusionMatrix(num_classes).update(pred, target)
    second = ConfusionMatrix(num_classes).update(changed, target)
    np.testing.assert_array_equal(first.matrix, second.matrix)


@FAST
@given(labelled_pair(num_classes=5), labelled_pair(num_classes=5))
def test_merge_equals_matrix_of_concatenation(a, b):
    left = ConfusionMatrix(5).update(a[0], a[1])
    right = ConfusionMatrix(5).update(b[0], b[1])
    joined = ConfusionMatrix(5).update(
        np.concatenate([a[0].ravel(), b[0].ravel()]), np.concatenate([a[1].ravel(), b[1].ravel()])
    )
    left.merge(right)
    np.testing.assert_array_equal(left.matrix, joined.matrix)
    np.testing.assert_allclose(left.iou(), joined.iou(), equal_nan=True)


def test_unlabelled_predictions_are_skipped_or_counted_wrong():
    target = np.array([[0, 0, 1, 1]])
    pred = np.array([[0, 255, 1, 255]])
    skipped = ConfusionMatrix(2).update(pred, target)
    assert skipped.miou() == 1.0 and skipped.coverage() == 0.5
    counted = ConfusionMatrix(2, count_ignored_predictions=True).update(pred, target)
    np.testing.assert_allclose(counted.iou(), [0.5, 0.5])
    assert counted.pixel_accuracy() == 0.5


def test_known_values_and_table():
    target = np.array([[0, 0, 1, 1], [2, 2, 2, 255]])
    pred = np.array([[0, 1, 1, 1], [2, 2, 0, 0]])
    matrix = ConfusionMatrix(4).update(pred, target)
    np.testing.assert_allclose(matrix.iou(), [1 / 3, 2 / 3, 2 / 3, np.nan], equal_nan=True)
    assert matrix.miou() == pytest.approx(5 / 9)
    assert matrix.pixel_accuracy() == pytest.approx(5 / 7)
    table = matrix.as_table(["background", "cat", "dog", "bird"])
    assert "| cat | 66.67 |" in table and "| bird | - |" in table and "| **mean** | 55.56 |" in table
    assert len(table.splitlines()) == 2 + 4 + 1


def test_bad_labels_and_settings_raise():
    with pytest.raises(ValueError, match="label 7"):
        ConfusionMatrix(3).update(np.array([7]), np.array([0]))
    with pytest.raises(ValueError, match="shape"):
        ConfusionMatrix(3).update(np.zeros((2, 2)), np.zeros((2, 3)))
    with pytest.raises(ValueError, match="ignore_index 2"):
        ConfusionMatrix(3, ignore_index=2)
    with pytest.raises(ValueError, match="cannot merge"):
        ConfusionMatrix(3).merge(ConfusionMatrix(4))
    with pytest.raises(ValueError, match="class_names has 1"):
        ConfusionMatrix(3).as_table(["x"])


def test_errors_name_the_array_that_holds_the_bad_label():
    with pytest.raises(ValueError, match=r"^pred holds label 7 "):
        ConfusionMatrix(3).update(np.array([7]), np.array([0]))
    with pytest.raises(ValueError, match=r"^target holds label 5 "):
        ConfusionMatrix(3).update(np.array([0]), np.array([5]))


def test_unlabelled_predictions_accumulate_over_updates_and_classes():
    # class 0's pixels are left unlabelled in two images: the second update adds to the first
    counted = ConfusionMatrix(3, count_ignored_predictions=True)
    counted.update(np.array([255, 1, 2]), np.array([0, 1, 2]))
    counted.update(np.array([255, 0]), np.array([0, 0]))
    np.testing.assert_array_equal(counted.unlabelled, [2, 0, 0])
    # class 0: 1 right of 3 target pixels; classes 1 and 2 are untouched by class 0's unlabelled pixels
    np.testing.assert_allclose(counted.class_accuracy(), [1 / 3, 1.0, 1.0])
    np.testing.assert_allclose(counted.iou(), [1 / 3, 1.0, 1.0])
    assert counted.coverage() == pytest.approx(3 / 5) and counted.pixel_accuracy() == pytest.approx(3 / 5)


def test_class_accuracy_is_nan_for_classes_absent_from_the_targets():
    matrix = ConfusionMatrix(3).update(np.array([0, 2, 2]), np.array([0, 0, 1]))
    # class 2 is predicted but never a target: no recall, zero precision
    np.testing.assert_allclose(matrix.class_accuracy(), [1 / 2, 0.0, np.nan], equal_nan=True)
    np.testing.assert_allclose(matrix.precision(), [1.0, np.nan, 0.0], equal_nan=True)


def test_uint8_masks_of_many_classes_do_not_overflow():
    # 21 classes: target 20 * 21 + pred 20 = 440 does not fit the masks' uint8
    target = np.array([[20, 20, 13, 0]], dtype=np.uint8)
    pred = np.array([[20, 13, 13, 0]], dtype=np.uint8)
    matrix = ConfusionMatrix(21).update(pred, target)
    assert matrix.matrix[20, 20] == 1 and matrix.matrix[20, 13] == 1 and matrix.matrix[13, 13] == 1
    assert matrix.matrix.sum() == 4


def test_empty_matrix_scores_are_nan_without_warnings():
    import warnings

    matrix = ConfusionMatrix(3).update(np.full((2, 2), 255), np.full((2, 2), 255))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert np.isnan(matrix.miou()) and np.isnan(matrix.pixel_accuracy()) and np.isnan(matrix.coverage())
        assert np.isnan(matrix.iou()).all() and np.isnan(matrix.class_accuracy()).all()


def test_evaluate_masks_streams_pairs():
    rng = np.random.default_rng(0)
    pairs = [(rng.integers(0, 3, (6, 5)), rng.integers(0, 3, (6, 5))) for _ in range(4)]
    result = evaluate_masks(iter(pairs), num_classes=3)
    matrix = ConfusionMatrix(3)
    for pred, target in pairs:
        matrix.update(pred, target)
    assert result["num_images"] == 4 and result["mean_iou"] == pytest.approx(matrix.miou())
    np.testing.assert_array_equal(result["confusion_matrix"].matrix, matrix.matrix)
    assert result["table"].startswith("| class |")


def _sweep_images(seed=0, count=3):
    rng = np.random.default_rng(seed)
    images = []
    for _ in range(count):
        target = np.zeros((10, 12), np.uint8)
        target[2:7, 3:9] = 5
        target[0, :] = 255
        cam = np.clip((target == 5) * 0.6 + rng.uniform(0, 0.3, target.shape), 0, 1).astype(np.float32)
        images.append((cam[None], [5], target))
    return images


def test_threshold_sweep_uses_cams_to_mask_and_finds_the_gap():
    thresholds = [0.1, 0.45, 0.95]
    sweep = ThresholdSweep(21, thresholds)
    expected = [ConfusionMatrix(21) for _ in thresholds]
    for cams, ids, target in _sweep_images():
        sweep.update(cams, ids, target)
        for value, matrix in zip(thresholds, expected):
            matrix.update(cams_to_mask(cams, ids, BackgroundRule("threshold", threshold=value)), target)
    curve = sweep.curve()
    assert [t for t, _ in curve] == thresholds
    assert [m for _, m in curve] == pytest.approx([m.miou() for m in expected])
    assert sweep.best() == (0.45, 1.0)


def test_power_sweep_and_merge():
    images = _sweep_images(seed=1, count=4)
    whole = ThresholdSweep(21, [1, 2], mode="power")
    first, second = ThresholdSweep(21, [1, 2], mode="power"), ThresholdSweep(21, [1, 2], mode="power")
    for index, (cams, ids, target) in enumerate(images):
        whole.update(cams, ids, target)
        (first if index % 2 else second).update(cams, ids, target)
    assert first.merge(second).curve() == whole.curve()
    power, score = whole.best()
    assert power in (1.0, 2.0) and score == max(m for _, m in whole.curve())
    with pytest.raises(ValueError, match="cannot merge"):
        whole.merge(ThresholdSweep(21, [1, 2]))
    with pytest.raises(ValueError, match="mode"):
        ThresholdSweep(21, [1], mode="otsu")


@pytest.fixture(scope="module")
def mean_iou_metric():
    return load_mean_iou_metric()


@settings(max_examples=15, deadline=None)
@given(st.lists(labelled_pair(num_classes=6), min_size=1, max_size=3))
def test_evaluate_metric_agrees_with_streaming_code(mean_iou_metric, pairs):
    predictions = [p for p, _, _ in pairs]
    references = [t for _, t, _ in pairs]
    result = mean_iou_metric.compute(predictions=predictions, references=references, num_labels=6, ignore_index=255)
    matrix = ConfusionMatrix(6)
    for pred, target in zip(predictions, references):
        matrix.update(pred, target)
    np.testing.assert_allclose(result["per_category_iou"], matrix.iou(), equal_nan=True)
    np.testing.assert_allclose(result["per_category_accuracy"], matrix.class_accuracy(), equal_nan=True)
    np.testing.assert_allclose(result["mean_iou"], matrix.miou(), equal_nan=True)
    np.testing.assert_allclose(result["overall_accuracy"], matrix.pixel_accuracy(), equal_nan=True)


def test_evaluate_metric_options(mean_iou_metric):
    pred = [np.array([[0, 1], [1, 1]])]
    ref = [np.array([[1, 2], [2, 0]])]  # reduce_labels: 1 -> 0, 2 -> 1, 0 -> ignored
    result = mean_iou_metric.compute(
        predictions=pred, references=ref, num_labels=3, ignore_index=255, reduce_labels=True, nan_to_num=-1.0
    )
    assert result["mean_iou"] == 1.0 and result["per_category_iou"].tolist() == [1.0, 1.0, -1.0]
    mapped = mean_iou_metric.compute(
        predictions=pred, references=ref, num_labels=3, ignore_index=255, label_map={1: 0, 2: 1, 0: 255}
    )
    assert mapped["mean_iou"] == 1.0


def test_metric_loads_by_path_without_network(monkeypatch):
    import socket

    def refuse(*args, **kwargs):
        raise AssertionError(f"network access attempted: {args}")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    metric = evaluate.load(metric_path())
    assert type(metric).__name__ == "MeanIoU"
    result = metric.compute(
        predictions=[np.array([[0, 1]])], references=[np.array([[0, 1]])], num_labels=2, ignore_index=255
    )
    assert result["mean_iou"] == 1.0


def test_float_labels_count_only_when_whole_numbers():
    whole = ConfusionMatrix(3).update(np.array([0.0, 2.0, 1.0]), np.array([0, 2, 2]))
    assert whole.matrix.tolist() == [[1, 0, 0], [0, 0, 0], [0, 1, 1]]
    with pytest.raises(ValueError, match=r"pred holds non-integer labels such as 1\.5"):
        ConfusionMatrix(3).update(np.array([0.0, 1.5]), np.array([0, 1]))
    with pytest.raises(ValueError, match="target holds non-integer"):
        ConfusionMatrix(3).update(np.array([0, 1]), np.array([0.25, 1.0]))
