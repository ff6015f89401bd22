"""WSSS stage 3: a transformers semantic-segmentation model trained on pseudo masks, scored on val.

`build_segmentation_model` (SegFormer by default), `load_pseudo_masks` (stage 2's output as a `datasets.Dataset`),
`SegmentationTrainSet` (random scale / crop / flip) and the accelerate training script
`python -m pole_hf.segmentation.train` (also `examples/train_segmentation.py`).
"""

from .data import (
    SegmentationTrainSet,
    build_pseudo_mask_dataset,
    load_pseudo_masks,
    save_pseudo_mask_dataset,
)
from .modeling import DistributedBatchNorm2d, build_segmentation_model, convert_batch_norms, label_maps

__all__ = [
    "DistributedBatchNorm2d",
    "SegmentationTrainSet",
    "build_pseudo_mask_dataset",
    "build_segmentation_model",
    "convert_batch_norms",
    "label_maps",
    "load_pseudo_masks",
    "save_pseudo_mask_dataset",
]
