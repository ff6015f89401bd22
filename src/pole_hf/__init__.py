"""pole_hf: POLE prompt class learning for weakly supervised semantic segmentation with CLIP, on Hugging Face."""

__version__ = "0.1.0"
