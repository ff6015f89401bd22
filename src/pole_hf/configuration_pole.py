"""POLE prompt configuration: which base CLIP, which classes and words, and how the class prompts are built."""

from __future__ import annotations

import os
from typing import ClassVar

from transformers import CLIPConfig, PreTrainedConfig
from transformers.configuration_utils import SubConfigSpec

from ._clip_internals import IMAGE_FEATURES
from .vocab import CLIP_ES_BACKGROUND_WORDS, DEFAULT_TEMPLATE

LEARNABLE_TOKENS = ("all", "first")


class PoleConfig(PreTrainedConfig):
    r"""Configuration of a [`PolePromptModel`]: a reference to a base CLIP plus the class prompts learned on top of it.

    Args:
        base_model_name_or_path (`str`, *optional*):
            Hub id or local folder of the base CLIP (`CLIPModel` weights, tokenizer, image processor). `None` means
            the CLIP bundled with `pole_hf` (see `pole_hf.assets`), or, when `clip_config` is given, a randomly
            initialised CLIP of that shape.
        base_model_revision (`str`, *optional*):
            Git revision (branch, tag or commit) of the base CLIP on the Hub.
        base_subfolder (`str`, *optional*):
            Set by `save_pretrained(include_base=True)`: the base CLIP is stored in this subfolder of the prompt repo.
        clip_config (`CLIPConfig` or `dict`, *optional*):
            The base's configuration, embedded so the model can be rebuilt and checked without the Hub.
        class_names (`list[str]`):
            Ordered foreground class names; class `i` has mask id `i + 1` (0 is background).
        class_words (`list[str]` or `dict[str, str]`, *optional*):
            The word put in the prompt of each class (default: the class names). A dict maps class names to words.
        background_words (`list[str]`, *optional*):
            Words describing background stuff, scored beside the classes (default: CLIP-ES's 25 words). `[]` for none.
        template (`str`, *optional*, defaults to `"a photo of a {}."`):
            Prompt template with exactly one `{}` where the class token goes.
        class_token_length (`int`, *optional*):
            Learnable vectors per class. `None` (the default): every token of a class word is its own vector (a
            per-class length), initialised from the word's token embeddings, so an untouched prompt *is* the
            sentence `template.format(word)` for any word and tokenizer. An integer fixes the number of vectors per
            class: a word with at most that many tokens keeps its own embeddings, a longer word is split into that
            many contiguous groups and each vector starts as the mean of its group — this *changes the prompt*
            ("dining table" with `class_token_length=1` is one vector, the mean of two tokens). Prompts saved by
            pole_hf 0.1.0 hold `class_token_length=1` and load with that grouping.
        learnable_tokens (`str`, *optional*, defaults to `"all"`):
            `"all"`: every class vector is learnable. `"first"`: POLE's DeFo-style variant (`clip_defo_utils.py`)
            — one learnable vector per class, initialised from the word's first token, while its remaining tokens
            stay fixed token embeddings (needs `class_token_length=None`).
        learn_context (`bool`, *optional*, defaults to `False`):
            Also learn the template words before the class token as shared vectors (CoOp-style context),
            initialised from their token embeddings.
        image_feature (`str`, *optional*, defaults to `"patch_mean"`):
            Image feature for scoring: `"patch_mean"` (CLIP-ES: post-layernorm on every token, mean over the patch
            tokens, projection) or `"pooled"` (CLIP's own class-token feature).
        logit_scale (`float`, *optional*):
            Fixed multiplier of the cosine similarities. `None` uses the base CLIP's learned `exp(logit_scale)`.
        use_adapters (`bool`, *optional*, defaults to `False`):
            POLE's learnable-ratio adapters on the image and text features: `f' = r * A(f) + (1 - r) * f` with
            `A` = Linear-ReLU-Linear-ReLU and `r` a learnable vector.
        adapter_reduction (`int`, *optional*, defaults to 4):
            Hidden width of the adapters is the feature width divided by this.
        adapter_ratio (`float`, *optional*, defaults to 0.2):
            Initial value of the adapters' ratio vectors.
        prediction_threshold (`float`, *optional*, defaults to 0.2):
            A class is predicted present when its softmax probability over [classes + background words] is at
            least this (used when no labels are given).
    """

    model_type: ClassVar[str] = "pole"
    sub_configs_defaults: ClassVar[dict] = {"clip_config": SubConfigSpec(CLIPConfig, optional=True)}

    base_model_name_or_path: str | None = None
    base_model_revision: str | None = None
    base_subfolder: str | None = None
    clip_config: dict | CLIPConfig | None = None
    class_names: list[str] | None = None
    class_words: list[str] | dict | None = None
    background_words: list[str] | None = None
    template: str = DEFAULT_TEMPLATE
    class_token_length: int | None = None
    learnable_tokens: str = "all"
    learn_context: bool = False
    image_feature: str = "patch_mean"
    logit_scale: float | None = None
    use_adapters: bool = False
    adapter_reduction: int = 4
    adapter_ratio: float = 0.2
    prediction_threshold: float = 0.2

    def __post_init__(self, **kwargs):
        self.class_names = [str(n) for n in (self.class_names or [])]
        if isinstance(self.class_words, dict):
            unknown = sorted(set(self.class_words) - set(self.class_names))
            if unknown:
                raise ValueError(f"class_words names unknown classes {unknown}; known classes: {self.class_names}")
            self.class_words = [str(self.class_words.get(n, n)) for n in self.class_names]
        self.class_words = list(self.class_words) if self.class_words is not None else list(self.class_names)
        if self.background_words is None:
            self.background_words = list(CLIP_ES_BACKGROUND_WORDS)
        self.background_words = [str(w) for w in self.background_words]
        super().__post_init__(**kwargs)
        # the pseudo masks' values: 0 background, class i at i + 1 (what `image-segmentation` pipelines name)
        self.id2label = {0: "background", **{index + 1: name for index, name in enumerate(self.class_names)}}
        self.label2id = {name: index for index, name in self.id2label.items()}
        self.check()

    def check(self) -> None:
        """Raise a `ValueError` naming the bad value when the prompt settings are inconsistent."""
        if not self.class_names:
            raise ValueError("class_names is empty: give at least one foreground class name, e.g. ['cat', 'dog']")
        duplicates = sorted({n for n in self.class_names if self.class_names.count(n) > 1})
        if duplicates:
            raise ValueError(f"class_names has duplicates {duplicates}: each class must appear once")
        if any(not n.strip() for n in self.class_names):
            raise ValueError(f"class_names has an empty name: {self.class_names}")
        if len(self.class_words) != len(self.class_names):
            raise ValueError(
                f"class_words has {len(self.class_words)} words for {len(self.class_names)} classes: give one word "
                "per class, in class_names order, or a dict {class_name: word}"
            )
        if any(not w.strip() for w in self.class_words + self.background_words):
            raise ValueError("class_words and background_words must not contain empty words")
        if self.template.count("{}") != 1:
            raise ValueError(f"template {self.template!r} must contain exactly one '{{}}' for the class word")
        if self.class_token_length is not None and (isinstance(self.class_token_length, bool)
                                                    or int(self.class_token_length) < 1):
            raise ValueError(f"class_token_length={self.class_token_length} must be None (every token of the word) "
                             "or an integer of at least 1")
        if self.learnable_tokens not in LEARNABLE_TOKENS:
            raise ValueError(f"learnable_tokens={self.learnable_tokens!r} must be one of {LEARNABLE_TOKENS}")
        if self.learnable_tokens == "first" and self.class_token_length is not None:
            raise ValueError(f"learnable_tokens='first' learns one vector per class and keeps the word's other tokens "
                             f"fixed: leave class_token_length=None (got {self.class_token_length})")
        if self.image_feature not in IMAGE_FEATURES:
            raise ValueError(f"image_feature={self.image_feature!r} must be one of {IMAGE_FEATURES}")
        if self.logit_scale is not None and not self.logit_scale > 0:
            raise ValueError(f"logit_scale={self.logit_scale} must be positive, or None to use the base CLIP's")

    @property
    def num_classes(self) -> int:
        """Number of foreground classes."""
        return len(self.class_names)

    def to_dict(self) -> dict:
        """As `PreTrainedConfig.to_dict`, without the base's machine-local folder in the embedded CLIP config: a saved
        or pushed config refers to its base by `base_model_name_or_path` only."""
        output = super().to_dict()
        clip = output.get("clip_config")
        if isinstance(clip, dict) and os.path.isabs(clip.get("_name_or_path") or ""):
            clip["_name_or_path"] = ""
        return output


__all__ = ["PoleConfig"]
