"""pole_hf: POLE prompt class learning for weakly supervised semantic segmentation with CLIP, on Hugging Face.

Importing the package registers the ``"pole"`` model type with transformers' Auto classes.
"""

from transformers import AutoConfig, AutoImageProcessor, AutoModel, AutoModelForSemanticSegmentation

from .bundled import TINY_CLIP, TINY_PROMPTS
from .cam import CamOutput
from .cam_inference import batched_cams, image_cams, iter_cams
from .configuration_pole import PoleConfig
from .configuration_pole_cam_network import PoleCamNetworkConfig
from .cpu_allocator import tune_cpu_allocator
from .image_processing_pole import PoleImageProcessor
from .modeling_pole import PoleModelOutput, PolePromptModel
from .modeling_pole_cam_network import PoleCamNetwork, PoleCamNetworkOutput

__version__ = "0.1.0"

AutoConfig.register(PoleConfig.model_type, PoleConfig, exist_ok=True)
AutoModel.register(PoleConfig, PolePromptModel, exist_ok=True)
AutoModelForSemanticSegmentation.register(PoleConfig, PolePromptModel, exist_ok=True)  # pipeline("image-segmentation")
AutoImageProcessor.register(PoleConfig, slow_image_processor_class=PoleImageProcessor, exist_ok=True)
AutoConfig.register(PoleCamNetworkConfig.model_type, PoleCamNetworkConfig, exist_ok=True)
AutoModel.register(PoleCamNetworkConfig, PoleCamNetwork, exist_ok=True)
AutoImageProcessor.register(PoleCamNetworkConfig, slow_image_processor_class=PoleImageProcessor, exist_ok=True)

from .pipeline_pole import PoleCamPipeline  # after the Auto registration; registers the "pole-cam" task

__all__ = [
    "TINY_CLIP",
    "TINY_PROMPTS",
    "CamOutput",
    "PoleCamNetwork",
    "PoleCamNetworkConfig",
    "PoleCamNetworkOutput",
    "PoleCamPipeline",
    "PoleConfig",
    "PoleImageProcessor",
    "PoleModelOutput",
    "PolePromptModel",
    "__version__",
    "batched_cams",
    "image_cams",
    "iter_cams",
    "tune_cpu_allocator",
]
