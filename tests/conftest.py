"""Test session setup: offline Hub, one torch thread, and the shared tiny CLIP fixtures."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch

torch.set_num_threads(1)

import pytest

pytest_plugins = ["hub_fixtures"]

TINY_BACKGROUND = ["grass", "sky", "water"]


@pytest.fixture(scope="session")
def tiny_clip_dir(tmp_path_factory):
    """A random tiny CLIP (2 layers, width 32, patch 8) with a real CLIP tokenizer, saved as an HF folder.

    With ``POLE_HF_TINY_CLIP_CACHE`` set (benchmarks/mutation.py: thousands of short pytest sessions) the folder is
    built there once and reused; tests never write into it."""
    from pole_hf.tiny import build_tiny_clip

    cache = os.environ.get("POLE_HF_TINY_CLIP_CACHE")
    if cache:
        if not os.path.isfile(os.path.join(cache, "done")):
            build_tiny_clip(cache, seed=0)
            open(os.path.join(cache, "done"), "w").close()
        return cache
    path = tmp_path_factory.mktemp("tiny-clip")
    build_tiny_clip(str(path), seed=0)
    return str(path)


@pytest.fixture(scope="session")
def tiny_clip(tiny_clip_dir):
    from transformers import CLIPModel

    return CLIPModel.from_pretrained(tiny_clip_dir).eval()


@pytest.fixture(scope="session")
def tiny_tokenizer(tiny_clip_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_clip_dir)


@pytest.fixture()
def tiny_model(tiny_clip_dir):
    """A fresh PolePromptModel on the tiny CLIP: three classes, three background words."""
    from pole_hf import PolePromptModel

    return PolePromptModel.from_clip(tiny_clip_dir, class_names=["cat", "dog", "sofa"],
                                     background_words=TINY_BACKGROUND)


@pytest.fixture(scope="session")
def bundled_prompts():
    """The prompts bundled with pole_hf on the bundled tiny CLIP (trained on the synthetic world); read-only."""
    from pole_hf import TINY_PROMPTS, PolePromptModel

    return PolePromptModel.from_pretrained(TINY_PROMPTS)


@pytest.fixture()
def tiny_processor(tiny_model):
    """The tiny model's PoleImageProcessor (the base CLIP's normalisation, patch 8)."""
    from pole_hf import PoleImageProcessor

    return PoleImageProcessor.for_model(tiny_model)


@pytest.fixture(scope="session")
def random_image():
    """`random_image(seed, height, width)`: a PIL RGB image of uniform random pixels (`helpers.random_image`)."""
    from helpers import random_image as make

    return make


@pytest.fixture()
def world_prompts(tiny_clip_dir, tmp_path):
    """Prompts for the synthetic world's 8 classes on the random tiny CLIP, saved in a folder."""
    from pole_hf import PolePromptModel
    from pole_hf.data import SyntheticWorld

    world = SyntheticWorld()
    model = PolePromptModel.from_clip(tiny_clip_dir, class_names=world.class_names,
                                      background_words=world.background_kinds)
    model.save_pretrained(tmp_path / "prompts")
    return str(tmp_path / "prompts")


@pytest.fixture(scope="session")
def vit_b16_clip(tiny_tokenizer):
    """A random-init CLIP of OpenAI ViT-B/16's shape (built, never downloaded), for size and shape checks."""
    from transformers import CLIPModel

    from pole_hf.tiny import vit_b16_config

    torch.manual_seed(0)
    config = vit_b16_config(vocab_size=len(tiny_tokenizer))
    config.text_config.bos_token_id = tiny_tokenizer.bos_token_id
    config.text_config.eos_token_id = config.text_config.pad_token_id = tiny_tokenizer.eos_token_id
    return CLIPModel(config).eval()
