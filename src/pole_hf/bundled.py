"""Paths of the models shipped inside the package (folder `assets/`): the tiny CLIP trained on the synthetic world, and prompts learned on it."""

from __future__ import annotations

import os

ASSETS_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "assets")
TINY_CLIP = os.path.join(ASSETS_DIR, "tiny-clip")
"""Folder of the bundled tiny CLIP (an ordinary HF folder: `CLIPModel.from_pretrained(TINY_CLIP)`)."""
TINY_PROMPTS = os.path.join(ASSETS_DIR, "tiny-prompts")
"""Folder of prompts learned on the synthetic world for the bundled tiny CLIP."""


def has_tiny_clip() -> bool:
    """Whether the bundled tiny CLIP is present in this installation."""
    return os.path.isfile(os.path.join(TINY_CLIP, "config.json"))


def is_tiny_clip(path: str | None) -> bool:
    """Whether `path` is the bundled tiny CLIP's folder (saved configs then refer to it as `None`)."""
    if not path or not has_tiny_clip() or not os.path.isdir(path):
        return False
    return os.path.samefile(path, TINY_CLIP)


def resolve_base_path(path: str | None) -> str:
    """The base CLIP's location: `path`, or the bundled tiny CLIP when `path` is `None`."""
    if path:
        return str(path)
    if not has_tiny_clip():
        raise ValueError("no base CLIP given and the bundled tiny CLIP is not installed: pass a base such as "
                         "'openai/clip-vit-base-patch16' or a local CLIP folder")
    return TINY_CLIP
