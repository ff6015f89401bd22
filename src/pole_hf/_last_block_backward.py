"""GradCAM's backward through CLIP's last vision block, written out by hand and batched over every target.

GradCAM needs, per target, only the mean over patch tokens of the gradient at the last block's ``layer_norm1``
output (CLIP-ES's target layer). Autograd gets it by a full backward per target through the head, the MLP and the
fused attention (whose CPU backward has no batching rule). Written out, most of that work is shared by all targets:

- the head (post-layernorm of every token, then the patch mean, or the class token) sends every token the same
  cotangent up to a per-token scale and one per-token correction along the token's normalised state, so the MLP's
  second matmul runs once for all targets (``x_hat @ W2``) instead of once per target;
- the attention's backward needs only sums over patch tokens of dq, dk and dv, which reduce to one ``[T, T]``
  product per head for all targets together (``P^T dO``) instead of autograd's four per target
  ([`attention_backward`]);
- the probabilities are recomputed once per head for all targets, and their head mean is CAA's last-block attention.

What stays per target: the MLP's first matmul, ``out_proj`` and ``dO V^T``. Equal to autograd to float32 rounding
(`tests/test_cam.py`). Like [`_clip_internals`], this module reaches inside transformers' `CLIPEncoderLayer`
(`layer_norm1`, `self_attn.{q,k,v,out}_proj`, `layer_norm2`, `mlp.{fc1, fc2, activation_fn}`) and the vision
model's `post_layernorm`.
"""

from __future__ import annotations

from dataclasses import dataclass, fields

import torch
import torch.nn.functional as F
from torch import nn

from ._clip_internals import last_block, split_heads


@dataclass
class LastBlockState:
    """What the hand-written backward reads from the last block's forward (all ``[B, T, ...]``, no autograd).

    Args:
        target: ``layer_norm1`` output ``[B, T, D]`` (GradCAM's activations).
        q, k, v: the attention projections ``[B, T, D]``.
        mixed: the attention output before ``out_proj`` ``[B, T, D]``.
        norm2_hat, norm2_rstd: ``layer_norm2``'s standardised input ``[B, T, D]`` and ``1 / std`` ``[B, T, 1]``.
        act_grad: the MLP activation's derivative at the ``fc1`` output ``[B, T, 4D]``.
        tokens: the block's output ``[B, T, D]``.
    """

    target: torch.Tensor
    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    mixed: torch.Tensor
    norm2_hat: torch.Tensor
    norm2_rstd: torch.Tensor
    act_grad: torch.Tensor
    tokens: torch.Tensor


def standardized(x: torch.Tensor, norm: nn.LayerNorm) -> tuple[torch.Tensor, torch.Tensor]:
    """``(x - mean) / std`` over the last dimension and ``1 / std`` ``[..., 1]``, in float32, as `norm` computes
    them (biased variance plus `norm.eps`)."""
    x = x.float()
    mean = x.mean(-1, keepdim=True)
    rstd = torch.rsqrt((x - mean).pow(2).mean(-1, keepdim=True) + norm.eps)
    return (x - mean) * rstd, rstd


def layer_norm_backward(grad: torch.Tensor, hat: torch.Tensor, rstd: torch.Tensor, weight: torch.Tensor
                        ) -> torch.Tensor:
    """The input gradient of a layer norm from its output gradient `grad` (broadcast against `hat` ``[..., D]``)."""
    scaled = grad * weight.float()
    return rstd * (scaled - scaled.mean(-1, keepdim=True) - hat * (scaled * hat).mean(-1, keepdim=True))


@torch.no_grad()
def last_block_forward(vision: nn.Module, hidden: torch.Tensor) -> LastBlockState:
    """The last block on its input `hidden` ``[B, T, D]`` without autograd, keeping what the backward reads."""
    layer = last_block(vision)
    attn, mlp = layer.self_attn, layer.mlp
    target = layer.layer_norm1(hidden)
    q, k, v = (proj(target) for proj in (attn.q_proj, attn.k_proj, attn.v_proj))
    heads = [split_heads(x, attn) for x in (q, k, v)]
    mixed = F.scaled_dot_product_attention(*heads, scale=attn.scale).transpose(1, 2).reshape(hidden.shape)
    attended = hidden + attn.out_proj(mixed)
    norm2_hat, norm2_rstd = standardized(attended, layer.layer_norm2)
    pre = mlp.fc1(layer.layer_norm2(attended))
    with torch.enable_grad():  # the activation's derivative, elementwise (any of CLIP's activations)
        leaf = pre.detach().requires_grad_(True)
        activated = mlp.activation_fn(leaf)
        (act_grad,) = torch.autograd.grad(activated, leaf, torch.ones_like(activated))
    tokens = attended + mlp.fc2(activated.detach())
    return LastBlockState(target, q, k, v, mixed, norm2_hat, norm2_rstd, act_grad.float(), tokens)


