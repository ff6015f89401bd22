"""Image-level labelled images from a local ``imagefolder`` or a Hub dataset, with a ``List(ClassLabel)`` ``labels``.

A local folder follows ``datasets``' imagefolder layout: images plus a ``metadata.jsonl`` (or ``metadata.csv``) whose
``file_name`` column names each image and whose label column lists its classes, either as a list of class names
(``{"file_name": "a.jpg", "labels": ["dog", "cat"]}``) or as one ``";"``-separated string (``dog;cat``). Any other
``*_file_name`` column (e.g. ``mask_file_name``) is loaded by ``datasets`` as an image too. A Hub dataset id is loaded
with ``datasets.load_dataset`` (data files only, no loading scripts); its label column may also already be a
``ClassLabel`` list.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import datasets


def _label_names(value: object, feature: datasets.features.features.FeatureType) -> list[str]:
    """Class names of one row's label value: a list of names or ClassLabel ids, or a ";"-separated string."""
    if value is None:
        return []
    if isinstance(value, str):
        return [name.strip() for name in value.split(";") if name.strip()]
    inner = getattr(feature, "feature", None)
    if isinstance(inner, datasets.ClassLabel):
        return [inner.int2str(int(v)) for v in value]
    if isinstance(feature, datasets.ClassLabel):
        return [feature.int2str(int(value))]
    return [str(v).strip() for v in value]


def load_imagefolder(
    path_or_repo: str | os.PathLike,
    label_column: str = "labels",
    class_names: Sequence[str] | None = None,
    split: str = "train",
    data_files: str | Sequence[str] | dict | None = None,
) -> datasets.Dataset:
    """Load images with image-level labels and map the labels to a ``List(ClassLabel)`` column ``labels``.

    Args:
        path_or_repo: A local folder in imagefolder layout, or a Hub dataset id (``"user/name"``).
        label_column: the metadata column holding each image's class names.
        class_names: class names in label order; defaults to every name found in the split, sorted.
        split: the split to load.
        data_files: optional data files passed to ``datasets.load_dataset`` (patterns relative to the folder/repo).

    Returns:
        The split as a ``datasets.Dataset``; ``label_column`` is replaced by ``labels`` (``List(ClassLabel)``).
    """
    path = os.fspath(path_or_repo)
    if os.path.isdir(path):
        dataset = datasets.load_dataset("imagefolder", data_dir=path, data_files=data_files, split=split)
    elif os.path.exists(path) or path.startswith((".", "/", "~")):
        raise FileNotFoundError(f"{path} is not a folder: pass an imagefolder directory or a Hub dataset id")
    else:
        dataset = datasets.load_dataset(path, data_files=data_files, split=split)
    if label_column not in dataset.column_names:
        raise ValueError(f"{path} has no label column {label_column!r}: its columns are {dataset.column_names}; "
                         "pass label_column=...")

    feature = dataset.features[label_column]
    rows = [_label_names(value, feature) for value in dataset[label_column]]
    names = sorted({name for row in rows for name in row}) if class_names is None else list(class_names)
    index = {name: i for i, name in enumerate(names)}
    labels = []
    for row_number, row in enumerate(rows):
        unknown = [name for name in row if name not in index]
        if unknown:
            raise ValueError(f"Unknown label {unknown[0]!r} in row {row_number} of {path}: known classes are {names}")
        labels.append(sorted({index[name] for name in row}))

    dataset = dataset.remove_columns(label_column)
    if "labels" in dataset.column_names:
        dataset = dataset.remove_columns("labels")
    return dataset.add_column("labels", labels, feature=datasets.List(datasets.ClassLabel(names=names)))
