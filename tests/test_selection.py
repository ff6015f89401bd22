"""POLE class-token selection: argmax against an independent computation, summary rules, JSON, applying winners."""

import json
from types import SimpleNamespace

import helpers
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from helpers import sentence_features
from PIL import Image
from transformers.utils.constants import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD

from pole_hf import PoleImageProcessor, PolePromptModel
from pole_hf.labels import class_indices
from pole_hf.selection import (
    SelectionResult,
    WordChoice,
    masked_pixel_values,
    resolve_candidates,
    select_class_words,
)
from pole_hf.vocab import VOC_SYNONYMS

CANDIDATES = {"cat": ["cat", "feline", "kitty"], "dog": ["dog", "puppy", "hound"]}


def random_image(seed, height=32, width=32):
    return helpers.random_image(seed, height, width)


def test_choice_is_the_argmax_computed_independently(tiny_model, tiny_clip, tiny_tokenizer):
    image = random_image(0)  # already CLIP's 32x32 input size: no resizing on either side
    cams = [torch.stack([torch.ones(32, 32), torch.full((32, 32), 0.5)])]
    result = select_class_words(tiny_model, [(image, ["cat", "dog"], "a")], candidates=CANDIDATES, cams=cams,
                                progress=False)
    pixels = torch.from_numpy(np.asarray(image, dtype=np.float32) / 255).permute(2, 0, 1)
    mean, std = torch.tensor(OPENAI_CLIP_MEAN).view(3, 1, 1), torch.tensor(OPENAI_CLIP_STD).view(3, 1, 1)
    scale = tiny_clip.logit_scale.exp()
    assert [(c.image, c.image_id, c.class_name) for c in result.choices] == [(0, "a", "cat"), (0, "a", "dog")]
    for choice, factor in zip(result.choices, [1.0, 0.5]):
        masked = ((pixels * factor - mean) / std)[None]
        with torch.no_grad():
            feature = F.normalize(tiny_clip.get_image_features(pixel_values=masked).pooler_output, dim=-1)
        words = CANDIDATES[choice.class_name]
        text = sentence_features(tiny_clip, tiny_tokenizer, [f"A photo of {w}." for w in words])
        expected = (scale * feature @ text.t()).softmax(-1)[0]
        assert choice.word == words[int(expected.argmax())]
        torch.testing.assert_close(torch.tensor(list(choice.probabilities.values())), expected, atol=1e-5, rtol=0)
        assert list(choice.probabilities) == words


def test_constructed_image_feature_picks_its_sentence(tiny_model, tiny_clip, tiny_tokenizer, monkeypatch):
    # every masked image "looks like" the sentence "A photo of kitty.": kitty must win for cat, on every image
    target = sentence_features(tiny_clip, tiny_tokenizer, ["A photo of kitty."])
    calls = []

    def fake_image_features(pixel_values):
        calls.append(pixel_values.shape[0])
        # not normalised: selection normalises; transformers 5 returns an output object
        return SimpleNamespace(pooler_output=target.expand(pixel_values.shape[0], -1) * 3.0)

    monkeypatch.setattr(tiny_model.clip, "get_image_features", fake_image_features)
    items = [(random_image(i), ["cat"]) for i in range(3)]
    cams = [np.ones((1, 16, 16), np.float32)] * 3
    result = select_class_words(tiny_model, items, candidates=CANDIDATES, cams=cams, batch_size=2, progress=False)
    assert [c.word for c in result.choices] == ["kitty"] * 3
    assert all(max(c.probabilities, key=c.probabilities.get) == "kitty" for c in result.choices)
    assert calls == [2, 1]  # masked images are batched: one forward per batch
    assert result.winners == {"cat": "kitty"}


