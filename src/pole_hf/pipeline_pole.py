"""`PoleCamPipeline`: images (and optional image-level labels) in, CAMs, a pseudo mask and an overlay out.

Registered with transformers on `import pole_hf` as the task ``"pole-cam"``::

    pipe = pipeline("pole-cam", model="path/or/repo")
    out = pipe("photo.jpg", labels=["dog", "cat"], refine=True, return_overlay=True)
"""

from __future__ import annotations

import math

import numpy as np
from transformers import AutoModel, Pipeline
from transformers.pipelines import PIPELINE_REGISTRY

from .cam import CAA_LAYERS, MAX_SIDE, CamEngine
from .images import load_image
from .labels import class_indices
from .masks import class_scores, crf_refine, mask_to_image, overlay, scores_to_mask


def load_image_processor(model):
    """The base CLIP's image processor (from the base's folder or repo, or the bundled tiny CLIP); for a
    [`PoleCamNetwork`], its normalisation (`config.image_mean` / `image_std`)."""
    from transformers import AutoImageProcessor

    if is_cam_network(model):
        from types import SimpleNamespace

        return SimpleNamespace(image_mean=list(model.config.image_mean), image_std=list(model.config.image_std))

    from .loading import resolve_base_path

    config = model.config
    if config.base_subfolder and config.name_or_path:
        return AutoImageProcessor.from_pretrained(config.name_or_path, subfolder=config.base_subfolder)
    return AutoImageProcessor.from_pretrained(resolve_base_path(config.base_model_name_or_path),
                                              revision=config.base_model_revision)


def is_cam_network(model) -> bool:
    """Whether `model` is a [`PoleCamNetwork`] (CAMs from the network, not GradCAM of CLIP)."""
    return getattr(model.config, "model_type", None) == "pole_cam_network"


def cam_engine(model):
    """The CAM engine of a model: [`CamEngine`] (GradCAM) for a prompt model, the network's own for a CAM network."""
    if is_cam_network(model):
        from .modeling_pole_cam_network import CamNetworkEngine

        return CamNetworkEngine(model)
    return CamEngine(model)


