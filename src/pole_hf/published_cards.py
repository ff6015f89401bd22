"""The model cards of the repos this project publishes, rendered from the package's template.

The rendered cards live in the repository's top-level `model_cards/` folder (and the bundled prompts' card also as
`assets/tiny-prompts/README.md`); `tests/test_published_cards.py` checks that each file equals what
[`render_published_card`] produces and that the Hub's card validation accepts it. After changing the template, a
preset or the package version, write them anew::

    python -m pole_hf.published_cards model_cards
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable
from dataclasses import dataclass, field

from huggingface_hub import ModelCard

from .bundled import TINY_PROMPTS
from .configuration_pole import PoleConfig
from .hub import PoleEvalResult, render_model_card
from .vocab import PROMPT_PRESETS

REAL_CLIP = "openai/clip-vit-base-patch16"


@dataclass(frozen=True)
class PublishedCard:
    """What a published repo's card is rendered from: its prompts configuration and the card's other inputs."""

    repo_id: str
    config: Callable[[], PoleConfig]
    datasets: tuple[str, ...] = ()
    eval_results: tuple[PoleEvalResult, ...] = ()
    training: dict = field(default_factory=dict)
    learned: bool = False


def _preset_config(name: str) -> PoleConfig:
    return PoleConfig(base_model_name_or_path=REAL_CLIP, **PROMPT_PRESETS[name].config_options())


def _bundled_config() -> PoleConfig:
    return PoleConfig.from_pretrained(TINY_PROMPTS)


PUBLISHED_CARDS: dict[str, PublishedCard] = {
    "tiny-prompts": PublishedCard(
        "pole-hf/tiny-prompts", _bundled_config, datasets=("synthetic",),
        eval_results=(PoleEvalResult("cam_miou", 77.84, "synthetic", "test"),),
        training={"global batch": 16, "learning rate": 0.001, "loss weights (otm/btm/cbs)": "10.0/25.0/1.0", "seed": 0,
                  "steps": 100}, learned=True),
    "clip-es-voc": PublishedCard("pole-hf/clip-es-voc", lambda: _preset_config("clip-es-voc"),
                                 datasets=("pascal-voc-2012",)),
    "pole-voc": PublishedCard("pole-hf/pole-voc", lambda: _preset_config("pole-voc"), datasets=("pascal-voc-2012",)),
}
"""Card name (its file in `model_cards/`) -> what it is rendered from."""


def render_published_card(name: str) -> ModelCard:
    """The card of a published repo (see [`PUBLISHED_CARDS`])."""
    if name not in PUBLISHED_CARDS:
        raise ValueError(f"no published card {name!r}; known: {sorted(PUBLISHED_CARDS)}")
    spec = PUBLISHED_CARDS[name]
    training = {k: str(v) for k, v in spec.training.items()}
    card = render_model_card(spec.config(), repo_id=None if name == "tiny-prompts" else spec.repo_id,
                             datasets=list(spec.datasets) or None, eval_results=list(spec.eval_results),
                             training=training or None, learned=spec.learned)
    return card


def write_published_cards(folder: str) -> list[str]:
    """Write every published card into `folder` as `<name>.md`; returns the paths."""
    os.makedirs(folder, exist_ok=True)
    paths = []
    for name in PUBLISHED_CARDS:
        path = os.path.join(folder, f"{name}.md")
        with open(path, "w", encoding="utf-8") as f:
            f.write(str(render_published_card(name)))
        paths.append(path)
    return paths


if __name__ == "__main__":
    print("\n".join(write_published_cards(sys.argv[1] if len(sys.argv) > 1 else "model_cards")))
