"""CAMs of images at their own size: processor -> model -> processor, for one image or many (size buckets: images of
the same computation size share one batched forward and backward).

Works with any CAM model that has `get_cams(pixel_values, class_indices, **options)` returning `cams`, `cam_classes`
and `cam_scores` ([`PolePromptModel`]: GradCAM of CLIP; [`PoleCamNetwork`]: the network's maps).
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any, TypeVar

import torch

from .cam import CamOutput
from .image_processing_pole import PoleImageProcessor
from .images import load_image

T = TypeVar("T")


def _device(model) -> torch.device:
    return next(model.parameters()).device


def _targets_of(output, row: int) -> list[int]:
    return [int(c) for c in output.cam_classes[row] if c >= 0]


def image_cams(model, processor: PoleImageProcessor, image, class_indices: Sequence[int] | None = None,
               scales: Sequence[float] | None = None, flip: bool | None = None, max_side: int | None = None,
               **cam_options) -> CamOutput:
    """CAMs of one image at its size, merged over the processor's scales and flips.

    Args:
        model: a CAM model (see the module docstring).
        processor: its [`PoleImageProcessor`].
        image: a path, URL, PIL image or array.
        class_indices: target classes; `None` predicts them on the first variant (then used for all).
        scales, flip, max_side: override the processor's.
        **cam_options: the model's `get_cams` options (`refine`, `box_edges`, ...).
    """
    return batched_cams(model, processor, [image], None if class_indices is None else [list(class_indices)],
                        batch_size=1, scales=scales, flip=flip, max_side=max_side, **cam_options)[0]


def size_buckets(processor: PoleImageProcessor, images: Sequence, max_side: int | None = None
                 ) -> dict[tuple[int, int], list[int]]:
    """Positions of `images` (PIL) grouped by their computation size at scale 1, in first-seen order."""
    buckets: dict[tuple[int, int], list[int]] = defaultdict(list)
    for position, image in enumerate(images):
        buckets[processor.computation_size(*image.size, max_side=max_side)].append(position)
    return dict(buckets)


def batched_cams(model, processor: PoleImageProcessor, images: Sequence, class_indices: Sequence | None = None,
                 batch_size: int = 8, scales: Sequence[float] | None = None, flip: bool | None = None,
                 max_side: int | None = None, **cam_options) -> list[CamOutput]:
    """CAMs of many images, each at its size: images of one computation size go through the model together, up to
    `batch_size` at a time; the result equals one [`image_cams`] call per image (to float rounding).

    Args:
        images: paths, URLs, PIL images or arrays.
        class_indices: per image a list of targets (or `None` to predict that image's); `None` predicts all.
        batch_size: images per model call.

    Returns:
        One `CamOutput` per image, in input order.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size={batch_size} must be at least 1")
    images = [load_image(image) for image in images]
    targets = [None] * len(images) if class_indices is None else [None if c is None else list(c)
                                                                     for c in class_indices]
    if len(targets) != len(images):
        raise ValueError(f"class_indices has {len(targets)} entries for {len(images)} images: give one per image")
    variants = processor.variants(scales, flip)
    device = _device(model)
    results: list[CamOutput | None] = [None] * len(images)
    for positions in size_buckets(processor, images, max_side).values():
        for start in range(0, len(positions), batch_size):
            chunk = positions[start: start + batch_size]
            chosen = [targets[p] for p in chunk]
            outputs = []
            for scale, flipped in variants:
                pixels = processor(images=[images[p] for p in chunk], scale=scale, flip=flipped,
                                   max_side=max_side)["pixel_values"].to(device)
                output = model.get_cams(pixels, chosen, **cam_options)
                chosen = [_targets_of(output, row) for row in range(len(chunk))]  # predicted once, then kept
                outputs.append(output)
            sizes = [(images[p].height, images[p].width) for p in chunk]
            for p, result in zip(chunk, processor.post_process_cams(outputs, sizes, [f for _, f in variants])):
                results[p] = result
    return results


def iter_cams(model, processor: PoleImageProcessor, items: Iterable[T], image: Callable[[T], Any],
              targets: Callable[[T], Sequence[int]], batch_size: int = 8, window: int | None = None,
              **options) -> Iterator[tuple[T, CamOutput | None]]:
    """CAMs of a stream of items, yielded in input order as `(item, cams)`: `window` items at a time (default
    `4 * batch_size`) go to [`batched_cams`], so that images of one computation size share model calls; an item
    with no targets yields `None` without a model call.

    Args:
        items: anything; `image(item)` gives its image and `targets(item)` its target class indices.
        batch_size: images per model call.
        window: items gathered before the model runs (memory: their images and maps).
        **options: `scales`, `flip`, `max_side` and the model's `get_cams` options.
    """
    window = window or 4 * batch_size
    pending: list[T] = []

    def run() -> Iterator[tuple[T, CamOutput | None]]:
        chosen = [list(targets(item)) for item in pending]
        labelled = [position for position, t in enumerate(chosen) if t]
        outputs = batched_cams(model, processor, [image(pending[p]) for p in labelled], [chosen[p] for p in labelled],
                               batch_size=batch_size, **options)
        found = dict(zip(labelled, outputs))
        yield from ((item, found.get(position)) for position, item in enumerate(pending))
        pending.clear()

    for item in items:
        pending.append(item)
        if len(pending) >= window:
            yield from run()
    yield from run()


__all__ = ["batched_cams", "image_cams", "iter_cams", "size_buckets"]
