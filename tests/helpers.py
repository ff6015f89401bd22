"""Small builders shared by the tests (the fixtures in conftest.py wrap them): random images, sentence features."""

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image


def random_image(seed: int = 0, height: int = 40, width: int = 48) -> Image.Image:
    """A PIL RGB image of uniform random pixels, `height x width`."""
    return Image.fromarray(np.random.default_rng(seed).integers(0, 255, (height, width, 3), dtype=np.uint8))


def sentence_features(clip, tokenizer, sentences) -> torch.Tensor:
    """L2-normalised `CLIPModel.get_text_features` of plain sentences: the reference a prompt must equal."""
    inputs = tokenizer(sentences, padding=True, return_tensors="pt")
    with torch.no_grad():
        return F.normalize(clip.get_text_features(**inputs).pooler_output, dim=-1)


def fit_labels(model, pixels, labels, steps: int, lr: float = 0.05) -> list[float]:
    """Adam steps on the model's multi-label loss (`model(pixels, labels=...)`); the loss before each step."""
    optimizer = torch.optim.Adam(model.learnable_parameters(), lr=lr)
    losses = []
    for _ in range(steps):
        optimizer.zero_grad()
        loss = model(pixels, labels=labels).loss
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    return losses
