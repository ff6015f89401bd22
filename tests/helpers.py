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


def eager_attention(clip, pixels):
    """Per block, the head-averaged attention probabilities of one image through HF's own (eager) layers, and
    each block's input hidden states."""
    layers = clip.vision_model.encoder.layers
    inputs = []
    hooks = [layer.register_forward_pre_hook(lambda module, args: inputs.append(args[0])) for layer in layers]
    try:
        with torch.no_grad():
            clip.vision_model(pixel_values=pixels, interpolate_pos_encoding=True)
    finally:
        for hook in hooks:
            hook.remove()
    probs = []
    for layer, hidden in zip(layers, inputs):
        attn = layer.self_attn
        normed = layer.layer_norm1(hidden)[0]
        q = attn.q_proj(normed).view(-1, attn.num_heads, attn.head_dim).transpose(0, 1)
        k = attn.k_proj(normed).view(-1, attn.num_heads, attn.head_dim).transpose(0, 1)
        probs.append(torch.softmax(q @ k.transpose(1, 2) * attn.scale, -1).mean(0))
    return probs, inputs
