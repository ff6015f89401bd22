"""The CAM engine against an independent, straightforward GradCAM; geometry, CAA, multi-scale."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from pole_hf.cam import CamEngine, affinity_from_attention, box_mask, minmax


def straightforward_gradcam(model, pixels, targets):
    """GradCAM the plain way: a full forward per class with a hook on the last block's layer_norm1, own backward."""
    clip = model.clip
    store = {}
    hook = clip.vision_model.encoder.layers[-1].layer_norm1.register_forward_hook(
        lambda module, inputs, output: store.__setitem__("act", output))
    with torch.no_grad():
        text = model.get_text_features()
    num_classes = model.config.num_classes
    softmax_set = list(targets) + list(range(num_classes, text.shape[0]))
    maps = []
    try:
        for position in range(len(targets)):
            with torch.enable_grad():
                leaf = pixels.clone().requires_grad_(True)
                tokens = clip.vision_model(pixel_values=leaf, interpolate_pos_encoding=True).last_hidden_state
                feature = clip.visual_projection(clip.vision_model.post_layernorm(tokens[:, 1:]).mean(1))
                logits = clip.logit_scale.exp() * F.normalize(feature, dim=-1) @ text.t()
                prob = logits[0, softmax_set].softmax(-1)[position]
                grad = torch.autograd.grad(prob, store["act"])[0][0, 1:]
            act = store["act"][0, 1:].detach()
            cam = torch.relu(act @ grad.mean(0))
            maps.append((cam - cam.min()) / max(float(cam.max() - cam.min()), 1e-5))
    finally:
        hook.remove()
    h, w = pixels.shape[-2] // 8, pixels.shape[-1] // 8
    return torch.stack(maps).view(len(targets), h, w)


@pytest.mark.parametrize("size", [(32, 32), (40, 56), (64, 24)])
def test_engine_matches_straightforward_gradcam(tiny_model, size):
    torch.manual_seed(1)
    pixels = torch.randn(1, 3, *size)
    cams, indices, probs = CamEngine(tiny_model).grid_cams(pixels, [2, 0])
    reference = straightforward_gradcam(tiny_model, pixels, [2, 0])
    assert indices.tolist() == [2, 0]
    torch.testing.assert_close(cams, reference, atol=1e-4, rtol=0)
    assert torch.allclose(cams.amax(dim=(1, 2)), torch.ones(2)) and cams.min() >= 0
    assert probs.shape == (2,) and 0 < probs.sum() < 1


def test_single_class_still_has_a_gradient(tiny_model):
    cams, _, probs = CamEngine(tiny_model).grid_cams(torch.randn(1, 3, 32, 32), [1])
    assert probs.item() < 1.0  # background words share the softmax
    assert cams.max() > 0.99


def test_predicted_targets_without_labels(tiny_model):
    engine = CamEngine(tiny_model)
    pixels = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        probs = tiny_model(pixels).logits.new_tensor(0)  # noqa: F841 (forward works under no_grad)
        logits = torch.cat([tiny_model(pixels).logits, tiny_model(pixels).background_logits], 1)[0]
    expected = torch.nonzero(logits.softmax(-1)[:3] >= tiny_model.config.prediction_threshold).flatten().tolist()
    _, indices, _ = engine.grid_cams(pixels, None)
    assert indices.tolist() == (expected or [int(logits[:3].argmax())])


@pytest.mark.parametrize("size", [(53, 37), (375, 500)])
def test_maps_come_back_at_the_input_size(tiny_model, tiny_clip_dir, size):
    from transformers import AutoImageProcessor

    processor = AutoImageProcessor.from_pretrained(tiny_clip_dir)
    height, width = size
    image = Image.fromarray(np.random.default_rng(0).integers(0, 255, (height, width, 3), dtype=np.uint8))
    output = CamEngine(tiny_model)(image, processor, [0, 1], max_side=128)
    assert output.cams.shape == (2, height, width) and output.cams.dtype == torch.float32
    grid_h, grid_w = output.grid_cams.shape[1:]
    scale = min(1.0, 128 / max(height, width))
    assert (grid_h, grid_w) == (int(np.ceil(height * scale / 8)), int(np.ceil(width * scale / 8)))
    assert torch.isfinite(output.cams).all() and output.cams.max() <= 1.0


def test_flip_and_scales_average(tiny_model, tiny_clip_dir):
    from transformers import AutoImageProcessor

    processor = AutoImageProcessor.from_pretrained(tiny_clip_dir)
    image = Image.fromarray(np.random.default_rng(1).integers(0, 255, (40, 48, 3), dtype=np.uint8))
    engine = CamEngine(tiny_model)
    single = engine(image, processor, [0]).cams
    flipped = engine(image.transpose(Image.FLIP_LEFT_RIGHT), processor, [0]).cams.flip(-1)
    both = engine(image, processor, [0], flip=True).cams
    torch.testing.assert_close(both, (single + flipped) / 2, atol=1e-5, rtol=0)
    multi = engine(image, processor, [0], scales=(1.0, 1.5)).cams
    assert multi.shape == single.shape and not torch.allclose(multi, single)


def test_all_black_image_gives_defined_maps(tiny_model, tiny_clip_dir):
    from transformers import AutoImageProcessor

    processor = AutoImageProcessor.from_pretrained(tiny_clip_dir)
    output = CamEngine(tiny_model)(Image.new("RGB", (32, 32)), processor, [0, 2], refine=True)
    assert torch.isfinite(output.cams).all()


def test_affinity_is_symmetric_and_refinement_stays_in_boxes(tiny_model):
    attention = torch.rand(12, 12).softmax(-1)
    affinity = affinity_from_attention(attention)
    torch.testing.assert_close(affinity, affinity.t(), atol=1e-5, rtol=0)
    cam = torch.zeros(1, 4, 3)
    cam[0, 0, 0] = 1.0
    assert box_mask(cam[0].numpy()).sum() == 1
    cams, _, _ = CamEngine(tiny_model).grid_cams(torch.randn(1, 3, 32, 40), [0, 1], refine=True)
    assert cams.shape == (2, 4, 5) and torch.isfinite(cams).all() and cams.max() > 0.99


def test_box_mask_covers_each_region_box():
    grid = np.zeros((6, 6), dtype=np.float32)
    grid[0, 0] = grid[1, 1] = 1.0  # diagonal: two 4-connected regions -> two 1x1 boxes
    grid[4, 3:6] = 0.9
    mask = box_mask(grid, 0.4)
    assert mask[0, 0] and mask[1, 1] and not mask[0, 1] and mask[4, 3:6].all() and mask.sum() == 5


def test_minmax_constant_map_is_zero():
    maps = minmax(torch.ones(2, 3, 3))
    assert torch.count_nonzero(maps) == 0


def test_images_smaller_than_a_patch_are_refused(tiny_model, tiny_clip_dir):
    from transformers import AutoImageProcessor

    processor = AutoImageProcessor.from_pretrained(tiny_clip_dir)
    with pytest.raises(ValueError, match="smaller than one 8x8 patch"):
        CamEngine(tiny_model)(Image.new("RGB", (7, 30)), processor, [0])