def token_weights(length: int, kind: str, device) -> torch.Tensor:
    """How much each token's post-layernorm state counts in the pooled feature ``[T]``: ``1 / (T - 1)`` for every
    patch token (``"patch_mean"``) or 1 for the class token (``"pooled"``)."""
    weights = torch.zeros(length, device=device)
    if kind == "patch_mean":
        weights[1:] = 1.0 / (length - 1)
    else:
        weights[0] = 1.0
    return weights


def image_state(state: LastBlockState, rows: torch.Tensor) -> LastBlockState:
    """The part of `state` that belongs to the images `rows` (a batch of ``len(rows)``)."""
    return LastBlockState(*(getattr(state, f.name)[rows] for f in fields(LastBlockState)))


def gradcam_weights(vision: nn.Module, state: LastBlockState, pooled_grads: torch.Tensor, kind: str,
                    attention: bool = False, counts: list[int] | None = None
                    ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """GradCAM channel weights: the mean over patch tokens of each target's gradient at ``layer_norm1``'s output.

    Args:
        vision: the `CLIPVisionTransformer` whose last block made `state`.
        state: [`last_block_forward`]'s output.
        pooled_grads: ``[K, B, D]`` each target's gradient at the pooled post-layernorm feature (before the
            projection).
        kind: the pooling, ``"patch_mean"`` or ``"pooled"`` (see `_clip_internals.pool_tokens`).
        attention: also return the last block's head-averaged attention probabilities ``[B, T, T]`` (CAA's).
        counts: the number of real targets of each image (slots ``j >= counts[b]`` of image `b` are padding);
            when some image has fewer than `K`, the images run in groups of equal count, each group on its own
            targets only (one batched backward per distinct count), so no backward is spent on padding: padded
            slots' weights are zero, and so is the attention of an image without targets.

    Returns:
        ``(weights [K, B, D], attention or None)``, float32.
    """
    targets, batch = pooled_grads.shape[:2]
    if counts is not None and len(counts) != batch:
        raise ValueError(f"counts has {len(counts)} entries for a batch of {batch} images: give one per image")
    if counts is not None and min(counts, default=0) < 0:
        raise ValueError(f"counts={list(counts)} has a negative entry: give each image's number of targets")
    if counts is None or all(count >= targets for count in counts):
        return _weights(vision, state, pooled_grads, kind, attention)
    weights = pooled_grads.new_zeros(pooled_grads.shape, dtype=torch.float32)
    length = state.tokens.shape[1]
    mean_probs = state.tokens.new_zeros(batch, length, length, dtype=torch.float32) if attention else None
    for count in sorted(set(counts) - {0}):
        rows = torch.tensor([b for b, c in enumerate(counts) if c == count], device=pooled_grads.device)
        part, probs = _weights(vision, image_state(state, rows), pooled_grads[:count, rows], kind, attention)
        weights[:count, rows] = part
        if mean_probs is not None:
            mean_probs[rows] = probs
    return weights, mean_probs


def _weights(vision: nn.Module, state: LastBlockState, pooled_grads: torch.Tensor, kind: str, attention: bool
             ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """[`gradcam_weights`] of every slot of every image of `state`, padded or not."""
    layer = last_block(vision)
    attn, mlp = layer.self_attn, layer.mlp
    with torch.no_grad():
        post_hat, post_rstd = standardized(state.tokens, vision.post_layernorm)
        scale = token_weights(state.tokens.shape[1], kind, state.tokens.device)[None, :, None] * post_rstd  # [B,T,1]
        # the head's backward: d tokens_t = scale_t * (r - x_hat_t <x_hat_t, g'> / D), g' = gamma * pooled grad
        gamma = pooled_grads.float() * vision.post_layernorm.weight.float()  # [K, B, D]
        centred = gamma - gamma.mean(-1, keepdim=True)
        along = torch.einsum("btd,kbd->kbt", post_hat, gamma)[..., None] / gamma.shape[-1]  # [K, B, T, 1]
        d_tokens = scale * (centred[:, :, None] - along * post_hat)
        fc2 = mlp.fc2.weight.float()
        d_act = scale * ((centred @ fc2)[:, :, None] - along * (post_hat @ fc2))  # x_hat @ W2 once for all targets
        d_norm2 = (d_act * state.act_grad) @ mlp.fc1.weight.float()
        d_attended = d_tokens + layer_norm_backward(d_norm2, state.norm2_hat, state.norm2_rstd,
                                                    layer.layer_norm2.weight)
        d_mixed = d_attended @ attn.out_proj.weight.float()  # [K, B, T, D]
        weights, mean_probs = attention_backward(attn, state, d_mixed, attention)
        projections = (attn.q_proj, attn.k_proj, attn.v_proj)
        patches = state.tokens.shape[1] - 1
        total = sum(w @ proj.weight.float() for w, proj in zip(weights, projections)) / patches
    return total, mean_probs


def attention_backward(attn: nn.Module, state: LastBlockState, d_mixed: torch.Tensor, attention: bool
                       ) -> tuple[list[torch.Tensor], torch.Tensor | None]:
    """Sums over patch tokens of dq, dk, dv ``[K, B, D]`` each, from the attention output's gradient `d_mixed`
    ``[K, B, T, D]``, one head at a time; with `attention`, also the head-averaged probabilities ``[B, T, T]``.

    Per head, with probabilities ``P [s, t]`` (query s, key t), output O and ``delta_s = <dO_s, O_s>``, the score
    gradient is ``dS = P * (dO V^T - delta)`` and its rows sum to zero, so (sums over patch tokens, index >= 1):
    ``sum dv = sum_s (1 - P_s0) dO_s``, ``sum dk = -scale sum_s dS_s0 q_s`` (one column of dS) and
    ``sum dq = scale sum_t (<(P^T dO)_t, v_t> - (P^T delta)_t) k_t`` over query rows s >= 1: one ``[T, T]``
    product per head for all targets at once.
    """
    targets, batch, length, _ = d_mixed.shape
    heads, size = attn.num_heads, attn.head_dim
    q, k, v, out = (split_heads(x.float(), attn) for x in (state.q, state.k, state.v, state.mixed))
    d_out = d_mixed.view(targets, batch, length, heads, size).permute(1, 3, 2, 0, 4)  # [B, H, T, K, d]
    inner = (d_out * out[:, :, :, None]).sum(-1)  # [B, H, T, K]: delta
    sums = [torch.empty(batch, heads, targets, size, device=d_mixed.device) for _ in range(3)]
    mean_probs = torch.zeros(batch, length, length, device=d_mixed.device) if attention else None
    for head in range(heads):
        probs = (q[:, head] @ k[:, head].transpose(-1, -2) * attn.scale).softmax(-1)  # [B, T, T]
        if mean_probs is not None:
            mean_probs.add_(probs)
        grad_out, delta = d_out[:, head], inner[:, head]  # [B, T, K, d], [B, T, K]
        to_cls = probs[:, :, :1]  # P_s0 [B, T, 1]
        sums[2][:, head] = torch.einsum("bsk,bskd->bkd", 1 - to_cls, grad_out)
        d_cls = to_cls * (torch.einsum("bskd,bd->bsk", grad_out, v[:, head, 0]) - delta)  # dS_s0
        sums[1][:, head] = -attn.scale * torch.einsum("bsk,bsd->bkd", d_cls, q[:, head])
        stacked = torch.cat([grad_out.flatten(2), delta], -1)[:, 1:]  # query rows s >= 1: [B, T-1, K(d+1)]
        pulled = probs[:, 1:].transpose(-1, -2) @ stacked  # [B, T, K(d+1)]
        pulled_out = pulled[..., : targets * size].view(batch, length, targets, size)
        columns = torch.einsum("btkd,btd->btk", pulled_out, v[:, head]) - pulled[..., targets * size:]
        sums[0][:, head] = attn.scale * torch.einsum("btk,btd->bkd", columns, k[:, head])
    if mean_probs is not None:
        mean_probs.div_(heads)
    return [s.permute(2, 0, 1, 3).reshape(targets, batch, -1) for s in sums], mean_probs


__all__ = ["LastBlockState", "attention_backward", "gradcam_weights", "image_state", "last_block_forward",
           "layer_norm_backward", "standardized", "token_weights"]
