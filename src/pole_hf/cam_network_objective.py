"""Training a [`PoleCamNetwork`] through frozen CLIP (CLIMS), with POLE's prompt variants.

Each (image, class) pair's sigmoid map masks the image (``map * x`` and ``(1 - map) * x``, bilinearly resized to
CLIP's input); frozen CLIP's pooled image features are scored against the pair's class prompt with POLE's losses
(10 OTM + 25 BTM + 1 CBS against CLIMS's background prompts). Gradients reach the network through the masks, and
the prompt model's learnable parts (context, class tokens, adapters) where a variant learns them; CLIP never.

Variants (the paper's table): ``clims`` official names, nothing learned in the prompts; ``coop`` the template's
context vectors learned from the official names; ``defo`` the context and one vector per class (the name's first
token; its other tokens stay fixed) learned; ``pole``
each pair's own selected word (per-image selection), fixed; with ``use_adapters`` POLE's learnable-ratio adapters
on the image and text features.

Sources: CLIMS ``step/train_clims.py``, ``clip_loss.py``, ``clip_utils.py`` (``background_dict['voc']``); POLE
``step/train_clims_{coop,defo,adapt}.py``, ``clip_tools/clip_utils.py`` (per-image words by file name).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
import torch.nn.functional as F

from .objective import PoleLossOutput, PoleObjective, masked_images
from .prompt_learner import tokenize_word

CLIMS_TEMPLATE = "a photo of {}."
CLIMS_BACKGROUND_WORDS = ("tree", "river", "sea", "lake", "water", "railway", "railroad", "track", "stone", "rocks")
"""CLIMS's ten VOC background prompts, ``'a photo of {}.'`` each."""
PROMPT_VARIANTS = ("clims", "coop", "defo", "pole")

CLIMS_SETTINGS = {"learning_rate": 2.5e-4, "classifier_lr_factor": 10.0, "prompt_lr_factor": 10.0,
                  "weight_decay": 1e-4, "train_batch_size": 16, "num_train_epochs": 15, "loss_weights": "10,25,1",
                  "area_weight": 0.0, "poly_power": 0.9}
"""The reference's second stage (CLIMS / POLE on VOC with a real CLIP; POLE's prompt learning rate factor is
unknown, its ``run_sample.py`` is missing: 10x like the classifier)."""
CLASSIFICATION_SETTINGS = {"learning_rate": 0.1, "classifier_lr_factor": 10.0, "weight_decay": 1e-4,
                           "train_batch_size": 16, "num_train_epochs": 5, "poly_power": 0.9}
"""IRN's ``train_cam`` (the first stage), which CLIMS starts from."""
TINY_CLIMS_SETTINGS = {**CLIMS_SETTINGS, "learning_rate": 1e-4, "num_train_epochs": 6}
"""Second stage on the synthetic world with the bundled tiny CLIP and a small random ResNet, chosen on the synthetic
`validation` split (60 images, 120 steps, CLIMS variant unless named; classification-stage network 39.1 CAM mIoU):
backbone rate 1e-4 39.9, 3e-4 34.6, 1e-3 16.2, 1e-2 18.1 (the sigmoid maps saturate within 20 steps); prompt parts
at 10x the backbone's rate (CoOp 40.1, DeFo 40.5 at step 60) rather than 1x (CoOp 38.5, DeFo 39.2). Higher rates
only lower the CAMs: see benchmarks/README.md."""
TINY_CLASSIFICATION_SETTINGS = {**CLASSIFICATION_SETTINGS, "learning_rate": 0.05, "num_train_epochs": 8}


def variant_options(variant: str, use_adapters: bool = False) -> dict:
    """`PoleConfig` options of a prompt variant (see the module docstring)."""
    if variant not in PROMPT_VARIANTS:
        raise ValueError(f"prompt variant {variant!r} is not one of {list(PROMPT_VARIANTS)}")
    # DeFo (POLE's clip_defo_utils.PromptLearner): one learned vector per class, the name's first token; the rest of
    # a multi-token name stays fixed
    return {"template": CLIMS_TEMPLATE, "learn_context": variant in ("coop", "defo"), "use_adapters": use_adapters,
            "learnable_tokens": "first" if variant == "defo" else "all"}


def freeze_for_variant(prompt_model, variant: str) -> list[torch.nn.Parameter]:
    """Set `requires_grad` on the prompt model's parts for `variant`; returns the parameters that learn."""
    prompt_model.prompt_learner.class_tokens.requires_grad_(variant == "defo")
    if prompt_model.prompt_learner.context is not None:
        prompt_model.prompt_learner.context.requires_grad_(variant in ("coop", "defo"))
    return [p for p in prompt_model.learnable_parameters() if p.requires_grad]


