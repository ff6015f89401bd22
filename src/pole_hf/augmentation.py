"""IRN / CLIMS / POLE training augmentation: random long-side rescale, horizontal flip, random crop.

The reference (`voc12/dataloader.py` of IRN, used unchanged by CLIMS and POLE for both CAM-network stages) rescales
each image so its longer side is a random integer in [320, 640], flips it with probability 1/2, and takes a random
512 x 512 crop, padding a smaller image (its normalised values with 0, i.e. the mean colour) at a random offset.

Here every random draw of an image comes from a generator seeded by ``(seed, epoch, index)`` alone, so an image is
augmented the same way whichever process loads it and wherever a resumed run restarts: one and several processes,
and a run killed and resumed, see the same pixels.

Source: IRN ``jiwoon-ahn/irn`` ``misc/imutils.py`` (``random_resize_long``, ``random_lr_flip``, ``random_crop``),
as used by ``CVI-SZU/CLIMS`` and ``Ruxie189/WSS_POLE`` ``step/train_cam.py`` / ``step/train_clims*.py``.
Difference: resizing is bilinear with antialiasing on the float image (IRN: PIL bicubic on uint8).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

REFERENCE_LONG_SIDE = (320, 640)
REFERENCE_CROP_SIZE = 512
REFERENCE_IMAGE_SIZE = 512
"""The side the reference's values are relative to (its crop); `scaled_for` rescales them to another side."""


@dataclass(frozen=True)
class ScaleFlipCrop:
    """Random long-side rescale, horizontal flip and random square crop of a ``[3, H, W]`` image in [0, 1].

    Args:
        long_side (`tuple[int, int]` or `None`): the longer side after rescaling is drawn uniformly from
            ``[low, high]`` (both included); `None` keeps the size.
        flip (`bool`): flip horizontally with probability 1/2.
        crop_size (`int` or `None`): side of the random crop (a smaller image is padded at a random offset with
            `fill`); `None` keeps the rescaled image (images of a batch then need equal sizes).
        fill (`Sequence[float]`): the padding colour in [0, 1] pixels (default the ImageNet mean, 0 once
            normalised, as the reference pads its normalised images with 0).
        seed (`int`): with the epoch and the item's index, seeds every draw.
    """

    long_side: tuple[int, int] | None = REFERENCE_LONG_SIDE
    flip: bool = True
    crop_size: int | None = REFERENCE_CROP_SIZE
    fill: Sequence[float] = (0.485, 0.456, 0.406)
    seed: int = 0

    def __post_init__(self):
        if self.long_side is not None:
            low, high = (int(v) for v in self.long_side)
            if not 1 <= low <= high:
                raise ValueError(f"long_side={tuple(self.long_side)} must be (low, high) with 1 <= low <= high")
            object.__setattr__(self, "long_side", (low, high))
        if self.crop_size is not None and int(self.crop_size) < 1:
            raise ValueError(f"crop_size={self.crop_size} must be a positive side or None")
        if len(self.fill) != 3:
            raise ValueError(f"fill={tuple(self.fill)} must be one value per RGB channel")

    @classmethod
    def scaled_for(cls, image_size: int, **options) -> ScaleFlipCrop:
        """The reference's values scaled to images of side `image_size` (the synthetic world's 128 px: long side
        80-160, crop 128)."""
        factor = image_size / REFERENCE_IMAGE_SIZE
        low, high = (max(1, round(v * factor)) for v in REFERENCE_LONG_SIDE)
        return cls(long_side=(low, high), crop_size=max(1, round(REFERENCE_CROP_SIZE * factor)), **options)

    def generator(self, epoch: int, index: int) -> np.random.Generator:
        """The draws of item `index` in `epoch` (independent of the process and of what was drawn before)."""
        return np.random.default_rng([int(self.seed), int(epoch), int(index)])

    def __call__(self, pixels: torch.Tensor, epoch: int, index: int) -> torch.Tensor:
        """Augment one image ``[3, H, W]`` (values in [0, 1]); returns ``[3, crop, crop]`` (or the rescaled size)."""
        if pixels.ndim != 3:
            raise ValueError(f"pixels of shape {tuple(pixels.shape)}: give one [3, H, W] image")
        rng = self.generator(epoch, index)
        height, width = pixels.shape[-2:]
        if self.long_side is not None:
            target = int(rng.integers(self.long_side[0], self.long_side[1] + 1))
            scale = target / max(height, width)
            size = (max(1, round(height * scale)), max(1, round(width * scale)))
            if size != (height, width):
                pixels = F.interpolate(pixels[None], size=size, mode="bilinear", align_corners=False,
                                       antialias=True)[0].clamp(0, 1)
        if self.flip and rng.random() < 0.5:
            pixels = pixels.flip(-1)
        return pixels if self.crop_size is None else self._crop(pixels, rng)

    def _crop(self, pixels: torch.Tensor, rng: np.random.Generator) -> torch.Tensor:
        """IRN's `random_crop`: a random window of the image placed at a random offset in the crop."""
        side = int(self.crop_size)
        height, width = pixels.shape[-2:]
        out = torch.as_tensor(self.fill, dtype=pixels.dtype).view(3, 1, 1).repeat(1, side, side)
        # along each axis: the image is cropped when larger (offset in the image), padded when smaller (offset in out)
        rows, cols = (self._window(n, side, rng) for n in (height, width))
        (src_y, dst_y, h), (src_x, dst_x, w) = rows, cols
        out[:, dst_y:dst_y + h, dst_x:dst_x + w] = pixels[:, src_y:src_y + h, src_x:src_x + w]
        return out

    @staticmethod
    def _window(length: int, side: int, rng: np.random.Generator) -> tuple[int, int, int]:
        if length >= side:
            return int(rng.integers(0, length - side + 1)), 0, side
        return 0, int(rng.integers(0, side - length + 1)), length


__all__ = ["REFERENCE_CROP_SIZE", "REFERENCE_LONG_SIDE", "ScaleFlipCrop"]
