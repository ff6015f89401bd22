"""Behaviours a mutation run of the CAM modules found unpinned (issue #17): target resolution and padding, the
GradCAM engine's defaults, scores, batching and CAA layer count, the CLIP internals, the inference loop, the
processor and the two CAM models. Hand computations on tiny tensors, round trips and boundary sizes."""

import pytest
import torch

from pole_hf.cam import gradcam, padded_targets, resolve_targets

# --- target resolution and padding (pole_hf.cam) ---


def test_resolve_targets_reads_a_flat_list_for_one_image_and_nested_lists_otherwise():
    probs = torch.tensor([[0.1, 0.6, 0.3]])
    assert resolve_targets([2, 0], probs, 0.5) == [[2, 0]]
    assert resolve_targets([[2, 0]], probs, 0.5) == [[2, 0]]
    two = torch.tensor([[0.1, 0.6, 0.3], [0.5, 0.2, 0.3]])
    assert resolve_targets([None, [2]], two, 0.5) == [[1], [2]]
    assert resolve_targets(None, two, 0.5) == [[1], [0]]
    with pytest.raises(ValueError, match="1 entries for a batch of 2"):
        resolve_targets([[0]], two, 0.5)


def test_resolve_targets_threshold_is_inclusive_unless_told_and_falls_back_to_the_argmax():
    probs = torch.tensor([[0.25, 0.5, 0.25], [0.2, 0.3, 0.5]], dtype=torch.float64)
    assert resolve_targets(None, probs, 0.25) == [[0, 1, 2], [1, 2]]
    assert resolve_targets(None, probs, 0.25, inclusive=False) == [[1], [1, 2]]
    assert resolve_targets(None, probs, 0.5, inclusive=False) == [[1], [2]]  # none above: the most likely one
    assert resolve_targets(None, torch.tensor([[0.1, 0.2, 0.7]]), 0.9) == [[2]]


def test_resolve_targets_accepts_the_first_and_last_class_only():
    probs = torch.full((1, 3), 1 / 3)
    assert resolve_targets([0, 2], probs, 0.5) == [[0, 2]]
    for bad in (3, -1):
        with pytest.raises(ValueError, match=rf"class indices \[{bad}\] are out of range for 3 classes"):
            resolve_targets([[1, bad]], probs, 0.5)


def test_padded_targets_fill_minus_one_and_keep_empty_batches_empty():
    classes = padded_targets([[2, 0], [], [1]])
    assert classes.dtype == torch.long
    assert classes.tolist() == [[2, 0], [-1, -1], [1, -1]]
    assert padded_targets([]).shape == (0, 0)
    assert padded_targets([[], []]).shape == (2, 0)


# --- the GradCAM engine (pole_hf.cam.gradcam) ---


def hand_scores(logits: torch.Tensor, targets: list[int], num_classes: int) -> torch.Tensor:
    """Softmax of one image's logits over its targets and the background words, read at the targets."""
    allowed = list(targets) + list(range(num_classes, logits.shape[-1]))
    return logits[allowed].softmax(-1)[: len(targets)]


def test_gradcam_defaults_are_plain_clip_es_cams(tiny_model):
    torch.manual_seed(3)
    pixels = torch.randn(1, 3, 32, 40)
    default = gradcam(tiny_model, pixels, [[0, 1]])
    explicit = gradcam(tiny_model, pixels, [[0, 1]], refine=False, position_embedding="clip_es")
    torch.testing.assert_close(default.cams, explicit.cams, atol=0, rtol=0)
    bicubic = gradcam(tiny_model, pixels, [[0, 1]], position_embedding="bicubic")
    assert not torch.allclose(default.cams, bicubic.cams, atol=1e-3)
    refined = gradcam(tiny_model, pixels, [[0, 1]], refine=True)
    assert not torch.allclose(default.cams, refined.cams, atol=1e-3)
    torch.testing.assert_close(refined.cams, gradcam(tiny_model, pixels, [[0, 1]], refine=True,
                                                     box_edges="clip_es").cams, atol=0, rtol=0)


def test_gradcam_batch_scores_padding_and_class_zero_by_hand(tiny_model):
    torch.manual_seed(4)
    pixels = torch.randn(3, 3, 32, 40)
    targets = [[0, 2], [1], [0]]
    out = gradcam(tiny_model, pixels, targets)
    num_classes = tiny_model.config.num_classes
    assert out.cam_classes.tolist() == [[0, 2], [1, -1], [0, -1]]
    assert out.cams.shape == (3, 2, 4, 5)
    for row, chosen in enumerate(targets):
        torch.testing.assert_close(out.cam_scores[row, : len(chosen)],
                                   hand_scores(out.logits[row].float(), chosen, num_classes), atol=1e-6, rtol=0)
        alone = gradcam(tiny_model, pixels[row: row + 1], [chosen])
        torch.testing.assert_close(out.cams[row, : len(chosen)], alone.cams[0], atol=1e-5, rtol=0)
        assert torch.allclose(out.cams[row, : len(chosen)].amax((1, 2)), torch.ones(len(chosen)))
    assert out.cam_scores[1, 1] == 0 and out.cam_scores[2, 1] == 0
    assert out.cams[1, 1].abs().sum() == 0 and out.cams[2, 1].abs().sum() == 0
    # the softmax takes every background word: the scores of one target and the background words sum to 1
    assert 0 < out.cam_scores[2, 0] < 1


def test_gradcam_images_without_targets(tiny_model):
    pixels = torch.randn(2, 3, 24, 32)
    empty = gradcam(tiny_model, pixels, [[], []])
    assert empty.cams.shape == (2, 0, 3, 4) and empty.cams.dtype == torch.float32
    assert empty.cam_classes.shape == empty.cam_scores.shape == (2, 0)
    mixed = gradcam(tiny_model, pixels, [[], [1]], refine=True)
    alone = gradcam(tiny_model, pixels[1:], [[1]], refine=True)
    assert mixed.cam_classes.tolist() == [[-1], [1]] and mixed.cams[0].abs().sum() == 0
    torch.testing.assert_close(mixed.cams[1], alone.cams[0], atol=1e-5, rtol=0)


def test_gradcam_refuses_a_width_off_the_patch_grid(tiny_model):
    with pytest.raises(ValueError, match="32x36 are not multiples of the 8-pixel patch"):
        gradcam(tiny_model, torch.randn(1, 3, 32, 36), [[0]])
    with pytest.raises(ValueError, match="36x32 are not multiples"):
        gradcam(tiny_model, torch.randn(1, 3, 36, 32), [[0]])


def eager_attention(clip, pixels):
    """Per block, the head-averaged attention probabilities of one image through HF's own (eager) layers."""
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
    return probs


@pytest.mark.parametrize("caa_layers", [1, 2, 5])
def test_caa_uses_the_last_caa_layers_blocks(tiny_model, caa_layers):
    from pole_hf.caa import affinity_from_attention, refine_with_affinity

    torch.manual_seed(5)
    pixels = torch.randn(1, 3, 32, 40)
    probs = eager_attention(tiny_model.clip, pixels)  # the tiny CLIP has 2 blocks: 5 means both
    raw = gradcam(tiny_model, pixels, [[0, 2]], position_embedding="bicubic").cams[0]
    refined = gradcam(tiny_model, pixels, [[0, 2]], refine=True, caa_layers=caa_layers,
                      position_embedding="bicubic").cams[0]
    affinity = affinity_from_attention(torch.stack(probs[-caa_layers:]).mean(0)[1:, 1:])
    torch.testing.assert_close(refined, refine_with_affinity(raw, affinity), atol=1e-4, rtol=0)
