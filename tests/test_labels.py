import numpy as np
import pytest
import torch

from pole_hf.labels import class_indices

NAMES = ["cat", "dog", "sofa"]


def test_names_indices_and_arrays_give_unique_indices_in_order():
    assert class_indices("sofa", NAMES) == [2]
    assert class_indices(1, NAMES) == [1]
    assert class_indices(["dog", 0, "dog", np.int64(2)], NAMES) == [1, 0, 2]
    assert class_indices(np.array([2, 2, 0]), NAMES) == [2, 0]
    assert class_indices(torch.tensor([0]), NAMES) == [0]


def test_empty_labels_are_allowed_only_when_asked():
    assert class_indices([], NAMES) == []
    with pytest.raises(ValueError, match="labels is empty"):
        class_indices([], NAMES, allow_empty=False)


@pytest.mark.parametrize("labels, message", [
    (["horse"], "unknown label 'horse'; known classes: cat, dog, sofa"),
    ([3], "label index 3 is out of range for 3 classes"),
    ([-1], "label index -1 is out of range"),
    ([True], "label True is neither a class name nor an index"),
    ([1.5], "label 1.5 is neither a class name nor an index"),
])
def test_bad_labels_say_what_is_wrong(labels, message):
    with pytest.raises(ValueError, match=message):
        class_indices(labels, NAMES)
