"""PoleImageProcessor: the pixels around a CAM model. Images of any size in (rounded up to the patch grid, longer side
capped), normalised `pixel_values` out; after the model, its grid CAMs back at the image's size (scales and flips
merged) and the pseudo masks (background rule, dense CRF, ignore) in transformers' `post_process_semantic_segmentation`
convention.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from transformers import AutoImageProcessor, BaseImageProcessor
from transformers.image_processing_utils import BatchFeature
from transformers.processing_utils import ImagesKwargs
from transformers.utils import cached_file
from transformers.utils.constants import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD

from .bundled import resolve_base_path
from .cam import MAX_SIDE, CamOutput
from .images import ImageInputError, load_image
from .masks import CRF_CONFIDENCE, BackgroundRule, class_scores, crf_scores, scores_to_mask

CAM_MERGES = ("mean", "max")
PROCESSOR_FILE = "preprocessor_config.json"


class PoleImageProcessorKwargs(ImagesKwargs, total=False):
    patch_size: int
    max_side: int
    scales: list[float]
    flip: bool
    cam_merge: str
    background: str
    bg_power: float
    bg_threshold: float


class PoleImageProcessor(BaseImageProcessor):
    """Pre- and post-processing of [`PolePromptModel`] (GradCAM) and [`PoleCamNetwork`] CAMs.

    Args:
        image_mean, image_std (`list[float]`): normalisation of [0, 1] RGB pixels (the base CLIP's or network's).
        patch_size (`int`, defaults to 16): computation sizes are rounded up to multiples of it (1 for a network).
        max_side (`int`, defaults to 1024): longer-side cap of the computation; CAMs still come back at image size.
        scales (`list[float]`, defaults to `[1.0]`), flip (`bool`, defaults to `False`): the test-time variants.
        cam_merge (`str`, defaults to `"mean"`): how variants merge: `"mean"` of min-max-normalised GradCAMs
            (CLIP-ES) or `"max"`: their sum divided by its per-class maximum + 1e-5 (IRN/CLIMS `make_cam`).
        background (`str`, defaults to `"power"`), bg_power (`float`, 1.0), bg_threshold (`float`, 0.5): the
            default background rule of the masks (see `pole_hf.masks.BackgroundRule`).
    """

    model_input_names = ["pixel_values"]
    valid_kwargs = PoleImageProcessorKwargs

    def __init__(self, image_mean: Sequence[float] = OPENAI_CLIP_MEAN, image_std: Sequence[float] = OPENAI_CLIP_STD,
                 patch_size: int = 16, max_side: int = MAX_SIDE, scales: Sequence[float] = (1.0,), flip: bool = False,
                 cam_merge: str = "mean", background: str = "power", bg_power: float = 1.0, bg_threshold: float = 0.5,
                 **kwargs):
        kwargs.pop("image_processor_type", None)
        super().__init__(**kwargs)
        self.image_mean = [float(v) for v in image_mean]
        self.image_std = [float(v) for v in image_std]
        if len(self.image_mean) != 3 or len(self.image_std) != 3 or min(self.image_std) <= 0:
            raise ValueError(f"image_mean={self.image_mean} / image_std={self.image_std} need 3 values each, std > 0")
        self.patch_size = int(patch_size)
        self.max_side = check_max_side(max_side)
        self.scales = check_scales(scales)
        self.flip = bool(flip)
        if cam_merge not in CAM_MERGES:
            raise ValueError(f"cam_merge={cam_merge!r} must be one of {CAM_MERGES}")
        self.cam_merge = cam_merge
        self.background, self.bg_power, self.bg_threshold = background, float(bg_power), float(bg_threshold)
        self.background_rule()  # validates

    # ------------------------------------------------------------------ construction
    @classmethod
    def for_model(cls, model) -> PoleImageProcessor:
        """The processor of a model: the one saved beside it (`preprocessor_config.json`), else one built from the
        base CLIP's normalisation and patch size (a prompt model) or the network's config (a CAM network)."""
        if getattr(model.config, "model_type", None) == "pole_cam_network":
            config = model.config
            return cls(image_mean=config.image_mean, image_std=config.image_std, patch_size=1,
                       scales=config.cam_scales, flip=config.cam_flip, cam_merge="max", background="threshold",
                       bg_threshold=config.background_threshold)
        saved = model.config.name_or_path
        if saved and (os.path.isdir(saved) or not os.path.isabs(saved)):
            found = cached_file(saved, PROCESSOR_FILE, _raise_exceptions_for_missing_entries=False,
                                _raise_exceptions_for_connection_errors=False)
            if found:
                with open(found, encoding="utf-8") as handle:
                    settings = json.load(handle)  # read once: for_model runs on every save, pipeline and evaluation
                if settings.get("image_processor_type") == cls.__name__:
                    return cls.from_dict(settings)
        base = base_image_processor(model.config, saved)
        return cls(image_mean=getattr(base, "image_mean", OPENAI_CLIP_MEAN),
                   image_std=getattr(base, "image_std", OPENAI_CLIP_STD),
                   patch_size=model.clip.config.vision_config.patch_size)

    # ------------------------------------------------------------------ pre-processing
    def background_rule(self, background: str | None = None, bg_power: float | None = None,
                        bg_threshold: float | None = None) -> BackgroundRule:
        """The background rule: the processor's defaults, overridden by the given values."""
        return BackgroundRule(self.background if background is None else background,
                              self.bg_power if bg_power is None else bg_power,
                              self.bg_threshold if bg_threshold is None else bg_threshold)

    def variants(self, scales: Sequence[float] | None = None, flip: bool | None = None) -> list[tuple[float, bool]]:
        """The test-time variants ``[(scale, flipped), ...]``, the first one unflipped at the first scale."""
        scales = self.scales if scales is None else check_scales(scales)
        flip = self.flip if flip is None else bool(flip)
        return [(scale, flipped) for scale in scales for flipped in ((False, True) if flip else (False,))]

    def computation_size(self, width: int, height: int, scale: float = 1.0, max_side: int | None = None
                         ) -> tuple[int, int]:
        """`(height, width)` of the CAM computation: the image shrunk to `max_side`, scaled, rounded up to the patch."""
        if min(width, height) < self.patch_size:
            raise ImageInputError(f"image of size {width}x{height} is smaller than one {self.patch_size}x"
                                  f"{self.patch_size} patch: give images of at least {self.patch_size} pixels per side")
        limit = self.max_side if max_side is None else check_max_side(max_side)
        factor = scale * min(1.0, limit / max(width, height))
        patch = self.patch_size
        return (max(1, math.ceil(height * factor / patch)) * patch, max(1, math.ceil(width * factor / patch)) * patch)

    def pixel_values(self, image: Image.Image, size_hw: tuple[int, int]) -> torch.Tensor:
        """Resize (bicubic) an RGB image to `size_hw` and normalise it: ``[1, 3, H, W]``."""
        height, width = size_hw
        resized = image.resize((width, height), Image.BICUBIC) if image.size != (width, height) else image
        array = np.asarray(resized, dtype=np.float32) / 255.0
        array = (array - np.asarray(self.image_mean, np.float32)) / np.asarray(self.image_std, np.float32)
        return torch.from_numpy(np.ascontiguousarray(array.transpose(2, 0, 1)))[None]

    def preprocess(self, images, scale: float = 1.0, flip: bool = False, max_side: int | None = None,
                   return_tensors: str | None = "pt", **unused) -> BatchFeature:
        """Images (paths, URLs, PIL, arrays; one or a list) to `pixel_values` ``[B, 3, H, W]`` at one computation size.

        Args:
            scale: input scale (see [`variants`]); flip: mirror the images horizontally.
            max_side: longer-side cap (default `self.max_side`).

        Returns:
            `BatchFeature` with `pixel_values` (what the models take; the pipelines keep the images' sizes).

        Raises:
            ValueError: images whose computation sizes differ (group them with [`computation_size`] first).
        """
        if isinstance(images, (str, os.PathLike, Image.Image, np.ndarray, torch.Tensor)):
            images = [images]
        images = [load_image(image) for image in images]
        sizes = [self.computation_size(*image.size, scale, max_side) for image in images]
        if len(set(sizes)) > 1:
            raise ValueError(f"images of different computation sizes {sorted(set(sizes))} cannot share a batch: "
                             "group them by PoleImageProcessor.computation_size, or pass one at a time")
        pixels = torch.cat([self.pixel_values(image, size) for image, size in zip(images, sizes)])
        if flip:
            pixels = pixels.flip(-1)
        return BatchFeature({"pixel_values": pixels}, tensor_type=return_tensors)

    # ------------------------------------------------------------------ post-processing
    def post_process_cams(self, outputs, target_sizes: Sequence[tuple[int, int]] | None = None,
                          flips: Sequence[bool] | None = None) -> list[CamOutput]:
        """Per image, its CAMs at `target_sizes` from one model output or a list of them (the [`variants`]).

        Args:
            outputs: model outputs with `cams` ``[B, K, h, w]``, `cam_classes` ``[B, K]`` (`-1` padding) and
                `cam_scores`; several of them (variants of the same images) are merged by `cam_merge`.
            target_sizes: `(height, width)` per image; default the first output's grid.
            flips: whether each output is of mirrored images (default: none).
        """
        outputs = list(outputs) if isinstance(outputs, (list, tuple)) else [outputs]
        flips = [False] * len(outputs) if flips is None else list(flips)
        if len(flips) != len(outputs):
            raise ValueError(f"flips has {len(flips)} entries for {len(outputs)} outputs: give one per output")
        first = outputs[0]
        results = []
        for row in range(first.cams.shape[0]):
            keep = first.cam_classes[row] >= 0
            size = tuple(first.cams.shape[-2:]) if target_sizes is None else tuple(int(v) for v in target_sizes[row])
            total = None
            for output, flipped in zip(outputs, flips):
                grid = output.cams[row][keep].float()
                grid = grid.flip(-1) if flipped else grid
                up = F.interpolate(grid[None], size=size, mode="bilinear", align_corners=False)[0] if len(grid) \
                    else grid.new_zeros(0, *size)  # an image without targets: no maps (interpolate refuses 0)
                total = up if total is None else total + up
            if self.cam_merge == "mean":
                cams = total / len(outputs)
            else:
                cams = total / (total.flatten(1).amax(1).view(-1, 1, 1) + 1e-5)
            results.append(CamOutput(cams=cams.cpu(), class_indices=first.cam_classes[row][keep].cpu(),
                                     scores=first.cam_scores[row][keep].float().cpu(),
                                     grid_cams=first.cams[row][keep].float().cpu()))
        return results

    def segment(self, cam_outputs: Sequence[CamOutput], images: Sequence | None = None,
                background: str | None = None, bg_power: float | None = None, bg_threshold: float | None = None,
                crf: bool = False, crf_image: str = "clip_es", ignore_below: float | None = None) -> list[np.ndarray]:
        """Pseudo masks (uint8 ``[H, W]``: 0 background, class index + 1, 255 ignore) of per-image CAMs.

        Args:
            cam_outputs: from [`post_process_cams`].
            images: the RGB images (PIL or uint8 arrays), needed by `crf=True`.
            background, bg_power, bg_threshold: the background rule (default the processor's).
            crf: dense CRF on the class scores (`pip install pole_hf[crf]`); above `max_side` it runs at the
                computation size and its marginals are upsampled.
            crf_image: the CRF's appearance image: `"clip_es"` (CLIP-ES's BGR-minus-mean wrapped to uint8) or `"rgb"`.
            ignore_below: pixels whose winning score is below this become 255; with `crf` it defaults to 0.95.
        """
        rule = self.background_rule(background, bg_power, bg_threshold)
        if crf and (images is None or len(images) != len(cam_outputs)):
            raise ValueError("crf=True needs the images: pass images=[...] (one per output)")
        masks = []
        for position, output in enumerate(cam_outputs):
            cams = output.cams.numpy().astype(np.float32)
            ids = [int(i) + 1 for i in output.class_indices]
            if crf:
                scores = crf_scores(np.asarray(images[position]), cams, rule, image_mode=crf_image,
                                    max_side=self.max_side)
                floor = CRF_CONFIDENCE if ignore_below is None else ignore_below
            else:
                scores, floor = class_scores(cams, rule), ignore_below
            masks.append(scores_to_mask(scores, ids, ignore_below=floor))
        return masks

    def post_process_semantic_segmentation(self, outputs, target_sizes: Sequence[tuple[int, int]] | None = None,
                                           **segment_options) -> list[torch.Tensor]:
        """Semantic maps ``[H, W]`` (long) per image, values `config.id2label` names: 0 background, class i at i + 1.

        Args:
            outputs: a model output (or a list of variants, see [`post_process_cams`]).
            target_sizes: `(height, width)` per image; default the CAM grid.
            **segment_options: `flips` and the options of [`segment`] (`background`, `crf`, `images`, ...).
        """
        flips = segment_options.pop("flips", None)
        cam_outputs = self.post_process_cams(outputs, target_sizes, flips)
        return [torch.from_numpy(mask.astype(np.int64)) for mask in self.segment(cam_outputs, **segment_options)]


