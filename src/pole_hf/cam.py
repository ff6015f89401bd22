"""GradCAM over CLIP ViT tokens for the class prompts (CLIP-ES's method), batched over images and their classes,
with class-aware attention affinity (CAA) refinement. [`PolePromptModel.get_cams`] and its `forward` call it.

One forward per batch, without autograd (the CAA blocks hand their attention probabilities out of that same pass);
autograd runs only from the pooled feature to the scores, and the backward through the last block is written out
(`_last_block_backward`), batched over every image and target: slot `j` holds the `j`-th target of every image
(images do not interact in a ViT, so this equals one backward per image and class). When the images' target counts
differ, the images with equal counts run together, each group on its own targets, so padded slots cost nothing.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from transformers.utils import ModelOutput

from . import _clip_internals as internals
from ._last_block_backward import gradcam_weights, last_block_forward
from .caa import BOX_THRESHOLD, minmax, refine_with_transition, transition_from_attention

CAA_LAYERS = 8
MAX_SIDE = 1024
"""Images whose longer side exceeds this are downscaled for the CAM computation; CAMs come back at input size."""


@dataclass
class CamOutput(ModelOutput):
    """CAMs of one image, at its size (see `PoleImageProcessor.post_process_cams`).

    Args:
        cams (`torch.FloatTensor` of shape `(k, H, W)`): one map per target class in [0, 1], at the output size.
        class_indices (`torch.LongTensor` of shape `(k,)`): indices into `config.class_names`.
        scores (`torch.FloatTensor` of shape `(k,)`): each target's softmax probability over [targets + background
            words] at the first scale.
        grid_cams (`torch.FloatTensor` of shape `(k, h, w)`): the first scale's maps on the patch grid.
    """

    cams: torch.FloatTensor | None = None
    class_indices: torch.LongTensor | None = None
    scores: torch.FloatTensor | None = None
    grid_cams: torch.FloatTensor | None = None


@dataclass
class GridCams:
    """Batched GradCAMs on the patch grid (fields of [`PoleModelOutput`]).

    Args:
        cams: ``[B, K, h, w]`` maps in [0, 1], `K` the most targets of any image; padded slots are zero.
        cam_classes: ``[B, K]`` the class index of each slot, ``-1`` for padding.
        cam_scores: ``[B, K]`` each target's softmax probability over [the image's targets + background words].
        logits: ``[B, C + num_background]`` scaled similarities to the class, then background, prompts.
        image_embeds: ``[B, projection_dim]`` normalised image features of the CAM forward.
        text_embeds: ``[C + num_background, projection_dim]`` the normalised text features the logits used.
    """

    cams: torch.Tensor
    cam_classes: torch.Tensor
    cam_scores: torch.Tensor
    logits: torch.Tensor
    image_embeds: torch.Tensor
    text_embeds: torch.Tensor


def resolve_targets(class_indices, probs: torch.Tensor, threshold: float, inclusive: bool = True) -> list[list[int]]:
    """Per-image target lists: given (one list per image; a flat list for a batch of one) or predicted from
    `probs` ``[B, C]`` (classes at or above `threshold`, or strictly above it when not `inclusive`; else the most
    likely one)."""
    batch, num_classes = probs.shape
    if class_indices is None:
        lists = [None] * batch
    elif batch == 1 and all(isinstance(i, int) for i in class_indices):
        lists = [list(class_indices)]
    else:
        lists = [None if c is None else [int(i) for i in c] for c in class_indices]
    if len(lists) != batch:
        raise ValueError(f"class_indices has {len(lists)} entries for a batch of {batch} images: give one list "
                         "of class indices per image (None to predict that image's)")
    out = []
    for row, given in zip(probs.detach().float(), lists):
        if given is None:
            chosen = torch.nonzero(row >= threshold if inclusive else row > threshold).flatten().tolist()
            given = chosen or [int(row.argmax())]
        bad = [i for i in given if not 0 <= i < num_classes]
        if bad:
            raise ValueError(f"class indices {bad} are out of range for {num_classes} classes")
        out.append(given)
    return out


def padded_targets(targets: Sequence[Sequence[int]], device=None) -> torch.Tensor:
    """``[B, K]`` class index per slot (`K` the most targets of any image), ``-1`` for padding."""
    classes = torch.full((len(targets), max((len(t) for t in targets), default=0)), -1, dtype=torch.long)
    for row, chosen in enumerate(targets):
        classes[row, : len(chosen)] = torch.as_tensor(list(chosen), dtype=torch.long)
    return classes.to(device)


def gradcam(model, pixel_values: torch.Tensor, class_indices: Sequence | None = None, refine: bool = False,
            caa_layers: int = CAA_LAYERS, box_threshold: float = BOX_THRESHOLD, box_edges: str = "clip_es",
            position_embedding: str = "clip_es") -> GridCams:
    """CLIP-ES GradCAMs of a batch of same-size images on the patch grid.

    Args:
        model: a [`PolePromptModel`] (nothing in it changes).
        pixel_values: ``[B, 3, H, W]`` normalised images, H and W multiples of the patch size.
        class_indices: per image a list of class indices (`None` or a `None` entry predicts them with
            `config.prediction_threshold`); a flat list for a batch of one.
        refine: CAA over the last `caa_layers` blocks' attention.
        box_threshold: CAA's box threshold (fraction of the map's maximum).
        box_edges: ``"clip_es"`` (the grid's last row and column never lie inside a box) or ``"full"``.
        position_embedding: ``"clip_es"`` (bilinear, fp16) or ``"bicubic"`` (transformers').
    """
    vision = model.clip.vision_model
    patch = vision.config.patch_size
    batch, _, height, width = pixel_values.shape
    if height % patch or width % patch:
        raise ValueError(f"pixel_values of size {height}x{width} are not multiples of the {patch}-pixel patch: "
                         "use PoleImageProcessor (it rounds sizes up to the patch grid)")
    num_layers, num_classes = len(vision.encoder.layers), model.config.num_classes
    caa_layers = min(caa_layers, num_layers) if refine else 0
    grid_h, grid_w = height // patch, width // patch
    with torch.no_grad():
        text = model.get_text_features()
        hidden, attention = internals.vision_prefix(vision, pixel_values, caa_layers, position_embedding)
        state = last_block_forward(vision, hidden)
        pooled = internals.pool_tokens(model.clip, state.tokens, model.config.image_feature)
    with torch.enable_grad():
        # autograd only from the pooled feature on (projection, adapters, logits, softmax); the last block's backward
        # is written out (`_last_block_backward`): most of it is shared by all targets
        leaf = pooled.detach().requires_grad_(True)
        features = F.normalize(model.image_features_from_pooled(leaf), dim=-1)
        logits = model.get_logit_scale() * features @ text.t()
        targets = resolve_targets(class_indices, logits.detach().float().softmax(-1)[:, :num_classes],
                                  model.config.prediction_threshold)
        classes = padded_targets(targets, logits.device)
        slots = classes.shape[1]
        allowed = torch.zeros(logits.shape, dtype=torch.bool, device=logits.device)
        allowed[:, num_classes:] = True
        valid = classes >= 0
        allowed[torch.arange(batch, device=logits.device)[:, None].expand_as(classes)[valid], classes[valid]] = True
        probs = logits.float().masked_fill(~allowed, float("-inf")).softmax(-1)  # over each image's targets + bg
        picked = probs.gather(1, classes.clamp_min(0))  # [B, K]
        pooled_grads = None
        if slots:
            cotangents = torch.zeros(slots, batch, slots, dtype=picked.dtype, device=picked.device)
            cotangents[torch.arange(slots), :, torch.arange(slots)] = (classes >= 0).t().to(picked.dtype)
            (pooled_grads,) = torch.autograd.grad(picked, leaf, grad_outputs=cotangents, is_grads_batched=True)
    if pooled_grads is None:
        cams = state.target.new_zeros(batch, 0, grid_h, grid_w).float()
    else:
        weights, last = gradcam_weights(vision, state, pooled_grads, model.config.image_feature, attention=refine,
                                        counts=[len(chosen) for chosen in targets])  # no backward for padding
        maps = torch.relu(torch.einsum("kbd,bnd->bkn", weights, state.target[:, 1:].float()))
        cams = minmax(minmax(maps.reshape(batch * slots, grid_h, grid_w)))  # twice, as CLIP-ES (layer, then mean)
        cams = cams.view(batch, slots, grid_h, grid_w)
        if refine:
            attention = last if attention is None else attention + last
            cams = cams.clone()
            for row, chosen in enumerate(targets):
                if not chosen:
                    continue
                # the sum over the CAA blocks, not their mean: the transition's Sinkhorn rounds remove any scale
                patch_attention = attention[row, 1:, 1:]
                cams[row, : len(chosen)] = refine_with_transition(
                    cams[row, : len(chosen)], transition_from_attention(patch_attention), box_threshold, box_edges)
        cams = cams * (classes >= 0)[:, :, None, None]
    scores = torch.where(classes >= 0, picked.detach(), torch.zeros_like(picked.detach()))
    return GridCams(cams=cams, cam_classes=classes, cam_scores=scores, logits=logits.detach(),
                    image_embeds=features.detach(), text_embeds=text)


__all__ = ["CAA_LAYERS", "MAX_SIDE", "CamOutput", "GridCams", "gradcam", "padded_targets", "resolve_targets"]
