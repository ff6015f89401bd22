"""GradCAM over CLIP ViT tokens for the learned class prompts (CLIP-ES's method), with attention-affinity refinement.

One forward per image and scale: the blocks before the last run without autograd; only the last block is
differentiated, and the gradients of all target classes come from one batched backward (one cotangent per class).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from transformers.utils import ModelOutput

from .caa import (  # noqa: F401  (box_mask, affinity_from_attention, refine_with_affinity: public here too)
    BOX_THRESHOLD,
    affinity_from_attention,
    box_mask,
    minmax,
    refine_with_affinity,
    refine_with_transition,
    transition_from_attention,
)
from .images import pixel_values as to_pixel_values

CAA_LAYERS = 8
POSITION_EMBEDDINGS = ("clip_es", "bicubic")
MAX_SIDE = 1024
"""Images whose longer side exceeds this are downscaled for the CAM computation; CAMs come back at input size."""


@dataclass
class CamOutput(ModelOutput):
    """CAMs of one image.

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


def _split_heads(x: torch.Tensor, attn) -> torch.Tensor:
    """``[B, T, D]`` -> ``[B, heads, T, head_dim]``."""
    return x.view(x.shape[0], -1, attn.num_heads, attn.head_dim).transpose(1, 2)


def _attention_and_probs(attn, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, output: bool = True):
    """Explicit multi-head attention of ``[B, heads, T, head_dim]`` inputs, one head at a time (one ``[T, T]``
    matrix alive): the merged output ``[B, T, D]`` (`None` when not ``output``) and the head-averaged
    probabilities ``[B, T, T]``, CAA's attention. No autograd."""
    total, mixed = None, []
    with torch.no_grad():
        for head in range(q.shape[1]):
            probs = torch.softmax((q[:, head] @ k[:, head].transpose(-1, -2)) * attn.scale, dim=-1)
            if output:
                mixed.append(probs @ v[:, head])
            total = probs if total is None else total.add_(probs)
    merged = torch.stack(mixed, 1).transpose(1, 2).flatten(2) if output else None
    return merged, total.div_(q.shape[1])


def _layer_with_attention(layer, hidden: torch.Tensor):
    """A CLIP encoder layer's forward that also returns its head-averaged attention probabilities ``[B, T, T]``
    (one pass: the probabilities it computes are the ones it uses)."""
    attn = layer.self_attn
    normed = layer.layer_norm1(hidden)
    q, k, v = (_split_heads(proj(normed), attn) for proj in (attn.q_proj, attn.k_proj, attn.v_proj))
    mixed, probs = _attention_and_probs(attn, q, k, v)
    hidden = hidden + attn.out_proj(mixed)
    return hidden + layer.mlp(layer.layer_norm2(hidden)), probs


def clip_es_position_embeddings(weight: torch.Tensor, grid_h: int, grid_w: int) -> torch.Tensor:
    """CLIP-ES's position embeddings for a ``grid_h x grid_w`` patch grid (its ``clip/model.py``): the patch part
    of ``weight [1 + n*n, D]`` resized bilinearly (``align_corners=False``), then the whole table rounded to fp16,
    at every size (the native grid too). Returns ``[1 + grid_h * grid_w, D]`` in ``weight``'s dtype."""
    side = math.isqrt(weight.shape[0] - 1)
    if side * side != weight.shape[0] - 1:
        raise ValueError(f"position embeddings of {weight.shape[0]} rows are not 1 + a square grid")
    grid = weight[1:].t().reshape(1, -1, side, side).float()
    grid = F.interpolate(grid, size=(grid_h, grid_w), mode="bilinear", align_corners=False)
    table = torch.cat([weight[:1].float(), grid.reshape(weight.shape[1], -1).t()])
    return table.half().to(weight.dtype)