def check_scales(scales) -> list[float]:
    """`scales` as a non-empty list of positive finite numbers, or a one-line `ValueError`."""
    values = list(scales) if isinstance(scales, (list, tuple)) else None
    if not values or not all(isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x) and x > 0
                             for x in values):
        raise ValueError(f"scales={scales!r} must be a non-empty list of positive numbers, e.g. (1.0, 0.5)")
    return [float(x) for x in values]


def check_max_side(max_side) -> int:
    """`max_side` as a positive integer, or a one-line `ValueError`."""
    if isinstance(max_side, bool) or not isinstance(max_side, int) or max_side < 1:
        raise ValueError(f"max_side={max_side!r} must be a positive integer (pixels of the longer side)")
    return max_side


def base_image_processor(config, saved: str | None = None):
    """The base CLIP's own image processor (`CLIPImageProcessor`): from the prompt repo's base subfolder when it
    holds a copy, else from `config.base_model_name_or_path` (the bundled tiny CLIP when `None`); `None` when the
    base has none."""
    try:
        if config.base_subfolder and saved:
            return AutoImageProcessor.from_pretrained(saved, subfolder=config.base_subfolder)
        return AutoImageProcessor.from_pretrained(resolve_base_path(config.base_model_name_or_path),
                                                  revision=config.base_model_revision)
    except (OSError, ValueError):
        return None


__all__ = ["PoleImageProcessor"]
