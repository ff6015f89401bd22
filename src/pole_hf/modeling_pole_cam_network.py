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

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from transformers import PreTrainedModel, ResNetModel
from transformers.utils import ModelOutput

from .cam import CamOutput
from .configuration_pole_cam_network import PoleCamNetworkConfig
from .images import pixel_values as to_pixel_values


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
    """

    loss: torch.FloatTensor | None = None
    logits: torch.FloatTensor | None = None
    class_maps: torch.FloatTensor | None = None
    probability_maps: torch.FloatTensor | None = None
    feature_map: torch.FloatTensor | None = None


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
    def compute_cams(self, pixel_values: torch.Tensor, scales: Sequence[float] | None = None,
                     flip: bool | None = None, output_size: tuple[int, int] | None = None) -> torch.Tensor:
        """Multi-scale (and flip) ReLU CAMs of one image, max-normalised per class: ``[C, H, W]`` in [0, 1].

        Args:
            pixel_values (`torch.FloatTensor` of shape `(1, 3, H, W)`): the normalised image.
            scales: default `config.cam_scales`.
            flip: default `config.cam_flip`.
            output_size: `(H, W)` of the result; default the input's size.
        """
        scales = self.config.cam_scales if scales is None else [float(s) for s in scales]
        flip = self.config.cam_flip if flip is None else bool(flip)
        height, width = pixel_values.shape[-2:]
        size = output_size or (height, width)
        total = None
        for scale in scales:
            scaled = pixel_values if scale == 1 else F.interpolate(
                pixel_values, size=(max(1, round(height * scale)), max(1, round(width * scale))), mode="bilinear",
                align_corners=False)
            batch = torch.cat([scaled, scaled.flip(-1)]) if flip else scaled
            maps = F.relu(self(batch.to(self.dtype)).class_maps.float())
            maps = maps[:1] + maps[1:].flip(-1) if flip else maps
            up = F.interpolate(maps, size=size, mode="bilinear", align_corners=False)[0]
            total = up if total is None else total + up
        return total / total.flatten(1).amax(1).clamp_min(1e-5).view(-1, 1, 1)

    def image_cams(self, image, processor=None, class_indices: Sequence[int] | None = None,
                   scales: Sequence[float] | None = None, flip: bool | None = None, max_side: int = 1024,
                   **unused) -> CamOutput:
        """CAMs of one RGB PIL image at its size, in the pipeline's [`CamOutput`] (classes predicted when omitted).

        Args:
            image: an RGB PIL image.
            processor: anything with `image_mean` / `image_std` (default the config's).
            class_indices: target classes; `None` keeps the classes whose sigmoid probability exceeds
                `config.prediction_threshold` (the most likely one when none does).
            scales, flip: see [`compute_cams`].
            max_side: longer-side limit for the computation.
        """
        mean = getattr(processor, "image_mean", None) or self.config.image_mean
        std = getattr(processor, "image_std", None) or self.config.image_std
        width, height = image.size
        shrink = min(1.0, max_side / max(width, height))
        size = (max(1, math.ceil(height * shrink)), max(1, math.ceil(width * shrink)))
        pixels = to_pixel_values(image, size, mean, std).to(self.device)
        was_training = self.training
        self.eval()
        try:
            with torch.no_grad():
                output = self(pixels.to(self.dtype))
                probs = torch.sigmoid(output.logits[0].float())
            if class_indices is None:
                chosen = (probs > self.config.prediction_threshold).nonzero().flatten().tolist()
                class_indices = chosen or [int(probs.argmax())]
            indices = torch.as_tensor(list(class_indices), dtype=torch.long)
            cams = self.compute_cams(pixels, scales, flip, output_size=(height, width))[indices.to(self.device)]
            grid = F.relu(output.class_maps[0].float())[indices.to(self.device)]
        finally:
            self.train(was_training)
        return CamOutput(cams=cams.float().cpu(), class_indices=indices, scores=probs[indices.to(probs.device)].cpu(),
                         grid_cams=(grid / grid.flatten(1).amax(1).clamp_min(1e-5).view(-1, 1, 1)).cpu())


class CamNetworkEngine:
    """The [`CamEngine`] interface (`engine(image, processor, class_indices, ...)`) over a [`PoleCamNetwork`], so the
    pipeline, the evaluation and the selection use network CAMs where they use GradCAM for a prompt model."""

    def __init__(self, model: PoleCamNetwork):
        self.model = model
        self.patch_size = 1

    def __call__(self, image, processor=None, class_indices: Sequence[int] | None = None, scales=None, flip=None,
                 refine: bool = False, max_side: int = 1024, **unused) -> CamOutput:
        return self.model.image_cams(image, processor, class_indices, scales=scales, flip=flip, max_side=max_side)


__all__ = ["CamNetworkEngine", "PoleCamNetwork", "PoleCamNetworkOutput"]