def test_cam_engine_path_end_to_end(tiny_model):
    items = [(random_image(1, 40, 56), [0, 1]), {"image": random_image(2, 24, 32), "labels": ["dog"], "image_id": 7},
             (random_image(3), [])]
    result = select_class_words(tiny_model, items, candidates=CANDIDATES, progress=False)
    assert [(c.image, c.image_id, c.class_name) for c in result.choices] == [(0, None, "cat"), (0, None, "dog"),
                                                                             (1, "7", "dog")]
    for choice in result.choices:
        assert choice.word in CANDIDATES[choice.class_name]
        assert sum(choice.probabilities.values()) == pytest.approx(1.0, abs=1e-5)
    summary = result.summary()
    assert summary["cat"].images == 1 and summary["dog"].images == 2 and summary["sofa"].winner is None
    assert sum(summary["dog"].votes.values()) == 2


def test_votes_winner_and_tie_rule():
    result = SelectionResult(candidates={"cat": ["cat", "kitty"], "dog": ["dog", "puppy"], "sofa": ["sofa", "couch"]})
    result.choices = [
        WordChoice(0, None, "cat", "kitty", {"cat": 0.4, "kitty": 0.6}),
        WordChoice(1, None, "cat", "kitty", {"cat": 0.45, "kitty": 0.55}),
        WordChoice(2, None, "cat", "cat", {"cat": 0.99, "kitty": 0.01}),  # higher mean for "cat", fewer votes
        WordChoice(0, None, "dog", "dog", {"dog": 0.6, "puppy": 0.4}),
        WordChoice(1, None, "dog", "puppy", {"dog": 0.1, "puppy": 0.9}),  # 1:1 tie, puppy has the higher mean
    ]
    summary = result.summary()
    assert summary["cat"].votes == {"cat": 1, "kitty": 2} and summary["cat"].winner == "kitty"
    assert summary["cat"].mean_probability["cat"] == pytest.approx((0.4 + 0.45 + 0.99) / 3)
    assert summary["dog"].votes == {"dog": 1, "puppy": 1} and summary["dog"].winner == "puppy"
    assert summary["sofa"].winner is None and summary["sofa"].images == 0
    assert result.winners == {"cat": "kitty", "dog": "puppy"}
    exact_tie = SelectionResult(candidates={"cat": ["cat", "kitty"]},
                                choices=[WordChoice(0, None, "cat", "cat", {"cat": 0.5, "kitty": 0.5})])
    exact_tie.choices.append(WordChoice(1, None, "cat", "kitty", {"cat": 0.5, "kitty": 0.5}))
    assert exact_tie.winners == {"cat": "cat"}  # full tie: candidate order


def test_json_round_trip_and_apply(tiny_model, tiny_clip, tiny_tokenizer, tmp_path):
    result = SelectionResult(candidates=CANDIDATES, choices=[
        WordChoice(0, "x", "cat", "kitty", {"cat": 0.2, "feline": 0.1, "kitty": 0.7}),
        WordChoice(0, "x", "dog", "puppy", {"dog": 0.3, "puppy": 0.6, "hound": 0.1}),
    ])
    path = tmp_path / "selection.json"
    result.save(path)
    data = json.loads(path.read_text())
    assert data["winners"] == {"cat": "kitty", "dog": "puppy"} and data["format"] == "pole_hf.selection"
    loaded = SelectionResult.load(path)
    assert loaded == result
    cat_tokens_before = tiny_model.prompt_learner.class_tokens[2].clone()
    assert loaded.apply(tiny_model) == {"cat": "kitty", "dog": "puppy"}
    assert tiny_model.config.class_words == ["kitty", "puppy", "sofa"]
    assert loaded.apply(tiny_model) == {}  # nothing left to change
    torch.testing.assert_close(tiny_model.prompt_learner.class_tokens[2], cat_tokens_before)
    with torch.no_grad():
        features = tiny_model.get_text_features()
    reference = sentence_features(tiny_clip, tiny_tokenizer, ["a photo of a kitty.", "a photo of a puppy."])
    torch.testing.assert_close(features[:2], reference, atol=1e-5, rtol=0)


