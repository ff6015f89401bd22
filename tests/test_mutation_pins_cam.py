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


# --- the inference loop (pole_hf.cam_inference) ---


class RecordingCamModel(torch.nn.Module):
    """A CAM model stand-in whose parameter lives on the meta device: it records each `get_cams` call's batch size
    and pixel device, and returns one constant map per target (class 0 predicted when none is given)."""

    def __init__(self):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.zeros(1, device="meta"))
        self.calls = []

    def get_cams(self, pixel_values, class_indices, **options):
        self.calls.append((len(pixel_values), pixel_values.device.type, tuple(pixel_values.shape[-2:])))
        targets = [[0] if t is None else list(t) for t in class_indices]
        slots = max(len(t) for t in targets)
        classes = padded_targets(targets)
        grid = (pixel_values.shape[-2] // 8, pixel_values.shape[-1] // 8)
        cams = (classes >= 0).float()[:, :, None, None].expand(-1, -1, *grid).clone()
        return type("Out", (), {"cams": cams, "cam_classes": classes, "cam_scores": torch.ones(len(targets), slots)})


def test_batched_cams_moves_the_pixels_to_the_model_device(tiny_processor, random_image):
    from pole_hf import batched_cams

    model = RecordingCamModel()  # its parameter is on the meta device; its maps come back on the CPU
    outputs = batched_cams(model, tiny_processor, [random_image(0, 16, 16)], [[0]])
    assert model.calls == [(1, "meta", (16, 16))] and outputs[0].cams.shape == (1, 16, 16)


def test_batched_cams_default_batch_size_is_8(tiny_processor, random_image, monkeypatch):
    from pole_hf import batched_cams

    model = RecordingCamModel()
    monkeypatch.setattr("pole_hf.cam_inference._device", lambda m: torch.device("cpu"))
    outputs = batched_cams(model, tiny_processor, [random_image(i, 16, 16) for i in range(9)], [[1]] * 9)
    assert [c[0] for c in model.calls] == [8, 1] and len(outputs) == 9
    assert all(o.class_indices.tolist() == [1] and o.cams.shape == (1, 16, 16) for o in outputs)


def test_image_cams_is_one_image_of_batch_one(tiny_processor, random_image, monkeypatch):
    from pole_hf import image_cams

    model = RecordingCamModel()
    monkeypatch.setattr("pole_hf.cam_inference._device", lambda m: torch.device("cpu"))
    out = image_cams(model, tiny_processor, random_image(0, 16, 24), [2], max_side=16)
    assert model.calls == [(1, "cpu", (16, 16))]  # 24 x 16 capped at 16 x 10.7, rounded up to the 8-pixel patch
    assert out.cams.shape == (1, 16, 24)


def test_size_buckets_use_the_given_longer_side_cap(tiny_processor, random_image):
    from pole_hf.cam_inference import size_buckets

    images = [random_image(0, 200, 400), random_image(1, 190, 400)]  # 200 x 400 and 192 x 400 at the default cap
    assert size_buckets(tiny_processor, images) == {(200, 400): [0], (192, 400): [1]}
    assert size_buckets(tiny_processor, images, max_side=64) == {(32, 64): [0, 1]}  # 32 and 30.4 -> 32


def test_iter_cams_default_window_is_four_default_batches(tiny_processor, monkeypatch):
    import pole_hf.cam_inference as inference

    calls = []
    monkeypatch.setattr(inference, "batched_cams", lambda model, processor, images, targets, batch_size, **o:
                        calls.append((len(images), batch_size)) or [None] * len(images))
    items = list(range(33))
    yielded = list(inference.iter_cams(None, tiny_processor, items, image=lambda i: i, targets=lambda i: [0]))
    assert calls == [(32, 8), (1, 8)] and [item for item, _ in yielded] == items


# --- the processor (pole_hf.image_processing_pole) ---


def grid_output(cams, classes):
    """A model output stand-in: `cams [B, K, h, w]`, `cam_classes [B, K]`, scores 1 for the real slots."""
    classes = torch.as_tensor(classes)
    return type("Out", (), {"cams": torch.as_tensor(cams, dtype=torch.float32), "cam_classes": classes,
                            "cam_scores": (classes >= 0).float()})


def test_semantic_segmentation_unflips_the_flipped_outputs(tiny_processor):
    plain = grid_output([[[[0.9, 0.1]]]], [[1]])
    mirrored = grid_output([[[[0.9, 0.1]]]], [[1]])  # declared flipped: it reads [0.1, 0.9]
    options = {"background": "threshold", "bg_threshold": 0.6}
    same = tiny_processor.post_process_semantic_segmentation([plain, mirrored], **options)
    assert same[0].tolist() == [[2, 0]]  # mean [0.9, 0.1]: class 1 (value 2), then background
    merged = tiny_processor.post_process_semantic_segmentation([plain, mirrored], flips=[False, True], **options)
    assert merged[0].tolist() == [[0, 0]] and merged[0].dtype == torch.long  # mean [0.5, 0.5] < 0.6


# --- the CAM network (pole_hf.modeling_pole_cam_network) ---


def test_cam_network_forward_with_a_tuple_returning_backbone_config():
    from test_cam_network import network

    model = network()
    model.resnet.config.return_dict = False  # the backbone's own default output is then a tuple
    out = model(torch.randn(1, 3, 32, 32))
    assert out.class_maps.shape == (1, 3, 2, 2) and out.feature_map.shape == (1, 32, 2, 2)
