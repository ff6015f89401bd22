"""Prompt presets of the papers: CLIP-ES's and CLIMS/POLE's VOC settings, in from_clip, the scripts and the CLI."""

import importlib.util
import os

import numpy as np
import pytest
from helpers import random_image
from test_data import voc_root  # noqa: F401  (the fabricated VOC devkit fixture)

from pole_hf import PolePromptModel
from pole_hf.cli import main
from pole_hf.vocab import CLIP_ES_BACKGROUND_WORDS, PROMPT_PRESETS, VOC_CLASSES, VOC_CLIP_ES_WORDS, prompt_preset

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# CLIMS's clip_utils.py background_dict['voc'], as POLE uses it
CLIMS_VOC_BACKGROUND_PROMPTS = ["a photo of tree.", "a photo of river.", "a photo of sea.", "a photo of lake.",
                                "a photo of water.", "a photo of railway.", "a photo of railroad.",
                                "a photo of track.", "a photo of stone.", "a photo of rocks."]


def import_example(name):
    spec = importlib.util.spec_from_file_location(name, os.path.join(ROOT, "examples", f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_presets_hold_the_papers_settings():
    clip_es, pole = prompt_preset("clip-es-voc"), prompt_preset("pole-voc")
    assert clip_es.template == "a clean origami {}." and len(clip_es.background_words) == 25
    assert clip_es.background_words == CLIP_ES_BACKGROUND_WORDS and clip_es.class_words == VOC_CLIP_ES_WORDS
    assert clip_es.class_words["person"] == "person with clothes,people,human"
    assert [pole.template.format(w) for w in pole.background_words] == CLIMS_VOC_BACKGROUND_PROMPTS
    assert pole.class_words["person"] == "player" and pole.class_words["diningtable"] == "dining table"
    for preset in PROMPT_PRESETS.values():
        assert preset.class_names == VOC_CLASSES and set(preset.class_words) == set(VOC_CLASSES)
    with pytest.raises(ValueError, match=r"unknown prompt preset 'clip-es'.*'clip-es-voc', 'pole-voc'"):
        prompt_preset("clip-es")


def test_from_clip_preset_and_overrides(tiny_clip_dir):
    model = PolePromptModel.from_clip(tiny_clip_dir, preset="clip-es-voc")
    config = model.config
    assert config.class_names == list(VOC_CLASSES) and config.template == "a clean origami {}."
    assert config.class_words == list(VOC_CLIP_ES_WORDS.values())
    assert config.background_words == list(CLIP_ES_BACKGROUND_WORDS) and config.class_token_length is None
    model = PolePromptModel.from_clip(tiny_clip_dir, preset="pole-voc", class_words={"sofa": "couch"},
                                      background_words=["sky"], class_names=["cat", "sofa", "person"])
    assert model.config.class_words == ["cat", "couch", "player"] and model.config.background_words == ["sky"]
    assert model.config.template == "a photo of {}."
    with pytest.raises(ValueError, match="preset 'pole-voc' has words for .* none of the classes"):
        PolePromptModel.from_clip(tiny_clip_dir, preset="pole-voc", class_names=["zebra"])
    with pytest.raises(ValueError, match="needs class_names"):
        PolePromptModel.from_clip(tiny_clip_dir)


def test_cli_cam_with_a_preset(tiny_clip_dir, tmp_path, capsys):
    image = tmp_path / "img.png"
    random_image(0, 40, 48).save(image)
    out = tmp_path / "cams"
    assert main(["--quiet", "cam", str(image), "--preset", "clip-es-voc", "--base", tiny_clip_dir,
                 "--labels", "cat", "person", "--out", str(out)]) == 0
    assert np.load(out / "img_cams.npy").shape == (2, 40, 48)
    assert main(["--quiet", "cam", str(image), "--preset", "pole-voc", "--model", tiny_clip_dir,
                 "--out", str(out)]) == 1
    assert "not both" in capsys.readouterr().err


def test_generate_cams_with_a_preset(voc_root, tiny_clip_dir, tmp_path):  # noqa: F811
    generate_cams = import_example("generate_cams")
    generate_cams.main(["--preset", "clip-es-voc", "--base", tiny_clip_dir, "--dataset", f"voc:{voc_root}",
                        "--output_dir", str(tmp_path / "out"), "--cpu"])
    assert sorted(os.listdir(tmp_path / "out" / "cams")) == ["2007_000032.npy", "2008_000123.npy"]


def test_train_pole_builds_the_preset(tiny_clip_dir, tmp_path):
    train_pole = import_example("train_pole")
    args = train_pole.parse_args(["--preset", "pole-voc", "--base", tiny_clip_dir, "--output_dir", str(tmp_path),
                                  "--learnable_tokens", "first"])
    model = train_pole.build_model(args, list(VOC_CLASSES))
    assert model.config.template == "a photo of {}." and model.config.learnable_tokens == "first"
    assert model.config.background_words == list(prompt_preset("pole-voc").background_words)
