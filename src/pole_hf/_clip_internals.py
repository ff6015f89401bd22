"""The one module that reaches inside transformers' CLIP: manual block runs, attention probabilities, the patch and
position embeddings, the head, and the text tower fed with embeddings instead of ids.

Everything else in pole_hf calls these functions or CLIP's public API, so a change of `CLIPVisionTransformer`,
`CLIPEncoderLayer`, `CLIPAttention` or `CLIPTextTransformer` in transformers is mended here alone (and in
`_last_block_backward`, GradCAM's written-out backward through the last block, which reads the same attributes). Attributes used:
`vision_model.{embeddings.{patch_embedding, class_embedding, position_embedding}, pre_layrnorm, encoder.layers,
post_layernorm}`, `layer.{layer_norm1, self_attn.{q_proj, k_proj, v_proj, out_proj, num_heads, head_dim, scale},
layer_norm2, mlp}`, `visual_projection`, `text_model.{embeddings.{token_embedding, position_embedding}, encoder.layers,
final_layer_norm}`, `text_projection`.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

POSITION_EMBEDDINGS = ("clip_es", "bicubic")
IMAGE_FEATURES = ("patch_mean", "pooled")


def split_heads(x: torch.Tensor, attn: nn.Module) -> torch.Tensor:
    """``[B, T, D]`` -> ``[B, heads, T, head_dim]`` for a CLIP attention module."""
    return x.view(x.shape[0], -1, attn.num_heads, attn.head_dim).transpose(1, 2)


def attention_and_probs(attn: nn.Module, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor):
    """Explicit multi-head attention of ``[B, heads, T, head_dim]`` inputs, one head at a time: the merged output
    ``[B, T, D]`` and the head-averaged probabilities ``[B, T, T]`` (CAA's attention).
    No autograd.

    The ``[B, T, T]`` scores and probabilities live in two buffers reused by every head (a fresh allocation of that
    size per head costs more than the softmax itself on the CPU: the allocator maps and faults in new pages), and
    the scale is applied to q once instead of to every score matrix.
    """
    batch, heads, length, _ = q.shape
    with torch.no_grad():
        q = q * attn.scale
        scores = q.new_empty(batch, length, length)
        probs = torch.empty_like(scores)
        total = torch.zeros_like(scores)
        mixed = q.new_empty(heads, batch, length, v.shape[-1])
        for head in range(heads):
            torch.matmul(q[:, head], k[:, head].transpose(-1, -2), out=scores)
            torch._softmax(scores, -1, False, out=probs)
            torch.matmul(probs, v[:, head], out=mixed[head])
            total.add_(probs)
    return mixed.permute(1, 2, 0, 3).reshape(batch, length, -1), total.div_(heads)


def layer_with_attention(layer: nn.Module, hidden: torch.Tensor):
    """A CLIP encoder layer's forward that also returns its head-averaged attention probabilities ``[B, T, T]``
    (one pass: the probabilities it computes are the ones it uses)."""
    attn = layer.self_attn
    normed = layer.layer_norm1(hidden)
    q, k, v = (split_heads(proj(normed), attn) for proj in (attn.q_proj, attn.k_proj, attn.v_proj))
    mixed, probs = attention_and_probs(attn, q, k, v)
    hidden = hidden + attn.out_proj(mixed)
    return hidden + layer.mlp(layer.layer_norm2(hidden)), probs


def clip_es_position_embeddings(weight: torch.Tensor, grid_h: int, grid_w: int) -> torch.Tensor:
    """CLIP-ES's position embeddings for a ``grid_h x grid_w`` patch grid (its ``clip/model.py``): the patch part
    of ``weight [1 + n*n, D]`` resized bilinearly (``align_corners=False``), then the whole table rounded to fp16,
    at every size (the native grid too). Returns ``[1 + grid_h * grid_w, D]`` in ``weight``'s dtype."""
    side = math.isqrt(weight.shape[0] - 1)
    if side * side != weight.shape[0] - 1:
        raise ValueError(f"position embeddings of {weight.shape[0]} rows are not 1 + a square grid")
    grid = weight[1:].t().reshape(1, -1, side, side).float()
    grid = F.interpolate(grid, size=(grid_h, grid_w), mode="bilinear", align_corners=False)
    table = torch.cat([weight[:1].float(), grid.reshape(weight.shape[1], -1).t()])
    return table.half().to(weight.dtype)


def vision_tokens(vision: nn.Module, pixels: torch.Tensor, position_embedding: str = "clip_es") -> torch.Tensor:
    """Input tokens ``[B, 1 + h*w, D]`` (before ``pre_layrnorm``) of images ``[B, 3, H, W]``.

    Args:
        vision: a `CLIPVisionTransformer` (`clip.vision_model`).
        position_embedding: ``"clip_es"`` (bilinear, fp16: [`clip_es_position_embeddings`]) or ``"bicubic"``
            (transformers' `interpolate_pos_encoding`).
    """
    if position_embedding not in POSITION_EMBEDDINGS:
        raise ValueError(f"position_embedding must be one of {POSITION_EMBEDDINGS}, got {position_embedding!r}")
    embeddings = vision.embeddings
    if position_embedding == "bicubic":
        return embeddings(pixels, interpolate_pos_encoding=True)
    patch = embeddings.patch_embedding
    patches = patch(pixels.to(patch.weight.dtype)).flatten(2).transpose(1, 2)
    tokens = torch.cat([embeddings.class_embedding.to(patches.dtype).expand(len(pixels), 1, -1), patches], 1)
    size = patch.kernel_size[0]
    table = clip_es_position_embeddings(embeddings.position_embedding.weight, pixels.shape[-2] // size,
                                        pixels.shape[-1] // size)
    return tokens + table.to(tokens.dtype)[None]


@torch.no_grad()
def vision_prefix(vision: nn.Module, pixels: torch.Tensor, caa_layers: int = 0, position_embedding: str = "clip_es"):
    """Run every block but the last without autograd. The last `caa_layers` blocks (counting the last one, which
    is not run here) run with explicit attention and hand back the sum of their head-averaged probabilities
    ``[B, T, T]`` (`None` when `caa_layers` is 0).

    Returns:
        ``(hidden [B, T, D], attention [B, T, T] or None)``: the input of the last block.
    """
    layers = vision.encoder.layers
    hidden = vision.pre_layrnorm(vision_tokens(vision, pixels, position_embedding))
    attention = None
    first_caa = len(layers) - caa_layers
    for index, layer in enumerate(layers[:-1]):
        if caa_layers and index >= first_caa:
            hidden, probs = layer_with_attention(layer, hidden)
            attention = probs if attention is None else attention.add_(probs)
        else:
            hidden = layer(hidden, None)
    return hidden, attention


def last_block(vision: nn.Module) -> nn.Module:
    """The vision encoder's last layer (GradCAM's target block)."""
    return vision.encoder.layers[-1]


def pool_tokens(clip: nn.Module, tokens: torch.Tensor, kind: str = "patch_mean") -> torch.Tensor:
    """The pooled, post-layernormed state ``[N, width]`` of the vision encoder's last block output
    ``[N, 1 + HW, width]``, before the projection.

    Args:
        kind: ``"patch_mean"`` (CLIP-ES: post-layernorm on every token, mean over patch tokens) or ``"pooled"``
            (post-layernorm of the class token; CLIP's own feature).
    """
    if kind not in IMAGE_FEATURES:
        raise ValueError(f"image feature must be one of {IMAGE_FEATURES}, got {kind!r}")
    post = clip.vision_model.post_layernorm
    return post(tokens[:, 1:]).mean(dim=1) if kind == "patch_mean" else post(tokens[:, 0])


def image_head(clip: nn.Module, tokens: torch.Tensor, kind: str = "patch_mean") -> torch.Tensor:
    """Projected (not normalised) image features from the vision encoder's last block output ``[N, 1 + HW, width]``
    (`kind` as in [`pool_tokens`])."""
    return clip.visual_projection(pool_tokens(clip, tokens, kind))


def vision_output_tokens(clip: nn.Module, pixel_values: torch.Tensor) -> torch.Tensor:
    """The vision encoder's last block output ``[N, 1 + HW, width]`` at any input size (transformers' bicubic
    position-embedding interpolation)."""
    return clip.vision_model(pixel_values=pixel_values.to(clip.dtype), interpolate_pos_encoding=True).last_hidden_state


def causal_mask(length: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """Additive causal attention mask ``[1, 1, T, T]``: 0 where a token may attend, the dtype's minimum elsewhere."""
    mask = torch.full((length, length), torch.finfo(dtype).min, dtype=dtype, device=device)
    return torch.triu(mask, diagonal=1)[None, None]


def text_features_from_embeddings(clip: nn.Module, embeds: torch.Tensor, eos_positions: torch.Tensor) -> torch.Tensor:
    """CLIP's text transformer on embedded prompts ``[N, T, D]``: the projected state of each EOS token."""
    text = clip.text_model
    length = embeds.shape[1]
    hidden = embeds + text.embeddings.position_embedding.weight[:length]
    mask = causal_mask(length, hidden.dtype, hidden.device)
    for layer in text.encoder.layers:
        hidden = layer(hidden, mask)
    hidden = text.final_layer_norm(hidden)
    pooled = hidden[torch.arange(hidden.shape[0], device=hidden.device), eos_positions]
    return clip.text_projection(pooled)


def projected(output) -> torch.Tensor:
    """The tensor of `CLIPModel.get_image_features` / `get_text_features` (an output object in transformers 5)."""
    return output.pooler_output
