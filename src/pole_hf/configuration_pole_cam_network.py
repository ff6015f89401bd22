"""PoleCamNetworkConfig: the CLIMS / POLE CAM network (a transformers ResNet at output stride 16 + a 1x1 classifier)."""

from __future__ import annotations

from collections.abc import Sequence

from transformers import PretrainedConfig, ResNetConfig

from .vocab import VOC_CLASSES

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
CAM_SCALES = (1.0, 0.5, 1.5, 2.0)
"""IRN/CLIMS `make_cam` scales (with flip)."""
CAM_BACKGROUND_THRESHOLD = 0.15
"""CLIMS's `cam_eval_thres` / `conf_fg_thres`-free background score for the network's max-normalised CAMs."""


class PoleCamNetworkConfig(PretrainedConfig):
    """Configuration of a [`PoleCamNetwork`].

    Args:
        backbone_config (`ResNetConfig` or `dict`, *optional*): the ResNet; default ResNet-50's shape
            (`ResNetConfig()`, random weights; load `microsoft/resnet-50` with `PoleCamNetwork.from_backbone`).
        class_names (`list[str]`, *optional*): foreground class names, in label order (default: VOC's 20).
        output_stride (`int`, *optional*, defaults to 16): 16 (the last stage keeps its resolution, CLIMS's strides
            (2, 2, 2, 1)) or 32 (the backbone as built).
        freeze_stem (`bool`, *optional*, defaults to `True`): keep conv1/bn1 (the embedder) frozen, as IRN/CLIMS do.
        freeze_batch_norm (`bool`, *optional*, defaults to `True`): every BatchNorm stays in eval mode while training
            (IRN's `FixedBatchNorm`).
        cam_scales (`list[float]`, *optional*): inference scales, default `(1.0, 0.5, 1.5, 2.0)`.
        cam_flip (`bool`, *optional*, defaults to `True`): also add the flipped image's maps at inference.
        background_threshold (`float`, *optional*, defaults to 0.15): background score for masks.
        prediction_threshold (`float`, *optional*, defaults to 0.5): sigmoid probability above which a class is
            predicted when no labels are given.
        image_mean, image_std (`list[float]`, *optional*): input normalisation (ImageNet's).
    """

    model_type = "pole_cam_network"
    sub_configs = {"backbone_config": ResNetConfig}

    def __init__(self, backbone_config: ResNetConfig | dict | None = None, class_names: Sequence[str] | None = None,
                 output_stride: int = 16, freeze_stem: bool = True, freeze_batch_norm: bool = True,
                 cam_scales: Sequence[float] = CAM_SCALES, cam_flip: bool = True,
                 background_threshold: float = CAM_BACKGROUND_THRESHOLD, prediction_threshold: float = 0.5,
                 image_mean: Sequence[float] = IMAGENET_MEAN, image_std: Sequence[float] = IMAGENET_STD, **kwargs):
        if isinstance(backbone_config, dict):
            backbone_config = ResNetConfig(**{k: v for k, v in backbone_config.items() if k != "model_type"})
        self.backbone_config = backbone_config if backbone_config is not None else ResNetConfig()
        if class_names is None:
            class_names = VOC_CLASSES
        self.class_names = [str(n) for n in class_names]
        if not self.class_names or len(set(self.class_names)) != len(self.class_names):
            raise ValueError(f"class_names={self.class_names} must be non-empty and distinct")
        if output_stride not in (16, 32):
            raise ValueError(f"output_stride={output_stride} must be 16 (CLIMS's strides 2,2,2,1) or 32")
        if not cam_scales or any(float(s) <= 0 for s in cam_scales):
            raise ValueError(f"cam_scales={list(cam_scales)} must be non-empty positive scales")
        self.output_stride = int(output_stride)
        self.freeze_stem = bool(freeze_stem)
        self.freeze_batch_norm = bool(freeze_batch_norm)
        self.cam_scales = [float(s) for s in cam_scales]
        self.cam_flip = bool(cam_flip)
        self.background_threshold = float(background_threshold)
        self.prediction_threshold = float(prediction_threshold)
        self.image_mean = [float(v) for v in image_mean]
        self.image_std = [float(v) for v in image_std]
        kwargs.pop("id2label", None)
        kwargs.pop("label2id", None)
        super().__init__(**kwargs)
        self.id2label = dict(enumerate(self.class_names))
        self.label2id = {n: i for i, n in enumerate(self.class_names)}

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    @property
    def feature_size(self) -> int:
        """Channels of the backbone's last stage (the classifier's input): 2048 for ResNet-50."""
        return int(self.backbone_config.hidden_sizes[-1])


def tiny_resnet_config(hidden_sizes: Sequence[int] = (32, 64, 128, 256), depths: Sequence[int] = (1, 1, 1, 1),
                       layer_type: str = "basic", embedding_size: int = 32) -> ResNetConfig:
    """A small random ResNet for offline use (tests, the synthetic world)."""
    return ResNetConfig(embedding_size=embedding_size, hidden_sizes=list(hidden_sizes), depths=list(depths),
                        layer_type=layer_type)


__all__ = ["PoleCamNetworkConfig", "tiny_resnet_config"]
