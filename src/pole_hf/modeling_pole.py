"""PolePromptModel: a frozen HF CLIP plus learnable class prompts, saved like a PEFT adapter."""

from __future__ import annotations

import copy
import os
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from transformers import CLIPModel, PreTrainedModel
from transformers.utils import ModelOutput

from . import _clip_internals as internals
from .bundled import is_tiny_clip
from .caa import BOX_THRESHOLD
from .cam import CAA_LAYERS, gradcam
from .configuration_pole import PoleConfig
from .hub import push_prompts_to_hub
from .loading import (
    cached_commit,
    load_base_clip,
    load_base_tokenizer,
    load_prompts,
    save_prompts,
    try_load_base_tokenizer,
)
from .prompt_learner import PoleAdapter, PolePromptLearner
from .vocab import prompt_preset


@dataclass
class PoleModelOutput(ModelOutput):
    """Output of [`PolePromptModel.forward`].

    Args:
        loss (`torch.FloatTensor`, *optional*): multi-label loss, given `labels`: cross-entropy of the softmax over
            [classes + background words] against the labels spread evenly over an image's classes.
        logits (`torch.FloatTensor` of shape `(batch, num_classes)`): scaled image-to-class-prompt similarities.
        background_logits (`torch.FloatTensor` of shape `(batch, num_background)`): the same for background words.
        image_embeds (`torch.FloatTensor` of shape `(batch, projection_dim)`): L2-normalised image features.
        text_embeds (`torch.FloatTensor` of shape `(num_classes + num_background, projection_dim)`): L2-normalised
            text features of the class prompts, then the background prompts.
        cams (`torch.FloatTensor` of shape `(batch, num_targets, height / patch, width / patch)`, *optional*):
            CLIP-ES GradCAMs in [0, 1] on the patch grid, one per target class of each image (`num_targets` is the
            most targets of any image in the batch; padded slots are zero).
        cam_classes (`torch.LongTensor` of shape `(batch, num_targets)`, *optional*): the class index of each map,
            in the order the targets were given (or predicted, ascending), `-1` for padding.
        cam_scores (`torch.FloatTensor` of shape `(batch, num_targets)`, *optional*): each target's softmax
            probability over [that image's targets + the background words] (0 for padding).
    """

    loss: torch.FloatTensor | None = None
    logits: torch.FloatTensor | None = None
    background_logits: torch.FloatTensor | None = None
    image_embeds: torch.FloatTensor | None = None
    text_embeds: torch.FloatTensor | None = None
    cams: torch.FloatTensor | None = None
    cam_classes: torch.LongTensor | None = None
    cam_scores: torch.FloatTensor | None = None