class CamEngine:
    """Computes CLIP-ES GradCAMs for a [`PolePromptModel`].

    Args:
        model: the prompt model (its CLIP stays frozen; the engine never changes it).
    """

    def __init__(self, model):
        self.model = model
        vision = model.clip.vision_model
        self.patch_size = vision.config.patch_size
        self.num_layers = len(vision.encoder.layers)

    def embed(self, pixels: torch.Tensor, position_embedding: str = "clip_es") -> torch.Tensor:
        """Input tokens ``[B, 1 + h*w, D]`` (before ``pre_layrnorm``) of images ``[B, 3, H, W]``.

        Args:
            position_embedding: ``"clip_es"`` (CLIP-ES: bilinear resize, rounded to fp16, see
                [`clip_es_position_embeddings`]) or ``"bicubic"`` (transformers' `interpolate_pos_encoding`).
        """
        if position_embedding not in POSITION_EMBEDDINGS:
            raise ValueError(f"position_embedding must be one of {POSITION_EMBEDDINGS}, got {position_embedding!r}")
        embeddings = self.model.clip.vision_model.embeddings
        if position_embedding == "bicubic":
            return embeddings(pixels, interpolate_pos_encoding=True)
        patch = embeddings.patch_embedding
        patches = patch(pixels.to(patch.weight.dtype)).flatten(2).transpose(1, 2)
        tokens = torch.cat([embeddings.class_embedding.to(patches.dtype).expand(len(pixels), 1, -1), patches], 1)
        table = clip_es_position_embeddings(embeddings.position_embedding.weight,
                                            pixels.shape[-2] // self.patch_size, pixels.shape[-1] // self.patch_size)
        return tokens + table.to(tokens.dtype)[None]

    def _prefix(self, pixels: torch.Tensor, caa_layers: int, position_embedding: str = "clip_es"):
        """Run every block but the last without autograd. The CAA blocks among them run with explicit attention
        and hand back the sum of their head-averaged probabilities ``[B, T, T]`` (`None` without CAA)."""
        vision = self.model.clip.vision_model
        hidden = vision.pre_layrnorm(self.embed(pixels, position_embedding))
        attention = None
        first_caa = self.num_layers - caa_layers
        for index, layer in enumerate(vision.encoder.layers[:-1]):
            if caa_layers and index >= first_caa:
                hidden, probs = _layer_with_attention(layer, hidden)
                attention = probs if attention is None else attention.add_(probs)
            else:
                hidden = layer(hidden, None)
        return hidden, attention

    def grid_cams(self, pixels: torch.Tensor, class_indices: Sequence[int] | None = None, refine: bool = False,
                  caa_layers: int = CAA_LAYERS, box_threshold: float = BOX_THRESHOLD, box_edges: str = "clip_es",
                  position_embedding: str = "clip_es"):
        """CAMs on the patch grid for one image ``[1, 3, H, W]`` (H, W multiples of the patch size).

        Args:
            pixels: the normalised image.
            class_indices: target classes; `None` predicts them (`config.prediction_threshold`).
            refine: class-aware attention affinity (CAA) over the last `caa_layers` blocks' attention.
            box_threshold: CAA's box threshold (fraction of the map's maximum).
            box_edges: ``"clip_es"`` (CLIP-ES: the grid's last row and column never lie inside a CAA box) or
                ``"full"`` (whole boxes); see `pole_hf.caa.box_mask`.
            position_embedding: ``"clip_es"`` (bilinear, fp16) or ``"bicubic"`` (transformers'); see [`embed`].

        Returns:
            ``(grid_cams [k, h, w], class_indices [k], scores [k])``.
        """
        model = self.model
        if pixels.shape[0] != 1:
            raise ValueError(f"grid_cams takes one image at a time, got a batch of {pixels.shape[0]}")
        caa_layers = min(caa_layers, self.num_layers) if refine else 0
        grid_h, grid_w = pixels.shape[-2] // self.patch_size, pixels.shape[-1] // self.patch_size
        num_classes = model.config.num_classes
        with torch.no_grad():
            text = model.get_text_features()
            hidden, attention = self._prefix(pixels.to(model.clip.dtype), caa_layers, position_embedding)
        last = model.clip.vision_model.encoder.layers[-1]
        attn = last.self_attn
        with torch.no_grad():
            target = last.layer_norm1(hidden)  # GradCAM's activations
            projections = [proj(target) for proj in (attn.q_proj, attn.k_proj, attn.v_proj)]
        with torch.enable_grad():
            # q, k, v are the gradient leaves: d/d(target) = sum of dq Wq + dk Wk + dv Wv, and GradCAM only needs its
            # mean over patch tokens, so the three [T, D] x [D, D] products per class shrink to [D] x [D, D]
            leaves = [p.detach().requires_grad_(True) for p in projections]
            q, k_, v = (_split_heads(x, attn) for x in leaves)
            mixed = F.scaled_dot_product_attention(q, k_, v, scale=attn.scale).transpose(1, 2).reshape(target.shape)
            if caa_layers:  # the last block's probabilities from its q, k (the fused kernel keeps autograd lean)
                last_probs = _attention_and_probs(attn, q.detach(), k_.detach(), v, output=False)[1]
            attended = hidden + attn.out_proj(mixed)
            tokens = attended + last.mlp(last.layer_norm2(attended))
            features = F.normalize(model.image_features_from_tokens(tokens), dim=-1)
            logits = model.logit_scale() * features @ text.t().to(features.dtype)
            if class_indices is None:
                probs = logits.detach().softmax(-1)[0, :num_classes]
                chosen = torch.nonzero(probs >= model.config.prediction_threshold).flatten().tolist()
                class_indices = chosen or [int(probs.argmax())]
            indices = torch.as_tensor(list(class_indices), dtype=torch.long, device=logits.device)
            softmax_set = torch.cat([indices, torch.arange(num_classes, logits.shape[-1], device=logits.device)])
            probs = logits[0, softmax_set].float().softmax(-1)[: len(indices)]
            k = len(indices)
            grads = torch.autograd.grad(probs, leaves, grad_outputs=torch.eye(k, dtype=probs.dtype,
                                                                              device=probs.device),
                                        is_grads_batched=True)  # each [k, 1, T, D]
        activations = target[0, 1:].float()  # [N, D]
        weights = sum(grad[:, 0, 1:].float().mean(1) @ proj.weight.float()
                      for grad, proj in zip(grads, (attn.q_proj, attn.k_proj, attn.v_proj)))  # [k, D]
        cams = torch.relu(weights @ activations.t()).view(k, grid_h, grid_w)
        cams = minmax(minmax(cams))  # twice, as CLIP-ES (per layer, then after the layer mean)
        if refine:
            attention = last_probs if attention is None else attention + last_probs
            patch_attention = (attention[0] / caa_layers)[1:, 1:]
            cams = refine_with_transition(cams, transition_from_attention(patch_attention), box_threshold, box_edges)
        return cams, indices, probs.detach()

    def __call__(self, image, processor, class_indices: Sequence[int] | None = None, scales: Sequence[float] = (1.0,),
                 flip: bool = False, refine: bool = False, max_side: int = MAX_SIDE, **kwargs) -> CamOutput:
        """CAMs of one RGB PIL image at its own size (rounded up to the patch grid), averaged over scales/flips.

        Args:
            image: an RGB PIL image (see `pole_hf.images.load_image`).
            processor: the base's image processor (its `image_mean`/`image_std` are used).
            class_indices: target classes; `None` predicts them (`config.prediction_threshold`).
            scales: input scales, each rounded up to a multiple of the patch size.
            flip: also average the horizontally flipped image's maps.
            refine: apply class-aware attention affinity (CAA).
            max_side: longer-side limit for the computation; CAMs still come back at the image's size.
        """
        width, height = image.size
        if min(width, height) < self.patch_size:
            raise ValueError(f"image of size {width}x{height} is smaller than one {self.patch_size}x{self.patch_size} "
                             f"patch: give images of at least {self.patch_size} pixels per side")
        shrink = min(1.0, max_side / max(width, height))
        total, indices, scores, first_grid = None, class_indices, None, None
        for scale in scales:
            factor = scale * shrink
            size = (max(1, math.ceil(height * factor / self.patch_size)) * self.patch_size,
                    max(1, math.ceil(width * factor / self.patch_size)) * self.patch_size)
            pixels = to_pixel_values(image, size, processor.image_mean, processor.image_std)
            pixels = pixels.to(self.model.clip.device)
            variants = [pixels, pixels.flip(-1)] if flip else [pixels]
            for variant_index, variant in enumerate(variants):
                grid, indices, probs = self.grid_cams(variant, indices, refine=refine, **kwargs)
                if variant_index == 1:
                    grid = grid.flip(-1)
                if first_grid is None:
                    first_grid, scores = grid, probs
                up = F.interpolate(grid[None], size=(height, width), mode="bilinear", align_corners=False)[0]
                total = up if total is None else total + up
        cams = total / (len(scales) * (2 if flip else 1))
        return CamOutput(cams=cams.float().cpu(), class_indices=indices.cpu(), scores=scores.float().cpu(),
                         grid_cams=first_grid.float().cpu())
