"""POLE's training losses (CLIMS's OTM, BTM and CBS) on CAM-masked images, for the learnable class prompts.

For an image ``x`` with class ``k`` and its CAM ``P_k`` in [0, 1] (computed by the caller from the current prompts,
detached, resized to the image): foreground image ``P_k * x``, background image ``(1 - P_k) * x``. With ``f(.)`` the
model's L2-normalised image feature, ``t_k`` the normalised text feature of class ``k``'s prompt and ``b_j`` those of
the background prompts, the score is the plain cosine similarity ``s(v, t) = f(v) . t`` (no softmax, no logit
scale), clamped to ``[lo, hi]`` (POLE: ``[1e-4, 0.9999]``):

- ``L_OTM = -mean_{(x,k)} log clamp(s(P_k x, t_k))``: the object's image should match its prompt;
- ``L_BTM = -mean_{(x,k)} log(1 - clamp(s((1 - P_k) x, t_k)))``: what the CAM leaves out should not;
- ``L_CBS = -sum_{(x,k), j : s(P_k x, b_j) > tau} log(1 - clamp(s(P_k x, b_j)))`` with ``tau = 0.26``: the
  foreground image should not look like background stuff (a sum over pairs above the threshold, not a mean);
- ``L = w_otm L_OTM + w_btm L_BTM + w_cbs L_CBS`` with POLE's weights 10 / 25 / 1.

A score outside the clamp range passes no gradient (as in CLIMS): a foreground image whose cosine with its prompt
is at most 1e-4 does not pull the prompt in OTM.

``f`` is the model's image feature (``config.image_feature``: CLIP-ES's patch mean by default) unless
``PoleObjective(image_feature="pooled")`` asks for CLIP's own pooled feature, which is what CLIMS scores with (its
0.26 CBS threshold and the 1e-4 clamp were set for that feature's cosine range).

Sources: CLIMS (Xie et al., CVPR 2022) ``CVI-SZU/CLIMS`` ``clip_loss.py`` (``SimMaxLoss``, ``SimMinLoss``,
``BackgroundSuppressionLoss``), ``clip_utils.py`` (``clip_forward``: cosine similarity of normalised features) and
``step/train_clims.py`` (masking ``cam * img`` and ``(1 - cam) * img``); POLE ``run_CLIMS.sh --hyper
10.0,25.0,1.0,0.0``. Differences: CLIMS's CBS does not clamp (here the upper clamp keeps ``s -> 1`` finite), and
CLIMS trains the CAM network through the masks while here the CAMs are fixed and the text prompts (plus optional
adapters) learn.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from transformers.utils import ModelOutput

POLE_LOSS_WEIGHTS: dict[str, float] = {"otm": 10.0, "btm": 25.0, "cbs": 1.0}
"""POLE's loss weights (run_CLIMS.sh ``--hyper 10.0,25.0,1.0,0.0``)."""
CBS_SIMILARITY_THRESHOLD: float = 0.26
"""CLIMS's background-suppression threshold on the similarity."""
SCORE_CLAMP: tuple[float, float] = (0.0001, 0.9999)
"""CLIMS's clamp of the scores before the logs."""


@dataclass
class PoleLossOutput(ModelOutput):
    """Output of [`PoleObjective`].

    Args:
        loss (`torch.FloatTensor` of shape `()`): ``w_otm * otm + w_btm * btm + w_cbs * cbs``.
        otm (`torch.FloatTensor` of shape `()`): object-text matching loss (unweighted).
        btm (`torch.FloatTensor` of shape `()`): background-text matching loss (unweighted).
        cbs (`torch.FloatTensor` of shape `()`): co-occurring background suppression loss (unweighted).
        fg_scores (`torch.FloatTensor` of shape `(pairs,)`): ``s(P_k x, t_k)`` before clamping.
        bg_scores (`torch.FloatTensor` of shape `(pairs,)`): ``s((1 - P_k) x, t_k)`` before clamping.
        cbs_pairs (`torch.LongTensor` of shape `()`): (pair, background prompt) similarities above the threshold.
    """

    loss: torch.FloatTensor | None = None
    otm: torch.FloatTensor | None = None
    btm: torch.FloatTensor | None = None
    cbs: torch.FloatTensor | None = None
    fg_scores: torch.FloatTensor | None = None
    bg_scores: torch.FloatTensor | None = None
    cbs_pairs: torch.LongTensor | None = None


