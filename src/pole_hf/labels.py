"""Image-level labels: class names or indices turned into unique class indices, with one-line errors."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch


def class_indices(labels, class_names: Sequence[str], allow_empty: bool = True) -> list[int]:
    """An image's labels as unique class indices, in the given order.

    Args:
        labels: A class name, an index, or a sequence (list, tuple, tensor, array) of them.
        class_names: The model's classes, which names are looked up in and indices are checked against.
        allow_empty: Whether an empty sequence is valid (an image without objects); if not, it raises.

    Raises:
        ValueError: on an unknown name, an index out of range, a non-label value, or an empty list when not allowed.
    """
    if isinstance(labels, (torch.Tensor, np.ndarray)):
        labels = labels.tolist()
    if isinstance(labels, (str, int, np.integer)):
        labels = [labels]
    names = list(class_names)
    out: list[int] = []
    for label in labels:
        if isinstance(label, str):
            if label not in names:
                raise ValueError(f"unknown label {label!r}; known classes: {', '.join(names)}")
            index = names.index(label)
        elif isinstance(label, (int, np.integer)) and not isinstance(label, bool):
            index = int(label)
            if not 0 <= index < len(names):
                raise ValueError(f"label index {index} is out of range for {len(names)} classes")
        else:
            raise ValueError(f"label {label!r} is neither a class name nor an index; known classes: "
                             f"{', '.join(names)}")
        if index not in out:
            out.append(index)
    if not out and not allow_empty:
        raise ValueError("labels is empty: give at least one class name, or labels=None to predict them")
    return out
