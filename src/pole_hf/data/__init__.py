"""Dataset loaders to ``datasets.Dataset``: PASCAL VOC, COCO, image folders / Hub datasets, and the synthetic world.

Conventions shared by every loader: ``labels`` is a ``List(ClassLabel)`` of class indices ``0..C-1`` (background is
not a class); ``mask`` is an image whose pixel values are ``class index + 1``, 0 for background and 255 for ignore.
"""

from .coco import load_coco
from .imagefolder import load_imagefolder
from .synthetic import (
    WORLD_CLASSES,
    SyntheticWorld,
    WorldClass,
    generate,
    load_synthetic,
)
from .voc import load_voc

__all__ = [
    "WORLD_CLASSES",
    "SyntheticWorld",
    "WorldClass",
    "generate",
    "load_coco",
    "load_imagefolder",
    "load_synthetic",
    "load_voc",
]