class PoleCamPipeline(Pipeline):
    """CLIP-ES CAMs of a [`PolePromptModel`] (or the CAMs of a [`PoleCamNetwork`]) as a transformers pipeline.

    Call arguments:
        images: a path, URL, PIL image, numpy array, a dict `{"image": ..., "labels": [...]}`, or a list of these.
        labels (`list[str]` or `list[list[str]]`, *optional*): the image's classes (one list per image for a list
            of images); predicted with `config.prediction_threshold` when omitted.
        refine (`bool`, defaults to `False`): class-aware attention affinity refinement.
        scales (`tuple[float]`, defaults to `(1.0,)`; a CAM network's `config.cam_scales`), flip (`bool`; a CAM
            network's `config.cam_flip`): multi-scale / flip averaging.
        background (`str`, defaults to `"power"`), bg_power (`float`, 1.0), bg_threshold (`float`, 0.5): background
            score `(1 - max cam) ** bg_power` or the fixed `bg_threshold`.
        crf (`bool`, defaults to `False`): dense CRF on the class scores (needs `pip install pole_hf[crf]`).
        ignore_below (`float`, *optional*): pixels whose winning score is below this become 255 in the mask.
        return_overlay (`bool`, defaults to `False`): also return a heatmap blend of the strongest CAM.

    Returns (per image): `labels`, `scores`, `cams` (float32 `[k, H, W]` at the input size), `mask` (PIL "P"
    image, VOC palette, 0 background, 255 ignore) and `overlay` when asked.
    """

    _load_processor = False
    _load_image_processor = False
    _load_feature_extractor = False
    _load_tokenizer = False

    def __init__(self, model, image_processor=None, **kwargs):
        super().__init__(model=model, image_processor=image_processor, **kwargs)
        if self.image_processor is None:
            self.image_processor = load_image_processor(self.model)
        self.engine = cam_engine(self.model)

    def get_iterator(self, inputs, num_workers, batch_size, preprocess_params, forward_params, postprocess_params):
        # images of different sizes do not stack: `batch_size` is accepted and each image is computed on its own
        return super().get_iterator(inputs, num_workers, 1, preprocess_params, forward_params, postprocess_params)

    def __call__(self, images, labels=None, **kwargs):
        if isinstance(images, (list, tuple)) and not images:
            return []
        if isinstance(images, (list, tuple)):
            if labels is not None and len(labels) and isinstance(labels[0], (list, tuple)):
                if len(labels) != len(images):
                    raise ValueError(f"got {len(labels)} label lists for {len(images)} images: give one per image")
                images = [{"image": im, "labels": lab} for im, lab in zip(images, labels)]
            elif labels is not None:
                images = [{"image": im, "labels": labels} for im in images]
            return super().__call__(list(images), **kwargs)
        if labels is not None:
            images = {"image": images, "labels": labels}
        return super().__call__(images, **kwargs)

    def _sanitize_parameters(self, refine=None, scales=None, flip=None, caa_layers=None, max_side=None,
                             background=None, bg_power=None, bg_threshold=None, crf=None, ignore_below=None,
                             return_overlay=None, **kwargs):
        if kwargs:
            raise TypeError(f"unknown pole-cam argument(s) {sorted(kwargs)}: use refine, scales, flip, caa_layers, "
                            "max_side, background, bg_power, bg_threshold, crf, ignore_below, return_overlay")
        if scales is not None:
            scales = tuple(scales)
            if not scales or not all(isinstance(x, (int, float)) and math.isfinite(x) and x > 0 for x in scales):
                raise ValueError(f"scales={scales!r} must be a non-empty list of positive numbers, e.g. (1.0, 0.5)")
        if max_side is not None and (isinstance(max_side, bool) or not isinstance(max_side, int) or max_side < 1):
            raise ValueError(f"max_side={max_side!r} must be a positive integer (pixels of the longer side)")
        forward = {k: v for k, v in dict(refine=refine, scales=scales, flip=flip, caa_layers=caa_layers,
                                         max_side=max_side).items() if v is not None}
        post = {k: v for k, v in dict(background=background, bg_power=bg_power, bg_threshold=bg_threshold, crf=crf,
                                      ignore_below=ignore_below, return_overlay=return_overlay).items()
                if v is not None}
        return {}, forward, post

    def preprocess(self, inputs):
        labels = None
        if isinstance(inputs, dict):
            if "image" not in inputs:
                raise ValueError("a dict input needs an 'image' key (and optionally 'labels')")
            inputs, labels = inputs["image"], inputs.get("labels")
        image = load_image(inputs)
        patch = self.engine.patch_size
        if min(image.size) < patch:
            raise ValueError(f"image of size {image.size[0]}x{image.size[1]} is smaller than one {patch}x{patch} "
                             f"patch: give images of at least {patch} pixels per side")
        names = self.model.config.class_names
        indices = None if labels is None else class_indices(labels, names, allow_empty=False)
        return {"image": image, "class_indices": indices}

    def _forward(self, model_inputs, refine=False, scales=None, flip=None, caa_layers=CAA_LAYERS,
                 max_side=MAX_SIDE):
        if not is_cam_network(self.model):  # GradCAM's defaults; a CAM network keeps its config's
            scales, flip = (1.0,) if scales is None else scales, bool(flip)
        output = self.engine(model_inputs["image"], self.image_processor, model_inputs["class_indices"],
                             scales=None if scales is None else tuple(scales), flip=flip, refine=refine,
                             max_side=max_side, caa_layers=caa_layers)
        return {"image": model_inputs["image"], "cam_output": output}

    def postprocess(self, model_outputs, background="power", bg_power=1.0, bg_threshold=0.5, crf=False,
                    ignore_below=None, return_overlay=False):
        output, image = model_outputs["cam_output"], model_outputs["image"]
        cams = output.cams.numpy().astype(np.float32)
        class_ids = [int(i) + 1 for i in output.class_indices]
        scores = class_scores(cams, background=background, bg_power=bg_power, bg_threshold=bg_threshold)
        if crf:
            scores = crf_refine(np.asarray(image), scores)
        names = self.model.config.class_names
        result = {
            "labels": [names[int(i)] for i in output.class_indices],
            "scores": [float(s) for s in output.scores],
            "cams": cams,
            "mask": mask_to_image(scores_to_mask(scores, class_ids, ignore_below=ignore_below)),
        }
        if return_overlay:
            result["overlay"] = overlay(image, cams.max(0) if len(cams) else np.zeros(cams.shape[1:], np.float32))
        return result


PIPELINE_REGISTRY.register_pipeline("pole-cam", pipeline_class=PoleCamPipeline, pt_model=AutoModel, type="image")
