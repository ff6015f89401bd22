"""`PoleCamPipeline`: images (and optional image-level labels) in, CAMs, a pseudo mask and an overlay out.

Registered with transformers on `import pole_hf` as the task ``"pole-cam"``::

    pipe = pipeline("pole-cam", model="path/or/repo")
    out = pipe("photo.jpg", labels=["dog", "cat"], refine=True, return_overlay=True)
"""

from __future__ import annotations

import numpy as np
from transformers import AutoModel, Pipeline
from transformers.pipelines import PIPELINE_REGISTRY

from .image_processing_pole import PoleImageProcessor, check_max_side, check_scales
from .images import load_image
from .labels import class_indices
from .masks import mask_to_image, overlay


class PoleCamPipeline(Pipeline):
    """CLIP-ES CAMs of a [`PolePromptModel`] (or the CAMs of a [`PoleCamNetwork`]) as a transformers pipeline.

    Call arguments:
        images: a path, URL, PIL image, numpy array, a dict `{"image": ..., "labels": [...]}`, or a list of these.
        labels (`list[str]` or `list[list[str]]`, *optional*): the image's classes (one list per image for a list
            of images); predicted with `config.prediction_threshold` when omitted.
        refine (`bool`, defaults to `False`): class-aware attention affinity refinement.
        scales (`tuple[float]`, defaults to `(1.0,)`; a CAM network's `config.cam_scales`), flip (`bool`; a CAM
            network's `config.cam_flip`): multi-scale / flip averaging.
        background (`str`), bg_power (`float`), bg_threshold (`float`): background score `(1 - max cam) **
            bg_power` or the fixed `bg_threshold`; default the processor's (`"power"`, 1.0 for a prompt model;
            `"threshold"` at the network's `config.background_threshold`, 0.15, for a CAM network).
        box_edges (`str`, defaults to `"clip_es"`): CAA boxes as CLIP-ES (the grid's last row and column are never
            inside a box) or `"full"` (whole boxes, corrected).
        position_embedding (`str`, defaults to `"clip_es"`): bilinear fp16 position embeddings as CLIP-ES, or
            `"bicubic"` (transformers' `interpolate_pos_encoding`).
        crf (`bool`, defaults to `False`): dense CRF on the class scores (needs `pip install pole_hf[crf]`); for
            images above `max_side` it runs at the CAMs' computation size and its marginals are upsampled.
        crf_image (`str`, defaults to `"clip_es"`): the CRF's appearance image: CLIP-ES's BGR-minus-mean cast to
            uint8 (negatives wrap around) or `"rgb"` (the image; corrected).
        ignore_below (`float`, *optional*): pixels whose winning score is below this become 255 in the mask;
            with `crf=True` it defaults to CLIP-ES's 0.95 (pass 0 to keep every pixel).
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
        if not isinstance(self.image_processor, PoleImageProcessor):
            self.image_processor = PoleImageProcessor.for_model(self.model)

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
                             box_edges=None, position_embedding=None, background=None, bg_power=None,
                             bg_threshold=None, crf=None, crf_image=None, ignore_below=None, return_overlay=None,
                             **kwargs):
        if kwargs:
            raise TypeError(f"unknown pole-cam argument(s) {sorted(kwargs)}: use refine, scales, flip, caa_layers, "
                            "max_side, box_edges, position_embedding, background, bg_power, bg_threshold, crf, "
                            "crf_image, ignore_below, return_overlay")
        if scales is not None:
            scales = tuple(check_scales(scales))
        if max_side is not None:
            check_max_side(max_side)
        pre = {k: v for k, v in dict(scales=scales, flip=flip, max_side=max_side).items() if v is not None}
        forward = {k: v for k, v in dict(refine=refine, caa_layers=caa_layers, box_edges=box_edges,
                                         position_embedding=position_embedding).items() if v is not None}
        post = {k: v for k, v in dict(background=background, bg_power=bg_power, bg_threshold=bg_threshold, crf=crf,
                                      crf_image=crf_image, ignore_below=ignore_below,
                                      return_overlay=return_overlay).items()
                if v is not None}
        return pre, forward, post

    def preprocess(self, inputs, scales=None, flip=None, max_side=None):
        labels = None
        if isinstance(inputs, dict):
            if "image" not in inputs:
                raise ValueError("a dict input needs an 'image' key (and optionally 'labels')")
            inputs, labels = inputs["image"], inputs.get("labels")
        image = load_image(inputs)
        indices = None if labels is None else class_indices(labels, self.model.config.class_names, allow_empty=False)
        variants = self.image_processor.variants(scales, flip)
        pixels = [self.image_processor(image, scale=scale, flip=flipped, max_side=max_side)["pixel_values"]
                  for scale, flipped in variants]
        return {"image": image, "class_indices": indices, "pixel_values": pixels, "flips": [f for _, f in variants]}

    def _forward(self, model_inputs, **cam_options):
        if not hasattr(self.model, "get_cams"):
            raise TypeError(f"{type(self.model).__name__} computes no CAMs: give a PolePromptModel or PoleCamNetwork")
        targets = model_inputs["class_indices"]
        outputs = []
        for pixels in model_inputs["pixel_values"]:
            output = self.model.get_cams(pixels.to(self.device), None if targets is None else [targets],
                                         **cam_options)
            targets = [int(c) for c in output.cam_classes[0] if c >= 0]  # predicted once, kept for every variant
            outputs.append(output)
        return {"image": model_inputs["image"], "outputs": outputs, "flips": model_inputs["flips"]}

    def postprocess(self, model_outputs, background=None, bg_power=None, bg_threshold=None, crf=False,
                    crf_image="clip_es", ignore_below=None, return_overlay=False):
        processor, image = self.image_processor, model_outputs["image"]
        output = processor.post_process_cams(model_outputs["outputs"], [(image.height, image.width)],
                                             model_outputs["flips"])[0]
        mask = processor.segment([output], [image], background, bg_power, bg_threshold, crf=crf, crf_image=crf_image,
                                 ignore_below=ignore_below)[0]
        cams = output.cams.numpy().astype(np.float32)
        names = self.model.config.class_names
        result = {
            "labels": [names[int(i)] for i in output.class_indices],
            "scores": [float(s) for s in output.scores],
            "cams": cams,
            "mask": mask_to_image(mask),
        }
        if return_overlay:
            result["overlay"] = overlay(image, cams.max(0) if len(cams) else np.zeros(cams.shape[1:], np.float32))
        return result


PIPELINE_REGISTRY.register_pipeline("pole-cam", pipeline_class=PoleCamPipeline, pt_model=AutoModel, type="image")
