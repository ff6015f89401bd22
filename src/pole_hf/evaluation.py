"""Segmentation evaluation: a streaming confusion matrix, mIoU, and CLIP-ES' background threshold sweep.

Memory stays flat in the dataset size: each image is reduced to a `[C, C]` int64 histogram as it arrives.
Partial results of several processes add up with `merge`.
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterable, Sequence

import numpy as np
from tqdm.auto import tqdm

from .cam_inference import iter_cams
from .data.spec import iter_examples
from .image_processing_pole import PoleImageProcessor
from .masks import IGNORE_ID, BackgroundRule, cams_to_mask, crf_scores, scores_to_mask

_METRIC_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "metrics", "mean_iou")


class ConfusionMatrix:
    """Streaming confusion matrix over `num_classes` labels (background included), rows = target, columns = prediction.

    Target pixels equal to `ignore_index` never count. Predicted pixels equal to `ignore_index` (unlabelled pixels
    of a pseudo mask) are skipped by default; with `count_ignored_predictions=True` they count as misses of their
    target class.

    Args:
        num_classes: number of labels, background included (21 for PASCAL VOC).
        ignore_index: label that marks pixels to leave out.
        count_ignored_predictions: count unlabelled predictions as wrong instead of skipping them.
    """

    def __init__(self, num_classes: int, ignore_index: int = IGNORE_ID, count_ignored_predictions: bool = False):
        if num_classes < 1:
            raise ValueError(f"num_classes must be >= 1, got {num_classes}; count the background too")
        if 0 <= ignore_index < num_classes:
            raise ValueError(
                f"ignore_index {ignore_index} is a class label (num_classes={num_classes}); use e.g. 255"
            )
        self.num_classes = int(num_classes)
        self.ignore_index = int(ignore_index)
        self.count_ignored_predictions = bool(count_ignored_predictions)
        self.matrix = np.zeros((num_classes, num_classes), dtype=np.int64)
        self.unlabelled = np.zeros(num_classes, dtype=np.int64)  # target pixels per class predicted as ignore_index

    @staticmethod
    def _as_labels(labels, name: str) -> np.ndarray:
        """int64 labels; float arrays only when every value is a whole number (no silent truncation)."""
        array = np.asarray(labels)
        if array.dtype.kind == "f" and not np.array_equal(array, np.trunc(array)):
            raise ValueError(f"{name} holds non-integer labels such as {array[array != np.trunc(array)].flat[0]}; "
                             "give class ids (argmax the scores first)")
        return np.asarray(array, dtype=np.int64)

    def _check_labels(self, labels: np.ndarray, name: str) -> None:
        valid = labels[labels != self.ignore_index]
        if valid.size and (valid.min() < 0 or valid.max() >= self.num_classes):
            bad = valid.max() if valid.max() >= self.num_classes else valid.min()
            raise ValueError(
                f"{name} holds label {bad} outside 0..{self.num_classes - 1} (and not ignore_index "
                f"{self.ignore_index}); check num_classes or the label mapping"
            )

    def update(self, pred: np.ndarray, target: np.ndarray) -> ConfusionMatrix:
        """Adds one prediction / ground-truth pair (any matching shape; arrays or "P"/"L" PIL images).

        Args:
            pred: predicted labels.
            target: ground-truth labels.

        Returns:
            `self`, for chaining.
        """
        pred, target = self._as_labels(pred, "pred"), self._as_labels(target, "target")
        if pred.shape != target.shape:
            raise ValueError(
                f"pred shape {pred.shape} differs from target shape {target.shape}; resize one to the other"
            )
        self._check_labels(pred, "pred")
        self._check_labels(target, "target")
        keep = target != self.ignore_index
        unlabelled = keep & (pred == self.ignore_index)
        if unlabelled.any():
            self.unlabelled += np.bincount(target[unlabelled], minlength=self.num_classes)
        keep &= ~unlabelled
        index = target[keep] * self.num_classes + pred[keep]
        self.matrix += np.bincount(index, minlength=self.num_classes**2).reshape(self.num_classes, self.num_classes)
        return self

    def merge(self, other: ConfusionMatrix) -> ConfusionMatrix:
        """Adds the counts of another matrix (e.g. from another process) into this one.

        Args:
            other: A matrix with the same `num_classes` and `ignore_index`.

        Returns:
            `self`, for chaining.
        """
        if (other.num_classes, other.ignore_index) != (self.num_classes, self.ignore_index):
            raise ValueError(
                f"cannot merge a matrix of (num_classes, ignore_index) = {(other.num_classes, other.ignore_index)} "
                f"into one of {(self.num_classes, self.ignore_index)}; build both with the same settings"
            )
        self.matrix += other.matrix
        self.unlabelled += other.unlabelled
        return self

    def _target_totals(self) -> np.ndarray:
        totals = self.matrix.sum(axis=1)
        return totals + self.unlabelled if self.count_ignored_predictions else totals

    def iou(self) -> np.ndarray:
        """Per-class intersection over union.

        Returns:
            Float64 array `[num_classes]`; NaN for classes absent from both targets and predictions.
        """
        true_positive = np.diag(self.matrix)
        union = self._target_totals() + self.matrix.sum(axis=0) - true_positive
        return np.where(union > 0, true_positive / np.maximum(union, 1), np.nan)

    def miou(self) -> float:
        """Mean IoU over the classes present in targets or predictions (NaN if nothing was counted)."""
        values = self.iou()
        return float(np.nanmean(values)) if np.isfinite(values).any() else math.nan

    def class_accuracy(self) -> np.ndarray:
        """Per-class recall: correct pixels over target pixels (NaN for classes absent from the targets)."""
        totals = self._target_totals()
        return np.where(totals > 0, np.diag(self.matrix) / np.maximum(totals, 1), np.nan)

    def precision(self) -> np.ndarray:
        """Per-class precision: correct pixels over predicted pixels (NaN for classes never predicted)."""
        totals = self.matrix.sum(axis=0)
        return np.where(totals > 0, np.diag(self.matrix) / np.maximum(totals, 1), np.nan)

    def pixel_accuracy(self) -> float:
        """Fraction of counted target pixels predicted right (NaN if nothing was counted)."""
        total = int(self._target_totals().sum())
        return float(np.trace(self.matrix) / total) if total else math.nan

    def coverage(self) -> float:
        """Fraction of non-ignored target pixels that received a label (i.e. not `ignore_index`) in the prediction."""
        labelled = int(self.matrix.sum())
        total = labelled + int(self.unlabelled.sum())
        return float(labelled / total) if total else math.nan

    def as_table(self, class_names: Sequence[str] | None = None) -> str:
        """Renders per-class IoU, precision and recall (in %) as a markdown table, with the mean as its last row.

        Args:
            class_names: one name per class, background first; defaults to the class indices.

        Returns:
            The table as a string.
        """
        if class_names is None:
            class_names = [str(i) for i in range(self.num_classes)]
        if len(class_names) != self.num_classes:
            raise ValueError(
                f"class_names has {len(class_names)} names for {self.num_classes} classes; pass one per class"
            )

        def fmt(value: float) -> str:
            return "-" if np.isnan(value) else f"{100 * value:.2f}"

        iou, precision, recall = self.iou(), self.precision(), self.class_accuracy()
        pixels = self.matrix.sum(axis=1) + self.unlabelled
        lines = ["| class | IoU | precision | recall | pixels |", "|---|---:|---:|---:|---:|"]
        for index, name in enumerate(class_names):
            lines.append(
                f"| {name} | {fmt(iou[index])} | {fmt(precision[index])} | {fmt(recall[index])} | {pixels[index]} |"
            )
        means = [np.nanmean(v) if np.isfinite(v).any() else np.nan for v in (iou, precision, recall)]
        lines.append(f"| **mean** | {fmt(means[0])} | {fmt(means[1])} | {fmt(means[2])} | {pixels.sum()} |")
        return "\n".join(lines)

    def __repr__(self) -> str:
        return (
            f"ConfusionMatrix(num_classes={self.num_classes}, pixels={int(self.matrix.sum())}, miou={self.miou():.4f})"
        )


def evaluate_masks(
    pairs: Iterable[tuple[np.ndarray, np.ndarray]],
    num_classes: int,
    ignore_index: int = IGNORE_ID,
    count_ignored_predictions: bool = False,
    class_names: Sequence[str] | None = None,
) -> dict:
    """Evaluates (prediction, ground truth) mask pairs, streaming.

    Args:
        pairs: Iterable of `(pred, target)` arrays or "P"/"L" PIL images.
        num_classes: number of labels, background included.
        ignore_index: label to leave out.
        count_ignored_predictions: See [`ConfusionMatrix`].
        class_names: optional names for the returned table.

    Returns:
        Dict with `mean_iou`, `pixel_accuracy`, `coverage`, `per_class_iou` (array), `num_images`, `table`
        (markdown) and `confusion_matrix` (the [`ConfusionMatrix`]).
    """
    matrix = ConfusionMatrix(num_classes, ignore_index, count_ignored_predictions)
    num_images = 0
    for pred, target in pairs:
        matrix.update(pred, target)
        num_images += 1
    return {
        "mean_iou": matrix.miou(),
        "pixel_accuracy": matrix.pixel_accuracy(),
        "coverage": matrix.coverage(),
        "per_class_iou": matrix.iou(),
        "num_images": num_images,
        "table": matrix.as_table(class_names),
        "confusion_matrix": matrix,
    }


class ThresholdSweep:
    """CLIP-ES' background search: one confusion matrix per background setting, filled image by image.

    With `mode="threshold"` each value `t` is a constant background score; with `mode="power"` each value is the
    exponent of `(1 - max cam) ** t`. Masks are made by [`pole_hf.masks.cams_to_mask`].

    Args:
        num_classes: number of labels, background included.
        thresholds: the background values to try (e.g. `np.arange(0, 1, 0.05)` or `(1, 2)` for power).
        mode: `"threshold"` or `"power"`.
        ignore_index: target label to leave out.
        crf: Refine each setting's scores with a dense CRF (CLIP-ES's pseudo masks) before the argmax.
        crf_image: the CRF's appearance image, `"clip_es"` or `"rgb"` (see [`pole_hf.masks.crf_image`]).
    """

    def __init__(
        self, num_classes: int, thresholds: Sequence[float], mode: str = "threshold", ignore_index: int = IGNORE_ID,
        crf: bool = False, crf_image: str = "clip_es",
    ):
        if mode not in ("threshold", "power"):
            raise ValueError(f"mode must be 'threshold' or 'power', got {mode!r}")
        self.thresholds = [float(t) for t in thresholds]
        if not self.thresholds:
            raise ValueError("thresholds is empty; pass at least one background value, e.g. [0.5]")
        self.mode = mode
        self.crf = crf
        self.crf_image = crf_image
        self.matrices = [ConfusionMatrix(num_classes, ignore_index) for _ in self.thresholds]

    def update(self, cams: np.ndarray, class_ids: Sequence[int], target: np.ndarray, image=None) -> ThresholdSweep:
        """Adds one image.

        Args:
            cams: foreground CAMs `[k, H, W]` in [0, 1].
            class_ids: the k 1-based class ids of the maps.
            target: ground-truth mask `[H, W]`.
            image: the RGB image (uint8 `[H, W, 3]` or PIL), needed when the sweep was built with `crf=True`.

        Returns:
            `self`, for chaining.
        """
        for value, matrix in zip(self.thresholds, self.matrices):
            rule = BackgroundRule("threshold", threshold=value) if self.mode == "threshold" else \
                BackgroundRule("power", power=value)
            if self.crf:
                if image is None:
                    raise ValueError("a CRF sweep needs the image: pass update(..., image=np.asarray(rgb_image))")
                pred = scores_to_mask(crf_scores(np.asarray(image), cams, rule, image_mode=self.crf_image), class_ids)
            else:
                pred = cams_to_mask(cams, class_ids, rule)
            matrix.update(pred, target)
        return self

    def merge(self, other: ThresholdSweep) -> ThresholdSweep:
        """Adds the counts of another sweep over the same thresholds and mode (e.g. from another process)."""
        if (other.thresholds, other.mode) != (self.thresholds, self.mode):
            raise ValueError(
                "cannot merge sweeps over different thresholds or modes; build both with the same settings"
            )
        for mine, theirs in zip(self.matrices, other.matrices):
            mine.merge(theirs)
        return self

    def curve(self) -> list[tuple[float, float]]:
        """Returns `(threshold, miou)` for every value, in the given order."""
        return [(value, matrix.miou()) for value, matrix in zip(self.thresholds, self.matrices)]

    def best(self) -> tuple[float, float]:
        """Returns the `(threshold, miou)` with the highest mIoU (the first one on ties)."""
        scores = [miou if not np.isnan(miou) else -np.inf for _, miou in self.curve()]
        index = int(np.argmax(scores))
        return self.thresholds[index], self.matrices[index].miou()


def metric_path() -> str:
    """Path of the shipped `evaluate` metric folder (`metrics/mean_iou`)."""
    return _METRIC_DIR


def load_mean_iou_metric(**kwargs):
    """Loads the shipped mean-IoU metric with `evaluate.load`, offline (no Hub access needed).

    Args:
        **kwargs: passed on to `evaluate.load`.

    Returns:
        An `evaluate.Metric`; its `compute(predictions, references, num_labels, ignore_index)` uses
        [`ConfusionMatrix`].
    """
    import evaluate

    return evaluate.load(_METRIC_DIR, **kwargs)


def evaluate_cams(model, dataset, processor: PoleImageProcessor | None = None, powers: Sequence[float] = (1.0, 2.0),
                  thresholds=None, refine: bool = False, progress: bool = True,
                  class_names: Sequence[str] | None = None, crf: bool = False, crf_image: str = "clip_es",
                  batch_size: int = 8, **cam_kwargs) -> dict:
    """CAM mIoU of a `PolePromptModel` or a `PoleCamNetwork` over a dataset with masks, CLIP-ES style: ground-truth
    labels as targets, background `(1 - max cam) ** t` for each power (and fixed thresholds when given); the best
    setting is reported.

    Args:
        model: the prompt model or CAM network.
        dataset: a `datasets.Dataset` from `pole_hf.data` with `image`, `labels` and `mask`.
        processor: the model's [`PoleImageProcessor`] (`PoleImageProcessor.for_model(model)` when omitted).
        powers: background powers to sweep.
        thresholds: fixed background thresholds to sweep too (e.g. `np.arange(0.1, 0.9, 0.05)`).
        refine: class-aware attention affinity (prompt models).
        progress: show a tqdm bar.
        class_names: names for the table (default: the model's classes).
        crf: also score pseudo masks (a dense CRF on the class scores before the argmax; needs the `crf` extra)
            from the same CAMs, reported under `pseudo_mask`.
        crf_image: the CRF's appearance image (`"clip_es"` or `"rgb"`).
        batch_size: images of one computation size per model call (see `pole_hf.cam_inference.iter_cams`).
        **cam_kwargs: `scales`, `flip`, `max_side` and the model's `get_cams` options (`box_edges`, ...).

    Returns:
        dict with `miou` (best), `bg_power` or `bg_threshold`, `per_class_iou`, `curve`, `skipped` ids, `table`,
        and with `crf=True` the same keys (but `skipped`) for the pseudo masks under `pseudo_mask`.
    """
    processor = processor or PoleImageProcessor.for_model(model)
    if refine:
        cam_kwargs["refine"] = True
    num_labels = model.config.num_classes + 1

    def build(with_crf: bool) -> list[ThresholdSweep]:
        built = [ThresholdSweep(num_labels, powers, mode="power", crf=with_crf, crf_image=crf_image)]
        if thresholds is not None:
            built.append(ThresholdSweep(num_labels, thresholds, mode="threshold", crf=with_crf, crf_image=crf_image))
        return built

    groups = {"cam": build(False), **({"pseudo_mask": build(True)} if crf else {})}
    skipped = []

    def scorable():
        for example in tqdm(iter_examples(dataset), total=len(dataset), disable=not progress, desc="CAM mIoU"):
            if example.image is None or example.mask is None:
                skipped.append(example.id)
            else:
                yield example

    for example, cams in iter_cams(model, processor, scorable(), image=lambda e: e.image,
                                   targets=lambda e: e.targets, batch_size=batch_size, **cam_kwargs):
        maps = np.zeros((0, *example.mask.shape), np.float32) if cams is None else cams.cams.numpy()
        ids = [] if cams is None else [int(i) + 1 for i in cams.class_indices]  # the maps' own classes, in order
        for sweep in (s for sweeps in groups.values() for s in sweeps):  # the CAMs are computed once for all
            sweep.update(maps, ids, example.mask, image=example.image)
    names = ["background", *(class_names or model.config.class_names)]
    result = _best_of(groups["cam"], names)
    result["skipped"] = skipped
    if crf:
        result["pseudo_mask"] = _best_of(groups["pseudo_mask"], names)
    return result


def _best_of(sweeps: Sequence[ThresholdSweep], names: Sequence[str]) -> dict:
    """The best setting over `sweeps`: mIoU, the setting, per-class IoU, curves and a markdown table."""
    sweep, value, miou = max(((sweep, *sweep.best()) for sweep in sweeps), key=lambda item: item[2])
    matrix = sweep.matrices[sweep.thresholds.index(value)]
    key = "bg_power" if sweep.mode == "power" else "bg_threshold"
    return {"miou": float(miou), key: value, "per_class_iou": dict(zip(names, map(float, matrix.iou()))),
            "curve": {s.mode: s.curve() for s in sweeps}, "table": matrix.as_table(names)}