def word_text_features(prompt_model, words: Sequence[str]) -> torch.Tensor:
    """Text features ``[len(words), D]`` of the prompt model's template around each word, through its context
    (learned or not) and text adapter, L2-normalised; gradients reach the learnable parts.

    The word's own token embeddings fill the class slot, so an untouched model gives the plain sentence's features.
    """
    if prompt_model.tokenizer is None:
        raise ValueError("the prompt model has no tokenizer: per-pair words need one (load it with from_pretrained)")
    learner, embedding = prompt_model.prompt_learner, prompt_model.token_embedding
    dtype = embedding.weight.dtype
    prefix = embedding(learner.prefix_ids)
    if learner.context is not None:
        prefix = torch.cat([prefix[:1], learner.context.to(dtype)], dim=0)
    suffix = embedding(learner.suffix_ids)
    ids = [torch.tensor(tokenize_word(prompt_model.tokenizer, w), device=embedding.weight.device) for w in words]
    total = len(prefix) + max(len(i) for i in ids) + len(suffix)
    if total > prompt_model.max_text_length:
        raise ValueError(f"a prompt of {total} tokens is longer than the text model's {prompt_model.max_text_length}:"
                         " use shorter words")
    rows = []
    for row in ids:
        pad = prefix.new_zeros(total - len(prefix) - len(row) - len(suffix), prefix.shape[-1])
        rows.append(torch.cat([prefix, embedding(row), suffix, pad]))
    eos = torch.tensor([len(prefix) + len(r) + len(suffix) - 1 for r in ids], device=prefix.device)
    features = prompt_model.encode_prompt_embeddings(torch.stack(rows), eos)
    if prompt_model.text_adapter is not None:
        features = prompt_model.text_adapter(features)
    return F.normalize(features, dim=-1)


def pair_maps(maps: torch.Tensor, labels: Sequence[Sequence[int]]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One map per (image, class) pair from ``[N, C, h, w]``: ``(maps [P, h, w], image_indices [P], classes [P])``."""
    images = [i for i, classes in enumerate(labels) for _ in classes]
    classes = [int(c) for per_image in labels for c in per_image]
    index = torch.tensor(images, dtype=torch.long, device=maps.device)
    cls = torch.tensor(classes, dtype=torch.long, device=maps.device)
    return maps[index, cls], index, cls


class CamNetworkObjective(torch.nn.Module):
    """CLIMS's loss on a CAM network's maps, through a frozen [`PolePromptModel`].

    Args:
        weights (`dict[str, float]`, *optional*): OTM / BTM / CBS weights (POLE's 10 / 25 / 1).
        cbs_threshold (`float`, *optional*): CBS threshold (0.26).
        image_feature (`str`, *optional*, defaults to `"pooled"`): CLIP's pooled image feature, as CLIMS scores.
    """

    def __init__(self, weights: Mapping[str, float] | None = None, cbs_threshold: float | None = None,
                 image_feature: str = "pooled"):
        super().__init__()
        extra = {} if cbs_threshold is None else {"cbs_threshold": cbs_threshold}
        self.objective = PoleObjective(weights=weights, image_feature=image_feature, **extra)

    @property
    def weights(self) -> dict[str, float]:
        return self.objective.weights

    def forward(self, prompt_model, probability_maps: torch.Tensor, clip_pixels: torch.Tensor,
                labels: Sequence[Sequence[int]], pair_words: Sequence[Sequence[str]] | None = None,
                clip_size: tuple[int, int] | None = None) -> PoleLossOutput:
        """The losses of a batch.

        Args:
            prompt_model: the frozen-CLIP [`PolePromptModel`] (class prompts, background prompts, adapters).
            probability_maps (`torch.FloatTensor` of shape `(N, C, h, w)`): the network's sigmoid maps (with grad).
            clip_pixels (`torch.FloatTensor` of shape `(N, 3, H, W)`): the same images, CLIP-normalised.
            labels: per image, its class indices.
            pair_words: per image, one word per label (POLE's per-pair words); `None` uses the model's class
                prompts (official names, learned context or class tokens).
            clip_size: CLIP's input size (default the vision config's).
        """
        maps, images, classes = pair_maps(probability_maps, labels)
        size = clip_size or (prompt_model.clip.config.vision_config.image_size,) * 2
        fg, bg = masked_images(clip_pixels, maps, images, size=size, detach=False)
        num_classes = prompt_model.config.num_classes
        if pair_words is not None:
            words = [str(w) for per_image in pair_words for w in per_image]
            if len(words) != len(classes):
                raise ValueError(f"{len(words)} pair words for {len(classes)} (image, class) pairs: give one word "
                                 "per label of every image")
            unique = list(dict.fromkeys(words))
            bank = word_text_features(prompt_model, unique) if unique else None
            background = prompt_model.get_text_features()[num_classes:]
            if bank is None:
                text = background
            else:
                text = torch.cat([bank, background.to(bank.dtype)])
            classes = torch.tensor([unique.index(w) for w in words], dtype=torch.long, device=text.device)
            num_classes = len(unique)
        else:
            text = prompt_model.get_text_features()
        pairs = fg.shape[0]
        if pairs == 0:
            empty = text.new_zeros(0, text.shape[-1]) + probability_maps.sum() * 0.0
            return self.objective.losses(empty, empty, text, classes, num_classes)
        features = self.objective.image_features(prompt_model, torch.cat([fg, bg]))
        return self.objective.losses(features[:pairs], features[pairs:], text, classes, num_classes)


__all__ = [
    "CLASSIFICATION_SETTINGS",
    "CLIMS_BACKGROUND_WORDS",
    "CLIMS_SETTINGS",
    "CLIMS_TEMPLATE",
    "CamNetworkObjective",
    "PROMPT_VARIANTS",
    "TINY_CLASSIFICATION_SETTINGS",
    "TINY_CLIMS_SETTINGS",
    "freeze_for_variant",
    "pair_maps",
    "variant_options",
    "word_text_features",
]
