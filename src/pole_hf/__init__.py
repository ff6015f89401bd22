"""pole_hf: POLE prompt class learning for weakly supervised semantic segmentation with CLIP, on Hugging Face.

Importing the package registers the ``"pole"`` model type with transformers' Auto classes.
"""

from transformers import AutoConfig, AutoModel

from .bundled import TINY_CLIP, TINY_PROMPTS
from .cam import CamEngine, CamOutput
from .configuration_pole import PoleConfig
from .configuration_pole_cam_network import PoleCamNetworkConfig
from .modeling_pole import PoleModelOutput, PolePromptModel
from .modeling_pole_cam_network import PoleCamNetwork, PoleCamNetworkOutput

__version__ = "0.1.0"

AutoConfig.register(PoleConfig.model_type, PoleConfig, exist_ok=True)
AutoModel.register(PoleConfig, PolePromptModel, exist_ok=True)
AutoConfig.register(PoleCamNetworkConfig.model_type, PoleCamNetworkConfig, exist_ok=True)
AutoModel.register(PoleCamNetworkConfig, PoleCamNetwork, exist_ok=True)

from .pipeline_pole import PoleCamPipeline  # after the Auto registration; registers the "pole-cam" task

__all__ = [
    "TINY_CLIP",
    "TINY_PROMPTS",
    "CamEngine",
    "CamOutput",
    "PoleCamNetwork",
    "PoleCamNetworkConfig",
    "PoleCamNetworkOutput",
    "PoleCamPipeline",
    "PoleConfig",
    "PoleModelOutput",
    "PolePromptModel",
    "__version__",
]
