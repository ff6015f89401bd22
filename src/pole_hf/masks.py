"""Class activation maps to pseudo masks: background score, argmax, optional dense CRF, ignore, palette and overlays.

The background rule follows CLIP-ES: either a power of the complement of the strongest foreground map,
`(1 - max_k cam) ** t`, or a fixed threshold value. Labels are 1-based dataset class ids, 0 is background and
255 marks pixels left unlabelled (ignored by evaluation and training).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from PIL import Image

BACKGROUND_ID = 0
IGNORE_ID = 255
_BACKGROUND_MODES = ("power", "threshold")
CRF_IMAGE_MODES = ("clip_es", "rgb")
CRF_CONFIDENCE = 0.95
"""CLIP-ES writes pseudo-mask pixels whose CRF marginal is below this as 255 (``eval_cam_with_crf.py``)."""
CLIP_ES_MEAN_BGR = (104.008, 116.669, 122.675)


def _voc_palette() -> list[int]:
    """Builds the PASCAL VOC colour map by spreading the bits of each index over R, G and B."""
    palette = []
    for index in range(256):
        red = green = blue = 0
        code = index
        for shift in range(7, -1, -1):
            red |= (code & 1) << shift
            green |= ((code >> 1) & 1) << shift
            blue |= ((code >> 2) & 1) << shift
            code >>= 3
        palette.extend((red, green, blue))
    return palette


VOC_PALETTE: list[int] = _voc_palette()
"""The standard 256-entry PASCAL VOC palette as a flat list of 768 ints (index 255 is (224, 224, 192))."""


def _check_cams(cams: np.ndarray, class_ids: Sequence[int] | None = None) -> np.ndarray:
    cams = np.asarray(cams, dtype=np.float32)
    if cams.ndim != 3:
        raise ValueError(f"cams must have shape [k, H, W], got shape {cams.shape}; add a leading axis for one class")
    if np.isnan(cams).any():
        raise ValueError(f"cams contain {int(np.isnan(cams).sum())} NaN values; fix the CAM computation upstream")
    if class_ids is not None:
        if len(class_ids) != cams.shape[0]:
            raise ValueError(
                f"class_ids has {len(class_ids)} entries but cams has {cams.shape[0]} maps; pass one id per map"
            )
        for class_id in class_ids:
            if not 0 < int(class_id) < IGNORE_ID:
                raise ValueError(
                    f"class id {class_id} is out of range; class ids are 1..254 (0 is background, 255 ignore)"
                )
    return cams


@dataclass(frozen=True)
class BackgroundRule:
    """How a pixel's background score is made from the foreground CAMs (CLIP-ES).

    Args:
        mode: `"power"`: `(1 - max_k cam) ** power`; `"threshold"`: the constant `threshold`.
        power: exponent of the power rule (CLIP-ES uses 1 or 2).
        threshold: the constant score of the threshold rule (IRN/CLIMS: 0.15 for a CAM network).
    """

    mode: str = "power"
    power: float = 1.0
    threshold: float = 0.5

    def __post_init__(self):
        if self.mode not in _BACKGROUND_MODES:
            raise ValueError(f"background must be one of {_BACKGROUND_MODES}, got {self.mode!r}")
        if self.mode == "power" and not self.power > 0:
            raise ValueError(f"bg_power must be > 0, got {self.power}; CLIP-ES uses 1 or 2")

    def score(self, cams: np.ndarray) -> np.ndarray:
        """Float32 background score ``[H, W]`` of foreground maps ``[k, H, W]`` in [0, 1]."""
        cams = _check_cams(cams)
        height, width = cams.shape[1:]
        if self.mode == "threshold":
            return np.full((height, width), self.threshold, dtype=np.float32)
        peak = cams.max(axis=0) if cams.shape[0] else np.zeros((height, width), np.float32)
        return np.power(1.0 - np.clip(peak, 0.0, 1.0), self.power).astype(np.float32)


DEFAULT_BACKGROUND = BackgroundRule()


def background_score(cams: np.ndarray, rule: BackgroundRule = DEFAULT_BACKGROUND) -> np.ndarray:
    """The per-pixel background score ``[H, W]`` of foreground CAMs ``[k, H, W]`` (see [`BackgroundRule`])."""
    return rule.score(cams)


def class_scores(cams: np.ndarray, rule: BackgroundRule = DEFAULT_BACKGROUND) -> np.ndarray:
    """Stacks the background score in front of the foreground CAMs.

    Args:
        cams: foreground maps, float `[k, H, W]` in [0, 1].
        rule: the background rule.

    Returns:
        Float32 array `[k + 1, H, W]`; channel 0 is background, channel `i` is `cams[i - 1]`.
    """
    cams = _check_cams(cams)
    return np.concatenate([rule.score(cams)[None], cams])


def scores_to_mask(scores: np.ndarray, class_ids: Sequence[int], ignore_below: float | None = None) -> np.ndarray:
    """Labels each pixel with the argmax of `[background, classes]` scores (ties go to the lower channel).

    Args:
        scores: float `[k + 1, H, W]`, background first (output of [`class_scores`] or [`crf_refine`]).
        class_ids: the k dataset class ids of channels 1..k.
        ignore_below: if set, pixels whose winning score is below it become 255.

    Returns:
        Uint8 mask `[H, W]` with values in `{0, *class_ids, 255}`.
    """
    scores = np.asarray(scores)
    if scores.ndim != 3 or scores.shape[0] != len(class_ids) + 1:
        raise ValueError(
            f"scores must have shape [len(class_ids) + 1, H, W] = [{len(class_ids) + 1}, H, W], got {scores.shape}"
        )
    _check_cams(scores[1:], class_ids)
    if np.isnan(scores[0]).any():
        raise ValueError("background scores contain NaN values; check bg_power / bg_threshold or the CRF input")
    lookup = np.array([BACKGROUND_ID, *[int(c) for c in class_ids]], dtype=np.uint8)
    winner = scores.argmax(axis=0)
    mask = lookup[winner]
    if ignore_below is not None:
        best = np.take_along_axis(scores, winner[None], axis=0)[0]
        mask[best < ignore_below] = IGNORE_ID
    return mask


def cams_to_mask(cams: np.ndarray, class_ids: Sequence[int], rule: BackgroundRule = DEFAULT_BACKGROUND,
                 ignore_below: float | None = None) -> np.ndarray:
    """Turns foreground CAMs into a pseudo mask.

    Args:
        cams: foreground maps, float `[k, H, W]` in [0, 1]; NaN raises `ValueError`.
        class_ids: the k 1-based dataset class ids of the maps.
        rule: the background rule.
        ignore_below: if set, pixels whose winning score is below it become 255.

    Returns:
        Uint8 mask `[H, W]`: 0 background, class ids, 255 ignore. With no classes (k = 0) every pixel is background.
    """
    cams = _check_cams(cams, class_ids)
    if cams.shape[0] == 0:
        return np.zeros(cams.shape[1:], dtype=np.uint8)
    return scores_to_mask(class_scores(cams, rule), class_ids, ignore_below)


def crf_image(image: np.ndarray, mode: str = "clip_es") -> np.ndarray:
    """The bilateral kernel's image for [`crf_refine`].

    Args:
        image: uint8 RGB image `[H, W, 3]`.
        mode: `"clip_es"`: CLIP-ES's input (`eval_cam_with_crf.py`): BGR minus the Caffe mean
            `(104.008, 116.669, 122.675)`, cast to uint8, so negative values wrap around (-1 becomes 255) and dark
            pixels look bright to the kernel; `"rgb"`: the image itself (the corrected input).

    Returns:
        Uint8 `[H, W, 3]`, C-contiguous.
    """
    if mode not in CRF_IMAGE_MODES:
        raise ValueError(f"crf image mode must be one of {CRF_IMAGE_MODES}, got {mode!r}")
    image = np.asarray(image)
    if mode == "rgb":
        return np.array(image, dtype=np.uint8, order="C", copy=True)  # pydensecrf needs a writable buffer
    shifted = image[..., ::-1].astype(np.float32)
    shifted -= CLIP_ES_MEAN_BGR  # in place, as CLIP-ES: float64 arithmetic, float32 result
    return np.ascontiguousarray(np.mod(np.trunc(shifted).astype(np.int64), 256).astype(np.uint8))


def crf_refine(
    image: np.ndarray,
    probs: np.ndarray,
    iterations: int = 10,
    pos_xy: float = 1,
    pos_w: float = 3,
    bi_xy: float = 67,
    bi_rgb: float = 3,
    bi_w: float = 4,
    image_mode: str = "clip_es",
    half_precision: bool = True,
) -> np.ndarray:
    """Refines per-class probabilities with a fully connected CRF (defaults: CLIP-ES' VOC settings and inputs).

    Needs the optional `pydensecrf2` package (`pip install pole_hf[crf]` or `pip install pydensecrf2`).

    Args:
        image: uint8 RGB image `[H, W, 3]`.
        probs: non-negative scores `[C, H, W]` (e.g. [`class_scores`]); used as `-log(clip(p, 1e-5, 1))` unaries.
        iterations: mean-field iterations.
        pos_xy: spatial standard deviation of the smoothness (Gaussian) kernel.
        pos_w: weight of the smoothness kernel.
        bi_xy: spatial standard deviation of the appearance (bilateral) kernel.
        bi_rgb: colour standard deviation of the appearance kernel.
        bi_w: weight of the appearance kernel.
        image_mode: the appearance kernel's image, see [`crf_image`]: `"clip_es"` (BGR minus mean, wrapped to
            uint8, as CLIP-ES) or `"rgb"` (the image; corrected).
        half_precision: round `probs` to fp16 and take the unaries' log in fp16, as CLIP-ES does with its saved
            fp16 maps; `False` keeps float32.

    Returns:
        Float32 marginals `[C, H, W]`, summing to 1 over C.
    """
    try:
        import pydensecrf.densecrf as dcrf
        from pydensecrf.utils import unary_from_softmax
    except ImportError as error:
        raise ImportError(
            "crf_refine needs a dense CRF: run `pip install pydensecrf2` (or `pole_hf[crf]`)"
        ) from error
    image = np.asarray(image)
    probs = np.asarray(probs, dtype=np.float32)
    if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(
            f"image must be uint8 [H, W, 3], got {image.dtype} {image.shape}; pass np.asarray(pil.convert('RGB'))"
        )
    if probs.ndim != 3 or probs.shape[1:] != image.shape[:2]:
        raise ValueError(
            f"probs must be [C, H, W] with H, W = {image.shape[:2]}, got {probs.shape}; resize them first"
        )
    if np.isnan(probs).any():
        raise ValueError("probs contain NaN values; fix the scores before the CRF")
    num_labels, height, width = probs.shape
    crf = dcrf.DenseCRF2D(width, height, num_labels)
    unary = unary_from_softmax(probs.astype(np.float16) if half_precision else probs, clip=1e-5)
    crf.setUnaryEnergy(np.ascontiguousarray(unary, dtype=np.float32))
    crf.addPairwiseGaussian(sxy=pos_xy, compat=pos_w)
    crf.addPairwiseBilateral(sxy=bi_xy, srgb=bi_rgb, rgbim=crf_image(image, image_mode), compat=bi_w)
    marginals = crf.inference(iterations)
    return np.asarray(marginals, dtype=np.float32).reshape(num_labels, height, width)


def crf_scores(image: np.ndarray, cams: np.ndarray, rule: BackgroundRule = DEFAULT_BACKGROUND,
               image_mode: str = "clip_es", half_precision: bool = True, max_side: int | None = None) -> np.ndarray:
    """CLIP-ES's CRF step on CAMs: the maps rounded to fp16 (as CLIP-ES saves them), background in front
    ([`class_scores`]), then [`crf_refine`].

    Args:
        image: uint8 RGB image `[H, W, 3]` (or PIL).
        cams: foreground maps `[k, H, W]` in [0, 1] at the image's size.
        rule: the background rule.
        image_mode, half_precision: See [`crf_refine`].
        max_side: When the image's longer side exceeds it, the CRF runs on the image and maps downscaled to this
            side (the CAMs' computation size) and its marginals are upsampled bilinearly (a 6000x4000 photo:
            seconds, not minutes); `None` always runs at full size.

    Returns:
        Float32 marginals `[k + 1, H, W]`, background first.
    """
    cams = _check_cams(cams)
    image = np.asarray(image)
    height, width = cams.shape[1:]
    shrink = 1.0 if max_side is None else min(1.0, max_side / max(height, width))
    if shrink < 1.0:
        size = (max(1, round(width * shrink)), max(1, round(height * shrink)))
        small = np.stack([_resize_map(cam, size) for cam in cams]) if len(cams) else \
            np.zeros((0, size[1], size[0]), np.float32)
        marginals = crf_scores(np.asarray(Image.fromarray(image).resize(size, Image.Resampling.BILINEAR)), small,
                               rule, image_mode, half_precision)
        return np.stack([_resize_map(channel, (width, height)) for channel in marginals])
    if half_precision:
        cams = cams.astype(np.float16).astype(np.float32)
    return crf_refine(image, class_scores(cams, rule), image_mode=image_mode, half_precision=half_precision)


def mask_to_image(mask: np.ndarray) -> Image.Image:
    """Wraps a label mask into a palette ("P") image with the VOC colours.

    Args:
        mask: integer mask `[H, W]` with values in 0..255.

    Returns:
        A `PIL.Image` in mode "P".
    """
    mask = np.asarray(mask)
    if mask.ndim != 2:
        raise ValueError(f"mask must be 2-D [H, W], got shape {mask.shape}")
    if mask.size and (mask.min() < 0 or mask.max() > 255):
        raise ValueError(f"mask values must lie in 0..255, got range [{mask.min()}, {mask.max()}]")
    height, width = mask.shape
    image = Image.frombytes("P", (width, height), np.ascontiguousarray(mask, dtype=np.uint8).tobytes())
    image.putpalette(VOC_PALETTE)
    return image


def image_to_mask(image: Image.Image) -> np.ndarray:
    """Reads a label mask back from a "P"/"L" image, or from an RGB image drawn with the VOC palette.

    Args:
        image: A `PIL.Image`.

    Returns:
        Uint8 mask `[H, W]`.
    """
    if image.mode in ("P", "L"):
        return np.array(image, dtype=np.uint8)
    rgb = np.asarray(image.convert("RGB"), dtype=np.int64)
    codes = (rgb[..., 0] << 16) | (rgb[..., 1] << 8) | rgb[..., 2]
    colours = np.asarray(VOC_PALETTE, dtype=np.int64).reshape(256, 3)
    palette_codes = (colours[:, 0] << 16) | (colours[:, 1] << 8) | colours[:, 2]
    order = np.argsort(palette_codes)
    position = np.clip(np.searchsorted(palette_codes[order], codes), 0, 255)
    found = palette_codes[order][position] == codes
    if not found.all():
        bad = tuple(int(v) for v in rgb[~found][0])
        raise ValueError(f"colour {bad} is not in the VOC palette; pass the mask as a 'P' or 'L' image")
    return order[position].astype(np.uint8)


def jet_colormap(values: np.ndarray) -> np.ndarray:
    """Maps values in [0, 1] to jet-like RGB colours (dark blue -> cyan -> yellow -> dark red).

    Args:
        values: float array of any shape; clipped to [0, 1].

    Returns:
        Uint8 array with a trailing RGB axis.
    """
    x = np.clip(np.asarray(values, dtype=np.float32), 0.0, 1.0)[..., None]
    centres = np.array([0.75, 0.5, 0.25], dtype=np.float32)  # where R, G, B peak
    rgb = np.clip(1.5 - np.abs(4.0 * (x - centres)), 0.0, 1.0)
    return np.round(rgb * 255).astype(np.uint8)


def _resize_map(values: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Bilinearly resizes a float `[H, W]` map to PIL `size` `(width, height)`."""
    if values.shape[::-1] == size:
        return values
    return np.asarray(Image.fromarray(values.astype(np.float32)).resize(size, Image.Resampling.BILINEAR))


