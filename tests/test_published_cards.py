"""The top-level model_cards/ folder: each card equals what the renderer produces and passes the Hub's validation."""

import os

import pytest
from huggingface_hub import ModelCard
from huggingface_hub.utils import get_session, hf_raise_for_status

from pole_hf import TINY_PROMPTS
from pole_hf.published_cards import PUBLISHED_CARDS, render_published_card

CARDS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "model_cards")


def test_the_folder_holds_exactly_the_published_cards():
    assert sorted(os.listdir(CARDS)) == sorted(f"{name}.md" for name in PUBLISHED_CARDS)


@pytest.mark.parametrize("name", sorted(PUBLISHED_CARDS))
def test_card_equals_its_rendering_and_validates(name, local_hub):
    with open(os.path.join(CARDS, f"{name}.md"), encoding="utf-8") as f:
        text = f.read()
    assert text == str(render_published_card(name)), f"model_cards/{name}.md is stale: python -m " \
                                                     "pole_hf.published_cards model_cards"
    card = ModelCard(text)
    assert card.data.library_name == "pole_hf" and card.data.pipeline_tag == "image-segmentation"
    response = get_session().post(f"{local_hub.endpoint}/api/validate-yaml", headers={"Accept": "text/plain"},
                                  json={"repoType": "model", "content": text})
    hf_raise_for_status(response)


def test_the_bundled_prompts_carry_their_published_card():
    with open(os.path.join(TINY_PROMPTS, "README.md"), encoding="utf-8") as f, \
            open(os.path.join(CARDS, "tiny-prompts.md"), encoding="utf-8") as g:
        assert f.read() == g.read()


def test_preset_cards_describe_untouched_prompts_on_the_real_base():
    card = ModelCard(str(render_published_card("clip-es-voc")))
    assert card.data.base_model == "openai/clip-vit-base-patch16"
    assert "a clean origami {}." in card.text and "(learned)" not in card.text