class PolePromptModel(PreTrainedModel):
    """A frozen CLIP whose class prompts carry learnable class tokens (POLE), with CLIP-ES-style image features.

    Args:
        config ([`PoleConfig`]): the prompt configuration; `config.clip_config` describes the base CLIP.
        clip_model (`CLIPModel`, *optional*): an already built or loaded base CLIP; built from `config.clip_config`
            with random weights when omitted.
        tokenizer (*optional*): the base's tokenizer; loaded from `config.base_model_name_or_path` when omitted.
            Without one the prompt ids stay empty until a prompts file is loaded.
        load_tokenizer (`bool`, *optional*, defaults to `True`): whether to look the tokenizer up when none is given
            (`False` when the caller already tried, as `from_pretrained` does).
    """

    config_class = PoleConfig
    base_model_prefix = "pole"
    main_input_name = "pixel_values"
    input_modalities = ("image",)

    def __init__(self, config: PoleConfig, clip_model: CLIPModel | None = None, tokenizer=None,
                 load_tokenizer: bool = True):
        if clip_model is None:
            if config.clip_config is None:
                raise ValueError("PoleConfig has no clip_config: build with PolePromptModel.from_clip(...) or "
                                 "PolePromptModel.from_pretrained(...)")
            clip_model = CLIPModel(config.clip_config)
        # a copy: transformers adjusts the composite config's attention settings, which must not touch the base's
        config.clip_config = copy.deepcopy(clip_model.config)
        super().__init__(config)
        self.clip = clip_model
        self.clip.requires_grad_(False)
        self.clip.eval()
        text_width = clip_model.config.text_config.hidden_size
        self.prompt_learner = PolePromptLearner(config.num_classes, config.class_token_length, text_width,
                                                len(config.background_words), config.learn_context,
                                                config.learnable_tokens)
        if config.use_adapters:
            dim = clip_model.config.projection_dim
            self.visual_adapter = PoleAdapter(dim, config.adapter_reduction, config.adapter_ratio)
            self.text_adapter = PoleAdapter(dim, config.adapter_reduction, config.adapter_ratio)
        else:
            self.visual_adapter = self.text_adapter = None
        self.post_init()
        if tokenizer is None and load_tokenizer:
            tokenizer = try_load_base_tokenizer(config.base_model_name_or_path, revision=config.base_model_revision)
        self.tokenizer = tokenizer
        self._text_cache: dict = {}
        if self.tokenizer is not None:
            self.prompt_learner.initialize(self.tokenizer, self.token_embedding, config.template,
                                           config.class_words, config.background_words, self.max_text_length)

    def init_weights(self):
        """No-op: prompts start from the base's token embeddings and the base CLIP is already built or loaded."""

    def train(self, mode: bool = True):
        """Set train mode on the prompt learner and adapters only; the frozen CLIP always stays in eval mode."""
        super().train(mode)
        self.clip.eval()
        return self

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_clip(cls, clip_model_or_path: CLIPModel | str, class_names: list[str] | None = None, tokenizer=None,
                  revision: str | None = None, preset: str | None = None, **config_options) -> PolePromptModel:
        """A fresh prompt model on a base CLIP.

        Args:
            clip_model_or_path: a loaded `CLIPModel`, or a Hub id / local folder to load one from.
            class_names: ordered foreground class names (default: the preset's classes).
            tokenizer: the base's tokenizer (loaded from the path or `clip_model.name_or_path` when omitted).
            revision: Hub revision of the base, when given as a path.
            preset: a published prompt setting from `pole_hf.vocab.PROMPT_PRESETS`: `"clip-es-voc"` (CLIP-ES:
                'a clean origami {}.', its words and 25 background words) or `"pole-voc"` (CLIMS/POLE: 'a photo of
                {}.', CLIMS's words and 10 background prompts). Explicit `config_options` override its fields; a
                `class_words` dict is merged into the preset's words.
            **config_options: any other [`PoleConfig`] field (`class_words`, `background_words`, `template`, ...).
        """
        if preset is not None:
            options = prompt_preset(preset).config_options(class_names)
            words = config_options.pop("class_words", None)
            if isinstance(words, dict):
                options["class_words"].update(words)
            elif words is not None:
                options["class_words"] = words
            class_names = options.pop("class_names")
            config_options = {**options, **config_options}
        if class_names is None:
            raise ValueError("from_clip needs class_names (or a preset such as preset='clip-es-voc')")

        if isinstance(clip_model_or_path, str):
            path = clip_model_or_path
            clip_model = load_base_clip(path, revision=revision)
        else:
            clip_model = clip_model_or_path
            given = config_options.pop("base_model_name_or_path", None)
            path = given or clip_model.config.name_or_path or None
        if tokenizer is None:
            if not path:
                raise ValueError("the CLIP model has no name_or_path to load its tokenizer from: pass tokenizer=...")
            tokenizer = load_base_tokenizer(path, revision=revision)
        reference = None if is_tiny_clip(path) else path  # the bundled CLIP is referred to as None, not a local path
        if revision is None and reference and not os.path.isdir(reference):
            # a Hub base is pinned to the commit it was loaded from, so the prompts always meet the same CLIP
            revision = cached_commit(reference)
        config = PoleConfig(base_model_name_or_path=reference, base_model_revision=revision,
                            clip_config=copy.deepcopy(clip_model.config), class_names=list(class_names), **config_options)
        return cls(config, clip_model=clip_model, tokenizer=tokenizer)

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *model_args, **kwargs) -> PolePromptModel:
        """Load prompts (config.json + model.safetensors) and their base CLIP. See `pole_hf.loading.load_prompts`."""
        return load_prompts(cls, pretrained_model_name_or_path, **kwargs)

    @classmethod
    def register_for_auto_class(cls, auto_class="AutoModel"):
        """Not supported: prompts load through `pole_hf` (`pip install pole_hf`), not as remote code.

        A `trust_remote_code` copy would need the whole package beside every prompt repo (the model's code spans
        configuration, prompt learner, CAM engine and loading, and the default base is bundled data).
        """
        raise NotImplementedError("PolePromptModel cannot be registered as remote code: users load prompts with "
                                  "pole_hf installed (pip install pole_hf; import pole_hf; AutoModel.from_pretrained)")

    def save_pretrained(self, save_directory, include_base: bool = False, push_to_hub: bool = False, **kwargs):
        """Save config.json and a prompts-only model.safetensors (the base CLIP only with `include_base=True`)."""
        return save_prompts(self, save_directory, include_base=include_base, push_to_hub=push_to_hub, **kwargs)

    def push_to_hub(self, repo_id: str, *, commit_message: str | None = None, private: bool | None = None,
                    token: str | bool | None = None, revision: str | None = None, include_base: bool = False,
                    selection_file: str | None = None, **card_kwargs) -> str:
        """Push the prompts (never the CLIP weights unless `include_base`), a model card and the selection JSON.

        Args:
            repo_id: the Hub repo to create or update.
            revision: branch to push to (created when missing).
            selection_file: a `selection.json` written by `pole_hf.selection` to upload beside the prompts.
            **card_kwargs: `datasets`, `eval_results` (`pole_hf.hub.PoleEvalResult`), `training` for the card.

        Returns:
            the commit URL.
        """
        return push_prompts_to_hub(self, repo_id, commit_message=commit_message, private=private, token=token,
                                   revision=revision, include_base=include_base, selection_file=selection_file,
                                   **card_kwargs)

    # ------------------------------------------------------------------ prompts
    @property
    def token_embedding(self) -> nn.Embedding:
        return self.clip.text_model.embeddings.token_embedding

    @property
    def max_text_length(self) -> int:
        return self.clip.config.text_config.max_position_embeddings

    @property
    def class_names(self) -> list[str]:
        return list(self.config.class_names)

    def learnable_parameters(self) -> list[nn.Parameter]:
        """The parameters that training updates: class tokens, optional context, optional adapters."""
        return [p for n, p in self.named_parameters() if not n.startswith("clip.")]

    def set_class_words(self, words: dict[str, str]) -> None:
        """Replace classes' prompt words (e.g. POLE's selected synonyms) and re-initialise their vectors.

        Args:
            words: `{class_name: word}`; unknown class names raise a `ValueError` listing the known classes.
        """
        unknown = sorted(set(words) - set(self.config.class_names))
        if unknown:
            raise ValueError(f"unknown classes {unknown}; known classes: {self.config.class_names}")
        if self.tokenizer is None:
            raise ValueError("this model has no tokenizer: load it with from_pretrained or pass tokenizer=")
        for name, word in words.items():
            index = self.config.class_names.index(name)
            self.prompt_learner.set_class_word(index, self.tokenizer, self.token_embedding, word,
                                               self.max_text_length)
            self.config.class_words[index] = word

    # ------------------------------------------------------------------ text side
    def encode_prompt_embeddings(self, embeds: torch.Tensor, eos_positions: torch.Tensor) -> torch.Tensor:
        """Run CLIP's text transformer on embedded prompts ``[N, T, D]`` and project the EOS token's state."""
        return internals.text_features_from_embeddings(self.clip, embeds, eos_positions)

    def _prompt_state(self, part: str) -> tuple:
        """What the cached text features depend on: the identity and version counter of every prompt tensor of
        `part` (``"background"``: the background ids; ``"all"``: every prompt parameter and buffer), and the
        device and dtype. Optimizer steps, `set_class_words`, loading prompts or checkpoints all change it, so the
        cache never needs clearing by hand."""
        learner = self.prompt_learner
        if part == "background":
            tensors = [learner.background_ids, learner.background_lengths]
        else:
            tensors = [t for name, t in (*self.named_parameters(), *self.named_buffers()) if not name.startswith("clip.")]
        return (part, self.clip.dtype, learner.class_tokens.device,
                tuple((t.data_ptr(), t._version, tuple(t.shape)) for t in tensors))

    def _background_features(self) -> torch.Tensor:
        pl = self.prompt_learner
        key = self._prompt_state("background")
        if key not in self._text_cache:
            if pl.background_ids.shape[0] == 0:
                features = self.clip.text_projection.weight.new_zeros(0, self.clip.config.projection_dim)
            else:
                with torch.no_grad():
                    features = self.encode_prompt_embeddings(self.token_embedding(pl.background_ids),
                                                             pl.background_lengths - 1)
            self._text_cache = {k: v for k, v in self._text_cache.items() if k[0] != "background"}
            self._text_cache[key] = features
        return self._text_cache[key]

    def get_text_features(self) -> torch.Tensor:
        """L2-normalised text features of [class prompts + background prompts], ``[C + B, projection_dim]``.

        Cached while no prompt tensor changed (see `_prompt_state`). With autograd on and learnable parameters
        requiring grad, they are computed fresh so gradients flow into the class tokens.
        """
        learnable = self.learnable_parameters()
        needs_graph = torch.is_grad_enabled() and any(p.requires_grad for p in learnable)
        key = self._prompt_state("all")
        if not needs_graph and key in self._text_cache:
            return self._text_cache[key]
        embeds, eos = self.prompt_learner.class_prompt_embeddings(self.token_embedding)
        features = torch.cat([self.encode_prompt_embeddings(embeds, eos), self._background_features()], dim=0)
        if self.text_adapter is not None:
            features = self.text_adapter(features)
        features = F.normalize(features, dim=-1)
        if not needs_graph:
            self._text_cache = {k: v for k, v in self._text_cache.items() if k[0] == "background"}
            self._text_cache[key] = features
        return features

    # ------------------------------------------------------------------ image side
    def image_features_from_tokens(self, last_hidden_state: torch.Tensor, image_feature: str | None = None
                                   ) -> torch.Tensor:
        """Projected image features from the vision encoder's last block output ``[N, 1 + HW, width]``.

        Args:
            last_hidden_state: the vision encoder's output tokens.
            image_feature: `"patch_mean"` (CLIP-ES's order: post-layernorm on every token, mean over patch tokens,
                projection) or `"pooled"` (post-layernorm of the class token, projection); default
                `config.image_feature`. Adapters apply after; the result is not normalised.
        """
        pooled = internals.pool_tokens(self.clip, last_hidden_state, image_feature or self.config.image_feature)
        return self.image_features_from_pooled(pooled)

    def image_features_from_pooled(self, pooled: torch.Tensor) -> torch.Tensor:
        """Projected image features (adapters applied, not normalised) from the pooled post-layernorm state
        ``[N, width]`` (`internals.pool_tokens`)."""
        features = self.clip.visual_projection(pooled)
        if self.visual_adapter is not None:
            features = self.visual_adapter(features)
        return features

    def get_image_features(self, pixel_values: torch.Tensor, image_feature: str | None = None) -> torch.Tensor:
        """L2-normalised image features ``[N, projection_dim]`` at any input size (position embeddings interpolated
        bicubically); `image_feature` as in [`image_features_from_tokens`]."""
        tokens = internals.vision_output_tokens(self.clip, pixel_values)
        return F.normalize(self.image_features_from_tokens(tokens, image_feature), dim=-1)

    def get_logit_scale(self) -> torch.Tensor:
        """The multiplier of cosine similarities: `config.logit_scale`, or the base CLIP's `exp(logit_scale)`."""
        if self.config.logit_scale is not None:
            return torch.tensor(float(self.config.logit_scale), device=self.clip.logit_scale.device)
        return self.clip.logit_scale.exp()

    # ------------------------------------------------------------------ CAMs
    def get_cams(self, pixel_values: torch.Tensor, class_indices=None, refine: bool = False,
                 caa_layers: int = CAA_LAYERS, box_threshold: float = BOX_THRESHOLD, box_edges: str = "clip_es",
                 position_embedding: str = "clip_es") -> PoleModelOutput:
        """CLIP-ES GradCAMs of a batch of same-size images, on the patch grid (one forward, one batched backward).

        Args:
            pixel_values (`torch.FloatTensor` of shape `(batch, 3, H, W)`): images from [`PoleImageProcessor`]
                (H, W multiples of the patch size).
            class_indices (*optional*): per image a list of class indices (a flat list for one image); `None` (or a
                `None` entry) predicts them with `config.prediction_threshold`.
            refine: class-aware attention affinity (CAA) over the last `caa_layers` blocks' attention.
            box_threshold: CAA's box threshold (fraction of the map's maximum).
            box_edges: `"clip_es"` (the grid's last row and column never lie inside a CAA box) or `"full"`.
            position_embedding: `"clip_es"` (bilinear, rounded to fp16) or `"bicubic"` (transformers').

        Returns:
            [`PoleModelOutput`] with `cams`, `cam_classes`, `cam_scores`, `logits`, `background_logits`,
            `image_embeds` and `text_embeds` (no loss).
        """
        grid = gradcam(self, pixel_values, class_indices, refine=refine, caa_layers=caa_layers,
                       box_threshold=box_threshold, box_edges=box_edges, position_embedding=position_embedding)
        num_classes = self.config.num_classes
        return PoleModelOutput(logits=grid.logits[:, :num_classes], background_logits=grid.logits[:, num_classes:],
                               image_embeds=grid.image_embeds, text_embeds=grid.text_embeds,
                               cams=grid.cams, cam_classes=grid.cam_classes, cam_scores=grid.cam_scores)

    def forward(self, pixel_values: torch.Tensor, labels: torch.Tensor | None = None, class_indices=None,
                output_cams: bool | None = None, return_dict: bool | None = None, **cam_options
                ) -> PoleModelOutput | tuple:
        """Score images against the class and background prompts, and compute their CAMs.

        Args:
            pixel_values (`torch.FloatTensor` of shape `(batch, 3, H, W)`): processed images, any size that is a
                multiple of the patch size.
            labels (`torch.Tensor` of shape `(batch, num_classes)`, *optional*): multi-hot image-level labels: the
                loss is computed (differentiable in the prompts), and they are the CAM targets.
            class_indices (*optional*): CAM targets per image (see [`get_cams`]); default `labels`, else predicted.
            output_cams (`bool`, *optional*): also compute `cams` (GradCAM, its own forward); default: yes, unless
                `labels` are given (a training call scores only). `logits` always come from the scoring pass
                (transformers' bicubic position embeddings); [`get_cams`] returns the CAM pass's own.
            return_dict (`bool`, *optional*): return a [`PoleModelOutput`] (default) or a tuple.
            **cam_options: `refine`, `caa_layers`, `box_threshold`, `box_edges`, `position_embedding` of
                [`get_cams`].
        """
        if output_cams is None:
            output_cams = labels is None
        if cam_options and not output_cams:
            raise ValueError(f"CAM options {sorted(cam_options)} given with output_cams=False: pass output_cams=True")
        image_embeds = self.get_image_features(pixel_values)
        text_embeds = self.get_text_features()
        logits_all = self.get_logit_scale() * image_embeds @ text_embeds.t().to(image_embeds.dtype)
        num_classes = self.config.num_classes
        loss = None if labels is None else multilabel_softmax_loss(logits_all, labels.to(logits_all.dtype))
        output = PoleModelOutput(loss=loss, logits=logits_all[:, :num_classes],
                                 background_logits=logits_all[:, num_classes:], image_embeds=image_embeds,
                                 text_embeds=text_embeds)
        if output_cams:
            if class_indices is None and labels is not None:
                class_indices = [torch.nonzero(row).flatten().tolist() for row in labels]
            cams = self.get_cams(pixel_values, class_indices, **cam_options)
            output.cams, output.cam_classes, output.cam_scores = cams.cams, cams.cam_classes, cams.cam_scores
        return output if return_dict is not False else output.to_tuple()


def multilabel_softmax_loss(logits_all: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Cross-entropy of the softmax over [classes + background] against targets spread evenly over the labels.

    Images without any label target the background prompts evenly (or are skipped when there are none).
    """
    num_classes = labels.shape[1]
    targets = torch.zeros_like(logits_all)
    targets[:, :num_classes] = labels
    empty = labels.sum(1) == 0
    if logits_all.shape[1] > num_classes:
        targets[empty, num_classes:] = 1.0
    keep = targets.sum(1) > 0
    if not keep.any():
        return logits_all.sum() * 0.0
    targets = targets[keep] / targets[keep].sum(1, keepdim=True)
    return -(targets * logits_all[keep].log_softmax(-1)).sum(1).mean()


__all__ = ["PoleModelOutput", "PolePromptModel"]