def check_pairs(cams, num_images: int, image_indices=None) -> tuple[torch.Tensor, torch.Tensor]:
    """One map per (image, class) pair, ``[P, h, w]``, and the image of each: `image_indices` ``[P]``, or none when
    every image has one map (P == N). Other layouts convert first: [`pairs_from_cams`] (a model's padded output),
    [`pairs_from_lists`] (per-image lists).

    Returns:
        ``(maps [P, h, w], image_indices [P])``.
    """
    cams = torch.as_tensor(cams)
    if cams.ndim != 3:
        raise ValueError(f"CAMs of shape {tuple(cams.shape)}: give [P, h, w], one map per (image, class) pair "
                         "(pairs_from_cams / pairs_from_lists convert other layouts)")
    if image_indices is None:
        if cams.shape[0] != num_images:
            raise ValueError(f"{cams.shape[0]} CAMs for {num_images} images: pass image_indices to say which image "
                             "each map belongs to")
        return cams, torch.arange(num_images)
    index = torch.as_tensor(image_indices, dtype=torch.long).flatten()
    if index.numel() != cams.shape[0] or (index.numel() and not 0 <= int(index.min()) <= int(index.max()) <
                                           num_images):
        raise ValueError(f"image_indices {index.tolist()} must give an image in [0, {num_images}) for each of the "
                         f"{cams.shape[0]} maps")
    return cams, index


