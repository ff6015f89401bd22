"""Images in: loading from paths, URLs, PIL or numpy, with documented conversions and one-line errors.

Conversions: EXIF orientation is applied; grayscale ("L", "1"), palette ("P"), RGBA/LA (composited on white),
CMYK, YCbCr and 16/32-bit integer or float images ("I;16", "I", "F") are converted to 8-bit RGB (16-bit and float
images are scaled from their own min..max). numpy arrays may be HxW or HxWxC (C = 1, 3 or 4), any integer or float
dtype (floats in [0, 1] are taken as 0..1, others scaled by their range).
"""

from __future__ import annotations

import os
import warnings

import numpy as np
import torch
from PIL import Image, ImageOps

MAX_IMAGE_PIXELS = 178_956_970
"""Decompression-bomb guard: images with more pixels than this are refused (Pillow's own default limit)."""


class ImageInputError(ValueError):
    """A bad image input: the message names the file or value and what to do."""


def _scale_to_uint8(array: np.ndarray) -> np.ndarray:
    array = np.asarray(array)
    if array.dtype == np.uint8:
        return array
    if array.dtype == bool:
        return array.astype(np.uint8) * 255
    data = array.astype(np.float64)
    if not np.isfinite(data).all():
        raise ImageInputError("image array contains NaN or Inf values: clean the input before computing CAMs")
    if np.issubdtype(array.dtype, np.floating) and data.min() >= 0 and data.max() <= 1:
        return np.round(data * 255).astype(np.uint8)
    low, high = data.min(), data.max()
    if high == low:
        return np.zeros(array.shape, dtype=np.uint8)
    return np.round((data - low) / (high - low) * 255).astype(np.uint8)


ORIENTATION_TAG = 0x0112
"""EXIF's orientation tag (1: stored upright)."""


def to_rgb(image: Image.Image, exif: bool = True) -> Image.Image:
    """Convert any PIL image to 8-bit RGB following the module's documented conversions.

    Args:
        image: any PIL image.
        exif: apply the EXIF orientation (False keeps the stored pixel grid, which dataset masks are drawn on).
    """
    if exif and image.getexif().get(ORIENTATION_TAG, 1) != 1:  # else exif_transpose would only copy the image
        image = ImageOps.exif_transpose(image)
    if image.mode == "RGB":
        return image
    if image.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        return Image.fromarray(_scale_to_uint8(np.asarray(image)), mode="L").convert("RGB")
    if image.mode == "P":
        image = image.convert("RGBA")
    if image.mode in ("RGBA", "LA", "PA", "RGBa"):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return image.convert("RGB")


def array_to_image(array: np.ndarray) -> Image.Image:
    """A numpy image (HxW or HxWxC, C in 1/3/4) as an RGB PIL image."""
    array = np.asarray(array)
    if array.ndim == 3 and array.shape[0] in (1, 3, 4) and array.shape[-1] not in (1, 3, 4):
        array = np.moveaxis(array, 0, -1)  # CHW -> HWC
    if array.ndim == 3 and array.shape[-1] == 1:
        array = array[..., 0]
    if array.ndim not in (2, 3) or (array.ndim == 3 and array.shape[-1] not in (3, 4)):
        raise ImageInputError(f"numpy image has shape {array.shape}: expected HxW, HxWx3 or HxWx4")
    data = _scale_to_uint8(array)
    mode = {2: "L", 3: "RGB", 4: "RGBA"}[data.ndim if data.ndim == 2 else data.shape[-1]]
    return to_rgb(Image.fromarray(data, mode=mode))


def load_image(source, timeout: float = 10.0, exif: bool = True) -> Image.Image:
    """Load an image from a path, an http(s) URL, a PIL image or a numpy array, as 8-bit RGB.

    `exif=False` keeps the stored pixel grid instead of applying the EXIF orientation (datasets do this, so that
    images stay aligned with their masks, as VOC and COCO tools read them).

    Raises:
        ImageInputError: missing, corrupt, truncated or oversized files, and URLs while offline, with the name.
    """
    if isinstance(source, Image.Image):
        return to_rgb(source, exif)
    if isinstance(source, np.ndarray):
        return array_to_image(source)
    if isinstance(source, torch.Tensor):
        return array_to_image(source.detach().cpu().numpy())
    if isinstance(source, os.PathLike):
        source = os.fspath(source)
    if not isinstance(source, str):
        raise ImageInputError(f"cannot read an image from a {type(source).__name__}: give a path, URL, PIL image "
                              "or numpy array")
    if source.startswith(("http://", "https://")):
        return _load_url(source, timeout)
    if not os.path.exists(source):
        raise ImageInputError(f"image file {source!r} does not exist")
    if os.path.isdir(source):
        raise ImageInputError(f"{source!r} is a folder, not an image file")
    if os.path.getsize(source) == 0:
        raise ImageInputError(f"image file {source!r} is empty (0 bytes)")
    return _open_file(source, source, exif)


def _open_file(fp, name: str, exif: bool = True) -> Image.Image:
    previous = Image.MAX_IMAGE_PIXELS
    Image.MAX_IMAGE_PIXELS = MAX_IMAGE_PIXELS
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(fp) as image:
                width, height = image.size
                if width * height > MAX_IMAGE_PIXELS:
                    raise ImageInputError(f"image {name!r} is {width}x{height}, over the {MAX_IMAGE_PIXELS} pixel "
                                          "limit (decompression-bomb guard): downscale it first")
                image.load()
                return to_rgb(image, exif)
    except ImageInputError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as err:
        raise ImageInputError(f"image {name!r} is too large (decompression-bomb guard): {err}") from err
    except (OSError, SyntaxError, ValueError) as err:
        raise ImageInputError(f"image {name!r} is corrupt, truncated or not an image: {err}") from err
    finally:
        Image.MAX_IMAGE_PIXELS = previous


def _load_url(url: str, timeout: float) -> Image.Image:
    from huggingface_hub import constants

    if constants.HF_HUB_OFFLINE or os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes", "on"):
        raise ImageInputError(f"cannot fetch {url}: offline mode is on (HF_HUB_OFFLINE=1); download the image and "
                              "pass its path")
    import io
    import urllib.request

    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:  # a user-given image URL
            data = response.read()
    except OSError as err:
        raise ImageInputError(f"cannot fetch {url}: {err}; check the address or your connection") from err
    return _open_file(io.BytesIO(data), url)
