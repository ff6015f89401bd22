"""PoleConfig: defaults, word mapping, serialisation and every validation error."""

import pytest
from transformers import AutoConfig, CLIPConfig

from pole_hf import PoleConfig
from pole_hf.tiny import tiny_clip_config
from pole_hf.vocab import CLIP_ES_BACKGROUND_WORDS


def test_defaults_and_word_mapping():
    config = PoleConfig(class_names=["cat", "sofa"], class_words={"sofa": "couch"})
    assert config.class_words == ["cat", "couch"]
    assert config.background_words == list(CLIP_ES_BACKGROUND_WORDS)
    assert config.template == "a photo of a {}." and config.class_token_length is None
    assert config.learnable_tokens == "all"
    assert config.image_feature == "patch_mean" and not config.learn_context and config.num_classes == 2
    assert PoleConfig(class_names=["cat"], background_words=[]).background_words == []


def test_round_trip_keeps_the_embedded_clip_config(tmp_path):
    clip_config = tiny_clip_config(100, 98, 99)
    config = PoleConfig(base_model_name_or_path="someone/clip", base_model_revision="abc123",
                        clip_config=clip_config, class_names=["cat", "dog"], class_token_length=2)
    config.save_pretrained(tmp_path)
    loaded = AutoConfig.from_pretrained(tmp_path)
    assert isinstance(loaded, PoleConfig) and isinstance(loaded.clip_config, CLIPConfig)
    assert loaded.clip_config.text_config.vocab_size == 100
    assert (loaded.base_model_name_or_path, loaded.base_model_revision) == ("someone/clip", "abc123")
    assert loaded.class_names == ["cat", "dog"] and loaded.class_token_length == 2


@pytest.mark.parametrize("kwargs, message", [
    (dict(class_names=[]), "class_names is empty"),
    (dict(class_names=["cat", "dog", "cat"]), r"duplicates \['cat'\]"),
    (dict(class_names=["cat", " "]), "empty name"),
    (dict(class_names=["cat"], template="a photo of a cat."), "exactly one '{}'"),
    (dict(class_names=["cat"], template="{} and {}"), "exactly one '{}'"),
    (dict(class_names=["cat", "dog"], class_words=["kitty"]), "1 words for 2 classes"),
    (dict(class_names=["cat"], class_words={"horse": "pony"}), r"unknown classes \['horse'\]"),
    (dict(class_names=["cat"], background_words=["sky", ""]), "must not contain empty words"),
    (dict(class_names=["cat"], class_token_length=0), "class_token_length=0"),
    (dict(class_names=["cat"], learnable_tokens="last"), "learnable_tokens='last' must be one of"),
    (dict(class_names=["cat"], learnable_tokens="first", class_token_length=1), "leave class_token_length=None"),
    (dict(class_names=["cat"], image_feature="cls"), "image_feature='cls'"),
    (dict(class_names=["cat"], logit_scale=-1.0), "logit_scale=-1.0 must be positive"),
])
def test_validation_errors(kwargs, message):
    with pytest.raises(ValueError, match=message):
        PoleConfig(**kwargs)
