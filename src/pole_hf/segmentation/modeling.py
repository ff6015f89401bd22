"""The segmentation network of the last WSSS stage: a transformers semantic-segmentation model and its processor.

SegFormer by default: MiT-b0's shape built offline from a `SegformerConfig` (random weights), or any
`nvidia/mit-b*` / `AutoModelForSemanticSegmentation` checkpoint by name when the Hub (or a local folder) has it.
Labels: 0 background, `i + 1` the dataset's class `i`, 255 ignored by the loss.
"""

from __future__ import annotations

import torch
from torch import nn

IGNORE_INDEX = 255
CONFIG_PRESETS = {
    "mit-b0": {},  # SegformerConfig's defaults are MiT-b0 (hidden sizes 32/64/160/256, depths 2/2/2/2)
    # a quarter of MiT-b0's widths: ~4x faster on a CPU, what `pole-hf run --dataset synthetic` uses
    "mit-small": dict(hidden_sizes=[16, 32, 64, 128], num_attention_heads=[1, 2, 4, 8], decoder_hidden_size=128),
    "tiny": dict(hidden_sizes=[8, 16, 24, 32], depths=[1, 1, 1, 1], num_attention_heads=[1, 1, 1, 1],
                 decoder_hidden_size=32, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
                 classifier_dropout_prob=0.0, drop_path_rate=0.0),
}


def label_maps(class_names: list[str]) -> tuple[dict[int, str], dict[str, int]]:
    """`id2label` / `label2id` with background at 0 and the dataset's classes after it."""
    names = ["background", *class_names]
    if len(set(names)) != len(names):
        raise ValueError(f"class names {class_names} repeat a name (or use 'background'); give each class its own")
    return dict(enumerate(names)), {name: i for i, name in enumerate(names)}


def build_segmentation_model(class_names: list[str], model_name_or_path: str | None = None,
                             config_name: str = "mit-b0", image_size: int = 512, revision: str | None = None):
    """The model and its image processor, labelled with the dataset's classes.

    Args:
        class_names: the dataset's classes (background is added as label 0).
        model_name_or_path: a checkpoint (Hub id or folder) for `AutoModelForSemanticSegmentation`, e.g.
            `nvidia/mit-b0` (encoder weights; a new decode head) or `openmmlab/upernet-convnext-tiny`. None builds a
            SegFormer from `config_name` with random weights, offline.
        config_name: without a checkpoint: `"mit-b0"`, `"tiny"` (tests) or a path to a `SegformerConfig` JSON.
        image_size: the processor's resize target without a checkpoint (the checkpoint's own processor otherwise).
        revision: the checkpoint's revision.

    Returns:
        `(model, image_processor)`.
    """
    from transformers import (
        AutoImageProcessor,
        AutoModelForSemanticSegmentation,
        SegformerConfig,
        SegformerForSemanticSegmentation,
        SegformerImageProcessor,
    )

    id2label, label2id = label_maps(class_names)
    common = dict(num_labels=len(id2label), id2label=id2label, label2id=label2id,
                  semantic_loss_ignore_index=IGNORE_INDEX)
    if model_name_or_path:
        model = AutoModelForSemanticSegmentation.from_pretrained(
            model_name_or_path, revision=revision, ignore_mismatched_sizes=True, **common)
        try:
            processor = AutoImageProcessor.from_pretrained(model_name_or_path, revision=revision)
        except OSError:  # an encoder-only folder without a processor file: SegFormer's defaults
            processor = SegformerImageProcessor(size={"height": image_size, "width": image_size})
    else:
        if config_name in CONFIG_PRESETS:
            config = SegformerConfig(**CONFIG_PRESETS[config_name], **common)
        else:
            config = SegformerConfig.from_json_file(config_name)
            for key, value in common.items():
                setattr(config, key, value)
        model = SegformerForSemanticSegmentation(config)
        processor = SegformerImageProcessor(size={"height": image_size, "width": image_size})
    if getattr(processor, "do_reduce_labels", False):
        processor.do_reduce_labels = False  # our masks already hold 0 = background, 255 = ignore
    return model, processor


class DistributedBatchNorm2d(nn.BatchNorm2d):
    """`BatchNorm2d` whose training statistics are summed over all processes (any backend, CPU/gloo included),
    so N processes with a split batch normalise exactly as one process with the whole batch. Unequal per-process
    batches are fine; `sample_weight` (a `[B]` 0/1 tensor, set with [`set_sample_weights`]) leaves stand-in samples
    out of the statistics (a process left without images by the last batch runs one all-ignored stand-in)."""

    sample_weight: torch.Tensor | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        import torch.distributed as dist

        if not self.training or not (dist.is_available() and dist.is_initialized()):
            return super().forward(x)
        from torch.distributed.nn.functional import all_reduce

        dims = (0, 2, 3)
        weight = torch.ones(x.shape[0], dtype=x.dtype, device=x.device) if self.sample_weight is None \
            else self.sample_weight.to(x.dtype)
        weighted = x * weight.view(-1, 1, 1, 1)
        count = (weight.sum() * x.shape[2] * x.shape[3]).view(1)
        stats = torch.cat([weighted.sum(dims), (weighted * x).sum(dims), count])
        stats = all_reduce(stats)  # autograd-aware: the backward sums the gradients of every process
        channels = x.shape[1]
        total = stats[-1].clamp(min=1)
        mean = stats[:channels] / total
        var = (stats[channels:2 * channels] / total - mean * mean).clamp(min=0)
        with torch.no_grad():
            self.num_batches_tracked += 1
            unbiased = var * total / (total - 1).clamp(min=1)
            self.running_mean.mul_(1 - self.momentum).add_(self.momentum * mean.detach())
            self.running_var.mul_(1 - self.momentum).add_(self.momentum * unbiased.detach())
        shape = (1, channels, 1, 1)
        out = (x - mean.view(shape)) / torch.sqrt(var.view(shape) + self.eps)
        return out * self.weight.view(shape) + self.bias.view(shape) if self.affine else out


def set_sample_weights(module: nn.Module, weight: torch.Tensor | None) -> None:
    """Set (or clear with None) the per-sample statistics weight of every [`DistributedBatchNorm2d`] in `module`."""
    for child in module.modules():
        if isinstance(child, DistributedBatchNorm2d):
            child.sample_weight = weight


def convert_batch_norms(module: nn.Module) -> nn.Module:
    """Swap every `BatchNorm2d` of `module` for a [`DistributedBatchNorm2d`] holding the same parameters and
    statistics (in place; returns `module`). A no-op for the saved model: the class is a `BatchNorm2d`."""
    for name, child in module.named_children():
        if type(child) is nn.BatchNorm2d:
            swapped = DistributedBatchNorm2d(child.num_features, child.eps, child.momentum, child.affine,
                                             child.track_running_stats)
            swapped.load_state_dict(child.state_dict())
            setattr(module, name, swapped.to(child.weight.device if child.affine else "cpu"))
        else:
            convert_batch_norms(child)
    return module