def overlay(image: Image.Image, cam: np.ndarray, alpha: float = 0.5) -> Image.Image:
    """Blends a jet heatmap of one CAM over an image.

    Args:
        image: the `PIL.Image`.
        cam: float map `[H, W]` in [0, 1]; resized to the image if its size differs.
        alpha: heatmap weight in [0, 1].

    Returns:
        RGB `PIL.Image` of the image's size.
    """
    cam = np.asarray(cam, dtype=np.float32)
    if cam.ndim != 2:
        raise ValueError(f"cam must be 2-D [H, W], got shape {cam.shape}; pass one map, e.g. cams[i]")
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be in [0, 1], got {alpha}")
    base = np.asarray(image.convert("RGB"), dtype=np.float32)
    heat = jet_colormap(np.nan_to_num(_resize_map(cam, image.size))).astype(np.float32)
    blended = (1.0 - alpha) * base + alpha * heat
    return Image.fromarray(np.round(blended).astype(np.uint8))


def overlay_mask(
    image: Image.Image, mask: np.ndarray, alpha: float = 0.5, skip_background: bool = True
) -> Image.Image:
    """Colours an image by a label mask with the VOC palette.

    Args:
        image: the `PIL.Image`.
        mask: integer mask `[H, W]` of the image's size.
        alpha: colour weight in [0, 1].
        skip_background: leave background (0) pixels untouched.

    Returns:
        RGB `PIL.Image` of the image's size.
    """
    mask = np.asarray(mask)
    if mask.shape != (image.height, image.width):
        raise ValueError(f"mask shape {mask.shape} differs from the image's (H, W) = {(image.height, image.width)}")
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be in [0, 1], got {alpha}")
    base = np.asarray(image.convert("RGB"), dtype=np.float32)
    colours = np.asarray(VOC_PALETTE, dtype=np.float32).reshape(256, 3)[mask.astype(np.uint8)]
    weight = np.full(mask.shape + (1,), alpha, dtype=np.float32)
    if skip_background:
        weight[mask == BACKGROUND_ID] = 0.0
    blended = (1.0 - weight) * base + weight * colours
    return Image.fromarray(np.round(blended).astype(np.uint8))
