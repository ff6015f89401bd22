"""Mean IoU as a local `evaluate` metric, computed by `pole_hf.evaluation.ConfusionMatrix`.

Load it offline with `evaluate.load("<path>/pole_hf/metrics/mean_iou")` or `pole_hf.evaluation.load_mean_iou_metric()`.
"""


import datasets
import evaluate
import numpy as np

from pole_hf.evaluation import ConfusionMatrix

_DESCRIPTION = """
Mean intersection over union for semantic segmentation: per class, the overlap of predicted and ground-truth pixels
over their union, averaged over the classes present in either. Pixels whose reference is `ignore_index` never count.
"""

_KWARGS_DESCRIPTION = """
Args:
    predictions (`List[ndarray]`): Predicted label maps, one `[H, W]` integer array per image.
    references (`List[ndarray]`): Ground-truth label maps of the same shapes.
    num_labels (`int`): Number of classes, background included.
    ignore_index (`int`): Reference label to leave out (255 for PASCAL VOC).
    nan_to_num (`float`, *optional*): Replace NaN (classes absent from both) by this value in the outputs.
    label_map (`Dict[int, int]`, *optional*): Old id -> new id, applied to the references.
    reduce_labels (`bool`): Map reference 0 to 255 and shift the others down by one (datasets without a background).
    count_ignored_predictions (`bool`): Count predicted `ignore_index` pixels as wrong instead of skipping them.
Returns:
    `mean_iou`, `mean_accuracy`, `overall_accuracy` (floats), `per_category_iou`, `per_category_accuracy` (arrays).
Examples:
    >>> metric = evaluate.load("src/pole_hf/metrics/mean_iou")
    >>> pred, ref = [np.array([[0, 1]])], [np.array([[0, 1]])]
    >>> metric.compute(predictions=pred, references=ref, num_labels=2, ignore_index=255)["mean_iou"]
    1.0
"""

_CITATION = """
@article{everingham2010pascal,
  title={The Pascal Visual Object Classes (VOC) Challenge},
  author={Everingham, Mark and Van Gool, Luc and Williams, Christopher K. I. and Winn, John and Zisserman, Andrew},
  journal={International Journal of Computer Vision}, volume={88}, number={2}, pages={303--338}, year={2010}
}
"""


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class MeanIoU(evaluate.Metric):
    """Mean IoU backed by pole_hf's streaming confusion matrix."""

    def _info(self):
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation=_CITATION,
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features(
                {
                    "predictions": datasets.Sequence(datasets.Sequence(datasets.Value("uint16"))),
                    "references": datasets.Sequence(datasets.Sequence(datasets.Value("uint16"))),
                }
            ),
        )

    def _compute(
        self,
        predictions,
        references,
        num_labels: int,
        ignore_index: int,
        nan_to_num: float | None = None,
        label_map: dict[int, int] | None = None,
        reduce_labels: bool = False,
        count_ignored_predictions: bool = False,
    ):
        matrix = ConfusionMatrix(num_labels, ignore_index, count_ignored_predictions)
        for prediction, reference in zip(predictions, references):
            prediction = np.asarray(prediction, dtype=np.int64)
            reference = np.array(reference, dtype=np.int64)
            if label_map:
                mapped = reference.copy()
                for old_id, new_id in label_map.items():
                    mapped[reference == old_id] = new_id
                reference = mapped
            if reduce_labels:
                reference = np.where(reference == 0, 255, reference - 1)
                reference[reference == 254] = 255
            matrix.update(prediction, reference)
        per_category_iou = matrix.iou()
        per_category_accuracy = matrix.class_accuracy()
        results = {
            "mean_iou": matrix.miou(),
            "mean_accuracy": float(np.nanmean(per_category_accuracy))
            if np.isfinite(per_category_accuracy).any()
            else float("nan"),
            "overall_accuracy": matrix.pixel_accuracy(),
            "per_category_iou": per_category_iou,
            "per_category_accuracy": per_category_accuracy,
        }
        if nan_to_num is not None:
            results = {key: np.nan_to_num(value, nan=nan_to_num) for key, value in results.items()}
        return results
