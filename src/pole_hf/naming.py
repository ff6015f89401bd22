"""Output file names from dataset ids and input paths: sanitised, confined to their folder, and distinct.

Dataset ids come from files a user may not control (a COCO `images[].id`, an image-folder `image_id`): an id such as
`"../../victim/x"` or `"/etc/x"` must never name a file outside the output folder, and two inputs must never share
an output name (one would silently overwrite, or be "resumed" from, the other).
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterable

__all__ = ["confined_path", "output_stems", "safe_stem"]

_UNSAFE = re.compile(r"[^A-Za-z0-9._+=@,-]+")


def safe_stem(name: object) -> str:
    """A file-name stem for an id: path parts joined by `__`, `.`/`..` parts dropped, other characters as `_`.

    Ordinary ids (`2007_000032`, `000123`, `img-7`) are returned unchanged.
    """
    parts = [part for part in re.split(r"[\\/]+", str(name)) if part not in ("", ".", "..")]
    stem = "__".join(_UNSAFE.sub("_", part) for part in parts).lstrip(".")
    return stem or "_"


def output_stems(names: Iterable[object]) -> list[str]:
    """Distinct safe stems for `names`, in order: a repeated stem gets `-2`, `-3`, ... (the first keeps its name).

    The result depends only on the sequence of names, so every process of a sharded run computes the same stems.
    """
    taken: set[str] = set()
    stems = []
    for name in names:
        base = stem = safe_stem(name)
        count = 1
        while stem.lower() in taken:  # case-insensitive file systems
            count += 1
            stem = f"{base}-{count}"
        taken.add(stem.lower())
        stems.append(stem)
    return stems


def confined_path(directory: str | os.PathLike, file_name: str) -> str:
    """`directory/file_name`, refusing (one line) any name that would resolve outside `directory`."""
    root = os.path.realpath(directory)
    path = os.path.realpath(os.path.join(root, file_name))
    if os.path.dirname(path) != root:
        raise ValueError(f"output name {file_name!r} would be written outside {directory}: use plain file names")
    return path