def pairs_from_cams(cams: torch.Tensor, cam_classes: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The (image, class) pairs of a model's CAM output (`cams [B, K, h, w]`, `cam_classes [B, K]`, `-1` padding):
    ``(maps [P, h, w], image_indices [P], class_indices [P])``."""
    valid = cam_classes >= 0
    rows = torch.arange(cams.shape[0], device=cam_classes.device)[:, None].expand_as(cam_classes)
    return cams[valid.to(cams.device)], rows[valid].cpu(), cam_classes[valid].cpu()


def pairs_from_lists(cams: Sequence, class_indices: Sequence[Sequence[int]]
                     ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The (image, class) pairs of per-image maps ``[k_i, h, w]`` and their class lists:
    ``(maps [P, h, w], image_indices [P], class_indices [P])``."""
    if len(cams) != len(class_indices):
        raise ValueError(f"got CAMs for {len(cams)} images but {len(class_indices)} label lists: give one [k, h, w] "
                         "tensor and one class list per image")
    maps = [torch.as_tensor(c) for c in cams]
    maps = [m[None] if m.ndim == 2 else m for m in maps]
    classes = [torch.as_tensor(list(c), dtype=torch.long).flatten() for c in class_indices]
    for position, (m, c) in enumerate(zip(maps, classes)):
        if m.shape[0] != c.numel():
            raise ValueError(f"image {position} has {m.shape[0]} maps for {c.numel()} classes: one map per class")
    if not maps:  # no images: no pairs (torch.cat refuses an empty list)
        return torch.zeros(0, 0, 0), torch.zeros(0, dtype=torch.long), torch.zeros(0, dtype=torch.long)
    index = torch.cat([torch.full((m.shape[0],), i, dtype=torch.long) for i, m in enumerate(maps)])
    return torch.cat(maps), index, torch.cat(classes)


def masked_images(pixel_values: torch.Tensor, cams, image_indices=None, size: tuple[int, int] | None = None,
                  image_mean: Sequence[float] | None = None, image_std: Sequence[float] | None = None,
                  detach: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """Foreground and background images ``P_k * x`` and ``(1 - P_k) * x`` for every (image, class) pair.

    Args:
        pixel_values (`torch.FloatTensor` of shape `(N, 3, H, W)`): processed (normalised) images.
        cams: ``[P, h, w]`` maps, one per (image, class) pair (see [`check_pairs`]); resized (bilinear) to the
            images, clipped to [0, 1],
            detached unless `detach=False`.
        image_indices: ``[P]`` the image of each map (none when P == N).
        size: resize images and maps to this `(height, width)` first (CLIMS squashes both to CLIP's 224).
        image_mean, image_std: when given, masking happens in [0, 1] pixel space (masked-out parts turn black,
            as in POLE's masked images); otherwise on the normalised values as CLIMS does (they turn the mean colour).
        detach: cut the maps from the graph (prompt learning); `False` lets gradients reach the maps (CLIMS's CAM
            network learns through the masks).

    Returns:
        ``(fg, bg)``, each ``[P, 3, H, W]`` (or ``size``), pairs in map order.
    """
    maps, index = check_pairs(cams, pixel_values.shape[0], image_indices)
    pixels = pixel_values.detach()
    if size is not None and tuple(pixels.shape[-2:]) != tuple(size):
        pixels = F.interpolate(pixels, size=size, mode="bilinear", align_corners=False)
    maps = (maps.detach() if detach else maps).to(device=pixels.device, dtype=pixels.dtype)[:, None]
    if tuple(maps.shape[-2:]) != tuple(pixels.shape[-2:]):
        maps = F.interpolate(maps, size=pixels.shape[-2:], mode="bilinear", align_corners=False)
    maps = maps.clamp(0, 1)
    images = pixels[index.to(pixels.device)]
    if (image_mean is None) != (image_std is None):
        raise ValueError("give both image_mean and image_std (pixel-space masking) or neither")
    if image_mean is None:
        return maps * images, (1 - maps) * images
    mean = torch.as_tensor(image_mean, dtype=pixels.dtype, device=pixels.device).view(1, -1, 1, 1)
    std = torch.as_tensor(image_std, dtype=pixels.dtype, device=pixels.device).view(1, -1, 1, 1)
    raw = images * std + mean
    return (maps * raw - mean) / std, ((1 - maps) * raw - mean) / std


def otm_loss(scores: torch.Tensor, clamp: tuple[float, float] = SCORE_CLAMP) -> torch.Tensor:
    """Object-text matching ``-mean log clamp(s)`` (CLIMS `SimMaxLoss`)."""
    return -torch.log(scores.clamp(*clamp)).mean()


def btm_loss(scores: torch.Tensor, clamp: tuple[float, float] = SCORE_CLAMP) -> torch.Tensor:
    """Background-text matching ``-mean log(1 - clamp(s))`` (CLIMS `SimMinLoss`)."""
    return -torch.log(1 - scores.clamp(*clamp)).mean()


def cbs_loss(similarity: torch.Tensor, threshold: float = CBS_SIMILARITY_THRESHOLD,
             clamp: tuple[float, float] = SCORE_CLAMP) -> tuple[torch.Tensor, torch.Tensor]:
    """Background suppression ``-sum_{s > threshold} log(1 - clamp(s))`` over a similarity matrix (CLIMS
    `BackgroundSuppressionLoss`). Returns ``(loss, number of counted entries)``."""
    above = similarity.detach() > threshold
    terms = -torch.log(1 - similarity.clamp(*clamp))
    return torch.where(above, terms, torch.zeros_like(terms)).sum(), above.sum()


class PoleObjective(nn.Module):
    """POLE's weighted OTM + BTM + CBS loss on CAM-masked images (formulas and sources in the module docstring).

    Args:
        weights (`dict[str, float]`, *optional*): `{"otm", "btm", "cbs"}` weights; missing keys keep POLE's
            10 / 25 / 1.
        cbs_threshold (`float`, *optional*, defaults to 0.26): CBS counts similarities above this.
        clamp (`tuple[float, float]`, *optional*, defaults to `(1e-4, 0.9999)`): score clamp before the logs.
        image_feature (`str`, *optional*): `"pooled"` (CLIP's class-token feature, as CLIMS) or `"patch_mean"`
            (CLIP-ES); `None` uses the model's `config.image_feature`. Visual adapters apply either way.

    Example:
        ```python
        cams = model.get_cams(pixels, labels)  # labels: per-image lists of class indices; no grad needed
        maps, images, classes = pairs_from_cams(cams.cams, cams.cam_classes)
        out = objective(model, pixels, maps, classes, image_indices=images)
        out.loss.backward()
        ```
    """

    def __init__(self, weights: Mapping[str, float] | None = None,
                 cbs_threshold: float = CBS_SIMILARITY_THRESHOLD, clamp: tuple[float, float] = SCORE_CLAMP,
                 image_feature: str | None = None):
        super().__init__()
        if image_feature not in (None, "pooled", "patch_mean"):
            raise ValueError(f"image_feature={image_feature!r} must be 'pooled', 'patch_mean' or None (the model's)")
        self.image_feature = image_feature
        unknown = sorted(set(weights or {}) - set(POLE_LOSS_WEIGHTS))
        if unknown:
            raise ValueError(f"unknown loss weights {unknown}: use the keys {sorted(POLE_LOSS_WEIGHTS)}")
        self.weights = {**POLE_LOSS_WEIGHTS, **{k: float(v) for k, v in (weights or {}).items()}}
        low, high = (float(c) for c in clamp)
        if not 0 < low < high < 1:
            raise ValueError(f"clamp={clamp} must satisfy 0 < low < high < 1 so both logs stay finite")
        self.clamp = (low, high)
        self.cbs_threshold = float(cbs_threshold)

    def extra_repr(self) -> str:
        return (f"weights={self.weights}, cbs_threshold={self.cbs_threshold}, clamp={self.clamp}, "
                f"image_feature={self.image_feature}")

    def image_features(self, model, pixel_values: torch.Tensor) -> torch.Tensor:
        """L2-normalised features ``[N, D]`` of (masked) images: frozen CLIP, gradients only into visual adapters."""
        return model.get_image_features(pixel_values, image_feature=self.image_feature)

    def losses(self, fg_features: torch.Tensor, bg_features: torch.Tensor, text_features: torch.Tensor,
               class_indices: torch.Tensor, num_classes: int, pair_share: float = 1.0) -> PoleLossOutput:
        """The losses from L2-normalised features.

        Args:
            fg_features (`torch.FloatTensor` of shape `(P, D)`): features of the foreground images.
            bg_features (`torch.FloatTensor` of shape `(P, D)`): features of the background images.
            text_features (`torch.FloatTensor` of shape `(C + B, D)`): class prompts, then background prompts.
            class_indices (`torch.LongTensor` of shape `(P,)`): the class of each pair.
            num_classes: C.
            pair_share: this batch's share of the pairs of a global batch split over processes (its pairs over
                all pairs): OTM and BTM are means over pairs, so `loss` weighs them by it, and the sum of the
                processes' gradients is the global batch's (CBS is a sum and needs no share).
        """
        text = text_features.float()
        fg, bg = fg_features.float(), bg_features.float()
        if fg.shape[0] == 0:
            zero = text.sum() * 0.0 + fg.sum() * 0.0
            return PoleLossOutput(loss=zero, otm=zero, btm=zero, cbs=zero, fg_scores=fg.new_zeros(0),
                                  bg_scores=fg.new_zeros(0), cbs_pairs=torch.zeros((), dtype=torch.long))
        class_text = text[class_indices.to(text.device)]
        fg_scores = (fg * class_text).sum(-1)
        bg_scores = (bg * class_text).sum(-1)
        otm = otm_loss(fg_scores, self.clamp)
        btm = btm_loss(bg_scores, self.clamp)
        background = text[num_classes:]
        if background.shape[0]:
            cbs, counted = cbs_loss(fg @ background.t(), self.cbs_threshold, self.clamp)
        else:
            cbs, counted = fg.sum() * 0.0, torch.zeros((), dtype=torch.long)
        loss = pair_share * (self.weights["otm"] * otm + self.weights["btm"] * btm) + self.weights["cbs"] * cbs
        return PoleLossOutput(loss=loss, otm=otm, btm=btm, cbs=cbs, fg_scores=fg_scores, bg_scores=bg_scores,
                              cbs_pairs=counted)

    def forward(self, model, pixel_values: torch.Tensor, cams, class_indices, image_indices=None,
                size: tuple[int, int] | None = None, image_mean: Sequence[float] | None = None,
                image_std: Sequence[float] | None = None, pair_share: float = 1.0) -> PoleLossOutput:
        """POLE's loss for a batch.

        Args:
            model: a [`PolePromptModel`]; text features come from `model.get_text_features()` with gradients (class
                tokens, context, text adapter), image features from [`image_features`] (frozen CLIP; the visual
                adapter, if any, gets gradients).
            pixel_values (`torch.FloatTensor` of shape `(N, 3, H, W)`): processed images.
            cams: ``[P, h, w]`` detached CAMs of the current prompts, one per (image, class) pair
                ([`pairs_from_cams`] turns the model's output into them).
            class_indices: ``[P]`` the class of each map.
            image_indices: ``[P]`` the image of each map (none when P == N).
            size, image_mean, image_std: see [`masked_images`].
            pair_share: see [`losses`].
        """
        maps, _ = check_pairs(cams, pixel_values.shape[0], image_indices)
        classes = torch.as_tensor(class_indices, dtype=torch.long).flatten()
        if classes.numel() != maps.shape[0]:
            raise ValueError(f"{classes.numel()} class indices for {maps.shape[0]} CAMs: give one class per map, in "
                             "map order")
        if classes.numel() and not 0 <= int(classes.min()) <= int(classes.max()) < model.config.num_classes:
            raise ValueError(f"class_indices {classes.tolist()} must lie in [0, {model.config.num_classes})")
        fg, bg = masked_images(pixel_values, cams, image_indices, size, image_mean, image_std)
        pairs = fg.shape[0]
        text = model.get_text_features()
        if pairs == 0:
            empty = text.new_zeros(0, text.shape[-1])
            return self.losses(empty, empty, text, classes, model.config.num_classes, pair_share)
        features = self.image_features(model, torch.cat([fg, bg]))  # one vision forward for both halves
        return self.losses(features[:pairs], features[pairs:], text, classes, model.config.num_classes, pair_share)


__all__ = ["PoleLossOutput", "PoleObjective", "btm_loss", "cbs_loss", "check_pairs", "masked_images", "otm_loss",
           "pairs_from_cams", "pairs_from_lists"]
