"""The synthetic world: determinism, exact masks and labels, vocabulary skew, odd sizes, the datasets view."""

from __future__ import annotations

import re
from collections import Counter

import datasets
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pole_hf.data import SyntheticWorld, load_synthetic
from pole_hf.data.synthetic import (
    BACKGROUND_PHRASES,
    CAPTION_TEMPLATES,
    TEXTURES,
    WORLD_CLASSES,
    WorldClass,
    generate,
)

WORLD = SyntheticWorld()
WORD_CLASS = {word: i for i, name in enumerate(WORLD.class_names) for word, _ in WORLD.words[name]}


def raw_bytes(ds: datasets.Dataset, column: str) -> list[bytes]:
    return [row["bytes"] for row in ds.cast_column(column, datasets.Image(decode=False))[column]]


def test_world_table():
    assert len(WORLD.class_names) == 8 and len(set(WORLD.class_names)) == 8
    assert sorted(spec.texture for spec in WORLD_CLASSES) == sorted(TEXTURES)
    assert WORLD.background_kinds == ["grass", "sky", "water", "sand"]
    for name, words in WORLD.words.items():
        assert 3 <= len(words) <= 4 and abs(sum(p for _, p in words) - 1) < 1e-9
        assert name in dict(words)
        assert dict(words)[WORLD.frequent_word(name)] >= 0.7
    assert len(WORLD.rare_name_classes) >= 4
    for name in WORLD.rare_name_classes:
        assert dict(WORLD.words[name])[name] <= 0.05
    assert WORLD.frequent_word("zebra") == WORLD.frequent_word(0) == "stripes"
    assert list(WORLD.candidates) == WORLD.class_names
    assert WORLD.candidates["zebra"] == ["stripes", "bands", "streaks", "zebra"]
    assert all(WORLD.candidates[name] == [w for w, _ in words] for name, words in WORLD.words.items())


def test_world_rejects_bad_tables():
    bad_probs = WorldClass("zebra", "rings", (("zebra", 0.5), ("stripes", 0.4)))
    with pytest.raises(ValueError, match="sum to"):
        SyntheticWorld(classes=[bad_probs])
    duplicate = [WORLD_CLASSES[0], WorldClass("other", "rings", (("other", 0.5), ("stripes", 0.5)))]
    with pytest.raises(ValueError, match="'stripes'"):
        SyntheticWorld(classes=duplicate)
    with pytest.raises(ValueError, match="texture 'plaid'"):
        SyntheticWorld(classes=[WorldClass("x", "plaid", (("x", 1.0),))])


def test_same_seed_same_bytes_and_index_independence():
    first = load_synthetic(num_images=6, seed=3, image_size=48)
    again = load_synthetic(num_images=6, seed=3, image_size=48)
    fewer = load_synthetic(num_images=3, seed=3, image_size=48)
    for column in ("image", "mask"):
        assert raw_bytes(first, column) == raw_bytes(again, column)
        assert raw_bytes(fewer, column) == raw_bytes(first, column)[:3]
    assert first["caption"] == again["caption"] and first["labels"] == again["labels"]
    other = load_synthetic(num_images=6, seed=4, image_size=48)
    assert raw_bytes(other, "image") != raw_bytes(first, "image")
    val = load_synthetic(num_images=6, seed=3, image_size=48, split="validation")
    assert raw_bytes(val, "image") != raw_bytes(first, "image") and val.split == "validation"
    images = [s["image"] for s in generate(4, seed=3, image_size=48)]
    np.testing.assert_array_equal(np.array(first[3]["image"]), images[3])


def test_captions_do_not_change_images():
    with_caption = load_synthetic(num_images=3, seed=1, image_size=32)
    without = load_synthetic(num_images=3, seed=1, image_size=32, with_caption=False)
    assert "caption" not in without.column_names
    assert raw_bytes(with_caption, "image") == raw_bytes(without, "image")


def test_dataset_features():
    ds = load_synthetic(num_images=4, seed=0)
    assert ds.column_names == ["image", "mask", "labels", "caption"]
    assert ds.features["labels"].feature.names == WORLD.class_names
    row = ds[0]
    assert row["image"].mode == "RGB" and row["image"].size == (96, 96)
    assert row["mask"].mode == "L"
    ids = set(np.unique(np.array(row["mask"]))) - {0}
    assert ids == {label + 1 for label in row["labels"]}


