"""PoleCamNetwork: the CAM network of CLIMS and POLE, on transformers' ResNet.

A ResNet (any depth; ResNet-50 in the papers) whose last stage keeps its resolution (output stride 16, CLIMS's strides
(2, 2, 2, 1)), a bias-free 1x1 classifier to one map per class, and two heads on it: global average pooling then the
classifier for image-level logits (IRN's `train_cam`, multi-label soft margin), and sigmoid maps for training through
frozen CLIP (CLIMS). Inference CAMs: ReLU of the classifier on the feature map at scales 1, 0.5, 1.5, 2 with flips,
summed at a common size and max-normalised per class (IRN/CLIMS `make_cam`).

Sources: CLIMS ``CVI-SZU/CLIMS`` ``net/resnet50_clims.py`` (`Net`, `CLIMS`, `CAM`), ``step/make_cam.py``; POLE
``Ruxie189/WSS_POLE`` (a fork of it). Difference: BatchNorm stays frozen by default in both stages (IRN's
`FixedBatchNorm`; CLIMS's second stage trains it), which keeps one and several processes identical.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from transformers import PreTrainedModel, ResNetModel
from transformers.utils import ModelOutput

from .cam import padded_targets, resolve_targets
from .configuration_pole_cam_network import PoleCamNetworkConfig


@dataclass
class PoleCamNetworkOutput(ModelOutput):
    """Output of [`PoleCamNetwork.forward`].

    Args:
        loss (`torch.FloatTensor` of shape `()`, *optional*): multi-label soft-margin loss, given `labels`.
        logits (`torch.FloatTensor` of shape `(batch, num_classes)`): the classifier on the pooled feature map.
        class_maps (`torch.FloatTensor` of shape `(batch, num_classes, height / 16, width / 16)`): the classifier on
            every position of the feature map (before any activation).
        probability_maps (`torch.FloatTensor` of shape `(batch, num_classes, height / 16, width / 16)`):
            `sigmoid(class_maps)`, the maps CLIMS masks images with.
        feature_map (`torch.FloatTensor` of shape `(batch, feature_size, height / 16, width / 16)`): the last stage.
        cams (`torch.FloatTensor` of shape `(batch, num_targets, height / 16, width / 16)`, *optional*): from
            [`PoleCamNetwork.get_cams`]: `relu(class_maps)` of each image's target classes (padded slots zero).
        cam_classes (`torch.LongTensor` of shape `(batch, num_targets)`, *optional*): the class of each map, `-1`
            for padding.
        cam_scores (`torch.FloatTensor` of shape `(batch, num_targets)`, *optional*): the targets' sigmoid
            probabilities.
    """

    loss: torch.FloatTensor | None = None
    logits: torch.FloatTensor | None = None
    class_maps: torch.FloatTensor | None = None
    probability_maps: torch.FloatTensor | None = None
    feature_map: torch.FloatTensor | None = None
    cams: torch.FloatTensor | None = None
    cam_classes: torch.LongTensor | None = None
    cam_scores: torch.FloatTensor | None = None


def _keep_last_stage_resolution(resnet: ResNetModel) -> None:
    """Stride 1 in the last stage (its first layer's strided 3x3 or 1x1 conv and its shortcut): output stride 16."""
    for module in resnet.encoder.stages[-1].modules():
        if isinstance(module, nn.Conv2d) and module.stride != (1, 1):
            module.stride = (1, 1)


class PoleCamNetwork(PreTrainedModel):
    """A ResNet CAM network (CLIMS / POLE) with image-level logits, sigmoid maps and multi-scale CAMs.

    Args:
        config ([`PoleCamNetworkConfig`]): backbone, classes, output stride and CAM settings.
        backbone (`ResNetModel`, *optional*): an already loaded backbone (e.g. `microsoft/resnet-50`); built from
            `config.backbone_config` with random weights when omitted.
    """

    config_class = PoleCamNetworkConfig
    base_model_prefix = "pole_cam_network"
    main_input_name = "pixel_values"
    input_modalities = ("image",)

    def __init__(self, config: PoleCamNetworkConfig, backbone: ResNetModel | None = None):
        super().__init__(config)
        self.resnet = backbone if backbone is not None else ResNetModel(config.backbone_config)
        if config.output_stride == 16:
            _keep_last_stage_resolution(self.resnet)
        self.classifier = nn.Conv2d(config.feature_size, config.num_classes, 1, bias=False)
        self.post_init()
        self._freeze_stem()

    def _init_weights(self, module):
        if module is getattr(self, "classifier", None):
            nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")

    def init_weights(self):
        """Initialise the classifier only: the backbone is built (or loaded) with its own initialisation."""
        if getattr(self, "classifier", None) is not None:
            self._init_weights(self.classifier)

    def _freeze_stem(self) -> None:
        if self.config.freeze_stem:
            self.resnet.embedder.requires_grad_(False)

    @classmethod
    def from_backbone(cls, backbone_name_or_path: str, class_names: Sequence[str], revision: str | None = None,
                      **config_options) -> PoleCamNetwork:
        """A fresh CAM network on a pretrained transformers ResNet (e.g. `"microsoft/resnet-50"`).

        Args:
            backbone_name_or_path: a Hub id or local folder of a `ResNetModel` / `ResNetForImageClassification`.
            class_names: ordered foreground class names.
            revision: Hub revision of the backbone.
            **config_options: any other [`PoleCamNetworkConfig`] field.
        """
        backbone = ResNetModel.from_pretrained(backbone_name_or_path, revision=revision)
        config = PoleCamNetworkConfig(backbone_config=backbone.config, class_names=class_names, **config_options)
        return cls(config, backbone=backbone)

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *model_args, **kwargs) -> PoleCamNetwork:
        """`PreTrainedModel.from_pretrained`, with the stem frozen again (loading hands back fresh parameters)."""
        model = super().from_pretrained(pretrained_model_name_or_path, *model_args, **kwargs)
        model._freeze_stem()
        return model

    def train(self, mode: bool = True):
        """Train mode, with the frozen stem (and, with `config.freeze_batch_norm`, every BatchNorm) kept in eval."""
        super().train(mode)
        self._freeze_stem()
        if mode and self.config.freeze_batch_norm:
            for module in self.modules():
                if isinstance(module, nn.BatchNorm2d):
                    module.eval()
        elif mode and self.config.freeze_stem:
            self.resnet.embedder.eval()
        return self

    def parameter_groups(self) -> tuple[list[nn.Parameter], list[nn.Parameter]]:
        """`(backbone, classifier)` trainable parameters: CLIMS gives the classifier 10x the backbone's rate."""
        backbone = [p for p in self.resnet.parameters() if p.requires_grad]
        return backbone, [self.classifier.weight]

    def forward(self, pixel_values: torch.Tensor, labels: torch.Tensor | None = None,
                return_dict: bool | None = None) -> PoleCamNetworkOutput | tuple:
        """Logits, maps and (given `labels`) the classification loss.

        Args:
            pixel_values (`torch.FloatTensor` of shape `(batch, 3, height, width)`): images normalised with
                `config.image_mean` / `config.image_std`, any size.
            labels (`torch.Tensor` of shape `(batch, num_classes)`, *optional*): multi-hot image-level labels.
            return_dict (`bool`, *optional*): a [`PoleCamNetworkOutput`] (default) or a tuple.
        """
        features = self.resnet(pixel_values, return_dict=True).last_hidden_state
        class_maps = self.classifier(features)
        logits = self.classifier(features.mean((2, 3), keepdim=True)).flatten(1)
        loss = None
        if labels is not None:
            loss = F.multilabel_soft_margin_loss(logits, labels.to(logits.dtype))
        output = PoleCamNetworkOutput(loss=loss, logits=logits, class_maps=class_maps,
                                      probability_maps=torch.sigmoid(class_maps), feature_map=features)
        return output if return_dict is not False else output.to_tuple()

    # ------------------------------------------------------------------ inference CAMs
    @torch.no_grad()
    def get_cams(self, pixel_values: torch.Tensor, class_indices=None, **options) -> PoleCamNetworkOutput:
        """ReLU CAMs of a batch at the network's output stride, for each image's target classes (eval mode).

        `PoleImageProcessor` (built by `for_model` with this network's scales, flips and `cam_merge="max"`)
        upsamples them, sums the variants and divides by the per-class maximum + 1e-5 (IRN/CLIMS `make_cam`).

        Args:
            pixel_values (`torch.FloatTensor` of shape `(batch, 3, H, W)`): normalised images.
            class_indices (*optional*): per image a list of classes (a flat list for one image); `None` keeps the
                classes whose sigmoid probability exceeds `config.prediction_threshold` (else the most likely).
        """
        if options:
            raise TypeError(f"PoleCamNetwork.get_cams takes no {sorted(options)}: CAA refinement, box edges and "
                            "position embeddings belong to GradCAM (PolePromptModel)")
        was_training = self.training
        self.eval()
        try:
            output = self(pixel_values.to(self.dtype))
        finally:
            self.train(was_training)
        probs = torch.sigmoid(output.logits.float())
        classes = padded_targets(resolve_targets(class_indices, probs, self.config.prediction_threshold,
                                                 inclusive=False), probs.device)
        rows = torch.arange(len(classes), device=probs.device)[:, None]
        valid = (classes >= 0)
        output.cams = F.relu(output.class_maps.float())[rows, classes.clamp_min(0)] * valid[:, :, None, None]
        output.cam_classes = classes
        output.cam_scores = torch.where(valid, probs[rows, classes.clamp_min(0)], torch.zeros_like(probs[:, :1]))
        return output


__all__ = ["PoleCamNetwork", "PoleCamNetworkOutput"]