def test_load_rejects_other_files(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        SelectionResult.load(bad)
    bad.write_text(json.dumps({"format": "something-else"}))
    with pytest.raises(ValueError, match="format='pole_hf.selection'"):
        SelectionResult.load(bad)
    bad.write_text(json.dumps({"format": "pole_hf.selection", "version": 1, "candidates": {}, "choices": [{}]}))
    with pytest.raises(ValueError, match="malformed selection"):
        SelectionResult.load(bad)


def test_default_and_user_candidates(tiny_clip_dir, tiny_model):
    assert resolve_candidates(tiny_model) == {n: VOC_SYNONYMS[n] for n in ["cat", "dog", "sofa"]}
    other = PolePromptModel.from_clip(tiny_clip_dir, class_names=["cat", "road"], class_words={"road": "street"},
                                      background_words=[])
    assert resolve_candidates(other) == {"cat": ["cat"], "road": ["street"]}
    assert resolve_candidates(tiny_model, {"cat": "kitty", "dog": ["dog", " puppy", "dog", ""]}) == {
        "cat": ["kitty"], "dog": ["dog", "puppy"], "sofa": ["sofa"]}
    with pytest.raises(ValueError, match=r"unknown classes \['horse'\]"):
        resolve_candidates(tiny_model, {"horse": ["horse", "pony"]})
    with pytest.raises(ValueError, match="no candidate words"):
        resolve_candidates(tiny_model, {"cat": []})


def test_every_voc_class_gets_the_voc_synonyms():
    # all 20 VOC names (not only a subset of them) take POLE's synonym lists
    from pole_hf.vocab import VOC_CLASSES

    model = SimpleNamespace(config=SimpleNamespace(class_names=list(VOC_CLASSES), class_words=list(VOC_CLASSES)))
    assert resolve_candidates(model) == {n: VOC_SYNONYMS[n] for n in VOC_CLASSES}


def test_single_candidates_need_no_images(tiny_model):
    # one candidate per class: chosen without CAMs, without even loading the image
    items = [("/nonexistent/image.jpg", ["cat", "sofa"])]
    result = select_class_words(tiny_model, items, candidates={"cat": ["cat"], "dog": ["dog"], "sofa": ["sofa"]},
                                progress=False)
    assert [(c.class_name, c.word, c.probabilities) for c in result.choices] == [
        ("cat", "cat", {"cat": 1.0}), ("sofa", "sofa", {"sofa": 1.0})]


def test_input_errors(tiny_model):
    with pytest.raises(ValueError, match="unknown label 'horse'; known classes: cat, dog, sofa"):
        class_indices(["cat", "horse"], tiny_model.class_names)
    with pytest.raises(ValueError, match="label index 7 is out of range for 3 classes"):
        class_indices(7, tiny_model.class_names)
    assert class_indices(torch.tensor([2, 0, 2]), tiny_model.class_names) == [2, 0]
    with pytest.raises(ValueError, match=r"cams\[0\] has 1 maps for 2 labels"):
        select_class_words(tiny_model, [(random_image(0), ["cat", "dog"])], cams=[np.ones((1, 8, 8))],
                           progress=False)
    with pytest.raises(ValueError, match="must be \\(image, labels\\)"):
        select_class_words(tiny_model, [random_image(0)], progress=False)
    with pytest.raises(ValueError, match="exactly one"):
        select_class_words(tiny_model, [], template="A photo.", progress=False)


def test_masked_pixel_values_mask_in_pixel_space():
    image = Image.new("RGB", (20, 10), (255, 255, 255))
    cams = torch.zeros(1, 10, 20)
    cams[0, :, 10:] = 1.0
    masked = masked_pixel_values(image, cams, (10, 20), PoleImageProcessor(image_mean=[0.5] * 3, image_std=[0.25] * 3))
    assert masked.shape == (1, 3, 10, 20)
    assert torch.allclose(masked[0, :, :, :8], torch.tensor(-2.0))  # black, normalised
    assert torch.allclose(masked[0, :, :, 12:], torch.tensor(2.0))  # white, normalised