def check_sample(sample: dict, world: SyntheticWorld, shape: tuple[int, int]) -> None:
    image, mask, instances = sample["image"], sample["mask"], sample["instances"]
    assert image.shape == shape + (3,) and image.dtype == np.uint8
    assert mask.shape == shape and mask.dtype == np.uint8
    # The mask is exactly the drawn objects: instance k carries object k's class id.
    class_of = np.array([0] + [obj["label"] + 1 for obj in sample["objects"]], np.uint8)
    np.testing.assert_array_equal(mask, class_of[instances])
    visible = np.bincount(instances.ravel(), minlength=len(class_of))
    assert (visible[1:] > 0).all(), "an object in the list is fully hidden"
    assert len({obj["label"] for obj in sample["objects"]}) == len(sample["objects"])
    assert set(np.unique(mask).tolist()) - {0} == {label + 1 for label in sample["labels"]}
    assert sample["labels"] == sorted(obj["label"] for obj in sample["objects"])
    assert sample["background"] in world.background_kinds


@pytest.mark.parametrize("size", [64, 128, (37, 53), (53, 37)])
def test_sizes(size):
    shape = (size, size) if isinstance(size, int) else size
    for sample in generate(5, seed=11, image_size=size):
        check_sample(sample, WORLD, shape)
    ds = load_synthetic(num_images=2, seed=0, image_size=size)
    assert ds[0]["image"].size == (shape[1], shape[0]) == ds[0]["mask"].size


def test_too_small_size_is_an_error():
    with pytest.raises(ValueError, match="image_size=8"):
        WORLD.sample(0, image_size=8)
    with pytest.raises(ValueError, match=r"image_size=\(32, 32, 3\)"):
        WORLD.sample(0, image_size=(32, 32, 3))


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 2**32 - 1), height=st.integers(16, 80), width=st.integers(16, 80))
def test_mask_and_labels_exact(seed, height, width):
    check_sample(WORLD.sample(seed, image_size=(height, width)), WORLD, (height, width))


def test_heavy_occlusion_drops_hidden_objects():
    world = SyntheticWorld(object_count_weights=(0, 0, 1), radius_range=(0.45, 0.5), min_visible_fraction=0.5,
                           max_tries=3)
    counts = Counter()
    for seed in range(30):
        sample = world.sample(seed, image_size=40)
        check_sample(sample, world, (40, 40))
        counts[len(sample["objects"])] += 1
        for k in range(1, len(sample["objects"]) + 1):
            assert (sample["instances"] == k).sum() > 0
    assert counts[3] < 30, "expected some objects to be dropped under heavy occlusion"


def test_objects_are_two_colour_textures_without_noise():
    world = SyntheticWorld(noise_std=0.0)
    for seed in range(10):
        sample = world.sample(seed, image_size=64)
        for k, obj in enumerate(sample["objects"], start=1):
            colours = np.unique(sample["image"][sample["instances"] == k], axis=0)
            assert len(colours) <= 2, obj
            assert obj["texture"] == WORLD_CLASSES[obj["label"]].texture


def caption_words(caption: str) -> list[str]:
    for phrase in BACKGROUND_PHRASES.values():
        caption = caption.removesuffix(" " + phrase)
    for template in CAPTION_TEMPLATES:
        prefix = template.replace("{}", "")
        if prefix and caption.startswith(prefix):
            caption = caption[len(prefix):]
            break
    return re.split(r", | and ", caption)


def test_captions_use_vocabulary_words_and_are_skewed():
    rng = np.random.default_rng(0)
    counts: Counter = Counter()
    mentions: Counter = Counter()
    backgrounds = 0
    for _ in range(2000):
        labels = rng.choice(8, size=rng.integers(1, 4), replace=False).tolist()
        background = WORLD.background_kinds[rng.integers(4)]
        caption = WORLD.caption(labels, rng, background=background)
        backgrounds += caption.endswith(BACKGROUND_PHRASES[background])
        words = caption_words(caption)
        assert sorted(WORD_CLASS[w] for w in words) == sorted(labels), caption
        counts.update(words)
        mentions.update(WORLD.class_names[label] for label in labels)
    assert 0.2 < backgrounds / 2000 < 0.4
    for name in WORLD.rare_name_classes:
        frequent = WORLD.frequent_word(name)
        assert counts[name] < counts[frequent] / 5, (name, counts[name], counts[frequent])
        assert counts[name] / mentions[name] < 0.1
        assert counts[frequent] / mentions[name] > 0.6


def test_sample_caption_matches_labels():
    for sample in generate(20, seed=5, image_size=32):
        words = caption_words(sample["caption"])
        assert len(words) == len(sample["labels"])
